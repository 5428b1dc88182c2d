//! `bayeslora bench train`: training throughput (tokens/s, step time) and peak resident memory
//! on a real model with fixed-shape synthetic batches (`--batch-size` × `--max-len` tokens, no
//! padding), so the figures compare one to one with `scripts/bench/torch_train.py`, which runs
//! the same step in PyTorch + peft (+ ivon-opt). Optimizer step times: `cargo bench -p ivon`.
use super::pipeline;
use crate::args::{BenchArgs, BenchWhat};
use crate::config::RunConfig;
use anyhow::{bail, Result};
use bayeslora::adapters::lora::LoraConfig;
use bayeslora::data::{BatchConfig, Encoded, EncodedDataset, Format, Label, Task};
use bayeslora::models::Backbone;
use bayeslora::train::{self, OptimizerKind, Silent, TaskModel};
use std::process::ExitCode;
use std::sync::Arc;

/// Peak resident set size of this process in bytes (Linux `VmHWM`).
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// `rows` sequences of exactly `len` tokens drawn from a fixed LCG, two classes.
fn synthetic(rows: usize, len: usize, vocab: u32, decoder: bool) -> Arc<EncodedDataset> {
    let mut state = 0x5EEDu64;
    let mut next = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) as u32
    };
    let rows = (0..rows)
        .map(|i| {
            let ids: Vec<u32> = (0..len).map(|_| 1000 + next() % (vocab - 1000)).collect();
            Encoded { type_ids: vec![0; len], ids, label: Label::Class(i % 2), num_choices: 2 }
        })
        .collect();
    Arc::new(EncodedDataset {
        task: Task::Sst2,
        format: if decoder { Format::Prompt } else { Format::Encoder },
        rows,
        num_classes: 2,
        label_token_ids: if decoder { vec![330, 331] } else { vec![] },
        pad_id: 0,
        truncated: 0,
    })
}

pub fn run(args: BenchArgs) -> Result<ExitCode> {
    if let BenchWhat::Optim = args.what {
        bail!("optimizer step times are measured by `cargo bench -p ivon` (JSON in target/bench/)");
    }
    let mut base = RunConfig { model: Some("minilm".into()), max_len: 64, ..Default::default() };
    base.train.max_steps = Some(20);
    base.train.batch = BatchConfig { batch_size: 32, shuffle: false, ..Default::default() };
    base.lora = LoraConfig { r: 8, lora_alpha: 16.0, ..Default::default() };
    let cfg = RunConfig::resolve(base, &args.run)?;
    let device = pipeline::device(&cfg.device)?;
    let steps = cfg.train.max_steps.unwrap_or(20);
    let warmup = 3;
    let mut rows = Vec::new();
    for kind in [OptimizerKind::Adamw, OptimizerKind::Ivon] {
        let loaded = pipeline::load_model(&cfg)?;
        let (decoder, vocab) = match &loaded.backbone {
            Backbone::Llama(m) => (true, m.config().vocab_size as u32),
            Backbone::Bert(m) => (false, m.config().vocab_size as u32),
            Backbone::DebertaV2(m) => (false, m.config().vocab_size as u32),
            _ => (false, 30000),
        };
        let data = synthetic(cfg.train.batch.batch_size * (steps + warmup), cfg.max_len, vocab, decoder);
        let model = TaskModel::build(loaded, &cfg.lora, 2, 0, &device)?;
        let mut t = cfg.train.clone();
        t.optimizer = kind;
        t.checkpoint_dir = None;
        t.schedule = train::Schedule::Constant;
        t.max_steps = Some(warmup);
        train::run(&model, data.clone(), &t, &device, &mut Silent, None, None)?;
        t.max_steps = Some(steps);
        let (summary, _) = train::run(&model, data, &t, &device, &mut Silent, None, None)?;
        let row = serde_json::json!({
            "stack": "bayeslora",
            "optimizer": format!("{kind:?}").to_lowercase(),
            "model": cfg.model.as_ref().map(|p| p.display().to_string()),
            "batch_size": t.batch.batch_size,
            "seq_len": cfg.max_len,
            "steps": summary.steps,
            "tokens_per_second": summary.tokens as f64 / summary.seconds,
            "step_ms": 1e3 * summary.seconds / summary.steps.max(1) as f64,
            "peak_rss_bytes": peak_rss_bytes(),
            "threads": candle_core::utils::get_num_threads(),
            "device": cfg.device,
            "lora": {"r": cfg.lora.r, "lora_alpha": cfg.lora.lora_alpha, "target_modules": cfg.lora.target_modules},
        });
        println!("{row}");
        rows.push(row);
    }
    pipeline::write_json(&args.out, &rows)?;
    println!("wrote {}", args.out.display());
    Ok(ExitCode::SUCCESS)
}
