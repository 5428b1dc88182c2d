//! Helpers shared by the golden tests (`bert.rs`, `deberta.rs`, `export.rs`).
use std::collections::HashMap;
use std::path::Path;

use bayeslora::Result;
use candle_core::{DType, Device, Tensor};

/// The tensors of a fixture safetensors file, on the CPU.
pub fn load_io(file: &Path) -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(file, &Device::Cpu)?)
}

/// Max |got − want| with the worst flat index; panics with both when above `tol` (llm.c's
/// `check_tensor`).
pub fn check(name: &str, got: &Tensor, want: &Tensor, tol: f32) -> Result<f32> {
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    let g = got.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let w = want.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let (mut worst, mut at) = (0f32, 0usize);
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let d = (a - b).abs();
        if d > worst || d.is_nan() {
            (worst, at) = (d, i);
        }
    }
    println!("{name}: max abs err {worst:.3e} at flat index {at} (shape {:?})", got.dims());
    assert!(worst <= tol, "{name}: max abs err {worst:e} at flat index {at}: got {} want {}", g[at], w[at]);
    Ok(worst)
}
