//! The attention head layout: `[B, T, H·D]` ↔ `[B, H, T, D]`, differentiable (the backward is
//! the inverse permutation). On CUDA one permutation kernel (`kernels/layout.cu`; candle's
//! strided copy of a transpose is ~15× slower there); on the CPU (f32/f64) the same permutation
//! as rows copied by the thread pool (candle's strided copy runs on the calling thread alone:
//! issue 21); elsewhere reshape and transpose.
use super::cpu::{par_build, slice, Float};
use super::reference::{cpu_f64, cpu_from_f64};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// `[B, T, H·D]` → `[B, H, T, D]`, contiguous: a projection's output in the attention layout.
/// On CUDA one permutation kernel (candle's strided copy of a transpose is ~15× slower there).
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, c) = x.dims3()?;
    if heads == 0 || c % heads != 0 {
        candle_core::bail!("split_heads: {c} channels do not split into {heads} heads");
    }
    let d = c / heads;
    if super::cuda_applies(x) || super::cpu_applies(x) {
        return permute_heads(x, b, t, heads, d, true);
    }
    x.reshape((b, t, heads, d))?.transpose(1, 2)?.contiguous()
}

/// A projection's output `x: [B, T, heads·D]` as attention heads `[B, heads, T, D]`, rotated
/// when `rope` gives `(cos, sin)`: the values of `rope(split_heads(x))`, recorded through x's
/// producer ([`super::through`]), so that neither x nor the split copy is kept for the backward.
pub fn projection_heads(x: &Tensor, heads: usize, rope: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
    let split = split_heads(&x.detach(), heads)?;
    let y = match rope {
        Some((cos, sin)) => super::rope(&split, cos, sin)?,
        None => split,
    };
    if !x.track_op() {
        return Ok(y);
    }
    let tables = rope.map(|(c, s)| (c.detach(), s.detach()));
    let adjoint: super::through::Adjoint = std::sync::Arc::new(move |g: &Tensor| {
        let g = match &tables {
            Some((cos, sin)) => super::rope::rope_adjoint(g, cos, sin)?,
            None => g.clone(),
        };
        merge_heads(&g)
    });
    Ok(super::through::record_through(&y, x, adjoint))
}

/// `[B, H, T, D]` → `[B, T, H·D]`, the inverse of [`split_heads`].
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    if super::cuda_applies(x) || super::cpu_applies(x) {
        return permute_heads(x, b, t, h, d, false);
    }
    x.transpose(1, 2)?.reshape((b, t, h * d))
}

/// `[B, T, H·D]` → `[B, H, T, D]` (`to_heads`) or `[B, H, T, D]` → `[B, T, H·D]`: the attention
/// layout of a projection's output and back, one pass instead of candle's strided copy.
fn permute_heads(x: &Tensor, b: usize, t: usize, h: usize, d: usize, to_heads: bool) -> Result<Tensor> {
    if x.elem_count() != b * t * h * d {
        candle_core::bail!("permute_heads: {:?} is not {b}×{t}×{h}×{d}", x.dims());
    }
    x.contiguous()?.apply_op1(PermuteHeads { b, t, h, d, to_heads })
}

/// See [`permute_heads`]; the backward is the inverse permutation.
#[derive(Debug, Clone, Copy)]
struct PermuteHeads {
    b: usize,
    t: usize,
    h: usize,
    d: usize,
    to_heads: bool,
}

impl PermuteHeads {
    fn out_shape(&self) -> Shape {
        if self.to_heads {
            Shape::from((self.b, self.h, self.t, self.d))
        } else {
            Shape::from((self.b, self.t, self.h * self.d))
        }
    }

    /// The permuted copy of `x`, rows of d elements copied by the pool (~64 KiB per task).
    fn copy_rows<T: Float>(&self, x: &[T]) -> Vec<T> {
        let d = self.d.max(1);
        par_build(x.len(), ((1 << 14) / d).max(1) * d, |at, y| {
            for (i, out) in y.chunks_mut(d).enumerate() {
                let src = self.source_row(at / d + i);
                out.copy_from_slice(&x[src * d..][..d]);
            }
        })
    }

    /// The source row of output row `row` (rows of d elements).
    fn source_row(&self, row: usize) -> usize {
        let (b, t, h) = (self.b, self.t, self.h);
        debug_assert!(row < b * t * h);
        if self.to_heads {
            let (ti, hi, bi) = (row % t, (row / t) % h, row / (t * h));
            (bi * t + ti) * h + hi
        } else {
            let (hi, ti, bi) = (row % h, (row / h) % t, row / (h * t));
            (bi * h + hi) * t + ti
        }
    }
}

impl CustomOp1 for PermuteHeads {
    fn name(&self) -> &'static str {
        "permute-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        match s.dtype() {
            DType::F32 => {
                return Ok((
                    CpuStorage::F32(self.copy_rows(slice::<f32>(s, l, "permute_heads input")?)),
                    self.out_shape(),
                ))
            }
            DType::F64 => {
                return Ok((
                    CpuStorage::F64(self.copy_rows(slice::<f64>(s, l, "permute_heads input")?)),
                    self.out_shape(),
                ))
            }
            _ => {}
        }
        // Other dtypes: values pass through f64 unchanged (every bf16/f16 is exact in f64).
        let x = cpu_f64(s, l, "permute_heads input")?;
        let d = self.d;
        let mut y = vec![0f64; x.len()];
        for (row, out) in y.chunks_mut(d).enumerate() {
            let src = self.source_row(row);
            out.copy_from_slice(&x[src * d..(src + 1) * d]);
        }
        Ok((cpu_from_f64(s.dtype(), y)?, self.out_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let inputs = [(s, l, "permute_heads input")];
        Ok((cuda::heads(&inputs, self.b, self.t, self.h, self.d, self.to_heads)?, self.out_shape()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let inverse = PermuteHeads { to_heads: !self.to_heads, ..*self };
        Ok(Some(grad.contiguous()?.apply_op1(inverse)?))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::super::cuda::{grid, launch, pack, Input, Kernel};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
    use candle_core::{CudaStorage, Result};

    /// `HeadsParams` in `kernels/layout.cu`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    struct HeadsParams {
        b: u32,
        t: u32,
        h: u32,
        d: u32,
        to_heads: u32,
        vec: u32,
    }
    // SAFETY: plain-old-data with the kernel's C layout.
    unsafe impl DeviceRepr for HeadsParams {}

    /// `heads` on x: rows of `d` between `[b, t, h, d]` and `[b, h, t, d]`.
    pub(super) fn heads(
        inputs: &[Input<'_>],
        b: usize,
        t: usize,
        h: usize,
        d: usize,
        to_heads: bool,
    ) -> Result<CudaStorage> {
        let n = inputs[0].1.shape().elem_count();
        let dtype = inputs[0].0.dtype();
        let vec = d.is_multiple_of(pack(dtype));
        let items = n / if vec { pack(dtype) } else { 1 };
        let u32_of = |v: usize| u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("heads: {v} too large")));
        let params = HeadsParams {
            b: u32_of(b)?,
            t: u32_of(t)?,
            h: u32_of(h)?,
            d: u32_of(d)?,
            to_heads: to_heads as u32,
            vec: vec as u32,
        };
        launch(Kernel::Layout, "heads", grid(items), params, inputs, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{max_diff, value_and_grads};
    use candle_core::Device;

    /// The CPU implementation of the head permutation (f32/f64: rows copied by the pool, several
    /// tasks for the larger shape; the kernel's reference) against reshape/transpose, both ways,
    /// and its gradient (the inverse permutation).
    #[test]
    fn permute_heads_is_the_transpose() -> Result<()> {
        for (dtype, (b, t, h, d)) in [(DType::F64, (2, 3, 4, 6)), (DType::F32, (2, 70, 5, 64))] {
            let x = Tensor::randn(0f32, 1.0, (b, t, h * d), &Device::Cpu)?.to_dtype(dtype)?;
            let want = x.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous()?;
            let got = permute_heads(&x, b, t, h, d, true)?;
            assert_eq!(max_diff(&got, &want)?, 0.0);
            assert_eq!(max_diff(&split_heads(&x, h)?, &want)?, 0.0);
            let back = permute_heads(&got, b, t, h, d, false)?;
            assert_eq!(max_diff(&back, &x)?, 0.0);
            assert_eq!(max_diff(&merge_heads(&got)?, &x)?, 0.0);
            let w = Tensor::randn(0f32, 1.0, (b, h, t, d), &Device::Cpu)?.to_dtype(dtype)?;
            let (_, g) =
                value_and_grads(std::slice::from_ref(&x), &|xs| permute_heads(&xs[0], b, t, h, d, true)?.mul(&w))?;
            let (_, g_ref) = value_and_grads(&[x], &|xs| xs[0].reshape((b, t, h, d))?.transpose(1, 2)?.mul(&w))?;
            assert_eq!(max_diff(&g[0], &g_ref[0])?, 0.0);
        }
        Ok(())
    }
}
