//! Data-parallel training: the collectives the training loop needs, behind one trait, so that
//! the loop is the same for one process, several threads of one process (tests) and one process
//! per GPU (NCCL).
//!
//! How a step is shared (`train::run_data_parallel`): every rank builds the same batcher (same
//! seed, same shuffling) and draws all `grad_accum × world` micro-batches of the step; rank r
//! trains on micro-batches r, r + world, r + 2·world, … with the dropout stream of each one's
//! global index. Gradients (LoRA weights, head and B-LoRA gate logits) are averaged over the
//! ranks before the optimizer steps, so with equal micro-batches a run on `world` ranks takes
//! the steps of a one-process run with `grad_accum × world` micro-batches, up to the rounding of
//! averaging the per-rank means. IVON averages ḡ and its curvature statistic (ivon-opt's
//! `sync=True`), and each rank draws its own noise, so the ranks act as extra MC samples. Running
//! statistics (B-LoRA's quantizer ranges) are averaged after every step: the ranks then agree,
//! but with activation quantizers a run differs from one process, which updates them
//! micro-batch after micro-batch (as batch norm's statistics would). Every
//! rank holds the same optimizer state; a checksum of the trained values is compared every
//! [`CHECK_EVERY`] steps and at the end. Only rank 0 writes checkpoints and runs the periodic
//! evaluation.
use std::sync::{Arc, Barrier, Mutex};

use crate::{Error, Result};

/// Steps between two comparisons of the ranks' trained values.
pub const CHECK_EVERY: usize = 50;

/// The collectives of data-parallel training.
pub trait Communicator: Send {
    /// This process's (or thread's) rank, 0 ≤ rank < world size.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Replaces `buf` on every rank by the element-wise mean over the ranks; every rank ends
    /// with the same values. Every rank must call it with the same length.
    fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<()>;
    /// Every rank's `value`, in rank order.
    fn all_gather_u64(&mut self, value: u64) -> Result<Vec<u64>>;
}

/// One process alone (world size 1): every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct Single;

impl Communicator for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_mean(&mut self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_gather_u64(&mut self, value: u64) -> Result<Vec<u64>> {
        Ok(vec![value])
    }
}

struct Shared {
    barrier: Barrier,
    floats: Mutex<Vec<Vec<f32>>>,
    words: Mutex<Vec<u64>>,
}

/// A group of ranks that are threads of one process: the reference against which the loop's
/// reduction logic is tested on the CPU. The mean is the sum in rank order divided by the world
/// size, computed identically on every rank (for two ranks, exactly NCCL's sum then divide).
pub struct LocalRank {
    rank: usize,
    world: usize,
    shared: Arc<Shared>,
}

impl LocalRank {
    /// The `world` ranks of one group; move each into its own thread.
    pub fn group(world: usize) -> Vec<LocalRank> {
        let shared = Arc::new(Shared {
            barrier: Barrier::new(world),
            floats: Mutex::new(vec![Vec::new(); world]),
            words: Mutex::new(vec![0; world]),
        });
        (0..world).map(|rank| LocalRank { rank, world, shared: shared.clone() }).collect()
    }
}

fn poisoned(_: impl std::fmt::Display) -> Error {
    Error::Distributed("another rank panicked during a collective".into())
}

impl Communicator for LocalRank {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<()> {
        self.shared.floats.lock().map_err(poisoned)?[self.rank] = buf.to_vec();
        self.shared.barrier.wait();
        {
            let all = self.shared.floats.lock().map_err(poisoned)?;
            if let Some(r) = all.iter().position(|v| v.len() != buf.len()) {
                return Err(Error::Distributed(format!(
                    "rank {r} reduces {} values, rank {} {}",
                    all[r].len(),
                    self.rank,
                    buf.len()
                )));
            }
            let n = self.world as f32;
            for (i, x) in buf.iter_mut().enumerate() {
                let mut sum = all[0][i];
                for v in &all[1..] {
                    sum += v[i];
                }
                *x = sum / n;
            }
        }
        // Nobody overwrites a slot before every rank has read them all.
        self.shared.barrier.wait();
        Ok(())
    }
    fn all_gather_u64(&mut self, value: u64) -> Result<Vec<u64>> {
        self.shared.words.lock().map_err(poisoned)?[self.rank] = value;
        self.shared.barrier.wait();
        let all = self.shared.words.lock().map_err(poisoned)?.clone();
        self.shared.barrier.wait();
        Ok(all)
    }
}

/// The NCCL communicator (feature `nccl`): one process per GPU, the collectives on the GPU's
/// stream. The loop's buffers are host slices: each collective copies them to the device, runs
/// NCCL's sum and copies back, then divides by the world size as [`LocalRank`] does (its
/// reference on the CPU). NCCL comes from cudarc (candle's `nccl` feature), linked against
/// `libnccl.so.2`; at run time the binary finds the one PyTorch ships
/// (`site-packages/nvidia/nccl/lib`) through `LD_LIBRARY_PATH` (README, "Several GPUs").
#[cfg(feature = "nccl")]
pub mod nccl {
    use std::sync::Arc;

    use candle_core::cuda_backend::cudarc::driver::CudaStream;
    use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
    use candle_core::Device;

    use super::Communicator;
    use crate::run::launch::{rendezvous, Launch, ID_BYTES};
    use crate::{Error, Result};

    /// cudarc's `Comm` holds NCCL's raw communicator handle, so it is not `Send`.
    struct OwnedComm(Comm);
    // SAFETY: an NCCL communicator may be used from any thread as long as two threads never use
    // it at once; `NcclRank` owns it and every collective takes `&mut self`.
    unsafe impl Send for OwnedComm {}

    /// This process's rank of an NCCL group.
    pub struct NcclRank {
        comm: OwnedComm,
        stream: Arc<CudaStream>,
        rank: usize,
        world: usize,
    }

    fn nccl(what: &str, e: impl std::fmt::Debug) -> Error {
        Error::Distributed(format!("NCCL {what}: {e:?}"))
    }

    impl NcclRank {
        /// Joins the group of `launch` on `device` (this process's GPU): rank 0 makes the
        /// unique id and hands it out ([`rendezvous`]), then every rank initialises NCCL.
        pub fn join(launch: &Launch, device: &Device) -> Result<NcclRank> {
            let Device::Cuda(dev) = device else {
                return Err(Error::Distributed("data-parallel training over NCCL needs a CUDA device".into()));
            };
            let id = if launch.rank == 0 {
                let id = Id::new().map_err(|e| nccl("could not make a unique id", e))?;
                let bytes: [u8; ID_BYTES] = (*id.internal()).map(|c| c as u8);
                rendezvous(launch, Some(bytes))?
            } else {
                rendezvous(launch, None)?
            };
            let id = Id::uninit(id.map(|b| b as std::ffi::c_char));
            let stream = dev.cuda_stream();
            let comm = Comm::from_rank(stream.clone(), launch.rank, launch.world_size, id)
                .map_err(|e| nccl(&format!("could not start rank {} of {}", launch.rank, launch.world_size), e))?;
            Ok(NcclRank { comm: OwnedComm(comm), stream, rank: launch.rank, world: launch.world_size })
        }
    }

    impl Communicator for NcclRank {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            self.world
        }
        fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<()> {
            if buf.is_empty() {
                return Ok(());
            }
            let mut d = self.stream.clone_htod(buf).map_err(|e| nccl("copy to the device", e))?;
            self.comm.0.all_reduce_in_place(&mut d, &ReduceOp::Sum).map_err(|e| nccl("all-reduce", e))?;
            let sum: Vec<f32> = self.stream.clone_dtoh(&d).map_err(|e| nccl("copy from the device", e))?;
            let n = self.world as f32;
            for (x, s) in buf.iter_mut().zip(sum) {
                *x = s / n;
            }
            Ok(())
        }
        fn all_gather_u64(&mut self, value: u64) -> Result<Vec<u64>> {
            let send = self.stream.clone_htod(&[value]).map_err(|e| nccl("copy to the device", e))?;
            let mut recv = self.stream.alloc_zeros::<u64>(self.world).map_err(|e| nccl("alloc", e))?;
            self.comm.0.all_gather(&send, &mut recv).map_err(|e| nccl("all-gather", e))?;
            self.stream.clone_dtoh(&recv).map_err(|e| nccl("copy from the device", e))
        }
    }
}

/// FNV-1a over the bits of `values`: the fingerprint the ranks compare.
pub fn checksum(values: &[f32]) -> u64 {
    values.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, v| (h ^ u64::from(v.to_bits())).wrapping_mul(0x0100_0000_01b3))
}

/// Fails unless every rank reported the same checksum.
pub fn check_agree(comm: &mut dyn Communicator, local: u64, step: usize) -> Result<()> {
    let all = comm.all_gather_u64(local)?;
    if all.iter().any(|&c| c != all[0]) {
        let list: Vec<String> = all.iter().enumerate().map(|(r, c)| format!("rank {r}: {c:016x}")).collect();
        return Err(Error::Distributed(format!(
            "the ranks' trained values differ after step {step} ({}); a rank saw other data or \
             other settings: start every rank from the same config, data and checkpoint",
            list.join(", ")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_group_means_like_a_sum_then_divide_on_every_rank() {
        let ranks = LocalRank::group(3);
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|mut c| {
                std::thread::spawn(move || {
                    let r = c.rank() as f32;
                    let mut buf = vec![r, 10.0 * r + 0.1, -r];
                    c.all_reduce_mean(&mut buf).unwrap();
                    let words = c.all_gather_u64(c.rank() as u64 * 7).unwrap();
                    (buf, words)
                })
            })
            .collect();
        let got: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let want = [(0.0f32 + 1.0 + 2.0) / 3.0, ((0.1f32 + 10.1) + 20.1) / 3.0, (0.0f32 - 1.0 - 2.0) / 3.0];
        for (buf, words) in &got {
            assert_eq!(buf.as_slice(), &want);
            assert_eq!(words, &vec![0, 7, 14]);
        }
    }

    #[test]
    fn a_length_mismatch_is_an_error_naming_the_ranks() {
        let ranks = LocalRank::group(2);
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|mut c| {
                std::thread::spawn(move || {
                    let mut buf = vec![0.0; 2 + c.rank()];
                    c.all_reduce_mean(&mut buf).map_err(|e| e.to_string())
                })
            })
            .collect();
        let errors: Vec<String> = handles.into_iter().filter_map(|h| h.join().unwrap().err()).collect();
        assert!(!errors.is_empty() && errors[0].contains("reduces"), "{errors:?}");
    }

    #[test]
    fn disagreeing_ranks_are_named() {
        let mut single = Single;
        check_agree(&mut single, 5, 1).unwrap();
        let ranks = LocalRank::group(2);
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|mut c| {
                std::thread::spawn(move || {
                    let local = c.rank() as u64;
                    check_agree(&mut c, local, 50).map_err(|e| e.to_string())
                })
            })
            .collect();
        for h in handles {
            let e = h.join().unwrap().unwrap_err();
            assert!(e.contains("after step 50") && e.contains("rank 1: 0000000000000001"), "{e}");
        }
    }
}
