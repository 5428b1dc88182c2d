//! The Llama family's config.json: [`LlamaRawConfig`] mirrors the file (both the transformers 4
//! spelling `rope_theta` + `rope_scaling` and the transformers 5 spelling `rope_parameters`), and
//! [`LlamaConfig`] is the resolved, validated form the model is built from, with the RoPE
//! inverse frequencies ([`LlamaConfig::inv_freq`], llama3 scaling included).
use crate::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// The config.json `architectures` names this file implements.
pub const SUPPORTED: &[&str] = &["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];

/// Which member of the family a checkpoint is; decides the default biases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LlamaVariant {
    Llama,
    Mistral,
    Qwen2,
}

impl LlamaVariant {
    /// From a config.json `architectures` entry (`LlamaForCausalLM`, …).
    pub fn from_architecture(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" => Some(Self::Llama),
            "MistralForCausalLM" => Some(Self::Mistral),
            "Qwen2ForCausalLM" => Some(Self::Qwen2),
            _ => None,
        }
    }

    /// The transformers class (`architectures[0]`) and `model_type` of this variant.
    pub fn hf_names(self) -> (&'static str, &'static str) {
        match self {
            Self::Llama => ("LlamaForCausalLM", "llama"),
            Self::Mistral => ("MistralForCausalLM", "mistral"),
            Self::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        }
    }
}

/// RoPE parameters as config.json spells them: transformers 4's `rope_scaling` (with `type` or
/// `rope_type`) or transformers 5's `rope_parameters` (which also carries `rope_theta`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawRopeParameters {
    pub rope_type: Option<String>,
    #[serde(rename = "type")]
    pub legacy_type: Option<String>,
    pub rope_theta: Option<f64>,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
}

/// config.json of a Llama, Mistral or Qwen2 checkpoint, field for field. Unknown fields are
/// accepted (not `deny_unknown_fields`): real config.json files carry dozens of generation and
/// tokenizer fields that do not concern the backbone.
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaRawConfig {
    /// `null` (transformers writes it for a model built from a config) reads as empty.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub architectures: Vec<String>,
    /// The fallback when `architectures` is absent (`llama`, `mistral`, `qwen2`).
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    /// HF's `LlamaConfig` default.
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<RawRopeParameters>,
    pub rope_parameters: Option<RawRopeParameters>,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: Option<bool>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub hidden_act: Option<String>,
    /// Ignored (see the module doc).
    pub sliding_window: Option<usize>,
}

impl LlamaConfig {
    /// A transformers config.json for this config (the weights in `torch_dtype`), e.g. for a
    /// model folder written from a GGUF file: reading it back with [`LlamaConfig::from_json`]
    /// gives this config again.
    pub fn to_hf_json(&self, torch_dtype: &str) -> serde_json::Value {
        let (arch, model_type) = self.variant.hf_names();
        let mut v = serde_json::json!({
            "architectures": [arch],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": torch_dtype,
        });
        if self.variant == LlamaVariant::Llama {
            v["attention_bias"] = serde_json::json!(self.qkv_bias);
            v["mlp_bias"] = serde_json::json!(self.mlp_bias);
        }
        if let Some(r) = &self.rope_scaling {
            v["rope_scaling"] = serde_json::json!({
                "rope_type": "llama3",
                "factor": r.factor,
                "low_freq_factor": r.low_freq_factor,
                "high_freq_factor": r.high_freq_factor,
                "original_max_position_embeddings": r.original_max_position_embeddings,
            });
        }
        v
    }
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(d)?.unwrap_or_default())
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_max_position_embeddings() -> usize {
    2048
}

/// Llama 3.1 frequency scaling (`rope_type = "llama3"`), as transformers'
/// `_compute_llama3_parameters`: long wavelengths are divided by `factor`, short ones kept, the
/// band between interpolated.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// The resolved, validated config of a Llama-family model.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LlamaConfig {
    pub variant: LlamaVariant,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v (Qwen2 always; Llama when `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama when `attention_bias`).
    pub o_bias: bool,
    /// Bias on gate/up/down (Llama when `mlp_bias`).
    pub mlp_bias: bool,
}

impl LlamaRawConfig {
    /// Resolves defaults the way each HF config class does and validates. `file` names the
    /// config in errors.
    pub fn into_config(self, file: &Path) -> Result<LlamaConfig> {
        let variant = self
            .architectures
            .iter()
            .find_map(|a| LlamaVariant::from_architecture(a))
            .or(match self.model_type.as_deref() {
                Some("llama") if self.architectures.is_empty() => Some(LlamaVariant::Llama),
                Some("mistral") if self.architectures.is_empty() => Some(LlamaVariant::Mistral),
                Some("qwen2") if self.architectures.is_empty() => Some(LlamaVariant::Qwen2),
                _ => None,
            })
            .ok_or_else(|| Error::UnknownArchitecture {
                file: file.to_path_buf(),
                found: self.architectures.join(", "),
                supported: SUPPORTED.join(", "),
            })?;
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(Error::config("hidden_act", act, "only `silu` (SwiGLU) is implemented"));
            }
        }
        // transformers 5 writes `rope_parameters` (with the theta inside); 4 writes `rope_theta`
        // and `rope_scaling` (null for the default rope).
        let rope = self.rope_parameters.clone().or(self.rope_scaling.clone()).unwrap_or_default();
        let rope_theta = rope.rope_theta.or(self.rope_theta).unwrap_or(match variant {
            // The HF config classes' defaults.
            LlamaVariant::Qwen2 => 1_000_000.0,
            _ => 10_000.0,
        });
        let rope_type = rope.rope_type.clone().or(rope.legacy_type.clone()).unwrap_or_else(|| "default".into());
        let rope_scaling = match rope_type.as_str() {
            "default" => None,
            "llama3" => {
                let need = |field: &str, v: Option<f64>| {
                    v.ok_or_else(|| {
                        Error::config(&format!("rope_scaling.{field}"), "null", "required by rope_type llama3")
                    })
                };
                Some(Llama3RopeScaling {
                    factor: need("factor", rope.factor)?,
                    low_freq_factor: need("low_freq_factor", rope.low_freq_factor)?,
                    high_freq_factor: need("high_freq_factor", rope.high_freq_factor)?,
                    original_max_position_embeddings: rope
                        .original_max_position_embeddings
                        .unwrap_or(self.max_position_embeddings),
                })
            }
            other => {
                return Err(Error::config(
                    "rope_scaling.rope_type",
                    other,
                    "not implemented; supported: default, llama3",
                ))
            }
        };
        let attention_bias = self.attention_bias.unwrap_or(false);
        let cfg = LlamaConfig {
            variant,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1)),
            rms_norm_eps: self.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            qkv_bias: variant == LlamaVariant::Qwen2 || attention_bias,
            o_bias: variant == LlamaVariant::Llama && attention_bias,
            mlp_bias: variant == LlamaVariant::Llama && self.mlp_bias.unwrap_or(false),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

impl LlamaConfig {
    /// Reads and resolves a config.json.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, path)
    }

    /// Parses and resolves config.json text; `file` names it in errors.
    pub fn from_json(text: &str, file: &Path) -> Result<Self> {
        let raw: LlamaRawConfig = serde_json::from_str(text)
            .map_err(|e| Error::BadFile { file: file.to_path_buf(), reason: format!("config.json: {e}") })?;
        raw.into_config(file)
    }

    /// Checks the sizes fit together; every constructor calls it.
    // `%` rather than `is_multiple_of` (stable in 1.87): the workspace MSRV is 1.85.
    #[allow(clippy::manual_is_multiple_of)]
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(Error::config(field, v, "must be positive"));
            }
        }
        if self.head_dim == 0 || self.head_dim % 2 != 0 {
            return Err(Error::config("head_dim", self.head_dim, "must be positive and even (RoPE rotates pairs)"));
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(Error::config(
                "num_key_value_heads",
                self.num_key_value_heads,
                format!("must divide num_attention_heads = {}", self.num_attention_heads),
            ));
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 {
            return Err(Error::config("rms_norm_eps", self.rms_norm_eps, "must be positive"));
        }
        if self.rope_theta.is_nan() || self.rope_theta <= 0.0 {
            return Err(Error::config("rope_theta", self.rope_theta, "must be positive"));
        }
        if let Some(s) = &self.rope_scaling {
            let ok = s.factor > 0.0 && s.high_freq_factor > s.low_freq_factor && s.low_freq_factor > 0.0;
            if !ok {
                return Err(Error::config(
                    "rope_scaling",
                    format!("{s:?}"),
                    "llama3 needs factor > 0 and high_freq_factor > low_freq_factor > 0",
                ));
            }
        }
        Ok(())
    }

    /// RoPE inverse frequencies `[D/2]`, `θ^(−2i/D)`, with llama3 scaling when configured
    /// (transformers' `_compute_default_rope_parameters` / `_compute_llama3_parameters`).
    pub fn inv_freq(&self) -> Vec<f32> {
        let dim = self.head_dim;
        (0..dim / 2)
            .map(|i| {
                // transformers computes these in f32; the pow in f64 then rounding agrees to 1 ulp.
                let f = 1.0 / self.rope_theta.powf((2 * i) as f64 / dim as f64) as f32 as f64;
                match &self.rope_scaling {
                    None => f as f32,
                    Some(s) => llama3_scale(f, s) as f32,
                }
            })
            .collect()
    }
}

/// One inverse frequency under llama3 scaling.
fn llama3_scale(inv_freq: f64, s: &Llama3RopeScaling) -> f64 {
    let old = s.original_max_position_embeddings as f64;
    let low_freq_wavelen = old / s.low_freq_factor;
    let high_freq_wavelen = old / s.high_freq_factor;
    let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
    if wavelen < high_freq_wavelen {
        inv_freq
    } else if wavelen > low_freq_wavelen {
        inv_freq / s.factor
    } else {
        let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * inv_freq / s.factor + smooth * inv_freq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(extra: &str) -> String {
        format!(
            r#"{{"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
                "intermediate_size": 12, "num_hidden_layers": 1, "num_attention_heads": 2 {extra}}}"#
        )
    }

    /// `"architectures": null` (transformers writes it for a model built from a config) falls
    /// back to `model_type`, as an absent key does.
    #[test]
    fn null_architectures_fall_back_to_model_type() -> Result<()> {
        let f = Path::new("config.json");
        let text = raw(r#", "model_type": "qwen2""#).replace(r#"["LlamaForCausalLM"]"#, "null");
        assert_eq!(LlamaConfig::from_json(&text, f)?.variant, LlamaVariant::Qwen2);
        Ok(())
    }

    #[test]
    fn legacy_and_v5_rope_spellings_resolve_alike() -> Result<()> {
        let f = Path::new("config.json");
        let legacy = LlamaConfig::from_json(
            &raw(r#", "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", "factor": 8.0,
                 "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#),
            f,
        )?;
        let v5 = LlamaConfig::from_json(
            &raw(r#", "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                 "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#),
            f,
        )?;
        assert_eq!(legacy, v5);
        assert_eq!(v5.num_key_value_heads, 2);
        assert_eq!(v5.head_dim, 4);
        Ok(())
    }

    #[test]
    fn llama3_scaling_bands() {
        let s = Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        // High frequency (short wavelength): unchanged; low frequency: divided by the factor.
        assert_eq!(llama3_scale(1.0, &s), 1.0);
        assert!((llama3_scale(1e-5, &s) - 1e-5 / 8.0).abs() < 1e-18);
        // Middle of the band: between the two.
        let f = 2.0 * std::f64::consts::PI / 4096.0;
        let g = llama3_scale(f, &s);
        assert!(g < f && g > f / 8.0);
    }

    #[test]
    fn rejects_bad_configs() {
        let f = Path::new("x/config.json");
        let e = LlamaConfig::from_json(&raw(r#", "rope_scaling": {"type": "yarn", "factor": 2.0}"#), f).unwrap_err();
        assert!(e.to_string().contains("yarn"), "{e}");
        let e = LlamaConfig::from_json(&raw(r#", "num_key_value_heads": 3"#), f).unwrap_err();
        assert!(e.to_string().contains("num_key_value_heads"), "{e}");
        let e = LlamaConfig::from_json(&raw(r#", "hidden_act": "gelu""#), f).unwrap_err();
        assert!(e.to_string().contains("gelu"), "{e}");
        let bad_arch = raw("").replace("LlamaForCausalLM", "GPT2LMHeadModel");
        let e = LlamaConfig::from_json(&bad_arch, f).unwrap_err();
        assert!(matches!(e, Error::UnknownArchitecture { .. }), "{e}");
        assert!(e.to_string().contains("x/config.json"), "{e}");
    }
}
