//! `bayeslora train`: one run from flags and/or a TOML file.
use super::pipeline::{self, Start};
use crate::args::RunArgs;
use crate::config::RunConfig;
use anyhow::{bail, Result};
use bayeslora::data::TextEncoder;
use std::process::ExitCode;

pub fn run(args: RunArgs) -> Result<ExitCode> {
    let cfg = RunConfig::resolve(RunConfig::default(), &args)?;
    let start = if args.resume { Start::Resume } else { Start::Fresh };
    if start == Start::Fresh {
        let earlier = pipeline::existing_outputs(&cfg);
        if cfg.overwrite {
            pipeline::clear_outputs(&cfg)?;
        } else if !earlier.is_empty() {
            let names: Vec<String> = earlier
                .iter()
                .map(|p| p.file_name().map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into()))
                .collect();
            bail!(
                "{} already holds a run ({}); pass --resume to continue it, --overwrite to replace it, \
                 or choose another output folder (-o)",
                cfg.output.display(),
                names.join(", ")
            );
        }
    }
    pipeline::check_memory(&cfg)?;
    let loaded = pipeline::load_model(&cfg)?;
    let encoder = TextEncoder::new(loaded.tokenizer()?.clone(), cfg.max_len)?;
    let data = pipeline::load_data(&cfg, &encoder, &loaded)?;
    let label = format!("{:?}", cfg.train.optimizer).to_lowercase();
    let outcome = pipeline::train_and_eval(&cfg, &label, &data, start, loaded)?;
    println!("{}", bayeslora::eval::render_table(&outcome.results));
    let plots =
        pipeline::plot(std::slice::from_ref(&outcome), &cfg.output.join("reliability"), &cfg.task, cfg.eval.bins)?;
    println!("results: {}", cfg.output.join("results.json").display());
    for p in plots {
        println!("plot: {}", p.display());
    }
    Ok(if outcome.interrupted { ExitCode::from(130) } else { ExitCode::SUCCESS })
}
