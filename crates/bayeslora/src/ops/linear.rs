//! `y = x·Wᵀ + b` for a frozen weight W, whose backward gives dx only.
//!
//! candle's `Matmul` backward computes and keeps a weight-sized dW even when W is frozen (+50 %
//! GEMM FLOPs and a weight-sized buffer per layer; rust-stack.md §1.1). [`FrozenMatmul`] is a
//! `CustomOp1` on x that holds W inside the op, so the autograd graph never sees W at all.
//!
//! On the CPU (f32/f64) the op also adds the bias to the GEMM's output in place, multithreaded
//! over rows: the same `y + b` per element as candle's `broadcast_add`, without its `[rows, out]`
//! temporary and serial pass (4.6 % of a MiniLM training step, issue 21).
//!
//! [`residual_projection`] is a decoder block's last frozen projection with what surrounds it:
//! `residual + f(input)·Wᵀ`, f merging attention heads or SwiGLU's gating. Composed, the graph
//! keeps f's output (the projection's input, which a frozen backward never reads) and the
//! projection's output (which the residual add never reads); this op keeps neither.
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, D};
use rayon::prelude::*;

struct FrozenMatmul {
    /// `[out, in]`, contiguous.
    weight: Tensor,
    /// `[out]`, contiguous, of the weight's dtype; CPU f32/f64 only (see [`frozen_linear`]).
    bias: Option<Tensor>,
}

/// `y[r, j] += b[j]` over the rows of `y: [rows, b.len()]`, multithreaded.
fn add_rows<T: Copy + Send + Sync + std::ops::Add<Output = T>>(y: &mut [T], b: &[T]) {
    // 64 KiB of f32 per task at MiniLM's 384 features.
    let rows_per_task = (1 << 14) / b.len().max(1) + 1;
    y.par_chunks_mut(b.len() * rows_per_task).for_each(|rows| {
        for row in rows.chunks_exact_mut(b.len()) {
            for (y, &b) in row.iter_mut().zip(b) {
                *y = *y + b;
            }
        }
    });
}

/// The bias's values on the CPU, contiguous.
fn cpu_bias<T: candle_core::WithDType>(bias: &Tensor) -> Result<Vec<T>> {
    bias.flatten_all()?.to_vec1::<T>()
}

impl FrozenMatmul {
    fn dims(&self, layout: &Layout) -> Result<(usize, usize, usize)> {
        let (m, k) = layout.shape().dims2()?;
        let (n, k2) = self.weight.dims2()?;
        if k != k2 {
            candle_core::bail!("frozen_linear: input has {k} features, weight expects {k2}");
        }
        Ok((m, n, k))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, n, k) = self.dims(layout)?;
        let (w_storage, w_layout) = self.weight.storage_and_layout();
        let Storage::Cpu(w) = &*w_storage else {
            candle_core::bail!("frozen_linear: weight and input are on different devices")
        };
        let mut out = storage.matmul(w, (1, m, n, k), layout, &w_layout.transpose(0, 1)?)?;
        if let Some(bias) = &self.bias {
            match &mut out {
                CpuStorage::F32(y) => add_rows(y, &cpu_bias::<f32>(bias)?),
                CpuStorage::F64(y) => add_rows(y, &cpu_bias::<f64>(bias)?),
                other => candle_core::bail!("frozen_linear: no fused bias for {:?}", other.dtype()),
            }
        }
        Ok((out, Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (m, n, k) = self.dims(layout)?;
        if self.bias.is_some() {
            candle_core::bail!("frozen_linear: the fused bias is CPU-only");
        }
        let (w_storage, w_layout) = self.weight.storage_and_layout();
        let Storage::Cuda(w) = &*w_storage else {
            candle_core::bail!("frozen_linear: weight and input are on different devices")
        };
        let out = storage.matmul(w, (1, m, n, k), layout, &w_layout.transpose(0, 1)?)?;
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // dx = dy · W; no dW: the weight is frozen.
        Ok(Some(grad_res.matmul(&self.weight)?))
    }
}

/// `x: [.., in]`, `weight: [out, in]` (frozen), `bias: [out]` (frozen) → `[.., out]`.
pub fn frozen_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let mut out_dims = x.dims().to_vec();
    let in_features = x.dim(D::Minus1)?;
    let rows = x.elem_count() / in_features.max(1);
    let x2 = x.reshape((rows, in_features))?.contiguous()?;
    let out_features = weight.dim(0)?;
    let weight = weight.contiguous()?;
    let fuse_bias = |b: &Tensor| {
        x2.device().is_cpu()
            && matches!(x2.dtype(), DType::F32 | DType::F64)
            && b.dtype() == x2.dtype()
            && b.dims() == [out_features]
            && !b.track_op()
    };
    let (fused, bias) = match bias {
        Some(b) if fuse_bias(b) => (Some(b.contiguous()?), None),
        other => (None, other),
    };
    let y = if x2.track_op() {
        x2.apply_op1(FrozenMatmul { weight, bias: fused })?
    } else if fused.is_some() {
        x2.apply_op1_no_bwd(&FrozenMatmul { weight, bias: fused })?
    } else {
        // Inference: plain matmul, no graph to protect.
        x2.matmul(&weight.t()?)?
    };
    if let Some(last) = out_dims.last_mut() {
        *last = out_features;
    }
    let y = y.reshape(out_dims)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// What a [`residual_projection`] multiplies by its frozen weight.
#[derive(Debug, Clone, Copy)]
pub enum ProjectionInput<'a> {
    /// Attention's output `[B, H, T, D]`, merged to `[B, T, H·D]` first (`o_proj`).
    Heads(&'a Tensor),
    /// SwiGLU's gate and up `[.., I]`, gated to `silu(gate) · up` first (`down_proj`).
    Swiglu { gate: &'a Tensor, up: &'a Tensor },
}

impl ProjectionInput<'_> {
    /// The projection's input, `f(input)`: recorded in the graph (for a projection that
    /// carries an adapter, composed), or with `detach` computed without one.
    pub fn value(&self, detach: bool) -> Result<Tensor> {
        let d = |t: &Tensor| if detach { t.detach() } else { t.clone() };
        match self {
            ProjectionInput::Heads(y) => super::merge_heads(&d(y)),
            ProjectionInput::Swiglu { gate, up } => super::swiglu(&d(gate), &d(up)),
        }
    }
}

/// `residual + f(input)·Wᵀ (+ b)` for a frozen `weight: [out, in]` (and `bias: [out]`), f as
/// [`ProjectionInput`] says: the values of `residual.add(&frozen_linear(&f(input), W, b))` bit
/// for bit, keeping for the backward only the op's inputs (the attention output, or gate and
/// up, and the residual), not f's output or the projection's.
pub fn residual_projection(
    residual: &Tensor,
    input: ProjectionInput,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let y = residual.detach().add(&frozen_linear(&input.value(true)?, weight, bias)?)?;
    let weight = weight.clone();
    Ok(match input {
        ProjectionInput::Heads(heads) => {
            let op = MergedProjection { weight, heads: heads.dim(1)? };
            y.recorded_as_op2(heads, residual, Arc::new(Box::new(op)))
        }
        ProjectionInput::Swiglu { gate, up } => {
            y.recorded_as_op3(gate, up, residual, Arc::new(Box::new(SwigluProjection { weight })))
        }
    })
}

/// dx of the frozen projection, `dy·W`, shaped as the projection's input (`[.., in]`).
fn projection_input_grad(grad: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (out, inp) = weight.dims2()?;
    let rows = grad.elem_count() / out.max(1);
    let mut dims = grad.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = inp;
    }
    grad.reshape((rows, out))?.matmul(weight)?.reshape(dims)
}

/// [`residual_projection`] of attention heads: arguments (heads, residual).
struct MergedProjection {
    weight: Tensor,
    heads: usize,
}

impl CustomOp2 for MergedProjection {
    fn name(&self) -> &'static str {
        "merged-projection"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        super::recorded_only(self.name())
    }

    fn bwd(
        &self,
        heads: &Tensor,
        residual: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dheads = if heads.track_op() {
            Some(super::split_heads(&projection_input_grad(grad, &self.weight)?, self.heads)?)
        } else {
            None
        };
        Ok((dheads, residual.track_op().then(|| grad.clone())))
    }
}

/// [`residual_projection`] of SwiGLU's gating: arguments (gate, up, residual).
struct SwigluProjection {
    weight: Tensor,
}

impl CustomOp3 for SwigluProjection {
    fn name(&self) -> &'static str {
        "swiglu-projection"
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
        gate: &Tensor,
        up: &Tensor,
        residual: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dgate, dup) = if gate.track_op() || up.track_op() {
            let (dg, du) = super::swiglu::swiglu_grad(gate, up, &projection_input_grad(grad, &self.weight)?)?;
            (Some(dg), Some(du))
        } else {
            (None, None)
        };
        Ok((dgate, dup, residual.track_op().then(|| grad.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::check_grad;
    use candle_core::{Device, Var};

    #[test]
    fn matches_plain_matmul_and_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f64, 1.0, (5, 4), &dev)?;
        let b = Tensor::randn(0f64, 1.0, 5, &dev)?;
        let x = Tensor::randn(0f64, 1.0, (2, 3, 4), &dev)?;
        let want = x.broadcast_matmul(&w.t()?)?.broadcast_add(&b)?;
        let got = frozen_linear(&x, &w, Some(&b))?;
        let diff = (want - got)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12);
        assert!(check_grad(&[2, 3, 4], &|x| frozen_linear(x, &w, Some(&b)))? < 1e-6);
        // The fused CPU bias is candle's broadcast add bit for bit, with and without a graph.
        let (w, b) = (w.to_dtype(candle_core::DType::F32)?, b.to_dtype(candle_core::DType::F32)?);
        let x = Var::from_tensor(&x.to_dtype(candle_core::DType::F32)?)?;
        let want = frozen_linear(x.as_tensor(), &w, None)?.broadcast_add(&b)?.flatten_all()?.to_vec1::<f32>()?;
        for input in [x.as_tensor().clone(), x.as_tensor().detach()] {
            let got = frozen_linear(&input, &w, Some(&b))?.flatten_all()?.to_vec1::<f32>()?;
            assert!(got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits()));
        }
        Ok(())
    }

    #[test]
    fn never_produces_a_weight_gradient() -> Result<()> {
        let dev = Device::Cpu;
        // Even when the weight is a Var, the op keeps it out of the graph.
        let w = Var::randn(0f32, 1.0, (5, 4), &dev)?;
        let x = Var::randn(0f32, 1.0, (3, 4), &dev)?;
        let loss = frozen_linear(x.as_tensor(), w.as_tensor(), None)?.sum_all()?;
        let grads = loss.backward()?;
        assert!(grads.get(x.as_tensor()).is_some());
        assert!(grads.get(w.as_tensor()).is_none());
        Ok(())
    }

    /// Values bit for bit against `residual + frozen_linear(f(input))`, and every input's
    /// gradient against candle's autograd of that composition.
    #[test]
    fn residual_projection_matches_the_composition() -> Result<()> {
        let dev = Device::Cpu;
        let proj = Tensor::randn(0f32, 1.0, (2, 3, 6), &dev)?;
        let bits = |t: &Tensor| -> Result<Vec<u32>> {
            Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
        };
        for swiglu_input in [false, true] {
            let (inner, heads) = if swiglu_input { (10, 0) } else { (8, 2) };
            let w = Tensor::randn(0f32, 0.3, (6, inner), &dev)?;
            let bias = Tensor::randn(0f32, 0.3, 6, &dev)?;
            let residual = Var::randn(0f32, 1.0, (2, 3, 6), &dev)?;
            let a = Var::randn(
                0f32,
                1.0,
                if swiglu_input { vec![2, 3, inner] } else { vec![2, heads, 3, inner / heads] },
                &dev,
            )?;
            let u = Var::randn(0f32, 1.0, (2, 3, inner), &dev)?;
            let input = if swiglu_input {
                ProjectionInput::Swiglu { gate: a.as_tensor(), up: u.as_tensor() }
            } else {
                ProjectionInput::Heads(a.as_tensor())
            };
            let inner_value = if swiglu_input {
                crate::ops::swiglu(a.as_tensor(), u.as_tensor())?
            } else {
                crate::ops::merge_heads(a.as_tensor())?
            };
            let want = residual.as_tensor().add(&frozen_linear(&inner_value, &w, Some(&bias))?)?;
            let got = residual_projection(residual.as_tensor(), input, &w, Some(&bias))?;
            assert_eq!(bits(&want)?, bits(&got)?);
            let gw = want.mul(&proj)?.sum_all()?.backward()?;
            let gg = got.mul(&proj)?.sum_all()?.backward()?;
            let mut vars = vec![&residual, &a];
            if swiglu_input {
                vars.push(&u);
            }
            for v in vars {
                assert_eq!(bits(gw.get(v).expect("grad"))?, bits(gg.get(v).expect("grad"))?);
            }
        }
        Ok(())
    }
}
