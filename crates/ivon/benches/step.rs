//! Optimizer-step benchmark on CPU (plain `main`, no criterion): `cargo bench -p ivon`.
//!
//! For 1M and 10M f32 parameters (16 vars of equal size, like a LoRA adapter set) it times, as the
//! median of several repetitions:
//! - `adamw`: our AdamW `step(&grads)` (reads the grads, updates, writes the vars);
//! - `candle_nn_adamw`: candle-nn's AdamW step, for reference;
//! - `ivon_step`: IVON `step()` alone (samples already recorded), the counterpart of AdamW's step;
//! - `ivon_iteration`: IVON's whole per-iteration overhead with one MC sample: draw ε and set θ,
//!   read the gradient and record the sample, restore μ, then `step()`.
//!
//! Writes JSON to `$IVON_BENCH_OUT` or `target/bench/ivon_step.json` and prints a table.
//! `IVON_BENCH_SIZES=1000000,10000000` and `IVON_BENCH_REPS=9` override the defaults.
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use candle_nn::Optimizer as _;
use ivon::{AdamW, AdamWConfig, Ivon, IvonConfig, Optimizer as _};

const VARS: usize = 16;

fn median_ms(mut f: impl FnMut(), reps: usize) -> f64 {
    f(); // warm-up (allocations, page faults)
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    t[t.len() / 2]
}

fn grads_for(vars: &[Var], grads: &[Tensor]) -> GradStore {
    let mut g = GradStore::default();
    for (v, t) in vars.iter().zip(grads) {
        g.insert(v.as_tensor(), t.clone());
    }
    g
}

struct Row {
    numel: usize,
    name: &'static str,
    ms: f64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let sizes: Vec<usize> = std::env::var("IVON_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000_000, 10_000_000]);
    let reps: usize = std::env::var("IVON_BENCH_REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(9);
    let dev = Device::Cpu;
    let mut rows = Vec::new();
    for &numel in &sizes {
        let per = numel / VARS;
        let new_vars = || -> candle_core::Result<Vec<Var>> {
            (0..VARS).map(|_| Var::from_tensor(&(Tensor::randn(0f32, 1.0, per, &dev)? * 0.02)?)).collect()
        };
        let grad_tensors: Vec<Tensor> =
            (0..VARS).map(|_| Tensor::randn(0f32, 1e-3, per, &dev)).collect::<candle_core::Result<_>>()?;

        let vars = new_vars()?;
        let grads = grads_for(&vars, &grad_tensors);
        let mut adamw = AdamW::new(vars, AdamWConfig::default())?;
        let ms = median_ms(|| adamw.step(&grads).expect("adamw step"), reps);
        rows.push(Row { numel, name: "adamw", ms });

        let vars = new_vars()?;
        let grads = grads_for(&vars, &grad_tensors);
        let mut cnn = candle_nn::AdamW::new(vars, candle_nn::ParamsAdamW::default())?;
        let ms = median_ms(|| cnn.step(&grads).expect("candle-nn step"), reps);
        rows.push(Row { numel, name: "candle_nn_adamw", ms });

        let vars = new_vars()?;
        let cfg = IvonConfig { clip_radius: 1e-3, ..IvonConfig::default() };
        let mut ivon = Ivon::new(vars.clone(), cfg)?;
        // ivon_step: record a sample outside the timed region, time step() only.
        let mut times = Vec::new();
        for _ in 0..=reps {
            ivon.with_sampled_params(|| Ok(grads_for(&vars, &grad_tensors)))?;
            let s = Instant::now();
            ivon.step()?;
            times.push(s.elapsed().as_secs_f64() * 1e3);
        }
        times.remove(0);
        times.sort_by(|a, b| a.total_cmp(b));
        rows.push(Row { numel, name: "ivon_step", ms: times[times.len() / 2] });

        let ms = median_ms(
            || {
                ivon.with_sampled_params(|| Ok(grads_for(&vars, &grad_tensors))).expect("sample");
                ivon.step().expect("ivon step");
            },
            reps,
        );
        rows.push(Row { numel, name: "ivon_iteration", ms });
    }

    println!("{:>10} | {:>16} | {:>10} | {:>9}", "params", "optimizer", "median ms", "vs adamw");
    println!("{:-<10}-+-{:-<16}-+-{:-<10}-+-{:-<9}", "", "", "", "");
    let mut json_rows = Vec::new();
    for r in &rows {
        let base = rows.iter().find(|b| b.numel == r.numel && b.name == "adamw").map(|b| b.ms).unwrap_or(r.ms);
        println!("{:>10} | {:>16} | {:>10.2} | {:>8.2}x", r.numel, r.name, r.ms, r.ms / base);
        json_rows.push(serde_json::json!({
            "numel": r.numel, "optimizer": r.name, "median_ms": r.ms, "ratio_vs_adamw": r.ms / base,
        }));
    }
    let out = std::env::var("IVON_BENCH_OUT").map(std::path::PathBuf::from).unwrap_or_else(|_| {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/bench/ivon_step.json")
    });
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let doc = serde_json::json!({
        "bench": "ivon optimizer step, CPU, f32",
        "reps": reps,
        "vars": VARS,
        "threads": rayon::current_num_threads(),
        "rows": json_rows,
    });
    std::fs::write(&out, serde_json::to_string_pretty(&doc)? + "\n")?;
    println!("wrote {}", out.display());
    Ok(())
}
