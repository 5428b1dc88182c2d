//! One cell of a sweep: build the method's predictor from the (task, seed)'s shared trained
//! models, score it on the task's test set and the shifted sets, and record params and costs.
use super::{Cache, CompareConfig, SweepHooks, SweepMethod, TaskData};
use crate::baselines::sweep::{ood_entries, Cell, CellCost, OodEntry};
use crate::baselines::{
    collect_logits, fit_temperature, laplace, EnsemblePredictor, McDropoutPredictor, MethodKind, TemperaturePredictor,
};
use crate::data::Format;
use crate::error::Context;
use crate::eval::{self, metrics::Binning, EvalConfig, Evaluation, ModelPredictor, Predictor};
use crate::run::{self, AdapterKind, Hooks};
use crate::train::RunOptimizer;
use crate::{Error, Result};
use std::time::Instant;

/// One predictor scored on the test set and the shifted sets.
struct Scored {
    ev: Evaluation,
    ood: Vec<OodEntry>,
    eval_seconds: f64,
    ood_seconds: f64,
}

/// Evaluates `p` on the task's test set, then (same K) on each shifted set for OOD detection.
fn score<P: Predictor + ?Sized>(p: &mut P, td: &TaskData, cfg: &EvalConfig, hooks: &mut dyn Hooks) -> Result<Scored> {
    hooks.eval_begin("eval", 1);
    let t0 = Instant::now();
    let ev = eval::evaluate(p, &td.eval, cfg)?;
    let eval_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut ood = Vec::new();
    let quiet = EvalConfig { curve: Vec::new(), ..cfg.clone() };
    for (name, set) in &td.ood {
        let shifted = eval::evaluate(p, set, &quiet)?;
        ood.extend(ood_entries(name, &ev, &shifted)?);
    }
    hooks.eval_end();
    Ok(Scored { ev, ood, eval_seconds, ood_seconds: t1.elapsed().as_secs_f64() })
}

/// The AdamW run that AdamW-based methods of this (task, seed) share.
fn adamw_key(
    cfg: &CompareConfig,
    task: &str,
    m: &SweepMethod,
    seed: u64,
    cache: &mut Cache<'_>,
    hooks: &mut dyn SweepHooks,
) -> Result<(String, f64)> {
    let run = cfg.run_config(task, m, seed)?;
    let key = cache.ensure(&run, &format!("{}/s{seed}", m.label), hooks)?;
    let secs = cache.get(&key)?.seconds;
    Ok((key, secs))
}

pub(super) fn run_cell(
    cfg: &CompareConfig,
    task: &str,
    m: &SweepMethod,
    seed: u64,
    td: &TaskData,
    cache: &mut Cache<'_>,
    hooks: &mut dyn SweepHooks,
) -> Result<Cell> {
    let run = cfg.run_config(task, m, seed)?;
    let device = run::device(&run.device)?;
    let eval_cfg = |k: usize| EvalConfig {
        method: m.label.clone(),
        num_samples: k,
        batch_size: run.eval.batch_size,
        ..Default::default()
    };
    let mut params = serde_json::json!({
        "kind": m.kind,
        "model": cfg.model,
        "train": run.train,
        "method": run.method,
        "lora": run.lora,
        "max_len": run.max_len,
        "train_rows": td.train.len(),
        "heldout_rows": td.heldout.len(),
    });
    let sample_seed = seed ^ 0xE7A1;
    // Each arm builds the method's predictor and scores it; returns (scores, train s, fit s).
    let (scored, train_seconds, fit_seconds) = match m.kind {
        MethodKind::Base => {
            let loaded = cache.bases.get(&run, hooks)?;
            let model = run::build_for_data(&run, loaded, &td.train, &device)?;
            let mut p = ModelPredictor::point(&model, &device)?;
            (score(&mut p, td, &eval_cfg(0), hooks)?, 0.0, 0.0)
        }
        MethodKind::Adamw => {
            let (key, secs) = adamw_key(cfg, task, m, seed, cache, hooks)?;
            let mut p = ModelPredictor::point(&cache.get(&key)?.model, &device)?;
            (score(&mut p, td, &eval_cfg(0), hooks)?, secs, 0.0)
        }
        MethodKind::Ivon => {
            let (key, secs) = adamw_key(cfg, task, m, seed, cache, hooks)?;
            let t = cache.get(&key)?;
            let RunOptimizer::Ivon(ivon) = &t.opt else {
                return Err(Error::run("invariant: IVON cell trained with IVON"));
            };
            let mut p = ModelPredictor::posterior(&t.model, ivon, &device, sample_seed)?;
            let r = score(&mut p, td, &eval_cfg(m.samples), hooks)?;
            p.restore()?;
            (r, secs, 0.0)
        }
        MethodKind::McDropout => {
            let (key, secs) = adamw_key(cfg, task, m, seed, cache, hooks)?;
            params["dropout"] = serde_json::json!({
                "lora_dropout": run.lora.lora_dropout,
                "backbone": "Ctx::train: BERT hidden/attention/classifier dropouts as in training (none for Llama)",
            });
            if run.lora.lora_dropout <= 0.0 && td.eval.format == Format::Prompt {
                return Err(Error::run(
                    "mc_dropout on a decoder samples only the LoRA dropout; set [run.lora] lora_dropout > 0",
                ));
            }
            let mut p = McDropoutPredictor::new(&cache.get(&key)?.model, &device, sample_seed);
            (score(&mut p, td, &eval_cfg(m.samples), hooks)?, secs, 0.0)
        }
        MethodKind::Temperature => {
            let (key, secs) = adamw_key(cfg, task, m, seed, cache, hooks)?;
            let t0 = Instant::now();
            let mut point = ModelPredictor::point(&cache.get(&key)?.model, &device)?;
            let (logits, mask, labels) = collect_logits(&mut point, &td.heldout, run.eval.batch_size)?;
            let temperature = fit_temperature(&logits, &mask, &labels, td.heldout.num_classes)?;
            let fit = t0.elapsed().as_secs_f64();
            params["temperature"] = serde_json::json!(temperature);
            let mut p = TemperaturePredictor { inner: point, temperature };
            (score(&mut p, td, &eval_cfg(0), hooks)?, secs, fit)
        }
        MethodKind::Laplace => {
            let (key, secs) = adamw_key(cfg, task, m, seed, cache, hooks)?;
            let t = cache.get(&key)?;
            let t0 = Instant::now();
            let fit = laplace::fit(&t.model, &td.train, &td.heldout, &m.laplace, &device, sample_seed)?;
            let fit_seconds = t0.elapsed().as_secs_f64();
            hooks.note(&format!(
                "{task}/{}/seed{seed}: Fisher on {} rows, prior precision {:e} (held-out NLL {:?}) in {fit_seconds:.0} s",
                m.label, fit.fisher_examples, fit.prior_precision, fit.heldout_nll,
            ));
            params["laplace"] = serde_json::to_value(&fit)?;
            params["laplace_config"] = serde_json::to_value(&m.laplace)?;
            params["laplace_seconds"] = serde_json::json!(fit_seconds);
            let mut p = fit.predictor(&t.model, &device, sample_seed)?;
            let r = score(&mut p, td, &eval_cfg(m.samples), hooks)?;
            p.restore()?;
            (r, secs, fit_seconds)
        }
        MethodKind::Ensemble => {
            let mut keys = Vec::new();
            let mut secs = 0.0;
            let member_seeds: Vec<u64> = (0..m.members as u64).map(|i| seed.wrapping_add(1000 * i)).collect();
            for &s in &member_seeds {
                let (k, t) = adamw_key(cfg, task, m, s, cache, hooks)?;
                keys.push(k);
                secs += t;
            }
            params["member_seeds"] = serde_json::json!(member_seeds);
            let r = {
                let members: Vec<Box<dyn Predictor + '_>> = keys
                    .iter()
                    .map(|k| -> Result<Box<dyn Predictor + '_>> {
                        Ok(Box::new(ModelPredictor::point(&cache.get(k)?.model, &device)?))
                    })
                    .collect::<Result<_>>()?;
                let mut p = EnsemblePredictor::new(members)?;
                score(&mut p, td, &eval_cfg(m.members), hooks)?
            };
            // Members 1.. are only the ensemble's: free them (member 0 is the shared AdamW run).
            for k in keys.iter().skip(1) {
                cache.models.remove(k);
            }
            (r, secs, 0.0)
        }
    };
    if run.method == AdapterKind::Blora {
        let (key, _) = adamw_key(cfg, task, m, seed, cache, hooks)?;
        // BOPs at an fp32 base, as `bayeslora report bops` prints by default.
        let model = &cache.get(&key)?.model;
        let learned = model.adapters.blora().context("a B-LoRA method trained no B-LoRA layers")?.learned()?;
        let report = crate::adapters::blora::bops_report(&learned, 32, 1.0)?;
        params["bops"] = run::bops_summary(&report, &learned);
    }
    let Scored { ev, ood, eval_seconds, ood_seconds } = scored;
    let cost = CellCost {
        train_seconds,
        fit_seconds,
        eval_seconds,
        ood_eval_seconds: ood_seconds,
        eval: ev.cost(td.eval.len()),
    };
    if let Some(r) = cost.eval.ratio() {
        hooks.note(&format!(
            "{task}/{}/seed{seed}: single pass {:.2} s, {} sampled passes {:.2} s (ratio {r:.2} of K × single)",
            m.label, cost.eval.single_pass_seconds, cost.eval.num_samples, cost.eval.sample_passes_seconds
        ));
    }
    let headline = ev.bayes.as_ref().or(ev.mean.as_ref());
    let reliability = headline.map(|p| p.reliability(run.eval.bins, Binning::Torchmetrics)).transpose()?;
    let mut results = ev.results;
    for r in &mut results {
        r.info.insert("model".into(), serde_json::json!(cfg.model));
        r.info.insert("seed".into(), serde_json::json!(seed));
        r.info.insert("method_kind".into(), serde_json::to_value(m.kind)?);
        r.info.insert("dtype".into(), serde_json::json!(run.dtype));
        r.info.insert("train_seconds".into(), serde_json::json!(train_seconds));
        r.info.insert("code_version".into(), serde_json::json!(env!("CARGO_PKG_VERSION")));
    }
    Ok(Cell {
        task: task.into(),
        method: m.label.clone(),
        kind: m.kind,
        seed,
        results,
        reliability,
        params,
        train_seconds,
        eval_seconds,
        ood,
        cost: Some(cost),
    })
}
