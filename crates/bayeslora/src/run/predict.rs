//! An adapter served for prediction ([`Served`]): a base model with a trained adapter over it,
//! answering new inputs with class probabilities and their uncertainty (`bayeslora predict`).
//!
//! Inputs are lines: plain text, or JSON `{"text", "text_pair"}` (encoders, and decoders trained
//! on a label-word prompt) / `{"question", "choices", "context"}` (decoders trained on multiple
//! choice). Each chunk of lines is written as the data module's JSONL and read back as a data
//! set, so prompts and tokenization are the training ones. With the adapter's IVON sidecar, K
//! posterior samples are drawn (the same K for every chunk) and their softmax probabilities
//! averaged; each answer carries the predictive entropy H[p̄] and the mutual information
//! H[p̄] − mean_k H[p_k] (the epistemic part). Without a sidecar, K = 0: the mean adapter alone,
//! MI = 0. A B-LoRA adapter folder (`compressed/` inside) is served in its compressed form, the
//! gated model at its learned ranks and bits; trained with IVON, its sidecar there samples A, E, B.
//!
//! ```no_run
//! # fn main() -> bayeslora::Result<()> {
//! let device = candle_core::Device::Cpu;
//! let served = bayeslora::run::Served::open("models/smollm2".as_ref(), "runs/x/adapter".as_ref(), &device, 256)?;
//! let mut session = served.session(None, 0, None)?;
//! for answer in session.predict(&[(1, "a wonderful, moving film".to_string())])? {
//!     println!("{answer}");
//! }
//! # Ok(()) }
//! ```
use super::{adapter_num_labels, bare_model};
use crate::data::{self, Batch, DataSpec, Format, Task, TextEncoder};
use crate::error::Context;
use crate::eval::{ModelPredictor, PredictiveAccumulator, Predictor};
use crate::export;
use crate::models::{self, Backbone, LoadOptions};
use crate::train::TaskModel;
use crate::{Error, Result};
use candle_core::Device;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// A base model with an adapter loaded for prediction, and what its inputs and outputs mean.
pub struct Served {
    model: TaskModel,
    posterior: Option<ivon::Posterior>,
    /// The folder the posterior sidecar would be in (named when `--samples` asks for one).
    sidecar_dir: PathBuf,
    device: Device,
    decoder: bool,
    /// A decoder's prompt template (`None`: the `jsonl_text` default) and label words (text in,
    /// label words scored); `None` for encoders and for decoders trained on multiple choice.
    text_task: Option<(Option<String>, Vec<String>)>,
    /// Class names in class order.
    names: Vec<String>,
    encoder: TextEncoder,
}

impl Served {
    /// Loads the base model `base` (a HF folder or a .gguf file) on `device` and the adapter
    /// folder `adapter` (or a run folder: its `adapter/`) over it; inputs are truncated to
    /// `max_len` tokens. The task comes from the adapter's task file (written by `bayeslora
    /// train`/`export`): a decoder trained on label words (a GLUE prompt, or a `jsonl_text` task
    /// with the run's `label_words` and `template`) scores those words after that prompt,
    /// otherwise it answers multiple choice. Class names: the task file's, else the base's `id2label`, else `LABEL_i`.
    pub fn open(base: &Path, adapter: &Path, device: &Device, max_len: usize) -> Result<Served> {
        // A run folder stands for its adapter (`<run>/adapter`).
        let in_run = adapter.join("adapter");
        let adapter = if !adapter.join(export::CONFIG_FILE).is_file() && in_run.join(export::CONFIG_FILE).is_file() {
            in_run.as_path()
        } else {
            adapter
        };
        let loaded = models::load(base, &LoadOptions { device: device.clone(), ..Default::default() })
            .with_context(|| format!("loading {}", base.display()))?;
        let decoder = matches!(loaded.backbone, Backbone::Llama(_));
        let id2label = label_names(&loaded.config_json);
        let adapter_task = export::read_task(adapter)?;
        // A decoder's label words: the run's own (a `jsonl_text` task, with its template if it
        // set one), else its GLUE task's prompt; without either it answers multiple choice.
        let text_task = match (&adapter_task, decoder) {
            (Some(t), true) if !t.label_words.is_empty() => Some((t.template.clone(), t.label_words.clone())),
            (Some(t), true) => Task::from_name(&t.task)
                .ok()
                .and_then(|task| task.decoder_template())
                .map(|(template, words)| (Some(template), words)),
            _ => None,
        };
        let num_labels = match &text_task {
            Some((_, words)) => words.len(),
            None => adapter_num_labels(adapter)?.unwrap_or(id2label.len().max(2)),
        };
        let from_task = adapter_task.map(|t| t.labels).filter(|l| l.len() == num_labels);
        let names: Vec<String> = match from_task {
            Some(labels) => labels,
            None if id2label.len() == num_labels => id2label,
            None => (0..num_labels).map(|i| format!("LABEL_{i}")).collect(),
        };
        let encoder = TextEncoder::new(loaded.tokenizer()?.clone(), max_len)?;
        let mut model = bare_model(loaded, num_labels, device)?;
        // A B-LoRA export serves its compressed form (the gated model exactly, with the IVON
        // sidecar over A, E, B when trained with IVON); a LoRA adapter its peft files.
        let compressed = adapter.join("compressed");
        let (posterior, sidecar_dir) = if compressed.join(export::blora::COMPRESSED_JSON).is_file() {
            export::load_compressed(&compressed, &mut model, device)
                .with_context(|| format!("loading the B-LoRA adapter {}", compressed.display()))?;
            (export::read_compressed_posterior(&compressed, &model)?, compressed)
        } else {
            let peft = export::load_peft(adapter, &mut model, device)
                .with_context(|| format!("loading the adapter {}", adapter.display()))?;
            (peft.posterior, adapter.to_path_buf())
        };
        let posterior = posterior.map(|(_, p)| p);
        Ok(Served { model, posterior, sidecar_dir, device: device.clone(), decoder, text_task, names, encoder })
    }

    /// A prediction session: `samples` posterior samples per input (default 10 with a posterior
    /// sidecar, else 0; asking for K > 0 without a sidecar is an error), drawn from `seed`;
    /// answers below confidence `abstain_below` are flagged.
    pub fn session(&self, samples: Option<usize>, seed: u64, abstain_below: Option<f64>) -> Result<Session<'_>> {
        let samples = match (&self.posterior, samples) {
            (Some(_), k) => k.unwrap_or(10),
            (None, Some(k)) if k > 0 => {
                return Err(Error::run(format!(
                    "{} has no posterior sidecar (adapter_posterior.*): use --samples 0",
                    self.sidecar_dir.display()
                )))
            }
            (None, _) => 0,
        };
        let predictor = ModelPredictor::stored(&self.model, self.posterior.as_ref(), &self.device, seed)?;
        Ok(Session { served: self, predictor, samples, abstain_below })
    }
}

/// Predictions of one [`Served`] adapter with fixed K and seed (see [`Served::session`]).
pub struct Session<'a> {
    served: &'a Served,
    predictor: ModelPredictor<'a>,
    samples: usize,
    abstain_below: Option<f64>,
}

impl Session<'_> {
    /// The posterior samples K of each prediction (0: the mean adapter alone).
    pub fn samples(&self) -> usize {
        self.samples
    }

    /// Answers `items` (input line number, text) as one batch: one JSON object per item with
    /// `line`, `label`, `label_id`, `probs` (class name → probability), `confidence`, `entropy`,
    /// `mutual_information`, `samples`, `abstain`, and for multiple choice the `choice` text.
    pub fn predict(&mut self, items: &[(usize, String)]) -> Result<Vec<Value>> {
        let s = self.served;
        let multiple_choice = s.decoder && s.text_task.is_none();
        let mut rows = String::new();
        let mut choices: Vec<Vec<String>> = Vec::new();
        for (line, raw) in items {
            let v: Value = if raw.trim_start().starts_with('{') {
                serde_json::from_str(raw).with_context(|| format!("input line {line}: invalid JSON"))?
            } else {
                json!({ "text": raw })
            };
            let row = if multiple_choice {
                let cs: Vec<String> = v
                    .get("choices")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(|c| c.as_str().map(str::to_string)).collect())
                    .unwrap_or_default();
                if v.get("question").is_none() || cs.len() < 2 {
                    return Err(Error::run(format!(
                        "input line {line}: a decoder needs {{\"question\": .., \"choices\": [..]}}"
                    )));
                }
                choices.push(cs);
                json!({ "question": v["question"], "choices": v["choices"], "context": v.get("context"), "answer": 0 })
            } else {
                if v.get("text").and_then(Value::as_str).is_none() {
                    return Err(Error::run(format!(
                        "input line {line}: an encoder needs plain text or {{\"text\": .., \"text_pair\": ..}}"
                    )));
                }
                json!({ "text": v["text"], "text_pair": v.get("text_pair"), "label": 0 })
            };
            rows.push_str(&row.to_string());
            rows.push('\n');
        }
        let tmp = std::env::temp_dir().join(format!("bayeslora-predict-{}.jsonl", std::process::id()));
        std::fs::write(&tmp, rows).map_err(|e| Error::io(&tmp, e))?;
        let mut spec = if multiple_choice {
            DataSpec::new(Task::JsonlChoice, &tmp)
        } else {
            let mut spec = DataSpec::new(Task::JsonlText, &tmp);
            spec.label_names = s.names.clone();
            if let Some((template, words)) = &s.text_task {
                spec.template = template.clone();
                spec.label_words = words.clone();
            }
            spec
        };
        spec.format = Some(if s.decoder { Format::Prompt } else { Format::Encoder });
        let dataset = data::load(&spec);
        let _ = std::fs::remove_file(&tmp);
        let encoded = s.encoder.encode_dataset(&dataset?)?;
        let n = encoded.len();
        let k = encoded.num_classes;
        let batch = Batch::in_order(&encoded, n.max(1)).next().context("no input rows")??;
        let mut acc = PredictiveAccumulator::new(n, k);
        if self.samples == 0 {
            acc.add_logits(&batch.indices, &self.predictor.predict(&batch, None)?, &batch.class_mask)?;
        }
        for sample in 0..self.samples {
            acc.add_logits(&batch.indices, &self.predictor.predict(&batch, Some(sample))?, &batch.class_mask)?;
        }
        let pred = acc.predictive(&vec![0; n])?;
        let (entropy, mi) = (pred.entropy(), pred.mutual_information());
        let labels: Vec<String> = if multiple_choice {
            (0..k).map(|j| char::from(b'A' + j as u8).to_string()).collect()
        } else {
            s.names.clone()
        };
        let mut out = Vec::with_capacity(n);
        for (i, (line, _)) in items.iter().enumerate() {
            let probs = &pred.probs[i * k..(i + 1) * k];
            let (best, conf) =
                probs.iter().copied().enumerate().fold((0, f64::MIN), |b, (j, p)| if p > b.1 { (j, p) } else { b });
            let mut row = json!({
                "line": line,
                "label": labels.get(best),
                "label_id": best,
                "probs": labels.iter().zip(probs).map(|(l, p)| (l.clone(), json!(p))).collect::<serde_json::Map<_, _>>(),
                "confidence": conf,
                "entropy": entropy[i],
                "mutual_information": mi[i],
                "samples": self.samples,
                "abstain": self.abstain_below.is_some_and(|t| conf < t),
            });
            if let Some(cs) = choices.get(i) {
                row["choice"] = json!(cs.get(best));
            }
            out.push(row);
        }
        Ok(out)
    }
}

/// `id2label` of config.json in index order (empty when absent).
fn label_names(config: &Value) -> Vec<String> {
    let Some(map) = config.get("id2label").and_then(Value::as_object) else {
        return Vec::new();
    };
    let mut pairs: Vec<(usize, String)> =
        map.iter().filter_map(|(k, v)| Some((k.parse().ok()?, v.as_str()?.to_string()))).collect();
    pairs.sort();
    if pairs.iter().enumerate().all(|(i, (k, _))| *k == i) {
        pairs.into_iter().map(|(_, v)| v).collect()
    } else {
        Vec::new()
    }
}

/// The model of an adapter folder over its base: `base` (a HF folder or a .gguf file) loaded on
/// `device`, the peft adapter `adapter` (and its head, if it has one) loaded into it
/// (`bayeslora merge ADAPTER --model BASE`).
pub fn open_adapter(base: &Path, adapter: &Path, device: &Device) -> Result<TaskModel> {
    let loaded = models::load(base, &LoadOptions { device: device.clone(), ..Default::default() })
        .with_context(|| format!("loading {}", base.display()))?;
    let k = adapter_num_labels(adapter)?.unwrap_or(2);
    let mut model = bare_model(loaded, k, device)?;
    export::load_peft(adapter, &mut model, device).with_context(|| format!("loading {}", adapter.display()))?;
    Ok(model)
}
