"""Train DejaVu's MLP sparse predictor for one layer of OPT (SPEC §7), as the original main_mlp.py.

Label (default relu): neuron i is active for a token when ReLU(fc1(LN(x)))_i > 0, read from mlp_label_{l}. For a
ReLU MLP this set is exact: an inactive neuron adds nothing to fc2's output. topk / threshold / gate are the
Llama labels, kept here so that both models can be trained under one definition.

Example: python sparse_predictor/main_mlp.py --model opt-125m --L 3 --lr 0.001
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # lets `python sparse_predictor/<this file>` run

from sparse_predictor.trainer.cli import run_cli  # noqa: E402

DEFAULTS = {
    "model": "opt-125m",
    "label": "relu",
    "k": None,  # topk on OPT needs an explicit --k
    "lr": 1e-3,  # what the original run_c4_mlp.sh trained with (its main_mlp.py default: 1e-4)
}


def main(argv: list[str] | None = None) -> list[Path]:
    return run_cli("mlp", __doc__, DEFAULTS, argv)


if __name__ == "__main__":
    main()
