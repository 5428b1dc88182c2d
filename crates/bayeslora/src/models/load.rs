//! [`Weights`]: the named tensors of a checkpoint, looked up by their HF names.
//!
//! Two sources behind one type:
//! - safetensors, memory-mapped: `model.safetensors`, or the shards listed in
//!   `model.safetensors.index.json` ([`Weights::from_dir`], [`Weights::from_safetensors`]);
//! - tensors already in memory, e.g. dequantized from GGUF with HF names
//!   ([`Weights::from_tensors`]).
//!
//! [`Weights::get`] checks the shape before it converts anything, so a config.json that does not
//! belong to the weights fails with [`Error::TensorShape`] naming the file and the tensor.
//!
//! ```no_run
//! use bayeslora::models::Weights;
//! use candle_core::{DType, Device};
//! let w = Weights::from_dir(std::path::Path::new("minilm"))?;
//! let emb = w.get("embeddings.word_embeddings.weight", &[30522, 384], DType::F32, &Device::Cpu)?;
//! # Ok::<(), bayeslora::Error>(())
//! ```
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// A source of named tensors (see the module doc). Cloning shares the open files or tensors.
#[derive(Clone)]
pub struct Weights {
    source: std::sync::Arc<Source>,
}

enum Source {
    /// One mmap per file; `routing` maps each tensor name to its file.
    Safetensors { files: Vec<(PathBuf, MmapedSafetensors)>, routing: HashMap<String, usize> },
    /// Pre-loaded tensors; `file` is what error messages name (the GGUF file, say).
    Memory { file: PathBuf, tensors: HashMap<String, Tensor> },
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.source.as_ref() {
            Source::Safetensors { files, routing } => f
                .debug_struct("Weights")
                .field("files", &files.iter().map(|(p, _)| p).collect::<Vec<_>>())
                .field("tensors", &routing.len())
                .finish(),
            Source::Memory { file, tensors } => {
                f.debug_struct("Weights").field("file", file).field("tensors", &tensors.len()).finish()
            }
        }
    }
}

/// The safetensors file names a Hugging Face model folder uses.
const SINGLE: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";

impl Weights {
    /// Opens the weights of a HF model folder: `model.safetensors`, else the shards listed in
    /// `model.safetensors.index.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let single = dir.join(SINGLE);
        if single.is_file() {
            return Self::from_safetensors(&[single]);
        }
        let index = dir.join(INDEX);
        if index.is_file() {
            return Self::from_index(&index);
        }
        Err(Error::BadFile {
            file: single,
            reason: format!(
                "not found (nor {INDEX}); the folder must hold Hugging Face safetensors weights \
                 (convert .bin with `model.save_pretrained(dir, safe_serialization=True)`)"
            ),
        })
    }

    /// Opens the shards listed in a `model.safetensors.index.json` (`weight_map`: tensor → file).
    pub fn from_index(index: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
        let bad = |reason: String| Error::BadFile { file: index.to_path_buf(), reason };
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON ({e}); re-download it")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad("no `weight_map` object; is this a safetensors index?".into()))?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut shards = BTreeSet::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| bad(format!("`weight_map.{name}` is not a file name")))?;
            shards.insert(file.to_string());
        }
        if shards.is_empty() {
            return Err(bad("`weight_map` is empty".into()));
        }
        let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
        let weights = Self::from_safetensors(&paths)?;
        // Every tensor the index promises must be in the shard it names.
        if let Source::Safetensors { files, routing } = weights.source.as_ref() {
            for (name, file) in map {
                let in_file = routing.get(name).map(|&i| files[i].0.clone());
                let want = dir.join(file.as_str().unwrap_or_default());
                if in_file.as_deref() != Some(want.as_path()) {
                    return Err(Error::MissingTensor { file: want, name: name.clone() });
                }
            }
        }
        Ok(weights)
    }

    /// Memory-maps safetensors files. A name present in several files resolves to the last.
    pub fn from_safetensors(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut routing = HashMap::new();
        for (index, path) in paths.iter().enumerate() {
            if !path.is_file() {
                return Err(Error::BadFile { file: path.clone(), reason: "not found".into() });
            }
            // SAFETY: the mapping is read-only; as with every mmap loader (candle, HF), the file
            // must not be truncated or modified while the process holds it.
            let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| bad_safetensors(path, e))?;
            for (name, _) in st.tensors() {
                routing.insert(name, index);
            }
            files.push((path.clone(), st));
        }
        Ok(Weights { source: std::sync::Arc::new(Source::Safetensors { files, routing }) })
    }

    /// Wraps tensors already in memory (HF names → tensors), e.g. a GGUF file dequantized by
    /// `models::gguf`. `file` is named in error messages.
    pub fn from_tensors(file: impl Into<PathBuf>, tensors: HashMap<String, Tensor>) -> Self {
        Weights { source: std::sync::Arc::new(Source::Memory { file: file.into(), tensors }) }
    }

    /// Whether a tensor of this exact name exists.
    pub fn contains(&self, name: &str) -> bool {
        match self.source.as_ref() {
            Source::Safetensors { routing, .. } => routing.contains_key(name),
            Source::Memory { tensors, .. } => tensors.contains_key(name),
        }
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = match self.source.as_ref() {
            Source::Safetensors { routing, .. } => routing.keys().cloned().collect(),
            Source::Memory { tensors, .. } => tensors.keys().cloned().collect(),
        };
        names.sort();
        names
    }

    /// The file a tensor comes from (for messages); for an unknown name, the first file.
    pub fn file_of(&self, name: &str) -> &Path {
        match self.source.as_ref() {
            Source::Safetensors { files, routing } => {
                let i = routing.get(name).copied().unwrap_or(0);
                files.get(i).map(|(p, _)| p.as_path()).unwrap_or(Path::new("<no safetensors file>"))
            }
            Source::Memory { file, .. } => file,
        }
    }

    /// The shape of a tensor without loading it.
    pub fn shape_of(&self, name: &str) -> Result<Vec<usize>> {
        match self.source.as_ref() {
            Source::Safetensors { files, routing } => {
                let (path, st) = self.locate(files, routing, name)?;
                let view = st.get(name).map_err(|e| bad_safetensors(path, e))?;
                Ok(view.shape().to_vec())
            }
            Source::Memory { tensors, .. } => {
                tensors.get(name).map(|t| t.dims().to_vec()).ok_or_else(|| self.missing(name))
            }
        }
    }

    /// Loads tensor `name`, checks it has `shape`, and converts it to `dtype` on `device`.
    pub fn get(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let got = self.shape_of(name)?;
        if got != shape {
            return Err(Error::TensorShape {
                file: self.file_of(name).to_path_buf(),
                name: name.to_string(),
                expected: shape.to_vec(),
                got,
            });
        }
        self.get_unchecked(name, dtype, device)
    }

    /// Loads tensor `name` whatever its shape, converted to `dtype` on `device`.
    pub fn get_unchecked(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let t = match self.source.as_ref() {
            Source::Safetensors { files, routing } => {
                let (path, st) = self.locate(files, routing, name)?;
                // Load on the CPU first: the dtype conversion then runs once, before the copy.
                let t = st.load(name, &Device::Cpu).map_err(|e| bad_safetensors(path, e))?;
                check_finite(path, name, &t)?;
                t
            }
            Source::Memory { tensors, .. } => tensors.get(name).cloned().ok_or_else(|| self.missing(name))?,
        };
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }

    /// The first of `prefixes` under which `probe` exists: checkpoints of the same backbone
    /// differ in prefix (MiniLM's `embeddings.*` versus BertForSequenceClassification's
    /// `bert.embeddings.*`). Fails with [`Error::MissingTensor`] for `probe` otherwise.
    pub fn detect_prefix<'p>(&self, probe: &str, prefixes: &[&'p str]) -> Result<&'p str> {
        prefixes
            .iter()
            .find(|p| self.contains(&format!("{p}{probe}")))
            .copied()
            .ok_or_else(|| self.missing(&format!("{}{probe}", prefixes.first().copied().unwrap_or(""))))
    }

    fn locate<'a>(
        &self,
        files: &'a [(PathBuf, MmapedSafetensors)],
        routing: &HashMap<String, usize>,
        name: &str,
    ) -> Result<(&'a Path, &'a MmapedSafetensors)> {
        let i = *routing.get(name).ok_or_else(|| self.missing(name))?;
        // invariant: routing only holds indices of `files`.
        let (path, st) = &files[i];
        Ok((path, st))
    }

    fn missing(&self, name: &str) -> Error {
        Error::MissingTensor { file: self.file_of(name).to_path_buf(), name: name.to_string() }
    }
}

/// Refuses a float tensor holding NaN or ±inf: a corrupt download, caught at load time instead
/// of as a non-finite loss many steps later. One pass of a sum over the values (NaN and ±inf
/// make the sum non-finite; finite weights are far from overflowing f32).
fn check_finite(file: &Path, name: &str, t: &Tensor) -> Result<()> {
    if !t.dtype().is_float() || t.elem_count() == 0 {
        return Ok(());
    }
    let sum = t.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
    if sum.is_finite() {
        return Ok(());
    }
    Err(Error::BadFile {
        file: file.to_path_buf(),
        reason: format!("tensor `{name}` holds NaN or infinite values; the file is corrupt, re-download it"),
    })
}

/// A safetensors parse error as [`Error::BadFile`], without candle's path wrapper (the file is
/// named once, by the variant).
fn bad_safetensors(path: &Path, e: candle_core::Error) -> Error {
    let inner = match e {
        candle_core::Error::WithPath { inner, .. } => *inner,
        other => other,
    };
    let inner = match inner {
        candle_core::Error::WithBacktrace { inner, .. } => *inner,
        other => other,
    };
    Error::BadFile {
        file: path.to_path_buf(),
        reason: format!("not a valid safetensors file ({inner}); it may be truncated or corrupt, re-download it"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().expect("temp dir")
    }

    #[test]
    fn sharded_index_routes_tensors_and_checks_shapes() -> Result<()> {
        let dir = tmp();
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, 6.0, &dev)?.reshape((2, 3))?;
        let b = Tensor::ones(4, DType::F32, &dev)?;
        candle_core::safetensors::save(&HashMap::from([("a".to_string(), a)]), dir.path().join("s1.safetensors"))?;
        candle_core::safetensors::save(&HashMap::from([("b".to_string(), b)]), dir.path().join("s2.safetensors"))?;
        let index = r#"{"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}"#;
        std::fs::write(dir.path().join(INDEX), index).map_err(|e| Error::io(dir.path(), e))?;
        let w = Weights::from_dir(dir.path())?;
        assert_eq!(w.names(), vec!["a".to_string(), "b".to_string()]);
        let a = w.get("a", &[2, 3], DType::F64, &dev)?;
        assert_eq!(a.dtype(), DType::F64);
        assert_eq!(a.to_vec2::<f64>()?[1][2], 5.0);
        assert!(w.file_of("b").ends_with("s2.safetensors"));
        let msg = w.get("b", &[5], DType::F32, &dev).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("s2.safetensors") && msg.contains("`b`") && msg.contains("[5]"), "{msg}");
        let msg = w.get("c", &[5], DType::F32, &dev).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("`c` is missing"), "{msg}");
        Ok(())
    }

    #[test]
    fn weights_can_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Weights>();
    }

    #[test]
    fn memory_source_and_prefix_detection() -> Result<()> {
        let dev = Device::Cpu;
        let t = Tensor::zeros((3, 2), DType::F32, &dev)?;
        let w = Weights::from_tensors("m.gguf", HashMap::from([("bert.x".to_string(), t)]));
        assert_eq!(w.detect_prefix("x", &["", "bert."])?, "bert.");
        assert!(w.get("bert.x", &[3, 2], DType::BF16, &dev)?.dtype() == DType::BF16);
        let msg = w.get("bert.x", &[2, 3], DType::F32, &dev).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.starts_with("m.gguf: tensor `bert.x` has shape [3, 2], expected [2, 3]"), "{msg}");
        assert!(w.detect_prefix("y", &["", "bert."]).is_err());
        Ok(())
    }
}
