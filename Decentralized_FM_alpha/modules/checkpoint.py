"""Strict loading of the converted per-layer checkpoint files (SPEC section 3)."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn


class CheckpointError(ValueError):
    """A converted checkpoint file is missing or does not match the module it should fill."""


def read_state_dict(model_path: str | Path, filename: str) -> dict[str, torch.Tensor]:
    path = Path(model_path) / filename
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:  # a truncated file fails as one of these
        reason = str(e).split("\n", 1)[0]
        raise CheckpointError(f"{path}: not a readable checkpoint file (truncated or corrupt): "
                              f"{type(e).__name__}: {reason}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def check_state_dict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Every key present, none extra, every shape equal; otherwise an error naming them."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: missing keys {missing}, unexpected keys {unexpected}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise CheckpointError(f"{source}: key {key!r} has shape {tuple(state[key].shape)}, the model expects {shape}")


def load_strict(module: nn.Module, model_path: str | Path, filename: str) -> None:
    """Fill `module` (possibly built on the meta device) from `model_path/filename`, keeping its dtype."""
    state = read_state_dict(model_path, filename)
    check_state_dict(module, state, str(Path(model_path) / filename))
    module.load_state_dict(state, strict=True, assign=True)


def build_and_load(cls, model_path: str | Path, filename: str, *args, **kwargs) -> nn.Module:
    """`cls(*args, **kwargs)` built on the meta device (no random init to throw away), then filled strictly."""
    with torch.device("meta"):
        module = cls(*args, **kwargs)
    load_strict(module, model_path, filename)
    return module
