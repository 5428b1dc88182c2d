//! `bayeslora compare --config configs/compare/NAME.toml`: methods × tasks × seeds from one TOML
//! file. Each finished (task, method, seed) cell is written to
//! `<out>/cells/<task>/<method>/seed<k>.json` and skipped when the sweep runs again, so a
//! stopped sweep resumes where it stopped; the aggregate tables and plots are rewritten after each
//! task (`bayeslora::baselines::sweep`).
//!
//! Within one (task, seed), every method built on AdamW (adamw, mc_dropout, temperature, laplace,
//! ensemble member 0) shares one trained model when their resolved run settings agree, so the
//! baselines cost one AdamW run plus their own post-processing; ensemble members 1..N are extra
//! runs with seeds `seed + 1000·m`. All methods train on the same rows: the task's training
//! set minus a fixed held-out split (`heldout_fraction`) that only temperature scaling and
//! Laplace's prior precision look at.
//!
//! `ood_tasks` (e.g. `["arc_challenge", "arc_easy"]` for a sweep on OBQA) scores every method's
//! predictor on the shifted tasks' test sets too: OOD detection against the in-distribution test
//! set (AUROC / AUPR / FPR95 with 1 − max p̄, entropy and mutual information) and accuracy and
//! calibration under the shift. Multiple-choice shifted sets keep only the rows with as many
//! choices as the in-distribution task (ARC: the 4-choice rows, ivon-lora's protocol), so both
//! sets share one label set and the entropy scores have one scale.
//!
//! Each method is one arm of [`run_cell`]: build its predictor (from the shared trained models),
//! then [`score`] it; a new method is a new [`MethodKind`] and a new arm.
use crate::config::merge;
use crate::steps;
use crate::ui::progress::{eval_bar, Terminal, TrainProgress};
use anyhow::{bail, Context, Result};
use bayeslora::baselines::sweep::{ood_entries, write_summary, Cell, CellCost, CellKey, OodEntry};
use bayeslora::baselines::{
    collect_logits, fit_temperature, holdout, laplace, EnsemblePredictor, LaplaceConfig, McDropoutPredictor,
    MethodKind, TemperaturePredictor,
};
use bayeslora::data::{self, ChoiceFilter, EncodedDataset, Format, Split, Task, TextEncoder};
use bayeslora::eval::ModelPredictor;
use bayeslora::eval::{self, metrics::Binning, EvalConfig, Evaluation, Predictor};
use bayeslora::models::{Backbone, LoadedModel};
use bayeslora::run::{self, AdapterKind, RunConfig};
use bayeslora::train::{self, Optimizer, OptimizerKind, TaskModel};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

/// The sweep file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompareConfig {
    /// A HF folder, a .gguf file, or an asset name (`minilm`, `smollm2`, `qwen2.5-coder-0.5b`,
    /// `qwen2.5-coder-1.5b`).
    pub model: String,
    pub tasks: Vec<String>,
    pub seeds: Vec<u64>,
    /// Method labels: a kind's name (`adamw`, `ivon`, `mc_dropout`, `ensemble`, `temperature`,
    /// `laplace`, and `base`: the untrained base, a decoder's zero-shot accuracy) or any label
    /// defined in `[method.<label>]` with a `kind`.
    pub methods: Vec<String>,
    /// Output folder of the sweep.
    pub out: PathBuf,
    pub train_limit: Option<usize>,
    /// Rows of each test set (the task's and the shifted ones); `None`: all.
    pub eval_limit: Option<usize>,
    /// Shifted test sets (their dev split) every method is also scored on, for OOD detection
    /// against the in-distribution test set, e.g. `["arc_challenge", "arc_easy"]` after OBQA.
    pub ood_tasks: Vec<String>,
    /// K for IVON, MC dropout and Laplace.
    pub samples: usize,
    /// Ensemble members N (its K).
    pub members: usize,
    /// Share of the training rows held out for temperature / Laplace tuning.
    pub heldout_fraction: f64,
    pub laplace: LaplaceConfig,
    /// Settings of every cell, as in a `bayeslora train --config` file (`max_len`, `[lora]`,
    /// `[train]`, `[eval]`, `device`); `model`, `task`, limits and `train.seed` come from here.
    pub run: toml::Table,
    /// Per-method overrides.
    pub method: BTreeMap<String, MethodEntry>,
    /// Per-task data limits, e.g. `[task.rte] train_limit = 600` (pairs cost ~3× a sentence).
    pub task: BTreeMap<String, TaskEntry>,
    /// The model's hidden size once the sweep has loaded it, for IVON's size defaults
    /// ([`RunConfig::apply_size_defaults`]); not a setting.
    #[serde(skip)]
    pub hidden_size: Option<usize>,
}

/// `[task.<name>]`: data limits of one task (over the sweep's `train_limit` / `eval_limit`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TaskEntry {
    pub train_limit: Option<usize>,
    /// Rows of the task's test set and of the shifted sets scored against it.
    pub eval_limit: Option<usize>,
    /// Training settings of this task over `[run]` and under the method's, e.g.
    /// `[task.winogrande_s.run.train] epochs = 4` (a small training set that needs more passes).
    /// `max_len` and the data settings stay the sweep's.
    pub run: toml::Table,
}

impl Default for CompareConfig {
    fn default() -> Self {
        CompareConfig {
            model: "minilm".into(),
            tasks: vec!["sst2".into()],
            seeds: vec![0],
            methods: MethodKind::ALL.iter().map(|m| m.name().to_string()).collect(),
            out: PathBuf::from("runs/compare"),
            train_limit: None,
            eval_limit: None,
            ood_tasks: Vec::new(),
            samples: 10,
            members: 5,
            heldout_fraction: 0.1,
            laplace: LaplaceConfig::default(),
            run: toml::Table::new(),
            method: BTreeMap::new(),
            task: BTreeMap::new(),
            hidden_size: None,
        }
    }
}

/// `[method.<label>]`: what a label means and what it changes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MethodEntry {
    /// The method kind (default: the label itself).
    pub kind: Option<MethodKind>,
    /// Run settings merged over the sweep's `[run]` (e.g. `[method.ivon.run.train.ivon] lr = 0.05`).
    /// Data settings (`max_len`, limits) stay the sweep's: the data are encoded once per task.
    pub run: toml::Table,
    pub samples: Option<usize>,
    pub members: Option<usize>,
    pub laplace: Option<LaplaceConfig>,
}

/// A resolved method of the sweep.
#[derive(Debug, Clone)]
struct SweepMethod {
    label: String,
    kind: MethodKind,
    run: toml::Table,
    samples: usize,
    members: usize,
    laplace: LaplaceConfig,
}

impl CompareConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let cfg: CompareConfig =
            toml::from_str(&text).with_context(|| format!("invalid sweep file {}", path.display()))?;
        cfg.validate().with_context(|| format!("in {}", path.display()))?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        if self.tasks.is_empty() || self.seeds.is_empty() || self.methods.is_empty() {
            bail!("tasks, seeds and methods must each list at least one entry");
        }
        if self.members == 0 {
            bail!("members = 0: an ensemble needs at least one member");
        }
        for t in self.tasks.iter().chain(&self.ood_tasks) {
            Task::from_name(t).with_context(|| format!("unknown task `{t}` in the sweep file"))?;
        }
        // Fail before the first cell, not after hours of other tasks.
        for t in &self.tasks {
            if Task::from_name(t)?.standard_file(Split::Train).is_none() && !self.run.contains_key("train_file") {
                bail!(
                    "task `{t}` has no training file in data/ (data/README.md says why): drop it from \
                     `tasks`, or give `[run] train_file = \"...\"`"
                );
            }
        }
        for name in self.task.keys() {
            if !self.tasks.contains(name) {
                eprintln!("note: [task.{name}] is defined but not in `tasks`; it will not run");
            }
        }
        for label in self.method.keys() {
            if !self.methods.contains(label) {
                eprintln!("note: [method.{label}] is defined but not in `methods`; it will not run");
            }
        }
        self.resolved_methods()?;
        Ok(())
    }

    fn resolved_methods(&self) -> Result<Vec<SweepMethod>> {
        self.methods
            .iter()
            .map(|label| {
                let entry = self.method.get(label).cloned().unwrap_or_default();
                let kind = match entry.kind {
                    Some(k) => k,
                    None => MethodKind::from_name(label)
                        .with_context(|| format!("method `{label}` needs `[method.{label}] kind = ...`"))?,
                };
                let laplace = entry.laplace.unwrap_or_else(|| self.laplace.clone());
                laplace.validate()?;
                Ok(SweepMethod {
                    label: label.clone(),
                    kind,
                    run: entry.run,
                    samples: entry.samples.unwrap_or(self.samples),
                    members: entry.members.unwrap_or(self.members),
                    laplace,
                })
            })
            .collect()
    }

    /// The run settings of one training: `[run]`, then the task's `run`, then the method's `run`,
    /// then task, seed, model and limits. AdamW-based kinds train with AdamW whatever the file says.
    fn run_config(&self, task: &str, method: &SweepMethod, seed: u64) -> Result<RunConfig> {
        let mut merged = toml::Value::try_from(RunConfig::default()).context("serializing defaults")?;
        let limits = self.task.get(task).cloned().unwrap_or_default();
        merge(&mut merged, toml::Value::Table(self.run.clone()));
        merge(&mut merged, toml::Value::Table(limits.run.clone()));
        merge(&mut merged, toml::Value::Table(method.run.clone()));
        let mut cfg: RunConfig =
            merged.try_into().with_context(|| format!("invalid run settings for method `{}`", method.label))?;
        cfg.model = Some(PathBuf::from(&self.model));
        cfg.task = task.into();
        cfg.train_limit = limits.train_limit.or(self.train_limit);
        cfg.eval_limit = limits.eval_limit.or(self.eval_limit);
        cfg.train.seed = seed;
        cfg.train.batch.seed = seed;
        cfg.train.optimizer = if method.kind.uses_ivon() { OptimizerKind::Ivon } else { OptimizerKind::Adamw };
        cfg.train.checkpoint_dir = None;
        cfg.apply_size_defaults(self.hidden_size);
        cfg.finish().with_context(|| format!("run settings of method `{}` on {task}", method.label))?;
        Ok(cfg)
    }
}

/// A trained model of the sweep, shared by the methods whose run settings match.
struct Trained {
    model: TaskModel,
    opt: Optimizer,
    seconds: f64,
}

/// Trained models of one (task, seed), keyed by their resolved run settings.
struct Cache<'d> {
    models: HashMap<String, Trained>,
    train: Arc<EncodedDataset>,
    data_eval: &'d EncodedDataset,
    bases: &'d mut Bases,
}

/// The frozen base models of the sweep, loaded once per (model, device, dtype) and cloned for
/// each run (clones share the weights): a GGUF is read and dequantized once per sweep, not once
/// per trained model.
#[derive(Default)]
struct Bases {
    loaded: HashMap<String, LoadedModel>,
}

impl Bases {
    fn get(&mut self, cfg: &RunConfig) -> Result<LoadedModel> {
        let key = format!("{:?}|{}|{}", cfg.model, cfg.device, cfg.dtype);
        if let Some(m) = self.loaded.get(&key) {
            return Ok(m.clone());
        }
        let m = steps::load_model(cfg)?;
        self.loaded.insert(key, m.clone());
        Ok(m)
    }
}

impl Cache<'_> {
    /// Trains `cfg` unless an identical run is cached; returns its key.
    fn ensure(&mut self, cfg: &RunConfig, label: &str) -> Result<String> {
        let key = cfg.to_toml()?;
        if self.models.contains_key(&key) {
            return Ok(key);
        }
        steps::check_memory(cfg)?;
        let loaded = self.bases.get(cfg)?;
        let device = run::device(&cfg.device)?;
        let num_labels = if self.data_eval.task.is_regression() { 1 } else { self.train.num_classes };
        let model = run::build_model(cfg, loaded, num_labels, &device)?;
        let mut progress = TrainProgress::new(label);
        let t0 = Instant::now();
        let (summary, opt) = train::run(&model, self.train.clone(), &cfg.train, &device, &mut progress, None, None)?;
        if summary.interrupted {
            bail!(
                "{label}: interrupted at step {}; finished cells are kept, run the sweep again to resume",
                summary.steps
            );
        }
        self.models.insert(key.clone(), Trained { model, opt, seconds: t0.elapsed().as_secs_f64() });
        Ok(key)
    }

    fn get(&self, key: &str) -> Result<&Trained> {
        self.models.get(key).context("invariant: trained model was just cached")
    }
}

/// Everything one cell's evaluation needs.
struct TaskData {
    train: Arc<EncodedDataset>,
    heldout: EncodedDataset,
    eval: EncodedDataset,
    /// The shifted test sets, by task name.
    ood: Vec<(String, EncodedDataset)>,
}

/// One predictor scored on the test set and the shifted sets.
struct Scored {
    ev: Evaluation,
    ood: Vec<OodEntry>,
    eval_seconds: f64,
    ood_seconds: f64,
}

/// Evaluates `p` on the task's test set, then (same K) on each shifted set for OOD detection.
fn score<P: Predictor + ?Sized>(p: &mut P, td: &TaskData, cfg: &EvalConfig) -> Result<Scored> {
    let bar = eval_bar("eval", 1);
    let t0 = Instant::now();
    let ev = eval::evaluate(p, &td.eval, cfg)?;
    let eval_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut ood = Vec::new();
    let quiet = EvalConfig { curve: Vec::new(), ..cfg.clone() };
    for (name, set) in &td.ood {
        let shifted = eval::evaluate(p, set, &quiet)?;
        ood.extend(ood_entries(name, &ev, &shifted)?);
    }
    bar.finish_and_clear();
    Ok(Scored { ev, ood, eval_seconds, ood_seconds: t1.elapsed().as_secs_f64() })
}

/// The shifted test sets of `ood_tasks` for an in-distribution set `id` (dev splits, prompt
/// format for decoders, multiple-choice rows with `id`'s choice count).
fn load_ood(
    cfg: &CompareConfig,
    run: &RunConfig,
    encoder: &TextEncoder,
    decoder: bool,
    id: &EncodedDataset,
) -> Result<Vec<(String, EncodedDataset)>> {
    let mut out = Vec::new();
    for name in cfg.ood_tasks.iter().filter(|t| t.as_str() != id.task.name()) {
        let task = Task::from_name(name)?;
        // The task's dev split as `run` reads its own (limit, bad rows, prompt format).
        let mut spec = run::data_spec(run, task, &None, Split::Dev, run.eval_limit, decoder)?;
        if task.is_multiple_choice() && id.task.is_multiple_choice() {
            spec.choices = ChoiceFilter::Exactly(id.num_classes);
        }
        let set = data::load(&spec).with_context(|| format!("loading the shifted test set `{name}`"))?;
        let enc = encoder.encode_dataset(&set)?;
        if enc.num_classes != id.num_classes || enc.task.is_regression() {
            bail!(
                "shifted test set `{name}` ({}) has {} classes, the in-distribution task `{}` has {}; \
                 OOD detection needs one label set",
                spec.path.display(),
                enc.num_classes,
                id.task.name(),
                id.num_classes
            );
        }
        if set.filtered > 0 {
            eprintln!(
                "{name}: kept the {} rows with {} choices ({} others left out)",
                enc.len(),
                id.num_classes,
                set.filtered
            );
        }
        out.push((name.clone(), enc));
    }
    Ok(out)
}

pub fn run(args: crate::args::CompareArgs) -> Result<ExitCode> {
    let mut cfg = CompareConfig::load(&args.config)?;
    if let Some(out) = &args.out {
        cfg.out = out.clone();
    }
    if let Some(device) = &args.device {
        run::device(device)?;
        cfg.run.insert("device".into(), toml::Value::String(device.clone()));
    }
    if !args.aggregate_only {
        sweep(&cfg)?;
    }
    let (summary, written) = write_summary(&cfg.out, &cfg.model)?;
    println!("\n{}", summary.markdown());
    for p in written {
        println!("wrote {}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs every missing cell of the sweep (the aggregate is written after each task).
pub fn sweep(cfg: &CompareConfig) -> Result<()> {
    let mut cfg = cfg.clone();
    let cfg = &mut cfg;
    let methods = cfg.resolved_methods()?;
    std::fs::create_dir_all(&cfg.out).with_context(|| format!("creating {}", cfg.out.display()))?;
    std::fs::write(cfg.out.join("compare.toml"), toml::to_string_pretty(cfg)?)?;
    let mut bases = Bases::default();
    for task in &cfg.tasks {
        let todo: Vec<(u64, &SweepMethod)> = cfg
            .seeds
            .iter()
            .flat_map(|&s| methods.iter().map(move |m| (s, m)))
            .filter(|(s, m)| !CellKey::new(task, &m.label, *s).is_done_with(&cfg.out, &ood_for(cfg, task)))
            .collect();
        let total = cfg.seeds.len() * methods.len();
        eprintln!("{task}: {} of {total} cells to run ({} already done)", todo.len(), total - todo.len());
        if todo.is_empty() {
            continue;
        }
        // Data once per task, with the first method's settings (max_len, device).
        let base = cfg.run_config(task, &methods[0], cfg.seeds[0])?;
        let loaded = bases.get(&base)?;
        if cfg.hidden_size.is_none() {
            cfg.hidden_size = loaded.hidden_size();
            let mut probe = base.clone();
            probe.train.optimizer = bayeslora::train::OptimizerKind::Ivon;
            if let Some(note) = probe.apply_size_defaults(cfg.hidden_size) {
                eprintln!("note: {note} (methods whose file leaves IVON's clip_radius and ess unset)");
            }
        }
        let encoder = TextEncoder::new(loaded.tokenizer()?.clone(), base.max_len)?;
        let data = run::load_data(&base, &encoder, &loaded, &mut Terminal::default())?;
        let decoder = matches!(loaded.backbone, Backbone::Llama(_));
        drop(loaded);
        let ood = load_ood(cfg, &base, &encoder, decoder, &data.eval)?;
        let (train_rows, heldout) = holdout(&data.train, cfg.heldout_fraction, 0)?;
        let td = TaskData { train: Arc::new(train_rows), heldout, eval: data.eval, ood };
        eprintln!("{task}: {} train / {} held-out / {} eval rows", td.train.len(), td.heldout.len(), td.eval.len());
        for (name, set) in &td.ood {
            eprintln!("{task}: shifted test set {name}: {} rows", set.len());
        }
        for &seed in &cfg.seeds {
            let mut cache =
                Cache { models: HashMap::new(), train: td.train.clone(), data_eval: &td.eval, bases: &mut bases };
            for (_, m) in todo.iter().filter(|(s, _)| *s == seed) {
                let t0 = Instant::now();
                let cell = run_cell(cfg, task, m, seed, &td, &mut cache)?;
                let path = cell.write(&cfg.out)?;
                eprintln!(
                    "{task}/{}/seed{seed}: done in {:.0} s → {}",
                    m.label,
                    t0.elapsed().as_secs_f64(),
                    path.display()
                );
            }
        }
        write_summary(&cfg.out, &cfg.model)?;
    }
    Ok(())
}

/// The shifted tasks scored for `task` (all of `ood_tasks` but the task itself).
fn ood_for(cfg: &CompareConfig, task: &str) -> Vec<String> {
    cfg.ood_tasks.iter().filter(|t| t.as_str() != task).cloned().collect()
}

/// The AdamW run that AdamW-based methods of this (task, seed) share.
fn adamw_key(
    cfg: &CompareConfig,
    task: &str,
    m: &SweepMethod,
    seed: u64,
    cache: &mut Cache<'_>,
) -> Result<(String, f64)> {
    let run = cfg.run_config(task, m, seed)?;
    let key = cache.ensure(&run, &format!("{}/s{seed}", m.label))?;
    let secs = cache.get(&key)?.seconds;
    Ok((key, secs))
}

fn run_cell(
    cfg: &CompareConfig,
    task: &str,
    m: &SweepMethod,
    seed: u64,
    td: &TaskData,
    cache: &mut Cache<'_>,
) -> Result<Cell> {
    let run = cfg.run_config(task, m, seed)?;
    let device = run::device(&run.device)?;
    let eval_cfg = |k: usize| EvalConfig {
        method: m.label.clone(),
        num_samples: k,
        batch_size: run.eval.batch_size,
        ..Default::default()
    };
    let mut params = serde_json::json!({
        "kind": m.kind,
        "model": cfg.model,
        "train": run.train,
        "method": run.method,
        "lora": run.lora,
        "max_len": run.max_len,
        "train_rows": td.train.len(),
        "heldout_rows": td.heldout.len(),
    });
    let sample_seed = seed ^ 0xE7A1;
    // Each arm builds the method's predictor and scores it; returns (scores, train s, fit s).
    let (scored, train_seconds, fit_seconds) = match m.kind {
        MethodKind::Base => {
            let loaded = cache.bases.get(&run)?;
            let num_labels = if td.eval.task.is_regression() { 1 } else { td.train.num_classes };
            let model = run::build_model(&run, loaded, num_labels, &device)?;
            let mut p = ModelPredictor::point(&model, &device)?;
            (score(&mut p, td, &eval_cfg(0))?, 0.0, 0.0)
        }
        MethodKind::Adamw => {
            let (key, secs) = adamw_key(cfg, task, m, seed, cache)?;
            let mut p = ModelPredictor::point(&cache.get(&key)?.model, &device)?;
            (score(&mut p, td, &eval_cfg(0))?, secs, 0.0)
        }
        MethodKind::Ivon => {
            let (key, secs) = adamw_key(cfg, task, m, seed, cache)?;
            let t = cache.get(&key)?;
            let Optimizer::Ivon(ivon) = &t.opt else { bail!("invariant: IVON cell trained with IVON") };
            let mut p = ModelPredictor::posterior(&t.model, ivon, &device, sample_seed)?;
            let r = score(&mut p, td, &eval_cfg(m.samples))?;
            p.restore()?;
            (r, secs, 0.0)
        }
        MethodKind::McDropout => {
            let (key, secs) = adamw_key(cfg, task, m, seed, cache)?;
            params["dropout"] = serde_json::json!({
                "lora_dropout": run.lora.lora_dropout,
                "backbone": "Ctx::train: BERT hidden/attention/classifier dropouts as in training (none for Llama)",
            });
            if run.lora.lora_dropout <= 0.0 && td.eval.format == Format::Prompt {
                bail!("mc_dropout on a decoder samples only the LoRA dropout; set [run.lora] lora_dropout > 0");
            }
            let mut p = McDropoutPredictor::new(&cache.get(&key)?.model, &device, sample_seed);
            (score(&mut p, td, &eval_cfg(m.samples))?, secs, 0.0)
        }
        MethodKind::Temperature => {
            let (key, secs) = adamw_key(cfg, task, m, seed, cache)?;
            let t0 = Instant::now();
            let mut point = ModelPredictor::point(&cache.get(&key)?.model, &device)?;
            let (logits, mask, labels) = collect_logits(&mut point, &td.heldout, run.eval.batch_size)?;
            let temperature = fit_temperature(&logits, &mask, &labels, td.heldout.num_classes)?;
            let fit = t0.elapsed().as_secs_f64();
            params["temperature"] = serde_json::json!(temperature);
            let mut p = TemperaturePredictor { inner: point, temperature };
            (score(&mut p, td, &eval_cfg(0))?, secs, fit)
        }
        MethodKind::Laplace => {
            let (key, secs) = adamw_key(cfg, task, m, seed, cache)?;
            let t = cache.get(&key)?;
            let t0 = Instant::now();
            let fit = laplace::fit(&t.model, &td.train, &td.heldout, &m.laplace, &device, sample_seed)?;
            let fit_seconds = t0.elapsed().as_secs_f64();
            eprintln!(
                "{task}/{}/seed{seed}: Fisher on {} rows, prior precision {:e} (held-out NLL {:?}) in {fit_seconds:.0} s",
                m.label, fit.fisher_examples, fit.prior_precision, fit.heldout_nll,
            );
            params["laplace"] = serde_json::to_value(&fit)?;
            params["laplace_config"] = serde_json::to_value(&m.laplace)?;
            params["laplace_seconds"] = serde_json::json!(fit_seconds);
            let mut p = fit.predictor(&t.model, &device, sample_seed)?;
            let r = score(&mut p, td, &eval_cfg(m.samples))?;
            p.restore()?;
            (r, secs, fit_seconds)
        }
        MethodKind::Ensemble => {
            let mut keys = Vec::new();
            let mut secs = 0.0;
            let member_seeds: Vec<u64> = (0..m.members as u64).map(|i| seed.wrapping_add(1000 * i)).collect();
            for &s in &member_seeds {
                let (k, t) = adamw_key(cfg, task, m, s, cache)?;
                keys.push(k);
                secs += t;
            }
            params["member_seeds"] = serde_json::json!(member_seeds);
            let r = {
                let members: Vec<Box<dyn Predictor + '_>> = keys
                    .iter()
                    .map(|k| -> Result<Box<dyn Predictor + '_>> {
                        Ok(Box::new(ModelPredictor::point(&cache.get(k)?.model, &device)?))
                    })
                    .collect::<Result<_>>()?;
                let mut p = EnsemblePredictor::new(members)?;
                score(&mut p, td, &eval_cfg(m.members))?
            };
            // Members 1.. are only the ensemble's: free them (member 0 is the shared AdamW run).
            for k in keys.iter().skip(1) {
                cache.models.remove(k);
            }
            (r, secs, 0.0)
        }
    };
    if run.method == AdapterKind::Blora {
        let (key, _) = adamw_key(cfg, task, m, seed, cache)?;
        // BOPs at an fp32 base, as `bayeslora report bops` prints by default.
        let model = &cache.get(&key)?.model;
        let learned = model.adapters.blora().context("a B-LoRA method trained no B-LoRA layers")?.learned()?;
        let report = bayeslora::adapters::blora::bops_report(&learned, 32, 1.0)?;
        params["bops"] = run::bops_summary(&report, &learned);
    }
    let Scored { ev, ood, eval_seconds, ood_seconds } = scored;
    let cost = CellCost {
        train_seconds,
        fit_seconds,
        eval_seconds,
        ood_eval_seconds: ood_seconds,
        eval: ev.cost(td.eval.len()),
    };
    if let Some(r) = cost.eval.ratio() {
        eprintln!(
            "{task}/{}/seed{seed}: single pass {:.2} s, {} sampled passes {:.2} s (ratio {r:.2} of K × single)",
            m.label, cost.eval.single_pass_seconds, cost.eval.num_samples, cost.eval.sample_passes_seconds
        );
    }
    let headline = ev.bayes.as_ref().or(ev.mean.as_ref());
    let reliability = headline.map(|p| p.reliability(run.eval.bins, Binning::Torchmetrics)).transpose()?;
    let mut results = ev.results;
    for r in &mut results {
        r.info.insert("model".into(), serde_json::json!(cfg.model));
        r.info.insert("seed".into(), serde_json::json!(seed));
        r.info.insert("method_kind".into(), serde_json::to_value(m.kind)?);
        r.info.insert("dtype".into(), serde_json::json!(run.dtype));
        r.info.insert("train_seconds".into(), serde_json::json!(train_seconds));
        r.info.insert("code_version".into(), serde_json::json!(env!("CARGO_PKG_VERSION")));
    }
    Ok(Cell {
        task: task.into(),
        method: m.label.clone(),
        kind: m.kind,
        seed,
        results,
        reliability,
        params,
        train_seconds,
        eval_seconds,
        ood,
        cost: Some(cost),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SWEEP: &str = r#"
model = "minilm"
tasks = ["sst2"]
seeds = [0, 1]
methods = ["adamw", "ivon_fast", "ensemble"]
members = 3
[run]
max_len = 32
[run.train]
epochs = 1
[run.train.adamw]
lr = 1e-3
[method.ivon_fast]
kind = "ivon"
samples = 4
[method.ivon_fast.run.train.ivon]
lr = 0.1
"#;

    #[test]
    fn every_shipped_sweep_file_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/compare");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                CompareConfig::load(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                n += 1;
            }
        }
        assert!(n >= 10, "found only {n} sweep files in {}", dir.display());
    }

    #[test]
    fn a_task_without_training_data_is_refused_up_front() {
        let mut cfg: CompareConfig = toml::from_str(SWEEP).unwrap();
        cfg.tasks.push("qnli".into());
        let err = format!("{:#}", cfg.validate().unwrap_err());
        assert!(err.contains("`qnli` has no training file"), "{err}");
        // BoolQ trains on the seeded split of its dev set (scripts/split_boolq.py).
        let mut cfg: CompareConfig = toml::from_str(SWEEP).unwrap();
        cfg.tasks.push("boolq".into());
        cfg.validate().unwrap();
    }

    #[test]
    fn parses_and_resolves_methods_with_overrides() {
        let cfg: CompareConfig = toml::from_str(SWEEP).unwrap();
        cfg.validate().unwrap();
        let ms = cfg.resolved_methods().unwrap();
        assert_eq!(ms[1].kind, MethodKind::Ivon);
        assert_eq!(ms[1].samples, 4);
        assert_eq!(ms[2].members, 3);
        let run = cfg.run_config("sst2", &ms[1], 7).unwrap();
        assert_eq!(run.train.ivon.lr, 0.1);
        assert_eq!(run.train.optimizer, OptimizerKind::Ivon);
        assert_eq!((run.train.seed, run.train.batch.seed), (7, 7));
        assert_eq!(run.max_len, 32);
        let a = cfg.run_config("sst2", &ms[0], 7).unwrap();
        assert_eq!(a.train.optimizer, OptimizerKind::Adamw);
        assert_eq!(a.train.adamw.lr, 1e-3);
        // the ensemble's member 0 is the AdamW run: same settings, same cache key
        let e = cfg.run_config("sst2", &ms[2], 7).unwrap();
        assert_eq!(a.to_toml().unwrap(), e.to_toml().unwrap());
    }

    #[test]
    fn blora_gate_lr_reaches_the_gate_optimizer() {
        // `[run.blora] gate_lr` is the one source of the gates' learning rate; compare once
        // trained every B-LoRA cell at the default 0.01 whatever the file said.
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/compare/minilm_blora_long.toml");
        let cfg = CompareConfig::load(&path).unwrap();
        let ms = cfg.resolved_methods().unwrap();
        let blora = ms.iter().find(|m| m.label == "blora_mu1").unwrap();
        let run = cfg.run_config("mrpc", blora, 0).unwrap();
        assert_eq!((run.blora.gate_lr, run.train.gates.lr, run.blora.mu), (0.01, 0.01, 1.0));
        let mut other = cfg.clone();
        other.run.insert("blora".into(), toml::toml! { gate_lr = 0.2 }.into());
        let run = other.run_config("mrpc", blora, 0).unwrap();
        assert_eq!((run.blora.gate_lr, run.train.gates.lr), (0.2, 0.2), "the file's value, not the default");
        assert_eq!(run.train.epochs, 10, "the task's epochs");
    }

    #[test]
    fn ood_tasks_and_per_task_limits() {
        let mut cfg: CompareConfig = toml::from_str(&format!(
            "ood_tasks = [\"arc_challenge\", \"arc_easy\"]\ntrain_limit = 100\neval_limit = 50\n{SWEEP}\n[task.sst2]\ntrain_limit = 30\n[task.sst2.run.train]\nepochs = 4\n[method.ivon_fast.run.train]\nepochs = 5\n"
        ))
        .unwrap();
        cfg.validate().unwrap();
        let ms = cfg.resolved_methods().unwrap();
        let run = cfg.run_config("sst2", &ms[0], 0).unwrap();
        assert_eq!((run.train_limit, run.eval_limit), (Some(30), Some(50)));
        assert_eq!(run.train.epochs, 4, "the task's run settings apply over [run]");
        assert_eq!(cfg.run_config("sst2", &ms[1], 0).unwrap().train.epochs, 5, "the method's win over the task's");
        let other = cfg.run_config("rte", &ms[0], 0).unwrap();
        assert_eq!((other.train_limit, other.eval_limit), (Some(100), Some(50)));
        assert_eq!(other.train.epochs, 1);
        assert_eq!(ood_for(&cfg, "arc_easy"), vec!["arc_challenge".to_string()]);
        cfg.ood_tasks.push("arc_hard".into());
        assert!(cfg.validate().is_err(), "unknown shifted task");
    }

    #[test]
    fn rejects_unknown_methods_and_keys() {
        let mut cfg: CompareConfig = toml::from_str(SWEEP).unwrap();
        cfg.methods.push("swag".into());
        assert!(cfg.validate().is_err());
        assert!(toml::from_str::<CompareConfig>("modle = \"x\"").is_err());
    }

    /// End to end on the real MiniLM (skipped when the asset is absent): 64 training rows, 3
    /// steps, every method, then a second run that must skip every cell.
    #[test]
    #[ignore = "slow: trains MiniLM four times (~1 min on 2 cores); cargo test -p bayeslora-cli -- --ignored"]
    fn tiny_sweep_on_minilm_runs_and_resumes() {
        let model = crate::assets::dir().join(crate::assets::MINILM.dest).join(crate::assets::MINILM.inner);
        if !model.exists() {
            eprintln!("skipping: {} not found (run scripts/fetch-assets.sh)", model.display());
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut cfg: CompareConfig = toml::from_str(
            r#"
tasks = ["rte"]
seeds = [0]
train_limit = 64
eval_limit = 24
samples = 2
members = 2
[laplace]
prior_precisions = [1e2, 1e6]
max_examples = 8
tune_samples = 2
[run]
max_len = 48
[run.lora]
lora_dropout = 0.1
[run.train]
max_steps = 3
[run.train.batch]
batch_size = 8
"#,
        )
        .unwrap();
        cfg.model = model.display().to_string();
        cfg.out = dir.path().to_path_buf();
        sweep(&cfg).unwrap();
        let cells = bayeslora::baselines::sweep::read_cells(dir.path()).unwrap();
        assert_eq!(cells.len(), 6);
        let ens = cells.iter().find(|c| c.kind == MethodKind::Ensemble).unwrap();
        assert_eq!(ens.headline().unwrap().num_samples, 2);
        let temp = cells.iter().find(|c| c.kind == MethodKind::Temperature).unwrap();
        assert!(temp.params["temperature"].as_f64().unwrap() > 0.0);
        // resume: nothing left to do, files untouched
        let before = std::fs::metadata(ens.key().path(dir.path())).unwrap().modified().unwrap();
        sweep(&cfg).unwrap();
        let after = std::fs::metadata(ens.key().path(dir.path())).unwrap().modified().unwrap();
        assert_eq!(before, after);
        assert!(dir.path().join("summary.md").exists());
        assert!(dir.path().join("plots/k_curve_rte.png").exists());
    }
}
