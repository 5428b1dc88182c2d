//! Differentiable ops with backward passes that training can trust.
//!
//! candle-nn's fused `softmax_last_dim`, `rms_norm`, `layer_norm`, `rope` and `sdpa` have no
//! backward and stop gradients silently (`shared/reference/rust-stack.md` §1.1), and candle's
//! matmul backward computes and stores dW for a frozen weight. Every op here either composes
//! candle primitives that do have a backward, or is a [`candle_core::CustomOp1`] with a
//! hand-written `bwd`. Each is checked against f64 finite differences in the tests below.
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
mod checkpoint;
mod cpu_attention;
mod cpu_fused;
mod cross_entropy;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
mod dropout;
mod erf;
mod flash_attention;
mod fused;
mod gelu;
mod hard_concrete;
mod layer_norm;
mod linear;
mod norm;
pub(crate) mod quantize;

pub use attention::{attention, plain_attention, AttentionMask};
pub use checkpoint::{backward, checkpoint, Segment};
pub(crate) use cpu_attention::{applies as cpu_attention_applies, attention as cpu_attention, HeadLayout};
pub use cross_entropy::{fused_cross_entropy_rows, CrossEntropyGrad, FusedCrossEntropy};
pub use dropout::{dropout, hash_dropout, hash_uniform, HashDropout};
pub use flash_attention::{
    flash_attention, flash_supported, plain_attention_forced, FLASH_HEAD_DIMS, PLAIN_ATTENTION_ENV,
};
pub use hard_concrete::{hard_concrete, hard_concrete_at, rank_multiplier, rank_multiplier_at, HardConcrete};
pub use linear::frozen_linear;
pub use norm::{layer_norm, rms_norm};
pub use quantize::{gated_quantize, update_range, PARAMS as QUANTIZE_PARAMS};

use candle_core::{DType, Result, Tensor, D};

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

/// SwiGLU's gating, `silu(gate) · up` (same shape and dtype), differentiable in both.
///
/// For f32/bf16/f16 on CUDA one fused op per direction (`ops::fused`, f32 math, one rounding);
/// for f32/f64 on the CPU one multithreaded op per direction (`ops::cpu_fused`), bit for bit
/// `gate.silu()?.mul(up)` and its backward; elsewhere exactly that composition.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let same = up.dims() == gate.dims() && up.dtype() == gate.dtype() && up.device().same_device(gate.device());
    if fused::fused_applies(gate) && same {
        return fused::swiglu(gate, up);
    }
    if cpu_fused::applies(gate) && same {
        return cpu_fused::swiglu(gate, up);
    }
    gate.silu()?.mul(up)
}

/// `x` in `dtype`, differentiable (the gradient comes back in x's dtype). On CUDA, f32 ↔ bf16/f16
/// run through our vectorized kernel (candle's moves one element per thread); elsewhere
/// `to_dtype`.
pub fn cast(x: &Tensor, dtype: DType) -> Result<Tensor> {
    if x.dtype() == dtype {
        return Ok(x.clone());
    }
    if fused::fused_applies(x) && fused::cast_supported(x.dtype(), dtype) {
        return fused::cast(x, dtype);
    }
    x.to_dtype(dtype)
}

/// `[B, T, H·D]` → `[B, H, T, D]`, contiguous: a projection's output in the attention layout.
/// On CUDA one permutation kernel (candle's strided copy of a transpose is ~15× slower there).
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, c) = x.dims3()?;
    if heads == 0 || c % heads != 0 {
        candle_core::bail!("split_heads: {c} channels do not split into {heads} heads");
    }
    let d = c / heads;
    if fused::fused_applies(x) {
        return fused::permute_heads(x, b, t, heads, d, true);
    }
    x.reshape((b, t, heads, d))?.transpose(1, 2)?.contiguous()
}

/// `[B, H, T, D]` → `[B, T, H·D]`, the inverse of [`split_heads`].
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    if fused::fused_applies(x) {
        return fused::permute_heads(x, b, t, h, d, false);
    }
    x.transpose(1, 2)?.reshape((b, t, h * d))
}

/// Rotary position embedding in HF's rotate-half convention: `x·cos + rotate_half(x)·sin`.
/// `x: [B, H, T, D]`, `cos`/`sin`: `[T, D]` (already duplicated over the two halves).
///
/// For f32/bf16/f16 on CUDA with constant `[T, D]` tables of x's dtype one fused op per direction
/// (`ops::fused`, f32 math); elsewhere the composed ops.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if fused::fused_applies(x) && x.rank() >= 2 {
        let (t, d) = (x.dim(D::Minus2)?, x.dim(D::Minus1)?);
        let fits = |table: &Tensor| !table.track_op() && table.dtype() == x.dtype() && table.dims() == [t, d];
        if d % 2 == 0 && fits(cos) && fits(sin) {
            return fused::rope(x, cos, sin);
        }
    }
    rope_composed(x, cos, sin)
}

/// [`rope`] composed from candle primitives (the CPU path).
pub(crate) fn rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)?.add(&rotated.broadcast_mul(sin)?)
}

#[cfg(test)]
pub(crate) mod testing {
    //! Finite-difference gradient checks in f64.
    use candle_core::{Device, Result, Tensor, Var};

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
    fn rope_gradient() -> Result<()> {
        let cos = Tensor::randn(0f64, 1.0, (4, 6), &Device::Cpu)?;
        let sin = Tensor::randn(0f64, 1.0, (4, 6), &Device::Cpu)?;
        assert!(check_grad(&[2, 3, 4, 6], &|x| rope(x, &cos, &sin))? < TOL);
        Ok(())
    }

    #[test]
    fn activations_gradient() -> Result<()> {
        assert!(check_grad(&[4, 7], &gelu)? < TOL);
        assert!(check_grad(&[4, 7], &silu)? < TOL);
        Ok(())
    }

    #[test]
    fn swiglu_gradient_and_cpu_floats() -> Result<()> {
        let dev = Device::Cpu;
        let up = Tensor::randn(0f64, 1.0, (4, 7), &dev)?;
        assert!(check_grad(&[4, 7], &|gate| swiglu(gate, &up))? < TOL);
        let gate = Tensor::randn(0f64, 2.0, (4, 7), &dev)?;
        assert!(check_grad(&[4, 7], &|up| swiglu(&gate, up))? < TOL);
        // the CPU path is the composition, bit for bit
        let (gate, up) = (gate.to_dtype(DType::F32)?, up.to_dtype(DType::F32)?);
        let got = swiglu(&gate, &up)?.flatten_all()?.to_vec1::<f32>()?;
        let want = silu(&gate)?.mul(&up)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
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
