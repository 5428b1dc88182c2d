//! The gate ops' CUDA launches (`kernels/hard_concrete.cu`).
use super::super::cuda::{contiguous_view, dtype_suffix, Kernel};
use super::{HardConcrete, Window, MAX_GATE_GRADS};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Result, Storage, Tensor};

/// `HardConcreteParams` in `kernels/hard_concrete.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct HardConcreteParams {
    inv_beta: f64,
    stretch: f64,
    gamma: f64,
    hard_off: f64,
    n: u32,
    use_hard_off: u32,
    group: u32,
    /// Handed-over gradient windows ([`super::GateGrads`]): how many, and each one's
    /// offset, length and device address; the kernel reads them in place of the upstream
    /// gradient's values there.
    windows: u32,
    window_at: [u32; MAX_GATE_GRADS],
    window_len: [u32; MAX_GATE_GRADS],
    window_ptr: [u64; MAX_GATE_GRADS],
}
// SAFETY: plain-old-data with the kernel's C layout.
unsafe impl DeviceRepr for HardConcreteParams {}

/// What a launch returns: `Len(k)`, the k values the kernel writes; `Scatter(len)`, zeros of
/// `len` with the kernel's n values at the window (the gradient of the whole logit vector).
#[derive(Clone, Copy)]
pub(super) enum Out {
    Len(usize),
    Scatter(usize),
}

/// `<entry>_<dtype>(params, window of input 0, inputs 1.., out)` on one thread for the
/// window's n gates.
pub(super) fn launch(
    entry: &str,
    hc: &HardConcrete,
    inputs: &[(&CudaStorage, &Layout)],
    w: Window,
    out: Out,
) -> Result<CudaStorage> {
    launch_gathered(entry, hc, inputs, w, out, &[])
}

/// [`launch`] with handed-over gradient windows (the backward of a sample whose consumers
/// hand their gradients over), read by the kernel in place.
pub(super) fn launch_gathered(
    entry: &str,
    hc: &HardConcrete,
    inputs: &[(&CudaStorage, &Layout)],
    w: Window,
    out: Out,
    windows: &[(usize, Tensor)],
) -> Result<CudaStorage> {
    fn go<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
        entry: &str,
        mut params: HardConcreteParams,
        inputs: &[(&CudaStorage, &Layout)],
        w: Window,
        out: Out,
        windows: &[(usize, Tensor)],
    ) -> Result<CudaStorage> {
        let dev = inputs[0].0.device().clone();
        let stream = dev.cuda_stream();
        // Each window's storage stays read-locked, and its device address recorded as read
        // on the stream, until the launch is queued.
        let guards: Vec<_> = windows.iter().map(|(_, t)| t.storage_and_layout()).collect();
        let mut window_views = Vec::with_capacity(windows.len());
        for (s, l) in &guards {
            let Storage::Cuda(s) = &**s else { candle_core::bail!("{entry}: a handed-over gradient off CUDA") };
            window_views.push(contiguous_view::<T>(s, l, "handed-over gradient")?);
        }
        let ptrs: Vec<_> = window_views.iter().map(|v| v.device_ptr(&stream)).collect();
        for (k, ((at, t), (ptr, _))) in windows.iter().zip(&ptrs).enumerate() {
            params.window_at[k] = *at as u32;
            params.window_len[k] = t.elem_count() as u32;
            params.window_ptr[k] = *ptr;
        }
        params.windows = windows.len() as u32;
        let func = Kernel::HardConcrete.func(&dev, &format!("{entry}_{}", dtype_suffix(inputs[0].0.dtype())?))?;
        let views = inputs
            .iter()
            .map(|(s, l)| contiguous_view::<T>(s, l, "hard_concrete input"))
            .collect::<Result<Vec<_>>>()?;
        let la = views[0].slice(w.offset..w.offset + w.n);
        let (mut buf, start, end) = match out {
            // SAFETY: the kernel writes all k elements.
            Out::Len(k) => (unsafe { dev.alloc::<T>(k)? }, 0, k),
            Out::Scatter(len) => (dev.alloc_zeros::<T>(len)?, w.offset, w.offset + w.n),
        };
        {
            let mut dst = buf.slice_mut(start..end);
            let mut b = stream.launch_builder(&func);
            b.arg(&params);
            b.arg(&la);
            for v in &views[1..] {
                b.arg(v);
            }
            b.arg(&mut dst);
            let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: the argument list matches `<entry>_<dtype>` in kernels/hard_concrete.cu.
            unsafe { b.launch(cfg) }.w()?;
        }
        drop(ptrs);
        Ok(T::wrap_cuda_slice(buf, dev))
    }
    let dtype = inputs[0].0.dtype();
    if inputs.iter().any(|(s, _)| s.dtype() != dtype) {
        candle_core::bail!("{entry}: inputs of one dtype");
    }
    if windows.len() > MAX_GATE_GRADS || windows.iter().any(|(at, t)| at + t.elem_count() > w.n) {
        candle_core::bail!(
            "{entry}: {} handed-over gradients, at most {MAX_GATE_GRADS} within the gates",
            windows.len()
        );
    }
    let params = HardConcreteParams {
        inv_beta: 1.0 / hc.beta,
        stretch: hc.zeta - hc.gamma,
        gamma: hc.gamma,
        hard_off: hc.hard_off.unwrap_or(0.0),
        n: u32::try_from(w.n).map_err(|_| candle_core::Error::Msg(format!("{entry}: {} gates", w.n)))?,
        use_hard_off: hc.hard_off.is_some() as u32,
        group: u32::try_from(w.group).map_err(|_| candle_core::Error::Msg(format!("{entry}: group {}", w.group)))?,
        windows: 0,
        window_at: [0; MAX_GATE_GRADS],
        window_len: [0; MAX_GATE_GRADS],
        window_ptr: [0; MAX_GATE_GRADS],
    };
    match dtype {
        DType::F32 => go::<f32>(entry, params, inputs, w, out, windows),
        DType::F64 => go::<f64>(entry, params, inputs, w, out, windows),
        other => candle_core::bail!("{entry}: no CUDA kernel for {other:?}"),
    }
}
