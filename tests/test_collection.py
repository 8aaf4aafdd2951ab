"""Collected activations equal the values captured from Hugging Face models with forward hooks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from Decentralized_FM_alpha.utils.activation_store import ActivationStore
from tests.helpers_models import hf_reference_activations, make_llama, make_opt
from tests.runner_helpers import REPO, RUNNER, c4_texts, run_one_rank, run_ranks, write_requests

FP16_TOL = dict(rtol=2e-3, atol=2e-3)  # float16 rounding of the stored values


@pytest.fixture(scope="module", params=["opt", "llama"])
def collected(request, tmp_path_factory, tiny_tokenizer_dir):
    family = request.param
    tmp = tmp_path_factory.mktemp(f"collect_{family}")
    model, _, converted = (make_opt if family == "opt" else make_llama)(tmp, tiny_tokenizer_dir, seed=2)
    prompts = c4_texts(5, max_chars=300)
    req = write_requests(tmp / "req.jsonl", prompts)
    data = tmp / "data"
    extra = ["--collect-mlp-gate"] if family == "llama" else []
    run_one_rank(["--model-name", str(converted), "--model-type", f"{family}-save", "--infer-data", str(req),
                  "--output-path", str(tmp / "out.jsonl"), "--data-path", str(data), "--token-micro-batch-size", "2",
                  *extra])
    return family, model, converted, req, prompts, data, tmp


def test_every_collected_array_equals_hf_hooks(collected):
    family, model, converted, _, prompts, data, _ = collected
    store = ActivationStore(data)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    kinds = ["att_x", "att_label", "mlp_x", "mlp_label"] + (["mlp_gate"] if family == "llama" else [])
    assert sorted(store.kinds) == sorted(kinds)
    row = 0
    for doc, prompt in enumerate(prompts):
        ids = tokenizer(prompt)["input_ids"]
        ref = hf_reference_activations(model, family, ids)
        for layer in range(store.num_layers):
            for kind in kinds:
                ours = torch.from_numpy(np.array(store.open(kind, layer)[row:row + len(ids)])).float()
                torch.testing.assert_close(ours, ref[kind][layer].float(), **FP16_TOL,
                                           msg=f"{kind} layer {layer} doc {doc}")
        row += len(ids)
    assert row == store.rows


def test_token_index_and_manifest(collected):
    family, _, converted, req, prompts, data, _ = collected
    tokenizer = AutoTokenizer.from_pretrained(converted)
    expected = [(d, t, tok) for d, p in enumerate(prompts) for t, tok in enumerate(tokenizer(p)["input_ids"])]
    index = ActivationStore(data).token_index()
    assert index.dtype == np.int32
    np.testing.assert_array_equal(index, np.array(expected, dtype=np.int32))
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["rows_written"] == len(expected)
    assert manifest["stopped_reason"] == "all requests processed"
    assert manifest["source_data"]["path"] == str(req.resolve()) and len(manifest["source_data"]["sha256"]) == 64
    assert manifest["config"]["num_layers"] == 3 and manifest["capacity"] == 400_000
    assert set(manifest["files"]) == {f"{k}_{l}.mmap" for k in manifest["kinds"] for l in range(3)}
    assert "mlp_label" in manifest["label_definitions"] and manifest["git_commit"]
    assert manifest["partial_document"] is None and manifest["docs_done"] == len(prompts)
    assert manifest["tokenizer"]["adds_bos"] is True and manifest["tokenizer"]["position_0"] == "the BOS token"
    assert manifest["weights"]["source"] and manifest["weights"]["gguf"] is None


def test_capacity_reached_stops_cleanly_and_records_the_cut_document_as_partial(collected, tmp_path):
    family, _, converted, req, prompts, data, _ = collected
    run_one_rank(["--model-name", str(converted), "--model-type", f"{family}-save", "--infer-data", str(req),
                  "--output-path", str(tmp_path / "out.jsonl"), "--data-path", str(tmp_path / "d"),
                  "--collect-tokens", "50", "--token-micro-batch-size", "2"])
    small, full = ActivationStore(tmp_path / "d"), ActivationStore(data)
    assert small.rows == 50 and small.manifest["stopped_reason"] == "capacity reached"
    lengths = [len(AutoTokenizer.from_pretrained(converted)(p)["input_ids"]) for p in prompts]
    whole = int(np.searchsorted(np.cumsum(lengths), 50, side="right"))  # documents that fit entirely in 50 rows
    stored = sum(lengths[:whole])
    assert stored < 50  # the capacity cuts a document of the fixture
    assert small.manifest["docs_done"] == whole
    assert small.manifest["partial_document"] == {"document": whole, "rows": 50 - stored, "tokens": lengths[whole]}
    np.testing.assert_array_equal(np.asarray(small.open("mlp_x", 1)), np.asarray(full.open("mlp_x", 1)[:50]))
    np.testing.assert_array_equal(small.token_index(), full.token_index()[:50])


def test_two_rank_collection_equals_one_rank(collected, tmp_path):
    family, _, converted, req, _, data, _ = collected
    run_ranks(["--model-name", str(converted), "--model-type", f"{family}-save", "--infer-data", str(req),
               "--output-path", str(tmp_path / "out.jsonl"), "--data-path", str(tmp_path / "d2"),
               "--num-layers", "2", "--token-micro-batch-size", "2"]
              + (["--collect-mlp-gate"] if family == "llama" else []), world_size=2)
    for f in sorted(os.listdir(data)):
        if f.endswith(".mmap") or f == "token_index.npy":
            assert (tmp_path / "d2" / f).read_bytes() == (data / f).read_bytes(), f


def test_killed_and_resumed_collection_is_byte_identical(collected, tmp_path):
    """Stop the collecting process after its second accepted batch, rerun the same command, compare bytes.

    OPT: an exception (the run ends normally, so every accepted batch is committed: 4 documents); Llama: SIGKILL,
    no chance to finish the background commits, so 0, 2 or 4 documents are committed, never a wrong row."""
    family, _, converted, req, _, data, _ = collected
    out_dir = tmp_path / "resumed"
    args = [sys.executable, str(RUNNER), "--model-name", str(converted), "--model-type", f"{family}-save",
            "--infer-data", str(req), "--output-path", str(tmp_path / "out.jsonl"), "--data-path", str(out_dir),
            "--token-micro-batch-size", "2", "--use-cuda", "false"] + (["--collect-mlp-gate"] if family == "llama" else [])
    crash = {"DEJAVU_TEST_CRASH_AFTER_BATCHES": "2", **({"DEJAVU_TEST_CRASH_HARD": "1"} if family == "llama" else {})}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    crashed = subprocess.run(args, env={**env, **crash}, capture_output=True, text=True, timeout=300)
    progress = out_dir / "progress_rank0.json"
    committed = json.loads(progress.read_text())["docs_done"] if progress.is_file() else 0
    if family == "llama":
        assert crashed.returncode == -9 and committed in (0, 2, 4)
    else:
        assert crashed.returncode != 0 and "simulated crash" in crashed.stderr and committed == 4
    assert not json.loads((out_dir / "manifest.json").read_text())["complete"]
    resumed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (f"resuming after {committed} documents" in resumed.stdout) == (committed > 0)
    for f in sorted(os.listdir(data)):
        if f.endswith(".mmap") or f == "token_index.npy":
            assert (out_dir / f).read_bytes() == (data / f).read_bytes(), f
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 5


def test_sync_writer_writes_the_same_bytes_as_the_async_default(collected, tmp_path):
    """--collect-writer sync (the original: copy, write, flush per batch) and async (the default) give equal files."""
    family, _, converted, req, _, data, _ = collected
    run_one_rank(["--model-name", str(converted), "--model-type", f"{family}-save", "--infer-data", str(req),
                  "--output-path", str(tmp_path / "out.jsonl"), "--data-path", str(tmp_path / "sync"),
                  "--token-micro-batch-size", "2", "--collect-writer", "sync"]
                 + (["--collect-mlp-gate"] if family == "llama" else []))
    assert json.loads((data / "manifest.json").read_text())["writer"] == "async"
    assert json.loads((tmp_path / "sync" / "manifest.json").read_text())["writer"] == "sync"
    compared = [f for f in sorted(os.listdir(data)) if f.endswith(".mmap") or f == "token_index.npy"]
    assert len(compared) == 1 + 3 * (5 if family == "llama" else 4)
    for f in compared:
        assert (tmp_path / "sync" / f).read_bytes() == (data / f).read_bytes(), f


def test_async_progress_is_written_only_after_the_batch_is_in_the_files_and_synced(tmp_path, monkeypatch):
    """At every progress write, the committed rows are in the files and each file was fdatasync'ed since its
    last write of that batch (the commit protocol of SPEC §6, with writes in background threads)."""
    from Decentralized_FM_alpha.utils import activation_store, row_files
    from Decentralized_FM_alpha.utils.activation_store import ActivationWriter, ModelDims

    dims = ModelDims(hidden_size=8, ffn_dim=24, num_heads=4, num_kv_heads=2, num_layers=2)
    events: list[tuple] = []
    lock = threading.Lock()
    real_pwrite, real_sync, real_json = os.pwrite, os.fdatasync, activation_store.write_json_atomic

    def pwrite(fd, data, offset):
        width = {fd: writer.files.widths[key] for key, fd in writer.files.fds.items()}[fd]
        with lock:
            events.append(("write", fd, (offset + len(data)) // (2 * width)))  # the row this write ends at
        return real_pwrite(fd, data, offset)

    def fdatasync(fd):
        with lock:
            events.append(("sync", fd, None))
        real_sync(fd)

    def progress(path, obj):
        if os.path.basename(path).startswith("progress"):
            with lock:
                events.append(("progress", None, obj["rows_written"]))
            for (kind, layer), fd in writer.files.fds.items():  # the committed rows are in the file already
                stored = np.frombuffer(os.pread(fd, obj["rows_written"] * dims.width(kind) * 2, 0), np.float16)
                expected = np.concatenate([v[(kind, layer)] for v in batches])[: obj["rows_written"]]
                np.testing.assert_array_equal(stored.reshape(expected.shape), expected)
        real_json(path, obj)

    monkeypatch.setattr(row_files.os, "pwrite", pwrite)
    monkeypatch.setattr(row_files.os, "fdatasync", fdatasync)
    monkeypatch.setattr(activation_store, "write_json_atomic", progress)
    kinds = ("att_x", "att_label", "mlp_x", "mlp_label")
    writer = ActivationWriter(tmp_path, dims, range(2), kinds, capacity=100, rank=0, world_size=1,
                              manifest_fields={"model_name": "t", "model_type": "t", "source_data": None})
    rng = np.random.default_rng(0)
    batches = []
    for b in range(3):
        valid = torch.tensor([[True] * 7 + [False], [True] * 8])  # 15 rows a batch
        writer.begin_batch([2 * b, 2 * b + 1], torch.zeros(2, 8, dtype=torch.long), valid)
        values = {}
        for layer in range(2):
            for kind in kinds:
                v = rng.standard_normal((2, 8, dims.width(kind))).astype(np.float16)
                writer.save(kind, layer, torch.from_numpy(v))
                values[(kind, layer)] = v[valid.numpy()]
        batches.append(values)
        writer.end_batch()
    writer.finish("done")
    assert [rows for kind, _, rows in events if kind == "progress"] == [15, 30, 45]
    for i, (kind, _, rows) in enumerate(events):
        if kind != "progress":
            continue
        for fd in writer.files.fds.values():  # the batch's last write to each file, then a sync, then the progress
            last = max(j for j, e in enumerate(events) if e[:2] == ("write", fd) and e[2] <= rows)
            assert last < i and ("sync", fd, None) in events[last:i], (rows, fd)


def test_collected_layers_equal_a_full_collection_and_other_layers_raise(collected, tmp_path):
    """--collect-layers 1-1 --max-layers 2 --collect-kinds att_x,mlp_label (the forward pass stops after layer 1):
    those files equal the full collection's, the same rows and token index; opening a layer outside 1..1 raises
    naming the directory, the layer and the range; layers past --max-layers are refused."""
    family, _, converted, req, _, data, _ = collected
    part = tmp_path / "part"
    run_one_rank(["--model-name", str(converted), "--model-type", f"{family}-save", "--infer-data", str(req),
                  "--output-path", str(tmp_path / "out.jsonl"), "--data-path", str(part),
                  "--token-micro-batch-size", "2", "--collect-layers", "1-1", "--max-layers", "2", "--collect-kinds",
                  "att_x,mlp_label"])
    assert sorted(f for f in os.listdir(part) if f.endswith(".mmap")) == [
        f"{kind}_1.mmap" for kind in ("att_x", "mlp_label")]
    for f in [f for f in os.listdir(part) if f.endswith(".mmap")] + ["token_index.npy"]:
        assert (part / f).read_bytes() == (data / f).read_bytes(), f
    store = ActivationStore(part)
    assert store.manifest["collected_layers"] == [1, 1] and store.kinds == ("att_x", "mlp_label")
    for layer in (0, 2):
        with pytest.raises(FileNotFoundError,
                           match=rf"{part}: layer {layer} was not collected \(collected layers 1\.\.1\)"):
            store.open("att_x", layer)
    assert np.array_equal(store.prefix(7).open("att_x", 1), ActivationStore(data).open("att_x", 1)[:7])
    assert store.prefix(7).token_index().shape == (7, 3)
    with pytest.raises(SystemExit, match=r"--collect-layers 1-2: --max-layers 2 runs layers 0\.\.1 only"):
        run_one_rank(["--model-name", str(converted), "--model-type", f"{family}-save", "--infer-data", str(req),
                      "--output-path", str(tmp_path / "out2.jsonl"), "--data-path", str(tmp_path / "past"),
                      "--collect-layers", "1-2", "--max-layers", "2"])
