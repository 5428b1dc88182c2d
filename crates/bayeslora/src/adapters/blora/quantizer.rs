//! Bayesian Bits residual quantizers (van Baalen et al. 2020, arXiv 2005.07093;
//! `reference/blora.md` §1.2): one per quantized tensor, with a range and four nested bit gates.
//!
//! With range [x_lo, x_hi] (symmetric x_lo = −x_hi when the data has negative values, else
//! x_lo = 0): s₂ = (x_hi − x_lo)/3, s₄ = s₂/5, s₈ = s₄/17, s₁₆ = s₈/257, s₃₂ = s₁₆/65537, and
//!
//! ```text
//! x₂ = s₂⌊x/s₂⌉,  ε₄ = s₄⌊(x − x₂)/s₄⌉,  ε₈ = s₈⌊(x − x₂ − ε₄)/s₈⌉, …
//! x_q = x₂ + z₄(ε₄ + z₈(ε₈ + z₁₆(ε₁₆ + z₃₂ ε₃₂)))
//! ```
//!
//! so that x₂ + ε₄ + … + ε_b is x rounded to the b-bit grid s_b·k (signed: |k| ≤ 2^{b−1} − 1,
//! 3/15/255/65535 levels; unsigned: 0 ≤ k ≤ 2^b − 1). ⌊·⌉ rounds half away from zero.
//!
//! Our choices (`specs/blora.md` leaves them open):
//! - **Clipping.** x is clipped to the range and every level's code to its own bounds, so a
//!   learned bit-width is exact (the fork does not clip, so values past the range land on extra
//!   grid points).
//! - **Range.** A running max: each training forward widens the range to cover the tensor, and it
//!   is frozen outside training (eval clips to it). Differs from the reference, which fixes the
//!   range at the first forward: that pins A and B to their N(0, 0.02²) init span, and E, zero at
//!   init (and the activations after it), to nothing. A range stays unset while the tensor is all
//!   zero (E before its first update), and an unset quantizer passes values through.
//! - **Test time.** With deterministic gates the b-bit value is computed directly as
//!   `k·s_b`, `k = clamp(⌊clip(x)/s_b⌉)` (`codes`, `dequantize`): the residual sum's value
//!   in exact arithmetic (except at exact ties between two grid points), and exactly what the compressed export stores, so a reload reproduces the
//!   logits bit for bit.
//! - **32 bits.** s₃₂ ≈ 7·10⁻¹⁰·s₂ is below f32 resolution for most values, so the 32-bit
//!   residual is ≈ the f32 value itself: at test time 32 bits means the clipped f32 value.
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var};

use super::gates;
use crate::{Error, Result};

/// Which tensor of an adapted layer a quantizer sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub enum Slot {
    /// The layer input x (shared by the base and the adapter; `quantize_base`).
    #[serde(rename = "x")]
    Input,
    /// The frozen base weight W0 (`quantize_base`).
    #[serde(rename = "base")]
    Base,
    #[serde(rename = "lora_A")]
    LoraA,
    #[serde(rename = "lora_E")]
    LoraE,
    #[serde(rename = "lora_B")]
    LoraB,
    /// The activation x·Aᵀ, `[N, r]`.
    #[serde(rename = "act_A")]
    ActA,
    /// The activation after E, `[N, r]`.
    #[serde(rename = "act_E")]
    ActE,
    /// The adapter output after B, `[N, out]`.
    #[serde(rename = "act_B")]
    ActB,
}

impl Slot {
    pub const ALL: [Slot; 8] =
        [Slot::Input, Slot::Base, Slot::LoraA, Slot::LoraE, Slot::LoraB, Slot::ActA, Slot::ActE, Slot::ActB];

    /// The name used in state keys (`blora_gates.lora_A.bits`) and reports.
    pub fn name(self) -> &'static str {
        match self {
            Slot::Input => "x",
            Slot::Base => "base",
            Slot::LoraA => "lora_A",
            Slot::LoraE => "lora_E",
            Slot::LoraB => "lora_B",
            Slot::ActA => "act_A",
            Slot::ActE => "act_E",
            Slot::ActB => "act_B",
        }
    }

    pub fn from_name(name: &str) -> Option<Slot> {
        Slot::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Weights (fixed per forward) versus activations (data-dependent).
    pub fn is_weight(self) -> bool {
        matches!(self, Slot::Base | Slot::LoraA | Slot::LoraE | Slot::LoraB)
    }
}

/// A quantization range; unset (both 0) until the tensor was seen non-zero.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Range {
    pub x_min: f32,
    pub x_max: f32,
}

impl Range {
    pub fn is_set(&self) -> bool {
        self.x_max > self.x_min && self.x_min.is_finite() && self.x_max.is_finite()
    }

    /// Symmetric (x_min = −x_max) when the data had negative values.
    pub fn signed(&self) -> bool {
        self.x_min < 0.0
    }

    /// The range widened to cover data with extremes `lo ≤ hi` (non-finite data is ignored).
    pub fn widen(self, lo: f32, hi: f32) -> Range {
        if !(lo.is_finite() && hi.is_finite()) {
            return self;
        }
        if self.signed() || lo < 0.0 {
            let m = self.x_max.max(-self.x_min).max(hi).max(-lo);
            Range { x_min: -m, x_max: m }
        } else {
            Range { x_min: 0.0, x_max: self.x_max.max(hi) }
        }
    }

    /// s₂, s₄, s₈, s₁₆, s₃₂ in f64: (x_max − x_min)/[`DIVISORS`].
    pub fn steps(&self) -> [f64; 5] {
        let width = f64::from(self.x_max) - f64::from(self.x_min);
        DIVISORS.map(|d| width / d)
    }

    /// The grid step of the b-bit grid (b ∈ {2, 4, 8, 16, 32}).
    pub fn step(&self, bits: u32) -> f64 {
        self.steps()[level(bits)]
    }

    /// The code bounds of the b-bit grid: signed ±(2^{b−1} − 1), unsigned [0, 2^b − 1].
    pub fn code_bounds(&self, bits: u32) -> (f64, f64) {
        let b = f64::from(bits.min(32));
        if self.signed() {
            let k = 2f64.powf(b - 1.0) - 1.0;
            (-k, k)
        } else {
            (0.0, 2f64.powf(b) - 1.0)
        }
    }
}

/// The grid divisors: s_b = (x_max − x_min)/D_b with D = 3, 15, 255, 65535, 2³² − 1
/// (s₄ = s₂/5, s₈ = s₄/17, …), one IEEE division each, so the device's steps (training) and the
/// host's (test time, exports) are the same floats.
const DIVISORS: [f64; 5] = [3.0, 15.0, 255.0, 65535.0, 4_294_967_295.0];

/// 2 → 0, 4 → 1, 8 → 2, 16 → 3, 32 → 4.
fn level(bits: u32) -> usize {
    match bits {
        0..=2 => 0,
        3..=4 => 1,
        5..=8 => 2,
        9..=16 => 3,
        _ => 4,
    }
}

/// Residual level codes are within ±2^{b/2 − 1}: (x − lower sum)/s_b ∈ [−(s_{b/2}/s_b)/2, …].
const RESIDUAL_BOUND: [f32; 4] = [2.0, 8.0, 128.0, 32768.0];

/// The ladder's parameters, `[14]`: x_min, x_max, the 2-bit code bounds (−1, 1 signed; 0, 3
/// unsigned), s₂…s₃₂, 1/s₂…1/s₃₂; f64 arithmetic, then x's dtype. Built from a host [`Range`]
/// here and from a [`DeviceRange`] on the device, to the same floats.
const PARAMS: usize = 14;

impl Range {
    /// [`PARAMS`] of this range as a tensor of `dtype` on `device` (the tests' reference for
    /// [`DeviceRange::params`]).
    #[cfg(test)]
    pub(crate) fn params(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let s = self.steps();
        let (lo2, hi2) = if self.signed() { (-1.0, 1.0) } else { (0.0, 3.0) };
        let mut v = vec![f64::from(self.x_min), f64::from(self.x_max), lo2, hi2];
        v.extend(s);
        v.extend(s.map(|x| 1.0 / x));
        Ok(Tensor::from_vec(v, PARAMS, device)?.to_dtype(dtype)?)
    }
}

/// A range held on the device as two detached `[1]` f32 scalars: the training forward widens it
/// and derives the ladder's parameters there, so a step never waits on a device→host read.
#[derive(Debug, Clone)]
struct DeviceRange {
    x_min: Tensor,
    x_max: Tensor,
}

impl DeviceRange {
    fn new(r: &Range, device: &Device) -> Result<Self> {
        Ok(DeviceRange { x_min: Tensor::new(&[r.x_min], device)?, x_max: Tensor::new(&[r.x_max], device)? })
    }

    /// One device→host read of both ends.
    fn to_host(&self) -> Result<Range> {
        let v = Tensor::cat(&[&self.x_min, &self.x_max], 0)?.to_vec1::<f32>()?;
        Ok(Range { x_min: v[0], x_max: v[1] })
    }

    /// [`Range::widen`] by `x`'s extremes, on the device: symmetric ±max(|old|, |x|) once a
    /// negative value was seen, else [0, max(old, x)]; non-finite extremes are ignored.
    fn widen(&self, x: &Tensor) -> Result<Self> {
        // Rows first, then the row extremes: a whole-tensor reduction is one CUDA block.
        let d = match x.dims().last() {
            Some(&d) if d > 0 => d,
            _ => 1,
        };
        let rows = x.detach().reshape((x.elem_count() / d, d))?;
        let lo = rows.min_keepdim(1)?.min_all()?.to_dtype(DType::F32)?.reshape(1)?;
        let hi = rows.max_keepdim(1)?.max_all()?.to_dtype(DType::F32)?.reshape(1)?;
        let m = self.x_max.maximum(&self.x_min.neg()?)?.maximum(&hi)?.maximum(&lo.neg()?)?;
        let signed = self.x_min.minimum(&lo)?.lt(0f32)?;
        let x_min = signed.where_cond(&m.neg()?, &m.zeros_like()?)?;
        let finite = hi.sub(&lo)?.abs()?.lt(f32::INFINITY)?;
        Ok(DeviceRange { x_min: finite.where_cond(&x_min, &self.x_min)?, x_max: finite.where_cond(&m, &self.x_max)? })
    }

    /// [`PARAMS`] computed on the device, the same floats as [`Range::params`].
    fn params(&self, dtype: DType) -> Result<Tensor> {
        let dev = self.x_min.device();
        let (lo, hi) = (self.x_min.to_dtype(DType::F64)?, self.x_max.to_dtype(DType::F64)?);
        let s = hi.sub(&lo)?.broadcast_div(&Tensor::new(&DIVISORS, dev)?)?;
        let signed = lo.lt(0f64)?.to_dtype(DType::F64)?;
        let parts = [&lo, &hi, &signed.affine(-1.0, 0.0)?, &signed.affine(-2.0, 3.0)?, &s, &s.recip()?];
        Ok(Tensor::cat(&parts, 0)?.to_dtype(dtype)?)
    }
}

/// The residual ladder `[x₂, ε₄, ε₈, ε₁₆, ε₃₂]` of `clip(x)` (values only, no gradient), each
/// of x's shape, as tensor ops: the path off the CPU fused op ([`QuantizeOp`], whose per-value
/// [`levels_of`] does the same float ops in the same order).
pub(crate) fn ladder(x: &Tensor, params: &Tensor) -> Result<[Tensor; 5]> {
    let stacked = ladder_ops(&x.detach(), params)?;
    let level = |i: usize| -> Result<Tensor> { Ok(stacked.get(i)?) };
    Ok([level(0)?, level(1)?, level(2)?, level(3)?, level(4)?])
}

/// [`ladder`] as tensor ops, stacked `[5, ..]`.
fn ladder_ops(x: &Tensor, params: &Tensor) -> Result<Tensor> {
    let p = |i: usize| params.narrow(0, i, 1);
    let xc = x.broadcast_maximum(&p(0)?)?.broadcast_minimum(&p(1)?)?;
    let x2 = xc
        .broadcast_mul(&p(9)?)?
        .round()?
        .broadcast_maximum(&p(2)?)?
        .broadcast_minimum(&p(3)?)?
        .broadcast_mul(&p(4)?)?;
    let mut rest = xc.sub(&x2)?;
    let mut levels = vec![x2];
    for (i, k) in RESIDUAL_BOUND.iter().enumerate() {
        let e = rest.broadcast_mul(&p(10 + i)?)?.round()?.clamp(-k, *k)?.broadcast_mul(&p(5 + i)?)?;
        rest = rest.sub(&e)?;
        levels.push(e);
    }
    Ok(Tensor::stack(&levels, 0)?)
}

/// The float types the fused CPU ops run on.
trait LadderFloat:
    Copy + PartialOrd + std::ops::Mul<Output = Self> + std::ops::Sub<Output = Self> + std::ops::Add<Output = Self>
{
    fn round(self) -> Self;
    fn from_f32(v: f32) -> Self;
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
    /// candle's `maximum`/`minimum` on the CPU: the left value unless the right one wins.
    fn max_c(self, o: Self) -> Self {
        if self >= o {
            self
        } else {
            o
        }
    }
    fn min_c(self, o: Self) -> Self {
        if self <= o {
            self
        } else {
            o
        }
    }
}

impl LadderFloat for f32 {
    fn round(self) -> Self {
        f32::round(self)
    }
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl LadderFloat for f64 {
    fn round(self) -> Self {
        f64::round(self)
    }
    fn from_f32(v: f32) -> Self {
        f64::from(v)
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
    }
}

/// One value's ladder `[x₂, ε₄, ε₈, ε₁₆, ε₃₂]` under [`PARAMS`] `p`, op for op as
/// [`ladder_ops`] (max then min, ×1/s, round half away from zero, clamp, ×s, subtract).
fn levels_of<T: LadderFloat>(v: T, p: &[T]) -> [T; 5] {
    let xc = v.max_c(p[0]).min_c(p[1]);
    let x2 = (xc * p[9]).round().max_c(p[2]).min_c(p[3]) * p[4];
    let mut levels = [x2; 5];
    let mut rest = xc - x2;
    for (i, &k) in RESIDUAL_BOUND.iter().enumerate() {
        let e = (rest * p[10 + i]).round().max_c(T::from_f32(-k)).min_c(T::from_f32(k)) * p[5 + i];
        rest = rest - e;
        levels[i + 1] = e;
    }
    levels
}

/// The nested sums of one value's ladder under gates z: `a₁ = ε₄ + z₈a₂`, `a₂ = ε₈ + z₁₆a₃`,
/// `a₃ = ε₁₆ + z₃₂ε₃₂` (each product in [`mix`]'s order), and q = x₂ + z₄a₁.
fn nested<T: LadderFloat>(l: &[T; 5], z: &[T]) -> (T, [T; 3]) {
    let a3 = l[3] + l[4] * z[3];
    let a2 = l[2] + a3 * z[2];
    let a1 = l[1] + a2 * z[1];
    (l[0] + a1 * z[0], [a1, a2, a3])
}

/// Straight-through factor of the clip: candle's max/min backward (1 inside, ½ at a bound, 0 out).
fn clip_factor<T: LadderFloat>(v: T, lo: T, hi: T) -> T {
    let side = |inside: bool, tie: bool| {
        if inside {
            1.0
        } else if tie {
            0.5
        } else {
            0.0
        }
    };
    T::from_f64(side(v > lo, v == lo) * side(v < hi, v == hi))
}

fn quantize_cpu<T: LadderFloat>(x: &[T], p: &[T], z: &[T]) -> Vec<T> {
    x.iter().map(|&v| nested(&levels_of(v, p), z).0).collect()
}

/// `[dL/dx (n values), dL/dz (4)]` for upstream gradient `g`.
fn quantize_grad_cpu<T: LadderFloat>(x: &[T], p: &[T], z: &[T], g: &[T]) -> Vec<T> {
    let mut out = Vec::with_capacity(x.len() + 4);
    let mut dz = [0f64; 4];
    let (z0, z1, z2) = (z[0].to_f64(), z[1].to_f64(), z[2].to_f64());
    let weights = [1.0, z0, z0 * z1, z0 * z1 * z2];
    for (&v, &gj) in x.iter().zip(g) {
        let l = levels_of(v, p);
        let (_, [a1, a2, a3]) = nested(&l, z);
        let gd = gj.to_f64();
        for (d, (w, t)) in dz.iter_mut().zip(weights.iter().zip([a1, a2, a3, l[4]])) {
            *d += gd * w * t.to_f64();
        }
        out.push(gj * clip_factor(v, p[0], p[1]));
    }
    out.extend(dz.map(T::from_f64));
    out
}

/// The CPU training quantizer in one pass: forward the gated residual sum (the same float ops in
/// the same order as [`mix`] over [`ladder`]), backward straight-through in x and exact in the
/// gates, recomputing the ladder instead of keeping five copies of x for the backward.
struct QuantizeOp;

/// [`QuantizeOp`]'s backward: inputs x, [`PARAMS`] ++ z (`[18]`), the upstream gradient.
struct QuantizeGradOp;

type Storage3<'a> = [(&'a candle_core::CpuStorage, &'a candle_core::Layout); 3];

/// Runs `f32_fn` or `f64_fn` on three contiguous CPU inputs of one float dtype.
fn on_cpu3(
    op: &str,
    inputs: Storage3<'_>,
    f32_fn: impl Fn([&[f32]; 3]) -> Vec<f32>,
    f64_fn: impl Fn([&[f64]; 3]) -> Vec<f64>,
) -> candle_core::Result<candle_core::CpuStorage> {
    use candle_core::CpuStorage as S;
    fn slices<'a, T>(op: &str, parts: [(&'a [T], &candle_core::Layout); 3]) -> candle_core::Result<[&'a [T]; 3]> {
        let mut out: [&[T]; 3] = [&[], &[], &[]];
        for (o, (data, layout)) in out.iter_mut().zip(parts) {
            let Some((a, b)) = layout.contiguous_offsets() else {
                candle_core::bail!("{op}: inputs must be contiguous")
            };
            *o = &data[a..b];
        }
        Ok(out)
    }
    let [(a, al), (b, bl), (c, cl)] = inputs;
    Ok(match (a, b, c) {
        (S::F32(a), S::F32(b), S::F32(c)) => S::F32(f32_fn(slices(op, [(a, al), (b, bl), (c, cl)])?)),
        (S::F64(a), S::F64(b), S::F64(c)) => S::F64(f64_fn(slices(op, [(a, al), (b, bl), (c, cl)])?)),
        _ => candle_core::bail!("{op}: f32 or f64 inputs of one dtype"),
    })
}

impl candle_core::CustomOp3 for QuantizeOp {
    fn name(&self) -> &'static str {
        "blora-quantize"
    }

    fn cpu_fwd(
        &self,
        xs: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
        ps: &candle_core::CpuStorage,
        pl: &candle_core::Layout,
        zs: &candle_core::CpuStorage,
        zl: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let out = on_cpu3(
            self.name(),
            [(xs, xl), (ps, pl), (zs, zl)],
            |[x, p, z]| quantize_cpu(x, p, z),
            |[x, p, z]| quantize_cpu(x, p, z),
        )?;
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        z: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let pz = Tensor::cat(&[params, z], 0)?;
        let out = x.apply_op3_no_bwd(&pz, &grad.contiguous()?, &QuantizeGradOp)?;
        let n = x.elem_count();
        Ok((Some(out.narrow(0, 0, n)?.reshape(x.shape())?), None, Some(out.narrow(0, n, 4)?)))
    }
}

impl candle_core::CustomOp3 for QuantizeGradOp {
    fn name(&self) -> &'static str {
        "blora-quantize-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
        ps: &candle_core::CpuStorage,
        pl: &candle_core::Layout,
        gs: &candle_core::CpuStorage,
        gl: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let out = on_cpu3(
            self.name(),
            [(xs, xl), (ps, pl), (gs, gl)],
            |[x, p, g]| quantize_grad_cpu(x, &p[..PARAMS], &p[PARAMS..], g),
            |[x, p, g]| quantize_grad_cpu(x, &p[..PARAMS], &p[PARAMS..], g),
        )?;
        Ok((out, candle_core::Shape::from(xl.shape().elem_count() + 4)))
    }
}

/// The gated sum `x₂ + z₄(ε₄ + z₈(ε₈ + z₁₆(ε₁₆ + z₃₂ ε₃₂)))` for gates `z: [4]` of the
/// levels' dtype, differentiable in z.
fn mix(levels: &[Tensor; 5], z: &Tensor) -> Result<Tensor> {
    let mut acc: Option<Tensor> = None;
    for i in (0..4).rev() {
        let inner = match acc {
            Some(a) => levels[i + 1].add(&a)?,
            None => levels[i + 1].clone(),
        };
        acc = Some(inner.broadcast_mul(&z.narrow(0, i, 1)?)?);
    }
    Ok(match acc {
        Some(a) => levels[0].add(&a)?,
        None => levels[0].clone(),
    })
}

/// The training-time quantizer: the gated residual sum of `x` under `params` ([`PARAMS`]) and
/// gates `z: [4]` (4-, 8-, 16-, 32-bit, each in [0, 1]), differentiable in z and straight-through
/// in x (gradient 1 inside the range, 0 outside). Shape and dtype of `x` are kept.
pub(crate) fn quantize_residual(x: &Tensor, params: &Tensor, z: &Tensor) -> Result<Tensor> {
    if is_fused(x) {
        let z = z.to_dtype(x.dtype())?.contiguous()?;
        return Ok(x.contiguous()?.apply_op3(&params.contiguous()?, &z, QuantizeOp)?);
    }
    quantize_residual_ops(x, params, z)
}

/// Whether [`QuantizeOp`] runs `x` (CPU, f32 or f64).
fn is_fused(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// [`quantize_residual`] as tensor ops (every device; the reference of the fused CPU op).
fn quantize_residual_ops(x: &Tensor, params: &Tensor, z: &Tensor) -> Result<Tensor> {
    let q = mix(&ladder(x, params)?, &z.to_dtype(x.dtype())?)?;
    if !x.track_op() {
        return Ok(q);
    }
    let xc = x.broadcast_maximum(&params.narrow(0, 0, 1)?)?.broadcast_minimum(&params.narrow(0, 1, 1)?)?;
    Ok(q.add(&xc.sub(&xc.detach())?)?)
}

/// The integer codes `k = clamp(⌊clip(x)/s_b⌉)` of the b-bit grid (b < 32), as floats of x's
/// dtype (exact: |k| ≤ 65535).
pub(crate) fn codes(x: &Tensor, range: &Range, bits: u32) -> Result<Tensor> {
    let (lo, hi) = range.code_bounds(bits);
    let xc = x.clamp(range.x_min, range.x_max)?;
    Ok(xc.affine(1.0 / range.step(bits), 0.0)?.round()?.clamp(lo as f32, hi as f32)?)
}

/// `k·s_b`: the one place test-time values are made from codes, here and in the compressed
/// loader, so both give the same floats.
pub(crate) fn dequantize(codes: &Tensor, range: &Range, bits: u32) -> Result<Tensor> {
    Ok(codes.affine(range.step(bits), 0.0)?)
}

/// The test-time quantizer at `bits`: `k·s_b`, or the clipped value at 32 bits.
pub(crate) fn quantize_fixed(x: &Tensor, range: &Range, bits: u32) -> Result<Tensor> {
    if bits >= 32 {
        return Ok(x.clamp(range.x_min, range.x_max)?);
    }
    dequantize(&codes(x, range, bits)?, range, bits)
}

/// Elements up to which a frozen base weight's ladder is cached off the CPU (5 f32 copies: 80 MiB
/// at this size); bigger weights, and the CPU's fused op, recompute it every step.
const FROZEN_LADDER_MAX_ELEMS: usize = 1 << 22;

/// One tensor's quantizer: its bit-gate logits (a trainable [`Var`], `[4]`) and its range.
#[derive(Debug)]
pub(crate) struct Quantizer {
    pub slot: Slot,
    /// log α of the 4-, 8-, 16-, 32-bit gates, f32 `[4]`.
    pub logits: Var,
    state: Mutex<RangeState>,
}

/// Where a quantizer's range lives: the host copy (test time, checkpoints) and, while training,
/// the device copy that each forward widens without a device→host read.
#[derive(Debug, Default)]
struct RangeState {
    /// Current unless `device_ahead`.
    host: Range,
    device: Option<DeviceRange>,
    /// The device copy was widened since `host` was last read back.
    device_ahead: bool,
    /// The frozen base weight's ladder: W0 never changes, so neither do its range and levels.
    frozen_ladder: Option<std::sync::Arc<[Tensor; 5]>>,
}

impl Quantizer {
    pub fn new(slot: Slot, init: [f64; 4], device: &Device) -> Result<Self> {
        let v: Vec<f32> = init.iter().map(|&a| a as f32).collect();
        Ok(Quantizer {
            slot,
            logits: Var::from_tensor(&Tensor::from_vec(v, 4, device)?)?,
            state: Mutex::new(RangeState::default()),
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, RangeState>> {
        self.state.lock().map_err(|_| Error::config("blora range", self.slot.name(), "lock poisoned by a panic"))
    }

    /// The current range (one device→host read after training forwards widened it).
    pub fn range(&self) -> Result<Range> {
        let mut st = self.lock()?;
        if st.device_ahead {
            if let Some(d) = &st.device {
                st.host = d.to_host()?;
            }
            st.device_ahead = false;
        }
        Ok(st.host)
    }

    pub fn set_range(&self, range: Range) -> Result<()> {
        *self.lock()? = RangeState { host: range, ..RangeState::default() };
        Ok(())
    }

    pub fn logits_host(&self) -> Result<Vec<f32>> {
        Ok(self.logits.as_tensor().to_dtype(DType::F32)?.to_vec1::<f32>()?)
    }

    /// The deterministic bit-width: 2, 4, 8, 16 or 32.
    pub fn bits(&self) -> Result<u32> {
        Ok(gates::bits_from_open(gates::open_prefix(&self.logits_host()?)))
    }

    /// P(gate open) of the four bit gates, zero where hard-off, differentiable: `[4]`.
    pub fn prob_open(&self) -> Result<Tensor> {
        Ok(gates::prob_open(self.logits.as_tensor())?.mul(&gates::hard_off_mask(self.logits.as_tensor())?)?)
    }

    /// Sampled bit gates `[4]` (zero where hard-off) from logistic noise of `noise_seed`.
    fn sample_gates(&self, noise_seed: u64) -> Result<Tensor> {
        let logits = self.logits.as_tensor();
        let noise = Tensor::from_vec(gates::logistic_noise(4, noise_seed), 4, logits.device())?;
        Ok(gates::sample(logits, &noise)?.mul(&gates::hard_off_mask(logits)?)?)
    }

    /// Quantizes `x`: while training (range widened first, gates sampled with `noise_seed`) the
    /// gated residual sum; otherwise the fixed test-time grid. Unset ranges pass `x` through.
    /// A training forward reads nothing back from the device once the range is set.
    pub fn forward(&self, x: &Tensor, train: bool, noise_seed: u64) -> Result<Tensor> {
        if !train {
            let range = self.range()?;
            if !range.is_set() {
                return Ok(x.clone());
            }
            return quantize_fixed(x, &range, self.bits()?);
        }
        let mut st = self.lock()?;
        if let Some(levels) = st.frozen_ladder.clone() {
            drop(st);
            return mix(&levels, &self.sample_gates(noise_seed)?.to_dtype(x.dtype())?);
        }
        let current = match &st.device {
            Some(d) => d.clone(),
            None => DeviceRange::new(&st.host, x.device())?,
        };
        let widened = current.widen(x)?;
        st.device = Some(widened.clone());
        st.device_ahead = true;
        if !st.host.is_set() {
            // Until the tensor was seen non-zero (B at LoRA's init), one read per forward.
            st.host = widened.to_host()?;
            st.device_ahead = false;
            if !st.host.is_set() {
                return Ok(x.clone());
            }
        }
        let params = widened.params(x.dtype())?;
        let z = self.sample_gates(noise_seed)?;
        if self.slot == Slot::Base && !is_fused(x) && x.elem_count() <= FROZEN_LADDER_MAX_ELEMS {
            let levels = std::sync::Arc::new(ladder(x, &params)?);
            st.frozen_ladder = Some(levels.clone());
            drop(st);
            return mix(&levels, &z.to_dtype(x.dtype())?);
        }
        drop(st);
        quantize_residual(x, &params, &z)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn distinct(v: &[f64]) -> usize {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        v.dedup();
        v.len()
    }

    fn line(lo: f64, hi: f64, n: usize) -> Result<Tensor> {
        let v: Vec<f64> = (0..n).map(|i| lo + (hi - lo) * i as f64 / (n - 1) as f64).collect();
        Ok(Tensor::from_vec(v, n, &Device::Cpu)?)
    }

    /// Gates on up to `bits`: [z₄, z₈, z₁₆, z₃₂].
    fn gates_for(bits: u32) -> Result<Tensor> {
        let open = [4, 8, 16, 32].iter().map(|&b| if b <= bits { 1.0 } else { 0.0 }).collect::<Vec<f64>>();
        Ok(Tensor::from_vec(open, 4, &Device::Cpu)?)
    }

    #[test]
    fn steps_follow_the_residual_ladder() {
        let r = Range { x_min: -1.5, x_max: 1.5 };
        let s = r.steps();
        assert_eq!(s[0], 1.0);
        assert!((s[4] * 1_431_655_765.0 - 1.0).abs() < 1e-12);
        assert_eq!(r.code_bounds(2), (-1.0, 1.0));
        assert_eq!(r.code_bounds(8), (-127.0, 127.0));
        assert_eq!(Range { x_min: 0.0, x_max: 3.0 }.code_bounds(4), (0.0, 15.0));
        // Running max: symmetric once negative values were seen, never shrinking.
        let w = Range::default().widen(0.0, 0.0);
        assert!(!w.is_set());
        let w = w.widen(0.2, 2.0);
        assert_eq!(w, Range { x_min: 0.0, x_max: 2.0 });
        assert_eq!(w.widen(-3.0, 1.0), Range { x_min: -3.0, x_max: 3.0 });
        assert_eq!(w.widen(f32::NAN, 1.0), w);
    }

    #[test]
    fn grids_have_the_expected_number_of_levels() -> Result<()> {
        // Past the range on both sides: clipping keeps every bit-width exact.
        let x = line(-2.0, 2.0, 200_001)?;
        let signed = Range { x_min: -1.5, x_max: 1.5 };
        for (bits, levels) in [(2, 3), (4, 15), (8, 255), (16, 65535)] {
            let q = quantize_fixed(&x, &signed, bits)?.to_vec1::<f64>()?;
            assert_eq!(distinct(&q), levels, "{bits}-bit signed");
            let k = codes(&x, &signed, bits)?.to_vec1::<f64>()?;
            let kmax = k.iter().fold(0f64, |m, v| m.max(v.abs()));
            assert_eq!(kmax, 2f64.powi(bits as i32 - 1) - 1.0);
        }
        let x = line(-0.5, 3.5, 200_001)?;
        let unsigned = Range { x_min: 0.0, x_max: 3.0 };
        for (bits, levels) in [(2, 4), (4, 16), (8, 256)] {
            let q = quantize_fixed(&x, &unsigned, bits)?.to_vec1::<f64>()?;
            assert_eq!(distinct(&q), levels, "{bits}-bit unsigned");
        }
        Ok(())
    }

    #[test]
    fn residual_sum_equals_the_b_bit_grid() -> Result<()> {
        // Hand-made values, s₂ = 1: x₂ ∈ {−1, 0, 1}, s₄ = 0.2, s₈ = 0.2/17, …
        let r = Range { x_min: -1.5, x_max: 1.5 };
        let x = Tensor::new(&[0.0f64, 0.3, -0.7, 1.49, -1.5, 1.5, 0.85, 0.123456789, -2.0, 7.0], &Device::Cpu)?;
        let two = quantize_residual(&x, &r.params(x.dtype(), x.device())?, &gates_for(2)?)?.to_vec1::<f64>()?;
        assert_eq!(two, vec![0.0, 0.0, -1.0, 1.0, -1.0, 1.0, 1.0, 0.0, -1.0, 1.0]);
        let four = quantize_residual(&x, &r.params(x.dtype(), x.device())?, &gates_for(4)?)?.to_vec1::<f64>()?;
        // 0.3 → 0 + 0.2·round(1.5) = 0.4; −0.7 → −1 + 0.2·round(1.5) = −0.6; ±1.5 clip → ±1.4.
        let want4 = [0.0, 0.4, -0.6, 1.4, -1.4, 1.4, 0.8, 0.2, -1.4, 1.4];
        for (g, w) in four.iter().zip(want4) {
            assert!((g - w).abs() < 1e-12, "{four:?}");
        }
        // At an exact tie the two roads may pick different neighbours: −0.7 is −3.5·s₄, which
        // the residual road rounds to −1 + 2·s₄ = −0.6 and direct rounding to −4·s₄ = −0.8.
        assert!(
            (quantize_fixed(&Tensor::new(&[-0.7f64], &Device::Cpu)?, &r, 4)?.to_vec1::<f64>()?[0] + 0.8).abs() < 1e-12
        );
        // Off ties (random values) the residual sum is the nearest b-bit grid point.
        let x = Tensor::randn(0f64, 0.7, 5000, &Device::Cpu)?;
        for bits in [2, 4, 8, 16] {
            let res = quantize_residual(&x, &r.params(x.dtype(), x.device())?, &gates_for(bits)?)?.to_vec1::<f64>()?;
            let direct = quantize_fixed(&x, &r, bits)?.to_vec1::<f64>()?;
            let worst = res.iter().zip(&direct).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
            assert!(worst < 1e-6 * r.step(bits), "{bits} bits: {worst}");
        }
        // 32 bits in f64: within s₃₂/2 of the clipped input.
        let res = quantize_residual(&x, &r.params(x.dtype(), x.device())?, &gates_for(32)?)?;
        let err = res.sub(&x.clamp(-1.5f64, 1.5f64)?)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(err <= 0.5 * r.step(32) + 1e-15, "{err}");
        Ok(())
    }

    #[test]
    fn soft_gates_interpolate_and_ste_passes_gradient() -> Result<()> {
        let r = Range { x_min: -1.5, x_max: 1.5 };
        let x = Var::new(&[0.3f64, 2.0], &Device::Cpu)?;
        let z = Var::new(&[0.5f64, 0.0, 0.0, 0.0], &Device::Cpu)?;
        let q = quantize_residual(x.as_tensor(), &r.params(DType::F64, &Device::Cpu)?, z.as_tensor())?;
        assert!((q.to_vec1::<f64>()?[0] - 0.2).abs() < 1e-12, "x₂ + ½ε₄ = 0 + ½·0.4");
        let g = q.sum_all()?.backward()?;
        let gx = g.get(x.as_tensor()).map(|t| t.to_vec1::<f64>()).transpose()?.unwrap_or_default();
        let gz = g.get(z.as_tensor()).map(|t| t.to_vec1::<f64>()).transpose()?.unwrap_or_default();
        assert_eq!(gx, vec![1.0, 0.0], "identity inside the range, zero where clipped");
        assert!((gz[0] - 0.8).abs() < 1e-12, "dq/dz₄ = Σ ε₄ = 0.4 + 0.4: {gz:?}");
        Ok(())
    }

    #[test]
    fn quantizer_widens_while_training_and_passes_zeros_through() -> Result<()> {
        let q = Quantizer::new(Slot::LoraE, [6.0, 6.0, -6.0, 6.0], &Device::Cpu)?;
        assert_eq!(q.bits()?, 8);
        let zero = Tensor::zeros(3, DType::F32, &Device::Cpu)?;
        assert_eq!(q.forward(&zero, true, 0)?.to_vec1::<f32>()?, vec![0.0; 3]);
        assert!(!q.range()?.is_set(), "an all-zero tensor leaves the range unset");
        let x = Tensor::new(&[0.5f32, -1.5, 1.0], &Device::Cpu)?;
        let y = q.forward(&x, true, 1)?.to_vec1::<f32>()?;
        assert_eq!(q.range()?, Range { x_min: -1.5, x_max: 1.5 });
        let eval = q.forward(&x, false, 0)?.to_vec1::<f32>()?;
        for (a, b) in y.iter().zip(&eval) {
            assert!((a - b).abs() < 1e-6, "z₃₂'s hard-off cuts 16 and 32 bits in both: {y:?} {eval:?}");
        }
        // Eval clips to the frozen range and does not widen it.
        let big = Tensor::new(&[4.0f32], &Device::Cpu)?;
        let out = q.forward(&big, false, 0)?.to_vec1::<f32>()?[0];
        assert!((out - 127.0 * (1.0 / 85.0) as f32).abs() < 1e-6, "{out}");
        assert_eq!(q.range()?.x_max, 1.5);
        Ok(())
    }

    #[test]
    fn fused_cpu_ladder_equals_the_tensor_ops_to_the_bit() -> Result<()> {
        let x = Tensor::randn(0f32, 0.8, (37, 19), &Device::Cpu)?;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        for r in
            [Range { x_min: -1.5, x_max: 1.5 }, Range { x_min: 0.0, x_max: 0.7 }, Range { x_min: -3e-4, x_max: 3e-4 }]
        {
            let p = r.params(DType::F32, &Device::Cpu)?;
            let pv = p.to_vec1::<f32>()?;
            // Level-major, as ladder_ops stacks them.
            let per_value: Vec<[f32; 5]> = xs.iter().map(|&v| levels_of(v, &pv)).collect();
            let fused: Vec<f32> = (0..5).flat_map(|i| per_value.iter().map(move |l| l[i])).collect();
            let ops = ladder_ops(&x, &p)?.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(fused.len(), ops.len());
            assert!(fused.iter().zip(&ops).all(|(a, b)| a.to_bits() == b.to_bits()), "{r:?}");
        }
        Ok(())
    }

    #[test]
    fn device_range_widens_and_parametrises_like_the_host() -> Result<()> {
        let dev = Device::Cpu;
        let (mut host, mut device) = (Range::default(), DeviceRange::new(&Range::default(), &dev)?);
        let batches: [&[f32]; 6] =
            [&[0.0, 0.0], &[0.2, 2.0], &[0.5, 1.0], &[-3.0, 1.0], &[f32::NAN, 9.0], &[-0.5, 4.25]];
        for b in batches {
            let lo = b.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = b.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            host = host.widen(if b.iter().any(|v| v.is_nan()) { f32::NAN } else { lo }, hi);
            device = device.widen(&Tensor::new(b, &dev)?)?;
            assert_eq!(device.to_host()?, host, "after {b:?}");
            if host.is_set() {
                let want = host.params(DType::F32, &dev)?.to_vec1::<f32>()?;
                let got = device.params(DType::F32)?.to_vec1::<f32>()?;
                assert_eq!(got, want);
            }
        }
        assert_eq!(host, Range { x_min: -4.25, x_max: 4.25 });
        Ok(())
    }

    #[test]
    fn frozen_base_ladder_is_reused_and_reset_with_the_range() -> Result<()> {
        // bf16 takes the tensor-op path (the fused CPU op is f32/f64 and recomputes instead).
        let q = Quantizer::new(Slot::Base, [6.0, 6.0, 6.0, -6.0], &Device::Cpu)?;
        let w = Tensor::randn(0f32, 0.1, (8, 6), &Device::Cpu)?.to_dtype(DType::BF16)?;
        let first = q.forward(&w, true, 3)?;
        // The cached ladder ignores what is passed next: W0 never changes while training.
        let again = q.forward(&w.affine(2.0, 0.0)?, true, 3)?;
        let f32s = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
        assert_eq!(f32s(&first)?, f32s(&again)?);
        let r = q.range()?;
        q.set_range(Range { x_min: 2.0 * r.x_min, x_max: 2.0 * r.x_max })?;
        let rebuilt = q.forward(&w.affine(2.0, 0.0)?, true, 3)?;
        let want = f32s(&first.affine(2.0, 0.0)?)?;
        let got = f32s(&rebuilt)?;
        assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() <= 1e-6 * b.abs().max(1e-3)), "{got:?} {want:?}");
        Ok(())
    }

    #[test]
    fn fused_cpu_quantizer_matches_the_tensor_ops() -> Result<()> {
        let dev = Device::Cpu;
        for (r, soft) in [(Range { x_min: -0.9, x_max: 0.9 }, true), (Range { x_min: 0.0, x_max: 1.2 }, false)] {
            let x0 =
                Tensor::randn(0f32, 0.6, (23, 7), &dev)?.abs()?.affine(if r.signed() { -1.0 } else { 1.0 }, 0.3)?;
            let gates: &[f32] = if soft { &[0.9, 0.4, 0.7, 0.2] } else { &[1.0, 1.0, 0.0, 0.0] };
            let p = r.params(DType::F32, &dev)?;
            let w = Tensor::randn(0f32, 1.0, (23, 7), &dev)?;
            let run = |fused: bool| -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
                let x = Var::from_tensor(&x0)?;
                let z = Var::new(gates, &dev)?;
                let q = if fused {
                    quantize_residual(x.as_tensor(), &p, z.as_tensor())?
                } else {
                    quantize_residual_ops(x.as_tensor(), &p, z.as_tensor())?
                };
                let g = q.mul(&w)?.sum_all()?.backward()?;
                let grad = |v: &Var| -> Result<Vec<f32>> {
                    Ok(g.get(v.as_tensor()).map(|t| t.flatten_all()?.to_vec1::<f32>()).transpose()?.unwrap_or_default())
                };
                Ok((q.flatten_all()?.to_vec1::<f32>()?, grad(&x)?, grad(&z)?))
            };
            let (fused, ops) = (run(true)?, run(false)?);
            assert_eq!(fused.0, ops.0, "forward values ({r:?})");
            assert_eq!(fused.1, ops.1, "straight-through dL/dx ({r:?})");
            for (a, b) in fused.2.iter().zip(&ops.2) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "dL/dz {:?} vs {:?}", fused.2, ops.2);
            }
            assert!(fused.2.iter().any(|v| v.abs() > 1e-3), "the gates get a gradient: {:?}", fused.2);
        }
        Ok(())
    }
}
