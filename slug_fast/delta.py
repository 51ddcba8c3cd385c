"""Deltas: the change an unlearning made, as safetensors plus a JSON config (PEFT-like).

A delta directory holds `delta.safetensors` (name -> float32/float64 change, only
the edited tensors) and `delta_config.json` (format, method, layers, step, and per
tensor the parameter's shape, dtype and a SHA-256 of its original bytes).
Applying sets theta = cast(theta + delta); deltas computed on the same original
model compose.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .adapters.base import named_parameters_of
from .edit import LayerEdit
from .errors import DeltaError, unknown_name
from .files import write_atomic, write_json_atomic

FORMAT = "slug_fast.delta"
VERSION = 1
TENSORS_FILE = "delta.safetensors"
CONFIG_FILE = "delta_config.json"


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (row-major), to recognise the base a delta was made on."""
    data = t.detach().contiguous().cpu().flatten().view(torch.uint8).numpy()
    return hashlib.sha256(data.tobytes()).hexdigest()


def tensor_spec(t: torch.Tensor) -> dict:
    """What a delta records of the parameter it changes: shape, dtype, SHA-256 of its bytes."""
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "base_sha256": tensor_sha256(t)}


def save_delta(path: str | os.PathLike, delta: Mapping[str, torch.Tensor],
               specs: Mapping[str, dict], meta: Mapping | None = None) -> Path:
    """Write `delta` (name -> change) to directory `path` atomically, file by file.

    `specs` holds `tensor_spec` of each original parameter; `meta` goes into the config.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DeltaError(f"{path} exists and is not a directory; a delta is saved as a directory")
    path.mkdir(parents=True, exist_ok=True)
    tensors = {n: d.detach().contiguous().cpu() for n, d in delta.items()}
    config = {
        "format": FORMAT,
        "version": VERSION,
        **(dict(meta) if meta else {}),
        "tensors": {n: dict(specs[n]) for n in tensors},
    }
    write_atomic(path / TENSORS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    write_json_atomic(path / CONFIG_FILE, config)
    return path


def load_delta(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(name -> change, config) from a delta directory; never unpickles."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / TENSORS_FILE).is_file():
        raise DeltaError(f"{path} is not a slug_fast delta: expected {TENSORS_FILE} and {CONFIG_FILE} in it")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DeltaError(f"{path / CONFIG_FILE} is not valid JSON ({err})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT or not isinstance(config.get("tensors"), dict):
        raise DeltaError(f"{path / CONFIG_FILE} is not a {FORMAT} config (format must be {FORMAT!r} "
                         "with a 'tensors' table)")
    if config.get("version") != VERSION:
        raise DeltaError(f"{path / CONFIG_FILE} has version {config.get('version')}; "
                         f"this slug_fast reads version {VERSION}")
    try:
        tensors = load_file(path / TENSORS_FILE)
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise DeltaError(f"{path / TENSORS_FILE} is not a readable safetensors file ({err})") from None
    if set(tensors) != set(config["tensors"]):
        raise DeltaError(f"{path}: the tensors in {TENSORS_FILE} ({sorted(tensors)[:3]}) do not match "
                         f"the config ({sorted(config['tensors'])[:3]})")
    return tensors, config


def apply_delta(model, path: str | os.PathLike, verify_base: bool = True) -> list[str]:
    """Add a saved delta to `model`'s parameters in place; returns the names changed.

    `model` is an nn.Module or a diffusers pipeline (names "component.parameter").
    Checks every name, shape and dtype (and, with `verify_base`, that each tensor
    still holds the original bytes the delta was computed on) before changing
    anything; on any error the model is untouched.
    """
    tensors, config = load_delta(path)
    named = named_parameters_of(model)
    directions = {}
    for name, delta in tensors.items():
        if name not in named:
            raise DeltaError(str(unknown_name("delta tensor's parameter", name, named)))
        p, spec = named[name], config["tensors"][name]
        if list(p.shape) != list(spec.get("shape", [])) or delta.shape != p.shape:
            raise DeltaError(f"delta for {name!r} has shape {list(delta.shape)} (config {spec.get('shape')}); "
                             f"the model's parameter has shape {list(p.shape)}")
        if str(p.dtype).removeprefix("torch.") != spec.get("dtype"):
            raise DeltaError(f"delta for {name!r} was made for dtype {spec.get('dtype')}; the model's "
                             f"parameter has dtype {p.dtype}; convert the model first")
        if not bool(torch.isfinite(delta).all()):
            raise DeltaError(f"delta for {name!r} holds NaN or Inf")
        if verify_base and tensor_sha256(p) != spec.get("base_sha256"):
            raise DeltaError(f"parameter {name!r} is not the tensor this delta was computed on (its bytes "
                             "differ: another edit or another checkpoint?); pass verify_base=False to "
                             "apply it anyway")
        directions[name] = delta.to(p.device)
    with LayerEdit(named, directions) as edit:
        edit.step(1.0)
        edit.commit()
    return list(directions)
