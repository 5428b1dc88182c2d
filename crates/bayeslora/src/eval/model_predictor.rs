//! [`ModelPredictor`]: a trained [`Classifier`] as a [`Predictor`],
//! at the posterior mean (K = 0) or at posterior samples θ_k = μ + σ⊙ε_k drawn from the IVON
//! posterior `N(μ, diag(σ²))`, σ² = 1/(ess·(h+δ)) (`specs/ivon.md`, "Posterior and prediction").
//!
//! Sample k's noise comes from a generator seeded by `(seed, k)`, so the same K samples are
//! drawn for every batch of a pass and an evaluation is reproducible. Dropout is off.
//!
//! On a GPU the next sample's θ is drawn on a host thread while the device runs the current
//! sample's passes (the draw is ~10 ns a value on one core: 45 ms for Llama-2-7B's q, v adapters
//! at r 8, half a pass of 2 batches); the values are those of the same `(seed, k)` stream.
use super::Predictor;
use crate::adapters::Ctx;
use crate::data::Batch;
use crate::train::Classifier;
use crate::Result;
use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Predicts with a classifier's trainable vars set to the mean or to posterior samples.
pub struct ModelPredictor<'a> {
    model: &'a dyn Classifier,
    device: Device,
    /// The vars in the posterior's flat order.
    vars: Vec<Var>,
    mean: Arc<Vec<f32>>,
    /// σ per element; `None` for point estimates (AdamW): only K = 0 is possible.
    std: Option<Arc<Vec<f32>>>,
    seed: u64,
    current: Option<Option<usize>>,
    /// Draw sample k + 1 on a host thread once sample k is written (on by default on CUDA).
    prefetch: bool,
    /// The drawing of that next sample: (k + 1, its thread).
    next: Option<(usize, JoinHandle<Vec<f32>>)>,
}

/// θ_k = μ + σ ⊙ ε_k with ε_k from the generator seeded by `(seed, k)`.
fn draw(mean: &[f32], std: &[f32], seed: u64, k: usize) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (k as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    mean.iter()
        .zip(std)
        .map(|(&m, &s)| {
            let e: f32 = StandardNormal.sample(&mut rng);
            m + s * e
        })
        .collect()
}

impl<'a> ModelPredictor<'a> {
    /// A point-estimate predictor (the vars as they are).
    pub fn point(model: &'a dyn Classifier, device: &Device) -> Result<Self> {
        let vars: Vec<Var> = model.trainable().into_iter().map(|(_, v)| v).collect();
        let mut mean = Vec::new();
        for v in &vars {
            mean.extend(v.as_tensor().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(Self::new(model, device, vars, mean, None, 0))
    }

    fn new(
        model: &'a dyn Classifier,
        device: &Device,
        vars: Vec<Var>,
        mean: Vec<f32>,
        std: Option<Vec<f32>>,
        seed: u64,
    ) -> Self {
        ModelPredictor {
            model,
            device: device.clone(),
            vars,
            mean: Arc::new(mean),
            std: std.map(Arc::new),
            seed,
            current: None,
            prefetch: device.is_cuda(),
            next: None,
        }
    }

    /// Draws each next posterior sample on a host thread while the current one runs (`true`),
    /// or each sample when it is selected (`false`); the samples are the same either way.
    pub fn with_prefetch(mut self, on: bool) -> Self {
        self.prefetch = on;
        self
    }

    /// A posterior predictor from an IVON optimizer's current state over `model`'s vars.
    pub fn posterior(model: &'a dyn Classifier, ivon: &ivon::Ivon, device: &Device, seed: u64) -> Result<Self> {
        let post = ivon.posterior()?;
        Ok(Self::new(model, device, ivon.vars(), post.mean.clone(), Some(post.std()), seed))
    }

    /// A predictor that samples θ_k ~ N(`mean`, diag(`std`²)) over `model.trainable()` (in that
    /// order, flattened): for post-hoc posteriors such as the diagonal Laplace approximation
    /// (`baselines::laplace`). The vars are set to `mean` for K = 0.
    pub fn gaussian(
        model: &'a dyn Classifier,
        mean: Vec<f32>,
        std: Vec<f32>,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        let vars: Vec<Var> = model.trainable().into_iter().map(|(_, v)| v).collect();
        let n: usize = vars.iter().map(|v| v.elem_count()).sum();
        if mean.len() != n || std.len() != n {
            return Err(crate::Error::config(
                "posterior",
                format!("{} means, {} stds", mean.len(), std.len()),
                format!("the model has {n} trainable elements"),
            ));
        }
        Ok(Self::new(model, device, vars, mean, Some(std), seed))
    }

    /// A posterior predictor from a stored posterior (e.g. `export::load_peft`'s sidecar):
    /// `mean` and `std` (σ per element; `None`: point estimate) in
    /// [`Classifier::posterior_vars`]' flat order (all trainable vars but B-LoRA's gates, which
    /// keep their values). Sample k is drawn from `(seed, k)` as in [`Self::posterior`].
    pub fn from_posterior(
        model: &'a dyn Classifier,
        mean: Vec<f32>,
        std: Option<Vec<f32>>,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        let vars: Vec<Var> = model.posterior_vars().into_iter().map(|(_, v)| v).collect();
        let numel: usize = vars.iter().map(|v| v.elem_count()).sum();
        if mean.len() != numel || std.as_ref().is_some_and(|s| s.len() != numel) {
            return Err(crate::Error::config(
                "posterior",
                format!("{} values", mean.len()),
                format!("the model has {numel} trainable values"),
            ));
        }
        Ok(Self::new(model, device, vars, mean, std, seed))
    }

    /// A predictor over a loaded adapter: its stored IVON posterior when there is one (see
    /// [`Self::from_posterior`]; K > 0 allowed), else the vars as they are (K = 0 only).
    pub fn stored(
        model: &'a dyn Classifier,
        posterior: Option<&ivon::Posterior>,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        match posterior {
            Some(p) => Self::from_posterior(model, p.mean.clone(), Some(p.std()), device, seed),
            None => Self::point(model, device),
        }
    }

    fn write(&self, values: &[f32]) -> Result<()> {
        let mut offset = 0;
        for v in &self.vars {
            let n = v.elem_count();
            let t = Tensor::from_slice(&values[offset..offset + n], v.shape(), &self.device)?.to_dtype(v.dtype())?;
            v.set(&t)?;
            offset += n;
        }
        Ok(())
    }

    fn select(&mut self, sample: Option<usize>) -> Result<()> {
        if self.current == Some(sample) {
            return Ok(());
        }
        match (sample, &self.std) {
            (None, _) => self.write(&self.mean)?,
            (Some(k), Some(std)) => {
                let std = Arc::clone(std);
                let theta = match self.next.take() {
                    Some((j, drawing)) if j == k => drawing
                        .join()
                        .map_err(|_| crate::Error::run("the thread drawing a posterior sample panicked"))?,
                    // Not the prefetched sample (or none): draw it here; a stale drawing ends on its own.
                    _ => draw(&self.mean, &std, self.seed, k),
                };
                self.write(&theta)?;
                if self.prefetch {
                    let (mean, seed) = (Arc::clone(&self.mean), self.seed);
                    self.next = Some((k + 1, std::thread::spawn(move || draw(&mean, &std, seed, k + 1))));
                }
            }
            (Some(_), None) => {
                return Err(crate::Error::config(
                    "samples",
                    "> 0",
                    "a point estimate (AdamW/SGD) has no posterior to sample; use 0",
                ))
            }
        }
        self.current = Some(sample);
        Ok(())
    }

    /// The mean (K = 0) values, flattened in `trainable()` order.
    pub fn mean_values(&self) -> &[f32] {
        &self.mean
    }

    /// Puts the mean back into the vars.
    pub fn restore(&mut self) -> Result<()> {
        self.select(None)
    }
}

impl Drop for ModelPredictor<'_> {
    fn drop(&mut self) {
        if self.current.is_some_and(|c| c.is_some()) {
            let _ = self.write(&self.mean);
        }
    }
}

impl Predictor for ModelPredictor<'_> {
    fn predict(&mut self, batch: &Batch, sample: Option<usize>) -> Result<Vec<f32>> {
        self.select(sample)?;
        let t = batch.to_tensors(&self.device)?;
        let logits = self.model.logits(&t, &Ctx::eval())?.to_dtype(DType::F32)?;
        Ok(logits.flatten_all()?.to_vec1::<f32>()?)
    }
}
