"""The collected-activation format (SPEC section 6): one float16 mmap per kind and layer.

Written by the `*_save` modules during collection, read by the predictor trainers, the
sparse-inference checks and the analysis scripts. This file is the only place that knows
file names, shapes and the manifest layout.

Layout of `data/<model>_<dataset>/`:
  {kind}_{layer}.mmap   float16, shape (capacity, width); rows [0, rows_written) are valid
  token_index.npy       int32 (rows_written, 3) = (document id, position, token id)
  manifest.json         dims, capacity, rows_written, files, provenance, complete or not, collected_layers
A collection may hold only some layers (`collected_layers` [first, last], inclusive; absent = all), as the online
study collects one layer group at a time; opening another layer is an error naming the collected range.
While a collection runs, `token_index.partial.npy` (capacity rows) and `progress_rank{r}.json`
hold the state that a resumed run continues from.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from Decentralized_FM_alpha.utils.manifest import base_manifest, now, read_json, write_json_atomic
from Decentralized_FM_alpha.utils.row_files import DEFAULT_BUFFER_BYTES, STORAGE_DTYPE, make_row_files

DEFAULT_CAPACITY = 400_000
MANIFEST = "manifest.json"
TOKEN_INDEX = "token_index.npy"
TOKEN_INDEX_PARTIAL = "token_index.partial.npy"

# Where each kind is taken in the forward pass (copied into every manifest).
KIND_DEFINITIONS = {
    "att_x": "block input: residual stream entering the layer, before its input norm",
    "att_label": "L2 norm of each query head's attention output, before the output projection",
    "mlp_x": "residual stream after the attention residual add, before the MLP norm",
    "mlp_label": "MLP intermediate activation fed to the down projection",
    "mlp_gate": "gate projection output before the activation function",
}


@dataclass(frozen=True)
class ModelDims:
    hidden_size: int
    ffn_dim: int
    num_heads: int
    num_kv_heads: int
    num_layers: int

    def width(self, kind: str) -> int:
        return {"att_x": self.hidden_size, "mlp_x": self.hidden_size, "att_label": self.num_heads,
                "mlp_label": self.ffn_dim, "mlp_gate": self.ffn_dim}[kind]


def activation_file(data_dir: str | os.PathLike, kind: str, layer: int) -> Path:
    if kind not in KIND_DEFINITIONS:
        raise ValueError(f"unknown activation kind {kind!r}; known: {sorted(KIND_DEFINITIONS)}")
    if layer < 0:
        raise ValueError(f"layer index must be >= 0, got {layer} for {kind}")
    return Path(data_dir) / f"{kind}_{layer}.mmap"


def progress_file(data_dir: str | os.PathLike, rank: int) -> Path:
    return Path(data_dir) / f"progress_rank{rank}.json"


# ----------------------------------------------------------------------------------- reading
class ActivationStore:
    """Read-only view of a collection directory, validated against its manifest."""

    def __init__(self, data_dir: str | os.PathLike):
        self.data_dir = Path(data_dir)
        if not self.data_dir.is_dir():
            raise FileNotFoundError(f"activation directory not found: {self.data_dir}")
        self.manifest = read_json(self.data_dir / MANIFEST)
        cfg = self.manifest["config"]
        self.dims = ModelDims(cfg["hidden_size"], cfg["ffn_dim"], cfg["num_heads"], cfg["num_kv_heads"],
                              cfg["num_layers"])
        self.capacity = int(self.manifest["capacity"])
        self.rows = int(self.manifest["rows_written"])
        self.kinds = tuple(self.manifest["kinds"])
        first, last = self.manifest.get("collected_layers", [0, self.dims.num_layers - 1])
        self.collected_layers = range(first, last + 1)
        self.file_rows = self.rows  # rows of the files (prefix() reads fewer)
        if not 0 < self.rows <= self.capacity:
            raise ValueError(f"{self.data_dir / MANIFEST}: rows_written={self.rows} outside (0, capacity={self.capacity}]")

    @property
    def num_layers(self) -> int:
        return self.dims.num_layers

    def open(self, kind: str, layer: int) -> np.memmap:
        """The valid rows of one file, as a read-only (rows, width) float16 memmap."""
        if kind not in self.kinds:
            raise FileNotFoundError(f"{self.data_dir}: kind {kind!r} was not collected (manifest kinds: {self.kinds})")
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"{self.data_dir}: layer {layer} outside 0..{self.num_layers - 1}")
        if layer not in self.collected_layers:
            raise FileNotFoundError(f"{self.data_dir}: layer {layer} was not collected (collected layers "
                                    f"{self.collected_layers[0]}..{self.collected_layers[-1]})")
        path = activation_file(self.data_dir, kind, layer)
        width = self.dims.width(kind)
        expected = self.capacity * width * np.dtype(STORAGE_DTYPE).itemsize
        if not path.is_file():
            raise FileNotFoundError(f"missing activation file: {path}")
        if path.stat().st_size != expected:
            raise ValueError(f"{path}: {path.stat().st_size} bytes, manifest says capacity {self.capacity} x width "
                             f"{width} x 2 = {expected} bytes")
        return np.memmap(path, dtype=STORAGE_DTYPE, mode="r", shape=(self.capacity, width))[: self.rows]

    def token_index(self) -> np.ndarray:
        path = self.data_dir / TOKEN_INDEX
        if not path.is_file():
            raise FileNotFoundError(f"missing token index: {path}")
        index = np.load(path, mmap_mode="r")
        if index.shape != (self.file_rows, 3):
            raise ValueError(f"{path}: shape {index.shape}, manifest says ({self.file_rows}, 3)")
        return index[: self.rows]

    def prefix(self, rows: int) -> "ActivationStore":
        """The same collection read as if it held only its first `rows` rows (all of them when it holds fewer)."""
        view = copy.copy(self)
        view.rows = min(rows, self.rows)
        return view

    def document_ids(self) -> np.ndarray:
        return np.asarray(self.token_index()[:, 0])


# ----------------------------------------------------------------------------------- writing
class ActivationWriter:
    """Writes the activations of the layers one pipeline rank owns, resumably.

    Rows are committed batch by batch: once the batch's rows are durable in the files, `progress_rank{r}.json`
    records how many documents and rows are final. A restarted run continues from the
    smallest committed point over all ranks and rewrites anything after it, so an
    interrupted and resumed collection ends byte-identical to an uninterrupted one.
    `writer` "async" (default) writes in the background at disk speed, "sync" as the original (utils/row_files.py);
    both give the same files. Call close() when a run stops early (it commits what end_batch accepted).
    """

    def __init__(self, data_dir: str | os.PathLike, dims: ModelDims, layers: range, kinds: tuple[str, ...],
                 capacity: int, rank: int, world_size: int, manifest_fields: dict, writer: str = "async",
                 buffer_bytes: int = DEFAULT_BUFFER_BYTES, collected: range | None = None):
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        collected = range(dims.num_layers) if collected is None else collected
        if not collected or collected[0] < 0 or collected[-1] >= dims.num_layers:
            raise ValueError(f"collected layers {collected} outside 0..{dims.num_layers - 1}")
        self.dims, self.kinds = dims, kinds
        self.layers = [l for l in layers if l in collected]  # of this rank's layers, those stored
        self.capacity, self.rank, self.world_size = capacity, rank, world_size
        self.manifest = base_manifest(**manifest_fields, config=dims.__dict__, capacity=capacity, kinds=list(kinds),
                                      storage_dtype="float16", writer=writer,
                                      kind_definitions={k: KIND_DEFINITIONS[k] for k in kinds},
                                      collected_layers=[collected[0], collected[-1]],
                                      files={f"{k}_{l}.mmap": [capacity, dims.width(k)]
                                             for l in collected for k in kinds},
                                      token_index=[TOKEN_INDEX, "(rows_written, 3) int32: document id, position, token id"])
        # docs_done: documents stored whole; partial_document: the one the capacity cut short, with the rows it holds
        self.docs_done, self.rows_written, self.partial_document = self._resume_point()
        self._check_compatible_with_existing()
        self.writer = writer
        self.files = make_row_files(writer, {(k, l): self._file_for_write(activation_file(self.data_dir, k, l),
                                                                          dims.width(k))
                                             for l in self.layers for k in kinds}, capacity, buffer_bytes)
        self.token_index = self._open_token_index() if rank == 0 else None
        self.full = self.rows_written >= capacity
        self._batch_index: torch.Tensor | None = None  # flat (b, t) positions of the batch's stored rows
        self._batch_rows = 0
        self._batch_docs: list[tuple[int, int]] = []  # (document id, real tokens) of the batch, in row order
        if rank == 0:
            self._write_manifest(complete=False)

    # -- resume
    def _resume_point(self) -> tuple[int, int, dict | None]:
        points = []
        for r in range(self.world_size):
            path = progress_file(self.data_dir, r)
            if path.is_file():
                p = read_json(path)
                points.append((p["docs_done"], p["rows_written"], p.get("partial_document")))
            else:
                points.append((0, 0, None))
        return min(points, key=lambda p: p[:2])

    def _check_compatible_with_existing(self) -> None:
        old = self.data_dir / MANIFEST
        if self.rows_written == 0 or not old.is_file():
            return
        previous = {"collected_layers": [0, self.dims.num_layers - 1], **read_json(old)}  # absent: every layer
        for key in ("config", "capacity", "kinds", "collected_layers", "source_data", "model_name"):
            if previous.get(key) != self.manifest.get(key):
                raise ValueError(f"cannot resume in {self.data_dir}: {key} differs from the earlier run "
                                 f"({previous.get(key)!r} vs {self.manifest.get(key)!r}); use a new --data-path")

    def _file_for_write(self, path: Path, width: int) -> tuple[Path, int, bool]:
        """(path, width, keep its content): an existing file of the right size is kept, a fresh one is zeros."""
        size = self.capacity * width * np.dtype(STORAGE_DTYPE).itemsize
        if path.exists() and path.stat().st_size == size:
            return path, width, True
        if path.exists() and self.rows_written > 0:
            raise ValueError(f"cannot resume: {path} has {path.stat().st_size} bytes, expected {size}")
        return path, width, False

    def _open_token_index(self) -> np.memmap:
        path = self.data_dir / TOKEN_INDEX_PARTIAL
        if path.exists() and self.rows_written > 0:
            return np.lib.format.open_memmap(path, mode="r+")
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.int32, shape=(self.capacity, 3))

    # -- one batch
    def begin_batch(self, doc_ids: list[int], token_ids: torch.Tensor, valid: torch.Tensor) -> None:
        """Declare the next batch: `valid` (B, T) marks real tokens; rows go in (b, t) order."""
        self.files.check()
        n = int(valid.sum())
        self._batch_rows = min(n, self.capacity - self.rows_written)
        self._batch_index = torch.nonzero(valid.reshape(-1)).squeeze(1)[: self._batch_rows]
        self._batch_docs = list(zip(doc_ids, valid.sum(dim=1).tolist()))
        if self.token_index is not None and self._batch_rows > 0:
            b_idx, t_idx = torch.nonzero(valid.cpu(), as_tuple=True)
            rows = torch.stack([torch.tensor(doc_ids)[b_idx], t_idx, token_ids.cpu()[b_idx, t_idx]], dim=1)
            self.token_index[self.rows_written:self.rows_written + self._batch_rows] = rows[: self._batch_rows].numpy()

    def save(self, kind: str, layer: int, values: torch.Tensor) -> None:
        """Store `values` (B, T, width) of the current batch's real tokens for one layer."""
        if self._batch_rows == 0 or kind not in self.kinds or layer not in self.layers:
            return
        rows = values.reshape(-1, values.shape[-1]).index_select(0, self._batch_index).to(torch.float16)
        self.files.write((kind, layer), self.rows_written, rows, f"{kind} of layer {layer}")

    def end_batch(self) -> None:
        """Commit the batch: once its rows are durable, record the new resume point (documents stored whole, rows)."""
        self.rows_written += self._batch_rows
        self._count_documents(self._batch_rows)
        self.full = self.rows_written >= self.capacity
        progress = {"docs_done": self.docs_done, "rows_written": self.rows_written,
                    "partial_document": self.partial_document}
        token_index, path = self.token_index, progress_file(self.data_dir, self.rank)

        def commit() -> None:
            if token_index is not None:
                token_index.flush()
            write_json_atomic(path, progress)

        self.files.commit(commit)
        self._batch_index, self._batch_rows, self._batch_docs = None, 0, []

    def _count_documents(self, rows: int) -> None:
        """Documents whose every token was stored count as done; one cut by the capacity is recorded as partial."""
        for doc, tokens in self._batch_docs:
            if rows >= tokens:
                self.docs_done += 1
                rows -= tokens
            else:
                if rows > 0:
                    self.partial_document = {"document": int(doc), "rows": int(rows), "tokens": int(tokens)}
                return

    # -- the end
    def close(self) -> None:
        """Wait until every batch that end_batch accepted is committed; raises nothing (finish raises)."""
        self.files.close()

    def finish(self, stopped_reason: str) -> None:
        """Write the final token index and manifest (rank 0, after all ranks have finished)."""
        self.close()
        self.files.check()
        if self.rank != 0:
            return
        if self.rows_written == 0:
            raise ValueError("collection wrote no rows: no request had a token to collect")
        np.save(self.data_dir / TOKEN_INDEX, np.asarray(self.token_index[: self.rows_written]))
        self._write_manifest(complete=True, stopped_reason=stopped_reason)

    def _write_manifest(self, complete: bool, stopped_reason: str | None = None) -> None:
        self.manifest.update(rows_written=self.rows_written, docs_done=self.docs_done,
                             partial_document=self.partial_document, complete=complete,
                             stopped_reason=stopped_reason, end_time=now() if complete else None)
        write_json_atomic(self.data_dir / MANIFEST, self.manifest)


def iter_row_chunks(rows: int, chunk: int) -> Iterator[slice]:
    for start in range(0, rows, chunk):
        yield slice(start, min(start + chunk, rows))
