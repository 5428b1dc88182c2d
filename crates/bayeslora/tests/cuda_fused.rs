//! The CUDA RMSNorm, rotary embedding and SwiGLU (`kernels/{rms_norm,rope,swiglu}.cu`) against the composed
//! CPU path (the reference), forward and input gradients, and B-LoRA's quantizer and range
//! (`kernels/quantize.cu`) against their CPU ops bit for bit and the gated layer against the CPU,
//! run on the GPU machine: `cargo test --release -p bayeslora --features cuda --test cuda_fused`.
//! Without the `cuda` feature this file is empty, so CI (no GPU) compiles nothing here.
#![cfg(feature = "cuda")]

use std::time::Instant;

use bayeslora::adapters::blora::{BLoraConfig, BLoraLayer, InitE};
use bayeslora::adapters::{Adapter, Ctx};
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

/// Bits of a float tensor as f64 values (exact for f32 and f64), on the host.
fn host_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

/// Equal to the bit (NaN equal to NaN), or, with `zero_sign`, also +0 equal to −0.
fn assert_bits(name: &str, got: &[f64], want: &[f64], zero_sign: bool) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        let ok = a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()) || (zero_sign && *a == 0.0 && *b == 0.0);
        assert!(ok, "{name}: first difference at flat index {i}: got {a:e} want {b:e}");
    }
}

/// The B-LoRA training quantizer as candle ops (the path the fused op replaced): the residual
/// ladder of clip(x), the nested gated sum, and the straight-through term.
fn composed_quantize(x: &Tensor, params: &Tensor, z: &Tensor) -> Result<Tensor> {
    let p = |i: usize| params.narrow(0, i, 1);
    let xd = x.detach();
    let xc = xd.broadcast_maximum(&p(0)?)?.broadcast_minimum(&p(1)?)?;
    let x2 = xc
        .broadcast_mul(&p(9)?)?
        .round()?
        .broadcast_maximum(&p(2)?)?
        .broadcast_minimum(&p(3)?)?
        .broadcast_mul(&p(4)?)?;
    let mut rest = xc.sub(&x2)?;
    let mut levels = vec![x2];
    for (i, k) in [2f32, 8., 128., 32768.].iter().enumerate() {
        let e = rest.broadcast_mul(&p(10 + i)?)?.round()?.clamp(-k, *k)?.broadcast_mul(&p(5 + i)?)?;
        rest = rest.sub(&e)?;
        levels.push(e);
    }
    let mut acc = levels[4].broadcast_mul(&z.narrow(0, 3, 1)?)?;
    for i in (0..3).rev() {
        acc = levels[i + 1].add(&acc)?.broadcast_mul(&z.narrow(0, i, 1)?)?;
    }
    let q = levels[0].add(&acc)?;
    let xc = x.broadcast_maximum(&p(0)?)?.broadcast_minimum(&p(1)?)?;
    Ok(q.add(&xc.sub(&xc.detach())?)?)
}

/// `x` (f64 values) with exact zeros, both bounds of `[lo, hi]` and, with `non_finite`, a NaN
/// and an infinity.
fn quantizer_input(shape: &[usize], lo: f32, hi: f32, non_finite: bool) -> Result<Tensor> {
    let scale = f64::from(hi);
    let shift = if lo < 0.0 { 0.0 } else { 0.5 * scale };
    let mut v = Tensor::randn(0f64, scale, shape, &Device::Cpu)?.affine(1.0, shift)?.flatten_all()?.to_vec1::<f64>()?;
    let n = v.len();
    for (i, special) in [0.0, -0.0, f64::from(lo), f64::from(hi), 0.0].into_iter().enumerate() {
        v[(7 * i + 3) % n] = special;
    }
    if non_finite {
        v[n / 2] = f64::NAN;
        v[n / 3] = f64::INFINITY;
    }
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// The fused quantizer and range update on CUDA equal their CPU ops to the bit (range and grid
/// parameters, forward, straight-through dL/dx; dL/dz to f64-summation order), for f32 and f64,
/// signed/unsigned/tiny ranges, soft gates and every closed/open gate pattern, sizes with tails
/// and above the kernels' grid (grid-stride loops, many partial sums), NaN/∞ inputs (the range
/// keeps its old value; NaN propagates), and x with no gradient (the frozen base weight). The
/// forward also equals the composed candle ops on CUDA (today's path before the fused op) up to
/// the sign of a zero.
#[test]
fn blora_quantizer_matches_cpu_bit_for_bit() -> Result<()> {
    let gpu = cuda();
    let mut gates: Vec<[f64; 4]> = vec![[0.9, 0.4, 0.7, 0.2], [0.35, 1.0, 0.05, 0.6]];
    gates.extend((0..16).map(|m| [0, 1, 2, 3].map(|b| ((m >> b) & 1) as f64)));
    let cases: [(&[usize], f32, f32, bool); 5] = [
        (&[29, 11], -0.9, 0.9, false),
        (&[3, 1001], 0.0, 1.2, false),
        (&[7, 13], -3e-4, 3e-4, false),
        (&[1024, 1031], -2.0, 2.0, false), // > 1024 blocks × 256 threads: grid-stride
        (&[37, 5], -1.0, 1.0, true),
    ];
    for dtype in [DType::F32, DType::F64] {
        for &(shape, lo, hi, non_finite) in &cases {
            let x0 = quantizer_input(shape, lo, hi, non_finite)?.to_dtype(dtype)?;
            let w = Tensor::randn(0f64, 1.0, shape, &Device::Cpu)?.to_dtype(dtype)?;
            // The old range is half the data's span, so the update widens it (or keeps it when x
            // has a non-finite value).
            let old = Tensor::new(&[lo / 2.0, hi / 2.0], &Device::Cpu)?;
            let name = format!("{dtype:?} {shape:?} [{lo}, {hi}]{}", if non_finite { " with NaN/inf" } else { "" });
            let range =
                |dev: &Device| -> Result<Tensor> { Ok(ops::update_range(&x0.to_device(dev)?, &old.to_device(dev)?)?) };
            let (r_cpu, r_gpu) = (range(&Device::Cpu)?, range(&gpu)?);
            assert_bits(&format!("range+params {name}"), &host_f64(&r_gpu)?, &host_f64(&r_cpu)?, false);
            if non_finite {
                assert_eq!(host_f64(&r_cpu.narrow(0, 0, 2)?)?, [f64::from(lo / 2.0), f64::from(hi / 2.0)]);
            }
            let params = r_cpu.narrow(0, 2, ops::QUANTIZE_PARAMS)?;
            for z in &gates {
                let run = |dev: &Device, x_var: bool, composed: bool| -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
                    let xv = Var::from_tensor(&x0.to_device(dev)?)?;
                    let x = if x_var { xv.as_tensor().clone() } else { x0.to_device(dev)? };
                    let zv = Var::from_tensor(&Tensor::new(z, dev)?.to_dtype(dtype)?)?;
                    let p = params.to_device(dev)?;
                    let q = if composed {
                        composed_quantize(&x, &p, zv.as_tensor())?
                    } else {
                        ops::gated_quantize(&x, &p, zv.as_tensor())?
                    };
                    let grads = q.mul(&w.to_device(dev)?)?.sum_all()?.backward()?;
                    let grad = |t: &Tensor| -> Result<Vec<f64>> { grads.get(t).map(host_f64).unwrap_or(Ok(vec![])) };
                    Ok((host_f64(&q)?, grad(&x)?, grad(zv.as_tensor())?))
                };
                let what = format!("{name} z {z:?}");
                let (cpu, gpu_out) = (run(&Device::Cpu, true, false)?, run(&gpu, true, false)?);
                assert_bits(&format!("q {what}"), &gpu_out.0, &cpu.0, false);
                assert_bits(&format!("dL/dx {what}"), &gpu_out.1, &cpu.1, false);
                // A NaN in x makes dL/dz NaN on both devices.
                let scale = cpu.2.iter().fold(0f64, |m, v| m.max(v.abs()));
                let tol = if dtype == DType::F32 { 2e-7 } else { 1e-13 };
                for (a, b) in gpu_out.2.iter().zip(&cpu.2) {
                    let ok = (a - b).abs() <= tol * scale || (non_finite && a.is_nan() && b.is_nan());
                    assert!(ok, "dL/dz {what}: got {:?} want {:?}", gpu_out.2, cpu.2);
                }
                // x without a gradient: the same values and dL/dz, no dL/dx.
                let frozen = run(&gpu, false, false)?;
                assert_bits(&format!("q (frozen x) {what}"), &frozen.0, &gpu_out.0, false);
                assert_bits(&format!("dL/dz (frozen x) {what}"), &frozen.2, &gpu_out.2, false);
                assert!(frozen.1.is_empty());
                if !non_finite {
                    let composed = run(&gpu, true, true)?;
                    assert_bits(&format!("q vs the composed CUDA ops {what}"), &gpu_out.0, &composed.0, true);
                }
            }
        }
    }
    Ok(())
}

/// Hard-concrete samples (the candle composition the op replaced) on any device.
fn composed_hard_concrete(la: &Tensor, noise: &Tensor, hc: ops::HardConcrete) -> Result<Tensor> {
    let s = la.add(noise)?.affine(1.0 / hc.beta, 0.0)?.affine(0.5, 0.0)?.tanh()?.affine(0.5, 0.5)?;
    let z = s.affine(hc.zeta - hc.gamma, hc.gamma)?.clamp(0f32, 1f32)?;
    let Some(t) = hc.hard_off else { return Ok(z) };
    let open = la.gt(t)?.to_dtype(la.dtype())?;
    let mut acc = open.narrow(0, 0, 1)?;
    let mut parts = vec![acc.clone()];
    for i in 1..open.dim(0)? {
        acc = acc.mul(&open.narrow(0, i, 1)?)?;
        parts.push(acc.clone());
    }
    Ok(z.mul(&Tensor::cat(&parts, 0)?)?)
}

/// The hard-concrete gate op on CUDA equals the composed candle ops on CUDA to the bit (each
/// device reproduces its own composition: CUDA's affine is an FMA and its tanh is tanhf), is
/// within a few units in the last place of the CPU op, and its log α gradient matches the CPU's.
#[test]
fn hard_concrete_matches_composed_cuda_and_cpu() -> Result<()> {
    let gpu = cuda();
    let la: Vec<f32> = vec![6.0, 0.3, -1.0, 2.5, -2.0, 1.0, 30.0, -30.0, 0.0, -0.4, 1.7, -0.9, 3.3];
    let noise: Vec<f32> = (0..la.len()).map(|i| (i as f32 * 1.37).sin() * 3.0).collect();
    let w = randn(&[la.len()], 1.0)?;
    for hard_off in [Some(-2.0), None] {
        let hc = ops::HardConcrete { beta: 2.0 / 3.0, gamma: -0.1, zeta: 1.1, hard_off };
        let run = |dev: &Device, composed: bool| -> Result<(Vec<f64>, Vec<f64>)> {
            let v = Var::from_tensor(&Tensor::new(la.as_slice(), dev)?)?;
            let n = Tensor::new(noise.as_slice(), dev)?;
            let z = if composed {
                composed_hard_concrete(v.as_tensor(), &n, hc)?
            } else {
                ops::hard_concrete(v.as_tensor(), &n, hc)?
            };
            let grads = z.mul(&w.to_device(dev)?)?.sum_all()?.backward()?;
            let g = grads.get(v.as_tensor()).map(host_f64).unwrap_or(Ok(vec![]))?;
            Ok((host_f64(&z)?, g))
        };
        let (fused, composed, cpu) = (run(&gpu, false)?, run(&gpu, true)?, run(&Device::Cpu, false)?);
        assert_bits(&format!("hard_concrete vs the composed CUDA ops ({hard_off:?})"), &fused.0, &composed.0, false);
        for (name, got, want, tol) in [
            ("z vs CPU", &fused.0, &cpu.0, 1e-6),
            ("d log α vs composed CUDA", &fused.1, &composed.1, 1e-6),
            ("d log α vs CPU", &fused.1, &cpu.1, 1e-5),
        ] {
            for (a, b) in got.iter().zip(want.iter()) {
                assert!(
                    (a - b).abs() <= tol * (1.0 + b.abs()),
                    "hard_concrete {name} ({hard_off:?}): {got:?} vs {want:?}"
                );
            }
        }
    }
    Ok(())
}

/// The rank multiplier the op replaced, composed from candle ops on any device: the samples,
/// the straight-through round of their cumulative product, a 1 in front.
fn composed_rank_multiplier(la: &Tensor, noise: &Tensor, hc: ops::HardConcrete) -> Result<Tensor> {
    let z = composed_hard_concrete(la, noise, hc)?;
    let mut acc = z.narrow(0, 0, 1)?;
    let mut parts = vec![acc.clone()];
    for i in 1..z.dim(0)? {
        acc = acc.mul(&z.narrow(0, i, 1)?)?;
        parts.push(acc.clone());
    }
    let p = Tensor::cat(&parts, 0)?;
    let m = p.add(&p.round()?.sub(&p)?.detach())?;
    Ok(Tensor::cat(&[&Tensor::ones(1, la.dtype(), la.device())?, &m], 0)?)
}

/// The fused rank multiplier (`ops::rank_multiplier`, kernels rank_gates_fwd/bwd) on CUDA: the
/// composed CUDA ops' floats forward, their log α gradient to f32 rounding, and the CPU op's.
#[test]
fn rank_multiplier_matches_composed_cuda_and_cpu() -> Result<()> {
    let gpu = cuda();
    let hc = ops::HardConcrete { beta: 2.0 / 3.0, gamma: -0.1, zeta: 1.1, hard_off: None };
    for n in [1usize, 3, 7, 15] {
        for spread in [0.5f32, 3.0, 30.0] {
            let la: Vec<f32> = (0..n).map(|i| spread * ((i * 7 + 3) % 5) as f32 / 4.0 - 0.3 * spread).collect();
            let noise: Vec<f32> = (0..n).map(|i| (i as f32 * 1.37).sin() * 2.0).collect();
            let w = randn(&[n + 1], 1.0)?;
            let run = |dev: &Device, composed: bool| -> Result<(Vec<f64>, Vec<f64>)> {
                let v = Var::from_tensor(&Tensor::new(la.as_slice(), dev)?)?;
                let nz = Tensor::new(noise.as_slice(), dev)?;
                let m = if composed {
                    composed_rank_multiplier(v.as_tensor(), &nz, hc)?
                } else {
                    ops::rank_multiplier(v.as_tensor(), &nz, hc)?
                };
                let grads = m.mul(&w.to_device(dev)?)?.sum_all()?.backward()?;
                let g = grads.get(v.as_tensor()).map(host_f64).unwrap_or(Ok(vec![]))?;
                Ok((host_f64(&m)?, g))
            };
            let (fused, composed, cpu) = (run(&gpu, false)?, run(&gpu, true)?, run(&Device::Cpu, false)?);
            let what = format!("rank_multiplier n {n} spread {spread}");
            assert_bits(&format!("{what} vs the composed CUDA ops"), &fused.0, &composed.0, false);
            assert!(fused.0[0] == 1.0 && fused.0.iter().all(|&m| m == 0.0 || m == 1.0), "{what}: {:?}", fused.0);
            for (name, got, want, tol) in
                [("d log α vs composed CUDA", &fused.1, &composed.1, 1e-6), ("d log α vs CPU", &fused.1, &cpu.1, 1e-5)]
            {
                assert_eq!(got.len(), want.len(), "{what} {name}");
                for (a, b) in got.iter().zip(want.iter()) {
                    assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{what} {name}: {got:?} vs {want:?}");
                }
            }
        }
    }
    Ok(())
}

/// The windowed gate ops (`hard_concrete_at`, `rank_multiplier_at`: a gate vector read straight
/// from B-LoRA's gate bank, its gradient scattered into the whole bank) on CUDA against the CPU:
/// samples to a few ulps (CUDA's tanhf), bank gradients to 1e-5, zero outside the window.
#[test]
fn windowed_gate_ops_match_cpu() -> Result<()> {
    let gpu = cuda();
    let values: Vec<f32> = (0..29).map(|i| ((i * 7) % 11) as f32 * 0.7 - 3.0).collect();
    let bits = ops::HardConcrete { beta: 2.0 / 3.0, gamma: -0.1, zeta: 1.1, hard_off: Some(-2.0) };
    let rank = ops::HardConcrete { hard_off: None, ..bits };
    for (offset, n) in [(0usize, 4usize), (5, 4), (9, 7), (25, 4)] {
        let noise: Vec<f32> = (0..n).map(|i| ((i + offset) as f32 * 1.37).sin() * 2.0).collect();
        for rank_op in [false, true] {
            let run = |dev: &Device| -> Result<(Vec<f64>, Vec<f64>)> {
                let bank = Var::from_tensor(&Tensor::new(values.as_slice(), dev)?)?;
                let nz = Tensor::new(noise.as_slice(), dev)?;
                let out = if rank_op {
                    ops::rank_multiplier_at(bank.as_tensor(), offset, &nz, rank)?
                } else {
                    ops::hard_concrete_at(bank.as_tensor(), offset, &nz, bits)?
                };
                let w = Tensor::arange(0f32, out.elem_count() as f32, dev)?.affine(0.3, 1.0)?;
                let grads = out.mul(&w)?.sum_all()?.backward()?;
                let g = grads.get(bank.as_tensor()).map(host_f64).unwrap_or(Ok(vec![]))?;
                Ok((host_f64(&out)?, g))
            };
            let (g, c) = (run(&gpu)?, run(&Device::Cpu)?);
            let what = format!("window {offset}+{n} (rank op: {rank_op})");
            assert_eq!(g.1.len(), values.len(), "{what}: the gradient spans the bank");
            for (name, got, want) in [("out", &g.0, &c.0), ("d bank", &g.1, &c.1)] {
                assert_eq!(got.len(), want.len(), "{what} {name}");
                for (a, b) in got.iter().zip(want.iter()) {
                    assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{what} {name}: {got:?} vs {want:?}");
                }
            }
            for (i, v) in g.1.iter().enumerate() {
                assert!((offset..offset + n).contains(&i) || *v == 0.0, "{what}: gradient outside the window");
            }
        }
    }
    Ok(())
}

/// Each of the GPU's results within 1e-5 (relative, plus 1e-5 absolute) of the CPU's.
fn assert_results_close(name: &str, gpu: &[Vec<f64>], cpu: &[Vec<f64>]) {
    assert_eq!(gpu.len(), cpu.len(), "{name}: number of results");
    for (i, (got, want)) in gpu.iter().zip(cpu).enumerate() {
        assert_eq!(got.len(), want.len(), "{name}, result {i}: length");
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{name}, result {i}: {got:?} vs {want:?}");
        }
    }
}

/// A range of [−2, 2] as the quantizer's PARAMS (x_min, x_max, code bounds, steps, 1/steps),
/// f32 on the CPU.
fn params_pm2() -> Result<Tensor> {
    let steps: Vec<f64> = [3.0, 15.0, 255.0, 65535.0, 4_294_967_295.0].iter().map(|d| 4.0 / d).collect();
    let mut p = vec![-2.0, 2.0, -1.0, 1.0];
    p.extend(&steps);
    p.extend(steps.iter().map(|s| 1.0 / s));
    Ok(Tensor::new(p.as_slice(), &Device::Cpu)?.to_dtype(DType::F32)?)
}

/// A layer's bit gates sampled in one op (`hard_concrete_groups_at`: the hard-off mask per four)
/// and read by each quantizer at its offset (`gated_quantize_at`), the quantizers handing their
/// gradients over (`GateGrads`, read in place by the sample's backward kernel) on CUDA against
/// the same on the CPU: samples and outputs to a few ulps (CUDA's tanhf), the bank gradient to
/// 1e-5, also on a second backward of the same graph and with a quantizer that reads no gates.
#[test]
fn grouped_gate_samples_with_handed_over_gradients_match_cpu() -> Result<()> {
    let gpu = cuda();
    // Soft logits, one below the hard-off threshold (−2): the third quantizer's 8-bit gate.
    let mut values: Vec<f32> = (0..23).map(|i| (i as f32 * 1.3).sin() * 0.4).collect();
    values[12] = -2.5;
    let hc = ops::HardConcrete { beta: 2.0 / 3.0, gamma: -0.1, zeta: 1.1, hard_off: Some(-2.0) };
    let (at, q) = (3usize, 5usize);
    let noise: Vec<f32> = (0..4 * q).map(|i| (i as f32 * 1.37).sin() * 0.5).collect();
    let xs: Vec<Tensor> = (0..q).map(|k| randn(&[5, 3 + k], 1.0)).collect::<Result<_>>()?;
    let params = params_pm2()?;
    for used in [q, q - 1] {
        let run = |dev: &Device| -> Result<Vec<Vec<f64>>> {
            let bank = Var::from_tensor(&Tensor::new(values.as_slice(), dev)?)?;
            let grads = ops::GateGrads::new();
            let nz = Tensor::new(noise.as_slice(), dev)?;
            let z = ops::hard_concrete_groups_at(bank.as_tensor(), at, &nz, hc, 4, Some(&grads))?;
            let pd = params.to_device(dev)?;
            let mut loss = Tensor::zeros((), DType::F32, dev)?;
            let mut out = vec![host_f64(&z)?];
            for (k, x) in xs.iter().enumerate().take(used) {
                let o = ops::gated_quantize_at(&x.to_device(dev)?, &pd, &z, 4 * k, Some(&grads))?;
                loss = loss.add(&o.sqr()?.sum_all()?.affine(1.0 + k as f64, 0.0)?)?;
                out.push(host_f64(&o)?);
            }
            for _ in 0..2 {
                let g = loss.backward()?;
                out.push(g.get(bank.as_tensor()).map(host_f64).unwrap_or(Ok(vec![]))?);
            }
            Ok(out)
        };
        let (g, c) = (run(&gpu)?, run(&Device::Cpu)?);
        assert_results_close(&format!("{used} quantizers"), &g, &c);
        assert!(c[c.len() - 1].iter().filter(|v| **v != 0.0).count() >= 4, "soft gates pass gradients");
    }
    Ok(())
}

/// A layer's rank gates and bit gates in one op (`layer_gates_at`: the rank multiplier first,
/// then the bit gates in fours) read by `h ⊙ (E ⊙ m)` (`scale_by_gates_at`, `kernels/gate_scale.cu`)
/// and the quantizers (`gated_quantize_at`), every consumer handing its gradient over
/// (`GateGrads`), on CUDA against the same on the CPU: samples, outputs and the bank, E and h
/// gradients to 1e-5 (CUDA's tanhf, the column sums' tree), also on a second backward of the
/// same graph.
#[test]
fn layer_gates_with_rank_and_handed_over_gradients_match_cpu() -> Result<()> {
    let gpu = cuda();
    let mut values: Vec<f32> = (0..30).map(|i| (i as f32 * 1.3).sin() * 0.6).collect();
    values[16] = -2.5;
    let hc = ops::HardConcrete { beta: 2.0 / 3.0, gamma: -0.1, zeta: 1.1, hard_off: Some(-2.0) };
    let (at, rank, q) = (2usize, 7usize, 4usize);
    let noise: Vec<f32> = (0..rank + 4 * q).map(|i| (i as f32 * 1.37).sin() * 0.5).collect();
    let xs: Vec<Tensor> = (0..q).map(|k| randn(&[5, 3 + k], 1.0)).collect::<Result<_>>()?;
    let e0 = randn(&[rank + 1], 1.0)?;
    // Enough rows that the column sums of the backward take several rounds of its tree.
    let h0 = randn(&[700, rank + 1], 1.0)?;
    let params = params_pm2()?;
    let run = |dev: &Device| -> Result<Vec<Vec<f64>>> {
        let bank = Var::from_tensor(&Tensor::new(values.as_slice(), dev)?)?;
        let e = Var::from_tensor(&e0.to_device(dev)?)?;
        let h = Var::from_tensor(&h0.to_device(dev)?)?;
        let grads = ops::GateGrads::new();
        let nz = Tensor::new(noise.as_slice(), dev)?;
        let z = ops::layer_gates_at(bank.as_tensor(), at, &nz, hc, rank, 4, Some(&grads))?;
        let scaled = ops::scale_by_gates_at(h.as_tensor(), e.as_tensor(), &z, 0, Some(&grads))?;
        let pd = params.to_device(dev)?;
        // Linear in the scaled E: the rank gates get a gradient even where a sample rounds to 0.
        let mut loss = scaled.affine(1.5, 0.0)?.sum_all()?;
        let mut out = vec![host_f64(&z)?, host_f64(&scaled)?];
        for (k, x) in xs.iter().enumerate() {
            let o = ops::gated_quantize_at(&x.to_device(dev)?, &pd, &z, rank + 1 + 4 * k, Some(&grads))?;
            loss = loss.add(&o.sqr()?.sum_all()?.affine(1.0 + k as f64, 0.0)?)?;
            out.push(host_f64(&o)?);
        }
        for _ in 0..2 {
            let g = loss.backward()?;
            out.push(g.get(bank.as_tensor()).map(host_f64).unwrap_or(Ok(vec![]))?);
            out.push(g.get(e.as_tensor()).map(host_f64).unwrap_or(Ok(vec![]))?);
            out.push(g.get(h.as_tensor()).map(host_f64).unwrap_or(Ok(vec![]))?);
        }
        Ok(out)
    };
    let (g, c) = (run(&gpu)?, run(&Device::Cpu)?);
    assert_results_close("layer gates", &g, &c);
    let bank_grad = &c[c.len() - 3];
    assert!(bank_grad[at..at + rank].iter().any(|v| *v != 0.0), "the rank gates get gradients");
    assert!(bank_grad[at + rank..].iter().filter(|v| **v != 0.0).count() >= 4, "soft bit gates pass gradients");
    Ok(())
}

/// A B-LoRA layer's training forward and backward on CUDA (fused range, quantizer and their
/// backward; candle ops for the gate samples and the matmuls) against the same layer on the
/// CPU: outputs and the gradients of A, E, B and every gate logit, f32, with and without the
/// quantized base. Tolerance: cuBLAS vs the CPU GEMM, and CUDA's tanh in the gate samples.
#[test]
fn blora_layer_training_step_matches_cpu() -> Result<()> {
    let gpu = cuda();
    let (n_in, n_out) = (48, 40);
    for quantize_base in [false, true] {
        let cfg = BLoraConfig { r: 4, lora_dropout: 0.0, init_e: InitE::Normal, quantize_base, ..Default::default() };
        let x = randn(&[3, 17, n_in], 1.0)?;
        let base = randn(&[n_out, n_in], 0.2)?;
        let wy = randn(&[3, 17, n_out], 1.0)?;
        let build = |dev: &Device| -> Result<BLoraLayer> {
            let l = BLoraLayer::new(n_in, n_out, &cfg, 7, dev)?;
            for (name, v) in l.gate_vars() {
                // Soft bit gates on the weights (same inputs on both devices, so the same
                // ladders); activations at 32 bits (their matmul inputs differ by rounding).
                let vals: Vec<f32> = match name.as_str() {
                    "blora_gates.lora_A.bits" | "blora_gates.lora_E.bits" | "blora_gates.lora_B.bits" => {
                        vec![1.0, 0.5, 0.0, 0.5]
                    }
                    "blora_gates.rank" => vec![0.5; v.elem_count()],
                    _ => vec![30.0; v.elem_count()],
                };
                v.set(&Tensor::from_vec(vals, v.dims(), dev)?)?;
            }
            Ok(l)
        };
        let (l_cpu, l_gpu) = (build(&Device::Cpu)?, build(&gpu)?);
        for step in 0..3u64 {
            let run = |l: &BLoraLayer, dev: &Device| -> Result<(Tensor, Vec<(String, Tensor)>)> {
                let ctx = Ctx::train(100 + step);
                let xd = x.to_device(dev)?;
                let y = if quantize_base {
                    l.forward_with_base(&xd, &base.to_device(dev)?, None, &ctx, 5).expect("quantize_base")?
                } else {
                    l.forward(&xd, &ctx, 5)?
                };
                let grads = y.mul(&wy.to_device(dev)?)?.sum_all()?.backward()?;
                let mut g = Vec::new();
                for (name, v) in l.weight_vars() {
                    if let Some(t) = grads.get(v.as_tensor()) {
                        g.push((name, t.clone()));
                    }
                }
                for (name, v) in l.gate_vars() {
                    if let Some(t) = v.grad(&grads)? {
                        g.push((name, t));
                    }
                }
                Ok((y, g))
            };
            let ((y_c, g_c), (y_g, g_g)) = (run(&l_cpu, &Device::Cpu)?, run(&l_gpu, &gpu)?);
            let tag = format!("B-LoRA layer (quantize_base {quantize_base}, step {step})");
            compare(&format!("{tag} y"), &y_g, &y_c, Some(1e-4))?;
            let names_c: Vec<&String> = g_c.iter().map(|(n, _)| n).collect();
            let names_g: Vec<&String> = g_g.iter().map(|(n, _)| n).collect();
            assert_eq!(names_g, names_c, "{tag}: the same vars get gradients");
            for ((name, gg), (_, gc)) in g_g.iter().zip(&g_c) {
                compare(&format!("{tag} d {name}"), gg, gc, Some(1e-3))?;
            }
        }
        assert_eq!(l_gpu.ranges()?.len(), l_cpu.ranges()?.len());
        for ((slot, rg), (_, rc)) in l_gpu.ranges()?.iter().zip(l_cpu.ranges()?.iter()) {
            let rel = (rg.x_max - rc.x_max).abs() / rc.x_max.abs().max(1e-30);
            assert!(rel < 1e-5 && rg.signed() == rc.signed(), "range of {slot:?}: {rg:?} vs {rc:?}");
        }
    }
    Ok(())
}

/// The fused quantizer against the composed candle ops on CUDA, f32, at an activation's size
/// (4096 × 768: act_B of a 768-wide layer at 32 × 128 tokens): range update + forward, and
/// forward + backward. Printed only, no assertion.
#[test]
fn blora_quantizer_timing() -> Result<()> {
    let gpu = cuda();
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4096, 768), &gpu)?)?;
    let z = Var::new(&[0.9f32, 0.6, 0.4, 0.2], &gpu)?;
    let w = Tensor::randn(0f32, 1.0, (4096, 768), &gpu)?;
    let old = Tensor::new(&[0f32, 0.], &gpu)?;
    let params = ops::update_range(x.as_tensor(), &old)?.narrow(0, 2, ops::QUANTIZE_PARAMS)?;
    type Quant<'a> = &'a dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>;
    let fused: Quant = &|x, p, z| Ok(ops::gated_quantize(x, p, z)?);
    let composed: Quant = &|x, p, z| composed_quantize(x, p, z);
    for (name, f) in [("fused", fused), ("composed", composed)] {
        let fwd = time_ms(&gpu, 20, &|| f(x.as_tensor(), &params, z.as_tensor()).map(|_| ()))?;
        let both = time_ms(&gpu, 20, &|| {
            f(x.as_tensor(), &params, z.as_tensor())?.mul(&w)?.sum_all()?.backward()?;
            Ok(())
        })?;
        println!("timing B-LoRA quantizer [4096, 768] f32 {name}: forward {fwd:.3} ms, forward+backward {both:.3} ms");
    }
    let range = time_ms(&gpu, 20, &|| ops::update_range(x.as_tensor(), &old).map(|_| ()).map_err(Into::into))?;
    println!("timing B-LoRA range update [4096, 768] f32 fused: {range:.3} ms");
    Ok(())
}

/// A layer's weight ranges in one launch (`ranges_fused`, [`ops::update_ranges`]) against the
/// CPU path, to the bit: mixed sizes (one past a block's worth of blocks), an unset range, a
/// non-finite tensor and an empty one, old ranges that are views of the previous step's rows,
/// f32 and f64, over two steps.
#[test]
fn grouped_range_updates_match_cpu() -> Result<()> {
    let gpu = cuda();
    for dtype in [DType::F32, DType::F64] {
        let xs = [
            Tensor::randn(0f32, 0.02, (8, 384), &Device::Cpu)?,
            Tensor::new(&[[0.5f32], [2.0], [0.25]], &Device::Cpu)?,
            Tensor::randn(0f32, 1.0, (300_001,), &Device::Cpu)?,
            Tensor::new(&[1f32, f32::NAN, -3.0], &Device::Cpu)?,
            Tensor::zeros(0, DType::F32, &Device::Cpu)?,
            Tensor::randn(0f32, 0.02, (384, 8), &Device::Cpu)?,
        ]
        .map(|x| x.to_dtype(dtype))
        .into_iter()
        .collect::<candle_core::Result<Vec<_>>>()?;
        let prev = Tensor::new(&[[-0.1f32, 0.1], [0., 0.], [0., 1.], [-1., 1.], [0., 2.], [0., 0.]], &Device::Cpu)?;
        let mut old = prev.clone();
        for step in 0..2 {
            let run = |dev: &Device| -> Result<Tensor> {
                let xs = xs.iter().map(|x| x.to_device(dev)).collect::<candle_core::Result<Vec<_>>>()?;
                let old = old.to_device(dev)?;
                let ranges = (0..xs.len()).map(|i| old.get(i)).collect::<candle_core::Result<Vec<_>>>()?;
                Ok(ops::update_ranges(&xs, &ranges)?)
            };
            let (cpu, gpu_out) = (run(&Device::Cpu)?, run(&gpu)?);
            assert_bits(&format!("ranges {dtype:?} step {step}"), &host_f64(&gpu_out)?, &host_f64(&cpu)?, false);
            old = cpu.narrow(1, 0, 2)?.to_dtype(DType::F32)?;
        }
    }
    Ok(())
}

/// B-LoRA's gate prior as one op per direction (`kernels/gate_prior.cu`, a thread per layer)
/// against its CPU path (the composed ops' floats to the bit, `adapters::blora::bank`): every
/// layer's prior and the bank's gradient, both costs, with rank gates (a long vector too) and
/// without, over soft, saturated and hard-off gates. The kernel rounds each op as the CPU does
/// but uses `tanhf`, so it is compared within f32 tolerance.
#[test]
fn gate_prior_matches_cpu() -> Result<()> {
    let dev = cuda();
    let consts = ops::PriorConsts { logit_shift: 1.598_6, hard_off: -2.0, full_bits: 32.0 };
    for (rank_len, with_rank, n_layers) in [(7usize, true, 18usize), (0, false, 18), (39, true, 5), (7, true, 300)] {
        // Layers cycle through the slot sets of the configs: adapter only, weights only, all
        // eight (quantized base), x and W0 only.
        let kinds: [&[usize]; 4] = [&[2, 3, 4, 5, 6, 7], &[2, 3, 4], &[0, 1, 2, 3, 4, 5, 6, 7], &[0, 1]];
        let mut at = 0;
        let mut layers = Vec::new();
        for k in 0..n_layers {
            let cols = kinds[k % 4];
            let rank = with_rank.then_some(at);
            at += if with_rank { rank_len } else { 0 };
            let bits = cols.iter().enumerate().map(|(j, &c)| (c, at + 4 * j)).collect();
            at += 4 * cols.len();
            let (i, o) = (64.0 + 8.0 * (k % 5) as f64, 96.0 - 4.0 * (k % 3) as f64);
            layers.push(ops::PriorLayer {
                rank,
                bits,
                in_features: i,
                out_features: o,
                base_macs: if cols.contains(&1) { i * o } else { 0.0 },
                rank_full: (rank_len + 1) as f64,
                inv_norm: 1.0 / 4.0e6,
                inv_count: 1.0 / (rank_len + 4 * cols.len()) as f64,
            });
        }
        let values: Vec<f32> = (0..at)
            .map(|i| match i % 7 {
                3 => -2.5,
                5 => 9.0,
                _ => ((i as f32) * 1.37).sin() * 1.8,
            })
            .collect();
        let upstream: Vec<f32> = (0..n_layers).map(|l| 0.5 + 0.01 * l as f32).collect();
        for cost in [ops::PriorCost::Bops, ops::PriorCost::Const] {
            let run = |d: &Device| -> Result<(Tensor, Tensor)> {
                let plan = ops::GatePlan::new(&layers, rank_len, consts, d)?;
                let bank = Var::new(values.as_slice(), d)?;
                let p = ops::gate_prior(bank.as_tensor(), &plan, cost)?;
                let g = p.mul(&Tensor::new(upstream.as_slice(), d)?)?.sum_all()?.backward()?;
                let db = g.get(bank.as_tensor()).cloned().expect("the bank gets a gradient");
                Ok((p, db))
            };
            let (gpu, cpu) = (run(&dev)?, run(&Device::Cpu)?);
            let name = format!("gate prior {cost:?} rank {rank_len} × {n_layers} layers");
            compare(&format!("{name}: priors"), &gpu.0, &cpu.0, Some(1e-5))?;
            compare(&format!("{name}: bank gradient"), &gpu.1, &cpu.1, Some(1e-5))?;
        }
    }
    Ok(())
}
