//! The f64 CPU references of our CUDA ops (`rms_norm`, `rope`, `swiglu`, `layout`, `cast`):
//! each op's `cpu_fwd` reads its inputs as f64, computes in f64 and rounds once to the storage
//! dtype, so the unit tests can check the formulas against the composed ops and finite
//! differences, and the GPU tests (`tests/cuda_fused.rs`) the kernels against them.
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};

/// The elements of a contiguous CPU storage as f64.
pub(crate) fn cpu_f64(s: &CpuStorage, l: &Layout, what: &str) -> Result<Vec<f64>> {
    let Some((start, end)) = l.contiguous_offsets() else { candle_core::bail!("{what} must be contiguous") };
    Ok(match s {
        CpuStorage::F32(v) => v[start..end].iter().map(|&v| v as f64).collect(),
        CpuStorage::F64(v) => v[start..end].to_vec(),
        CpuStorage::BF16(v) => v[start..end].iter().map(|v| v.to_f64()).collect(),
        CpuStorage::F16(v) => v[start..end].iter().map(|v| v.to_f64()).collect(),
        other => candle_core::bail!("{what}: unsupported dtype {:?}", other.dtype()),
    })
}

/// `v` rounded to `dtype`, as a CPU storage.
pub(crate) fn cpu_from_f64(dtype: DType, v: Vec<f64>) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F64 => CpuStorage::F64(v),
        DType::F32 => CpuStorage::F32(v.iter().map(|&v| v as f32).collect()),
        DType::BF16 => CpuStorage::BF16(v.iter().map(|&v| half::bf16::from_f64(v)).collect()),
        DType::F16 => CpuStorage::F16(v.iter().map(|&v| half::f16::from_f64(v)).collect()),
        other => candle_core::bail!("unsupported dtype {other:?}"),
    })
}

/// `v` rounded to `dtype` and back.
pub(crate) fn round_to(dtype: DType, v: f64) -> f64 {
    match dtype {
        DType::F32 => v as f32 as f64,
        DType::BF16 => half::bf16::from_f64(v).to_f64(),
        DType::F16 => half::f16::from_f64(v).to_f64(),
        _ => v,
    }
}

/// A constant tensor held by an op (weight, cos, sin) as f64, on the CPU.
pub(crate) fn held_f64(t: &Tensor, what: &str) -> Result<Vec<f64>> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(s) = &*storage else { candle_core::bail!("{what} and the input are on different devices") };
    cpu_f64(s, layout, what)
}
