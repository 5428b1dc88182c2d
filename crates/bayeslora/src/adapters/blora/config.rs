//! [`BLoraConfig`]: the B-LoRA hyper-parameters (`shared/specs/blora.md`), with LoRA's field names
//! (`r`, `lora_alpha`, `lora_dropout`, `target_modules`) so values paste over from PEFT, and the
//! gate/quantizer switches of the authors' PEFT fork (`KseniaSycheva/peft`, `tuners/blora`) as
//! booleans and enums.
use crate::adapters::lora::TargetModules;
use crate::models::Architecture;
use crate::{Error, Result};

/// How the adapter starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitE {
    /// PEFT LoRA's start (our default): A Kaiming-uniform (bound 1/√in), B = 0, E = 1, so the
    /// model starts at the base function and B gets LoRA-sized gradients from step one. Measured
    /// on the H200 (`docs/results.md`, B-LoRA): with `zero`, MiniLM stayed at the majority class
    /// after 90 steps on SST-2 (rank-only ablation too), because every gradient of E, A and B is
    /// a product of two N(0, 0.02²) factors.
    #[default]
    Lora,
    /// AdaLoRA's start: A, B ~ N(0, 0.02²), E = 0 (needs thousands of steps).
    Zero,
    /// The B-LoRA fork's start: A, B ~ N(0, 0.02²), E ~ N(0, 1) (ΔW ≠ 0 at step 0).
    Normal,
}

/// What a gate costs in the prior `μ · Σ_g cost(g) · P(g and every lower gate on)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateCost {
    /// The bit operations the gate adds (Bayesian Bits' `reg_type="bop"`): the prior is the
    /// layer's expected BOPs, divided by the mean over adapted layers of their BOPs with every
    /// gate on.
    #[default]
    Bops,
    /// 1 per gate (the B-LoRA fork's `reg_type="const"`): the prior is the expected number of open
    /// gates, divided by the layer's number of gates.
    Const,
}

/// B-LoRA hyper-parameters. Both costs are normalised so that one layer's prior lies in [0, 1]
/// (≈ 1 with every gate on), which gives `mu` the same meaning under either cost.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BLoraConfig {
    /// Initial rank of `B·diag(E)·A`; rank gates can only prune it.
    pub r: usize,
    /// Scale numerator: the update is scaled by `lora_alpha / r` (fixed; no live rank count).
    pub lora_alpha: f64,
    /// Dropout on the adapter's input (training only).
    pub lora_dropout: f32,
    /// Which linears get an adapter; `None` means the architecture's default
    /// ([`Architecture::query_key_value`]: the B-LoRA fork's `run_glue.py`
    /// `lora_module="query_proj,value_proj,key_proj"`), filled in by [`BLoraConfig::with_default_targets`].
    pub target_modules: Option<TargetModules>,
    /// Nested rank gates on the components of E (false: the "quantization-only" ablation).
    pub prune_rank: bool,
    /// Bit gates and quantizers (false: the "rank-only" ablation; every tensor stays f32).
    pub quantize: bool,
    /// Also quantize the adapter-path activations `x·Aᵀ`, `·E` and `·Bᵀ` (needs `quantize`).
    pub quantize_activations: bool,
    /// Also quantize the frozen base weight W0 and the layer input x (needs `quantize`); W0
    /// dominates the BOPs, so without this the BOPs saving is the adapter's only.
    pub quantize_base: bool,
    /// How `lora_E` starts.
    pub init_e: InitE,
    /// Initial log α of every rank gate (P(z > 0) = 0.9995 at 6).
    pub rank_gate_init: f64,
    /// Initial log α of the 4-, 8-, 16- and 32-bit gates of every quantizer.
    pub bit_gate_init: [f64; 4],
    /// Gate cost in the prior.
    pub cost: GateCost,
    /// Prior strength μ: loss = task + μ · Σ_layers prior. Tune it by a sweep.
    pub mu: f64,
    /// Warm-up of the prior: μ grows linearly from μ/N at the first step to μ at step N, so the
    /// adapter learns the task before the prior pushes gates shut (0: the full μ from the start).
    pub mu_warmup_steps: usize,
    /// Adam learning rate for the gate logits (a separate optimizer, no weight decay).
    pub gate_lr: f64,
}

impl Default for BLoraConfig {
    /// r 8, lora_alpha 16 (2× r, our LoRA runs), lora_dropout 0.1 (our LoRA runs; the fork uses
    /// 0.05), both gate kinds on, activations quantized, base not quantized, LoRA's init (E = 1, B = 0),
    /// gates at log α 6 (the fork's `gamma_*_init` and rank init; Bayesian Bits' CIFAR-10
    /// setting), BOP costs, μ 0.01 (the low end of Bayesian Bits' 0.01–0.2 under the same
    /// per-layer [0, 1] normalisation; the fork's `quantization_lmbd` 1e-3 on ~30 unnormalised
    /// gates per layer is ≈ 0.03 here), gate lr 1e-2 (the fork's declared `gates_lr`).
    fn default() -> Self {
        BLoraConfig {
            r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.1,
            target_modules: None,
            prune_rank: true,
            quantize: true,
            quantize_activations: true,
            quantize_base: false,
            init_e: InitE::Lora,
            rank_gate_init: 6.0,
            bit_gate_init: [6.0; 4],
            cost: GateCost::Bops,
            mu: 0.01,
            mu_warmup_steps: 0,
            gate_lr: 1e-2,
        }
    }
}

impl BLoraConfig {
    /// Fills `target_modules` with the architecture's default when it is unset.
    pub fn with_default_targets(mut self, arch: Architecture) -> Self {
        if self.target_modules.is_none() {
            let names = arch.query_key_value().iter().map(|s| s.to_string()).collect();
            self.target_modules = Some(TargetModules::List(names));
        }
        self
    }

    /// `lora_alpha / r`.
    pub fn scaling(&self) -> f64 {
        self.lora_alpha / self.r as f64
    }

    /// Checks every field; errors quote the field and its value.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::config("r", self.r, "the initial rank must be at least 1"));
        }
        if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            return Err(Error::config("lora_alpha", self.lora_alpha, "must be a positive number"));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(Error::config("lora_dropout", self.lora_dropout, "must be in [0, 1)"));
        }
        match &self.target_modules {
            Some(TargetModules::List(names)) if names.is_empty() || names.iter().any(|n| n.trim().is_empty()) => {
                return Err(Error::config(
                    "target_modules",
                    format!("{names:?}"),
                    "list at least one non-empty module name, e.g. [\"query\", \"key\", \"value\"]",
                ));
            }
            Some(t @ TargetModules::Regex(_)) => {
                t.matches("")?;
            }
            _ => {}
        }
        if !self.quantize && (self.quantize_activations || self.quantize_base) {
            let field = if self.quantize_base { "quantize_base" } else { "quantize_activations" };
            return Err(Error::config(
                field,
                true,
                "needs quantize = true; set quantize_activations = false and quantize_base = false for the rank-only ablation",
            ));
        }
        if !self.rank_gate_init.is_finite() {
            return Err(Error::config("rank_gate_init", self.rank_gate_init, "must be a finite log α"));
        }
        if let Some(bad) = self.bit_gate_init.iter().find(|v| !v.is_finite()) {
            return Err(Error::config("bit_gate_init", bad, "every log α must be finite"));
        }
        if !(self.mu.is_finite() && self.mu >= 0.0) {
            return Err(Error::config("mu", self.mu, "must be a non-negative number (0 switches the prior off)"));
        }
        if !(self.gate_lr.is_finite() && self.gate_lr > 0.0) {
            return Err(Error::config("gate_lr", self.gate_lr, "must be a positive number"));
        }
        Ok(())
    }

    /// Whether the layers carry any gate at all (false: a plain `B·diag(E)·A` adapter).
    pub fn has_gates(&self) -> bool {
        (self.prune_rank && self.r > 1) || self.quantize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<BLoraConfig> {
        serde_json::from_str(s).map_err(|e| Error::config("json", s, e.to_string()))
    }

    #[test]
    fn serde_round_trip_and_defaults() -> Result<()> {
        let c = BLoraConfig { cost: GateCost::Const, init_e: InitE::Normal, ..BLoraConfig::default() };
        let text = serde_json::to_string(&c).map_err(|e| Error::config("json", "", e.to_string()))?;
        assert!(text.contains("\"cost\":\"const\"") && text.contains("\"init_e\":\"normal\""), "{text}");
        assert_eq!(parse(&text)?, c);
        let partial = parse(r#"{"r": 4, "target_modules": ["query"], "bit_gate_init": [6, 6, 6, -6]}"#)?;
        assert_eq!((partial.r, partial.lora_alpha, partial.bit_gate_init[3]), (4, 16.0, -6.0));
        partial.validate()?;
        assert!(parse(r#"{"rank": 4}"#).is_err(), "unknown fields are rejected");
        assert!(parse(r#"{"cost": "flops"}"#).is_err());
        Ok(())
    }

    #[test]
    fn validate_quotes_field_and_value() {
        let msg = |c: BLoraConfig| c.validate().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg(BLoraConfig { r: 0, ..Default::default() }).contains("r = 0"));
        assert!(msg(BLoraConfig { mu: -1.0, ..Default::default() }).contains("mu = -1"));
        assert!(msg(BLoraConfig { gate_lr: 0.0, ..Default::default() }).contains("gate_lr = 0"));
        let m = msg(BLoraConfig { quantize: false, ..Default::default() });
        assert!(m.contains("quantize_activations = true"), "{m}");
        assert!(BLoraConfig { quantize: false, quantize_activations: false, ..Default::default() }.validate().is_ok());
        let t = BLoraConfig { target_modules: Some(TargetModules::List(vec![])), ..Default::default() };
        assert!(msg(t).contains("target_modules"));
        let re = BLoraConfig { target_modules: Some(TargetModules::Regex("(".into())), ..Default::default() };
        assert!(re.validate().is_err());
    }

    #[test]
    fn default_targets_are_qkv() {
        let c = BLoraConfig::default().with_default_targets(Architecture::Bert);
        assert_eq!(c.target_modules, Some(TargetModules::List(vec!["query".into(), "key".into(), "value".into()])));
        assert_eq!(BLoraConfig::default().scaling(), 2.0);
    }
}
