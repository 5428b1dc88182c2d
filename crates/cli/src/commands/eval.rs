//! `bayeslora eval RUN`: re-evaluates a run folder from its config and newest checkpoint.
use super::pipeline;
use crate::args::EvalArgs;
use crate::config::RunConfig;
use anyhow::{Context, Result};
use std::process::ExitCode;

pub fn run(args: EvalArgs) -> Result<ExitCode> {
    let path = args.run.join("config.toml");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {}; is this a folder written by `bayeslora train`?", path.display()))?;
    let mut cfg: RunConfig = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    if args.eval_file.is_some() {
        cfg.eval_file = args.eval_file;
    }
    if let Some(k) = args.samples {
        cfg.eval.samples = k;
    }
    if args.eval_limit.is_some() {
        cfg.eval_limit = args.eval_limit;
    }
    // Resuming a finished run trains zero further steps and evaluates its final state.
    let loaded = pipeline::load_model(&cfg)?;
    let encoder = bayeslora::data::TextEncoder::new(loaded.tokenizer()?.clone(), cfg.max_len)?;
    let data = pipeline::load_data(&cfg, &encoder, &loaded)?;
    let label = format!("{:?}", cfg.train.optimizer).to_lowercase();
    let outcome = pipeline::train_and_eval(&cfg, &label, &data, true, loaded)?;
    println!("{}", bayeslora::eval::render_table(&outcome.results));
    Ok(ExitCode::SUCCESS)
}
