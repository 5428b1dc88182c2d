//! Hard-concrete gate samples (Louizos et al. 2018, arXiv 1712.01312; `specs/blora.md` "Gates")
//! as one op per direction, for CPU and CUDA tensors: B-LoRA draws every gate of a layer (its
//! rank gates and each quantizer's four bit gates, [`layer_gates_at`]) in one op every training
//! step.
//!
//! `z = clamp(σ((log α + n)/β)(ζ − γ) + γ, 0, 1)` for logistic noise n, times the nested
//! hard-off mask `∏_{k≤i} [log α_k > t]` when a threshold t is given (Bayesian Bits' bit gates:
//! a gate at or below t is off with every later one). σ(x) is `(1 + tanh(x/2))/2`.
//!
//! Composed from candle ops this was ~15 tiny kernels forward and ~10 backward per sample, each
//! a launch on the GPU for a vector of 4. Here each direction is one launch (one thread: the
//! vectors are a handful of gates). Each device reproduces its own composed ops to the bit:
//! the CPU with candle's CPU affine (`v·a + b`, two roundings) and `f32::tanh`, CUDA with candle's
//! CUDA affine (a fused multiply-add) and `tanhf`; so a forward's gates are the ones the composed
//! path drew (unit tests below, `tests/cuda_fused.rs`). The two devices differ from each other in
//! the last bits, as the composed ops did. The backward is the composed path's chain rule.
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};

use super::quantize::LadderFloat;

/// The hard-concrete constants (B-LoRA's: β = 2/3, γ = −0.1, ζ = 1.1) and the optional nested
/// hard-off threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HardConcrete {
    /// Temperature β.
    pub beta: f64,
    /// Lower stretch γ.
    pub gamma: f64,
    /// Upper stretch ζ.
    pub zeta: f64,
    /// Gates after the first with log α at or below this are off (`None`: no mask).
    pub hard_off: Option<f64>,
}

/// Samples `z: [n]` for `log_alpha: [n]` and logistic `noise: [n]` (same dtype, f32 or f64),
/// differentiable in `log_alpha`.
pub fn hard_concrete(log_alpha: &Tensor, noise: &Tensor, hc: HardConcrete) -> Result<Tensor> {
    same_length("hard_concrete", log_alpha, noise)?;
    hard_concrete_at(log_alpha, 0, noise, hc)
}

/// [`hard_concrete`] of the `n` gates `logits[offset..offset + n]` of a longer vector `logits`
/// (B-LoRA's gate bank), `n` = the length of `noise`: `[n]`. The gradient goes to the whole
/// vector (zero outside the window), with no narrow in the autograd graph, whose backward would
/// cost a zero-fill, a cat and an add per gate vector.
pub fn hard_concrete_at(logits: &Tensor, offset: usize, noise: &Tensor, hc: HardConcrete) -> Result<Tensor> {
    let w = Window::check("hard_concrete", logits, offset, noise)?;
    logits.contiguous()?.apply_op2(&noise.detach().contiguous()?, Sample(hc, w, None))
}

/// [`hard_concrete_at`] of several gate vectors of `group` gates each, side by side in the
/// window (B-LoRA's quantizers of one layer, four bit gates each): the hard-off mask restarts at
/// every group, so each group's samples and gradient are those of its own [`hard_concrete_at`];
/// one op per direction for all of them. The window's length must be a multiple of `group`.
///
/// With `grads`, the consumers of the samples may hand their gradients over to it instead of
/// returning them to autograd ([`GateGrads`]): this op's backward gathers them.
pub fn hard_concrete_groups_at(
    logits: &Tensor,
    offset: usize,
    noise: &Tensor,
    hc: HardConcrete,
    group: usize,
    grads: Option<&GateGrads>,
) -> Result<Tensor> {
    let w = Window::check("hard_concrete", logits, offset, noise)?;
    if group == 0 || w.n % group != 0 {
        candle_core::bail!("hard_concrete: {} gates are not groups of {group}", w.n);
    }
    let op = Sample(hc, Window { group, ..w }, grads.cloned());
    logits.contiguous()?.apply_op2(&noise.detach().contiguous()?, op)
}

/// A B-LoRA layer's gates in one op per direction: its `rank` rank gates (the window's first,
/// as [`rank_multiplier_at`]: `[rank + 1]`, no hard-off) and after them its quantizers' bit gates
/// (as [`hard_concrete_groups_at`] in groups of `group`), side by side in one output
/// `[rank + 1 + (n − rank)]`, n = the length of `noise`. Each part's values and gradient are
/// those of its own op. The consumers may hand their gradients over to `grads` ([`GateGrads`];
/// [`super::scale_by_gates_at`] for the rank multiplier, `gated_quantize_at` for the bit gates).
pub fn layer_gates_at(
    logits: &Tensor,
    offset: usize,
    noise: &Tensor,
    hc: HardConcrete,
    rank: usize,
    group: usize,
    grads: Option<&GateGrads>,
) -> Result<Tensor> {
    let w = Window::check("layer_gates", logits, offset, noise)?;
    if rank == 0 || rank > w.n || group == 0 || !(w.n - rank).is_multiple_of(group) {
        candle_core::bail!("layer_gates: {} gates are not {rank} rank gates (≥ 1) and groups of {group}", w.n);
    }
    let op = Sample(hc, Window { group, rank, ..w }, grads.cloned());
    logits.contiguous()?.apply_op2(&noise.detach().contiguous()?, op)
}

/// The most gradients a [`GateGrads`] gathers (besides the one returned to autograd): B-LoRA's
/// quantizers of one layer, eight at most.
pub const MAX_GATE_GRADS: usize = 8;

/// Where the consumers of one gate sample ([`hard_concrete_groups_at`]: B-LoRA's quantizers,
/// each reading its four gates at an offset, [`super::gated_quantize_at`]) hand over their
/// gradients, so that they reach the sample without autograd summing them: candle adds every
/// contribution to a tensor's gradient after the first (one add kernel each, on vectors that
/// are zero outside each consumer's window).
///
/// In a backward pass, the first consumer to run returns its gradient (the whole sample's
/// length, zero outside its window) to autograd, so that the sample gets a gradient and its
/// backward runs; every later one hands its window's gradient here ([`Self::hand_over`]). The
/// sample's backward runs after all of them (they depend on it) and takes the windows
/// ([`Self::take`]) in place of the autograd gradient's values there: the same floats as the
/// sum, since the windows are disjoint. It also resets the state, so that a graph may be walked
/// backward again.
#[derive(Debug, Clone, Default)]
pub struct GateGrads(Arc<Mutex<GateGradsState>>);

#[derive(Debug, Default)]
struct GateGradsState {
    /// A consumer returned its gradient to autograd in the current backward pass.
    returned: bool,
    /// The other consumers' gradients: (offset in the sample, the window's gradient).
    windows: Vec<(usize, Tensor)>,
}

impl GateGrads {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, GateGradsState>> {
        self.0.lock().map_err(|_| candle_core::Error::Msg("gate gradients: lock poisoned by a panic".into()))
    }

    /// Called by a consumer's backward pass: whether it must return its gradient to autograd
    /// (the first of the pass), else it hands it over with [`Self::hand_over`].
    pub fn returns_to_autograd(&self) -> Result<bool> {
        let mut st = self.lock()?;
        let first = !st.returned;
        st.returned = true;
        // Past MAX_GATE_GRADS windows, autograd sums the rest.
        Ok(first || st.windows.len() >= MAX_GATE_GRADS)
    }

    /// The gradient `grad` of the gates at `offset` of the sample (a consumer after the first).
    pub fn hand_over(&self, offset: usize, grad: Tensor) -> Result<()> {
        let mut st = self.lock()?;
        if st.windows.len() >= MAX_GATE_GRADS {
            candle_core::bail!("gate gradients: more than {MAX_GATE_GRADS} handed over");
        }
        st.windows.push((offset, grad));
        Ok(())
    }

    /// A consumer's backward with optional `grads`: whether its gradient of the samples goes to
    /// autograd (no `grads`, or the first consumer of the pass: [`Self::returns_to_autograd`]).
    pub(crate) fn returns(grads: Option<&GateGrads>) -> Result<bool> {
        grads.map_or(Ok(true), GateGrads::returns_to_autograd)
    }

    /// The consumer's gradient `dz` of the samples (at `offset` when handed over): what it
    /// returns to autograd, `None` once handed over to `grads` (`returned` from [`Self::returns`]).
    pub(crate) fn route(
        grads: Option<&GateGrads>,
        returned: bool,
        offset: usize,
        dz: Tensor,
    ) -> Result<Option<Tensor>> {
        match (grads, returned) {
            (Some(g), false) => {
                g.hand_over(offset, dz)?;
                Ok(None)
            }
            _ => Ok(Some(dz)),
        }
    }

    /// The windows handed over in this backward pass; resets the state.
    fn take(&self) -> Result<Vec<(usize, Tensor)>> {
        let mut st = self.lock()?;
        st.returned = false;
        Ok(std::mem::take(&mut st.windows))
    }
}

/// B-LoRA's rank multiplier `[1, m₂, …, m_r]` from the rank gates' logits `log_alpha: [n]`
/// (n = r − 1) and logistic `noise: [n]` (same dtype, f32 or f64), differentiable in `log_alpha`:
/// z = the hard-concrete samples (no hard-off), `m = acc + (round(acc) − acc).detach()` for the
/// cumulative product `acc` of z (0/1 forward, the product's gradient backward), and the first
/// component's constant 1 in front: `[n + 1]`.
///
/// Composed from candle ops this was ~15 ops forward (the sample, n − 1 products, the round and
/// the straight-through sub/add, a cat) and as many backward, per layer and step; here it is one
/// op per direction, the same floats as that composition on each device (its backward sums the
/// product's chain rule in the order candle's autograd does).
pub fn rank_multiplier(log_alpha: &Tensor, noise: &Tensor, hc: HardConcrete) -> Result<Tensor> {
    same_length("rank_multiplier", log_alpha, noise)?;
    rank_multiplier_at(log_alpha, 0, noise, hc)
}

/// [`rank_multiplier`] of the gates `logits[offset..offset + n]` of a longer vector, as
/// [`hard_concrete_at`]: `[n + 1]`, the gradient to the whole vector.
pub fn rank_multiplier_at(logits: &Tensor, offset: usize, noise: &Tensor, hc: HardConcrete) -> Result<Tensor> {
    if hc.hard_off.is_some() {
        candle_core::bail!("rank_multiplier: rank gates have no hard-off threshold");
    }
    let w = Window::check("rank_multiplier", logits, offset, noise)?;
    logits.contiguous()?.apply_op2(&noise.detach().contiguous()?, RankSample(hc, w))
}

fn same_length(what: &str, log_alpha: &Tensor, noise: &Tensor) -> Result<()> {
    if noise.dims() != log_alpha.dims() {
        candle_core::bail!(
            "{what}: log α and noise must have one shape, got {:?} and {:?}",
            log_alpha.dims(),
            noise.dims()
        );
    }
    Ok(())
}

/// The gates an op reads: `n` logits from `offset` of its first input.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Window {
    offset: usize,
    n: usize,
    /// The hard-off mask restarts every `group` gates (0: one group, the whole window).
    group: usize,
    /// The window's first `rank` gates are a rank multiplier's ([`layer_gates_at`]; 0: none).
    rank: usize,
}

impl Window {
    /// The forward's output length: the samples, plus the rank multiplier's leading 1.
    fn out_len(&self) -> usize {
        self.n + usize::from(self.rank > 0)
    }
}

impl Window {
    /// Checks `logits: [len]` and `noise: [n]` (one float dtype, f32 or f64, offset + n ≤ len).
    fn check(what: &str, logits: &Tensor, offset: usize, noise: &Tensor) -> Result<Window> {
        if logits.rank() != 1 || noise.rank() != 1 || noise.dtype() != logits.dtype() {
            candle_core::bail!(
                "{what}: log α and noise must be [len] and [n] vectors of one dtype, got {:?} {:?} and {:?} {:?}",
                logits.dims(),
                logits.dtype(),
                noise.dims(),
                noise.dtype()
            );
        }
        if !matches!(logits.dtype(), DType::F32 | DType::F64) {
            candle_core::bail!("{what}: f32 or f64, got {:?}", logits.dtype());
        }
        let n = noise.elem_count();
        if offset.checked_add(n).is_none_or(|end| end > logits.elem_count()) {
            candle_core::bail!("{what}: gates {offset}..{offset}+{n} past the {} logits", logits.elem_count());
        }
        Ok(Window { offset, n, group: 0, rank: 0 })
    }
}

/// The constants of one step of the composed path in `T` (candle's affine casts its f64 factors
/// to the tensor's dtype).
#[derive(Clone, Copy)]
struct Consts<T> {
    inv_beta: T,
    stretch: T,
    gamma: T,
    hard_off: Option<T>,
    /// [`Window::group`].
    group: usize,
    /// [`Window::rank`].
    rank: usize,
}

impl<T: LadderFloat> Consts<T> {
    fn of(hc: &HardConcrete, w: &Window) -> Self {
        Consts {
            inv_beta: T::from_f64(1.0 / hc.beta),
            stretch: T::from_f64(hc.zeta - hc.gamma),
            gamma: T::from_f64(hc.gamma),
            hard_off: hc.hard_off.map(T::from_f64),
            group: w.group,
            rank: w.rank,
        }
    }
}

/// `tanh` of the float types (`f32::tanh`/`f64::tanh`, as candle's CPU op).
trait Tanh {
    fn tanh_c(self) -> Self;
}
impl Tanh for f32 {
    fn tanh_c(self) -> Self {
        self.tanh()
    }
}
impl Tanh for f64 {
    fn tanh_c(self) -> Self {
        self.tanh()
    }
}

/// The composed path's forward of one gate on the CPU: (v before the clamp, t = tanh(..)).
fn pre_clamp<T: LadderFloat + Tanh>(la: T, n: T, c: &Consts<T>) -> (T, T) {
    let half = T::HALF;
    let b = (la + n) * c.inv_beta + T::ZERO;
    let t = (b * half + T::ZERO).tanh_c();
    let s = t * half + half;
    (s * c.stretch + c.gamma, t)
}

/// The nested hard-off mask, as the composed path's cumulative product of 0/1 (restarting
/// every `group` gates when `group` > 0).
fn mask<T: LadderFloat>(la: &[T], hard_off: Option<T>, group: usize) -> Vec<T> {
    let mut m = T::ONE;
    la.iter()
        .enumerate()
        .map(|(i, &a)| match hard_off {
            Some(t) => {
                if group > 0 && i % group == 0 {
                    m = T::ONE;
                }
                m = m * if a > t { T::ONE } else { T::ZERO };
                m
            }
            None => T::ONE,
        })
        .collect()
}

fn sample_cpu<T: LadderFloat + Tanh>(la: &[T], noise: &[T], c: &Consts<T>) -> Vec<T> {
    let m = mask(la, c.hard_off, c.group);
    la.iter().zip(noise).zip(m).map(|((&a, &n), m)| pre_clamp(a, n, c).0.max_c(T::ZERO).min_c(T::ONE) * m).collect()
}

/// d(g·z)/d log α of one gate through the composed path's backward, for the upstream gradient
/// `g` already times the mask: the clamp (½ on a bound), each affine, and tanh's `−(dt·(t² − 1))`.
fn chain<T: LadderFloat + Tanh>(a: T, n: T, g: T, c: &Consts<T>) -> T {
    let half = T::HALF;
    let (v, t) = pre_clamp(a, n, c);
    let side = |inside: bool, tie: bool| {
        if inside {
            T::ONE
        } else if tie {
            half
        } else {
            T::ZERO
        }
    };
    let dv = g * (side(v > T::ZERO, v == T::ZERO) * side(v < T::ONE, v == T::ONE));
    let dt = (dv * c.stretch + T::ZERO) * half + T::ZERO;
    let du = -(dt * (t * t * T::ONE - T::ONE));
    (du * half + T::ZERO) * c.inv_beta + T::ZERO
}

/// d(Σ g·z)/d log α through the composed path's backward (the mask, then [`chain`]).
fn grad_cpu<T: LadderFloat + Tanh>(la: &[T], noise: &[T], g: &[T], c: &Consts<T>) -> Vec<T> {
    let m = mask(la, c.hard_off, c.group);
    la.iter().zip(noise).zip(g.iter().zip(m)).map(|((&a, &n), (&g, m))| chain(a, n, g * m, c)).collect()
}

/// The clamped samples z and their cumulative products (the composed path's `acc`).
fn samples_and_products<T: LadderFloat + Tanh>(la: &[T], noise: &[T], c: &Consts<T>) -> (Vec<T>, Vec<T>) {
    let z: Vec<T> = la.iter().zip(noise).map(|(&a, &n)| pre_clamp(a, n, c).0.max_c(T::ZERO).min_c(T::ONE)).collect();
    let mut acc = Vec::with_capacity(z.len());
    for (i, &zi) in z.iter().enumerate() {
        acc.push(if i == 0 { zi } else { acc[i - 1] * zi });
    }
    (z, acc)
}

/// [`rank_multiplier`]'s forward on the CPU: `[1, acc + (round(acc) − acc)]`.
fn rank_cpu<T: LadderFloat + Tanh>(la: &[T], noise: &[T], c: &Consts<T>) -> Vec<T> {
    let (_, acc) = samples_and_products(la, noise, c);
    std::iter::once(T::ONE).chain(acc.into_iter().map(|a| a + (a.round_away() - a))).collect()
}

/// [`rank_multiplier`]'s backward on the CPU for the upstream gradient `g: [n + 1]`: the gradient
/// of each product `G_i = g_{i+1} + G_{i+1}·z_{i+1}` (straight through the round; the constant
/// gets none), `dz_i = G_i·acc_{i−1}` (`G_0` for the first), then [`chain`].
fn rank_grad_cpu<T: LadderFloat + Tanh>(la: &[T], noise: &[T], g: &[T], c: &Consts<T>) -> Vec<T> {
    let n = la.len();
    let (z, acc) = samples_and_products(la, noise, c);
    let mut out = vec![T::ZERO; n];
    let mut big_g = T::ZERO;
    for i in (0..n).rev() {
        big_g = if i + 1 == n { g[i + 1] } else { g[i + 1] + big_g * z[i + 1] };
        let dz = if i == 0 { big_g } else { big_g * acc[i - 1] };
        out[i] = chain(la[i], noise[i], dz, c);
    }
    out
}

/// The upstream gradient `g` with each handed-over window's values in place of its own.
fn gathered_cpu(g: &CpuStorage, gl: &Layout, windows: &[(usize, Tensor)]) -> Result<CpuStorage> {
    fn go<T: candle_core::WithDType>(g: &[T], windows: &[(usize, Tensor)]) -> Result<Vec<T>> {
        let mut out = g.to_vec();
        for (at, t) in windows {
            let (s, l) = t.storage_and_layout();
            let Storage::Cpu(s) = &*s else { candle_core::bail!("hard_concrete: a handed-over gradient off the CPU") };
            let v = cpu_slice::<T>(s, l)?;
            match out.get_mut(*at..at + v.len()) {
                Some(dst) => dst.copy_from_slice(v),
                None => candle_core::bail!("hard_concrete: a handed-over gradient past the gates"),
            }
        }
        Ok(out)
    }
    Ok(match g.dtype() {
        DType::F32 => CpuStorage::F32(go(cpu_slice::<f32>(g, gl)?, windows)?),
        DType::F64 => CpuStorage::F64(go(cpu_slice::<f64>(g, gl)?, windows)?),
        other => candle_core::bail!("hard_concrete: f32 or f64, got {other:?}"),
    })
}

/// The contiguous elements of a CPU input of type `T` (also the gate ops' of `gate_scale` and
/// `gate_prior`).
pub(super) fn cpu_slice<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("gate ops: inputs must be contiguous") };
    Ok(&data[a..b])
}

/// One direction of an op on the CPU: `f(window of log α, noise, gradient or [], constants)`.
type CpuPass<T> = fn(&[T], &[T], &[T], &Consts<T>) -> Vec<T>;

/// Runs `f` on the inputs; with `scatter` its result goes into zeros of log α's length (the
/// backward's gradient of the whole logit vector).
fn cpu_pass<T: LadderFloat + Tanh + candle_core::WithDType>(
    inputs: &[(&CpuStorage, &Layout)],
    w: Window,
    hc: &HardConcrete,
    scatter: bool,
    f: CpuPass<T>,
) -> Result<Vec<T>> {
    let la = cpu_slice::<T>(inputs[0].0, inputs[0].1)?;
    let noise = cpu_slice::<T>(inputs[1].0, inputs[1].1)?;
    let g: &[T] = match inputs.get(2) {
        Some((s, l)) => cpu_slice::<T>(s, l)?,
        None => &[],
    };
    let out = f(&la[w.offset..w.offset + w.n], noise, g, &Consts::of(hc, &w));
    if !scatter || la.len() == w.n {
        return Ok(out);
    }
    let mut full = vec![T::ZERO; la.len()];
    full[w.offset..w.offset + w.n].copy_from_slice(&out);
    Ok(full)
}

fn cpu_run(
    inputs: &[(&CpuStorage, &Layout)],
    w: Window,
    hc: &HardConcrete,
    scatter: bool,
    (f32_pass, f64_pass): (CpuPass<f32>, CpuPass<f64>),
) -> Result<CpuStorage> {
    Ok(match inputs[0].0.dtype() {
        DType::F32 => CpuStorage::F32(cpu_pass(inputs, w, hc, scatter, f32_pass)?),
        DType::F64 => CpuStorage::F64(cpu_pass(inputs, w, hc, scatter, f64_pass)?),
        other => candle_core::bail!("hard_concrete: f32 or f64, got {other:?}"),
    })
}

/// The samples: with [`Consts::rank`], the rank multiplier of the first gates, then the rest.
fn sample_pass<T: LadderFloat + Tanh>(la: &[T], noise: &[T], _g: &[T], c: &Consts<T>) -> Vec<T> {
    let r = c.rank;
    if r == 0 {
        return sample_cpu(la, noise, c);
    }
    let mut out = rank_cpu(&la[..r], &noise[..r], c);
    out.extend(sample_cpu(&la[r..], &noise[r..], c));
    out
}

/// Their backward for the upstream gradient `g` (the forward's length).
fn sample_grad_pass<T: LadderFloat + Tanh>(la: &[T], noise: &[T], g: &[T], c: &Consts<T>) -> Vec<T> {
    let r = c.rank;
    if r == 0 {
        return grad_cpu(la, noise, g, c);
    }
    let mut out = rank_grad_cpu(&la[..r], &noise[..r], &g[..r + 1], c);
    out.extend(grad_cpu(&la[r..], &noise[r..], &g[r + 1..], c));
    out
}

fn rank_pass<T: LadderFloat + Tanh>(la: &[T], noise: &[T], _g: &[T], c: &Consts<T>) -> Vec<T> {
    rank_cpu(la, noise, c)
}

/// [`hard_concrete_at`]'s forward: inputs log α and noise, output `[n]`; the gradients its
/// consumers hand over, if they do.
struct Sample(HardConcrete, Window, Option<GateGrads>);

/// Its backward: inputs log α, noise and the upstream gradient; output d log α (log α's shape).
/// The upstream gradient's values in each handed-over window are replaced by the window's.
struct SampleGrad(HardConcrete, Window, Vec<(usize, Tensor)>);

/// [`rank_multiplier_at`]'s forward: inputs log α and noise, output `[n + 1]`.
struct RankSample(HardConcrete, Window);

/// Its backward: inputs log α, noise and the upstream gradient `[n + 1]`; output d log α.
struct RankSampleGrad(HardConcrete, Window);

impl CustomOp2 for Sample {
    fn name(&self) -> &'static str {
        "hard-concrete"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = cpu_run(&[(s1, l1), (s2, l2)], self.1, &self.0, false, (sample_pass, sample_pass))?;
        Ok((out, Shape::from(self.1.out_len())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let len = self.1.out_len();
        let out = cuda::Out::Len(len);
        Ok((cuda::launch("hard_concrete_fwd", &self.0, &[(s1, l1), (s2, l2)], self.1, out)?, Shape::from(len)))
    }

    fn bwd(
        &self,
        la: &Tensor,
        noise: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let windows = match &self.2 {
            Some(g) => g.take()?,
            None => Vec::new(),
        };
        for (at, g) in &windows {
            if g.dtype() != grad.dtype() || g.rank() != 1 || at + g.elem_count() > self.1.out_len() {
                candle_core::bail!(
                    "hard_concrete: a handed-over gradient {:?} at {at} of {} samples",
                    g.dims(),
                    self.1.out_len()
                );
            }
        }
        let d = la.apply_op3_no_bwd(noise, &grad.contiguous()?, &SampleGrad(self.0, self.1, windows))?;
        Ok((Some(d), None))
    }
}

impl CustomOp3 for SampleGrad {
    fn name(&self) -> &'static str {
        "hard-concrete-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l3.shape().elem_count() != self.1.out_len() {
            candle_core::bail!("hard_concrete backward: gradient {:?} for {} samples", l3.shape(), self.1.out_len());
        }
        let pass: (CpuPass<f32>, CpuPass<f64>) = (sample_grad_pass, sample_grad_pass);
        let out = if self.2.is_empty() {
            cpu_run(&[(s1, l1), (s2, l2), (s3, l3)], self.1, &self.0, true, pass)?
        } else {
            let g = gathered_cpu(s3, l3, &self.2)?;
            let gl = Layout::contiguous(l3.shape());
            cpu_run(&[(s1, l1), (s2, l2), (&g, &gl)], self.1, &self.0, true, pass)?
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = cuda::Out::Scatter(l1.shape().elem_count());
        let inputs = [(s1, l1), (s2, l2), (s3, l3)];
        let d = cuda::launch_gathered("hard_concrete_bwd", &self.0, &inputs, self.1, out, &self.2)?;
        Ok((d, l1.shape().clone()))
    }
}

impl CustomOp2 for RankSample {
    fn name(&self) -> &'static str {
        "rank-multiplier"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = cpu_run(&[(s1, l1), (s2, l2)], self.1, &self.0, false, (rank_pass, rank_pass))?;
        Ok((out, Shape::from(self.1.n + 1)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let n = self.1.n;
        let m = cuda::launch("rank_gates_fwd", &self.0, &[(s1, l1), (s2, l2)], self.1, cuda::Out::Len(n + 1))?;
        Ok((m, Shape::from(n + 1)))
    }

    fn bwd(
        &self,
        la: &Tensor,
        noise: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = la.apply_op3_no_bwd(noise, &grad.contiguous()?, &RankSampleGrad(self.0, self.1))?;
        Ok((Some(d), None))
    }
}

impl CustomOp3 for RankSampleGrad {
    fn name(&self) -> &'static str {
        "rank-multiplier-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l3.shape().elem_count() != self.1.n + 1 {
            candle_core::bail!("rank_multiplier backward: gradient {:?} for {} gates", l3.shape(), self.1.n);
        }
        let out = cpu_run(&[(s1, l1), (s2, l2), (s3, l3)], self.1, &self.0, true, (rank_grad_cpu, rank_grad_cpu))?;
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        if l3.shape().elem_count() != self.1.n + 1 {
            candle_core::bail!("rank_multiplier backward: gradient {:?} for {} gates", l3.shape(), self.1.n);
        }
        let out = cuda::Out::Scatter(l1.shape().elem_count());
        let d = cuda::launch("rank_gates_bwd", &self.0, &[(s1, l1), (s2, l2), (s3, l3)], self.1, out)?;
        Ok((d, l1.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::super::cuda::{contiguous_view, dtype_suffix, Kernel};
    use super::{HardConcrete, Window, MAX_GATE_GRADS};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, DType, Layout, Result, Storage, Tensor};

    /// `HardConcreteParams` in `kernels/hard_concrete.cu`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    struct HardConcreteParams {
        inv_beta: f64,
        stretch: f64,
        gamma: f64,
        hard_off: f64,
        n: u32,
        use_hard_off: u32,
        group: u32,
        /// The window's leading rank gates ([`super::layer_gates_at`]).
        rank: u32,
        /// Handed-over gradient windows ([`super::GateGrads`]): how many, and each one's
        /// offset, length and device address; the kernel reads them in place of the upstream
        /// gradient's values there.
        windows: u32,
        window_at: [u32; MAX_GATE_GRADS],
        window_len: [u32; MAX_GATE_GRADS],
        window_ptr: [u64; MAX_GATE_GRADS],
    }
    // SAFETY: plain-old-data with the kernel's C layout.
    unsafe impl DeviceRepr for HardConcreteParams {}

    /// What a launch returns: `Len(k)`, the k values the kernel writes; `Scatter(len)`, zeros of
    /// `len` with the kernel's n values at the window (the gradient of the whole logit vector).
    #[derive(Clone, Copy)]
    pub(super) enum Out {
        Len(usize),
        Scatter(usize),
    }

    /// `<entry>_<dtype>(params, window of input 0, inputs 1.., out)` on one thread for the
    /// window's n gates.
    pub(super) fn launch(
        entry: &str,
        hc: &HardConcrete,
        inputs: &[(&CudaStorage, &Layout)],
        w: Window,
        out: Out,
    ) -> Result<CudaStorage> {
        launch_gathered(entry, hc, inputs, w, out, &[])
    }

    /// [`launch`] with handed-over gradient windows (the backward of a sample whose consumers
    /// hand their gradients over), read by the kernel in place.
    pub(super) fn launch_gathered(
        entry: &str,
        hc: &HardConcrete,
        inputs: &[(&CudaStorage, &Layout)],
        w: Window,
        out: Out,
        windows: &[(usize, Tensor)],
    ) -> Result<CudaStorage> {
        fn go<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
            entry: &str,
            mut params: HardConcreteParams,
            inputs: &[(&CudaStorage, &Layout)],
            w: Window,
            out: Out,
            windows: &[(usize, Tensor)],
        ) -> Result<CudaStorage> {
            let dev = inputs[0].0.device().clone();
            let stream = dev.cuda_stream();
            // Each window's storage stays read-locked, and its device address recorded as read
            // on the stream, until the launch is queued.
            let guards: Vec<_> = windows.iter().map(|(_, t)| t.storage_and_layout()).collect();
            let mut window_views = Vec::with_capacity(windows.len());
            for (s, l) in &guards {
                let Storage::Cuda(s) = &**s else { candle_core::bail!("{entry}: a handed-over gradient off CUDA") };
                window_views.push(contiguous_view::<T>(s, l, "handed-over gradient")?);
            }
            let ptrs: Vec<_> = window_views.iter().map(|v| v.device_ptr(&stream)).collect();
            for (k, ((at, t), (ptr, _))) in windows.iter().zip(&ptrs).enumerate() {
                params.window_at[k] = *at as u32;
                params.window_len[k] = t.elem_count() as u32;
                params.window_ptr[k] = *ptr;
            }
            params.windows = windows.len() as u32;
            let func = Kernel::HardConcrete.func(&dev, &format!("{entry}_{}", dtype_suffix(inputs[0].0.dtype())?))?;
            let views = inputs
                .iter()
                .map(|(s, l)| contiguous_view::<T>(s, l, "hard_concrete input"))
                .collect::<Result<Vec<_>>>()?;
            let la = views[0].slice(w.offset..w.offset + w.n);
            let (mut buf, start, end) = match out {
                // SAFETY: the kernel writes all k elements.
                Out::Len(k) => (unsafe { dev.alloc::<T>(k)? }, 0, k),
                Out::Scatter(len) => (dev.alloc_zeros::<T>(len)?, w.offset, w.offset + w.n),
            };
            {
                let mut dst = buf.slice_mut(start..end);
                let mut b = stream.launch_builder(&func);
                b.arg(&params);
                b.arg(&la);
                for v in &views[1..] {
                    b.arg(v);
                }
                b.arg(&mut dst);
                let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1, 1, 1), shared_mem_bytes: 0 };
                // SAFETY: the argument list matches `<entry>_<dtype>` in kernels/hard_concrete.cu.
                unsafe { b.launch(cfg) }.w()?;
            }
            drop(ptrs);
            Ok(T::wrap_cuda_slice(buf, dev))
        }
        let dtype = inputs[0].0.dtype();
        if inputs.iter().any(|(s, _)| s.dtype() != dtype) {
            candle_core::bail!("{entry}: inputs of one dtype");
        }
        if windows.len() > MAX_GATE_GRADS || windows.iter().any(|(at, t)| at + t.elem_count() > w.out_len()) {
            candle_core::bail!(
                "{entry}: {} handed-over gradients, at most {MAX_GATE_GRADS} within the gates",
                windows.len()
            );
        }
        let params = HardConcreteParams {
            inv_beta: 1.0 / hc.beta,
            stretch: hc.zeta - hc.gamma,
            gamma: hc.gamma,
            hard_off: hc.hard_off.unwrap_or(0.0),
            n: u32::try_from(w.n).map_err(|_| candle_core::Error::Msg(format!("{entry}: {} gates", w.n)))?,
            use_hard_off: hc.hard_off.is_some() as u32,
            group: u32::try_from(w.group)
                .map_err(|_| candle_core::Error::Msg(format!("{entry}: group {}", w.group)))?,
            rank: u32::try_from(w.rank).map_err(|_| candle_core::Error::Msg(format!("{entry}: rank {}", w.rank)))?,
            windows: 0,
            window_at: [0; MAX_GATE_GRADS],
            window_len: [0; MAX_GATE_GRADS],
            window_ptr: [0; MAX_GATE_GRADS],
        };
        match dtype {
            DType::F32 => go::<f32>(entry, params, inputs, w, out, windows),
            DType::F64 => go::<f64>(entry, params, inputs, w, out, windows),
            other => candle_core::bail!("{entry}: no CUDA kernel for {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    const HC: HardConcrete = HardConcrete { beta: 2.0 / 3.0, gamma: -0.1, zeta: 1.1, hard_off: Some(-2.0) };

    /// The composed path (candle ops): the reference on each device.
    fn composed(la: &Tensor, noise: &Tensor, hc: HardConcrete) -> Result<Tensor> {
        let b = la.add(noise)?.affine(1.0 / hc.beta, 0.0)?;
        let s = b.affine(0.5, 0.0)?.tanh()?.affine(0.5, 0.5)?;
        let z = s.affine(hc.zeta - hc.gamma, hc.gamma)?.clamp(0f32, 1f32)?;
        let Some(t) = hc.hard_off else { return Ok(z) };
        let open = la.gt(t)?.to_dtype(la.dtype())?;
        let mut acc = open.narrow(0, 0, 1)?;
        let mut parts = vec![acc.clone()];
        for i in 1..open.dim(0)? {
            acc = acc.mul(&open.narrow(0, i, 1)?)?;
            parts.push(acc.clone());
        }
        z.mul(&Tensor::cat(&parts, 0)?)
    }

    #[test]
    fn samples_and_gradients_equal_the_composed_ops() -> Result<()> {
        let dev = Device::Cpu;
        // Logits across the range (clamped at 0 and 1, soft, hard-off in the middle), noises
        // that put some samples exactly on a bound of the clamp.
        let la: Vec<f32> = vec![6.0, 0.3, -1.0, 2.5, -2.0, 1.0, 30.0, -30.0, 0.0, -0.4, 1.7];
        let mut noise: Vec<f32> = (0..la.len()).map(|i| (i as f32 * 1.37).sin() * 3.0).collect();
        noise[9] = 0.4; // log α + n = 0: s = ½, v = 0.5
        let w = Tensor::randn(0f32, 1.0, la.len(), &dev)?;
        for hc in [HC, HardConcrete { hard_off: None, ..HC }] {
            for dtype in [DType::F32, DType::F64] {
                let n = Tensor::new(noise.as_slice(), &dev)?.to_dtype(dtype)?;
                let w = w.to_dtype(dtype)?;
                let run = |fused: bool| -> Result<(Vec<f64>, Vec<f64>)> {
                    let v = Var::from_tensor(&Tensor::new(la.as_slice(), &dev)?.to_dtype(dtype)?)?;
                    let z =
                        if fused { hard_concrete(v.as_tensor(), &n, hc)? } else { composed(v.as_tensor(), &n, hc)? };
                    let g = z.mul(&w)?.sum_all()?.backward()?;
                    let dla = g.get(v.as_tensor()).map(|t| t.to_dtype(DType::F64)?.to_vec1::<f64>()).transpose()?;
                    Ok((z.to_dtype(DType::F64)?.to_vec1::<f64>()?, dla.unwrap_or_default()))
                };
                let ((zf, gf), (zc, gc)) = (run(true)?, run(false)?);
                let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&zf), bits(&zc), "{dtype:?} {hc:?}: samples {zf:?} vs {zc:?}");
                assert!(zf.contains(&0.0) && zf.contains(&1.0) && zf.iter().any(|z| 0.0 < *z && *z < 1.0));
                let tol = if dtype == DType::F32 { 1e-6 } else { 1e-14 };
                for (a, b) in gf.iter().zip(&gc) {
                    assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{dtype:?} {hc:?}: d log α {gf:?} vs {gc:?}");
                }
                assert!(gf.iter().any(|g| g.abs() > 1e-3), "soft samples pass a gradient: {gf:?}");
            }
        }
        Ok(())
    }

    #[test]
    fn gradient_matches_finite_differences() -> Result<()> {
        // Away from the clamp's bounds the sample is smooth in log α.
        let dev = Device::Cpu;
        let hc = HardConcrete { hard_off: None, ..HC };
        let la0 = [0.3f64, -0.2, 0.9, -1.1];
        let noise = Tensor::new(&[0.1f64, -0.4, 0.2, 0.5], &dev)?;
        let w = Tensor::new(&[1.0f64, -2.0, 0.5, 3.0], &dev)?;
        let v = Var::new(&la0, &dev)?;
        let grads = hard_concrete(v.as_tensor(), &noise, hc)?.mul(&w)?.sum_all()?.backward()?;
        let g = grads.get(v.as_tensor()).map(|t| t.to_vec1::<f64>()).transpose()?.unwrap_or_default();
        let eps = 1e-6;
        for i in 0..4 {
            let at = |d: f64| -> Result<f64> {
                let mut la = la0;
                la[i] += d;
                hard_concrete(&Tensor::new(&la, &dev)?, &noise, hc)?.mul(&w)?.sum_all()?.to_scalar::<f64>()
            };
            let fd = (at(eps)? - at(-eps)?) / (2.0 * eps);
            assert!((fd - g[i]).abs() <= 1e-7 * (1.0 + fd.abs()), "d log α[{i}]: fd {fd} vs {}", g[i]);
        }
        Ok(())
    }
}
