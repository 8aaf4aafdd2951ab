"""Converters are strict and exact; bad request files are errors that say where."""
from __future__ import annotations

import json

import pytest
import torch

from Decentralized_FM_alpha.modules import hf_llama_module, hf_opt_module
from Decentralized_FM_alpha.modules.checkpoint import CheckpointError
from Decentralized_FM_alpha.task_datasets.inference_data import RequestFileError, read_requests
from tests.helpers_models import make_llama, make_opt
from tests.runner_helpers import c4_texts, run_one_rank, write_requests


@pytest.fixture(scope="module")
def opt(tmp_path_factory, tiny_tokenizer_dir):
    return make_opt(tmp_path_factory.mktemp("conv_opt"), tiny_tokenizer_dir, seed=4)


@pytest.fixture(scope="module")
def llama_tied(tmp_path_factory, tiny_tokenizer_dir):
    return make_llama(tmp_path_factory.mktemp("conv_llama"), tiny_tokenizer_dir, seed=5)


def converted_state(path):
    return {f.name: torch.load(f, weights_only=True) for f in sorted(path.glob("pytorch_*.pt"))}


def test_opt_round_trip_every_tensor_equal(opt):
    model, _, converted = opt
    files = converted_state(converted)
    hf = model.state_dict()
    assert set(files) == {"pytorch_embs.pt", "pytorch_lm_head.pt"} | {f"pytorch_{i}.pt" for i in range(3)}
    for key in ("embed_tokens.weight", "embed_positions.weight"):
        assert torch.equal(files["pytorch_embs.pt"][key], hf[f"model.decoder.{key}"])
    for i in range(3):
        layer = {k[len(f"model.decoder.layers.{i}."):]: v for k, v in hf.items() if k.startswith(f"model.decoder.layers.{i}.")}
        assert files[f"pytorch_{i}.pt"].keys() == layer.keys()
        assert all(torch.equal(files[f"pytorch_{i}.pt"][k], v) for k, v in layer.items())
    head = files["pytorch_lm_head.pt"]
    assert torch.equal(head["lm_head.weight"], hf["lm_head.weight"])
    assert torch.equal(head["final_layer_norm.weight"], hf["model.decoder.final_layer_norm.weight"])


@pytest.mark.parametrize("tied", [True, False])
def test_llama_round_trip_tied_and_untied(tmp_path, tiny_tokenizer_dir, tied):
    model, _, converted = make_llama(tmp_path, tiny_tokenizer_dir, seed=6, tie_word_embeddings=tied)
    files, hf = converted_state(converted), model.state_dict()
    if not tied:
        assert not torch.equal(hf["lm_head.weight"], hf["model.embed_tokens.weight"])
    assert torch.equal(files["pytorch_lm_head.pt"]["lm_head.weight"], hf["lm_head.weight"])
    assert torch.equal(files["pytorch_lm_head.pt"]["norm.weight"], hf["model.norm.weight"])
    assert torch.equal(files["pytorch_embs.pt"]["embed_tokens.weight"], hf["model.embed_tokens.weight"])
    for i in range(3):
        prefix = f"model.layers.{i}."
        layer = {k[len(prefix):]: v for k, v in hf.items() if k.startswith(prefix)}
        assert files[f"pytorch_{i}.pt"].keys() == layer.keys()
        assert all(torch.equal(files[f"pytorch_{i}.pt"][k], v) for k, v in layer.items())


def test_dtype_is_kept_unless_asked(tmp_path, tiny_tokenizer_dir):
    from Decentralized_FM_alpha import convert_llama_checkpoint
    model, hf_dir, _ = make_llama(tmp_path, tiny_tokenizer_dir, seed=7)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    (tmp_path / "bf16" / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    (tmp_path / "bf16" / "tokenizer_config.json").write_bytes((hf_dir / "tokenizer_config.json").read_bytes())
    convert_llama_checkpoint.main(["--model-name", str(tmp_path / "bf16"), "--save-path", str(tmp_path / "kept")])
    convert_llama_checkpoint.main(["--model-name", str(tmp_path / "bf16"), "--save-path", str(tmp_path / "f32"),
                                   "--dtype", "fp32"])
    assert torch.load(tmp_path / "kept" / "pytorch_0.pt", weights_only=True)["mlp.up_proj.weight"].dtype == torch.bfloat16
    assert torch.load(tmp_path / "f32" / "pytorch_0.pt", weights_only=True)["mlp.up_proj.weight"].dtype == torch.float32


def corrupt(path, edit):
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_strict_loading_names_file_and_key(tmp_path, family, opt, llama_tied):
    import shutil
    _, _, converted = opt if family == "opt" else llama_tied
    module = hf_opt_module if family == "opt" else hf_llama_module
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(converted)
    work = tmp_path / "m"
    shutil.copytree(converted, work)
    key = "self_attn.q_proj.weight"

    (work / "pytorch_1.pt").unlink()
    with pytest.raises(CheckpointError, match="missing checkpoint file: .*pytorch_1.pt"):
        module.GPTBlock.from_pretrained(str(work), config, 1)

    corrupt(work / "pytorch_0.pt", lambda s: s.pop(key))
    with pytest.raises(CheckpointError, match=f"pytorch_0.pt: missing keys \\['{key}'\\]"):
        module.GPTBlock.from_pretrained(str(work), config, 0)

    shutil.copy(converted / "pytorch_2.pt", work / "pytorch_2.pt")
    corrupt(work / "pytorch_2.pt", lambda s: s.update(extra=torch.zeros(1)))
    with pytest.raises(CheckpointError, match="pytorch_2.pt: .*unexpected keys \\['extra'\\]"):
        module.GPTBlock.from_pretrained(str(work), config, 2)

    corrupt(work / "pytorch_embs.pt", lambda s: s.update({"embed_tokens.weight": s["embed_tokens.weight"][:-1]}))
    with pytest.raises(CheckpointError, match="pytorch_embs.pt: key 'embed_tokens.weight' has shape"):
        module.GPTEmbeddings.from_pretrained(str(work), config)


def test_converter_rejects_unknown_tensors(tmp_path, tiny_tokenizer_dir):
    from safetensors.torch import load_file, save_file
    from Decentralized_FM_alpha import convert_opt_checkpoint
    _, hf_dir, _ = make_opt(tmp_path, tiny_tokenizer_dir, seed=8)
    state = load_file(hf_dir / "model.safetensors")
    state["model.decoder.mystery.weight"] = torch.ones(2)
    save_file(state, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="mystery"):
        convert_opt_checkpoint.main(["--model-name", str(hf_dir), "--save-path", str(tmp_path / "out")])


# ------------------------------------------------------------------ bad input fails before any work
@pytest.mark.parametrize("converter", ["opt", "llama"])
@pytest.mark.parametrize("name", ["nope", "nope.gguf"])
def test_converter_given_a_missing_local_path_says_the_path_does_not_exist(tmp_path, converter, name):
    from Decentralized_FM_alpha import convert_llama_checkpoint, convert_opt_checkpoint
    main = (convert_opt_checkpoint if converter == "opt" else convert_llama_checkpoint).main
    missing = tmp_path / "models" / name
    with pytest.raises(FileNotFoundError, match=f"--model-name {missing}: the path does not exist"):
        main(["--model-name", str(missing), "--save-path", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_llama_converter_given_a_missing_gguf_file_says_the_path_does_not_exist(llama_tied, tmp_path):
    from Decentralized_FM_alpha import convert_llama_checkpoint
    _, hf_dir, _ = llama_tied
    with pytest.raises(FileNotFoundError, match="--gguf-file model.gguf: the path does not exist"):
        convert_llama_checkpoint.main(["--model-name", str(hf_dir), "--gguf-file", "model.gguf",
                                       "--save-path", str(tmp_path / "o")])


def test_runner_given_a_missing_model_directory_says_the_path_does_not_exist(tmp_path):
    req = write_requests(tmp_path / "r.jsonl", c4_texts(1))
    missing = tmp_path / "pretrained_models" / "nope"
    with pytest.raises(FileNotFoundError, match=f"model directory {missing}: the path does not exist"):
        run_one_rank(["--model-name", str(missing), "--model-type", "llama", "--infer-data", str(req),
                      "--output-path", str(tmp_path / "o.jsonl")])


def test_study_given_a_missing_model_path_says_the_path_does_not_exist(tmp_path, capsys):
    from scripts import run_study
    missing = tmp_path / "models" / "nope"
    with pytest.raises(SystemExit):
        run_study.build_parser().parse_args([f"tiny={missing}", "--out-dir", str(tmp_path / "study")])
    assert f"MODEL {missing}: the path does not exist" in capsys.readouterr().err
    assert not (tmp_path / "study").exists()


@pytest.mark.parametrize("cut", [0.5, 0.99])
def test_truncated_layer_checkpoint_is_an_error_naming_the_file(llama_tied, tmp_path, cut):
    import shutil
    from transformers import AutoConfig
    _, _, converted = llama_tied
    work = shutil.copytree(converted, tmp_path / "m")
    data = (work / "pytorch_1.pt").read_bytes()
    (work / "pytorch_1.pt").write_bytes(data[:int(len(data) * cut)])
    with pytest.raises(CheckpointError, match=f"{work / 'pytorch_1.pt'}: not a readable checkpoint file"):
        hf_llama_module.GPTBlock.from_pretrained(str(work), AutoConfig.from_pretrained(work), 1)


# ------------------------------------------------------------------ request files
def test_malformed_line_is_an_error_with_its_line_number(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b"}) + "\n{\"prompt\": oops}\n")
    with pytest.raises(RequestFileError, match=r"r.jsonl:3: malformed JSON"):
        read_requests(path)


def test_line_without_prompt_is_an_error(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    with pytest.raises(RequestFileError, match=r"r.jsonl:2: missing or non-string \"prompt\""):
        read_requests(path)


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("\n\n")
    with pytest.raises(RequestFileError, match="no requests"):
        read_requests(path)


def test_non_utf8_file_is_an_error_with_its_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(json.dumps({"prompt": "fine"}).encode() + b"\n" + b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(RequestFileError, match=r"r.jsonl:2: not valid UTF-8"):
        read_requests(path)


def test_unicode_line_separator_inside_a_prompt_is_kept(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"prompt": "a\u2028b"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_requests(path)[0].prompt == "a\u2028b"


def test_runner_rejects_wrong_model_type(opt, tmp_path):
    _, _, converted = opt
    req = write_requests(tmp_path / "r.jsonl", c4_texts(1))
    with pytest.raises(ValueError, match="holds a 'opt' model, --model-type is llama"):
        run_one_rank(["--model-name", str(converted), "--model-type", "llama", "--infer-data", str(req),
                      "--output-path", str(tmp_path / "o.jsonl")])


def test_collection_refuses_to_store_float16_overflow(opt, tmp_path):
    """Scale one layer's weights so its activations exceed float16's range: an error, not inf rows."""
    import shutil
    _, _, converted = opt
    work = tmp_path / "big"
    shutil.copytree(converted, work)
    corrupt(work / "pytorch_0.pt", lambda s: s["fc1.weight"].mul_(1e6))
    req = write_requests(tmp_path / "r.jsonl", c4_texts(1))
    with pytest.raises(OverflowError, match="mlp_label of layer 0: row 0 is not finite in float16"):
        run_one_rank(["--model-name", str(work), "--model-type", "opt-save", "--infer-data", str(req),
                      "--output-path", str(tmp_path / "o.jsonl"), "--data-path", str(tmp_path / "d")])


def test_nccl_backends_on_the_cpu_are_an_error():
    from Decentralized_FM_alpha.comm.comm_utils import init_comm
    for backend in ("nccl", "cupy_nccl"):
        with pytest.raises(ValueError, match=f"--dist-backend {backend} needs --use-cuda true"):
            init_comm(backend, "tcp://127.0.0.1:1", 0, 2, torch.device("cpu"))
    with pytest.raises(ValueError, match="must be one of"):
        init_comm("mpi", "tcp://127.0.0.1:1", 0, 2, torch.device("cpu"))
