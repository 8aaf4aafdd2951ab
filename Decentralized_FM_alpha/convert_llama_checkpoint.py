"""Convert a Hugging Face Llama or Qwen2 checkpoint (hub id or local directory) to DejaVu's per-layer files.

Writes to --save-path: config.json, tokenizer files, pytorch_embs.pt (embed_tokens.weight),
pytorch_{i}.pt (the HF `model.layers.{i}.` keys with the prefix stripped: self_attn.{q,k,v,o}_proj,
mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm; Qwen2 adds self_attn.{q,k,v}_proj.bias) and
pytorch_lm_head.pt (norm.weight, lm_head.weight; the embedding is written as lm_head.weight when the model ties
them, as Llama 3.2 does). Safetensors shards are read tensor by tensor. See SPEC section 3.

GGUF input (llama.cpp's format, e.g. a 4-bit SmolLM2 or Qwen2.5-Coder): --gguf-file NAME.gguf (in the --model-name
directory or hub repository, or any path), or --model-name PATH.gguf. Config, tokenizer and tensors come from the
file; quantized tensors are dequantized to float32 and the conversion manifest records the file, its sha256 and its
tensor types.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import AutoConfig  # noqa: E402

from Decentralized_FM_alpha.modules.hf_llama_module import check_supported  # noqa: E402
from Decentralized_FM_alpha.utils.convert import (DTYPES, FilePlan, GGUFWeightReader, WeightReader,  # noqa: E402
                                                  check_plan_covers, read_gguf, resolve_gguf_file,
                                                  resolve_model_dir, save_config_and_tokenizer, write_converted,
                                                  write_conversion_manifest)
from Decentralized_FM_alpha.utils.model_source import module_family  # noqa: E402


def conversion_plan(names: set[str], num_layers: int, tie_word_embeddings: bool) -> FilePlan:
    p = "model."
    plan: FilePlan = {"pytorch_embs.pt": {"embed_tokens.weight": p + "embed_tokens.weight"}}
    for i in range(num_layers):
        layer = f"{p}layers.{i}."
        plan[f"pytorch_{i}.pt"] = {n[len(layer):]: n for n in sorted(names) if n.startswith(layer)}
    head_source = p + "embed_tokens.weight" if tie_word_embeddings else "lm_head.weight"
    plan["pytorch_lm_head.pt"] = {"norm.weight": p + "norm.weight", "lm_head.weight": head_source}
    return plan


def is_ignorable(name: str) -> bool:
    # Older checkpoints store the rotary table as a buffer; it is recomputed from the config.
    return name.endswith("rotary_emb.inv_freq") or name == "lm_head.weight"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-name", required=True,
                        help="hub id (e.g. meta-llama/Llama-3.2-3B), a local HF model directory, or a .gguf file")
    parser.add_argument("--gguf-file", default=None,
                        help="convert this GGUF file: a path, or a file name in the --model-name directory or hub repo")
    parser.add_argument("--save-path", required=True, help="output directory for the converted files")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast weights to this dtype (default: keep the checkpoint's dtype, bf16 for Llama 3.2; "
                             "float32 for a dequantized GGUF)")
    parser.add_argument("--auth-token", default=None, help="hub token for gated models (default: $HF_TOKEN)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    gguf_file = resolve_gguf_file(args.model_name, args.gguf_file, args.auth_token)
    if gguf_file is None:
        model_dir = resolve_model_dir(args.model_name, args.auth_token)
        config = AutoConfig.from_pretrained(model_dir)
    else:
        model_dir = gguf_file.parent
        gguf_tensors = read_gguf(gguf_file).tensors  # first: a truncated or corrupt file is an error naming it
        config = AutoConfig.from_pretrained(model_dir, gguf_file=gguf_file.name)
    source = gguf_file or model_dir
    if module_family(config.model_type, source) != "llama":
        raise ValueError(f"{source}: a {config.model_type!r} model, which the Llama modules do not run")
    check_supported(config)
    reader = WeightReader(model_dir) if gguf_file is None else GGUFWeightReader(gguf_file, gguf_tensors, config)
    plan = conversion_plan(reader.names(), config.num_hidden_layers, config.tie_word_embeddings)
    check_plan_covers(reader, plan, ignorable=is_ignorable)
    save_path = Path(args.save_path)
    write_converted(reader, plan, save_path, DTYPES.get(args.dtype))
    save_config_and_tokenizer(model_dir, save_path, config, gguf_file)
    gguf = reader.facts() if gguf_file is not None else None
    dtype = args.dtype or ("float32 (dequantized GGUF)" if gguf else "as checkpoint")
    write_conversion_manifest(save_path, args.model_name, dtype, plan, gguf)
    print(f"converted {args.model_name}{f' ({gguf_file.name})' if gguf else ''}: {config.num_hidden_layers} layers "
          f"-> {save_path}" + (f"; {gguf['note']}" if gguf else ""))


if __name__ == "__main__":
    main()
