//! The IVON optimizer (Shen et al., "Variational Learning is Effective for Large Deep Networks",
//! ICML 2024, arXiv 2402.17641), step for step as PyPI `ivon-opt` 0.1.3 computes it
//! (`specs/ivon.md`, `reference/ivon.md` §1).
//!
//! Read top to bottom: the configuration ([`IvonConfig`], [`HessApprox`], presets), parameter
//! groups ([`ParamGroup`]), the update equations as pure functions ([`new_momentum`],
//! [`nll_hess`], [`new_hess`], [`new_mean`]), then the optimizer ([`Ivon`]) and its sampling guard
//! ([`Sample`]).
//!
//! Numerics: μ, m, h, ε and every sample average are f32 (a flat vector per optimizer, groups
//! concatenated in order, vars in order, as ivon-opt's flat buffers). Scalar coefficients such as
//! 1 − β2 are computed in f64 and rounded to f32 once, as torch does with Python floats, so that
//! an f32 run of ivon-opt and this crate agree to the last bits for equal gradients.
use std::str::FromStr;

use candle_core::backprop::GradStore;
use candle_core::Var;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{invalid, Error, Result};
use crate::flat::FlatVars;
use crate::noise::{Noise, NoiseFn, NoiseState};

// ------------------------------------------------------------------------------------------------
// Configuration
// ------------------------------------------------------------------------------------------------

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
    fn validate(&self, prefix: &str) -> Result<()> {
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

    fn resolve(&self, d: GroupHyper) -> GroupHyper {
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

// ------------------------------------------------------------------------------------------------
// The update equations (specs/ivon.md steps 1 and 4–8), elementwise, f32
// ------------------------------------------------------------------------------------------------

/// The scalar coefficients of one update of one group, each computed in f64 and rounded to f32
/// once (as torch rounds a Python float when it multiplies an f32 tensor).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Coefficients {
    /// β1.
    pub beta1: f32,
    /// 1 − β1.
    pub one_minus_beta1: f32,
    /// β2.
    pub beta2: f32,
    /// 1 − β2.
    pub one_minus_beta2: f32,
    /// ½(1 − β2)².
    pub half_sq_one_minus_beta2: f32,
    /// λ (ess).
    pub ess: f32,
    /// δ.
    pub weight_decay: f32,
    /// lr·(h0+δ) with rescale_lr, else lr (step 7).
    pub lr: f32,
    /// 1 − β1^t with debias, else 1 (step 7).
    pub debias: f32,
    /// ρ.
    pub clip_radius: f32,
}

impl Coefficients {
    /// Coefficients of group `g` at step `t` (1-based).
    pub fn new(g: &GroupHyper, config: &IvonConfig, t: u64) -> Self {
        let lr = if config.rescale_lr { g.lr * (g.hess_init + g.weight_decay) } else { g.lr };
        let debias = if config.debias { 1.0 - g.beta1.powf(t as f64) } else { 1.0 };
        Self {
            beta1: g.beta1 as f32,
            one_minus_beta1: (1.0 - g.beta1) as f32,
            beta2: g.beta2 as f32,
            one_minus_beta2: (1.0 - g.beta2) as f32,
            half_sq_one_minus_beta2: (0.5 * (1.0 - g.beta2).powi(2)) as f32,
            ess: g.ess as f32,
            weight_decay: g.weight_decay as f32,
            lr: lr as f32,
            debias: debias as f32,
            clip_radius: g.clip_radius as f32,
        }
    }
}

/// Posterior noise for one coordinate, `specs/ivon.md` step 1: noise = ε·σ with
/// σ = 1/√(ess·(h+δ)), computed as ε / √(ess·(h+δ)) like ivon-opt (`_sample_params`).
#[inline]
pub fn sample_noise(eps: f32, hess: f32, ess: f32, weight_decay: f32) -> f32 {
    eps / (ess * (hess + weight_decay)).sqrt()
}

/// Momentum, `specs/ivon.md` step 4: m ← β1·m + (1 − β1)·ḡ (no weight decay inside).
#[inline]
pub fn new_momentum(momentum: f32, avg_grad: f32, c: &Coefficients) -> f32 {
    c.beta1 * momentum + c.one_minus_beta1 * avg_grad
}

/// The loss-Hessian estimate ĥ, `specs/ivon.md` step 5, from the sample statistic `stat`
/// (mean noise⊙g for [`HessApprox::Price`], mean g² for [`HessApprox::Gradsq`]) and the OLD h.
/// Price: ĥ = ess·(h+δ)·n̄xg, because (θ−μ)/σ² = noise·ess·(h+δ) (Shen et al. 2024, Alg. 1).
#[inline]
pub fn nll_hess(approx: HessApprox, hess: f32, stat: f32, c: &Coefficients) -> f32 {
    match approx {
        HessApprox::Price => stat * (hess + c.weight_decay) * c.ess,
        HessApprox::Gradsq => stat * c.ess,
    }
}

/// Hessian, `specs/ivon.md` step 6 (Shen et al. 2024, arXiv 2402.17641, Alg. 1):
/// h ← β2·h + (1−β2)·ĥ + ½(1−β2)²·(h−ĥ)²/(h+δ), with the OLD h on the right. The last term
/// keeps h positive even when ĥ is very negative; h is not debiased and does not see the lr.
#[inline]
pub fn new_hess(hess: f32, nll_hess: f32, c: &Coefficients) -> f32 {
    let d = hess - nll_hess;
    c.beta2 * hess + c.one_minus_beta2 * nll_hess + c.half_sq_one_minus_beta2 * (d * d) / (hess + c.weight_decay)
}

/// Mean, `specs/ivon.md` steps 7–8: μ ← μ − lr'·clip((m/d + δ·μ)/(h+δ), −ρ, ρ), with the NEW h,
/// elementwise clip. Weight decay enters the numerator here and the precision h+δ.
#[inline]
pub fn new_mean(mean: f32, momentum: f32, hess: f32, c: &Coefficients) -> f32 {
    let step = (momentum / c.debias + c.weight_decay * mean) / (hess + c.weight_decay);
    // Written with comparisons, not f32::clamp, so a NaN passes through (as torch.clip does)
    // instead of panicking.
    let clipped = if step > c.clip_radius {
        c.clip_radius
    } else if step < -c.clip_radius {
        -c.clip_radius
    } else {
        step
    };
    mean - c.lr * clipped
}

// ------------------------------------------------------------------------------------------------
// The optimizer
// ------------------------------------------------------------------------------------------------

/// A hook that averages a flat f32 vector across workers in place (an all-reduce-mean). IVON
/// calls it on ḡ and then on the curvature statistic before each update when `sync` is set.
pub type SyncFn = Box<dyn FnMut(&mut [f32]) -> Result<()> + Send>;

/// One group: its resolved hyper-parameters and its range in the flat vectors.
#[derive(Debug, Clone)]
pub(crate) struct Group {
    pub hyper: GroupHyper,
    pub start: usize,
    pub end: usize,
    /// The group's lr relative to the config lr, kept so schedules scale every group alike.
    pub lr_ratio: f64,
    /// Number of vars of this group.
    pub vars: usize,
}

/// Elements per parallel chunk of the update loop.
const CHUNK: usize = 1 << 15;

/// The IVON optimizer over candle `Var`s: keeps the Gaussian posterior N(μ, σ²) with
/// σ² = 1/(ess·(h+δ)) (see [`crate::posterior`] for reading and saving it).
///
/// Between steps the vars hold μ (cast to their dtype; the f32 master copy lives here). One
/// training iteration with S = mc_samples samples:
///
/// ```text
/// for _ in 0..S { ivon.with_sampled_params(|| loss(batch)?.backward())?; }   // θ = μ + σ⊙ε
/// ivon.step()?;
/// ```
///
/// For gradient accumulation under ONE noise draw (IVON-LoRA: one sample spans the whole
/// effective batch), use [`Ivon::with_sample`] and call [`Sample::accumulate`] per micro-batch:
/// the micro-batch gradients are averaged (no loss scaling needed) into one sample.
pub struct Ivon {
    pub(crate) config: IvonConfig,
    pub(crate) flat: FlatVars,
    pub(crate) groups: Vec<Group>,
    pub(crate) frozen: Vec<bool>,
    pub(crate) mean: Vec<f32>,
    pub(crate) momentum: Vec<f32>,
    pub(crate) hess: Vec<f32>,
    pub(crate) step: u64,
    /// Samples recorded since the last step.
    pub(crate) count: usize,
    avg_grad: Vec<f32>,
    /// Mean noise⊙g (price) or mean g² (gradsq).
    avg_curv: Vec<f32>,
    /// The current sample's noise σ⊙ε.
    noise: Vec<f32>,
    /// θ while sampling, then the current sample's (micro-batch averaged) gradient.
    scratch: Vec<f32>,
    pub(crate) noise_source: Noise,
    sync_fn: Option<SyncFn>,
}

impl std::fmt::Debug for Ivon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ivon")
            .field("config", &self.config)
            .field("groups", &self.groups)
            .field("numel", &self.flat.numel)
            .field("step", &self.step)
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl Ivon {
    /// IVON over `vars` (one group), seeded noise with seed 0.
    pub fn new(vars: Vec<Var>, config: IvonConfig) -> Result<Self> {
        Self::with_groups(vec![ParamGroup::new(vars)], config)
    }

    /// IVON over several parameter groups, each with its own hyper-parameters.
    /// Errors on invalid hyper-parameters, no vars, non-float vars, mixed devices or dtypes,
    /// or a var given twice.
    pub fn with_groups(groups: Vec<ParamGroup>, config: IvonConfig) -> Result<Self> {
        config.validate()?;
        let defaults = config.defaults();
        let mut resolved = Vec::with_capacity(groups.len());
        let mut all_vars = Vec::new();
        let mut start = 0;
        for (i, g) in groups.iter().enumerate() {
            let hyper = g.resolve(defaults);
            hyper.validate(&format!("groups[{i}]."))?;
            let numel: usize = g.vars.iter().map(|v| v.elem_count()).sum();
            let lr_ratio = if config.lr > 0.0 { hyper.lr / config.lr } else { 1.0 };
            resolved.push(Group { hyper, start, end: start + numel, lr_ratio, vars: g.vars.len() });
            start += numel;
            all_vars.extend(g.vars.iter().cloned());
        }
        let flat = FlatVars::new(all_vars)?;
        let mean = flat.read_values()?;
        let n = flat.numel;
        let mut hess = vec![0f32; n];
        for g in &resolved {
            hess[g.start..g.end].fill(g.hyper.hess_init as f32);
        }
        Ok(Self {
            config,
            frozen: vec![false; flat.slots.len()],
            flat,
            groups: resolved,
            mean,
            momentum: vec![0.0; n],
            hess,
            step: 0,
            count: 0,
            avg_grad: vec![0.0; n],
            avg_curv: vec![0.0; n],
            noise: vec![0.0; n],
            scratch: vec![0.0; n],
            noise_source: Noise::Seeded(NoiseState::new(0)),
            sync_fn: None,
        })
    }

    /// The configuration (lr is the current base lr).
    pub fn config(&self) -> &IvonConfig {
        &self.config
    }

    /// The resolved hyper-parameters of each group.
    pub fn group_hypers(&self) -> Vec<GroupHyper> {
        self.groups.iter().map(|g| g.hyper).collect()
    }

    /// The vars, in flat order.
    pub fn vars(&self) -> Vec<Var> {
        self.flat.slots.iter().map(|s| s.var.clone()).collect()
    }

    /// Total number of optimized elements.
    pub fn numel(&self) -> usize {
        self.flat.numel
    }

    /// Number of updates applied so far (t).
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Number of samples recorded since the last update.
    pub fn pending_samples(&self) -> usize {
        self.count
    }

    /// Reseeds the noise: ε then comes from a fresh [`NoiseState`] with `seed`.
    pub fn set_seed(&mut self, seed: u64) {
        self.noise_source = Noise::Seeded(NoiseState::new(seed));
    }

    /// Continues the seeded noise from `state` (as saved by [`crate::Posterior`]).
    pub fn set_noise_state(&mut self, state: NoiseState) {
        self.noise_source = Noise::Seeded(state);
    }

    /// The seeded noise's state, `None` while a [`NoiseFn`] supplies ε.
    pub fn noise_state(&self) -> Option<NoiseState> {
        self.noise_source.state()
    }

    /// Replaces the noise source by `f`, called once per group and per sample with
    /// (group index, buffer to fill with ε ~ N(0, I)). Golden tests replay the reference's ε.
    pub fn set_noise_fn(&mut self, f: NoiseFn) {
        self.noise_source = Noise::Injected(f);
    }

    /// Installs the all-reduce-mean hook used when `config.sync` is true: before each update it
    /// is called on ḡ, then on the curvature statistic (n̄xg for price, mean g² for gradsq), never
    /// on h. Seed each worker differently so workers act as extra MC samples
    /// (`reference/ivon.md` §5.4). Differs from ivon-opt: gradsq + sync crashes there.
    pub fn set_sync_fn(&mut self, f: SyncFn) {
        self.sync_fn = Some(f);
    }

    /// Freezes (or unfreezes) `var`: its gradient is treated as zero, as with torch's
    /// `requires_grad = False` inside ivon-opt. It is still perturbed when sampling and its h
    /// decays (`reference/ivon.md` §5.2); usually such vars should not be in the optimizer.
    pub fn set_frozen(&mut self, var: &Var, frozen: bool) -> Result<()> {
        let i = self.flat.index_of(var)?;
        self.frozen[i] = frozen;
        Ok(())
    }

    /// Whether `var` is frozen.
    pub fn is_frozen(&self, var: &Var) -> Result<bool> {
        Ok(self.frozen[self.flat.index_of(var)?])
    }

    /// Sets the base learning rate; every group's lr keeps its ratio to the base (so an LR
    /// schedule scales all groups alike, as torch schedulers do).
    pub fn set_learning_rate(&mut self, lr: f64) {
        self.config.lr = lr;
        for g in &mut self.groups {
            g.hyper.lr = lr * g.lr_ratio;
        }
    }

    /// Sets the learning rate of group `group` only.
    pub fn set_group_learning_rate(&mut self, group: usize, lr: f64) -> Result<()> {
        let n = self.groups.len();
        let g = self.groups.get_mut(group).ok_or_else(|| invalid("group", group, "no such group"))?;
        if lr.is_nan() || lr < 0.0 {
            return Err(invalid(format!("groups[{group}].lr"), lr, "must be >= 0"));
        }
        debug_assert!(group < n);
        g.hyper.lr = lr;
        Ok(())
    }

    /// Draws ε for every group, sets θ = μ + σ⊙ε into the vars and returns the guard through
    /// which gradients are recorded. Dropping the guard restores μ (also during a panic).
    pub fn sample(&mut self) -> Result<Sample<'_>> {
        self.draw_noise();
        self.enter_sample()
    }

    /// Writes θ = μ + noise into the vars and returns the guard.
    fn enter_sample(&mut self) -> Result<Sample<'_>> {
        for ((t, &m), &n) in self.scratch.iter_mut().zip(&self.mean).zip(&self.noise) {
            *t = m + n;
        }
        let sample = Sample { ivon: self, micro_batches: 0, done: false };
        // If writing θ fails half way, the guard's drop puts μ back.
        sample.ivon.flat.write_values(&sample.ivon.scratch)?;
        Ok(sample)
    }

    /// One sample with one micro-batch: sets θ = μ + σ⊙ε, runs `f` (forward + backward,
    /// returning the `GradStore` of `loss.backward()`), records its gradient and restores μ,
    /// also when `f` errors or panics. Vars missing from the store, and frozen vars, count as
    /// zero gradient. Differs from ivon-opt: the reference leaves θ in place on exceptions.
    pub fn with_sampled_params<F>(&mut self, f: F) -> Result<()>
    where
        F: FnOnce() -> candle_core::Result<GradStore>,
    {
        self.with_sample(|s| {
            let grads = f()?;
            s.accumulate(&grads)
        })
    }

    /// One sample spanning several micro-batches: `f` runs under θ = μ + σ⊙ε and calls
    /// [`Sample::accumulate`] once per micro-batch; their gradients are averaged into one sample
    /// (do not scale the loss). μ is restored afterwards, also on error or panic. `E` is any
    /// error type that an [`Error`] converts into (this crate's, `anyhow::Error`, your own).
    pub fn with_sample<T, E, F>(&mut self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut Sample<'_>) -> Result<T, E>,
        E: From<Error>,
    {
        let mut sample = self.sample()?;
        let out = f(&mut sample)?;
        sample.finish()?;
        Ok(out)
    }

    /// Applies the update from the recorded samples (`specs/ivon.md` steps 4–9): sync, t ← t+1,
    /// then per group m, h (first) and μ (with the new h); writes μ into the vars and resets the
    /// sample averages. Errors with [`Error::NoSamples`] if no sample was recorded.
    pub fn step(&mut self) -> Result<()> {
        if self.count == 0 {
            return Err(Error::NoSamples);
        }
        if self.config.sync {
            if let Some(f) = self.sync_fn.as_mut() {
                f(&mut self.avg_grad)?;
                f(&mut self.avg_curv)?;
            }
        }
        self.step += 1;
        let approx = self.config.hess_approx;
        for g in &self.groups {
            let c = Coefficients::new(&g.hyper, &self.config, self.step);
            let r = g.start..g.end;
            self.mean[r.clone()]
                .par_chunks_mut(CHUNK)
                .zip(self.momentum[r.clone()].par_chunks_mut(CHUNK))
                .zip(self.hess[r.clone()].par_chunks_mut(CHUNK))
                .zip(self.avg_grad[r.clone()].par_chunks(CHUNK))
                .zip(self.avg_curv[r].par_chunks(CHUNK))
                .for_each(|((((mu, m), h), gbar), stat)| {
                    update_chunk(approx, &c, mu, m, h, gbar, stat);
                });
        }
        self.count = 0;
        self.flat.write_values(&self.mean)
    }

    /// Fills `self.noise` with σ⊙ε for every group (step 1).
    fn draw_noise(&mut self) {
        for (gi, g) in self.groups.iter().enumerate() {
            let r = g.start..g.end;
            self.noise_source.fill(gi, &mut self.noise[r.clone()]);
            let (ess, wd) = (g.hyper.ess as f32, g.hyper.weight_decay as f32);
            self.noise[r.clone()].par_chunks_mut(CHUNK).zip(self.hess[r].par_chunks(CHUNK)).for_each(|(n, h)| {
                for (n, &h) in n.iter_mut().zip(h) {
                    *n = sample_noise(*n, h, ess, wd);
                }
            });
        }
    }

    /// Writes μ back into the vars.
    pub(crate) fn restore_mean(&self) -> Result<()> {
        self.flat.write_values(&self.mean)
    }

    /// Sets the vars to a posterior sample θ = μ + σ⊙ε with ε from `noise` (not the training
    /// stream) and returns the guard that restores μ; nothing is recorded unless you call
    /// [`Sample::accumulate`] and [`Sample::finish`]. For prediction see
    /// [`Ivon::with_posterior_sample`].
    pub fn sample_posterior(&mut self, noise: &mut NoiseState) -> Result<Sample<'_>> {
        for g in &self.groups {
            let r = g.start..g.end;
            noise.fill(&mut self.noise[r.clone()]);
            let (ess, wd) = (g.hyper.ess as f32, g.hyper.weight_decay as f32);
            for (n, &h) in self.noise[r.clone()].iter_mut().zip(&self.hess[r]) {
                *n = sample_noise(*n, h, ess, wd);
            }
        }
        self.enter_sample()
    }
}

/// The fused update of one chunk: steps 4–8 per element, h before μ.
fn update_chunk(
    approx: HessApprox,
    c: &Coefficients,
    mu: &mut [f32],
    m: &mut [f32],
    h: &mut [f32],
    gbar: &[f32],
    stat: &[f32],
) {
    for ((((mu, m), h), &g), &s) in mu.iter_mut().zip(m.iter_mut()).zip(h.iter_mut()).zip(gbar).zip(stat) {
        *m = new_momentum(*m, g, c);
        *h = new_hess(*h, nll_hess(approx, *h, s, c), c);
        *mu = new_mean(*mu, *m, *h, c);
    }
}

/// A posterior sample in progress: the vars hold θ = μ + σ⊙ε until the guard is finished or
/// dropped, which restores μ. Record gradients with [`Sample::accumulate`] (once per
/// micro-batch) and [`Sample::finish`]; drop it (or call [`Sample::discard`]) to only predict.
pub struct Sample<'a> {
    ivon: &'a mut Ivon,
    micro_batches: usize,
    done: bool,
}

impl Sample<'_> {
    /// This sample's noise σ⊙ε, flat (θ − μ).
    pub fn noise(&self) -> &[f32] {
        &self.ivon.noise
    }

    /// Micro-batches accumulated so far.
    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// Adds one micro-batch gradient (taken at θ) to this sample: the sample's gradient is the
    /// running mean over micro-batches. Frozen vars and vars without a gradient contribute zero.
    pub fn accumulate(&mut self, grads: &GradStore) -> Result<()> {
        self.micro_batches += 1;
        let k = self.micro_batches;
        let kf = k as f32;
        let ivon = &mut *self.ivon;
        let frozen = &ivon.frozen;
        let host = ivon.flat.host_grads(grads, |i| !frozen[i])?;
        for (index, slot) in ivon.flat.slots.iter().enumerate() {
            let acc = &mut ivon.scratch[slot.offset..slot.offset + slot.len];
            let seen = host.visit(index, |g| {
                if k == 1 {
                    acc.copy_from_slice(g);
                } else {
                    for (a, &g) in acc.iter_mut().zip(g) {
                        *a += (g - *a) / kf;
                    }
                }
            })?;
            if seen.is_none() {
                if k == 1 {
                    acc.fill(0.0);
                } else {
                    acc.iter_mut().for_each(|a| *a += (0.0 - *a) / kf);
                }
            }
        }
        Ok(())
    }

    /// Records this sample (Welford means of g and of noise⊙g or g², `specs/ivon.md` step 3)
    /// and restores μ. Errors with [`Error::EmptySample`] (after restoring μ) if nothing was
    /// accumulated.
    pub fn finish(mut self) -> Result<()> {
        self.done = true;
        let ivon = &mut *self.ivon;
        if self.micro_batches == 0 {
            ivon.restore_mean()?;
            return Err(Error::EmptySample);
        }
        ivon.count += 1;
        let first = ivon.count == 1;
        let cf = ivon.count as f32;
        let approx = ivon.config.hess_approx;
        ivon.avg_grad
            .par_chunks_mut(CHUNK)
            .zip(ivon.avg_curv.par_chunks_mut(CHUNK))
            .zip(ivon.scratch.par_chunks(CHUNK))
            .zip(ivon.noise.par_chunks(CHUNK))
            .for_each(|(((ag, ac), g), n)| {
                for (((ag, ac), &g), &n) in ag.iter_mut().zip(ac.iter_mut()).zip(g).zip(n) {
                    let stat = match approx {
                        HessApprox::Price => n * g,
                        HessApprox::Gradsq => g * g,
                    };
                    if first {
                        *ag = g;
                        *ac = stat;
                    } else {
                        *ag += (g - *ag) / cf;
                        *ac += (stat - *ac) / cf;
                    }
                }
            });
        ivon.restore_mean()
    }

    /// Restores μ without recording anything (a prediction sample).
    pub fn discard(mut self) -> Result<()> {
        self.done = true;
        self.ivon.restore_mean()
    }
}

impl Drop for Sample<'_> {
    fn drop(&mut self) {
        if !self.done {
            // Cannot report an error from drop (this may run during a panic); writing μ back
            // only fails if the vars' device fails, which the next op will report.
            let _ = self.ivon.restore_mean();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_check_case_a_step_one() {
        // reference/ivon.md §1.4, case A, first coordinate: g = −1.7005, ĥ = −8.5449, h = 0.909061.
        let g = GroupHyper {
            lr: 0.1,
            ess: 100.0,
            weight_decay: 1e-2,
            hess_init: 1.0,
            beta1: 0.9,
            beta2: 0.99,
            clip_radius: f64::INFINITY,
        };
        let cfg = IvonConfig { rescale_lr: false, ..Default::default() };
        let c = Coefficients::new(&g, &cfg, 1);
        let noise = sample_noise(0.5, 1.0, c.ess, c.weight_decay);
        let grad = 2.0 * (0.1 + noise - 1.0);
        let hh = nll_hess(HessApprox::Price, 1.0, noise * grad, &c);
        assert!((hh - -8.5449).abs() < 1e-3, "{hh}");
        let h = new_hess(1.0, hh, &c);
        assert!((h - 0.909_061_26).abs() < 1e-6, "{h}");
        let m = new_momentum(0.0, grad, &c);
        let mu = new_mean(0.1, m, h, &c);
        assert!((mu - 0.284_916_54).abs() < 1e-6, "{mu}");
    }

    #[test]
    fn config_json_round_trip_with_infinite_clip() {
        let c = IvonConfig::default();
        let s = serde_json::to_string(&c).unwrap();
        assert!(s.contains("\"clip_radius\":\"inf\""), "{s}");
        let back: IvonConfig = serde_json::from_str(&s).unwrap();
        assert_eq!(back, c);
        let lora: IvonConfig =
            serde_json::from_str(&serde_json::to_string(&IvonConfig::ivon_lora(IvonLoraTask::WgM)).unwrap()).unwrap();
        assert_eq!(lora.ess, 1e8);
        assert_eq!("ARC_C".parse::<IvonLoraTask>().unwrap(), IvonLoraTask::ArcC);
        assert!("arc".parse::<IvonLoraTask>().is_err());
    }
}
