"""Step search on problems with a known answer: the criterion holds iff step >= c."""
import math

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


def test_never_reached_reports_the_whole_trace():
    result = search_step(lambda s: (False, {}), 1.0, 10)
    assert not result.reached and result.best is None and len(result.trace) == 10
    assert result.trace[-1].step == 2.0 ** 9


def test_bad_arguments():
    with pytest.raises(SlugError, match="positive finite"):
        search_step(lambda s: True, 0.0)
    with pytest.raises(SlugError, match="max_evals must be at least 1"):
        search_step(lambda s: True, 1.0, 0)
    with pytest.raises(SlugError, match="both must be positive"):
        start_step(0.0, 1.0)
    assert start_step(10.0, 4.0) == pytest.approx(0.25)


def test_criterion_results_are_normalised():
    assert criterion_result(True) == (True, {})
    assert criterion_result((0, {"acc": 1.0})) == (False, {"acc": 1.0})
    ok, metrics = criterion_result((torch.tensor(True), {"acc": torch.tensor(0.5), "v": [1]}))
    assert ok is True and metrics == {"acc": 0.5, "v": [1]} and type(metrics["acc"]) is float
    with pytest.raises(SlugError, match="bool or a"):
        criterion_result("yes")
    with pytest.raises(SlugError, match="tuple of 3"):
        criterion_result((True, {}, 1))
