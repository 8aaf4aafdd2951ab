"""The lm-evaluation-harness command line (`lm_eval`) with this tool's model registered as `--model dejavu`.

The harness registers models on import and its `--include_path` adds tasks, not models, so this script imports
Decentralized_FM_alpha/lm_eval_model.py (which registers `dejavu`) and then runs the harness's own CLI main on the
same arguments: every flag is the harness's (`python scripts/study/lm_eval_dejavu.py run --help` lists them), and the
model's arguments are the runner's sparse-inference flags (SPEC sections 8 and 11):

    python scripts/study/lm_eval_dejavu.py --model dejavu --tasks piqa,copa,winogrande --batch_size 16 --device cuda \\
        --model_args pretrained=pretrained_models/llama-3.2-3b,dtype=bf16,sparse_mode=oracle,mlp_topk=0.5,att_topk=12
    python scripts/study/lm_eval_dejavu.py --model dejavu --include_path out/lm_eval_tasks \\
        --tasks dejavu_wikitext2_lastword_mc --device cpu \\
        --model_args '{"pretrained": "out/converted/tiny-llama", "sparse_mode": "random", "mlp_topk": 0.25,
                       "sparse_layers": "0,2-4"}'
Model arguments: pretrained, sparse_mode (dense|oracle|predictor|random; absent = the dense model type),
predictor_dir, mlp_topk, att_topk, sparse_layers, gqa_groups, dtype, max_seq_len, seed, budget.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import Decentralized_FM_alpha.lm_eval_model  # noqa: E402,F401  (registers --model dejavu)
from lm_eval.__main__ import cli_evaluate  # noqa: E402

if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
    cli_evaluate()
