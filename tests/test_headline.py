"""The report's first screen (scripts/report/headline.py): the smallest kept fraction read off the measured budgets,
each model's own counts, chance-level tasks left out of the headline mean, the paired standard error, and collapsed
runs printed as collapsed."""
from __future__ import annotations

import math

import pytest

from Decentralized_FM_alpha.utils.intervals import Interval
from scripts.report.answer import collapsed_text, level_label
from scripts.report.headline import (Reading, TaskResult, headline_tasks, kept_units, paired_standard_error,
                                     smallest_meeting)
from scripts.report.inputs import Budget
from scripts.report.summary import Cell, ModelSummary

SMOL = {"ffn_dim": 1536, "num_heads": 9, "num_kv_heads": 3, "num_layers": 30, "hidden_size": 576}
QWEN = {"ffn_dim": 4864, "num_heads": 14, "num_kv_heads": 2, "num_layers": 24, "hidden_size": 896}


def test_the_smallest_fraction_is_interpolated_in_log_perplexity_and_marked_outside_the_range():
    points = [(0.1, math.log(3.0)), (0.25, math.log(1.2)), (0.5, math.log(1.02))]
    reading = smallest_meeting(points, math.log(1.05), higher_is_better=False)
    expected = 0.25 + (math.log(1.05) - math.log(1.2)) * 0.25 / (math.log(1.02) - math.log(1.2))
    assert reading.side == "in" and reading.value == pytest.approx(expected) and reading.text() == f"{expected:.2f}"
    assert smallest_meeting(points, math.log(1.01), False) == Reading(0.5, "above")
    assert smallest_meeting(points, math.log(5.0), False) == Reading(0.1, "below")
    assert smallest_meeting(points, math.log(1.01), False).text() == "> 0.50"
    assert smallest_meeting(points, math.log(5.0), False).text() == "<= 0.10"
    tasks = [(0.25, 0.40), (0.5, 0.46)]  # accuracy: higher is better, linear
    assert smallest_meeting(tasks, 0.44, higher_is_better=True).value == pytest.approx(0.25 + 0.04 / 0.06 * 0.25)


def test_each_model_keeps_its_own_counts_of_heads_and_groups():
    heads, groups = Budget("att", None, "0.5"), Budget("att", None, "0.5", att_unit="groups")
    assert kept_units(heads, "att", SMOL) == (5, 9) and kept_units(heads, "att", QWEN) == (7, 14)
    assert kept_units(groups, "att groups", SMOL) == (2, 3) and kept_units(groups, "att groups", QWEN) == (1, 2)
    both = Budget("both", "0.5", "0.5")
    label = level_label(0.5, [both], [ModelSummary("smol", dims=SMOL), ModelSummary("qwen", dims=QWEN)])
    assert label == "smol: 0.5 of neurons, 5 of 9 heads; qwen: 0.5 of neurons, 7 of 14 heads"


def test_tasks_at_chance_for_the_dense_model_leave_the_headline_mean():
    dense = {"dejavu_cb": TaskResult(0.268, 0.06), "dejavu_openbookqa": TaskResult(0.202, 0.018),
             "dejavu_winogrande": TaskResult(0.504, 0.014), "dejavu_piqa": TaskResult(0.643, 0.011),
             "dejavu_lambada_openai": TaskResult(0.294, 0.006)}
    kept, left = headline_tasks(dense)
    assert kept == ["dejavu_piqa", "dejavu_lambada_openai"]
    assert left == ["dejavu_cb", "dejavu_openbookqa", "dejavu_winogrande"]


def test_the_paired_standard_error_equals_the_hand_computation():
    a, b = [1, 1, 0, 1, 0, 1], [1, 0, 0, 1, 1, 1]  # differences 0, 1, 0, 0, -1, 0: mean 0, sample variance 2 / 5
    assert paired_standard_error(a, b) == pytest.approx(math.sqrt(2 / 5 / 6))
    with pytest.raises(ValueError, match="one length"):
        paired_standard_error([1, 0], [1])


def test_a_ratio_between_two_collapsed_runs_prints_as_collapsed():
    budget = Budget("both", "0.1", "0.1")
    s = ModelSummary("smol", dims=SMOL)
    s.ppl[("c4", "predictor", budget)] = Cell(Interval(274149.1, 246095.7, 306170.2, 200))
    s.ppl[("c4", "oracle", budget)] = Cell(Interval(28612.2, 26121.9, 31365.9, 200))
    text = collapsed_text(s, "c4", "predictor", budget)
    assert text.startswith("collapsed, both above 10x dense") and "%" not in text
    s.ppl[("c4", "oracle", budget)] = Cell(Interval(1.2, 1.1, 1.3, 200))
    assert collapsed_text(s, "c4", "predictor", budget) is None  # one run alive: the ratio reads


def test_on_policy_recall_is_set_beside_the_same_predictors_recall_on_the_dense_states():
    from scripts.report.why import on_policy_lines
    row = {"model": "m", "mode": "predictor", "dataset": "c4", "block": "mlp", "mlp_topk": "0.5",
           "mlp_on_policy_recall_layers": "1:0.8000 2:0.6000 3:0.5000 4:0.4000"}
    held_out = {("m", "mlp", 0.5): [(1, 0.9), (2, 0.8), (3, 0.7), (4, 0.6), (5, 0.1)]}
    [line] = on_policy_lines([(None, [row, {**row, "mode": "oracle"}, {**row, "att_unit": "groups"}])], held_out)
    assert line == ("m, predictor's Recall@K on the sparse model's own states (on-policy, mean over the sparse "
                    "layers) vs held out on the dense model's states, same layers: MLP 0.5: 0.575 vs 0.750 (halves "
                    "0.700, 0.450).")


def test_the_structured_predictor_and_the_two_by_two_are_read_into_why_lines():
    from scripts.report.why import decomposition_lines, structured_lines
    records = [{"block": "mlp", "layer": layer, "k": 0.25, "input": "lookahead", "label": "topk", "Recall@K": value}
               for layer, value in ((1, 0.5), (2, 0.7))]
    records += [{**r, "ranking": "structured svd rank 8 (k 0.25)", "Recall@K": r["Recall@K"] + 0.1} for r in records]
    records += [{**records[0], "ranking": "structured svd rank 8 (k 0.25)", "input": "same", "Recall@K": 0.99}]
    cells = lambda a, b, c, d: {"lookahead": {"linear": a, "exact": b}, "same": {"linear": c, "exact": d}}  # noqa: E731
    payload = {"source": {"model": "m"}, "records": records,
               "structured_decomposition": [{"layer": 1, "k": 0.25, "cells": cells(0.5, 0.6, 0.7, 1.0)},
                                            {"layer": 2, "k": 0.25, "cells": cells(0.7, 0.8, 0.9, 1.0)}]}
    assert structured_lines([payload]) == ["m, MLP at K = 0.25, Recall@K from the lookahead input (mean over 2 "
                                           "layers): DejaVu's predictor 0.600; structured svd rank 8 0.700."]
    [line] = decomposition_lines([payload])
    assert ("lookahead input with DejaVu's linear predictor 0.600, with the exact MLP form 0.700; same-layer input "
            "with the linear predictor 0.800, with the exact form 1.000 (the oracle)") in line
