"""The memory planner and its units: budgets, balanced groups against brute force, plan choices."""
import gc
import itertools
import random

import pytest
import torch

from slug_fast.errors import SlugError
from slug_fast.memory import (CPU_ALLOCATOR_SLACK, MAX_PREFERRED_PASSES, Budget, Layer, PeakMeter, balanced_groups, format_bytes,
                              minimum_need, parse_budget, plan, transient_bytes)


@pytest.mark.parametrize("text, expected", [
    (4096, Budget(bytes=4096)), ("12GB", Budget(bytes=12 * 10**9)), ("12 GiB", Budget(bytes=12 * 2**30)),
    ("512MiB", Budget(bytes=512 * 2**20)), ("1.5g", Budget(bytes=1_500_000_000)), ("2.5e9", Budget(bytes=2_500_000_000)),
    ("0.5x", Budget(weights=0.5)), ("3X", Budget(weights=3.0)), ("100", Budget(bytes=100)), (None, None),
])
def test_budgets_parse(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text", ["twelve", "12 parsecs", "-1GB", "0", 0, -5, True, float("nan"), "x", "1.2.3GB", [1]])
def test_bad_budgets_are_refused_naming_the_forms(text):
    with pytest.raises(SlugError, match="memory_budget is bytes .* '12GB', '512MiB' or '0.5x'"):
        parse_budget(text)


def test_relative_budget_resolves_against_the_weights():
    assert parse_budget("0.5x").resolve(1000) == 500
    assert parse_budget("2KiB").resolve(10**9) == 2048
    assert str(parse_budget("0.5x")) == "0.5x the weights" and str(parse_budget("1GiB")) == "1.00 GiB"
    assert format_bytes(3 * 2**20) == "3.00 MiB"


def layers(sizes, element=2):
    return [[Layer(f"l{i}", n, element)] for i, n in enumerate(sizes)]


def brute_min_max(sizes, count):
    """The smallest largest-group sum over every cut of `sizes` into `count` consecutive groups."""
    best = None
    for cuts in itertools.combinations(range(1, len(sizes)), count - 1):
        bounds = (0, *cuts, len(sizes))
        worst = max(sum(sizes[a:b]) for a, b in zip(bounds, bounds[1:]))
        best = worst if best is None else min(best, worst)
    return best


def test_balanced_groups_match_brute_force(gen):
    rnd = random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))
    for _ in range(200):
        n = rnd.randint(1, 8)
        numels = [rnd.choice([1, 1, 2, 3, 5, 8, 100]) for _ in range(n)]  # ties and one big layer
        units = layers(numels)
        for count in range(1, n + 1):
            groups = balanced_groups(units, count)
            assert [l for g in groups for l in g] == [u[0] for u in units]  # consecutive, all, in order
            assert len(groups) == count
            state = [sum(l.state_bytes for l in g) for g in groups]
            assert max(state) == brute_min_max([u[0].state_bytes for u in units], count)


def test_plan_takes_full_when_it_fits_else_the_fewest_chunked_passes():
    units = layers([1000] * 8)  # bf16: 2 bytes each, 6 bytes of state per element
    big = transient_bytes([l for u in units for l in u], 50)
    base = dict(activations=400, largest_activation=50, device=torch.device("cpu"))
    slack = CPU_ALLOCATOR_SLACK
    full = plan(units, budget=None, **base)
    assert full.mode == "full" and full.passes == 1 and full.predicted == {
        "gradients": 48_000, "activations": 400, "transient": big, "allocator": slack}
    assert plan(units, budget=full.predicted_peak, **base).mode == "full"
    tight = plan(units, budget=full.predicted_peak - 1, **base)
    assert tight.mode == "chunked" and tight.passes == 2
    assert tight.predicted_peak <= full.predicted_peak - 1
    for budget in range(slack + 20_000, slack + 48_000, 1_000):
        p = plan(units, budget=budget, **base)
        if p.mode == "full":
            continue
        assert p.predicted_peak <= budget
        assert p.keep_bytes >= 2000  # room to keep one front layer's forget gradient at least
        fewer = balanced_groups(units, p.passes - 1) if p.passes > 1 else None
        if fewer is not None:  # one pass fewer would not have fit beside the minimum keep
            worst = max(sum(l.state_bytes for l in g) for g in fewer)
            assert worst + 2000 + 400 + big + slack > budget


def test_plan_refuses_a_budget_below_the_smallest_plan_and_states_it():
    units = layers([1000, 3000, 1000])
    base = dict(activations=10_000, largest_activation=100, device=torch.device("cpu"))
    fixed = 10_000 + transient_bytes([l for u in units for l in u], 100) + CPU_ALLOCATOR_SLACK
    need = minimum_need(units, fixed, cuda=False)
    assert need == fixed + 3000 * 8  # the largest layer's state and its kept forget gradient
    assert plan(units, budget=need, **base).passes == 3
    with pytest.raises(SlugError, match=f"raise memory_budget to at least {need} bytes"):
        plan(units, budget=need - 1, **base)


def test_offload_is_cuda_only_and_preferred_there_over_many_passes():
    units = layers([1000] * 40)
    cpu = dict(activations=100, largest_activation=10, device=torch.device("cpu"))
    with pytest.raises(SlugError, match="offload store keeps gradients in host memory for a model on a GPU"):
        plan(units, budget=None, mode="offload", **cpu)
    assert plan(units, budget=30_000 + CPU_ALLOCATOR_SLACK, **cpu).mode == "chunked"
    gpu = dict(cpu, device=torch.device("cuda"))  # planning only: no GPU needed
    many = plan(units, budget=30_000, **gpu)  # chunked would need more than MAX_PREFERRED_PASSES
    assert many.mode == "offload" and many.host_bytes == 40 * 1000 * 8
    few = plan(units, budget=150_000, **gpu)
    assert few.mode == "chunked" and few.passes <= MAX_PREFERRED_PASSES
    with pytest.raises(SlugError, match="needs memory_budget= or a number of passes"):
        plan(units, budget=None, mode="chunked", **cpu)
    assert plan(units, budget=None, mode="chunked", passes=5, **cpu).passes == 5
    with pytest.raises(SlugError, match="must be one of"):
        plan(units, budget=None, mode="sideways", **cpu)


def test_transient_known_answers():
    pair = [Layer("a", 100, 2), Layer("b", 10, 2)]
    assert transient_bytes(pair, 50) == 100 * (2 + 4) + 2 * 50
    assert transient_bytes(pair, 50, forward_transient=500) == 100 * (2 + 4) + 500
    assert transient_bytes([Layer("c", 7, 4)], 0) == 7 * 8


def test_float32_and_float64_states():
    assert Layer("a", 10, 4).state_bytes == 80 and Layer("a", 10, 8).state_bytes == 160
    assert Layer("a", 10, 2).state_bytes == 60


def test_peak_meter_sees_a_transient_allocation():
    gc.collect()  # earlier tests' garbage, freed inside the meter, would hide the rise (see PeakMeter)
    with PeakMeter("cpu") as meter:
        block = torch.ones(16 << 20, dtype=torch.float32)  # 64 MiB, touched
        del block
        peak = meter.peak()
    assert peak >= 60 << 20, f"{meter.source}: {peak}"
    assert meter.now() < peak


def test_peak_meters_nest_without_losing_the_outer_peak():
    gc.collect()
    with PeakMeter("cpu") as outer:
        block = torch.ones(16 << 20, dtype=torch.float32)  # 64 MiB seen by the outer meter only
        del block
        with PeakMeter("cpu") as inner:  # resets the high-water mark
            small = torch.ones(1 << 20)
            del small
            assert inner.peak() < 60 << 20
        assert outer.peak() >= 60 << 20


def test_a_forced_store_over_the_budget_is_refused():
    units = layers([1000] * 8)
    cpu = dict(activations=400, largest_activation=50, device=torch.device("cpu"))
    full = plan(units, budget=None, **cpu)
    assert plan(units, budget=full.predicted_peak, mode="full", **cpu).mode == "full"
    with pytest.raises(SlugError, match="the full store needs .* over memory_budget .* leave store='auto'"):
        plan(units, budget=full.predicted_peak - 1, mode="full", **cpu)
    two = plan(units, budget=None, mode="chunked", passes=2, **cpu)
    tight = two.predicted_peak - two.predicted["kept"] + 2000 - 1  # a byte short of keeping one layer
    with pytest.raises(SlugError, match="the chunked store in 2 passes needs"):
        plan(units, budget=tight, mode="chunked", passes=2, **cpu)
    assert plan(units, budget=tight, mode="chunked", **cpu).passes == 3
