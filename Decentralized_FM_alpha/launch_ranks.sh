#!/usr/bin/env bash
# Shared launcher for the run_infer_*.sh scripts: one dist_inference_runner.py process per GPU.
#   launch_ranks ARGS...   (uses $NUM_GPUS, default: all visible GPUs, CPU with gloo if none)
# Layers are split --num-layers per rank (ceil(layers / ranks)); rank r uses GPU r.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"

visible_gpus() {
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c GPU || true
  else
    echo 0
  fi
}

launch_ranks() {
  local gpus="${NUM_GPUS:-$(visible_gpus)}"
  local port="${DIST_PORT:-$((20000 + RANDOM % 20000))}"
  if [[ "$gpus" -le 1 ]]; then
    local cuda=$([[ "$gpus" -eq 1 ]] && echo true || echo false)
    python "$HERE/dist_inference_runner.py" "$@" --use-cuda "$cuda" --world-size 1 --rank 0
    return
  fi
  local pids=()
  for ((rank = 0; rank < gpus; rank++)); do
    python "$HERE/dist_inference_runner.py" "$@" --use-cuda true --cuda-id "$rank" --world-size "$gpus" \
      --rank "$rank" --dist-url "tcp://127.0.0.1:$port" &
    pids+=($!)
  done
  local status=0
  for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
  return "$status"
}
