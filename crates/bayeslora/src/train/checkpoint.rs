//! Checkpoints that resume bit for bit on CPU: trainable variables, the optimizer's full state
//! (IVON: μ, m, h, step, noise RNG; AdamW: moments), the data cursor and the run config.
//!
//! Layout: `<dir>/checkpoint-<step>/{trainable.safetensors, optimizer.safetensors, state.json}`,
//! plus `gates.safetensors` (the gate Adam) and `buffers.safetensors` (quantizer ranges) for B-LoRA,
//! and `<dir>/latest` naming the newest one. Each checkpoint is written into a temporary
//! folder that is renamed into place, and `latest` is replaced atomically afterwards, so an
//! interrupted write never leaves a checkpoint that looks complete. The two newest are kept.
use super::{Classifier, GateOptimizer, Optimizer, TrainConfig};
use crate::data::{Batcher, Cursor};
use crate::{atomic, Error, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// `state.json` of a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointState {
    pub step: usize,
    pub cursor: Cursor,
    pub config: TrainConfig,
    pub version: String,
}

/// Namespace for checkpoint I/O.
pub struct Checkpoint;

impl Checkpoint {
    /// Writes a checkpoint for `step` under `dir` and returns its folder.
    pub fn save(
        dir: &Path,
        step: usize,
        cfg: &TrainConfig,
        model: &dyn Classifier,
        opt: &Optimizer,
        gates: Option<&GateOptimizer>,
        batcher: &Batcher,
    ) -> Result<PathBuf> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let name = format!("checkpoint-{step:07}");
        let tmp = dir.join(format!("{name}.partial"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let vars: HashMap<String, Tensor> =
            model.trainable().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
        atomic::write_safetensors(&tmp.join("trainable.safetensors"), &vars, None)?;
        let opt_path = tmp.join("optimizer.safetensors");
        opt.as_ref_dyn().save_state(&opt_path)?;
        if let Some(g) = gates {
            ivon::Optimizer::save_state(&g.opt, &tmp.join("gates.safetensors"))?;
        }
        let buffers: HashMap<String, Tensor> = model.buffers()?.into_iter().collect();
        if !buffers.is_empty() {
            atomic::write_safetensors(&tmp.join("buffers.safetensors"), &buffers, None)?;
        }
        let state = CheckpointState {
            step,
            cursor: batcher.cursor(),
            config: cfg.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
        };
        atomic::write_json(&tmp.join("state.json"), &state)?;
        let final_dir = dir.join(&name);
        let _ = std::fs::remove_dir_all(&final_dir);
        std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
        atomic::write(&dir.join("latest"), name.as_bytes())?;
        prune(dir, 2);
        Ok(final_dir)
    }

    /// The newest complete checkpoint under `dir`, if any.
    pub fn latest(dir: &Path) -> Option<PathBuf> {
        let name = std::fs::read_to_string(dir.join("latest")).ok()?;
        let path = dir.join(name.trim());
        path.join("state.json").exists().then_some(path)
    }

    /// Restores variables, optimizer and data cursor from a checkpoint folder (or from the
    /// newest checkpoint of a run folder).
    pub fn load(
        path: &Path,
        model: &dyn Classifier,
        opt: &mut Optimizer,
        gates: Option<&mut GateOptimizer>,
        batcher: &mut Batcher,
    ) -> Result<CheckpointState> {
        let path = if path.join("state.json").exists() {
            path.to_path_buf()
        } else {
            Self::latest(path).ok_or_else(|| Error::BadFile {
                file: path.into(),
                reason: "no checkpoint here (no `latest` or state.json); start without --resume".into(),
            })?
        };
        let state_path = path.join("state.json");
        let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
        let state: CheckpointState = serde_json::from_str(&text)
            .map_err(|e| Error::BadFile { file: state_path.clone(), reason: e.to_string() })?;
        let file = path.join("trainable.safetensors");
        let device = model.trainable().first().map(|(_, v)| v.device().clone()).unwrap_or(candle_core::Device::Cpu);
        let saved = candle_core::safetensors::load(&file, &device)
            .map_err(|e| Error::BadFile { file: file.clone(), reason: e.to_string() })?;
        for (name, var) in model.trainable() {
            let t = saved.get(&name).ok_or_else(|| Error::MissingTensor { file: file.clone(), name: name.clone() })?;
            if t.dims() != var.dims() {
                return Err(Error::TensorShape {
                    file: file.clone(),
                    name,
                    expected: var.dims().to_vec(),
                    got: t.dims().to_vec(),
                });
            }
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        let opt_path = path.join("optimizer.safetensors");
        opt.as_dyn().load_state(&opt_path)?;
        if let Some(g) = gates {
            ivon::Optimizer::load_state(&mut g.opt, &path.join("gates.safetensors"))?;
        }
        let buffers_path = path.join("buffers.safetensors");
        if buffers_path.exists() {
            let saved = candle_core::safetensors::load(&buffers_path, &device)
                .map_err(|e| Error::BadFile { file: buffers_path.clone(), reason: e.to_string() })?;
            model.load_buffers(&saved)?;
        }
        batcher.seek(state.cursor)?;
        Ok(state)
    }
}

/// Removes all but the `keep` newest `checkpoint-*` folders (and stale `.partial` ones).
fn prune(dir: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    names.sort();
    for n in names.iter().filter(|n| n.ends_with(".partial")) {
        let _ = std::fs::remove_dir_all(dir.join(n));
    }
    let complete: Vec<&String> = names.iter().filter(|n| !n.ends_with(".partial")).collect();
    for n in complete.iter().take(complete.len().saturating_sub(keep)) {
        let _ = std::fs::remove_dir_all(dir.join(n));
    }
}
