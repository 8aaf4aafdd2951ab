"""The report's summary: bootstrap intervals, identical definitions for every model, every number traced."""
from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest

from Decentralized_FM_alpha.utils.activation_store import ModelDims
from Decentralized_FM_alpha.utils.intervals import bootstrap, ratio
from scripts.analysis import drift, recall_summary
from scripts.report import report
from tests.analysis_fixtures import write_collection

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
TRAIN = ["--D", "8", "--epochs", "1", "--batch_size", "32", "--device", "cpu", "--seeds", "2", "--fractions",
         "0.25,0.5", "--distance-fraction", "0.25"]


# ------------------------------------------------------------------------------------- intervals
def simulated_documents(rng: np.random.Generator, documents: int, p: float) -> dict:
    """Per document: tokens, and hits drawn with probability p per token (the truth is p)."""
    tokens = rng.integers(20, 80, size=documents)
    return {"hits": rng.binomial(tokens, p), "tokens": tokens}


def test_bootstrap_interval_covers_the_truth_and_shrinks_with_more_documents():
    rng = np.random.default_rng(0)
    covered = 0
    for replication in range(100):
        interval = bootstrap(simulated_documents(rng, 60, 0.3), ratio("hits", "tokens"), seed=replication,
                             resamples=1000)
        covered += interval.low <= 0.3 <= interval.high
    assert covered >= 88  # a 95% interval misses the truth about 5 times in 100
    widths = [np.mean([(lambda i: i.high - i.low)(bootstrap(simulated_documents(rng, n, 0.3), ratio("hits", "tokens"),
                                                             resamples=1000)) for _ in range(10)])
              for n in (20, 80, 320)]
    assert widths[0] > widths[1] > widths[2] > 0


def test_a_constant_metric_has_a_zero_width_interval():
    tokens = np.array([10, 40, 25, 5])
    interval = bootstrap({"hits": 0.4 * tokens, "tokens": tokens}, ratio("hits", "tokens"))
    assert interval.value == pytest.approx(0.4) and interval.low == pytest.approx(0.4)
    assert interval.high == pytest.approx(0.4) and interval.documents == 4


# ------------------------------------------------------------------------------------- identical definitions
def twin_values(seed: int, layers: int = 3, doc_lengths=(14, 9, 15, 10, 8, 14, 11, 13)) -> dict:
    """One set of activations (ReLU-shaped MLP labels), to be stored under an OPT and a Llama model name."""
    rng = np.random.default_rng(seed)
    rows = sum(doc_lengths)
    x = rng.standard_normal((rows, 16)).astype(np.float32)
    values = {}
    for layer in range(layers):
        mlp_x = x + 0.3 * rng.standard_normal(x.shape).astype(np.float32)
        values[("att_x", layer)], values[("mlp_x", layer)] = x, mlp_x
        values[("att_label", layer)] = np.abs(x @ rng.standard_normal((16, 4))).astype(np.float32)
        values[("mlp_label", layer)] = np.maximum(mlp_x @ rng.standard_normal((16, 32)).astype(np.float32) / 4, 0)
        x = mlp_x + 0.3 * rng.standard_normal(x.shape).astype(np.float32)
    return values


@pytest.fixture(scope="module")
def twin_results(tmp_path_factory):
    """OPT and Llama collections holding identical activations, each through recall_summary and drift."""
    root = tmp_path_factory.mktemp("twins")
    values, dims = twin_values(7), ModelDims(16, 32, 4, 4, 3)
    lengths = [14, 9, 15, 10, 8, 14, 11, 13]
    out = {}
    for family, name in (("opt", "facebook/opt-twin"), ("llama", "meta-llama/llama-twin")):
        data = write_collection(root / f"{family}_c4", dims, lengths, values, name, f"{family}-save")
        result = root / "results" / family
        recall_summary.main(["--data-dir", str(data), "--out-dir", str(result), "--test-docs", "3", *TRAIN])
        drift.main(["--data-dir", str(data), "--out-dir", str(result), "--max-distance", "1"])
        out[family] = (data, result)
    return root, out


def test_identical_labels_give_identical_summary_numbers_for_opt_and_llama(twin_results, tmp_path):
    root, results = twin_results
    opt, llama = (json.loads((results[f][1] / "recall_summary.json").read_text())["records"] for f in ("opt", "llama"))
    def numbers(records: list[dict]) -> list[tuple]:  # predictors and baselines, but the gate (n/a for both)
        return [(r["block"], r["layer"], r["input"], r.get("ranking"), r["k"], r.get("seed"), r["K"], r["Recall@K"],
                 r["Captured Mass"]) for r in records if r["label"] == "topk" and r.get("ranking") != "|SiLU(g)|"]
    assert numbers(opt) == numbers(llama)
    assert {r.get("ranking") for r in opt} == {None, "static", "random", "oracle", "|SiLU(g)|"}
    gate = [r for r in opt + llama if r.get("ranking") == "|SiLU(g)|"]
    assert gate and all(r["Recall@K"] is None and r["n/a"].startswith("n/a") for r in gate)
    assert {r["label"] for r in opt} == {"topk", "relu"} and {r["label"] for r in llama} == {"topk"}  # no gate
    report.build_report([results["opt"][0], results["llama"][0], root / "results"], tmp_path / "report")
    rows = {row["model"]: row for row in csv.DictReader(open(tmp_path / "report" / "summary.csv"))}
    keys = [k for k in rows["opt-twin"] if k.startswith(("mlp Recall@K", "att Recall@K", "mlp penalty", "att penalty"))
            and not k.endswith("sources")]
    assert keys and all(rows["opt-twin"][k] == rows["llama-twin"][k] for k in keys)
    assert rows["opt-twin"]["mlp Recall@K 0.25 same chance"] == str(8 / 32)  # K = 8 of 32 neurons for both


def test_every_summary_number_traces_to_a_source_with_command_commit_and_manifest(twin_results, tmp_path):
    root, results = twin_results
    text = report.build_report([results["opt"][0], results["llama"][0], root / "results"],
                               tmp_path / "report").read_text()
    sources = {}
    for line in text.split("## Sources")[1].splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if re.fullmatch(r"S\d+", cells[0]):
            sources[cells[0]] = cells
    summary = text.split("## Summary")[1].split("## Decomposition")[0]
    table_rows = [line for line in summary.splitlines() if line.startswith("| opt-twin") or
                  line.startswith("| llama-twin")]
    assert len(table_rows) == 9  # MLP, attention, penalty, drift for both; the architecture label for OPT only
    for line in table_rows:
        ids = re.findall(r"S\d+", line.strip("|").split("|")[-1])
        assert ids, line
        for source in ids:
            _, path, command, commit, manifest = sources[source]
            assert command.strip("`") and "missing" not in (command, commit, manifest), sources[source]
            assert (root / "results").as_posix() in path and manifest.endswith("manifest.json")
    for row in csv.DictReader(open(tmp_path / "report" / "summary.csv")):
        for key, value in row.items():
            if value and key.endswith((" low", " high")):
                prefix = key.rsplit(" ", 1)[0]
                assert re.fullmatch(r"S\d+( S\d+)*", row[f"{prefix} sources"]), key


def test_per_layer_table_shows_each_layers_seed_mean_drift_and_gate_share():
    from scripts.report.summary import per_layer_tables

    def record(block, layer, name, seed, value):
        return {"block": block, "layer": layer, "input": name, "label": "topk", "k": 0.25, "seed": seed,
                "Recall@K": value, "chance Recall@K": 0.25 if block == "mlp" else 0.5}
    records = [record("mlp", 0, "same", 0, 0.6), record("mlp", 0, "same", 1, 0.8),
               record("mlp", 0, "lookahead", 0, 0.5), record("att", 0, "same", 0, 0.9),
               record("mlp", 1, "same", 0, 0.4), record("mlp", 1, "lookahead", 0, 0.3),
               record("att", 1, "same", 0, 0.7), record("att", 1, "lookahead", 0, 0.65)]
    recall = [("S1", {"source": {"model": "m", "dims": {"num_layers": 2}}, "records": records})]
    drift_payload = {"source": {"model": "m"}, "records": [
        {"kind": "att_x", "k": 1, "dims": "all", "space": space, "layer": 0, "mean": value}
        for space, value in (("raw", 0.91), ("normed", 0.87))]}
    sparsity_payload = {"source": {"model": "m"}, "records": [{"layer": 0, "gate_negative_fraction": 0.62},
                                                              {"layer": 1, "gate_negative_fraction": 0.55}]}
    lines = per_layer_tables(recall, [("S2", drift_payload)], [("S3", sparsity_payload)], 0.25)
    rows = [line for line in lines if line.startswith("| 0 ") or line.startswith("| 1 ")]
    assert rows[0] == "| 0 | 0.910 | 0.870 | 0.620 | 0.700 | 0.500 | 0.900 | n/a | 0.250 | 0.500 |"
    assert rows[1] == "| 1 | n/a | n/a | 0.550 | 0.400 | 0.300 | 0.700 | 0.650 | 0.250 | 0.500 |"
    assert "**m** [S1, S2, S3]" in lines
