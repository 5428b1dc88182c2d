//! `bayeslora eval RUN`: re-evaluates a run folder from its config and newest checkpoint.
use crate::args::EvalArgs;
use crate::steps;
use crate::ui::progress::Terminal;
use anyhow::{bail, Result};
use bayeslora::run::{self, RunConfig, Start};
use std::path::Path;
use std::process::ExitCode;

pub fn run(args: EvalArgs) -> Result<ExitCode> {
    // Paths in config.toml are taken relative to the run folder, so `eval RUN` reads and writes
    // inside RUN whatever the current folder is.
    let mut cfg = RunConfig::open_run(&args.run)?;
    if args.eval_file.is_some() {
        cfg.eval_file = args.eval_file;
    }
    if let Some(k) = args.samples {
        cfg.eval.samples = k;
    }
    if args.eval_limit.is_some() {
        cfg.eval_limit = args.eval_limit;
    }
    let ckpt_dir = cfg.checkpoint_dir();
    if !has_checkpoint_folder(&ckpt_dir) {
        bail!(
            "{}: no checkpoint to evaluate; train the run first (bayeslora train -o {})",
            ckpt_dir.display(),
            args.run.display()
        );
    }
    // The newest good checkpoint, as it is: an interrupted run is evaluated where it stopped.
    let loaded = steps::load_model(&cfg)?;
    let encoder = bayeslora::data::TextEncoder::new(loaded.tokenizer()?.clone(), cfg.max_len)?;
    let mut term = Terminal::default();
    let data = run::load_data(&cfg, &encoder, &loaded, &mut term)?;
    let label = format!("{:?}", cfg.train.optimizer).to_lowercase();
    let outcome = run::train_and_eval(&cfg, &label, &data, Start::Evaluate, loaded, &mut term)?;
    println!("{}", bayeslora::eval::render_table(&outcome.results));
    Ok(ExitCode::SUCCESS)
}

/// Whether `dir` holds any `checkpoint-*` folder (good or damaged).
fn has_checkpoint_folder(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.filter_map(|e| e.ok()).any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("checkpoint-") && !name.ends_with(".partial") && e.path().is_dir()
        })
    })
}
