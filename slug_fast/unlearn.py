"""The facade: gradients -> layer statistics -> Pareto fronts -> step search -> one edit."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .adapters import Adapter, GenericAdapter, detect_adapter, get_adapter
from .choice import (GroupOf, best_candidate, fronts_of, group_rule, grouping, in_towers, select_candidates,
                     tower_rules, usable_by_tower, usable_layers)
from .config import SlugConfig, Unset, settings_of
from .delta import save_delta, tensor_spec
from .edit import LayerEdit
from .errors import CriterionNotReached, SlugError
from .replay import DEFAULT_MAX_BYTES, upstream_replay
from .gradients import GradientPass, Loss, resolve_params
from .memory import MAX_PREFERRED_PASSES, MemoryPlan, MemoryReport, PeakMeter, format_bytes, plan
from .pareto import NameRule, pareto_front
from .search import Evaluation, SearchResult, criterion_result, search_step, start_step
from .stats import LayerStats
from .stores import ChunkedStore, FullStore, Gradients, OffloadStore, layers_of

log = logging.getLogger("slug_fast")

Criterion = Callable[[object], "bool | tuple[bool, dict]"]


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
    memory: MemoryReport | None = None
    # on several processes: {"rank", "world", "partition", "batches" (global counts), "sent" (payload bytes)}
    ranks: dict | None = None
    config: SlugConfig | None = None  # the settings used, group None resolved to the adapter's default
    originals: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # edited tensors before the edit

    @property
    def writes(self) -> bool:
        """Whether this process saves outputs: always alone, rank 0 only among several."""
        return self.ranks is None or self.ranks["rank"] == 0

    def to_dict(self, with_stats: bool = False) -> dict:
        """A JSON-ready summary (the full per-layer table with `with_stats`)."""
        out = {
            "layers": self.layers, "edited": self.edited, "tower": self.tower, "step": self.step,
            "relative_change": self.relative_change, "applied": self.applied,
            "trace": [{"step": e.step, "satisfied": e.satisfied, "metrics": e.metrics,
                       "seconds": e.seconds} for e in self.trace],
            "candidates": [c.to_dict() for c in self.candidates],
            "fronts": self.fronts, "seconds": self.seconds, "backends": self.backends,
            "memory": self.memory.to_dict() if self.memory is not None else None,
            "ranks": self.ranks,
        }
        if with_stats:
            out["stats"] = self.stats.rows()
        return out

    def save(self, path: str | os.PathLike, revertible: bool = False):
        """Write the delta (only the changed tensors) and its config to directory `path`;
        among several processes only rank 0 writes (the others return None). `revertible`
        also stores the edited tensors' original bytes, for slug_fast.revert_delta."""
        if not self.writes:
            return None
        meta = {"method": "slug", "layers": self.edited, "target_layers": self.layers, "tower": self.tower,
                "step": self.step, "relative_change": self.relative_change}
        if self.config is not None:  # the run's settings (DeltaConfig's fields)
            meta.update(strategy=self.config.strategy, group=self.config.group, cache=self.config.cache,
                        max_evals=self.config.max_evals)
        if self.memory is not None:
            meta["memory_mode"] = self.memory.mode
        return save_delta(path, self.delta, self.specs, meta, self.originals if revertible else None)


@dataclass
class Target:
    """What a run differentiates and may edit, resolved before any gradient (see `prepare`)."""

    adapter: Adapter
    named: dict[str, nn.Parameter]  # the adapter's target parameters by name
    names: list[str]  # the eligible layers to differentiate
    rules: dict[str, NameRule]  # tower -> name rule, restricted to `tower`
    grouped: GroupOf  # the layers a chosen layer moves with


def prepare(model, *, adapter: str | Adapter | None, forget_loss: Loss | None, retain_loss: Loss | None,
            params: Sequence[str] | None, towers: Mapping[str, NameRule] | None, tower: str | Sequence[str] | None,
            eligible: Callable[[str, Sequence[int]], bool] | None, group: bool | None,
            adapter_options: Mapping) -> Target:
    """The adapter for `model` and the layers a run differentiates (see `unlearn`'s arguments)."""
    if adapter is None and detect_adapter(model) is None and not isinstance(model, Adapter):
        ad = GenericAdapter(model) if isinstance(model, nn.Module) and forget_loss and retain_loss \
            else get_adapter(model)  # raises, naming what to pass
    else:
        ad = get_adapter(model, adapter, **adapter_options)
    distributed.reshard(ad.target)  # an FSDP root keeps its parameters gathered after a forward
    names = resolve_params(ad.target, params if params is not None else ad.param_names())
    named = dict(ad.target.named_parameters())
    # only layers that can be chosen are differentiated: no gradient is spent on the rest
    names = [n for n in names if (eligible or ad.eligible)(n, tuple(named[n].shape))]
    rules = tower_rules(towers, ad, names, tower)
    if tower is not None and params is None:  # only the chosen towers' gradients are computed
        names = in_towers(names, rules)
    if not names:
        raise SlugError("no eligible layer to differentiate; eligible layers have >= 2 dims and none of "
                        "bias/norm/embedding/position/logit_scale in their names")
    return Target(ad, named, names, rules, group_rule(ad, group))


def unlearn(model, forget: Iterable, retain: Iterable, criterion: Criterion, *, config: SlugConfig | None = None,
            adapter: str | Adapter | None = None, forget_loss: Loss | None = None,
            retain_loss: Loss | None = None, params: Sequence[str] | None = None,
            towers: Mapping[str, NameRule] | None = None, tower: str | Sequence[str] | None = Unset("tower"),
            strategy: str = Unset("strategy"), eligible: Callable[[str, Sequence[int]], bool] | None = None,
            group: bool | None = Unset("group"), max_evals: int = Unset("max_evals"),
            utility: Callable[[object], float] | None = None, apply: bool = True,
            progress: bool | None = None, backend: str = Unset("backend"), cache: bool | str = Unset("cache"),
            memory_budget: int | str | None = Unset("memory_budget"), store: str = Unset("store"),
            passes: int | None = Unset("passes"), checkpointing: bool = Unset("checkpointing"), process_group=None,
            partition: str = Unset("partition"), **adapter_options) -> UnlearnResult:
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
    tower. `tower` restricts the choice to some towers; `towers` ({name: rule}) replaces the
    adapter's. eligible(name, shape) -> bool: which layers may be chosen (default: the
    adapter's, >= 2 dims and no bias/norm/embedding/... word). group: a chosen layer moves
    with the partners its adapter groups it with (HF q/k/v_proj, fc1/fc2; None: the
    adapter's default; False: alone). With apply=False the model
    is left unchanged and the result carries the delta. cache: each search evaluation
    re-runs only what the edit can change (slug_fast.replay.upstream_replay), bit-identical
    to a plain one; "linear" also caches an edited Linear's products (equal within float32
    rounding); False evaluates plainly.
    memory_budget: bytes SLUG may use above the loaded model and data (an int, "12GB",
    "512MiB", or "0.5x" the differentiated weights); the engine predicts each store's peak
    (one forward of the first forget batch measures the activations), logs its plan and
    picks `store`: "full" (every gradient at once), "chunked" (statistics in several
    passes, a group of layers each; `passes` fixes their number) or "offload" (sums in host
    memory, a model on a GPU); "auto" takes full if it fits, else the fewest chunked passes
    that fit, else offload. All give the same statistics, layer, step and delta. A budget
    no plan fits raises SlugError before any gradient is computed, stating the minimum.
    checkpointing: recompute activations in backward through the adapter's own switch
    (open_clip set_grad_checkpointing, transformers activation checkpointing), restored after.
    result.memory records the plan and the measured peak.
    process_group: run on several processes (torch.distributed; default: the world group
    when it is initialised with more than one process, False: alone). Every rank passes
    its own share of the batches (slug_fast.data.shard) and the same criterion, which runs
    on every rank, rank 0's verdict deciding; the result, layer, step and delta are the
    same on every rank, and only rank 0's result.save() writes. partition: "owner" (each
    rank keeps 1/N of the gradients, reduced during backward) or "replicated" (each rank
    all of them, reduced once per pass); an FSDP2 (fully_shard) model keeps its own
    shards. See slug_fast.distributed.
    config: a SlugConfig holding the settings (strategy, tower, group, max_evals, cache,
    backend, memory_budget, store, passes, checkpointing, partition) instead of those keywords;
    a setting given both ways raises SlugError. result.config records the settings used.
    Raises CriterionNotReached (model untouched) when no candidate meets the criterion.
    """
    # every argument is checked before the gradient pass: a typo never costs a pass
    settings = settings_of(config, dict(
        strategy=strategy, tower=tower, group=group, max_evals=max_evals, cache=cache, backend=backend,
        memory_budget=memory_budget, store=store, passes=passes, checkpointing=checkpointing, partition=partition))
    strategy, tower, group, max_evals = settings.strategy, settings.tower, settings.group, settings.max_evals
    cache, backend, store, passes = settings.cache, settings.backend, settings.store, settings.passes
    checkpointing, partition = settings.checkpointing, settings.partition
    if not callable(criterion):
        raise SlugError(f"criterion must be callable, criterion(model) -> bool or (bool, metrics); got "
                        f"{type(criterion).__name__}")
    if utility is not None and not callable(utility):
        raise SlugError(f"utility must be callable, utility(model) -> float; got {type(utility).__name__}")
    if retain is None:
        raise SlugError("SLUG needs a retain set: pass retain batches (generic data to keep)")
    budget_spec = settings.budget
    ranks = distributed.resolve(process_group)
    if ranks is not None:
        settings.check_several_processes()
        if ranks.rank != 0:
            progress = False
    times = {}
    t0 = time.perf_counter()
    target = prepare(model, adapter=adapter, forget_loss=forget_loss, retain_loss=retain_loss, params=params,
                     towers=towers, tower=tower, eligible=eligible, group=group, adapter_options=adapter_options)
    ad, named, names, rules, grouped = target.adapter, target.named, target.names, target.rules, target.grouped
    device = named[names[0]].device
    meter = PeakMeter(device).start()
    run = GradientPass(ad.target, forget, retain, forget_loss or ad.forget_loss, retain_loss or ad.retain_loss,
                       names, progress=progress,
                       checkpointing=ad.activation_checkpointing if checkpointing else None)
    sharded = ranks is not None and distributed.is_fsdp(ad.target)
    memory_plan, activations, full_need = _plan_memory(run, names, budget_spec, store, passes, grouped, device)
    log.info("%s", memory_plan.describe())
    if memory_plan.passes > 2 * MAX_PREFERRED_PASSES and passes is None and not checkpointing:
        log.warning("the budget leaves room for few gradients beside one batch's activations (%s): %d passes; "
                    "checkpointing=True or smaller batches would need fewer", format_bytes(activations),
                    memory_plan.passes)

    def keep(seen: LayerStats) -> list[str]:  # the chunked store keeps the running fronts' forget gradients
        fronts_now = tower_fronts(seen, stats_by_tower(seen, rules, complete=False), backend)
        wanted = [m for front in fronts_now.values() for n in front
                  for m in grouped(n, seen.names)]
        depth = {n: i for i, n in enumerate(run.depth_order or names)}
        return sorted(dict.fromkeys(wanted), key=lambda n: -depth.get(n, -1))

    gradient_store = _store_for(memory_plan, keep, backend) if ranks is None else \
        distributed.store_for(ad.target, ranks, partition)
    gradient_store.collect(run)
    grads = Gradients(gradient_store, run)
    t1 = time.perf_counter()
    times["gradients"] = t1 - t0

    stats = grads.layer_stats(backend)
    tower_names = stats_by_tower(stats, rules)
    fronts = tower_fronts(stats, tower_names, backend)
    picks = select_candidates(fronts, strategy, usable_layers(stats.names, stats.importance.tolist()), grouped,
                              grads.depth_order)
    directions_of = grads.directions([n for _, layers in picks for n in layers])
    passes_run, final_pass = gradient_store.passes, gradient_store.final_pass
    gradient_counts = getattr(gradient_store, "counts", {})
    gradient_peak = getattr(gradient_store, "peak_bytes", None)
    del grads, gradient_store, run  # only the candidates' forget gradients are needed from here on
    t2 = time.perf_counter()
    times["select"] = t2 - t1

    budget = memory_plan.budget
    cache_bytes = DEFAULT_MAX_BYTES if budget is None else \
        max(0, min(DEFAULT_MAX_BYTES, budget - sum(d.numel() * d.element_size() for d in directions_of.values())))
    candidates = []
    for t, layers in tqdm(picks, desc="step search", disable=None if progress is None else not progress,
                          leave=False):
        candidates.append(search_candidate(ad, t, layers, directions_of, stats, criterion, utility,
                                           max_evals, backend, False if sharded else cache, cache_bytes, ranks))
    t3 = time.perf_counter()
    times["search"] = t3 - t2

    reached = [c for c in candidates if c.search.reached]
    if not reached:
        summary = "; ".join(f"{'+'.join(c.layers)}: up to step {max(e.step for e in c.search.trace):.4g}"
                            for c in candidates)
        raise CriterionNotReached(f"the criterion never held within {max_evals} evaluations per layer "
                                  f"({summary}); the model is unchanged. Raise max_evals or relax the "
                                  "criterion", [c.search for c in candidates])
    best = best_candidate(reached)

    distributed.reshard(ad.target)
    targets = ad.edit_params(best.layers)
    scaled = {n: scaled_step(directions_of[n], best.search.step, named[n].dtype) for n in best.layers}
    user_keys = [ad.delta_name(n) for n in best.layers]
    originals = {k: distributed.full(targets[k][0]).detach().clone() for k in user_keys}
    delta = distributed.gather_full({k: scaled[n] for k, (_, n) in targets.items() if k in user_keys})
    specs = {k: tensor_spec(originals[k], delta[k]) for k in user_keys}
    edit_backend = "torch"
    if apply:
        params, moves = edit_inputs(targets, scaled)
        with LayerEdit(params, moves, backend) as edit:
            # theta0 + delta: exactly what apply_delta reproduces; on several ranks, each
            # keeps it only when every rank made it (else every rank's block restores)
            _together(ranks, lambda: edit.step(1.0), "applying the edit")
            edit.commit()
        edit_backend = edit.used_backend
    times["total"] = time.perf_counter() - t0
    meter.stop()
    report = MemoryReport(memory_plan.mode, passes_run, budget,
                          memory_plan.predicted_peak if activations is not None else None, meter.peak(),
                          meter.source, sum(named[n].numel() * named[n].element_size() for n in names),
                          activations, checkpointing, final_pass, [len(g) for g in memory_plan.groups],
                          dict(memory_plan.predicted), full_need, gradient_peak)
    shared = None if ranks is None else {
        "rank": ranks.rank, "world": ranks.world, "partition": "fsdp" if sharded else partition,
        "batches": dict(gradient_counts), "sent": dict(ranks.sent)}
    return UnlearnResult(best.layers, user_keys, best.tower, best.search.step, best.relative_change,
                         best.search.trace, candidates, fronts, tower_names, stats, times, delta, specs, apply,
                         {"stats": stats.backend, "edit": edit_backend, "adapter": ad.name}, report, shared,
                         dataclasses.replace(settings, group=grouping(ad, group)), originals)


def _plan_memory(run: GradientPass, names: list[str], budget_spec, store: str, passes: int | None, grouped: GroupOf,
                 device: torch.device) -> tuple[MemoryPlan, int | None, int | None]:
    """The gradient store's plan, the measured activation bytes of one batch and the full
    store's predicted peak (both None when no plan was needed: the full store without a
    budget runs without the probe forward)."""
    layers = layers_of(run, names)
    weight_bytes = sum(l.bytes for l in layers)
    budget = budget_spec.resolve(weight_bytes) if budget_spec is not None else None
    if budget is None and store in ("auto", "full"):
        state = sum(l.state_bytes for l in layers)
        return MemoryPlan("full", [list(names)], None, {"gradients": state}, device=str(device)), None, None
    probe = run.probe()
    position = {n: i for i, n in enumerate(names)}
    units, seen = [], set()
    for name in probe.use_order[::-1]:  # deepest first, HF q/k/v and fc1/fc2 never split
        if name in seen:
            continue
        members = [m for m in grouped(name, names) if m not in seen]
        seen.update(members)
        units.append(layers_of(run, sorted(members, key=position.get)))
    sizes = dict(activations=probe.activation_bytes, largest_activation=probe.largest_activation,
                 forward_transient=probe.forward_transient, device=device)
    chosen = plan(units, budget=budget, mode=store, passes=passes, **sizes)
    return chosen, probe.activation_bytes, plan(units, budget=None, mode="full", **sizes).predicted_peak


def _store_for(memory_plan: MemoryPlan, keep, backend: str):
    if memory_plan.mode == "chunked":
        return ChunkedStore(groups=memory_plan.groups, keep=keep, keep_bytes=memory_plan.keep_bytes, backend=backend)
    if memory_plan.mode == "offload":
        return OffloadStore(backend=backend, stream_bytes=memory_plan.stream_bytes)
    return FullStore()


def stats_by_tower(stats: LayerStats, rules, complete: bool = True) -> dict[str, list[str]]:
    return usable_by_tower(stats.names, stats.importance.tolist(), rules, complete)


def tower_fronts(stats: LayerStats, tower_names: Mapping[str, list[str]], backend: str) -> dict[str, list[str]]:
    """The Pareto front of each tower among its usable layers."""
    def front(members: list[str]) -> list[int]:
        idx = [stats.index(n) for n in members]
        # host values: the front's one kernel is the CPU one, whatever backend the tensors use
        return pareto_front(stats.alignment[idx], stats.importance[idx],
                            backend="torch" if backend == "torch" else "auto")

    return fronts_of(tower_names, front)


def edit_inputs(targets: Mapping[str, tuple], directions: Mapping[str, torch.Tensor]):
    """(key -> tensor, key -> direction on that tensor's device) for a LayerEdit over mirrors
    too (an FSDP model's DTensors as they are: LayerEdit edits this rank's shards)."""
    params = {k: p for k, (p, _) in targets.items()}
    moves = {k: directions[n].to(p.device) for k, (p, n) in targets.items()}
    return params, moves


def scaled_step(direction: torch.Tensor, step: float, dtype: torch.dtype) -> torch.Tensor:
    """step * d rounded as LayerEdit rounds it (float32, float64 for float64 parameters);
    a DTensor direction is scaled shard by shard."""
    if distributed.is_dtensor(direction):
        from torch.distributed.tensor import DTensor

        part = scaled_step(direction.to_local(), step, dtype)
        return DTensor.from_local(part, direction.device_mesh, direction.placements, run_check=False,
                                  shape=direction.shape, stride=direction.stride())
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.tensor(step, dtype=compute, device=direction.device) * direction.to(compute)


def _together(ranks, fn: Callable[[], object], what: str):
    """fn() here, or on every rank with any rank's failure raised on all (distributed.Ranks.agree)."""
    return fn() if ranks is None else ranks.agree(fn, what)


def _verdict(ranks, fn: Callable[[], object], what: str):
    """fn() here, or on every rank with rank 0's result for all (distributed.Ranks.decide)."""
    return fn() if ranks is None else ranks.decide(fn, what)


def search_candidate(ad, tower, layers, directions_of, stats, criterion, utility, max_evals, backend, cache=True,
                     cache_bytes=DEFAULT_MAX_BYTES, ranks=None, start: float | None = None,
                     fails_at: float = 0.0) -> Candidate:
    """Step search of one candidate (`layers`, moving along `directions_of`) on the model as it
    is now, which is restored afterwards; `start` defaults to SLUG's start step, `fails_at` is
    a step known to fail (search_step)."""
    rows = [stats.index(n) for n in layers]
    theta_norm = math.sqrt(float((stats.param_norm[rows] ** 2).sum()))
    grad_norm = math.sqrt(float((stats.forget_norm[rows] ** 2).sum()))
    if start is None:
        start = start_step(theta_norm, grad_norm)
    model = ad.model

    distributed.reshard(ad.target)
    params, moves = edit_inputs(ad.edit_params(layers), directions_of)
    with LayerEdit(params, moves, backend) as edit, \
            (upstream_replay(ad.target, edit, linear=cache == "linear", max_bytes=cache_bytes) if cache
             else contextlib.nullcontext()):
        def evaluate(step: float) -> tuple[bool, dict]:
            _together(ranks, lambda: edit.step(step), f"stepping {layers} to {step:.4g}")
            try:
                return _verdict(ranks, lambda: criterion_result(criterion(model)),
                                f"judging step {step:.4g} of {layers}")
            finally:
                distributed.reshard(ad.target)  # the next forward gathers the next step's shards

        result = search_step(evaluate, start, max_evals, fails_at)
        value = None
        if result.reached:
            if utility is not None:
                edit.step(result.step)
                value = _verdict(ranks, lambda: float(utility(model)), f"measuring the utility of {layers}")
                distributed.reshard(ad.target)
            elif "utility" in result.best.metrics:
                value = float(result.best.metrics["utility"])
    # leaving the block restored theta0: nothing stays changed until the final commit
    rel = result.step * grad_norm / theta_norm if result.reached else None
    log.info("layers %s: %s", layers, f"step {result.step:.4g}" if result.reached else "criterion not reached")
    return Candidate(layers, tower, result, rel, value)
