//! Metrics on per-example predictive probabilities p̄ (f64 math), per `specs/evaluation.md`.
//!
//! Probabilities are flat row-major `[N, K]`. Every function here is golden-tested against
//! torchmetrics / scikit-learn / scipy outputs in `tests/fixtures/metrics/` (made by
//! `scripts/fixtures/make_metric_fixtures.py`).
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Floor applied to p̄(y) before the log in NLL, so a zero probability costs ln(1e12) ≈ 27.6
/// instead of ∞. torch's `nll_loss(log p)` (ivon-lora) would give ∞; no finite p̄ from a softmax
/// averaged in f64 comes near it in practice.
pub const NLL_FLOOR: f64 = 1e-12;

/// Equal-width binning conventions of the expected calibration error (they change the numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Binning {
    /// torchmetrics `CalibrationError(norm=…)`: bins [lo, hi) from `bucketize(conf, edges,
    /// right=True) − 1`, and conf = 1.0 falls into an extra (n+1)-th bin of its own.
    /// Used by bayesian-peft and BayesAdapt with 15 bins.
    Torchmetrics,
    /// ivon-lora `utils.py`: bins (lo, hi], membership `lo < conf ≤ hi`; conf = 0 is in no bin
    /// but still counts in N. Used with 10 bins.
    IvonLora,
}

impl Binning {
    /// The name used in reports, e.g. "ece15 = torchmetrics [lo,hi) 15 bins".
    pub fn describe(self, n_bins: usize) -> String {
        match self {
            Binning::Torchmetrics => {
                format!("torchmetrics CalibrationError(n_bins={n_bins}, norm=l1): bins [lo,hi), conf=1 in its own bin")
            }
            Binning::IvonLora => format!("ivon-lora utils.py: {n_bins} bins (lo,hi]"),
        }
    }
}

/// Bin edges i/n, each correctly rounded to f64.
///
/// Differs from torchmetrics / ivon-lora: they take `torch.linspace(0, 1, n + 1)`, whose values
/// differ from i/n by one ulp at some edges, and which edges depends on the CPU's SIMD width (its
/// vectorised kernel); torchmetrics also casts confidences to f32. Only a confidence lying exactly
/// on such an edge can land in the neighbouring bin; the fixtures check both.
pub fn bin_edges(n_bins: usize) -> Vec<f64> {
    (0..=n_bins).map(|i| i as f64 / n_bins as f64).collect()
}

/// Reliability-diagram data: per-bin count, accuracy and mean confidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReliabilityBins {
    pub binning: Binning,
    pub n_bins: usize,
    /// `[n_bins + 1]` edges; torchmetrics adds one extra bin at index `n_bins` for conf = 1.0.
    pub edges: Vec<f64>,
    /// Examples per bin (`n_bins` entries, or `n_bins + 1` for torchmetrics).
    pub count: Vec<usize>,
    /// Mean accuracy per bin (0 for empty bins).
    pub accuracy: Vec<f64>,
    /// Mean confidence per bin (0 for empty bins).
    pub confidence: Vec<f64>,
    /// Total examples N (the denominator of bin proportions).
    pub total: usize,
}

impl ReliabilityBins {
    /// Expected calibration error, L1: Σ_b (n_b/N)·|acc_b − conf_b|.
    pub fn ece(&self) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let n = self.total as f64;
        (0..self.count.len()).map(|b| self.count[b] as f64 / n * (self.accuracy[b] - self.confidence[b]).abs()).sum()
    }

    /// Maximum calibration error: max_b |acc_b − conf_b| (torchmetrics `norm="max"`: empty bins
    /// count as |0 − 0| = 0).
    pub fn mce(&self) -> f64 {
        (0..self.count.len()).map(|b| (self.accuracy[b] - self.confidence[b]).abs()).fold(0.0, f64::max)
    }
}

/// Checks a `[N, K]` probability matrix against `labels`; returns N.
pub(crate) fn check_shape(probs: &[f64], k: usize, labels: &[usize]) -> Result<usize> {
    if k == 0 || probs.len() != labels.len() * k {
        return Err(Error::config(
            "probs",
            format!("{} values", probs.len()),
            format!("expected N·K = {}·{k}", labels.len()),
        ));
    }
    if let Some(&bad) = labels.iter().find(|&&y| y >= k) {
        return Err(Error::config("label", bad, format!("out of range for {k} classes")));
    }
    Ok(labels.len())
}

/// Index and value of the largest probability; ties go to the first (as `torch.max(dim=1)`).
pub fn top1(row: &[f64]) -> (usize, f64) {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, &p) in row.iter().enumerate() {
        if p > best.1 {
            best = (i, p);
        }
    }
    best
}

/// Per-bin statistics of the top-label confidence.
pub fn reliability(
    probs: &[f64],
    k: usize,
    labels: &[usize],
    n_bins: usize,
    binning: Binning,
) -> Result<ReliabilityBins> {
    let n = check_shape(probs, k, labels)?;
    if n_bins == 0 {
        return Err(Error::config("n_bins", 0, "use at least 1 bin"));
    }
    let edges = bin_edges(n_bins);
    let slots = match binning {
        Binning::Torchmetrics => n_bins + 1,
        Binning::IvonLora => n_bins,
    };
    let mut count = vec![0usize; slots];
    let mut acc = vec![0.0f64; slots];
    let mut conf = vec![0.0f64; slots];
    for (row, &y) in probs.chunks_exact(k).zip(labels) {
        let (pred, c) = top1(row);
        let bin = match binning {
            // bucketize(right=True) − 1 = (number of edges ≤ c) − 1
            Binning::Torchmetrics => edges.iter().filter(|&&e| e <= c).count().checked_sub(1),
            Binning::IvonLora => (0..n_bins).find(|&b| c > edges[b] && c <= edges[b + 1]),
        };
        if let Some(b) = bin.filter(|&b| b < slots) {
            count[b] += 1;
            acc[b] += f64::from(u8::from(pred == y));
            conf[b] += c;
        }
    }
    for b in 0..slots {
        if count[b] > 0 {
            acc[b] /= count[b] as f64;
            conf[b] /= count[b] as f64;
        }
    }
    Ok(ReliabilityBins { binning, n_bins, edges, count, accuracy: acc, confidence: conf, total: n })
}

/// Accuracy of the argmax.
pub fn accuracy(probs: &[f64], k: usize, labels: &[usize]) -> Result<f64> {
    let n = check_shape(probs, k, labels)?;
    let correct = probs.chunks_exact(k).zip(labels).filter(|(row, &y)| top1(row).0 == y).count();
    Ok(correct as f64 / n.max(1) as f64)
}

/// Mean over examples of −ln max(p̄(y), [`NLL_FLOOR`]).
pub fn nll(probs: &[f64], k: usize, labels: &[usize]) -> Result<f64> {
    let n = check_shape(probs, k, labels)?;
    let s: f64 = probs.chunks_exact(k).zip(labels).map(|(row, &y)| -row[y].max(NLL_FLOOR).ln()).sum();
    Ok(s / n.max(1) as f64)
}

/// Mean over examples of Σ_k (p̄_k − 1[y = k])², not divided by K (ivon-lora, bayesian-peft).
pub fn brier(probs: &[f64], k: usize, labels: &[usize]) -> Result<f64> {
    let n = check_shape(probs, k, labels)?;
    let s: f64 = probs
        .chunks_exact(k)
        .zip(labels)
        .map(|(row, &y)| row.iter().enumerate().map(|(j, &p)| (p - f64::from(u8::from(j == y))).powi(2)).sum::<f64>())
        .sum();
    Ok(s / n.max(1) as f64)
}

/// Binary F1 of the argmax with class 1 as the positive class (GLUE MRPC; sklearn `f1_score`,
/// 0 when there is no positive prediction nor label).
pub fn f1_binary(probs: &[f64], k: usize, labels: &[usize]) -> Result<f64> {
    check_shape(probs, k, labels)?;
    let (mut tp, mut fp, mut fneg) = (0usize, 0usize, 0usize);
    for (row, &y) in probs.chunks_exact(k).zip(labels) {
        let p = top1(row).0;
        match (p == 1, y == 1) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, true) => fneg += 1,
            _ => {}
        }
    }
    let denom = 2 * tp + fp + fneg;
    Ok(if denom == 0 { 0.0 } else { 2.0 * tp as f64 / denom as f64 })
}

/// Matthews correlation of the argmax (GLUE CoLA), multiclass form of sklearn
/// `matthews_corrcoef`; 0 when undefined.
pub fn matthews(probs: &[f64], k: usize, labels: &[usize]) -> Result<f64> {
    let n = check_shape(probs, k, labels)?;
    let mut t = vec![0f64; k];
    let mut p = vec![0f64; k];
    let mut c = 0f64;
    for (row, &y) in probs.chunks_exact(k).zip(labels) {
        let pred = top1(row).0;
        t[y] += 1.0;
        p[pred] += 1.0;
        c += f64::from(u8::from(pred == y));
    }
    let s = n as f64;
    let tp: f64 = t.iter().zip(&p).map(|(a, b)| a * b).sum();
    let cov_ytyp = c * s - tp;
    let cov_ypyp = s * s - p.iter().map(|x| x * x).sum::<f64>();
    let cov_ytyt = s * s - t.iter().map(|x| x * x).sum::<f64>();
    if cov_ypyp * cov_ytyt == 0.0 {
        return Ok(0.0);
    }
    Ok(cov_ytyp / (cov_ytyt * cov_ypyp).sqrt())
}

fn check_pair(x: &[f64], y: &[f64]) -> Result<()> {
    if x.len() != y.len() || x.len() < 2 {
        return Err(Error::config(
            "targets",
            x.len(),
            format!("need two series of equal length ≥ 2, got {} and {}", x.len(), y.len()),
        ));
    }
    Ok(())
}

/// Pearson correlation (GLUE STS-B); NaN if a series is constant, as scipy.
pub fn pearson(x: &[f64], y: &[f64]) -> Result<f64> {
    check_pair(x, y)?;
    let n = x.len() as f64;
    let mx = x.iter().sum::<f64>() / n;
    let my = y.iter().sum::<f64>() / n;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        let (da, db) = (a - mx, b - my);
        sxy += da * db;
        sxx += da * da;
        syy += db * db;
    }
    Ok(sxy / (sxx.sqrt() * syy.sqrt()))
}

/// Ranks 1..n, ties get their average rank (scipy `rankdata(method="average")`).
pub fn average_ranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut ranks = vec![0.0; x.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && x[order[j + 1]] == x[order[i]] {
            j += 1;
        }
        let r = (i + j) as f64 / 2.0 + 1.0;
        for &o in &order[i..=j] {
            ranks[o] = r;
        }
        i = j + 1;
    }
    ranks
}

/// Spearman correlation = Pearson of average ranks (scipy `spearmanr`).
pub fn spearman(x: &[f64], y: &[f64]) -> Result<f64> {
    check_pair(x, y)?;
    pearson(&average_ranks(x), &average_ranks(y))
}

/// Points of the ROC curve at every distinct threshold (sklearn `roc_curve(...,
/// drop_intermediate=False)`), positives = `is_pos`, higher score = more positive.
/// Returns (fpr, tpr), starting at (0, 0).
fn roc_points(scores: &[f64], is_pos: &[bool]) -> (Vec<f64>, Vec<f64>, Vec<(f64, f64)>) {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let pos = is_pos.iter().filter(|&&p| p).count() as f64;
    let neg = is_pos.len() as f64 - pos;
    let (mut tp, mut fp) = (0.0, 0.0);
    let mut fpr = vec![0.0];
    let mut tpr = vec![0.0];
    let mut pr = Vec::new(); // (recall, precision) at each threshold
    let mut i = 0;
    while i < order.len() {
        let s = scores[order[i]];
        while i < order.len() && scores[order[i]] == s {
            if is_pos[order[i]] {
                tp += 1.0
            } else {
                fp += 1.0
            }
            i += 1;
        }
        fpr.push(fp / neg);
        tpr.push(tp / pos);
        pr.push((tp / pos, tp / (tp + fp)));
    }
    (fpr, tpr, pr)
}

/// OOD-detection metrics, OOD as the positive class.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OodMetrics {
    /// Area under the ROC curve (sklearn `roc_auc_score`).
    pub auroc: f64,
    /// Average precision with OOD positive (sklearn `average_precision_score`).
    pub aupr: f64,
    /// False-positive rate at the first threshold reaching 95 % true-positive rate.
    pub fpr95: f64,
}

/// AUROC, AUPR and FPR@95%TPR for scores where higher means "more likely OOD" (1 − max p̄,
/// entropy H[p̄], mutual information).
pub fn ood_detection(in_scores: &[f64], out_scores: &[f64]) -> Result<OodMetrics> {
    if in_scores.is_empty() || out_scores.is_empty() {
        return Err(Error::config("ood scores", 0, "need at least one in-distribution and one OOD example"));
    }
    let scores: Vec<f64> = in_scores.iter().chain(out_scores).copied().collect();
    if scores.iter().any(|s| s.is_nan()) {
        return Err(Error::config("ood scores", "NaN", "scores must be numbers"));
    }
    let is_pos: Vec<bool> = in_scores.iter().map(|_| false).chain(out_scores.iter().map(|_| true)).collect();
    let (fpr, tpr, pr) = roc_points(&scores, &is_pos);
    let auroc = fpr.windows(2).zip(tpr.windows(2)).map(|(f, t)| (f[1] - f[0]) * (t[1] + t[0]) / 2.0).sum();
    let mut aupr = 0.0;
    let mut prev_recall = 0.0;
    for &(r, p) in &pr {
        aupr += (r - prev_recall) * p;
        prev_recall = r;
    }
    let fpr95 = tpr.iter().position(|&t| t >= 0.95).map_or(1.0, |i| fpr[i]);
    Ok(OodMetrics { auroc, aupr, fpr95 })
}

/// Shannon entropy (nats) of a probability vector; 0·ln 0 = 0.
pub fn entropy(p: &[f64]) -> f64 {
    -p.iter().filter(|&&x| x > 0.0).map(|&x| x * x.ln()).sum::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edges_match_torch_linspace_layout() {
        let e = bin_edges(15);
        assert_eq!(e.len(), 16);
        assert_eq!((e[0], e[15]), (0.0, 1.0));
        assert_eq!(e[9], 0.6);
    }

    #[test]
    fn conf_one_has_its_own_torchmetrics_bin() {
        let probs = [1.0, 0.0, 0.6, 0.4];
        let r = reliability(&probs, 2, &[0, 1], 15, Binning::Torchmetrics).unwrap();
        assert_eq!(r.count.len(), 16);
        assert_eq!(r.count[15], 1);
        assert_eq!(r.count[9], 1); // 0.6 in [0.6, 0.6667)
        assert!((r.ece() - 0.5 * 0.6).abs() < 1e-15);
        let r10 = reliability(&probs, 2, &[0, 1], 10, Binning::IvonLora).unwrap();
        assert_eq!(r10.count[9], 1);
        assert_eq!(r10.count[5], 1); // 0.6 in (0.5, 0.6]
    }

    #[test]
    fn basic_scores() {
        let probs = [0.9, 0.1, 0.2, 0.8, 0.5, 0.5];
        let y = [0, 0, 1];
        assert!((accuracy(&probs, 2, &y).unwrap() - 1.0 / 3.0).abs() < 1e-15);
        let want = -(0.9f64.ln() + 0.2f64.ln() + 0.5f64.ln()) / 3.0;
        assert!((nll(&probs, 2, &y).unwrap() - want).abs() < 1e-15);
        let b = (0.01 + 0.01 + 0.64 + 0.64 + 0.25 + 0.25) / 3.0;
        assert!((brier(&probs, 2, &y).unwrap() - b).abs() < 1e-15);
        assert!(accuracy(&probs, 2, &[0, 2, 1]).is_err());
        assert_eq!(average_ranks(&[3.0, 1.0, 3.0, 2.0]), vec![3.5, 1.0, 3.5, 2.0]);
        let ood = ood_detection(&[0.1, 0.2], &[0.3, 0.4]).unwrap();
        assert_eq!((ood.auroc, ood.aupr, ood.fpr95), (1.0, 1.0, 0.0));
    }
}
