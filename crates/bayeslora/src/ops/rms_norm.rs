//! RMSNorm (Llama), `x / √(mean(x²) + eps) · weight` over the last dim, with a backward.
//!
//! Three paths, picked by [`rms_norm`]: with a frozen weight of x's dtype, for f32/bf16/f16 on
//! CUDA one kernel per direction (`kernels/rms_norm.cu`, f32 math, every element read and written
//! once; its f64 CPU reference is [`FusedRmsNorm`]'s `cpu_fwd`), and for f32/f64 on the CPU one
//! multithreaded op per direction ([`CpuRmsNorm`]); elsewhere (a trained weight) the composed
//! candle ops. Statistics are computed in f32 (bf16 inputs are widened), as HF transformers does,
//! and the normalised row is rounded to x's dtype before the weight, as HF's `LlamaRMSNorm`.
//!
//! [`CpuRmsNorm`] evaluates the composed path's expressions in its order, so its forward is bit
//! for bit the composed one (the tests check it): it sums a row as candle does
//! (`cpu::row_sum`), then `· (1/C)`, `+ eps`, `sqrt`, `x / rms · w`. Its backward is the
//! closed form `dx = (ĝ − x̂ · mean(ĝ x̂)) / rms` with `ĝ = dy · w`, `x̂ = x / rms`, equal to the
//! composed one up to rounding (the tests bound it). Composed, Llama's RMSNorm runs six serial ops
//! forward and about fifteen backward, each writing a `[B·T, C]` temporary (issue 21).
use super::cpu::{par_build, slice, tensor_vec, Float};
use super::reference::{cpu_f64, cpu_from_f64, held_f64, round_to};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

/// Rows per rayon task of the CPU op (C = 576 for SmolLM2: 36 KiB of f32 per task).
const ROWS: usize = 16;

/// `x / sqrt(mean(x²) + eps) · weight` over the last dim; `x: [.., C]`, `weight: [C]`. The
/// normalised row is rounded to x's dtype before the weight, as HF's `LlamaRMSNorm`.
///
/// With a frozen weight of x's dtype this is one fused op per direction (the weight gets no
/// gradient): for f32/bf16/f16 on CUDA our kernel; for f32/f64 on the CPU a multithreaded op
/// (the same forward floats as the composed path). Elsewhere the composed ops.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let frozen_weight_fits = || {
        !weight.track_op() && weight.dtype() == x.dtype() && x.rank() > 0 && weight.dims() == [x.dims()[x.rank() - 1]]
    };
    if super::cuda_applies(x) && frozen_weight_fits() {
        return fused(x, weight, eps);
    }
    if super::cpu_applies(x) && frozen_weight_fits() && x.elem_count() > 0 {
        return threaded(x, weight, eps);
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

/// Refuses a weight that is not `[C]` of x's dtype for `x: [.., C]` (C > 0): the fused ops
/// hold it as a constant of their own dtype.
fn check_weight(x: &Tensor, weight: &Tensor) -> Result<()> {
    let c = x.dim(D::Minus1)?;
    if c == 0 || weight.dims() != [c] || weight.dtype() != x.dtype() {
        candle_core::bail!(
            "rms_norm: weight must be [{c}] {:?}, got {:?} {:?}",
            x.dtype(),
            weight.dims(),
            weight.dtype()
        );
    }
    Ok(())
}

/// The CUDA op: RMSNorm of `x: [.., C]` with the frozen `weight: [C]` (same dtype), kept out of
/// the graph.
fn fused(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    check_weight(x, weight)?;
    x.contiguous()?.apply_op1(FusedRmsNorm { weight: weight.contiguous()?, eps })
}

/// The CPU op: RMSNorm of `x: [.., C]` with a frozen `weight: [C]` of x's dtype, kept out of
/// the graph.
fn threaded(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    check_weight(x, weight)?;
    x.contiguous()?.apply_op1(CpuRmsNorm { weight: weight.contiguous()?.detach(), eps })
}

/// `y = T(T(x · rstd) · w)`, `rstd = 1/√(mean(x²) + eps)` per row (T = x's dtype).
#[derive(Debug, Clone)]
struct FusedRmsNorm {
    /// `[C]`, contiguous, x's dtype.
    weight: Tensor,
    eps: f64,
}

/// `dx = rstd · (g·w − x̂ · mean(g·w·x̂))` from (x, g); no backward of its own.
#[derive(Debug, Clone)]
struct RmsNormGrad {
    weight: Tensor,
    eps: f64,
}

/// `1 / √(mean(x²) + eps)` of one row.
fn rstd(row: &[f64], eps: f64) -> f64 {
    1.0 / (row.iter().map(|v| v * v).sum::<f64>() / row.len() as f64 + eps).sqrt()
}

impl CustomOp1 for FusedRmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (cpu_f64(s, l, "rms_norm input")?, held_f64(&self.weight, "rms_norm weight")?);
        let dtype = s.dtype();
        let y = x
            .chunks(w.len())
            .flat_map(|row| {
                let r = rstd(row, self.eps);
                row.iter().zip(&w).map(move |(x, w)| round_to(dtype, x * r) * w)
            })
            .collect();
        Ok((cpu_from_f64(dtype, y)?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let (ws, wl) = self.weight.storage_and_layout();
        let candle_core::Storage::Cuda(w) = &*ws else {
            candle_core::bail!("rms_norm: weight and input are on different devices")
        };
        let out = cuda::rms_norm(&[(s, l, "rms_norm input"), (w, wl, "rms_norm weight")], self.eps, "rms_fwd")?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = RmsNormGrad { weight: self.weight.clone(), eps: self.eps };
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &op)?))
    }
}

impl CustomOp2 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "rms-norm-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (cpu_f64(s1, l1, "rms_norm input")?, cpu_f64(s2, l2, "rms_norm gradient")?);
        let w = held_f64(&self.weight, "rms_norm weight")?;
        let c = w.len();
        let mut dx = Vec::with_capacity(x.len());
        for (xr, gr) in x.chunks(c).zip(g.chunks(c)) {
            let r = rstd(xr, self.eps);
            let mean_gwx = xr.iter().zip(gr).zip(&w).map(|((x, g), w)| g * w * x * r).sum::<f64>() / c as f64;
            dx.extend(xr.iter().zip(gr).zip(&w).map(|((x, g), w)| r * (g * w - x * r * mean_gwx)));
        }
        Ok((cpu_from_f64(s1.dtype(), dx)?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (ws, wl) = self.weight.storage_and_layout();
        let candle_core::Storage::Cuda(w) = &*ws else {
            candle_core::bail!("rms_norm: weight and input are on different devices")
        };
        let inputs = [(s1, l1, "rms_norm input"), (s2, l2, "rms_norm gradient"), (w, wl, "rms_norm weight")];
        Ok((cuda::rms_norm(&inputs, self.eps, "rms_bwd")?, l1.shape().clone()))
    }
}

/// The multithreaded CPU forward (f32/f64), bit for bit the composed path.
#[derive(Debug, Clone)]
struct CpuRmsNorm {
    weight: Tensor,
    eps: f64,
}

/// `dx` from `(x, dy)`; holds the frozen weight (no backward of its own).
#[derive(Debug, Clone)]
struct CpuRmsNormGrad {
    weight: Tensor,
    eps: f64,
}

/// One row's rms, `sqrt(Σx² · (1/C) + eps)`, in the composed path's order; `sq` is scratch.
fn row_rms<T: Float>(x: &[T], sq: &mut [T], inv_c: T, eps: T) -> T {
    for (s, &v) in sq.iter_mut().zip(x) {
        *s = v.mul(v);
    }
    let mean = T::row_sum(sq).mul(inv_c) + T::default();
    (mean.mul(T::from_f64(1.0)) + eps).sqrt()
}

impl CpuRmsNorm {
    fn fwd<T: Float>(&self, s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
        let x = slice::<T>(s, l, "rms_norm input")?;
        let w = tensor_vec::<T>(&self.weight, "rms_norm weight")?;
        let c = w.len();
        let (inv_c, eps) = (T::from_f64(1.0 / c as f64), T::from_f64(self.eps));
        let y = par_build(x.len(), c * ROWS, |at, y| {
            let x = &x[at..][..y.len()];
            for (y, x) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
                // y is the scratch for the squares until it holds the output.
                let rms = row_rms(x, y, inv_c, eps);
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(&w) {
                    *y = x.div(rms).mul(w);
                }
            }
        });
        Ok(T::storage(y))
    }
}

impl CustomOp1 for CpuRmsNorm {
    fn name(&self) -> &'static str {
        "cpu-rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let c = self.weight.elem_count();
        if l.shape().dims().last() != Some(&c) {
            candle_core::bail!("rms_norm: input {:?} does not end in {c}", l.shape());
        }
        let out = match s.dtype() {
            DType::F32 => self.fwd::<f32>(s, l)?,
            DType::F64 => self.fwd::<f64>(s, l)?,
            other => candle_core::bail!("rms_norm: unsupported dtype {other:?}"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = CpuRmsNormGrad { weight: self.weight.clone(), eps: self.eps };
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &op)?))
    }
}

impl CpuRmsNormGrad {
    fn bwd<T: Float>(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<CpuStorage> {
        let (x, g) = (slice::<T>(xs, xl, "rms_norm input")?, slice::<T>(gs, gl, "rms_norm gradient")?);
        let w = tensor_vec::<T>(&self.weight, "rms_norm weight")?;
        let c = w.len();
        let (inv_c, eps) = (T::from_f64(1.0 / c as f64), T::from_f64(self.eps));
        let dx = par_build(x.len(), c * ROWS, |at, dx| {
            let (x, g) = (&x[at..][..dx.len()], &g[at..][..dx.len()]);
            let mut gw = vec![T::default(); c];
            for ((dx, x), g) in dx.chunks_exact_mut(c).zip(x.chunks_exact(c)).zip(g.chunks_exact(c)) {
                let rms = row_rms(x, &mut gw, inv_c, eps);
                if !rms.is_finite() {
                    // An overflowed mean square: the composed backward gives NaN here, and the
                    // training loop's non-finite check depends on seeing it, not 0.
                    dx.fill(T::from_f64(f64::NAN));
                    continue;
                }
                // dx holds x̂ = x / rms, gw holds dy · w.
                let mut sum_gx = T::default();
                for (((gw, xh), (&x, &g)), &w) in gw.iter_mut().zip(dx.iter_mut()).zip(x.iter().zip(g)).zip(&w) {
                    *xh = x.div(rms);
                    *gw = g.mul(w);
                    sum_gx = sum_gx + gw.mul(*xh);
                }
                let mean_gx = sum_gx.mul(inv_c);
                for (dx, &gw) in dx.iter_mut().zip(&gw) {
                    *dx = (gw - dx.mul(mean_gx)).div(rms);
                }
            }
        });
        Ok(T::storage(dx))
    }
}

impl CustomOp2 for CpuRmsNormGrad {
    fn name(&self) -> &'static str {
        "cpu-rms-norm-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("rms_norm backward: input {:?} and gradient {:?} differ", l1.shape(), l2.shape());
        }
        let out = match s1.dtype() {
            DType::F32 => self.bwd::<f32>(s1, l1, s2, l2)?,
            DType::F64 => self.bwd::<f64>(s1, l1, s2, l2)?,
            other => candle_core::bail!("rms_norm backward: unsupported dtype {other:?}"),
        };
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::super::cuda::{launch, pack, Input, Kernel};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig};
    use candle_core::{CudaStorage, Result};

    /// `NormParams` in `kernels/rms_norm.cu`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    struct NormParams {
        rows: u32,
        cols: u32,
        eps: f32,
        vec: u32,
    }
    // SAFETY: plain-old-data with the kernel's C layout.
    unsafe impl DeviceRepr for NormParams {}

    /// `rms_fwd` (x, w) or `rms_bwd` (x, g, w): one block per row of the first input.
    pub(super) fn rms_norm(inputs: &[Input<'_>], eps: f64, entry: &str) -> Result<CudaStorage> {
        let l = inputs[0].1;
        let cols = l.dims().last().copied().unwrap_or(1);
        let n = l.shape().elem_count();
        let (rows, dtype) = (n / cols, inputs[0].0.dtype());
        if rows > u32::MAX as usize || cols > u32::MAX as usize {
            candle_core::bail!("rms_norm: {rows} rows of {cols} are too many for the kernel");
        }
        let vec = cols.is_multiple_of(pack(dtype));
        // One pack (or element) per thread where the row allows, between one warp and 512 threads.
        let per_thread = if vec { pack(dtype) } else { 1 };
        let threads = cols.div_ceil(per_thread).next_multiple_of(32).clamp(32, 512) as u32;
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        let params = NormParams { rows: rows as u32, cols: cols as u32, eps: eps as f32, vec: vec as u32 };
        launch(Kernel::RmsNorm, entry, cfg, params, inputs, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{bits, check_grad, matches_composed, max_diff};
    use candle_core::{Device, Var};

    #[test]
    fn rms_norm_gradient() -> Result<()> {
        let w = Tensor::randn(0f64, 1.0, 6, &Device::Cpu)?;
        assert!(check_grad(&[2, 3, 6], &|x| rms_norm(x, &w, 1e-5))? < 1e-6);
        Ok(())
    }

    /// The CUDA op's f64 CPU reference against the composed op and finite differences.
    #[test]
    fn reference_matches_the_composed_op_and_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f64, 1.0, (2, 3, 10), &dev)?;
        let w = Tensor::randn(0f64, 1.0, 10, &dev)?;
        let err = matches_composed(&[x], &|t| fused(&t[0], &w, 1e-5), &|t| rms_norm_composed(&t[0], &w, 1e-5))?;
        assert!(err < 1e-12, "rms_norm {err}");
        let w = Tensor::randn(0f64, 1.0, 6, &dev)?;
        assert!(check_grad(&[2, 3, 6], &|x| fused(x, &w, 1e-5))? < 1e-6);
        Ok(())
    }

    #[test]
    fn cpu_forward_is_the_composed_path_bit_for_bit_and_gradients_agree() -> Result<()> {
        let dev = Device::Cpu;
        // C = 576 (SmolLM2: whole blocks of 32) and 45 (a tail); 37 rows (a partial task).
        for c in [576, 45] {
            for dtype in [DType::F32, DType::F64] {
                let x0 = Tensor::randn(0.3f64, 2.0, (37, c), &dev)?.to_dtype(dtype)?;
                let w = Tensor::randn(1f64, 0.2, c, &dev)?.to_dtype(dtype)?;
                let dy = Tensor::randn(0f64, 1.0, (37, c), &dev)?.to_dtype(dtype)?;
                let x = Var::from_tensor(&x0)?;
                let fused = threaded(x.as_tensor(), &w, 1e-5)?;
                let composed = rms_norm_composed(x.as_tensor(), &w, 1e-5)?;
                assert!(bits(&fused)? == bits(&composed)?, "c {c} {dtype:?} forward");
                let gf = fused.mul(&dy)?.sum_all()?.backward()?;
                let gc = composed.mul(&dy)?.sum_all()?.backward()?;
                let (gf, gc) = (gf.get(x.as_tensor()).expect("grad"), gc.get(x.as_tensor()).expect("grad"));
                let diff = max_diff(gf, gc)?;
                let tol = if dtype == DType::F32 { 2e-5 } else { 1e-12 };
                assert!(diff < tol, "c {c} {dtype:?} backward differs by {diff}");
            }
        }
        let w = Tensor::randn(0f64, 1.0, 6, &dev)?;
        assert!(check_grad(&[2, 3, 6], &|x| threaded(x, &w, 1e-5))? < 1e-6);
        Ok(())
    }

    #[test]
    fn a_non_finite_row_gives_nan_gradients_not_zeros() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::new(&[[f32::MAX, 1.0], [1.0, 2.0]], &dev)?)?;
        let w = Tensor::ones(2, DType::F32, &dev)?;
        let g = threaded(x.as_tensor(), &w, 1e-5)?.sum_all()?.backward()?;
        let dx = g.get(x.as_tensor()).expect("grad").to_vec2::<f32>()?;
        assert!(dx[0].iter().all(|v| v.is_nan()), "{dx:?}");
        assert!(dx[1].iter().all(|v| v.is_finite()), "{dx:?}");
        Ok(())
    }
}
