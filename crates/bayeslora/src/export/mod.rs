//! Adapters in and out: the HF peft LoRA folder (`adapter_config.json` +
//! `adapter_model.safetensors`, `reference/peers.md` §4), our posterior sidecar, and merged
//! full models.
//!
//! # Brief overview
//! - [`save_peft`] writes a [`TaskModel`]'s adapter exactly as peft 0.21 `save_pretrained` does:
//!   keys `base_model.model.<HF module>.lora_A.weight` (`[r, in]`) / `lora_B.weight` (`[out, r]`),
//!   the adapter name stripped, BERT modules under `bert.` (peft wraps
//!   `BertForSequenceClassification`), the head as `base_model.model.classifier.{weight,bias}`
//!   (`modules_to_save`), safetensors metadata `{"format": "pt"}`, and the full peft config with
//!   a resolved `target_modules` list and per-module `rank_pattern`/`alpha_pattern`. With an
//!   IVON posterior it adds `adapter_posterior.{safetensors,json}` (see [`sidecar`]), which
//!   other tools ignore.
//! - [`load_peft`] reads such a folder (from peft or from us) into a [`TaskModel`]: it attaches
//!   the adapters the file describes (or fills those already attached), sets the head, and returns
//!   a [`PeftAdapter`] whose [`PeftAdapter::predictor`] samples the posterior again when the
//!   sidecar is there (mean only, with a warning, when it is not).
//! - [`merge`] writes a full model folder with `W + scaling·B·A` folded in (and the head under
//!   its HF names), loadable by transformers and by [`crate::models::load`] without adapters.
//!
//! Every file is written to a temporary name and renamed.
//!
//! # Example
//! ```no_run
//! use bayeslora::export::{self, ExportOptions};
//! # fn demo(model: &bayeslora::train::TaskModel, lora: &bayeslora::adapters::LoraConfig,
//! #         ivon: &bayeslora::ivon::Ivon) -> bayeslora::Result<()> {
//! let opts = ExportOptions::new(lora.clone());
//! export::save_peft("runs/rte/adapter".as_ref(), model, &opts, Some(&ivon.posterior()?))?;
//! # Ok(()) }
//! ```
pub mod blora;
pub mod config;
mod merge;
pub mod sidecar;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};

use crate::adapters::lora::{attach, scaling, LoraConfig, TargetModules, PEFT_PREFIX};
use crate::eval::ModelPredictor;
use crate::models::{Architecture, Backbone};
use crate::train::{Adapters, Classifier, TaskModel};
use crate::{atomic, Error, Result};

pub use blora::{
    load_compressed, read_compressed_posterior, save_blora_peft, save_bops_report, save_compressed, ExportSizes,
};
pub use config::{AdapterConfig, TaskType, CONFIG_FILE};
pub use merge::merge;
pub use sidecar::{PosteriorMeta, PosteriorParam, POSTERIOR_JSON, POSTERIOR_TENSORS};

/// `adapter_model.safetensors`.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// `adapter_task.json` (ours, beside peft's files, which it leaves alone): the task an adapter
/// was trained on, its class names (so `predict` prints `positive`, not `LABEL_1`) and, for a
/// decoder trained on its own label words, those words and the prompt template.
pub const TASK_FILE: &str = "adapter_task.json";

/// What [`TASK_FILE`] holds.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdapterTask {
    pub task: String,
    /// Class names in class order (empty for regression).
    pub labels: Vec<String>,
    /// A decoder's label words, one per class, when the run set its own (`jsonl_text`; GLUE
    /// tasks have theirs in `Task::decoder_template`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub label_words: Vec<String>,
    /// A decoder's prompt template with `{text}` and `{text_pair}`, when the run set one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
}

/// Writes [`TASK_FILE`] into `dir` (atomically).
pub fn write_task(dir: &Path, task: &AdapterTask) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    atomic::write_json(&dir.join(TASK_FILE), task)
}

/// Reads [`TASK_FILE`] of an adapter folder; `None` when absent (peft's own adapters, older
/// exports), an error naming the file when it is there but unreadable.
pub fn read_task(dir: &Path) -> Result<Option<AdapterTask>> {
    let path = dir.join(TASK_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&path, e)),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::BadFile { file: path, reason: format!("not a task file ({e}); delete it or export again") })
}

/// What [`save_peft`] needs besides the model.
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// The config the adapters were attached with (its `r`, `lora_alpha`, `lora_dropout`,
    /// `use_rslora`, `target_modules` are written; per-module ranks come from the layers).
    pub lora: LoraConfig,
    /// `base_model_name_or_path`: a hub id or the model folder.
    pub base_model_name_or_path: Option<String>,
    /// Extra fields for `adapter_posterior.json` (task, label names, metrics, …).
    pub extras: serde_json::Map<String, serde_json::Value>,
}

impl ExportOptions {
    pub fn new(lora: LoraConfig) -> Self {
        ExportOptions { lora, ..Default::default() }
    }
}

/// The module-name prefix peft puts between `base_model.model.` and the backbone's own module
/// names: `bert.` when peft wraps `BertForSequenceClassification`, nothing for a bare encoder
/// or a `*ForCausalLM` (whose names already start with `model.`).
fn module_prefix(model: &TaskModel) -> &'static str {
    match (&model.backbone, &model.head) {
        (Backbone::Bert(_), Some(_)) => "bert.",
        (Backbone::DebertaV2(_), Some(_)) => "deberta.",
        _ => "",
    }
}

fn arch_of(backbone: &Backbone) -> Architecture {
    match backbone {
        Backbone::Bert(_) => Architecture::Bert,
        Backbone::DebertaV2(_) => Architecture::DebertaV2,
        _ => Architecture::Llama,
    }
}

fn task_type(model: &TaskModel) -> TaskType {
    match (&model.backbone, &model.head) {
        (Backbone::Bert(_) | Backbone::DebertaV2(_), Some(_)) => TaskType::SeqCls,
        (Backbone::Bert(_) | Backbone::DebertaV2(_), None) => TaskType::FeatureExtraction,
        _ => TaskType::CausalLm,
    }
}

/// `model.trainable()` with the names peft uses on disk, in the same order (adapter tensors,
/// then the head), which is also the IVON optimizer's flat order.
pub fn peft_named_vars(model: &TaskModel) -> Vec<(String, Var)> {
    let mut vars = match model.adapters.lora() {
        Some(lora) => lora.named_vars_with_prefix(module_prefix(model)),
        None => Vec::new(),
    };
    if let Some(h) = &model.head {
        vars.extend(h.named_vars().into_iter().map(|(n, v)| (format!("{PEFT_PREFIX}{n}"), v)));
    }
    vars
}

/// Writes `model`'s adapter (its current values: for IVON the posterior mean μ) as a peft LoRA
/// folder `dir`, plus the posterior sidecar when `posterior` is given (its flat order must be
/// `model.trainable()`'s, as the optimizer built by `train::run` has it). Without a posterior,
/// a sidecar left in `dir` by an earlier export is removed.
pub fn save_peft(
    dir: &Path,
    model: &TaskModel,
    options: &ExportOptions,
    posterior: Option<&ivon::Posterior>,
) -> Result<()> {
    let adapters = match &model.adapters {
        Adapters::Lora(a) if !a.is_empty() => a,
        Adapters::Blora(_) => {
            return Err(Error::config(
                "adapters",
                "B-LoRA",
                "a B-LoRA model is exported by save_blora_peft (learned ranks) and save_compressed",
            ))
        }
        _ => return Err(Error::config("adapters", "[]", "nothing to export: attach or load an adapter first")),
    };
    let lora = options.lora.clone().with_default_targets(arch_of(&model.backbone));
    lora.validate()?;
    let prefix = module_prefix(model);
    let mut rank_pattern = BTreeMap::new();
    let mut alpha_pattern = BTreeMap::new();
    for (module, layer) in &adapters.layers {
        let r = layer.rank();
        let alpha = lora.alpha_for(module)?;
        let expected = scaling(alpha, r, lora.use_rslora);
        if (expected - layer.scaling()).abs() > 1e-9 * expected.abs().max(1.0) {
            return Err(Error::config(
                "lora_alpha",
                alpha,
                format!(
                    "{module} has scaling {} but the config gives {expected}; pass the LoraConfig the adapters were attached with",
                    layer.scaling()
                ),
            ));
        }
        // The backbone's full module path: peft matches `(.*\.)?{key}$`, so it selects exactly
        // this module under any prefix (`bert.`).
        if r != lora.r {
            rank_pattern.insert(module.clone(), r);
        }
        if alpha != lora.lora_alpha {
            alpha_pattern.insert(module.clone(), alpha);
        }
    }
    let target_modules =
        target_modules_json(lora.target_modules.as_ref(), prefix, adapters.layers.iter().map(|(m, _)| m));
    let fields = config::ConfigFields {
        lora: &lora,
        target_modules,
        rank_pattern,
        alpha_pattern,
        task_type: task_type(model),
        base_model_name_or_path: options.base_model_name_or_path.as_deref(),
    };
    let named = peft_named_vars(model);
    let tensors: HashMap<String, Tensor> = named
        .iter()
        .map(|(n, v)| Ok((n.clone(), v.as_tensor().to_dtype(DType::F32)?.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    write_peft_files(dir, &tensors, &fields)?;
    match posterior {
        Some(p) => sidecar::write(dir, &named, p, &options.extras),
        None => sidecar::remove_stale(dir),
    }
}

/// `target_modules` of `adapter_config.json`. A list is written as given: suffix matching does
/// not depend on the `bert.` prefix, so it selects the same modules in peft as in `attach`. A
/// regex is matched against peft's names (with the prefix), so the adapted `modules` are written
/// instead, prefixed.
pub(crate) fn target_modules_json<'a>(
    targets: Option<&TargetModules>,
    prefix: &str,
    modules: impl Iterator<Item = &'a String>,
) -> serde_json::Value {
    match targets {
        Some(TargetModules::List(names)) => serde_json::json!(names),
        _ => serde_json::json!(modules.map(|m| format!("{prefix}{m}")).collect::<Vec<_>>()),
    }
}

/// Writes `adapter_model.safetensors` (metadata `{"format": "pt"}`, as peft saves it) and
/// `adapter_config.json` into `dir` (created), each atomically; returns the two paths.
pub(crate) fn write_peft_files(
    dir: &Path,
    tensors: &HashMap<String, Tensor>,
    fields: &config::ConfigFields<'_>,
) -> Result<[PathBuf; 2]> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let files = [dir.join(WEIGHTS_FILE), dir.join(CONFIG_FILE)];
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    atomic::write_safetensors(&files[0], tensors, Some(metadata))?;
    atomic::write_json(&files[1], &config::to_json(fields))?;
    Ok(files)
}

/// An adapter folder as [`load_peft`] read it.
#[derive(Debug, Clone)]
pub struct PeftAdapter {
    pub dir: PathBuf,
    /// `adapter_config.json` as written.
    pub file_config: AdapterConfig,
    /// The config that reproduces the loaded adapters with [`attach`] on the backbone's own
    /// module names: explicit targets and per-module `rank_pattern`/`alpha_pattern`. Pass it to
    /// [`save_peft`] to write the adapter again.
    pub lora: LoraConfig,
    /// The IVON posterior over `model.trainable()` (flat order), when the sidecar is there.
    pub posterior: Option<(PosteriorMeta, ivon::Posterior)>,
}

impl PeftAdapter {
    /// A predictor over the loaded model: posterior samples when the sidecar was found (K > 0
    /// allowed), else the mean adapter only.
    pub fn predictor<'a>(&self, model: &'a TaskModel, device: &Device, seed: u64) -> Result<ModelPredictor<'a>> {
        ModelPredictor::stored(model, self.posterior.as_ref().map(|(_, p)| p), device, seed)
    }
}

fn missing_file(path: PathBuf, hint: &str) -> Error {
    Error::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, hint.to_string()))
}

/// Loads the peft LoRA folder `dir` into `model`.
///
/// When `model` carries no adapters ([`Adapters::Bare`]), the adapters the file holds are attached to the backbone
/// (vars on `device`); otherwise the attached set must be the file's (same modules and ranks)
/// and only their values are set. A `classifier` in the file replaces the head's values. With
/// the sidecar present, the IVON posterior comes back for sampling.
///
/// Errors: [`Error::Io`] naming a missing file; [`Error::BadFile`] for a method or option we do
/// not run ("not supported yet", e.g. DoRA or IA3) and for tensors the model has no place for;
/// [`Error::TensorShape`] naming the file and tensor when the adapter belongs to another base.
pub fn load_peft(dir: &Path, model: &mut TaskModel, device: &Device) -> Result<PeftAdapter> {
    let cfg_path = dir.join(CONFIG_FILE);
    if !cfg_path.is_file() {
        return Err(missing_file(cfg_path, "no adapter_config.json; is this a peft adapter folder?"));
    }
    let file_config = config::read(dir)?;
    let file = dir.join(WEIGHTS_FILE);
    if !file.is_file() {
        let hint = if dir.join("adapter_model.bin").is_file() {
            "only the legacy adapter_model.bin is present; re-save it with safe_serialization=True"
        } else {
            "no adapter_model.safetensors"
        };
        return Err(missing_file(file, hint));
    }
    let saved = candle_core::safetensors::load(&file, &Device::Cpu)
        .map_err(|e| Error::BadFile { file: file.clone(), reason: e.to_string() })?;

    // Which modules the file adapts, named as the backbone names them.
    // peft names an encoder's modules under its `*ForSequenceClassification` wrapper.
    let wrapper = match model.backbone {
        Backbone::Bert(_) => "bert.",
        Backbone::DebertaV2(_) => "deberta.",
        _ => "",
    };
    let prefix = if !wrapper.is_empty() && saved.keys().any(|k| k.starts_with(&format!("{PEFT_PREFIX}{wrapper}"))) {
        wrapper
    } else {
        ""
    };
    let head_keys = [format!("{PEFT_PREFIX}classifier.weight"), format!("{PEFT_PREFIX}classifier.bias")];
    let mut modules: BTreeMap<String, usize> = BTreeMap::new(); // module → rank
    let mut a_keys: BTreeMap<String, (String, Vec<usize>)> = BTreeMap::new(); // module → (A key, shape)
    let mut unexpected = Vec::new();
    for (key, t) in &saved {
        let Some(rest) = key.strip_prefix(PEFT_PREFIX) else {
            unexpected.push(key.clone());
            continue;
        };
        if let Some(m) = rest.strip_suffix(".lora_A.weight") {
            let m = m.strip_prefix(prefix).unwrap_or(m);
            modules.insert(m.to_string(), t.dims().first().copied().unwrap_or(0));
            a_keys.insert(m.to_string(), (key.clone(), t.dims().to_vec()));
        } else if !(rest.ends_with(".lora_B.weight") || head_keys.contains(key)) {
            unexpected.push(key.clone());
        }
    }
    if let Some(k) = unexpected.first() {
        return Err(Error::BadFile {
            file: file.clone(),
            reason: format!(
                "tensor `{k}` is not a LoRA A/B matrix or the classifier head ({} such tensors); \
                 embedding LoRA, DoRA magnitudes and other modules_to_save are not supported yet",
                unexpected.len()
            ),
        });
    }
    if modules.is_empty() {
        return Err(Error::BadFile { file: file.clone(), reason: "holds no `*.lora_A.weight` tensor".into() });
    }
    let fc = &file_config.lora;
    let mut lora = LoraConfig {
        r: fc.r,
        lora_alpha: fc.lora_alpha,
        lora_dropout: fc.lora_dropout,
        use_rslora: fc.use_rslora,
        target_modules: Some(TargetModules::List(modules.keys().cloned().collect())),
        ..LoraConfig::default()
    };
    for (m, &r) in &modules {
        // peft builds each module at the config's rank and then refuses weights of another
        // shape; so do we, rather than trusting the tensors silently.
        let want = fc.rank_for(&format!("{prefix}{m}"))?;
        if r != want {
            let source = if want == fc.r { "r".to_string() } else { "its rank_pattern entry".to_string() };
            let (key, shape) = a_keys.get(m).cloned().unwrap_or_default();
            return Err(Error::BadFile {
                file: cfg_path.clone(),
                reason: format!(
                    "module `{m}`: {source} says rank {want}, but `{key}` has shape {shape:?} (rank {r}); \
                     the config and the weights disagree (peft refuses this adapter too)"
                ),
            });
        }
        if r != fc.r {
            lora.rank_pattern.insert(m.clone(), r);
        }
        // Patterns in the file name modules from the task model's root (`bert.…`).
        let alpha = fc.alpha_for(&format!("{prefix}{m}"))?;
        if alpha != fc.lora_alpha {
            lora.alpha_pattern.insert(m.clone(), alpha);
        }
    }

    let fresh = model.adapters.is_empty();
    if fresh {
        model.adapters = Adapters::Lora(attach(&mut model.backbone, &lora, 0, device)?);
    }
    let Some(adapters) = model.adapters.lora().cloned() else {
        return Err(Error::BadFile {
            file: file.clone(),
            reason: "the model carries B-LoRA layers; load a LoRA into a model without adapters".into(),
        });
    };
    if !fresh {
        let have: BTreeSet<&str> = adapters.layers.iter().map(|(m, _)| m.as_str()).collect();
        let want: BTreeSet<&str> = modules.keys().map(String::as_str).collect();
        if have != want {
            let diff: Vec<&&str> = want.symmetric_difference(&have).take(3).collect();
            return Err(Error::BadFile {
                file: file.clone(),
                reason: format!(
                    "adapts modules {diff:?} differently from the model's attached adapters; \
                     load into a model without adapters to attach the file's"
                ),
            });
        }
    }
    for (module, layer) in &adapters.layers {
        let key = |ab: &str| format!("{PEFT_PREFIX}{prefix}{module}.{ab}.weight");
        let get = |ab: &str, expected: &[usize]| -> Result<Tensor> {
            let name = key(ab);
            let t = saved.get(&name).ok_or_else(|| Error::MissingTensor { file: file.clone(), name: name.clone() })?;
            if t.dims() != expected {
                return Err(Error::TensorShape {
                    file: file.clone(),
                    name,
                    expected: expected.to_vec(),
                    got: t.dims().to_vec(),
                });
            }
            Ok(t.clone())
        };
        let a = get("lora_A", layer.lora_a().dims())?;
        let b = get("lora_B", layer.lora_b().dims())?;
        layer.set_weights(&a, &b)?;
        let alpha = lora.alpha_for(module)?;
        let want = scaling(alpha, layer.rank(), lora.use_rslora);
        if (want - layer.scaling()).abs() > 1e-9 * want.abs().max(1.0) {
            return Err(Error::config(
                "lora_alpha",
                alpha,
                format!("{module}: the file's scaling {want} differs from the attached adapter's {}", layer.scaling()),
            ));
        }
    }
    if saved.contains_key(&head_keys[0]) {
        let head = model.head.as_ref().ok_or_else(|| Error::BadFile {
            file: file.clone(),
            reason: "holds a classification head (classifier.*) but the model has none".into(),
        })?;
        for (name, var) in head.named_vars() {
            let key = format!("{PEFT_PREFIX}{name}");
            let t = saved.get(&key).ok_or_else(|| Error::MissingTensor { file: file.clone(), name: key.clone() })?;
            if t.dims() != var.dims() {
                return Err(Error::TensorShape {
                    file: file.clone(),
                    name: key,
                    expected: var.dims().to_vec(),
                    got: t.dims().to_vec(),
                });
            }
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
    }

    let keys: Vec<(String, Vec<usize>)> =
        peft_named_vars(model).into_iter().map(|(n, v)| (n, v.dims().to_vec())).collect();
    let posterior = sidecar::read(dir, &keys)?;
    if let Some((_, p)) = &posterior {
        // μ is what peft loads: the adapter file and the sidecar must agree.
        let current: Vec<f32> = model
            .trainable()
            .iter()
            .map(|(_, v)| Ok(v.as_tensor().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?))
            .collect::<Result<Vec<_>>>()?
            .concat();
        let worst = current.iter().zip(&p.mean).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        if worst > 1e-6 {
            tracing::warn!(
                "{}: the sidecar's mean differs from adapter_model.safetensors by up to {worst:e}; \
                 the adapter file was edited after export?",
                dir.display()
            );
        }
    }
    Ok(PeftAdapter { dir: dir.to_path_buf(), file_config, lora, posterior })
}
