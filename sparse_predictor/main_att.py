"""Train DejaVu's attention-head sparse predictor for one layer of OPT (SPEC §7), as the original main_att.py.

Label: head h is active for a token when the L2 norm of its attention output (att_label_{l}, before out_proj) is
among the top k * heads of that token (rounded to the nearest count: utils/selection.py). Default input:
lookahead, att_x_{l-1} (att_x_0 for layer 0).

Example: python sparse_predictor/main_att.py --model opt-125m --L 3 --lr 0.0001 --k 0.3
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # lets `python sparse_predictor/<this file>` run

from sparse_predictor.trainer.cli import run_cli  # noqa: E402

DEFAULTS = {
    "model": "opt-125m",
    "k": 0.3,  # what the original run_c4_att.sh trained with (its main_att.py default: 0.7)
    "lr": 1e-4,  # what the original run_c4_att.sh trained with (its main_att.py default: 1e-3)
}


def main(argv: list[str] | None = None) -> list[Path]:
    return run_cli("att", __doc__, DEFAULTS, argv)


if __name__ == "__main__":
    main()
