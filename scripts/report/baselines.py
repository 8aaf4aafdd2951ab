"""The report's baselines and controls (issue 19): every predictor number beside its baselines, drift beside its
cross-token floor, the capacity and data curves, and the spread over the training sample.

Reads recall_summary.py payloads (records with per-document sums: predictors, and the rankings static, gate,
random, oracle; "capacity", "folds", "fold_spread") and drift.py payloads (k1_intervals with cross_token and
same_minus_cross). Every pooled number is a ratio of sums over the held-out documents and the named layers, with a
95% bootstrap interval over documents (scripts/analysis/capacity.py pooled_interval). Markdown tables stay narrow;
every number with its interval goes to <report>/baselines.csv, and the curves to one figure.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence


from Decentralized_FM_alpha.utils.intervals import Interval
from scripts.analysis.capacity import pooled_interval, pooled_value
from scripts.analysis.common import figure_legend, model_colors, new_figure, save_figure, write_csv_atomic
from scripts.report.sections import table
from scripts.report.summary import layer_text, summary_layers

BLOCK_TITLES = {"mlp": "MLP neurons", "att": "attention heads"}
RANKINGS = (("predictor (lookahead)", None), ("static", "static"), ("gate abs(SiLU(g))", "|SiLU(g)|"),
            ("random", "random"))
CURVE_STYLES = {"linear": "-", "nonlinear": "--"}


def interval_text(interval: Interval | None) -> str:
    return "n/a" if interval is None else interval.text()


def ranking_records(records: Sequence[dict], block: str, k: float, ranking: str | None) -> list[dict]:
    """A ranking's records at (block, k): ranking None = the lookahead predictor (every seed)."""
    if ranking is None:
        return [r for r in records if (r["block"], r["k"], r["input"], r["label"]) == (block, k, "lookahead", "topk")
                and "ranking" not in r]
    return [r for r in records if (r["block"], r["k"], r.get("ranking")) == (block, k, ranking)
            and r.get("Recall@K") is not None]


class Csv:
    """The long CSV of every number the section shows, with its interval and what it pools."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, table_name: str, model: str, column: str, value: float | Interval | None, **keys) -> None:
        row = {"table": table_name, "model": model, "column": column, **keys}
        if isinstance(value, Interval):
            row.update(value=value.value, low=value.low, high=value.high, documents=value.documents,
                       method=value.method)
        else:
            row["value"] = value
        self.rows.append(row)


def ranking_tables(recall: Sequence[tuple[str, dict]], csv: Csv) -> list[str]:
    """Per block: Recall@K and Captured Mass of the lookahead predictor against static, gate and random, per K."""
    lines = []
    for block in ("mlp", "att"):
        recall_rows, mass_rows = [], []
        for source, payload in recall:
            model, records = payload["source"]["model"], payload["records"]
            for k in payload["fractions"]:
                groups = [ranking_records(records, block, k, ranking) for _, ranking in RANKINGS]
                layers = summary_layers(payload)  # the summary's one layer set per model: every input has them
                if not layers or not any(r["layer"] in layers for g in groups for r in g):
                    continue
                chosen = [[r for r in g if r["layer"] in layers] for g in groups]
                K = next(r["K"] for g in chosen for r in g)
                chance = next(r["chance Recall@K"] for g in chosen for r in g)
                recalls = [pooled_interval(g, "Recall@K") if g else None for g in chosen]
                masses = [pooled_interval(g, "Captured Mass") if g else None for g in chosen]
                recall_cells, mass_cells = [interval_text(i) for i in recalls], [interval_text(m) for m in masses]
                gate_note = next((r["n/a"] for r in records if r.get("ranking") == "|SiLU(g)|" and "n/a" in r), None)
                if block == "att":
                    recall_cells[2] = mass_cells[2] = "n/a (MLP only)"
                elif gate_note:  # OPT: no gate; Llama: mlp_gate not collected
                    recall_cells[2] = mass_cells[2] = "n/a (no gate)" if "no gate" in gate_note else "n/a (not collected)"
                where = [model, f"{k:g} ({K})", layer_text(layers)]
                recall_rows.append([*where, *recall_cells, f"{chance:.3f}", source])
                mass_rows.append([*where, *mass_cells, source])
                keys = {"block": block, "k": k, "K": K, "layers": layer_text(layers)}
                for (name, _), r, m in zip(RANKINGS, recalls, masses):
                    csv.add("rankings", model, f"{name} Recall@K", r, **keys)
                    csv.add("rankings", model, f"{name} Captured Mass", m, **keys)
                csv.add("rankings", model, "uniform chance Recall@K", chance, **keys)
        if recall_rows:
            names = [name for name, _ in RANKINGS]
            lines += [f"**{BLOCK_TITLES[block]}: Recall@K of the lookahead predictor against its baselines** "
                      "(pooled over seeds and the layers named, the summary's set: those every input of the model "
                      "has, layer 0 left out; static = the K units most often in the "
                      "true top-K over the training documents, one set for every token; gate = top-K by |SiLU(g)|, "
                      "computed, no training; random = a drawn uniform K-subset per token; uniform chance = K / "
                      "units)", ""]
            lines += table(["model", "K (units)", "layers", *names, "uniform chance", "src"], recall_rows)
            lines += [f"**{BLOCK_TITLES[block]}: captured mass**: the share of the true top-K's "
                      f"{'|activation|' if block == 'mlp' else 'head output norm'} mass held by the picked K "
                      "(1 for the oracle)", ""]
            lines += table(["model", "K (units)", "layers", *names, "src"], mass_rows)
    return lines


def drift_table(drift: Sequence[tuple[str, dict]], csv: Csv) -> list[str]:
    """att_x drift at k=1: same-token against cross-token, their difference, and the centred cosines."""
    rows = []
    for source, payload in drift:
        model = payload["source"]["model"]
        by = {(x["space"], x["dims"]): x for x in payload.get("k1_intervals", []) if x["kind"] == "att_x"}
        for space in ("raw", "normed"):
            plain, centred = by.get((space, "all")), by.get((f"{space} centred", "all"))
            if plain is None or "cross_token" not in plain:
                continue
            values = {"same-token": plain, "cross-token": plain["cross_token"],
                      "same - cross": plain["same_minus_cross"],
                      "centred same-token": centred, "centred cross-token": centred and centred.get("cross_token")}
            cells = []
            for column, x in values.items():
                interval = Interval(x["value"], x["low"], x["high"], x["documents"], x["method"]) if x else None
                csv.add("drift k=1", model, column, interval, space=space, layers=plain["layers"])
                cells.append(interval_text(interval))
            rows.append([model, space, *cells, source])
    if not rows:
        return []
    return (["**Drift at k=1 against its floor**: cosine(att_x_l, att_x_(l+1)) of the same token, and of a token "
             "with a random token of another document (cross-token: what any two tokens share in an anisotropic "
             "stream); centred: after subtracting each layer's mean vector (mean over the training documents' "
             "sampled rows). Mean over layers and sampled tokens, bootstrap over documents.", ""]
            + table(["model", "space", "same-token", "cross-token", "same - cross", "centred same-token",
                     "centred cross-token", "src"], rows))


def curve_points(curves: Sequence[dict], block: str, curve: str, predictor: str, x_key: str) -> list[tuple]:
    """(x, pooled Recall@K, interval) per D or rows fraction, pooled over the curve's layers."""
    groups = defaultdict(list)
    for r in curves:
        if (r["block"], r["curve"], r["predictor"]) == (block, curve, predictor):
            groups[r[x_key]].append(r)
    return [(x, pooled_value(rs, "Recall@K"), pooled_interval(rs, "Recall@K"), rs) for x, rs in sorted(groups.items())]


def capacity_tables(recall: Sequence[tuple[str, dict]], csv: Csv) -> list[str]:
    """Per curve and block: Recall@K against the width D or the share of training rows, linear and nonlinear,
    beside the static baseline of the same layers and K."""
    lines = []
    for curve, x_key, title in (("D", "D", "width D"), ("rows", "rows_fraction", "share of the training rows")):
        for block in ("mlp", "att"):
            rows, xs = [], set()
            for source, payload in recall:
                curves, model = payload.get("capacity") or [], payload["source"]["model"]
                for predictor in sorted({r["predictor"] for r in curves if r["block"] == block}):
                    points = curve_points(curves, block, curve, predictor, x_key)
                    if not points:
                        continue
                    layers = sorted({r["layer"] for *_, rs in points for r in rs})
                    k, full = points[0][3][0]["k"], points[0][3][0]["full_rank"]
                    static = pooled_interval([r for r in ranking_records(payload["records"], block, k, "static")
                                              if r["layer"] in layers], "Recall@K")
                    # full rank differs between models: one column for it, whatever its D
                    cells = {("full" if curve == "D" and x == full else x): interval_text(i) for x, _, i, _ in points}
                    xs |= set(cells)
                    width = f", full rank D={full:g}" if curve == "D" else ""
                    rows.append((model, f"{predictor} (layers {layer_text(layers)}, K={k:g}{width})", cells,
                                 interval_text(static), source, full))
                    keys = {"block": block, "k": k, "layers": layer_text(layers)}
                    for x, _, interval, _ in points:
                        csv.add(f"capacity {curve}", model, f"{predictor} {title} {x:g}", interval, **keys)
                    csv.add(f"capacity {curve}", model, "static", static, **keys)
            if not rows:
                continue
            columns = sorted(x for x in xs if x != "full") + (["full"] if "full" in xs else [])
            names = [("full rank" if x == "full" else f"D={x:g}") if curve == "D" else
                     ("all rows" if x == 1 else f"{x:g} of the rows")
                     for x in columns]
            lines += [f"**{BLOCK_TITLES[block]}: Recall@K of the lookahead predictor against its {title}** (pooled "
                      "over the listed layers; nonlinear = Linear(d, D) -> nonlinearity -> Linear(D, out), an upper "
                      "bound at the same width; full rank = min(d, out); the static baseline of the same layers and "
                      "K beside it)", ""]
            lines += table(["model", "predictor", *names, "static", "src"],
                           [[m, p, *[cells.get(x, "n/a") for x in columns], st, src] for m, p, cells, st, src, _ in rows])
    return lines


def fold_table(recall: Sequence[tuple[str, dict]], csv: Csv) -> list[str]:
    """The spread over training-document folds beside the bootstrap over held-out documents and over seeds."""
    rows = []
    for source, payload in recall:
        model = payload["source"]["model"]
        for s in payload.get("fold_spread") or []:
            seeds = defaultdict(list)
            for r in ranking_records(payload["records"], s["block"], s["k"], None):
                if r["layer"] in s["layers"]:
                    seeds[r["seed"]].append(r)
            per_seed = [pooled_value(rs, "Recall@K") for rs in seeds.values()]
            boot = s.get("full data bootstrap")
            interval = Interval(boot["value"], boot["low"], boot["high"], boot["documents"], boot["method"]) \
                if boot else None
            spread = s["Recall@K"]
            rows.append([model, BLOCK_TITLES[s["block"]].split()[0], f"{s['k']:g}", layer_text(s["layers"]),
                         f"{spread['min']:.3f}-{spread['max']:.3f}", f"{spread['std']:.4f}", interval_text(interval),
                         f"{min(per_seed):.3f}-{max(per_seed):.3f} ({len(per_seed)})" if len(per_seed) >= 2 else
                         "one seed: no spread", source])
            keys = {"block": s["block"], "k": s["k"], "layers": layer_text(s["layers"])}
            for fold, value in enumerate(s["Recall@K per fold"]):
                csv.add("folds", model, f"fold {fold} Recall@K", value, **keys)
            csv.add("folds", model, "full data Recall@K", interval, **keys)
    if not rows:
        return []
    return (["**Intervals over the training sample**: the training documents dealt into folds, the lookahead "
             "predictors retrained without each fold and scored on the same held-out documents (the spread due to "
             "the training sample; each fold trains on (k-1)/k of the training documents, so compare spreads, not "
             "levels), beside the bootstrap interval over held-out documents of the full-data predictor and the "
             "spread over training seeds, on the same layers", ""]
            + table(["model", "block", "K", "layers", "Recall@K over folds", "fold std", "full data [95%]",
                     "over seeds (n)", "src"], rows))


def plot_capacity(recall: Sequence[dict], out_dir: Path) -> Path | None:
    """Recall@K against width D and training rows per block: one colour per model, linear solid, nonlinear
    dashed, the static baseline of the same layers dotted."""
    payloads = [p for p in recall if p.get("capacity")]
    if not payloads:
        return None
    colors = model_colors([p["source"]["model"] for p in payloads])
    fig, axes = new_figure(ncols=2, nrows=2, width=4.2, height=3.4)
    panels = [(block, curve, x_key) for block in ("mlp", "att") for curve, x_key in (("D", "D"),
                                                                                     ("rows", "rows_fraction"))]
    for ax, (block, curve, x_key) in zip(axes, panels):
        for payload in payloads:
            model = payload["source"]["model"]
            for predictor in sorted({r["predictor"] for r in payload["capacity"] if r["block"] == block}):
                points = curve_points(payload["capacity"], block, curve, predictor, x_key)
                if not points:
                    continue
                x = [p[0] for p in points]
                y = [p[1] for p in points]
                low = [p[2].low for p in points]
                high = [p[2].high for p in points]
                style = CURVE_STYLES["linear" if predictor == "linear" else "nonlinear"]
                ax.plot(x, y, style, marker="o", markersize=3, color=colors[model], label=f"{model} {predictor}")
                ax.fill_between(x, low, high, color=colors[model], alpha=0.12, linewidth=0)
                layers = sorted({r["layer"] for *_, rs in points for r in rs})
                static = pooled_value([r for r in ranking_records(payload["records"], block, points[0][3][0]["k"],
                                                                  "static") if r["layer"] in layers], "Recall@K")
                if static is not None and predictor == "linear":
                    ax.axhline(static, color=colors[model], linestyle=":", linewidth=1, label=f"{model} static")
        ax.set(xlabel="predictor width D (log scale)" if curve == "D" else "share of the training rows",
               ylabel="held-out Recall@K", title=f"{BLOCK_TITLES[block]}: against {'D' if curve == 'D' else 'data'}")
        if curve == "D":
            ax.set_xscale("log", base=2)
    figure_legend(fig, axes)
    return save_figure(fig, out_dir / "capacity.png")


def baselines_section(recall: Sequence[tuple[str, dict]], drift: Sequence[tuple[str, dict]],
                      out_dir: Path) -> tuple[list[str], list[Path]]:
    """The section's markdown lines and figures; writes <out_dir>/baselines.csv with every number."""
    csv = Csv()
    lines = (ranking_tables(recall, csv) + drift_table(drift, csv) + capacity_tables(recall, csv)
             + fold_table(recall, csv))
    figure = plot_capacity([p for _, p in recall], out_dir / "figures")
    if not csv.rows:
        return ["Missing: no recall_summary.py or drift.py result with baselines (rerun them with this version).",
                ""], []
    path = out_dir / "baselines.csv"
    write_csv_atomic(path, csv.rows, list(dict.fromkeys(k for row in csv.rows for k in row)))
    lines += [f"Every number of this section with its interval and the layers it pools: `{path.name}`.", ""]
    return lines, [figure] if figure else []
