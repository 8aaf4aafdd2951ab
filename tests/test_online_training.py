"""Online predictor training (sparse_predictor/train_online.py) equals the mmap path: collection + the mains."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sparse_predictor import main_att, main_att_llama, main_mlp, main_mlp_llama, train_online
from sparse_predictor.trainer.labels import pack_bits, unpack_bits
from tests.helpers_models import make_llama, make_opt
from tests.runner_helpers import c4_texts, run_one_rank, write_requests

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

TRAINING = ["--epochs", "2", "--D", "8", "--batch_size", "64", "--device", "cpu", "--seed", "3"]
BATCHING = ["--token-micro-batch-size", "2"]
COMPARED = ("Recall", "True Sparsity", "Classifier Sparsity", "Precision", "Per-token Recall", "Recall@K", "K", "Loss",
            "input", "input_kind", "input_layer", "label", "k", "rows_train", "rows_test", "documents_train",
            "documents_test", "test_documents", "per_document", "best_epoch", "epochs_run")


@pytest.fixture(scope="module", params=["opt", "llama"])
def collected(request, tmp_path_factory, tiny_tokenizer_dir):
    """A tiny model, 8 documents, and their collection by the runner (the mmap path's input)."""
    family = request.param
    tmp = tmp_path_factory.mktemp(f"online_{family}")
    _, _, converted = (make_opt if family == "opt" else make_llama)(tmp, tiny_tokenizer_dir, seed=4)
    req = write_requests(tmp / "req.jsonl", c4_texts(8, max_chars=300))
    data = tmp / "data"
    run_one_rank(["--model-name", str(converted), "--model-type", f"{family}-save", "--infer-data", str(req),
                  "--output-path", str(tmp / "out.jsonl"), "--data-path", str(data), *BATCHING])
    return family, converted, req, data, tmp


def mmap_path(family: str, data: Path, out: Path, flag: str) -> None:
    mlp, att = (main_mlp, main_att) if family == "opt" else (main_mlp_llama, main_att_llama)
    for main in (mlp, att):
        main.main(["--data-dir", str(data), "--out-dir", str(out), "--L", "all", "--input", flag, *TRAINING])


def online_path(converted: Path, req: Path, out: Path, flag: str, *extra: str) -> list[Path]:
    return train_online.main(["--model-name", str(converted), "--infer-data", str(req), "--out-dir", str(out),
                              "--mlp-input", flag, "--att-input", flag, "--dtype", "fp32", *BATCHING, *TRAINING,
                              *extra])


def assert_same_predictors(mmap_dir: Path, online_dir: Path, layers: int = 3) -> None:
    for block in ("mlp", "att"):
        for layer in range(layers):
            ours = torch.load(online_dir / f"{block}_layer{layer}.pt", weights_only=True)
            theirs = torch.load(mmap_dir / f"{block}_layer{layer}.pt", weights_only=True)
            assert ours.keys() == theirs.keys() == {"0.weight", "1.weight"}
            for key in ours:
                assert torch.equal(ours[key], theirs[key]), (block, layer, key)
            online = json.loads((online_dir / f"{block}_layer{layer}.json").read_text())
            mmap = json.loads((mmap_dir / f"{block}_layer{layer}.json").read_text())
            for key in COMPARED:
                assert online[key] == mmap[key], (block, layer, key)
            assert [h["Recall@K"] for h in online["history"]] == [h["Recall@K"] for h in mmap["history"]]
            assert online["data"]["collection"] == "online" and mmap["data"]["collection"] == "mmap"
            assert online["input_file"] is None and mmap["input_file"].endswith(".mmap")


@pytest.mark.parametrize("flag", ["same", "lookahead", "from:0"])
def test_online_predictors_equal_the_mmap_path_bit_for_bit(collected, tmp_path, flag):
    family, converted, req, data, _ = collected
    mmap_path(family, data, tmp_path / "mmap", flag)
    written = online_path(converted, req, tmp_path / "online", flag)
    assert len(written) == 6
    assert_same_predictors(tmp_path / "mmap", tmp_path / "online")
    manifest = json.loads((tmp_path / "online" / "online_manifest.json").read_text())
    collection = json.loads((data / "manifest.json").read_text())
    assert manifest["collection"] == "online" and manifest["complete"] is True and len(manifest["groups"]) == 1
    assert manifest["rows"] == collection["rows_written"] and manifest["docs_done"] == collection["docs_done"]
    assert not list((tmp_path / "online").glob("*.mmap"))
    assert (tmp_path / "online" / "mlp_summary.csv").is_file() and (tmp_path / "online" / "att_summary.md").is_file()


def test_groups_of_one_layer_rerun_the_forward_and_still_equal_the_mmap_path(collected, tmp_path):
    """A budget that holds one layer's rows: three groups, three forward passes, the same predictors."""
    _, converted, req, data, _ = collected
    mmap_path(collected[0], data, tmp_path / "mmap", "same")
    online_path(converted, req, tmp_path / "one_group", "same")
    whole = json.loads((tmp_path / "one_group" / "online_manifest.json").read_text())["groups"][0]["bytes"]
    budget = 1.5 * whole / 3 / 2**30  # input "same": every layer has its own rows, so a layer is a third
    online_path(converted, req, tmp_path / "groups", "same", "--memory-budget-gb", str(budget))
    groups = json.loads((tmp_path / "groups" / "online_manifest.json").read_text())["groups"]
    assert [g["layers"] for g in groups] == [[0], [1], [2]]
    assert_same_predictors(tmp_path / "mmap", tmp_path / "groups")


def test_a_rerun_with_the_same_settings_trains_nothing_and_other_settings_retrain(collected, tmp_path):
    _, converted, req, _, _ = collected
    out = tmp_path / "online"
    assert len(online_path(converted, req, out, "lookahead", "--L", "1")) == 2
    assert online_path(converted, req, out, "lookahead", "--L", "1") == []
    retrained = online_path(converted, req, out, "lookahead", "--L", "1", "--blocks", "att", "--att-k", "0.5")
    assert [p.name for p in retrained] == ["att_layer1.json"]
    assert json.loads(retrained[0].read_text())["k"] == 0.5


def test_a_memory_budget_below_one_layer_is_an_error_naming_both(collected, tmp_path):
    _, converted, req, _, _ = collected
    with pytest.raises(MemoryError, match=r"--memory-budget-gb 9\.31e-07 GiB \(1,000 bytes\) is too small for one "
                                          r"layer: layer 0's mlp\+att predictors need [0-9.e-]+ GiB \([0-9,]+ bytes\) "
                                          r"for \d+ rows"):
        online_path(converted, req, tmp_path / "small", "same", "--memory-budget-gb", str(1000 / 2**30))


def test_online_float16_overflow_is_an_error_as_in_collection(collected, tmp_path):
    family, converted, req, _, _ = collected
    if family == "llama":
        pytest.skip("the overflow check is shared; OPT's ReLU path is the one whose weights scale simply")
    big = tmp_path / "big"
    shutil.copytree(converted, big)
    state = torch.load(big / "pytorch_0.pt", weights_only=True)
    state["fc1.weight"].mul_(1e6)
    torch.save(state, big / "pytorch_0.pt")
    with pytest.raises(OverflowError, match="mlp_label of layer 0: row 0 is not finite in float16"):
        online_path(big, req, tmp_path / "out", "same", "--L", "0", "--blocks", "mlp")


def test_labels_as_bits_round_trip_at_any_width():
    g = torch.Generator().manual_seed(0)
    for width in (1, 7, 8, 24, 80, 8192):
        mask = torch.rand(3, 5, width, generator=g) > 0.6
        packed = pack_bits(mask)
        assert packed.dtype == torch.uint8 and packed.shape == (3, 5, -(-width // 8))
        assert torch.equal(unpack_bits(packed, width), mask)
    assert pack_bits(torch.tensor([[True, False, False, True, False, False, False, False, True]])).tolist() == [[9, 1]]
