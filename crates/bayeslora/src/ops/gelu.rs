//! GELU (exact erf form) as one CPU op per direction, multithreaded, with candle's floats.
//!
//! candle's `gelu_erf` forward is one serial pass, and its backward is ten: `sqr`, `neg`, `/ 2`,
//! `exp`, two scalings, a multiply, `erf`, two additions and the product with the gradient, each
//! writing a full-size temporary. [`GeluErf`] runs the forward and [`GeluErfGrad`] the backward
//! as one pass each over rayon chunks (the forward keeps erf(x/√2) for the backward when a graph
//! is recorded), and evaluates exactly the same f32 (or f64) expressions in
//! the same order as candle (`backprop.rs`, `Op::Unary(_, GeluErf)`), so the values are bit for
//! bit those of the composed path (the tests check it). Kept for the backward: the input, as
//! before, and the erf values (libm's `erff` was 13 % of a MiniLM training step). In f32 the
//! forward's erf runs in SIMD lanes (`ops::erf`, libm's values bit for bit).
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Elements per rayon task: large enough that scheduling is noise, small enough to spread
/// `[B·T, F]` activations over every thread.
const CHUNK: usize = 1 << 14;

/// Whether [`gelu`] takes the fused CPU path for `x`.
pub(crate) fn fused_applies(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// `x · Φ(x)` on a CPU f32/f64 tensor (any shape), differentiable.
pub(crate) fn gelu(x: &Tensor) -> Result<Tensor> {
    // erf is most of the op's cost (libm's `erff`): when a backward may follow, the forward keeps
    // its erf(x/√2) values (one more activation-sized buffer) so the backward need not redo them.
    // f32 only: there the forward's erf argument `x · FRAC_1_SQRT_2` is the backward's
    // `x · (1/√2)` bit for bit; in f64 the two constants differ in the last bit.
    let saved = (x.track_op() && x.dtype() == DType::F32).then(|| Arc::new(Mutex::new(None)));
    x.contiguous()?.apply_op1(GeluErf { saved })
}

/// Forward: `(erf(x/√2) + 1) · 0.5 · x`, candle's `UnaryOpT::f32/f64` for `GeluErf`.
#[derive(Debug, Clone)]
struct GeluErf {
    /// erf(x/√2) per element, written by the forward when a backward may follow.
    saved: Option<Arc<Mutex<Option<CpuStorage>>>>,
}

/// Backward: `g · (0.5 + 0.398942·exp(−x²/2)·x + 0.5·erf(x/√2))` (no backward of its own);
/// the erf values come from the forward when it kept them.
#[derive(Debug, Clone)]
struct GeluErfGrad {
    erf: Option<CpuStorage>,
}

#[inline]
fn fwd_f64(v: f64) -> f64 {
    (candle_core::cpu::erf::erf_f64(v * std::f64::consts::FRAC_1_SQRT_2) + 1.) * 0.5 * v
}

/// The f32 derivative of one element, each step as candle's composed backward computes it
/// (`affine(m, a)` is `v · m + a` with `m`, `a` rounded to f32).
#[inline]
fn grad_f32(x: f32, g: f32) -> f32 {
    let neg_half_square = -(x * x) * 0.5 + 0.0;
    let scaled_exp_arg = (neg_half_square.exp() * 0.398942f64 as f32 + 0.0) * x;
    let arg_scaled_sqrt = x * (1. / 2f64.sqrt()) as f32 + 0.0;
    let erf_scaled_sqrt = candle_core::cpu::erf::erf_f32(arg_scaled_sqrt) * 0.5 + 0.0;
    let gelu_erf_grad = (scaled_exp_arg * 1.0 + 0.5) + erf_scaled_sqrt;
    g * gelu_erf_grad
}

#[inline]
fn grad_f64(x: f64, g: f64) -> f64 {
    let neg_half_square = -(x * x) * 0.5 + 0.0;
    let scaled_exp_arg = (neg_half_square.exp() * 0.398942 + 0.0) * x;
    let arg_scaled_sqrt = x * (1. / 2f64.sqrt()) + 0.0;
    let erf_scaled_sqrt = candle_core::cpu::erf::erf_f64(arg_scaled_sqrt) * 0.5 + 0.0;
    let gelu_erf_grad = (scaled_exp_arg * 1.0 + 0.5) + erf_scaled_sqrt;
    g * gelu_erf_grad
}

/// [`grad_f32`] over slices with `erf(x/√2)` given (the same value: the forward's argument
/// `x · FRAC_1_SQRT_2` is the backward's `x · (1/√2)` rounded to f32), and `exp(−x²/2)` in SIMD
/// lanes (`ops::exp`, libm's values bit for bit): `y` first holds the exp's arguments.
fn grad_f32_erf_lanes(y: &mut [f32], x: &[f32], e: &[f32], g: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = -(x * x) * 0.5 + 0.0;
    }
    super::exp::exp_in_place(y);
    for (((y, &x), &e), &g) in y.iter_mut().zip(x).zip(e).zip(g) {
        let scaled_exp_arg = (*y * 0.398942f64 as f32 + 0.0) * x;
        let erf_scaled_sqrt = e * 0.5 + 0.0;
        *y = g * ((scaled_exp_arg * 1.0 + 0.5) + erf_scaled_sqrt);
    }
}

#[inline]
fn grad_f64_erf(x: f64, e: f64, g: f64) -> f64 {
    let neg_half_square = -(x * x) * 0.5 + 0.0;
    let scaled_exp_arg = (neg_half_square.exp() * 0.398942 + 0.0) * x;
    let erf_scaled_sqrt = e * 0.5 + 0.0;
    g * ((scaled_exp_arg * 1.0 + 0.5) + erf_scaled_sqrt)
}

/// The f32 forward over a slice: `e = erf(x · FRAC_1_SQRT_2)` in SIMD lanes (`ops::erf`, libm's
/// values bit for bit), then `y = (e + 1) · 0.5 · x`; `e` is returned when `keep` (for the
/// backward, else empty). The same floats as candle's `GeluErf::f32` element by element.
fn fwd_f32_lanes(x: &[f32], keep: bool) -> (Vec<f32>, Vec<f32>) {
    let work = |y: &mut [f32], e: &mut [f32], x: &[f32]| {
        for (e, &x) in e.iter_mut().zip(x) {
            *e = x * std::f32::consts::FRAC_1_SQRT_2;
        }
        super::erf::erf_in_place(e);
        for ((y, &e), &x) in y.iter_mut().zip(e.iter()).zip(x) {
            *y = (e + 1.) * 0.5 * x;
        }
    };
    if keep {
        super::cpu::par_build2(x.len(), CHUNK, |at, y, e| work(y, e, &x[at..][..y.len()]))
    } else {
        let y = super::cpu::par_build(x.len(), CHUNK, |at, y| work(y, &mut vec![0f32; y.len()], &x[at..][..y.len()]));
        (y, Vec::new())
    }
}

/// `(y, erf(x/√2))` of the forward, both kept.
fn fwd_saving<T: Copy + Send + Sync + Default>(
    x: &[T],
    erf: impl Fn(T) -> T + Sync,
    y_of: impl Fn(T, T) -> T + Sync,
) -> (Vec<T>, Vec<T>) {
    let (mut y, mut e) = (vec![T::default(); x.len()], vec![T::default(); x.len()]);
    y.par_chunks_mut(CHUNK).zip(e.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK))).for_each(|(y, (e, x))| {
        for ((y, e), &x) in y.iter_mut().zip(e.iter_mut()).zip(x) {
            *e = erf(x);
            *y = y_of(x, *e);
        }
    });
    (y, e)
}

/// `f(y, x, e, g)` on matching chunks of a new `y`, multithreaded.
fn zip3_chunks<T: Copy + Send + Sync + Default>(
    x: &[T],
    e: &[T],
    g: &[T],
    f: impl Fn(&mut [T], &[T], &[T], &[T]) + Sync,
) -> Vec<T> {
    super::cpu::par_build(x.len(), CHUNK, |at, y| {
        let n = y.len();
        f(y, &x[at..][..n], &e[at..][..n], &g[at..][..n])
    })
}

fn map<T: Copy + Send + Sync + Default>(x: &[T], f: impl Fn(T) -> T + Sync) -> Vec<T> {
    let mut y = vec![T::default(); x.len()];
    y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = f(x);
        }
    });
    y
}

fn zip_map<T: Copy + Send + Sync + Default>(x: &[T], g: &[T], f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    let mut y = vec![T::default(); x.len()];
    y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK))).for_each(|(y, (x, g))| {
        for ((y, &x), &g) in y.iter_mut().zip(x).zip(g) {
            *y = f(x, g);
        }
    });
    y
}

fn contiguous<'a, T>(x: &'a [T], layout: &Layout, what: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&x[start..end]),
        None => candle_core::bail!("gelu: {what} must be contiguous"),
    }
}

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some(saved) = &self.saved else {
            let out = match s {
                CpuStorage::F32(x) => CpuStorage::F32(fwd_f32_lanes(contiguous(x, l, "input")?, false).0),
                CpuStorage::F64(x) => CpuStorage::F64(map(contiguous(x, l, "input")?, fwd_f64)),
                other => candle_core::bail!("gelu: unsupported dtype {:?}", other.dtype()),
            };
            return Ok((out, l.shape().clone()));
        };
        // The same expressions as candle's `GeluErf::f32`/`fwd_f64`, with the erf kept.
        let (out, erf) = match s {
            CpuStorage::F32(x) => {
                let (y, e) = fwd_f32_lanes(contiguous(x, l, "input")?, true);
                (CpuStorage::F32(y), CpuStorage::F32(e))
            }
            CpuStorage::F64(x) => {
                let erf = |v: f64| candle_core::cpu::erf::erf_f64(v * std::f64::consts::FRAC_1_SQRT_2);
                let (y, e) = fwd_saving(contiguous(x, l, "input")?, erf, |v, e| (e + 1.) * 0.5 * v);
                (CpuStorage::F64(y), CpuStorage::F64(e))
            }
            other => candle_core::bail!("gelu: unsupported dtype {:?}", other.dtype()),
        };
        *saved.lock().map_err(|_| candle_core::Error::msg("gelu: lock poisoned"))? = Some(erf);
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let erf = match &self.saved {
            // Taken, not copied: a second backward through the same node recomputes erf.
            Some(saved) => saved.lock().map_err(|_| candle_core::Error::msg("gelu: lock poisoned"))?.take(),
            None => None,
        };
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &GeluErfGrad { erf })?))
    }
}

impl CustomOp2 for GeluErfGrad {
    fn name(&self) -> &'static str {
        "gelu-erf-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("gelu backward: input {:?} and gradient {:?} differ", l1.shape(), l2.shape());
        }
        let n = l1.shape().elem_count();
        let out = match (s1, s2, &self.erf) {
            (CpuStorage::F32(x), CpuStorage::F32(g), Some(CpuStorage::F32(e))) if e.len() == n => CpuStorage::F32(
                zip3_chunks(contiguous(x, l1, "input")?, e, contiguous(g, l2, "gradient")?, grad_f32_erf_lanes),
            ),
            (CpuStorage::F64(x), CpuStorage::F64(g), Some(CpuStorage::F64(e))) if e.len() == n => {
                let (x, g) = (contiguous(x, l1, "input")?, contiguous(g, l2, "gradient")?);
                CpuStorage::F64(zip3_chunks(x, e, g, |y, x, e, g| {
                    for (((y, &x), &e), &g) in y.iter_mut().zip(x).zip(e).zip(g) {
                        *y = grad_f64_erf(x, e, g);
                    }
                }))
            }
            (CpuStorage::F32(x), CpuStorage::F32(g), _) => {
                CpuStorage::F32(zip_map(contiguous(x, l1, "input")?, contiguous(g, l2, "gradient")?, grad_f32))
            }
            (CpuStorage::F64(x), CpuStorage::F64(g), _) => {
                CpuStorage::F64(zip_map(contiguous(x, l1, "input")?, contiguous(g, l2, "gradient")?, grad_f64))
            }
            (x, g, _) => candle_core::bail!("gelu backward: unsupported dtypes {:?}, {:?}", x.dtype(), g.dtype()),
        };
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::check_grad;
    use candle_core::{Device, Var};

    /// Forward values and input gradients of the fused op and of candle's `gelu_erf`, bit for bit.
    #[test]
    fn matches_candle_bit_for_bit_in_f32_and_f64() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64] {
            // More than one chunk, odd length, values across erf's regimes.
            let x0 = (Tensor::randn(0f64, 3.0, (3, 40_001), &dev)?).to_dtype(dtype)?;
            let x = Var::from_tensor(&x0)?;
            let w = Tensor::randn(0f64, 1.0, (3, 40_001), &dev)?.to_dtype(dtype)?;
            let fused = gelu(x.as_tensor())?;
            let composed = x.as_tensor().gelu_erf()?;
            let gf = fused.mul(&w)?.sum_all()?.backward()?;
            let gc = composed.mul(&w)?.sum_all()?.backward()?;
            let bits = |t: &Tensor| -> Result<Vec<u64>> {
                let t = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                Ok(t.iter().map(|v| (v + 0.0).to_bits()).collect())
            };
            assert!(bits(&fused)? == bits(&composed)?, "{dtype:?} forward");
            assert!(bits(&gelu(&x0)?)? == bits(&composed)?, "{dtype:?} forward without a graph");
            let (a, b) = (gf.get(x.as_tensor()).expect("grad"), gc.get(x.as_tensor()).expect("grad"));
            assert!(bits(a)? == bits(b)?, "{dtype:?} backward");
        }
        Ok(())
    }

    #[test]
    fn finite_differences() -> Result<()> {
        // candle's derivative rounds 1/√(2π) to 0.398942, so the tolerance is 1e-6 · |x|-ish.
        assert!(check_grad(&[4, 7], &gelu)? < 1e-6);
        Ok(())
    }
}
