//! B-LoRA's training quantizer as two ops with their own passes, for CPU and CUDA tensors: the
//! Bayesian Bits gated residual sum (van Baalen et al. 2020, arXiv 2005.07093; `specs/blora.md`
//! "Gates"; the ladder is spelled out in `adapters::blora::quantizer`) and the running range it
//! quantizes to.
//!
//! - [`gated_quantize`]: `q = x₂ + z₄(ε₄ + z₈(ε₈ + z₁₆(ε₁₆ + z₃₂ ε₃₂)))` of `clip(x)` in one pass.
//!   Its backward recomputes the ladder (only x is kept) and gives `dL/dx = g·∂clip/∂x`
//!   (straight through the rounding) and `dL/dz_b = Σ g·∂q/∂z_b`, summed in f64 over fixed
//!   chunks (CPU) or blocks (CUDA) whose partial sums are added in a fixed order: the result
//!   does not depend on the thread count or the scheduling.
//! - [`update_range`]: the running range widened by x's extremes and the grid's [`PARAMS`]
//!   derived from it, on x's device (a training step reads nothing back).
//!
//! Composed from candle ops, one quantizer cost ~50 full-size kernels forward (clip, five levels
//! of scale/round/clamp/scale/subtract, the nested gated sum, the straight-through term), as many
//! backward, five level tensors kept for the backward, and ~35 small ops for the range. Here each
//! direction is one pass over x (CUDA: `kernels/quantize.cu`, one launch each; the backward's last
//! block adds the per-block sums).
//!
//! Every float op is the one the composed path does, in its order: `max`/`min` as candle's CPU
//! backend (`a < b ? b : a`, so a NaN propagates), round half away from zero, no fused
//! multiply-add. So the forward equals the composed ops to the bit on the CPU (unit tests below),
//! and the CUDA kernels equal the CPU to the bit (`tests/cuda_fused.rs`).
//!
//! ```
//! # use candle_core::{Device, Tensor};
//! # use bayeslora::ops::{gated_quantize, update_range};
//! // Range unset (both 0): widened to ±1.5 by x; s₂ = 3/3 = 1, s₄ = 0.2.
//! let x = Tensor::new(&[0.3f32, -1.5, 0.7], &Device::Cpu)?;
//! let out = update_range(&x, &Tensor::new(&[0f32, 0.], &Device::Cpu)?)?;
//! assert_eq!(out.narrow(0, 0, 2)?.to_vec1::<f32>()?, [-1.5, 1.5]);
//! let params = out.narrow(0, 2, bayeslora::ops::QUANTIZE_PARAMS)?;
//! // 4 bits (z₄ = 1, the rest off): 0.3 → 0 + 0.2·round(1.5) = 0.4.
//! let z = Tensor::new(&[1f32, 0., 0., 0.], &Device::Cpu)?;
//! let q = gated_quantize(&x, &params, &z)?.to_vec1::<f32>()?;
//! assert!((q[0] - 0.4).abs() < 1e-6 && (q[1] + 1.4).abs() < 1e-6);
//! # Ok::<(), candle_core::Error>(())
//! ```
mod range;

pub use range::{update_range, update_ranges};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

/// The grid's parameters, `[14]` in x's dtype: x_min, x_max, the 2-bit code bounds (−1, 1
/// signed; 0, 3 unsigned), s₂, s₄, s₈, s₁₆, s₃₂, then 1/s₂ … 1/s₃₂ (f64 arithmetic, then x's
/// dtype).
pub const PARAMS: usize = 14;

/// The grid divisors: s_b = (x_max − x_min)/D_b with D = 3, 15, 255, 65535, 2³² − 1
/// (s₄ = s₂/5, s₈ = s₄/17, …), one IEEE division each, so the device's steps (training) and the
/// host's (test time, exports) are the same floats.
pub(crate) const DIVISORS: [f64; 5] = [3.0, 15.0, 255.0, 65535.0, 4_294_967_295.0];

/// Residual level codes are within ±2^{b/2 − 1}: (x − lower sum)/s_b ∈ [−(s_{b/2}/s_b)/2, …].
pub(crate) const RESIDUAL_BOUND: [f32; 4] = [2.0, 8.0, 128.0, 32768.0];

/// Elements per parallel task of the CPU passes, and per partial sum of dL/dz: fixed, so the
/// sums do not depend on the thread count.
pub(super) const CHUNK: usize = 1 << 14;

/// Whether [`gated_quantize`] and [`update_range`] run on `x` (f32/f64 on the CPU or CUDA).
pub(crate) fn applies(x: &Tensor) -> bool {
    (x.device().is_cpu() || x.device().is_cuda()) && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// The training quantizer: the gated residual sum of `x` under `params` ([`PARAMS`], x's dtype)
/// and gates `z: [4]` (4-, 8-, 16-, 32-bit, each in [0, 1], cast to x's dtype), differentiable
/// in z and straight-through in x (gradient 1 inside the range, ½ on a bound, 0 outside; none
/// computed when x needs none, e.g. the frozen base weight). Shape and dtype of `x` are kept;
/// `params` gets no gradient.
pub fn gated_quantize(x: &Tensor, params: &Tensor, z: &Tensor) -> Result<Tensor> {
    if z.dims() != [4] {
        candle_core::bail!("gated_quantize: z must be [4], got {:?}", z.dims());
    }
    gated_quantize_at(x, params, z, 0, None)
}

/// [`gated_quantize`] with the gates `gates[offset..offset + 4]` of a longer vector `gates`
/// (a B-LoRA layer's bit-gate samples, every quantizer's side by side): the gradient goes to the
/// whole vector (zero outside the window), written by the backward pass itself, so a layer's
/// samples are one tensor with no narrow (whose backward is a zero-fill, a cat and an add) in
/// the autograd graph. With `grads` (the samples' [`super::GateGrads`]) the backward hands the
/// four dz over to it instead of returning them, unless it is the first of the backward pass.
pub fn gated_quantize_at(
    x: &Tensor,
    params: &Tensor,
    gates: &Tensor,
    offset: usize,
    grads: Option<&super::GateGrads>,
) -> Result<Tensor> {
    if params.dims() != [PARAMS] || gates.rank() != 1 || offset + 4 > gates.elem_count() {
        candle_core::bail!(
            "gated_quantize: params must be [{PARAMS}] and the gates 4 values at {offset} of a vector, got {:?} and {:?}",
            params.dims(),
            gates.dims()
        );
    }
    // Handed-over gradients must be of the samples' own dtype (no cast between).
    let grads = grads.filter(|_| gates.dtype() == x.dtype()).cloned();
    let params = params.to_dtype(x.dtype())?.contiguous()?;
    let z = gates.to_dtype(x.dtype())?.contiguous()?;
    x.contiguous()?.apply_op3(&params, &z, QuantizeOp { offset, grads })
}

/// The float types of the CPU passes. Every helper is branch-free (comparisons become selects),
/// so the per-element loops below vectorize.
pub(crate) trait LadderFloat:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Mul<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Add<Output = Self>
    + std::ops::Neg<Output = Self>
{
    const ZERO: Self;
    const ONE: Self;
    const HALF: Self;
    /// Round half away from zero, equal to `f32::round`/`f64::round` (libm calls on x86-64,
    /// which took a third of the quantizer's time and keep the loops scalar).
    fn round_away(self) -> Self;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
    fn is_finite(self) -> bool;
    /// candle's CPU `maximum`: the left value unless the right one is larger (a NaN on the left
    /// stays).
    #[inline(always)]
    fn max_c(self, o: Self) -> Self {
        if self < o {
            o
        } else {
            self
        }
    }
    /// candle's CPU `minimum`.
    #[inline(always)]
    fn min_c(self, o: Self) -> Self {
        if self > o {
            o
        } else {
            self
        }
    }
}

/// Round half away from zero through round-half-even of |v| + 2^p: exact for |v| < 2^p (the
/// sum's unit is 1, so the add rounds |v| to an integer, ties to even, and the subtraction is
/// exact); an even tie that went down is moved up. At and above 2^p every float is an integer,
/// and NaN/∞ fall through unchanged.
macro_rules! round_away {
    ($v:expr, $big:expr) => {{
        let v = $v;
        let a = v.abs();
        let t = (a + $big) - $big;
        let t = t + if a - t == 0.5 { 1.0 } else { 0.0 };
        if a < $big {
            t.copysign(v)
        } else {
            v
        }
    }};
}

macro_rules! ladder_float {
    ($t:ty, $big:expr) => {
        impl LadderFloat for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const HALF: Self = 0.5;
            #[inline(always)]
            fn round_away(self) -> Self {
                round_away!(self, $big)
            }
            #[inline(always)]
            fn from_f32(v: f32) -> Self {
                v as $t
            }
            #[inline(always)]
            fn to_f32(self) -> f32 {
                self as f32
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
        }
    };
}
ladder_float!(f32, 8_388_608f32);
ladder_float!(f64, 4_503_599_627_370_496f64);

/// One value's ladder `[x₂, ε₄, ε₈, ε₁₆, ε₃₂]` under [`PARAMS`] `p`, op for op as the composed
/// path (max then min, ×1/s, round, clamp, ×s, subtract).
#[inline(always)]
pub(crate) fn levels_of<T: LadderFloat>(v: T, p: &[T; PARAMS]) -> [T; 5] {
    let xc = v.max_c(p[0]).min_c(p[1]);
    let x2 = (xc * p[9]).round_away().max_c(p[2]).min_c(p[3]) * p[4];
    let mut levels = [x2; 5];
    let mut rest = xc - x2;
    for (i, &k) in RESIDUAL_BOUND.iter().enumerate() {
        let e = (rest * p[10 + i]).round_away().max_c(T::from_f32(-k)).min_c(T::from_f32(k)) * p[5 + i];
        rest = rest - e;
        levels[i + 1] = e;
    }
    levels
}

/// The nested sums of one value's ladder under gates z: `a₃ = ε₁₆ + ε₃₂z₃₂`, `a₂ = ε₈ + a₃z₁₆`,
/// `a₁ = ε₄ + a₂z₈` (each product in the composed path's order), and q = x₂ + a₁z₄.
#[inline(always)]
fn nested<T: LadderFloat>(l: &[T; 5], z: &[T; 4]) -> (T, [T; 3]) {
    let a3 = l[3] + l[4] * z[3];
    let a2 = l[2] + a3 * z[2];
    let a1 = l[1] + a2 * z[1];
    (l[0] + a1 * z[0], [a1, a2, a3])
}

/// Straight-through factor of the clip: candle's max/min backward (1 inside, ½ at a bound, 0
/// out; the product of the two is exact in T).
#[inline(always)]
fn clip_factor<T: LadderFloat>(v: T, lo: T, hi: T) -> T {
    let side = |inside: bool, tie: bool| {
        if inside {
            T::ONE
        } else if tie {
            T::HALF
        } else {
            T::ZERO
        }
    };
    side(v > lo, v == lo) * side(v < hi, v == hi)
}

/// [`PARAMS`] and the gates as arrays (no bounds checks in the loops).
fn split_params<T: LadderFloat>(p: &[T], z: &[T]) -> Result<([T; PARAMS], [T; 4])> {
    match (p.try_into(), z.try_into()) {
        (Ok(p), Ok(z)) => Ok((p, z)),
        _ => candle_core::bail!("gated_quantize: params must be [{PARAMS}] and z [4], got {} and {}", p.len(), z.len()),
    }
}

fn quantize_cpu<T: LadderFloat>(x: &[T], p: &[T], z: &[T]) -> Result<Vec<T>> {
    let (p, z) = split_params(p, z)?;
    let mut y = vec![T::ZERO; x.len()];
    y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| {
        for (y, &v) in y.iter_mut().zip(x) {
            *y = nested(&levels_of(v, &p), &z).0;
        }
    });
    Ok(y)
}

/// Independent f64 accumulators per gate in [`grad_chunk`] (added in a fixed order at the end),
/// and the block whose ladders it computes before accumulating them: both loops vectorize.
const LANES: usize = 8;
const BLOCK: usize = 64;

/// One chunk's `Σ g·∂q/∂z_b` in f64, writing `dx` (g·∂clip/∂x) when `DX`.
fn grad_chunk<T: LadderFloat, const DX: bool>(x: &[T], g: &[T], p: &[T; PARAMS], z: &[T; 4], dx: &mut [T]) -> [f64; 4] {
    let (z0, z1, z2) = (z[0].to_f64(), z[1].to_f64(), z[2].to_f64());
    let w = [1.0, z0, z0 * z1, z0 * z1 * z2];
    let mut acc = [[0f64; LANES]; 4];
    // ∂q/∂z_b / (z₄…z_{b/2}) = [a₁, a₂, a₃, ε₃₂] of each value of the block.
    let mut t = [[T::ZERO; BLOCK]; 4];
    for (start, (xs, gs)) in x.chunks(BLOCK).zip(g.chunks(BLOCK)).enumerate().map(|(b, c)| (b * BLOCK, c)) {
        let len = xs.len();
        let [t0, t1, t2, t3] = &mut t;
        let (t0, t1, t2, t3) = (&mut t0[..len], &mut t1[..len], &mut t2[..len], &mut t3[..len]);
        for j in 0..len {
            let l = levels_of(xs[j], p);
            let (_, [a1, a2, a3]) = nested(&l, z);
            (t0[j], t1[j], t2[j], t3[j]) = (a1, a2, a3, l[4]);
        }
        if DX {
            for ((d, &v), &gj) in dx[start..start + len].iter_mut().zip(xs).zip(gs) {
                *d = gj * clip_factor(v, p[0], p[1]);
            }
        }
        for (k, (acc, t)) in acc.iter_mut().zip(&t).enumerate() {
            for (gs, ts) in gs.chunks(LANES).zip(t[..len].chunks(LANES)) {
                for (a, (&gj, &tj)) in acc.iter_mut().zip(gs.iter().zip(ts)) {
                    *a += gj.to_f64() * w[k] * tj.to_f64();
                }
            }
        }
    }
    acc.map(|lanes| lanes.iter().sum())
}

/// `[dL/dx (n values, when `want_dx`), dL/d gates (`gates` values: dL/dz at `at`, zeros
/// around)]` for upstream gradient `g`.
fn quantize_grad_cpu<T: LadderFloat>(
    x: &[T],
    p: &[T],
    z: &[T],
    g: &[T],
    want_dx: bool,
    (gates, at): (usize, usize),
) -> Result<Vec<T>> {
    let (p, z) = split_params(p, z)?;
    let n_dx = if want_dx { x.len() } else { 0 };
    let mut out = vec![T::ZERO; n_dx + gates];
    let (dx, dz) = out.split_at_mut(n_dx);
    let dz = &mut dz[at..at + 4];
    let chunks = x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK));
    let partials: Vec<[f64; 4]> = if want_dx {
        dx.par_chunks_mut(CHUNK).zip(chunks).map(|(dx, (x, g))| grad_chunk::<T, true>(x, g, &p, &z, dx)).collect()
    } else {
        chunks.map(|(x, g)| grad_chunk::<T, false>(x, g, &p, &z, &mut [])).collect()
    };
    let mut sum = [0f64; 4];
    for part in &partials {
        for (s, v) in sum.iter_mut().zip(part) {
            *s += v;
        }
    }
    for (d, s) in dz.iter_mut().zip(sum) {
        *d = T::from_f64(s);
    }
    Ok(out)
}

/// The contiguous elements of a CPU input.
pub(super) fn slice<'a, T>(op: &str, data: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    let Some((a, b)) = layout.contiguous_offsets() else { candle_core::bail!("{op}: inputs must be contiguous") };
    Ok(&data[a..b])
}

/// Runs `f32_fn` or `f64_fn` on contiguous CPU inputs of one float dtype (also `ops::gate_scale`'s).
pub(crate) fn on_cpu<const N: usize>(
    op: &str,
    inputs: [(&CpuStorage, &Layout); N],
    f32_fn: impl Fn([&[f32]; N]) -> Result<Vec<f32>>,
    f64_fn: impl Fn([&[f64]; N]) -> Result<Vec<f64>>,
) -> Result<CpuStorage> {
    fn f32s(s: &CpuStorage) -> Option<&[f32]> {
        if let CpuStorage::F32(v) = s {
            Some(v)
        } else {
            None
        }
    }
    fn f64s(s: &CpuStorage) -> Option<&[f64]> {
        if let CpuStorage::F64(v) = s {
            Some(v)
        } else {
            None
        }
    }
    /// Every input's contiguous data as `T`, or `None` if one is of another dtype.
    fn all<'a, T, const N: usize>(
        op: &str,
        inputs: [(&'a CpuStorage, &Layout); N],
        pick: fn(&CpuStorage) -> Option<&[T]>,
    ) -> Result<Option<[&'a [T]; N]>> {
        let mut out: [&[T]; N] = [&[]; N];
        for (o, (s, l)) in out.iter_mut().zip(inputs) {
            match pick(s) {
                Some(data) => *o = slice(op, data, l)?,
                None => return Ok(None),
            }
        }
        Ok(Some(out))
    }
    if let Some(xs) = all(op, inputs, f32s)? {
        return Ok(CpuStorage::F32(f32_fn(xs)?));
    }
    if let Some(xs) = all(op, inputs, f64s)? {
        return Ok(CpuStorage::F64(f64_fn(xs)?));
    }
    candle_core::bail!("{op}: f32 or f64 inputs of one dtype")
}

/// [`gated_quantize_at`]'s forward: inputs x, params, the gates (z at `offset`).
struct QuantizeOp {
    offset: usize,
    grads: Option<super::GateGrads>,
}

/// [`QuantizeOp`]'s backward: inputs x and the upstream gradient, with the forward's params and
/// z held by the op (read in place: no `cat` of the two, which cost a launch per input on CUDA);
/// output `[dL/dx (when want_dx), dL/d gates (`dz.0` values, dL/dz at `dz.1`, zeros around)]`.
struct QuantizeGradOp {
    want_dx: bool,
    params: Tensor,
    z: Tensor,
    /// Where the op's four gates sit in `z`.
    offset: usize,
    dz: (usize, usize),
}

impl QuantizeGradOp {
    /// The pass's output: dL/dx (when wanted) then the gate sums.
    fn out_shape(&self, xl: &Layout) -> Shape {
        let n_dx = if self.want_dx { xl.shape().elem_count() } else { 0 };
        Shape::from(n_dx + self.dz.0)
    }
}

impl CustomOp3 for QuantizeOp {
    fn name(&self) -> &'static str {
        "blora-quantize"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
        zs: &CpuStorage,
        zl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let zl = &zl.narrow(0, self.offset, 4)?;
        let out = on_cpu(
            self.name(),
            [(xs, xl), (ps, pl), (zs, zl)],
            |[x, p, z]| quantize_cpu(x, p, z),
            |[x, p, z]| quantize_cpu(x, p, z),
        )?;
        Ok((out, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ps: &candle_core::CudaStorage,
        pl: &Layout,
        zs: &candle_core::CudaStorage,
        zl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let zl = &zl.narrow(0, self.offset, 4)?;
        Ok((cuda::quantize_fwd((xs, xl), (ps, pl), (zs, zl))?, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        z: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let want_dx = x.track_op();
        // The whole gates' gradient to autograd, or the four dz handed over.
        let returned = super::GateGrads::returns(self.grads.as_ref())?;
        let dz = if returned { (z.elem_count(), self.offset) } else { (4, 0) };
        let op = QuantizeGradOp { want_dx, params: params.clone(), z: z.clone(), offset: self.offset, dz };
        let out = x.apply_op2_no_bwd(&grad.contiguous()?, &op)?;
        let n = if want_dx { x.elem_count() } else { 0 };
        let dx = if want_dx { Some(out.narrow(0, 0, n)?.reshape(x.shape())?) } else { None };
        let dz = out.narrow(0, n, dz.0)?;
        Ok((dx, None, super::GateGrads::route(self.grads.as_ref(), returned, self.offset, dz)?))
    }
}

impl CustomOp2 for QuantizeGradOp {
    fn name(&self) -> &'static str {
        "blora-quantize-grad"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let want = self.want_dx;
        let (ps, pl) = self.params.storage_and_layout();
        let (zs, zl) = self.z.storage_and_layout();
        let (Storage::Cpu(ps), Storage::Cpu(zs)) = (&*ps, &*zs) else {
            candle_core::bail!("{}: params and z must be on the CPU like x", self.name())
        };
        let dz = self.dz;
        let zl = &zl.narrow(0, self.offset, 4)?;
        let out = on_cpu(
            self.name(),
            [(xs, xl), (ps, pl), (zs, zl), (gs, gl)],
            |[x, p, z, g]| quantize_grad_cpu(x, p, z, g, want, dz),
            |[x, p, z, g]| quantize_grad_cpu(x, p, z, g, want, dz),
        )?;
        Ok((out, self.out_shape(xl)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (ps, pl) = self.params.storage_and_layout();
        let (zs, zl) = self.z.storage_and_layout();
        let (Storage::Cuda(ps), Storage::Cuda(zs)) = (&*ps, &*zs) else {
            candle_core::bail!("{}: params and z must be on x's CUDA device", self.name())
        };
        let dz = self.dz;
        let zl = &zl.narrow(0, self.offset, 4)?;
        let out = cuda::quantize_bwd((xs, xl), (ps, pl), (zs, zl), (gs, gl), self.want_dx, dz)?;
        Ok((out, self.out_shape(xl)))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::super::cuda::{contiguous_view, dtype_suffix, Kernel};
    use super::PARAMS;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, DType, Layout, Result};

    /// `QuantizeParams` in `kernels/quantize.cu`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    struct QuantizeParams {
        n: u64,
        want_dx: u32,
        pad: u32,
    }
    // SAFETY: plain-old-data with the kernel's C layout.
    unsafe impl DeviceRepr for QuantizeParams {}

    /// `THREADS` in the kernels: the reductions assume exactly this many threads per block.
    const THREADS: u32 = 256;
    /// Blocks of the elementwise passes: enough to fill an H100/H200 several times over (132
    /// SMs), grid-stride loops cover the rest; fixed for a given n, so the sums are too.
    const MAX_BLOCKS: usize = 1024;

    pub(super) type Input<'a> = (&'a CudaStorage, &'a Layout);

    pub(super) fn blocks(n: usize) -> u32 {
        n.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS) as u32
    }

    pub(super) fn cfg(blocks: u32) -> LaunchConfig {
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
    }

    fn check_dtypes(entry: &str, inputs: &[(Input<'_>, &str)]) -> Result<DType> {
        let dtype = inputs[0].0 .0.dtype();
        if !matches!(dtype, DType::F32 | DType::F64) {
            candle_core::bail!("{entry}: no CUDA kernel for {dtype:?}");
        }
        if let Some((_, what)) = inputs.iter().find(|((s, _), _)| s.dtype() != dtype) {
            candle_core::bail!("{entry}: {what} is not {dtype:?} like the input");
        }
        Ok(dtype)
    }

    /// `quantize_fwd_<dtype>(params, x, prm, z, y)`.
    pub(super) fn quantize_fwd(x: Input<'_>, p: Input<'_>, z: Input<'_>) -> Result<CudaStorage> {
        fn go<T: CudaDType + DeviceRepr>(x: Input<'_>, p: Input<'_>, z: Input<'_>) -> Result<CudaStorage> {
            let n = x.1.shape().elem_count();
            let dev = x.0.device().clone();
            let func = Kernel::Quantize.func(&dev, &format!("quantize_fwd_{}", dtype_suffix(x.0.dtype())?))?;
            let (xv, pv, zv) = (
                contiguous_view::<T>(x.0, x.1, "quantize input")?,
                contiguous_view::<T>(p.0, p.1, "quantize params")?,
                contiguous_view::<T>(z.0, z.1, "quantize gates")?,
            );
            // SAFETY: the kernel writes all n elements.
            let y = unsafe { dev.alloc::<T>(n)? };
            let params = QuantizeParams { n: n as u64, want_dx: 0, pad: 0 };
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&func);
            b.arg(&params);
            b.arg(&xv);
            b.arg(&pv);
            b.arg(&zv);
            b.arg(&y);
            // SAFETY: the argument list matches `quantize_fwd_<dtype>` in kernels/quantize.cu.
            unsafe { b.launch(cfg(blocks(n))) }.w()?;
            Ok(T::wrap_cuda_slice(y, dev))
        }
        let dtype = check_dtypes("quantize_fwd", &[(x, "x"), (p, "params"), (z, "z")])?;
        if p.1.shape().elem_count() != PARAMS || z.1.shape().elem_count() != 4 {
            candle_core::bail!("quantize_fwd: params must be [{PARAMS}] and z [4]");
        }
        match dtype {
            DType::F32 => go::<f32>(x, p, z),
            _ => go::<f64>(x, p, z),
        }
    }

    /// `quantize_bwd_fused_<dtype>` (dx and per-block sums; the last block adds the sums, in one
    /// launch): `[dx (n when want_dx), d gates (dz.0 values: the four dz at dz.1, zeros
    /// around)]`.
    pub(super) fn quantize_bwd(
        x: Input<'_>,
        p: Input<'_>,
        z: Input<'_>,
        g: Input<'_>,
        want_dx: bool,
        dz: (usize, usize),
    ) -> Result<CudaStorage> {
        fn go<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
            x: Input<'_>,
            p: Input<'_>,
            z: Input<'_>,
            g: Input<'_>,
            want_dx: bool,
            (gates, at): (usize, usize),
        ) -> Result<CudaStorage> {
            let n = x.1.shape().elem_count();
            let n_dx = if want_dx { n } else { 0 };
            let dev = x.0.device().clone();
            let suffix = dtype_suffix(x.0.dtype())?;
            let bwd = Kernel::Quantize.func(&dev, &format!("quantize_bwd_fused_{suffix}"))?;
            let xv = contiguous_view::<T>(x.0, x.1, "quantize input")?;
            let pv = contiguous_view::<T>(p.0, p.1, "quantize params")?;
            let zv = contiguous_view::<T>(z.0, z.1, "quantize gates")?;
            let gv = contiguous_view::<T>(g.0, g.1, "quantize gradient")?;
            let nb = blocks(n);
            // SAFETY: the kernel writes every dx element (when want_dx), every partial, and (its
            // last block) the four dz.
            let mut out = unsafe { dev.alloc::<T>(n_dx + gates)? };
            let mut partial = unsafe { dev.alloc::<f64>(4 * nb as usize)? };
            let params = QuantizeParams { n: n as u64, want_dx: want_dx as u32, pad: 0 };
            let stream = dev.cuda_stream();
            if gates > 4 {
                // The other quantizers' gates get zeros (one memset, no kernel).
                stream.memset_zeros(&mut out.slice_mut(n_dx..n_dx + gates)).w()?;
            }
            {
                let (mut dx, mut rest) = out.split_at_mut(n_dx);
                let mut dzv = rest.slice_mut(at..at + 4);
                let mut b = stream.launch_builder(&bwd);
                b.arg(&params);
                b.arg(&xv);
                b.arg(&pv);
                b.arg(&zv);
                b.arg(&gv);
                b.arg(&mut dx);
                b.arg(&mut partial);
                b.arg(&mut dzv);
                // SAFETY: the argument list matches `quantize_bwd_fused_<dtype>` in
                // kernels/quantize.cu.
                unsafe { b.launch(cfg(nb)) }.w()?;
            }
            Ok(T::wrap_cuda_slice(out, dev))
        }
        let dtype = check_dtypes("quantize_bwd", &[(x, "x"), (p, "params"), (z, "z"), (g, "gradient")])?;
        if p.1.shape().elem_count() != PARAMS || z.1.shape().elem_count() != 4 {
            candle_core::bail!("quantize_bwd: params must be [{PARAMS}] and z [4]");
        }
        match dtype {
            DType::F32 => go::<f32>(x, p, z, g, want_dx, dz),
            _ => go::<f64>(x, p, z, g, want_dx, dz),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn round_away_equals_std_round() {
        let mut f32s: Vec<f32> = vec![
            0.0,
            -0.0,
            0.5,
            -0.5,
            1.5,
            2.5,
            -2.5,
            0.49999997,
            -0.49999997,
            0.50000006,
            8_388_607.5,
            -8_388_607.5,
            8_388_608.0,
            1e30,
            f32::MIN_POSITIVE,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        // Every tie k + ½ up to 2^12 and a spread of bit patterns.
        f32s.extend((0..8192).map(|k| k as f32 * 0.5 - 2048.0));
        f32s.extend((0..200_000u32).map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761))));
        for v in f32s {
            let (got, want) = (v.round_away(), v.round());
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "{v:e}: {got:e} vs {want:e}");
        }
        let mut f64s: Vec<f64> =
            vec![0.5, -0.5, 2.5, 0.49999999999999994, -0.49999999999999994, 4_503_599_627_370_495.5];
        f64s.extend((0..200_000u64).map(|i| f64::from_bits(i.wrapping_mul(0x9E37_79B9_7F4A_7C15))));
        f64s.extend((0..8192).map(|k| k as f64 * 0.5 - 2048.0));
        for v in f64s {
            let (got, want) = (v.round_away(), v.round());
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "{v:e}: {got:e} vs {want:e}");
        }
    }

    /// q(z) is multilinear in z: central differences in f64 are exact up to rounding.
    #[test]
    fn gate_gradient_matches_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f64, 0.7, (13, 5), &dev)?;
        let params = update_range(&x.affine(0.8, 0.0)?, &Tensor::new(&[0f32, 0.], &dev)?)?.narrow(0, 2, PARAMS)?;
        let w = Tensor::randn(0f64, 1.0, (13, 5), &dev)?;
        let z0 = [0.9f64, 0.4, 0.7, 0.2];
        let z = Var::new(&z0, &dev)?;
        let loss = |z: &Tensor| -> Result<Tensor> { gated_quantize(&x, &params, z)?.mul(&w)?.sum_all() };
        let grads = loss(z.as_tensor())?.backward()?;
        let g = grads.get(z.as_tensor()).map(|t| t.to_vec1::<f64>()).transpose()?.unwrap_or_default();
        let eps = 1e-4;
        for i in 0..4 {
            let at = |d: f64| -> Result<f64> {
                let mut zs = z0;
                zs[i] += d;
                loss(&Tensor::new(&zs, &dev)?)?.to_scalar::<f64>()
            };
            let fd = (at(eps)? - at(-eps)?) / (2.0 * eps);
            assert!((fd - g[i]).abs() <= 1e-9 * (1.0 + fd.abs()), "dz[{i}]: fd {fd} vs {}", g[i]);
        }
        Ok(())
    }

    #[test]
    fn chunked_sums_cover_every_element() -> Result<()> {
        // Two chunks and a tail that is no multiple of the lanes: the lane and chunk partial sums
        // add up to the plain one-pass sum, and every dx is written.
        let dev = Device::Cpu;
        let n = 2 * CHUNK + 37;
        let x = Tensor::randn(0f64, 1.0, n, &dev)?;
        let params = update_range(&x.affine(0.7, 0.0)?, &Tensor::new(&[0f32, 0.], &dev)?)?.narrow(0, 2, PARAMS)?;
        let (pv, xs) = (params.to_vec1::<f64>()?, x.to_vec1::<f64>()?);
        let z = [0.3f64, 0.6, 0.5, 0.8];
        let (p, _) = split_params(&pv, &z)?;
        let g: Vec<f64> = (0..n).map(|i| ((i % 7) as f64 - 3.0) * 0.25).collect();
        let chunked = quantize_grad_cpu(&xs, &pv, &z, &g, true, (4, 0))?;
        let mut want = [0f64; 4];
        for (&v, &gj) in xs.iter().zip(&g) {
            let l = levels_of(v, &p);
            let (_, [a1, a2, a3]) = nested(&l, &z);
            let dq = [a1, z[0] * a2, z[0] * z[1] * a3, z[0] * z[1] * z[2] * l[4]];
            for (w, d) in want.iter_mut().zip(dq) {
                *w += gj * d;
            }
        }
        for k in 0..4 {
            let got = chunked[n + k];
            assert!((got - want[k]).abs() <= 1e-12 * (1.0 + want[k].abs()), "dz[{k}] {got} vs {}", want[k]);
        }
        assert_eq!(chunked.len(), n + 4);
        for (i, (&v, &gj)) in xs.iter().zip(&g).enumerate() {
            let inside = if v > p[0] && v < p[1] { 1.0 } else { 0.0 };
            assert_eq!(chunked[i], gj * inside, "dx[{i}]");
        }
        assert_eq!(quantize_grad_cpu(&xs, &pv, &z, &g, false, (4, 0))?, chunked[n..]);
        Ok(())
    }
}
