"""Where a model comes from and which module family runs it: the rules every entry point shares.

A model is named by a local path (a Hugging Face directory, a .gguf file, a converted directory) or a hub repository
id. A name that cannot be a hub id is a local path, so a missing one is an error saying the path does not exist
(not a hub error about repository ids). The module family is the set of module files that computes a config's
architecture: OPT's, or Llama's, which also run Qwen2 (Llama plus biases on q/k/v; SPEC section 3).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

# config.json's model_type -> the module family (hf_<family>_module*.py, convert_<family>_checkpoint.py)
MODULE_FAMILIES = {"opt": "opt", "llama": "llama", "qwen2": "llama"}


def module_family(model_type: str, source: str | os.PathLike) -> str:
    """The module family that runs a `model_type` model; an unknown type is an error naming `source` and the type."""
    if model_type not in MODULE_FAMILIES:
        raise ValueError(f"{source}: model_type {model_type!r} is not supported (known: "
                         f"{', '.join(f'{t} -> {f} modules' for t, f in MODULE_FAMILIES.items())})")
    return MODULE_FAMILIES[model_type]


def family_of_checkpoint(model_dir: str | os.PathLike) -> str:
    """The module family of a local model directory (converted or Hugging Face), from its config.json."""
    config = Path(model_dir) / "config.json"
    if not Path(model_dir).exists():
        raise FileNotFoundError(f"model directory {model_dir}: the path does not exist (no {config})")
    if not config.is_file():
        raise FileNotFoundError(f"{config}: no such file (a converted checkpoint has one, SPEC section 3)")
    return module_family(json.loads(config.read_text())["model_type"], model_dir)


def is_hub_id(name: str) -> bool:
    """Whether `name` has the form of a Hugging Face hub repository id ('name' or 'namespace/name')."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def require_local_path_or_hub_id(name: str, what: str) -> None:
    """A name that exists locally or has a hub id's form passes; any other is a local path that does not exist."""
    if not Path(name).exists() and (name.endswith(".gguf") or not is_hub_id(name)):
        raise FileNotFoundError(f"{what} {name}: the path does not exist (and it is not a hub repository id)")
