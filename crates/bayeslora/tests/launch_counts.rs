//! Issue 15 (GPU speed) diagnostic: how many ops one training step records, LoRA vs B-LoRA, by
//! kind. At the bench's GPU sizes a step is launch-bound, so the count of small kernels is the
//! cost; this counts them on the CPU.
//!
//! The MiniLM-shape Llama (`configs/bench/minilm_l6_shape.json`, random weights, q/k/v targets,
//! r 8) runs one training forward and the label-words loss (plus B-LoRA's prior, μ = 1). The
//! forward is the autograd graph walked from the loss, each node once by tensor id; the
//! backward is the graph of the vars' gradients (`CANDLE_GRAD_DO_NOT_DETACH`, set below, keeps
//! it), minus the forward's nodes. Views (narrow, reshape of a contiguous tensor, transpose,
//! broadcast) launch nothing and are counted apart. Ops that record no graph (the range update,
//! a custom op's backward pass) show up as leaves: the forward's are listed by what the B-LoRA
//! path runs untracked, the backward's as `untracked`.
//!
//! `cargo test --release -p bayeslora --test launch_counts -- --nocapture` prints the tables.
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

mod common;
use common::{graph_node, storage_of};

use bayeslora::adapters::blora::BLoraConfig;
use bayeslora::adapters::lora::{LoraConfig, TargetModules};
use bayeslora::adapters::Ctx;
use bayeslora::bench::random_model;
use bayeslora::data::BatchTensors;
use bayeslora::train::{loss, Adapters, Classifier, TaskModel};
use bayeslora::Result;
use candle_core::{DType, Device, Tensor};

/// Ops of one graph, by kind (`kernel` kinds and `view` kinds apart).
#[derive(Debug, Default)]
struct Counts {
    kinds: BTreeMap<String, usize>,
    /// Distinct buffers of the untracked inputs of B-LoRA's ops: the gate noise (the second input
    /// of `hard-concrete` / `rank-multiplier`: one host→device upload each) and the quantizer's
    /// grid (the second input of `blora-quantize`: one range update each, one CUDA launch; a layer's
    /// weights' grids are rows of one `update_ranges` output, so they count once).
    noise: HashSet<usize>,
    ranges: HashSet<usize>,
    /// Distinct buffers of the leaves that no op of the graph made (outputs of ops that record
    /// no graph: a custom op's backward pass, several views of one output counted once).
    untracked: HashSet<usize>,
}

impl Counts {
    fn kernels(&self) -> usize {
        self.kinds.iter().filter(|(k, _)| !k.starts_with("view")).map(|(_, n)| n).sum()
    }

    fn get(&self, kind: &str) -> usize {
        self.kinds.get(kind).copied().unwrap_or(0)
    }
}

/// Walks the graphs of `roots`, skipping nodes in `seen` (and adding the ones it visits); leaves
/// that are not in `known` count as `untracked` (outputs of ops that record no graph).
fn walk(
    roots: &[Tensor],
    seen: &mut HashSet<candle_core::TensorId>,
    known: Option<&HashSet<candle_core::TensorId>>,
) -> Counts {
    let mut counts = Counts::default();
    let mut stack: Vec<Tensor> = roots.to_vec();
    while let Some(t) = stack.pop() {
        if !seen.insert(t.id()) {
            continue;
        }
        match graph_node(&t) {
            Some((kind, inputs)) => {
                match kind.as_str() {
                    "custom hard-concrete" | "custom rank-multiplier" => {
                        counts.noise.insert(storage_of(&inputs[1]));
                    }
                    "custom blora-quantize" => {
                        counts.ranges.insert(storage_of(&inputs[1]));
                    }
                    _ => {}
                }
                *counts.kinds.entry(kind).or_default() += 1;
                stack.extend(inputs);
            }
            None => {
                if let Some(known) = known {
                    if !known.contains(&t.id()) && !t.is_variable() && t.elem_count() > 1 {
                        counts.untracked.insert(storage_of(&t));
                    }
                }
            }
        }
    }
    if !counts.untracked.is_empty() {
        counts.kinds.insert("untracked".into(), counts.untracked.len());
    }
    counts
}

/// A `[b, t]` label-words batch of a decoder (the bench's `label-words` objective).
fn batch(b: usize, t: usize, dev: &Device) -> Result<BatchTensors> {
    let ids: Vec<u32> = (0..b * t).map(|i| 1000 + (i as u32 * 7919) % 20000).collect();
    Ok(BatchTensors {
        input_ids: Tensor::from_vec(ids, (b, t), dev)?,
        attention_mask: Tensor::ones((b, t), DType::F32, dev)?,
        token_type_ids: Tensor::zeros((b, t), DType::U32, dev)?,
        labels: Tensor::from_vec((0..b as u32).map(|i| i % 2).collect::<Vec<_>>(), b, dev)?,
        label_token_ids: Some(Tensor::new(&[330u32, 331], dev)?),
        class_mask: None,
        last_positions: Tensor::from_vec(vec![t as u32 - 1; b], b, dev)?,
    })
}

enum Method {
    Lora,
    Blora(BLoraConfig),
}

/// The step's graphs of one method: (forward of the task loss, the prior's own ops, backward),
/// and how many quantizers and rank-gate vectors the model has.
fn step_counts(method: &Method) -> Result<(Counts, Counts, Counts)> {
    let dev = Device::Cpu;
    let shape = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/bench/minilm_l6_shape.json");
    let (loaded, _) = random_model(&shape, DType::F32, &dev, 0)?;
    let targets = Some(TargetModules::List(vec!["q_proj".into(), "k_proj".into(), "v_proj".into()]));
    let model = match method {
        Method::Lora => {
            TaskModel::build(loaded, &LoraConfig { r: 8, target_modules: targets, ..Default::default() }, 2, 0, &dev)?
        }
        Method::Blora(cfg) => {
            let cfg = BLoraConfig { r: 8, target_modules: targets, ..cfg.clone() };
            let mut m = TaskModel::build_blora(loaded, &cfg, 2, 0, &dev)?;
            if let Adapters::Blora(b) = &mut m.adapters {
                b.mu = 1.0;
            }
            // B as after the first optimizer step (LoRA's init has B = 0, whose quantizers stay
            // unset and pass through until then).
            for (name, v) in m.trainable() {
                if name.contains("lora_B") {
                    v.set(&Tensor::randn(0f32, 0.02, v.dims(), &dev)?)?;
                }
            }
            m
        }
    };
    let batch = batch(2, 16, &dev)?;
    // Two forwards first: every range is set, as in a run after its first step. Their outputs
    // stay alive (no buffer of theirs is reused), so that a grid the step reuses from them (the
    // frozen base's) is told from one it computes.
    let warm = (0..2).map(|step| model.logits(&batch, &Ctx::train(step))).collect::<Result<Vec<_>>>()?;
    let earlier = walk(&warm, &mut HashSet::new(), None).ranges;
    let task = loss(&model.logits(&batch, &Ctx::train(2))?, &batch)?;
    let mut seen = HashSet::new();
    let mut forward = walk(std::slice::from_ref(&task), &mut seen, None);
    forward.ranges.retain(|s| !earlier.contains(s));
    let (prior, total) = match model.regularizer()? {
        Some(reg) => (walk(std::slice::from_ref(&reg), &mut seen, None), task.add(&reg)?),
        None => (Counts::default(), task),
    };
    let forward_ids = seen.clone();
    let grads = total.backward()?;
    // Every gradient the backward stored (a custom op's backward records no graph, so the vars'
    // gradients alone would hide what ran before it).
    let grad_roots: Vec<Tensor> = grads.get_ids().filter_map(|id| grads.get_id(*id).cloned()).collect();
    let backward = walk(&grad_roots, &mut seen, Some(&forward_ids));
    Ok((forward, prior, backward))
}

fn table(title: &str, rows: &[(&str, &Counts)]) {
    let kinds: std::collections::BTreeSet<&String> = rows.iter().flat_map(|(_, c)| c.kinds.keys()).collect();
    println!("\n{title}");
    print!("{:<34}", "kind");
    for (name, _) in rows {
        print!("{name:>14}");
    }
    println!();
    for k in kinds {
        print!("{k:<34}");
        for (_, c) in rows {
            print!("{:>14}", c.get(k));
        }
        println!();
    }
    print!("{:<34}", "kernels (views excluded)");
    for (_, c) in rows {
        print!("{:>14}", c.kernels());
    }
    println!();
}

#[test]
fn blora_step_op_counts() -> Result<()> {
    // The backward's graph is kept only with this set before the first backward of the thread.
    // SAFETY (edition 2021: safe): this test binary has one test; nothing else reads the env.
    std::env::set_var("CANDLE_GRAD_DO_NOT_DETACH", "1");
    let qbase = BLoraConfig {
        quantize_base: true,
        bit_gate_init: [6.0, 6.0, 6.0, -6.0],
        rank_gate_init: 6.0,
        ..BLoraConfig::default()
    };
    let (lf, _, lb) = step_counts(&Method::Lora)?;
    let (bf, bp, bb) = step_counts(&Method::Blora(BLoraConfig::default()))?;
    let (qf, qp, qb) = step_counts(&Method::Blora(qbase))?;
    table("forward (task loss)", &[("lora", &lf), ("blora", &bf), ("blora_qbase", &qf)]);
    table("prior (the regulariser's own ops)", &[("lora", &Counts::default()), ("blora", &bp), ("blora_qbase", &qp)]);
    table("backward (vars' gradients)", &[("lora", &lb), ("blora", &bb), ("blora_qbase", &qb)]);
    let layers = 18; // 6 blocks × q, k, v
    for (name, f, p, b) in [("blora", &bf, &bp, &bb), ("blora_qbase", &qf, &qp, &qb)] {
        let quantizers = f.get("custom blora-quantize");
        let (ranges, uploads) = (f.ranges.len(), f.noise.len());
        let tracked = f.kernels() + p.kernels() + b.kernels();
        println!(
            "\n{name}: {quantizers} quantizers ({:.1}/layer), tracked kernels fwd {} + prior {} + bwd {} = {tracked} \
             (LoRA {}); untracked: {ranges} range updates (one CUDA launch each), {uploads} noise uploads",
            quantizers as f64 / layers as f64,
            f.kernels(),
            p.kernels(),
            b.kernels(),
            lf.kernels() + lb.kernels(),
        );
    }
    assert!(bf.kernels() > lf.kernels());
    Ok(())
}
