"""The training baselines, one TrainingSpec each in TRAINING: FT, GA, GAFT and SalUn.

A spec says what a method's loss weighs in each setting, its hyper-parameters (defaults
and default grid, see baselines/__init__.py for how the grids were chosen) and any
one-time setup at the original weights (SalUn's mask). Calling a spec runs the shared
harness (slug_fast.baselines.harness): the adapter, every setting from the original
weights, early-stopped training, the best setting. A new training baseline is one more
entry here (or add_baseline(spec) at run time); run_baseline, METHODS, DEFAULT_GRIDS
and `slug-fast compare` take it from this table.
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import SlugError
from .harness import (BaselineResult, Criterion, SettingRecord, Trainable, check_budget, expand_grid, reiterable,
                      resolve_adapter, run_grid, train_setting, trainable_names, training_mode)
from .salun import DEFAULT_RATIO, saliency_setup

DEFAULT_EPOCHS = 10  # the authors': up to 10
ROLES = {"forget": "its loss ascends the forget loss", "retain": "its loss descends the retain loss"}


@dataclass(frozen=True)
class TrainingSpec:
    """A training baseline. Each optimizer step descends
    retain_weight * retain_loss(retain batch) - forget_weight * forget_loss(forget batch),
    with (forget_weight, retain_weight) = weights(setting); an epoch is one pass over the
    forget batches when forget_weight > 0 (the retain batches cycle alongside), else over
    the retain batches.

    name: run_baseline's key (lower case letters, digits, '-'); summary: what a step does;
    defaults: every hyper-parameter with its default, "lr" (the learning rate) among them;
    grid: the default grid (a list of settings, of learning rates, or a dict of lists);
    label: the name in messages (default: name upper-cased); setup(ad, trainable,
    forget_batches, forget_loss, **options) -> (gradient mask or None, details) runs once at
    the original weights; options: the method's own keyword options and their defaults,
    handed to setup.
    """

    name: str
    summary: str
    weights: Callable[[dict], tuple[float, float]]
    defaults: Mapping[str, float]
    grid: object
    label: str = ""
    setup: Callable | None = None
    options: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self):
        if not (isinstance(self.name, str) and re.fullmatch(r"[a-z][a-z0-9-]*", self.name)):
            raise SlugError(f"a baseline's name is its run_baseline key: lower case letters, digits and '-', "
                            f"starting with a letter; got {self.name!r}")
        if "lr" not in self.defaults:
            raise SlugError(f"baseline {self.name!r}: defaults must give 'lr' (the learning rate); got "
                            f"{sorted(self.defaults)}")
        if not callable(self.weights) or (self.setup is not None and not callable(self.setup)):
            raise SlugError(f"baseline {self.name!r}: weights (and setup, when given) must be callable")
        for setting in expand_grid(self.grid, self.defaults, "lr", self.name):
            _loss_weights(self, setting)
        object.__setattr__(self, "label", self.label or self.name.upper())

    @property
    def needs(self) -> tuple[bool, bool]:
        """Whether (forget, retain) batches are required: the default setting's loss reads them."""
        fw, rw = _loss_weights(self, dict(self.defaults))
        return fw > 0, rw > 0

    def __call__(self, model, forget: Iterable | None, retain: Iterable | None, criterion: Criterion, *,
                 grid=None, epochs: int = DEFAULT_EPOCHS, check_every: int | None = 1, optimizer="adam",
                 params: Sequence[str] | None = None, train_mode: bool = False, utility: Callable | None = None,
                 apply: bool = True, progress: bool | None = None, adapter=None, forget_loss=None,
                 retain_loss=None, **options) -> BaselineResult:
        """Run this baseline over `grid` (default: its own), each setting from the original
        weights and early-stopped (see slug_fast.baselines); `options` are the method's own
        (see `options`) and adapter options such as tokenizer=."""
        t_start = time.perf_counter()
        own = {k: options.pop(k, v) for k, v in self.options.items()}
        for which, needed, batches in zip(ROLES, self.needs, (forget, retain)):
            if needed and batches is None:
                raise SlugError(f"{self.label} needs {which} batches ({ROLES[which]}); pass them")
        check_budget(epochs, check_every)
        ad, f_loss, r_loss = resolve_adapter(model, adapter, forget_loss, retain_loss, options)
        forget = reiterable(forget, "forget", self.needs[0])
        retain = reiterable(retain, "retain", self.needs[1])
        settings = expand_grid(self.grid if grid is None else grid, self.defaults, "lr", self.name)
        names = trainable_names(ad, params)
        trainable = Trainable(ad, names)
        record = {"epochs": epochs, "check_every": check_every, "train_mode": train_mode,
                  "optimizer": optimizer if isinstance(optimizer, str) else getattr(optimizer, "__name__", "custom")}
        with training_mode(ad.target, names, train_mode):
            mask, details = self.setup(ad, trainable, forget, f_loss, **own) if self.setup else (None, {})
            setup_seconds = time.perf_counter() - t_start

            def run_one(hyper: dict) -> SettingRecord:
                fw, rw = _loss_weights(self, hyper)
                return train_setting(ad, trainable, forget if fw > 0 else None, retain if rw > 0 else None,
                                     criterion, forget_loss=f_loss, retain_loss=r_loss, lr=hyper["lr"],
                                     forget_weight=fw, retain_weight=rw, epochs=epochs, check_every=check_every,
                                     optimizer=optimizer, mask=mask, utility=utility, progress=progress,
                                     desc=f"{self.name} lr={hyper['lr']:g}")

            return run_grid(self.name, ad, trainable, settings, run_one, apply=apply, progress=progress,
                            setup_seconds=setup_seconds, t_start=t_start, options=record, details=details)


def _loss_weights(spec: TrainingSpec, hyper: dict) -> tuple[float, float]:
    """spec.weights(hyper), checked: two finite numbers >= 0, not both 0."""
    out = spec.weights(hyper)
    if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(w, (int, float)) and 0 <= w < float("inf")
                                                            for w in out) and any(out)):
        raise SlugError(f"baseline {spec.name!r}: weights({hyper}) must return (forget_weight, retain_weight), two "
                        f"finite numbers >= 0, not both 0; got {out!r}")
    return float(out[0]), float(out[1])


def _gaft_weights(hyper: dict) -> tuple[float, float]:
    return 1.0, float(hyper["retain_weight"])


LRS = [3e-5, 1e-4, 3e-4, 1e-3, 3e-3]  # Adam learning rates bracketing the best one on the digits mini-CLIP
TRAINING: dict[str, TrainingSpec] = {spec.name: spec for spec in (
    TrainingSpec("ft", "descent on the retain loss, one retain batch per step; the forget set is unused (FT "
                 "forgets only what fine-tuning on other data overwrites)",
                 weights=lambda hyper: (0.0, 1.0), defaults={"lr": 1e-4}, grid={"lr": [1e-4, 1e-3, 1e-2]}),
    TrainingSpec("ga", "ascent on the forget loss (loss = -forget_loss), one forget batch per step; the retain "
                 "set is unused",
                 weights=lambda hyper: (1.0, 0.0), defaults={"lr": 1e-4}, grid={"lr": list(LRS)}),
    TrainingSpec("gaft", "retain_weight * retain_loss(retain batch) - forget_loss(forget batch), one step each",
                 weights=_gaft_weights, defaults={"lr": 1e-4, "retain_weight": 1.0},
                 grid={"lr": list(LRS), "retain_weight": [0.5, 1.0, 2.0]}),
    TrainingSpec("salun", "GAFT steps on the top `ratio` of the trainable weights by |g_f| (the mean forget-loss "
                 "gradient at the original weights, computed once): the other weights' gradients are zeroed, so "
                 "they never move (Adam without weight decay leaves a weight whose gradient is always 0 "
                 "bit-exactly unchanged)",
                 weights=_gaft_weights, defaults={"lr": 1e-4, "retain_weight": 1.0},
                 grid={"lr": list(LRS), "retain_weight": [0.5, 1.0, 2.0]}, label="SalUn", setup=saliency_setup,
                 options={"ratio": DEFAULT_RATIO}),
)}
