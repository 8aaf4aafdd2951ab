"""Qwen2 runs through the Llama modules: a tiny random Qwen2 (biases on q/k/v, grouped-query attention, untied
output, its own rope theta) against Hugging Face `Qwen2ForCausalLM` in float32, at world sizes 1 and 2."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from Decentralized_FM_alpha import convert_llama_checkpoint
from Decentralized_FM_alpha.modules import hf_llama_module
from Decentralized_FM_alpha.modules.checkpoint import CheckpointError
from Decentralized_FM_alpha.utils.activation_store import ActivationStore
from tests.helpers_models import hf_reference_activations, make_qwen2
from tests.runner_helpers import (c4_texts, hf_token_logprobs, read_results, run_one_rank, run_ranks,
                                  token_logprobs, write_requests)

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

TOL = 1e-5
KINDS = ("att_x", "att_label", "mlp_x", "mlp_label", "mlp_gate")


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory, tiny_tokenizer_dir):
    """(HF model, converted dir, tokenizer of the converted dir, prompts, request file, work dir)."""
    tmp = tmp_path_factory.mktemp("qwen2")
    model, _, converted = make_qwen2(tmp, tiny_tokenizer_dir, seed=12)
    prompts = c4_texts(4, max_chars=300)
    return model, converted, AutoTokenizer.from_pretrained(converted), prompts, write_requests(tmp / "req.jsonl",
                                                                                                 prompts), tmp


def max_logprob_error(model, tokenizer, prompts, results) -> float:
    worst = 0.0
    for prompt, result in zip(prompts, results):
        ours = torch.tensor(token_logprobs(result)[1:], dtype=torch.float64)
        worst = max(worst, (ours - hf_token_logprobs(model, tokenizer(prompt)["input_ids"])).abs().max().item())
    return worst


def assert_float16_of(stored: np.ndarray, reference: torch.Tensor, tol: float, what: str) -> None:
    """`stored` (float16) is a float32 value within `tol` of `reference`, rounded to float16: within half a float16
    step of `reference` plus `tol`."""
    ref = reference.float().numpy()
    half_step = np.spacing(np.abs(ref).astype(np.float16)).astype(np.float32) / 2
    excess = np.abs(stored.astype(np.float32) - ref) - half_step
    assert excess.max() <= tol, f"{what}: off by {excess.max():.2e} beyond float16 rounding"


def test_converted_layer_holds_q_k_v_biases_and_no_o_bias(qwen2):
    model, converted, *_ = qwen2
    layer = torch.load(converted / "pytorch_1.pt", weights_only=True)
    assert {k for k in layer if k.endswith(".bias")} == {f"self_attn.{p}_proj.bias" for p in "qkv"}
    for key, value in layer.items():
        assert torch.equal(value, model.state_dict()[f"model.layers.1.{key}"]), key
    head = torch.load(converted / "pytorch_lm_head.pt", weights_only=True)
    assert torch.equal(head["lm_head.weight"], model.lm_head.weight)  # untied: the output's own matrix
    assert not torch.equal(head["lm_head.weight"], model.model.embed_tokens.weight)


def test_echo_logprobs_equal_hf_qwen2_world_size_1(qwen2):
    model, converted, tokenizer, prompts, req, tmp = qwen2
    out = tmp / "ws1.jsonl"
    run_one_rank(["--model-name", str(converted), "--model-type", "llama", "--infer-data", str(req),
                  "--output-path", str(out), "--token-micro-batch-size", "3"])
    error = max_logprob_error(model, tokenizer, prompts, read_results(out))
    print(f"qwen2 world size 1: max |d logprob| vs HF = {error:.2e}")
    assert error <= TOL


def test_echo_logprobs_equal_hf_qwen2_world_size_2_gloo(qwen2):
    model, converted, tokenizer, prompts, req, tmp = qwen2
    out = tmp / "ws2.jsonl"
    run_ranks(["--model-name", str(converted), "--model-type", "llama", "--infer-data", str(req),
               "--output-path", str(out), "--num-layers", "2"], world_size=2)
    error = max_logprob_error(model, tokenizer, prompts, read_results(out))
    print(f"qwen2 world size 2 (gloo): max |d logprob| vs HF = {error:.2e}")
    assert error <= TOL


def test_greedy_generation_equals_hf_generate_qwen2(qwen2):
    """The KV cache path: keys and values cached with their biases applied."""
    model, converted, tokenizer, _, _, tmp = qwen2
    prompts = c4_texts(2, max_chars=120)
    out = tmp / "gen.jsonl"
    run_one_rank(["--model-name", str(converted), "--model-type", "llama", "--output-path", str(out),
                  "--infer-data", str(write_requests(tmp / "gen_req.jsonl", prompts, max_tokens=12, echo=False))])
    for prompt, result in zip(prompts, read_results(out)):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            hf = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=1)
        assert result["result"]["choices"][0]["text"] == tokenizer.decode(hf[0, ids.shape[1]:])


@pytest.mark.parametrize("world_size", [1, 2])
def test_every_collected_array_equals_hf_qwen2_hooks(qwen2, world_size):
    model, converted, tokenizer, prompts, req, tmp = qwen2
    data = tmp / f"data_ws{world_size}"
    args = ["--model-name", str(converted), "--model-type", "llama-save", "--infer-data", str(req), "--output-path",
            str(tmp / f"collect_ws{world_size}.jsonl"), "--data-path", str(data), "--collect-mlp-gate",
            "--token-micro-batch-size", "2"]
    if world_size == 1:
        run_one_rank(args)
    else:
        run_ranks(args + ["--num-layers", "2"], world_size=2)
    store = ActivationStore(data)
    assert sorted(store.kinds) == sorted(KINDS) and store.num_layers == 3
    row = 0
    for doc, prompt in enumerate(prompts):
        ids = tokenizer(prompt)["input_ids"]
        reference = hf_reference_activations(model, "llama", ids)
        for layer in range(store.num_layers):
            for kind in KINDS:
                stored = np.asarray(store.open(kind, layer)[row:row + len(ids)])
                assert_float16_of(stored, reference[kind][layer], TOL, f"{kind} layer {layer} doc {doc}")
        row += len(ids)
    assert row == store.rows


def test_sparse_model_type_in_dense_mode_equals_dense_qwen2(qwen2):
    _, converted, _, _, req, tmp = qwen2
    outs = {}
    for model_type, flags in (("llama", []), ("llama-ml-att-sparse", ["--sparse-mode", "dense"])):
        outs[model_type] = tmp / f"{model_type}.jsonl"
        run_one_rank(["--model-name", str(converted), "--model-type", model_type, "--infer-data", str(req),
                      "--output-path", str(outs[model_type]), *flags])
    for dense, sparse in zip(read_results(outs["llama"]), read_results(outs["llama-ml-att-sparse"])):
        assert token_logprobs(sparse) == token_logprobs(dense)


def test_missing_or_unexpected_bias_key_is_an_error_naming_it(qwen2, tmp_path):
    import shutil
    _, converted, *_ = qwen2
    work = shutil.copytree(converted, tmp_path / "m")
    config = AutoConfig.from_pretrained(converted)
    state = torch.load(work / "pytorch_0.pt", weights_only=True)
    state.pop("self_attn.k_proj.bias")
    torch.save(state, work / "pytorch_0.pt")
    with pytest.raises(CheckpointError, match=r"pytorch_0.pt: missing keys \['self_attn.k_proj.bias'\]"):
        hf_llama_module.GPTBlock.from_pretrained(str(work), config, 0)
    state = torch.load(work / "pytorch_1.pt", weights_only=True)
    state["self_attn.o_proj.bias"] = torch.zeros(config.hidden_size)
    torch.save(state, work / "pytorch_1.pt")
    with pytest.raises(CheckpointError, match=r"pytorch_1.pt: .*unexpected keys \['self_attn.o_proj.bias'\]"):
        hf_llama_module.GPTBlock.from_pretrained(str(work), config, 1)


@pytest.mark.parametrize("setting, message", [
    ({"use_sliding_window": True, "sliding_window": 64}, "use_sliding_window=True"),
    ({"layer_types": ["full_attention", "sliding_attention", "full_attention"]}, "sliding_attention"),
])
def test_sliding_window_settings_are_an_error_naming_them(qwen2, tmp_path, setting, message):
    _, converted, *_ = qwen2
    values = json.loads((converted / "config.json").read_text())
    values.update(setting)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(values))
    with pytest.raises(NotImplementedError, match=message):
        convert_llama_checkpoint.main(["--model-name", str(hf_dir), "--save-path", str(tmp_path / "out")])
