"""pytest-benchmark suite for SLUG's phases on the demo task (the shipped digits mini-CLIP).

    pytest bench/bench_phases.py --benchmark-enable [--benchmark-columns=median,iqr,rounds]

Phases: the gradient pass (forget + retain), layer statistics (every backend usable here),
the Pareto front (C++ vs the torch reference, 10^5 points), and one step-search
evaluation (an edit plus the demo's criterion). Compare medians within one run.
"""
import pytest
import torch

import slug_fast
from slug_fast import digits
from slug_fast.demo import demo_task
from slug_fast.stores import compute_gradients


@pytest.fixture(scope="module")
def task():
    return demo_task("seven")


@pytest.fixture(scope="module")
def grads(task):
    return compute_gradients(task.model, task.forget, task.retain, slug_fast.clip_forget_loss,
                             slug_fast.clip_retain_loss, progress=False)


def test_gradient_pass(benchmark, task):
    benchmark(compute_gradients, task.model, task.forget, task.retain, slug_fast.clip_forget_loss,
              slug_fast.clip_retain_loss, progress=False)


@pytest.mark.parametrize("backend", [b for b, reason in slug_fast.backends().items() if reason is None])
def test_layer_stats(benchmark, task, grads, backend):
    named = dict(task.model.named_parameters())
    params = {n: named[n] for n in grads.names}
    benchmark(slug_fast.layer_stats, params, grads.forget, grads.retain, backend=backend)


@pytest.mark.parametrize("backend", [b for b in ("cpp", "torch") if slug_fast.backends()[b] is None])
def test_pareto_front(benchmark, backend):
    gen = torch.Generator().manual_seed(0)
    a, m = torch.rand(100_000, generator=gen, dtype=torch.float64), torch.rand(100_000, generator=gen,
                                                                              dtype=torch.float64)
    benchmark(slug_fast.pareto_front, a, m, backend=backend)


def test_one_search_evaluation(benchmark, task, grads):
    name = "visual.transformer.resblocks.1.attn.out_proj.weight"
    with slug_fast.LayerEdit(task.model, {name: grads.forget[name]}) as edit:
        def evaluate():
            edit.step(8.7)
            return task.criterion(task.model)
        benchmark(evaluate)
    assert digits.DIGIT_NAMES[task.label] == "seven"
