"""The paper's figures: one style (scripts/analysis/common.py), at most four panels each, PNG and PDF, shared axes
across models.

  F1  contextual sparsity per layer: the share of each token's |activation| mass (MLP) / head-norm mass (attention)
      held by its true top-K units, per layer (sparsity_stats.py), every model on one axis of relative depth;
  F2  Recall@K per layer, every layer: the per-budget lookahead predictors (their training JSON summaries) as lines,
      the baselines where the summary scored them as points (never joined across missing layers), uniform chance;
  F3  quality against the kept fraction of the block's units, one figure per model (perplexity ratio; task mean),
      every mode, the same y axis for every model;
  F4  per-layer cost: one layer sparse at a time (a layer_sweep.csv), log-perplexity increase per layer and mode.
The speed figure (F5) is scripts/report/speed.py's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from scripts.analysis.common import (MAX_PANELS, figure_legend, log_y, new_figure, plot_series, reference_line,
                                     save_figure, series_style)
from scripts.report.headline import (BLOCK_NAMES, BLOCKS, MODES, PERPLEXITY_RULES, UNIT_NAMES, headline_tasks,
                                     kept_fraction, mean_over, task_chance, task_scores)
from scripts.report.summary import ModelSummary

CAPTIONS: dict[str, str] = {}  # figure file name -> caption, for the gallery README


def caption(path: Path, text: str) -> Path:
    CAPTIONS[path.name] = text
    return path


def relative_depth(layer: int, layers: int) -> float:
    return layer / max(1, layers - 1)


# ------------------------------------------------------------------------------------- F1
def shown_fractions(results: Sequence[dict], wanted: Sequence[float] = (0.1, 0.25, 0.5)) -> list[float]:
    """The recorded top-f fractions closest to each wanted one (sparsity_stats.py --fractions), each once."""
    recorded = sorted({float(k[len("mlp_top"):-len("_mass")]) for r in results for rec in r["records"] for k in rec
                       if k.startswith("mlp_top") and k.endswith("_mass")})
    return sorted({min(recorded, key=lambda f: abs(f - w)) for w in wanted}) if recorded else []


def plot_contextual_sparsity(results: Sequence[dict], colors: dict[str, str], out_dir: Path) -> list[Path]:
    """F1: per block a panel, per model a colour, per fraction f a line style: the mean share of a token's magnitude
    held by its top fraction f of units, against relative depth."""
    fractions = shown_fractions(results)
    if not results or not fractions:
        return []
    fig, axes = new_figure(ncols=2, width=4.6, height=3.4, sharey=True)
    styles = ("-", "--", ":")
    for ax, (prefix, title) in zip(axes, (("mlp_top", "MLP: |activation| mass"), ("att_top", "attention: head-norm "
                                                                                             "mass"))):
        for result in results:
            model, records = result["source"]["model"], sorted(result["records"], key=lambda r: r["layer"])
            layers = result["source"]["dims"]["num_layers"]
            for style, f in zip(styles, fractions):
                key = f"{prefix}{f:g}_mass"
                points = [(relative_depth(r["layer"], layers), r[key]) for r in records if r.get(key) is not None]
                if points:
                    ax.plot(*zip(*points), style, color=colors[model], label=f"{model}, top {f:g}")
            for f, style in zip(fractions, styles):
                ax.axhline(f, color="#7f7f7f", linestyle=style, linewidth=0.6)  # no context: f of the mass
        ax.set(xlabel="relative depth (layer / last layer)", title=f"{title} held by the true top-K", ylim=(0, 1.02))
    axes[0].set_ylabel("share of the token's mass (grey: uniform, = f)")
    figure_legend(fig, axes)
    return [caption(save_figure(fig, out_dir / "F1_contextual_sparsity.png"),
                    "F1. Contextual sparsity per layer: the share of each token's |activation| (MLP) or head-norm "
                    "(attention) mass held by its top fraction f of units (sparsity_stats.py), against relative "
                    "depth; grey lines: the share f that a flat distribution gives.")]


# ------------------------------------------------------------------------------------- F2
def plot_recall_by_layer(layer_recall: dict[str, dict[str, list[tuple[int, float]]]],
                         baselines: dict[str, dict[str, dict[str, list[tuple[int, float]]]]],
                         chance: dict[str, dict[str, float]], layers: dict[str, int], colors: dict[str, str],
                         k: float, out_dir: Path) -> list[Path]:
    """F2 at one K: per block a panel; per model its colour: the predictor on every layer (line), each baseline at the
    layers it was scored on (markers only), uniform chance K / units (dotted)."""
    if not layer_recall:
        return []
    fig, axes = new_figure(ncols=2, width=4.6, height=3.4, sharey=True)
    for ax, block in zip(axes, ("mlp", "att")):
        for model, per_block in layer_recall.items():
            points = per_block.get(block, [])
            if points:
                ax.plot([relative_depth(l, layers[model]) for l, _ in points], [v for _, v in points], "-",
                        color=colors[model], label=f"{model} predictor (every layer)")
            for name, by_block in baselines.get(model, {}).items():
                shown = by_block.get(block, [])
                if shown:
                    style = series_style(name, colors[model])
                    ax.plot([relative_depth(l, layers[model]) for l, _ in shown], [v for _, v in shown],
                            linestyle="none", marker=style["marker"] or "o", markersize=5, color=colors[model],
                            label=f"{model} {name} (layers {', '.join(str(l) for l, _ in shown)})")
            if block in chance.get(model, {}):
                ax.axhline(chance[model][block], color=colors[model], linestyle=":", linewidth=0.8,
                           label=f"{model} uniform chance")
        ax.set(xlabel="relative depth (layer / last layer)", ylim=(0, 1.02),
               title=f"{'MLP' if block == 'mlp' else 'attention'}: held-out Recall@K, K = {k:g}")
    axes[0].set_ylabel("Recall@K (oracle: 1)")
    figure_legend(fig, axes)
    return [caption(save_figure(fig, out_dir / "F2_recall_by_layer.png"),
                    f"F2. Held-out Recall@K at K = {k:g} of the units, per layer: DejaVu's lookahead predictor trained "
                    "at that budget on every layer (line); the baselines at the layers the summary scored them "
                    "(points, not joined); uniform chance K / units (dotted).")]


# ------------------------------------------------------------------------------------- F3
def blocks_of(summary: ModelSummary, dataset: str) -> list[str]:
    return [b for b in BLOCKS if any(ds == dataset and budget.panel == b for ds, _, budget in summary.ppl)]


RATIO_TOP = 100.0  # F3's perplexity-ratio axis ends here: the headline reads ratios near 1, collapsed runs leave


def ratio_limits(summaries: Sequence[ModelSummary], dataset: str) -> tuple[float, float]:
    values = [c.interval.value for s in summaries for (ds, _, _), c in s.ppl.items()
              if ds == dataset and c.interval is not None]
    return (min(0.95, min(values, default=1) * 0.9), min(RATIO_TOP, max(values, default=2) * 1.3))


def plot_quality(summaries: Sequence[ModelSummary], dataset: str, task_rows: Sequence[dict], out_dir: Path
                 ) -> list[Path]:
    """F3, one figure per model and quantity: the perplexity ratio (log) and the headline task mean against the
    kept fraction of each block's units, a panel per block (at most four), every mode; one y axis for all models."""
    paths = []
    low, high = ratio_limits(summaries, dataset)
    for s in summaries:
        blocks = blocks_of(s, dataset)[:MAX_PANELS]
        if not blocks:
            continue
        fig, axes = new_figure(ncols=len(blocks), width=3.6, height=3.2, sharey=True)
        for ax, block in zip(axes, blocks):
            for mode in MODES:
                points = sorted(((x, c.interval) for (ds, m, b), c in s.ppl.items()
                                 if ds == dataset and m == mode and b.panel == block and c.interval is not None
                                 and (x := kept_fraction(b, block, s.dims)) is not None), key=lambda p: p[0])
                if points:
                    plot_series(ax, [x for x, _ in points], [i.value for _, i in points], mode, mode,
                                low=[i.low for _, i in points], high=[i.high for _, i in points])
            reference_line(ax, 1.0, "dense", "dense")
            for rule in PERPLEXITY_RULES:
                ax.axhline(rule, color="#7f7f7f", linestyle=(0, (1, 3)), linewidth=0.6)
            log_y(ax)
            ax.set_ylim(low, high)
            ax.set(xlabel=f"kept fraction of {UNIT_NAMES[block].split(' (')[0]}", title=BLOCK_NAMES[block])
        axes[0].set_ylabel(f"{dataset} perplexity / dense (log)")
        figure_legend(fig, axes)
        fig.suptitle(s.model, fontsize=9)
        paths.append(caption(save_figure(fig, out_dir / f"F3_perplexity_{s.model}.png"),
                             f"F3. {s.model}: {dataset} perplexity / dense perplexity against the kept fraction of "
                             "each block's units, every mode (bands: 95% bootstrap over requests, paired with dense); "
                             "dotted: the 1.01 and 1.05 rules of the headline table; ratios above "
                             f"{RATIO_TOP:g} leave the top. The same y axis for every model."))
        paths += plot_task_mean(s, dataset, task_rows, blocks, out_dir)
    return paths


def plot_task_mean(s: ModelSummary, dataset: str, task_rows: Sequence[dict], blocks: Sequence[str], out_dir: Path
                   ) -> list[Path]:
    scores = task_scores(task_rows, s.model)
    dense = scores.get(("dense", None), {})
    tasks, _ = headline_tasks(dense)
    dense_mean = mean_over(dense, tasks)
    shown = [b for b in blocks if any(m != "dense" and budget is not None and budget.panel == b
                                      for m, budget in scores)]
    if dense_mean is None or not shown:
        return []
    fig, axes = new_figure(ncols=len(shown), width=3.6, height=3.2, sharey=True)
    chance = sum(task_chance(t) or 0.0 for t in tasks) / len(tasks)
    for ax, block in zip(axes, shown):
        for mode in MODES:
            points = sorted((x, mean) for (m, b), by_task in scores.items()
                            if m == mode and b is not None and b.panel == block
                            and (mean := mean_over(by_task, tasks)) is not None
                            and (x := kept_fraction(b, block, s.dims)) is not None)
            if points:
                plot_series(ax, *zip(*points), mode, mode)
        reference_line(ax, dense_mean, "dense", f"dense {dense_mean:.3f}")
        reference_line(ax, chance, "uniform chance", f"uniform chance {chance:.3f}")
        ax.set(xlabel=f"kept fraction of {UNIT_NAMES[block].split(' (')[0]}", title=BLOCK_NAMES[block], ylim=(0, 1))
    axes[0].set_ylabel(f"task mean over {len(tasks)} tasks")
    figure_legend(fig, axes)
    fig.suptitle(s.model, fontsize=9)
    return [caption(save_figure(fig, out_dir / f"F3_tasks_{s.model}.png"),
                    f"F3. {s.model}: mean accuracy over the {len(tasks)} headline tasks ({', '.join(tasks)}: those "
                    "whose dense accuracy is more than 2 standard errors from chance) against the kept fraction, "
                    "every mode; dense and uniform chance as lines.")]


# ------------------------------------------------------------------------------------- F4
def plot_layer_cost(rows: Sequence[dict], out_dir: Path) -> list[Path]:
    """F4, one figure per model: per block a panel, the log-perplexity increase with only layer l sparse, per mode."""
    paths = []
    for model in dict.fromkeys(r["model"] for r in rows):
        chosen = [r for r in rows if r["model"] == model and r["layer"] not in ("", "all")]
        blocks = [b for b in BLOCKS if any(r["block"] == b for r in chosen)][:MAX_PANELS]
        if not blocks:
            continue
        fig, axes = new_figure(ncols=len(blocks), width=4.2, height=3.2, sharey=True)
        for ax, block in zip(axes, blocks):
            for mode in MODES:
                points = sorted((int(r["layer"]), float(r["log_increase"])) for r in chosen
                                if r["block"] == block and r["mode"] == mode)
                if points:
                    plot_series(ax, *zip(*points), mode, mode)
            ax.axhline(0, color="black", linewidth=0.6)
            ax.set(xlabel="the one sparse layer", title=f"{BLOCK_NAMES[block]} at {chosen[0]['budget']}")
        axes[0].set_ylabel("log perplexity - log dense")
        figure_legend(fig, axes)
        fig.suptitle(model, fontsize=9)
        paths.append(caption(save_figure(fig, out_dir / f"F4_layer_cost_{model}.png"),
                             f"F4. {model}: the cost of making one layer sparse, every other layer dense "
                             "(log-perplexity increase over dense), per layer and mode."))
    return paths


def gallery(paths: Sequence[Path], out_dir: Path) -> Path:
    """figures/README.md: every figure with its caption and its PDF."""
    lines = ["# Figures", "", "Each figure is a PNG with a PDF of the same name beside it, made by "
             "scripts/report/report.py from the inputs the report lists.", ""]
    for path in paths:
        lines += [f"## {path.stem}", "", f"![{path.stem}]({path.name}) ([PDF]({path.with_suffix('.pdf').name}))", "",
                  CAPTIONS.get(path.name, "See the report section that shows it."), ""]
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "README.md"
    target.write_text("\n".join(lines))
    return target

