//! Scaled dot-product attention with a backward: `softmax(q·kᵀ/√D + mask)·v`.
//!
//! [`attention`] dispatches: CUDA tensors of dtype f32/bf16/f16 with head dim 32, 64 or 128 take
//! the fused FlashAttention-2 kernels ([`super::flash_attention`]: O(T) memory per row, no
//! `[B, H, T, S]` scores); everything else takes [`plain_attention`]. Set the environment variable
//! `BAYESLORA_PLAIN_ATTENTION=1` to force the plain path on CUDA too (A/B benchmarks, debugging).
//!
//! [`plain_attention`] is the materialised-scores path: correct everywhere and the CPU reference
//! for the fused kernels. Grouped-query attention repeats each key/value head `H / Hkv` times.
use candle_core::{DType, Device, Result, Tensor};
use std::sync::OnceLock;

/// Which keys a query may attend to: padding (`[B, S]`, 1 = real) and, for decoders, causality.
/// As an additive bias `[B, 1, T, S]` ([`AttentionMask::bias`]): 0 where a query may attend, a
/// large negative value where it may not. The fused CUDA path reads the padding and the causal
/// flag instead and never builds the bias; on CUDA the bias is built on first use, on the CPU at
/// construction.
#[derive(Debug, Clone)]
pub struct AttentionMask {
    /// `[B, S]` f32, 1 for real tokens and 0 for padding (`None`: all real).
    padding: Option<Tensor>,
    causal: bool,
    batch: usize,
    len: usize,
    device: Device,
    bias: OnceLock<Tensor>,
}

impl AttentionMask {
    /// `padding: [B, S]` with 1 for real tokens and 0 for padding (`None`: all real).
    /// `causal`: query i may only see keys j ≤ i (T == S).
    pub fn new(padding: Option<&Tensor>, causal: bool, batch: usize, len: usize, device: &Device) -> Result<Self> {
        let padding = match padding {
            Some(p) => Some(p.to_dtype(DType::F32)?.to_device(device)?.contiguous()?),
            None => None,
        };
        let mask = Self { padding, causal, batch, len, device: device.clone(), bias: OnceLock::new() };
        if !device.is_cuda() {
            mask.bias()?;
        }
        Ok(mask)
    }

    fn build_bias(&self) -> Result<Tensor> {
        let (batch, len, device) = (self.batch, self.len, &self.device);
        // -1e9 rather than -inf: a fully masked row (a padding query) then stays finite.
        const NEG: f32 = -1e9;
        let mut bias = Tensor::zeros((batch, 1, len, len), DType::F32, device)?;
        if self.causal {
            let future: Vec<f32> =
                (0..len).flat_map(|i| (0..len).map(move |j| if j > i { NEG } else { 0.0 })).collect();
            let future = Tensor::from_vec(future, (1, 1, len, len), device)?;
            bias = bias.broadcast_add(&future)?;
        }
        if let Some(pad) = &self.padding {
            let pad = pad.affine(-(NEG as f64), NEG as f64)?; // 1→0, 0→NEG
            bias = bias.broadcast_add(&pad.reshape((batch, 1, 1, len))?)?;
        }
        Ok(bias)
    }

    /// The bias tensor, `[B, 1, T, S]`, f32: built at construction on the CPU, on first use on
    /// CUDA (the fused path never needs it), so this can fail there (out of memory).
    pub fn bias(&self) -> Result<&Tensor> {
        if let Some(bias) = self.bias.get() {
            return Ok(bias);
        }
        let bias = self.build_bias()?;
        Ok(self.bias.get_or_init(|| bias))
    }

    /// Whether query i only sees keys j ≤ i.
    pub fn causal(&self) -> bool {
        self.causal
    }

    /// B.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// S (= T).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether S is 0.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The padding, `[B, S]` f32 (1 = real), if any.
    pub(crate) fn padding(&self) -> Option<&Tensor> {
        self.padding.as_ref()
    }

    /// The padding as `[B, S]` f32 contiguous on `device`, all ones when there is none.
    pub fn key_valid(&self, device: &Device) -> Result<Tensor> {
        match &self.padding {
            Some(p) => p.to_device(device)?.contiguous(),
            None => Tensor::ones((self.batch, self.len), DType::F32, device),
        }
    }
}

/// `q: [B, H, T, D]`, `k`/`v`: `[B, Hkv, S, D]` with `H % Hkv == 0` → `[B, H, T, D]`.
/// Scores and softmax are computed in f32. Fused kernels on CUDA where supported (see the module
/// doc); on the CPU (f32/f64) the fused multithreaded op of `ops::cpu_attention` ([`plain_attention`]'s
/// values up to GEMM rounding); else [`plain_attention`].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask) -> Result<Tensor> {
    if super::cpu_attention::applies(q, k, v) && !super::flash_attention::plain_attention_forced() {
        let (heads, kv_heads) = (q.dim(1)?, k.dim(1)?);
        let layout = super::cpu_attention::HeadLayout::Heads;
        return super::cpu_attention::attention(q, k, v, layout, heads, kv_heads, mask.padding(), mask.causal(), None);
    }
    if q.device().is_cuda()
        && super::flash_attention::flash_supported(q, k, v, mask)
        && !super::flash_attention::plain_attention_forced()
    {
        return super::flash_attention::flash_attention(q, k, v, mask);
    }
    plain_attention(q, k, v, mask)
}

/// The materialised-scores attention (any device, any float dtype): the reference for the fused
/// kernels. Same contract as [`attention`].
pub fn plain_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask) -> Result<Tensor> {
    let (_, heads, _, head_dim) = q.dims4()?;
    let kv_heads = k.dim(1)?;
    let (k, v) = if kv_heads != heads {
        (repeat_kv(k, heads / kv_heads)?, repeat_kv(v, heads / kv_heads)?)
    } else {
        (k.clone(), v.clone())
    };
    let dtype = q.dtype();
    let scale = 1.0 / (head_dim as f64).sqrt();
    let scores = q.contiguous()?.matmul(&k.t()?.contiguous()?)?.affine(scale, 0.0)?;
    let scores = scores
        .to_dtype(super::stats_dtype(dtype))?
        .broadcast_add(&mask.bias()?.to_dtype(super::stats_dtype(dtype))?)?;
    let probs = super::softmax_last_dim(&scores)?.to_dtype(dtype)?;
    probs.matmul(&v.contiguous()?)
}

/// `[B, Hkv, S, D]` → `[B, Hkv·n, S, D]`, each head repeated n times consecutively (HF order).
fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    let (b, h, s, d) = x.dims4()?;
    x.unsqueeze(2)?.broadcast_as((b, h, n, s, d))?.reshape((b, h * n, s, d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::check_grad;

    #[test]
    fn causal_mask_hides_the_future() -> Result<()> {
        let dev = Device::Cpu;
        let mask = AttentionMask::new(None, true, 1, 3, &dev)?;
        let q = Tensor::randn(0f32, 1.0, (1, 2, 3, 4), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (1, 2, 3, 4), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, 2, 3, 4), &dev)?;
        let out = attention(&q, &k, &v, &mask)?;
        // The first query can only see the first value.
        let first = out.narrow(2, 0, 1)?;
        let diff = (first - v.narrow(2, 0, 1)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6);
        Ok(())
    }

    #[test]
    fn gradients_through_q_k_v_with_gqa_and_padding() -> Result<()> {
        let dev = Device::Cpu;
        let pad = Tensor::new(&[[1f32, 1., 1., 0.], [1., 1., 1., 1.]], &dev)?;
        let mask = AttentionMask::new(Some(&pad), true, 2, 4, &dev)?;
        let k = Tensor::randn(0f64, 1.0, (2, 1, 4, 3), &dev)?;
        let v = Tensor::randn(0f64, 1.0, (2, 1, 4, 3), &dev)?;
        let q = Tensor::randn(0f64, 1.0, (2, 2, 4, 3), &dev)?;
        assert!(check_grad(&[2, 2, 4, 3], &|q| attention(q, &k, &v, &mask))? < 1e-6);
        assert!(check_grad(&[2, 1, 4, 3], &|k| attention(&q, k, &v, &mask))? < 1e-6);
        assert!(check_grad(&[2, 1, 4, 3], &|v| attention(&q, &k, v, &mask))? < 1e-6);
        Ok(())
    }
}
