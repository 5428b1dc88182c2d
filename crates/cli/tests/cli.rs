//! The `bayeslora` binary end to end: help, bad input (clear message, exit code 2, no panic),
//! and a tiny real run on all-MiniLM-L6-v2 (skipped with a note when the asset is absent; the
//! test script fetches it).
mod common;
use common::{minilm, smollm2, stderr};
use std::path::Path;
use std::process::{Command, Output};

fn bayeslora(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bayeslora")).args(args).output().expect("binary runs")
}

#[test]
fn help_explains_the_commands() {
    let o = bayeslora(&["--help"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    for cmd in ["train", "eval", "demo", "bench"] {
        assert!(text.contains(cmd), "{text}");
    }
}

#[test]
fn missing_model_folder_is_named_with_exit_code_2() {
    let o = bayeslora(&["train", "--model", "/nonexistent/model-dir", "--max-steps", "1"]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(err.contains("/nonexistent/model-dir") && !err.contains("panicked"), "{err}");
}

#[test]
fn model_without_tokenizer_says_which_file_is_missing() {
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bayeslora/tests/fixtures/bert/tiny");
    let o = bayeslora(&["train", "--model", tiny.to_str().unwrap_or_default(), "--max-steps", "1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("tokenizer.json"), "{}", stderr(&o));
}

#[test]
fn unknown_config_key_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("run.toml");
    std::fs::write(&cfg, "task = \"sst2\"\n[train]\nlearning_rate = 0.1\n").unwrap();
    let o = bayeslora(&["train", "--config", cfg.to_str().unwrap_or_default()]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(err.contains("run.toml") && err.contains("learning_rate"), "{err}");
}

#[test]
fn invalid_hyper_parameter_is_quoted() {
    let o = bayeslora(&["train", "--model", "x", "--optimizer", "ivon", "--lr=-1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("lr"), "{}", stderr(&o));
}

#[test]
fn data_parallel_launch_mistakes_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out = out.to_str().unwrap_or_default();
    // --gpus on the CPU: refused before any process starts or any model loads.
    let o = bayeslora(&["train", "--model", "x", "--gpus", "2", "-o", out]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(err.contains("--gpus 2") && err.contains("--device cuda") && !err.contains("panicked"), "{err}");
    // torchrun's variables, malformed or incomplete.
    let run = |env: &[(&str, &str)]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_bayeslora"));
        c.args(["train", "--model", "x", "-o", out]);
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().expect("binary runs")
    };
    let o = run(&[("WORLD_SIZE", "two")]);
    assert!(o.status.code() == Some(2) && stderr(&o).contains("WORLD_SIZE=\"two\" is not a number"), "{}", stderr(&o));
    let o = run(&[("WORLD_SIZE", "2"), ("MASTER_PORT", "29500")]);
    assert!(o.status.code() == Some(2) && stderr(&o).contains("RANK is not set"), "{}", stderr(&o));
}

#[test]
fn tiny_real_run_trains_evaluates_and_resumes() {
    let Some(model) = minilm() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let common = [
        "--model",
        model.to_str().unwrap_or_default(),
        "--task",
        "sst2",
        "--train-limit",
        "48",
        "--eval-limit",
        "24",
        "--batch-size",
        "8",
        "--samples",
        "2",
        "--optimizer",
        "ivon",
        "-o",
        out.to_str().unwrap_or_default(),
    ];
    let mut args = vec!["train", "--max-steps", "3"];
    args.extend(common);
    let o = bayeslora(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in ["results.json", "config.toml", "metrics.jsonl", "reliability.png", "reliability.svg"] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let results: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(results.as_array().map(Vec::len), Some(3), "mean, K=1, K=2"); // curve points 1, 2
                                                                             // Continue the same run to 5 steps from its checkpoint.
    let mut args = vec!["train", "--max-steps", "5", "--resume"];
    args.extend(common);
    let o = bayeslora(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 5, "3 steps, then 2 more after the resume:\n{log}");
    // The saved config re-evaluates the run.
    let o = bayeslora(&["eval", out.to_str().unwrap_or_default(), "--samples", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The run ships a PEFT adapter with the IVON posterior sidecar.
    let adapter = out.join("adapter");
    for f in
        ["adapter_config.json", "adapter_model.safetensors", "adapter_posterior.safetensors", "adapter_posterior.json"]
    {
        assert!(adapter.join(f).exists(), "{f} missing");
    }
    // Predict with uncertainty from a JSONL file.
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, "{\"text\": \"a wonderful, moving film\"}\n{\"text\": \"dull and far too long\"}\n")
        .unwrap();
    let o = bayeslora(&[
        "predict",
        "--model",
        model.to_str().unwrap_or_default(),
        "--adapter",
        adapter.to_str().unwrap_or_default(),
        "--input",
        input.to_str().unwrap_or_default(),
        "--samples",
        "3",
        "--abstain-below",
        "0.99",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: Vec<serde_json::Value> =
        String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).expect("JSONL")).collect();
    assert_eq!(rows.len(), 2);
    for r in &rows {
        let text = r.to_string();
        for key in ["confidence", "entropy", "mutual_information", "abstain"] {
            assert!(text.contains(key), "{key} missing in {text}");
        }
        // The class names come from the adapter's task file, not LABEL_0/LABEL_1.
        let label = r["label"].as_str().unwrap_or_default();
        assert!(label == "negative" || label == "positive", "label {label:?} in {text}");
        assert!(r["probs"].get("positive").is_some(), "probs by class name in {text}");
    }
    // Export and merge from the run folder.
    let exported = dir.path().join("exported");
    let o = bayeslora(&["export", out.to_str().unwrap_or_default(), "-o", exported.to_str().unwrap_or_default()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(exported.join("adapter_model.safetensors").exists());
    let task: serde_json::Value =
        serde_json::from_slice(&std::fs::read(exported.join("adapter_task.json")).unwrap()).unwrap();
    assert_eq!(task, serde_json::json!({ "task": "sst2", "labels": ["negative", "positive"] }));
    // --base-name sets the base peft's AutoPeftModel* resolves (a run on a GGUF names the file).
    let named = dir.path().join("named");
    let o = bayeslora(&[
        "export",
        out.to_str().unwrap_or_default(),
        "-o",
        named.to_str().unwrap_or_default(),
        "--base-name",
        "sentence-transformers/all-MiniLM-L6-v2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(named.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["base_model_name_or_path"], "sentence-transformers/all-MiniLM-L6-v2");
    let merged = dir.path().join("merged");
    let o = bayeslora(&["merge", out.to_str().unwrap_or_default(), "-o", merged.to_str().unwrap_or_default()]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(merged.join(f).exists(), "merged {f} missing");
    }
}

#[test]
fn malformed_row_is_reported_or_skipped_by_flag() {
    let Some(model) = minilm() else { return };
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("train.tsv");
    std::fs::write(&bad, "sentence\tlabel\ngood movie\t1\nbad movie\t0\nno label here\nfine film\t1\nawful\t0\n")
        .unwrap();
    let bad_s = bad.to_str().unwrap_or_default().to_string();
    let out = dir.path().join("run");
    let base = [
        "train",
        "--model",
        model.to_str().unwrap_or_default(),
        "--task",
        "sst2",
        "--train-file",
        &bad_s,
        "--eval-file",
        &bad_s,
        "--max-steps",
        "1",
        "--samples",
        "0",
        "-o",
        out.to_str().unwrap_or_default(),
    ];
    let o = bayeslora(&base);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(err.contains("train.tsv:4"), "{err}");
    let mut args = base.to_vec();
    args.push("--skip-bad-rows");
    let o = bayeslora(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("skipped 1 malformed"), "{}", stderr(&o));
}

#[test]
fn blora_run_reports_bops_and_exports_both_forms() {
    let Some(model) = minilm() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("blora");
    let common = [
        "--method",
        "blora",
        "--model",
        model.to_str().unwrap_or_default(),
        "--task",
        "sst2",
        "--train-limit",
        "32",
        "--eval-limit",
        "16",
        "--batch-size",
        "8",
        "--samples",
        "0",
        "--optimizer",
        "adamw",
        "--target-modules",
        "query,value",
        "-o",
        out.to_str().unwrap_or_default(),
    ];
    let mut args = vec!["train", "--max-steps", "2"];
    args.extend(common);
    let o = bayeslora(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    // The run writes the BOPs report, the learned ranks/bits heat map and both adapter forms.
    for f in ["bops.json", "bops.txt", "bops_learned.png", "bops_learned.svg", "results.json"] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let adapter = out.join("adapter");
    for f in ["adapter_config.json", "adapter_model.safetensors", "sizes.json", "compressed/blora_compressed.json"] {
        assert!(adapter.join(f).exists(), "adapter/{f} missing");
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(adapter.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["peft_type"], "LORA");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("bops.json")).unwrap()).unwrap();
    assert_eq!(report["rows"].as_array().map(Vec::len), Some(12), "query and value of 6 layers");
    assert!(report["ratio"].as_f64().is_some_and(|r| r > 0.0 && r.is_finite()));
    // `report bops` recomputes it from the checkpoint, here at bf16 precision.
    let stem = dir.path().join("again");
    let o = bayeslora(&[
        "report",
        "bops",
        out.to_str().unwrap_or_default(),
        "--precision",
        "16",
        "-o",
        stem.to_str().unwrap_or_default(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("assumptions"));
    let again: serde_json::Value =
        serde_json::from_slice(&std::fs::read(stem.with_extension("json")).unwrap()).unwrap();
    assert_eq!(again["precision"], 16);
    // Resume continues the B-LoRA run (gates and quantizer ranges come from the checkpoint).
    let mut args = vec!["train", "--max-steps", "3", "--resume"];
    args.extend(common);
    let o = bayeslora(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    // `report bops` on a LoRA run says what is wrong.
    let lora = dir.path().join("lora");
    let o = bayeslora(&[
        "train",
        "--model",
        model.to_str().unwrap_or_default(),
        "--train-limit",
        "16",
        "--eval-limit",
        "8",
        "--max-steps",
        "1",
        "--samples",
        "0",
        "-o",
        lora.to_str().unwrap_or_default(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = bayeslora(&["report", "bops", lora.to_str().unwrap_or_default()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("not a B-LoRA run"), "{}", stderr(&o));
}

/// IVON × B-LoRA: the run's adapter carries the posterior over A, E, B beside its compressed
/// form, and `predict --samples K` samples it through the gated model (mutual information > 0
/// for some input); `--samples 0` is the mean, MI = 0.
#[test]
fn ivon_blora_predict_samples_the_posterior() {
    let Some(model) = minilm() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ivon-blora");
    let o = bayeslora(&[
        "train",
        "--method",
        "blora",
        "--optimizer",
        "ivon",
        "--model",
        model.to_str().unwrap_or_default(),
        "--task",
        "sst2",
        "--train-limit",
        "32",
        "--eval-limit",
        "8",
        "--batch-size",
        "8",
        "--max-steps",
        "2",
        "--samples",
        "2",
        "--target-modules",
        "query,value",
        "-o",
        out.to_str().unwrap_or_default(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let adapter = out.join("adapter");
    for f in ["compressed/adapter_posterior.json", "compressed/adapter_posterior.safetensors"] {
        assert!(adapter.join(f).exists(), "adapter/{f} missing");
    }
    assert!(!adapter.join("adapter_posterior.json").exists(), "no sidecar beside the PEFT form (E folded into B)");
    let input = dir.path().join("in.txt");
    std::fs::write(&input, "a wonderful, moving film\ndull and far too long\nit is a film\n").unwrap();
    let predict = |k: &str| {
        let o = bayeslora(&[
            "predict",
            "--model",
            model.to_str().unwrap_or_default(),
            "--adapter",
            adapter.to_str().unwrap_or_default(),
            "--input",
            input.to_str().unwrap_or_default(),
            "--samples",
            k,
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSONL"))
            .map(|r| r["mutual_information"].as_f64().expect("mutual_information"))
            .collect::<Vec<f64>>()
    };
    let sampled = predict("4");
    assert_eq!(sampled.len(), 3);
    assert!(sampled.iter().any(|&mi| mi > 0.0), "posterior samples disagree somewhere: {sampled:?}");
    assert!(predict("0").iter().all(|&mi| mi == 0.0));
}

/// A decoder trained on a GLUE task (label words after the task's prompt) predicts plain text
/// the same way, reading the task from the adapter, and prints its class names.
#[test]
fn decoder_predict_scores_the_task_it_was_trained_on() {
    let Some(gguf) = smollm2() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    train_decoder(&gguf, &out, &["--task", "sst2", "--train-limit", "8", "--eval-limit", "4"]);
    let input = dir.path().join("in.txt");
    std::fs::write(&input, "a wonderful, moving film\ndull and far too long\n").unwrap();
    let rows = predict_rows(&gguf, &out.join("adapter"), &input);
    assert_eq!(rows.len(), 2);
    for r in &rows {
        let probs = r["probs"].as_object().expect("probs");
        assert_eq!(probs.keys().collect::<Vec<_>>(), ["negative", "positive"], "{r}");
        assert!(r.get("choice").is_none(), "not multiple choice: {r}");
    }
    // SmolLM2-Instruct already knows sentiment: the clear cases go the right way.
    assert_eq!((rows[0]["label"].as_str(), rows[1]["label"].as_str()), (Some("positive"), Some("negative")));
}

/// Issue 18: a decoder trained on a user JSONL text task (the run's own label words and
/// template) predicts plain text with those words after that prompt, reading both from the
/// adapter's task file; a run folder stands for its adapter.
#[test]
fn issue_18_decoder_predict_serves_a_jsonl_text_task() {
    let Some(gguf) = smollm2() else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("reviews.jsonl");
    let rows = [
        ("a wonderful, moving film", 1),
        ("dull and far too long", 0),
        ("I loved every minute", 1),
        ("a waste of two hours", 0),
    ];
    let text: String = rows.iter().map(|(t, l)| format!("{{\"text\": \"{t}\", \"label\": {l}}}\n")).collect();
    std::fs::write(&data, text).unwrap();
    let config = dir.path().join("run.toml");
    let toml = format!(
        "task = \"jsonl_text\"\ntrain_file = {data:?}\neval_file = {data:?}\nlabel_words = [\" no\", \" yes\"]\n\
         template = \"Review: {{text}}\\nDid the reviewer like it?\"\n"
    );
    std::fs::write(&config, toml).unwrap();
    let out = dir.path().join("run");
    train_decoder(&gguf, &out, &["--config", config.to_str().unwrap_or_default()]);
    let task = std::fs::read_to_string(out.join("adapter/adapter_task.json")).unwrap();
    assert!(task.contains("\" yes\"") && task.contains("Did the reviewer like it?"), "{task}");
    let input = dir.path().join("in.txt");
    std::fs::write(&input, "a wonderful, moving film\n{\"text\": \"dull and far too long\"}\n").unwrap();
    let rows = predict_rows(&gguf, &out, &input);
    assert_eq!(rows.len(), 2);
    for r in &rows {
        let probs = r["probs"].as_object().expect("probs");
        assert_eq!(probs.keys().collect::<Vec<_>>(), ["0", "1"], "{r}");
        assert!(r.get("choice").is_none(), "not multiple choice: {r}");
        let sum: f64 = probs.values().filter_map(serde_json::Value::as_f64).sum();
        assert!((sum - 1.0).abs() < 1e-6, "{r}");
    }
}

/// `bayeslora train` of a decoder for two AdamW steps of batch 2 (the mean only) into `out`,
/// with `extra` flags (the task); asserts success.
fn train_decoder(model: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec!["train", "--model", model.to_str().unwrap_or_default(), "-o", out.to_str().unwrap_or_default()];
    args.extend(["--max-steps", "2", "--batch-size", "2", "--samples", "0", "--optimizer", "adamw"]);
    args.extend(extra);
    let o = bayeslora(&args);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// `bayeslora predict` of `input` with `adapter` over `model`: the JSON rows (asserts success).
fn predict_rows(model: &Path, adapter: &Path, input: &Path) -> Vec<serde_json::Value> {
    let o = bayeslora(&[
        "predict",
        "--model",
        model.to_str().unwrap_or_default(),
        "--adapter",
        adapter.to_str().unwrap_or_default(),
        "--input",
        input.to_str().unwrap_or_default(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).expect("JSONL")).collect()
}
