//! Models: a Hugging Face model folder → a frozen backbone whose linears are adapter slots.
//!
//! The one entry point is [`load`]: it reads config.json, picks the architecture
//! ([`Architecture::detect`]), opens the weights ([`Weights`]: safetensors, single or sharded,
//! memory-mapped), builds the [`Backbone`] and loads tokenizer.json (fixed truncation and
//! padding removed). One file (or folder) per architecture (`bert.rs`, `llama/`), each in the
//! shape of candle's `models/llama.rs`, calling [`crate::ops`] for everything that needs a
//! gradient.
//! Models know the adapter slot ([`linear::Adapter`]), never LoRA itself.
//!
//! ```no_run
//! use bayeslora::models::{self, Backbone, LoadOptions};
//! let m = models::load(std::path::Path::new("all-MiniLM-L6-v2"), &LoadOptions::default())?;
//! assert_eq!(m.arch, models::Architecture::Bert);
//! # Ok::<(), bayeslora::Error>(())
//! ```
pub mod bert;
pub mod config;
pub mod deberta_v2;
mod encoder;
pub mod gguf;
pub mod linear;
pub mod llama;
pub mod load;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use tokenizers::Tokenizer;

pub use bert::{Bert, BertConfig, HeadConfig, SequenceClassificationHead};
pub use config::{load_tokenizer, Architecture};
pub use deberta_v2::{DebertaV2, DebertaV2Config};
pub use llama::{Llama, LlamaConfig};
pub use load::Weights;

use crate::{Error, Result};
use linear::{HasLinears, Linear};

/// How to materialize the frozen weights.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Compute dtype of the frozen backbone (adapters keep f32 state regardless).
    pub dtype: DType,
    pub device: Device,
}

impl Default for LoadOptions {
    /// f32 on the CPU.
    fn default() -> Self {
        LoadOptions { dtype: DType::F32, device: Device::Cpu }
    }
}

/// The backbone of a loaded model, one variant per architecture file.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Backbone {
    Bert(Bert),
    /// DeBERTa-v2/v3 encoders.
    DebertaV2(DebertaV2),
    /// Llama, Mistral and Qwen2.
    Llama(Llama),
}

impl HasLinears for Backbone {
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        match self {
            Backbone::Bert(m) => m.linears_mut(),
            Backbone::DebertaV2(m) => m.linears_mut(),
            Backbone::Llama(m) => m.linears_mut(),
        }
    }
}

/// What [`load`] returns: the backbone and what a trainer needs next to it. A clone shares the
/// frozen weights (candle tensors are reference-counted), so one load serves many runs that each
/// attach their own adapters to their clone.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    pub arch: Architecture,
    pub backbone: Backbone,
    /// tokenizer.json with truncation and padding removed; `None` if the folder has none
    /// (use [`LoadedModel::tokenizer`] for an error that says so).
    pub tokenizer: Option<Tokenizer>,
    /// config.json as read (task heads read `id2label`, `initializer_range`... from it).
    pub config_json: serde_json::Value,
    /// The model folder (or the `.gguf` file).
    pub dir: PathBuf,
    /// The checkpoint's tensors, kept open (memory-mapped) for task heads such as
    /// [`SequenceClassificationHead::load_or_init`].
    pub weights: Weights,
}

impl LoadedModel {
    /// The model's hidden size (`hidden_size` of its config.json, or of the config read from a
    /// GGUF), if it states one.
    pub fn hidden_size(&self) -> Option<usize> {
        self.config_json.get("hidden_size").and_then(|v| v.as_u64()).map(|v| v as usize)
    }

    /// The tokenizer, or an error naming the missing tokenizer.json.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            Error::Tokenizer(format!(
                "{} not found; export it with `AutoTokenizer.from_pretrained(..).save_pretrained(dir)`",
                self.dir.join("tokenizer.json").display()
            ))
        })
    }
}

/// Loads a Hugging Face model folder (config.json, model.safetensors or a sharded index,
/// tokenizer.json) as a frozen backbone in `options.dtype` on `options.device`. A path to a
/// `.gguf` file loads a Llama-family model from it instead ([`gguf::read`]: dequantized weights,
/// config and tokenizer from the file's metadata; `config_json` is then the resolved config).
pub fn load(dir: &Path, options: &LoadOptions) -> Result<LoadedModel> {
    if dir.is_file() && gguf::is_gguf(dir) {
        return load_gguf(dir, options);
    }
    let (config_path, config_json) = config::read_config_json(dir)?;
    let arch = Architecture::detect(&config_json, &config_path)?;
    let weights = Weights::from_dir(dir)?;
    let backbone = match arch {
        Architecture::Bert => {
            let cfg = BertConfig::from_json(&config_json, &config_path)?;
            Backbone::Bert(Bert::load(&weights, &cfg, options.dtype, &options.device)?)
        }
        Architecture::DebertaV2 => {
            let cfg = DebertaV2Config::from_json(&config_json, &config_path)?;
            Backbone::DebertaV2(DebertaV2::load(&weights, &cfg, options.dtype, &options.device)?)
        }
        Architecture::Llama => {
            let cfg = LlamaConfig::from_json(&config_json.to_string(), &config_path)?;
            Backbone::Llama(Llama::load(&weights, &cfg, options.dtype, &options.device)?)
        }
    };
    let tokenizer = if dir.join("tokenizer.json").is_file() { Some(load_tokenizer(dir)?) } else { None };
    Ok(LoadedModel { arch, backbone, tokenizer, config_json, dir: dir.to_path_buf(), weights })
}

fn load_gguf(path: &Path, options: &LoadOptions) -> Result<LoadedModel> {
    let ckpt = gguf::read(path)?;
    let backbone = Backbone::Llama(Llama::load(&ckpt.weights, &ckpt.config, options.dtype, &options.device)?);
    let config_json = serde_json::to_value(&ckpt.config)
        .map_err(|e| Error::BadFile { file: path.to_path_buf(), reason: format!("config: {e}") })?;
    Ok(LoadedModel {
        arch: Architecture::Llama,
        backbone,
        tokenizer: Some(ckpt.tokenizer),
        config_json,
        dir: path.to_path_buf(),
        weights: ckpt.weights,
    })
}
