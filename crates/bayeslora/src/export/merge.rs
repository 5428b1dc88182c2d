//! [`merge`]: a full model folder with the (mean) adapter folded into the frozen weights,
//! `W' = W + scaling·B·A` (peft's `merge_and_unload`), computed in f32 and stored in each
//! tensor's original dtype.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use crate::adapters::blora::quantizer::Slot;
use crate::models::Backbone;
use crate::train::{Adapters, TaskModel};
use crate::{atomic, Error, Result};

/// Files copied unchanged from the base folder when present.
const COPIED: &[&str] =
    &["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "generation_config.json"];

/// The safetensors files of a HF model folder: `model.safetensors`, or the shards of
/// `model.safetensors.index.json`.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Err(Error::io(
            single,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "merge needs a safetensors model folder (model.safetensors or a sharded index) or a .gguf file",
            ),
        ));
    }
    let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::BadFile { file: index.clone(), reason: format!("invalid JSON: {e}") })?;
    let mut files: Vec<String> = v["weight_map"]
        .as_object()
        .ok_or_else(|| Error::BadFile { file: index.clone(), reason: "no `weight_map` object".into() })?
        .values()
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect();
    files.sort();
    files.dedup();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Writes to `out` a model folder equal to `base_dir` with `model`'s adapters merged:
/// `model.safetensors` (one file, metadata `{"format": "pt"}`), `config.json` and the tokenizer
/// files. A BERT task model is written as `BertForSequenceClassification` (backbone under
/// `bert.`, its head as `classifier.{weight,bias}`, `id2label` sized to the head). The adapter's
/// current values are used (for IVON: the posterior mean μ); B-LoRA layers are folded at their
/// learned rank with their quantized weights, and refused when they quantize activations or the
/// base (no weight can reproduce that). Returns the weights file.
pub fn merge(model: &TaskModel, base_dir: &Path, out: &Path) -> Result<PathBuf> {
    let base = Base::open(base_dir)?;
    let mut names = base.names();
    names.sort();
    let file_of = |_: &str| base.file();

    if matches!(model.backbone, Backbone::DebertaV2(_)) {
        return Err(Error::config(
            "model",
            "DebertaV2",
            "merging DeBERTa adapters is not supported yet; export the PEFT adapter instead",
        ));
    }
    let bert = matches!(model.backbone, Backbone::Bert(_));
    let src_prefix =
        if bert && names.iter().any(|n| n == "bert.embeddings.word_embeddings.weight") { "bert." } else { "" };
    let as_seq_cls = bert && model.head.is_some();
    // Source key → output key; with a head, only the encoder's own tensors carry over.
    let rename = |name: &str| -> Option<String> {
        if !as_seq_cls {
            return Some(name.to_string());
        }
        let rest = name.strip_prefix(src_prefix)?;
        if src_prefix.is_empty() && (rest.starts_with("classifier.") || rest.starts_with("cls.")) {
            return None;
        }
        Some(format!("bert.{rest}"))
    };
    let mut deltas: HashMap<String, (f64, Tensor, Tensor)> = HashMap::new();
    let blora_layers = match &model.adapters {
        Adapters::Bare => {
            return Err(Error::config("adapters", "none", "nothing to merge: load or train an adapter first"))
        }
        Adapters::Lora(lora) => {
            for (m, l) in &lora.layers {
                deltas.insert(
                    format!("{src_prefix}{m}.weight"),
                    (l.scaling(), l.lora_a().as_tensor().clone(), l.lora_b().as_tensor().clone()),
                );
            }
            &[][..]
        }
        Adapters::Blora(b) => &b.layers.layers[..],
    };
    // B-LoRA: the test-time adapter at its learned rank and bits (as its PEFT export folds it).
    for (m, layer) in blora_layers {
        let learned = layer.learned()?;
        let lossy: Vec<String> = learned
            .bits
            .iter()
            .filter(|(slot, bits)| !matches!(slot, Slot::LoraA | Slot::LoraE | Slot::LoraB) && **bits < 32)
            .map(|(slot, bits)| {
                let name = serde_json::to_value(slot).ok().and_then(|v| v.as_str().map(String::from));
                format!("{} at {bits} bits", name.unwrap_or_default())
            })
            .collect();
        if !lossy.is_empty() {
            return Err(Error::config(
                "merge",
                m,
                format!(
                    "this B-LoRA layer quantizes {}, which no merged weight can reproduce; use the run's \
                     exact compressed export (`bayeslora export RUN -o DIR`), or train with \
                     quantize_activations = false and quantize_base = false to merge",
                    lossy.join(", ")
                ),
            ));
        }
        let (a, b, _rank) = super::blora::folded(layer)?; // b carries the scaling
        deltas.insert(format!("{src_prefix}{m}.weight"), (1.0, a, b));
    }

    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut merged = 0usize;
    for name in &names {
        let Some(out_name) = rename(name) else {
            continue;
        };
        let t = base.load(name)?;
        let t = match deltas.get(name) {
            Some((s, a, b)) => {
                let (a, b) = (a.to_device(&Device::Cpu)?, b.to_device(&Device::Cpu)?);
                let delta = b.matmul(&a)?.affine(*s, 0.0)?; // [out, r]·[r, in]
                if delta.dims() != t.dims() {
                    return Err(Error::TensorShape {
                        file: file_of(name),
                        name: name.clone(),
                        expected: delta.dims().to_vec(),
                        got: t.dims().to_vec(),
                    });
                }
                merged += 1;
                t.to_dtype(DType::F32)?.add(&delta)?.to_dtype(t.dtype())?
            }
            None => t,
        };
        tensors.insert(out_name, t);
    }
    if merged != deltas.len() {
        let missing = deltas.keys().find(|k| !names.contains(k)).cloned().unwrap_or_default();
        return Err(Error::MissingTensor { file: file_of(&missing), name: missing });
    }
    let (config_path, mut config) = base.config_json()?;
    if let (true, Some(head)) = (as_seq_cls, &model.head) {
        for (n, v) in head.named_vars() {
            tensors.insert(n, v.as_tensor().to_device(&Device::Cpu)?.to_dtype(DType::F32)?);
        }
        let k = head.num_labels();
        let obj = config.as_object_mut().ok_or_else(|| Error::BadFile {
            file: config_path.clone(),
            reason: "config.json must hold a JSON object".into(),
        })?;
        obj.insert("architectures".into(), json!(["BertForSequenceClassification"]));
        let sized = obj.get("id2label").and_then(Value::as_object).is_some_and(|m| m.len() == k);
        if !sized {
            let id2label: serde_json::Map<String, Value> =
                (0..k).map(|i| (i.to_string(), json!(format!("LABEL_{i}")))).collect();
            let label2id: serde_json::Map<String, Value> = (0..k).map(|i| (format!("LABEL_{i}"), json!(i))).collect();
            obj.insert("id2label".into(), Value::Object(id2label));
            obj.insert("label2id".into(), Value::Object(label2id));
        }
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let weights = out.join("model.safetensors");
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    atomic::write_safetensors(&weights, &tensors, Some(metadata))?;
    atomic::write_json(&out.join("config.json"), &config)?;
    base.write_tokenizer(out)?;
    Ok(weights)
}

/// The base model a merge starts from: a safetensors HF folder, or a GGUF file (dequantized to
/// f32, with a transformers config.json and tokenizer.json rebuilt from its metadata, so the
/// merged folder loads in transformers without the GGUF).
enum Base {
    Folder { dir: PathBuf, files: Vec<PathBuf>, st: MmapedSafetensors },
    Gguf { file: PathBuf, ckpt: Box<crate::models::gguf::GgufCheckpoint> },
}

impl Base {
    fn open(path: &Path) -> Result<Base> {
        if path.is_file() && crate::models::gguf::is_gguf(path) {
            let ckpt = crate::models::gguf::read(path)?;
            return Ok(Base::Gguf { file: path.to_path_buf(), ckpt: Box::new(ckpt) });
        }
        let files = weight_files(path)?;
        // SAFETY: the mapping is read-only; as with every mmap loader (candle, HF), the files
        // must not be truncated or modified while we hold them.
        let st = unsafe { MmapedSafetensors::multi(&files) }
            .map_err(|e| Error::BadFile { file: files.first().cloned().unwrap_or_default(), reason: e.to_string() })?;
        Ok(Base::Folder { dir: path.to_path_buf(), files, st })
    }

    fn names(&self) -> Vec<String> {
        match self {
            Base::Folder { st, .. } => st.tensors().into_iter().map(|(n, _)| n).collect(),
            Base::Gguf { ckpt, .. } => ckpt.weights.names(),
        }
    }

    /// The file errors name.
    fn file(&self) -> PathBuf {
        match self {
            Base::Folder { files, .. } => files.first().cloned().unwrap_or_default(),
            Base::Gguf { file, .. } => file.clone(),
        }
    }

    fn load(&self, name: &str) -> Result<Tensor> {
        match self {
            Base::Folder { st, .. } => st
                .load(name, &Device::Cpu)
                .map_err(|e| Error::BadFile { file: self.file(), reason: format!("`{name}`: {e}") }),
            Base::Gguf { ckpt, .. } => ckpt.weights.get_unchecked(name, DType::F32, &Device::Cpu),
        }
    }

    fn config_json(&self) -> Result<(PathBuf, Value)> {
        match self {
            Base::Folder { dir, .. } => crate::models::config::read_config_json(dir),
            Base::Gguf { file, ckpt } => {
                let mut v = ckpt.config.to_hf_json("float32");
                let t = &ckpt.special_tokens;
                for (key, id) in [("bos_token_id", t.bos), ("eos_token_id", t.eos), ("pad_token_id", t.pad)] {
                    if let Some(id) = id {
                        v[key] = json!(id);
                    }
                }
                Ok((file.clone(), v))
            }
        }
    }

    /// The tokenizer files: copied from a folder; from a GGUF, `tokenizer.json` (the tokenizer
    /// rebuilt from its vocabulary) and a `tokenizer_config.json` naming its special tokens and
    /// chat template.
    fn write_tokenizer(&self, out: &Path) -> Result<()> {
        match self {
            Base::Folder { dir, .. } => {
                for f in COPIED {
                    let src = dir.join(f);
                    if src.is_file() {
                        let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
                        atomic::write(&out.join(f), &bytes)?;
                    }
                }
                Ok(())
            }
            Base::Gguf { file, ckpt } => {
                let text = ckpt
                    .tokenizer
                    .to_string(false)
                    .map_err(|e| Error::BadFile { file: file.clone(), reason: format!("tokenizer: {e}") })?;
                atomic::write(&out.join("tokenizer.json"), text.as_bytes())?;
                let token = |id: Option<u32>| id.and_then(|i| ckpt.tokenizer.id_to_token(i));
                let t = &ckpt.special_tokens;
                let mut cfg = json!({
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "model_max_length": ckpt.config.max_position_embeddings,
                    "clean_up_tokenization_spaces": false,
                });
                for (key, id) in
                    [("bos_token", t.bos), ("eos_token", t.eos), ("pad_token", t.pad), ("unk_token", t.unk)]
                {
                    if let Some(tok) = token(id) {
                        cfg[key] = json!(tok);
                    }
                }
                if let Some(template) = &ckpt.chat_template {
                    cfg["chat_template"] = json!(template);
                }
                atomic::write_json(&out.join("tokenizer_config.json"), &cfg)
            }
        }
    }
}
