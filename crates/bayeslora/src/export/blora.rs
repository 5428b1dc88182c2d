//! B-LoRA out and back in (`specs/blora.md` "After training"): a plain PEFT LoRA at the learned
//! ranks, a compressed adapter (integer codes at the learned bits) that reloads bit for bit, the
//! BOPs report as JSON, and the learned ranks/bits as a heat map.
//!
//! - [`save_blora_peft`]: `A′ = Q(A)[:r′]`, `B′ = Q(B)[:, :r′]·diag(s·z_rank⊙Q(E))[:r′]`, written
//!   as a PEFT LoRA folder with `r` = the largest r′, `rank_pattern` {module: r′} and
//!   `alpha_pattern` {module: r′}, so PEFT's scaling α/r′ is 1 everywhere. It loads in HF peft and
//!   in [`super::load_peft`]. A LoRA cannot quantize activations (nor the base), so its logits match
//!   the gated model up to float error only when `quantize_activations` and `quantize_base` are off;
//!   otherwise they differ by the activation quantization error (a warning says so).
//! - [`save_compressed`] / [`load_compressed`]: `blora_compressed.safetensors` holds, per module,
//!   A[:r′], E[:r′], B[:, :r′] as integer codes at each tensor's learned bits (i8/u8 up to 8 bits,
//!   i16/u16 at 16; one code per byte, not bit-packed; f32 at 32 bits or when the tensor is not
//!   quantized), every gate logit and range (f32, exact), and the head; `blora_compressed.json`
//!   describes it. The loader reattaches the layers and sets A = k·s_b through the same
//!   dequantisation as the test-time forward, so the logits are identical to the gated model's.
//! - IVON × B-LoRA: [`save_compressed`] also writes the posterior sidecar over A, E, B (+ head)
//!   beside the compressed adapter, [`read_compressed_posterior`] reads it back for sampling.
//! - [`save_bops_report`]: the report as JSON + text (its heat map: [`crate::plot::plot_learned`]).
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, TensorView};

use super::config;
use super::{module_prefix, sidecar, task_type};
use crate::adapters::blora::quantizer::{self, Range, Slot};
use crate::adapters::blora::{attach_blora, render_table, AttachedBLora, BLoraConfig, BopsReport, LearnedLayer};
use crate::adapters::lora::{LoraConfig, TargetModules, PEFT_PREFIX};
use crate::train::{Adapters, BLora, Classifier, TaskModel};
use crate::{atomic, Error, Result};

/// `blora_compressed.safetensors`.
pub const COMPRESSED_TENSORS: &str = "blora_compressed.safetensors";
/// `blora_compressed.json`.
pub const COMPRESSED_JSON: &str = "blora_compressed.json";
/// The `format` field of [`COMPRESSED_JSON`].
pub const COMPRESSED_FORMAT: &str = "bayeslora-blora-compressed/1";

/// Sizes on disk of an export.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExportSizes {
    /// Every file written, with its size in bytes.
    pub files: Vec<(PathBuf, u64)>,
    pub total_bytes: u64,
    /// A, E, B at the initial rank in f32: what the adapter takes uncompressed.
    pub adapter_f32_bytes: u64,
    /// A, E, B as stored (compressed export: codes at learned ranks; PEFT: A′, B′ in f32).
    pub adapter_bytes: u64,
    /// `adapter_bytes` if the codes were bit-packed at their bit-widths.
    pub adapter_packed_bytes: u64,
}

fn sizes_of(files: &[PathBuf]) -> Result<(Vec<(PathBuf, u64)>, u64)> {
    let mut out = Vec::new();
    for f in files {
        let n = std::fs::metadata(f).map_err(|e| Error::io(f, e))?.len();
        out.push((f.clone(), n));
    }
    let total = out.iter().map(|(_, n)| n).sum();
    Ok((out, total))
}

fn f32_bytes(blora: &AttachedBLora) -> u64 {
    blora.layers.iter().map(|(_, l)| 4 * (l.rank() * (l.in_features() + 1 + l.out_features())) as u64).sum()
}

/// The PEFT-form tensors of one layer at its learned rank: `A′ [r′, in]`, `B′ [out, r′]`.
pub(crate) fn folded(layer: &crate::adapters::blora::BLoraLayer) -> Result<(Tensor, Tensor, usize)> {
    let rank = layer.learned()?.rank;
    let w = layer.eval_weights()?;
    let e = w.e.mul(&w.rank_mask)?.affine(layer.scaling(), 0.0)?.narrow(0, 0, rank)?;
    let a = w.a.narrow(0, 0, rank)?.contiguous()?;
    let b = w.b.narrow(1, 0, rank)?.broadcast_mul(&e.unsqueeze(0)?)?.contiguous()?;
    Ok((a, b, rank))
}

/// Writes `blora` (on `model`'s backbone, with `model`'s head) as a plain PEFT LoRA folder at the
/// learned ranks (see the module doc). `config` is the one the layers were attached with;
/// `base_model_name_or_path` goes into `adapter_config.json`.
pub fn save_blora_peft(
    dir: &Path,
    model: &TaskModel,
    blora: &AttachedBLora,
    config: &BLoraConfig,
    base_model_name_or_path: Option<&str>,
) -> Result<ExportSizes> {
    if blora.is_empty() {
        return Err(Error::config("adapters", "[]", "nothing to export: attach or load B-LoRA first"));
    }
    if config.quantize && (config.quantize_activations || config.quantize_base) {
        tracing::warn!(
            "{}: a PEFT LoRA cannot quantize activations or the base; its logits differ from the gated B-LoRA \
             model by that quantization error (the compressed export reproduces them exactly)",
            dir.display()
        );
    }
    let prefix = module_prefix(model);
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut ranks = BTreeMap::new();
    let mut adapter_bytes = 0u64;
    for (m, layer) in &blora.layers {
        let (a, b, rank) = folded(layer)?;
        adapter_bytes += 4 * (a.elem_count() + b.elem_count()) as u64;
        tensors.insert(format!("{PEFT_PREFIX}{prefix}{m}.lora_A.weight"), a.to_device(&Device::Cpu)?);
        tensors.insert(format!("{PEFT_PREFIX}{prefix}{m}.lora_B.weight"), b.to_device(&Device::Cpu)?);
        ranks.insert(m.clone(), rank);
    }
    let r_max = ranks.values().copied().max().unwrap_or(1);
    // α = r′ for every module: PEFT's scaling α/r′ is 1, the scale lives in B′.
    let rank_pattern: BTreeMap<String, usize> =
        ranks.iter().filter(|(_, &r)| r != r_max).map(|(m, &r)| (m.clone(), r)).collect();
    let alpha_pattern: BTreeMap<String, f64> = rank_pattern.iter().map(|(m, &r)| (m.clone(), r as f64)).collect();
    let lora = LoraConfig {
        r: r_max,
        lora_alpha: r_max as f64,
        lora_dropout: config.lora_dropout,
        target_modules: config.target_modules.clone(),
        rank_pattern: rank_pattern.clone(),
        alpha_pattern: alpha_pattern.clone(),
        ..LoraConfig::default()
    };
    let target_modules =
        super::target_modules_json(config.target_modules.as_ref(), prefix, blora.layers.iter().map(|(m, _)| m));
    if let Some(h) = &model.head {
        for (n, v) in h.named_vars() {
            tensors.insert(format!("{PEFT_PREFIX}{n}"), v.as_tensor().to_dtype(DType::F32)?.to_device(&Device::Cpu)?);
        }
    }
    let fields = config::ConfigFields {
        lora: &lora,
        target_modules,
        rank_pattern,
        alpha_pattern,
        task_type: task_type(model),
        base_model_name_or_path,
    };
    let files = super::write_peft_files(dir, &tensors, &fields)?;
    sidecar::remove_stale(dir)?;
    let (files, total_bytes) = sizes_of(&files)?;
    Ok(ExportSizes {
        files,
        total_bytes,
        adapter_f32_bytes: f32_bytes(blora),
        adapter_bytes,
        adapter_packed_bytes: adapter_bytes,
    })
}

/// How one tensor is stored in [`COMPRESSED_TENSORS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    I8,
    U8,
    I16,
    U16,
    /// Raw f32: 32 bits, or a tensor without a quantizer or with an unset range.
    F32,
}

impl Encoding {
    fn dtype(self) -> Dtype {
        match self {
            Encoding::I8 => Dtype::I8,
            Encoding::U8 => Dtype::U8,
            Encoding::I16 => Dtype::I16,
            Encoding::U16 => Dtype::U16,
            Encoding::F32 => Dtype::F32,
        }
    }

    fn encode(self, v: &[f32]) -> Vec<u8> {
        match self {
            Encoding::I8 => v.iter().map(|&x| (x as i8) as u8).collect(),
            Encoding::U8 => v.iter().map(|&x| x as u8).collect(),
            Encoding::I16 => v.iter().flat_map(|&x| (x as i16).to_le_bytes()).collect(),
            Encoding::U16 => v.iter().flat_map(|&x| (x as u16).to_le_bytes()).collect(),
            Encoding::F32 => v.iter().flat_map(|&x| x.to_le_bytes()).collect(),
        }
    }

    fn decode(self, b: &[u8]) -> Vec<f32> {
        match self {
            Encoding::I8 => b.iter().map(|&x| f32::from(x as i8)).collect(),
            Encoding::U8 => b.iter().map(|&x| f32::from(x)).collect(),
            Encoding::I16 => b.chunks_exact(2).map(|c| f32::from(i16::from_le_bytes([c[0], c[1]]))).collect(),
            Encoding::U16 => b.chunks_exact(2).map(|c| f32::from(u16::from_le_bytes([c[0], c[1]]))).collect(),
            Encoding::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        }
    }
}

/// One stored tensor in [`CompressedMeta`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StoredTensor {
    pub encoding: Encoding,
    /// The grid's bit-width (32 for raw f32).
    pub bits: u32,
    /// The stored shape (the learned rank, not the initial one).
    pub shape: Vec<usize>,
    /// The grid step s_b (the value is code·s_b); 0 for raw f32.
    pub step: f64,
}

/// One module in [`CompressedMeta`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CompressedModule {
    pub module: String,
    pub learned: LearnedLayer,
    /// `lora_A`, `lora_E`, `lora_B`.
    pub tensors: BTreeMap<String, StoredTensor>,
    /// Every quantizer's range, for reading (the exact values are in the safetensors file).
    pub ranges: BTreeMap<Slot, Range>,
}

/// [`COMPRESSED_JSON`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CompressedMeta {
    pub format: String,
    pub config: BLoraConfig,
    /// The module-name prefix of the keys (`bert.` for a BERT classifier).
    pub module_prefix: String,
    pub modules: Vec<CompressedModule>,
    pub sizes: ExportSizes,
}

fn weight_slot(name: &str) -> Slot {
    match name {
        "lora_A" => Slot::LoraA,
        "lora_E" => Slot::LoraE,
        _ => Slot::LoraB,
    }
}

/// The var name in [`crate::adapters::blora::BLoraLayer::named_state`].
fn var_name(name: &str) -> String {
    if name == "lora_E" {
        name.to_string()
    } else {
        format!("{name}.weight")
    }
}

/// Writes the compressed adapter (see the module doc) into `dir`, with `model`'s head.
///
/// With an IVON posterior (IVON × B-LoRA) the folder also gets the posterior sidecar
/// (`adapter_posterior.{safetensors,json}`, [`sidecar`]) over A, E, B and the head at the full
/// initial rank, keyed by [`Classifier::posterior_vars`]' names: the parameterisation the
/// posterior is over (the PEFT form folds E into B). [`read_compressed_posterior`] reads it
/// back; sampling A, E, B from it and running the gated model (its test-time gates and
/// quantizers) is `predict --samples K` on a B-LoRA adapter. Without a posterior, a sidecar
/// left in `dir` by an earlier export is removed. The sidecar is not counted in the sizes.
pub fn save_compressed(
    dir: &Path,
    model: &TaskModel,
    blora: &AttachedBLora,
    config: &BLoraConfig,
    posterior: Option<&ivon::Posterior>,
) -> Result<ExportSizes> {
    if blora.is_empty() {
        return Err(Error::config("adapters", "[]", "nothing to export: attach or load B-LoRA first"));
    }
    let prefix = module_prefix(model);
    let mut blobs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut modules = Vec::new();
    let (mut adapter_bytes, mut packed_bits) = (0u64, 0u64);
    for (m, layer) in &blora.layers {
        let key = format!("{PEFT_PREFIX}{prefix}{m}");
        let learned = layer.learned()?;
        let rank = learned.rank;
        let ranges = layer.ranges()?;
        let mut tensors = BTreeMap::new();
        for (name, var, dim) in
            [("lora_A", layer.lora_a(), 0), ("lora_E", layer.lora_e(), 0), ("lora_B", layer.lora_b(), 1)]
        {
            let slot = weight_slot(name);
            let t = var.as_tensor().narrow(dim, 0, rank)?.contiguous()?;
            let range = ranges.get(&slot).copied().filter(Range::is_set);
            let bits = learned.bits(slot).unwrap_or(32);
            let (encoding, values, step) = match range {
                Some(r) if bits < 32 => {
                    let enc = match (bits <= 8, r.signed()) {
                        (true, true) => Encoding::I8,
                        (true, false) => Encoding::U8,
                        (false, true) => Encoding::I16,
                        (false, false) => Encoding::U16,
                    };
                    (enc, quantizer::codes(&t, &r, bits)?, r.step(bits))
                }
                // 32 bits: the clipped f32 value, as the test-time forward uses it.
                Some(r) => (Encoding::F32, t.clamp(r.x_min, r.x_max)?, 0.0),
                None => (Encoding::F32, t, 0.0),
            };
            let stored_bits = if encoding == Encoding::F32 { 32 } else { bits };
            let v = values.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            let bytes = encoding.encode(&v);
            adapter_bytes += bytes.len() as u64;
            packed_bits += v.len() as u64 * u64::from(stored_bits);
            tensors.insert(
                name.to_string(),
                StoredTensor { encoding, bits: stored_bits, shape: values.dims().to_vec(), step },
            );
            blobs.push((format!("{key}.{name}.codes"), encoding.dtype(), values.dims().to_vec(), bytes));
        }
        // Gate logits and ranges, f32 and exact.
        for (n, t) in layer.named_state()? {
            if n.starts_with("blora_gates.") || n.starts_with("blora_ranges.") {
                let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                blobs.push((format!("{key}.{n}"), Dtype::F32, t.dims().to_vec(), Encoding::F32.encode(&v)));
            }
        }
        modules.push(CompressedModule { module: m.clone(), learned, tensors, ranges });
    }
    if let Some(h) = &model.head {
        for (n, v) in h.named_vars() {
            let t = v.as_tensor().to_dtype(DType::F32)?;
            let vals = t.flatten_all()?.to_vec1::<f32>()?;
            blobs.push((format!("{PEFT_PREFIX}{n}"), Dtype::F32, t.dims().to_vec(), Encoding::F32.encode(&vals)));
        }
    }
    let views = blobs
        .iter()
        .map(|(k, dt, shape, bytes)| {
            TensorView::new(*dt, shape.clone(), bytes)
                .map(|v| (k.clone(), v))
                .map_err(|e| Error::BadFile { file: dir.join(COMPRESSED_TENSORS), reason: e.to_string() })
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = HashMap::from([("format".to_string(), COMPRESSED_FORMAT.to_string())]);
    let bytes = safetensors::serialize(views, Some(metadata))
        .map_err(|e| Error::BadFile { file: dir.join(COMPRESSED_TENSORS), reason: e.to_string() })?;
    let tensors_path = dir.join(COMPRESSED_TENSORS);
    atomic::write(&tensors_path, &bytes)?;
    let mut meta = CompressedMeta {
        format: COMPRESSED_FORMAT.to_string(),
        config: config.clone(),
        module_prefix: prefix.to_string(),
        modules,
        sizes: ExportSizes {
            adapter_f32_bytes: f32_bytes(blora),
            adapter_bytes,
            adapter_packed_bytes: packed_bits.div_ceil(8),
            ..ExportSizes::default()
        },
    };
    // The JSON's own size is part of the total: write it, measure, write again with the sizes.
    let json_path = dir.join(COMPRESSED_JSON);
    atomic::write_json(&json_path, &meta)?;
    let (files, total_bytes) = sizes_of(&[tensors_path.clone(), json_path.clone()])?;
    meta.sizes.files = files;
    meta.sizes.total_bytes = total_bytes;
    atomic::write_json(&json_path, &meta)?;
    let (files, total_bytes) = sizes_of(&[tensors_path, json_path])?;
    match posterior {
        Some(p) => {
            let extras = serde_json::Map::from_iter([(
                "parameterisation".to_string(),
                serde_json::json!("B-LoRA A, E, B at the initial rank (+ head), before the gates and quantizers"),
            )]);
            sidecar::write(dir, &model.posterior_vars(), p, &extras)?;
        }
        None => sidecar::remove_stale(dir)?,
    }
    Ok(ExportSizes { files, total_bytes, ..meta.sizes })
}

/// The IVON posterior sidecar of a [`save_compressed`] folder over `model` (loaded with
/// [`load_compressed`]), in [`Classifier::posterior_vars`]' order; `Ok(None)` when the folder
/// has none (an AdamW run), with a warning. Its mean must reproduce the loaded model: the
/// gated forward quantizes the sampled A, E, B at the learned bits, so at K = 0 the logits are
/// the compressed adapter's.
pub fn read_compressed_posterior(
    dir: &Path,
    model: &TaskModel,
) -> Result<Option<(sidecar::PosteriorMeta, ivon::Posterior)>> {
    let keys: Vec<(String, Vec<usize>)> =
        model.posterior_vars().into_iter().map(|(n, v)| (n, v.dims().to_vec())).collect();
    sidecar::read(dir, &keys)
}

/// Reads a [`save_compressed`] folder into `model`: attaches the file's B-LoRA layers to the
/// backbone (which must carry no adapter on those modules), sets A, E, B from their codes, the
/// gates and ranges, and the head; `model.adapters` becomes the file's B-LoRA (prior μ included). Returns the
/// attached layers.
///
/// Errors: [`Error::Io`] naming a missing file, [`Error::BadFile`] for a foreign or inconsistent
/// file, [`Error::MissingTensor`] / [`Error::TensorShape`] naming the file and tensor.
pub fn load_compressed(dir: &Path, model: &mut TaskModel, device: &Device) -> Result<AttachedBLora> {
    let json_path = dir.join(COMPRESSED_JSON);
    let text = std::fs::read_to_string(&json_path).map_err(|e| Error::io(&json_path, e))?;
    let meta: CompressedMeta = serde_json::from_str(&text).map_err(|e| Error::BadFile {
        file: json_path.clone(),
        reason: format!("not a compressed B-LoRA description: {e}"),
    })?;
    if meta.format != COMPRESSED_FORMAT {
        return Err(Error::BadFile {
            file: json_path,
            reason: format!("format `{}`, expected `{COMPRESSED_FORMAT}`", meta.format),
        });
    }
    let file = dir.join(COMPRESSED_TENSORS);
    let bytes = std::fs::read(&file).map_err(|e| Error::io(&file, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::BadFile { file: file.clone(), reason: e.to_string() })?;
    let read = |name: &str, expected: Option<&[usize]>| -> Result<(Encoding, Vec<usize>, Vec<f32>)> {
        let v = st.tensor(name).map_err(|_| Error::MissingTensor { file: file.clone(), name: name.to_string() })?;
        let enc = match v.dtype() {
            Dtype::I8 => Encoding::I8,
            Dtype::U8 => Encoding::U8,
            Dtype::I16 => Encoding::I16,
            Dtype::U16 => Encoding::U16,
            Dtype::F32 => Encoding::F32,
            other => {
                return Err(Error::BadFile {
                    file: file.clone(),
                    reason: format!("tensor `{name}` has dtype {other:?}"),
                })
            }
        };
        if let Some(want) = expected {
            if v.shape() != want {
                return Err(Error::TensorShape {
                    file: file.clone(),
                    name: name.to_string(),
                    expected: want.to_vec(),
                    got: v.shape().to_vec(),
                });
            }
        }
        Ok((enc, v.shape().to_vec(), enc.decode(v.data())))
    };

    let mut cfg = meta.config.clone();
    cfg.target_modules = Some(TargetModules::List(meta.modules.iter().map(|m| m.module.clone()).collect()));
    let prefix = meta.module_prefix.clone();
    let attached = attach_blora(&mut model.backbone, &cfg, 0, device)?;
    for cm in &meta.modules {
        let layer = attached.get(&cm.module).ok_or_else(|| Error::BadFile {
            file: json_path.clone(),
            reason: format!("module `{}` not attached", cm.module),
        })?;
        let key = format!("{PEFT_PREFIX}{prefix}{}", cm.module);
        let mut state: HashMap<String, Tensor> = HashMap::new();
        for (n, t) in layer.named_state()? {
            if n.starts_with("blora_gates.") || n.starts_with("blora_ranges.") {
                let (_, shape, v) = read(&format!("{key}.{n}"), Some(t.dims()))?;
                state.insert(n, Tensor::from_vec(v, shape, device)?);
            }
        }
        let range_of = |slot: Slot| -> Result<Range> {
            let get = |end: &str| -> Result<f32> {
                let name = format!("blora_ranges.{}.{end}", slot.name());
                let t = state.get(&name).ok_or_else(|| Error::MissingTensor { file: file.clone(), name })?;
                Ok(t.to_vec1::<f32>()?.first().copied().unwrap_or(0.0))
            };
            Ok(Range { x_min: get("x_min")?, x_max: get("x_max")? })
        };
        let rank = cm.learned.rank;
        let mut weights = Vec::with_capacity(3);
        for (name, var, dim) in
            [("lora_A", layer.lora_a(), 0), ("lora_E", layer.lora_e(), 0), ("lora_B", layer.lora_b(), 1)]
        {
            let stored = cm.tensors.get(name).ok_or_else(|| Error::BadFile {
                file: json_path.clone(),
                reason: format!("{}: no entry for {name}", cm.module),
            })?;
            let mut shape = var.dims().to_vec();
            shape[dim] = rank;
            let (enc, _, v) = read(&format!("{key}.{name}.codes"), Some(&shape))?;
            let t = Tensor::from_vec(v, shape.clone(), device)?;
            // The same k·s_b as the test-time forward, so the values are the gated model's floats.
            let values = if enc == Encoding::F32 {
                t
            } else {
                quantizer::dequantize(&t, &range_of(weight_slot(name))?, stored.bits)?
            };
            let full = var.dims()[dim];
            let values = if rank < full {
                let mut pad = shape.clone();
                pad[dim] = full - rank;
                Tensor::cat(&[&values, &Tensor::zeros(pad, DType::F32, device)?], dim)?
            } else {
                values
            };
            weights.push((var_name(name), values));
        }
        state.extend(weights);
        layer.set_state(&state)?;
        let learned = layer.learned()?;
        if learned != cm.learned {
            return Err(Error::BadFile {
                file: file.clone(),
                reason: format!("{}: the gates give {learned:?}, the description says {:?}", cm.module, cm.learned),
            });
        }
    }
    let head_key = format!("{PEFT_PREFIX}classifier.weight");
    if st.names().iter().any(|n| **n == head_key) {
        let head = model.head.as_ref().ok_or_else(|| Error::BadFile {
            file: file.clone(),
            reason: "holds a classification head (classifier.*) but the model has none".into(),
        })?;
        for (n, var) in head.named_vars() {
            let (_, shape, v) = read(&format!("{PEFT_PREFIX}{n}"), Some(var.dims()))?;
            var.set(&Tensor::from_vec(v, shape, var.device())?.to_dtype(var.dtype())?)?;
        }
    }
    model.adapters = Adapters::Blora(BLora { layers: attached.clone(), mu: meta.config.mu, mu_warmup: 0 });
    Ok(attached)
}

/// Writes `report` as `<stem>.json` and its table as `<stem>.txt`; returns the paths.
pub fn save_bops_report(stem: &Path, report: &BopsReport) -> Result<Vec<PathBuf>> {
    let json = stem.with_extension("json");
    let txt = stem.with_extension("txt");
    atomic::write_json(&json, report)?;
    atomic::write(&txt, render_table(report).as_bytes())?;
    Ok(vec![json, txt])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_round_trip() {
        for (enc, v) in [
            (Encoding::I8, vec![-127f32, 0., 5., 127.]),
            (Encoding::U8, vec![0., 255.]),
            (Encoding::I16, vec![-32767., 1., 32767.]),
            (Encoding::U16, vec![0., 65535.]),
            (Encoding::F32, vec![1.5e-7, -3.25]),
        ] {
            assert_eq!(enc.decode(&enc.encode(&v)), v, "{enc:?}");
        }
    }
}
