//! Post-hoc diagonal Laplace over the trainable weights (LoRA A/B and a classification head) of a
//! MAP/AdamW model (Laplace-LoRA, Yang et al. 2024, arXiv 2308.13111 — which uses K-FAC; ours is
//! the diagonal variant).
//!
//! The posterior is q(θ) = N(θ_MAP, diag(1 / (F + λ))) where
//! - F is the **empirical Fisher** diagonal: Σ_n g_n², g_n = ∇_θ −log p(y_n | x_n, θ_MAP), one
//!   backward pass per training example (dropout off). With `max_examples` = n < N rows, the sum
//!   over n evenly spaced rows is rescaled by N / n;
//! - λ is the prior precision (an isotropic Gaussian prior N(0, λ⁻¹ I)), chosen from a grid by the
//!   NLL of the MC predictive on the held-out split (Laplace-LoRA's `train_val` mode tunes it on
//!   validation NLL too, by gradient descent; a grid is enough for one scalar).
//!
//! The predictive samples θ_k ~ q and averages softmax probabilities over K samples (the "MC"
//! predictive; Laplace-LoRA's default is a linearised GLM predictive with `mc_corr`), through
//! [`ModelPredictor::gaussian`].
use crate::adapters::Ctx;
use crate::data::{Batch, EncodedDataset};
use crate::eval::ModelPredictor;
use crate::eval::{evaluate, EvalConfig};
use crate::train::{loss, Classifier};
use crate::{Error, Result};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

/// How the Laplace posterior is built and tuned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LaplaceConfig {
    /// Prior precisions λ tried on the held-out split; the lowest held-out NLL wins.
    pub prior_precisions: Vec<f64>,
    /// Training rows whose per-example gradients form the Fisher (evenly spaced, rescaled to
    /// the whole set); `None`: all rows (one backward pass each).
    pub max_examples: Option<usize>,
    /// Posterior samples per grid point when tuning λ.
    pub tune_samples: usize,
    pub batch_size: usize,
}

impl Default for LaplaceConfig {
    fn default() -> Self {
        // Decades from 1 to 1e8: the top end is indistinguishable from the MAP model on MiniLM
        // LoRA (σ ≤ 1e-4), the bottom end destroys it, so the optimum lies inside.
        LaplaceConfig {
            prior_precisions: (0..=8).map(|e| 10f64.powi(e)).collect(),
            max_examples: None,
            tune_samples: 5,
            batch_size: 64,
        }
    }
}

impl LaplaceConfig {
    pub fn validate(&self) -> Result<()> {
        if self.prior_precisions.is_empty() {
            return Err(Error::config("prior_precisions", "[]", "give at least one prior precision"));
        }
        if let Some(&l) = self.prior_precisions.iter().find(|&&l| !(l > 0.0 && l.is_finite())) {
            return Err(Error::config("prior_precisions", l, "each must be positive and finite"));
        }
        if self.max_examples == Some(0) {
            return Err(Error::config("max_examples", 0, "use at least one example, or leave it unset"));
        }
        if self.tune_samples == 0 {
            return Err(Error::config("tune_samples", 0, "use at least one sample"));
        }
        Ok(())
    }
}

/// A fitted diagonal Laplace posterior.
#[derive(Debug, Clone, Serialize)]
pub struct LaplaceFit {
    /// θ_MAP, flattened in `Classifier::trainable()` order.
    #[serde(skip)]
    pub mean: Vec<f32>,
    /// Empirical Fisher diagonal, rescaled to the whole training set.
    #[serde(skip)]
    pub fisher: Vec<f64>,
    /// The chosen λ.
    pub prior_precision: f64,
    /// (λ, held-out NLL) for every grid point.
    pub heldout_nll: Vec<(f64, f64)>,
    /// Rows whose gradients were summed, and the training-set size they were rescaled to.
    pub fisher_examples: usize,
    pub train_examples: usize,
    /// Mean and largest posterior std at the chosen λ.
    pub mean_std: f64,
    pub max_std: f64,
}

/// Σ_n g_n² over (up to `max_examples` evenly spaced) rows of `data`, rescaled by N / n, with
/// g_n the gradient of the example's cross-entropy at the model's current weights (dropout off).
/// Returns the diagonal in `trainable()` order and n.
pub fn empirical_fisher(
    model: &dyn Classifier,
    data: &EncodedDataset,
    max_examples: Option<usize>,
    device: &Device,
) -> Result<(Vec<f64>, usize)> {
    let vars: Vec<_> = model.trainable().into_iter().map(|(_, v)| v).collect();
    let total: usize = vars.iter().map(|v| v.elem_count()).sum();
    let n_all = data.len();
    if n_all == 0 {
        return Err(Error::config("training data", 0, "the Fisher needs at least one row"));
    }
    let n = max_examples.unwrap_or(n_all).min(n_all);
    let mut fisher = vec![0f64; total];
    for j in 0..n {
        // evenly spaced rows; j * N / n is strictly increasing, so no row repeats
        let row = j * n_all / n;
        let batch = Batch::collate(data, &[row])?.to_tensors(device)?;
        let l = loss(&model.logits(&batch, &Ctx::eval_with_grad())?, &batch)?;
        let grads = l.backward()?;
        let mut offset = 0;
        for v in &vars {
            let count = v.elem_count();
            if let Some(g) = grads.get(v.as_tensor()) {
                let g = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                for (f, gi) in fisher[offset..offset + count].iter_mut().zip(g) {
                    *f += f64::from(gi) * f64::from(gi);
                }
            }
            offset += count;
        }
    }
    let scale = n_all as f64 / n as f64;
    fisher.iter_mut().for_each(|f| *f *= scale);
    Ok((fisher, n))
}

/// Posterior standard deviations 1 / sqrt(F + λ).
pub fn posterior_std(fisher: &[f64], prior_precision: f64) -> Vec<f32> {
    fisher.iter().map(|f| (1.0 / (f + prior_precision).sqrt()) as f32).collect()
}

/// Fits the Fisher on `train` at the model's current (MAP) weights and picks λ on `heldout`.
pub fn fit(
    model: &dyn Classifier,
    train: &EncodedDataset,
    heldout: &EncodedDataset,
    cfg: &LaplaceConfig,
    device: &Device,
    seed: u64,
) -> Result<LaplaceFit> {
    cfg.validate()?;
    let mean = ModelPredictor::point(model, device)?.mean_values().to_vec();
    let (fisher, n) = empirical_fisher(model, train, cfg.max_examples, device)?;
    let eval_cfg = EvalConfig {
        method: "laplace-tune".into(),
        num_samples: cfg.tune_samples,
        batch_size: cfg.batch_size,
        curve: Vec::new(),
    };
    let mut heldout_nll = Vec::new();
    for &lambda in &cfg.prior_precisions {
        let mut p = ModelPredictor::gaussian(model, mean.clone(), posterior_std(&fisher, lambda), device, seed)?;
        let ev = evaluate(&mut p, heldout, &eval_cfg)?;
        p.restore()?;
        let nll = ev.results.last().and_then(|r| r.metrics.nll).unwrap_or(f64::INFINITY);
        heldout_nll.push((lambda, nll));
    }
    // invariant: prior_precisions is non-empty (validated), so is heldout_nll
    let best = heldout_nll.iter().copied().fold((f64::NAN, f64::INFINITY), |a, b| if b.1 < a.1 { b } else { a });
    let prior_precision = if best.0.is_nan() { cfg.prior_precisions[cfg.prior_precisions.len() - 1] } else { best.0 };
    let std = posterior_std(&fisher, prior_precision);
    let mean_std = std.iter().map(|&s| f64::from(s)).sum::<f64>() / std.len().max(1) as f64;
    let max_std = std.iter().fold(0f64, |m, &s| m.max(f64::from(s)));
    Ok(LaplaceFit {
        mean,
        fisher,
        prior_precision,
        heldout_nll,
        fisher_examples: n,
        train_examples: train.len(),
        mean_std,
        max_std,
    })
}

impl LaplaceFit {
    /// The MC predictive of this posterior over `model` (which must be the fitted model).
    pub fn predictor<'a>(&self, model: &'a dyn Classifier, device: &Device, seed: u64) -> Result<ModelPredictor<'a>> {
        ModelPredictor::gaussian(
            model,
            self.mean.clone(),
            posterior_std(&self.fisher, self.prior_precision),
            device,
            seed,
        )
    }
}
