//! [`attach`]: puts a [`LoraLayer`] on every linear whose HF module name `target_modules`
//! selects, as PEFT's `LoraModel._create_and_replace` (but the base layer is never replaced:
//! the adapter goes into the [`Linear`]'s slot).
use std::collections::BTreeSet;
use std::sync::Arc;

use candle_core::{Device, Var};

use super::config::{scaling, LoraConfig, TargetModules};
use super::layer::LoraLayer;
use crate::adapters::{Adapter, Ctx, HasLinears, Linear};
use crate::{Error, Result};

/// PEFT's key prefix for adapter tensors on disk: `base_model.model.{module}.lora_A.weight`.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// The adapters [`attach`] installed, in the model's module order.
#[derive(Debug, Clone, Default)]
pub struct AttachedAdapters {
    /// `(HF module name, layer)`; the same `Arc` sits in the model's [`Linear`].
    pub layers: Vec<(String, Arc<LoraLayer>)>,
}

impl AttachedAdapters {
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// The layer on one module, by its full name.
    pub fn get(&self, module: &str) -> Option<&Arc<LoraLayer>> {
        self.layers.iter().find(|(m, _)| m == module).map(|(_, l)| l)
    }

    /// Every trainable variable (A then B per module), for the optimizer.
    pub fn vars(&self) -> Vec<Var> {
        self.layers.iter().flat_map(|(_, l)| l.named_vars().into_iter().map(|(_, v)| v)).collect()
    }

    /// Variables named as PEFT saves them: `base_model.model.{module}.lora_A.weight`.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        self.named_vars_with_prefix("")
    }

    /// As [`Self::named_vars`] with `module_prefix` before each module name: a backbone's
    /// names are relative to itself, while PEFT names modules from the task model's root
    /// (`bert.` for `BertForSequenceClassification`).
    pub fn named_vars_with_prefix(&self, module_prefix: &str) -> Vec<(String, Var)> {
        self.layers
            .iter()
            .flat_map(|(m, l)| {
                l.named_vars()
                    .into_iter()
                    .map(move |(suffix, v)| (format!("{PEFT_PREFIX}{module_prefix}{m}.{suffix}"), v))
            })
            .collect()
    }
}

/// Attaches a fresh LoRA adapter (A Kaiming-uniform, B zero) to every linear of `model` that
/// `config.target_modules` selects, with per-module rank and alpha from `rank_pattern` /
/// `alpha_pattern`. Layer k (in the model's module order) draws its A from `(seed, k)`. Vars
/// are created on `device`.
///
/// Fails, before changing anything, when the config is invalid, `target_modules` is unset (fill
/// it with [`LoraConfig::with_default_targets`]), a listed target matches no linear (the error
/// lists the available names), or a selected linear already carries an adapter.
pub fn attach(model: &mut dyn HasLinears, config: &LoraConfig, seed: u64, device: &Device) -> Result<AttachedAdapters> {
    config.validate()?;
    let targets = config.target_modules.as_ref().ok_or_else(|| {
        Error::config(
            "target_modules",
            "null",
            "set it (e.g. [\"q_proj\", \"v_proj\"]) or call LoraConfig::with_default_targets(arch)",
        )
    })?;
    let selected = select_targets(model, targets)?;

    // Build every layer before installing any, so an error leaves the model untouched.
    let mut built = Vec::with_capacity(selected.len());
    for (k, (name, linear)) in selected.iter().enumerate() {
        let r = config.rank_for(name)?;
        let alpha = config.alpha_for(name)?;
        let layer_seed = Ctx { seed, ..Ctx::eval() }.seed_for(k as u64);
        let layer = LoraLayer::new(
            linear.in_features(),
            linear.out_features(),
            r,
            scaling(alpha, r, config.use_rslora),
            config.lora_dropout,
            layer_seed,
            device,
        )?;
        built.push(Arc::new(layer));
    }
    let mut attached = AttachedAdapters::default();
    for ((name, linear), layer) in selected.into_iter().zip(built) {
        linear.adapter = Some(layer.clone() as Arc<dyn Adapter>);
        attached.layers.push((name, layer));
    }
    Ok(attached)
}

/// The linears `targets` selects, in the model's module order. Fails when a listed target matches
/// nothing or a selected linear already carries an adapter (one adapter per model).
pub(crate) fn select_targets<'m>(
    model: &'m mut dyn HasLinears,
    targets: &TargetModules,
) -> Result<Vec<(String, &'m mut Linear)>> {
    let linears = model.linears_mut();
    let names: Vec<String> = linears.iter().map(|(n, _)| n.clone()).collect();
    check_every_target_matches(targets, &names)?;
    let mut selected = Vec::new();
    for (name, linear) in linears {
        if targets.matches(&name)? {
            if linear.adapter.is_some() {
                return Err(Error::config(
                    "target_modules",
                    name.as_str(),
                    "this module already carries an adapter; attach once per model",
                ));
            }
            selected.push((name, linear));
        }
    }
    Ok(selected)
}

/// Each listed target (or the regex) must select at least one linear; PEFT only fails when
/// nothing at all matches, which hides a typo in one of several names.
pub(crate) fn check_every_target_matches(targets: &TargetModules, names: &[String]) -> Result<()> {
    let unmatched: Option<String> = match targets {
        TargetModules::List(list) => {
            list.iter().find(|t| !names.iter().any(|n| super::config::matches_name(n, t))).cloned()
        }
        TargetModules::Regex(re) => {
            let mut any = false;
            for n in names {
                any |= targets.matches(n)?;
            }
            (!any).then(|| re.clone())
        }
    };
    match unmatched {
        None => Ok(()),
        Some(t) => Err(Error::config(
            "target_modules",
            format!("{t:?}"),
            format!("matches no linear layer of the model; available: {}", shorten(names)),
        )),
    }
}

/// Module names with layer indices folded (`encoder.layer.*.attention.self.query`), deduplicated.
fn shorten(names: &[String]) -> String {
    let folded: BTreeSet<String> = names
        .iter()
        .map(|n| {
            n.split('.')
                .map(|p| if p.chars().all(|c| c.is_ascii_digit()) { "*" } else { p })
                .collect::<Vec<_>>()
                .join(".")
        })
        .collect();
    folded.into_iter().collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Tensor};

    struct Toy {
        layers: Vec<Linear>,
    }

    impl HasLinears for Toy {
        fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
            self.layers
                .iter_mut()
                .enumerate()
                .map(|(i, l)| (format!("layers.{i}.{}", if i % 2 == 0 { "q_proj" } else { "v_proj" }), l))
                .collect()
        }
    }

    fn toy() -> Result<Toy> {
        let layers = (0..4)
            .map(|i| Ok(Linear::new(Tensor::ones((3 + i, 5), DType::F32, &Device::Cpu)?, None)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Toy { layers })
    }

    #[test]
    fn attaches_to_matches_with_patterns() -> Result<()> {
        let mut m = toy()?;
        let mut cfg = LoraConfig { r: 2, lora_alpha: 4.0, ..LoraConfig::default() };
        cfg.target_modules = Some(TargetModules::List(vec!["q_proj".into()]));
        cfg.rank_pattern.insert("layers.2.q_proj".into(), 3);
        let a = attach(&mut m, &cfg, 1, &Device::Cpu)?;
        assert_eq!(a.len(), 2);
        assert_eq!(a.get("layers.2.q_proj").map(|l| l.rank()), Some(3));
        assert_eq!(a.get("layers.0.q_proj").map(|l| (l.rank(), l.scaling())), Some((2, 2.0)));
        assert!(m.layers[0].adapter.is_some() && m.layers[1].adapter.is_none());
        let names: Vec<String> = a.named_vars().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names[0], "base_model.model.layers.0.q_proj.lora_A.weight");
        assert_eq!(names[3], "base_model.model.layers.2.q_proj.lora_B.weight");
        assert_eq!(a.vars().len(), 4);
        // A second attach on the same modules is refused.
        assert!(attach(&mut m, &cfg, 1, &Device::Cpu).is_err());
        Ok(())
    }

    #[test]
    fn unknown_target_lists_available_modules() -> Result<()> {
        let mut m = toy()?;
        let cfg = LoraConfig {
            target_modules: Some(TargetModules::List(vec!["q_proj".into(), "qproj".into()])),
            ..LoraConfig::default()
        };
        let msg = attach(&mut m, &cfg, 0, &Device::Cpu).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("\"qproj\"") && msg.contains("layers.*.q_proj, layers.*.v_proj"), "{msg}");
        assert!(m.layers.iter().all(|l| l.adapter.is_none()), "nothing attached on error");
        let unset = LoraConfig::default();
        assert!(attach(&mut m, &unset, 0, &Device::Cpu).is_err());
        Ok(())
    }
}
