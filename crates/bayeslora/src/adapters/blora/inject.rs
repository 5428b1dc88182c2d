//! [`attach_blora`]: puts a [`BLoraLayer`] on every linear whose HF module name `target_modules`
//! selects, as [`crate::adapters::attach`] does for LoRA (the base layer is never replaced).
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Device, Tensor, Var};

use super::bank::{GateBank, PriorPlan};
use super::config::{BLoraConfig, GateCost};
use super::layer::{BLoraLayer, LearnedLayer};
use crate::adapters::lora::inject::select_targets;
use crate::adapters::lora::PEFT_PREFIX;
use crate::adapters::{Adapter, Ctx, HasLinears};
use crate::{Error, Result};

/// The B-LoRA layers [`attach_blora`] installed, in the model's module order, with the one
/// [`GateBank`] that holds all their gate logits.
#[derive(Debug, Clone, Default)]
pub struct AttachedBLora {
    /// `(HF module name, layer)`; the same `Arc` sits in the model's [`Linear`].
    pub layers: Vec<(String, Arc<BLoraLayer>)>,
    /// Every layer's gates (`None` without gates).
    bank: Option<Arc<GateBank>>,
    /// The prior of every layer as one computation over the bank, and its cost.
    prior: Option<(Arc<PriorPlan>, GateCost)>,
}

/// The name of the bank's var under [`PEFT_PREFIX`] and a model prefix: one flat `[G]` vector,
/// layer after layer (see [`super::bank`]).
pub const GATE_BANK_NAME: &str = "blora_gates";

impl AttachedBLora {
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// The layer on one module, by its full name.
    pub fn get(&self, module: &str) -> Option<&Arc<BLoraLayer>> {
        self.layers.iter().find(|(m, _)| m == module).map(|(_, l)| l)
    }

    fn named(&self, prefix: &str, vars: impl Fn(&BLoraLayer) -> Vec<(String, Var)>) -> Vec<(String, Var)> {
        self.layers
            .iter()
            .flat_map(|(m, l)| vars(l).into_iter().map(move |(s, v)| (format!("{PEFT_PREFIX}{prefix}{m}.{s}"), v)))
            .collect()
    }

    /// A, E, B of every layer in PEFT's key form, `base_model.model.{prefix}{module}.lora_A.weight`
    /// (`prefix`: `bert.` when PEFT wraps `BertForSequenceClassification`): the weights for the
    /// main optimizer.
    pub fn named_weight_vars_with_prefix(&self, prefix: &str) -> Vec<(String, Var)> {
        self.named(prefix, BLoraLayer::weight_vars)
    }

    /// The gate logits of every layer in one var, `base_model.model.{prefix}blora_gates`
    /// (`[G]`, layer after layer; each layer's part is [`BLoraLayer::gate_vars`]): for the gate
    /// optimizer (Adam at `gate_lr`, no weight decay). Empty without gates.
    pub fn named_gate_vars_with_prefix(&self, prefix: &str) -> Vec<(String, Var)> {
        self.bank.iter().map(|b| (format!("{PEFT_PREFIX}{prefix}{GATE_BANK_NAME}"), b.var().clone())).collect()
    }

    /// The bank of every layer's gate logits.
    pub fn gate_bank(&self) -> Option<&Arc<GateBank>> {
        self.bank.as_ref()
    }

    /// The bank's values from the per-layer gate tensors `{module}.blora_gates.rank` and
    /// `{module}.blora_gates.<slot>.bits` under `base_model.model.{prefix}` in `saved` (the
    /// layout of checkpoints written before the gates were one var); `None` when `saved` lacks
    /// any of them.
    pub fn bank_from_per_layer(&self, prefix: &str, saved: &HashMap<String, Tensor>) -> Result<Option<Tensor>> {
        let Some(bank) = &self.bank else { return Ok(None) };
        let mut parts = Vec::new();
        for (m, l) in &self.layers {
            for (s, g) in l.gate_vars() {
                let Some(t) = saved.get(&format!("{PEFT_PREFIX}{prefix}{m}.{s}")) else { return Ok(None) };
                if t.elem_count() != g.elem_count() {
                    return Err(Error::config(
                        &format!("{m}.{s}"),
                        format!("{:?}", t.dims()),
                        format!("expected {} gate logits", g.elem_count()),
                    ));
                }
                parts.push(t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_device(bank.var().device())?);
            }
        }
        Ok(Some(Tensor::cat(&parts, 0)?))
    }

    /// Every layer's full state (weights, gates, ranges) under the same keys.
    pub fn named_state_with_prefix(&self, prefix: &str) -> Result<Vec<(String, Tensor)>> {
        self.collect(prefix, BLoraLayer::named_state)
    }

    /// Restores [`Self::named_state_with_prefix`].
    pub fn set_state_with_prefix(&self, prefix: &str, state: &HashMap<String, Tensor>) -> Result<()> {
        self.restore(prefix, state, BLoraLayer::set_state)
    }

    /// Every quantizer's range under the same keys: what a checkpoint needs besides the vars.
    pub fn named_ranges_with_prefix(&self, prefix: &str) -> Result<Vec<(String, Tensor)>> {
        self.collect(prefix, BLoraLayer::named_ranges)
    }

    /// Restores [`Self::named_ranges_with_prefix`].
    pub fn set_ranges_with_prefix(&self, prefix: &str, state: &HashMap<String, Tensor>) -> Result<()> {
        self.restore(prefix, state, BLoraLayer::set_ranges)
    }

    fn collect(
        &self,
        prefix: &str,
        tensors: impl Fn(&BLoraLayer) -> Result<Vec<(String, Tensor)>>,
    ) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (m, l) in &self.layers {
            for (s, t) in tensors(l)? {
                out.push((format!("{PEFT_PREFIX}{prefix}{m}.{s}"), t));
            }
        }
        Ok(out)
    }

    fn restore(
        &self,
        prefix: &str,
        state: &HashMap<String, Tensor>,
        set: impl Fn(&BLoraLayer, &HashMap<String, Tensor>) -> Result<()>,
    ) -> Result<()> {
        for (m, l) in &self.layers {
            let head = format!("{PEFT_PREFIX}{prefix}{m}.");
            let mine = state.iter().filter_map(|(k, t)| k.strip_prefix(&head).map(|s| (s.to_string(), t.clone())));
            set(l, &mine.collect())?;
        }
        Ok(())
    }

    /// The summed gate prior of every layer (μ not included; scalar): `None` when no layer has
    /// gates. One vectorised computation over the bank ([`PriorPlan`]), not one per layer.
    pub fn regularizer(&self) -> Result<Option<Tensor>> {
        match (&self.bank, &self.prior) {
            (Some(bank), Some((plan, cost))) => Ok(Some(plan.prior(bank.var().as_tensor(), *cost)?)),
            _ => Ok(None),
        }
    }

    /// Learned rank and bits per module (deterministic gates).
    pub fn learned(&self) -> Result<Vec<(String, LearnedLayer)>> {
        self.layers.iter().map(|(m, l)| Ok((m.clone(), l.learned()?))).collect()
    }
}

/// Attaches a fresh [`BLoraLayer`] to every linear of `model` that `config.target_modules`
/// selects. Layer k (in the model's module order) draws its A, B (and E) from
/// `Ctx { seed }.seed_for(k)`; vars are created on `device`. The `bops` prior of every layer is
/// normalised by the mean over the adapted layers of their BOPs with every gate on.
///
/// Fails, before changing anything, when the config is invalid, `target_modules` is unset (fill
/// it with [`BLoraConfig::with_default_targets`]), a listed target matches no linear (the error
/// lists the available names), or a selected linear already carries an adapter.
pub fn attach_blora(
    model: &mut dyn HasLinears,
    config: &BLoraConfig,
    seed: u64,
    device: &Device,
) -> Result<AttachedBLora> {
    config.validate()?;
    let targets = config.target_modules.as_ref().ok_or_else(|| {
        Error::config(
            "target_modules",
            "null",
            "set it (e.g. [\"query\", \"key\", \"value\"]) or call BLoraConfig::with_default_targets(arch)",
        )
    })?;
    let selected = select_targets(model, targets)?;
    // Build every layer before installing any, so an error leaves the model untouched.
    let mut built = Vec::with_capacity(selected.len());
    for (k, (_, linear)) in selected.iter().enumerate() {
        let layer_seed = Ctx { seed, ..Ctx::eval() }.seed_for(k as u64);
        built.push(BLoraLayer::new(linear.in_features(), linear.out_features(), config, layer_seed, device)?);
    }
    let norm = built.iter().map(BLoraLayer::full_bops).sum::<f64>() / built.len().max(1) as f64;
    // Every layer's gates into one bank, in layer order (each layer's own order within).
    let mut values = Vec::with_capacity(built.iter().map(BLoraLayer::gate_count).sum());
    for layer in &built {
        for (_, g) in layer.gate_vars() {
            values.extend(g.to_vec()?);
        }
    }
    let bank = (!values.is_empty()).then(|| GateBank::new(&values, device)).transpose()?;
    let mut offset = 0;
    for layer in &mut built {
        layer.set_bops_norm(norm)?;
        if let Some(bank) = &bank {
            layer.bind_gates(bank, offset)?;
            offset += layer.gate_count();
        }
    }
    let prior = match &bank {
        Some(_) => {
            let costs: Vec<_> = built.iter().map(BLoraLayer::cost_terms).collect();
            Some((Arc::new(PriorPlan::new(&costs, device)?), config.cost))
        }
        None => None,
    };
    let mut attached = AttachedBLora { bank, prior, ..AttachedBLora::default() };
    for ((name, linear), layer) in selected.into_iter().zip(built) {
        let layer = Arc::new(layer);
        linear.adapter = Some(layer.clone() as Arc<dyn Adapter>);
        attached.layers.push((name, layer));
    }
    Ok(attached)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::lora::TargetModules;
    use crate::adapters::Linear;
    use candle_core::DType;

    struct Toy {
        layers: Vec<Linear>,
    }

    impl HasLinears for Toy {
        fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
            self.layers
                .iter_mut()
                .enumerate()
                .map(|(i, l)| (format!("layers.{}.{}", i / 2, if i % 2 == 0 { "q_proj" } else { "v_proj" }), l))
                .collect()
        }
    }

    fn toy() -> Result<Toy> {
        let layers = (0..4)
            .map(|i| Ok(Linear::new(Tensor::ones((3 + i, 5), DType::F32, &Device::Cpu)?, None)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Toy { layers })
    }

    fn cfg(targets: &[&str]) -> BLoraConfig {
        BLoraConfig {
            r: 2,
            target_modules: Some(TargetModules::List(targets.iter().map(|s| s.to_string()).collect())),
            ..BLoraConfig::default()
        }
    }

    #[test]
    fn attaches_names_and_sums_priors() -> Result<()> {
        let mut m = toy()?;
        let a = attach_blora(&mut m, &cfg(&["q_proj"]), 1, &Device::Cpu)?;
        assert_eq!(a.len(), 2);
        assert!(m.layers[0].adapter.is_some() && m.layers[1].adapter.is_none());
        let w: Vec<String> = a.named_weight_vars_with_prefix("bert.").into_iter().map(|(n, _)| n).collect();
        assert_eq!(w[0], "base_model.model.bert.layers.0.q_proj.lora_A.weight");
        assert_eq!(w[1], "base_model.model.bert.layers.0.q_proj.lora_E");
        let g: Vec<String> = a.named_gate_vars_with_prefix("").into_iter().map(|(n, _)| n).collect();
        assert_eq!(g, ["base_model.model.blora_gates"], "one var for every gate");
        // Gates at 6: every prior ≈ its all-on value; two same-shaped layers of norm 1 each → ≈ 2·(≈1).
        let prior = a.regularizer()?.map(|t| t.to_scalar::<f32>()).transpose()?.unwrap_or_default();
        assert!(prior > 1.5 && prior <= 2.0 + 1e-5, "{prior}");
        let learned = a.learned()?;
        assert_eq!(learned[1].0, "layers.1.q_proj");
        assert_eq!((learned[1].1.rank, learned[1].1.out_features), (2, 5));
        // The model's forward goes through the adapter (E = 0: output unchanged at init).
        let x = Tensor::ones((1, 5), DType::F32, &Device::Cpu)?;
        assert_eq!(m.layers[0].forward(&x, &Ctx::train(0))?.to_vec2::<f32>()?, vec![vec![5f32; 3]]);
        // A second attach on the same modules is refused.
        assert!(attach_blora(&mut m, &cfg(&["q_proj"]), 1, &Device::Cpu).is_err());
        Ok(())
    }

    /// The bank holds every layer's gates in layer order; the model's prior is the sum of the
    /// layers' composed priors (same value to f32 rounding, same gradient), whatever the cost.
    #[test]
    fn one_bank_and_one_prior_for_every_layer() -> Result<()> {
        for cost in [GateCost::Bops, GateCost::Const] {
            let mut m = toy()?;
            let c = BLoraConfig { r: 3, cost, quantize_base: true, ..cfg(&["q_proj", "v_proj"]) };
            let a = attach_blora(&mut m, &c, 2, &Device::Cpu)?;
            let bank = a.gate_bank().ok_or_else(|| Error::config("t", "", "bank"))?.var().clone();
            // Distinct values everywhere, set through the layers' views.
            let mut at = 0;
            for (k, (_, l)) in a.layers.iter().enumerate() {
                for (j, (_, g)) in l.gate_vars().into_iter().enumerate() {
                    assert_eq!(g.offset(), at, "layer {k} gate {j}: layer after layer, no gap");
                    at += g.elem_count();
                    let v: Vec<f32> =
                        (0..g.elem_count()).map(|i| ((k * 7 + j * 3 + i) % 11) as f32 * 0.6 - 2.8).collect();
                    g.set(&Tensor::new(v.as_slice(), &Device::Cpu)?)?;
                    assert_eq!(g.to_vec()?, v);
                }
            }
            assert_eq!(at, bank.elem_count());
            let prior = a.regularizer()?.ok_or_else(|| Error::config("t", "", "prior"))?;
            let mut sum: Option<Tensor> = None;
            for (_, l) in &a.layers {
                let r = l.regularizer_reference(cost)?;
                sum = Some(match sum {
                    Some(s) => s.add(&r)?,
                    None => r,
                });
            }
            let sum = sum.ok_or_else(|| Error::config("t", "", "layers"))?;
            let (p, s) = (prior.to_scalar::<f32>()?, sum.to_scalar::<f32>()?);
            assert!((p - s).abs() <= 1e-6 * s.abs(), "{cost:?}: {p} vs {s}");
            let grad = |t: &Tensor| -> Result<Vec<f32>> {
                Ok(t.backward()?.get(bank.as_tensor()).map(|g| g.to_vec1::<f32>()).transpose()?.unwrap_or_default())
            };
            let (gp, gs) = (grad(&prior)?, grad(&sum)?);
            assert_eq!(gp.len(), bank.elem_count());
            for (x, y) in gp.iter().zip(&gs) {
                assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "{cost:?}: {gp:?} vs {gs:?}");
            }
        }
        Ok(())
    }

    /// Timing on the CPU (run with `--ignored --nocapture`): the prior's forward + backward over
    /// 60 adapted linears (SmolLM2-135M's q,v: 6 quantizers and 7 rank gates each), per layer
    /// (the composed path this replaced) against the one vectorised computation, min of 20.
    #[test]
    #[ignore]
    fn prior_timing_60_layers() -> Result<()> {
        struct Many(Vec<Linear>);
        impl HasLinears for Many {
            fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
                self.0.iter_mut().enumerate().map(|(i, l)| (format!("layers.{i}.q_proj"), l)).collect()
            }
        }
        let mut m = Many(
            (0..60)
                .map(|_| Ok(Linear::new(Tensor::zeros((64, 64), DType::F32, &Device::Cpu)?, None)))
                .collect::<Result<Vec<_>>>()?,
        );
        let a = attach_blora(&mut m, &BLoraConfig { r: 8, ..cfg(&["q_proj"]) }, 0, &Device::Cpu)?;
        let time = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
            let mut best = f64::INFINITY;
            for _ in 0..20 {
                let t = std::time::Instant::now();
                f()?;
                best = best.min(t.elapsed().as_secs_f64() * 1e3);
            }
            Ok(best)
        };
        let composed = time(&|| {
            let mut sum: Option<Tensor> = None;
            for (_, l) in &a.layers {
                let r = l.regularizer_reference(GateCost::Bops)?;
                sum = Some(match sum {
                    Some(s) => s.add(&r)?,
                    None => r,
                });
            }
            sum.map(|s| s.backward()).transpose()?;
            Ok(())
        })?;
        let plan = time(&|| {
            a.regularizer()?.map(|p| p.backward()).transpose()?;
            Ok(())
        })?;
        println!("prior fwd+bwd, 60 layers: per layer (composed) {composed:.3} ms, one plan {plan:.3} ms");
        // Ops the autograd graph records (each one kernel forward, one or more backward).
        let mut sum: Option<Tensor> = None;
        for (_, l) in &a.layers {
            let r = l.regularizer_reference(GateCost::Bops)?;
            sum = Some(match sum {
                Some(s) => s.add(&r)?,
                None => r,
            });
        }
        let nodes = |t: &Tensor| t.sorted_nodes().len();
        let old_nodes = sum.as_ref().map_or(0, nodes);
        let new_nodes = a.regularizer()?.as_ref().map_or(0, nodes);
        println!("prior graph nodes, 60 layers: per layer (composed) {old_nodes}, one plan {new_nodes}");
        // A layer's training forward (tiny x) with everything but the matmuls being gates and
        // quantizers: its graph size now.
        let x = Tensor::ones((2, 64), DType::F32, &Device::Cpu)?;
        let (_, l) = &a.layers[0];
        let y = Adapter::forward(l.as_ref(), &x, &Ctx::train(1), 0)?;
        println!("one layer's adapter forward graph nodes now: {}", nodes(&y));
        let la = Var::new(&[0.5f32; 7], &Device::Cpu)?;
        let noise = Tensor::new(&[0.1f32; 7], &Device::Cpu)?;
        let composed = Tensor::cat(
            &[
                &Tensor::ones(1, DType::F32, &Device::Cpu)?,
                &super::super::gates::nested_prefix(&super::super::gates::sample(la.as_tensor(), &noise)?)?,
            ],
            0,
        )?;
        let fused = super::super::gates::rank_multiplier(la.as_tensor(), &noise)?;
        println!("rank multiplier graph nodes (r 8): composed {}, fused {}", nodes(&composed), nodes(&fused));
        Ok(())
    }

    #[test]
    fn errors_leave_the_model_untouched() -> Result<()> {
        let mut m = toy()?;
        let msg = attach_blora(&mut m, &cfg(&["q_proj", "qproj"]), 0, &Device::Cpu)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("\"qproj\"") && msg.contains("layers.*.q_proj, layers.*.v_proj"), "{msg}");
        assert!(m.layers.iter().all(|l| l.adapter.is_none()), "nothing attached on error");
        let unset = BLoraConfig::default();
        assert!(attach_blora(&mut m, &unset, 0, &Device::Cpu).is_err());
        let bad = BLoraConfig { r: 0, ..cfg(&["q_proj"]) };
        assert!(attach_blora(&mut m, &bad, 0, &Device::Cpu).is_err());
        assert!(m.layers.iter().all(|l| l.adapter.is_none()));
        Ok(())
    }

    #[test]
    fn state_round_trips_through_prefixed_keys() -> Result<()> {
        let mut m = toy()?;
        let a = attach_blora(&mut m, &cfg(&["v_proj"]), 4, &Device::Cpu)?;
        let x = Tensor::ones((2, 5), DType::F32, &Device::Cpu)?;
        m.layers[1].forward(&x, &Ctx::train(0))?;
        let state: HashMap<String, Tensor> = a.named_state_with_prefix("")?.into_iter().collect();
        assert!(state.contains_key("base_model.model.layers.0.v_proj.blora_ranges.lora_A.x_max"));
        let mut m2 = toy()?;
        let b = attach_blora(&mut m2, &cfg(&["v_proj"]), 5, &Device::Cpu)?;
        b.set_state_with_prefix("", &state)?;
        assert_eq!(b.layers[0].1.ranges()?, a.layers[0].1.ranges()?);
        assert_eq!(b.layers[0].1.lora_a().to_vec2::<f32>()?, a.layers[0].1.lora_a().to_vec2::<f32>()?);
        Ok(())
    }
}
