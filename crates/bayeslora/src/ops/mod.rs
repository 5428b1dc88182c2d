//! Differentiable ops with backward passes that training can trust.
//!
//! candle-nn's fused `softmax_last_dim`, `rms_norm`, `layer_norm`, `rope` and `sdpa` have no
//! backward and stop gradients silently (`shared/reference/rust-stack.md` §1.1), and candle's
//! matmul backward computes and stores dW for a frozen weight. Every op here either composes
//! candle primitives that do have a backward, or is a [`candle_core::CustomOp1`] with a
//! hand-written `bwd`. Each is checked against f64 finite differences in the tests below.
//!
//! One module per op, holding its dispatch, its CPU path, its CUDA path (the kernel file of the
//! same name in `kernels/`, e.g. `rms_norm.rs` ↔ `kernels/rms_norm.cu`) and its backward:
//! `rms_norm`, `layer_norm`, `rope`, `swiglu`, `layout` (split/merge heads), `cast`, `gelu`,
//! `dropout`, `cross_entropy`, `attention` (+ `flash_attention`, `cpu_attention`), `linear`,
//! `lora_linear` (a frozen linear and its LoRA path as one op that keeps only its inputs; on
//! CUDA in bf16/f16 its products go through `gemm`, cuBLAS's mixed-precision GEMMs),
//! `quantize`, `hard_concrete`, `gate_scale` and `gate_prior` (B-LoRA), `checkpoint`. Shared: `cuda.rs`
//! (kernel modules, dtype suffixes, launch configurations and launches), `cpu.rs` (the float
//! types and storage access of the multithreaded CPU ops), `erf.rs` and `exp.rs` (libm's `erff`
//! and glibc's `expf` over slices in SIMD lanes, bit for bit), `reference.rs` (the f64 CPU references
//! the CUDA kernels are tested against).
//!
//! Shape legend: B batch, T tokens, H heads, D head dim, C channels.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! let x = Tensor::new(&[[1f32, 2., 3.]], &Device::Cpu)?;
//! let p = bayeslora::ops::softmax_last_dim(&x)?;
//! let s: f32 = p.sum_all()?.to_scalar()?;
//! assert!((s - 1.0).abs() < 1e-6);
//! # Ok::<(), candle_core::Error>(())
//! ```

mod attention;
mod cast;
mod checkpoint;
mod cpu;
mod cpu_attention;
mod cross_entropy;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
mod dropout;
mod erf;
mod exp;
mod flash_attention;
mod gate_prior;
mod gate_scale;
mod gelu;
#[cfg(any(feature = "cuda", test))]
mod gemm;
mod hard_concrete;
mod layer_norm;
mod layout;
mod linear;
mod lora_linear;
pub(crate) mod quantize;
mod reference;
mod rms_norm;
mod rope;
mod swiglu;
mod through;

pub use attention::{attention, plain_attention, AttentionMask};
pub use cast::cast;
pub use checkpoint::{backward, checkpoint, Segment};
pub(crate) use cpu_attention::{applies as cpu_attention_applies, attention as cpu_attention, HeadLayout};
pub(crate) use cross_entropy::fused_applies as fused_cross_entropy_applies;
pub use cross_entropy::{fused_cross_entropy_rows, CrossEntropyGrad, FusedCrossEntropy};
pub use dropout::{dropout, hash_dropout, hash_uniform, HashDropout};
pub use flash_attention::{
    flash_attention, flash_supported, plain_attention_forced, FLASH_HEAD_DIMS, PLAIN_ATTENTION_ENV,
};
pub use gate_prior::{gate_prior, GatePlan, PriorConsts, PriorCost, PriorLayer, PRIOR_COLUMNS};
pub use gate_scale::scale_by_gates_at;
pub use hard_concrete::{
    hard_concrete, hard_concrete_at, hard_concrete_groups_at, layer_gates_at, rank_multiplier, rank_multiplier_at,
    GateGrads, HardConcrete, MAX_GATE_GRADS,
};
pub use layer_norm::layer_norm;
pub use layout::{merge_heads, projection_heads, split_heads};
pub use linear::{frozen_linear, residual_projection, ProjectionInput};
pub use lora_linear::{lora_linear, LoraPath, F32_LORA_ENV};
pub use quantize::{gated_quantize, gated_quantize_at, update_range, update_ranges, PARAMS as QUANTIZE_PARAMS};
pub use rms_norm::rms_norm;
pub use rope::rope;
pub use swiglu::swiglu;

use candle_core::{DType, Result, Tensor, D};

/// Whether `x` takes our CUDA kernels (`rms_norm`, `rope`, `swiglu`, `layout`, `cast`): a
/// non-empty f32/bf16/f16 tensor on CUDA.
pub(crate) fn cuda_applies(x: &Tensor) -> bool {
    x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16) && x.elem_count() > 0
}

/// The forward of an op whose output is recorded with `Tensor::recorded_as_op1/2/3`
/// (`lora_linear`, `residual_projection`, `through`): candle never calls it; an error if it did.
pub(crate) fn recorded_only<T>(op: &str) -> Result<T> {
    candle_core::bail!("{op}: recorded with its output, its forward never runs")
}

/// Whether `x` takes the multithreaded CPU ops (`rms_norm`, `swiglu`): a CPU f32/f64 tensor.
pub(crate) fn cpu_applies(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// The dtype for statistics and softmax: f32 for f32/bf16/f16 compute (bf16 sums lose too
/// much), f64 when the inputs are f64 (the finite-difference tests).
pub(crate) fn stats_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Softmax over the last dimension, `exp(x - max) / Σ exp(x - max)`. The max is detached: it is
/// a constant shift, so its gradient contribution is exactly zero.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Log-softmax over the last dimension, stable: `x - max - log Σ exp(x - max)`.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// Mean cross-entropy of `logits: [N, K]` against class indices `labels: [N]` (u32), computed
/// in f32 whatever the logits' dtype.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    if cross_entropy::fused_applies(logits) {
        return cross_entropy::fused_cross_entropy_rows(logits, labels)?.mean_all();
    }
    let logp = log_softmax_last_dim(&logits.to_dtype(DType::F32)?)?;
    let picked = logp.gather(&labels.unsqueeze(1)?, 1)?;
    picked.mean_all()?.neg()
}

/// Mean squared error between `pred: [N]` and `target: [N]` (regression heads, STS-B).
pub fn mse(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    pred.to_dtype(DType::F32)?.sub(&target.to_dtype(DType::F32)?)?.sqr()?.mean_all()
}

/// GELU with the exact erf form, as BERT's `hidden_act = "gelu"`. On the CPU (f32/f64) one
/// multithreaded op per direction with candle's floats (`ops::gelu`); elsewhere candle's
/// `gelu_erf`, which has a backward.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if gelu::fused_applies(x) {
        return gelu::gelu(x);
    }
    x.gelu_erf()
}

/// SiLU (swish), `x · σ(x)`, as Llama's MLP (candle's `silu` has a backward).
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

#[cfg(test)]
pub(crate) mod testing {
    //! Finite-difference gradient checks in f64, and comparisons of an op with its composed
    //! twin.
    use candle_core::{DType, Device, Result, Tensor, Var};

    /// The largest absolute difference between `a` and `b`, in f64.
    pub fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
        (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()
    }

    /// The bits of every element (as f64), for bit-for-bit comparisons.
    pub fn bits(t: &Tensor) -> Result<Vec<u64>> {
        let v = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        Ok(v.iter().map(|v| v.to_bits()).collect())
    }

    /// `lanes` over `xs` against `scalar` per element, bit for bit (a NaN matches a NaN); a
    /// failure names the function, the argument and both values.
    pub fn check_lanes(name: &str, xs: &[f32], lanes: fn(&mut [f32]), scalar: impl Fn(f32) -> f32) {
        let mut got = xs.to_vec();
        lanes(&mut got);
        for (&x, &g) in xs.iter().zip(&got) {
            let want = scalar(x);
            assert!(
                g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                "{name}({x:e}) = {g:e}, libm {want:e}"
            );
        }
    }

    /// The value of `f(xs)` and the gradients of `sum(f(xs))` in the inputs.
    pub fn value_and_grads(xs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Result<Tensor>) -> Result<(Tensor, Vec<Tensor>)> {
        let vars = xs.iter().map(Var::from_tensor).collect::<Result<Vec<_>>>()?;
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts)?;
        let grads = y.sum_all()?.backward()?;
        let g = ts.iter().map(|t| grads.get(t).expect("gradient reaches the input").clone()).collect();
        Ok((y, g))
    }

    /// An op's f64 CPU reference against the composed op, forward and backward, in f64 (one
    /// random `w` shared by both: the seed is not fixed, so draw it once); the worst difference.
    pub fn matches_composed(
        xs: &[Tensor],
        fused: &dyn Fn(&[Tensor]) -> Result<Tensor>,
        composed: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<f64> {
        let y = composed(xs)?;
        let w = Tensor::randn(0f64, 1.0, y.shape(), y.device())?;
        let run = |f: &dyn Fn(&[Tensor]) -> Result<Tensor>| -> Result<(Tensor, Vec<Tensor>)> {
            value_and_grads(xs, &|ts| f(ts)?.mul(&w))
        };
        let ((yf, gf), (yc, gc)) = (run(fused)?, run(composed)?);
        let mut worst = max_diff(&yf, &yc)?;
        for (a, b) in gf.iter().zip(&gc) {
            worst = worst.max(max_diff(a, b)?);
        }
        Ok(worst)
    }

    /// Checks d(sum(f(x) · w))/dx from backprop against central differences, for a fixed
    /// random projection `w` so every output element matters. Returns the worst relative error.
    pub fn check_grad(shape: &[usize], f: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<f64> {
        let dev = Device::Cpu;
        let x0 = Tensor::randn(0f64, 1.0, shape, &dev)?;
        let var = Var::from_tensor(&x0)?;
        let y = f(var.as_tensor())?;
        let w = Tensor::randn(0f64, 1.0, y.shape(), &dev)?;
        let loss = y.mul(&w)?.sum_all()?;
        let grads = loss.backward()?;
        let g = grads.get(var.as_tensor()).expect("gradient reaches the input").flatten_all()?.to_vec1::<f64>()?;
        let x = x0.flatten_all()?.to_vec1::<f64>()?;
        let eps = 1e-6;
        let mut worst: f64 = 0.0;
        for i in 0..x.len() {
            let eval = |delta: f64| -> Result<f64> {
                let mut xs = x.clone();
                xs[i] += delta;
                let t = Tensor::from_vec(xs, shape, &dev)?;
                f(&t)?.mul(&w)?.sum_all()?.to_scalar::<f64>()
            };
            let fd = (eval(eps)? - eval(-eps)?) / (2.0 * eps);
            let err = (fd - g[i]).abs() / (1.0 + fd.abs());
            worst = worst.max(err);
        }
        Ok(worst)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::check_grad;
    use super::*;
    use candle_core::Device;

    const TOL: f64 = 1e-6;

    #[test]
    fn softmax_matches_definition_and_has_gradient() -> Result<()> {
        let x = Tensor::new(&[[1f64, 2., 3.], [0., -1., 5.]], &Device::Cpu)?;
        let p = softmax_last_dim(&x)?.to_vec2::<f64>()?;
        let e: Vec<f64> = [1f64, 2., 3.].iter().map(|v| v.exp()).collect();
        let s: f64 = e.iter().sum();
        assert!((p[0][2] - e[2] / s).abs() < 1e-12);
        assert!(check_grad(&[3, 5], &softmax_last_dim)? < TOL);
        assert!(check_grad(&[3, 5], &log_softmax_last_dim)? < TOL);
        Ok(())
    }

    #[test]
    fn activations_gradient() -> Result<()> {
        assert!(check_grad(&[4, 7], &gelu)? < TOL);
        assert!(check_grad(&[4, 7], &silu)? < TOL);
        Ok(())
    }

    #[test]
    fn cross_entropy_matches_hand_value() -> Result<()> {
        let logits = Tensor::new(&[[2f32, 0.0], [0.0, 0.0]], &Device::Cpu)?;
        let labels = Tensor::new(&[0u32, 1], &Device::Cpu)?;
        let ce = cross_entropy(&logits, &labels)?.to_scalar::<f32>()?;
        let want = ((1.0 + (-2f32).exp()).ln() + 2f32.ln()) / 2.0;
        assert!((ce - want).abs() < 1e-6, "{ce} vs {want}");
        Ok(())
    }
}
