#!/usr/bin/env bash
# C4 validation perplexity of a converted Llama (default Llama 3.2 3B, bf16) with DejaVu's simulated sparsity (SPEC section 8).
# Environment (defaults): MODEL_PATH (pretrained_models/llama-3.2-3b), PREDICTOR_DIR ($SPRARSE_PATH, else
#   data/llama-3.2-3b_c4_sparse_predictor), SPARSE_MODE (predictor; or oracle, random, dense), MLP_TOPK ($TOPK, else 0.5),
#   ATT_TOPK (empty = dense attention), SPARSE_LAYERS (all), INFER_DATA, OUTPUT_PATH, DTYPE (bf16), EXTRA_ARGS.
# Runs on one GPU (NUM_GPUS=1): a lookahead predictor reads the previous layer's input, which must be on the same rank.
[[ "${1:-}" =~ ^(-h|--help)$ ]] && { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0; }  # usage: the header above
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"; REPO="$(dirname "$HERE")"
source "$HERE/launch_ranks.sh"
MODEL_PATH="${MODEL_PATH:-$REPO/pretrained_models/llama-3.2-3b}"
# The original's variables (SPRARSE_PATH, TOPK, LAYER, ATTN_TOPK_1/2, SPARSE_ATT) are read by the runner itself
# when the matching flag is not given, so an original setup keeps working unchanged.
if [[ -z "${PREDICTOR_DIR:-}" && -z "${SPRARSE_PATH:-}" ]]; then
  PREDICTOR_DIR="$REPO/data/$(basename "$MODEL_PATH")_c4_sparse_predictor"
fi
if [[ -z "${MLP_TOPK:-}" && -z "${TOPK:-}" ]]; then MLP_TOPK=0.5; fi
SPARSE_MODE="${SPARSE_MODE:-predictor}"
INFER_DATA="${INFER_DATA:-$HERE/c4_val/c4_valid.jsonl}"
OUTPUT_PATH="${OUTPUT_PATH:-$REPO/out/c4_val_$(basename "$MODEL_PATH")_${SPARSE_MODE}_mlp${MLP_TOPK:-${TOPK:-dense}}_att${ATT_TOPK:-dense}.jsonl}"
DTYPE="${DTYPE:-bf16}"
export NUM_GPUS="${NUM_GPUS:-$(( $(visible_gpus) > 0 ? 1 : 0 ))}"
mkdir -p "$(dirname "$OUTPUT_PATH")"
launch_ranks --model-name "$MODEL_PATH" --model-type llama-ml-att-sparse --dtype "$DTYPE" --infer-data "$INFER_DATA" \
  --output-path "$OUTPUT_PATH" --max-seq-len "${MAX_SEQ_LEN:-2048}" --sparse-mode "$SPARSE_MODE" \
  ${PREDICTOR_DIR:+--predictor-dir "$PREDICTOR_DIR"} ${MLP_TOPK:+--mlp-topk "$MLP_TOPK"} ${ATT_TOPK:+--att-topk "$ATT_TOPK"} \
  ${SPARSE_LAYERS:+--sparse-layers "$SPARSE_LAYERS"} ${EXTRA_ARGS:-}
python "$REPO/scripts/analysis/perplexity.py" "$OUTPUT_PATH"
