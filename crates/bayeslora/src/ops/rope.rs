//! Rotary position embedding in HF's rotate-half convention, `x·cos + rotate_half(x)·sin`, with
//! a backward.
//!
//! For f32/bf16/f16 on CUDA with constant tables, one kernel per direction (`kernels/rope.cu`,
//! f32 math; its f64 CPU reference is [`FusedRope`]'s `cpu_fwd`): the backward is the adjoint
//! rotation, itself differentiable. For f32/f64 on the CPU one multithreaded op per direction
//! ([`CpuRope`]), bit for bit the composed candle ops and candle's backward of them (composed,
//! the rotation's `cat` and its backward's copies and accumulations ran on the calling thread
//! alone: issue 21). Elsewhere the composed candle ops.
use super::cpu::{par_build, slice, tensor_vec, Float};
use super::reference::{cpu_f64, cpu_from_f64, held_f64};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};

/// Rotary position embedding in HF's rotate-half convention: `x·cos + rotate_half(x)·sin`.
/// `x: [B, H, T, D]`, `cos`/`sin`: `[T, D]` (already duplicated over the two halves).
///
/// For f32/bf16/f16 on CUDA with constant `[T, D]` tables of x's dtype one fused op per direction
/// (f32 math); for f32/f64 on the CPU one multithreaded op per direction, bit for bit the
/// composition; elsewhere the composed ops.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if x.rank() >= 2 && tables_fit(x, cos, sin)? {
        if super::cuda_applies(x) {
            return fused(x, cos, sin);
        }
        if super::cpu_applies(x) {
            let op = CpuRope { cos: cos.contiguous()?, sin: sin.contiguous()?, transpose: false };
            return x.contiguous()?.apply_op1(op);
        }
    }
    rope_composed(x, cos, sin)
}

/// Whether `cos`/`sin` are constant `[T, D]` tables of `x`'s dtype for `x: [.., T, D]`, D even:
/// what the fused ops take.
fn tables_fit(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<bool> {
    let (t, d) = (x.dim(D::Minus2)?, x.dim(D::Minus1)?);
    let fits = |table: &Tensor| !table.track_op() && table.dtype() == x.dtype() && table.dims() == [t, d];
    Ok(d % 2 == 0 && fits(cos) && fits(sin))
}

/// The adjoint rotation (the backward of [`rope`] for a gradient `g: [.., T, D]`): the fused
/// kernel's transpose on CUDA; the CPU op's (f32/f64), bit for bit what candle's autograd of the
/// composition gives; elsewhere that autograd (the rotation is linear, so its backward at any
/// point is the adjoint), the floats the plain graph's backward computes.
pub(crate) fn rope_adjoint(g: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let g = g.detach();
    if g.rank() >= 2 && tables_fit(&g, cos, sin)? {
        if super::cuda_applies(&g) {
            let adjoint = FusedRope { cos: cos.contiguous()?, sin: sin.contiguous()?, transpose: true };
            return g.contiguous()?.apply_op1_no_bwd(&adjoint);
        }
        if super::cpu_applies(&g) {
            let adjoint = CpuRope { cos: cos.contiguous()?, sin: sin.contiguous()?, transpose: true };
            return g.contiguous()?.apply_op1_no_bwd(&adjoint);
        }
    }
    let at = candle_core::Var::zeros(g.shape(), g.dtype(), g.device())?;
    let grads = rope_composed(at.as_tensor(), cos, sin)?.mul(&g)?.sum_all()?.backward()?;
    grads.get(at.as_tensor()).cloned().ok_or_else(|| candle_core::Error::Msg("rope: no adjoint".into()))
}

/// [`rope`] composed from candle primitives (the CPU path).
pub(crate) fn rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)?.add(&rotated.broadcast_mul(sin)?)
}

/// The fused op: rotary embedding of `x: [.., T, D]` with constant `cos`/`sin: [T, D]` (x's dtype).
fn fused(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (t, d) = (x.dim(D::Minus2)?, x.dim(D::Minus1)?);
    for (name, table) in [("cos", cos), ("sin", sin)] {
        if table.dims() != [t, d] || table.dtype() != x.dtype() {
            candle_core::bail!(
                "rope: {name} must be [{t}, {d}] {:?}, got {:?} {:?}",
                x.dtype(),
                table.dims(),
                table.dtype()
            );
        }
    }
    if d % 2 != 0 {
        candle_core::bail!("rope: head dim {d} must be even");
    }
    x.contiguous()?.apply_op1(FusedRope { cos: cos.contiguous()?, sin: sin.contiguous()?, transpose: false })
}

/// `y1 = x1·c1 − x2·s1, y2 = x2·c2 + x1·s2` over the halves of the last dim; with `transpose`
/// its adjoint `y1 = x1·c1 + x2·s2, y2 = x2·c2 − x1·s1` (the backward, itself differentiable).
#[derive(Debug, Clone)]
struct FusedRope {
    cos: Tensor,
    sin: Tensor,
    transpose: bool,
}

impl CustomOp1 for FusedRope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f64(s, l, "rope input")?;
        let (cos, sin) = (held_f64(&self.cos, "rope cos")?, held_f64(&self.sin, "rope sin")?);
        let (t, d) = self.cos.dims2()?;
        let h = d / 2;
        let mut y = vec![0f64; x.len()];
        for (row, (xr, yr)) in x.chunks(d).zip(y.chunks_mut(d)).enumerate() {
            let (c, s) = (&cos[(row % t) * d..][..d], &sin[(row % t) * d..][..d]);
            for j in 0..h {
                let (x1, x2) = (xr[j], xr[h + j]);
                if self.transpose {
                    yr[j] = x1 * c[j] + x2 * s[h + j];
                    yr[h + j] = x2 * c[h + j] - x1 * s[j];
                } else {
                    yr[j] = x1 * c[j] - x2 * s[j];
                    yr[h + j] = x2 * c[h + j] + x1 * s[h + j];
                }
            }
        }
        Ok((cpu_from_f64(s.dtype(), y)?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let (cs, cl) = self.cos.storage_and_layout();
        let (ss, sl) = self.sin.storage_and_layout();
        let (candle_core::Storage::Cuda(c), candle_core::Storage::Cuda(sn)) = (&*cs, &*ss) else {
            candle_core::bail!("rope: cos/sin and input are on different devices")
        };
        let (t, d) = self.cos.dims2()?;
        let inputs = [(s, l, "rope input"), (c, cl, "rope cos"), (sn, sl, "rope sin")];
        Ok((cuda::rope(&inputs, t, d, self.transpose)?, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let adjoint = FusedRope { transpose: !self.transpose, ..self.clone() };
        Ok(Some(grad.contiguous()?.apply_op1(adjoint)?))
    }
}

/// The multithreaded CPU op (f32/f64): the rotation of a contiguous `x: [.., T, D]` by constant
/// `[T, D]` tables, or with `transpose` its adjoint (the backward), each element as the composed
/// graph computes it: forward `x1·c1 + (−x2)·s1`, `x2·c2 + x1·s2` (two products, one sum);
/// adjoint `g1·c1 + g2·s2`, `g2·c2 + (−(g1·s1))`, to which candle's backward adds the zero
/// padding of `narrow` (`+ 0`, which only turns a −0 sum into +0).
#[derive(Debug, Clone)]
struct CpuRope {
    cos: Tensor,
    sin: Tensor,
    transpose: bool,
}

fn rotate<T: Float>(x: &[T], cos: &[T], sin: &[T], d: usize, transpose: bool) -> Vec<T> {
    let (h, t) = (d / 2, cos.len() / d);
    // Whole rows per task (~64 KiB of f32).
    let rows = ((1 << 14) / d).max(1);
    par_build(x.len(), rows * d, |at, y| {
        for (i, yr) in y.chunks_mut(d).enumerate() {
            let row = at / d + i;
            let xr = &x[row * d..][..d];
            let (c, s) = (&cos[(row % t) * d..][..d], &sin[(row % t) * d..][..d]);
            let zero = T::from_f64(0.0);
            for j in 0..h {
                let (x1, x2) = (xr[j], xr[h + j]);
                if transpose {
                    yr[j] = (x1.mul(c[j]) + x2.mul(s[h + j])) + zero;
                    yr[h + j] = (x2.mul(c[h + j]) + x1.mul(s[j]).neg()) + zero;
                } else {
                    yr[j] = x1.mul(c[j]) + x2.neg().mul(s[j]);
                    yr[h + j] = x2.mul(c[h + j]) + x1.mul(s[h + j]);
                }
            }
        }
    })
}

impl CpuRope {
    fn run<T: Float>(&self, s: &CpuStorage, l: &Layout) -> Result<Vec<T>> {
        let (_, d) = self.cos.dims2()?;
        let (cos, sin) = (tensor_vec::<T>(&self.cos, "rope cos")?, tensor_vec::<T>(&self.sin, "rope sin")?);
        Ok(rotate(slice::<T>(s, l, "rope input")?, &cos, &sin, d, self.transpose))
    }
}

impl CustomOp1 for CpuRope {
    fn name(&self) -> &'static str {
        "cpu-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s.dtype() {
            DType::F32 => CpuStorage::F32(self.run::<f32>(s, l)?),
            DType::F64 => CpuStorage::F64(self.run::<f64>(s, l)?),
            other => candle_core::bail!("rope: unsupported dtype {other:?} for the CPU op"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let adjoint = CpuRope { transpose: !self.transpose, ..self.clone() };
        Ok(Some(grad.contiguous()?.apply_op1(adjoint)?))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::super::cuda::{grid, launch, pack, Input, Kernel};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
    use candle_core::{CudaStorage, Result};

    /// `RopeParams` in `kernels/rope.cu`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    struct RopeParams {
        rows: u64,
        t: u32,
        d: u32,
        vec: u32,
        transpose: u32,
    }
    // SAFETY: plain-old-data with the kernel's C layout.
    unsafe impl DeviceRepr for RopeParams {}

    /// `rope` on (x, cos, sin), cos/sin `[t, d]`.
    pub(super) fn rope(inputs: &[Input<'_>], t: usize, d: usize, transpose: bool) -> Result<CudaStorage> {
        let n = inputs[0].1.shape().elem_count();
        let dtype = inputs[0].0.dtype();
        let vec = (d / 2).is_multiple_of(pack(dtype));
        let items = n / 2 / if vec { pack(dtype) } else { 1 };
        let params =
            RopeParams { rows: (n / d) as u64, t: t as u32, d: d as u32, vec: vec as u32, transpose: transpose as u32 };
        launch(Kernel::Rope, "rope", grid(items), params, inputs, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{check_grad, matches_composed};
    use candle_core::Device;

    #[test]
    fn rope_gradient() -> Result<()> {
        let cos = Tensor::randn(0f64, 1.0, (4, 6), &Device::Cpu)?;
        let sin = Tensor::randn(0f64, 1.0, (4, 6), &Device::Cpu)?;
        assert!(check_grad(&[2, 3, 4, 6], &|x| rope(x, &cos, &sin))? < 1e-6);
        Ok(())
    }

    /// The CUDA op's f64 CPU reference against the composed op and finite differences.
    #[test]
    fn reference_matches_the_composed_op_and_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f64, 1.0, (2, 3, 4, 6), &dev)?;
        // random (not half-duplicated) tables, so both halves' indices are exercised
        let cos = Tensor::randn(0f64, 1.0, (4, 6), &dev)?;
        let sin = Tensor::randn(0f64, 1.0, (4, 6), &dev)?;
        let err = matches_composed(&[x], &|t| fused(&t[0], &cos, &sin), &|t| rope_composed(&t[0], &cos, &sin))?;
        assert!(err < 1e-12, "rope {err}");
        assert!(check_grad(&[2, 3, 4, 6], &|x| fused(x, &cos, &sin))? < 1e-6);
        Ok(())
    }

    #[test]
    fn rope_backward_is_itself_differentiable() -> Result<()> {
        // the adjoint's adjoint is the forward: second-order gradients go through
        let cos = Tensor::randn(0f64, 1.0, (3, 4), &Device::Cpu)?;
        let sin = Tensor::randn(0f64, 1.0, (3, 4), &Device::Cpu)?;
        let adjoint =
            |x: &Tensor| x.contiguous()?.apply_op1(FusedRope { cos: cos.clone(), sin: sin.clone(), transpose: true });
        assert!(check_grad(&[2, 3, 4], &adjoint)? < 1e-6);
        Ok(())
    }

    /// The CPU op against the composed graph bit for bit: values, candle's backward of the
    /// composition (the op's backward and `rope_adjoint`), f32 and f64, with zeros and −0 in the
    /// inputs and gradients (the sign of a zero sum follows candle's padded accumulation).
    #[test]
    fn cpu_op_is_the_composed_graph_bit_for_bit() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64] {
            let (b, h, t, d) = (2, 3, 5, 8);
            let cos = Tensor::randn(0f32, 1.0, (t, d), &dev)?.to_dtype(dtype)?;
            let sin = Tensor::randn(0f32, 1.0, (t, d), &dev)?.to_dtype(dtype)?;
            // a few exact zeros and negative zeros among the values and the gradient
            let with_zeros = |seed: f32| -> Result<Tensor> {
                let v = Tensor::randn(seed, 1.0, (b, h, t, d), &dev)?
                    .to_dtype(DType::F64)?
                    .flatten_all()?
                    .to_vec1::<f64>()?;
                let v: Vec<f64> = v
                    .iter()
                    .enumerate()
                    .map(|(i, x)| match i % 7 {
                        0 => 0.0,
                        3 => -0.0,
                        _ => *x,
                    })
                    .collect();
                Tensor::from_vec(v, (b, h, t, d), &dev)?.to_dtype(dtype)
            };
            let x = candle_core::Var::from_tensor(&with_zeros(0.0)?)?;
            let g = with_zeros(0.5)?;
            let bits = |t: &Tensor| -> Result<Vec<u64>> {
                Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?.iter().map(|v| v.to_bits()).collect())
            };
            let want = rope_composed(x.as_tensor(), &cos, &sin)?;
            let got = rope(x.as_tensor(), &cos, &sin)?;
            assert!(got.op().is_some(), "{dtype:?}: the CPU op recorded in the graph");
            assert_eq!(bits(&want)?, bits(&got)?, "{dtype:?} values");
            let gw = want.mul(&g)?.sum_all()?.backward()?;
            let gg = got.mul(&g)?.sum_all()?.backward()?;
            let want_dx = gw.get(x.as_tensor()).expect("grad");
            assert_eq!(bits(want_dx)?, bits(gg.get(x.as_tensor()).expect("grad"))?, "{dtype:?} backward");
            assert_eq!(bits(want_dx)?, bits(&rope_adjoint(&g, &cos, &sin)?)?, "{dtype:?} rope_adjoint");
        }
        Ok(())
    }

    /// `projection_heads` is `rope(split_heads(x))`: values and input gradients bit for bit.
    #[test]
    fn projection_heads_is_split_then_rope() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let (b, t, h, d) = (2, 5, 3, 8);
        let half = Tensor::randn(0f32, 1.0, (t, d / 2), &dev)?;
        let freqs = Tensor::cat(&[&half, &half], D::Minus1)?;
        let (cos, sin) = (freqs.cos()?, freqs.sin()?);
        let x = candle_core::Var::randn(0f32, 1.0, (b, t, h * d), &dev)?;
        let proj = Tensor::randn(0f32, 1.0, (b, h, t, d), &dev)?;
        let want = rope(&crate::ops::split_heads(x.as_tensor(), h)?, &cos, &sin)?;
        let got = crate::ops::projection_heads(x.as_tensor(), h, Some((&cos, &sin)))?;
        let bits = |t: &Tensor| -> Result<Vec<u32>> {
            Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
        };
        assert_eq!(bits(&want)?, bits(&got)?);
        let gw = want.mul(&proj)?.sum_all()?.backward()?;
        let gg = got.mul(&proj)?.sum_all()?.backward()?;
        assert_eq!(bits(gw.get(&x).expect("grad"))?, bits(gg.get(&x).expect("grad"))?);
        Ok(())
    }
}
