"""Where the sparse simulation costs perplexity: one layer sparse at a time, every other layer dense.

For each block (mlp: the MLP at --budget, attention dense; att: attention at --budget, MLP dense), each mode and each
layer l that can be sparse (every layer outside --dense-layers; layer 0 stays dense by default), the model runs with
only layer l sparse (the runner's --sparse-layers l), next to the dense baseline and to the same block and mode with
every layer sparse. Per (block, mode, layer): the perplexity, its ratio to dense and the log-perplexity increase
log(ppl_l / ppl_dense), each with a 95% bootstrap interval over documents paired with the dense run, and the layer's
on-policy Recall@K alone and in the all-layers run (the applied mask against the true top-K of the same run). Per
(block, mode): the sum over layers of the single-layer increases, the all-layers increase, and the compounding, their
ratio all-layers / sum (1 when the layers' costs add up, above 1 when errors compound through later layers, below 1
when they overlap); the three come from one joint bootstrap over documents.

Modes: predictor, oracle, gate (MLP of gated models only) and static by default, random on request. Predictors and
static rankings are read as scripts/study/sparse_sweep.py reads them (--predictor-dir may hold {k}, the budget); the
model is loaded once and each setting gets its own sparsity controller. Each run writes <out-dir>/<dataset>_<setting>
.jsonl and its manifest (a single-layer setting's name ends in _layers<l>); a finished run is not run again.

Writes <out-dir>/layer_sweep.csv and layer_sweep.md (one row per dataset, block, mode and layer; the markdown adds the
summary), layer_sweep_summary.csv (one row per dataset, block and mode), layer_sweep.png (the log-perplexity increase
per layer by mode, one panel per dataset and block, at most 4) and layer_sweep.manifest.json.

  python scripts/study/layer_sweep.py --model-name pretrained_models/llama-3.2-3b --family llama --dtype bf16 \\
      --use-cuda true --predictor-dir data/llama-3.2-3b_sparse_predictors/b{k} \\
      --data c4=Decentralized_FM_alpha/c4_val/c4_valid.jsonl --budget 0.5 --out-dir out/layer_sweep
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
from transformers import AutoConfig  # noqa: E402

from Decentralized_FM_alpha.modules.sparsity import dense_layer_list, parse_budget  # noqa: E402
from Decentralized_FM_alpha.utils.intervals import Interval, bootstrap  # noqa: E402
from Decentralized_FM_alpha.utils.manifest import base_manifest, weights_provenance, write_json_atomic  # noqa: E402
from scripts.analysis.common import (legend_outside, new_figure, plot_series, reference_line, save_figure,  # noqa: E402
                                     write_csv_atomic)
from scripts.report.plots import BLOCK_TITLES  # noqa: E402
from scripts.report.summary import paired_request_columns  # noqa: E402
from scripts.study.sparse_sweep import (DENSE, FILE_MODES, NOT_APPLICABLE, SPARSE_MODES, Setting,  # noqa: E402
                                        add_run_arguments, add_wiring_arguments, parse_data, plan_settings,
                                        run_settings)

BLOCKS = ("mlp", "att")
DEFAULT_MODES = ("predictor", "oracle", "gate", "static")
COLUMNS = ("model", "dataset", "block", "mode", "budget", "kept", "layer", "perplexity", "dense_perplexity", "ratio",
           "ratio_low", "ratio_high", "log_increase", "log_increase_low", "log_increase_high", "on_policy_recall",
           "all_layers_on_policy_recall", "tokens", "output_manifest")
SUMMARY_COLUMNS = ("model", "dataset", "block", "mode", "budget", "layers", "sum_single_log_increase",
                   "sum_single_log_increase_low", "sum_single_log_increase_high", "all_layers_log_increase",
                   "all_layers_log_increase_low", "all_layers_log_increase_high", "compounding", "compounding_low",
                   "compounding_high", "all_layers_perplexity", "all_layers_on_policy_recall", "output_manifest")
MAX_PANELS = 4


def sparse_layers(model_name: str, dense_layers: str) -> list[int]:
    """The layers a sparse run may make sparse: every layer of the model outside --dense-layers."""
    num_layers = AutoConfig.from_pretrained(model_name).num_hidden_layers
    dense = dense_layer_list(dense_layers, num_layers)
    return [layer for layer in range(num_layers) if layer not in dense]


def plan_groups(args: argparse.Namespace, layers: list[int]) -> list[tuple[Setting, list[Setting]]]:
    """Per (block, mode), blocks first: the all-layers setting and its single-layer settings, one per sparse layer.
    sparse_sweep.plan_settings decides which (block, mode) pairs exist (gate: MLP of a gated model only)."""
    all_layers = plan_settings(args.modes, [args.budget], [args.budget], args.blocks, ["heads"],
                               gated=args.family == "llama")[1:]  # [0] is the dense baseline
    all_layers.sort(key=lambda s: BLOCKS.index(s.block))  # stable: modes keep their order within a block
    return [(s, [replace(s, layers=str(layer)) for layer in layers]) for s in all_layers]


def read_manifest(row: dict) -> dict:
    return json.loads(Path(row["output_manifest"]).read_text())


def layer_recall(row: dict, block: str, layer: int) -> float | str:
    """The on-policy Recall@K of `layer`'s `block` in a run's row (sparse_sweep.describe_row keeps the counts)."""
    found = [r["recall"] for r in row["on_policy_recall"] if (r["block"], r["layer"]) == (block, layer)]
    return found[0] if found and found[0] is not None else NOT_APPLICABLE


def log_increase(columns: dict, method: str, runs: list[str]) -> Interval:
    """The summed log-perplexity increase over dense of `runs`, -(sum of (S_run - S_dense)) / T, bootstrapped."""
    return bootstrap(columns, lambda s: -sum(s[r] - s["dense"] for r in runs) / s["tokens"], method=method)


def compounding(columns: dict, method: str, runs: list[str]) -> Interval:
    """The all-layers log increase over the sum of the single-layer ones (`runs`), bootstrapped jointly."""
    with np.errstate(divide="ignore", invalid="ignore"):  # a zero sum has no ratio: reported n/a
        return bootstrap(columns, lambda s: (s["all"] - s["dense"]) / sum(s[r] - s["dense"] for r in runs),
                         method=method)


def interval_fields(name: str, interval: Interval) -> dict:
    """{name, name_low, name_high}: the value and its interval, n/a where they are not finite numbers."""
    values = (interval.value, interval.low, interval.high)
    if not all(math.isfinite(v) for v in values):
        values = (NOT_APPLICABLE,) * 3
    return dict(zip((name, f"{name}_low", f"{name}_high"), values))


def layer_row(dense_row: dict, run_row: dict, all_row: dict, setting: Setting, budget: str) -> dict:
    """One (dataset, block, mode, layer) row: the single-layer run against dense, requests paired."""
    layer = int(setting.layers)
    columns, method = paired_request_columns({"dense": read_manifest(dense_row), "run": read_manifest(run_row)})
    increase = log_increase(columns, method, ["run"])
    ratio = Interval(math.exp(increase.value), math.exp(increase.low), math.exp(increase.high), increase.documents,
                     method)
    return {"model": run_row["model"], "dataset": run_row["dataset"], "block": setting.block, "mode": setting.mode,
            "budget": budget, "kept": run_row[f"{setting.block}_kept"], "layer": layer,
            "perplexity": run_row["perplexity"], "dense_perplexity": dense_row["perplexity"],
            **interval_fields("ratio", ratio), **interval_fields("log_increase", increase),
            "on_policy_recall": layer_recall(run_row, setting.block, layer),
            "all_layers_on_policy_recall": layer_recall(all_row, setting.block, layer),
            "tokens": run_row["tokens"], "output_manifest": run_row["output_manifest"]}


def summary_row(dense_row: dict, all_row: dict, single_rows: list[dict], setting: Setting, budget: str) -> dict:
    """One (dataset, block, mode) row: the single-layer increases summed, set against the all-layers increase."""
    singles = [f"layer{i}" for i in range(len(single_rows))]
    columns, method = paired_request_columns({"dense": read_manifest(dense_row), "all": read_manifest(all_row),
                                              **{name: read_manifest(r) for name, r in zip(singles, single_rows)}})
    return {"model": all_row["model"], "dataset": all_row["dataset"], "block": setting.block, "mode": setting.mode,
            "budget": budget, "layers": len(single_rows),
            **interval_fields("sum_single_log_increase", log_increase(columns, method, singles)),
            **interval_fields("all_layers_log_increase", log_increase(columns, method, ["all"])),
            **interval_fields("compounding", compounding(columns, method, singles)),
            "all_layers_perplexity": all_row["perplexity"],
            "all_layers_on_policy_recall": all_row[f"{setting.block}_on_policy_recall"],
            "output_manifest": all_row["output_manifest"]}


def build_tables(args: argparse.Namespace, data: dict[str, Path], groups, runs: dict) -> tuple[list[dict], list[dict]]:
    """The per-layer rows and the per-(block, mode) summary of every dataset, from the runs' rows."""
    rows, summary = [], []
    for dataset, path in data.items():
        dense_row = runs[(dataset, path, DENSE)]
        for all_layers, singles in groups:
            all_row = runs[(dataset, path, all_layers)]
            single_rows = [runs[(dataset, path, s)] for s in singles]
            rows += [layer_row(dense_row, r, all_row, s, args.budget) for r, s in zip(single_rows, singles)]
            summary.append(summary_row(dense_row, all_row, single_rows, all_layers, args.budget))
    return rows, summary


def cell(row: dict, key: str) -> str:
    """value [low, high] of an interval column, or its n/a."""
    if row[key] == NOT_APPLICABLE:
        return NOT_APPLICABLE
    return f"{row[key]:.4f} [{row[f'{key}_low']:.4f}, {row[f'{key}_high']:.4f}]"


def number(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict], summary: list[dict]) -> str:
    lines = ["Each layer sparse alone (every other layer dense); value [95% interval, bootstrap over documents paired "
             "with the dense run].", "",
             "| dataset | block | mode | layer | perplexity | ratio to dense | log-perplexity increase | on-policy "
             "recall | recall, all layers sparse |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['dataset']} | {r['block']} | {r['mode']} | {r['layer']} | {r['perplexity']:.4f} | "
              f"{cell(r, 'ratio')} | {cell(r, 'log_increase')} | {number(r['on_policy_recall'])} | "
              f"{number(r['all_layers_on_policy_recall'])} |" for r in rows]
    lines += ["", "Compounding = all-layers log-perplexity increase / sum of the single-layer increases (a ratio: "
              "read it only where the sum's interval is clearly above 0).", "",
              "| dataset | block | mode | layers | sum of single-layer increases | all layers sparse | compounding | "
              "on-policy recall, all layers |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {s['dataset']} | {s['block']} | {s['mode']} | {s['layers']} | "
              f"{cell(s, 'sum_single_log_increase')} | {cell(s, 'all_layers_log_increase')} | "
              f"{cell(s, 'compounding')} | {number(s['all_layers_on_policy_recall'])} |" for s in summary]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> tuple[Path, list[str]]:
    """log-perplexity increase per layer, one series per mode, one panel per (dataset, block), the first MAX_PANELS;
    returns the figure and the panels left out."""
    panels = list(dict.fromkeys((r["dataset"], r["block"]) for r in rows))
    shown = panels[:MAX_PANELS]
    fig, axes = new_figure(ncols=len(shown), width=5.0, height=3.6)
    for ax, (dataset, block) in zip(axes, shown):
        chosen = [r for r in rows if (r["dataset"], r["block"]) == (dataset, block)]
        for mode in dict.fromkeys(r["mode"] for r in chosen):
            series = [r for r in chosen if r["mode"] == mode and r["log_increase"] != NOT_APPLICABLE]
            plot_series(ax, [r["layer"] for r in series], [r["log_increase"] for r in series], mode, mode,
                        low=[r["log_increase_low"] for r in series], high=[r["log_increase_high"] for r in series])
        reference_line(ax, 0.0, "dense", "dense")
        ax.set_title(f"{dataset}: {BLOCK_TITLES[block]}, one layer at a time", fontsize=9)
        ax.set_xlabel("the one sparse layer")
        ax.set_ylabel("log-perplexity increase over dense")
        legend_outside(ax)
    return save_figure(fig, path), [f"{d} {b}" for d, b in panels[MAX_PANELS:]]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p)
    p.add_argument("--modes", nargs="+", choices=SPARSE_MODES, default=list(DEFAULT_MODES),
                   help="sparse modes (default: %(default)s; gate runs on the MLP of gated models only)")
    p.add_argument("--blocks", nargs="+", choices=BLOCKS, default=list(BLOCKS),
                   help="mlp (attention dense) and/or att (MLP dense); default both")
    p.add_argument("--budget", default="0.5",
                   help="the sparse block's budget, a fraction < 1 of its units or a count of them (the same count for "
                        "both blocks; default %(default)s)")
    add_wiring_arguments(p)
    args = p.parse_args(argv)
    parse_budget(args.budget)  # fail before any run
    if any(m in FILE_MODES for m in args.modes) and not args.predictor_dir:
        raise SystemExit(f"modes {[m for m in args.modes if m in FILE_MODES]} need --predictor-dir")
    return args


def main(argv=None) -> tuple[list[dict], list[dict]]:
    args = parse_args(argv)
    data = parse_data(args.data)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    groups = plan_groups(args, sparse_layers(args.model_name, args.dense_layers))
    settings = [DENSE] + [s for all_layers, singles in groups for s in (all_layers, *singles)]
    runs = run_settings(args, [(name, path, s) for name, path in data.items() for s in settings], "layer sweep")
    rows, summary = build_tables(args, data, groups, runs)
    csv_path, summary_path = args.out_dir / "layer_sweep.csv", args.out_dir / "layer_sweep_summary.csv"
    write_csv_atomic(csv_path, rows, COLUMNS)
    write_csv_atomic(summary_path, summary, SUMMARY_COLUMNS)
    (args.out_dir / "layer_sweep.md").write_text(markdown(rows, summary))
    figure, left_out = plot(rows, args.out_dir / "layer_sweep.png")
    write_json_atomic(args.out_dir / "layer_sweep.manifest.json",
                      base_manifest(arguments={k: str(v) for k, v in vars(args).items()}, rows=rows, summary=summary,
                                    tables=[str(csv_path), str(summary_path)], figure=str(figure),
                                    left_out_of_figure=left_out, weights=weights_provenance(args.model_name),
                                    skipped=[] if args.family == "llama" or "gate" not in args.modes else
                                    ["gate: an OPT MLP has no gate (n/a)"]))
    print(f"wrote {len(rows)} layer rows and {len(summary)} summaries -> {csv_path}, {summary_path}, {figure}")
    return rows, summary


if __name__ == "__main__":
    main()
