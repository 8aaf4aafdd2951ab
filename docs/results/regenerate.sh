#!/usr/bin/env bash
# Regenerates every committed report from its committed inputs (docs/results/README.md). Run from the repository
# root: bash docs/results/regenerate.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
S=docs/results/smollm2-135m/inputs
Q=docs/results/qwen2.5-coder-0.5b/inputs
SMOL=("$S/collection" "$S/sweep/sweep.csv" "$S/tasks/tasks.csv" "$S/analysis" "$S/predictors" "$S/study_manifest.json"
      "$S/study_manifest_analysis.json" "$S/study_manifest_tasks.json")
QWEN=("$Q/collection" "$Q/sweep/sweep.csv" "$Q/tasks/tasks.csv" "$Q/analysis" "$Q/predictors" "$Q/study_manifest.json"
      "$Q/study_manifest_drift.json" "$Q/study_manifest_tasks.json" "$Q/study_manifest_tasks2.json")

report() {  # report FOLDER INPUT... [--note TEXT]...: no file of an earlier layout stays in the folder
  local folder=docs/results/$1
  shift
  rm -rf "$folder/figures" "$folder"/appendix_*.md
  python scripts/report/report.py "$@" --out-dir "$folder"
}

report smollm2-135m "${SMOL[@]}" \
  --note 'SmolLM2-135M-Instruct with its weights dequantized to float32 from a 4/8-bit GGUF file (Q4_1, token embedding Q8_0) of the instruction-tuned model, not the original checkpoint; 100,000 collected C4 tokens, one seed, 20 epochs, D 1000, lookahead inputs, layer 0 dense.' \
  --note 'Two leases of one H100. The first (2026-12-06, commit 75a997e) ran the sweep and the summary; the summary'"'"'s predictors and baselines were trained on layers 1, 15 and 29 only (pooled rows use 15 and 29, the layers every input has). The second (2026-12-07, commit 5f74e5e) re-collected the same 100,000 tokens (its manifest equals the first'"'"'s apart from times and commit), trained the per-budget predictors again, and ran drift (study_manifest_tasks.json has its stage times; drift.py with the study'"'"'s flags) and the task table: every mode at every budget on the full splits, zero-shot, in 4 shards sharing the GPU at batch 64.'
report qwen2.5-coder-0.5b "${QWEN[@]}" \
  --note 'Qwen2.5-Coder-0.5B-Instruct, a code-tuned instruct model, with its weights dequantized to float32 from a 4/5/6/8-bit GGUF file (Q4_K_M; its general.name says it was built from the AWQ checkpoint), not the original checkpoint; 40,000 collected C4 tokens (the device disk held SmolLM2'"'"'s 100,000 beside them, not 100,000 of both), one seed, 20 epochs, D 1000, lookahead inputs, layer 0 dense.' \
  --note 'Four leases of one H100. First (2026-12-06, commit 75a997e): sweep and summary (the summary'"'"'s predictors and baselines trained on layers 1, 12 and 23 only); its task table (batch 8, paired rows only) is kept in inputs/tasks_lease1 and not read here. Second (2026-12-07, commit 5f74e5e): drift, on a collection of the first 20,000 of the same training tokens (inputs/drift_collection). Third (2026-12-07, commit be096f4): the task rows of every mode that reads no predictor file (dense, oracle, random, gate), batch 32, 4 shards sharing the GPU (inputs/study_manifest_tasks.json). Fourth (2026-12-07, commit 4c0f2cf): collection and predictors again (same settings; the converted weights and the committed layer-1 predictor metrics equal the first lease'"'"'s), then the predictor and static task rows and the 3 kv-group pairs the third lease left, same batch and sharding (inputs/study_manifest_tasks2.json). inputs/tasks/tasks.csv holds every (setting, task) pair: 52 settings x 7 tasks.'
report cross_model "${SMOL[@]}" "${QWEN[@]}" docs/results/sparse_decode_h100/bench_sparse_decode.json \
  --note 'Two real Llama-architecture models side by side on identical definitions. SmolLM2-135M-Instruct with its weights dequantized to float32 from a 4/8-bit GGUF file (Q4_1, token embedding Q8_0) of the instruction-tuned model, not the original checkpoint; 100,000 collected C4 tokens, one seed, 20 epochs, D 1000, lookahead inputs, layer 0 dense. Qwen2.5-Coder-0.5B-Instruct, a code-tuned instruct model, with its weights dequantized to float32 from a 4/5/6/8-bit GGUF file (Q4_K_M; its general.name says it was built from the AWQ checkpoint), not the original checkpoint; 40,000 collected C4 tokens (the device disk held SmolLM2'"'"'s 100,000 beside them, not 100,000 of both), one seed, 20 epochs, D 1000, lookahead inputs, layer 0 dense.' \
  --note 'Summaries on three layers each; both task tables complete (every mode, block and budget); drift measured for both (see docs/results/smollm2-135m/README.md and docs/results/qwen2.5-coder-0.5b/README.md). The decode speed section is a separate bench at the real Llama-3.2-3B and OPT-2.7b shapes with random weights, not these models.'
