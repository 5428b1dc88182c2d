//! Training: one loop that reads top to bottom (`run`), IVON or AdamW or SGD over the adapter
//! (and head) variables, gradient accumulation, LR schedules, periodic evaluation, atomic
//! checkpoints and bit-exact resume on CPU.
//!
//! The loop knows no clap, no indicatif and no export format: it reports to an [`Observer`]
//! (`begin`, `step`, `eval`, `finish`), which can stop it cleanly with `ControlFlow::Break`
//! (Ctrl-C in the CLI): the loop then writes a checkpoint and returns.
//!
//! IVON steps follow `specs/ivon.md`: one posterior sample spans the whole effective batch
//! (all micro-batches are accumulated under the same noise, no loss scaling), `mc_samples`
//! samples per step; AdamW averages micro-batch gradients and optionally clips their norm.
mod checkpoint;
mod classifier;
pub mod dist;
pub mod memory;
mod schedule;

pub use checkpoint::{Checkpoint, CheckpointState, Restored};
pub use classifier::{head_for, Adapters, BLora, TaskModel};
pub use schedule::{lr_at, Schedule};

use crate::adapters::Ctx;
use crate::data::{Batch, BatchConfig, BatchTensors, Batcher, EncodedDataset};
use crate::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use ivon::{Ivon, IvonConfig, ParamGroup};
use serde::{Deserialize, Serialize};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// A model that maps a batch to class logits: the seam between models, tasks and training.
pub trait Classifier {
    /// Class logits `[B, K]` (regression: `[B, 1]`), before masking absent choices.
    fn logits(&self, batch: &BatchTensors, ctx: &Ctx) -> Result<Tensor>;
    /// Every trainable variable with a stable name (adapter vars as PEFT names them on disk,
    /// head vars as the HF checkpoint does).
    fn trainable(&self) -> Vec<(String, Var)>;
    /// Whether a trainable var belongs to a freshly initialised head (its own optimizer group).
    fn is_head(&self, _name: &str) -> bool {
        false
    }
    /// Whether a trainable var is a gate logit (B-LoRA): trained by its own Adam
    /// ([`TrainConfig::gates`]), never by IVON, and not part of the posterior.
    fn is_gate(&self, _name: &str) -> bool {
        false
    }
    /// The vars IVON trains and its posterior covers: every trainable var but the gates, in
    /// [`Classifier::trainable`]'s order (the flat order of a posterior and of its sidecar).
    fn posterior_vars(&self) -> Vec<(String, Var)> {
        self.trainable().into_iter().filter(|(n, _)| !self.is_gate(n)).collect()
    }
    /// A scalar added to the task loss of every micro-batch (B-LoRA's μ-weighted gate prior);
    /// `None` for plain LoRA.
    fn regularizer(&self) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// The factor on [`Classifier::regularizer`] at optimizer step `step` (0-based): B-LoRA's
    /// prior warm-up (`mu_warmup_steps`); 1 otherwise.
    fn regularizer_weight(&self, _step: usize) -> f64 {
        1.0
    }
    /// A trainable var that an older checkpoint stored under other names (`saved`: its
    /// trainable tensors), rebuilt from them; `None` when there is nothing to rebuild (the
    /// checkpoint then fails to load with the var's name). B-LoRA: the gate bank from the
    /// per-layer gate vectors of checkpoints written before the gates were one var.
    fn legacy_trainable(
        &self,
        _name: &str,
        _saved: &std::collections::HashMap<String, Tensor>,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// State that is not trained but must survive a resume (B-LoRA's quantizer ranges, fixed
    /// at the first forward), with stable names; restored by [`Classifier::load_buffers`].
    fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(Vec::new())
    }
    /// Restores what [`Classifier::buffers`] returned.
    fn load_buffers(&self, _saved: &std::collections::HashMap<String, Tensor>) -> Result<()> {
        Ok(())
    }
}

/// Which optimizer trains the adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    #[default]
    Ivon,
    Adamw,
    Sgd,
}

/// IVON settings for a freshly initialised classification head, which needs to move much
/// further than an adapter does (`specs/ivon.md`, last section). `None` fields inherit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeadGroup {
    pub lr: Option<f64>,
    pub hess_init: Option<f64>,
    pub clip_radius: Option<f64>,
    pub weight_decay: Option<f64>,
}

/// Everything a training run needs besides the model and the data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub optimizer: OptimizerKind,
    pub ivon: IvonConfig,
    pub ivon_head: HeadGroup,
    /// AdamW (torch defaults; IVON-LoRA's baseline: lr 5e-5, weight_decay 0).
    pub adamw: ivon::AdamWConfig,
    pub sgd: ivon::SgdConfig,
    /// Adam for B-LoRA's gate logits whatever trains the weights (Bayesian Bits: Adam, no weight
    /// decay; B-LoRA's config: lr 1e-2). Follows the run's LR schedule, scaled by `lr / base_lr`.
    pub gates: ivon::AdamWConfig,
    pub batch: BatchConfig,
    /// Passes over the training data (used when `max_steps` is unset).
    pub epochs: usize,
    /// Optimizer steps; overrides `epochs`.
    pub max_steps: Option<usize>,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    /// Clip the global gradient norm (AdamW/SGD; IVON has its own `clip_radius`).
    pub max_grad_norm: Option<f64>,
    /// Evaluate every N steps (0: only at the end).
    pub eval_every: usize,
    /// Write a checkpoint every N steps (0: only at the end or on interruption). A crash (kill,
    /// power loss) costs at most the steps since the last checkpoint.
    pub checkpoint_every: usize,
    /// How many of the newest checkpoints to keep (0: all; transformers' `save_total_limit`).
    /// The default 2 keeps a predecessor to fall back to when the newest is damaged.
    pub keep_checkpoints: usize,
    /// Where checkpoints go (`None`: no checkpoints).
    pub checkpoint_dir: Option<PathBuf>,
    /// Seed of dropout masks and of IVON's noise.
    pub seed: u64,
    /// Activation checkpointing per decoder layer (Llama family): keep only each layer's input
    /// and recompute the layer in the backward. Much less memory for one more forward per step;
    /// gradients are bit-identical.
    pub gradient_checkpointing: bool,
    /// Keep stepping after a non-finite loss instead of stopping with an error. Only for speed
    /// benchmarks on random weights, which time steps whatever the loss (as the PyTorch anchor
    /// does); never read from or written to a config file.
    #[serde(skip)]
    pub allow_nonfinite_loss: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            optimizer: OptimizerKind::Ivon,
            ivon: IvonConfig::default(),
            ivon_head: HeadGroup::default(),
            adamw: ivon::AdamWConfig::default(),
            sgd: ivon::SgdConfig::default(),
            gates: ivon::AdamWConfig { lr: 1e-2, weight_decay: 0.0, ..ivon::AdamWConfig::default() },
            batch: BatchConfig::default(),
            epochs: 1,
            max_steps: None,
            grad_accum: 1,
            schedule: Schedule::Linear,
            warmup_steps: 0,
            max_grad_norm: None,
            eval_every: 0,
            checkpoint_every: 0,
            keep_checkpoints: 2,
            checkpoint_dir: None,
            seed: 0,
            gradient_checkpointing: false,
            allow_nonfinite_loss: false,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        if self.grad_accum == 0 {
            return Err(Error::config("grad_accum", 0, "use at least 1 micro-batch per step"));
        }
        if self.epochs == 0 && self.max_steps.is_none() {
            return Err(Error::config("epochs", 0, "train at least one epoch or set max_steps"));
        }
        if self.max_steps == Some(0) {
            return Err(Error::config("max_steps", 0, "train at least one step"));
        }
        if let Some(n) = self.max_grad_norm {
            if n.is_nan() || n <= 0.0 {
                return Err(Error::config("max_grad_norm", n, "must be positive"));
            }
        }
        self.batch.validate()?;
        if self.optimizer == OptimizerKind::Ivon {
            self.ivon.validate()?;
        }
        Ok(())
    }

    /// Optimizer steps of the run for a data set of `batches_per_epoch` batches.
    pub fn total_steps(&self, batches_per_epoch: usize) -> usize {
        self.max_steps.unwrap_or_else(|| (self.epochs * batches_per_epoch / self.grad_accum).max(1))
    }

    /// The base learning rate of the chosen optimizer.
    pub fn base_lr(&self) -> f64 {
        match self.optimizer {
            OptimizerKind::Ivon => self.ivon.lr,
            OptimizerKind::Adamw => self.adamw.lr,
            OptimizerKind::Sgd => self.sgd.lr,
        }
    }
}

/// What the loop reports after each optimizer step.
#[derive(Debug, Clone, Serialize)]
pub struct StepInfo {
    /// 1-based count of finished optimizer steps.
    pub step: usize,
    pub total_steps: usize,
    pub loss: f32,
    pub lr: f64,
    /// Real (non-padding) tokens processed in this step.
    pub tokens: usize,
    pub seconds: f64,
}

/// Receives progress; return `ControlFlow::Break(())` to stop (the loop checkpoints first).
pub trait Observer {
    fn begin(&mut self, _total_steps: usize, _start_step: usize) {}
    fn step(&mut self, _info: &StepInfo) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }
    /// Called every `eval_every` steps with the mean-prediction metrics of the eval set.
    fn eval(&mut self, _step: usize, _accuracy: f64, _nll: f64) {}
    fn checkpoint(&mut self, _step: usize, _dir: &std::path::Path) {}
    /// Something the user should know about the run's settings (printed, not fatal).
    fn note(&mut self, _message: &str) {}
    fn finish(&mut self) {}
}

/// An observer that ignores everything.
pub struct Silent;
impl Observer for Silent {}

/// The optimizer a run trains with, one of ivon's three behind their common `ivon::Optimizer`
/// trait (state is f32 whatever the model dtype).
pub enum RunOptimizer {
    Ivon(Box<Ivon>),
    Adamw(ivon::AdamW),
    Sgd(ivon::Sgd),
}

impl std::fmt::Debug for RunOptimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (name, lr) = match self {
            RunOptimizer::Ivon(o) => ("ivon", o.config().lr),
            RunOptimizer::Adamw(o) => ("adamw", o.config().lr),
            RunOptimizer::Sgd(o) => ("sgd", ivon::Optimizer::learning_rate(o)),
        };
        write!(f, "Optimizer({name}, lr {lr})")
    }
}

impl RunOptimizer {
    /// Builds the optimizer over `model.trainable()`; with IVON a fresh head gets its own group.
    pub fn new(model: &dyn Classifier, cfg: &TrainConfig) -> Result<Self> {
        let named = model.posterior_vars();
        if named.is_empty() {
            return Err(Error::config("target_modules", "[]", "no trainable variables: attach an adapter first"));
        }
        let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
        Ok(match cfg.optimizer {
            OptimizerKind::Ivon => {
                let (head, adapter): (Vec<_>, Vec<_>) = named.into_iter().partition(|(n, _)| model.is_head(n));
                let mut groups = Vec::new();
                if !adapter.is_empty() {
                    groups.push(ParamGroup::new(adapter.into_iter().map(|(_, v)| v).collect()));
                }
                if !head.is_empty() {
                    let h = &cfg.ivon_head;
                    let mut g = ParamGroup::new(head.into_iter().map(|(_, v)| v).collect());
                    if let Some(x) = h.lr {
                        g = g.lr(x);
                    }
                    if let Some(x) = h.hess_init {
                        g = g.hess_init(x);
                    }
                    if let Some(x) = h.clip_radius {
                        g = g.clip_radius(x);
                    }
                    if let Some(x) = h.weight_decay {
                        g = g.weight_decay(x);
                    }
                    groups.push(g);
                }
                let mut opt = Ivon::with_groups(groups, cfg.ivon)?;
                opt.set_seed(cfg.seed);
                RunOptimizer::Ivon(Box::new(opt))
            }
            OptimizerKind::Adamw => RunOptimizer::Adamw(ivon::AdamW::new(vars, cfg.adamw)?),
            OptimizerKind::Sgd => RunOptimizer::Sgd(ivon::Sgd::new(vars, cfg.sgd)?),
        })
    }

    /// The optimizer behind the common trait (step, learning rate, state save/load).
    pub fn as_dyn(&mut self) -> &mut dyn ivon::Optimizer {
        match self {
            RunOptimizer::Ivon(o) => o.as_mut(),
            RunOptimizer::Adamw(o) => o,
            RunOptimizer::Sgd(o) => o,
        }
    }

    pub(crate) fn as_ref_dyn(&self) -> &dyn ivon::Optimizer {
        match self {
            RunOptimizer::Ivon(o) => o.as_ref(),
            RunOptimizer::Adamw(o) => o,
            RunOptimizer::Sgd(o) => o,
        }
    }

    fn set_lr(&mut self, lr: f64) {
        self.as_dyn().set_learning_rate(lr)
    }
}

/// What a finished (or interrupted) run returns.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub steps: usize,
    pub total_steps: usize,
    pub interrupted: bool,
    pub final_loss: f32,
    pub seconds: f64,
    pub tokens: usize,
}

/// Cross-entropy on class logits with absent choices masked (classification), or MSE on
/// `[B, 1]` outputs (regression).
pub fn loss(logits: &Tensor, batch: &BatchTensors) -> Result<Tensor> {
    if batch.labels.dtype() == DType::F32 {
        return Ok(crate::ops::mse(&logits.squeeze(1)?, &batch.labels)?);
    }
    let logits = mask_choices(logits, batch)?;
    Ok(crate::ops::cross_entropy(&logits, &batch.labels)?)
}

/// Sets the logits of padded choices to −1e9 (ARC rows with fewer than K choices).
pub fn mask_choices(logits: &Tensor, batch: &BatchTensors) -> Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    match &batch.class_mask {
        Some(mask) => Ok(logits.broadcast_add(&mask.affine(1e9, -1e9)?)?),
        None => Ok(logits),
    }
}

/// Periodic evaluation hook of [`run`]: (accuracy, nll) of the model's current mean.
pub type EvalFn<'a> = dyn FnMut(&dyn Classifier) -> Result<(f64, f64)> + 'a;

/// Restores `model` and its optimizer from the newest good checkpoint under `dir` (or the
/// checkpoint folder `dir`) without training: evaluating or exporting a finished or interrupted
/// run. `train` and `cfg` must be the run's, so that the data cursor and the optimizer match.
pub fn restore(
    model: &dyn Classifier,
    train: Arc<EncodedDataset>,
    cfg: &TrainConfig,
    dir: &std::path::Path,
) -> Result<(Restored, RunOptimizer)> {
    cfg.validate()?;
    let mut opt = RunOptimizer::new(model, cfg)?;
    let mut gates = GateOptimizer::new(model, cfg)?;
    let mut batcher = Batcher::new(train, cfg.batch.clone())?;
    let restored = Checkpoint::load(dir, model, &mut opt, gates.as_mut(), &mut batcher)?;
    Ok((restored, opt))
}

/// Trains `model` on `train`, starting from `resume` if given. `evaluate` (if any) is called
/// every `eval_every` steps and must return (accuracy, nll) of the mean prediction.
pub fn run(
    model: &dyn Classifier,
    train: Arc<EncodedDataset>,
    cfg: &TrainConfig,
    device: &Device,
    observer: &mut dyn Observer,
    resume: Option<&std::path::Path>,
    evaluate: Option<&mut EvalFn<'_>>,
) -> Result<(TrainSummary, RunOptimizer)> {
    run_data_parallel(model, train, cfg, device, observer, resume, evaluate, &mut dist::Single)
}

/// [`run`] as one rank of a data-parallel group ([`dist`] says how a step is shared): every rank
/// calls it with the same model, data and config, and its own `comm`. Rank 0 writes the
/// checkpoints and runs `evaluate`; the others pass the same `cfg` and may pass no evaluation.
/// Resuming reads rank 0's checkpoint on every rank (the ranks other than 0 then reseed their
/// IVON noise from it); the step count and the batcher's position carry over, so a run may resume
/// with another world size.
#[allow(clippy::too_many_arguments)]
pub fn run_data_parallel(
    model: &dyn Classifier,
    train: Arc<EncodedDataset>,
    cfg: &TrainConfig,
    device: &Device,
    observer: &mut dyn Observer,
    resume: Option<&std::path::Path>,
    evaluate: Option<&mut EvalFn<'_>>,
    comm: &mut dyn dist::Communicator,
) -> Result<(TrainSummary, RunOptimizer)> {
    cfg.validate()?;
    let (rank, world) = (comm.rank(), comm.world_size());
    let mut opt = RunOptimizer::new(model, cfg)?;
    let mut gates = GateOptimizer::new(model, cfg)?;
    let mut batcher = Batcher::new(train, cfg.batch.clone())?;
    let total = cfg.total_steps((batcher.batches_per_epoch() / world).max(1));
    let mut step = 0;
    if let Some(dir) = resume {
        let restored = Checkpoint::load(dir, model, &mut opt, gates.as_mut(), &mut batcher)?;
        if let Some(note) = &restored.note {
            observer.note(note);
        }
        step = restored.state.step;
    }
    if rank > 0 {
        // Each rank its own noise: rank 0 keeps the one-process stream.
        if let RunOptimizer::Ivon(o) = &mut opt {
            o.set_seed(cfg.seed ^ (rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step as u64);
        }
    }
    if let Some(g) = &gates {
        if let Some(message) = g.unreachable_threshold(cfg, step, total)? {
            observer.note(&message);
        }
    }
    let mut evaluate = evaluate;
    let start = Instant::now();
    let (mut tokens, mut last_loss, mut interrupted) = (0usize, f32::NAN, false);
    observer.begin(total, step);
    while step < total {
        let lr = lr_at(cfg.base_lr(), cfg.schedule, step, total, cfg.warmup_steps);
        opt.set_lr(lr);
        if let Some(g) = gates.as_mut() {
            g.follow_schedule(lr / cfg.base_lr());
        }
        // All ranks draw the step's grad_accum × world micro-batches; rank r takes r, r + world, …
        let micro: Vec<Batch> =
            (0..cfg.grad_accum * world).map(|_| batcher.next_batch()).skip(rank).step_by(world).collect();
        let step_tokens: usize = micro.iter().map(|b| b.num_real_tokens).sum();
        let micro: Vec<BatchTensors> = micro.iter().map(|b| b.to_tensors(device)).collect::<Result<_>>()?;
        let t0 = Instant::now();
        // Dropout follows the micro-batch's global index: the same masks whatever the world size.
        let ctx_for = |i: usize| Ctx {
            checkpoint: cfg.gradient_checkpointing,
            ..Ctx::train(Ctx::train(cfg.seed).seed_for((step * cfg.grad_accum * world + rank + i * world) as u64))
        };
        // Gate gradients are averaged over every backward of the step (micro-batches × samples).
        let mut gate_grads = gates.as_ref().map(|g| GradMean::new(&g.vars));
        let loss_value = match &mut opt {
            RunOptimizer::Ivon(o) => {
                let mut sum = 0.0f32;
                for _ in 0..cfg.ivon.mc_samples {
                    sum += o.with_sample(|s| -> Result<f32> {
                        let mut acc = 0.0;
                        for (i, b) in micro.iter().enumerate() {
                            let (objective, task) = objective(model, b, &ctx_for(i), step)?;
                            acc += task;
                            let grads = crate::ops::backward(&objective)?;
                            if let Some(g) = gate_grads.as_mut() {
                                g.add(&grads)?;
                            }
                            s.accumulate(&grads)?;
                        }
                        Ok(acc / micro.len() as f32)
                    })?;
                }
                let mean = reduce_loss(comm, sum / cfg.ivon.mc_samples as f32)?;
                if !cfg.allow_nonfinite_loss {
                    check_finite(mean, step + 1)?;
                }
                if world > 1 {
                    o.step_synced(&mut |buf: &mut [f32]| {
                        comm.all_reduce_mean(buf).map_err(|e| ivon::Error::Sync(e.to_string()))
                    })?;
                } else {
                    o.step()?;
                }
                mean
            }
            other => {
                let vars: Vec<Var> = model.posterior_vars().into_iter().map(|(_, v)| v).collect();
                let mut weight_grads = GradMean::new(&vars);
                let mut loss_sum = 0.0f32;
                for (i, b) in micro.iter().enumerate() {
                    let (objective, task) = objective(model, b, &ctx_for(i), step)?;
                    loss_sum += task;
                    let grads = crate::ops::backward(&objective)?;
                    if let Some(g) = gate_grads.as_mut() {
                        g.add(&grads)?;
                    }
                    weight_grads.add(&grads)?;
                }
                let mean = reduce_loss(comm, loss_sum / micro.len() as f32)?;
                if !cfg.allow_nonfinite_loss {
                    check_finite(mean, step + 1)?;
                }
                let grads = all_reduce_grads(comm, weight_grads.finish()?, &vars)?;
                let grads = match cfg.max_grad_norm {
                    Some(max) => clip_grad_norm(grads, &vars, max)?,
                    None => grads,
                };
                other.as_dyn().step(&grads)?;
                mean
            }
        };
        if let (Some(g), Some(grads)) = (gates.as_mut(), gate_grads) {
            let grads = all_reduce_grads(comm, grads.finish()?, &g.vars)?;
            ivon::Optimizer::step(&mut g.opt, &grads)?;
        }
        step += 1;
        if world > 1 {
            sync_buffers(comm, model)?;
        }
        if world > 1 && (step % dist::CHECK_EVERY == 0 || step == total) {
            dist::check_agree(comm, trained_checksum(model)?, step)?;
        }
        tokens += step_tokens;
        last_loss = loss_value;
        let info = StepInfo {
            step,
            total_steps: total,
            loss: loss_value,
            lr,
            tokens: step_tokens,
            seconds: t0.elapsed().as_secs_f64(),
        };
        let flow = observer.step(&info);
        if rank == 0 && cfg.eval_every > 0 && step % cfg.eval_every == 0 && step < total {
            if let Some(f) = evaluate.as_mut() {
                let (acc, nll) = f(model)?;
                observer.eval(step, acc, nll);
            }
        }
        let mut stop = flow.is_break();
        if world > 1 {
            // One rank's Ctrl-C stops every rank at the same step (a rank alone would leave the
            // others waiting in the next collective).
            let mut any = [f32::from(u8::from(stop))];
            comm.all_reduce_mean(&mut any)?;
            stop = any[0] > 0.0;
        }
        let periodic = cfg.checkpoint_every > 0 && step % cfg.checkpoint_every == 0;
        if let Some(dir) = cfg.checkpoint_dir.as_ref().filter(|_| rank == 0) {
            if periodic || stop || step == total {
                let path = Checkpoint::save(dir, step, cfg, model, &opt, gates.as_ref(), &batcher)
                    .map_err(|e| Checkpoint::write_failed(dir, step, e))?;
                observer.checkpoint(step, &path);
            }
        }
        if stop {
            interrupted = true;
            break;
        }
    }
    observer.finish();
    let summary = TrainSummary {
        steps: step,
        total_steps: total,
        interrupted,
        final_loss: last_loss,
        seconds: start.elapsed().as_secs_f64(),
        tokens,
    };
    Ok((summary, opt))
}

/// The training objective of one micro-batch (task loss + the model's regulariser, if any) and
/// the task loss alone, which is what the run reports. The regulariser is weighted by the model's
/// schedule at `step`. A non-finite regulariser surfaces as a non-finite objective in the step's
/// loss check.
///
/// One device→host read per micro-batch: with a regulariser, the task loss and the regulariser
/// are read together (`[2]`), not one after the other (each read waits for the device).
fn objective(model: &dyn Classifier, batch: &BatchTensors, ctx: &Ctx, step: usize) -> Result<(Tensor, f32)> {
    let task = loss(&model.logits(batch, ctx)?, batch)?;
    match model.regularizer()? {
        Some(reg) => {
            let weight = model.regularizer_weight(step);
            let reg = if weight == 1.0 { reg } else { reg.affine(weight, 0.0)? };
            let both = Tensor::stack(&[task.to_dtype(DType::F32)?, reg.to_dtype(DType::F32)?], 0)?;
            let (task_value, reg_value) = match both.to_vec1::<f32>()?[..] {
                [t, r] => (t, r),
                _ => (f32::NAN, f32::NAN),
            };
            let value = if reg_value.is_finite() { task_value } else { f32::NAN };
            Ok((task.add(&reg.to_dtype(task.dtype())?)?, value))
        }
        None => {
            let task_value = task.to_scalar::<f32>()?;
            Ok((task, task_value))
        }
    }
}

/// Adam over the gate logits of a B-LoRA model (none for plain LoRA).
pub struct GateOptimizer {
    pub vars: Vec<Var>,
    pub opt: ivon::AdamW,
    base_lr: f64,
}

impl GateOptimizer {
    fn new(model: &dyn Classifier, cfg: &TrainConfig) -> Result<Option<Self>> {
        let vars: Vec<Var> = model.trainable().into_iter().filter(|(n, _)| model.is_gate(n)).map(|(_, v)| v).collect();
        if vars.is_empty() {
            return Ok(None);
        }
        let opt = ivon::AdamW::new(vars.clone(), cfg.gates)?;
        Ok(Some(GateOptimizer { vars, opt, base_lr: cfg.gates.lr }))
    }

    /// A note when no gate can reach the test-time threshold in the steps left: one Adam step
    /// moves a logit by at most lr · max(1, (1 − β1) / √(1 − β2)) (Kingma & Ba, §2.1; 3.16 × lr
    /// at torch's betas — a gate whose gradient is mostly zero with rare large values moves
    /// that far), so the schedule's Σ lr times that factor bounds how far any gate can fall, and
    /// a B-LoRA run this short learns no rank or bit-width.
    fn unreachable_threshold(&self, cfg: &TrainConfig, from: usize, total: usize) -> Result<Option<String>> {
        let largest_step = ((1.0 - cfg.gates.beta1) / (1.0 - cfg.gates.beta2).sqrt()).max(1.0);
        let reach: f64 = (from..total)
            .map(|s| self.base_lr * lr_at(cfg.base_lr(), cfg.schedule, s, total, cfg.warmup_steps) / cfg.base_lr())
            .sum::<f64>()
            * largest_step;
        let threshold = crate::adapters::blora::gates::test_threshold();
        let mut nearest = f64::INFINITY;
        for v in &self.vars {
            let logits = v.as_tensor().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            // Gates already closed (at or below the threshold) or hard-off do not count.
            for l in logits.into_iter().map(f64::from).filter(|&l| l > threshold) {
                nearest = nearest.min(l - threshold);
            }
        }
        if !(nearest.is_finite() && nearest > reach) {
            return Ok(None);
        }
        Ok(Some(format!(
            "no B-LoRA gate can close in this run: its {} steps move a gate logit by at most ~{reach:.2} \
             (Σ of the scheduled gate_lr × Adam's largest step factor {largest_step:.2}), and the nearest open gate is {nearest:.2} above the test-time \
             threshold {threshold:.2}; ranks and bit-widths will stay at their start. Raise gate_lr, train \
             longer, or start the gates lower (rank_gate_init, bit_gate_init)",
            total - from
        )))
    }

    /// Scales the gate learning rate by the weights' schedule factor.
    fn follow_schedule(&mut self, factor: f64) {
        let lr = if factor.is_finite() { self.base_lr * factor } else { self.base_lr };
        ivon::Optimizer::set_learning_rate(&mut self.opt, lr);
    }
}

/// The step's loss averaged over the ranks (itself on one rank).
fn reduce_loss(comm: &mut dyn dist::Communicator, loss: f32) -> Result<f32> {
    if comm.world_size() == 1 {
        return Ok(loss);
    }
    let mut buf = [loss];
    comm.all_reduce_mean(&mut buf)?;
    Ok(buf[0])
}

/// The gradients of `vars` averaged over the ranks in one collective (unchanged on one rank).
fn all_reduce_grads(comm: &mut dyn dist::Communicator, grads: GradStore, vars: &[Var]) -> Result<GradStore> {
    if comm.world_size() == 1 {
        return Ok(grads);
    }
    let local = vars
        .iter()
        .map(|v| match grads.get(v) {
            Some(g) => Ok(g.clone()),
            None => v.as_tensor().zeros_like(),
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut out = GradStore::default();
    for (v, g) in vars.iter().zip(all_reduce_tensors(comm, &local)?) {
        out.insert(v.as_tensor(), g);
    }
    Ok(out)
}

/// Averages the model's running statistics (B-LoRA's quantizer ranges, each rank's updated from
/// its own micro-batches) over the ranks, so that every rank quantizes with the same ranges.
fn sync_buffers(comm: &mut dyn dist::Communicator, model: &dyn Classifier) -> Result<()> {
    let (names, local): (Vec<String>, Vec<Tensor>) = model.buffers()?.into_iter().unzip();
    if local.is_empty() {
        return Ok(());
    }
    let synced = names.into_iter().zip(all_reduce_tensors(comm, &local)?).collect();
    model.load_buffers(&synced)
}

/// `tensors` averaged over the ranks in one collective, each back in its shape, dtype and device.
fn all_reduce_tensors(comm: &mut dyn dist::Communicator, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
    let mut flat = flat_f32(tensors)?;
    comm.all_reduce_mean(&mut flat)?;
    let mut at = 0;
    let mut out = Vec::with_capacity(tensors.len());
    for t in tensors {
        let n = t.elem_count();
        out.push(Tensor::from_slice(&flat[at..at + n], t.shape(), t.device())?.to_dtype(t.dtype())?);
        at += n;
    }
    Ok(out)
}

/// Every value of `tensors`, in order, as one f32 vector.
fn flat_f32<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> Result<Vec<f32>> {
    let mut flat = Vec::new();
    for t in tensors {
        flat.extend(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(flat)
}

/// The fingerprint of the trained values (adapter, head, gates) and running statistics that the
/// ranks compare.
fn trained_checksum(model: &dyn Classifier) -> Result<u64> {
    let trained: Vec<Tensor> = model.trainable().into_iter().map(|(_, v)| v.as_tensor().clone()).collect();
    let buffers: Vec<Tensor> = model.buffers()?.into_iter().map(|(_, t)| t).collect();
    Ok(dist::checksum(&flat_f32(trained.iter().chain(&buffers))?))
}

/// The running mean of the gradients of `vars` over several backward passes.
struct GradMean {
    vars: Vec<Var>,
    sums: Vec<Option<Tensor>>,
    count: usize,
}

impl GradMean {
    fn new(vars: &[Var]) -> Self {
        GradMean { vars: vars.to_vec(), sums: vec![None; vars.len()], count: 0 }
    }

    fn add(&mut self, grads: &GradStore) -> Result<()> {
        self.count += 1;
        for (v, sum) in self.vars.iter().zip(self.sums.iter_mut()) {
            if let Some(g) = grads.get(v.as_tensor()) {
                *sum = Some(match sum.take() {
                    Some(prev) => prev.add(g)?,
                    None => g.clone(),
                });
            }
        }
        Ok(())
    }

    /// The mean as a [`GradStore`] keyed by the vars (a var without gradient is left out).
    fn finish(self) -> Result<GradStore> {
        let mut store = GradStore::default();
        let n = self.count.max(1) as f64;
        for (v, sum) in self.vars.iter().zip(self.sums) {
            if let Some(g) = sum {
                let g = if n > 1.0 { g.affine(1.0 / n, 0.0)? } else { g };
                store.insert(v.as_tensor(), g);
            }
        }
        Ok(store)
    }
}

fn check_finite(loss: f32, step: usize) -> Result<()> {
    if loss.is_finite() {
        Ok(())
    } else {
        Err(Error::NonFiniteLoss { step, loss })
    }
}

/// Scales all gradients so that their global L2 norm is at most `max` (torch's
/// `clip_grad_norm_`, with its 1e-6 epsilon).
fn clip_grad_norm(mut grads: GradStore, vars: &[Var], max: f64) -> Result<GradStore> {
    // Summed on the device, read once: a read per var would stall the GPU once per var.
    let mut total: Option<Tensor> = None;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            let s = g.to_dtype(DType::F64)?.sqr()?.sum_all()?;
            total = Some(match total {
                Some(t) => t.add(&s)?,
                None => s,
            });
        }
    }
    let sq = match total {
        Some(t) => t.to_scalar::<f64>()?,
        None => 0.0,
    };
    let coef = max / (sq.sqrt() + 1e-6);
    if coef < 1.0 {
        for v in vars {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), g.affine(coef, 0.0)?);
            }
        }
    }
    Ok(grads)
}
