"""Baselines and controls (issue 19): static top-K, captured mass, gate-computed ranking, cross-token and centred
drift, capacity and data curves, fold spread."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from Decentralized_FM_alpha.utils.activation_store import ActivationStore, ModelDims
from scripts.analysis import drift, recall_summary
from sparse_predictor import static_topk
from sparse_predictor.trainer.metrics import ranking_statistics, true_top_k
from sparse_predictor.trainer.rows import document_split
from Decentralized_FM_alpha.utils.selection import static_ranking, static_scores
from sparse_predictor.trainer.static import read_static
from tests.analysis_fixtures import drifting_model, write_collection

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
DOC_LENGTHS = [12, 9, 15, 10, 8, 14, 11, 13, 10, 12]


def unit3_collection(path, family: str = "llama"):
    """MLP and attention labels whose unit 3 is the largest in every row; the rest random."""
    dims = ModelDims(hidden_size=8, ffn_dim=16, num_heads=6, num_kv_heads=2, num_layers=2)
    rng = np.random.default_rng(3)
    rows = sum(DOC_LENGTHS)
    values = {}
    for layer in range(dims.num_layers):
        x = rng.standard_normal((rows, dims.hidden_size)).astype(np.float32)
        values[("att_x", layer)] = values[("mlp_x", layer)] = x
        for kind, width in (("mlp_label", dims.ffn_dim), ("att_label", dims.num_heads)):
            v = rng.uniform(0.0, 1.0, (rows, width)).astype(np.float32)
            v[:, 3] = 5.0
            values[(kind, layer)] = v if kind == "att_label" else v * rng.choice([-1, 1], v.shape).astype(np.float32)
        if family == "llama":
            values[("mlp_gate", layer)] = rng.standard_normal((rows, dims.ffn_dim)).astype(np.float32)
    name, model_type = (("meta-llama/unit3", "llama-save") if family == "llama" else ("facebook/unit3", "opt-save"))
    return write_collection(path, dims, DOC_LENGTHS, values, name, model_type)


@pytest.fixture(scope="module")
def unit3(tmp_path_factory):
    return unit3_collection(tmp_path_factory.mktemp("unit3") / "llama_c4")


@pytest.mark.parametrize("block", ["mlp", "att"])
def test_static_topk_file_ranks_the_always_largest_unit_first_from_training_rows_only(unit3, tmp_path, block):
    k = "0.0625" if block == "mlp" else "0.15"  # K = 1 of 16 neurons, of 6 heads
    paths = static_topk.main(["--data-dir", str(unit3), "--out-dir", str(tmp_path), "--block", block, "--k", k,
                              "--test-docs", "3", "--device", "cpu"])
    assert [p.name for p in paths] == [f"static_{block}_layer0.json", f"static_{block}_layer1.json"]
    record = read_static(tmp_path, block, 1, width=16 if block == "mlp" else 6)
    store = ActivationStore(unit3)
    is_test = document_split(store.document_ids(), test_docs=3)
    assert record["K"] == 1 and record["rows_train"] == int((~is_test).sum()) and record["documents_train"] == 7
    assert record["counts"][3] == record["rows_train"] and sum(record["counts"]) == record["rows_train"]
    assert record["input"] == "static (no input)" and record["data"]["model_name"] == "meta-llama/unit3"
    assert record["provenance"]["kind"] == "static_topk" and len(record["test_documents"]) == 3
    assert static_ranking(torch.tensor(record["counts"]))[0] == 3


def test_static_ranking_breaks_ties_by_lower_unit_index_and_its_scores_pick_the_same_set():
    counts = torch.tensor([5, 9, 5, 9, 0, 5])
    assert static_ranking(counts).tolist() == [1, 3, 0, 2, 5, 4]
    scores = static_scores(counts)
    for K in range(1, 7):
        assert sorted(scores.topk(K).indices.tolist()) == sorted(static_ranking(counts)[:K].tolist())


def test_a_static_file_for_another_layer_or_width_is_an_error_naming_it(unit3, tmp_path):
    static_topk.main(["--data-dir", str(unit3), "--out-dir", str(tmp_path), "--block", "att", "--k", "0.5",
                      "--L", "0", "--test-docs", "3", "--device", "cpu"])
    with pytest.raises(ValueError, match="static_att_layer0.json: 6 counts, the model's layer has 8"):
        read_static(tmp_path, "att", 0, width=8)
    with pytest.raises(FileNotFoundError, match="static_att_layer1.json"):
        read_static(tmp_path, "att", 1)
    record = json.loads((tmp_path / "static_att_layer0.json").read_text())
    (tmp_path / "static_att_layer1.json").write_text(json.dumps(record))  # layer 0's counts under layer 1's name
    with pytest.raises(ValueError, match="layer = 0"):
        read_static(tmp_path, "att", 1)


def test_captured_mass_is_one_for_the_oracle_and_the_picked_share_otherwise():
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 1.0, 1.0, 5.0]])
    oracle = ranking_statistics(scores, scores, 2)
    assert torch.equal(oracle["topk_hits"], torch.tensor([2, 2]))
    assert torch.allclose(oracle["mass_predicted"], oracle["mass_true"])
    assert torch.allclose(oracle["mass_true"], torch.tensor([7.0, 6.0]))  # a tie at the K-th counts its score once
    worst = ranking_statistics(-scores, scores, 2)
    assert torch.allclose(worst["mass_predicted"], torch.tensor([3.0, 2.0]))
    assert worst["topk_hits"].tolist() == [0, 1]  # row 2: a unit tied with the true K-th still has room
    kth, room = true_top_k(scores, 2)
    assert torch.equal(ranking_statistics(-scores, scores, 2, (kth, room))["topk_hits"], worst["topk_hits"])


def baseline(collection, fractions, test_docs=3):
    store = ActivationStore(collection)
    family = "opt" if store.manifest["model_type"].startswith("opt") else "llama"
    is_test = document_split(store.document_ids(), test_docs=test_docs)
    records = recall_summary.baseline_records(store, "m", family, 1, fractions, is_test, torch.device("cpu"), 0)
    return {(r["block"], r["ranking"], r["k"]): r for r in records}


def test_static_recall_at_k_is_one_at_k_1_when_unit_3_is_always_largest_and_the_oracle_mass_is_one(unit3):
    records = baseline(unit3, [0.0625, 0.15])  # K = 1 of 16 neurons; K = 1 of 6 heads (K = 2 of 16 neurons)
    for block, k in (("mlp", 0.0625), ("att", 0.15)):
        static = records[(block, "static", k)]
        assert static["K"] == 1 and static["Recall@K"] == 1.0 and static["train Recall@K"] == 1.0
        assert static["rows_train"] > 0 and sum(static["per_document"]["topk_hits"]) == static["rows_test"]
        oracle = records[(block, "oracle", k)]
        assert oracle["Recall@K"] == 1.0 and oracle["Captured Mass"] == pytest.approx(1.0)
        assert oracle["per_document"]["mass_predicted"] == pytest.approx(oracle["per_document"]["mass_true"])
    random = records[("mlp", "random", 0.15)]
    assert random["K"] == 2 and 0 < random["Recall@K"] < 1 and 0 < random["Captured Mass"] < 1
    assert records[("att", "static", 0.15)]["chance Recall@K"] == pytest.approx(1 / 6)


def test_gate_ranking_is_top_k_of_abs_silu_g_and_opt_says_n_a(tmp_path):
    """mlp_label = SiLU(g) * 1: the gate-computed top-K is the true top-K; OPT has no gate."""
    dims = ModelDims(hidden_size=8, ffn_dim=16, num_heads=4, num_kv_heads=2, num_layers=2)
    rng = np.random.default_rng(5)
    rows, values = sum(DOC_LENGTHS), {}
    for layer in range(2):
        g = rng.standard_normal((rows, 16)).astype(np.float32) * 3
        values[("mlp_gate", layer)], values[("mlp_label", layer)] = g, g / (1 + np.exp(-g))
        values[("att_label", layer)] = rng.uniform(0, 1, (rows, 4)).astype(np.float32)
        values[("att_x", layer)] = values[("mlp_x", layer)] = rng.standard_normal((rows, 8)).astype(np.float32)
    llama = write_collection(tmp_path / "llama", dims, DOC_LENGTHS, values, "meta-llama/g", "llama-save")
    records = baseline(llama, [0.25, 0.5])
    for k in (0.25, 0.5):
        gate = records[("mlp", "|SiLU(g)|", k)]
        assert gate["Recall@K"] == 1.0 and gate["Captured Mass"] == pytest.approx(1.0)
        assert records[("mlp", "|g|", k)]["Recall@K"] < 1.0  # large negative g: large |g|, small |SiLU(g)|
    assert ("att", "|SiLU(g)|", 0.25) not in records  # the gate ranks MLP neurons only
    opt = baseline(unit3_collection(tmp_path / "opt", family="opt"), [0.25])
    gate = opt[("mlp", "|SiLU(g)|", 0.25)]
    assert gate["Recall@K"] is None and gate["Captured Mass"] is None and "no gate" in gate["n/a"]
    assert ("mlp", "|g|", 0.25) not in opt and opt[("mlp", "static", 0.25)]["Recall@K"] > 0


# ------------------------------------------------------------------------------------- drift baselines
def stream_collection(path, shift: float) -> dict:
    """x_{l+1} = x_l + small noise, x_0 i.i.d. isotropic plus `shift` times a direction every token shares; through
    drift.py with cross-token pairs and centring. Three layers: the pooled k=1 interval leaves out layer 0's pair,
    so it pools the pair (1, 2), whose record is returned."""
    dims, lengths = ModelDims(hidden_size=64, ffn_dim=8, num_heads=2, num_kv_heads=1, num_layers=3), [10] * 40
    rng = np.random.default_rng(11)
    direction = rng.standard_normal(64)
    x0 = rng.standard_normal((400, 64)) + shift * direction / np.linalg.norm(direction) * 8  # |noise| ~ 8
    x1 = x0 + 0.3 * rng.standard_normal(x0.shape)
    x2 = x1 + 0.3 * rng.standard_normal(x0.shape)
    values = {("att_x", layer): x.astype(np.float32) for layer, x in enumerate((x0, x1, x2))}
    data = write_collection(path / "data", dims, lengths, values, "meta-llama/stream", "llama-save")
    drift.main(["--data-dir", str(data), "--out-dir", str(path / "out"), "--kinds", "att_x", "--max-distance", "1"])
    result = json.loads((path / "out" / "drift.json").read_text())
    assert all(x["pooled_layers"] == [1] for x in result["k1_intervals"])
    return ({r["space"]: r for r in result["records"] if (r["layer"], r["k"]) == (1, 1)}
            | {("k1", x["space"]): x for x in result["k1_intervals"]})


def test_cross_token_cosine_is_zero_for_isotropic_rows_and_high_for_a_shared_direction_until_centred(tmp_path):
    isotropic = stream_collection(tmp_path / "iso", shift=0.0)
    assert abs(isotropic["raw"]["cross_token_mean"]) < 0.03 and isotropic["raw"]["mean"] > 0.9
    shared = stream_collection(tmp_path / "shared", shift=1.0)  # |shared direction| = |noise|: cosine about 0.5
    assert 0.35 < shared["raw"]["cross_token_mean"] < 0.65
    assert abs(shared["raw centred"]["cross_token_mean"]) < 0.03  # the mean direction removed
    assert shared["raw centred"]["mean"] > 0.9  # the token's own signal stays
    assert shared["raw"]["same_minus_cross"] == pytest.approx(shared["raw"]["mean"] - shared["raw"]["cross_token_mean"])
    k1 = shared[("k1", "raw")]
    assert k1["cross_token"]["low"] <= shared["raw"]["cross_token_mean"] <= k1["cross_token"]["high"]
    assert k1["same_minus_cross"]["value"] == pytest.approx(shared["raw"]["same_minus_cross"], abs=1e-6)


def test_cross_token_partners_come_from_other_documents():
    documents = np.repeat(np.arange(5), [30, 1, 1, 1, 1])  # one large document: many redraws
    partners = drift.cross_token_partners(documents, seed=0)
    assert (documents[partners] != documents).all()
    with pytest.raises(ValueError, match="at least 2 documents"):
        drift.cross_token_partners(np.zeros(4, dtype=int), seed=0)


# ------------------------------------------------------------------------------------- capacity, data, folds
@pytest.fixture(scope="module")
def curves(tmp_path_factory):
    """recall_summary on one layer with a width curve (4, full), a data curve (1/2, all) and 2 folds."""
    root = tmp_path_factory.mktemp("curves")
    data = drifting_model(root / "data", "llama", seed=2, drift=0.3, with_gate=False,
                          doc_lengths=tuple([12, 9, 15, 10, 8, 14, 11, 13, 10, 12, 9, 16] * 2))
    recall_summary.main(["--data-dir", str(data), "--out-dir", str(root / "out"), "--layers", "1", "--D", "8",
                         "--epochs", "1", "--batch_size", "32", "--device", "cpu", "--fractions", "0.25,0.5",
                         "--distance-fraction", "0.25", "--test-docs", "6", "--capacity-layers", "1",
                         "--capacity-widths", "4,full", "--capacity-rows", "0.5,1", "--folds", "2",
                         "--fold-layers", "1"])
    return json.loads((root / "out" / "recall_summary.json").read_text())


def test_capacity_curve_has_one_record_per_width_and_rows_fraction_for_both_predictor_kinds(curves):
    records = curves["capacity"]
    keys = sorted((r["block"], r["curve"], r["D"] if r["curve"] == "D" else r["rows_fraction"], r["predictor"])
                  for r in records)
    expected = sorted((block, curve, value, kind) for block, full in (("mlp", 16), ("att", 4))
                      for curve, values in (("D", (4, full)), ("rows", (0.5, 1.0)))
                      for value in dict.fromkeys(values) for kind in ("linear", "nonlinear (relu)"))
    assert keys == expected  # attention: full rank min(16, 4 heads) = 4 = the other width, kept once
    by = {(r["block"], r["curve"], r["D"], r["rows_fraction"], r["predictor"]): r for r in records}
    half, full = by[("mlp", "rows", 8, 0.5, "linear")], by[("mlp", "rows", 8, 1.0, "linear")]
    assert 0.3 < half["rows_train"] / full["rows_train"] < 0.75 and half["documents_train"] < full["documents_train"]
    assert by[("mlp", "D", 16, 1.0, "linear")]["D_is_full_rank"] and not by[("mlp", "D", 4, 1.0, "linear")]["D_is_full_rank"]
    assert all(r["input"] == "lookahead" and r["k"] == 0.25 and 0 <= r["Recall@K"] <= 1 and r["Captured Mass"] > 0
               for r in records)
    assert all(r["per_document"]["documents"] == records[0]["per_document"]["documents"] for r in records)


def test_fold_spread_is_computed_per_fold_on_the_same_held_out_documents(curves):
    folds = curves["folds"]
    assert sorted({(r["block"], r["k"], r["fold"]) for r in folds}) == [
        (b, k, f) for b in ("att", "mlp") for k in (0.25, 0.5) for f in (0, 1)]
    rows = {r["fold"]: r["rows_train"] for r in folds if r["block"] == "mlp" and r["k"] == 0.25}
    [full] = [r for r in curves["capacity"] if (r["block"], r["curve"], r["rows_fraction"], r["predictor"]) ==
              ("mlp", "rows", 1.0, "linear")]
    assert rows[0] + rows[1] == full["rows_train"] and rows[0] > 0 and rows[1] > 0  # 2 folds: each trains on the other
    assert all(r["per_document"]["documents"] == full["per_document"]["documents"] for r in folds)
    [spread] = [s for s in curves["fold_spread"] if (s["block"], s["k"]) == ("mlp", 0.25)]
    for fold, value in enumerate(spread["Recall@K per fold"]):
        [r] = [r for r in folds if (r["block"], r["k"], r["fold"]) == ("mlp", 0.25, fold)]
        assert value == pytest.approx(r["Recall@K"])  # one layer: the pooled value is the fold's own
    assert spread["Recall@K"]["min"] == min(spread["Recall@K per fold"]) and spread["layers"] == [1]
    assert "full data bootstrap" in spread and spread["full data bootstrap"]["documents"] == 6


# ------------------------------------------------------------------------------------- WikiText-2 by article
def test_wikitext_windows_get_the_article_of_their_middle_and_perplexity_intervals_resample_articles(tmp_path):
    from Decentralized_FM_alpha.task_datasets.request_files import TextWindow, window_articles
    from Decentralized_FM_alpha.task_datasets.results import perplexity_of_results
    from scripts.report.summary import perplexity_ratio_cell

    text = "\n\n = One = \n\n aaaa \n\n = = Part = = \n\n bbbb \n\n = Two = \n\n cccc \n"
    two = text.index(" = Two")
    windows = [TextWindow(0, 10, ()), TextWindow(10, two + 2, ()), TextWindow(two + 2, len(text), ())]
    assert window_articles(text, windows) == [0, 0, 1]  # the section line starts no article; the middle decides
    rng = np.random.default_rng(0)
    articles = np.repeat(np.arange(6), 4)  # 24 windows of 6 articles
    manifests = []
    for name, shift in (("dense", 0.0), ("run", -0.2)):
        path = tmp_path / f"{name}.jsonl"
        with open(path, "w") as f:
            for article in articles:
                logprobs = [None, *(rng.normal(-3 + shift, 0.5, 9)).tolist()]
                f.write(json.dumps({"request": {"prompt": "x", "article": int(article)},
                                    "result": {"choices": [{"logprobs": {"token_logprobs": logprobs}}]}}) + "\n")
        manifests.append({"perplexity": perplexity_of_results(path), "output_path": str(path)})
    assert manifests[0]["perplexity"]["per_request"]["articles"] == articles.tolist()
    cell = perplexity_ratio_cell(manifests[1], manifests[0], ["S1"])
    assert cell.interval.documents == 6 and "articles" in cell.interval.method
    assert cell.interval.low < cell.interval.value < cell.interval.high


# ------------------------------------------------------------------------------------- the report
def test_report_section_shows_every_ranking_the_curves_and_folds_in_narrow_tables(curves, tmp_path):
    from scripts.report.baselines import baselines_section

    lines, figures = baselines_section([("S1", curves)], [], tmp_path)
    text = "\n".join(lines)
    assert "static" in text and "gate abs(SiLU(g))" in text and "n/a (not collected)" in text
    assert "D=4" in text and "full rank D=16" in text and "| full rank |" in text and "0.5 of the rows" in text and "over folds" in text
    widths = [line.count("|") - 1 for line in lines if line.startswith("| ")]
    assert widths and max(widths) <= 10
    assert [f.name for f in figures] == ["capacity.png"] and figures[0].is_file()
    rows = list(csv.DictReader(open(tmp_path / "baselines.csv")))
    static = [r for r in rows if r["column"] == "static Recall@K" and r["block"] == "mlp" and r["k"] == "0.25"]
    [record] = [r for r in curves["records"] if (r["block"], r["k"], r.get("ranking")) == ("mlp", 0.25, "static")]
    assert float(static[0]["value"]) == pytest.approx(record["Recall@K"])  # one layer: pooled = the layer's own
