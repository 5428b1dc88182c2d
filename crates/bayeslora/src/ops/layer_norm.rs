//! LayerNorm (BERT), `(x − mean) / √(var + eps) · weight + bias`, with a backward; with a frozen
//! affine on the CPU (f32/f64) one op per direction ([`FusedLayerNorm`]), elsewhere the composed
//! candle ops ([`layer_norm`] picks).
//!
//! The composed path runs nine serial candle ops forward (two means,
//! broadcast sub/div/mul/add, `sqr`, `sqrt`, `affine`) and about twenty backward, each writing a
//! `[B·T, C]` temporary, and keeps several of them alive for the backward. [`FusedLayerNorm`]
//! keeps only its input: the backward recomputes each row's mean and σ (two passes over C).
//!
//! The forward evaluates the composed path's f32 expressions in its order — candle sums a
//! contiguous row with four 8-lane accumulators when AVX2 is present ([`row_sum`] mirrors
//! `cpu::avx::vec_sum`), then `sum · (1/C)`, `var + eps`, `sqrt`, `(x − μ) / σ · w + b` — so its
//! values are bit for bit those of the composed path. The backward is the closed form
//! `dx = (ĝ − mean ĝ − x̂ · mean(ĝ x̂)) / σ` with `ĝ = dy · w`, equal to the composed backward up
//! to rounding (the tests bound it).
use super::cpu::{par_build, slice, tensor_vec, Float};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

/// Rows per rayon task (C = 384 for MiniLM: 24 KiB of f32 per task).
const ROWS: usize = 16;

/// `(x − mean) / sqrt(var + eps) · weight + bias` over the last dim (biased variance, as torch).
///
/// On the CPU (f32/f64) with a frozen weight and bias this is one multithreaded op per direction
/// (the same forward floats as the composed path); elsewhere the composed ops.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if threaded_applies(x, weight, bias) {
        return threaded(x, weight, bias, eps);
    }
    layer_norm_composed(x, weight, bias, eps)
}

/// [`layer_norm`] composed from candle primitives (weight and bias may be trained). Statistics
/// in f32 (bf16 inputs are widened), as HF transformers does.
pub(crate) fn layer_norm_composed(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(super::stats_dtype(dtype))?;
    let centered = xf.broadcast_sub(&xf.mean_keepdim(D::Minus1)?)?;
    let std = centered.sqr()?.mean_keepdim(D::Minus1)?.affine(1.0, eps)?.sqrt()?;
    centered.broadcast_div(&std)?.to_dtype(dtype)?.broadcast_mul(weight)?.broadcast_add(bias)
}

/// Whether [`layer_norm`] takes the CPU op: CPU f32/f64, frozen `[C]` weight and bias of x's
/// dtype.
fn threaded_applies(x: &Tensor, weight: &Tensor, bias: &Tensor) -> bool {
    let frozen_fits =
        |t: &Tensor| !t.track_op() && t.dtype() == x.dtype() && x.rank() > 0 && t.dims() == [x.dims()[x.rank() - 1]];
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && frozen_fits(weight) && frozen_fits(bias)
}

/// `(x − mean) / sqrt(var + eps) · weight + bias` over the last dim of a CPU f32/f64 `x`.
fn threaded(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let c = x.dim(D::Minus1)?;
    if c == 0 {
        candle_core::bail!("layer_norm: empty last dimension");
    }
    let op = FusedLayerNorm { weight: weight.contiguous()?.detach(), bias: bias.contiguous()?.detach(), eps };
    x.contiguous()?.apply_op1(op)
}

#[derive(Debug, Clone)]
struct FusedLayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

/// `dx` from `(x, dy)`; holds the frozen weight (no backward of its own).
#[derive(Debug, Clone)]
struct FusedLayerNormGrad {
    weight: Tensor,
    eps: f64,
}

/// One row's `(μ, σ)` exactly as the composed path computes them; `centered` receives `x − μ`.
/// `sq` is scratch of the row's length.
fn row_stats<T: Float>(x: &[T], centered: &mut [T], sq: &mut [T], inv_c: T, eps: T) -> (T, T) {
    let mean = T::row_sum(x).mul(inv_c) + T::default();
    for (c, &v) in centered.iter_mut().zip(x) {
        *c = v - mean;
    }
    // Σ (x − μ)² summed from the squares, as `sqr` then `mean_keepdim`.
    for (s, &c) in sq.iter_mut().zip(centered.iter()) {
        *s = c.mul(c);
    }
    let var = T::row_sum(sq).mul(inv_c) + T::default();
    (mean, (var.mul(T::from_f64(1.0)) + eps).sqrt())
}

impl FusedLayerNorm {
    fn fwd<T: Float>(&self, s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
        let x = slice::<T>(s, l, "layer_norm input")?;
        let (w, b) =
            (tensor_vec::<T>(&self.weight, "layer_norm weight")?, tensor_vec::<T>(&self.bias, "layer_norm bias")?);
        let c = w.len();
        let (inv_c, eps) = (T::from_f64(1.0 / c as f64), T::from_f64(self.eps));
        let y = par_build(x.len(), c * ROWS, |at, y| {
            let x = &x[at..][..y.len()];
            let mut sq = vec![T::default(); c];
            for (y, x) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
                let (_, std) = row_stats(x, y, &mut sq, inv_c, eps);
                for ((y, &w), &b) in y.iter_mut().zip(&w).zip(&b) {
                    *y = y.div(std).mul(w) + b;
                }
            }
        });
        Ok(T::storage(y))
    }
}

impl CustomOp1 for FusedLayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let c = self.weight.elem_count();
        if l.shape().dims().last() != Some(&c) {
            candle_core::bail!("layer_norm: input {:?} does not end in {c}", l.shape());
        }
        let out = match s.dtype() {
            DType::F32 => self.fwd::<f32>(s, l)?,
            DType::F64 => self.fwd::<f64>(s, l)?,
            other => candle_core::bail!("layer_norm: unsupported dtype {other:?}"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = FusedLayerNormGrad { weight: self.weight.clone(), eps: self.eps };
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &op)?))
    }
}

impl FusedLayerNormGrad {
    fn bwd<T: Float>(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<CpuStorage> {
        let (x, g) = (slice::<T>(xs, xl, "layer_norm input")?, slice::<T>(gs, gl, "layer_norm gradient")?);
        let w = tensor_vec::<T>(&self.weight, "layer_norm weight")?;
        let c = w.len();
        let (inv_c, eps) = (T::from_f64(1.0 / c as f64), T::from_f64(self.eps));
        let dx = par_build(x.len(), c * ROWS, |at, dx| {
            let (x, g) = (&x[at..][..dx.len()], &g[at..][..dx.len()]);
            let mut gw = vec![T::default(); c];
            for ((dx, x), g) in dx.chunks_exact_mut(c).zip(x.chunks_exact(c)).zip(g.chunks_exact(c)) {
                // dx holds x − μ, then x̂ = (x − μ) / σ; gw is scratch until it holds dy · w.
                let (_, std) = row_stats(x, dx, &mut gw, inv_c, eps);
                if !std.is_finite() {
                    // An overflowed variance: the composed backward gives NaN here (∞/∞), and
                    // the training loop's non-finite check depends on seeing it, not 0.
                    dx.fill(T::from_f64(f64::NAN));
                    continue;
                }
                let (mut sum_g, mut sum_gx) = (T::default(), T::default());
                for (((gw, xh), &g), &w) in gw.iter_mut().zip(dx.iter_mut()).zip(g).zip(&w) {
                    *xh = xh.div(std);
                    *gw = g.mul(w);
                    sum_g = sum_g + *gw;
                    sum_gx = sum_gx + gw.mul(*xh);
                }
                let (mean_g, mean_gx) = (sum_g.mul(inv_c), sum_gx.mul(inv_c));
                for (dx, &gw) in dx.iter_mut().zip(&gw) {
                    *dx = (gw - mean_g - dx.mul(mean_gx)).div(std);
                }
            }
        });
        Ok(T::storage(dx))
    }
}

impl CustomOp2 for FusedLayerNormGrad {
    fn name(&self) -> &'static str {
        "fused-layer-norm-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("layer_norm backward: input {:?} and gradient {:?} differ", l1.shape(), l2.shape());
        }
        let out = match s1.dtype() {
            DType::F32 => self.bwd::<f32>(s1, l1, s2, l2)?,
            DType::F64 => self.bwd::<f64>(s1, l1, s2, l2)?,
            other => candle_core::bail!("layer_norm backward: unsupported dtype {other:?}"),
        };
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::check_grad;
    use candle_core::{Device, Var};

    #[test]
    fn forward_is_the_composed_path_bit_for_bit_and_gradients_agree() -> Result<()> {
        let dev = Device::Cpu;
        // C = 384 (MiniLM: whole blocks of 32) and 45 (a tail); 37 rows (a partial task).
        for c in [384, 45] {
            for dtype in [DType::F32, DType::F64] {
                let x0 = Tensor::randn(0.3f64, 2.0, (37, c), &dev)?.to_dtype(dtype)?;
                let w = Tensor::randn(1f64, 0.2, c, &dev)?.to_dtype(dtype)?;
                let b = Tensor::randn(0f64, 0.2, c, &dev)?.to_dtype(dtype)?;
                let dy = Tensor::randn(0f64, 1.0, (37, c), &dev)?.to_dtype(dtype)?;
                let x = Var::from_tensor(&x0)?;
                let fused = threaded(x.as_tensor(), &w, &b, 1e-12)?;
                let composed = layer_norm_composed(x.as_tensor(), &w, &b, 1e-12)?;
                let f = fused.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                let e = composed.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                assert!(f.iter().zip(&e).all(|(a, b)| a.to_bits() == b.to_bits()), "c {c} {dtype:?} forward");
                let gf = fused.mul(&dy)?.sum_all()?.backward()?;
                let gc = composed.mul(&dy)?.sum_all()?.backward()?;
                let (gf, gc) = (gf.get(x.as_tensor()).expect("grad"), gc.get(x.as_tensor()).expect("grad"));
                let diff = (gf - gc)?.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                let tol = if dtype == DType::F32 { 2e-5 } else { 1e-12 };
                assert!(diff < tol, "c {c} {dtype:?} backward differs by {diff}");
            }
        }
        Ok(())
    }

    #[test]
    fn finite_differences() -> Result<()> {
        let w = Tensor::randn(0f64, 1.0, 6, &Device::Cpu)?;
        let b = Tensor::randn(0f64, 1.0, 6, &Device::Cpu)?;
        assert!(check_grad(&[2, 3, 6], &|x| threaded(x, &w, &b, 1e-5))? < 1e-6);
        assert!(check_grad(&[2, 3, 6], &|x| layer_norm(x, &w, &b, 1e-5))? < 1e-6);
        assert!(check_grad(&[2, 3, 6], &|x| layer_norm_composed(x, &w, &b, 1e-5))? < 1e-6);
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
