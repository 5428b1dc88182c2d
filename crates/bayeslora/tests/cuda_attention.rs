#![cfg(feature = "cuda")]
//! GPU tests of the fused attention kernels (`ops::flash_attention`, kernels/flash_attention.cu)
//! against the plain materialised-scores path (`ops::plain_attention`) on the CPU in f32.
//!
//! Each case checks the output and the gradients dq, dk, dv of `sum(O ∘ W)` for a fixed random
//! W. Errors are `max |got − want| / max |want|` over the tensor, printed for every case.
//!
//! Tolerances:
//! - f32: 1e-4. Same math in f32, only the summation order differs (tiles, online softmax,
//!   atomics for dq).
//! - bf16: 1e-2, and at most 2× (+1e-3) the error of the plain path run on CUDA in bf16. The
//!   reference gets the same bf16-rounded q, k, v and W (so input rounding is not counted); what
//!   remains is rounding of O and of dq/dk/dv to bf16 (relative 2⁻⁹ ≈ 2e-3 each) and, on the
//!   tensor cores, of P (forward and backward) and dS to bf16 as mma operands, with f32
//!   accumulation. The plain bf16 path also rounds the scores, probabilities and dS to bf16, so
//!   the fused path should be no worse than it.
//!
//! The cases cover what the tensor-core kernels tile: T below, at and past a multiple of the
//! 64-row tile (50, 64, 70, 100, 129, 130, 193, 200), head dims 32, 64 and 128 in bf16 and f16,
//! GQA, left padding that makes whole and partial tiles of "dead" query rows, right padding, and
//! a batch row that is all padding.
//!
//! Run: `cargo test --release -p bayeslora --features cuda --test cuda_attention -- --nocapture`
//! (or the prebuilt `target/cuda/release/deps/cuda_attention-*`).
use bayeslora::ops::{self, AttentionMask};
use candle_core::{DType, Device, Result, Tensor, Var};

fn cuda() -> Device {
    Device::new_cuda(0).expect("a CUDA device")
}

/// `n` values of N(0, 1) from a seeded splitmix64 + Box–Muller (reproducible on every machine).
fn normal(n: usize, seed: u64) -> Vec<f32> {
    bayeslora::bench::normal_cpu(n, 1.0, seed)
}

fn randn(shape: &[usize], seed: u64) -> Result<Tensor> {
    Tensor::from_vec(normal(shape.iter().product(), seed), shape, &Device::Cpu)
}

/// Per batch row: (left padding, right padding) in tokens.
#[derive(Debug, Clone, Copy)]
struct Case {
    name: &'static str,
    b: usize,
    h: usize,
    hkv: usize,
    t: usize,
    d: usize,
    causal: bool,
    /// One (left, right) padding per batch row; empty = no padding tensor at all.
    pads: &'static [(usize, usize)],
}

const CASES: &[Case] = &[
    // BERT-like: D = 32, non-causal, right padding, T not a multiple of the 64-row tile.
    Case {
        name: "d32_bert_rightpad",
        b: 3,
        h: 4,
        hkv: 4,
        t: 50,
        d: 32,
        causal: false,
        pads: &[(0, 0), (0, 13), (0, 49)],
    },
    // SmolLM2-like: D = 64, GQA 6/2, causal; right, left (more than one tile of padding
    // queries: whole dead tiles and a mixed one) and no padding.
    Case {
        name: "d64_gqa_causal_mixedpad",
        b: 3,
        h: 6,
        hkv: 2,
        t: 130,
        d: 64,
        causal: true,
        pads: &[(0, 17), (70, 0), (0, 0)],
    },
    // Llama-like: D = 128, GQA 4/1, causal, left and right padding.
    Case { name: "d128_gqa_causal_pad", b: 2, h: 4, hkv: 1, t: 100, d: 128, causal: true, pads: &[(10, 0), (0, 20)] },
    // Causal, no padding tensor, exactly one tile.
    Case { name: "d128_causal_nopad_t64", b: 1, h: 2, hkv: 2, t: 64, d: 128, causal: true, pads: &[] },
    // Non-causal with a batch row that is all padding (every row sees only masked keys).
    Case {
        name: "d64_noncausal_allpad_row",
        b: 2,
        h: 2,
        hkv: 1,
        t: 70,
        d: 64,
        causal: false,
        pads: &[(0, 70), (5, 3)],
    },
    // Causal, D = 32, several tiles, no padding, GQA.
    Case { name: "d32_causal_gqa_t200", b: 2, h: 4, hkv: 2, t: 200, d: 32, causal: true, pads: &[] },
    // D = 128, causal, GQA 4/2, T = 3 tiles + 1 row; dead rows over one and a half tiles (left
    // padding 100), right padding in the other batch row.
    Case {
        name: "d128_gqa_causal_t193_pad",
        b: 2,
        h: 4,
        hkv: 2,
        t: 193,
        d: 128,
        causal: true,
        pads: &[(0, 30), (100, 0)],
    },
    // D = 64, non-causal, GQA 4/1, T = 2 tiles + 1 row, left and right padding (the last key tile
    // holds one key, padding in the other row).
    Case {
        name: "d64_gqa_noncausal_t129_pad",
        b: 2,
        h: 4,
        hkv: 1,
        t: 129,
        d: 64,
        causal: false,
        pads: &[(3, 0), (0, 64)],
    },
];

fn padding(case: &Case) -> Result<Option<Tensor>> {
    if case.pads.is_empty() {
        return Ok(None);
    }
    let t = case.t;
    let v: Vec<f32> = case
        .pads
        .iter()
        .flat_map(|&(left, right)| (0..t).map(move |j| if j < left || j >= t - right { 0.0 } else { 1.0 }))
        .collect();
    Ok(Some(Tensor::from_vec(v, (case.b, t), &Device::Cpu)?))
}

struct Outputs {
    o: Tensor,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
}

/// Output and gradients of `sum(attn(q, k, v) ∘ w)`, all returned as CPU f32.
fn run(
    attn: &dyn Fn(&Tensor, &Tensor, &Tensor, &AttentionMask) -> Result<Tensor>,
    inputs: &[Tensor; 4],
    pad: Option<&Tensor>,
    case: &Case,
    dtype: DType,
    dev: &Device,
) -> Result<Outputs> {
    let put = |t: &Tensor| -> Result<Tensor> { t.to_dtype(dtype)?.to_device(dev) };
    let q = Var::from_tensor(&put(&inputs[0])?)?;
    let k = Var::from_tensor(&put(&inputs[1])?)?;
    let v = Var::from_tensor(&put(&inputs[2])?)?;
    let w = put(&inputs[3])?;
    let pad = pad.map(|p| p.to_device(dev)).transpose()?;
    let mask = AttentionMask::new(pad.as_ref(), case.causal, case.b, case.t, dev)?;
    let o = attn(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask)?;
    let loss = o.mul(&w)?.to_dtype(DType::F32)?.sum_all()?;
    let grads = loss.backward()?;
    let get = |x: &Var| -> Result<Tensor> {
        grads.get(x.as_tensor()).expect("gradient reaches the input").to_dtype(DType::F32)?.to_device(&Device::Cpu)
    };
    Ok(Outputs { o: o.to_dtype(DType::F32)?.to_device(&Device::Cpu)?, dq: get(&q)?, dk: get(&k)?, dv: get(&v)? })
}

/// `max |a − b| / max |b|`.
fn rel_err(a: &Tensor, b: &Tensor) -> Result<f32> {
    let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let scale = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-12);
    Ok(diff / scale)
}

fn errors(got: &Outputs, want: &Outputs) -> Result<[f32; 4]> {
    Ok([
        rel_err(&got.o, &want.o)?,
        rel_err(&got.dq, &want.dq)?,
        rel_err(&got.dk, &want.dk)?,
        rel_err(&got.dv, &want.dv)?,
    ])
}

fn all_finite(t: &Tensor) -> Result<bool> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().all(|x| x.is_finite()))
}

fn inputs(case: &Case, seed: u64, dtype: DType) -> Result<[Tensor; 4]> {
    let (b, h, hkv, t, d) = (case.b, case.h, case.hkv, case.t, case.d);
    // Rounded to `dtype` and back, so the f32 reference sees exactly what the kernel sees.
    let r = |x: Tensor| -> Result<Tensor> { x.to_dtype(dtype)?.to_dtype(DType::F32) };
    Ok([
        r(randn(&[b, h, t, d], seed)?)?,
        r(randn(&[b, hkv, t, d], seed + 1)?)?,
        r(randn(&[b, hkv, t, d], seed + 2)?)?,
        r(randn(&[b, h, t, d], seed + 3)?)?,
    ])
}

fn check_case(case: &Case, dtype: DType) -> Result<()> {
    let dev = cuda();
    let x = inputs(case, 17, dtype)?;
    let pad = padding(case)?;
    let want = run(&ops::plain_attention, &x, pad.as_ref(), case, DType::F32, &Device::Cpu)?;
    let got = run(&ops::flash_attention, &x, pad.as_ref(), case, dtype, &dev)?;
    for (n, t) in [("o", &got.o), ("dq", &got.dq), ("dk", &got.dk), ("dv", &got.dv)] {
        assert!(all_finite(t)?, "{} {dtype:?}: non-finite {n}", case.name);
    }
    let e = errors(&got, &want)?;
    let names = ["o", "dq", "dk", "dv"];
    match dtype {
        DType::F32 => {
            println!(
                "{} f32: flash vs cpu f32 max rel err o {:.2e} dq {:.2e} dk {:.2e} dv {:.2e}",
                case.name, e[0], e[1], e[2], e[3]
            );
            for (n, err) in names.iter().zip(e) {
                assert!(err < 1e-4, "{} f32 {n}: rel err {err:.3e}", case.name);
            }
        }
        _ => {
            let plain = run(&ops::plain_attention, &x, pad.as_ref(), case, dtype, &dev)?;
            let p = errors(&plain, &want)?;
            println!(
                "{} {dtype:?}: flash max rel err o {:.2e} dq {:.2e} dk {:.2e} dv {:.2e} | plain-cuda {:.2e} {:.2e} {:.2e} {:.2e}",
                case.name, e[0], e[1], e[2], e[3], p[0], p[1], p[2], p[3]
            );
            for ((n, err), perr) in names.iter().zip(e).zip(p) {
                assert!(err < 1e-2, "{} {dtype:?} {n}: rel err {err:.3e}", case.name);
                assert!(
                    err <= 2.0 * perr + 1e-3,
                    "{} {dtype:?} {n}: flash {err:.3e} vs plain bf16 {perr:.3e}",
                    case.name
                );
            }
        }
    }
    Ok(())
}

#[test]
fn flash_matches_plain_f32() -> Result<()> {
    for case in CASES {
        check_case(case, DType::F32)?;
    }
    Ok(())
}

#[test]
fn flash_matches_plain_bf16() -> Result<()> {
    for case in CASES {
        check_case(case, DType::BF16)?;
    }
    Ok(())
}

#[test]
fn flash_matches_plain_f16() -> Result<()> {
    // The f16 instantiations (same code as bf16, the f16 mma): one case per head dim.
    for name in ["d32_bert_rightpad", "d64_gqa_causal_mixedpad", "d128_gqa_causal_t193_pad"] {
        let case = CASES.iter().find(|c| c.name == name).expect("a case of that name");
        check_case(case, DType::F16)?;
    }
    Ok(())
}

#[test]
fn unaligned_views_give_the_same_result() -> Result<()> {
    // The tensor-core kernels load 16 bytes at a time: a contiguous view that starts at an odd
    // element of its storage is copied first, and must give exactly what an aligned copy gives
    // (exactly: the bf16/f16 backward has no atomics, so its gradients are deterministic).
    let case = &CASES[1];
    let dev = cuda();
    let (b, h, hkv, t, d) = (case.b, case.h, case.hkv, case.t, case.d);
    let pad = padding(case)?.map(|p| p.to_device(&dev)).transpose()?;
    let mask = AttentionMask::new(pad.as_ref(), case.causal, b, t, &dev)?;
    for dtype in [DType::BF16, DType::F16] {
        // A variable of n + 3 elements; the view skips the first 3.
        let flat = |n: usize, seed: u64| -> Result<Var> {
            Var::from_tensor(
                &Tensor::from_vec(normal(n + 3, seed), n + 3, &Device::Cpu)?.to_dtype(dtype)?.to_device(&dev)?,
            )
        };
        let view = |x: &Var, shape: [usize; 4]| -> Result<Tensor> {
            x.as_tensor().narrow(0, 3, shape.iter().product())?.reshape(shape.to_vec())
        };
        let (qs, ks) = ([b, h, t, d], [b, hkv, t, d]);
        let (qf, kf, vf) = (flat(b * h * t * d, 41)?, flat(b * hkv * t * d, 42)?, flat(b * hkv * t * d, 43)?);
        let (q, k, v) = (view(&qf, qs)?, view(&kf, ks)?, view(&vf, ks)?);
        assert_eq!(q.layout().start_offset(), 3);
        let got = ops::flash_attention(&q, &k, &v, &mask)?;
        let grads = got.to_dtype(DType::F32)?.sum_all()?.backward()?;
        let (qa, ka, va) =
            (Var::from_tensor(&q.copy()?)?, Var::from_tensor(&k.copy()?)?, Var::from_tensor(&v.copy()?)?);
        assert_eq!(qa.as_tensor().layout().start_offset(), 0);
        let want = ops::flash_attention(qa.as_tensor(), ka.as_tensor(), va.as_tensor(), &mask)?;
        let grads_want = want.to_dtype(DType::F32)?.sum_all()?.backward()?;
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?.abs()?.max_all()?.to_scalar::<f32>()
        };
        assert_eq!(diff(&got, &want)?, 0.0, "{dtype:?}: output of unaligned views");
        for (n, x, xa, shape) in [("dq", &qf, &qa, qs), ("dk", &kf, &ka, ks), ("dv", &vf, &va, ks)] {
            let g = grads.get(x.as_tensor()).expect("gradient reaches the input");
            let g = g.narrow(0, 3, shape.iter().product())?.reshape(shape.to_vec())?;
            let gw = grads_want.get(xa.as_tensor()).expect("gradient reaches the input");
            assert_eq!(diff(&g, gw)?, 0.0, "{dtype:?}: {n} of unaligned views");
        }
    }
    Ok(())
}

#[test]
fn padded_query_rows_are_finite() -> Result<()> {
    // Left padding: the first 40 queries see no real key at or before them (dead rows).
    let case = Case { name: "leftpad", b: 2, h: 2, hkv: 2, t: 96, d: 64, causal: true, pads: &[(40, 0), (0, 0)] };
    let dev = cuda();
    for dtype in [DType::F32, DType::BF16] {
        let x = inputs(&case, 5, dtype)?;
        let pad = padding(&case)?;
        let got = run(&ops::flash_attention, &x, pad.as_ref(), &case, dtype, &dev)?;
        let head = got.o.narrow(2, 0, 40)?;
        println!("padded rows {dtype:?}: max |o| {:.3}", head.abs()?.max_all()?.to_scalar::<f32>()?);
        for (n, t) in [("o", &got.o), ("dq", &got.dq), ("dk", &got.dk), ("dv", &got.dv)] {
            assert!(all_finite(t)?, "{dtype:?}: non-finite {n} with left padding");
        }
    }
    Ok(())
}

#[test]
fn attention_dispatches_to_flash_on_cuda_and_env_forces_plain() -> Result<()> {
    let case = &CASES[1];
    let dev = cuda();
    let x = inputs(case, 3, DType::BF16)?;
    let pad = padding(case)?.map(|p| p.to_device(&dev)).transpose()?;
    let mask = AttentionMask::new(pad.as_ref(), case.causal, case.b, case.t, &dev)?;
    let [q, k, v, _] = x.map(|t| t.to_dtype(DType::BF16).and_then(|t| t.to_device(&dev)).expect("upload"));
    assert!(ops::flash_supported(&q, &k, &v, &mask));
    let flash = ops::flash_attention(&q, &k, &v, &mask)?.to_dtype(DType::F32)?;
    let plain = ops::plain_attention(&q, &k, &v, &mask)?.to_dtype(DType::F32)?;
    let dispatched = ops::attention(&q, &k, &v, &mask)?.to_dtype(DType::F32)?;
    let forced = if ops::plain_attention_forced() {
        None
    } else {
        // SAFETY (of the test): no other test reads the variable; the flash tests call
        // flash_attention / plain_attention directly.
        std::env::set_var(ops::PLAIN_ATTENTION_ENV, "1");
        let forced = ops::attention(&q, &k, &v, &mask)?.to_dtype(DType::F32)?;
        std::env::remove_var(ops::PLAIN_ATTENTION_ENV);
        Some(forced)
    };
    let same = |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.max_all()?.to_scalar::<f32>() };
    assert_eq!(same(&dispatched, &flash)?, 0.0, "ops::attention on CUDA bf16 D=64 takes the flash path");
    if let Some(forced) = forced {
        assert_eq!(same(&forced, &plain)?, 0.0, "{}=1 forces the plain path", ops::PLAIN_ATTENTION_ENV);
    }
    // Unsupported head dim → plain path, still works.
    let q48 = q.narrow(3, 0, 48)?.contiguous()?;
    let k48 = k.narrow(3, 0, 48)?.contiguous()?;
    let v48 = v.narrow(3, 0, 48)?.contiguous()?;
    assert!(!ops::flash_supported(&q48, &k48, &v48, &mask));
    let a = ops::attention(&q48, &k48, &v48, &mask)?.to_dtype(DType::F32)?;
    let b = ops::plain_attention(&q48, &k48, &v48, &mask)?.to_dtype(DType::F32)?;
    assert_eq!(same(&a, &b)?, 0.0);
    Ok(())
}

#[test]
fn large_scores_over_many_tiles_match_plain() -> Result<()> {
    // A Llama-2-7B head (D = 128, causal, T = 512: eight key tiles) with the magnitudes an IVON
    // sample of LoRA(q, v) can produce: |q| ~ 30, |v| ~ 100 per element, scores in the
    // hundreds. Online softmax must rescale exactly; nothing may overflow.
    let case = Case { name: "d128_causal_t512_large", b: 2, h: 4, hkv: 4, t: 512, d: 128, causal: true, pads: &[] };
    let dev = cuda();
    for dtype in [DType::F32, DType::BF16] {
        let [q, k, v, w] = inputs(&case, 23, dtype)?;
        let r = |x: Tensor, s: f64| -> Result<Tensor> { x.affine(s, 0.0)?.to_dtype(dtype)?.to_dtype(DType::F32) };
        let x = [r(q, 30.0)?, r(k, 3.0)?, r(v, 100.0)?, w];
        let want = run(&ops::plain_attention, &x, None, &case, DType::F32, &Device::Cpu)?;
        let got = run(&ops::flash_attention, &x, None, &case, dtype, &dev)?;
        for (n, t) in [("o", &got.o), ("dq", &got.dq), ("dk", &got.dk), ("dv", &got.dv)] {
            assert!(all_finite(t)?, "{dtype:?}: non-finite {n} with large scores");
        }
        let e = errors(&got, &want)?;
        println!("{} {dtype:?}: rel err o {:.2e} dq {:.2e} dk {:.2e} dv {:.2e}", case.name, e[0], e[1], e[2], e[3]);
        let tol = if dtype == DType::F32 { 1e-4 } else { 2e-2 };
        for (n, err) in ["o", "dq", "dk", "dv"].iter().zip(e) {
            assert!(err < tol, "{} {dtype:?} {n}: rel err {err:.3e}", case.name);
        }
    }
    Ok(())
}

#[test]
fn timing_breakdown_bf16() -> Result<()> {
    // Prints where the time of `bayeslora bench attention` goes at its shapes (bf16, causal);
    // asserts nothing about speed. The bench times forward + `sum(O ∘ W)` + backward, and
    // candle's `sum_all` reduces the whole tensor in a single block, so the loss alone is timed
    // too, and a cheaper loss (sums over D first), whose own cost is subtracted to leave the
    // attention's forward + backward.
    let dev = cuda();
    for (b, h, t, d) in [(4, 32, 2048, 128), (4, 32, 512, 128)] {
        let make = |seed: u64| -> Result<Tensor> { randn(&[b, h, t, d], seed)?.to_dtype(DType::BF16)?.to_device(&dev) };
        let (q, k, v, w) =
            (Var::from_tensor(&make(1)?)?, Var::from_tensor(&make(2)?)?, Var::from_tensor(&make(3)?)?, make(4)?);
        let mask = AttentionMask::new(None, true, b, t, &dev)?;
        let time = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
            for _ in 0..3 {
                f()?;
            }
            dev.synchronize()?;
            let start = std::time::Instant::now();
            for _ in 0..10 {
                f()?;
            }
            dev.synchronize()?;
            Ok(start.elapsed().as_secs_f64() * 1e3 / 10.0)
        };
        let attn = || ops::flash_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask);
        let bench_loss = |x: &Tensor| -> Result<()> { x.mul(&w)?.sum_all()?.backward().map(drop) };
        let cheap_loss = |x: &Tensor| -> Result<()> { x.mul(&w)?.sum_keepdim(3)?.sum_all()?.backward().map(drop) };
        let fwd = time(&|| {
            let (q, k, v) = (q.as_tensor().detach(), k.as_tensor().detach(), v.as_tensor().detach());
            ops::flash_attention(&q, &k, &v, &mask).map(drop)
        })?;
        let bench = time(&|| bench_loss(&attn()?))?;
        let bench_loss_alone = time(&|| bench_loss(q.as_tensor()))?;
        let cheap = time(&|| cheap_loss(&attn()?))?;
        let cheap_loss_alone = time(&|| cheap_loss(q.as_tensor()))?;
        println!(
            "timing {b}x{h}x{t}x{d} bf16 causal: fwd {fwd:.3} ms | fwd + sum(O∘W) + bwd {bench:.3} ms, the loss on a \
             variable alone {bench_loss_alone:.3} ms | with sums over D first {cheap:.3} ms, its loss alone \
             {cheap_loss_alone:.3} ms | attention fwd + bwd ≈ {:.3} ms",
            cheap - cheap_loss_alone
        );
        assert!(fwd > 0.0 && cheap > 0.0);
    }
    Ok(())
}
