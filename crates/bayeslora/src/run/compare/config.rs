//! The sweep file of [`super::sweep`] ([`CompareConfig`]) and how one training's [`RunConfig`]
//! is built from it: `[run]`, then the task's `run`, then the method's `run`, then task, seed,
//! model and limits.
use super::super::{merge_toml, Hooks, RunConfig};
use crate::baselines::{LaplaceConfig, MethodKind};
use crate::data::{Split, Task};
use crate::error::Context;
use crate::train::OptimizerKind;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The sweep file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompareConfig {
    /// A HF folder, a .gguf file, or an asset name (`minilm`, `smollm2`, `qwen2.5-coder-0.5b`,
    /// `qwen2.5-coder-1.5b`; resolved by the caller's [`super::SweepHooks::model_path`]).
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
pub(super) struct SweepMethod {
    pub(super) label: String,
    pub(super) kind: MethodKind,
    run: toml::Table,
    pub(super) samples: usize,
    pub(super) members: usize,
    pub(super) laplace: LaplaceConfig,
}

impl CompareConfig {
    /// Reads and validates a sweep file; notes (a `[task.x]` or `[method.x]` that will not run)
    /// go to `hooks`.
    pub fn load(path: &Path, hooks: &mut dyn Hooks) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let cfg: CompareConfig =
            toml::from_str(&text).with_context(|| format!("invalid sweep file {}", path.display()))?;
        cfg.validate(hooks).with_context(|| format!("in {}", path.display()))?;
        Ok(cfg)
    }

    fn validate(&self, hooks: &mut dyn Hooks) -> Result<()> {
        if self.tasks.is_empty() || self.seeds.is_empty() || self.methods.is_empty() {
            return Err(Error::run("tasks, seeds and methods must each list at least one entry"));
        }
        if self.members == 0 {
            return Err(Error::run("members = 0: an ensemble needs at least one member"));
        }
        for t in self.tasks.iter().chain(&self.ood_tasks) {
            Task::from_name(t).with_context(|| format!("unknown task `{t}` in the sweep file"))?;
        }
        // Fail before the first cell, not after hours of other tasks.
        for t in &self.tasks {
            if Task::from_name(t)?.standard_file(Split::Train).is_none() && !self.run.contains_key("train_file") {
                return Err(Error::run(format!(
                    "task `{t}` has no training file in data/ (data/README.md says why): drop it from \
                     `tasks`, or give `[run] train_file = \"...\"`"
                )));
            }
        }
        for name in self.task.keys() {
            if !self.tasks.contains(name) {
                hooks.note(&format!("note: [task.{name}] is defined but not in `tasks`; it will not run"));
            }
        }
        for label in self.method.keys() {
            if !self.methods.contains(label) {
                hooks.note(&format!("note: [method.{label}] is defined but not in `methods`; it will not run"));
            }
        }
        self.resolved_methods()?;
        Ok(())
    }

    pub(super) fn resolved_methods(&self) -> Result<Vec<SweepMethod>> {
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
    pub(super) fn run_config(&self, task: &str, method: &SweepMethod, seed: u64) -> Result<RunConfig> {
        let mut merged = toml::Value::try_from(RunConfig::default()).context("serializing defaults")?;
        let limits = self.task.get(task).cloned().unwrap_or_default();
        merge_toml(&mut merged, toml::Value::Table(self.run.clone()));
        merge_toml(&mut merged, toml::Value::Table(limits.run.clone()));
        merge_toml(&mut merged, toml::Value::Table(method.run.clone()));
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

    /// The shifted tasks scored for `task` (all of `ood_tasks` but the task itself).
    pub(super) fn ood_for(&self, task: &str) -> Vec<String> {
        self.ood_tasks.iter().filter(|t| t.as_str() != task).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::Quiet;
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
                CompareConfig::load(&path, &mut Quiet).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
                n += 1;
            }
        }
        assert!(n >= 10, "found only {n} sweep files in {}", dir.display());
    }

    #[test]
    fn a_task_without_training_data_is_refused_up_front() {
        let mut cfg: CompareConfig = toml::from_str(SWEEP).unwrap();
        cfg.tasks.push("qnli".into());
        let err = cfg.validate(&mut Quiet).unwrap_err().to_string();
        assert!(err.contains("`qnli` has no training file"), "{err}");
        // BoolQ trains on the seeded split of its dev set (scripts/split_boolq.py).
        let mut cfg: CompareConfig = toml::from_str(SWEEP).unwrap();
        cfg.tasks.push("boolq".into());
        cfg.validate(&mut Quiet).unwrap();
    }

    #[test]
    fn parses_and_resolves_methods_with_overrides() {
        let cfg: CompareConfig = toml::from_str(SWEEP).unwrap();
        cfg.validate(&mut Quiet).unwrap();
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
        let cfg = CompareConfig::load(&path, &mut Quiet).unwrap();
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
        cfg.validate(&mut Quiet).unwrap();
        let ms = cfg.resolved_methods().unwrap();
        let run = cfg.run_config("sst2", &ms[0], 0).unwrap();
        assert_eq!((run.train_limit, run.eval_limit), (Some(30), Some(50)));
        assert_eq!(run.train.epochs, 4, "the task's run settings apply over [run]");
        assert_eq!(cfg.run_config("sst2", &ms[1], 0).unwrap().train.epochs, 5, "the method's win over the task's");
        let other = cfg.run_config("rte", &ms[0], 0).unwrap();
        assert_eq!((other.train_limit, other.eval_limit), (Some(100), Some(50)));
        assert_eq!(other.train.epochs, 1);
        assert_eq!(cfg.ood_for("arc_easy"), vec!["arc_challenge".to_string()]);
        cfg.ood_tasks.push("arc_hard".into());
        assert!(cfg.validate(&mut Quiet).is_err(), "unknown shifted task");
    }

    #[test]
    fn rejects_unknown_methods_and_keys() {
        let mut cfg: CompareConfig = toml::from_str(SWEEP).unwrap();
        cfg.methods.push("swag".into());
        assert!(cfg.validate(&mut Quiet).is_err());
        assert!(toml::from_str::<CompareConfig>("modle = \"x\"").is_err());
    }
}
