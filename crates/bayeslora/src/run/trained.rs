//! A finished run rebuilt from its folder ([`TrainedRun`]) and written out: the adapter folder
//! ([`write_adapter`]) and, for B-LoRA, the BOPs report and learned-rank heat map
//! ([`write_bops`]).
use super::{write_json, RunConfig};
use crate::adapters::blora::{bops_report, AttachedBLora, BopsReport, LearnedLayer};
use crate::error::Context;
use crate::export::{self, ExportOptions};
use crate::models::LoadedModel;
use crate::train::{Checkpoint, Classifier, OptimizerKind, TaskModel};
use crate::{Error, Result};
use candle_core::Device;
use std::path::{Path, PathBuf};

/// A trained model rebuilt from a run folder.
pub struct TrainedRun {
    pub config: RunConfig,
    /// The base model folder.
    pub base: PathBuf,
    pub model: TaskModel,
    /// The IVON posterior of the checkpoint (IVON runs only).
    pub posterior: Option<ivon::Posterior>,
}

/// The newest good checkpoint of a run (read before its model loads, so that a run without one
/// fails at once).
pub fn latest_checkpoint(config: &RunConfig) -> Result<PathBuf> {
    let root = config.checkpoint_dir();
    Checkpoint::latest(&root).with_context(|| format!("no checkpoint under {}; train the run first", root.display()))
}

impl TrainedRun {
    /// Rebuilds the run of `config` (from [`RunConfig::open_run`]) over its base model `loaded`,
    /// with the adapter (and head) of the checkpoint `ckpt` ([`latest_checkpoint`]).
    pub fn open(config: RunConfig, ckpt: &Path, loaded: LoadedModel) -> Result<TrainedRun> {
        let device = super::device(&config.device)?;
        let base = loaded.dir.clone();
        let file = ckpt.join("trainable.safetensors");
        let saved =
            candle_core::safetensors::load(&file, &device).with_context(|| format!("reading {}", file.display()))?;
        let num_labels = saved.get("classifier.weight").and_then(|t| t.dims().first().copied()).unwrap_or(1);
        let model = super::build_model(&config, loaded, num_labels, &device)?;
        for (name, var) in Classifier::trainable(&model) {
            let t = saved.get(&name).with_context(|| format!("{}: tensor `{name}` is missing", file.display()))?;
            if t.dims() != var.dims() {
                return Err(Error::run(format!(
                    "{}: tensor `{name}` has shape {:?}, the model {:?}",
                    file.display(),
                    t.dims(),
                    var.dims()
                )));
            }
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        let buffers = ckpt.join("buffers.safetensors");
        if buffers.exists() {
            let saved = candle_core::safetensors::load(&buffers, &device)
                .with_context(|| format!("reading {}", buffers.display()))?;
            Classifier::load_buffers(&model, &saved)?;
        }
        let posterior = if config.train.optimizer == OptimizerKind::Ivon {
            let p = ckpt.join("optimizer.safetensors");
            Some(ivon::Posterior::load(&p).with_context(|| format!("reading {}", p.display()))?)
        } else {
            None
        };
        Ok(TrainedRun { config, base, model, posterior })
    }
}

/// A bare task model over `loaded` (no adapters; BERT gets a head of `num_labels`, from the
/// checkpoint when it has one), ready for `export::load_peft`.
pub fn bare_model(loaded: LoadedModel, num_labels: usize, device: &Device) -> Result<TaskModel> {
    let head = crate::train::head_for(&loaded.backbone, &loaded.weights, num_labels, 0, device)?;
    Ok(TaskModel::bare(loaded.backbone, head))
}

/// The number of classes of an adapter folder's head (`classifier.weight` rows), if it has one.
pub fn adapter_num_labels(dir: &Path) -> Result<Option<usize>> {
    let file = dir.join(export::WEIGHTS_FILE);
    let tensors =
        candle_core::safetensors::load(&file, &Device::Cpu).with_context(|| format!("reading {}", file.display()))?;
    let key = format!("{}classifier.weight", crate::adapters::lora::PEFT_PREFIX);
    Ok(tensors.get(&key).and_then(|t| t.dims().first().copied()))
}

/// Writes the adapter of a finished run into `dir` (`<output>/adapter/` after training).
/// B-LoRA: `dir` gets the PEFT LoRA at the learned ranks (`rank_pattern`) and `dir/compressed/`
/// the integer-coded adapter that reproduces the gated model's logits exactly; the sizes on disk
/// go to `dir/sizes.json`. An IVON × B-LoRA posterior goes beside the compressed adapter
/// (`dir/compressed/adapter_posterior.*`, over A, E, B), not beside the PEFT form, which folds E
/// into B and so changes the parameterisation the posterior is over.
pub fn write_adapter(
    model: &TaskModel,
    cfg: &RunConfig,
    base_name: &str,
    posterior: Option<&ivon::Posterior>,
    dir: &Path,
) -> Result<()> {
    let task = crate::data::Task::from_name(&cfg.task)?;
    // Class names: the head's classes (encoders), or a decoder's label-word classes (the run's
    // own words, else a GLUE task's prompt); multiple choice has its choices instead.
    let decoder_words = match model.head {
        Some(_) => None,
        None if !cfg.label_words.is_empty() => Some(cfg.label_words.len()),
        None => task.decoder_template().map(|(_, words)| words.len()),
    };
    let labels = match (&model.head, decoder_words) {
        (Some(h), _) => task.class_names(h.num_labels()),
        (None, Some(n)) => task.class_names(n),
        (None, None) => Vec::new(),
    };
    let (label_words, template) = match model.head {
        Some(_) => (Vec::new(), None),
        None => (cfg.label_words.clone(), cfg.template.clone()),
    };
    export::write_task(dir, &export::AdapterTask { task: cfg.task.clone(), labels, label_words, template })?;
    if let Some(blora) = model.adapters.blora() {
        let peft = export::save_blora_peft(dir, model, blora, &cfg.blora, Some(base_name))
            .with_context(|| format!("exporting the B-LoRA adapter to {}", dir.display()))?;
        let compressed_dir = dir.join("compressed");
        let compressed = export::save_compressed(&compressed_dir, model, blora, &cfg.blora, posterior)
            .with_context(|| format!("exporting the compressed adapter to {}", compressed_dir.display()))?;
        let sizes = serde_json::json!({ "peft": peft, "compressed": compressed });
        write_json(&dir.join("sizes.json"), &sizes)?;
        return Ok(());
    }
    let mut opts = ExportOptions::new(cfg.lora.clone());
    opts.base_model_name_or_path = Some(base_name.to_string());
    let extras = [
        ("task", serde_json::json!(cfg.task)),
        ("optimizer", serde_json::to_value(cfg.train.optimizer)?),
        ("seed", serde_json::json!(cfg.train.seed)),
        ("max_len", serde_json::json!(cfg.max_len)),
        ("eval_samples", serde_json::json!(cfg.eval.samples)),
        ("code_version", serde_json::json!(env!("CARGO_PKG_VERSION"))),
    ];
    for (k, v) in extras {
        opts.extras.insert(k.into(), v);
    }
    export::save_peft(dir, model, &opts, posterior)
        .with_context(|| format!("exporting the adapter to {}", dir.display()))
}

/// What [`write_bops`] computed and wrote.
pub struct Bops {
    pub report: BopsReport,
    /// Learned rank and bits per module.
    pub learned: Vec<(String, LearnedLayer)>,
    pub files: Vec<PathBuf>,
}

/// Computes the BOPs report of `blora` (weights at `precision` bits, `tokens` tokens) and writes
/// `<stem>.{json,txt}` and the learned ranks/bits heat map `<stem>_learned.{png,svg}`.
pub fn write_bops(blora: &AttachedBLora, stem: &Path, precision: u32, tokens: f64) -> Result<Bops> {
    let learned = blora.learned()?;
    let report = bops_report(&learned, precision, tokens)?;
    if let Some(dir) = stem.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut files = export::save_bops_report(stem, &report)?;
    let name = stem.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "bops".into());
    files.extend(crate::plot::plot_learned(&stem.with_file_name(format!("{name}_learned")), &learned)?);
    Ok(Bops { report, learned, files })
}

/// What a B-LoRA model learned, for result files (`results.json` info, `compare` cells): BOPs
/// against LoRA of the same initial rank (the report's ratios and totals), mean learned rank,
/// mean bit-width over every quantized tensor, and the per-layer table.
pub fn bops_summary(report: &BopsReport, learned: &[(String, LearnedLayer)]) -> serde_json::Value {
    let n = learned.len().max(1) as f64;
    let mean_rank = learned.iter().map(|(_, l)| l.rank as f64).sum::<f64>() / n;
    let bits: Vec<f64> = learned.iter().flat_map(|(_, l)| l.bits.values().map(|&b| f64::from(b))).collect();
    let mean_bits = (!bits.is_empty()).then(|| bits.iter().sum::<f64>() / bits.len() as f64);
    serde_json::json!({
        "ratio": report.ratio,
        "adapter_ratio": report.adapter_ratio,
        "reduction_percent": report.reduction_percent,
        "adapter_reduction_percent": report.adapter_reduction_percent,
        "mean_rank": mean_rank,
        "mean_bits": mean_bits,
        "totals": report.totals,
        "learned": learned,
    })
}
