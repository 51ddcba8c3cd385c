"""slug_fast's torch operators, their kernels, and which backends can run here.

The C++ extension slug_fast._C (csrc/) declares three operators with torch's dispatcher
(TORCH_LIBRARY) and registers their CPU kernels:

    slug_fast::layer_sums(Tensor[] params, Tensor[] forget, Tensor[]? retain=None) -> Tensor
    slug_fast::axpy_into(Tensor(a!) out, Tensor base, Tensor direction, float step) -> ()
    slug_fast::pareto_front(Tensor alignment, Tensor importance) -> Tensor

This module registers their fake kernels and, where CUDA is present, the Triton kernels of
slug_fast.kernels as the CUDA kernels of layer_sums and axpy_into; the dispatcher then runs
the kernel of the tensors' device. Without the extension it declares the same operators
itself (no CPU kernels then), so the Triton kernels serve CUDA tensors from a source tree
too. A backend name says which kernel ran: "cpp" (CPU), "triton" (CUDA, or CPU tensors
under Triton's interpreter when asked for by name: TRITON_INTERPRET=1, for testing) or
"torch" (the pure-torch reference beside each entry point, used for devices without a
kernel, when asked for, and when a kernel is missing).
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
from collections.abc import Callable

import torch

from .errors import SlugError

log = logging.getLogger("slug_fast")

BACKENDS = ("cpp", "triton", "torch")

# The backend whose kernels the dispatcher runs for tensors of each device type, and the
# operators that have one (pareto_front sorts a few hundred host values: CPU only).
DEVICE_BACKEND = {"cpu": "cpp", "cuda": "triton"}
KERNELS = {"layer_sums": ("cpp", "triton"), "axpy_into": ("cpp", "triton"), "pareto_front": ("cpp",)}

# The operators' signatures, as csrc/bindings.cpp declares them (tests/test_ops.py compares).
SCHEMAS = {
    "layer_sums": "(Tensor[] params, Tensor[] forget, Tensor[]? retain=None) -> Tensor",
    "axpy_into": "(Tensor(a!) out, Tensor base, Tensor direction, float step) -> ()",
    "pareto_front": "(Tensor alignment, Tensor importance) -> Tensor",
}


def _layer_sums_fake(params, forget, retain=None):
    device = params[0].device if params else torch.device("cpu")
    return torch.empty((len(params), 4), dtype=torch.float64, device=device)


def _axpy_into_fake(out, base, direction, step):
    return None


def _pareto_front_fake(alignment, importance):
    count = torch.library.get_ctx().new_dynamic_size()  # how many points are on the front
    return alignment.new_empty((count,), dtype=torch.int64)


_python_library: torch.library.Library | None = None  # the declarations made here, when _C is missing


def _load_extension() -> str | None:
    """Load slug_fast._C (declaring the operators with their CPU kernels), or declare the
    operators here without CPU kernels; register the fake kernels. The reason the extension
    is missing, or None."""
    global _python_library
    reason = None
    try:
        importlib.import_module("slug_fast._C")
    except ImportError as err:
        reason = (f"the C++ extension slug_fast._C is not built ({err}); "
                  "reinstall with `pip install --no-build-isolation .`")
        _python_library = torch.library.Library("slug_fast", "DEF")
        for op, schema in SCHEMAS.items():
            _python_library.define(op + schema)
    for op, fake in (("layer_sums", _layer_sums_fake), ("axpy_into", _axpy_into_fake),
                     ("pareto_front", _pareto_front_fake)):
        torch.library.register_fake(f"slug_fast::{op}", fake, lib=_python_library)
    return reason


def _load_triton() -> str | None:
    """Register the Triton kernels as the operators' CUDA kernels; the reason they are not, or None."""
    if not torch.cuda.is_available():
        return ("no CUDA device: the dispatcher runs the Triton kernels on CUDA tensors only "
                "(slug_fast.kernels runs them on CPU tensors under TRITON_INTERPRET=1, for testing)")
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return f"triton is not installed ({err})"
    try:
        kernels = importlib.import_module("slug_fast.kernels")
    except ImportError as err:
        return f"the Triton kernels failed to import ({err})"
    torch.library.register_kernel("slug_fast::layer_sums", "cuda", kernels.layer_sums, lib=_python_library)
    torch.library.register_kernel("slug_fast::axpy_into", "cuda", kernels.axpy_into, lib=_python_library)
    return None


_reasons: dict[str, str | None] = {"cpp": _load_extension()}
_reasons["triton"] = _load_triton()


def availability() -> dict[str, str | None]:
    """backend -> None if usable here, else the reason it is not."""
    return {"cpp": _reasons["cpp"], "triton": _reasons["triton"], "torch": None}


def kernels_reason() -> str | None:
    """Why slug_fast.kernels cannot be called directly here (None: CUDA is present, or Triton
    interprets them on CPU tensors under TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return f"triton is not installed ({err})"
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors, slowly)"


@functools.lru_cache(maxsize=None)
def _warn_once(op: str, backend: str, reason: str) -> None:
    log.warning("%s: %s backend skipped: %s; using the torch reference", op, backend, reason)


def resolve(op: str, device: torch.device, requested: str = "auto") -> str:
    """The backend that runs slug_fast::`op` on tensors on `device`: "torch" when asked for, for
    devices without a kernel, or (with a warning) when the device's backend is unavailable."""
    if requested not in ("auto",) + BACKENDS:
        raise SlugError(f"{op}: unknown backend {requested!r}; choose 'auto' or one of {BACKENDS}")
    if requested == "torch":
        return "torch"
    served = DEVICE_BACKEND.get(device.type)
    if requested == "auto":
        if served not in KERNELS[op]:
            return "torch"
        if _reasons[served] is not None:
            _warn_once(op, served, _reasons[served])
            return "torch"
        return served
    if requested not in KERNELS[op]:
        raise SlugError(f"{op} has no {requested} kernel (it runs on host values); "
                        f"choose 'auto', 'torch' or one of {KERNELS[op]}")
    if requested == "triton" and device.type == "cpu" and kernels_reason() is None:
        return "triton"  # Triton's interpreter runs the kernels on CPU tensors (TRITON_INTERPRET=1)
    if requested != served:
        wanted = "CUDA" if requested == "triton" else "CPU"
        raise SlugError(f"{op}: the {requested} backend takes {wanted} tensors, got tensors on {device}; "
                        "pass backend='auto' to use the kernel of their device")
    if _reasons[requested] is not None:
        raise SlugError(f"{op}: backend {requested!r} is unavailable: {_reasons[requested]}")
    return requested


def run(op: str, device: torch.device, requested: str, reference: Callable, *args):
    """(slug_fast::`op`(*args) on the backend `resolve` picks, or `reference`(*args), the backend)."""
    backend = resolve(op, device, requested)
    if backend == "torch":
        fn = reference
    elif backend == "triton" and device.type == "cpu":  # the interpreter: the dispatcher would pick cpp
        fn = getattr(importlib.import_module("slug_fast.kernels"), op)
    else:
        fn = getattr(torch.ops.slug_fast, op)
    return fn(*args), backend
