"""FT: fine-tune on the retain set (descent on the retain loss), early-stopped."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from .harness import BaselineResult, Criterion, train_baseline

DEFAULTS = {"lr": 1e-4}
DEFAULT_GRID = {"lr": [1e-4, 1e-3, 1e-2]}  # see baselines/__init__.py
DEFAULT_EPOCHS = 10


def ft(model, forget: Iterable | None, retain: Iterable, criterion: Criterion, *, grid=None,
       epochs: int = DEFAULT_EPOCHS, check_every: int | None = 1, optimizer="adam",
       params: Sequence[str] | None = None, train_mode: bool = False, utility: Callable | None = None,
       apply: bool = True, progress: bool | None = None, adapter=None, forget_loss=None, retain_loss=None,
       **adapter_options) -> BaselineResult:
    """Descend the retain loss one retain batch per step (an epoch is one pass over the retain set);
    the forget set is unused. FT forgets only what fine-tuning on other data overwrites.

    grid: settings of {"lr"}.
    """
    return train_baseline("ft", model, forget, retain, criterion, defaults=DEFAULTS, primary="lr",
                          default_grid=DEFAULT_GRID, grid=grid, weights=lambda h: (0.0, 1.0), epochs=epochs,
                          check_every=check_every, optimizer=optimizer, params=params, train_mode=train_mode,
                          utility=utility, apply=apply, progress=progress, adapter=adapter,
                          forget_loss=forget_loss, retain_loss=retain_loss, adapter_options=adapter_options,
                          needs=(False, True))
