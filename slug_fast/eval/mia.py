"""Membership inference as in the paper: can a logistic regression tell forget samples from held-out ones?

After unlearning, an attack accuracy near 50% means the forget samples look
like data the model never saw. As in the authors' code, the larger group is
subsampled to the size of the smaller (so chance is 50%), the attack sees one
per-sample feature (the loss, or the image-text distance), and its accuracy is
cross-validated; here with stratified k-fold, over `repeats` subsamples.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import SlugError
from ..modes import training_state
from .zero_shot import check_adapter


@dataclass(frozen=True)
class MIAResult:
    """Attack accuracy in percent: mean and std over every fold of every repeat."""

    mean: float
    std: float
    scores: tuple[float, ...]  # per fold, repeat after repeat
    n_per_group: int  # forget (= held-out) samples used per repeat

    def to_dict(self) -> dict:
        return asdict(self)


def _features(values, what: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or len(x) == 0:
        raise SlugError(f"{what} must be a non-empty (n,) or (n, d) array of per-sample values, "
                        f"got shape {x.shape}")
    if not np.isfinite(x).all():
        raise SlugError(f"{what} holds NaN or Inf at sample {int(np.flatnonzero(~np.isfinite(x).all(1))[0])}")
    return x


def membership_inference(forget, held_out, folds: int = 5, repeats: int = 10, seed: int = 0) -> MIAResult:
    """Cross-validated accuracy (percent) of a logistic regression separating forget from held-out samples.

    `forget`, `held_out`: per-sample features, (n,) or (n, d) (e.g. losses). Each
    repeat draws min(n_forget, n_held_out) samples from each group, then scores
    a standardised logistic regression by stratified `folds`-fold cross-validation.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    f, h = _features(forget, "forget"), _features(held_out, "held_out")
    if f.shape[1] != h.shape[1]:
        raise SlugError(f"forget has {f.shape[1]} features per sample but held_out has {h.shape[1]}")
    if folds < 2 or repeats < 1:
        raise SlugError(f"folds must be at least 2 and repeats at least 1, got folds={folds}, repeats={repeats}")
    n = min(len(f), len(h))
    if n < folds:
        raise SlugError(f"{folds}-fold cross-validation needs at least {folds} samples in each group; got "
                        f"{len(f)} forget and {len(h)} held-out")
    scores: list[float] = []
    for r in range(repeats):
        rng = np.random.default_rng(seed + r)
        x = np.concatenate([f[rng.choice(len(f), n, replace=False)], h[rng.choice(len(h), n, replace=False)]])
        y = np.concatenate([np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int64)])
        cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed + r)
        model = make_pipeline(StandardScaler(), LogisticRegression())
        scores.extend(100.0 * cross_val_score(model, x, y, cv=cv, scoring="accuracy"))
    arr = np.asarray(scores)
    return MIAResult(float(arr.mean()), float(arr.std()), tuple(float(s) for s in arr), n)


@dataclass(frozen=True)
class SampleScores:
    """Per-sample CLIP contrastive loss and image-text distance (1 - cosine), float64 arrays."""

    loss: np.ndarray
    distance: np.ndarray


@torch.no_grad()
def clip_sample_scores(adapter, pairs: Sequence[tuple], batch_size: int = 32) -> SampleScores:
    """Each pair's symmetric contrastive loss within a batch of `batch_size` pairs, and its 1 - cos.

    As in the authors' evaluation the loss of pair i is the mean of the image->text
    and text->image cross-entropies in its batch. So that every sample meets the
    same number of negatives, the last, partial batch borrows pairs from the
    start of the set (when the set has at least `batch_size` pairs).
    """
    adapter = check_adapter(adapter)
    if len(pairs) == 0:
        raise SlugError("no pairs to score; pass (image, caption) pairs")
    module = adapter.target
    images, texts = [], []
    with training_state(module, train=False):
        for batch in adapter.make_batches(pairs, batch_size):
            image, text = adapter.embed(module, batch)
            images.append(image.float().cpu())
            texts.append(text.float().cpu())
        scale = adapter.log_logit_scale(module).detach().float().exp().cpu()
    image, text = torch.cat(images), torch.cat(texts)
    n = len(image)
    losses = []
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        own = len(idx)
        if own < batch_size <= n:
            idx = torch.cat([idx, torch.arange(batch_size - own)])
        logits = scale * image[idx] @ text[idx].T
        target = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, target, reduction="none")
                + F.cross_entropy(logits.T, target, reduction="none")) / 2
        losses.append(loss[:own])
    distance = 1 - (image * text).sum(dim=-1)
    return SampleScores(torch.cat(losses).double().numpy(), distance.double().numpy())


def clip_membership_inference(adapter, forget_pairs: Sequence[tuple], held_out_pairs: Sequence[tuple],
                              batch_size: int = 32, folds: int = 5, repeats: int = 10,
                              seed: int = 0) -> dict[str, MIAResult]:
    """{"loss": ..., "distance": ...}: the attack on each per-sample score of a CLIP model (see
    clip_sample_scores), forget pairs against held-out pairs the model never trained on."""
    f = clip_sample_scores(adapter, forget_pairs, batch_size)
    h = clip_sample_scores(adapter, held_out_pairs, batch_size)
    return {"loss": membership_inference(f.loss, h.loss, folds, repeats, seed),
            "distance": membership_inference(f.distance, h.distance, folds, repeats, seed)}
