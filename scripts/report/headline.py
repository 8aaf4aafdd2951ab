"""The report's first screen: the sparsity each mode sustains, per model and block, and sentences built from it.

DejaVu's headline is the sparsity a model sustains at a given quality. Per model, sparse block and mode, the table gives
the smallest kept fraction of the block's units at which the C4 perplexity ratio to dense is at most 1.01 and at most
1.05, and at which the task mean (the headline tasks: those the dense model scores above chance) is within one
accuracy point of dense. Between two measured budgets the fraction is read by linear interpolation (in log
perplexity, in accuracy); a value outside the measured range is marked ("<= f": the smallest measured budget already
meets the rule; "> f": even the largest does not). Sentences are built from the table's own cells by the rule printed
beside them; where-the-cost-sits and why rows are printed when their inputs are present, and what was not run is said.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from scripts.report.inputs import Budget, read_json_file, row_budget
from scripts.report.summary import ModelSummary, wiring_text

PERPLEXITY_RULES = (1.01, 1.05)  # perplexity ratio to dense at most this
TASK_POINTS = 0.01  # the task mean within this of dense (one accuracy point)
MODES = ("oracle", "predictor", "structured", "gate", "static", "random")  # table order; absent modes are left out
BLOCKS = ("mlp", "att", "att groups", "both")
BLOCK_NAMES = {"mlp": "MLP", "att": "attention", "att groups": "attention, whole kv groups",
               "both": "MLP + attention"}
UNIT_NAMES = {"mlp": "neurons", "att": "heads", "att groups": "kv groups", "both": "neurons (heads paired)"}
# Uniform chance of each local task's accuracy: choices per example; LAMBADA's exact last word has none to speak of.
TASK_CHANCE = {"cb": 1 / 3, "copa": 1 / 2, "rte": 1 / 2, "winogrande": 1 / 2, "piqa": 1 / 2, "openbookqa": 1 / 4,
               "lambada_openai": 0.0}
CHANCE_SE = 2.0  # a task whose dense accuracy is within this many standard errors of chance cannot show a loss


# ------------------------------------------------------------------------------------- reading a fraction off a curve
@dataclass(frozen=True)
class Reading:
    """The smallest kept fraction meeting a rule: interpolated between measured budgets ("in"), or outside the
    measured range: "below" (the smallest measured budget meets it: at most that) or "above" (none does)."""
    value: float | None
    side: str  # in | below | above | none (no measured point)

    def text(self) -> str:
        if self.value is None:
            return "n/a"
        return {"in": f"{self.value:.2f}", "below": f"<= {self.value:.2f}", "above": f"> {self.value:.2f}"}[self.side]


def smallest_meeting(points: Sequence[tuple[float, float]], target: float, higher_is_better: bool) -> Reading:
    """The smallest x (kept fraction) whose y meets the target (y <= target, or y >= target when higher is better),
    by linear interpolation between the first measured x that meets it and the one before."""
    points = sorted(points)
    if not points:
        return Reading(None, "none")
    meets = (lambda y: y >= target) if higher_is_better else (lambda y: y <= target)
    first = next((i for i, (_, y) in enumerate(points) if meets(y)), None)
    if first is None:
        return Reading(points[-1][0], "above")
    if first == 0:
        return Reading(points[0][0], "below")
    (x0, y0), (x1, y1) = points[first - 1], points[first]
    return Reading(x0 + (target - y0) * (x1 - x0) / (y1 - y0), "in")


# ------------------------------------------------------------------------------------- kept fractions and counts
def kept_units(budget: Budget, block: str, dims: dict) -> tuple[int | None, int | None]:
    """(units kept, units of the block) of a row: neurons for mlp and both, query heads for att, kv groups for att
    groups, each model's own counts."""
    ffn, heads, kv = dims.get("ffn_dim"), dims.get("num_heads"), dims.get("num_kv_heads") or dims.get("num_heads")
    if block in ("mlp", "both"):
        return budget.mlp_count(ffn), ffn
    count = budget.att_count(heads, kv)
    if block == "att groups":
        return (count // (heads // kv) if count is not None and heads and kv else None), kv
    return count, heads


def kept_fraction(budget: Budget, block: str, dims: dict) -> float | None:
    kept, total = kept_units(budget, block, dims)
    return kept / total if kept is not None and total else None


# ------------------------------------------------------------------------------------- tasks
def task_chance(task: str) -> float | None:
    return TASK_CHANCE.get(task.removeprefix("dejavu_"))


@dataclass(frozen=True)
class TaskResult:
    """One task result of one setting: accuracy, the harness's standard error, and (when the run stored them) the
    doc ids and per-document acc of task_sweep.py's per_example."""
    acc: float
    stderr: float | None
    examples: dict | None = None


def per_example(csv_path: Path | None, row: dict) -> dict | None:
    """The row's per-document scores from its result JSON (path relative to the table), when that run stored them."""
    if csv_path is None or not row.get("result_json"):
        return None
    path = Path(csv_path).parent / row["result_json"]
    return read_json_file(path).get("per_example", {}).get(row["task"]) if path.is_file() else None


def task_result(row: dict, csv_path: Path | None = None) -> TaskResult | None:
    """A task-sweep CSV row as a TaskResult (per-document scores read when the table's path is given); None without
    an accuracy."""
    if row.get("acc") in (None, ""):
        return None
    stderr = row.get("acc_stderr")
    return TaskResult(float(row["acc"]), float(stderr) if stderr not in (None, "") else None, per_example(csv_path, row))


def headline_tasks(dense: dict[str, TaskResult]) -> tuple[list[str], list[str]]:
    """(tasks in the headline mean, tasks left out): a task whose dense accuracy is not more than CHANCE_SE standard
    errors above uniform chance (within them, or below chance) cannot show a loss, so it is left out of the headline
    mean (the mean of all is still shown)."""
    kept, left = [], []
    for task, score in dense.items():
        chance = task_chance(task)
        at_chance = (chance is not None and score.stderr is not None
                     and score.acc - chance <= CHANCE_SE * score.stderr)
        (left if at_chance else kept).append(task)
    return kept, left


def task_scores(task_rows: Sequence[dict], model: str) -> dict[tuple[str, Budget | None], dict[str, TaskResult]]:
    """(mode, budget; None for dense) -> task -> accuracy and the harness's standard error, of one model."""
    out: dict[tuple[str, Budget | None], dict[str, TaskResult]] = {}
    for row in task_rows:
        result = task_result(row) if row["model"] == model else None
        if result is not None:
            key = ("dense", None) if row["mode"] == "dense" else (row["mode"], row_budget(row))
            out.setdefault(key, {})[row["task"]] = result
    return out


def mean_over(scores: dict[str, TaskResult], tasks: Sequence[str]) -> float | None:
    return sum(scores[t].acc for t in tasks) / len(tasks) if tasks and all(t in scores for t in tasks) else None


# ------------------------------------------------------------------------------------- the table
@dataclass
class HeadlineRow:
    model: str
    block: str
    measured: list[tuple[float, int, int]]  # (kept fraction, kept units, units) of each measured budget
    readings: dict[str, dict[str, Reading]]  # mode -> rule ("1.01", "1.05", "tasks") -> reading


def block_points(summary: ModelSummary, dataset: str, block: str, mode: str) -> list[tuple[float, float]]:
    """(kept fraction, log perplexity ratio) of the mode's measured budgets of this block."""
    points = []
    for (ds, m, budget), cell in summary.ppl.items():
        if ds == dataset and m == mode and budget.panel == block and cell.interval is not None:
            fraction = kept_fraction(budget, block, summary.dims)
            if fraction is not None:
                points.append((fraction, math.log(cell.interval.value)))
    return points


def task_points(scores: dict, summary: ModelSummary, block: str, mode: str, tasks: Sequence[str]
                ) -> list[tuple[float, float]]:
    points = []
    for (m, budget), by_task in scores.items():
        if m == mode and budget is not None and budget.panel == block:
            fraction, mean = kept_fraction(budget, block, summary.dims), mean_over(by_task, tasks)
            if fraction is not None and mean is not None:
                points.append((fraction, mean))
    return points


def headline_rows(summaries: Sequence[ModelSummary], dataset: str, task_rows: Sequence[dict]) -> list[HeadlineRow]:
    rows = []
    for s in summaries:
        scores = task_scores(task_rows, s.model)
        dense = scores.get(("dense", None), {})
        tasks, _ = headline_tasks(dense)
        dense_mean = mean_over(dense, tasks)
        for block in BLOCKS:
            budgets = sorted({b for ds, _, b in s.ppl if ds == dataset and b.panel == block}, key=Budget.sort_key)
            if not budgets:
                continue
            measured = sorted({(kept_fraction(b, block, s.dims), *kept_units(b, block, s.dims)) for b in budgets
                               if kept_fraction(b, block, s.dims) is not None})
            readings = {}
            for mode in MODES:
                points = block_points(s, dataset, block, mode)
                if not points:
                    continue
                readings[mode] = {f"{t:g}": smallest_meeting(points, math.log(t), higher_is_better=False)
                                  for t in PERPLEXITY_RULES}
                tp = task_points(scores, s, block, mode, tasks) if dense_mean is not None else []
                readings[mode]["tasks"] = (smallest_meeting(tp, dense_mean - TASK_POINTS, higher_is_better=True)
                                           if tp else Reading(None, "none"))
            rows.append(HeadlineRow(s.model, block, measured, readings))
    return rows


def measured_text(row: HeadlineRow) -> str:
    """'154, 384, 768 of 1536 neurons': the kept counts of the row's measured budgets, in the model's own units."""
    counts = ", ".join(str(kept) for _, kept, _ in row.measured)
    total = row.measured[0][2] if row.measured else "?"
    return f"{counts} of {total} {UNIT_NAMES[row.block]}"


def cell_text(readings: dict[str, Reading] | None, mode: str, block: str) -> str:
    if readings is None:
        return "n/a (MLP only)" if mode == "gate" and block != "mlp" else "not run"
    return " / ".join(readings[rule].text() for rule in (*(f"{t:g}" for t in PERPLEXITY_RULES), "tasks"))


def headline_table(rows: Sequence[HeadlineRow]) -> list[str]:
    modes = [m for m in MODES if any(m in r.readings for r in rows)]
    lines = ["| model | block: kept at the measured budgets | " + " | ".join(modes) + " |",
             "|" + "---|" * (2 + len(modes))]
    for r in rows:
        lines.append(f"| {r.model} | {BLOCK_NAMES[r.block]}: {measured_text(r)} | "
                     + " | ".join(cell_text(r.readings.get(m), m, r.block) for m in modes) + " |")
    return lines


# ------------------------------------------------------------------------------------- sentences built from the table
SENTENCE_RULE = ("per model, one clause per block (MLP, attention heads, both): the table's second value "
                 "(perplexity at most 5% above dense) of the predictor, then of every other mode in the table's order")
SENTENCE_BLOCKS = ("mlp", "att", "both")


def block_clause(row: HeadlineRow) -> str | None:
    rule = f"{PERPLEXITY_RULES[-1]:g}"
    if "predictor" not in row.readings:
        return None
    others = [f"{'the ' if m in ('oracle', 'gate') else ''}{m} {row.readings[m][rule].text()}"
              for m in MODES if m in row.readings and m != "predictor"]
    return (f"{BLOCK_NAMES[row.block]}: the predictor needs {row.readings['predictor'][rule].text()} of the "
            f"{UNIT_NAMES[row.block].split(' (')[0]} for at most 5% loss; " + ", ".join(others))


def model_sentences(rows: Sequence[HeadlineRow]) -> list[str]:
    """One sentence per model, a clause per block, every number a cell of the table."""
    out = []
    for model in dict.fromkeys(r.model for r in rows):
        clauses = [c for c in (block_clause(r) for r in rows if r.model == model and r.block in SENTENCE_BLOCKS) if c]
        if clauses:
            out.append(f"{model}. " + ". ".join(c[0].upper() + c[1:] for c in clauses) + ".")
    return out


# ------------------------------------------------------------------------------------- what was not run
def not_run_lines(summaries: Sequence[ModelSummary], families: dict[str, str]) -> list[str]:
    """What the inputs do not hold, said plainly: OPT beside Llama, the 3B shape."""
    out = []
    if "opt" not in families.values():
        out.append("OPT: no OPT model among the inputs, so no control beside the Llama-architecture models.")
    if not any(s.dims.get("hidden_size") == 3072 and s.dims.get("num_layers") == 28 for s in summaries):
        out.append("Llama-3.2-3B: no model of its shape (28 layers, hidden 3072) among the inputs.")
    return out


def headline_csv_columns(rows: Sequence[HeadlineRow]) -> dict[str, dict[str, object]]:
    """model -> summary.csv columns of its headline readings ('headline MLP predictor ppl<=1.05': value, '... side':
    in / below / above), so that summary.csv keeps every number of the first screen."""
    out: dict[str, dict[str, object]] = {}
    for r in rows:
        for mode, readings in r.readings.items():
            for rule, reading in readings.items():
                key = f"headline {BLOCK_NAMES[r.block]} {mode} {'tasks' if rule == 'tasks' else f'ppl<={rule}'}"
                out.setdefault(r.model, {}).update({key: reading.value, f"{key} side": reading.side})
    return out


def first_screen(summaries: Sequence[ModelSummary], rows: Sequence[HeadlineRow], dataset: str,
                 families: dict[str, str], where: Sequence[str], why: Sequence[str]) -> list[str]:
    """The report's first lines (at most 40): the table of `rows` (headline_rows), its reading rules, sentences,
    where, why, not run."""
    lines = [f"**Smallest kept fraction sustaining each quality** ({dataset} perplexity ratio to dense <= 1.01 / <= "
             f"1.05 / headline task mean within {100 * TASK_POINTS:.0f} point of dense), per model, block and mode:", ""]
    lines += headline_table(rows)
    lines += ["", "Read off the measured budgets by linear interpolation (log perplexity; accuracy); '<= f': the "
              "smallest measured budget already meets the rule; '> f': no measured budget does; 'n/a': no task "
              "result. Point estimates; the intervals are in the appendices. What produced the rows: "
              f"{wiring_text(summaries) or 'not recorded by the sweeps'}.", ""]
    lines += [f"Rule: {SENTENCE_RULE}."] + [f"- {s}" for s in model_sentences(rows)] + [""]
    lines += [f"- Where: {w}" for w in where] + [f"- Why: {w}" for w in why]
    lines += [f"- Not run: {n}" for n in not_run_lines(summaries, families) + range_lines(rows)]
    return lines


def range_lines(rows: Sequence[HeadlineRow]) -> list[str]:
    """Where no row measured a kept fraction of 0.75 or more: cells '> f' cannot be read further (the study's default
    budgets run to 0.9)."""
    largest: dict[str, float] = {}
    for r in rows:
        for fraction, _, _ in r.measured:
            largest[BLOCK_NAMES[r.block]] = max(fraction, largest.get(BLOCK_NAMES[r.block], 0.0))
    if not largest or max(largest.values()) >= 0.75:
        return []
    return ["kept fractions above the largest measured (" + ", ".join(f"{b} {f:.2f}" for b, f in largest.items())
            + "), so a cell '> f' says no more than that."]


def difference_standard_error(acc_a: float, se_a: float | None, examples_a: dict | None, acc_b: float,
                              se_b: float | None, examples_b: dict | None) -> tuple[float, str]:
    """(standard error of acc_a - acc_b, "paired" or "unpaired"): paired over the same documents when both results
    stored per-example scores of the same document ids (task_sweep.py's per_example), else the two harness standard
    errors combined as if independent, sqrt(se_a^2 + se_b^2), labelled unpaired."""
    if examples_a and examples_b and examples_a["doc_ids"] == examples_b["doc_ids"] and len(examples_a["acc"]) > 1:
        return paired_standard_error(examples_a["acc"], examples_b["acc"]), "paired"
    return math.hypot(se_a or 0.0, se_b or 0.0), "unpaired"


def paired_standard_error(a: Sequence[float], b: Sequence[float]) -> float:
    """Standard error of mean(a) - mean(b) when both score the same examples: the sample standard deviation of the
    per-example differences over the square root of their count."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired scores need two lists of one length >= 2, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    return math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))


def collapsed(ratio_a: float, ratio_b: float, limit: float = 10.0) -> bool:
    """Two runs both more than `limit` times dense perplexity: a ratio between them says nothing."""
    return ratio_a > limit and ratio_b > limit

