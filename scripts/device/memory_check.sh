#!/usr/bin/env bash
# Issue 17's memory check on the GPU machine, one call (device tool, carry the .xz files named):
#   bash scripts/device/memory_check.sh
# Needs .device/bayeslora.xz (../shared/gpu/cuda-build.sh -p bayeslora-cli --features cuda) and
# .device/saved_memory.xz (scripts/device/pack_cuda_tests.sh saved_memory). Runs
#   1. tests/saved_memory.rs on the GPU: what a decoder layer keeps for its backward, per token,
#      by op kind, in bf16 hidden vectors (C), $OUT/saved_memory.log;
#   2. `bench train` on the Llama-2-7B shape (random bf16 weights, LoRA r 8 on q, v, AdamW, 3
#      warm-up + 8 timed steps) at 4 × 512 and 8 × 1024: tokens/s and the device-level peak,
#      $OUT/b7_<B>x<T>.json, summary in $OUT/memory.txt.
set -uo pipefail
source "$(dirname "$0")/unpack.sh"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
[ -x .device/saved_memory ] && timeout 120 .device/saved_memory --nocapture --test-threads 1 > "$OUT/saved_memory.log" 2>&1
grep -A30 "Cuda" "$OUT/saved_memory.log" | grep -E "Cuda|custom|total" | tee "$OUT/memory.txt"
for shape in "4 512" "8 1024"; do
  set -- $shape
  timeout 200 .device/bayeslora bench train --shape configs/bench/llama2_7b.json --dtype bf16 --device cuda \
    --batch-size "$1" --max-len "$2" --max-steps 8 --warmup 3 --target-modules q_proj,v_proj --optimizer adamw \
    --out "$OUT/b7_$1x$2.json" > "$OUT/b7_$1x$2.log" 2>&1
  python3 -c 'import json,sys
for r in json.load(open(sys.argv[1])):
    print(f"llama2_7b {r[\"bsz\"]}x{r[\"seq\"]} {r[\"opt\"]}: {r[\"tokens_per_s\"]:.0f} tok/s, step {r[\"step_ms\"]:.1f} ms, peak {r[\"peak_gib\"]} GiB ({r[\"peak_kind\"]}), loss {r[\"final_loss\"]:.4f}")' \
    "$OUT/b7_$1x$2.json" 2>&1 | tee -a "$OUT/memory.txt" || tail -3 "$OUT/b7_$1x$2.log" | tee -a "$OUT/memory.txt"
done
