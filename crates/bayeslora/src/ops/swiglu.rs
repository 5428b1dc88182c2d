//! SwiGLU's gating, `silu(gate) · up`, with a backward in both inputs.
//!
//! For f32/bf16/f16 on CUDA one kernel per direction (`kernels/swiglu.cu`, f32 math, one rounding;
//! its f64 CPU reference is [`FusedSwiglu`]'s `cpu_fwd`); for f32/f64 on the CPU one multithreaded
//! op per direction ([`CpuSwiglu`]), bit for bit `gate.silu()?.mul(up)` and candle's composed
//! backward of it, element by element (`σ = 1 / (e^−x + 1)`, `silu' = σ · (1 − silu) + silu`);
//! elsewhere that composition. Composed, the backward runs five ops (`neg`, `exp`, `affine`,
//! `recip`, products), each writing a temporary (issue 21). Kept for the backward: the two inputs.
use super::cpu::{par_build, par_build_stacked, slice, Float};
use super::reference::{cpu_f64, cpu_from_f64};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// Elements per rayon task of the CPU op (64 KiB of f32).
const CHUNK: usize = 1 << 14;

/// SwiGLU's gating, `silu(gate) · up` (same shape and dtype), differentiable in both.
///
/// For f32/bf16/f16 on CUDA one fused op per direction (f32 math, one rounding); for f32/f64 on
/// the CPU one multithreaded op per direction, bit for bit `gate.silu()?.mul(up)` and its
/// backward; elsewhere exactly that composition.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let same = up.dims() == gate.dims() && up.dtype() == gate.dtype() && up.device().same_device(gate.device());
    if super::cuda_applies(gate) && same {
        return fused(gate, up);
    }
    if super::cpu_applies(gate) && same {
        return threaded(gate, up);
    }
    gate.silu()?.mul(up)
}

/// The backward of [`swiglu`] on its own: `(d gate, d up)` for the gradient `g` of
/// `silu(gate) · up`, by the kernel or CPU op [`swiglu`]'s backward runs (so the same floats);
/// elsewhere through candle's autograd of the composition. For ops that fuse SwiGLU into
/// what follows it (`ops::residual_projection`).
pub(crate) fn swiglu_grad(gate: &Tensor, up: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
    let same = up.dims() == gate.dims() && up.dtype() == gate.dtype() && up.device().same_device(gate.device());
    let (gate, up, g) = (gate.detach(), up.detach(), g.detach());
    let both = if super::cuda_applies(&gate) && same {
        gate.contiguous()?.apply_op3_no_bwd(&up.contiguous()?, &g.contiguous()?, &SwigluGrad)?
    } else if super::cpu_applies(&gate) && same {
        gate.contiguous()?.apply_op3_no_bwd(&up.contiguous()?, &g.contiguous()?, &CpuSwigluGrad)?
    } else {
        let (gv, uv) = (candle_core::Var::from_tensor(&gate)?, candle_core::Var::from_tensor(&up)?);
        let grads = gv.as_tensor().silu()?.mul(uv.as_tensor())?.mul(&g)?.sum_all()?.backward()?;
        let pick = |v: &candle_core::Var| {
            grads.get(v.as_tensor()).cloned().ok_or_else(|| candle_core::Error::Msg("swiglu_grad: no gradient".into()))
        };
        return Ok((pick(&gv)?, pick(&uv)?));
    };
    Ok((both.get(0)?, both.get(1)?))
}

/// Refuses a gate and up of different shapes or dtypes.
fn check_pair(gate: &Tensor, up: &Tensor) -> Result<()> {
    if gate.dims() != up.dims() || gate.dtype() != up.dtype() {
        candle_core::bail!(
            "swiglu: gate {:?} {:?} and up {:?} {:?} differ",
            gate.dims(),
            gate.dtype(),
            up.dims(),
            up.dtype()
        );
    }
    Ok(())
}

/// The CUDA op: `silu(gate) · up` (same shape and dtype), differentiable in both.
fn fused(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    check_pair(gate, up)?;
    gate.contiguous()?.apply_op2(&up.contiguous()?, FusedSwiglu)
}

/// The CPU op: `silu(gate) · up`, both `[..]` of one shape and dtype, differentiable in both.
fn threaded(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    check_pair(gate, up)?;
    gate.contiguous()?.apply_op2(&up.contiguous()?, CpuSwiglu)
}

/// `y = silu(gate) · up`.
#[derive(Debug, Clone, Copy)]
struct FusedSwiglu;

/// `[d_gate; d_up]` stacked on a new leading dim of 2, from (gate, up, g); no backward of its own.
#[derive(Debug, Clone, Copy)]
struct SwigluGrad;

impl CustomOp2 for FusedSwiglu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (a, u) = (cpu_f64(s1, l1, "swiglu gate")?, cpu_f64(s2, l2, "swiglu up")?);
        let y = a.iter().zip(&u).map(|(a, u)| a / (1.0 + (-a).exp()) * u).collect();
        Ok((cpu_from_f64(s1.dtype(), y)?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = cuda::swiglu(&[(s1, l1, "swiglu gate"), (s2, l2, "swiglu up")], "swiglu_fwd", 1)?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &SwigluGrad)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

impl CustomOp3 for SwigluGrad {
    fn name(&self) -> &'static str {
        "swiglu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, u) = (cpu_f64(s1, l1, "swiglu gate")?, cpu_f64(s2, l2, "swiglu up")?);
        let g = cpu_f64(s3, l3, "swiglu gradient")?;
        let sig: Vec<f64> = a.iter().map(|a| 1.0 / (1.0 + (-a).exp())).collect();
        let d_gate = (0..a.len()).map(|i| g[i] * u[i] * sig[i] * (1.0 + a[i] * (1.0 - sig[i])));
        let d_up = (0..a.len()).map(|i| g[i] * a[i] * sig[i]);
        Ok((cpu_from_f64(s1.dtype(), d_gate.chain(d_up).collect())?, stacked_shape(l1)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let inputs = [(s1, l1, "swiglu gate"), (s2, l2, "swiglu up"), (s3, l3, "swiglu gradient")];
        Ok((cuda::swiglu(&inputs, "swiglu_bwd", 2)?, stacked_shape(l1)))
    }
}

/// `[2, ..shape]`: the two gradients of SwiGLU in one buffer.
fn stacked_shape(l: &Layout) -> Shape {
    let mut dims = vec![2];
    dims.extend_from_slice(l.dims());
    Shape::from(dims)
}

/// The multithreaded CPU forward (f32/f64), bit for bit the composed path.
struct CpuSwiglu;

/// `(d gate, d up)` stacked as `[2, ..]` from `(gate, up, dy)` (no backward of its own).
struct CpuSwigluGrad;

/// candle's `silu` of one element: `x / (1 + e^−x)`.
#[inline]
/// `silu(a) · u`, silu as candle's `a / (1 + e^−a)`.
fn swiglu_fwd<T: Float>(a: &[T], u: &[T]) -> Vec<T> {
    par_build(a.len(), CHUNK, |at, y| {
        let (a, u) = (&a[at..][..y.len()], &u[at..][..y.len()]);
        // y holds e^−a (f32: in SIMD lanes, `ops::exp`) until it holds the output.
        y.iter_mut().zip(a).for_each(|(y, &a)| *y = a.neg());
        T::exp_in_place(y);
        for ((y, &a), &u) in y.iter_mut().zip(a).zip(u) {
            *y = a.div(T::from_f64(1.0) + *y).mul(u);
        }
    })
}

/// `[d gate | d up]`, each step as candle's composed backward of `gate.silu()?.mul(up)`:
/// `d up = dy · silu`, `d gate = (dy · up) · (σ · (silu · −1 + 1) + silu)`, `σ = 1 / (e^−x + 1)`.
fn swiglu_bwd<T: Float>(a: &[T], u: &[T], g: &[T]) -> Vec<T> {
    par_build_stacked(a.len(), CHUNK, |at, dg, du| {
        let (a, u, g) = (&a[at..][..dg.len()], &u[at..][..dg.len()], &g[at..][..dg.len()]);
        // dg holds e^−a (f32: in SIMD lanes, `ops::exp`) until it holds d gate.
        dg.iter_mut().zip(a).for_each(|(dg, &a)| *dg = a.neg());
        T::exp_in_place(dg);
        for ((dg, du), ((&a, &u), &g)) in dg.iter_mut().zip(du.iter_mut()).zip(a.iter().zip(u).zip(g)) {
            let one = T::from_f64(1.0);
            let e = *dg;
            let sl = a.div(one + e);
            let sigmoid = one.div(e.mul(one) + one);
            let silu_grad = sigmoid.mul(sl.mul(T::from_f64(-1.0)) + one) + sl;
            *dg = g.mul(u).mul(silu_grad);
            *du = g.mul(sl);
        }
    })
}

impl CustomOp2 for CpuSwiglu {
    fn name(&self) -> &'static str {
        "cpu-swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("swiglu: gate {:?} and up {:?} differ", l1.shape(), l2.shape());
        }
        let out = match s1.dtype() {
            DType::F32 => {
                CpuStorage::F32(swiglu_fwd::<f32>(slice(s1, l1, "swiglu gate")?, slice(s2, l2, "swiglu up")?))
            }
            DType::F64 => {
                CpuStorage::F64(swiglu_fwd::<f64>(slice(s1, l1, "swiglu gate")?, slice(s2, l2, "swiglu up")?))
            }
            other => candle_core::bail!("swiglu: unsupported dtype {other:?}"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &CpuSwigluGrad)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

impl CustomOp3 for CpuSwigluGrad {
    fn name(&self) -> &'static str {
        "cpu-swiglu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() || l1.shape() != l3.shape() {
            candle_core::bail!("swiglu backward: shapes {:?}, {:?}, {:?} differ", l1.shape(), l2.shape(), l3.shape());
        }
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(swiglu_bwd::<f32>(
                slice(s1, l1, "swiglu gate")?,
                slice(s2, l2, "swiglu up")?,
                slice(s3, l3, "swiglu gradient")?,
            )),
            DType::F64 => CpuStorage::F64(swiglu_bwd::<f64>(
                slice(s1, l1, "swiglu gate")?,
                slice(s2, l2, "swiglu up")?,
                slice(s3, l3, "swiglu gradient")?,
            )),
            other => candle_core::bail!("swiglu backward: unsupported dtype {other:?}"),
        };
        Ok((out, stacked_shape(l1)))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::super::cuda::{grid, launch, pack, Input, Kernel};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
    use candle_core::{CudaStorage, Result};

    /// `SwigluParams` in `kernels/swiglu.cu`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    struct SwigluParams {
        n: u64,
        vec: u32,
        pad: u32,
    }
    // SAFETY: plain-old-data with the kernel's C layout.
    unsafe impl DeviceRepr for SwigluParams {}

    /// `swiglu_fwd` (gate, up) → y, or `swiglu_bwd` (gate, up, g) → [d_gate; d_up] (`outputs` 2).
    pub(super) fn swiglu(inputs: &[Input<'_>], entry: &str, outputs: usize) -> Result<CudaStorage> {
        let n = inputs[0].1.shape().elem_count();
        let vec = n.is_multiple_of(pack(inputs[0].0.dtype()));
        let items = if vec { n / pack(inputs[0].0.dtype()) } else { n };
        launch(
            Kernel::Swiglu,
            entry,
            grid(items),
            SwigluParams { n: n as u64, vec: vec as u32, pad: 0 },
            inputs,
            n * outputs,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{bits, check_grad, matches_composed};
    use candle_core::{Device, Var};

    #[test]
    fn swiglu_gradient_and_cpu_floats() -> Result<()> {
        let dev = Device::Cpu;
        let up = Tensor::randn(0f64, 1.0, (4, 7), &dev)?;
        assert!(check_grad(&[4, 7], &|gate| swiglu(gate, &up))? < 1e-6);
        let gate = Tensor::randn(0f64, 2.0, (4, 7), &dev)?;
        assert!(check_grad(&[4, 7], &|up| swiglu(&gate, up))? < 1e-6);
        // the CPU path is the composition, bit for bit
        let (gate, up) = (gate.to_dtype(DType::F32)?, up.to_dtype(DType::F32)?);
        let got = swiglu(&gate, &up)?.flatten_all()?.to_vec1::<f32>()?;
        let want = gate.silu()?.mul(&up)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
        Ok(())
    }

    /// The CUDA op's f64 CPU reference against the composed op and finite differences.
    #[test]
    fn reference_matches_the_composed_op_and_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let (a, u) = (Tensor::randn(0f64, 2.0, (3, 7), &dev)?, Tensor::randn(0f64, 1.0, (3, 7), &dev)?);
        let err = matches_composed(&[a, u], &|t| fused(&t[0], &t[1]), &|t| t[0].silu()?.mul(&t[1]))?;
        assert!(err < 1e-12, "swiglu {err}");
        let up = Tensor::randn(0f64, 1.0, (4, 7), &dev)?;
        assert!(check_grad(&[4, 7], &|g| fused(g, &up))? < 1e-6);
        let gate = Tensor::randn(0f64, 2.0, (4, 7), &dev)?;
        assert!(check_grad(&[4, 7], &|u| fused(&gate, u))? < 1e-6);
        Ok(())
    }

    #[test]
    fn cpu_op_is_the_composed_path_bit_for_bit_both_ways() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64] {
            // More than one chunk, odd length, gates far into both tails of the sigmoid.
            let gate = Var::from_tensor(&Tensor::randn(0f64, 6.0, (3, 20_001), &dev)?.to_dtype(dtype)?)?;
            let up = Var::from_tensor(&Tensor::randn(0f64, 1.0, (3, 20_001), &dev)?.to_dtype(dtype)?)?;
            let dy = Tensor::randn(0f64, 1.0, (3, 20_001), &dev)?.to_dtype(dtype)?;
            let fused = threaded(gate.as_tensor(), up.as_tensor())?;
            let composed = gate.as_tensor().silu()?.mul(up.as_tensor())?;
            assert!(bits(&fused)? == bits(&composed)?, "{dtype:?} forward");
            let gf = fused.mul(&dy)?.sum_all()?.backward()?;
            let gc = composed.mul(&dy)?.sum_all()?.backward()?;
            for (name, v) in [("gate", &gate), ("up", &up)] {
                let (a, b) = (gf.get(v.as_tensor()).expect("grad"), gc.get(v.as_tensor()).expect("grad"));
                assert!(bits(a)? == bits(b)?, "{dtype:?} d {name}");
            }
        }
        let up = Tensor::randn(0f64, 1.0, (4, 7), &dev)?;
        assert!(check_grad(&[4, 7], &|gate| threaded(gate, &up))? < 1e-6);
        let gate = Tensor::randn(0f64, 2.0, (4, 7), &dev)?;
        assert!(check_grad(&[4, 7], &|up| threaded(&gate, up))? < 1e-6);
        Ok(())
    }
}
