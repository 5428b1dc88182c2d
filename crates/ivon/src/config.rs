//! IVON's hyper-parameters: [`IvonConfig`] (ivon-opt's names, [`HessApprox`], the ivon-lora
//! presets [`IvonLoraTask`]), and per-group overrides ([`ParamGroup`]) resolved into
//! [`GroupHyper`] (`specs/ivon.md`).
use std::str::FromStr;

use candle_core::Var;
use serde::{Deserialize, Serialize};

use crate::error::{invalid, Error, Result};

/// How IVON estimates the diagonal Hessian of the loss from a sample (`specs/ivon.md` step 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HessApprox {
    /// Reparameterisation (Price) estimator ĥ = ess·(h+δ)·mean(noise ⊙ g) = mean g·(θ−μ)/σ²;
    /// ivon-opt's default and the one used by IVON-LoRA.
    #[default]
    Price,
    /// Squared-gradient estimator ĥ = ess·mean(g²). The ess factor is questioned upstream
    /// (ivon issue #8); kept because ivon-opt has it.
    Gradsq,
}

/// The IVON-LoRA tasks with published (ess, hess_init) settings (arXiv 2411.04421, `ivon.sh` of
/// team-approx-bayes/ivon-lora; `specs/ivon.md` "What matters for LoRA").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IvonLoraTask {
    /// WinoGrande-S: ess 1e7, hess_init 3e-4.
    WgS,
    /// WinoGrande-M: ess 1e8, hess_init 3e-4.
    WgM,
    /// ARC-Challenge: ess 1e6, hess_init 1e-3.
    ArcC,
    /// ARC-Easy: ess 1e6, hess_init 1e-3.
    ArcE,
    /// OpenBookQA: ess 1e6, hess_init 1e-3.
    Obqa,
    /// BoolQ: ess 1e7, hess_init 3e-4.
    Boolq,
}

impl IvonLoraTask {
    /// All tasks, in the paper's order.
    pub const ALL: [IvonLoraTask; 6] = [Self::WgS, Self::WgM, Self::ArcC, Self::ArcE, Self::Obqa, Self::Boolq];

    /// The task's short name (`wg-s`, `wg-m`, `arc-c`, `arc-e`, `obqa`, `boolq`).
    pub fn name(self) -> &'static str {
        match self {
            Self::WgS => "wg-s",
            Self::WgM => "wg-m",
            Self::ArcC => "arc-c",
            Self::ArcE => "arc-e",
            Self::Obqa => "obqa",
            Self::Boolq => "boolq",
        }
    }
}

impl FromStr for IvonLoraTask {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let norm = s.to_ascii_lowercase().replace('_', "-");
        Self::ALL
            .into_iter()
            .find(|t| t.name() == norm)
            .ok_or_else(|| invalid("task", s, "expected one of wg-s, wg-m, arc-c, arc-e, obqa, boolq"))
    }
}

/// Serde for f64 fields that may be +∞ (JSON has no infinity): written as the string `"inf"`.
mod f64_or_inf {
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if *v == f64::INFINITY {
            s.serialize_str("inf")
        } else {
            s.serialize_f64(*v)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum NumOrStr {
            Num(f64),
            Str(String),
        }
        match NumOrStr::deserialize(d)? {
            NumOrStr::Num(x) => Ok(x),
            NumOrStr::Str(s) if matches!(s.as_str(), "inf" | "Infinity" | "infinity") => Ok(f64::INFINITY),
            NumOrStr::Str(s) => Err(D::Error::custom(format!("expected a number or \"inf\", got {s:?}"))),
        }
    }
}

/// IVON hyper-parameters, named as ivon-opt's `IVON(...)` arguments so values can be pasted.
///
/// `lr`, `ess`, `weight_decay`, `hess_init`, `beta1`, `beta2` and `clip_radius` are defaults that
/// a [`ParamGroup`] may override; `mc_samples`, `rescale_lr`, `debias`, `hess_approx` and `sync`
/// are global (as in ivon-opt, `reference/ivon.md` §1.1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IvonConfig {
    /// Learning rate α (≥ 0).
    pub lr: f64,
    /// Effective sample size λ (> 0): the posterior is tempered as if fit to `ess` examples.
    pub ess: f64,
    /// Initial Hessian h0 (> 0); σ0 = 1/√(ess·(h0+δ)).
    pub hess_init: f64,
    /// Momentum decay β1 ∈ [0, 1].
    pub beta1: f64,
    /// Hessian decay β2 ∈ [0, 1].
    pub beta2: f64,
    /// Weight decay δ ≥ 0 (the Gaussian prior's precision per example).
    pub weight_decay: f64,
    /// Monte-Carlo samples per step (≥ 1), used by [`crate::Optimizer::backward_step`].
    pub mc_samples: usize,
    /// Elementwise clip ρ > 0 of the preconditioned step; may be infinite (`"inf"` in JSON).
    #[serde(with = "f64_or_inf")]
    pub clip_radius: f64,
    /// Multiply lr by (h0 + δ) so lr is scale free (ivon-opt default true).
    pub rescale_lr: bool,
    /// Divide the momentum by 1 − β1^t.
    pub debias: bool,
    /// Hessian estimator.
    pub hess_approx: HessApprox,
    /// Average sample statistics across workers through [`Ivon::set_sync_fn`] before each update.
    pub sync: bool,
}

impl Default for IvonConfig {
    fn default() -> Self {
        Self {
            // ivon-opt has no default lr; 0.1 is its README example (with rescale_lr on).
            lr: 0.1,
            // ivon-opt has no default ess; 1e6 is IVON-LoRA's ARC/OBQA value (specs/ivon.md).
            ess: 1e6,
            // ivon-opt 0.1.3 defaults from here on (reference/ivon.md §1.1).
            hess_init: 1.0,
            beta1: 0.9,
            beta2: 0.99999,
            weight_decay: 1e-4,
            mc_samples: 1,
            clip_radius: f64::INFINITY,
            rescale_lr: true,
            debias: true,
            hess_approx: HessApprox::Price,
            sync: false,
        }
    }
}

impl IvonConfig {
    /// IVON-LoRA's settings for `task` (arXiv 2411.04421; ivon-lora `ivon.sh`, `specs/ivon.md`):
    /// lr 0.03, rescale_lr off, weight decay 0, clip_radius 1e-3, β2 0.99999, one MC sample and the
    /// task's (ess, hess_init). They were tuned for 10,000 steps on Llama-2-7B; short runs need a
    /// larger clip_radius (`specs/ivon.md` "IVON needs settings that fit the run").
    pub fn ivon_lora(task: IvonLoraTask) -> Self {
        let (ess, hess_init) = match task {
            IvonLoraTask::WgS | IvonLoraTask::Boolq => (1e7, 3e-4),
            IvonLoraTask::WgM => (1e8, 3e-4),
            IvonLoraTask::ArcC | IvonLoraTask::ArcE | IvonLoraTask::Obqa => (1e6, 1e-3),
        };
        Self {
            lr: 0.03,
            ess,
            hess_init,
            beta1: 0.9,
            beta2: 0.99999,
            weight_decay: 0.0,
            mc_samples: 1,
            clip_radius: 1e-3,
            rescale_lr: false,
            debias: true,
            hess_approx: HessApprox::Price,
            sync: false,
        }
    }

    /// Checks every field against ivon-opt 0.1.3's ranges; the error names the field and value.
    pub fn validate(&self) -> Result<()> {
        if self.mc_samples < 1 {
            return Err(invalid("mc_samples", self.mc_samples, "must be at least 1"));
        }
        self.defaults().validate("")
    }

    /// The per-group hyper-parameters this config gives a group without overrides.
    pub fn defaults(&self) -> GroupHyper {
        GroupHyper {
            lr: self.lr,
            ess: self.ess,
            weight_decay: self.weight_decay,
            hess_init: self.hess_init,
            beta1: self.beta1,
            beta2: self.beta2,
            clip_radius: self.clip_radius,
        }
    }
}

/// The hyper-parameters that may differ between parameter groups, resolved (ivon-opt
/// `param_groups[i]`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupHyper {
    /// Learning rate (the current one: schedules change it).
    pub lr: f64,
    /// Effective sample size.
    pub ess: f64,
    /// Weight decay δ.
    pub weight_decay: f64,
    /// Initial Hessian h0 (also the rescale_lr factor).
    pub hess_init: f64,
    /// Momentum decay.
    pub beta1: f64,
    /// Hessian decay.
    pub beta2: f64,
    /// Elementwise clip radius.
    #[serde(with = "f64_or_inf")]
    pub clip_radius: f64,
}

impl GroupHyper {
    /// ivon-opt's checks; `prefix` is `""` or `"groups[i]."` for the error's field name.
    pub(crate) fn validate(&self, prefix: &str) -> Result<()> {
        let f = |name: &str| format!("{prefix}{name}");
        // NaN fails every check (explicitly, or through `contains`).
        if self.lr.is_nan() || self.lr < 0.0 {
            return Err(invalid(f("lr"), self.lr, "must be >= 0"));
        }
        if self.ess.is_nan() || self.ess <= 0.0 {
            return Err(invalid(f("ess"), self.ess, "must be > 0"));
        }
        if self.weight_decay.is_nan() || self.weight_decay < 0.0 {
            return Err(invalid(f("weight_decay"), self.weight_decay, "must be >= 0"));
        }
        if self.hess_init.is_nan() || self.hess_init <= 0.0 {
            return Err(invalid(f("hess_init"), self.hess_init, "must be > 0"));
        }
        if !(0.0..=1.0).contains(&self.beta1) {
            return Err(invalid(f("beta1"), self.beta1, "must be in [0, 1]"));
        }
        if !(0.0..=1.0).contains(&self.beta2) {
            return Err(invalid(f("beta2"), self.beta2, "must be in [0, 1]"));
        }
        if self.clip_radius.is_nan() || self.clip_radius <= 0.0 {
            return Err(invalid(f("clip_radius"), self.clip_radius, "must be > 0 (use inf for no clipping)"));
        }
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------------
// Parameter groups
// ------------------------------------------------------------------------------------------------

/// A list of vars sharing hyper-parameters; `None` fields take the [`IvonConfig`] value
/// (torch's `param_groups`). Build with [`ParamGroup::new`] and the setters.
#[derive(Debug, Clone, Default)]
pub struct ParamGroup {
    /// The group's vars, in order (the order of the flat state).
    pub vars: Vec<Var>,
    /// Learning-rate override.
    pub lr: Option<f64>,
    /// Effective-sample-size override.
    pub ess: Option<f64>,
    /// Weight-decay override.
    pub weight_decay: Option<f64>,
    /// Initial-Hessian override.
    pub hess_init: Option<f64>,
    /// β1 override.
    pub beta1: Option<f64>,
    /// β2 override.
    pub beta2: Option<f64>,
    /// Clip-radius override.
    pub clip_radius: Option<f64>,
}

macro_rules! setters {
    ($($name:ident),*) => {$(
        #[doc = concat!("Overrides `", stringify!($name), "` for this group.")]
        pub fn $name(mut self, value: f64) -> Self {
            self.$name = Some(value);
            self
        }
    )*};
}

impl ParamGroup {
    /// A group with no overrides.
    pub fn new(vars: Vec<Var>) -> Self {
        Self { vars, ..Default::default() }
    }

    setters!(lr, ess, weight_decay, hess_init, beta1, beta2, clip_radius);

    pub(crate) fn resolve(&self, d: GroupHyper) -> GroupHyper {
        GroupHyper {
            lr: self.lr.unwrap_or(d.lr),
            ess: self.ess.unwrap_or(d.ess),
            weight_decay: self.weight_decay.unwrap_or(d.weight_decay),
            hess_init: self.hess_init.unwrap_or(d.hess_init),
            beta1: self.beta1.unwrap_or(d.beta1),
            beta2: self.beta2.unwrap_or(d.beta2),
            clip_radius: self.clip_radius.unwrap_or(d.clip_radius),
        }
    }
}
