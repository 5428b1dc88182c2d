//! `bayeslora bench attention`: forward+backward of `ops::flash_attention` (fused kernels) and
//! `ops::plain_attention` (materialised scores) on random q, k, v (N(0, 1)), no padding, per
//! shape.
use super::cuda_used_bytes;
use crate::error::Context;
use crate::ops::{self, AttentionMask};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::time::Instant;

/// One attention shape: batch, query heads, key/value heads, tokens, head dim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    pub b: usize,
    pub h: usize,
    pub hkv: usize,
    pub t: usize,
    pub d: usize,
}

impl AttentionShape {
    /// FLOPs of one forward: 4·B·H·T²·D, halved when causal (as FlashAttention's benchmarks);
    /// the backward counts 2.5× that.
    pub fn forward_flops(&self, causal: bool) -> f64 {
        4.0 * (self.b * self.h * self.t * self.t * self.d) as f64 * if causal { 0.5 } else { 1.0 }
    }
}

/// `BxHxTxD` or `BxHxTxDxHkv` (grouped-query attention with Hkv key/value heads).
pub fn parse_attention_shape(s: &str) -> Result<AttentionShape> {
    let n: Vec<usize> = s
        .split('x')
        .map(|p| p.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("--shapes {s}: expected BxHxTxD or BxHxTxDxHkv"))?;
    match n[..] {
        [b, h, t, d] => Ok(AttentionShape { b, h, hkv: h, t, d }),
        [b, h, t, d, hkv] if hkv > 0 && h % hkv == 0 => Ok(AttentionShape { b, h, hkv, t, d }),
        _ => Err(Error::run(format!("--shapes {s}: expected BxHxTxD or BxHxTxDxHkv with H divisible by Hkv"))),
    }
}

/// What one path of [`attention`] measured.
#[derive(Debug, Clone)]
pub struct AttentionTiming {
    /// `flash` or `plain`.
    pub path: &'static str,
    /// Seconds per forward+backward iteration and per forward-only iteration, and the
    /// device-level used memory after the timed loop minus before the path's first call
    /// (includes whatever candle's allocator keeps cached; CUDA only); or why the path did not
    /// run (unsupported here, out of memory).
    pub outcome: std::result::Result<(f64, f64, Option<f64>), String>,
}

/// Times both attention paths on `shape`. One iteration = forward, `sum(O ∘ W)` for a fixed
/// random W, backward to q, k, v (the mul/sum add one elementwise pass over O to both paths).
/// The device is synchronised before and after the timed loop of `iters` iterations (after
/// `warmup` untimed ones); the forward time is a separate forward-only loop.
pub fn attention(
    shape: AttentionShape,
    causal: bool,
    dtype: DType,
    device: &Device,
    iters: usize,
    warmup: usize,
) -> Result<Vec<AttentionTiming>> {
    let AttentionShape { b, h, hkv, t, d } = shape;
    let make = |shape: (usize, usize, usize, usize)| -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(dtype)?)
    };
    let q = Var::from_tensor(&make((b, h, t, d))?)?;
    let k = Var::from_tensor(&make((b, hkv, t, d))?)?;
    let v = Var::from_tensor(&make((b, hkv, t, d))?)?;
    let w = make((b, h, t, d))?;
    let mask = AttentionMask::new(None, causal, b, t, device)?;
    let mut out = Vec::new();
    for path in ["flash", "plain"] {
        let attn = |q: &Tensor, k: &Tensor, v: &Tensor| -> candle_core::Result<Tensor> {
            match path {
                "flash" => ops::flash_attention(q, k, v, &mask),
                _ => ops::plain_attention(q, k, v, &mask),
            }
        };
        let step = || -> candle_core::Result<()> {
            let o = attn(q.as_tensor(), k.as_tensor(), v.as_tensor())?;
            let grads = o.mul(&w)?.sum_all()?.backward()?;
            drop(grads);
            Ok(())
        };
        let forward = || -> candle_core::Result<()> {
            attn(&q.as_tensor().detach(), &k.as_tensor().detach(), &v.as_tensor().detach()).map(drop)
        };
        if path == "flash" && !ops::flash_supported(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask) {
            let why = "unsupported here (needs CUDA, f32/bf16/f16, head dim 32/64/128)".to_string();
            out.push(AttentionTiming { path, outcome: Err(why) });
            continue;
        }
        device.synchronize()?;
        let before = cuda_used_bytes(device).map(|(u, _)| u);
        let timed = (|| -> candle_core::Result<(f64, f64)> {
            for _ in 0..warmup {
                step()?;
            }
            device.synchronize()?;
            let start = Instant::now();
            for _ in 0..iters {
                step()?;
            }
            device.synchronize()?;
            let total = start.elapsed().as_secs_f64() / iters as f64;
            forward()?;
            device.synchronize()?;
            let start = Instant::now();
            for _ in 0..iters {
                forward()?;
            }
            device.synchronize()?;
            Ok((total, start.elapsed().as_secs_f64() / iters as f64))
        })();
        let outcome = match timed {
            Ok((total, fwd)) => {
                let after = cuda_used_bytes(device).map(|(u, _)| u);
                let delta = after.zip(before).map(|(a, b0)| a as f64 - b0 as f64);
                Ok((total, fwd, delta))
            }
            Err(e) => Err(e.to_string()),
        };
        out.push(AttentionTiming { path, outcome });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_shapes_parse() {
        assert_eq!(
            parse_attention_shape("1x4x24x32x2").ok(),
            Some(AttentionShape { b: 1, h: 4, hkv: 2, t: 24, d: 32 })
        );
        assert_eq!(parse_attention_shape("1x4x24x32").ok().map(|s| s.hkv), Some(4));
        assert!(parse_attention_shape("2x6x8x64x4").is_err());
        assert!(parse_attention_shape("2x6x").is_err());
    }
}
