//! Process-wide CPU settings, applied once at the top of `main` (before candle starts threads).
//!
//! Measured on 2 cores (`bayeslora bench train --model minilm`, 32 × 64 tokens, AdamW; see
//! issue 21), two settings of the process, not of the math, cost 40 % of a training step:
//! - **Two thread pools.** candle 0.11 runs elementwise ops on its own spinning barrier pool
//!   (`CANDLE_NUM_THREADS`, default: the rayon count) next to rayon's pool, which runs its GEMMs
//!   and our fused ops (`bayeslora::ops`). On 2 cores the pools take turns spinning while the
//!   other works (12 % of the step in `BarrierGuard::drop`). We keep one pool: rayon's, sized by
//!   `RAYON_NUM_THREADS` (default: the cores); candle's is left with no workers unless the user
//!   sets `CANDLE_NUM_THREADS`.
//! - **Page faults.** glibc returns freed activation buffers (MBs each) to the kernel and faults
//!   them back in on the next step: 20 % of the step in the kernel. A high trim threshold and the
//!   largest mmap threshold keep them in the heap (peak RSS unchanged: the peak is the same
//!   buffers).

/// Applies both settings (a no-op for each that the environment already set).
pub fn tune_cpu() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Single-threaded `main` here: no other thread reads the environment yet.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_none() && std::env::var_os("GLIBC_TUNABLES").is_none() {
        // 32 MiB is glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX); a
        // larger buffer (a vocabulary-sized logits tensor) is still mapped and unmapped.
        // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        }
    }
}
