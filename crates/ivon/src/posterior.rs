//! The IVON posterior q(θ) = N(μ, diag(σ²)), σ² = 1/(ess·(h+δ)) (`specs/ivon.md` "Posterior and
//! prediction"): per-var access to mean, Hessian and std, posterior samples for prediction, and
//! [`Posterior`], the optimizer state that saves to safetensors and resumes bit for bit.
//!
//! Differs from ivon-opt: the reference (and ivon-lora) save only μ, so sampled prediction cannot
//! be redone from a checkpoint; we save μ, m, h, the step count, the noise state and the
//! hyper-parameters.
//!
//! ```
//! use candle_core::{Device, Var};
//! use ivon::{Ivon, IvonConfig, NoiseState};
//! # fn main() -> ivon::Result<()> {
//! let w = Var::zeros(3, candle_core::DType::F32, &Device::Cpu)?;
//! let mut ivon = Ivon::new(vec![w.clone()], IvonConfig { ess: 100.0, ..Default::default() })?;
//! let std = ivon.std(&w)?; // σ0 = 1/√(ess·(h0+δ)) ≈ 0.1
//! assert!((std.to_vec1::<f32>()?[0] - 0.099995).abs() < 1e-5);
//! // Prediction under a posterior sample, with its own noise stream; μ is back afterwards.
//! let mut eval_noise = NoiseState::new(1);
//! let sampled = ivon.with_posterior_sample(&mut eval_noise, || w.as_tensor().to_vec1::<f32>())?;
//! assert!(sampled[0] != 0.0 && w.as_tensor().to_vec1::<f32>()?[0] == 0.0);
//! # Ok(()) }
//! ```
use std::borrow::Cow;
use std::ops::Range;
use std::path::Path;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::config::{GroupHyper, IvonConfig};
use crate::device::Buffer;
use crate::error::{Error, Result};
use crate::flat::{load_flat, save_flat};
use crate::noise::NoiseState;
use crate::Ivon;

/// Version of the state file layout (metadata key `ivon_state`).
const FORMAT_VERSION: u32 = 1;

/// Where one var sits in the flat state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamLayout {
    /// Index of its group.
    pub group: usize,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Whether its gradient is treated as zero.
    pub frozen: bool,
}

/// Everything IVON needs to sample the posterior later or to continue training exactly: flat f32
/// μ, m and h (groups then vars in order), the step count, the seeded noise state and the
/// hyper-parameters. Saved as safetensors tensors `mean`, `momentum`, `hess` with the rest as JSON
/// in the metadata key `ivon_state`.
#[derive(Debug, Clone, PartialEq)]
pub struct Posterior {
    /// Global hyper-parameters (lr = the current base lr).
    pub config: IvonConfig,
    /// Resolved hyper-parameters per group.
    pub groups: Vec<GroupHyper>,
    /// Layout of each var.
    pub params: Vec<ParamLayout>,
    /// μ.
    pub mean: Vec<f32>,
    /// m (momentum, not debiased).
    pub momentum: Vec<f32>,
    /// h.
    pub hess: Vec<f32>,
    /// Updates applied so far (t, used by debiasing).
    pub step: u64,
    /// The training noise stream (`None` if ε came from a [`crate::NoiseFn`]).
    pub noise: Option<NoiseState>,
}

/// The JSON half of the file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateMeta {
    format_version: u32,
    config: IvonConfig,
    groups: Vec<GroupHyper>,
    params: Vec<ParamLayout>,
    step: u64,
    noise: Option<NoiseState>,
}

impl Posterior {
    /// σ per element: 1/√(ess·(h+δ)) with the group's ess and δ.
    pub fn std(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.hess.len());
        let mut offset = 0;
        let mut group_of = Vec::with_capacity(self.hess.len());
        for p in &self.params {
            let n: usize = p.shape.iter().product();
            group_of.push((offset, n, p.group));
            offset += n;
        }
        for (offset, n, g) in group_of {
            let g = &self.groups[g];
            let (ess, wd) = (g.ess as f32, g.weight_decay as f32);
            out.extend(self.hess[offset..offset + n].iter().map(|&h| 1.0 / (ess * (h + wd)).sqrt()));
        }
        out
    }

    /// Writes the state to `path` (via a temporary file and a rename, so a crash never leaves
    /// a half-written file).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let meta = StateMeta {
            format_version: FORMAT_VERSION,
            config: self.config,
            groups: self.groups.clone(),
            params: self.params.clone(),
            step: self.step,
            noise: self.noise,
        };
        let json = serde_json::to_string(&meta).map_err(|source| Error::Json { path: path.into(), cause: source })?;
        save_flat(path, &[("mean", &self.mean), ("momentum", &self.momentum), ("hess", &self.hess)], "ivon_state", json)
    }

    /// Reads a state written by [`Posterior::save`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let (json, mut tensors) = load_flat(path, "ivon_state")?;
        let mismatch = |reason: String| Error::StateMismatch { path: path.into(), reason };
        let meta: StateMeta =
            serde_json::from_str(&json).map_err(|source| Error::Json { path: path.into(), cause: source })?;
        if meta.format_version != FORMAT_VERSION {
            return Err(mismatch(format!(
                "format_version {} is not supported (expected {FORMAT_VERSION})",
                meta.format_version
            )));
        }
        if meta.params.iter().any(|p| p.group >= meta.groups.len()) {
            return Err(mismatch("a param refers to a group that does not exist".into()));
        }
        let numel: usize = meta.params.iter().map(|p| p.shape.iter().product::<usize>()).sum();
        let mut take = |name: &str| match tensors.remove(name) {
            Some(v) if v.len() == numel => Ok(v),
            Some(v) => Err(mismatch(format!("tensor `{name}` has {} elements, the layout {numel}", v.len()))),
            None => Err(mismatch(format!("tensor `{name}` is missing"))),
        };
        Ok(Self {
            mean: take("mean")?,
            momentum: take("momentum")?,
            hess: take("hess")?,
            config: meta.config,
            groups: meta.groups,
            params: meta.params,
            step: meta.step,
            noise: meta.noise,
        })
    }
}

impl Ivon {
    /// A snapshot of the posterior and optimizer state (copied from the device when the state
    /// lives on one).
    pub fn posterior(&self) -> Result<Posterior> {
        Ok(Posterior {
            config: self.config,
            groups: self.group_hypers(),
            params: self.layout(),
            mean: self.mean_flat()?.into_owned(),
            momentum: self.momentum_flat()?.into_owned(),
            hess: self.hess_flat()?.into_owned(),
            step: self.step,
            noise: self.noise_state(),
        })
    }

    /// Where [`Ivon::posterior`] takes the var layout (the flat vectors are set by the caller).
    fn layout(&self) -> Vec<ParamLayout> {
        let mut params = Vec::with_capacity(self.flat.slots.len());
        let mut slot = 0;
        for (gi, g) in self.groups.iter().enumerate() {
            for _ in 0..g.vars {
                let s = &self.flat.slots[slot];
                params.push(ParamLayout { group: gi, shape: s.shape.dims().to_vec(), frozen: self.frozen[slot] });
                slot += 1;
            }
        }
        params
    }

    /// Continues from `state`: takes its μ (written into the vars), m, h, step count,
    /// hyper-parameters, frozen flags and noise state. The vars and groups must have the same
    /// shapes as when it was saved; `path` only names the source in errors.
    pub fn load_posterior(&mut self, state: &Posterior, path: impl AsRef<Path>) -> Result<()> {
        let mismatch = |reason: String| Error::StateMismatch { path: path.as_ref().into(), reason };
        let mine = self.layout();
        if state.params.len() != mine.len() || state.groups.len() != self.groups.len() {
            return Err(mismatch(format!(
                "state has {} vars in {} groups, the optimizer {} in {}",
                state.params.len(),
                state.groups.len(),
                mine.len(),
                self.groups.len()
            )));
        }
        for (i, (a, b)) in state.params.iter().zip(&mine).enumerate() {
            if a.shape != b.shape || a.group != b.group {
                return Err(mismatch(format!(
                    "var #{i}: state has shape {:?} in group {}, the optimizer {:?} in group {}",
                    a.shape, a.group, b.shape, b.group
                )));
            }
        }
        state.config.validate()?;
        for (g, h) in self.groups.iter_mut().zip(&state.groups) {
            g.hyper = *h;
            g.lr_ratio = if state.config.lr > 0.0 { h.lr / state.config.lr } else { 1.0 };
        }
        self.config = state.config;
        match self.device.as_mut() {
            Some(d) => d.upload(&state.mean, &state.momentum, &state.hess)?,
            None => {
                self.mean.copy_from_slice(&state.mean);
                self.momentum.copy_from_slice(&state.momentum);
                self.hess.copy_from_slice(&state.hess);
            }
        }
        self.step = state.step;
        self.count = 0;
        for (f, p) in self.frozen.iter_mut().zip(&state.params) {
            *f = p.frozen;
        }
        if let Some(noise) = state.noise {
            self.set_noise_state(noise);
        }
        self.restore_mean()
    }

    /// Saves [`Ivon::posterior`] to `path`. Errors if samples are pending (call `step()` first).
    pub fn save_state(&self, path: impl AsRef<Path>) -> Result<()> {
        if self.count > 0 {
            return Err(Error::PendingSamples { count: self.count });
        }
        self.posterior()?.save(path)
    }

    /// Loads a state saved by [`Ivon::save_state`] (see [`Ivon::load_posterior`]).
    pub fn load_state(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let state = Posterior::load(path.as_ref())?;
        self.load_posterior(&state, path)
    }

    /// One flat state vector: borrowed on the host, copied from the device.
    fn flat_state<'a>(&'a self, host: &'a [f32], which: Buffer) -> Result<Cow<'a, [f32]>> {
        self.flat_range(host, which, 0..self.flat.numel)
    }

    /// Elements `r` of one flat state vector: borrowed on the host, copied from the device.
    fn flat_range<'a>(&'a self, host: &'a [f32], which: Buffer, r: Range<usize>) -> Result<Cow<'a, [f32]>> {
        match &self.device {
            Some(d) => Ok(Cow::Owned(d.download(which, r)?)),
            None => Ok(Cow::Borrowed(&host[r])),
        }
    }

    /// The flat μ (f32 master copy).
    pub fn mean_flat(&self) -> Result<Cow<'_, [f32]>> {
        self.flat_state(&self.mean, Buffer::Mean)
    }

    /// The flat h.
    pub fn hess_flat(&self) -> Result<Cow<'_, [f32]>> {
        self.flat_state(&self.hess, Buffer::Hess)
    }

    /// The flat momentum m.
    pub fn momentum_flat(&self) -> Result<Cow<'_, [f32]>> {
        self.flat_state(&self.momentum, Buffer::Momentum)
    }

    /// `f(μ_j, h_j)` over `var`'s elements, as a tensor shaped like the var on its device.
    fn var_tensor(&self, var: &Var, f: impl Fn(f32, f32) -> f32) -> Result<Tensor> {
        let i = self.flat.index_of(var)?;
        let s = &self.flat.slots[i];
        let r = s.offset..s.offset + s.len;
        let mean = self.flat_range(&self.mean, Buffer::Mean, r.clone())?;
        let hess = self.flat_range(&self.hess, Buffer::Hess, r)?;
        let v: Vec<f32> = mean.iter().zip(hess.iter()).map(|(&m, &h)| f(m, h)).collect();
        Ok(Tensor::from_vec(v, s.shape.clone(), &self.flat.device)?)
    }

    fn group_of(&self, flat_index: usize) -> &GroupHyper {
        // invariant: groups cover 0..numel in order, so some group contains every flat index.
        &self.groups.iter().find(|g| flat_index < g.end).expect("invariant: index inside a group").hyper
    }

    /// μ of `var`, f32, shaped like the var.
    pub fn mean(&self, var: &Var) -> Result<Tensor> {
        self.var_tensor(var, |m, _| m)
    }

    /// h of `var`, f32, shaped like the var.
    pub fn hess(&self, var: &Var) -> Result<Tensor> {
        self.var_tensor(var, |_, h| h)
    }

    /// σ = 1/√(ess·(h+δ)) of `var`, f32, shaped like the var.
    pub fn std(&self, var: &Var) -> Result<Tensor> {
        let i = self.flat.index_of(var)?;
        let g = *self.group_of(self.flat.slots[i].offset);
        let (ess, wd) = (g.ess as f32, g.weight_decay as f32);
        self.var_tensor(var, |_, h| 1.0 / (ess * (h + wd)).sqrt())
    }

    /// Runs `f` with the vars set to a posterior sample θ ~ N(μ, σ²) drawn from `noise` (a stream
    /// separate from training, so evaluation does not change the training run), then restores
    /// μ, also on error or panic. For the posterior predictive, average the softmax
    /// probabilities over several calls (`specs/ivon.md`).
    pub fn with_posterior_sample<T, F>(&mut self, noise: &mut NoiseState, f: F) -> Result<T>
    where
        F: FnOnce() -> candle_core::Result<T>,
    {
        let sample = self.sample_posterior(noise)?;
        let out = f()?;
        sample.discard()?;
        Ok(out)
    }
}
