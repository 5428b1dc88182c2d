//! `bayeslora compare --config configs/compare/NAME.toml`: methods × tasks × seeds from one TOML
//! file, run by the library ([`bayeslora::run::compare`]: the sweep file, the shared trained
//! models, one cell file per (task, method, seed), resume); this command applies the flags,
//! resolves the model name, shows progress and prints the aggregate table.
use crate::args::CompareArgs;
use crate::ui::progress::{Terminal, TrainProgress};
use anyhow::Result;
use bayeslora::baselines::summary_files::write_summary;
use bayeslora::run;
use bayeslora::run::compare::{self, CompareConfig, SweepHooks};
use bayeslora::train::Observer;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The sweep on a terminal: asset names (`minilm`, …) fetched once and resolved to their path,
/// each training as a [`TrainProgress`] bar without a metrics file.
impl SweepHooks for Terminal {
    fn model_path(&mut self, model: &Path) -> bayeslora::Result<PathBuf> {
        // The whole chain in one line, as `main` would print it.
        crate::assets::resolve(model).map_err(|e| bayeslora::Error::run(format!("{e:#}")))
    }

    fn trainer(&mut self, label: &str) -> Box<dyn Observer> {
        Box::new(TrainProgress::new(label))
    }
}

pub fn run(args: CompareArgs) -> Result<ExitCode> {
    let mut term = Terminal::for_sweep();
    let mut cfg = CompareConfig::load(&args.config, &mut term)?;
    if let Some(out) = &args.out {
        cfg.out = out.clone();
    }
    if let Some(device) = &args.device {
        run::device(device)?;
        cfg.run.insert("device".into(), toml::Value::String(device.clone()));
    }
    if !args.aggregate_only {
        compare::sweep(&cfg, &mut term)?;
    }
    let (summary, written) = write_summary(&cfg.out, &cfg.model)?;
    println!("\n{}", summary.markdown());
    for p in written {
        println!("wrote {}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}
