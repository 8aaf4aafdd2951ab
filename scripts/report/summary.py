"""The report's first page: one row per model on identical definitions, with 95% intervals, and one figure.

Read by report.py from the results it found: recall_summary.py JSONs (Recall@K of predictors trained on the same
"top-K by |activation|" label for every model, per-document counts, seeds), drift.py JSONs (cosine at k = 1 with
intervals) and perplexity sweeps (each run's manifest holds per-request log-prob sums). Every number is pooled over
layers (and seeds), its interval is a bootstrap over documents (Decentralized_FM_alpha/utils/intervals.py), the
spread over training seeds is shown beside it, and every row names its sources.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from Decentralized_FM_alpha.utils.intervals import METHOD, Interval, bootstrap, cluster_sums, ratio, seed_spread
from scripts.analysis.common import model_colors, new_figure, save_figure

MLP_INPUTS = ("same", "lookahead", "l-1", "l-2")
ATT_INPUTS = ("same", "lookahead", "l-2")
INPUT_NAMES = {"same": "same-layer", "lookahead": "DejaVu lookahead", "l-1": "from l-1", "l-2": "from l-2"}


@dataclass
class Cell:
    """One summary number: its interval, the spread over seeds (predictors), its chance level and sources."""
    interval: Interval | None
    seeds: dict | None = None
    chance: float | None = None
    sources: list[str] = field(default_factory=list)

    def text(self) -> str:
        if self.interval is None:
            return "n/a"
        seeds = (f" s {self.seeds['min']:.3f}-{self.seeds['max']:.3f}"
                 if self.seeds and self.seeds["seeds"] > 1 else "")
        return self.interval.text() + seeds

    def csv(self, prefix: str) -> dict:
        i = self.interval
        return {prefix: i.value if i else None, f"{prefix} low": i.low if i else None,
                f"{prefix} high": i.high if i else None, f"{prefix} documents": i.documents if i else None,
                f"{prefix} seed min": (self.seeds or {}).get("min"),
                f"{prefix} seed max": (self.seeds or {}).get("max"),
                f"{prefix} seeds": (self.seeds or {}).get("seeds"), f"{prefix} chance": self.chance,
                f"{prefix} sources": " ".join(self.sources)}


# ------------------------------------------------------------------------------------- Recall@K cells
def document_columns(records: Sequence[dict], numerator: str, scale: Callable[[dict], float]) -> dict:
    """Per-document sums over records (layers x seeds) of `numerator` and of scale(record) * tokens."""
    documents = records[0]["per_document"]["documents"]
    num, den = np.zeros(len(documents)), np.zeros(len(documents))
    for r in records:
        counts = r["per_document"]
        if counts["documents"] != documents:
            raise ValueError(f"{r['model']} layer {r['layer']}: held-out documents differ between records; "
                             f"summaries pool records of one split only")
        num += np.asarray(counts[numerator], dtype=np.float64)
        den += scale(r) * np.asarray(counts["tokens"], dtype=np.float64)
    return {"num": num, "den": den}


def recall_cell(records: Sequence[dict], source: str) -> Cell:
    """Recall@K pooled over the records' layers and seeds (= their mean: equal K and documents per layer)."""
    if not records:
        return Cell(None, sources=[source])
    interval = bootstrap(document_columns(records, "topk_hits", lambda r: r["K"]), ratio("num", "den"))
    per_seed = defaultdict(list)
    for r in records:
        per_seed[r.get("seed")].append(r)
    seeds = seed_spread([pooled_ratio(document_columns(rs, "topk_hits", lambda r: r["K"]))
                         for rs in per_seed.values()])
    return Cell(interval, seeds, float(np.mean([r["chance Recall@K"] for r in records])), [source])


def pooled_ratio(columns: dict) -> float:
    return float(columns["num"].sum() / columns["den"].sum())


def ratio_cell(records: Sequence[dict], numerator: str, denominator: str, source: str) -> Cell:
    """A per-document count ratio pooled over records, e.g. Precision = tp / predicted."""
    if not records:
        return Cell(None, sources=[source])
    columns = {"num": sum(np.asarray(r["per_document"][numerator], dtype=np.float64) for r in records),
               "den": sum(np.asarray(r["per_document"][denominator], dtype=np.float64) for r in records)}
    return Cell(bootstrap(columns, ratio("num", "den")), sources=[source])


def penalty_cell(same: Sequence[dict], other: Sequence[dict], source: str) -> Cell:
    """Recall@K(same-layer) - Recall@K(other input), on the (layer, seed) pairs both have, documents paired."""
    other_by_key = {(r["layer"], r["seed"]): r for r in other}
    pairs = [(r, other_by_key[(r["layer"], r["seed"])]) for r in same if (r["layer"], r["seed"]) in other_by_key]
    if not pairs:
        return Cell(None, sources=[source])
    a = document_columns([p[0] for p in pairs], "topk_hits", lambda r: r["K"])
    b = document_columns([p[1] for p in pairs], "topk_hits", lambda r: r["K"])
    interval = bootstrap({"num": a["num"] - b["num"], "den": a["den"]}, ratio("num", "den"))
    per_seed = defaultdict(list)
    for pair in pairs:
        per_seed[pair[0]["seed"]].append(pair)
    spread = seed_spread([pooled_ratio(document_columns([p[0] for p in ps], "topk_hits", lambda r: r["K"]))
                          - pooled_ratio(document_columns([p[1] for p in ps], "topk_hits", lambda r: r["K"]))
                          for ps in per_seed.values()])
    return Cell(interval, spread, 0.0, [source])


def select(records: Sequence[dict], block: str, input_name: str, label: str, k: float | None) -> list[dict]:
    return [r for r in records if r["block"] == block and r["input"] == input_name and r["label"] == label
            and (k is None or r["k"] == k)]


# ------------------------------------------------------------------------------------- perplexity and drift cells
def read_manifest(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def perplexity_ratio_cell(run: dict, dense: dict, sources: list[str]) -> Cell:
    """perplexity(run) / perplexity(dense) on the same requests: exp(-(S_run - S_dense) / T), requests paired."""
    a, b = run["perplexity"]["per_request"], dense["perplexity"]["per_request"]
    if a["tokens"] != b["tokens"]:
        raise ValueError(f"{run['output_path']} and {dense['output_path']} score different tokens: not comparable")
    columns = {"run": a["logprob_sums"], "dense": b["logprob_sums"], "tokens": a["tokens"]}
    method = METHOD.replace("documents", "requests")
    if "articles" in a:  # WikiText-2 windows: resample whole articles (a cluster bootstrap)
        columns, method = cluster_sums(columns, a["articles"]), METHOD.replace("documents", "articles (WikiText-2)")
    return Cell(bootstrap(columns, lambda s: np.exp(-(s["run"] - s["dense"]) / s["tokens"]), method=method),
                chance=None, sources=sources)


def drift_cell(payload: dict, space: str, dims: str, source: str) -> Cell:
    for x in payload.get("k1_intervals", []):
        if (x["kind"], x["space"], x["dims"]) == ("att_x", space, dims):
            return Cell(Interval(x["value"], x["low"], x["high"], x["documents"], x["method"]), chance=0.0,
                        sources=[source])
    return Cell(None, sources=[source])


# ------------------------------------------------------------------------------------- the summary
@dataclass
class ModelSummary:
    model: str
    cells: dict[str, Cell] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    ppl: dict[tuple[str, str, str, str], Cell] = field(default_factory=dict)  # (dataset, mode, mlp, att) -> ratio


def recall_cells(summary: ModelSummary, payload: dict, source: str) -> None:
    records = [r for r in payload["records"] if "per_document" in r and "ranking" not in r]  # predictors only
    for block, inputs in (("mlp", ("same", "lookahead")), ("att", ("same", "lookahead"))):
        for k in payload["fractions"]:
            for name in inputs:
                summary.cells[f"{block} Recall@K {k:g} {name}"] = recall_cell(select(records, block, name, "topk", k),
                                                                              source)
    d = payload["distance_fraction"]
    for block, others in (("mlp", ("lookahead", "l-1", "l-2")), ("att", ("lookahead", "l-2"))):
        same = select(records, block, "same", "topk", d)
        for name in others[1:]:
            summary.cells[f"{block} Recall@K {d:g} {name}"] = recall_cell(select(records, block, name, "topk", d),
                                                                          source)
        for name in others:
            summary.cells[f"{block} penalty {d:g} same - {name}"] = penalty_cell(
                same, select(records, block, name, "topk", d), source)
    arch = [r for r in records if r["block"] == "mlp" and r["label"] in ("relu", "gate")]
    summary.notes["architecture label"] = payload.get("architecture_label", "")
    for name in ("same", "lookahead"):
        chosen = [r for r in arch if r["input"] == name]
        summary.cells[f"arch Recall@K {name}"] = recall_cell(chosen, source)
        summary.cells[f"arch Recall {name}"] = ratio_cell(chosen, "tp", "active", source)
        summary.cells[f"arch Precision {name}"] = ratio_cell(chosen, "tp", "predicted", source)
        summary.cells[f"arch Classifier Sparsity {name}"] = ratio_cell(chosen, "predicted", "tokens", source)
        if chosen:
            summary.cells[f"arch Precision {name}"].chance = float(np.mean([r["chance Precision"] for r in chosen]))


def gate_cells(summary: ModelSummary, payload: dict, source: str) -> None:
    gate = [r for r in payload["records"] if r["input"] == "gate (no predictor)"
            and r["ranking"] in ("|g|", "g", "sign(g)")]
    for k in payload["fractions"] if gate else []:
        for ranking in ("|g|", "g", "sign(g)"):
            chosen = [r for r in gate if r["k"] == k and r["ranking"] == ranking]
            cell = Cell(bootstrap(document_columns(chosen, "topk_hits", lambda r: r["K"]), ratio("num", "den")),
                        chance=chosen[0]["chance Recall@K"], sources=[source])
            summary.cells[f"gate {ranking} Recall@K {k:g}"] = cell
        share = [r["gate_positive_share"] for r in gate if "gate_positive_share" in r]  # the sign(g) records
        summary.notes["gate positive share"] = f"{np.mean(share):.3f}"


def build_summaries(models: Sequence[str], recall: Sequence[tuple[str, dict]], drift: Sequence[tuple[str, dict]],
                    sweeps: Sequence[tuple[str, dict, dict]]) -> list[ModelSummary]:
    """One ModelSummary per model. recall / drift: (source id, payload); sweeps: (source ids, row, manifest)."""
    summaries = {m: ModelSummary(m) for m in models}
    for source, payload in recall:
        summary = summaries[payload["source"]["model"]]
        recall_cells(summary, payload, source)
        gate_cells(summary, payload, source)
    for source, payload in drift:
        summary = summaries[payload["source"]["model"]]
        for space in ("raw", "normed"):
            for dims in ("all", "without_massive"):
                summary.cells[f"drift {space} {dims}"] = drift_cell(payload, space, dims, source)
        massive = payload.get("massive_dims")
        summary.notes["massive dims"] = f"{massive['count']}" if massive else "not excluded"
    dense = {(row["model"], row["dataset"]): (ids, manifest) for ids, row, manifest in sweeps if row["mode"] == "dense"}
    for ids, row, manifest in sweeps:
        if row["mode"] == "dense" or (row["model"], row["dataset"]) not in dense:
            continue
        dense_ids, dense_manifest = dense[(row["model"], row["dataset"])]
        cell = perplexity_ratio_cell(manifest, dense_manifest, [*ids, *dense_ids])
        summaries[row["model"]].cells[ppl_key(row)] = cell
        summaries[row["model"]].ppl[(row["dataset"], row["mode"], row.get("mlp_topk"), row.get("att_topk"))] = cell
    return [summaries[m] for m in models]


def ppl_key(row: dict) -> str:
    return f"ppl ratio {row['dataset']} {row['mode']} mlp {row.get('mlp_topk')} att {row.get('att_topk')}"


def budget_curves(summaries: Sequence[ModelSummary], dataset: str) -> dict[str, dict[tuple[str, float], Cell]]:
    """model -> (mode, MLP budget) -> perplexity-ratio cell, for the runs of `dataset` with an MLP budget."""
    return {s.model: {(mode, float(mlp)): cell for (ds, mode, mlp, _), cell in s.ppl.items()
                      if ds == dataset and mlp not in (None, "", "dense")} for s in summaries}


# ------------------------------------------------------------------------------------- tables
def cell_sources(summary: ModelSummary, keys: Sequence[str]) -> str:
    return ", ".join(dict.fromkeys(s for k in keys if k in summary.cells for s in summary.cells[k].sources))


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in rows], ""]


def grid(summaries: Sequence[ModelSummary], columns: Sequence[tuple[str, str]], extra: Callable | None = None
         ) -> list[str]:
    """One row per model: the cells of `columns` ((header, cell key)), then the chance levels and sources."""
    rows = []
    for s in summaries:
        keys = [key for _, key in columns]
        if not any(k in s.cells and s.cells[k].interval for k in keys):
            continue
        chances = sorted({f"{s.cells[k].chance:.3f}" for k in keys if k in s.cells and s.cells[k].chance is not None},
                         key=float)
        rows.append([s.model, *(extra(s) if extra else []), *(s.cells[k].text() if k in s.cells else "n/a"
                                                               for k in keys), ", ".join(chances) or "n/a",
                     cell_sources(s, keys)])
    return rows


def summary_tables(summaries: Sequence[ModelSummary], fractions: Sequence[float], distance: float,
                   ppl_keys: Sequence[str]) -> list[str]:
    """The summary section's markdown (every table one row per model)."""
    lines = ["Every cell: value [95% interval: bootstrap over held-out documents] and, for trained predictors, "
             "s min-max over training seeds. Values are pooled over layers (and seeds). Chance: what a ranking that "
             "ignores the input scores (Recall@K = K / units; a difference: 0; a cosine: 0).", ""]
    for block, title in (("mlp", "MLP neurons"), ("att", "Attention heads (query heads)")):
        columns = [(f"K={k:g} {INPUT_NAMES[i]}", f"{block} Recall@K {k:g} {i}") for k in fractions
                   for i in ("same", "lookahead")]
        rows = grid(summaries, columns)
        if rows:
            lines += [f"**{title}: Recall@K, label top-K by |activation| for every model** (OPT: the ReLU output; "
                      f"Llama: |SiLU(g)·u|; attention: the head output norm)", ""]
            lines += table(["model", *(h for h, _ in columns), "chance", "src"], rows)
    arch_columns = [(f"{metric} {INPUT_NAMES[i]}", f"arch {metric} {i}") for i in ("same", "lookahead")
                    for metric in ("Recall", "Precision", "Classifier Sparsity", "Recall@K")]
    rows = grid(summaries, arch_columns, extra=lambda s: [s.notes.get("architecture label", "")])
    if rows:
        lines += ["**MLP, the architecture's own label** (OPT: relu, y > 0; Llama: gate, g > 0): Recall = TP / "
                  "active, Precision = TP / predicted, Classifier Sparsity = units predicted active per token, "
                  "Recall@K at K = the mean active count; chance = the Precision of a random set", ""]
        lines += table(["model", "label", *(h for h, _ in arch_columns), "chance", "src"], rows)
    penalty_columns = [(f"MLP same - {INPUT_NAMES[i]}", f"mlp penalty {distance:g} same - {i}")
                       for i in ("lookahead", "l-1", "l-2")] if distance is not None else []
    penalty_columns += [(f"att same - {INPUT_NAMES[i]}", f"att penalty {distance:g} same - {i}")
                        for i in ("lookahead", "l-2")] if distance is not None else []
    rows = grid(summaries, penalty_columns) if penalty_columns else []
    if rows:
        lines += [f"**Lookahead penalty at K={distance:g}**: Recall@K(same-layer input) - Recall@K(earlier input), "
                  f"paired by layer, seed and document (MLP lookahead = att_x_l; attention lookahead = att_x_(l-1), "
                  f"so its l-1 column is the lookahead column)", ""]
        lines += table(["model", *(h for h, _ in penalty_columns), "chance", "src"], rows)
    drift_columns = [(f"{space}, {dims.replace('_', ' ')} dims", f"drift {space} {dims}")
                     for space in ("raw", "normed") for dims in ("all", "without_massive")]
    rows = grid(summaries, drift_columns, extra=lambda s: [s.notes.get("massive dims", "")])
    if rows:
        lines += ["**Residual-stream drift at k=1**: cosine(att_x_l, att_x_(l+1)) of the same token, mean over layers "
                  "and tokens", ""]
        lines += table(["model", "massive dims left out", *(h for h, _ in drift_columns), "chance", "src"], rows)
    rows = grid(summaries, [(key, key) for key in ppl_keys])
    if rows:
        lines += ["**Perplexity as a ratio to the model's dense perplexity** (same requests, paired bootstrap over "
                  "requests; 1.0 = no loss)", ""]
        lines += table(["model", *(k.replace("ppl ratio ", "") for k in ppl_keys), "chance", "src"], rows)
    return lines


def csv_rows(summaries: Sequence[ModelSummary]) -> list[dict]:
    rows = []
    for s in summaries:
        row = {"model": s.model, **{f"note {k}": v for k, v in s.notes.items()}}
        for key, cell in s.cells.items():
            row.update(cell.csv(key))
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------- the figure
def plot_summary(recall: Sequence[dict], drift: Sequence[dict], ratios: dict[str, dict[tuple[str, float], Cell]],
                 distance: float, out_dir: Path) -> Path:
    """Per layer (relative depth): Recall@K same vs lookahead (MLP, attention), drift; perplexity ratio vs budget."""
    models = list(dict.fromkeys([p["source"]["model"] for p in recall] + [p["source"]["model"] for p in drift]
                                + list(ratios)))
    colors = model_colors(models)
    fig, axes = new_figure(ncols=4, width=4.6, height=4.0)
    for payload in recall:
        model, layers = payload["source"]["model"], payload["source"]["dims"]["num_layers"]
        for ax, block in zip(axes[:2], ("mlp", "att")):
            for name, style in (("same", "-"), ("lookahead", "--")):
                by_layer = defaultdict(list)
                for r in select(payload["records"], block, name, "topk", distance):
                    by_layer[r["layer"]].append(r["Recall@K"])
                points = sorted((l / max(layers - 1, 1), float(np.mean(v))) for l, v in by_layer.items())
                if points:
                    ax.plot(*zip(*points), style, marker="o", markersize=2, color=colors[model],
                            label=f"{model} {INPUT_NAMES[name]}")
    for ax, block in zip(axes[:2], ("MLP", "attention")):
        ax.set(xlabel="relative depth l / (L-1)", ylabel=f"held-out Recall@K (K={distance:g})",
               title=f"{block}: same-layer vs lookahead input")
    for payload in drift:
        model, layers = payload["source"]["model"], payload["source"]["dims"]["num_layers"]
        for space, style in (("raw", "-"), ("normed", "--")):
            points = sorted((r["layer"] / max(layers - 1, 1), r["mean"]) for r in payload["records"]
                            if (r["kind"], r["k"], r["space"], r["dims"]) == ("att_x", 1, space, "all"))
            if points:
                axes[2].plot(*zip(*points), style, marker="o", markersize=2, color=colors[model],
                             label=f"{model} {space}")
    axes[2].set(xlabel="relative depth l / (L-1)", ylabel="cosine(att_x_l, att_x_(l+1))", title="drift at k=1")
    for model, cells in ratios.items():
        for mode, style in (("predictor", "-"), ("oracle", "--"), ("random", ":")):
            points = sorted((budget, cell) for (m, budget), cell in cells.items() if m == mode and cell.interval)
            if points:
                x = [b for b, _ in points]
                y = [c.interval.value for _, c in points]
                err = [[c.interval.value - c.interval.low for _, c in points],
                       [c.interval.high - c.interval.value for _, c in points]]
                axes[3].errorbar(x, y, yerr=err, fmt=style, marker="o", markersize=3, capsize=2,
                                 color=colors[model], label=f"{model} {mode}")
    axes[3].axhline(1.0, color="black", linewidth=0.6)
    axes[3].set_yscale("log")
    axes[3].set(xlabel="MLP budget (fraction of neurons kept)", ylabel="perplexity / dense perplexity (log)",
                title="C4: sparse inference cost")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    return save_figure(fig, out_dir / "summary.png")


# ------------------------------------------------------------------------------------- the decomposition
def decomposition_tables(summaries: Sequence[ModelSummary], fractions: Sequence[float], distance: float,
                         activations: dict[str, str]) -> list[str]:
    """(a) activation function, (b) input distance, (c) the gate alone: tables of the summary's own cells."""
    lines = ["(a) **Activation function**: the same label and inputs on every model; models that differ only in the "
             "MLP activation (e.g. the bundled tiny Llama and Llama-ReLU: same size, data and steps) isolate it.", ""]
    columns = [(f"K={k:g} same-layer", f"mlp Recall@K {k:g} same") for k in fractions]
    columns += [("arch label Precision", "arch Precision same")]
    lines += table(["model", "MLP activation", *(h for h, _ in columns), "chance", "src"],
                   grid(summaries, columns, extra=lambda s: [activations.get(s.model, "not recorded")]))
    lines += [f"(b) **Drift**: Recall@K at K={distance:g} against how far back the predictor's input is taken (MLP: "
              "mlp_x_l, att_x_l, att_x_(l-1), att_x_(l-2); attention: att_x_l, att_x_(l-1), att_x_(l-2)).", ""]
    columns = [(f"MLP {INPUT_NAMES[i]}", f"mlp Recall@K {distance:g} {i}") for i in MLP_INPUTS]
    columns += [(f"att {INPUT_NAMES[i]}", f"att Recall@K {distance:g} {i}") for i in ATT_INPUTS]
    lines += table(["model", *(h for h, _ in columns), "chance", "src"], grid(summaries, columns))
    columns = []
    for k in fractions:
        columns += [(f"K={k:g} predictor", f"mlp Recall@K {k:g} same"),
                    (f"K={k:g} top-K by abs(g)", f"gate |g| Recall@K {k:g}"),
                    (f"K={k:g} top-K by g", f"gate g Recall@K {k:g}"),
                    (f"K={k:g} covered by g > 0", f"gate sign(g) Recall@K {k:g}")]
    with_gate = [s for s in summaries if any(key.startswith("gate") for key in s.cells)]
    rows = grid(with_gate, columns, extra=lambda s: [s.notes.get("gate positive share", "n/a")])
    if rows:
        lines += ["(c) **The gate alone** (Llama with mlp_gate collected; no training): the true top-K by "
                  "|SiLU(g)·u| against the top-K by |g|, the top-K by g, and the share of it with g > 0 (a set of "
                  "varying size), next to the same-layer predictor.", ""]
        lines += table(["model", "share of g > 0", *(h for h, _ in columns), "chance", "src"], rows)
    return lines


# ------------------------------------------------------------------------------------- per layer
def three_decimals(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def per_layer_tables(recall: Sequence[tuple[str, dict]], drift: Sequence[tuple[str, dict]],
                     sparsity: Sequence[tuple[str, dict]], distance: float) -> list[str]:
    """(d) One table per model, one row per layer: drift at k=1, the gate's negative share, and Recall@K at K =
    `distance` of the same-layer and DejaVu lookahead inputs (mean over seeds), with their chance levels."""
    drift_of = {p["source"]["model"]: (src, p) for src, p in drift}
    sparsity_of = {p["source"]["model"]: (src, p) for src, p in sparsity}
    lines = [f"(d) **Per layer** (K={distance:g}; Recall@K is the mean over seeds of each layer's held-out Recall@K; "
             "drift is cosine(att_x_l, att_x_(l+1)) over all dims; gate < 0 is the share of gate pre-activations "
             "below zero, from sparsity_stats.py).", ""]
    for src, payload in recall:
        model = payload["source"]["model"]
        d_src, d = drift_of.get(model, ("", {"records": []}))
        s_src, s = sparsity_of.get(model, ("", {"records": []}))
        cosine = {(r["layer"], r["space"]): r["mean"] for r in d["records"]
                  if (r["kind"], r["k"], r["dims"]) == ("att_x", 1, "all")}
        gate = {r["layer"]: r.get("gate_negative_fraction") for r in s["records"]}
        rows = []
        for layer in range(payload["source"]["dims"]["num_layers"]):
            cells, chances = [], {}
            for block in ("mlp", "att"):
                for name in ("same", "lookahead"):
                    chosen = [r for r in select(payload["records"], block, name, "topk", distance)
                              if r["layer"] == layer]
                    cells.append(three_decimals(np.mean([r["Recall@K"] for r in chosen]) if chosen else None))
                    chances.update({block: r["chance Recall@K"] for r in chosen})
            if all(c == "n/a" for c in cells):
                continue
            rows.append([layer, three_decimals(cosine.get((layer, "raw"))),
                         three_decimals(cosine.get((layer, "normed"))), three_decimals(gate.get(layer)), *cells,
                         three_decimals(chances.get("mlp")), three_decimals(chances.get("att"))])
        lines += [f"**{model}** [{', '.join(x for x in (src, d_src, s_src) if x)}]", ""]
        lines += table(["layer", "drift k=1 raw", "drift k=1 normed", "gate < 0", "MLP same-layer",
                        "MLP DejaVu lookahead", "att same-layer", "att DejaVu lookahead", "chance MLP", "chance att"],
                       rows)
    return lines
