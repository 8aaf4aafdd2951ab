"""Analysis scripts (drift, lookahead, sparsity statistics, report, OPT->Llama change log) on small known data."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from Decentralized_FM_alpha.utils.activation_store import ActivationStore, ModelDims
from scripts.analysis import drift, lookahead, sparsity_stats
from scripts import opt_llama_changelog
from scripts.report import report
from scripts.analysis.common import open_collection, rowwise_cosine, sample_rows, train_and_evaluate
from sparse_predictor.trainer.labels import make_label_spec
from sparse_predictor.trainer.model import TrainConfig
from tests.analysis_fixtures import drifting_model, write_collection

DOC_LENGTHS = [7, 5, 9, 6, 8, 4, 10, 6]
ROWS = sum(DOC_LENGTHS)


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def hadamard(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def drift_records(out_dir: Path) -> dict[tuple, dict]:
    result = json.loads((out_dir / "drift.json").read_text())
    return {(r["kind"], r["layer"], r["k"], r["space"], r["dims"]): r for r in result["records"]}


def run_drift(data_dir: Path, out_dir: Path, *flags: str) -> dict:
    drift.main(["--data-dir", str(data_dir), "--out-dir", str(out_dir), "--max-rows", "100000", *flags])
    return json.loads((out_dir / "drift.json").read_text())


# ------------------------------------------------------------------------------------- drift
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_drift_of_identical_layers_is_one_and_of_orthogonal_layers_is_zero(tmp_path, family):
    """x_0 = x_1, x_2 orthogonal to x_1 per token: Hadamard rows (exact in float16, zero mean so LayerNorm keeps
    them orthogonal), scaled by powers of two."""
    dims = ModelDims(16, 32, 4, 2, 3)
    rng = np.random.default_rng(0)
    rows_h = hadamard(16)[1:]  # zero-mean rows
    pick = np.stack([rng.choice(15, size=2, replace=False) for _ in range(ROWS)])
    scale = 2.0 ** rng.integers(-2, 3, size=(ROWS, 2))
    x1 = rows_h[pick[:, 0]] * scale[:, :1]
    x2 = rows_h[pick[:, 1]] * scale[:, 1:]
    values = {(kind, l): x.astype(np.float32) for kind in ("att_x", "mlp_x") for l, x in enumerate((x1, x1, x2))}
    data = write_collection(tmp_path / "data", dims, DOC_LENGTHS, values, f"synthetic-{family}", f"{family}-save")
    result = run_drift(data, tmp_path / "out", "--max-distance", "2")
    records = {(r["kind"], r["layer"], r["k"], r["space"]): r for r in result["records"]}
    assert len(records) == 2 * 3 * 4  # kinds x pairs (0,1) (1,2) (0,2) x spaces (raw, normed, each centred)
    stats = ("mean", "p5", "p25", "p50", "p75", "p95")
    for kind in ("att_x", "mlp_x"):
        for space in ("raw", "normed"):
            identical, orthogonal = records[(kind, 0, 1, space)], records[(kind, 1, 1, space)]
            assert [identical[s] for s in stats] == pytest.approx([1.0] * 6, abs=1e-6)
            assert [orthogonal[s] for s in stats] == pytest.approx([0.0] * 6, abs=1e-6)
            assert records[(kind, 0, 2, space)]["mean"] == pytest.approx(0.0, abs=1e-6)
            assert identical["n"] == ROWS
            assert records[(kind, 0, 1, f"{space} centred")]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert result["normalization"]["parameter_free"] is True
    assert "parameter-free because no --model-dir" in result["normalization"]["description"]


@pytest.mark.parametrize("device", ["cpu", *(["cuda:0"] if torch.cuda.is_available() else [])])
def test_drift_on_a_device_equals_drift_on_the_host(tmp_path, device):
    """--device moves the means and cosines; the records equal the host's to float rounding, the massive dims too."""
    dims = ModelDims(16, 32, 4, 2, 4)
    rng = np.random.default_rng(1)
    values = {(kind, l): (rng.standard_normal((ROWS, 16)) + 0.5 * l).astype(np.float32)
              for kind in ("att_x", "mlp_x") for l in range(4)}
    data = write_collection(tmp_path / "data", dims, DOC_LENGTHS, values, "synthetic-llama", "llama-save")
    flags = ("--max-distance", "2", "--exclude-massive-dims", "2")
    host = run_drift(data, tmp_path / "host", *flags)
    moved = run_drift(data, tmp_path / "moved", *flags, "--device", device)
    assert host["device"] == "cpu" and moved["device"] == device
    assert moved["massive_dims"]["chosen"] == host["massive_dims"]["chosen"]
    assert len(moved["records"]) == len(host["records"]) > 0
    for a, b in zip(host["records"], moved["records"]):
        assert (a["kind"], a["layer"], a["k"], a["space"], a["dims"]) == (b["kind"], b["layer"], b["k"], b["space"],
                                                                          b["dims"])
        assert b["mean"] == pytest.approx(a["mean"], abs=1e-5) and b["cross_token_mean"] == pytest.approx(
            a["cross_token_mean"], abs=1e-5)


def test_rowwise_cosine_matches_the_formula_and_gives_zero_for_a_zero_row():
    a = torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    b = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0], [-1.0, 0.0, 0.0]])
    assert rowwise_cosine(a, b).tolist() == pytest.approx([4 / (3 * 5 ** 0.5), 0.0, -1.0])


def test_layernorm_drift_with_model_weights_uses_the_target_layers_norm(tmp_path):
    """OPT normed cosine = cosine of LN_{l+k}(x_l) and LN_{l+k}(x_{l+k}) with that layer's weight and bias."""
    data = drifting_model(tmp_path / "data", "opt", seed=3, drift=0.5, num_layers=2)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "opt"}))
    gen = torch.Generator().manual_seed(0)
    states = [{f"{norm}.{p}": torch.randn(16, generator=gen) for norm in ("self_attn_layer_norm", "final_layer_norm")
               for p in ("weight", "bias")} for _ in range(2)]
    for layer, state in enumerate(states):
        torch.save(state, model_dir / f"pytorch_{layer}.pt")
    result = run_drift(data, tmp_path / "out", "--model-dir", str(model_dir), "--kinds", "att_x")
    store = ActivationStore(data)
    x0, x1 = (torch.from_numpy(np.asarray(store.open("att_x", l), dtype=np.float32)) for l in (0, 1))
    ln = torch.nn.functional.layer_norm
    w, b = states[1]["self_attn_layer_norm.weight"], states[1]["self_attn_layer_norm.bias"]
    expected = torch.nn.functional.cosine_similarity(ln(x0, (16,), w, b), ln(x1, (16,), w, b), dim=1)
    [normed] = [r for r in result["records"] if r["space"] == "normed"]
    assert normed["mean"] == pytest.approx(expected.double().mean().item(), abs=1e-5)
    assert normed["p50"] == pytest.approx(np.percentile(expected.numpy(), 50), abs=1e-5)
    assert result["normalization"]["parameter_free"] is False


def test_missing_norm_key_in_the_model_dir_is_an_error_naming_file_and_key(tmp_path):
    data = drifting_model(tmp_path / "data", "llama", seed=1, drift=0.5, num_layers=2)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"rms_norm_eps": 1e-5}))
    for layer in range(2):
        torch.save({"input_layernorm.weight": torch.ones(16)}, model_dir / f"pytorch_{layer}.pt")
    with pytest.raises(KeyError, match=r"pytorch_0\.pt.*post_attention_layernorm\.weight"):
        run_drift(data, tmp_path / "out", "--model-dir", str(model_dir))


def massive_collection(path: Path, massive: dict[int, dict[int, float]]) -> Path:
    """Random independent layers except the given dims of each layer, which hold large constants."""
    rng = np.random.default_rng(5)
    dims = ModelDims(16, 32, 4, 2, len(massive))
    values = {}
    for layer, big in massive.items():
        x = rng.standard_normal((ROWS, 16)).astype(np.float32)
        for dim, value in big.items():
            x[:, dim] = value
        values[("att_x", layer)] = x
        values[("mlp_x", layer)] = x
    return write_collection(path, dims, DOC_LENGTHS, values, "synthetic-llama", "llama-save")


def cosine_without(store: ActivationStore, source: int, target: int, dropped: list[int]) -> np.ndarray:
    a, b = (np.delete(np.asarray(store.open("att_x", l), dtype=np.float64), dropped, axis=1) for l in (source, target))
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_massive_dimension_exclusion_removes_exactly_the_chosen_dimensions(tmp_path):
    data = massive_collection(tmp_path / "data", {0: {3: 40.0, 11: -30.0}, 1: {3: 40.0, 11: -30.0}})
    result = run_drift(data, tmp_path / "out", "--kinds", "att_x", "--exclude-massive-dims", "2")
    assert result["massive_dims"]["chosen"] == {"model": [3, 11]}
    assert result["massive_dims"]["mean_abs_of_chosen"]["model"] == pytest.approx([40.0, 30.0])
    records = {(r["space"], r["dims"]): r for r in result["records"]}
    expected = cosine_without(ActivationStore(data), 0, 1, [3, 11])
    without = records[("raw", "without_massive")]
    assert without["mean"] == pytest.approx(expected.mean(), abs=1e-5)
    assert without["p5"] == pytest.approx(np.percentile(expected, 5), abs=1e-5)
    assert records[("raw", "all")]["mean"] > 0.95  # the two constant dims make the layers look alike
    assert abs(without["mean"]) < 0.3  # the rest is independent noise


def test_massive_dimensions_per_layer_drop_the_union_of_both_layers(tmp_path):
    data = massive_collection(tmp_path / "data", {0: {3: 40.0, 11: -30.0}, 1: {3: 40.0, 5: 25.0}})
    result = run_drift(data, tmp_path / "out", "--kinds", "att_x", "--exclude-massive-dims", "2",
                       "--massive-per-layer")
    assert result["massive_dims"]["chosen"] == {"att_x_0": [3, 11], "att_x_1": [3, 5]}
    [without] = [r for r in result["records"] if (r["space"], r["dims"]) == ("raw", "without_massive")]
    expected = cosine_without(ActivationStore(data), 0, 1, [3, 5, 11])
    assert without["mean"] == pytest.approx(expected.mean(), abs=1e-5)
    assert without["p95"] == pytest.approx(np.percentile(expected, 95), abs=1e-5)


def test_exclude_first_token_drops_exactly_the_position_zero_rows(tmp_path):
    data = drifting_model(tmp_path / "data", "opt", seed=0, drift=0.3, num_layers=2)
    store = open_collection(data)
    positions = np.asarray(store.token_index()[:, 1])
    sample = sample_rows(store, None, 0, exclude_first_token=True)
    assert sample.rows.tolist() == np.flatnonzero(positions != 0).tolist()
    assert sample.first_token_rows_dropped == int((positions == 0).sum()) == 12  # one per document
    sub = sample_rows(store, 30, 7, exclude_first_token=True)
    assert len(sub.rows) == 30 and (positions[sub.rows] != 0).all()
    assert sub.rows.tolist() == sample_rows(store, 30, 7, exclude_first_token=True).rows.tolist()  # deterministic
    result = run_drift(data, tmp_path / "out", "--exclude-first-token")
    assert {r["n"] for r in result["records"]} == {store.rows - 12}
    assert result["sample"]["first_token_rows_dropped"] == 12


# ------------------------------------------------------------------------------------- sparsity statistics
def test_sparsity_statistics_have_the_hand_computed_values(tmp_path):
    dims = ModelDims(4, 4, 2, 1, 1)
    label = np.array([[0, 0, 1, 3], [0, 2, 2, 0], [0, 0, 0, 0.005], [4, 0, 0, 0]] * 2, dtype=np.float32)
    heads = np.array([[1, 3], [2, 2], [0, 1], [1, 1]] * 2, dtype=np.float32)
    values = {("att_x", 0): np.ones((8, 4), np.float32), ("mlp_x", 0): np.ones((8, 4), np.float32),
              ("mlp_label", 0): label, ("att_label", 0): heads}
    data = write_collection(tmp_path / "data", dims, [4, 4], values, "facebook/opt-hand", "opt-save")
    written = sparsity_stats.main(["--data-dir", str(data), "--out-dir", str(tmp_path / "out"), "--no-label-sweep",
                                   "--thresholds", "0.01,2.5", "--fractions", "0.25,0.5"])
    result = json.loads(written[0].read_text())
    [stats] = result["records"]
    assert stats["zero_fraction"] == pytest.approx(10 / 16)
    assert stats["below_0.01"] == pytest.approx(11 / 16)
    assert stats["below_2.5"] == pytest.approx(14 / 16)
    assert stats["mlp_top0.25_mass"] == pytest.approx((3 / 4 + 2 / 4 + 1 + 1) / 4, rel=1e-6)
    assert stats["mlp_top0.5_mass"] == pytest.approx(1.0)
    assert stats["att_top0.5_mass"] == pytest.approx((3 / 4 + 2 / 4 + 1 + 1 / 2) / 4)
    assert stats["att_top0.25_mass"] == pytest.approx((3 / 4 + 2 / 4 + 1 + 1 / 2) / 4)  # 0.25 of 2 heads: 1 head
    assert stats["gate_negative_fraction"] is None and "ABSENT" in result["mlp_gate"]
    assert result["provenance"]["git_commit"] and result["provenance"]["command"]
    with open(written[1]) as f:
        assert next(csv.DictReader(f))["zero_fraction"] == str(10 / 16)


def test_gate_fraction_and_label_sweep_through_the_trainer(tmp_path):
    data = drifting_model(tmp_path / "llama", "llama", seed=2, drift=0.3, num_layers=2)
    no_gate = drifting_model(tmp_path / "opt", "opt", seed=2, drift=0.3, num_layers=2)
    flags = ["--sweep-layers", "1", "--labels", "topk:0.25,gate", "--D", "8", "--epochs", "1", "--batch_size", "32",
             "--device", "cpu"]
    sparsity_stats.main(["--data-dir", str(data), "--out-dir", str(tmp_path / "out"), *flags])
    sparsity_stats.main(["--data-dir", str(no_gate), "--out-dir", str(tmp_path / "out_opt"), *flags])
    stats = json.loads((tmp_path / "out" / "sparsity_stats.json").read_text())["records"]
    gate = np.asarray(ActivationStore(data).open("mlp_gate", 1), dtype=np.float32)
    assert stats[1]["gate_negative_fraction"] == pytest.approx((gate < 0).mean())
    sweep = {r["label_spec"]: r for r in json.loads((tmp_path / "out" / "label_sweep.json").read_text())["records"]}
    assert sweep["topk:0.25"]["K"] == 8 and sweep["topk:0.25"]["status"] == "trained"
    assert sweep["gate"]["label"] == "gate" and 0 <= sweep["gate"]["Recall@K"] <= 1
    opt_records = json.loads((tmp_path / "out_opt" / "label_sweep.json").read_text())["records"]
    opt_sweep = {r["label_spec"]: r for r in opt_records}
    assert opt_sweep["gate"]["status"].startswith("absent: mlp_gate was not collected")
    assert opt_sweep["topk:0.25"]["status"] == "trained"


# ------------------------------------------------------------------------------------- lookahead
def test_lookahead_matrix_cells_are_the_trainers_predictors_from_earlier_layers(tmp_path):
    data = drifting_model(tmp_path / "data", "opt", seed=4, drift=0.3, num_layers=3)
    lookahead.main(["--data-dir", str(data), "--out-dir", str(tmp_path / "out"), "--max-distance", "1", "--D", "8",
                    "--epochs", "2", "--batch_size", "32", "--device", "cpu"])
    result = json.loads((tmp_path / "out" / "lookahead_mlp.json").read_text())
    assert [[r["layer"], r["distance"], r["input_layer"]] for r in result["records"]] == [
        [0, 0, 0], [1, 0, 1], [1, 1, 0], [2, 0, 2], [2, 1, 1]]
    matrix = result["matrix"]["Recall@K"]
    assert len(matrix) == 3 and matrix[0][1] is None and all(v is not None for v in matrix[2])
    assert result["label"] == "relu"  # main_mlp.py's default for OPT
    relu = make_label_spec("mlp", "relu", None, None, 32)
    direct = train_and_evaluate(open_collection(data), "mlp", 2, "from:1", relu,
                                TrainConfig(D=8, epochs=2, batch_size=32, lr=1e-3), torch.device("cpu"), None,
                                log=lambda line: None)
    assert matrix[2][1] == direct["Recall@K"]


# ------------------------------------------------------------------------------------- report
def predictor_json(out_dir: Path, data_dir: Path, layer: int, recall: float) -> None:
    record = {"Recall": recall, "True Sparsity": 10.0, "Classifier Sparsity": 12.0, "Precision": 0.7,
              "Recall@K": recall - 0.1, "K": 10, "input": "same", "label": "relu", "layer": layer, "model": "opt-run",
              "data": {"data_dir": str(data_dir), "dims": {"num_layers": 3}, "model_name": "facebook/opt-synthetic"},
              "provenance": {"command": f"sparse_predictor/main_mlp.py --L {layer}", "git_commit": "feedbeef"}}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"mlp_layer{layer}.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def report_inputs(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("report")
    opt = drifting_model(root / "opt_c4", "opt", seed=0, drift=0.3, num_layers=3)
    llama = drifting_model(root / "llama_c4", "llama", seed=1, drift=0.8, num_layers=3)
    train = ["--D", "8", "--epochs", "1", "--batch_size", "32", "--device", "cpu"]
    for name, data in (("opt", opt), ("llama", llama)):
        out = root / "results" / name
        drift.main(["--data-dir", str(data), "--out-dir", str(out), "--max-distance", "2"])
        lookahead.main(["--data-dir", str(data), "--out-dir", str(out), "--max-distance", "1", "--layers", "1-2",
                        *train])
        sparsity_stats.main(["--data-dir", str(data), "--out-dir", str(out), "--sweep-layers", "2", "--labels",
                             "topk:0.5,gate", *train])
    predictor_json(root / "predictors", opt, 0, 0.8125)
    predictor_json(root / "predictors", opt, 1, 0.9375)  # layer 2 of 3 is left missing
    (root / "dense.manifest.json").write_text(json.dumps({"command": "runner --sparse-mode dense",
                                                          "git_commit": "c0ffee"}))
    sweep = root / "sweep.csv"
    sweep.write_text("model,dataset,mode,mlp_topk,att_topk,perplexity,tokens,output_manifest\n"
                     "opt-synthetic,c4,dense,,,20.0,100,dense.manifest.json\n"
                     "opt-synthetic,c4,oracle,0.5,,25.0,100,absent.manifest.json\n")
    tasks = root / "tasks.csv"
    provenance = {"provenance": {"command": "task_sweep.py", "git_commit": "c0ffee"}}
    (root / "task_dense.json").write_text(json.dumps(provenance))
    tasks.write_text("model,task,mode,mlp_topk,att_topk,acc,acc_stderr,samples,result_json\n"
                     "opt-synthetic,lastword_mc,dense,,,0.40,0.05,50,task_dense.json\n"
                     "opt-synthetic,lastword_mc,oracle,0.5,,0.35,0.05,50,task_dense.json\n")
    return root, [opt, llama, root / "results", root / "predictors", sweep, tasks, root / "no_such_dir"]


def test_report_builds_from_fixture_results_with_every_table(report_inputs, tmp_path):
    root, inputs = report_inputs
    text = report.read_report(report.build_report(inputs, tmp_path / "report"))
    for section in report.SECTIONS:
        assert f"## {section}\n\nMissing" not in text and f"## {section}\n" in text
    assert "- opt-synthetic / lastword_mc: dense acc 0.4" in text  # the downstream section reads the task CSV
    # drift: the generated sentence quotes the JSONs' per-layer means, pooled over layers l >= 1 (layer 0 apart)
    means = {}
    for name, model in (("opt", "opt-synthetic"), ("llama", "llama-synthetic")):
        records = json.loads((root / "results" / name / "drift.json").read_text())["records"]
        means[model] = np.mean([r["mean"] for r in records if (r["kind"], r["k"], r["space"], r["dims"])
                                == ("att_x", 1, "raw", "all") and r["layer"] >= 1])
    assert (f"mean cosine at k=1 (att_x, raw, all dims; mean over layers l >= 1 of the per-layer mean; layer 0 in "
            f"the per-layer table): opt-synthetic {means['opt-synthetic']:.4f}, llama-synthetic "
            f"{means['llama-synthetic']:.4f}") in text
    widths = [len(re.split(r"(?<!\\)\|", line.strip())) - 2 for line in text.splitlines() if line.startswith("|")]
    assert max(widths) <= 10  # every markdown table within the column limit
    assert "| layer l | j=0 | j=1 | src |" in text  # lookahead matrices
    assert "| layer | zero_fraction | positive_fraction |" in text  # sparsity statistics
    assert "absent: mlp_gate was not collected" in text  # OPT label sweep, gate label
    assert "| 0 | 0.8125 | 10.0000 | 12.0000 | 0.7000 | 0.7125 | 10 | same | relu |" in text  # hand-made predictor
    assert "| opt-synthetic | c4 | oracle | mlp | 0.5 of neurons, attention dense | 25.0000 | 100 | 1.2500 |" in text
    missing = text.split("## Missing inputs")[1].split("## Sources")[0]
    assert "no JSON for layers [2] of 3" in missing
    assert "absent.manifest.json not found" in missing
    assert "input path does not exist" in missing and "no_such_dir" in missing
    sources = text.split("## Sources")[1]
    assert "`sparse_predictor/main_mlp.py --L 1` | feedbeef" in sources
    assert "`runner --sparse-mode dense` | c0ffee" in sources
    drift_json = root / "results" / "opt" / "drift.json"
    drift_provenance = json.loads(drift_json.read_text())["provenance"]
    assert (f"| {drift_json} | `{drift_provenance['command']}` | {drift_provenance['git_commit']} | "
            f"{(root / 'opt_c4' / 'manifest.json').resolve()} |") in sources
    for figure in ("drift_att_x", "drift_mlp_x", "lookahead_mlp", "sparsity_stats_opt-synthetic", "label_sweep",
                   "predictors_mlp"):
        assert f"](figures/{figure}.png)" in text
        assert (tmp_path / "report" / "figures" / f"{figure}.png").stat().st_size > 0


def test_report_lists_sections_without_input_once_under_not_measured(report_inputs, tmp_path):
    root, _ = report_inputs
    text = report.read_report(report.build_report([root / "sweep.csv"], tmp_path / "report"))
    assert "## Residual-stream drift" not in text
    not_measured = text.split("## Not measured in this run")[1].split("\n## ")[0]
    assert "- section 'Residual-stream drift': no input of this kind was given" in not_measured
    assert "- section 'Predictors': no input of this kind was given" in not_measured
    assert "## Perplexity sweep\n\nFrom" in text


# ------------------------------------------------------------------------------------- OPT -> Llama change log
def test_committed_change_log_is_current():
    """Fails when a twin file changed without `python scripts/opt_llama_changelog.py` being run (intended)."""
    committed = (opt_llama_changelog.REPO_ROOT / opt_llama_changelog.OUTPUT).read_text()
    assert committed == opt_llama_changelog.render_changelog(), "run: python scripts/opt_llama_changelog.py"


def test_change_summary_names_the_definitions_that_differ(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "opt.py").write_text("import x\n\n\ndef same():\n    return 1\n\n\ndef f():\n    return 1\n\n\n"
                                           "class OPTThing:\n    def run(self):\n        pass\n")
    (tmp_path / "a" / "llama.py").write_text("import x\n\n\ndef same():\n    return 1\n\n\ndef f():\n    return 2\n\n\n"
                                             "class LlamaThing:\n    def run(self):\n        pass\n\n\ndef rope():\n"
                                             "    pass\n")
    change = opt_llama_changelog.compare_pair("a/opt.py", "a/llama.py", tmp_path)
    assert (change.changed, change.only_opt, change.only_llama) == (("f",), ("OPTThing",), ("LlamaThing", "rope"))
    assert (change.added, change.removed) == (6, 2)
    assert change.summary() == "+6 -2 lines; changed: f; only in OPT: OPTThing; only in Llama: LlamaThing, rope"
    assert "-    return 1\n+    return 2" in change.diff
    gone = opt_llama_changelog.compare_pair("a/opt.py", "a/none.py", tmp_path)
    assert gone.summary() == "MISSING: a/none.py" and gone.diff == ""


def test_task_matrix_has_one_column_per_task_and_the_unweighted_mean_with_its_standard_error():
    from scripts.report.sections import task_matrix

    def row(mode, task, acc, se, mlp="dense"):
        return {"model": "m", "task": task, "mode": mode, "block": "none" if mode == "dense" else "mlp",
                "mlp_topk": mlp, "att_topk": "dense", "mlp_kept": "", "att_kept": "", "att_unit": "",
                "acc": str(acc), "acc_stderr": str(se)}

    rows = [row("dense", "dejavu_cb", 0.5, 0.03), row("dense", "dejavu_copa", 0.7, 0.04),
            row("dense", "dejavu_rte", 0.54, 0.03), row("oracle", "dejavu_cb", 0.4, 0.03, "0.5")]
    lines = task_matrix(rows, {})
    header = next(line for line in lines if line.startswith("| mode"))
    assert header.split("|")[1:-1] == [" mode ", " budget ", " cb ", " copa ", " rte ", " headline mean ",
                                       " mean of all "]
    assert "left out, at chance for the dense model: dejavu_rte" in "\n".join(lines)  # 0.54 - 0.5 <= 2 x 0.03
    dense = next(line for line in lines if line.startswith("| dense")).split("|")
    assert dense[-3].strip() == "0.600 ± 0.025"  # headline: (0.5 + 0.7) / 2, sqrt(0.03^2 + 0.04^2) / 2
    assert dense[-2].strip() == "0.580 ± 0.019"  # all three: 1.74 / 3, sqrt(0.03^2 + 0.04^2 + 0.03^2) / 3
    at_chance = task_matrix([row("dense", "dejavu_rte", 0.5, 0.03), row("oracle", "dejavu_rte", 0.4, 0.03, "0.5")], {})
    assert "| dense | dense | 0.500 ± 0.030 | n/a (no task) | 0.500 ± 0.030 |" in at_chance  # nothing above chance
    oracle = next(line for line in lines if line.startswith("| oracle"))
    assert "0.400 ± 0.030" in oracle and "not run" in oracle and "n/a (1 of 2 tasks)" in oracle
