"""SLUG the authors' way (CSIPlab/SLUG research scripts), for a like-for-like ratio against slug_fast.unlearn.

The same method as slug_fast.unlearn: eligibility, towers, usable layers, the choice of
the layers to search (strategy "best" or "deepest", HF q/k/v and fc1/fc2 groups) and of
the layer to edit all come from slug_fast.choice, which unlearn calls too, and the step
search is slug_fast.search's. Only the machinery is the research code's:

- gradients: a zero-filled full-size dict per set, every parameter's .grad added into
  it after each batch, then divided by the batch count; both dicts kept to the end
  (optionally torch.save-d, as the scripts do);
- per-layer statistics one tensor at a time: torch.norm(theta), torch.norm(g_f) and
  nn.CosineSimilarity(g_f, g_r), each brought to the host with .item();
- an O(n^2) Pareto check in Python;
- every evaluation of the step search deep-copies the whole model (copy.deepcopy),
  edits the copy and runs the criterion on the copy.

What that machinery changes: the norms and cosines are float32 torch reductions
(unlearn sums in float64), so importance, alignment and the start step agree to ~1e-6
relative and a step found by the search agrees to that precision; the criterion is
called with the edited COPY (a criterion must evaluate the model it is given; one bound
to the original object, such as slug_fast.eval.concept_criterion's adapter, would not
see the edit); mirrors outside the user's object (a companion CLIP model) are not edited
during the search.
"""
from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..choice import (best_candidate, check_strategy, fronts_of, group_rule, in_towers, select_candidates,
                      tower_rules, usable_by_tower, usable_layers)
from ..errors import SlugError
from ..gradients import forward_use_order
from ..parameters import named_parameters_of
from ..search import check_max_evals, criterion_result, search_step, start_step
from .harness import (BaselineResult, Check, Criterion, SettingRecord, progress_bar, reiterable, resolve_adapter,
                      trainable_names, training_mode, user_names)


def authors_gradients(module: nn.Module, batches: Iterable, loss_fn, names: Sequence[str]) -> tuple[dict, int]:
    """Mean per-batch gradient into a zero-filled full-size dict, parameter by parameter."""
    named = dict(module.named_parameters())
    gradients = {n: torch.zeros_like(named[n]) for n in names}
    count = 0
    for batch in batches:
        for p in named.values():
            p.grad = None  # optimizer.zero_grad()
        loss = loss_fn(module, batch)
        loss.backward()
        for n in names:
            if named[n].grad is not None:
                gradients[n] += named[n].grad
        count += 1
    if count == 0:
        raise SlugError("slug-authors needs at least one batch in each set")
    for n in names:
        gradients[n] /= count
        named[n].grad = None
    return gradients, count


def authors_stats(params: Mapping[str, torch.Tensor], forget: Mapping[str, torch.Tensor],
                  retain: Mapping[str, torch.Tensor]) -> dict[str, tuple[float, float, float, float]]:
    """name -> (||theta||, ||g_f||, importance, alignment), one tensor and one .item() at a time."""
    cos = nn.CosineSimilarity(dim=0)
    out = {}
    for n in forget:
        p_norm = torch.norm(params[n].detach()).item()
        f_norm = torch.norm(forget[n]).item()
        alignment = abs(cos(forget[n].flatten(), retain[n].flatten()).item())
        importance = f_norm / p_norm if p_norm > 0 and f_norm > 0 else 0.0
        out[n] = (p_norm, f_norm, importance, alignment)
    return out


def authors_pareto(alignment: Sequence[float], importance: Sequence[float]) -> list[int]:
    """O(n^2): i is on the front unless some j has alignment_j < alignment_i and importance_j > importance_i."""
    front = []
    for i in range(len(alignment)):
        if alignment[i] != alignment[i] or importance[i] != importance[i]:  # NaN never on the front
            continue
        dominated = False
        for j in range(len(alignment)):
            if alignment[j] < alignment[i] and importance[j] > importance[i]:
                dominated = True
                break
        if not dominated:
            front.append(i)
    return front


def slug_authors(model, forget: Iterable, retain: Iterable, criterion: Criterion, *, grid=None,
                 params: Sequence[str] | None = None, towers=None, tower: str | Sequence[str] | None = None,
                 strategy: str = "best", eligible: Callable[[str, Sequence[int]], bool] | None = None,
                 group: bool | None = None, max_evals: int = 10, utility: Callable | None = None, apply: bool = True,
                 save_gradients: str | os.PathLike | None = None, train_mode: bool = False,
                 progress: bool | None = None, adapter=None, forget_loss=None, retain_loss=None,
                 **adapter_options) -> BaselineResult:
    """SLUG as the research scripts run it (see the module docstring), with unlearn's options
    and choice. One setting per searched front layer (or group); `best` is the chosen one.
    `seconds` and `grid_seconds` are both the whole run (searching every front layer is the
    method, as unlearn's seconds["total"]).
    save_gradients: a directory to torch.save both gradient dicts into, as the scripts do.
    When no layer meets the criterion, best is None and the model is unchanged (unlearn raises
    CriterionNotReached instead).
    """
    t_start = time.perf_counter()
    if grid is not None:
        raise SlugError("slug-authors has no grid: it searches every Pareto-front layer with the step search; "
                        "use max_evals= for its budget")
    check_strategy(strategy)
    check_max_evals(max_evals)
    ad, f_loss, r_loss = resolve_adapter(model, adapter, forget_loss, retain_loss, adapter_options)
    forget = reiterable(forget, "forget")
    retain = reiterable(retain, "retain")
    names = trainable_names(ad, params)
    named = dict(ad.target.named_parameters())
    candidates = [n for n in names if (eligible or ad.eligible)(n, tuple(named[n].shape))]
    rules = tower_rules(towers, ad, candidates, tower)
    if tower is not None and params is None:
        candidates = in_towers(candidates, rules)
    depth_order = None
    with training_mode(ad.target, names, train_mode):
        if strategy == "deepest":  # unlearn's depth order: forward use on the first forget batch
            loss = f_loss(ad.target, next(iter(forget)))
            depth_order = forward_use_order(loss, {n: named[n] for n in candidates})
            del loss
        forget_grads, n_f = authors_gradients(ad.target, forget, f_loss, names)
        retain_grads, n_r = authors_gradients(ad.target, retain, r_loss, names)
    if save_gradients is not None:
        root = Path(save_gradients)
        root.mkdir(parents=True, exist_ok=True)
        torch.save(forget_grads, root / "forget_grads.pt")
        torch.save(retain_grads, root / "train_grads.pt")
    t_grads = time.perf_counter()

    stats = authors_stats(named, forget_grads, retain_grads)
    importance = [stats[n][2] for n in candidates]
    tower_names = usable_by_tower(candidates, importance, rules)
    fronts = fronts_of(tower_names, lambda members: authors_pareto([stats[n][3] for n in members],
                                                                   [stats[n][2] for n in members]))
    picks = select_candidates(fronts, strategy, usable_layers(candidates, importance),
                              group_rule(ad, group), depth_order)
    setup_seconds = time.perf_counter() - t_start

    records = []
    for t, layers in progress_bar(picks, "slug-authors", progress):
        records.append(_search(ad, t, layers, stats, forget_grads, criterion, utility, max_evals))
    reached = [r for r in records if r.reached]
    best = best_candidate(reached, change=lambda r: r.details["relative_change"],
                          label=lambda r: r.hyper["layers"]) if reached else None

    state = base = None
    if best is not None:
        step = best.details["step"]
        with torch.no_grad():
            base = {n: named[n].detach().clone() for n in best.hyper["layers"]}
            state = {n: base[n] + step * forget_grads[n] for n in best.hyper["layers"]}
            if apply:
                for key, (tensor, n) in ad.edit_params(best.hyper["layers"]).items():
                    tensor.copy_(state[n])
    total = time.perf_counter() - t_start
    details = {"fronts": fronts, "tower_members": tower_names, "gradient_seconds": t_grads - t_start,
               "forget_batches": n_f, "retain_batches": n_r,
               "gradient_bytes": 2 * sum(g.numel() * g.element_size() for g in forget_grads.values())}
    options = {"max_evals": max_evals, "train_mode": train_mode, "strategy": strategy}
    return BaselineResult("slug-authors", best, records, total if best is not None else None, total,
                          setup_seconds, bool(apply and best is not None), names, options, details, state, base,
                          user_names(ad, list(state or ())))


def _search(ad, tower, layers, stats, forget_grads, criterion, utility, max_evals) -> SettingRecord:
    t0 = time.perf_counter()
    theta_norm = math.sqrt(sum(stats[n][0] ** 2 for n in layers))
    grad_norm = math.sqrt(sum(stats[n][1] ** 2 for n in layers))
    start = start_step(theta_norm, grad_norm)
    keys = [ad.delta_name(n) for n in layers]
    checks: list[Check] = []

    def edited_copy(step: float):
        work = copy.deepcopy(ad.model)  # the whole model, every evaluation
        target = named_parameters_of(work)
        with torch.no_grad():
            for key, n in zip(keys, layers):
                target[key].add_(step * forget_grads[n])
        return work

    def evaluate(step: float) -> tuple[bool, dict]:
        work = edited_copy(step)
        satisfied, metrics = criterion_result(criterion(work))
        del work
        return satisfied, metrics

    result = search_step(evaluate, start, max_evals)
    for e in result.trace:
        checks.append(Check(len(checks) + 1, 0.0, e.satisfied, e.metrics, e.seconds))
    value = None
    if result.reached:
        if utility is not None:
            value = float(utility(edited_copy(result.step)))
        elif "utility" in result.best.metrics:
            value = float(result.best.metrics["utility"])
    rel = result.step * grad_norm / theta_norm if result.reached else None
    metrics = result.best.metrics if result.reached else result.trace[-1].metrics
    return SettingRecord({"layers": list(layers), "tower": tower}, len(result.trace), 0.0, time.perf_counter() - t0,
                         result.reached, "criterion" if result.reached else "budget", metrics, value, checks,
                         {"step": result.step, "start": start, "relative_change": rel})
