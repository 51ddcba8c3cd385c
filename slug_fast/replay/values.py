"""What a recorded call is compared by: bit-identical tensors, equal plain values, the same numerics."""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

# float attributes that make a module random in training mode (dropout rates and the like)
_STOCHASTIC_ATTRS = ("dropout", "attention_dropout", "dropout_p", "attn_drop", "drop_prob", "drop_rate",
                     "drop_path", "prob", "p")


def numerics_key() -> tuple:
    """The global settings that can change what a block computes from the same inputs."""
    key = [torch.is_inference_mode_enabled(), torch.get_float32_matmul_precision(),
           torch.backends.mha.get_fastpath_enabled(), torch.are_deterministic_algorithms_enabled()]
    for dev in ("cpu", "cuda"):
        try:
            key += [torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)]
        except (RuntimeError, TypeError):  # pragma: no cover - older torch
            key.append(None)
    cuda = torch.backends.cuda
    key += [cuda.matmul.allow_tf32, cuda.matmul.allow_fp16_reduced_precision_reduction,
            cuda.matmul.allow_bf16_reduced_precision_reduction, torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.enabled, torch.backends.cudnn.deterministic,
            cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled()]
    return tuple(key)


def caching_allowed() -> bool:
    """Replay only where no graph is recorded and nothing traces or compiles."""
    if torch.is_grad_enabled() or torch._C._get_tracing_state() is not None:
        return False
    return not torch.compiler.is_compiling()


def plain(t) -> bool:
    return type(t) in (torch.Tensor, nn.Parameter) and t.layout == torch.strided


def replayable(obj) -> bool:
    """Arguments whose value we can record and compare: tensors, None, scalars, tuples of those."""
    if isinstance(obj, torch.Tensor):
        return plain(obj)
    if obj is None or isinstance(obj, (bool, int, float, complex, str, torch.dtype, torch.device)):
        return True
    if isinstance(obj, (tuple, list)):
        return all(replayable(o) for o in obj)
    return False


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and a.stride() == b.stride()
            and a.is_conj() == b.is_conj() and a.is_neg() == b.is_neg() and bool(torch.equal(a, b)))


def same(a, b) -> bool:
    """Bit-identical values (tensors) or equal plain values; unknown objects never match."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and plain(a) and plain(b)):
            return False
        return a is b or same_tensor(a, b)
    if a is None or b is None:
        return a is b
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, (bool, int, complex, str, torch.dtype, torch.device)):
        return a == b
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return False


def tensors(obj) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from tensors(o)


def nbytes(obj) -> int:
    return sum(t.numel() * t.element_size() for t in tensors(obj))


def stochastic(m: nn.Module) -> bool:
    """A module whose output or state depends on more than its input in its current mode."""
    if not m.training:
        return False
    if isinstance(m, nn.modules.dropout._DropoutNd):
        return m.p > 0
    if isinstance(m, nn.modules.batchnorm._NormBase):
        return bool(m.track_running_stats)
    return any(isinstance(v, float) and v > 0 for v in (m.__dict__.get(a) for a in _STOCHASTIC_ATTRS))
