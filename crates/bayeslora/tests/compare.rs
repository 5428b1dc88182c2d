//! Sweep bookkeeping on fake cells (aggregation, bold best, CSV/JSON, resume, plots, OOD and cost
//! tables), a tiny end-to-end comparison on the tiny BERT fixture with hand-encoded rows (no
//! tokenizer needed): AdamW and IVON training, every baseline predictor, cells written and
//! aggregated; and the same on the tiny random Llama (a decoder scored by label-word logits) with
//! OOD detection against a shifted test set.
mod common;

use bayeslora::baselines::summary_files::{k_curves, write_summary};
use bayeslora::baselines::sweep::{aggregate, read_cells, Cell, CellKey, Stat};
use bayeslora::baselines::{
    collect_logits, fit_temperature, holdout, laplace, EnsemblePredictor, LaplaceConfig, McDropoutPredictor,
    MethodKind, TemperaturePredictor,
};
use bayeslora::data::{BatchConfig, EncodedDataset};
use bayeslora::eval::metrics::Binning;
use bayeslora::eval::ModelPredictor;
use bayeslora::eval::{evaluate, EvalConfig, EvalResult, Evaluation, Metrics, Predictor};
use bayeslora::train::{self, OptimizerKind, RunOptimizer, Silent, TaskModel, TrainConfig};
use candle_core::Device;
use std::sync::Arc;

fn result(method: &str, task: &str, k: usize, acc: f64, ece: f64, nll: f64) -> EvalResult {
    let m = Metrics { acc: Some(acc), ece15: Some(ece), nll: Some(nll), ..Default::default() };
    EvalResult::new(method, task, k, 100, m)
}

fn fake(task: &str, method: &str, kind: MethodKind, seed: u64, results: Vec<EvalResult>) -> Cell {
    Cell {
        task: task.into(),
        method: method.into(),
        kind,
        seed,
        results,
        reliability: None,
        params: serde_json::Value::Null,
        train_seconds: 1.0,
        eval_seconds: 0.5,
        ood: Vec::new(),
        cost: None,
    }
}

fn fake_sweep() -> Vec<Cell> {
    let mut cells = Vec::new();
    for (seed, d) in [(0u64, 0.0), (1, 0.02)] {
        cells.push(fake(
            "sst2",
            "adamw",
            MethodKind::Adamw,
            seed,
            vec![result("adamw", "sst2", 0, 0.80 + d, 0.08, 0.5)],
        ));
        cells.push(fake(
            "sst2",
            "ivon",
            MethodKind::Ivon,
            seed,
            vec![
                result("ivon", "sst2", 0, 0.78 + d, 0.06, 0.45),
                result("ivon", "sst2", 1, 0.77, 0.07, 0.47),
                result("ivon", "sst2", 4, 0.79 + d, 0.03 + d, 0.40),
            ],
        ));
    }
    cells
}

#[test]
fn aggregate_reports_mean_and_sample_std_and_bolds_the_best() {
    let s = aggregate(&fake_sweep());
    let labels: Vec<(&str, usize)> = s.rows.iter().map(|r| (r.method.as_str(), r.num_samples)).collect();
    assert_eq!(labels, vec![("adamw", 0), ("ivon@mean", 0), ("ivon", 4)]);
    let acc = s.rows[0].metrics["acc"];
    assert!((acc.mean - 0.81).abs() < 1e-12);
    assert!((acc.std - (0.0002f64).sqrt()).abs() < 1e-12, "ddof = 1: {}", acc.std);
    assert_eq!(s.rows[2].seeds, vec![0, 1]);
    let md = s.markdown();
    // best accuracy: adamw 81.0; best ECE and NLL: ivon at K = 4
    assert!(md.contains("| adamw | 0 | 2 | **81.0 ± 1.4** |"), "{md}");
    assert!(md.contains("**4.0 ± 1.4**"), "{md}");
    assert!(md.contains("**0.400 ± 0.000**"), "{md}");
    let csv = s.csv();
    assert!(csv.starts_with("task,method,num_samples,seeds,acc_mean,acc_std"));
    assert_eq!(csv.lines().count(), 4);
    assert!(csv.contains("sst2,ivon,4,0 1,0.8"));
    let back: bayeslora::baselines::sweep::Summary = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    // (serde_json parses floats to within an ulp, not bit-exactly)
    assert_eq!(back.rows.len(), s.rows.len());
    assert!((back.rows[2].metrics["acc"].mean - s.rows[2].metrics["acc"].mean).abs() < 1e-15);
    assert_eq!(Stat::of(&[1.0]).unwrap().std, 0.0);
    assert!(Stat::of(&[]).is_none());
}

#[test]
fn cells_resume_and_aggregate_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    let key = CellKey::new("sst2", "ivon", 1);
    assert_eq!(key.path(out), out.join("cells/sst2/ivon/seed1.json"));
    assert!(!key.is_done(out));
    for c in fake_sweep() {
        c.write(out).unwrap();
    }
    assert!(key.is_done(out));
    // a corrupt cell is not done (it will be run again) and a missing one is not either
    std::fs::write(CellKey::new("sst2", "adamw", 7).path(out), "{not json").unwrap();
    assert!(!CellKey::new("sst2", "adamw", 7).is_done(out));
    std::fs::remove_file(CellKey::new("sst2", "adamw", 7).path(out)).unwrap();
    assert!(!CellKey::new("rte", "ivon", 0).is_done(out));
    let cells = read_cells(out).unwrap();
    assert_eq!(cells, {
        let mut v = fake_sweep();
        v.sort_by_key(|c| c.key());
        v
    });
    let curves = k_curves(&cells, "sst2");
    let ivon = curves.iter().find(|c| c.method == "ivon").unwrap();
    assert_eq!(ivon.points.iter().map(|p| p.0).collect::<Vec<_>>(), vec![0, 1, 4]);
    assert!((ivon.points[2].2 - 0.04).abs() < 1e-12);
    let (summary, written) = write_summary(out, "fake").unwrap();
    assert_eq!(summary.rows.len(), 3);
    for name in ["summary.md", "summary.csv", "summary.json", "plots/k_curve_sst2.png", "plots/k_curve_sst2.svg"] {
        assert!(written.contains(&out.join(name)), "{name} not written: {written:?}");
    }
}

#[test]
fn blora_cells_get_a_learned_heat_map_per_method() {
    // Real cells: the long B-LoRA runs on MRPC and RTE, 3 seeds (H100, 2026-12-06,
    // docs/compare/minilm_blora_long).
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/compare/minilm_blora_long/cells");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    for c in read_cells(src.parent().unwrap()).unwrap() {
        c.write(out).unwrap();
    }
    let (summary, written) = write_summary(out, "minilm").unwrap();
    for name in [
        "plots/learned_mrpc_blora.png",
        "plots/learned_mrpc_blora_mu1.png",
        "plots/learned_mrpc_rank_only.svg",
        "plots/learned_rte_blora_mu003.png",
    ] {
        assert!(written.contains(&out.join(name)), "{name} not written: {written:?}");
    }
    assert!(!written.iter().any(|p| p.to_string_lossy().contains("learned_mrpc_lora")), "LoRA has no gates");
    // The summary's cost table carries the learned rank and bits that the maps draw.
    let md = summary.markdown();
    // MRPC's rank-only row (3 seeds): 98.6 ± 0.2 % of LoRA's BOPs at mean rank 5.1 ± 0.4.
    let row = md
        .lines()
        .find(|l| l.starts_with("| rank_only |") && l.contains("98.6 ± 0.2"))
        .unwrap_or_else(|| panic!("{md}"));
    assert!(row.contains("5.1 ± 0.4"), "{row}");
}

// ---- end to end on the tiny BERT fixture ----

use common::{separable, tiny_bert as tiny};

fn train_tiny(kind: OptimizerKind, seed: u64, data: &Arc<EncodedDataset>) -> (TaskModel, RunOptimizer) {
    train_short(tiny(seed, 0.1), kind, seed, 3, data)
}

/// A few steps with settings that move a tiny model (AdamW lr 1e-2; IVON lr 0.1, ess 1e4).
fn train_short(
    model: TaskModel,
    kind: OptimizerKind,
    seed: u64,
    steps: usize,
    data: &Arc<EncodedDataset>,
) -> (TaskModel, RunOptimizer) {
    let mut cfg = TrainConfig {
        optimizer: kind,
        max_steps: Some(steps),
        batch: BatchConfig { batch_size: 8, seed, ..Default::default() },
        seed,
        ..Default::default()
    };
    cfg.adamw.lr = 1e-2;
    cfg.ivon.lr = 0.1;
    cfg.ivon.ess = 1e4;
    cfg.ivon.hess_init = 1e-2;
    cfg.ivon.clip_radius = 0.2;
    cfg.ivon.rescale_lr = false;
    let (_, opt) = train::run(&model, data.clone(), &cfg, &Device::Cpu, &mut Silent, None, None).unwrap();
    (model, opt)
}

fn cell(task: &str, method: MethodKind, ev: Evaluation, params: serde_json::Value) -> Cell {
    let rel = ev.bayes.as_ref().or(ev.mean.as_ref()).map(|p| p.reliability(15, Binning::Torchmetrics).unwrap());
    Cell {
        task: task.into(),
        method: method.name().into(),
        kind: method,
        seed: 0,
        results: ev.results,
        reliability: rel,
        params,
        train_seconds: 0.0,
        eval_seconds: 0.0,
        ood: Vec::new(),
        cost: None,
    }
}

#[test]
fn tiny_end_to_end_comparison_of_every_method() {
    let dev = Device::Cpu;
    let (train_rows, heldout) = holdout(&separable(40, 0), 0.2, 0).unwrap();
    let train_rows = Arc::new(train_rows);
    let test = separable(16, 99);
    let eval = |k: usize| EvalConfig { method: "m".into(), num_samples: k, batch_size: 8, curve: vec![1, 2] };
    let (map, _) = train_tiny(OptimizerKind::Adamw, 0, &train_rows);
    let (ivon_model, ivon_opt) = train_tiny(OptimizerKind::Ivon, 0, &train_rows);
    let (member1, _) = train_tiny(OptimizerKind::Adamw, 1000, &train_rows);
    let mut cells = Vec::new();

    let mut p = ModelPredictor::point(&map, &dev).unwrap();
    cells.push(cell("toy", MethodKind::Adamw, evaluate(&mut p, &test, &eval(0)).unwrap(), serde_json::Value::Null));
    drop(p);

    let RunOptimizer::Ivon(ivon) = &ivon_opt else { panic!("trained with IVON") };
    let mut p = ModelPredictor::posterior(&ivon_model, ivon, &dev, 5).unwrap();
    cells.push(cell("toy", MethodKind::Ivon, evaluate(&mut p, &test, &eval(3)).unwrap(), serde_json::Value::Null));
    p.restore().unwrap();
    drop(p);

    let mut p = McDropoutPredictor::new(&map, &dev, 5);
    cells.push(cell("toy", MethodKind::McDropout, evaluate(&mut p, &test, &eval(3)).unwrap(), serde_json::Value::Null));

    let members: Vec<Box<dyn Predictor>> = vec![
        Box::new(ModelPredictor::point(&map, &dev).unwrap()),
        Box::new(ModelPredictor::point(&member1, &dev).unwrap()),
    ];
    let mut p = EnsemblePredictor::new(members).unwrap();
    cells.push(cell("toy", MethodKind::Ensemble, evaluate(&mut p, &test, &eval(2)).unwrap(), serde_json::Value::Null));
    drop(p);

    let mut point = ModelPredictor::point(&map, &dev).unwrap();
    let (logits, mask, labels) = collect_logits(&mut point, &heldout, 8).unwrap();
    let t = fit_temperature(&logits, &mask, &labels, 3).unwrap();
    let mut p = TemperaturePredictor { inner: point, temperature: t };
    let ev = evaluate(&mut p, &test, &eval(0)).unwrap();
    cells.push(cell("toy", MethodKind::Temperature, ev, serde_json::json!({ "temperature": t })));
    drop(p);

    let lcfg =
        LaplaceConfig { prior_precisions: vec![1.0, 1e4], max_examples: Some(10), tune_samples: 2, batch_size: 8 };
    let fit = laplace::fit(&map, &train_rows, &heldout, &lcfg, &dev, 5).unwrap();
    assert_eq!(fit.heldout_nll.len(), 2);
    assert_eq!(fit.fisher_examples, 10);
    let mut p = fit.predictor(&map, &dev, 5).unwrap();
    let ev = evaluate(&mut p, &test, &eval(3)).unwrap();
    p.restore().unwrap();
    drop(p);
    cells.push(cell("toy", MethodKind::Laplace, ev, serde_json::to_value(&fit).unwrap()));

    // After all that sampling the shared MAP model is back at its MAP weights.
    let mut again = ModelPredictor::point(&map, &dev).unwrap();
    let ev = evaluate(&mut again, &test, &eval(0)).unwrap();
    assert_eq!(ev.results[0].metrics, cells[0].results[0].metrics);

    let dir = tempfile::tempdir().unwrap();
    for c in &cells {
        c.write(dir.path()).unwrap();
    }
    let (summary, written) = write_summary(dir.path(), "tiny BERT").unwrap();
    // adamw, ivon@mean, ivon, mc_dropout, ensemble, temperature, laplace
    assert_eq!(summary.rows.len(), 7);
    assert!(written.iter().any(|p| p.ends_with("plots/reliability_toy.png")));
    assert!(written.iter().any(|p| p.ends_with("plots/k_curve_toy.svg")));
}

// ---- OOD detection and cost in the cells and tables ----

use bayeslora::baselines::sweep::{ood_entries, CellCost, OodEntry};
use bayeslora::eval::{metrics::entropy, EvalCost, Predictive};

/// A predictive of 2 classes whose samples all equal p̄ (so the mutual information is 0) unless
/// `sample_entropy` says otherwise.
fn predictive(rows: &[[f64; 2]], labels: &[usize], k: usize, sample_entropy: Option<f64>) -> Predictive {
    Predictive {
        num_classes: 2,
        probs: rows.iter().flatten().copied().collect(),
        labels: labels.to_vec(),
        mean_sample_entropy: rows.iter().map(|r| sample_entropy.unwrap_or_else(|| entropy(r))).collect(),
        num_samples: k,
    }
}

fn evaluation(mean: Predictive, bayes: Option<Predictive>) -> Evaluation {
    Evaluation { results: Vec::new(), mean: Some(mean), bayes, pass_seconds: Vec::new() }
}

#[test]
fn ood_entries_score_the_shifted_set_against_the_test_set() {
    // In-distribution: confident; shifted: close to uniform. Every score separates them.
    let id_rows = [[0.95, 0.05], [0.1, 0.9], [0.9, 0.1], [0.02, 0.98]];
    let ood_rows = [[0.55, 0.45], [0.4, 0.6], [0.5, 0.5]];
    let id = evaluation(
        predictive(&id_rows, &[0, 1, 0, 1], 1, None),
        Some(predictive(&id_rows, &[0, 1, 0, 1], 4, Some(0.05))),
    );
    // The K = 4 samples disagree on the shifted rows: H[p̄] ≈ ln 2, mean sample entropy 0.1
    let shifted =
        evaluation(predictive(&ood_rows, &[0, 0, 1], 1, None), Some(predictive(&ood_rows, &[0, 0, 1], 4, Some(0.1))));
    let e = ood_entries("arc_easy", &id, &shifted).unwrap();
    assert_eq!(e.iter().map(|x| x.num_samples).collect::<Vec<_>>(), vec![0, 4]);
    assert_eq!((e[0].id_examples, e[0].ood_examples), (4, 3));
    // accuracy on the shifted set with its own labels: (0.55 → 0) right, (0.6 → 1) and (tie → 0) wrong
    assert!((e[0].shifted.acc.unwrap() - 1.0 / 3.0).abs() < 1e-12);
    for entry in &e {
        for r in &entry.detection {
            let m = &r.metrics;
            let mi = r.score == bayeslora::eval::OodScore::MutualInformation;
            if mi && entry.num_samples == 0 {
                // K = 0: MI is 0 everywhere, a coin flip
                assert!((m.auroc - 0.5).abs() < 1e-12, "{r:?}");
            } else {
                assert_eq!((m.auroc, m.aupr, m.fpr95), (1.0, 1.0, 0.0), "{r:?} at K = {}", entry.num_samples);
            }
        }
    }
    // another label set is refused
    let three = Predictive {
        num_classes: 3,
        probs: vec![0.2, 0.3, 0.5],
        labels: vec![2],
        mean_sample_entropy: vec![1.0],
        num_samples: 1,
    };
    assert!(ood_entries("arc_easy", &id, &evaluation(three, None)).is_err());
}

/// A cell on OBQA with OOD entries against `arc_easy` whose entropy AUROC is 1.0 where `separable`
/// says so (at K = 0 and at K) and 0.5 otherwise, and an eval-cost ratio `ratio`.
fn ood_cell(method: &str, kind: MethodKind, seed: u64, k: usize, separable: [bool; 2], ratio: f64) -> Cell {
    // in-distribution 1 − max p: 0.1, 0.2, 0.4, 0.3
    let id = [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3]];
    // shifted 1 − max p: 0.45 and 0.5 (above all: AUROC 1) or 0.45 and 0.05 (AUROC 0.5)
    let shifted_for = |sep: bool| if sep { vec![[0.55, 0.45], [0.5, 0.5]] } else { vec![[0.55, 0.45], [0.95, 0.05]] };
    let mk = |k: usize, sep: bool| {
        let ev_id = predictive(&id, &[0, 1, 0, 0], k.max(1), None);
        let rows = shifted_for(sep);
        let ev_ood = predictive(&rows, &[0, 1], k.max(1), None);
        let (id_e, ood_e) = if k == 0 {
            (evaluation(ev_id, None), evaluation(ev_ood, None))
        } else {
            let m = predictive(&id, &[0, 1, 0, 0], 1, None);
            (evaluation(m.clone(), Some(ev_id)), evaluation(predictive(&rows, &[0, 1], 1, None), Some(ev_ood)))
        };
        ood_entries("arc_easy", &id_e, &ood_e).unwrap()
    };
    let mut ood: Vec<OodEntry> = mk(0, separable[0]).into_iter().filter(|e| e.num_samples == 0).collect();
    if k > 0 {
        ood.extend(mk(k, separable[1]).into_iter().filter(|e| e.num_samples == k));
    }
    let mut results = vec![result(method, "obqa", 0, 0.5, 0.1, 0.7)];
    if k > 0 {
        results.push(result(method, "obqa", k, 0.52, 0.08, 0.69));
    }
    let cost = CellCost {
        train_seconds: 10.0,
        fit_seconds: 0.0,
        eval_seconds: 2.0,
        ood_eval_seconds: 3.0,
        eval: EvalCost {
            num_examples: 100,
            num_samples: k,
            single_pass_seconds: 0.2,
            sample_passes_seconds: ratio * k as f64 * 0.2,
        },
    };
    Cell { ood, cost: Some(cost), ..fake("obqa", method, kind, seed, results) }
}

#[test]
fn ood_and_cost_columns_reach_markdown_csv_and_json_and_resume_checks_them() {
    let cells: Vec<Cell> = (0..2u64)
        .flat_map(|s| {
            [
                ood_cell("adamw", MethodKind::Adamw, s, 0, [false, false], 0.0),
                ood_cell("ivon", MethodKind::Ivon, s, 4, [false, true], 1.25),
            ]
        })
        .collect();
    let s = aggregate(&cells);
    let labels: Vec<&str> = s.rows.iter().map(|r| r.method.as_str()).collect();
    assert_eq!(labels, vec!["adamw", "ivon@mean", "ivon"]);
    let ivon = &s.rows[2];
    assert_eq!(ivon.ood["arc_easy"]["entropy_auroc"].mean, 1.0);
    assert_eq!(ivon.ood["arc_easy"]["entropy_auroc"].n, 2);
    assert!((ivon.cost["k_cost_ratio"].mean - 1.25).abs() < 1e-12);
    assert!((ivon.cost["eval_ms_per_example"].mean - 20.0).abs() < 1e-12);
    // IVON's @mean row reports the K = 0 OOD entries and no cost of its own
    assert!(s.rows[1].ood["arc_easy"]["entropy_auroc"].mean < 1.0);
    assert!(s.rows[1].cost.is_empty());
    assert!(!s.rows[0].cost.contains_key("k_cost_ratio"), "K = 0 has no ratio");
    let md = s.markdown();
    assert!(md.contains("#### OOD: trained on obqa, shifted test set arc_easy"), "{md}");
    assert!(md.contains("#### obqa: cost (seconds"), "{md}");
    assert!(md.contains("| ivon | 4 | 10.0 ± 0.0 | 0.0 ± 0.0 | 2.0 ± 0.0 | 20.0 ± 0.0 | 1.25 ± 0.00 |"), "{md}");
    // the best entropy AUROC is ivon's 100 %: bold in the OOD table
    assert!(md.contains("**100.0 ± 0.0**"), "{md}");
    let csv = s.csv();
    let header = csv.lines().next().unwrap();
    assert!(header.contains(",k_cost_ratio_mean,k_cost_ratio_std"), "{header}");
    assert!(header.contains(",ood_arc_easy_entropy_auroc_mean,"), "{header}");
    let cols = header.split(',').count();
    assert!(csv.lines().all(|l| l.split(',').count() == cols), "ragged CSV:\n{csv}");
    let back: bayeslora::baselines::sweep::Summary = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    assert_eq!(back.rows[2].ood["arc_easy"]["entropy_auroc"].mean, 1.0);

    // resume: a cell without OOD results for a requested shifted task is not done
    let dir = tempfile::tempdir().unwrap();
    for c in &cells {
        c.write(dir.path()).unwrap();
    }
    let key = CellKey::new("obqa", "ivon", 0);
    assert!(key.is_done_with(dir.path(), &["arc_easy".to_string()]));
    assert!(!key.is_done_with(dir.path(), &["arc_easy".to_string(), "arc_challenge".to_string()]));
    write_summary(dir.path(), "fake").unwrap();
    let text = std::fs::read_to_string(dir.path().join("summary.md")).unwrap();
    assert!(text.contains("shifted test set arc_easy"));
    let csv = std::fs::read_to_string(dir.path().join("summary.csv")).unwrap();
    assert!(csv.contains("ood_arc_easy_mutual_information_fpr95_mean"));
}

// ---- a decoder (tiny random Llama, label-word logits) through every method, with OOD ----

/// The tiny random Llama fixture with LoRA r 4 / α 8 on q_proj and v_proj (the Llama names),
/// LoRA dropout `lora_dropout` (the only dropout a Llama has, so the only one MC dropout samples).
fn tiny_llama(seed: u64, lora_dropout: f32) -> TaskModel {
    use bayeslora::adapters::lora::{LoraConfig, TargetModules};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/llama3");
    let loaded = bayeslora::models::load(&dir, &Default::default()).unwrap();
    let lora = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout,
        target_modules: Some(TargetModules::List(vec!["q_proj".into(), "v_proj".into()])),
        ..Default::default()
    };
    TaskModel::build(loaded, &lora, 4, seed, &Device::Cpu).unwrap()
}

/// Prompt-format rows of 4 classes scored at the label tokens 11..14. In-distribution: the class
/// is marked by token 3 + c among tokens 20..60; shifted: tokens 60..100, no marker.
fn prompts(n: usize, salt: u64, shifted: bool) -> EncodedDataset {
    use bayeslora::data::{Encoded, Format, Label, Task};
    let mut state = 99u64 ^ salt;
    let mut next = || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) as u32
    };
    let rows = (0..n)
        .map(|i| {
            let len = 5 + (next() % 4) as usize;
            let base = if shifted { 60 } else { 20 };
            let mut ids: Vec<u32> = (0..len).map(|_| base + next() % 40).collect();
            let class = i % 4;
            if !shifted {
                ids[next() as usize % len] = 3 + class as u32;
            }
            Encoded { type_ids: vec![0; ids.len()], ids, label: Label::Class(class), num_choices: 4 }
        })
        .collect();
    EncodedDataset {
        task: if shifted { Task::ArcEasy } else { Task::Obqa },
        format: Format::Prompt,
        rows,
        num_classes: 4,
        label_token_ids: vec![11, 12, 13, 14],
        pad_id: 0,
        truncated: 0,
    }
}

fn train_llama(kind: OptimizerKind, seed: u64, data: &Arc<EncodedDataset>) -> (TaskModel, RunOptimizer) {
    train_short(tiny_llama(seed, 0.1), kind, seed, 4, data)
}

/// What `bayeslora compare` does per cell: the test set, then the shifted set with the same K.
fn scored<P: Predictor + ?Sized>(
    p: &mut P,
    kind: MethodKind,
    k: usize,
    test: &EncodedDataset,
    shifted: &EncodedDataset,
) -> Cell {
    let cfg = EvalConfig { method: kind.name().into(), num_samples: k, batch_size: 8, curve: vec![1] };
    let ev = evaluate(p, test, &cfg).unwrap();
    assert_eq!(ev.pass_seconds.len(), k + 1, "{kind:?}: one timing per pass");
    let quiet = EvalConfig { curve: Vec::new(), ..cfg };
    let ood = ood_entries("arc_easy", &ev, &evaluate(p, shifted, &quiet).unwrap()).unwrap();
    let cost = CellCost { eval: ev.cost(test.len()), ..Default::default() };
    Cell { ood, cost: Some(cost), ..cell("obqa", kind, ev, serde_json::Value::Null) }
}

#[test]
fn decoder_sweep_with_ood_runs_every_method_on_a_tiny_llama() {
    let dev = Device::Cpu;
    let (train_rows, heldout) = holdout(&prompts(40, 0, false), 0.2, 0).unwrap();
    let train_rows = Arc::new(train_rows);
    let test = prompts(16, 7, false);
    let shifted = prompts(12, 8, true);
    let (map, _) = train_llama(OptimizerKind::Adamw, 0, &train_rows);
    let (ivon_model, ivon_opt) = train_llama(OptimizerKind::Ivon, 0, &train_rows);
    let (member1, _) = train_llama(OptimizerKind::Adamw, 1000, &train_rows);
    // a decoder has no head: only the LoRA A/B of q_proj and v_proj train (2 layers × 2 × 2)
    assert_eq!(bayeslora::train::Classifier::trainable(&map).len(), 8);
    let mut cells = Vec::new();

    let mut p = ModelPredictor::point(&map, &dev).unwrap();
    cells.push(scored(&mut p, MethodKind::Adamw, 0, &test, &shifted));
    drop(p);

    let RunOptimizer::Ivon(ivon) = &ivon_opt else { panic!("trained with IVON") };
    let mut p = ModelPredictor::posterior(&ivon_model, ivon, &dev, 5).unwrap();
    cells.push(scored(&mut p, MethodKind::Ivon, 3, &test, &shifted));
    p.restore().unwrap();
    drop(p);

    // MC dropout on a Llama samples the LoRA dropout: the passes differ
    let mut p = McDropoutPredictor::new(&map, &dev, 5);
    let b = bayeslora::data::Batch::collate(&test, &[0, 1, 2]).unwrap();
    assert_ne!(p.predict(&b, Some(0)).unwrap(), p.predict(&b, Some(1)).unwrap(), "LoRA dropout is sampled");
    cells.push(scored(&mut p, MethodKind::McDropout, 3, &test, &shifted));

    let members: Vec<Box<dyn Predictor>> = vec![
        Box::new(ModelPredictor::point(&map, &dev).unwrap()),
        Box::new(ModelPredictor::point(&member1, &dev).unwrap()),
    ];
    let mut p = EnsemblePredictor::new(members).unwrap();
    cells.push(scored(&mut p, MethodKind::Ensemble, 2, &test, &shifted));
    drop(p);

    let mut point = ModelPredictor::point(&map, &dev).unwrap();
    let (logits, mask, labels) = collect_logits(&mut point, &heldout, 8).unwrap();
    let t = fit_temperature(&logits, &mask, &labels, 4).unwrap();
    assert!(t.is_finite() && t > 0.0);
    let mut p = TemperaturePredictor { inner: point, temperature: t };
    cells.push(scored(&mut p, MethodKind::Temperature, 0, &test, &shifted));
    drop(p);

    let lcfg =
        LaplaceConfig { prior_precisions: vec![1.0, 1e4], max_examples: Some(8), tune_samples: 2, batch_size: 8 };
    let fit = laplace::fit(&map, &train_rows, &heldout, &lcfg, &dev, 5).unwrap();
    assert!(fit.max_std > 0.0 && fit.max_std.is_finite());
    let mut p = fit.predictor(&map, &dev, 5).unwrap();
    cells.push(scored(&mut p, MethodKind::Laplace, 3, &test, &shifted));
    p.restore().unwrap();
    drop(p);

    for c in &cells {
        let ks: Vec<usize> = c.ood.iter().map(|o| o.num_samples).collect();
        let k = c.headline().unwrap().num_samples;
        assert_eq!(ks, if k == 0 { vec![0] } else { vec![0, k] }, "{}", c.method);
        assert!(c.ood.iter().all(|o| o.detection.len() == 3 && o.ood_examples == 12 && o.id_examples == 16));
        assert_eq!(c.cost.unwrap().eval.ratio().is_some(), k > 0, "{}", c.method);
    }
    // sampled predictives have a mutual information, so its AUROC is not the K = 0 coin flip
    let ivon_mi = cells[1].ood[1].detection.iter().find(|r| r.score == bayeslora::eval::OodScore::MutualInformation);
    assert!(ivon_mi.is_some_and(|r| r.metrics.auroc != 0.5));

    let dir = tempfile::tempdir().unwrap();
    for c in &cells {
        c.write(dir.path()).unwrap();
    }
    let (summary, _) = write_summary(dir.path(), "tiny Llama").unwrap();
    assert_eq!(summary.rows.len(), 7);
    assert!(summary.rows.iter().all(|r| r.ood.contains_key("arc_easy")));
    let md = summary.markdown();
    assert!(md.contains("shifted test set arc_easy") && md.contains("| laplace | 3 |"), "{md}");
}

#[test]
fn regression_tasks_get_correlation_and_mse_columns() {
    let reg = |seed: u64, pearson: f64| {
        let m = Metrics { pearson: Some(pearson), spearman: Some(pearson - 0.1), mse: Some(0.5), ..Default::default() };
        fake("stsb", "adamw", MethodKind::Adamw, seed, vec![EvalResult::new("adamw", "stsb", 0, 100, m)])
    };
    let s = aggregate(&[reg(0, 0.8), reg(1, 0.6)]);
    let md = s.markdown();
    assert!(md.contains("| Pearson | Spearman | MSE |"), "{md}");
    assert!(md.contains("70.0 ± 14.1") && md.contains("60.0 ± 14.1") && md.contains("0.500 ± 0.000"), "{md}");
    let csv = s.csv();
    assert!(csv.lines().next().is_some_and(|h| h.contains("pearson_mean,pearson_std")), "{csv}");
}
