//! Every gate logit of a model in one flat f32 var ([`GateBank`]), and the gate prior of many
//! layers as one vectorised computation over it ([`PriorPlan`]).
//!
//! A B-LoRA model has a rank-gate vector per layer and a bit-gate vector per quantizer (six to
//! eight per layer): hundreds of tiny tensors. As separate vars, each cost its own optimizer
//! slot (a device copy in and out per step), and the prior cost ~50 tiny ops per quantizer in
//! each direction. In one var they are one optimizer slot, and the prior is ~40 ops whatever
//! the number of layers.
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
use crate::{Error, Result};

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

/// The gate prior of several layers that share a bank, as one computation: index and
/// coefficient tensors built once on the bank's device.
///
/// Per layer the value is what `BLoraLayer::regularizer_with` documents; the total is the sum
/// over the layers. The per-layer arithmetic is the per-layer path's, op for op, on vectors over
/// the layers (so the forward is the same floats on the CPU).
#[derive(Debug)]
pub(crate) struct PriorPlan {
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

/// Columns of [`PriorPlan::open_idx`]: the rank gates and up to eight quantizers.
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

impl PriorPlan {
    /// The plan for `layers` (one config: all with rank gates of one r, or none).
    pub fn new(layers: &[LayerCost], device: &Device) -> Result<PriorPlan> {
        let with_rank: Vec<&LayerCost> = layers.iter().filter(|l| l.rank.is_some()).collect();
        if !(with_rank.is_empty() || with_rank.len() == layers.len()) {
            return Err(Error::config("prune_rank", "mixed", "the layers of one prior all have rank gates or none"));
        }
        let rank_len = with_rank.first().map(|l| l.r - 1);
        if with_rank.iter().any(|l| Some(l.r - 1) != rank_len) {
            return Err(Error::config("r", "mixed", "the layers of one prior share one rank"));
        }
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
        Ok(PriorPlan {
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
    pub fn prior(&self, bank: &Tensor, cost: super::GateCost) -> Result<Tensor> {
        let nested = match &self.bits_idx {
            Some(idx) => Some(Self::nested_bits(&bank.index_select(idx, 0)?.reshape((self.quantizers, 4))?)?),
            None => None,
        };
        let rank_open = self.rank_open(bank)?;
        match cost {
            super::GateCost::Bops => {
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
            super::GateCost::Const => {
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
    use super::*;
    use crate::ops;

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
}
