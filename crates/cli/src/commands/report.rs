//! `bayeslora report bops RUN`: the bit operations of a trained B-LoRA run against LoRA of the same
//! initial rank (per layer and in total, with every counting assumption), the learned ranks and
//! bit-widths, and their heat map. `bayeslora train --method blora` writes the same files into its
//! output folder; this command recomputes them from the newest checkpoint, at another precision
//! or token count if asked.
use crate::args::{ReportArgs, ReportWhat};
use anyhow::{bail, Context, Result};
use bayeslora::adapters::blora::{bops_report, render_table, AttachedBLora, BopsReport, LearnedLayer};
use bayeslora::export::save_bops_report;
use bayeslora::plot::plot_learned;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

pub fn run(args: ReportArgs) -> Result<ExitCode> {
    match args.what {
        ReportWhat::Bops => {
            let run = super::export::open_run(&args.run)?;
            let Some(blora) = run.model.adapters.blora() else {
                bail!("{} is not a B-LoRA run (train with --method blora)", args.run.display());
            };
            let stem = args.output.clone().unwrap_or_else(|| args.run.join("bops"));
            let bops = write_bops(blora, &stem, args.precision, args.tokens)?;
            println!("{}", render_table(&bops.report));
            for f in bops.files {
                eprintln!("wrote {}", f.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What [`write_bops`] computed and wrote.
pub struct Bops {
    pub report: BopsReport,
    /// Learned rank and bits per module.
    pub learned: Vec<(String, LearnedLayer)>,
    pub files: Vec<PathBuf>,
}

/// Computes the BOPs report of `blora` and writes `<stem>.{json,txt}` and the learned ranks/bits
/// heat map `<stem>_learned.{png,svg}`.
pub fn write_bops(blora: &AttachedBLora, stem: &Path, precision: u32, tokens: f64) -> Result<Bops> {
    let learned = blora.learned()?;
    let report = bops_report(&learned, precision, tokens)?;
    if let Some(dir) = stem.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut files = save_bops_report(stem, &report)?;
    let name = stem.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "bops".into());
    files.extend(plot_learned(&stem.with_file_name(format!("{name}_learned")), &learned)?);
    Ok(Bops { report, learned, files })
}

/// What a B-LoRA model learned, for result files (`results.json` info, `compare` cells): BOPs
/// against LoRA of the same initial rank (the report's ratios and totals), mean learned rank,
/// mean bit-width over every quantized tensor, and the per-layer table.
pub fn summary(report: &BopsReport, learned: &[(String, LearnedLayer)]) -> serde_json::Value {
    let n = learned.len().max(1) as f64;
    let mean_rank = learned.iter().map(|(_, l)| l.rank as f64).sum::<f64>() / n;
    let bits: Vec<f64> = learned.iter().flat_map(|(_, l)| l.bits.values().map(|&b| f64::from(b))).collect();
    let mean_bits = (!bits.is_empty()).then(|| bits.iter().sum::<f64>() / bits.len() as f64);
    serde_json::json!({
        "ratio": report.ratio,
        "adapter_ratio": report.adapter_ratio,
        "reduction_percent": report.reduction_percent,
        "adapter_reduction_percent": report.adapter_reduction_percent,
        "mean_rank": mean_rank,
        "mean_bits": mean_bits,
        "totals": report.totals,
        "learned": learned,
    })
}
