//! A run's whole configuration, [`RunConfig`]: model, task, data, adapter (LoRA or B-LoRA),
//! training and evaluation, as one serde struct that mirrors the run's TOML file. Every run writes
//! it resolved next to its outputs (`config.toml`), and [`RunConfig::open_run`] reads it back.
//! Flags and files are merged into it by the caller (the CLI: defaults < TOML < flags); every way
//! of building one ends in [`RunConfig::finish`], which derives and validates.
//!
//! ```
//! use bayeslora::run::{AdapterKind, RunConfig};
//! let mut cfg = RunConfig { method: AdapterKind::Blora, ..Default::default() };
//! cfg.blora.gate_lr = 0.05;
//! cfg.finish().unwrap();
//! assert_eq!(cfg.train.gates.lr, 0.05);
//! assert!(cfg.to_toml().unwrap().contains("method = \"blora\""));
//! ```
use crate::adapters::blora::BLoraConfig;
use crate::adapters::lora::LoraConfig;
use crate::error::Context;
use crate::train::TrainConfig;
use crate::{Error, Result};
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterKind {
    /// Plain LoRA (`[lora]`).
    #[default]
    Lora,
    /// B-LoRA: learned rank and bit-widths (`[blora]`).
    Blora,
}

/// Everything one training run needs (`bayeslora train`, each run of `demo` and `compare`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// The model as given: a HF folder, a .gguf file, or a name the caller resolves (the CLI's
    /// asset names, `minilm`, …). The run's steps take the resolved path.
    pub model: Option<PathBuf>,
    pub task: String,
    pub train_file: Option<PathBuf>,
    pub eval_file: Option<PathBuf>,
    pub train_limit: Option<usize>,
    pub eval_limit: Option<usize>,
    /// Class count of a `jsonl_text` task with integer labels (default: inferred from the
    /// training labels as 0..=k with none missing); a label at or above it is an error.
    pub num_labels: Option<usize>,
    /// Decoders: one label word per class, scored at the prompt's last position (a `jsonl_text`
    /// task needs them, e.g. `[" no", " yes"]`; a GLUE task has its own, see
    /// `Task::decoder_template`). Encoders ignore them.
    pub label_words: Vec<String>,
    /// Decoders: the prompt of a `jsonl_text` row, with `{text}` and `{text_pair}` (default
    /// `"{text}\nAnswer:"`, with the pair on its own line when there is one).
    pub template: Option<String>,
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
    /// Let IVON's step and noise follow the model's width ([`RunConfig::apply_size_defaults`]):
    /// on by default; off keeps `train.ivon` exactly as written.
    pub ivon_size_defaults: bool,
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

/// Hidden size from which a model counts as large for IVON's defaults.
pub const IVON_LARGE_HIDDEN: usize = 1024;
/// IVON's (clip_radius, ess) on large models, replacing the small-model (3e-2, 1e6).
pub const IVON_LARGE_CLIP_ESS: (f64, f64) = (1e-2, 1e7);

impl RunConfig {
    /// IVON defaults that follow the model's width, so that no task needs tuning at either size.
    /// [`lora_train_defaults`]' clip_radius 3e-2 / ess 1e6 were measured on MiniLM (hidden 384)
    /// and SmolLM2-135M (576); on Qwen2.5-Coder-1.5B (1536) clip 3e-2 diverged on all six
    /// commonsense tasks, and clip 1e-2 at ess 1e6 lost 6 points in the K = 10 predictive to
    /// posterior noise (σ ≈ 0.032, larger than the LoRA A entries), while clip 1e-2 / ess 1e7
    /// trained every task with the predictive at least as accurate as the mean (ARC-C 69.9 %,
    /// WG-S 62.0 %; `docs/results.md`, `configs/compare/qwen_ivon_noise.toml`). So from hidden
    /// size [`IVON_LARGE_HIDDEN`] on, with IVON and settings still at the small-model defaults,
    /// this sets [`IVON_LARGE_CLIP_ESS`] and returns a note saying so; any other clip or ess, or
    /// `ivon_size_defaults = false`, is kept as written. Idempotent.
    pub fn apply_size_defaults(&mut self, hidden_size: Option<usize>) -> Option<String> {
        let small = lora_train_defaults().ivon;
        let ivon = &mut self.train.ivon;
        let hidden = hidden_size?;
        let untouched = ivon.clip_radius == small.clip_radius && ivon.ess == small.ess;
        if !self.ivon_size_defaults
            || self.train.optimizer != crate::train::OptimizerKind::Ivon
            || hidden < IVON_LARGE_HIDDEN
            || !untouched
        {
            return None;
        }
        (ivon.clip_radius, ivon.ess) = IVON_LARGE_CLIP_ESS;
        Some(format!(
            "IVON: hidden size {hidden} ≥ {IVON_LARGE_HIDDEN}, so clip_radius {:e} and ess {:e} instead of the \
             small-model {:e} / {:e} (measured on Qwen2.5-Coder-1.5B, docs/results.md); set \
             ivon_size_defaults = false to keep them",
            ivon.clip_radius, ivon.ess, small.clip_radius, small.ess
        ))
    }
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
            label_words: Vec::new(),
            template: None,
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
            ivon_size_defaults: true,
        }
    }
}

/// A compute dtype by name: f32, bf16 or f16 (an unknown name is an error naming the setting).
pub fn compute_dtype(name: &str) -> Result<candle_core::DType> {
    match name {
        "f32" => Ok(candle_core::DType::F32),
        "bf16" => Ok(candle_core::DType::BF16),
        "f16" => Ok(candle_core::DType::F16),
        other => Err(Error::run(format!("dtype = {other:?}: use \"f32\", \"bf16\" or \"f16\""))),
    }
}

impl RunConfig {
    /// The `dtype` setting as a candle dtype (see [`compute_dtype`]).
    pub fn compute_dtype(&self) -> Result<candle_core::DType> {
        compute_dtype(&self.dtype)
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
        toml::to_string_pretty(self).map_err(|e| Error::run(e.to_string()))
    }

    /// The checkpoint folder of the run: `[train] checkpoint_dir`, else `<output>/checkpoints`.
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.train.checkpoint_dir.clone().unwrap_or_else(|| self.output.join("checkpoints"))
    }
}

/// Recursively overlays `over` on `base` (tables merge, everything else replaces): how a TOML
/// file goes over the defaults (`bayeslora train --config`) and a sweep's `[run]` tables over
/// each other ([`super::compare`]).
pub fn merge_toml(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge_toml(slot, v),
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
    use crate::train::OptimizerKind;

    fn ivon_run() -> RunConfig {
        let mut c = RunConfig::default();
        c.train.optimizer = OptimizerKind::Ivon;
        c
    }

    /// A 1.5B-wide model gets clip 1e-2 / ess 1e7 once (with a note); narrow models, AdamW, a
    /// clip or ess the user wrote, the switch off, or an unknown width keep what they have.
    #[test]
    fn ivon_size_defaults_follow_the_width_and_respect_what_was_written() {
        let mut wide = ivon_run();
        let note = wide.apply_size_defaults(Some(1536)).expect("a note");
        assert!(note.contains("1536") && note.contains("ivon_size_defaults = false"), "{note}");
        assert_eq!((wide.train.ivon.clip_radius, wide.train.ivon.ess), IVON_LARGE_CLIP_ESS);
        assert_eq!(wide.apply_size_defaults(Some(1536)), None, "idempotent");
        assert_eq!((wide.train.ivon.clip_radius, wide.train.ivon.ess), IVON_LARGE_CLIP_ESS);

        let small = lora_train_defaults().ivon;
        let keeps = |mut c: RunConfig, hidden: Option<usize>| {
            let before = c.train.ivon;
            assert_eq!(c.apply_size_defaults(hidden), None);
            assert_eq!(c.train.ivon, before);
        };
        keeps(ivon_run(), Some(384));
        keeps(ivon_run(), Some(896));
        keeps(ivon_run(), None);
        let mut adamw = RunConfig::default();
        adamw.train.optimizer = OptimizerKind::Adamw;
        keeps(adamw, Some(4096));
        let mut written = ivon_run();
        written.train.ivon.clip_radius = small.clip_radius * 2.0;
        keeps(written, Some(4096));
        let mut written = ivon_run();
        written.train.ivon.ess = 1e8;
        keeps(written, Some(4096));
        let mut off = ivon_run();
        off.ivon_size_defaults = false;
        keeps(off, Some(4096));
        // The switch is a setting of the run: it travels through config.toml.
        let mut c = ivon_run();
        c.ivon_size_defaults = false;
        let back: RunConfig = toml::from_str(&c.to_toml().unwrap()).unwrap();
        assert!(!back.ivon_size_defaults);
    }

    /// `open_run` takes the stored paths relative to the folder it is given, wherever `train`
    /// was started: `output` becomes the folder, a checkpoint folder inside it moves along.
    #[test]
    fn open_run_moves_paths_with_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        let mut stored = RunConfig { output: "runs/a".into(), ..Default::default() };
        stored.train.checkpoint_dir = Some("runs/a/ckpt".into());
        std::fs::write(dir.path().join("config.toml"), stored.to_toml().unwrap()).unwrap();
        let cfg = RunConfig::open_run(dir.path()).unwrap();
        assert_eq!(cfg.output, dir.path());
        assert_eq!(cfg.checkpoint_dir(), dir.path().join("ckpt"));
        assert_eq!(RunConfig::default().checkpoint_dir(), PathBuf::from("runs/latest/checkpoints"));
    }

    /// The messages the CLI printed before this module moved into the library, word for word:
    /// a wrong dtype names the setting; a folder without config.toml names the file and says
    /// what it should be, with the I/O error as the source.
    #[test]
    fn errors_name_the_setting_and_the_file() {
        let e = compute_dtype("bf32").unwrap_err().to_string();
        assert_eq!(e, "dtype = \"bf32\": use \"f32\", \"bf16\" or \"f16\"");
        let dir = tempfile::tempdir().unwrap();
        let e = RunConfig::open_run(dir.path()).unwrap_err();
        let source = std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default();
        assert!(e.to_string().ends_with("config.toml; is this a folder written by `bayeslora train`?"), "{e}");
        assert!(!source.is_empty(), "the I/O error is the source of {e}");
    }
}
