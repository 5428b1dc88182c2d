//! Softmax cross-entropy as one op per direction, for CUDA logits.
//!
//! The composed path (`log_softmax` then `gather`) keeps several `[N, V]` f32 tensors alive for
//! the backward — for a causal-LM loss over a 49k–152k vocabulary that is gigabytes per step.
//! [`FusedCrossEntropy`] keeps nothing but the logits it already had and three f32 per row: the
//! forward reads each row once and writes its loss (`log Σ exp x − x[label]`), max m and
//! `s = Σ exp(x − m)`; the backward ([`CrossEntropyGrad`]) reads m and s back, so it too reads
//! the row once, and writes `dx = (exp(x − m) / s − onehot) · g` straight into the gradient.
//! `ops::cross_entropy` takes it for f32/bf16/f16 logits on CUDA; the CPU keeps the composed
//! path (its floats are what CPU runs and the demo reproduce). The CPU implementations below are
//! the reference the GPU tests compare the kernels (`kernels/cross_entropy.cu`) against.
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// Whether `ops::cross_entropy` takes the fused path for these logits.
pub(crate) fn fused_applies(logits: &Tensor) -> bool {
    logits.device().is_cuda() && matches!(logits.dtype(), DType::F32 | DType::BF16 | DType::F16)
}

/// Per-row loss `[N]` (f32; f64 for f64 logits) of `logits: [N, V]` against `labels: [N]` u32 (differentiable in the
/// logits).
pub fn fused_cross_entropy_rows(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (n, _) = logits.dims2()?;
    if labels.dims1()? != n || labels.dtype() != DType::U32 {
        candle_core::bail!("cross_entropy: labels must be [{n}] u32, got {:?} {:?}", labels.dims(), labels.dtype());
    }
    logits.contiguous()?.apply_op2(&labels.contiguous()?, FusedCrossEntropy)?.get(0)
}

/// `[3, N]`: row 0 `loss[r] = log Σ_j exp x[r, j] − x[r, label_r]`, row 1 the row's max m, row 2
/// `Σ_j exp(x[r, j] − m)`; f32 (f64 for f64 logits, CPU only). Rows 1 and 2 are what the backward
/// reads instead of a second pass over the logits; [`fused_cross_entropy_rows`] returns row 0.
#[derive(Debug, Clone, Copy)]
pub struct FusedCrossEntropy;

/// `dx = (exp(x − m) / s − onehot label) · g` in the logits' dtype, with the third input
/// `[3, N]` = (g; m; s), m and s from [`FusedCrossEntropy`] (no backward of its own).
#[derive(Debug, Clone, Copy)]
pub struct CrossEntropyGrad;

/// Row statistics (max, Σ exp(x − max)) in f64 on the CPU.
fn row_stats(row: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let m = row.clone().fold(f64::NEG_INFINITY, f64::max);
    (m, row.map(|v| (v - m).exp()).sum())
}

/// The logits of a contiguous CPU storage as f64 rows.
fn cpu_rows(storage: &CpuStorage, layout: &Layout) -> Result<(Vec<f64>, usize, usize)> {
    let (n, v) = layout.shape().dims2()?;
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("cross_entropy: logits must be contiguous")
    };
    let x: Vec<f64> = match storage {
        CpuStorage::F32(x) => x[start..end].iter().map(|&v| v as f64).collect(),
        CpuStorage::F64(x) => x[start..end].to_vec(),
        CpuStorage::BF16(x) => x[start..end].iter().map(|v| v.to_f64()).collect(),
        CpuStorage::F16(x) => x[start..end].iter().map(|v| v.to_f64()).collect(),
        other => candle_core::bail!("cross_entropy: unsupported logits dtype {:?}", other.dtype()),
    };
    Ok((x, n, v))
}

fn cpu_labels(storage: &CpuStorage, layout: &Layout, n: usize, v: usize) -> Result<Vec<usize>> {
    let (start, _) = layout.contiguous_offsets().ok_or_else(|| candle_core::Error::msg("labels not contiguous"))?;
    let CpuStorage::U32(y) = storage else { candle_core::bail!("cross_entropy: labels must be u32") };
    let y: Vec<usize> = y[start..start + n].iter().map(|&y| y as usize).collect();
    if let Some(bad) = y.iter().find(|&&y| y >= v) {
        candle_core::bail!("cross_entropy: label {bad} out of range for {v} classes");
    }
    Ok(y)
}

impl CustomOp2 for FusedCrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, n, v) = cpu_rows(s1, l1)?;
        let y = cpu_labels(s2, l2, n, v)?;
        let stats: Vec<(f64, f64)> = (0..n).map(|r| row_stats(x[r * v..(r + 1) * v].iter().copied())).collect();
        let loss = stats.iter().enumerate().map(|(r, &(m, s))| m + s.ln() - x[r * v + y[r]]);
        let out: Vec<f64> = loss.chain(stats.iter().map(|p| p.0)).chain(stats.iter().map(|p| p.1)).collect();
        let out = match s1.dtype() {
            DType::F64 => CpuStorage::F64(out),
            _ => CpuStorage::F32(out.into_iter().map(|l| l as f32).collect()),
        };
        Ok((out, Shape::from((3, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, _) = l1.shape().dims2()?;
        let out = cuda::launch(s1, l1, s2, l2, None, "ce_fwd")?;
        Ok((out, Shape::from((3, n))))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // (g; m; s): the loss row's gradient (rows 1 and 2 are statistics: their gradient is
        // ignored) and the forward's statistics
        let g = grad.narrow(0, 0, 1)?.to_dtype(res.dtype())?;
        let gms = Tensor::cat(&[&g, &res.narrow(0, 1, 2)?], 0)?;
        Ok((Some(logits.apply_op3_no_bwd(labels, &gms, &CrossEntropyGrad)?), None))
    }
}

impl CustomOp3 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "cross-entropy-grad"
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
        let (x, n, v) = cpu_rows(s1, l1)?;
        let y = cpu_labels(s2, l2, n, v)?;
        if l3.shape().dims2()? != (3, n) {
            candle_core::bail!("cross_entropy grad: (g; m; s) must be [3, {n}], got {:?}", l3.dims());
        }
        let (start, _) = l3.contiguous_offsets().ok_or_else(|| candle_core::Error::msg("grad not contiguous"))?;
        let gms: Vec<f64> = match s3 {
            CpuStorage::F32(g) => g[start..start + 3 * n].iter().map(|&v| v as f64).collect(),
            CpuStorage::F64(g) => g[start..start + 3 * n].to_vec(),
            _ => candle_core::bail!("cross_entropy grad: (g; m; s) must be f32 or f64"),
        };
        let mut dx = vec![0f64; n * v];
        for r in 0..n {
            let row = &x[r * v..(r + 1) * v];
            let (gr, m, s) = (gms[r], gms[n + r], gms[2 * n + r]);
            for j in 0..v {
                let p = (row[j] - m).exp() / s;
                dx[r * v + j] = (p - if j == y[r] { 1.0 } else { 0.0 }) * gr;
            }
        }
        let out = match s1.dtype() {
            DType::F64 => CpuStorage::F64(dx),
            DType::F32 => CpuStorage::F32(dx.iter().map(|&v| v as f32).collect()),
            DType::BF16 => CpuStorage::BF16(dx.iter().map(|&v| half::bf16::from_f64(v)).collect()),
            DType::F16 => CpuStorage::F16(dx.iter().map(|&v| half::f16::from_f64(v)).collect()),
            other => candle_core::bail!("cross_entropy grad: unsupported dtype {other:?}"),
        };
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
        let (n, _) = l1.shape().dims2()?;
        if l3.shape().dims2()? != (3, n) {
            candle_core::bail!("cross_entropy grad: (g; m; s) must be [3, {n}], got {:?}", l3.dims());
        }
        let out = cuda::launch(s1, l1, s2, l2, Some((s3, l3)), "ce_bwd")?;
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::super::cuda::{contiguous_view, dtype_suffix, Kernel};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::{CudaStorage, Layout, Result};

    /// `CeParams` in `kernels/cross_entropy.cu`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    struct CeParams {
        rows: u32,
        cols: u32,
    }
    // SAFETY: plain-old-data with the kernel's C layout.
    unsafe impl DeviceRepr for CeParams {}

    /// `ce_fwd_<dtype>(p, x, labels, [loss; m; s] f32)` or, with `grad` (g; m; s),
    /// `ce_bwd_<dtype>(p, x, labels, gms, dx)`; one block of 512 threads per row.
    pub(super) fn launch(
        x: &CudaStorage,
        lx: &Layout,
        labels: &CudaStorage,
        ly: &Layout,
        grad: Option<(&CudaStorage, &Layout)>,
        entry: &str,
    ) -> Result<CudaStorage> {
        let dev = x.device().clone();
        let (n, v) = lx.shape().dims2()?;
        let params = CeParams { rows: n as u32, cols: v as u32 };
        let cfg = LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (512, 1, 1), shared_mem_bytes: 0 };
        let labels = contiguous_view::<u32>(labels, ly, "labels")?;
        let stream = dev.cuda_stream();
        macro_rules! run {
            ($ty:ty, $variant:ident) => {{
                let func = Kernel::CrossEntropy.func(&dev, &format!("{entry}_{}", dtype_suffix(x.dtype())?))?;
                let xsl = contiguous_view::<$ty>(x, lx, "logits")?;
                let mut b = stream.launch_builder(&func);
                b.arg(&params);
                b.arg(&xsl);
                b.arg(&labels);
                match grad {
                    None => {
                        // SAFETY: the kernel writes all 3·n values.
                        let loss = unsafe { dev.alloc::<f32>(3 * n)? };
                        b.arg(&loss);
                        // SAFETY: arguments match `ce_fwd_<dtype>`.
                        unsafe { b.launch(cfg) }.w()?;
                        CudaStorageSlice::F32(loss)
                    }
                    Some((g, lg)) => {
                        let gsl = contiguous_view::<f32>(g, lg, "the loss gradient and statistics")?;
                        // SAFETY: the kernel writes all n·v gradients.
                        let dx = unsafe { dev.alloc::<$ty>(n * v)? };
                        b.arg(&gsl);
                        b.arg(&dx);
                        // SAFETY: arguments match `ce_bwd_<dtype>`.
                        unsafe { b.launch(cfg) }.w()?;
                        CudaStorageSlice::$variant(dx)
                    }
                }
            }};
        }
        let slice = match x.dtype() {
            candle_core::DType::F32 => run!(f32, F32),
            candle_core::DType::BF16 => run!(half::bf16, BF16),
            candle_core::DType::F16 => run!(half::f16, F16),
            other => candle_core::bail!("cross_entropy: no CUDA kernel for {other:?}"),
        };
        Ok(CudaStorage { slice, device: dev })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fused_rows_match_the_composed_loss_and_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 3.0, (5, 11), &dev)?)?;
        let y = Tensor::new(&[0u32, 10, 3, 3, 7], &dev)?;
        let fused = fused_cross_entropy_rows(x.as_tensor(), &y)?.mean_all()?;
        let composed = super::super::cross_entropy(x.as_tensor(), &y)?;
        let (a, b) = (fused.to_scalar::<f64>()?, composed.to_dtype(DType::F64)?.to_scalar::<f64>()?);
        // the composed path computes in f32
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        let g_fused = fused.backward()?.get(x.as_tensor()).expect("grad").clone();
        let g_comp = composed.backward()?.get(x.as_tensor()).expect("grad").to_dtype(DType::F64)?;
        let diff = (g_fused - g_comp)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-6, "gradient differs by {diff}");
        Ok(())
    }

    #[test]
    fn fused_gradient_matches_finite_differences() -> Result<()> {
        let err = crate::ops::testing::check_grad(&[3, 6], &|x| {
            let y = Tensor::new(&[1u32, 5, 0], x.device())?;
            fused_cross_entropy_rows(x, &y)
        })?;
        assert!(err < 1e-6, "relative error {err}");
        Ok(())
    }

    #[test]
    fn out_of_range_labels_are_an_error() -> Result<()> {
        let x = Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?;
        let y = Tensor::new(&[0u32, 3], &Device::Cpu)?;
        let err = fused_cross_entropy_rows(&x, &y).unwrap_err().to_string();
        assert!(err.contains("label 3 out of range for 3 classes"), "{err}");
        Ok(())
    }
}
