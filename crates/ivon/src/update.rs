//! The IVON update equations (`specs/ivon.md` steps 1 and 4–8), elementwise and in f32, as pure
//! functions: [`Coefficients`] of one step (f64 scalars rounded to f32 once, as torch does with
//! Python floats), then [`sample_noise`], [`new_momentum`], [`nll_hess`], [`new_hess`] and
//! [`new_mean`].
use crate::config::{GroupHyper, HessApprox, IvonConfig};

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
