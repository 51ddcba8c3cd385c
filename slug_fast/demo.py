"""The built-in demo: forget one handwritten digit from a mini-CLIP trained here in seconds.

The model is open_clip's CLIP at a tiny custom config, trained contrastively on
scikit-learn's digits (slug_fast.digits); nothing is downloaded.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from . import digits
from .errors import SlugError
from .report import write_outputs
from .unlearn import unlearn

DEFAULT_CONCEPT = "seven"


def concept_label(concept: str) -> int:
    """The digit index of a concept given as a name ("seven") or a numeral ("7")."""
    key = concept.strip().lower()
    if key.isdigit() and len(key) == 1:
        return int(key)
    if key in digits.DIGIT_NAMES:
        return digits.DIGIT_NAMES.index(key)
    raise SlugError(f"unknown digit {concept!r}; choose one of {', '.join(digits.DIGIT_NAMES)} (or 0-9)")


def pair_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int) -> list:
    """(images, caption tokens) batches with one random caption template per image."""
    gen = torch.Generator().manual_seed(seed)
    tokens = digits.tokenize(digits.captions_for(labels, gen))
    return [(images[i:i + batch_size], tokens[i:i + batch_size]) for i in range(0, len(labels), batch_size)]


def accuracies(model, data: digits.DigitsData, label: int) -> dict:
    """Zero-shot accuracies (percent) on held-out images: of the forgotten digit, and of the rest."""
    is_forget = data.test_labels == label
    text = digits.class_text_features(model)
    logits = digits.zero_shot_logits(model, data.test_images, text)
    top5 = logits.topk(5, dim=-1).indices
    hit1 = top5[:, 0] == data.test_labels
    hit5 = (top5 == data.test_labels[:, None]).any(-1)
    pct = lambda hits: round(100.0 * hits.double().mean().item(), 4)  # noqa: E731
    return {"forget_top1": pct(hit1[is_forget]), "forget_top5": pct(hit5[is_forget]),
            "retain_top1": pct(hit1[~is_forget]), "retain_top5": pct(hit5[~is_forget])}


def run_demo(concept: str = DEFAULT_CONCEPT, out: str | Path | None = None, *, epochs: int | None = None,
             seed: int = 0, strategy: str = "best", max_evals: int = 10, progress: bool | None = None) -> dict:
    """Load the shipped mini-CLIP (or train one, given `epochs` or another `seed`), forget
    `concept`, and return (and with `out`, write) the report.

    Criterion: zero-shot top-1 on held-out images of the digit is 0; among layers
    that reach it, the one keeping the most retain accuracy wins.
    """
    label = concept_label(concept)
    out = Path(out) if out is not None else None
    if out is not None and out.exists() and not out.is_dir():
        raise SlugError(f"--out {out} exists and is not a directory")
    t0 = time.perf_counter()
    data = digits.load_digits_data(seed)
    if epochs is None and seed == 0:
        model, meta = digits.load_pretrained()
        source = {"source": "shipped", "epochs": int(meta.get("epochs", 0)), "file": digits.PRETRAINED.name}
    else:
        model = digits.train_digits_clip(seed=seed, data=data, progress=bool(progress),
                                         **({} if epochs is None else {"epochs": epochs}))
        source = {"source": "trained", "epochs": epochs}
    load_seconds = time.perf_counter() - t0

    is_forget = data.train_labels == label
    forget = pair_batches(data.train_images[is_forget], data.train_labels[is_forget], 32, seed)
    retain = pair_batches(data.train_images[~is_forget], data.train_labels[~is_forget], 64, seed + 1)
    before = accuracies(model, data, label)

    def criterion(m):
        acc = accuracies(m, data, label)
        return acc["forget_top1"] == 0.0, {**acc, "utility": acc["retain_top1"]}

    result = unlearn(model, forget, retain, criterion, strategy=strategy, max_evals=max_evals,
                     progress=progress)
    after = accuracies(model, data, label)
    report = {
        "concept": digits.DIGIT_NAMES[label],
        "layer": result.layers,
        "step": result.step,
        "forget": {"top1_before": before["forget_top1"], "top1_after": after["forget_top1"],
                   "top5_before": before["forget_top5"], "top5_after": after["forget_top5"]},
        "retain": {"top1_before": before["retain_top1"], "top1_after": after["retain_top1"]},
        "seconds": {**{k: round(v, 4) for k, v in result.seconds.items()}, "model": round(load_seconds, 4)},
        "model": {"name": "digits-mini-clip", "seed": seed, **source, "test_images": len(data.test_labels)},
        "unlearn": result.to_dict(),
    }
    if out is not None:
        report["files"] = write_outputs(out, report, result)
    return report
