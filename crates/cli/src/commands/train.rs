//! `bayeslora train`: one run from flags and/or a TOML file.
use crate::args::TrainArgs;
use crate::config;
use crate::steps;
use crate::ui::progress::Terminal;
use anyhow::{bail, Result};
use bayeslora::data::TextEncoder;
use bayeslora::run::launch::{self, Launch};
use bayeslora::run::{self, RunConfig, Start};
use std::process::ExitCode;

pub fn run(args: TrainArgs) -> Result<ExitCode> {
    let group = Launch::from_env()?;
    let spawn = args.gpus.filter(|&n| n > 1 && group.is_none());
    let args = args.run;
    let cfg = config::resolve(RunConfig::default(), &args)?;
    let start = if args.resume { Start::Resume } else { Start::Fresh };
    // One rank checks (and clears) the output folder: rank 0, or the launcher before its ranks.
    let lead = group.as_ref().is_none_or(|g| g.rank == 0);
    if start == Start::Fresh && lead {
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
    if let Some(gpus) = spawn {
        if !cfg.device.starts_with("cuda") {
            bail!("--gpus {gpus} trains one process per GPU: add --device cuda (the device is `{}`)", cfg.device);
        }
        // This command again on each GPU (with WORLD_SIZE set, the copies train instead).
        let argv: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        let code = launch::spawn_local(gpus, &argv)?;
        return Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)));
    }
    steps::check_memory(&cfg)?;
    let loaded = steps::load_model(&cfg)?;
    let encoder = TextEncoder::new(loaded.tokenizer()?.clone(), cfg.max_len)?;
    let mut term = Terminal::default();
    let data = run::load_data(&cfg, &encoder, &loaded, &mut term)?;
    let label = format!("{:?}", cfg.train.optimizer).to_lowercase();
    let outcome = run::train_and_eval(&cfg, &label, &data, start, loaded, &mut term)?;
    if !lead {
        return Ok(if outcome.interrupted { ExitCode::from(130) } else { ExitCode::SUCCESS });
    }
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
