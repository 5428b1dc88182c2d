#!/usr/bin/env bash
# Build the CUDA test binaries named on the command line (default: cuda_fused) with the toolchain
# and settings of ../shared/gpu/cuda-build.sh (run that first: it installs nvcc and the link
# libraries under $CUDA_BUILD_HOME), and pack each, stripped and xz-compressed, as
# .device/<test>.xz beside the CUDA bayeslora binary, so the GPU machine can run the tests with
# no toolchain: scripts/device/blora_gpu_check.sh.
#   CARGO_BUILD_JOBS=1 scripts/device/pack_cuda_tests.sh [cuda_fused cuda ...]
# FEATURES (default cuda) selects the crate features, e.g. FEATURES=nccl for tests/nccl.rs.
set -euo pipefail
home=${CUDA_BUILD_HOME:-$HOME/.cache/cuda-build}
site=$("$home/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/nvidia/cu13
links=$home/linklibs
[[ -x $site/bin/nvcc ]] || { echo "pack_cuda_tests: run ../shared/gpu/cuda-build.sh first (no nvcc under $site)" >&2; exit 1; }
export PATH=$site/bin:$PATH CUDA_ROOT=$site CUDA_PATH=$site CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export RUSTFLAGS="${RUSTFLAGS:-} -L $links"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
tests=("$@")
[[ ${#tests[@]} -gt 0 ]] || tests=(cuda_fused)
args=()
for t in "${tests[@]}"; do args+=(--test "$t"); done
mkdir -p .device
# Build with readable errors first, then list the built test executables (a no-op build).
features=${FEATURES:-cuda}
cargo test --release -p bayeslora --features "$features" "${args[@]}" --no-run
cargo test --release -p bayeslora --features "$features" "${args[@]}" --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do
  strip -o ".device/$name" "$exe"
  xz -T0 -6 -f ".device/$name"
  echo "pack_cuda_tests: packed .device/$name.xz ($(du -h ".device/$name.xz" | cut -f1))" >&2
done
