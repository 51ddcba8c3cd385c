"""What every baseline shares: the adapter, the grid, snapshot/restore, early-stopped training, results.

Every grid setting starts from the ORIGINAL weights: the trainable tensors are
snapshotted once and copied back before each setting. A training setting stops at
the first check where the criterion holds (checks every `check_every` optimizer
steps and at each epoch end). Among the settings that met the criterion the one
with the highest utility wins (ties: fewer steps, then less time). At the end the
model holds the best setting's weights (apply=True) or the original weights
(apply=False, or when no setting met the criterion); the result always carries the
best setting's trained tensors in `state`.
"""
from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import Adapter, GenericAdapter, detect_adapter, get_adapter
from ..delta import save_delta, tensor_spec
from ..edit import axpy_reference
from ..errors import SlugError
from ..gradients import Loss, resolve_params
from ..modes import training_state
from ..search import criterion_result

Criterion = Callable[[object], "bool | tuple[bool, dict]"]


# ----------------------------------------------------------------------------- records
@dataclass
class Check:
    """One evaluation of the criterion during a setting's run."""

    step: int  # optimizer steps taken before this check (0 for one-shot methods)
    epoch: float  # epochs done at this check (steps / steps per epoch)
    satisfied: bool
    metrics: dict
    seconds: float  # the criterion call alone
    losses: dict = field(default_factory=dict)  # the last step's losses

    def to_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "satisfied": self.satisfied, "metrics": self.metrics,
                "seconds": self.seconds, "losses": self.losses}


@dataclass
class SettingRecord:
    """One grid setting: its hyper-parameters, what its run cost and what it reached."""

    hyper: dict
    steps: int  # optimizer steps (evaluations of the step search for slug-authors, 1 for SSD)
    epochs: float
    seconds: float  # wall time of this setting's run, its checks included
    reached: bool
    stopped: str  # "criterion", "budget" or "non-finite"
    metrics: dict  # at the last check
    utility: float | None
    trace: list[Check]
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"hyper": self.hyper, "steps": self.steps, "epochs": self.epochs, "seconds": self.seconds,
                "reached": self.reached, "stopped": self.stopped, "metrics": self.metrics,
                "utility": self.utility, "details": self.details, "trace": [c.to_dict() for c in self.trace]}


@dataclass
class BaselineResult:
    """A baseline's best setting (None when no setting met the criterion) and every setting tried.

    seconds: setup + the best setting's run (what one run at the best setting costs;
    None when no setting met the criterion); grid_seconds: the whole call (setup,
    every setting, restores); setup_seconds: one-time work at the original weights
    (SalUn's mask, SSD's importances, slug-authors' gradients and fronts).
    state / base: the best setting's changed tensors and their original values (the target
    module's names); save(path) writes the change as a delta.
    """

    method: str
    best: SettingRecord | None
    settings: list[SettingRecord]
    seconds: float | None
    grid_seconds: float
    setup_seconds: float
    applied: bool  # the model holds the best setting's weights
    trained: list[str]  # the tensors the method may change
    options: dict
    details: dict = field(default_factory=dict)
    state: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # best setting's tensors
    base: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # their original values
    # name in `state` -> (its name in the user's object, that tensor's dtype): what a delta records
    delta_names: dict[str, tuple[str, torch.dtype]] = field(default_factory=dict, repr=False)

    @property
    def reached(self) -> bool:
        return self.best is not None

    def save(self, path: str | os.PathLike, revertible: bool = False) -> Path:
        """Write the best setting's change as a delta (slug_fast.delta, as UnlearnResult.save):
        apply_delta on the original model then gives exactly the weights `state` holds;
        `revertible` also stores the original tensors (slug_fast.revert_delta)."""
        if not self.state:
            raise SlugError(f"{self.method}: no setting met the criterion, so there is no change to save"
                            if self.best is None else f"{self.method}: the best setting changed no weight, so "
                            "there is no change to save")
        delta, specs, originals = {}, {}, {}
        for n, edited in self.state.items():
            key, dtype = self.delta_names[n]
            originals[key] = base = self.base[n].to(dtype)
            delta[key] = exact_change(key, base, edited.to(dtype))
            specs[key] = tensor_spec(base, delta[key])
        meta = {"method": self.method, "layers": list(delta), "setting": self.best.hyper,
                "details": self.best.details}
        return save_delta(path, delta, specs, meta, originals if revertible else None)

    def to_dict(self) -> dict:
        """A JSON-ready summary, every setting and its trace included."""
        return {"method": self.method, "reached": self.reached,
                "best": self.best.to_dict() if self.best is not None else None,
                "seconds": self.seconds, "grid_seconds": self.grid_seconds, "setup_seconds": self.setup_seconds,
                "applied": self.applied, "trained": len(self.trained), "options": self.options,
                "details": self.details, "settings": [s.to_dict() for s in self.settings]}


def exact_change(name: str, base: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """edited - base, in float32 when apply_delta's cast(base + change) gives `edited` back bit
    for bit, else in float64 (apply_delta adds a float64 change in float64: exact for float32
    and 16-bit weights unless a weight's old and new values differ in magnitude by over 2**29)."""
    for dtype in (torch.float32, torch.float64):
        change = edited.to(dtype) - base.to(dtype)
        back = torch.empty_like(base)
        axpy_reference(back, base, change, 1.0)  # what apply_delta computes
        if torch.equal(back.reshape(-1).view(torch.uint8), edited.reshape(-1).view(torch.uint8)):
            return change
    raise SlugError(f"the change of {name!r} cannot be saved as a delta that reproduces it bit for bit (a weight "
                    f"of dtype {base.dtype} moved across many orders of magnitude); keep result.state instead")


def user_names(ad: Adapter, names: Sequence[str]) -> dict[str, tuple[str, torch.dtype]]:
    """Target parameter name -> (its name in the user's object, that tensor's dtype)."""
    return {n: (key, tensor.dtype) for key, (tensor, n) in ad.edit_params(list(names)).items()
            if key == ad.delta_name(n)}


# ----------------------------------------------------------------------------- inputs
def resolve_adapter(model, adapter: str | Adapter | None, forget_loss: Loss | None, retain_loss: Loss | None,
                    adapter_options: Mapping) -> tuple[Adapter, Loss, Loss]:
    """The adapter as slug_fast.unlearn resolves it, and the (forget, retain) losses to use."""
    if adapter is None and detect_adapter(model) is None and not isinstance(model, Adapter):
        ad = GenericAdapter(model) if isinstance(model, nn.Module) and forget_loss and retain_loss \
            else get_adapter(model)  # raises, naming what to pass
    else:
        ad = get_adapter(model, adapter, **adapter_options)
    return ad, forget_loss or ad.forget_loss, retain_loss or ad.retain_loss


def reiterable(batches: Iterable | None, which: str, required: bool = True) -> Sequence | Iterable | None:
    """Batches that can be iterated once per epoch (a one-shot iterator is materialised)."""
    if batches is None:
        if required:
            raise SlugError(f"this baseline needs {which} batches; pass them")
        return None
    if iter(batches) is batches:  # a generator or iterator: keep its items for later epochs
        batches = list(batches)
    if hasattr(batches, "__len__") and len(batches) == 0:
        raise SlugError(f"the {which} set is empty: pass at least one batch")
    return batches


def expand_grid(grid, defaults: Mapping[str, object], primary: str, method: str) -> list[dict]:
    """Grid settings as dicts, each completed with the method's defaults.

    grid: a list of dicts ({"lr": 1e-4, ...}), a list of numbers (values of `primary`),
    or a dict of lists (their cartesian product).
    """
    if isinstance(grid, Mapping):
        keys = list(grid)
        values = [list(v) if isinstance(v, (list, tuple)) else [v] for v in grid.values()]
        settings = [dict(zip(keys, combo)) for combo in itertools.product(*values)]
    else:
        settings = [dict(s) if isinstance(s, Mapping) else {primary: s} for s in grid]
    if not settings:
        raise SlugError(f"the {method} grid is empty; pass at least one setting")
    allowed = set(defaults)
    out = []
    for s in settings:
        unknown = sorted(set(s) - allowed)
        if unknown:
            raise SlugError(f"{method} has no hyper-parameter {unknown[0]!r}; its grid takes {sorted(allowed)}")
        full = {**defaults, **s}
        for k, v in full.items():
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise SlugError(f"{method} {k} must be a finite number >= 0, got {v!r}")
        out.append(full)
    return out


def make_optimizer(optimizer, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """"adam" (torch.optim.Adam, no weight decay), "adamw" (weight decay 0.01), "sgd" (plain),
    or a callable(params, lr) -> optimizer."""
    if callable(optimizer):
        return optimizer(params, lr)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr)
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise SlugError(f"optimizer must be 'adam', 'adamw', 'sgd' or a callable(params, lr), got {optimizer!r}")


def progress_bar(iterable, desc: str, progress: bool | None, total: int | None = None):
    return tqdm(iterable, desc=desc, total=total, leave=False,
                disable=None if progress is None else not progress)


# ----------------------------------------------------------------------------- state
class Trainable:
    """The tensors a baseline may change: a snapshot of their original values, restore and mirrors.

    Mirrors are tensors of the user's object that must follow a target tensor (a
    pipeline's text encoder when the losses run on a separate CLIP model); they are
    synced before each criterion check and at the end.
    """

    def __init__(self, ad: Adapter, names: Sequence[str]):
        target = dict(ad.target.named_parameters())
        self.names = list(names)
        self.params = {n: target[n] for n in self.names}
        self.mirrors = [(m, target[n]) for _, (m, n) in ad.edit_params(self.names).items() if m is not target[n]]
        self.original = {n: p.detach().clone() for n, p in self.params.items()}
        self.module = ad.target

    def restore(self) -> None:
        """Copy the original values back, bit-exactly (mirrors too)."""
        self.load(self.original)

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(state[n])
        self.sync_mirrors()

    def sync_mirrors(self) -> None:
        if self.mirrors:
            with torch.no_grad():
                for mirror, source in self.mirrors:
                    mirror.copy_(source)

    def capture(self) -> dict[str, torch.Tensor]:
        """The current values of the tensors that differ from the original ones."""
        return {n: p.detach().clone() for n, p in self.params.items() if not torch.equal(p, self.original[n])}


def training_mode(module: nn.Module, names: Sequence[str], train_mode: bool):
    """Context: only `names` require grad, every module in train (or eval) mode, no .grad;
    flags, modes and .grad restored after (slug_fast.modes.training_state)."""
    return training_state(module, train=train_mode, requires_grad=set(names), clear_grads=True)


def trainable_names(ad: Adapter, params: Sequence[str] | None) -> list[str]:
    """`params`, else the adapter's parameters to differentiate, else all that require grad."""
    return resolve_params(ad.target, params if params is not None else ad.param_names())


# ----------------------------------------------------------------------------- checks
def run_check(criterion: Criterion, model, trainable: Trainable, step: int, steps_per_epoch: int | None,
              losses: dict) -> Check:
    """Call the criterion on the user's object, the trained module in eval mode (as the scripts evaluate)."""
    trainable.sync_mirrors()
    t0 = time.perf_counter()
    with training_state(trainable.module, train=False):
        satisfied, metrics = criterion_result(criterion(model))
    epoch = round(step / steps_per_epoch, 4) if steps_per_epoch else 0.0
    return Check(step, epoch, satisfied, metrics, time.perf_counter() - t0, losses)


def utility_of(reached: bool, metrics: dict, utility: Callable | None, model) -> float | None:
    """utility(model) when given, else metrics["utility"], for a setting that met the criterion."""
    if not reached:
        return None
    if utility is not None:
        return float(utility(model))
    value = metrics.get("utility")
    return float(value) if value is not None else None


# ----------------------------------------------------------------------------- training
def _cycle(batches):
    """Endless iteration over re-iterable batches (nothing cached)."""
    while True:
        empty = True
        for b in batches:
            empty = False
            yield b
        if empty:
            raise SlugError("the retain set is empty: pass at least one batch")


def train_setting(ad: Adapter, trainable: Trainable, forget, retain, criterion: Criterion, *,
                  forget_loss: Loss, retain_loss: Loss, lr: float, forget_weight: float, retain_weight: float,
                  epochs: int, check_every: int | None, optimizer, mask: Mapping[str, torch.Tensor] | None = None,
                  utility: Callable | None = None, progress: bool | None = None, desc: str = "") -> SettingRecord:
    """One early-stopped run from the current (original) weights.

    Each step: loss = retain_weight * retain_loss(next retain batch)
    - forget_weight * forget_loss(next forget batch); one optimizer step on the
    trainable tensors (gradients multiplied by `mask` first, when given). An epoch
    is one pass over the forget batches when forget_weight > 0 (the retain batches
    cycle alongside), else over the retain batches. The criterion is checked every
    `check_every` steps and after each epoch; the run stops at the first check where
    it holds, or when a loss turns NaN/Inf (the setting does not count as reached).
    """
    t0 = time.perf_counter()
    module, model = ad.target, ad.model
    params = [trainable.params[n] for n in trainable.names]
    opt = make_optimizer(optimizer, params, lr)
    use_forget, use_retain = forget_weight > 0, retain_weight > 0
    driver = forget if use_forget else retain
    retain_stream = _cycle(retain) if (use_retain and use_forget) else None
    steps_per_epoch = len(driver) if hasattr(driver, "__len__") else None
    device = params[0].device
    bad = torch.zeros((), dtype=torch.bool, device=device)
    masks = [mask.get(n) for n in trainable.names] if mask is not None else None
    trace: list[Check] = []
    step, stopped, last = 0, "budget", {}

    def check() -> bool:
        nonlocal stopped
        losses = {k: float(v) for k, v in last.items()}
        if bool(bad):
            trace.append(Check(step, round(step / steps_per_epoch, 4) if steps_per_epoch else 0.0, False,
                               {"non_finite": True}, 0.0, losses))
            stopped = "non-finite"
            return True
        trace.append(run_check(criterion, model, trainable, step, steps_per_epoch, losses))
        if trace[-1].satisfied:
            stopped = "criterion"
            return True
        return False

    done = False
    bar = progress_bar(range(epochs), desc, progress)
    for _ in bar:
        count = 0
        for batch in driver:
            total = None
            last = {}
            if use_forget:
                lf = forget_loss(module, batch)
                total = -forget_weight * lf
                last["forget"] = lf.detach()
            if use_retain:
                rb = next(retain_stream) if retain_stream is not None else batch
                lr_ = retain_loss(module, rb)
                total = retain_weight * lr_ if total is None else total + retain_weight * lr_
                last["retain"] = lr_.detach()
            opt.zero_grad(set_to_none=True)
            total.backward()
            bad |= ~torch.isfinite(total.detach())
            if masks is not None:
                for p, m in zip(params, masks):
                    if p.grad is not None and m is not None:
                        p.grad.mul_(m)
            opt.step()
            step += 1
            count += 1
            if check_every and step % check_every == 0 and check():
                done = True
                break
        if steps_per_epoch is None:
            steps_per_epoch = count
        if count == 0:
            raise SlugError("the forget set is empty: pass at least one batch" if use_forget
                            else "the retain set is empty: pass at least one batch")
        if done:
            break
        if not (trace and trace[-1].step == step) and check():  # epoch end, unless just checked
            break
    opt.zero_grad(set_to_none=True)
    del opt
    if not trace:  # epochs == 0: report the untouched model
        check()
    reached = stopped == "criterion"
    value = utility_of(reached, trace[-1].metrics, utility, model)
    epochs_done = round(step / steps_per_epoch, 4) if steps_per_epoch else 0.0
    return SettingRecord({}, step, epochs_done, time.perf_counter() - t0, reached, stopped, trace[-1].metrics,
                         value, trace)


# ----------------------------------------------------------------------------- grid driver
def best_setting(records: Sequence[SettingRecord]) -> SettingRecord | None:
    """Highest utility among the settings that met the criterion; ties: fewer steps, then faster.
    Settings without a utility rank below those with one."""
    reached = [r for r in records if r.reached]
    if not reached:
        return None
    return min(reached, key=lambda r: (r.utility is None, -(r.utility or 0.0), r.steps, r.seconds))


def run_grid(method: str, ad: Adapter, trainable: Trainable, settings: list[dict],
             run_one: Callable[[dict], SettingRecord], *, apply: bool, progress: bool | None,
             setup_seconds: float, t_start: float, options: dict, details: dict | None = None) -> BaselineResult:
    """Run every setting from the original weights; leave the model at the best (apply) or original."""
    records: list[SettingRecord] = []
    best_state: dict[str, torch.Tensor] | None = None
    best: SettingRecord | None = None
    try:
        for hyper in progress_bar(settings, method, progress):
            trainable.restore()
            record = run_one(hyper)
            record.hyper = {**hyper, **record.hyper}
            records.append(record)
            if record.reached and best_setting([r for r in (best, record) if r is not None]) is record:
                best, best_state = record, trainable.capture()
    finally:
        trainable.restore()
    applied = bool(apply and best is not None)
    if applied:
        trainable.load({**trainable.original, **best_state})
    grid_seconds = time.perf_counter() - t_start
    seconds = setup_seconds + best.seconds if best is not None else None
    return BaselineResult(method, best, records, seconds, grid_seconds, setup_seconds, applied,
                          trainable.names, options, details or {}, best_state,
                          None if best_state is None else {n: trainable.original[n] for n in best_state},
                          {} if best_state is None else user_names(ad, list(best_state)))


def check_budget(epochs: int, check_every: int | None) -> None:
    if not (isinstance(epochs, int) and epochs >= 0):
        raise SlugError(f"epochs must be an integer >= 0, got {epochs!r}")
    if check_every is not None and not (isinstance(check_every, int) and check_every >= 1):
        raise SlugError(f"check_every must be None (epoch ends only) or an integer >= 1, got {check_every!r}")
