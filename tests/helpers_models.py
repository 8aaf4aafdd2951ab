"""Tiny random OPT, Llama and Qwen2 models in Hugging Face format, converted to SPEC section 3 files."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import (AutoTokenizer, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from Decentralized_FM_alpha import convert_llama_checkpoint, convert_opt_checkpoint

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def tiny_opt_config(vocab_size: int, **overrides) -> OPTConfig:
    kwargs = dict(vocab_size=vocab_size, hidden_size=32, ffn_dim=96, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=512, word_embed_proj_dim=32, pad_token_id=1, bos_token_id=2,
                  eos_token_id=2, dropout=0.0, attention_dropout=0.0)
    kwargs.update(overrides)
    return OPTConfig(**kwargs)


def tiny_llama_config(vocab_size: int, **overrides) -> LlamaConfig:
    kwargs = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=80, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                  tie_word_embeddings=True, pad_token_id=1, bos_token_id=2, eos_token_id=2,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 32}, rope_theta=500000.0)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_qwen2_config(vocab_size: int, **overrides) -> Qwen2Config:
    """Qwen2's differences from the tiny Llama: q/k/v biases (by architecture), its own rope theta, untied output."""
    kwargs = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=80, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, pad_token_id=1, bos_token_id=2, eos_token_id=2, rope_theta=1000000.0)
    kwargs.update(overrides)
    return Qwen2Config(**kwargs)


def llama_3b_config(num_hidden_layers: int) -> LlamaConfig:
    """The real Llama-3.2-3B architecture (tests/fixtures/llama-3.2-3b-config.json), depth cut."""
    values = json.loads((FIXTURES / "llama-3.2-3b-config.json").read_text())
    values["num_hidden_layers"] = num_hidden_layers
    return LlamaConfig(**values)


def randomize_norms(model: torch.nn.Module, seed: int) -> None:
    """Norm weights start at 1 and biases at 0; perturb them so a wrong mapping cannot pass unseen."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def randomize_biases(model: torch.nn.Module, seed: int) -> None:
    """Biases start at 0: give them values, so that a bias lost or misplaced changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


def save_hf_model(model, tokenizer_dir: Path, out_dir: Path) -> Path:
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return out_dir


def make_opt(tmp: Path, tokenizer_dir: Path, seed: int = 0, **overrides):
    """(HF model, HF dir, converted dir) for a tiny random OPT."""
    torch.manual_seed(seed)
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    model = OPTForCausalLM(tiny_opt_config(vocab, **overrides)).eval()
    randomize_norms(model, seed)
    hf_dir = save_hf_model(model, tokenizer_dir, tmp / "hf_opt")
    converted = tmp / "opt_converted"
    convert_opt_checkpoint.main(["--model-name", str(hf_dir), "--save-path", str(converted)])
    return model, hf_dir, converted


def make_llama(tmp: Path, tokenizer_dir: Path, seed: int = 0, config: LlamaConfig | None = None, **overrides):
    """(HF model, HF dir, converted dir) for a tiny random Llama (or the given config)."""
    torch.manual_seed(seed)
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    model = LlamaForCausalLM(config or tiny_llama_config(vocab, **overrides)).eval()
    randomize_norms(model, seed)
    hf_dir = save_hf_model(model, tokenizer_dir, tmp / "hf_llama")
    converted = tmp / "llama_converted"
    convert_llama_checkpoint.main(["--model-name", str(hf_dir), "--save-path", str(converted)])
    return model, hf_dir, converted


def make_qwen2(tmp: Path, tokenizer_dir: Path, seed: int = 0, **overrides):
    """(HF model, HF dir, converted dir) for a tiny random Qwen2 (q/k/v biases, GQA, untied output)."""
    torch.manual_seed(seed)
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    model = Qwen2ForCausalLM(tiny_qwen2_config(vocab, **overrides)).eval()
    randomize_norms(model, seed)
    randomize_biases(model, seed)
    hf_dir = save_hf_model(model, tokenizer_dir, tmp / "hf_qwen2")
    converted = tmp / "qwen2_converted"
    convert_llama_checkpoint.main(["--model-name", str(hf_dir), "--save-path", str(converted)])
    return model, hf_dir, converted


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def hf_reference_activations(model, family: str, ids: list[int]) -> dict[str, list[torch.Tensor]]:
    """att_x, att_label, mlp_x, mlp_label (and mlp_gate) of every layer, (T, width), from HF hooks."""
    layers = model.model.decoder.layers if family == "opt" else model.model.layers
    found: dict[str, list] = {k: [None] * len(layers) for k in ("att_x", "att_label", "mlp_x", "mlp_label", "mlp_gate")}
    hooks = []
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        out_proj = attn.out_proj if family == "opt" else attn.o_proj
        heads = attn.num_heads if hasattr(attn, "num_heads") else model.config.num_attention_heads

        def block_in(mod, args, kwargs, i=i):
            found["att_x"][i] = (args[0] if args else kwargs["hidden_states"])[0].clone()

        def head_norms(mod, args, i=i, heads=heads):
            x = args[0][0]
            found["att_label"][i] = x.view(x.shape[0], heads, -1).norm(dim=-1)

        hooks.append(layer.register_forward_pre_hook(block_in, with_kwargs=True))
        hooks.append(out_proj.register_forward_pre_hook(head_norms))
        if family == "opt":
            def mlp_in(mod, args, i=i):
                x = args[0]  # HF OPT flattens (B, T, d) to (B*T, d) before final_layer_norm
                found["mlp_x"][i] = x.reshape(-1, x.shape[-1]).clone()

            def mlp_act(mod, args, i=i):
                found["mlp_label"][i] = args[0].reshape(-1, args[0].shape[-1]).clone()  # input of fc2

            hooks.append(layer.final_layer_norm.register_forward_pre_hook(mlp_in))
            hooks.append(layer.fc2.register_forward_pre_hook(mlp_act))
        else:
            def mlp_in(mod, args, i=i):
                found["mlp_x"][i] = args[0][0].clone()

            def mlp_act(mod, args, i=i):
                found["mlp_label"][i] = args[0][0].clone()

            def gate(mod, args, out, i=i):
                found["mlp_gate"][i] = out[0].clone()

            hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(mlp_in))
            hooks.append(layer.mlp.down_proj.register_forward_pre_hook(mlp_act))
            hooks.append(layer.mlp.gate_proj.register_forward_hook(gate))
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return found
