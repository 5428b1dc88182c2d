//! The IVON optimizer (Shen et al., "Variational Learning is Effective for Large Deep Networks",
//! ICML 2024, arXiv 2402.17641), step for step as PyPI `ivon-opt` 0.1.3 computes it
//! (`specs/ivon.md`, `reference/ivon.md` §1).
//!
//! The optimizer ([`Ivon`]) and its sampling guard ([`Sample`]); its configuration is in
//! [`crate::config`], the update equations as pure functions in [`crate::update`].
//!
//! Numerics: μ, m, h, ε and every sample average are f32 (a flat vector per optimizer, groups
//! concatenated in order, vars in order, as ivon-opt's flat buffers), on the host, or on the
//! vars' CUDA device (`crate::device`: then the host vectors below stay empty). Scalar coefficients such as
//! 1 − β2 are computed in f64 and rounded to f32 once, as torch does with Python floats, so that
//! an f32 run of ivon-opt and this crate agree to the last bits for equal gradients.
use std::borrow::Cow;

use candle_core::backprop::GradStore;
use candle_core::Var;
use rayon::prelude::*;

use crate::config::{GroupHyper, HessApprox, IvonConfig, ParamGroup};
use crate::device::{Buffer, IvonDevice};
use crate::error::{invalid, Error, Result};
use crate::flat::FlatVars;
use crate::noise::{Noise, NoiseFn, NoiseState};
use crate::update::{new_hess, new_mean, new_momentum, nll_hess, sample_noise, Coefficients};

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
    /// The state on the vars' CUDA device; `None`: the host vectors above hold it.
    pub(crate) device: Option<Box<IvonDevice>>,
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
        let mut mean = flat.read_values()?;
        let n = flat.numel;
        let mut hess = vec![0f32; n];
        for g in &resolved {
            hess[g.start..g.end].fill(g.hyper.hess_init as f32);
        }
        let device = IvonDevice::new(&flat, &mean, &hess)?.map(Box::new);
        // On a device the state lives there; the host vectors stay empty.
        let n = if device.is_some() {
            (mean, hess) = (Vec::new(), Vec::new());
            0
        } else {
            n
        };
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
            device,
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
        if self.device.is_some() {
            let sample = Sample { ivon: self, micro_batches: 0, done: false };
            // If writing θ fails half way, the guard's drop puts μ back.
            let ivon = &mut *sample.ivon;
            if let Some(d) = ivon.device.as_mut() {
                d.sample(&ivon.flat, &ivon.groups, &mut ivon.noise_source)?;
            }
            return Ok(sample);
        }
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
                match self.device.as_mut() {
                    Some(d) => d.sync(f)?,
                    None => {
                        f(&mut self.avg_grad)?;
                        f(&mut self.avg_curv)?;
                    }
                }
            }
        }
        self.update()
    }

    /// [`Ivon::step`] with `sync`, an all-reduce-mean over the workers, applied to ḡ and then to
    /// the curvature statistic before the update (ivon-opt's `sync=True`), whatever
    /// `config.sync` and the stored hook say: for a communicator that lives only as long as a
    /// training loop (data-parallel training).
    pub fn step_synced(&mut self, sync: &mut dyn FnMut(&mut [f32]) -> Result<()>) -> Result<()> {
        if self.count == 0 {
            return Err(Error::NoSamples);
        }
        match self.device.as_mut() {
            Some(d) => d.sync(sync)?,
            None => {
                sync(&mut self.avg_grad)?;
                sync(&mut self.avg_curv)?;
            }
        }
        self.update()
    }

    /// Steps 5–9 of the update from the (synchronised) sample averages.
    fn update(&mut self) -> Result<()> {
        self.step += 1;
        if let Some(d) = self.device.as_mut() {
            self.count = 0;
            return d.update(&self.flat, &self.groups, &self.config, self.step);
        }
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
    pub(crate) fn restore_mean(&mut self) -> Result<()> {
        if let Some(d) = self.device.as_mut() {
            return d.restore(&self.flat);
        }
        self.flat.write_values(&self.mean)
    }

    /// Sets the vars to a posterior sample θ = μ + σ⊙ε with ε from `noise` (not the training
    /// stream) and returns the guard that restores μ; nothing is recorded unless you call
    /// [`Sample::accumulate`] and [`Sample::finish`]. For prediction see
    /// [`Ivon::with_posterior_sample`].
    pub fn sample_posterior(&mut self, noise: &mut NoiseState) -> Result<Sample<'_>> {
        if self.device.is_some() {
            let sample = Sample { ivon: self, micro_batches: 0, done: false };
            let ivon = &mut *sample.ivon;
            if let Some(d) = ivon.device.as_mut() {
                d.sample_posterior(&ivon.flat, &ivon.groups, noise)?;
            }
            return Ok(sample);
        }
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
    /// This sample's noise σ⊙ε, flat (θ − μ); a host copy on a device.
    pub fn noise(&self) -> Result<Cow<'_, [f32]>> {
        match &self.ivon.device {
            Some(d) => Ok(Cow::Owned(d.download(Buffer::Noise, 0..self.ivon.flat.numel)?)),
            None => Ok(Cow::Borrowed(&self.ivon.noise)),
        }
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
        if let Some(d) = ivon.device.as_mut() {
            return d.accumulate(&ivon.flat, grads, &ivon.frozen, k);
        }
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
        if let Some(d) = ivon.device.as_mut() {
            return d.finish(&ivon.flat, ivon.count, ivon.config.hess_approx);
        }
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
    use crate::config::IvonLoraTask;

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
