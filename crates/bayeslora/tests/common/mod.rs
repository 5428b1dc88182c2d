//! Helpers shared by the integration tests (each test binary uses a subset).
#![allow(dead_code)]
use std::collections::HashMap;
use std::path::Path;

use bayeslora::train::{Classifier, Observer, StepInfo, TaskModel};
use bayeslora::Result;
use candle_core::{DType, Device, Tensor};
use std::ops::ControlFlow;

/// The tensors of a fixture safetensors file, on the CPU.
pub fn load_io(file: &Path) -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(file, &Device::Cpu)?)
}

/// Max |got − want| with the worst flat index; panics with both when above `tol` (llm.c's
/// `check_tensor`).
pub fn check(name: &str, got: &Tensor, want: &Tensor, tol: f32) -> Result<f32> {
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    let g = got.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let w = want.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let (mut worst, mut at) = (0f32, 0usize);
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let d = (a - b).abs();
        if d > worst || d.is_nan() {
            (worst, at) = (d, i);
        }
    }
    println!("{name}: max abs err {worst:.3e} at flat index {at} (shape {:?})", got.dims());
    assert!(worst <= tol, "{name}: max abs err {worst:e} at flat index {at}: got {} want {}", g[at], w[at]);
    Ok(worst)
}

/// The tiny random BERT fixture (`fixtures/bert/tiny`, a 3-way classifier) with LoRA r 4 / α 8 on
/// query and value, initialised from `seed`.
pub fn tiny_bert(seed: u64, lora_dropout: f32) -> bayeslora::train::TaskModel {
    tiny_bert_on(seed, lora_dropout, &Device::Cpu)
}

/// [`tiny_bert`] on `device`.
pub fn tiny_bert_on(seed: u64, lora_dropout: f32, device: &Device) -> bayeslora::train::TaskModel {
    use bayeslora::adapters::lora::{LoraConfig, TargetModules};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bert/tiny");
    let options = bayeslora::models::LoadOptions { device: device.clone(), ..Default::default() };
    let loaded = bayeslora::models::load(&dir, &options).expect("tiny BERT fixture loads");
    let lora = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout,
        target_modules: Some(TargetModules::List(vec!["query".into(), "value".into()])),
        ..Default::default()
    };
    // The fixture checkpoint has a 3-way classifier; the synthetic task uses classes 0 and 1.
    bayeslora::train::TaskModel::build(loaded, &lora, 3, seed, device).expect("LoRA attaches")
}

/// A separable synthetic task for the tiny BERT: class 1 rows contain token 7, class 0 rows token
/// 9, the rest is noise from a fixed LCG (`salt` picks another stream).
pub fn separable(n: usize, salt: u64) -> bayeslora::data::EncodedDataset {
    use bayeslora::data::{Encoded, EncodedDataset, Format, Label, Task};
    let mut state = 12345u64 ^ salt;
    let mut next = || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) as u32
    };
    let rows = (0..n)
        .map(|i| {
            let len = 4 + (next() % 5) as usize;
            let mut ids: Vec<u32> = (0..len).map(|_| 20 + next() % 60).collect();
            let class = i % 2;
            ids[1 + (next() as usize % (len - 1))] = if class == 1 { 7 } else { 9 };
            ids.insert(0, 1);
            Encoded { type_ids: vec![0; ids.len()], ids, label: Label::Class(class), num_choices: 3 }
        })
        .collect();
    EncodedDataset {
        task: Task::Sst2,
        format: Format::Encoder,
        rows,
        num_classes: 3,
        label_token_ids: vec![],
        pad_id: 0,
        truncated: 0,
    }
}

/// Every trainable value of `model` as raw f32 bits, for bit-for-bit comparisons.
pub fn snapshot(model: &TaskModel) -> Vec<Vec<u32>> {
    model
        .trainable()
        .iter()
        .map(|(_, v)| {
            v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
        })
        .collect()
}

/// An observer that stops training after step `.0` (as Ctrl-C would).
pub struct StopAt(pub usize);
impl Observer for StopAt {
    fn step(&mut self, info: &StepInfo) -> ControlFlow<()> {
        if info.step == self.0 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }
}

/// The training settings of the tiny-model tests: `steps` optimizer steps of batch 8, seeds 3 and
/// 11, AdamW lr 1e-2 and an IVON that learns the separable task in a few dozen steps.
#[allow(dead_code)]
pub fn train_config(kind: bayeslora::train::OptimizerKind, steps: usize) -> bayeslora::train::TrainConfig {
    let mut cfg = bayeslora::train::TrainConfig {
        optimizer: kind,
        max_steps: Some(steps),
        batch: bayeslora::data::BatchConfig { batch_size: 8, seed: 3, ..Default::default() },
        seed: 11,
        ..Default::default()
    };
    cfg.adamw.lr = 1e-2;
    cfg.adamw.weight_decay = 0.0;
    cfg.ivon.lr = 0.1;
    cfg.ivon.ess = 1e4;
    cfg.ivon.hess_init = 1e-2;
    cfg.ivon.weight_decay = 0.0;
    cfg.ivon.rescale_lr = false;
    cfg.ivon.clip_radius = 0.2;
    cfg
}

/// The tiny random BERT with B-LoRA (r 4, α 8, μ 0.05) on query and value; `quantize` turns the
/// quantizers (weights, activations, base) on, otherwise only the rank gates act.
#[allow(dead_code)]
pub fn tiny_blora(seed: u64, quantize: bool) -> TaskModel {
    use bayeslora::adapters::blora::BLoraConfig;
    use bayeslora::adapters::lora::TargetModules;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bert/tiny");
    let loaded = bayeslora::models::load(&dir, &Default::default()).expect("tiny BERT fixture loads");
    let defaults = BLoraConfig::default();
    let cfg = BLoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        mu: 0.05,
        quantize: quantize && defaults.quantize,
        quantize_activations: quantize && defaults.quantize_activations,
        quantize_base: quantize && defaults.quantize_base,
        target_modules: Some(TargetModules::List(vec!["query".into(), "value".into()])),
        ..defaults
    };
    TaskModel::build_blora(loaded, &cfg, 3, seed, &Device::Cpu).expect("B-LoRA attaches")
}

/// What `t`'s op is (`None` for a leaf) and its inputs: the autograd graph walked by the
/// diagnostics `launch_counts` and `saved_memory`. Views (narrow, reshape of a contiguous
/// tensor, transpose, broadcast) are kinds starting with `view`.
pub fn graph_node(t: &Tensor) -> Option<(String, Vec<Tensor>)> {
    use candle_core::op::Op;
    let op = t.op().as_ref()?;
    let view = |name: &str, a: &Tensor| Some((format!("view {name}"), vec![a.clone()]));
    match op {
        Op::Binary(a, b, o) => Some((format!("binary {o:?}"), vec![a.clone(), b.clone()])),
        Op::Unary(a, o) => Some((format!("unary {o:?}"), vec![a.clone()])),
        Op::Cmp(a, _) => Some(("cmp".into(), vec![a.clone()])),
        Op::Reduce(a, o, _) => Some((format!("reduce {o:?}"), vec![a.clone()])),
        Op::Matmul(a, b) => Some(("matmul".into(), vec![a.clone(), b.clone()])),
        Op::Gather(a, i, _) | Op::IndexSelect(a, i, _) => Some(("index".into(), vec![a.clone(), i.clone()])),
        Op::Scatter(a, i, s, _) | Op::ScatterAdd(a, i, s, _) | Op::IndexAdd(a, i, s, _) => {
            Some(("scatter".into(), vec![a.clone(), i.clone(), s.clone()]))
        }
        Op::WhereCond(c, a, b) => Some(("where".into(), vec![c.clone(), a.clone(), b.clone()])),
        Op::Cat(v, _) => Some(("cat".into(), v.clone())),
        Op::Affine { arg, .. } => Some(("affine".into(), vec![arg.clone()])),
        Op::ToDType(a) => Some(("cast".into(), vec![a.clone()])),
        Op::Copy(a) => Some(("copy".into(), vec![a.clone()])),
        Op::Broadcast(a) => view("broadcast", a),
        Op::Narrow(a, ..) => view("narrow", a),
        Op::Transpose(a, ..) | Op::Permute(a, _) => view("transpose", a),
        Op::Reshape(a) if a.is_contiguous() => view("reshape", a),
        Op::Reshape(a) => Some(("copy (reshape)".into(), vec![a.clone()])),
        Op::SliceScatter0(a, b, _) => Some(("slice_scatter".into(), vec![a.clone(), b.clone()])),
        Op::ToDevice(a) => Some(("to_device".into(), vec![a.clone()])),
        Op::Elu(a, _) | Op::Powf(a, _) => Some(("unary".into(), vec![a.clone()])),
        Op::CustomOp1(a, o) => Some((format!("custom {}", o.name()), vec![a.clone()])),
        Op::CustomOp2(a, b, o) => Some((format!("custom {}", o.name()), vec![a.clone(), b.clone()])),
        Op::CustomOp3(a, b, c, o) => Some((format!("custom {}", o.name()), vec![a.clone(), b.clone(), c.clone()])),
        _ => Some(("other".into(), vec![])),
    }
}

/// The address of `t`'s storage: views of one buffer share it.
pub fn storage_of(t: &Tensor) -> usize {
    let (storage, _) = t.storage_and_layout();
    &*storage as *const candle_core::Storage as usize
}
