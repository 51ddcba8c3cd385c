"""Pareto front of layers by (low alignment, high importance), and the layer choice on top."""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import torch

from . import _backends
from .errors import SlugError

# A name rule: a prefix string, a compiled regex (searched), or a predicate on the name.
NameRule = str | re.Pattern | Callable[[str], bool]

# Substrings that make a tensor ineligible by default: SLUG (arXiv 2407.11867) ranks weight layers,
# not biases, norms, embeddings or the logit scale. Families add their own (Adapter.exclude).
DEFAULT_EXCLUDE = ("bias", "logit_scale", "position", "embedding", "norm", "ln_")


def pareto_front(alignment, importance, backend: str = "auto") -> list[int]:
    """Ascending indices that no other index strictly dominates.

    j dominates i iff alignment[j] < alignment[i] and importance[j] > importance[i].
    Ties and duplicates are all kept; a NaN in either value is never on the front.
    Both inputs are 1-D real sequences (lists, tuples, tensors, arrays) of equal length,
    taken as float64 host values. backend: "auto" or "cpp" (the operator
    slug_fast::pareto_front, whose one kernel is C++ on CPU) or "torch" (the reference).
    """
    a = _as_values("alignment", alignment)
    m = _as_values("importance", importance)
    if a.numel() != m.numel():
        raise SlugError(f"alignment has {a.numel()} values but importance has {m.numel()}")
    return _backends.run("pareto_front", a.device, backend, _front_reference, a, m)[0].tolist()


def _as_values(what: str, values) -> torch.Tensor:
    """`values` as a 1-D float64 CPU tensor, or a SlugError saying what was passed."""
    try:
        t = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError) as e:
        raise SlugError(f"{what} must be a 1-D sequence of numbers; got {type(values).__name__} "
                        f"({str(e).splitlines()[0] if str(e) else 'not numeric'})") from None
    if t.dtype == torch.bool or t.is_complex():
        raise SlugError(f"{what} must hold real numbers; got dtype {t.dtype}")
    if t.is_floating_point() and not isinstance(values, torch.Tensor):
        t = torch.as_tensor(values, dtype=torch.float64)  # Python floats are doubles: never via float32
    if t.dim() != 1:
        raise SlugError(f"{what} must be 1-D (one value per layer); got shape {tuple(t.shape)}")
    return t.to(torch.float64).cpu()


def _front_reference(a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Ascending int64 indices of the front. Sort by alignment; i is dominated iff the max
    importance over strictly smaller alignment is > m[i]."""
    keep = ~(a.isnan() | m.isnan())
    idx = keep.nonzero().flatten()
    a, m = a[idx], m[idx]
    order = torch.argsort(a, stable=True)
    a, m, idx = a[order], m[order], idx[order]
    running = torch.cummax(m, dim=0).values
    # position of the first element of each alignment group, then max before it
    first = torch.searchsorted(a, a, side="left")
    before = torch.where(first > 0, running[(first - 1).clamp(min=0)], torch.tensor(-torch.inf, dtype=m.dtype))
    return idx[~(before > m)].sort().values


def matches(rule: NameRule, name: str) -> bool:
    """Whether `name` satisfies a name rule (prefix, regex or predicate)."""
    if isinstance(rule, str):
        return name.startswith(rule)
    if isinstance(rule, re.Pattern):
        return rule.search(name) is not None
    return bool(rule(name))


def is_eligible(name: str, shape: Sequence[int], exclude: Sequence[str] = DEFAULT_EXCLUDE) -> bool:
    """Default eligibility: a tensor with >= 2 dims whose name holds none of `exclude`."""
    lowered = name.lower()
    return len(shape) >= 2 and not any(word in lowered for word in exclude)


def split_towers(names: Sequence[str], towers: Mapping[str, NameRule],
                 allow_empty: bool = False) -> dict[str, list[str]]:
    """tower -> its names (each name goes to the first tower whose rule matches); a tower
    that gets none is an error unless `allow_empty`."""
    out: dict[str, list[str]] = {t: [] for t in towers}
    for name in names:
        for tower, rule in towers.items():
            if matches(rule, name):
                out[tower].append(name)
                break
    empty = [t for t, members in out.items() if not members]
    if empty and not allow_empty:
        raise SlugError(f"tower rule for {empty[0]!r} matches no eligible parameter; "
                        f"eligible names start with: {sorted({n.split('.')[0] for n in names})[:5]}")
    return out


def deepest(candidates: Sequence[str], depth_order: Sequence[str]) -> str:
    """The candidate that comes last in `depth_order` (names from input to output)."""
    position = {n: i for i, n in enumerate(depth_order)}
    return max(candidates, key=lambda n: position.get(n, -1))
