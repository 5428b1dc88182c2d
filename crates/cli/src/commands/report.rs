//! `bayeslora report bops RUN`: the bit operations of a trained B-LoRA run against LoRA of the same
//! initial rank (per layer and in total, with every counting assumption), the learned ranks and
//! bit-widths, and their heat map. `bayeslora train --method blora` writes the same files into its
//! output folder; this command recomputes them from the newest checkpoint, at another precision
//! or token count if asked.
use crate::args::{ReportArgs, ReportWhat};
use anyhow::{bail, Context, Result};
use bayeslora::adapters::blora::{bops_report, render_table, AttachedBLora, BopsReport};
use bayeslora::export::{plot_learned, save_bops_report};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

pub fn run(args: ReportArgs) -> Result<ExitCode> {
    match args.what {
        ReportWhat::Bops => {
            let run = super::export::open_run(&args.run)?;
            if run.model.blora.is_empty() {
                bail!("{} is not a B-LoRA run (train with --method blora)", args.run.display());
            }
            let stem = args.output.clone().unwrap_or_else(|| args.run.join("bops"));
            let (report, files) = write_bops(&run.model.blora, &stem, args.precision, args.tokens)?;
            println!("{}", render_table(&report));
            for f in files {
                eprintln!("wrote {}", f.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Computes the BOPs report of `blora` and writes `<stem>.{json,txt}` and the learned ranks/bits
/// heat map `<stem>_learned.{png,svg}`; returns the report and the files.
pub fn write_bops(
    blora: &AttachedBLora,
    stem: &Path,
    precision: u32,
    tokens: f64,
) -> Result<(BopsReport, Vec<PathBuf>)> {
    let learned = blora.learned()?;
    let report = bops_report(&learned, precision, tokens)?;
    if let Some(dir) = stem.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut files = save_bops_report(stem, &report)?;
    let name = stem.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "bops".into());
    files.extend(plot_learned(&stem.with_file_name(format!("{name}_learned")), &learned)?);
    Ok((report, files))
}
