"""The report's sections: one function per section, each a list of markdown lines built from the numbers."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from sparse_predictor.trainer.records import SUMMARY_COLUMNS
from scripts.analysis.common import PERCENTILES, model_label, write_csv_atomic
from scripts.report.answer import too_noisy
from scripts.report.headline import TaskResult, difference_standard_error, headline_tasks, per_example
from scripts.report.summary import (MAX_COLUMNS, ModelSummary, build_summaries, decomposition_tables, layer_text,
                                    per_layer_tables, summary_tables, sweep_wiring,
                                    csv_rows as summary_csv_rows, table as markdown_table)
from scripts.report.inputs import (Inputs, PredictorSet, Sources, all_models, model_dims, read_json_file,
                                   row_budget)


# ------------------------------------------------------------------------------------- formatting
def fmt(value: Any) -> str:
    if value is None or value == "":
        return "n/a"
    if isinstance(value, (float, np.floating)):
        return "n/a" if np.isnan(value) else f"{value:.4f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return markdown_table(headers, rows, render=fmt)


def split_table(key_headers: Sequence[str], value_headers: Sequence[str], rows: Sequence[Sequence[Any]],
                tail_headers: Sequence[str] = ("src",)) -> list[str]:
    """A table too wide for the column limit as several: every part repeats the key (and tail) columns and takes the
    next value columns. rows: key values, then value values, then tail values."""
    keys, tails = len(key_headers), len(tail_headers)
    width = MAX_COLUMNS - keys - tails
    lines = []
    for start in range(0, max(1, len(value_headers)), width):
        part = slice(keys + start, keys + min(start + width, len(value_headers)))
        lines += table([*key_headers, *value_headers[start:start + width], *tail_headers],
                       [[*row[:keys], *row[part], *row[len(row) - tails:]] for row in rows])
    return lines


def by_model(values: dict[str, float]) -> str:
    """'A 0.9300, B 0.7100': one number per model, in the report's model order (collections first, as given)."""
    return ", ".join(f"{model} {fmt(v)}" for model, v in values.items())


def result_source(sources: Sources, path: Path, payload: dict) -> str:
    return sources.add(path, payload.get("provenance"), payload.get("source", {}).get("manifest"))


def figure_lines(paths: Sequence[Path], report_dir: Path) -> list[str]:
    return [f"![{p.stem}]({p.relative_to(report_dir).as_posix()})" for p in paths] + [""]


# ------------------------------------------------------------------------------------- sections
def collections_section(inputs: Inputs, sources: Sources) -> list[str]:
    shapes, facts = [], []
    for directory, m in inputs.collections:
        src = sources.add(directory / "manifest.json", m, str(directory / "manifest.json"))
        cfg, data = m.get("config", {}), m.get("source_data") or {}
        shapes.append([model_label(m), m.get("model_type"), m.get("rows_written"), m.get("capacity"),
                       cfg.get("num_layers"), cfg.get("hidden_size"), cfg.get("ffn_dim"), cfg.get("num_heads"),
                       cfg.get("num_kv_heads"), src])
        facts.append([model_label(m), ", ".join(m.get("kinds", [])), m.get("complete"), m.get("dtype"),
                      (m.get("weights") or {}).get("note", "not recorded"),
                      (m.get("tokenizer") or {}).get("position_0", "not recorded"),
                      data.get("path"), (data.get("sha256") or "n/a")[:12], src])
    return (table(["model", "model_type", "rows", "capacity", "layers", "d", "ffn", "heads", "kv heads", "src"], shapes)
            + table(["model", "kinds", "complete", "dtype", "weights", "position 0", "source data", "sha256", "src"],
                    facts))


def drift_section(results: list[tuple[Path, dict]], sources: Sources) -> list[str]:
    """Per model: how the cosines were computed, the mean over layers l >= 1 by distance (layer 0, the embedding
    against the first block's output, only in the per-layer table), and every layer at k=1."""
    lines = []
    summary_rows, k1 = [], defaultdict(dict)
    max_k = max(r["max_distance"] for _, r in results)
    per_layer = []
    for path, r in results:
        src = result_source(sources, path, r)
        model = r["source"]["model"]
        massive = r.get("massive_dims")
        massive_text = ("not excluded" if not massive else
                        f"{massive['count']} dims, {massive['rule']}: " + "; ".join(
                            f"{key} {dims}" for key, dims in massive["chosen"].items()))
        lines += [f"- **{model}** [{src}]: normed space = {r['normalization']['description']}; rows "
                  f"{r['sample']['rows_used']} of {r['sample']['rows_eligible']} eligible "
                  f"(seed {r['sample']['seed']}); "
                  f"first token excluded: {r['exclude_first_token']} ({r['sample']['first_token_rows_dropped']} rows "
                  f"dropped; position 0 is {r['sample'].get('position_0', 'not recorded')}); massive dims: "
                  f"{massive_text}"]
        groups = defaultdict(lambda: defaultdict(list))
        for x in r["records"]:
            if x["layer"] >= 1:
                groups[(x["kind"], x["space"], x["dims"])][x["k"]].append((x["layer"], x["mean"]))
        for (kind, space, dims), ks in sorted(groups.items()):
            means = {k: float(np.mean([m for _, m in v])) for k, v in ks.items()}
            summary_rows.append([model, kind, space, dims, layer_text([layer for layer, _ in ks.get(1, [])]),
                                 *[means.get(k) for k in range(1, max_k + 1)], src])
            if 1 in means:
                k1[(kind, space, dims)][model] = means[1]
        n = {x["n"] for x in r["records"] if x["k"] == 1}
        per_layer += [f"**{model}** [{src}], k=1, {', '.join(map(str, sorted(n)))} tokens per layer:", ""]
        per_layer += table(["kind", "layer l", "space", "dims", "mean", *[f"p{p}" for p in PERCENTILES]],
                           [[x["kind"], x["layer"], x["space"], x["dims"], x["mean"],
                             *[x[f"p{p}"] for p in PERCENTILES]]
                            for x in r["records"] if x["k"] == 1])
    lines += [""] + [f"- mean cosine at k=1 ({kind}, {space}, {dims} dims; mean over layers l >= 1 of the per-layer "
                     f"mean; layer 0 in the per-layer table): {by_model(values)}"
                     for (kind, space, dims), values in sorted(k1.items())]
    lines += ["", "Mean over layers l >= 1 (the pairs (l, l+k) named) of the per-layer mean cosine, by distance k:", ""]
    lines += split_table(["model", "kind", "space", "dims", "layers at k=1"], [f"k={k}" for k in range(1, max_k + 1)],
                         summary_rows)
    lines += ["Per layer at k=1, layer 0 included (all distances are in each result's drift.csv):", ""]
    return lines + per_layer


def lookahead_section(results: list[tuple[Path, dict]], sources: Sources) -> list[str]:
    lines = []
    at_distance: dict[tuple[str, int], dict[str, str]] = defaultdict(dict)
    for path, r in results:
        src = result_source(sources, path, r)
        model, distances = r["source"]["model"], r["distances"]
        for j in distances:
            cells = [x["Recall@K"] for x in r["records"] if x["distance"] == j]
            at_distance[(r["block"], j)][model] = (f"{fmt(float(np.mean(cells)))} ({len(cells)} "
                                                   f"layer{'s' * (len(cells) != 1)})")
        lines += [f"**{model}**, {r['block']} labels ({r['label_definition']}), Recall@K by predicted layer l and "
                  f"input distance j (input att_x_(l-j)) [{src}]:", ""]
        lines += split_table(["layer l"], [f"j={j}" for j in distances],
                             [[layer, *row, src] for layer, row in zip(r["layers"], r["matrix"]["Recall@K"])])
    lines += [f"- mean Recall@K over the layers with l-j >= 0, {block}, j={j}: {by_model(values)}"
              for (block, j), values in sorted(at_distance.items())]
    return lines + [""]


def sparsity_section(results: list[tuple[Path, dict]], sources: Sources) -> list[str]:
    lines = []
    means: dict[str, dict[str, float]] = defaultdict(dict)
    for path, r in results:
        src = result_source(sources, path, r)
        model = r["source"]["model"]
        columns = r["columns"]
        for c in columns:
            values = [x[c] for x in r["records"] if x[c] is not None]
            if values and c != "tokens_with_zero_mlp_mass":
                means[c][model] = float(np.mean(values))
        lines += [f"**{model}** [{src}]: {r['sample']['rows_used']} rows; {r['mlp_gate']}", ""]
        lines += split_table(["layer"], columns, [[x["layer"], *[x[c] for c in columns], src] for x in r["records"]])
    lines += [f"- mean over layers of {c}: {by_model(values)}" for c, values in means.items()]
    return lines + [""]


def label_sweep_section(results: list[tuple[Path, dict]], sources: Sources) -> list[str]:
    metrics = ("Recall", "Recall@K", "Precision", "True Sparsity", "Classifier Sparsity")
    lines = []
    for path, r in results:
        src = result_source(sources, path, r)
        model = r["source"]["model"]
        layers = r["layers"]
        where = f"layer {layers[0]}" if len(layers) == 1 else f"mean over layers {layer_text(layers)}"
        lines += [f"**{model}**, MLP predictors with input `{r['input']}`, {where} [{src}] (K: the label's top-K "
                  f"count, or the mean active count of a thresholded label; True Sparsity: units labelled active per "
                  f"token):", ""]
        rows = []
        for spec in r["labels"]:
            trained = [x for x in r["records"] if x["label_spec"] == spec and x["status"] == "trained"]
            statuses = sorted({x["status"] for x in r["records"] if x["label_spec"] == spec})
            rows.append([spec, len(trained), *[np.mean([x[m] for x in trained if x[m] is not None])
                                               if trained else None for m in (*metrics, "K")], "; ".join(statuses),
                         src])
        lines += table(["label", "layers trained", *metrics, "K", "status", "src"], rows)
        if len(layers) > 1:
            lines += table(["layer", "label", *metrics, "K", "status", "src"],
                           [[x["layer"], x["label_spec"], *[x.get(m) for m in metrics], x.get("K"), x["status"], src]
                            for x in r["records"]])
    return lines


def predictors_section(sets: list[PredictorSet], sources: Sources, missing: list[str]) -> list[str]:
    lines = []
    for s in sets:
        expected = s.records[0][1]["data"]["dims"]["num_layers"]
        absent = sorted(set(range(expected)) - {rec["layer"] for _, rec in s.records})
        if absent:
            missing.append(f"predictors {s.directory} ({s.block}): no JSON for layers {absent} of {expected}")
        lines += [f"**{s.model}** (run name {s.run_name}), {s.block} predictors in `{s.directory}` (summary CSV: "
                  f"{s.summary_csv or 'missing'}); layers without a JSON: {absent or 'none'}", ""]
        rows = []
        for path, rec in s.records:
            src = sources.add(path, rec.get("provenance"), str(Path(rec["data"]["data_dir"]) / "manifest.json"))
            rows.append([rec.get(c) for c in SUMMARY_COLUMNS] + [src])
        lines += table([*SUMMARY_COLUMNS, "src"], rows)
    means = defaultdict(dict)
    for s in sets:
        for metric in ("Recall", "Recall@K"):
            values = [rec[metric] for _, rec in s.records if rec.get(metric) is not None]
            if values:
                means[(s.block, metric)][s.model] = float(np.mean(values))
    lines += [f"- mean {metric} over layers, {block} predictors: {by_model(values)}"
              for (block, metric), values in sorted(means.items())]
    return lines + [""]


def resolve_manifest(value: str, csv_path: Path) -> Path | None:
    """A row's output_manifest as given (absolute or from the working directory) or next to the CSV."""
    for candidate in (Path(value), csv_path.parent / value):
        if value and candidate.is_file():
            return candidate
    return None


def perplexity_section(sweeps: list[tuple[Path, list[dict]]], sources: Sources, missing: list[str],
                       dims: dict[str, dict]) -> list[str]:
    """Every sweep row with its ratio to the dense run; the CSV itself keeps every column."""
    lines = []
    for csv_path, rows in sweeps:
        dense = {(r["model"], r["dataset"]): float(r["perplexity"]) for r in rows if r["mode"] == "dense"}
        out = []
        for i, r in enumerate(rows, start=2):  # line numbers of the CSV, header = 1
            manifest = resolve_manifest(r.get("output_manifest", ""), csv_path)
            if manifest is None:
                missing.append(f"{csv_path} line {i}: output manifest {r.get('output_manifest') or '(none given)'} "
                               f"not found")
                src = sources.add(f"{csv_path} line {i}", None, None)
            else:
                src = sources.add(manifest, read_json_file(manifest), str(manifest))
            base = dense.get((r["model"], r["dataset"]))
            budget = row_budget(r)
            out.append([r["model"], r["dataset"], r["mode"], budget.block,
                        "dense" if r["mode"] == "dense" else budget.text(dims.get(r["model"])),
                        float(r["perplexity"]), r.get("tokens"), float(r["perplexity"]) / base if base else None, src])
        lines += [f"From `{csv_path}` (which keeps every column of the sweep):", ""]
        lines += table(["model", "dataset", "mode", "block", "budget", "perplexity", "tokens", "ppl / dense ppl",
                        "src"], out)
        lines += against_dense(rows, "dataset", dict(sorted(dense.items())), "perplexity",
                               lambda r: float(r["perplexity"]), dims) + [""]
    return lines


def against_dense(rows: list[dict], group: str, dense: dict[tuple[str, str], Any], metric: str,
                  value: Callable[[dict], Any], dims: dict[str, dict]) -> list[str]:
    """One sentence per (model, `group`) of `dense`: the dense run's `metric`, then every other run's."""
    lines = []
    for (model, name), base in dense.items():
        others = [r for r in rows if (r["model"], r[group]) == (model, name) and r["mode"] != "dense"]
        lines.append(f"- {model} / {name}: dense {metric} {fmt(base)}; " + (
            "other runs: " + ", ".join(f"{r['mode']} ({row_budget(r).text(dims.get(model))}) {fmt(value(r))}"
                                      for r in others)
            if others else "no other run"))
    return lines


def number(value: str | None) -> float | None:
    return None if value in (None, "") else float(value)


def tasks_section(task_sweeps: list[tuple[Path, list[dict]]], sources: Sources, missing: list[str],
                  dims: dict[str, dict], acc_within: float) -> list[str]:
    """Downstream accuracy per (model, task, mode, budget), next to the dense model's, with the harness's stderr; a
    difference whose standard error exceeds the flag --acc-within is marked too noisy to read."""
    lines = []
    for csv_path, rows in task_sweeps:
        dense = {(r["model"], r["task"]): (number(r["acc"]), number(r["acc_stderr"]), per_example(csv_path, r))
                 for r in rows if r["mode"] == "dense"}
        out = []
        for i, r in enumerate(rows, start=2):
            result = resolve_manifest(r.get("result_json", ""), csv_path)
            if result is None:
                missing.append(f"{csv_path} line {i}: result {r.get('result_json') or '(none given)'} not found")
                src = sources.add(f"{csv_path} line {i}", None, None)
            else:
                src = sources.add(result, read_json_file(result), str(result))
            acc, stderr = number(r["acc"]), number(r["acc_stderr"])
            base, base_stderr, base_examples = dense.get((r["model"], r["task"]), (None, None, None))
            out.append([r["model"], r["task"], r["mode"],
                        "dense" if r["mode"] == "dense" else row_budget(r).text(dims.get(r["model"])), r.get("samples"),
                        plus_minus(acc, stderr),
                        plus_minus(number(r.get("acc_norm")), number(r.get("acc_norm_stderr"))),
                        "" if r["mode"] == "dense" else difference_text(acc, stderr, per_example(csv_path, r), base,
                                                                        base_stderr, base_examples, acc_within),
                        src])
        lines += task_matrix(rows, dims)
        lines += [f"From `{csv_path}` (accuracy ± the harness's standard error; the difference to dense with its "
                  f"standard error, paired over the same documents where both runs stored per-document scores, else "
                  f"unpaired (the two rows' combined), marked too noisy when it exceeds the flag --acc-within "
                  f"{acc_within:g}; every column in the CSV):", ""]
        lines += table(["model", "task", "mode", "budget", "samples", "acc", "acc_norm", "acc - dense acc", "src"],
                       out)
        lines += against_dense(rows, "task", {k: v[0] for k, v in dense.items()}, "acc", lambda r: number(r["acc"]),
                               dims) + [""]
    return lines


def task_matrix(rows: list[dict], dims: dict[str, dict]) -> list[str]:
    """Per model, one row per setting and one column per task (acc ± the harness's standard error), and the
    unweighted mean over the tasks as DejaVu's table reports it, its standard error sqrt(sum se^2) / n (tasks
    independent); a setting without every task has no mean."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        tasks = list(dict.fromkeys(r["task"] for r in mine))
        settings: dict[tuple[str, str], dict[str, dict]] = {}
        for r in mine:
            budget = "dense" if r["mode"] == "dense" else row_budget(r).text(dims.get(model))
            settings.setdefault((r["mode"], budget), {})[r["task"]] = r
        dense = settings.get(("dense", "dense"), {})
        kept, left = headline_tasks({t: TaskResult(number(r["acc"]), number(r["acc_stderr"])) for t, r in dense.items()
                                     if number(r["acc"]) is not None})
        out = []
        for (mode, budget), by_task in settings.items():
            cells = [plus_minus(number(by_task[t]["acc"]), number(by_task[t]["acc_stderr"])) if t in by_task
                     else "not run" for t in tasks]
            out.append([mode, budget, *cells, mean_text([by_task.get(t) for t in kept]),
                        mean_text([by_task.get(t) for t in tasks])])
        lines += [f"{model}: accuracy per task ± the harness's standard error; the headline mean over the {len(kept)} "
                  f"tasks whose dense accuracy is more than 2 standard errors above uniform chance"
                  + (f" (left out, at chance for the dense model: {', '.join(left)})" if left else "")
                  + f", and the mean over all {len(tasks)} (unweighted, as DejaVu's table; standard error sqrt(sum "
                  f"se^2) / n, tasks independent); {sweep_wiring(mine)}:", ""]
        lines += split_table(["mode", "budget"], [*[t.removeprefix("dejavu_") for t in tasks], "headline mean",
                                                  "mean of all"], out, tail_headers=()) + [""]
    return lines


def mean_text(rows: list[dict | None]) -> str:
    if not rows:
        return "n/a (no task)"
    found = [r for r in rows if r is not None and number(r["acc"]) is not None]
    if len(found) < len(rows):
        return f"n/a ({len(found)} of {len(rows)} tasks)"
    errors = [number(r["acc_stderr"]) for r in found]
    stderr = None if None in errors else sum(e * e for e in errors) ** 0.5 / len(found)
    return plus_minus(sum(number(r["acc"]) for r in found) / len(found), stderr)


def plus_minus(value: float | None, stderr: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}" + ("" if stderr is None else f" ± {stderr:.3f}")


def difference_text(acc: float | None, stderr: float | None, examples: dict | None, base: float | None,
                    base_stderr: float | None, base_examples: dict | None, acc_within: float) -> str:
    """The difference to dense with its standard error (paired or unpaired, said), marked too noisy to read as the
    Answer marks it (answer.too_noisy)."""
    if acc is None or base is None:
        return "n/a"
    difference = acc - base
    se, kind = difference_standard_error(acc, stderr, examples, base, base_stderr, base_examples)
    noisy = too_noisy(se, acc_within, difference - 1.96 * se, difference + 1.96 * se)
    return (f"{difference:+.3f} ({kind} se {se:.3f}" + (f"; too noisy to read: > {acc_within:g})" if noisy else ")"))


def stage_time(stage: dict) -> str:
    """A stage's wall time; a stage stopped before it finished says so; one done by an earlier run has none here."""
    if stage["seconds"] is not None:
        return f"{stage['seconds']:.0f}"
    if stage.get("interrupted_seconds"):
        return f"stopped after {stage['interrupted_seconds']:.0f} (not finished)"
    return "n/a (done before this manifest)"


def stages_section(studies: list[tuple[Path, dict]], sources: Sources) -> list[str]:
    """Wall time of every stage of the study (the run that did it; a resumed run keeps earlier times)."""
    lines = []
    for path, study in studies:
        src = sources.add(path, study, str(path))
        rows = [[s["model"], s["stage"], stage_time(s), "<br>".join(f"`{c}`" for c in s["commands"]) or "n/a", src]
                for s in study["stages"]]
        total = sum(s["seconds"] or s.get("interrupted_seconds") or 0 for s in study["stages"])
        lines += [f"`{study['command']}` (commit {study['git_commit']}): {total:.0f} s over the stages below.", ""]
        lines += table(["model", "stage", "wall time (s)", "commands", "src"], rows)
    return lines


# ------------------------------------------------------------------------------------- summary
@dataclass
class SummaryParts:
    """What the summary stage hands to the report: the per-model cells (the Answer reads them too), the K fractions,
    the distance K, and the markdown of the Summary and Decomposition sections."""
    summaries: list[ModelSummary]
    fractions: list[float]
    distance: float | None
    summary: list[str]
    decomposition: list[str]


def summary_section(inputs: Inputs, sources: Sources, out_dir: Path, missing: list[str],
                    colors: dict[str, str]) -> SummaryParts:
    """The pooled numbers (identical definitions, intervals), their figures and summary.csv, and the decomposition
    tables. Sources are registered first, so the summary's rows carry the lowest ids."""
    recall = [(result_source(sources, path, r), r) for path, r in inputs.results["recall_summary"]]
    drift = [(result_source(sources, path, r), r) for path, r in inputs.results["drift"]]
    sweeps = []
    for csv_path, rows in inputs.sweeps:
        for i, row in enumerate(rows, start=2):
            manifest_path = resolve_manifest(row.get("output_manifest", ""), csv_path)
            manifest = read_json_file(manifest_path) if manifest_path else None
            if not manifest or "per_request" not in manifest.get("perplexity", {}):
                missing.append(f"summary: {csv_path} line {i} has no per-request log-probs in its manifest "
                               f"(rerun the sweep with this version): no interval")
                continue
            sweeps.append(([sources.add(manifest_path, manifest, str(manifest_path))], row, manifest))
    models = all_models(inputs)
    summaries = build_summaries(models, recall, drift, sweeps, model_dims(inputs))
    for summary in summaries:  # the task sweeps' own wiring, for the task tables
        task_rows = [row for _, rows in inputs.task_sweeps for row in rows if row["model"] == summary.model]
        if task_rows:
            summary.notes["task wiring"] = sweep_wiring(task_rows)
    fractions = recall[0][1]["fractions"] if recall else []
    distance = recall[0][1]["distance_fraction"] if recall else None
    if not (recall or drift or sweeps):
        return SummaryParts(summaries, fractions, distance, [], [])
    lines = summary_tables(summaries, fractions, distance)
    csv_path = out_dir / "summary.csv"
    rows = summary_csv_rows(summaries)
    write_csv_atomic(csv_path, rows, list(dict.fromkeys(k for row in rows for k in row)))
    lines += [f"All numbers with their intervals, seed spreads, uniform-chance levels, layer sets and sources, and "
              f"every perplexity ratio against the oracle: `{csv_path.name}`.", ""]
    activations = {model_label(m): (m.get("label_definitions") or {}).get("mlp_label", "not recorded")
                   for _, m in inputs.collections}
    if not recall:
        return SummaryParts(summaries, fractions, distance, lines, [])
    sparsity = [(result_source(sources, path, r), r) for path, r in inputs.results["sparsity_stats"]]
    return SummaryParts(summaries, fractions, distance, lines,
                        decomposition_tables(summaries, fractions, distance, activations)
                        + per_layer_tables(recall, drift, sparsity, distance))
