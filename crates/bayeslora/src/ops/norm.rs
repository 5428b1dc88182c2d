//! RMSNorm (Llama) and LayerNorm (BERT), composed from candle primitives that have a backward.
//! Statistics are computed in f32 (bf16 inputs are widened), as HF transformers does.
use candle_core::{Result, Tensor, D};

/// `x / sqrt(mean(x²) + eps) · weight` over the last dim; `x: [.., C]`, `weight: [C]`. The
/// normalised row is rounded to x's dtype before the weight, as HF's `LlamaRMSNorm`.
///
/// With a frozen weight of x's dtype this is one fused op per direction (the weight gets no
/// gradient): for f32/bf16/f16 on CUDA `ops::fused`; for f32/f64 on the CPU `ops::cpu_fused`
/// (multithreaded, the same forward floats). Elsewhere the composed ops below.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let frozen_weight_fits = || {
        !weight.track_op() && weight.dtype() == x.dtype() && x.rank() > 0 && weight.dims() == [x.dims()[x.rank() - 1]]
    };
    if super::fused::fused_applies(x) && frozen_weight_fits() {
        return super::fused::rms_norm(x, weight, eps);
    }
    if super::cpu_fused::applies(x) && frozen_weight_fits() && x.elem_count() > 0 {
        return super::cpu_fused::rms_norm(x, weight, eps);
    }
    rms_norm_composed(x, weight, eps)
}

/// [`rms_norm`] composed from candle primitives (the weight may be trained).
pub(crate) fn rms_norm_composed(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(super::stats_dtype(dtype))?;
    let rms = xf.sqr()?.mean_keepdim(D::Minus1)?.affine(1.0, eps)?.sqrt()?;
    xf.broadcast_div(&rms)?.to_dtype(dtype)?.broadcast_mul(weight)
}

/// `(x − mean) / sqrt(var + eps) · weight + bias` over the last dim (biased variance, as torch).
///
/// On the CPU (f32/f64) with a frozen weight and bias this is one multithreaded op per direction
/// (`ops::layer_norm`, the same forward floats); elsewhere the composed ops below.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if super::layer_norm::fused_applies(x, weight, bias) {
        return super::layer_norm::layer_norm(x, weight, bias, eps);
    }
    layer_norm_composed(x, weight, bias, eps)
}

/// [`layer_norm`] composed from candle primitives (weight and bias may be trained).
pub(crate) fn layer_norm_composed(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(super::stats_dtype(dtype))?;
    let centered = xf.broadcast_sub(&xf.mean_keepdim(D::Minus1)?)?;
    let std = centered.sqr()?.mean_keepdim(D::Minus1)?.affine(1.0, eps)?.sqrt()?;
    centered.broadcast_div(&std)?.to_dtype(dtype)?.broadcast_mul(weight)?.broadcast_add(bias)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::check_grad;
    use candle_core::{DType, Device};

    #[test]
    fn norms_have_correct_gradients() -> Result<()> {
        let w = Tensor::randn(0f64, 1.0, 6, &Device::Cpu)?;
        let b = Tensor::randn(0f64, 1.0, 6, &Device::Cpu)?;
        assert!(check_grad(&[2, 3, 6], &|x| rms_norm(x, &w, 1e-5))? < 1e-6);
        assert!(check_grad(&[2, 3, 6], &|x| layer_norm(x, &w, &b, 1e-5))? < 1e-6);
        Ok(())
    }

    #[test]
    fn layer_norm_normalizes() -> Result<()> {
        let x = Tensor::new(&[[1f64, 2., 3., 4.]], &Device::Cpu)?;
        let ones = Tensor::ones(4, DType::F64, &Device::Cpu)?;
        let zeros = Tensor::zeros(4, DType::F64, &Device::Cpu)?;
        let y = layer_norm(&x, &ones, &zeros, 0.0)?.to_vec2::<f64>()?;
        let want = -1.5 / 1.25f64.sqrt();
        assert!((y[0][0] - want).abs() < 1e-12);
        Ok(())
    }
}
