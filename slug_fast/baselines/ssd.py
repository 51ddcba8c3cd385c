"""SSD: selective synaptic dampening (Foster et al. 2024) with diagonal-Fisher importances.

One shot, no training: importance = mean over batches of the squared per-batch
gradient; a weight whose forget importance exceeds alpha times its importance on the
full data (forget + retain) is multiplied by beta = min((lambda * full / forget) ** exponent, 1).
Tensors with a single element (logit_scale) are left alone, as in the SSD and SLUG code.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from ..errors import NonFiniteError, SlugError
from .harness import (BaselineResult, Criterion, SettingRecord, Trainable, expand_grid, reiterable, resolve_adapter,
                      run_check, run_grid, trainable_names, training_mode, utility_of)

DEFAULTS = {"alpha": 10.0, "lambda": 1.0, "exponent": 1.0}
# alpha 10, lambda 1 are the SSD paper's; smaller alphas select more weights, lambdas on both sides of 1
# dampen more or less. Each setting costs one check (see baselines/__init__.py).
DEFAULT_GRID = {"alpha": [10.0, 5.0, 4.0, 3.0, 2.0, 1.0], "lambda": [0.1, 0.5, 1.0, 2.0, 3.0, 5.0]}
FULL_LOSSES = ("forget", "retain")


def importance(module: torch.nn.Module, batches: Iterable, loss_fn, names: Sequence[str]) -> tuple[dict, int]:
    """Mean over batches of each parameter's squared per-batch gradient (accumulated in float32,
    float64 for float64 parameters)."""
    named = dict(module.named_parameters())
    params = [named[n] for n in names]
    acc = [torch.zeros_like(p, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32) for p in params]
    count = 0
    for batch in batches:
        for p in params:
            p.grad = None
        loss = loss_fn(module, batch)
        if not bool(torch.isfinite(loss.detach())):
            raise NonFiniteError(f"SSD importance: the loss is {loss.item()} at batch {count}")
        loss.backward()
        for a, p in zip(acc, params):
            if p.grad is not None:
                a.addcmul_(p.grad, p.grad)
        count += 1
    for p in params:
        p.grad = None
    if count == 0:
        raise SlugError("SSD importance needs at least one batch")
    return {n: a.div_(count) for n, a in zip(names, acc)}, count


@torch.no_grad()
def dampen(params: Mapping[str, torch.Tensor], forget_imp: Mapping[str, torch.Tensor],
           full_imp: Mapping[str, torch.Tensor], alpha: float, lam: float, exponent: float = 1.0) -> int:
    """In place: where forget > alpha * full, theta *= min((lam * full / forget) ** exponent, 1).
    Returns how many weights were selected."""
    selected = 0
    for n, p in params.items():
        if p.numel() <= 1:
            continue
        f, o = forget_imp[n], full_imp[n]
        chosen = f > alpha * o
        beta = (lam * o / f).pow(exponent).clamp(max=1.0)
        p.mul_(torch.where(chosen, beta, torch.ones_like(beta)).to(p.dtype))
        selected += int(chosen.sum())
    return selected


def ssd(model, forget: Iterable, retain: Iterable, criterion: Criterion, *, grid=None, full_loss: str = "forget",
        params: Sequence[str] | None = None, train_mode: bool = False, utility: Callable | None = None,
        apply: bool = True, progress: bool | None = None, adapter=None, forget_loss=None, retain_loss=None,
        **adapter_options) -> BaselineResult:
    """SSD over a grid of {"alpha", "lambda", "exponent"} (defaults 10, 1, 1), each setting one
    dampening of the original weights and one criterion check.

    Forget importance: the forget loss on the forget batches. Full importance: on the
    forget and retain batches together, with the forget loss (full_loss="forget": the
    same objective on both sets, as SSD compares Fisher information of one loss) or the
    retain loss (full_loss="retain": the SLUG authors' CLIP code, which pairs the cosine
    forget loss with the contrastive loss on generic data). Both are computed once
    (setup_seconds).
    """
    t_start = time.perf_counter()
    if full_loss not in FULL_LOSSES:
        raise SlugError(f"full_loss must be one of {FULL_LOSSES}, got {full_loss!r}")
    ad, f_loss, r_loss = resolve_adapter(model, adapter, forget_loss, retain_loss, adapter_options)
    forget = reiterable(forget, "forget")
    retain = reiterable(retain, "retain")
    settings = expand_grid(DEFAULT_GRID if grid is None else grid, DEFAULTS, "alpha", "ssd")
    names = trainable_names(ad, params)
    trainable = Trainable(ad, names)
    with training_mode(ad.target, names, train_mode):
        forget_imp, n_f = importance(ad.target, forget, f_loss, names)
        full_fn = f_loss if full_loss == "forget" else r_loss
        full_imp, n_full = importance(ad.target, _chain(forget, retain), full_fn, names)
    setup_seconds = time.perf_counter() - t_start
    total = sum(p.numel() for p in trainable.params.values() if p.numel() > 1)

    def run_one(hyper: dict) -> SettingRecord:
        t0 = time.perf_counter()
        selected = dampen(trainable.params, forget_imp, full_imp, hyper["alpha"], hyper["lambda"],
                          hyper["exponent"])
        check = run_check(criterion, ad.model, trainable, 0, None, {})
        value = utility_of(check.satisfied, check.metrics, utility, ad.model)
        return SettingRecord({}, 1, 0.0, time.perf_counter() - t0, check.satisfied,
                             "criterion" if check.satisfied else "budget", check.metrics, value, [check],
                             {"dampened_weights": selected, "fraction": selected / total if total else 0.0})

    options = {"full_loss": full_loss, "train_mode": train_mode, "forget_batches": n_f, "full_batches": n_full}
    return run_grid("ssd", ad, trainable, settings, run_one, apply=apply, progress=progress,
                    setup_seconds=setup_seconds, t_start=t_start, options=options)


def _chain(*sets):
    class Chained:
        def __iter__(self):
            for s in sets:
                yield from s
    return Chained()
