//! The ivon crate's device path (`crates/ivon/src/device/`, `crates/ivon/kernels/ivon.cu`) against
//! its host path, on a CUDA device: IVON and AdamW updates for the same ε and gradients, the
//! device noise generator, posterior samples, and save → load → continue. It lives here, not in
//! `crates/ivon/tests`, so it builds with bayeslora's CUDA dependencies:
//! `CARGO_BUILD_JOBS=1 scripts/device/pack_cuda_tests.sh ivon_cuda`, then on the GPU machine
//! `.device/ivon_cuda --test-threads 1` (5 of 5 passed on an H100, 2026-12-06; since then the
//! device path is the default, `IVON_DEVICE=0` turns it off: `ivon::device_path_enabled`).
#![cfg(feature = "cuda")]

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use ivon::noise::philox_normal;
use ivon::{AdamW, AdamWConfig, HessApprox, Ivon, IvonConfig, NoiseState, Optimizer, ParamGroup};

fn cuda() -> Device {
    assert!(ivon::device_path_enabled(), "the device path is off: run these tests without IVON_DEVICE=0");
    Device::new_cuda(0).expect("these tests need a CUDA device")
}

/// Shapes of the test vars; the last one never gets a gradient.
const SHAPES: [&[usize]; 4] = [&[4, 3], &[7], &[2, 5], &[3]];

/// The vars on `dev` in `dtype`, with fixed values.
fn make_vars(dev: &Device, dtype: DType) -> Vec<Var> {
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n: usize = s.iter().product();
            let v: Vec<f32> = (0..n).map(|j| ((i * 7 + j * 3) % 11) as f32 * 0.1 - 0.5).collect();
            let t = Tensor::from_vec(v, *s, dev).unwrap().to_dtype(dtype).unwrap();
            Var::from_tensor(&t).unwrap()
        })
        .collect()
}

/// Gradients of loss = Σ_i (i+1)·scale·Σ(v_i² − 0.3·v_i) over the first three vars, computed in
/// f32 from the (possibly bf16) values, so both devices compute the same f32 gradient before it
/// is rounded to the var dtype.
fn grads(vars: &[Var], scale: f64) -> candle_core::Result<GradStore> {
    let mut loss = Tensor::zeros((), DType::F32, vars[0].device())?;
    for (i, v) in vars.iter().take(3).enumerate() {
        let x = v.as_tensor().to_dtype(DType::F32)?;
        let term = (x.sqr()? - x.affine(0.3, 0.0)?)?.sum_all()?;
        loss = loss.add(&term.affine((i as f64 + 1.0) * scale, 0.0)?)?;
    }
    loss.backward()
}

fn values(vars: &[Var]) -> Vec<f32> {
    vars.iter()
        .flat_map(|v| {
            v.as_tensor()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_device(&Device::Cpu)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

/// Max |got − want| over elements, reported with the worst index; fails above `tol·max(1, |want|)`.
fn check(name: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{name}: lengths");
    let (mut worst, mut at) = (0f32, 0);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs() / w.abs().max(1.0);
        if d > worst || d.is_nan() {
            (worst, at) = (d, i);
        }
    }
    println!("{name}: worst relative diff {worst:.3e} at {at}");
    assert!(worst <= tol, "{name}: {worst:.3e} at index {at} (got {}, want {})", got[at], want[at]);
}

/// The state an IVON run ends with: μ, m, h and the vars' values.
struct IvonRun {
    mean: Vec<f32>,
    momentum: Vec<f32>,
    hess: Vec<f32>,
    vars: Vec<f32>,
}

/// Trains IVON for `steps` steps on `dev`: two groups (the second with its own lr, hess_init,
/// weight decay and clip), var 1 frozen, var 3 without gradients, 2 MC samples of 2
/// micro-batches each, ε replayed from `NoiseState::new(11)` on the host.
fn run_ivon(dev: &Device, dtype: DType, config: IvonConfig, steps: usize) -> IvonRun {
    let vars = make_vars(dev, dtype);
    let groups = vec![
        ParamGroup::new(vec![vars[0].clone(), vars[1].clone()]),
        ParamGroup::new(vec![vars[2].clone(), vars[3].clone()])
            .lr(0.05)
            .hess_init(0.2)
            .weight_decay(1e-3)
            .clip_radius(0.5),
    ];
    let mut opt = Ivon::with_groups(groups, config).unwrap();
    opt.set_frozen(&vars[1], true).unwrap();
    let mut eps = NoiseState::new(11);
    opt.set_noise_fn(Box::new(move |_, out: &mut [f32]| eps.fill(out)));
    for _ in 0..steps {
        for _ in 0..config.mc_samples {
            opt.with_sample(|s| -> ivon::Result<()> {
                for mb in 0..2 {
                    s.accumulate(&grads(&vars, 1.0 + mb as f64)?)?;
                }
                Ok(())
            })
            .unwrap();
        }
        opt.step().unwrap();
    }
    IvonRun {
        mean: opt.mean_flat().unwrap().into_owned(),
        momentum: opt.momentum_flat().unwrap().into_owned(),
        hess: opt.hess_flat().unwrap().into_owned(),
        vars: values(&vars),
    }
}

#[test]
fn ivon_device_update_equals_the_cpu_for_injected_noise() {
    let gpu = cuda();
    let base = IvonConfig { lr: 0.1, ess: 100.0, hess_init: 0.5, mc_samples: 2, ..Default::default() };
    let cases = [
        ("price", base),
        ("gradsq", IvonConfig { hess_approx: HessApprox::Gradsq, ..base }),
        ("price+clip+wd", IvonConfig { clip_radius: 1e-2, weight_decay: 1e-2, rescale_lr: false, ..base }),
        (
            "gradsq+clip+wd",
            IvonConfig { hess_approx: HessApprox::Gradsq, clip_radius: 1e-2, weight_decay: 1e-2, ..base },
        ),
    ];
    for (name, config) in cases {
        for dtype in [DType::F32, DType::BF16] {
            let want = run_ivon(&Device::Cpu, dtype, config, 4);
            let got = run_ivon(&gpu, dtype, config, 4);
            // bf16 vars: the gradients are bf16 on both sides, the f32 state must still agree.
            let tol = 1e-6;
            check(&format!("{name} {dtype:?} mean"), &got.mean, &want.mean, tol);
            check(&format!("{name} {dtype:?} momentum"), &got.momentum, &want.momentum, tol);
            check(&format!("{name} {dtype:?} hess"), &got.hess, &want.hess, tol);
            check(&format!("{name} {dtype:?} vars"), &got.vars, &want.vars, tol);
            assert_eq!(&got.momentum[12..19], &[0f32; 7], "{name}: frozen var has zero momentum");
        }
    }
}

#[test]
fn adamw_device_update_equals_the_cpu() {
    let gpu = cuda();
    let run = |dev: &Device, dtype: DType| -> (Vec<f32>, Vec<f32>) {
        let vars = make_vars(dev, dtype);
        let mut opt =
            AdamW::new(vars.clone(), AdamWConfig { lr: 0.05, weight_decay: 0.1, ..Default::default() }).unwrap();
        for step in 0..5 {
            opt.step(&grads(&vars, 1.0 + step as f64).unwrap()).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adamw.safetensors");
        opt.save_state(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&std::fs::read(&path).unwrap())
            .unwrap()
            .tensor("v")
            .unwrap()
            .data()
            .to_vec();
        let v = st.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        (values(&vars), v)
    };
    for dtype in [DType::F32, DType::BF16] {
        let (want, want_v) = run(&Device::Cpu, dtype);
        let (got, got_v) = run(&gpu, dtype);
        check(&format!("adamw {dtype:?} vars"), &got, &want, 1e-6);
        check(&format!("adamw {dtype:?} v"), &got_v, &want_v, 1e-6);
        let untouched = make_vars(&Device::Cpu, dtype);
        assert_eq!(&got[got.len() - 3..], &values(&untouched[3..]), "a var without gradient is unchanged");
    }
}

#[test]
fn device_noise_is_standard_reproducible_and_matches_the_host_reference() {
    let gpu = cuda();
    let n = 1 << 20;
    // ess·(h0 + δ) = 1, so σ = 1 and the sample's noise is ε itself.
    let config = IvonConfig { ess: 1.0, hess_init: 1.0, weight_decay: 0.0, ..Default::default() };
    let draw = |seed: u64| -> (Vec<f32>, Vec<f32>) {
        let w = Var::zeros(n, DType::F32, &gpu).unwrap();
        let mut opt = Ivon::new(vec![w.clone()], config).unwrap();
        opt.set_seed(seed);
        let first = opt.sample().unwrap().noise().unwrap().into_owned();
        let sample = opt.sample().unwrap();
        let second = sample.noise().unwrap().into_owned();
        let theta = w.as_tensor().to_device(&Device::Cpu).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(theta, second, "θ = μ + σ⊙ε with μ = 0, σ = 1");
        sample.discard().unwrap();
        assert_eq!(opt.noise_state(), Some(NoiseState { seed, draws: 2 }));
        (first, second)
    };
    let (a, a2) = draw(7);
    let (b, _) = draw(7);
    assert_eq!(a, b, "same seed, same ε");
    assert_ne!(a, a2, "the second draw differs");
    let (c, _) = draw(8);
    assert_ne!(a, c, "another seed, other ε");
    let mean = a.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
    let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
    println!("device ε: mean {mean:.2e} var {var:.5}");
    assert!(mean.abs() < 5e-3 && (var - 1.0).abs() < 5e-3, "mean {mean} var {var}");
    let want: Vec<f32> = (0..n as u64).map(|i| philox_normal(7, 0, i)).collect();
    let want2: Vec<f32> = (0..n as u64).map(|i| philox_normal(7, 1, i)).collect();
    check("device ε vs philox_normal, draw 0", &a, &want, 1e-5);
    check("device ε vs philox_normal, draw 1", &a2, &want2, 1e-5);
}

#[test]
fn device_save_load_continue_equals_uninterrupted() {
    let gpu = cuda();
    let config = IvonConfig { lr: 0.1, ess: 100.0, hess_init: 0.5, clip_radius: 0.1, ..Default::default() };
    let train = |opt: &mut Ivon, vars: &[Var], steps: usize| {
        for _ in 0..steps {
            opt.with_sampled_params(|| grads(vars, 1.0)).unwrap();
            opt.step().unwrap();
        }
    };
    for dtype in [DType::F32, DType::BF16] {
        let straight = make_vars(&gpu, dtype);
        let mut a = Ivon::new(straight.clone(), config).unwrap();
        a.set_seed(5);
        train(&mut a, &straight, 6);

        let first = make_vars(&gpu, dtype);
        let mut b = Ivon::new(first.clone(), config).unwrap();
        b.set_seed(5);
        train(&mut b, &first, 3);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ivon.safetensors");
        b.save_state(&path).unwrap();

        let fresh = make_vars(&gpu, dtype);
        let mut c = Ivon::new(fresh.clone(), config).unwrap();
        c.load_state(&path).unwrap();
        assert_eq!(values(&fresh), values(&first), "{dtype:?}: load writes μ into the vars");
        train(&mut c, &fresh, 3);

        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a.mean_flat().unwrap()), bits(&c.mean_flat().unwrap()), "{dtype:?} mean");
        assert_eq!(bits(&a.momentum_flat().unwrap()), bits(&c.momentum_flat().unwrap()), "{dtype:?} momentum");
        assert_eq!(bits(&a.hess_flat().unwrap()), bits(&c.hess_flat().unwrap()), "{dtype:?} hess");
        assert_eq!(bits(&values(&straight)), bits(&values(&fresh)), "{dtype:?} vars");
        assert_eq!(a.noise_state(), c.noise_state());
        // The posterior read from the device: std per var agrees with the flat h.
        let post = c.posterior().unwrap();
        let std = post.std();
        let mut at = 0;
        for v in &fresh {
            let s = c.std(v).unwrap().flatten_all().unwrap().to_device(&Device::Cpu).unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(s, std[at..at + s.len()], "{dtype:?}: std(var) vs posterior std");
            at += s.len();
        }
    }
}

#[test]
fn device_posterior_samples_equal_the_cpu() {
    let gpu = cuda();
    let config = IvonConfig { ess: 50.0, hess_init: 0.3, ..Default::default() };
    let sample = |dev: &Device| -> (Vec<f32>, Vec<f32>) {
        let vars = make_vars(dev, DType::F32);
        let mut opt = Ivon::new(vars.clone(), config).unwrap();
        let mut noise = NoiseState::new(3);
        let theta = opt.with_posterior_sample(&mut noise, || Ok(values(&vars))).unwrap();
        (theta, values(&vars))
    };
    let (want, want_after) = sample(&Device::Cpu);
    let (got, got_after) = sample(&gpu);
    check("posterior sample", &got, &want, 1e-6);
    assert_eq!(got_after, want_after, "μ is back after the sample");
}
