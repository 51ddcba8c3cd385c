"""SLUG's choice rules, written once (arXiv 2407.11867, Sec. 3): which layers are searched
and which searched layer is edited.

slug_fast.unlearn and the slug-authors baseline both call these, so they differ only in
how gradients, statistics, Pareto fronts and step searches are computed, never in what
is chosen.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from operator import attrgetter
from typing import TypeVar

from .errors import SlugError
from .pareto import NameRule, deepest, matches, split_towers

log = logging.getLogger("slug_fast")

STRATEGIES = ("best", "deepest")
TIE = 1e-9  # relative: candidates this close in utility or relative change are equal

T = TypeVar("T")
GroupOf = Callable[[str, Sequence[str]], list[str]]  # (layer, among) -> the layers that move together


def check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise SlugError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")


def tower_rules(towers: Mapping[str, NameRule] | None, adapter, names: Sequence[str],
                tower: str | Sequence[str] | None = None) -> dict[str, NameRule]:
    """The towers a layer is chosen in: `towers`, else the adapter's `tower_rules` for the
    eligible `names`; only those named in `tower` (one name or several) when given."""
    rules = dict(towers if towers is not None else adapter.tower_rules(names))
    if tower is None:
        return rules
    wanted = [tower] if isinstance(tower, str) else list(tower)
    for t in wanted:
        if t not in rules:
            raise SlugError(f"tower {t!r} not found; towers: {list(rules)}")
    return {t: rules[t] for t in wanted}


def in_towers(names: Sequence[str], rules: Mapping[str, NameRule]) -> list[str]:
    """The `names` some tower rule matches (those a tower restriction keeps)."""
    return [n for n in names if any(matches(rule, n) for rule in rules.values())]


def usable_layers(names: Sequence[str], importance: Sequence[float]) -> list[str]:
    """The layers with a nonzero forget gradient (importance > 0; NaN is not), in `names` order."""
    return [n for n, m in zip(names, importance) if m > 0]


def usable_by_tower(names: Sequence[str], importance: Sequence[float], rules: Mapping[str, NameRule],
                    complete: bool = True) -> dict[str, list[str]]:
    """usable_layers per tower; when `complete`, every tower must have one."""
    usable = usable_layers(names, importance)
    if complete and not usable:
        raise SlugError("no eligible layer has a nonzero forget gradient; eligible layers have >= 2 dims "
                        "and none of bias/norm/embedding/position/logit_scale in their names")
    return split_towers(usable, rules, allow_empty=not complete)


def fronts_of(tower_names: Mapping[str, list[str]],
              front: Callable[[list[str]], Sequence[int]]) -> dict[str, list[str]]:
    """tower -> its Pareto-front layers, `front(members)` giving the members' front positions
    (each caller's own Pareto machinery); towers without members are left out."""
    return {t: [members[i] for i in front(members)] for t, members in tower_names.items() if members}


def alone(name: str, names: Sequence[str]) -> list[str]:
    """group=False: every layer moves alone."""
    return [name]


def grouping(adapter, group: bool | None) -> bool:
    """Whether chosen layers bring their partners: `group`, or the adapter's default when None."""
    return adapter.groups_by_default if group is None else bool(group)


def group_rule(adapter, group: bool | None) -> GroupOf:
    """How a chosen layer brings its partners: the adapter's `group_of` (HF q/k/v_proj,
    fc1/fc2), or `alone` when not grouping."""
    return adapter.group_of if grouping(adapter, group) else alone


def select_candidates(fronts: Mapping[str, Sequence[str]], strategy: str, usable: Sequence[str], group_of: GroupOf,
                      depth_order: Sequence[str] | None = None) -> list[tuple[str, list[str]]]:
    """(tower, layers) to search, in tower then front order: every front layer ("best") or
    the deepest of each tower's front ("deepest", by `depth_order`, input to output); each
    layer brings the partners `group_of(layer, usable)` gives, and a group already listed is
    not listed again."""
    check_strategy(strategy)
    if strategy == "deepest" and depth_order is None:
        raise SlugError("strategy 'deepest' needs the layers' depth order (input to output)")
    picks: list[tuple[str, list[str]]] = []
    for t, front in fronts.items():
        chosen = list(front) if strategy == "best" else [deepest(front, depth_order)]
        for name in chosen:
            layers = group_of(name, usable)
            if all(layers != p[1] for p in picks):
                picks.append((t, layers))
    return picks


def best_candidate(reached: Sequence[T], *, utility: Callable[[T], float | None] = attrgetter("utility"),
                   change: Callable[[T], float] = attrgetter("relative_change"),
                   label: Callable[[T], object] = attrgetter("layers")) -> T:
    """Among candidates that met the criterion: the highest utility when every one has one
    (NaN ranks last), then the smallest relative change; the first in search order among
    equals. Equal up to TIE, not bit for bit: every search starts at the same relative
    change and halves or doubles it, so candidates that stop at the same point tie exactly
    in exact arithmetic, and rounding must not pick the winner (it would differ between one
    process and several, or between float32 and float64 statistics)."""
    if not reached:
        raise SlugError("no candidate met the criterion: there is nothing to choose from")

    def near(a: float, b: float) -> bool:
        return abs(a - b) <= TIE * max(abs(a), abs(b))

    pool = list(reached)
    if all(utility(c) is not None for c in pool):
        undefined = [label(c) for c in pool if math.isnan(utility(c))]
        if undefined:
            log.warning("utility is NaN for %s; those candidates rank last", undefined)
        defined = [c for c in pool if not math.isnan(utility(c))]
        if defined:
            top = max(utility(c) for c in defined)
            pool = [c for c in defined if near(utility(c), top)]
    smallest = min(change(c) for c in pool)
    return next(c for c in pool if near(change(c), smallest))
