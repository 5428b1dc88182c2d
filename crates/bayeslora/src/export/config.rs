//! `adapter_config.json` as HF peft 0.21 writes it (`LoraConfig.save_pretrained`): every field
//! of peft 0.21.2's `LoraConfig`, keys sorted, so the file diffs cleanly against a peft-written
//! one and loads in peft, vLLM and mistral.rs. Reading accepts any peft version's file (unknown
//! keys are ignored, as peft does) and refuses the variants we cannot run yet.
use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Map, Value};

use crate::adapters::lora::{LoraConfig, TargetModules};
use crate::{Error, Result};

/// `adapter_config.json`.
pub const CONFIG_FILE: &str = "adapter_config.json";

/// The peft version whose field set and defaults we write (`peft_version`).
pub const PEFT_FORMAT_VERSION: &str = "0.21.2";

/// PEFT's `task_type`: how the adapted model is wrapped (`PeftModelForSequenceClassification`
/// saves the head, `PeftModelForCausalLM` does not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TaskType {
    /// An encoder with a classification head (`BertForSequenceClassification`).
    #[serde(rename = "SEQ_CLS")]
    SeqCls,
    /// A decoder scored through its lm_head (`LlamaForCausalLM`).
    #[serde(rename = "CAUSAL_LM")]
    CausalLm,
    /// A bare encoder (`BertModel`).
    #[serde(rename = "FEATURE_EXTRACTION")]
    FeatureExtraction,
}

impl TaskType {
    pub fn name(self) -> &'static str {
        match self {
            TaskType::SeqCls => "SEQ_CLS",
            TaskType::CausalLm => "CAUSAL_LM",
            TaskType::FeatureExtraction => "FEATURE_EXTRACTION",
        }
    }
}

/// What we write into `adapter_config.json` beyond the LoRA hyper-parameters.
#[derive(Debug, Clone)]
pub(crate) struct ConfigFields<'a> {
    pub lora: &'a LoraConfig,
    pub target_modules: Value,
    pub rank_pattern: BTreeMap<String, usize>,
    pub alpha_pattern: BTreeMap<String, f64>,
    pub task_type: TaskType,
    pub base_model_name_or_path: Option<&'a str>,
}

/// A float as peft writes it: `8`, not `8.0`, when it is integral (peft stores what the user
/// passed, and `lora_alpha` is conventionally an int).
fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 9e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

/// The full `adapter_config.json` object (keys sorted, as peft's `json.dumps(sort_keys=True)`).
pub(crate) fn to_json(f: &ConfigFields<'_>) -> Value {
    let modules_to_save = match (f.task_type, &f.lora.modules_to_save) {
        (_, Some(m)) => json!(m),
        // PeftModelForSequenceClassification adds its head names.
        (TaskType::SeqCls, None) => json!(["classifier", "score"]),
        _ => Value::Null,
    };
    let alpha_pattern: Map<String, Value> = f.alpha_pattern.iter().map(|(k, &a)| (k.clone(), number(a))).collect();
    let mut m = Map::new();
    let mut put = |k: &str, v: Value| {
        m.insert(k.to_string(), v);
    };
    put("alora_invocation_tokens", Value::Null);
    put("alpha_pattern", Value::Object(alpha_pattern));
    put("arrow_config", Value::Null);
    put("auto_mapping", Value::Null);
    put("base_model_name_or_path", json!(f.base_model_name_or_path));
    put("bias", json!("none"));
    put("corda_config", Value::Null);
    put("ensure_weight_tying", json!(false));
    put("eva_config", Value::Null);
    put("exclude_modules", Value::Null);
    put("fan_in_fan_out", json!(false));
    put("inference_mode", json!(true));
    put("init_lora_weights", json!(true));
    put("kasa_config", Value::Null);
    put("layer_replication", Value::Null);
    put("layers_pattern", Value::Null);
    put("layers_to_transform", Value::Null);
    put("loftq_config", json!({}));
    put("lora_alpha", number(f.lora.lora_alpha));
    put("lora_bias", json!(false));
    put("lora_dropout", json!(f.lora.lora_dropout as f64));
    put("lora_ga_config", Value::Null);
    put("megatron_config", Value::Null);
    put("megatron_core", json!("megatron.core"));
    put("modules_to_save", modules_to_save);
    put("monteclora_config", Value::Null);
    put("peft_type", json!("LORA"));
    put("peft_version", json!(PEFT_FORMAT_VERSION));
    put("qalora_group_size", json!(16));
    put("r", json!(f.lora.r));
    put("rank_pattern", json!(f.rank_pattern));
    put("revision", Value::Null);
    put("target_modules", f.target_modules.clone());
    put("target_parameters", Value::Null);
    put("task_type", json!(f.task_type.name()));
    put("trainable_token_indices", Value::Null);
    put("use_bdlora", Value::Null);
    put("use_dora", json!(false));
    put("use_qalora", json!(false));
    put("use_rslora", json!(f.lora.use_rslora));
    put("velora_config", Value::Null);
    Value::Object(m)
}

/// `adapter_config.json` as read: the LoRA fields we use plus what describes the base model.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    /// `r`, `lora_alpha`, `lora_dropout`, `use_rslora`, `target_modules`, `rank_pattern`,
    /// `alpha_pattern`, `modules_to_save` exactly as in the file (patterns name modules from the
    /// task model's root, e.g. `bert.encoder…`).
    pub lora: LoraConfig,
    /// `task_type` (`None` when the file has null or a type we do not model).
    pub task_type: Option<TaskType>,
    /// `task_type` as written (`"SEQ_CLS"`, `"TOKEN_CLS"`, …, or `None`).
    pub task_type_raw: Option<String>,
    pub base_model_name_or_path: Option<String>,
}

/// PEFT methods other than LoRA that share the folder layout, for the error message.
const OTHER_METHODS: &[&str] = &[
    "ADALORA",
    "IA3",
    "VERA",
    "LOHA",
    "LOKR",
    "OFT",
    "BOFT",
    "FOURIERFT",
    "VBLORA",
    "XLORA",
    "LN_TUNING",
    "HRA",
    "BONE",
    "PROMPT_TUNING",
    "PREFIX_TUNING",
    "P_TUNING",
];

/// Reads and checks `<dir>/adapter_config.json`.
pub fn read(dir: &Path) -> Result<AdapterConfig> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::BadFile { file: path.clone(), reason: format!("invalid JSON: {e}") })?;
    parse(&v, &path)
}

fn unsupported(path: &Path, what: &str) -> Error {
    Error::BadFile {
        file: path.to_path_buf(),
        reason: format!("{what} is not supported yet; bayeslora loads plain LoRA adapters (peft_type \"LORA\")"),
    }
}

/// Checks the method and builds the config from the parsed JSON (`path` names the file).
pub(crate) fn parse(v: &Value, path: &Path) -> Result<AdapterConfig> {
    let bad = |reason: String| Error::BadFile { file: path.to_path_buf(), reason };
    let obj = v.as_object().ok_or_else(|| bad("adapter_config.json must hold a JSON object".into()))?;
    let flag = |k: &str| obj.get(k).and_then(Value::as_bool).unwrap_or(false);
    let set = |k: &str| obj.get(k).is_some_and(|x| !x.is_null());
    match obj.get("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        Some(other) => {
            let known = if OTHER_METHODS.contains(&other) { "peft method" } else { "unknown peft method" };
            return Err(unsupported(path, &format!("{known} `{other}`")));
        }
        None => return Err(bad("no `peft_type`; is this a peft adapter folder? (expected \"LORA\")".into())),
    }
    // LoRA variants that change the forward pass or the tensors on disk.
    for (key, name) in [
        ("use_dora", "DoRA (use_dora = true)"),
        ("use_qalora", "QA-LoRA (use_qalora = true)"),
        ("use_bdlora", "BD-LoRA (use_bdlora)"),
        ("lora_bias", "a trained LoRA bias (lora_bias = true)"),
        ("fan_in_fan_out", "fan_in_fan_out = true (GPT-2 Conv1D layers)"),
    ] {
        if flag(key) || (key == "use_bdlora" && set(key)) {
            return Err(unsupported(path, name));
        }
    }
    for (key, name) in [
        ("layer_replication", "layer_replication"),
        ("target_parameters", "target_parameters (LoRA on nn.Parameter)"),
        ("trainable_token_indices", "trainable_token_indices"),
        ("alora_invocation_tokens", "activated LoRA (alora_invocation_tokens)"),
        ("layers_to_transform", "layers_to_transform"),
    ] {
        if set(key) {
            return Err(unsupported(path, name));
        }
    }
    if let Some(b) = obj.get("bias").and_then(Value::as_str) {
        if b != "none" {
            return Err(unsupported(path, &format!("bias = \"{b}\"")));
        }
    }
    let r = obj.get("r").and_then(Value::as_u64).ok_or_else(|| bad("`r` must be a positive integer".into()))? as usize;
    let lora_alpha = match obj.get("lora_alpha") {
        None | Some(Value::Null) => 8.0, // peft's default
        Some(x) => x.as_f64().ok_or_else(|| bad(format!("`lora_alpha` = {x} is not a number")))?,
    };
    let target_modules = match obj.get("target_modules") {
        Some(Value::String(s)) => TargetModules::Regex(s.clone()),
        Some(Value::Array(a)) => TargetModules::List(
            a.iter()
                .map(|t| {
                    t.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad(format!("target_modules entry {t} is not a string")))
                })
                .collect::<Result<Vec<_>>>()?,
        ),
        _ => return Err(bad("`target_modules` must be a list of module names or a regex".into())),
    };
    let rank_pattern: BTreeMap<String, usize> = match obj.get("rank_pattern") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(x) => serde_json::from_value(x.clone()).map_err(|e| bad(format!("`rank_pattern`: {e}")))?,
    };
    let alpha_pattern: BTreeMap<String, f64> = match obj.get("alpha_pattern") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(x) => serde_json::from_value(x.clone()).map_err(|e| bad(format!("`alpha_pattern`: {e}")))?,
    };
    let modules_to_save: Option<Vec<String>> = match obj.get("modules_to_save") {
        None | Some(Value::Null) => None,
        Some(x) => Some(serde_json::from_value(x.clone()).map_err(|e| bad(format!("`modules_to_save`: {e}")))?),
    };
    let lora = LoraConfig {
        r,
        lora_alpha,
        lora_dropout: obj.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32,
        target_modules: Some(target_modules),
        use_rslora: flag("use_rslora"),
        bias: Default::default(),
        modules_to_save,
        rank_pattern,
        alpha_pattern,
    };
    lora.validate().map_err(|e| bad(e.to_string()))?;
    let task_type_raw = obj.get("task_type").and_then(Value::as_str).map(str::to_string);
    let task_type = task_type_raw.as_deref().and_then(|t| serde_json::from_value(json!(t)).ok());
    Ok(AdapterConfig {
        lora,
        task_type,
        task_type_raw,
        base_model_name_or_path: obj.get("base_model_name_or_path").and_then(Value::as_str).map(str::to_string),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(lora: &LoraConfig) -> ConfigFields<'_> {
        ConfigFields {
            lora,
            target_modules: json!(["query", "value"]),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            task_type: TaskType::SeqCls,
            base_model_name_or_path: Some("m"),
        }
    }

    #[test]
    fn writes_what_it_reads() -> Result<()> {
        let lora = LoraConfig { r: 4, lora_alpha: 8.0, ..Default::default() };
        let v = to_json(&fields(&lora));
        assert_eq!(v["lora_alpha"], json!(8));
        assert_eq!(v["modules_to_save"], json!(["classifier", "score"]));
        let back = parse(&v, Path::new("x/adapter_config.json"))?;
        assert_eq!((back.lora.r, back.lora.lora_alpha), (4, 8.0));
        assert_eq!(back.task_type, Some(TaskType::SeqCls));
        Ok(())
    }

    #[test]
    fn refuses_other_methods_by_name() {
        let lora = LoraConfig::default();
        let mut v = to_json(&fields(&lora));
        v["use_dora"] = json!(true);
        let msg = parse(&v, Path::new("a/adapter_config.json")).unwrap_err().to_string();
        assert!(msg.contains("DoRA") && msg.contains("not supported yet") && msg.contains("a/adapter"), "{msg}");
        v["use_dora"] = json!(false);
        v["peft_type"] = json!("VERA");
        let msg = parse(&v, Path::new("a/adapter_config.json")).unwrap_err().to_string();
        assert!(msg.contains("`VERA`"), "{msg}");
    }
}
