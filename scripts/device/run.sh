#!/usr/bin/env bash
# On the GPU machine (device tool, carry [".device"]): unpack the CUDA binary once, point
# BAYESLORA_ASSETS at the staged models, then run `bayeslora ARGS...` under a time limit, with its
# log and, for `compare`, the sweep's summary and cells (one tarball) under $OUT.
#   bash scripts/device/run.sh SECONDS compare --config configs/compare/qwen_commonsense.toml
# A sweep cut off by the limit resumes at its first unfinished cell on the next call (same
# warm machine: runs/ and the staged models stay there between calls). Several sweeps may run at
# once on one GPU (`run.sh 560 compare --config A.toml & run.sh 560 compare --config B.toml &
# wait`): each writes $OUT/<config name>.log, <name>-summary.md and <name>.tgz.
set -uo pipefail
limit=$1; shift
source "$(dirname "$0")/unpack.sh"
export BAYESLORA_ASSETS=${BAYESLORA_ASSETS:-$HOME/assets}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
name=log
[ "${1:-}" = compare ] && name=$(basename "$3" .toml)
log="$OUT/$name.log"
start=$(date +%s)
timeout -s INT "$limit" .device/bayeslora "$@" 2>&1 | tee -a "$log"
rc=${PIPESTATUS[0]}
echo "run.sh: rc $rc after $(( $(date +%s) - start )) s" | tee -a "$log"
if [ "${1:-}" = compare ]; then
  out=$(grep -E '^out *=' "$3" | sed -E 's/^out *= *"([^"]*)".*/\1/')
  if [ -d "$out" ]; then
    cp "$out"/summary.md "$OUT/$name-summary.md" 2>/dev/null
    tar czf "$OUT/$name.tgz" -C "$(dirname "$out")" "$(basename "$out")"
  fi
fi
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader >> "$log" 2>/dev/null
exit "$rc"
