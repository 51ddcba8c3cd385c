"""Which compute backends can run here, and why not when they cannot.

Every hot operation (layer statistics, the single-layer update, the Pareto front)
has one entry point that dispatches to Triton (CUDA tensors), the C++ extension
(CPU tensors) or the pure-torch reference, and says which one it used.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

log = logging.getLogger("slug_fast")

BACKENDS = ("cpp", "triton", "torch")


@functools.lru_cache(maxsize=None)
def _load(backend: str):
    """(module or None, reason it is unavailable or None)."""
    if backend == "cpp":
        try:
            return importlib.import_module("slug_fast._C"), None
        except ImportError as err:
            return None, (f"the C++ extension slug_fast._C is not built ({err}); "
                          "reinstall with `pip install --no-build-isolation .`")
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as err:
            return None, f"triton is not installed ({err})"
        try:
            return importlib.import_module("slug_fast.kernels"), None
        except ImportError as err:
            return None, f"the Triton kernels failed to import ({err})"
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


def triton_interpreted() -> bool:
    """True when Triton runs kernels on CPU tensors through its interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def module(backend: str):
    """The module implementing `backend` ("cpp" or "triton"), or raise saying why not."""
    mod, reason = _load(backend)
    if mod is None:
        raise RuntimeError(f"backend {backend!r} is unavailable: {reason}")
    return mod


def availability() -> dict[str, str | None]:
    """backend -> None if usable here, else the reason it is not."""
    out: dict[str, str | None] = {"torch": None}
    out["cpp"] = _load("cpp")[1]
    reason = _load("triton")[1]
    if reason is None and not torch.cuda.is_available() and not triton_interpreted():
        reason = "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors, slowly)"
    out["triton"] = reason
    return out


@functools.lru_cache(maxsize=None)
def _warn_once(op: str, backend: str, reason: str) -> None:
    log.warning("%s: %s backend skipped: %s; using the torch reference", op, backend, reason)


def choose(op: str, device: torch.device, requested: str = "auto") -> str:
    """Name of the backend that runs `op` on tensors living on `device`."""
    if requested not in ("auto",) + BACKENDS:
        raise ValueError(f"{op}: unknown backend {requested!r}; choose 'auto' or one of {BACKENDS}")
    if requested == "torch":
        return "torch"
    if requested == "cpp":
        if device.type != "cpu":
            raise ValueError(f"{op}: the cpp backend takes CPU tensors, got tensors on {device}")
        module("cpp")
        return "cpp"
    if requested == "triton":
        if device.type != "cuda" and not triton_interpreted():
            raise ValueError(f"{op}: the triton backend takes CUDA tensors (or CPU tensors with "
                             f"TRITON_INTERPRET=1), got tensors on {device}")
        module("triton")
        return "triton"
    wanted = {"cpu": "cpp", "cuda": "triton"}.get(device.type)
    if wanted is None:
        return "torch"
    reason = _load(wanted)[1]
    if reason is not None:
        _warn_once(op, wanted, reason)
        return "torch"
    return wanted
