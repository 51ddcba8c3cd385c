"""Per-layer statistics: norms, importance and forget/retain gradient alignment."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from operator import attrgetter

import torch

from . import _backends
from .errors import NonFiniteError, SlugError, unknown_name


@dataclass(frozen=True)
class LayerStats:
    """Statistics of each layer, all 1-D float64 tensors in the order of `names`.

    importance = ||g_f|| / ||theta|| (0 where either norm is 0);
    alignment = |<g_f, g_r>| / (||g_f|| ||g_r||) (0 where either norm is 0).
    """

    names: list[str]
    param_norm: torch.Tensor
    forget_norm: torch.Tensor
    retain_norm: torch.Tensor
    dot: torch.Tensor
    importance: torch.Tensor
    alignment: torch.Tensor
    backend: str

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise unknown_name("layer", name, self.names) from None

    def rows(self) -> list[dict]:
        """One JSON-ready dict per layer."""
        cols = ("param_norm", "forget_norm", "retain_norm", "dot", "importance", "alignment")
        values = {c: getattr(self, c).tolist() for c in cols}
        return [{"name": n, **{c: values[c][i] for c in cols}} for i, n in enumerate(self.names)]


def sums_reference(params, forget, retain=None) -> torch.Tensor:
    """The oracle backend: float64 per-layer sums, one layer at a time."""
    rows = []
    for i, (p, f) in enumerate(zip(params, forget)):
        p64, f64 = p.double(), f.double()
        r64 = retain[i].double() if retain is not None else torch.zeros_like(f64)
        rows.append(torch.stack([p64.square().sum(), f64.square().sum(),
                                 r64.square().sum(), (f64 * r64).sum()]))
    if not rows:
        return torch.zeros((0, 4), dtype=torch.float64)
    return torch.stack(rows).cpu()


_SUPPORTED = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# Declared accuracy of each backend's sums (sum x^2, and sum f*r relative to sum |f*r|)
# against exact float64 sums of the same input values, for 16/32-bit inputs at any
# magnitude: cpp and triton widen each element to float64 before multiplying (exact
# products, float64 sums in another order), torch is the float64 reference.
SUM_RTOL = {"cpp": 1e-5, "triton": 1e-5, "torch": 1e-12}


def _check_layer(name: str, p: torch.Tensor, g: torch.Tensor, which: str) -> None:
    if not isinstance(g, torch.Tensor):
        raise SlugError(f"{which} gradient of {name!r} is {type(g).__name__}, not a tensor")
    if g.shape != p.shape:
        raise SlugError(f"{which} gradient of {name!r} has shape {tuple(g.shape)}; "
                        f"the parameter has shape {tuple(p.shape)}")
    if g.dtype != p.dtype:
        raise SlugError(f"{which} gradient of {name!r} has dtype {g.dtype}; "
                        f"it must match the parameter's dtype {p.dtype}")
    if g.device != p.device:
        raise SlugError(f"{which} gradient of {name!r} is on {g.device}; "
                        f"the parameter is on {p.device}")


def _consistent(p_list: list, f_list: list, r_list: list | None) -> bool:
    """Every tensor a tensor of a supported dtype, each layer's gradients of its parameter's
    shape and dtype, all on one device: one C-level pass per property (the per-layer loop of
    _explain_inconsistency runs only to name what is wrong)."""
    groups = [f_list] if r_list is None else [f_list, r_list]
    try:
        dtypes, shapes, devices = (list(map(attrgetter(a), p_list)) for a in ("dtype", "shape", "device"))
        if not all(d in _SUPPORTED for d in dict.fromkeys(dtypes)) or len(set(devices)) > 1:
            return False
        return all(list(map(attrgetter("shape"), g)) == shapes and list(map(attrgetter("dtype"), g)) == dtypes
                   and list(map(attrgetter("device"), g)) == devices for g in groups)
    except AttributeError:  # not a tensor
        return False


def _explain_inconsistency(names: list[str], p_list: list, f_list: list, r_list: list | None) -> None:
    """Raise the SlugError naming the first layer that _consistent refused, and why."""
    for i, (name, p) in enumerate(zip(names, p_list)):
        if p.dtype not in _SUPPORTED:
            raise SlugError(f"parameter {name!r} has dtype {p.dtype}; "
                            "layer_stats takes float32, float64, bfloat16 or float16")
        _check_layer(name, p, f_list[i], "forget")
        if r_list is not None:
            _check_layer(name, p, r_list[i], "retain")
    devices = sorted({str(p.device) for p in p_list})
    raise SlugError(f"layer_stats takes tensors on one device, got {devices}")


def layer_stats(params: Mapping[str, torch.Tensor], forget_grads: Mapping[str, torch.Tensor],
                retain_grads: Mapping[str, torch.Tensor] | None = None,
                backend: str = "auto") -> LayerStats:
    """Statistics of every layer in `forget_grads` (in its order), in one fused pass.

    `params` maps names to parameter tensors (it may hold more names than the
    gradients); `retain_grads`, when given, must hold the same names as
    `forget_grads`. All tensors of a layer share shape, dtype and device.
    backend: "auto" (the operator slug_fast::layer_sums, whose kernel the dispatcher picks by
    device: C++ for CPU tensors, Triton for CUDA tensors), "cpp" or "triton" (that kernel, or
    a SlugError if the tensors are on another device; Triton takes CPU tensors under
    TRITON_INTERPRET=1) or "torch" (the float64 reference).
    """
    sums, chosen = layer_sums(params, forget_grads, retain_grads, backend)
    return stats_from_sums(list(forget_grads), sums, chosen)


def layer_sums(params: Mapping[str, torch.Tensor], forget_grads: Mapping[str, torch.Tensor],
               retain_grads: Mapping[str, torch.Tensor] | None = None,
               backend: str = "auto") -> tuple[torch.Tensor, str]:
    """([n_layers, 4] float64 CPU table of sum theta^2, sum g_f^2, sum g_r^2, sum g_f*g_r
    per layer of `forget_grads`, the backend used); checked finite. Per-layer sums do not
    depend on the other layers in the call, so a table built group by group equals one
    built at once."""
    names = list(forget_grads)
    if retain_grads is not None:
        missing = [n for n in names if n not in retain_grads]
        extra = [n for n in retain_grads if n not in forget_grads]
        if missing or extra:
            raise SlugError("forget and retain gradients must cover the same layers; "
                            f"missing from retain: {missing[:3]}, only in retain: {extra[:3]}")
    try:
        p_list = [params[n] for n in names]
    except KeyError:
        raise unknown_name("parameter", next(n for n in names if n not in params), params) from None
    f_list = [forget_grads[n] for n in names]
    retain = [retain_grads[n] for n in names] if retain_grads is not None else None
    if not _consistent(p_list, f_list, retain):
        _explain_inconsistency(names, p_list, f_list, retain)
    device = p_list[0].device if p_list else torch.device("cpu")
    # contiguous() returns the tensor itself when it already is; no detach: the kernels run
    # under no_grad and build no graph
    p_list = [p.contiguous() for p in p_list]
    f_list = [f.contiguous() for f in f_list]
    retain = [r.contiguous() for r in retain] if retain is not None else None

    if not names:  # no tensor for the dispatcher to dispatch on
        return torch.zeros((0, 4), dtype=torch.float64), _backends.resolve("layer_sums", device, backend)
    with torch.no_grad():
        sums, chosen = _backends.run("layer_sums", device, backend, sums_reference, p_list, f_list, retain)
    sums = sums.cpu()
    _check_finite(names, sums)
    return sums, chosen


def stats_from_sums(names: list[str], sums: torch.Tensor, backend: str) -> LayerStats:
    """LayerStats of `names` from their [n, 4] table of sums (see layer_sums)."""
    param_norm, forget_norm, retain_norm = sums[:, 0].sqrt(), sums[:, 1].sqrt(), sums[:, 2].sqrt()
    dot = sums[:, 3]
    usable = (param_norm > 0) & (forget_norm > 0)
    importance = torch.where(usable, forget_norm / torch.where(usable, param_norm, 1.0), 0.0)
    denom = forget_norm * retain_norm
    alignment = torch.where(denom > 0, (dot.abs() / torch.where(denom > 0, denom, 1.0)).clamp(max=1.0), 0.0)
    return LayerStats(list(names), param_norm, forget_norm, retain_norm, dot, importance, alignment, backend)


def _check_finite(names: list[str], sums: torch.Tensor) -> None:
    bad = ~torch.isfinite(sums)
    if not bool(bad.any()):
        return
    which = ("parameter", "forget gradient", "retain gradient", "retain gradient")
    problems = []
    for i, c in bad.nonzero().tolist():
        if c == 3 and bad[i, 1:3].any():
            continue
        problems.append(f"{which[c]} of {names[i]!r}")
    raise NonFiniteError("NaN or Inf in " + ", ".join(dict.fromkeys(problems)) +
                         "; check the losses and the model's weights (gradients must be finite)")
