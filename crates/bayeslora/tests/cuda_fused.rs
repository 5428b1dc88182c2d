//! The fused CUDA RMSNorm, rotary embedding and SwiGLU (`kernels/fused.cu`) against the composed
//! CPU path (the reference), forward and input gradients, run on the GPU machine:
//! `cargo test --release -p bayeslora --features cuda --test cuda_fused`. Without the `cuda`
//! feature this file is empty, so CI (no GPU) compiles nothing here.
#![cfg(feature = "cuda")]

use std::time::Instant;

use bayeslora::ops;
use bayeslora::Result;
use candle_core::{DType, Device, Tensor, Var, D};

fn cuda() -> Device {
    Device::new_cuda(0).expect("these tests need a CUDA device (run them on the GPU machine)")
}

/// Relative tolerance (max |got − want| over max |want|) of a fused CUDA op in `dtype` against
/// the composed CPU path in f32 on the same (rounded) inputs: tight for f32, about two units in
/// the last place of the largest value for bf16/f16 (the kernels compute in f32 and round once).
fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        _ => 1e-2,
    }
}

/// Max |got − want| relative to max |want|, printed; panics above `tol` (or on NaN) unless `tol`
/// is `None` (printed for information).
fn compare(name: &str, got: &Tensor, want: &Tensor, tol: Option<f64>) -> Result<f64> {
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    let flat = |t: &Tensor| -> Result<Vec<f64>> {
        Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
    };
    let (g, w) = (flat(got)?, flat(want)?);
    let scale = w.iter().fold(0f64, |m, v| m.max(v.abs())).max(f64::MIN_POSITIVE);
    let (mut worst, mut at) = (0f64, 0usize);
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let d = (a - b).abs();
        if d > worst || d.is_nan() {
            (worst, at) = (d, i);
        }
    }
    let rel = worst / scale;
    println!("{name}: max abs err {worst:.3e}, relative to max |want| {scale:.3e}: {rel:.3e} (shape {:?})", got.dims());
    if let Some(tol) = tol {
        let bad = rel.is_nan() || rel > tol;
        assert!(!bad, "{name}: relative error {rel:e} > {tol:e} at flat index {at}: got {} want {}", g[at], w[at]);
    }
    Ok(rel)
}

/// `y = f(vars)` and the gradients of `sum(y · w)` in each var (`w` drawn once by the caller, so
/// every run shares it).
fn value_and_grads(
    inputs: &[Tensor],
    w: &Tensor,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<(Tensor, Vec<Tensor>)> {
    let vars = inputs.iter().map(Var::from_tensor).collect::<candle_core::Result<Vec<_>>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts)?;
    let grads = y.mul(w)?.sum_all()?.backward()?;
    let g = ts.iter().map(|t| grads.get(t).expect("gradient reaches the input").clone()).collect();
    Ok((y, g))
}

/// Runs `f` (an `ops::*` call: fused on CUDA, composed on the CPU) on `inputs` (f32 values on
/// the CPU, rounded to `dtype`) and checks the CUDA output and input gradients against the CPU
/// path in f32 on the same rounded values. For bf16/f16 it also prints how far the composed CPU
/// path in that dtype is from the same reference (it rounds every intermediate).
fn check_op(name: &str, dtype: DType, inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Result<Tensor>) -> Result<()> {
    let gpu = cuda();
    let cpu_in = inputs.iter().map(|t| t.to_dtype(dtype)).collect::<candle_core::Result<Vec<_>>>()?;
    let shape = f(&cpu_in)?.shape().clone();
    let w = Tensor::randn(0f32, 1.0, shape, &Device::Cpu)?.to_dtype(dtype)?;
    let ref_in = cpu_in.iter().map(|t| t.to_dtype(DType::F32)).collect::<candle_core::Result<Vec<_>>>()?;
    let (want, want_g) = value_and_grads(&ref_in, &w.to_dtype(DType::F32)?, f)?;
    let gpu_in = cpu_in.iter().map(|t| t.to_device(&gpu)).collect::<candle_core::Result<Vec<_>>>()?;
    let (got, got_g) = value_and_grads(&gpu_in, &w.to_device(&gpu)?, f)?;
    assert!(got.device().is_cuda() && got.dtype() == dtype);
    compare(&format!("{name} {dtype:?} fused y"), &got, &want, Some(tol(dtype)))?;
    for (i, (g, w)) in got_g.iter().zip(&want_g).enumerate() {
        compare(&format!("{name} {dtype:?} fused d{i}"), g, w, Some(tol(dtype)))?;
    }
    if dtype != DType::F32 {
        let (comp, comp_g) = value_and_grads(&cpu_in, &w, f)?;
        compare(&format!("{name} {dtype:?} (composed CPU y, for reference)"), &comp, &want, None)?;
        for (i, (g, w)) in comp_g.iter().zip(&want_g).enumerate() {
            compare(&format!("{name} {dtype:?} (composed CPU d{i}, for reference)"), g, w, None)?;
        }
    }
    Ok(())
}

/// The constant `c` (weight, cos, sin; already rounded to the tested dtype) on `x`'s device in
/// `x`'s dtype.
fn like(c: &Tensor, x: &Tensor) -> Result<Tensor> {
    Ok(c.to_dtype(x.dtype())?.to_device(x.device())?)
}

const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

fn randn(shape: &[usize], std: f32) -> Result<Tensor> {
    Ok(Tensor::randn(0f32, std, shape, &Device::Cpu)?)
}

#[test]
fn rms_norm_matches_cpu() -> Result<()> {
    // [.., 4096]: 16-byte accesses; 100: vector for f32, scalar for bf16/f16; 13: scalar.
    // [33, 6]ᵀ: a non-contiguous input.
    for (shape, transposed) in
        [(vec![2, 5, 4096], false), (vec![3, 7, 100], false), (vec![4, 13], false), (vec![33, 6], true)]
    {
        let c = if transposed { shape[0] } else { shape[shape.len() - 1] };
        let w = randn(&[c], 1.0)?.affine(0.5, 1.0)?;
        let x = randn(&shape, 2.0)?;
        for dtype in DTYPES {
            let wd = w.to_dtype(dtype)?;
            check_op(
                &format!("rms_norm {shape:?}{}", if transposed { "ᵀ" } else { "" }),
                dtype,
                std::slice::from_ref(&x),
                &|t| {
                    let x = if transposed { t[0].t()? } else { t[0].clone() };
                    Ok(ops::rms_norm(&x, &like(&wd, &t[0])?, 1e-5)?)
                },
            )?;
        }
    }
    Ok(())
}

#[test]
fn rope_matches_cpu() -> Result<()> {
    let (b, t, h) = (2, 7, 3);
    // D 64/128: 16-byte accesses; D 6: scalar. x is a transpose of [B, T, H, D], as the model's
    // q/k before `.contiguous()`. Random tables (not duplicated halves) exercise both halves'
    // cos/sin indices.
    for d in [64, 128, 6] {
        let x = randn(&[b, t, h, d], 1.0)?;
        let cos = randn(&[t, d], 1.0)?;
        let sin = randn(&[t, d], 1.0)?;
        for dtype in DTYPES {
            let (c, s) = (cos.to_dtype(dtype)?, sin.to_dtype(dtype)?);
            check_op(&format!("rope D={d} T={t}"), dtype, std::slice::from_ref(&x), &|v| {
                Ok(ops::rope(&v[0].transpose(1, 2)?, &like(&c, &v[0])?, &like(&s, &v[0])?)?)
            })?;
        }
    }
    Ok(())
}

#[test]
fn swiglu_matches_cpu() -> Result<()> {
    // [2, 5, 4096]: 16-byte accesses; [3, 1001]: 3003 elements, scalar, not a multiple of the
    // block; the offset views: vector-sized but misaligned, the kernel's scalar fallback.
    for shape in [vec![2, 5, 4096], vec![3, 1001]] {
        let (gate, up) = (randn(&shape, 3.0)?, randn(&shape, 1.0)?);
        for dtype in DTYPES {
            check_op(&format!("swiglu {shape:?}"), dtype, &[gate.clone(), up.clone()], &|t| {
                Ok(ops::swiglu(&t[0], &t[1])?)
            })?;
        }
    }
    let n = 8 * 40;
    let (gate, up) = (randn(&[n + 1], 3.0)?, randn(&[n + 1], 1.0)?);
    for dtype in DTYPES {
        check_op("swiglu offset-1 views", dtype, &[gate.clone(), up.clone()], &|t| {
            let view = |t: &Tensor| t.narrow(0, 1, n)?.reshape((8, 40));
            Ok(ops::swiglu(&view(&t[0])?, &view(&t[1])?)?)
        })?;
    }
    Ok(())
}

/// Mean milliseconds of `f` over `iters` runs after one warm-up, synchronised.
/// The attention head layout both ways, against reshape/transpose on the CPU, bit for bit (a
/// permutation); D 128: 16-byte pieces; D 6: scalar. Plus the time of one 7B-layer q
/// ([4, 512, 4096] bf16) against candle's strided copy, printed.
#[test]
fn split_and_merge_heads_match_cpu() -> Result<()> {
    let gpu = cuda();
    for (b, t, h, d) in [(2, 7, 3, 128), (2, 5, 4, 6)] {
        let x = randn(&[b, t, h * d], 1.0)?;
        for dtype in DTYPES {
            check_op(&format!("split_heads D={d}"), dtype, std::slice::from_ref(&x), &|v| {
                Ok(ops::split_heads(&v[0], h)?)
            })?;
            let xd = x.to_dtype(dtype)?;
            let split = ops::split_heads(&xd.to_device(&gpu)?, h)?;
            let want = xd.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous()?;
            assert_eq!(compare(&format!("split_heads D={d} {dtype:?} exact"), &split, &want, Some(0.0))?, 0.0);
            let merged = ops::merge_heads(&split)?;
            assert_eq!(compare(&format!("merge_heads D={d} {dtype:?} exact"), &merged, &xd, Some(0.0))?, 0.0);
        }
    }
    let q = Tensor::randn(0f32, 1.0, (4, 512, 4096), &gpu)?.to_dtype(DType::BF16)?;
    let ours = time_ms(&gpu, 20, &|| Ok(ops::split_heads(&q, 32).map(|_| ())?))?;
    let candle = time_ms(&gpu, 20, &|| Ok(q.reshape((4, 512, 32, 128))?.transpose(1, 2)?.contiguous().map(|_| ())?))?;
    println!("split_heads [4, 512, 4096] bf16: {ours:.3} ms, candle's transpose copy {candle:.3} ms");
    Ok(())
}

/// f32 ↔ bf16/f16 casts on CUDA equal candle's CPU casts bit for bit (4-element pieces, a tail,
/// an odd offset), and the gradient comes back cast to the input's dtype.
#[test]
fn casts_match_cpu_bit_for_bit() -> Result<()> {
    let gpu = cuda();
    let x = randn(&[3, 1001], 4.0)?; // 3003 elements: not a multiple of 4
    for n in [3003, 3000] {
        let xf = x.flatten_all()?.narrow(0, 3003 - n, n)?; // n = 3000 starts at an odd offset
        for low in [DType::BF16, DType::F16] {
            let down = ops::cast(&xf.to_device(&gpu)?, low)?;
            compare(&format!("cast f32→{low:?} n={n}"), &down, &xf.to_dtype(low)?, Some(0.0))?;
            let xl = xf.to_dtype(low)?;
            let up = ops::cast(&xl.to_device(&gpu)?, DType::F32)?;
            compare(&format!("cast {low:?}→f32 n={n}"), &up, &xl.to_dtype(DType::F32)?, Some(0.0))?;
            let v = Var::from_tensor(&xf.to_device(&gpu)?)?;
            let w = randn(&[n], 1.0)?.to_dtype(low)?;
            let g = ops::cast(v.as_tensor(), low)?.mul(&w.to_device(&gpu)?)?.sum_all()?.backward()?;
            let got = g.get(v.as_tensor()).expect("gradient");
            assert_eq!(got.dtype(), DType::F32);
            compare(&format!("cast f32→{low:?} gradient"), got, &w.to_dtype(DType::F32)?, Some(0.0))?;
        }
    }
    let a = Tensor::randn(0f32, 1.0, (4, 512, 4096), &gpu)?.to_dtype(DType::BF16)?;
    let ours = time_ms(&gpu, 20, &|| Ok(ops::cast(&a, DType::F32).map(|_| ())?))?;
    let candle = time_ms(&gpu, 20, &|| Ok(a.to_dtype(DType::F32).map(|_| ())?))?;
    println!("cast bf16→f32 [4, 512, 4096]: {ours:.3} ms, candle's {candle:.3} ms");
    Ok(())
}

fn time_ms(dev: &Device, iters: usize, f: &dyn Fn() -> Result<()>) -> Result<f64> {
    f()?;
    dev.synchronize()?;
    let start = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    dev.synchronize()?;
    Ok(start.elapsed().as_secs_f64() * 1e3 / iters as f64)
}

/// The fused ops against the same compositions on CUDA at the shapes of a Llama-2-7B layer
/// (4×512 tokens, bf16): forward alone (with the fused forward's effective bandwidth), and forward
/// plus `backward()` from a ones gradient (which includes candle's gradient bookkeeping). Printed
/// only, no assertion.
#[test]
fn fused_vs_composed_timing() -> Result<()> {
    let gpu = cuda();
    let dt = DType::BF16;
    let (b, t, c, h, d, i) = (4, 512, 4096, 32, 128, 11008);
    let rnd = |shape: &[usize]| -> Result<Tensor> { Ok(Tensor::randn(0f32, 1.0, shape, &gpu)?.to_dtype(dt)?) };
    let x = Var::from_tensor(&rnd(&[b, t, c])?)?;
    let w = rnd(&[c])?;
    let q = Var::from_tensor(&rnd(&[b, h, t, d])?)?;
    let (cos, sin) = (rnd(&[t, d])?, rnd(&[t, d])?);
    let gate = Var::from_tensor(&rnd(&[b, t, i])?)?;
    let up = Var::from_tensor(&rnd(&[b, t, i])?)?;
    let rms_composed = |x: &Tensor| -> Result<Tensor> {
        let xf = x.to_dtype(DType::F32)?;
        let rms = xf.sqr()?.mean_keepdim(D::Minus1)?.affine(1.0, 1e-5)?.sqrt()?;
        Ok(xf.broadcast_div(&rms)?.to_dtype(dt)?.broadcast_mul(&w)?)
    };
    let rope_composed = |x: &Tensor| -> Result<Tensor> {
        let (x1, x2) = (x.narrow(D::Minus1, 0, d / 2)?, x.narrow(D::Minus1, d / 2, d / 2)?);
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        Ok(x.broadcast_mul(&cos)?.add(&rotated.broadcast_mul(&sin)?)?)
    };
    type Op<'a> = Box<dyn Fn() -> Result<Tensor> + 'a>;
    // (name, bytes the fused forward reads and writes, fused, composed)
    let cases: [(&str, usize, Op, Op); 3] = [
        (
            "rms_norm [4, 512, 4096]",
            2 * 2 * b * t * c,
            Box::new(|| Ok(ops::rms_norm(x.as_tensor(), &w, 1e-5)?)),
            Box::new(|| rms_composed(x.as_tensor())),
        ),
        (
            "rope [4, 32, 512, 128]",
            2 * 2 * b * h * t * d,
            Box::new(|| Ok(ops::rope(q.as_tensor(), &cos, &sin)?)),
            Box::new(|| rope_composed(q.as_tensor())),
        ),
        (
            "swiglu [4, 512, 11008]",
            3 * 2 * b * t * i,
            Box::new(|| Ok(ops::swiglu(gate.as_tensor(), up.as_tensor())?)),
            Box::new(|| Ok(gate.as_tensor().silu()?.mul(up.as_tensor())?)),
        ),
    ];
    for (name, bytes, fused, composed) in &cases {
        let fwd = |f: &Op| time_ms(&gpu, 20, &|| f().map(|_| ()));
        let both = |f: &Op| {
            time_ms(&gpu, 20, &|| {
                f()?.backward()?;
                Ok(())
            })
        };
        let (ff, cf) = (fwd(fused)?, fwd(composed)?);
        let (fb, cb) = (both(fused)?, both(composed)?);
        let gbs = *bytes as f64 / (ff * 1e-3) / 1e9;
        println!(
            "timing {name} bf16: forward fused {ff:.3} ms ({gbs:.0} GB/s) vs composed {cf:.3} ms; \
             forward+backward fused {fb:.3} ms vs composed {cb:.3} ms"
        );
    }
    Ok(())
}
