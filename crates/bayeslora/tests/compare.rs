//! Sweep bookkeeping on fake cells (aggregation, bold best, CSV/JSON, resume, plots), and a tiny
//! end-to-end comparison on the tiny BERT fixture with hand-encoded rows (no tokenizer needed):
//! AdamW and IVON training, every baseline predictor, cells written and aggregated.
mod common;

use bayeslora::baselines::sweep::{aggregate, k_curves, read_cells, write_summary, Cell, CellKey, Stat};
use bayeslora::baselines::{
    collect_logits, fit_temperature, holdout, laplace, EnsemblePredictor, LaplaceConfig, McDropoutPredictor,
    MethodKind, TemperaturePredictor,
};
use bayeslora::data::{BatchConfig, EncodedDataset};
use bayeslora::eval::metrics::Binning;
use bayeslora::eval::{evaluate, EvalConfig, EvalResult, Evaluation, Metrics, Predictor};
use bayeslora::train::{self, ModelPredictor, Optimizer, OptimizerKind, Silent, TaskModel, TrainConfig};
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

// ---- end to end on the tiny BERT fixture ----

use common::{separable, tiny_bert as tiny};

fn train_tiny(kind: OptimizerKind, seed: u64, data: &Arc<EncodedDataset>) -> (TaskModel, Optimizer) {
    let model = tiny(seed, 0.1);
    let mut cfg = TrainConfig {
        optimizer: kind,
        max_steps: Some(3),
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

    let Optimizer::Ivon(ivon) = &ivon_opt else { panic!("trained with IVON") };
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
