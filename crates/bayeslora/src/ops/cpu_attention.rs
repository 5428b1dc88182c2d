//! Attention on the CPU as one op per direction, multithreaded over batch × heads.
//!
//! The composed path ([`super::plain_attention`], and BERT's attention-dropout variant) runs
//! about ten candle ops per direction over `[B, H, T, S]` scores — copies of the transposed
//! keys, the scale, the bias broadcast, four softmax passes, the dropout product — serially, and
//! keeps several `[B, H, T, S]` tensors for the backward. [`CpuAttention`] instead works on one
//! (batch, head) at a time on a rayon task: `S = Q·Kᵀ` (one small GEMM), scale and mask, the
//! softmax and the dropout in place, `O = P·V` (a second GEMM) written straight into the output.
//! Only a `[T, S]` tile per task is ever live; the op keeps each row's max and Σexp (`[B, H, T]`)
//! and the dropout's keep mask (one byte per score, only when dropout is on) for the backward,
//! which recomputes P from Q and K (FlashAttention's recomputation; Dao 2022, arXiv 2205.14135).
//!
//! The GEMMs are candle's own (the `gemm` crate, single-threaded inside a task, with other
//! strides, so the sums may round differently in the last bit), and the softmax evaluates
//! candle's expressions in its order (`ops::softmax_last_dim`). The dropout mask is drawn from the same seeded `StdRng` sequence as `ops::dropout` over the
//! `[B, H, T, S]` probabilities, so runs reproduce. The backward is the closed form
//! `dS = P ∘ (dP − rowsum(dP ∘ P))`, equal to the composed backward up to rounding.
//!
//! q, k and v may come in the heads layout `[B, H, T, D]` or, to skip the split/merge copies of
//! a projection's output, in the token layout `[B, T, H·D]` ([`HeadLayout`]); the output and
//! the gradients keep their inputs' layouts.
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Where a (batch, head, token) row of D values lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeadLayout {
    /// `[B, H, T, D]` contiguous.
    Heads,
    /// `[B, T, H·D]` contiguous: a projection's output, heads side by side.
    Tokens,
}

/// Shapes and strides of one of q, k, v (or their gradients) in a [`HeadLayout`].
#[derive(Debug, Clone, Copy)]
struct Geometry {
    heads: usize,
    len: usize,
    dim: usize,
    layout: HeadLayout,
}

impl Geometry {
    /// Offset of row 0 of (batch b, head h).
    fn base(&self, b: usize, h: usize) -> usize {
        match self.layout {
            HeadLayout::Heads => (b * self.heads + h) * self.len * self.dim,
            HeadLayout::Tokens => b * self.len * self.heads * self.dim + h * self.dim,
        }
    }

    /// Distance between consecutive tokens of one head.
    fn row_stride(&self) -> usize {
        match self.layout {
            HeadLayout::Heads => self.dim,
            HeadLayout::Tokens => self.heads * self.dim,
        }
    }

    fn elems(&self, batch: usize) -> usize {
        batch * self.heads * self.len * self.dim
    }
}

/// The forward op on (q, k, v). The backward is [`CpuAttentionGrad`].
#[derive(Debug, Clone)]
pub(crate) struct CpuAttention {
    batch: usize,
    q: Geometry,
    kv: Geometry,
    /// `[B·S]`, 1 for real keys (None: all real).
    padding: Option<Arc<Vec<f32>>>,
    causal: bool,
    /// `(p, keep mask [B·H·T·S])`: the dropout on the probabilities.
    dropout: Option<(f32, Arc<Vec<u8>>)>,
    /// Per (b, h, t) row: max and Σexp of the scores, in f64 (exact for f32), set by the forward.
    stats: Arc<Mutex<Vec<f64>>>,
}

/// Whether [`attention`] applies: CPU f32/f64 tensors of one dtype.
pub(crate) fn applies(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    q.device().is_cpu()
        && matches!(q.dtype(), DType::F32 | DType::F64)
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype()
}

/// Attention of `q` (H heads) over `k`, `v` (Hkv heads, `H % Hkv == 0`), all in `layout`
/// (`Tokens`: `[B, T, H·D]` with `heads` given). `padding`: `[B, S]` f32 (1 = real).
/// `dropout`: `(p, seed)` on the probabilities, as `ops::dropout` on `[B, H, T, S]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layout: HeadLayout,
    heads: usize,
    kv_heads: usize,
    padding: Option<&Tensor>,
    causal: bool,
    dropout: Option<(f32, u64)>,
) -> Result<Tensor> {
    let (batch, len, dim, kv_len) = match layout {
        HeadLayout::Heads => {
            let (b, h, t, d) = q.dims4()?;
            let (bk, hk, s, dk) = k.dims4()?;
            if h != heads || hk != kv_heads || bk != b || dk != d {
                candle_core::bail!("attention: q {:?} and k {:?} do not fit", q.dims(), k.dims());
            }
            (b, t, d, s)
        }
        HeadLayout::Tokens => {
            let (b, t, c) = q.dims3()?;
            let (bk, s, ck) = k.dims3()?;
            if heads == 0 || !c.is_multiple_of(heads) || bk != b || ck * heads != c * kv_heads {
                candle_core::bail!(
                    "attention: q {:?} and k {:?} do not split into {heads}/{kv_heads} heads",
                    q.dims(),
                    k.dims()
                );
            }
            (b, t, c / heads, s)
        }
    };
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) || v.dims() != k.dims() {
        candle_core::bail!("attention: {heads} heads over {kv_heads} kv heads, k {:?}, v {:?}", k.dims(), v.dims());
    }
    let padding = match padding {
        Some(p) => {
            if p.dims() != [batch, kv_len] {
                candle_core::bail!("attention: padding {:?} is not [{batch}, {kv_len}]", p.dims());
            }
            Some(Arc::new(p.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?))
        }
        None => None,
    };
    let dropout = match dropout {
        Some((p, seed)) if p > 0.0 => Some((p, Arc::new(keep_mask(batch * heads * len * kv_len, p, seed)))),
        _ => None,
    };
    let op = CpuAttention {
        batch,
        q: Geometry { heads, len, dim, layout },
        kv: Geometry { heads: kv_heads, len: kv_len, dim, layout },
        padding,
        causal,
        dropout,
        stats: Arc::new(Mutex::new(Vec::new())),
    };
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// `ops::dropout`'s mask on the CPU: `StdRng::seed_from_u64(seed)`, one `f32` per element in
/// order, dropped when `< p` (1 = keep).
fn keep_mask(n: usize, p: f32, seed: u64) -> Vec<u8> {
    super::cpu::seeded_uniform_map(n, seed, |u| u8::from(u >= p))
}

/// The float types the op runs in, with candle's reduction order for a row sum.
trait Float: gemm_scalar::Scalar {
    fn row_sum(row: &[Self]) -> Self;
    /// `v[i] = e^v[i]`, as `exp` per element (f32: in SIMD lanes, libm's values, `ops::exp`).
    fn exp_in_place(v: &mut [Self]);
    fn storage(s: &CpuStorage) -> Option<&[Self]>;
    fn wrap(v: Vec<Self>) -> CpuStorage;
}

mod gemm_scalar {
    /// What the kernels need of f32/f64.
    pub trait Scalar:
        Copy
        + Send
        + Sync
        + Default
        + PartialOrd
        + 'static
        + std::ops::Add<Output = Self>
        + std::ops::Sub<Output = Self>
        + std::ops::Mul<Output = Self>
        + std::ops::Div<Output = Self>
    {
        fn from_f64(v: f64) -> Self;
        fn to_f64(self) -> f64;
    }
    impl Scalar for f32 {
        fn from_f64(v: f64) -> Self {
            v as f32
        }
        fn to_f64(self) -> f64 {
            self as f64
        }
    }
    impl Scalar for f64 {
        fn from_f64(v: f64) -> Self {
            v
        }
        fn to_f64(self) -> f64 {
            self
        }
    }
}

impl Float for f32 {
    fn row_sum(row: &[Self]) -> Self {
        super::cpu::row_sum(row)
    }
    fn exp_in_place(v: &mut [Self]) {
        super::exp::exp_in_place(v)
    }
    fn storage(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
    fn wrap(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(v)
    }
}

impl Float for f64 {
    fn row_sum(row: &[Self]) -> Self {
        row.iter().fold(0.0, |a, &v| a + v)
    }
    fn exp_in_place(v: &mut [Self]) {
        v.iter_mut().for_each(|x| *x = x.exp())
    }
    fn storage(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
    fn wrap(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F64(v)
    }
}

/// A raw pointer that rayon tasks write through, each into its own disjoint rows.
#[derive(Clone, Copy)]
struct Out<T>(*mut T);
// SAFETY: every task writes a disjoint set of elements (its own (batch, head) rows).
unsafe impl<T> Send for Out<T> {}
unsafe impl<T> Sync for Out<T> {}

impl<T> Out<T> {
    /// The pointer (a method, so closures capture the `Sync` wrapper, not the raw field).
    fn get(self) -> *mut T {
        self.0
    }
}

/// `dst[m×n] (row stride dst_rs) = beta · lhs[m×k] · rhs[k×n] (+ dst when accumulate)`, one
/// thread. Strides are (row, column) in elements.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul<T: Float>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const T,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const T,
    (rhs_rs, rhs_cs): (usize, usize),
    beta: T,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        T::from_f64(1.0),
        beta,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// Large negative bias of a masked score, as `AttentionMask::bias` (finite: a fully masked row
/// stays finite).
const NEG: f32 = -1e9;

impl CpuAttention {
    /// The additive bias of key j for query i of batch b, built as `AttentionMask::bias` does
    /// (`(0 + causal) + padding`, in f32).
    fn bias(&self, b: usize, i: usize, j: usize) -> f32 {
        let fut = if self.causal && j > i { NEG } else { 0.0 };
        let pad = match &self.padding {
            Some(p) => p[b * self.kv.len + j] * -NEG + NEG,
            None => 0.0,
        };
        (0.0 + fut) + pad
    }

    fn masked(&self) -> bool {
        self.causal || self.padding.is_some()
    }

    /// Scores `s = (q·kᵀ)·scale + bias` of (b, h) into `s: [T, S]`.
    unsafe fn scores<T: Float>(&self, q: &[T], k: &[T], b: usize, h: usize, s: &mut [T]) {
        let (t, sl, d) = (self.q.len, self.kv.len, self.q.dim);
        let kvh = h / (self.q.heads / self.kv.heads);
        let qp = q.as_ptr().add(self.q.base(b, h));
        let kp = k.as_ptr().add(self.kv.base(b, kvh));
        let one = T::from_f64(1.0);
        matmul((t, sl, d), s.as_mut_ptr(), sl, false, qp, (self.q.row_stride(), 1), kp, (1, self.kv.row_stride()), one);
        let scale = T::from_f64(1.0 / (d as f64).sqrt());
        let masked = self.masked();
        for (i, row) in s.chunks_exact_mut(sl).enumerate() {
            for (j, x) in row.iter_mut().enumerate() {
                // affine(scale, 0), then the f32 bias (as f64 for f64 scores).
                *x = *x * scale + T::default();
                if masked {
                    *x = *x + T::from_f64(self.bias(b, i, j) as f64);
                }
            }
        }
    }

    /// Softmax of each row of `s` in place given its (max, Σexp): `exp(x − max) / Σ`.
    fn softmax<T: Float>(&self, s: &mut [T], stats: &[f64]) {
        let sl = self.kv.len;
        for (i, row) in s.chunks_exact_mut(sl).enumerate() {
            let max = T::from_f64(stats[2 * i]);
            row.iter_mut().for_each(|x| *x = *x - max);
        }
        T::exp_in_place(s);
        for (i, row) in s.chunks_exact_mut(sl).enumerate() {
            let sum = T::from_f64(stats[2 * i + 1]);
            row.iter_mut().for_each(|x| *x = *x / sum);
        }
    }

    fn apply_dropout<T: Float>(&self, s: &mut [T], b: usize, h: usize) {
        if let Some((p, keep)) = &self.dropout {
            let n = s.len();
            let scale = T::from_f64((1.0 / (1.0 - p)) as f64);
            let keep = &keep[(b * self.q.heads + h) * n..][..n];
            for (x, &kp) in s.iter_mut().zip(keep) {
                *x = *x * if kp == 1 { scale } else { T::default() };
            }
        }
    }

    fn fwd<T: Float>(&self, q: &[T], k: &[T], v: &[T]) -> Result<Vec<T>> {
        let (t, sl, d) = (self.q.len, self.kv.len, self.q.dim);
        let (batch, heads) = (self.batch, self.q.heads);
        // Zeroed by the pool (calloc's memset of the whole output ran on the calling thread).
        let mut out: Vec<T> = super::cpu::par_build(self.q.elems(batch), 1 << 14, |_, _| ());
        let mut stats = vec![0f64; batch * heads * t * 2];
        let optr = Out(out.as_mut_ptr());
        stats.par_chunks_mut(t * 2).enumerate().for_each(|(bh, st)| {
            let (b, h) = (bh / heads, bh % heads);
            let mut s = vec![T::default(); t * sl];
            // SAFETY: q, k, v hold every row that `base`/`row_stride` address (shapes checked).
            unsafe { self.scores(q, k, b, h, &mut s) };
            // candle's softmax: max, exp(x − max), Σ in its order, then the division (the
            // exps of the whole tile at once, in SIMD lanes).
            for (i, row) in s.chunks_exact_mut(sl).enumerate() {
                let max = row.iter().copied().fold(row[0], |m, x| if x > m { x } else { m });
                row.iter_mut().for_each(|x| *x = *x - max);
                st[2 * i] = max.to_f64();
            }
            T::exp_in_place(&mut s);
            for (i, row) in s.chunks_exact_mut(sl).enumerate() {
                let sum = T::row_sum(row);
                row.iter_mut().for_each(|x| *x = *x / sum);
                st[2 * i + 1] = sum.to_f64();
            }
            self.apply_dropout(&mut s, b, h);
            let kvh = h / (heads / self.kv.heads);
            // SAFETY: (b, h)'s output rows are written by this task only.
            unsafe {
                let vp = v.as_ptr().add(self.kv.base(b, kvh));
                let op = optr.get().add(self.q.base(b, h));
                matmul(
                    (t, d, sl),
                    op,
                    self.q.row_stride(),
                    false,
                    s.as_ptr(),
                    (sl, 1),
                    vp,
                    (self.kv.row_stride(), 1),
                    T::from_f64(1.0),
                );
            }
        });
        *self.stats.lock().map_err(|_| candle_core::Error::msg("attention: stats lock poisoned"))? = stats;
        Ok(out)
    }
}

fn slice<'a, T: Float>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [T]> {
    let Some(v) = T::storage(s) else { candle_core::bail!("attention: {what} has dtype {:?}", s.dtype()) };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&v[start..end]),
        None => candle_core::bail!("attention: {what} must be contiguous"),
    }
}

impl CustomOp3 for CpuAttention {
    fn name(&self) -> &'static str {
        "cpu-attention"
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
        let out = match s1.dtype() {
            DType::F32 => f32::wrap(self.fwd(slice(s1, l1, "q")?, slice(s2, l2, "k")?, slice(s3, l3, "v")?)?),
            DType::F64 => f64::wrap(self.fwd(slice(s1, l1, "q")?, slice(s2, l2, "k")?, slice(s3, l3, "v")?)?),
            other => candle_core::bail!("attention: unsupported dtype {other:?}"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = CpuAttentionGrad { fwd: self.clone(), grad: grad.contiguous()? };
        let all = q.apply_op3_no_bwd(k, v, &op)?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let dq = all.narrow(0, 0, nq)?.reshape(q.shape())?;
        let dk = all.narrow(0, nq, nk)?.reshape(k.shape())?;
        let dv = all.narrow(0, nq + nk, nk)?.reshape(v.shape())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// `(dq, dk, dv)` flattened one after the other, from (q, k, v) and the output gradient.
struct CpuAttentionGrad {
    fwd: CpuAttention,
    grad: Tensor,
}

impl CpuAttentionGrad {
    fn bwd<T: Float>(&self, q: &[T], k: &[T], v: &[T], go: &[T]) -> Result<Vec<T>> {
        let a = &self.fwd;
        let stats = a.stats.lock().map_err(|_| candle_core::Error::msg("attention: stats lock poisoned"))?;
        let (t, sl, d) = (a.q.len, a.kv.len, a.q.dim);
        let (batch, heads, kv_heads) = (a.batch, a.q.heads, a.kv.heads);
        if stats.len() != batch * heads * t * 2 {
            candle_core::bail!("attention: backward before forward");
        }
        let group = heads / kv_heads;
        let (nq, nk) = (a.q.elems(batch), a.kv.elems(batch));
        let mut all: Vec<T> = super::cpu::par_build(nq + 2 * nk, 1 << 14, |_, _| ());
        let ptr = Out(all.as_mut_ptr());
        let scale = T::from_f64(1.0 / (d as f64).sqrt());
        let one = T::from_f64(1.0);
        (0..batch * kv_heads).into_par_iter().for_each(|bg| {
            let (b, g) = (bg / kv_heads, bg % kv_heads);
            let (mut s, mut dp) = (vec![T::default(); t * sl], vec![T::default(); t * sl]);
            let mut dropped = if a.dropout.is_some() { vec![T::default(); t * sl] } else { Vec::new() };
            let (mut dk, mut dv) = (vec![T::default(); sl * d], vec![T::default(); sl * d]);
            let (qrs, kvrs) = (a.q.row_stride(), a.kv.row_stride());
            for h in g * group..(g + 1) * group {
                let st = &stats[(b * heads + h) * t * 2..][..t * 2];
                let first = h == g * group;
                // SAFETY: pointers address rows of (b, h) / (b, g) inside their buffers; the
                // dq rows of (b, h) and the dk/dv rows of (b, g) are written by this task only.
                unsafe {
                    // P, recomputed as the forward did; P ∘ M when dropout is on.
                    a.scores(q, k, b, h, &mut s);
                    a.softmax(&mut s, st);
                    let pd = if a.dropout.is_some() {
                        dropped.copy_from_slice(&s);
                        a.apply_dropout(&mut dropped, b, h);
                        &dropped
                    } else {
                        &s
                    };
                    let gp = go.as_ptr().add(a.q.base(b, h));
                    let vp = v.as_ptr().add(a.kv.base(b, g));
                    let kp = k.as_ptr().add(a.kv.base(b, g));
                    let qp = q.as_ptr().add(a.q.base(b, h));
                    // dV += (P∘M)ᵀ · dO
                    matmul((sl, d, t), dv.as_mut_ptr(), d, !first, pd.as_ptr(), (1, sl), gp, (qrs, 1), one);
                    // dP = (dO · Vᵀ) ∘ M
                    matmul((t, sl, d), dp.as_mut_ptr(), sl, false, gp, (qrs, 1), vp, (1, kvrs), one);
                    a.apply_dropout(&mut dp, b, h);
                    // dS = P ∘ (dP − Σ_j dP∘P), in place in dp.
                    for (pr, dr) in s.chunks_exact(sl).zip(dp.chunks_exact_mut(sl)) {
                        let dot = pr.iter().zip(dr.iter()).fold(T::default(), |acc, (&p, &g)| acc + p * g);
                        for (g, &p) in dr.iter_mut().zip(pr) {
                            *g = p * (*g - dot);
                        }
                    }
                    // dQ = scale · dS · K, dK += scale · dSᵀ · Q
                    let dqp = ptr.get().add(a.q.base(b, h));
                    matmul((t, d, sl), dqp, qrs, false, dp.as_ptr(), (sl, 1), kp, (kvrs, 1), scale);
                    matmul((sl, d, t), dk.as_mut_ptr(), d, !first, dp.as_ptr(), (1, sl), qp, (qrs, 1), scale);
                }
            }
            for (buf, off) in [(&dk, nq), (&dv, nq + nk)] {
                for (j, row) in buf.chunks_exact(d).enumerate() {
                    // SAFETY: rows of (b, g) in dk/dv, written by this task only.
                    unsafe {
                        let dst = ptr.get().add(off + a.kv.base(b, g) + j * kvrs);
                        std::ptr::copy_nonoverlapping(row.as_ptr(), dst, d);
                    }
                }
            }
        });
        Ok(all)
    }
}

impl CustomOp3 for CpuAttentionGrad {
    fn name(&self) -> &'static str {
        "cpu-attention-grad"
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
        let (gs, gl) = self.grad.storage_and_layout();
        let Storage::Cpu(gs) = &*gs else { candle_core::bail!("attention: gradient is not on the CPU") };
        if gl.shape() != l1.shape() {
            candle_core::bail!("attention: gradient {:?} is not q's shape {:?}", gl.shape(), l1.shape());
        }
        let n = l1.shape().elem_count() + 2 * l2.shape().elem_count();
        let out = match s1.dtype() {
            DType::F32 => f32::wrap(self.bwd(
                slice(s1, l1, "q")?,
                slice(s2, l2, "k")?,
                slice(s3, l3, "v")?,
                slice(gs, gl, "gradient")?,
            )?),
            DType::F64 => f64::wrap(self.bwd(
                slice(s1, l1, "q")?,
                slice(s2, l2, "k")?,
                slice(s3, l3, "v")?,
                slice(gs, gl, "gradient")?,
            )?),
            other => candle_core::bail!("attention: unsupported dtype {other:?}"),
        };
        Ok((out, Shape::from(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::check_grad;
    use crate::ops::{plain_attention, AttentionMask};
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F64)?.to_scalar::<f64>()
    }

    /// `[B, H, T, D]` → `[B, T, H·D]`.
    fn tokens(x: &Tensor) -> Result<Tensor> {
        let (b, h, t, d) = x.dims4()?;
        x.transpose(1, 2)?.contiguous()?.reshape((b, t, h * d))
    }

    /// The composed reference with dropout on the probabilities, as BERT's training path.
    fn composed(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &AttentionMask,
        dropout: Option<(f32, u64)>,
    ) -> Result<Tensor> {
        let Some((p, seed)) = dropout else { return plain_attention(q, k, v, mask) };
        // Grouped-query: each key/value head repeated H / Hkv times consecutively (HF order).
        let repeat = |x: &Tensor| -> Result<Tensor> {
            let (b, hkv, s, d) = x.dims4()?;
            let n = q.dim(1)? / hkv;
            x.unsqueeze(2)?.broadcast_as((b, hkv, n, s, d))?.reshape((b, hkv * n, s, d))
        };
        let (k, v) = (&repeat(k)?, &repeat(v)?);
        let scale = 1.0 / (q.dim(3)? as f64).sqrt();
        let dt = crate::ops::stats_dtype(q.dtype());
        let scores = q.matmul(&k.t()?.contiguous()?)?.affine(scale, 0.0)?.to_dtype(dt)?;
        let probs = crate::ops::softmax_last_dim(&scores.broadcast_add(&mask.bias()?.to_dtype(dt)?)?)?;
        crate::ops::dropout(&probs, p, seed)?.to_dtype(q.dtype())?.matmul(v)
    }

    /// Forward values and q/k/v gradients of the fused op
    /// in both layouts against the composed path, with padding, causality, GQA and dropout.
    #[test]
    fn matches_the_composed_path_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        let pad = Tensor::new(&[[1f32, 1., 1., 1., 1., 0., 0.], [1., 1., 1., 1., 1., 1., 1.]], &dev)?;
        let cases = [
            (4, 4, false, None),
            (4, 2, true, None),
            (4, 4, false, Some((0.3f32, 11u64))),
            (2, 1, true, Some((0.1, 5))),
        ];
        for dtype in [DType::F32, DType::F64] {
            for &(h, hkv, causal, dropout) in &cases {
                let (b, t, d) = (2, 7, 8);
                let mask = AttentionMask::new(Some(&pad), causal, b, t, &dev)?;
                let q = Var::from_tensor(&Tensor::randn(0f64, 1.0, (b, h, t, d), &dev)?.to_dtype(dtype)?)?;
                let k = Var::from_tensor(&Tensor::randn(0f64, 1.0, (b, hkv, t, d), &dev)?.to_dtype(dtype)?)?;
                let v = Var::from_tensor(&Tensor::randn(0f64, 1.0, (b, hkv, t, d), &dev)?.to_dtype(dtype)?)?;
                let w = Tensor::randn(0f64, 1.0, (b, h, t, d), &dev)?.to_dtype(dtype)?;
                let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
                let want = composed(qt, kt, vt, &mask, dropout)?;
                let heads = attention(qt, kt, vt, HeadLayout::Heads, h, hkv, mask.padding(), causal, dropout)?;
                let tok = attention(
                    &tokens(qt)?,
                    &tokens(kt)?,
                    &tokens(vt)?,
                    HeadLayout::Tokens,
                    h,
                    hkv,
                    mask.padding(),
                    causal,
                    dropout,
                )?;
                let tok_heads = tok.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous()?;
                let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
                assert!(max_diff(&heads, &want)? < tol, "{dtype:?} h {h}/{hkv} causal {causal} forward");
                assert!(max_diff(&tok_heads, &want)? < tol, "{dtype:?} tokens layout forward");
                let gw = want.mul(&w)?.sum_all()?.backward()?;
                let gh = heads.mul(&w)?.sum_all()?.backward()?;
                let gt = tok_heads.mul(&w)?.sum_all()?.backward()?;
                for (name, var) in [("dq", &q), ("dk", &k), ("dv", &v)] {
                    let want = gw.get(var.as_tensor()).expect("composed grad");
                    let got = gh.get(var.as_tensor()).expect("fused grad");
                    let got_t = gt.get(var.as_tensor()).expect("fused grad (tokens)");
                    assert!(
                        max_diff(got, want)? < 10.0 * tol,
                        "{dtype:?} h {h}/{hkv} {name}: {}",
                        max_diff(got, want)?
                    );
                    assert!(max_diff(got_t, want)? < 10.0 * tol, "{dtype:?} tokens {name}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let pad = Tensor::new(&[[1f32, 1., 1., 0.], [1., 1., 1., 1.]], &dev)?;
        let mask = AttentionMask::new(Some(&pad), true, 2, 4, &dev)?;
        let k = Tensor::randn(0f64, 1.0, (2, 1, 4, 3), &dev)?;
        let v = Tensor::randn(0f64, 1.0, (2, 1, 4, 3), &dev)?;
        let q = Tensor::randn(0f64, 1.0, (2, 2, 4, 3), &dev)?;
        let f = |q: &Tensor, k: &Tensor, v: &Tensor| {
            attention(q, k, v, HeadLayout::Heads, 2, 1, mask.padding(), true, Some((0.25, 3)))
        };
        assert!(check_grad(&[2, 2, 4, 3], &|q| f(q, &k, &v))? < 1e-6);
        assert!(check_grad(&[2, 1, 4, 3], &|k| f(&q, k, &v))? < 1e-6);
        assert!(check_grad(&[2, 1, 4, 3], &|v| f(&q, &k, v))? < 1e-6);
        Ok(())
    }
}
