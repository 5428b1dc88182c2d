//! Our CUDA kernels (`crates/bayeslora/kernels/*.cu`, compiled to PTX by the build script) and
//! how they are launched on candle's device and stream.
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Result};

mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

/// One kernel family: a `.cu` file with one entry point per dtype, named `<name>_<dtype>`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kernel {
    /// `cross_entropy.cu`: `ce_{fwd,bwd}_<dtype>` (see `ops::cross_entropy`).
    CrossEntropy,
    Dropout,
    /// `flash_attention.cu`: entry points `flash_{fwd,bwd}_<dtype>_d<D>` and helpers (see
    /// `ops::flash_attention`).
    FlashAttention,
    /// `fused.cu`: `rms_{fwd,bwd}`, `rope`, `swiglu_{fwd,bwd}`, each `_<dtype>` (see
    /// `ops::fused`).
    Fused,
    /// `blora.cu`: B-LoRA's `quantize_{fwd,bwd,dz}` and `range_{partial,update}` (see
    /// `ops::quantize`) and `hard_concrete_{fwd,bwd}` (see `ops::hard_concrete`), each
    /// `_f32`/`_f64`.
    BLora,
}

impl Kernel {
    fn module(self) -> (&'static str, &'static str) {
        match self {
            Kernel::CrossEntropy => ("cross_entropy", ptx::CROSS_ENTROPY),
            Kernel::Dropout => ("dropout", ptx::DROPOUT),
            Kernel::FlashAttention => ("flash_attention", ptx::FLASH_ATTENTION),
            Kernel::Fused => ("fused", ptx::FUSED),
            Kernel::BLora => ("blora", ptx::BLORA),
        }
    }

    /// Loads entry point `name` of this kernel's module on `dev` (the module is cached by candle);
    /// launch it on `dev.cuda_stream()`.
    pub(crate) fn func(
        self,
        dev: &candle_core::cuda_backend::CudaDevice,
        name: &str,
    ) -> Result<candle_core::cuda_backend::cudarc::driver::CudaFunction> {
        let (module, ptx) = self.module();
        Ok(dev.get_or_load_custom_func(name, module, ptx)?.into_cuda_function())
    }
}

/// The entry-point suffix of `dtype` (`<name>_<suffix>`); callers check that their kernel has it.
pub(crate) fn dtype_suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F64 => "f64",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        other => candle_core::bail!("no CUDA kernel for dtype {other:?}"),
    })
}

/// The contiguous elements of `storage` under `layout`, as a kernel argument (`what` names the
/// tensor in the error).
pub(crate) fn contiguous_view<'a, T: CudaDType>(
    storage: &'a CudaStorage,
    layout: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{what} must be contiguous for our CUDA kernels")
    };
    Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
}

/// Launches `kernel(params, x, y)` over the contiguous elements `start..end` of `input` (grid-
/// stride loop): `params` is a `#[repr(C)]` struct mirrored in the `.cu` file, `x` the input,
/// `y` a fresh output of the same dtype, which is returned.
pub(crate) fn launch_elementwise<P: DeviceRepr>(
    input: &CudaStorage,
    start: usize,
    end: usize,
    kernel: Kernel,
    params: P,
) -> Result<CudaStorage> {
    let dev = input.device().clone();
    let (module, _) = kernel.module();
    let func = kernel.func(&dev, &format!("{module}_{}", dtype_suffix(input.dtype())?))?;
    let stream = dev.cuda_stream();
    let n = end - start;
    let cfg = LaunchConfig::for_num_elems(n.min(1 << 30) as u32);
    macro_rules! run {
        ($slice:expr, $ty:ty, $variant:ident) => {{
            let src = $slice.slice(start..end);
            // SAFETY: the kernel writes every one of the n elements.
            let out = unsafe { dev.alloc::<$ty>(n)? };
            let mut builder = stream.launch_builder(&func);
            builder.arg(&params);
            builder.arg(&src);
            builder.arg(&out);
            // SAFETY: argument list matches the kernel's signature (checked by the GPU tests).
            unsafe { builder.launch(cfg) }.w()?;
            CudaStorageSlice::$variant(out)
        }};
    }
    let slice = match &input.slice {
        CudaStorageSlice::F32(s) => run!(s, f32, F32),
        CudaStorageSlice::F64(s) => run!(s, f64, F64),
        CudaStorageSlice::BF16(s) => run!(s, half::bf16, BF16),
        CudaStorageSlice::F16(s) => run!(s, half::f16, F16),
        _ => candle_core::bail!("no CUDA kernel {module} for dtype {:?}", input.dtype()),
    };
    Ok(CudaStorage { slice, device: dev })
}
