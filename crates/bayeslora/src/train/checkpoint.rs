//! Checkpoints that resume bit for bit on CPU: trainable variables, the optimizer's full state
//! (IVON: μ, m, h, step, noise RNG; AdamW: moments), the data cursor and the run config.
//!
//! Layout: `<dir>/checkpoint-<step>/{trainable.safetensors, optimizer.safetensors, state.json,
//! manifest.json}`, plus `gates.safetensors` (the gate Adam) and `buffers.safetensors` (quantizer
//! ranges) for B-LoRA, and `<dir>/latest` naming the newest one.
//!
//! Crash safety: every file is written into `checkpoint-<step>.partial/` and fsynced; then
//! `manifest.json` lists each file's size and SHA-256, the folder is fsynced, renamed into place
//! and its parent fsynced; `latest` is replaced atomically afterwards. A kill at any moment
//! leaves either a `.partial` folder (ignored and removed later) or a complete, sealed
//! checkpoint, so a crash costs at most the steps since the last checkpoint.
//!
//! Loading verifies every file against the manifest and requires finite values in the
//! variables and the optimizer state. A damaged newest checkpoint (a truncated or edited file,
//! NaN bytes, a garbage `latest`) falls back to the next older good one, with one note naming
//! both; when none is good, [`Error::NoUsableCheckpoint`] names each damaged file. Checkpoints
//! written before manifests existed (no `manifest.json`) still load: their files are parsed and
//! checked for finite values, without checksums.
//!
//! Rotation: after each save only the `keep` newest checkpoints stay
//! ([`TrainConfig::keep_checkpoints`], default 2, so a damaged newest one has a predecessor).
use super::{Classifier, GateOptimizer, RunOptimizer, TrainConfig};
use crate::data::{Batcher, Cursor};
use crate::{atomic, Error, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

/// `state.json` of a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointState {
    pub step: usize,
    pub cursor: Cursor,
    pub config: TrainConfig,
    pub version: String,
}

/// The manifest file of a sealed checkpoint.
pub const MANIFEST: &str = "manifest.json";
const MANIFEST_VERSION: u32 = 1;
/// Files every checkpoint has.
const REQUIRED: [&str; 3] = ["state.json", "trainable.safetensors", "optimizer.safetensors"];

/// `manifest.json`: size and SHA-256 of every other file of the checkpoint.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    format_version: u32,
    files: BTreeMap<String, FileEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    bytes: u64,
    sha256: String,
}

/// What [`Checkpoint::load`] restored.
#[derive(Debug, Clone)]
pub struct Restored {
    pub state: CheckpointState,
    /// The checkpoint folder used.
    pub path: PathBuf,
    /// Set when the newest checkpoint was damaged (or `latest` was garbage) and an older one
    /// was used: one message naming both.
    pub note: Option<String>,
}

/// Namespace for checkpoint I/O.
pub struct Checkpoint;

impl Checkpoint {
    /// Writes a checkpoint for `step` under `dir`, keeps the `cfg.keep_checkpoints` newest, and
    /// returns its folder.
    pub fn save(
        dir: &Path,
        step: usize,
        cfg: &TrainConfig,
        model: &dyn Classifier,
        opt: &RunOptimizer,
        gates: Option<&GateOptimizer>,
        batcher: &Batcher,
    ) -> Result<PathBuf> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let name = format!("checkpoint-{step:07}");
        let tmp = dir.join(format!("{name}.partial"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let written = (|| {
            let vars: HashMap<String, Tensor> =
                model.trainable().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
            atomic::write_safetensors(&tmp.join("trainable.safetensors"), &vars, None)?;
            test_pause();
            opt.as_ref_dyn().save_state(&tmp.join("optimizer.safetensors"))?;
            test_pause();
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
            test_pause();
            seal(&tmp)
        })();
        if let Err(e) = written {
            // A full disk or a write error leaves no partial folder behind.
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let final_dir = dir.join(&name);
        let _ = std::fs::remove_dir_all(&final_dir);
        std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
        atomic::sync_dir(dir);
        test_pause();
        atomic::write(&dir.join("latest"), name.as_bytes())?;
        prune(dir, cfg.keep_checkpoints);
        Ok(final_dir)
    }

    /// The error for a failed [`Checkpoint::save`] of `step`: the cause (which names the file)
    /// and the newest good checkpoint left to resume from, if any.
    pub fn write_failed(dir: &Path, step: usize, cause: Error) -> Error {
        let after = match Self::latest(dir) {
            Some(previous) => {
                format!("{} is intact: make room, then continue from it with --resume", previous.display())
            }
            None => "no earlier checkpoint to resume from: make room, then train again with --overwrite".into(),
        };
        Error::CheckpointWrite { step, cause: Box::new(cause), after }
    }

    /// The newest checkpoint under `dir` whose files match its manifest (or, for a checkpoint
    /// without a manifest, that has its files), if any. `latest` is not trusted: a kill between
    /// the rename and its update, or a damaged `latest`, must not hide a good checkpoint.
    pub fn latest(dir: &Path) -> Option<PathBuf> {
        candidates(dir).into_iter().find(|c| verify_manifest(c).is_ok())
    }

    /// Restores variables, optimizer and data cursor from a checkpoint folder, or from the
    /// newest good checkpoint of a run's checkpoint folder (falling back past damaged ones).
    pub fn load(
        path: &Path,
        model: &dyn Classifier,
        opt: &mut RunOptimizer,
        mut gates: Option<&mut GateOptimizer>,
        batcher: &mut Batcher,
    ) -> Result<Restored> {
        let found = candidates(path);
        if found.is_empty() {
            return Err(Error::BadFile {
                file: path.into(),
                reason: "no checkpoint here (no checkpoint-* folder or state.json); start without --resume".into(),
            });
        }
        let mut damaged: Vec<(String, String)> = Vec::new();
        for ckpt in &found {
            let restored = verify(ckpt, model, gates.is_some())
                .and_then(|saved| apply(ckpt, saved, model, opt, gates.as_deref_mut(), batcher));
            match restored {
                Ok(state) => {
                    let mut notes: Vec<String> =
                        damaged.iter().map(|(name, reason)| format!("{name} is damaged ({reason})")).collect();
                    if let Some(latest) = garbage_latest(path) {
                        notes.push(latest);
                    }
                    let note = (!notes.is_empty()).then(|| {
                        format!("{}; resuming from {} (step {}) instead", notes.join("; "), ckpt.display(), state.step)
                    });
                    return Ok(Restored { state, path: ckpt.clone(), note });
                }
                Err(e) => {
                    let name =
                        ckpt.file_name().map_or_else(|| ckpt.display().to_string(), |n| n.to_string_lossy().into());
                    damaged.push((name, e.to_string()));
                }
            }
        }
        Err(Error::NoUsableCheckpoint {
            dir: path.into(),
            reasons: damaged.into_iter().map(|(_, reason)| reason).collect(),
        })
    }
}

/// The kill campaign's hook (`crates/cli/tests/kill_campaign.rs`): with
/// `BAYESLORA_TEST_CHECKPOINT_PAUSE_MS` set, every stage of a checkpoint write (after each file,
/// after the rename) sleeps that long, so a SIGKILL can be aimed inside the write. Unset (the
/// normal case), it does nothing.
fn test_pause() {
    static PAUSE: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();
    let pause = PAUSE.get_or_init(|| {
        std::env::var("BAYESLORA_TEST_CHECKPOINT_PAUSE_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(std::time::Duration::from_millis)
    });
    if let Some(d) = pause {
        std::thread::sleep(*d);
    }
}

/// Checkpoint folders to try, newest first: `path` itself when it is one, else its complete
/// `checkpoint-<step>` folders by step.
fn candidates(path: &Path) -> Vec<PathBuf> {
    if path.join("state.json").is_file() || path.join(MANIFEST).is_file() {
        return vec![path.to_path_buf()];
    }
    let mut found: Vec<(usize, PathBuf)> = checkpoint_folders(path);
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    found.into_iter().map(|(_, p)| p).collect()
}

/// `(step, folder)` of every complete `checkpoint-<step>` folder under `dir`.
fn checkpoint_folders(dir: &Path) -> Vec<(usize, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse::<usize>().ok()?;
            Some((step, e.path()))
        })
        .collect()
}

/// A note when `<dir>/latest` exists but names no checkpoint folder.
fn garbage_latest(dir: &Path) -> Option<String> {
    let file = dir.join("latest");
    let bytes = std::fs::read(&file).ok()?;
    let name = String::from_utf8_lossy(&bytes);
    let name = name.trim();
    let valid = name.starts_with("checkpoint-") && !name.contains(['/', '\\']) && dir.join(name).is_dir();
    (!valid).then(|| format!("{} names no checkpoint folder", file.display()))
}

/// SHA-256 (lower-case hex) and size of a file, which is fsynced on the way (a read-only
/// handle may be synced on Linux and macOS), so sealing a folder also makes its files durable.
fn hash_file(path: &Path) -> Result<(u64, String)> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    f.sync_all().map_err(|e| Error::io(path, e))?;
    let hex = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((bytes, hex))
}

/// Writes `manifest.json` over every file of the folder `dir` and fsyncs the folder.
fn seal(dir: &Path) -> Result<()> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == MANIFEST || !entry.path().is_file() {
            continue;
        }
        let (bytes, sha256) = hash_file(&entry.path())?;
        files.insert(name, FileEntry { bytes, sha256 });
    }
    atomic::write_json(&dir.join(MANIFEST), &Manifest { format_version: MANIFEST_VERSION, files })?;
    atomic::sync_dir(dir);
    Ok(())
}

/// Checks the files of `ckpt` against its manifest; without a manifest (a checkpoint of an
/// older version) only that the required files exist.
fn verify_manifest(ckpt: &Path) -> Result<()> {
    let bad = |file: &str, reason: String| Error::BadFile { file: ckpt.join(file), reason };
    let path = ckpt.join(MANIFEST);
    let manifest: Option<Manifest> = match std::fs::read(&path) {
        Ok(bytes) => {
            Some(serde_json::from_slice(&bytes).map_err(|e| bad(MANIFEST, format!("unreadable manifest ({e})")))?)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io(path, e)),
    };
    let Some(manifest) = manifest else {
        for name in REQUIRED {
            if !ckpt.join(name).is_file() {
                return Err(bad(name, "missing".into()));
            }
        }
        return Ok(());
    };
    for name in REQUIRED {
        if !manifest.files.contains_key(name) {
            return Err(bad(MANIFEST, format!("does not list {name}")));
        }
    }
    for (name, want) in &manifest.files {
        let file = ckpt.join(name);
        if !file.is_file() {
            return Err(bad(name, "missing, but listed in the manifest".into()));
        }
        let (bytes, sha256) = hash_file(&file)?;
        if bytes != want.bytes {
            return Err(bad(name, format!("{bytes} bytes, the manifest says {} (truncated or damaged)", want.bytes)));
        }
        if sha256 != want.sha256 {
            return Err(bad(name, "SHA-256 differs from the manifest (damaged)".into()));
        }
    }
    Ok(())
}

/// A checkpoint read and checked, not yet applied.
struct Verified {
    state: CheckpointState,
    trainable: HashMap<String, Tensor>,
    buffers: Option<HashMap<String, Tensor>>,
}

/// Reads everything of `ckpt` and checks it (manifest, parse, finite values) without touching
/// the model, so a damaged checkpoint is skipped before anything is overwritten.
fn verify(ckpt: &Path, model: &dyn Classifier, has_gates: bool) -> Result<Verified> {
    verify_manifest(ckpt)?;
    let state_path = ckpt.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let state: CheckpointState = serde_json::from_str(&text)
        .map_err(|e| Error::BadFile { file: state_path.clone(), reason: format!("invalid JSON ({e})") })?;
    let device = model.trainable().first().map(|(_, v)| v.device().clone()).unwrap_or(Device::Cpu);
    let trainable = read_finite(&ckpt.join("trainable.safetensors"), &device)?;
    read_finite(&ckpt.join("optimizer.safetensors"), &Device::Cpu)?;
    if has_gates {
        read_finite(&ckpt.join("gates.safetensors"), &Device::Cpu)?;
    }
    let buffers_path = ckpt.join("buffers.safetensors");
    let buffers = if buffers_path.is_file() {
        Some(
            candle_core::safetensors::load(&buffers_path, &device)
                .map_err(|e| Error::BadFile { file: buffers_path.clone(), reason: e.to_string() })?,
        )
    } else {
        None
    };
    Ok(Verified { state, trainable, buffers })
}

/// Loads a safetensors file and requires every float tensor to be finite.
fn read_finite(file: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let tensors = candle_core::safetensors::load(file, device)
        .map_err(|e| Error::BadFile { file: file.into(), reason: e.to_string() })?;
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        let t = &tensors[name];
        if !t.dtype().is_float() || t.elem_count() == 0 {
            continue;
        }
        // x − x is 0 for every finite x and NaN for NaN and ±inf, so the sum is NaN iff any is.
        let t = t.to_dtype(DType::F32)?;
        let probe = t.sub(&t)?.sum_all()?.to_scalar::<f32>()?;
        if !probe.is_finite() {
            return Err(Error::BadFile {
                file: file.into(),
                reason: format!("tensor `{name}` holds NaN or infinite values (damaged)"),
            });
        }
    }
    Ok(tensors)
}

/// Writes a verified checkpoint into the model, the optimizers and the batcher.
fn apply(
    ckpt: &Path,
    saved: Verified,
    model: &dyn Classifier,
    opt: &mut RunOptimizer,
    gates: Option<&mut GateOptimizer>,
    batcher: &mut Batcher,
) -> Result<CheckpointState> {
    let file = ckpt.join("trainable.safetensors");
    for (name, var) in model.trainable() {
        let legacy = match saved.trainable.get(&name) {
            Some(_) => None,
            None => model.legacy_trainable(&name, &saved.trainable)?,
        };
        let t = saved
            .trainable
            .get(&name)
            .or(legacy.as_ref())
            .ok_or_else(|| Error::MissingTensor { file: file.clone(), name: name.clone() })?;
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
    opt.as_dyn().load_state(&ckpt.join("optimizer.safetensors"))?;
    if let Some(g) = gates {
        ivon::Optimizer::load_state(&mut g.opt, &ckpt.join("gates.safetensors"))?;
    }
    if let Some(buffers) = &saved.buffers {
        model.load_buffers(buffers)?;
    }
    batcher.seek(saved.state.cursor)?;
    Ok(saved.state)
}

/// Removes all but the `keep` newest `checkpoint-*` folders (0: keep all) and stale `.partial`
/// ones.
fn prune(dir: &Path, keep: usize) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("checkpoint-") && name.ends_with(".partial") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    if keep == 0 {
        return;
    }
    let mut complete = checkpoint_folders(dir);
    complete.sort_by_key(|f| std::cmp::Reverse(f.0));
    for (_, path) in complete.iter().skip(keep) {
        let _ = std::fs::remove_dir_all(path);
    }
}
