#!/usr/bin/env bash
# C4 validation perplexity of a converted OPT (default opt-125m) on the visible GPU(s).
[[ "${1:-}" =~ ^(-h|--help)$ ]] && { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0; }  # usage: the header above
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"; REPO="$(dirname "$HERE")"
source "$HERE/launch_ranks.sh"
MODEL_PATH="${MODEL_PATH:-$REPO/pretrained_models/opt-125m}"
INFER_DATA="${INFER_DATA:-$HERE/c4_val/c4_valid.jsonl}"
OUTPUT_PATH="${OUTPUT_PATH:-$REPO/out/c4_val_$(basename "$MODEL_PATH").jsonl}"
DTYPE="${DTYPE:-fp16}"
mkdir -p "$(dirname "$OUTPUT_PATH")"
launch_ranks --model-name "$MODEL_PATH" --model-type opt --dtype "$DTYPE" --infer-data "$INFER_DATA" \
  --output-path "$OUTPUT_PATH" --max-seq-len "${MAX_SEQ_LEN:-2048}" ${EXTRA_ARGS:-}
python "$REPO/scripts/analysis/perplexity.py" "$OUTPUT_PATH"
