"""Model weights: safetensors files with a JSON card; safe loading of user files.

Pickle files are never unpickled freely: ``.pt/.pth/.bin`` go through
``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fadrm.errors import WeightsError
from fadrm.io import read_json, sha256_file, write_json

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def save_weights(model: nn.Module, path: Path, card: dict[str, Any]) -> dict[str, Any]:
    """Save ``model``'s state dict as safetensors and a ``<name>.json`` card beside it."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"arch": str(card.get("arch", ""))})
    card = {**card, "file": Path(path).name, "sha256": sha256_file(path)}
    write_json(Path(path).with_suffix(".json"), card)
    return card


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path), device="cpu")
        elif path.suffix in PICKLE_SUFFIXES:
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise WeightsError(f"{path}: unsupported weights format (use .safetensors, or {PICKLE_SUFFIXES})")
    except (SafetensorError, RuntimeError, OSError, ValueError, pickle.UnpicklingError) as exc:
        text = str(exc)
        if "Weights only load failed" in text:  # torch's own advice (weights_only=False) would run the pickle
            found = [line.strip() for line in text.splitlines() if "Unsupported" in line or "global" in line.lower()]
            why = found[0] if found else "it holds Python objects besides tensors"
            raise WeightsError(
                f"{path}: cannot load weights safely: the file is a pickle that would run code "
                f"({why}); fadrm never unpickles such files — save the model's state_dict as "
                ".safetensors"
            ) from None
        raise WeightsError(f"{path}: cannot load weights safely ({text.splitlines()[0] if text else type(exc).__name__})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    """Load a state dict into ``model`` strictly, with an error that names the mismatches."""
    state = read_state_dict(path)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise WeightsError(f"{path} does not fit the model: {str(exc).splitlines()[-1].strip()}") from None
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"{path} does not fit the model: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]} (check the architecture and resolution)"
        )
    return model


def read_card(path: Path) -> dict[str, Any]:
    return read_json(Path(path).with_suffix(".json"))
