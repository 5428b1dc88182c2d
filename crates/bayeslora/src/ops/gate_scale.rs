//! A vector times a window of a longer vector of gate samples, as one op per direction for CPU
//! and CUDA tensors, whose backward hands the gates' gradient over ([`GateGrads`]): B-LoRA's E
//! times the rank multiplier that `layer_gates_at` puts at the front of a layer's samples.
//!
//! As a candle `mul` of a narrow this cost the mul forward, two muls backward and the narrow's
//! backward (a zero-fill, a cat and an add into the samples' gradient); here it is one launch
//! each way (CUDA: `kernels/gate_scale.cu`, f32), the same floats as the `mul` and its backward.
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::hard_concrete::cpu_slice;
use super::GateGrads;

/// `x ⊙ gates[offset..offset + n]` for `x: [n]` and a longer vector of gate samples `gates`
/// (one dtype): B-LoRA's E times the rank multiplier that [`layer_gates_at`] put at the front
/// of a layer's samples. The backward gives `g ⊙ gates` to x (when x needs it) and `g ⊙ x` to
/// the gates: handed over to `grads` unless it is the first consumer of the pass (then the
/// whole vector's gradient, zero outside the window, as [`GateGrads`] says); one launch per
/// direction, the floats of candle's `mul` and its backward.
pub fn scale_by_gates_at(x: &Tensor, gates: &Tensor, offset: usize, grads: Option<&GateGrads>) -> Result<Tensor> {
    let n = x.elem_count();
    if x.rank() != 1 || gates.rank() != 1 || x.dtype() != gates.dtype() || offset + n > gates.elem_count() {
        candle_core::bail!(
            "scale_by_gates: x [n] and the gates a longer vector of its dtype, got {:?} {:?} and {:?} {:?} at {offset}",
            x.dims(),
            x.dtype(),
            gates.dims(),
            gates.dtype()
        );
    }
    x.contiguous()?.apply_op2(&gates.contiguous()?, Scale { offset, grads: grads.cloned() })
}

/// [`scale_by_gates_at`]'s forward: inputs x `[n]` and the gates; output `[n]`.
struct Scale {
    offset: usize,
    grads: Option<GateGrads>,
}

/// Its backward: inputs x, the gates and the upstream gradient; output `[dL/dx (n, when
/// `want_dx`), dL/d gates (`dz.0` values, the window's n at `dz.1`, zeros around)]`.
struct ScaleGrad {
    offset: usize,
    want_dx: bool,
    dz: (usize, usize),
}

impl ScaleGrad {
    /// x's length n (checked against the upstream gradient's) and the output's.
    fn lens(&self, xl: &Layout, gl: &Layout) -> Result<(usize, usize)> {
        let n = xl.shape().elem_count();
        if gl.shape().elem_count() != n {
            candle_core::bail!("scale_by_gates backward: gradient {:?} for {n} values", gl.shape());
        }
        Ok((n, if self.want_dx { n + self.dz.0 } else { self.dz.0 }))
    }
}

/// `f(x, the gates' window, upstream gradient or [])` on contiguous CPU inputs of one float
/// dtype.
fn scale_cpu(
    inputs: &[(&CpuStorage, &Layout)],
    offset: usize,
    f32_fn: impl Fn(&[f32], &[f32], &[f32]) -> Vec<f32>,
    f64_fn: impl Fn(&[f64], &[f64], &[f64]) -> Vec<f64>,
) -> Result<CpuStorage> {
    fn go<T: candle_core::WithDType>(
        inputs: &[(&CpuStorage, &Layout)],
        offset: usize,
        f: impl Fn(&[T], &[T], &[T]) -> Vec<T>,
    ) -> Result<Vec<T>> {
        let x = cpu_slice::<T>(inputs[0].0, inputs[0].1)?;
        let z = cpu_slice::<T>(inputs[1].0, inputs[1].1)?;
        let g: &[T] = match inputs.get(2) {
            Some((s, l)) => cpu_slice::<T>(s, l)?,
            None => &[],
        };
        match z.get(offset..offset + x.len()) {
            Some(z) => Ok(f(x, z, g)),
            None => candle_core::bail!("scale_by_gates: gates {offset}.. past the vector"),
        }
    }
    Ok(match inputs[0].0.dtype() {
        DType::F32 => CpuStorage::F32(go(inputs, offset, f32_fn)?),
        DType::F64 => CpuStorage::F64(go(inputs, offset, f64_fn)?),
        other => candle_core::bail!("scale_by_gates: f32 or f64, got {other:?}"),
    })
}

/// `[g ⊙ z (when want_dx), dz: zeros of `dz.0` with g ⊙ x at `dz.1`]`: the products of candle's
/// `mul` backward.
fn scale_grad_cpu<T: Copy + Default + std::ops::Mul<Output = T>>(
    x: &[T],
    z: &[T],
    g: &[T],
    want_dx: bool,
    dz: (usize, usize),
) -> Vec<T> {
    let n = x.len();
    let n_dx = if want_dx { n } else { 0 };
    let mut out = vec![T::default(); n_dx + dz.0];
    for i in 0..n {
        if want_dx {
            out[i] = g[i] * z[i];
        }
        out[n_dx + dz.1 + i] = g[i] * x[i];
    }
    out
}

impl CustomOp2 for Scale {
    fn name(&self) -> &'static str {
        "scale-by-gates"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        fn mul<T: Copy + std::ops::Mul<Output = T>>(x: &[T], z: &[T], _g: &[T]) -> Vec<T> {
            x.iter().zip(z).map(|(&a, &b)| a * b).collect()
        }
        Ok((scale_cpu(&[(s1, l1), (s2, l2)], self.offset, mul, mul)?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let n = l1.shape().elem_count();
        let out = cuda::launch_scale("gate_scale_fwd", &[(s1, l1), (s2, l2)], self.offset, false, 0, n)?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, z: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let want_dx = x.track_op();
        let returned = GateGrads::returns(self.grads.as_ref())?;
        let n = x.elem_count();
        let dz = if returned { (z.elem_count(), self.offset) } else { (n, 0) };
        let out = x.apply_op3_no_bwd(z, &grad.contiguous()?, &ScaleGrad { offset: self.offset, want_dx, dz })?;
        let n_dx = if want_dx { n } else { 0 };
        let dx = if want_dx { Some(out.narrow(0, 0, n)?) } else { None };
        let dz = out.narrow(0, n_dx, dz.0)?;
        Ok((dx, GateGrads::route(self.grads.as_ref(), returned, self.offset, dz)?))
    }
}

impl CustomOp3 for ScaleGrad {
    fn name(&self) -> &'static str {
        "scale-by-gates-grad"
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
        let (_, len) = self.lens(l1, l3)?;
        let (want, dz) = (self.want_dx, self.dz);
        let out = scale_cpu(
            &[(s1, l1), (s2, l2), (s3, l3)],
            self.offset,
            |x, z, g| scale_grad_cpu(x, z, g, want, dz),
            |x, z, g| scale_grad_cpu(x, z, g, want, dz),
        )?;
        Ok((out, Shape::from(len)))
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
        let (_, len) = self.lens(l1, l3)?;
        let inputs = [(s1, l1), (s2, l2), (s3, l3)];
        let out = cuda::launch_scale("gate_scale_bwd", &inputs, self.offset, self.want_dx, self.dz.1, len)?;
        Ok((out, Shape::from(len)))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::super::cuda::{grid, launch, Kernel};
    use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
    use candle_core::{CudaStorage, Layout, Result};

    /// `GateScaleParams` in `kernels/gate_scale.cu`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    struct GateScaleParams {
        n: u32,
        offset: u32,
        want_dx: u32,
        dz_at: u32,
        out_len: u32,
    }
    // SAFETY: plain-old-data with the kernel's C layout.
    unsafe impl DeviceRepr for GateScaleParams {}

    /// `<entry>_f32(params, x, gates, [g,] out)`: the kernel writes all `out_len` values (the
    /// backward's zeros around the gates' window too).
    pub(super) fn launch_scale(
        entry: &str,
        inputs: &[(&CudaStorage, &Layout)],
        offset: usize,
        want_dx: bool,
        dz_at: usize,
        out_len: usize,
    ) -> Result<CudaStorage> {
        let as_u32 = |v: usize| u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{entry}: {v} past u32")));
        let params = GateScaleParams {
            n: as_u32(inputs[0].1.shape().elem_count())?,
            offset: as_u32(offset)?,
            want_dx: want_dx as u32,
            dz_at: as_u32(dz_at)?,
            out_len: as_u32(out_len)?,
        };
        let names = ["x", "gates", "upstream gradient"];
        let inputs: Vec<_> = inputs.iter().zip(names).map(|((s, l), what)| (*s, *l, what)).collect();
        launch(Kernel::GateScale, entry, grid(out_len), params, &inputs, out_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The op is `x.mul(window)` forward and backward to the bit, in f32 and f64; x's gradient
    /// only when x needs one (the hand-over to [`GateGrads`] is checked with the gate samples in
    /// `adapters::blora::bank`).
    #[test]
    fn equals_mul_of_a_narrow() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64] {
            let x0 = Tensor::new(&[0.3f32, -1.7, 2.5, 0.0, -0.01], &dev)?.to_dtype(dtype)?;
            let z0 = Tensor::new(&[9.0f32, 1.0, 0.5, 0.0, 1.0, 0.25, -3.0, 7.0], &dev)?.to_dtype(dtype)?;
            let w = Tensor::new(&[1.5f32, -2.0, 0.75, 3.0, -0.5], &dev)?.to_dtype(dtype)?;
            let run = |fused: bool| -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
                let (x, z) = (Var::from_tensor(&x0)?, Var::from_tensor(&z0)?);
                let y = if fused {
                    scale_by_gates_at(x.as_tensor(), z.as_tensor(), 2, None)?
                } else {
                    x.as_tensor().mul(&z.as_tensor().narrow(0, 2, 5)?)?
                };
                let g = y.mul(&w)?.sum_all()?.backward()?;
                let host = |t: &Tensor| t.to_dtype(DType::F64)?.to_vec1::<f64>();
                let dx = g.get(x.as_tensor()).map(host).transpose()?.unwrap_or_default();
                let dz = g.get(z.as_tensor()).map(host).transpose()?.unwrap_or_default();
                Ok((host(&y)?, dx, dz))
            };
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let (a, b) = (run(true)?, run(false)?);
            assert_eq!((bits(&a.0), bits(&a.1), bits(&a.2)), (bits(&b.0), bits(&b.1), bits(&b.2)), "{dtype:?}");
            // A frozen x: no gradient for it, the gates' still.
            let z = Var::from_tensor(&z0)?;
            let g = scale_by_gates_at(&x0, z.as_tensor(), 3, None)?.sum_all()?.backward()?;
            assert!(g.get(&x0).is_none() && g.get(z.as_tensor()).is_some());
        }
        assert!(scale_by_gates_at(&Tensor::zeros(4, DType::F32, &dev)?, &Tensor::zeros(5, DType::F32, &dev)?, 2, None)
            .is_err());
        Ok(())
    }
}
