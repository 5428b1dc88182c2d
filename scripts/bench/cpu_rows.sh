#!/usr/bin/env bash
# Issue 21's CPU rows, both stacks back to back in one run: `bayeslora bench train --model M` and
# scripts/bench/torch_train.py on the same real model and shapes (MiniLM 32 × 64, SmolLM2 8 × 64),
# AdamW, at each thread count, ROUNDS rounds (ours then PyTorch within a round):
#   bash scripts/bench/cpu_rows.sh BIN OUT.jsonl [THREADS...]      (default threads: 1 2 4)
# BIN is our binary (target/release/bayeslora; on the GPU machine .device/bayeslora, whose CPU
# path is the same code). Needs the assets (scripts/fetch-assets.sh, or BAYESLORA_ASSETS) and a
# Python with torch, transformers, peft, ivon-opt and gguf (PYTHON, default python3).
# Settings: ROUNDS=3, STEPS=5, WARMUP=2. Each row gets "round"; our rows get the thread count from
# RAYON_NUM_THREADS (the one pool, crates/cli/src/runtime.rs). Use an otherwise idle machine: on a
# loaded one the rows measure the other job.
set -uo pipefail
bin=$1 out=$2; shift 2
threads=${*:-1 2 4}
py=${PYTHON:-python3}
rounds=${ROUNDS:-3} steps=${STEPS:-5} warmup=${WARMUP:-2}
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
: > "$out"
for r in $(seq 1 "$rounds"); do
  for t in $threads; do
    for shape in "minilm 32" "smollm2 8"; do
      set -- $shape
      if RAYON_NUM_THREADS=$t "$bin" bench train --model "$1" --batch-size "$2" --max-len 64 \
          --max-steps "$steps" --warmup "$warmup" --optimizer adamw --out "$tmp/ours.json" \
          > "$tmp/ours.log" 2>&1; then
        python3 -c 'import json,sys
for d in json.load(open(sys.argv[1])): d["round"]=int(sys.argv[2]); print(json.dumps(d))' \
          "$tmp/ours.json" "$r" >> "$out"
      else
        echo "cpu_rows: bayeslora $1 threads $t failed: $(tail -3 "$tmp/ours.log")" >&2
      fi
      if "$py" "$here/torch_train.py" --model "$1" --batch "$2" --seq 64 --steps "$steps" \
          --warmup "$warmup" --threads "$t" --optimizers adamw > "$tmp/torch.log" 2>&1; then
        grep '^{' "$tmp/torch.log" | grep '"adamw"' | python3 -c 'import json,sys; r=int(sys.argv[1])
for l in sys.stdin:
    d=json.loads(l); d["round"]=r; print(json.dumps(d))' "$r" >> "$out"
      else
        echo "cpu_rows: pytorch $1 threads $t failed: $(tail -3 "$tmp/torch.log")" >&2
      fi
      python3 - "$out" "$1" "$t" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
last = {}
for d in rows:
    if d.get("model") == sys.argv[2] and d.get("threads") == int(sys.argv[3]):
        last[d["stack"]] = d
o, p = last.get("bayeslora"), last.get("pytorch")
if o and p:
    print(f'{sys.argv[2]} threads {sys.argv[3]}: ours {o["tokens_per_second"]:.0f} tok/s '
          f'({o["peak_rss_bytes"]/2**30:.2f} GiB), pytorch {p["tokens_per_second"]:.0f} '
          f'({p["peak_rss_bytes"]/2**30:.2f} GiB): {o["tokens_per_second"]/p["tokens_per_second"]:.2f}x')
EOF
    done
  done
done
rm -rf "$tmp"
