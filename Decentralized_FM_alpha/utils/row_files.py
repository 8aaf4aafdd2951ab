"""How a collection's rows reach its files: synchronously through mmaps, or in the background at disk speed.

ActivationWriter (activation_store.py) owns names, shapes, rows and resumption; it hands each batch's rows to one of
these and asks it to `commit` the batch (write the progress file) once the batch's data is durable:
  MmapRowFiles        the original way: each write copies the rows to the host (.cpu()) into the file's mmap, and a
                      commit flushes every mmap (msync) first. The forward pass waits on the disk at every batch.
  BackgroundRowFiles  each write queues the rows' device -> pinned host copy on a copy stream (no wait) and hands
                      the slab to writer threads (pwrite); a commit is queued behind the batch's writes and runs,
                      in batch order, after fdatasync of every file the batch touched (several files at once,
                      while the writers already fill the page cache with the next batch). The forward pass only
                      waits when every slab is in flight (the disk is the bottleneck; --collect-buffer-gb bounds
                      the slabs' host RAM).
Both write the same bytes at the same offsets (tests/test_collection.py compares them) and commit in the same order.
A non-finite float16 row is an error naming the kind, layer and row, raised before the batch is committed (at once
by MmapRowFiles; at the next write or commit by BackgroundRowFiles, for the first bad write in write order).
"""
from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Hashable

import numpy as np
import torch

from Decentralized_FM_alpha.utils import work

STORAGE_DTYPE = np.float16
ROW_FILE_WRITERS = ("async", "sync")
DEFAULT_BUFFER_BYTES = 2 << 30  # pinned host staging for BackgroundRowFiles
SLAB_BYTES = 32 << 20  # one write job; a batch's rows of one file span one or more slabs
WRITE_THREADS = 4  # concurrent pwrites: copies into the page cache overlap, the disk queue stays full


def overflow_error(what: str, row: int) -> OverflowError:
    return OverflowError(f"{what}: row {row} is not finite in float16 (value outside +-65504); refusing to store inf")


def open_row_file(path: Path, capacity: int, width: int, keep: bool) -> int:
    """A file descriptor on `path` sized for `capacity` rows of `width` float16; keep=False starts it from zeros."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    if not keep:
        os.ftruncate(fd, 0)
    os.ftruncate(fd, capacity * width * np.dtype(STORAGE_DTYPE).itemsize)
    return fd


class MmapRowFiles:
    """Synchronous writes into one float16 np.memmap per file (the original collection's way)."""

    def __init__(self, files: dict[Hashable, tuple[Path, int, bool]], capacity: int):
        """files: key -> (path, width, keep existing content)."""
        self.mmaps = {key: np.memmap(path, dtype=STORAGE_DTYPE, mode="r+" if keep else "w+", shape=(capacity, width))
                      for key, (path, width, keep) in files.items()}

    def write(self, key: Hashable, first_row: int, rows: torch.Tensor, what: str) -> None:
        if not torch.isfinite(rows).all():
            bad = (~torch.isfinite(rows)).any(dim=1).nonzero()[0, 0].item()
            raise overflow_error(what, first_row + bad)
        self.mmaps[key][first_row:first_row + rows.shape[0]] = rows.cpu().numpy()
        work.count(file_bytes=rows.numel() * 2)

    def commit(self, commit: Callable[[], None]) -> None:
        for m in self.mmaps.values():
            m.flush()
        commit()

    def check(self) -> None:
        pass

    def close(self) -> None:
        for m in self.mmaps.values():
            m.flush()


class BackgroundRowFiles:
    """Device -> pinned slabs -> pwrite in writer threads; commits after fdatasync, in batch order."""

    def __init__(self, files: dict[Hashable, tuple[Path, int, bool]], capacity: int,
                 buffer_bytes: int = DEFAULT_BUFFER_BYTES, slab_bytes: int = SLAB_BYTES, threads: int = WRITE_THREADS):
        self.fds = {key: open_row_file(path, capacity, width, keep) for key, (path, width, keep) in files.items()}
        self.widths = {key: width for key, (_, width, _) in files.items()}
        self.slab_bytes = slab_bytes
        self.max_slabs = max(1, buffer_bytes // slab_bytes)
        self.slabs: queue.Queue = queue.Queue()  # free (data, flag) pairs
        self.made = 0
        self.copy_stream = None
        self.writers = ThreadPoolExecutor(threads, thread_name_prefix="row-writer")
        self.committer = ThreadPoolExecutor(1, thread_name_prefix="row-commit")  # one thread: commits stay in order
        self.syncers = ThreadPoolExecutor(threads, thread_name_prefix="row-sync")  # files flushed side by side
        self.batch_writes: list[Future] = []  # this batch's writes, in write order
        self.batch_keys: set = set()
        self.error: BaseException | None = None
        self.failed = threading.Event()  # set at the first failure: later writes skip the disk
        self.closed = False

    # -- the forward pass's side
    def write(self, key: Hashable, first_row: int, rows: torch.Tensor, what: str) -> None:
        """Queue `rows` (n, width) float16 for file `key` at row `first_row`; returns without waiting for the disk."""
        self.check()
        rows = rows.contiguous()
        work.count(file_bytes=rows.numel() * 2)
        per_slab = max(1, self.slab_bytes // (rows.shape[1] * 2))
        chunks = list(rows.split(per_slab))
        bad = [~torch.isfinite(c).all() for c in chunks]  # on the compute stream, before the copies
        cuda = rows.is_cuda
        if cuda:
            if self.copy_stream is None:
                self.copy_stream = torch.cuda.Stream(rows.device)
            self.copy_stream.wait_stream(torch.cuda.current_stream(rows.device))
            rows.record_stream(self.copy_stream)  # its memory is not reused before the copies are done
        start = first_row
        for chunk, chunk_bad in zip(chunks, bad):
            data, flag = self.take_slab(cuda)
            nbytes = chunk.numel() * 2
            event = None
            if cuda:
                with torch.cuda.stream(self.copy_stream):
                    data[:nbytes].copy_(chunk.view(torch.uint8).reshape(-1), non_blocking=True)
                    flag.copy_(chunk_bad.reshape(1), non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(self.copy_stream)
                chunk_bad.record_stream(self.copy_stream)
            else:
                data[:nbytes].copy_(chunk.view(torch.uint8).reshape(-1))
                flag.copy_(chunk_bad.reshape(1))
            self.batch_writes.append(self.writers.submit(self.write_slab, key, start, nbytes, data, flag, event, what))
            self.batch_keys.add(key)
            start += chunk.shape[0]

    def take_slab(self, cuda: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """A free staging slab; a new one while fewer than max_slabs exist, else wait for a write to free one."""
        try:
            return self.slabs.get_nowait()
        except queue.Empty:
            pass
        if self.made < self.max_slabs:
            self.made += 1
            return (torch.empty(self.slab_bytes, dtype=torch.uint8, pin_memory=cuda),
                    torch.empty(1, dtype=torch.bool, pin_memory=cuda))
        return self.slabs.get()

    def commit(self, commit: Callable[[], None]) -> None:
        """Run `commit` once every write queued so far is in the files and fdatasync'ed (batches commit in order)."""
        self.check()
        writes, keys = self.batch_writes, self.batch_keys
        self.batch_writes, self.batch_keys = [], set()
        self.committer.submit(self.commit_batch, writes, keys, commit)

    def check(self) -> None:
        """Raise the first failure of the background writes or commits, here in the caller's thread."""
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Wait for every queued write and commit, then release the files; raises nothing (see check)."""
        if self.closed:
            return
        self.closed = True
        self.committer.shutdown(wait=True)  # every committed batch is durable and recorded
        self.writers.shutdown(wait=True)  # writes of a batch never committed (the run stopped mid-batch) end too
        self.syncers.shutdown(wait=True)
        for fd in self.fds.values():
            os.close(fd)

    # -- the background threads
    def write_slab(self, key: Hashable, first_row: int, nbytes: int, data: torch.Tensor, flag: torch.Tensor,
                   event, what: str) -> None:
        try:
            if event is not None:
                event.synchronize()
            if bool(flag[0]):
                values = data[:nbytes].numpy().view(STORAGE_DTYPE).reshape(-1, self.widths[key])
                raise overflow_error(what, first_row + int(np.flatnonzero(~np.isfinite(values).all(axis=1))[0]))
            if self.failed.is_set():
                return  # the collection stops at the first failure: nothing later is committed
            view = memoryview(data.numpy())[:nbytes]
            offset = first_row * self.widths[key] * 2
            done = 0
            while done < nbytes:
                done += os.pwrite(self.fds[key], view[done:], offset + done)
        except BaseException:
            self.failed.set()
            raise
        finally:
            self.slabs.put((data, flag))

    @staticmethod
    def first_failure(writes: list[Future]) -> BaseException | None:
        for w in writes:
            if w.exception() is not None:
                return w.exception()
        return None

    def commit_batch(self, writes: list[Future], keys: set, commit: Callable[[], None]) -> None:
        error = self.first_failure(writes)  # the first failure in write order, as the synchronous path would raise it
        if error is None and self.error is None:
            try:
                list(self.syncers.map(os.fdatasync, [self.fds[key] for key in keys]))  # raises the first failure
                commit()
            except BaseException as e:  # a failed sync or progress write: nothing after it may be committed
                error = e
        if error is not None and self.error is None:
            self.failed.set()
            self.error = error


def make_row_files(writer: str, files: dict[Hashable, tuple[Path, int, bool]], capacity: int,
                   buffer_bytes: int = DEFAULT_BUFFER_BYTES) -> MmapRowFiles | BackgroundRowFiles:
    if writer == "sync":
        return MmapRowFiles(files, capacity)
    if writer == "async":
        return BackgroundRowFiles(files, capacity, buffer_bytes)
    raise ValueError(f"collection writer must be one of {ROW_FILE_WRITERS}, got {writer!r}")
