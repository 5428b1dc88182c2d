//! The gate prior as ~55 vectorised candle ops forward (and ~100 backward), which
//! [`super::PriorPlan`]'s one op per direction ([`crate::ops::gate_prior`]) replaced: kept as
//! the tests' reference, and the test that the op gives its floats to the bit on the CPU.
use candle_core::{DType, Device, Tensor};

use super::super::config::GateCost;
use super::super::gates;
use super::super::quantizer::Slot;
use super::{LayerCost, FULL_BITS};
use crate::{Error, Result};

/// The gate prior of several layers that share a bank, composed from candle ops: index and
/// coefficient tensors built once on the bank's device.
///
/// Per layer the value is what `BLoraLayer::regularizer_with` documents; the total is the sum
/// over the layers. The per-layer arithmetic is the per-layer path's, op for op, on vectors over
/// the layers (so the forward is the same floats on the CPU).
#[derive(Debug)]
pub(crate) struct ComposedPrior {
    layers: usize,
    /// Offsets of every quantizer's 4 bit logits, `[Q·4]` u32; `None` without quantizers.
    bits_idx: Option<Tensor>,
    quantizers: usize,
    /// Offsets of every layer's rank logits, `[L·(r − 1)]` u32, and r − 1.
    rank_idx: Option<(Tensor, usize)>,
    /// Per layer and [`Slot`] (8 columns): a row of [E[bits] of each quantizer; 32], `[L·8]`.
    slot_idx: Tensor,
    /// Per layer: [rank, quantizers.., padding] as rows of [E[open] of each quantizer; E[open]
    /// of each layer's rank gates; 0], `[L·9]`.
    open_idx: Tensor,
    /// Per layer, f32 `[L]`: in, out, in·out when the base is quantized (else 0), r, 1/bops_norm,
    /// 1/(number of gates).
    in_f: Tensor,
    out_f: Tensor,
    base_macs: Tensor,
    rank_full: Tensor,
    inv_norm: Tensor,
    inv_count: Tensor,
    /// `[2, 4, 8, 16]`: the bits each nested bit gate adds.
    added: Tensor,
    full_bits: Tensor,
    zero: Tensor,
}

/// Columns of [`ComposedPrior::open_idx`]: the rank gates and up to eight quantizers.
const OPEN_COLS: usize = 1 + Slot::ALL.len();

fn u32s(v: Vec<usize>, device: &Device) -> Result<Tensor> {
    let v = v
        .into_iter()
        .map(|i| u32::try_from(i).map_err(|_| Error::config("gate index", i, "past u32")))
        .collect::<Result<Vec<u32>>>()?;
    let n = v.len();
    Ok(Tensor::from_vec(v, n, device)?)
}

fn f32s(v: Vec<f64>, device: &Device) -> Result<Tensor> {
    let n = v.len();
    Ok(Tensor::from_vec(v.into_iter().map(|x| x as f32).collect::<Vec<f32>>(), n, device)?)
}

/// Cumulative product along dim 1 of `[n, k]` → `[n, k]`, differentiable (k is 4 or a rank:
/// k − 1 products of columns, whatever n).
pub(crate) fn cumprod_cols(v: &Tensor) -> Result<Tensor> {
    let k = v.dim(1)?;
    if k == 0 {
        return Ok(v.clone());
    }
    let mut acc = v.narrow(1, 0, 1)?;
    let mut parts = vec![acc.clone()];
    for i in 1..k {
        acc = acc.mul(&v.narrow(1, i, 1)?)?;
        parts.push(acc.clone());
    }
    Ok(Tensor::cat(&parts, 1)?)
}

impl ComposedPrior {
    /// The plan for `layers` (one config: all with rank gates of one r, or none).
    pub fn new(layers: &[LayerCost], device: &Device) -> Result<ComposedPrior> {
        let rank_len = super::rank_len(layers)?;
        let quantizers: usize = layers.iter().map(|l| l.bits.len()).sum();
        let mut bits_idx = Vec::with_capacity(4 * quantizers);
        let mut rank_idx = Vec::new();
        let mut slot_idx = Vec::with_capacity(Slot::ALL.len() * layers.len());
        let mut open_idx = Vec::with_capacity(OPEN_COLS * layers.len());
        // Rows of the open table: quantizers 0..Q, then the layers' rank terms Q..Q+L, then 0.
        let open_zero = quantizers + if rank_len.is_some() { layers.len() } else { 0 };
        let mut q = 0;
        for (k, l) in layers.iter().enumerate() {
            if let (Some(at), Some(n)) = (l.rank, rank_len) {
                rank_idx.extend(at..at + n);
            }
            open_idx.push(if l.rank.is_some() { quantizers + k } else { open_zero });
            let first = q;
            for &(_, at) in &l.bits {
                bits_idx.extend(at..at + 4);
                open_idx.push(q);
                q += 1;
            }
            open_idx.extend(std::iter::repeat_n(open_zero, OPEN_COLS - 1 - l.bits.len()));
            for slot in Slot::ALL {
                let row = l.bits.iter().position(|(s, _)| *s == slot).map_or(quantizers, |i| first + i);
                slot_idx.push(row);
            }
        }
        let count = |l: &LayerCost| (rank_len.unwrap_or(0) + 4 * l.bits.len()).max(1) as f64;
        Ok(ComposedPrior {
            layers: layers.len(),
            bits_idx: (quantizers > 0).then(|| u32s(bits_idx, device)).transpose()?,
            quantizers,
            rank_idx: match rank_len {
                Some(n) if n > 0 => Some((u32s(rank_idx, device)?, n)),
                _ => None,
            },
            slot_idx: u32s(slot_idx, device)?,
            open_idx: u32s(open_idx, device)?,
            in_f: f32s(layers.iter().map(|l| l.in_features as f64).collect(), device)?,
            out_f: f32s(layers.iter().map(|l| l.out_features as f64).collect(), device)?,
            base_macs: f32s(
                layers
                    .iter()
                    .map(|l| if l.quantize_base { l.in_features as f64 * l.out_features as f64 } else { 0.0 })
                    .collect(),
                device,
            )?,
            rank_full: f32s(layers.iter().map(|l| l.r as f64).collect(), device)?,
            inv_norm: f32s(layers.iter().map(|l| 1.0 / l.bops_norm).collect(), device)?,
            inv_count: f32s(layers.iter().map(|l| 1.0 / count(l)).collect(), device)?,
            added: Tensor::new(&[[2f32, 4., 8., 16.]], device)?,
            full_bits: Tensor::new(&[FULL_BITS], device)?,
            zero: Tensor::zeros(1, DType::F32, device)?,
        })
    }

    /// For the bit gates `[Q, 4]`: P(open) zero where hard-off, then the nested products
    /// `∏_{k≤i} q_k` (`[Q, 4]`).
    fn nested_bits(logits: &Tensor) -> Result<Tensor> {
        let hard_off = cumprod_cols(&logits.gt(gates::HARD_OFF)?.to_dtype(DType::F32)?)?;
        cumprod_cols(&gates::prob_open(logits)?.mul(&hard_off)?)
    }

    /// E[open rank gates] per layer, `[L]` (the nested products summed), if any.
    fn rank_open(&self, bank: &Tensor) -> Result<Option<Tensor>> {
        let Some((idx, n)) = &self.rank_idx else { return Ok(None) };
        let logits = bank.index_select(idx, 0)?.reshape((self.layers, *n))?;
        Ok(Some(cumprod_cols(&gates::prob_open(&logits)?)?.sum(1)?))
    }

    /// The summed prior of every layer in the plan over the bank's logits `bank: [G]`, a scalar
    /// differentiable in them.
    pub fn prior(&self, bank: &Tensor, cost: GateCost) -> Result<Tensor> {
        let nested = match &self.bits_idx {
            Some(idx) => Some(Self::nested_bits(&bank.index_select(idx, 0)?.reshape((self.quantizers, 4))?)?),
            None => None,
        };
        let rank_open = self.rank_open(bank)?;
        match cost {
            GateCost::Bops => {
                let mut rows = Vec::with_capacity(2);
                if let Some(c) = &nested {
                    rows.push(c.broadcast_mul(&self.added)?.sum(1)?.affine(1.0, 2.0)?);
                }
                rows.push(self.full_bits.clone());
                let table = Tensor::cat(&rows, 0)?.index_select(&self.slot_idx, 0)?.reshape((self.layers, 8))?;
                let b = |s: Slot| -> Result<Tensor> { Ok(table.narrow(1, s as usize, 1)?.squeeze(1)?) };
                let rank = match &rank_open {
                    Some(open) => open.affine(1.0, 1.0)?,
                    None => self.rank_full.clone(),
                };
                let bx = b(Slot::Input)?;
                let per_rank = bx
                    .mul(&b(Slot::LoraA)?)?
                    .mul(&self.in_f)?
                    .add(&b(Slot::ActA)?.mul(&b(Slot::LoraE)?)?)?
                    .add(&b(Slot::ActE)?.mul(&b(Slot::LoraB)?)?.mul(&self.out_f)?)?;
                let total = rank.mul(&per_rank)?.add(&bx.mul(&b(Slot::Base)?)?.mul(&self.base_macs)?)?;
                Ok(total.mul(&self.inv_norm)?.sum_all()?)
            }
            GateCost::Const => {
                let mut rows = Vec::with_capacity(3);
                if let Some(c) = &nested {
                    rows.push(c.sum(1)?);
                }
                if let Some(open) = &rank_open {
                    rows.push(open.clone());
                }
                rows.push(self.zero.clone());
                let table =
                    Tensor::cat(&rows, 0)?.index_select(&self.open_idx, 0)?.reshape((self.layers, OPEN_COLS))?;
                Ok(table.sum(1)?.mul(&self.inv_count)?.sum_all()?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::PriorPlan;
    use super::*;
    use candle_core::Var;

    /// Layers with every slot combination the configs make (adapter only, activations off,
    /// quantized base), with rank gates of `r − 1` each or none, side by side in one bank.
    fn layers(r: usize, rank: bool) -> (Vec<LayerCost>, usize) {
        let kinds: [&[Slot]; 4] = [
            &[Slot::LoraA, Slot::LoraE, Slot::LoraB, Slot::ActA, Slot::ActE, Slot::ActB],
            &[Slot::LoraA, Slot::LoraE, Slot::LoraB],
            &Slot::ALL,
            &[Slot::Input, Slot::Base],
        ];
        let mut at = 0;
        let mut out = Vec::new();
        for (k, slots) in kinds.iter().enumerate() {
            let rank_at = rank.then_some(at);
            if rank {
                at += r - 1;
            }
            let bits = slots
                .iter()
                .map(|&s| {
                    at += 4;
                    (s, at - 4)
                })
                .collect();
            out.push(LayerCost {
                in_features: 32 + 16 * k,
                out_features: 48 - 8 * k,
                r,
                quantize_base: slots.contains(&Slot::Base),
                rank: rank_at,
                bits,
                bops_norm: 3.0e6 + 1.0e5 * k as f64,
            });
        }
        (out, at)
    }

    /// Issue 15: the prior as one op per direction gives the composed ops' prior and bank
    /// gradient to the bit on the CPU, for both costs, with and without rank gates (a long rank
    /// vector too, whose sums candle blocks by 32), soft, saturated and hard-off gates.
    #[test]
    fn one_op_prior_equals_the_composed_ops_to_the_bit() -> Result<()> {
        let dev = Device::Cpu;
        for (r, rank) in [(8usize, true), (8, false), (40, true), (2, true)] {
            let (costs, len) = layers(r, rank);
            let values: Vec<f32> = (0..len)
                .map(|i| match i % 7 {
                    3 => -2.5, // hard-off
                    5 => 9.0,  // saturated open
                    _ => ((i as f32) * 1.37).sin() * 1.8,
                })
                .collect();
            let (plan, composed) = (PriorPlan::new(&costs, &dev)?, ComposedPrior::new(&costs, &dev)?);
            for cost in [GateCost::Bops, GateCost::Const] {
                let run = |fused: bool| -> Result<(u32, Vec<u32>)> {
                    let bank = Var::new(values.as_slice(), &dev)?;
                    let p = if fused {
                        plan.prior(bank.as_tensor(), cost)?
                    } else {
                        composed.prior(bank.as_tensor(), cost)?
                    };
                    let loss = p.affine(0.7, 0.0)?;
                    let g = loss.backward()?.get(bank.as_tensor()).map(|g| g.to_vec1::<f32>()).transpose()?;
                    let bits = g.unwrap_or_default().iter().map(|v| v.to_bits()).collect();
                    Ok((p.to_scalar::<f32>()?.to_bits(), bits))
                };
                let (fused, want) = (run(true)?, run(false)?);
                assert_eq!(
                    fused.0,
                    want.0,
                    "r {r} rank {rank} {cost:?}: prior {} vs {}",
                    f32::from_bits(fused.0),
                    f32::from_bits(want.0)
                );
                assert_eq!(fused.1.len(), want.1.len());
                for (i, (a, b)) in fused.1.iter().zip(&want.1).enumerate() {
                    assert_eq!(
                        a,
                        b,
                        "r {r} rank {rank} {cost:?}: d gate {i}: {} vs {}",
                        f32::from_bits(*a),
                        f32::from_bits(*b)
                    );
                }
                assert!(want.1.iter().filter(|b| f32::from_bits(**b) != 0.0).count() > len / 3, "gradients flow");
            }
        }
        Ok(())
    }
}
