//! `y = x·Wᵀ + b` for a frozen weight W, whose backward gives dx only.
//!
//! candle's `Matmul` backward computes and keeps a weight-sized dW even when W is frozen (+50 %
//! GEMM FLOPs and a weight-sized buffer per layer; rust-stack.md §1.1). [`FrozenMatmul`] is a
//! `CustomOp1` on x that holds W inside the op, so the autograd graph never sees W at all.
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor, D};

struct FrozenMatmul {
    /// `[out, in]`, contiguous.
    weight: Tensor,
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
        let out = storage.matmul(w, (1, m, n, k), layout, &w_layout.transpose(0, 1)?)?;
        Ok((out, Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (m, n, k) = self.dims(layout)?;
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
    let y = if x2.track_op() {
        x2.apply_op1(FrozenMatmul { weight })?
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
}
