//! `bayeslora bench attention`: fused vs plain attention forward+backward per shape (see
//! [`run_attention`]).
//!
//! `bayeslora bench train`: LoRA (or, with `--method blora`, B-LoRA) training throughput (tokens/s, step time), peak memory and MFU
//! on fixed-shape synthetic batches (`--batch-size` × `--max-len` tokens, no padding).
//!
//! Two sources of a model:
//! - `--model DIR|FILE|minilm|smollm2`: a real checkpoint, compared one to one with
//!   `scripts/bench/torch_train.py` (same step in PyTorch + peft + ivon-opt);
//! - `--shape config.json`: a Llama-family model built from its config with random weights (std
//!   0.02, norms 1, biases 0; generated on the target device in the target dtype, seeded), no
//!   checkpoint and no tokenizer. Compared with `scripts/bench/torch_anchor.py`, whose JSON fields
//!   every row repeats: opt, targets, bsz, seq, step_ms, tokens_per_s, peak_gib, mfu_vs_989.
//!
//! The loss (`--objective`): `causal-lm` is the anchor's — next-token cross-entropy over every
//! position, so the lm_head runs on all B·T positions (2·V·C FLOPs per token forward, 4·V·C with the
//! input-gradient backward) and the logits `[B, T, V]` are materialized; `label-words` is what
//! `bayeslora train` does on decoders — two label words scored at the last position only.
//!
//! Memory: on CUDA `peak_gib` is device-level used memory (total − free from `cuMemGetInfo`),
//! the maximum over samples taken after model build and after every step; it includes the CUDA
//! context and anything a memory pool holds, unlike PyTorch's `max_memory_allocated` (the
//! allocator's peak of live tensors). On the CPU it is the process's peak RSS (`VmHWM`), which
//! never resets within a process. Optimizer step times alone: `cargo bench -p ivon`.
use crate::args::{BenchArgs, BenchObjective, BenchWhat};
use crate::{config, steps};
use anyhow::{bail, Context, Result};
use bayeslora::adapters::lora::{LoraConfig, TargetModules};
use bayeslora::adapters::Ctx;
use bayeslora::data::{BatchConfig, BatchTensors, Encoded, EncodedDataset, Format, Label, Task};
use bayeslora::models::{Architecture, Backbone, Llama, LlamaConfig, LoadOptions, LoadedModel, Weights};
use bayeslora::run::{self, AdapterKind, RunConfig};
use bayeslora::train::{self, Classifier, Observer, OptimizerKind, StepInfo, TaskModel};
use candle_core::{DType, Device, Tensor, Var};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

/// The dense bf16 peak of an H100/H200 SXM in FLOP/s, the anchor's MFU denominator.
pub const ANCHOR_PEAK_FLOPS: f64 = 989e12;

/// What peft's `target_modules="all-linear"` selects in a Llama-family decoder (lm_head excluded).
const ALL_LINEAR: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// Peak resident set size of this process in bytes (Linux `VmHWM`).
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Device-level used memory (total − free) in bytes and the device's name (CUDA only).
#[cfg(feature = "cuda")]
fn cuda_used_bytes(device: &Device) -> Option<(u64, String)> {
    use candle_core::cuda_backend::cudarc;
    let Device::Cuda(dev) = device else { return None };
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    ctx.bind_to_thread().ok()?;
    let (free, total) = cudarc::driver::result::mem_get_info().ok()?;
    let name = ctx.name().unwrap_or_else(|_| "cuda".into());
    Some(((total - free) as u64, name))
}

#[cfg(not(feature = "cuda"))]
fn cuda_used_bytes(_device: &Device) -> Option<(u64, String)> {
    None
}

/// The CPU's model name from /proc/cpuinfo.
fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).map(|l| l.to_string()))
        .and_then(|l| l.split(':').nth(1).map(|n| n.trim().to_string()))
        .unwrap_or_else(|| "cpu".into())
}

/// Peak memory over the run: device-level used memory on CUDA, sampled after every step; VmHWM
/// on the CPU.
struct MemoryProbe {
    device: Device,
    peak: u64,
    name: String,
    /// When the first optimizer step ended (the time to first step: model build + first step;
    /// we compile nothing before it).
    first_step: Option<Instant>,
}

impl MemoryProbe {
    fn new(device: &Device) -> Self {
        let mut p = MemoryProbe { device: device.clone(), peak: 0, name: String::new(), first_step: None };
        p.sample();
        p
    }

    fn sample(&mut self) {
        match cuda_used_bytes(&self.device) {
            Some((used, name)) => {
                self.peak = self.peak.max(used);
                self.name = name;
            }
            None => self.peak = self.peak.max(peak_rss_bytes().unwrap_or(0)),
        }
    }

    fn kind(&self) -> &'static str {
        if self.device.is_cuda() {
            "cuda_device_used"
        } else {
            "process_vm_hwm"
        }
    }
}

impl Observer for MemoryProbe {
    fn step(&mut self, _info: &StepInfo) -> ControlFlow<()> {
        if self.first_step.is_none() {
            let _ = self.device.synchronize();
            self.first_step = Some(Instant::now());
        }
        self.sample();
        ControlFlow::Continue(())
    }
}

/// `rows` sequences of exactly `len` tokens drawn from a fixed LCG, two classes. Token ids avoid
/// the first 1000 (special tokens) when the vocabulary is large enough.
fn synthetic(rows: usize, len: usize, vocab: u32, decoder: bool) -> Arc<EncodedDataset> {
    let mut state = 0x5EEDu64;
    let mut next = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) as u32
    };
    let lo = if vocab > 2000 { 1000 } else { 0 };
    let rows = (0..rows)
        .map(|i| {
            let ids: Vec<u32> = (0..len).map(|_| lo + next() % (vocab - lo).max(1)).collect();
            Encoded { type_ids: vec![0; len], ids, label: Label::Class(i % 2), num_choices: 2 }
        })
        .collect();
    let label_words = if vocab > 332 { vec![330, 331] } else { vec![vocab.saturating_sub(2), vocab.saturating_sub(1)] };
    Arc::new(EncodedDataset {
        task: Task::Sst2,
        format: if decoder { Format::Prompt } else { Format::Encoder },
        rows,
        num_classes: 2,
        label_token_ids: if decoder { label_words } else { vec![] },
        pad_id: 0,
        truncated: 0,
    })
}

/// `n` values of N(0, std²) from a seeded splitmix64 + Box–Muller (CPU weights).
fn normal_cpu(n: usize, std: f32, seed: u64) -> Vec<f32> {
    let mut s = seed;
    let mut uniform = move || {
        s = s.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^= z >> 31;
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64 // (0, 1)
    };
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let (u1, u2) = (uniform(), uniform());
        let r = (-2.0 * u1.ln()).sqrt() * std as f64;
        let t = 2.0 * std::f64::consts::PI * u2;
        out.push((r * t.cos()) as f32);
        out.push((r * t.sin()) as f32);
    }
    out.truncate(n);
    out
}

/// A `[shape]` tensor of N(0, 0.02²) in `dtype` on `device`: curand (seeded once per model) on
/// CUDA, generated in f32 and cast; a splitmix64 stream on the CPU.
fn randn(shape: &[usize], dtype: DType, device: &Device, seed: u64) -> Result<Tensor> {
    let t = match device {
        Device::Cpu => Tensor::from_vec(normal_cpu(shape.iter().product(), 0.02, seed), shape, device)?,
        _ => Tensor::randn(0f32, 0.02f32, shape, device)?,
    };
    Ok(t.to_dtype(dtype)?)
}

/// A Llama-family model with random frozen weights, as transformers' `_init_weights` (linears and
/// embeddings N(0, 0.02²), biases 0, RMSNorm weights 1), built in `dtype` on `device`, plus the
/// number of frozen parameters. The tensors are handed to [`Llama::load`] as in-memory weights,
/// which keeps them where they are (no copy, no cast).
pub fn random_llama(cfg: &LlamaConfig, dtype: DType, device: &Device, seed: u64) -> Result<(Llama, usize)> {
    if !matches!(device, Device::Cpu) {
        device.set_seed(seed)?;
    }
    let (v, c, i) = (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim);
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut count = 0usize;
    let mut k = 0u64;
    let mut put = |name: String, shape: &[usize], fill: Option<f64>| -> Result<()> {
        k += 1;
        let t = match fill {
            None => randn(shape, dtype, device, seed.wrapping_mul(0x100000001B3).wrapping_add(k))?,
            Some(x) => (Tensor::ones(shape, dtype, device)? * x)?,
        };
        count += t.elem_count();
        tensors.insert(name, t);
        Ok(())
    };
    put("model.embed_tokens.weight".into(), &[v, c], None)?;
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (m, out, inp, bias) in [
            ("self_attn.q_proj", q, c, cfg.qkv_bias),
            ("self_attn.k_proj", kv, c, cfg.qkv_bias),
            ("self_attn.v_proj", kv, c, cfg.qkv_bias),
            ("self_attn.o_proj", c, q, cfg.o_bias),
            ("mlp.gate_proj", i, c, cfg.mlp_bias),
            ("mlp.up_proj", i, c, cfg.mlp_bias),
            ("mlp.down_proj", c, i, cfg.mlp_bias),
        ] {
            put(format!("{p}.{m}.weight"), &[out, inp], None)?;
            if bias {
                put(format!("{p}.{m}.bias"), &[out], Some(0.0))?;
            }
        }
        put(format!("{p}.input_layernorm.weight"), &[c], Some(1.0))?;
        put(format!("{p}.post_attention_layernorm.weight"), &[c], Some(1.0))?;
    }
    put("model.norm.weight".into(), &[c], Some(1.0))?;
    if !cfg.tie_word_embeddings {
        put("lm_head.weight".into(), &[v, c], None)?;
    }
    let weights = Weights::from_tensors("<random weights>", tensors);
    let model = Llama::load(&weights, cfg, dtype, device)?;
    Ok((model, count))
}

/// The number of frozen parameters of a Llama-family model (embeddings, every projection with its
/// biases, norms, and the lm_head unless tied), as `sum(p.numel())` over a transformers model.
pub fn frozen_param_count(cfg: &LlamaConfig) -> usize {
    let (v, c, i) = (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim);
    let bias = |on: bool, n: usize| if on { n } else { 0 };
    let attn = 2 * c * q + 2 * c * kv + bias(cfg.qkv_bias, q + 2 * kv) + bias(cfg.o_bias, c);
    let mlp = 3 * c * i + bias(cfg.mlp_bias, 2 * i + c);
    let heads = if cfg.tie_word_embeddings { 1 } else { 2 };
    heads * v * c + cfg.num_hidden_layers * (attn + mlp + 2 * c) + c
}

/// Loads `--shape` as a random-weight model (see [`random_llama`]).
fn random_model(path: &Path, dtype: DType, device: &Device, seed: u64) -> Result<(LoadedModel, usize)> {
    let cfg = LlamaConfig::from_file(path).with_context(|| format!("reading {}", path.display()))?;
    let (llama, n) = random_llama(&cfg, dtype, device, seed)?;
    if n != frozen_param_count(&cfg) {
        bail!("built {n} frozen parameters, the config says {}", frozen_param_count(&cfg));
    }
    let config_json = serde_json::to_value(&cfg)?;
    let loaded = LoadedModel {
        arch: Architecture::Llama,
        backbone: Backbone::Llama(llama),
        tokenizer: None,
        config_json,
        dir: path.to_path_buf(),
        weights: Weights::from_tensors(path, HashMap::new()),
    };
    Ok((loaded, n))
}

/// Every tensor of a checkpoint, counted (the frozen parameters of a `--model` run).
fn count_params(w: &Weights) -> usize {
    w.names().iter().filter_map(|n| w.shape_of(n).ok()).map(|s| s.iter().product::<usize>()).sum()
}

/// The task model trained on the anchor's objective: next-token cross-entropy over all positions.
/// [`train::run`] adds [`Classifier::regularizer`] to the task loss of every micro-batch, so the
/// LM loss goes there and the class logits are a constant (task loss ln 2, no gradient).
struct CausalLm<'a> {
    inner: &'a TaskModel,
    pending: RefCell<Option<Tensor>>,
    /// The last micro-batch's LM loss, detached (read once, after the run: no extra sync).
    last: RefCell<Option<Tensor>>,
}

impl Classifier for CausalLm<'_> {
    fn logits(&self, batch: &BatchTensors, ctx: &Ctx) -> bayeslora::Result<Tensor> {
        let Backbone::Llama(llama) = &self.inner.backbone else {
            return Err(bayeslora::Error::config("objective", "causal-lm", "needs a decoder (Llama family)"));
        };
        let hidden = llama.forward(&batch.input_ids, &batch.attention_mask, ctx)?;
        let logits = llama.lm_logits(&hidden)?; // [B, T, V]
        let (b, t, v) = logits.dims3()?;
        let pred = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
        let target = batch.input_ids.narrow(1, 1, t - 1)?.contiguous()?.reshape(b * (t - 1))?;
        let loss = bayeslora::ops::cross_entropy(&pred, &target)?;
        *self.last.borrow_mut() = Some(loss.detach());
        *self.pending.borrow_mut() = Some(loss);
        Ok(Tensor::zeros((b, 2), DType::F32, hidden.device())?)
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        self.inner.trainable()
    }

    fn is_gate(&self, name: &str) -> bool {
        self.inner.is_gate(name)
    }

    /// The LM loss, plus B-LoRA's μ-weighted gate prior (without its warm-up ramp, which would
    /// scale the LM loss too: a timing run needs the prior's cost, not its schedule).
    fn regularizer(&self) -> bayeslora::Result<Option<Tensor>> {
        let lm = self.pending.borrow_mut().take();
        Ok(match (lm, self.inner.regularizer()?) {
            (Some(lm), Some(prior)) => Some(lm.add(&prior)?),
            (lm, prior) => lm.or(prior),
        })
    }
}

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
        // IVON lr 0.03, ess 1e4, hess_init 3e-4, beta2 0.99999, decay 1e-6, ivon-opt's other defaults.
        base.model = None;
        base.max_len = 512;
        base.train.max_steps = Some(8);
        base.train.batch.batch_size = 4;
        base.lora.target_modules = Some(TargetModules::List(vec!["q_proj".into(), "v_proj".into()]));
        base.train.adamw = ivon::AdamWConfig { lr: 1e-4, weight_decay: 1e-2, ..Default::default() };
        base.train.ivon = ivon::IvonConfig {
            lr: 0.03,
            ess: 1e4,
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
    let device = run::device(&cfg.device)?;
    let dtype = cfg.compute_dtype()?;
    let steps = cfg.train.max_steps.unwrap_or(20);
    let warmup = args.warmup;
    let kinds = match args.run.optimizer {
        Some(_) => vec![cfg.train.optimizer],
        None => vec![OptimizerKind::Adamw, OptimizerKind::Ivon],
    };
    let objective =
        args.objective.unwrap_or(if random { BenchObjective::CausalLm } else { BenchObjective::LabelWords });
    let mut rows = Vec::new();
    for kind in kinds {
        let built = Instant::now();
        let mut memory = MemoryProbe::new(&device);
        let (loaded, n_frozen) = match &args.shape {
            Some(path) => random_model(path, dtype, &device, cfg.train.seed)?,
            None => {
                let loaded = load_model(&cfg, dtype, &device)?;
                let n = count_params(&loaded.weights);
                (loaded, n)
            }
        };
        let (decoder, vocab) = match &loaded.backbone {
            Backbone::Llama(m) => (true, m.config().vocab_size as u32),
            Backbone::Bert(m) => (false, m.config().vocab_size as u32),
            Backbone::DebertaV2(m) => (false, m.config().vocab_size as u32),
            _ => (false, 30000),
        };
        if objective == BenchObjective::CausalLm && !decoder {
            bail!("--objective causal-lm needs a decoder (Llama family); use label-words for encoders");
        }
        let data = synthetic(cfg.train.batch.batch_size * (steps + warmup), cfg.max_len, vocab, decoder);
        let targets_json = match (&targets_json, cfg.lora.clone().with_default_targets(loaded.arch).target_modules) {
            (serde_json::Value::Null, Some(TargetModules::List(names))) => serde_json::json!(names),
            _ => targets_json.clone(),
        };
        let model = run::build_model(&cfg, loaded, 2, &device)?;
        let lm = CausalLm { inner: &model, pending: RefCell::new(None), last: RefCell::new(None) };
        let trained: &dyn Classifier = match objective {
            BenchObjective::CausalLm => &lm,
            BenchObjective::LabelWords => &model,
        };
        memory.sample();
        let mut t = cfg.train.clone();
        t.optimizer = kind;
        t.checkpoint_dir = None;
        t.eval_every = 0;
        t.schedule = train::Schedule::Constant;
        // Random weights and tokens at the anchor's IVON settings can reach a NaN loss in both
        // stacks (the anchor's 7B IVON row ends at NaN): time the steps anyway, report the loss.
        t.allow_nonfinite_loss = true;
        if warmup > 0 {
            t.max_steps = Some(warmup);
            train::run(trained, data.clone(), &t, &device, &mut memory, None, None)?;
        }
        t.max_steps = Some(steps);
        device.synchronize()?;
        let start = Instant::now();
        let (summary, _) = train::run(trained, data, &t, &device, &mut memory, None, None)?;
        device.synchronize()?;
        let seconds = start.elapsed().as_secs_f64();
        let final_loss = match (objective, lm.last.borrow().as_ref()) {
            (BenchObjective::CausalLm, Some(l)) => l.to_dtype(DType::F32)?.to_scalar::<f32>()?,
            _ => summary.final_loss,
        };
        memory.sample();
        let tok_s = summary.tokens as f64 / seconds;
        let step_ms = 1e3 * seconds / summary.steps.max(1) as f64;
        let flops = 4.0 * n_frozen as f64 * tok_s;
        let opt = format!("{kind:?}").to_lowercase();
        let device_name = if device.is_cuda() { memory.name.clone() } else { cpu_name() };
        let row = serde_json::json!({
            // The anchor's fields.
            "opt": opt,
            "targets": targets_json,
            "bsz": t.batch.batch_size,
            "seq": cfg.max_len,
            "step_ms": round(step_ms, 1),
            "tokens_per_s": tok_s.round(),
            "peak_gib": round(memory.peak as f64 / (1u64 << 30) as f64, 2),
            "mfu_vs_989": round(flops / ANCHOR_PEAK_FLOPS, 3),
            "time_to_first_step_s": memory.first_step.map(|t| round((t - built).as_secs_f64(), 4)),
            // Ours.
            "stack": "bayeslora",
            "version": env!("CARGO_PKG_VERSION"),
            "model": cfg.model.as_ref().map(|p| p.display().to_string()),
            "shape": args.shape.as_ref().map(|p| p.display().to_string()),
            "objective": match objective { BenchObjective::CausalLm => "causal-lm", BenchObjective::LabelWords => "label-words" },
            "device": cfg.device,
            "device_name": device_name,
            "dtype": format!("{dtype:?}").to_lowercase(),
            "steps": summary.steps,
            "warmup": warmup,
            "n_frozen_params": n_frozen,
            "peak_kind": memory.kind(),
            "peak_bytes": memory.peak,
            "mfu": round(flops / (args.peak_tflops * 1e12), 4),
            "peak_tflops": args.peak_tflops,
            "final_loss": final_loss,
            "loss_finite": final_loss.is_finite(),
            "gradient_checkpointing": t.gradient_checkpointing,
            "threads": candle_core::utils::get_num_threads(),
            "lora": {"r": cfg.lora.r, "lora_alpha": cfg.lora.lora_alpha, "target_modules": cfg.lora.target_modules},
            "method": cfg.method,
            "blora": (cfg.method == AdapterKind::Blora).then(|| serde_json::to_value(&cfg.blora)).transpose()?,
            // The fields of earlier bench JSON (bench/results/2026-11-24_*).
            "optimizer": opt,
            "batch_size": t.batch.batch_size,
            "seq_len": cfg.max_len,
            "tokens_per_second": tok_s,
            "peak_rss_bytes": peak_rss_bytes(),
        });
        println!("{row}");
        rows.push(row);
    }
    run::write_json(&args.out, &rows)?;
    println!("wrote {}", args.out.display());
    Ok(ExitCode::SUCCESS)
}

/// `BxHxTxD` or `BxHxTxDxHkv` → (B, H, Hkv, T, D).
fn parse_attention_shape(s: &str) -> Result<(usize, usize, usize, usize, usize)> {
    let n: Vec<usize> = s
        .split('x')
        .map(|p| p.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("--shapes {s}: expected BxHxTxD or BxHxTxDxHkv"))?;
    match n[..] {
        [b, h, t, d] => Ok((b, h, h, t, d)),
        [b, h, t, d, hkv] if hkv > 0 && h % hkv == 0 => Ok((b, h, hkv, t, d)),
        _ => bail!("--shapes {s}: expected BxHxTxD or BxHxTxDxHkv with H divisible by Hkv"),
    }
}

/// `bayeslora bench attention`: forward+backward of `ops::flash_attention` (fused kernels) and
/// `ops::plain_attention` (materialised scores) on random q, k, v (N(0, 1)), no padding, per
/// shape. One iteration = forward, `sum(O ∘ W)` for a fixed random W, backward to q, k, v
/// (the mul/sum add one elementwise pass over O to both paths). The device is synchronised
/// before and after the timed loop; `fwd_ms` is a separate forward-only loop. TFLOP/s counts
/// 4·B·H·T²·D for the forward (halved when causal, as FlashAttention's benchmarks) and 2.5× that
/// for the backward. `mem_delta_gib`: device-level used memory after the timed loop minus before
/// the path's first call (includes whatever candle's allocator keeps cached). A path that fails
/// (out of memory) gets an `error` field instead of times.
fn run_attention(args: &BenchArgs) -> Result<ExitCode> {
    let device = run::device(args.run.device.as_deref().unwrap_or("cuda"))?;
    let dtype = run::compute_dtype(args.run.dtype.as_deref().unwrap_or("f32"))?;
    let iters = args.run.max_steps.unwrap_or(20).max(1);
    let warmup = args.warmup;
    let mut rows = Vec::new();
    for spec in &args.shapes {
        let (b, h, hkv, t, d) = parse_attention_shape(spec)?;
        let make = |shape: (usize, usize, usize, usize)| -> Result<Tensor> {
            Ok(Tensor::randn(0f32, 1.0, shape, &device)?.to_dtype(dtype)?)
        };
        let q = Var::from_tensor(&make((b, h, t, d))?)?;
        let k = Var::from_tensor(&make((b, hkv, t, d))?)?;
        let v = Var::from_tensor(&make((b, hkv, t, d))?)?;
        let w = make((b, h, t, d))?;
        let mask = bayeslora::ops::AttentionMask::new(None, args.causal, b, t, &device)?;
        let fwd_flops = 4.0 * (b * h * t * t * d) as f64 * if args.causal { 0.5 } else { 1.0 };
        for path in ["flash", "plain"] {
            let attn = |q: &Tensor, k: &Tensor, v: &Tensor| -> candle_core::Result<Tensor> {
                match path {
                    "flash" => bayeslora::ops::flash_attention(q, k, v, &mask),
                    _ => bayeslora::ops::plain_attention(q, k, v, &mask),
                }
            };
            let step = || -> candle_core::Result<()> {
                let o = attn(q.as_tensor(), k.as_tensor(), v.as_tensor())?;
                let grads = o.mul(&w)?.sum_all()?.backward()?;
                drop(grads);
                Ok(())
            };
            let forward = || -> candle_core::Result<()> {
                attn(&q.as_tensor().detach(), &k.as_tensor().detach(), &v.as_tensor().detach()).map(drop)
            };
            let mut row = serde_json::json!({
                "path": path, "shape": spec, "b": b, "h": h, "hkv": hkv, "t": t, "d": d,
                "causal": args.causal, "dtype": format!("{dtype:?}").to_lowercase(),
                "device": args.run.device.clone().unwrap_or_else(|| "cuda".into()),
                "iters": iters, "warmup": warmup,
            });
            if path == "flash" && !bayeslora::ops::flash_supported(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask) {
                row["error"] = "unsupported here (needs CUDA, f32/bf16/f16, head dim 32/64/128)".into();
                println!("{row}");
                rows.push(row);
                continue;
            }
            device.synchronize()?;
            let before = cuda_used_bytes(&device).map(|(u, _)| u);
            let timed = (|| -> candle_core::Result<(f64, f64)> {
                for _ in 0..warmup {
                    step()?;
                }
                device.synchronize()?;
                let start = Instant::now();
                for _ in 0..iters {
                    step()?;
                }
                device.synchronize()?;
                let total = start.elapsed().as_secs_f64() / iters as f64;
                forward()?;
                device.synchronize()?;
                let start = Instant::now();
                for _ in 0..iters {
                    forward()?;
                }
                device.synchronize()?;
                Ok((total, start.elapsed().as_secs_f64() / iters as f64))
            })();
            match timed {
                Ok((total, fwd)) => {
                    let after = cuda_used_bytes(&device).map(|(u, _)| u);
                    row["fwd_bwd_ms"] = round(total * 1e3, 3).into();
                    row["fwd_ms"] = round(fwd * 1e3, 3).into();
                    row["fwd_bwd_tflops"] = round(3.5 * fwd_flops / total / 1e12, 2).into();
                    row["fwd_tflops"] = round(fwd_flops / fwd / 1e12, 2).into();
                    if let (Some(a), Some(b0)) = (after, before) {
                        row["mem_delta_gib"] = round((a as f64 - b0 as f64) / (1u64 << 30) as f64, 3).into();
                    }
                }
                Err(e) => row["error"] = e.to_string().into(),
            }
            println!("{row}");
            rows.push(row);
        }
    }
    run::write_json(&args.out, &rows)?;
    println!("wrote {}", args.out.display());
    Ok(ExitCode::SUCCESS)
}

/// [`steps::load_model`] in `dtype`.
fn load_model(cfg: &RunConfig, dtype: DType, device: &Device) -> Result<LoadedModel> {
    if dtype == DType::F32 {
        return steps::load_model(cfg);
    }
    let given = cfg.model.as_ref().context("no model given: pass --model or --shape")?;
    let path = &crate::assets::resolve(given)?;
    let options = LoadOptions { device: device.clone(), dtype };
    bayeslora::models::load(path, &options).with_context(|| format!("loading {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::{BenchArgs, RunArgs};

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
            let cfg = LlamaConfig::from_json(TINY, Path::new("tiny.json"))?;
            assert_eq!(frozen_param_count(&cfg), expect);
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
    fn shipped_shapes_have_the_published_sizes() -> Result<()> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/bench");
        // transformers' `sum(p.numel() for p in model.parameters())` of each architecture.
        for (file, params) in [
            ("llama2_7b.json", 6_738_415_616usize),
            ("llama3_8b.json", 8_030_261_248),
            ("qwen2_7b.json", 7_615_616_512),
            ("smollm2_135m.json", 134_515_008),
        ] {
            let cfg = LlamaConfig::from_file(&dir.join(file))?;
            assert_eq!(frozen_param_count(&cfg), params, "{file}");
        }
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
        assert!(parse_attention_shape("2x6x8x64x4").is_err());
        Ok(())
    }

    #[test]
    fn random_weights_are_seeded_and_scaled() -> Result<()> {
        let a = normal_cpu(10_000, 0.02, 7);
        assert_eq!(a, normal_cpu(10_000, 0.02, 7));
        assert_ne!(a, normal_cpu(10_000, 0.02, 8));
        let var = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / a.len() as f64;
        assert!((var.sqrt() - 0.02).abs() < 0.001, "std {}", var.sqrt());
        Ok(())
    }
}
