//! Sweep bookkeeping: one result file per (task, method, seed) cell, resume by skipping cells
//! whose file exists, and the aggregate over seeds (mean ± sample std) as Markdown, CSV and
//! JSON tables (the files and plots are written by [`super::summary_files`]).
//!
//! Layout under a sweep's output folder `out`:
//! - `cells/<task>/<method>/seed<k>.json` — a [`Cell`] (written atomically: a crash leaves no
//!   half-written cell, so "the file exists" means "the cell is done");
//! - `summary.{md,csv,json}`, `plots/reliability_<task>.{png,svg}`, `plots/k_curve_<task>.{png,svg}`.
//!
//! A cell also holds the method's OOD detection against shifted test sets ([`OodEntry`]: the
//! in-distribution test set vs e.g. ARC-C/ARC-E for a model trained on OBQA) and what its
//! evaluation cost ([`CellCost`]: train, fit and eval seconds, and the K-sample cost ratio).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::MethodKind;
use crate::eval::metrics::ReliabilityBins;
use crate::eval::{ood_results, EvalCost, EvalResult, Evaluation, Metrics, OodResult, OodScore};
use crate::{Error, Result};

/// Identifies one cell of a sweep.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CellKey {
    pub task: String,
    /// The method's label in the sweep (a config may define several variants of one kind).
    pub method: String,
    pub seed: u64,
}

impl CellKey {
    pub fn new(task: &str, method: &str, seed: u64) -> Self {
        CellKey { task: task.into(), method: method.into(), seed }
    }

    /// `<out>/cells/<task>/<method>/seed<k>.json`.
    pub fn path(&self, out: &Path) -> PathBuf {
        out.join("cells").join(&self.task).join(&self.method).join(format!("seed{}.json", self.seed))
    }

    /// Whether the cell is finished: its file exists and parses. A file that does not parse
    /// (hand-edited, or from an incompatible version) is reported and counts as not done.
    pub fn is_done(&self, out: &Path) -> bool {
        self.is_done_with(out, &[])
    }

    /// [`Self::is_done`], and the cell has OOD results against every task in `ood_tasks` (a
    /// sweep that gained `ood_tasks` after some cells were written runs those cells again).
    pub fn is_done_with(&self, out: &Path, ood_tasks: &[String]) -> bool {
        let path = self.path(out);
        if !path.exists() {
            return false;
        }
        match Cell::read(&path) {
            Ok(c) => {
                let missing: Vec<&String> =
                    ood_tasks.iter().filter(|t| !c.ood.iter().any(|o| &o.ood_task == *t)).collect();
                if !missing.is_empty() {
                    tracing::warn!("{} has no OOD results for {missing:?}; the cell will be run again", path.display());
                }
                missing.is_empty()
            }
            Err(e) => {
                tracing::warn!("{e}; the cell will be run again");
                false
            }
        }
    }
}

/// The results of one (task, method, seed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    pub task: String,
    pub method: String,
    pub kind: MethodKind,
    pub seed: u64,
    /// K = 0 first, then the sample-count curve; the last is the headline (largest K).
    pub results: Vec<EvalResult>,
    /// Reliability bins (15, torchmetrics) of the headline predictive.
    #[serde(default)]
    pub reliability: Option<ReliabilityBins>,
    /// Method hyper-parameters and fitted values (temperature, prior precision, members, …).
    #[serde(default)]
    pub params: serde_json::Value,
    #[serde(default)]
    pub train_seconds: f64,
    #[serde(default)]
    pub eval_seconds: f64,
    /// OOD detection of the method against each shifted test set (empty: none configured).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ood: Vec<OodEntry>,
    /// Timings of the cell (absent in cells written before they were recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<CellCost>,
}

/// OOD detection of one predictive: the in-distribution test set (negatives) against a shifted
/// test set (positives), plus accuracy and calibration on the shifted set itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OodEntry {
    /// The shifted task, e.g. `arc_challenge`.
    pub ood_task: String,
    /// K of the predictive (0: the mean / point model).
    pub num_samples: usize,
    pub id_examples: usize,
    pub ood_examples: usize,
    /// ACC, ECE, NLL, … of the predictive on the shifted set (its own labels).
    pub shifted: Metrics,
    /// AUROC / AUPR / FPR95 with the scores 1 − max p̄, H[p̄] and mutual information.
    pub detection: Vec<OodResult>,
}

/// OOD entries of a method: for the mean (K = 0) predictive and, when there is one, the K-sample
/// predictive, of `id` (the in-distribution test set) against `shifted` (the same predictor on
/// the shifted set, evaluated with the same K).
pub fn ood_entries(ood_task: &str, id: &Evaluation, shifted: &Evaluation) -> Result<Vec<OodEntry>> {
    let mut out = Vec::new();
    let k = shifted.bayes.as_ref().map_or(0, |p| p.num_samples);
    for (k, a, b) in [(0, &id.mean, &shifted.mean), (k, &id.bayes, &shifted.bayes)] {
        let (Some(a), Some(b)) = (a, b) else { continue };
        if a.num_classes != b.num_classes {
            return Err(Error::config(
                "ood task",
                ood_task,
                format!("{} classes, the in-distribution task has {}", b.num_classes, a.num_classes),
            ));
        }
        out.push(OodEntry {
            ood_task: ood_task.into(),
            num_samples: k,
            id_examples: a.len(),
            ood_examples: b.len(),
            shifted: Metrics::classification(b, crate::data::Task::from_name(ood_task)?)?,
            detection: ood_results(a, b)?,
        });
    }
    if out.is_empty() {
        return Err(Error::config("ood task", ood_task, "OOD detection needs a classification task"));
    }
    Ok(out)
}

/// What a cell cost, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CellCost {
    /// Training the method needs (an AdamW run shared by several methods counts for each; the
    /// ensemble's is the sum over members).
    pub train_seconds: f64,
    /// Post-hoc fitting: temperature search, Laplace Fisher + prior-precision grid.
    pub fit_seconds: f64,
    /// Evaluation on the in-distribution test set (mean pass + K sampled passes + metrics).
    pub eval_seconds: f64,
    /// Evaluation on the shifted sets (OOD), all of them.
    pub ood_eval_seconds: f64,
    /// The in-distribution evaluation's passes: single pass vs K sampled passes.
    pub eval: EvalCost,
}

impl Cell {
    pub fn key(&self) -> CellKey {
        CellKey::new(&self.task, &self.method, self.seed)
    }

    /// The result at the largest K.
    pub fn headline(&self) -> Option<&EvalResult> {
        self.results.iter().max_by_key(|r| r.num_samples)
    }

    /// The result at K = 0 (the mean / point prediction).
    pub fn at_mean(&self) -> Option<&EvalResult> {
        self.results.iter().find(|r| r.num_samples == 0)
    }

    /// Writes the cell to its place under `out` (atomically); returns the path.
    pub fn write(&self, out: &Path) -> Result<PathBuf> {
        let path = self.key().path(out);
        crate::atomic::write_json(&path, self)?;
        Ok(path)
    }

    pub fn read(path: &Path) -> Result<Cell> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text)
            .map_err(|e| Error::BadFile { file: path.into(), reason: format!("not a sweep cell: {e}") })
    }
}

/// Every cell under `<out>/cells`, sorted by (task, method, seed).
pub fn read_cells(out: &Path) -> Result<Vec<Cell>> {
    let root = out.join("cells");
    let mut cells = Vec::new();
    if !root.exists() {
        return Ok(cells);
    }
    let list = |dir: &Path| -> Result<Vec<PathBuf>> {
        let mut v: Vec<PathBuf> =
            std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?.filter_map(|e| e.ok().map(|e| e.path())).collect();
        v.sort();
        Ok(v)
    };
    for task in list(&root)?.into_iter().filter(|p| p.is_dir()) {
        for method in list(&task)?.into_iter().filter(|p| p.is_dir()) {
            for file in list(&method)? {
                let name = file.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                if name.starts_with("seed") && name.ends_with(".json") {
                    cells.push(Cell::read(&file)?);
                }
            }
        }
    }
    cells.sort_by_key(|c| c.key());
    Ok(cells)
}

/// Mean and sample standard deviation (ddof = 1; 0 for a single seed) of one metric.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stat {
    pub mean: f64,
    pub std: f64,
    pub n: usize,
}

impl Stat {
    pub fn of(values: &[f64]) -> Option<Stat> {
        let n = values.len();
        if n == 0 {
            return None;
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let std =
            if n > 1 { (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt() } else { 0.0 };
        Some(Stat { mean, std, n })
    }
}

/// The metric columns of the tables: (key, header, shown in percent, higher is better).
pub const COLUMNS: [(&str, &str, bool, bool); 10] = [
    ("acc", "ACC", true, true),
    ("f1", "F1", true, true),
    ("mcc", "MCC", true, true),
    ("pearson", "Pearson", true, true),
    ("spearman", "Spearman", true, true),
    ("mse", "MSE", false, false),
    ("ece15", "ECE-15", true, false),
    ("ece10", "ECE-10", true, false),
    ("nll", "NLL", false, false),
    ("brier", "Brier", false, false),
];

fn metric(r: &EvalResult, key: &str) -> Option<f64> {
    let m = &r.metrics;
    match key {
        "acc" => m.acc,
        "f1" => m.f1,
        "mcc" => m.mcc,
        "pearson" => m.pearson,
        "spearman" => m.spearman,
        "mse" => m.mse,
        "ece15" => m.ece15,
        "ece10" => m.ece10,
        "nll" => m.nll,
        "brier" => m.brier,
        _ => None,
    }
}

/// One row of the summary: a method on a task at one K, over seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SummaryRow {
    pub task: String,
    /// The method label; `<method>@mean` for IVON's K = 0 row.
    pub method: String,
    pub kind: MethodKind,
    /// Samples K of the predictive (0: the mean / point estimate).
    pub num_samples: usize,
    pub seeds: Vec<u64>,
    pub metrics: BTreeMap<String, Stat>,
    /// Cost over seeds: `train_s`, `fit_s`, `eval_s`, `eval_ms_per_example`, `k_cost_ratio`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cost: BTreeMap<String, Stat>,
    /// Per shifted task: `acc`, `ece15`, `nll` on the shifted set and `<score>_<metric>` of the
    /// detection (e.g. `entropy_auroc`, `mutual_information_fpr95`), over seeds.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ood: BTreeMap<String, BTreeMap<String, Stat>>,
}

/// The cost columns: (key, header).
pub const COST_COLUMNS: [(&str, &str); 11] = [
    ("train_s", "train s"),
    ("fit_s", "fit s"),
    ("eval_s", "eval s"),
    ("eval_ms_per_example", "eval ms/example"),
    ("k_cost_ratio", "K-pass cost / (K × 1 pass)"),
    ("bops_pct", "BOPs % of LoRA"),
    ("adapter_bops_pct", "adapter BOPs % of LoRA"),
    ("mean_rank", "mean rank"),
    ("mean_bits", "mean bits"),
    ("below_16_bit_pct", "tensors < 16 bits %"),
    ("rank_pruned_pct", "rank pruned %"),
];

/// The OOD columns: (key, header, shown in percent, higher is better).
pub const OOD_COLUMNS: [(&str, &str, bool, bool); 11] = [
    ("acc", "ACC (shift)", true, true),
    ("ece15", "ECE-15 (shift)", true, false),
    ("one_minus_max_prob_auroc", "AUROC 1−max p", true, true),
    ("entropy_auroc", "AUROC H", true, true),
    ("mutual_information_auroc", "AUROC MI", true, true),
    ("one_minus_max_prob_aupr", "AUPR 1−max p", true, true),
    ("entropy_aupr", "AUPR H", true, true),
    ("mutual_information_aupr", "AUPR MI", true, true),
    ("one_minus_max_prob_fpr95", "FPR95 1−max p", true, false),
    ("entropy_fpr95", "FPR95 H", true, false),
    ("mutual_information_fpr95", "FPR95 MI", true, false),
];

fn score_name(s: OodScore) -> &'static str {
    match s {
        OodScore::OneMinusMaxProb => "one_minus_max_prob",
        OodScore::Entropy => "entropy",
        OodScore::MutualInformation => "mutual_information",
    }
}

/// The flat OOD values of one entry, keyed as in [`OOD_COLUMNS`] (plus `nll`).
fn ood_values(e: &OodEntry) -> Vec<(String, f64)> {
    let mut v = Vec::new();
    for (k, x) in [("acc", e.shifted.acc), ("ece15", e.shifted.ece15), ("nll", e.shifted.nll)] {
        if let Some(x) = x {
            v.push((k.to_string(), x));
        }
    }
    for r in &e.detection {
        let s = score_name(r.score);
        v.push((format!("{s}_auroc"), r.metrics.auroc));
        v.push((format!("{s}_aupr"), r.metrics.aupr));
        v.push((format!("{s}_fpr95"), r.metrics.fpr95));
    }
    v
}

/// The cost values of a cell at the summary row's K.
fn cost_values(c: &Cell) -> Vec<(&'static str, f64)> {
    let Some(cost) = &c.cost else {
        return vec![("train_s", c.train_seconds), ("eval_s", c.eval_seconds)];
    };
    let mut v = vec![("train_s", cost.train_seconds), ("fit_s", cost.fit_seconds), ("eval_s", cost.eval_seconds)];
    if cost.eval.num_examples > 0 {
        v.push(("eval_ms_per_example", 1000.0 * cost.eval_seconds / cost.eval.num_examples as f64));
    }
    if let Some(r) = cost.eval.ratio() {
        v.push(("k_cost_ratio", r));
    }
    v.extend(compression_values(&c.params));
    v
}

/// B-LoRA cells (`params.bops`, written by `compare`): BOPs against LoRA of the same initial rank
/// in percent (whole adapted layers, and the adapter matmuls alone), the mean learned rank, the
/// mean learned bit-width over every quantized tensor, the share of quantized tensors below 16
/// bits and the share of rank components pruned.
fn compression_values(params: &serde_json::Value) -> Vec<(&'static str, f64)> {
    let b = &params["bops"];
    let mut v = Vec::new();
    for (key, field, scale) in
        [("bops_pct", "ratio", 100.0), ("adapter_bops_pct", "adapter_ratio", 100.0), ("mean_rank", "mean_rank", 1.0)]
    {
        if let Some(x) = b[field].as_f64() {
            v.push((key, scale * x));
        }
    }
    if let Some(x) = b["mean_bits"].as_f64() {
        v.push(("mean_bits", x));
    }
    // What training chose, from the per-layer table: the share of quantized tensors trained
    // below the 16 bits the gates start at, and the share of rank components pruned.
    if let Some(layers) = b["learned"].as_array() {
        let (mut low, mut quantized, mut pruned, mut r) = (0usize, 0usize, 0usize, 0usize);
        for layer in layers.iter().filter_map(|l| l.get(1)) {
            if let Some(bits) = layer["bits"].as_object() {
                quantized += bits.len();
                low += bits.values().filter(|b| b.as_u64().is_some_and(|b| b < 16)).count();
            }
            if let (Some(r0), Some(rank)) = (layer["r"].as_u64(), layer["rank"].as_u64()) {
                r += r0 as usize;
                pruned += r0.saturating_sub(rank) as usize;
            }
        }
        if quantized > 0 {
            v.push(("below_16_bit_pct", 100.0 * low as f64 / quantized as f64));
        }
        if r > 0 {
            v.push(("rank_pruned_pct", 100.0 * pruned as f64 / r as f64));
        }
    }
    v
}

/// Mean ± std over seeds of named values.
fn stats<K: Into<String>>(values: impl IntoIterator<Item = (K, f64)>) -> BTreeMap<String, Stat> {
    let mut by: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for (k, v) in values {
        by.entry(k.into()).or_default().push(v);
    }
    by.into_iter().filter_map(|(k, v)| Stat::of(&v).map(|s| (k, s))).collect()
}

/// The aggregate of a sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub rows: Vec<SummaryRow>,
    /// Notes printed under the tables (conventions).
    pub notes: Vec<String>,
}

/// Groups cells by (task, method) and averages each metric over seeds: the headline (largest K)
/// row per method, plus a `@mean` (K = 0) row for methods whose mean is a model of its own
/// (IVON). Rows are ordered by task, then method kind (`MethodKind::ALL` order), then label.
pub fn aggregate(cells: &[Cell]) -> Summary {
    let mut groups: BTreeMap<(String, MethodKind, String), Vec<&Cell>> = BTreeMap::new();
    for c in cells {
        groups.entry((c.task.clone(), c.kind, c.method.clone())).or_default().push(c);
    }
    let mut rows = Vec::new();
    for ((task, kind, method), group) in groups {
        let mut picks: Vec<(String, Vec<&EvalResult>)> = Vec::new();
        if kind.has_distinct_mean() {
            picks.push((format!("{method}@mean"), group.iter().filter_map(|c| c.at_mean()).collect()));
        }
        picks.push((method.clone(), group.iter().filter_map(|c| c.headline()).collect()));
        for (label, results) in picks {
            if results.is_empty() {
                continue;
            }
            let k = results.iter().map(|r| r.num_samples).max().unwrap_or(0);
            let is_mean_row = label.ends_with("@mean");
            // Cost belongs to the method (its headline row); the @mean row shares the run.
            let cost = if is_mean_row { BTreeMap::new() } else { stats(group.iter().flat_map(|c| cost_values(c))) };
            let mut ood_tasks: Vec<&str> =
                group.iter().flat_map(|c| c.ood.iter().map(|o| o.ood_task.as_str())).collect();
            ood_tasks.sort_unstable();
            ood_tasks.dedup();
            let ood = ood_tasks
                .into_iter()
                .map(|t| {
                    let entries =
                        group.iter().flat_map(|c| c.ood.iter().filter(|o| o.ood_task == t && o.num_samples == k));
                    (t.to_string(), stats(entries.flat_map(ood_values)))
                })
                .filter(|(_, m)| !m.is_empty())
                .collect();
            let mut metrics = BTreeMap::new();
            for (key, ..) in COLUMNS {
                let values: Vec<f64> = results.iter().filter_map(|r| metric(r, key)).collect();
                if let Some(s) = Stat::of(&values) {
                    metrics.insert(key.to_string(), s);
                }
            }
            rows.push(SummaryRow {
                task: task.clone(),
                method: label,
                kind,
                num_samples: k,
                seeds: group.iter().map(|c| c.seed).collect(),
                metrics,
                cost,
                ood,
            });
        }
    }
    Summary {
        rows,
        notes: vec![
            "mean ± sample std (ddof = 1) over seeds; ACC, F1, MCC, Pearson, Spearman, ECE in %".into(),
            "ECE-15: torchmetrics CalibrationError(n_bins=15, norm=l1), bins [lo, hi); ECE-10: ivon-lora, bins (lo, hi]"
                .into(),
            "NLL: mean −ln p̄(y) per example; Brier: Σ_k (p̄_k − 1[y=k])², not divided by K".into(),
            "K: samples averaged in probability space (0 = mean / point estimate)".into(),
            "OOD: in-distribution test set = negatives, shifted test set = positives; scores 1 − max p̄, entropy H[p̄], \
             mutual information H[p̄] − mean_k H[p_k] (0 for K = 0); AUROC/AUPR (sklearn), FPR at 95 % TPR; in %"
                .into(),
            "cost: seconds (train: the training the method needs, a shared AdamW run counted for each method using it; \
             fit: temperature / Laplace; eval: test set, all passes); K-pass cost ratio = time of the K sampled passes \
             / (K × time of the single pass)"
                .into(),
        ],
    }
}

impl Summary {
    /// The tasks in row order.
    pub fn tasks(&self) -> Vec<String> {
        let mut t: Vec<String> = Vec::new();
        for r in &self.rows {
            if !t.contains(&r.task) {
                t.push(r.task.clone());
            }
        }
        t
    }

    /// The columns that have a value in some row of `task`.
    fn columns(&self, task: &str) -> Vec<(&'static str, &'static str, bool, bool)> {
        COLUMNS
            .iter()
            .copied()
            .filter(|(k, ..)| self.rows.iter().any(|r| r.task == task && r.metrics.contains_key(*k)))
            .collect()
    }

    /// The best mean of column `key` on `task` (max or min per the column).
    fn best(&self, task: &str, key: &str, higher: bool) -> Option<f64> {
        let vals = self.rows.iter().filter(|r| r.task == task).filter_map(|r| r.metrics.get(key)).map(|s| s.mean);
        if higher {
            vals.fold(None, |b: Option<f64>, v| Some(b.map_or(v, |b| b.max(v))))
        } else {
            vals.fold(None, |b: Option<f64>, v| Some(b.map_or(v, |b| b.min(v))))
        }
    }

    /// One Markdown table per task; the best mean of each column in bold (ties all bold).
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        for task in self.tasks() {
            let cols = self.columns(&task);
            s.push_str(&format!("### {task}\n\n| method | K | seeds |"));
            for (_, h, ..) in &cols {
                s.push_str(&format!(" {h} |"));
            }
            s.push_str("\n|---|---:|---:|");
            s.push_str(&"---:|".repeat(cols.len()));
            s.push('\n');
            for r in self.rows.iter().filter(|r| r.task == task) {
                s.push_str(&format!("| {} | {} | {} |", r.method, r.num_samples, r.seeds.len()));
                for &(key, _, pct, higher) in &cols {
                    let cell = match r.metrics.get(key) {
                        None => "–".to_string(),
                        Some(st) => {
                            let text = fmt_stat(st, pct);
                            let best = self.best(&task, key, higher);
                            if best.is_some_and(|b| same(b, st.mean, pct)) {
                                format!("**{text}**")
                            } else {
                                text
                            }
                        }
                    };
                    s.push_str(&format!(" {cell} |"));
                }
                s.push('\n');
            }
            s.push('\n');
            self.extra_tables(&task, &mut s);
        }
        for n in &self.notes {
            s.push_str(&format!("- {n}\n"));
        }
        s
    }

    /// The cost table and one OOD table per shifted task of `task` (Markdown), when present.
    fn extra_tables(&self, task: &str, s: &mut String) {
        let rows: Vec<&SummaryRow> = self.rows.iter().filter(|r| r.task == task).collect();
        let cost_cols: Vec<(&str, &str)> =
            COST_COLUMNS.iter().copied().filter(|(k, _)| rows.iter().any(|r| r.cost.contains_key(*k))).collect();
        if !cost_cols.is_empty() {
            s.push_str(&format!("#### {task}: cost (seconds; B-LoRA: BOPs, learned rank and bits)\n\n| method | K |"));
            for (_, h) in &cost_cols {
                s.push_str(&format!(" {h} |"));
            }
            s.push_str("\n|---|---:|");
            s.push_str(&"---:|".repeat(cost_cols.len()));
            s.push('\n');
            for r in rows.iter().filter(|r| !r.cost.is_empty()) {
                s.push_str(&format!("| {} | {} |", r.method, r.num_samples));
                for (k, _) in &cost_cols {
                    let cell = match r.cost.get(*k) {
                        Some(st) if *k == "k_cost_ratio" => format!("{:.2} ± {:.2}", st.mean, st.std),
                        Some(st) => format!("{:.1} ± {:.1}", st.mean, st.std),
                        None => "–".into(),
                    };
                    s.push_str(&format!(" {cell} |"));
                }
                s.push('\n');
            }
            s.push('\n');
        }
        for ood in self.ood_tasks(task) {
            let n = |key: &str| rows.iter().filter_map(|r| r.ood.get(&ood)?.get(key)).count();
            let cols: Vec<_> = OOD_COLUMNS.iter().copied().filter(|(k, ..)| n(k) > 0).collect();
            s.push_str(&format!(
                "#### OOD: trained on {task}, shifted test set {ood} (in-distribution: the {task} test set)\n\n| method | K |"
            ));
            for (_, h, ..) in &cols {
                s.push_str(&format!(" {h} |"));
            }
            s.push_str("\n|---|---:|");
            s.push_str(&"---:|".repeat(cols.len()));
            s.push('\n');
            let best = |key: &str, higher: bool| {
                let vals = rows.iter().filter_map(|r| r.ood.get(&ood)?.get(key)).map(|st| st.mean);
                if higher {
                    vals.fold(None, |b: Option<f64>, v| Some(b.map_or(v, |b| b.max(v))))
                } else {
                    vals.fold(None, |b: Option<f64>, v| Some(b.map_or(v, |b| b.min(v))))
                }
            };
            for r in rows.iter().filter(|r| r.ood.contains_key(&ood)) {
                s.push_str(&format!("| {} | {} |", r.method, r.num_samples));
                for &(key, _, pct, higher) in &cols {
                    let cell = match r.ood.get(&ood).and_then(|m| m.get(key)) {
                        None => "–".to_string(),
                        Some(st) => {
                            let text = fmt_stat(st, pct);
                            if best(key, higher).is_some_and(|b| same(b, st.mean, pct)) {
                                format!("**{text}**")
                            } else {
                                text
                            }
                        }
                    };
                    s.push_str(&format!(" {cell} |"));
                }
                s.push('\n');
            }
            s.push('\n');
        }
    }

    /// The shifted tasks that some row of `task` reports.
    pub fn ood_tasks(&self, task: &str) -> Vec<String> {
        let mut t: Vec<String> =
            self.rows.iter().filter(|r| r.task == task).flat_map(|r| r.ood.keys().cloned()).collect();
        t.sort();
        t.dedup();
        t
    }

    /// CSV: one line per row, `<metric>_mean,<metric>_std` for every column (fractions, not %),
    /// then the cost columns and `ood_<shifted task>_<metric>` for every shifted task of the sweep.
    pub fn csv(&self) -> String {
        let mut all_ood: Vec<String> = self.rows.iter().flat_map(|r| r.ood.keys().cloned()).collect();
        all_ood.sort();
        all_ood.dedup();
        let mut s = String::from("task,method,num_samples,seeds");
        for (k, ..) in COLUMNS {
            s.push_str(&format!(",{k}_mean,{k}_std"));
        }
        for (k, _) in COST_COLUMNS {
            s.push_str(&format!(",{k}_mean,{k}_std"));
        }
        for t in &all_ood {
            for (k, ..) in OOD_COLUMNS {
                s.push_str(&format!(",ood_{t}_{k}_mean,ood_{t}_{k}_std"));
            }
        }
        s.push('\n');
        let put = |s: &mut String, st: Option<&Stat>| match st {
            Some(st) => s.push_str(&format!(",{},{}", st.mean, st.std)),
            None => s.push_str(",,"),
        };
        for r in &self.rows {
            let seeds: Vec<String> = r.seeds.iter().map(|x| x.to_string()).collect();
            s.push_str(&format!("{},{},{},{}", r.task, r.method, r.num_samples, seeds.join(" ")));
            for (k, ..) in COLUMNS {
                put(&mut s, r.metrics.get(k));
            }
            for (k, _) in COST_COLUMNS {
                put(&mut s, r.cost.get(k));
            }
            for t in &all_ood {
                for (k, ..) in OOD_COLUMNS {
                    put(&mut s, r.ood.get(t).and_then(|m| m.get(k)));
                }
            }
            s.push('\n');
        }
        s
    }
}

/// Values equal as displayed (so that ties in the table are both bold).
fn same(a: f64, b: f64, pct: bool) -> bool {
    let scale = if pct { 1000.0 } else { 10000.0 };
    (a * scale).round() == (b * scale).round()
}

fn fmt_stat(s: &Stat, pct: bool) -> String {
    if pct {
        format!("{:.1} ± {:.1}", s.mean * 100.0, s.std * 100.0)
    } else {
        format!("{:.3} ± {:.3}", s.mean, s.std)
    }
}

#[cfg(test)]
mod tests {
    use super::compression_values;

    #[test]
    fn compression_values_count_low_bit_tensors_and_pruned_ranks() {
        // Two layers of r 8: ranks 8 and 4; four quantized tensors, one at 8 and one at 4 bits.
        let params = serde_json::json!({ "bops": {
            "ratio": 0.2, "adapter_ratio": 0.25, "mean_rank": 6.0, "mean_bits": 11.0,
            "learned": [
                ["l0", { "r": 8, "rank": 8, "bits": { "x": 16, "base": 8 } }],
                ["l1", { "r": 8, "rank": 4, "bits": { "x": 16, "base": 4 } }],
            ],
        }});
        let v: std::collections::BTreeMap<_, _> = compression_values(&params).into_iter().collect();
        assert_eq!(v["bops_pct"], 20.0);
        assert_eq!(v["below_16_bit_pct"], 50.0);
        assert_eq!(v["rank_pruned_pct"], 25.0);
        // Rank gates only (no quantizers): no bit share, ranks still counted.
        let params = serde_json::json!({ "bops": { "learned": [["l0", { "r": 8, "rank": 2, "bits": {} }]] } });
        let v: std::collections::BTreeMap<_, _> = compression_values(&params).into_iter().collect();
        assert!(!v.contains_key("below_16_bit_pct"));
        assert_eq!(v["rank_pruned_pct"], 75.0);
        // LoRA cells have no `bops`: nothing.
        assert!(compression_values(&serde_json::json!({})).is_empty());
    }
}
