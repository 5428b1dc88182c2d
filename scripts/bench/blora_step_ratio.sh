#!/usr/bin/env bash
# B-LoRA vs LoRA training-step time (issue 15's target: a B-LoRA step ≤ 1.5× a LoRA step on the
# GPU), one `bayeslora bench train` per row and method, same shape, optimizer and targets.
#
#   scripts/bench/blora_step_ratio.sh BIN PRESET [OUT]
#
# BIN: the bayeslora binary (CUDA build for the gpu preset). PRESET:
#   gpu  cuda, bf16: SmolLM2-135M shape (b 8 × 256, q,v; the rows of issue 15) and a Llama with
#        all-MiniLM-L6-v2's sizes (configs/bench/minilm_l6_shape.json; b 32 × 128, q,k,v), each
#        LoRA, B-LoRA (default slots: A, E, B and activations) and B-LoRA with the base quantized
#        too (configs/bench/blora_quantize_base.toml, the MiniLM GLUE sweeps' setting);
#   cpu  the same rows at CPU sizes, f32 (tiny.json b 8 × 64; MiniLM shape b 4 × 32).
# STEPS (default 20 gpu, 10 cpu) timed steps after the bench's warm-up; RAYON_NUM_THREADS as set.
# Writes OUT/<row>-<method>.json (the bench rows) and prints a table: step ms and B-LoRA / LoRA.
set -euo pipefail
BIN=$(realpath "$1")
PRESET=${2:-gpu}
OUT=${3:-bench-blora-ratio}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
case "$PRESET" in
  gpu)
    STEPS=${STEPS:-20}
    COMMON=(--device cuda --dtype bf16 --objective label-words --optimizer adamw --lora-r 8)
    ROWS=(
      "smollm2|--shape $ROOT/configs/bench/smollm2_135m.json --batch-size 8 --max-len 256 --target-modules q_proj,v_proj"
      "minilm_shape|--shape $ROOT/configs/bench/minilm_l6_shape.json --batch-size 32 --max-len 128 --target-modules q_proj,k_proj,v_proj"
    )
    ;;
  cpu)
    STEPS=${STEPS:-10}
    COMMON=(--device cpu --dtype f32 --objective label-words --optimizer adamw --lora-r 8)
    ROWS=(
      "tiny|--shape $ROOT/configs/bench/tiny.json --batch-size 8 --max-len 64 --target-modules q_proj,v_proj"
      "minilm_shape|--shape $ROOT/configs/bench/minilm_l6_shape.json --batch-size 4 --max-len 32 --target-modules q_proj,k_proj,v_proj"
    )
    ;;
  *) echo "preset: gpu or cpu" >&2; exit 2 ;;
esac
METHODS=(
  "lora|--method lora"
  "blora|--method blora"
  "blora_qbase|--method blora --config $ROOT/configs/bench/blora_quantize_base.toml"
)
step_ms() { tr -d ' \n' < "$1" | grep -o '"step_ms":[0-9.e+-]*' | head -1 | cut -d: -f2; }
printf '%-14s %-12s %10s %8s\n' row method step_ms ratio
for row in "${ROWS[@]}"; do
  name=${row%%|*}; args=${row#*|}
  lora_ms=""
  for m in "${METHODS[@]}"; do
    mname=${m%%|*}; margs=${m#*|}
    dir="$OUT/$name-$mname"; mkdir -p "$dir"
    # shellcheck disable=SC2086
    (cd "$dir" && "$BIN" bench train "${COMMON[@]}" $args $margs --max-steps "$STEPS" > run.log 2>&1) \
      || { echo "$name $mname failed: $dir/run.log" >&2; tail -5 "$dir/run.log" >&2; continue; }
    cp "$dir/bench.json" "$OUT/$name-$mname.json"
    ms=$(step_ms "$dir/bench.json")
    [ "$mname" = lora ] && lora_ms=$ms
    ratio=$(awk -v a="$ms" -v b="$lora_ms" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')
    printf '%-14s %-12s %10s %8s\n' "$name" "$mname" "$ms" "$ratio"
  done
done
