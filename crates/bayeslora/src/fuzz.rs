//! Entry points for the fuzz targets under `fuzz/` (cargo-fuzz) and for the stable test that
//! replays their committed corpora (`tests/fuzz_corpus.rs`), so CI covers every corpus file
//! without a nightly toolchain.
//!
//! Each function takes arbitrary bytes, writes them where the real loader expects its file (in
//! a scratch folder of this process) and runs that loader, the same code a user's file meets.
//! They return the loader's `Result`; the property checked is that no input panics, aborts or
//! allocates without bound, only returns `Err`.
use crate::data::{DataSpec, Format, Task};
use crate::models::bert::BertConfig;
use crate::models::config::{load_tokenizer, read_config_json, Architecture};
use crate::models::deberta_v2::DebertaV2Config;
use crate::models::llama::LlamaConfig;
use crate::models::{gguf, Weights};
use crate::{Error, Result};
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

/// A scratch folder of one input, removed when dropped. Each call gets its own folder (process
/// id + a counter), so inputs checked on several threads at once (the test harness) never share
/// a file.
struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch() -> Result<Scratch> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("bayeslora-fuzz-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    Ok(Scratch(dir))
}

fn put(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
    Ok(path)
}

/// `model.safetensors`: header parse, then every tensor loaded (shape, dtype, finite check).
pub fn safetensors(data: &[u8]) -> Result<()> {
    let dir = scratch()?;
    let path = put(&dir, "model.safetensors", data)?;
    let w = Weights::from_safetensors(&[path])?;
    for name in w.names() {
        w.get_unchecked(&name, DType::F32, &Device::Cpu)?;
    }
    Ok(())
}

/// `model.safetensors.index.json` beside one small valid shard (`model-00001.safetensors`, one
/// tensor `a` of shape [2]): the index is parsed and every routed tensor loaded.
pub fn safetensors_index(data: &[u8]) -> Result<()> {
    let dir = scratch()?;
    put(&dir, "model.safetensors.index.json", data)?;
    let a = candle_core::Tensor::new(&[1f32, 2.], &Device::Cpu)?;
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("a".to_string(), a)]),
        dir.join("model-00001.safetensors"),
    )?;
    let w = Weights::from_dir(&dir)?;
    for name in w.names() {
        w.get_unchecked(&name, DType::F32, &Device::Cpu)?;
    }
    Ok(())
}

/// A `.gguf` file: the header-only read of the memory check ([`gguf::read_shapes`]), then the
/// full one: header, metadata, tensor table, config and tokenizer from the metadata, and every
/// tensor dequantized.
pub fn gguf(data: &[u8]) -> Result<()> {
    let dir = scratch()?;
    let path = put(&dir, "model.gguf", data)?;
    // Either may fail on its own (the full read skips tensors with no HF name, the header-only
    // one checks every tensor's extent); neither may panic.
    let _ = gguf::read_shapes(&path);
    gguf::read(&path).map(|_| ())
}

/// `config.json`: JSON, architecture detection, then the architecture's config and its checks.
pub fn config_json(data: &[u8]) -> Result<()> {
    let dir = scratch()?;
    put(&dir, "config.json", data)?;
    let (path, json) = read_config_json(&dir)?;
    match Architecture::detect(&json, &path)? {
        Architecture::Bert => BertConfig::from_json(&json, &path).map(|_| ()),
        Architecture::DebertaV2 => DebertaV2Config::from_json(&json, &path).map(|_| ()),
        Architecture::Llama => LlamaConfig::from_json(&json.to_string(), &path).map(|_| ()),
    }
}

/// `tokenizer.json`: loaded, then used on a short text with a pair.
pub fn tokenizer(data: &[u8]) -> Result<()> {
    let dir = scratch()?;
    put(&dir, "tokenizer.json", data)?;
    let tok = load_tokenizer(&dir)?;
    tok.encode(("a fuzzed text ☃", "and its pair"), true).map_err(|e| Error::Tokenizer(e.to_string()))?;
    Ok(())
}

/// Task rows: the first byte picks the task (GLUE TSV, JSONL classification, regression or
/// multiple choice) and format, the rest is the file.
pub fn task_rows(data: &[u8]) -> Result<()> {
    const TASKS: [(Task, Option<Format>); 9] = [
        (Task::Sst2, None),
        (Task::Rte, None),
        (Task::Stsb, None),
        (Task::JsonlText, None),
        (Task::JsonlRegression, None),
        (Task::JsonlChoice, None),
        (Task::ArcEasy, None),
        (Task::Boolq, None),
        (Task::Sst2, Some(Format::Prompt)),
    ];
    let Some((&pick, body)) = data.split_first() else {
        return Ok(());
    };
    let (task, format) = TASKS[usize::from(pick) % TASKS.len()];
    let dir = scratch()?;
    let path = put(&dir, "rows", body)?;
    let mut spec = DataSpec::new(task, path);
    spec.format = format;
    crate::data::load(&spec).map(|_| ())
}

/// `adapter_config.json` (PEFT).
pub fn adapter_config(data: &[u8]) -> Result<()> {
    let dir = scratch()?;
    put(&dir, "adapter_config.json", data)?;
    crate::export::config::read(&dir).map(|_| ())
}

/// The posterior sidecar: the first two bytes (little endian) give the length of
/// `adapter_posterior.json`, the rest is `adapter_posterior.safetensors`; read for one key
/// `w` of shape [2, 2].
pub fn posterior_sidecar(data: &[u8]) -> Result<()> {
    let (len, rest) = match data {
        [a, b, rest @ ..] => (usize::from(u16::from_le_bytes([*a, *b])), rest),
        _ => return Ok(()),
    };
    let (json, tensors) = rest.split_at(len.min(rest.len()));
    let dir = scratch()?;
    put(&dir, crate::export::POSTERIOR_JSON, json)?;
    put(&dir, crate::export::POSTERIOR_TENSORS, tensors)?;
    crate::export::sidecar::read(&dir, &[("w".to_string(), vec![2, 2])]).map(|_| ())
}

/// One fuzz entry point.
pub type Target = fn(&[u8]) -> Result<()>;

/// Every entry point by the name of its fuzz target and corpus folder.
pub const TARGETS: [(&str, Target); 8] = [
    ("safetensors", safetensors),
    ("safetensors_index", safetensors_index),
    ("gguf", gguf),
    ("config_json", config_json),
    ("tokenizer", tokenizer),
    ("task_rows", task_rows),
    ("adapter_config", adapter_config),
    ("posterior_sidecar", posterior_sidecar),
];
