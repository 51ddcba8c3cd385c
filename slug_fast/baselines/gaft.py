"""GAFT: gradient ascent on the forget loss plus descent on the retain loss, early-stopped."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from ..errors import SlugError
from .harness import BaselineResult, Criterion, train_baseline

DEFAULTS = {"lr": 1e-4, "retain_weight": 1.0}
# learning rates x retain weights, see baselines/__init__.py
DEFAULT_GRID = {"lr": [3e-5, 1e-4, 3e-4, 1e-3, 3e-3], "retain_weight": [0.5, 1.0, 2.0]}
DEFAULT_EPOCHS = 10


def weights(hyper: dict) -> tuple[float, float]:
    return 1.0, float(hyper["retain_weight"])


def gaft(model, forget: Iterable, retain: Iterable, criterion: Criterion, *, grid=None,
         epochs: int = DEFAULT_EPOCHS, check_every: int | None = 1, optimizer="adam",
         params: Sequence[str] | None = None, train_mode: bool = False, utility: Callable | None = None,
         apply: bool = True, progress: bool | None = None, adapter=None, forget_loss=None, retain_loss=None,
         **adapter_options) -> BaselineResult:
    """Each step: loss = retain_weight * retain_loss(retain batch) - forget_loss(forget batch), one
    optimizer step. An epoch is one pass over the forget batches; the retain batches cycle alongside.

    grid: settings of {"lr", "retain_weight"} (default retain_weight 1).
    """
    if retain is None:
        raise SlugError("GAFT needs retain batches (the descent half); use ga() for ascent alone")
    return train_baseline("gaft", model, forget, retain, criterion, defaults=DEFAULTS, primary="lr",
                          default_grid=DEFAULT_GRID, grid=grid, weights=weights, epochs=epochs,
                          check_every=check_every, optimizer=optimizer, params=params, train_mode=train_mode,
                          utility=utility, apply=apply, progress=progress, adapter=adapter,
                          forget_loss=forget_loss, retain_loss=retain_loss, adapter_options=adapter_options,
                          needs=(True, True))
