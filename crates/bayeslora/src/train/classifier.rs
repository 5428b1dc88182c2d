//! The task model: a loaded backbone + its adapters, LoRA or B-LoRA ([`Adapters`]) (+ a
//! classification head for encoders),
//! mapping a batch to class logits.
//!
//! Encoders (BERT, DeBERTa-v2/v3) classify from the pooled [CLS] state through a trainable head
//! (HF `BertForSequenceClassification`, `DebertaV2ForSequenceClassification`: `ContextPooler`
//! then `classifier`); decoders (Llama family) score the label words at each
//! row's last prompt token (the IVON-LoRA / Laplace-LoRA protocol), so no head is needed.
use super::Classifier;
use crate::adapters::blora::{attach_blora, AttachedBLora, BLoraConfig};
use crate::adapters::lora::{attach, AttachedAdapters, LoraConfig};
use crate::adapters::Ctx;
use crate::data::BatchTensors;
use crate::models::bert::SequenceClassificationHead;
use crate::models::{Backbone, LoadedModel, Weights};
use crate::{Error, Result};
use candle_core::{Device, Tensor, Var};
use std::collections::HashMap;

/// A backbone with adapters attached, ready to train and evaluate.
pub struct TaskModel {
    pub backbone: Backbone,
    /// The adapter the backbone carries: one kind per model.
    pub adapters: Adapters,
    /// Encoders only.
    pub head: Option<SequenceClassificationHead>,
}

/// The adapter a [`TaskModel`] carries. One enum, so that every consumer (training, export,
/// merge, reports) says what it does with each kind.
#[derive(Debug, Clone, Default)]
pub enum Adapters {
    /// None attached yet (a bare model, e.g. before `export::load_peft`).
    #[default]
    Bare,
    Lora(AttachedAdapters),
    Blora(BLora),
}

/// B-LoRA's attached layers and the strength of its gate prior.
#[derive(Debug, Clone)]
pub struct BLora {
    pub layers: AttachedBLora,
    /// The prior strength μ (the loss adds μ · Σ layer priors).
    pub mu: f64,
    /// The prior's warm-up in steps ([`BLoraConfig::mu_warmup_steps`]; 0: none).
    pub mu_warmup: usize,
}

impl Adapters {
    /// The LoRA layers, if that is the kind.
    pub fn lora(&self) -> Option<&AttachedAdapters> {
        match self {
            Adapters::Lora(a) => Some(a),
            _ => None,
        }
    }
    /// The B-LoRA layers, if that is the kind.
    pub fn blora(&self) -> Option<&AttachedBLora> {
        match self {
            Adapters::Blora(b) => Some(&b.layers),
            _ => None,
        }
    }
    /// The number of adapted modules.
    pub fn len(&self) -> usize {
        match self {
            Adapters::Bare => 0,
            Adapters::Lora(a) => a.len(),
            Adapters::Blora(b) => b.layers.len(),
        }
    }
    /// Whether no module carries an adapter.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The gate logits' key marker: the bank `….blora_gates` (and the per-layer `….blora_gates.rank`,
/// `….blora_gates.lora_A.bits` of older checkpoints).
const GATE_MARK: &str = ".blora_gates";

impl TaskModel {
    /// Attaches LoRA per `lora` (its default targets if none are given) and, for encoders, a
    /// head of `num_labels` outputs (1 = regression), loaded from the checkpoint when present.
    pub fn build(
        loaded: LoadedModel,
        lora: &LoraConfig,
        num_labels: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let LoadedModel { arch, mut backbone, weights, .. } = loaded;
        let lora = lora.clone().with_default_targets(arch);
        let adapters = attach(&mut backbone, &lora, seed, device)?;
        let head = head_for(&backbone, &weights, num_labels, seed ^ 0x4EAD, device)?;
        Ok(TaskModel { adapters: Adapters::Lora(adapters), ..TaskModel::bare(backbone, head) })
    }

    /// Starts a fresh regression head at `targets`' mean (see
    /// [`SequenceClassificationHead::start_regression_at`]); returns that mean when it was set.
    pub fn start_regression_at_mean(&self, targets: &[f32]) -> Result<Option<f32>> {
        let Some(head) = &self.head else { return Ok(None) };
        if targets.is_empty() {
            return Ok(None);
        }
        let mean = (targets.iter().map(|&t| t as f64).sum::<f64>() / targets.len() as f64) as f32;
        Ok(head.start_regression_at(mean)?.then_some(mean))
    }

    /// As [`TaskModel::build`] with B-LoRA adapters (gated rank and bit-widths) per `blora`.
    pub fn build_blora(
        loaded: LoadedModel,
        blora: &BLoraConfig,
        num_labels: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let LoadedModel { arch, mut backbone, weights, .. } = loaded;
        let cfg = blora.clone().with_default_targets(arch);
        let attached = attach_blora(&mut backbone, &cfg, seed, device)?;
        let head = head_for(&backbone, &weights, num_labels, seed ^ 0x4EAD, device)?;
        let blora = BLora { layers: attached, mu: cfg.mu, mu_warmup: cfg.mu_warmup_steps };
        Ok(TaskModel { adapters: Adapters::Blora(blora), ..TaskModel::bare(backbone, head) })
    }

    /// A backbone without adapters (attach later, e.g. by `export::load_peft`).
    pub fn bare(backbone: Backbone, head: Option<SequenceClassificationHead>) -> Self {
        TaskModel { backbone, adapters: Adapters::Bare, head }
    }
}

/// The classification head of an encoder (`num_labels` outputs, from the checkpoint when it has
/// one); decoders score label words and need none.
pub fn head_for(
    backbone: &Backbone,
    weights: &Weights,
    num_labels: usize,
    seed: u64,
    device: &Device,
) -> Result<Option<SequenceClassificationHead>> {
    Ok(match backbone {
        Backbone::Bert(bert) => Some(SequenceClassificationHead::load_or_init(
            weights,
            &bert.config().head_config(),
            num_labels,
            seed,
            device,
        )?),
        Backbone::DebertaV2(deberta) => Some(SequenceClassificationHead::load_or_init(
            weights,
            &deberta.config().head_config(),
            num_labels,
            seed,
            device,
        )?),
        _ => None,
    })
}

/// The prior's weight at optimizer step `step` (0-based) under a linear warm-up of `warmup`
/// steps: (step + 1) / warmup, then 1.
pub fn prior_ramp(step: usize, warmup: usize) -> f64 {
    if warmup == 0 {
        1.0
    } else {
        ((step + 1) as f64 / warmup as f64).min(1.0)
    }
}

impl Classifier for TaskModel {
    fn logits(&self, batch: &BatchTensors, ctx: &Ctx) -> Result<Tensor> {
        match &self.backbone {
            Backbone::Bert(bert) => {
                let hidden = bert.forward(&batch.input_ids, Some(&batch.token_type_ids), &batch.attention_mask, ctx)?;
                let pooled = bert.pooled(&hidden, ctx)?;
                let head = self.head.as_ref().ok_or_else(|| Error::config("head", "none", "encoder needs a head"))?;
                head.forward(&pooled, ctx)
            }
            Backbone::DebertaV2(deberta) => {
                let hidden =
                    deberta.forward(&batch.input_ids, Some(&batch.token_type_ids), &batch.attention_mask, ctx)?;
                let pooled = deberta.pooled(&hidden, ctx)?;
                let head = self.head.as_ref().ok_or_else(|| Error::config("head", "none", "encoder needs a head"))?;
                head.forward(&pooled, ctx)
            }
            Backbone::Llama(llama) => {
                let hidden = llama.forward(&batch.input_ids, &batch.attention_mask, ctx)?;
                let ids = batch.label_token_ids.as_ref().ok_or_else(|| {
                    Error::config("format", "classification", "decoders need label words (prompt format)")
                })?;
                llama.logits_at(&hidden, &batch.last_positions, Some(ids))
            }
            #[allow(unreachable_patterns)]
            _ => Err(Error::config("architecture", "?", "not supported by the task model")),
        }
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        let mut vars = match &self.adapters {
            Adapters::Bare => Vec::new(),
            Adapters::Lora(a) => a.named_vars(),
            Adapters::Blora(b) => {
                let mut v = b.layers.named_weight_vars_with_prefix("");
                v.extend(b.layers.named_gate_vars_with_prefix(""));
                v
            }
        };
        if let Some(h) = &self.head {
            vars.extend(h.named_vars());
        }
        vars
    }

    fn is_head(&self, name: &str) -> bool {
        name.starts_with("classifier.")
    }

    fn is_gate(&self, name: &str) -> bool {
        name.contains(GATE_MARK)
    }

    fn regularizer_weight(&self, step: usize) -> f64 {
        match &self.adapters {
            Adapters::Blora(b) => prior_ramp(step, b.mu_warmup),
            _ => 1.0,
        }
    }

    fn regularizer(&self) -> Result<Option<Tensor>> {
        let Adapters::Blora(b) = &self.adapters else { return Ok(None) };
        match b.layers.regularizer()? {
            Some(prior) if b.mu != 0.0 => Ok(Some(prior.affine(b.mu, 0.0)?)),
            _ => Ok(None),
        }
    }

    fn legacy_trainable(&self, name: &str, saved: &HashMap<String, Tensor>) -> Result<Option<Tensor>> {
        match &self.adapters {
            Adapters::Blora(b) if b.layers.named_gate_vars_with_prefix("").iter().any(|(n, _)| n == name) => {
                b.layers.bank_from_per_layer("", saved)
            }
            _ => Ok(None),
        }
    }

    /// B-LoRA's quantizer ranges (its weights and gates are vars, saved with `trainable`).
    fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        match &self.adapters {
            Adapters::Blora(b) => b.layers.named_ranges_with_prefix(""),
            _ => Ok(Vec::new()),
        }
    }

    fn load_buffers(&self, saved: &HashMap<String, Tensor>) -> Result<()> {
        match &self.adapters {
            Adapters::Blora(b) => b.layers.set_ranges_with_prefix("", saved),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::prior_ramp;

    #[test]
    fn prior_warms_up_linearly_then_stays() {
        assert_eq!(prior_ramp(0, 0), 1.0);
        assert_eq!(prior_ramp(7, 0), 1.0);
        assert_eq!(prior_ramp(0, 4), 0.25);
        assert_eq!(prior_ramp(1, 4), 0.5);
        assert_eq!(prior_ramp(3, 4), 1.0);
        assert_eq!(prior_ramp(100, 4), 1.0);
    }
}
