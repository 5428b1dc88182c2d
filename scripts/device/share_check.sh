#!/usr/bin/env bash
# How many launch-bound MiniLM trainings can share one GPU: N concurrent `bench train` processes
# of the MiniLM-L6 shape (bf16, B-LoRA with the base quantized, the GLUE sweeps' setting), for
# each N given, and the throughput they reach together (steps/s summed over the processes).
#   bash scripts/device/share_check.sh [N ...]        (default 1 2 4 6)
# Needs the unpacked CUDA binary .device/bayeslora; writes $OUT/share/N-i.json and prints a table.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=$ROOT/.device/bayeslora
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/share"
STEPS=${STEPS:-300}
ns=("$@"); [ ${#ns[@]} -gt 0 ] || ns=(1 2 4 6)
printf '%4s %14s %14s\n' N "step ms (mean)" "steps/s total"
for n in "${ns[@]}"; do
  for i in $(seq 1 "$n"); do
    d=$(mktemp -d)
    (cd "$d" && "$BIN" bench train --device cuda --dtype bf16 --objective label-words --optimizer adamw \
      --lora-r 8 --shape "$ROOT/configs/bench/minilm_l6_shape.json" --batch-size 32 --max-len 128 \
      --target-modules q_proj,k_proj,v_proj --method blora --config "$ROOT/configs/bench/blora_quantize_base.toml" \
      --max-steps "$STEPS" > run.log 2>&1; cp bench.json "$OUT/share/$n-$i.json" 2>/dev/null || tail -3 run.log) &
  done
  wait
  python3 - "$OUT/share" "$n" <<'PY'
import glob, re, sys
d, n = sys.argv[1], int(sys.argv[2])
ms = []
for f in glob.glob(f"{d}/{n}-*.json"):
    m = re.search(r'"step_ms":\s*([0-9.eE+-]+)', open(f).read())
    if m:
        ms.append(float(m.group(1)))
if ms:
    print(f"{n:4d} {sum(ms)/len(ms):14.1f} {sum(1000/m for m in ms):14.1f}")
PY
done
