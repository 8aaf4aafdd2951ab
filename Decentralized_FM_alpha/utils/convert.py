"""Shared mechanics of the checkpoint converters: find the HF weights, stream them per output file.

A converter (convert_opt_checkpoint.py, convert_llama_checkpoint.py) only says which HF
tensor goes to which key of which converted file (SPEC section 3); this module reads the
shards lazily (safetensors tensor by tensor, .bin through mmap), so a layer at a time is in
memory, and writes the files plus config, tokenizer and a manifest.
"""
from __future__ import annotations

import json
import os
import re
import struct
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from Decentralized_FM_alpha.utils import work
from Decentralized_FM_alpha.utils.manifest import (CONVERSION_MANIFEST, base_manifest, file_sha256, now,
                                                   write_json_atomic)
from Decentralized_FM_alpha.utils.model_source import is_hub_id, require_local_path_or_hub_id

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# One converted file: {key in the file: name of the HF tensor}
FilePlan = dict[str, dict[str, str]]


def resolve_model_dir(model_name: str, auth_token: Optional[str] = None) -> Path:
    """A local directory as is; otherwise a hub id downloaded (weights, config, tokenizer) to the HF cache. A name
    that cannot be a hub id is a local path: when it does not exist, the error says so."""
    path = Path(model_name)
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"--model-name {model_name}: not a directory (a Hugging Face model directory, a hub "
                                 f"id, or a .gguf file)")
    require_local_path_or_hub_id(model_name, "--model-name")
    from huggingface_hub import snapshot_download  # imported here: only the hub path needs it
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return Path(snapshot_download(model_name, token=auth_token or os.environ.get("HF_TOKEN"),
                                      allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"]))
    except (HfHubHTTPError, OSError) as e:  # OSError: offline, no connection, not in the local cache
        raise FileNotFoundError(f"--model-name {model_name}: no such local path, and the hub did not provide it: "
                                f"{type(e).__name__}: {e}") from e


class WeightReader:
    """Reads named tensors from a HF model directory without loading all shards at once."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self.locations = self._index()

    def _index(self) -> dict[str, Path]:
        d = self.model_dir
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (d / index_name).is_file():
                weight_map = json.loads((d / index_name).read_text())["weight_map"]
                return {name: d / shard for name, shard in weight_map.items()}
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (d / single).is_file():
                return {name: d / single for name in self._names_in(d / single)}
        raise FileNotFoundError(f"{d}: no model.safetensors, pytorch_model.bin or their .index.json")

    @staticmethod
    def _names_in(path: Path) -> list[str]:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        return list(torch.load(path, map_location="cpu", weights_only=True, mmap=True).keys())

    def names(self) -> set[str]:
        return set(self.locations)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        missing = [n for n in names if n not in self.locations]
        if missing:
            raise KeyError(f"{self.model_dir}: tensors not found in the checkpoint: {missing}")
        out: dict[str, torch.Tensor] = {}
        by_shard: dict[Path, list[str]] = {}
        for n in names:
            by_shard.setdefault(self.locations[n], []).append(n)
        for shard, shard_names in by_shard.items():
            if shard.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(shard), framework="pt") as f:
                    out.update({n: f.get_tensor(n) for n in shard_names})
            else:
                state = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
                out.update({n: state[n].clone() for n in shard_names})
        return out


class GGUFWeightReader:
    """The tensors of a GGUF file (llama.cpp's format), dequantized to float32 and given their Hugging Face names by
    transformers' GGUF loader, which also undoes llama.cpp's row permutation of a Llama's q_proj / k_proj (a Qwen2
    file has none; its q/k/v biases are tensors like any other).

    GGUF files are single files of small or quantized models: the whole file is read at once. A GGUF tensor that the
    loader does not map to a parameter of the model is an error naming it (the loader itself skips such tensors).
    """

    IGNORABLE = ("rope_freqs.weight",)  # llama.cpp's precomputed llama3 rope factors, rebuilt from the config

    def __init__(self, gguf_path: Path, gguf_tensors: list, config):
        """`gguf_tensors`: the file's tensor table (`read_gguf(gguf_path).tensors`)."""
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        self.model_dir = gguf_path
        self.tensor_types = Counter(t.tensor_type.name for t in gguf_tensors)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        self.tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
        expected = sum(t.name not in self.IGNORABLE for t in gguf_tensors)
        if len(self.tensors) != expected:
            raise ValueError(f"{gguf_path}: {expected - len(self.tensors)} GGUF tensors have no place in the "
                             f"{config.model_type} model: {self._unmapped(model, config, gguf_tensors)[:10]}")

    def _unmapped(self, model, config, gguf_tensors) -> list[str]:
        from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

        mapped = get_gguf_hf_weights_map(model, TensorProcessor(config=config.to_dict()))
        return sorted(t.name for t in gguf_tensors if t.name not in mapped and t.name not in self.IGNORABLE)

    def names(self) -> set[str]:
        return set(self.tensors)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        missing = [n for n in names if n not in self.tensors]
        if missing:
            raise KeyError(f"{self.model_dir}: tensors not found in the GGUF file: {missing}")
        return {n: self.tensors[n] for n in names}

    def facts(self) -> dict:
        """File, sha256 and tensor types of the GGUF file, and a one-line note that later manifests carry."""
        path, types = self.model_dir, self.tensor_types
        quantized = {name: n for name, n in types.items() if name not in ("F32", "F16", "BF16", "F64")}
        bits = sorted({int(m[1]) for name in quantized if (m := re.match(r"I?Q(\d+)", name))})
        listing = ", ".join(f"{name} x{n}" for name, n in types.most_common())
        bit_widths = "/".join(map(str, bits))  # files mix types: a 4-bit Q4_K_M file stores some tensors in 5-8 bits
        note = (f"dequantized to float32 from {bit_widths}-bit GGUF {path.name} ({listing}): quantized weights, not "
                f"the original checkpoint" if quantized else f"read from GGUF {path.name} ({listing}), not quantized")
        return {"file": path.name, "path": str(path.resolve()), "sha256": file_sha256(path),
                "tensor_types": dict(types.most_common()), "quantized_bits": bits, "note": note}


def resolve_gguf_file(model_name: str, gguf_file: Optional[str], auth_token: Optional[str] = None) -> Optional[Path]:
    """The GGUF file to convert: --model-name itself when it is a .gguf path, else --gguf-file (a path, a file in the
    --model-name directory, or a file of the hub repository --model-name); None when neither names one."""
    if gguf_file is None:
        return Path(model_name) if model_name.endswith(".gguf") and Path(model_name).is_file() else None
    for candidate in (Path(gguf_file), Path(model_name) / gguf_file):
        if candidate.is_file():
            return candidate
    if Path(model_name).is_dir() or not is_hub_id(model_name):
        raise FileNotFoundError(f"--gguf-file {gguf_file}: the path does not exist (nor {Path(model_name) / gguf_file})")
    from huggingface_hub import hf_hub_download  # imported here: only the hub path needs it

    return Path(hf_hub_download(model_name, gguf_file, token=auth_token or os.environ.get("HF_TOKEN")))


def read_gguf(path: Path):
    """A GGUF file's metadata and tensor table (gguf.GGUFReader, memory-mapped); a truncated or corrupt file is an
    error naming it (the reader itself fails with a bare struct, reshape or index error)."""
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, struct.error) as e:
        raise ValueError(f"{path}: not a readable GGUF file (truncated or corrupt): {type(e).__name__}: {e}") from e


def write_converted(reader: WeightReader, plan: FilePlan, save_path: Path, dtype: Optional[torch.dtype]) -> None:
    """Write each planned file; every tensor of the checkpoint must be used exactly once or be listed as ignored."""
    save_path.mkdir(parents=True, exist_ok=True)
    for filename, keys in tqdm(plan.items(), desc="converting", unit="file"):
        tensors = reader.read(list(keys.values()))
        state = {}
        for key, name in keys.items():
            t = tensors[name]
            state[key] = (t.to(dtype) if dtype is not None else t).contiguous().clone()
        torch.save(state, save_path / filename)
        work.count(file_bytes=sum(t.numel() * t.element_size() for t in tensors.values())  # read
                   + sum(t.numel() * t.element_size() for t in state.values()))  # written


def check_plan_covers(reader: WeightReader, plan: FilePlan, ignorable: Callable[[str], bool]) -> None:
    used = {name for keys in plan.values() for name in keys.values()}
    unused = sorted(n for n in reader.names() - used if not ignorable(n))
    if unused:
        raise ValueError(f"{reader.model_dir}: checkpoint tensors the conversion does not know: {unused[:10]}"
                         f"{' ...' if len(unused) > 10 else ''}")


def save_config_and_tokenizer(model_dir: Path, save_path: Path, config, gguf_file: Optional[Path] = None) -> None:
    from transformers import AutoTokenizer

    config.save_pretrained(save_path)
    if gguf_file is None:
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(save_path)
    else:  # the tokenizer is rebuilt from the GGUF metadata
        AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).save_pretrained(save_path)


def write_conversion_manifest(save_path: Path, model_name: str, dtype_name: str, plan: FilePlan,
                              gguf: Optional[dict] = None) -> None:
    extra = {"gguf": gguf, "weights_note": gguf["note"]} if gguf else {}
    write_json_atomic(save_path / CONVERSION_MANIFEST,
                      base_manifest(source=model_name, dtype=dtype_name, files=sorted(plan), end_time=now(), **extra))
