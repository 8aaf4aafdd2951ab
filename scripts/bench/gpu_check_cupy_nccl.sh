#!/usr/bin/env bash
# GPU check (2 GPUs): the bundled tiny-opt as 2 pipeline ranks over torch NCCL and over CuPy NCCL
# (--dist-backend cupy_nccl) gives the same log-probs as 1 GPU. Logs under $OUT (default out/cupy_check).
[[ "${1:-}" =~ ^(-h|--help)$ ]] && { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0; }  # usage: the header above
set -euo pipefail
OUT="${OUT:-out/cupy_check}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python Decentralized_FM_alpha/convert_opt_checkpoint.py --model-name pretrained_models/tiny-opt --save-path /tmp/topt > /dev/null 2>&1
python Decentralized_FM_alpha/c4_val/getdata.py --from-file data/samples/c4_validation_200.jsonl --num-docs 32 --output /tmp/req.jsonl > /dev/null
port=29571
for be in nccl cupy_nccl; do
  port=$((port + 1))
  for r in 0 1; do python Decentralized_FM_alpha/dist_inference_runner.py --model-name /tmp/topt --model-type opt --infer-data /tmp/req.jsonl --output-path /tmp/out_$be.jsonl --use-cuda true --cuda-id $r --world-size 2 --rank $r --dist-url tcp://127.0.0.1:$port --dist-backend $be --max-seq-len 256 > $OUT/${be}_$r.log 2>&1 & done; wait
  tail -1 $OUT/${be}_1.log
done
python Decentralized_FM_alpha/dist_inference_runner.py --model-name /tmp/topt --model-type opt --infer-data /tmp/req.jsonl --output-path /tmp/out_1.jsonl --use-cuda true --max-seq-len 256 > $OUT/one.log 2>&1; tail -1 $OUT/one.log
python - <<'PY'
import json
def lp(p): return [x for l in open(p) for x in json.loads(l)["result"]["choices"][0]["logprobs"]["token_logprobs"][1:]]
a, b, c = lp("/tmp/out_1.jsonl"), lp("/tmp/out_nccl.jsonl"), lp("/tmp/out_cupy_nccl.jsonl")
print("tokens", len(a), "max|1gpu-nccl|", max(abs(x-y) for x,y in zip(a,b)), "max|1gpu-cupy_nccl|", max(abs(x-y) for x,y in zip(a,c)))
PY
