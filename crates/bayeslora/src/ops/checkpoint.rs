//! Activation (gradient) checkpointing: a segment of the network (one decoder layer) runs forward
//! without keeping its intermediates, and is recomputed inside the backward pass.
//!
//! candle has no checkpointing: every op output stays alive in the autograd graph until the
//! backward, ~1 GB per Llama-2-7B layer at 4 × 512 tokens. [`checkpoint`] runs the segment on a
//! detached input, keeps only its output, and attaches that output to the graph through a custom
//! op whose backward recomputes the segment with gradients on, seeded with the incoming gradient.
//! A custom op can only return gradients for its inputs, so the gradients of the segment's own
//! trainable vars go to a per-thread side store that [`backward`] merges into the `GradStore` it
//! returns: training must call [`backward`], not `Tensor::backward`, when a forward checkpointed.
//!
//! The segment must compute the same thing twice: dropout masks come from `Ctx` seeds (and the
//! vars are not updated between the forward and the backward), so the recompute is bit-identical
//! and so are the gradients (tested below). Cost: one more forward of each segment.
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor, TensorId, Var};

/// The segment: input `[.., C]` → output of the same kind, deterministic.
pub type Segment = Arc<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

thread_local! {
    /// Gradients of checkpointed segments' vars, by var id: (the var's tensor, its gradient).
    static SIDE_GRADS: RefCell<HashMap<TensorId, (Tensor, Tensor)>> = RefCell::new(HashMap::new());
}

/// `segment(x)`, keeping only the output alive; its backward recomputes `segment` and sends the
/// gradients of `vars` (the segment's trainable vars) to [`backward`]. When nothing upstream of
/// `x` needs a gradient (the first layer, after a frozen embedding), the recompute skips dx.
pub fn checkpoint(x: &Tensor, segment: Segment, vars: Vec<Var>) -> Result<Tensor> {
    // [`backward`] drains the side store; gradients left in it mean the last backward was a
    // plain `Tensor::backward`, which silently lost the checkpointed layers' var gradients.
    if SIDE_GRADS.with(|s| !s.borrow().is_empty()) {
        SIDE_GRADS.with(|s| s.borrow_mut().clear());
        candle_core::bail!(
            "the last backward through checkpointed layers was `loss.backward()`, which cannot see their \
             adapters' gradients: call `bayeslora::ops::backward(&loss)` when checkpointing"
        );
    }
    let y = segment(&x.detach())?.detach(); // the segment's graph is dropped here
                                            // candle records an op only when an input is tracked; an untracked `x` gets a 1-element var
                                            // beside it so that the op still reaches the backward (its gradient is never produced).
    let anchor = Var::zeros(1, DType::F32, x.device())?;
    let op = Checkpoint { segment, vars, output: Mutex::new(Some(y)) };
    x.apply_op2(anchor.as_tensor(), op)
}

/// `loss.backward()` plus the gradients that checkpointed segments sent to the side store.
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    SIDE_GRADS.with(|s| s.borrow_mut().clear());
    let mut grads = loss.backward()?;
    let side = SIDE_GRADS.with(|s| std::mem::take(&mut *s.borrow_mut()));
    for (_, (var, g)) in side {
        let total = match grads.get(&var) {
            Some(h) => h.add(&g)?,
            None => g,
        };
        grads.insert(&var, total);
    }
    Ok(grads)
}

struct Checkpoint {
    segment: Segment,
    vars: Vec<Var>,
    /// The forward's result, handed to candle by `fwd` (taken, so it is not kept twice).
    output: Mutex<Option<Tensor>>,
}

impl Checkpoint {
    fn take_output(&self) -> Result<Tensor> {
        let mut slot = self.output.lock().map_err(|_| candle_core::Error::Msg("checkpoint: poisoned lock".into()))?;
        slot.take().ok_or_else(|| candle_core::Error::Msg("checkpoint: forward ran twice".into()))
    }
}

/// A contiguous copy of `storage` under `layout` (candle's op interface returns owned storage).
fn copy_out<S: BackendStorage>(storage: &S, layout: &Layout) -> Result<S>
where
    S::Device: BackendDevice<Storage = S>,
{
    // SAFETY: `copy_strided_src` writes every element of the fresh buffer before it is read.
    let mut dst = unsafe { storage.device().alloc_uninit(layout.shape(), storage.dtype())? };
    storage.copy_strided_src(&mut dst, 0, layout)?;
    Ok(dst)
}

impl CustomOp2 for Checkpoint {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = self.take_output()?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((copy_out(s, layout)?, y.shape().clone())),
            _ => candle_core::bail!("checkpoint: the segment's output left the input's device"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = self.take_output()?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((copy_out(s, layout)?, y.shape().clone())),
            _ => candle_core::bail!("checkpoint: the segment's output left the input's device"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        _anchor: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let x_var = if x.track_op() { Some(Var::from_tensor(&x.detach())?) } else { None };
        let input = x_var.as_ref().map(|v| v.as_tensor().clone()).unwrap_or_else(|| x.detach());
        let y = (self.segment)(&input)?;
        // Seeded with ones, `y ⊙ grad` backpropagates exactly `grad` into y.
        let grads = y.mul(&grad.detach())?.backward()?;
        SIDE_GRADS.with(|side| -> Result<()> {
            let mut side = side.borrow_mut();
            for var in &self.vars {
                if let Some(g) = grads.get(var.as_tensor()) {
                    match side.get_mut(&var.id()) {
                        Some((_, total)) => *total = total.add(g)?,
                        None => {
                            side.insert(var.id(), (var.as_tensor().clone(), g.clone()));
                        }
                    }
                }
            }
            Ok(())
        })?;
        let dx = x_var.and_then(|v| grads.get(v.as_tensor()).cloned());
        Ok((dx, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A two-layer residual block with trainable low-rank factors and a dropout mask fixed by
    /// its seed, as a decoder layer has.
    fn block(w: Tensor, a: Var, b: Var, seed: u64) -> Segment {
        Arc::new(move |x: &Tensor| {
            let h = x.matmul(&w)?.tanh()?;
            let h = crate::ops::dropout(&h, 0.3, seed)?;
            let lora = h.matmul(a.as_tensor())?.matmul(b.as_tensor())?;
            x.add(&h.add(&lora)?)
        })
    }

    /// An f32 [`block`] of width 4, its two factors and an input `[5, 4]`.
    fn small_block() -> Result<(Segment, Var, Var, Var)> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.5, (4, 4), &dev)?;
        let a = Var::randn(0f32, 0.5, (4, 2), &dev)?;
        let b = Var::randn(0f32, 0.5, (2, 4), &dev)?;
        let seg = block(w, a.clone(), b.clone(), 1);
        Ok((seg, a, b, Var::randn(0f32, 1.0, (5, 4), &dev)?))
    }

    #[test]
    fn gradients_equal_the_uncheckpointed_ones_bit_for_bit() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f64, 0.5, (6, 6), &dev)?;
        let a = Var::randn(0f64, 0.5, (6, 2), &dev)?;
        let b = Var::randn(0f64, 0.5, (2, 6), &dev)?;
        let seg1 = block(w.clone(), a.clone(), b.clone(), 7);
        let seg2 = block(w.t()?.contiguous()?, a.clone(), b.clone(), 8);
        let proj = Tensor::randn(0f64, 1.0, (3, 6), &dev)?;
        for tracked_input in [true, false] {
            let x0 = Var::randn(0f64, 1.0, (3, 6), &dev)?;
            let x = if tracked_input { x0.as_tensor().clone() } else { x0.as_tensor().detach() };
            let plain = seg2(&seg1(&x)?)?.mul(&proj)?.sum_all()?.backward()?;
            let ck = checkpoint(&x, seg1.clone(), vec![a.clone(), b.clone()])?;
            let ck = checkpoint(&ck, seg2.clone(), vec![a.clone(), b.clone()])?;
            let out = backward(&ck.mul(&proj)?.sum_all()?)?;
            for v in [&a, &b] {
                let want = plain.get(v.as_tensor()).expect("plain grad").flatten_all()?.to_vec1::<f64>()?;
                let got = out.get(v.as_tensor()).expect("checkpointed grad").flatten_all()?.to_vec1::<f64>()?;
                assert_eq!(want, got);
            }
            let dx_plain = plain.get(x0.as_tensor()).map(|g| g.flatten_all()?.to_vec1::<f64>()).transpose()?;
            let dx_ck = out.get(x0.as_tensor()).map(|g| g.flatten_all()?.to_vec1::<f64>()).transpose()?;
            assert_eq!(dx_plain, dx_ck, "tracked input: {tracked_input}");
            assert_eq!(dx_ck.is_some(), tracked_input);
        }
        Ok(())
    }

    /// A plain `Tensor::backward` through checkpointed layers loses the vars' gradients; the
    /// next checkpointed forward says so instead of training on without them.
    #[test]
    fn a_plain_backward_is_reported() -> Result<()> {
        let (seg, a, b, x) = small_block()?;
        let plain = checkpoint(x.as_tensor(), seg.clone(), vec![a.clone(), b.clone()])?.sum_all()?.backward()?;
        assert!(plain.get(a.as_tensor()).is_none(), "candle cannot see them");
        let err = checkpoint(x.as_tensor(), seg.clone(), vec![a.clone(), b.clone()]).unwrap_err().to_string();
        assert!(err.contains("ops::backward"), "{err}");
        // The store was reset: the right call works again.
        let y = checkpoint(x.as_tensor(), seg, vec![a.clone(), b])?;
        assert!(backward(&y.sum_all()?)?.get(a.as_tensor()).is_some());
        Ok(())
    }

    #[test]
    fn forward_values_are_unchanged() -> Result<()> {
        let (seg, a, b, x) = small_block()?;
        let want = seg(x.as_tensor())?.flatten_all()?.to_vec1::<f32>()?;
        let got = checkpoint(x.as_tensor(), seg, vec![a, b])?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(want, got);
        Ok(())
    }
}
