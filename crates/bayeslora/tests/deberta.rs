//! Golden tests of the DeBERTa-v2/v3 encoder (disentangled attention) against HF transformers +
//! peft, plus gradients through the relative-position path and config errors.
//!
//! Fixtures: `tests/fixtures/deberta/`, made by `scripts/fixtures/make_deberta_fixtures.py`
//! (versions in `meta.json`).
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bayeslora::adapters::lora::{attach, AttachedAdapters, LoraConfig, TargetModules};
use bayeslora::adapters::Ctx;
use bayeslora::models::deberta_v2::log_bucket_position;
use bayeslora::models::{self, Architecture, Backbone, DebertaV2, LoadOptions, SequenceClassificationHead};
use bayeslora::Result;
use candle_core::{DType, Device, Tensor};
use common::{check, load_io};

const TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/deberta")
}

fn io() -> Result<HashMap<String, Tensor>> {
    load_io(&fixtures().join("io.safetensors"))
}

fn tensor<'a>(io: &'a HashMap<String, Tensor>, name: &str) -> &'a Tensor {
    io.get(name).unwrap_or_else(|| panic!("fixture io.safetensors lacks `{name}`; re-run make_deberta_fixtures.py"))
}

fn load_tiny() -> Result<(DebertaV2, models::LoadedModel)> {
    let loaded = models::load(&fixtures().join("tiny"), &LoadOptions::default())?;
    assert_eq!(loaded.arch, Architecture::DebertaV2);
    let Backbone::DebertaV2(m) = loaded.backbone.clone() else { panic!("tiny is not a DeBERTa-v2") };
    Ok((m, loaded))
}

fn inputs(io: &HashMap<String, Tensor>) -> Result<(Tensor, Tensor)> {
    Ok((tensor(io, "input_ids").to_dtype(DType::U32)?, tensor(io, "attention_mask").clone()))
}

fn logits(m: &DebertaV2, loaded: &models::LoadedModel, hidden: &Tensor, ctx: &Ctx) -> Result<Tensor> {
    let head =
        SequenceClassificationHead::load_or_init(&loaded.weights, &m.config().head_config(), 3, 0, &Device::Cpu)?;
    head.forward(&m.pooled(hidden, ctx)?, ctx)
}

#[test]
fn tiny_matches_hf() -> Result<()> {
    let io = io()?;
    let (m, loaded) = load_tiny()?;
    let (ids, mask) = inputs(&io)?;
    let ctx = Ctx::eval();
    let states = m.forward_hidden_states(&ids, None, &mask, &ctx)?;
    assert_eq!(states.len(), 3);
    check("hidden_state_1", &states[1], tensor(&io, "hidden_state_1"), TOL)?;
    check("last_hidden_state", &states[2], tensor(&io, "last_hidden_state"), TOL)?;
    check("logits", &logits(&m, &loaded, &states[2], &ctx)?, tensor(&io, "logits"), TOL)?;
    Ok(())
}

#[test]
fn log_buckets_match_torch_for_v3_base() -> Result<()> {
    let want = tensor(&io()?, "buckets_v3").to_dtype(DType::I64)?.to_vec1::<i64>()?;
    for (k, w) in want.iter().enumerate() {
        let r = k as i64 - 1024;
        assert_eq!(log_bucket_position(r, 256, 512), *w, "relative position {r}");
    }
    Ok(())
}

/// LoRA on query_proj/value_proj with the peft fixture's weights.
fn attach_peft(m: &mut DebertaV2) -> Result<AttachedAdapters> {
    let dir = fixtures().join("tiny_lora");
    let text = std::fs::read_to_string(dir.join("adapter_config.json")).expect("adapter_config.json");
    let j: serde_json::Value = serde_json::from_str(&text).expect("valid adapter_config.json");
    assert_eq!((j["r"].as_u64(), j["lora_alpha"].as_f64()), (Some(4), Some(8.0)));
    let cfg = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: Some(TargetModules::List(vec!["query_proj".into(), "value_proj".into()])),
        ..LoraConfig::default()
    };
    let attached = attach(m, &cfg, 0, &Device::Cpu)?;
    assert_eq!(attached.len(), 4, "query_proj and value_proj of 2 layers");
    let saved = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)?;
    assert_eq!(attached.named_vars_with_prefix("deberta.").len(), saved.len());
    for (module, layer) in &attached.layers {
        let key = |w: &str| format!("base_model.model.deberta.{module}.{w}.weight");
        let a = saved.get(&key("lora_A")).unwrap_or_else(|| panic!("{} missing", key("lora_A")));
        let b = saved.get(&key("lora_B")).unwrap_or_else(|| panic!("{} missing", key("lora_B")));
        layer.set_weights(a, b)?;
    }
    Ok(attached)
}

#[test]
fn tiny_lora_matches_peft() -> Result<()> {
    let io = io()?;
    let (mut m, loaded) = load_tiny()?;
    attach_peft(&mut m)?;
    let (ids, mask) = inputs(&io)?;
    let ctx = Ctx::eval();
    let hidden = m.forward(&ids, None, &mask, &ctx)?;
    check("lora_last_hidden_state", &hidden, tensor(&io, "lora_last_hidden_state"), TOL)?;
    let got = logits(&m, &loaded, &hidden, &ctx)?;
    check("lora_logits", &got, tensor(&io, "lora_logits"), TOL)?;
    assert!(got.sub(tensor(&io, "logits"))?.abs()?.max_all()?.to_scalar::<f32>()? > 1e-2, "the adapter matters");
    Ok(())
}

#[test]
fn gradients_reach_every_lora_var_and_match_finite_differences() -> Result<()> {
    let io = io()?;
    let (mut m, loaded) = load_tiny()?;
    let attached = attach_peft(&mut m)?;
    let (ids, mask) = inputs(&io)?;
    let loss_of = |m: &DebertaV2| -> Result<Tensor> {
        let ctx = Ctx::eval_with_grad(); // no dropout, vars tracked
        let hidden = m.forward(&ids, None, &mask, &ctx)?;
        Ok(logits(m, &loaded, &hidden, &ctx)?.sqr()?.sum_all()?)
    };
    let loss = loss_of(&m)?;
    let grads = loss.backward()?;
    for (name, var) in attached.named_vars() {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient"));
        let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
        assert!(norm > 1e-6 && norm.is_finite(), "{name}: gradient norm {norm}");
    }
    // Central difference on one lora_A entry of layer 0's query_proj, which also feeds the
    // relative (p2c) path through the projected rel embeddings.
    let (name, var) = attached
        .named_vars()
        .into_iter()
        .find(|(n, _)| n.contains("layer.0.attention.self.query_proj.lora_A"))
        .expect("layer 0 query_proj lora_A");
    let analytic = grads.get(var.as_tensor()).expect("grad").flatten_all()?.to_vec1::<f32>()?[5] as f64;
    let base = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
    let eps = 1e-2f32;
    let at = |delta: f32| -> Result<f64> {
        let mut v = base.clone();
        v[5] += delta;
        var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu)?)?;
        Ok(loss_of(&m)?.to_scalar::<f32>()? as f64)
    };
    let numeric = (at(eps)? - at(-eps)?) / (2.0 * eps as f64);
    at(0.0)?;
    let rel = (numeric - analytic).abs() / analytic.abs().max(1e-3);
    println!("{name}[5]: analytic {analytic:.6e} numeric {numeric:.6e} rel err {rel:.2e}");
    assert!(rel < 2e-2, "{name}[5]: analytic {analytic} vs numeric {numeric}");
    Ok(())
}

/// A copy of the tiny model whose config.json is edited by `edit`.
fn tiny_with(tag: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bayeslora-deberta-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let src = fixtures().join("tiny");
    std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).expect("copy weights");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).expect("config")).expect("json");
    edit(&mut cfg);
    std::fs::write(dir.join("config.json"), cfg.to_string()).expect("write config");
    dir
}

#[test]
fn conv_layer_and_unsupported_options_are_refused_naming_config_json() {
    let cases: [(&str, &str, serde_json::Value); 3] = [
        ("conv", "conv_kernel_size", serde_json::json!(3)),
        ("share", "share_att_key", serde_json::json!(false)),
        ("pos", "pos_att_type", serde_json::json!(["p2p"])),
    ];
    for (tag, field, value) in cases {
        let dir = tiny_with(tag, |c| c[field] = value);
        let msg = models::load(&dir, &LoadOptions::default()).err().map(|e| e.to_string()).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(msg.contains("config.json") && msg.contains(field), "{field}: {msg}");
    }
}

#[test]
fn default_lora_targets_are_query_and_value_proj() -> Result<()> {
    let (mut m, _) = load_tiny()?;
    let cfg = LoraConfig::default().with_default_targets(Architecture::DebertaV2);
    let attached = attach(&mut m, &cfg, 0, &Device::Cpu)?;
    let names: Vec<&str> = attached.layers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.len(), 4, "{names:?}");
    assert!(names.iter().all(|n| n.ends_with("query_proj") || n.ends_with("value_proj")), "{names:?}");
    Ok(())
}

#[test]
fn task_model_uses_context_pooler_and_checkpoint_classifier() -> Result<()> {
    use bayeslora::data::BatchTensors;
    use bayeslora::train::{Classifier, TaskModel};
    let io = io()?;
    let loaded = models::load(&fixtures().join("tiny"), &LoadOptions::default())?;
    // Default targets, zero lora_B: the task model's logits are the checkpoint's.
    let model = TaskModel::build(loaded, &LoraConfig::default(), 3, 0, &Device::Cpu)?;
    assert_eq!(model.adapters.len(), 4);
    let (ids, mask) = inputs(&io)?;
    let (b, t) = ids.dims2()?;
    let batch = BatchTensors {
        token_type_ids: Tensor::zeros((b, t), DType::U32, &Device::Cpu)?,
        input_ids: ids,
        attention_mask: mask,
        labels: Tensor::zeros(b, DType::U32, &Device::Cpu)?,
        label_token_ids: None,
        class_mask: None,
        last_positions: Tensor::zeros(b, DType::U32, &Device::Cpu)?,
    };
    check("task_model logits", &model.logits(&batch, &Ctx::eval())?, tensor(&io, "logits"), TOL)?;
    let names: Vec<String> = model.trainable().into_iter().map(|(n, _)| n).collect();
    assert!(names.iter().any(|n| n == "classifier.weight"), "{names:?}");
    Ok(())
}

#[test]
fn dropout_only_in_training_and_reproducible() -> Result<()> {
    let io = io()?;
    let (m, _) = load_tiny()?;
    let (ids, mask) = inputs(&io)?;
    let diff = |a: &Tensor, b: &Tensor| -> Result<f32> { Ok(a.sub(b)?.abs()?.max_all()?.to_scalar::<f32>()?) };
    let eval = m.forward(&ids, None, &mask, &Ctx::eval())?;
    let t1 = m.forward(&ids, None, &mask, &Ctx::train(1))?;
    let t1b = m.forward(&ids, None, &mask, &Ctx::train(1))?;
    let t2 = m.forward(&ids, None, &mask, &Ctx::train(2))?;
    assert_eq!(diff(&t1, &t1b)?, 0.0);
    assert!(diff(&t1, &t2)? > 1e-3 && diff(&t1, &eval)? > 1e-3);
    Ok(())
}
