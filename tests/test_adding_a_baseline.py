"""README "Adding a baseline": its code block, run as written on a tiny model, against a plain training loop."""
import copy
import itertools
import re
from pathlib import Path

import pytest
import torch

import slug_fast
from slug_fast import baselines
from slug_fast.adapters import GenericAdapter
from slug_fast.baselines import TrainingSpec, add_baseline
from slug_fast.errors import SlugError

README = Path(__file__).resolve().parents[1] / "README.md"
EPOCHS = 10  # the training baselines' default budget


def readme_block() -> str:
    text = README.read_text(encoding="utf-8")
    found = re.search(r"<!--\s*baseline-example\s*-->\s*\n```python\n(.*?)\n```", text, re.S)
    if found is None:
        pytest.fail("README.md has no ```python block right after '<!-- baseline-example -->'")
    return found.group(1)


def tiny_task():
    gen = torch.Generator().manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / 2)
    batches = [(torch.randn(6, 4, generator=gen), torch.randn(6, 1, generator=gen)) for _ in range(5)]
    forget, retain = batches[:2], batches[2:]

    def loss(model, batch):
        x, y = batch
        return (model(x) - y).square().mean()

    with torch.no_grad():
        start = sum(loss(module, b).item() for b in forget)

    def criterion(model):
        with torch.no_grad():
            forgotten = sum(loss(model, b).item() for b in forget)
            kept = sum(loss(model, b).item() for b in retain)
        return forgotten >= 1.5 * start, {"forget_loss": forgotten, "utility": -kept}

    return module, forget, retain, loss, criterion


def plain_run(module, forget, retain, loss, criterion, lr, retain_weight):
    """The README's step, by hand: Adam on retain_weight * retain loss - forget loss, one forget
    batch per step with the retain batches cycling alongside, the criterion after every step."""
    work = copy.deepcopy(module)
    opt = torch.optim.Adam(work.parameters(), lr=lr)
    retain_stream = itertools.cycle(retain)
    steps = 0
    for _ in range(EPOCHS):
        for batch in forget:
            total = -1.0 * loss(work, batch)
            total = total + retain_weight * loss(work, next(retain_stream))
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            steps += 1
            done, metrics = criterion(work)
            if done:
                return work, steps, metrics
    return work, steps, None


@pytest.fixture
def fresh_tables(monkeypatch):
    """add_baseline writes into baselines.METHODS and DEFAULT_GRIDS: copies, put back after the test."""
    monkeypatch.setattr(baselines, "METHODS", dict(baselines.METHODS))
    monkeypatch.setattr(baselines, "DEFAULT_GRIDS", dict(baselines.DEFAULT_GRIDS))


def test_the_readme_baseline_runs_through_the_harness(fresh_tables, tmp_path, monkeypatch):
    module, forget, retain, loss, criterion = tiny_task()
    original = copy.deepcopy(module)
    monkeypatch.chdir(tmp_path)  # the block saves to a relative path
    namespace = {"model": GenericAdapter(module, loss, loss), "forget_batches": forget, "retain_batches": retain,
                 "criterion": criterion}
    exec(compile(readme_block(), "README.md <!-- baseline-example -->", "exec"), namespace)
    result = namespace["result"]

    assert isinstance(baselines.METHODS["ga-light"], TrainingSpec) and "ga-light" in baselines.DEFAULT_GRIDS
    grid = [{"lr": lr, "retain_weight": w} for lr in (1e-3, 1e-2) for w in (0.1, 0.3)]
    assert result.method == "ga-light" and [s.hyper for s in result.settings] == grid
    runs = [plain_run(original, forget, retain, loss, criterion, s["lr"], s["retain_weight"]) for s in grid]
    for record, (_, steps, metrics) in zip(result.settings, runs):
        assert record.reached == (metrics is not None) and record.steps == steps, record.hyper
        if metrics is not None:
            assert record.metrics == metrics and record.utility == metrics["utility"]
    reached = [(metrics["utility"], -steps, i) for i, (_, steps, metrics) in enumerate(runs) if metrics is not None]
    assert len(reached) >= 2  # a real choice
    best = max(reached)[2]
    assert result.best is result.settings[best] and result.applied
    expected = dict(runs[best][0].named_parameters())
    for n, p in module.named_parameters():  # the model holds the best setting's weights, bit for bit
        assert torch.equal(p, expected[n]), n

    fresh = copy.deepcopy(original)
    assert sorted(slug_fast.apply_delta(fresh, tmp_path / "ga-light-delta")) == sorted(result.state)
    for n, p in fresh.named_parameters():
        assert torch.equal(p.view(torch.int32), module.get_parameter(n).view(torch.int32)), n
    assert slug_fast.load_delta(tmp_path / "ga-light-delta")[1]["setting"] == grid[best]


def test_a_spec_is_checked_when_written(fresh_tables):
    base = dict(summary="s", weights=lambda s: (1.0, 0.0), defaults={"lr": 1e-3}, grid=[1e-3])
    with pytest.raises(SlugError, match="lower case letters, digits and '-'"):
        TrainingSpec(name="GA light", **base)
    with pytest.raises(SlugError, match="defaults must give 'lr'"):
        TrainingSpec(name="x", **{**base, "defaults": {"rate": 1e-3}})
    with pytest.raises(SlugError, match=r"must return \(forget_weight, retain_weight\)"):
        TrainingSpec(name="x", **{**base, "weights": lambda s: (0.0, 0.0)})
    with pytest.raises(SlugError, match="x has no hyper-parameter 'alpha'"):
        TrainingSpec(name="x", **{**base, "grid": [{"alpha": 1.0}]})
    with pytest.raises(SlugError, match="a baseline named 'ga' exists already"):
        add_baseline(TrainingSpec(name="ga", **base))
    with pytest.raises(SlugError, match="takes a TrainingSpec"):
        add_baseline(baselines.ssd)
    spec = add_baseline(TrainingSpec(name="ga-plain", **base))
    assert baselines.METHODS["ga-plain"] is spec and spec.label == "GA-PLAIN" and spec.needs == (True, False)
    module, forget, retain, loss, criterion = tiny_task()
    with pytest.raises(SlugError, match=r"GA-PLAIN needs forget batches \(its loss ascends the forget loss\)"):
        baselines.run_baseline("ga-plain", module, None, retain, criterion, forget_loss=loss, retain_loss=loss)
