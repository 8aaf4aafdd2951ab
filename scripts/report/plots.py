"""Figures of the analysis results, every model overlaid in its own colour (PNG, matplotlib Agg).

Reads the JSONs written by drift.py, lookahead.py and sparsity_stats.py (recognised by their "analysis" key),
and predictor summaries / perplexity and task sweeps when report.py hands them over; report.py calls the same functions.

    python scripts/report/plots.py out/drift/*/drift.json out/lookahead/*/lookahead_mlp.json \\
        out/sparsity/*/sparsity_stats.json out/sparsity/*/label_sweep.json --out-dir out/plots
Writes one PNG per figure into --out-dir and prints their paths.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # lets `python scripts/report/plots.py` run

import numpy as np  # noqa: E402

from scripts.analysis.common import LINE_STYLES, model_colors, new_figure, save_figure  # noqa: E402

ANALYSES = ("drift", "lookahead", "sparsity_stats", "label_sweep", "recall_summary")
MARKERS = ("o", "s", "^", "v", "D", "x", "*", "+")


def model_of(result: dict) -> str:
    return result["source"]["model"]


def finish_axes(ax, integer_x: bool = True) -> None:
    """Legend (when something is labelled) and, for layer or distance axes, integer ticks."""
    from matplotlib.ticker import MaxNLocator
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


# ------------------------------------------------------------------------------------- drift
def drift_variants(records: list[dict]) -> list[tuple[str, str]]:
    return sorted({(r["space"], r["dims"]) for r in records}, key=lambda v: (v[1] != "all", v[0] != "raw"))


def plot_drift(results: Sequence[dict], colors: dict[str, str], out_dir: Path) -> list[Path]:
    """Per kind: (a) mean cosine vs layer at k = 1 with the raw p5-p95 band; (b) mean over layers vs distance k."""
    paths = []
    kinds = sorted({r["kind"] for result in results for r in result["records"]})
    for kind in kinds:
        fig, (by_layer, by_distance) = new_figure(ncols=2)
        for result in results:
            model, records = model_of(result), [r for r in result["records"] if r["kind"] == kind]
            for style, (space, dims) in zip(LINE_STYLES, drift_variants(records)):
                chosen = [r for r in records if (r["space"], r["dims"]) == (space, dims)]
                at1 = sorted((r for r in chosen if r["k"] == 1), key=lambda r: r["layer"])
                label = f"{model} {space}, {dims} dims"
                by_layer.plot([r["layer"] for r in at1], [r["mean"] for r in at1], style, color=colors[model],
                              marker="o", markersize=3, label=label)
                if (space, dims) == ("raw", "all"):
                    by_layer.fill_between([r["layer"] for r in at1], [r["p5"] for r in at1], [r["p95"] for r in at1],
                                          color=colors[model], alpha=0.12, label=f"{model} raw p5-p95")
                ks = sorted({r["k"] for r in chosen})
                by_distance.plot(ks, [np.mean([r["mean"] for r in chosen if r["k"] == k]) for k in ks], style,
                                 color=colors[model], marker="o", markersize=3, label=label)
        by_layer.set(xlabel="layer l", ylabel=f"cosine({kind}_l, {kind}_(l+1))",
                     title=f"{kind}: same-token cosine between consecutive layers (mean)")
        by_distance.set(xlabel="layer distance k", ylabel="cosine, mean over layers of the per-layer mean",
                        title=f"{kind}: cosine(x_l, x_(l+k)) vs distance")
        finish_axes(by_layer)
        finish_axes(by_distance)
        paths.append(save_figure(fig, out_dir / f"drift_{kind}.png"))
    return paths


# ------------------------------------------------------------------------------------- lookahead
def plot_lookahead(results: Sequence[dict], colors: dict[str, str], out_dir: Path) -> list[Path]:
    """Per block: (a) Recall@K (mean over layers) vs input distance; (b) Recall@K vs layer at distance 0 and max."""
    paths = []
    for block in sorted({r["block"] for r in results}):
        fig, (by_distance, by_layer) = new_figure(ncols=2)
        for result in (r for r in results if r["block"] == block):
            model, records = model_of(result), result["records"]
            distances = sorted({r["distance"] for r in records})
            by_distance.plot(distances, [np.mean([r["Recall@K"] for r in records if r["distance"] == j])
                                         for j in distances], "-", marker="o", color=colors[model], label=model)
            for style, j in zip(LINE_STYLES, sorted({distances[0], distances[-1]})):
                cells = sorted((r for r in records if r["distance"] == j), key=lambda r: r["layer"])
                by_layer.plot([r["layer"] for r in cells], [r["Recall@K"] for r in cells], style, marker="o",
                              markersize=3, color=colors[model], label=f"{model}, input att_x_(l-{j})")
        by_distance.set(xlabel="input distance j (predictor input att_x_(l-j))", ylabel="held-out Recall@K",
                        title=f"{block} predictors: Recall@K vs input distance\n"
                              "(mean over the layers l with l - j >= 0)")
        by_layer.set(xlabel="predicted layer l", ylabel="held-out Recall@K",
                     title=f"{block} predictors: Recall@K per layer")
        finish_axes(by_distance)
        finish_axes(by_layer)
        paths.append(save_figure(fig, out_dir / f"lookahead_{block}.png"))
    return paths


# ------------------------------------------------------------------------------------- sparsity statistics
def stat_columns(results: Sequence[dict], prefix: str) -> list[str]:
    return sorted({k for result in results for r in result["records"] for k in r if k.startswith(prefix)},
                  key=lambda k: float(k[len(prefix):].removesuffix("_mass")))


def plot_sparsity(results: Sequence[dict], colors: dict[str, str], out_dir: Path) -> list[Path]:
    """(a) exact-zero and below-threshold fractions, (b) top-f magnitude share, (c) gate < 0, per layer."""
    fig, (zeros, mass, gate) = new_figure(ncols=3, width=5.5)
    for result in results:
        model = model_of(result)
        records = sorted(result["records"], key=lambda r: r["layer"])
        layers = [r["layer"] for r in records]
        for marker, key in zip(MARKERS, ["zero_fraction"] + stat_columns([result], "below_")):
            zeros.plot(layers, [r[key] for r in records], "-", marker=marker, markersize=3, color=colors[model],
                       label=f"{model} {key}")
        for marker, key in zip(MARKERS, stat_columns([result], "mlp_top")):
            mass.plot(layers, [r[key] for r in records], "-", marker=marker, markersize=3, color=colors[model],
                      label=f"{model} {key}")
        if any(r["gate_negative_fraction"] is not None for r in records):
            gate.plot(layers, [r["gate_negative_fraction"] for r in records], "-", marker="o", markersize=3,
                      color=colors[model], label=model)
        else:
            gate.plot([], [], color=colors[model], label=f"{model}: mlp_gate absent")
    zeros.set(xlabel="layer", ylabel="fraction of MLP activations",
              title="MLP activations exactly 0 (zero_fraction) or |y| < t (below_t)")
    mass.set(xlabel="layer", ylabel="share of the token's sum |y|",
             title="share of MLP magnitude in the top fraction f of neurons")
    gate.set(xlabel="layer", ylabel="fraction of gate pre-activations < 0", title="Llama gate < 0 (SiLU negative)")
    for ax in (zeros, mass, gate):
        finish_axes(ax)
    return [save_figure(fig, out_dir / "sparsity_stats.png")]


def plot_label_sweep(results: Sequence[dict], colors: dict[str, str], out_dir: Path) -> list[Path]:
    """Recall and Recall@K (mean over the sweep's layers) for each label definition, bars per model."""
    labels = list(dict.fromkeys(spec for result in results for spec in result["labels"]))
    fig, axes = new_figure(ncols=2)
    width = 0.8 / max(1, len(results))
    for ax, metric in zip(axes, ("Recall", "Recall@K")):
        for i, result in enumerate(results):
            model = model_of(result)
            trained = [[r[metric] for r in result["records"] if r["label_spec"] == spec and r["status"] == "trained"]
                       for spec in labels]
            means = [np.mean(values) if values else np.nan for values in trained]
            ax.bar(np.arange(len(labels)) + i * width, means, width, color=colors[model], label=model)
        ax.set_xticks(np.arange(len(labels)) + width * (len(results) - 1) / 2, labels, rotation=30, fontsize=8)
        ax.set(xlabel="MLP label definition (missing bar: not trained, e.g. mlp_gate absent)",
               ylabel=f"held-out {metric}, mean over layers", title=f"MLP predictor {metric} by label definition")
        finish_axes(ax, integer_x=False)
    return [save_figure(fig, out_dir / "label_sweep.png")]


# ------------------------------------------------------------------------------------- predictors and perplexity
def plot_predictors(summaries: dict[tuple[str, str], list[dict]], colors: dict[str, str], out_dir: Path) -> list[Path]:
    """Per block: Recall and Recall@K of the trained predictors (SPEC §7 JSONs) per layer, per model."""
    paths = []
    for block in sorted({b for _, b in summaries}):
        fig, axes = new_figure(ncols=2)
        for ax, metric in zip(axes, ("Recall", "Recall@K")):
            for (model, b), records in summaries.items():
                if b == block:
                    records = sorted(records, key=lambda r: r["layer"])
                    ax.plot([r["layer"] for r in records], [r[metric] for r in records], "-", marker="o",
                            markersize=3, color=colors[model], label=model)
            ax.set(xlabel="layer", ylabel=f"held-out {metric}", title=f"{block} predictors: {metric} per layer")
            finish_axes(ax)
        paths.append(save_figure(fig, out_dir / f"predictors_{block}.png"))
    return paths


def plot_perplexity(rows: list[dict], colors: dict[str, str], out_dir: Path) -> list[Path]:
    """Perplexity (log scale) vs MLP budget per model and mode, one panel per dataset; dense as horizontal lines."""
    datasets = sorted({row["dataset"] for row in rows})
    fig, axes = new_figure(ncols=len(datasets), width=5.5, height=4.5)
    groups: dict[tuple[str, str, str], list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        ax = axes[datasets.index(row["dataset"])]
        if row["mode"] == "dense":
            ax.axhline(float(row["perplexity"]), color=colors[row["model"]], linewidth=0.8, label=f"{row['model']} dense")
        elif row.get("mlp_topk") not in (None, ""):
            groups[(row["model"], row["dataset"], row["mode"])].append((float(row["mlp_topk"]), float(row["perplexity"])))
    modes = sorted({mode for _, _, mode in groups})
    for (model, dataset, mode), points in sorted(groups.items()):
        points.sort()
        axes[datasets.index(dataset)].plot(*zip(*points), LINE_STYLES[modes.index(mode) % len(LINE_STYLES)], marker="o",
                                           markersize=3, color=colors[model], label=f"{model} {mode}")
    for ax, dataset in zip(axes, datasets):
        ax.set_yscale("log")
        ax.set(xlabel="mlp_topk (count, or fraction when < 1)", ylabel="perplexity (log scale)",
               title=f"{dataset}: sparse inference vs MLP budget")
        finish_axes(ax, integer_x=False)
    return [save_figure(fig, out_dir / "perplexity_sweep.png")]


def budget_of(row: dict) -> float | None:
    """The x of a task-sweep row: its MLP budget, or its attention budget when the MLP stays dense."""
    for key in ("mlp_topk", "att_topk"):
        if row.get(key) not in (None, "", "dense"):
            return float(row[key])
    return None


def plot_tasks(rows: list[dict], colors: dict[str, str], out_dir: Path) -> list[Path]:
    """Downstream accuracy (task_sweep.py rows) vs budget, one panel per task, error bars = the harness's standard
    error; dense as a horizontal line with its +-1 standard error band."""
    tasks = list(dict.fromkeys(row["task"] for row in rows))
    fig, axes = new_figure(ncols=len(tasks), width=5.0, height=4.0)
    groups: dict[tuple[str, str, str], list[tuple[float, float, float]]] = defaultdict(list)
    for row in rows:
        if row.get("acc") in (None, ""):
            continue
        ax, acc = axes[tasks.index(row["task"])], float(row["acc"])
        stderr = float(row["acc_stderr"]) if row.get("acc_stderr") not in (None, "") else 0.0
        if row["mode"] == "dense":
            ax.axhline(acc, color=colors[row["model"]], linewidth=0.8, label=f"{row['model']} dense")
            ax.axhspan(acc - stderr, acc + stderr, color=colors[row["model"]], alpha=0.1)
        elif budget_of(row) is not None:
            groups[(row["model"], row["task"], row["mode"])].append((budget_of(row), acc, stderr))
    modes = sorted({mode for _, _, mode in groups})
    for (model, task, mode), points in sorted(groups.items()):
        x, y, err = zip(*sorted(points))
        axes[tasks.index(task)].errorbar(x, y, yerr=err, fmt=LINE_STYLES[modes.index(mode) % len(LINE_STYLES)],
                                         marker="o", markersize=3, capsize=2, color=colors[model],
                                         label=f"{model} {mode}")
    for ax, task in zip(axes, tasks):
        ax.set(xlabel="mlp_topk (att_topk when the MLP is dense); fraction when < 1", ylabel="acc (harness)",
               title=f"{task}: accuracy vs budget")
        finish_axes(ax, integer_x=False)
    return [save_figure(fig, out_dir / "tasks_sweep.png")]


def plot_results(results: Sequence[dict], out_dir: Path, colors: dict[str, str] | None = None) -> list[Path]:
    """Every figure the given analysis results allow."""
    by_analysis: dict[str, list[dict]] = defaultdict(list)
    for result in results:
        by_analysis[result["analysis"]].append(result)
    colors = colors or model_colors([model_of(r) for r in results])
    drawers = {"drift": plot_drift, "lookahead": plot_lookahead, "sparsity_stats": plot_sparsity,
               "label_sweep": plot_label_sweep}
    return [path for analysis, drawer in drawers.items() if by_analysis[analysis]
            for path in drawer(by_analysis[analysis], colors, out_dir)]


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path,
                        help=f"result JSONs of the analysis scripts (analysis in {ANALYSES})")
    parser.add_argument("--out-dir", type=Path, required=True, help="where the PNGs are written")
    args = parser.parse_args(argv)
    results = []
    for path in args.results:
        if not path.is_file():
            raise FileNotFoundError(f"missing result file: {path}")
        result = json.loads(path.read_text())
        if result.get("analysis") not in ANALYSES:
            raise ValueError(f"{path}: not a result of drift.py, lookahead.py or sparsity_stats.py "
                             f"(analysis={result.get('analysis')!r})")
        results.append(result)
    paths = plot_results(results, args.out_dir)
    print(f"wrote {len(paths)} figures to {args.out_dir}: {', '.join(p.name for p in paths)}")
    return paths


if __name__ == "__main__":
    main()
