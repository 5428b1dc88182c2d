//! `y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ`: a frozen linear layer with its LoRA path as one op that
//! keeps for the backward only x, A, B (its arguments) and the `[N, r]` product `drop(x)·Aᵀ`.
//!
//! Composed from candle ops, the LoRA path of a bf16 layer keeps five activation-sized buffers
//! alive until the backward: x cast to f32, its dropout, `h·Bᵀ`, its scaled copy (both f32) and
//! the bf16 cast, plus the sum with the base output: ≈ 9 bf16 hidden vectors per token for an
//! adapted q or v projection where the backward needs none of them (issue 17: Llama-2-7B at
//! 4 × 512 kept 34 GiB against compiled PyTorch's 22). Here the forward runs the same candle
//! ops on detached inputs, so its values are the composed path's bit for bit, and its output is
//! recorded as this op's ([`Tensor::recorded_as_op3`], a patch of the vendored candle: the
//! storage is shared, nothing is copied). The backward recomputes `drop(x)` (the mask is a
//! function of the seed) and runs the same products candle's matmul, affine, cast and dropout
//! backwards would. Only the sum of the base and the LoRA input gradients is one contribution
//! here where candle added two, so dx may differ from the composed graph's in the last bit.
//!
//! On CUDA with bf16/f16 activations (unless `BAYESLORA_F32_LORA=1`) the op takes another form,
//! `mixed`: the products in that dtype through cuBLAS with f32 accumulation (`ops::gemm`), the
//! projection's GEMM summing into the LoRA term's output. Its values are not the composed path's
//! bit for bit (A, B and `drop(x)·Aᵀ` are rounded to bf16/f16 once), and it is ~15 % faster on
//! a Llama-2-7B step (README, "Eighth session").
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

use super::{cast, dropout, frozen_linear};

/// The LoRA path's settings: `scaling` s, and dropout `(p, seed)` on its input (training).
#[derive(Debug, Clone, Copy)]
pub struct LoraPath {
    pub scaling: f64,
    pub dropout: Option<(f32, u64)>,
}

impl LoraPath {
    /// `drop(x)` in f32, as `[rows, in]`.
    fn dropped_input(&self, x: &Tensor) -> Result<Tensor> {
        let in_features = x.dim(D::Minus1)?;
        let rows = x.elem_count() / in_features.max(1);
        let x = cast(x, DType::F32)?;
        let x = match self.dropout {
            Some((p, seed)) if p > 0.0 => dropout(&x, p, seed)?,
            _ => x,
        };
        x.reshape((rows, in_features))
    }

    /// The LoRA path itself, `s·drop(x)·Aᵀ·Bᵀ` in f32 as `[.., out]`, and `h = drop(x)·Aᵀ`
    /// (`[rows, r]`): two thin matmuls, never the `[out, in]` product. Recorded in the graph
    /// when its inputs are (the adapter's own forward, `LoraLayer::forward`).
    pub fn delta(&self, x: &Tensor, a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
        let h = self.dropped_input(x)?.matmul(&a.t()?)?;
        let mut dims = x.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = b.dim(0)?;
        }
        let delta = h.matmul(&b.t()?)?.affine(self.scaling, 0.0)?.reshape(dims)?;
        Ok((delta, h))
    }

    /// `frozen_linear(x) + cast(delta(x))`, and `h`.
    fn forward(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        a: &Tensor,
        b: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let base = frozen_linear(x, weight, bias)?;
        let (delta, h) = self.delta(x, a, b)?;
        Ok((base.add(&cast(&delta, base.dtype())?)?, h))
    }
}

/// `x: [.., in]`, `weight: [out, in]` and `bias: [out]` frozen, `a: [r, in]` and `b: [out, r]`
/// (f32, the trained factors) → `[.., out]` in x's dtype: the frozen projection plus
/// `scaling · drop(x)·Aᵀ·Bᵀ`, with the values of `frozen_linear(x) + cast(lora(x))`.
///
/// On CUDA with bf16/f16 activations the products run in that dtype with an f32 accumulator
/// (`mixed`: A and B rounded to it for the step, `drop(x)·Aᵀ` and the backward's `s·dy·B`
/// rounded once, dA and dB written in f32), unless [`F32_LORA_ENV`] is set.
pub fn lora_linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    path: LoraPath,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if mixed::applies(x, weight) {
        return mixed::lora_linear(x, weight, bias, a, b, path);
    }
    let (y, h) = path.forward(&x.detach(), weight, bias, &a.detach(), &b.detach())?;
    if !(x.track_op() || a.track_op() || b.track_op()) {
        return Ok(y);
    }
    let op = LoraLinear { weight: weight.clone(), path, h };
    Ok(y.recorded_as_op3(x, a, b, Arc::new(Box::new(op))))
}

/// `BAYESLORA_F32_LORA=1` keeps the f32 LoRA path for bf16/f16 layers on CUDA: x cast to f32,
/// f32 products, the sum cast back (PEFT's arithmetic for f32 adapters on a bf16 model). Without
/// it, those layers take `mixed`'s bf16/f16 products (A/B benchmarks, numerics checks).
pub const F32_LORA_ENV: &str = "BAYESLORA_F32_LORA";

#[cfg(feature = "cuda")]
fn f32_lora_forced() -> bool {
    std::env::var(F32_LORA_ENV).is_ok_and(|v| matches!(v.trim(), "1" | "true" | "yes"))
}

/// The LoRA path of a bf16/f16 layer on CUDA as mixed-precision GEMMs (`ops::gemm`): operands
/// in the activations' dtype, f32 accumulators, the frozen projection's GEMM adding its product
/// into the LoRA term's output (β = 1). Per step and layer this reads x twice (for `x·Aᵀ` and
/// the projection) and writes y once; the f32 path wrote x in f32 twice (forward and the
/// backward's recompute), `h·Bᵀ`, its scaled copy, the bf16 cast and the sum, and the backward
/// as many again. Kept for the backward: x (the op's argument), `u = drop(x)·Aᵀ` (`[rows, r]`)
/// and the rounded A and B.
#[cfg(feature = "cuda")]
mod mixed {
    use super::*;
    use crate::ops::gemm::{gemm, gemm_sum, Product};

    pub(super) fn applies(x: &Tensor, weight: &Tensor) -> bool {
        x.device().is_cuda()
            && matches!(x.dtype(), DType::BF16 | DType::F16)
            && weight.dtype() == x.dtype()
            && x.elem_count() > 0
            && !f32_lora_forced()
    }

    /// x as contiguous `[rows, in]`.
    fn rows(x: &Tensor) -> Result<Tensor> {
        let k = x.dim(D::Minus1)?;
        x.reshape((x.elem_count() / k.max(1), k))?.contiguous()
    }

    /// `drop(x)` in x's dtype: the f32 path's mask (the counter hash indexes elements, not values).
    fn dropped(x: &Tensor, path: &LoraPath) -> Result<Tensor> {
        match path.dropout {
            Some((p, seed)) if p > 0.0 => dropout(x, p, seed),
            _ => Ok(x.clone()),
        }
    }

    pub(super) fn lora_linear(
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        a: &Tensor,
        b: &Tensor,
        path: LoraPath,
    ) -> Result<Tensor> {
        let dt = x.dtype();
        let x2 = rows(&x.detach())?;
        let weight = weight.contiguous()?;
        let ab = cast(&a.detach(), dt)?.contiguous()?;
        let bb = cast(&b.detach(), dt)?.contiguous()?;
        // u = drop(x)·Aᵀ [rows, r]; y = s·u·Bᵀ + x·Wᵀ, the projection accumulating in place.
        let u = gemm(&dropped(&x2, &path)?, &ab, Product::new(false, true, 1.0), dt)?;
        let s = path.scaling as f32;
        let y = gemm_sum(&u, &bb, Product::new(false, true, s), &x2, &weight, Product::new(false, true, 1.0))?;
        let mut dims = x.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = weight.dim(0)?;
        }
        let y = y.reshape(dims)?;
        let y = match bias {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        };
        if !(x.track_op() || a.track_op() || b.track_op()) {
            return Ok(y);
        }
        let op = MixedLoraLinear { weight, path, u, ab, bb };
        Ok(y.recorded_as_op3(x, a, b, Arc::new(Box::new(op))))
    }

    struct MixedLoraLinear {
        weight: Tensor,
        path: LoraPath,
        /// `drop(x)·Aᵀ`, `[rows, r]`, in x's dtype.
        u: Tensor,
        /// A `[r, in]` and B `[out, r]` rounded to x's dtype.
        ab: Tensor,
        bb: Tensor,
    }

    impl CustomOp3 for MixedLoraLinear {
        fn name(&self) -> &'static str {
            "lora-linear-mixed"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            crate::ops::recorded_only(self.name())
        }

        fn bwd(
            &self,
            x: &Tensor,
            _a: &Tensor,
            _b: &Tensor,
            _res: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let dt = self.ab.dtype();
            let out = self.weight.dim(0)?;
            let g = grad.reshape((grad.elem_count() / out.max(1), out))?.contiguous()?.to_dtype(dt)?;
            let s = self.path.scaling as f32;
            let no_t = Product::new(false, false, 1.0);
            // dh = s·dy·B [rows, r]; dB = s·dyᵀ·u [out, r]; dA = dhᵀ·drop(x) [r, in].
            let dh = gemm(&g, &self.bb, Product::new(false, false, s), dt)?;
            let db = gemm(&g, &self.u, Product::new(true, false, s), DType::F32)?;
            let da = gemm(&dh, &dropped(&rows(&x.detach())?, &self.path)?, Product::new(true, false, 1.0), DType::F32)?;
            let dx = if x.track_op() {
                // dx = dy·W + drop'(dh·A), the LoRA term first and the projection accumulating.
                let dx = match self.path.dropout {
                    Some((p, seed)) if p > 0.0 => {
                        let lora = dropout(&gemm(&dh, &self.ab, no_t, dt)?, p, seed)?;
                        g.matmul(&self.weight)?.add(&lora)?
                    }
                    _ => gemm_sum(&dh, &self.ab, no_t, &g, &self.weight, no_t)?,
                };
                Some(dx.reshape(x.shape())?)
            } else {
                None
            };
            Ok((dx, Some(da), Some(db)))
        }
    }
}

struct LoraLinear {
    /// `[out, in]`, frozen.
    weight: Tensor,
    path: LoraPath,
    /// `drop(x)·Aᵀ`, `[rows, r]` f32: the one intermediate the backward keeps.
    h: Tensor,
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        super::recorded_only(self.name())
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let out = self.weight.dim(0)?;
        let rows = grad.elem_count() / out.max(1);
        let g = grad.reshape((rows, out))?;
        // What candle's backward of `cast(affine(h·Bᵀ, s))` hands the product: cast(dy)·s.
        let gl = cast(&g, DType::F32)?.affine(self.path.scaling, 0.0)?;
        let (a, b) = (a.detach(), b.detach());
        // matmul(h, Bᵀ): d h = g·B, d(Bᵀ) = hᵀ·g, then the transpose's backward.
        let dh = gl.matmul(&b.t()?.t()?)?;
        let db = self.h.t()?.matmul(&gl)?.t()?.contiguous()?;
        // matmul(drop(x), Aᵀ): d drop(x) = dh·A, d(Aᵀ) = drop(x)ᵀ·dh.
        let xd = self.path.dropped_input(&x.detach())?;
        let da = xd.t()?.matmul(&dh)?.t()?.contiguous()?;
        let dx = if x.track_op() {
            let dxd = dh.matmul(&a.t()?.t()?)?;
            let dxd = match self.path.dropout {
                Some((p, seed)) if p > 0.0 => dropout(&dxd.reshape(x.shape())?, p, seed)?,
                _ => dxd.reshape(x.shape())?,
            };
            // The frozen base's dx = dy·W, plus the LoRA path's, cast back to x's dtype.
            let base = g.matmul(&self.weight)?.reshape(x.shape())?;
            Some(base.add(&cast(&dxd, x.dtype())?)?)
        } else {
            None
        };
        Ok((dx, Some(da), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The composed graph this op replaces, recorded by candle op by op:
    /// `frozen_linear(x) + cast(s·drop(x)·Aᵀ·Bᵀ)` on the tracked inputs.
    fn composed(
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        a: &Tensor,
        b: &Tensor,
        path: LoraPath,
    ) -> Result<Tensor> {
        Ok(path.forward(x, w, bias, a, b)?.0)
    }

    fn bits(t: &Tensor) -> Result<Vec<u32>> {
        Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
    }

    /// Values bit for bit, and gradients: A and B bit for bit, x to the last bit (one sum
    /// instead of two contributions), with and without dropout and bias.
    #[test]
    fn matches_the_composed_graph() -> Result<()> {
        let dev = Device::Cpu;
        for (p, with_bias) in [(0.0f32, false), (0.3, true)] {
            let w = Tensor::randn(0f32, 0.3, (6, 5), &dev)?;
            let bias = Tensor::randn(0f32, 0.3, 6, &dev)?;
            let bias = with_bias.then_some(&bias);
            let a = Var::randn(0f32, 0.5, (3, 5), &dev)?;
            let b = Var::randn(0f32, 0.5, (6, 3), &dev)?;
            let x = Var::randn(0f32, 1.0, (2, 4, 5), &dev)?;
            let path = LoraPath { scaling: 2.0, dropout: Some((p, 11)) };
            let proj = Tensor::randn(0f32, 1.0, (2, 4, 6), &dev)?;
            let want = composed(x.as_tensor(), &w, bias, a.as_tensor(), b.as_tensor(), path)?;
            let got = lora_linear(x.as_tensor(), &w, bias, a.as_tensor(), b.as_tensor(), path)?;
            assert_eq!(bits(&want)?, bits(&got)?);
            let gw = want.mul(&proj)?.sum_all()?.backward()?;
            let gg = got.mul(&proj)?.sum_all()?.backward()?;
            for v in [&a, &b] {
                assert_eq!(bits(gw.get(v).expect("grad"))?, bits(gg.get(v).expect("grad"))?);
            }
            let (dw, dg) = (gw.get(&x).expect("dx"), gg.get(&x).expect("dx"));
            let diff = (dw - dg)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff <= 1e-6, "dx differs by {diff}");
        }
        Ok(())
    }

    #[test]
    fn untracked_inputs_record_nothing() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.3, (4, 3), &dev)?;
        let (a, b) = (Tensor::ones((2, 3), DType::F32, &dev)?, Tensor::ones((4, 2), DType::F32, &dev)?);
        let x = Tensor::ones((5, 3), DType::F32, &dev)?;
        let y = lora_linear(&x, &w, None, &a, &b, LoraPath { scaling: 1.0, dropout: None })?;
        assert!(!y.track_op());
        Ok(())
    }
}
