//! `bayeslora train`: one run from flags and/or a TOML file.
use crate::args::RunArgs;
use crate::config;
use crate::steps;
use crate::ui::progress::Terminal;
use anyhow::{bail, Result};
use bayeslora::data::TextEncoder;
use bayeslora::run::{self, RunConfig, Start};
use std::process::ExitCode;

pub fn run(args: RunArgs) -> Result<ExitCode> {
    let cfg = config::resolve(RunConfig::default(), &args)?;
    let start = if args.resume { Start::Resume } else { Start::Fresh };
    if start == Start::Fresh {
        let earlier = run::existing_outputs(&cfg);
        if cfg.overwrite {
            run::clear_outputs(&cfg)?;
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
    steps::check_memory(&cfg)?;
    let loaded = steps::load_model(&cfg)?;
    let encoder = TextEncoder::new(loaded.tokenizer()?.clone(), cfg.max_len)?;
    let mut term = Terminal::default();
    let data = run::load_data(&cfg, &encoder, &loaded, &mut term)?;
    let label = format!("{:?}", cfg.train.optimizer).to_lowercase();
    let outcome = run::train_and_eval(&cfg, &label, &data, start, loaded, &mut term)?;
    println!("{}", bayeslora::eval::render_table(&outcome.results));
    let plots = run::plot_reliability(
        std::slice::from_ref(&outcome),
        &cfg.output.join("reliability"),
        &cfg.task,
        cfg.eval.bins,
    )?;
    println!("results: {}", cfg.output.join("results.json").display());
    for p in plots {
        println!("plot: {}", p.display());
    }
    Ok(if outcome.interrupted { ExitCode::from(130) } else { ExitCode::SUCCESS })
}
