"""DejaVu sparse-predictor training, shared by main_mlp.py / main_att.py and their Llama twins (SPEC §7).

Everything that is not model-specific lives here once: reading a layer from the collected mmaps onto the
device, labels, the document split, the training loop, the metrics, checkpoint + JSON writing, the command
line of the four mains, and two sub-commands for the run_c4_*.sh scripts:
    python sparse_predictor/trainer.py launch MAIN --block mlp --data-dir D --out-dir O --log-dir L [-- MAIN's flags]
    python sparse_predictor/trainer.py summarize --block mlp --out-dir O [--num-layers N]

Behaviour kept from the original (FMInference/DejaVu sparse_predictor/main_{mlp,att}.py, trainer_{mlp,att}.py):
  - predictor Linear(d, D, bias=False) -> Linear(D, out, bias=False), PyTorch's default init, AdamW(wd 0.01);
  - class-weighted BCE: w = mean(y) over the batch (+0.005 for the MLP, +0 for attention); weight 1 on
    active units, w on inactive ones;
  - a unit is predicted active when sigmoid(logit) >= 0.5; the held-out split is evaluated before training and
    after every epoch; the kept model is the one with the best held-out Recall, and training stops after 5
    epochs without improvement or once that Recall exceeds 0.99 (--selection original, the default; --selection
    last trains all epochs and keeps the last, choosing nothing on the held-out split);
  - 95/5 split, the held-out part taken from the end of the collection (here: whole documents, no leak).
Deliberate differences: the BCE is computed from logits (stable; equal to the original's BCE(sigmoid(.)) except
where the original clamps log at -100), matmuls run under bf16 autocast on CUDA, whole batches are gathered on
the device instead of a per-sample DataLoader, and no run stops on an all-zero label row.
"""
from __future__ import annotations

import argparse
import csv
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

if __name__ == "__main__":  # lets `python sparse_predictor/trainer.py summarize ...` find the repo's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from Decentralized_FM_alpha.utils.activation_store import (ActivationStore, ModelDims, activation_file,  # noqa: E402
                                                            iter_row_chunks)
from Decentralized_FM_alpha.utils.manifest import (REPO_ROOT, base_manifest, now, read_json,  # noqa: E402
                                                   write_json_atomic)
from Decentralized_FM_alpha.utils.intervals import seed_spread as spread_over_seeds  # noqa: E402
from Decentralized_FM_alpha.utils.selection import COUNT_RULE, fraction_count, parse_layer_list  # noqa: E402

BLOCKS = ("mlp", "att")
MLP_LABELS = ("relu", "topk", "threshold", "gate")
DEFAULT_INPUT = {"mlp": "same", "att": "lookahead"}  # what the original trained on: mlp_x_l and att_x_{l-1}
NEGATIVE_WEIGHT_FLOOR = {"mlp": 0.005, "att": 0.0}  # trainer_mlp.py adds 0.005 to w, trainer_att.py does not
TEST_FRACTION = 0.05
MIN_TEST_DOCS = 30  # a few held-out documents gave Recall noise of several points (SmolLM2)
WEIGHT_DECAY = 0.01
EARLY_STOP_PATIENCE = 5
EARLY_STOP_RECALL = 0.99
SELECTIONS = {
    "original": "keep the epoch with the best held-out Recall (epoch 0 = untrained) and stop after 5 epochs without "
                "improvement or once it exceeds 0.99, as the original trainer; the reported metrics then come from "
                "the split that chose the epoch",
    "last": "train all --epochs and keep the last epoch: no choice made on the held-out split",
}
CHUNK_BYTES = 64 << 20  # per file and read-ahead slot: bounds host RAM whatever the number of rows
READ_AHEAD = 3
CPU_RESIDENT_BYTES = 2 << 30  # on a CPU run the "device" is host RAM: keep the layer under 2 GiB, stream beyond
GPU_RESIDENT_SHARE = 0.6  # of free GPU memory; the rest is for the model, optimizer, label chunks, batches

METRIC_DEFINITIONS = {
    "Recall": "original trainer_{mlp,att}.py: mean over eval batches of the mean true positives per token, divided "
              "by True Sparsity; eval batches of --batch_size rows in row order, so it equals TP/P except that the "
              "last, partial batch weighs as much as a full one",
    "True Sparsity": "original: mean over eval batches of the mean number of truly active units per token (a count)",
    "Classifier Sparsity": "original: mean over eval batches of the mean number of units predicted active "
                           "(sigmoid(logit) >= 0.5) per token (a count)",
    "Loss": "original: mean over eval batches of the class-weighted BCE",
    "Loss Weight": "original: mean over eval batches of w, the weight of inactive units in the BCE",
    "Precision": "true positives / units predicted active, summed over all held-out tokens (null if none predicted)",
    "Per-token Recall": "mean over held-out tokens with at least one active unit of TP/active for that token",
    "Recall@K": "predictor's top-K units vs the true top-K by the label's score, at equal budget K: hits / (K * "
                "tokens); a predicted unit tied with the true K-th score counts as long as the tie leaves room",
    "K": "topk labels: the label's own count fraction_count(k, out); other labels: the held-out mean number of "
         "active units per token, rounded (at least 1)",
    "fraction_count": COUNT_RULE,
}


# ------------------------------------------------------------------------------------- what to predict
@dataclass(frozen=True)
class LabelSpec:
    """Which units count as active for a token: `scores` rank the units and a rule cuts the ranking."""
    name: str  # relu | topk | threshold | gate (attention: topk)
    source_kind: str  # the collected kind the label is computed from: mlp_label, mlp_gate or att_label
    k: float | None = None  # topk: fraction of units kept per token
    threshold: float | None = None  # threshold: |y| > threshold

    def definition(self) -> str:
        return {"relu": "mlp_label > 0 (exact for a ReLU MLP: an inactive neuron contributes nothing)",
                "topk": f"top fraction_count(k, width) of |{self.source_kind}| per token, k = {self.k} "
                         f"({COUNT_RULE})",
                "threshold": f"|mlp_label| > {self.threshold}",
                "gate": "mlp_gate > 0 (gate projection before SiLU)"}[self.name]

    def width_of(self, files: dict[str, "RowFile"]) -> int:
        return files[self.source_kind].width

    def top_count(self, width: int) -> int:
        return fraction_count(self.k, width)

    def scores(self, values: torch.Tensor) -> torch.Tensor:
        """(rows, width) ranking of the units; the labels and the true top-K of Recall@K both come from it."""
        return values.abs() if self.name in ("topk", "threshold") else values

    def labels(self, scores: torch.Tensor) -> torch.Tensor:
        """(rows, width) bool: the active units."""
        if self.name == "topk":
            return topk_mask(scores, self.top_count(scores.shape[1]))
        return scores > (self.threshold if self.name == "threshold" else 0.0)


def make_label_spec(block: str, name: str, k: float | None, threshold: float | None, width: int) -> LabelSpec:
    """Validate the label flags; attention always uses the original top-k of head norms."""
    if block == "att":
        name, source = "topk", "att_label"
    else:
        source = "mlp_gate" if name == "gate" else "mlp_label"
    if name == "topk":
        if k is None:
            raise ValueError("--label topk needs --k (the fraction of units kept per token)")
        if not 0 < k <= 1:
            raise ValueError(f"--k {k}: need a fraction 0 < k <= 1 of the {width} units")
    elif k is not None:
        raise ValueError(f"--k is only used by --label topk, not by --label {name}")
    if name == "threshold":
        if threshold is None or threshold < 0:
            raise ValueError(f"--label threshold needs --threshold >= 0, got {threshold}")
    elif threshold is not None:
        raise ValueError(f"--threshold is only used by --label threshold, not by --label {name}")
    return LabelSpec(name, source, k, threshold)


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    indices = scores.topk(k, dim=1).indices
    return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(1, indices, True)


@dataclass(frozen=True)
class InputSpec:
    flag: str  # same | lookahead | from:J, as given
    kind: str  # att_x or mlp_x
    layer: int


def resolve_input(block: str, flag: str, layer: int) -> InputSpec:
    """The collected tensor a layer's predictor reads (SPEC §7); inference must feed the same one.

    same: MLP mlp_x_l, attention att_x_l. lookahead (DejaVu's inference wiring): MLP att_x_l, attention
    att_x_{l-1} (att_x_0 for layer 0). from:J: att_x_J, the residual stream entering layer J <= l.
    """
    if flag == "same":
        return InputSpec(flag, "mlp_x" if block == "mlp" else "att_x", layer)
    if flag == "lookahead":
        return InputSpec(flag, "att_x", layer if block == "mlp" else max(layer - 1, 0))
    match = re.fullmatch(r"from:(\d+)", flag)
    if match is None:
        raise ValueError(f"--input must be same, lookahead or from:J, got {flag!r}")
    source = int(match.group(1))
    if source > layer:
        raise ValueError(f"--input {flag}: layer {source} comes after the predicted layer {layer}; need J <= {layer}")
    return InputSpec(flag, "att_x", source)


# ------------------------------------------------------------------------------------- split
@dataclass(frozen=True)
class SplitConfig:
    """Which documents are held out: the last `test_docs` collected, or the last ones closest to `test_fraction`
    of the rows, raised to at least min(MIN_TEST_DOCS, half the documents) so Recall is not read off a handful."""
    test_fraction: float = TEST_FRACTION
    test_docs: int | None = None

    def describe(self) -> str:
        if self.test_docs is not None:
            return f"by document: the last {self.test_docs} collected documents are held out"
        return (f"by document: the last-collected documents closest to {self.test_fraction:.0%} of the rows, at least "
                f"min({MIN_TEST_DOCS}, half the documents), are held out")


def document_split(doc_ids: np.ndarray, test_fraction: float = TEST_FRACTION, test_docs: int | None = None,
                   min_test_docs: int = MIN_TEST_DOCS) -> np.ndarray:
    """Boolean mask of the held-out rows: whole documents, the last ones collected (see SplitConfig).

    The original held out the last 5% of rows (`X[-idx]`, which also leaked row 0 and cut documents in two);
    taking whole documents from the end keeps its choice without letting a test document's tokens into training.
    """
    docs, first_row, counts = np.unique(doc_ids, return_index=True, return_counts=True)
    if len(docs) < 2:
        raise ValueError(f"need at least 2 documents for a document-level split, found {len(docs)}")
    last_first = np.argsort(first_row)[::-1]
    if test_docs is not None:
        if not 1 <= test_docs < len(docs):
            raise ValueError(f"--test-docs {test_docs}: the collection has {len(docs)} documents; hold out 1 to "
                             f"{len(docs) - 1}")
        n_docs = test_docs
    else:
        if not 0 < test_fraction < 1:
            raise ValueError(f"--test-fraction {test_fraction}: need 0 < fraction < 1")
        held_rows = np.cumsum(counts[last_first])
        target = test_fraction * len(doc_ids)
        n_docs = int(np.searchsorted(held_rows, target)) + 1
        if n_docs > 1 and target - held_rows[n_docs - 2] < held_rows[n_docs - 1] - target:
            n_docs -= 1
        n_docs = max(n_docs, min(min_test_docs, len(docs) // 2))
        n_docs = min(n_docs, len(docs) - 1)
    return np.isin(doc_ids, docs[last_first[:n_docs]])


# ------------------------------------------------------------------------------------- reading onto the device
@dataclass(frozen=True)
class RowFile:
    """One validated collected file: `rows` float16 rows of `width`, stored from the start of `path`."""
    path: Path
    width: int
    rows: int


def open_rows(store: ActivationStore, kind: str, layer: int) -> RowFile:
    if kind not in store.kinds:
        raise FileNotFoundError(f"{activation_file(store.data_dir, kind, layer)} is needed but {kind!r} was not "
                                f"collected (manifest kinds: {list(store.kinds)})")
    mm = store.open(kind, layer)  # checks the file against the manifest
    return RowFile(Path(mm.filename), mm.shape[1], mm.shape[0])


def _pread_rows(fd: int, file: RowFile, rows: slice, out: torch.Tensor, previous_copy) -> None:
    """Read rows straight from the file into `out`: no mapping, so file pages never count as this process's RAM."""
    if previous_copy is not None:
        previous_copy.synchronize()  # the device copy that last read this buffer is done
    view = memoryview(out[: rows.stop - rows.start].view(torch.uint8).numpy().reshape(-1))
    offset = rows.start * file.width * 2
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise EOFError(f"{file.path}: file ended at byte {offset + done}, rows {rows} expected")
        done += n


def stream_chunks(files: Sequence[RowFile], slices: Sequence[slice],
                  device: torch.device) -> Iterator[tuple[slice, list[torch.Tensor]]]:
    """For each slice, the rows of every file as float16 device tensors; reads run READ_AHEAD slices ahead."""
    cuda = device.type == "cuda"
    chunk_rows = max(s.stop - s.start for s in slices)
    buffers = [[torch.empty((chunk_rows, f.width), dtype=torch.float16, pin_memory=cuda) for f in files]
               for _ in range(READ_AHEAD)]
    copied = [None] * READ_AHEAD  # per buffer set: CUDA event of the last copy out of it
    fds = [os.open(f.path, os.O_RDONLY) for f in files]
    try:
        with ThreadPoolExecutor(max_workers=READ_AHEAD * len(files)) as pool:
            def submit(i: int) -> list:
                slot = i % READ_AHEAD
                return [pool.submit(_pread_rows, fd, f, slices[i], buf, copied[slot])
                        for fd, f, buf in zip(fds, files, buffers[slot])]

            pending = deque(submit(i) for i in range(min(READ_AHEAD, len(slices))))
            for i, rows in enumerate(slices):
                for future in pending.popleft():
                    future.result()
                slot, n = i % READ_AHEAD, rows.stop - rows.start
                if cuda:
                    tensors = [buf[:n].to(device, non_blocking=True) for buf in buffers[slot]]
                    copied[slot] = torch.cuda.Event()
                    copied[slot].record()
                else:
                    tensors = [buf[:n].clone() for buf in buffers[slot]]
                if i + READ_AHEAD < len(slices):
                    pending.append(submit(i + READ_AHEAD))
                yield rows, tensors
    finally:
        for fd in fds:
            os.close(fd)


def chunk_slices(rows: int, widths: Sequence[int]) -> list[slice]:
    return list(iter_row_chunks(rows, max(1, CHUNK_BYTES // (2 * max(widths)))))


LABEL_BITS = 8  # units per stored label byte


def packed_width(width: int) -> int:
    return -(-width // LABEL_BITS)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """(..., width) bool -> (..., packed_width(width)) uint8, unit i in bit i % 8 of byte i // 8: a label costs one
    bit per unit on the device, not a byte (at Llama-3.2-3B widths a layer's labels shrink from 8 KB to 1 KB a row)."""
    pad = -mask.shape[-1] % LABEL_BITS
    if pad:
        mask = torch.cat([mask, mask.new_zeros(*mask.shape[:-1], pad)], dim=-1)
    bits = mask.reshape(*mask.shape[:-1], -1, LABEL_BITS).to(torch.uint8)
    shifts = torch.arange(LABEL_BITS, dtype=torch.uint8, device=mask.device)
    return (bits << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, width: int) -> torch.Tensor:
    """The inverse of pack_bits: (..., packed_width(width)) uint8 -> (..., width) bool."""
    shifts = torch.arange(LABEL_BITS, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :width].bool()


def label_bits(label: LabelSpec, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One label of stored float16 rows (read from the mmaps, or kept by an online pass): its bits (pack_bits) and the
    float32 scores it ranks units by."""
    scores = label.scores(values.float())
    return pack_bits(label.labels(scores)), scores


INPUT_ROW_BYTES_PER_DIM = 2  # float16 inputs


def label_row_bytes(width: int, held_out: bool) -> int:
    """Device bytes of one label of one row: its bits, and for a held-out row its float16 scores plus the true K-th
    score (float32) and tie room (int64) of Recall@K."""
    return packed_width(width) + ((2 * width + 4 + 8) if held_out else 0)


def layer_row_bytes(d: int, width: int, n_labels: int, held_out: bool) -> int:
    return INPUT_ROW_BYTES_PER_DIM * d + n_labels * label_row_bytes(width, held_out)


@dataclass
class DeviceRows:
    x: torch.Tensor  # (n, d) float16: the predictor input
    labels: torch.Tensor  # (labels, n, packed_width(width)) uint8: one row set per label spec, as bits (pack_bits)
    width: int  # units per label
    scores: torch.Tensor | None  # (labels, n, width) float16 ranking of each label, kept for held-out rows (Recall@K)
    true_kth: torch.Tensor | None = None  # (labels, n, 1) held-out rows: the true K-th score (see true_top_k)
    true_room: torch.Tensor | None = None  # (labels, n) held-out rows: tied units that still fit in the top K

    @classmethod
    def of(cls, x: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor | None = None) -> "DeviceRows":
        """From (labels, n, width) bool labels."""
        return cls(x, pack_bits(labels), labels.shape[-1], scores)

    @property
    def n(self) -> int:
        return self.x.shape[0]

    def label_rows(self, label, rows=slice(None)) -> torch.Tensor:
        """Bool labels of `label` (an index, or (P, 1) indices) at `rows` (a slice, or (P, B) row indices)."""
        return unpack_bits(self.labels[label, rows], self.width)

    def rank_truth(self, Ks: Sequence[int], batch_size: int = 4096) -> None:
        """Compute each label's true top-K threshold of the held-out rows once (Recall@K at every evaluation)."""
        tops = [[true_top_k(self.scores[l, s], K) for s in iter_row_chunks(self.n, batch_size)]
                for l, K in enumerate(Ks)]
        self.true_kth = torch.stack([torch.cat([kth for kth, _ in t]) for t in tops])
        self.true_room = torch.stack([torch.cat([room for _, room in t]) for t in tops])


def load_rows(x_file: RowFile, label_files: dict[str, RowFile], labels: Sequence[LabelSpec], selected: np.ndarray,
              device: torch.device, keep_scores: bool, desc: str) -> DeviceRows:
    """The selected rows (a bool mask over all rows) on the device, each label computed there chunk by chunk."""
    n, width = int(selected.sum()), labels[0].width_of(label_files)
    out = DeviceRows(torch.empty((n, x_file.width), dtype=torch.float16, device=device),
                     torch.empty((len(labels), n, packed_width(width)), dtype=torch.uint8, device=device), width,
                     torch.empty((len(labels), n, width), dtype=torch.float16, device=device) if keep_scores else None)
    kinds = list(label_files)
    files = [x_file, *label_files.values()]
    slices = [s for s in chunk_slices(len(selected), [f.width for f in files]) if selected[s].any()]
    filled = 0
    for rows, (x, *values) in tqdm(stream_chunks(files, slices, device), total=len(slices), desc=desc,
                                   unit="chunk", leave=False):
        local = np.flatnonzero(selected[rows])
        if len(local) < rows.stop - rows.start:
            index = torch.from_numpy(local).to(device)
            x, values = x[index], [v[index] for v in values]
        part = slice(filled, filled + len(local))
        out.x[part] = x
        for i, label in enumerate(labels):
            out.labels[i, part], scores = label_bits(label, values[kinds.index(label.source_kind)])
            if keep_scores:
                out.scores[i, part] = scores.to(torch.float16)  # exact: values of fp16 inputs or their abs
        filled += len(local)
    return out


@dataclass
class LayerData:
    """One layer's predictor input and its labels (one or more label specs), split by document, on the device."""
    input: InputSpec
    x_file: RowFile
    label_files: dict[str, RowFile]  # source kind -> file
    labels: tuple[LabelSpec, ...]
    is_test: np.ndarray  # (rows,) bool
    test: DeviceRows
    Ks: tuple[int, ...]  # Recall@K budget of each label
    train: DeviceRows | None  # all training rows when they fit on the device, else None (streamed per epoch)
    window_rows: int  # training rows per streamed window
    test_documents: np.ndarray  # (held-out rows,) document id of each held-out row
    split: SplitConfig = SplitConfig()

    @property
    def rows_train(self) -> int:
        return int((~self.is_test).sum())

    @property
    def out_width(self) -> int:
        return self.test.width

    def train_windows(self, epoch: int, seed: int) -> Iterator[DeviceRows]:
        """The training rows of one epoch: one resident block, or windows of randomly ordered chunks."""
        if self.train is not None:
            yield self.train
            return
        widths = [self.x_file.width, *(f.width for f in self.label_files.values())]
        for window in window_masks(self.is_test, chunk_slices(len(self.is_test), widths), self.window_rows,
                                   np.random.default_rng(seed + epoch)):
            yield load_rows(self.x_file, self.label_files, self.labels, window, self.test.x.device, False,
                            f"epoch {epoch} window")


def window_masks(is_test: np.ndarray, slices: list[slice], window_rows: int,
                 rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Training rows grouped into windows of at most `window_rows`: whole chunks, in random order."""
    window, count = np.zeros(len(is_test), dtype=bool), 0
    for i in rng.permutation(len(slices)):
        rows = slices[i]
        n = int((~is_test[rows]).sum())
        if count and count + n > window_rows:
            yield window
            window, count = np.zeros(len(is_test), dtype=bool), 0
        window[rows] = ~is_test[rows]
        count += n
    if count:
        yield window


def load_layer(store: ActivationStore, block: str, layer: int, input_flag: str,
               label: LabelSpec | Sequence[LabelSpec], device: torch.device, batch_size: int,
               max_device_bytes: int | None = None, split: SplitConfig = SplitConfig()) -> LayerData:
    """Split by document, put the held-out rows on the device and, if they fit, the training rows too.

    Several label specs of one layer (e.g. top-K at three fractions) share the input rows and are trained together.
    """
    labels = (label,) if isinstance(label, LabelSpec) else tuple(label)
    spec = resolve_input(block, input_flag, layer)
    x_file = open_rows(store, spec.kind, spec.layer)
    label_files = {kind: open_rows(store, kind, layer) for kind in dict.fromkeys(l.source_kind for l in labels)}
    if len({f.width for f in label_files.values()}) != 1:
        raise ValueError(f"labels {[l.name for l in labels]} of layer {layer} have different widths")
    doc_ids = store.document_ids()
    is_test = document_split(doc_ids, split.test_fraction, split.test_docs)
    budget = device_budget(device, max_device_bytes)
    test = load_rows(x_file, label_files, labels, is_test, device, True, f"layer {layer} held-out rows")
    width = test.width
    test_bytes = test.n * layer_row_bytes(x_file.width, width, len(labels), held_out=True)
    window_rows = (budget - test_bytes) // layer_row_bytes(x_file.width, width, len(labels), held_out=False)
    n_train = int((~is_test).sum())
    if window_rows < min(batch_size, n_train):
        raise MemoryError(f"device memory budget {budget / 2**30:.2f} GiB holds the held-out rows "
                          f"({test_bytes / 2**30:.2f} GiB) but not one batch of training rows; raise --max-device-gb")
    train = None
    if window_rows >= n_train:
        train = load_rows(x_file, label_files, labels, ~is_test, device, False, f"layer {layer} training rows")
    else:
        print(f"layer {layer}: {n_train} training rows exceed the device budget; streaming windows of "
              f"{window_rows} rows each epoch")
    return layer_data(spec, x_file, label_files, labels, is_test, test, train, int(window_rows), doc_ids, split)


def layer_data(spec: InputSpec, x_file: RowFile, label_files: dict[str, RowFile], labels: tuple[LabelSpec, ...],
               is_test: np.ndarray, test: DeviceRows, train: DeviceRows | None, window_rows: int, doc_ids: np.ndarray,
               split: SplitConfig) -> LayerData:
    """A layer ready to train, from rows already on the device (read from the mmaps, or kept by an online pass):
    each label's Recall@K budget and the held-out rows' true top-K are computed here, once."""
    Ks = tuple(recall_at_k_budget(l, test.label_rows(i)) for i, l in enumerate(labels))
    test.rank_truth(Ks)
    return LayerData(spec, x_file, label_files, labels, is_test, test, Ks, train, window_rows,
                     np.asarray(doc_ids[is_test]), split)


def recall_at_k_budget(label: LabelSpec, test_labels: torch.Tensor) -> int:
    if label.name == "topk":
        return label.top_count(test_labels.shape[1])
    return max(1, round(test_labels.sum(dim=1).float().mean().item()))


def device_budget(device: torch.device, max_device_bytes: int | None) -> int:
    if max_device_bytes is not None:
        return max_device_bytes
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * GPU_RESIDENT_SHARE)
    return CPU_RESIDENT_BYTES


# ------------------------------------------------------------------------------------- metrics
def class_weighted_bce(logits: torch.Tensor, y: torch.Tensor, weight_floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The original loss: BCE with weight 1 on active units and w = mean(y) + floor on inactive ones."""
    w = y.mean() + weight_floor
    return F.binary_cross_entropy_with_logits(logits, y, weight=y * (1 - w) + w), w


def true_top_k(scores: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The true K-th score of each token (B, 1) and how many units tied with it still fit in a true top-K (B,)."""
    scores = scores.float()
    kth = scores.topk(K, dim=1, sorted=False).values.min(dim=1, keepdim=True).values
    return kth, K - (scores > kth).sum(dim=1)


def batch_statistics(logits: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, K: int,
                     weight_floor: float, top: tuple[torch.Tensor, torch.Tensor] | None = None
                     ) -> dict[str, torch.Tensor]:
    """Per-token counts of one eval batch (and its loss), kept on the device until the end of the evaluation.

    logits (B, out) float32, labels (B, out) bool, scores (B, out): the label's ranking of the units; `top` is
    true_top_k(scores, K) when already known (it does not change between epochs).
    """
    preds = logits.sigmoid() >= 0.5  # as the original: not logits >= 0, which differs for tiny negatives
    loss, w = class_weighted_bce(logits, labels.float(), weight_floor)
    kth, room = top if top is not None else true_top_k(scores, K)
    picked = scores.float().gather(1, logits.topk(K, dim=1, sorted=False).indices)
    above, tied = (picked > kth).sum(dim=1), (picked == kth).sum(dim=1)
    return {"tp": (labels & preds).sum(dim=1), "active": labels.sum(dim=1), "predicted": preds.sum(dim=1),
            "topk_hits": above + torch.minimum(tied, room), "loss": loss, "w": w}


def aggregate_statistics(batches: list[dict[str, torch.Tensor]], K: int) -> dict[str, float | None]:
    """Held-out metrics; the first five exactly as the original's evaluate() (see METRIC_DEFINITIONS)."""
    def mean_of_batch_means(key: str) -> float:
        return torch.stack([b[key].double().mean() for b in batches]).mean().item()

    def total(key: str) -> int:
        return int(sum(b[key].sum() for b in batches))

    true_sparsity = mean_of_batch_means("active")
    tp, predicted = total("tp"), total("predicted")
    active = torch.cat([b["active"] for b in batches]).double()
    per_token = torch.cat([b["tp"] for b in batches]).double()[active > 0] / active[active > 0]
    tokens = sum(len(b["tp"]) for b in batches)
    return {"Recall": mean_of_batch_means("tp") / true_sparsity if true_sparsity > 0 else None,
            "True Sparsity": true_sparsity,
            "Classifier Sparsity": mean_of_batch_means("predicted"),
            "Loss": mean_of_batch_means("loss"),
            "Loss Weight": mean_of_batch_means("w"),
            "Precision": tp / predicted if predicted else None,
            "Per-token Recall": per_token.mean().item() if len(per_token) else None,
            "Recall@K": total("topk_hits") / (K * tokens),
            "K": K}


def matmul_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA; float32 on the CPU, where bf16 matmuls are slow (and the tests run)."""
    return torch.bfloat16 if device.type == "cuda" else None


def predictor_logits(model: torch.nn.Module, x: torch.Tensor, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """(P, B, out) float32 logits of the stacked predictors; under autocast the matmuls run in amp_dtype with
    float32 master weights. x is (B, d), shared by all predictors, or (P, B, d)."""
    if amp_dtype is None:
        return model(x.float())
    with torch.autocast(device_type=x.device.type, dtype=amp_dtype, cache_enabled=False):  # graph-capture safe
        return model(x).float()


PER_DOCUMENT_COUNTS = ("tp", "active", "predicted", "topk_hits")


def per_document_counts(batches: list[dict[str, torch.Tensor]], documents: np.ndarray) -> dict[str, list[int]]:
    """Per held-out document (in `documents` order of first appearance sorted by id): its tokens and the sums of the
    per-token counts, so that Recall@K, Recall and Precision can be bootstrapped over documents later."""
    ids, inverse = np.unique(documents, return_inverse=True)
    counts = {"documents": ids.tolist(), "tokens": np.bincount(inverse, minlength=len(ids)).tolist()}
    for key in PER_DOCUMENT_COUNTS:
        values = torch.cat([b[key] for b in batches]).cpu().numpy()
        counts[key] = np.bincount(inverse, weights=values, minlength=len(ids)).astype(np.int64).tolist()
    return counts


@torch.no_grad()
def evaluate(model: torch.nn.Module, test: DeviceRows, labels_of: Sequence[int], Ks: Sequence[int],
             weight_floor: float, batch_size: int, amp_dtype: torch.dtype | None,
             documents: np.ndarray | None = None) -> list[dict]:
    """Held-out metrics of each stacked predictor (predictor p is scored on label labels_of[p]), in eval batches of
    batch_size rows in row order as the original's test loader; with `documents`, also the per-document counts."""
    model.eval()
    batches: list[list[dict]] = [[] for _ in labels_of]
    for s in iter_row_chunks(test.n, batch_size):
        logits = predictor_logits(model, test.x[s], amp_dtype)  # (P, b, out)
        for p, l in enumerate(labels_of):
            top = (test.true_kth[l, s], test.true_room[l, s])
            batches[p].append(batch_statistics(logits[p], test.label_rows(l, s), test.scores[l, s], Ks[l], weight_floor,
                                               top))
    model.train()
    metrics = [aggregate_statistics(b, Ks[l]) for b, l in zip(batches, labels_of)]
    if documents is not None:
        for m, b in zip(metrics, batches):
            m["per_document"] = per_document_counts(b, documents)
    return metrics


# ------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainConfig:
    D: int = 1000
    epochs: int = 20
    batch_size: int = 1024
    lr: float = 1e-4
    seed: int = 0
    selection: str = "original"  # or "last": see SELECTIONS
    cuda_graphs: bool = True  # replay each training step from a captured CUDA graph (CUDA only)


@dataclass
class TrainResult:
    state_dict: dict[str, torch.Tensor]
    metrics: dict  # of the kept (best) model
    best_epoch: int  # 0 = the untrained model
    history: list[dict]  # per epoch: held-out metrics, train loss, seconds
    per_document: dict[str, list[int]]  # held-out counts per document of the kept model (for bootstrap intervals)
    seed: int
    label_index: int


def make_predictor(d: int, D: int, out: int, seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)  # built on the CPU so that a seed gives the same weights on any device
    return torch.nn.Sequential(torch.nn.Linear(d, D, bias=False), torch.nn.Linear(D, out, bias=False))


class StackedPredictors(torch.nn.Module):
    """P independent DejaVu predictors, Linear(d, D) -> Linear(D, out) without bias, trained in lockstep.

    Each one is initialised exactly as make_predictor(d, D, out, seed) and AdamW updates every weight on its own, so
    stacking changes nothing but the kernels: one batched matmul instead of P small ones (at DejaVu's sizes a
    training step is bound by kernel launches, not arithmetic, so seeds and label variants come almost for free).
    """

    def __init__(self, d: int, D: int, out: int, seeds: Sequence[int]):
        super().__init__()
        singles = [make_predictor(d, D, out, seed) for seed in seeds]
        self.w1 = torch.nn.Parameter(torch.stack([m[0].weight.detach() for m in singles]))  # (P, D, d)
        self.w2 = torch.nn.Parameter(torch.stack([m[1].weight.detach() for m in singles]))  # (P, out, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.matmul(x, self.w1.transpose(1, 2))  # (P, B, D)
        return torch.matmul(h, self.w2.transpose(1, 2))  # (P, B, out)

    def state_of(self, p: int) -> dict[str, torch.Tensor]:
        """Predictor p as the state dict of the Sequential the sparse runner loads (keys 0.weight, 1.weight)."""
        return {"0.weight": self.w1[p].detach().to("cpu", copy=True),
                "1.weight": self.w2[p].detach().to("cpu", copy=True)}

    @torch.no_grad()
    def load_states(self, states: Sequence[dict[str, torch.Tensor]]) -> None:
        for p, state in enumerate(states):
            self.w1[p].copy_(state["0.weight"])
            self.w2[p].copy_(state["1.weight"])


def stacked_bce(logits: torch.Tensor, y: torch.Tensor, weight_floor: float) -> torch.Tensor:
    """(P,) class-weighted BCE of each predictor on its own batch, w = its batch's mean(y) + floor (the original)."""
    w = y.mean(dim=(1, 2), keepdim=True) + weight_floor
    loss = F.binary_cross_entropy_with_logits(logits, y, weight=y * (1 - w) + w, reduction="none")
    return loss.mean(dim=(1, 2))


class TrainStep:
    """One optimizer step (forward, class-weighted BCE, backward, AdamW) of the stacked predictors on a batch
    (x (P, B, d), labels (P, B, out)); returns the (P,) losses. The sum of the P losses is minimised, so each
    predictor gets exactly its own gradient.

    On CUDA with `graphs`, the full-batch step is captured once in a CUDA graph and replayed (a partial last batch
    runs eagerly): a step is ~40 small kernels, and at 1,024 rows launching them from Python costs more than
    running them. Eager and replayed steps share weights and optimizer state in place. Capture needs
    warm-up steps; they run on copies of the weights and optimizer state, which are put back before training, so
    the graph path takes exactly the eager path's steps."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, amp_dtype: torch.dtype | None,
                 floor: float, graphs: bool, batch_size: int):
        self.model, self.optimizer, self.amp_dtype, self.floor = model, optimizer, amp_dtype, floor
        self.graphs, self.batch_size = graphs, batch_size
        self.captured: tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def eager(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        losses = stacked_bce(predictor_logits(self.model, x, self.amp_dtype), labels.float(), self.floor)
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        self.optimizer.step()
        return losses.detach()

    def __call__(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not self.graphs or x.shape[1] != self.batch_size:
            return self.eager(x, labels)
        if self.captured is None:
            self.captured = self.capture(x, labels)
        graph, static_x, static_labels, static_loss = self.captured
        static_x.copy_(x)
        static_labels.copy_(labels)
        graph.replay()
        return static_loss.clone()

    def capture(self, x: torch.Tensor, labels: torch.Tensor):
        static_x, static_labels = x.clone(), labels.clone()
        saved = self.snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up: allocations, lazy optimizer state, kernel selection
                self.eager(static_x, static_labels)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)  # the captured backward writes fresh gradients every replay
        with torch.cuda.graph(graph):
            static_loss = self.eager(static_x, static_labels)
        self.restore(saved)
        return graph, static_x, static_labels, static_loss

    def snapshot(self) -> tuple[list[torch.Tensor], dict]:
        params = [p.detach().clone() for p in self.model.parameters()]
        state = {id(p): {k: v.clone() for k, v in st.items() if torch.is_tensor(v)}
                 for p, st in self.optimizer.state.items()}
        return params, state

    def restore(self, saved: tuple[list[torch.Tensor], dict]) -> None:
        """Put weights and optimizer state back in place (the graph holds their addresses)."""
        params, state = saved
        with torch.no_grad():
            for p, old in zip(self.model.parameters(), params):
                p.copy_(old)
            for p, st in self.optimizer.state.items():
                before = state.get(id(p), {})
                for k, v in st.items():
                    if torch.is_tensor(v):
                        v.copy_(before[k]) if k in before else v.zero_()  # no state yet = zeros, step 0


def train_stacked(data: LayerData, block: str, cfg: TrainConfig, specs: Sequence[tuple[int, int]],
                  log: Callable[[str], None] = print) -> list[TrainResult]:
    """Train one predictor per (label index, seed) of `specs` on the layer's input, all in lockstep.

    Each predictor has its own initialisation, batch order (its seed's generator), optimizer state, held-out metrics
    and selection (--selection), exactly as if trained alone with that seed; streamed windows (rows that do not fit
    on the device) come in the order of cfg.seed for all of them."""
    device = data.test.x.device
    amp_dtype = matmul_dtype(device)
    floor = NEGATIVE_WEIGHT_FLOOR[block]
    labels_of, seeds = [l for l, _ in specs], [seed for _, seed in specs]
    P = len(specs)
    model = StackedPredictors(data.x_file.width, cfg.D, data.out_width, seeds).to(device)
    graphs = cfg.cuda_graphs and device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), cfg.lr, weight_decay=WEIGHT_DECAY, fused=device.type == "cuda",
                                  capturable=graphs)
    step = TrainStep(model, optimizer, amp_dtype, floor, graphs, cfg.batch_size)
    generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
    label_index = torch.tensor(labels_of, device=device)[:, None]  # (P, 1): which label rows each predictor reads

    def held_out(documents: np.ndarray | None = None) -> list[dict]:
        return evaluate(model, data.test, labels_of, data.Ks, floor, cfg.batch_size, amp_dtype, documents)

    best = held_out()
    log(f"[Start] {format_metrics(best[0])}" + (f" (and {P - 1} more predictors)" if P > 1 else ""))
    best_states = [model.state_of(p) for p in range(P)]
    best_epochs, histories, no_improve, active = [0] * P, [[] for _ in range(P)], [0] * P, [True] * P
    for epoch in tqdm(range(1, cfg.epochs + 1), desc="epochs", unit="epoch"):
        start = time.perf_counter()
        loss_sum, steps = torch.zeros(P, device=device), 0
        for rows in data.train_windows(epoch, cfg.seed):
            order = torch.stack([torch.randperm(rows.n, device=device, generator=g) for g in generators])  # (P, n)
            for index in order.split(cfg.batch_size, dim=1):  # (P, B)
                loss_sum += step(rows.x[index], rows.label_rows(label_index, index))
                steps += 1
            del rows  # a streamed window is freed before the next one is loaded
        train_loss = (loss_sum / steps).tolist()  # the epoch's only host sync
        train_s = time.perf_counter() - start
        metrics = held_out()
        eval_s = time.perf_counter() - start - train_s
        for p in range(P):
            if not active[p]:
                continue
            histories[p].append({"epoch": epoch, "train_loss": train_loss[p], "train_s": train_s, "eval_s": eval_s,
                                 **metrics[p]})
            if cfg.selection == "last":
                best[p], best_epochs[p] = metrics[p], epoch
            elif metrics[p]["Recall"] is not None and (best[p]["Recall"] is None or
                                                       metrics[p]["Recall"] > best[p]["Recall"]):
                best[p], best_epochs[p], no_improve[p] = metrics[p], epoch, 0
                best_states[p] = model.state_of(p)
            else:
                no_improve[p] += 1
            stop = no_improve[p] >= EARLY_STOP_PATIENCE or (best[p]["Recall"] or 0) > EARLY_STOP_RECALL
            active[p] = not (cfg.selection == "original" and stop)
        log(f"[Epoch {epoch}] train loss {train_loss[0]:.4f} ({train_s:.2f} s) [Valid] {format_metrics(metrics[0])}")
        if not any(active):
            break
    if cfg.selection == "last":
        best_states = [model.state_of(p) for p in range(P)]
    model.load_states(best_states)
    final = held_out(data.test_documents)  # the kept predictors once more, with per-document counts
    return [TrainResult(best_states[p], best[p], best_epochs[p], histories[p], final[p]["per_document"], seeds[p],
                        labels_of[p]) for p in range(P)]


def train_predictor(data: LayerData, block: str, cfg: TrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    """One predictor of the layer's first label, seeded with cfg.seed."""
    return train_stacked(data, block, cfg, [(0, cfg.seed)], log)[0]


def format_metrics(metrics: dict) -> str:
    def show(v) -> str:
        return "n/a" if v is None else str(v) if isinstance(v, int) else f"{v:.4f}"

    return " ".join(f"{k}: {show(v)}" for k, v in metrics.items())


# ------------------------------------------------------------------------------------- outputs
def write_outputs(out_dir: Path, block: str, layer: int, state_dict: dict, record: dict) -> tuple[Path, Path]:
    """`<out-dir>/{block}_layer{L}.pt` (state dict with keys 0.weight, 1.weight) and its JSON, each atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / f"{block}_layer{layer}.pt"
    tmp = checkpoint.with_name(checkpoint.name + ".tmp")
    torch.save(state_dict, tmp)
    os.replace(tmp, checkpoint)
    json_path = out_dir / f"{block}_layer{layer}.json"
    write_json_atomic(json_path, record)
    return checkpoint, json_path


@dataclass(frozen=True)
class RowsSource:
    """Where a layer's rows came from, as its JSON records it: a collection directory read from its mmaps, or an
    online pass of the model (sparse_predictor/train_online.py) that kept them on the device and wrote no file."""
    mode: str  # "mmap" or "online"
    data_dir: str | None
    rows: int
    dims: ModelDims
    doc_ids: np.ndarray  # (rows,) document id of each row
    fields: dict  # model_name, model_type, source_data, git_commit, weights, tokenizer, partial_document (+ online)


SOURCE_FIELDS = ("model_name", "model_type", "source_data", "git_commit", "weights", "tokenizer", "partial_document")


def collection_source(store: ActivationStore) -> RowsSource:
    return RowsSource("mmap", str(store.data_dir), store.rows, store.dims, store.document_ids(),
                      {key: store.manifest.get(key) for key in SOURCE_FIELDS})


def file_name(file: RowFile) -> str | None:
    return file.path.name if file.path is not None else None  # None: rows of an online pass, never stored


def layer_record(args: argparse.Namespace, block: str, layer: int, source: RowsSource, data: LayerData,
                 cfg: TrainConfig, result: TrainResult, timings: dict, provenance: dict) -> dict:
    docs = source.doc_ids
    label = data.labels[result.label_index]
    return {
        **result.metrics,
        "block": block, "layer": layer, "model": args.model, "dataset": args.dataset,
        "input": data.input.flag, "input_kind": data.input.kind, "input_layer": data.input.layer,
        "input_file": file_name(data.x_file),
        "label": label.name, "label_definition": label.definition(),
        "label_file": file_name(data.label_files[label.source_kind]), "k": label.k, "threshold": label.threshold,
        "seed": result.seed,
        "rows_train": data.rows_train, "rows_test": int(data.is_test.sum()),
        "documents_train": len(np.unique(docs[~data.is_test])), "documents_test": len(np.unique(docs[data.is_test])),
        "split": data.split.describe(), "test_documents": [int(d) for d in np.unique(docs[data.is_test])],
        "per_document": result.per_document,
        "predictor": {"layers": ["Linear(d, D, bias=False)", "Linear(D, out, bias=False)"],
                      "d": data.x_file.width, "D": cfg.D, "out": data.out_width},
        "hyperparameters": {**asdict(cfg), "seed": result.seed, "weight_decay": WEIGHT_DECAY, "optimizer": "AdamW",
                            "negative_weight_floor": NEGATIVE_WEIGHT_FLOOR[block],
                            "matmul_dtype": str(matmul_dtype(data.test.x.device) or torch.float32),
                            "device": str(data.test.x.device), "resident_on_device": data.train is not None},
        "selection": cfg.selection, "selection_rule": SELECTIONS[cfg.selection],
        "best_epoch": result.best_epoch, "epochs_run": len(result.history),
        "final_epoch": result.history[-1] if result.history else None, "history": result.history,
        "metric_definitions": METRIC_DEFINITIONS,
        "timings": timings,
        "data": {"collection": source.mode, "data_dir": source.data_dir, "rows": source.rows,
                 "dims": asdict(source.dims), **source.fields},
        "checkpoint": f"{block}_layer{layer}.pt",
        "provenance": {**provenance, "end_time": now()},
    }


SEED_METRICS = ("Recall@K", "Recall", "Precision", "Classifier Sparsity", "Per-token Recall")


def seed_spread(records: Sequence[dict]) -> dict:
    """Mean, min and max over the seeds' records of each SEED_METRICS metric (null where a seed has none)."""
    spread = {"seeds": [r["seed"] for r in records]}
    for metric in SEED_METRICS:
        values = [r[metric] for r in records]
        spread[metric] = None if None in values else {"values": values, **spread_over_seeds(values)}
    return spread


SUMMARY_COLUMNS = ("layer", "Recall", "True Sparsity", "Classifier Sparsity", "Precision", "Recall@K", "K",
                   "input", "label")
SEED_COLUMNS = ("seeds", "Recall@K seed mean", "Recall@K seed min", "Recall@K seed max")


def summary_row(record: dict) -> list:
    spread = (record.get("seed_spread") or {}).get("Recall@K")
    seeds = (record.get("seed_spread") or {}).get("seeds", [record.get("seed")])
    return ([record[c] for c in SUMMARY_COLUMNS] +
            [len(seeds), *((spread["mean"], spread["min"], spread["max"]) if spread else (None, None, None))])


def summarize(out_dir: str | os.PathLike, block: str, num_layers: int | None = None) -> tuple[Path, Path, list[int]]:
    """`<out-dir>/{block}_summary.csv` and `.md` from the per-layer JSONs; returns them and the missing layers."""
    out_dir = Path(out_dir)
    pattern = re.compile(rf"{block}_layer(\d+)\.json")
    records = sorted((read_json(p) for p in out_dir.iterdir() if pattern.fullmatch(p.name)), key=lambda r: r["layer"])
    if not records:
        raise FileNotFoundError(f"no {block}_layer*.json in {out_dir}")
    found = {r["layer"] for r in records}
    missing = sorted(set(range(num_layers)) - found) if num_layers is not None else []
    csv_path, md_path = out_dir / f"{block}_summary.csv", out_dir / f"{block}_summary.md"
    columns = (*SUMMARY_COLUMNS, *SEED_COLUMNS)
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(summary_row(r) for r in records)

    def cell(value) -> str:
        return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    models = sorted({f"{r['model']} / {r['dataset']}" for r in records})
    lines = [f"# {block} sparse predictors: {', '.join(models)}", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in summary_row(r)) + " |" for r in records]
    if missing:
        lines += ["", f"Missing layers (no JSON): {missing}"]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path, missing


# ------------------------------------------------------------------------------------- command line of the mains
def default_paths(model: str, dataset: str) -> tuple[Path, Path]:
    """SPEC §6 collection directory and the predictor directory next to it (both under the ignored data/)."""
    return REPO_ROOT / "data" / f"{model}_{dataset}", REPO_ROOT / "data" / f"{model}_{dataset}_sparse_predictor"


def build_parser(block: str, description: str, defaults: dict) -> argparse.ArgumentParser:
    """The flags of the four mains (SPEC §7); `defaults` holds the model-specific ones (model, label, k, lr)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=defaults["model"],
                   help="names the run (JSON, default paths); dims, layers and rows come from the manifest "
                        "(default %(default)s)")
    p.add_argument("--dataset", default="c4", help="names the collection, as the original (default %(default)s)")
    p.add_argument("--data-dir", help="collected activations (SPEC §6); default data/<model>_<dataset> in the repo")
    p.add_argument("--out-dir", help="where {block}_layer{L}.pt/.json go; "
                                     "default data/<model>_<dataset>_sparse_predictor in the repo")
    p.add_argument("--L", default="0", help="layer index, a list such as 0-13 or 0,4,8, or 'all': each in turn "
                                           "(default %(default)s)")
    p.add_argument("--input", default=DEFAULT_INPUT[block],
                   help="predictor input: same (MLP: mlp_x_l; attention: att_x_l), lookahead (MLP: att_x_l; "
                        "attention: att_x_{l-1}, att_x_0 for layer 0), or from:J (att_x_J, J <= l). Default "
                        "%(default)s, what the original trained on")
    if block == "mlp":
        p.add_argument("--label", choices=MLP_LABELS, default=defaults["label"],
                       help="relu: mlp_label > 0; topk: top fraction --k of |mlp_label| per token; threshold: "
                            "|mlp_label| > --threshold; gate: mlp_gate > 0 (needs mlp_gate collected). "
                            "Default %(default)s")
        p.add_argument("--k", type=float, default=None,
                       help=f"fraction of neurons active per token for --label topk (default {defaults['k']} "
                            "with topk; an error with other labels)")
        p.add_argument("--threshold", type=float, default=None, help="|mlp_label| cut for --label threshold")
    else:
        p.add_argument("--k", type=float, default=defaults["k"],
                       help="fraction of heads active per token: the top fraction_count(k, heads) head norms, "
                            "rounded to the nearest count (default %(default)s)")
    add_training_arguments(p, lr=defaults["lr"])
    return p


def add_training_arguments(p: argparse.ArgumentParser, lr: float | None, streaming: bool = True) -> None:
    """The training flags (SPEC §7 plus --selection, --max-device-gb), for the mains and any script that trains;
    lr None leaves --lr out (a script with one rate per block), streaming False leaves --max-device-gb out."""
    p.add_argument("--D", type=int, default=1000, help="low-rank width of the predictor (default %(default)s)")
    p.add_argument("--epochs", type=int, default=20, help="at most this many epochs (default %(default)s)")
    p.add_argument("--batch_size", type=int, default=1024, help="training and eval batch (default %(default)s)")
    if lr is not None:
        p.add_argument("--lr", type=float, default=lr, help="AdamW learning rate (default %(default)s)")
    p.add_argument("--device", default=None, help="torch device; default cuda:0 if CUDA is available, else cpu")
    p.add_argument("--seed", type=int, default=0, help="seeds init, shuffling and windows (default %(default)s)")
    p.add_argument("--seeds", type=int, default=1,
                   help="train this many predictors per layer, seeds --seed .. --seed+N-1, together (stacked: about "
                        "the cost of one on a GPU); the first is written to --out-dir, seed S to --out-dir/seedS/, and "
                        "every JSON records the spread over seeds (default %(default)s)")
    p.add_argument("--selection", choices=tuple(SELECTIONS), default="original",
                   help="which epoch's predictor is kept. " + " ".join(f"{k}: {v}." for k, v in SELECTIONS.items())
                        + " Default %(default)s")
    p.add_argument("--test-fraction", type=float, default=TEST_FRACTION,
                   help="held-out share of the rows, taken as whole documents from the end of the collection and "
                        f"raised to at least min({MIN_TEST_DOCS}, half the documents) (default %(default)s)")
    p.add_argument("--test-docs", type=int, default=None,
                   help="hold out exactly this many documents (the last collected) instead of --test-fraction")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="launch every training step's kernels from Python instead of replaying a captured CUDA graph")
    if not streaming:
        return
    p.add_argument("--max-device-gb", type=float, default=None,
                   help=f"device memory for the layer's rows; more rows are streamed in windows each epoch. Default "
                        f"{GPU_RESIDENT_SHARE:.0%}% of free GPU memory, {CPU_RESIDENT_BYTES >> 30} GiB on the CPU")


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(D=args.D, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                       selection=args.selection, cuda_graphs=not args.no_cuda_graphs)


def split_config(args: argparse.Namespace) -> SplitConfig:
    return SplitConfig(args.test_fraction, args.test_docs)


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name} asked for CUDA, which this torch build/machine does not have")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # set_device and events need an index
    return device


def require_complete(store: ActivationStore) -> None:
    if store.manifest.get("complete") is not True:
        raise ValueError(f"{store.data_dir}: the collection is not complete (manifest complete="
                         f"{store.manifest.get('complete')!r}); finish or resume it before training")


def run_cli(block: str, description: str, defaults: dict, argv: list[str] | None = None) -> list[Path]:
    """Parse the flags, train the requested layer(s), write checkpoint + JSON; returns the JSON paths."""
    args = build_parser(block, description, defaults).parse_args(argv)
    device = resolve_device(args.device)
    data_dir, out_dir = default_paths(args.model, args.dataset)
    args.data_dir, args.out_dir = args.data_dir or str(data_dir), args.out_dir or str(out_dir)
    store = ActivationStore(args.data_dir)
    require_complete(store)
    try:
        layers = parse_layer_list(args.L, store.num_layers)
    except ValueError as e:
        raise ValueError(f"--L: {e} (the manifest has layers 0..{store.num_layers - 1})") from e
    if block == "att":
        label = make_label_spec(block, "topk", args.k, None, store.dims.num_heads)
    else:
        if args.label == "topk" and args.k is None:
            args.k = defaults["k"]  # the model's default fraction, recorded with the other flags
        label = make_label_spec(block, args.label, args.k, args.threshold, store.dims.ffn_dim)
    cfg = train_config(args)
    if args.seeds < 1:
        raise ValueError(f"--seeds {args.seeds}: need at least 1")
    max_bytes = None if args.max_device_gb is None else int(args.max_device_gb * 2**30)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    print(args)
    source = collection_source(store)
    written = []
    for layer in layers:
        provenance = base_manifest(args=vars(args))
        print("=" * 40, "Layer", layer, "=" * 40)
        start = time.perf_counter()
        data = load_layer(store, block, layer, args.input, label, device, cfg.batch_size, max_bytes,
                          split_config(args))
        written.append(train_and_write(args, block, layer, data, source, cfg, time.perf_counter() - start,
                                       provenance))
        del data
    return written


def train_and_write(args: argparse.Namespace, block: str, layer: int, data: LayerData, source: RowsSource,
                    cfg: TrainConfig, load_s: float, provenance: dict, timings: dict | None = None) -> Path:
    """Train --seeds predictors of the layer on its rows (already on the device), write each checkpoint + JSON
    (seed S to --out-dir/seedS/) with the spread over seeds; returns the first JSON. The same code for rows read
    from a collection and rows kept by an online pass."""
    loaded = time.perf_counter()
    results = train_stacked(data, block, cfg, [(0, args.seed + i) for i in range(args.seeds)])
    train_s = time.perf_counter() - loaded
    timings = {"load_s": load_s, "train_and_eval_s": train_s, "total_s": load_s + train_s,
               "predictors_trained_together": len(results), **(timings or {})}
    records = [layer_record(args, block, layer, source, data, cfg, r, timings, provenance) for r in results]
    spread = seed_spread(records)
    first = None
    for i, (result, record) in enumerate(zip(results, records)):
        record["seed_spread"] = spread
        out_dir = Path(args.out_dir) if i == 0 else Path(args.out_dir) / f"seed{result.seed}"
        checkpoint, json_path = write_outputs(out_dir, block, layer, result.state_dict, record)
        if i == 0:
            first = json_path
            print(f"wrote {checkpoint} and {json_path} (best epoch {result.best_epoch}, {timings['total_s']:.1f} "
                  f"s): {format_metrics({k: v for k, v in result.metrics.items() if k != 'per_document'})}")
    if args.seeds > 1:
        recall = spread["Recall@K"]
        print(f"{block} layer {layer}: {args.seeds} seeds in {Path(args.out_dir)}/seed*/; Recall@K mean "
              f"{recall['mean']:.4f} (min {recall['min']:.4f}, max {recall['max']:.4f})")
    return first


# ------------------------------------------------------------------------------------- run_c4_*.sh support
def visible_gpus() -> list[str]:
    """GPU ids to spread layers over: CUDA_VISIBLE_DEVICES if set ('' = none), else nvidia-smi's count."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    if listing.returncode != 0:
        raise RuntimeError(f"nvidia-smi -L failed ({listing.stderr.strip()}); set CUDA_VISIBLE_DEVICES='' to train "
                           f"on the CPU")
    return [str(i) for i in range(sum(line.startswith("GPU ") for line in listing.stdout.splitlines()))]


def launch(main_script: str, block: str, data_dir: str, out_dir: str, log_dir: str, main_args: list[str],
           jobs_per_gpu: int = 1, layers_per_job: int = 1) -> int:
    """Train every layer of the manifest over all visible GPUs, one process and one log per job of
    `layers_per_job` consecutive layers (1: a process per layer, as the original); summarize."""
    num_layers = ActivationStore(data_dir).num_layers
    gpus = visible_gpus()
    slots = [g for g in gpus for _ in range(jobs_per_gpu)] or [None] * jobs_per_gpu  # CPU: jobs_per_gpu processes
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    print(f"{num_layers} layers of {data_dir} on {', '.join(f'GPU {g}' for g in gpus) or 'the CPU'}; logs in {log_dir}")
    todo: queue.Queue[range] = queue.Queue()
    for start in range(0, num_layers, layers_per_job):
        todo.put(range(start, min(start + layers_per_job, num_layers)))
    failed: list[int] = []
    progress = tqdm(total=num_layers, desc=f"{block} layers", unit="layer")

    def worker(gpu: str | None) -> None:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu if gpu is not None else "")
        while True:
            try:
                layers = todo.get_nowait()
            except queue.Empty:
                return
            spec = str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"
            command = [sys.executable, main_script, "--data-dir", data_dir, "--out-dir", out_dir, "--L", spec,
                       "--device", "cpu" if gpu is None else "cuda:0", *main_args]
            name = f"{block}_layer{spec}.log" if len(layers) == 1 else f"{block}_layers{spec}.log"
            with open(Path(log_dir) / name, "w") as log:
                log.write(" ".join(command) + "\n")
                log.flush()
                if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode != 0:
                    failed.extend(layers)
            progress.update(len(layers))

    threads = [threading.Thread(target=worker, args=(gpu,)) for gpu in slots]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    progress.close()
    if failed:
        print(f"FAILED layers {sorted(failed)}: see {log_dir}/{block}_layer<L>.log")
    csv_path, md_path, missing = summarize(out_dir, block, num_layers)
    print(f"wrote {csv_path} and {md_path}")
    print(md_path.read_text())
    return 1 if failed or missing else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    main_args = argv[argv.index("--") + 1:] if "--" in argv else []  # flags for every main, after --
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description="Helpers of the run_c4_*.sh scripts. launch: ... -- MAIN_FLAGS "
                                                 "passes MAIN_FLAGS to every main.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("launch", help="train every layer of a collection over all visible GPUs, then summarize")
    run.add_argument("main_script", help="sparse_predictor/main_{mlp,att}[_llama].py")
    run.add_argument("--block", choices=BLOCKS, required=True, help="mlp or att: names the outputs")
    run.add_argument("--data-dir", required=True, help="collected activations; its manifest gives the layers")
    run.add_argument("--out-dir", required=True, help="predictor checkpoints, JSONs and the summary")
    run.add_argument("--log-dir", required=True, help="one log per layer: {block}_layer{L}.log")
    run.add_argument("--jobs-per-gpu", type=int, default=1,
                     help="training processes at once on each GPU, or on the CPU when there is none (default 1)")
    run.add_argument("--layers-per-job", type=int, default=1,
                     help="consecutive layers one process trains in turn (default 1: a process per layer)")
    summary = sub.add_parser("summarize", help="write {block}_summary.csv/.md from the per-layer JSONs")
    summary.add_argument("--block", choices=BLOCKS, required=True, help="mlp or att")
    summary.add_argument("--out-dir", required=True, help="directory of {block}_layer{L}.json")
    summary.add_argument("--num-layers", type=int, default=None, help="expected layers; missing ones fail the run")
    args = parser.parse_args(argv)
    if args.command == "launch":
        return launch(args.main_script, args.block, args.data_dir, args.out_dir, args.log_dir, main_args,
                      args.jobs_per_gpu, args.layers_per_job)
    csv_path, md_path, missing = summarize(args.out_dir, args.block, args.num_layers)
    print(md_path.read_text())
    print(f"wrote {csv_path} and {md_path}" + (f"; MISSING layers {missing}" if missing else ""))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
