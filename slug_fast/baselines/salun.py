"""SalUn's weight-saliency mask from the forget gradient (its training is GAFT on the masked
weights: the "salun" entry of slug_fast.baselines.training)."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import SlugError
from ..stores import compute_gradients

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


def saliency_setup(ad, trainable, forget_batches, forget_loss, ratio: float = DEFAULT_RATIO):
    """SalUn's one-time step at the original weights: the mask of the top `ratio` trainable
    weights by |g_f| (the mean forget-loss gradient), and how many it keeps."""
    grads = compute_gradients(ad.target, forget_batches, None, forget_loss, params=trainable.names,
                              train_mode=ad.target.training)
    mask = saliency_mask(grads.forget, ratio)
    del grads
    kept = sum(int(m.sum()) for m in mask.values())
    total = sum(m.numel() for m in mask.values())
    return mask, {"ratio": ratio, "masked_weights": kept, "weights": total}
