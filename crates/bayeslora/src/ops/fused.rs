//! RMSNorm, rotary embedding and SwiGLU as one op per direction, for CUDA tensors.
//!
//! Composed from candle primitives, each of these runs 5–10 elementwise kernels per direction —
//! casts, `sqr`/`mean`, `narrow`/`cat`, and candle's strided broadcast multiply, which alone took
//! ~120 µs per call on a 7B-shaped layer — with a full-size temporary each. The ops here read and
//! write every element once (`kernels/fused.cu`), in f32 whatever the storage dtype.
//! `ops::{rms_norm, rope, swiglu}` take them for f32/bf16/f16 tensors on CUDA ([`fused_applies`]);
//! on the CPU, RMSNorm and SwiGLU take `ops::cpu_fused` (the composed path's forward floats) and
//! rope stays composed.
//!
//! The CPU implementations below (in f64) are the reference for the formulas: the unit tests check
//! them against the composed ops and finite differences; the GPU tests (`tests/cuda_fused.rs`)
//! check the kernels against the composed CPU path.
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, D};

/// Whether `ops::{rms_norm, rope, swiglu}` take the fused path for `x`.
pub(crate) fn fused_applies(x: &Tensor) -> bool {
    x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16) && x.elem_count() > 0
}

/// RMSNorm of `x: [.., C]` with the frozen `weight: [C]` (same dtype), kept out of the graph.
pub(crate) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let c = x.dim(D::Minus1)?;
    if weight.dims() != [c] || weight.dtype() != x.dtype() {
        candle_core::bail!(
            "rms_norm: weight must be [{c}] {:?}, got {:?} {:?}",
            x.dtype(),
            weight.dims(),
            weight.dtype()
        );
    }
    x.contiguous()?.apply_op1(FusedRmsNorm { weight: weight.contiguous()?, eps })
}

/// Rotary embedding of `x: [.., T, D]` with constant `cos`/`sin: [T, D]` (x's dtype).
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
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

/// `silu(gate) · up` (same shape and dtype), differentiable in both.
pub(crate) fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dims() != up.dims() || gate.dtype() != up.dtype() {
        candle_core::bail!(
            "swiglu: gate {:?} {:?} and up {:?} {:?} differ",
            gate.dims(),
            gate.dtype(),
            up.dims(),
            up.dtype()
        );
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, FusedSwiglu)
}

/// `[B, T, H·D]` → `[B, H, T, D]` (`to_heads`) or `[B, H, T, D]` → `[B, T, H·D]`: the attention
/// layout of a projection's output and back, one pass instead of candle's strided copy.
pub(crate) fn permute_heads(x: &Tensor, b: usize, t: usize, h: usize, d: usize, to_heads: bool) -> Result<Tensor> {
    if x.elem_count() != b * t * h * d {
        candle_core::bail!("permute_heads: {:?} is not {b}×{t}×{h}×{d}", x.dims());
    }
    x.contiguous()?.apply_op1(PermuteHeads { b, t, h, d, to_heads })
}

/// See [`permute_heads`]; the backward is the inverse permutation.
#[derive(Debug, Clone, Copy)]
struct PermuteHeads {
    b: usize,
    t: usize,
    h: usize,
    d: usize,
    to_heads: bool,
}

impl PermuteHeads {
    fn out_shape(&self) -> Shape {
        if self.to_heads {
            Shape::from((self.b, self.h, self.t, self.d))
        } else {
            Shape::from((self.b, self.t, self.h * self.d))
        }
    }

    /// The source row of output row `row` (rows of d elements).
    fn source_row(&self, row: usize) -> usize {
        let (b, t, h) = (self.b, self.t, self.h);
        debug_assert!(row < b * t * h);
        if self.to_heads {
            let (ti, hi, bi) = (row % t, (row / t) % h, row / (t * h));
            (bi * t + ti) * h + hi
        } else {
            let (hi, ti, bi) = (row % h, (row / h) % t, row / (h * t));
            (bi * h + hi) * t + ti
        }
    }
}

impl CustomOp1 for PermuteHeads {
    fn name(&self) -> &'static str {
        "permute-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        // Values pass through f64 unchanged (every f32/bf16/f16 is exact in f64).
        let x = cpu_f64(s, l, "permute_heads input")?;
        let d = self.d;
        let mut y = vec![0f64; x.len()];
        for (row, out) in y.chunks_mut(d).enumerate() {
            let src = self.source_row(row);
            out.copy_from_slice(&x[src * d..(src + 1) * d]);
        }
        Ok((cpu_from_f64(s.dtype(), y)?, self.out_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let inputs = [(s, l, "permute_heads input")];
        Ok((cuda::heads(&inputs, self.b, self.t, self.h, self.d, self.to_heads)?, self.out_shape()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let inverse = PermuteHeads { to_heads: !self.to_heads, ..*self };
        Ok(Some(grad.contiguous()?.apply_op1(inverse)?))
    }
}

/// Whether [`cast`] has a kernel for `from` → `to`.
pub(crate) fn cast_supported(from: DType, to: DType) -> bool {
    matches!((from, to), (DType::BF16 | DType::F16, DType::F32) | (DType::F32, DType::BF16 | DType::F16))
}

/// `x` in `to` (f32 ↔ bf16/f16), differentiable: the backward casts the gradient back.
pub(crate) fn cast(x: &Tensor, to: DType) -> Result<Tensor> {
    if !cast_supported(x.dtype(), to) {
        candle_core::bail!("cast: no kernel for {:?} → {to:?}", x.dtype());
    }
    x.contiguous()?.apply_op1(Cast { from: x.dtype(), to })
}

/// See [`cast`].
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

/// `y1 = x1·c1 − x2·s1, y2 = x2·c2 + x1·s2` over the halves of the last dim; with `transpose`
/// its adjoint `y1 = x1·c1 + x2·s2, y2 = x2·c2 − x1·s1` (the backward, itself differentiable).
#[derive(Debug, Clone)]
struct FusedRope {
    cos: Tensor,
    sin: Tensor,
    transpose: bool,
}

/// `y = silu(gate) · up`.
#[derive(Debug, Clone, Copy)]
struct FusedSwiglu;

/// `[d_gate; d_up]` stacked on a new leading dim of 2, from (gate, up, g); no backward of its own.
#[derive(Debug, Clone, Copy)]
struct SwigluGrad;

// ---- CPU reference implementations (f64 math) ----

/// The elements of a contiguous CPU storage as f64.
fn cpu_f64(s: &CpuStorage, l: &Layout, what: &str) -> Result<Vec<f64>> {
    let Some((start, end)) = l.contiguous_offsets() else { candle_core::bail!("{what} must be contiguous") };
    Ok(match s {
        CpuStorage::F32(v) => v[start..end].iter().map(|&v| v as f64).collect(),
        CpuStorage::F64(v) => v[start..end].to_vec(),
        CpuStorage::BF16(v) => v[start..end].iter().map(|v| v.to_f64()).collect(),
        CpuStorage::F16(v) => v[start..end].iter().map(|v| v.to_f64()).collect(),
        other => candle_core::bail!("{what}: unsupported dtype {:?}", other.dtype()),
    })
}

/// `v` rounded to `dtype`, as a CPU storage.
fn cpu_from_f64(dtype: DType, v: Vec<f64>) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F64 => CpuStorage::F64(v),
        DType::F32 => CpuStorage::F32(v.iter().map(|&v| v as f32).collect()),
        DType::BF16 => CpuStorage::BF16(v.iter().map(|&v| half::bf16::from_f64(v)).collect()),
        DType::F16 => CpuStorage::F16(v.iter().map(|&v| half::f16::from_f64(v)).collect()),
        other => candle_core::bail!("fused ops: unsupported dtype {other:?}"),
    })
}

/// `v` rounded to `dtype` and back.
fn round_to(dtype: DType, v: f64) -> f64 {
    match dtype {
        DType::F32 => v as f32 as f64,
        DType::BF16 => half::bf16::from_f64(v).to_f64(),
        DType::F16 => half::f16::from_f64(v).to_f64(),
        _ => v,
    }
}

/// A constant tensor held by an op (weight, cos, sin) as f64, on the CPU.
fn held_f64(t: &Tensor, what: &str) -> Result<Vec<f64>> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(s) = &*storage else { candle_core::bail!("{what} and the input are on different devices") };
    cpu_f64(s, layout, what)
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
        let Storage::Cuda(w) = &*ws else { candle_core::bail!("rms_norm: weight and input are on different devices") };
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
        let Storage::Cuda(w) = &*ws else { candle_core::bail!("rms_norm: weight and input are on different devices") };
        let inputs = [(s1, l1, "rms_norm input"), (s2, l2, "rms_norm gradient"), (w, wl, "rms_norm weight")];
        Ok((cuda::rms_norm(&inputs, self.eps, "rms_bwd")?, l1.shape().clone()))
    }
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
        let (Storage::Cuda(c), Storage::Cuda(sn)) = (&*cs, &*ss) else {
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

impl CustomOp2 for FusedSwiglu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (a, u) = (cpu_f64(s1, l1, "swiglu gate")?, cpu_f64(s2, l2, "swiglu up")?);
        let y = a.iter().zip(&u).map(|(a, u)| a / (1.0 + (-a).exp()) * u).collect();
        Ok((cpu_from_f64(s1.dtype(), y)?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = cuda::swiglu(&[(s1, l1, "swiglu gate"), (s2, l2, "swiglu up")], "swiglu_fwd", 1)?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &SwigluGrad)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

impl CustomOp3 for SwigluGrad {
    fn name(&self) -> &'static str {
        "swiglu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, u) = (cpu_f64(s1, l1, "swiglu gate")?, cpu_f64(s2, l2, "swiglu up")?);
        let g = cpu_f64(s3, l3, "swiglu gradient")?;
        let sig: Vec<f64> = a.iter().map(|a| 1.0 / (1.0 + (-a).exp())).collect();
        let d_gate = (0..a.len()).map(|i| g[i] * u[i] * sig[i] * (1.0 + a[i] * (1.0 - sig[i])));
        let d_up = (0..a.len()).map(|i| g[i] * a[i] * sig[i]);
        Ok((cpu_from_f64(s1.dtype(), d_gate.chain(d_up).collect())?, stacked_shape(l1)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let inputs = [(s1, l1, "swiglu gate"), (s2, l2, "swiglu up"), (s3, l3, "swiglu gradient")];
        Ok((cuda::swiglu(&inputs, "swiglu_bwd", 2)?, stacked_shape(l1)))
    }
}

/// `[2, ..shape]`: the two gradients of SwiGLU in one buffer.
fn stacked_shape(l: &Layout) -> Shape {
    let mut dims = vec![2];
    dims.extend_from_slice(l.dims());
    Shape::from(dims)
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::super::cuda::{contiguous_view, dtype_suffix, Kernel};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, DType, Layout, Result};

    /// `NormParams` in `kernels/fused.cu`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    struct NormParams {
        rows: u32,
        cols: u32,
        eps: f32,
        vec: u32,
    }
    /// `RopeParams` in `kernels/fused.cu`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    struct RopeParams {
        rows: u64,
        t: u32,
        d: u32,
        vec: u32,
        transpose: u32,
    }
    /// `SwigluParams` in `kernels/fused.cu`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    struct SwigluParams {
        n: u64,
        vec: u32,
        pad: u32,
    }
    /// `CastParams` in `kernels/fused.cu`.
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
            let func = Kernel::Fused.func(&dev, name)?;
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
            // SAFETY: the argument list matches `cast_<from>_<to>` in kernels/fused.cu.
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

    /// `HeadsParams` in `kernels/fused.cu`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    struct HeadsParams {
        b: u32,
        t: u32,
        h: u32,
        d: u32,
        to_heads: u32,
        vec: u32,
    }
    // SAFETY: plain-old-data with the kernels' C layouts.
    unsafe impl DeviceRepr for HeadsParams {}
    // SAFETY: as above.
    unsafe impl DeviceRepr for NormParams {}
    // SAFETY: as above.
    unsafe impl DeviceRepr for RopeParams {}
    // SAFETY: as above.
    unsafe impl DeviceRepr for SwigluParams {}

    /// A contiguous input of a kernel: storage, layout, and its name for errors.
    type Input<'a> = (&'a CudaStorage, &'a Layout, &'a str);

    /// Elements per 16-byte access of `dtype` (`Pack<T>::N` in the kernels).
    fn pack(dtype: DType) -> usize {
        16 / dtype.size_in_bytes()
    }

    /// Threads per block for a grid-stride loop over `items`, and the number of blocks: enough to
    /// fill the GPU several times over, the loop covers the rest.
    fn grid(items: usize) -> LaunchConfig {
        let blocks = items.div_ceil(256).clamp(1, 65_535) as u32;
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
    }

    /// Launches `<entry>_<dtype>(params, inputs.., out)` with a fresh output of `out_len`
    /// elements of the first input's dtype (every input has that dtype).
    fn launch<P: DeviceRepr>(
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
            entry: &str,
            cfg: LaunchConfig,
            params: P,
            inputs: &[Input<'_>],
            out_len: usize,
        ) -> Result<CudaStorage> {
            let dev = inputs[0].0.device().clone();
            let func = Kernel::Fused.func(&dev, &format!("{entry}_{}", dtype_suffix(inputs[0].0.dtype())?))?;
            let views =
                inputs.iter().map(|(s, l, what)| contiguous_view::<T>(s, l, what)).collect::<Result<Vec<_>>>()?;
            // SAFETY: the kernel writes all out_len elements.
            let out = unsafe { dev.alloc::<T>(out_len)? };
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&func);
            b.arg(&params);
            for v in &views {
                b.arg(v);
            }
            b.arg(&out);
            // SAFETY: the argument list matches `<entry>_<dtype>` in kernels/fused.cu (checked by
            // the GPU tests).
            unsafe { b.launch(cfg) }.w()?;
            Ok(T::wrap_cuda_slice(out, dev))
        }
        match dtype {
            DType::F32 => go::<f32, P>(entry, cfg, params, inputs, out_len),
            DType::BF16 => go::<half::bf16, P>(entry, cfg, params, inputs, out_len),
            DType::F16 => go::<half::f16, P>(entry, cfg, params, inputs, out_len),
            other => candle_core::bail!("{entry}: no CUDA kernel for {other:?}"),
        }
    }

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
        launch(entry, cfg, params, inputs, n)
    }

    /// `heads` on x: rows of `d` between `[b, t, h, d]` and `[b, h, t, d]`.
    pub(super) fn heads(
        inputs: &[Input<'_>],
        b: usize,
        t: usize,
        h: usize,
        d: usize,
        to_heads: bool,
    ) -> Result<CudaStorage> {
        let n = inputs[0].1.shape().elem_count();
        let dtype = inputs[0].0.dtype();
        let vec = d.is_multiple_of(pack(dtype));
        let items = n / if vec { pack(dtype) } else { 1 };
        let u32_of = |v: usize| u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("heads: {v} too large")));
        let params = HeadsParams {
            b: u32_of(b)?,
            t: u32_of(t)?,
            h: u32_of(h)?,
            d: u32_of(d)?,
            to_heads: to_heads as u32,
            vec: vec as u32,
        };
        launch("heads", grid(items), params, inputs, n)
    }

    /// `rope` on (x, cos, sin), cos/sin `[t, d]`.
    pub(super) fn rope(inputs: &[Input<'_>], t: usize, d: usize, transpose: bool) -> Result<CudaStorage> {
        let n = inputs[0].1.shape().elem_count();
        let dtype = inputs[0].0.dtype();
        let vec = (d / 2).is_multiple_of(pack(dtype));
        let items = n / 2 / if vec { pack(dtype) } else { 1 };
        let params =
            RopeParams { rows: (n / d) as u64, t: t as u32, d: d as u32, vec: vec as u32, transpose: transpose as u32 };
        launch("rope", grid(items), params, inputs, n)
    }

    /// `swiglu_fwd` (gate, up) → y, or `swiglu_bwd` (gate, up, g) → [d_gate; d_up] (`outputs` 2).
    pub(super) fn swiglu(inputs: &[Input<'_>], entry: &str, outputs: usize) -> Result<CudaStorage> {
        let n = inputs[0].1.shape().elem_count();
        let vec = n.is_multiple_of(pack(inputs[0].0.dtype()));
        let items = if vec { n / pack(inputs[0].0.dtype()) } else { n };
        launch(entry, grid(items), SwigluParams { n: n as u64, vec: vec as u32, pad: 0 }, inputs, n * outputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::check_grad;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
        (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()
    }

    /// The value of `f(xs)` and the gradients of `sum(f(xs))` in the inputs.
    fn value_and_grads(xs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Result<Tensor>) -> Result<(Tensor, Vec<Tensor>)> {
        let vars = xs.iter().map(Var::from_tensor).collect::<Result<Vec<_>>>()?;
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts)?;
        let grads = y.sum_all()?.backward()?;
        let g = ts.iter().map(|t| grads.get(t).expect("gradient reaches the input").clone()).collect();
        Ok((y, g))
    }

    /// The fused op's CPU reference against the composed op, forward and backward, in f64 (one
    /// random `w` shared by both: the seed is not fixed, so draw it once).
    fn matches_composed(
        xs: &[Tensor],
        fused: &dyn Fn(&[Tensor]) -> Result<Tensor>,
        composed: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<f64> {
        let y = composed(xs)?;
        let w = Tensor::randn(0f64, 1.0, y.shape(), y.device())?;
        let run = |f: &dyn Fn(&[Tensor]) -> Result<Tensor>| -> Result<(Tensor, Vec<Tensor>)> {
            value_and_grads(xs, &|ts| f(ts)?.mul(&w))
        };
        let ((yf, gf), (yc, gc)) = (run(fused)?, run(composed)?);
        let mut worst = max_diff(&yf, &yc)?;
        for (a, b) in gf.iter().zip(&gc) {
            worst = worst.max(max_diff(a, b)?);
        }
        Ok(worst)
    }

    #[test]
    fn reference_ops_match_the_composed_ops() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f64, 1.0, (2, 3, 10), &dev)?;
        let w = Tensor::randn(0f64, 1.0, 10, &dev)?;
        let err = matches_composed(&[x], &|t| rms_norm(&t[0], &w, 1e-5), &|t| {
            crate::ops::norm::rms_norm_composed(&t[0], &w, 1e-5)
        })?;
        assert!(err < 1e-12, "rms_norm {err}");

        let x = Tensor::randn(0f64, 1.0, (2, 3, 4, 6), &dev)?;
        let cos = Tensor::randn(0f64, 1.0, (4, 6), &dev)?;
        let sin = Tensor::randn(0f64, 1.0, (4, 6), &dev)?;
        let err =
            matches_composed(&[x], &|t| rope(&t[0], &cos, &sin), &|t| crate::ops::rope_composed(&t[0], &cos, &sin))?;
        assert!(err < 1e-12, "rope {err}");

        let (a, u) = (Tensor::randn(0f64, 2.0, (3, 7), &dev)?, Tensor::randn(0f64, 1.0, (3, 7), &dev)?);
        let err = matches_composed(&[a, u], &|t| swiglu(&t[0], &t[1]), &|t| t[0].silu()?.mul(&t[1]))?;
        assert!(err < 1e-12, "swiglu {err}");
        Ok(())
    }

    #[test]
    fn reference_ops_match_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f64, 1.0, 6, &dev)?;
        assert!(check_grad(&[2, 3, 6], &|x| rms_norm(x, &w, 1e-5))? < 1e-6);
        // random (not half-duplicated) tables, so both halves' indices are exercised
        let cos = Tensor::randn(0f64, 1.0, (4, 6), &dev)?;
        let sin = Tensor::randn(0f64, 1.0, (4, 6), &dev)?;
        assert!(check_grad(&[2, 3, 4, 6], &|x| rope(x, &cos, &sin))? < 1e-6);
        let up = Tensor::randn(0f64, 1.0, (4, 7), &dev)?;
        assert!(check_grad(&[4, 7], &|g| swiglu(g, &up))? < 1e-6);
        let gate = Tensor::randn(0f64, 2.0, (4, 7), &dev)?;
        assert!(check_grad(&[4, 7], &|u| swiglu(&gate, u))? < 1e-6);
        Ok(())
    }

    /// The cast op's CPU implementation (the kernels' reference) equals candle's cast both ways,
    /// and its gradient is the gradient cast back.
    #[test]
    fn cast_matches_candle() -> Result<()> {
        let x = Tensor::randn(0f32, 3.0, (5, 7), &Device::Cpu)?;
        for to in [DType::BF16, DType::F16] {
            let down = cast(&x, to)?;
            assert_eq!(down.dtype(), to);
            assert_eq!(max_diff(&down, &x.to_dtype(to)?)?, 0.0);
            let up = cast(&down, DType::F32)?;
            assert_eq!(max_diff(&up, &down.to_dtype(DType::F32)?)?, 0.0);
        }
        let v = Var::from_tensor(&x)?;
        let w = Tensor::randn(0f32, 1.0, (5, 7), &Device::Cpu)?.to_dtype(DType::BF16)?;
        let g = cast(v.as_tensor(), DType::BF16)?.mul(&w)?.sum_all()?.backward()?;
        let got = g.get(v.as_tensor()).expect("gradient");
        assert_eq!(got.dtype(), DType::F32);
        assert_eq!(max_diff(got, &w.to_dtype(DType::F32)?)?, 0.0);
        Ok(())
    }

    /// The CPU implementation of the head permutation (the kernel's reference) against
    /// reshape/transpose, both ways, and its gradient (the inverse permutation).
    #[test]
    fn permute_heads_is_the_transpose() -> Result<()> {
        let (b, t, h, d) = (2, 3, 4, 6);
        let x = Tensor::randn(0f64, 1.0, (b, t, h * d), &Device::Cpu)?;
        let want = x.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous()?;
        let got = permute_heads(&x, b, t, h, d, true)?;
        assert_eq!(max_diff(&got, &want)?, 0.0);
        let back = permute_heads(&got, b, t, h, d, false)?;
        assert_eq!(max_diff(&back, &x)?, 0.0);
        let w = Tensor::randn(0f64, 1.0, (b, h, t, d), &Device::Cpu)?;
        let (_, g) = value_and_grads(std::slice::from_ref(&x), &|xs| permute_heads(&xs[0], b, t, h, d, true)?.mul(&w))?;
        let (_, g_ref) = value_and_grads(&[x], &|xs| xs[0].reshape((b, t, h, d))?.transpose(1, 2)?.mul(&w))?;
        assert_eq!(max_diff(&g[0], &g_ref[0])?, 0.0);
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
}
