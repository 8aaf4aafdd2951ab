"""The report's first section: per model, side by side, the numbers that answer the study's question, then sentences
that only compare them.

The numbers: drift (same-token against cross-token cosine at k = 1), the lookahead penalty, per budget the perplexity
ratio to dense of every sparse mode, Recall@K of the lookahead predictor next to the static top-K and uniform chance
(the oracle's is 1 by definition), and task accuracy at the same budgets. A sentence that uses a threshold prints it
as the flag that set it; a comparison whose standard error exceeds that flag's value, while its interval reaches
into the flag's band, is marked too noisy to read.
Nothing here names a file: sources and commands are at the end of the report.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from scripts.report.headline import TaskResult, collapsed, difference_standard_error, task_result
from scripts.report.inputs import PANELS, Budget, row_budget
from scripts.report.plots import BLOCK_TITLES
from scripts.report.summary import (BASELINES, MAX_COLUMNS, SPARSE_MODES, Cell, ModelSummary,
                                    headline_dataset, layer_text, table, wiring_text)


@dataclass(frozen=True)
class Flags:
    """The thresholds the Answer's sentences use (report.py flags of the same names)."""
    within: float = 0.10  # --within: a perplexity ratio within this relative distance of 1 reads "within"
    acc_within: float = 0.02  # --acc-within: an accuracy difference within this reads "within"


COLLAPSED_AT = 10.0  # perplexity ratio to dense above which a run has collapsed


TaskResults = dict[tuple[str, str, str, Budget | None], TaskResult]  # (model, task, mode, budget; None = dense)


def task_results(task_sweeps: Sequence[tuple[object, list[dict]]]) -> TaskResults:
    """(model, task, mode, budget) -> accuracy, the harness's standard error and (when stored) per-document scores,
    from task-sweep CSV rows (rows without a standard error are left out: their differences cannot be read)."""
    out = {}
    for csv_path, rows in task_sweeps:
        for row in rows:
            if row.get("acc_stderr") in (None, ""):
                continue
            result = task_result(row, csv_path if isinstance(csv_path, Path) else None)
            if result is not None:
                budget = None if row["mode"] == "dense" else row_budget(row)
                out[(row["model"], row["task"], row["mode"], budget)] = result
    return out


# ------------------------------------------------------------------------------------- sentences
def percent(value: float) -> str:
    return f"{100 * value:.0f}%"


def log_standard_error(cell: Cell) -> float:
    """The standard error of log(ratio) from the interval: (ln high - ln low) / 3.92. A ratio's flag is relative
    ("within 10%"), so its noise is judged on the same relative scale."""
    return (math.log(cell.interval.high) - math.log(cell.interval.low)) / 3.92


def too_noisy(se: float, flag: float, low: float, high: float) -> bool:
    """Too noisy to read against a flag: the standard error exceeds the flag's value and the 95% interval (low, high)
    of the compared quantity reaches into the flag's band [-flag, flag], so that neither "within" nor "beyond" can be
    read. A difference far beyond the band stays readable however wide its interval."""
    return se > flag and low <= flag and high >= -flag


def ratio_clause(cell: Cell | None, flags: Flags) -> str:
    """How a paired perplexity ratio compares with 1 under the flag --within: 'within 10% (ratio ...)', '50% above
    (ratio ...)', or too noisy to read (see too_noisy; the standard error of its log against the flag)."""
    if cell is None or cell.interval is None:
        return "not measured"
    value, se = cell.interval.value, log_standard_error(cell)
    if too_noisy(se, flags.within, cell.interval.low - 1, cell.interval.high - 1):
        return f"too noisy to read (ratio {cell.text()}, standard error of its log {se:.3f} > {flags.within:g})"
    if abs(value - 1) <= flags.within:
        return f"within {percent(flags.within)} (ratio {cell.text()})"
    return f"{percent(abs(value - 1))} {'above' if value > 1 else 'below'} (ratio {cell.text()})"


def accuracy_se(result: TaskResult, base: TaskResult) -> tuple[float, str]:
    """The standard error of a difference of two accuracies and its kind: paired over the same documents where both
    runs stored per-document scores, else unpaired (headline.difference_standard_error)."""
    return difference_standard_error(result.acc, result.stderr, result.examples, base.acc, base.stderr,
                                     base.examples)


def accuracy_noisy(result: TaskResult, base: TaskResult, flags: Flags) -> bool:
    difference, (se, _) = result.acc - base.acc, accuracy_se(result, base)
    return too_noisy(se, flags.acc_within, difference - 1.96 * se, difference + 1.96 * se)


def accuracy_clause(result: TaskResult, base: TaskResult, flags: Flags) -> str:
    """How an accuracy compares with a reference under the flag --acc-within."""
    difference, (se, kind) = result.acc - base.acc, accuracy_se(result, base)
    numbers = f"{result.acc:.3f} vs {base.acc:.3f}"
    if accuracy_noisy(result, base, flags):
        return (f"too noisy to read ({numbers}, {kind} standard error of the difference {se:.3f} > "
                f"{flags.acc_within:g})")
    if abs(difference) <= flags.acc_within:
        return f"within {flags.acc_within:g} ({numbers})"
    return f"{abs(difference):.3f} {'above' if difference > 0 else 'below'} ({numbers}, {kind} standard error {se:.3f})"


def cell_text(cell: Cell | None) -> str:
    return "n/a" if cell is None or cell.interval is None else cell.text()


def drift_rows(summaries: Sequence[ModelSummary], distance: float | None) -> list[list[str]]:
    """Rows (quantity; one column per model): the layer sets pooled, drift at k=1 against its baselines and the
    lookahead penalty; none when neither drift nor Recall@K was measured."""
    rows = []
    if any("layers" in s.notes for s in summaries):
        rows.append(["layers pooled (layer 0 left out)", *(s.notes.get("layers", "n/a") for s in summaries)])
    if any("drift same-token raw all" in s.cells for s in summaries):
        drift_layers = [s.cells["drift same-token raw all"].layers if "drift same-token raw all" in s.cells else None
                        for s in summaries]
        rows.append(["drift pairs (l, l+1) pooled", *("all, layer 0 included" if layers is None else
                                                      layer_text(layers) for layers in drift_layers)])
    for pairing, what in (("same-token", "same-token cosine at k=1 (raw)"),
                          ("cross-token", "cross-token cosine at k=1 (raw)"),
                          ("same-minus-cross", "same-token - cross-token (raw)"),
                          ("centred", "same-token cosine, centred (raw)")):
        if any(f"drift {pairing} raw all" in s.cells for s in summaries):
            rows.append([what, *(cell_text(s.cells.get(f"drift {pairing} raw all")) for s in summaries)])
    if distance is not None:
        for block, name in (("mlp", "MLP"), ("att", "attention")):
            key = f"{block} penalty {distance:g} same - lookahead"
            if any(key in s.cells for s in summaries):
                rows.append([f"lookahead penalty, {name} (Recall@K same-layer - lookahead, K={distance:g})",
                             *(cell_text(s.cells.get(key)) for s in summaries)])
    return rows if any(not row[0].startswith(("layers", "drift pairs")) for row in rows) else []


BLOCK_ORDER = PANELS[1:]
BLOCK_SHORT = {"both": "MLP + attention", "both groups": "MLP + attention groups", "mlp": "MLP only",
               "att": "attention only", "att groups": "attention groups only"}


def level(budget: Budget) -> float:
    """A row of the Answer's budget tables: the MLP budget, or the attention budget when the MLP stays dense (the
    sweep pairs the i-th of each, so a paired row and the two single-block rows of one budget share it)."""
    return float(budget.mlp) if budget.mlp is not None else float(budget.att)


def level_label(value: float, budgets: Sequence[Budget], summaries: Sequence[ModelSummary]) -> str:
    """The budget in units (from the paired row when there is one), in each model's own counts: '0.25 of neurons, 2
    of 9 heads', or per model where the models keep different counts ('smollm2: ..., 2 of 9 heads; qwen: ..., 4 of
    14 heads')."""
    at_level = sorted((b for b in budgets if level(b) == value), key=lambda b: BLOCK_ORDER.index(b.panel))
    texts = {s.model: at_level[0].text(s.dims) for s in summaries}
    if len(set(texts.values())) == 1:
        return next(iter(texts.values()))
    return "; ".join(f"{model}: {text}" for model, text in texts.items())


def side_by_side(keys: Sequence[str], summaries: Sequence[ModelSummary]) -> list[list[tuple[str, ModelSummary]]]:
    """The value columns of the Answer's budget tables, (key, model) with every model of one key (a block, a task)
    side by side, split into tables of at most MAX_COLUMNS - 2 value columns (2 key columns: budget, mode)."""
    width = MAX_COLUMNS - 2
    columns = [[(key, s) for s in summaries[i:i + width]] for key in keys for i in range(0, len(summaries), width)]
    per_table = max(1, width // max(len(c) for c in columns))
    return [[c for group in columns[i:i + per_table] for c in group] for i in range(0, len(columns), per_table)]


def perplexity_tables(summaries: Sequence[ModelSummary], dataset: str) -> list[str]:
    """Rows (budget, mode), columns (block, model): perplexity / dense for every block the sweep made sparse."""
    runs = [(mode, b) for s in summaries for ds, mode, b in s.ppl if ds == dataset]
    blocks = [b for b in BLOCK_ORDER if any(budget.panel == b for _, budget in runs)]
    modes = [m for m in SPARSE_MODES if any(mode == m for mode, _ in runs)]
    budgets = list({b for _, b in runs})
    lines = [f"**{dataset} perplexity / dense perplexity** (1 = no loss; a column per sparse block and model: "
             f"MLP + attention = both sparse at the row's budget, MLP only = attention dense, attention only = MLP "
             f"dense; groups = attention kept in whole key-value (kv) groups; {wiring_text(summaries)}):", ""]
    for columns in side_by_side(blocks, summaries):
        headers = ["budget", "mode", *(f"{s.model}: {BLOCK_SHORT[block]}" for block, s in columns)]
        rows = []
        for value in sorted({level(b) for b in budgets}):
            label = level_label(value, budgets, summaries)
            for mode in modes:
                cells = [cell_text(next((c for (ds, m, b), c in s.ppl.items()
                                         if (ds, m, b.panel) == (dataset, mode, block) and level(b) == value), None))
                         for block, s in columns]
                if any(c != "n/a" for c in cells):
                    rows.append([label, mode, *cells])
        lines += table(headers, rows)
    return lines


def task_tables(summaries: Sequence[ModelSummary], tasks: TaskResults, block: str) -> tuple[list[str], list[str]]:
    """Rows (budget, mode), columns (task, model): accuracy ± the harness's standard error in the Answer's block."""
    models = {s.model for s in summaries}
    task_names = list(dict.fromkeys(task for model, task, _, b in tasks if model in models))
    if not task_names:
        return [], []
    budgets = list({b for model, _, _, b in tasks if b is not None and b.panel == block and model in models})
    modes = [m for m in SPARSE_MODES if any(mode == m for model, _, mode, b in tasks if b in budgets)]
    lines = [f"**Task accuracy ± the harness's standard error, {BLOCK_TITLES[block]}** "
             f"({wiring_text(summaries, 'task wiring') or 'wiring not recorded'}):", ""]
    for columns in side_by_side(task_names, summaries):
        headers = ["budget", "mode", *(f"{s.model}: {task}" for task, s in columns)]
        rows = [["dense", "dense", *(accuracy_text(tasks.get((s.model, t, "dense", None))) for t, s in columns)]]
        for budget in sorted(budgets, key=Budget.sort_key):
            label = level_label(level(budget), budgets, summaries)
            for mode in modes:
                cells = [accuracy_text(tasks.get((s.model, t, mode, budget))) for t, s in columns]
                if any(c != "n/a" for c in cells):
                    rows.append([label, mode, *cells])
        lines += table(headers, rows)
    return lines, task_names


def task_block(summaries: Sequence[ModelSummary], tasks: TaskResults) -> str | None:
    """The block whose task rows the Answer shows: both blocks sparse when measured, else MLP, else attention."""
    blocks = {b.panel for model, _, _, b in tasks if b is not None}
    return next((b for b in BLOCK_ORDER if b in blocks), None)


def accuracy_text(result: TaskResult | None) -> str:
    return "n/a" if result is None else f"{result.acc:.3f} ± {result.stderr:.3f}"


def recall_rows(summaries: Sequence[ModelSummary], fractions: Sequence[float]) -> list[list[str]]:
    """Rows (block, K, ranking): the lookahead predictor's Recall@K, the baselines' and uniform chance."""
    rows = []
    for block, name in (("mlp", "MLP"), ("att", "attention")):
        for k in fractions:
            key = f"{block} Recall@K {k:g} lookahead"
            if not any(key in s.cells and s.cells[key].interval for s in summaries):
                continue
            rows.append([f"{name} K={k:g}", "lookahead predictor", *(cell_text(s.cells.get(key)) for s in summaries)])
            for baseline in BASELINES:
                if any(f"{block} {baseline} Recall@K {k:g}" in s.cells for s in summaries):
                    rows.append([f"{name} K={k:g}", baseline, *(baseline_text(s, block, baseline, k)
                                                                for s in summaries)])
            rows.append([f"{name} K={k:g}", "uniform chance", *(
                "n/a" if key not in s.cells or s.cells[key].chance is None else f"{s.cells[key].chance:.3f}"
                for s in summaries)])
    return rows


def mode_block(s: ModelSummary, dataset: str, mode: str) -> str | None:
    """The block in which a mode's perplexity is compared with the oracle's: both blocks sparse when the sweep has
    it for that mode, else MLP only (the gate ranks MLP neurons only), else attention only."""
    blocks = {b.panel for ds, m, b in s.vs_oracle if (ds, m) == (dataset, mode)}
    return next((b for b in BLOCK_ORDER if b in blocks), None)


def baseline_text(summary: ModelSummary, block: str, baseline: str, k: float) -> str:
    """A baseline's Recall@K, or why it is n/a (OPT has no gate)."""
    cell = summary.cells.get(f"{block} {baseline} Recall@K {k:g}")
    if (cell is None or cell.interval is None) and baseline == "gate" and "gate" in summary.notes:
        return summary.notes["gate"].split(" (")[0]
    return cell_text(cell)


def model_sentences(s: ModelSummary, tasks: TaskResults, task_names: Sequence[str], dataset: str | None,
                    block: str | None, fractions: Sequence[float], flags: Flags) -> list[str]:
    """The comparisons of one model: one sentence per compared pair, a clause per budget with its numbers, and the
    flag that set its threshold."""
    out = []
    gap = s.cells.get("drift same-minus-cross raw all")
    if gap is not None and gap.interval is not None:
        side = "exceeds" if gap.interval.value >= 0 else "is below"
        out.append(f"drift at k=1 (raw): the same-token cosine {side} the cross-token one by "
                   f"{abs(gap.interval.value):.3f} (difference {gap.text()}, tokens paired)")
    for mode in ("predictor", "static", "gate") if dataset else ():  # random: its numbers are in the tables
        where = mode_block(s, dataset, mode)
        budgets = sorted((b for ds, m, b in s.vs_oracle if (ds, m) == (dataset, mode) and b.panel == where),
                         key=Budget.sort_key)
        clauses = [f"at {b.text(s.dims)}: " + (collapsed_text(s, dataset, mode, b) or
                                                 ratio_clause(s.vs_oracle[(dataset, mode, b)], flags))
                   for b in budgets]
        if clauses:
            out.append(f"{mode} perplexity against the oracle's, {BLOCK_TITLES[where]} (flag --within "
                       f"{flags.within:g}): " + "; ".join(clauses))
    tasks_sentence = accuracy_sentence(s, tasks, task_names, block, flags)
    if tasks_sentence:
        out.append(tasks_sentence)
    for block_name, name in (("mlp", "MLP"), ("att", "attention")):
        for baseline, what in (("static", "the static top-K"), ("gate", "the gate's top-K by |SiLU(g)|")):
            clauses = []
            for k in fractions:
                a, b = s.cells.get(f"{block_name} Recall@K {k:g} lookahead"), s.cells.get(
                    f"{block_name} {baseline} Recall@K {k:g}")
                if a is not None and b is not None and a.interval and b.interval:
                    clauses.append(f"K={k:g}: {a.interval.value:.3f} vs {b.interval.value:.3f} "
                                   f"({a.interval.value - b.interval.value:+.3f})")
            if clauses:
                out.append(f"{name} Recall@K of the lookahead predictor against {what}: " + "; ".join(clauses))
    return out


def collapsed_text(s: ModelSummary, dataset: str, mode: str, budget: Budget) -> str | None:
    """'collapsed (...)' when the mode's run and the oracle's are both more than COLLAPSED_AT x dense perplexity:
    a ratio between two collapsed runs is no comparison."""
    run, oracle = s.ppl.get((dataset, mode, budget)), s.ppl.get((dataset, "oracle", budget))
    if run is None or oracle is None or run.interval is None or oracle.interval is None:
        return None
    if not collapsed(run.interval.value, oracle.interval.value, COLLAPSED_AT):
        return None
    return (f"collapsed, both above {COLLAPSED_AT:g}x dense ({mode} {run.interval.value:.4g}x, oracle "
            f"{oracle.interval.value:.4g}x): no ratio read")


def span(values: Sequence[float]) -> str:
    low, high = f"{min(values):.3f}", f"{max(values):.3f}"
    return low if low == high else f"{low} to {high}"


def accuracy_sentence(s: ModelSummary, tasks: TaskResults, task_names: Sequence[str], block: str | None,
                      flags: Flags) -> str | None:
    """One sentence for every task: the predictor's accuracy against dense at each budget of `block`; tasks too noisy
    (or within the flag) at every budget are named together, the others get a clause per budget."""
    noisy, within, detailed = [], [], []
    for task in task_names:
        base = tasks.get((s.model, task, "dense", None))
        budgets = sorted((b for model, t, mode, b in tasks if (model, t, mode) == (s.model, task, "predictor")
                          and b is not None and b.panel == block), key=Budget.sort_key)
        if not base or not budgets:
            continue
        results = [tasks[(s.model, task, "predictor", b)] for b in budgets]
        if all(accuracy_noisy(r, base, flags) for r in results):
            noisy.append((task, [accuracy_se(r, base)[0] for r in results]))
        elif all(abs(r.acc - base.acc) <= flags.acc_within and not accuracy_noisy(r, base, flags) for r in results):
            within.append(task)
        else:
            detailed.append(f"{task}: " + "; ".join(f"at {b.text(s.dims)}: {accuracy_clause(r, base, flags)}"
                                                  for b, r in zip(budgets, results)))
    parts = []
    if noisy:
        parts.append(f"too noisy to read at every budget on {', '.join(t for t, _ in noisy)} (standard error of the "
                     f"difference {span([e for _, errors in noisy for e in errors])} > {flags.acc_within:g}; paired "
                     "where per-document scores were stored, else unpaired)")
    if within:
        parts.append(f"within {flags.acc_within:g} at every budget on {', '.join(within)}")
    parts += detailed
    if not parts:
        return None
    return (f"task accuracy of the predictor against dense, {BLOCK_TITLES[block]} (flag --acc-within "
            f"{flags.acc_within:g}; accuracies in the table): " + "; ".join(parts))


def unmeasured_modes(summaries: Sequence[ModelSummary]) -> dict[str, str]:
    """mode -> why the perplexity sweep has no row of it: for the gate, the models without one (recall_summary.py
    records why), else no row at all."""
    out = {}
    for mode in SPARSE_MODES:
        without = [s for s in summaries if not any(m == mode for _, m, _ in s.ppl)]
        if not without:
            continue
        reasons = [f"{s.model}: {s.notes['gate'].split(' (')[0]}" for s in without
                   if mode == "gate" and "gate" in s.notes]
        missing = [s.model for s in without if not (mode == "gate" and "gate" in s.notes)]
        out[mode] = "; ".join(reasons + ([f"no perplexity-sweep row for {', '.join(missing)}"] if missing else []))
    return out


def answer_section(summaries: Sequence[ModelSummary], tasks: TaskResults, fractions: Sequence[float],
                   distance: float | None, flags: Flags) -> tuple[list[str], list[str]]:
    """The Answer's markdown, and the quantities it could not show (for "Not measured in this run")."""
    dataset = headline_dataset(summaries)
    lines = ["Generated from the numbers of this run; every value is estimate [95% interval] (bootstrap over "
             "documents, requests or WikiText-2 articles, as each table says; Glossary at the end). Models side by side.", ""]
    absent = []
    rows = drift_rows(summaries, distance)
    if rows:
        lines += table(["quantity", *(s.model for s in summaries)], rows)
    else:
        absent.append("Answer: drift and the lookahead penalty (no drift.py or recall_summary.py result)")
    if not any("drift cross-token raw all" in s.cells for s in summaries):
        absent.append("Answer: cross-token drift (drift.py result without a cross-token pairing)")
    block = task_block(summaries, tasks)
    task_names = list(dict.fromkeys(task for model, task, _, _ in tasks if model in {s.model for s in summaries}))
    for s in summaries:  # the comparisons first, the tables they read from after them
        sentences = model_sentences(s, tasks, task_names if block else [], dataset, block, fractions, flags)
        if sentences:
            lines += [f"- **{s.model}**"] + [f"  - {sentence}." for sentence in sentences]
    lines += [""] if lines[-1] else []
    if dataset:
        lines += perplexity_tables(summaries, dataset)
        absent += [f"Answer: sparse mode {mode}: {why}" for mode, why in unmeasured_modes(summaries).items()]
    else:
        absent.append("Answer: perplexity at the budgets (no perplexity sweep with per-request log-probs)")
    task_lines, task_names = task_tables(summaries, tasks, block) if block else ([], [])
    lines += task_lines
    if not task_names:
        absent.append("Answer: task accuracy at the budgets (no task-sweep CSV)")
    rows = recall_rows(summaries, fractions)
    if rows:
        lines += ["**Recall@K of the lookahead predictor** (the oracle's is 1 by definition; the static top-K is the "
                  "input-independent baseline; uniform chance K / units):", ""]
        lines += table(["K", "ranking", *(s.model for s in summaries)], rows)
    else:
        absent.append("Answer: Recall@K (no recall_summary.py result)")
    if rows and not any(f"{b} static Recall@K {k:g}" in s.cells for s in summaries for b in ("mlp", "att")
                        for k in fractions):
        absent.append("Answer: the static top-K Recall@K (recall_summary.py result without static records)")
    return lines + [""], absent
