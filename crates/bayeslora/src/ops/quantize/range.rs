//! The running range a B-LoRA quantizer quantizes to ([`update_range`]): `[x_min, x_max]`
//! widened by x's extremes, and the grid's [`PARAMS`] derived from it, on x's device (a training
//! step reads nothing back). One parallel pass over x on the CPU; on CUDA per-block extremes
//! then the last block for the update, in one launch (`kernels/quantize.cu`: `range_fused`).
use super::{slice, LadderFloat, CHUNK, DIVISORS, PARAMS};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The range `[x_min, x_max]` (f32, unset = both 0) widened by `x`'s extremes — symmetric
/// ±max(|old|, |x|) once a negative value was seen, else [0, max(old, x)]; a tensor with a
/// non-finite value leaves it as it is (`Range::widen`) — followed by the [`PARAMS`] of the
/// widened range: `[2 + PARAMS]` in x's dtype. No gradient.
pub fn update_range(x: &Tensor, range: &Tensor) -> Result<Tensor> {
    if range.dims() != [2] {
        candle_core::bail!("update_range: range must be [2] (x_min, x_max), got {:?}", range.dims());
    }
    let range = range.to_dtype(DType::F32)?.contiguous()?;
    x.detach().contiguous()?.apply_op2_no_bwd(&range, &RangeOp)
}

/// x's extremes (in T) and whether every value is finite.
fn extremes<T: LadderFloat>(x: &[T]) -> (T, T, bool) {
    let init = (T::from_f64(f64::INFINITY), T::from_f64(f64::NEG_INFINITY), true);
    let chunk = |x: &[T]| {
        x.iter()
            .fold(init, |(lo, hi, ok), &v| if v.is_finite() { (lo.min_c(v), hi.max_c(v), ok) } else { (lo, hi, false) })
    };
    let parts: Vec<(T, T, bool)> = x.par_chunks(CHUNK).map(chunk).collect();
    parts.into_iter().fold(init, |(lo, hi, ok), (l, h, o)| (lo.min_c(l), hi.max_c(h), ok && o))
}

/// `[x_min, x_max, PARAMS]` of the range `[old_min, old_max]` widened by `x`, as the composed
/// path computed it: extremes cast to f32, widened in f32, the grid in f64.
fn update_range_cpu<T: LadderFloat>(x: &[T], old: &[f32]) -> Vec<T> {
    let (lo_t, hi_t, all_finite) = extremes(x);
    let (lo, hi) = (lo_t.to_f32(), hi_t.to_f32());
    let (x_min, x_max) = (old[0], old[1]);
    let finite = all_finite && (hi - lo).abs() < f32::INFINITY;
    let m = x_max.max_c(-x_min).max_c(hi).max_c(-lo);
    let signed = x_min.min_c(lo) < 0.0;
    let (new_min, new_max) = if finite { (if signed { -m } else { 0.0 }, m) } else { (x_min, x_max) };
    let (dlo, dhi) = (f64::from(new_min), f64::from(new_max));
    let signed = if dlo < 0.0 { 1.0 } else { 0.0 };
    let steps = DIVISORS.map(|d| (dhi - dlo) / d);
    let mut out = vec![T::from_f32(new_min), T::from_f32(new_max)];
    // The 2-bit code bounds as the composed path's affine(−1, 0) and affine(−2, 3) of the flag.
    out.extend([dlo, dhi, -signed + 0.0, signed * -2.0 + 3.0].map(T::from_f64));
    out.extend(steps.map(T::from_f64));
    out.extend(steps.map(|s| T::from_f64(1.0 / s)));
    out
}

/// [`update_range`]: inputs x and the old range (`[2]` f32); output `[2 + PARAMS]` of x's dtype.
struct RangeOp;

impl CustomOp2 for RangeOp {
    fn name(&self) -> &'static str {
        "blora-range"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, rs: &CpuStorage, rl: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(r) = rs else { candle_core::bail!("{}: the range must be f32", self.name()) };
        let old = slice(self.name(), r, rl)?;
        let out = match xs {
            CpuStorage::F32(x) => CpuStorage::F32(update_range_cpu(slice(self.name(), x, xl)?, old)),
            CpuStorage::F64(x) => CpuStorage::F64(update_range_cpu(slice(self.name(), x, xl)?, old)),
            other => candle_core::bail!("{}: f32 or f64 input, got {:?}", self.name(), other.dtype()),
        };
        Ok((out, Shape::from(2 + PARAMS)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        rs: &candle_core::CudaStorage,
        rl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda::update_range((xs, xl), (rs, rl))?, Shape::from(2 + PARAMS)))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::super::cuda::{blocks, cfg, Input};
    use super::PARAMS;
    use crate::ops::cuda::{contiguous_view, dtype_suffix, Kernel};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, DType, Result};

    /// `range_fused_<dtype>` (per-block extremes; the last block widens the range and derives
    /// the grid, in one launch): `[x_min, x_max, PARAMS]`.
    pub(super) fn update_range(x: Input<'_>, range: Input<'_>) -> Result<CudaStorage> {
        fn go<T: CudaDType + DeviceRepr>(x: Input<'_>, range: Input<'_>) -> Result<CudaStorage> {
            let n = x.1.shape().elem_count();
            let dev = x.0.device().clone();
            let suffix = dtype_suffix(x.0.dtype())?;
            let fused_fn = Kernel::Quantize.func(&dev, &format!("range_fused_{suffix}"))?;
            let xv = contiguous_view::<T>(x.0, x.1, "range input")?;
            let rv = contiguous_view::<f32>(range.0, range.1, "range")?;
            let nb = blocks(n);
            // SAFETY: every block writes its two partials; the last block writes all 2 + PARAMS.
            let mut partial = unsafe { dev.alloc::<T>(2 * nb as usize)? };
            let mut out = unsafe { dev.alloc::<T>(2 + PARAMS)? };
            let n64 = n as u64;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&fused_fn);
            b.arg(&n64);
            b.arg(&xv);
            b.arg(&mut partial);
            b.arg(&rv);
            b.arg(&mut out);
            // SAFETY: the argument list matches `range_fused_<dtype>` in kernels/quantize.cu.
            unsafe { b.launch(cfg(nb)) }.w()?;
            Ok(T::wrap_cuda_slice(out, dev))
        }
        if range.0.dtype() != DType::F32 || range.1.shape().elem_count() != 2 {
            candle_core::bail!("update_range: the range must be [2] f32");
        }
        match x.0.dtype() {
            DType::F32 => go::<f32>(x, range),
            DType::F64 => go::<f64>(x, range),
            other => candle_core::bail!("update_range: no CUDA kernel for {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn range_ignores_non_finite_and_empty_tensors() -> Result<()> {
        let dev = Device::Cpu;
        let old = Tensor::new(&[-1f32, 1.], &dev)?;
        for bad in [&[f32::NAN, 9.0][..], &[9.0, f32::NAN], &[2.0, f32::INFINITY], &[]] {
            let out = update_range(&Tensor::new(bad, &dev)?, &old)?.narrow(0, 0, 2)?.to_vec1::<f32>()?;
            assert_eq!(out, [-1.0, 1.0], "{bad:?}");
        }
        let out = update_range(&Tensor::new(&[0.5f32, 3.0], &dev)?, &Tensor::new(&[0f32, 2.], &dev)?)?;
        let v = out.to_vec1::<f32>()?;
        assert_eq!(&v[..6], &[0.0, 3.0, 0.0, 3.0, 0.0, 3.0], "unsigned: [0, max], 2-bit codes 0..3");
        assert_eq!(v[6], 1.0);
        Ok(())
    }
}
