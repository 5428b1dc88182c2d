//! The task model: a loaded backbone + LoRA adapters (+ a classification head for encoders),
//! mapping a batch to class logits.
//!
//! Encoders (BERT, DeBERTa-v2/v3) classify from the pooled [CLS] state through a trainable head
//! (HF `BertForSequenceClassification`, `DebertaV2ForSequenceClassification`: `ContextPooler`
//! then `classifier`); decoders (Llama family) score the label words at each
//! row's last prompt token (the IVON-LoRA / Laplace-LoRA protocol), so no head is needed.
use super::Classifier;
use crate::adapters::lora::{attach, AttachedAdapters, LoraConfig};
use crate::adapters::Ctx;
use crate::data::BatchTensors;
use crate::models::bert::SequenceClassificationHead;
use crate::models::{Backbone, LoadedModel};
use crate::{Error, Result};
use candle_core::{Device, Tensor, Var};

/// A backbone with adapters attached, ready to train and evaluate.
pub struct TaskModel {
    pub backbone: Backbone,
    pub adapters: AttachedAdapters,
    /// Encoders only.
    pub head: Option<SequenceClassificationHead>,
}

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
        let head = match &backbone {
            Backbone::Bert(bert) => Some(SequenceClassificationHead::load_or_init(
                &weights,
                bert.config(),
                num_labels,
                seed ^ 0x4EAD,
                device,
            )?),
            Backbone::DebertaV2(deberta) => Some(SequenceClassificationHead::load_or_init(
                &weights,
                &deberta.config().head_config(),
                num_labels,
                seed ^ 0x4EAD,
                device,
            )?),
            _ => None,
        };
        Ok(TaskModel { backbone, adapters, head })
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
        let mut vars = self.adapters.named_vars();
        if let Some(h) = &self.head {
            vars.extend(h.named_vars());
        }
        vars
    }

    fn is_head(&self, name: &str) -> bool {
        name.starts_with("classifier.")
    }
}
