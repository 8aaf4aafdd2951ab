#!/usr/bin/env bash
# run_infer_opt_125m_c4_1gpu.sh with opt-175b as the default model, over all visible GPUs
# (layers split evenly across ranks; NUM_GPUS overrides the count).
[[ "${1:-}" =~ ^(-h|--help)$ ]] && { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0; }  # usage: the header above
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODEL_PATH="${MODEL_PATH:-$(dirname "$HERE")/pretrained_models/opt-175b}" exec bash "$HERE/run_infer_opt_125m_c4_1gpu.sh" "$@"
