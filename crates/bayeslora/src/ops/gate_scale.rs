//! Rows scaled by a vector times a window of gate samples, as one op per direction for CPU and
//! CUDA tensors, whose backward hands the gates' gradient over ([`GateGrads`]): B-LoRA's
//! `h ⊙ (E ⊙ m)`, m the rank multiplier that `layer_gates_at` puts at the front of a layer's
//! samples.
//!
//! As candle ops (`e.mul(m)`, `h.broadcast_mul(..)`) this cost two launches forward and, backward,
//! two muls and a column sum for the broadcast product plus two muls for `e ⊙ m`; here it is one
//! launch each way (CUDA: `kernels/gate_scale.cu`, f32). The CPU path is those ops' floats to the
//! bit: `e·m` rounded, then `h·(e·m)`; backward `g·(e·m)` to h, the column sums of `g·h` in row
//! order from 0 (candle's CPU sum over rows), times m to E and times E to the gates. The CUDA
//! kernel sums a column with a fixed tree, so its sums differ from the CPU's in the last bits.
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};

use super::quantize::on_cpu;
use super::GateGrads;

/// `h ⊙ (e ⊙ gates[offset..offset + r])` for `h: [N, r]`, `e: [r]` and a longer vector of gate
/// samples `gates` (one dtype, f32 or f64), broadcast over h's rows: `[N, r]`. The backward gives
/// h and e their gradients (when they need them) and the gates `des ⊙ e`, des = the column sums of
/// `g ⊙ h`: handed over to `grads` unless it is the first consumer of the pass (then the whole
/// vector's gradient, zero outside the window, as [`GateGrads`] says).
pub fn scale_by_gates_at(
    h: &Tensor,
    e: &Tensor,
    gates: &Tensor,
    offset: usize,
    grads: Option<&GateGrads>,
) -> Result<Tensor> {
    let r = e.elem_count();
    let ok = h.rank() == 2
        && h.dim(1)? == r
        && e.rank() == 1
        && gates.rank() == 1
        && offset + r <= gates.elem_count()
        && h.dtype() == e.dtype()
        && e.dtype() == gates.dtype()
        && matches!(h.dtype(), DType::F32 | DType::F64);
    if !ok {
        candle_core::bail!(
            "scale_by_gates: h [N, r], e [r] and gates [≥ {offset} + r] of one float dtype, got {:?} {:?}, {:?} {:?}, {:?} {:?}",
            h.dims(),
            h.dtype(),
            e.dims(),
            e.dtype(),
            gates.dims(),
            gates.dtype()
        );
    }
    h.contiguous()?.apply_op3(&e.contiguous()?, &gates.contiguous()?, Scale { offset, grads: grads.cloned() })
}

/// [`scale_by_gates_at`]'s forward: inputs h, e and the gates; output h's shape.
struct Scale {
    offset: usize,
    grads: Option<GateGrads>,
}

/// Its backward: inputs h and the upstream gradient, with e and the gates held; output
/// `[dL/dh (N·r, when wanted), dL/de (r, when wanted), dL/d gates (`dz.0` values, the window's r
/// at `dz.1`, zeros around)]`.
struct ScaleGrad {
    e: Tensor,
    gates: Tensor,
    offset: usize,
    want: (bool, bool),
    dz: (usize, usize),
}

/// The output's parts: (dh, de, dz) lengths.
fn grad_lens(n: usize, r: usize, want: (bool, bool), dz: (usize, usize)) -> (usize, usize, usize) {
    (if want.0 { n * r } else { 0 }, if want.1 { r } else { 0 }, dz.0)
}

impl ScaleGrad {
    /// (rows N, r, the output's length), the upstream gradient checked against h.
    fn lens(&self, hl: &Layout, gl: &Layout) -> Result<(usize, usize, usize)> {
        let r = self.e.elem_count();
        let n = hl.shape().elem_count() / r.max(1);
        if gl.shape().elem_count() != hl.shape().elem_count() {
            candle_core::bail!("scale_by_gates backward: gradient {:?} for h {:?}", gl.shape(), hl.shape());
        }
        let (a, b, c) = grad_lens(n, r, self.want, self.dz);
        Ok((n, r, a + b + c))
    }
}

/// The forward on the CPU: `h[i, c]·(e[c]·z[c])`.
fn scale_cpu<T: candle_core::WithDType>(h: &[T], e: &[T], z: &[T]) -> Vec<T> {
    let es: Vec<T> = e.iter().zip(z).map(|(&a, &b)| a * b).collect();
    h.chunks(es.len().max(1)).flat_map(|row| row.iter().zip(&es).map(|(&v, &s)| v * s)).collect()
}

/// The backward on the CPU: `[g·(e·z) (when want.0), des·z (when want.1), dz: zeros with des·e at
/// dz.1]`, des[c] = Σ_i g[i, c]·h[i, c] summed in row order from 0.
fn scale_grad_cpu<T: candle_core::WithDType>(
    h: &[T],
    g: &[T],
    e: &[T],
    z: &[T],
    want: (bool, bool),
    dz: (usize, usize),
) -> Vec<T> {
    let r = e.len();
    let n = h.len() / r.max(1);
    let (n_dh, n_de, n_dz) = grad_lens(n, r, want, dz);
    let mut out = vec![T::zero(); n_dh + n_de + n_dz];
    let es: Vec<T> = e.iter().zip(z).map(|(&a, &b)| a * b).collect();
    let mut des = vec![T::zero(); r];
    for (i, (hr, gr)) in h.chunks(r.max(1)).zip(g.chunks(r.max(1))).enumerate() {
        for c in 0..r {
            if want.0 {
                out[i * r + c] = gr[c] * es[c];
            }
            des[c] += gr[c] * hr[c];
        }
    }
    for c in 0..r {
        if want.1 {
            out[n_dh + c] = des[c] * z[c];
        }
        out[n_dh + n_de + dz.1 + c] = des[c] * e[c];
    }
    out
}

impl CustomOp3 for Scale {
    fn name(&self) -> &'static str {
        "scale-by-gates"
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
        let r = l2.shape().elem_count();
        let z = &l3.narrow(0, self.offset, r)?;
        let out = on_cpu(
            self.name(),
            [(s1, l1), (s2, l2), (s3, z)],
            |[h, e, z]| Ok(scale_cpu(h, e, z)),
            |[h, e, z]| Ok(scale_cpu(h, e, z)),
        )?;
        Ok((out, l1.shape().clone()))
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
        let r = l2.shape().elem_count();
        let z = &l3.narrow(0, self.offset, r)?;
        let n = l1.shape().elem_count() / r.max(1);
        let shape = cuda::Shape { n, r, want: (false, false), dz: (0, 0) };
        let out = cuda::launch("gate_scale_fwd", &[(s1, l1), (s2, l2), (s3, z)], shape, n * r)?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        h: &Tensor,
        e: &Tensor,
        z: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let want = (h.track_op(), e.track_op());
        let returned = GateGrads::returns(self.grads.as_ref())?;
        let r = e.elem_count();
        let dz = if returned { (z.elem_count(), self.offset) } else { (r, 0) };
        let op = ScaleGrad { e: e.clone(), gates: z.clone(), offset: self.offset, want, dz };
        let out = h.apply_op2_no_bwd(&grad.contiguous()?, &op)?;
        let (n_dh, n_de, n_dz) = grad_lens(h.elem_count() / r.max(1), r, want, dz);
        let dh = if want.0 { Some(out.narrow(0, 0, n_dh)?.reshape(h.shape())?) } else { None };
        let de = if want.1 { Some(out.narrow(0, n_dh, n_de)?) } else { None };
        let dz = out.narrow(0, n_dh + n_de, n_dz)?;
        Ok((dh, de, GateGrads::route(self.grads.as_ref(), returned, self.offset, dz)?))
    }
}

impl CustomOp2 for ScaleGrad {
    fn name(&self) -> &'static str {
        "scale-by-gates-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, r, len) = self.lens(l1, l2)?;
        let (es, el) = self.e.storage_and_layout();
        let (zs, zl) = self.gates.storage_and_layout();
        let (Storage::Cpu(es), Storage::Cpu(zs)) = (&*es, &*zs) else {
            candle_core::bail!("{}: e and the gates must be on the CPU like h", self.name())
        };
        let zl = &zl.narrow(0, self.offset, r)?;
        let (want, dz) = (self.want, self.dz);
        let out = on_cpu(
            self.name(),
            [(s1, l1), (s2, l2), (es, el), (zs, zl)],
            |[h, g, e, z]| Ok(scale_grad_cpu(h, g, e, z, want, dz)),
            |[h, g, e, z]| Ok(scale_grad_cpu(h, g, e, z, want, dz)),
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
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, r, len) = self.lens(l1, l2)?;
        let (es, el) = self.e.storage_and_layout();
        let (zs, zl) = self.gates.storage_and_layout();
        let (Storage::Cuda(es), Storage::Cuda(zs)) = (&*es, &*zs) else {
            candle_core::bail!("{}: e and the gates must be on h's CUDA device", self.name())
        };
        let zl = &zl.narrow(0, self.offset, r)?;
        let shape = cuda::Shape { n, r, want: self.want, dz: self.dz };
        let out = cuda::launch("gate_scale_bwd", &[(s1, l1), (s2, l2), (es, el), (zs, zl)], shape, len)?;
        Ok((out, Shape::from(len)))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::super::cuda::{grid, launch as launch_kernel, Kernel};
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig};
    use candle_core::{CudaStorage, Layout, Result};

    /// `GateScaleParams` in `kernels/gate_scale.cu`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    struct GateScaleParams {
        n: u32,
        r: u32,
        want_dh: u32,
        want_de: u32,
        dz_len: u32,
        dz_at: u32,
    }
    // SAFETY: plain-old-data with the kernel's C layout.
    unsafe impl DeviceRepr for GateScaleParams {}

    /// Rows N and columns r of h, the wanted gradients and (length, window offset) of dz.
    pub(super) struct Shape {
        pub n: usize,
        pub r: usize,
        pub want: (bool, bool),
        pub dz: (usize, usize),
    }

    /// `gate_scale_fwd_f32(params, h, e, z, out)` over the N·r values, or
    /// `gate_scale_bwd_f32(params, h, g, e, z, out)`, a block per column (its sum a fixed tree);
    /// either writes all `out_len` values.
    pub(super) fn launch(
        entry: &str,
        inputs: &[(&CudaStorage, &Layout)],
        s: Shape,
        out_len: usize,
    ) -> Result<CudaStorage> {
        let as_u32 = |v: usize| u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{entry}: {v} past u32")));
        let params = GateScaleParams {
            n: as_u32(s.n)?,
            r: as_u32(s.r)?,
            want_dh: s.want.0 as u32,
            want_de: s.want.1 as u32,
            dz_len: as_u32(s.dz.0)?,
            dz_at: as_u32(s.dz.1)?,
        };
        let cfg = if entry.ends_with("bwd") {
            LaunchConfig { grid_dim: (params.r.max(1), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
        } else {
            grid(out_len)
        };
        let names = ["h", "second input", "third input", "gates"];
        let inputs: Vec<_> = inputs.iter().zip(names).map(|((st, l), what)| (*st, *l, what)).collect();
        launch_kernel(Kernel::GateScale, entry, cfg, params, &inputs, out_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The op is `h.broadcast_mul(&e.mul(&window)?)` forward and backward to the bit, in f32 and
    /// f64, with and without gradients for h and E (the hand-over to [`GateGrads`] is checked
    /// with the gate samples in `adapters::blora::bank`).
    #[test]
    fn equals_broadcast_mul_of_e_times_a_window() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64] {
            let h0 = Tensor::randn(0f32, 1.0, (37, 5), &dev)?.to_dtype(dtype)?;
            let e0 = Tensor::new(&[0.3f32, -1.7, 2.5, 0.0, -0.01], &dev)?.to_dtype(dtype)?;
            let z0 = Tensor::new(&[9.0f32, 1.0, 0.5, 0.0, 1.0, 0.25, -3.0, 7.0], &dev)?.to_dtype(dtype)?;
            let w = Tensor::randn(0f32, 1.0, (37, 5), &dev)?.to_dtype(dtype)?;
            for (h_var, e_var) in [(true, true), (false, true), (true, false)] {
                let run = |fused: bool| -> Result<Vec<Vec<u64>>> {
                    let (h, e, z) = (Var::from_tensor(&h0)?, Var::from_tensor(&e0)?, Var::from_tensor(&z0)?);
                    let h = if h_var { h.as_tensor().clone() } else { h0.clone() };
                    let e = if e_var { e.as_tensor().clone() } else { e0.clone() };
                    let y = if fused {
                        scale_by_gates_at(&h, &e, z.as_tensor(), 2, None)?
                    } else {
                        h.broadcast_mul(&e.mul(&z.as_tensor().narrow(0, 2, 5)?)?)?
                    };
                    let g = y.mul(&w)?.sum_all()?.backward()?;
                    let bits = |t: &Tensor| -> Result<Vec<u64>> {
                        Ok(t.flatten_all()?
                            .to_dtype(DType::F64)?
                            .to_vec1::<f64>()?
                            .iter()
                            .map(|v| v.to_bits())
                            .collect())
                    };
                    // Gradients of the vars only (candle's `mul` also stores one for a plain
                    // tensor, which no optimizer reads; the op computes none).
                    let mut out = vec![bits(&y)?];
                    for (t, var) in [(&h, h_var), (&e, e_var), (z.as_tensor(), true)] {
                        out.push(if var { g.get(t).map(bits).transpose()?.unwrap_or_default() } else { vec![] });
                    }
                    Ok(out)
                };
                let (a, b) = (run(true)?, run(false)?);
                assert_eq!(a, b, "{dtype:?}, h var {h_var}, e var {e_var}");
                assert!(a.iter().enumerate().all(|(k, v)| !v.is_empty() || (k == 1 && !h_var) || (k == 2 && !e_var)));
            }
        }
        let (h, e) = (Tensor::zeros((3, 4), DType::F32, &dev)?, Tensor::zeros(4, DType::F32, &dev)?);
        assert!(scale_by_gates_at(&h, &e, &Tensor::zeros(5, DType::F32, &dev)?, 2, None).is_err(), "past the gates");
        assert!(scale_by_gates_at(&h, &e.narrow(0, 0, 3)?, &Tensor::zeros(5, DType::F32, &dev)?, 0, None).is_err());
        Ok(())
    }
}
