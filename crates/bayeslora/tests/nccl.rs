//! The NCCL communicator on one GPU (issue 20): world size 1 through the real NCCL path (unique
//! id, rendezvous, communicator, all-reduce and all-gather on the device), and a training run
//! over it equal to the same run alone. Several ranks need several GPUs (NCCL refuses two ranks
//! on one device); their reduction logic is tested on the CPU in `tests/dist.rs`. Build and run:
//! `FEATURES=nccl CARGO_BUILD_JOBS=1 scripts/device/pack_cuda_tests.sh nccl`, then on the GPU
//! machine, with PyTorch's libnccl on the library path,
//! `LD_LIBRARY_PATH=$(python3 -c "import nvidia.nccl;print(nvidia.nccl.__path__[0])")/lib:$LD_LIBRARY_PATH .device/nccl`
//! (`nvidia.nccl` is a namespace package: no `__file__`).
#![cfg(feature = "nccl")]
mod common;
use common::snapshot;

use bayeslora::run::launch::Launch;
use bayeslora::train::dist::nccl::NcclRank;
use bayeslora::train::dist::{Communicator, Single};
use bayeslora::train::{self, OptimizerKind, Silent};
use candle_core::Device;
use std::sync::Arc;

fn alone() -> Launch {
    // World size 1: rank 0 hands its id to nobody, so any port will do.
    Launch { rank: 0, world_size: 1, local_rank: 0, master_addr: "127.0.0.1".into(), master_port: 0 }
}

#[test]
fn one_rank_collectives_through_nccl_are_the_identity() {
    let gpu = Device::new_cuda(0).expect("a CUDA device");
    let mut comm = NcclRank::join(&alone(), &gpu).expect("NCCL starts (is libnccl.so.2 on LD_LIBRARY_PATH?)");
    assert_eq!((comm.rank(), comm.world_size()), (0, 1));
    let mut buf = vec![1.5f32, -2.0, 3.25, 1e-30, f32::MAX];
    let want = buf.clone();
    comm.all_reduce_mean(&mut buf).unwrap();
    assert_eq!(buf, want);
    comm.all_reduce_mean(&mut []).unwrap();
    assert_eq!(comm.all_gather_u64(0xDEAD_BEEF_0000_0042).unwrap(), vec![0xDEAD_BEEF_0000_0042]);
}

#[test]
fn a_run_over_one_nccl_rank_equals_the_run_alone() {
    let gpu = Device::new_cuda(0).expect("a CUDA device");
    let data = Arc::new(common::separable(64, 0));
    for kind in [OptimizerKind::Adamw, OptimizerKind::Ivon] {
        let cfg = common::train_config(kind, 6);
        let single = {
            let m = common::tiny_bert_on(0, 0.1, &gpu);
            train::run_data_parallel(&m, data.clone(), &cfg, &gpu, &mut Silent, None, None, &mut Single).unwrap();
            snapshot(&m)
        };
        let over_nccl = {
            let m = common::tiny_bert_on(0, 0.1, &gpu);
            let mut comm = NcclRank::join(&alone(), &gpu).unwrap();
            train::run_data_parallel(&m, data.clone(), &cfg, &gpu, &mut Silent, None, None, &mut comm).unwrap();
            snapshot(&m)
        };
        assert_eq!(single, over_nccl, "{kind:?}: one NCCL rank trains exactly as one process");
    }
}
