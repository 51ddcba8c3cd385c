"""Baselines (slug_fast.baselines) on the digits mini-CLIP and against brute-force oracles."""
import json
import time

import pytest
import torch

import slug_fast
from slug_fast.baselines import (DEFAULT_GRIDS, METHODS, dampen, run_baseline, saliency_mask, slug_authors)
from slug_fast.baselines.slug_authors import authors_pareto, authors_stats
from slug_fast.baselines.ssd import importance
from slug_fast.demo import accuracies
from slug_fast.errors import SlugError
from slug_fast.losses import clip_retain_loss

from test_pareto import brute_force, random_points
from test_unlearn import FORGET, criterion_for, params_of, sets


def same_params(model, reference):
    return all(torch.equal(p.detach(), reference[n]) for n, p in model.named_parameters())


def mean_loss(model, batches, loss):
    with torch.no_grad():
        return sum(loss(model, b).item() for b in batches) / len(batches)


class CountingAdam:
    """An optimizer factory that counts steps and records the weights each setting starts from."""

    def __init__(self):
        self.steps = 0
        self.starts = []

    def __call__(self, params, lr):
        self.starts.append([p.detach().clone() for p in params])
        opt = torch.optim.Adam(params, lr=lr)
        step = opt.step

        def counted(*args, **kwargs):
            self.steps += 1
            return step(*args, **kwargs)
        opt.step = counted
        return opt


# ----------------------------------------------------------------------------- each method on the mini-CLIP
@pytest.mark.parametrize("method,grid", [("ga", [1e-3]), ("gaft", [1e-3]), ("salun", [1e-3]),
                                         ("ssd", {"alpha": [2.0], "lambda": [1.0]})])
def test_forgetting_baselines_lower_forget_accuracy(method, grid, digits_model, digits_trained):
    data = digits_trained[1]
    forget, retain = sets(data, FORGET)
    before = accuracies(digits_model, data, FORGET)
    extra = {} if method == "ssd" else {"epochs": 3}
    # the adapter object or the plain model: the same adapter either way
    target = slug_fast.adapters.get_adapter(digits_model) if method == "ssd" else digits_model
    result = run_baseline(method, target, forget, retain, criterion_for(data, FORGET), grid=grid,
                          progress=False, **extra)
    after = accuracies(digits_model, data, FORGET)  # apply=True: the model is left at the best setting
    assert before["forget_top1"] > 50 and result.reached and result.applied
    assert after["forget_top1"] == 0.0 and after == {k: result.best.metrics[k] for k in after}
    assert result.seconds >= result.best.seconds > 0 and result.grid_seconds >= result.seconds
    trace = result.best.trace
    assert trace[-1].satisfied and not any(c.satisfied for c in trace[:-1])
    json.dumps(result.to_dict())


def test_ft_descends_the_retain_loss_and_keeps_the_concept(digits_model, digits_trained):
    data = digits_trained[1]
    forget, retain = sets(data, FORGET)
    before_loss = mean_loss(digits_model, retain, clip_retain_loss)
    before = accuracies(digits_model, data, FORGET)
    crit = criterion_for(data, FORGET)

    def criterion(model):
        done, metrics = crit(model)
        return done, {**metrics, "retain_loss": mean_loss(model, retain, clip_retain_loss)}

    result = run_baseline("ft", digits_model, forget, retain, criterion, grid=[1e-4], epochs=1, check_every=None,
                          apply=False, progress=False)
    record = result.settings[0]
    assert record.steps == len(retain) and record.stopped == "budget" and len(record.trace) == 1
    assert result.best is None and result.seconds is None and not result.applied
    assert record.metrics["retain_loss"] < before_loss  # measured by the criterion on the fine-tuned weights
    assert record.metrics["forget_top1"] > before["forget_top1"] - 20  # fine-tuning alone does not forget


# ----------------------------------------------------------------------------- restore, grid, early stop
def test_every_setting_starts_from_the_original_and_apply_false_restores(digits_model, digits_trained):
    data = digits_trained[1]
    forget, retain = sets(data, FORGET)
    original = params_of(digits_model)
    opt = CountingAdam()
    grid = [{"lr": 3e-4, "retain_weight": 1.0}, {"lr": 1e-3, "retain_weight": 0.5}, {"lr": 3e-4}]
    result = run_baseline("gaft", digits_model, forget, retain, criterion_for(data, FORGET), grid=grid, epochs=2,
                          optimizer=opt, apply=False, progress=False)
    assert len(opt.starts) == 3
    for start in opt.starts:  # bit-exact original weights at the start of each setting
        assert all(torch.equal(s, original[n]) for s, n in zip(start, result.trained))
    assert same_params(digits_model, original) and not result.applied
    assert [s.hyper for s in result.settings] == [{"lr": 3e-4, "retain_weight": 1.0},
                                                  {"lr": 1e-3, "retain_weight": 0.5},
                                                  {"lr": 3e-4, "retain_weight": 1.0}]
    first, third = result.settings[0], result.settings[2]  # same setting from the same start: same run
    assert [c.losses for c in first.trace] == [c.losses for c in third.trace]
    assert [c.metrics for c in first.trace] == [c.metrics for c in third.trace]
    assert result.reached and result.state

    applied = run_baseline("gaft", digits_model, forget, retain, criterion_for(data, FORGET), grid=grid, epochs=2,
                           progress=False)
    assert applied.best.hyper == result.best.hyper and applied.applied
    expected = {**original, **applied.state}
    assert same_params(digits_model, expected)
    assert set(applied.state) == {n for n in original if not torch.equal(original[n], expected[n])}
    reached = [s for s in applied.settings if s.reached]
    top = max(s.utility for s in reached)
    assert applied.best.utility == top
    assert applied.best.steps == min(s.steps for s in reached if s.utility == top)
    assert applied.grid_seconds >= sum(s.seconds for s in applied.settings)


@pytest.mark.parametrize("check_every,flip_at", [(1, 5), (3, 5), (3, 7), (None, 6), (2, 1)])
def test_early_stop_at_the_first_check_that_holds(check_every, flip_at, digits_model, digits_trained):
    data = digits_trained[1]
    forget, retain = sets(data, FORGET)
    per_epoch = len(forget)
    opt = CountingAdam()

    def flips(model):
        return opt.steps >= flip_at, {"steps_seen": opt.steps}

    result = run_baseline("ga", digits_model, forget, retain, flips, grid=[1e-5], epochs=4, check_every=check_every,
                          optimizer=opt, apply=False, progress=False)
    # oracle: checks at multiples of check_every and at epoch ends; stop at the first >= flip_at
    checks = sorted({s for s in range(1, 4 * per_epoch + 1)
                     if (check_every and s % check_every == 0) or s % per_epoch == 0})
    stop = next(s for s in checks if s >= flip_at)
    record = result.settings[0]
    assert [c.step for c in record.trace] == [s for s in checks if s <= stop]
    assert [c.satisfied for c in record.trace] == [s >= flip_at for s in checks if s <= stop]
    assert record.steps == stop == opt.steps and record.stopped == "criterion" and record.reached
    assert all(c.metrics["steps_seen"] == c.step for c in record.trace)
    assert record.epochs == pytest.approx(stop / per_epoch, abs=1e-4)


def test_equal_utilities_go_to_the_setting_with_fewer_steps():
    """A tie in utility goes to fewer steps, wherever that setting sits in the grid and though it ran slower."""
    model = torch.nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.zero_()
    batches = [torch.ones(2, 3)] * 4

    def criterion(m):  # ascent on sum(w) raises each weight by lr a step: lr 0.1 needs 3 steps, lr 0.4 one
        return bool(m.weight[0, 0] >= 0.25), {}

    def utility(m):  # one score for both; the one-step setting is made the slower
        if m.weight[0, 0] > 0.35:
            time.sleep(0.2)
        return 1.0

    for grid in ([0.4, 0.1], [0.1, 0.4]):
        result = run_baseline("ga", model, batches, batches, criterion, grid=grid, optimizer="sgd", utility=utility,
                              forget_loss=lambda m, x: m.weight.sum(), retain_loss=lambda m, x: m(x).square().mean(),
                              apply=False, progress=False)
        assert sorted(s.steps for s in result.settings) == [1, 3]
        assert result.best.hyper["lr"] == 0.4 and result.best.steps == 1
        assert result.best.seconds > max(s.seconds for s in result.settings if s is not result.best)


def test_no_setting_reaching_is_reported_and_changes_nothing(digits_model, digits_trained):
    data = digits_trained[1]
    forget, retain = sets(data, FORGET)
    original = params_of(digits_model)
    result = run_baseline("ga", digits_model, forget, retain, lambda m: False, grid={"lr": [1e-5, 2e-5]}, epochs=1,
                          check_every=2, progress=False)
    assert result.best is None and result.seconds is None and result.state is None and not result.applied
    assert [s.hyper["lr"] for s in result.settings] == [1e-5, 2e-5]
    assert all(s.stopped == "budget" and s.steps == len(forget) for s in result.settings)
    assert same_params(digits_model, original)


def test_bad_input_is_refused(digits_model, digits_trained):
    data = digits_trained[1]
    forget, retain = sets(data, FORGET)
    crit = criterion_for(data, FORGET)
    with pytest.raises(SlugError, match="unknown baseline 'esd'"):
        run_baseline("esd", digits_model, forget, retain, crit)
    with pytest.raises(SlugError, match="ga has no hyper-parameter 'alpha'"):
        run_baseline("ga", digits_model, forget, retain, crit, grid=[{"alpha": 1.0}])
    with pytest.raises(SlugError, match="the ga grid is empty"):
        run_baseline("ga", digits_model, forget, retain, crit, grid=[])
    with pytest.raises(SlugError, match="slug-authors has no grid"):
        run_baseline("slug-authors", digits_model, forget, retain, crit, grid=[1.0])
    with pytest.raises(SlugError, match="GAFT needs retain batches"):
        run_baseline("gaft", digits_model, forget, None, crit)
    with pytest.raises(SlugError, match="the forget set is empty"):
        run_baseline("ga", digits_model, [], retain, crit)
    assert set(METHODS) == set(DEFAULT_GRIDS)


# ----------------------------------------------------------------------------- SalUn
def brute_force_mask(grads, ratio):
    """Top int(ratio * N) by |g|, ties to the earlier (tensor, flat index), by a full Python sort."""
    entries = []
    for t, (name, g) in enumerate(grads.items()):
        for i, v in enumerate(g.abs().flatten().tolist()):
            entries.append((-v, t, i, name))
    entries.sort()
    keep = {name: torch.zeros(g.numel(), dtype=torch.bool) for name, g in grads.items()}
    for _, _, i, name in entries[:int(ratio * len(entries))]:
        keep[name][i] = True
    return {name: keep[name].view(g.shape) for name, g in grads.items()}


@pytest.mark.parametrize("ratio", [0.5, 0.1, 0.0, 1.0, 0.37])
@pytest.mark.parametrize("levels", [None, 3])
def test_saliency_mask_keeps_exactly_the_top_fraction(ratio, levels, gen):
    shapes = [(7, 5), (13,), (3, 4, 2), (1,)]
    grads = {}
    for k, shape in enumerate(shapes):
        g = torch.randn(shape, generator=gen)
        if levels:  # many ties, zeros and sign flips of equal magnitude
            g = torch.randint(-levels, levels + 1, shape, generator=gen).float()
        grads[f"t{k}"] = g
    mask = saliency_mask(grads, ratio)
    oracle = brute_force_mask(grads, ratio)
    total = sum(g.numel() for g in grads.values())
    assert sum(int(m.sum()) for m in mask.values()) == int(ratio * total)
    for name in grads:
        assert torch.equal(mask[name], oracle[name]), name


def test_salun_moves_only_masked_weights(digits_model, digits_trained):
    data = digits_trained[1]
    forget, retain = sets(data, FORGET)
    original = params_of(digits_model)
    # without the 49408-row token table, whose unused rows (most of its weights) have zero gradient,
    # the top half by |g_f| leaves out weights the retain loss does move
    names = [n for n in original if n != "token_embedding.weight"]
    grads = slug_fast.compute_gradients(digits_model, forget, None, slug_fast.clip_forget_loss, params=names).forget
    mask = saliency_mask(grads, 0.5)
    opt = CountingAdam()
    result = run_baseline("salun", digits_model, forget, retain, lambda m: opt.steps >= 3, grid=[1e-3],
                          optimizer=opt, params=names, progress=False)
    assert result.applied and result.best.steps == 3 and result.trained == names
    assert result.details["masked_weights"] == sum(int(m.sum()) for m in mask.values())
    moved_in = moved_out = 0
    for n in names:
        p = dict(digits_model.named_parameters())[n].detach()
        moved_in += int((p != original[n])[mask[n]].sum())
        moved_out += int((p != original[n])[~mask[n]].sum())
    assert moved_out == 0 and moved_in > 0
    # GAFT with the same setting moves weights outside the mask: the mask is what kept them
    digits_model.load_state_dict(digits_trained[0])
    run_baseline("gaft", digits_model, forget, retain, lambda m: True, grid=[1e-3], check_every=1,
                 params=names, progress=False)
    assert sum(int((dict(digits_model.named_parameters())[n].detach() != original[n])[~mask[n]].sum())
               for n in names) > 0
    assert torch.equal(dict(digits_model.named_parameters())["token_embedding.weight"],
                       original["token_embedding.weight"])


# ----------------------------------------------------------------------------- SSD
def test_dampening_matches_elementwise_recomputation(gen):
    shapes = {"w": (6, 5), "v": (17,), "scale": (1,)}
    params = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    forget_imp = {n: torch.rand(s, generator=gen) * 3 for n, s in shapes.items()}
    full_imp = {n: torch.rand(s, generator=gen) for n, s in shapes.items()}
    forget_imp["w"][0, :3] = 0.0  # zero forget importance: never selected
    full_imp["w"][1, :3] = 0.0  # zero full importance: selected, beta 0
    for alpha, lam in [(1.0, 1.0), (2.0, 0.5), (0.5, 3.0), (10.0, 1.0)]:
        work = {n: p.clone() for n, p in params.items()}
        count = dampen(work, forget_imp, full_imp, alpha, lam)
        expected_count = 0
        for n, p in params.items():
            flat_p, f, o = p.flatten().tolist(), forget_imp[n].flatten().tolist(), full_imp[n].flatten().tolist()
            out = []
            for x, fi, oi in zip(flat_p, f, o):
                if p.numel() > 1 and fi > alpha * oi:
                    expected_count += 1
                    x = x * min(lam * oi / fi, 1.0)
                out.append(x)
            assert torch.allclose(work[n].flatten().double(), torch.tensor(out, dtype=torch.float64),
                                  rtol=1e-6, atol=0), n
        assert count == expected_count
        assert torch.equal(work["scale"], params["scale"])  # single-element tensors are left alone


def test_dampening_by_hand_and_untouched_weights_stay():
    """Known answers: dampened only where forget > alpha * full, strictly (a tie stays); zero importance on
    both sides (an embedding row no batch touches) leaves the weight as it is, not 0/0 = NaN."""
    p = torch.tensor([[1.0, 2.0, -4.0, 3.0], [5.0, -1.0, 0.5, 8.0]], dtype=torch.float64)
    f = torch.tensor([[0.0, 4.0, 2.0, 9.0], [0.0, 0.0, 3.0, 1.0]], dtype=torch.float64)
    o = torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    # alpha 2 selects f/o = 4, 9, 3; beta = min((lam * o / f) ** exponent, 1)
    cases = [((2.0, 1.0, 1.0), [[1, 2 / 4, -4, 3 / 9], [5, -1, 0.5 / 3, 8]]),
             ((2.0, 2.0, 2.0), [[1, 2 / 4, -4, 3 * 4 / 81], [5, -1, 0.5 * 4 / 9, 8]]),
             ((2.0, 5.0, 1.0), [[1, 2, -4, 3 * 5 / 9], [5, -1, 0.5, 8]]),  # 5/4 and 5/3 clamp to 1
             ((1.0, 1.0, 1.0), [[1, 2 / 4, -4 / 2, 3 / 9], [5, -1, 0.5 / 3, 8]])]  # alpha 1 takes f/o = 2 too
    for (alpha, lam, exponent), expected in cases:
        work = {"w": p.clone()}
        count = dampen(work, {"w": f}, {"w": o}, alpha, lam, exponent)
        assert torch.allclose(work["w"], torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
        assert count == (4 if alpha == 1.0 else 3)


def test_importance_is_the_mean_squared_per_batch_gradient(gen):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)).double()
    batches = [torch.randn(5, 4, generator=gen, dtype=torch.float64) for _ in range(3)]

    def loss(m, x):
        return m(x).square().mean()

    names = [n for n, _ in model.named_parameters()]
    got, count = importance(model, batches, loss, names)
    assert count == 3
    for n, p in model.named_parameters():
        per_batch = [torch.autograd.grad(loss(model, x), p)[0] for x in batches]
        expected = sum(g.square() for g in per_batch) / 3
        assert torch.allclose(got[n].double(), expected, rtol=1e-5, atol=1e-12), n


# ----------------------------------------------------------------------------- slug-authors
def test_authors_pareto_and_stats_match_the_library(gen):
    for levels in (None, 4):
        a, m = random_points(60, gen, levels)
        assert authors_pareto(a.tolist(), m.tolist()) == brute_force(a, m)
    params = {f"l{i}": torch.randn(8, 5, generator=gen) for i in range(6)}
    forget = {n: torch.randn(8, 5, generator=gen) for n in params}
    retain = {n: torch.randn(8, 5, generator=gen) for n in params}
    ours = slug_fast.layer_stats(params, forget, retain, backend="torch")
    theirs = authors_stats(params, forget, retain)
    assert torch.allclose(ours.importance, torch.tensor([theirs[n][2] for n in ours.names], dtype=torch.float64),
                          rtol=1e-5)
    assert torch.allclose(ours.alignment, torch.tensor([theirs[n][3] for n in ours.names], dtype=torch.float64),
                          rtol=1e-5, atol=1e-7)


def test_slug_authors_makes_unlearns_choice(digits_model, digits_trained):
    data = digits_trained[1]
    forget, retain = sets(data, FORGET)
    crit = criterion_for(data, FORGET)
    original = params_of(digits_model)
    ours = slug_fast.unlearn(digits_model, forget, retain, crit, apply=False, progress=False)
    theirs = slug_authors(digits_model, forget, retain, crit, progress=False)
    assert theirs.details["fronts"] == ours.fronts
    assert [s.hyper["layers"] for s in theirs.settings] == [c.layers for c in ours.candidates]
    for cand, setting in zip(ours.candidates, theirs.settings):
        assert [e.satisfied for e in cand.search.trace] == [c.satisfied for c in setting.trace]
        assert setting.details["start"] == pytest.approx(cand.search.start, rel=1e-5)
        if cand.search.reached:
            assert setting.details["step"] == pytest.approx(cand.search.step, rel=1e-5)
            assert setting.utility == cand.utility
    assert theirs.best.hyper["layers"] == ours.layers
    assert theirs.best.details["step"] == pytest.approx(ours.step, rel=1e-5)
    # applied: only the chosen layer changed, by step * g_f as unlearn's delta says
    for n, p in digits_model.named_parameters():
        if n in ours.layers:
            assert torch.allclose(p.detach() - original[n], ours.delta[n], rtol=1e-4, atol=1e-6)
        else:
            assert torch.equal(p.detach(), original[n]), n
    assert theirs.seconds == theirs.grid_seconds and theirs.applied


def test_generic_module_and_non_finite_loss_stop_the_setting():
    """Any nn.Module with losses; a loss that turns NaN ends the setting unreached and is restored."""
    model = torch.nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.fill_(0.5)
        model.bias.fill_(0.0)
    original = params_of(model)
    batches = [torch.ones(2, 3)] * 3

    def forget_loss(m, x):  # ascent drives sum(w) through 0, after which log is NaN
        return -torch.log(m.weight.sum())

    def retain_loss(m, x):
        return m(x).square().mean()

    result = run_baseline("ga", model, batches, batches, lambda m: False, grid=[{"lr": 10.0}], epochs=2,
                          check_every=1, optimizer="sgd", forget_loss=forget_loss, retain_loss=retain_loss,
                          progress=False)
    record = result.settings[0]
    assert record.stopped == "non-finite" and not record.reached and record.trace[-1].metrics == {"non_finite": True}
    assert record.steps == 2  # step 1 ends at sum(w) < 0, step 2's loss is NaN, its check stops the run
    assert same_params(model, original) and result.best is None
    modes = []
    run_baseline("ga", model, batches, batches, lambda m: modes.append(m.training) or True, grid=[0.1],
                 train_mode=True, forget_loss=forget_loss, retain_loss=retain_loss, apply=False, progress=False)
    assert modes == [False] and model.training  # checks run in eval mode; the module's mode is restored
    one_shot = run_baseline("ssd", model, batches, batches, lambda m: True, grid={"alpha": [0.0], "lambda": [0.5]},
                            epochs=3, optimizer="sgd", forget_loss=forget_loss, retain_loss=retain_loss, apply=False,
                            progress=False)
    assert one_shot.options["ignored"] == ["epochs", "optimizer"] and one_shot.reached


# ----------------------------------------------------------------------------- SLUG's rules, written once
class Blocks(torch.nn.Module):
    """Two blocks with Hugging Face names (q/k/v_proj, fc1/fc2, grouped by group=True) and a head, float64."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        parts = ("q_proj", "k_proj", "v_proj", "fc1", "fc2")
        self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict({k: torch.nn.Linear(6, 6) for k in parts})
                                          for _ in range(2))
        self.head = torch.nn.Linear(6, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) / 2)
        self.double()

    def forward(self, x):
        for b in self.blocks:
            x = x + torch.tanh(b["q_proj"](x)) * torch.sigmoid(b["k_proj"](x)) + 0.5 * b["v_proj"](x)
            x = x + b["fc2"](torch.relu(b["fc1"](x)))
        return self.head(x).squeeze(-1)


def mse(model, batch):
    x, y = batch
    return (model(x) - y).square().mean()


def blocks_task():
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 6, generator=gen, dtype=torch.float64),
                torch.randn(8, generator=gen, dtype=torch.float64)) for _ in range(5)]
    forget, retain = batches[:2], batches[2:]
    with torch.no_grad():
        forget0 = sum(mse(Blocks(), b).item() for b in forget)

    def criterion(model):
        with torch.no_grad():
            lf = sum(mse(model, b).item() for b in forget)
            lr = sum(mse(model, b).item() for b in retain)
        return lf >= 2 * forget0, {"forget_loss": lf, "utility": -lr}
    return forget, retain, criterion


TWO_TOWERS = {"early": "blocks.0.", "late": lambda n: not n.startswith("blocks.0.")}
OVERLAPPING = {"early": "blocks.0.", "all": lambda n: True}  # "all" restricted alone keeps blocks.0 too


@pytest.mark.parametrize("options", [{}, {"strategy": "deepest"}, {"group": True},
                                     {"group": True, "strategy": "deepest", "towers": TWO_TOWERS},
                                     {"towers": TWO_TOWERS}, {"towers": OVERLAPPING, "tower": "all"},
                                     {"towers": TWO_TOWERS, "tower": "late", "group": True},
                                     {"utility": "nan-first"}, {"utility": "tied"}],
                         ids=["best", "deepest", "group", "group-deepest", "towers", "overlapping-tower",
                              "one-tower-grouped", "nan-utility", "tied-utility"])
def test_slug_authors_and_unlearn_choose_alike(options):
    """Same inputs, same method: the same fronts, candidates, verdicts, chosen layers and step
    (slug-authors' statistics are its own, so steps agree to rounding)."""
    forget, retain, criterion = blocks_task()
    options, first = dict(options), None
    if options.get("utility") == "nan-first":
        first = next(c for c in slug_fast.unlearn(Blocks(), forget, retain, criterion, forget_loss=mse,
                                                  retain_loss=mse, apply=False, progress=False).candidates
                     if c.search.reached).layers
        original = params_of(Blocks())

        def utility(model):  # NaN while the first reached candidate is edited: it must rank last in both
            edited = any(not torch.equal(p.detach(), original[n]) for n, p in model.named_parameters()
                         if n in first)
            return float("nan") if edited else criterion(model)[1]["utility"]
        options["utility"] = utility
    elif options.get("utility") == "tied":  # every candidate ties: the smallest relative change, then the first
        options["utility"] = lambda model: 1.0
    ours = slug_fast.unlearn(Blocks(), forget, retain, criterion, forget_loss=mse, retain_loss=mse, apply=False,
                             progress=False, **options)
    model = Blocks()
    theirs = slug_authors(model, forget, retain, criterion, forget_loss=mse, retain_loss=mse, progress=False,
                          **options)
    assert theirs.details["fronts"] == ours.fronts
    assert [(s.hyper["tower"], s.hyper["layers"]) for s in theirs.settings] == \
        [(c.tower, c.layers) for c in ours.candidates]
    for cand, setting in zip(ours.candidates, theirs.settings):
        assert [e.satisfied for e in cand.search.trace] == [c.satisfied for c in setting.trace]
        if cand.search.reached:
            assert setting.details["step"] == pytest.approx(cand.search.step, rel=1e-9)
    if options.get("strategy") != "deepest":
        assert sum(c.search.reached for c in ours.candidates) >= 2  # a choice was made among several
    assert theirs.best.hyper["layers"] == ours.layers and theirs.best.hyper["tower"] == ours.tower
    assert theirs.best.details["step"] == pytest.approx(ours.step, rel=1e-9)
    if first is not None:
        assert ours.layers != first
    if options.get("group"):
        assert any(len(c.layers) > 1 for c in ours.candidates)
    reference = params_of(Blocks())
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), reference[n])]
    assert changed == ours.layers  # slug-authors applied its choice, and nothing else


# ----------------------------------------------------------------------------- a baseline's result as a delta
def bits(t):
    return t.detach().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("method,grid", [("ga", [1e-3]), ("ssd", {"alpha": [2.0], "lambda": [1.0]})])
def test_a_saved_baseline_delta_reproduces_its_weights_exactly(method, grid, digits_model, digits_trained, tmp_path):
    data = digits_trained[1]
    forget, retain = sets(data, FORGET)
    result = run_baseline(method, digits_model, forget, retain, criterion_for(data, FORGET), grid=grid,
                          progress=False, **({} if method == "ssd" else {"epochs": 3}))
    assert result.reached and result.applied
    path = result.save(tmp_path / "delta")
    fresh = slug_fast.digits.build_model(0)
    fresh.load_state_dict(digits_trained[0])
    assert sorted(slug_fast.apply_delta(fresh, path)) == sorted(result.state)
    edited = dict(digits_model.named_parameters())
    for n, p in fresh.named_parameters():  # every weight, changed or not, bit for bit
        assert torch.equal(bits(p), bits(edited[n])), n
    tensors, config = slug_fast.load_delta(path)
    assert config["method"] == method and config["setting"] == result.best.hyper
    if method == "ga":  # Adam moved some weights by more than float32 can hold as a change: those go float64
        assert {t.dtype for t in tensors.values()} == {torch.float32, torch.float64}


def test_slug_authors_saves_its_edit_and_nothing_reached_saves_nothing(tmp_path):
    forget, retain, criterion = blocks_task()
    model = Blocks()
    result = slug_authors(model, forget, retain, criterion, forget_loss=mse, retain_loss=mse, progress=False)
    path = result.save(tmp_path / "delta")
    fresh = Blocks()
    assert slug_fast.apply_delta(fresh, path) == result.best.hyper["layers"]
    for (n, p), q in zip(fresh.named_parameters(), model.parameters()):
        assert torch.equal(bits(p), bits(q)), n
    assert slug_fast.load_delta(path)[1]["details"]["step"] == result.best.details["step"]
    none = slug_authors(Blocks(), forget, retain, lambda m: False, forget_loss=mse, retain_loss=mse, max_evals=2,
                        progress=False)
    with pytest.raises(SlugError, match="no setting met the criterion, so there is no change to save"):
        none.save(tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_a_change_no_delta_can_reproduce_is_refused():
    from slug_fast.baselines.harness import exact_change

    base = torch.tensor([1.0, 0.5, -2.0], dtype=torch.float64)
    edited = torch.tensor([1e-300, 0.25, -2.0], dtype=torch.float64)  # 1 - 1e-300 rounds to 1 in float64
    with pytest.raises(SlugError, match="the change of 'w' cannot be saved as a delta"):
        exact_change("w", base, edited)
    assert exact_change("w", base[1:], edited[1:]).dtype == torch.float32  # exact in float32: kept small
