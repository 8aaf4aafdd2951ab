"""DejaVu as deployed: predictors made for the run (input wiring, K) or refused, budgets as fractions by the one count
rule, whole key/value groups, a dense first layer, and the input-independent (static) and training-free (gate)
rankings, each checked against masked Hugging Face models."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from Decentralized_FM_alpha import dist_inference_runner
from Decentralized_FM_alpha.modules.sparsity import SparsityController, SparsityPlan, kept_heads
from Decentralized_FM_alpha.utils.activation_store import ModelDims
from Decentralized_FM_alpha.utils.selection import fraction_count
from tests.test_sparse_inference import TOL, dims, family, hf_masked_logprobs, layers_of, max_error, run_sparse  # noqa: F401
from tests.test_sparse_inference import write_predictors


def label_predictors(directory, model, name, k_mlp: float, att_heads: int, inputs=("lookahead", "lookahead")):
    """Random predictors whose JSONs say they were trained on the top-K label at k_mlp (MLP) and att_heads heads."""
    _, ffn, heads, _ = dims(model, name)
    write_predictors(directory, model, name, seed=7, inputs=inputs)
    for path in directory.glob("*_layer*.json"):
        meta = json.loads(path.read_text())
        block_mlp = path.name.startswith("mlp")
        meta.update(label="topk", k=k_mlp if block_mlp else att_heads / heads,
                    K=fraction_count(k_mlp, ffn) if block_mlp else att_heads)
        path.write_text(json.dumps(meta))


def test_a_predictor_trained_for_another_budget_or_input_is_refused_unless_allowed(family):
    name, model, _, _, _, _, tmp = family
    directory = tmp / "pred_k025"
    label_predictors(directory, model, name, k_mlp=0.25, att_heads=2)
    _, manifest = run_sparse(family, "k_ok", "--predictor-dir", str(directory), "--mlp-topk", "0.25", "--att-topk", "2")
    assert manifest["sparsity"]["predictor_mismatches"] == [] and manifest["sparsity"]["predictor_input"] == "lookahead"
    _, ffn, _, _ = dims(model, name)
    with pytest.raises(ValueError, match=rf"mlp_layer0.json: trained for K={fraction_count(0.25, ffn)} \(k=0.25\), "
                                         rf"the run keeps {fraction_count(0.5, ffn)}"):
        run_sparse(family, "k_bad", "--predictor-dir", str(directory), "--mlp-topk", "0.5")
    with pytest.raises(ValueError, match=r"att_layer1.json: trained for K=2 .*the run keeps 3"):
        run_sparse(family, "att_bad", "--predictor-dir", str(directory), "--att-topk", "3")
    with pytest.raises(ValueError, match=r"trained on input 'lookahead', the run asks for 'same'"):
        run_sparse(family, "input_bad", "--predictor-dir", str(directory), "--mlp-topk", "0.25", "--predictor-input",
                   "same")
    _, allowed = run_sparse(family, "k_allowed", "--predictor-dir", str(directory), "--mlp-topk", "0.5",
                            "--allow-predictor-mismatch")
    assert allowed["sparsity"]["allow_predictor_mismatch"] is True
    assert len(allowed["sparsity"]["predictor_mismatches"]) == model.config.num_hidden_layers
    assert all("the run keeps" in m for m in allowed["sparsity"]["predictor_mismatches"])


def test_attention_fractions_follow_the_count_rule_in_heads_and_in_groups():
    llama_3b = ModelDims(hidden_size=3072, ffn_dim=8192, num_heads=24, num_kv_heads=8, num_layers=28)
    opt_2_7b = ModelDims(hidden_size=2560, ffn_dim=10240, num_heads=32, num_kv_heads=32, num_layers=32)
    assert kept_heads(0.25, llama_3b, gqa_groups=False) == 6
    assert kept_heads(0.25, opt_2_7b, gqa_groups=False) == 8
    assert kept_heads(0.25, llama_3b, gqa_groups=True) == 2 * 3  # 2 of 8 groups of 3 query heads
    assert kept_heads(0.1, llama_3b, gqa_groups=True) == 3  # at least one group
    assert kept_heads(6, llama_3b, gqa_groups=True) == 6
    with pytest.raises(ValueError, match="not a multiple of 3"):
        kept_heads(4, llama_3b, gqa_groups=True)


def test_group_mode_keeps_whole_key_value_groups_on_the_mask():
    dims_ = ModelDims(hidden_size=64, ffn_dim=128, num_heads=12, num_kv_heads=4, num_layers=2)
    plan = SparsityPlan("oracle", att_budgets={0: 0.5, 1: 0.5}, gqa_groups=True)
    controller = SparsityController(plan, dims_, range(2), torch.device("cpu"))
    heads = torch.randn(2, 5, 12, 8, generator=torch.Generator().manual_seed(0))
    kept = controller.keep_heads(0, heads)
    mask = kept.abs().sum(-1) > 0  # (B, T, H)
    by_group = mask.unflatten(-1, (4, 3))
    assert (by_group.all(-1) | ~by_group.any(-1)).all()  # each group kept or dropped whole
    assert (by_group.all(-1).sum(-1) == 2).all()  # fraction_count(0.5, 4 groups) = 2 groups per token
    norms = heads.norm(dim=-1).unflatten(-1, (4, 3)).sum(-1)
    assert torch.equal(by_group.all(-1), torch.zeros_like(norms, dtype=torch.bool).scatter_(
        -1, norms.topk(2, dim=-1).indices, True))


def test_dense_layer_0_computes_the_dense_layer_while_later_layers_are_sparse(family):
    name, model, converted, req, _, _, tmp = family
    outputs = {}
    for tag, flags in (("dense", ["--model-type", name]),
                       ("sparse", ["--model-type", f"{name}-ml-att-sparse", "--sparse-mode", "oracle", "--mlp-topk",
                                   "0.25", "--att-topk", "2", "--dense-layers", "0"])):
        args = dist_inference_runner.resolve_args(["--model-name", str(converted), "--infer-data", str(req),
                                                   "--use-cuda", "false", *flags])
        pipe = dist_inference_runner.build_pipeline(args)
        seen = []
        hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o[0].detach().clone())) for b in pipe.blocks]
        ids = torch.tensor([AutoTokenizer.from_pretrained(converted)("A dense first layer, please.")
                            ["input_ids"]])
        pipe.forward(ids, torch.ones_like(ids, dtype=torch.bool))
        for h in hooks:
            h.remove()
        outputs[tag] = seen
    assert torch.equal(outputs["dense"][0], outputs["sparse"][0])  # layer 0 untouched
    assert all((d - s).abs().max() > 1e-4 for d, s in zip(outputs["dense"][1:], outputs["sparse"][1:]))
    _, manifest = run_sparse(family, "dense0", "--sparse-mode", "oracle", "--mlp-topk", "0.25", "--dense-layers", "0")
    assert manifest["sparsity"]["dense_layers"] == [0] and "0" not in manifest["sparsity"]["mlp_budgets"]


def write_static(directory, model, name, k: float, seed: int) -> dict:
    """Static files with distinct random counts per unit; returns (block, layer) -> counts."""
    _, ffn, heads, _ = dims(model, name)
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    counts = {}
    for layer in range(model.config.num_hidden_layers):
        for block, width in (("mlp", ffn), ("att", heads)):
            counts[(block, layer)] = torch.randperm(width, generator=g) * 3
            (directory / f"static_{block}_layer{layer}.json").write_text(json.dumps(
                {"block": block, "layer": layer, "label": "topk", "k": k, "K": fraction_count(k, width),
                 "counts": counts[(block, layer)].tolist(), "input": "static (no input)"}))
    return counts


def test_static_mode_keeps_the_most_frequent_units_for_every_token(family):
    name, model, converted, _, prompts, dense, tmp = family
    _, ffn, heads, _ = dims(model, name)
    counts = write_static(tmp / "static", model, name, k=0.5, seed=9)
    results, manifest = run_sparse(family, "static", "--sparse-mode", "static", "--predictor-dir", str(tmp / "static"),
                                   "--mlp-topk", "0.5", "--att-topk", "0.5")
    tokenizer = AutoTokenizer.from_pretrained(converted)
    by_count = lambda block, i, true_scores, seen: counts[(block, i)].float().expand_as(true_scores)  # noqa: E731
    error = max_error(results, prompts, lambda p: hf_masked_logprobs(
        model, name, tokenizer(p)["input_ids"], mlp_k=fraction_count(0.5, ffn), att_k=fraction_count(0.5, heads),
        scorer=by_count))
    assert error <= TOL
    assert {p["path"].rsplit("/", 1)[1] for p in manifest["sparsity"]["predictors"]} == {
        f"static_{b}_layer{l}.json" for b in ("mlp", "att") for l in range(model.config.num_hidden_layers)}
    with pytest.raises(ValueError, match=r"static_mlp_layer0.json: trained for K=.*the run keeps"):
        run_sparse(family, "static_bad", "--sparse-mode", "static", "--predictor-dir", str(tmp / "static"),
                   "--mlp-topk", "0.25")


def test_gate_mode_keeps_the_top_k_of_the_exact_gate(family):
    name, model, converted, _, prompts, _, _ = family
    if name == "opt":
        with pytest.raises(ValueError, match="no gate"):
            run_sparse(family, "gate_opt", "--sparse-mode", "gate", "--mlp-topk", "0.25")
        return
    _, ffn, _, _ = dims(model, name)
    layers = layers_of(model, name)

    def by_gate(block, i, true_scores, seen):  # |SiLU(g)| from the HF layer's own norm and gate projection
        with torch.no_grad():
            g = layers[i].mlp.gate_proj(layers[i].post_attention_layernorm(seen[("mlp_x", i)]))
        return F.silu(g).abs()

    results, manifest = run_sparse(family, "gate", "--sparse-mode", "gate", "--mlp-topk", "0.25")
    tokenizer = AutoTokenizer.from_pretrained(converted)
    error = max_error(results, prompts, lambda p: hf_masked_logprobs(
        model, name, tokenizer(p)["input_ids"], mlp_k=fraction_count(0.25, ffn), scorer=by_gate))
    assert error <= TOL
    assert manifest["sparsity"]["mode"] == "gate" and manifest["sparsity"]["predictors"] == []
    with pytest.raises(ValueError, match="MLP neurons only"):
        run_sparse(family, "gate_att", "--sparse-mode", "gate", "--att-topk", "2")
