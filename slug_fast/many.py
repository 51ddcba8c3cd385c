"""Many concepts at once: SLUG "can be used to unlearn multiple concepts simultaneously in a
controllable manner" (arXiv 2407.11867).

`unlearn_many` computes the retain gradient once and shares it; each concept gets its own
forget gradient, statistics against the shared retain gradient, Pareto fronts and step
search, in a stated order, each search running on the model that already carries the
earlier concepts' edits. Every criterion is then checked on the combined model; a concept
no longer forgotten has its step searched again there, for a bounded number of rounds. The
whole call is one transaction: it returns with every criterion met, or raises with the
model unchanged.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .adapters import Adapter
from .choice import best_candidate, grouping, select_candidates, usable_by_tower, usable_layers
from .config import SlugConfig, Unset, settings_of
from .delta import save_delta, tensor_spec
from .edit import LayerEdit
from .errors import CriterionNotReached, SlugError
from .gradients import GradientPass, Loss, Sums
from .pareto import NameRule
from .replay import DEFAULT_MAX_BYTES
from .search import criterion_result, search_step
from .stats import LayerStats, layer_stats
from .stores import FullStore
from .unlearn import Candidate, Criterion, Target, prepare, scaled_step, search_candidate, tower_fronts

ORDERS = ("given", "importance")


@dataclass
class ConceptResult:
    """One concept's outcome: the layer(s) it edits, its step and what finding them took."""

    name: str
    layers: list[str]  # names in the module SLUG differentiated
    edited: list[str]  # names in the user's object
    tower: str
    step: float
    relative_change: float
    candidates: list[Candidate]
    fronts: dict[str, list[str]]
    tower_members: dict[str, list[str]]  # the layers of each tower it chose among
    stats: LayerStats = field(repr=False)
    seconds: dict[str, float] = field(default_factory=dict)  # gradients, search, research (verification)
    researches: list[Candidate] = field(default_factory=list)  # its step searched again on the combined model

    @property
    def searches(self) -> int:
        """Step searches of the chosen layer(s): 1 + the re-searches on the combined model."""
        return 1 + len(self.researches)

    def to_dict(self) -> dict:
        return {"name": self.name, "layers": self.layers, "edited": self.edited, "tower": self.tower,
                "step": self.step, "relative_change": self.relative_change, "seconds": self.seconds,
                "searches": self.searches, "candidates": [c.to_dict() for c in self.candidates],
                "researches": [c.to_dict() for c in self.researches], "fronts": self.fronts}


@dataclass
class Interference:
    """Every concept's criterion on the model after each change: row i is the model after
    `after[i]` ("before": the original model; a concept's name: once its edit was added;
    "round k": after the k-th verification round's re-searches), column j the concept
    `concepts[j]`. `utility[i]` is utility(model) at row i (None without a utility)."""

    concepts: list[str]
    after: list[str] = field(default_factory=list)
    satisfied: list[list[bool]] = field(default_factory=list)
    metrics: list[list[dict]] = field(default_factory=list)
    utility: list[float | None] = field(default_factory=list)

    def add(self, label: str, outcomes: Sequence[tuple[bool, dict]], utility: float | None) -> None:
        self.after.append(label)
        self.satisfied.append([ok for ok, _ in outcomes])
        self.metrics.append([m for _, m in outcomes])
        self.utility.append(utility)

    def failing(self) -> list[str]:
        """The concepts whose criterion does not hold on the latest row."""
        return [c for c, ok in zip(self.concepts, self.satisfied[-1]) if not ok] if self.satisfied else []

    def metric_names(self) -> list[str]:
        """The numeric metrics every entry reports, in the first entry's order."""
        entries = [m for row in self.metrics for m in row]
        if not entries:
            return []
        return [k for k, v in entries[0].items() if _number(v) and all(_number(m.get(k)) for m in entries)]

    def values(self, metric: str) -> list[list[float]]:
        """The matrix of one numeric metric (NaN where an entry lacks it)."""
        return [[float(m[metric]) if _number(m.get(metric)) else math.nan for m in row] for row in self.metrics]

    def to_dict(self) -> dict:
        return {"concepts": self.concepts, "after": self.after, "satisfied": self.satisfied,
                "metrics": self.metrics, "utility": self.utility}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class ManyResult:
    """What `unlearn_many` chose and measured; `save(path)` writes one delta for all concepts."""

    order: list[str]
    concepts: dict[str, ConceptResult]
    interference: Interference
    rounds: int  # verification rounds that re-searched a step
    seconds: dict[str, float]
    delta: dict[str, torch.Tensor] = field(repr=False)  # user name -> the combined change of every concept
    specs: dict[str, dict] = field(repr=False)
    originals: dict[str, torch.Tensor] = field(repr=False)  # edited tensors before any edit
    applied: bool = True
    share_layers: bool = False
    config: SlugConfig | None = None
    backends: dict[str, str] = field(default_factory=dict)

    @property
    def edited(self) -> list[str]:
        return list(self.delta)

    def to_dict(self) -> dict:
        return {"order": self.order, "concepts": {n: c.to_dict() for n, c in self.concepts.items()},
                "interference": self.interference.to_dict(), "rounds": self.rounds, "seconds": self.seconds,
                "edited": self.edited, "applied": self.applied, "share_layers": self.share_layers,
                "backends": self.backends}

    def save(self, path: str | os.PathLike, revertible: bool = False):
        """Write the combined delta and every concept's provenance (name, order, layers, step)
        to directory `path`; `revertible` also stores the edited tensors' original bytes
        (slug_fast.revert_delta)."""
        meta = {"method": "slug-many", "layers": self.edited, "order": self.order, "share_layers": self.share_layers,
                "concepts": [{"name": c.name, "layers": c.edited, "target_layers": c.layers, "tower": c.tower,
                              "step": c.step, "relative_change": c.relative_change, "searches": c.searches}
                             for c in (self.concepts[n] for n in self.order)]}
        if self.config is not None:
            meta.update(strategy=self.config.strategy, group=self.config.group, cache=self.config.cache,
                        max_evals=self.config.max_evals, memory_mode="full")
        return save_delta(path, self.delta, self.specs, meta, self.originals if revertible else None)


class EditStack:
    """The concepts' edits on the live model: every touched tensor holds cast(theta0 + the
    sum of the concepts' scaled changes, in application order), written through LayerEdit
    exactly as apply_delta writes a delta, so the saved sum reproduces the model bit for bit."""

    def __init__(self, adapter: Adapter, backend: str):
        self.adapter, self.backend = adapter, backend
        self.theta0: dict[str, torch.Tensor] = {}  # key -> original value of every tensor touched
        self.tensors: dict[str, torch.Tensor] = {}
        self.parts: dict[str, dict[str, torch.Tensor]] = {}  # concept -> key -> its scaled change

    def put(self, concept: str, layers: Sequence[str], directions: Mapping[str, torch.Tensor], step: float) -> None:
        """Set `concept`'s change to step * its directions on `layers` (and their mirrors)."""
        part = {}
        for key, (tensor, name) in self.adapter.edit_params(layers).items():
            self.theta0.setdefault(key, tensor.detach().clone())
            self.tensors[key] = tensor
            part[key] = scaled_step(directions[name], step, tensor.dtype).to(tensor.device)
        old = self.parts.get(concept, {})
        self.parts[concept] = part
        self.write(set(part) | set(old))

    def combined(self, key: str, without: str | None = None) -> torch.Tensor | None:
        total = None
        for concept, part in self.parts.items():
            if concept != without and key in part:
                total = part[key].clone() if total is None else total.add_(part[key])
        return total

    def write(self, keys: Iterable[str], without: str | None = None) -> None:
        """Make `keys` hold theta0 + their combined change (leaving out concept `without`)."""
        moves, params = {}, {}
        with torch.no_grad():
            for key in keys:
                self.tensors[key].data.copy_(self.theta0[key])
                change = self.combined(key, without)
                if change is not None:
                    params[key], moves[key] = self.tensors[key], change
        if params:
            with LayerEdit(params, moves, self.backend) as edit:
                edit.step(1.0)
                edit.commit()

    @contextlib.contextmanager
    def original(self):
        """The touched tensors hold theta0 inside the block, their edits again after it."""
        with torch.no_grad():
            for key, t in self.tensors.items():
                t.data.copy_(self.theta0[key])
        try:
            yield
        finally:
            self.write(list(self.tensors))

    def restore(self) -> None:
        with torch.no_grad():
            for key, t in self.tensors.items():
                t.data.copy_(self.theta0[key])


@dataclass
class _Prepared:
    """A concept after its gradient pass at theta0: what its searches need."""

    name: str
    forget: Iterable
    criterion: Criterion
    stats: LayerStats
    depth_order: list[str]
    directions: dict[str, torch.Tensor]  # forget gradients of the layers its first choice would search
    seconds: float


def unlearn_many(model, concepts: Mapping[str, tuple[Iterable, Criterion]], retain: Iterable, *,
                 order: str | Sequence[str] = "given", share_layers: bool = False, max_rounds: int = 3,
                 config: SlugConfig | None = None, adapter: str | Adapter | None = None,
                 forget_loss: Loss | None = None, retain_loss: Loss | None = None, params: Sequence[str] | None = None,
                 towers: Mapping[str, NameRule] | None = None, tower: str | Sequence[str] | None = Unset("tower"),
                 strategy: str = Unset("strategy"), eligible: Callable[[str, Sequence[int]], bool] | None = None,
                 group: bool | None = Unset("group"), max_evals: int = Unset("max_evals"),
                 utility: Callable[[object], float] | None = None, apply: bool = True, progress: bool | None = None,
                 backend: str = Unset("backend"), cache: bool | str = Unset("cache"),
                 checkpointing: bool = Unset("checkpointing"), memory_budget: int | str | None = Unset("memory_budget"),
                 store: str = Unset("store"), passes: int | None = Unset("passes"),
                 **adapter_options) -> ManyResult:
    """Unlearn several concepts with SLUG in one transaction, sharing one retain gradient.

    concepts: name -> (forget batches, criterion), each as `unlearn` takes them; retain: the
    retain batches, differentiated once for all concepts.
    order: "given" (the mapping's order), "importance" (the concept with the most important
    layer first: max ||g_f|| / ||theta||), or every name in the order wanted. Concepts are
    applied in that order, each one's step searched on the model carrying the earlier edits.
    share_layers: whether a concept may edit a tensor an earlier concept edits (their changes
    then add up in one LayerEdit); when False, a concept searches among the layers left.
    max_rounds: verification rounds: after all edits every criterion runs on the combined
    model, and each concept whose criterion fails has its step searched again there, from
    its step so far, the other edits in place. Should some still fail after max_rounds
    rounds, one more search scales every concept's step by a common factor t >= 1 until
    every criterion holds (max_evals evaluations).
    The other keywords are `unlearn`'s (the full gradient store only: memory_budget, store
    and passes apply to `unlearn`). Returns a ManyResult; raises CriterionNotReached with the
    model unchanged when a concept is not reached, or still fails after max_rounds rounds.
    """
    settings = settings_of(config, dict(
        strategy=strategy, tower=tower, group=group, max_evals=max_evals, cache=cache, backend=backend,
        checkpointing=checkpointing, memory_budget=memory_budget, store=store, passes=passes))
    if settings.memory_budget is not None or settings.store not in ("auto", "full") or settings.passes is not None:
        raise SlugError("unlearn_many keeps each concept's gradients in memory (the full store): leave "
                        "memory_budget, store and passes unset (they apply to unlearn)")
    checked = _checked_concepts(concepts)
    names_in_order = _checked_order(order, list(checked))
    if type(max_rounds) is not int or max_rounds < 0:
        raise SlugError(f"max_rounds must be a non-negative integer, got {max_rounds!r}")
    if utility is not None and not callable(utility):
        raise SlugError(f"utility must be callable, utility(model) -> float; got {type(utility).__name__}")
    if retain is None:
        raise SlugError("SLUG needs a retain set: pass retain batches (generic data to keep)")
    backend, cache = settings.backend, settings.cache
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    target = prepare(model, adapter=adapter, forget_loss=forget_loss, retain_loss=retain_loss, params=params,
                     towers=towers, tower=settings.tower, eligible=eligible, group=settings.group,
                     adapter_options=adapter_options)
    ad = target.adapter
    f_loss, r_loss = forget_loss or ad.forget_loss, retain_loss or ad.retain_loss
    ckpt = ad.activation_checkpointing if settings.checkpointing else None

    def gradient_pass(forget, retain_set) -> GradientPass:
        return GradientPass(ad.target, forget, retain_set, f_loss, r_loss, target.names, progress=progress,
                            checkpointing=ckpt)

    retain_grads = shared_retain_gradients(gradient_pass(None, retain))
    times["retain_gradients"] = time.perf_counter() - t0
    prepared = {}
    for name in tqdm(names_in_order, desc="forget gradients", disable=None if progress is None else not progress,
                     leave=False):
        forget, criterion = checked[name]
        prepared[name] = _prepare_concept(name, forget, criterion, gradient_pass(forget, None), retain_grads,
                                          target, settings.strategy, backend)
    del retain_grads
    times["gradients"] = time.perf_counter() - t0
    if order == "importance":
        names_in_order.sort(key=lambda n: -_top_importance(prepared[n].stats))

    stack = EditStack(ad, backend)
    interference = Interference(list(names_in_order))
    results: dict[str, ConceptResult] = {}
    run = _Run(model, ad, target, prepared, stack, interference, utility, settings.max_evals, backend, cache,
               settings.strategy)
    try:
        run.record("before")
        taken: set[str] = set()
        for name in names_in_order:
            results[name] = run.choose(name, set() if share_layers else taken, gradient_pass)
            taken.update(results[name].layers)
            run.record(name)
        times["search"] = time.perf_counter() - t0 - times["gradients"]
        rounds = 0
        while interference.failing() and rounds < max_rounds:
            rounds += 1
            for i, name in enumerate(interference.failing()):
                run.research(results[name], seen_failing=i == 0)  # later ones: the model changed since the row
            run.record(f"round {rounds}")
        if interference.failing():
            run.scale_together(results)
        if failing := interference.failing():
            raise CriterionNotReached(
                f"after {rounds} verification round(s) and a common scale of every step, {failing} no longer "
                f"meet(s) the criterion on the model carrying every concept's edit; the model is unchanged. "
                f"Raise max_rounds or max_evals, pass share_layers={not share_layers}, or unlearn these concepts "
                "apart", [c.search for r in results.values() for c in [*r.candidates, *r.researches]])
        user_keys = [ad.delta_name(n) for r in (results[n] for n in names_in_order) for n in r.layers]
        user_keys = list(dict.fromkeys(user_keys))
        delta = {k: stack.combined(k).cpu() for k in user_keys}
        originals = {k: stack.theta0[k].cpu() for k in user_keys}
        specs = {k: tensor_spec(originals[k], delta[k]) for k in user_keys}
        if not apply:
            stack.restore()
    except BaseException:
        stack.restore()  # transactional: the model as it came in
        raise
    times["verify"] = time.perf_counter() - t0 - times["gradients"] - times["search"]
    times["total"] = time.perf_counter() - t0
    return ManyResult(list(names_in_order), {n: results[n] for n in names_in_order}, interference, rounds, times,
                      delta, specs, originals, apply, share_layers,
                      dataclasses.replace(settings, group=grouping(ad, settings.group)),
                      {"stats": next(iter(results.values())).stats.backend, "adapter": ad.name})


def shared_retain_gradients(run: GradientPass) -> dict[str, torch.Tensor]:
    """The retain set's mean gradient, once for every concept: the same pass, sums and
    rounding as the full store's, so it equals a single `unlearn`'s g_r bit for bit."""
    sums = Sums(run.params(run.names))
    run.run({"retain": sums})
    return sums.means(run.counts["retain"])


def _prepare_concept(name, forget, criterion, run: GradientPass, retain_grads, target: Target, strategy: str,
                     backend: str) -> _Prepared:
    t0 = time.perf_counter()
    store = FullStore()
    store.collect(run)
    stats = layer_stats(run.params(store.forget), store.forget, retain_grads, backend)
    picks = _picks(stats, target, set(), strategy, run.depth_order, backend)[2]
    keep = {n for _, layers in picks for n in layers}
    directions = {n: store.forget[n] for n in keep}
    return _Prepared(name, forget, criterion, stats, list(run.depth_order or target.names), directions,
                     time.perf_counter() - t0)


def _picks(stats: LayerStats, target: Target, taken: set[str], strategy: str, depth_order, backend: str,
           stats_name: str = ""):
    """(tower members, fronts, picks) of one concept among its usable layers, leaving out those `taken` by
    earlier concepts and every layer that would move with one of them."""
    usable = usable_layers(stats.names, stats.importance.tolist())
    if taken:
        usable = [n for n in usable if not taken & set(target.grouped(n, stats.names))]
        if not usable:
            raise _no_layer_left(stats_name)
    importance = [float(stats.importance[stats.index(n)]) for n in usable]
    members = usable_by_tower(usable, importance, target.rules)
    fronts = tower_fronts(stats, members, backend)
    return members, fronts, select_candidates(fronts, strategy, usable, target.grouped, depth_order)


def _top_importance(stats: LayerStats) -> float:
    values = [v for v in stats.importance.tolist() if not math.isnan(v)]
    return max(values, default=0.0)


class _Run:
    """unlearn_many's state once the gradients are in: each concept's choice and re-searches
    on the live model, and the interference rows."""

    def __init__(self, model, ad, target, prepared, stack, interference, utility, max_evals, backend, cache,
                 strategy):
        self.model, self.ad, self.target, self.prepared = model, ad, target, prepared
        self.stack, self.interference, self.utility = stack, interference, utility
        self.max_evals, self.backend, self.cache, self.strategy = max_evals, backend, cache, strategy
        self.directions: dict[str, dict[str, torch.Tensor]] = {}

    def record(self, label: str) -> None:
        outcomes = [criterion_result(self.prepared[n].criterion(self.model)) for n in self.interference.concepts]
        value = float(self.utility(self.model)) if self.utility is not None else None
        self.interference.add(label, outcomes, value)

    def choose(self, name: str, taken: set[str], gradient_pass) -> ConceptResult:
        """The concept's candidates searched on the model as it is now; the best one added."""
        p = self.prepared[name]
        t0 = time.perf_counter()
        members, fronts, picks = _picks(p.stats, self.target, taken, self.strategy, p.depth_order, self.backend,
                                        name)
        directions = dict(p.directions)
        missing = [n for _, layers in picks for n in layers if n not in directions]
        if missing:  # layers outside the first choice: their forget gradients again, at theta0
            with self.stack.original():
                directions.update(_forget_gradients(gradient_pass(p.forget, None), missing))
        candidates = [search_candidate(self.ad, t, layers, directions, p.stats, p.criterion, self.utility,
                                       self.max_evals, self.backend, self.cache, DEFAULT_MAX_BYTES)
                      for t, layers in picks]
        reached = [c for c in candidates if c.search.reached]
        if not reached:
            where = " on the model carrying the earlier concepts' edits" if self.stack.parts else ""
            raise CriterionNotReached(f"concept {name!r}: the criterion never held within {self.max_evals} "
                                      f"evaluations per layer{where}; the model is unchanged. Raise max_evals or "
                                      "relax the criterion", [c.search for c in candidates])
        best = best_candidate(reached)
        self.directions[name] = {n: directions[n] for n in best.layers}
        self.stack.put(name, best.layers, self.directions[name], best.search.step)
        return ConceptResult(name, best.layers, [self.ad.delta_name(n) for n in best.layers], best.tower,
                             best.search.step, best.relative_change, candidates, fronts, members, p.stats,
                             {"gradients": p.seconds, "search": time.perf_counter() - t0})

    def scale_together(self, results: Mapping[str, ConceptResult]) -> None:
        """Every concept's step times a common t >= 1, searched (double, then bisect) until
        every criterion holds; the steps are left scaled by the t found, or as they were."""
        steps = {n: r.step for n, r in results.items()}

        def scale(t: float) -> None:
            for name, r in results.items():
                self.stack.put(name, r.layers, self.directions[name], steps[name] * t)

        def evaluate(t: float) -> tuple[bool, dict]:
            scale(t)
            outcomes = [criterion_result(self.prepared[n].criterion(self.model)) for n in self.interference.concepts]
            return all(ok for ok, _ in outcomes), {"scale": t}

        found = search_step(evaluate, 2.0, self.max_evals, fails_at=1.0)  # t = 1 is the row that failed
        scale(found.step if found.reached else 1.0)
        if found.reached:
            for name, r in results.items():
                r.step, r.relative_change = steps[name] * found.step, r.relative_change * found.step
            self.record(f"scaled x{found.step:.4g}")

    def research(self, result: ConceptResult, seen_failing: bool) -> None:
        """The concept's step searched again on the model carrying every other concept's edit;
        from twice its current step when the last row saw that step fail on this very model,
        else from the current step."""
        p = self.prepared[result.name]
        t0 = time.perf_counter()
        keys = list(self.ad.edit_params(result.layers))
        self.stack.write(keys, without=result.name)  # the search's base: every other concept's edit
        try:
            again = search_candidate(self.ad, result.tower, result.layers, self.directions[result.name], p.stats,
                                     p.criterion, self.utility, self.max_evals, self.backend, self.cache,
                                     DEFAULT_MAX_BYTES, start=(2 if seen_failing else 1) * result.step,
                                     fails_at=result.step if seen_failing else 0.0)
        finally:
            self.stack.write(keys)
        result.researches.append(again)
        result.seconds["research"] = result.seconds.get("research", 0.0) + time.perf_counter() - t0
        if again.search.reached:
            result.step, result.relative_change = again.search.step, again.relative_change
            self.stack.put(result.name, result.layers, self.directions[result.name], result.step)


def _no_layer_left(name: str) -> SlugError:
    return SlugError(f"concept {name!r}: every layer it could edit is taken by earlier concepts; pass "
                     "share_layers=True to let concepts edit the same tensor, or change the order")


def _forget_gradients(run: GradientPass, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Forget gradients of a few layers: every layer requires grad as in the first pass (the
    same forward), backward restricted to `names`, so they equal that pass's bit for bit."""
    sums = Sums(run.params(names))
    run.run({"forget": sums})
    return sums.means(run.counts["forget"])


def _checked_concepts(concepts) -> dict[str, tuple[Iterable, Criterion]]:
    if not isinstance(concepts, Mapping) or not concepts:
        raise SlugError("concepts must be a non-empty mapping of name -> (forget batches, criterion)")
    out = {}
    for name, value in concepts.items():
        if not isinstance(name, str) or not name:
            raise SlugError(f"concept names must be non-empty strings, got {name!r}")
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise SlugError(f"concept {name!r} must map to (forget batches, criterion), got {type(value).__name__}")
        forget, criterion = value
        if not callable(criterion):
            raise SlugError(f"concept {name!r}: criterion must be callable, criterion(model) -> bool or "
                            f"(bool, metrics); got {type(criterion).__name__}")
        if forget is None:
            raise SlugError(f"concept {name!r} has no forget batches")
        if iter(forget) is forget:
            raise SlugError(f"concept {name!r}: the forget batches are a one-shot iterator, but a concept's "
                            "forget set may be read again; pass a list of batches or a DataLoader")
        out[name] = (forget, criterion)
    return out


def _checked_order(order, names: list[str]) -> list[str]:
    if isinstance(order, str):
        if order not in ORDERS:
            raise SlugError(f"order must be one of {ORDERS} or a list of every concept name, got {order!r}")
        return list(names)
    wanted = list(order) if isinstance(order, Sequence) else None
    if wanted is None or sorted(wanted) != sorted(names):
        raise SlugError(f"order must list every concept exactly once ({names}), got {order!r}")
    return wanted
