//! LoRA (Hu et al. 2021, arXiv 2106.09685) as PEFT implements it (`src/peft/tuners/lora/`):
//! `y = W·x + scaling · B·A·dropout(x)`, with `scaling = lora_alpha / r` (or `/ sqrt(r)` with
//! rsLoRA), A Kaiming-uniform and B zero at init.
//!
//! - [`config`]: [`LoraConfig`] with PEFT's field names and defaults, target matching, scaling;
//! - [`layer`]: [`LoraLayer`], the [`crate::adapters::Adapter`] (f32 A and B vars);
//! - [`inject`]: [`attach`], which installs layers on a model's linears by HF module name.
//!
//! ```
//! use bayeslora::adapters::lora::{attach, LoraConfig, TargetModules};
//! use bayeslora::adapters::{HasLinears, Linear};
//! use candle_core::{DType, Device, Tensor};
//! struct One(Linear);
//! impl HasLinears for One {
//!     fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> { vec![("q_proj".into(), &mut self.0)] }
//! }
//! let mut m = One(Linear::new(Tensor::zeros((4, 6), DType::F32, &Device::Cpu)?, None));
//! let cfg = LoraConfig { r: 2, target_modules: Some(TargetModules::List(vec!["q_proj".into()])), ..Default::default() };
//! let lora = attach(&mut m, &cfg, 0, &Device::Cpu)?;
//! assert_eq!(lora.named_vars()[0].0, "base_model.model.q_proj.lora_A.weight");
//! # Ok::<(), bayeslora::Error>(())
//! ```
pub mod config;
pub mod inject;
pub mod layer;

pub use config::{scaling, LoraBias, LoraConfig, TargetModules};
pub use inject::{attach, AttachedAdapters, PEFT_PREFIX};
pub use layer::LoraLayer;
