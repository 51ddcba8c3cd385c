"""Baselines on the adapter interface, with the same care as SLUG: a small grid, early stop, every setting listed.

    from slug_fast.baselines import run_baseline
    result = run_baseline("gaft", model, forget_batches, retain_batches, criterion)
    result.best.hyper, result.seconds, result.grid_seconds, result.to_dict()

Methods (losses: the adapter's forget_loss / retain_loss on adapter.target, the same
ones slug_fast.unlearn differentiates; trained tensors: every parameter that requires
grad, or the adapter's / `params=`, as the authors fine-tune the whole model):

- "ft": descent on the retain loss.
- "ga": ascent on the forget loss.
- "gaft": ascent on the forget loss + retain_weight * descent on the retain loss.
- "salun": GAFT updates on the top `ratio` (50%) of weights by |forget gradient| only.
- "ssd": selective synaptic dampening (diagonal Fisher), one shot per (alpha, lambda).
- "slug-authors": SLUG done the research scripts' way, for a like-for-like ratio.

FT, GA, GAFT and SalUn are one table, training.TRAINING, of TrainingSpec entries (the
loss weights per setting, the hyper-parameters, any setup): a new training baseline is
one entry, or add_baseline(spec) at run time (README, "Adding a baseline").
result.save(path) writes the best setting's change as a delta that slug_fast.apply_delta
adds to the original model, giving exactly the best setting's weights.

Each setting starts from the original weights and stops at the first check where
criterion(model) holds (checks every `check_every` optimizer steps and at each epoch
end); the best setting is the one that met the criterion with the highest
metrics["utility"] (or utility(model)), ties to fewer steps, then less time. With
apply=True the model ends at the best setting's weights, otherwise (and when no
setting met the criterion) at its original weights, bit-exactly; `result.state` holds
the best setting's changed tensors either way. No setting meeting the criterion is
reported (result.best is None), not raised.

Optimizer: torch.optim.Adam without weight decay (the authors use open_clip's AdamW;
weight decay would move weights SalUn's mask freezes). Default budget: 10 epochs (the
authors': up to 10), the criterion checked after every step, which stops a run at the
least damage it can; raise check_every= when the criterion is expensive (its time
counts in each setting's seconds). The model runs in eval mode (train_mode=True for
train mode, as the research scripts): the same outputs for models without dropout or
batch norm, such as CLIP.

Default grids, for the digits mini-CLIP (trained with AdamW at lr 2e-3; "seven" gives 4
forget and 18 retain batches): the authors' lrs 1e-7..1e-5 for ViT-B-32 are 2e-4..2e-2
of its pre-training lr 5e-4; the same fractions of 2e-3 (4e-7..4e-5) never meet the
criterion within 10 epochs of 4 forget steps. So the grids span two decades from where
the methods stop reaching the criterion (too small) to where they overshoot it and
lose utility (too large), bracketing the best setting:
- GA: lr in {3e-5, 1e-4, 3e-4, 1e-3, 3e-3} (5 settings);
- GAFT, SalUn: the same lrs x retain_weight in {0.5, 1, 2} (15 settings);
- FT: lr in {1e-4, 1e-3, 1e-2} (180 steps each unless it overwrites the concept first);
- SSD: alpha in {10, 5, 4, 3, 2, 1} x lambda in {0.1, 0.5, 1, 2, 3, 5} (36 settings of
  one check each, about SLUG's evaluation budget). alpha 10 alone cannot select any
  weight when the forget set is more than a tenth of the full data: with one loss,
  forget importance <= (N_full / N_forget) * full importance (5.5 for "seven").
On a model whose trainable set is mostly weights with a zero forget gradient (the
mini-CLIP's 49408-row token table, of which a few dozen rows are used), SalUn's top
50% holds every weight with a nonzero forget gradient and SalUn behaves as GAFT; pass
params= to leave such tensors out.
Pass grid= to change any of them (a list of dicts, a list of values of the primary
knob, or a dict of lists for a cartesian product).
"""
from __future__ import annotations

from collections.abc import Iterable

from ..errors import SlugError
from . import ssd as _ssd
from .harness import BaselineResult, Check, SettingRecord
from .salun import saliency_mask
from .slug_authors import slug_authors
from .ssd import dampen, ssd
from .training import TRAINING, TrainingSpec

ft, ga, gaft, salun = (TRAINING[k] for k in ("ft", "ga", "gaft", "salun"))
ONE_SHOT = ("ssd", "slug-authors")
TRAINING_ONLY = ("epochs", "check_every", "optimizer")  # meaningless for the one-shot methods
METHODS = {**TRAINING, "ssd": ssd, "slug-authors": slug_authors}
DEFAULT_GRIDS = {**{k: spec.grid for k, spec in TRAINING.items()}, "ssd": _ssd.DEFAULT_GRID, "slug-authors": None}


def add_baseline(spec: TrainingSpec) -> TrainingSpec:
    """Make training baseline `spec` one of METHODS in this process: run_baseline(spec.name, ...)
    runs it, and DEFAULT_GRIDS holds its grid."""
    if not isinstance(spec, TrainingSpec):
        raise SlugError(f"add_baseline takes a TrainingSpec, got {type(spec).__name__}")
    if spec.name in METHODS:
        raise SlugError(f"a baseline named {spec.name!r} exists already; choose a name not in {sorted(METHODS)}")
    METHODS[spec.name] = spec
    DEFAULT_GRIDS[spec.name] = spec.grid
    return spec


def run_baseline(method: str, model, forget: Iterable | None, retain: Iterable | None, criterion, *,
                 grid=None, progress: bool | None = None, **options) -> BaselineResult:
    """Run baseline `method` (one of METHODS) over its grid; options go to the method's function
    (epochs=, check_every=, optimizer=, params=, apply=, utility=, adapter=, forget_loss=,
    retain_loss=, adapter options such as tokenizer=). The training-only options (epochs=,
    check_every=, optimizer=) are accepted for every method, so one loop can run them all, and
    recorded in result.options["ignored"] for the one-shot methods (SSD, slug-authors)."""
    key = method.lower().replace("_", "-")
    if key not in METHODS:
        raise SlugError(f"unknown baseline {method!r}; choose one of {sorted(METHODS)}")
    ignored = sorted(k for k in TRAINING_ONLY if k in options) if key in ONE_SHOT else []
    for k in ignored:
        del options[k]
    result = METHODS[key](model, forget, retain, criterion, grid=grid, progress=progress, **options)
    if ignored:
        result.options["ignored"] = ignored
    return result


__all__ = ["BaselineResult", "Check", "DEFAULT_GRIDS", "METHODS", "ONE_SHOT", "SettingRecord", "TRAINING",
           "TrainingSpec", "add_baseline", "dampen", "ft", "ga", "gaft", "run_baseline", "saliency_mask", "salun",
           "slug_authors", "ssd"]
