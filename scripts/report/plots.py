"""Figures of the analysis results (PNG, matplotlib Agg), every line styled by scripts.analysis.common.series_style.

Reads the JSONs written by drift.py, lookahead.py and sparsity_stats.py (recognised by their "analysis" key),
and predictor summaries / perplexity and task sweeps when report.py hands them over; report.py calls the same
functions. A figure that shows sparse modes draws one panel per model (a mode keeps its colour, line and marker in
every figure); one that overlays models gives each model its colour and each series kind its line and marker. At
most MAX_SERIES series share a panel, legends sit outside the data, intervals are bands.

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

from scripts.analysis.common import (MAX_SERIES, legend_outside, model_colors, new_figure, plot_series,  # noqa: E402
                                     save_figure)
from scripts.report.inputs import ANALYSES  # noqa: E402

MARKERS = ("o", "s", "^", "v", "D", "x", "*", "+")
SPARSE_MODES = ("oracle", "predictor", "random", "static", "gate")


def model_of(result: dict) -> str:
    return result["source"]["model"]


def integer_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def chunks(items: Sequence, size: int) -> list[list]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)] or [[]]


BLOCK_TITLES = {"both": "MLP and attention sparse", "both groups": "MLP and attention sparse (whole kv groups)",
                "mlp": "MLP sparse, attention dense", "att": "attention sparse, MLP dense",
                "att groups": "attention sparse in whole kv groups, MLP dense"}


# ------------------------------------------------------------------------------------- drift
def drift_series(records: list[dict], space: str, dims: str) -> dict[str, list[tuple[int, float, dict]]]:
    """pairing -> (layer, mean cosine, record) at k = 1: same-token (the records of `space`), cross-token (their
    cross_token_mean, where drift.py drew partners) and centred (the same-token records of '<space> centred')."""
    at1 = sorted((r for r in records if r["k"] == 1 and r["dims"] == dims), key=lambda r: r["layer"])
    series = {"same-token": [(r["layer"], r["mean"], r) for r in at1 if r["space"] == space],
              "cross-token": [(r["layer"], r["cross_token_mean"], r) for r in at1
                              if r["space"] == space and r.get("cross_token_mean") is not None],
              "centred": [(r["layer"], r["mean"], r) for r in at1 if r["space"] == f"{space} centred"]}
    return {pairing: points for pairing, points in series.items() if points}


def plot_drift(results: Sequence[dict], colors: dict[str, str], out_dir: Path) -> list[Path]:
    """Per kind: the mean cosine at k = 1 per layer l >= 1, raw and normed in separate panels (rows: all dims, then
    without the massive dims), one colour per model and one line per pairing (same-token, cross-token, centred); the
    p5-p95 band of the same-token raw cosine; the mean over layers l >= 1 against the distance k. Layer 0 (the
    embedding against the first block's output) is left out of the lines and given in the legend."""
    paths = []
    kinds = sorted({r["kind"] for result in results for r in result["records"]})
    for kind in kinds:
        records = {model_of(result): [r for r in result["records"] if r["kind"] == kind] for result in results}
        pairings = {p for rs in records.values() for space in ("raw", "normed") for p in drift_series(rs, space, "all")}
        dims_sets = [d for d in ("all", "without_massive") if any(r["dims"] == d for rs in records.values()
                                                                  for r in rs)]
        groups = chunks(list(records), max(1, MAX_SERIES // max(1, len(pairings))))
        rows = [(dims, group) for dims in dims_sets for group in groups]
        for row, (dims, group) in enumerate(rows):  # one figure of three panels each
            fig, axes = new_figure(ncols=3, width=4.6, height=3.6)
            panels = dict(zip(("raw", "normed", "distance"), axes))
            for model in group:
                for space in ("raw", "normed"):
                    for pairing, points in drift_series(records[model], space, dims).items():
                        shown = [(layer, mean, r) for layer, mean, r in points if layer >= 1]
                        layer0 = [f"{mean:.3f}" for layer, mean, _ in points if layer == 0]
                        band = pairing == "same-token" and space == "raw"
                        if shown:
                            plot_series(panels[space], [p[0] for p in shown], [p[1] for p in shown], pairing,
                                        f"{model} {pairing}" + (f" (layer 0: {layer0[0]})" if layer0 else ""),
                                        color=colors[model], low=[p[2]["p5"] for p in shown] if band else None,
                                        high=[p[2]["p95"] for p in shown] if band else None)
                chosen = [r for r in records[model] if (r["space"], r["dims"]) == ("raw", dims) and r["layer"] >= 1]
                ks = sorted({r["k"] for r in chosen})
                plot_series(panels["distance"], ks, [np.mean([r["mean"] for r in chosen if r["k"] == k]) for k in ks],
                            "same-token", model, color=colors[model])
            where = "all dims" if dims == "all" else "without the massive dims"
            for space in ("raw", "normed"):
                ax = panels[space]
                ax.set(xlabel="layer l (from 1; layer 0, the embedding's step, in the legend)",
                       ylabel=f"cosine({kind}_l, {kind}_(l+1))")
                ax.set_title(f"{kind}, {space}, {where}: k = 1" + (" (band: p5-p95)" if space == "raw" else ""),
                             fontsize=9)
                integer_ticks(ax)
                legend_outside(ax)
            ax = panels["distance"]
            ax.set(xlabel="layer distance k (layers)", ylabel="same-token cosine, raw\n(mean over layers l >= 1)")
            ax.set_title(f"{kind}, {where}: cosine(x_l, x_(l+k))", fontsize=9)
            integer_ticks(ax)
            legend_outside(ax)
            suffix = ("" if dims == "all" else "_without_massive") + (f"_{row}" if len(groups) > 1 else "")
            paths.append(save_figure(fig, out_dir / f"drift_{kind}{suffix}.png"))
    return paths


# ------------------------------------------------------------------------------------- lookahead
def plot_lookahead(results: Sequence[dict], colors: dict[str, str], out_dir: Path) -> list[Path]:
    """Per block: (a) Recall@K (mean over layers) vs input distance; (b) Recall@K per layer with DejaVu's input and
    the farthest one, one colour per model."""
    paths = []
    for block in sorted({r["block"] for r in results}):
        fig, (by_distance, by_layer) = new_figure(ncols=2, width=5.0, height=3.6)
        wiring = 0 if block == "mlp" else 1  # DejaVu's lookahead: MLP from att_x_l, attention from att_x_(l-1)
        for result in (r for r in results if r["block"] == block):
            model, records = model_of(result), result["records"]
            distances = sorted({r["distance"] for r in records})
            plot_series(by_distance, distances, [np.mean([r["Recall@K"] for r in records if r["distance"] == j])
                                                 for j in distances], "predictor", model, color=colors[model])
            for j in sorted({min(wiring, distances[-1]), distances[-1]}):
                cells = sorted((r for r in records if r["distance"] == j), key=lambda r: r["layer"])
                kind = "predictor" if j == wiring else "same-layer" if j == 0 else "earlier input"
                plot_series(by_layer, [r["layer"] for r in cells], [r["Recall@K"] for r in cells], kind,
                            f"{model}, input att_x_(l-{j})", color=colors[model])
        by_distance.set(xlabel="input distance j (layers; predictor input att_x_(l-j))", ylabel="held-out Recall@K",
                        title=f"{block} predictors: Recall@K vs input distance\n"
                              "(mean over the layers l with l - j >= 0)")
        by_layer.set(xlabel="predicted layer l", ylabel="held-out Recall@K",
                     title=f"{block} predictors: Recall@K per layer")
        for ax in (by_distance, by_layer):
            ax.set_ylim(0, 1.05)
            integer_ticks(ax)
            legend_outside(ax)
        paths.append(save_figure(fig, out_dir / f"lookahead_{block}.png"))
    return paths


# ------------------------------------------------------------------------------------- sparsity statistics
def stat_columns(results: Sequence[dict], prefix: str) -> list[str]:
    return sorted({k for result in results for r in result["records"] for k in r if k.startswith(prefix)},
                  key=lambda k: float(k[len(prefix):].removesuffix("_mass")))


def plot_sparsity(results: Sequence[dict], colors: dict[str, str], out_dir: Path) -> list[Path]:
    """One figure per model: (a) exact-zero and below-threshold fractions, (b) top-f magnitude share, (c) gate < 0,
    per layer."""
    paths = []
    for result in results:
        fig, (zeros, mass, gate) = new_figure(ncols=3, width=4.8, height=3.4)
        model = model_of(result)
        records = sorted(result["records"], key=lambda r: r["layer"])
        layers = [r["layer"] for r in records]
        for ax, keys in ((zeros, ["zero_fraction"] + stat_columns([result], "below_")),
                         (mass, stat_columns([result], "mlp_top"))):
            for marker, key in zip(MARKERS, keys[:MAX_SERIES]):
                ax.plot(layers, [r[key] for r in records], "-", marker=marker, markersize=3, color=colors[model],
                        label=key)
        if any(r["gate_negative_fraction"] is not None for r in records):
            gate.plot(layers, [r["gate_negative_fraction"] for r in records], "-", marker="o", markersize=3,
                      color=colors[model], label="gate < 0")
        else:
            gate.text(0.5, 0.5, "mlp_gate not collected\n(OPT has no gate)", ha="center", va="center",
                      transform=gate.transAxes)
        zeros.set(xlabel="layer", ylabel="fraction of MLP activations",
                  title=f"{model}: exactly 0 (zero_fraction) or |y| < t (below_t)")
        mass.set(xlabel="layer", ylabel="share of the token's sum |y|",
                 title=f"{model}: MLP magnitude in the top fraction f")
        gate.set(xlabel="layer", ylabel="fraction of gate pre-activations < 0", title=f"{model}: gate < 0")
        for ax in (zeros, mass, gate):
            ax.set_ylim(0, 1.05)
            integer_ticks(ax)
            legend_outside(ax)
        paths.append(save_figure(fig, out_dir / f"sparsity_stats_{model}.png"))
    return paths


def plot_label_sweep(results: Sequence[dict], colors: dict[str, str], out_dir: Path) -> list[Path]:
    """Recall and Recall@K for each label definition, bars per model, beside the share of neurons each label marks
    active (its K, or its mean active count, over the MLP width): a label that marks most neurons active is easy to
    recall."""
    labels = list(dict.fromkeys(spec for result in results for spec in result["labels"]))
    fig, axes = new_figure(ncols=3, width=4.8, height=3.8)
    width = 0.8 / max(1, len(results))
    where = {model_of(r): (f"layer {r['layers'][0]}" if len(r["layers"]) == 1 else "mean over layers")
             for r in results}
    for ax, metric in zip(axes, ("Recall", "Recall@K", "active share")):
        for i, result in enumerate(results):
            model, ffn = model_of(result), result["source"]["dims"]["ffn_dim"]
            trained = [[r for r in result["records"] if r["label_spec"] == spec and r["status"] == "trained"]
                       for spec in labels]
            means = [np.mean([r["True Sparsity"] / ffn if metric == "active share" else r[metric] for r in rs])
                     if rs else np.nan for rs in trained]
            ax.bar(np.arange(len(labels)) + i * width, means, width, color=colors[model],
                   label=f"{model} ({where[model]})")
        ax.set_xticks(np.arange(len(labels)) + width * (len(results) - 1) / 2, labels, rotation=30, fontsize=8)
        ax.set_ylim(0, 1.05)
        ylabel = "share of neurons labelled active" if metric == "active share" else f"held-out {metric}"
        title = ("labelled active: (K or mean active count) / ffn" if metric == "active share" else
                 f"MLP predictor: {metric} by label")
        ax.set(xlabel="MLP label definition (no bar: not trained)", ylabel=ylabel, title=title)
        legend_outside(ax)
    return [save_figure(fig, out_dir / "label_sweep.png")]


# ------------------------------------------------------------------------------------- predictors and sweeps
def plot_predictors(summaries: dict[tuple[str, str], list[dict]], colors: dict[str, str], out_dir: Path) -> list[Path]:
    """Per block: Recall and Recall@K of the trained predictors (SPEC §7 JSONs) per layer, per model, with the
    uniform chance of Recall@K (K / units) where the records give the width."""
    paths = []
    for block in sorted({b for _, b in summaries}):
        fig, axes = new_figure(ncols=2, width=5.0, height=3.6)
        for ax, metric in zip(axes, ("Recall", "Recall@K")):
            for (model, b), records in summaries.items():
                if b != block:
                    continue
                records = sorted(records, key=lambda r: r["layer"])
                plot_series(ax, [r["layer"] for r in records], [r[metric] for r in records], "predictor", model,
                            color=colors[model])
                dims = records[0].get("data", {}).get("dims", {})
                units = dims.get("ffn_dim" if block == "mlp" else "num_heads")
                if metric == "Recall@K" and units:
                    plot_series(ax, [r["layer"] for r in records], [r["K"] / units for r in records],
                                "uniform chance", f"{model} uniform chance", color=colors[model])
            ax.set_ylim(0, 1.05)
            ax.set(xlabel="layer", ylabel=f"held-out {metric}", title=f"{block} predictors: {metric} per layer")
            integer_ticks(ax)
            legend_outside(ax)
        paths.append(save_figure(fig, out_dir / f"predictors_{block}.png"))
    return paths


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
