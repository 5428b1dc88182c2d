//! LoRA on the tiny BERT fixture: gradients reach exactly the adapter (and head) vars, and bad
//! target modules fail with the available names.
use std::path::{Path, PathBuf};

use bayeslora::adapters::lora::{attach, LoraConfig, TargetModules};
use bayeslora::adapters::{Ctx, HasLinears};
use bayeslora::models::{self, Architecture, Backbone, Bert, LoadOptions, SequenceClassificationHead};
use bayeslora::{ops, Result};
use candle_core::{DType, Device, Tensor};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bert/tiny")
}

fn load() -> Result<(Bert, models::LoadedModel)> {
    let loaded = models::load(&tiny(), &LoadOptions::default())?;
    let Backbone::Bert(bert) = loaded.backbone.clone() else { panic!("not a BERT") };
    Ok((bert, loaded))
}

#[test]
fn gradients_reach_every_adapter_var_and_no_base_weight() -> Result<()> {
    let (mut bert, loaded) = load()?;
    let cfg = LoraConfig { r: 4, lora_alpha: 8.0, ..LoraConfig::default() }.with_default_targets(Architecture::Bert);
    let lora = attach(&mut bert, &cfg, 42, &Device::Cpu)?;
    assert_eq!(lora.len(), 4, "query and value of 2 layers");
    let head =
        SequenceClassificationHead::load_or_init(&loaded.weights, &bert.config().head_config(), 3, 0, &Device::Cpu)?;

    let dev = Device::Cpu;
    let ids = Tensor::new(&[[5u32, 17, 3, 88, 2], [9, 4, 60, 0, 0]], &dev)?;
    let mask = Tensor::new(&[[1f32, 1., 1., 1., 1.], [1., 1., 1., 0., 0.]], &dev)?;
    let labels = Tensor::new(&[2u32, 0], &dev)?;
    let ctx = Ctx::train(7); // dropout on (hidden, attention): gradients must still flow
    let hidden = bert.forward(&ids, None, &mask, &ctx)?;
    let logits = head.forward(&bert.pooled(&hidden, &ctx)?, &ctx)?;
    let loss = ops::cross_entropy(&logits, &labels)?;
    let grads = loss.backward()?;

    for (name, var) in lora.named_vars_with_prefix("bert.") {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_eq!(g.dims(), var.dims(), "{name}");
        let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
        if name.contains("lora_B") {
            assert!(norm > 0.0, "{name}: B gets a gradient at init (A is random)");
        } else {
            assert_eq!(norm, 0.0, "{name}: A's gradient is zero at init because B = 0");
        }
    }
    for var in head.vars() {
        assert!(grads.get(var.as_tensor()).is_some(), "the head is trainable");
    }
    for (name, linear) in bert.linears_mut() {
        assert!(grads.get(&linear.weight).is_none(), "{name}.weight is frozen but has a gradient");
        if let Some(b) = &linear.bias {
            assert!(grads.get(b).is_none(), "{name}.bias is frozen but has a gradient");
        }
    }
    Ok(())
}

#[test]
fn zero_b_adapter_leaves_outputs_unchanged_until_trained() -> Result<()> {
    let (mut bert, _) = load()?;
    let dev = Device::Cpu;
    let ids = Tensor::new(&[[5u32, 17, 3]], &dev)?;
    let mask = Tensor::ones((1, 3), DType::F32, &dev)?;
    let before = bert.forward(&ids, None, &mask, &Ctx::eval())?;
    let cfg = LoraConfig {
        target_modules: Some(TargetModules::Regex(r"encoder\.layer\.\d+\.(attention\.output|output)\.dense".into())),
        use_rslora: true,
        ..LoraConfig::default()
    };
    let lora = attach(&mut bert, &cfg, 1, &dev)?;
    assert_eq!(lora.len(), 4);
    assert!(lora.get("encoder.layer.1.output.dense").is_some());
    assert!(lora.get("encoder.layer.1.intermediate.dense").is_none());
    let after = bert.forward(&ids, None, &mask, &Ctx::eval())?;
    assert_eq!(before.sub(&after)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
    Ok(())
}

#[test]
fn unknown_target_module_lists_available_names() -> Result<()> {
    let (mut bert, _) = load()?;
    let cfg = LoraConfig {
        target_modules: Some(TargetModules::List(vec!["query".into(), "q_proj".into()])),
        ..LoraConfig::default()
    };
    let msg = attach(&mut bert, &cfg, 0, &Device::Cpu).err().map(|e| e.to_string()).unwrap_or_default();
    println!("{msg}");
    assert!(msg.contains("target_modules = \"q_proj\""), "{msg}");
    assert!(msg.contains("encoder.layer.*.attention.self.query") && msg.contains("pooler.dense"), "{msg}");
    let cfg = LoraConfig { target_modules: Some(TargetModules::Regex("decoder.*".into())), ..LoraConfig::default() };
    let msg = attach(&mut bert, &cfg, 0, &Device::Cpu).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("decoder.*") && msg.contains("available"), "{msg}");
    assert!(bert.linears_mut().iter().all(|(_, l)| l.adapter.is_none()), "nothing attached on error");
    Ok(())
}
