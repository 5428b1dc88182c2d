//! `bayeslora bench train`, `bench predict` and `bench attention`: flags to a [`bayeslora::bench`]
//! measurement (the models, synthetic data and timed loops live there), rows of JSON out.
//!
//! `bench train`: LoRA (or, with `--method blora`, B-LoRA) training throughput, peak memory and
//! MFU. `--model DIR|FILE|minilm|smollm2` times a real checkpoint (compare with
//! `scripts/bench/torch_train.py`); `--shape config.json` a Llama-family model with random
//! weights (compare with `scripts/bench/torch_anchor.py`, whose JSON fields every row repeats:
//! opt, targets, bsz, seq, step_ms, tokens_per_s, peak_gib, mfu_vs_989). `--objective` picks the
//! loss: `causal-lm` (the anchor's) or `label-words` (what `train` does on decoders).
//!
//! `bench predict`: the forward-only cost of K posterior samples against the mean (see
//! [`run_predict`]).
//!
//! `bench attention`: fused vs plain attention forward+backward per shape (see [`run_attention`]).
use crate::args::{BenchArgs, BenchObjective, BenchWhat};
use crate::config;
use crate::ui::progress::Terminal;
use anyhow::{bail, Result};
use bayeslora::adapters::lora::{LoraConfig, TargetModules};
use bayeslora::bench::{self, Objective, Source};
use bayeslora::data::BatchConfig;
use bayeslora::run::{self, AdapterKind, RunConfig};
use bayeslora::train::OptimizerKind;
use std::process::ExitCode;

/// The dense bf16 peak of an H100/H200 SXM in FLOP/s, the anchor's MFU denominator.
pub const ANCHOR_PEAK_FLOPS: f64 = 989e12;

/// What peft's `target_modules="all-linear"` selects in a Llama-family decoder (lm_head excluded).
const ALL_LINEAR: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

pub fn run(args: BenchArgs) -> Result<ExitCode> {
    if let BenchWhat::Optim = args.what {
        bail!("optimizer step times are measured by `cargo bench -p ivon` (JSON in target/bench/)");
    }
    if let BenchWhat::Attention = args.what {
        return run_attention(&args);
    }
    let random = args.shape.is_some();
    let mut base = RunConfig { model: Some("minilm".into()), max_len: 64, ..Default::default() };
    base.train.max_steps = Some(20);
    base.train.batch = BatchConfig { batch_size: 32, shuffle: false, ..Default::default() };
    base.lora = LoraConfig { r: 8, lora_alpha: 16.0, ..Default::default() };
    if random {
        // The anchor's settings: peft LoRA r 8, alpha 16, q,v; AdamW lr 1e-4 (torch's decay 1e-2);
        // IVON lr 0.03, ess 1e6, hess_init 3e-4, beta2 0.99999, decay 1e-6, ivon-opt's other defaults
        // (ess 1e6, not the anchor's first 1e4: at 1e4 a 7B model's loss overflows in both stacks on
        // random weights, σ ≈ 0.58 on every LoRA weight; 1e6 keeps it finite, σ ≈ 0.058).
        base.model = None;
        base.max_len = 512;
        base.train.max_steps = Some(8);
        base.train.batch.batch_size = 4;
        base.lora.target_modules = Some(TargetModules::List(vec!["q_proj".into(), "v_proj".into()]));
        base.train.adamw = ivon::AdamWConfig { lr: 1e-4, weight_decay: 1e-2, ..Default::default() };
        base.train.ivon = ivon::IvonConfig {
            lr: 0.03,
            ess: 1e6,
            hess_init: 3e-4,
            beta2: 0.99999,
            weight_decay: 1e-6,
            mc_samples: 1,
            ..Default::default()
        };
    }
    let mut cfg = config::resolve(base, &args.run)?;
    // peft's "all-linear" (lm_head excluded).
    let mut targets_json = serde_json::json!(null);
    if let Some(TargetModules::List(names)) = &cfg.lora.target_modules {
        targets_json = serde_json::json!(names);
        if names.iter().any(|n| n == "all-linear") {
            targets_json = serde_json::json!("all-linear");
            cfg.lora.target_modules = Some(TargetModules::List(ALL_LINEAR.iter().map(|s| s.to_string()).collect()));
        }
    }
    let dtype = cfg.compute_dtype()?;
    let steps = cfg.train.max_steps.unwrap_or(20);
    let warmup = args.warmup;
    let kinds = match args.run.optimizer {
        Some(_) => vec![cfg.train.optimizer],
        None => vec![OptimizerKind::Adamw, OptimizerKind::Ivon],
    };
    let objective =
        args.objective.unwrap_or(if random { BenchObjective::CausalLm } else { BenchObjective::LabelWords });
    let source = match &args.shape {
        Some(path) => Source::Shape(path.clone()),
        None => Source::Model(crate::steps::model_path(&cfg)?),
    };
    if let BenchWhat::Predict = args.what {
        return run_predict(&args, &cfg, &source, targets_json);
    }
    let mut rows = Vec::new();
    for kind in kinds {
        let lib_objective = match objective {
            BenchObjective::CausalLm => Objective::CausalLm,
            BenchObjective::LabelWords => Objective::LabelWords,
        };
        let m = bench::train(&cfg, &source, lib_objective, kind, steps, warmup, &mut Terminal::default())?;
        let targets_json = row_targets(&targets_json, &m.default_targets);
        let tok_s = m.tokens as f64 / m.seconds;
        let step_ms = 1e3 * m.seconds / m.steps.max(1) as f64;
        let flops = 4.0 * m.n_frozen as f64 * tok_s;
        let opt = format!("{kind:?}").to_lowercase();
        let row = serde_json::json!({
            // The anchor's fields.
            "opt": opt,
            "targets": targets_json,
            "bsz": cfg.train.batch.batch_size,
            "seq": cfg.max_len,
            "step_ms": round(step_ms, 1),
            "tokens_per_s": tok_s.round(),
            "peak_gib": round(m.peak_bytes as f64 / (1u64 << 30) as f64, 2),
            "mfu_vs_989": round(flops / ANCHOR_PEAK_FLOPS, 3),
            "time_to_first_step_s": m.time_to_first_step.map(|t| round(t, 4)),
            // Ours.
            "stack": "bayeslora",
            "version": env!("CARGO_PKG_VERSION"),
            "model": cfg.model.as_ref().map(|p| p.display().to_string()),
            "shape": args.shape.as_ref().map(|p| p.display().to_string()),
            "objective": match objective { BenchObjective::CausalLm => "causal-lm", BenchObjective::LabelWords => "label-words" },
            "device": cfg.device,
            "device_name": m.device_name,
            "dtype": format!("{dtype:?}").to_lowercase(),
            "steps": m.steps,
            "warmup": warmup,
            "n_frozen_params": m.n_frozen,
            "peak_kind": m.peak_kind,
            "peak_bytes": m.peak_bytes,
            "mfu": round(flops / (args.peak_tflops * 1e12), 4),
            "peak_tflops": args.peak_tflops,
            "final_loss": m.final_loss,
            "loss_finite": m.final_loss.is_finite(),
            "gradient_checkpointing": cfg.train.gradient_checkpointing,
            "threads": candle_core::utils::get_num_threads(),
            "lora": {"r": cfg.lora.r, "lora_alpha": cfg.lora.lora_alpha, "target_modules": cfg.lora.target_modules},
            "method": cfg.method,
            "blora": (cfg.method == AdapterKind::Blora).then(|| serde_json::to_value(&cfg.blora)).transpose()?,
            // The fields of earlier bench JSON (bench/results/2026-11-24_*).
            "optimizer": opt,
            "batch_size": cfg.train.batch.batch_size,
            "seq_len": cfg.max_len,
            "tokens_per_second": tok_s,
            "peak_rss_bytes": bench::peak_rss_bytes(),
        });
        println!("{row}");
        rows.push(row);
    }
    run::write_json(&args.out, &rows)?;
    println!("wrote {}", args.out.display());
    Ok(ExitCode::SUCCESS)
}

/// A row's `targets`: the modules named on the command line, else the architecture's defaults.
fn row_targets(named: &serde_json::Value, defaults: &Option<Vec<String>>) -> serde_json::Value {
    match (named, defaults) {
        (serde_json::Value::Null, Some(names)) => serde_json::json!(names),
        _ => named.clone(),
    }
}

/// `bayeslora bench predict`: [`bench::predict`], one row: the pass at the mean and the K
/// (`--samples`, default 10) sampled passes over `--max-steps` batches of `--batch-size` ×
/// `--max-len` tokens, after `--warmup` batches; `ratio` = K sampled passes / (K × the mean pass).
fn run_predict(
    args: &BenchArgs,
    cfg: &RunConfig,
    source: &Source,
    targets_json: serde_json::Value,
) -> Result<ExitCode> {
    let samples = args.run.samples.unwrap_or(10);
    let batches = cfg.train.max_steps.unwrap_or(20);
    let m = bench::predict(cfg, source, samples, batches, args.warmup, &mut Terminal::default())?;
    let targets_json = row_targets(&targets_json, &m.default_targets);
    let k = m.sample_pass_seconds.len() as f64;
    let sampled_ms = 1e3 * m.sample_pass_seconds.iter().sum::<f64>() / k;
    let row = serde_json::json!({
        "stack": "bayeslora",
        "what": "predict",
        "version": env!("CARGO_PKG_VERSION"),
        "model": cfg.model.as_ref().map(|p| p.display().to_string()),
        "shape": args.shape.as_ref().map(|p| p.display().to_string()),
        "targets": targets_json,
        "bsz": cfg.train.batch.batch_size,
        "seq": cfg.max_len,
        "batches": batches,
        "warmup": args.warmup,
        "samples": samples,
        "mean_pass_ms": round(1e3 * m.mean_pass_seconds, 2),
        "sampled_pass_ms": round(sampled_ms, 2),
        "sample_pass_ms": m.sample_pass_seconds.iter().map(|s| round(1e3 * s, 2)).collect::<Vec<_>>(),
        "ratio": round(m.ratio(), 3),
        "tokens_per_s": (m.tokens as f64 / m.mean_pass_seconds).round(),
        "n_frozen_params": m.n_frozen,
        "n_posterior": m.n_posterior,
        "peak_gib": round(m.peak_bytes as f64 / (1u64 << 30) as f64, 2),
        "peak_kind": m.peak_kind,
        "time_to_first_pass_s": round(m.time_to_first_pass, 4),
        "device": cfg.device,
        "device_name": m.device_name,
        "dtype": format!("{:?}", cfg.compute_dtype()?).to_lowercase(),
        "threads": candle_core::utils::get_num_threads(),
    });
    println!("{row}");
    run::write_json(&args.out, &[row])?;
    println!("wrote {}", args.out.display());
    Ok(ExitCode::SUCCESS)
}

/// `bayeslora bench attention`: [`bench::attention`] per `--shapes` entry, one row per path.
/// TFLOP/s counts 4·B·H·T²·D for the forward (halved when causal) and 2.5× that for the
/// backward; a path that fails (out of memory, unsupported) gets an `error` field instead of
/// times.
fn run_attention(args: &BenchArgs) -> Result<ExitCode> {
    let device = run::device(args.run.device.as_deref().unwrap_or("cuda"))?;
    let dtype = run::compute_dtype(args.run.dtype.as_deref().unwrap_or("f32"))?;
    let iters = args.run.max_steps.unwrap_or(20).max(1);
    let warmup = args.warmup;
    let mut rows = Vec::new();
    for spec in &args.shapes {
        let shape = bench::parse_attention_shape(spec)?;
        let fwd_flops = shape.forward_flops(args.causal);
        for timing in bench::attention(shape, args.causal, dtype, &device, iters, warmup)? {
            let bench::AttentionShape { b, h, hkv, t, d } = shape;
            let mut row = serde_json::json!({
                "path": timing.path, "shape": spec, "b": b, "h": h, "hkv": hkv, "t": t, "d": d,
                "causal": args.causal, "dtype": format!("{dtype:?}").to_lowercase(),
                "device": args.run.device.clone().unwrap_or_else(|| "cuda".into()),
                "iters": iters, "warmup": warmup,
            });
            match timing.outcome {
                Ok((total, fwd, mem_delta)) => {
                    row["fwd_bwd_ms"] = round(total * 1e3, 3).into();
                    row["fwd_ms"] = round(fwd * 1e3, 3).into();
                    row["fwd_bwd_tflops"] = round(3.5 * fwd_flops / total / 1e12, 2).into();
                    row["fwd_tflops"] = round(fwd_flops / fwd / 1e12, 2).into();
                    if let Some(delta) = mem_delta {
                        row["mem_delta_gib"] = round(delta / (1u64 << 30) as f64, 3).into();
                    }
                }
                Err(e) => row["error"] = e.into(),
            }
            println!("{row}");
            rows.push(row);
        }
    }
    run::write_json(&args.out, &rows)?;
    println!("wrote {}", args.out.display());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::{BenchArgs, RunArgs};
    use std::path::Path;

    /// configs/bench/tiny.json: 2 layers, hidden 64, GQA 4/2 heads, vocabulary 256.
    const TINY: &str = include_str!("../../../../configs/bench/tiny.json");

    fn bench_args(dir: &Path, objective: Option<BenchObjective>, targets: &[&str]) -> BenchArgs {
        let shape = dir.join("tiny.json");
        std::fs::write(&shape, TINY).expect("write config");
        BenchArgs {
            what: BenchWhat::Train,
            out: dir.join("bench.json"),
            shape: Some(shape),
            warmup: 1,
            objective,
            peak_tflops: 989.0,
            shapes: vec![],
            causal: false,
            run: RunArgs {
                max_steps: Some(2),
                batch_size: Some(2),
                max_len: Some(16),
                target_modules: Some(targets.iter().map(|s| s.to_string()).collect()),
                ..Default::default()
            },
        }
    }

    #[test]
    fn random_shape_bench_writes_anchor_fields() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let args = bench_args(dir.path(), None, &["q_proj", "v_proj"]);
        let out = args.out.clone();
        run(args)?;
        let rows: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
        assert_eq!(rows.len(), 2);
        let opts: Vec<&str> = rows.iter().filter_map(|r| r["opt"].as_str()).collect();
        assert_eq!(opts, ["adamw", "ivon"]);
        for r in &rows {
            for f in ["opt", "targets", "bsz", "seq", "step_ms", "tokens_per_s", "peak_gib", "mfu_vs_989"] {
                assert!(!r[f].is_null(), "missing {f} in {r}");
            }
            let tok = r["tokens_per_s"].as_f64().unwrap_or(f64::NAN);
            assert!(tok.is_finite() && tok > 0.0, "{r}");
            assert!(r["step_ms"].as_f64().is_some_and(|x| x > 0.0), "{r}");
            assert!(r["time_to_first_step_s"].as_f64().is_some_and(|x| x > 0.0), "{r}");
            assert_eq!(r["bsz"], 2);
            assert_eq!(r["seq"], 16);
            assert_eq!(r["steps"], 2);
            assert_eq!(r["objective"], "causal-lm");
            assert_eq!(r["targets"], serde_json::json!(["q_proj", "v_proj"]));
            // 256·64 (embed) + 256·64 (lm_head) + 2 · (64·64 + 2·32·64 + 64·64 + 3·64·128 + 2·64) + 64.
            let expect = 2 * 256 * 64 + 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128 + 2 * 64) + 64;
            assert_eq!(r["n_frozen_params"], expect);
            let cfg = bayeslora::models::LlamaConfig::from_json(TINY, Path::new("tiny.json"))?;
            assert_eq!(bench::frozen_param_count(&cfg), expect);
            // Next-token loss of a near-uniform random model: about ln 256 = 5.5 (not the constant ln 2).
            assert!(r["final_loss"].as_f64().is_some_and(|l| (4.5..6.5).contains(&l)), "{r}");
        }
        Ok(())
    }

    /// Checkpointed training takes the same steps: after the warm-up and the timed steps (three
    /// updates of both optimizers) the loss is the same to the bit.
    #[test]
    fn gradient_checkpointing_trains_identically() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let mut losses = vec![];
        for checkpointing in [false, true] {
            let mut args = bench_args(dir.path(), None, &["q_proj", "v_proj", "down_proj"]);
            args.run.gradient_checkpointing = checkpointing;
            let out = args.out.clone();
            run(args)?;
            let rows: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
            for r in &rows {
                assert_eq!(r["gradient_checkpointing"], checkpointing, "{r}");
            }
            losses.push(rows.iter().map(|r| r["final_loss"].as_f64()).collect::<Vec<_>>());
        }
        assert!(losses[0].iter().all(|l| l.is_some_and(f64::is_finite)), "{losses:?}");
        assert_eq!(losses[0], losses[1]);
        Ok(())
    }

    #[test]
    fn all_linear_and_label_words() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let mut args = bench_args(dir.path(), Some(BenchObjective::LabelWords), &["all-linear"]);
        args.run.optimizer = Some(crate::args::OptimizerArg::Ivon);
        let out = args.out.clone();
        run(args)?;
        let rows: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0]["opt"], "ivon");
        assert_eq!(rows[0]["targets"], "all-linear");
        assert_eq!(rows[0]["lora"]["target_modules"].as_array().map(|a| a.len()), Some(7));
        assert_eq!(rows[0]["objective"], "label-words");
        Ok(())
    }

    #[test]
    fn predict_bench_times_the_mean_and_each_sample() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let mut args = bench_args(dir.path(), None, &["q_proj", "v_proj"]);
        args.what = BenchWhat::Predict;
        args.run.samples = Some(3);
        let out = args.out.clone();
        run(args)?;
        let rows: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(
            (r["what"].as_str(), r["samples"].as_u64(), r["batches"].as_u64()),
            (Some("predict"), Some(3), Some(2))
        );
        assert_eq!(r["sample_pass_ms"].as_array().map(|a| a.len()), Some(3));
        assert!(r["ratio"].as_f64().is_some_and(|x| x.is_finite() && x > 0.0), "{r}");
        assert!(r["mean_pass_ms"].as_f64().is_some_and(|x| x > 0.0), "{r}");
        Ok(())
    }

    #[test]
    fn attention_bench_runs_on_the_cpu() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let mut args = bench_args(dir.path(), None, &["q_proj"]);
        args.what = BenchWhat::Attention;
        args.shapes = vec!["1x4x24x32x2".into()];
        args.causal = true;
        args.warmup = 0;
        args.run.device = Some("cpu".into());
        args.run.max_steps = Some(1);
        let out = args.out.clone();
        run(args)?;
        let rows: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["path"], "flash");
        assert!(rows[0]["error"].is_string(), "flash is CUDA-only: {}", rows[0]);
        assert_eq!(rows[1]["path"], "plain");
        assert!(rows[1]["fwd_bwd_ms"].as_f64().is_some_and(|x| x > 0.0), "{}", rows[1]);
        assert_eq!(rows[1]["hkv"], 2);
        Ok(())
    }
}
