"""The report's "what it buys" piece (issue 23): the accuracy cost from the perplexity sweep against the decode speed
measured by scripts/bench/bench_sparse_decode.py, per model, mode and budget.

`speed_section(sweep_rows, bench, figures_dir, report_dir)` returns markdown lines (no heading) and draws one figure,
speedup against perplexity ratio per mode. A sweep row is matched to the bench by model name (`bench_model_of` maps
the sweep's names to the bench's; by default a case-insensitive equality after any hub owner) and by the kept counts
(mlp_kept, att_kept), so a budget given as a count or as a fraction finds the same row. Speed by mode: predictor
rows take the bench's predictor steps (their own cost counted); every other mode the mask-given steps (the kernels
alone): exact for static and random masks, which cost nothing to make, a bound for oracle and gate, whose masks
need the dense activations they would skip.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence

from scripts.analysis.common import (legend_outside, log_axis, model_colors, new_figure, plot_series, reference_line,
                                     save_figure)

BOUND_MODES = {"oracle": "its masks need the dense activations", "gate": "it needs the exact gate pre-activation"}
MISSING = (None, "", "n/a", "dense")


def is_bench(payload: Any) -> bool:
    """Whether a JSON is bench_sparse_decode.py's output."""
    return isinstance(payload, dict) and {"models", "ceilings", "settings", "timing"} <= set(payload) and all(
        "decode" in m for m in payload["models"].values())


def kept(value: Any) -> Optional[int]:
    return None if value in MISSING else int(float(value))


def default_bench_model(name: str, bench_models: Sequence[str]) -> Optional[str]:
    short = name.rsplit("/", 1)[-1].lower()
    return next((m for m in bench_models if m.lower() == short), None)


def bench_rows(bench: dict, model: str, batch: int, mode: str, masks: str) -> dict:
    """(mlp_kept, att_kept) -> row of one model, batch, bench mode and mask kind."""
    return {(r["mlp_kept"], r["att_kept"]): r for r in bench["models"][model]["decode"]
            if r["batch"] == batch and r["mode"] == mode and r["masks"] == masks}


def speed_of(bench: dict, model: str, batch: int, sweep_mode: str, key: tuple) -> tuple[Optional[dict], str]:
    """The bench row that prices a sweep row, and what it is."""
    if key == (None, None):
        return bench_rows(bench, model, batch, "dense", "n/a").get(key), "dense"
    if sweep_mode == "predictor":
        return bench_rows(bench, model, batch, "predictor", "predicted").get(key), "predictor"
    masks = "one" if batch == 1 else "independent"
    return bench_rows(bench, model, batch, "given", masks).get(key), f"mask-given ({masks})"


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return (["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
            + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows] + [""])


def speed_table(bench: dict, model: str, source: str) -> list[list]:
    """Per batch and budget: mask-given and predictor speedups, the union, the predictor's share, the floor."""
    m = bench["models"][model]
    rows = []
    for batch in sorted({r["batch"] for r in m["decode"]}):
        dense = bench_rows(bench, model, batch, "dense", "n/a").get((None, None))
        masks = "one" if batch == 1 else "independent"
        given = bench_rows(bench, model, batch, "given", masks)
        shared = bench_rows(bench, model, batch, "given", "shared")
        predicted = bench_rows(bench, model, batch, "predictor", "predicted")
        for key in sorted(given, key=lambda k: (k[0] or 0, k[1] or 0)):
            g, p = given[key], predicted.get(key)
            floor_speedup = dense["floor_us"] / g["floor_us"] if dense else None
            rows.append([model, batch, g["mlp_fraction"], g["att_fraction"], g["tokens_per_s"],
                         g.get("speedup_vs_dense"), shared[key].get("speedup_vs_dense") if key in shared else None,
                         None if p is None else p["tokens_per_s"], None if p is None else p.get("speedup_vs_dense"),
                         None if p is None else p.get("predictor_share"), g["mlp_union_fraction"], floor_speedup,
                         g["floor_gap_x"], source])
    return rows


def batch_lines(bench: dict, model: str) -> list[str]:
    """How the mask-given speedup of each MLP-only budget shrinks from batch 1 to the largest batch."""
    m = bench["models"][model]
    batches = sorted({r["batch"] for r in m["decode"]})
    if len(batches) < 2:
        return []
    first, last = batches[0], batches[-1]
    one, independent = bench_rows(bench, model, first, "given", "one"), bench_rows(bench, model, last, "given",
                                                                                  "independent")
    shared = bench_rows(bench, model, last, "given", "shared")
    parts = []
    for key in sorted(k for k in one if k[1] is None and k in independent):
        union = independent[key]["mlp_union_fraction"]
        parts.append(f"MLP {one[key]['mlp_fraction']}: {fmt(one[key].get('speedup_vs_dense'))}x at batch {first}, "
                     f"{fmt(independent[key].get('speedup_vs_dense'))}x at batch {last} with independent masks "
                     f"(union {fmt(union)} of the neurons)"
                     + (f", {fmt(shared[key].get('speedup_vs_dense'))}x with one shared mask" if key in shared else ""))
    return [f"- {model}: " + "; ".join(parts) + "."] if parts else []


def kernel_lines(bench: dict, model: str) -> list[str]:
    out = []
    for r in bench["models"][model].get("kernel", []):
        if r.get("goal_x") is not None:
            out.append(f"- {model}: the MLP's gathered kernels alone at {r['mlp_fraction']} of the neurons, batch "
                       f"{r['batch']}: {fmt(r['per_layer_us'], 1)} us a layer, {fmt(r['floor_gap_x'])}x their bytes "
                       f"floor (goal {r['goal_x']}x: {'met' if r['goal_met'] else 'missed'}).")
    return out


def plot_speed(points: list[dict], figures_dir: Path) -> Path:
    """Speedup at batch 1 against perplexity / dense perplexity, one panel per dataset, colour per model, line and
    marker per mode (scripts/analysis/common.series_style); dense is the point (1, 1), on the reference line."""
    datasets = sorted({p["dataset"] for p in points})
    colors = model_colors([p["model"] for p in points])
    fig, axes = new_figure(ncols=max(1, len(datasets)), width=5.5, height=4.5)
    groups: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for p in points:
        if p["mode"] != "dense":
            groups[(p["dataset"], p["model"], p["mode"])].append((p["ppl_ratio"], p["speedup"]))
    for (dataset, model, mode), xy in sorted(groups.items()):
        x, y = zip(*sorted(xy))
        plot_series(axes[datasets.index(dataset)], x, y, mode, f"{model} {mode}", color=colors[model])
    for ax, dataset in zip(axes, datasets):
        log_axis(ax, "x")
        reference_line(ax, 1.0, "dense", "dense (speedup 1 at ratio 1)")
        ax.set(xlabel="perplexity / dense perplexity (log scale)", ylabel="decode speedup at batch 1 (x dense)",
               title=f"{dataset}: what the accuracy cost buys")
        legend_outside(ax)
    return save_figure(fig, figures_dir / "speed_vs_perplexity.png")


def speed_section(sweep_rows: Sequence[dict], bench: dict, figures_dir: Path, report_dir: Path, source: str = "",
                  bench_model_of: Optional[dict[str, str]] = None) -> list[str]:
    """Markdown lines: what the bench measured, the speed table per model, the accuracy-vs-speed table of the sweep's
    rows, how the speedup shrinks with the batch, and the figure (written under figures_dir, linked relative to
    report_dir). `source` is appended to every row (e.g. the report's [S<n>] of the bench JSON)."""
    if not is_bench(bench):
        raise ValueError("speed_section: the bench JSON lacks models / ceilings / settings (is it "
                         "bench_sparse_decode.py's output?)")
    bench_models = list(bench["models"])
    ceilings = bench["ceilings"]
    lines = [f"Decode speed measured by `scripts/bench/bench_sparse_decode.py` on {bench['device']} with **random "
             f"weights at the real shapes** ({', '.join(bench_models)}): the speed of a shape, not of a trained "
             f"model. One decode step (a KV cache of {bench['settings']['context']} tokens), timed by "
             f"{bench['timing']}; copy bandwidth {ceilings['copy_bytes_per_s'] / 1e12:.3g} TB/s and matmul peak "
             f"{ceilings['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s measured in the same run. Mask-given = the "
             f"kernels alone on random masks; predictor = random-weight predictors of width {bench['settings']['D']} "
             f"run in the step, their share of the step shown. A batch computes the union of its rows' masks: "
             f"independent random masks are the worst case, one shared mask the best; a trained model's masks lie "
             f"between. Floor speedup = the dense step's bytes floor over this step's (the most any kernel could "
             f"give); floor x = measured time over this step's floor.", ""]
    rows = [row for model in bench_models for row in speed_table(bench, model, source)]
    lines += ["Mask-given (the kernels alone):", ""]
    lines += table(["model", "batch", "mlp", "att", "tok/s", "speedup", "shared-mask speedup", "mlp union",
                    "floor speedup", "floor x"], [r[:7] + r[10:13] for r in rows])
    lines += ["With the predictors run in the step:", ""]
    lines += table(["model", "batch", "mlp", "att", "tok/s", "speedup", "predictor share", "src"],
                   [r[:4] + r[7:10] + r[13:] for r in rows])
    hf = [[model, r["batch"], r["tokens_per_s"], r.get("ours_dense_speedup"), source] for model in bench_models
          for r in bench["models"][model].get("hf_generate", [])]
    if hf:
        lines += ["Dense decoding by Hugging Face `generate` (its default cache, no graph), next to ours:", ""]
        lines += table(["model", "batch", "HF tok/s", "ours dense, x HF", "src"], hf)
    lines += ["How the speedup shrinks with the batch (mask-given, MLP only):", ""]
    lines += [line for model in bench_models for line in batch_lines(bench, model)] + [""]
    lines += [line for model in bench_models for line in kernel_lines(bench, model)] + [""]

    dense_ppl = {(r["model"], r["dataset"]): float(r["perplexity"]) for r in sweep_rows if r["mode"] == "dense"}
    batches = sorted({r["batch"] for m in bench["models"].values() for r in m["decode"]})
    cost_rows, points, unmatched = [], [], set()
    for r in sweep_rows:
        bench_model = (bench_model_of or {}).get(r["model"]) or default_bench_model(r["model"], bench_models)
        base = dense_ppl.get((r["model"], r["dataset"]))
        if bench_model is None or base is None:
            unmatched.add(r["model"] if bench_model is None else f"{r['model']} / {r['dataset']} (no dense row)")
            continue
        key = (None, None) if r["mode"] == "dense" else (kept(r.get("mlp_kept")), kept(r.get("att_kept")))
        ratio = float(r["perplexity"]) / base
        speeds, what = [], ""
        for batch in batches:
            row, what_b = speed_of(bench, bench_model, batch, r["mode"], key)
            speeds.append(None if row is None else row.get("speedup_vs_dense"))
            what = what or (what_b if row is not None else "")
        note = what + (f"; a bound: {BOUND_MODES[r['mode']]}" if r["mode"] in BOUND_MODES else "")
        cost_rows.append([r["model"], r["dataset"], r["mode"], r.get("mlp_topk", "n/a"), r.get("att_topk", "n/a"),
                          ratio, *speeds, note or "not benched at this budget", source])
        if speeds and speeds[0] is not None:
            points.append({"dataset": r["dataset"], "model": r["model"], "mode": r["mode"], "ppl_ratio": ratio,
                           "speedup": speeds[0]})
    lines += ["Accuracy cost (perplexity sweep) against the measured speedup:", ""]
    lines += table(["model", "dataset", "mode", "mlp_topk", "att_topk", "ppl / dense ppl",
                    *[f"speedup b{b}" for b in batches], "speed from", "src"], cost_rows)
    if unmatched:
        lines += [f"- no bench at this model's shape (or no dense row to divide by): {', '.join(sorted(unmatched))}",
                  ""]
    if points:
        path = plot_speed(points, figures_dir)
        lines += [f"![{path.stem}]({path.relative_to(report_dir).as_posix()})", ""]
    return lines
