//! The adapter slot every model linear carries: [`Linear`] (a frozen `weight`/`bias` plus an
//! optional [`Adapter`]), the [`Adapter`] trait that methods implement (`crate::adapters`), the
//! per-forward [`Ctx`], and [`HasLinears`], through which adapters are attached by HF module
//! name. Models know this slot, never a method: `adapters/` builds on it.
use crate::Result;
use candle_core::{Tensor, Var};
use std::sync::Arc;

/// Per-forward settings: training or evaluation, and the seed every stochastic op (dropout)
/// derives its mask from, so that a step is reproducible from `(seed, layer)` alone.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ctx {
    /// Dropout on (training) or off (evaluation, also for posterior samples).
    pub train: bool,
    /// Base seed for this forward pass; layers mix in their own index.
    pub seed: u64,
    /// Recompute each decoder layer in the backward instead of keeping its activations
    /// ([`crate::ops::checkpoint`]; the training loop's `gradient_checkpointing`).
    pub checkpoint: bool,
    /// Record the trainable vars in the autograd graph (training, the Laplace Fisher). Off for
    /// evaluation: the adapters read their vars detached ([`Ctx::param`]), so no forward output
    /// holds its inputs alive and an evaluation forward keeps one layer's activations at a
    /// time instead of every layer's (`torch.no_grad()`).
    pub grad: bool,
}

impl Ctx {
    /// Evaluation mode: no dropout.
    pub fn eval() -> Self {
        Ctx { train: false, seed: 0, checkpoint: false, grad: false }
    }
    /// Evaluation mode that still records the graph (no dropout, gradients of the vars).
    pub fn eval_with_grad() -> Self {
        Ctx { grad: true, ..Ctx::eval() }
    }
    /// Training mode with a per-step seed.
    pub fn train(seed: u64) -> Self {
        Ctx { train: true, seed, checkpoint: false, grad: true }
    }
    /// A trainable var as a tensor of this forward: tracked when `grad` is on, detached (no
    /// graph) otherwise.
    pub fn param(&self, v: &Var) -> Tensor {
        if self.grad {
            v.as_tensor().clone()
        } else {
            v.as_tensor().detach()
        }
    }
    /// A derived seed for one call site (`salt` = layer index, module id...).
    pub fn seed_for(&self, salt: u64) -> u64 {
        // SplitMix64 finaliser: cheap, well-mixed, deterministic.
        let mut z = self.seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// A trainable path added to a frozen linear layer's output.
pub trait Adapter: Send + Sync + std::fmt::Debug {
    /// The additive output for input `x: [.., in]` → `[.., out]`. `salt` identifies the layer
    /// for dropout seeding.
    fn forward(&self, x: &Tensor, ctx: &Ctx, salt: u64) -> Result<Tensor>;
    /// Trainable variables with their on-disk suffix (`lora_A.weight`, `lora_B.weight`).
    fn named_vars(&self) -> Vec<(String, Var)>;
    /// The method's name as PEFT spells it (`LORA`).
    fn peft_type(&self) -> &'static str;
    /// The whole layer output `y` for `x: [.., in]` when the adapter also changes the base path
    /// (B-LoRA's `quantize_base` quantizes W0 and x); `None` (the default) keeps the frozen base
    /// plus [`Adapter::forward`].
    fn forward_with_base(
        &self,
        _x: &Tensor,
        _weight: &Tensor,
        _bias: Option<&Tensor>,
        _ctx: &Ctx,
        _salt: u64,
    ) -> Option<Result<Tensor>> {
        None
    }
    /// The adapter's own prior term for the loss (scalar, without the method's strength μ);
    /// `None` for methods without one (LoRA).
    fn regularizer(&self) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// Gate logits, trained by their own optimizer (B-LoRA: Adam at `gate_lr`); empty for LoRA.
    fn named_gate_vars(&self) -> Vec<(String, Var)> {
        vec![]
    }
    /// Downcasting hook for exporters.
    fn as_any(&self) -> &dyn std::any::Any;
}

/// A linear layer `y = x·Wᵀ + b` with a frozen base and an optional adapter slot.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`, frozen (never a Var; never gets a gradient).
    pub weight: Tensor,
    /// `[out]`, frozen.
    pub bias: Option<Tensor>,
    /// The adapter riding on this layer, if any.
    pub adapter: Option<Arc<dyn Adapter>>,
    /// Stable id used to seed this layer's dropout.
    pub salt: u64,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight, bias, adapter: None, salt: 0 }
    }
    pub fn in_features(&self) -> usize {
        self.weight.dims().get(1).copied().unwrap_or(0)
    }
    pub fn out_features(&self) -> usize {
        self.weight.dims().first().copied().unwrap_or(0)
    }
    /// `x: [.., in]` → `[.., out]`; the base path never computes dW.
    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        if let Some(y) =
            self.adapter.as_ref().and_then(|a| a.forward_with_base(x, &self.weight, self.bias.as_ref(), ctx, self.salt))
        {
            return y;
        }
        let y = crate::ops::frozen_linear(x, &self.weight, self.bias.as_ref())?;
        match &self.adapter {
            Some(a) => Ok(y.add(&crate::ops::cast(&a.forward(x, ctx, self.salt)?, y.dtype())?)?),
            None => Ok(y),
        }
    }
}

/// What a model exposes so adapters can be attached by HF module name
/// (`model.layers.0.self_attn.q_proj`, `encoder.layer.0.attention.self.query`).
pub trait HasLinears {
    /// Every adaptable linear with its full HF module name, in a stable order.
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)>;
}
