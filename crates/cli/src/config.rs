//! Run configuration: defaults < TOML file (`--config`) < flags, validated into the library's
//! configs. Every run writes its resolved config next to its outputs (`config.toml`).
use crate::args::{OptimizerArg, RunArgs};
use anyhow::{Context, Result};
use bayeslora::adapters::blora::BLoraConfig;
use bayeslora::adapters::lora::LoraConfig;
use bayeslora::train::{OptimizerKind, TrainConfig};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Evaluation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalSettings {
    /// Posterior samples K (IVON-LoRA: 10); 0 evaluates the mean only.
    pub samples: usize,
    pub batch_size: usize,
    /// Reliability-diagram bins (ECE-15 convention of torchmetrics).
    pub bins: usize,
}
impl Default for EvalSettings {
    fn default() -> Self {
        EvalSettings { samples: 10, batch_size: 64, bins: 15 }
    }
}

/// Which adapter a run trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum AdapterKind {
    /// Plain LoRA (`[lora]`).
    #[default]
    Lora,
    /// B-LoRA: learned rank and bit-widths (`[blora]`; `--lora-r`, `--lora-alpha` and
    /// `--target-modules` set its r, alpha and targets).
    Blora,
}

/// Everything one `bayeslora train` needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    pub model: Option<PathBuf>,
    pub task: String,
    pub train_file: Option<PathBuf>,
    pub eval_file: Option<PathBuf>,
    pub train_limit: Option<usize>,
    pub eval_limit: Option<usize>,
    /// Class count of a `jsonl_text` task with integer labels (default: inferred from the
    /// training labels as 0..=k with none missing); a label at or above it is an error.
    pub num_labels: Option<usize>,
    /// Skip malformed data rows (with a count) instead of failing on the first one.
    pub skip_bad_rows: bool,
    /// Start even when the run's peak-memory estimate (`bayeslora::train::memory`) exceeds the
    /// device's memory; without it such a run is refused before the model loads.
    pub skip_memory_check: bool,
    pub max_len: usize,
    pub output: PathBuf,
    /// Clear the outputs of an earlier run in `output` before training (without it, `train`
    /// refuses a folder that holds a run unless `--resume` is given). An action, not a setting of
    /// the run: never written to the run's config.toml.
    #[serde(skip_serializing)]
    pub overwrite: bool,
    pub device: String,
    /// Dtype of the frozen weights and activations: "f32", "bf16" or "f16" (adapters and
    /// optimizer state stay f32).
    pub dtype: String,
    pub method: AdapterKind,
    pub lora: LoraConfig,
    pub blora: BLoraConfig,
    pub train: TrainConfig,
    pub eval: EvalSettings,
}

/// Optimizer defaults for LoRA runs of a few hundred to a few thousand steps.
///
/// AdamW: lr 1e-3, no weight decay (peft's usual LoRA setting; torch's default decay 1e-2 would
/// pull the adapter to zero). IVON: ivon-lora's settings (lr 0.03, ess 1e6, hess_init 1e-3,
/// weight decay 0, rescale_lr off, β2 0.99999) with a larger clip radius. Those presets are tuned
/// for 10,000 steps on a 7B model: every coordinate clips, so each weight moves at most
/// lr·clip = 3e-5 per step, and in a 250-step run MiniLM stays near chance (`specs/ivon.md`, last
/// section). Measured on the demo (mean prediction, SST-2 dev, 2-core CPU, seed 0): clip 1e-2 →
/// 76.6 % acc / ECE-15 5.6 %; clip 3e-2 → 82.8 % / 3.1 %; lr 0.1 with clip 1e-2 → 82.9 % / 4.0 %;
/// AdamW → 81.4 % / 4.1 %. So clip 3e-2: each step moves a weight at most 9e-4, close to AdamW's
/// 1e-3. For 10,000-step 7B runs use `IvonConfig::ivon_lora(task)` in a config file.
pub fn lora_train_defaults() -> TrainConfig {
    let mut t = TrainConfig::default();
    t.adamw.lr = 1e-3;
    t.adamw.weight_decay = 0.0;
    t.ivon.lr = 0.03;
    t.ivon.ess = 1e6;
    t.ivon.hess_init = 1e-3;
    t.ivon.weight_decay = 0.0;
    t.ivon.clip_radius = 3e-2;
    t.ivon.rescale_lr = false;
    t
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            model: None,
            task: "sst2".into(),
            train_file: None,
            eval_file: None,
            train_limit: None,
            eval_limit: None,
            num_labels: None,
            skip_bad_rows: false,
            skip_memory_check: false,
            max_len: 128,
            output: PathBuf::from("runs/latest"),
            overwrite: false,
            device: "cpu".into(),
            dtype: "f32".into(),
            method: AdapterKind::Lora,
            lora: LoraConfig::default(),
            blora: BLoraConfig::default(),
            train: lora_train_defaults(),
            eval: EvalSettings::default(),
        }
    }
}

/// A compute dtype by name: f32, bf16 or f16 (an unknown name is an error naming the setting).
pub fn compute_dtype(name: &str) -> Result<candle_core::DType> {
    match name {
        "f32" => Ok(candle_core::DType::F32),
        "bf16" => Ok(candle_core::DType::BF16),
        "f16" => Ok(candle_core::DType::F16),
        other => anyhow::bail!("dtype = {other:?}: use \"f32\", \"bf16\" or \"f16\""),
    }
}

impl RunConfig {
    /// The `dtype` setting as a candle dtype (see [`compute_dtype`]).
    pub fn compute_dtype(&self) -> Result<candle_core::DType> {
        compute_dtype(&self.dtype)
    }

    /// `base` (defaults or a preset), then the TOML file, then the flags.
    pub fn resolve(base: RunConfig, args: &RunArgs) -> Result<RunConfig> {
        let mut cfg = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                // Merge the file over `base` key by key through TOML values.
                let mut merged = toml::Value::try_from(&base).context("serializing defaults")?;
                let file: toml::Value = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
                merge(&mut merged, file);
                merged.try_into().with_context(|| format!("invalid settings in {}", path.display()))?
            }
            None => base,
        };
        if let Some(v) = &args.model {
            cfg.model = Some(v.clone());
        }
        if let Some(v) = &args.task {
            cfg.task = v.clone();
        }
        if let Some(v) = &args.train_file {
            cfg.train_file = Some(v.clone());
        }
        if let Some(v) = &args.eval_file {
            cfg.eval_file = Some(v.clone());
        }
        if args.train_limit.is_some() {
            cfg.train_limit = args.train_limit;
        }
        if args.eval_limit.is_some() {
            cfg.eval_limit = args.eval_limit;
        }
        if args.skip_bad_rows {
            cfg.skip_bad_rows = true;
        }
        if args.skip_memory_check {
            cfg.skip_memory_check = true;
        }
        if args.gradient_checkpointing {
            cfg.train.gradient_checkpointing = true;
        }
        if let Some(o) = args.optimizer {
            cfg.train.optimizer = match o {
                OptimizerArg::Ivon => OptimizerKind::Ivon,
                OptimizerArg::Adamw => OptimizerKind::Adamw,
                OptimizerArg::Sgd => OptimizerKind::Sgd,
            };
        }
        // --lr and --weight-decay set the chosen optimizer's (lr, weight decay).
        let t = &mut cfg.train;
        let (lr, wd) = match t.optimizer {
            OptimizerKind::Ivon => (&mut t.ivon.lr, &mut t.ivon.weight_decay),
            OptimizerKind::Adamw => (&mut t.adamw.lr, &mut t.adamw.weight_decay),
            OptimizerKind::Sgd => (&mut t.sgd.lr, &mut t.sgd.weight_decay),
        };
        if let Some(v) = args.lr {
            *lr = v;
        }
        if let Some(v) = args.weight_decay {
            *wd = v;
        }
        if let Some(v) = args.epochs {
            cfg.train.epochs = v;
        }
        if args.max_steps.is_some() {
            cfg.train.max_steps = args.max_steps;
        }
        if let Some(v) = args.batch_size {
            cfg.train.batch.batch_size = v;
        }
        if let Some(v) = args.max_len {
            cfg.max_len = v;
        }
        if let Some(v) = args.method {
            cfg.method = v;
        }
        if let Some(v) = args.lora_r {
            cfg.lora.r = v;
            cfg.blora.r = v;
        }
        if let Some(v) = args.lora_alpha {
            cfg.lora.lora_alpha = v;
            cfg.blora.lora_alpha = v;
        }
        if let Some(v) = &args.target_modules {
            let targets = Some(bayeslora::adapters::lora::TargetModules::List(v.clone()));
            cfg.lora.target_modules = targets.clone();
            cfg.blora.target_modules = targets;
        }
        if let Some(v) = args.mu {
            cfg.blora.mu = v;
        }
        if let Some(v) = args.lora_dropout {
            cfg.lora.lora_dropout = v;
            cfg.blora.lora_dropout = v;
        }
        if let Some(v) = args.warmup_steps {
            cfg.train.warmup_steps = v;
        }
        if let Some(v) = args.grad_accum {
            cfg.train.grad_accum = v;
        }
        if args.max_grad_norm.is_some() {
            cfg.train.max_grad_norm = args.max_grad_norm;
        }
        if let Some(v) = args.checkpoint_every {
            cfg.train.checkpoint_every = v;
        }
        if let Some(v) = args.eval_every {
            cfg.train.eval_every = v;
        }
        if let Some(v) = args.samples {
            cfg.eval.samples = v;
        }
        if let Some(v) = args.seed {
            cfg.train.seed = v;
            cfg.train.batch.seed = v;
        }
        if let Some(v) = &args.output {
            cfg.output = v.clone();
        }
        if args.overwrite {
            cfg.overwrite = true;
        }
        if cfg.overwrite && args.resume {
            anyhow::bail!(
                "--resume continues the run in {} and --overwrite deletes it; pass one of them",
                cfg.output.display()
            );
        }
        if let Some(v) = &args.device {
            cfg.device = v.clone();
        }
        if let Some(v) = &args.dtype {
            cfg.dtype = v.clone();
        }
        cfg.finish()?;
        Ok(cfg)
    }

    /// The last step of every way a run's settings are built (flags over a file in `train`,
    /// merged tables in `compare`): derives the settings that have one source elsewhere and
    /// validates. Today that is the gate learning rate, whose one source is `[blora] gate_lr`.
    pub fn finish(&mut self) -> Result<()> {
        self.compute_dtype()?;
        self.train.gates.lr = self.blora.gate_lr;
        self.train.validate()?;
        if self.method == AdapterKind::Blora {
            self.blora.validate()?;
        }
        Ok(())
    }

    /// Reads `<run>/config.toml` as `train` wrote it, with its paths taken relative to the run
    /// folder `run`, not to the current folder: `output` is `run` itself (the stored path was
    /// relative to wherever `train` was started), and a relative `checkpoint_dir` moves along
    /// (inside the stored output: the same place under `run`; otherwise relative to `run`).
    pub fn open_run(run: &Path) -> Result<RunConfig> {
        let path = run.join("config.toml");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}; is this a folder written by `bayeslora train`?", path.display()))?;
        let mut cfg: RunConfig = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        if let Some(dir) = cfg.train.checkpoint_dir.take() {
            cfg.train.checkpoint_dir = Some(if dir.is_absolute() {
                dir
            } else {
                match dir.strip_prefix(&cfg.output) {
                    Ok(inside) => run.join(inside),
                    Err(_) => run.join(dir),
                }
            });
        }
        cfg.output = run.to_path_buf();
        Ok(cfg)
    }

    /// The resolved config as TOML, written next to the outputs.
    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }
}

/// Recursively overlays `over` on `base` (tables merge, everything else replaces).
pub(crate) fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The HF Trainer / peft knobs as flags land in their TOML keys.
    #[test]
    fn trainer_flags_set_their_keys() -> Result<()> {
        let args = RunArgs {
            optimizer: Some(OptimizerArg::Adamw),
            lora_dropout: Some(0.05),
            weight_decay: Some(0.01),
            warmup_steps: Some(7),
            grad_accum: Some(3),
            max_grad_norm: Some(1.0),
            checkpoint_every: Some(50),
            eval_every: Some(25),
            ..Default::default()
        };
        let c = RunConfig::resolve(RunConfig::default(), &args)?;
        assert_eq!((c.lora.lora_dropout, c.blora.lora_dropout), (0.05, 0.05));
        assert_eq!(c.train.adamw.weight_decay, 0.01);
        assert_eq!(c.train.ivon.weight_decay, 0.0, "only the chosen optimizer's decay");
        let t = &c.train;
        assert_eq!((t.warmup_steps, t.grad_accum, t.checkpoint_every, t.eval_every), (7, 3, 50, 25));
        assert_eq!(t.max_grad_norm, Some(1.0));
        Ok(())
    }

    /// `dtype` comes from the defaults (f32), a config file, then `--dtype`; a wrong name fails
    /// at resolution, naming the setting.
    #[test]
    fn dtype_resolves_from_file_and_flag() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("run.toml");
        std::fs::write(&file, "dtype = \"bf16\"\n")?;
        let base = RunConfig::default();
        assert_eq!(RunConfig::resolve(base.clone(), &RunArgs::default())?.compute_dtype()?, candle_core::DType::F32);
        let from_file = RunArgs { config: Some(file.clone()), ..Default::default() };
        assert_eq!(RunConfig::resolve(base.clone(), &from_file)?.compute_dtype()?, candle_core::DType::BF16);
        let flag = RunArgs { config: Some(file), dtype: Some("f16".into()), ..Default::default() };
        assert_eq!(RunConfig::resolve(base.clone(), &flag)?.compute_dtype()?, candle_core::DType::F16);
        let bad = RunArgs { dtype: Some("bf32".into()), ..Default::default() };
        let err = RunConfig::resolve(base, &bad).unwrap_err().to_string();
        assert!(err.contains("dtype") && err.contains("bf16"), "{err}");
        Ok(())
    }
}
