//! Reliability diagrams: PNG and SVG are written and non-trivial. Set `BAYESLORA_PLOT_DIR` to
//! keep the files for a look.
use bayeslora::eval::{metrics::Binning, PredictiveAccumulator};
use bayeslora::plot::{reliability_diagram, Panel};

fn predictive(sharpness: f32, seed: u64) -> bayeslora::eval::Predictive {
    // a deterministic pseudo-random overconfident classifier
    let n = 600;
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 33) as f32) / (1u64 << 31) as f32
    };
    let mut acc = PredictiveAccumulator::new(n, 4);
    let mut labels = Vec::new();
    for i in 0..n {
        let logits: Vec<f32> = (0..4).map(|_| sharpness * next()).collect();
        let pred = (0..4).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap();
        labels.push(if next() < 0.6 { pred } else { (pred + 1) % 4 });
        acc.add_logits(&[i], &logits, &[]).unwrap();
    }
    acc.predictive(&labels).unwrap()
}

#[test]
fn reliability_diagram_png_and_svg() {
    let keep = std::env::var_os("BAYESLORA_PLOT_DIR");
    let tmp = tempfile::tempdir().unwrap();
    let dir = keep.map(std::path::PathBuf::from).unwrap_or_else(|| tmp.path().to_path_buf());
    let a = predictive(8.0, 1).reliability(15, Binning::Torchmetrics).unwrap();
    let b = predictive(3.0, 2).reliability(10, Binning::IvonLora).unwrap();
    let files = reliability_diagram(
        &dir.join("reliability"),
        "WinoGrande-S: reliability",
        &[Panel { name: "AdamW", bins: &a }, Panel { name: "IVON (K=10)", bins: &b }],
    )
    .unwrap();
    assert_eq!(files.len(), 2);
    let png = std::fs::read(&files[0]).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 5_000, "png of {} bytes", png.len());
    let svg = std::fs::read_to_string(&files[1]).unwrap();
    assert!(svg.contains("<svg") && svg.contains("<rect"));
    assert!(reliability_diagram(&dir.join("x"), "t", &[]).is_err());
}
