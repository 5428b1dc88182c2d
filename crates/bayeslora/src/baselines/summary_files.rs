//! A sweep's summary files and plots: `summary.{md,csv,json}`, and per task the pooled
//! reliability diagram, the K curves and the learned ranks/bits heat map of each B-LoRA method.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::sweep::{aggregate, read_cells, Cell, Stat, Summary};
use super::MethodKind;
use crate::adapters::blora::LearnedLayer;
use crate::eval::metrics::ReliabilityBins;
use crate::eval::EvalResult;
use crate::plot::{k_curve_plot, plot_learned, reliability_diagram, KCurve, Panel};
use crate::Result;

/// Reliability bins summed over seeds (counts add; per-bin accuracy and confidence are
/// count-weighted means). `None` if the cells have no bins or their binnings differ.
pub fn pool_reliability(cells: &[&Cell]) -> Option<ReliabilityBins> {
    let mut it = cells.iter().filter_map(|c| c.reliability.as_ref());
    let first = it.next()?.clone();
    let mut acc_sum: Vec<f64> = first.accuracy.iter().zip(&first.count).map(|(a, &n)| a * n as f64).collect();
    let mut conf_sum: Vec<f64> = first.confidence.iter().zip(&first.count).map(|(c, &n)| c * n as f64).collect();
    let mut pooled = first;
    for b in it {
        if b.binning != pooled.binning || b.count.len() != pooled.count.len() {
            return None;
        }
        for i in 0..b.count.len() {
            pooled.count[i] += b.count[i];
            acc_sum[i] += b.accuracy[i] * b.count[i] as f64;
            conf_sum[i] += b.confidence[i] * b.count[i] as f64;
        }
        pooled.total += b.total;
    }
    for i in 0..pooled.count.len() {
        let n = pooled.count[i] as f64;
        pooled.accuracy[i] = if n > 0.0 { acc_sum[i] / n } else { 0.0 };
        pooled.confidence[i] = if n > 0.0 { conf_sum[i] / n } else { 0.0 };
    }
    Some(pooled)
}

/// The K curves of every method on `task`.
pub fn k_curves(cells: &[Cell], task: &str) -> Vec<KCurve> {
    let mut by_method: BTreeMap<(MethodKind, String), Vec<&Cell>> = BTreeMap::new();
    for c in cells.iter().filter(|c| c.task == task) {
        by_method.entry((c.kind, c.method.clone())).or_default().push(c);
    }
    let mut out = Vec::new();
    for ((_, method), group) in by_method {
        let mut ks: Vec<usize> = group[0].results.iter().map(|r| r.num_samples).collect();
        ks.retain(|k| group.iter().all(|c| c.results.iter().any(|r| r.num_samples == *k)));
        ks.sort_unstable();
        ks.dedup();
        let points = ks
            .into_iter()
            .filter_map(|k| {
                let rs: Vec<&EvalResult> =
                    group.iter().filter_map(|c| c.results.iter().find(|r| r.num_samples == k)).collect();
                let acc = Stat::of(&rs.iter().filter_map(|r| r.metrics.acc).collect::<Vec<_>>())?;
                let ece = Stat::of(&rs.iter().filter_map(|r| r.metrics.ece15).collect::<Vec<_>>())?;
                Some((k, acc.mean, ece.mean))
            })
            .collect();
        out.push(KCurve { method, points });
    }
    out
}

/// Aggregates every cell under `out`: writes `summary.{md,csv,json}` and, per task, a pooled
/// reliability diagram (one panel per method) and the K curves under `plots/`. `title` prefixes
/// the plot titles (e.g. the model name). Returns the summary and the written paths.
pub fn write_summary(out: &Path, title: &str) -> Result<(Summary, Vec<PathBuf>)> {
    let cells = read_cells(out)?;
    let summary = aggregate(&cells);
    let mut written = Vec::new();
    for (name, text) in [("summary.md", summary.markdown()), ("summary.csv", summary.csv())] {
        let p = out.join(name);
        crate::atomic::write(&p, text.as_bytes())?;
        written.push(p);
    }
    let p = out.join("summary.json");
    crate::atomic::write_json(&p, &summary)?;
    written.push(p);
    for task in summary.tasks() {
        let mut named: Vec<(String, ReliabilityBins)> = Vec::new();
        let mut groups: BTreeMap<(MethodKind, String), Vec<&Cell>> = BTreeMap::new();
        for c in cells.iter().filter(|c| c.task == task) {
            groups.entry((c.kind, c.method.clone())).or_default().push(c);
        }
        for ((_, method), group) in &groups {
            if let Some(b) = pool_reliability(group) {
                let k = group[0].headline().map_or(0, |r| r.num_samples);
                named.push((format!("{method} (K={k})"), b));
            }
        }
        let panels: Vec<Panel<'_>> = named.iter().map(|(n, b)| Panel { name: n, bins: b }).collect();
        if !panels.is_empty() {
            let stem = out.join("plots").join(format!("reliability_{task}"));
            written.extend(reliability_diagram(&stem, &format!("{title} — {task} (pooled over seeds)"), &panels)?);
        }
        let curves = k_curves(&cells, &task);
        if !curves.is_empty() {
            let stem = out.join("plots").join(format!("k_curve_{task}"));
            written.extend(k_curve_plot(&stem, &format!("{title} — {task}"), &curves)?);
        }
        for (method, learned) in learned_maps(&cells, &task) {
            let stem = out.join("plots").join(format!("learned_{task}_{method}"));
            written.extend(plot_learned(&stem, &learned)?);
        }
    }
    Ok((summary, written))
}

/// Per B-LoRA method of `task`, the learned ranks and bits of its lowest seed (`params.bops.learned`,
/// written by `compare`): the run whose per-layer heat map the summary shows.
fn learned_maps(cells: &[Cell], task: &str) -> BTreeMap<String, Vec<(String, LearnedLayer)>> {
    let mut first: BTreeMap<String, &Cell> = BTreeMap::new();
    for c in cells.iter().filter(|c| c.task == task && !c.params["bops"]["learned"].is_null()) {
        let e = first.entry(c.method.clone()).or_insert(c);
        if c.seed < e.seed {
            *e = c;
        }
    }
    first
        .into_iter()
        .filter_map(|(m, c)| serde_json::from_value(c.params["bops"]["learned"].clone()).ok().map(|l| (m, l)))
        .collect()
}
