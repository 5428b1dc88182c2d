//! The posterior predictive p̄(y|x) = (1/K) Σ_k softmax(f_k(x)): probabilities are averaged,
//! never logits (ivon-lora, bayesian-peft, BayesAdapt; `specs/evaluation.md` "Predictive").
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

use super::metrics::{self, entropy, Binning, ReliabilityBins};

/// Softmax in f64 over one row of logits, with classes whose mask is 0 set to probability 0
/// (ARC rows with fewer choices than K). `mask` may be empty (all classes valid).
pub fn masked_softmax(logits: &[f32], mask: &[u32]) -> Vec<f64> {
    let valid = |j: usize| mask.is_empty() || mask.get(j).is_some_and(|&m| m != 0);
    let max = (0..logits.len()).filter(|&j| valid(j)).map(|j| f64::from(logits[j])).fold(f64::NEG_INFINITY, f64::max);
    let mut out: Vec<f64> =
        (0..logits.len()).map(|j| if valid(j) { (f64::from(logits[j]) - max).exp() } else { 0.0 }).collect();
    let z: f64 = out.iter().sum();
    if z > 0.0 && z.is_finite() {
        out.iter_mut().for_each(|p| *p /= z);
    }
    out
}

/// Sums per-sample probabilities per example; add the batches of each posterior sample (or the
/// mean model once) in any order.
#[derive(Debug, Clone)]
pub struct PredictiveAccumulator {
    num_classes: usize,
    sum_probs: Vec<f64>,
    sum_entropy: Vec<f64>,
    counts: Vec<u32>,
}

impl PredictiveAccumulator {
    pub fn new(num_examples: usize, num_classes: usize) -> Self {
        PredictiveAccumulator {
            num_classes,
            sum_probs: vec![0.0; num_examples * num_classes],
            sum_entropy: vec![0.0; num_examples],
            counts: vec![0; num_examples],
        }
    }

    /// Adds one sample's probabilities `probs: [B, K]` for the examples `indices: [B]`.
    pub fn add_probs(&mut self, indices: &[usize], probs: &[f64]) -> Result<()> {
        let k = self.num_classes;
        if probs.len() != indices.len() * k {
            return Err(Error::config(
                "probs",
                format!("{} values", probs.len()),
                format!("expected B·K = {}·{k}", indices.len()),
            ));
        }
        for (&i, row) in indices.iter().zip(probs.chunks_exact(k)) {
            if i >= self.counts.len() {
                return Err(Error::config(
                    "example index",
                    i,
                    format!("accumulator holds {} examples", self.counts.len()),
                ));
            }
            for (acc, &p) in self.sum_probs[i * k..(i + 1) * k].iter_mut().zip(row) {
                *acc += p;
            }
            self.sum_entropy[i] += entropy(row);
            self.counts[i] += 1;
        }
        Ok(())
    }

    /// Adds one sample's class logits `logits: [B, K]` (softmax in f64, masked by `class_mask:
    /// [B, K]` from [`crate::data::Batch::class_mask`]; empty = all valid).
    pub fn add_logits(&mut self, indices: &[usize], logits: &[f32], class_mask: &[u32]) -> Result<()> {
        let k = self.num_classes;
        if logits.len() != indices.len() * k || !(class_mask.is_empty() || class_mask.len() == logits.len()) {
            return Err(Error::config(
                "logits",
                format!("{} values, mask {}", logits.len(), class_mask.len()),
                format!("expected B·K = {}·{k}", indices.len()),
            ));
        }
        let mut probs = Vec::with_capacity(logits.len());
        for (b, row) in logits.chunks_exact(k).enumerate() {
            let mask = if class_mask.is_empty() { &[][..] } else { &class_mask[b * k..(b + 1) * k] };
            probs.extend(masked_softmax(row, mask));
        }
        self.add_probs(indices, &probs)
    }

    /// The predictive so far. Every example must have received the same number of samples.
    pub fn predictive(&self, labels: &[usize]) -> Result<Predictive> {
        let n = self.counts.len();
        if labels.len() != n {
            return Err(Error::config("labels", labels.len(), format!("accumulator holds {n} examples")));
        }
        let s = self.counts.first().copied().unwrap_or(0);
        if s == 0 || self.counts.iter().any(|&c| c != s) {
            let (lo, hi) = (self.counts.iter().min(), self.counts.iter().max());
            return Err(Error::config(
                "samples per example",
                format!("{lo:?}..{hi:?}"),
                "every example needs the same number (≥ 1) of predictions; was a batch skipped?",
            ));
        }
        let sf = f64::from(s);
        Ok(Predictive {
            num_classes: self.num_classes,
            probs: self.sum_probs.iter().map(|p| p / sf).collect(),
            labels: labels.to_vec(),
            mean_sample_entropy: self.sum_entropy.iter().map(|h| h / sf).collect(),
            num_samples: s as usize,
        })
    }
}

/// Averaged predictive probabilities with labels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Predictive {
    pub num_classes: usize,
    /// p̄, `[N, K]` row-major.
    pub probs: Vec<f64>,
    pub labels: Vec<usize>,
    /// mean_k H[p_k] per example, `[N]` (the aleatoric part).
    pub mean_sample_entropy: Vec<f64>,
    /// K, the number of predictions averaged (1 for the mean model).
    pub num_samples: usize,
}

impl Predictive {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    fn row(&self, i: usize) -> &[f64] {
        &self.probs[i * self.num_classes..(i + 1) * self.num_classes]
    }
    /// H[p̄] per example (total uncertainty).
    pub fn entropy(&self) -> Vec<f64> {
        (0..self.len()).map(|i| entropy(self.row(i))).collect()
    }
    /// Mutual information H[p̄] − mean_k H[p_k] per example (epistemic part; 0 for K = 1).
    pub fn mutual_information(&self) -> Vec<f64> {
        self.entropy().iter().zip(&self.mean_sample_entropy).map(|(h, m)| (h - m).max(0.0)).collect()
    }
    /// 1 − max_k p̄_k per example.
    pub fn one_minus_confidence(&self) -> Vec<f64> {
        (0..self.len()).map(|i| 1.0 - metrics::top1(self.row(i)).1).collect()
    }
    /// Argmax per example.
    pub fn predictions(&self) -> Vec<usize> {
        (0..self.len()).map(|i| metrics::top1(self.row(i)).0).collect()
    }
    pub fn reliability(&self, n_bins: usize, binning: Binning) -> Result<ReliabilityBins> {
        metrics::reliability(&self.probs, self.num_classes, &self.labels, n_bins, binning)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn averages_probabilities_not_logits() {
        let mut acc = PredictiveAccumulator::new(1, 2);
        acc.add_logits(&[0], &[10.0, 0.0], &[]).unwrap();
        acc.add_logits(&[0], &[0.0, 10.0], &[]).unwrap();
        let p = acc.predictive(&[0]).unwrap();
        assert!((p.probs[0] - 0.5).abs() < 1e-12);
        assert_eq!(p.num_samples, 2);
        // each sample is nearly certain, the average is not: MI ≈ ln 2
        let mi = p.mutual_information()[0];
        assert!((mi - 2f64.ln()).abs() < 1e-3, "{mi}");
    }

    #[test]
    fn masked_classes_get_zero_probability() {
        let p = masked_softmax(&[1.0, 1.0, 50.0], &[1, 1, 0]);
        assert_eq!(p, vec![0.5, 0.5, 0.0]);
    }

    #[test]
    fn uneven_sample_counts_are_an_error() {
        let mut acc = PredictiveAccumulator::new(2, 2);
        acc.add_probs(&[0, 1], &[0.5, 0.5, 0.5, 0.5]).unwrap();
        acc.add_probs(&[0], &[0.5, 0.5]).unwrap();
        assert!(acc.predictive(&[0, 1]).is_err());
        assert!(acc.add_probs(&[2], &[0.5, 0.5]).is_err());
    }
}
