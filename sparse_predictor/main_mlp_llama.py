"""Train DejaVu's MLP sparse predictor for one layer of Llama (SPEC §7), the twin of main_mlp.py.

Label (default topk): a SwiGLU MLP has no exact zeros, so neuron i is active for a token when |SiLU(g)*u|_i
(mlp_label_{l}) is among the top fraction --k of that token; k = 0.5 is the magnitude sparsity that SwiGLU
MLPs tolerate with little loss (CATS, TEAL). threshold: |SiLU(g)*u| > t; gate: g > 0 (needs mlp_gate_{l});
relu: SiLU(g)*u > 0.

Example: python sparse_predictor/main_mlp_llama.py --model llama-3.2-3b --L 3 --lr 0.001
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # lets `python sparse_predictor/<this file>` run

from sparse_predictor.trainer.cli import run_cli  # noqa: E402

DEFAULTS = {
    "model": "llama-3.2-3b",
    "label": "topk",
    "k": 0.5,  # fraction of the ffn neurons kept per token
    "lr": 1e-3,  # what the original run_c4_mlp.sh trained with (its main_mlp.py default: 1e-4)
}


def main(argv: list[str] | None = None) -> list[Path]:
    return run_cli("mlp", __doc__, DEFAULTS, argv)


if __name__ == "__main__":
    main()
