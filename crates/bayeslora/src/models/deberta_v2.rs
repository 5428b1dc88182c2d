//! DeBERTa-v2/v3 encoder (He et al. 2021, arXiv 2006.03654 and 2111.09543) as HF transformers'
//! `DebertaV2Model`, plus the `DebertaV2ForSequenceClassification` pooler (`ContextPooler`).
//!
//! Shape legend: B batch, T tokens, H heads, D head dim, C hidden size, S relative span
//! (`position_buckets`, else `max_relative_positions`), K labels.
//!
//! Disentangled attention: with content queries/keys `Q`, `K` (`[B, H, T, D]`) and the shared
//! relative embeddings `R` (`encoder.rel_embeddings`, `[2S, C]`, LayerNorm'd when
//! `norm_rel_ebd = "layer_norm"`) projected by the same `query_proj`/`key_proj`
//! (`share_att_key`), the scores are
//!
//! ```text
//! a[i, j] = ( Q_i·K_j  +  Q_i·Kr[c2p(i, j)]  +  K_j·Qr[p2c(j, i)] ) / sqrt(D · (1 + |pos_att_type|))
//! c2p(i, j) = clamp(δ(i, j) + S, 0, 2S − 1),   p2c(j, i) = clamp(−δ(j, i) + S, 0, 2S − 1)
//! ```
//!
//! where `δ(i, j)` is `i − j`, log-bucketed by [`log_bucket_position`] when `position_buckets > 0`.
//! Padding is masked on both sides (query and key) as HF's `get_attention_mask`.
//!
//! Layout follows `bert.rs`: [`DebertaV2ConfigRaw`] mirrors config.json, [`DebertaV2Config`] is
//! resolved, private blocks have `load`/`forward`, module names are the HF keys
//! (`encoder.layer.0.attention.self.query_proj`), every linear is a [`Linear`] and every
//! differentiable op comes from [`crate::ops`]. Checkpoints with or without the `deberta.` prefix
//! load. v3 has no ConvLayer; a config with `conv_kernel_size` is refused.
//!
//! [`Linear`]: super::linear::Linear
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::Distribution;

use super::bert::HeadConfig;
use super::config::parse_config;
use super::encoder::{
    hidden_states, maybe_dropout, prepare_inputs, salt, LayerBody, LayerNorm, Loader, DROPOUT_SALT, EMBEDDINGS,
    LINEAR_SALT, POOLER,
};
use super::linear::{Ctx, HasLinears, Linear};
use super::load::Weights;
use crate::ops;
use crate::{Error, Result};

/// `pos_att_type` as written: a list (`["p2c", "c2p"]`) or a `|`-joined string (`"p2c|c2p"`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
pub enum PosAttType {
    List(Vec<String>),
    Joined(String),
}

/// config.json of a DeBERTa-v2/v3 checkpoint, as written by HF transformers (unknown keys are
/// ignored). Defaults are `DebertaV2Config.__init__`'s.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct DebertaV2ConfigRaw {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_gelu")]
    pub hidden_act: String,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f32,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f32,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub type_vocab_size: usize,
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub relative_attention: bool,
    #[serde(default = "default_minus_one")]
    pub max_relative_positions: i64,
    #[serde(default = "default_minus_one")]
    pub position_buckets: i64,
    #[serde(default)]
    pub pos_att_type: Option<PosAttType>,
    #[serde(default)]
    pub share_att_key: bool,
    #[serde(default)]
    pub norm_rel_ebd: Option<String>,
    #[serde(default = "default_true")]
    pub position_biased_input: bool,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub embedding_size: Option<usize>,
    #[serde(default)]
    pub attention_head_size: Option<usize>,
    #[serde(default)]
    pub conv_kernel_size: Option<usize>,
    #[serde(default)]
    pub pooler_hidden_size: Option<usize>,
    #[serde(default)]
    pub pooler_dropout: f32,
    #[serde(default = "default_gelu")]
    pub pooler_hidden_act: String,
    #[serde(default)]
    pub cls_dropout: Option<f32>,
    #[serde(default)]
    pub id2label: Option<std::collections::HashMap<String, String>>,
}

fn default_gelu() -> String {
    "gelu".into()
}
fn default_dropout() -> f32 {
    0.1
}
fn default_max_position_embeddings() -> usize {
    512
}
fn default_initializer_range() -> f64 {
    0.02
}
fn default_layer_norm_eps() -> f64 {
    1e-7
}
fn default_minus_one() -> i64 {
    -1
}
fn default_true() -> bool {
    true
}

/// The resolved, validated DeBERTa-v2 config.
#[derive(Debug, Clone, PartialEq)]
pub struct DebertaV2Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// `hidden_size / num_attention_heads`.
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub hidden_dropout_prob: f32,
    pub attention_probs_dropout_prob: f32,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub initializer_range: f64,
    pub layer_norm_eps: f64,
    pub relative_attention: bool,
    /// Resolved: values below 1 become `max_position_embeddings` (as HF).
    pub max_relative_positions: usize,
    /// 0 when bucketing is off (`position_buckets <= 0`).
    pub position_buckets: usize,
    /// The relative span S: `position_buckets` if set, else `max_relative_positions`;
    /// `rel_embeddings` is `[2S, C]`.
    pub att_span: usize,
    pub c2p: bool,
    pub p2c: bool,
    pub norm_rel_ebd: bool,
    pub position_biased_input: bool,
    pub pad_token_id: u32,
    pub pooler_dropout: f32,
    /// Dropout before the classifier: `cls_dropout`, else `hidden_dropout_prob` (as HF).
    pub classifier_dropout: f32,
    /// Label count recorded in the checkpoint (`id2label`), if any.
    pub num_labels: Option<usize>,
}

impl DebertaV2ConfigRaw {
    /// Validates and resolves; `file` (config.json) is named in errors.
    // `%` rather than `is_multiple_of` (stable in 1.87): the workspace MSRV is 1.85.
    #[allow(clippy::manual_is_multiple_of)]
    pub fn into_config(self, file: &Path) -> Result<DebertaV2Config> {
        let bad = |field: &str, value: String, reason: &str| Error::BadFile {
            file: file.to_path_buf(),
            reason: format!("invalid {field} = {value}: {reason}"),
        };
        if let Some(k) = self.conv_kernel_size.filter(|&k| k > 0) {
            return Err(bad(
                "conv_kernel_size",
                k.to_string(),
                "the DeBERTa-v2 ConvLayer is not supported (DeBERTa-v3 has none; remove the key for a v3 model)",
            ));
        }
        for (field, act) in [("hidden_act", &self.hidden_act), ("pooler_hidden_act", &self.pooler_hidden_act)] {
            if act != "gelu" {
                return Err(bad(field, format!("{act:?}"), "bayeslora's DeBERTa supports \"gelu\" only"));
            }
        }
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err(bad(
                "num_attention_heads",
                self.num_attention_heads.to_string(),
                &format!("must divide hidden_size = {}", self.hidden_size),
            ));
        }
        let head_dim = self.hidden_size / self.num_attention_heads;
        if let Some(d) = self.attention_head_size.filter(|&d| d != head_dim) {
            return Err(bad("attention_head_size", d.to_string(), &format!("only hidden_size / heads = {head_dim}")));
        }
        if let Some(e) = self.embedding_size.filter(|&e| e != self.hidden_size) {
            return Err(bad("embedding_size", e.to_string(), "embed_proj is not supported; must equal hidden_size"));
        }
        if let Some(p) = self.pooler_hidden_size.filter(|&p| p != self.hidden_size) {
            return Err(bad("pooler_hidden_size", p.to_string(), "must equal hidden_size"));
        }
        let kinds: Vec<String> = match &self.pos_att_type {
            None => vec![],
            Some(PosAttType::List(v)) => v.iter().map(|s| s.trim().to_lowercase()).collect(),
            Some(PosAttType::Joined(s)) => {
                s.split('|').map(|s| s.trim().to_lowercase()).filter(|s| !s.is_empty() && s != "none").collect()
            }
        };
        if let Some(k) = kinds.iter().find(|k| *k != "c2p" && *k != "p2c") {
            return Err(bad("pos_att_type", format!("{k:?}"), "only \"c2p\" and \"p2c\" are supported"));
        }
        let norms: Vec<String> =
            self.norm_rel_ebd.as_deref().unwrap_or("none").to_lowercase().split('|').map(|s| s.trim().into()).collect();
        if let Some(n) = norms.iter().find(|n| *n != "none" && *n != "layer_norm") {
            return Err(bad("norm_rel_ebd", format!("{n:?}"), "only \"layer_norm\" and \"none\" are supported"));
        }
        if self.relative_attention && !self.share_att_key && !kinds.is_empty() {
            return Err(bad(
                "share_att_key",
                "false".into(),
                "separate pos_key_proj/pos_query_proj are not supported (DeBERTa-v3 shares keys)",
            ));
        }
        for (field, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            ("attention_probs_dropout_prob", self.attention_probs_dropout_prob),
            ("pooler_dropout", self.pooler_dropout),
            ("cls_dropout", self.cls_dropout.unwrap_or(0.0)),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(bad(field, p.to_string(), "must be in [0, 1)"));
            }
        }
        let max_relative_positions = if self.max_relative_positions < 1 {
            self.max_position_embeddings
        } else {
            self.max_relative_positions as usize
        };
        let position_buckets = self.position_buckets.max(0) as usize;
        let att_span = if position_buckets > 0 { position_buckets } else { max_relative_positions };
        Ok(DebertaV2Config {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            head_dim,
            intermediate_size: self.intermediate_size,
            hidden_dropout_prob: self.hidden_dropout_prob,
            attention_probs_dropout_prob: self.attention_probs_dropout_prob,
            max_position_embeddings: self.max_position_embeddings,
            type_vocab_size: self.type_vocab_size,
            initializer_range: self.initializer_range,
            layer_norm_eps: self.layer_norm_eps,
            relative_attention: self.relative_attention,
            max_relative_positions,
            position_buckets,
            att_span,
            c2p: kinds.iter().any(|k| k == "c2p"),
            p2c: kinds.iter().any(|k| k == "p2c"),
            norm_rel_ebd: norms.iter().any(|n| n == "layer_norm"),
            position_biased_input: self.position_biased_input,
            pad_token_id: self.pad_token_id.unwrap_or(0),
            pooler_dropout: self.pooler_dropout,
            classifier_dropout: self.cls_dropout.unwrap_or(self.hidden_dropout_prob),
            num_labels: self.id2label.map(|m| m.len()),
        })
    }
}

impl DebertaV2Config {
    /// Parses and resolves a config.json already read as JSON.
    pub fn from_json(value: &serde_json::Value, file: &Path) -> Result<Self> {
        parse_config::<DebertaV2ConfigRaw>(value, file)?.into_config(file)
    }

    /// `1 + |pos_att_type|`: the scores are divided by `sqrt(D · scale_factor)`.
    pub fn scale_factor(&self) -> usize {
        1 + usize::from(self.c2p) + usize::from(self.p2c)
    }

    /// What [`super::bert::SequenceClassificationHead`] reads (hidden size, init range,
    /// classifier dropout): DeBERTa's `classifier` is the same `Linear(C, K)` head.
    pub fn head_config(&self) -> HeadConfig {
        HeadConfig {
            hidden_size: self.hidden_size,
            initializer_range: self.initializer_range,
            dropout: self.classifier_dropout,
        }
    }
}

/// HF's `make_log_bucket_position` for one relative distance: distances within `bucket_size / 2`
/// stay exact, farther ones are log-compressed up to `max_position`. Computed in f32 as torch
/// does, so the bucket edges agree.
pub fn log_bucket_position(relative: i64, bucket_size: usize, max_position: usize) -> i64 {
    let mid = (bucket_size / 2) as i64;
    let abs = if relative < mid && relative > -mid { mid - 1 } else { relative.abs() };
    if abs <= mid {
        return relative;
    }
    let ratio = ((max_position as f64 - 1.0) / mid as f64) as f32;
    let log_pos = ((abs as f32 / mid as f32).ln() / ratio.ln() * (mid - 1) as f32).ceil() + mid as f32;
    log_pos as i64 * relative.signum()
}

/// `δ[i, j] = i − j` (bucketed when `position_buckets > 0`) for `t` tokens, row-major `[T, T]`.
fn relative_positions(cfg: &DebertaV2Config, t: usize) -> Vec<i64> {
    let bucketed = cfg.position_buckets > 0 && cfg.max_relative_positions > 0;
    (0..t as i64)
        .flat_map(|i| (0..t as i64).map(move |j| i - j))
        .map(|d| if bucketed { log_bucket_position(d, cfg.position_buckets, cfg.max_relative_positions) } else { d })
        .collect()
}

/// `embeddings.*`: word (+ absolute position if `position_biased_input`) (+ token type if
/// `type_vocab_size > 0`), LayerNorm, zeroed at padding, dropout.
#[derive(Debug, Clone)]
struct Embeddings {
    word_embeddings: Tensor,
    position_embeddings: Option<Tensor>,
    token_type_embeddings: Option<Tensor>,
    layer_norm: LayerNorm,
    dropout: f32,
}

impl Embeddings {
    fn load(vb: &Loader, cfg: &DebertaV2Config) -> Result<Self> {
        let c = cfg.hidden_size;
        let position_embeddings = if cfg.position_biased_input {
            Some(vb.get("embeddings.position_embeddings.weight", &[cfg.max_position_embeddings, c])?)
        } else {
            None
        };
        let token_type_embeddings = if cfg.type_vocab_size > 0 {
            Some(vb.get("embeddings.token_type_embeddings.weight", &[cfg.type_vocab_size, c])?)
        } else {
            None
        };
        Ok(Self {
            word_embeddings: vb.get("embeddings.word_embeddings.weight", &[cfg.vocab_size, c])?,
            position_embeddings,
            token_type_embeddings,
            layer_norm: vb.layer_norm("embeddings.LayerNorm", c, cfg.layer_norm_eps)?,
            dropout: cfg.hidden_dropout_prob,
        })
    }

    /// `input_ids`, `token_type_ids`: `[B, T]` u32, `mask`: `[B, T]` → `[B, T, C]`.
    fn forward(&self, input_ids: &Tensor, token_type_ids: &Tensor, mask: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let c = self.word_embeddings.dim(1)?;
        let lookup = |table: &Tensor, ids: &Tensor| -> Result<Tensor> {
            Ok(table.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, c))?)
        };
        let mut x = lookup(&self.word_embeddings, input_ids)?;
        if let Some(pos) = &self.position_embeddings {
            x = x.broadcast_add(&pos.narrow(0, 0, t)?.unsqueeze(0)?)?;
        }
        if let Some(types) = &self.token_type_embeddings {
            x = x.add(&lookup(types, token_type_ids)?)?;
        }
        let x = self.layer_norm.forward(&x)?;
        let x = x.broadcast_mul(&mask.to_dtype(x.dtype())?.unsqueeze(2)?)?;
        maybe_dropout(&x, self.dropout, ctx, salt(DROPOUT_SALT, EMBEDDINGS, 0))
    }
}

/// What every layer's attention shares: the (normalised) relative embeddings, the gather
/// indices and the 2-D padding bias.
struct AttentionInputs {
    /// `[1, 2S, C]`, `None` without relative attention.
    rel_embeddings: Option<Tensor>,
    /// `[B, H, T, T]` u32: `clamp(δ[i, j] + S)` (c2p) and `clamp(−δ[i, j] + S)` (p2c).
    c2p_index: Option<Tensor>,
    p2c_index: Option<Tensor>,
    /// `[B, 1, T, T]` f32: 0 where both query and key are real tokens, −1e9 elsewhere.
    bias: Tensor,
}

/// `encoder.layer.{i}.attention.self`: disentangled self-attention.
#[derive(Debug, Clone)]
struct DisentangledSelfAttention {
    query_proj: Linear,
    key_proj: Linear,
    value_proj: Linear,
    num_heads: usize,
    head_dim: usize,
    scale_factor: usize,
    c2p: bool,
    p2c: bool,
    relative_attention: bool,
    dropout: f32,
    pos_dropout: f32,
    index: u64,
}

impl DisentangledSelfAttention {
    fn load(vb: &Loader, cfg: &DebertaV2Config, i: usize) -> Result<Self> {
        let p = format!("encoder.layer.{i}.attention.self");
        let c = cfg.hidden_size;
        let l = i as u64;
        Ok(Self {
            query_proj: vb.linear(&format!("{p}.query_proj"), c, c, salt(LINEAR_SALT, l, 1))?,
            key_proj: vb.linear(&format!("{p}.key_proj"), c, c, salt(LINEAR_SALT, l, 2))?,
            value_proj: vb.linear(&format!("{p}.value_proj"), c, c, salt(LINEAR_SALT, l, 3))?,
            num_heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim,
            scale_factor: cfg.scale_factor(),
            c2p: cfg.c2p,
            p2c: cfg.p2c,
            relative_attention: cfg.relative_attention,
            dropout: cfg.attention_probs_dropout_prob,
            pos_dropout: cfg.hidden_dropout_prob,
            index: l,
        })
    }

    /// `[B', N, C]` → `[B', H, N, D]`.
    fn heads(&self, y: Tensor) -> Result<Tensor> {
        let (b, n, _) = y.dims3()?;
        Ok(y.reshape((b, n, self.num_heads, self.head_dim))?.transpose(1, 2)?.contiguous()?)
    }

    /// `x: [B, T, C]` → context `[B, T, C]` (before the output projection).
    fn forward(&self, x: &Tensor, inputs: &AttentionInputs, ctx: &Ctx) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let q = self.heads(self.query_proj.forward(x, ctx)?)?;
        let k = self.heads(self.key_proj.forward(x, ctx)?)?;
        let v = self.heads(self.value_proj.forward(x, ctx)?)?;
        // HF divides by sqrt(D · scale_factor) computed in f32.
        let inv_scale = 1.0 / ((self.head_dim as f32) * self.scale_factor as f32).sqrt() as f64;
        let mut scores = q.matmul(&k.t()?.contiguous()?)?;
        if let (true, Some(rel)) = (self.relative_attention, inputs.rel_embeddings.as_ref()) {
            let rel = maybe_dropout(rel, self.pos_dropout, ctx, salt(DROPOUT_SALT, self.index, 4))?;
            if let (true, Some(index)) = (self.c2p, inputs.c2p_index.as_ref()) {
                // Content query i against relative key δ(i, j): [B, H, T, 2S] → gather → [B, H, T, T].
                let pos_key = self.heads(self.key_proj.forward(&rel, ctx)?)?; // [1, H, 2S, D]
                let c2p = q.broadcast_matmul(&pos_key.t()?.contiguous()?)?;
                scores = scores.add(&c2p.contiguous()?.gather(index, 3)?)?;
            }
            if let (true, Some(index)) = (self.p2c, inputs.p2c_index.as_ref()) {
                // Content key j against relative query: gathered per key row, then transposed.
                let pos_query = self.heads(self.query_proj.forward(&rel, ctx)?)?;
                let p2c = k.broadcast_matmul(&pos_query.t()?.contiguous()?)?;
                scores = scores.add(&p2c.contiguous()?.gather(index, 3)?.transpose(2, 3)?)?;
            }
        }
        let dtype = q.dtype();
        let stats = if dtype == DType::F64 { DType::F64 } else { DType::F32 };
        let scores = scores.affine(inv_scale, 0.0)?.to_dtype(stats)?.broadcast_add(&inputs.bias.to_dtype(stats)?)?;
        let probs = ops::softmax_last_dim(&scores)?;
        let probs = maybe_dropout(&probs, self.dropout, ctx, salt(DROPOUT_SALT, self.index, 1))?;
        let out = probs.to_dtype(dtype)?.matmul(&v)?;
        Ok(out.transpose(1, 2)?.reshape((b, t, c))?)
    }
}

/// `encoder.layer.{i}`: disentangled attention, then the shared [`LayerBody`]
/// (`attention.output`, `intermediate`, `output`).
#[derive(Debug, Clone)]
struct Layer {
    attention_self: DisentangledSelfAttention,
    body: LayerBody,
}

impl Layer {
    fn load(vb: &Loader, cfg: &DebertaV2Config, i: usize) -> Result<Self> {
        let (c, f, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        Ok(Self {
            attention_self: DisentangledSelfAttention::load(vb, cfg, i)?,
            body: LayerBody::load(vb, i, c, f, eps, cfg.hidden_dropout_prob)?,
        })
    }

    fn forward(&self, x: &Tensor, inputs: &AttentionInputs, ctx: &Ctx) -> Result<Tensor> {
        let a = self.attention_self.forward(x, inputs, ctx)?;
        self.body.forward(&a, x, ctx)
    }
}

/// The DeBERTa-v2/v3 encoder (`DebertaV2Model`) and the `ContextPooler`.
#[derive(Debug, Clone)]
pub struct DebertaV2 {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    /// `encoder.rel_embeddings.weight`, `[2S, C]` (relative attention only).
    rel_embeddings: Option<Tensor>,
    /// `encoder.LayerNorm` over the relative embeddings (`norm_rel_ebd = "layer_norm"`).
    rel_layer_norm: Option<LayerNorm>,
    /// `pooler.dense` of `DebertaV2ForSequenceClassification`. A bare encoder (deberta-v3-base)
    /// has none; it is then drawn as HF's `_init_weights` would (normal(0, initializer_range),
    /// zero bias, fixed seed) and stays frozen, as with peft's default SEQ_CLS setup; target
    /// `pooler.dense` to train it.
    pooler: Linear,
    config: DebertaV2Config,
}

impl DebertaV2 {
    /// Builds the encoder from `weights` (keys with or without the `deberta.` prefix; the pooler
    /// is `pooler.dense` at the root, as `DebertaV2ForSequenceClassification` saves it).
    pub fn load(weights: &Weights, config: &DebertaV2Config, dtype: DType, device: &Device) -> Result<Self> {
        let prefix = weights.detect_prefix("embeddings.word_embeddings.weight", &["", "deberta."])?;
        let vb = Loader { weights, prefix, dtype, device };
        let c = config.hidden_size;
        let embeddings = Embeddings::load(&vb, config)?;
        let layers = (0..config.num_hidden_layers).map(|i| Layer::load(&vb, config, i)).collect::<Result<Vec<_>>>()?;
        let rel_embeddings = if config.relative_attention {
            Some(vb.get("encoder.rel_embeddings.weight", &[2 * config.att_span, c])?)
        } else {
            None
        };
        let rel_layer_norm = if config.relative_attention && config.norm_rel_ebd {
            Some(vb.layer_norm("encoder.LayerNorm", c, config.layer_norm_eps)?)
        } else {
            None
        };
        let pooler_salt = salt(LINEAR_SALT, POOLER, 0);
        let pooler = if weights.contains("pooler.dense.weight") {
            let root = Loader { prefix: "", ..vb };
            root.linear("pooler.dense", c, c, pooler_salt)?
        } else {
            let normal = rand_distr::Normal::new(0.0f32, config.initializer_range as f32)
                .map_err(|e| Error::config("initializer_range", config.initializer_range, e.to_string()))?;
            let mut rng = rand::rngs::StdRng::seed_from_u64(0xDEB3_9001);
            let w: Vec<f32> = (0..c * c).map(|_| normal.sample(&mut rng)).collect();
            let weight = Tensor::from_vec(w, (c, c), device)?.to_dtype(dtype)?;
            let bias = Tensor::zeros(c, dtype, device)?;
            Linear { salt: pooler_salt, ..Linear::new(weight, Some(bias)) }
        };
        Ok(Self { embeddings, layers, rel_embeddings, rel_layer_norm, pooler, config: config.clone() })
    }

    pub fn config(&self) -> &DebertaV2Config {
        &self.config
    }

    /// The dtype of the frozen weights (activations run in it).
    pub fn dtype(&self) -> DType {
        self.embeddings.word_embeddings.dtype()
    }

    pub fn device(&self) -> &Device {
        self.embeddings.word_embeddings.device()
    }

    /// Last hidden state of every position, `[B, T, C]`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: &Tensor,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        let mut hidden = self.forward_hidden_states(input_ids, token_type_ids, attention_mask, ctx)?;
        // invariant: forward_hidden_states returns the embeddings plus one state per layer.
        Ok(hidden.pop().expect("at least the embedding output"))
    }

    /// All hidden states as HF's `output_hidden_states`: the embedding output, then the output
    /// of each layer. `input_ids`, `token_type_ids`: `[B, T]` u32 (`None`: all type 0);
    /// `attention_mask`: `[B, T]`, 1 for real tokens and 0 for padding.
    pub fn forward_hidden_states(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: &Tensor,
        ctx: &Ctx,
    ) -> Result<Vec<Tensor>> {
        let device = self.device();
        let max_len = Some(self.config.max_position_embeddings).filter(|_| self.config.position_biased_input);
        let (input_ids, token_type_ids, b, t) =
            prepare_inputs(input_ids, token_type_ids, attention_mask, max_len, device)?;
        let mask = attention_mask.to_dtype(DType::F32)?.to_device(device)?;
        let inputs = self.attention_inputs(&mask, b, t)?;
        let x = self.embeddings.forward(&input_ids, &token_type_ids, &mask, ctx)?;
        hidden_states(x, &self.layers, |layer, x| layer.forward(x, &inputs, ctx))
    }

    fn attention_inputs(&self, mask: &Tensor, b: usize, t: usize) -> Result<AttentionInputs> {
        let device = self.device();
        // 2-D mask as HF's get_attention_mask: query and key must both be real tokens.
        let pair = mask.unsqueeze(2)?.broadcast_mul(&mask.unsqueeze(1)?)?; // [B, T, T]
        let bias = pair.affine(1e9, -1e9)?.unsqueeze(1)?;
        let rel_embeddings = match &self.rel_embeddings {
            Some(rel) => {
                let rel = match &self.rel_layer_norm {
                    Some(ln) => ln.forward(rel)?,
                    None => rel.clone(),
                };
                Some(rel.unsqueeze(0)?)
            }
            None => None,
        };
        let (mut c2p_index, mut p2c_index) = (None, None);
        if rel_embeddings.is_some() {
            let span = self.config.att_span as i64;
            let delta = relative_positions(&self.config, t);
            let h = self.config.num_attention_heads;
            let index = |sign: i64| -> Result<Tensor> {
                let v: Vec<u32> = delta.iter().map(|&d| (sign * d + span).clamp(0, 2 * span - 1) as u32).collect();
                Ok(Tensor::from_vec(v, (1, 1, t, t), device)?.broadcast_as((b, h, t, t))?.contiguous()?)
            };
            if self.config.c2p {
                c2p_index = Some(index(1)?);
            }
            if self.config.p2c {
                p2c_index = Some(index(-1)?);
            }
        }
        Ok(AttentionInputs { rel_embeddings, c2p_index, p2c_index, bias })
    }

    /// HF's `ContextPooler`: `gelu(dense(dropout(hidden[:, 0])))`, `[B, T, C]` → `[B, C]`.
    pub fn pooled(&self, hidden: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let cls = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        let cls = maybe_dropout(&cls, self.config.pooler_dropout, ctx, salt(DROPOUT_SALT, POOLER, 0))?;
        Ok(ops::gelu(&self.pooler.forward(&cls, ctx)?)?)
    }
}

impl HasLinears for DebertaV2 {
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::with_capacity(self.layers.len() * 6 + 1);
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let p = format!("encoder.layer.{i}");
            let Layer { attention_self, body } = layer;
            out.push((format!("{p}.attention.self.query_proj"), &mut attention_self.query_proj));
            out.push((format!("{p}.attention.self.key_proj"), &mut attention_self.key_proj));
            out.push((format!("{p}.attention.self.value_proj"), &mut attention_self.value_proj));
            body.push_linears(&p, &mut out);
        }
        out.push(("pooler.dense".to_string(), &mut self.pooler));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_exact_near_and_log_far() {
        // bucket_size 8, max 64: |δ| ≤ 4 exact, then ceil(ln(|δ|/4)/ln(63/4)·3) + 4.
        for d in -4..=4 {
            assert_eq!(log_bucket_position(d, 8, 64), d);
        }
        assert_eq!(log_bucket_position(5, 8, 64), 5);
        assert_eq!(log_bucket_position(-20, 8, 64), -6);
        assert_eq!(log_bucket_position(1000, 8, 64), 11);
    }

    #[test]
    fn config_resolves_v3_defaults_and_scale() {
        let json = serde_json::json!({
            "vocab_size": 11, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 12, "relative_attention": true, "pos_att_type": "p2c|c2p",
            "position_buckets": 256, "max_relative_positions": -1, "share_att_key": true,
            "norm_rel_ebd": "layer_norm", "position_biased_input": false
        });
        let cfg = DebertaV2Config::from_json(&json, Path::new("config.json")).expect("valid config");
        assert_eq!((cfg.max_relative_positions, cfg.att_span, cfg.scale_factor()), (512, 256, 3));
        assert!(cfg.c2p && cfg.p2c && cfg.norm_rel_ebd && !cfg.position_biased_input);
    }
}
