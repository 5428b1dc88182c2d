//! B-LoRA's gate prior (`specs/blora.md` "Prior"; `adapters::blora::bank`) over a bank of gate
//! logits as one op per direction, for CPU and CUDA tensors: every layer's expected BOPs (or
//! expected number of open gates) from the open probabilities of its nested gates.
//!
//! Per layer, for its rank gates (`[n]` logits, if any) and its quantizers' bit gates (`[4]`
//! each, in one of [`PRIOR_COLUMNS`] columns):
//!
//! ```text
//! p(a)    = σ(a + logit_shift), σ(x) = (1 + tanh(x/2))/2            P(gate open)
//! bits:   P_i = p(a_i)·∏_{k≤i}[a_k > hard_off],  c_i = ∏_{k≤i} P_k  (nested, hard-off)
//!         E[bits] = Σ_i c_i·(2, 4, 8, 16)_i + 2                      (32 without quantizer)
//! rank:   E[open] = Σ_i ∏_{k≤i} p(a_k)
//! bops:   (R·(b_x·b_A·in + b_actA·b_E + b_actE·b_B·out) + b_x·b_W0·base_macs)·inv_norm,
//!         R = E[open] + 1 (rank_full without rank gates)
//! const:  (E[open] + Σ_quantizers Σ_i c_i)·inv_count
//! ```
//!
//! Output: the layers' priors `[L]` (the caller sums them). The backward gives the whole bank's
//! gradient (zero where no layer reads).
//!
//! Composed from candle ops this was ~55 small kernels forward and ~100 backward per step
//! (index selects, cumulative products as narrow/mul/cat, a table of columns, their backward's
//! zero-pads and adds); here each direction is one launch (CUDA: `kernels/gate_prior.cu`, a
//! thread per layer). The CPU path is the composed ops' floats to the bit, forward and backward:
//! each affine `v·a + b` with two roundings, `f32::tanh`, every reduction in candle's CPU order
//! ([`candle_sum`]), and the gradient summed where autograd summed it (tests in
//! `adapters::blora::bank`). The CUDA kernel rounds every op on its own too but uses `tanhf`, so
//! it differs from the CPU in the last bits (`tests/cuda_fused.rs`).
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Result, Shape, Tensor};

use super::hard_concrete::cpu_slice;

/// The quantizer columns of a layer, in this order: the input x, the base weight W0, A, E, B and
/// the activations after A, E and B (B-LoRA's `Slot` order).
pub const PRIOR_COLUMNS: usize = 8;
const X: usize = 0;
const W0: usize = 1;
const A: usize = 2;
const E: usize = 3;
const B: usize = 4;
const ACT_A: usize = 5;
const ACT_E: usize = 6;

/// "No gates" in the offsets of [`GatePlan`]'s device table and the kernel.
const NONE: u32 = u32::MAX;
/// Per layer in the device table: the rank gates' offset, then each column's.
const META: usize = 1 + PRIOR_COLUMNS;
/// Per layer in the device coefficients: in, out, base_macs, rank_full, inv_norm, inv_count.
const COEF: usize = 6;

/// What the prior costs: the expected BOPs or the expected number of open gates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PriorCost {
    Bops,
    Const,
}

/// One layer of a [`GatePlan`]: where its gates sit in the bank and its coefficients (each
/// rounded to f32 as the composed path's coefficient tensors were).
#[derive(Debug, Clone, PartialEq)]
pub struct PriorLayer {
    /// Offset of the layer's `[rank_len]` rank gates (`None`: no rank gates, R = `rank_full`).
    pub rank: Option<usize>,
    /// Each quantizer's column (< [`PRIOR_COLUMNS`], increasing) and the offset of its 4 bit gates.
    pub bits: Vec<(usize, usize)>,
    pub in_features: f64,
    pub out_features: f64,
    /// in·out when the base is quantized, else 0.
    pub base_macs: f64,
    /// R without rank gates (the layer's r).
    pub rank_full: f64,
    /// 1 / the `bops` normaliser.
    pub inv_norm: f64,
    /// 1 / the number of gates (the `const` normaliser).
    pub inv_count: f64,
}

/// The constants of the prior: the gates' `logit_shift` (P(open) = σ(log α + logit_shift)),
/// the bit gates' `hard_off` threshold, the bits of an unquantized tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PriorConsts {
    pub logit_shift: f64,
    pub hard_off: f64,
    pub full_bits: f64,
}

/// The layers of one prior: their gates in one bank, one number of rank gates for all.
#[derive(Debug, Clone)]
pub struct GatePlan {
    layers: Vec<Coefs>,
    rank_len: usize,
    consts: PriorConsts,
    /// One past the last gate read: the bank must be at least this long.
    end: usize,
    /// `[L·META]` u32 offsets and `[L·COEF]` f32 coefficients on the plan's device (what the
    /// CUDA kernels read).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    meta: Tensor,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    coefs: Tensor,
}

/// A layer's offsets and f32 coefficients.
#[derive(Debug, Clone, Copy)]
struct Coefs {
    rank: Option<usize>,
    cols: [Option<usize>; PRIOR_COLUMNS],
    in_f: f32,
    out_f: f32,
    base_macs: f32,
    rank_full: f32,
    inv_norm: f32,
    inv_count: f32,
}

impl GatePlan {
    /// The plan of `layers` with `rank_len` rank gates each (those with rank gates), its tables
    /// on `device`.
    pub fn new(layers: &[PriorLayer], rank_len: usize, consts: PriorConsts, device: &Device) -> Result<GatePlan> {
        let mut coefs = Vec::with_capacity(layers.len());
        let mut end = 0;
        for (k, l) in layers.iter().enumerate() {
            let mut cols = [None; PRIOR_COLUMNS];
            let mut last = None;
            for &(col, at) in &l.bits {
                if col >= PRIOR_COLUMNS || last.is_some_and(|p| p >= col) {
                    candle_core::bail!("gate_prior: layer {k}: quantizer columns must increase below {PRIOR_COLUMNS}");
                }
                last = Some(col);
                cols[col] = Some(at);
                end = end.max(at + 4);
            }
            let rank = l.rank.filter(|_| rank_len > 0);
            if let Some(at) = rank {
                end = end.max(at + rank_len);
            }
            coefs.push(Coefs {
                rank,
                cols,
                in_f: l.in_features as f32,
                out_f: l.out_features as f32,
                base_macs: l.base_macs as f32,
                rank_full: l.rank_full as f32,
                inv_norm: l.inv_norm as f32,
                inv_count: l.inv_count as f32,
            });
        }
        let index = |at: Option<usize>| -> Result<u32> {
            match at {
                Some(at) => u32::try_from(at)
                    .ok()
                    .filter(|&v| v != NONE)
                    .ok_or_else(|| candle_core::Error::Msg(format!("gate_prior: gate offset {at} past u32"))),
                None => Ok(NONE),
            }
        };
        let mut meta = Vec::with_capacity(META * coefs.len());
        let mut table = Vec::with_capacity(COEF * coefs.len());
        for c in &coefs {
            meta.push(index(c.rank)?);
            for col in c.cols {
                meta.push(index(col)?);
            }
            table.extend([c.in_f, c.out_f, c.base_macs, c.rank_full, c.inv_norm, c.inv_count]);
        }
        let (nm, nc) = (meta.len(), table.len());
        Ok(GatePlan {
            layers: coefs,
            rank_len,
            consts,
            end,
            meta: Tensor::from_vec(meta, nm, device)?,
            coefs: Tensor::from_vec(table, nc, device)?,
        })
    }

    pub fn len(&self) -> usize {
        self.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
}

/// The prior of every layer of `plan` over the bank's logits `bank: [G]` (f32), `[L]`,
/// differentiable in the bank.
pub fn gate_prior(bank: &Tensor, plan: &GatePlan, cost: PriorCost) -> Result<Tensor> {
    if bank.rank() != 1 || bank.dtype() != DType::F32 || bank.elem_count() < plan.end {
        candle_core::bail!(
            "gate_prior: the bank must be an f32 vector of at least {} logits, got {:?} {:?}",
            plan.end,
            bank.dims(),
            bank.dtype()
        );
    }
    if plan.is_empty() {
        return Tensor::zeros(0, DType::F32, bank.device());
    }
    bank.contiguous()?.apply_op1(Prior { plan: plan.clone(), cost })
}

/// A vector's sum in candle's CPU order (`vec_sum` of f32 under `ReduceSum`): from 0, with AVX2
/// first 4×8 lane sums over whole blocks of 32 (reduced pairwise), then the rest one by one.
pub(crate) fn candle_sum(xs: &[f32]) -> f32 {
    let np = if avx2() { xs.len() & !31 } else { 0 };
    let mut total = 0f32;
    if np > 0 {
        let mut lanes = [[0f32; 8]; 4];
        for block in xs[..np].chunks_exact(32) {
            for (j, lane) in lanes.iter_mut().enumerate() {
                for (l, v) in lane.iter_mut().enumerate() {
                    *v += block[j * 8 + l];
                }
            }
        }
        let mut x = [0f32; 8];
        for (l, v) in x.iter_mut().enumerate() {
            *v = (lanes[0][l] + lanes[1][l]) + (lanes[2][l] + lanes[3][l]);
        }
        let t: [f32; 4] = std::array::from_fn(|k| x[k] + x[k + 4]);
        total = (t[0] + t[1]) + (t[2] + t[3]);
    }
    for &v in &xs[np..] {
        total += v;
    }
    total
}

fn avx2() -> bool {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
    {
        false
    }
}

/// One gate's open probability as the composed ops computed it: `affine(1, shift)`,
/// `affine(½, 0)`, tanh, `affine(½, ½)`; also returns tanh's output (for the backward).
fn prob_open(a: f32, shift: f32) -> (f32, f32) {
    let x = a * 1.0 + shift;
    let t = (x * 0.5 + 0.0).tanh();
    (t * 0.5 + 0.5, t)
}

/// d/d a of [`prob_open`] for the upstream gradient `g`, through the composed backward: each
/// affine's `g·mul + 0`, tanh's `−(g·(t·t·1 − 1))`.
fn prob_open_grad(g: f32, t: f32) -> f32 {
    let dt = g * 0.5 + 0.0;
    let du = -(dt * (t * t * 1.0 + -1.0));
    (du * 0.5 + 0.0) * 1.0 + 0.0
}

/// The nested gates of `logits`: (P_i, c_i = ∏_{k≤i} P_k, tanh outputs, the hard-off mask).
struct Nested {
    p: Vec<f32>,
    c: Vec<f32>,
    t: Vec<f32>,
    mask: Vec<f32>,
}

impl Nested {
    fn of(logits: &[f32], shift: f32, hard_off: Option<f32>) -> Nested {
        let n = logits.len();
        let (mut p, mut c, mut t, mut mask) =
            (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        let mut m = 1f32;
        for (i, &a) in logits.iter().enumerate() {
            let (q, ti) = prob_open(a, shift);
            if let Some(h) = hard_off {
                let open = if a > h { 1f32 } else { 0f32 };
                m = if i == 0 { open } else { m * open };
            }
            let pi = if hard_off.is_some() { q * m } else { q };
            c.push(if i == 0 { pi } else { c[i - 1] * pi });
            p.push(pi);
            t.push(ti);
            mask.push(m);
        }
        Nested { p, c, t, mask }
    }

    /// d logits for the upstream gradient `dc` of each c_i: the cumulative product's backward
    /// (`G_i = dc_i + G_{i+1}·P_{i+1}`, `dP_i = G_i·c_{i−1}`), the mask, then [`prob_open_grad`].
    fn grad(&self, dc: &[f32], masked: bool) -> Vec<f32> {
        let n = self.p.len();
        let mut out = vec![0f32; n];
        let mut big_g = 0f32;
        for i in (0..n).rev() {
            big_g = if i + 1 == n { dc[i] } else { dc[i] + big_g * self.p[i + 1] };
            let dp = if i == 0 { big_g } else { big_g * self.c[i - 1] };
            let dq = if masked { dp * self.mask[i] } else { dp };
            out[i] = prob_open_grad(dq, self.t[i]);
        }
        out
    }
}

/// Bits each nested bit gate adds.
const ADDED: [f32; 4] = [2.0, 4.0, 8.0, 16.0];

/// One layer's forward values and what its backward needs.
struct LayerPass {
    rank: Option<Nested>,
    /// Per column: the quantizer's nested gates.
    cols: [Option<Nested>; PRIOR_COLUMNS],
    /// R (bops) or E[open] of the rank gates (const), and each column's E[bits] / E[open].
    rank_value: f32,
    col_value: [f32; PRIOR_COLUMNS],
    out: f32,
}

fn layer_pass(bank: &[f32], l: &Coefs, n: usize, consts: &PriorConsts, cost: PriorCost) -> LayerPass {
    let shift = consts.logit_shift as f32;
    let hard_off = consts.hard_off as f32;
    let rank = l.rank.map(|at| Nested::of(&bank[at..at + n], shift, None));
    let cols: [Option<Nested>; PRIOR_COLUMNS] =
        std::array::from_fn(|k| l.cols[k].map(|at| Nested::of(&bank[at..at + 4], shift, Some(hard_off))));
    let rank_open = rank.as_ref().map(|r| candle_sum(&r.c));
    match cost {
        PriorCost::Bops => {
            let col_value: [f32; PRIOR_COLUMNS] = std::array::from_fn(|k| match &cols[k] {
                Some(q) => {
                    let terms: Vec<f32> = q.c.iter().zip(ADDED).map(|(c, a)| c * a).collect();
                    candle_sum(&terms) * 1.0 + 2.0
                }
                None => consts.full_bits as f32,
            });
            let rank_value = match rank_open {
                Some(open) => open * 1.0 + 1.0,
                None => l.rank_full,
            };
            let b = col_value;
            let per_rank = (b[X] * b[A] * l.in_f + b[ACT_A] * b[E]) + b[ACT_E] * b[B] * l.out_f;
            let total = rank_value * per_rank + b[X] * b[W0] * l.base_macs;
            LayerPass { rank, cols, rank_value, col_value, out: total * l.inv_norm }
        }
        PriorCost::Const => {
            let col_value: [f32; PRIOR_COLUMNS] =
                std::array::from_fn(|k| cols[k].as_ref().map_or(0.0, |q| candle_sum(&q.c)));
            // The composed table's row: the rank term, the quantizers in column order, zeros.
            let mut row = vec![rank_open.unwrap_or(0.0)];
            row.extend((0..PRIOR_COLUMNS).filter(|&k| cols[k].is_some()).map(|k| col_value[k]));
            row.resize(1 + PRIOR_COLUMNS, 0.0);
            let rank_value = rank_open.unwrap_or(0.0);
            LayerPass { rank, cols, rank_value, col_value, out: candle_sum(&row) * l.inv_count }
        }
    }
}

/// Writes the layer's gradient for the upstream `g` into `d` (the bank's gradient).
fn layer_grad(pass: &LayerPass, l: &Coefs, g: f32, cost: PriorCost, d: &mut [f32]) {
    // d value of the rank term and of each column (autograd's index_add into zeros: 0 + v).
    let (d_rank, d_col): (f32, [f32; PRIOR_COLUMNS]) = match cost {
        PriorCost::Bops => {
            let b = pass.col_value;
            let d_total = g * l.inv_norm;
            let per_rank = (b[X] * b[A] * l.in_f + b[ACT_A] * b[E]) + b[ACT_E] * b[B] * l.out_f;
            let d_rank = d_total * per_rank;
            let d_per = d_total * pass.rank_value;
            let d_xw = d_total * l.base_macs;
            let d_xa = d_per * l.in_f;
            let d_eb = d_per * l.out_f;
            let mut d = [0f32; PRIOR_COLUMNS];
            d[X] = d_xa * b[A] + d_xw * b[W0];
            d[W0] = d_xw * b[X];
            d[A] = d_xa * b[X];
            d[ACT_A] = d_per * b[E];
            d[E] = d_per * b[ACT_A];
            d[ACT_E] = d_eb * b[B];
            d[B] = d_eb * b[ACT_E];
            (d_rank * 1.0 + 0.0, d.map(|v| 0.0 + v))
        }
        PriorCost::Const => {
            let ds = g * l.inv_count;
            (0.0 + ds, [0.0 + ds; PRIOR_COLUMNS])
        }
    };
    if let (Some(r), Some(at)) = (&pass.rank, l.rank) {
        let dc = vec![d_rank; r.c.len()];
        for (i, v) in r.grad(&dc, false).into_iter().enumerate() {
            d[at + i] = 0.0 + v;
        }
    }
    for (k, q) in pass.cols.iter().enumerate() {
        let (Some(q), Some(at)) = (q, l.cols[k]) else { continue };
        let dc: Vec<f32> = match cost {
            // E[bits] = Σ c_i·added_i·1 + 2: dc_i = (dv·1 + 0)·added_i.
            PriorCost::Bops => ADDED.iter().map(|a| (d_col[k] * 1.0 + 0.0) * a).collect(),
            PriorCost::Const => vec![d_col[k]; 4],
        };
        for (i, v) in q.grad(&dc, true).into_iter().enumerate() {
            d[at + i] = 0.0 + v;
        }
    }
}

/// [`gate_prior`]'s forward: input the bank, output `[L]`.
struct Prior {
    plan: GatePlan,
    cost: PriorCost,
}

/// Its backward: inputs the bank and the upstream gradient `[L]`; output the bank's gradient.
struct PriorGrad {
    plan: GatePlan,
    cost: PriorCost,
}

impl CustomOp1 for Prior {
    fn name(&self) -> &'static str {
        "gate-prior"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let bank = cpu_slice::<f32>(s, l)?;
        let p = &self.plan;
        let out: Vec<f32> =
            p.layers.iter().map(|c| layer_pass(bank, c, p.rank_len, &p.consts, self.cost).out).collect();
        Ok((CpuStorage::F32(out), Shape::from(p.len())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda::launch(&self.plan, self.cost, (s, l), None)?, Shape::from(self.plan.len())))
    }

    fn bwd(&self, bank: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = PriorGrad { plan: self.plan.clone(), cost: self.cost };
        Ok(Some(bank.apply_op2_no_bwd(&grad.contiguous()?, &op)?))
    }
}

impl CustomOp2 for PriorGrad {
    fn name(&self) -> &'static str {
        "gate-prior-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (bank, g) = (cpu_slice::<f32>(s1, l1)?, cpu_slice::<f32>(s2, l2)?);
        let p = &self.plan;
        if g.len() != p.len() {
            candle_core::bail!("gate_prior backward: gradient of {} values for {} layers", g.len(), p.len());
        }
        let mut d = vec![0f32; bank.len()];
        for (c, &gl) in p.layers.iter().zip(g) {
            let pass = layer_pass(bank, c, p.rank_len, &p.consts, self.cost);
            layer_grad(&pass, c, gl, self.cost, &mut d);
        }
        Ok((CpuStorage::F32(d), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        if l2.shape().elem_count() != self.plan.len() {
            candle_core::bail!("gate_prior backward: gradient {:?} for {} layers", l2.shape(), self.plan.len());
        }
        Ok((cuda::launch(&self.plan, self.cost, (s1, l1), Some((s2, l2)))?, l1.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::super::cuda::{contiguous_view, Kernel};
    use super::{GatePlan, PriorCost};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, Layout, Result, Storage};

    /// `GatePriorParams` in `kernels/gate_prior.cu`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    struct GatePriorParams {
        layers: u32,
        rank_len: u32,
        /// 0: bops, 1: const.
        cost: u32,
        logit_shift: f32,
        hard_off: f32,
        full_bits: f32,
    }
    // SAFETY: plain-old-data with the kernel's C layout.
    unsafe impl DeviceRepr for GatePriorParams {}

    /// `gate_prior_fwd(params, bank, meta, coefs, out [L])` or, with the upstream gradient,
    /// `gate_prior_bwd(params, bank, meta, coefs, g, d bank)`: a thread per layer.
    pub(super) fn launch(
        plan: &GatePlan,
        cost: PriorCost,
        bank: (&CudaStorage, &Layout),
        grad: Option<(&CudaStorage, &Layout)>,
    ) -> Result<CudaStorage> {
        let dev = bank.0.device().clone();
        let params = GatePriorParams {
            layers: u32::try_from(plan.len()).map_err(|_| candle_core::Error::Msg("gate_prior: layers".into()))?,
            rank_len: u32::try_from(plan.rank_len).map_err(|_| candle_core::Error::Msg("gate_prior: rank".into()))?,
            cost: match cost {
                PriorCost::Bops => 0,
                PriorCost::Const => 1,
            },
            logit_shift: plan.consts.logit_shift as f32,
            hard_off: plan.consts.hard_off as f32,
            full_bits: plan.consts.full_bits as f32,
        };
        let (ms, ml) = plan.meta.storage_and_layout();
        let (cs, cl) = plan.coefs.storage_and_layout();
        let (Storage::Cuda(ms), Storage::Cuda(cs)) = (&*ms, &*cs) else {
            candle_core::bail!("gate_prior: the plan must be on the bank's CUDA device")
        };
        let entry = if grad.is_some() { "gate_prior_bwd_f32" } else { "gate_prior_fwd_f32" };
        let func = Kernel::GatePrior.func(&dev, entry)?;
        let bank_v = contiguous_view::<f32>(bank.0, bank.1, "gate bank")?;
        let meta_v = contiguous_view::<u32>(ms, ml, "gate prior offsets")?;
        let coef_v = contiguous_view::<f32>(cs, cl, "gate prior coefficients")?;
        let threads = plan.len().clamp(1, 256) as u32;
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        let g_v = grad.map(|(gs, gl)| contiguous_view::<f32>(gs, gl, "gate prior gradient")).transpose()?;
        let mut out = match grad {
            // SAFETY: the forward writes all L values.
            None => unsafe { dev.alloc::<f32>(plan.len())? },
            // Zeros: the backward writes the gates that layers read.
            Some(_) => dev.alloc_zeros::<f32>(bank.1.shape().elem_count())?,
        };
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&func);
        b.arg(&params);
        b.arg(&bank_v);
        b.arg(&meta_v);
        b.arg(&coef_v);
        if let Some(g) = &g_v {
            b.arg(g);
        }
        b.arg(&mut out);
        // SAFETY: the argument list matches `gate_prior_fwd_f32` / `gate_prior_bwd_f32`.
        unsafe { b.launch(cfg) }.w()?;
        Ok(f32::wrap_cuda_slice(out, dev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`candle_sum`] is candle's CPU sum to the bit, at lengths on both sides of its 32-wide
    /// blocks.
    #[test]
    fn sums_in_candles_order() -> Result<()> {
        for n in [0usize, 1, 4, 9, 31, 32, 33, 63, 64, 100, 257] {
            let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.731).sin() * 10.0 + 0.1 * i as f32).collect();
            let want = Tensor::new(v.as_slice(), &Device::Cpu)?.sum_all()?.to_scalar::<f32>()?;
            assert_eq!(candle_sum(&v).to_bits(), want.to_bits(), "n {n}");
        }
        Ok(())
    }

    /// The gradient matches f32 central differences of the forward, away from the hard-off
    /// threshold (a step of the logits far from −2).
    #[test]
    fn gradient_matches_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let consts = PriorConsts { logit_shift: 1.5986, hard_off: -2.0, full_bits: 32.0 };
        let layers = [
            PriorLayer {
                rank: Some(0),
                bits: vec![(X, 3), (A, 7), (E, 11), (B, 15), (ACT_E, 19)],
                in_features: 3.0,
                out_features: 2.0,
                base_macs: 0.0,
                rank_full: 4.0,
                inv_norm: 0.01,
                inv_count: 1.0 / 23.0,
            },
            PriorLayer {
                rank: Some(23),
                bits: vec![(X, 26), (W0, 30)],
                in_features: 5.0,
                out_features: 4.0,
                base_macs: 20.0,
                rank_full: 4.0,
                inv_norm: 0.002,
                inv_count: 1.0 / 11.0,
            },
        ];
        let plan = GatePlan::new(&layers, 3, consts, &dev)?;
        let bank0: Vec<f32> = (0..34).map(|i| (i as f32 * 0.9).sin() * 1.5).collect();
        let w = Tensor::new(&[1.0f32, 0.5], &dev)?;
        for cost in [PriorCost::Bops, PriorCost::Const] {
            let v = candle_core::Var::new(bank0.as_slice(), &dev)?;
            let g = gate_prior(v.as_tensor(), &plan, cost)?.mul(&w)?.sum_all()?.backward()?;
            let g = g.get(v.as_tensor()).map(|t| t.to_vec1::<f32>()).transpose()?.unwrap_or_default();
            let at = |i: usize, d: f32| -> Result<f64> {
                let mut b = bank0.clone();
                b[i] += d;
                let p = gate_prior(&Tensor::new(b.as_slice(), &dev)?, &plan, cost)?.mul(&w)?.sum_all()?;
                Ok(f64::from(p.to_scalar::<f32>()?))
            };
            assert_eq!(g.len(), bank0.len());
            for (i, &gi) in g.iter().enumerate() {
                let eps = 1e-2f32;
                let fd = (at(i, eps)? - at(i, -eps)?) / (2.0 * f64::from(eps));
                let tol = 2e-3 * (1.0 + fd.abs());
                assert!((fd - f64::from(gi)).abs() <= tol, "{cost:?} gate {i}: fd {fd} vs {gi}");
            }
        }
        Ok(())
    }
}
