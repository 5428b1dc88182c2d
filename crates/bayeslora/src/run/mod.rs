//! A run folder as a library verb: the steps every command of the `bayeslora` binary is made of.
//! A run is opened ([`RunConfig`], from flags and TOML or from `<run>/config.toml`), its model and
//! data loaded ([`load_model`], [`load_data`]), trained and evaluated ([`train_and_eval`], which
//! writes `config.toml`, `metrics.jsonl` through the caller's observer, `checkpoints/`,
//! `results.json`, the adapter folder and, for B-LoRA, the BOPs files), and plotted
//! ([`plot_reliability`]). A finished run is rebuilt from its folder with [`TrainedRun::open`]
//! and exported with [`write_adapter`]; an adapter folder is served for prediction with [`Served`]
//! and opened over its base with [`open_adapter`]. [`compare`] sweeps methods × tasks × seeds
//! (`bayeslora compare`) with these steps and the baselines.
//!
//! This module knows every stage (models, adapters, data, train, eval, export, plot); no stage
//! knows it. It never prints: what a user should see goes to the caller's [`Hooks`] (the CLI
//! draws progress bars with indicatif; [`Quiet`] drops everything). It does not resolve model
//! names: the steps take the path of a HF folder or a .gguf file.
//!
//! ```no_run
//! use bayeslora::run::{self, Quiet, RunConfig, Start};
//! # fn main() -> bayeslora::Result<()> {
//! let cfg = RunConfig { model: Some("models/minilm".into()), output: "runs/x".into(), ..Default::default() };
//! let path = cfg.model.clone().unwrap();
//! run::check_memory(&cfg, &path)?;
//! let loaded = run::load_model(&path, &cfg, &mut Quiet)?;
//! let encoder = bayeslora::data::TextEncoder::new(loaded.tokenizer()?.clone(), cfg.max_len)?;
//! let data = run::load_data(&cfg, &encoder, &loaded, &mut Quiet)?;
//! let outcome = run::train_and_eval(&cfg, "adamw", &data, Start::Fresh, loaded, &mut Quiet)?;
//! println!("{}", bayeslora::eval::render_table(&outcome.results));
//! # Ok(()) }
//! ```
pub mod compare;
mod config;
pub mod launch;
mod predict;
mod trained;

pub use config::{compute_dtype, lora_train_defaults, merge_toml, AdapterKind, EvalSettings, RunConfig};
pub use predict::{open_adapter, Served, Session};
pub use trained::{
    adapter_num_labels, bare_model, bops_summary, latest_checkpoint, write_adapter, write_bops, Bops, TrainedRun,
};

use crate::data::{self, DataSpec, EncodedDataset, Format, OnBadRow, Split, Task, TextEncoder};
use crate::error::Context;
use crate::eval::{self, EvalConfig, EvalResult, ModelPredictor, Predictive};
use crate::models::{self, Backbone, LoadOptions, LoadedModel};
use crate::train::{self, Adapters, Observer, OptimizerKind, RunOptimizer, TaskModel};
use crate::{Error, Result};
use candle_core::Device;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What a run tells its caller besides the numbers it returns. Training progress goes to the
/// [`Observer`] that [`Hooks::observer`] makes; everything else a user should see is a line for
/// [`Hooks::note`].
pub trait Hooks {
    /// A line for the user: what loads, data sizes, skipped rows, the note of a restored
    /// checkpoint, an interrupted run, the B-LoRA table.
    fn note(&mut self, line: &str);
    /// The observer of the training loop of the run `label`. `metrics` is the run's
    /// `metrics.jsonl` (a fresh file, or, when `resume`, the one to continue).
    fn observer(&mut self, label: &str, metrics: &Path, resume: bool) -> Box<dyn Observer>;
    /// The final evaluation of `label` begins: `passes` passes over the eval set (the mean, then
    /// the posterior samples).
    fn eval_begin(&mut self, _label: &str, _passes: usize) {}
    /// The final evaluation has ended.
    fn eval_end(&mut self) {}
}

/// Hooks that show nothing (tests, library use without a terminal).
pub struct Quiet;

impl Hooks for Quiet {
    fn note(&mut self, _line: &str) {}
    fn observer(&mut self, _label: &str, _metrics: &Path, _resume: bool) -> Box<dyn Observer> {
        Box::new(train::Silent)
    }
}

/// The repository's `data/` folder (override with `BAYESLORA_DATA`).
pub fn data_dir() -> PathBuf {
    if let Ok(d) = std::env::var("BAYESLORA_DATA") {
        return PathBuf::from(d);
    }
    let local = PathBuf::from("data");
    if local.join("README.md").exists() {
        return local;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data")
}

/// `cpu`, `cuda`, `cuda:N`.
pub fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        n if n.starts_with("cuda") => {
            let ordinal =
                n.strip_prefix("cuda:").map(str::parse::<usize>).transpose().context("device cuda:N needs a number")?;
            let dev = Device::new_cuda(ordinal.unwrap_or(0))
                .with_context(|| format!("opening {n}; was bayeslora built with --features cuda?"))?;
            single_stream(&dev);
            Ok(dev)
        }
        other => Err(Error::run(format!("unknown device `{other}`; use cpu, cuda or cuda:N"))),
    }
}

/// Turns off candle's per-tensor CUDA event tracking: it guards tensors shared between streams,
/// and everything here runs on the device's one stream, while the events cost host time on
/// every op (B-LoRA's quantizers are hundreds of small ops a step).
#[cfg(feature = "cuda")]
fn single_stream(dev: &Device) {
    if let Device::Cuda(d) = dev {
        // SAFETY: no tensor of this device is used on another stream.
        unsafe { d.disable_event_tracking() }
    }
}

#[cfg(not(feature = "cuda"))]
fn single_stream(_dev: &Device) {}

/// Loads the run's model from `path` (a HF folder or a .gguf file: `cfg.model` resolved by the
/// caller) on the run's device in the run's dtype.
pub fn load_model(path: &Path, cfg: &RunConfig, hooks: &mut dyn Hooks) -> Result<LoadedModel> {
    let options = LoadOptions { device: device(&cfg.device)?, dtype: cfg.compute_dtype()? };
    let t0 = std::time::Instant::now();
    hooks.note(&format!("loading {} ({} on {})", path.display(), cfg.dtype, cfg.device));
    let loaded = models::load(path, &options).with_context(|| format!("loading {}", path.display()))?;
    hooks.note(&format!("loaded {:?} in {:.1} s", loaded.arch, t0.elapsed().as_secs_f64()));
    Ok(loaded)
}

/// Refuses a run whose peak-memory estimate exceeds the device's memory, before anything loads
/// (`train::memory`; `skip_memory_check` turns it off). `model` is the resolved model path; the
/// estimate is skipped when the model's shape cannot be read: [`load_model`] reports that
/// problem next.
pub fn check_memory(cfg: &RunConfig, model: &Path) -> Result<()> {
    if cfg.skip_memory_check {
        return Ok(());
    }
    let (rank, targets) = match cfg.method {
        AdapterKind::Lora => (cfg.lora.r, cfg.lora.target_modules.clone()),
        AdapterKind::Blora => (cfg.blora.r, cfg.blora.target_modules.clone()),
    };
    let run = train::memory::RunShape {
        batch_size: cfg.train.batch.batch_size,
        max_len: cfg.max_len,
        dtype: cfg.compute_dtype()?,
        gradient_checkpointing: cfg.train.gradient_checkpointing,
        optimizer: cfg.train.optimizer,
        rank,
        targets,
    };
    if let Some(est) = train::memory::check(model, &run, &device(&cfg.device)?)? {
        tracing::info!(bytes = est.total(), "memory estimate: {}", train::memory::human(est.total()));
    }
    Ok(())
}

/// Tokenized train and eval sets.
pub struct Data {
    pub task: Task,
    pub train: Arc<EncodedDataset>,
    pub eval: EncodedDataset,
}

/// The data spec of one split of the run's task: `file`, else the task's file in [`data_dir`];
/// `decoder` picks the prompt format (decoders score label words after a prompt — the run's
/// `label_words` and `template` when it sets them; encoders classify raw text with a head).
pub fn data_spec(
    cfg: &RunConfig,
    task: Task,
    file: &Option<PathBuf>,
    split: Split,
    limit: Option<usize>,
    decoder: bool,
) -> Result<DataSpec> {
    let mut s = match file {
        Some(p) => DataSpec::new(task, p),
        None => DataSpec::standard(task, split, &data_dir())?,
    };
    s.limit = limit;
    if cfg.skip_bad_rows {
        s.on_bad_row = OnBadRow::Skip;
    }
    if decoder {
        s.format = Some(Format::Prompt);
        if !cfg.label_words.is_empty() {
            s.label_words = cfg.label_words.clone();
        }
        s.template = cfg.template.clone();
    }
    Ok(s)
}

/// Reads and tokenizes the run's data with the model's tokenizer (`model` decides encoder or
/// decoder formatting).
pub fn load_data(cfg: &RunConfig, encoder: &TextEncoder, model: &LoadedModel, hooks: &mut dyn Hooks) -> Result<Data> {
    let task = Task::from_name(&cfg.task)?;
    let decoder = matches!(model.backbone, Backbone::Llama(_));
    let t0 = std::time::Instant::now();
    let mut train_spec = data_spec(cfg, task, &cfg.train_file, Split::Train, cfg.train_limit, decoder)?;
    train_spec.num_classes = cfg.num_labels;
    let train_set = data::load(&train_spec)?;
    // The eval set is checked against the head the train set builds: a label the head has no
    // class for is an error at load time, not a shape error at the first evaluation.
    let mut eval_spec = data_spec(cfg, task, &cfg.eval_file, Split::Dev, cfg.eval_limit, decoder)?;
    eval_spec.num_classes = (!task.is_regression()).then_some(train_set.num_classes);
    let eval_set = data::load(&eval_spec)?;
    hooks.note(&format!(
        "{}: tokenizing {} training rows ({}) and {} evaluation rows ({})",
        task.name(),
        train_set.len(),
        train_set.file.display(),
        eval_set.len(),
        eval_set.file.display()
    ));
    for (set, name) in [(&train_set, "train"), (&eval_set, "eval")] {
        if let Some(first) = set.skipped.first() {
            hooks.note(&format!(
                "{name}: skipped {} malformed rows of {} (first: line {}: {})",
                set.skipped.len(),
                set.file.display(),
                first.line,
                first.reason
            ));
        }
    }
    let data =
        Data { task, train: Arc::new(encoder.encode_dataset(&train_set)?), eval: encoder.encode_dataset(&eval_set)? };
    hooks.note(&format!("{}: data ready in {:.1} s", task.name(), t0.elapsed().as_secs_f64()));
    Ok(data)
}

/// The task model of a run: LoRA or B-LoRA adapters per `cfg.method`.
pub fn build_model(cfg: &RunConfig, loaded: LoadedModel, num_labels: usize, device: &Device) -> Result<TaskModel> {
    match cfg.method {
        AdapterKind::Lora => TaskModel::build(loaded, &cfg.lora, num_labels, cfg.train.seed, device),
        AdapterKind::Blora => TaskModel::build_blora(loaded, &cfg.blora, num_labels, cfg.train.seed, device),
    }
}

/// The task model that trains on `train`: [`build_model`] with one output for a regression task
/// (else the data's class count), a fresh regression head starting at the training targets'
/// mean ([`TaskModel::start_regression_at_mean`]; a resumed run then restores its own head).
pub fn build_for_data(
    cfg: &RunConfig,
    loaded: LoadedModel,
    train: &EncodedDataset,
    device: &Device,
) -> Result<TaskModel> {
    let regression = train.task.is_regression();
    let model = build_model(cfg, loaded, if regression { 1 } else { train.num_classes }, device)?;
    if let Some(scores) = train.scores().filter(|_| regression) {
        model.start_regression_at_mean(&scores)?;
    }
    Ok(model)
}

/// How [`train_and_eval`] starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Train from scratch (the output folder holds no earlier run, or it was cleared).
    Fresh,
    /// Continue from the newest good checkpoint.
    Resume,
    /// Train nothing: evaluate the newest good checkpoint (`bayeslora eval`); config.toml and
    /// metrics.jsonl are left as they are.
    Evaluate,
}

/// The files and folders a run writes into its output folder, besides `checkpoint_dir`.
const RUN_OUTPUTS: &[&str] = &[
    "config.toml",
    "metrics.jsonl",
    "results.json",
    "adapter",
    "checkpoints",
    "reliability.png",
    "reliability.svg",
    "bops.json",
    "bops.txt",
    "bops_learned.png",
    "bops_learned.svg",
];

/// The outputs of an earlier run in `cfg.output` (and its `checkpoint_dir`) that exist.
pub fn existing_outputs(cfg: &RunConfig) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = RUN_OUTPUTS.iter().map(|n| cfg.output.join(n)).collect();
    if let Some(dir) = &cfg.train.checkpoint_dir {
        paths.push(dir.clone());
    }
    paths.into_iter().filter(|p| p.exists()).collect()
}

/// Removes the outputs of an earlier run (only the files a run writes; anything else in the
/// folder stays).
pub fn clear_outputs(cfg: &RunConfig) -> Result<()> {
    for p in existing_outputs(cfg) {
        let removed = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        removed.with_context(|| format!("removing {} (--overwrite)", p.display()))?;
    }
    Ok(())
}

/// What one training run produced.
pub struct RunOutcome {
    pub label: String,
    pub results: Vec<EvalResult>,
    pub mean: Option<Predictive>,
    pub bayes: Option<Predictive>,
    pub train_seconds: f64,
    pub tokens_per_second: f64,
    pub interrupted: bool,
}

/// Trains (per `start`) and evaluates one configuration; writes into `cfg.output`.
pub fn train_and_eval(
    cfg: &RunConfig,
    label: &str,
    data: &Data,
    start: Start,
    loaded: LoadedModel,
    hooks: &mut dyn Hooks,
) -> Result<RunOutcome> {
    let mut sized = cfg.clone();
    if start != Start::Evaluate {
        if let Some(note) = sized.apply_size_defaults(loaded.hidden_size()) {
            hooks.note(&format!("note: {note}"));
        }
    }
    let cfg = &sized;
    // One rank of a data-parallel group (torchrun's variables, or `train --gpus N`)?
    let group = if start == Start::Evaluate { None } else { launch::Launch::from_env()? };
    let device = match &group {
        Some(g) if cfg.device.starts_with("cuda") => device(&format!("cuda:{}", g.local_rank))?,
        Some(g) => {
            return Err(Error::Distributed(format!(
                "WORLD_SIZE is {} but the device is `{}`: one process per GPU needs --device cuda",
                g.world_size, cfg.device
            )))
        }
        None => device(&cfg.device)?,
    };
    let model_path = loaded.dir.clone();
    let model = build_for_data(cfg, loaded, &data.train, &device)?;
    let out = &cfg.output;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut train_cfg = cfg.train.clone();
    let ckpt_dir = train_cfg.checkpoint_dir.get_or_insert_with(|| out.join("checkpoints")).clone();
    if start == Start::Evaluate {
        let (restored, opt) = train::restore(&model, data.train.clone(), &train_cfg, &ckpt_dir)?;
        if let Some(note) = &restored.note {
            hooks.note(&format!("note: {note}"));
        }
        let summary = train::TrainSummary {
            steps: restored.state.step,
            total_steps: restored.state.step,
            interrupted: false,
            final_loss: f32::NAN,
            seconds: 0.0,
            tokens: 0,
        };
        return evaluate_and_write(cfg, label, data, &model, &model_path, &device, summary, opt, hooks);
    }
    let mut comm = communicator(group.as_ref(), &device)?;
    let lead = comm.rank() == 0;
    if lead {
        let config_path = out.join("config.toml");
        std::fs::write(&config_path, cfg.to_toml()?).with_context(|| format!("writing {}", config_path.display()))?;
    }
    let resume_dir = (start == Start::Resume).then_some(ckpt_dir);
    // Rank 0 reports and writes; the other ranks train silently (a Ctrl-C on any rank stops all).
    let mut observer: Box<dyn train::Observer> = if lead {
        hooks.observer(label, &out.join("metrics.jsonl"), start == Start::Resume)
    } else {
        Box::new(train::Silent)
    };
    // Periodic evaluation (`eval_every`): accuracy and NLL of the current mean on the eval set.
    let eval_device = device.clone();
    let eval_set = &data.eval;
    let eval_batch = cfg.eval.batch_size;
    let mut periodic = move |m: &dyn train::Classifier| -> Result<(f64, f64)> {
        let mut p = ModelPredictor::point(m, &eval_device)?;
        let quick = EvalConfig { method: "periodic".into(), num_samples: 0, batch_size: eval_batch, curve: vec![] };
        let ev = eval::evaluate(&mut p, eval_set, &quick)?;
        let m = ev.results.first().map(|r| r.metrics.clone()).unwrap_or_default();
        Ok((m.acc.or(m.pearson).unwrap_or(f64::NAN), m.nll.or(m.mse).unwrap_or(f64::NAN)))
    };
    let (summary, opt) = train::run_data_parallel(
        &model,
        data.train.clone(),
        &train_cfg,
        &device,
        observer.as_mut(),
        resume_dir.as_deref(),
        Some(&mut periodic),
        comm.as_mut(),
    )?;
    drop(observer);
    if !lead {
        // Rank 0 evaluates and writes the results and the adapter.
        return Ok(RunOutcome {
            label: label.into(),
            results: Vec::new(),
            mean: None,
            bayes: None,
            train_seconds: summary.seconds,
            tokens_per_second: summary.tokens as f64 / summary.seconds.max(1e-9),
            interrupted: summary.interrupted,
        });
    }
    if summary.interrupted {
        hooks.note(&format!("{label}: interrupted at step {}; resume with --resume", summary.steps));
    }
    evaluate_and_write(cfg, label, data, &model, &model_path, &device, summary, opt, hooks)
}

/// The collectives of this process: alone, or its rank of an NCCL group (feature `nccl`).
fn communicator(group: Option<&launch::Launch>, device: &Device) -> Result<Box<dyn train::dist::Communicator>> {
    let Some(g) = group else { return Ok(Box::new(train::dist::Single)) };
    #[cfg(feature = "nccl")]
    {
        Ok(Box::new(train::dist::nccl::NcclRank::join(g, device)?))
    }
    #[cfg(not(feature = "nccl"))]
    {
        let _ = device;
        Err(Error::Distributed(format!(
            "WORLD_SIZE is {} (rank {}), but this binary was built without NCCL: build it with \
             `--features nccl` (README, \"Several GPUs\") or run one process",
            g.world_size, g.rank
        )))
    }
}

/// Evaluates the trained model (mean and posterior predictive) and writes results.json and the
/// adapter folder.
#[allow(clippy::too_many_arguments)]
fn evaluate_and_write(
    cfg: &RunConfig,
    label: &str,
    data: &Data,
    model: &TaskModel,
    model_path: &Path,
    device: &Device,
    summary: train::TrainSummary,
    opt: RunOptimizer,
    hooks: &mut dyn Hooks,
) -> Result<RunOutcome> {
    let out = &cfg.output;

    let samples = match (&opt, cfg.train.optimizer) {
        (RunOptimizer::Ivon(_), OptimizerKind::Ivon) => cfg.eval.samples,
        _ => 0,
    };
    let eval_cfg = EvalConfig {
        method: label.into(),
        num_samples: samples,
        batch_size: cfg.eval.batch_size,
        ..Default::default()
    };
    hooks.eval_begin(label, samples + 1);
    let mut predictor = match &opt {
        RunOptimizer::Ivon(ivon) => ModelPredictor::posterior(model, ivon, device, cfg.train.seed ^ 0xE7A1)?,
        _ => ModelPredictor::point(model, device)?,
    };
    let evaluation = eval::evaluate(&mut predictor, &data.eval, &eval_cfg)?;
    predictor.restore()?;
    drop(predictor);
    hooks.eval_end();
    // B-LoRA: the learned ranks and bits, and the bit operations against LoRA of the same rank.
    let bops = match &model.adapters {
        Adapters::Blora(b) => {
            let b = write_bops(&b.layers, &out.join("bops"), 32, 1.0)?;
            hooks.note(&crate::adapters::blora::render_table(&b.report));
            Some(bops_summary(&b.report, &b.learned))
        }
        Adapters::Lora(_) | Adapters::Bare => None,
    };
    let mut results = evaluation.results;
    for r in &mut results {
        if let Some(b) = &bops {
            r.info.insert("bops".into(), b.clone());
        }
        r.info.insert("model".into(), serde_json::json!(model_path.display().to_string()));
        r.info.insert("seed".into(), serde_json::json!(cfg.train.seed));
        r.info.insert("optimizer".into(), serde_json::to_value(cfg.train.optimizer)?);
        r.info.insert("train".into(), serde_json::to_value(&cfg.train)?);
        r.info.insert("method".into(), serde_json::to_value(cfg.method)?);
        match cfg.method {
            AdapterKind::Lora => r.info.insert("lora".into(), serde_json::to_value(&cfg.lora)?),
            AdapterKind::Blora => r.info.insert("blora".into(), serde_json::to_value(&cfg.blora)?),
        };
        r.info.insert("dtype".into(), serde_json::json!(cfg.dtype));
        r.info.insert("train_seconds".into(), serde_json::json!(summary.seconds));
        r.info.insert("code_version".into(), serde_json::json!(env!("CARGO_PKG_VERSION")));
    }
    write_json(&out.join("results.json"), &results)?;
    // The trained adapter as a peft folder (+ the IVON posterior sidecar): `<output>/adapter/`.
    let posterior = match &opt {
        RunOptimizer::Ivon(ivon) => Some(ivon.posterior()?),
        _ => None,
    };
    write_adapter(model, cfg, &model_path.display().to_string(), posterior.as_ref(), &out.join("adapter"))?;
    Ok(RunOutcome {
        label: label.into(),
        results,
        mean: evaluation.mean,
        bayes: evaluation.bayes,
        train_seconds: summary.seconds,
        tokens_per_second: summary.tokens as f64 / summary.seconds.max(1e-9),
        interrupted: summary.interrupted,
    })
}

/// Writes pretty JSON through a temporary file and a rename.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(value)?).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Reliability diagrams (`<stem>.png` + `.svg`) of every run's mean and posterior predictive.
pub fn plot_reliability(outcomes: &[RunOutcome], stem: &Path, title: &str, bins: usize) -> Result<Vec<PathBuf>> {
    let mut named = Vec::new();
    for o in outcomes {
        if let Some(p) = &o.mean {
            named.push((format!("{} (mean)", o.label), p.reliability(bins, eval::metrics::Binning::Torchmetrics)?));
        }
        if let Some(p) = &o.bayes {
            let k = o.results.last().map_or(0, |r| r.num_samples);
            named.push((format!("{} (K={k})", o.label), p.reliability(bins, eval::metrics::Binning::Torchmetrics)?));
        }
    }
    let panels: Vec<crate::plot::Panel<'_>> =
        named.iter().map(|(n, b)| crate::plot::Panel { name: n, bins: b }).collect();
    crate::plot::reliability_diagram(stem, title, &panels)
}
