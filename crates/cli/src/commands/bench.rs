//! `bayeslora bench train`: training throughput (tokens/s, step time) and peak resident memory
//! on a real model, written as JSON. Optimizer step times: `cargo bench -p ivon`.
use super::pipeline;
use crate::args::{BenchArgs, BenchWhat};
use crate::assets;
use crate::config::RunConfig;
use anyhow::{bail, Result};
use bayeslora::data::TextEncoder;
use bayeslora::train::{self, OptimizerKind, Silent, TaskModel};
use std::process::ExitCode;

/// Peak resident set size of this process in bytes (Linux `VmHWM`).
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn run(args: BenchArgs) -> Result<ExitCode> {
    if let BenchWhat::Optim = args.what {
        bail!("optimizer step times are measured by `cargo bench -p ivon` (JSON in target/bench/)");
    }
    let mut base = super::demo::preset();
    base.train.max_steps = Some(20);
    base.eval.samples = 0;
    if args.run.model.is_none() {
        base.model = Some(assets::ensure(&assets::MINILM)?);
    }
    let cfg = RunConfig::resolve(base, &args.run)?;
    let loaded = pipeline::load_model(&cfg)?;
    let encoder = TextEncoder::new(loaded.tokenizer()?.clone(), cfg.max_len)?;
    let data = pipeline::load_data(&cfg, &encoder, &loaded)?;
    let device = pipeline::device(&cfg.device)?;
    let mut rows = Vec::new();
    for kind in [OptimizerKind::Adamw, OptimizerKind::Ivon] {
        let loaded = pipeline::load_model(&cfg)?;
        let model = TaskModel::build(loaded, &cfg.lora, data.train.num_classes.max(1), 0, &device)?;
        let mut t = cfg.train.clone();
        t.optimizer = kind;
        t.checkpoint_dir = None;
        let (summary, _) = train::run(&model, data.train.clone(), &t, &device, &mut Silent, None, None)?;
        let row = serde_json::json!({
            "optimizer": format!("{kind:?}").to_lowercase(),
            "model": cfg.model.as_ref().map(|p| p.display().to_string()),
            "steps": summary.steps,
            "batch_size": t.batch.batch_size,
            "tokens_per_second": summary.tokens as f64 / summary.seconds,
            "step_ms": 1e3 * summary.seconds / summary.steps.max(1) as f64,
            "peak_rss_bytes": peak_rss_bytes(),
            "threads": rayon_threads(),
            "device": cfg.device,
        });
        println!("{row}");
        rows.push(row);
    }
    pipeline::write_json(&args.out, &rows)?;
    println!("wrote {}", args.out.display());
    Ok(ExitCode::SUCCESS)
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}
