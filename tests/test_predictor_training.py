"""Predictor training (SPEC §7): metrics, labels, input wiring, the document split, file checks, end to end."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from Decentralized_FM_alpha.utils.activation_store import ActivationStore, ActivationWriter, ModelDims
from scripts.bench import bench_predictor_training as bench
from scripts.bench.bench_predictor_training import write_synthetic_store
from sparse_predictor import main_att, main_att_llama, main_mlp, main_mlp_llama
from sparse_predictor.trainer.labels import LabelSpec, make_label_spec
from sparse_predictor.trainer.metrics import aggregate_statistics, batch_statistics
from sparse_predictor.trainer.records import summarize
from sparse_predictor.trainer.rows import chunk_slices, document_split, load_layer, window_masks

REQUIRED_KEYS = {"Recall", "True Sparsity", "Classifier Sparsity", "Precision", "Recall@K", "K", "input", "label",
                 "layer", "rows_train", "rows_test"}


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def write_store(path: Path, dims: ModelDims, doc_lengths: list[int], values: dict[tuple[str, int], np.ndarray],
                doc_ids: list[int] | None = None) -> Path:
    """A collection holding exactly `values[(kind, layer)]` (rows, width), rows in document order."""
    kinds = tuple(sorted({kind for kind, _ in values}))
    rows = sum(doc_lengths)
    writer = ActivationWriter(path, dims, range(dims.num_layers), kinds, capacity=rows, rank=0, world_size=1,
                              manifest_fields={"model_name": "test", "model_type": "synthetic",
                                               "source_data": {"path": "test", "sha256": None}})
    lengths = torch.tensor(doc_lengths)
    valid = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]  # (docs, T)
    writer.begin_batch(doc_ids or list(range(len(doc_lengths))), torch.zeros(valid.shape, dtype=torch.long), valid)
    for (kind, layer), flat in values.items():
        padded = torch.zeros(*valid.shape, flat.shape[1])
        padded[valid] = torch.from_numpy(flat).float()  # rows go in (doc, position) order, as the writer reads them
        writer.save(kind, layer, padded)
    writer.end_batch()
    writer.finish("done")
    return path


def original_evaluate(batches: list[tuple[torch.Tensor, torch.Tensor]], weight_floor: float) -> dict[str, float]:
    """DejaVu trainer_mlp.py evaluate(), transcribed: (logits, y) per eval batch."""
    ev = {"Loss": [], "Loss Weight": [], "Recall": [], "Classifier Sparsity": [], "True Sparsity": []}
    for logits, y in batches:
        probs = logits.sigmoid()
        preds = probs >= 0.5
        miss = (y.int() - preds.int()) > 0.0
        weight = (y.sum() / y.numel()) + weight_floor
        ev["Loss Weight"] += [weight.item()]
        ev["Loss"] += [F.binary_cross_entropy(probs, y, weight=y * (1 - weight) + weight).item()]
        ev["Recall"] += [(y.sum(dim=1).float() - miss.sum(dim=1).float()).mean().item()]
        ev["True Sparsity"] += [y.sum(dim=1).float().mean().item()]
        ev["Classifier Sparsity"] += [preds.sum(dim=1).float().mean().item()]
    ev = {k: float(np.array(v).mean()) for k, v in ev.items()}
    ev["Recall"] = ev["Recall"] / ev["True Sparsity"]
    return ev


# ------------------------------------------------------------------------------------- metrics
def test_metrics_on_hand_built_tokens_have_the_known_values():
    labels = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    logits = torch.tensor([[3.0, -1, -2, -3], [1, 2, 0.5, -1], [4, 3, -1e-9, -2]])  # -1e-9: sigmoid rounds to 0.5
    scores = torch.tensor([[5.0, 4, 1, 0], [3, 0, 2, 1], [1, 1, 1, 1]])  # token 2: all tied
    stats = [batch_statistics(logits[s], labels[s], scores[s], 2, 0.005) for s in (slice(0, 2), slice(2, 3))]
    m = aggregate_statistics(stats, K=2)
    # predicted: t0 {0}, t1 {0,1,2}, t2 {0,1,2}; true positives 1, 1, 3; active 2, 1, 4
    # original, eval batches [t0, t1] and [t2]: Recall = mean(1, 3) / mean(1.5, 4)
    assert m["Recall"] == pytest.approx(2.0 / 2.75)
    assert m["True Sparsity"] == pytest.approx(2.75)
    assert m["Classifier Sparsity"] == pytest.approx((2.0 + 3.0) / 2)
    assert m["Precision"] == pytest.approx(5 / 7)
    assert m["Per-token Recall"] == pytest.approx((1 / 2 + 1 + 3 / 4) / 3)
    # top-2 predicted vs true: t0 {0,1} vs {0,1} -> 2; t1 {1,0} vs {0,2} -> 1; t2 all tied -> 2
    assert m["Recall@K"] == pytest.approx(5 / 6)
    assert m["K"] == 2


@pytest.mark.parametrize("weight_floor", [0.005, 0.0])  # trainer_mlp.py, trainer_att.py
def test_original_recall_and_sparsities_reproduced_exactly_with_a_partial_last_batch(weight_floor):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1000, 64, generator=gen) * 2
    labels = torch.rand(1000, 64, generator=gen) < 0.2
    batch = 128  # 7 full batches and one of 104 rows, which the original weighs like a full one
    slices = [slice(s, s + batch) for s in range(0, 1000, batch)]
    ours = aggregate_statistics([batch_statistics(logits[s], labels[s], labels[s].float(), 5, weight_floor)
                                 for s in slices], K=5)
    theirs = original_evaluate([(logits[s], labels[s].float()) for s in slices], weight_floor)
    for key in theirs:
        assert ours[key] == pytest.approx(theirs[key], rel=1e-6), key
    micro = float((labels & (logits.sigmoid() >= 0.5)).sum() / labels.sum())
    assert abs(ours["Recall"] - micro) > 1e-6  # the batch weighting is really the original's, not TP/P


def test_labels_follow_their_definitions():
    y = torch.tensor([[-3.0, 1.0, 2.0, -0.5]])
    def active(spec: LabelSpec) -> list[int]:
        return torch.nonzero(spec.labels(spec.scores(y))[0]).flatten().tolist()
    assert active(make_label_spec("mlp", "relu", None, None, 4)) == [1, 2]
    assert active(make_label_spec("mlp", "topk", 0.5, None, 4)) == [0, 2]  # largest |y|
    assert active(make_label_spec("mlp", "threshold", None, 1.5, 4)) == [0, 2]
    assert active(make_label_spec("mlp", "gate", None, None, 4)) == [1, 2]
    assert make_label_spec("mlp", "gate", None, None, 4).source_kind == "mlp_gate"
    att = make_label_spec("att", "topk", 0.75, None, 4)
    assert att.source_kind == "att_label" and active(att) == [0, 1, 2]


@pytest.mark.parametrize("name,k,threshold,message", [
    ("topk", None, None, "needs --k"), ("relu", 0.5, None, "only used by --label topk"),
    ("threshold", None, None, "needs --threshold"), ("topk", 0.5, 1.0, "only used by --label threshold"),
    ("topk", 1.5, None, "need a fraction"),
])
def test_label_flags_that_do_not_fit_are_errors(name, k, threshold, message):
    with pytest.raises(ValueError, match=message):
        make_label_spec("mlp", name, k, threshold, 8)


# ------------------------------------------------------------------------------------- split and windows
def test_document_split_holds_out_whole_last_documents_near_five_percent():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 60, size=200)
    ids = rng.permutation(10_000)[:200]  # ids in no particular order
    doc_ids = np.repeat(ids, lengths)
    is_test = document_split(doc_ids, min_test_docs=0)
    assert not set(doc_ids[is_test]) & set(doc_ids[~is_test])
    assert 0.04 < is_test.mean() < 0.06
    assert is_test[-1] and not is_test[0]  # the tail, as the original's X[-idx]


def test_windows_cover_every_training_row_once_per_epoch():
    is_test = np.zeros(10_000, dtype=bool)
    is_test[9_400:] = True
    slices = chunk_slices(10_000, (16_384,))  # 2048 rows per chunk
    windows = list(window_masks(~is_test, slices, 4_500, np.random.default_rng(0)))
    counts = np.sum(windows, axis=0)
    assert (counts[~is_test] == 1).all() and (counts[is_test] == 0).all()
    assert all(w.sum() <= 4_500 for w in windows) and len(windows) >= 3


# ------------------------------------------------------------------------------------- reading the right rows
@pytest.fixture(scope="module")
def marked_store(tmp_path_factory) -> Path:
    """3 layers; every value of a file says which file it is (100 l + kind), column 0 says which row."""
    dims = ModelDims(hidden_size=8, ffn_dim=16, num_heads=4, num_kv_heads=2, num_layers=3)
    lengths = [30, 25, 40, 35, 20, 50, 30, 45, 25, 40, 35, 30, 28, 22, 40]
    rows = sum(lengths)
    rng = np.random.default_rng(0)
    values = {}
    for layer in range(dims.num_layers):
        for kind, mark in (("att_x", 1), ("mlp_x", 2)):
            x = np.full((rows, dims.hidden_size), 100 * layer + mark, dtype=np.float32)
            x[:, 0] = np.arange(rows)
            values[(kind, layer)] = x
        values[("att_label", layer)] = rng.random((rows, dims.num_heads)).astype(np.float32)
        values[("mlp_label", layer)] = rng.standard_normal((rows, dims.ffn_dim)).astype(np.float32)
    doc_ids = list(rng.permutation(1000)[: len(lengths)])
    return write_store(tmp_path_factory.mktemp("marked"), dims, lengths, values, doc_ids=[int(d) for d in doc_ids])


@pytest.mark.parametrize("block,flag,layer,expected", [
    ("att", "lookahead", 2, ("att_x", 1)), ("att", "lookahead", 0, ("att_x", 0)), ("att", "same", 2, ("att_x", 2)),
    ("mlp", "lookahead", 2, ("att_x", 2)), ("mlp", "same", 2, ("mlp_x", 2)), ("att", "from:0", 2, ("att_x", 0)),
    ("mlp", "from:1", 2, ("att_x", 1)),
])
def test_predictor_input_comes_from_the_wired_file(marked_store, block, flag, layer, expected):
    store = ActivationStore(marked_store)
    label = make_label_spec(block, "topk", 0.5, None, 4 if block == "att" else 16)
    data = load_layer(store, block, layer, flag, label, torch.device("cpu"), batch_size=64)
    kind, source = expected
    mark = 100 * source + (1 if kind == "att_x" else 2)
    assert data.x_file.path.name == f"{kind}_{source}.mmap"
    assert (data.train.x[:, 1:] == mark).all() and (data.test.x[:, 1:] == mark).all()
    assert data.label_files[label.source_kind].path.name == f"{label.source_kind}_{layer}.mmap"


def test_input_from_a_later_layer_is_an_error(marked_store):
    store = ActivationStore(marked_store)
    with pytest.raises(ValueError, match="comes after the predicted layer"):
        load_layer(store, "att", 1, "from:2", make_label_spec("att", "topk", 0.5, None, 4), torch.device("cpu"), 64)


def test_no_row_of_a_test_document_is_trained_on(marked_store):
    store = ActivationStore(marked_store)
    data = load_layer(store, "mlp", 1, "same", make_label_spec("mlp", "relu", None, None, 16), torch.device("cpu"), 64)
    doc_ids = store.document_ids()
    train_rows = data.train.x[:, 0].long().numpy()  # column 0 holds the row number
    test_rows = data.test.x[:, 0].long().numpy()
    assert sorted(train_rows) == list(np.flatnonzero(~data.is_test))
    assert sorted(test_rows) == list(np.flatnonzero(data.is_test))
    assert not set(doc_ids[train_rows]) & set(doc_ids[test_rows])
    labels = np.asarray(store.open("mlp_label", 1))
    assert torch.equal(data.test.label_rows(0), torch.from_numpy(labels[test_rows] > 0))


def test_all_layers_in_one_run_record_the_lookahead_files(marked_store, tmp_path):
    paths = main_att_llama.main(["--data-dir", str(marked_store), "--out-dir", str(tmp_path), "--L", "all",
                                 "--epochs", "1", "--D", "8", "--k", "0.5", "--device", "cpu"])
    records = [json.loads(p.read_text()) for p in paths]
    assert [(r["layer"], r["input"], r["input_file"]) for r in records] == [
        (0, "lookahead", "att_x_0.mmap"), (1, "lookahead", "att_x_0.mmap"), (2, "lookahead", "att_x_1.mmap")]
    assert all(r["label_file"] == f"att_label_{r['layer']}.mmap" and r["K"] == 2 for r in records)


# ------------------------------------------------------------------------------------- files that disagree
@pytest.mark.parametrize("edit,message", [
    (lambda m: m["config"].update(hidden_size=16), "bytes"),
    (lambda m: m["config"].update(ffn_dim=8), "bytes"),
    (lambda m: m.update(rows_written=m["rows_written"] - 1), "token_index"),
    (lambda m: m.update(rows_written=m["capacity"] + 1), "outside"),
    (lambda m: m.update(complete=False), "not complete"),
])
def test_manifest_that_disagrees_with_the_files_is_an_error(marked_store, tmp_path, edit, message):
    copy = tmp_path / "store"
    copy.mkdir()
    for f in marked_store.iterdir():
        (copy / f.name).symlink_to(f)
    manifest = json.loads((marked_store / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").unlink()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=message):
        main_mlp.main(["--data-dir", str(copy), "--out-dir", str(tmp_path / "out"), "--L", "1", "--device", "cpu"])


def test_gate_label_without_collected_gate_names_the_missing_file(marked_store, tmp_path):
    with pytest.raises(FileNotFoundError, match="mlp_gate_2.mmap"):
        main_mlp_llama.main(["--data-dir", str(marked_store), "--out-dir", str(tmp_path), "--L", "2",
                             "--label", "gate", "--device", "cpu"])


# ------------------------------------------------------------------------------------- learning
@pytest.fixture(scope="module")
def learnable_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("learnable")
    write_synthetic_store(path, ModelDims(64, 256, 16, 4, 1), 8000, ("mlp_x", "mlp_label", "att_x", "att_label"),
                          doc_len=64, rank=8, active=0.1, noise=0.05, seed=0)
    return path


def test_learnable_layer_reaches_high_recall_and_writes_the_contract_files(learnable_store, tmp_path):
    [json_path] = main_mlp.main(["--data-dir", str(learnable_store), "--out-dir", str(tmp_path), "--L", "0",
                                 "--epochs", "8", "--D", "128", "--lr", "0.001", "--batch_size", "128",
                                 "--selection", "last", "--device", "cpu", "--input", "same"])
    record = json.loads(json_path.read_text())
    assert record["Recall"] >= 0.95
    assert record["Precision"] >= 0.6 and record["Recall@K"] >= 0.85  # not reached by predicting everything
    assert REQUIRED_KEYS <= record.keys()
    assert (record["input"], record["input_file"], record["label"], record["layer"]) == ("same", "mlp_x_0.mmap",
                                                                                         "relu", 0)
    assert record["rows_train"] + record["rows_test"] == 8000
    assert (record["best_epoch"], record["epochs_run"]) == (8, 8)
    assert record["hyperparameters"]["weight_decay"] == 0.01 and record["provenance"]["git_commit"]
    state = torch.load(tmp_path / "mlp_layer0.pt", weights_only=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == {"0.weight": (128, 64), "1.weight": (256, 128)}
    csv_path, md_path, missing = summarize(tmp_path, "mlp", num_layers=2)
    assert missing == [1] and csv_path.read_text().splitlines()[1].startswith("0,")


def test_bfloat16_checkpoints_are_the_float32_weights_rounded_and_load_strictly(learnable_store, tmp_path):
    from Decentralized_FM_alpha.modules.sparsity import load_predictor

    flags = ["--data-dir", str(learnable_store), "--L", "0", "--epochs", "2", "--D", "32", "--selection", "last",
             "--device", "cpu", "--input", "same"]
    [full] = main_mlp.main([*flags, "--out-dir", str(tmp_path / "f32")])
    [half] = main_mlp.main([*flags, "--out-dir", str(tmp_path / "bf16"), "--save-dtype", "bfloat16"])
    f32 = torch.load(tmp_path / "f32/mlp_layer0.pt", weights_only=True)
    bf16 = torch.load(tmp_path / "bf16/mlp_layer0.pt", weights_only=True)
    assert all(bf16[key].dtype == torch.bfloat16 and torch.equal(bf16[key], f32[key].to(torch.bfloat16))
               for key in f32)
    records = [json.loads(path.read_text()) for path in (full, half)]
    assert [r["checkpoint_dtype"] for r in records] == ["float32", "bfloat16"]
    assert "checkpoint_rounding" not in records[0] and "float32 predictor's" in records[1]["checkpoint_rounding"]
    assert records[0]["Recall@K"] == records[1]["Recall@K"]  # the metrics are the float32 predictor's
    predictor, _, _ = load_predictor(tmp_path / "bf16/mlp_layer0.pt", 0, 64, 256, "mlp", torch.device("cpu"))
    assert predictor[0].weight.dtype == torch.float32
    assert torch.equal(predictor[0].weight, bf16["0.weight"].float())


def test_original_selection_stops_once_held_out_recall_exceeds_0_99(learnable_store, tmp_path):
    [json_path] = main_mlp.main(["--data-dir", str(learnable_store), "--out-dir", str(tmp_path), "--L", "0",
                                 "--epochs", "8", "--D", "128", "--lr", "0.001", "--batch_size", "128",
                                 "--device", "cpu", "--input", "same"])
    record = json.loads(json_path.read_text())
    recalls = [h["Recall"] for h in record["history"]]
    assert recalls[-1] > 0.99 and all(r <= 0.99 for r in recalls[:-1]) and len(recalls) < 8
    assert record["best_epoch"] == record["epochs_run"] and record["Recall"] == recalls[-1]


def test_streamed_windows_learn_like_the_resident_layer(learnable_store, tmp_path):
    [json_path] = main_att.main(["--data-dir", str(learnable_store), "--out-dir", str(tmp_path), "--L", "0",
                                 "--epochs", "4", "--D", "64", "--lr", "0.003", "--k", "0.25", "--device", "cpu",
                                 "--test-docs", "6", "--max-device-gb", str(2500 * (2 * 64 + 16) / 2**30)])
    record = json.loads(json_path.read_text())
    assert record["hyperparameters"]["resident_on_device"] is False
    assert record["Recall@K"] > 0.6  # chance is K/heads = 0.25


def test_random_labels_stay_at_chance_for_recall_at_k(tmp_path):
    store = tmp_path / "random"
    write_synthetic_store(store, ModelDims(64, 256, 32, 8, 1), 8000, ("att_x", "att_label"), doc_len=64,
                          random_labels=True, seed=1)
    [json_path] = main_att.main(["--data-dir", str(store), "--out-dir", str(tmp_path / "out"), "--L", "0",
                                 "--epochs", "3", "--D", "128", "--lr", "0.003", "--k", "0.25", "--device", "cpu"])
    record = json.loads(json_path.read_text())
    assert record["K"] == 8
    assert abs(record["Recall@K"] - 8 / 32) < 0.04
    assert abs(record["Precision"] - 8 / 32) < 0.04
    assert record["Recall"] > 0.8  # the original's Recall alone looks good here: it rewards predicting most heads


# ------------------------------------------------------------------------------------- run scripts
def test_run_script_trains_every_manifest_layer_with_one_log_each_and_summarizes(marked_store, tmp_path):
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "DATA_DIR": str(marked_store),
           "OUT_DIR": str(tmp_path / "out"), "K": "0.5", "EXTRA_ARGS": "--epochs 1 --D 8"}
    done = subprocess.run(["bash", str(repo / "sparse_predictor" / "run_c4_att_llama.sh")], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in (tmp_path / "out" / "logs").iterdir()) == [f"att_layer{l}.log" for l in range(3)]
    rows = (tmp_path / "out" / "att_summary.csv").read_text().splitlines()
    assert rows[0].split(",")[:6] == ["layer", "Recall", "True Sparsity", "Classifier Sparsity", "Precision",
                                      "Recall@K"]
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "1", "2"]
    assert "| 2 |" in (tmp_path / "out" / "att_summary.md").read_text()


def test_fast_trainer_matches_the_straightforward_reference_within_one_point(learnable_store):
    args = bench.parse_args(["--device", "cpu", "--D", "128", "--batch-size", "128", "--epochs", "2",
                             "--ref-epochs", "2", "--data-dir", str(learnable_store)])
    store = ActivationStore(learnable_store)
    label = make_label_spec("mlp", "relu", None, None, store.dims.ffn_dim)
    fast = bench.run_fast(args, store, label, torch.device("cpu"))
    reference = bench.run_reference(args, store, label, torch.device("cpu"))
    assert fast["rows_train"] == 8000 - fast["rows_test"]
    assert 0.5 < reference["recall_by_epoch"][1] < 0.99  # still learning: the comparison is not at a ceiling
    assert abs(fast["recall_by_epoch"][1] - reference["recall_by_epoch"][1]) < 0.01


# ------------------------------------------------------------------------------------- one count rule, split size
def test_sparse_runner_keeps_exactly_the_count_the_trainer_labelled_at_k_0_3(tmp_path):
    from Decentralized_FM_alpha.modules.sparsity import SparsityController, SparsityPlan, parse_budget
    from Decentralized_FM_alpha.utils.selection import fraction_count

    dims = ModelDims(32, 96, 4, 4, 1)
    assert int(0.3 * 96) != fraction_count(0.3, 96)  # 28.8: floor and nearest differ, so the test can tell them apart
    store = tmp_path / "store"
    write_synthetic_store(store, dims, 3000, ("mlp_x", "mlp_label"), doc_len=32, seed=3)
    [json_path] = main_mlp_llama.main(["--data-dir", str(store), "--out-dir", str(tmp_path / "pred"), "--L", "0",
                                       "--k", "0.3", "--epochs", "1", "--D", "16", "--device", "cpu", "--input",
                                       "same"])
    record = json.loads(json_path.read_text())
    labels = make_label_spec("mlp", "topk", 0.3, None, 96).labels(torch.randn(5, 96).abs())
    assert (labels.sum(dim=1) == record["K"]).all()  # the training labels hold K units per token
    plan = SparsityPlan("predictor", mlp_budgets={0: parse_budget("0.3")}, predictor_dir=tmp_path / "pred",
                        predictor_input="same")
    controller = SparsityController(plan, dims, range(1), torch.device("cpu"))
    x = torch.randn(2, 7, 32)
    controller.observe(0, "mlp_x", lambda: x)  # the input the JSON says the predictor was trained on
    kept = controller.keep_neurons(0, torch.randn(2, 7, 96) + 10)  # no zero activation
    assert ((kept != 0).sum(dim=-1) == record["K"]).all()


def test_default_split_holds_out_at_least_30_documents_and_records_them(tmp_path):
    doc_ids = np.repeat(np.arange(200), 20)  # 200 equal documents: 5% of the rows would be 10 documents
    assert len(np.unique(doc_ids[document_split(doc_ids)])) == 30
    few = doc_ids[:40 * 20]  # 40 documents: at most half are held out
    assert len(np.unique(few[document_split(few)])) == 20
    exact = document_split(doc_ids, test_docs=7)
    assert set(np.unique(doc_ids[exact])) == set(range(193, 200))
    with pytest.raises(ValueError, match="--test-docs 200"):
        document_split(doc_ids, test_docs=200)
    store = tmp_path / "store"
    write_synthetic_store(store, ModelDims(32, 64, 4, 4, 1), 2400, ("mlp_x", "mlp_label"), doc_len=32, seed=4)
    [json_path] = main_mlp.main(["--data-dir", str(store), "--out-dir", str(tmp_path / "out"), "--L", "0",
                                 "--epochs", "1", "--D", "16", "--device", "cpu", "--test-docs", "12", "--input", "same"])
    record = json.loads(json_path.read_text())
    docs = ActivationStore(store).document_ids()
    assert record["documents_test"] == 12 and record["test_documents"] == sorted(np.unique(docs)[-12:].tolist())
    assert record["rows_test"] == int(np.isin(docs, record["test_documents"]).sum())
