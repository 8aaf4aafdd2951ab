"""The report's summary: one row per model on identical definitions, with 95% intervals, and its figures.

Read by report.py from the results it found: recall_summary.py JSONs (Recall@K of predictors trained on the same
"top-K by |activation|" label for every model, per-document counts, seeds; the input-independent and training-free
rankings scored on the same documents when present), drift.py JSONs (cosine at k = 1 with intervals) and perplexity
sweeps (each run's manifest holds per-request log-prob sums). Every interval is a bootstrap over documents
(Decentralized_FM_alpha/utils/intervals.py), the spread over training seeds is shown beside it, and every row names
its sources.

Pooling: every pooled Recall@K, captured-mass and penalty number of a model pools one layer set, the layers that
every input of the summary has (same-layer, lookahead, l-1, l-2, the baselines), without layer 0 (its input is the
embedding); drift pools the pairs (l, l+1) with l >= 1 where drift.py records it. The set is named beside the
numbers, so columns that compare inputs compare the same layers.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from Decentralized_FM_alpha.utils.intervals import METHOD, Interval, bootstrap, cluster_sums, ratio, seed_spread
from scripts.report.inputs import Budget, row_budget

MLP_INPUTS = ("same", "lookahead", "l-1", "l-2")
ATT_INPUTS = ("same", "lookahead", "l-2")
INPUT_NAMES = {"same": "same-layer", "lookahead": "lookahead", "l-1": "from l-1", "l-2": "from l-2"}
SPARSE_MODES = ("oracle", "predictor", "random", "static", "gate")  # the sweep's modes besides dense, in table order
BASELINES = ("static", "gate", "random")  # rankings scored without a trained predictor, beside the predictor's
BASELINE_RANKINGS = {"static": "static", "|SiLU(g)|": "gate", "random": "random"}  # recall_summary "ranking" -> name
MAX_COLUMNS = 10  # widest markdown table; wider ones are split (the CSVs keep everything)
GATE_LINEAR_NOTE = ("same-layer: g = W_g(γ ⊙ x / rms(x)) is a linear threshold of mlp_x, a linearly separable "
                    "label; only the lookahead version tests DejaVu")


@dataclass
class Cell:
    """One summary number: its interval, the spread over seeds (predictors), its uniform-chance level, the layers it
    pools and its sources."""
    interval: Interval | None
    seeds: dict | None = None
    chance: float | None = None
    sources: list[str] = field(default_factory=list)
    layers: list[int] | None = None

    def text(self, digits: int = 3) -> str:
        if self.interval is None:
            return "n/a"
        seeds = (f" s {self.seeds['min']:.{digits}f} to {self.seeds['max']:.{digits}f}"
                 if self.seeds and self.seeds["seeds"] > 1 else "")
        return self.interval.text(digits) + seeds

    @property
    def standard_error(self) -> float | None:
        """The interval's width in standard errors of a normal estimate: (high - low) / (2 * 1.96)."""
        return None if self.interval is None else (self.interval.high - self.interval.low) / 3.92

    def csv(self, prefix: str) -> dict:
        i = self.interval
        return {prefix: i.value if i else None, f"{prefix} low": i.low if i else None,
                f"{prefix} high": i.high if i else None, f"{prefix} documents": i.documents if i else None,
                f"{prefix} seed min": (self.seeds or {}).get("min"),
                f"{prefix} seed max": (self.seeds or {}).get("max"),
                f"{prefix} seeds": (self.seeds or {}).get("seeds"), f"{prefix} uniform chance": self.chance,
                f"{prefix} layers": layer_text(self.layers) if self.layers is not None else None,
                f"{prefix} sources": " ".join(self.sources)}


def layer_text(layers: Sequence[int]) -> str:
    """'2-5' or '1, 3-5': a layer set as ranges."""
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ", ".join(f"{r[0]}" if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs) or "none"


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


def recall_cell(records: Sequence[dict], source: str, layers: list[int] | None = None) -> Cell:
    """Recall@K pooled over the records' layers and seeds (= their mean: equal K and documents per layer)."""
    if not records:
        return Cell(None, sources=[source], layers=layers)
    interval = bootstrap(document_columns(records, "topk_hits", lambda r: r["K"]), ratio("num", "den"))
    per_seed = defaultdict(list)
    for r in records:
        per_seed[r.get("seed")].append(r)
    seeds = seed_spread([pooled_ratio(document_columns(rs, "topk_hits", lambda r: r["K"]))
                         for rs in per_seed.values()])
    return Cell(interval, seeds, float(np.mean([r["chance Recall@K"] for r in records])), [source], layers)


def pooled_ratio(columns: dict) -> float:
    return float(columns["num"].sum() / columns["den"].sum())


def ratio_cell(records: Sequence[dict], numerator: str, denominator: str, source: str,
               layers: list[int] | None = None) -> Cell:
    """A per-document sum ratio pooled over records, e.g. Precision = tp / predicted, captured mass."""
    if not records or any(r["per_document"].get(numerator) is None for r in records):
        return Cell(None, sources=[source], layers=layers)
    columns = {"num": sum(np.asarray(r["per_document"][numerator], dtype=np.float64) for r in records),
               "den": sum(np.asarray(r["per_document"][denominator], dtype=np.float64) for r in records)}
    return Cell(bootstrap(columns, ratio("num", "den")), sources=[source], layers=layers)


def penalty_cell(same: Sequence[dict], other: Sequence[dict], source: str, layers: list[int] | None = None) -> Cell:
    """Recall@K(same-layer) - Recall@K(other input), on the (layer, seed) pairs both have, documents paired."""
    other_by_key = {(r["layer"], r["seed"]): r for r in other}
    pairs = [(r, other_by_key[(r["layer"], r["seed"])]) for r in same if (r["layer"], r["seed"]) in other_by_key]
    if not pairs:
        return Cell(None, sources=[source], layers=layers)
    a = document_columns([p[0] for p in pairs], "topk_hits", lambda r: r["K"])
    b = document_columns([p[1] for p in pairs], "topk_hits", lambda r: r["K"])
    interval = bootstrap({"num": a["num"] - b["num"], "den": a["den"]}, ratio("num", "den"))
    per_seed = defaultdict(list)
    for pair in pairs:
        per_seed[pair[0]["seed"]].append(pair)
    spread = seed_spread([pooled_ratio(document_columns([p[0] for p in ps], "topk_hits", lambda r: r["K"]))
                          - pooled_ratio(document_columns([p[1] for p in ps], "topk_hits", lambda r: r["K"]))
                          for ps in per_seed.values()])
    return Cell(interval, spread, 0.0, [source], layers)


def select(records: Sequence[dict], block: str, input_name: str, label: str, k: float | None) -> list[dict]:
    return [r for r in records if r["block"] == block and r["input"] == input_name and r["label"] == label
            and (k is None or r["k"] == k)]


def baseline_of(record: dict) -> str | None:
    """static / gate / random for a ranking scored without a predictor (recall_summary records with a "ranking" and a
    Recall@K), else None."""
    return BASELINE_RANKINGS.get(record.get("ranking")) if record.get("Recall@K") is not None else None


def is_predictor(record: dict) -> bool:
    """A trained predictor's record (the rankings that need none carry a "ranking")."""
    return "ranking" not in record


def summary_layers(payload: dict) -> list[int]:
    """The one layer set every pooled number of a recall_summary.py result uses (see common_layers)."""
    return common_layers([r for r in payload["records"] if "per_document" in r and (is_predictor(r) or baseline_of(r))])


def common_layers(records: Sequence[dict]) -> list[int]:
    """The layers that every (block, input) of the summary's top-K records has, layer 0 left out."""
    sets: dict[tuple[str, str], set[int]] = defaultdict(set)
    for r in records:
        if r["label"] == "topk":
            sets[(r["block"], baseline_of(r) or r["input"])].add(r["layer"])
    return sorted(set.intersection(*sets.values()) - {0}) if sets else []


# ------------------------------------------------------------------------------------- perplexity and drift cells
def read_manifest(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def perplexity_ratio_cell(run: dict, base: dict, sources: list[str]) -> Cell:
    """perplexity(run) / perplexity(base) on the same requests: exp(-(S_run - S_base) / T), requests paired."""
    columns, method = paired_request_columns({"run": run, "base": base})
    return Cell(bootstrap(columns, lambda s: np.exp(-(s["run"] - s["base"]) / s["tokens"]), method=method),
                chance=None, sources=sources)


def paired_request_columns(runs: dict[str, dict]) -> tuple[dict[str, Sequence[float]], str]:
    """Run manifests scored on the same requests as bootstrap columns: each run's per-request log-prob sums under its
    name, the scored tokens under "tokens", and the resampling it implies (whole WikiText-2 articles where the
    requests name one: a cluster bootstrap)."""
    (_, first), *others = runs.items()
    reference = first["perplexity"]["per_request"]
    for name, run in others:
        if run["perplexity"]["per_request"]["tokens"] != reference["tokens"]:
            raise ValueError(f"{run['output_path']} and {first['output_path']} score different tokens: not comparable")
    columns = {name: run["perplexity"]["per_request"]["logprob_sums"] for name, run in runs.items()}
    columns["tokens"] = reference["tokens"]
    if "articles" in reference:
        return cluster_sums(columns, reference["articles"]), METHOD.replace("documents", "articles (WikiText-2)")
    return columns, METHOD.replace("documents", "requests")


DRIFT_PAIRINGS = ("same-token", "cross-token", "centred")


def drift_cells(payload: dict, source: str) -> dict[str, Cell]:
    """Cells 'drift <pairing> <space> <dims>' from drift.py's k1_intervals of att_x: same-token (the entry), and where
    drift.py gives them, cross-token (its "cross_token"), same-token minus cross-token and centred (the same-token
    cosine in the space "<space> centred"); each with the layers it pools ("pooled_layers")."""
    cells = {}
    for x in payload.get("k1_intervals", []):
        if x["kind"] != "att_x":
            continue
        space, centred = (x["space"][: -len(" centred")], True) if x["space"].endswith(" centred") else (x["space"],
                                                                                                            False)
        parts = {"centred": x} if centred else {"same-token": x, "cross-token": x.get("cross_token"),
                                                "same-minus-cross": x.get("same_minus_cross")}
        for pairing, value in parts.items():
            if value:
                cells[f"drift {pairing} {space} {x['dims']}"] = Cell(
                    Interval(value["value"], value["low"], value["high"], value["documents"], value["method"]),
                    chance=0.0, sources=[source], layers=x.get("pooled_layers"))
    return cells


# ------------------------------------------------------------------------------------- the summary
RunKey = tuple[str, str, Budget]  # (dataset, mode, budget)


@dataclass
class ModelSummary:
    model: str
    cells: dict[str, Cell] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    dims: dict = field(default_factory=dict)
    ppl: dict[RunKey, Cell] = field(default_factory=dict)  # perplexity / dense perplexity
    vs_oracle: dict[RunKey, Cell] = field(default_factory=dict)  # perplexity / the oracle's at the same budget
    dense_ppl: dict[str, float] = field(default_factory=dict)  # dataset -> dense perplexity


def recall_cells(summary: ModelSummary, payload: dict, source: str) -> None:
    records = [r for r in payload["records"] if "per_document" in r and (is_predictor(r) or baseline_of(r))]
    layers = summary_layers(payload)
    summary.notes["layers"] = layer_text(layers)
    records = [r for r in records if r["layer"] in layers]
    predictors = [r for r in records if is_predictor(r)]
    no_gate = next((r["n/a"] for r in payload["records"] if r.get("ranking") == "|SiLU(g)|" and "n/a" in r), None)
    if no_gate:
        summary.notes["gate"] = no_gate
    for block, inputs in (("mlp", ("same", "lookahead")), ("att", ("same", "lookahead"))):
        for k in payload["fractions"]:
            for name in inputs:
                chosen = select(predictors, block, name, "topk", k)
                summary.cells[f"{block} Recall@K {k:g} {name}"] = recall_cell(chosen, source, layers)
                summary.cells[f"{block} Captured Mass {k:g} {name}"] = ratio_cell(
                    chosen, "mass_predicted", "mass_true", source, layers)
            for baseline in BASELINES:
                chosen = [r for r in records if baseline_of(r) == baseline and r["block"] == block and r["k"] == k]
                if chosen:
                    summary.cells[f"{block} {baseline} Recall@K {k:g}"] = recall_cell(chosen, source, layers)
                    summary.cells[f"{block} {baseline} Captured Mass {k:g}"] = ratio_cell(
                        chosen, "mass_predicted", "mass_true", source, layers)
    d = payload["distance_fraction"]
    for block, others in (("mlp", ("lookahead", "l-1", "l-2")), ("att", ("lookahead", "l-2"))):
        same = select(predictors, block, "same", "topk", d)
        for name in others[1:]:
            summary.cells[f"{block} Recall@K {d:g} {name}"] = recall_cell(select(predictors, block, name, "topk", d),
                                                                          source, layers)
        for name in others:
            summary.cells[f"{block} penalty {d:g} same - {name}"] = penalty_cell(
                same, select(predictors, block, name, "topk", d), source, layers)
    arch = [r for r in predictors if r["block"] == "mlp" and r["label"] in ("relu", "gate")]
    summary.notes["architecture label"] = payload.get("architecture_label", "")
    for name in ("same", "lookahead"):
        chosen = [r for r in arch if r["input"] == name]
        summary.cells[f"arch Recall@K {name}"] = recall_cell(chosen, source, layers)
        summary.cells[f"arch Recall {name}"] = ratio_cell(chosen, "tp", "active", source, layers)
        summary.cells[f"arch Precision {name}"] = ratio_cell(chosen, "tp", "predicted", source, layers)
        summary.cells[f"arch Classifier Sparsity {name}"] = ratio_cell(chosen, "predicted", "tokens", source, layers)
        if chosen:
            summary.cells[f"arch Precision {name}"].chance = float(np.mean([r["chance Precision"] for r in chosen]))


def gate_cells(summary: ModelSummary, payload: dict, source: str) -> None:
    """The gate alone (decomposition (c)): pooled over the summary's layer set."""
    layers = summary_layers(payload)
    gate = [r for r in payload["records"] if r.get("ranking") in ("|g|", "g", "sign(g)") and "per_document" in r
            and r["layer"] in layers]
    for k in payload["fractions"] if gate else []:
        for ranking in ("|g|", "g", "sign(g)"):
            chosen = [r for r in gate if r["k"] == k and r["ranking"] == ranking]
            cell = Cell(bootstrap(document_columns(chosen, "topk_hits", lambda r: r["K"]), ratio("num", "den")),
                        chance=chosen[0]["chance Recall@K"], sources=[source], layers=layers)
            summary.cells[f"gate {ranking} Recall@K {k:g}"] = cell
        share = [r["gate_positive_share"] for r in gate if "gate_positive_share" in r]  # the sign(g) records
        summary.notes["gate positive share"] = f"{np.mean(share):.3f}"


def build_summaries(models: Sequence[str], recall: Sequence[tuple[str, dict]], drift: Sequence[tuple[str, dict]],
                    sweeps: Sequence[tuple[list[str], dict, dict]], dims: dict[str, dict] | None = None
                    ) -> list[ModelSummary]:
    """One ModelSummary per model. recall / drift: (source id, payload); sweeps: (source ids, row, manifest)."""
    summaries = {m: ModelSummary(m, dims=(dims or {}).get(m, {})) for m in models}
    for source, payload in recall:
        summary = summaries[payload["source"]["model"]]
        recall_cells(summary, payload, source)
        gate_cells(summary, payload, source)
    for source, payload in drift:
        summary = summaries[payload["source"]["model"]]
        summary.cells.update(drift_cells(payload, source))
        massive = payload.get("massive_dims")
        summary.notes["massive dims"] = f"{massive['count']}" if massive else "not excluded"
    dense = {(row["model"], row["dataset"]): (ids, row, manifest) for ids, row, manifest in sweeps
             if row["mode"] == "dense"}
    runs = {(row["model"], row["dataset"], row["mode"], row_budget(row)): (ids, manifest)
            for ids, row, manifest in sweeps if row["mode"] != "dense"}
    for (model, dataset), (_, row, _) in dense.items():
        summaries[model].dense_ppl[dataset] = float(row["perplexity"])
    for model, summary in summaries.items():
        summary.notes["wiring"] = sweep_wiring([row for _, row, _ in sweeps if row["model"] == model])
    for (model, dataset, mode, budget), (ids, manifest) in runs.items():
        if (model, dataset) not in dense:
            continue
        dense_ids, _, dense_manifest = dense[(model, dataset)]
        cell = perplexity_ratio_cell(manifest, dense_manifest, [*ids, *dense_ids])
        summaries[model].cells[run_key_text(dataset, mode, budget)] = cell
        summaries[model].ppl[(dataset, mode, budget)] = cell
        oracle = runs.get((model, dataset, "oracle", budget))
        if mode != "oracle" and oracle is not None:
            summaries[model].vs_oracle[(dataset, mode, budget)] = perplexity_ratio_cell(
                manifest, oracle[1], [*ids, *oracle[0]])
    return [summaries[m] for m in models]


def sweep_wiring(rows: list[dict]) -> str:
    """What produced a model's sparse rows, from the sweep's own columns: the predictors' input, whether each was
    trained for its row's budget, and the layers every sparse mode kept dense."""
    sparse = [r for r in rows if r["mode"] != "dense"]
    if not sparse or "dense_layers" not in sparse[0]:
        return "predictor input, label and layer policy not recorded by this sweep"
    predicted = [r for r in sparse if r["mode"] == "predictor"]
    inputs = ", ".join(sorted({r["predictor_input"] for r in predicted})) or "no predictor rows"
    mismatched = sum(r[f"{b}_trained_k"] != (r[f"{b}_topk"] if r[f"{b}_topk"] != "dense" else "n/a")
                     for r in predicted for b in ("mlp", "att"))
    label = ("top-K label trained at each row's budget" if not mismatched else
             f"{mismatched} predictor(s) trained for another K than their row's budget")
    dense = ", ".join(sorted({r["dense_layers"] for r in sparse}))
    return f"predictor input {inputs}, {label}; layers kept dense in every sparse mode: {dense}"


def run_key_text(dataset: str, mode: str, budget: Budget) -> str:
    """The summary.csv column of a perplexity ratio."""
    return f"ppl ratio {dataset} {mode} {budget.panel} mlp {budget.mlp or 'dense'} att {budget.att or 'dense'}"


def headline_dataset(summaries: Sequence[ModelSummary]) -> str | None:
    datasets = list(dict.fromkeys(dataset for s in summaries for dataset, _, _ in s.ppl))
    return "c4" if "c4" in datasets else (datasets[0] if datasets else None)


def budgets_of(summaries: Sequence[ModelSummary], dataset: str, block: str) -> list[Budget]:
    return sorted({b for s in summaries for ds, _, b in s.ppl if ds == dataset and b.panel == block},
                  key=Budget.sort_key)


# ------------------------------------------------------------------------------------- tables
def cell_sources(summary: ModelSummary, keys: Sequence[str]) -> str:
    return ", ".join(dict.fromkeys(s for k in keys if k in summary.cells for s in summary.cells[k].sources))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], render: Callable[[Any], str] = str) -> list[str]:
    """A markdown table; wider than MAX_COLUMNS is an error (split it, the CSVs keep every column)."""
    if len(headers) > MAX_COLUMNS:
        raise ValueError(f"a markdown table of {len(headers)} columns (at most {MAX_COLUMNS}): {list(headers)}")
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *["| " + " | ".join(render(v).replace("|", "\\|") for v in row) + " |" for row in rows], ""]


def grid(summaries: Sequence[ModelSummary], columns: Sequence[tuple[str, str]], extra: Callable | None = None,
         chance: bool = True) -> list[list[str]]:
    """One row per model: the cells of `columns` ((header, cell key)), then the uniform-chance levels and sources."""
    rows = []
    for s in summaries:
        keys = [key for _, key in columns]
        if not any(k in s.cells and s.cells[k].interval for k in keys):
            continue
        chances = sorted({f"{s.cells[k].chance:.3f}" for k in keys if k in s.cells and s.cells[k].chance is not None},
                         key=float)
        rows.append([s.model, *(extra(s) if extra else []),
                     *(s.cells[k].text() if k in s.cells else "n/a" for k in keys),
                     *([", ".join(chances) or "n/a"] if chance else []), cell_sources(s, keys)])
    return rows


def ranking_rows(summaries: Sequence[ModelSummary], block: str, fractions: Sequence[float], metric: str
                 ) -> tuple[list[str], list[list[str]]]:
    """Rows (model, K): the lookahead predictor, the same-layer one and the baselines present, for `metric`."""
    present = [b for b in BASELINES if any(f"{block} {b} {metric} {k:g}" in s.cells for s in summaries
                                           for k in fractions)]
    headers = ["model", "K", "layers", "lookahead predictor", "same-layer predictor", *present]
    rows = []
    for s in summaries:
        for k in fractions:
            keys = [f"{block} {metric} {k:g} lookahead", f"{block} {metric} {k:g} same",
                    *(f"{block} {b} {metric} {k:g}" for b in present)]
            cells = [s.cells.get(key) for key in keys]
            if not any(c is not None and c.interval for c in cells):
                continue
            chance = cells[0].chance if cells[0] is not None else None
            rows.append([s.model, f"{k:g}", s.notes.get("layers", "n/a"),
                         *(c.text() if c is not None else "n/a" for c in cells),
                         *([f"{chance:.3f}"] if metric == "Recall@K" else []), cell_sources(s, keys)])
    return headers + (["uniform chance"] if metric == "Recall@K" else []) + ["src"], rows


def summary_tables(summaries: Sequence[ModelSummary], fractions: Sequence[float], distance: float | None) -> list[str]:
    """The summary section's markdown."""
    lines = ["Every cell: value [95% interval: bootstrap over held-out documents] and, for trained predictors, "
             "s min to max over training seeds. Values pool the layers named in each row (the same set for every "
             "input of a model, layer 0 left out) and the seeds. Uniform chance: a ranking that ignores the input "
             "(Recall@K = K / units; a difference: 0; a cosine: 0); the static top-K is the input-independent baseline.", ""]
    for block, title in (("mlp", "MLP neurons"), ("att", "Attention heads (query heads)")):
        for metric in ("Recall@K", "Captured Mass"):
            headers, rows = ranking_rows(summaries, block, fractions, metric)
            if rows:
                lines += [f"**{title}: {metric}, label top-K by |activation| for every model** (OPT: the ReLU "
                          f"output; Llama: |SiLU(g)·u|; attention: the head output norm)", ""]
                lines += table(headers, rows)
    arch_columns = [(f"{metric} lookahead", f"arch {metric} lookahead")
                    for metric in ("Recall", "Precision", "Classifier Sparsity", "Recall@K")]
    rows = grid(summaries, arch_columns, extra=lambda s: [s.notes.get("architecture label", ""),
                                                          s.notes.get("layers", "n/a")])
    if rows:
        lines += ["**MLP, the architecture's own label, lookahead input** (OPT: relu, y > 0; Llama: gate, g > 0): "
                  "Recall = TP / active, Precision = TP / predicted, Classifier Sparsity = units predicted active "
                  "per token (a count), Recall@K at K = the mean active count; uniform chance = the Precision of a "
                  f"random set. The same-layer version is in the per-layer table ({GATE_LINEAR_NOTE}).", ""]
        lines += table(["model", "label", "layers", *(h for h, _ in arch_columns), "uniform chance", "src"], rows)
    if distance is not None:
        penalty_columns = [(f"MLP same - {INPUT_NAMES[i]}", f"mlp penalty {distance:g} same - {i}")
                           for i in ("lookahead", "l-1", "l-2")]
        penalty_columns += [(f"att same - {INPUT_NAMES[i]}", f"att penalty {distance:g} same - {i}")
                            for i in ("lookahead", "l-2")]
        rows = grid(summaries, penalty_columns, extra=lambda s: [s.notes.get("layers", "n/a")], chance=False)
        if rows:
            lines += [f"**Lookahead penalty at K={distance:g}**: Recall@K(same-layer input) - Recall@K(earlier "
                      f"input), paired by layer, seed and document; uniform chance 0 (MLP lookahead = att_x_l; "
                      f"attention lookahead = att_x_(l-1), so its l-1 column is the lookahead column)", ""]
            lines += table(["model", "layers", *(h for h, _ in penalty_columns), "src"], rows)
    lines += drift_tables(summaries)
    lines += perplexity_tables(summaries)
    return lines


def drift_tables(summaries: Sequence[ModelSummary]) -> list[str]:
    lines = []
    columns = [(f"{space}, {dims.replace('_', ' ')} dims", f"drift same-token {space} {dims}")
               for space in ("raw", "normed") for dims in ("all", "without_massive")]
    rows = grid(summaries, columns, extra=lambda s: [drift_layers(s), s.notes.get("massive dims", "")], chance=False)
    if rows:
        lines += ["**Residual-stream drift at k=1**: cosine(att_x_l, att_x_(l+1)) of the same token, mean over the "
                  "layers named and tokens; uniform chance 0", ""]
        lines += table(["model", "layers", "massive dims left out", *(h for h, _ in columns), "src"], rows)
    others = [p for p in DRIFT_PAIRINGS[1:] if any(f"drift {p} raw all" in s.cells for s in summaries)]
    if others:
        columns = [(f"{pairing} {space}", f"drift {pairing} {space} all") for space in ("raw", "normed")
                   for pairing in ("same-token", *others)]
        if len(columns) > 6:  # with the layers, model and src columns: at most 10
            columns = [c for c in columns if c[1].endswith(("raw all",))] + [c for c in columns if "normed" in c[1]
                                                                               and "same-token" in c[1]]
        lines += ["**Drift against its baselines** (all dims): the same cosine for pairs of different tokens "
                  "(cross-token) and after subtracting each layer's mean vector (centred)", ""]
        lines += table(["model", "layers", *(h for h, _ in columns), "src"],
                       grid(summaries, columns, extra=lambda s: [drift_layers(s)], chance=False))
    return lines


def drift_layers(summary: ModelSummary) -> str:
    cell = summary.cells.get("drift same-token raw all")
    if cell is None or cell.layers is None:
        return "all (layer 0 included: drift.json predates the layer set)"
    return layer_text(cell.layers)


def wiring_text(summaries: Sequence[ModelSummary], key: str = "wiring") -> str:
    """Per model, what produced its sparse rows (sweep_wiring of the perplexity or, key 'task wiring', task sweep)."""
    return "; ".join(f"{s.model}: {s.notes[key]}" for s in summaries if key in s.notes)


def perplexity_tables(summaries: Sequence[ModelSummary]) -> list[str]:
    """Per dataset: rows (model, budget), columns the sparse modes; ratio to the model's dense perplexity."""
    lines = []
    datasets = list(dict.fromkeys(dataset for s in summaries for dataset, _, _ in s.ppl))
    modes = [m for m in SPARSE_MODES if any(mode == m for s in summaries for _, mode, _ in s.ppl)]
    for dataset in datasets:
        rows = []
        for s in summaries:
            for budget in sorted({b for ds, _, b in s.ppl if ds == dataset}, key=Budget.sort_key):
                keys = [run_key_text(dataset, mode, budget) for mode in modes]
                rows.append([s.model, budget.text(s.dims), *(s.ppl[(dataset, m, budget)].text()
                                                             if (dataset, m, budget) in s.ppl else "n/a"
                                                             for m in modes), cell_sources(s, keys)])
        methods = sorted({cell.interval.method for s in summaries for (ds, _, _), cell in s.ppl.items()
                          if ds == dataset and cell.interval is not None})
        lines += [f"**{dataset}: perplexity as a ratio to the model's dense perplexity** (same requests, paired with "
                  f"dense; interval: {'; '.join(methods) or 'none'}; 1.0 = no loss; {wiring_text(summaries)})", ""]
        lines += table(["model", "budget", *modes, "src"], rows)
    return lines


def csv_rows(summaries: Sequence[ModelSummary]) -> list[dict]:
    rows = []
    for s in summaries:
        row = {"model": s.model, **{f"note {k}": v for k, v in s.notes.items()}}
        for key, cell in s.cells.items():
            row.update(cell.csv(key))
        for (dataset, mode, budget), cell in s.vs_oracle.items():
            row.update(cell.csv(run_key_text(dataset, mode, budget).replace("ppl ratio", "ppl vs oracle")))
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------- the decomposition
def decomposition_tables(summaries: Sequence[ModelSummary], fractions: Sequence[float], distance: float,
                         activations: dict[str, str]) -> list[str]:
    """(a) activation function, (b) input distance, (c) the gate alone: tables of the summary's own cells."""
    lines = ["(a) **Activation function**: the same label and inputs on every model; models that differ only in the "
             "MLP activation (e.g. the bundled tiny Llama and Llama-ReLU: same size, data and steps) isolate it.", ""]
    columns = [(f"K={k:g} lookahead", f"mlp Recall@K {k:g} lookahead") for k in fractions]
    columns += [("arch label Precision, lookahead", "arch Precision lookahead")]
    lines += table(["model", "MLP activation", "layers", *(h for h, _ in columns), "uniform chance", "src"],
                   grid(summaries, columns, extra=lambda s: [activations.get(s.model, "not recorded"),
                                                             s.notes.get("layers", "n/a")]))
    lines += [f"(b) **Drift**: Recall@K at K={distance:g} against how far back the predictor's input is taken (MLP: "
              "mlp_x_l, att_x_l, att_x_(l-1), att_x_(l-2); attention: att_x_l, att_x_(l-1), att_x_(l-2)), every "
              "column on the same layers as the lookahead penalty.", ""]
    columns = [(f"MLP {INPUT_NAMES[i]}", f"mlp Recall@K {distance:g} {i}") for i in MLP_INPUTS]
    columns += [(f"att {INPUT_NAMES[i]}", f"att Recall@K {distance:g} {i}") for i in ATT_INPUTS]
    lines += table(["model", "layers", *(h for h, _ in columns), "src"],
                   grid(summaries, columns, extra=lambda s: [s.notes.get("layers", "n/a")], chance=False))
    with_gate = [s for s in summaries if any(key.startswith("gate ") for key in s.cells)]
    rows = []
    for s in with_gate:
        for k in fractions:
            keys = [f"mlp Recall@K {k:g} lookahead", f"gate |g| Recall@K {k:g}", f"gate g Recall@K {k:g}",
                    f"gate sign(g) Recall@K {k:g}"]
            chance = s.cells[keys[1]].chance if keys[1] in s.cells else None
            rows.append([s.model, f"{k:g}", s.notes.get("layers", "n/a"), s.notes.get("gate positive share", "n/a"),
                         *(s.cells[key].text() if key in s.cells else "n/a" for key in keys),
                         "n/a" if chance is None else f"{chance:.3f}", cell_sources(s, keys)])
    if rows:
        lines += ["(c) **The gate alone** (Llama with mlp_gate collected; no training): the true top-K by "
                  "|SiLU(g)·u| against the top-K by |g|, the top-K by g, and the share of it with g > 0 (a set of "
                  "varying size), next to the lookahead predictor.", ""]
        lines += table(["model", "K", "layers", "share of g > 0", "lookahead predictor", "top-K by abs(g)",
                        "top-K by g", "covered by g > 0", "uniform chance", "src"], rows)
    return lines


# ------------------------------------------------------------------------------------- per layer
def three_decimals(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def per_layer_tables(recall: Sequence[tuple[str, dict]], drift: Sequence[tuple[str, dict]],
                     sparsity: Sequence[tuple[str, dict]], distance: float) -> list[str]:
    """(d) One table per model, one row per layer: drift at k=1, the gate's negative share, Recall@K at K =
    `distance` of the same-layer and DejaVu lookahead inputs (mean over seeds), and the Recall of the architecture's
    own label from both inputs; uniform chance in the heading."""
    drift_of = {p["source"]["model"]: (src, p) for src, p in drift}
    sparsity_of = {p["source"]["model"]: (src, p) for src, p in sparsity}
    lines = [f"(d) **Per layer** (K={distance:g}; Recall@K is the mean over seeds of each layer's held-out Recall@K; "
             "drift is cosine(att_x_l, att_x_(l+1)) over all dims; gate < 0 is the share of gate pre-activations "
             "below zero, from sparsity_stats.py; arch label: the Recall of the architecture's own label, the "
             f"same-layer one marked † ({GATE_LINEAR_NOTE}).", ""]
    for src, payload in recall:
        model = payload["source"]["model"]
        d_src, d = drift_of.get(model, ("", {"records": []}))
        s_src, s = sparsity_of.get(model, ("", {"records": []}))
        cosine = {(r["layer"], r["space"]): r["mean"] for r in d["records"]
                  if (r["kind"], r["k"], r["dims"]) == ("att_x", 1, "all")}
        gate = {r["layer"]: r.get("gate_negative_fraction") for r in s["records"]}
        rows, chances = [], {}
        for layer in range(payload["source"]["dims"]["num_layers"]):
            cells = []
            for block in ("mlp", "att"):
                for name in ("same", "lookahead"):
                    chosen = [r for r in select(payload["records"], block, name, "topk", distance)
                              if r["layer"] == layer and is_predictor(r)]
                    cells.append(three_decimals(np.mean([r["Recall@K"] for r in chosen]) if chosen else None))
                    chances.update({block: r["chance Recall@K"] for r in chosen})
            for name in ("same", "lookahead"):
                chosen = [r for r in payload["records"] if r["block"] == "mlp" and r["label"] in ("relu", "gate")
                          and r["input"] == name and r["layer"] == layer and is_predictor(r)]
                cells.append(three_decimals(np.mean([r["Recall"] for r in chosen]) if chosen else None))
            if all(c == "n/a" for c in cells):
                continue
            rows.append([layer, three_decimals(cosine.get((layer, "raw"))),
                         three_decimals(cosine.get((layer, "normed"))), three_decimals(gate.get(layer)), *cells])
        lines += [f"**{model}** [{', '.join(x for x in (src, d_src, s_src) if x)}]; uniform chance of Recall@K: MLP "
                  f"{three_decimals(chances.get('mlp'))}, attention {three_decimals(chances.get('att'))}", ""]
        lines += table(["layer", "drift k=1 raw", "drift k=1 normed", "gate < 0", "MLP same-layer",
                        "MLP lookahead", "att same-layer", "att lookahead", "arch label same-layer †",
                        "arch label lookahead"], rows)
    return lines
