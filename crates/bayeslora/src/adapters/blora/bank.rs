//! Every gate logit of a model in one flat f32 var ([`GateBank`]), and the gate prior of many
//! layers as one vectorised computation over it ([`PriorPlan`]).
//!
//! A B-LoRA model has a rank-gate vector per layer and a bit-gate vector per quantizer (six to
//! eight per layer): hundreds of tiny tensors. As separate vars, each cost its own optimizer
//! slot (a device copy in and out per step), and the prior cost ~50 tiny ops per quantizer in
//! each direction. In one var they are one optimizer slot, and the prior is one op per
//! direction ([`ops::gate_prior`]) whatever the number of layers (as ~55 vectorised candle ops
//! forward and ~100 backward it cost ~150 launches a step).
//!
//! Layout: layer after layer, each layer's rank gates (`[r − 1]`, when it has them) then its
//! quantizers' bit gates (`[4]` each, in [`Slot`] order): the order in which the per-layer vars
//! were listed, so the gate optimizer's flat state (`gates.safetensors`) is unchanged.
//! A layer sees its gates through [`GateRef`]s, views into the bank.
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

use super::gates;
use super::quantizer::Slot;
use crate::{ops, Error, Result};

#[cfg(test)]
mod composed;

/// Bits counted for tensors that are not quantized (f32 compute).
pub(crate) const FULL_BITS: f32 = 32.0;

/// Every gate logit of the layers that share it: one f32 `[G]` var.
#[derive(Debug)]
pub struct GateBank {
    var: Var,
}

impl GateBank {
    /// A bank holding `values` on `device`.
    pub fn new(values: &[f32], device: &Device) -> Result<Arc<GateBank>> {
        Ok(Arc::new(GateBank { var: Var::from_tensor(&Tensor::from_slice(values, values.len(), device)?)? }))
    }

    /// The flat var (what the gate optimizer trains).
    pub fn var(&self) -> &Var {
        &self.var
    }

    pub fn len(&self) -> usize {
        self.var.elem_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One gate vector of a layer: `len` logits at `offset` in a [`GateBank`]. Reads are views of
/// the bank (differentiable: the gradient lands in the bank's var), writes go in place.
#[derive(Debug, Clone)]
pub struct GateRef {
    bank: Arc<GateBank>,
    offset: usize,
    len: usize,
}

impl GateRef {
    /// A vector of `values` in a bank of its own.
    #[cfg(test)]
    pub(crate) fn standalone(values: &[f32], device: &Device) -> Result<GateRef> {
        Ok(GateRef { bank: GateBank::new(values, device)?, offset: 0, len: values.len() })
    }

    /// The `len` logits at `offset` in `bank`.
    pub(crate) fn new(bank: &Arc<GateBank>, offset: usize, len: usize) -> Result<GateRef> {
        let mut r = GateRef { bank: bank.clone(), offset: 0, len };
        r.rebind(bank, offset)?;
        Ok(r)
    }

    /// The same vector in `bank` at `offset` (the values are not copied: [`GateBank`]s are built
    /// from [`Self::to_vec`]).
    pub(crate) fn rebind(&mut self, bank: &Arc<GateBank>, offset: usize) -> Result<()> {
        if offset + self.len > bank.len() {
            return Err(Error::config(
                "gate offset",
                offset,
                format!("{} gates past a bank of {}", self.len, bank.len()),
            ));
        }
        self.bank = bank.clone();
        self.offset = offset;
        Ok(())
    }

    /// The logits, `[len]` f32: a view of the bank's var.
    pub fn as_tensor(&self) -> Result<Tensor> {
        Ok(self.bank.var.as_tensor().narrow(0, self.offset, self.len)?)
    }

    pub fn to_vec(&self) -> Result<Vec<f32>> {
        Ok(self.as_tensor()?.to_vec1::<f32>()?)
    }

    /// Overwrites the logits with `values` (`len` elements, any float dtype).
    pub fn set(&self, values: &Tensor) -> Result<()> {
        if values.elem_count() != self.len {
            return Err(Error::config(
                "gate logits",
                format!("{:?}", values.dims()),
                format!("expected {} values", self.len),
            ));
        }
        let v = values.to_dtype(DType::F32)?.to_device(self.bank.var.device())?.flatten_all()?.copy()?;
        Ok(self.bank.var.as_tensor().slice_set(&v, 0, self.offset)?)
    }

    /// This vector's part of the bank's gradient in `grads`, if the bank has one.
    pub fn grad(&self, grads: &GradStore) -> Result<Option<Tensor>> {
        grads.get(self.bank.var.as_tensor()).map(|g| Ok(g.narrow(0, self.offset, self.len)?)).transpose()
    }

    /// `[len]`, as a var's dims.
    pub fn dims(&self) -> Vec<usize> {
        vec![self.len]
    }

    pub fn elem_count(&self) -> usize {
        self.len
    }

    pub fn offset(&self) -> usize {
        self.offset
    }

    pub fn device(&self) -> &Device {
        self.bank.var.device()
    }

    pub fn bank(&self) -> &Arc<GateBank> {
        &self.bank
    }
}

/// What the prior needs of one layer: its sizes, where its gates sit in the bank, its
/// normalisers.
#[derive(Debug, Clone)]
pub(crate) struct LayerCost {
    pub in_features: usize,
    pub out_features: usize,
    pub r: usize,
    pub quantize_base: bool,
    /// Offset of the rank gates (`[r − 1]`) in the bank.
    pub rank: Option<usize>,
    /// Each quantizer's slot and the offset of its bit gates (`[4]`) in the bank.
    pub bits: Vec<(Slot, usize)>,
    /// The `bops` prior's normaliser.
    pub bops_norm: f64,
}

/// The gate prior of several layers that share a bank, as one op per direction
/// ([`ops::gate_prior`]: every layer's value in one launch, then their sum).
///
/// Per layer the value is what `BLoraLayer::regularizer_with` documents; the total is the sum
/// over the layers. On the CPU the value and the bank's gradient are the floats of the
/// vectorised candle ops that this op replaced ([`composed::ComposedPrior`], kept as the tests'
/// reference).
#[derive(Debug)]
pub(crate) struct PriorPlan {
    plan: ops::GatePlan,
}

/// The number of rank gates of every layer of one prior (`None`: no layer has rank gates); the
/// layers all have rank gates of one r, or none.
pub(crate) fn rank_len(layers: &[LayerCost]) -> Result<Option<usize>> {
    let with_rank: Vec<&LayerCost> = layers.iter().filter(|l| l.rank.is_some()).collect();
    if !(with_rank.is_empty() || with_rank.len() == layers.len()) {
        return Err(Error::config("prune_rank", "mixed", "the layers of one prior all have rank gates or none"));
    }
    let rank_len = with_rank.first().map(|l| l.r - 1);
    if with_rank.iter().any(|l| Some(l.r - 1) != rank_len) {
        return Err(Error::config("r", "mixed", "the layers of one prior share one rank"));
    }
    Ok(rank_len)
}

impl PriorPlan {
    /// The plan for `layers` (one config: all with rank gates of one r, or none).
    pub fn new(layers: &[LayerCost], device: &Device) -> Result<PriorPlan> {
        let rank_len = rank_len(layers)?;
        let count = |l: &LayerCost| (rank_len.unwrap_or(0) + 4 * l.bits.len()).max(1) as f64;
        let op_layers: Vec<ops::PriorLayer> = layers
            .iter()
            .map(|l| ops::PriorLayer {
                rank: l.rank,
                // The op's columns are the slots, in `Slot` order.
                bits: l.bits.iter().map(|&(s, at)| (s as usize, at)).collect(),
                in_features: l.in_features as f64,
                out_features: l.out_features as f64,
                base_macs: if l.quantize_base { l.in_features as f64 * l.out_features as f64 } else { 0.0 },
                rank_full: l.r as f64,
                inv_norm: 1.0 / l.bops_norm,
                inv_count: 1.0 / count(l),
            })
            .collect();
        let consts = ops::PriorConsts {
            logit_shift: gates::logit_shift(),
            hard_off: gates::HARD_OFF,
            full_bits: FULL_BITS as f64,
        };
        Ok(PriorPlan { plan: ops::GatePlan::new(&op_layers, rank_len.unwrap_or(0), consts, device)? })
    }

    /// The summed prior of every layer in the plan over the bank's logits `bank: [G]`, a scalar
    /// differentiable in them.
    pub fn prior(&self, bank: &Tensor, cost: super::GateCost) -> Result<Tensor> {
        let cost = match cost {
            super::GateCost::Bops => ops::PriorCost::Bops,
            super::GateCost::Const => ops::PriorCost::Const,
        };
        Ok(ops::gate_prior(bank, &self.plan, cost)?.sum_all()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The windowed ops read a gate vector straight from the bank: the same samples and the same
    /// bank gradient (zero outside the window) as a narrow of the bank followed by the plain op.
    #[test]
    fn windowed_gate_ops_equal_narrow_then_op() -> Result<()> {
        let dev = Device::Cpu;
        let values: Vec<f32> = (0..23).map(|i| ((i * 7) % 11) as f32 * 0.7 - 3.0).collect();
        let hc = ops::HardConcrete { beta: 2.0 / 3.0, gamma: -0.1, zeta: 1.1, hard_off: Some(-2.0) };
        let rank_hc = ops::HardConcrete { hard_off: None, ..hc };
        for (offset, n) in [(0usize, 4usize), (5, 4), (9, 7), (19, 4), (0, 23)] {
            let noise = Tensor::from_vec(gates::logistic_noise(n, offset as u64), n, &dev)?;
            let w = Tensor::from_vec((0..=n).map(|i| 1.0 + 0.25 * i as f32).collect::<Vec<_>>(), n + 1, &dev)?;
            for rank in [false, true] {
                let run = |windowed: bool| -> Result<(Vec<f32>, Vec<f32>)> {
                    let bank = Var::new(values.as_slice(), &dev)?;
                    let out = match (windowed, rank) {
                        (true, false) => ops::hard_concrete_at(bank.as_tensor(), offset, &noise, hc)?,
                        (true, true) => ops::rank_multiplier_at(bank.as_tensor(), offset, &noise, rank_hc)?,
                        (false, false) => ops::hard_concrete(&bank.as_tensor().narrow(0, offset, n)?, &noise, hc)?,
                        (false, true) => {
                            ops::rank_multiplier(&bank.as_tensor().narrow(0, offset, n)?, &noise, rank_hc)?
                        }
                    };
                    let loss = out.mul(&w.narrow(0, 0, out.elem_count())?)?.sum_all()?;
                    let g = loss.backward()?.get(bank.as_tensor()).map(|g| g.to_vec1::<f32>()).transpose()?;
                    Ok((out.to_vec1::<f32>()?, g.unwrap_or_default()))
                };
                let (a, b) = (run(true)?, run(false)?);
                assert_eq!(a.0, b.0, "offset {offset} n {n} rank {rank}: samples");
                assert_eq!(a.1, b.1, "offset {offset} n {n} rank {rank}: bank gradient");
                assert_eq!(a.1.len(), values.len());
                assert!(a.1.iter().enumerate().all(|(i, g)| (offset..offset + n).contains(&i) || *g == 0.0));
            }
        }
        let bank = Tensor::new(values.as_slice(), &dev)?;
        let noise = Tensor::zeros(4, DType::F32, &dev)?;
        assert!(ops::hard_concrete_at(&bank, 20, &noise, hc).is_err(), "a window past the end is an error");
        assert!(ops::hard_concrete_at(&bank, 0, &noise.to_dtype(DType::F64)?, hc).is_err(), "one dtype");
        Ok(())
    }

    /// A layer's bit gates sampled in one op (`hard_concrete_groups_at`, the hard-off mask per
    /// four) and read by each quantizer at its offset (`gated_quantize_at`), the quantizers
    /// handing their gradients over (`GateGrads`): the same outputs and bank gradient as one
    /// sample op per quantizer; again on a second backward of the same graph, and with a
    /// quantizer that reads no gates (a range still unset).
    #[test]
    fn grouped_gate_samples_equal_per_quantizer_samples() -> Result<()> {
        let dev = Device::Cpu;
        // Soft logits, one below the hard-off threshold (−2): the third quantizer's 8-bit gate.
        let mut values: Vec<f32> = (0..19).map(|i| (i as f32 * 1.3).sin() * 0.4).collect();
        values[12] = -2.5;
        let hc = ops::HardConcrete { beta: 2.0 / 3.0, gamma: -0.1, zeta: 1.1, hard_off: Some(-2.0) };
        let (at, q) = (3usize, 4usize);
        let noise = Tensor::from_vec(gates::logistic_noise(4 * q, 7), 4 * q, &dev)?.affine(0.25, 0.0)?;
        let range = super::super::quantizer::Range { x_min: -2.0, x_max: 2.0 };
        let params = range.params(DType::F32, &dev)?;
        let xs = (0..q)
            .map(|k| Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 3 + k), &dev)?).map_err(Into::into))
            .collect::<Result<Vec<Var>>>()?;
        for used in [q, q - 1] {
            // (outputs, bank gradient, x gradients) of each backward pass.
            type Run = (Vec<Vec<f32>>, Vec<Vec<f32>>, Vec<Vec<f32>>);
            let run = |grouped: bool| -> Result<Run> {
                let bank = Var::new(values.as_slice(), &dev)?;
                let grads = ops::GateGrads::new();
                let z = ops::hard_concrete_groups_at(bank.as_tensor(), at, &noise, hc, 4, Some(&grads))?;
                let outs = (0..used)
                    .map(|k| {
                        let x = xs[k].as_tensor();
                        if grouped {
                            ops::gated_quantize_at(x, &params, &z, 4 * k, Some(&grads))
                        } else {
                            let zk =
                                ops::hard_concrete_at(bank.as_tensor(), at + 4 * k, &noise.narrow(0, 4 * k, 4)?, hc)?;
                            ops::gated_quantize(x, &params, &zk)
                        }
                    })
                    .collect::<candle_core::Result<Vec<Tensor>>>()?;
                let mut loss = Tensor::zeros((), DType::F32, &dev)?;
                for (k, o) in outs.iter().enumerate() {
                    loss = loss.add(&o.sqr()?.sum_all()?.affine(1.0 + k as f64, 0.0)?)?;
                }
                let (mut d_bank, mut d_x) = (Vec::new(), Vec::new());
                for _ in 0..2 {
                    let g = loss.backward()?;
                    d_bank.push(g.get(bank.as_tensor()).map(|t| t.to_vec1::<f32>()).transpose()?.unwrap_or_default());
                    for x in &xs[..used] {
                        d_x.push(
                            g.get(x.as_tensor())
                                .map(|t| t.flatten_all()?.to_vec1::<f32>())
                                .transpose()?
                                .unwrap_or_default(),
                        );
                    }
                }
                let outs =
                    outs.iter().map(|o| o.flatten_all()?.to_vec1::<f32>()).collect::<candle_core::Result<_>>()?;
                Ok((outs, d_bank, d_x))
            };
            let (grouped, single) = (run(true)?, run(false)?);
            assert_eq!(grouped.0, single.0, "{used} quantizers: outputs");
            assert_eq!(grouped.1[0], single.1[0], "{used} quantizers: bank gradient");
            assert_eq!(grouped.1[1], single.1[0], "{used} quantizers: bank gradient of a second backward");
            assert_eq!(grouped.2, single.2, "{used} quantizers: x gradients");
            assert!(
                single.1[0].iter().filter(|g| **g != 0.0).count() >= 4,
                "soft gates pass gradients: {:?}",
                single.1[0]
            );
        }
        // The window must be whole groups.
        let bank = Tensor::new(values.as_slice(), &dev)?;
        assert!(ops::hard_concrete_groups_at(&bank, 0, &noise.narrow(0, 0, 6)?, hc, 4, None).is_err());
        Ok(())
    }

    /// A layer's rank and bit gates in one op (`layer_gates_at`), read by `h ⊙ (E ⊙ m)`
    /// (`scale_by_gates_at`) and the quantizers (`gated_quantize_at`), every consumer handing its
    /// gradient over: the same samples, outputs and bank, h and E gradients, bit for bit, as a
    /// rank multiplier op, candle's `e.mul(m)` and `h.broadcast_mul(..)`, beside the grouped
    /// bit-gate op; also on a second backward of the same graph.
    #[test]
    fn layer_gates_equal_rank_and_bit_ops() -> Result<()> {
        let dev = Device::Cpu;
        let mut values: Vec<f32> = (0..26).map(|i| (i as f32 * 1.3).sin() * 0.6).collect();
        values[14] = -2.5;
        let hc = ops::HardConcrete { beta: 2.0 / 3.0, gamma: -0.1, zeta: 1.1, hard_off: Some(-2.0) };
        let (at, rank, q) = (1usize, 7usize, 4usize);
        let noise = Tensor::from_vec(gates::logistic_noise(rank + 4 * q, 3), rank + 4 * q, &dev)?.affine(0.3, 0.0)?;
        let range = super::super::quantizer::Range { x_min: -2.0, x_max: 2.0 };
        let params = range.params(DType::F32, &dev)?;
        let xs = (0..q)
            .map(|k| Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 2 + k), &dev)?).map_err(Into::into))
            .collect::<Result<Vec<Var>>>()?;
        let e = Var::from_tensor(&Tensor::randn(0f32, 1.0, rank + 1, &dev)?)?;
        let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (6, rank + 1), &dev)?)?;
        type Run = (Vec<Vec<f32>>, Vec<Vec<f32>>);
        let run = |one_op: bool| -> Result<Run> {
            let bank = Var::new(values.as_slice(), &dev)?;
            let grads = ops::GateGrads::new();
            let (scaled, z, bits_at) = if one_op {
                let z = ops::layer_gates_at(bank.as_tensor(), at, &noise, hc, rank, 4, Some(&grads))?;
                (ops::scale_by_gates_at(h.as_tensor(), e.as_tensor(), &z, 0, Some(&grads))?, z, rank + 1)
            } else {
                let rank_hc = ops::HardConcrete { hard_off: None, ..hc };
                let m = ops::rank_multiplier_at(bank.as_tensor(), at, &noise.narrow(0, 0, rank)?, rank_hc)?;
                let bits = noise.narrow(0, rank, 4 * q)?;
                let z = ops::hard_concrete_groups_at(bank.as_tensor(), at + rank, &bits, hc, 4, Some(&grads))?;
                (h.as_tensor().broadcast_mul(&e.as_tensor().mul(&m)?)?, z, 0)
            };
            // Linear in the scaled E: the rank gates get a gradient even where a sample rounds to 0.
            let mut loss = scaled.affine(1.5, 0.0)?.sum_all()?;
            let mut outs = vec![scaled.flatten_all()?.to_vec1::<f32>()?];
            for (k, x) in xs.iter().enumerate() {
                let o = ops::gated_quantize_at(x.as_tensor(), &params, &z, bits_at + 4 * k, Some(&grads))?;
                loss = loss.add(&o.sqr()?.sum_all()?.affine(1.0 + k as f64, 0.0)?)?;
                outs.push(o.flatten_all()?.to_vec1::<f32>()?);
            }
            let mut grads_out = Vec::new();
            for _ in 0..2 {
                let g = loss.backward()?;
                for v in [bank.as_tensor(), e.as_tensor(), h.as_tensor()] {
                    let t = g.get(v).map(|t| t.flatten_all()?.to_vec1::<f32>()).transpose()?;
                    grads_out.push(t.unwrap_or_default());
                }
            }
            Ok((outs, grads_out))
        };
        let (one, two) = (run(true)?, run(false)?);
        assert_eq!(one.0, two.0, "outputs");
        assert_eq!(one.1, two.1, "bank, E and h gradients, two backward passes");
        assert!(one.1[0][at..at + rank].iter().any(|g| *g != 0.0), "the rank gates get gradients");
        let bank = Tensor::new(values.as_slice(), &dev)?;
        assert!(ops::layer_gates_at(&bank, 0, &noise, hc, 0, 4, None).is_err(), "at least one rank gate");
        assert!(ops::layer_gates_at(&bank, 0, &noise.narrow(0, 0, rank + 2)?, hc, rank, 4, None).is_err(), "fours");
        Ok(())
    }
}
