//! BERT encoder (Devlin et al. 2018, arXiv 1810.04805) as HF transformers' `BertModel`, plus the
//! `BertForSequenceClassification` head.
//!
//! Shape legend: B batch, T tokens, H heads, D head dim, C hidden size, K labels.
//!
//! Layout follows candle's `models/llama.rs`: [`BertConfigRaw`] mirrors config.json,
//! [`BertConfig`] is the resolved config, and private blocks (`Embeddings`, `SelfAttention`,
//! `Layer`, ...) each have `load` and `forward`. Field and module names are the HF keys
//! (`encoder.layer.0.attention.self.query`), every linear is a [`Linear`](super::linear::Linear) (an adapter
//! slot), and every op with a gradient comes from [`crate::ops`] (candle-nn's fused layer norm
//! and softmax have no backward). [`Bert::forward`] returns every position.
//!
//! Checkpoints name the same tensors with or without a `bert.` prefix (all-MiniLM-L6-v2 is a
//! bare `BertModel`; `BertForSequenceClassification` adds `bert.` and `classifier.*`); both load.
//! [`HasLinears`] names are always without the prefix.
//!
//! ```no_run
//! use bayeslora::models::linear::Ctx;
//! use bayeslora::models::{self, Backbone, LoadOptions};
//! let m = models::load(std::path::Path::new("minilm"), &LoadOptions::default())?;
//! let Backbone::Bert(bert) = &m.backbone else { unreachable!() };
//! # let (ids, mask): (candle_core::Tensor, candle_core::Tensor) = todo!();
//! let hidden = bert.forward(&ids, None, &mask, &Ctx::eval())?; // [B, T, C]
//! let pooled = bert.pooled(&hidden, &Ctx::eval())?;          // [B, C]
//! # Ok::<(), bayeslora::Error>(())
//! ```
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_distr::Distribution;

use super::config::parse_config;
use super::encoder::{
    hidden_states, maybe_dropout, prepare_inputs, salt, LayerBody, LayerNorm, Loader, DROPOUT_SALT, EMBEDDINGS,
    LINEAR_SALT, POOLER,
};
use super::linear::{Ctx, HasLinears, Linear};
use super::load::Weights;
use crate::ops::{self, AttentionMask};
use crate::{Error, Result};

/// config.json of a BERT checkpoint, as written by HF transformers (unknown keys are ignored:
/// config.json carries many that do not concern the encoder).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct BertConfigRaw {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f32,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f32,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
    #[serde(default)]
    pub classifier_dropout: Option<f32>,
    /// `BertForSequenceClassification` checkpoints record their labels here.
    #[serde(default)]
    pub id2label: Option<HashMap<String, String>>,
}

// Defaults: transformers `BertConfig.__init__`.
fn default_hidden_act() -> String {
    "gelu".into()
}
fn default_dropout() -> f32 {
    0.1
}
fn default_max_position_embeddings() -> usize {
    512
}
fn default_type_vocab_size() -> usize {
    2
}
fn default_initializer_range() -> f64 {
    0.02
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}

/// The resolved, validated BERT config.
#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// `hidden_size / num_attention_heads`.
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub hidden_dropout_prob: f32,
    pub attention_probs_dropout_prob: f32,
    /// Dropout before the classifier: `classifier_dropout`, else `hidden_dropout_prob` (as HF).
    pub classifier_dropout: f32,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub initializer_range: f64,
    pub layer_norm_eps: f64,
    pub pad_token_id: u32,
    /// Label count recorded in the checkpoint (`id2label`), if any.
    pub num_labels: Option<usize>,
}

impl BertConfigRaw {
    /// Validates and resolves; `file` (config.json) is named in errors.
    // `%` rather than `is_multiple_of` (stable in 1.87): the workspace MSRV is 1.85.
    #[allow(clippy::manual_is_multiple_of)]
    pub fn into_config(self, file: &Path) -> Result<BertConfig> {
        let bad = |field: &str, value: String, reason: &str| Error::BadFile {
            file: file.to_path_buf(),
            reason: format!("invalid {field} = {value}: {reason}"),
        };
        if self.hidden_act != "gelu" {
            return Err(bad("hidden_act", format!("{:?}", self.hidden_act), "bayeslora's BERT supports \"gelu\" only"));
        }
        if let Some(p) = self.position_embedding_type.as_deref() {
            if p != "absolute" {
                return Err(bad("position_embedding_type", format!("{p:?}"), "only \"absolute\" is supported"));
            }
        }
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err(bad(
                "num_attention_heads",
                self.num_attention_heads.to_string(),
                &format!("must divide hidden_size = {}", self.hidden_size),
            ));
        }
        if self.num_hidden_layers == 0 {
            return Err(bad("num_hidden_layers", "0".into(), "a model needs at least one layer"));
        }
        for (field, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            ("attention_probs_dropout_prob", self.attention_probs_dropout_prob),
            ("classifier_dropout", self.classifier_dropout.unwrap_or(0.0)),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(bad(field, p.to_string(), "must be in [0, 1)"));
            }
        }
        Ok(BertConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            head_dim: self.hidden_size / self.num_attention_heads,
            intermediate_size: self.intermediate_size,
            hidden_dropout_prob: self.hidden_dropout_prob,
            attention_probs_dropout_prob: self.attention_probs_dropout_prob,
            classifier_dropout: self.classifier_dropout.unwrap_or(self.hidden_dropout_prob),
            max_position_embeddings: self.max_position_embeddings,
            type_vocab_size: self.type_vocab_size,
            initializer_range: self.initializer_range,
            layer_norm_eps: self.layer_norm_eps,
            pad_token_id: self.pad_token_id.unwrap_or(0),
            num_labels: self.id2label.map(|m| m.len()),
        })
    }
}

impl BertConfig {
    /// What the classification head reads.
    pub fn head_config(&self) -> HeadConfig {
        HeadConfig {
            hidden_size: self.hidden_size,
            initializer_range: self.initializer_range,
            dropout: self.classifier_dropout,
        }
    }

    /// Parses and resolves a config.json already read as JSON.
    pub fn from_json(value: &serde_json::Value, file: &Path) -> Result<Self> {
        parse_config::<BertConfigRaw>(value, file)?.into_config(file)
    }
}

/// `embeddings.*`: word + absolute position + token type, then LayerNorm and dropout.
#[derive(Debug, Clone)]
struct Embeddings {
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    layer_norm: LayerNorm,
    dropout: f32,
}

impl Embeddings {
    fn load(vb: &Loader, cfg: &BertConfig) -> Result<Self> {
        let c = cfg.hidden_size;
        Ok(Self {
            word_embeddings: vb.get("embeddings.word_embeddings.weight", &[cfg.vocab_size, c])?,
            position_embeddings: vb.get("embeddings.position_embeddings.weight", &[cfg.max_position_embeddings, c])?,
            token_type_embeddings: vb.get("embeddings.token_type_embeddings.weight", &[cfg.type_vocab_size, c])?,
            layer_norm: vb.layer_norm("embeddings.LayerNorm", c, cfg.layer_norm_eps)?,
            dropout: cfg.hidden_dropout_prob,
        })
    }

    /// `input_ids`, `token_type_ids`: `[B, T]` u32 → `[B, T, C]`.
    fn forward(&self, input_ids: &Tensor, token_type_ids: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let c = self.word_embeddings.dim(1)?;
        let lookup = |table: &Tensor, ids: &Tensor| -> Result<Tensor> {
            Ok(table.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, c))?)
        };
        let words = lookup(&self.word_embeddings, input_ids)?;
        let types = lookup(&self.token_type_embeddings, token_type_ids)?;
        let positions = self.position_embeddings.narrow(0, 0, t)?.unsqueeze(0)?;
        let x = words.add(&types)?.broadcast_add(&positions)?;
        let x = self.layer_norm.forward(&x)?;
        maybe_dropout(&x, self.dropout, ctx, salt(DROPOUT_SALT, EMBEDDINGS, 0))
    }
}

/// `encoder.layer.{i}.attention.self`: multi-head self-attention projections.
#[derive(Debug, Clone)]
struct SelfAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    num_heads: usize,
    head_dim: usize,
    dropout: f32,
    dropout_salt: u64,
}

impl SelfAttention {
    fn load(vb: &Loader, cfg: &BertConfig, i: usize) -> Result<Self> {
        let p = format!("encoder.layer.{i}.attention.self");
        let c = cfg.hidden_size;
        let l = i as u64;
        Ok(Self {
            query: vb.linear(&format!("{p}.query"), c, c, salt(LINEAR_SALT, l, 1))?,
            key: vb.linear(&format!("{p}.key"), c, c, salt(LINEAR_SALT, l, 2))?,
            value: vb.linear(&format!("{p}.value"), c, c, salt(LINEAR_SALT, l, 3))?,
            num_heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim,
            dropout: cfg.attention_probs_dropout_prob,
            dropout_salt: salt(DROPOUT_SALT, l, 1),
        })
    }

    /// `x: [B, T, C]` → context `[B, T, C]` (before the output projection).
    fn forward(&self, x: &Tensor, mask: &AttentionMask, ctx: &Ctx) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let (q, k, v) = (self.query.forward(x, ctx)?, self.key.forward(x, ctx)?, self.value.forward(x, ctx)?);
        if ops::cpu_attention_applies(&q, &k, &v) && !ops::plain_attention_forced() {
            // One fused op on the projections' [B, T, C] layout: no head split/merge copies,
            // the probability dropout inside (the same mask as `ops::dropout` draws).
            let dropout = (ctx.train && self.dropout > 0.0).then(|| (self.dropout, ctx.seed_for(self.dropout_salt)));
            let (h, layout) = (self.num_heads, ops::HeadLayout::Tokens);
            return Ok(ops::cpu_attention(&q, &k, &v, layout, h, h, mask.padding(), mask.causal(), dropout)?);
        }
        let heads = |y: Tensor| -> Result<Tensor> {
            Ok(y.reshape((b, t, self.num_heads, self.head_dim))?.transpose(1, 2)?.contiguous()?)
        };
        let (q, k, v) = (heads(q)?, heads(k)?, heads(v)?);
        let out = if ctx.train && self.dropout > 0.0 {
            // Attention-probability dropout needs the probabilities, which `ops::attention`
            // keeps inside; this is the same math with the dropout between softmax and ·v.
            let dtype = q.dtype();
            let scale = 1.0 / (self.head_dim as f64).sqrt();
            let scores = q.matmul(&k.t()?.contiguous()?)?.affine(scale, 0.0)?.to_dtype(DType::F32)?;
            let probs = ops::softmax_last_dim(&scores.broadcast_add(mask.bias()?)?)?;
            let probs = ops::dropout(&probs, self.dropout, ctx.seed_for(self.dropout_salt))?;
            probs.to_dtype(dtype)?.matmul(&v)?
        } else {
            ops::attention(&q, &k, &v, mask)?
        };
        Ok(out.transpose(1, 2)?.reshape((b, t, c))?)
    }
}

/// `encoder.layer.{i}`: attention, then the shared [`LayerBody`] (`attention.output`,
/// `intermediate`, `output`).
#[derive(Debug, Clone)]
struct Layer {
    attention_self: SelfAttention,
    body: LayerBody,
}

impl Layer {
    fn load(vb: &Loader, cfg: &BertConfig, i: usize) -> Result<Self> {
        let (c, f, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        Ok(Self {
            attention_self: SelfAttention::load(vb, cfg, i)?,
            body: LayerBody::load(vb, i, c, f, eps, cfg.hidden_dropout_prob)?,
        })
    }

    fn forward(&self, x: &Tensor, mask: &AttentionMask, ctx: &Ctx) -> Result<Tensor> {
        let a = self.attention_self.forward(x, mask, ctx)?;
        self.body.forward(&a, x, ctx)
    }
}

/// The BERT encoder (`BertModel`): embeddings, `num_hidden_layers` layers and the pooler.
#[derive(Debug, Clone)]
pub struct Bert {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    /// `pooler.dense`; `None` when the checkpoint has no pooler (`add_pooling_layer=False`).
    pooler: Option<Linear>,
    config: BertConfig,
    /// The weights file, for messages.
    file: PathBuf,
}

impl Bert {
    /// Builds the encoder from `weights` (keys with or without the `bert.` prefix), in `dtype`
    /// on `device`. Fails with [`Error::TensorShape`] / [`Error::MissingTensor`] naming the
    /// weights file when the checkpoint does not match `config`.
    pub fn load(weights: &Weights, config: &BertConfig, dtype: DType, device: &Device) -> Result<Self> {
        let prefix = weights.detect_prefix("embeddings.word_embeddings.weight", &["", "bert."])?;
        let vb = Loader { weights, prefix, dtype, device };
        let embeddings = Embeddings::load(&vb, config)?;
        let layers = (0..config.num_hidden_layers).map(|i| Layer::load(&vb, config, i)).collect::<Result<Vec<_>>>()?;
        let pooler = if weights.contains(&format!("{prefix}pooler.dense.weight")) {
            let c = config.hidden_size;
            Some(vb.linear("pooler.dense", c, c, salt(LINEAR_SALT, POOLER, 0))?)
        } else {
            None
        };
        let file = weights.file_of(&format!("{prefix}embeddings.word_embeddings.weight")).to_path_buf();
        Ok(Self { embeddings, layers, pooler, config: config.clone(), file })
    }

    pub fn config(&self) -> &BertConfig {
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
    /// of each layer (`num_hidden_layers + 1` tensors of `[B, T, C]`).
    /// `input_ids`, `token_type_ids`: `[B, T]` u32 (`None`: all type 0); `attention_mask`:
    /// `[B, T]`, 1 for real tokens and 0 for padding.
    pub fn forward_hidden_states(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: &Tensor,
        ctx: &Ctx,
    ) -> Result<Vec<Tensor>> {
        let device = self.device();
        let max_len = Some(self.config.max_position_embeddings);
        let (input_ids, token_type_ids, b, t) =
            prepare_inputs(input_ids, token_type_ids, attention_mask, max_len, device)?;
        let mask = AttentionMask::new(Some(&attention_mask.to_device(device)?), false, b, t, device)?;
        let x = self.embeddings.forward(&input_ids, &token_type_ids, ctx)?;
        hidden_states(x, &self.layers, |layer, x| layer.forward(x, &mask, ctx))
    }

    /// The pooler: `tanh(dense(hidden[:, 0]))`, `[B, T, C]` → `[B, C]`.
    pub fn pooled(&self, hidden: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let pooler = self
            .pooler
            .as_ref()
            .ok_or_else(|| Error::MissingTensor { file: self.file.clone(), name: "pooler.dense.weight".into() })?;
        let cls = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        Ok(pooler.forward(&cls, ctx)?.tanh()?)
    }
}

impl HasLinears for Bert {
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::with_capacity(self.layers.len() * 6 + 1);
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let p = format!("encoder.layer.{i}");
            let Layer { attention_self, body } = layer;
            out.push((format!("{p}.attention.self.query"), &mut attention_self.query));
            out.push((format!("{p}.attention.self.key"), &mut attention_self.key));
            out.push((format!("{p}.attention.self.value"), &mut attention_self.value));
            body.push_linears(&p, &mut out);
        }
        if let Some(pooler) = self.pooler.as_mut() {
            out.push(("pooler.dense".to_string(), pooler));
        }
        out
    }
}

/// What a [`SequenceClassificationHead`] needs from its encoder's config (BERT's and DeBERTa's
/// `head_config`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeadConfig {
    pub hidden_size: usize,
    /// The std of a fresh head's weight (HF `_init_weights`).
    pub initializer_range: f64,
    /// The dropout before `classifier` (training only).
    pub dropout: f32,
}

/// HF `BertForSequenceClassification`'s head: `pooled → dropout → classifier` with
/// `classifier: Linear(C, K)`; K = 1 is regression (STS-B). The weights are trainable f32
/// [`Var`]s (the backbone stays frozen), initialized as HF's `_init_weights`:
/// normal(0, `initializer_range`) weight, zero bias.
#[derive(Debug, Clone)]
pub struct SequenceClassificationHead {
    /// `classifier.weight`, `[K, C]`, f32.
    weight: Var,
    /// `classifier.bias`, `[K]`, f32.
    bias: Var,
    dropout: f32,
    /// True when the checkpoint carried the head (`classifier.*`), false for a fresh one.
    loaded: bool,
}

impl SequenceClassificationHead {
    /// A freshly initialized head with `num_labels` outputs, drawn from `seed`.
    pub fn new(config: &HeadConfig, num_labels: usize, seed: u64, device: &Device) -> Result<Self> {
        if num_labels == 0 {
            return Err(Error::config("num_labels", 0, "must be at least 1 (1 = regression)"));
        }
        let normal = rand_distr::Normal::new(0.0f32, config.initializer_range as f32)
            .map_err(|e| Error::config("initializer_range", config.initializer_range, e.to_string()))?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n = num_labels * config.hidden_size;
        let w: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
        let weight = Var::from_tensor(&Tensor::from_vec(w, (num_labels, config.hidden_size), device)?)?;
        let bias = Var::zeros(num_labels, DType::F32, device)?;
        Ok(Self { weight, bias, dropout: config.dropout, loaded: false })
    }

    /// The checkpoint's `classifier.weight`/`classifier.bias` when present (their shape must
    /// match `num_labels`), else a fresh head as [`Self::new`].
    pub fn load_or_init(
        weights: &Weights,
        config: &HeadConfig,
        num_labels: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let mut head = Self::new(config, num_labels, seed, device)?;
        if weights.contains("classifier.weight") {
            head.loaded = true;
            let w = weights.get("classifier.weight", &[num_labels, config.hidden_size], DType::F32, device)?;
            let b = weights.get("classifier.bias", &[num_labels], DType::F32, device)?;
            head.weight.set(&w)?;
            head.bias.set(&b)?;
        }
        Ok(head)
    }

    pub fn num_labels(&self) -> usize {
        self.bias.elem_count()
    }

    /// Starts a fresh regression head (one output) at `mean`, the training targets' mean: the
    /// constant that minimises the squared error. A zero bias left the head 2.7 away from
    /// STS-B's scores (0–5), and closing that gap through the weights pushed the frozen tanh
    /// pooler towards saturation on some seeds. A head from the checkpoint, or with several
    /// outputs, is left as it is; returns whether the bias was set.
    pub fn start_regression_at(&self, mean: f32) -> Result<bool> {
        if self.loaded || self.num_labels() != 1 || !mean.is_finite() {
            return Ok(false);
        }
        self.bias.set(&Tensor::new(&[mean], self.bias.device())?)?;
        Ok(true)
    }

    /// The trainable variables: weight, bias.
    pub fn vars(&self) -> Vec<Var> {
        vec![self.weight.clone(), self.bias.clone()]
    }

    /// The variables with their HF names (`classifier.weight`, `classifier.bias`).
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        vec![("classifier.weight".into(), self.weight.clone()), ("classifier.bias".into(), self.bias.clone())]
    }

    /// `pooled: [B, C]` (any float dtype) → logits `[B, K]`, f32.
    pub fn forward(&self, pooled: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let x = pooled.to_dtype(DType::F32)?;
        let x = maybe_dropout(&x, self.dropout, ctx, salt(DROPOUT_SALT, POOLER, 1))?;
        Ok(x.matmul(&ctx.param(&self.weight).t()?)?.broadcast_add(&ctx.param(&self.bias))?)
    }
}

/// Index of the largest absolute difference, for test messages.
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<(f32, usize)> {
    let a = a.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let b = b.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok(a.iter()
        .zip(&b)
        .enumerate()
        .map(|(i, (x, y))| ((x - y).abs(), i))
        .fold((0.0, 0), |m, d| if d.0 > m.0 { d } else { m }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_config() -> BertConfig {
        let json = serde_json::json!({
            "vocab_size": 11, "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 12, "max_position_embeddings": 16, "hidden_dropout_prob": 0.5,
            "attention_probs_dropout_prob": 0.5
        });
        BertConfig::from_json(&json, Path::new("config.json")).expect("valid config")
    }

    fn random_weights(cfg: &BertConfig) -> Result<Weights> {
        let dev = Device::Cpu;
        let mut m = HashMap::new();
        let mut put = |name: String, shape: &[usize]| -> Result<()> {
            m.insert(name, Tensor::randn(0f32, 0.3, shape, &dev)?);
            Ok(())
        };
        let (c, f) = (cfg.hidden_size, cfg.intermediate_size);
        put("embeddings.word_embeddings.weight".into(), &[cfg.vocab_size, c])?;
        put("embeddings.position_embeddings.weight".into(), &[cfg.max_position_embeddings, c])?;
        put("embeddings.token_type_embeddings.weight".into(), &[cfg.type_vocab_size, c])?;
        put("embeddings.LayerNorm.weight".into(), &[c])?;
        put("embeddings.LayerNorm.bias".into(), &[c])?;
        for i in 0..cfg.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            for (n, o, inp) in [
                ("attention.self.query", c, c),
                ("attention.self.key", c, c),
                ("attention.self.value", c, c),
                ("attention.output.dense", c, c),
                ("intermediate.dense", f, c),
                ("output.dense", c, f),
            ] {
                put(format!("{p}.{n}.weight"), &[o, inp])?;
                put(format!("{p}.{n}.bias"), &[o])?;
            }
            for n in ["attention.output.LayerNorm", "output.LayerNorm"] {
                put(format!("{p}.{n}.weight"), &[c])?;
                put(format!("{p}.{n}.bias"), &[c])?;
            }
        }
        Ok(Weights::from_tensors("random.safetensors", m))
    }

    #[test]
    fn dropout_only_in_training_and_reproducible() -> Result<()> {
        let cfg = tiny_config();
        let bert = Bert::load(&random_weights(&cfg)?, &cfg, DType::F32, &Device::Cpu)?;
        let ids = Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu)?;
        let mask = Tensor::ones((1, 4), DType::F32, &Device::Cpu)?;
        let e1 = bert.forward(&ids, None, &mask, &Ctx::eval())?;
        let e2 = bert.forward(&ids, None, &mask, &Ctx { seed: 9, ..Ctx::eval() })?;
        assert_eq!(max_abs_diff(&e1, &e2)?.0, 0.0);
        let t1 = bert.forward(&ids, None, &mask, &Ctx::train(1))?;
        let t1b = bert.forward(&ids, None, &mask, &Ctx::train(1))?;
        let t2 = bert.forward(&ids, None, &mask, &Ctx::train(2))?;
        assert_eq!(max_abs_diff(&t1, &t1b)?.0, 0.0);
        assert!(max_abs_diff(&t1, &t2)?.0 > 1e-3);
        assert!(max_abs_diff(&t1, &e1)?.0 > 1e-3);
        // No pooler in these weights: a clear error, not a panic.
        let msg = bert.pooled(&e1, &Ctx::eval()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("pooler.dense.weight"), "{msg}");
        Ok(())
    }

    #[test]
    fn attention_dropout_path_matches_eval_path_at_tiny_p() -> Result<()> {
        // The training path computes attention by hand (to drop probabilities); with p → 0 it
        // must agree with ops::attention.
        let mut cfg = tiny_config();
        cfg.hidden_dropout_prob = 0.0;
        cfg.attention_probs_dropout_prob = 1e-9;
        let bert = Bert::load(&random_weights(&cfg)?, &cfg, DType::F32, &Device::Cpu)?;
        let ids = Tensor::new(&[[1u32, 2, 3, 4], [5, 6, 0, 0]], &Device::Cpu)?;
        let mask = Tensor::new(&[[1f32, 1., 1., 1.], [1., 1., 0., 0.]], &Device::Cpu)?;
        let eval = bert.forward(&ids, None, &mask, &Ctx::eval())?;
        let train = bert.forward(&ids, None, &mask, &Ctx::train(3))?;
        assert!(max_abs_diff(&eval, &train)?.0 < 1e-5);
        Ok(())
    }

    #[test]
    fn linears_have_hf_names_and_distinct_salts() -> Result<()> {
        let cfg = tiny_config();
        let mut bert = Bert::load(&random_weights(&cfg)?, &cfg, DType::F32, &Device::Cpu)?;
        let linears = bert.linears_mut();
        assert_eq!(linears.len(), 12);
        assert_eq!(linears[0].0, "encoder.layer.0.attention.self.query");
        assert_eq!(linears[11].0, "encoder.layer.1.output.dense");
        let mut salts: Vec<u64> = linears.iter().map(|(_, l)| l.salt).collect();
        salts.sort();
        salts.dedup();
        assert_eq!(salts.len(), 12);
        Ok(())
    }

    #[test]
    fn head_init_is_seeded_and_rejects_zero_labels() -> Result<()> {
        let cfg = tiny_config();
        let a = SequenceClassificationHead::new(&cfg.head_config(), 3, 5, &Device::Cpu)?;
        let b = SequenceClassificationHead::new(&cfg.head_config(), 3, 5, &Device::Cpu)?;
        assert_eq!(max_abs_diff(a.vars()[0].as_tensor(), b.vars()[0].as_tensor())?.0, 0.0);
        assert_eq!(a.bias.as_tensor().abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
        assert!(SequenceClassificationHead::new(&cfg.head_config(), 0, 5, &Device::Cpu).is_err());
        let x = Tensor::ones((2, 8), DType::F32, &Device::Cpu)?;
        assert_eq!(a.forward(&x, &Ctx::eval())?.dims(), &[2, 3]);
        Ok(())
    }

    #[test]
    fn a_fresh_regression_head_starts_at_the_mean_a_loaded_one_keeps_its_bias() -> Result<()> {
        let cfg = tiny_config().head_config();
        let fresh = SequenceClassificationHead::new(&cfg, 1, 5, &Device::Cpu)?;
        assert!(fresh.start_regression_at(2.75)?);
        assert_eq!(fresh.bias.as_tensor().to_vec1::<f32>()?, vec![2.75]);
        let classes = SequenceClassificationHead::new(&cfg, 2, 5, &Device::Cpu)?;
        assert!(!classes.start_regression_at(2.75)?);
        assert_eq!(classes.bias.as_tensor().to_vec1::<f32>()?, vec![0.0, 0.0]);
        assert!(!fresh.start_regression_at(f32::NAN)?);
        let w = Tensor::ones((1, 8), DType::F32, &Device::Cpu)?;
        let b = Tensor::new(&[-1.5f32], &Device::Cpu)?;
        let weights = Weights::from_tensors(
            "head.safetensors",
            HashMap::from([("classifier.weight".to_string(), w), ("classifier.bias".to_string(), b)]),
        );
        let loaded = SequenceClassificationHead::load_or_init(&weights, &cfg, 1, 5, &Device::Cpu)?;
        assert!(!loaded.start_regression_at(2.75)?);
        assert_eq!(loaded.bias.as_tensor().to_vec1::<f32>()?, vec![-1.5]);
        Ok(())
    }

    #[test]
    fn config_errors_name_field_and_file() {
        let json = serde_json::json!({
            "vocab_size": 11, "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 3,
            "intermediate_size": 12
        });
        let msg =
            BertConfig::from_json(&json, Path::new("m/config.json")).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("m/config.json") && msg.contains("num_attention_heads = 3"), "{msg}");
    }
}
