#!/usr/bin/env bash
# The study command (scripts/run_study.py) on the bundled tiny OPT / Llama / Llama-ReLU trio, offline, on the CPU:
#   convert -> requests (C4 train sample, C4 validation, WikiText-2) -> collect -> MLP and attention predictors
#   for every layer and budget (lookahead inputs) and static rankings -> sparse sweep (dense, then oracle / predictor /
#   random / static / gate with MLP-only, attention-only and paired budgets; layer 0 dense) -> settings on DejaVu's seven
#   lm-evaluation-harness tasks (offline, the bundled splits' first TASK_LIMIT documents) -> drift, sparsity, the
#   summary's predictors on identical definitions -> one markdown report that opens with the summary table and figure.
# These are small models trained for minutes: the report is evidence about mechanisms, not a claim about
# Llama 3.2 3B.
#
# Environment (defaults): OUT (out/demo), MODEL_ROOT (pretrained_models), MODELS ("tiny-opt tiny-llama tiny-llama-relu"),
#   TRAIN_DOCS (120), COLLECT_ROWS (12000), EPOCHS (4), RANK (128: predictor width D), SEEDS (1),
#   VAL_DOCS (16), WIKI_WINDOWS (12), MAX_SEQ_LEN (256), MLP_BUDGETS ("0.25 0.5": fractions; predictors are
#   trained at each; the GPU study uses 0.1 0.25 0.5 0.75 0.9), ATT_BUDGETS (empty: the MLP fractions of each model's heads), TASK_MODES ("oracle predictor
#   random static") and TASK_BLOCKS ("both": the paired rows; the sweep runs every mode and block),
#   FRACTIONS ("0.25 0.5": K of the summary), LOOKAHEAD_DISTANCE (0: the summary covers distances 0-2),
#   SWEEP_LABELS (labels compared on the middle layer: "relu,topk:0.25,threshold:0.01,gate"), DEVICE (cpu),
#   TASKS (lm-evaluation-harness tasks: "dejavu_cb,dejavu_copa,dejavu_rte,dejavu_winogrande,dejavu_piqa,
#   dejavu_openbookqa,dejavu_lambada_openai", DejaVu's seven over data/tasks/), TASK_LIMIT (8 documents per task: the
#   seven cost about what the earlier WikiText-2 test task did at 50), BOOTSTRAP_ITERS (1000: perplexity's standard
#   error only), FOLDS (2: training-document folds of the summary), CAPACITY_LAYERS ("last": the layers of the capacity
#   and data curves and of the folds; the GPU study's default is "ends": layer 1, middle, last),
#   CAPACITY_WIDTHS ("32,full": the capacity curve's D; the GPU study's default goes to 1000),
#   CAPACITY_ROWS ("0.5,1": shares of the training rows).
# Rerunning resumes: finished stages are kept.
[[ "${1:-}" =~ ^(-h|--help)$ ]] && { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0; }  # usage: the header above
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
# One thread per process: on 2 cores, OpenMP with 2 threads per process ran small CPU ops up to 30x slower when
# the other core was busy (measured here); two jobs run side by side instead.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
OUT="${OUT:-$REPO/out/demo}"
MODELS="${MODELS:-tiny-opt tiny-llama tiny-llama-relu}"; MODEL_ROOT="${MODEL_ROOT:-$REPO/pretrained_models}"

MODELS_FACTS=$(python - "$MODEL_ROOT" $MODELS <<'PY'
import json, math, sys
from pathlib import Path
root, models = Path(sys.argv[1]), sys.argv[2:]
configs = [json.loads((root / m / "config.json").read_text()) for m in models]
summary = root / "tiny-training" / "training_summary.json"
facts = f"{len(models)} models of {sorted({c['num_hidden_layers'] for c in configs})} layers and hidden size {sorted({c['hidden_size'] for c in configs})}"
s = json.loads(summary.read_text()) if summary.is_file() else {"models": {}}
params = [s["models"][m]["parameters"] for m in models if m in s["models"]]
if len(params) == len(models):  # the bundled trio, described by its training summary
    facts += (f", {min(params):,}-{max(params):,} parameters, trained by scripts/assets/train_tiny_models.py for {s['training']['steps']} "
              f"steps on {s['data']['train_tokens']:,} tokens of C4, at most "
              f"{math.ceil(max(s['models'][m]['wall_time_s'] for m in models) / 60)} minute(s) each")
print(facts)
PY
)
MODEL_PATHS=()
for model in $MODELS; do MODEL_PATHS+=("$MODEL_ROOT/$model"); done

python scripts/run_study.py "${MODEL_PATHS[@]}" --out-dir "$OUT" --device "${DEVICE:-cpu}" \
  --train-docs "${TRAIN_DOCS:-120}" --collect-tokens "${COLLECT_ROWS:-12000}" --epochs "${EPOCHS:-4}" \
  --D "${RANK:-128}" --seeds "${SEEDS:-1}" --val-docs "${VAL_DOCS:-16}" --wiki-windows "${WIKI_WINDOWS:-12}" \
  --max-seq-len "${MAX_SEQ_LEN:-256}" --mlp-budgets ${MLP_BUDGETS:-0.25 0.5} \
  ${ATT_BUDGETS:+--att-budgets $ATT_BUDGETS} --fractions ${FRACTIONS:-0.25 0.5} \
  --task-modes ${TASK_MODES:-oracle predictor random static} --task-blocks ${TASK_BLOCKS:-both} \
  --lookahead-distance "${LOOKAHEAD_DISTANCE:-0}" --drift-distance 2 \
  --sweep-labels "${SWEEP_LABELS:-relu,topk:0.25,threshold:0.01,gate}" --batch 8 --jobs 2 \
  --tasks "${TASKS:-dejavu_cb,dejavu_copa,dejavu_rte,dejavu_winogrande,dejavu_piqa,dejavu_openbookqa,\
dejavu_lambada_openai}" --task-limit "${TASK_LIMIT:-8}" --task-jobs "${TASK_JOBS:-1}" \
  --bootstrap-iters "${BOOTSTRAP_ITERS:-1000}" --folds "${FOLDS:-2}" --fold-layers "${CAPACITY_LAYERS:-last}" \
  --capacity-layers "${CAPACITY_LAYERS:-last}" --capacity-widths "${CAPACITY_WIDTHS:-32,full}" \
  --capacity-rows "${CAPACITY_ROWS:-0.5,1}" \
  --note "Small models: $MODELS_FACTS, run on ${COLLECT_ROWS:-12000} collected tokens with ${EPOCHS:-4}-epoch \
predictors. This is evidence about mechanisms (OPT vs Llama architecture at equal size, data and steps), not a claim \
about Llama 3.2 3B or any released model."
