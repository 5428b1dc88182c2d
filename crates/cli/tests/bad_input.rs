//! Issue 19's table of hostile inputs on the CLI: each case must exit with status 2, print its
//! message fragment in one `error:` line per cause (no panic, no backtrace, no Debug dump, no
//! reason twice) and leave no output folder behind. Model cases start from all-MiniLM-L6-v2's
//! config.json and tokenizer.json (skipped with a note when the asset is absent).
mod common;
use common::minilm;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

/// safetensors bytes from a header value and a body.
fn safetensors(header: &Value, body: &[u8]) -> Vec<u8> {
    let h = header.to_string().into_bytes();
    let mut v = (h.len() as u64).to_le_bytes().to_vec();
    v.extend(h);
    v.extend(body);
    v
}

/// A model folder: MiniLM's config.json (edited by `config`) and tokenizer.json, and
/// `weights` as model.safetensors (`None`: a link to the real one).
fn model(root: &Path, name: &str, real: &Path, config: impl Fn(&mut Value), weights: Option<Vec<u8>>) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(real.join("config.json")).unwrap()).unwrap();
    config(&mut cfg);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(real.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    match weights {
        Some(bytes) => std::fs::write(dir.join("model.safetensors"), bytes).unwrap(),
        None => std::os::unix::fs::symlink(real.join("model.safetensors"), dir.join("model.safetensors")).unwrap(),
    }
    dir
}

fn file(root: &Path, name: &str, bytes: impl AsRef<[u8]>) -> String {
    let p = root.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.display().to_string()
}

struct Case {
    name: &'static str,
    args: Vec<String>,
    want: &'static str,
}

#[test]
fn issue_19_hostile_inputs_exit_2_with_one_clear_line_and_no_output() {
    let Some(real) = minilm() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let real_bytes = std::fs::read(real.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(real_bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&real_bytes[8..8 + n]).unwrap();
    let same = |_: &mut Value| {};
    let set = |k: &'static str, v: Value| move |c: &mut Value| c[k] = v.clone();
    let m = |name: &str, cfg: &dyn Fn(&mut Value), w: Option<Vec<u8>>| {
        model(root, name, &real, cfg, w).display().to_string()
    };

    // Weights files.
    let truncated = m("truncated", &same, Some(real_bytes[..real_bytes.len() / 2].to_vec()));
    let empty_st = m("empty_st", &same, Some(Vec::new()));
    let header_huge = m("header_huge", &same, Some([(1u64 << 62).to_le_bytes().as_slice(), b"{}"].concat()));
    let header_junk = m("header_junk", &same, Some([10u64.to_le_bytes().as_slice(), b"not json!!"].concat()));
    let offsets_past_end = m(
        "offsets_past_end",
        &same,
        Some(safetensors(
            &json!({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 1_000_000_000_000u64]}}),
            &[0; 8],
        )),
    );
    let bad_dtype = m(
        "bad_dtype",
        &same,
        Some(safetensors(&json!({"x": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}), &[0; 8])),
    );
    let mut nan = real_bytes.clone();
    let first = header.as_object().unwrap().iter().find(|(k, _)| *k != "__metadata__").unwrap();
    let off = 8 + n + first.1["data_offsets"][0].as_u64().unwrap() as usize;
    nan[off..off + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let nan_weights = m("nan_weights", &same, Some(nan));
    let mut inf = real_bytes.clone();
    inf[off + 4..off + 8].copy_from_slice(&f32::INFINITY.to_le_bytes());
    let inf_weights = m("inf_weights", &same, Some(inf));
    let no_weights = root.join("no_weights");
    std::fs::create_dir_all(&no_weights).unwrap();
    std::fs::copy(real.join("config.json"), no_weights.join("config.json")).unwrap();
    let index_missing_shard = m("index_missing_shard", &same, Some(Vec::new()));
    std::fs::remove_file(Path::new(&index_missing_shard).join("model.safetensors")).unwrap();
    file(
        Path::new(&index_missing_shard),
        "model.safetensors.index.json",
        json!({"weight_map": {"embeddings.word_embeddings.weight": "model-00001-of-00002.safetensors"}}).to_string(),
    );
    let index_junk = m("index_junk", &same, Some(Vec::new()));
    std::fs::remove_file(Path::new(&index_junk).join("model.safetensors")).unwrap();
    file(Path::new(&index_junk), "model.safetensors.index.json", "{\"weight_map\": [1, 2]}");

    // config.json.
    let cfg_junk = m("cfg_junk", &same, None);
    file(Path::new(&cfg_junk), "config.json", "{not json");
    let cfg_type = m("cfg_type", &set("hidden_size", json!("384")), None);
    let cfg_null = m("cfg_null", &set("num_attention_heads", Value::Null), None);
    let cfg_list = m("cfg_list", &set("vocab_size", json!([30522])), None);
    let off_by_one = m("off_by_one", &set("vocab_size", json!(30523)), None);
    let terabytes = m("terabytes", &set("vocab_size", json!(1_000_000_000_000u64)), None);
    let heads = m("heads", &set("num_attention_heads", json!(5)), None);
    let zero_layers = m("zero_layers", &set("num_hidden_layers", json!(0)), None);
    let unknown_arch = m(
        "unknown_arch",
        &|c: &mut Value| {
            c["architectures"] = json!(["FooForBar"]);
            c["model_type"] = json!("foo");
        },
        None,
    );
    let cfg_array = m("cfg_array", &same, None);
    file(Path::new(&cfg_array), "config.json", "[1, 2, 3]");
    let tok_junk = m("tok_junk", &same, None);
    file(Path::new(&tok_junk), "tokenizer.json", "{\"version\":\"1.0\",\"model\":{\"type\":\"Nope\"}}");

    // GGUF.
    let gguf_counts = file(
        root,
        "counts.gguf",
        [b"GGUF".as_slice(), &3u32.to_le_bytes(), &(1u64 << 60).to_le_bytes(), &(1u64 << 60).to_le_bytes()].concat(),
    );
    let gguf_table = file(
        root,
        "table.gguf",
        [
            b"GGUF".as_slice(),
            &3u32.to_le_bytes(),
            &1u64.to_le_bytes(),
            &0u64.to_le_bytes(),
            &(1u64 << 40).to_le_bytes(),
            b"x",
        ]
        .concat(),
    );
    let gguf_dims = {
        // One tensor "t" with 2^40 x 2^40 elements of type F32 at offset 0, no metadata.
        let mut v = [b"GGUF".as_slice(), &3u32.to_le_bytes(), &1u64.to_le_bytes(), &0u64.to_le_bytes()].concat();
        v.extend(1u64.to_le_bytes());
        v.extend(b"t");
        v.extend(2u32.to_le_bytes());
        v.extend((1u64 << 40).to_le_bytes());
        v.extend((1u64 << 40).to_le_bytes());
        v.extend(0u32.to_le_bytes());
        v.extend(0u64.to_le_bytes());
        file(root, "dims.gguf", v)
    };
    let gguf_empty = file(root, "empty.gguf", b"GGUF");

    // Data files and run configs.
    let empty_rows = file(root, "empty.jsonl", "");
    let blank_rows = file(root, "blank.jsonl", "\n\n   \n");
    let junk_rows = file(root, "junk.jsonl", "\u{fffd}\u{0} garbage \u{2603}\n");
    let bad_utf8 = file(root, "bad_utf8.jsonl", b"{\"text\": \"\xff\xfe\", \"label\": 0}\n".as_slice());
    let ctrl = file(root, "ctrl.jsonl", "{\"text\": \"\u{202e}\u{0} \u{1F4A9}\", \"label\": 0}\n");
    let label_type = file(root, "label_type.jsonl", "{\"text\": \"\u{1F4A9}\", \"label\": [1]}\n");
    let no_text = file(root, "no_text.jsonl", "{\"label\": 0}\n");
    let tsv_junk = file(root, "junk.tsv", "sentence\tlabel\n\u{2603}\u{0}\tnot-a-label\n");
    let toml_bad = file(root, "bad.toml", "[train\nmax_steps = 3\n");
    let toml_type = file(root, "type.toml", "[train]\nmax_steps = \"three\"\n");
    let toml_neg = file(root, "neg.toml", "max_len = -5\n");
    let toml_huge = file(root, "huge.toml", "[train]\nmax_steps = 99999999999999999999999\n");

    let out = root.join("out");
    let real_s = real.display().to_string();
    let train = |model: &str, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "train",
            "--task",
            "sst2",
            "--train-limit",
            "16",
            "--eval-limit",
            "8",
            "--batch-size",
            "8",
            "--max-len",
            "16",
        ]
        .map(String::from)
        .to_vec();
        v.extend(["--max-steps", "1", "--samples", "0", "--model", model, "-o"].map(String::from));
        v.push(out.display().to_string());
        // `extra` is flag/value pairs; a flag already set is overridden (clap refuses repeats).
        for pair in extra.chunks(2) {
            match v.iter().position(|a| a == pair[0]) {
                Some(i) => v[i + 1] = pair[1].to_string(),
                None => v.extend(pair.iter().map(|s| s.to_string())),
            }
        }
        v
    };
    let jsonl = |f: &str| train(&real_s, &["--task", "jsonl_text", "--train-file", f, "--eval-file", f]);
    let case = |name, args, want| Case { name, args, want };
    let cases = vec![
        case("truncated safetensors", train(&truncated, &[]), "not a valid safetensors file"),
        case("empty safetensors", train(&empty_st, &[]), "header too small"),
        case("header length 2^62", train(&header_huge, &[]), "header too large"),
        case("header not JSON", train(&header_junk, &[]), "invalid JSON in header"),
        case("offsets past the end", train(&offsets_past_end, &[]), "not a valid safetensors file"),
        case("unknown dtype", train(&bad_dtype, &[]), "not a valid safetensors file"),
        case("NaN weights", train(&nan_weights, &[]), "holds NaN or infinite values"),
        case("inf weights", train(&inf_weights, &[]), "holds NaN or infinite values"),
        case("no weights", train(&no_weights.display().to_string(), &[]), "model.safetensors: not found"),
        case(
            "index names a missing shard",
            train(&index_missing_shard, &[]),
            "model-00001-of-00002.safetensors: not found",
        ),
        case("index weight_map a list", train(&index_junk, &[]), "no `weight_map` object"),
        case("config.json not JSON", train(&cfg_junk, &[]), "config.json: invalid JSON"),
        case("config.json a list", train(&cfg_array, &[]), "config.json"),
        case("hidden_size a string", train(&cfg_type, &[]), "invalid type: string \"384\""),
        // The field is not named yet (serde's message on a Value has no path): issue 19, left.
        case("num_attention_heads null", train(&cfg_null, &[]), "config.json: invalid config: invalid type: null"),
        case("vocab_size a list", train(&cfg_list, &[]), "config.json: invalid config: invalid type: sequence"),
        case("vocab_size off by one", train(&off_by_one, &[]), "has shape [30522, 384], expected [30523, 384]"),
        case("vocab_size 10^12 (terabytes)", train(&terabytes, &[]), "expected [1000000000000, 384]"),
        case("heads do not divide", train(&heads, &[]), "invalid num_attention_heads = 5"),
        case("zero layers", train(&zero_layers, &[]), "num_hidden_layers = 0"),
        case("unknown architecture", train(&unknown_arch, &[]), "unknown architecture `FooForBar`"),
        case("tokenizer.json junk", train(&tok_junk, &[]), "tokenizer.json"),
        case("model folder missing", train("/nonexistent/model", &[]), "/nonexistent/model"),
        case("GGUF counts 2^60", train(&gguf_counts, &[]), "not a valid GGUF file"),
        case("GGUF garbage tensor table", train(&gguf_table, &[]), "not a valid GGUF file"),
        case("GGUF tensor of 2^80 elements", train(&gguf_dims, &[]), "dims.gguf"),
        case("GGUF magic only", train(&gguf_empty, &[]), "empty.gguf"),
        case("empty dataset", jsonl(&empty_rows), "no data rows"),
        case("blank lines only", jsonl(&blank_rows), "no data rows"),
        case("unicode junk row", jsonl(&junk_rows), "junk.jsonl:1: invalid JSON"),
        case("invalid UTF-8", jsonl(&bad_utf8), "not UTF-8"),
        case("control character in a string", jsonl(&ctrl), "ctrl.jsonl:1"),
        case("label a list", jsonl(&label_type), "label_type.jsonl:1"),
        case("row without text", jsonl(&no_text), "no_text.jsonl:1"),
        case("TSV junk label", train(&real_s, &["--train-file", &tsv_junk]), "junk.tsv:2"),
        case("malformed TOML", train(&real_s, &["--config", &toml_bad]), "unclosed table"),
        case("TOML wrong type", train(&real_s, &["--config", &toml_type]), "train.max_steps"),
        case("TOML negative", train(&real_s, &["--config", &toml_neg]), "max_len"),
        case("TOML integer overflow", train(&real_s, &["--config", &toml_huge]), "huge.toml"),
        case("unknown task", train(&real_s, &["--task", "nope"]), "invalid task = nope"),
        case("max-len 0", train(&real_s, &["--max-len", "0"]), "max_len"),
    ];
    assert!(cases.len() >= 30);
    let mut failures = Vec::new();
    for c in &cases {
        let _ = std::fs::remove_dir_all(&out);
        // RUST_BACKTRACE=1 as some machines set it: candle then attaches a backtrace to every
        // error, and the message must still be one line.
        let o =
            Command::new(env!("CARGO_BIN_EXE_bayeslora")).args(&c.args).env("RUST_BACKTRACE", "1").output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        let mut problems = Vec::new();
        if o.status.code() != Some(2) {
            problems.push(format!("exit {:?}", o.status.code()));
        }
        if !err.contains(c.want) {
            problems.push(format!("no `{}`", c.want));
        }
        if errors.len() != 1 {
            problems.push(format!("{} error lines", errors.len()));
        }
        for bad in [
            "panicked",
            "stack backtrace",
            "<unknown>",
            "  0: ",
            "RUST_BACKTRACE",
            "Some(",
            "List([",
            "os error 2): No such",
        ] {
            if err.contains(bad) {
                problems.push(format!("`{bad}` in the output"));
            }
        }
        if let Some(line) = errors.first() {
            // No reason twice: "a: b: b" or the same clause repeated.
            let parts: Vec<&str> = line.split(": ").collect();
            if parts.windows(2).any(|w| w[0] == w[1]) {
                problems.push("a reason repeated".into());
            }
        }
        if out.exists() {
            problems.push("output folder left behind".into());
        }
        if !problems.is_empty() {
            failures.push(format!("{}: {}\n    {}", c.name, problems.join(", "), err.trim().replace('\n', "\n    ")));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
    println!("{} hostile inputs: exit 2, one clear line, no output", cases.len());
}

#[test]
fn issue_19_write_error_exits_2_and_names_the_path() {
    let Some(real) = minilm() else { return };
    // /dev/full/run: the output folder cannot be created (a write error before any output).
    let o = Command::new(env!("CARGO_BIN_EXE_bayeslora"))
        .args(["train", "--task", "sst2", "--train-limit", "16", "--eval-limit", "8", "--max-steps", "1"])
        .args(["--batch-size", "8", "--max-len", "16", "--samples", "0", "--model"])
        .arg(&real)
        .args(["-o", "/dev/full/run"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("/dev/full/run") && !err.contains("panicked"), "{err}");
}

/// A disk that fills up in the middle of a run. The checkpoint write of step 4 meets a real
/// ENOSPC: while the write pauses after optimizer.safetensors (the kill campaign's hook), the
/// test puts a link to /dev/full where state.json's temporary file goes (`state.json.tmp<pid>`).
/// The run must exit 2 with one line naming that file and the previous checkpoint, leave no
/// partial folder, keep checkpoint 2 as the newest, and resume from it to the adapter of an
/// uninterrupted run.
#[test]
fn issue_19_disk_full_mid_run_keeps_the_previous_checkpoint_resumable() {
    use std::time::{Duration, Instant};
    let Some(real) = minilm() else { return };
    if !Path::new("/dev/full").exists() {
        eprintln!("skipping: no /dev/full");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let command = |out: &Path, extra: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_bayeslora"));
        c.args(["train", "--task", "sst2", "--train-limit", "48", "--eval-limit", "8", "--batch-size", "8"]);
        c.args(["--max-len", "16", "--samples", "0", "--checkpoint-every", "2", "--max-steps", "6", "--model"]);
        c.arg(&real).arg("-o").arg(out).args(extra);
        // Both runs pause the same way, so they differ only in the full disk.
        c.env("BAYESLORA_TEST_CHECKPOINT_PAUSE_MS", "300").env_remove("RUST_BACKTRACE");
        c
    };
    let reference = tmp.path().join("reference");
    let o = command(&reference, &[]).output().unwrap();
    assert!(o.status.success(), "the uninterrupted run failed: {}", String::from_utf8_lossy(&o.stderr));

    let out = tmp.path().join("full");
    let log = tmp.path().join("stderr.txt");
    let mut child = command(&out, &[])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let checkpoints = out.join("checkpoints");
    let partial = checkpoints.join("checkpoint-0000004.partial");
    let deadline = Instant::now() + Duration::from_secs(300);
    while !partial.join("optimizer.safetensors").exists() {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before its second checkpoint");
        assert!(Instant::now() < deadline, "no second checkpoint after 5 minutes");
        std::thread::sleep(Duration::from_millis(1));
    }
    std::os::unix::fs::symlink("/dev/full", partial.join(format!("state.json.tmp{}", child.id()))).unwrap();
    let status = child.wait().unwrap();

    let err = std::fs::read_to_string(&log).unwrap();
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(status.code(), Some(2), "{err}");
    assert_eq!(errors.len(), 1, "{err}");
    let line = errors[0];
    for want in [
        "writing the checkpoint of step 4",
        "checkpoint-0000004.partial/state.json: No space left on device",
        "checkpoint-0000002 is intact",
        "--resume",
    ] {
        assert!(line.contains(want), "no `{want}` in: {line}");
    }
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "{err}");
    assert!(!partial.exists(), "the partial checkpoint was left behind");
    assert!(!checkpoints.join("checkpoint-0000004").exists());
    assert_eq!(std::fs::read_to_string(checkpoints.join("latest")).unwrap(), "checkpoint-0000002");

    let o = command(&out, &["--resume"]).output().unwrap();
    assert!(o.status.success(), "the resume failed: {}", String::from_utf8_lossy(&o.stderr));
    let adapter = |run: &Path| std::fs::read(run.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(adapter(&out) == adapter(&reference), "the resumed adapter differs from the uninterrupted run's");
}

/// A run whose memory estimate is absurd (MiniLM, 100,000 × 512 tokens: terabytes of
/// activations) is refused before the model loads, with the estimate, the device's memory and
/// what to try, and writes nothing; `--skip-memory-check` lets the same run start (and finish:
/// 16 rows are one short batch) and is kept in its config.toml.
#[test]
fn issue_19_run_over_the_memory_estimate_is_refused_with_the_numbers() {
    let Some(real) = minilm() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let train = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_bayeslora"))
            .args(["train", "--task", "sst2", "--train-limit", "16", "--eval-limit", "8", "--max-steps", "1"])
            .args(["--samples", "0", "--batch-size", "100000", "--max-len", "512", "--model"])
            .arg(&real)
            .arg("-o")
            .arg(&out)
            .args(extra)
            .env_remove("RUST_BACKTRACE")
            .output()
            .unwrap()
    };
    let o = train(&[]);
    let err = String::from_utf8_lossy(&o.stderr);
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(errors.len(), 1, "{err}");
    let line = errors[0];
    for want in [
        "this run needs about ",
        " TiB (weights ",
        "for batch 100000 × 512 tokens",
        "but the CPU has ",
        "--batch-size",
        "--max-len",
        "--skip-memory-check",
    ] {
        assert!(line.contains(want), "no `{want}` in: {line}");
    }
    assert!(!err.contains("loading"), "the model was loaded before the check: {err}");
    assert!(!out.exists(), "the refused run wrote {}", out.display());

    // The same run with --skip-memory-check starts: its 16 rows make one batch of short
    // sentences, far below the worst case the estimate assumes.
    let o = train(&["--skip-memory-check"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let config = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(config.contains("skip_memory_check = true"), "{config}");
}
