"""A layer's rows on the device: the document split, streaming reads from the mmaps, device rows and windows."""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from Decentralized_FM_alpha.utils import work
from Decentralized_FM_alpha.utils.activation_store import ActivationStore, activation_file, iter_row_chunks
from sparse_predictor.trainer.labels import (InputSpec, LabelSpec, label_bits, pack_bits, packed_width, resolve_input,
                                             unpack_bits)
from sparse_predictor.trainer.metrics import true_top_k


TEST_FRACTION = 0.05
MIN_TEST_DOCS = 30  # a few held-out documents gave Recall noise of several points (SmolLM2)


CHUNK_BYTES = 64 << 20  # per file and read-ahead slot: bounds host RAM whatever the number of rows
READ_AHEAD = 3
CPU_RESIDENT_BYTES = 2 << 30  # on a CPU run the "device" is host RAM: keep the layer under 2 GiB, stream beyond
GPU_RESIDENT_SHARE = 0.6  # of free GPU memory; the rest is for the model, optimizer, label chunks, batches


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


def shuffled_training_documents(doc_ids: np.ndarray, is_test: np.ndarray, seed: int) -> np.ndarray:
    """The training documents' ids in a seeded random order."""
    return np.random.default_rng(seed).permutation(np.unique(doc_ids[~is_test]))


def training_subset(fraction: float, seed: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """load_layer's train_subset: whole training documents in a seeded random order, taken until their rows reach
    `fraction` of the training rows (a data curve varies the amount of data, not the documents' integrity)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"training rows fraction {fraction}: need 0 < fraction <= 1")

    def subset(doc_ids: np.ndarray, is_test: np.ndarray) -> np.ndarray:
        docs = shuffled_training_documents(doc_ids, is_test, seed)
        ids, counts = np.unique(doc_ids, return_counts=True)
        rows = counts[np.searchsorted(ids, docs)]
        taken = docs[: int(np.searchsorted(np.cumsum(rows), fraction * rows.sum() - 1e-9)) + 1]
        return np.isin(doc_ids, taken) & ~is_test
    return subset


def fold_training_mask(fold: int, folds: int, seed: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """load_layer's train_subset: the training documents dealt into `folds` seeded groups; fold f trains on every
    group but f (the held-out documents stay the split's), so the folds vary the training sample only."""
    if not 0 <= fold < folds or folds < 2:
        raise ValueError(f"fold {fold} of {folds}: need folds >= 2 and 0 <= fold < folds")

    def subset(doc_ids: np.ndarray, is_test: np.ndarray) -> np.ndarray:
        groups = np.array_split(shuffled_training_documents(doc_ids, is_test, seed), folds)
        if min(len(g) for g in groups) == 0:
            raise ValueError(f"{folds} folds need at least {folds} training documents")
        return np.isin(doc_ids, np.concatenate([g for i, g in enumerate(groups) if i != fold])) & ~is_test
    return subset


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
                work.count(file_bytes=(rows.stop - rows.start) * 2 * sum(f.width for f in files))
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
    is_train: np.ndarray | None = None  # (rows,) bool training rows, a subset of ~is_test; None: all of ~is_test

    @property
    def train_mask(self) -> np.ndarray:
        return ~self.is_test if self.is_train is None else self.is_train

    @property
    def rows_train(self) -> int:
        return int(self.train_mask.sum())

    @property
    def out_width(self) -> int:
        return self.test.width

    def train_windows(self, epoch: int, seed: int) -> Iterator[DeviceRows]:
        """The training rows of one epoch: one resident block, or windows of randomly ordered chunks."""
        if self.train is not None:
            yield self.train
            return
        widths = [self.x_file.width, *(f.width for f in self.label_files.values())]
        for window in window_masks(self.train_mask, chunk_slices(len(self.is_test), widths), self.window_rows,
                                   np.random.default_rng(seed + epoch)):
            yield load_rows(self.x_file, self.label_files, self.labels, window, self.test.x.device, False,
                            f"epoch {epoch} window")


def window_masks(is_train: np.ndarray, slices: list[slice], window_rows: int,
                 rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Training rows grouped into windows of at most `window_rows`: whole chunks, in random order."""
    window, count = np.zeros(len(is_train), dtype=bool), 0
    for i in rng.permutation(len(slices)):
        rows = slices[i]
        n = int(is_train[rows].sum())
        if count and count + n > window_rows:
            yield window
            window, count = np.zeros(len(is_train), dtype=bool), 0
        window[rows] = is_train[rows]
        count += n
    if count:
        yield window


def load_layer(store: ActivationStore, block: str, layer: int, input_flag: str,
               label: LabelSpec | Sequence[LabelSpec], device: torch.device, batch_size: int,
               max_device_bytes: int | None = None, split: SplitConfig = SplitConfig(),
               train_subset: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> LayerData:
    """Split by document, put the held-out rows on the device and, if they fit, the training rows too.

    Several label specs of one layer (e.g. top-K at three fractions) share the input rows and are trained together.
    train_subset(doc_ids, is_test) -> bool rows: train on those training rows only (e.g. training_subset,
    fold_training_mask); the held-out rows stay the split's.
    """
    labels = (label,) if isinstance(label, LabelSpec) else tuple(label)
    spec = resolve_input(block, input_flag, layer)
    x_file = open_rows(store, spec.kind, spec.layer)
    label_files = {kind: open_rows(store, kind, layer) for kind in dict.fromkeys(l.source_kind for l in labels)}
    if len({f.width for f in label_files.values()}) != 1:
        raise ValueError(f"labels {[l.name for l in labels]} of layer {layer} have different widths")
    doc_ids = store.document_ids()
    is_test = document_split(doc_ids, split.test_fraction, split.test_docs)
    is_train = None if train_subset is None else train_subset(doc_ids, is_test)
    if is_train is not None and (is_train & is_test).any():
        raise ValueError("train_subset selected held-out rows")
    budget = device_budget(device, max_device_bytes)
    test = load_rows(x_file, label_files, labels, is_test, device, True, f"layer {layer} held-out rows")
    width = test.width
    test_bytes = test.n * layer_row_bytes(x_file.width, width, len(labels), held_out=True)
    window_rows = (budget - test_bytes) // layer_row_bytes(x_file.width, width, len(labels), held_out=False)
    train_rows = ~is_test if is_train is None else is_train
    n_train = int(train_rows.sum())
    if window_rows < min(batch_size, n_train):
        raise MemoryError(f"device memory budget {budget / 2**30:.2f} GiB holds the held-out rows "
                          f"({test_bytes / 2**30:.2f} GiB) but not one batch of training rows; raise --max-device-gb")
    train = None
    if window_rows >= n_train:
        train = load_rows(x_file, label_files, labels, train_rows, device, False, f"layer {layer} training rows")
    else:
        print(f"layer {layer}: {n_train} training rows exceed the device budget; streaming windows of "
              f"{window_rows} rows each epoch")
    return layer_data(spec, x_file, label_files, labels, is_test, test, train, int(window_rows), doc_ids, split,
                      is_train)


def layer_data(spec: InputSpec, x_file: RowFile, label_files: dict[str, RowFile], labels: tuple[LabelSpec, ...],
               is_test: np.ndarray, test: DeviceRows, train: DeviceRows | None, window_rows: int, doc_ids: np.ndarray,
               split: SplitConfig, is_train: np.ndarray | None = None) -> LayerData:
    """A layer ready to train, from rows already on the device (read from the mmaps, or kept by an online pass):
    each label's Recall@K budget and the held-out rows' true top-K are computed here, once."""
    Ks = tuple(recall_at_k_budget(l, test.label_rows(i)) for i, l in enumerate(labels))
    test.rank_truth(Ks)
    return LayerData(spec, x_file, label_files, labels, is_test, test, Ks, train, window_rows,
                     np.asarray(doc_ids[is_test]), split, is_train)


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
