//! Golden test of `eval::metrics` against torchmetrics / scikit-learn / scipy values in
//! `tests/fixtures/metrics/metrics.json` (made by `scripts/fixtures/make_metric_fixtures.py`,
//! library versions recorded in the file). Tolerance 1e-9 (f64), except the float32 public
//! torchmetrics ECE (1e-6).
use bayeslora::eval::metrics::{self, Binning};
use serde_json::Value;

const TOL: f64 = 1e-9;

fn fixture() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/metrics/metrics.json");
    let text = std::fs::read_to_string(path).expect("fixture present; run scripts/fixtures/make_metric_fixtures.py");
    serde_json::from_str(&text).expect("valid JSON")
}

/// Numbers, or repr strings where exact bits matter (serde_json's default float parser may be
/// off by one ulp; Rust's `str::parse` is correctly rounded).
fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| match x {
            Value::String(s) => s.parse().expect("float string"),
            _ => x.as_f64().expect("number"),
        })
        .collect()
}

fn check(case: &str, name: &str, got: f64, want: f64, tol: f64) {
    let ok = (got - want).abs() <= tol || (got.is_nan() && want.is_nan());
    assert!(ok, "{case}/{name}: got {got:.17}, want {want:.17} (|diff| {:.3e} > {tol:e})", (got - want).abs());
}

#[test]
fn bin_edges_equal_the_fixture_bit_for_bit() {
    let fx = fixture();
    assert_eq!(metrics::bin_edges(15), f64s(&fx["edges15"]));
    assert_eq!(metrics::bin_edges(10), f64s(&fx["edges10"]));
}

#[test]
fn classification_metrics_match_torchmetrics_and_sklearn() {
    let fx = fixture();
    let cases = fx["classification"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let k = c["num_classes"].as_u64().unwrap() as usize;
        let probs = f64s(&c["probs"]);
        let labels: Vec<usize> = c["labels"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        let r15 = metrics::reliability(&probs, k, &labels, 15, Binning::Torchmetrics).unwrap();
        let r10 = metrics::reliability(&probs, k, &labels, 10, Binning::IvonLora).unwrap();
        let counts: Vec<usize> =
            c["counts15"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        assert_eq!(r15.count, counts, "{name}/counts15");
        check(name, "ece15", r15.ece(), c["ece15"].as_f64().unwrap(), TOL);
        // null where a confidence lies on a bin edge (f32 rounding may move it across)
        if let Some(f32_ece) = c["ece15_torchmetrics_f32"].as_f64() {
            check(name, "ece15 vs public f32 torchmetrics", r15.ece(), f32_ece, 1e-6);
        }
        check(name, "mce15", r15.mce(), c["mce15"].as_f64().unwrap(), TOL);
        check(name, "ece10", r10.ece(), c["ece10"].as_f64().unwrap(), TOL);
        check(name, "acc", metrics::accuracy(&probs, k, &labels).unwrap(), c["acc"].as_f64().unwrap(), TOL);
        check(name, "nll", metrics::nll(&probs, k, &labels).unwrap(), c["nll"].as_f64().unwrap(), TOL);
        check(name, "brier", metrics::brier(&probs, k, &labels).unwrap(), c["brier"].as_f64().unwrap(), TOL);
        check(name, "mcc", metrics::matthews(&probs, k, &labels).unwrap(), c["mcc"].as_f64().unwrap(), TOL);
        if let Some(f1) = c.get("f1") {
            check(name, "f1", metrics::f1_binary(&probs, k, &labels).unwrap(), f1.as_f64().unwrap(), TOL);
        }
    }
}

#[test]
fn correlations_match_scipy() {
    let fx = fixture();
    for c in fx["regression"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let (x, y) = (f64s(&c["x"]), f64s(&c["y"]));
        check(name, "pearson", metrics::pearson(&x, &y).unwrap(), c["pearson"].as_f64().unwrap(), TOL);
        check(name, "spearman", metrics::spearman(&x, &y).unwrap(), c["spearman"].as_f64().unwrap(), TOL);
    }
}

#[test]
fn ood_metrics_match_sklearn() {
    let fx = fixture();
    for c in fx["ood"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let m = metrics::ood_detection(&f64s(&c["in_scores"]), &f64s(&c["out_scores"])).unwrap();
        check(name, "auroc", m.auroc, c["auroc"].as_f64().unwrap(), TOL);
        check(name, "aupr", m.aupr, c["aupr"].as_f64().unwrap(), TOL);
        check(name, "fpr95", m.fpr95, c["fpr95"].as_f64().unwrap(), TOL);
    }
}
