//! `bayeslora export RUN -o OUT`: a train run folder's newest checkpoint as a peft LoRA folder
//! (+ the IVON posterior sidecar). Also the shared "open a run or an adapter" step of `merge`.
use crate::args::ExportArgs;
use crate::config::{AdapterKind, RunConfig};
use anyhow::{bail, Context, Result};
use bayeslora::export::{self, ExportOptions};
use bayeslora::models::LoadedModel;
use bayeslora::train::{Checkpoint, OptimizerKind, TaskModel};
use candle_core::Device;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

pub fn run(args: ExportArgs) -> Result<ExitCode> {
    let run = open_run(&args.run)?;
    let base_name = args.base_name.clone().unwrap_or_else(|| run.base.display().to_string());
    write_adapter(&run.model, &run.config, &base_name, run.posterior.as_ref(), &args.output)?;
    let n = run.model.adapters.len();
    let sidecar = match (&run.posterior, run.config.method) {
        (None, _) => "",
        (Some(_), AdapterKind::Lora) => ", IVON posterior sidecar",
        (Some(_), AdapterKind::Blora) => ", IVON posterior sidecar in compressed/",
    };
    eprintln!("wrote {} ({n} adapted modules{sidecar})", args.output.display());
    Ok(ExitCode::SUCCESS)
}

/// A trained model rebuilt from a run folder.
pub struct Run {
    pub config: RunConfig,
    /// The base model folder.
    pub base: PathBuf,
    pub model: TaskModel,
    /// The IVON posterior of the checkpoint (IVON runs only).
    pub posterior: Option<ivon::Posterior>,
}

/// Reads `<run>/config.toml`, loads its model and the newest checkpoint's adapter (and head).
pub fn open_run(run: &Path) -> Result<Run> {
    let config = RunConfig::open_run(run)?;
    let ckpt_root = config.train.checkpoint_dir.clone().unwrap_or_else(|| run.join("checkpoints"));
    let ckpt = Checkpoint::latest(&ckpt_root)
        .with_context(|| format!("no checkpoint under {}; train the run first", ckpt_root.display()))?;
    let device = super::pipeline::device(&config.device)?;
    let loaded = super::pipeline::load_model(&config)?;
    let base = loaded.dir.clone();
    let file = ckpt.join("trainable.safetensors");
    let saved =
        candle_core::safetensors::load(&file, &device).with_context(|| format!("reading {}", file.display()))?;
    let num_labels = saved.get("classifier.weight").and_then(|t| t.dims().first().copied()).unwrap_or(1);
    let model = super::pipeline::build_model(&config, loaded, num_labels, &device)?;
    for (name, var) in bayeslora::train::Classifier::trainable(&model) {
        let t = saved.get(&name).with_context(|| format!("{}: tensor `{name}` is missing", file.display()))?;
        if t.dims() != var.dims() {
            bail!("{}: tensor `{name}` has shape {:?}, the model {:?}", file.display(), t.dims(), var.dims());
        }
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    let buffers = ckpt.join("buffers.safetensors");
    if buffers.exists() {
        let saved = candle_core::safetensors::load(&buffers, &device)
            .with_context(|| format!("reading {}", buffers.display()))?;
        bayeslora::train::Classifier::load_buffers(&model, &saved)?;
    }
    let posterior = if config.train.optimizer == OptimizerKind::Ivon {
        let p = ckpt.join("optimizer.safetensors");
        Some(ivon::Posterior::load(&p).with_context(|| format!("reading {}", p.display()))?)
    } else {
        None
    };
    Ok(Run { config, base, model, posterior })
}

/// A bare task model over `loaded` (no adapters; BERT gets a head of `num_labels`, from the
/// checkpoint when it has one), ready for `export::load_peft`.
pub fn bare_model(loaded: LoadedModel, num_labels: usize, device: &Device) -> Result<TaskModel> {
    let head = bayeslora::train::head_for(&loaded.backbone, &loaded.weights, num_labels, 0, device)?;
    Ok(TaskModel::bare(loaded.backbone, head))
}

/// The number of classes of an adapter folder's head (`classifier.weight` rows), if it has one.
pub fn adapter_num_labels(dir: &Path) -> Result<Option<usize>> {
    let file = dir.join(export::WEIGHTS_FILE);
    let tensors =
        candle_core::safetensors::load(&file, &Device::Cpu).with_context(|| format!("reading {}", file.display()))?;
    let key = format!("{}classifier.weight", bayeslora::adapters::lora::PEFT_PREFIX);
    Ok(tensors.get(&key).and_then(|t| t.dims().first().copied()))
}

/// Writes the adapter of a finished run into `dir` (used by `train` for `<output>/adapter/`).
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
    let task = bayeslora::data::Task::from_name(&cfg.task)?;
    // Class names: the head's classes (encoders), or a decoder's label-word classes (GLUE
    // prompts); multiple choice has its choices instead.
    let labels = match (&model.head, task.decoder_template()) {
        (Some(h), _) => task.class_names(h.num_labels()),
        (None, Some((_, words))) => task.class_names(words.len()),
        (None, None) => Vec::new(),
    };
    export::write_task(dir, &export::AdapterTask { task: cfg.task.clone(), labels })?;
    if let Some(blora) = model.adapters.blora() {
        let peft = export::save_blora_peft(dir, model, blora, &cfg.blora, Some(base_name))
            .with_context(|| format!("exporting the B-LoRA adapter to {}", dir.display()))?;
        let compressed_dir = dir.join("compressed");
        let compressed = export::save_compressed(&compressed_dir, model, blora, &cfg.blora, posterior)
            .with_context(|| format!("exporting the compressed adapter to {}", compressed_dir.display()))?;
        let sizes = serde_json::json!({ "peft": peft, "compressed": compressed });
        super::pipeline::write_json(&dir.join("sizes.json"), &sizes)?;
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
