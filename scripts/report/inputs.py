"""The report's inputs, recognised by content, and the sources every number names (file, command, commit, manifest)."""
from __future__ import annotations

import csv
import functools
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


from Decentralized_FM_alpha.utils.selection import fraction_count
from scripts.analysis.common import model_label
from scripts.report.speed import is_bench

ANALYSES = ("drift", "lookahead", "sparsity_stats", "label_sweep", "recall_summary")  # the JSONs' "analysis" key
PREDICTOR_JSON = re.compile(r"(mlp|att)_layer(\d+)\.json")
SEED_DIR = re.compile(r"seed\d+")
SWEEP_REQUIRED = ("model", "dataset", "mode", "perplexity")
TASKS_REQUIRED = ("model", "task", "mode", "acc", "acc_stderr")
LAYER_SWEEP_REQUIRED = ("model", "block", "mode", "budget", "layer", "log_increase")  # scripts/study/layer_sweep.py


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
    layer_sweeps: list[tuple[Path, list[dict]]] = field(default_factory=list)  # one layer sparse at a time
    studies: list[tuple[Path, dict]] = field(default_factory=list)  # run_study.py manifests: stage wall times
    benches: list[tuple[Path, dict]] = field(default_factory=list)  # bench_sparse_decode.py JSONs: decode speed
    missing: list[str] = field(default_factory=list)
    unrecognised: list[str] = field(default_factory=list)


def read_json_file(path: Path) -> Any:
    """A JSON file's content, read once per version of the file (the report reads each task result for its source,
    its per-document scores and its table): callers must not modify what it returns."""
    path = Path(path)
    return _read_json(str(path.resolve()), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _read_json(path: str, mtime_ns: int) -> Any:
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
        if is_bench(payload):
            inputs.benches.append((path, payload))
            return True
        return False
    if path.suffix == ".csv":
        columns, rows = read_csv(path)
        for required, found in ((LAYER_SWEEP_REQUIRED, inputs.layer_sweeps), (SWEEP_REQUIRED, inputs.sweeps),
                                (TASKS_REQUIRED, inputs.task_sweeps)):
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


def model_dims(inputs: Inputs) -> dict[str, dict]:
    """model -> its dims (num_layers, ffn_dim, num_heads, ...) from any input that records them."""
    dims = {model_label(m): m["config"] for _, m in inputs.collections if m.get("config")}
    for results in inputs.results.values():
        for _, r in results:
            dims.setdefault(r["source"]["model"], r["source"].get("dims") or {})
    for s in inputs.predictors:
        dims.setdefault(s.model, s.records[0][1]["data"].get("dims") or {})
    return dims


# ------------------------------------------------------------------------------------- budgets
UNSET = (None, "", "dense", "n/a")
PANELS = ("none", "both", "both groups", "mlp", "att", "att groups")  # Budget.panel, in the order tables show them


@dataclass(frozen=True, eq=False)
class Budget:
    """A sweep or task row's setting: which block is sparse and what each block keeps, as the CSV gives it.

    Older CSVs have no `block` and give counts or fractions in mlp_topk / att_topk; newer ones (the lead's sweep
    columns) add block, mlp_kept, att_kept and att_unit. Both read the same here."""
    block: str  # none (dense), mlp, att or both
    mlp: str | None  # as given: a fraction or a count; None = dense
    att: str | None
    mlp_kept: int | None = None
    att_kept: int | None = None
    att_unit: str = "heads"

    @property
    def key(self) -> tuple:
        """What identifies the setting: the block and the budgets as numbers (the kept counts follow from them)."""
        def number(value: str | None) -> float | None:
            return None if value is None else float(value)
        return self.panel, number(self.mlp), number(self.att)

    @property
    def panel(self) -> str:
        """The block with its attention unit: none, both, mlp, att, and 'both groups' / 'att groups' when whole
        key/value groups are kept (rows of their own beside the head rows)."""
        return f"{self.block} groups" if self.att is not None and self.att_unit == "groups" else self.block

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Budget) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def sort_key(self) -> tuple:
        return (PANELS.index(self.panel), float(self.mlp or 2), float(self.att or 2))

    def mlp_count(self, ffn: int | None) -> int | None:
        if self.mlp_kept is not None or self.mlp is None:
            return self.mlp_kept
        value = float(self.mlp)
        return int(value) if value >= 1 else (fraction_count(value, ffn) if ffn else None)

    def att_count(self, heads: int | None, kv_heads: int | None = None) -> int | None:
        """Query heads kept: the CSV's att_kept (a head count for group rows too), else the budget as a count, or a
        fraction of the heads (of the key/value groups for group rows, times the heads a group holds)."""
        if self.att_kept is not None or self.att is None:
            return self.att_kept
        value = float(self.att)
        if value >= 1:
            return int(value)
        if self.att_unit == "groups":
            return fraction_count(value, kv_heads) * (heads // kv_heads) if heads and kv_heads else None
        return fraction_count(value, heads) if heads else None

    def text(self, dims: dict | None = None) -> str:
        """'0.25 of neurons, 2 of 4 heads' (kept): the budget in the units of the figures' axes."""
        dims = dims or {}
        parts = []
        if self.mlp is not None:
            value = float(self.mlp)
            parts.append(f"{value:g} of neurons" if value < 1 else
                         f"{int(value)} of {dims['ffn_dim']} neurons" if dims.get("ffn_dim") else
                         f"{int(value)} neurons")
        else:
            parts.append("MLP dense")
        heads, kv_heads = dims.get("num_heads"), dims.get("num_kv_heads")
        if self.att is None:
            parts.append("attention dense")
        else:
            count = self.att_count(heads, kv_heads)
            kept = f"{count} of {heads} heads" if count is not None and heads else (
                f"{count} heads" if count is not None else f"{float(self.att):g} of the {self.att_unit}")
            if self.att_unit == "groups" and count is not None and heads and kv_heads:
                fraction = f"{float(self.att):g} of kv groups = " if float(self.att) < 1 else ""
                kept = f"{fraction}{count // (heads // kv_heads)} of {kv_heads} kv groups ({kept})"
            elif self.att_unit == "groups":
                kept += " in whole kv groups"
            parts.append(kept)
        return ", ".join(parts)


def optional_int(value: str | None) -> int | None:
    return None if value in UNSET else int(float(value))


def row_budget(row: dict) -> Budget:
    """The Budget of a sweep or task CSV row."""
    mlp = None if row.get("mlp_topk") in UNSET else str(row["mlp_topk"])
    att = None if row.get("att_topk") in UNSET else str(row["att_topk"])
    block = row.get("block") or ("none" if row.get("mode") == "dense" or not (mlp or att) else
                                 "both" if mlp and att else "mlp" if mlp else "att")
    return Budget(block, mlp, att, optional_int(row.get("mlp_kept")), optional_int(row.get("att_kept")),
                  row.get("att_unit") if row.get("att_unit") not in UNSET else "heads")


def all_models(inputs: Inputs) -> list[str]:
    models = [model_label(m) for _, m in inputs.collections]
    models += [r["source"]["model"] for results in inputs.results.values() for _, r in results]
    models += [s.model for s in inputs.predictors]
    models += [row["model"] for _, rows in inputs.sweeps for row in rows]
    models += [row["model"] for _, rows in inputs.task_sweeps for row in rows]
    return list(dict.fromkeys(models))
