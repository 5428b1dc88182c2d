//! Recording a linear post-op (a layout change, a rotation) through the op that produced its
//! input, so that the graph keeps neither the input nor anything of the post-op.
//!
//! candle's graph keeps every op's inputs: a projection's output that only feeds a head split
//! and RoPE stays alive until the backward although neither backward reads it. When `x` was
//! made by an op whose backward does not read its own output either (`lora-linear`, its
//! mixed-precision CUDA form `lora-linear-mixed`, `frozen-matmul`: listed by name below; an op
//! missing from the list keeps its output alive: one activation per adapted projection),
//! [`record_through`] records `y = post(x)` as one op on the producer's arguments, whose
//! backward is the producer's backward of `post`'s adjoint applied to the incoming gradient.
//! `x` then has no reader left and is freed after the forward. Any other producer: `y` is
//! recorded on `x` with the adjoint as its backward (still dropping what the post-op itself
//! would have kept).
use std::sync::Arc;

use candle_core::op::Op;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};

/// The adjoint of a linear post-op: the gradient of `x` from the gradient of `post(x)`.
pub(crate) type Adjoint = Arc<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// Producers whose backward reads neither their output nor anything but their arguments and
/// their own struct.
const FOLDABLE: [&str; 3] = ["lora-linear", "lora-linear-mixed", "frozen-matmul"];

/// `y` (= `post(x)`, computed from `x` detached) recorded with `adjoint` as post's backward.
pub(crate) fn record_through(y: &Tensor, x: &Tensor, adjoint: Adjoint) -> Tensor {
    let foldable = |name: &str| FOLDABLE.contains(&name);
    match x.op().as_ref() {
        Some(Op::CustomOp3(a1, a2, a3, inner)) if foldable(inner.name()) => {
            let op = Through3 { inner: inner.clone(), adjoint };
            y.recorded_as_op3(a1, a2, a3, Arc::new(Box::new(op)))
        }
        // frozen_linear: a reshape of the GEMM's output (rows × out → [.., out]).
        Some(Op::Reshape(gemm)) => match gemm.op().as_ref() {
            Some(Op::CustomOp1(arg, inner)) if foldable(inner.name()) => {
                let op = Through1 { inner: Some(inner.clone()), adjoint, inner_shape: gemm.shape().clone() };
                y.recorded_as_op1(arg, Arc::new(Box::new(op)))
            }
            _ => plain(y, x, adjoint),
        },
        _ => plain(y, x, adjoint),
    }
}

fn plain(y: &Tensor, x: &Tensor, adjoint: Adjoint) -> Tensor {
    let op = Through1 { inner: None, adjoint, inner_shape: x.shape().clone() };
    y.recorded_as_op1(x, Arc::new(Box::new(op)))
}

/// `post` after a one-argument producer (or after nothing: `inner` None, the argument is x).
struct Through1 {
    inner: Option<Arc<Box<dyn CustomOp1 + Send + Sync>>>,
    adjoint: Adjoint,
    /// The producer's output shape (the GEMM's `[rows, out]`).
    inner_shape: Shape,
}

impl CustomOp1 for Through1 {
    fn name(&self) -> &'static str {
        "through"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        super::recorded_only(self.name())
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = (self.adjoint)(grad)?.reshape(self.inner_shape.clone())?;
        match &self.inner {
            Some(inner) => inner.bwd(arg, res, &g),
            None => Ok(Some(g)),
        }
    }
}

/// `post` after a three-argument producer.
struct Through3 {
    inner: Arc<Box<dyn CustomOp3 + Send + Sync>>,
    adjoint: Adjoint,
}

impl CustomOp3 for Through3 {
    fn name(&self) -> &'static str {
        "through"
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
        a1: &Tensor,
        a2: &Tensor,
        a3: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.inner.bwd(a1, a2, a3, res, &(self.adjoint)(grad)?)
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::{frozen_linear, lora_linear, projection_heads, rope, split_heads, LoraPath};
    use candle_core::{DType, Device, Result, Tensor, Var, D};

    fn bits(t: &Tensor) -> Result<Vec<u32>> {
        Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
    }

    /// Heads of a frozen projection and of a LoRA projection, with and without RoPE: the values
    /// and every gradient of the plain `rope(split_heads(proj(x)))` graph, bit for bit, and the
    /// projection's output is no node of the graph (recorded on the producer's arguments).
    #[test]
    fn heads_through_the_projection_equal_the_plain_graph() -> Result<()> {
        let dev = Device::Cpu;
        let (b, t, h, d, c) = (2, 5, 2, 4, 6);
        let half = Tensor::randn(0f32, 1.0, (t, d / 2), &dev)?;
        let freqs = Tensor::cat(&[&half, &half], D::Minus1)?;
        let (cos, sin) = (freqs.cos()?, freqs.sin()?);
        let w = Tensor::randn(0f32, 0.3, (h * d, c), &dev)?;
        let a = Var::randn(0f32, 0.5, (3, c), &dev)?;
        let bb = Var::randn(0f32, 0.5, (h * d, 3), &dev)?;
        let proj = Tensor::randn(0f32, 1.0, (b, h, t, d), &dev)?;
        let path = LoraPath { scaling: 2.0, dropout: Some((0.25, 5)) };
        // `other`: a producer that is not folded (an affine after the projection, as a bias
        // add on CUDA is): the heads are recorded on the projection's output itself.
        for (with_lora, with_rope, other) in [
            (false, false, false),
            (false, true, false),
            (true, false, false),
            (true, true, false),
            (false, true, true),
        ] {
            let x = Var::randn(0f32, 1.0, (b, t, c), &dev)?;
            let project = |x: &Tensor| -> Result<Tensor> {
                if with_lora {
                    lora_linear(x, &w, None, a.as_tensor(), bb.as_tensor(), path)
                } else {
                    let y = frozen_linear(x, &w, None)?;
                    if other {
                        y.affine(2.0, 0.5)
                    } else {
                        Ok(y)
                    }
                }
            };
            let tables = with_rope.then_some((&cos, &sin));
            let split = split_heads(&project(x.as_tensor())?, h)?;
            let want = if with_rope { rope(&split, &cos, &sin)? } else { split };
            let got = projection_heads(&project(x.as_tensor())?, h, tables)?;
            assert_eq!(bits(&want)?, bits(&got)?);
            let (name, args) = match got.op().as_ref() {
                Some(candle_core::op::Op::CustomOp1(arg, op)) => (op.name(), vec![arg.clone()]),
                Some(candle_core::op::Op::CustomOp3(a1, a2, a3, op)) => {
                    (op.name(), vec![a1.clone(), a2.clone(), a3.clone()])
                }
                _ => ("?", vec![]),
            };
            assert_eq!(name, "through");
            // Folded: the producer's arguments, x (through a reshape view for the GEMM) and the
            // factors; else the projection's output.
            let leaf_or_view =
                |t: &Tensor| t.op().is_none() || matches!(t.op().as_ref(), Some(candle_core::op::Op::Reshape(_)));
            assert_eq!(args.iter().all(leaf_or_view), !other);
            let gw = want.mul(&proj)?.sum_all()?.backward()?;
            let gg = got.mul(&proj)?.sum_all()?.backward()?;
            let mut vars = vec![&x];
            if with_lora {
                vars.extend([&a, &bb]);
            }
            for v in vars {
                assert_eq!(
                    bits(gw.get(v).expect("grad"))?,
                    bits(gg.get(v).expect("grad"))?,
                    "lora {with_lora} rope {with_rope} other {other}"
                );
            }
        }
        Ok(())
    }
}
