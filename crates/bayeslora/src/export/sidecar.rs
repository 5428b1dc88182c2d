//! The posterior sidecar: `adapter_posterior.safetensors` + `adapter_posterior.json` next to a
//! PEFT adapter. Nothing in PEFT defines it (`reference/peers.md` §4, "Bayesian extras"), so
//! peft, vLLM and mistral.rs ignore it and load the mean adapter; bayeslora reads it back to
//! sample the IVON posterior N(μ, diag(σ²)), σ = 1/√(ess·(h+δ)), again.
//!
//! Tensors (f32, shaped like the adapter tensor they describe): `<key>.mean` (μ, equal to the
//! adapter's own tensor), `<key>.hess` (h) and `<key>.momentum` (m, not debiased), where `<key>`
//! is the tensor's name in `adapter_model.safetensors`
//! (`base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight`,
//! `base_model.model.classifier.weight`). The JSON holds the IVON hyper-parameters (per group),
//! each key's group, the step count and the conventions needed to reproduce an evaluation.
use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{atomic, Error, Result};

pub const POSTERIOR_TENSORS: &str = "adapter_posterior.safetensors";
pub const POSTERIOR_JSON: &str = "adapter_posterior.json";
const FORMAT_VERSION: u32 = 1;

/// One adapter tensor covered by the posterior.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PosteriorParam {
    /// Its name in `adapter_model.safetensors`.
    pub key: String,
    /// Index into [`PosteriorMeta::groups`].
    pub group: usize,
    pub shape: Vec<usize>,
    /// Whether IVON treated its gradient as zero.
    pub frozen: bool,
}

/// `adapter_posterior.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PosteriorMeta {
    pub format_version: u32,
    /// `"ivon"` (the only one so far).
    pub method: String,
    /// `bayeslora <version>`.
    pub producer: String,
    /// IVON updates applied.
    pub step: u64,
    /// The posterior std, spelled out for readers of the file.
    pub std_formula: String,
    /// ess, weight_decay and hess_init of the adapter group (group 0), for quick reading.
    pub ess: f64,
    pub weight_decay: f64,
    pub hess_init: f64,
    /// The global IVON config (ivon-opt names).
    pub config: ivon::IvonConfig,
    /// Resolved hyper-parameters per group (adapter, then a fresh head if it had its own).
    pub groups: Vec<ivon::GroupHyper>,
    /// Every tensor, in the optimizer's flat order.
    pub params: Vec<PosteriorParam>,
    /// How calibration is reported next to this adapter (`specs/evaluation.md`).
    pub ece: String,
    /// Free-form extras from the exporter (task, label names, metrics, …).
    #[serde(default)]
    pub extras: serde_json::Map<String, serde_json::Value>,
}

/// The ECE convention of our reports.
pub(crate) const ECE_CONVENTION: &str = "ECE-15: torchmetrics CalibrationError(n_bins=15, \
norm='l1'), top-label, bins [lo, hi), conf == 1 in its own bin; ECE-10: ivon-lora, bins (lo, hi]; \
the predictive averages softmax probabilities over K posterior samples";

/// Writes the sidecar for `posterior`, whose flat order is `named`'s (each tensor's name in the
/// adapter file and its var, whose shape the posterior's layout must have).
pub(crate) fn write(
    dir: &Path,
    named: &[(String, Var)],
    posterior: &ivon::Posterior,
    extras: &serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    let file = dir.join(POSTERIOR_TENSORS);
    if named.len() != posterior.params.len() {
        return Err(Error::config(
            "posterior",
            format!("{} vars", posterior.params.len()),
            format!("the model has {} trainable tensors; pass the optimizer of this model", named.len()),
        ));
    }
    for ((key, var), layout) in named.iter().zip(&posterior.params) {
        if var.dims() != layout.shape.as_slice() {
            return Err(Error::TensorShape {
                file: file.clone(),
                name: key.clone(),
                expected: var.dims().to_vec(),
                got: layout.shape.clone(),
            });
        }
    }

    let mut tensors = HashMap::new();
    let mut params = Vec::with_capacity(named.len());
    let mut offset = 0;
    for ((key, _), p) in named.iter().zip(&posterior.params) {
        let n: usize = p.shape.iter().product();
        if offset + n > posterior.mean.len() {
            return Err(Error::BadFile {
                file: file.clone(),
                reason: "the posterior's layout is longer than its state".into(),
            });
        }
        for (suffix, flat) in [("mean", &posterior.mean), ("hess", &posterior.hess), ("momentum", &posterior.momentum)]
        {
            let t = Tensor::from_slice(&flat[offset..offset + n], p.shape.as_slice(), &Device::Cpu)?;
            tensors.insert(format!("{key}.{suffix}"), t);
        }
        params.push(PosteriorParam { key: key.clone(), group: p.group, shape: p.shape.clone(), frozen: p.frozen });
        offset += n;
    }
    let g0 = posterior.groups.first().copied().unwrap_or(posterior.config.defaults());
    let meta = PosteriorMeta {
        format_version: FORMAT_VERSION,
        method: "ivon".into(),
        producer: format!("bayeslora {}", env!("CARGO_PKG_VERSION")),
        step: posterior.step,
        std_formula: "std = 1 / sqrt(ess * (hess + weight_decay)), per group".into(),
        ess: g0.ess,
        weight_decay: g0.weight_decay,
        hess_init: g0.hess_init,
        config: posterior.config,
        groups: posterior.groups.clone(),
        params,
        ece: ECE_CONVENTION.into(),
        extras: extras.clone(),
    };
    let metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("bayeslora".to_string(), "adapter_posterior".to_string()),
    ]);
    atomic::write_safetensors(&file, &tensors, Some(metadata))?;
    atomic::write_json(&dir.join(POSTERIOR_JSON), &meta)
}

/// Removes a sidecar left by an earlier export into the same folder (a point estimate must
/// not inherit another run's posterior).
pub(crate) fn remove_stale(dir: &Path) -> Result<()> {
    for name in [POSTERIOR_TENSORS, POSTERIOR_JSON] {
        let p = dir.join(name);
        if p.exists() {
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(())
}

/// Reads the sidecar, if both files are present, as an IVON posterior over `keys` (the order
/// of the model's trainable tensors). `Ok(None)` when it is absent or does not cover `keys`
/// (with a warning).
pub(crate) fn read(dir: &Path, keys: &[(String, Vec<usize>)]) -> Result<Option<(PosteriorMeta, ivon::Posterior)>> {
    let (tfile, jfile) = (dir.join(POSTERIOR_TENSORS), dir.join(POSTERIOR_JSON));
    if !tfile.is_file() || !jfile.is_file() {
        tracing::warn!(
            "{}: no posterior sidecar ({POSTERIOR_JSON} + {POSTERIOR_TENSORS}); \
             predicting with the mean adapter only",
            dir.display()
        );
        return Ok(None);
    }
    let text = std::fs::read_to_string(&jfile).map_err(|e| Error::io(&jfile, e))?;
    let meta: PosteriorMeta = serde_json::from_str(&text)
        .map_err(|e| Error::BadFile { file: jfile.clone(), reason: format!("invalid posterior sidecar: {e}") })?;
    if meta.format_version != FORMAT_VERSION || meta.method != "ivon" {
        return Err(Error::BadFile {
            file: jfile,
            reason: format!(
                "posterior format {} / method `{}` is not supported (expected {FORMAT_VERSION} / ivon)",
                meta.format_version, meta.method
            ),
        });
    }
    let tensors = candle_core::safetensors::load(&tfile, &Device::Cpu)
        .map_err(|e| Error::BadFile { file: tfile.clone(), reason: e.to_string() })?;
    let by_key: HashMap<&str, &PosteriorParam> = meta.params.iter().map(|p| (p.key.as_str(), p)).collect();
    if let Some((missing, _)) = keys.iter().find(|(k, _)| !by_key.contains_key(k.as_str())) {
        tracing::warn!(
            "{}: the posterior does not cover `{missing}`; predicting with the mean adapter only",
            jfile.display()
        );
        return Ok(None);
    }
    let (mut mean, mut hess, mut momentum, mut params) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (key, shape) in keys {
        let p = by_key[key.as_str()];
        if &p.shape != shape || p.group >= meta.groups.len() {
            return Err(Error::TensorShape {
                file: tfile.clone(),
                name: key.clone(),
                expected: shape.clone(),
                got: p.shape.clone(),
            });
        }
        for (suffix, out) in [("mean", &mut mean), ("hess", &mut hess), ("momentum", &mut momentum)] {
            let name = format!("{key}.{suffix}");
            let t =
                tensors.get(&name).ok_or_else(|| Error::MissingTensor { file: tfile.clone(), name: name.clone() })?;
            if t.dims() != shape.as_slice() {
                return Err(Error::TensorShape {
                    file: tfile.clone(),
                    name,
                    expected: shape.clone(),
                    got: t.dims().to_vec(),
                });
            }
            out.extend(t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        }
        params.push(ivon::ParamLayout { group: p.group, shape: shape.clone(), frozen: p.frozen });
    }
    let posterior = ivon::Posterior {
        config: meta.config,
        groups: meta.groups.clone(),
        params,
        mean,
        momentum,
        hess,
        step: meta.step,
        noise: None,
    };
    Ok(Some((meta, posterior)))
}
