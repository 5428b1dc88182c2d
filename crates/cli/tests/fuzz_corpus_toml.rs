//! Replays the committed `run_toml` fuzz corpus (`fuzz/corpus/run_toml/`) through the binary's
//! own TOML loading (`train --config`): every file ends with exit 0 or 2, never a panic.
use std::path::Path;
use std::process::Command;

#[test]
fn issue_19_run_toml_corpus_replays_without_panics() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/run_toml");
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(&dir).unwrap() {
        let file = e.unwrap().path();
        let o = Command::new(env!("CARGO_BIN_EXE_bayeslora"))
            .args(["train", "--model", "/nonexistent/model", "-o"])
            .arg(tmp.path().join("out"))
            .arg("--config")
            .arg(&file)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{}: {err}", file.display());
        assert!(!err.contains("panicked"), "{}: {err}", file.display());
    }
}
