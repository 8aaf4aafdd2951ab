#!/usr/bin/env bash
# Collect DejaVu's predictor training data from a converted OPT (default opt-125m) on C4 train requests.
[[ "${1:-}" =~ ^(-h|--help)$ ]] && { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0; }  # usage: the header above
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"; REPO="$(dirname "$HERE")"
source "$HERE/launch_ranks.sh"
MODEL_PATH="${MODEL_PATH:-$REPO/pretrained_models/opt-125m}"
INFER_DATA="${INFER_DATA:-$HERE/c4_train/c4_train.jsonl}"
DATA_PATH="${DATA_PATH:-$REPO/data/$(basename "$MODEL_PATH")_c4}"
OUTPUT_PATH="${OUTPUT_PATH:-$DATA_PATH/collect_output.jsonl}"
COLLECT_TOKENS="${COLLECT_TOKENS:-400000}"
DTYPE="${DTYPE:-fp16}"
mkdir -p "$DATA_PATH"
launch_ranks --model-name "$MODEL_PATH" --model-type opt-save --dtype "$DTYPE" --infer-data "$INFER_DATA" \
  --output-path "$OUTPUT_PATH" --data-path "$DATA_PATH" --collect-tokens "$COLLECT_TOKENS" \
  --max-seq-len "${MAX_SEQ_LEN:-2048}" ${EXTRA_ARGS:-}
python "$REPO/scripts/analysis/perplexity.py" "$OUTPUT_PATH"
