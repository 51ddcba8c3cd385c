"""Transactional in-place edit of a few parameter tensors: theta = theta0 + step * d."""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from . import _backends
from .distributed import is_dtensor
from .errors import NonFiniteError, SlugError, unknown_name


def axpy_reference(out: torch.Tensor, base: torch.Tensor, direction: torch.Tensor, step: float) -> None:
    """The oracle update: out = cast(base + step * direction), computed in float32 (float64
    when `out` or `direction` is float64)."""
    compute = torch.float64 if torch.float64 in (out.dtype, direction.dtype) else torch.float32
    scaled = torch.tensor(step, dtype=compute, device=out.device) * direction.to(compute)
    out.copy_(base.to(compute) + scaled)


def axpy(out: torch.Tensor, base: torch.Tensor, direction: torch.Tensor, step: float,
         backend: str = "auto") -> str:
    """out = cast(base + step * direction) through slug_fast::axpy_into (the kernel of the
    device) or the reference; returns the backend used."""
    if not (out.is_contiguous() and base.is_contiguous() and direction.is_contiguous()) or _wider(out, direction):
        backend = "torch"
    return _backends.run("axpy_into", out.device, backend, axpy_reference, out, base, direction, float(step))[1]


def _wider(out: torch.Tensor, direction: torch.Tensor) -> bool:
    """A float64 direction on a narrower tensor: computed in float64, which only torch does."""
    return direction.dtype == torch.float64 and out.dtype != torch.float64


class LayerEdit:
    """Context manager that edits `directions`' parameters in place, transactionally.

    `model` is an nn.Module, or a mapping name -> tensor for tensors of several modules.
    `step(lam)` sets theta = theta0 + lam * d (in float32 from theta0, float64 for float64
    parameters or directions, cast to the parameter's dtype; never accumulated step over
    step); `commit()` keeps the current value. Leaving the block without commit, by any
    path, restores theta0 bit-exactly. Only the edited tensors are copied, never the model.
    An FSDP2 parameter (a DTensor) is edited in this rank's shard, with a direction that is
    a DTensor sharded the same way or already that shard; both version counters move, so
    caches keyed on either see the edit.

        with LayerEdit(model, {"visual.proj": g}) as edit:
            edit.step(0.5)
            if good(model):
                edit.commit()
    """

    def __init__(self, model: torch.nn.Module | Mapping[str, torch.Tensor],
                 directions: Mapping[str, torch.Tensor], backend: str = "auto"):
        named = dict(model.named_parameters()) if isinstance(model, torch.nn.Module) else dict(model)
        if not directions:
            raise SlugError("LayerEdit needs at least one {parameter name: direction}")
        self._params: dict[str, torch.nn.Parameter] = {}
        self._directions: dict[str, torch.Tensor] = {}
        self._wrappers: list[torch.Tensor] = []  # DTensor parameters whose shards are edited
        for name, d in directions.items():
            if name not in named:
                raise unknown_name("parameter", name, named)
            p = named[name]
            if is_dtensor(p):
                self._wrappers.append(p)
                p = p.to_local()
                d = d.to_local() if is_dtensor(d) else d
            if not isinstance(d, torch.Tensor) or d.shape != p.shape:
                got = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
                raise SlugError(f"direction for {name!r} has shape {got}; the parameter has shape {tuple(p.shape)}")
            if not d.is_floating_point():
                raise SlugError(f"direction for {name!r} has dtype {d.dtype}; it must be floating point")
            if d.device != p.device:
                raise SlugError(f"direction for {name!r} is on {d.device}; the parameter is on {p.device}")
            if not p.is_floating_point():
                raise SlugError(f"parameter {name!r} has dtype {p.dtype}; only floating-point tensors can be edited")
            if not bool(torch.isfinite(d).all()):
                raise NonFiniteError(f"direction for {name!r} holds NaN or Inf")
            self._params[name] = p
            self._directions[name] = d.detach().contiguous()
        self.backend = backend
        self.used_backend: str | None = None
        self._theta0: dict[str, torch.Tensor] | None = None
        self._committed = False
        self.current_step = 0.0

    @property
    def names(self) -> list[str]:
        return list(self._params)

    @property
    def active(self) -> bool:
        """Whether the `with` block is open (theta0 is held)."""
        return self._theta0 is not None

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """name -> the tensor being edited."""
        return dict(self._params)

    @property
    def theta0(self) -> dict[str, torch.Tensor]:
        """name -> the original values (read-only use; only inside the block)."""
        if self._theta0 is None:
            raise SlugError("LayerEdit.theta0 is only held inside its `with` block")
        return dict(self._theta0)

    @property
    def directions(self) -> dict[str, torch.Tensor]:
        """name -> the direction d of theta = theta0 + step * d."""
        return dict(self._directions)

    def __enter__(self) -> "LayerEdit":
        if self._theta0 is not None:
            raise SlugError("this LayerEdit is already active; create a new one for another edit")
        self._theta0 = {n: p.detach().clone(memory_format=torch.contiguous_format)
                        for n, p in self._params.items()}
        self._committed = False
        return self

    def step(self, step: float) -> None:
        """Set every edited tensor to theta0 + step * d; a result that overflows its dtype
        is undone (theta0 restored) and raises NonFiniteError."""
        if self._theta0 is None:
            raise SlugError("LayerEdit.step() must be called inside its `with` block")
        step = float(step)
        if not math.isfinite(step):
            raise SlugError(f"step must be finite, got {step}")
        with torch.no_grad():
            for name, p in self._params.items():
                self.used_backend = axpy(p.data, self._theta0[name], self._directions[name], step, self.backend)
            self._moved()
            for name, p in self._params.items():
                if not bool(torch.isfinite(p).all()):
                    self.restore()
                    raise NonFiniteError(f"step {step:.6g} takes {name!r} out of the range of {p.dtype} (inf or "
                                         f"NaN); theta0 was restored. Use a smaller step")
        self.current_step = step

    def commit(self) -> None:
        """Keep the current values when the block ends."""
        if self._theta0 is None:
            raise SlugError("LayerEdit.commit() must be called inside its `with` block")
        self._committed = True

    def restore(self) -> None:
        """Put theta0 back bit-exactly (the block stays open)."""
        if self._theta0 is None:
            raise SlugError("LayerEdit.restore() must be called inside its `with` block")
        with torch.no_grad():
            for name, p in self._params.items():
                p.data.copy_(self._theta0[name])
            self._moved()  # caches keyed on versions see the restore
        self.current_step = 0.0

    def _moved(self) -> None:
        # the kernels write through data pointers: tell autograd (and version-keyed caches)
        for p in [*self._params.values(), *self._wrappers]:
            torch.autograd.graph.increment_version(p)

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if not self._committed:
                self.restore()
        finally:
            self._theta0 = None
        return False
