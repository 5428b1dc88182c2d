//! Dtype casts f32 ↔ bf16/f16, differentiable (the backward casts the gradient back). On CUDA
//! our vectorized kernel (`kernels/cast.cu`; candle's moves one element per thread); elsewhere
//! candle's `to_dtype`.
use super::reference::{cpu_f64, cpu_from_f64};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// `x` in `dtype`, differentiable (the gradient comes back in x's dtype). On CUDA, f32 ↔ bf16/f16
/// run through our vectorized kernel (candle's moves one element per thread); elsewhere
/// `to_dtype`.
pub fn cast(x: &Tensor, dtype: DType) -> Result<Tensor> {
    if x.dtype() == dtype {
        return Ok(x.clone());
    }
    if super::cuda_applies(x) && cast_supported(x.dtype(), dtype) {
        return fused(x, dtype);
    }
    x.to_dtype(dtype)
}

/// Whether [`fused`] has a kernel for `from` → `to`.
fn cast_supported(from: DType, to: DType) -> bool {
    matches!((from, to), (DType::BF16 | DType::F16, DType::F32) | (DType::F32, DType::BF16 | DType::F16))
}

/// `x` in `to` (f32 ↔ bf16/f16), differentiable: the backward casts the gradient back.
fn fused(x: &Tensor, to: DType) -> Result<Tensor> {
    if !cast_supported(x.dtype(), to) {
        candle_core::bail!("cast: no kernel for {:?} → {to:?}", x.dtype());
    }
    x.contiguous()?.apply_op1(Cast { from: x.dtype(), to })
}

/// See [`fused`].
#[derive(Debug, Clone, Copy)]
struct Cast {
    from: DType,
    to: DType,
}

impl CustomOp1 for Cast {
    fn name(&self) -> &'static str {
        "cast"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        // f32/bf16/f16 are exact in f64, and rounding an f64 holding an f32 to bf16/f16 rounds
        // that f32: the same result as candle's cast.
        Ok((cpu_from_f64(self.to, cpu_f64(s, l, "cast input")?)?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda::cast(s, l, self.to)?, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let back = Cast { from: self.to, to: self.from };
        Ok(Some(grad.contiguous()?.apply_op1(back)?))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::super::cuda::{contiguous_view, dtype_suffix, grid, Kernel};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, DType, Layout, Result};

    /// `CastParams` in `kernels/cast.cu`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    struct CastParams {
        n: u64,
        vec: u32,
        pad: u32,
    }
    // SAFETY: plain-old-data with the kernel's C layout.
    unsafe impl DeviceRepr for CastParams {}

    /// `cast_<from>_<to>` of the contiguous `s` into a fresh buffer of `to`.
    pub(super) fn cast(s: &CudaStorage, l: &Layout, to: DType) -> Result<CudaStorage> {
        fn go<S: CudaDType + DeviceRepr, D: CudaDType + DeviceRepr>(
            s: &CudaStorage,
            l: &Layout,
            name: &str,
        ) -> Result<CudaStorage> {
            let n = l.shape().elem_count();
            let dev = s.device().clone();
            let func = Kernel::Cast.func(&dev, name)?;
            let x = contiguous_view::<S>(s, l, "cast input")?;
            let vec = n.is_multiple_of(4);
            let params = CastParams { n: n as u64, vec: vec as u32, pad: 0 };
            // SAFETY: the kernel writes all n elements.
            let y = unsafe { dev.alloc::<D>(n)? };
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&func);
            b.arg(&params);
            b.arg(&x);
            b.arg(&y);
            // SAFETY: the argument list matches `cast_<from>_<to>` in kernels/cast.cu.
            unsafe { b.launch(grid(if vec { n / 4 } else { n })) }.w()?;
            Ok(D::wrap_cuda_slice(y, dev))
        }
        let name = format!("cast_{}_{}", dtype_suffix(s.dtype())?, dtype_suffix(to)?);
        match (s.dtype(), to) {
            (DType::BF16, DType::F32) => go::<half::bf16, f32>(s, l, &name),
            (DType::F32, DType::BF16) => go::<f32, half::bf16>(s, l, &name),
            (DType::F16, DType::F32) => go::<half::f16, f32>(s, l, &name),
            (DType::F32, DType::F16) => go::<f32, half::f16>(s, l, &name),
            (from, to) => candle_core::bail!("cast: no kernel for {from:?} → {to:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::max_diff;
    use candle_core::{Device, Var};

    /// The cast op's CPU implementation (the kernels' reference) equals candle's cast both ways,
    /// and its gradient is the gradient cast back.
    #[test]
    fn cast_matches_candle() -> Result<()> {
        let x = Tensor::randn(0f32, 3.0, (5, 7), &Device::Cpu)?;
        for to in [DType::BF16, DType::F16] {
            let down = fused(&x, to)?;
            assert_eq!(down.dtype(), to);
            assert_eq!(max_diff(&down, &x.to_dtype(to)?)?, 0.0);
            let up = fused(&down, DType::F32)?;
            assert_eq!(max_diff(&up, &down.to_dtype(DType::F32)?)?, 0.0);
        }
        let v = Var::from_tensor(&x)?;
        let w = Tensor::randn(0f32, 1.0, (5, 7), &Device::Cpu)?.to_dtype(DType::BF16)?;
        let g = fused(v.as_tensor(), DType::BF16)?.mul(&w)?.sum_all()?.backward()?;
        let got = g.get(v.as_tensor()).expect("gradient");
        assert_eq!(got.dtype(), DType::F32);
        assert_eq!(max_diff(got, &w.to_dtype(DType::F32)?)?, 0.0);
        Ok(())
    }
}
