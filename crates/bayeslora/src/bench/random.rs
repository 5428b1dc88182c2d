//! Llama-family models with random frozen weights, built from a config.json alone (no
//! checkpoint, no tokenizer): the `--shape` models of `bayeslora bench train`.
use crate::error::Context;
use crate::models::{Architecture, Backbone, Llama, LlamaConfig, LoadedModel, Weights};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// `n` values of N(0, std²) from a seeded splitmix64 + Box–Muller (CPU weights; reproducible on
/// every machine, also used by the GPU tests for their inputs).
pub fn normal_cpu(n: usize, std: f32, seed: u64) -> Vec<f32> {
    let mut s = seed;
    let mut uniform = move || {
        s = s.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^= z >> 31;
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64 // (0, 1)
    };
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let (u1, u2) = (uniform(), uniform());
        let r = (-2.0 * u1.ln()).sqrt() * std as f64;
        let t = 2.0 * std::f64::consts::PI * u2;
        out.push((r * t.cos()) as f32);
        out.push((r * t.sin()) as f32);
    }
    out.truncate(n);
    out
}

/// A `[shape]` tensor of N(0, 0.02²) in `dtype` on `device`: curand (seeded once per model) on
/// CUDA, generated in f32 and cast; a splitmix64 stream on the CPU.
fn randn(shape: &[usize], dtype: DType, device: &Device, seed: u64) -> Result<Tensor> {
    let t = match device {
        Device::Cpu => Tensor::from_vec(normal_cpu(shape.iter().product(), 0.02, seed), shape, device)?,
        _ => Tensor::randn(0f32, 0.02f32, shape, device)?,
    };
    Ok(t.to_dtype(dtype)?)
}

/// A Llama-family model with random frozen weights, as transformers' `_init_weights` (linears and
/// embeddings N(0, 0.02²), biases 0, RMSNorm weights 1), built in `dtype` on `device`, plus the
/// number of frozen parameters. The tensors are handed to [`Llama::load`] as in-memory weights,
/// which keeps them where they are (no copy, no cast).
pub fn random_llama(cfg: &LlamaConfig, dtype: DType, device: &Device, seed: u64) -> Result<(Llama, usize)> {
    if !matches!(device, Device::Cpu) {
        device.set_seed(seed)?;
    }
    let (v, c, i) = (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim);
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut count = 0usize;
    let mut k = 0u64;
    let mut put = |name: String, shape: &[usize], fill: Option<f64>| -> Result<()> {
        k += 1;
        let t = match fill {
            None => randn(shape, dtype, device, seed.wrapping_mul(0x100000001B3).wrapping_add(k))?,
            Some(x) => (Tensor::ones(shape, dtype, device)? * x)?,
        };
        count += t.elem_count();
        tensors.insert(name, t);
        Ok(())
    };
    put("model.embed_tokens.weight".into(), &[v, c], None)?;
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (m, out, inp, bias) in [
            ("self_attn.q_proj", q, c, cfg.qkv_bias),
            ("self_attn.k_proj", kv, c, cfg.qkv_bias),
            ("self_attn.v_proj", kv, c, cfg.qkv_bias),
            ("self_attn.o_proj", c, q, cfg.o_bias),
            ("mlp.gate_proj", i, c, cfg.mlp_bias),
            ("mlp.up_proj", i, c, cfg.mlp_bias),
            ("mlp.down_proj", c, i, cfg.mlp_bias),
        ] {
            put(format!("{p}.{m}.weight"), &[out, inp], None)?;
            if bias {
                put(format!("{p}.{m}.bias"), &[out], Some(0.0))?;
            }
        }
        put(format!("{p}.input_layernorm.weight"), &[c], Some(1.0))?;
        put(format!("{p}.post_attention_layernorm.weight"), &[c], Some(1.0))?;
    }
    put("model.norm.weight".into(), &[c], Some(1.0))?;
    if !cfg.tie_word_embeddings {
        put("lm_head.weight".into(), &[v, c], None)?;
    }
    let weights = Weights::from_tensors("<random weights>", tensors);
    let model = Llama::load(&weights, cfg, dtype, device)?;
    Ok((model, count))
}

/// The number of frozen parameters of a Llama-family model (embeddings, every projection with its
/// biases, norms, and the lm_head unless tied), as `sum(p.numel())` over a transformers model.
pub fn frozen_param_count(cfg: &LlamaConfig) -> usize {
    let (v, c, i) = (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim);
    let bias = |on: bool, n: usize| if on { n } else { 0 };
    let attn = 2 * c * q + 2 * c * kv + bias(cfg.qkv_bias, q + 2 * kv) + bias(cfg.o_bias, c);
    let mlp = 3 * c * i + bias(cfg.mlp_bias, 2 * i + c);
    let heads = if cfg.tie_word_embeddings { 1 } else { 2 };
    heads * v * c + cfg.num_hidden_layers * (attn + mlp + 2 * c) + c
}

/// The config.json at `path` as a random-weight model (see [`random_llama`]) and its number of
/// frozen parameters.
pub fn random_model(path: &Path, dtype: DType, device: &Device, seed: u64) -> Result<(LoadedModel, usize)> {
    let cfg = LlamaConfig::from_file(path).with_context(|| format!("reading {}", path.display()))?;
    let (llama, n) = random_llama(&cfg, dtype, device, seed)?;
    if n != frozen_param_count(&cfg) {
        return Err(Error::run(format!("built {n} frozen parameters, the config says {}", frozen_param_count(&cfg))));
    }
    let config_json = serde_json::to_value(&cfg)?;
    let loaded = LoadedModel {
        arch: Architecture::Llama,
        backbone: Backbone::Llama(llama),
        tokenizer: None,
        config_json,
        dir: path.to_path_buf(),
        weights: Weights::from_tensors(path, HashMap::new()),
    };
    Ok((loaded, n))
}

/// Every tensor of a checkpoint, counted (the frozen parameters of a real model).
pub fn count_params(w: &Weights) -> usize {
    w.names().iter().filter_map(|n| w.shape_of(n).ok()).map(|s| s.iter().product::<usize>()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_weights_are_seeded_and_scaled() {
        let a = normal_cpu(10_000, 0.02, 7);
        assert_eq!(a, normal_cpu(10_000, 0.02, 7));
        assert_ne!(a, normal_cpu(10_000, 0.02, 8));
        let var = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / a.len() as f64;
        assert!((var.sqrt() - 0.02).abs() < 0.001, "std {}", var.sqrt());
    }

    #[test]
    fn shipped_shapes_have_the_published_sizes() -> Result<()> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/bench");
        // transformers' `sum(p.numel() for p in model.parameters())` of each architecture.
        for (file, params) in [
            ("llama2_7b.json", 6_738_415_616usize),
            ("llama3_8b.json", 8_030_261_248),
            ("qwen2_7b.json", 7_615_616_512),
            ("smollm2_135m.json", 134_515_008),
        ] {
            let cfg = LlamaConfig::from_file(&dir.join(file))?;
            assert_eq!(frozen_param_count(&cfg), params, "{file}");
        }
        Ok(())
    }
}
