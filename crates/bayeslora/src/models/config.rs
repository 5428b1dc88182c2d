//! config.json and tokenizer.json of a Hugging Face model folder.
//!
//! [`read_config_json`] reads the raw JSON (each architecture file parses its own typed config
//! from it, as candle's `LlamaConfig`), [`Architecture::detect`] maps `architectures` /
//! `model_type` to the model file that implements it (as mistral.rs's
//! `NormalLoaderType::from_causal_lm_name`), and [`load_tokenizer`] opens tokenizer.json with the
//! shipped fixed truncation and padding removed (all-MiniLM-L6-v2 ships `max_length 128` and
//! `Fixed(128)` padding, which would silently cut and pad every sequence).
use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

use crate::{Error, Result};

/// The model families bayeslora implements, one model file each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Architecture {
    /// BERT encoders (`bert.rs`): BertModel, BertForSequenceClassification, ... (MiniLM).
    Bert,
    /// DeBERTa-v2/v3 encoders (`deberta_v2.rs`): DebertaV2Model, DebertaV2ForSequenceClassification.
    DebertaV2,
    /// Llama-family decoders (`llama/`): Llama, Mistral, Qwen2.
    Llama,
}

/// `architectures[0]` values we accept, with the family that implements them.
const ARCHITECTURE_NAMES: &[(&str, Architecture)] = &[
    ("BertModel", Architecture::Bert),
    ("BertForSequenceClassification", Architecture::Bert),
    ("BertForMaskedLM", Architecture::Bert),
    ("BertForPreTraining", Architecture::Bert),
    ("DebertaV2Model", Architecture::DebertaV2),
    ("DebertaV2ForSequenceClassification", Architecture::DebertaV2),
    ("DebertaV2ForMaskedLM", Architecture::DebertaV2),
    ("LlamaForCausalLM", Architecture::Llama),
    ("MistralForCausalLM", Architecture::Llama),
    ("Qwen2ForCausalLM", Architecture::Llama),
];

/// `model_type` values, the fallback when `architectures` is absent.
const MODEL_TYPES: &[(&str, Architecture)] = &[
    ("bert", Architecture::Bert),
    ("deberta-v2", Architecture::DebertaV2),
    ("llama", Architecture::Llama),
    ("mistral", Architecture::Llama),
    ("qwen2", Architecture::Llama),
];

impl Architecture {
    /// The attention query and value projections under this family's HF names: PEFT's default
    /// LoRA targets (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`).
    pub fn query_value(self) -> &'static [&'static str] {
        match self {
            Architecture::Bert => &["query", "value"],
            Architecture::DebertaV2 => &["query_proj", "value_proj"],
            Architecture::Llama => &["q_proj", "v_proj"],
        }
    }

    /// The attention query, key and value projections under this family's HF names (the
    /// B-LoRA fork's targets).
    pub fn query_key_value(self) -> &'static [&'static str] {
        match self {
            Architecture::Bert => &["query", "key", "value"],
            Architecture::DebertaV2 => &["query_proj", "key_proj", "value_proj"],
            Architecture::Llama => &["q_proj", "k_proj", "v_proj"],
        }
    }

    /// Detects the family from a parsed config.json (`file` is only used in the error). The
    /// first entry of `architectures` decides; without one, `model_type` does.
    pub fn detect(config: &serde_json::Value, file: &Path) -> Result<Self> {
        let named =
            config.get("architectures").and_then(|a| a.as_array()).and_then(|a| a.first()).and_then(|a| a.as_str());
        let unknown = |found: &str| Error::UnknownArchitecture {
            file: file.to_path_buf(),
            found: found.to_string(),
            supported: ARCHITECTURE_NAMES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "),
        };
        if let Some(name) = named {
            return ARCHITECTURE_NAMES.iter().find(|(n, _)| *n == name).map(|(_, a)| *a).ok_or_else(|| unknown(name));
        }
        match config.get("model_type").and_then(|m| m.as_str()) {
            Some(ty) => MODEL_TYPES.iter().find(|(n, _)| *n == ty).map(|(_, a)| *a).ok_or_else(|| unknown(ty)),
            None => Err(unknown("<none: config.json has neither `architectures` nor `model_type`>")),
        }
    }

    /// The lower-case family name (`bert`, `llama`).
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Bert => "bert",
            Architecture::DebertaV2 => "deberta_v2",
            Architecture::Llama => "llama",
        }
    }
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Reads `<dir>/config.json` as raw JSON. Returns the path too, for later error messages.
pub fn read_config_json(dir: &Path) -> Result<(PathBuf, serde_json::Value)> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::BadFile {
        file: path.clone(),
        reason: format!("invalid JSON ({e}); re-download config.json"),
    })?;
    if !value.is_object() {
        return Err(Error::BadFile { file: path, reason: "config.json must hold a JSON object".into() });
    }
    Ok((path, value))
}

/// Parses a typed config (an architecture's raw serde struct) out of config.json's JSON,
/// naming the file and the offending field on failure.
pub fn parse_config<T: serde::de::DeserializeOwned>(value: &serde_json::Value, file: &Path) -> Result<T> {
    T::deserialize(value)
        .map_err(|e| Error::BadFile { file: file.to_path_buf(), reason: format!("invalid config: {e}") })
}

/// Loads `<dir>/tokenizer.json` (Hugging Face `tokenizers` format) and removes any fixed
/// truncation and padding it ships with: batching pads to the longest row, and truncation is
/// the data pipeline's choice.
pub fn load_tokenizer(dir: &Path) -> Result<Tokenizer> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Err(Error::Tokenizer(format!(
            "{} not found; export it with `AutoTokenizer.from_pretrained(..).save_pretrained(dir)`",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let not_a_tokenizer = |e: &dyn std::fmt::Display| {
        Error::Tokenizer(format!("{}: {e}; is this a Hugging Face tokenizer.json?", path.display()))
    };
    // The JSON is checked before `tokenizers` parses it: tokenizers 0.23 panics (an `expect` in
    // `decoders/mod.rs`) on a syntax error inside the `decoder` value, such as a file cut off
    // after `"decoder":` or a control character in a string there (found by the tokenizer fuzz
    // target).
    serde_json::from_str::<serde::de::IgnoredAny>(&text)
        .map_err(|e| not_a_tokenizer(&format!("invalid JSON ({e})")))?;
    let mut tokenizer = text.parse::<Tokenizer>().map_err(|e| not_a_tokenizer(&e))?;
    tokenizer
        .with_truncation(None)
        .map_err(|e| Error::Tokenizer(format!("{}: cannot reset truncation: {e}", path.display())))?;
    tokenizer.with_padding(None);
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Issue 19, found by fuzzing: a tokenizer.json cut off inside its `decoder` value (or with a
    /// control character in a string there) made `tokenizers` panic; now it is an error naming
    /// the file.
    #[test]
    fn issue_19_broken_json_in_the_decoder_is_an_error_not_a_panic() {
        for (name, text) in [("cut", "{\"decoder\":"), ("control", "{\"decoder\":\"1.\u{b}0\"}")] {
            let dir = tempfile::tempdir().expect("temp dir");
            std::fs::write(dir.path().join("tokenizer.json"), text).expect("write");
            let err = load_tokenizer(dir.path()).expect_err(name).to_string();
            assert!(err.contains("tokenizer.json: invalid JSON"), "{name}: {err}");
        }
    }

    #[test]
    fn detects_families_and_rejects_unknown() {
        let f = Path::new("x/config.json");
        let bert = json!({"architectures": ["BertModel"], "model_type": "bert"});
        assert_eq!(Architecture::detect(&bert, f).ok(), Some(Architecture::Bert));
        let qwen = json!({"model_type": "qwen2"});
        assert_eq!(Architecture::detect(&qwen, f).ok(), Some(Architecture::Llama));
        let deberta = json!({"model_type": "deberta-v2"});
        assert_eq!(Architecture::detect(&deberta, f).ok(), Some(Architecture::DebertaV2));
        let gpt2 = json!({"architectures": ["GPT2LMHeadModel"]});
        let msg = Architecture::detect(&gpt2, f).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("GPT2LMHeadModel") && msg.contains("x/config.json") && msg.contains("BertModel"), "{msg}");
        assert!(Architecture::detect(&json!({}), f).is_err());
    }
}
