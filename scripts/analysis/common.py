"""What the analysis scripts (drift, lookahead, sparsity_stats, plots, report) share, written once.

Reading a collection (SPEC §6) in row chunks of a deterministic sample, per-row cosine, percentile summaries,
predictor training through sparse_predictor.trainer (SPEC §7), result files with their provenance, and the plot
style (one colour per model). Scripts import it as `scripts.analysis.common` after putting the repo root on sys.path.
"""
from __future__ import annotations

import argparse
import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from Decentralized_FM_alpha.utils import work
from Decentralized_FM_alpha.utils.activation_store import ActivationStore
from Decentralized_FM_alpha.utils.manifest import now, read_json, write_json_atomic
from sparse_predictor import main_att, main_mlp, main_mlp_llama
from sparse_predictor.trainer.cli import require_complete, resolve_device
from sparse_predictor.trainer.labels import LabelSpec
from sparse_predictor.trainer.model import TrainConfig, TrainResult, train_predictor, train_stacked
from sparse_predictor.trainer.rows import LayerData, SplitConfig, load_layer

PERCENTILES = (5, 25, 50, 75, 95)
CHUNK_BYTES = 256 << 20  # float32 bytes of activations held at once while streaming a sample
MODEL_FAMILIES = ("opt", "llama")
# DejaVu's default MLP label per family, as the mains define it (SPEC §7).
DEFAULT_MLP_LABEL = {"opt": (main_mlp.DEFAULTS["label"], main_mlp.DEFAULTS["k"]),
                     "llama": (main_mlp_llama.DEFAULTS["label"], main_mlp_llama.DEFAULTS["k"])}
DEFAULT_ATT_K = main_att.DEFAULTS["k"]
RUN_SCRIPT_LR = 1e-3  # what sparse_predictor/run_c4_mlp*.sh train with


# ------------------------------------------------------------------------------------- collections
def open_collection(data_dir: str | os.PathLike) -> ActivationStore:
    """A complete collection; an incomplete one is an error, as for predictor training."""
    store = ActivationStore(data_dir)
    require_complete(store)
    return store


def model_family(manifest: dict) -> str:
    """opt or llama, from the collection's model_type (opt-save, llama-save, ...)."""
    model_type = str(manifest.get("model_type", ""))
    for family in MODEL_FAMILIES:
        if model_type.startswith(family):
            return family
    raise ValueError(f"model_type {model_type!r} in the manifest is neither OPT nor Llama "
                     f"(expected a value starting with one of {MODEL_FAMILIES})")


def model_label(manifest: dict) -> str:
    """Short model name for tables and legends: the last part of model_name (a hub id or a path)."""
    return Path(str(manifest["model_name"]).rstrip("/")).name


def collection_source(store: ActivationStore) -> dict[str, Any]:
    """Where a result's rows came from: the collection, its manifest and that manifest's own provenance."""
    m = store.manifest
    return {"data_dir": str(store.data_dir.resolve()), "manifest": str((store.data_dir / "manifest.json").resolve()),
            "model_name": m.get("model_name"), "model_type": m.get("model_type"), "model": model_label(m),
            "family": model_family(m), "rows_written": store.rows, "dims": store.dims.__dict__,
            "source_data": m.get("source_data"), "collection_command": m.get("command"),
            "collection_git_commit": m.get("git_commit")}


@dataclass(frozen=True)
class RowSample:
    """Sorted row indices of a collection to analyse, and how they were chosen."""
    rows: np.ndarray  # (n,) int64, ascending
    available: int  # rows eligible before subsampling
    first_token_rows_dropped: int
    seed: int
    max_rows: int | None
    position_0: str  # what the dropped rows are: the BOS token, or the first text token when there is no BOS

    def describe(self) -> dict[str, Any]:
        return {"rows_used": int(len(self.rows)), "rows_eligible": self.available,
                "first_token_rows_dropped": self.first_token_rows_dropped, "position_0": self.position_0,
                "seed": self.seed, "max_rows": self.max_rows}


def sample_rows(store: ActivationStore, max_rows: int | None, seed: int, exclude_first_token: bool) -> RowSample:
    """Rows to analyse: optionally without position 0 of each document, then at most max_rows drawn with seed."""
    eligible = np.arange(store.rows)
    dropped = 0
    if exclude_first_token:
        positions = np.asarray(store.token_index()[:, 1])
        eligible = eligible[positions != 0]
        dropped = store.rows - len(eligible)
    if len(eligible) == 0:
        raise ValueError(f"{store.data_dir}: no rows left to analyse after dropping {dropped} first-token rows")
    if max_rows is not None and max_rows < len(eligible):
        eligible = np.sort(np.random.default_rng(seed).choice(eligible, size=max_rows, replace=False))
    return RowSample(eligible.astype(np.int64), int(store.rows - dropped), dropped, seed, max_rows,
                     position_0(store.manifest))


def position_0(manifest: dict) -> str:
    """What position 0 of every document holds, as the collection's tokenizer record says (BOS or not)."""
    tokenizer = manifest.get("tokenizer")
    if not tokenizer:
        return "unknown: the collection predates the tokenizer record (re-collect to know whether it is a BOS)"
    return tokenizer["position_0"]


def rows_per_chunk(floats_per_row: int, budget_bytes: int = CHUNK_BYTES) -> int:
    return max(1, budget_bytes // (4 * floats_per_row))


def iter_row_chunks(rows: np.ndarray, chunk: int) -> Iterator[tuple[slice, np.ndarray]]:
    """(position in the sample, row indices) chunk by chunk."""
    for start in range(0, len(rows), chunk):
        part = slice(start, min(start + chunk, len(rows)))
        yield part, rows[part]


def read_rows_on(mm: np.ndarray, rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """read_rows onto `device`: the float16 rows go over as stored and become float32 there (on a GPU the cast is
    the device's, not the host's)."""
    work.count(file_bytes=len(rows) * mm.shape[1] * mm.itemsize)
    return torch.from_numpy(np.asarray(mm[rows])).to(device).float()


def read_rows(mm: np.ndarray, rows: np.ndarray) -> torch.Tensor:
    """The given rows of a float16 memmap as float32 on the CPU: only those rows are read from disk."""
    return read_rows_on(mm, rows, torch.device("cpu"))


# ------------------------------------------------------------------------------------- statistics
def rowwise_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n,) cosine of each row of a with the same row of b; a zero row gives 0 (no direction)."""
    dot = (a * b).sum(dim=1, dtype=torch.float64)
    norms = a.double().norm(dim=1) * b.double().norm(dim=1)
    return torch.where(norms > 0, dot / norms.clamp_min(1e-300), torch.zeros_like(dot)).float()


def summarize_values(values: np.ndarray) -> dict[str, float | int]:
    """Mean and the PERCENTILES of a 1-D sample, with its size."""
    if len(values) == 0:
        raise ValueError("cannot summarize an empty sample")
    values = np.asarray(values, dtype=np.float64)
    percentiles = np.percentile(values, PERCENTILES)
    return {"mean": float(values.mean()), **{f"p{p}": float(v) for p, v in zip(PERCENTILES, percentiles)},
            "n": int(len(values))}


def parse_fractions(spec: str) -> list[float]:
    values = [float(v) for v in spec.split(",")]
    if any(not 0 < v <= 1 for v in values):
        raise ValueError(f"fractions must be in (0, 1], got {spec}")
    return values


# ------------------------------------------------------------------------------------- predictor training
def train_and_evaluate(store: ActivationStore, block: str, layer: int, input_flag: str, label: LabelSpec,
                       cfg: TrainConfig, device: torch.device, max_device_bytes: int | None,
                       log: Callable[[str], None], split: SplitConfig = SplitConfig()) -> dict[str, Any]:
    """Train one predictor with the project's trainer; its held-out metrics and what it was trained on."""
    data = load_layer(store, block, layer, input_flag, label, device, cfg.batch_size, max_device_bytes, split)
    return trained_record(data, train_predictor(data, block, cfg, log=log), block, layer, input_flag, label)


def train_and_evaluate_together(store: ActivationStore, block: str, layer: int, input_flag: str,
                                labels: Sequence[LabelSpec], cfg: TrainConfig, device: torch.device,
                                max_device_bytes: int | None, log: Callable[[str], None],
                                split: SplitConfig = SplitConfig()) -> list[dict[str, Any]]:
    """train_and_evaluate of several labels of one layer and input: one read of the rows, the predictors trained in
    lockstep (train_stacked: each exactly as if trained alone with cfg.seed), one record per label, in order."""
    data = load_layer(store, block, layer, input_flag, labels, device, cfg.batch_size, max_device_bytes, split)
    results = train_stacked(data, block, cfg, [(i, cfg.seed) for i in range(len(labels))], log=log)
    return [trained_record(data, result, block, layer, input_flag, labels[result.label_index]) for result in results]


def trained_record(data: LayerData, result: TrainResult, block: str, layer: int, input_flag: str,
                   label: LabelSpec) -> dict[str, Any]:
    """A trained predictor's held-out metrics and what it was trained on."""
    return {**result.metrics, "block": block, "layer": layer, "input": input_flag, "input_kind": data.input.kind,
            "input_layer": data.input.layer, "label": label.name, "k": label.k, "threshold": label.threshold,
            "label_definition": label.definition(), "rows_train": data.rows_train,
            "rows_test": int(data.is_test.sum()), "best_epoch": result.best_epoch, "epochs_run": len(result.history)}


def device_from_args(args: argparse.Namespace) -> tuple[torch.device, int | None]:
    max_bytes = None if args.max_device_gb is None else int(args.max_device_gb * 2**30)
    return resolve_device(args.device), max_bytes


# ------------------------------------------------------------------------------------- result files
def write_results(out_dir: str | os.PathLike, stem: str, payload: dict[str, Any], records: Sequence[dict],
                  columns: Sequence[str], provenance: dict[str, Any]) -> tuple[Path, Path]:
    """`<out-dir>/<stem>.json` (payload + records + provenance) and `<stem>.csv` (the records), atomically.

    `provenance` is the script's base_manifest(...) taken at its start; the end time is added here.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / f"{stem}.json", out_dir / f"{stem}.csv"
    write_json_atomic(json_path, {**payload, "records": list(records), "csv": csv_path.name,
                                  "provenance": {**provenance, "end_time": now()}})
    write_csv_atomic(csv_path, records, columns)
    return json_path, csv_path


def write_csv_atomic(path: Path, records: Sequence[dict], columns: Sequence[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------- plots
MODEL_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
# One style per series kind, the same in every figure: the sparse modes, the predictor inputs and variants, the drift
# pairings and the reference lines. A figure that shows modes draws one panel per model, so a mode keeps its colour
# too; a panel that overlays models colours by model and keeps the kind's line and marker.
SERIES_STYLES = {
    "dense": {"color": "black", "linestyle": "-", "marker": None},
    "oracle": {"color": "#2ca02c", "linestyle": "--", "marker": "s"},
    "predictor": {"color": "#1f77b4", "linestyle": "-", "marker": "o"},
    "random": {"color": "#7f7f7f", "linestyle": ":", "marker": "x"},
    "static": {"color": "#ff7f0e", "linestyle": "-.", "marker": "^"},
    "gate": {"color": "#9467bd", "linestyle": (0, (5, 1, 1, 1)), "marker": "D"},
    "structured": {"color": "#bcbd22", "linestyle": (0, (3, 1)), "marker": "*"},
    "same-layer": {"color": "#17becf", "linestyle": "--", "marker": "v"},
    "earlier input": {"color": "#8c564b", "linestyle": (0, (3, 1, 1, 1, 1, 1)), "marker": "<"},
    "nonlinear predictor": {"color": "#e377c2", "linestyle": (0, (5, 2)), "marker": "P"},
    "same-token": {"color": "#1f77b4", "linestyle": "-", "marker": "o"},
    "cross-token": {"color": "#7f7f7f", "linestyle": ":", "marker": "x"},
    "centred": {"color": "#d62728", "linestyle": "-.", "marker": "^"},
    "uniform chance": {"color": "#7f7f7f", "linestyle": (0, (1, 3)), "marker": None},
}
MAX_SERIES = 6  # series per panel; more are split over panels


def series_style(kind: str, color: str | None = None) -> dict[str, Any]:
    """Line style of a series kind (a sparse mode, an input, a drift pairing, a reference line): the one mapping
    every figure uses. `color` replaces the kind's colour where colour tells models apart (panels without modes)."""
    if kind not in SERIES_STYLES:
        raise KeyError(f"no style for series {kind!r}; known: {sorted(SERIES_STYLES)}")
    style = dict(SERIES_STYLES[kind])
    if color is not None:
        style["color"] = color
    return style


def model_colors(models: Sequence[str]) -> dict[str, str]:
    """One colour per model, in first-seen order, the same in every figure of one report."""
    ordered = list(dict.fromkeys(models))
    if len(ordered) > len(MODEL_COLORS):
        raise ValueError(f"{len(ordered)} models but only {len(MODEL_COLORS)} distinct colours")
    return {m: MODEL_COLORS[i] for i, m in enumerate(ordered)}


MAX_PANELS = 4  # panels of one figure: more do not read on a paper's page; split the figure instead


def new_figure(ncols: int = 1, width: float = 6.0, height: float = 4.0, nrows: int = 1, sharey: bool = False):
    """A matplotlib figure drawn off-screen (Agg), so plots work on machines without a display; axes row-major. At
    most MAX_PANELS panels (an error otherwise: the caller splits the figure)."""
    if ncols * nrows > MAX_PANELS:
        raise ValueError(f"a figure of {nrows} x {ncols} panels: at most {MAX_PANELS}; split it")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update(FIGURE_STYLE)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, sharey=sharey)
    return fig, [ax for row in axes for ax in row]


FIGURE_STYLE = {"font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "legend.fontsize": 7,
                "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.spines.top": False, "axes.spines.right": False,
                "pdf.fonttype": 42}  # one style for every figure; TrueType fonts in the PDFs (journals ask for it)


def plot_series(ax, x: Sequence[float], y: Sequence[float], kind: str, label: str, color: str | None = None,
                low: Sequence[float] | None = None, high: Sequence[float] | None = None) -> None:
    """One series in its kind's style; an interval (low, high) is drawn as a band of the same colour."""
    style = series_style(kind, color)
    ax.plot(x, y, markersize=4, label=label, **style)
    if low is not None and high is not None:
        ax.fill_between(x, low, high, color=style["color"], alpha=0.15, linewidth=0)


def reference_line(ax, y: float, kind: str, label: str) -> None:
    """A horizontal reference (dense, uniform chance) in its kind's style."""
    style = series_style(kind)
    ax.axhline(y, color=style["color"], linestyle=style["linestyle"], linewidth=1.0, label=label)


MAX_LOG_TICKS = 6


def readable_log_ticks(low: float, high: float, most: int = MAX_LOG_TICKS) -> list[float]:
    """At most `most` ticks between low and high on a log axis: 1, 2 and 5 per decade when they fit, else the
    decades, else every n-th decade."""
    import math
    if not (low > 0 and high > low):
        return []
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    for subs in ((1, 2, 5), (1, 3), (1,)):
        ticks = [m * 10.0 ** e for e in range(first, last + 1) for m in subs if low <= m * 10.0 ** e <= high]
        if 2 <= len(ticks) <= most:
            return ticks
    step = max(1, math.ceil((last - first + 1) / most))
    return [10.0 ** e for e in range(first, last + 1, step) if low <= 10.0 ** e <= high]


def log_axis(ax, which: str = "y") -> None:
    """A log axis ('x' or 'y') with a few readable ticks (readable_log_ticks of the shown range, recomputed when the
    limits change) as plain numbers, and no labelled minor ticks (they piled up)."""
    from matplotlib.ticker import FuncFormatter, Locator, NullFormatter

    class Readable(Locator):
        def __call__(self):
            return readable_log_ticks(*sorted(self.axis.get_view_interval()))

    getattr(ax, f"set_{which}scale")("log")
    axis = ax.xaxis if which == "x" else ax.yaxis
    axis.set_major_locator(Readable())
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def log_y(ax) -> None:
    log_axis(ax, "y")


def figure_legend(fig, axes) -> None:
    """One legend for every panel of the figure (each label once), to the right of the panels, off the data."""
    handles, labels = [], []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    if handles:
        fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


def legend_outside(ax) -> None:
    """The legend to the right of the axes, off the data (when something is labelled)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                  borderaxespad=0.0)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """The figure as PNG at `path` and as PDF beside it (same stem); returns the PNG's path."""
    import matplotlib.pyplot as plt
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    for target in (path, path.with_suffix(".pdf")):  # bbox tight keeps the legends placed outside the axes
        fig.savefig(target, dpi=150, bbox_inches="tight",
                    **({"metadata": {"CreationDate": None}} if target.suffix == ".pdf" else {}))  # reproducible
    plt.close(fig)
    return path


def stored_partial(folder: Path, settings: dict, layer: int) -> dict | None:
    """folder/layer{L}.json when it was written with these settings, else None."""
    path = folder / f"layer{layer}.json"
    found = read_json(path) if path.is_file() else None
    return found if found is not None and found["settings"] == settings else None


def layer_partial(folder: Path, settings: dict, layer: int, compute: Callable[[int], dict]) -> dict:
    """A layer's results from its partial file (stored_partial), else compute(layer), kept there with the settings.
    A rerun resumes, and runs over groups of layers (the online study) are merged by a last run over all of them."""
    found = stored_partial(folder, settings, layer)
    if found is None:
        folder.mkdir(parents=True, exist_ok=True)
        found = {"settings": settings, **compute(layer)}
        write_json_atomic(folder / f"layer{layer}.json", found)
    return found


def per_layer_partials(folder: Path, settings: dict, layers: Sequence[int], compute: Callable[[int], list]) -> list:
    """The records of `layers` in order, each layer's through layer_partial."""
    return [record for layer in layers
            for record in layer_partial(folder, settings, layer, lambda l: {"records": compute(l)})["records"]]
