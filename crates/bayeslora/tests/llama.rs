//! Golden tests of `models::llama` against HF transformers on tiny random checkpoints
//! (`tests/fixtures/llama/<name>/`, made by `scripts/fixtures/make_llama_fixtures.py`), plus
//! gradient flow through the whole decoder.
use bayeslora::adapters::{Adapter, Ctx, HasLinears};
use bayeslora::models::llama::{Llama, LlamaConfig};
use bayeslora::models::Weights;
use bayeslora::Result;
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// f32 forward vs f32 PyTorch: summation order differs, nothing else.
const TOL: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama").join(name)
}

fn load(name: &str, dtype: DType) -> Result<(Llama, HashMap<String, Tensor>)> {
    let dir = fixture(name);
    let cfg = LlamaConfig::from_file(&dir.join("config.json"))?;
    let model = Llama::load(&Weights::from_dir(&dir)?, &cfg, dtype, &Device::Cpu)?;
    let golden = candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu)?;
    Ok((model, golden))
}

fn inputs(golden: &HashMap<String, Tensor>) -> (Tensor, Tensor) {
    let ids = golden["input_ids"].to_dtype(DType::U32).expect("ids");
    (ids, golden["attention_mask"].clone())
}

/// Max |got − want| with its index, panicking with the name and worst index past `tol`
/// (llm.c's `check_tensor`).
fn check(name: &str, got: &Tensor, want: &Tensor, tol: f32) -> f32 {
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    let g = got.to_dtype(DType::F32).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>()).expect("got");
    let w = want.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("want");
    let (worst, err) = g.iter().zip(&w).map(|(a, b)| (a - b).abs()).enumerate().fold((0, 0f32), |acc, (i, e)| {
        if e > acc.1 || e.is_nan() {
            (i, e)
        } else {
            acc
        }
    });
    let dims = want.dims();
    let mut idx = vec![0; dims.len()];
    let mut rest = worst;
    for d in (0..dims.len()).rev() {
        idx[d] = rest % dims[d];
        rest /= dims[d];
    }
    println!("{name}: max abs err {err:.3e} at {idx:?}");
    assert!(err <= tol, "{name}: max abs err {err:.3e} at {idx:?} (got {}, want {}) > {tol:e}", g[worst], w[worst]);
    err
}

fn golden_matches(name: &str) -> Result<()> {
    let (model, golden) = load(name, DType::F32)?;
    let (ids, mask) = inputs(&golden);
    let states = model.hidden_states(&ids, &mask, &Ctx::eval())?;
    check(&format!("{name}/hidden_layer0"), &states[1], &golden["hidden_layer0"], TOL);
    let hidden = model.forward(&ids, &mask, &Ctx::eval())?;
    check(&format!("{name}/last_hidden"), &hidden, &golden["last_hidden"], TOL);
    assert_eq!(states.len(), model.config().num_hidden_layers + 1);
    check(&format!("{name}/hidden_states[-1]"), &states[states.len() - 1], &hidden, 0.0);
    let logits = model.lm_logits(&hidden)?;
    check(&format!("{name}/logits"), &logits, &golden["logits"], TOL);

    // logits_at: the last real position of each row (6 and 4: row 1 has two pads), a few ids.
    let pos = Tensor::new(&[6u32, 4], &Device::Cpu)?;
    let picks = [3u32, 17, 42, 0];
    let sel = Tensor::new(&picks, &Device::Cpu)?;
    let want_full = Tensor::stack(&[logits.get(0)?.get(6)?, logits.get(1)?.get(4)?], 0)?;
    check(&format!("{name}/logits_at(all)"), &model.logits_at(&hidden, &pos, None)?, &want_full, 1e-5);
    check(
        &format!("{name}/logits_at(ids)"),
        &model.logits_at(&hidden, &pos, Some(&sel))?,
        &want_full.index_select(&sel, 1)?,
        1e-5,
    );
    Ok(())
}

#[test]
fn llama3_rope_scaling_untied_matches_hf() -> Result<()> {
    golden_matches("llama3")
}

#[test]
fn qwen2_bias_tied_matches_hf() -> Result<()> {
    golden_matches("qwen2")
}

#[test]
fn mistral_explicit_head_dim_matches_hf() -> Result<()> {
    golden_matches("mistral")
}

#[test]
fn linears_have_hf_names_and_distinct_salts() -> Result<()> {
    let (mut model, _) = load("llama3", DType::F32)?;
    let names: Vec<(String, u64)> = model.linears_mut().into_iter().map(|(n, l)| (n, l.salt)).collect();
    assert_eq!(names.len(), 2 * 7);
    assert_eq!(names[0].0, "model.layers.0.self_attn.q_proj");
    assert_eq!(names[13].0, "model.layers.1.mlp.down_proj");
    let mut salts: Vec<u64> = names.iter().map(|n| n.1).collect();
    salts.push(model.lm_head_mut().salt);
    salts.sort();
    salts.dedup();
    assert_eq!(salts.len(), 15, "salts must be distinct");
    Ok(())
}

#[test]
fn bf16_compute_stays_close() -> Result<()> {
    let (model, golden) = load("llama3", DType::BF16)?;
    let (ids, mask) = inputs(&golden);
    let hidden = model.forward(&ids, &mask, &Ctx::eval())?;
    assert_eq!(hidden.dtype(), DType::BF16);
    // bf16 has 8 mantissa bits; two layers of O(1) activations stay within a few 1e-2.
    check("llama3/bf16 last_hidden", &hidden, &golden["last_hidden"], 0.15);
    Ok(())
}

/// A dense trainable delta `x·Wᵀ`, standing in for LoRA.
#[derive(Debug)]
struct Delta {
    w: Var,
}

impl Adapter for Delta {
    fn forward(&self, x: &Tensor, _ctx: &Ctx, _salt: u64) -> Result<Tensor> {
        Ok(x.broadcast_matmul(&self.w.as_tensor().t()?)?)
    }
    fn named_vars(&self) -> Vec<(String, Var)> {
        vec![("delta.weight".into(), self.w.clone())]
    }
    fn peft_type(&self) -> &'static str {
        "TEST"
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[test]
fn gradients_reach_every_input_position_and_every_adapter() -> Result<()> {
    let (mut model, golden) = load("qwen2", DType::F64)?;
    let (ids, mask) = inputs(&golden);
    let mut vars = Vec::new();
    for (name, linear) in model.linears_mut() {
        let w = Var::randn(0f64, 0.01, (linear.out_features(), linear.in_features()), &Device::Cpu)?;
        vars.push((name, w.clone()));
        linear.adapter = Some(Arc::new(Delta { w }));
    }
    let embeds = Var::from_tensor(&model.embed(&ids)?)?;
    let hidden = model.forward_embeds(embeds.as_tensor(), &mask, &Ctx::train(1))?;
    // Loss on the last real position of each row (6 and 4): through causal attention it
    // depends on every earlier position, and on nothing later.
    let pos = Tensor::new(&[6u32, 4], &Device::Cpu)?;
    let probe = Tensor::randn(0f64, 1.0, (2, 5), &Device::Cpu)?;
    let loss_of = |h: &Tensor| -> Result<Tensor> {
        let logits = model.logits_at(h, &pos, Some(&Tensor::new(&[1u32, 7, 8, 30, 95], &Device::Cpu)?))?;
        Ok(logits.mul(&probe)?.sum_all()?)
    };
    let loss = loss_of(&hidden)?;
    let grads = loss.backward()?;
    let g = grads.get(embeds.as_tensor()).expect("gradient reaches the embeddings");
    let norms = g.sqr()?.sum(2)?.to_vec2::<f64>()?; // [B, T]
    for t in 0..7 {
        assert!(norms[0][t] > 1e-12, "row 0 position {t} gets no gradient: {:?}", norms[0]);
    }
    for t in 0..5 {
        assert!(norms[1][t] > 1e-12, "row 1 position {t} gets no gradient: {:?}", norms[1]);
    }
    assert!(norms[1][5] == 0.0 && norms[1][6] == 0.0, "padding after the scored position leaks: {:?}", norms[1]);
    for (name, w) in &vars {
        let gw = grads.get(w.as_tensor()).unwrap_or_else(|| panic!("no gradient for the adapter on {name}"));
        assert!(gw.sqr()?.sum_all()?.to_scalar::<f64>()? > 0.0, "zero gradient for {name}");
    }

    // Central differences in f64 on a few embedding coordinates.
    let base = embeds.as_tensor().detach();
    let g = g.flatten_all()?.to_vec1::<f64>()?;
    let eps = 1e-5;
    for &i in &[0usize, 48 * 3 + 5, 48 * 7 + 47, 48 * 9 + 11] {
        let bump = |d: f64| -> Result<f64> {
            let mut v = base.flatten_all()?.to_vec1::<f64>()?;
            v[i] += d;
            let x = Tensor::from_vec(v, base.shape(), &Device::Cpu)?;
            Ok(loss_of(&model.forward_embeds(&x, &mask, &Ctx::train(1))?)?.to_scalar::<f64>()?)
        };
        let fd = (bump(eps)? - bump(-eps)?) / (2.0 * eps);
        assert!((fd - g[i]).abs() <= 1e-6 * (1.0 + fd.abs()), "embedding coord {i}: backprop {} vs fd {fd}", g[i]);
    }
    Ok(())
}

#[test]
fn config_mismatch_names_file_and_tensor() -> Result<()> {
    let dir = fixture("mistral");
    let mut cfg = LlamaConfig::from_file(&dir.join("config.json"))?;
    cfg.intermediate_size += 1;
    let err = Llama::load(&Weights::from_dir(&dir)?, &cfg, DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("model.safetensors") && err.contains("gate_proj"), "{err}");
    Ok(())
}

/// The llama3 fixture with LoRA r 4 on all seven projections (adapter dropout `dropout`).
fn llama3_with_lora_everywhere(
    dropout: f32,
) -> Result<(Llama, HashMap<String, Tensor>, bayeslora::adapters::lora::AttachedAdapters)> {
    use bayeslora::adapters::lora::{attach, LoraConfig, TargetModules};
    let (mut model, golden) = load("llama3", DType::F32)?;
    let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    let config = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: dropout,
        target_modules: Some(TargetModules::List(targets.iter().map(|s| s.to_string()).collect())),
        ..LoraConfig::default()
    };
    let adapters = attach(&mut model, &config, 7, &Device::Cpu)?;
    Ok((model, golden, adapters))
}

#[test]
fn lora_on_every_projection_starts_at_the_base_and_trains() -> Result<()> {
    let (model, golden, adapters) = llama3_with_lora_everywhere(0.0)?;
    let (ids, mask) = inputs(&golden);
    // B = 0 at init: the adapted model is the base model.
    let hidden = model.forward(&ids, &mask, &Ctx::train(3))?;
    check("llama3+lora/last_hidden", &hidden, &golden["last_hidden"], TOL);
    let pos = Tensor::new(&[6u32, 4], &Device::Cpu)?;
    let labels = Tensor::new(&[1u32, 0], &Device::Cpu)?;
    let logits = model.logits_at(&hidden, &pos, Some(&Tensor::new(&[11u32, 12], &Device::Cpu)?))?;
    let grads = bayeslora::ops::cross_entropy(&logits, &labels)?.backward()?;
    let named = adapters.named_vars();
    assert_eq!(named.len(), 2 * 2 * 7, "A and B on 7 projections of 2 layers");
    for (name, var) in named.iter().filter(|(n, _)| n.contains("lora_B")) {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0, "zero gradient for {name}");
    }
    Ok(())
}

/// Activation checkpointing recomputes every layer in the backward; with LoRA on every
/// projection, adapter dropout on and non-zero B, every gradient equals the one kept-activations
/// training gives, bit for bit (the recompute draws the same dropout masks from the same seeds).
#[test]
fn gradient_checkpointing_gives_identical_gradients() -> Result<()> {
    let (model, golden, adapters) = llama3_with_lora_everywhere(0.2)?;
    let (ids, mask) = inputs(&golden);
    let named = adapters.named_vars();
    for (i, (_, var)) in named.iter().enumerate().filter(|(_, (n, _))| n.contains("lora_B")) {
        var.set(
            &Tensor::randn(0f32, 0.05, var.as_tensor().shape(), &Device::Cpu)?.affine(1.0 + i as f64 * 0.01, 0.0)?,
        )?;
    }
    let pos = Tensor::new(&[6u32, 4], &Device::Cpu)?;
    let labels = Tensor::new(&[1u32, 0], &Device::Cpu)?;
    let run = |checkpoint: bool| -> Result<(f32, Vec<Vec<f32>>)> {
        let ctx = Ctx { checkpoint, ..Ctx::train(11) };
        let hidden = model.forward(&ids, &mask, &ctx)?;
        let logits = model.logits_at(&hidden, &pos, None)?;
        let loss = bayeslora::ops::cross_entropy(&logits, &labels)?;
        let grads = bayeslora::ops::backward(&loss)?;
        let g = named
            .iter()
            .map(|(name, v)| {
                let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
                g.flatten_all()?.to_vec1::<f32>()
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((loss.to_scalar::<f32>()?, g))
    };
    let (loss_plain, plain) = run(false)?;
    let (loss_ck, ck) = run(true)?;
    assert_eq!(loss_plain, loss_ck);
    assert_eq!(plain.len(), 2 * 2 * 7);
    for ((name, _), (p, c)) in named.iter().zip(plain.iter().zip(&ck)) {
        assert!(p.iter().any(|v| *v != 0.0), "zero gradient for {name}");
        assert_eq!(p, c, "{name}");
    }
    Ok(())
}
