//! The B-LoRA layer's unit tests.
use super::*;

fn cfg() -> BLoraConfig {
    BLoraConfig { r: 4, lora_dropout: 0.0, init_e: InitE::Normal, ..BLoraConfig::default() }
}

fn set_logits(v: &GateRef, vals: &[f32]) -> Result<()> {
    v.set(&Tensor::new(vals, v.device())?)
}

#[test]
fn init_and_names() -> Result<()> {
    // AdaLoRA's init: A, B ~ N(0, 0.02²), E = 0.
    let z = BLoraLayer::new(16, 8, &BLoraConfig { init_e: InitE::Zero, ..BLoraConfig::default() }, 3, &Device::Cpu)?;
    assert_eq!(z.lora_e().as_tensor().sum_all()?.to_scalar::<f32>()?, 0.0);
    let a = z.lora_a().flatten_all()?.to_vec1::<f32>()?;
    let std = (a.iter().map(|v| v * v).sum::<f32>() / a.len() as f32).sqrt();
    assert!((0.012..0.03).contains(&std), "{std}");
    // The default, LoRA's init: A Kaiming-uniform (|a| ≤ 1/√16), B = 0, E = 1.
    let l = BLoraLayer::new(16, 8, &BLoraConfig::default(), 3, &Device::Cpu)?;
    assert_eq!(l.lora_e().as_tensor().flatten_all()?.to_vec1::<f32>()?, vec![1.0; 8]);
    assert_eq!(l.lora_b().as_tensor().abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
    let a = l.lora_a().flatten_all()?.to_vec1::<f32>()?;
    assert!(a.iter().all(|v| v.abs() <= 0.25) && a.iter().any(|v| v.abs() > 0.2), "uniform on ±1/√in");
    let names: Vec<String> = l.gate_vars().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        ["rank", "lora_A.bits", "lora_E.bits", "lora_B.bits", "act_A.bits", "act_E.bits", "act_B.bits"]
            .map(|s| format!("blora_gates.{s}"))
    );
    assert_eq!(l.weight_vars()[1].0, "lora_E");
    // B = 0: the adapter starts at zero output.
    let x = Tensor::randn(0f32, 1.0, (2, 3, 16), &Device::Cpu)?;
    let y = l.forward(&x, &Ctx::train(0), 0)?;
    assert_eq!(y.dims(), &[2, 3, 8]);
    assert_eq!(y.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
    Ok(())
}

#[test]
fn eval_matches_hand_computation_with_gates() -> Result<()> {
    let dev = Device::Cpu;
    let l = BLoraLayer::new(6, 5, &cfg(), 1, &dev)?;
    let x = Tensor::randn(0f32, 1.0, (7, 6), &dev)?;
    l.forward(&x, &Ctx::train(1), 0)?; // sets every range
    let (_, rank) = l.gate_vars().into_iter().next().ok_or_else(|| Error::config("t", "", ""))?;
    set_logits(&rank, &[3.0, -3.0, 3.0])?; // [on, off, on] → rank 2
    for (slot, bits) in [(Slot::LoraA, [3f32, -1.0, 0., 0.]), (Slot::LoraB, [3.0, 3.0, 3.0, -5.0])] {
        set_logits(&l.quantizer(slot).map(|q| q.logits.clone()).ok_or_else(|| Error::config("t", "", ""))?, &bits)?;
    }
    let learned = l.learned()?;
    assert_eq!(learned.rank, 2);
    assert_eq!(
        (learned.bits(Slot::LoraA), learned.bits(Slot::LoraB), learned.bits(Slot::LoraE)),
        (Some(4), Some(16), Some(32))
    );
    let y = l.forward(&x, &Ctx::eval(), 0)?;
    // By hand: A, B, E at their bits, rank mask [1, 1, 0, 0], activations at 32 bits (clip only).
    let w = l.eval_weights()?;
    let ra = l.quantizer(Slot::LoraA).map(|q| q.range()).transpose()?.unwrap_or_default();
    let a_ref = super::super::quantizer::quantize_fixed(l.lora_a().as_tensor(), &ra, 4)?;
    assert_eq!(w.a.to_vec2::<f32>()?, a_ref.to_vec2::<f32>()?);
    let clip = |s: Slot, t: Tensor| -> Result<Tensor> {
        let r = l.quantizer(s).map(|q| q.range()).transpose()?.unwrap_or_default();
        Ok(t.clamp(r.x_min, r.x_max)?)
    };
    let h = clip(Slot::ActA, x.matmul(&w.a.t()?)?)?;
    let g = clip(Slot::ActE, h.broadcast_mul(&w.e.mul(&w.rank_mask)?)?)?;
    let want = clip(Slot::ActB, g.matmul(&w.b.t()?)?)?.affine(l.scaling(), 0.0)?;
    assert_eq!(w.rank_mask.to_vec1::<f32>()?, vec![1., 1., 0., 0.]);
    assert_eq!(y.to_vec2::<f32>()?, want.to_vec2::<f32>()?);
    Ok(())
}

#[test]
fn training_forward_is_reproducible_and_reaches_gates() -> Result<()> {
    let dev = Device::Cpu;
    let l = BLoraLayer::new(6, 5, &BLoraConfig { lora_dropout: 0.1, ..cfg() }, 1, &dev)?;
    let x = Tensor::randn(0f32, 1.0, (7, 6), &dev)?;
    for (_, v) in l.gate_vars() {
        v.set(&Tensor::zeros(v.dims(), DType::F32, &dev)?)?; // gates mid-way: samples are soft
    }
    let y1 = l.forward(&x, &Ctx::train(5), 3)?;
    let y2 = l.forward(&x, &Ctx::train(5), 3)?;
    assert_eq!(y1.to_vec2::<f32>()?, y2.to_vec2::<f32>()?);
    assert_ne!(y1.to_vec2::<f32>()?, l.forward(&x, &Ctx::train(6), 3)?.to_vec2::<f32>()?);
    // A clamped sample (z = 0 or 1) passes no gradient to its logit: sum over a few steps.
    let (gate_vars, weight_vars) = (l.gate_vars(), l.weight_vars());
    let mut seen = vec![0f32; gate_vars.len() + weight_vars.len()];
    for step in 0..8 {
        let grads = l.forward(&x, &Ctx::train(step), 3)?.sqr()?.sum_all()?.backward()?;
        let gate_grads = gate_vars.iter().map(|(_, v)| v.grad(&grads)).collect::<Result<Vec<_>>>()?;
        let weight_grads = weight_vars.iter().map(|(_, v)| grads.get(v.as_tensor()).cloned());
        for (g, s) in gate_grads.into_iter().chain(weight_grads).zip(seen.iter_mut()) {
            if let Some(g) = g {
                *s += g.abs()?.sum_all()?.to_scalar::<f32>()?;
            }
        }
    }
    let names = gate_vars.iter().map(|(n, _)| n).chain(weight_vars.iter().map(|(n, _)| n));
    for (name, s) in names.zip(&seen) {
        assert!(*s > 0.0, "{name} gets a gradient");
    }
    Ok(())
}

#[test]
fn quantized_base_replaces_the_base_path() -> Result<()> {
    let dev = Device::Cpu;
    let c = BLoraConfig { quantize_base: true, ..cfg() };
    let l = BLoraLayer::new(6, 5, &c, 1, &dev)?;
    let w = Tensor::randn(0f32, 1.0, (5, 6), &dev)?;
    let x = Tensor::randn(0f32, 1.0, (2, 7, 6), &dev)?;
    let y =
        l.forward_with_base(&x, &w, None, &Ctx::train(0), 0).transpose()?.ok_or_else(|| Error::config("t", "", ""))?;
    assert_eq!(y.dims(), &[2, 7, 5]);
    let bits: Vec<(Slot, u32)> = l.learned()?.bits.into_iter().collect();
    assert_eq!(bits.len(), 8);
    // 32-bit eval: base = clip(x)·clip(W0)ᵀ, W0 within its own range.
    let y_eval =
        l.forward_with_base(&x, &w, None, &Ctx::eval(), 0).transpose()?.ok_or_else(|| Error::config("t", "", ""))?;
    let delta = l.forward(&x, &Ctx::eval(), 0)?;
    let want = x.broadcast_matmul(&w.t()?)?.add(&delta)?;
    let err = y_eval.sub(&want)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(err < 1e-5, "{err}");
    let plain = BLoraLayer::new(6, 5, &cfg(), 1, &dev)?;
    assert!(plain.forward_with_base(&x, &w, None, &Ctx::eval(), 0).is_none());
    Ok(())
}

/// d(prior)/d(log α) by central differences in f32, for every gate logit of the layer.
fn check_prior_gradient(cost: GateCost, c: &BLoraConfig) -> Result<()> {
    let l = BLoraLayer::new(12, 10, c, 2, &Device::Cpu)?;
    // Logits spread around the threshold so every derivative is large, none hard-off.
    for (k, (_, v)) in l.gate_vars().into_iter().enumerate() {
        let n = v.elem_count();
        let vals: Vec<f32> = (0..n).map(|i| 1.5 * ((k * 5 + i * 3) % 7) as f32 / 7.0 - 0.5).collect();
        v.set(&Tensor::from_vec(vals, n, &Device::Cpu)?)?;
    }
    let prior = l.regularizer_with(cost)?;
    assert_eq!(prior.dims(), &[] as &[usize]);
    let grads = prior.backward()?;
    let eps = 1e-2f32;
    for (name, v) in l.gate_vars() {
        // act_B feeds no matmul of the layer: no BOPs, no gradient.
        let g = match v.grad(&grads)? {
            Some(g) => g.to_vec1::<f32>()?,
            None => vec![0.0; v.elem_count()],
        };
        let x0 = v.to_vec()?;
        for i in 0..x0.len() {
            let eval = |d: f32| -> Result<f32> {
                let mut x = x0.clone();
                x[i] += d;
                v.set(&Tensor::from_vec(x, x0.len(), &Device::Cpu)?)?;
                Ok(l.regularizer_with(cost)?.to_scalar::<f32>()?)
            };
            let fd = (eval(eps)? - eval(-eps)?) / (2.0 * eps);
            v.set(&Tensor::from_vec(x0.clone(), x0.len(), &Device::Cpu)?)?;
            let scale = fd.abs().max(g[i].abs()).max(1e-3);
            assert!((fd - g[i]).abs() / scale < 2e-2, "{cost:?} {name}[{i}]: fd {fd} vs backprop {}", g[i]);
        }
    }
    Ok(())
}

#[test]
fn prior_gradient_matches_finite_differences() -> Result<()> {
    check_prior_gradient(GateCost::Bops, &cfg())?;
    check_prior_gradient(GateCost::Const, &cfg())?;
    check_prior_gradient(GateCost::Bops, &BLoraConfig { quantize_base: true, ..cfg() })?;
    Ok(())
}

#[test]
fn prior_values_at_the_extremes() -> Result<()> {
    let l = BLoraLayer::new(12, 10, &cfg(), 2, &Device::Cpu)?;
    for (_, v) in l.gate_vars() {
        v.set(&Tensor::full(30f32, v.dims(), &Device::Cpu)?)?;
    }
    // Every gate on: the bops prior is 1 (normalised by the layer's own full BOPs).
    assert!((l.regularizer_with(GateCost::Bops)?.to_scalar::<f32>()? - 1.0).abs() < 1e-5);
    assert!((l.regularizer_with(GateCost::Const)?.to_scalar::<f32>()? - 1.0).abs() < 1e-5);
    for (_, v) in l.gate_vars() {
        v.set(&Tensor::full(-30f32, v.dims(), &Device::Cpu)?)?;
    }
    // Every gate off: rank 1, 2 bits on A, E, B and activations (x at 32).
    let bops = (12.0 * 32.0 * 2.0 + 2.0 * 2.0 + 10.0 * 2.0 * 2.0) / l.full_bops();
    assert!((l.regularizer_with(GateCost::Bops)?.to_scalar::<f32>()? as f64 - bops).abs() < 1e-6);
    assert!(l.regularizer_with(GateCost::Const)?.to_scalar::<f32>()?.abs() < 1e-6);
    Ok(())
}

#[test]
fn state_round_trips() -> Result<()> {
    let dev = Device::Cpu;
    let l = BLoraLayer::new(6, 5, &cfg(), 1, &dev)?;
    l.forward(&Tensor::randn(0f32, 1.0, (3, 6), &dev)?, &Ctx::train(0), 0)?;
    let state: HashMap<String, Tensor> = l.named_state()?.into_iter().collect();
    let fresh = BLoraLayer::new(6, 5, &cfg(), 9, &dev)?;
    fresh.set_state(&state)?;
    assert_eq!(fresh.ranges()?, l.ranges()?);
    let x = Tensor::randn(0f32, 1.0, (3, 6), &dev)?;
    assert_eq!(
        fresh.forward(&x, &Ctx::eval(), 0)?.to_vec2::<f32>()?,
        l.forward(&x, &Ctx::eval(), 0)?.to_vec2::<f32>()?
    );
    let mut partial = state.clone();
    partial.remove("blora_ranges.act_B.x_max");
    let msg = fresh.set_state(&partial).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("blora_ranges.act_B.x_max"), "{msg}");
    Ok(())
}
