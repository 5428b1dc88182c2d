#!/usr/bin/env bash
# Both stacks side by side in one device run: `bayeslora bench train --shape` (our CUDA binary) and
# the PyTorch anchor (scripts/bench/torch_anchor.py: transformers + peft + ivon-opt), on the
# anchor's runs, random bf16 weights, LoRA r 8, 8 timed steps after 3 warm-up steps:
#   Llama-2-7B shape: 4×512 and 8×1024 with LoRA on q,v; 8×1024 with all-linear LoRA;
#   SmolLM2-135M shape: 16×320 on q,v;   each with AdamW and with IVON;
#   ours also with activation checkpointing (--gradient-checkpointing; run ids ending in -ck) at
#   Llama-2-7B 4×512 q,v and 8×1024 all-linear (the anchor has no such runs).
#
# Here (no GPU), once:  ../shared/gpu/cuda-build.sh -p bayeslora-cli --features cuda
#   (writes .device/bayeslora.xz; add '/.device/' to .git/info/exclude once) and put the ivon-opt
#   and Liger-Kernel wheels next to it (pure Python; Liger needs the GPU machine's Triton):
#   python3 -m pip download --no-deps ivon-opt==0.1.3 liger-kernel -d .device
# Then with the device tool, carrying .device:
#   run(command="bash scripts/bench/device_bench.sh", carry=[".device"], timeout_s=600)
# Settings (environment): STACKS="pytorch bayeslora" (which, in that order), ONLY=REGEX (run ids
# to keep, e.g. 'smollm2|4x512'), RUN_TIMEOUT=150 (seconds per bayeslora run and per anchor run),
# DEADLINE=570 (seconds for the whole script: no run starts that could not finish before it),
# STEPS=8, WARMUP=3, DEVICE=cuda, DTYPE=bf16 (of our runs; the anchor is always CUDA bf16), BIN
# (our binary, default .device/bayeslora), SMOKE=1 (two runs of configs/bench/tiny.json instead),
# VARIANTS="eager compile liger" (the PyTorch paths timed per anchor run; torch.compile's
# compilation is in its warm-up and reported as time_to_first_step_s; table.md pairs each of our
# rows with the fastest variant).
#
# Writes under $OUT (default ./bench-out): bayeslora.jsonl and pytorch.jsonl (one JSON object per
# run, the anchor's fields opt, targets, bsz, seq, step_ms, tokens_per_s, peak_gib, mfu_vs_989 plus
# each stack's extras; a failed or timed-out run is a row with "error"), table.md (side by side)
# and log.txt. Four files: the device tool brings back at most eight.
set -uo pipefail
OUT=${OUT:-$PWD/bench-out}
mkdir -p "$OUT"
START=$(date +%s)
STACKS=${STACKS:-"pytorch bayeslora"}
ONLY=${ONLY:-.}
RUN_TIMEOUT=${RUN_TIMEOUT:-150}
DEADLINE=${DEADLINE:-570}
STEPS=${STEPS:-8}
WARMUP=${WARMUP:-3}
LOG=$OUT/log.txt
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1

# The runs: id shape bsz seq targets opt [extra flags of ours, comma-separated; such runs are ours only]
RUNS=()
for opt in adamw ivon; do
  RUNS+=("llama2_7b-4x512-qv-$opt configs/bench/llama2_7b.json 4 512 q_proj,v_proj $opt")
  RUNS+=("llama2_7b-8x1024-qv-$opt configs/bench/llama2_7b.json 8 1024 q_proj,v_proj $opt")
  RUNS+=("llama2_7b-8x1024-all-$opt configs/bench/llama2_7b.json 8 1024 all-linear $opt")
  RUNS+=("smollm2_135m-16x320-qv-$opt configs/bench/smollm2_135m.json 16 320 q_proj,v_proj $opt")
  RUNS+=("llama2_7b-4x512-qv-$opt-ck configs/bench/llama2_7b.json 4 512 q_proj,v_proj $opt --gradient-checkpointing")
  RUNS+=("llama2_7b-8x1024-all-$opt-ck configs/bench/llama2_7b.json 8 1024 all-linear $opt --gradient-checkpointing")
done
if [[ ${SMOKE:-0} == 1 ]]; then # a seconds-long check of the script itself (CPU: DEVICE=cpu DTYPE=f32)
  RUNS=("tiny-2x16-qv-adamw configs/bench/tiny.json 2 16 q_proj,v_proj adamw"
        "tiny-2x16-all-ivon configs/bench/tiny.json 2 16 all-linear ivon")
fi
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bf16}

left() { echo $((DEADLINE - ($(date +%s) - START))); }
budget() { local l; l=$(left); ((l - 5 < RUN_TIMEOUT)) && echo $((l - 5)) || echo "$RUN_TIMEOUT"; }

echo "== device_bench $(date -u +%FT%TZ) git $(git rev-parse --short HEAD 2>/dev/null || echo ?)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# Our binary (packed by cuda-build.sh) and CUDA's libraries.
source "$(dirname "$0")/../device/unpack.sh"
BIN=${BIN:-.device/bayeslora}

# ivon-opt for the anchor's IVON rows, from a wheel carried in .device/.
if ! python3 -c "import ivon" 2>/dev/null; then
  if ls .device/ivon_opt-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/ivon-site .device/ivon_opt-*.whl \
      && export PYTHONPATH=/tmp/ivon-site${PYTHONPATH:+:$PYTHONPATH}
  fi
  python3 -c "import ivon" 2>/dev/null || echo "note: ivon-opt not importable (no .device/ivon_opt-*.whl?): the anchor's IVON rows are skipped"
fi
VARIANTS=${VARIANTS:-"eager compile liger"}
if [[ $VARIANTS == *liger* ]] && ! python3 -c "import liger_kernel" 2>/dev/null; then
  if ls .device/liger_kernel-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/liger-site .device/liger_kernel-*.whl \
      && export PYTHONPATH=/tmp/liger-site${PYTHONPATH:+:$PYTHONPATH}
  fi
  python3 -c "import liger_kernel" 2>/dev/null || echo "note: liger-kernel not importable (no .device/liger_kernel-*.whl?): its rows are errors"
fi
variant_flags=(); for v in $VARIANTS; do variant_flags+=(--variant "$v"); done

error_row() { # stack id shape bsz seq targets opt message
  python3 - "$@" <<'EOF'
import json, sys
stack, rid, shape, bsz, seq, targets, opt, msg = sys.argv[1:9]
print(json.dumps(dict(stack=stack, id=rid, opt=opt, targets=targets if targets == "all-linear" else targets.split(","),
                      bsz=int(bsz), seq=int(seq), shape=shape, error=msg)))
EOF
}

run_pytorch() {
  local specs=() ids=()
  for r in "${RUNS[@]}"; do
    read -r id shape bsz seq targets opt flags <<<"$r"
    [[ $id =~ $ONLY && -z ${flags:-} ]] || continue
    specs+=(--run "$shape:$bsz:$seq:$targets:$opt"); ids+=("$id")
  done
  ((${#ids[@]})) || return 0
  # One process for all anchor runs (each builds its own model); give it a per-run share of the time.
  local t=$((RUN_TIMEOUT * ${#ids[@]} * ${#variant_flags[@]} / 2)) l; l=$(left); ((t > l - 5)) && t=$((l - 5))
  ((t > 20)) || { echo "pytorch: no time left"; return 0; }
  echo "== pytorch: ${ids[*]} (timeout ${t}s)"
  timeout -k 10 "$t" python3 scripts/bench/torch_anchor.py --steps "$STEPS" --warmup "$WARMUP" --device "$DEVICE" \
    --out "$OUT/pytorch.jsonl" "${variant_flags[@]}" "${specs[@]}" || echo "pytorch: exit $? (rows written so far are kept)"
}

run_bayeslora() {
  [[ -x $BIN ]] || { echo "bayeslora: no binary at $BIN (build with ../shared/gpu/cuda-build.sh -p bayeslora-cli --features cuda)"; return 0; }
  local tmp; tmp=$(mktemp -d)
  for r in "${RUNS[@]}"; do
    read -r id shape bsz seq targets opt flags <<<"$r"
    [[ $id =~ $ONLY ]] || continue
    local t; t=$(budget)
    if ((t < 20)); then
      error_row bayeslora "$id" "$shape" "$bsz" "$seq" "$targets" "$opt" "not run: script deadline" >>"$OUT/bayeslora.jsonl"
      continue
    fi
    echo "== bayeslora $id (timeout ${t}s)"
    local rc=0
    timeout -k 10 "$t" "$BIN" bench train --shape "$shape" --dtype "$DTYPE" --device "$DEVICE" --batch-size "$bsz" \
      --max-len "$seq" --max-steps "$STEPS" --warmup "$WARMUP" --target-modules "$targets" --optimizer "$opt" \
      ${flags//,/ } --out "$tmp/$id.json" || rc=$?
    if ((rc == 0)) && [[ -s $tmp/$id.json ]]; then
      python3 -c "import json,sys; [print(json.dumps(dict(r, id=sys.argv[2]))) for r in json.load(open(sys.argv[1]))]" \
        "$tmp/$id.json" "$id" >>"$OUT/bayeslora.jsonl"
    else
      local msg="exit $rc"; ((rc == 124 || rc == 137)) && msg="timeout after ${t}s"
      error_row bayeslora "$id" "$shape" "$bsz" "$seq" "$targets" "$opt" "$msg" >>"$OUT/bayeslora.jsonl"
    fi
  done
  rm -rf "$tmp"
}

for s in $STACKS; do
  case $s in
    pytorch) run_pytorch ;;
    bayeslora) run_bayeslora ;;
    *) echo "unknown stack $s" ;;
  esac
done
python3 scripts/bench/table.py "$OUT/bayeslora.jsonl" "$OUT/pytorch.jsonl" >"$OUT/table.md" && cat "$OUT/table.md"
echo "== done in $(($(date +%s) - START)) s"
