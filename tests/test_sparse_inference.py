"""Sparse inference keeps exactly the neurons/heads each mode says, checked against masked HF models."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer

from tests.helpers_models import make_llama, make_opt
from tests.runner_helpers import c4_texts, read_results, run_one_rank, token_logprobs, write_requests

TOL = 1e-4


@pytest.fixture(scope="module", params=["opt", "llama"])
def family(request, tmp_path_factory, tiny_tokenizer_dir):
    tmp = tmp_path_factory.mktemp(f"sparse_{request.param}")
    model, _, converted = (make_opt if request.param == "opt" else make_llama)(tmp, tiny_tokenizer_dir, seed=11)
    prompts = c4_texts(3, max_chars=250)
    req = write_requests(tmp / "req.jsonl", prompts)
    dense = tmp / "dense.jsonl"
    run_one_rank(["--model-name", str(converted), "--model-type", request.param, "--infer-data", str(req),
                  "--output-path", str(dense)])
    return request.param, model, converted, req, prompts, read_results(dense), tmp


def layers_of(model, name):
    return model.model.decoder.layers if name == "opt" else model.model.layers


def dims(model, name):
    c = model.config
    ffn = c.ffn_dim if name == "opt" else c.intermediate_size
    kv = c.num_attention_heads if name == "opt" else c.num_key_value_heads
    return c.hidden_size, ffn, c.num_attention_heads, kv


def run_sparse(family, tag, *flags):
    """A sparse run; every layer sparse unless the flags name --dense-layers (the HF references mask every layer)."""
    name, _, converted, req, _, _, tmp = family
    out = tmp / f"{tag}.jsonl"
    dense_layers = [] if "--dense-layers" in flags else ["--dense-layers", "none"]
    run_one_rank(["--model-name", str(converted), "--model-type", f"{name}-ml-att-sparse", "--infer-data", str(req),
                  "--output-path", str(out), *dense_layers, *flags])
    return read_results(out), json.loads((tmp / f"{tag}.jsonl.manifest.json").read_text())


def write_predictors(directory, model, name, seed, inputs=("lookahead", "lookahead"), layers=None):
    """Random low-rank predictors in the trainer's format (state dict + JSON naming the input)."""
    d, ffn, heads, _ = dims(model, name)
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    predictors = {}
    for layer in layers if layers is not None else range(model.config.num_hidden_layers):
        for block, out, flag in (("mlp", ffn, inputs[0]), ("att", heads, inputs[1])):
            net = nn.Sequential(nn.Linear(d, 16, bias=False), nn.Linear(16, out, bias=False))
            with torch.no_grad():
                for p in net.parameters():
                    p.copy_(torch.randn(p.shape, generator=g))
            torch.save(net.state_dict(), directory / f"{block}_layer{layer}.pt")
            kind, src = ("att_x", layer) if (block, flag) == ("mlp", "lookahead") else \
                ("att_x", max(layer - 1, 0)) if flag == "lookahead" else ("mlp_x" if block == "mlp" else "att_x", layer)
            (directory / f"{block}_layer{layer}.json").write_text(json.dumps(
                {"layer": layer, "input": flag, "input_kind": kind, "input_layer": src, "label": "test"}))
            predictors[(block, layer)] = (net, kind, src)
    return predictors


def hf_masked_logprobs(model, name, ids, mlp_k=None, att_k=None, scorer=None, gqa=False):
    """Log-probs of the HF model with neurons/heads outside the top-k (by `scorer`) zeroed by hooks.

    scorer(block, layer, true_scores, inputs) -> scores; inputs holds each layer's att_x and mlp_x."""
    layers = layers_of(model, name)
    _, _, heads, kv = dims(model, name)
    inputs, hooks = {}, []

    def topk_mask(scores, k):
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(k, -1).indices, True)

    for i, layer in enumerate(layers):
        def block_in(mod, args, kwargs, i=i):
            inputs[("att_x", i)] = (args[0] if args else kwargs["hidden_states"]).reshape(-1, model.config.hidden_size)
        hooks.append(layer.register_forward_pre_hook(block_in, with_kwargs=True))
        mlp_norm = layer.final_layer_norm if name == "opt" else layer.post_attention_layernorm

        def mlp_in(mod, args, i=i):
            inputs[("mlp_x", i)] = args[0].reshape(-1, model.config.hidden_size)
        hooks.append(mlp_norm.register_forward_pre_hook(mlp_in))
        if mlp_k:
            down = layer.fc2 if name == "opt" else layer.mlp.down_proj

            def mask_neurons(mod, args, i=i):
                a = args[0]
                flat = a.reshape(-1, a.shape[-1])
                keep = topk_mask(scorer("mlp", i, flat.abs(), inputs), mlp_k)
                return ((flat * keep).reshape(a.shape),)
            hooks.append(down.register_forward_pre_hook(mask_neurons))
        if att_k:
            out_proj = layer.self_attn.out_proj if name == "opt" else layer.self_attn.o_proj

            def mask_heads(mod, args, i=i):
                a = args[0]
                per_head = a.reshape(a.shape[0] * a.shape[1], heads, -1)
                scores = scorer("att", i, per_head.norm(dim=-1), inputs)
                if gqa:
                    group = heads // kv
                    keep = topk_mask(scores.unflatten(-1, (-1, group)).sum(-1), att_k // group).repeat_interleave(group, -1)
                else:
                    keep = topk_mask(scores, att_k)
                return ((per_head * keep[..., None]).reshape(a.shape),)
            hooks.append(out_proj.register_forward_pre_hook(mask_heads))
    x = torch.tensor([ids])
    try:
        with torch.no_grad():
            lp = torch.log_softmax(model(x).logits[0].double(), -1)
    finally:
        for h in hooks:
            h.remove()
    return lp[:-1].gather(1, x[0, 1:, None])[:, 0]


def max_error(results, prompts, reference) -> float:
    return max((torch.tensor(token_logprobs(r)[1:], dtype=torch.float64) - reference(p)).abs().max().item()
               for r, p in zip(results, prompts))


def test_full_budget_in_every_mode_equals_dense(family):
    name, model, converted, req, prompts, dense, tmp = family
    _, ffn, heads, _ = dims(model, name)
    write_predictors(tmp / "pred_all", model, name, seed=1)
    for mode in ("dense", "oracle", "random", "predictor"):
        results, _ = run_sparse(family, f"full_{mode}", "--sparse-mode", mode, "--mlp-topk", str(ffn),
                                "--att-topk", str(heads), "--predictor-dir", str(tmp / "pred_all"))
        for ours, ref in zip(results, dense):
            assert token_logprobs(ours) == token_logprobs(ref), mode


@pytest.mark.parametrize("block", ["mlp", "att"])
def test_oracle_keeps_exactly_the_k_largest(family, block):
    name, model, converted, _, prompts, dense, _ = family
    _, ffn, heads, _ = dims(model, name)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    k = ffn // 4 if block == "mlp" else heads // 2
    flag = "--mlp-topk" if block == "mlp" else "--att-topk"
    results, manifest = run_sparse(family, f"oracle_{block}", "--sparse-mode", "oracle", flag, str(k))
    oracle = lambda blk, i, true_scores, inputs: true_scores  # noqa: E731
    kwargs = {"mlp_k": k} if block == "mlp" else {"att_k": k}
    error = max_error(results, prompts, lambda p: hf_masked_logprobs(model, name, tokenizer(p)["input_ids"],
                                                                     scorer=oracle, **kwargs))
    assert error <= TOL
    # and it is not dense: the masking changed the log-probs
    assert max(abs(a - b) for r, d in zip(results, dense) for a, b in zip(token_logprobs(r)[1:], token_logprobs(d)[1:])) > 1e-3
    assert manifest["sparsity"]["mode"] == "oracle"


def test_gqa_groups_keep_whole_kv_groups(tmp_path, tiny_tokenizer_dir):
    model, _, converted = make_llama(tmp_path, tiny_tokenizer_dir, seed=12)
    prompts = c4_texts(2, max_chars=200)
    req = write_requests(tmp_path / "req.jsonl", prompts)
    run_one_rank(["--model-name", str(converted), "--model-type", "llama-ml-att-sparse", "--infer-data", str(req),
                  "--output-path", str(tmp_path / "o.jsonl"), "--sparse-mode", "oracle", "--att-topk", "2",
                  "--gqa-groups", "--dense-layers", "none"])
    tokenizer = AutoTokenizer.from_pretrained(converted)
    oracle = lambda blk, i, true_scores, inputs: true_scores  # noqa: E731
    error = max_error(read_results(tmp_path / "o.jsonl"), prompts,
                      lambda p: hf_masked_logprobs(model, "llama", tokenizer(p)["input_ids"], att_k=2, scorer=oracle, gqa=True))
    assert error <= TOL
    with pytest.raises(ValueError, match="not a multiple of 2"):
        run_one_rank(["--model-name", str(converted), "--model-type", "llama-ml-att-sparse", "--infer-data", str(req),
                      "--output-path", str(tmp_path / "o2.jsonl"), "--sparse-mode", "oracle", "--att-topk", "3",
                      "--gqa-groups"])


@pytest.mark.parametrize("inputs", [("lookahead", "lookahead"), ("same", "same")])
def test_predictor_mode_selects_what_the_predictor_ranks_highest(family, inputs):
    name, model, converted, _, prompts, _, tmp = family
    _, ffn, heads, _ = dims(model, name)
    predictors = write_predictors(tmp / f"pred_{inputs[0]}", model, name, seed=3, inputs=inputs)
    results, manifest = run_sparse(family, f"pred_{inputs[0]}", "--sparse-mode", "predictor", "--predictor-dir",
                                   str(tmp / f"pred_{inputs[0]}"), "--mlp-topk", "0.5", "--att-topk", "2",
                                   "--predictor-input", inputs[0])

    def by_predictor(block, i, true_scores, seen):
        net, kind, src = predictors[(block, i)]
        with torch.no_grad():
            return net(seen[(kind, src)].float())

    tokenizer = AutoTokenizer.from_pretrained(converted)
    error = max_error(results, prompts, lambda p: hf_masked_logprobs(
        model, name, tokenizer(p)["input_ids"], mlp_k=round(0.5 * ffn), att_k=2, scorer=by_predictor))
    assert error <= TOL
    assert {(p["block"], p["layer"]) for p in manifest["sparsity"]["predictors"]} == set(predictors)


def test_layer_1_loads_only_its_own_predictor_file(family):
    name, model, _, _, _, _, tmp = family
    directory = tmp / "pred_layers"
    write_predictors(directory, model, name, seed=4, layers=[1, 2])
    for block in ("mlp", "att"):  # files a prefix glob "layer1*" would also match
        for suffix in (".pt", ".json"):
            (directory / f"{block}_layer10{suffix}").write_bytes((directory / f"{block}_layer2{suffix}").read_bytes())
    _, manifest = run_sparse(family, "layer1", "--predictor-dir", str(directory), "--mlp-topk", "0.5",
                             "--att-topk", "2", "--sparse-layers", "1-1")
    assert [p["path"] for p in manifest["sparsity"]["predictors"]] == [str(directory / "mlp_layer1.pt"),
                                                                        str(directory / "att_layer1.pt")]
    (directory / "mlp_layer1.pt").unlink()
    with pytest.raises(FileNotFoundError, match="missing predictor file for mlp layer 1: .*mlp_layer1.pt"):
        run_sparse(family, "layer1_missing", "--predictor-dir", str(directory), "--mlp-topk", "0.5",
                   "--sparse-layers", "1-1")


def test_random_mode_is_reproducible_by_seed(family):
    runs = [run_sparse(family, f"random{i}", "--sparse-mode", "random", "--mlp-topk", "0.3", "--att-topk", "2",
                       "--seed", seed)[0] for i, seed in enumerate(["5", "5", "6"])]
    lps = [[token_logprobs(r) for r in run] for run in runs]
    assert lps[0] == lps[1]
    assert lps[0] != lps[2]


def test_original_environment_variables_are_aliases(family, monkeypatch):
    name, model, _, _, _, _, tmp = family
    _, ffn, heads, _ = dims(model, name)
    write_predictors(tmp / "pred_env", model, name, seed=5)
    flags, flag_manifest = run_sparse(family, "by_flags", "--predictor-dir", str(tmp / "pred_env"), "--mlp-topk", "40",
                                      "--att-topk", "2", "--sparse-layers", "0-1")
    for key, value in {"SPRARSE_PATH": str(tmp / "pred_env"), "TOPK": "40", "LAYER": "2", "ATTN_TOPK_1": "2",
                       "SPARSE_ATT": "1"}.items():
        monkeypatch.setenv(key, value)
    env, env_manifest = run_sparse(family, "by_env")
    assert env_manifest["sparsity"]["mlp_budgets"] == flag_manifest["sparsity"]["mlp_budgets"]
    assert [token_logprobs(r) for r in env] != [] and \
        set(map(int, env_manifest["sparsity"]["att_budgets"])) == {0, 1, 2}


def test_bad_budgets_are_errors(family):
    name, model, _, _, _, _, _ = family
    _, ffn, _, _ = dims(model, name)
    for budget, message in (("0", "budget must be"), ("1.5", "budget must be"), (str(ffn + 1), "exceeds")):
        with pytest.raises(ValueError, match=message):
            run_sparse(family, "bad", "--sparse-mode", "oracle", "--mlp-topk", budget)


def test_sparse_layers_take_a_list_of_layers_and_ranges(family):
    from Decentralized_FM_alpha.utils.selection import parse_layer_list

    assert parse_layer_list("0,7,15-17", 20) == [0, 7, 15, 16, 17]
    for bad, message in (("3-1", "backwards"), ("0,x", "not a layer"), ("0,20", "outside")):
        with pytest.raises(ValueError, match=message):
            parse_layer_list(bad, 20)
    _, manifest = run_sparse(family, "layer_list", "--sparse-mode", "oracle", "--mlp-topk", "0.5",
                             "--sparse-layers", "0,2")
    assert sorted(map(int, manifest["sparsity"]["mlp_budgets"])) == [0, 2]
