"""Step search on problems with a known answer: the criterion holds iff step >= c."""
import math
import re

import pytest
import torch

from slug_fast.errors import SlugError
from slug_fast.search import criterion_result, search_step, start_step


def threshold(c):
    calls = []

    def evaluate(step):
        calls.append(step)
        return step >= c, {"margin": step - c}
    return evaluate, calls


def expected_gap(start, c, max_evals):
    """Largest possible (result - c) after the doubling phase and the bisections left."""
    doublings = max(0, math.ceil(math.log2(c / start))) if c > start else 0
    lo = start * 2 ** (doublings - 1) if doublings else 0.0
    hi = start * 2 ** doublings
    bisections = max_evals - (doublings + 1)
    return (hi - lo) / 2 ** max(bisections, 0)


@pytest.mark.parametrize("c", [1e-6, 0.013, 0.1, 0.37, 1.0, 5.5, 100.0])
@pytest.mark.parametrize("start", [0.1, 1.0])
@pytest.mark.parametrize("max_evals", [1, 3, 10, 25])
def test_smallest_satisfying_step_within_budget(c, start, max_evals):
    evaluate, calls = threshold(c)
    result = search_step(evaluate, start, max_evals)
    assert len(calls) == len(result.trace) <= max_evals
    hits = [s for s in calls if s >= c]
    if not hits:
        assert not result.reached and result.step is None
        assert c > start * 2 ** (max_evals - 1)  # only unreachable if doubling never got there
        return
    assert result.reached and result.step == min(hits)  # the smallest satisfying step tried
    assert result.step >= c
    assert result.step - c <= expected_gap(start, c, max_evals) * (1 + 1e-12)
    assert result.best.step == result.step and result.best.metrics["margin"] == result.step - c
    assert [e.step for e in result.trace] == calls and all(e.seconds >= 0 for e in result.trace)


def test_follows_the_published_schedule():
    evaluate, calls = threshold(0.3)
    search_step(evaluate, 0.1, 6)
    assert calls == pytest.approx([0.1, 0.2, 0.4, 0.3, 0.25, 0.275])


def test_a_step_known_to_fail_bounds_the_bisection_from_below():
    """fails_at = 0.2 (known to fail): from 0.4 (holds) it bisects towards 0.3 within (0.2, 0.4),
    never trying the known step or below it."""
    evaluate, calls = threshold(0.3)
    result = search_step(evaluate, 0.4, 4, fails_at=0.2)
    assert calls == pytest.approx([0.4, 0.3, 0.25, 0.275])
    assert result.step == pytest.approx(0.3) and min(calls) > 0.2
    with pytest.raises(SlugError, match="fails_at must be a step below the start step 0.4, got 0.4"):
        search_step(evaluate, 0.4, fails_at=0.4)


def test_never_reached_reports_the_whole_trace():
    result = search_step(lambda s: (False, {}), 1.0, 10)
    assert not result.reached and result.best is None and len(result.trace) == 10
    assert result.trace[-1].step == 2.0 ** 9


def test_bad_arguments():
    with pytest.raises(SlugError, match="positive finite"):
        search_step(lambda s: True, 0.0)
    with pytest.raises(SlugError, match="max_evals must be a positive integer, got 0"):
        search_step(lambda s: True, 1.0, 0)
    for param_norm, forget_norm in ((0.0, 1.0), (1.0, 0.0), (-1.0, 1.0), (1.0, -1.0), (float("nan"), 1.0)):
        with pytest.raises(SlugError, match="both must be positive"):
            start_step(param_norm, forget_norm)
    assert start_step(10.0, 4.0) == pytest.approx(0.25)
    assert start_step(0.5, 0.25) == pytest.approx(0.2)  # norms below 1 are fine
    assert start_step(3.0, 0.5, fraction=0.5) == pytest.approx(3.0)


def test_the_default_budget_is_ten_evaluations_each_timed():
    import time

    def never(step):
        time.sleep(0.002)
        return False, {}
    result = search_step(never, 1.0)
    assert len(result.trace) == 10 and all(0.002 <= e.seconds < 60 for e in result.trace)
    assert result.start == 1.0 and type(result.start) is float


@pytest.mark.parametrize("c, start, fails_at", [(1 / 3, 0.25, 0.0), (0.7, 0.5, 0.0), (0.3001, 0.3, 0.1),
                                                (5.0, 1.1, 1.1 - 1.1 * 2 ** -20), (0.9, 0.7, 0.7 - 1.15 * 2 ** -30)])
def test_bisection_stops_exactly_when_the_bracket_is_four_ulps_wide(c, start, fails_at):
    """The search ends on the first evaluation that leaves hi - lo <= 4 ulp(hi), not one later."""
    evaluate, calls = threshold(c)
    search_step(evaluate, start, max_evals=400, fails_at=fails_at)

    def bracket(steps):
        hi = min(s for s in steps if s >= c)
        return hi, hi - max([fails_at] + [s for s in steps if s < c])
    hi, width = bracket(calls)
    assert width <= 4 * math.ulp(hi)
    hi, width = bracket(calls[:-1])
    assert width > 4 * math.ulp(hi)


def test_criterion_results_are_normalised():
    import numpy as np

    assert criterion_result(True) == (True, {})
    assert criterion_result((False, {"acc": 1.0})) == (False, {"acc": 1.0})
    assert criterion_result(np.float64(0.0) == 0) == (True, {})  # numpy's bool
    assert criterion_result(torch.tensor([False])) == (False, {})
    ok, metrics = criterion_result((torch.tensor(True), {"acc": torch.tensor(0.5), "v": [1]}))
    assert ok is True and metrics == {"acc": 0.5, "v": [1]} and type(metrics["acc"]) is float

    class Scalarish:  # has .item() but no .ndim: kept as it is
        def item(self):
            raise AssertionError("item() called on an object without ndim")
    keep, vector = Scalarish(), torch.tensor([0.25, 0.5])
    _, metrics = criterion_result((True, {"n": np.float32(0.5), "vec": vector, "obj": keep, "arr": np.array([1, 2])}))
    assert type(metrics["n"]) is float and metrics["n"] == 0.5
    assert metrics["vec"] is vector and metrics["obj"] is keep and metrics["arr"].tolist() == [1, 2]
    with pytest.raises(SlugError, match="tuple of 3"):
        criterion_result((True, {}, 1))
    # what would silently edit (or silently never edit) the model is refused, naming what came back
    for value, named in ((None, "None (a missing return?)"), (float("nan"), "float nan"), (0.93, "float 0.93"),
                         (0, "int 0"), ("yes", "str 'yes'"),
                         (torch.tensor([True, False]), "dtype torch.bool and shape (2,)"),
                         (torch.tensor(1.0), "dtype torch.float32 and shape ()"),
                         (np.ndindex(1), "ndindex <numpy.")):  # a numpy object without a dtype
        for wrapped in (value, (value, {})):
            with pytest.raises(SlugError, match=re.escape(f"it returned {'a Tensor of ' if 'dtype' in named else ''}"
                                                          f"{named}")):
                criterion_result(wrapped)
    with pytest.raises(SlugError) as err:  # a long value is quoted to 80 characters
        criterion_result("x" * 200)
    assert str(err.value).endswith("it returned str '" + "x" * 75)


def test_bisection_stops_once_it_has_converged():
    """A huge budget ends when the midpoint is a bound already judged, never re-judging a step."""
    evaluate, calls = threshold(1.0 / 3.0)
    res = search_step(evaluate, 0.25, max_evals=400)
    assert len(calls) == len(set(calls)) < 80  # about 2 doublings + 53 bisections of a double
    assert res.step >= 1.0 / 3.0 and res.step - 1.0 / 3.0 <= 4 * math.ulp(res.step)


@pytest.mark.parametrize("bad", [2.5, 0, -1, True, "10", None])
def test_max_evals_must_be_a_positive_integer(bad):
    with pytest.raises(SlugError, match=re.escape(f"max_evals must be a positive integer, got {bad!r}")):
        search_step(lambda s: (True, {}), 1.0, bad)
