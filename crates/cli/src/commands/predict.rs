//! `bayeslora predict --model BASE --adapter DIR`: class probabilities with uncertainty for new
//! inputs, one JSON object per line on stdout.
//!
//! Input (a file or stdin, one item per line): plain text, or JSON `{"text", "text_pair"}`
//! (encoders) / `{"question", "choices", "context"}` (decoders, scored as the multiple-choice
//! prompt). With the adapter's IVON sidecar, K posterior samples are drawn (the same K for every
//! batch) and their softmax probabilities averaged; each output carries the predictive entropy
//! H[p̄] and the mutual information H[p̄] − mean_k H[p_k] (the epistemic part). Without a
//! sidecar, K = 0: the mean adapter alone, MI = 0. A B-LoRA adapter folder (`compressed/`
//! inside) is served in its compressed form, the gated model at its learned ranks and bits;
//! trained with IVON, its sidecar there samples A, E, B, each sample then quantized as trained.
use crate::args::PredictArgs;
use anyhow::{bail, Context, Result};
use bayeslora::data::{self, Batch, DataSpec, Format, Task, TextEncoder};
use bayeslora::eval::{ModelPredictor, PredictiveAccumulator, Predictor};
use bayeslora::export;
use bayeslora::models::{self, Backbone, LoadOptions};
use bayeslora::run::{self, adapter_num_labels, bare_model};
use serde_json::{json, Value};
use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::time::Instant;

pub fn run(args: PredictArgs) -> Result<ExitCode> {
    let device = run::device(&args.device)?;
    let model_path = crate::assets::resolve(&args.model)?;
    let loaded = models::load(&model_path, &LoadOptions { device: device.clone(), ..Default::default() })
        .with_context(|| format!("loading {}", model_path.display()))?;
    let decoder = matches!(loaded.backbone, Backbone::Llama(_));
    let id2label = label_names(&loaded.config_json);
    let adapter_task = export::read_task(&args.adapter)?;
    // A decoder trained on a GLUE task scores its label words after the task's prompt (the
    // adapter's task file says which); otherwise decoders answer multiple choice.
    let text_task = match (&adapter_task, decoder) {
        (Some(t), true) => Task::from_name(&t.task).ok().and_then(|task| task.decoder_template()),
        _ => None,
    };
    let num_labels = match &text_task {
        Some((_, words)) => words.len(),
        None => adapter_num_labels(&args.adapter)?.unwrap_or(id2label.len().max(2)),
    };
    // Class names: the adapter's task file (written by `bayeslora train`/`export`), else the
    // base's id2label, else LABEL_i.
    let from_task = adapter_task.map(|t| t.labels).filter(|l| l.len() == num_labels);
    let names: Vec<String> = match from_task {
        Some(labels) => labels,
        None if id2label.len() == num_labels => id2label,
        None => (0..num_labels).map(|i| format!("LABEL_{i}")).collect(),
    };
    let encoder = TextEncoder::new(loaded.tokenizer()?.clone(), args.max_len)?;
    let mut model = bare_model(loaded, num_labels, &device)?;
    // A B-LoRA export serves its compressed form (the gated model exactly, with the IVON
    // sidecar over A, E, B when trained with IVON); a LoRA adapter its peft files.
    let compressed = args.adapter.join("compressed");
    let (posterior, sidecar_dir) = if compressed.join(export::blora::COMPRESSED_JSON).is_file() {
        export::load_compressed(&compressed, &mut model, &device)
            .with_context(|| format!("loading the B-LoRA adapter {}", compressed.display()))?;
        (export::read_compressed_posterior(&compressed, &model)?, compressed)
    } else {
        let adapter = export::load_peft(&args.adapter, &mut model, &device)
            .with_context(|| format!("loading the adapter {}", args.adapter.display()))?;
        (adapter.posterior, args.adapter.clone())
    };
    let samples = match (&posterior, args.samples) {
        (Some(_), k) => k.unwrap_or(10),
        (None, Some(k)) if k > 0 => {
            bail!("{} has no posterior sidecar (adapter_posterior.*): use --samples 0", sidecar_dir.display())
        }
        (None, _) => 0,
    };
    let mut predictor = ModelPredictor::stored(&model, posterior.as_ref().map(|(_, p)| p), &device, args.seed)?;

    let input: Box<dyn BufRead> = match &args.input {
        Some(p) => Box::new(std::io::BufReader::new(
            std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?,
        )),
        None => Box::new(std::io::stdin().lock()),
    };
    // Interactively, answer each line at once; otherwise fill batches.
    let batch_size = if args.input.is_none() && std::io::stdin().is_terminal() { 1 } else { args.batch_size.max(1) };
    let mut stdout = std::io::stdout().lock();
    let (start, mut count, mut pending) = (Instant::now(), 0usize, Vec::new());
    let mut lines = input.lines().enumerate();
    loop {
        let next = lines.next();
        if let Some((i, line)) = &next {
            let line = line.as_ref().map_err(|e| anyhow::anyhow!("reading input line {}: {e}", i + 1))?;
            if !line.trim().is_empty() {
                pending.push((i + 1, line.clone()));
            }
        }
        if pending.len() >= batch_size || (next.is_none() && !pending.is_empty()) {
            let items = std::mem::take(&mut pending);
            let ctx = Chunk {
                decoder,
                text_task: text_task.as_ref(),
                names: &names,
                encoder: &encoder,
                samples,
                abstain_below: args.abstain_below,
            };
            for row in ctx.predict(&mut predictor, &items)? {
                writeln!(stdout, "{row}")?;
            }
            stdout.flush()?;
            count += items.len();
        }
        if next.is_none() {
            break;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!("{count} inputs in {secs:.2} s ({:.1} examples/s, K = {samples})", count as f64 / secs.max(1e-9));
    Ok(ExitCode::SUCCESS)
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

struct Chunk<'a> {
    decoder: bool,
    /// A decoder's GLUE prompt template and label words (text in, label words scored).
    text_task: Option<&'a (String, Vec<String>)>,
    names: &'a [String],
    encoder: &'a TextEncoder,
    samples: usize,
    abstain_below: Option<f64>,
}

impl Chunk<'_> {
    /// Parses `items` (line number, text) into the data module's JSONL form, reads it back as a
    /// data set (so prompts and tokenization are the training ones), and predicts it as one batch.
    fn predict(&self, predictor: &mut dyn Predictor, items: &[(usize, String)]) -> Result<Vec<Value>> {
        let mut rows = String::new();
        let mut choices: Vec<Vec<String>> = Vec::new();
        for (line, raw) in items {
            let v: Value = if raw.trim_start().starts_with('{') {
                serde_json::from_str(raw).with_context(|| format!("input line {line}: invalid JSON"))?
            } else {
                json!({ "text": raw })
            };
            let multiple_choice = self.decoder && self.text_task.is_none();
            let row = if multiple_choice {
                let cs: Vec<String> = v
                    .get("choices")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(|c| c.as_str().map(str::to_string)).collect())
                    .unwrap_or_default();
                if v.get("question").is_none() || cs.len() < 2 {
                    bail!("input line {line}: a decoder needs {{\"question\": .., \"choices\": [..]}}");
                }
                choices.push(cs);
                json!({ "question": v["question"], "choices": v["choices"], "context": v.get("context"), "answer": 0 })
            } else {
                if v.get("text").and_then(Value::as_str).is_none() {
                    bail!("input line {line}: an encoder needs plain text or {{\"text\": .., \"text_pair\": ..}}");
                }
                json!({ "text": v["text"], "text_pair": v.get("text_pair"), "label": 0 })
            };
            rows.push_str(&row.to_string());
            rows.push('\n');
        }
        let tmp = std::env::temp_dir().join(format!("bayeslora-predict-{}.jsonl", std::process::id()));
        std::fs::write(&tmp, rows).with_context(|| format!("writing {}", tmp.display()))?;
        let mut spec = if self.decoder && self.text_task.is_none() {
            DataSpec::new(Task::JsonlChoice, &tmp)
        } else {
            let mut s = DataSpec::new(Task::JsonlText, &tmp);
            s.label_names = self.names.to_vec();
            if let Some((template, words)) = self.text_task {
                s.template = Some(template.clone());
                s.label_words = words.clone();
            }
            s
        };
        spec.format = Some(if self.decoder { Format::Prompt } else { Format::Encoder });
        let dataset = data::load(&spec);
        let _ = std::fs::remove_file(&tmp);
        let encoded = self.encoder.encode_dataset(&dataset?)?;
        let n = encoded.len();
        let k = encoded.num_classes;
        let batch = Batch::in_order(&encoded, n.max(1)).next().context("no input rows")??;
        let mut acc = PredictiveAccumulator::new(n, k);
        if self.samples == 0 {
            acc.add_logits(&batch.indices, &predictor.predict(&batch, None)?, &batch.class_mask)?;
        }
        for s in 0..self.samples {
            acc.add_logits(&batch.indices, &predictor.predict(&batch, Some(s))?, &batch.class_mask)?;
        }
        let pred = acc.predictive(&vec![0; n])?;
        let (entropy, mi) = (pred.entropy(), pred.mutual_information());
        let mut out = Vec::with_capacity(n);
        for (i, (line, _)) in items.iter().enumerate() {
            let probs = &pred.probs[i * k..(i + 1) * k];
            let (best, conf) =
                probs.iter().copied().enumerate().fold((0, f64::MIN), |b, (j, p)| if p > b.1 { (j, p) } else { b });
            let labels: Vec<String> = if self.decoder && self.text_task.is_none() {
                (0..k).map(|j| char::from(b'A' + j as u8).to_string()).collect()
            } else {
                self.names.to_vec()
            };
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
