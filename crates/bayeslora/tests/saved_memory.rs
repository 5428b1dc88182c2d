//! Issue 17 (memory): what a decoder training step keeps alive for its backward, measured on
//! the CPU by walking the autograd graph from the loss.
//!
//! candle keeps every op's inputs alive until the backward (an op node holds its argument
//! tensors), so the bytes a step holds at the start of its backward are the distinct buffers of
//! the graph's nodes. This test builds a Llama with Llama-2-7B's proportions (intermediate =
//! 2.6875 × hidden, head dim 64), in bf16 as on the GPU, LoRA r 8 on q, v without dropout (the
//! bench's settings), runs the bench's causal-LM loss, and reports the bytes per token and
//! layer in units of one bf16 hidden vector ("C"): the difference of a 4-layer and a 2-layer
//! model, so the embedding, the logits and the loss drop out. At the 7B shape one C per token
//! and layer is 4,096 × 2 B × 2,048 tokens × 32 layers = 0.5 GiB at 4 × 512.
//!
//! A hand-written layer backward needs about 14 C (the layer input, the two normed inputs, q, k
//! and v after RoPE, the attention output, gate and up: 2 × 2.69 C); the bound below keeps the
//! fused ops that get close to it from regressing.
//!
//! `cargo test --release -p bayeslora --test saved_memory -- --nocapture` prints the breakdown.
use std::collections::{BTreeMap, HashSet};

use bayeslora::adapters::lora::{LoraConfig, TargetModules};
use bayeslora::adapters::Ctx;
use bayeslora::bench::random_model;
use bayeslora::models::Backbone;
use bayeslora::train::TaskModel;
use bayeslora::Result;
use candle_core::{DType, Device, Tensor};

mod common;
use common::{graph_node, storage_of};

const HIDDEN: usize = 512;

/// Distinct buffers made by the graph's ops (leaves — weights, inputs, vars — excluded), bytes
/// by the kind of the first op seen writing them (views count their buffer once). A buffer's
/// size is the largest extent any of its views reaches, which works on every device.
fn saved_bytes(loss: &Tensor) -> BTreeMap<String, usize> {
    let mut seen_nodes = HashSet::new();
    let mut buffers: std::collections::HashMap<usize, (String, usize)> = Default::default();
    let mut stack = vec![loss.clone()];
    while let Some(t) = stack.pop() {
        if !seen_nodes.insert(t.id()) {
            continue;
        }
        let Some((kind, inputs)) = graph_node(&t) else { continue };
        let addr = storage_of(&t);
        let extent = (t.layout().start_offset() + t.elem_count()) * t.dtype().size_in_bytes();
        let entry = buffers.entry(addr).or_insert((kind, 0));
        entry.1 = entry.1.max(extent);
        stack.extend(inputs);
    }
    let mut by_kind = BTreeMap::new();
    for (kind, bytes) in buffers.into_values() {
        *by_kind.entry(kind).or_insert(0) += bytes;
    }
    by_kind
}

/// The bytes a step's graph holds, by op kind, for a model of `layers` layers.
fn step(layers: usize, tokens: (usize, usize), dev: &Device) -> Result<BTreeMap<String, usize>> {
    let dir = std::env::temp_dir().join(format!("bayeslora-saved-memory-{}-{layers}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": HIDDEN, "intermediate_size": HIDDEN * 43 / 16, "num_attention_heads": HIDDEN / 128,
        "num_key_value_heads": HIDDEN / 128, "num_hidden_layers": layers, "vocab_size": 512,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": false, "hidden_act": "silu"
    });
    let path = dir.join("config.json");
    std::fs::write(&path, cfg.to_string()).expect("config.json");
    let (loaded, _) = random_model(&path, DType::BF16, dev, 0)?;
    let _ = std::fs::remove_dir_all(&dir);
    let lora = LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        target_modules: Some(TargetModules::List(vec!["q_proj".into(), "v_proj".into()])),
        ..Default::default()
    };
    let model = TaskModel::build(loaded, &lora, 2, 0, dev)?;
    let Backbone::Llama(llama) = &model.backbone else { unreachable!("a Llama config") };
    let (b, t) = tokens;
    let ids: Vec<u32> = (0..b * t).map(|i| (i as u32 * 7919) % 512).collect();
    let ids = Tensor::from_vec(ids, (b, t), dev)?;
    let mask = Tensor::ones((b, t), DType::F32, dev)?;
    let hidden = llama.forward(&ids, &mask, &Ctx::train(1))?;
    let logits = llama.lm_logits(&hidden)?;
    let v = logits.dim(2)?;
    let pred = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
    let target = ids.narrow(1, 1, t - 1)?.contiguous()?.reshape(b * (t - 1))?;
    let loss = bayeslora::ops::cross_entropy(&pred, &target)?;
    Ok(saved_bytes(&loss))
}

/// Bytes per token and layer, in C: the 4-layer model's graph minus the 2-layer one's, printed
/// by op kind.
fn per_layer(dev: &Device) -> Result<f64> {
    let (b, t) = (2, 32);
    let (small, large) = (step(2, (b, t), dev)?, step(4, (b, t), dev)?);
    let unit = (b * t * HIDDEN * 2 * 2) as f64; // one bf16 hidden vector per token, 2 layers
    let kinds: std::collections::BTreeSet<&String> = small.keys().chain(large.keys()).collect();
    println!("\n{dev:?}: kept for the backward, per token and layer, in C (one bf16 hidden vector):");
    let mut total = 0.0;
    for k in kinds {
        let d = *large.get(k).unwrap_or(&0) as f64 - *small.get(k).unwrap_or(&0) as f64;
        if d != 0.0 {
            println!("  {k:<34} {:>6.2}", d / unit);
        }
        total += d / unit;
    }
    println!("  {:<34} {total:>6.2}", "total");
    Ok(total)
}

/// The CPU path in bf16 (CI): RMSNorm, RoPE and attention are composed from candle ops there
/// (their fused CPU ops are f32), so it keeps more than the GPU path; the bound guards the
/// LoRA projections' fused op.
#[test]
fn a_decoder_layer_keeps_what_its_backward_needs() -> Result<()> {
    let total = per_layer(&Device::Cpu)?;
    assert!(total > 10.0, "the layer's own inputs alone are more than this: {total:.2} C");
    assert!(total < 60.0, "a decoder layer keeps {total:.2} C per token");
    Ok(())
}

/// The GPU path (fused kernels everywhere), on the GPU machine:
/// `cargo test --release -p bayeslora --features cuda --test saved_memory -- --nocapture`.
#[cfg(feature = "cuda")]
#[test]
fn on_the_gpu_a_decoder_layer_keeps_what_its_backward_needs() -> Result<()> {
    let total = per_layer(&Device::new_cuda(0)?)?;
    assert!(total < 30.0, "a decoder layer keeps {total:.2} C per token on the GPU");
    Ok(())
}
