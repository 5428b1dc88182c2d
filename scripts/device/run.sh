#!/usr/bin/env bash
# On the GPU machine (device tool, carry [".device"]): unpack the CUDA binary once, point
# BAYESLORA_ASSETS at the staged models, then run `bayeslora ARGS...` under a time limit, with its
# log and, for `compare`, the sweep's summary and cells (one tarball) under $OUT.
#   bash scripts/device/run.sh SECONDS compare --config configs/compare/qwen_commonsense.toml
# A sweep cut off by the limit resumes at its first unfinished cell on the next call (same
# warm machine: runs/ and the staged models stay there between calls).
set -uo pipefail
limit=$1; shift
for f in .device/*.xz; do
  [ -x "${f%.xz}" ] && [ "${f%.xz}" -nt "$f" ] && continue
  python3 -c "import lzma,shutil,sys;shutil.copyfileobj(lzma.open(sys.argv[1]),open(sys.argv[1][:-3],'wb'))" "$f"
  chmod +x "${f%.xz}"
done
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export BAYESLORA_ASSETS=${BAYESLORA_ASSETS:-$HOME/assets}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
start=$(date +%s)
timeout -s INT "$limit" .device/bayeslora "$@" 2>&1 | tee -a "$OUT/log"
rc=${PIPESTATUS[0]}
echo "run.sh: rc $rc after $(( $(date +%s) - start )) s" | tee -a "$OUT/log"
if [ "${1:-}" = compare ]; then
  out=$(grep -E '^out *=' "$3" | sed -E 's/^out *= *"([^"]*)".*/\1/')
  if [ -d "$out" ]; then
    cp "$out"/summary.md "$OUT"/ 2>/dev/null
    tar czf "$OUT/sweep.tgz" -C "$(dirname "$out")" "$(basename "$out")"
  fi
fi
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader >> "$OUT/log" 2>/dev/null
exit "$rc"
