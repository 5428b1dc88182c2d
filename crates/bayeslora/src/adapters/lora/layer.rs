//! [`LoraLayer`]: the LoRA path `scaling · B·A·dropout(x)` (Hu et al. 2021, arXiv 2106.09685) as an
//! [`Adapter`] riding on a frozen [`crate::adapters::Linear`], as PEFT's `lora.Linear.forward`
//! adds `lora_B(lora_A(dropout(x))) * scaling` to `base_layer(x)`.
//!
//! A `[r, in]` and B `[out, r]` are f32 [`Var`]s whatever the base dtype (bf16 compute keeps f32
//! adapter state); the input is cast to f32 and the [`crate::adapters::Linear`] casts the delta
//! back to the base dtype.
use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_distr::Distribution;

use crate::adapters::{Adapter, Ctx};
use crate::{ops, Error, Result};

/// Mixed into the layer's salt for the adapter-input dropout, so it never reuses a mask of the
/// model's own dropouts.
const LORA_DROPOUT_SALT: u64 = 0x10_7A_D0_00_00_00_00_00;

/// One LoRA adapter on one linear layer.
#[derive(Debug)]
pub struct LoraLayer {
    /// `[r, in]`, f32.
    lora_a: Var,
    /// `[out, r]`, f32.
    lora_b: Var,
    scaling: f64,
    dropout: f32,
}

impl LoraLayer {
    /// A fresh adapter as PEFT's default `init_lora_weights=True`: A Kaiming-uniform with
    /// a = √5 (`nn.init.kaiming_uniform_(A, a=math.sqrt(5))`, so bound = √(6/((1+a²)·in)) =
    /// 1/√in), B zero, so the adapted model starts equal to the base. Drawn from `seed` alone.
    pub fn new(
        in_features: usize,
        out_features: usize,
        r: usize,
        scaling: f64,
        dropout: f32,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        if r == 0 || in_features == 0 || out_features == 0 {
            return Err(Error::config(
                "r",
                r,
                format!("a LoRA layer needs r, in and out ≥ 1 (in = {in_features}, out = {out_features})"),
            ));
        }
        let bound = 1.0 / (in_features as f32).sqrt();
        let uniform = rand_distr::Uniform::new_inclusive(-bound, bound)
            .map_err(|e| Error::config("in_features", in_features, e.to_string()))?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let a: Vec<f32> = (0..r * in_features).map(|_| uniform.sample(&mut rng)).collect();
        let lora_a = Var::from_tensor(&Tensor::from_vec(a, (r, in_features), device)?)?;
        let lora_b = Var::zeros((out_features, r), DType::F32, device)?;
        Ok(Self { lora_a, lora_b, scaling, dropout })
    }

    /// A: `[r, in]`, f32.
    pub fn lora_a(&self) -> &Var {
        &self.lora_a
    }

    /// B: `[out, r]`, f32.
    pub fn lora_b(&self) -> &Var {
        &self.lora_b
    }

    pub fn rank(&self) -> usize {
        self.lora_a.dims().first().copied().unwrap_or(0)
    }

    pub fn scaling(&self) -> f64 {
        self.scaling
    }

    /// Overwrites A `[r, in]` and B `[out, r]` (any float dtype; stored as f32), e.g. from a
    /// PEFT `adapter_model.safetensors`. Shapes must match this layer's.
    pub fn set_weights(&self, a: &Tensor, b: &Tensor) -> Result<()> {
        for (name, var, t) in [("lora_A.weight", &self.lora_a, a), ("lora_B.weight", &self.lora_b, b)] {
            if var.dims() != t.dims() {
                return Err(Error::config(
                    name,
                    format!("{:?}", t.dims()),
                    format!("shape must be {:?} (A is [r, in], B is [out, r]; mlx stores them transposed)", var.dims()),
                ));
            }
            var.set(&t.to_dtype(DType::F32)?.to_device(var.device())?)?;
        }
        Ok(())
    }

    /// This layer's path in one forward: dropout (with its seed) only when training.
    fn path(&self, ctx: &Ctx, salt: u64) -> ops::LoraPath {
        let dropout = (ctx.train && self.dropout > 0.0).then(|| (self.dropout, ctx.seed_for(salt ^ LORA_DROPOUT_SALT)));
        ops::LoraPath { scaling: self.scaling, dropout }
    }
}

impl Adapter for LoraLayer {
    /// `x: [.., in]` → `scaling · dropout(x)·Aᵀ·Bᵀ`, `[.., out]`, f32 ([`ops::LoraPath::delta`]).
    fn forward(&self, x: &Tensor, ctx: &Ctx, salt: u64) -> Result<Tensor> {
        let (a, b) = (ctx.param(&self.lora_a), ctx.param(&self.lora_b));
        Ok(self.path(ctx, salt).delta(x, &a, &b)?.0)
    }

    /// Training (a recorded graph): the frozen projection and this path as one op,
    /// [`ops::lora_linear`], which keeps only x, A, B and `drop(x)·Aᵀ` for the backward (the
    /// composed graph kept five activation-sized buffers more). Its values are the composed
    /// `frozen_linear(x) + cast(forward(x))` bit for bit, except on CUDA in bf16/f16, where its
    /// products run in that dtype (`ops::lora_linear`'s mixed form). Without a graph: `None`, the
    /// composed path.
    fn forward_with_base(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        ctx: &Ctx,
        salt: u64,
    ) -> Option<Result<Tensor>> {
        if !ctx.grad {
            return None;
        }
        let (a, b) = (ctx.param(&self.lora_a), ctx.param(&self.lora_b));
        Some(ops::lora_linear(x, weight, bias, &a, &b, self.path(ctx, salt)).map_err(Into::into))
    }

    fn named_vars(&self) -> Vec<(String, Var)> {
        vec![("lora_A.weight".into(), self.lora_a.clone()), ("lora_B.weight".into(), self.lora_b.clone())]
    }

    fn peft_type(&self) -> &'static str {
        "LORA"
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_is_kaiming_uniform_and_zero_b() -> Result<()> {
        let l = LoraLayer::new(64, 10, 4, 2.0, 0.0, 3, &Device::Cpu)?;
        let a = l.lora_a().flatten_all()?.to_vec1::<f32>()?;
        let bound = 1.0 / 8.0;
        assert!(a.iter().all(|v| v.abs() <= bound));
        assert!(a.iter().any(|v| v.abs() > 0.9 * bound), "spread over the whole interval");
        assert_eq!(l.lora_b().sum_all()?.to_scalar::<f32>()?, 0.0);
        let again = LoraLayer::new(64, 10, 4, 2.0, 0.0, 3, &Device::Cpu)?;
        assert_eq!(again.lora_a().flatten_all()?.to_vec1::<f32>()?, a);
        Ok(())
    }

    #[test]
    fn forward_is_scaled_b_a_x_in_f32() -> Result<()> {
        let dev = Device::Cpu;
        let l = LoraLayer::new(3, 2, 1, 2.0, 0.0, 0, &dev)?;
        l.set_weights(&Tensor::new(&[[1f32, 2., 3.]], &dev)?, &Tensor::new(&[[1f32], [-1.]], &dev)?)?;
        let x = Tensor::new(&[[[1f32, 1., 1.]]], &dev)?.to_dtype(DType::BF16)?;
        let y = l.forward(&x, &Ctx::eval(), 0)?;
        assert_eq!(y.dtype(), DType::F32);
        assert_eq!(y.to_vec3::<f32>()?, vec![vec![vec![12.0, -12.0]]]);
        assert!(l
            .set_weights(&Tensor::zeros((3, 1), DType::F32, &dev)?, &Tensor::zeros((2, 1), DType::F32, &dev)?)
            .is_err());
        Ok(())
    }

    /// Evaluation keeps no graph: the output does not hold the vars (or the input) alive, so a
    /// model's evaluation forward frees each layer's activations as it goes.
    #[test]
    fn evaluation_records_no_graph() -> Result<()> {
        let dev = Device::Cpu;
        let l = LoraLayer::new(4, 3, 2, 1.0, 0.1, 0, &dev)?;
        let x = Tensor::ones((2, 4), DType::F32, &dev)?;
        assert!(!l.forward(&x, &Ctx::eval(), 0)?.track_op(), "eval: no graph");
        assert!(!l.forward(&x, &Ctx { grad: false, ..Ctx::train(3) }, 0)?.track_op(), "MC dropout samples: no graph");
        assert!(l.forward(&x, &Ctx::eval_with_grad(), 0)?.track_op());
        assert!(l.forward(&x, &Ctx::train(3), 0)?.track_op());
        assert_eq!(
            l.forward(&x, &Ctx::eval(), 0)?.to_vec2::<f32>()?,
            l.forward(&x, &Ctx::eval_with_grad(), 0)?.to_vec2::<f32>()?
        );
        Ok(())
    }

    #[test]
    fn dropout_only_when_training() -> Result<()> {
        let dev = Device::Cpu;
        let l = LoraLayer::new(16, 4, 2, 1.0, 0.5, 0, &dev)?;
        l.set_weights(&Tensor::ones((2, 16), DType::F32, &dev)?, &Tensor::ones((4, 2), DType::F32, &dev)?)?;
        let x = Tensor::ones((2, 16), DType::F32, &dev)?;
        let eval = l.forward(&x, &Ctx::eval(), 7)?;
        let train = l.forward(&x, &Ctx::train(1), 7)?;
        assert_eq!(eval.to_vec2::<f32>()?[0][0], 32.0);
        assert_ne!(train.to_vec2::<f32>()?, eval.to_vec2::<f32>()?);
        assert_eq!(train.to_vec2::<f32>()?, l.forward(&x, &Ctx::train(1), 7)?.to_vec2::<f32>()?);
        Ok(())
    }
}
