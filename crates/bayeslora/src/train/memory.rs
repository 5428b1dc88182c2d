//! The peak memory of a training run, estimated from the model's shapes before anything is
//! loaded, and the memory the device has: a run that cannot fit is refused with the numbers
//! ([`check`]) instead of running out of memory minutes into loading or at the first step.
//!
//! [`ModelShape::read`] takes the sizes from config.json and the safetensors headers (or a GGUF
//! file's metadata and tensor table) without reading a weight. [`estimate`] adds up, in bytes:
//! - **weights**: every tensor of the checkpoint in the compute dtype; a GGUF checkpoint on the
//!   CPU also keeps the f32 copy it was dequantized into;
//! - **trainable**: each adapted linear's `r·(in + out)` LoRA factors in f32, times one for the
//!   variables, one for the gradient and the optimizer's state (IVON: m, h, the mean kept while
//!   a sample is drawn and the noise, 4; AdamW: m and v, 2; SGD: momentum, 1);
//! - **activations** kept for the backward, per layer and token: for a decoder `10·C + 2·F`
//!   values in the compute dtype (C hidden, F intermediate size: the layer input, both normed
//!   inputs, q, k, v, the attention output, the mid-block residual, gate and up, and room for
//!   the backward's transients) plus `r` f32 values per adapted linear; for an encoder
//!   `18·C + 6·F` plus `(in + r)` f32 values per adapted linear, plus the attention scores where they are
//!   materialised (`H·T` per token: 1 byte for the CPU kernel's dropout mask; on CUDA about 12
//!   bytes without a fused kernel, 20 with BERT's probability dropout, 24 for DeBERTa's
//!   disentangled scores; none with FlashAttention). With gradient checkpointing (decoders) only
//!   each layer's input (C values per token) stays, plus one layer recomputed in the backward.
//!   One more layer for the backward's transient gradients either way;
//! - **overhead**: the CUDA context (512 MiB) or the process itself on the CPU (256 MiB).
//!
//! The per-token coefficients are fitted to measured peaks (README's bench tables): Llama-2-7B
//! in bf16 with LoRA r 8 on q and v, 4 × 512 tokens 21.6 GiB on an H100 (2026-12-06, after the
//! memory ops; estimated 21.0, the logits not counted; before them 34.1 GiB on an H200), 8 × 1024
//! 44.05 GiB (H100, the same day; 95.8 before the memory ops), 4 × 512 with gradient
//! checkpointing 15.3 GiB (before the memory ops, estimated 14.0); all-MiniLM-L6-v2 in f32 on the CPU, 32 × 64, 1.04 GiB peak RSS (estimated 1.2: the
//! CPU's fused kernels keep less) and SmolLM2-135M, 8 × 64, 2.03 GiB (estimated 2.0). The
//! decoder runs had a causal-LM loss over the whole vocabulary; `train`'s classification loss
//! scores the last position only, so the estimate leaves the vocabulary out. It is an estimate: a run
//! refused wrongly can start anyway (`--skip-memory-check`, TOML `skip_memory_check = true`).
//! B-LoRA is sized as LoRA of its initial rank (its gates and quantizer state are not counted).
//!
//! The device's memory ([`device_memory`]): on CUDA the card's total memory as the driver
//! reports it; on the CPU `MemAvailable` of `/proc/meminfo`, or what is left under the cgroup's
//! memory limit when that is less.
use super::OptimizerKind;
use crate::adapters::lora::TargetModules;
use crate::models::config::{read_config_json, Architecture};
use crate::models::{gguf, BertConfig, DebertaV2Config, LlamaConfig, Weights};
use crate::{Error, Result};
use candle_core::{DType, Device};
use std::path::Path;

/// The sizes of a model that decide a run's memory, read without loading a weight.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    pub arch: Architecture,
    /// Parameters of the checkpoint (every tensor in it).
    pub params: u64,
    pub layers: usize,
    /// Hidden size C.
    pub hidden: usize,
    /// MLP intermediate size F.
    pub intermediate: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Dropout on the attention probabilities while training (encoders).
    pub attention_dropout: bool,
    /// The weights come from a GGUF file: dequantized to f32 on the host, which keeps that copy.
    pub gguf: bool,
    /// Every 2-D `*.weight` tensor as (module name, in features, out features): what LoRA can
    /// target.
    pub linears: Vec<(String, usize, usize)>,
}

impl ModelShape {
    /// The shape of a HF model folder (config.json and the safetensors headers) or a `.gguf`
    /// file (metadata and tensor table). Fails where [`crate::models::load`] would fail on the
    /// same files, though maybe with another message: callers skip the estimate then and let
    /// the loader report the problem.
    pub fn read(path: &Path) -> Result<Self> {
        if path.is_file() && gguf::is_gguf(path) {
            let (cfg, shapes) = gguf::read_shapes(path)?;
            return Ok(Self::from_tensors(Architecture::Llama, &cfg.into(), false, true, shapes));
        }
        let (config_path, json) = read_config_json(path)?;
        let arch = Architecture::detect(&json, &config_path)?;
        let (sizes, dropout) = match arch {
            Architecture::Bert => {
                let c = BertConfig::from_json(&json, &config_path)?;
                let sizes = Sizes::new(c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads);
                (sizes, c.attention_probs_dropout_prob > 0.0)
            }
            Architecture::DebertaV2 => {
                let c = DebertaV2Config::from_json(&json, &config_path)?;
                let sizes = Sizes::new(c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads);
                (sizes, c.attention_probs_dropout_prob > 0.0)
            }
            Architecture::Llama => (LlamaConfig::from_json(&json.to_string(), &config_path)?.into(), false),
        };
        let weights = Weights::from_dir(path)?;
        let shapes =
            weights.names().into_iter().map(|n| weights.shape_of(&n).map(|s| (n, s))).collect::<Result<_>>()?;
        Ok(Self::from_tensors(arch, &sizes, dropout, false, shapes))
    }

    fn from_tensors(
        arch: Architecture,
        sizes: &Sizes,
        attention_dropout: bool,
        gguf: bool,
        shapes: Vec<(String, Vec<usize>)>,
    ) -> Self {
        let params = shapes.iter().map(|(_, s)| s.iter().fold(1u64, |n, &d| n.saturating_mul(d as u64))).sum();
        let linears = shapes
            .into_iter()
            .filter_map(|(name, s)| match (name.strip_suffix(".weight"), s.as_slice()) {
                (Some(module), &[out, inp]) => Some((module.to_string(), inp, out)),
                _ => None,
            })
            .collect();
        ModelShape {
            arch,
            params,
            layers: sizes.layers,
            hidden: sizes.hidden,
            intermediate: sizes.intermediate,
            heads: sizes.heads,
            head_dim: sizes.head_dim,
            attention_dropout,
            gguf,
            linears,
        }
    }
}

/// The layer sizes every architecture has.
struct Sizes {
    layers: usize,
    hidden: usize,
    intermediate: usize,
    heads: usize,
    head_dim: usize,
}

impl Sizes {
    fn new(layers: usize, hidden: usize, intermediate: usize, heads: usize) -> Self {
        Sizes { layers, hidden, intermediate, heads, head_dim: hidden / heads.max(1) }
    }
}

impl From<LlamaConfig> for Sizes {
    fn from(c: LlamaConfig) -> Self {
        Sizes {
            layers: c.num_hidden_layers,
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            head_dim: c.head_dim,
        }
    }
}

/// What a run asks of the model: the settings that decide its memory.
#[derive(Debug, Clone, PartialEq)]
pub struct RunShape {
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Tokens per example (the most a batch is padded to).
    pub max_len: usize,
    /// Compute dtype of the frozen weights and activations.
    pub dtype: DType,
    pub gradient_checkpointing: bool,
    pub optimizer: OptimizerKind,
    /// LoRA rank.
    pub rank: usize,
    /// LoRA targets (`None`: the architecture's default).
    pub targets: Option<TargetModules>,
}

/// An estimate in bytes, by part (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    pub weights: u64,
    pub trainable: u64,
    pub activations: u64,
    pub overhead: u64,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.weights.saturating_add(self.trainable).saturating_add(self.activations).saturating_add(self.overhead)
    }
}

/// The module doc's sum for `model` trained as `run` on `device`.
pub fn estimate(model: &ModelShape, run: &RunShape, device: &Device) -> MemoryEstimate {
    let mul = |a: u64, b: u64| a.saturating_mul(b);
    let d = run.dtype.size_in_bytes() as u64;
    let (c, f, r) = (model.hidden as u64, model.intermediate as u64, run.rank as u64);
    let tokens = mul(run.batch_size as u64, run.max_len as u64);
    let decoder = model.arch == Architecture::Llama;

    let mut weights = mul(model.params, d);
    if model.gguf && !device.is_cuda() && run.dtype != DType::F32 {
        weights = weights.saturating_add(mul(model.params, 4));
    }

    let default_targets;
    let targets = match &run.targets {
        Some(t) => t,
        None => {
            let names = model.arch.query_value().iter().map(|s| s.to_string()).collect();
            default_targets = TargetModules::List(names);
            &default_targets
        }
    };
    let adapted: Vec<(u64, u64)> = model
        .linears
        .iter()
        .filter(|(name, _, _)| targets.matches(name).unwrap_or(false))
        .map(|&(_, i, o)| (i as u64, o as u64))
        .collect();
    let lora_params: u64 = adapted.iter().map(|&(i, o)| mul(r, i + o)).sum();
    let state = match run.optimizer {
        OptimizerKind::Ivon => 4,
        OptimizerKind::Adamw => 2,
        OptimizerKind::Sgd => 1,
    };
    let trainable = mul(mul(lora_params, 4), 2 + state);

    // Bytes per token of one layer's saved activations. A decoder layer's projections keep only
    // their inputs (`ops::lora_linear`, `residual_projection`, `projection_heads`): the LoRA
    // path adds its `[N, r]` product; the encoders' figures predate those ops.
    let adapter_bytes = |i: u64| if decoder { mul(r, 4) } else { mul(i + r, 4) };
    let adapter_per_layer = adapted.iter().map(|&(i, _)| adapter_bytes(i)).sum::<u64>() / model.layers.max(1) as u64;
    let score_bytes = match (model.arch, device.is_cuda()) {
        (Architecture::DebertaV2, _) => 24,
        (_, false) => u64::from(model.attention_dropout),
        (Architecture::Bert, true) if model.attention_dropout => 20,
        (_, true) if [32, 64, 128].contains(&model.head_dim) => 0,
        (_, true) => 12,
    };
    let scores = mul(mul(model.heads as u64, run.max_len as u64), score_bytes);
    let per_layer_values = if decoder { 10 * c + 2 * f } else { 18 * c + 6 * f };
    let layer = per_layer_values * d + adapter_per_layer + scores;
    let layers = model.layers as u64;
    let kept = if run.gradient_checkpointing && decoder {
        // Each layer's input, one layer recomputed, one for the backward's gradients.
        mul(tokens, mul(layers, c * d).saturating_add(mul(layer, 2)))
    } else {
        mul(tokens, mul(layer, layers + 1))
    };
    let overhead = if device.is_cuda() { 512 << 20 } else { 256 << 20 };
    MemoryEstimate { weights, trainable, activations: kept, overhead }
}

/// How much memory a device offers, and what that number is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceMemory {
    pub bytes: u64,
    /// For messages: "cuda:0 (NVIDIA H100 80GB HBM3) has 79.1 GiB", "the CPU has 21.0 GiB
    /// available (MemAvailable)".
    pub description: String,
}

/// The memory `device` offers (see the module doc); `None` where it cannot be read (another
/// OS, a CUDA error), and then nothing is refused.
pub fn device_memory(device: &Device) -> Option<DeviceMemory> {
    match device {
        Device::Cpu => {
            let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
            let available = mem_available(&meminfo)?;
            let cgroup = |f: &str| std::fs::read_to_string(Path::new("/sys/fs/cgroup").join(f)).ok();
            match cgroup_room(cgroup("memory.max").as_deref(), cgroup("memory.current").as_deref()) {
                Some(room) if room < available => Some(DeviceMemory {
                    bytes: room,
                    description: format!("the CPU has {} available (under the cgroup's memory.max)", human(room)),
                }),
                _ => Some(DeviceMemory {
                    bytes: available,
                    description: format!("the CPU has {} available (MemAvailable)", human(available)),
                }),
            }
        }
        _ => cuda_total(device),
    }
}

#[cfg(feature = "cuda")]
fn cuda_total(device: &Device) -> Option<DeviceMemory> {
    use candle_core::cuda_backend::cudarc;
    let Device::Cuda(dev) = device else { return None };
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    ctx.bind_to_thread().ok()?;
    let (_free, total) = cudarc::driver::result::mem_get_info().ok()?;
    let name = ctx.name().unwrap_or_else(|_| "a GPU".into());
    let ordinal = match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => gpu_id,
        _ => 0,
    };
    Some(DeviceMemory {
        bytes: total as u64,
        description: format!("cuda:{ordinal} ({name}) has {}", human(total as u64)),
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda_total(_device: &Device) -> Option<DeviceMemory> {
    None
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
pub fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// The room left under a cgroup v2 limit: `memory.max` − `memory.current`; `None` without a
/// limit (`max`) or when either cannot be read.
pub fn cgroup_room(max: Option<&str>, current: Option<&str>) -> Option<u64> {
    let max: u64 = max?.trim().parse().ok()?;
    let current: u64 = current?.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

/// Bytes for messages: MiB below 0.1 GiB, TiB from 1024 GiB.
pub fn human(bytes: u64) -> String {
    let gib = bytes as f64 / (1u64 << 30) as f64;
    if gib >= 1024.0 {
        format!("{:.1} TiB", gib / 1024.0)
    } else if gib >= 0.1 {
        format!("{gib:.1} GiB")
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

/// Refuses a run whose [`estimate`] exceeds [`device_memory`], with both numbers, the parts of
/// the estimate and what to change. Returns the estimate (`None` when the model's shape cannot
/// be read: the loader reports that problem in its own words). Nothing is refused when the
/// device's memory cannot be read.
pub fn check(model_path: &Path, run: &RunShape, device: &Device) -> Result<Option<MemoryEstimate>> {
    let model = match ModelShape::read(model_path) {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!(error = %e, "memory check skipped: the model's shape could not be read");
            return Ok(None);
        }
    };
    let est = estimate(&model, run, device);
    let Some(mem) = device_memory(device) else { return Ok(Some(est)) };
    if est.total() <= mem.bytes {
        return Ok(Some(est));
    }
    let dtype = format!("{:?}", run.dtype).to_lowercase();
    let mut ways = Vec::new();
    if run.batch_size > 1 {
        ways.push("a smaller --batch-size (with --grad-accum to keep the effective batch)".to_string());
    }
    if model.arch == Architecture::Llama && !run.gradient_checkpointing {
        ways.push("--gradient-checkpointing".into());
    }
    if run.dtype == DType::F32 && device.is_cuda() {
        ways.push("--dtype bf16".into());
    }
    ways.push("a smaller --max-len".into());
    Err(Error::MemoryEstimate {
        needed: human(est.total()),
        parts: format!(
            "weights {} in {dtype}, adapter and optimizer state {}, activations {} for batch {} × {} tokens{}",
            human(est.weights),
            human(est.trainable),
            human(est.activations),
            run.batch_size,
            run.max_len,
            if run.gradient_checkpointing && model.arch == Architecture::Llama {
                " with gradient checkpointing"
            } else {
                ""
            },
        ),
        device: mem.description,
        advice: format!("try {}", ways.join(", ")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Llama-2-7B's shape (configs/bench/llama2_7b.json) with its 6,738,415,616 parameters.
    fn llama2_7b() -> ModelShape {
        let (c, f) = (4096, 11008);
        let mut linears = Vec::new();
        for l in 0..32 {
            for (m, i, o) in [
                ("self_attn.q_proj", c, c),
                ("self_attn.k_proj", c, c),
                ("self_attn.v_proj", c, c),
                ("self_attn.o_proj", c, c),
                ("mlp.gate_proj", c, f),
                ("mlp.up_proj", c, f),
                ("mlp.down_proj", f, c),
            ] {
                linears.push((format!("model.layers.{l}.{m}"), i, o));
            }
        }
        ModelShape {
            arch: Architecture::Llama,
            params: 6_738_415_616,
            layers: 32,
            hidden: c,
            intermediate: f,
            heads: 32,
            head_dim: 128,
            attention_dropout: false,
            gguf: false,
            linears,
        }
    }

    fn run(batch_size: usize, max_len: usize, dtype: DType, gradient_checkpointing: bool) -> RunShape {
        RunShape {
            batch_size,
            max_len,
            dtype,
            gradient_checkpointing,
            optimizer: OptimizerKind::Adamw,
            rank: 8,
            targets: None,
        }
    }

    fn gib(bytes: u64) -> f64 {
        bytes as f64 / (1u64 << 30) as f64
    }

    /// The estimate (a classification loss) against the measured peaks of the bench (README)
    /// (causal-LM loss: ~0.5–2 GiB of logits more): within 10 %.
    #[test]
    fn llama2_7b_estimates_match_the_measured_peaks() {
        // 4 × 512: H100, 2026-12-06 (bench/results/2026-12-06_h100_memory_7b_4x512.json);
        // 8 × 1024: H100, 2026-12-06 (bench/results/2026-12-06_h100_s6.jsonl); with
        // checkpointing: H200, 2026-12-02, before the memory ops (the recomputed layer keeps less
        // now, a few hundred MiB).
        let cases = [(4, 512, false, 21.64), (8, 1024, false, 44.05), (4, 512, true, 15.3)];
        for (b, t, ckpt, measured) in cases {
            let est = estimate_cuda(&llama2_7b(), &run(b, t, DType::BF16, ckpt));
            let got = gib(est.total());
            assert!((got - measured).abs() / measured < 0.1, "{b}×{t} ckpt {ckpt}: {got:.1} GiB vs {measured}");
        }
        // bf16 weights: 2 bytes per parameter; LoRA q, v r 8: 32 layers × 2 × 8 × 8192 f32
        // values, ×4 (variables, gradient, AdamW's m and v).
        let est = estimate_cuda(&llama2_7b(), &run(4, 512, DType::BF16, false));
        assert_eq!(est.weights, 2 * 6_738_415_616);
        assert_eq!(est.trainable, 32 * 2 * 8 * 8192 * 4 * 4);
    }

    /// `estimate` as on a CUDA device without one: the CPU terms differ only in the attention
    /// scores (none for Llama at head dim 128 either way) and the overhead.
    fn estimate_cuda(model: &ModelShape, run: &RunShape) -> MemoryEstimate {
        let cpu = estimate(model, run, &Device::Cpu);
        MemoryEstimate { overhead: 512 << 20, ..cpu }
    }

    #[test]
    fn checkpointing_batch_and_length_scale_the_activations() {
        let m = llama2_7b();
        let base = estimate(&m, &run(4, 512, DType::BF16, false), &Device::Cpu);
        let double = estimate(&m, &run(8, 512, DType::BF16, false), &Device::Cpu);
        assert_eq!(double.activations, 2 * base.activations);
        assert_eq!(double.weights, base.weights);
        let ckpt = estimate(&m, &run(4, 512, DType::BF16, true), &Device::Cpu);
        assert!(ckpt.activations * 5 < base.activations, "{ckpt:?} vs {base:?}");
        let f32 = estimate(&m, &run(4, 512, DType::F32, false), &Device::Cpu);
        assert_eq!(f32.weights, 2 * base.weights);
        // all-linear LoRA: every linear of every layer.
        let all = RunShape { targets: Some(TargetModules::Regex(".*_proj".into())), ..run(4, 512, DType::BF16, false) };
        let all = estimate(&m, &all, &Device::Cpu);
        assert_eq!(all.trainable, 32 * 8 * (4 * 8192 + 2 * 15104 + 15104) * 4 * 4);
    }

    #[test]
    fn meminfo_and_cgroup_are_parsed() {
        let meminfo = "MemTotal:       24576000 kB\nMemFree:         1000 kB\nMemAvailable:   22000000 kB\n";
        assert_eq!(mem_available(meminfo), Some(22_000_000 * 1024));
        assert_eq!(mem_available("MemTotal: 5 kB\n"), None);
        assert_eq!(cgroup_room(Some("max\n"), Some("100\n")), None);
        assert_eq!(cgroup_room(Some("1000\n"), Some("100\n")), Some(900));
        assert_eq!(cgroup_room(Some("1000\n"), None), None);
        assert_eq!(human(3 << 30), "3.0 GiB");
        assert_eq!(human(5 << 20), "5 MiB");
        assert_eq!(human(2048u64 << 30), "2.0 TiB");
    }
}
