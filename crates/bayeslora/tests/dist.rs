//! Data-parallel training's reduction logic on the CPU (`train::dist`, issue 20): ranks are
//! threads of one process joined by `LocalRank`, the in-process communicator that averages like
//! NCCL; the tiny random BERT of `fixtures/bert/tiny` and a synthetic separable task.
mod common;
use common::{snapshot, StopAt};

use bayeslora::data::EncodedDataset;
use bayeslora::train::dist::{Communicator, LocalRank};
use bayeslora::train::{self, Observer, OptimizerKind, Silent, TaskModel, TrainConfig};
use candle_core::Device;
use std::sync::Arc;

/// The tiny-model settings at batch 4 with `grad_accum` micro-batches a step.
fn config(kind: OptimizerKind, steps: usize, grad_accum: usize) -> TrainConfig {
    let mut cfg = common::train_config(kind, steps);
    cfg.grad_accum = grad_accum;
    cfg.batch.batch_size = 4;
    cfg
}

fn data() -> Arc<EncodedDataset> {
    Arc::new(common::separable(64, 0))
}

/// LoRA dropout 0.1, so that the masks' seeds matter.
fn model() -> TaskModel {
    common::tiny_bert(0, 0.1)
}

/// Trains one model per rank, each in its own thread; returns each rank's trained values.
fn ranks(
    world: usize,
    cfg: &TrainConfig,
    build: impl Fn() -> TaskModel + Sync,
    resume: Option<&std::path::Path>,
    observer: impl Fn() -> Box<dyn Observer + Send> + Sync,
) -> Vec<Vec<Vec<u32>>> {
    let data = data();
    std::thread::scope(|s| {
        let handles: Vec<_> = LocalRank::group(world)
            .into_iter()
            .map(|mut comm| {
                let (data, cfg, observer, build) = (data.clone(), cfg.clone(), &observer, &build);
                s.spawn(move || {
                    let m = build();
                    let mut obs = observer();
                    let mut cfg = cfg;
                    if comm.rank() > 0 {
                        cfg.checkpoint_dir = cfg.checkpoint_dir.map(|d| d.join("never-written"));
                    }
                    train::run_data_parallel(&m, data, &cfg, &Device::Cpu, obs.as_mut(), resume, None, &mut comm)
                        .unwrap();
                    snapshot(&m)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn max_diff(a: &[Vec<u32>], b: &[Vec<u32>]) -> f32 {
    let mut worst = 0f32;
    for (x, y) in a.iter().zip(b) {
        for (&p, &q) in x.iter().zip(y) {
            worst = worst.max((f32::from_bits(p) - f32::from_bits(q)).abs());
        }
    }
    worst
}

#[test]
fn two_ranks_take_the_steps_of_one_process_with_twice_the_accumulation() {
    let one = {
        let m = model();
        train::run(&m, data(), &config(OptimizerKind::Adamw, 12, 2), &Device::Cpu, &mut Silent, None, None).unwrap();
        snapshot(&m)
    };
    let two = ranks(2, &config(OptimizerKind::Adamw, 12, 1), model, None, || Box::new(Silent));
    assert_eq!(two[0], two[1], "every rank holds the same weights");
    let d = max_diff(&one, &two[0]);
    // Averaging per-rank means instead of all four gradients at once rounds differently.
    eprintln!("2 ranks vs 1 process: max |Δ| {d:e}");
    assert!(d < 1e-6, "2 ranks vs 1 process: max |Δ| {d:e}");
    assert_ne!(one, snapshot(&model()), "training moved the weights");
}

#[test]
fn ivon_ranks_sync_their_statistics_and_stay_identical() {
    let cfg = config(OptimizerKind::Ivon, 12, 1);
    let two = ranks(2, &cfg, model, None, || Box::new(Silent));
    assert_eq!(two[0], two[1], "every rank holds the same posterior mean");
    // Each rank drew its own noise: two ranks are not one rank twice.
    let one = ranks(1, &cfg, model, None, || Box::new(Silent));
    assert!(max_diff(&one[0], &two[0]) > 0.0);
    // One rank through the data-parallel path is the plain loop, bit for bit.
    let plain = {
        let m = model();
        train::run(&m, data(), &cfg, &Device::Cpu, &mut Silent, None, None).unwrap();
        snapshot(&m)
    };
    assert_eq!(one[0], plain);
}

#[test]
fn rank_zero_checkpoints_and_the_run_resumes_with_another_world_size() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(OptimizerKind::Adamw, 12, 1);
    cfg.checkpoint_dir = Some(dir.path().join("ckpt"));
    // Two ranks stop at step 6 (as one Ctrl-C would stop both) ...
    ranks(2, &cfg, model, None, || Box::new(StopAt(6)));
    assert!(dir.path().join("ckpt").exists());
    assert!(!dir.path().join("ckpt/never-written").exists(), "only rank 0 writes");
    // ... and one process with twice the accumulation finishes the run.
    let mut one_cfg = config(OptimizerKind::Adamw, 12, 2);
    one_cfg.checkpoint_dir = cfg.checkpoint_dir.clone();
    let m = model();
    train::run(&m, data(), &one_cfg, &Device::Cpu, &mut Silent, Some(&dir.path().join("ckpt")), None).unwrap();
    let straight = {
        let m = model();
        train::run(&m, data(), &config(OptimizerKind::Adamw, 12, 2), &Device::Cpu, &mut Silent, None, None).unwrap();
        snapshot(&m)
    };
    let d = max_diff(&snapshot(&m), &straight);
    assert!(d < 1e-6, "resumed on another world size vs straight: max |Δ| {d:e}");
}

#[test]
fn blora_gate_logits_are_reduced_like_the_weights() {
    let mut one_cfg = config(OptimizerKind::Adamw, 8, 2);
    one_cfg.gates.lr = 0.5;
    let mut cfg = one_cfg.clone();
    cfg.grad_accum = 1;
    // Rank gates only: two ranks are one process with twice the accumulation.
    let one = {
        let m = common::tiny_blora(0, false);
        train::run(&m, data(), &one_cfg, &Device::Cpu, &mut Silent, None, None).unwrap();
        snapshot(&m)
    };
    let two = ranks(2, &cfg, || common::tiny_blora(0, false), None, || Box::new(Silent));
    assert_eq!(two[0], two[1], "every rank holds the same weights and gate logits");
    let d = max_diff(&one, &two[0]);
    assert!(d < 1e-6, "2 ranks vs 1 process: max |Δ| {d:e}");
    // With quantizers, each rank updates the activation ranges (running statistics, like batch
    // norm's) from its own micro-batches; they are averaged after every step, so the ranks agree
    // (the loop compares checksums of weights, gates and ranges) but differ from one process,
    // which updates them micro-batch after micro-batch.
    let two = ranks(2, &cfg, || common::tiny_blora(0, true), None, || Box::new(Silent));
    assert_eq!(two[0], two[1]);
}
