//! Results: a serde [`EvalResult`] per (method, task, K) and a plain-text table over several.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::data::Task;
use crate::Result;

use super::metrics::{self, Binning, OodMetrics};
use super::predictive::Predictive;

/// Metric values as fractions (not percent); absent ones are omitted from JSON.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Metrics {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nll: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub brier: Option<f64>,
    /// ECE, 15 bins, torchmetrics convention ([`Binning::Torchmetrics`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ece15: Option<f64>,
    /// ECE, 10 bins, ivon-lora convention ([`Binning::IvonLora`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ece10: Option<f64>,
    /// MCE (max norm), 15 bins, torchmetrics convention.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mce15: Option<f64>,
    /// Binary F1, positive class 1 (MRPC).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub f1: Option<f64>,
    /// Matthews correlation (CoLA).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mcc: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pearson: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spearman: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mse: Option<f64>,
}

impl Metrics {
    /// ACC, NLL, Brier, ECE-15, ECE-10, MCE-15 on p̄; plus F1 for MRPC and MCC for CoLA.
    pub fn classification(pred: &Predictive, task: Task) -> Result<Metrics> {
        let (p, k, y) = (&pred.probs, pred.num_classes, &pred.labels);
        let r15 = pred.reliability(15, Binning::Torchmetrics)?;
        let r10 = pred.reliability(10, Binning::IvonLora)?;
        Ok(Metrics {
            acc: Some(metrics::accuracy(p, k, y)?),
            nll: Some(metrics::nll(p, k, y)?),
            brier: Some(metrics::brier(p, k, y)?),
            ece15: Some(r15.ece()),
            ece10: Some(r10.ece()),
            mce15: Some(r15.mce()),
            f1: if task == Task::Mrpc { Some(metrics::f1_binary(p, k, y)?) } else { None },
            mcc: if task == Task::Cola { Some(metrics::matthews(p, k, y)?) } else { None },
            ..Default::default()
        })
    }

    /// Pearson, Spearman and MSE of regression predictions (STS-B).
    pub fn regression(predicted: &[f64], target: &[f64]) -> Result<Metrics> {
        let mse = predicted.iter().zip(target).map(|(a, b)| (a - b).powi(2)).sum::<f64>() / target.len().max(1) as f64;
        Ok(Metrics {
            pearson: Some(metrics::pearson(predicted, target)?),
            spearman: Some(metrics::spearman(predicted, target)?),
            mse: Some(mse),
            ..Default::default()
        })
    }

    /// (name, value, shown in percent) of the present metrics, in a fixed order.
    fn entries(&self) -> Vec<(&'static str, f64, bool)> {
        let all = [
            ("acc", self.acc, true),
            ("f1", self.f1, true),
            ("mcc", self.mcc, true),
            ("ece15", self.ece15, true),
            ("ece10", self.ece10, true),
            ("mce15", self.mce15, true),
            ("nll", self.nll, false),
            ("brier", self.brier, false),
            ("pearson", self.pearson, true),
            ("spearman", self.spearman, true),
            ("mse", self.mse, false),
        ];
        all.into_iter().filter_map(|(n, v, pct)| v.map(|v| (n, v, pct))).collect()
    }
}

/// Uncertainty scores for OOD detection; higher = more likely OOD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OodScore {
    /// 1 − max_k p̄_k.
    OneMinusMaxProb,
    /// Predictive entropy H[p̄].
    Entropy,
    /// Mutual information H[p̄] − mean_k H[p_k] (0 for the mean model).
    MutualInformation,
}

/// OOD-detection metrics of one score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OodResult {
    pub score: OodScore,
    #[serde(flatten)]
    pub metrics: OodMetrics,
}

/// AUROC / AUPR / FPR95 of each score, in-distribution `id` vs shifted `ood` test set.
pub fn ood_results(id: &Predictive, ood: &Predictive) -> Result<Vec<OodResult>> {
    let scores = |p: &Predictive, s: OodScore| match s {
        OodScore::OneMinusMaxProb => p.one_minus_confidence(),
        OodScore::Entropy => p.entropy(),
        OodScore::MutualInformation => p.mutual_information(),
    };
    [OodScore::OneMinusMaxProb, OodScore::Entropy, OodScore::MutualInformation]
        .into_iter()
        .map(|s| Ok(OodResult { score: s, metrics: metrics::ood_detection(&scores(id, s), &scores(ood, s))? }))
        .collect()
}

/// One row of results: a method on a task with K samples. Every results file records the model,
/// seed, hyper-parameters, dtype and code version in `info` (filled by the caller).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    /// e.g. "ivon", "adamw", "blora".
    pub method: String,
    pub task: String,
    /// 0 = the mean / MAP prediction; K ≥ 1 = the posterior predictive averaged over K samples.
    pub num_samples: usize,
    pub num_examples: usize,
    pub metrics: Metrics,
    /// Metric name → convention, e.g. "ece15" → "torchmetrics CalibrationError(n_bins=15, …)".
    pub conventions: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub ood: Vec<OodResult>,
    /// Model, seed, dtype, hyper-parameters, code version, timings.
    #[serde(default)]
    pub info: BTreeMap<String, serde_json::Value>,
}

impl EvalResult {
    pub fn new(method: &str, task: &str, num_samples: usize, num_examples: usize, metrics: Metrics) -> Self {
        let mut conventions = BTreeMap::new();
        if metrics.ece15.is_some() {
            conventions.insert("ece15".into(), Binning::Torchmetrics.describe(15));
            conventions.insert("mce15".into(), "torchmetrics CalibrationError(n_bins=15, norm=max)".into());
            conventions.insert("ece10".into(), Binning::IvonLora.describe(10));
            conventions.insert("nll".into(), "mean over examples of -ln max(p(y), 1e-12)".into());
            conventions.insert("brier".into(), "mean over examples of sum over classes (not divided by K)".into());
        }
        EvalResult {
            method: method.into(),
            task: task.into(),
            num_samples,
            num_examples,
            metrics,
            conventions,
            ood: Vec::new(),
            info: BTreeMap::new(),
        }
    }
}

/// Renders results as an aligned plain-text table (ACC, ECE, F1, MCC, correlations in %).
pub fn render_table(results: &[EvalResult]) -> String {
    let mut names: Vec<&'static str> = Vec::new();
    for r in results {
        for (n, _, _) in r.metrics.entries() {
            if !names.contains(&n) {
                names.push(n);
            }
        }
    }
    let order = ["acc", "f1", "mcc", "ece15", "ece10", "mce15", "nll", "brier", "pearson", "spearman", "mse"];
    names.sort_by_key(|n| order.iter().position(|o| o == n));
    let mut header: Vec<String> = vec!["method".into(), "task".into(), "K".into()];
    header.extend(names.iter().map(|n| {
        let pct = results.iter().flat_map(|r| r.metrics.entries()).find(|e| e.0 == *n).is_some_and(|e| e.2);
        if pct {
            format!("{n} %")
        } else {
            n.to_string()
        }
    }));
    let mut rows: Vec<Vec<String>> = vec![header];
    for r in results {
        let mut row = vec![
            r.method.clone(),
            r.task.clone(),
            if r.num_samples == 0 { "mean".into() } else { r.num_samples.to_string() },
        ];
        let entries = r.metrics.entries();
        for n in &names {
            row.push(match entries.iter().find(|e| e.0 == *n) {
                Some((_, v, true)) => format!("{:.2}", v * 100.0),
                Some((_, v, false)) => format!("{v:.4}"),
                None => "-".into(),
            });
        }
        rows.push(row);
    }
    let widths: Vec<usize> =
        (0..rows[0].len()).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, s)| {
                // text columns left-aligned, numbers right-aligned
                if c < 2 {
                    format!("{s:<w$}", w = widths[c])
                } else {
                    format!("{s:>w$}", w = widths[c])
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
        if i == 0 {
            out.push_str(&widths.iter().map(|&w| "-".repeat(w)).collect::<Vec<_>>().join("  "));
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_and_table() {
        let pred = Predictive {
            num_classes: 2,
            probs: vec![0.9, 0.1, 0.3, 0.7, 0.6, 0.4],
            labels: vec![0, 1, 1],
            mean_sample_entropy: vec![0.0; 3],
            num_samples: 1,
        };
        let m = Metrics::classification(&pred, Task::Mrpc).unwrap();
        assert!(m.f1.is_some() && m.mcc.is_none());
        let mut r = EvalResult::new("ivon", "mrpc", 10, 3, m);
        r.info.insert("seed".into(), serde_json::json!(42));
        let json = serde_json::to_string_pretty(&r).unwrap();
        assert!(json.contains("\"ece15\"") && !json.contains("pearson"), "{json}");
        let back: EvalResult = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        let mean = EvalResult::new("adamw", "mrpc", 0, 3, r.metrics.clone());
        let t = render_table(&[mean, r]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].starts_with("method  task") && lines[0].contains("acc %") && lines[0].contains("nll"), "{t}");
        assert!(lines[2].contains("mean") && lines[2].contains("66.67"), "{t}");
        // columns align: numbers are right-aligned, so every line has the same width
        assert!(lines.iter().all(|l| l.len() == lines[0].len()), "{t}");
    }
}
