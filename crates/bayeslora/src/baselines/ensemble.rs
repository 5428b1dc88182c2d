//! Deep ensembles (Lakshminarayanan et al. 2017) of LoRA adapters: N independently seeded
//! AdamW runs; sample k is member k, so `eval::evaluate` with K = N averages the members'
//! softmax probabilities (never their logits).
use crate::data::Batch;
use crate::eval::Predictor;
use crate::{Error, Result};

/// N member predictors. `None` (K = 0) is member 0's point prediction; `Some(k)` is member k's.
pub struct EnsemblePredictor<'a> {
    members: Vec<Box<dyn Predictor + 'a>>,
}

impl<'a> EnsemblePredictor<'a> {
    pub fn new(members: Vec<Box<dyn Predictor + 'a>>) -> Result<Self> {
        if members.is_empty() {
            return Err(Error::config("members", 0, "an ensemble needs at least one member"));
        }
        Ok(EnsemblePredictor { members })
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

impl Predictor for EnsemblePredictor<'_> {
    fn predict(&mut self, batch: &Batch, sample: Option<usize>) -> Result<Vec<f32>> {
        let n = self.members.len();
        let k = sample.unwrap_or(0);
        let member = self.members.get_mut(k).ok_or_else(|| {
            Error::config("samples", k + 1, format!("an ensemble of {n} members has only K = {n} samples"))
        })?;
        member.predict(batch, None)
    }
}
