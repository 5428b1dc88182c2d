//! The running range a B-LoRA quantizer quantizes to ([`update_range`]): `[x_min, x_max]`
//! widened by x's extremes, and the grid's [`PARAMS`] derived from it, on x's device (a training
//! step reads nothing back). One parallel pass over x on the CPU; on CUDA per-block extremes
//! then the last block for the update, in one launch (`kernels/quantize.cu`: `range_fused`).
//! [`update_ranges`] updates several ranges (a B-LoRA layer's weights') in one op and one launch
//! (`ranges_fused`).
use super::{slice, LadderFloat, CHUNK, DIVISORS, PARAMS};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor};
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

/// The most tensors one [`update_ranges`] takes (`MAX_RANGES` in `kernels/quantize.cu`).
pub const MAX_RANGES: usize = 8;

/// [`update_range`] of several tensors in one op (on CUDA one launch): row i of the
/// `[k, 2 + PARAMS]` output (the `xs`' dtype, which they share) is `update_range(&xs[i],
/// &ranges[i])`, the same floats. 1 ≤ k ≤ [`MAX_RANGES`]. No gradient.
pub fn update_ranges(xs: &[Tensor], ranges: &[Tensor]) -> Result<Tensor> {
    let k = xs.len();
    if k == 0 || k > MAX_RANGES || ranges.len() != k {
        candle_core::bail!("update_ranges: 1 to {MAX_RANGES} tensors and as many ranges, got {k} and {}", ranges.len());
    }
    if let Some(r) = ranges.iter().find(|r| r.dims() != [2]) {
        candle_core::bail!("update_ranges: a range must be [2] (x_min, x_max), got {:?}", r.dims());
    }
    if xs.iter().any(|x| x.dtype() != xs[0].dtype() || !x.device().same_device(xs[0].device())) {
        candle_core::bail!("update_ranges: the tensors must share a dtype and a device");
    }
    let xs = xs.iter().map(|x| x.detach().contiguous()).collect::<Result<Vec<_>>>()?;
    let ranges = ranges.iter().map(|r| r.to_dtype(DType::F32)?.detach().contiguous()).collect::<Result<Vec<_>>>()?;
    xs[0].apply_op1_no_bwd(&RangesOp { rest: xs[1..].to_vec(), ranges })
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

/// [`update_ranges`]: the op's input is the first tensor; the other tensors and the old ranges
/// (`[2]` f32 each, possibly views of one buffer) ride along, read under their own locks.
struct RangesOp {
    rest: Vec<Tensor>,
    ranges: Vec<Tensor>,
}

impl RangesOp {
    /// The rows `[x_min, x_max, PARAMS]` of every tensor, one after the other.
    fn rows<T: LadderFloat + candle_core::WithDType>(
        &self,
        first: (&CpuStorage, &Layout),
        rest: &[(&CpuStorage, &Layout)],
        ranges: &[(&CpuStorage, &Layout)],
    ) -> Result<Vec<T>> {
        let mut out = Vec::with_capacity(ranges.len() * (2 + PARAMS));
        for ((xs, xl), (rs, rl)) in std::iter::once(&first).chain(rest).zip(ranges) {
            let x = slice(self.name(), xs.as_slice::<T>()?, xl)?;
            out.extend(update_range_cpu(x, slice(self.name(), rs.as_slice::<f32>()?, rl)?));
        }
        Ok(out)
    }
}

impl CustomOp1 for RangesOp {
    fn name(&self) -> &'static str {
        "blora-ranges"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let guards: Vec<_> = self.rest.iter().chain(&self.ranges).map(Tensor::storage_and_layout).collect();
        let mut inputs = Vec::with_capacity(guards.len());
        for (s, l) in &guards {
            let Storage::Cpu(s) = &**s else { candle_core::bail!("{}: every input on the CPU", self.name()) };
            inputs.push((s, *l));
        }
        let (rest, ranges) = inputs.split_at(self.rest.len());
        let out = match xs {
            CpuStorage::F32(_) => CpuStorage::F32(self.rows((xs, xl), rest, ranges)?),
            CpuStorage::F64(_) => CpuStorage::F64(self.rows((xs, xl), rest, ranges)?),
            other => candle_core::bail!("{}: f32 or f64 input, got {:?}", self.name(), other.dtype()),
        };
        Ok((out, Shape::from((self.ranges.len(), 2 + PARAMS))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, xs: &candle_core::CudaStorage, xl: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = cuda::update_ranges((xs, xl), &self.rest, &self.ranges)?;
        Ok((out, Shape::from((self.ranges.len(), 2 + PARAMS))))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::super::cuda::{blocks, cfg, Input};
    use super::{MAX_RANGES, PARAMS};
    use crate::ops::cuda::{contiguous_view, dtype_suffix, Kernel};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, DType, Result, Storage, Tensor};

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

    /// `RangeGroup` in `kernels/quantize.cu`: each tensor's length and device addresses.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    struct RangeGroup {
        n: [u64; MAX_RANGES],
        x: [u64; MAX_RANGES],
        range: [u64; MAX_RANGES],
    }
    // SAFETY: plain-old-data with the kernel's C layout.
    unsafe impl DeviceRepr for RangeGroup {}

    /// `ranges_fused_<dtype>` on a `(blocks, k)` grid (row y: tensor y's per-block extremes, its
    /// last block the update, as `range_fused`): `[k, 2 + PARAMS]`.
    pub(super) fn update_ranges(first: Input<'_>, rest: &[Tensor], ranges: &[Tensor]) -> Result<CudaStorage> {
        fn go<T: CudaDType + DeviceRepr>(first: Input<'_>, rest: &[Tensor], ranges: &[Tensor]) -> Result<CudaStorage> {
            let dev = first.0.device().clone();
            let stream = dev.cuda_stream();
            // Every input stays read-locked, and its address recorded as read on the stream,
            // until the launch is queued.
            let guards: Vec<_> = rest.iter().chain(ranges).map(Tensor::storage_and_layout).collect();
            let mut views = vec![contiguous_view::<T>(first.0, first.1, "range input")?];
            let mut range_views = Vec::with_capacity(ranges.len());
            for (i, (s, l)) in guards.iter().enumerate() {
                let Storage::Cuda(s) = &**s else { candle_core::bail!("update_ranges: every input on CUDA") };
                if i < rest.len() {
                    views.push(contiguous_view::<T>(s, l, "range input")?);
                } else if s.dtype() == DType::F32 {
                    range_views.push(contiguous_view::<f32>(s, l, "range")?);
                } else {
                    candle_core::bail!("update_ranges: the ranges must be f32");
                }
            }
            let mut group = RangeGroup { n: [0; MAX_RANGES], x: [0; MAX_RANGES], range: [0; MAX_RANGES] };
            let x_ptrs: Vec<_> = views.iter().map(|v| v.device_ptr(&stream)).collect();
            let r_ptrs: Vec<_> = range_views.iter().map(|v| v.device_ptr(&stream)).collect();
            for (i, ((xp, _), (rp, _))) in x_ptrs.iter().zip(&r_ptrs).enumerate() {
                group.n[i] = views[i].len() as u64;
                group.x[i] = *xp;
                group.range[i] = *rp;
            }
            let k = views.len();
            let nb = blocks(views.iter().map(|v| v.len()).max().unwrap_or(0));
            let func = Kernel::Quantize.func(&dev, &format!("ranges_fused_{}", dtype_suffix(first.0.dtype())?))?;
            // SAFETY: every block writes its two partials; each tensor's last block its row.
            let mut partial = unsafe { dev.alloc::<T>(2 * nb as usize * k)? };
            let mut out = unsafe { dev.alloc::<T>(k * (2 + PARAMS))? };
            let mut b = stream.launch_builder(&func);
            b.arg(&group);
            b.arg(&mut partial);
            b.arg(&mut out);
            let launch = LaunchConfig { grid_dim: (nb, k as u32, 1), ..cfg(nb) };
            // SAFETY: the argument list matches `ranges_fused_<dtype>` in kernels/quantize.cu.
            unsafe { b.launch(launch) }.w()?;
            drop((x_ptrs, r_ptrs));
            Ok(T::wrap_cuda_slice(out, dev))
        }
        match first.0.dtype() {
            DType::F32 => go::<f32>(first, rest, ranges),
            DType::F64 => go::<f64>(first, rest, ranges),
            other => candle_core::bail!("update_ranges: no CUDA kernel for {other:?}"),
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

    /// One grouped update equals one [`update_range`] per tensor, to the bit: mixed sizes, an
    /// unset range, a non-finite tensor, an empty one, old ranges that are views of one
    /// buffer (a layer's, from the previous step), f32 and f64, and over a second step.
    #[test]
    fn grouped_ranges_equal_one_update_each() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64] {
            let xs = [
                Tensor::randn(0f32, 0.02, (8, 384), &dev)?,
                Tensor::new(&[[0.5f32], [2.0], [0.25]], &dev)?,
                Tensor::randn(0f32, 1.0, (40_000,), &dev)?,
                Tensor::new(&[1f32, f32::NAN, -3.0], &dev)?,
                Tensor::zeros(0, DType::F32, &dev)?,
            ]
            .map(|x| x.to_dtype(dtype))
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
            let prev = Tensor::new(&[[-0.1f32, 0.1], [0., 0.], [0., 1.], [-1., 1.], [0., 2.]], &dev)?;
            let mut ranges = (0..xs.len()).map(|i| prev.get(i)).collect::<Result<Vec<_>>>()?;
            for step in 0..2 {
                let grouped = update_ranges(&xs, &ranges)?;
                assert_eq!(grouped.dims(), [xs.len(), 2 + PARAMS]);
                for (i, (x, r)) in xs.iter().zip(&ranges).enumerate() {
                    let one = update_range(x, r)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                    let row = grouped.get(i)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                    let bits = |v: &[f64]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&row), bits(&one), "{dtype:?} step {step} tensor {i}");
                }
                let rows = (0..xs.len()).map(|i| grouped.get(i)?.narrow(0, 0, 2)?.to_dtype(DType::F32));
                ranges = rows.collect::<Result<Vec<_>>>()?;
            }
        }
        assert!(update_ranges(&[], &[]).is_err());
        let (x, r) = (Tensor::new(&[1f32], &dev)?, Tensor::new(&[0f32, 0.], &dev)?);
        assert!(update_ranges(&[x.clone(), x.to_dtype(DType::F64)?], &[r.clone(), r.clone()]).is_err());
        assert!(update_ranges(&[x.clone(), x], &[r]).is_err(), "one range per tensor");
        Ok(())
    }
}
