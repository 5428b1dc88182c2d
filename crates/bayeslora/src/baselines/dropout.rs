//! MC dropout (Gal & Ghahramani 2016) on a LoRA model: the trained (AdamW) weights, dropout kept
//! on at test time, probabilities averaged over K passes (`eval::evaluate` does the averaging).
//!
//! What is on: [`Ctx::train`] enables every dropout of the forward pass — the LoRA dropout
//! (`LoraConfig::lora_dropout`, PEFT's `lora_dropout(x)` before A) and, for BERT encoders, the
//! backbone's embedding/hidden (`hidden_dropout_prob`), attention-probability
//! (`attention_probs_dropout_prob`) and classifier dropouts, exactly as in training. Llama-family
//! decoders have no backbone dropout, so there only the LoRA dropout is sampled (set
//! `lora_dropout` > 0, e.g. ivon-lora's 0.1, or every pass is the same).
use crate::adapters::Ctx;
use crate::data::Batch;
use crate::eval::Predictor;
use crate::train::Classifier;
use crate::Result;
use candle_core::{DType, Device};

/// A classifier with dropout on for samples; sample k uses the masks of `Ctx::train(seed_k)`,
/// so a pass is reproducible and the same masks are used for every batch position of a pass
/// (the seed also mixes in the layer, so layers differ).
pub struct McDropoutPredictor<'a> {
    model: &'a dyn Classifier,
    device: Device,
    seed: u64,
}

impl<'a> McDropoutPredictor<'a> {
    pub fn new(model: &'a dyn Classifier, device: &Device, seed: u64) -> Self {
        McDropoutPredictor { model, device: device.clone(), seed }
    }

    /// The forward context of sample `k` (`None`: dropout off, the plain AdamW model).
    pub fn ctx(&self, sample: Option<usize>) -> Ctx {
        match sample {
            None => Ctx::eval(),
            Some(k) => Ctx { grad: false, ..Ctx::train(Ctx::train(self.seed).seed_for(k as u64 + 1)) },
        }
    }
}

impl Predictor for McDropoutPredictor<'_> {
    fn predict(&mut self, batch: &Batch, sample: Option<usize>) -> Result<Vec<f32>> {
        // Rows of a batch get different masks (the mask covers the whole [B, T, C] tensor); the
        // same batch in the same pass gets the same masks. Different batches of one pass reuse
        // the seed, which is harmless: their rows are different examples.
        let t = batch.to_tensors(&self.device)?;
        let logits = self.model.logits(&t, &self.ctx(sample))?.to_dtype(DType::F32)?;
        Ok(logits.flatten_all()?.to_vec1::<f32>()?)
    }
}
