//! B-LoRA (Meo, Sycheva et al. 2024, arXiv 2406.13046; `shared/specs/blora.md`): an AdaLoRA-form
//! adapter `ΔW = s·B·diag(z_rank ⊙ Q(E))·A` whose rank and per-tensor bit-widths are learned by
//! hard-concrete gates under a BOP-aware prior (Bayesian Bits, van Baalen et al. 2020).
//!
//! # Brief overview
//! - [`config`]: [`BLoraConfig`] (LoRA's field names plus the gate switches) and
//!   [`Architecture::query_key_value`](crate::models::Architecture::query_key_value) (q, k, v);
//! - [`bank`]: every gate logit of a model in one var ([`GateBank`]), the prior over it;
//! - [`gates`]: hard-concrete sampling, P(z > 0), the deterministic test rule, nested rank gates;
//! - [`quantizer`]: the Bayesian Bits residual quantizer (2/4/8/16/32 bits) and its range;
//! - [`layer`]: [`BLoraLayer`], the [`crate::adapters::Adapter`], its prior and learned table;
//! - [`inject`]: [`attach_blora`] and [`AttachedBLora`];
//! - [`bops`]: BOPs of the learned layers against LoRA of the same initial rank ([`BopsReport`]).
//!
//! Training: loss = task + `mu` · [`AttachedBLora::regularizer`]; the weights
//! ([`AttachedBLora::named_weight_vars_with_prefix`]) go to IVON or AdamW, the gate logits
//! ([`AttachedBLora::named_gate_vars_with_prefix`]) to Adam at `gate_lr`. A forward with
//! `Ctx::train` samples gates and widens ranges; `Ctx::eval` uses deterministic gates.
//!
//! ```
//! use bayeslora::adapters::blora::{attach_blora, BLoraConfig};
//! use bayeslora::adapters::lora::TargetModules;
//! use bayeslora::adapters::{Ctx, HasLinears, Linear};
//! use candle_core::{DType, Device, Tensor};
//! struct One(Linear);
//! impl HasLinears for One {
//!     fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> { vec![("query".into(), &mut self.0)] }
//! }
//! let mut m = One(Linear::new(Tensor::zeros((4, 6), DType::F32, &Device::Cpu)?, None));
//! let cfg = BLoraConfig { r: 2, target_modules: Some(TargetModules::List(vec!["query".into()])), ..Default::default() };
//! let blora = attach_blora(&mut m, &cfg, 0, &Device::Cpu)?;
//! let y = m.0.forward(&Tensor::ones((3, 6), DType::F32, &Device::Cpu)?, &Ctx::train(1))?;
//! let prior = blora.regularizer()?.expect("gates are on");
//! let loss = (y.sum_all()? + (prior * cfg.mu)?)?;
//! assert_eq!(blora.learned()?[0].1.rank, 2);
//! # let _ = loss;
//! # Ok::<(), bayeslora::Error>(())
//! ```
pub mod bank;
pub mod bops;
pub mod config;
pub mod gates;
pub mod inject;
pub mod layer;
pub mod quantizer;

pub use bank::{GateBank, GateRef};
pub use bops::{bops_report, render_table, BopsReport, BopsRow, BopsTotals};
pub use config::{BLoraConfig, GateCost, InitE};
pub use inject::{attach_blora, AttachedBLora, GATE_BANK_NAME};
pub use layer::{BLoraLayer, EvalWeights, LearnedLayer};
pub use quantizer::{Range, Slot};
