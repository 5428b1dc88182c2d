//! Behaviour tests of the public API: validation, restore-on-error/panic, resume, micro-batches,
//! dtypes, frozen vars, sync hook, the Optimizer trait.
use candle_core::{DType, Device, Tensor, Var};
use ivon::{AdamW, AdamWConfig, Error, Ivon, IvonConfig, NoiseState, Optimizer, ParamGroup, Sgd, SgdConfig};

fn var(v: &[f32]) -> Var {
    Var::new(v, &Device::Cpu).unwrap()
}

fn values(v: &Var) -> Vec<f32> {
    v.as_tensor().to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// ½ Σ a_i (θ_i − c_i)² as a candle graph; returns its gradients.
fn quad(theta: &Var) -> candle_core::Result<candle_core::backprop::GradStore> {
    let dev = theta.device();
    let a = Tensor::new(&[2f32, 0.5, 10.0], dev)?.to_dtype(theta.dtype())?;
    let c = Tensor::new(&[1f32, -2.0, 0.3], dev)?.to_dtype(theta.dtype())?;
    ((a * (theta.as_tensor() - c)?.sqr()?)?.sum_all()? * 0.5)?.backward()
}

fn small_config() -> IvonConfig {
    IvonConfig { lr: 0.1, ess: 100.0, beta2: 0.99, weight_decay: 1e-2, rescale_lr: false, ..Default::default() }
}

fn field_of(e: Error) -> String {
    match e {
        Error::InvalidHyperParameter { field, value, .. } => format!("{field}={value}"),
        other => panic!("expected InvalidHyperParameter, got {other}"),
    }
}

#[test]
fn bad_hyper_parameters_name_field_and_value() {
    let d = IvonConfig::default();
    let cases: Vec<(IvonConfig, &str)> = vec![
        (IvonConfig { lr: -1.0, ..d }, "lr=-1"),
        (IvonConfig { lr: f64::NAN, ..d }, "lr=NaN"),
        (IvonConfig { ess: 0.0, ..d }, "ess=0"),
        (IvonConfig { hess_init: 0.0, ..d }, "hess_init=0"),
        (IvonConfig { beta1: 1.5, ..d }, "beta1=1.5"),
        (IvonConfig { beta2: -0.1, ..d }, "beta2=-0.1"),
        (IvonConfig { weight_decay: -1e-4, ..d }, "weight_decay=-0.0001"),
        (IvonConfig { mc_samples: 0, ..d }, "mc_samples=0"),
        (IvonConfig { clip_radius: 0.0, ..d }, "clip_radius=0"),
    ];
    for (cfg, want) in cases {
        let err = cfg.validate().unwrap_err();
        let msg = err.to_string();
        assert_eq!(field_of(err), want);
        assert!(msg.contains(want.split('=').next().unwrap()), "{msg}");
        // Constructors validate too: an invalid Ivon cannot exist.
        assert!(Ivon::new(vec![var(&[1.0])], cfg).is_err());
    }
    // Weight decay 0 is allowed (ivon-opt 0.1.3; IVON-LoRA uses it); beta = 0 and 1 too.
    IvonConfig { weight_decay: 0.0, beta1: 0.0, beta2: 1.0, ..d }.validate().unwrap();
    // Per-group overrides are checked and named with their group.
    let groups = vec![ParamGroup::new(vec![var(&[1.0])]), ParamGroup::new(vec![var(&[2.0])]).ess(-3.0)];
    assert_eq!(field_of(Ivon::with_groups(groups, d).unwrap_err()), "groups[1].ess=-3");
    // The baselines validate as well.
    let e = AdamW::new(vec![var(&[1.0])], AdamWConfig { beta2: 1.0, ..Default::default() }).unwrap_err();
    assert_eq!(field_of(e), "beta2=1");
    let e = Sgd::new(vec![var(&[1.0])], SgdConfig { momentum: -0.5, ..Default::default() }).unwrap_err();
    assert_eq!(field_of(e), "momentum=-0.5");
    assert_eq!(field_of("wg-x".parse::<ivon::IvonLoraTask>().unwrap_err()), "task=wg-x");
}

#[test]
fn bad_vars_are_errors_not_dropped() {
    let cfg = IvonConfig::default();
    let ints = Var::from_tensor(&Tensor::new(&[1u32, 2], &Device::Cpu).unwrap()).unwrap();
    assert!(matches!(Ivon::new(vec![var(&[1.0]), ints.clone()], cfg), Err(Error::NonFloatVar { index: 1, .. })));
    assert!(matches!(AdamW::new(vec![ints], AdamWConfig::default()), Err(Error::NonFloatVar { index: 0, .. })));
    let f64var = Var::new(&[1f64], &Device::Cpu).unwrap();
    let e = Ivon::new(vec![var(&[1.0]), f64var], cfg).unwrap_err();
    assert!(matches!(e, Error::MixedDTypes { index: 1, .. }), "{e}");
    assert!(matches!(Ivon::new(vec![], cfg), Err(Error::NoVars)));
    let v = var(&[1.0]);
    assert!(matches!(Ivon::new(vec![v.clone(), v], cfg), Err(Error::DuplicateVar { index: 1, first: 0 })));
    // Mixed devices cannot be built on a CPU-only machine; the check is the same code path
    // (`FlatVars::new`) and refuses any var whose device differs from var #0's.
}

#[test]
fn mean_is_restored_on_error_and_on_panic() {
    let theta = var(&[0.1, 0.2, -0.3]);
    let mut opt = Ivon::new(vec![theta.clone()], small_config()).unwrap();
    let before = values(&theta);
    let r = opt.with_sampled_params(|| {
        assert_ne!(values(&theta), before, "inside, the var holds a sample");
        Err(candle_core::Error::Msg("forward failed".into()))
    });
    assert!(r.is_err());
    assert_eq!(values(&theta), before, "μ restored after Err");
    assert_eq!(opt.pending_samples(), 0, "a failed sample is not recorded");

    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = opt.with_sampled_params(|| panic!("boom"));
    }));
    assert!(r.is_err());
    assert_eq!(values(&theta), before, "μ restored after a panic");

    // Micro-batch API: error part way through.
    let r: Result<(), Error> = opt.with_sample(|s| {
        s.accumulate(&quad(&theta)?)?;
        Err(Error::Sync("simulated".into()))
    });
    assert!(r.is_err());
    assert_eq!(values(&theta), before);
    // A sample without gradients is an error and still restores.
    let s = opt.sample().unwrap();
    assert!(matches!(s.finish(), Err(Error::EmptySample)));
    assert_eq!(values(&theta), before);
    assert!(matches!(opt.step(), Err(Error::NoSamples)));
}

#[test]
fn resume_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ivon_state.safetensors");
    let train = |opt: &mut Ivon, theta: &Var, steps: usize| {
        for _ in 0..steps {
            opt.with_sampled_params(|| quad(theta)).unwrap();
            opt.with_sampled_params(|| quad(theta)).unwrap();
            opt.step().unwrap();
        }
    };
    let cfg = IvonConfig { mc_samples: 2, ..small_config() };

    let straight = var(&[0.1, 0.2, -0.3]);
    let mut a = Ivon::new(vec![straight.clone()], cfg).unwrap();
    a.set_seed(42);
    train(&mut a, &straight, 10);

    let first = var(&[0.1, 0.2, -0.3]);
    let mut b = Ivon::new(vec![first.clone()], cfg).unwrap();
    b.set_seed(42);
    train(&mut b, &first, 5);
    b.save_state(&path).unwrap();
    drop(b);

    let fresh = var(&[9.0, 9.0, 9.0]);
    let mut c = Ivon::new(vec![fresh.clone()], IvonConfig::default()).unwrap();
    c.load_state(&path).unwrap();
    assert_eq!(c.step_count(), 5);
    assert_eq!(*c.config(), cfg, "hyper-parameters come from the file");
    train(&mut c, &fresh, 5);

    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a.mean_flat().unwrap()), bits(&c.mean_flat().unwrap()));
    assert_eq!(bits(&a.momentum_flat().unwrap()), bits(&c.momentum_flat().unwrap()));
    assert_eq!(bits(&a.hess_flat().unwrap()), bits(&c.hess_flat().unwrap()));
    assert_eq!(bits(&values(&straight)), bits(&values(&fresh)));
    assert_eq!(a.noise_state(), c.noise_state());

    // Saving with pending samples is refused; a wrong layout is refused with the path named.
    c.with_sampled_params(|| quad(&fresh)).unwrap();
    assert!(matches!(c.save_state(&path), Err(Error::PendingSamples { count: 1 })));
    let mut other = Ivon::new(vec![var(&[1.0, 2.0])], cfg).unwrap();
    let e = other.load_state(&path).unwrap_err();
    assert!(e.to_string().contains("ivon_state.safetensors"), "{e}");
}

#[test]
fn micro_batches_average_under_one_noise_draw() {
    // Two micro-batches with gradients g1 and g2 under one draw = one batch with (g1+g2)/2.
    let cfg = small_config();
    let t1 = var(&[0.1, 0.2, -0.3]);
    let mut a = Ivon::new(vec![t1.clone()], cfg).unwrap();
    a.with_sample(|s| -> Result<(), Error> {
        s.accumulate(&quad(&t1)?)?;
        let g2 = (t1.as_tensor() * 3.0)?.sum_all()?.backward()?;
        s.accumulate(&g2)?;
        assert_eq!(s.micro_batches(), 2);
        Ok(())
    })
    .unwrap();
    a.step().unwrap();

    let t2 = var(&[0.1, 0.2, -0.3]);
    let mut b = Ivon::new(vec![t2.clone()], cfg).unwrap();
    b.with_sampled_params(|| {
        let l1 = {
            let a = Tensor::new(&[2f32, 0.5, 10.0], &Device::Cpu)?;
            let c = Tensor::new(&[1f32, -2.0, 0.3], &Device::Cpu)?;
            ((a * (t2.as_tensor() - c)?.sqr()?)?.sum_all()? * 0.5)?
        };
        let l2 = (t2.as_tensor() * 3.0)?.sum_all()?;
        ((l1 + l2)? * 0.5)?.backward()
    })
    .unwrap();
    b.step().unwrap();
    for (x, y) in a.mean_flat().unwrap().iter().zip(b.mean_flat().unwrap().iter()) {
        assert!((x - y).abs() <= 1e-6 * y.abs().max(1.0), "{x} vs {y}");
    }
}

#[test]
fn frozen_vars_get_zero_gradient_and_are_still_perturbed() {
    let (w, b) = (var(&[0.5, -0.5]), var(&[1.0]));
    let mut opt = Ivon::new(vec![w.clone(), b.clone()], small_config()).unwrap();
    opt.set_frozen(&b, true).unwrap();
    assert!(opt.is_frozen(&b).unwrap());
    let mut seen_b = 0.0;
    opt.with_sampled_params(|| {
        seen_b = values(&b)[0];
        ((w.as_tensor().sum_all()? + b.as_tensor().sum_all()?)? * 10.0)?.backward()
    })
    .unwrap();
    assert_ne!(seen_b, 1.0, "a frozen var is still sampled (as in ivon-opt)");
    opt.step().unwrap();
    assert_eq!(opt.momentum_flat().unwrap()[2], 0.0, "frozen var sees zero gradient");
    assert_ne!(opt.momentum_flat().unwrap()[0], 0.0);
    assert!(matches!(opt.set_frozen(&var(&[0.0]), true), Err(Error::UnknownVar { .. })));
}

#[test]
fn bf16_vars_keep_an_f32_master_mean() {
    let theta =
        Var::from_tensor(&Tensor::new(&[0.1f32, 0.2, -0.3], &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap())
            .unwrap();
    // IVON-LoRA-like steps of 3e-5 would vanish in bf16 weights around 0.1.
    let cfg = IvonConfig {
        lr: 0.03,
        ess: 1e6,
        hess_init: 1e-3,
        weight_decay: 0.0,
        clip_radius: 1e-3,
        rescale_lr: false,
        ..Default::default()
    };
    let mut opt = Ivon::new(vec![theta.clone()], cfg).unwrap();
    let start = opt.mean_flat().unwrap().to_vec();
    for _ in 0..3 {
        opt.with_sampled_params(|| quad(&theta)).unwrap();
        opt.step().unwrap();
    }
    let moved: Vec<f32> = opt.mean_flat().unwrap().iter().zip(&start).map(|(a, b)| a - b).collect();
    for d in &moved {
        assert!((d.abs() - 9e-5).abs() < 1e-6, "f32 master moved by 3 clipped steps: {moved:?}");
    }
    assert_eq!(theta.dtype(), DType::BF16);
    let want: Vec<f32> = opt.mean_flat().unwrap().iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
    assert_eq!(values(&theta), want, "the var holds μ cast to bf16");
}

#[test]
fn sync_hook_sees_gradient_and_curvature_means() {
    use std::sync::{Arc, Mutex};
    let theta = var(&[0.1, 0.2, -0.3]);
    let mut opt = Ivon::new(vec![theta.clone()], IvonConfig { sync: true, ..small_config() }).unwrap();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let c2 = calls.clone();
    // Pretend a second worker saw zeros: the all-reduce mean halves everything.
    opt.set_sync_fn(Box::new(move |v: &mut [f32]| {
        c2.lock().unwrap().push(v.to_vec());
        v.iter_mut().for_each(|x| *x *= 0.5);
        Ok(())
    }));
    opt.with_sampled_params(|| quad(&theta)).unwrap();
    opt.step().unwrap();
    let calls = calls.lock().unwrap();
    assert_eq!(calls.len(), 2, "ḡ and n̄xg, not h");
    assert_eq!(opt.momentum_flat().unwrap()[0], 0.1 * 0.5 * calls[0][0]);
}

#[test]
fn step_synced_equals_the_stored_hook_without_config_sync() {
    // The same halving as above, passed per call (a communicator that lives in a training loop):
    // the same update as the stored hook with `sync: true`, even with `sync: false` in the config.
    let run = |synced: bool| {
        let theta = var(&[0.1, 0.2, -0.3]);
        let mut opt = Ivon::new(vec![theta.clone()], IvonConfig { sync: !synced, ..small_config() }).unwrap();
        if !synced {
            opt.set_sync_fn(Box::new(|v: &mut [f32]| {
                v.iter_mut().for_each(|x| *x *= 0.5);
                Ok(())
            }));
        }
        for _ in 0..3 {
            opt.with_sampled_params(|| quad(&theta)).unwrap();
            if synced {
                let mut calls = 0;
                opt.step_synced(&mut |v: &mut [f32]| {
                    calls += 1;
                    v.iter_mut().for_each(|x| *x *= 0.5);
                    Ok(())
                })
                .unwrap();
                assert_eq!(calls, 2, "ḡ and the curvature statistic");
            } else {
                opt.step().unwrap();
            }
        }
        (opt.mean_flat().unwrap().to_vec(), opt.hess_flat().unwrap().to_vec())
    };
    assert_eq!(run(true), run(false));
    let theta = var(&[0.1]);
    let mut opt = Ivon::new(vec![theta], small_config()).unwrap();
    assert!(matches!(opt.step_synced(&mut |_: &mut [f32]| Ok(())), Err(ivon::Error::NoSamples)));
}

#[test]
fn optimizer_trait_trains_with_all_three() {
    let run = |opt: &mut dyn Optimizer, theta: &Var| -> f32 {
        for t in 0..200 {
            opt.set_learning_rate(opt.learning_rate() * if t == 100 { 0.5 } else { 1.0 });
            opt.backward_step(&mut || quad(theta)).unwrap();
        }
        let v = values(theta);
        (v[0] - 1.0).abs().max((v[1] + 2.0).abs()).max((v[2] - 0.3).abs())
    };
    let t = var(&[0.1, 0.2, -0.3]);
    let mut ivon = Ivon::new(vec![t.clone()], IvonConfig { ess: 1e4, mc_samples: 2, ..small_config() }).unwrap();
    assert!(run(&mut ivon, &t) < 0.1);
    assert_eq!(ivon.step_count(), 200);
    assert_eq!(ivon.learning_rate(), 0.05);
    let ta = var(&[0.1, 0.2, -0.3]);
    let mut adamw =
        AdamW::new(vec![ta.clone()], AdamWConfig { lr: 0.05, weight_decay: 0.0, ..Default::default() }).unwrap();
    assert!(run(&mut adamw, &ta) < 0.1);
    let t = var(&[0.1, 0.2, -0.3]);
    let mut sgd = Sgd::new(vec![t.clone()], SgdConfig { lr: 0.05, momentum: 0.5, weight_decay: 0.0 }).unwrap();
    assert!(run(&mut sgd, &t) < 0.1);

    // AdamW's state round-trips.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("adamw.safetensors");
    adamw.save_state(&p).unwrap();
    let t2 = var(&[0.0, 0.0, 0.0]);
    let mut again = AdamW::new(vec![t2.clone()], AdamWConfig::default()).unwrap();
    again.load_state(&p).unwrap();
    assert_eq!(values(&t2), values(&ta));
    assert_eq!(again.step_count(), 200);
}

#[test]
fn adamw_first_step_matches_torch_formula() {
    // torch AdamW, step 1: p ← p(1 − lr·wd) − lr·g/(|g| + eps·…) ≈ p(1 − lr·wd) − lr·sign(g).
    let theta = var(&[0.1, 0.2, -0.3]);
    let mut opt =
        AdamW::new(vec![theta.clone()], AdamWConfig { lr: 0.01, weight_decay: 0.1, ..Default::default() }).unwrap();
    opt.step(&quad(&theta).unwrap()).unwrap();
    let got = values(&theta);
    let want = [0.1 * 0.999 + 0.01, 0.2 * 0.999 - 0.01, -0.3 * 0.999 + 0.01];
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
    }
}

#[test]
fn posterior_accessors_and_prediction_samples() {
    let theta = var(&[0.1, 0.2, -0.3]);
    let mut opt = Ivon::new(vec![theta.clone()], small_config()).unwrap();
    let std = opt.std(&theta).unwrap().to_vec1::<f32>().unwrap();
    let want = 1.0 / (100f32 * 1.01).sqrt();
    assert!(std.iter().all(|s| (s - want).abs() < 1e-7));
    assert_eq!(opt.posterior().unwrap().std(), std);
    let mut noise = NoiseState::new(3);
    let s1 = opt.with_posterior_sample(&mut noise, || theta.as_tensor().to_vec1::<f32>()).unwrap();
    let s2 = opt.with_posterior_sample(&mut noise, || theta.as_tensor().to_vec1::<f32>()).unwrap();
    assert_ne!(s1, s2);
    assert_eq!(values(&theta), vec![0.1, 0.2, -0.3]);
    assert_eq!(opt.noise_state(), Some(NoiseState::new(0)), "prediction does not touch the training stream");
    assert_eq!(opt.mean(&theta).unwrap().to_vec1::<f32>().unwrap(), vec![0.1, 0.2, -0.3]);
    assert_eq!(opt.hess(&theta).unwrap().to_vec1::<f32>().unwrap(), vec![1.0; 3]);
}
