//! The [`Optimizer`] trait shared by [`crate::Ivon`], [`AdamW`] and [`Sgd`], so a training loop
//! can switch between them.
//!
//! How a training loop uses each:
//! - **AdamW / SGD** need the gradient at the current weights: `let g = loss.backward()?;
//!   opt.step(&g)?`, or `opt.backward_step(&mut || loss(batch)?.backward())?`.
//! - **IVON** needs gradients at *sampled* weights θ = μ + σ⊙ε, so the loss must be computed
//!   inside a closure that IVON calls under each sample: `opt.backward_step(&mut || ...)` (runs
//!   `mc_samples` samples, then updates) or, by hand, `ivon.with_sampled_params(..)` per sample
//!   followed by `ivon.step()`. `Optimizer::step(&grads)` on IVON applies the samples already
//!   recorded and does not use `grads` (it cannot know at which θ they were taken).
//!
//! A loop written against `backward_step` works for all three.
//!
//! Unlike candle-nn's optimizers, these refuse non-float vars, mixed devices and dtypes, keep an
//! f32 master copy of the weights, validate their hyper-parameters and save their state.
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::Var;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::device::AdamWDevice;
use crate::error::{invalid, Error, Result};
use crate::flat::{load_flat, save_flat, FlatVars};

/// Elements per parallel chunk.
const CHUNK: usize = 1 << 15;

/// A first-order optimizer over candle `Var`s (see the module doc for how loops use it).
pub trait Optimizer {
    /// Applies one update. AdamW/SGD: `grads` are the gradients at the current weights (vars
    /// without a gradient are left unchanged, as in torch). IVON: applies the samples recorded
    /// through `with_sampled_params` and ignores `grads`.
    fn step(&mut self, grads: &GradStore) -> Result<()>;

    /// One training iteration: calls `loss_and_grads` (forward + `loss.backward()`) as often as
    /// the optimizer needs, at the weights it needs, then updates. The default calls it once at
    /// the current weights; IVON calls it `mc_samples` times under posterior samples.
    fn backward_step(&mut self, loss_and_grads: &mut dyn FnMut() -> candle_core::Result<GradStore>) -> Result<()> {
        let grads = loss_and_grads()?;
        self.step(&grads)
    }

    /// The current (base) learning rate.
    fn learning_rate(&self) -> f64;

    /// Sets the (base) learning rate, e.g. from a schedule.
    fn set_learning_rate(&mut self, lr: f64);

    /// Saves the optimizer state (weights' f32 master copy included) to a safetensors file.
    fn save_state(&self, path: &Path) -> Result<()>;

    /// Loads a state written by `save_state` and writes the weights into the vars.
    fn load_state(&mut self, path: &Path) -> Result<()>;
}

impl Optimizer for crate::Ivon {
    fn step(&mut self, _grads: &GradStore) -> Result<()> {
        crate::Ivon::step(self)
    }

    fn backward_step(&mut self, loss_and_grads: &mut dyn FnMut() -> candle_core::Result<GradStore>) -> Result<()> {
        for _ in 0..self.config().mc_samples {
            self.with_sampled_params(&mut *loss_and_grads)?;
        }
        crate::Ivon::step(self)
    }

    fn learning_rate(&self) -> f64 {
        self.config().lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        crate::Ivon::set_learning_rate(self, lr)
    }

    fn save_state(&self, path: &Path) -> Result<()> {
        crate::Ivon::save_state(self, path)
    }

    fn load_state(&mut self, path: &Path) -> Result<()> {
        crate::Ivon::load_state(self, path)
    }
}

// ------------------------------------------------------------------------------------------------
// AdamW
// ------------------------------------------------------------------------------------------------

/// AdamW hyper-parameters; defaults are torch.optim.AdamW's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    /// Learning rate (torch default 1e-3; IVON-LoRA's AdamW baseline uses 5e-5).
    pub lr: f64,
    /// First-moment decay (torch 0.9).
    pub beta1: f64,
    /// Second-moment decay (torch 0.999).
    pub beta2: f64,
    /// Denominator epsilon (torch 1e-8).
    pub eps: f64,
    /// Decoupled weight decay (torch 1e-2; IVON-LoRA's baseline uses 0).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 }
    }
}

/// `value >= 0` (NaN rejected), or an error naming the field and the value.
fn non_negative(field: &str, value: f64) -> Result<()> {
    if value.is_nan() || value < 0.0 {
        return Err(invalid(field, value, "must be >= 0"));
    }
    Ok(())
}

impl AdamWConfig {
    /// Checks ranges (as torch does); the error names field and value.
    pub fn validate(&self) -> Result<()> {
        non_negative("lr", self.lr)?;
        if !(0.0..1.0).contains(&self.beta1) {
            return Err(invalid("beta1", self.beta1, "must be in [0, 1)"));
        }
        if !(0.0..1.0).contains(&self.beta2) {
            return Err(invalid("beta2", self.beta2, "must be in [0, 1)"));
        }
        non_negative("eps", self.eps)?;
        non_negative("weight_decay", self.weight_decay)?;
        Ok(())
    }
}

/// AdamW (Loshchilov & Hutter, decoupled weight decay) exactly in torch.optim.AdamW's
/// single-tensor form: p ← p(1 − lr·wd); m ← m + (1−β1)(g − m); v ← β2 v + (1−β2) g²;
/// p ← p − lr/(1−β1^t) · m / (√v/√(1−β2^t) + eps). f32 state and f32 master weights, on the
/// vars' CUDA device when they live on one (one fused kernel per step, `crate::device`).
pub struct AdamW {
    config: AdamWConfig,
    flat: FlatVars,
    /// Host state; empty when `device` holds it.
    params: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    step: u64,
    /// Boxed: the device state is large (buffers, functions, the var table).
    device: Option<Box<AdamWDevice>>,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW")
            .field("config", &self.config)
            .field("numel", &self.flat.numel)
            .field("step", &self.step)
            .field("on_device", &self.device.is_some())
            .finish_non_exhaustive()
    }
}

/// The f32 scalars of one AdamW step (f64 arithmetic rounded once), shared by the host loop and
/// the device kernel.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdamWStep {
    /// 1 − lr·wd.
    pub decay: f32,
    /// 1 − β1.
    pub one_minus_beta1: f32,
    /// β2.
    pub beta2: f32,
    /// 1 − β2.
    pub one_minus_beta2: f32,
    /// lr/(1 − β1^t).
    pub step_size: f32,
    /// √(1 − β2^t).
    pub bc2_sqrt: f32,
    /// eps.
    pub eps: f32,
}

impl AdamWStep {
    fn new(c: &AdamWConfig, step: u64) -> Self {
        let t = step as f64;
        Self {
            decay: (1.0 - c.lr * c.weight_decay) as f32,
            one_minus_beta1: (1.0 - c.beta1) as f32,
            beta2: c.beta2 as f32,
            one_minus_beta2: (1.0 - c.beta2) as f32,
            step_size: (c.lr / (1.0 - c.beta1.powf(t))) as f32,
            bc2_sqrt: (1.0 - c.beta2.powf(t)).sqrt() as f32,
            eps: c.eps as f32,
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdamWMeta {
    config: AdamWConfig,
    step: u64,
}

impl AdamW {
    /// AdamW over `vars`. Errors on invalid hyper-parameters, no vars, non-float vars, mixed
    /// devices or dtypes.
    pub fn new(vars: Vec<Var>, config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        let flat = FlatVars::new(vars)?;
        let params = flat.read_values()?;
        let device = AdamWDevice::new(&flat, &params)?.map(Box::new);
        if device.is_some() {
            return Ok(Self { config, flat, params: vec![], m: vec![], v: vec![], step: 0, device });
        }
        let n = flat.numel;
        Ok(Self { config, flat, params, m: vec![0.0; n], v: vec![0.0; n], step: 0, device })
    }

    /// The configuration.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Updates applied so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let c = AdamWStep::new(&self.config, self.step);
        if let Some(d) = self.device.as_mut() {
            return d.step(&self.flat, grads, &c);
        }
        let AdamWStep { decay, one_minus_beta1: omb1, beta2: b2, one_minus_beta2: omb2, step_size, bc2_sqrt, eps } = c;
        let host = self.flat.host_grads(grads, |_| true)?;
        for (index, s) in self.flat.slots.iter().enumerate() {
            let r = s.offset..s.offset + s.len;
            let (p, m, v) = (&mut self.params[r.clone()], &mut self.m[r.clone()], &mut self.v[r]);
            host.visit(index, |g| {
                p.par_chunks_mut(CHUNK)
                    .zip(m.par_chunks_mut(CHUNK))
                    .zip(v.par_chunks_mut(CHUNK))
                    .zip(g.par_chunks(CHUNK))
                    .for_each(|(((p, m), v), g)| {
                        for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
                            *p *= decay;
                            *m += omb1 * (g - *m);
                            *v = b2 * *v + omb2 * (g * g);
                            *p -= step_size * (*m / (v.sqrt() / bc2_sqrt + eps));
                        }
                    })
            })?;
        }
        self.flat.write_values(&self.params)
    }

    fn learning_rate(&self) -> f64 {
        self.config.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    fn save_state(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_string(&AdamWMeta { config: self.config, step: self.step })
            .map_err(|source| Error::Json { path: path.into(), cause: source })?;
        if let Some(d) = &self.device {
            let [params, m, v] = d.download()?;
            return save_flat(path, &[("params", &params), ("m", &m), ("v", &v)], "adamw_state", json);
        }
        save_flat(path, &[("params", &self.params), ("m", &self.m), ("v", &self.v)], "adamw_state", json)
    }

    fn load_state(&mut self, path: &Path) -> Result<()> {
        let (json, mut t) = load_flat(path, "adamw_state")?;
        let meta: AdamWMeta =
            serde_json::from_str(&json).map_err(|source| Error::Json { path: path.into(), cause: source })?;
        meta.config.validate()?;
        let n = self.flat.numel;
        let mut take = |name: &str| match t.remove(name) {
            Some(v) if v.len() == n => Ok(v),
            other => Err(Error::StateMismatch {
                path: path.into(),
                reason: format!("tensor `{name}`: expected {n} elements, found {:?}", other.map(|v| v.len())),
            }),
        };
        let (params, m, v) = (take("params")?, take("m")?, take("v")?);
        self.config = meta.config;
        self.step = meta.step;
        if let Some(d) = self.device.as_mut() {
            return d.upload(&self.flat, &params, &m, &v);
        }
        (self.params, self.m, self.v) = (params, m, v);
        self.flat.write_values(&self.params)
    }
}

// ------------------------------------------------------------------------------------------------
// SGD
// ------------------------------------------------------------------------------------------------

/// SGD hyper-parameters; defaults as torch.optim.SGD (which has no default lr; 1e-2 here).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SgdConfig {
    /// Learning rate.
    pub lr: f64,
    /// Heavy-ball momentum (torch 0).
    pub momentum: f64,
    /// L2 weight decay added to the gradient, coupled as in torch.optim.SGD (torch 0).
    pub weight_decay: f64,
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self { lr: 1e-2, momentum: 0.0, weight_decay: 0.0 }
    }
}

impl SgdConfig {
    /// Checks ranges; the error names field and value.
    pub fn validate(&self) -> Result<()> {
        non_negative("lr", self.lr)?;
        non_negative("momentum", self.momentum)?;
        non_negative("weight_decay", self.weight_decay)?;
        Ok(())
    }
}

/// SGD as torch.optim.SGD without dampening or Nesterov: d = g + wd·p; with momentum
/// b ← μ·b + d (b = d at the first step), d = b; p ← p − lr·d.
#[derive(Debug)]
pub struct Sgd {
    config: SgdConfig,
    flat: FlatVars,
    params: Vec<f32>,
    buf: Vec<f32>,
    step: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SgdMeta {
    config: SgdConfig,
    step: u64,
}

impl Sgd {
    /// SGD over `vars`; same checks as [`AdamW::new`].
    pub fn new(vars: Vec<Var>, config: SgdConfig) -> Result<Self> {
        config.validate()?;
        let flat = FlatVars::new(vars)?;
        let params = flat.read_values()?;
        let buf = vec![0.0; flat.numel];
        Ok(Self { config, flat, params, buf, step: 0 })
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let (lr, mom, wd) = (self.config.lr as f32, self.config.momentum as f32, self.config.weight_decay as f32);
        let first = self.step == 1;
        let host = self.flat.host_grads(grads, |_| true)?;
        for (index, s) in self.flat.slots.iter().enumerate() {
            let r = s.offset..s.offset + s.len;
            let (p, b) = (&mut self.params[r.clone()], &mut self.buf[r]);
            host.visit(index, |g| {
                for ((p, b), &g) in p.iter_mut().zip(b.iter_mut()).zip(g) {
                    let mut d = if wd != 0.0 { g + wd * *p } else { g };
                    if mom != 0.0 {
                        *b = if first { d } else { mom * *b + d };
                        d = *b;
                    }
                    *p -= lr * d;
                }
            })?;
        }
        self.flat.write_values(&self.params)
    }

    fn learning_rate(&self) -> f64 {
        self.config.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    fn save_state(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_string(&SgdMeta { config: self.config, step: self.step })
            .map_err(|source| Error::Json { path: path.into(), cause: source })?;
        save_flat(path, &[("params", &self.params), ("momentum_buffer", &self.buf)], "sgd_state", json)
    }

    fn load_state(&mut self, path: &Path) -> Result<()> {
        let (json, mut t) = load_flat(path, "sgd_state")?;
        let meta: SgdMeta =
            serde_json::from_str(&json).map_err(|source| Error::Json { path: path.into(), cause: source })?;
        meta.config.validate()?;
        let n = self.flat.numel;
        let mut take = |name: &str| match t.remove(name) {
            Some(v) if v.len() == n => Ok(v),
            other => Err(Error::StateMismatch {
                path: path.into(),
                reason: format!("tensor `{name}`: expected {n} elements, found {:?}", other.map(|v| v.len())),
            }),
        };
        self.params = take("params")?;
        self.buf = take("momentum_buffer")?;
        self.config = meta.config;
        self.step = meta.step;
        self.flat.write_values(&self.params)
    }
}
