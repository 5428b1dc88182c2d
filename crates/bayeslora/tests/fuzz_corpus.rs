//! Replays the committed cargo-fuzz corpora (`fuzz/corpus/<target>/`) through the parsers on the
//! stable toolchain, so CI covers every seed and every fixed crash without nightly. A panic in
//! any entry point fails the test with the file that caused it; returning `Err` is fine.
use std::path::Path;

#[test]
fn issue_19_fuzz_corpora_replay_without_panics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    let mut replayed = 0;
    for (target, run) in bayeslora::fuzz::TARGETS {
        let dir = root.join(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{}: no seeds", dir.display());
        for file in files {
            let data = std::fs::read(&file).unwrap();
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{target}: {} panicked", file.display());
            replayed += 1;
        }
    }
    println!("{replayed} corpus files replayed");
}

/// Seeds that must parse: a corpus of only failures would prove little.
#[test]
fn valid_seeds_parse() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    let read = |t: &str, f: &str| std::fs::read(root.join(t).join(f)).unwrap();
    bayeslora::fuzz::safetensors(&read("safetensors", "valid")).unwrap();
    bayeslora::fuzz::safetensors_index(&read("safetensors_index", "valid")).unwrap();
    bayeslora::fuzz::config_json(&read("config_json", "minilm")).unwrap();
    bayeslora::fuzz::tokenizer(&read("tokenizer", "wordlevel")).unwrap();
    bayeslora::fuzz::task_rows(&read("task_rows", "sst2_tsv")).unwrap();
    bayeslora::fuzz::task_rows(&read("task_rows", "jsonl_text")).unwrap();
    assert!(bayeslora::fuzz::safetensors(&read("safetensors", "nan")).unwrap_err().to_string().contains("NaN"));
}
