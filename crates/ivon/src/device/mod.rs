//! The device path: when the vars live on a CUDA device (feature `cuda`) and are f32, bf16 or f16,
//! [`crate::Ivon`] and [`crate::AdamW`] keep their state as flat f32 buffers on that device and
//! step with the fused kernels of `kernels/ivon.cu`, so a training step moves nothing between
//! host and device: the gradients are gathered by device copies, ε is drawn in the kernel, and
//! the vars are written from the kernels' outputs. The host sees the state only on save, on
//! [`crate::Ivon::posterior`] and the per-var accessors (`mean`, `hess`, `std`, `*_flat`), on
//! `load`, with an injected [`crate::NoiseFn`] (ε uploaded per draw) and with a sync hook
//! (ḡ and the curvature statistic go through the host hook). [`crate::Sgd`] stays on the host.
//!
//! Noise: a seeded draw on the device is [`crate::noise::philox_normal`]`(seed, draw, index)`
//! (Philox4x32-10 + Box–Muller), not the CPU's ChaCha8 stream: same [`crate::NoiseState`]
//! (seed, draws), so a device run resumes exactly on a device, but a CPU run and a device run
//! with one seed draw different ε. Posterior samples for prediction
//! ([`crate::Ivon::sample_posterior`]) draw ε on the host from the given `NoiseState` and
//! upload it, so they are the same on both.
//!
//! Numerics: the kernels evaluate the equations of [`crate::update`] in the same order with
//! round-to-nearest intrinsics (no FMA contraction), so for equal ε and gradients the device
//! state matches the CPU's to the bit or within an ulp (the GPU tests,
//! `crates/bayeslora/tests/ivon_cuda.rs`, allow 1e-6 relative).
//!
//! **On by default** since its GPU tests passed on an H100 (2026-12-06: 5 of 5,
//! `.device/ivon_cuda --test-threads 1`, device vs CPU update, noise, posterior samples,
//! save/load/continue). `IVON_DEVICE=0` in the environment turns it off ([`enabled`]): CUDA vars
//! then take the host path (state on the host, one copy each way per step).
//!
//! Without the feature the types below are uninhabited; with it, `new` returns `None` for vars
//! that are not on a CUDA device (or not f32/bf16/f16). Either way those optimizers run the host
//! path.
/// Whether the device path may be used: yes unless `IVON_DEVICE=0` is in the environment (read
/// once).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("IVON_DEVICE").map_or(true, |v| v != "0"))
}

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
pub(crate) use cuda::{AdamWDevice, IvonDevice};

#[cfg(not(feature = "cuda"))]
mod host_only {
    //! Stand-ins for builds without CUDA: never constructed, so every method is unreachable.
    use candle_core::backprop::GradStore;

    use crate::config::{HessApprox, IvonConfig};
    use crate::error::Result;
    use crate::flat::FlatVars;
    use crate::ivon::Group;
    use crate::noise::{Noise, NoiseState};

    /// IVON's device state (uninhabited without the `cuda` feature).
    pub(crate) enum IvonDevice {}

    impl IvonDevice {
        pub fn new(_flat: &FlatVars, _mean: &[f32], _hess: &[f32]) -> Result<Option<Self>> {
            Ok(None)
        }
        pub fn sample(&mut self, _flat: &FlatVars, _groups: &[Group], _noise: &mut Noise) -> Result<()> {
            match *self {}
        }
        pub fn sample_posterior(&mut self, _flat: &FlatVars, _groups: &[Group], _noise: &mut NoiseState) -> Result<()> {
            match *self {}
        }
        pub fn accumulate(&mut self, _flat: &FlatVars, _grads: &GradStore, _frozen: &[bool], _k: usize) -> Result<()> {
            match *self {}
        }
        pub fn finish(&mut self, _flat: &FlatVars, _count: usize, _approx: HessApprox) -> Result<()> {
            match *self {}
        }
        pub fn restore(&mut self, _flat: &FlatVars) -> Result<()> {
            match *self {}
        }
        pub fn sync(&mut self, _f: &mut dyn FnMut(&mut [f32]) -> Result<()>) -> Result<()> {
            match *self {}
        }
        pub fn update(&mut self, _flat: &FlatVars, _groups: &[Group], _config: &IvonConfig, _t: u64) -> Result<()> {
            match *self {}
        }
        pub fn download(&self, _which: crate::device::Buffer, _r: std::ops::Range<usize>) -> Result<Vec<f32>> {
            match *self {}
        }
        pub fn upload(&mut self, _mean: &[f32], _momentum: &[f32], _hess: &[f32]) -> Result<()> {
            match *self {}
        }
    }

    /// AdamW's device state (uninhabited without the `cuda` feature).
    pub(crate) enum AdamWDevice {}

    impl AdamWDevice {
        pub fn new(_flat: &FlatVars, _params: &[f32]) -> Result<Option<Self>> {
            Ok(None)
        }
        pub fn step(&mut self, _flat: &FlatVars, _grads: &GradStore, _c: &crate::optimizer::AdamWStep) -> Result<()> {
            match *self {}
        }
        pub fn download(&self) -> Result<[Vec<f32>; 3]> {
            match *self {}
        }
        pub fn upload(&mut self, _flat: &FlatVars, _params: &[f32], _m: &[f32], _v: &[f32]) -> Result<()> {
            match *self {}
        }
    }
}
#[cfg(not(feature = "cuda"))]
pub(crate) use host_only::{AdamWDevice, IvonDevice};

/// A flat buffer of [`IvonDevice`] that the host can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Buffer {
    /// μ.
    Mean,
    /// m.
    Momentum,
    /// h.
    Hess,
    /// The current sample's noise σ⊙ε.
    Noise,
}
