"""Step-size search of SLUG (arXiv 2407.11867): double until the criterion holds, then bisect."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import SlugError

# evaluate(step) -> (criterion satisfied, metrics). The facade builds it from a
# LayerEdit and the user's criterion; a cheaper evaluator (one that caches what the
# edit cannot change) can replace it without touching the search.
Evaluator = Callable[[float], "tuple[bool, dict]"]


@dataclass
class Evaluation:
    """One evaluation of the search: the step tried and what the criterion said."""

    step: float
    satisfied: bool
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class SearchResult:
    """The smallest step that met the criterion (None if none did), and every evaluation."""

    step: float | None
    start: float
    trace: list[Evaluation]

    @property
    def reached(self) -> bool:
        return self.step is not None

    @property
    def best(self) -> Evaluation | None:
        """The evaluation at the chosen step."""
        hits = [e for e in self.trace if e.satisfied and e.step == self.step]
        return hits[0] if hits else None


def criterion_result(out) -> tuple[bool, dict]:
    """Normalise a criterion's return value: a bool (Python, numpy, or a one-element bool
    tensor), or a (bool, metrics dict) pair. Anything else (None from a forgotten return,
    a float such as an accuracy, NaN) is refused: read as a verdict it would edit the model."""
    if isinstance(out, tuple):
        if len(out) != 2 or not isinstance(out[1], dict):
            raise SlugError("a criterion returns a bool or a (bool, metrics dict) pair, "
                            f"got a tuple of {len(out)} items")
        # 0-d tensors and numpy scalars become plain numbers, so reports stay JSON
        metrics = {k: v.item() if hasattr(v, "item") and getattr(v, "ndim", 1) == 0 else v
                   for k, v in out[1].items()}
        return _verdict(out[0]), metrics
    return _verdict(out), {}


def _verdict(value) -> bool:
    if isinstance(value, bool):
        return value
    if type(value).__module__ == "numpy" and getattr(value, "dtype", None) is not None \
            and value.dtype.kind == "b" and value.size == 1:  # numpy's bool (a scalar or a one-element array)
        return bool(value)
    if hasattr(value, "dtype") and hasattr(value, "numel") and str(value.dtype) == "torch.bool" \
            and value.numel() == 1:
        return bool(value.item())
    if value is None:
        what = "None (a missing return?)"
    elif hasattr(value, "shape"):
        what = f"a {type(value).__name__} of dtype {value.dtype} and shape {tuple(value.shape)}"
    else:
        what = f"{type(value).__name__} {value!r}"[:80]
    raise SlugError(f"a criterion says whether the concept is forgotten: it returns a bool (or a one-element bool "
                    f"tensor), or a (bool, metrics dict) pair; it returned {what}")


def start_step(param_norm: float, forget_norm: float, fraction: float = 0.1) -> float:
    """The step whose update norm is `fraction` of the layer's norm: fraction * ||theta|| / ||g_f||."""
    if not (forget_norm > 0 and param_norm > 0):
        raise SlugError(f"cannot start a step search on a layer with ||theta|| = {param_norm} and "
                        f"||g_f|| = {forget_norm}; both must be positive")
    return fraction * param_norm / forget_norm


def check_max_evals(max_evals) -> int:
    if isinstance(max_evals, bool) or not isinstance(max_evals, int) or max_evals < 1:
        raise SlugError(f"max_evals must be a positive integer, got {max_evals!r}")
    return max_evals


def search_step(evaluate: Evaluator, start: float, max_evals: int = 10, fails_at: float = 0.0) -> SearchResult:
    """Smallest step in the search path where `evaluate` says the criterion holds.

    lo = fails_at (a step already known to fail, 0 by default), hi = inf; at each step: if
    satisfied, hi = step, else lo = step; the next step doubles while hi is inf and bisects
    (lo + hi) / 2 after. At most `max_evals` evaluations.
    """
    if not (math.isfinite(start) and start > 0):
        raise SlugError(f"the start step must be a positive finite number, got {start}")
    if not (math.isfinite(fails_at) and 0 <= fails_at < start):
        raise SlugError(f"fails_at must be a step below the start step {start}, got {fails_at}")
    check_max_evals(max_evals)
    lo, hi, step = float(fails_at), math.inf, float(start)
    trace: list[Evaluation] = []
    for _ in range(max_evals):
        t0 = time.perf_counter()
        satisfied, metrics = evaluate(step)
        trace.append(Evaluation(step, bool(satisfied), metrics, time.perf_counter() - t0))
        if satisfied:
            hi = step
        else:
            lo = step
        step = 2 * step if math.isinf(hi) else (lo + hi) / 2
        # bisection has converged once hi - lo is within 4 ulps: the midpoint is then a bound or
        # within float rounding of one, and every further evaluation would repeat a step judged
        if not math.isfinite(step) or (math.isfinite(hi) and hi - lo <= 4 * math.ulp(hi)):
            break
    return SearchResult(None if math.isinf(hi) else hi, float(start), trace)
