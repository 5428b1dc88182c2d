//! The Llama family of decoders: Llama 2/3, Mistral and Qwen2, as HF transformers runs them.
//!
//! One file covers the family because the three differ only in config: grouped-query attention
//! (`num_key_value_heads`), RoPE with `rope_theta` and optional `llama3` frequency scaling, q/k/v
//! biases (Qwen2), an explicit `head_dim` (Mistral), and tied embeddings
//! (`tie_word_embeddings`). Every block is pre-norm: `x + attn(rms_norm(x))`, then
//! `x + mlp(rms_norm(x))` with the SwiGLU MLP `down(silu(gate(x)) · up(x))`. A frozen `o_proj`
//! or `down_proj` runs with its residual add as one op ([`ops::residual_projection`]), which
//! keeps for the backward neither its input nor its output.
//!
//! [`LlamaRawConfig`] mirrors config.json (both the transformers 4 spelling `rope_theta` +
//! `rope_scaling` and the transformers 5 spelling `rope_parameters`); [`LlamaConfig`] is the
//! resolved, validated form. [`Llama`] holds frozen weights; every projection is an
//! [`Linear`](super::linear::Linear) named as in HF (`model.layers.0.self_attn.q_proj`)
//! so adapters attach by name through [`HasLinears`]. All ops come from [`crate::ops`], which have
//! backward passes (candle-nn's fused norm/rope/softmax do not).
//!
//! Shape legend: B batch, T tokens, C hidden size, H heads, Hkv key/value heads, D head dim,
//! V vocabulary, K selected tokens.
//!
//! Mistral's `sliding_window` is ignored: it only masks keys more than `sliding_window` (4096 in
//! released models) tokens back, far beyond the sequence lengths we train and score on. A config
//! whose window is shorter than `max_position_embeddings` still loads; sequences longer than the
//! window would then differ from HF.
//!
//! ```no_run
//! use bayeslora::models::linear::Ctx;
//! use bayeslora::models::llama::{Llama, LlamaConfig};
//! use candle_core::{DType, Device, Tensor};
//! let dir = std::path::Path::new("tiny-llama");
//! let cfg = LlamaConfig::from_file(&dir.join("config.json"))?;
//! let weights = bayeslora::models::Weights::from_dir(dir)?;
//! let model = Llama::load(&weights, &cfg, DType::F32, &Device::Cpu)?;
//! let ids = Tensor::new(&[[1u32, 5, 9]], &Device::Cpu)?;
//! let mask = Tensor::ones((1, 3), DType::F32, &Device::Cpu)?;
//! let hidden = model.forward(&ids, &mask, &Ctx::eval())?; // [1, 3, C]
//! let last = Tensor::new(&[2u32], &Device::Cpu)?;
//! let logits = model.logits_at(&hidden, &last, None)?; // [1, V]
//! # Ok::<(), bayeslora::Error>(())
//! ```
mod config;

pub use config::{Llama3RopeScaling, LlamaConfig, LlamaRawConfig, LlamaVariant, RawRopeParameters, SUPPORTED};

use super::linear::{Ctx, HasLinears, Linear};
use super::load::Weights;
use crate::ops::{self, AttentionMask};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use std::sync::Arc;

/// Reads HF-named tensors in the compute dtype on the target device.
struct TensorSource<'a> {
    weights: &'a Weights,
    dtype: DType,
    device: &'a Device,
}

impl TensorSource<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.weights.get(name, shape, self.dtype, self.device)
    }

    fn linear(&self, prefix: &str, out: usize, inp: usize, bias: bool, salt: u64) -> Result<Linear> {
        let weight = self.get(&format!("{prefix}.weight"), &[out, inp])?;
        let bias = if bias { Some(self.get(&format!("{prefix}.bias"), &[out])?) } else { None };
        let mut l = Linear::new(weight, bias);
        l.salt = salt;
        Ok(l)
    }
}

/// Self-attention with GQA and RoPE. `q_proj: [H·D, C]`, `k_proj`/`v_proj: [Hkv·D, C]`,
/// `o_proj: [C, H·D]`.
#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: usize,
    kv_heads: usize,
}

impl Attention {
    fn load(src: &TensorSource, prefix: &str, cfg: &LlamaConfig, layer: usize) -> Result<Self> {
        let (c, h, hkv, d) = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        Ok(Self {
            q_proj: src.linear(&format!("{prefix}.q_proj"), h * d, c, cfg.qkv_bias, salt(layer, 0))?,
            k_proj: src.linear(&format!("{prefix}.k_proj"), hkv * d, c, cfg.qkv_bias, salt(layer, 1))?,
            v_proj: src.linear(&format!("{prefix}.v_proj"), hkv * d, c, cfg.qkv_bias, salt(layer, 2))?,
            o_proj: src.linear(&format!("{prefix}.o_proj"), c, h * d, cfg.o_bias, salt(layer, 3))?,
            heads: h,
            kv_heads: hkv,
        })
    }

    /// `residual + attention(x)`, `x, residual: [B, T, C]` → `[B, T, C]`.
    fn forward(&self, x: &Tensor, residual: &Tensor, rope: &Rope, mask: &AttentionMask, ctx: &Ctx) -> Result<Tensor> {
        // [B, T, heads·D] → [B, heads, T, D]
        let tables = Some((&rope.cos, &rope.sin));
        let q = ops::projection_heads(&self.q_proj.forward(x, ctx)?, self.heads, tables)?;
        let k = ops::projection_heads(&self.k_proj.forward(x, ctx)?, self.kv_heads, tables)?;
        let v = ops::projection_heads(&self.v_proj.forward(x, ctx)?, self.kv_heads, None)?;
        let y = ops::attention(&q, &k, &v, mask)?;
        residual_projection(residual, ops::ProjectionInput::Heads(&y), &self.o_proj, ctx)
    }
}

/// SwiGLU: `down(silu(gate(x)) · up(x))`.
#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn load(src: &TensorSource, prefix: &str, cfg: &LlamaConfig, layer: usize) -> Result<Self> {
        let (c, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: src.linear(&format!("{prefix}.gate_proj"), i, c, bias, salt(layer, 4))?,
            up_proj: src.linear(&format!("{prefix}.up_proj"), i, c, bias, salt(layer, 5))?,
            down_proj: src.linear(&format!("{prefix}.down_proj"), c, i, bias, salt(layer, 6))?,
        })
    }

    /// `residual + mlp(x)`.
    fn forward(&self, x: &Tensor, residual: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x, ctx)?;
        let up = self.up_proj.forward(x, ctx)?;
        residual_projection(residual, ops::ProjectionInput::Swiglu { gate: &gate, up: &up }, &self.down_proj, ctx)
    }
}

/// A pre-norm decoder block.
#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    /// `[C]`, in the compute dtype (statistics are f32 inside `ops::rms_norm`).
    input_layernorm: Tensor,
    post_attention_layernorm: Tensor,
}

impl DecoderLayer {
    fn load(src: &TensorSource, cfg: &LlamaConfig, layer: usize) -> Result<Self> {
        let p = format!("model.layers.{layer}");
        Ok(Self {
            self_attn: Attention::load(src, &format!("{p}.self_attn"), cfg, layer)?,
            mlp: Mlp::load(src, &format!("{p}.mlp"), cfg, layer)?,
            input_layernorm: src.get(&format!("{p}.input_layernorm.weight"), &[cfg.hidden_size])?,
            post_attention_layernorm: src.get(&format!("{p}.post_attention_layernorm.weight"), &[cfg.hidden_size])?,
        })
    }

    /// The adapters' trainable vars (weights and gates): what a checkpointed layer's backward
    /// must hand back to the training loop.
    fn trainable_vars(&self) -> Vec<Var> {
        let a = &self.self_attn;
        let m = &self.mlp;
        [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
            .into_iter()
            .filter_map(|l| l.adapter.as_ref())
            .flat_map(|ad| ad.named_vars().into_iter().chain(ad.named_gate_vars()))
            .map(|(_, v)| v)
            .fold(Vec::new(), |mut vars: Vec<Var>, v| {
                // B-LoRA's gate bank is one var shared by every adapted linear: list it once.
                if !vars.iter().any(|w| w.id() == v.id()) {
                    vars.push(v);
                }
                vars
            })
    }

    /// [`DecoderLayer::forward`], or with `ctx.checkpoint` the same through
    /// [`ops::checkpoint`]: only `x` is kept for the backward, which recomputes the layer.
    fn forward_maybe_checkpointed(
        &self,
        x: &Tensor,
        rope: &Rope,
        mask: &AttentionMask,
        eps: f64,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        if !ctx.checkpoint {
            return self.forward(x, rope, mask, eps, ctx);
        }
        // Cheap clones (tensors and adapters are reference-counted): the segment outlives this call.
        let (layer, rope, mask, ctx) = (self.clone(), rope.clone(), mask.clone(), *ctx);
        let segment: ops::Segment =
            Arc::new(move |x: &Tensor| layer.forward(x, &rope, &mask, eps, &ctx).map_err(candle_core::Error::wrap));
        Ok(ops::checkpoint(x, segment, self.trainable_vars())?)
    }

    fn forward(&self, x: &Tensor, rope: &Rope, mask: &AttentionMask, eps: f64, ctx: &Ctx) -> Result<Tensor> {
        let h = ops::rms_norm(x, &self.input_layernorm, eps)?;
        let x = self.self_attn.forward(&h, x, rope, mask, ctx)?;
        let h = ops::rms_norm(&x, &self.post_attention_layernorm, eps)?;
        self.mlp.forward(&h, &x, ctx)
    }
}

/// `residual + proj(f(input))`: one op that keeps neither f's output nor the projection's
/// ([`ops::residual_projection`]) when the projection is frozen; composed when an adapter
/// rides on it.
fn residual_projection(residual: &Tensor, input: ops::ProjectionInput, proj: &Linear, ctx: &Ctx) -> Result<Tensor> {
    if proj.adapter.is_none() {
        return Ok(ops::residual_projection(residual, input, &proj.weight, proj.bias.as_ref())?);
    }
    Ok(residual.add(&proj.forward(&input.value(false)?, ctx)?)?)
}

/// Distinct dropout salt per (layer, module): q k v o gate up down = 0..6.
fn salt(layer: usize, module: u64) -> u64 {
    ((layer as u64) << 8) | module
}
/// The lm_head's salt, outside every layer's range.
const LM_HEAD_SALT: u64 = u64::MAX;

/// cos/sin tables `[T, D]` for positions 0..T, in the compute dtype.
#[derive(Clone)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

/// A Llama-family decoder with frozen weights and adapter slots on every projection.
#[derive(Debug, Clone)]
pub struct Llama {
    /// `[V, C]`, frozen; looked up with `index_select`.
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    /// Final RMSNorm weight `[C]`.
    norm: Tensor,
    /// `[V, C]`; shares `embed_tokens`' storage when the embeddings are tied.
    lm_head: Linear,
    /// `[D/2]` f32.
    inv_freq: Tensor,
    cfg: LlamaConfig,
    dtype: DType,
}

impl Llama {
    /// Builds the model from HF-named tensors (`model.embed_tokens.weight`,
    /// `model.layers.{i}.self_attn.q_proj.weight`, …, `lm_head.weight` unless tied), from
    /// safetensors or from a dequantized GGUF. Tensors are cast to `dtype` (the compute dtype:
    /// f32 on CPU, bf16 on GPU) and moved to `device`; a wrong shape fails with
    /// [`Error::TensorShape`] naming the file.
    pub fn load(weights: &Weights, cfg: &LlamaConfig, dtype: DType, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let src = TensorSource { weights, dtype, device };
        let (v, c) = (cfg.vocab_size, cfg.hidden_size);
        let embed_tokens = src.get("model.embed_tokens.weight", &[v, c])?;
        let layers =
            (0..cfg.num_hidden_layers).map(|i| DecoderLayer::load(&src, cfg, i)).collect::<Result<Vec<_>>>()?;
        let norm = src.get("model.norm.weight", &[c])?;
        let lm_weight =
            if cfg.tie_word_embeddings { embed_tokens.clone() } else { src.get("lm_head.weight", &[v, c])? };
        let mut lm_head = Linear::new(lm_weight, None);
        lm_head.salt = LM_HEAD_SALT;
        let inv_freq = Tensor::new(cfg.inv_freq(), device)?;
        Ok(Self { embed_tokens, layers, norm, lm_head, inv_freq, cfg: cfg.clone(), dtype })
    }

    /// The resolved config.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// Token embeddings: `input_ids: [B, T]` u32 → `[B, T, C]` (frozen lookup).
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let flat = input_ids.flatten_all()?.to_dtype(DType::U32)?;
        Ok(self.embed_tokens.index_select(&flat, 0)?.reshape((b, t, self.cfg.hidden_size))?)
    }

    /// Final-normed hidden states at every position, `[B, T, C]` in the compute dtype.
    /// `input_ids: [B, T]` u32; `attention_mask: [B, T]` f32, 1 for real tokens and 0 for
    /// (right) padding. Attention is causal; position ids are 0..T for every row, which is what
    /// HF uses with right padding.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        self.forward_embeds(&self.embed(input_ids)?, attention_mask, ctx)
    }

    /// [`Llama::forward`] from input embeddings `[B, T, C]` (a Var for input-gradient checks,
    /// or prompt-tuning vectors).
    pub fn forward_embeds(&self, embeds: &Tensor, attention_mask: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let mut all = self.run(embeds, attention_mask, ctx, false)?;
        // invariant: `run` returns at least the final state.
        let last = all.pop().expect("run returns the final hidden state");
        Ok(ops::rms_norm(&last, &self.norm, self.cfg.rms_norm_eps)?)
    }

    /// Every residual-stream state, as HF's `output_hidden_states`: `[embeddings, after layer 0,
    /// …, after layer L−2, final-normed output]`, L + 1 tensors of `[B, T, C]` (like HF, the last
    /// one is [`Llama::forward`]'s result, not the raw output of layer L−1). For golden tests and
    /// probing; it keeps every state alive.
    pub fn hidden_states(&self, input_ids: &Tensor, attention_mask: &Tensor, ctx: &Ctx) -> Result<Vec<Tensor>> {
        let mut all = self.run(&self.embed(input_ids)?, attention_mask, ctx, true)?;
        if let Some(last) = all.last_mut() {
            *last = ops::rms_norm(last, &self.norm, self.cfg.rms_norm_eps)?;
        }
        Ok(all)
    }

    fn run(&self, embeds: &Tensor, attention_mask: &Tensor, ctx: &Ctx, keep_all: bool) -> Result<Vec<Tensor>> {
        let (b, t, c) = embeds.dims3()?;
        if c != self.cfg.hidden_size {
            return Err(Error::config("embeds.dim(2)", c, format!("expected hidden_size {}", self.cfg.hidden_size)));
        }
        if attention_mask.dims() != [b, t] {
            return Err(Error::config(
                "attention_mask shape",
                format!("{:?}", attention_mask.dims()),
                format!("expected [{b}, {t}] like input_ids"),
            ));
        }
        let mask = AttentionMask::new(Some(attention_mask), true, b, t, embeds.device())?;
        let rope = self.rope(t, embeds.device())?;
        let mut x = embeds.to_dtype(self.dtype)?;
        let mut states = Vec::with_capacity(if keep_all { self.layers.len() + 1 } else { 1 });
        for layer in &self.layers {
            if keep_all {
                states.push(x.clone());
            }
            x = layer.forward_maybe_checkpointed(&x, &rope, &mask, self.cfg.rms_norm_eps, ctx)?;
        }
        states.push(x);
        Ok(states)
    }

    /// cos/sin `[T, D]` for positions 0..T: `freqs = pos ⊗ inv_freq` duplicated over the two
    /// halves (HF's rotate-half layout), computed in f32 and cast to the compute dtype.
    fn rope(&self, t: usize, device: &Device) -> Result<Rope> {
        let pos = Tensor::arange(0u32, t as u32, device)?.to_dtype(DType::F32)?;
        let freqs = pos.unsqueeze(1)?.broadcast_mul(&self.inv_freq.to_device(device)?.unsqueeze(0)?)?;
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?;
        Ok(Rope { cos: emb.cos()?.to_dtype(self.dtype)?, sin: emb.sin()?.to_dtype(self.dtype)? })
    }

    /// Logits at one position per row: `hidden: [B, T, C]`, `positions: [B]` u32 (e.g. each
    /// row's last real token) → `[B, K]` for `token_ids: [K]` u32, or `[B, V]` without. Only the
    /// selected rows of the lm_head are multiplied, so scoring K answer tokens costs K·C per row
    /// instead of V·C. An adapter on the lm_head is applied (without dropout, its vars tracked) and
    /// then sliced the same way.
    pub fn logits_at(&self, hidden: &Tensor, positions: &Tensor, token_ids: Option<&Tensor>) -> Result<Tensor> {
        let (b, _, c) = hidden.dims3()?;
        let idx = positions.to_dtype(DType::U32)?.reshape((b, 1, 1))?.broadcast_as((b, 1, c))?.contiguous()?;
        let h = hidden.gather(&idx, 1)?.reshape((b, c))?; // [B, C]
        let Some(ids) = token_ids else {
            return self.lm_head.forward(&h, &Ctx::eval_with_grad());
        };
        let ids = ids.to_dtype(DType::U32)?;
        let w = self.lm_head.weight.index_select(&ids, 0)?; // [K, C]
        let logits = ops::frozen_linear(&h, &w, None)?;
        match &self.lm_head.adapter {
            Some(a) => Ok(logits.add(
                &a.forward(&h, &Ctx::eval_with_grad(), self.lm_head.salt)?
                    .index_select(&ids, 1)?
                    .to_dtype(logits.dtype())?,
            )?),
            None => Ok(logits),
        }
    }

    /// Logits at every position, `hidden: [B, T, C]` → `[B, T, V]` (golden tests, LM losses).
    pub fn lm_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden, &Ctx::eval_with_grad())
    }

    /// The output projection `lm_head` (`[V, C]`; the embedding when tied). Not listed by
    /// [`HasLinears::linears_mut`], so adapters never land on it by default.
    pub fn lm_head_mut(&mut self) -> &mut Linear {
        &mut self.lm_head
    }
}

impl HasLinears for Llama {
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::with_capacity(self.layers.len() * 7);
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let a = &mut layer.self_attn;
            let m = &mut layer.mlp;
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.self_attn.q_proj"), &mut a.q_proj));
            out.push((format!("{p}.self_attn.k_proj"), &mut a.k_proj));
            out.push((format!("{p}.self_attn.v_proj"), &mut a.v_proj));
            out.push((format!("{p}.self_attn.o_proj"), &mut a.o_proj));
            out.push((format!("{p}.mlp.gate_proj"), &mut m.gate_proj));
            out.push((format!("{p}.mlp.up_proj"), &mut m.up_proj));
            out.push((format!("{p}.mlp.down_proj"), &mut m.down_proj));
        }
        out
    }
}
