"""Placeholders for the outputs of replayed blocks before the boundary, computed only when read."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_map_only

from ..errors import SlugError
from .values import plain


@dataclass(frozen=True)
class Meta:
    shape: torch.Size
    stride: tuple
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, t: torch.Tensor) -> "Meta":
        return cls(t.shape, t.stride(), t.dtype, t.device)


def out_meta(out):
    """Structure of a block's output: a tensor, or a tuple of tensors / None led by a tensor."""
    if isinstance(out, torch.Tensor) and plain(out):
        return Meta.of(out)
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor) and \
            all(o is None or (isinstance(o, torch.Tensor) and plain(o)) for o in out):
        return tuple(None if o is None else Meta.of(o) for o in out)
    return None


def hidden(out):
    """The tensor a chained loop hands to the next block."""
    return out if isinstance(out, torch.Tensor) else out[0]


class Skipped(torch.Tensor):
    """The output of a replayed block before the boundary: metadata only, no storage.

    Passing it to the next replayed block costs nothing; any other use (an op, a
    hook, printing) first computes the true value from the recorded block-0
    inputs, so code that reads inside the replayed blocks still gets exact values.
    """

    @staticmethod
    def __new__(cls, meta: Meta, source: "Materializer", block: int, index: int | None):
        t = torch.Tensor._make_wrapper_subclass(cls, meta.shape, strides=meta.stride, dtype=meta.dtype,
                                                device=meta.device, requires_grad=False)
        t._slug_at = (source, block, index)
        return t

    def _slug_real(self) -> torch.Tensor:
        source, block, index = self._slug_at
        return source.value(block, index)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        args, kwargs = tree_map_only(Skipped, lambda t: t._slug_real(), (args, kwargs))
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # only code that bypasses torch_function
        args, kwargs = tree_map_only(Skipped, lambda t: t._slug_real(), (args, kwargs or {}))
        return func(*args, **kwargs)


_METADATA = {torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__, torch.Tensor.device.__get__,
             torch.Tensor.ndim.__get__, torch.Tensor.requires_grad.__get__, torch.Tensor.is_cuda.__get__,
             torch.Tensor.size, torch.Tensor.dim, torch.Tensor.stride, torch.Tensor.numel}


def placeholders(meta, source: "Materializer", block: int):
    """Block `block`'s output of the replayed call as placeholders of the recorded structure."""
    if isinstance(meta, Meta):
        return Skipped(meta, source, block, None)
    return tuple(None if m is None else Skipped(m, source, block, i) for i, m in enumerate(meta))


class Materializer:
    """Recomputes the replayed blocks' true outputs of one call on demand (rarely needed)."""

    def __init__(self, stack, record):
        self.stack, self.record = stack, record
        self.outputs: list = []

    def value(self, block: int, index: int | None) -> torch.Tensor:
        rec = self.record
        if not rec.intact():
            raise SlugError(f"a replayed output of {self.stack.name}.{block} was read after its recorded inputs "
                            "were changed in place; it can no longer be computed")
        mode = torch.inference_mode() if rec.inference else torch.no_grad()
        with mode:
            while len(self.outputs) <= block:
                j = len(self.outputs)
                args = rec.args if j == 0 else (hidden(self.outputs[-1]), *rec.args[1:])
                self.outputs.append(self.stack.originals[j](*args, **rec.kwargs))
                self.stack.materialized += 1
        out = self.outputs[block]
        return out if index is None else out[index]
