//! Hard-concrete gates (Louizos et al. 2018, arXiv 1712.01312; `reference/blora.md` §1.4): one
//! logit log α per gate, a stretched and clamped binary-concrete sample while training and a
//! deterministic 0/1 at test time.
//!
//! - Sample: u ~ U(0, 1), s = σ((ln u − ln(1 − u) + log α)/β), z = clamp(s(ζ − γ) + γ, 0, 1),
//!   differentiable in log α; β = 2/3, γ = −0.1, ζ = 1.1.
//! - P(z > 0) = σ(log α − β ln(−γ/ζ)) = σ(log α + 1.5986).
//! - Test time: z = 1 iff P(z > 0) > 0.66, i.e. log α > −0.9353 ([`test_threshold`]).
//! - Bit gates are nested (the 8-bit gate counts only when the 4-bit one is on, …) and a bit gate
//!   with log α ≤ −2 is off for good, with every higher one (`hard_off_mask`), in training and at
//!   test time alike (Bayesian Bits' `get_gates`).
//! - Rank gates are nested too: component i + 1 is on only if components 2..i are
//!   (`nested_prefix`: straight-through round of the cumulative product).
//!
//! Every tensor here is a small vector (`[4]` bit gates, `[r − 1]` rank gates), f32 on the
//! logits' device; the uniform noise comes from a seeded generator so a step is reproducible.
use candle_core::Tensor;
#[cfg(test)]
use candle_core::D;
use rand::{Rng, SeedableRng};

#[cfg(test)]
use super::bank::GateRef;
use crate::{ops, Result};

/// Temperature β of the binary concrete.
pub const BETA: f64 = 2.0 / 3.0;
/// Lower stretch γ.
pub const GAMMA: f64 = -0.1;
/// Upper stretch ζ.
pub const ZETA: f64 = 1.1;
/// A bit gate whose log α is at or below this is off, with every higher bit gate.
pub const HARD_OFF: f64 = -2.0;
/// P(z > 0) above which a gate is on at test time (Bayesian Bits' `hc_thres` 0.34 on P(z = 0)).
pub const TEST_PROB: f64 = 0.66;

/// β ln(−γ/ζ) = −1.5986: the shift between log α and the logit of P(z > 0).
fn shift() -> f64 {
    BETA * (-GAMMA / ZETA).ln()
}

/// The log α above which a gate is on at test time: −0.9353.
pub fn test_threshold() -> f64 {
    shift() + (TEST_PROB / (1.0 - TEST_PROB)).ln()
}

/// P(z > 0) for one logit, in f64.
pub fn prob_open_f64(log_alpha: f64) -> f64 {
    1.0 / (1.0 + (-(log_alpha - shift())).exp())
}

/// The deterministic test-time gate.
pub fn is_open(log_alpha: f64) -> bool {
    log_alpha > test_threshold()
}

/// σ(x) as (1 + tanh(x/2))/2: the exp form's backward gives NaN once exp(−x) overflows.
#[cfg(test)]
pub(crate) fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(x.affine(0.5, 0.0)?.tanh()?.affine(0.5, 0.5)?)
}

/// P(z > 0) for every logit, differentiable (the composed reference of [`ops::gate_prior`]'s).
#[cfg(test)]
pub(crate) fn prob_open(log_alpha: &Tensor) -> Result<Tensor> {
    sigmoid(&log_alpha.affine(1.0, logit_shift())?)
}

/// P(z > 0) = σ(log α + logit_shift()): +1.5986 ([`ops::gate_prior`]'s constant).
pub(crate) fn logit_shift() -> f64 {
    -shift()
}

/// `n` logistic noises ln u − ln(1 − u), u ~ U(0, 1) from `seed` (u kept in [1e-6, 1 − 1e-6]).
pub(crate) fn logistic_noise(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let u = rng.random::<f64>().clamp(1e-6, 1.0 - 1e-6);
            (u.ln() - (1.0 - u).ln()) as f32
        })
        .collect()
}

/// The hard-concrete constants of every gate, with or without the bit gates' nested hard-off.
fn hard_concrete(hard_off: bool) -> ops::HardConcrete {
    ops::HardConcrete { beta: BETA, gamma: GAMMA, zeta: ZETA, hard_off: hard_off.then_some(HARD_OFF) }
}

/// Hard-concrete samples for `log_alpha: [n]` given logistic `noise` of the same shape (one op
/// per direction, [`ops::hard_concrete`]; the same floats as `sigmoid` and an affine clamp
/// composed from candle ops on each device).
#[cfg(test)]
pub(crate) fn sample(log_alpha: &Tensor, noise: &Tensor) -> Result<Tensor> {
    Ok(ops::hard_concrete(log_alpha, noise, hard_concrete(false))?)
}

/// [`sample`] times [`hard_off_mask`]: the bit gates of one quantizer, in one op.
#[cfg(test)]
pub(crate) fn sample_bits(log_alpha: &Tensor, noise: &Tensor) -> Result<Tensor> {
    Ok(ops::hard_concrete(log_alpha, noise, hard_concrete(true))?)
}

/// A quantizer's bit gates `gates: [4]` sampled with logistic `noise`, zero where hard-off, read
/// straight from the bank ([`ops::hard_concrete_at`]: no narrow in the autograd graph).
#[cfg(test)]
pub(crate) fn sample_bits_of(gates: &GateRef, noise: &Tensor) -> Result<Tensor> {
    Ok(ops::hard_concrete_at(gates.bank().var().as_tensor(), gates.offset(), noise, hard_concrete(true))?)
}

/// The bit gates of several quantizers, four each, side by side in `bank` from `offset`, sampled
/// with logistic `noise` (`[4·Q]`) in one op ([`ops::hard_concrete_groups_at`]): each four are
/// what [`sample_bits_of`] gives them. The quantizers hand their gradients over to `grads`.
pub(crate) fn sample_bit_groups(
    bank: &Tensor,
    offset: usize,
    noise: &Tensor,
    grads: &ops::GateGrads,
) -> Result<Tensor> {
    Ok(ops::hard_concrete_groups_at(bank, offset, noise, hard_concrete(true), 4, Some(grads))?)
}

/// A layer's gates in one op ([`ops::layer_gates_at`]): its `rank` rank gates from `offset` in
/// `bank` (the rank multiplier `[1, m₂, …, m_r]`, as [`ops::rank_multiplier_at`]) and its quantizers'
/// bit gates right after them (four each, as [`sample_bit_groups`]), with logistic `noise`
/// (`[rank + 4·Q]`): `[rank + 1 + 4·Q]`. The consumers hand their gradients over to `grads`.
pub(crate) fn sample_layer_gates(
    bank: &Tensor,
    offset: usize,
    noise: &Tensor,
    rank: usize,
    grads: &ops::GateGrads,
) -> Result<Tensor> {
    Ok(ops::layer_gates_at(bank, offset, noise, hard_concrete(true), rank, 4, Some(grads))?)
}

/// The rank multiplier `[1, nested_prefix(sample(log_alpha, noise))]` of a layer's rank gates
/// `log_alpha: [r − 1]`, in one op per direction ([`ops::rank_multiplier`]; the same floats as
/// [`sample`], [`nested_prefix`] and a 1 in front composed from candle ops).
#[cfg(test)]
pub(crate) fn rank_multiplier(log_alpha: &Tensor, noise: &Tensor) -> Result<Tensor> {
    Ok(ops::rank_multiplier(log_alpha, noise, hard_concrete(false))?)
}

/// `x + (round(x) − x).detach()`: rounds in the forward pass, identity in the backward pass.
#[cfg(test)]
pub(crate) fn ste_round(x: &Tensor) -> Result<Tensor> {
    Ok(x.add(&x.round()?.sub(x)?.detach())?)
}

/// Cumulative product of a vector `[n]` → `[n]`, differentiable (n is a rank or 4: a short loop
/// of scalar products). The composed reference of [`rank_multiplier`] and the prior's masks.
#[cfg(test)]
pub(crate) fn cumprod(v: &Tensor) -> Result<Tensor> {
    let n = v.dim(D::Minus1)?;
    if n == 0 {
        return Ok(v.clone());
    }
    let mut acc = v.narrow(0, 0, 1)?;
    let mut parts = vec![acc.clone()];
    for i in 1..n {
        acc = acc.mul(&v.narrow(0, i, 1)?)?;
        parts.push(acc.clone());
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// Rank multipliers of components 2..r from their gates `z: [r − 1]`: the straight-through
/// round of the cumulative product (forward 0/1; backward through the product).
#[cfg(test)]
pub(crate) fn nested_prefix(z: &Tensor) -> Result<Tensor> {
    ste_round(&cumprod(z)?)
}

/// Which bit gates may be on (4, 8, 16, 32 bits) as 0/1 `[4]` on the logits' device: all up to
/// the first with log α ≤ −2, none after. Computed on the device (no host read in a step).
/// The per-quantizer reference of [`super::bank::PriorPlan`]'s mask.
#[cfg(test)]
pub(crate) fn hard_off_mask(log_alpha: &Tensor) -> Result<Tensor> {
    cumprod(&log_alpha.gt(HARD_OFF)?.to_dtype(log_alpha.dtype())?)
}

/// How many leading deterministic gates are on.
pub(crate) fn open_prefix(log_alpha: &[f32]) -> usize {
    log_alpha.iter().take_while(|&&a| is_open(f64::from(a))).count()
}

/// Bits from the number of open leading bit gates: 2, 4, 8, 16, 32.
pub(crate) fn bits_from_open(open: usize) -> u32 {
    2u32 << open.min(4)
}

/// E[bits] = 2 + 2 q₄ + 4 q₄q₈ + 8 q₄q₈q₁₆ + 16 q₄q₈q₁₆q₃₂ for the open probabilities `q: [4]`
/// (already zero where hard-off) → `[1]`. The per-quantizer reference of
/// [`super::bank::PriorPlan`].
#[cfg(test)]
pub(crate) fn expected_bits(q: &Tensor) -> Result<Tensor> {
    let added = Tensor::new(&[2f32, 4., 8., 16.], q.device())?.to_dtype(q.dtype())?;
    Ok(cumprod(q)?.mul(&added)?.sum_keepdim(0)?.affine(1.0, 2.0)?)
}

/// Expected number of open nested gates, Σᵢ ∏_{k≤i} qₖ → `[1]` (the per-layer reference of
/// [`super::bank::PriorPlan`]).
#[cfg(test)]
pub(crate) fn expected_open(q: &Tensor) -> Result<Tensor> {
    Ok(cumprod(q)?.sum_keepdim(0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn threshold_and_probabilities_match_the_reference() -> Result<()> {
        assert!((test_threshold() + 0.935303).abs() < 1e-5, "{}", test_threshold());
        assert!((prob_open_f64(6.0) - 0.99950).abs() < 1e-5);
        assert!((prob_open_f64(2.0) - 0.97337).abs() < 1e-5);
        assert!((prob_open_f64(-6.0) - 0.01211).abs() < 1e-5);
        assert!(is_open(-0.93) && !is_open(-0.94));
        let mask = |v: &[f32]| -> Result<Vec<f32>> {
            Ok(hard_off_mask(&Tensor::new(v, &candle_core::Device::Cpu)?)?.to_vec1::<f32>()?)
        };
        assert_eq!(mask(&[3.0, -2.0, 5.0, 5.0])?, vec![1., 0., 0., 0.]);
        assert_eq!(mask(&[3.0, 1.0, -1.99, 5.0])?, vec![1., 1., 1., 1.]);
        assert_eq!(bits_from_open(open_prefix(&[1.0, 0.0, -1.0, 4.0])), 8);
        assert_eq!(bits_from_open(0), 2);
        assert_eq!(bits_from_open(4), 32);
        Ok(())
    }

    #[test]
    fn sample_frequency_matches_closed_form() -> Result<()> {
        let n = 20_000;
        for (k, &la) in [-3.0f64, -1.0, 0.0, 1.0, 3.0].iter().enumerate() {
            let noise = Tensor::from_vec(logistic_noise(n, 100 + k as u64), n, &Device::Cpu)?;
            let logits = Tensor::full(la as f32, n, &Device::Cpu)?;
            let z = sample(&logits, &noise)?.to_vec1::<f32>()?;
            assert!(z.iter().all(|v| (0.0..=1.0).contains(v)));
            let frac = z.iter().filter(|&&v| v > 0.0).count() as f64 / n as f64;
            let p = prob_open_f64(la);
            let sd = (p * (1.0 - p) / n as f64).sqrt();
            assert!((frac - p).abs() < 4.0 * sd, "log α {la}: {frac} vs {p} (4σ = {})", 4.0 * sd);
            // Exactly-one samples exist too: the stretch puts mass on both ends.
            assert!(z.contains(&1.0) && z.contains(&0.0));
        }
        Ok(())
    }

    #[test]
    fn bit_samples_are_samples_under_the_hard_off_mask() -> Result<()> {
        let la = Tensor::new(&[3.0f32, 0.2, -2.0, 5.0, 1.0], &Device::Cpu)?;
        let noise = Tensor::new(&[-1.0f32, 0.5, 0.3, -0.2, 2.0], &Device::Cpu)?;
        let bits = sample_bits(&la, &noise)?.to_vec1::<f32>()?;
        let want = sample(&la, &noise)?.mul(&hard_off_mask(&la)?)?.to_vec1::<f32>()?;
        assert_eq!(bits, want);
        assert_eq!(&bits[2..], &[0.0; 3], "off at log α −2 and after");
        assert!(bits[0] > 0.0 && bits[1] > 0.0);
        Ok(())
    }

    #[test]
    fn sample_is_differentiable_in_log_alpha() -> Result<()> {
        let la = Var::new(&[0.3f32, -0.2], &Device::Cpu)?;
        let noise = Tensor::new(&[0.1f32, -0.4], &Device::Cpu)?;
        let z = sample(la.as_tensor(), &noise)?;
        let g = z.sum_all()?.backward()?;
        let g = g.get(la.as_tensor()).map(|t| t.to_vec1::<f32>()).transpose()?.unwrap_or_default();
        // dz/dlogα = (ζ − γ) s (1 − s) / β inside the clamp.
        for (i, (a, e)) in [(0.3f64, 0.1f64), (-0.2, -0.4)].iter().enumerate() {
            let s = 1.0 / (1.0 + (-(a + e) / BETA).exp());
            let want = (ZETA - GAMMA) * s * (1.0 - s) / BETA;
            assert!((f64::from(g[i]) - want).abs() < 1e-5, "{} vs {want}", g[i]);
        }
        Ok(())
    }

    #[test]
    fn nested_prefix_rounds_forward_and_passes_gradient() -> Result<()> {
        // Deterministic gates [on, on, off, on]: components 1 (always), 2, 3 → rank 3.
        let z = Var::new(&[1f32, 1., 0., 1.], &Device::Cpu)?;
        let m = nested_prefix(z.as_tensor())?;
        assert_eq!(m.to_vec1::<f32>()?, vec![1., 1., 0., 0.]);
        assert_eq!(1 + m.to_vec1::<f32>()?.iter().filter(|&&v| v > 0.0).count(), 3);
        let soft = Var::new(&[0.9f32, 0.7], &Device::Cpu)?;
        let m = nested_prefix(soft.as_tensor())?;
        assert_eq!(m.to_vec1::<f32>()?, vec![1., 1.], "0.9 and 0.63 both round to 1");
        let g = m.sum_all()?.backward()?;
        let g = g.get(soft.as_tensor()).map(|t| t.to_vec1::<f32>()).transpose()?.unwrap_or_default();
        // d(z1 + z1 z2)/dz1 = 1 + z2, d/dz2 = z1.
        assert!((g[0] - 1.7).abs() < 1e-6 && (g[1] - 0.9).abs() < 1e-6, "{g:?}");
        Ok(())
    }

    /// The fused rank multiplier against the composition it replaced (sample, nested prefix, a 1
    /// in front): the same floats forward, the same log α gradient, for soft, clamped and mixed
    /// gates and every length up to 9.
    #[test]
    fn rank_multiplier_equals_the_composed_ops() -> Result<()> {
        for n in 1..=9usize {
            for (k, spread) in [0.5f32, 3.0, 30.0].iter().enumerate() {
                let la: Vec<f32> = (0..n).map(|i| spread * ((i * 7 + k * 3) % 5) as f32 / 4.0 - 0.3 * spread).collect();
                let noise = Tensor::from_vec(logistic_noise(n, (10 * n + k) as u64), n, &Device::Cpu)?;
                let w =
                    Tensor::from_vec((0..=n).map(|i| 1.0 - 0.3 * i as f32).collect::<Vec<_>>(), n + 1, &Device::Cpu)?;
                let run = |fused: bool| -> Result<(Vec<f32>, Vec<f32>)> {
                    let v = Var::new(la.as_slice(), &Device::Cpu)?;
                    let m = if fused {
                        rank_multiplier(v.as_tensor(), &noise)?
                    } else {
                        let m = nested_prefix(&sample(v.as_tensor(), &noise)?)?;
                        Tensor::cat(&[&Tensor::ones(1, DType::F32, &Device::Cpu)?, &m], 0)?
                    };
                    let g = m.mul(&w)?.sum_all()?.backward()?;
                    let g = g.get(v.as_tensor()).map(|t| t.to_vec1::<f32>()).transpose()?.unwrap_or_default();
                    Ok((m.to_vec1::<f32>()?, g))
                };
                let ((mf, gf), (mc, gc)) = (run(true)?, run(false)?);
                assert_eq!(mf, mc, "n {n}, spread {spread}");
                assert_eq!(mf[0], 1.0);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&gf), bits(&gc), "n {n}, spread {spread}: {gf:?} vs {gc:?}");
            }
        }
        // The soft case passes a gradient (asserted against the hand-computed product rule in
        // nested_prefix_rounds_forward_and_passes_gradient for the composition).
        let v = Var::new(&[0.1f32, 0.2, -0.1], &Device::Cpu)?;
        let noise = Tensor::new(&[0.0f32, 0.1, -0.2], &Device::Cpu)?;
        let g = rank_multiplier(v.as_tensor(), &noise)?.sum_all()?.backward()?;
        let g = g.get(v.as_tensor()).map(|t| t.to_vec1::<f32>()).transpose()?.unwrap_or_default();
        assert!(g.iter().all(|x| x.abs() > 1e-3), "{g:?}");
        assert!(ops::rank_multiplier(v.as_tensor(), &noise, hard_concrete(true)).is_err(), "no hard-off");
        Ok(())
    }

    #[test]
    fn expected_bits_and_open_count() -> Result<()> {
        let q = Tensor::new(&[1f32, 1., 0.5, 0.5], &Device::Cpu)?;
        assert_eq!(expected_bits(&q)?.to_vec1::<f32>()?, vec![2. + 2. + 4. + 4. + 4.]);
        assert_eq!(expected_open(&q)?.to_vec1::<f32>()?, vec![1. + 1. + 0.5 + 0.25]);
        let off = Tensor::zeros(4, DType::F32, &Device::Cpu)?;
        assert_eq!(expected_bits(&off)?.to_vec1::<f32>()?, vec![2.]);
        Ok(())
    }
}
