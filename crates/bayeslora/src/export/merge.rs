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
use crate::train::TaskModel;
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
                "merge needs a safetensors model folder (model.safetensors or a sharded index; \
                 GGUF files cannot be merged)",
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
    let files = weight_files(base_dir)?;
    // SAFETY: the mapping is read-only; as with every mmap loader (candle, HF), the files must
    // not be truncated or modified while we hold them.
    let st = unsafe { MmapedSafetensors::multi(&files) }
        .map_err(|e| Error::BadFile { file: files.first().cloned().unwrap_or_default(), reason: e.to_string() })?;
    let mut names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    names.sort();
    let file_of = |_: &str| files.first().cloned().unwrap_or_default();

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
    let mut deltas: HashMap<String, (f64, Tensor, Tensor)> = model
        .adapters
        .layers
        .iter()
        .map(|(m, l)| {
            (
                format!("{src_prefix}{m}.weight"),
                (l.scaling(), l.lora_a().as_tensor().clone(), l.lora_b().as_tensor().clone()),
            )
        })
        .collect();
    // B-LoRA: the test-time adapter at its learned rank and bits (as its PEFT export folds it).
    for (m, layer) in &model.blora.layers {
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
        let t = st
            .load(name, &Device::Cpu)
            .map_err(|e| Error::BadFile { file: file_of(name), reason: format!("`{name}`: {e}") })?;
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
    let (config_path, mut config) = crate::models::config::read_config_json(base_dir)?;
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
    for f in COPIED {
        let src = base_dir.join(f);
        if src.is_file() {
            let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
            atomic::write(&out.join(f), &bytes)?;
        }
    }
    Ok(weights)
}
