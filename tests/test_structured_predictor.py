"""Structured MLP predictors (sparse_predictor/structured.py, mode `structured`): exactness at full rank, equal
parameters, training from the SVD start, strict loading and the runner's checks."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from Decentralized_FM_alpha.modules.sparsity import SparsityController, SparsityPlan
from Decentralized_FM_alpha.modules.structured_predictor import StructuredPredictor, load_structured
from Decentralized_FM_alpha.utils.activation_store import ModelDims
from Decentralized_FM_alpha.utils.selection import fraction_count
from scripts.analysis import recall_summary
from scripts.study import sparse_sweep
from sparse_predictor import structured, train_structured
from sparse_predictor.trainer.metrics import ranking_statistics
from tests.analysis_fixtures import write_collection
from tests.helpers_models import make_llama, make_opt
from tests.runner_helpers import c4_texts, read_results, write_requests
from tests.test_sparse_inference import TOL, hf_masked_logprobs, max_error

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(k, dim=-1).indices, True)


def mlp_inputs_and_activations(model, family: str, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer of the HF model: the MLP's input before its norm (mlp_x) and the neuron activations (oracle)."""
    layers = model.model.decoder.layers if family == "opt" else model.model.layers
    found, hooks = [[None, None] for _ in layers], []

    def keep(i: int, slot: int):  # (tokens, width) whatever the module's batch layout (HF OPT flattens it)
        return lambda module, args: found[i].__setitem__(slot, args[0].reshape(-1, args[0].shape[-1]))
    for i, layer in enumerate(layers):
        norm = layer.final_layer_norm if family == "opt" else layer.post_attention_layernorm
        down = layer.fc2 if family == "opt" else layer.mlp.down_proj
        hooks += [norm.register_forward_pre_hook(keep(i, 0)), down.register_forward_pre_hook(keep(i, 1))]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return [tuple(pair) for pair in found]


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_full_rank_svd_from_the_mlp_input_ranks_exactly_as_the_oracle(family, tmp_path, tiny_tokenizer_dir):
    model, _, converted = (make_llama if family == "llama" else make_opt)(tmp_path, tiny_tokenizer_dir, seed=3)
    config = model.config
    ffn = config.intermediate_size if family == "llama" else config.ffn_dim
    dims = ModelDims(config.hidden_size, ffn, config.num_attention_heads, config.num_attention_heads,
                     config.num_hidden_layers)
    ids = torch.randint(3, config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    for layer, (mlp_x, activation) in enumerate(mlp_inputs_and_activations(model, family, ids)):
        weights = structured.read_mlp_weights(converted, layer, dims)
        rank = structured.resolve_rank("full", weights.form, dims.hidden_size, ffn, D=2)
        scores = structured.svd_predictor(weights, rank)(mlp_x)[0]
        for k in (0.1, 0.25, 0.5):
            K = fraction_count(k, ffn)  # every pick a true top-K unit (OPT: the ReLU's zeros tie, counted by room)
            hits = ranking_statistics(scores, activation.abs(), K)["topk_hits"]
            assert hits.tolist() == [K] * len(hits), (layer, k)
            if family == "llama":  # no ties: the masks themselves are equal
                assert torch.equal(top_k(scores, K), top_k(activation.abs(), K)), (layer, k)


@pytest.mark.parametrize("form, pairs", [("swiglu", 2), ("relu", 1)])
def test_rank_equal_has_the_parameters_of_dejavus_predictor_at_D(form, pairs):
    d, ffn, D = 32, 80, 16
    rank = structured.resolve_rank("equal", form, d, ffn, D)
    predictor = StructuredPredictor(form, d, ffn, rank)
    dejavu = torch.nn.Sequential(torch.nn.Linear(d, D, bias=False), torch.nn.Linear(D, ffn, bias=False))
    assert rank == D // pairs
    assert predictor.factor_parameters() == sum(p.numel() for p in dejavu.parameters())
    assert structured.resolve_rank("full", form, d, ffn, D) == d
    with pytest.raises(ValueError, match="exceeds the full rank"):
        structured.resolve_rank("33", form, d, ffn, D)


# ------------------------------------------------------------------------------------- a collection of known layers
def swiglu_collection(root: Path, model_dir: Path, dims: ModelDims, seed: int = 0, docs: int = 60,
                      drift: float = 0.5) -> Path:
    """att_x random, mlp_x = att_x + drift * noise (so lookahead is not the MLP's input), and every layer's mlp_label
    computed by its own converted weights: act(W_g z) * (W_u z), z = RMSNorm(mlp_x) with the layer's weight."""
    rng = np.random.default_rng(seed)
    lengths = [int(v) for v in rng.integers(30, 60, docs)]
    values = {}
    for layer in range(dims.num_layers):
        weights = structured.read_mlp_weights(model_dir, layer, dims)
        att_x = rng.standard_normal((sum(lengths), dims.hidden_size)).astype(np.float32)
        mlp_x = att_x + drift * rng.standard_normal(att_x.shape).astype(np.float32)
        exact = structured.exact_predictor(weights)
        z = exact.normed(torch.from_numpy(mlp_x))
        label = exact.act(z @ weights.projections["gate"].T) * (z @ weights.projections["up"].T)
        values.update({("att_x", layer): att_x, ("mlp_x", layer): mlp_x, ("mlp_label", layer): label.numpy(),
                       ("att_label", layer): np.abs(rng.standard_normal((len(att_x), dims.num_heads))).astype(np.float32)})
    return write_collection(root / "data", dims, lengths, values, "tiny-llama", "llama-save")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, tiny_tokenizer_dir):
    tmp = tmp_path_factory.mktemp("structured_llama")
    model, _, converted = make_llama(tmp, tiny_tokenizer_dir, seed=5)
    c = model.config
    dims = ModelDims(c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
                     c.num_hidden_layers)
    return model, converted, dims, swiglu_collection(tmp, converted, dims)


def train(collection: Path, converted: Path, out: Path, *flags: str) -> list[dict]:
    paths = train_structured.main(["--data-dir", str(collection), "--model-dir", str(converted), "--out-dir", str(out),
                                   "--batch_size", "256", "--selection", "last", *flags])
    return [json.loads(p.read_text()) for p in paths]


@pytest.mark.parametrize("input_flag", ["lookahead", "same"])
def test_training_from_the_svd_start_does_not_lower_held_out_recall_at_low_rank(tiny_llama, tmp_path, input_flag):
    _, converted, _, collection = tiny_llama
    common = ["--L", "1", "--k", "0.25", "--rank", "4", "--input", input_flag, "--epochs", "30"]
    start, = train(collection, converted, tmp_path / "svd", *common, "--variant", "svd")
    trained, = train(collection, converted, tmp_path / "trained", *common, "--variant", "trained")
    assert (start["variant"], trained["variant"]) == ("svd", "svd+trained")
    assert start["history"] == [] and trained["epochs_run"] == 30
    assert trained["Recall@K"] >= start["Recall@K"] > start["K"] / start["predictor"]["out"]
    assert trained["test_documents"] == start["test_documents"]


def test_full_rank_svd_from_the_same_layer_recovers_the_label(tiny_llama, tmp_path):
    _, converted, _, collection = tiny_llama
    record, = train(collection, converted, tmp_path, "--L", "1", "--k", "0.25", "--rank", "full", "--input", "same",
                    "--variant", "svd")
    assert record["rank"] == record["full_rank"] == 32
    assert record["Recall@K"] > 0.99  # not 1: the collection stores float16 rows, whose rounding breaks near-ties


@pytest.fixture(scope="module")
def structured_dir(tiny_llama, tmp_path_factory) -> Path:
    """Trained structured predictors of every layer at k = 0.5 from the lookahead input."""
    _, converted, _, collection = tiny_llama
    out = tmp_path_factory.mktemp("structured_files")
    train(collection, converted, out, "--L", "all", "--k", "0.5", "--rank", "4", "--variant", "trained",
          "--epochs", "2")
    return out


def controller(dims: ModelDims, directory: Path, budget, predictor_input="lookahead", allow=False):
    plan = SparsityPlan("structured", mlp_budgets={1: budget, 2: budget}, predictor_dir=directory,
                        predictor_input=predictor_input, allow_mismatch=allow)
    return SparsityController(plan, dims, range(dims.num_layers), torch.device("cpu"))


def test_structured_mode_loads_its_files_and_refuses_another_budget_or_input(tiny_llama, structured_dir):
    _, _, dims, _ = tiny_llama
    loaded = controller(dims, structured_dir, 0.5)
    assert [(p["block"], p["layer"], p["K"]) for p in loaded.loaded] == [("mlp", 1, 40), ("mlp", 2, 40)]
    meta = structured_dir / "structured_mlp_layer1.json"
    with pytest.raises(ValueError, match=rf"{meta}: trained for K=40 \(k=0.5\), the run keeps 20"):
        controller(dims, structured_dir, 0.25)
    with pytest.raises(ValueError, match=rf"{meta}: trained on input 'lookahead', the run asks for 'same'"):
        controller(dims, structured_dir, 0.5, predictor_input="same")
    allowed = controller(dims, structured_dir, 0.25, allow=True)
    assert len(allowed.mismatches) == 2
    with pytest.raises(ValueError, match="ranks MLP neurons only"):
        SparsityPlan("structured", att_budgets={1: 2}, predictor_dir=structured_dir)


def test_a_structured_file_with_a_wrong_key_or_a_missing_file_is_an_error(tiny_llama, structured_dir, tmp_path):
    _, _, dims, _ = tiny_llama
    broken = tmp_path / "broken"
    broken.mkdir()
    for layer in (1, 2):
        for suffix in (".pt", ".json"):
            name = f"structured_mlp_layer{layer}{suffix}"
            (broken / name).write_bytes((structured_dir / name).read_bytes())
    state = torch.load(broken / "structured_mlp_layer2.pt")
    state["extra"] = torch.zeros(1)
    torch.save(state, broken / "structured_mlp_layer2.pt")
    with pytest.raises(ValueError, match=f"{broken / 'structured_mlp_layer2.pt'}: keys and shapes"):
        controller(dims, broken, 0.5)
    (broken / "structured_mlp_layer2.pt").unlink()
    with pytest.raises(FileNotFoundError, match="structured_mlp_layer2.pt"):
        controller(dims, broken, 0.5)


def test_recall_summary_scores_structured_predictors_and_the_decomposition_on_every_layer(tiny_llama, tmp_path):
    _, converted, dims, collection = tiny_llama
    out = tmp_path / "summary"
    recall_summary.main(["--data-dir", str(collection), "--out-dir", str(out), "--model-dir", str(converted),
                         "--fractions", "0.25,0.5", "--distance-fraction", "0.25", "--epochs", "2", "--D", "16",
                         "--batch_size", "256", "--capacity-layers", "", "--folds", "0",
                         "--structured-ranks", "4,equal,full", "--structured-trained"])
    payload = json.loads((out / "recall_summary.json").read_text())
    records = [r for r in payload["records"] if r.get("ranking", "").startswith(("structured", "exact", "linear"))]
    names = {r["ranking"] for r in records}
    assert {"structured svd rank 4 (4)", "structured svd rank 8 (equal)", "structured svd rank 32 (full)",
            "structured svd+trained rank 4 (4)", "exact MLP form (own weights)",
            "linear predictor (full rank)"} <= names
    for layer in range(dims.num_layers):  # every layer, both inputs, with the per-document sums of intervals
        mine = [r for r in records if r["layer"] == layer]
        assert {(r["input"], r["k"]) for r in mine} == {(i, k) for i in ("lookahead", "same") for k in (0.25, 0.5)}
        assert all(sum(r["per_document"]["topk_hits"]) == round(r["Recall@K"] * r["K"] * r["rows_test"]) for r in mine)
    rows = payload["structured_decomposition"]
    assert [row["layer"] for row in rows] == list(range(dims.num_layers))
    for row in rows:
        assert row["cells"]["same"]["exact"] > 0.99  # the oracle up to the float16 rows' ties
        assert row["cells"]["lookahead"]["exact"] < row["cells"]["same"]["exact"]
        assert row["lost"]["total (lookahead, linear)"] == pytest.approx(1 - row["cells"]["lookahead"]["linear"])
        exact = [r for r in records if (r["layer"], r["input"], r["k"], r["ranking"]) ==
                 (row["layer"], "same", 0.25, "exact MLP form (own weights)")]
        full = [r for r in records if (r["layer"], r["input"], r["k"], r["ranking"]) ==
                (row["layer"], "same", 0.25, "structured svd rank 32 (full)")]
        assert full[0]["Recall@K"] == pytest.approx(exact[0]["Recall@K"], abs=0.01)


def test_sweep_runs_structured_as_its_own_mode_with_the_masks_it_ranks(tiny_llama, structured_dir, tmp_path):
    model, converted, dims, _ = tiny_llama
    prompts = c4_texts(2, max_chars=200)
    requests = write_requests(tmp_path / "c4.jsonl", prompts)
    out = tmp_path / "sweep"
    rows = sparse_sweep.main(["--model-name", str(converted), "--family", "llama", "--data", f"c4={requests}",
                              "--modes", "structured", "oracle", "--mlp-topk", "0.5", "--att-topk", "0.5",
                              "--structured-dir", str(structured_dir), "--dense-layers", "none", "--out-dir", str(out)])
    assert [(r["mode"], r["block"]) for r in rows] == [("dense", "none"), ("structured", "mlp"), ("oracle", "mlp"),
                                                       ("oracle", "att"), ("oracle", "both")]
    row = rows[1]
    assert (row["mlp_trained_k"], row["mlp_kept"], row["predictor_input"]) == ("0.5", "40", "lookahead")
    ffn, d = dims.ffn_dim, dims.hidden_size
    assert row["extra_work"]["mlp"]["per_layer"] == {"weights": 2 * 4 * (d + ffn), "flops": 4 * 4 * (d + ffn),
                                                     "weight_bytes": 4 * 2 * 4 * (d + ffn)}  # fp32 weights
    assert rows[2]["extra_work"]["mlp"]["per_layer"]["weights"] == 3 * d * ffn  # the oracle: the dense MLP
    predictors = {layer: load_structured(structured_dir / f"structured_mlp_layer{layer}.pt",
                                         json.loads((structured_dir / f"structured_mlp_layer{layer}.json").read_text()),
                                         d, ffn) for layer in range(dims.num_layers)}

    def by_structured(block, layer, true_scores, seen):
        with torch.no_grad():
            return predictors[layer](seen[("att_x", layer)])[0]

    tokenizer = AutoTokenizer.from_pretrained(converted)
    results = read_results(Path(row["output_manifest"].removesuffix(".manifest.json")))
    error = max_error(results, prompts, lambda p: hf_masked_logprobs(model, "llama", tokenizer(p)["input_ids"],
                                                                     mlp_k=ffn // 2, scorer=by_structured))
    assert error <= TOL
