"""Convert a Hugging Face OPT checkpoint (hub id or local directory) to DejaVu's per-layer files.

Writes to --save-path: config.json, tokenizer files, pytorch_embs.pt (embed_tokens.weight,
embed_positions.weight), pytorch_{i}.pt (the HF `model.decoder.layers.{i}.` keys with the prefix
stripped) and pytorch_lm_head.pt (final_layer_norm.*, lm_head.weight). See SPEC section 3.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import AutoConfig  # noqa: E402

from Decentralized_FM_alpha.modules.hf_opt_module import check_supported  # noqa: E402
from Decentralized_FM_alpha.utils.convert import (DTYPES, FilePlan, WeightReader, check_plan_covers,  # noqa: E402
                                                  resolve_model_dir, save_config_and_tokenizer, write_converted,
                                                  write_conversion_manifest)
from Decentralized_FM_alpha.utils.model_source import module_family  # noqa: E402


def decoder_prefix(names: set[str]) -> str:
    """HF OPT checkpoints name tensors `model.decoder.*` or, in older ones, `decoder.*`."""
    for prefix in ("model.decoder.", "decoder."):
        if any(n.startswith(prefix) for n in names):
            return prefix
    raise ValueError("no `model.decoder.` or `decoder.` tensors: is this an OPT checkpoint?")


def conversion_plan(names: set[str], num_layers: int) -> FilePlan:
    p = decoder_prefix(names)
    plan: FilePlan = {"pytorch_embs.pt": {"embed_tokens.weight": p + "embed_tokens.weight",
                                          "embed_positions.weight": p + "embed_positions.weight"}}
    for i in range(num_layers):
        layer = f"{p}layers.{i}."
        plan[f"pytorch_{i}.pt"] = {n[len(layer):]: n for n in sorted(names) if n.startswith(layer)}
    head = {"final_layer_norm.weight": p + "final_layer_norm.weight", "final_layer_norm.bias": p + "final_layer_norm.bias"}
    # OPT ties the output projection to the token embedding; checkpoints often omit lm_head.weight.
    head["lm_head.weight"] = "lm_head.weight" if "lm_head.weight" in names else p + "embed_tokens.weight"
    plan["pytorch_lm_head.pt"] = {k: v for k, v in head.items() if v in names or k == "lm_head.weight"}
    return plan


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-name", required=True, help="hub id (e.g. facebook/opt-125m) or a local HF model directory")
    parser.add_argument("--save-path", required=True, help="output directory for the converted files")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast weights to this dtype (default: keep the checkpoint's dtype)")
    parser.add_argument("--auth-token", default=None, help="hub token (default: $HF_TOKEN)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    model_dir = resolve_model_dir(args.model_name, args.auth_token)
    config = AutoConfig.from_pretrained(model_dir)
    if module_family(config.model_type, model_dir) != "opt":
        raise ValueError(f"{model_dir}: a {config.model_type!r} model, which the OPT modules do not run")
    check_supported(config)
    reader = WeightReader(model_dir)
    plan = conversion_plan(reader.names(), config.num_hidden_layers)
    check_plan_covers(reader, plan, ignorable=lambda n: False)
    save_path = Path(args.save_path)
    write_converted(reader, plan, save_path, DTYPES.get(args.dtype))
    save_config_and_tokenizer(model_dir, save_path, config)
    write_conversion_manifest(save_path, args.model_name, args.dtype or "as checkpoint", plan)
    print(f"converted {args.model_name}: {config.num_hidden_layers} layers -> {save_path}")


if __name__ == "__main__":
    main()
