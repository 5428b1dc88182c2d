//! Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks"): one scalar
//! T > 0, fitted by minimising the NLL of softmax(z / T) on held-out data, then applied to every
//! logit. Accuracy is unchanged (argmax is invariant); only the confidence moves.
//!
//! The fit is a 1-D golden-section search on log T over [ln 0.01, ln 100]: the NLL is convex in
//! 1/T (log-sum-exp of a linear function minus a linear one), hence unimodal in log T, and the
//! search needs no gradient and cannot diverge.
use crate::data::{Batch, EncodedDataset};
use crate::eval::Predictor;
use crate::{Error, Result};

/// A predictor whose logits are divided by a fitted temperature.
pub struct TemperaturePredictor<P> {
    pub inner: P,
    pub temperature: f64,
}

impl<P: Predictor> Predictor for TemperaturePredictor<P> {
    fn predict(&mut self, batch: &Batch, sample: Option<usize>) -> Result<Vec<f32>> {
        let inv = (1.0 / self.temperature) as f32;
        Ok(self.inner.predict(batch, sample)?.into_iter().map(|z| z * inv).collect())
    }
}

/// Mean NLL of softmax(`logits` / t) at `labels`; `mask` (empty or `[N, K]`, 1 = present) drops
/// absent choices from the normaliser.
fn nll_at(logits: &[f32], mask: &[u32], labels: &[usize], k: usize, t: f64) -> f64 {
    let mut total = 0.0;
    for (i, &y) in labels.iter().enumerate() {
        let row = &logits[i * k..(i + 1) * k];
        let present = |c: usize| mask.is_empty() || mask[i * k + c] != 0;
        let max = (0..k).filter(|&c| present(c)).map(|c| f64::from(row[c]) / t).fold(f64::NEG_INFINITY, f64::max);
        let lse = max + (0..k).filter(|&c| present(c)).map(|c| (f64::from(row[c]) / t - max).exp()).sum::<f64>().ln();
        total += lse - f64::from(row[y]) / t;
    }
    total / labels.len().max(1) as f64
}

/// The temperature T minimising the mean NLL of softmax(`logits` / T) on (`logits`, `labels`).
/// `logits`: `[N, K]` row-major; `mask`: empty or `[N, K]` (1 = the choice exists).
pub fn fit_temperature(logits: &[f32], mask: &[u32], labels: &[usize], num_classes: usize) -> Result<f64> {
    let (n, k) = (labels.len(), num_classes);
    if n == 0 || k < 2 || logits.len() != n * k || !(mask.is_empty() || mask.len() == n * k) {
        return Err(Error::config(
            "temperature data",
            format!("{} logits, {} labels, {} classes", logits.len(), n, k),
            "need [N, K] logits for N ≥ 1 labelled rows and K ≥ 2 classes",
        ));
    }
    if let Some(&y) = labels.iter().find(|&&y| y >= k) {
        return Err(Error::config("label", y, format!("must be below {k}")));
    }
    let f = |log_t: f64| nll_at(logits, mask, labels, k, log_t.exp());
    // Golden-section search: 80 iterations shrink the bracket by 0.618^80 ≈ 2e-17.
    let (mut a, mut b) = (0.01f64.ln(), 100f64.ln());
    let g = (5f64.sqrt() - 1.0) / 2.0;
    let (mut c, mut d) = (b - g * (b - a), a + g * (b - a));
    let (mut fc, mut fd) = (f(c), f(d));
    for _ in 0..80 {
        if fc < fd {
            b = d;
            d = c;
            fd = fc;
            c = b - g * (b - a);
            fc = f(c);
        } else {
            a = c;
            c = d;
            fc = fd;
            d = a + g * (b - a);
            fd = f(d);
        }
    }
    Ok(((a + b) / 2.0).exp())
}

/// Point-prediction logits `[N, K]`, the class mask `[N, K]` and the labels of a classification
/// set, in row order (what [`fit_temperature`] takes).
pub fn collect_logits<P: Predictor>(
    predictor: &mut P,
    data: &EncodedDataset,
    batch_size: usize,
) -> Result<(Vec<f32>, Vec<u32>, Vec<usize>)> {
    let labels = data
        .class_labels()
        .ok_or_else(|| Error::config("task", data.task.name(), "temperature scaling needs a classification task"))?;
    let k = data.num_classes;
    let mut logits = vec![0f32; data.len() * k];
    let mut mask = vec![1u32; data.len() * k];
    for b in Batch::in_order(data, batch_size) {
        let b = b?;
        let out = predictor.predict(&b, None)?;
        if out.len() != b.batch_size * k {
            return Err(Error::config("logits", out.len(), format!("expected {} × {k}", b.batch_size)));
        }
        for (row, &i) in b.indices.iter().enumerate() {
            logits[i * k..(i + 1) * k].copy_from_slice(&out[row * k..(row + 1) * k]);
            if !b.class_mask.is_empty() {
                mask[i * k..(i + 1) * k].copy_from_slice(&b.class_mask[row * k..(row + 1) * k]);
            }
        }
    }
    Ok((logits, mask, labels))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_distr::{Distribution, StandardNormal};

    /// Labels drawn from softmax(z / T*) for random z: the NLL-optimal temperature is T*.
    #[test]
    fn recovers_a_known_temperature() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (n, k) = (40_000, 3);
        for t_true in [0.5, 2.5] {
            let logits: Vec<f32> = (0..n * k)
                .map(|_| {
                    let e: f32 = StandardNormal.sample(&mut rng);
                    3.0 * e
                })
                .collect();
            let labels: Vec<usize> = (0..n)
                .map(|i| {
                    let z: Vec<f64> = logits[i * k..(i + 1) * k].iter().map(|&v| f64::from(v) / t_true).collect();
                    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let p: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
                    let s: f64 = p.iter().sum();
                    let mut u: f64 = rng.random::<f64>() * s;
                    for (c, pc) in p.iter().enumerate() {
                        if u < *pc {
                            return c;
                        }
                        u -= pc;
                    }
                    k - 1
                })
                .collect();
            let t = fit_temperature(&logits, &[], &labels, k).unwrap();
            assert!((t / t_true - 1.0).abs() < 0.03, "fitted {t}, true {t_true}");
            // it is the minimum: nudging T either way raises the NLL
            let f = |t: f64| nll_at(&logits, &[], &labels, k, t);
            assert!(f(t) <= f(t * 1.01) && f(t) <= f(t / 1.01));
        }
    }

    #[test]
    fn masked_choices_are_ignored_and_bad_input_is_refused() {
        // the third choice is absent in row 0; a huge logit there must not matter
        let logits = [2.0f32, 0.0, 50.0, 0.0, 2.0, 0.0];
        let mask = [1u32, 1, 0, 1, 1, 1];
        let t = fit_temperature(&logits, &mask, &[0, 1], 3).unwrap();
        // all rows right: the NLL falls towards 0 as T → 0 (flat in f64 below ~0.1)
        assert!(t < 0.1, "got {t}");
        assert!(fit_temperature(&logits, &[], &[0, 3], 3).is_err());
        assert!(fit_temperature(&logits, &[], &[0], 3).is_err());
    }
}
