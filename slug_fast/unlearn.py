"""The facade: gradients -> layer statistics -> Pareto fronts -> step search -> one edit."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import Adapter, GenericAdapter, detect_adapter, get_adapter
from .delta import save_delta, tensor_spec
from .edit import LayerEdit
from .errors import CriterionNotReached, SlugError
from .fastsearch import upstream_replay
from .gradients import Loss, compute_gradients, resolve_params
from .pareto import (NameRule, deepest, default_towers, group_of, is_eligible, matches, pareto_front,
                     split_towers)
from .search import Evaluation, SearchResult, criterion_result, search_step, start_step
from .stats import LayerStats, layer_stats

log = logging.getLogger("slug_fast")

Criterion = Callable[[object], "bool | tuple[bool, dict]"]
STRATEGIES = ("best", "deepest")


@dataclass
class Candidate:
    """One front layer (or HF group) and the outcome of its step search."""

    layers: list[str]
    tower: str
    search: SearchResult
    relative_change: float | None  # ||step * g_f|| / ||theta|| at the chosen step
    utility: float | None

    def to_dict(self) -> dict:
        return {"layers": self.layers, "tower": self.tower, "step": self.search.step,
                "start": self.search.start, "reached": self.search.reached,
                "relative_change": self.relative_change, "utility": self.utility,
                "evaluations": len(self.search.trace)}


@dataclass
class UnlearnResult:
    """What `unlearn` chose and measured; `save(path)` writes the delta.

    `layers` are names in the module SLUG differentiated (the stats' names); `edited`
    are the names in the user's object that the delta changes (the same for a plain
    model; the pipeline's or the VLM's names when the adapter differentiates a CLIP model).
    """

    layers: list[str]
    edited: list[str]
    tower: str
    step: float
    relative_change: float
    trace: list[Evaluation]
    candidates: list[Candidate]
    fronts: dict[str, list[str]]
    tower_members: dict[str, list[str]]  # eligible layers of each tower searched
    stats: LayerStats
    seconds: dict[str, float]
    delta: dict[str, torch.Tensor] = field(repr=False)
    specs: dict[str, dict] = field(repr=False)
    applied: bool = True
    backends: dict[str, str] = field(default_factory=dict)

    def to_dict(self, with_stats: bool = False) -> dict:
        """A JSON-ready summary (the full per-layer table with `with_stats`)."""
        out = {
            "layers": self.layers, "edited": self.edited, "tower": self.tower, "step": self.step,
            "relative_change": self.relative_change, "applied": self.applied,
            "trace": [{"step": e.step, "satisfied": e.satisfied, "metrics": e.metrics,
                       "seconds": e.seconds} for e in self.trace],
            "candidates": [c.to_dict() for c in self.candidates],
            "fronts": self.fronts, "seconds": self.seconds, "backends": self.backends,
        }
        if with_stats:
            out["stats"] = self.stats.rows()
        return out

    def save(self, path: str | os.PathLike):
        """Write the delta (only the changed tensors) and its config to directory `path`."""
        meta = {"method": "slug", "layers": self.edited, "target_layers": self.layers, "tower": self.tower,
                "step": self.step, "relative_change": self.relative_change}
        return save_delta(path, self.delta, self.specs, meta)


def unlearn(model, forget: Iterable, retain: Iterable, criterion: Criterion, *,
            adapter: str | Adapter | None = None, forget_loss: Loss | None = None,
            retain_loss: Loss | None = None, params: Sequence[str] | None = None,
            towers: Mapping[str, NameRule] | None = None, tower: str | Sequence[str] | None = None,
            strategy: str = "best", eligible: Callable[[str, Sequence[int]], bool] = is_eligible,
            group: bool | None = None, max_evals: int = 10,
            utility: Callable[[object], float] | None = None, apply: bool = True,
            progress: bool | None = None, backend: str = "auto", cache: bool | str = True,
            **adapter_options) -> UnlearnResult:
    """Unlearn with SLUG: edit one layer (or one HF q/k/v or fc1/fc2 group) once along g_f.

    model: an open_clip or Hugging Face CLIP model, a diffusers Stable Diffusion pipeline,
    a LLaVA model (the adapter is picked from its type, or named with `adapter=`, options
    such as clip_model= or tokenizer= go to it), or any nn.Module with forget_loss= and
    retain_loss= (`loss(module, batch) -> scalar tensor`).
    forget, retain: iterables of batches in the adapter's format (adapter.make_batches).
    criterion(model) -> bool or (bool, metrics): whether the concept is forgotten.
    strategy: "best" searches every front layer and keeps the one that meets the
    criterion with the highest `utility(model)` (or metrics["utility"]; else the
    smallest relative change); "deepest" searches the deepest front layer of each
    tower. `tower` restricts the choice to some towers. With apply=False the model
    is left unchanged and the result carries the delta. cache: each search evaluation
    re-runs only what the edit can change (slug_fast.fastsearch.upstream_replay), bit-identical
    to a plain one; "linear" also caches an edited Linear's products (equal within float32
    rounding); False evaluates plainly.
    Raises CriterionNotReached (model untouched) when no candidate meets the criterion.
    """
    if strategy not in STRATEGIES:
        raise SlugError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if cache not in (True, False, "linear"):
        raise SlugError(f"cache must be True, False or 'linear', got {cache!r}")
    if retain is None:
        raise SlugError("SLUG needs a retain set: pass retain batches (generic data to keep)")
    if adapter is None and detect_adapter(model) is None and not isinstance(model, Adapter):
        ad = GenericAdapter(model) if isinstance(model, nn.Module) and forget_loss and retain_loss \
            else get_adapter(model)  # raises, naming what to pass
    else:
        ad = get_adapter(model, adapter, **adapter_options)
    times = {}
    t0 = time.perf_counter()
    names = resolve_params(ad.target, params if params is not None else ad.param_names())
    rules = towers if towers is not None else (ad.towers or default_towers(names))
    if tower is not None:
        wanted = [tower] if isinstance(tower, str) else list(tower)
        for t in wanted:
            if t not in rules:
                raise SlugError(f"tower {t!r} not found; towers: {list(rules)}")
        rules = {t: rules[t] for t in wanted}
        if params is None:  # only the chosen towers' gradients are needed: the rest are never computed
            names = [n for n in names if any(matches(rule, n) for rule in rules.values())]
    grads = compute_gradients(ad.target, forget, retain, forget_loss or ad.forget_loss,
                              retain_loss or ad.retain_loss, params=names, progress=progress)
    t1 = time.perf_counter()
    times["gradients"] = t1 - t0

    named = dict(ad.target.named_parameters())
    stats = layer_stats({n: named[n] for n in grads.names}, grads.forget, grads.retain, backend)
    imp = stats.importance
    usable = [n for i, n in enumerate(stats.names) if eligible(n, tuple(named[n].shape)) and imp[i] > 0]
    if not usable:
        raise SlugError("no eligible layer has a nonzero forget gradient; eligible layers have >= 2 dims "
                        "and none of bias/norm/embedding/position/logit_scale in their names")
    tower_names = split_towers(usable, rules)
    fronts: dict[str, list[str]] = {}
    for t, members in tower_names.items():
        idx = [stats.index(n) for n in members]
        front = pareto_front(stats.alignment[idx], stats.importance[idx], backend=backend)
        fronts[t] = [members[i] for i in front]

    grouped = ad.group if group is None else group
    picks: list[tuple[str, list[str]]] = []
    for t, front in fronts.items():
        chosen = front if strategy == "best" else [deepest(front, grads.depth_order)]
        for name in chosen:
            layers = group_of(name, usable) if grouped else [name]
            if all(layers != p[1] for p in picks):
                picks.append((t, layers))
    directions_of = {n: grads.forget[n] for _, layers in picks for n in layers}
    del grads  # only the candidates' forget gradients are needed from here on
    t2 = time.perf_counter()
    times["select"] = t2 - t1

    candidates = []
    for t, layers in tqdm(picks, desc="step search", disable=None if progress is None else not progress,
                          leave=False):
        candidates.append(_search_layer(ad, t, layers, directions_of, stats, criterion, utility,
                                        max_evals, backend, cache))
    t3 = time.perf_counter()
    times["search"] = t3 - t2

    reached = [c for c in candidates if c.search.reached]
    if not reached:
        summary = "; ".join(f"{'+'.join(c.layers)}: up to step {max(e.step for e in c.search.trace):.4g}"
                            for c in candidates)
        raise CriterionNotReached(f"the criterion never held within {max_evals} evaluations per layer "
                                  f"({summary}); the model is unchanged. Raise max_evals or relax the "
                                  "criterion", [c.search for c in candidates])
    if all(c.utility is not None for c in reached):
        best = max(reached, key=lambda c: (c.utility, -c.relative_change))
    else:
        best = min(reached, key=lambda c: c.relative_change)

    targets = ad.edit_params(best.layers)
    scaled = {n: _scaled(directions_of[n], best.search.step, named[n].dtype) for n in best.layers}
    user_keys = [ad.delta_name(n) for n in best.layers]
    specs = {k: tensor_spec(targets[k][0]) for k in user_keys}
    delta = {k: scaled[n].cpu() for k, (_, n) in targets.items() if k in user_keys}
    edit_backend = "torch"
    if apply:
        params, moves = _edit_inputs(targets, scaled)
        with LayerEdit(params, moves, backend) as edit:
            edit.step(1.0)  # theta0 + delta: exactly what apply_delta reproduces
            edit.commit()
        edit_backend = edit.used_backend
    times["total"] = time.perf_counter() - t0
    return UnlearnResult(best.layers, user_keys, best.tower, best.search.step, best.relative_change,
                         best.search.trace, candidates, fronts, tower_names, stats, times, delta, specs, apply,
                         {"stats": stats.backend, "edit": edit_backend, "adapter": ad.name})


def _edit_inputs(targets: Mapping[str, tuple], directions: Mapping[str, torch.Tensor]):
    """(key -> tensor, key -> direction on that tensor's device) for a LayerEdit over mirrors too."""
    params = {k: p for k, (p, _) in targets.items()}
    moves = {k: directions[n].to(p.device) for k, (p, n) in targets.items()}
    return params, moves


def _scaled(direction: torch.Tensor, step: float, dtype: torch.dtype) -> torch.Tensor:
    """step * d rounded as LayerEdit rounds it (float32, float64 for float64 parameters)."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.tensor(step, dtype=compute, device=direction.device) * direction.to(compute)


def _search_layer(ad, tower, layers, directions_of, stats, criterion, utility, max_evals, backend, cache=True):
    rows = [stats.index(n) for n in layers]
    theta_norm = math.sqrt(float((stats.param_norm[rows] ** 2).sum()))
    grad_norm = math.sqrt(float((stats.forget_norm[rows] ** 2).sum()))
    start = start_step(theta_norm, grad_norm)
    model = ad.model

    params, moves = _edit_inputs(ad.edit_params(layers), directions_of)
    with LayerEdit(params, moves, backend) as edit, \
            (upstream_replay(ad.target, edit, linear=cache == "linear") if cache else contextlib.nullcontext()):
        def evaluate(step: float) -> tuple[bool, dict]:
            edit.step(step)
            return criterion_result(criterion(model))

        result = search_step(evaluate, start, max_evals)
        value = None
        if result.reached:
            if utility is not None:
                edit.step(result.step)
                value = float(utility(model))
            elif "utility" in result.best.metrics:
                value = float(result.best.metrics["utility"])
    # leaving the block restored theta0: nothing stays changed until the final commit
    rel = result.step * grad_norm / theta_norm if result.reached else None
    log.info("layers %s: %s", layers, f"step {result.step:.4g}" if result.reached else "criterion not reached")
    return Candidate(layers, tower, result, rel, value)
