//! The per-layer composed prior that [`super::PriorPlan`] replaced, kept as the tests'
//! reference, and the test that the plan reproduces it.
use candle_core::{DType, Device, Tensor};

use super::super::bank::FULL_BITS;
use super::super::config::GateCost;
use super::super::gates;
use super::super::quantizer::Slot;
use super::BLoraLayer;
use crate::Result;

impl BLoraLayer {
    /// Expected bits of a slot's tensor, `[1]`, per quantizer (the reference's).
    fn expected_bits_reference(&self, slot: Slot, dev: &Device) -> Result<Tensor> {
        match self.quantizer(slot) {
            Some(q) => gates::expected_bits(&q.prob_open()?),
            None => Ok(Tensor::new(&[FULL_BITS], dev)?),
        }
    }

    /// The per-layer composed prior that `PriorPlan` replaced: the tests' reference.
    pub(crate) fn regularizer_reference(&self, cost: GateCost) -> Result<Tensor> {
        let dev = self.lora_a.device().clone();
        let rank_q = match &self.rank_logits {
            Some(l) => Some(gates::prob_open(&l.as_tensor()?)?),
            None => None,
        };
        match cost {
            GateCost::Bops => {
                let b = |s| self.expected_bits_reference(s, &dev);
                let rank = match &rank_q {
                    Some(q) => gates::expected_open(q)?.affine(1.0, 1.0)?,
                    None => Tensor::new(&[self.r as f32], &dev)?,
                };
                let (i, o) = (self.in_features as f64, self.out_features as f64);
                let bx = b(Slot::Input)?;
                let per_rank = bx
                    .mul(&b(Slot::LoraA)?)?
                    .affine(i, 0.0)?
                    .add(&b(Slot::ActA)?.mul(&b(Slot::LoraE)?)?)?
                    .add(&b(Slot::ActE)?.mul(&b(Slot::LoraB)?)?.affine(o, 0.0)?)?;
                let mut total = rank.mul(&per_rank)?;
                if self.quantize_base {
                    total = total.add(&bx.mul(&b(Slot::Base)?)?.affine(i * o, 0.0)?)?;
                }
                Ok(total.affine(1.0 / self.bops_norm, 0.0)?.squeeze(0)?)
            }
            GateCost::Const => {
                let mut open = Tensor::zeros(1, DType::F32, &dev)?;
                let mut count = 0usize;
                if let Some(q) = &rank_q {
                    open = open.add(&gates::expected_open(q)?)?;
                    count += self.r - 1;
                }
                for q in &self.quantizers {
                    open = open.add(&gates::expected_open(&q.prob_open()?)?)?;
                    count += 4;
                }
                Ok(open.affine(1.0 / count.max(1) as f64, 0.0)?.squeeze(0)?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::config::{BLoraConfig, InitE};
    use super::*;
    use crate::Error;

    fn cfg() -> BLoraConfig {
        BLoraConfig { r: 4, lora_dropout: 0.0, init_e: InitE::Normal, ..BLoraConfig::default() }
    }

    /// The vectorised prior ([`PriorPlan`]) against the per-layer composed one it replaced: the
    /// same floats forward, the gradients to f32 rounding, for both costs, with and without rank
    /// gates, activations and the base, logits on both sides of the threshold and hard-off.
    #[test]
    fn prior_plan_equals_the_composed_prior() -> Result<()> {
        let configs = [
            cfg(),
            BLoraConfig { quantize_base: true, ..cfg() },
            BLoraConfig { prune_rank: false, ..cfg() },
            BLoraConfig { quantize_activations: false, ..cfg() },
            BLoraConfig { quantize: false, quantize_activations: false, ..cfg() },
        ];
        for (n, c) in configs.iter().enumerate() {
            for cost in [GateCost::Bops, GateCost::Const] {
                let l = BLoraLayer::new(12, 10, c, 2, &Device::Cpu)?;
                for (k, (_, v)) in l.gate_vars().into_iter().enumerate() {
                    let len = v.elem_count();
                    let vals: Vec<f32> = (0..len).map(|i| 5.0 * ((k * 5 + i * 3 + n) % 7) as f32 / 7.0 - 2.5).collect();
                    v.set(&Tensor::from_vec(vals, len, &Device::Cpu)?)?;
                }
                let bank = l.gate_bank().ok_or_else(|| Error::config("t", "", "gates"))?.var().clone();
                let (new, old) = (l.regularizer_with(cost)?, l.regularizer_reference(cost)?);
                let what = format!("{cost:?}, config {n}");
                assert_eq!(new.to_scalar::<f32>()?.to_bits(), old.to_scalar::<f32>()?.to_bits(), "{what}");
                let grad = |t: &Tensor| -> Result<Vec<f32>> {
                    let g = t.backward()?;
                    Ok(g.get(bank.as_tensor()).map(|g| g.to_vec1::<f32>()).transpose()?.unwrap_or_default())
                };
                let (gn, go) = (grad(&new)?, grad(&old)?);
                assert_eq!(gn.len(), go.len(), "{what}");
                for (a, b) in gn.iter().zip(&go) {
                    assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{what}: {gn:?} vs {go:?}");
                }
                assert!(gn.iter().any(|g| g.abs() > 1e-4), "{what}: the prior reaches the gates");
            }
        }
        Ok(())
    }
}
