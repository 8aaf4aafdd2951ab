#!/usr/bin/env bash
# The whole DejaVu workflow, offline on the CPU, on the bundled tiny OPT / Llama / Llama-ReLU trio:
#   convert -> collect (C4 train sample) -> train MLP and attention predictors for every layer
#   -> sparse-inference sweep (dense / oracle / predictor / random; C4 validation and WikiText-2)
#   -> drift, lookahead and sparsity analysis -> one markdown report.
# These are small models trained for minutes: the report is evidence about mechanisms, not a claim
# about Llama 3.2 3B.
#
# Environment (defaults): OUT (out/demo), MODEL_ROOT (pretrained_models), MODELS ("tiny-opt tiny-llama tiny-llama-relu"), TRAIN_DOCS (120),
#   COLLECT_ROWS (20000), EPOCHS (4), RANK (128: predictor width D), VAL_DOCS (16), WIKI_WINDOWS (12),
#   MAX_SEQ_LEN (256), MLP_BUDGETS ("0.1 0.25 0.5"), ATT_BUDGETS ("2 4 6"), LOOKAHEAD_DISTANCE (2),
#   LOOKAHEAD_LAYERS ("2,5": predicted layers of the lookahead matrix), SWEEP_LABELS (labels compared on layer 0:
#   "relu,topk:0.25,threshold:0.01,gate"), DEVICE (cpu).
# Rerunning resumes: finished steps (conversions, collections, predictors, sweep settings) are kept.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
# One thread per process: on 2 cores, OpenMP with 2 threads per process ran small CPU ops up to 30x slower when
# the other core was busy (measured here); two predictor jobs run side by side instead.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" JOBS_PER_GPU="${JOBS_PER_GPU:-2}"
OUT="${OUT:-$REPO/out/demo}"
MODELS="${MODELS:-tiny-opt tiny-llama tiny-llama-relu}"; MODEL_ROOT="${MODEL_ROOT:-$REPO/pretrained_models}"
TRAIN_DOCS="${TRAIN_DOCS:-120}"; COLLECT_ROWS="${COLLECT_ROWS:-20000}"; EPOCHS="${EPOCHS:-4}"; RANK="${RANK:-128}"
VAL_DOCS="${VAL_DOCS:-16}"; WIKI_WINDOWS="${WIKI_WINDOWS:-12}"; MAX_SEQ_LEN="${MAX_SEQ_LEN:-256}"
MLP_BUDGETS="${MLP_BUDGETS:-0.1 0.25 0.5}"; ATT_BUDGETS="${ATT_BUDGETS:-2 4 6}"
LOOKAHEAD_DISTANCE="${LOOKAHEAD_DISTANCE:-2}"; LOOKAHEAD_LAYERS="${LOOKAHEAD_LAYERS:-2,5}"
SWEEP_LABELS="${SWEEP_LABELS:-relu,topk:0.25,threshold:0.01,gate}"; DEVICE="${DEVICE:-cpu}"
USE_CUDA=$([[ "$DEVICE" == cuda* ]] && echo true || echo false)
START=$(date +%s)
mkdir -p "$OUT/requests"

step() { printf '\n== [%4ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }
in_parallel() {  # run the given commands at once (one per core here); fail if any fails
  local pids=() status=0
  for cmd in "$@"; do bash -c "$cmd" & pids+=($!); done
  for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
  return "$status"
}
family_of() { python -c "import json,sys; print(json.load(open(sys.argv[1]))['model_type'])" "$1/config.json"; }

step "requests: C4 train ($TRAIN_DOCS docs), C4 validation ($VAL_DOCS docs), WikiText-2 windows"
python Decentralized_FM_alpha/c4_train/getdata.py --from-file data/samples/c4_train_1k.jsonl --num-docs "$TRAIN_DOCS" \
  --output "$OUT/requests/c4_train.jsonl"
python Decentralized_FM_alpha/c4_val/getdata.py --from-file data/samples/c4_validation_2k.parquet --num-docs "$VAL_DOCS" \
  --output "$OUT/requests/c4_val.jsonl"
first_model="${MODELS%% *}"
python Decentralized_FM_alpha/wikitext2/getdata.py --input-file data/samples/wikitext2_test_joined.txt \
  --tokenizer "$MODEL_ROOT/$first_model" --max-seq-len "$MAX_SEQ_LEN" --output "$OUT/requests/wikitext2_all.jsonl"
head -n "$WIKI_WINDOWS" "$OUT/requests/wikitext2_all.jsonl" > "$OUT/requests/wikitext2.jsonl"  # the first windows only

REPORT_INPUTS=()
for model in $MODELS; do
  family=$(family_of "$MODEL_ROOT/$model")
  converted="$OUT/converted/$model"; data="$OUT/data/${model}_c4"; predictors="$OUT/predictors/$model"
  suffix=$([[ "$family" == llama ]] && echo _llama || true)
  gate=$([[ "$family" == llama ]] && echo --collect-mlp-gate || true)

  step "$model: convert"
  [[ -f "$converted/pytorch_lm_head.pt" ]] || python "Decentralized_FM_alpha/convert_${family}_checkpoint.py" \
    --model-name "$MODEL_ROOT/$model" --save-path "$converted"

  step "$model: collect $COLLECT_ROWS rows of activations"
  python Decentralized_FM_alpha/dist_inference_runner.py --model-name "$converted" --model-type "${family}-save" \
    --infer-data "$OUT/requests/c4_train.jsonl" --output-path "$data/collect_output.jsonl" --data-path "$data" \
    --collect-tokens "$COLLECT_ROWS" --max-seq-len "$MAX_SEQ_LEN" --use-cuda "$USE_CUDA" $gate

  step "$model: train MLP and attention predictors for every layer"
  for block in mlp att; do
    if [[ ! -f "$predictors/${block}_summary.csv" ]]; then
      DATA_DIR="$data" OUT_DIR="$predictors" MODEL="$model" EXTRA_ARGS="--epochs $EPOCHS --D $RANK --device $DEVICE" \
        bash "sparse_predictor/run_c4_${block}${suffix}.sh"
    fi
  done

  step "$model: sparse-inference sweep (dense / oracle / predictor / random)"
  python scripts/sparse_sweep.py --model-name "$converted" --family "$family" --predictor-dir "$predictors" \
    --data "c4=$OUT/requests/c4_val.jsonl" --data "wikitext2=$OUT/requests/wikitext2.jsonl" \
    --mlp-topk $MLP_BUDGETS --att-topk $ATT_BUDGETS --max-seq-len "$MAX_SEQ_LEN" \
    --use-cuda "$USE_CUDA" --out-dir "$OUT/sweep/$model"

  step "$model: drift, lookahead, sparsity statistics (two at a time)"
  analysis="$OUT/analysis/$model"
  in_parallel \
    "python scripts/lookahead.py --data-dir '$data' --out-dir '$analysis' --block mlp --max-distance $LOOKAHEAD_DISTANCE --layers $LOOKAHEAD_LAYERS --epochs $EPOCHS --D $RANK --device $DEVICE" \
    "python scripts/lookahead.py --data-dir '$data' --out-dir '$analysis' --block att --max-distance $LOOKAHEAD_DISTANCE --layers $LOOKAHEAD_LAYERS --epochs $EPOCHS --D $RANK --device $DEVICE"
  in_parallel \
    "python scripts/drift.py --data-dir '$data' --out-dir '$analysis' --model-dir '$converted' --max-distance $LOOKAHEAD_DISTANCE --exclude-first-token" \
    "python scripts/sparsity_stats.py --data-dir '$data' --out-dir '$analysis' --epochs $EPOCHS --D $RANK --device $DEVICE --sweep-layers 0 --labels $SWEEP_LABELS"
  REPORT_INPUTS+=("$data" "$predictors" "$OUT/sweep/$model/sweep.csv" "$OUT/analysis/$model")
done

step "report"
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
    facts += (f", {min(params):,}-{max(params):,} parameters, trained by scripts/train_tiny_models.py for {s['training']['steps']} "
              f"steps on {s['data']['train_tokens']:,} tokens of C4, at most "
              f"{math.ceil(max(s['models'][m]['wall_time_s'] for m in models) / 60)} minute(s) each")
print(facts)
PY
)
python scripts/report.py "${REPORT_INPUTS[@]}" --out-dir "$OUT/report" --note "Small models: $MODELS_FACTS, run on \
$COLLECT_ROWS collected tokens with $EPOCHS-epoch predictors. This is evidence about mechanisms (OPT vs Llama \
architecture at equal size, data and steps), not a claim about Llama 3.2 3B or any released model."
step "done in $(( $(date +%s) - START )) s: report at $OUT/report/report.md"
