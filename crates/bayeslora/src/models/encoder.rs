//! Pieces shared by the BERT-style encoders ([`super::bert`], [`super::deberta_v2`]): the
//! weight [`Loader`], [`LayerNorm`], the seed salts, [`maybe_dropout`], the per-layer
//! [`LayerBody`] (`attention.output`, `intermediate`, `output`) and input checks.
use candle_core::{DType, Device, Tensor};

use super::linear::{Ctx, Linear};
use super::load::Weights;
use crate::ops;
use crate::{Error, Result};

// Dropout and adapter seeds: each call site gets its own salt so masks never repeat across sites.
// Linears use `LINEAR_SALT | layer << 8 | k`, dropouts `DROPOUT_SALT | layer << 8 | k`.
pub(crate) const LINEAR_SALT: u64 = 1 << 40;
pub(crate) const DROPOUT_SALT: u64 = 2 << 40;
pub(crate) const EMBEDDINGS: u64 = 0xFF_FF;
pub(crate) const POOLER: u64 = 0xFF_FE;

pub(crate) fn salt(kind: u64, layer: u64, k: u64) -> u64 {
    kind | (layer << 8) | k
}

/// Dropout when training, identity otherwise.
pub(crate) fn maybe_dropout(x: &Tensor, p: f32, ctx: &Ctx, salt: u64) -> Result<Tensor> {
    if ctx.train && p > 0.0 {
        Ok(ops::dropout(x, p, ctx.seed_for(salt))?)
    } else {
        Ok(x.clone())
    }
}

/// Where the tensors come from: the weights, the key prefix and the target dtype/device.
#[derive(Clone, Copy)]
pub(crate) struct Loader<'a> {
    pub(crate) weights: &'a Weights,
    pub(crate) prefix: &'a str,
    pub(crate) dtype: DType,
    pub(crate) device: &'a Device,
}

impl Loader<'_> {
    pub(crate) fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.weights.get(&format!("{}{name}", self.prefix), shape, self.dtype, self.device)
    }

    /// `{name}.weight [out, in]` and `{name}.bias [out]` as a frozen [`Linear`].
    pub(crate) fn linear(&self, name: &str, in_dim: usize, out_dim: usize, salt: u64) -> Result<Linear> {
        let weight = self.get(&format!("{name}.weight"), &[out_dim, in_dim])?;
        let bias = self.get(&format!("{name}.bias"), &[out_dim])?;
        Ok(Linear { salt, ..Linear::new(weight, Some(bias)) })
    }

    /// `{name}.weight`/`.bias`, or the TF-era `.gamma`/`.beta` of old checkpoints.
    pub(crate) fn layer_norm(&self, name: &str, dim: usize, eps: f64) -> Result<LayerNorm> {
        let old = !self.weights.contains(&format!("{}{name}.weight", self.prefix))
            && self.weights.contains(&format!("{}{name}.gamma", self.prefix));
        let (w, b) = if old { ("gamma", "beta") } else { ("weight", "bias") };
        Ok(LayerNorm {
            weight: self.get(&format!("{name}.{w}"), &[dim])?,
            bias: self.get(&format!("{name}.{b}"), &[dim])?,
            eps,
        })
    }
}

#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ops::layer_norm(x, &self.weight, &self.bias, self.eps)?)
    }
}

/// `encoder.layer.{i}` after the self-attention: `attention.output` (dense, dropout, residual,
/// LayerNorm), `intermediate` (dense, GELU) and `output` (dense, dropout, residual, LayerNorm).
/// Linear salts `LINEAR_SALT | i << 8 | 4..=6`, dropout salts `DROPOUT_SALT | i << 8 | 2..=3`.
#[derive(Debug, Clone)]
pub(crate) struct LayerBody {
    attention_output_dense: Linear,
    attention_output_layer_norm: LayerNorm,
    intermediate_dense: Linear,
    output_dense: Linear,
    output_layer_norm: LayerNorm,
    dropout: f32,
    index: u64,
}

impl LayerBody {
    /// `hidden`/`intermediate`: C and F; `dropout`: `hidden_dropout_prob`.
    pub(crate) fn load(
        vb: &Loader,
        i: usize,
        hidden: usize,
        intermediate: usize,
        eps: f64,
        dropout: f32,
    ) -> Result<Self> {
        let p = format!("encoder.layer.{i}");
        let (c, f, l) = (hidden, intermediate, i as u64);
        Ok(Self {
            attention_output_dense: vb.linear(&format!("{p}.attention.output.dense"), c, c, salt(LINEAR_SALT, l, 4))?,
            attention_output_layer_norm: vb.layer_norm(&format!("{p}.attention.output.LayerNorm"), c, eps)?,
            intermediate_dense: vb.linear(&format!("{p}.intermediate.dense"), c, f, salt(LINEAR_SALT, l, 5))?,
            output_dense: vb.linear(&format!("{p}.output.dense"), f, c, salt(LINEAR_SALT, l, 6))?,
            output_layer_norm: vb.layer_norm(&format!("{p}.output.LayerNorm"), c, eps)?,
            dropout,
            index: l,
        })
    }

    /// `context`: the self-attention output, `x`: the layer input (both `[B, T, C]`).
    pub(crate) fn forward(&self, context: &Tensor, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let a = self.attention_output_dense.forward(context, ctx)?;
        let a = maybe_dropout(&a, self.dropout, ctx, salt(DROPOUT_SALT, self.index, 2))?;
        let a = self.attention_output_layer_norm.forward(&a.add(x)?)?;
        let h = ops::gelu(&self.intermediate_dense.forward(&a, ctx)?)?;
        let h = self.output_dense.forward(&h, ctx)?;
        let h = maybe_dropout(&h, self.dropout, ctx, salt(DROPOUT_SALT, self.index, 3))?;
        self.output_layer_norm.forward(&h.add(&a)?)
    }

    /// Appends the three linears with their HF names under `p` (`encoder.layer.{i}`).
    pub(crate) fn push_linears<'a>(&'a mut self, p: &str, out: &mut Vec<(String, &'a mut Linear)>) {
        out.push((format!("{p}.attention.output.dense"), &mut self.attention_output_dense));
        out.push((format!("{p}.intermediate.dense"), &mut self.intermediate_dense));
        out.push((format!("{p}.output.dense"), &mut self.output_dense));
    }
}

/// Checks `[B, T]` inputs (`max_len`: the position table, if it bounds T) and moves `input_ids`
/// and `token_type_ids` (`None`: all type 0) to `device` as u32. Returns them with `(B, T)`.
pub(crate) fn prepare_inputs(
    input_ids: &Tensor,
    token_type_ids: Option<&Tensor>,
    attention_mask: &Tensor,
    max_len: Option<usize>,
    device: &Device,
) -> Result<(Tensor, Tensor, usize, usize)> {
    let (b, t) = input_ids.dims2()?;
    if let Some(max) = max_len.filter(|&m| t > m) {
        return Err(Error::config(
            "sequence length",
            t,
            format!("exceeds max_position_embeddings = {max}; truncate the inputs"),
        ));
    }
    if attention_mask.dims() != [b, t] {
        return Err(Error::config(
            "attention_mask shape",
            format!("{:?}", attention_mask.dims()),
            format!("must be [B, T] = [{b}, {t}] like input_ids"),
        ));
    }
    let input_ids = input_ids.to_dtype(DType::U32)?.to_device(device)?;
    let token_type_ids = match token_type_ids {
        Some(tt) => tt.to_dtype(DType::U32)?.to_device(device)?,
        None => Tensor::zeros((b, t), DType::U32, device)?,
    };
    Ok((input_ids, token_type_ids, b, t))
}

/// Runs `layer` over `layers` from the embedding output `x`; returns every hidden state as HF's
/// `output_hidden_states` (`x`, then each layer's output: `layers.len() + 1` tensors).
pub(crate) fn hidden_states<L>(
    mut x: Tensor,
    layers: &[L],
    layer: impl Fn(&L, &Tensor) -> Result<Tensor>,
) -> Result<Vec<Tensor>> {
    let mut states = Vec::with_capacity(layers.len() + 1);
    for l in layers {
        let next = layer(l, &x)?;
        states.push(x);
        x = next;
    }
    states.push(x);
    Ok(states)
}
