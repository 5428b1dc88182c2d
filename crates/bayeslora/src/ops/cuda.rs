//! Our CUDA kernels (`crates/bayeslora/kernels/*.cu`, compiled to PTX by the build script, one
//! file per op named after its `ops/*.rs`) and how they are launched on candle's device and
//! stream: the module of each file ([`Kernel`]), the dtype suffix of entry points, contiguous
//! views, launch configurations, and the launches every op shares ([`launch`],
//! [`launch_elementwise`]).
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
    /// `rms_norm.cu`: `rms_{fwd,bwd}_<dtype>` (see `ops::rms_norm`).
    RmsNorm,
    /// `rope.cu`: `rope_<dtype>` (see `ops::rope`).
    Rope,
    /// `swiglu.cu`: `swiglu_{fwd,bwd}_<dtype>` (see `ops::swiglu`).
    Swiglu,
    /// `layout.cu`: `heads_<dtype>` (see `ops::layout`).
    Layout,
    /// `cast.cu`: `cast_<from>_<to>` between f32 and bf16/f16 (see `ops::cast`).
    Cast,
    /// `quantize.cu`: B-LoRA's `quantize_{fwd,bwd,dz}` and `range_{partial,update}`, each
    /// `_f32`/`_f64` (see `ops::quantize`).
    Quantize,
    /// `hard_concrete.cu`: `hard_concrete_{fwd,bwd}` and `rank_gates_{fwd,bwd}`, each
    /// `_f32`/`_f64` (see `ops::hard_concrete`).
    HardConcrete,
    /// `gate_prior.cu`: `gate_prior_{fwd,bwd}_f32` (see `ops::gate_prior`).
    GatePrior,
    /// `gate_scale.cu`: `gate_scale_{fwd,bwd}`, each `_f32`/`_f64` (see `ops::gate_scale`).
    GateScale,
}

impl Kernel {
    fn module(self) -> (&'static str, &'static str) {
        match self {
            Kernel::CrossEntropy => ("cross_entropy", ptx::CROSS_ENTROPY),
            Kernel::Dropout => ("dropout", ptx::DROPOUT),
            Kernel::FlashAttention => ("flash_attention", ptx::FLASH_ATTENTION),
            Kernel::RmsNorm => ("rms_norm", ptx::RMS_NORM),
            Kernel::Rope => ("rope", ptx::ROPE),
            Kernel::Swiglu => ("swiglu", ptx::SWIGLU),
            Kernel::Layout => ("layout", ptx::LAYOUT),
            Kernel::Cast => ("cast", ptx::CAST),
            Kernel::Quantize => ("quantize", ptx::QUANTIZE),
            Kernel::HardConcrete => ("hard_concrete", ptx::HARD_CONCRETE),
            Kernel::GatePrior => ("gate_prior", ptx::GATE_PRIOR),
            Kernel::GateScale => ("gate_scale", ptx::GATE_SCALE),
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

/// A contiguous input of a kernel: storage, layout, and its name for errors.
pub(crate) type Input<'a> = (&'a CudaStorage, &'a Layout, &'a str);

/// Elements per 16-byte access of `dtype` (`Pack<T>::N` in the kernels).
pub(crate) fn pack(dtype: DType) -> usize {
    16 / dtype.size_in_bytes()
}

/// Threads per block for a grid-stride loop over `items`, and the number of blocks: enough to
/// fill the GPU several times over, the loop covers the rest.
pub(crate) fn grid(items: usize) -> LaunchConfig {
    let blocks = items.div_ceil(256).clamp(1, 65_535) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// Launches `<entry>_<dtype>(params, inputs.., out)` of `kernel` with a fresh output of
/// `out_len` elements of the first input's dtype (every input has that dtype; f32, bf16 or f16):
/// the launch of the memory-bound kernels that include `pack.cuh`.
pub(crate) fn launch<P: DeviceRepr>(
    kernel: Kernel,
    entry: &str,
    cfg: LaunchConfig,
    params: P,
    inputs: &[Input<'_>],
    out_len: usize,
) -> Result<CudaStorage> {
    let dtype = inputs[0].0.dtype();
    if let Some((_, _, what)) = inputs.iter().find(|(s, _, _)| s.dtype() != dtype) {
        candle_core::bail!("{entry}: {what} is not {dtype:?} like the input");
    }
    fn go<T: CudaDType + DeviceRepr, P: DeviceRepr>(
        kernel: Kernel,
        entry: &str,
        cfg: LaunchConfig,
        params: P,
        inputs: &[Input<'_>],
        out_len: usize,
    ) -> Result<CudaStorage> {
        let dev = inputs[0].0.device().clone();
        let func = kernel.func(&dev, &format!("{entry}_{}", dtype_suffix(inputs[0].0.dtype())?))?;
        let views = inputs.iter().map(|(s, l, what)| contiguous_view::<T>(s, l, what)).collect::<Result<Vec<_>>>()?;
        // SAFETY: the kernel writes all out_len elements.
        let out = unsafe { dev.alloc::<T>(out_len)? };
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&func);
        b.arg(&params);
        for v in &views {
            b.arg(v);
        }
        b.arg(&out);
        // SAFETY: the argument list matches `<entry>_<dtype>` in the kernel's .cu file (checked by
        // the GPU tests).
        unsafe { b.launch(cfg) }.w()?;
        Ok(T::wrap_cuda_slice(out, dev))
    }
    match dtype {
        DType::F32 => go::<f32, P>(kernel, entry, cfg, params, inputs, out_len),
        DType::BF16 => go::<half::bf16, P>(kernel, entry, cfg, params, inputs, out_len),
        DType::F16 => go::<half::f16, P>(kernel, entry, cfg, params, inputs, out_len),
        other => candle_core::bail!("{entry}: no CUDA kernel for {other:?}"),
    }
}
