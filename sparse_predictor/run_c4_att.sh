#!/usr/bin/env bash
# Train the attention sparse predictor of every layer in an OPT collection (SPEC §7), one process and
# one log per layer, spread over all visible GPUs (CUDA_VISIBLE_DEVICES, else nvidia-smi; the CPU if none);
# then write $OUT_DIR/att_summary.csv and .md. The layers come from the collection's manifest.
# Settings as the original run_c4_att.sh.
# Environment (defaults): MODEL (opt-125m), DATASET (c4), DATA_DIR (<repo>/data/$MODEL_$DATASET),
#   OUT_DIR (<repo>/data/$MODEL_$DATASET_sparse_predictor), LOG_DIR ($OUT_DIR/logs), LR (0.0001), K (0.3),
#   JOBS_PER_GPU (1), LAYERS_PER_JOB (1: a process per layer), LAYERS (all: every layer of the manifest, or a
#   list such as 0-13 or 0,4,8),
#   SEEDS (1: predictors per layer, trained together),
#   EXTRA_ARGS (more flags for main_att.py, e.g. "--input from:0 --epochs 10").
[[ "${1:-}" =~ ^(-h|--help)$ ]] && { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0; }  # usage: the header above
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODEL=${MODEL:-opt-125m}
DATASET=${DATASET:-c4}
DATA_DIR=${DATA_DIR:-$REPO/data/${MODEL}_${DATASET}}
OUT_DIR=${OUT_DIR:-$REPO/data/${MODEL}_${DATASET}_sparse_predictor}
LOG_DIR=${LOG_DIR:-$OUT_DIR/logs}
LR=${LR:-0.0001}
K=${K:-0.3}

python "$REPO"/sparse_predictor/trainer/launch.py launch \
    "$REPO"/sparse_predictor/main_att.py --block att --data-dir "$DATA_DIR" \
    --out-dir "$OUT_DIR" --log-dir "$LOG_DIR" --jobs-per-gpu "${JOBS_PER_GPU:-1}" \
    --layers-per-job "${LAYERS_PER_JOB:-1}" --layers "${LAYERS:-all}" \
    -- --model "$MODEL" --dataset "$DATASET" --lr "$LR" --seeds "${SEEDS:-1}" --k "$K" ${EXTRA_ARGS:-}
