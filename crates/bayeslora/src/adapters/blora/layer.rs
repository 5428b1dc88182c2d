//! [`BLoraLayer`]: the gated, quantized adapter `ΔW·x = s · B·diag(z_rank ⊙ Q(E))·A·dropout(x)`,
//! s = α/r (AdaLoRA's SVD form with B-LoRA's gates; `specs/blora.md` "Layer").
//!
//! Shapes: x `[.., in]`, A `[r, in]`, E `[r, 1]` (AdaLoRA's `lora_E`), B `[out, r]`; all f32
//! [`Var`]s whatever the base dtype. The adapter path, per row of x:
//!
//! ```text
//! h = Q_actA(dropout(x)·Q_A(A)ᵀ)          [N, r]
//! g = Q_actE(h ⊙ (z_rank ⊙ Q_E(E)))       [N, r]
//! u = Q_actB(g·Q_B(B)ᵀ)                   [N, out]    output: s·u
//! ```
//!
//! With `quantize_base` the layer also computes the base as `Q_x(x)·Q_W0(W0)ᵀ + b` (through
//! [`Adapter::forward_with_base`]) and feeds `Q_x(x)` to the adapter path too. The base bias stays
//! f32 (the fork quantizes it with W0's quantizer; bias adds are not counted in BOPs).
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_distr::Distribution;

use super::bank::{GateBank, GateRef, LayerCost, PriorPlan};
use super::config::{BLoraConfig, GateCost, InitE};
use super::gates;
use super::quantizer::{train_input, Quantizer, Range, Slot};
use crate::adapters::{Adapter, Ctx};
use crate::{ops, Error, Result};

/// Mixed into the layer's salt for the adapter-input dropout.
const DROPOUT_SALT: u64 = 0xB1_0A_D0_00_00_00_00_00;
/// Mixed into the layer's salt for the gates' uniform noise (plus the slot's index).
const GATE_SALT: u64 = 0xB1_6A_7E_00_00_00_00_00;
/// The rank gates' noise index after the eight quantizer slots.
const RANK_NOISE: u64 = 9;
/// Bits counted for tensors that are not quantized (f32 compute).
const FULL_BITS: f64 = super::bank::FULL_BITS as f64;

/// What training learned for one layer: its rank and each quantized tensor's bit-width, from
/// the deterministic test-time gates.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LearnedLayer {
    pub in_features: usize,
    pub out_features: usize,
    /// Initial rank.
    pub r: usize,
    /// Learned rank r′ (1 + the open prefix of rank gates; `r` without rank gates).
    pub rank: usize,
    /// Bits (2, 4, 8, 16, 32) of every quantized tensor; a tensor that is absent is not quantized.
    pub bits: BTreeMap<Slot, u32>,
    /// Whether the base weight and input are quantized (then `bits` holds `x` and `base`).
    pub quantize_base: bool,
}

impl LearnedLayer {
    pub fn bits(&self, slot: Slot) -> Option<u32> {
        self.bits.get(&slot).copied()
    }
}

/// Test-time adapter weights with gates applied: what the exports write.
#[derive(Debug, Clone)]
pub struct EvalWeights {
    /// Q_A(A), `[r, in]`.
    pub a: Tensor,
    /// Q_E(E), `[r]` (before the rank mask).
    pub e: Tensor,
    /// The rank mask, `[r]` (0/1; all ones without rank gates).
    pub rank_mask: Tensor,
    /// Q_B(B), `[out, r]`.
    pub b: Tensor,
}

/// A layer's gates for one training forward ([`BLoraLayer::gate_samples`]).
struct GateSamples {
    /// Every sample of the layer: the rank multiplier `[r]` (with rank gates), then every
    /// quantizer's bit gates `[4·Q]`.
    z: Tensor,
    /// Where the first quantizer's gates start in `z` (r with rank gates, else 0).
    bits_at: usize,
    /// Where the consumers (the rank multiplier's, the quantizers) hand over their gradients of
    /// `z` ([`ops::GateGrads`]: gathered by the sample's backward, not summed by autograd).
    grads: ops::GateGrads,
}

/// One B-LoRA adapter on one linear layer.
#[derive(Debug)]
pub struct BLoraLayer {
    in_features: usize,
    out_features: usize,
    r: usize,
    scaling: f64,
    dropout: f32,
    /// `[r, in]`, f32.
    lora_a: Var,
    /// `[r, 1]`, f32.
    lora_e: Var,
    /// `[out, r]`, f32.
    lora_b: Var,
    /// log α of the rank gates of components 2..r, `[r − 1]` (`prune_rank` and r > 1).
    rank_logits: Option<GateRef>,
    /// One per quantized tensor, in [`Slot`] order.
    quantizers: Vec<Quantizer>,
    quantize_base: bool,
    cost: GateCost,
    /// The BOPs that normalise the `bops` prior (see [`GateCost::Bops`]).
    bops_norm: f64,
}

impl BLoraLayer {
    /// A fresh layer initialised per `init_e` (LoRA's, AdaLoRA's or the fork's), drawn from `seed`;
    /// gates at `rank_gate_init` / `bit_gate_init`; ranges unset (set by the first training
    /// forward). The `bops` prior is normalised by this layer's own BOPs with every gate on until
    /// [`super::attach_blora`] sets the mean over the adapted layers.
    pub fn new(in_features: usize, out_features: usize, cfg: &BLoraConfig, seed: u64, device: &Device) -> Result<Self> {
        cfg.validate()?;
        if in_features == 0 || out_features == 0 {
            return Err(Error::config(
                "in_features",
                in_features,
                format!("a B-LoRA layer needs in, out ≥ 1 (out = {out_features})"),
            ));
        }
        let r = cfg.r;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let normal =
            |std: f32| rand_distr::Normal::new(0f32, std).map_err(|e| Error::config("init", std, e.to_string()));
        let small = normal(0.02)?;
        let (a, b, e): (Vec<f32>, Vec<f32>, Vec<f32>) = match cfg.init_e {
            InitE::Lora => {
                let bound = 1.0 / (in_features as f32).sqrt();
                let uniform = rand_distr::Uniform::new_inclusive(-bound, bound)
                    .map_err(|e| Error::config("in_features", in_features, e.to_string()))?;
                let a = (0..r * in_features).map(|_| uniform.sample(&mut rng)).collect();
                (a, vec![0.0; out_features * r], vec![1.0; r])
            }
            InitE::Zero | InitE::Normal => {
                let a = (0..r * in_features).map(|_| small.sample(&mut rng)).collect();
                let b = (0..out_features * r).map(|_| small.sample(&mut rng)).collect();
                let e = match cfg.init_e {
                    InitE::Normal => {
                        let unit = normal(1.0)?;
                        (0..r).map(|_| unit.sample(&mut rng)).collect()
                    }
                    _ => vec![0.0; r],
                };
                (a, b, e)
            }
        };
        let lora_a = Var::from_tensor(&Tensor::from_vec(a, (r, in_features), device)?)?;
        let lora_b = Var::from_tensor(&Tensor::from_vec(b, (out_features, r), device)?)?;
        let lora_e = Var::from_tensor(&Tensor::from_vec(e, (r, 1), device)?)?;
        let rank_len = if cfg.prune_rank && r > 1 { r - 1 } else { 0 };
        let slots: Vec<Slot> = Slot::ALL
            .into_iter()
            .filter(|s| {
                cfg.quantize
                    && match s {
                        Slot::Input | Slot::Base => cfg.quantize_base,
                        Slot::ActA | Slot::ActE | Slot::ActB => cfg.quantize_activations,
                        Slot::LoraA | Slot::LoraE | Slot::LoraB => true,
                    }
            })
            .collect();
        // The layer's gates in one bank (rank gates, then each quantizer's bit gates), until
        // `attach_blora` moves every layer into the model's bank.
        let mut init = vec![cfg.rank_gate_init as f32; rank_len];
        for _ in &slots {
            init.extend(cfg.bit_gate_init.map(|a| a as f32));
        }
        let bank = GateBank::new(&init, device)?;
        let rank_logits = (rank_len > 0).then(|| GateRef::new(&bank, 0, rank_len)).transpose()?;
        let quantizers = slots
            .into_iter()
            .enumerate()
            .map(|(k, s)| Ok(Quantizer::with_logits(s, GateRef::new(&bank, rank_len + 4 * k, 4)?)))
            .collect::<Result<Vec<_>>>()?;
        let mut layer = BLoraLayer {
            in_features,
            out_features,
            r,
            scaling: cfg.scaling(),
            dropout: cfg.lora_dropout,
            lora_a,
            lora_e,
            lora_b,
            rank_logits,
            quantizers,
            quantize_base: cfg.quantize && cfg.quantize_base,
            cost: cfg.cost,
            bops_norm: 1.0,
        };
        layer.bops_norm = layer.full_bops();
        Ok(layer)
    }

    /// Sets the normaliser of the `bops` prior (positive; [`super::attach_blora`] passes the mean
    /// of [`Self::full_bops`] over the adapted layers, so big layers cost more than small ones).
    pub fn set_bops_norm(&mut self, norm: f64) -> Result<()> {
        if !(norm.is_finite() && norm > 0.0) {
            return Err(Error::config("bops_norm", norm, "must be a positive number"));
        }
        self.bops_norm = norm;
        Ok(())
    }

    /// BOPs per token of the gated matmuls with every gate on (32 bits, full rank): the adapter's
    /// three, plus the base with `quantize_base`.
    pub fn full_bops(&self) -> f64 {
        let (i, o, r) = (self.in_features as f64, self.out_features as f64, self.r as f64);
        let base = if self.quantize_base { i * o } else { 0.0 };
        (base + r * (i + 1.0 + o)) * FULL_BITS * FULL_BITS
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// The initial rank r.
    pub fn rank(&self) -> usize {
        self.r
    }

    /// `lora_alpha / r`.
    pub fn scaling(&self) -> f64 {
        self.scaling
    }

    pub fn lora_a(&self) -> &Var {
        &self.lora_a
    }

    pub fn lora_e(&self) -> &Var {
        &self.lora_e
    }

    pub fn lora_b(&self) -> &Var {
        &self.lora_b
    }

    /// A, E, B with PEFT AdaLoRA's names: the weights for the main optimizer (IVON or AdamW).
    pub fn weight_vars(&self) -> Vec<(String, Var)> {
        vec![
            ("lora_A.weight".into(), self.lora_a.clone()),
            ("lora_E".into(), self.lora_e.clone()),
            ("lora_B.weight".into(), self.lora_b.clone()),
        ]
    }

    /// The layer's gate logits, views into the model's [`GateBank`] (whose one var the gate
    /// optimizer trains): `blora_gates.rank` `[r − 1]` and `blora_gates.<slot>.bits` `[4]` (4-,
    /// 8-, 16-, 32-bit gates), in bank order.
    pub fn gate_vars(&self) -> Vec<(String, GateRef)> {
        let mut v: Vec<(String, GateRef)> =
            self.rank_logits.iter().map(|l| ("blora_gates.rank".to_string(), l.clone())).collect();
        v.extend(self.quantizers.iter().map(|q| (format!("blora_gates.{}.bits", q.slot.name()), q.logits.clone())));
        v
    }

    /// The bank holding this layer's gates (`None` without gates).
    pub fn gate_bank(&self) -> Option<&Arc<GateBank>> {
        match (&self.rank_logits, self.quantizers.first()) {
            (Some(l), _) => Some(l.bank()),
            (None, Some(q)) => Some(q.logits.bank()),
            (None, None) => None,
        }
    }

    /// How many gate logits the layer has: r − 1 rank gates (if any) and 4 per quantizer.
    pub fn gate_count(&self) -> usize {
        self.rank_logits.as_ref().map_or(0, GateRef::elem_count) + 4 * self.quantizers.len()
    }

    /// Moves the layer's gates to `bank` at `offset` (their values must already be there, in
    /// [`Self::gate_vars`] order: [`super::attach_blora`] builds the bank from them).
    pub(crate) fn bind_gates(&mut self, bank: &Arc<GateBank>, offset: usize) -> Result<()> {
        let mut at = offset;
        if let Some(l) = self.rank_logits.as_mut() {
            l.rebind(bank, at)?;
            at += l.elem_count();
        }
        for q in &mut self.quantizers {
            q.logits.rebind(bank, at)?;
            at += 4;
        }
        Ok(())
    }

    /// What the prior needs of this layer (offsets into its bank).
    pub(crate) fn cost_terms(&self) -> LayerCost {
        LayerCost {
            in_features: self.in_features,
            out_features: self.out_features,
            r: self.r,
            quantize_base: self.quantize_base,
            rank: self.rank_logits.as_ref().map(GateRef::offset),
            bits: self.quantizers.iter().map(|q| (q.slot, q.logits.offset())).collect(),
            bops_norm: self.bops_norm,
        }
    }

    pub(crate) fn quantizer(&self, slot: Slot) -> Option<&Quantizer> {
        self.quantizers.iter().find(|q| q.slot == slot)
    }

    /// The quantized slots, in [`Slot`] order.
    pub fn slots(&self) -> Vec<Slot> {
        self.quantizers.iter().map(|q| q.slot).collect()
    }

    /// Every quantizer's range (unset ranges are all-zero).
    pub fn ranges(&self) -> Result<BTreeMap<Slot, Range>> {
        self.quantizers.iter().map(|q| Ok((q.slot, q.range()?))).collect()
    }

    pub fn set_range(&self, slot: Slot, range: Range) -> Result<()> {
        let q = self
            .quantizer(slot)
            .ok_or_else(|| Error::config("blora range", slot.name(), "this layer does not quantize that tensor"))?;
        q.set_range(range)
    }

    fn noise_seed(ctx: &Ctx, salt: u64, index: u64) -> u64 {
        ctx.seed_for(salt ^ GATE_SALT ^ (index + 1).wrapping_mul(0x1_0000_0001))
    }

    /// The number of rank gates (r − 1 with `prune_rank`, else 0).
    fn rank_len(&self) -> usize {
        self.rank_logits.as_ref().map_or(0, GateRef::elem_count)
    }

    /// The logistic noise of every gate of the layer for one training forward, in bank order:
    /// the rank gates' `[r − 1]`, then each quantizer's four. Each vector is drawn from its own
    /// seed as before (so the samples are unchanged); the whole is one host→device copy per
    /// forward instead of one per gate vector. `None` outside training or without gates.
    fn gate_noise(&self, ctx: &Ctx, salt: u64) -> Result<Option<Tensor>> {
        let Some(bank) = self.gate_bank().filter(|_| ctx.train) else { return Ok(None) };
        let rank_len = self.rank_len();
        let mut noise = Vec::with_capacity(self.gate_count());
        if rank_len > 0 {
            noise.extend(gates::logistic_noise(rank_len, Self::noise_seed(ctx, salt, RANK_NOISE)));
        }
        for q in &self.quantizers {
            noise.extend(gates::logistic_noise(4, Self::noise_seed(ctx, salt, q.slot as u64)));
        }
        let n = noise.len();
        Ok(Some(Tensor::from_vec(noise, n, bank.var().device())?))
    }

    /// The gate samples of one training forward, drawn from the layer's noise
    /// ([`Self::gate_noise`]) in one op: the rank multiplier and every quantizer's bit gates
    /// (in quantizer order) with rank gates ([`gates::sample_layer_gates`]), else the bit gates
    /// alone ([`gates::sample_bit_groups`]). The layer's gates sit side by side in the bank (rank
    /// gates, then each quantizer's, [`Self::bind_gates`]), so one window holds them all.
    fn gate_samples(&self, ctx: &Ctx, salt: u64) -> Result<Option<GateSamples>> {
        let Some(noise) = self.gate_noise(ctx, salt)? else { return Ok(None) };
        let grads = ops::GateGrads::new();
        let rank_len = self.rank_len();
        let first = match (&self.rank_logits, self.quantizers.first()) {
            (Some(l), _) => l,
            (None, Some(q)) => &q.logits,
            (None, None) => return Ok(None),
        };
        let (bank, at) = (first.bank(), first.offset());
        if self.quantizers.iter().enumerate().any(|(k, q)| q.logits.offset() != at + rank_len + 4 * k) {
            return Err(Error::config("gate offset", at, "a layer's gates must be contiguous in the bank"));
        }
        let bank = bank.var().as_tensor();
        let (z, bits_at) = if rank_len > 0 {
            (gates::sample_layer_gates(bank, at, &noise, rank_len, &grads)?, rank_len + 1)
        } else {
            (gates::sample_bit_groups(bank, at, &noise, &grads)?, 0)
        };
        Ok(Some(GateSamples { z, bits_at, grads }))
    }

    /// Quantizes `x` with `slot`'s quantizer (if any): training when `samples` (the layer's, from
    /// [`Self::gate_samples`]) are given, test time otherwise.
    fn quant(&self, slot: Slot, x: &Tensor, samples: Option<&GateSamples>) -> Result<Tensor> {
        let Some(k) = self.quantizers.iter().position(|q| q.slot == slot) else { return Ok(x.clone()) };
        let z = samples.map(|s| (&s.z, s.bits_at + 4 * k, Some(&s.grads)));
        self.quantizers[k].forward_with_gates(x, z)
    }

    /// [`Self::quant`] of the adapter weights (A, E, B: known before the forward, unlike the
    /// activations). While training, their ranges are updated by one op (one CUDA launch,
    /// [`ops::update_ranges`]) instead of one each; the same floats.
    fn quant_weights(&self, weights: [(Slot, Tensor); 3], samples: Option<&GateSamples>) -> Result<[Tensor; 3]> {
        let Some(s) = samples else {
            let [(sa, a), (se, e), (sb, b)] = weights;
            return Ok([self.quant(sa, &a, None)?, self.quant(se, &e, None)?, self.quant(sb, &b, None)?]);
        };
        // Per weight: its quantizer's index, the weight as quantized, and the range to widen
        // (`None`: a frozen grid).
        let mut quantized = Vec::with_capacity(3);
        for (slot, w) in &weights {
            quantized.push(match self.quantizers.iter().position(|q| q.slot == *slot) {
                Some(k) => {
                    let xq = train_input(w)?;
                    let current = self.quantizers[k].current_range(xq.device())?;
                    Some((k, xq, current))
                }
                None => None,
            });
        }
        let (xs, ranges): (Vec<Tensor>, Vec<Tensor>) =
            quantized.iter().flatten().filter_map(|(_, xq, r)| Some((xq.clone(), r.clone()?))).unzip();
        let mut widened = match xs.len() {
            0 => Vec::new(),
            1 => vec![ops::update_range(&xs[0], &ranges[0])?],
            n => {
                let rows = ops::update_ranges(&xs, &ranges)?;
                (0..n).map(|j| rows.get(j)).collect::<candle_core::Result<Vec<_>>>()?
            }
        }
        .into_iter();
        let mut out = Vec::with_capacity(3);
        for ((_, w), q) in weights.iter().zip(quantized) {
            out.push(match q {
                Some((k, xq, current)) => {
                    let widened = if current.is_some() { widened.next() } else { None };
                    self.quantizers[k].forward_widened(w, &xq, widened, (&s.z, s.bits_at + 4 * k, Some(&s.grads)))?
                }
                None => w.clone(),
            });
        }
        out.try_into().map_err(|_| Error::config("blora weights", 3, "invariant: one output per weight"))
    }

    /// `h ⊙ (e ⊙ m)` for `h: [N, r]`, `e: [r]` and the rank multiplier m `[r]`: 1 for component
    /// 1, then the sampled nested gates (training: `samples` given, one op per direction,
    /// [`ops::scale_by_gates_at`]) or the deterministic prefix (test time); `h ⊙ e` without rank
    /// gates.
    fn scale_rank(&self, h: &Tensor, e: &Tensor, samples: Option<&GateSamples>) -> Result<Tensor> {
        if self.rank_logits.is_none() {
            return Ok(h.broadcast_mul(e)?);
        }
        match samples {
            Some(s) => Ok(ops::scale_by_gates_at(h, e, &s.z, 0, Some(&s.grads))?),
            None => Ok(h.broadcast_mul(&e.mul(&self.rank_mask()?)?)?),
        }
    }

    /// The deterministic rank multiplier `[r]` (test time): 1 up to the learned rank, then 0.
    fn rank_mask(&self) -> Result<Tensor> {
        let rank = self.learned_rank()?;
        let m: Vec<f32> = (0..self.r).map(|i| if i < rank { 1.0 } else { 0.0 }).collect();
        Ok(Tensor::from_vec(m, self.r, self.lora_e.device())?)
    }

    fn learned_rank(&self) -> Result<usize> {
        match &self.rank_logits {
            Some(l) => Ok(1 + gates::open_prefix(&l.to_vec()?)),
            None => Ok(self.r),
        }
    }

    /// The adapter path on `x: [N, in]` (f32, already through Q_x when the base is quantized);
    /// `samples` are the layer's gate samples while training ([`Self::gate_samples`]).
    fn delta(&self, x: &Tensor, ctx: &Ctx, salt: u64, samples: Option<&GateSamples>) -> Result<Tensor> {
        let x = if ctx.train && self.dropout > 0.0 {
            ops::dropout(x, self.dropout, ctx.seed_for(salt ^ DROPOUT_SALT))?
        } else {
            x.clone()
        };
        let [a, e, b] = self.quant_weights(
            [
                (Slot::LoraA, ctx.param(&self.lora_a)),
                (Slot::LoraE, ctx.param(&self.lora_e)),
                (Slot::LoraB, ctx.param(&self.lora_b)),
            ],
            samples,
        )?;
        let h = self.quant(Slot::ActA, &x.matmul(&a.t()?)?, samples)?;
        let g = self.quant(Slot::ActE, &self.scale_rank(&h, &e.reshape(self.r)?, samples)?, samples)?;
        let u = self.quant(Slot::ActB, &g.matmul(&b.t()?)?, samples)?;
        Ok(u.affine(self.scaling, 0.0)?)
    }

    /// `x: [.., in]` → (`[N, in]` f32, the output dims with `out` last).
    fn flatten(&self, x: &Tensor) -> Result<(Tensor, Vec<usize>)> {
        let mut dims = x.dims().to_vec();
        let rows = x.elem_count() / self.in_features;
        if dims.last() != Some(&self.in_features) {
            return Err(Error::config(
                "input",
                format!("{dims:?}"),
                format!("the adapted layer expects {} input features", self.in_features),
            ));
        }
        if let Some(last) = dims.last_mut() {
            *last = self.out_features;
        }
        Ok((x.to_dtype(DType::F32)?.reshape((rows, self.in_features))?, dims))
    }

    /// Test-time weights (deterministic gates, frozen ranges), for the exports.
    pub fn eval_weights(&self) -> Result<EvalWeights> {
        let a = self.quant(Slot::LoraA, self.lora_a.as_tensor(), None)?;
        let e = self.quant(Slot::LoraE, self.lora_e.as_tensor(), None)?.reshape(self.r)?;
        let b = self.quant(Slot::LoraB, self.lora_b.as_tensor(), None)?;
        let rank_mask = match self.rank_logits {
            Some(_) => self.rank_mask()?,
            None => Tensor::ones(self.r, DType::F32, self.lora_e.device())?,
        };
        Ok(EvalWeights { a, e, rank_mask, b })
    }

    /// What the deterministic gates give: the learned rank and every quantized tensor's bits.
    pub fn learned(&self) -> Result<LearnedLayer> {
        Ok(LearnedLayer {
            in_features: self.in_features,
            out_features: self.out_features,
            r: self.r,
            rank: self.learned_rank()?,
            bits: self.quantizers.iter().map(|q| Ok((q.slot, q.bits()?))).collect::<Result<_>>()?,
            quantize_base: self.quantize_base,
        })
    }

    /// The layer's gate prior (μ not included), a scalar differentiable in the gate logits:
    /// `Σ_g cost(g) · P(g and every lower gate on)`.
    ///
    /// - [`GateCost::Bops`]: the expected BOPs per token of the gated matmuls (under independent
    ///   gates `E[r′·b·b′] = E[r′]·E[b]·E[b′]`), `E[r′]·(in·b_x·b_A + b_actA·b_E + out·b_actE·b_B)`
    ///   plus `in·out·b_x·b_W0` with `quantize_base`, over the normaliser (unquantized tensors
    ///   count 32 bits; `act_B` feeds no matmul of this layer and costs nothing).
    /// - [`GateCost::Const`]: the expected number of open gates over the number of gates.
    ///
    /// Rank gates enter through the cumulative product, as the forward uses them (the fork's prior
    /// uses each rank gate's own marginal instead).
    pub fn regularizer_with(&self, cost: GateCost) -> Result<Tensor> {
        let Some(bank) = self.gate_bank() else {
            return Err(Error::config("blora prior", "no gates", "this layer has neither rank nor bit gates"));
        };
        PriorPlan::new(&[self.cost_terms()], bank.var().device())?.prior(bank.var().as_tensor(), cost)
    }

    /// Every tensor of the adapter's state, named: the weights, the gate logits and each
    /// quantizer's range (`blora_ranges.<slot>.x_min` / `.x_max`, `[1]`). Enough to resume or
    /// reload the layer exactly.
    pub fn named_state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out: Vec<(String, Tensor)> =
            self.weight_vars().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
        for (n, g) in self.gate_vars() {
            out.push((n, g.as_tensor()?.copy()?));
        }
        out.extend(self.named_ranges()?);
        Ok(out)
    }

    /// Each quantizer's range as `blora_ranges.<slot>.x_min` / `.x_max` (`[1]`): the state that
    /// is not a var (fixed while training, read at test time).
    pub fn named_ranges(&self) -> Result<Vec<(String, Tensor)>> {
        let dev = self.lora_a.device();
        let mut out = Vec::with_capacity(2 * self.quantizers.len());
        for q in &self.quantizers {
            let r = q.range()?;
            out.push((format!("blora_ranges.{}.x_min", q.slot.name()), Tensor::new(&[r.x_min], dev)?));
            out.push((format!("blora_ranges.{}.x_max", q.slot.name()), Tensor::new(&[r.x_max], dev)?));
        }
        Ok(out)
    }

    /// Restores [`Self::named_state`]; every name must be present with its shape.
    pub fn set_state(&self, state: &HashMap<String, Tensor>) -> Result<()> {
        for (name, var) in self.weight_vars() {
            var.set(&state_tensor(state, &name, var.dims())?.to_device(var.device())?)?;
        }
        for (name, gates) in self.gate_vars() {
            gates.set(&state_tensor(state, &name, &gates.dims())?)?;
        }
        self.set_ranges(state)
    }

    /// Restores [`Self::named_ranges`]; every name must be present.
    pub fn set_ranges(&self, state: &HashMap<String, Tensor>) -> Result<()> {
        for q in &self.quantizers {
            let lo = state_tensor(state, &format!("blora_ranges.{}.x_min", q.slot.name()), &[1])?.to_vec1::<f32>()?;
            let hi = state_tensor(state, &format!("blora_ranges.{}.x_max", q.slot.name()), &[1])?.to_vec1::<f32>()?;
            q.set_range(Range { x_min: lo[0], x_max: hi[0] })?;
        }
        Ok(())
    }
}

/// `state[name]` as f32, which must have shape `dims`.
fn state_tensor(state: &HashMap<String, Tensor>, name: &str, dims: &[usize]) -> Result<Tensor> {
    let t = state.get(name).ok_or_else(|| Error::config(name, "missing", "the B-LoRA state lacks this tensor"))?;
    if t.dims() != dims {
        return Err(Error::config(name, format!("{:?}", t.dims()), format!("expected shape {dims:?}")));
    }
    Ok(t.to_dtype(DType::F32)?)
}

impl Adapter for BLoraLayer {
    /// `x: [.., in]` → `s·u`, `[.., out]`, f32 (the adapter path only; x goes through Q_x first
    /// when the base is quantized).
    fn forward(&self, x: &Tensor, ctx: &Ctx, salt: u64) -> Result<Tensor> {
        let (x2, dims) = self.flatten(x)?;
        let samples = self.gate_samples(ctx, salt)?;
        let x2 = self.quant(Slot::Input, &x2, samples.as_ref())?;
        Ok(self.delta(&x2, ctx, salt, samples.as_ref())?.reshape(dims)?)
    }

    /// With `quantize_base`: `Q_x(x)·Q_W0(W0)ᵀ + b + s·u`, x quantized once for both paths, in
    /// x's dtype. The base matmul is a plain (differentiable) matmul so that W0's bit gates get
    /// their gradient.
    fn forward_with_base(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        ctx: &Ctx,
        salt: u64,
    ) -> Option<Result<Tensor>> {
        if !self.quantize_base {
            return None;
        }
        Some((|| {
            let (x2, dims) = self.flatten(x)?;
            let samples = self.gate_samples(ctx, salt)?;
            let xq = self.quant(Slot::Input, &x2, samples.as_ref())?;
            let w = self.quant(Slot::Base, &weight.to_dtype(DType::F32)?, samples.as_ref())?;
            let mut y = xq.matmul(&w.t()?)?;
            if let Some(b) = bias {
                y = y.broadcast_add(&b.to_dtype(DType::F32)?)?;
            }
            let y = y.add(&self.delta(&xq, ctx, salt, samples.as_ref())?)?;
            Ok(y.reshape(dims)?.to_dtype(x.dtype())?)
        })())
    }

    fn named_vars(&self) -> Vec<(String, Var)> {
        self.weight_vars()
    }

    /// The bank's one var (shared by every layer of the model: the same var from each).
    fn named_gate_vars(&self) -> Vec<(String, Var)> {
        self.gate_bank().map(|b| ("blora_gates".to_string(), b.var().clone())).into_iter().collect()
    }

    fn regularizer(&self) -> Result<Option<Tensor>> {
        if self.rank_logits.is_none() && self.quantizers.is_empty() {
            return Ok(None);
        }
        self.regularizer_with(self.cost).map(Some)
    }

    fn peft_type(&self) -> &'static str {
        "BLORA"
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod prior_reference;

#[cfg(test)]
mod tests;
