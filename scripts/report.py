"""One markdown report, OPT vs Llama, from any set of result folders: tables, figures and where every number came from.

Inputs (files, or folders searched recursively) are recognised by content:
  collection        a folder with manifest.json listing collected kinds (SPEC §6)
  drift / lookahead / sparsity_stats / label_sweep
                    the JSONs of scripts/drift.py, lookahead.py, sparsity_stats.py ("analysis" key)
  predictors        {mlp,att}_layer{L}.json of the predictor trainer (SPEC §7), with {block}_summary.csv if present
  perplexity sweep  a CSV with columns model,dataset,mode,perplexity (and mlp_topk, att_topk, tokens,
                    output_manifest, ...), one row per sparse-inference run (SPEC §8)
  task sweep        a CSV with columns model,task,mode,acc,acc_stderr (and mlp_topk, att_topk, result_json, ...),
                    one row per (mode, budget, task) of scripts/task_sweep.py (SPEC §11)
Every table row carries a source id [S<n>]; the Sources table gives its file, command, git commit and manifest
(from the provenance block every JSON of this project carries). Sentences in the report are generated from the
numbers and only describe them. Inputs that do not exist, predictor layers without a JSON, sweep rows whose
manifest is absent and sections with no input are listed under "Missing".

    python scripts/report.py data/opt-6.7b_c4 data/llama-3.2-3b_c4 out/drift out/lookahead out/sparsity \\
        data/opt-6.7b_c4_sparse_predictor data/llama-3.2-3b_c4_sparse_predictor out/sweep.csv --out-dir out/report
Writes <out-dir>/report.md and its figures under <out-dir>/figures/.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # lets `python scripts/report.py` run

import numpy as np  # noqa: E402

from Decentralized_FM_alpha.utils.manifest import base_manifest  # noqa: E402
from sparse_predictor.trainer import METRIC_DEFINITIONS, SUMMARY_COLUMNS  # noqa: E402
from scripts.analysis_common import PERCENTILES, model_colors, model_label, write_csv_atomic  # noqa: E402
from scripts.plots import ANALYSES, plot_perplexity, plot_predictors, plot_results, plot_tasks  # noqa: E402
from scripts.sparsity_stats import STATISTIC_DEFINITIONS  # noqa: E402
from scripts.summary import (budget_curves, build_summaries, decomposition_tables, per_layer_tables,  # noqa: E402
                             plot_summary, ppl_key, summary_tables, csv_rows as summary_csv_rows)

PREDICTOR_JSON = re.compile(r"(mlp|att)_layer(\d+)\.json")
SEED_DIR = re.compile(r"seed\d+")
SWEEP_REQUIRED = ("model", "dataset", "mode", "perplexity")
TASKS_REQUIRED = ("model", "task", "mode", "acc", "acc_stderr")
SECTIONS = ("Collections", "Residual-stream drift", "Lookahead", "Sparsity statistics", "Label sensitivity",
            "Predictors", "Perplexity sweep", "Downstream tasks")
DEFINITIONS = {
    **{k: METRIC_DEFINITIONS[k]
       for k in ("Recall", "True Sparsity", "Classifier Sparsity", "Precision", "Recall@K", "K")},
    "Drift cosine": "cosine similarity between the same token's x_l and x_{l+k} (att_x: residual stream entering "
                    "the layer; mlp_x: after the attention residual add). raw: as stored; normed: both through layer "
                    "l+k's norm (see each result's normalisation line). 'without_massive' drops the listed dims",
    "Lookahead cell (l, j)": "held-out metrics of a predictor for layer l's labels trained from att_x_{l-j}",
    **{f"sparsity: {k}": v for k, v in STATISTIC_DEFINITIONS.items()},
    "Perplexity": "exp(-mean of token_logprobs[1:] over all requests), the original DejaVu convention",
    "Downstream acc": "lm-evaluation-harness accuracy of the task (acc: the highest-likelihood choice is the gold "
                      "one, or the gold continuation is the greedy one; acc_norm: likelihoods normalised by the "
                      "choice's length in bytes) with the harness's standard error, on the model of the row's mode "
                      "and budget (scripts/task_sweep.py)",
}


# ------------------------------------------------------------------------------------- sources
@dataclass
class Sources:
    """Every file a number comes from, with its command, commit and manifest, under a short id."""
    rows: list[dict[str, str]] = field(default_factory=list)
    ids: dict[str, str] = field(default_factory=dict)

    def add(self, path: Path | str, provenance: dict | None, manifest: str | None) -> str:
        key = str(path)
        if key not in self.ids:
            provenance = provenance or {}
            self.ids[key] = f"S{len(self.rows) + 1}"
            self.rows.append({"id": self.ids[key], "file": key,
                              "command": provenance.get("command") or "missing (no provenance block)",
                              "commit": provenance.get("git_commit") or "missing",
                              "manifest": manifest or "missing"})
        return self.ids[key]


# ------------------------------------------------------------------------------------- finding the inputs
@dataclass
class PredictorSet:
    directory: Path
    block: str
    records: list[tuple[Path, dict]]
    summary_csv: Path | None

    @property
    def model(self) -> str:
        """The collection's model (as in the other sections), not the run name the trainer was given."""
        return model_label(self.records[0][1]["data"])

    @property
    def run_name(self) -> str:
        return self.records[0][1]["model"]


@dataclass
class Inputs:
    collections: list[tuple[Path, dict]] = field(default_factory=list)
    results: dict[str, list[tuple[Path, dict]]] = field(default_factory=lambda: defaultdict(list))
    predictors: list[PredictorSet] = field(default_factory=list)
    sweeps: list[tuple[Path, list[dict]]] = field(default_factory=list)
    task_sweeps: list[tuple[Path, list[dict]]] = field(default_factory=list)
    studies: list[tuple[Path, dict]] = field(default_factory=list)  # run_study.py manifests: stage wall times
    missing: list[str] = field(default_factory=list)
    unrecognised: list[str] = field(default_factory=list)


def read_json_file(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def read_csv(path: Path) -> tuple[set[str], list[dict]]:
    """A CSV's column names and rows."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return set(reader.fieldnames or ()), list(reader)


def classify_file(path: Path, inputs: Inputs, predictor_files: dict[tuple[Path, str], list[Path]]) -> bool:
    """Record a file the report knows; False when it is none of them."""
    if path.name == "manifest.json":
        manifest = read_json_file(path)
        if isinstance(manifest, dict) and "kinds" in manifest and "rows_written" in manifest:
            inputs.collections.append((path.parent, manifest))
            return True
        return False
    if PREDICTOR_JSON.fullmatch(path.name):
        if not SEED_DIR.fullmatch(path.parent.name):  # other seeds: their spread is in the canonical JSON
            predictor_files[(path.parent, PREDICTOR_JSON.fullmatch(path.name).group(1))].append(path)
        return True
    if path.suffix == ".json":
        payload = read_json_file(path)
        if isinstance(payload, dict) and payload.get("study") is True and "stages" in payload:
            inputs.studies.append((path, payload))
            return True
        if isinstance(payload, dict) and payload.get("analysis") in ANALYSES:
            inputs.results[payload["analysis"]].append((path, payload))
            return True
        return False
    if path.suffix == ".csv":
        columns, rows = read_csv(path)
        for required, found in ((SWEEP_REQUIRED, inputs.sweeps), (TASKS_REQUIRED, inputs.task_sweeps)):
            if set(required) <= columns:
                found.append((path, rows))
                return True
    return False


def discover(paths: Sequence[Path]) -> Inputs:
    """Recognise every input file; folders are searched recursively."""
    inputs = Inputs()
    predictor_files: dict[tuple[Path, str], list[Path]] = defaultdict(list)
    for path in paths:
        if not path.exists():
            inputs.missing.append(f"input path does not exist: {path}")
            continue
        files = ([path] if not path.is_dir() else
                 sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".json", ".csv")))
        recognised = [f for f in files if classify_file(f, inputs, predictor_files)]
        if not recognised:
            inputs.unrecognised.append(str(path))
    for (directory, block), files in sorted(predictor_files.items()):
        records = sorted(((f, read_json_file(f)) for f in files), key=lambda item: item[1]["layer"])
        summary = directory / f"{block}_summary.csv"
        inputs.predictors.append(PredictorSet(directory, block, records, summary if summary.is_file() else None))
    return inputs


# ------------------------------------------------------------------------------------- formatting
def fmt(value: Any) -> str:
    if value is None or value == "":
        return "n/a"
    if isinstance(value, (float, np.floating)):
        return "n/a" if np.isnan(value) else f"{value:.4f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    return lines + [""]


def by_model(values: dict[str, float]) -> str:
    """'A 0.9300, B 0.7100': one number per model, in the report's model order (collections first, as given)."""
    return ", ".join(f"{model} {fmt(v)}" for model, v in values.items())


def result_source(sources: Sources, path: Path, payload: dict) -> str:
    return sources.add(path, payload.get("provenance"), payload.get("source", {}).get("manifest"))


def figure_lines(paths: Sequence[Path], report_dir: Path) -> list[str]:
    return [f"![{p.stem}]({p.relative_to(report_dir).as_posix()})" for p in paths] + [""]


# ------------------------------------------------------------------------------------- sections
def collections_section(inputs: Inputs, sources: Sources) -> list[str]:
    rows = []
    for directory, m in inputs.collections:
        src = sources.add(directory / "manifest.json", m, str(directory / "manifest.json"))
        cfg, data = m.get("config", {}), m.get("source_data") or {}
        rows.append([model_label(m), m.get("model_type"), m.get("rows_written"), m.get("capacity"),
                     cfg.get("num_layers"), cfg.get("hidden_size"), cfg.get("ffn_dim"), cfg.get("num_heads"),
                     cfg.get("num_kv_heads"), ", ".join(m.get("kinds", [])), m.get("complete"), m.get("dtype"),
                     (m.get("weights") or {}).get("note", "not recorded"),
                     (m.get("tokenizer") or {}).get("position_0", "not recorded"),
                     data.get("path"), (data.get("sha256") or "n/a")[:12], src])
    return table(["model", "model_type", "rows", "capacity", "layers", "d", "ffn", "heads", "kv heads", "kinds",
                  "complete", "dtype", "weights", "position 0", "source data", "sha256", "src"], rows)


def drift_section(results: list[tuple[Path, dict]], sources: Sources) -> list[str]:
    lines = []
    summary_rows, layer_rows = [], []
    k1: dict[tuple[str, str, str], dict[str, float]] = defaultdict(dict)
    max_k = max(r["max_distance"] for _, r in results)
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
        groups = defaultdict(dict)
        for s in r["summary"]:
            groups[(s["kind"], s["space"], s["dims"])][s["k"]] = s["mean_of_layer_means"]
            if s["k"] == 1:
                k1[(s["kind"], s["space"], s["dims"])][model] = s["mean_of_layer_means"]
        summary_rows += [[model, kind, space, dims, *[ks.get(k) for k in range(1, max_k + 1)], src]
                         for (kind, space, dims), ks in sorted(groups.items())]
        layer_rows += [[model, x["kind"], x["layer"], x["space"], x["dims"], x["mean"],
                        *[x[f"p{p}"] for p in PERCENTILES], x["n"], src]
                       for x in r["records"] if x["k"] == 1]
    lines += [""] + [f"- mean cosine at k=1 ({kind}, {space}, {dims} dims; mean over layers of the per-layer mean): "
                     f"{by_model(values)}" for (kind, space, dims), values in sorted(k1.items())]
    lines += ["", "Mean over layers of the per-layer mean cosine, by distance k:", ""]
    lines += table(["model", "kind", "space", "dims", *[f"k={k}" for k in range(1, max_k + 1)], "src"], summary_rows)
    lines += ["Per layer at k=1 (all distances are in each result's drift.csv):", ""]
    lines += table(["model", "kind", "layer l", "space", "dims", "mean", *[f"p{p}" for p in PERCENTILES], "n", "src"],
                   layer_rows)
    return lines


def lookahead_section(results: list[tuple[Path, dict]], sources: Sources) -> list[str]:
    lines = []
    at_distance: dict[tuple[str, int], dict[str, str]] = defaultdict(dict)
    for path, r in results:
        src = result_source(sources, path, r)
        model, distances = r["source"]["model"], r["distances"]
        for j in distances:
            cells = [x["Recall@K"] for x in r["records"] if x["distance"] == j]
            at_distance[(r["block"], j)][model] = f"{fmt(float(np.mean(cells)))} ({len(cells)} layer{'s' * (len(cells) != 1)})"
        lines += [f"**{model}**, {r['block']} labels ({r['label_definition']}), Recall@K by predicted layer l and "
                  f"input distance j (input att_x_(l-j)) [{src}]:", ""]
        lines += table(["layer l", *[f"j={j}" for j in distances], "src"],
                       [[l, *row, src] for l, row in zip(r["layers"], r["matrix"]["Recall@K"])])
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
        lines += table(["layer", *columns, "src"], [[x["layer"], *[x[c] for c in columns], src] for x in r["records"]])
    lines += [f"- mean over layers of {c}: {by_model(values)}" for c, values in means.items()]
    return lines + [""]


def label_sweep_section(results: list[tuple[Path, dict]], sources: Sources) -> list[str]:
    metrics = ("Recall", "Recall@K", "Precision", "True Sparsity", "Classifier Sparsity")
    lines = []
    for path, r in results:
        src = result_source(sources, path, r)
        model = r["source"]["model"]
        lines += [f"**{model}**, MLP predictors with input `{r['input']}`, mean over layers {r['layers']} [{src}]:", ""]
        rows = []
        for spec in r["labels"]:
            trained = [x for x in r["records"] if x["label_spec"] == spec and x["status"] == "trained"]
            statuses = sorted({x["status"] for x in r["records"] if x["label_spec"] == spec})
            rows.append([spec, len(trained), *[np.mean([x[m] for x in trained if x[m] is not None])
                                               if trained else None for m in metrics], "; ".join(statuses), src])
        lines += table(["label", "layers trained", *metrics, "status", "src"], rows)
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


def perplexity_section(sweeps: list[tuple[Path, list[dict]]], sources: Sources, missing: list[str]) -> list[str]:
    lines = []
    for csv_path, rows in sweeps:
        columns = list(rows[0]) if rows else list(SWEEP_REQUIRED)
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
            ratio = float(r["perplexity"]) / base if base else None
            out.append([*(r[c] for c in columns), ratio, src])
        lines += [f"From `{csv_path}`:", ""]
        lines += table([*columns, "ppl / dense ppl", "src"], out)
        lines += against_dense(rows, "dataset", dict(sorted(dense.items())), "perplexity",
                               lambda r: float(r["perplexity"])) + [""]
    return lines


def against_dense(rows: list[dict], group: str, dense: dict[tuple[str, str], Any], metric: str,
                  value: Callable[[dict], Any]) -> list[str]:
    """One sentence per (model, `group`) of `dense`: the dense run's `metric`, then every other run's."""
    lines = []
    for (model, name), base in dense.items():
        others = [r for r in rows if (r["model"], r[group]) == (model, name) and r["mode"] != "dense"]
        lines.append(f"- {model} / {name}: dense {metric} {fmt(base)}; " + (
            "other runs: " + ", ".join(f"{r['mode']} (mlp_topk {fmt(r.get('mlp_topk'))}, att_topk "
                                      f"{fmt(r.get('att_topk'))}) {fmt(value(r))}" for r in others)
            if others else "no other run"))
    return lines


def number(value: str | None) -> float | None:
    return None if value in (None, "") else float(value)


def tasks_section(task_sweeps: list[tuple[Path, list[dict]]], sources: Sources, missing: list[str]) -> list[str]:
    """Downstream accuracy per (model, task, mode, budget), next to the dense model's, with the harness's stderr."""
    lines = []
    for csv_path, rows in task_sweeps:
        dense = {(r["model"], r["task"]): number(r["acc"]) for r in rows if r["mode"] == "dense"}
        out = []
        for i, r in enumerate(rows, start=2):
            result = resolve_manifest(r.get("result_json", ""), csv_path)
            if result is None:
                missing.append(f"{csv_path} line {i}: result {r.get('result_json') or '(none given)'} not found")
                src = sources.add(f"{csv_path} line {i}", None, None)
            else:
                src = sources.add(result, read_json_file(result), str(result))
            acc, base = number(r["acc"]), dense.get((r["model"], r["task"]))
            out.append([r["model"], r["task"], r["mode"], r.get("mlp_topk"), r.get("att_topk"), acc,
                        number(r["acc_stderr"]), number(r.get("acc_norm")), number(r.get("acc_norm_stderr")),
                        None if acc is None or base is None else acc - base, r.get("samples"),
                        r.get("num_fewshot"), src])
        lines += [f"From `{csv_path}`:", ""]
        lines += table(["model", "task", "mode", "mlp_topk", "att_topk", "acc", "acc stderr", "acc_norm",
                        "acc_norm stderr", "acc - dense acc", "samples", "shots", "src"], out)
        lines += against_dense(rows, "task", dense, "acc", lambda r: number(r["acc"])) + [""]
    return lines


def stages_section(studies: list[tuple[Path, dict]], sources: Sources) -> list[str]:
    """Wall time of every stage of the study (the run that did it; a resumed run keeps earlier times)."""
    lines = []
    for path, study in studies:
        src = sources.add(path, study, str(path))
        rows = [[s["model"], s["stage"], "n/a (done before this manifest)" if s["seconds"] is None else
                 f"{s['seconds']:.0f}", "<br>".join(f"`{c}`" for c in s["commands"]) or "n/a", src]
                for s in study["stages"]]
        total = sum(s["seconds"] or 0 for s in study["stages"])
        lines += [f"`{study['command']}` (commit {study['git_commit']}): {total:.0f} s over the stages below.", ""]
        lines += table(["model", "stage", "wall time (s)", "commands", "src"], rows)
    return lines


# ------------------------------------------------------------------------------------- summary
def summary_section(inputs: Inputs, sources: Sources, out_dir: Path, missing: list[str]) -> tuple[list, list]:
    """The first page (one row per model, identical definitions, intervals), its figure and summary.csv; and the
    decomposition tables. Sources are registered first, so the summary's rows carry the lowest ids."""
    recall = [(result_source(sources, path, r), r) for path, r in inputs.results["recall_summary"]]
    drift = [(result_source(sources, path, r), r) for path, r in inputs.results["drift"]]
    sweeps, ppl_keys = [], []
    for csv_path, rows in inputs.sweeps:
        for i, row in enumerate(rows, start=2):
            manifest_path = resolve_manifest(row.get("output_manifest", ""), csv_path)
            manifest = read_json_file(manifest_path) if manifest_path else None
            if not manifest or "per_request" not in manifest.get("perplexity", {}):
                missing.append(f"summary: {csv_path} line {i} has no per-request log-probs in its manifest "
                               f"(rerun the sweep with this version): no interval")
                continue
            sweeps.append(([sources.add(manifest_path, manifest, str(manifest_path))], row, manifest))
            if row["mode"] != "dense":
                ppl_keys.append(ppl_key(row))
    if not (recall or drift or sweeps):
        return (["Missing: no recall_summary.py, drift.py or sweep result was given.", ""],
                ["Missing: no recall_summary.py result was given.", ""])
    models = all_models(inputs)
    summaries = build_summaries(models, recall, drift, sweeps)
    fractions = recall[0][1]["fractions"] if recall else []
    distance = recall[0][1]["distance_fraction"] if recall else None
    lines = summary_tables(summaries, fractions, distance, list(dict.fromkeys(ppl_keys)))
    ratios = budget_curves(summaries, sweeps[0][1]["dataset"]) if sweeps else {}
    figure = plot_summary([r for _, r in recall], [r for _, r in drift], ratios, distance or 0.25,
                          out_dir / "figures")
    csv_path = out_dir / "summary.csv"
    rows = summary_csv_rows(summaries)
    write_csv_atomic(csv_path, rows, list(dict.fromkeys(k for row in rows for k in row)))
    lines += figure_lines([figure], out_dir) + [f"All numbers with their intervals, seed spreads, chance levels and "
                                                 f"sources: `{csv_path.name}`.", ""]
    activations = {model_label(m): (m.get("label_definitions") or {}).get("mlp_label", "not recorded")
                   for _, m in inputs.collections}
    if not recall:
        return lines, ["Missing: no recall_summary.py result was given.", ""]
    sparsity = [(result_source(sources, path, r), r) for path, r in inputs.results["sparsity_stats"]]
    return lines, (decomposition_tables(summaries, fractions, distance, activations)
                   + per_layer_tables(recall, drift, sparsity, distance))


# ------------------------------------------------------------------------------------- the report
def all_models(inputs: Inputs) -> list[str]:
    models = [model_label(m) for _, m in inputs.collections]
    models += [r["source"]["model"] for results in inputs.results.values() for _, r in results]
    models += [s.model for s in inputs.predictors]
    models += [row["model"] for _, rows in inputs.sweeps for row in rows]
    models += [row["model"] for _, rows in inputs.task_sweeps for row in rows]
    return list(dict.fromkeys(models))


def build_report(paths: Sequence[Path], out_dir: Path, notes: Sequence[str] = ()) -> Path:
    """Write <out_dir>/report.md (and figures) from the inputs; returns its path. `notes` are printed first."""
    provenance = base_manifest(kind="report")
    inputs = discover(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = out_dir / "figures"
    models = all_models(inputs)
    colors = model_colors(models)
    for results in inputs.results.values():  # every table and sentence lists the models in one order
        results.sort(key=lambda item: models.index(item[1]["source"]["model"]))
    inputs.predictors.sort(key=lambda s: models.index(s.model))
    sources, missing = Sources(), list(inputs.missing)
    summary_lines, decomposition_lines = summary_section(inputs, sources, out_dir, missing)
    analysis_sections = (("Residual-stream drift", "drift", drift_section),
                         ("Lookahead", "lookahead", lookahead_section),
                         ("Sparsity statistics", "sparsity_stats", sparsity_section),
                         ("Label sensitivity", "label_sweep", label_sweep_section))
    present = {"Collections": bool(inputs.collections), "Predictors": bool(inputs.predictors),
               "Perplexity sweep": bool(inputs.sweeps), "Downstream tasks": bool(inputs.task_sweeps),
               **{title: bool(inputs.results[analysis]) for title, analysis, _ in analysis_sections}}
    body: dict[str, list[str]] = {}
    if present["Collections"]:
        body["Collections"] = collections_section(inputs, sources)
    for title, analysis, make in analysis_sections:
        if present[title]:
            results = inputs.results[analysis]
            body[title] = make(results, sources) + figure_lines(
                plot_results([r for _, r in results], figures, colors), out_dir)
    if present["Predictors"]:
        summaries = {(s.model, s.block): [rec for _, rec in s.records] for s in inputs.predictors}
        body["Predictors"] = predictors_section(inputs.predictors, sources, missing) + figure_lines(
            plot_predictors(summaries, colors, figures), out_dir)
    if present["Perplexity sweep"]:
        body["Perplexity sweep"] = perplexity_section(inputs.sweeps, sources, missing) + figure_lines(
            plot_perplexity([row for _, rows in inputs.sweeps for row in rows], colors, figures), out_dir)
    if present["Downstream tasks"]:
        body["Downstream tasks"] = tasks_section(inputs.task_sweeps, sources, missing) + figure_lines(
            plot_tasks([row for _, rows in inputs.task_sweeps for row in rows], colors, figures), out_dir)
    missing += [f"section '{title}': no input of this kind was given" for title in SECTIONS if not present[title]]

    lines = ["# DejaVu on OPT and Llama: analysis report", "",
             f"Generated by `{provenance['command']}` at commit `{provenance['git_commit']}` on "
             f"{provenance['start_time']}. Every table row names its source [S<n>]: see Sources for the file, "
             f"command, commit and manifest.", ""]
    lines += [f"> **Note.** {note}\n" for note in notes]
    lines += ["## Summary", ""] + summary_lines
    lines += ["## Decomposition", ""] + decomposition_lines
    if inputs.studies:
        lines += ["## Study stages", ""] + stages_section(inputs.studies, sources)
    lines += ["## Inputs", ""]
    lines += [f"- `{p}`" for p in paths]
    lines += [f"- not recognised (no known result inside): `{u}`" for u in inputs.unrecognised]
    lines += ["", "## Definitions", ""] + [f"- **{k}**: {v}" for k, v in DEFINITIONS.items()] + [""]
    for title in SECTIONS:
        lines += [f"## {title}", ""] + body.get(title, ["Missing: no input of this kind was given.", ""])
    lines += ["## Missing", ""] + ([f"- {m}" for m in missing] or ["Nothing missing."]) + [""]
    lines += ["## Sources", ""] + table(["id", "file", "command", "commit", "manifest"],
                                        [[s["id"], s["file"], f"`{s['command']}`", s["commit"], s["manifest"]]
                                         for s in sources.rows])
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    print(f"wrote {report}: {sum(present.values())} of {len(SECTIONS)} sections, {len(sources.rows)} sources, "
          f"{len(missing)} missing items, figures in {figures}")
    return report


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path,
                        help="result folders (searched recursively) or files: collections, analysis JSONs, "
                             "predictor out-dirs, perplexity-sweep and task-sweep CSVs")
    parser.add_argument("--out-dir", type=Path, required=True, help="where report.md and figures/ are written")
    parser.add_argument("--note", action="append", default=[],
                        help="a sentence shown at the top of the report (repeat), e.g. what the models are")
    args = parser.parse_args(argv)
    return build_report(args.inputs, args.out_dir, args.note)


if __name__ == "__main__":
    main()
