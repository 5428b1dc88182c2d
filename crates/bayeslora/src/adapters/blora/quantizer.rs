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

    /// s₂, s₄, s₈, s₁₆, s₃₂ in f64.
    pub fn steps(&self) -> [f64; 5] {
        let s2 = (f64::from(self.x_max) - f64::from(self.x_min)) / 3.0;
        let s4 = s2 / 5.0;
        let s8 = s4 / 17.0;
        let s16 = s8 / 257.0;
        [s2, s4, s8, s16, s16 / 65537.0]
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

/// The training-time quantizer: residual decomposition with straight-through rounding, gated by
/// `z: [4]` (the 4-, 8-, 16-, 32-bit gates, each in [0, 1]). Shape and dtype of `x` are kept.
pub(crate) fn quantize_residual(x: &Tensor, range: &Range, z: &Tensor) -> Result<Tensor> {
    let s = range.steps();
    let xc = x.clamp(range.x_min, range.x_max)?;
    let (lo2, hi2) = if range.signed() { (-1f32, 1f32) } else { (0f32, 3f32) };
    let x2 = gates::ste_round(&xc.affine(1.0 / s[0], 0.0)?)?.clamp(lo2, hi2)?.affine(s[0], 0.0)?;
    let mut rest = xc.sub(&x2)?;
    let mut eps = Vec::with_capacity(4);
    for (i, k) in RESIDUAL_BOUND.iter().enumerate() {
        let e = gates::ste_round(&rest.affine(1.0 / s[i + 1], 0.0)?)?.clamp(-k, *k)?.affine(s[i + 1], 0.0)?;
        rest = rest.sub(&e)?;
        eps.push(e);
    }
    let z = z.to_dtype(x.dtype())?;
    let mut acc: Option<Tensor> = None;
    for (i, e) in eps.iter().enumerate().rev() {
        let inner = match acc {
            Some(a) => e.add(&a)?,
            None => e.clone(),
        };
        acc = Some(inner.broadcast_mul(&z.narrow(0, i, 1)?)?);
    }
    Ok(match acc {
        Some(a) => x2.add(&a)?,
        None => x2,
    })
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

/// One tensor's quantizer: its bit-gate logits (a trainable [`Var`], `[4]`) and its range.
#[derive(Debug)]
pub(crate) struct Quantizer {
    pub slot: Slot,
    /// log α of the 4-, 8-, 16-, 32-bit gates, f32 `[4]`.
    pub logits: Var,
    range: Mutex<Range>,
}

impl Quantizer {
    pub fn new(slot: Slot, init: [f64; 4], device: &Device) -> Result<Self> {
        let v: Vec<f32> = init.iter().map(|&a| a as f32).collect();
        Ok(Quantizer {
            slot,
            logits: Var::from_tensor(&Tensor::from_vec(v, 4, device)?)?,
            range: Mutex::new(Range::default()),
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Range>> {
        self.range.lock().map_err(|_| Error::config("blora range", self.slot.name(), "lock poisoned by a panic"))
    }

    pub fn range(&self) -> Result<Range> {
        Ok(*self.lock()?)
    }

    pub fn set_range(&self, range: Range) -> Result<()> {
        *self.lock()? = range;
        Ok(())
    }

    /// Widens the range to cover `x` (one device→host read of its min and max).
    fn observe(&self, x: &Tensor) -> Result<Range> {
        let lo = x.min_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let hi = x.max_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let mut r = self.lock()?;
        *r = r.widen(lo, hi);
        Ok(*r)
    }

    pub fn logits_host(&self) -> Result<Vec<f32>> {
        Ok(self.logits.as_tensor().to_dtype(DType::F32)?.to_vec1::<f32>()?)
    }

    /// The deterministic bit-width: 2, 4, 8, 16 or 32.
    pub fn bits(&self) -> Result<u32> {
        Ok(gates::bits_from_open(gates::open_prefix(&self.logits_host()?)))
    }

    /// The hard-off mask as a `[4]` f32 tensor on the logits' device.
    fn mask(&self, logits: &[f32]) -> Result<Tensor> {
        let m: Vec<f32> = gates::bit_mask(logits).iter().map(|&b| if b { 1.0 } else { 0.0 }).collect();
        Ok(Tensor::from_vec(m, 4, self.logits.device())?)
    }

    /// P(gate open) of the four bit gates, zero where hard-off, differentiable: `[4]`.
    pub fn prob_open(&self) -> Result<Tensor> {
        let mask = self.mask(&self.logits_host()?)?;
        Ok(gates::prob_open(self.logits.as_tensor())?.mul(&mask)?)
    }

    /// Quantizes `x`: while training (range widened first, gates sampled with `noise_seed`) the
    /// gated residual sum; otherwise the fixed test-time grid. Unset ranges pass `x` through.
    pub fn forward(&self, x: &Tensor, train: bool, noise_seed: u64) -> Result<Tensor> {
        if train {
            let range = self.observe(x)?;
            if !range.is_set() {
                return Ok(x.clone());
            }
            let logits = self.logits_host()?;
            let noise = Tensor::from_vec(gates::logistic_noise(4, noise_seed), 4, self.logits.device())?;
            let z = gates::sample(self.logits.as_tensor(), &noise)?.mul(&self.mask(&logits)?)?;
            quantize_residual(x, &range, &z)
        } else {
            let range = self.range()?;
            if !range.is_set() {
                return Ok(x.clone());
            }
            quantize_fixed(x, &range, self.bits()?)
        }
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
        let two = quantize_residual(&x, &r, &gates_for(2)?)?.to_vec1::<f64>()?;
        assert_eq!(two, vec![0.0, 0.0, -1.0, 1.0, -1.0, 1.0, 1.0, 0.0, -1.0, 1.0]);
        let four = quantize_residual(&x, &r, &gates_for(4)?)?.to_vec1::<f64>()?;
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
            let res = quantize_residual(&x, &r, &gates_for(bits)?)?.to_vec1::<f64>()?;
            let direct = quantize_fixed(&x, &r, bits)?.to_vec1::<f64>()?;
            let worst = res.iter().zip(&direct).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
            assert!(worst < 1e-6 * r.step(bits), "{bits} bits: {worst}");
        }
        // 32 bits in f64: within s₃₂/2 of the clipped input.
        let res = quantize_residual(&x, &r, &gates_for(32)?)?;
        let err = res.sub(&x.clamp(-1.5f64, 1.5f64)?)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(err <= 0.5 * r.step(32) + 1e-15, "{err}");
        Ok(())
    }

    #[test]
    fn soft_gates_interpolate_and_ste_passes_gradient() -> Result<()> {
        let r = Range { x_min: -1.5, x_max: 1.5 };
        let x = Var::new(&[0.3f64, 2.0], &Device::Cpu)?;
        let z = Var::new(&[0.5f64, 0.0, 0.0, 0.0], &Device::Cpu)?;
        let q = quantize_residual(x.as_tensor(), &r, z.as_tensor())?;
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
}
