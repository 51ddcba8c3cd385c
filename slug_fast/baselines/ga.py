"""GA: gradient ascent on the forget loss, every trainable tensor, early-stopped."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from .harness import BaselineResult, Criterion, train_baseline

DEFAULTS = {"lr": 1e-4}
# Adam learning rates bracketing the best one on the digits mini-CLIP: see baselines/__init__.py.
DEFAULT_GRID = {"lr": [3e-5, 1e-4, 3e-4, 1e-3, 3e-3]}
DEFAULT_EPOCHS = 10


def ga(model, forget: Iterable, retain: Iterable | None, criterion: Criterion, *, grid=None,
       epochs: int = DEFAULT_EPOCHS, check_every: int | None = 1, optimizer="adam",
       params: Sequence[str] | None = None, train_mode: bool = False, utility: Callable | None = None,
       apply: bool = True, progress: bool | None = None, adapter=None, forget_loss=None, retain_loss=None,
       **adapter_options) -> BaselineResult:
    """Ascend the forget loss (loss = -forget_loss) one forget batch per step; the retain set is unused.

    grid: settings of {"lr"} (a list of dicts, a list of learning rates, or a dict of lists).
    """
    return train_baseline("ga", model, forget, retain, criterion, defaults=DEFAULTS, primary="lr",
                          default_grid=DEFAULT_GRID, grid=grid, weights=lambda h: (1.0, 0.0), epochs=epochs,
                          check_every=check_every, optimizer=optimizer, params=params, train_mode=train_mode,
                          utility=utility, apply=apply, progress=progress, adapter=adapter,
                          forget_loss=forget_loss, retain_loss=retain_loss, adapter_options=adapter_options,
                          needs=(True, False))
