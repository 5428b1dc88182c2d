//! The device state of [`crate::Ivon`] and [`crate::AdamW`] and the launches of
//! `kernels/ivon.cu` (PTX built by `build.rs`) on candle's CUDA device and stream.
//!
//! Buffers are cudarc `CudaSlice<f32>`s allocated on the vars' device. Kernels that change the
//! weights write them straight into the vars' storages through a [`VarTable`] of device pointers
//! (one launch, instead of a flat buffer plus one device copy per var: with hundreds of LoRA vars
//! those copies would cost more than the update). A var's storage stays where it is for the var's
//! life (`Var::set` copies into it), and the table is checked before every launch that writes.
use candle_core::backprop::GradStore;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg, SyncOnDrop,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorageSlice, WrapErr};
use candle_core::{CudaStorage, DType, Device, Storage, Tensor};
use std::ops::Range;
use std::sync::Arc;

use super::Buffer;
use crate::config::{HessApprox, IvonConfig};
use crate::error::{Error, Result};
use crate::flat::FlatVars;
use crate::ivon::Group;
use crate::noise::{Noise, NoiseState};
use crate::optimizer::AdamWStep;
use crate::update::Coefficients;

mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

/// The module name under which candle caches our PTX (distinct from bayeslora's modules).
const MODULE: &str = "ivon_optimizer";

/// Mirrors `SampleParams` in `kernels/ivon.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct SampleParams {
    start: u64,
    n: u64,
    seed: u64,
    draw: u64,
    ess: f32,
    weight_decay: f32,
    injected: i32,
}
// SAFETY: plain old data with the C layout of the kernel's struct.
unsafe impl DeviceRepr for SampleParams {}

/// Mirrors `UpdateParams` in `kernels/ivon.cu` ([`Coefficients`] plus the group's range).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct UpdateParams {
    start: u64,
    n: u64,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    half_sq_one_minus_beta2: f32,
    ess: f32,
    weight_decay: f32,
    lr: f32,
    debias: f32,
    clip_radius: f32,
    approx: i32,
}
// SAFETY: as above.
unsafe impl DeviceRepr for UpdateParams {}

/// Mirrors `AdamWParams` in `kernels/ivon.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct AdamWParams {
    start: u64,
    n: u64,
    decay: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    step_size: f32,
    bc2_sqrt: f32,
    eps: f32,
}
// SAFETY: as above.
unsafe impl DeviceRepr for AdamWParams {}

/// Mirrors `VarTable` in `kernels/ivon.cu`: device addresses of the pointer and end tables.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct VarTableArg {
    ptrs: u64,
    ends: u64,
    count: u32,
}
// SAFETY: as above.
unsafe impl DeviceRepr for VarTableArg {}

fn device_error(reason: &str) -> Error {
    Error::Device { reason: reason.into() }
}

fn approx_code(approx: HessApprox) -> i32 {
    match approx {
        HessApprox::Price => 0,
        HessApprox::Gradsq => 1,
    }
}

/// Grid-stride launch over `n` elements (the kernels loop, so the grid may be capped).
fn grid(n: usize) -> LaunchConfig {
    LaunchConfig::for_num_elems(n.clamp(1, 1 << 24) as u32)
}

/// The CUDA device of `flat` and its entry-point suffix, when the device path applies.
fn device_of(flat: &FlatVars) -> Option<(CudaDevice, &'static str)> {
    let Device::Cuda(dev) = &flat.device else {
        return None;
    };
    if !super::enabled() {
        return None;
    }
    let suffix = match flat.dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => return None,
    };
    Some((dev.clone(), suffix))
}

/// The device, its stream, the var dtype's entry-point suffix and the vars' pointer table.
struct Kernels {
    dev: CudaDevice,
    stream: Arc<CudaStream>,
    numel: usize,
    suffix: &'static str,
    /// Each var's storage address (at its first element), as last uploaded.
    ptrs_host: Vec<u64>,
    ptrs: CudaSlice<u64>,
    /// Each var's end in the flat layout.
    ends: CudaSlice<u64>,
}

impl Kernels {
    fn new(flat: &FlatVars) -> Result<Option<Self>> {
        let Some((dev, suffix)) = device_of(flat) else {
            return Ok(None);
        };
        let stream = dev.cuda_stream();
        let ends: Vec<u64> = flat.slots.iter().map(|s| (s.offset + s.len) as u64).collect();
        let ptrs_host = var_ptrs(flat, &stream)?;
        Ok(Some(Self {
            ptrs: stream.clone_htod(&ptrs_host).w()?,
            ends: stream.clone_htod(&ends).w()?,
            ptrs_host,
            dev,
            stream,
            numel: flat.numel,
            suffix,
        }))
    }

    /// The table for a launch that writes the vars, re-uploaded if a var's storage moved.
    fn vars(&mut self, flat: &FlatVars) -> Result<VarTableArg> {
        let now = var_ptrs(flat, &self.stream)?;
        if now != self.ptrs_host {
            self.stream.memcpy_htod(&now[..], &mut self.ptrs).w()?;
            self.ptrs_host = now;
        }
        let (ptrs, _) = self.ptrs.device_ptr(&self.stream);
        let (ends, _) = self.ends.device_ptr(&self.stream);
        Ok(VarTableArg { ptrs, ends, count: self.ptrs_host.len() as u32 })
    }

    /// Entry point `name` (typed ones get the dtype suffix).
    fn func(&self, name: &str, typed: bool) -> Result<CudaFunction> {
        let name = if typed { format!("{name}_{}", self.suffix) } else { name.to_string() };
        Ok(self.dev.get_or_load_custom_func(&name, MODULE, ptx::IVON)?.into_cuda_function())
    }

    fn upload(&self, host: &[f32]) -> Result<CudaSlice<f32>> {
        Ok(self.stream.clone_htod(host).w()?)
    }

    fn download(&self, buf: &CudaSlice<f32>) -> Result<Vec<f32>> {
        Ok(self.stream.clone_dtoh(buf).w()?)
    }
}

/// The device address of each var's first element (its storage must be contiguous).
fn var_ptrs(flat: &FlatVars, stream: &CudaStream) -> Result<Vec<u64>> {
    flat.slots
        .iter()
        .map(|s| {
            let (storage, layout) = s.var.as_tensor().storage_and_layout();
            let Storage::Cuda(cs) = &*storage else {
                return Err(device_error("a var left the CUDA device of the optimizer"));
            };
            if !layout.is_contiguous() || s.var.dtype() != flat.dtype {
                return Err(device_error("the vars must stay contiguous and of one dtype"));
            }
            let (ptr, _guard) = ptr_of(cs, layout.start_offset(), stream)?;
            Ok(ptr)
        })
        .collect()
}

/// The raw device pointer of `storage` (f32, bf16 or f16) at element `offset`, and the guard
/// that records the access once dropped (after the launch).
fn ptr_of<'a>(storage: &'a CudaStorage, offset: usize, stream: &'a CudaStream) -> Result<(u64, SyncOnDrop<'a>)> {
    let (base, guard, size) = match &storage.slice {
        CudaStorageSlice::F32(s) => {
            let (p, g) = s.device_ptr(stream);
            (p, g, 4)
        }
        CudaStorageSlice::BF16(s) => {
            let (p, g) = s.device_ptr(stream);
            (p, g, 2)
        }
        CudaStorageSlice::F16(s) => {
            let (p, g) = s.device_ptr(stream);
            (p, g, 2)
        }
        _ => return Err(device_error("device buffers are f32, bf16 or f16")),
    };
    Ok((base + (offset * size) as u64, guard))
}

/// The gradients of the slots in `grads`, gathered by device copies into one flat tensor of the
/// vars' dtype (zeros for a slot without a gradient or not `wanted`), and which slots had one.
fn gather(flat: &FlatVars, grads: &GradStore, wanted: impl Fn(usize) -> bool) -> Result<(Tensor, Vec<bool>)> {
    let mut parts = Vec::with_capacity(flat.slots.len());
    let mut present = Vec::with_capacity(flat.slots.len());
    for (index, s) in flat.slots.iter().enumerate() {
        let g = if wanted(index) { grads.get(s.var.as_tensor()) } else { None };
        present.push(g.is_some());
        parts.push(match g {
            Some(g) if g.elem_count() != s.len => {
                return Err(Error::GradientShape { index, expected: s.len, got: g.elem_count() })
            }
            Some(g) if g.dtype() == flat.dtype => g.flatten_all()?,
            Some(g) => g.flatten_all()?.to_dtype(flat.dtype)?,
            None => Tensor::zeros(s.len, flat.dtype, &flat.device)?,
        });
    }
    let all = if parts.len() == 1 { parts.remove(0).contiguous()? } else { Tensor::cat(&parts, 0)? };
    Ok((all, present))
}

/// Runs `f` with the device pointer of the contiguous tensor `t` (kept alive for the launch).
fn with_tensor_ptr<R>(t: &Tensor, stream: &CudaStream, f: impl FnOnce(u64) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return Err(device_error("the gradients are not on the CUDA device of the vars"));
    };
    let Some((start, _)) = layout.contiguous_offsets() else {
        return Err(device_error("gathered gradients must be contiguous"));
    };
    let (ptr, _guard) = ptr_of(cs, start, stream)?;
    f(ptr)
}

/// IVON's state on the device: flat f32 μ, m, h, the sample averages, the current sample's
/// noise σ⊙ε and its micro-batch-averaged gradient, in the layout of the host path.
pub(crate) struct IvonDevice {
    k: Kernels,
    mean: CudaSlice<f32>,
    momentum: CudaSlice<f32>,
    hess: CudaSlice<f32>,
    avg_grad: CudaSlice<f32>,
    avg_curv: CudaSlice<f32>,
    noise: CudaSlice<f32>,
    grad: CudaSlice<f32>,
    f_sample: CudaFunction,
    f_accumulate: CudaFunction,
    f_finish: CudaFunction,
    f_update: CudaFunction,
    f_cast: CudaFunction,
}

impl IvonDevice {
    /// The device state initialised from the host's μ and h, or `None` when the vars are not on
    /// a CUDA device or not f32/bf16/f16 (then the host path runs).
    pub fn new(flat: &FlatVars, mean: &[f32], hess: &[f32]) -> Result<Option<Self>> {
        let Some(k) = Kernels::new(flat)? else {
            return Ok(None);
        };
        let n = flat.numel;
        let zeros = || -> Result<CudaSlice<f32>> { Ok(k.dev.alloc_zeros::<f32>(n)?) };
        Ok(Some(Self {
            mean: k.upload(mean)?,
            momentum: zeros()?,
            hess: k.upload(hess)?,
            avg_grad: zeros()?,
            avg_curv: zeros()?,
            noise: zeros()?,
            grad: zeros()?,
            f_sample: k.func("ivon_sample", true)?,
            f_accumulate: k.func("ivon_accumulate", true)?,
            f_finish: k.func("ivon_finish", true)?,
            f_update: k.func("ivon_update", true)?,
            f_cast: k.func("ivon_cast", true)?,
            k,
        }))
    }

    /// Steps 1–2: draws ε per group (seeded: Philox in the kernel; injected: uploaded), keeps
    /// σ⊙ε and writes θ = μ + σ⊙ε into the vars.
    pub fn sample(&mut self, flat: &FlatVars, groups: &[Group], noise: &mut Noise) -> Result<()> {
        let vars = self.k.vars(flat)?;
        for (gi, g) in groups.iter().enumerate() {
            match noise {
                Noise::Seeded(state) => {
                    let draw = state.next_draw();
                    self.launch_sample(g, vars, state.seed, draw, None)?;
                }
                Noise::Injected(f) => {
                    let mut eps = vec![0f32; g.end - g.start];
                    f(gi, &mut eps);
                    let eps = self.k.upload(&eps)?;
                    self.launch_sample(g, vars, 0, 0, Some(&eps))?;
                }
            }
        }
        Ok(())
    }

    /// A posterior sample for prediction: ε drawn on the host from `noise` (the same values as
    /// the host path) and uploaded; θ written into the vars.
    pub fn sample_posterior(&mut self, flat: &FlatVars, groups: &[Group], noise: &mut NoiseState) -> Result<()> {
        let vars = self.k.vars(flat)?;
        for g in groups {
            let mut eps = vec![0f32; g.end - g.start];
            noise.fill(&mut eps);
            let eps = self.k.upload(&eps)?;
            self.launch_sample(g, vars, 0, 0, Some(&eps))?;
        }
        Ok(())
    }

    fn launch_sample(
        &mut self,
        g: &Group,
        vars: VarTableArg,
        seed: u64,
        draw: u64,
        eps: Option<&CudaSlice<f32>>,
    ) -> Result<()> {
        let n = g.end - g.start;
        if n == 0 {
            return Ok(());
        }
        let p = SampleParams {
            start: g.start as u64,
            n: n as u64,
            seed,
            draw,
            ess: g.hyper.ess as f32,
            weight_decay: g.hyper.weight_decay as f32,
            injected: eps.is_some() as i32,
        };
        let mut b = self.k.stream.launch_builder(&self.f_sample);
        b.arg(&p).arg(&self.mean).arg(&self.hess);
        // Not injected: the kernel never reads eps_in, any valid buffer does.
        b.arg(eps.unwrap_or(&self.grad));
        b.arg(&mut self.noise).arg(&vars);
        // SAFETY: the arguments match `ivon_sample_<dtype>`; every buffer holds numel elements
        // (eps_in n), the table covers numel, and the kernel touches start..start+n only.
        unsafe { b.launch(grid(n)) }.w()?;
        Ok(())
    }

    /// One micro-batch of the current sample (`k` = 1, 2, …): its gradients (zero where
    /// `frozen` or missing) averaged into the sample's gradient.
    pub fn accumulate(&mut self, flat: &FlatVars, grads: &GradStore, frozen: &[bool], k: usize) -> Result<()> {
        let (all, _) = gather(flat, grads, |i| !frozen[i])?;
        let n = self.k.numel as u64;
        let kf = k as f32;
        let stream = self.k.stream.clone();
        with_tensor_ptr(&all, &stream, |g| {
            let mut b = stream.launch_builder(&self.f_accumulate);
            b.arg(&mut self.grad).arg(&g).arg(&n).arg(&kf);
            // SAFETY: matches `ivon_accumulate_<dtype>`; `g` holds numel elements of the vars' dtype.
            unsafe { b.launch(grid(self.k.numel)) }.w()?;
            Ok(())
        })
    }

    /// Step 3 for sample number `count`: the Welford means of g and the curvature statistic,
    /// then μ back into the vars (same kernel).
    pub fn finish(&mut self, flat: &FlatVars, count: usize, approx: HessApprox) -> Result<()> {
        let vars = self.k.vars(flat)?;
        let (cf, a, n) = (count as f32, approx_code(approx), self.k.numel as u64);
        let mut b = self.k.stream.launch_builder(&self.f_finish);
        b.arg(&cf).arg(&a).arg(&mut self.avg_grad).arg(&mut self.avg_curv);
        b.arg(&self.grad).arg(&self.noise).arg(&self.mean).arg(&vars).arg(&n);
        // SAFETY: matches `ivon_finish_<dtype>`; every buffer and the table cover numel elements.
        unsafe { b.launch(grid(self.k.numel)) }.w()?;
        Ok(())
    }

    /// Writes μ into the vars.
    pub fn restore(&mut self, flat: &FlatVars) -> Result<()> {
        let vars = self.k.vars(flat)?;
        let n = self.k.numel as u64;
        let mut b = self.k.stream.launch_builder(&self.f_cast);
        b.arg(&self.mean).arg(&vars).arg(&n);
        // SAFETY: matches `ivon_cast_<dtype>`; μ and the table cover numel elements.
        unsafe { b.launch(grid(self.k.numel)) }.w()?;
        Ok(())
    }

    /// Averages ḡ and then the curvature statistic across workers through the host hook `f`
    /// (one download and upload each: the hook takes host slices).
    pub fn sync(&mut self, f: &mut dyn FnMut(&mut [f32]) -> Result<()>) -> Result<()> {
        for buf in [&mut self.avg_grad, &mut self.avg_curv] {
            let mut host = self.k.stream.clone_dtoh(&*buf).w()?;
            f(&mut host)?;
            self.k.stream.memcpy_htod(&host[..], buf).w()?;
        }
        Ok(())
    }

    /// Steps 4–8 per group at step `t` (one kernel per group), writing the new μ into the vars.
    pub fn update(&mut self, flat: &FlatVars, groups: &[Group], config: &IvonConfig, t: u64) -> Result<()> {
        let vars = self.k.vars(flat)?;
        for g in groups {
            let n = g.end - g.start;
            if n == 0 {
                continue;
            }
            let c = Coefficients::new(&g.hyper, config, t);
            let p = UpdateParams {
                start: g.start as u64,
                n: n as u64,
                beta1: c.beta1,
                one_minus_beta1: c.one_minus_beta1,
                beta2: c.beta2,
                one_minus_beta2: c.one_minus_beta2,
                half_sq_one_minus_beta2: c.half_sq_one_minus_beta2,
                ess: c.ess,
                weight_decay: c.weight_decay,
                lr: c.lr,
                debias: c.debias,
                clip_radius: c.clip_radius,
                approx: approx_code(config.hess_approx),
            };
            let mut b = self.k.stream.launch_builder(&self.f_update);
            b.arg(&p).arg(&mut self.mean).arg(&mut self.momentum).arg(&mut self.hess);
            b.arg(&self.avg_grad).arg(&self.avg_curv).arg(&vars);
            // SAFETY: matches `ivon_update_<dtype>`; the group's range lies inside numel.
            unsafe { b.launch(grid(n)) }.w()?;
        }
        Ok(())
    }

    /// A host copy of elements `r` of one buffer.
    pub fn download(&self, which: Buffer, r: Range<usize>) -> Result<Vec<f32>> {
        let buf = match which {
            Buffer::Mean => &self.mean,
            Buffer::Momentum => &self.momentum,
            Buffer::Hess => &self.hess,
            Buffer::Noise => &self.noise,
        };
        Ok(self.k.stream.clone_dtoh(&buf.slice(r)).w()?)
    }

    /// Replaces μ, m and h (a loaded state); the caller then restores μ into the vars.
    pub fn upload(&mut self, mean: &[f32], momentum: &[f32], hess: &[f32]) -> Result<()> {
        self.k.stream.memcpy_htod(mean, &mut self.mean).w()?;
        self.k.stream.memcpy_htod(momentum, &mut self.momentum).w()?;
        self.k.stream.memcpy_htod(hess, &mut self.hess).w()?;
        Ok(())
    }
}

/// AdamW's state on the device: flat f32 master weights, m and v.
pub(crate) struct AdamWDevice {
    k: Kernels,
    params: CudaSlice<f32>,
    m: CudaSlice<f32>,
    v: CudaSlice<f32>,
    f_update: CudaFunction,
}

impl AdamWDevice {
    /// The device state from the host's weights, or `None` when the host path applies.
    pub fn new(flat: &FlatVars, params: &[f32]) -> Result<Option<Self>> {
        let Some(k) = Kernels::new(flat)? else {
            return Ok(None);
        };
        let n = flat.numel;
        Ok(Some(Self {
            params: k.upload(params)?,
            m: k.dev.alloc_zeros::<f32>(n)?,
            v: k.dev.alloc_zeros::<f32>(n)?,
            f_update: k.func("adamw_update", true)?,
            k,
        }))
    }

    /// One update with the scalars `c`: one kernel per run of consecutive vars that have a
    /// gradient (vars without one are left unchanged, as on the host), writing those vars.
    pub fn step(&mut self, flat: &FlatVars, grads: &GradStore, c: &AdamWStep) -> Result<()> {
        let (all, present) = gather(flat, grads, |_| true)?;
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for (s, &p) in flat.slots.iter().zip(&present) {
            if !p {
                continue;
            }
            match runs.last_mut() {
                Some((start, len)) if *start + *len == s.offset => *len += s.len,
                _ => runs.push((s.offset, s.len)),
            }
        }
        let vars = self.k.vars(flat)?;
        let stream = self.k.stream.clone();
        with_tensor_ptr(&all, &stream, |g| {
            for &(start, n) in &runs {
                if n == 0 {
                    continue;
                }
                let p = AdamWParams {
                    start: start as u64,
                    n: n as u64,
                    decay: c.decay,
                    one_minus_beta1: c.one_minus_beta1,
                    beta2: c.beta2,
                    one_minus_beta2: c.one_minus_beta2,
                    step_size: c.step_size,
                    bc2_sqrt: c.bc2_sqrt,
                    eps: c.eps,
                };
                let mut b = stream.launch_builder(&self.f_update);
                b.arg(&p).arg(&mut self.params).arg(&mut self.m).arg(&mut self.v).arg(&g).arg(&vars);
                // SAFETY: matches `adamw_update_<dtype>`; `g` and the table cover numel elements.
                unsafe { b.launch(grid(n)) }.w()?;
            }
            Ok(())
        })
    }

    /// Host copies of the weights, m and v.
    pub fn download(&self) -> Result<[Vec<f32>; 3]> {
        Ok([self.k.download(&self.params)?, self.k.download(&self.m)?, self.k.download(&self.v)?])
    }

    /// Replaces the state (a loaded file) and writes the weights into the vars.
    pub fn upload(&mut self, flat: &FlatVars, params: &[f32], m: &[f32], v: &[f32]) -> Result<()> {
        self.k.stream.memcpy_htod(params, &mut self.params).w()?;
        self.k.stream.memcpy_htod(m, &mut self.m).w()?;
        self.k.stream.memcpy_htod(v, &mut self.v).w()?;
        flat.write_values(params)
    }
}
