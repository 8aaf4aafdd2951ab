"""On-policy Recall@K: the masks a sparse run applies, scored against the true top-K of the same run's activations,
over real tokens only; checked against plain Hugging Face hooks and by hand on the controller."""
from __future__ import annotations

import json
from collections import defaultdict

import torch
from transformers import AutoTokenizer

from Decentralized_FM_alpha.modules.sparsity import SparsityController, SparsityPlan
from Decentralized_FM_alpha.utils.activation_store import ModelDims
from tests.helpers_models import make_llama
from tests.runner_helpers import c4_texts, run_one_rank, write_requests
from tests.test_sparse_inference import hf_masked_logprobs, write_predictors


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(k, -1).indices, True)


def hf_on_policy_counts(model, prompts_ids, predictors, mlp_k: int, att_k: int) -> dict:
    """(block, layer) -> [hits, tokens]: each prompt alone (no padding) through HF with the predictors' masks applied
    by hooks; the hits of each mask in the top-K of the activations it masks, recomputed here."""
    counts = defaultdict(lambda: [0, 0])

    def by_predictor(block, layer, true_scores, inputs):  # true_scores: (T, width) of this prompt, before masking
        net, kind, source = predictors[(block, layer)]
        with torch.no_grad():
            scores = net(inputs[(kind, source)].float())
        k = mlp_k if block == "mlp" else att_k
        counts[(block, layer)][0] += int((top_k(scores, k) & top_k(true_scores, k)).sum())
        counts[(block, layer)][1] += true_scores.shape[0]
        return scores

    for ids in prompts_ids:
        hf_masked_logprobs(model, "llama", ids, mlp_k=mlp_k, att_k=att_k, scorer=by_predictor)
    return counts


def test_on_policy_recall_equals_hf_hooks_over_real_tokens_of_a_padded_batch(tmp_path, tiny_tokenizer_dir):
    model, _, converted = make_llama(tmp_path, tiny_tokenizer_dir, seed=31)
    prompts = [c4_texts(2, max_chars=260)[0], c4_texts(2, max_chars=90)[1]]  # different lengths: one row padded
    requests = write_requests(tmp_path / "req.jsonl", prompts)
    predictors = write_predictors(tmp_path / "pred", model, "llama", seed=8)
    mlp_k, att_k = 40, 2  # of 80 neurons, 4 heads
    out = tmp_path / "sparse.jsonl"
    run_one_rank(["--model-name", str(converted), "--model-type", "llama-ml-att-sparse", "--infer-data", str(requests),
                  "--output-path", str(out), "--sparse-mode", "predictor", "--predictor-dir", str(tmp_path / "pred"),
                  "--mlp-topk", str(mlp_k), "--att-topk", str(att_k), "--dense-layers", "none",
                  "--token-micro-batch-size", "2"])
    manifest = json.loads((tmp_path / "sparse.jsonl.manifest.json").read_text())
    assert manifest["batch_positions"]["padding"] > 0  # both prompts shared one padded batch
    tokenizer = AutoTokenizer.from_pretrained(converted)
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    reference = hf_on_policy_counts(model, ids, predictors, mlp_k, att_k)
    recorded = manifest["sparsity"]["on_policy_recall"]
    layers = model.config.num_hidden_layers
    assert [(r["block"], r["layer"]) for r in recorded["layers"]] == \
        [("mlp", l) for l in range(layers)] + [("att", l) for l in range(layers)]
    for r in recorded["layers"]:
        hits, tokens = reference[(r["block"], r["layer"])]
        assert (r["hits"], r["tokens"]) == (hits, tokens) == (hits, sum(map(len, ids)))
        assert r["K"] == (mlp_k if r["block"] == "mlp" else att_k)
        assert r["recall"] == hits / (r["K"] * tokens)
    for block in ("mlp", "att"):
        values = [r["recall"] for r in recorded["layers"] if r["block"] == block]
        assert recorded["mean"][block] == sum(values) / len(values)
        assert 0 < recorded["mean"][block] < 1  # random predictors: neither none nor all of the true top-K


def controller(mode: str, **plan) -> SparsityController:
    dims = ModelDims(hidden_size=16, ffn_dim=12, num_heads=6, num_kv_heads=2, num_layers=2)
    return SparsityController(SparsityPlan(mode, **plan), dims, range(2), torch.device("cpu"))


def test_oracle_recall_is_one_and_padding_is_not_counted():
    sparsity = controller("oracle", mlp_budgets={1: 4}, att_budgets={1: 2})
    valid = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    sparsity.mark_real_tokens(valid)
    g = torch.Generator().manual_seed(0)
    sparsity.keep_neurons(1, torch.randn(2, 5, 12, generator=g))
    sparsity.keep_heads(1, torch.randn(2, 5, 6, 3, generator=g))
    sparsity.keep_neurons(0, torch.randn(2, 5, 12, generator=g))  # a dense layer: nothing counted
    recall = sparsity.describe()["on_policy_recall"]
    assert recall["layers"] == [{"block": "mlp", "layer": 1, "K": 4, "hits": 4 * 8, "tokens": 8, "recall": 1.0},
                                {"block": "att", "layer": 1, "K": 2, "hits": 2 * 8, "tokens": 8, "recall": 1.0}]
    assert recall["mean"] == {"mlp": 1.0, "att": 1.0}


def test_group_masks_are_counted_in_heads_and_a_static_mask_on_every_real_token(tmp_path):
    g = torch.Generator().manual_seed(1)
    valid = torch.tensor([[True] * 4, [True, True, False, False]])
    heads = torch.randn(2, 4, 6, 3, generator=g)
    groups = controller("oracle", att_budgets={0: 0.5}, gqa_groups=True)  # half of 2 groups: 1 group, K = 3 heads
    groups.mark_real_tokens(valid)
    groups.keep_heads(0, heads)
    norms = heads.norm(dim=-1)
    kept = top_k(norms.unflatten(-1, (2, 3)).sum(-1), 1).repeat_interleave(3, dim=-1)
    (record,) = groups.describe()["on_policy_recall"]["layers"]
    assert (record["K"], record["tokens"]) == (3, 6)
    assert record["hits"] == int(((kept & top_k(norms, 3)).sum(-1) * valid).sum())

    counts = list(range(12))  # the static ranking keeps units 9, 10, 11 for every token
    (tmp_path / "static_mlp_layer1.json").write_text(json.dumps({"layer": 1, "counts": counts, "label": "test"}))
    static = controller("static", mlp_budgets={1: 3}, predictor_dir=tmp_path)
    static.mark_real_tokens(valid)
    activations = torch.randn(2, 4, 12, generator=g)
    static.keep_neurons(1, activations)
    (record,) = static.describe()["on_policy_recall"]["layers"]
    hits = top_k(activations.abs(), 3)[..., 9:].sum(-1)
    assert (record["hits"], record["tokens"]) == (int((hits * valid).sum()), 6)


def test_a_kept_unit_tied_with_the_true_kth_score_is_a_hit_while_the_tie_leaves_room():
    """ReLU's exact zeros: with one active neuron and K = 2, any zero completes the true top-K, so a mask keeping the
    active neuron and any zero has recall 1; a mask missing the active neuron has 1 hit (a zero) of 2."""
    sparsity = controller("oracle", mlp_budgets={1: 2})
    scores = torch.tensor([[[0.0, 0.0, 3.0, 0.0]]])
    sparsity.count_recall("mlp", 1, torch.tensor([[[False, False, True, True]]]), scores)
    sparsity.count_recall("mlp", 1, torch.tensor([[[True, True, False, False]]]), scores)
    (record,) = sparsity.describe()["on_policy_recall"]["layers"]
    assert (record["hits"], record["tokens"]) == (2 + 1, 2)
