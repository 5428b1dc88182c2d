//! RMSNorm (frozen weight) and SwiGLU as one multithreaded CPU op per direction (f32/f64).
//!
//! Composed from candle primitives, Llama's RMSNorm runs six serial ops forward (`sqr`, the mean,
//! `affine`, `sqrt`, two broadcasts) and about fifteen backward, and SwiGLU's `silu(gate) · up`
//! runs five ops backward (`neg`, `exp`, `affine`, `recip`, products), each writing a `[B·T, C]`
//! temporary and several kept alive for the backward: on SmolLM2-135M (8 × 64 tokens, 1 thread)
//! candle's elementwise backward of these was ~20 % of a training step (issue 21).
//!
//! Each forward evaluates the composed path's expressions in its order, so its values are bit for
//! bit those of the composed path (the tests check it): RMSNorm sums a row as candle does
//! (`layer_norm::row_sum`), then `· (1/C)`, `+ eps`, `sqrt`, `x / rms · w`; SwiGLU is candle's
//! `silu` (`x / (1 + e^−x)`) times `up`. The SwiGLU backward is candle's composed backward
//! element by element (`σ = 1 / (e^−x + 1)`, `silu' = σ · (1 − silu) + silu`), so it is bit for bit
//! too; the RMSNorm backward is the closed form `dx = (ĝ − x̂ · mean(ĝ x̂)) / rms` with
//! `ĝ = dy · w`, `x̂ = x / rms`, equal to the composed one up to rounding (the tests bound it).
//! Kept for the backward: RMSNorm its input; SwiGLU its two inputs (the composed path also kept
//! `silu(gate)` and `σ`).
use super::layer_norm::{slice, tensor_vec, Float};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// Elements per rayon task of the elementwise SwiGLU (64 KiB of f32).
const CHUNK: usize = 1 << 14;
/// Rows per rayon task of RMSNorm (C = 576 for SmolLM2: 36 KiB of f32 per task).
const ROWS: usize = 16;

/// Whether the CPU ops here apply to `x`: a CPU f32/f64 tensor.
pub(crate) fn applies(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// RMSNorm of `x: [.., C]` with a frozen `weight: [C]` of x's dtype, kept out of the graph.
pub(crate) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let c = x.dim(D::Minus1)?;
    if c == 0 || weight.dims() != [c] || weight.dtype() != x.dtype() {
        candle_core::bail!(
            "rms_norm: weight must be [{c}] {:?}, got {:?} {:?}",
            x.dtype(),
            weight.dims(),
            weight.dtype()
        );
    }
    x.contiguous()?.apply_op1(CpuRmsNorm { weight: weight.contiguous()?.detach(), eps })
}

/// `silu(gate) · up`, both `[..]` of one shape and dtype, differentiable in both.
pub(crate) fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dims() != up.dims() || gate.dtype() != up.dtype() {
        candle_core::bail!(
            "swiglu: gate {:?} {:?} and up {:?} {:?} differ",
            gate.dims(),
            gate.dtype(),
            up.dims(),
            up.dtype()
        );
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, CpuSwiglu)
}

#[derive(Debug, Clone)]
struct CpuRmsNorm {
    weight: Tensor,
    eps: f64,
}

/// `dx` from `(x, dy)`; holds the frozen weight (no backward of its own).
#[derive(Debug, Clone)]
struct CpuRmsNormGrad {
    weight: Tensor,
    eps: f64,
}

struct CpuSwiglu;

/// `(d gate, d up)` stacked as `[2, ..]` from `(gate, up, dy)` (no backward of its own).
struct CpuSwigluGrad;

/// One row's rms, `sqrt(Σx² · (1/C) + eps)`, in the composed path's order; `sq` is scratch.
fn row_rms<T: Float>(x: &[T], sq: &mut [T], inv_c: T, eps: T) -> T {
    for (s, &v) in sq.iter_mut().zip(x) {
        *s = v.mul(v);
    }
    let mean = T::row_sum(sq).mul(inv_c) + T::default();
    (mean.mul(T::from_f64(1.0)) + eps).sqrt()
}

impl CpuRmsNorm {
    fn fwd<T: Float>(&self, s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
        let x = slice::<T>(s, l, "rms_norm input")?;
        let w = tensor_vec::<T>(&self.weight, "rms_norm weight")?;
        let c = w.len();
        let (inv_c, eps) = (T::from_f64(1.0 / c as f64), T::from_f64(self.eps));
        let mut y = vec![T::default(); x.len()];
        y.par_chunks_mut(c * ROWS).zip(x.par_chunks(c * ROWS)).for_each(|(y, x)| {
            for (y, x) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
                // y is the scratch for the squares until it holds the output.
                let rms = row_rms(x, y, inv_c, eps);
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(&w) {
                    *y = x.div(rms).mul(w);
                }
            }
        });
        Ok(T::storage(y))
    }
}

impl CustomOp1 for CpuRmsNorm {
    fn name(&self) -> &'static str {
        "cpu-rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let c = self.weight.elem_count();
        if l.shape().dims().last() != Some(&c) {
            candle_core::bail!("rms_norm: input {:?} does not end in {c}", l.shape());
        }
        let out = match s.dtype() {
            DType::F32 => self.fwd::<f32>(s, l)?,
            DType::F64 => self.fwd::<f64>(s, l)?,
            other => candle_core::bail!("rms_norm: unsupported dtype {other:?}"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = CpuRmsNormGrad { weight: self.weight.clone(), eps: self.eps };
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &op)?))
    }
}

impl CpuRmsNormGrad {
    fn bwd<T: Float>(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<CpuStorage> {
        let (x, g) = (slice::<T>(xs, xl, "rms_norm input")?, slice::<T>(gs, gl, "rms_norm gradient")?);
        let w = tensor_vec::<T>(&self.weight, "rms_norm weight")?;
        let c = w.len();
        let (inv_c, eps) = (T::from_f64(1.0 / c as f64), T::from_f64(self.eps));
        let mut dx = vec![T::default(); x.len()];
        let tasks = dx.par_chunks_mut(c * ROWS).zip(x.par_chunks(c * ROWS).zip(g.par_chunks(c * ROWS)));
        tasks.for_each(|(dx, (x, g))| {
            let mut gw = vec![T::default(); c];
            for ((dx, x), g) in dx.chunks_exact_mut(c).zip(x.chunks_exact(c)).zip(g.chunks_exact(c)) {
                let rms = row_rms(x, &mut gw, inv_c, eps);
                if !rms.is_finite() {
                    // An overflowed mean square: the composed backward gives NaN here, and the
                    // training loop's non-finite check depends on seeing it, not 0.
                    dx.fill(T::from_f64(f64::NAN));
                    continue;
                }
                // dx holds x̂ = x / rms, gw holds dy · w.
                let mut sum_gx = T::default();
                for (((gw, xh), (&x, &g)), &w) in gw.iter_mut().zip(dx.iter_mut()).zip(x.iter().zip(g)).zip(&w) {
                    *xh = x.div(rms);
                    *gw = g.mul(w);
                    sum_gx = sum_gx + gw.mul(*xh);
                }
                let mean_gx = sum_gx.mul(inv_c);
                for (dx, &gw) in dx.iter_mut().zip(&gw) {
                    *dx = (gw - dx.mul(mean_gx)).div(rms);
                }
            }
        });
        Ok(T::storage(dx))
    }
}

impl CustomOp2 for CpuRmsNormGrad {
    fn name(&self) -> &'static str {
        "cpu-rms-norm-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("rms_norm backward: input {:?} and gradient {:?} differ", l1.shape(), l2.shape());
        }
        let out = match s1.dtype() {
            DType::F32 => self.bwd::<f32>(s1, l1, s2, l2)?,
            DType::F64 => self.bwd::<f64>(s1, l1, s2, l2)?,
            other => candle_core::bail!("rms_norm backward: unsupported dtype {other:?}"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// candle's `silu` of one element: `x / (1 + e^−x)`.
#[inline]
fn silu<T: Float>(x: T) -> T {
    x.div(T::from_f64(1.0) + x.neg().exp())
}

fn swiglu_fwd<T: Float>(a: &[T], u: &[T]) -> Vec<T> {
    let mut y = vec![T::default(); a.len()];
    y.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK).zip(u.par_chunks(CHUNK))).for_each(|(y, (a, u))| {
        for ((y, &a), &u) in y.iter_mut().zip(a).zip(u) {
            *y = silu(a).mul(u);
        }
    });
    y
}

/// `[d gate | d up]`, each step as candle's composed backward of `gate.silu()?.mul(up)`:
/// `d up = dy · silu`, `d gate = (dy · up) · (σ · (silu · −1 + 1) + silu)`, `σ = 1 / (e^−x + 1)`.
fn swiglu_bwd<T: Float>(a: &[T], u: &[T], g: &[T]) -> Vec<T> {
    let n = a.len();
    let mut out = vec![T::default(); 2 * n];
    let (d_gate, d_up) = out.split_at_mut(n);
    let inputs = a.par_chunks(CHUNK).zip(u.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)));
    let outputs = d_gate.par_chunks_mut(CHUNK).zip(d_up.par_chunks_mut(CHUNK));
    outputs.zip(inputs).for_each(|((dg, du), (a, (u, g)))| {
        for ((dg, du), ((&a, &u), &g)) in dg.iter_mut().zip(du.iter_mut()).zip(a.iter().zip(u).zip(g)) {
            let one = T::from_f64(1.0);
            let e = a.neg().exp();
            let sl = a.div(one + e);
            let sigmoid = one.div(e.mul(one) + one);
            let silu_grad = sigmoid.mul(sl.mul(T::from_f64(-1.0)) + one) + sl;
            *dg = g.mul(u).mul(silu_grad);
            *du = g.mul(sl);
        }
    });
    out
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
        let mut dims = vec![2];
        dims.extend_from_slice(l1.dims());
        Ok((out, Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::norm::rms_norm_composed;
    use crate::ops::testing::check_grad;
    use candle_core::{Device, Var};

    fn bits(t: &Tensor) -> Result<Vec<u64>> {
        let v = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        Ok(v.iter().map(|v| v.to_bits()).collect())
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
        (a - b)?.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()
    }

    #[test]
    fn rms_norm_forward_is_the_composed_path_bit_for_bit_and_gradients_agree() -> Result<()> {
        let dev = Device::Cpu;
        // C = 576 (SmolLM2: whole blocks of 32) and 45 (a tail); 37 rows (a partial task).
        for c in [576, 45] {
            for dtype in [DType::F32, DType::F64] {
                let x0 = Tensor::randn(0.3f64, 2.0, (37, c), &dev)?.to_dtype(dtype)?;
                let w = Tensor::randn(1f64, 0.2, c, &dev)?.to_dtype(dtype)?;
                let dy = Tensor::randn(0f64, 1.0, (37, c), &dev)?.to_dtype(dtype)?;
                let x = Var::from_tensor(&x0)?;
                let fused = rms_norm(x.as_tensor(), &w, 1e-5)?;
                let composed = rms_norm_composed(x.as_tensor(), &w, 1e-5)?;
                assert!(bits(&fused)? == bits(&composed)?, "c {c} {dtype:?} forward");
                let gf = fused.mul(&dy)?.sum_all()?.backward()?;
                let gc = composed.mul(&dy)?.sum_all()?.backward()?;
                let (gf, gc) = (gf.get(x.as_tensor()).expect("grad"), gc.get(x.as_tensor()).expect("grad"));
                let diff = max_diff(gf, gc)?;
                let tol = if dtype == DType::F32 { 2e-5 } else { 1e-12 };
                assert!(diff < tol, "c {c} {dtype:?} backward differs by {diff}");
            }
        }
        Ok(())
    }

    #[test]
    fn swiglu_is_the_composed_path_bit_for_bit_both_ways() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64] {
            // More than one chunk, odd length, gates far into both tails of the sigmoid.
            let gate = Var::from_tensor(&Tensor::randn(0f64, 6.0, (3, 20_001), &dev)?.to_dtype(dtype)?)?;
            let up = Var::from_tensor(&Tensor::randn(0f64, 1.0, (3, 20_001), &dev)?.to_dtype(dtype)?)?;
            let dy = Tensor::randn(0f64, 1.0, (3, 20_001), &dev)?.to_dtype(dtype)?;
            let fused = swiglu(gate.as_tensor(), up.as_tensor())?;
            let composed = gate.as_tensor().silu()?.mul(up.as_tensor())?;
            assert!(bits(&fused)? == bits(&composed)?, "{dtype:?} forward");
            let gf = fused.mul(&dy)?.sum_all()?.backward()?;
            let gc = composed.mul(&dy)?.sum_all()?.backward()?;
            for (name, v) in [("gate", &gate), ("up", &up)] {
                let (a, b) = (gf.get(v.as_tensor()).expect("grad"), gc.get(v.as_tensor()).expect("grad"));
                assert!(bits(a)? == bits(b)?, "{dtype:?} d {name}");
            }
        }
        Ok(())
    }

    #[test]
    fn finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f64, 1.0, 6, &dev)?;
        assert!(check_grad(&[2, 3, 6], &|x| rms_norm(x, &w, 1e-5))? < 1e-6);
        let up = Tensor::randn(0f64, 1.0, (4, 7), &dev)?;
        assert!(check_grad(&[4, 7], &|gate| swiglu(gate, &up))? < 1e-6);
        let gate = Tensor::randn(0f64, 2.0, (4, 7), &dev)?;
        assert!(check_grad(&[4, 7], &|up| swiglu(&gate, up))? < 1e-6);
        Ok(())
    }

    #[test]
    fn a_non_finite_row_gives_nan_gradients_not_zeros() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::new(&[[f32::MAX, 1.0], [1.0, 2.0]], &dev)?)?;
        let w = Tensor::ones(2, DType::F32, &dev)?;
        let g = rms_norm(x.as_tensor(), &w, 1e-5)?.sum_all()?.backward()?;
        let dx = g.get(x.as_tensor()).expect("grad").to_vec2::<f32>()?;
        assert!(dx[0].iter().all(|v| v.is_nan()), "{dx:?}");
        assert!(dx[1].iter().all(|v| v.is_finite()), "{dx:?}");
        Ok(())
    }
}
