//! [`predict`]: what the posterior predictive costs at evaluation, forward only. One pass over
//! synthetic batches at the posterior mean, then K passes at posterior samples, through the
//! same loop as `bayeslora eval` ([`eval::evaluate`] with a [`ModelPredictor`]: sample k's
//! weights are drawn and written once per pass, then every batch runs with them). The number to
//! read is [`PredictTiming::ratio`], the K sampled passes over K mean passes (issue 17's target
//! for a 7B model: ≤ 1.1).
//!
//! The posterior is IVON's at the start of training, N(μ, σ²) with σ² = 1/(ess·(h₀ + δ)) from
//! `cfg.train.ivon` (`ess`, `hess_init`, `weight_decay`) over the adapter's posterior vars, μ
//! their initial values: the cost of a pass does not depend on what training made of μ and σ.
use super::{build, cpu_name, synthetic, Built, MemoryProbe, Source};
use crate::eval::{self, EvalConfig, ModelPredictor};
use crate::run::{self, Hooks, RunConfig};
use crate::train::Classifier;
use crate::{Error, Result};
use candle_core::DType;
use std::time::Instant;

/// What one [`predict`] measured.
#[derive(Debug, Clone)]
pub struct PredictTiming {
    /// Seconds of the pass at the mean (K = 0).
    pub mean_pass_seconds: f64,
    /// Seconds of each sampled pass (sample 0, 1, …): drawing and writing its weights, then the
    /// forward of every batch.
    pub sample_pass_seconds: Vec<f64>,
    /// Examples and tokens of one pass.
    pub examples: usize,
    pub tokens: usize,
    /// Frozen parameters of the model.
    pub n_frozen: usize,
    /// Values the posterior samples (the adapter's posterior vars).
    pub n_posterior: usize,
    /// Peak memory in bytes, and what it measures (see [`super::train`]).
    pub peak_bytes: u64,
    pub peak_kind: &'static str,
    pub device_name: String,
    /// From the start of the model build to the end of the warm-up batches.
    pub time_to_first_pass: f64,
    /// The target modules the architecture chose when `cfg.lora` names none.
    pub default_targets: Option<Vec<String>>,
}

impl PredictTiming {
    /// The K sampled passes' time over K × the mean pass's (1.0: sampling costs nothing).
    pub fn ratio(&self) -> f64 {
        let k = self.sample_pass_seconds.len() as f64;
        self.sample_pass_seconds.iter().sum::<f64>() / (k * self.mean_pass_seconds)
    }
}

/// Times the evaluation of `batches` synthetic batches of `cfg.train.batch.batch_size` ×
/// `cfg.max_len` tokens with the model of `source` and `cfg`'s adapter: `warmup` untimed
/// batches at the mean, then one pass at the mean and `samples` (K ≥ 1) at posterior samples.
pub fn predict(
    cfg: &RunConfig,
    source: &Source,
    samples: usize,
    batches: usize,
    warmup: usize,
    hooks: &mut dyn Hooks,
) -> Result<PredictTiming> {
    if samples == 0 || batches == 0 {
        return Err(Error::config(
            "samples, batches",
            format!("{samples}, {batches}"),
            "bench predict needs K ≥ 1 posterior samples (--samples) and ≥ 1 batch (--max-steps)",
        ));
    }
    let device = run::device(&cfg.device)?;
    let started = Instant::now();
    let mut memory = MemoryProbe::new(&device);
    let Built { model, n_frozen, vocab, decoder, default_targets } = build(cfg, source, &device, hooks)?;
    memory.sample();
    let bsz = cfg.train.batch.batch_size;
    let ivon = &cfg.train.ivon;
    let precision = ivon.ess * (ivon.hess_init + ivon.weight_decay);
    if !(precision.is_finite() && precision > 0.0) {
        return Err(Error::config(
            "train.ivon",
            format!("ess {} × (hess_init {} + weight_decay {})", ivon.ess, ivon.hess_init, ivon.weight_decay),
            "must be a positive number: it sets the posterior's σ",
        ));
    }
    let sigma = (1.0 / precision.sqrt()) as f32;
    let mut mean = Vec::new();
    for (_, v) in model.posterior_vars() {
        mean.extend(v.as_tensor().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
    }
    let n_posterior = mean.len();
    let std = vec![sigma; n_posterior];
    let mut predictor = ModelPredictor::from_posterior(&model, mean, Some(std), &device, cfg.train.seed)?;
    let eval_cfg = |num_samples| EvalConfig { method: "bench".into(), num_samples, batch_size: bsz, curve: vec![] };
    if warmup > 0 {
        let data = synthetic(bsz * warmup, cfg.max_len, vocab, decoder);
        eval::evaluate(&mut predictor, &data, &eval_cfg(0))?;
    }
    device.synchronize()?;
    let time_to_first_pass = started.elapsed().as_secs_f64();
    memory.sample();
    let data = synthetic(bsz * batches, cfg.max_len, vocab, decoder);
    let ev = eval::evaluate(&mut predictor, &data, &eval_cfg(samples))?;
    device.synchronize()?;
    memory.sample();
    let (mean_pass_seconds, sample_pass_seconds) = match ev.pass_seconds.split_first() {
        Some((m, rest)) if rest.len() == samples => (*m, rest.to_vec()),
        _ => {
            return Err(Error::run(format!(
                "bench predict: {} timed passes, expected 1 + {samples}",
                ev.pass_seconds.len()
            )))
        }
    };
    Ok(PredictTiming {
        mean_pass_seconds,
        sample_pass_seconds,
        examples: data.len(),
        tokens: data.len() * cfg.max_len,
        n_frozen,
        n_posterior,
        peak_bytes: memory.peak,
        peak_kind: memory.kind(),
        device_name: if device.is_cuda() { memory.name.clone() } else { cpu_name() },
        time_to_first_pass,
        default_targets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::lora::{LoraConfig, TargetModules};
    use crate::run::Quiet;
    use std::path::Path;

    #[test]
    fn sampled_passes_are_timed_one_each_and_the_posterior_covers_the_adapter() -> Result<()> {
        let shape = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/bench/tiny.json");
        let mut cfg = RunConfig { max_len: 8, ..Default::default() };
        cfg.train.batch.batch_size = 2;
        cfg.lora = LoraConfig {
            r: 2,
            lora_alpha: 4.0,
            target_modules: Some(TargetModules::List(vec!["q_proj".into(), "v_proj".into()])),
            ..Default::default()
        };
        let t = predict(&cfg, &Source::Shape(shape.clone()), 3, 2, 1, &mut Quiet)?;
        assert_eq!(t.sample_pass_seconds.len(), 3);
        assert_eq!((t.examples, t.tokens), (4, 32));
        assert!(t.mean_pass_seconds > 0.0 && t.ratio().is_finite() && t.ratio() > 0.0, "{t:?}");
        // tiny.json: 2 layers, hidden 64, 4 heads of 16, 2 kv heads: q is 64 → 64, v 64 → 32;
        // r 2 adds A (2 × 64) and B (out × 2) per module; the 2-way head is trainable too.
        let lora: usize = 2 * ((2 * 64 + 64 * 2) + (2 * 64 + 32 * 2));
        assert!(t.n_posterior >= lora, "{} posterior values, {lora} in the LoRA matrices alone", t.n_posterior);
        let err = predict(&cfg, &Source::Shape(shape), 0, 2, 0, &mut Quiet).unwrap_err().to_string();
        assert!(err.contains("K ≥ 1"), "{err}");
        Ok(())
    }
}
