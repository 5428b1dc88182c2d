//! Baselines: diagonal Laplace against a closed form on a tiny linear model, MC dropout on the tiny
//! BERT fixture (differs from the mean pass, deterministic per seed), the ensemble averages member
//! probabilities, temperature scaling through `evaluate`.
mod common;

use bayeslora::adapters::Ctx;
use bayeslora::baselines::laplace::{empirical_fisher, posterior_std};
use bayeslora::baselines::{
    collect_logits, fit_temperature, EnsemblePredictor, McDropoutPredictor, TemperaturePredictor,
};
use bayeslora::data::{Batch, BatchTensors, Encoded, EncodedDataset, Format, Label, Task};
use bayeslora::eval::ModelPredictor;
use bayeslora::eval::{evaluate, masked_softmax, EvalConfig, Predictor};
use bayeslora::train::{Classifier, TaskModel};
use candle_core::{DType, Device, Tensor, Var};

/// logits = x Wᵀ with x = the row's two token ids as floats, W: [K = 2, D = 2].
struct Linear {
    w: Var,
}

impl Classifier for Linear {
    fn logits(&self, batch: &BatchTensors, _ctx: &Ctx) -> bayeslora::Result<Tensor> {
        let x = batch.input_ids.to_dtype(DType::F32)?;
        Ok(x.matmul(&self.w.as_tensor().t()?)?)
    }
    fn trainable(&self) -> Vec<(String, Var)> {
        vec![("w".into(), self.w.clone())]
    }
}

fn rows(xs: &[([u32; 2], usize)], k: usize) -> EncodedDataset {
    EncodedDataset {
        task: Task::Sst2,
        format: Format::Encoder,
        rows: xs
            .iter()
            .map(|(x, y)| Encoded { ids: x.to_vec(), type_ids: vec![0, 0], label: Label::Class(*y), num_choices: k })
            .collect(),
        num_classes: k,
        label_token_ids: vec![],
        pad_id: 0,
        truncated: 0,
    }
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()).max(1e-12)
}

#[test]
fn laplace_fisher_and_variance_match_the_closed_form_of_a_linear_softmax_model() {
    let w0 = [0.3f32, -0.2, -0.1, 0.25];
    let model = Linear { w: Var::from_slice(&w0, (2, 2), &Device::Cpu).unwrap() };
    let data = rows(&[([1, 2], 0), ([3, 1], 1), ([2, 2], 1), ([0, 4], 0), ([5, 1], 0)], 2);
    // Closed form: per-example ∇_W CE = (p − e_y) xᵀ, so F_kd = Σ_n ((p_nk − 1[y_n=k]) x_nd)².
    let mut expect = [0f64; 4];
    for r in &data.rows {
        let x: Vec<f64> = r.ids.iter().map(|&v| f64::from(v)).collect();
        let z: Vec<f64> = (0..2).map(|k| (0..2).map(|d| f64::from(w0[k * 2 + d]) * x[d]).sum()).collect();
        let m = z[0].max(z[1]);
        let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
        let s = e[0] + e[1];
        let Label::Class(y) = r.label else { unreachable!() };
        for k in 0..2 {
            let g = e[k] / s - if k == y { 1.0 } else { 0.0 };
            for d in 0..2 {
                expect[k * 2 + d] += (g * x[d]).powi(2);
            }
        }
    }
    let (fisher, n) = empirical_fisher(&model, &data, None, &Device::Cpu).unwrap();
    assert_eq!(n, 5);
    for (i, (&f, &e)) in fisher.iter().zip(&expect).enumerate() {
        assert!(close(f, e, 1e-5), "F[{i}]: got {f}, closed form {e}");
    }
    // A subset is rescaled to the whole set: rows 0, 1 and 3 (j·5/3) × 5/3.
    let (sub, n) = empirical_fisher(&model, &data, Some(3), &Device::Cpu).unwrap();
    assert_eq!(n, 3);
    assert!(sub.iter().all(|v| v.is_finite() && *v >= 0.0));
    // Posterior variance of the diagonal Laplace: 1 / (F + λ).
    let lambda = 2.5;
    let std = posterior_std(&fisher, lambda);
    for (i, (&s, &e)) in std.iter().zip(&expect).enumerate() {
        assert!(close(f64::from(s).powi(2), 1.0 / (e + lambda), 1e-5), "var[{i}]");
    }
    // Sampling: logits are linear in W, so Var[z_k] = Σ_d x_d² σ_kd² for x = (1, 2).
    let mean: Vec<f32> = w0.to_vec();
    let mut p = ModelPredictor::gaussian(&model, mean, std.clone(), &Device::Cpu, 5).unwrap();
    let probe = rows(&[([1, 2], 0)], 2);
    let batch = Batch::collate(&probe, &[0]).unwrap();
    let draws: Vec<Vec<f32>> = (0..4000).map(|k| p.predict(&batch, Some(k)).unwrap()).collect();
    for k in 0..2 {
        let v: Vec<f64> = draws.iter().map(|z| f64::from(z[k])).collect();
        let m = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|a| (a - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64;
        let want = f64::from(std[k * 2]).powi(2) + 4.0 * f64::from(std[k * 2 + 1]).powi(2);
        assert!(close(var, want, 0.08), "Var[z_{k}]: sampled {var}, closed form {want}");
    }
    // K = 0 puts θ_MAP back
    let z0 = p.predict(&batch, None).unwrap();
    assert!((z0[0] - (0.3 - 0.4)).abs() < 1e-6);
}

fn tiny_bert(lora_dropout: f32) -> TaskModel {
    common::tiny_bert(1, lora_dropout)
}

fn token_rows(n: usize) -> EncodedDataset {
    EncodedDataset {
        task: Task::Sst2,
        format: Format::Encoder,
        rows: (0..n)
            .map(|i| {
                let ids = vec![1, 20 + (i as u32 * 7) % 60, 30 + (i as u32 * 13) % 50, 9];
                Encoded { type_ids: vec![0; ids.len()], ids, label: Label::Class(i % 3), num_choices: 3 }
            })
            .collect(),
        num_classes: 3,
        label_token_ids: vec![],
        pad_id: 0,
        truncated: 0,
    }
}

#[test]
fn mc_dropout_differs_from_the_mean_pass_and_is_deterministic_per_seed() {
    let model = tiny_bert(0.1);
    let data = token_rows(6);
    let batch = Batch::collate(&data, &[0, 1, 2, 3, 4, 5]).unwrap();
    let mut p = McDropoutPredictor::new(&model, &Device::Cpu, 42);
    let mean = p.predict(&batch, None).unwrap();
    let s0 = p.predict(&batch, Some(0)).unwrap();
    let s0_again = p.predict(&batch, Some(0)).unwrap();
    let s1 = p.predict(&batch, Some(1)).unwrap();
    assert_eq!(s0, s0_again, "a sample is a fixed dropout mask");
    assert_ne!(s0, mean, "dropout is on for samples");
    assert_ne!(s0, s1, "samples differ");
    // the mean pass is the eval-mode model
    let mut point = ModelPredictor::point(&model, &Device::Cpu).unwrap();
    assert_eq!(mean, point.predict(&batch, None).unwrap());
    // another seed, other masks; the same seed in a new predictor, the same masks
    let mut q = McDropoutPredictor::new(&model, &Device::Cpu, 43);
    assert_ne!(q.predict(&batch, Some(0)).unwrap(), s0);
    let mut r = McDropoutPredictor::new(&model, &Device::Cpu, 42);
    assert_eq!(r.predict(&batch, Some(0)).unwrap(), s0);
}

/// Fixed logits per member.
struct Fixed(Vec<f32>);
impl Predictor for Fixed {
    fn predict(&mut self, batch: &Batch, _sample: Option<usize>) -> bayeslora::Result<Vec<f32>> {
        Ok(batch.indices.iter().flat_map(|_| self.0.clone()).collect())
    }
}

#[test]
fn ensemble_averages_member_probabilities() {
    let data = token_rows(5);
    let members = [vec![2.0f32, 0.0, -1.0], vec![0.0, 3.0, 0.0], vec![-1.0, 0.5, 1.5]];
    let boxed: Vec<Box<dyn Predictor>> =
        members.iter().map(|m| Box::new(Fixed(m.clone())) as Box<dyn Predictor>).collect();
    let mut ens = EnsemblePredictor::new(boxed).unwrap();
    let cfg = EvalConfig { method: "ensemble".into(), num_samples: 3, batch_size: 2, curve: vec![1, 2] };
    let ev = evaluate(&mut ens, &data, &cfg).unwrap();
    let probs: Vec<Vec<f64>> = members.iter().map(|m| masked_softmax(m, &[1, 1, 1])).collect();
    let bayes = ev.bayes.unwrap();
    for (c, &got) in bayes.probs[..3].iter().enumerate() {
        let want = (probs[0][c] + probs[1][c] + probs[2][c]) / 3.0;
        assert!((got - want).abs() < 1e-9, "class {c}: {got} vs {want}");
    }
    // K = 0 is member 0; K beyond the members is an error
    assert!((ev.mean.unwrap().probs[0] - probs[0][0]).abs() < 1e-9);
    let too_many = EvalConfig { num_samples: 4, ..cfg };
    assert!(evaluate(&mut ens, &data, &too_many).is_err());
    assert!(EnsemblePredictor::new(Vec::new()).is_err());
}

#[test]
fn temperature_scaling_keeps_accuracy_and_fixes_overconfidence() {
    // Over-confident: the right class wins 70% of the time, always with logit margin 6.
    let data = token_rows(30);
    let labels = data.class_labels().unwrap();
    struct Over(Vec<usize>);
    impl Predictor for Over {
        fn predict(&mut self, batch: &Batch, _s: Option<usize>) -> bayeslora::Result<Vec<f32>> {
            Ok(batch
                .indices
                .iter()
                .flat_map(|&i| {
                    let guess = if i % 10 < 7 { self.0[i] } else { (self.0[i] + 1) % 3 };
                    (0..3).map(move |c| if c == guess { 6.0 } else { 0.0 })
                })
                .collect())
        }
    }
    let mut over = Over(labels.clone());
    let (logits, mask, y) = collect_logits(&mut over, &data, 8).unwrap();
    assert_eq!(y, labels);
    let t = fit_temperature(&logits, &mask, &y, 3).unwrap();
    // closed form: p(right) = e^{6/T} / (e^{6/T} + 2) = 0.7 ⇒ T = 6 / ln(1.4 / 0.3)
    let want = 6.0 / (0.7f64 * 2.0 / 0.3).ln();
    assert!((t - want).abs() < 1e-6, "T = {t}, closed form {want}");
    let cfg = EvalConfig { method: "t".into(), num_samples: 0, ..Default::default() };
    let before = evaluate(&mut Over(labels.clone()), &data, &cfg).unwrap().results[0].metrics.clone();
    let mut scaled = TemperaturePredictor { inner: Over(labels), temperature: t };
    let after = evaluate(&mut scaled, &data, &cfg).unwrap().results[0].metrics.clone();
    assert_eq!(before.acc, after.acc);
    assert!(after.nll.unwrap() < before.nll.unwrap());
    assert!(after.ece15.unwrap() < 0.01, "calibrated: ECE {:?}", after.ece15);
}

#[test]
fn posterior_samples_drawn_ahead_on_a_thread_are_the_samples_drawn_in_place() {
    // On CUDA the next sample is drawn on a host thread while the current one runs; here both
    // ways run on the CPU and must give the same logits for every sample, in order, repeated,
    // out of order (a stale prefetch) and back at the mean.
    let model = tiny_bert(0.0);
    let data = token_rows(5);
    let batch = Batch::collate(&data, &[0, 1, 2, 3, 4]).unwrap();
    let vars: Vec<Var> = model.trainable().into_iter().map(|(_, v)| v).collect();
    let mut mean = Vec::new();
    for v in &vars {
        mean.extend(v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    let std: Vec<f32> = (0..mean.len()).map(|i| 0.01 + 0.001 * (i % 7) as f32).collect();
    let order = [Some(0), Some(1), Some(2), Some(2), Some(5), Some(3), None, Some(4), None];
    let run = |prefetch: bool| -> Vec<Vec<f32>> {
        let mut p = ModelPredictor::gaussian(&model, mean.clone(), std.clone(), &Device::Cpu, 11)
            .unwrap()
            .with_prefetch(prefetch);
        order.iter().map(|&s| p.predict(&batch, s).unwrap()).collect()
    };
    let ahead = run(true);
    let in_place = run(false);
    assert_eq!(ahead, in_place);
    assert_ne!(ahead[0], ahead[1], "samples differ");
    assert_eq!(ahead[6], ahead[8], "the mean is put back");
}
