//! [`LoraConfig`]: PEFT's `LoraConfig` fields, names and defaults (peft 5d602fd,
//! `src/peft/tuners/lora/config.py`), so values paste over from PEFT and export is a serde round
//! trip of these fields.
use std::collections::BTreeMap;

use regex::Regex;

use crate::models::Architecture;
use crate::{Error, Result};

/// Which modules get an adapter, as PEFT's `target_modules`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Module names: a module matches a name `t` when it is `t` or ends with `.t`
    /// (`query` matches `encoder.layer.0.attention.self.query`).
    List(Vec<String>),
    /// A regular expression that must match the whole module name (Python's `re.fullmatch`).
    Regex(String),
}

/// For messages: `query, value` or `regex ^.*proj$`.
impl std::fmt::Display for TargetModules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TargetModules::List(names) => write!(f, "{}", names.join(", ")),
            TargetModules::Regex(re) => write!(f, "regex {re}"),
        }
    }
}

impl TargetModules {
    /// PEFT's `check_target_module_exists` for one module name.
    pub fn matches(&self, module: &str) -> Result<bool> {
        Ok(match self {
            TargetModules::List(names) => names.iter().any(|t| matches_name(module, t)),
            TargetModules::Regex(re) => full_regex(re, "target_modules")?.is_match(module),
        })
    }
}

/// `module == t || module.ends_with("." + t)`.
pub(crate) fn matches_name(module: &str, t: &str) -> bool {
    module == t || (module.len() > t.len() && module.ends_with(t) && module[..module.len() - t.len()].ends_with('.'))
}

/// `re` anchored at both ends, as `re.fullmatch`.
fn full_regex(re: &str, field: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{re})$")).map_err(|e| Error::config(field, format!("{re:?}"), e.to_string()))
}

/// PEFT's `bias`: which biases train. Only `none` is supported (base biases stay frozen).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraBias {
    #[default]
    None,
    All,
    LoraOnly,
}

/// LoRA hyper-parameters with PEFT's names and defaults.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank of the update `B·A`.
    pub r: usize,
    /// Scale numerator: the update is scaled by `lora_alpha / r` (or `/ sqrt(r)` with rsLoRA).
    pub lora_alpha: f64,
    /// Dropout on the adapter's input (training only).
    pub lora_dropout: f32,
    /// Which linears get an adapter; `None` means the architecture's default
    /// ([`Architecture::query_value`], PEFT's default), filled in by [`LoraConfig::with_default_targets`].
    pub target_modules: Option<TargetModules>,
    /// Rank-stabilized LoRA (Kalajdzievski 2023, arXiv 2312.03732): scale `lora_alpha / sqrt(r)`.
    pub use_rslora: bool,
    pub bias: LoraBias,
    /// Non-adapter modules trained and saved in full (a task head such as `classifier`).
    pub modules_to_save: Option<Vec<String>>,
    /// Per-module rank overrides, `{pattern: r}`; a pattern matches a module name as PEFT's
    /// `get_pattern_key`: `re.match(rf"(.*\.)?({pattern})$", name)`.
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module `lora_alpha` overrides, matched as `rank_pattern`.
    pub alpha_pattern: BTreeMap<String, f64>,
}

impl Default for LoraConfig {
    /// PEFT `LoraConfig` defaults: r 8, lora_alpha 8, lora_dropout 0.0, bias "none",
    /// use_rslora false, target_modules None (architecture default).
    fn default() -> Self {
        LoraConfig {
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: None,
            use_rslora: false,
            bias: LoraBias::None,
            modules_to_save: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
        }
    }
}

/// The update's scale: `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA (PEFT
/// `LoraLayer.update_layer`).
pub fn scaling(lora_alpha: f64, r: usize, use_rslora: bool) -> f64 {
    if use_rslora {
        lora_alpha / (r as f64).sqrt()
    } else {
        lora_alpha / r as f64
    }
}

impl LoraConfig {
    /// Fills `target_modules` with the architecture's default when it is unset.
    pub fn with_default_targets(mut self, arch: Architecture) -> Self {
        if self.target_modules.is_none() {
            let names = arch.query_value().iter().map(|s| s.to_string()).collect();
            self.target_modules = Some(TargetModules::List(names));
        }
        self
    }

    /// Checks every field; errors quote the field and its value.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::config("r", self.r, "the LoRA rank must be at least 1"));
        }
        if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            return Err(Error::config("lora_alpha", self.lora_alpha, "must be a positive number"));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(Error::config("lora_dropout", self.lora_dropout, "must be in [0, 1)"));
        }
        match &self.target_modules {
            Some(TargetModules::List(names)) => {
                if names.is_empty() {
                    return Err(Error::config(
                        "target_modules",
                        "[]",
                        "list at least one module name, e.g. [\"q_proj\", \"v_proj\"]",
                    ));
                }
                if let Some(empty) = names.iter().find(|n| n.trim().is_empty()) {
                    return Err(Error::config(
                        "target_modules",
                        format!("{empty:?}"),
                        "module names must not be empty",
                    ));
                }
            }
            Some(TargetModules::Regex(re)) => {
                full_regex(re, "target_modules")?;
            }
            None => {}
        }
        if self.bias != LoraBias::None {
            return Err(Error::config(
                "bias",
                format!("{:?}", self.bias).to_lowercase(),
                "only \"none\" is supported: base-layer biases stay frozen",
            ));
        }
        for (pattern, &r) in &self.rank_pattern {
            pattern_regex(pattern, "rank_pattern")?;
            if r == 0 {
                return Err(Error::config(
                    &format!("rank_pattern[{pattern:?}]"),
                    r,
                    "the rank must be at least 1; leave the module out of target_modules instead",
                ));
            }
        }
        for (pattern, &a) in &self.alpha_pattern {
            pattern_regex(pattern, "alpha_pattern")?;
            if !(a.is_finite() && a > 0.0) {
                return Err(Error::config(&format!("alpha_pattern[{pattern:?}]"), a, "must be a positive number"));
            }
        }
        Ok(())
    }

    /// The rank for one module: its `rank_pattern` entry, else `r`.
    pub fn rank_for(&self, module: &str) -> Result<usize> {
        Ok(match pattern_key(self.rank_pattern.keys(), module, "rank_pattern")? {
            Some(k) => self.rank_pattern[k],
            None => self.r,
        })
    }

    /// `lora_alpha` for one module: its `alpha_pattern` entry, else `lora_alpha`.
    pub fn alpha_for(&self, module: &str) -> Result<f64> {
        Ok(match pattern_key(self.alpha_pattern.keys(), module, "alpha_pattern")? {
            Some(k) => self.alpha_pattern[k],
            None => self.lora_alpha,
        })
    }
}

fn pattern_regex(pattern: &str, field: &str) -> Result<Regex> {
    Regex::new(&format!(r"^(?:.*\.)?(?:{pattern})$"))
        .map_err(|e| Error::config(field, format!("{pattern:?}"), e.to_string()))
}

/// PEFT's `get_pattern_key`: the first key `k` with `re.match(rf"(.*\.)?({k})$", module)`.
/// Differs from PEFT: keys are visited in sorted order (a `BTreeMap`), not insertion order, after
/// an exact full-name key, which always wins; use full module paths to avoid ambiguity.
fn pattern_key<'a>(
    keys: impl Iterator<Item = &'a String> + Clone,
    module: &str,
    field: &str,
) -> Result<Option<&'a String>> {
    if let Some(k) = keys.clone().find(|k| k.as_str() == module) {
        return Ok(Some(k));
    }
    for k in keys {
        if pattern_regex(k, field)?.is_match(module) {
            return Ok(Some(k));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_peft_and_scaling() {
        let c = LoraConfig::default();
        assert_eq!((c.r, c.lora_alpha, c.lora_dropout, c.use_rslora), (8, 8.0, 0.0, false));
        assert_eq!(scaling(16.0, 4, false), 4.0);
        assert_eq!(scaling(16.0, 4, true), 8.0);
    }

    #[test]
    fn target_matching_is_peft_suffix_or_fullmatch() -> Result<()> {
        let list = TargetModules::List(vec!["query".into(), "output.dense".into()]);
        assert!(list.matches("encoder.layer.0.attention.self.query")?);
        assert!(list.matches("query")?);
        assert!(!list.matches("encoder.layer.0.attention.self.myquery")?);
        assert!(list.matches("encoder.layer.0.attention.output.dense")?);
        assert!(list.matches("encoder.layer.0.output.dense")?);
        assert!(!list.matches("encoder.layer.0.intermediate.dense")?);
        let re = TargetModules::Regex(r".*layer\.1\..*\.(query|key)".into());
        assert!(re.matches("encoder.layer.1.attention.self.key")?);
        assert!(!re.matches("encoder.layer.10.attention.self.key")?);
        // Full match: a regex matching only a prefix does not select the module.
        assert!(!TargetModules::Regex("encoder".into()).matches("encoder.layer.1")?);
        Ok(())
    }

    #[test]
    fn serde_uses_peft_names_and_validates() -> Result<()> {
        let c: LoraConfig = serde_json::from_str(
            r#"{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "rank_pattern": {"layers.3.self_attn.q_proj": 2}}"#,
        )
        .map_err(|e| Error::config("json", "", e.to_string()))?;
        c.validate()?;
        assert_eq!(c.rank_for("model.layers.3.self_attn.q_proj")?, 2);
        assert_eq!(c.rank_for("model.layers.13.self_attn.q_proj")?, 4);
        assert_eq!(c.alpha_for("model.layers.3.self_attn.q_proj")?, 8.0);
        let regex: LoraConfig = serde_json::from_str(r#"{"target_modules": ".*q_proj"}"#)
            .map_err(|e| Error::config("json", "", e.to_string()))?;
        assert_eq!(regex.target_modules, Some(TargetModules::Regex(".*q_proj".into())));
        assert!(serde_json::from_str::<LoraConfig>(r#"{"rank": 4}"#).is_err(), "unknown fields are rejected");
        let bad = LoraConfig { lora_dropout: 1.5, ..LoraConfig::default() };
        let msg = bad.validate().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("lora_dropout = 1.5"), "{msg}");
        let bad = LoraConfig { r: 0, ..LoraConfig::default() };
        assert!(bad.validate().err().map(|e| e.to_string()).unwrap_or_default().contains("r = 0"));
        let bad = LoraConfig { bias: LoraBias::All, ..LoraConfig::default() };
        assert!(bad.validate().err().map(|e| e.to_string()).unwrap_or_default().contains("bias = all"));
        let bad = LoraConfig { target_modules: Some(TargetModules::Regex("(".into())), ..LoraConfig::default() };
        assert!(bad.validate().is_err());
        Ok(())
    }
}
