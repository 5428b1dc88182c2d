//! Inverted dropout, `x · keep / (1 − p)`, reproducible from `(seed, call site)` alone.
//!
//! Two mask sources, picked by the device of `x`:
//! - **host** (CPU tensors): the mask is drawn from a seeded `StdRng`. CPU runs, the README's
//!   demo numbers and bit-for-bit resume depend on exactly this sequence, so it stays.
//! - **counter hash** (CUDA tensors): `keep(i) = u(seed, i) ≥ p` with `u` a splitmix64 hash of
//!   the element index ([`hash_uniform`]), computed inside the kernel. Drawing the mask on the
//!   host and uploading it cost MC dropout 9–44× a plain pass on the GPU; the kernel makes a
//!   dropout pass cost one elementwise op. [`HashDropout`] also runs on the CPU (same floats),
//!   which is how the GPU tests check the kernel bit for bit.
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use std::sync::Arc;

/// Inverted dropout; identity when `p == 0`. CPU: host `StdRng` mask; CUDA: [`HashDropout`].
pub fn dropout(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    if !x.device().is_cpu() {
        return hash_dropout(x, p, seed);
    }
    let scale = 1.0 / (1.0 - p);
    if matches!(x.dtype(), DType::F32 | DType::F64) {
        // StdRng's sequence, drawn in parallel blocks (`cpu::seeded_uniform_map`).
        let keep = super::cpu::seeded_uniform_map(x.elem_count(), seed, |u| u8::from(u >= p));
        return x.contiguous()?.apply_op1(MaskMul { keep: Arc::new(keep), scale });
    }
    let mask: Vec<f32> = super::cpu::seeded_uniform_map(x.elem_count(), seed, |u| if u < p { 0.0 } else { scale });
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x.mul(&mask)
}

/// `y = x · m` with the host mask `m = keep ? 1/(1−p) : 0` (f32, as `x.mul(&mask)` computes it),
/// whose backward is the same op on the gradient. candle's `mul` kept an f32 mask tensor in the
/// graph, and its backward also computed and stored the mask's gradient `g · x`, which nothing
/// reads: one activation-sized product and buffer per dropout (issue 21).
#[derive(Debug, Clone)]
struct MaskMul {
    /// One byte per element of `x`, 1 = kept.
    keep: Arc<Vec<u8>>,
    scale: f32,
}

impl MaskMul {
    fn apply<T: candle_core::WithDType + Default>(&self, x: &[T]) -> Vec<T> {
        let (keep, scale) = (&self.keep, T::from_f64(f64::from(self.scale)));
        super::cpu::par_build(x.len(), 1 << 14, |at, y| {
            for ((y, &x), &k) in y.iter_mut().zip(&x[at..]).zip(&keep[at..]) {
                *y = x * if k == 1 { scale } else { T::zero() };
            }
        })
    }
}

impl CustomOp1 for MaskMul {
    fn name(&self) -> &'static str {
        "mask-mul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (start, end) = contiguous_range(layout, "dropout")?;
        if end - start != self.keep.len() {
            candle_core::bail!("dropout: {} elements for a mask of {}", end - start, self.keep.len());
        }
        let out = match storage {
            CpuStorage::F32(x) => CpuStorage::F32(self.apply(&x[start..end])),
            CpuStorage::F64(x) => CpuStorage::F64(self.apply(&x[start..end])),
            other => candle_core::bail!("dropout: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.apply_op1(self.clone())?))
    }
}

/// The element range of a contiguous input; `op` names the op in the error.
fn contiguous_range(layout: &Layout, op: &str) -> Result<(usize, usize)> {
    match layout.contiguous_offsets() {
        Some(range) => Ok(range),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// Dropout with the counter-hash mask on any device (the CUDA path of [`dropout`]).
pub fn hash_dropout(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        candle_core::bail!("dropout: p must be in [0, 1), got {p}");
    }
    x.contiguous()?.apply_op1(HashDropout { p, seed })
}

/// splitmix64 (Steele, Lea & Flood 2014): a bijective 64-bit mixer, the counter-based RNG here.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform in [0, 1) with 24 random bits (exact in f32) for element `index` under `seed`;
/// `kernels/dropout.cu` computes the same value.
pub fn hash_uniform(seed: u64, index: u64) -> f32 {
    (splitmix64(seed ^ splitmix64(index)) >> 40) as f32 * (1.0 / 16_777_216.0)
}

/// `y = x · keep(seed, i) / (1 − p)` on a contiguous `x`; its backward is itself applied to the
/// gradient (the same mask).
#[derive(Debug, Clone, Copy)]
pub struct HashDropout {
    p: f32,
    seed: u64,
}

impl HashDropout {
    fn scale(&self) -> f32 {
        1.0 / (1.0 - self.p)
    }
}

impl CustomOp1 for HashDropout {
    fn name(&self) -> &'static str {
        "hash-dropout"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (start, end) = contiguous_range(layout, "hash-dropout")?;
        let (p, scale, seed) = (self.p, self.scale(), self.seed);
        let keep = |i: usize| if hash_uniform(seed, i as u64) >= p { scale } else { 0.0 };
        let out = match storage {
            CpuStorage::F32(x) => CpuStorage::F32(x[start..end].iter().enumerate().map(|(i, v)| v * keep(i)).collect()),
            CpuStorage::F64(x) => {
                CpuStorage::F64(x[start..end].iter().enumerate().map(|(i, v)| v * keep(i) as f64).collect())
            }
            CpuStorage::BF16(x) => CpuStorage::BF16(
                x[start..end].iter().enumerate().map(|(i, v)| half::bf16::from_f32(v.to_f32() * keep(i))).collect(),
            ),
            CpuStorage::F16(x) => CpuStorage::F16(
                x[start..end].iter().enumerate().map(|(i, v)| half::f16::from_f32(v.to_f32() * keep(i))).collect(),
            ),
            other => candle_core::bail!("hash-dropout: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{launch_elementwise, Kernel};
        let (start, end) = contiguous_range(layout, "hash-dropout")?;
        let params = DropoutParams { n: (end - start) as u64, seed: self.seed, p: self.p, scale: self.scale() };
        let out = launch_elementwise(storage, start, end, Kernel::Dropout, params)?;
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.apply_op1(*self)?))
    }
}

/// The kernel's arguments; `struct DropoutParams` in `kernels/dropout.cu`.
#[cfg(feature = "cuda")]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct DropoutParams {
    n: u64,
    seed: u64,
    p: f32,
    scale: f32,
}

// SAFETY: plain-old-data with the same C layout as the kernel's struct.
#[cfg(feature = "cuda")]
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for DropoutParams {}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn host_mask_is_deterministic_and_scaled() -> Result<()> {
        let x = Tensor::ones((1000,), DType::F32, &Device::Cpu)?;
        let a = dropout(&x, 0.25, 7)?.to_vec1::<f32>()?;
        let b = dropout(&x, 0.25, 7)?.to_vec1::<f32>()?;
        assert_eq!(a, b);
        let zeros = a.iter().filter(|v| **v == 0.0).count();
        assert!((200..300).contains(&zeros), "{zeros}");
        assert!(a.iter().all(|v| *v == 0.0 || (*v - 4.0 / 3.0).abs() < 1e-6));
        Ok(())
    }

    /// The fused host dropout is candle's `x.mul(&mask)` bit for bit, forward and backward.
    #[test]
    fn host_dropout_is_the_mask_product_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64] {
            let x = candle_core::Var::from_tensor(&Tensor::randn(0f64, 1.0, (3, 20_001), &dev)?.to_dtype(dtype)?)?;
            let w = Tensor::randn(0f64, 1.0, (3, 20_001), &dev)?.to_dtype(dtype)?;
            let mask: Vec<f32> =
                super::super::cpu::seeded_uniform_map(x.elem_count(), 5, |u| if u < 0.1 { 0.0 } else { 1.0 / 0.9 });
            let mask = Tensor::from_vec(mask, x.shape(), &dev)?.to_dtype(dtype)?;
            let (fused, composed) = (dropout(x.as_tensor(), 0.1, 5)?, x.as_tensor().mul(&mask)?);
            let gf = fused.mul(&w)?.sum_all()?.backward()?;
            let gc = composed.mul(&w)?.sum_all()?.backward()?;
            let bits = crate::ops::testing::bits;
            assert!(bits(&fused)? == bits(&composed)?, "{dtype:?} forward");
            let (a, b) = (gf.get(x.as_tensor()).expect("grad"), gc.get(x.as_tensor()).expect("grad"));
            assert!(bits(a)? == bits(b)?, "{dtype:?} backward");
        }
        Ok(())
    }

    #[test]
    fn hash_mask_drops_p_of_the_elements_and_scales_the_rest() -> Result<()> {
        let x = Tensor::ones((20_000,), DType::F32, &Device::Cpu)?;
        let a = hash_dropout(&x, 0.1, 3)?.to_vec1::<f32>()?;
        let zeros = a.iter().filter(|v| **v == 0.0).count() as f64 / a.len() as f64;
        // binomial sd at n = 20k, p = 0.1 is 0.0021: ±5 sd
        assert!((zeros - 0.1).abs() < 0.011, "dropped fraction {zeros}");
        assert!(a.iter().all(|v| *v == 0.0 || (*v - 1.0 / 0.9).abs() < 1e-6));
        // another seed gives another mask; the same seed the same one
        let b = hash_dropout(&x, 0.1, 4)?.to_vec1::<f32>()?;
        assert_ne!(a, b);
        assert_eq!(a, hash_dropout(&x, 0.1, 3)?.to_vec1::<f32>()?);
        Ok(())
    }

    #[test]
    fn hash_mask_uniforms_are_uncorrelated_between_neighbours() {
        // lag-1 correlation of u(seed, i) over 100k indices: |r| < 5/sqrt(n) ≈ 0.016
        let u: Vec<f64> = (0..100_000u64).map(|i| hash_uniform(11, i) as f64).collect();
        let mean = u.iter().sum::<f64>() / u.len() as f64;
        let var = u.iter().map(|v| (v - mean).powi(2)).sum::<f64>();
        let cov = u.windows(2).map(|w| (w[0] - mean) * (w[1] - mean)).sum::<f64>();
        assert!((mean - 0.5).abs() < 0.005, "mean {mean}");
        assert!((cov / var).abs() < 0.016, "lag-1 correlation {}", cov / var);
    }

    #[test]
    fn hash_dropout_backward_applies_the_same_mask() -> Result<()> {
        let x = candle_core::Var::new(&[1f32, 2., 3., 4., 5., 6., 7., 8.], &Device::Cpu)?;
        let y = hash_dropout(x.as_tensor(), 0.5, 9)?;
        let w = Tensor::new(&[1f32, -1., 2., -2., 3., -3., 4., -4.], &Device::Cpu)?;
        let grads = (&y * &w)?.sum_all()?.backward()?;
        let g = grads.get(x.as_tensor()).expect("x has a gradient").to_vec1::<f32>()?;
        let yv = y.to_vec1::<f32>()?;
        let xv = x.as_tensor().to_vec1::<f32>()?;
        let wv = w.to_vec1::<f32>()?;
        for i in 0..8 {
            // dy/dx = keep_i / (1-p) = y_i / x_i
            assert!((g[i] - wv[i] * yv[i] / xv[i]).abs() < 1e-6, "element {i}: {} vs {}", g[i], wv[i] * yv[i] / xv[i]);
        }
        Ok(())
    }
}
