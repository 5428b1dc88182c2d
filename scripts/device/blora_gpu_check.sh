#!/usr/bin/env bash
# Issue 15's B-LoRA speed check on the GPU machine, one call (device tool, carry [".device"]):
#   bash scripts/device/blora_gpu_check.sh [SECONDS]
# Needs .device/bayeslora.xz (../shared/gpu/cuda-build.sh -p bayeslora-cli --features cuda) and
# .device/cuda_fused.xz (scripts/device/pack_cuda_tests.sh). Runs
#   1. the fused-kernel GPU tests (tests/cuda_fused.rs: quantizer, range, hard-concrete gates, the
#      rank multiplier and the windowed gate ops against the composed CUDA ops and the CPU, and a
#      B-LoRA layer's training step against the CPU), $OUT/cuda_fused.log;
#   2. scripts/bench/blora_step_ratio.sh gpu: LoRA vs B-LoRA `bench train` step times on the
#      SmolLM2-135M shape and the MiniLM-L6 shape (bf16, AdamW), $OUT/ratio.txt and the JSON rows.
# The target: B-LoRA step ≤ 1.5× LoRA's (issue 15).
set -uo pipefail
limit=${1:-540}
source "$(dirname "$0")/unpack.sh"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
rc=0
if [ -x .device/cuda_fused ]; then
  timeout "$((limit / 3))" .device/cuda_fused --test-threads 1 2>&1 | tee "$OUT/cuda_fused.log" | tail -25
  rc=${PIPESTATUS[0]}
else
  echo "blora_gpu_check: no .device/cuda_fused (scripts/device/pack_cuda_tests.sh)" | tee "$OUT/cuda_fused.log"
  rc=1
fi
timeout "$((limit * 2 / 3))" bash scripts/bench/blora_step_ratio.sh .device/bayeslora gpu "$OUT/ratio" 2>&1 | tee "$OUT/ratio.txt"
echo "blora_gpu_check: tests rc $rc" | tee -a "$OUT/ratio.txt"
exit "$rc"
