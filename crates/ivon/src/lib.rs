//! IVON, the Improved Variational Online Newton optimizer (Shen et al., ICML 2024,
//! arXiv 2402.17641), for candle `Var`s: Adam-like training that also learns a diagonal Gaussian
//! posterior N(μ, σ²) over the weights, used for Bayesian LoRA (IVON-LoRA, arXiv 2411.04421).
//! It matches PyPI `ivon-opt` 0.1.3 numerically (golden tests in `tests/golden.rs`); the
//! algorithm is `specs/ivon.md`. The crate knows nothing of LLMs.
//!
//! # Brief overview
//! - [`Ivon`]: the optimizer. Gradients are taken at sampled weights θ = μ + σ⊙ε:
//!   [`Ivon::with_sampled_params`] (one micro-batch) or [`Ivon::with_sample`] /
//!   [`Sample::accumulate`] (several micro-batches under one draw), then [`Ivon::step`]. μ is
//!   restored after every sample, also on error or panic.
//! - [`IvonConfig`] (hyper-parameters with ivon-opt's names, [`HessApprox`], presets
//!   [`IvonConfig::ivon_lora`]) and [`ParamGroup`] (per-group overrides).
//! - [`posterior`]: per-var mean / Hessian / std, posterior samples for prediction, and
//!   [`Posterior`], the state file (safetensors) that resumes training bit for bit.
//! - [`Optimizer`]: the trait shared with [`AdamW`] and [`Sgd`]; [`Optimizer::backward_step`]
//!   drives all three from one training loop.
//! - Noise: seeded and resumable ([`NoiseState`], [`Ivon::set_seed`]) or injected
//!   ([`Ivon::set_noise_fn`]); multi-worker averaging through [`Ivon::set_sync_fn`].
//! - On a CUDA device (feature `cuda`), [`Ivon`] and [`AdamW`] keep their state on the device and
//!   step with fused kernels, with no host transfer per step; a seeded device run draws ε from
//!   [`noise::philox_normal`] instead of the CPU's stream (details in `src/device/mod.rs`).
//!
//! # Example
//! A tiny linear regression trained with IVON, then its posterior std:
//! ```
//! use candle_core::{DType, Device, Tensor, Var};
//! use ivon::{Ivon, IvonConfig};
//!
//! # fn main() -> ivon::Result<()> {
//! let dev = Device::Cpu;
//! let x = Tensor::new(&[[1f32, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0]], &dev)?;
//! let y = Tensor::new(&[[1f32], [-1.0], [0.0], [3.0]], &dev)?; // y = x·[1, −1]
//! let w = Var::zeros((2, 1), DType::F32, &dev)?;
//! let config = IvonConfig { lr: 0.1, ess: 4.0, hess_init: 1.0, beta2: 0.99, rescale_lr: false, ..Default::default() };
//! let mut opt = Ivon::new(vec![w.clone()], config)?;
//! opt.set_seed(0);
//! for _ in 0..300 {
//!     // Forward + backward under θ = μ + σ⊙ε; the var holds μ again afterwards.
//!     opt.with_sampled_params(|| {
//!         let loss = (x.matmul(w.as_tensor())? - &y)?.sqr()?.mean_all()?;
//!         loss.backward()
//!     })?;
//!     opt.step()?;
//! }
//! let mean = w.as_tensor().flatten_all()?.to_vec1::<f32>()?;
//! assert!((mean[0] - 1.0).abs() < 0.1 && (mean[1] + 1.0).abs() < 0.1, "{mean:?}");
//! let std = opt.std(&w)?.flatten_all()?.to_vec1::<f32>()?; // σ = 1/√(ess·(h+δ))
//! assert!(std.iter().all(|&s| s > 0.0 && s < 1.0));
//! # Ok(()) }
//! ```
pub mod config;
mod device;
mod error;
mod flat;
mod ivon;
pub mod noise;
pub mod optimizer;
pub mod posterior;
pub mod update;

pub use config::{GroupHyper, HessApprox, IvonConfig, IvonLoraTask, ParamGroup};
pub use device::enabled as device_path_enabled;
pub use error::{Error, Result};
pub use ivon::{Ivon, Sample, SyncFn};
pub use noise::{NoiseFn, NoiseState};
pub use optimizer::{AdamW, AdamWConfig, Optimizer, Sgd, SgdConfig};
pub use posterior::{ParamLayout, Posterior};
pub use update::{new_hess, new_mean, new_momentum, nll_hess, sample_noise, Coefficients};
