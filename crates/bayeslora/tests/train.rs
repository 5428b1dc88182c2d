//! Training loop: it learns, it resumes bit for bit from a checkpoint (IVON and AdamW), it
//! refuses a non-finite loss, and the posterior predictive averages probabilities.
//! Uses the tiny random BERT of `fixtures/bert/tiny` and a synthetic separable task.
mod common;
use common::{snapshot, StopAt};

use bayeslora::data::EncodedDataset;
use bayeslora::eval::ModelPredictor;
use bayeslora::eval::{evaluate, EvalConfig};
use bayeslora::train::{self, Checkpoint, Classifier, Observer, OptimizerKind, StepInfo, TaskModel, TrainConfig};
use candle_core::Device;
use std::ops::ControlFlow;
use std::sync::Arc;

fn tiny_model(seed: u64) -> TaskModel {
    common::tiny_bert(seed, 0.0)
}

fn separable(n: usize) -> Arc<EncodedDataset> {
    Arc::new(common::separable(n, 0))
}

fn config(kind: OptimizerKind, steps: usize) -> TrainConfig {
    common::train_config(kind, steps)
}

struct Losses(Vec<f32>);
impl Observer for Losses {
    fn step(&mut self, info: &StepInfo) -> ControlFlow<()> {
        self.0.push(info.loss);
        ControlFlow::Continue(())
    }
}

#[test]
fn both_optimizers_learn_a_separable_task() {
    let data = separable(64);
    for kind in [OptimizerKind::Adamw, OptimizerKind::Ivon] {
        let model = tiny_model(0);
        let mut losses = Losses(Vec::new());
        let cfg = config(kind, 60);
        train::run(&model, data.clone(), &cfg, &Device::Cpu, &mut losses, None, None).unwrap();
        let first: f32 = losses.0[..8].iter().sum::<f32>() / 8.0;
        let last: f32 = losses.0[losses.0.len() - 8..].iter().sum::<f32>() / 8.0;
        assert!(last < 0.5 * first, "{kind:?}: loss {first} -> {last}");
    }
}

#[test]
fn resume_is_bit_identical_for_ivon_and_adamw() {
    let data = separable(40);
    for kind in [OptimizerKind::Ivon, OptimizerKind::Adamw] {
        let dir = tempfile::tempdir().unwrap();
        // Straight run of 8 steps.
        let straight = tiny_model(5);
        train::run(&straight, data.clone(), &config(kind, 8), &Device::Cpu, &mut train::Silent, None, None).unwrap();
        // Interrupted after 3 steps (checkpoint written on the way out), then resumed in a fresh model.
        let mut cfg = config(kind, 8);
        cfg.checkpoint_dir = Some(dir.path().to_path_buf());
        let first = tiny_model(5);
        let (summary, _) = train::run(&first, data.clone(), &cfg, &Device::Cpu, &mut StopAt(3), None, None).unwrap();
        assert!(summary.interrupted && summary.steps == 3);
        assert!(Checkpoint::latest(dir.path()).is_some());
        let resumed = tiny_model(99); // different init: everything must come from the checkpoint
        let (summary, _) =
            train::run(&resumed, data.clone(), &cfg, &Device::Cpu, &mut train::Silent, Some(dir.path()), None).unwrap();
        assert_eq!(summary.steps, 8);
        assert_eq!(snapshot(&straight), snapshot(&resumed), "{kind:?}: resumed weights differ");
    }
}

#[test]
fn non_finite_loss_is_an_error_naming_the_step() {
    let data = separable(16);
    let model = tiny_model(0);
    let mut cfg = config(OptimizerKind::Adamw, 5);
    cfg.adamw.lr = 1e30; // blows up after the first update
    let err = train::run(&model, data, &cfg, &Device::Cpu, &mut train::Silent, None, None).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("non-finite loss") && msg.contains("step"), "{msg}");
}

#[test]
fn resume_from_an_empty_folder_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(0);
    let err = train::run(
        &model,
        separable(8),
        &config(OptimizerKind::Ivon, 2),
        &Device::Cpu,
        &mut train::Silent,
        Some(dir.path()),
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("no checkpoint"), "{err}");
}

#[test]
fn posterior_predictive_restores_the_mean_and_differs_from_it() {
    let data = separable(32);
    let model = tiny_model(1);
    let (_, opt) = train::run(
        &model,
        data.clone(),
        &config(OptimizerKind::Ivon, 20),
        &Device::Cpu,
        &mut train::Silent,
        None,
        None,
    )
    .unwrap();
    let train::RunOptimizer::Ivon(ivon) = &opt else { panic!("IVON run") };
    let before = snapshot(&model);
    let mut predictor = ModelPredictor::posterior(&model, ivon, &Device::Cpu, 0).unwrap();
    let eval_cfg = EvalConfig { method: "ivon".into(), num_samples: 4, batch_size: 8, curve: vec![1, 2] };
    let ev = evaluate(&mut predictor, &data, &eval_cfg).unwrap();
    drop(predictor);
    assert_eq!(before, snapshot(&model), "evaluation must leave the mean in the vars");
    let mean = ev.mean.unwrap();
    let bayes = ev.bayes.unwrap();
    assert_eq!(ev.results.len(), 4); // mean, K=1, K=2, K=4
    assert_ne!(mean.probs, bayes.probs, "samples must differ from the mean");
    for row in bayes.probs.chunks(3) {
        assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    }
}

/// The tiny BERT with B-LoRA (r 4, rank and bit gates, μ 0.05) on query and value.
fn tiny_blora(seed: u64) -> TaskModel {
    common::tiny_blora(seed, true)
}

fn gate_values(model: &TaskModel) -> Vec<f32> {
    model
        .trainable()
        .iter()
        .filter(|(n, _)| model.is_gate(n))
        .flat_map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

#[test]
fn blora_learns_moves_its_gates_and_adds_the_prior() {
    let data = separable(64);
    for kind in [OptimizerKind::Adamw, OptimizerKind::Ivon] {
        let model = tiny_blora(0);
        assert!(model.regularizer().unwrap().is_some(), "μ > 0 and gates on: the loss has a prior");
        let gates_before = gate_values(&model);
        assert!(!gates_before.is_empty());
        let mut losses = Losses(Vec::new());
        // E starts at zero and A, B at N(0, 0.02²) (AdaLoRA's init), so B-LoRA starts slower than LoRA.
        let mut cfg = config(kind, 150);
        cfg.gates.lr = 0.05;
        train::run(&model, data.clone(), &cfg, &Device::Cpu, &mut losses, None, None).unwrap();
        let first: f32 = losses.0[..8].iter().sum::<f32>() / 8.0;
        let last: f32 = losses.0[losses.0.len() - 8..].iter().sum::<f32>() / 8.0;
        assert!(last < 0.5 * first, "{kind:?}: task loss {first} -> {last}");
        let gates_after = gate_values(&model);
        // The prior pushes every gate logit down; the gate Adam must have moved them.
        let moved = gates_before.iter().zip(&gates_after).filter(|(a, b)| a != b).count();
        assert!(moved > gates_before.len() / 2, "{kind:?}: {moved} of {} gate logits moved", gates_before.len());
        let mean_before: f32 = gates_before.iter().sum::<f32>() / gates_before.len() as f32;
        let mean_after: f32 = gates_after.iter().sum::<f32>() / gates_after.len() as f32;
        assert!(mean_after < mean_before, "{kind:?}: gate logits {mean_before} -> {mean_after}");
    }
}

struct Notes(Vec<String>);
impl Observer for Notes {
    fn note(&mut self, message: &str) {
        self.0.push(message.to_string());
    }
}

#[test]
fn blora_run_too_short_for_any_gate_to_close_says_so() {
    let data = separable(16);
    // Gates start at log α 6, 6.94 above the threshold; constant schedule, no warm-up.
    let run = |gate_lr: f64, steps: usize| {
        let model = tiny_blora(0);
        let mut cfg = config(OptimizerKind::Adamw, steps);
        cfg.schedule = bayeslora::train::Schedule::Constant;
        cfg.warmup_steps = 0;
        cfg.gates.lr = gate_lr;
        let mut notes = Notes(Vec::new());
        train::run(&model, data.clone(), &cfg, &Device::Cpu, &mut notes, None, None).unwrap();
        notes.0
    };
    let short = run(0.01, 4);
    assert_eq!(short.len(), 1, "{short:?}");
    assert!(short[0].contains("no B-LoRA gate can close") && short[0].contains("~0.13"), "{}", short[0]);
    // 4 steps × 0.01 × 3.16 (Adam's largest step at torch's betas) = 0.13; 4 × 2.0 × 3.16 > 6.94:
    // a gate could close, so no note.
    assert!(run(2.0, 4).is_empty());
}

#[test]
fn blora_with_a_strong_prior_and_enough_steps_prunes_ranks_and_bits() {
    // The mechanism end to end: with gates that can travel (Σ gate_lr ≫ 6.94) and a prior that
    // outweighs the task, deterministic test-time gates end below the initial rank and 32 bits.
    let data = separable(32);
    let model = tiny_blora(0);
    let before = model.adapters.blora().expect("B-LoRA").learned().unwrap();
    assert!(before.iter().all(|(_, l)| l.rank == 4 && l.bits.values().all(|&b| b == 32)), "{before:?}");
    let mut cfg = config(OptimizerKind::Adamw, 60);
    cfg.schedule = bayeslora::train::Schedule::Constant;
    cfg.warmup_steps = 0;
    cfg.gates.lr = 0.5;
    let mut notes = Notes(Vec::new());
    let mut strong = model;
    if let bayeslora::train::Adapters::Blora(b) = &mut strong.adapters {
        b.mu = 50.0;
    }
    train::run(&strong, data, &cfg, &Device::Cpu, &mut notes, None, None).unwrap();
    assert!(notes.0.is_empty(), "{:?}", notes.0);
    let after = strong.adapters.blora().expect("B-LoRA").learned().unwrap();
    assert!(after.iter().any(|(_, l)| l.rank < 4), "no rank pruned: {after:?}");
    assert!(after.iter().any(|(_, l)| l.bits.values().any(|&b| b < 32)), "no bit-width lowered: {after:?}");
}

#[test]
fn blora_resume_is_bit_identical_with_gates_and_ranges() {
    let data = separable(40);
    for kind in [OptimizerKind::Ivon, OptimizerKind::Adamw] {
        let dir = tempfile::tempdir().unwrap();
        let straight = tiny_blora(5);
        train::run(&straight, data.clone(), &config(kind, 8), &Device::Cpu, &mut train::Silent, None, None).unwrap();
        let mut cfg = config(kind, 8);
        cfg.checkpoint_dir = Some(dir.path().to_path_buf());
        let first = tiny_blora(5);
        train::run(&first, data.clone(), &cfg, &Device::Cpu, &mut StopAt(3), None, None).unwrap();
        let resumed = tiny_blora(99);
        train::run(&resumed, data.clone(), &cfg, &Device::Cpu, &mut train::Silent, Some(dir.path()), None).unwrap();
        assert_eq!(snapshot(&straight), snapshot(&resumed), "{kind:?}: resumed weights/gates differ");
        let state = |m: &TaskModel| -> Vec<Vec<u32>> {
            m.buffers()
                .unwrap()
                .iter()
                .map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect())
                .collect()
        };
        assert_eq!(state(&straight), state(&resumed), "{kind:?}: quantizer ranges differ after resume");
    }
}

/// A checkpoint written before the gate logits were one var (per-layer `….blora_gates.rank` and
/// `….blora_gates.<slot>.bits` tensors) still resumes bit for bit: the bank is rebuilt from its
/// per-layer vectors, and the gate Adam's flat state has the same layout.
#[test]
fn blora_resume_reads_checkpoints_with_per_layer_gates() {
    let data = separable(40);
    for kind in [OptimizerKind::Ivon, OptimizerKind::Adamw] {
        let dir = tempfile::tempdir().unwrap();
        let straight = tiny_blora(5);
        train::run(&straight, data.clone(), &config(kind, 8), &Device::Cpu, &mut train::Silent, None, None).unwrap();
        let mut cfg = config(kind, 8);
        cfg.checkpoint_dir = Some(dir.path().to_path_buf());
        let first = tiny_blora(5);
        train::run(&first, data.clone(), &cfg, &Device::Cpu, &mut StopAt(3), None, None).unwrap();
        // The newest checkpoint rewritten in the old layout (and without a manifest, which the
        // rewrite would no longer match).
        let latest = std::fs::read_to_string(dir.path().join("latest")).unwrap();
        let ckpt = dir.path().join(latest.trim());
        let file = ckpt.join("trainable.safetensors");
        let mut saved = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
        let bank = saved.remove("base_model.model.blora_gates").expect("the gate bank is saved as one tensor");
        for (m, l) in &first.adapters.blora().expect("B-LoRA").layers {
            for (name, g) in l.gate_vars() {
                let part = bank.narrow(0, g.offset(), g.elem_count()).unwrap().copy().unwrap();
                saved.insert(format!("base_model.model.{m}.{name}"), part);
            }
        }
        candle_core::safetensors::save(&saved, &file).unwrap();
        std::fs::remove_file(ckpt.join("manifest.json")).unwrap();
        let resumed = tiny_blora(99);
        train::run(&resumed, data.clone(), &cfg, &Device::Cpu, &mut train::Silent, Some(dir.path()), None).unwrap();
        assert_eq!(snapshot(&straight), snapshot(&resumed), "{kind:?}: resumed weights/gates differ");
    }
}
