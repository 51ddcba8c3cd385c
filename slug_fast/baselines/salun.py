"""SalUn: a weight-saliency mask from the forget gradient, then GA + retain descent on masked weights only."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from ..errors import SlugError
from ..gradients import compute_gradients
from .gaft import weights
from .harness import BaselineResult, Criterion, train_baseline

DEFAULTS = {"lr": 1e-4, "retain_weight": 1.0}
# learning rates x retain weights, see baselines/__init__.py
DEFAULT_GRID = {"lr": [3e-5, 1e-4, 3e-4, 1e-3, 3e-3], "retain_weight": [0.5, 1.0, 2.0]}
DEFAULT_EPOCHS = 10
DEFAULT_RATIO = 0.5


def saliency_mask(grads: Mapping[str, torch.Tensor], ratio: float = DEFAULT_RATIO) -> dict[str, torch.Tensor]:
    """Boolean masks keeping exactly int(ratio * N) of the N weights, those with the largest |grad|,
    ranked across all tensors together (SalUn's global threshold). Ties at the threshold go to the
    earliest weights in tensor order, then flat index order, so the mask is deterministic."""
    if not 0.0 <= ratio <= 1.0:
        raise SlugError(f"the saliency ratio must be between 0 and 1, got {ratio}")
    names = list(grads)
    flat = torch.cat([grads[n].detach().abs().flatten().float() for n in names])
    total = flat.numel()
    k = int(ratio * total)
    if k == 0 or k == total:
        keep = torch.full_like(flat, k == total, dtype=torch.bool)
    else:
        # k-th largest = (total - k + 1)-th smallest
        threshold = torch.kthvalue(flat, total - k + 1).values
        keep = flat > threshold
        missing = k - int(keep.sum())
        if missing > 0:
            ties = (flat == threshold).nonzero().flatten()[:missing]
            keep[ties] = True
    out, start = {}, 0
    for n in names:
        size = grads[n].numel()
        out[n] = keep[start:start + size].view(grads[n].shape)
        start += size
    return out


def salun(model, forget: Iterable, retain: Iterable, criterion: Criterion, *, grid=None,
          ratio: float = DEFAULT_RATIO, epochs: int = DEFAULT_EPOCHS, check_every: int | None = 1,
          optimizer="adam", params: Sequence[str] | None = None, train_mode: bool = False,
          utility: Callable | None = None, apply: bool = True, progress: bool | None = None, adapter=None,
          forget_loss=None, retain_loss=None, **adapter_options) -> BaselineResult:
    """SalUn with the forget loss: the mask keeps the top `ratio` of the trainable weights by |g_f|
    (the mean forget-loss gradient at the original weights, computed once); then GAFT steps whose
    gradients are multiplied by the mask, so weights outside it never move (Adam without weight
    decay leaves a weight whose gradient is always 0 bit-exactly unchanged).

    grid: settings of {"lr", "retain_weight"}. The mask is shared by every setting; its
    computation counts in setup_seconds.
    """
    if retain is None:
        raise SlugError("SalUn needs retain batches (the descent half of its update)")

    def setup(ad, trainable, forget_batches, f_loss):
        grads = compute_gradients(ad.target, forget_batches, None, f_loss, params=trainable.names,
                                  train_mode=ad.target.training)
        mask = saliency_mask(grads.forget, ratio)
        del grads
        kept = sum(int(m.sum()) for m in mask.values())
        total = sum(m.numel() for m in mask.values())
        return mask, {"ratio": ratio, "masked_weights": kept, "weights": total}

    return train_baseline("salun", model, forget, retain, criterion, defaults=DEFAULTS, primary="lr",
                          default_grid=DEFAULT_GRID, grid=grid, weights=weights, epochs=epochs,
                          check_every=check_every, optimizer=optimizer, params=params, train_mode=train_mode,
                          utility=utility, apply=apply, progress=progress, adapter=adapter,
                          forget_loss=forget_loss, retain_loss=retain_loss, adapter_options=adapter_options,
                          needs=(True, True), setup=setup)
