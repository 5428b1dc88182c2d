//! Bayesian and calibration baselines on the same LoRA setup, and the sweep tables that compare
//! them (the "Calibration evaluation suite" issue; `specs/evaluation.md`, `reference/peers.md` §2).
//!
//! # Brief overview
//! Every baseline is an [`eval::Predictor`](crate::eval::Predictor), so [`eval::evaluate`]
//! scores them exactly as it scores IVON (probabilities averaged over K samples):
//! - AdamW (MAP) and IVON: [`ModelPredictor`](crate::eval::ModelPredictor) (point / posterior).
//! - [`McDropoutPredictor`]: an AdamW model with dropout kept on at test time, sample k = one
//!   dropout mask seeded by k. `Ctx::train` switches on *every* dropout of the forward pass: the
//!   LoRA dropout (`lora_dropout`) and, for BERT, the backbone's hidden, attention-probability and
//!   classifier dropouts (`hidden_dropout_prob`, …; 0.1 in MiniLM). Llama has no backbone dropout.
//! - [`EnsemblePredictor`]: N independently seeded adapters, sample k = member k (a deep
//!   ensemble averages member probabilities, Lakshminarayanan et al. 2017).
//! - [`TemperaturePredictor`] + [`fit_temperature`]: one temperature T fitted by NLL on a held-out
//!   split of the training data (Guo et al. 2017), predicting softmax(z / T).
//! - [`laplace`]: post-hoc diagonal Laplace over the LoRA (and head) weights with the empirical
//!   Fisher, prior precision tuned on the held-out split, MC predictive.
//! - [`sweep`]: per-cell result files (`<out>/cells/<task>/<method>/seed<k>.json`), resume, and
//!   the aggregate tables (Markdown, CSV, JSON: mean ± std over seeds);
//!   [`summary_files`] writes them and the plots (reliability, K curves, learned ranks/bits).
//!
//! # Example
//! ```
//! use bayeslora::baselines::fit_temperature;
//! // two classes; an over-confident model: logits 4× too large for these labels
//! let logits = [4.0f32, 0.0, 0.0, 4.0, 4.0, 0.0, 4.0, 0.0];
//! let labels = [0, 1, 1, 0];
//! let t = fit_temperature(&logits, &[], &labels, 2).unwrap();
//! assert!(t > 1.0); // half the labels disagree with the argmax: soften
//! ```
mod dropout;
mod ensemble;
pub mod laplace;
pub mod summary_files;
pub mod sweep;
mod temperature;

pub use dropout::McDropoutPredictor;
pub use ensemble::EnsemblePredictor;
pub use laplace::{LaplaceConfig, LaplaceFit};
pub use temperature::{collect_logits, fit_temperature, TemperaturePredictor};

use crate::data::EncodedDataset;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// The methods a sweep compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MethodKind {
    /// The base model without training (a decoder's zero-shot accuracy: LoRA B starts at 0, so
    /// the adapters add nothing). Not in [`MethodKind::ALL`]: ask for `base` by name.
    Base,
    /// AdamW point estimate (MAP with weight decay; MLE without).
    Adamw,
    /// IVON: posterior predictive over K samples, and at the mean (K = 0).
    Ivon,
    /// AdamW model, dropout on at test time over K passes.
    McDropout,
    /// N AdamW models with different seeds, K = N.
    Ensemble,
    /// AdamW model, one temperature fitted on held-out data.
    Temperature,
    /// AdamW model + diagonal Laplace posterior over the trainable weights.
    Laplace,
}

impl MethodKind {
    pub const ALL: [MethodKind; 6] = [
        MethodKind::Adamw,
        MethodKind::Ivon,
        MethodKind::McDropout,
        MethodKind::Ensemble,
        MethodKind::Temperature,
        MethodKind::Laplace,
    ];

    /// The snake_case name used in configs and file paths.
    pub fn name(self) -> &'static str {
        match self {
            MethodKind::Base => "base",
            MethodKind::Adamw => "adamw",
            MethodKind::Ivon => "ivon",
            MethodKind::McDropout => "mc_dropout",
            MethodKind::Ensemble => "ensemble",
            MethodKind::Temperature => "temperature",
            MethodKind::Laplace => "laplace",
        }
    }

    /// Parses a method name.
    pub fn from_name(name: &str) -> Result<Self> {
        let kinds = std::iter::once(MethodKind::Base).chain(MethodKind::ALL);
        kinds.clone().find(|m| m.name() == name).ok_or_else(|| {
            let all: Vec<&str> = kinds.map(|m| m.name()).collect();
            Error::config("method", name, format!("supported: {}", all.join(", ")))
        })
    }

    /// Whether the method trains with IVON (all others start from AdamW models).
    pub fn uses_ivon(self) -> bool {
        self == MethodKind::Ivon
    }

    /// Whether its K = 0 prediction is a model of its own worth a table row: IVON's mean μ.
    /// (MC dropout's, Laplace's and the ensemble's K = 0 is the AdamW model itself.)
    pub fn has_distinct_mean(self) -> bool {
        self == MethodKind::Ivon
    }

    /// Whether it needs the held-out split (temperature, Laplace's prior precision).
    pub fn needs_heldout(self) -> bool {
        matches!(self, MethodKind::Temperature | MethodKind::Laplace)
    }
}

/// Splits `data` into (train, held-out) with `fraction` of the rows held out, chosen by a
/// seeded shuffle (SplitMix64, so the split never changes with a `rand` upgrade). All methods of
/// a sweep train on the same remaining rows; only temperature scaling and Laplace's prior
/// precision look at the held-out rows.
pub fn holdout(data: &EncodedDataset, fraction: f64, seed: u64) -> Result<(EncodedDataset, EncodedDataset)> {
    if !(0.0..1.0).contains(&fraction) {
        return Err(Error::config("heldout_fraction", fraction, "must be in [0, 1)"));
    }
    let n = data.len();
    let n_held = ((n as f64) * fraction).round() as usize;
    if fraction > 0.0 && (n_held == 0 || n_held >= n) {
        return Err(Error::config(
            "heldout_fraction",
            fraction,
            format!("holds out {n_held} of {n} rows; use more training rows or another fraction"),
        ));
    }
    // Fisher–Yates with SplitMix64.
    let mut order: Vec<usize> = (0..n).collect();
    let mut state = seed ^ 0x005E_ED0F_4E1D_0057;
    for i in (1..n).rev() {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let j = (z % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    let mut held: Vec<usize> = order[..n_held].to_vec();
    let mut keep: Vec<usize> = order[n_held..].to_vec();
    held.sort_unstable();
    keep.sort_unstable();
    let pick = |idx: &[usize]| EncodedDataset {
        rows: idx.iter().map(|&i| data.rows[i].clone()).collect(),
        truncated: 0,
        ..empty_like(data)
    };
    Ok((pick(&keep), pick(&held)))
}

/// The same task, format and label words with no rows.
fn empty_like(data: &EncodedDataset) -> EncodedDataset {
    EncodedDataset {
        task: data.task,
        format: data.format,
        rows: Vec::new(),
        num_classes: data.num_classes,
        label_token_ids: data.label_token_ids.clone(),
        pad_id: data.pad_id,
        truncated: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Encoded, Format, Label, Task};

    fn data(n: usize) -> EncodedDataset {
        EncodedDataset {
            task: Task::Sst2,
            format: Format::Encoder,
            rows: (0..n)
                .map(|i| Encoded { ids: vec![i as u32], type_ids: vec![0], label: Label::Class(i % 2), num_choices: 2 })
                .collect(),
            num_classes: 2,
            label_token_ids: vec![],
            pad_id: 0,
            truncated: 0,
        }
    }

    #[test]
    fn holdout_is_a_deterministic_partition() {
        let d = data(100);
        let (a, b) = holdout(&d, 0.1, 7).unwrap();
        assert_eq!((a.len(), b.len()), (90, 10));
        let mut all: Vec<u32> = a.rows.iter().chain(&b.rows).map(|r| r.ids[0]).collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<u32>>());
        let (_, b2) = holdout(&d, 0.1, 7).unwrap();
        assert_eq!(b, b2);
        let (_, b3) = holdout(&d, 0.1, 8).unwrap();
        assert_ne!(b, b3);
        assert!(holdout(&d, 1.0, 0).is_err());
        assert!(holdout(&data(3), 0.1, 0).is_err());
    }

    #[test]
    fn method_names_round_trip() {
        for m in MethodKind::ALL {
            assert_eq!(MethodKind::from_name(m.name()).unwrap(), m);
        }
        assert_eq!(MethodKind::from_name("base").unwrap(), MethodKind::Base);
        assert!(MethodKind::from_name("swag").is_err());
    }
}
