//! Measurements behind `bayeslora bench`: training throughput ([`train`]) and attention
//! forward+backward ([`attention`]). The binary parses flags and prints the JSON rows; the
//! models, data and timed loops are here.
//!
//! [`train`]: LoRA (or B-LoRA) training throughput (tokens/s, step time), peak memory and the
//! time to the first step on fixed-shape synthetic batches (`batch_size` × `max_len` tokens, no
//! padding). Two sources of a model ([`Source`]): a real checkpoint, compared one to one with
//! `scripts/bench/torch_train.py` (same step in PyTorch + peft + ivon-opt); or a Llama-family
//! config.json built with random weights ([`random_llama`]: std 0.02, norms 1, biases 0;
//! generated on the target device in the target dtype, seeded), no checkpoint and no tokenizer,
//! compared with `scripts/bench/torch_anchor.py`.
//!
//! [`predict`]: the forward-only cost of the posterior predictive, one pass at the mean against K
//! passes at posterior samples, through `eval::evaluate` as `bayeslora eval` runs it.
//!
//! The loss ([`Objective`]): `CausalLm` is the anchor's — next-token cross-entropy over every
//! position, so the lm_head runs on all B·T positions (2·V·C FLOPs per token forward, 4·V·C with
//! the input-gradient backward) and the logits `[B, T, V]` are materialized; `LabelWords` is what
//! `bayeslora train` does on decoders — two label words scored at the last position only.
//!
//! Memory: on CUDA the peak is device-level used memory (total − free from `cuMemGetInfo`), the
//! maximum over samples taken after model build and after every step; it includes the CUDA
//! context and anything a memory pool holds, unlike PyTorch's `max_memory_allocated` (the
//! allocator's peak of live tensors). On the CPU it is the process's peak RSS (`VmHWM`), which
//! never resets within a process. Optimizer step times alone: `cargo bench -p ivon`.
//!
//! ```no_run
//! use bayeslora::bench::{self, Objective, Source};
//! use bayeslora::run::{Quiet, RunConfig};
//! # fn main() -> bayeslora::Result<()> {
//! let cfg = RunConfig { max_len: 16, ..Default::default() };
//! let source = Source::Shape("configs/bench/tiny.json".into());
//! let t = bench::train(&cfg, &source, Objective::CausalLm, cfg.train.optimizer, 2, 1, &mut Quiet)?;
//! println!("{} tokens in {:.3} s", t.tokens, t.seconds);
//! # Ok(()) }
//! ```
mod attention;
mod predict;
mod random;

pub use attention::{attention, parse_attention_shape, AttentionShape, AttentionTiming};
pub use predict::{predict, PredictTiming};
pub use random::{count_params, frozen_param_count, normal_cpu, random_llama, random_model};

use crate::adapters::lora::TargetModules;
use crate::adapters::Ctx;
use crate::data::{BatchTensors, Encoded, EncodedDataset, Format, Label, Task};
use crate::models::Backbone;
use crate::run::{self, Hooks, RunConfig};
use crate::train::{self, Classifier, Observer, OptimizerKind, StepInfo, TaskModel};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::cell::RefCell;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// Peak resident set size of this process in bytes (Linux `VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Device-level used memory (total − free) in bytes and the device's name (CUDA only).
#[cfg(feature = "cuda")]
pub fn cuda_used_bytes(device: &Device) -> Option<(u64, String)> {
    use candle_core::cuda_backend::cudarc;
    let Device::Cuda(dev) = device else { return None };
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    ctx.bind_to_thread().ok()?;
    let (free, total) = cudarc::driver::result::mem_get_info().ok()?;
    let name = ctx.name().unwrap_or_else(|_| "cuda".into());
    Some(((total - free) as u64, name))
}

/// Device-level used memory (total − free) in bytes and the device's name (CUDA only).
#[cfg(not(feature = "cuda"))]
pub fn cuda_used_bytes(_device: &Device) -> Option<(u64, String)> {
    None
}

/// The CPU's model name from /proc/cpuinfo.
pub fn cpu_name() -> String {
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
    fn logits(&self, batch: &BatchTensors, ctx: &Ctx) -> Result<Tensor> {
        let Backbone::Llama(llama) = &self.inner.backbone else {
            return Err(Error::config("objective", "causal-lm", "needs a decoder (Llama family)"));
        };
        let hidden = llama.forward(&batch.input_ids, &batch.attention_mask, ctx)?;
        let logits = llama.lm_logits(&hidden)?; // [B, T, V]
        let shift_labels = crate::ops::fused_cross_entropy_applies(&logits);
        let loss = next_token_loss(&logits, &batch.input_ids, shift_labels)?;
        *self.last.borrow_mut() = Some(loss.detach());
        *self.pending.borrow_mut() = Some(loss);
        Ok(Tensor::zeros((logits.dim(0)?, 2), DType::F32, hidden.device())?)
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        self.inner.trainable()
    }

    fn is_gate(&self, name: &str) -> bool {
        self.inner.is_gate(name)
    }

    /// The LM loss, plus B-LoRA's μ-weighted gate prior (without its warm-up ramp, which would
    /// scale the LM loss too: a timing run needs the prior's cost, not its schedule).
    fn regularizer(&self) -> Result<Option<Tensor>> {
        let lm = self.pending.borrow_mut().take();
        Ok(match (lm, self.inner.regularizer()?) {
            (Some(lm), Some(prior)) => Some(lm.add(&prior)?),
            (lm, prior) => lm.or(prior),
        })
    }
}

/// Next-token cross-entropy of `logits: [B, T, V]` against `input_ids: [B, T]` (u32), the mean
/// over the B·(T−1) predicted positions. With `shift_labels` (where the fused cross-entropy runs,
/// CUDA) the labels move, as transformers' causal-LM loss does: shifted left, the last position's
/// loss left out, so neither the logits nor their gradient is copied (the narrowed logits and the
/// padded gradient were two `[B, T−1, V]` copies a step: 0.26 GiB at Llama-2-7B 4 × 512, 1 GiB at
/// 8 × 1024). Otherwise the logits of the first T−1 positions, as `ops::cross_entropy` takes them.
fn next_token_loss(logits: &Tensor, input_ids: &Tensor, shift_labels: bool) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    if t < 2 {
        return Err(Error::config("max_len", t, "a next-token loss needs at least 2 tokens"));
    }
    if !shift_labels {
        let pred = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
        let target = input_ids.narrow(1, 1, t - 1)?.contiguous()?.reshape(b * (t - 1))?;
        return Ok(crate::ops::cross_entropy(&pred, &target)?);
    }
    let dev = logits.device();
    let last = Tensor::zeros((b, 1), DType::U32, dev)?;
    let labels = Tensor::cat(&[&input_ids.narrow(1, 1, t - 1)?, &last], 1)?.reshape(b * t)?;
    // One f32 loss per position; the last position's (an arbitrary label) is left out of the mean.
    let rows = crate::ops::fused_cross_entropy_rows(&logits.reshape((b * t, v))?, &labels)?;
    Ok(rows.reshape((b, t))?.narrow(1, 0, t - 1)?.mean_all()?)
}

/// Where [`train`] gets its model.
#[derive(Debug, Clone)]
pub enum Source {
    /// A Llama-family config.json, built with random weights ([`random_model`]).
    Shape(PathBuf),
    /// A real checkpoint (a HF folder or a .gguf file), loaded as `bayeslora train` does.
    Model(PathBuf),
}

/// The loss [`train`] trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Objective {
    /// Next-token cross-entropy over every position (logits `[B, T, V]`), as the PyTorch anchor.
    CausalLm,
    /// Cross-entropy over two label words at the last position (logits `[B, 2]`), as `train`.
    LabelWords,
}

/// What one [`train`] measured.
#[derive(Debug, Clone)]
pub struct TrainTiming {
    /// Timed optimizer steps and the tokens they trained on.
    pub steps: usize,
    pub tokens: usize,
    /// Wall time of the timed steps (the device synchronised before and after).
    pub seconds: f64,
    /// The last timed micro-batch's loss (the LM loss under [`Objective::CausalLm`]).
    pub final_loss: f32,
    /// Frozen parameters of the model (every checkpoint tensor, or the random model's count).
    pub n_frozen: usize,
    /// Peak memory in bytes, and what it measures (`cuda_device_used` or `process_vm_hwm`).
    pub peak_bytes: u64,
    pub peak_kind: &'static str,
    /// The CUDA device's name, or the CPU's model name.
    pub device_name: String,
    /// From the start of the model build to the end of the first optimizer step.
    pub time_to_first_step: Option<f64>,
    /// The target modules the model's architecture chose when `cfg.lora` names none.
    pub default_targets: Option<Vec<String>>,
}

/// The task model of `source` with `cfg`'s adapter and a 2-way head, as the benchmarks use it.
struct Built {
    model: TaskModel,
    /// Frozen parameters (every checkpoint tensor, or the random model's count).
    n_frozen: usize,
    vocab: u32,
    /// A decoder (Llama family; label words at the last position) or an encoder.
    decoder: bool,
    /// The target modules the architecture chose when `cfg.lora` names none.
    default_targets: Option<Vec<String>>,
}

fn build(cfg: &RunConfig, source: &Source, device: &Device, hooks: &mut dyn Hooks) -> Result<Built> {
    let (loaded, n_frozen) = match source {
        Source::Shape(path) => random_model(path, cfg.compute_dtype()?, device, cfg.train.seed)?,
        Source::Model(path) => {
            let loaded = run::load_model(path, cfg, hooks)?;
            let n = count_params(&loaded.weights);
            (loaded, n)
        }
    };
    let (decoder, vocab) = match &loaded.backbone {
        Backbone::Llama(m) => (true, m.config().vocab_size as u32),
        Backbone::Bert(m) => (false, m.config().vocab_size as u32),
        Backbone::DebertaV2(m) => (false, m.config().vocab_size as u32),
    };
    let default_targets = match cfg.lora.clone().with_default_targets(loaded.arch).target_modules {
        Some(TargetModules::List(names)) => Some(names),
        _ => None,
    };
    let model = run::build_model(cfg, loaded, 2, device)?;
    Ok(Built { model, n_frozen, vocab, decoder, default_targets })
}

/// Trains `cfg`'s adapter with optimizer `kind` on synthetic batches of the model of `source`:
/// `warmup` untimed steps, then `steps` timed ones (constant LR, no checkpoints, no periodic
/// evaluation; a non-finite loss does not stop the run: random weights at the anchor's IVON
/// settings can reach one in both stacks, and the steps are timed anyway).
pub fn train(
    cfg: &RunConfig,
    source: &Source,
    objective: Objective,
    kind: OptimizerKind,
    steps: usize,
    warmup: usize,
    hooks: &mut dyn Hooks,
) -> Result<TrainTiming> {
    let device = run::device(&cfg.device)?;
    let built = Instant::now();
    let mut memory = MemoryProbe::new(&device);
    let Built { model, n_frozen, vocab, decoder, default_targets } = build(cfg, source, &device, hooks)?;
    if objective == Objective::CausalLm && !decoder {
        return Err(Error::config(
            "objective",
            "causal-lm",
            "needs a decoder (Llama family); use label-words for encoders",
        ));
    }
    let data = synthetic(cfg.train.batch.batch_size * (steps + warmup), cfg.max_len, vocab, decoder);
    let lm = CausalLm { inner: &model, pending: RefCell::new(None), last: RefCell::new(None) };
    let trained: &dyn Classifier = match objective {
        Objective::CausalLm => &lm,
        Objective::LabelWords => &model,
    };
    memory.sample();
    let mut t = cfg.train.clone();
    t.optimizer = kind;
    t.checkpoint_dir = None;
    t.eval_every = 0;
    t.schedule = train::Schedule::Constant;
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
        (Objective::CausalLm, Some(l)) => l.to_dtype(DType::F32)?.to_scalar::<f32>()?,
        _ => summary.final_loss,
    };
    memory.sample();
    Ok(TrainTiming {
        steps: summary.steps,
        tokens: summary.tokens,
        seconds,
        final_loss,
        n_frozen,
        peak_bytes: memory.peak,
        peak_kind: memory.kind(),
        device_name: if device.is_cuda() { memory.name.clone() } else { cpu_name() },
        time_to_first_step: memory.first_step.map(|t| (t - built).as_secs_f64()),
        default_targets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shifted-label loss (no copy of the logits) equals the narrowed-logits loss, value and
    /// gradient, on the CPU reference of the fused cross-entropy.
    #[test]
    fn shifted_labels_give_the_narrowed_logits_loss() -> Result<()> {
        let dev = Device::Cpu;
        let logits = Var::randn(0f32, 2.0, (3, 6, 11), &dev)?;
        let ids: Vec<u32> = (0..18).map(|i| (i * 7 + 3) % 11).collect();
        let ids = Tensor::from_vec(ids, (3, 6), &dev)?;
        let want = next_token_loss(logits.as_tensor(), &ids, false)?;
        let got = next_token_loss(logits.as_tensor(), &ids, true)?;
        let (w, g) = (want.to_scalar::<f32>()?, got.to_scalar::<f32>()?);
        assert!((w - g).abs() <= 1e-5 * w.abs(), "loss {g} vs {w}");
        let gw = want.backward()?.get(logits.as_tensor()).expect("grad").clone();
        let gg = got.backward()?.get(logits.as_tensor()).expect("grad").clone();
        let diff = (gw - gg)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff <= 1e-6, "gradients differ by {diff}");
        assert!(next_token_loss(&logits.as_tensor().narrow(1, 0, 1)?, &ids.narrow(1, 0, 1)?, true).is_err());
        Ok(())
    }
}
