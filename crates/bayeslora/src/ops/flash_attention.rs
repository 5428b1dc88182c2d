//! Memory-efficient attention on CUDA (FlashAttention-2, Dao 2023): forward and backward
//! kernels (`kernels/flash_attention.cu`) that stream key/value tiles through shared memory with
//! an online softmax, so the `[B, H, T, S]` scores and probabilities are never materialised.
//!
//! Why: the plain path ([`super::plain_attention`]) materialises scores, probabilities and their
//! gradients — O(T²) memory per head and several full passes over it, which dominates a training
//! step at T ≥ 512 (and runs out of memory at 7B shapes). Here memory is O(T) per row: the
//! output, plus two f32 statistics per query row (row max m and log Σ exp) kept inside the op for
//! the backward, which recomputes the probabilities tile by tile.
//!
//! Semantics are exactly the plain path's (the CPU reference): scores `q·k/√D` plus the additive
//! bias of [`AttentionMask`] (−1e9 for a padded key, −1e9 for a future key), in f32 whatever the
//! input dtype, so rows with no visible key (padding queries) behave the same too. f32
//! accumulation always; the output has q's dtype. Grouped-query attention reads kv head
//! `h / (H / Hkv)` directly (no repeat); the backward accumulates dK/dV of a kv head over its
//! query heads in one block.
//!
//! [`super::attention`] takes this path for CUDA tensors of dtype f32/bf16/f16 with head dim
//! 32, 64 or 128, unless the environment variable `BAYESLORA_PLAIN_ATTENTION=1` is set (A/B
//! benchmarks, debugging); everything else takes the plain path.
//!
//! bf16 and f16 compute every tile product on the tensor cores (`mma.sync` m16n8k16, f32
//! accumulators; P and dS rounded to the input dtype as operands, as FlashAttention-2 does), with
//! tiles staged by `cp.async`; the softmax and its statistics stay in f32. Their backward runs
//! as two kernels, dK/dV per key tile and dQ per query tile, without atomics (f32 atomics for dQ
//! cost more than all the tile products at T = 2048), so their gradients are deterministic. f32
//! inputs take register-tiled f32 FMA kernels (same tiling and masking, dQ through f32 atomics).
//! Before the tensor cores, bf16 took 26 ms at (B, H, T, D) = (4, 32, 2048, 128) causal
//! forward+backward on an H200.
use super::attention::AttentionMask;
use candle_core::{DType, Result, Tensor};

/// Set to `1` to force the plain (materialised-scores) attention on CUDA.
pub const PLAIN_ATTENTION_ENV: &str = "BAYESLORA_PLAIN_ATTENTION";

/// Head dims the kernels are compiled for.
pub const FLASH_HEAD_DIMS: [usize; 3] = [32, 64, 128];

/// Whether `BAYESLORA_PLAIN_ATTENTION` asks for the plain path (`1`/`true`).
pub fn plain_attention_forced() -> bool {
    std::env::var(PLAIN_ATTENTION_ENV).is_ok_and(|v| matches!(v.trim(), "1" | "true" | "yes"))
}

/// Whether [`flash_attention`] can run `q [B, H, T, D]`, `k`/`v` `[B, Hkv, S, D]` under `mask`:
/// built with `cuda`, a CUDA device, f32/bf16/f16 everywhere, D ∈ [`FLASH_HEAD_DIMS`], and shapes
/// that agree with each other and with the mask. (Ignores [`PLAIN_ATTENTION_ENV`].)
pub fn flash_supported(q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask) -> bool {
    if !cfg!(feature = "cuda") || !q.device().is_cuda() {
        return false;
    }
    let dtype = q.dtype();
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) || k.dtype() != dtype || v.dtype() != dtype {
        return false;
    }
    let (Ok((b, h, t, d)), Ok((bk, hkv, s, dk))) = (q.dims4(), k.dims4()) else { return false };
    v.dims() == k.dims()
        && b == bk
        && d == dk
        && FLASH_HEAD_DIMS.contains(&d)
        && hkv > 0
        && h % hkv == 0
        && mask.batch() == b
        && mask.len() == s
        && (!mask.causal() || t == s)
        && k.device().same_device(q.device())
        && v.device().same_device(q.device())
}

/// `softmax(q·kᵀ/√D + mask)·v` with the fused kernels; `q: [B, H, T, D]`, `k`/`v`:
/// `[B, Hkv, S, D]` → `[B, H, T, D]` in q's dtype. Differentiable in q, k and v. Errors unless
/// [`flash_supported`].
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask) -> Result<Tensor> {
    if !flash_supported(q, k, v, mask) {
        candle_core::bail!(
            "flash attention needs CUDA (--features cuda), f32/bf16/f16 and head dim in {FLASH_HEAD_DIMS:?}, got q {:?} \
             {:?} on {:?}, k {:?}, v {:?}, mask batch {} len {}",
            q.dims(),
            q.dtype(),
            q.device().location(),
            k.dims(),
            v.dims(),
            mask.batch(),
            mask.len()
        );
    }
    #[cfg(feature = "cuda")]
    {
        imp::forward(q, k, v, mask)
    }
    #[cfg(not(feature = "cuda"))]
    {
        unreachable!("flash_supported is false without the cuda feature")
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use super::super::cuda::{contiguous_view, dtype_suffix, Kernel};
    use super::AttentionMask;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
    use candle_core::cuda_backend::cudarc::driver::{CudaFunction, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
    use candle_core::op::BackpropOp;
    use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
    use std::sync::Mutex;

    /// Tile sizes and block size of the f32 kernels; `BQ`, `BK`, `NT` in the `.cu` file.
    const BQ: usize = 64;
    const BK: usize = 64;
    const NT: u32 = 256;
    /// Block size of the tensor-core (bf16/f16) kernels: `TC_THREADS`.
    const TC_THREADS: u32 = 128;

    /// The kernels' arguments; `struct FlashParams` in `kernels/flash_attention.cu`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    struct FlashParams {
        b: u32,
        h: u32,
        hkv: u32,
        t: u32,
        s: u32,
        causal: u32,
        scale: f32,
        pad_: u32,
    }

    // SAFETY: plain-old-data with the same C layout as the kernel's struct.
    unsafe impl DeviceRepr for FlashParams {}

    /// Threads per block and dynamic shared memory of the forward kernel for `dtype`. f32: f32
    /// tiles Q, K, V with row stride D + 1, probabilities with row stride BK + 1, key biases.
    /// bf16/f16 (`tc_fwd_smem` in the `.cu` file): Q, and K, V double-buffered, in the dtype with
    /// row stride D + 8; key biases double-buffered; one int.
    fn fwd_launch(dtype: DType, d: usize) -> (u32, usize) {
        if dtype == DType::F32 {
            (NT, 4 * (BQ * (d + 1) + 2 * BK * (d + 1) + BQ * (BK + 1) + BK))
        } else {
            (TC_THREADS, 5 * BQ * (d + 8) * 2 + 2 * BK * 4 + 16)
        }
    }

    /// Dynamic shared memory of the f32 backward kernel (`NT` threads): K, V, Q, dO tiles, P and
    /// dS, key biases, three per-row statistics.
    fn bwd_smem_f32(d: usize) -> usize {
        4 * (2 * BK * (d + 1) + 2 * BQ * (d + 1) + 2 * BQ * (BK + 1) + BK + 3 * BQ)
    }

    /// Dynamic shared memory of the tensor-core dK/dV kernel (`tc_bwd_kv_smem`): K, V, and Q, dO
    /// double-buffered, in the dtype with row stride D + 8; three per-row statistics
    /// double-buffered; key biases; one int.
    fn bwd_kv_smem(d: usize) -> usize {
        6 * BQ * (d + 8) * 2 + 2 * 3 * BQ * 4 + BK * 4 + 16
    }

    /// Dynamic shared memory of the tensor-core dQ kernel (`tc_bwd_dq_smem`): Q, dO, and K, V
    /// double-buffered (row stride D + 8); key biases double-buffered; one int.
    fn bwd_dq_smem(d: usize) -> usize {
        6 * BQ * (d + 8) * 2 + 2 * BK * 4 + 16
    }

    fn load(dev: &CudaDevice, name: &str, smem: usize) -> Result<CudaFunction> {
        let func = Kernel::FlashAttention.func(dev, name)?;
        if smem > 48 * 1024 {
            func.set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
                .w()?;
        }
        Ok(func)
    }

    fn grid(x: usize, y: usize, threads: u32, smem: usize) -> LaunchConfig {
        LaunchConfig { grid_dim: (x as u32, y as u32, 1), block_dim: (threads, 1, 1), shared_mem_bytes: smem as u32 }
    }

    /// `t` contiguous and, for the tensor-core kernels' 16-byte loads, starting at a multiple of 8
    /// elements of its storage (a copy otherwise; only odd views need one).
    fn kernel_ready(t: &Tensor) -> Result<Tensor> {
        let t = t.contiguous()?;
        if t.dtype() != DType::F32 && t.layout().start_offset() % 8 != 0 {
            return t.force_contiguous();
        }
        Ok(t)
    }

    fn cuda_storage<'a>(s: &'a Storage, what: &str) -> Result<&'a CudaStorage> {
        match s {
            Storage::Cuda(s) => Ok(s),
            _ => candle_core::bail!("flash attention: {what} is not on a CUDA device"),
        }
    }

    fn tensor(s: CudaStorage, shape: &[usize]) -> Tensor {
        Tensor::from_storage(Storage::Cuda(s), shape, BackpropOp::none(), false)
    }

    /// The op on (q, k, v): output O, and the per-row statistics kept for the backward.
    struct FlashAttn {
        causal: bool,
        scale: f32,
        /// `[B, S]` f32 contiguous, 1 = real key.
        key_valid: Tensor,
        /// `[2, B, H, T]` f32 (row max, then log of the row sum), set by `cuda_fwd`.
        stats: Mutex<Option<CudaStorage>>,
    }

    impl FlashAttn {
        fn params(&self, q: &Layout, k: &Layout) -> Result<(FlashParams, usize)> {
            let (b, h, t, d) = q.shape().dims4()?;
            let (_, hkv, s, _) = k.shape().dims4()?;
            let p = FlashParams {
                b: b as u32,
                h: h as u32,
                hkv: hkv as u32,
                t: t as u32,
                s: s as u32,
                causal: self.causal as u32,
                scale: self.scale,
                pad_: 0,
            };
            Ok((p, d))
        }

        fn fwd<T: CudaDType + DeviceRepr>(
            &self,
            (qs, ql): (&CudaStorage, &Layout),
            (ks, kl): (&CudaStorage, &Layout),
            (vs, vl): (&CudaStorage, &Layout),
        ) -> Result<(CudaStorage, CudaStorage)> {
            let (p, d) = self.params(ql, kl)?;
            let dev = qs.device().clone();
            let (pad_guard, pad_layout) = self.key_valid.storage_and_layout();
            let pad =
                contiguous_view::<f32>(cuda_storage(&pad_guard, "the padding mask")?, pad_layout, "the padding mask")?;
            let (q, k, v) = (
                contiguous_view::<T>(qs, ql, "q")?,
                contiguous_view::<T>(ks, kl, "k")?,
                contiguous_view::<T>(vs, vl, "v")?,
            );
            let (bh, t) = ((p.b * p.h) as usize, p.t as usize);
            // SAFETY: the kernel writes every element of o (rows < T) and of stats.
            let o = unsafe { dev.alloc::<T>(bh * t * d)? };
            let stats = unsafe { dev.alloc::<f32>(2 * bh * t)? };
            let (threads, smem) = fwd_launch(qs.dtype(), d);
            let func = load(&dev, &format!("flash_fwd_{}_d{d}", dtype_suffix(qs.dtype())?), smem)?;
            let stream = dev.cuda_stream();
            let mut builder = stream.launch_builder(&func);
            builder.arg(&p);
            builder.arg(&q);
            builder.arg(&k);
            builder.arg(&v);
            builder.arg(&pad);
            builder.arg(&o);
            builder.arg(&stats);
            // SAFETY: the arguments match `flash_fwd_*` in flash_attention.cu.
            unsafe { builder.launch(grid(t.div_ceil(BQ), bh, threads, smem)) }.w()?;
            Ok((T::wrap_cuda_slice(o, dev.clone()), CudaStorage::wrap_cuda_slice(stats, dev)))
        }

        /// (dq, dk, dv) from the saved statistics; every input contiguous.
        fn bwd_impl<T: CudaDType + DeviceRepr>(
            &self,
            q: &Tensor,
            k: &Tensor,
            v: &Tensor,
            o: &Tensor,
            dout: &Tensor,
        ) -> Result<(Tensor, Tensor, Tensor)> {
            let stats_guard =
                self.stats.lock().map_err(|_| candle_core::Error::Msg("flash attention: poisoned".into()))?;
            let Some(stats) = stats_guard.as_ref() else {
                candle_core::bail!("flash attention: backward before a CUDA forward")
            };
            let stats = stats.as_cuda_slice::<f32>()?;
            let (qg, ql) = q.storage_and_layout();
            let (kg, kl) = k.storage_and_layout();
            let (vg, vl) = v.storage_and_layout();
            let (og, ol) = o.storage_and_layout();
            let (gg, gl) = dout.storage_and_layout();
            let (pg, pl) = self.key_valid.storage_and_layout();
            let qs = cuda_storage(&qg, "q")?;
            let dev = qs.device().clone();
            let (p, d) = self.params(ql, kl)?;
            let qv = contiguous_view::<T>(qs, ql, "q")?;
            let kv = contiguous_view::<T>(cuda_storage(&kg, "k")?, kl, "k")?;
            let vv = contiguous_view::<T>(cuda_storage(&vg, "v")?, vl, "v")?;
            let ov = contiguous_view::<T>(cuda_storage(&og, "the output")?, ol, "the output")?;
            let gv = contiguous_view::<T>(cuda_storage(&gg, "the output gradient")?, gl, "the output gradient")?;
            let pad = contiguous_view::<f32>(cuda_storage(&pg, "the padding mask")?, pl, "the padding mask")?;
            let stream = dev.cuda_stream();
            let name = dtype_suffix(qs.dtype())?;
            let rows = (p.b * p.h * p.t) as usize;
            let (bhkv, s) = ((p.b * p.hkv) as usize, p.s as usize);

            // delta_i = Σ_d dO ∘ O, one warp per row.
            // SAFETY: written for every row.
            let delta = unsafe { dev.alloc::<f32>(rows)? };
            {
                let func = load(&dev, &format!("flash_bwd_delta_{name}"), 0)?;
                let mut b = stream.launch_builder(&func);
                let (rows_u, d_u) = (rows as u32, d as u32);
                b.arg(&rows_u);
                b.arg(&d_u);
                b.arg(&ov);
                b.arg(&gv);
                b.arg(&delta);
                let cfg = LaunchConfig {
                    grid_dim: (rows.div_ceil((NT / 32) as usize) as u32, 1, 1),
                    block_dim: (NT, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: matches `flash_bwd_delta_*`.
                unsafe { b.launch(cfg) }.w()?;
            }

            // SAFETY: the kernels write every row < S of dk and dv and every row of dq.
            let dk = unsafe { dev.alloc::<T>(bhkv * s * d)? };
            let dv = unsafe { dev.alloc::<T>(bhkv * s * d)? };
            let dq = if qs.dtype() == DType::F32 {
                // dK and dV, and dQ accumulated by f32 atomics into a zeroed buffer.
                let dq_acc = dev.alloc_zeros::<f32>(rows * d)?;
                let smem = bwd_smem_f32(d);
                let func = load(&dev, &format!("flash_bwd_{name}_d{d}"), smem)?;
                let mut b = stream.launch_builder(&func);
                b.arg(&p);
                b.arg(&qv);
                b.arg(&kv);
                b.arg(&vv);
                b.arg(&pad);
                b.arg(&gv);
                b.arg(stats);
                b.arg(&delta);
                b.arg(&dq_acc);
                b.arg(&dk);
                b.arg(&dv);
                // SAFETY: matches `flash_bwd_f32_*`.
                unsafe { b.launch(grid(s.div_ceil(BK), bhkv, NT, smem)) }.w()?;
                CudaStorage::wrap_cuda_slice(dq_acc, dev.clone())
            } else {
                // dK and dV per key tile, then dQ per query tile: no atomics, no f32 buffer.
                let smem = bwd_kv_smem(d);
                let func = load(&dev, &format!("flash_bwd_{name}_d{d}"), smem)?;
                let mut b = stream.launch_builder(&func);
                b.arg(&p);
                b.arg(&qv);
                b.arg(&kv);
                b.arg(&vv);
                b.arg(&pad);
                b.arg(&gv);
                b.arg(stats);
                b.arg(&delta);
                b.arg(&dk);
                b.arg(&dv);
                // SAFETY: matches `flash_bwd_{bf16,f16}_*`.
                unsafe { b.launch(grid(s.div_ceil(BK), bhkv, TC_THREADS, smem)) }.w()?;

                // SAFETY: the dQ kernel writes every row.
                let dq = unsafe { dev.alloc::<T>(rows * d)? };
                let smem = bwd_dq_smem(d);
                let func = load(&dev, &format!("flash_bwd_dq_{name}_d{d}"), smem)?;
                let mut b = stream.launch_builder(&func);
                b.arg(&p);
                b.arg(&qv);
                b.arg(&kv);
                b.arg(&vv);
                b.arg(&pad);
                b.arg(&gv);
                b.arg(stats);
                b.arg(&delta);
                b.arg(&dq);
                // SAFETY: matches `flash_bwd_dq_*`.
                unsafe { b.launch(grid((p.t as usize).div_ceil(BQ), (p.b * p.h) as usize, TC_THREADS, smem)) }.w()?;
                T::wrap_cuda_slice(dq, dev.clone())
            };
            let dk = T::wrap_cuda_slice(dk, dev.clone());
            let dv = T::wrap_cuda_slice(dv, dev);
            Ok((tensor(dq, q.dims()), tensor(dk, k.dims()), tensor(dv, v.dims())))
        }
    }

    impl CustomOp3 for FlashAttn {
        fn name(&self) -> &'static str {
            "flash-attention"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("flash attention runs on CUDA only; the CPU takes ops::attention's plain path")
        }

        fn cuda_fwd(
            &self,
            qs: &CudaStorage,
            ql: &Layout,
            ks: &CudaStorage,
            kl: &Layout,
            vs: &CudaStorage,
            vl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let args = ((qs, ql), (ks, kl), (vs, vl));
            let (o, stats) = match qs.dtype() {
                DType::F32 => self.fwd::<f32>(args.0, args.1, args.2)?,
                DType::BF16 => self.fwd::<half::bf16>(args.0, args.1, args.2)?,
                DType::F16 => self.fwd::<half::f16>(args.0, args.1, args.2)?,
                other => candle_core::bail!("flash attention: no kernel for dtype {other:?}"),
            };
            *self.stats.lock().map_err(|_| candle_core::Error::Msg("flash attention: poisoned".into()))? = Some(stats);
            Ok((o, ql.shape().clone()))
        }

        fn bwd(
            &self,
            q: &Tensor,
            k: &Tensor,
            v: &Tensor,
            o: &Tensor,
            dout: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let dout = kernel_ready(dout)?;
            let (dq, dk, dv) = match q.dtype() {
                DType::F32 => self.bwd_impl::<f32>(q, k, v, o, &dout)?,
                DType::BF16 => self.bwd_impl::<half::bf16>(q, k, v, o, &dout)?,
                DType::F16 => self.bwd_impl::<half::f16>(q, k, v, o, &dout)?,
                other => candle_core::bail!("flash attention: no kernel for dtype {other:?}"),
            };
            Ok((Some(dq), Some(dk), Some(dv)))
        }
    }

    pub(super) fn forward(q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask) -> Result<Tensor> {
        let d = q.dim(3)?;
        let op = FlashAttn {
            causal: mask.causal(),
            scale: (1.0 / (d as f64).sqrt()) as f32,
            key_valid: mask.key_valid(q.device())?,
            stats: Mutex::new(None),
        };
        kernel_ready(q)?.apply_op3(&kernel_ready(k)?, &kernel_ready(v)?, op)
    }
}
