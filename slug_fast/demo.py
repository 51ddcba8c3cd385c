"""The built-in demo: forget one handwritten digit from a mini-CLIP trained here in seconds.

The model is open_clip's CLIP at a tiny custom config, trained contrastively on
scikit-learn's digits (slug_fast.digits); nothing is downloaded.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
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


def concept_labels(concepts: str) -> list[int]:
    """The digit indices of "seven,three" (names or numerals, each once)."""
    labels = [concept_label(c) for c in concepts.split(",") if c.strip()]
    if not labels:
        raise SlugError(f"no digit in {concepts!r}; name one or more, as 'seven' or 'seven,three'")
    if len(set(labels)) != len(labels):
        raise SlugError(f"a digit is named twice in {concepts!r}; name each once")
    return labels


def pair_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int) -> list:
    """(images, caption tokens) batches with one random caption template per image."""
    gen = torch.Generator().manual_seed(seed)
    tokens = digits.tokenize(digits.captions_for(labels, gen))
    return [(images[i:i + batch_size], tokens[i:i + batch_size]) for i in range(0, len(labels), batch_size)]


def digit_classifier(model):
    """slug_fast.eval's zero-shot classifier of `model` over the ten digit names and the caption templates."""
    from .adapters import get_adapter
    from .eval.zero_shot import ZeroShotClassifier

    return ZeroShotClassifier(get_adapter(model, tokenizer=digits.tokenize), digits.DIGIT_NAMES, digits.TEMPLATES)


@torch.no_grad()
def accuracies(model, data: digits.DigitsData, label: int, classifier=None,
               features: torch.Tensor | None = None) -> dict:
    """Zero-shot accuracies (percent) on held-out images: of the forgotten digit, and of the rest
    (all their images pooled).

    `classifier` (digit_classifier(model)) and `features` (the test images' normalised
    features) may come from caches.
    """
    classifier = digit_classifier(model) if classifier is None else classifier
    hits = classifier.hits(data.test_labels, (1, 5), images=data.test_images if features is None else None,
                           features=features, batch_size=len(data.test_labels))
    is_forget = data.test_labels == label
    pct = lambda hits: round(100.0 * hits.double().mean().item(), 4)  # noqa: E731
    return {"forget_top1": pct(hits[1][is_forget]), "forget_top5": pct(hits[5][is_forget]),
            "retain_top1": pct(hits[1][~is_forget]), "retain_top5": pct(hits[5][~is_forget])}


class _CachedEncoders:
    """For a task's own `model`: the zero-shot classifier's class weights and the held-out
    images' features, recomputed only when their tower changed."""

    @functools.cached_property
    def _caches(self):
        from .eval.zero_shot import TowerCache, encode_images

        classifier = digit_classifier(self.model)
        images = self.data.test_images
        return classifier, TowerCache(classifier.adapter, "vision",
                                      lambda: encode_images(classifier.adapter, images, len(images)))


@dataclass
class DemoTask(_CachedEncoders):
    """The demo's unlearning task, the same for SLUG and every baseline: the model, the data
    split, forget/retain batches, the criterion and the measurements."""

    model: torch.nn.Module
    data: digits.DigitsData
    label: int
    forget: list  # batches of the digit's training images with captions
    retain: list  # batches of the other training images
    source: dict  # where the model came from
    load_seconds: float

    @property
    def concept(self) -> str:
        return digits.DIGIT_NAMES[self.label]

    def criterion(self, model) -> tuple[bool, dict]:
        """Forgotten when held-out zero-shot top-1 on the digit is 0; utility = retain top-1."""
        acc = self.accuracies(model)
        return acc["forget_top1"] == 0.0, {**acc, "utility": acc["retain_top1"]}

    def accuracies(self, model=None) -> dict:
        """accuracies() of `model` (default: the task's); for the task's own model the class weights
        and image features are cached and recomputed only when their tower changed."""
        if model is not None and model is not self.model:
            return accuracies(model, self.data, self.label)
        classifier, images = self._caches
        return accuracies(self.model, self.data, self.label, classifier, images.get())

    def mia(self, model=None) -> dict:
        """Membership inference of the digit's training images vs its held-out ones (percent;
        50 = indistinguishable), by loss and by image-text distance, as in the paper."""
        from .adapters import get_adapter
        from .eval.mia import clip_membership_inference

        gen = torch.Generator().manual_seed(0)
        pairs = []
        for images, labels in ((self.data.train_images, self.data.train_labels),
                               (self.data.test_images, self.data.test_labels)):
            keep = labels == self.label
            pairs.append(list(zip(images[keep], digits.captions_for(labels[keep], gen))))
        adapter = get_adapter(self.model if model is None else model, tokenizer=digits.tokenize)
        res = clip_membership_inference(adapter, pairs[0], pairs[1])
        return {"loss": res["loss"].mean, "loss_std": res["loss"].std, "distance": res["distance"].mean,
                "distance_std": res["distance"].std}

    def similarity_sample(self, n: int = 10) -> list[tuple]:
        """n held-out pairs of the digit and n of other digits, for the before/after similarity plot."""
        gen = torch.Generator().manual_seed(1)
        is_forget = self.data.test_labels == self.label
        idx = torch.cat([is_forget.nonzero().flatten()[:n], (~is_forget).nonzero().flatten()[:n]])
        return list(zip(self.data.test_images[idx], digits.captions_for(self.data.test_labels[idx], gen)))


def demo_task(concept: str = DEFAULT_CONCEPT, *, epochs: int | None = None, seed: int = 0,
              progress: bool | None = None) -> DemoTask:
    """The demo task for `concept` on the shipped mini-CLIP (or one trained with `epochs` / `seed`)."""
    label = concept_label(concept)
    t0 = time.perf_counter()
    data = digits.load_digits_data(seed)
    model, source = _demo_model(data, epochs, seed, progress)
    is_forget = data.train_labels == label
    forget = pair_batches(data.train_images[is_forget], data.train_labels[is_forget], 32, seed)
    retain = pair_batches(data.train_images[~is_forget], data.train_labels[~is_forget], 64, seed + 1)
    return DemoTask(model, data, label, forget, retain, source, time.perf_counter() - t0)


def _demo_model(data: digits.DigitsData, epochs: int | None, seed: int, progress: bool | None):
    """The shipped mini-CLIP, or one trained here (given `epochs` or another `seed`), and where it came from."""
    if epochs is None and seed == 0:
        model, meta = digits.load_pretrained()
        return model, {"source": "shipped", "epochs": int(meta.get("epochs", 0)), "file": digits.PRETRAINED.name}
    model = digits.train_digits_clip(seed=seed, data=data, progress=bool(progress),
                                     **({} if epochs is None else {"epochs": epochs}))
    return model, {"source": "trained", "epochs": epochs}


@dataclass
class DemoManyTask(_CachedEncoders):
    """Several digits to forget at once: each one's forget batches and criterion, one retain
    set of the digits kept, and the kept digits' held-out accuracy as the utility."""

    model: torch.nn.Module
    data: digits.DigitsData
    labels: list[int]
    forgets: dict[str, list]  # digit name -> batches of its training images
    retain: list  # batches of the kept digits' training images
    source: dict
    load_seconds: float

    @property
    def concepts(self) -> list[str]:
        return [digits.DIGIT_NAMES[k] for k in self.labels]

    def accuracies(self, model=None) -> dict:
        """Held-out zero-shot top-1 (percent) of each forgotten digit ("<name>_top1") and of the
        kept digits pooled ("kept_top1")."""
        if model is None or model is self.model:
            classifier, images = self._caches
            hits = classifier.hits(self.data.test_labels, (1,), features=images.get())[1]
        else:
            hits = digit_classifier(model).hits(self.data.test_labels, (1,), images=self.data.test_images,
                                                batch_size=len(self.data.test_labels))[1]
        labels = self.data.test_labels
        pct = lambda mask: round(100.0 * hits[mask].double().mean().item(), 4)  # noqa: E731
        out = {f"{digits.DIGIT_NAMES[k]}_top1": pct(labels == k) for k in self.labels}
        out["kept_top1"] = pct(~torch.isin(labels, torch.tensor(self.labels)))
        return out

    def criterion(self, concept: str):
        """Forgotten when the digit's held-out top-1 is 0; utility = the kept digits' top-1."""
        def criterion(model) -> tuple[bool, dict]:
            acc = self.accuracies(model)
            return acc[f"{concept}_top1"] == 0.0, {"forget_top1": acc[f"{concept}_top1"],
                                                  "kept_top1": acc["kept_top1"], "utility": acc["kept_top1"]}
        return criterion


def demo_many_task(concepts: str, *, epochs: int | None = None, seed: int = 0,
                   progress: bool | None = None) -> DemoManyTask:
    """The demo task for several digits ("seven,three") on the shipped mini-CLIP."""
    labels = concept_labels(concepts)
    t0 = time.perf_counter()
    data = digits.load_digits_data(seed)
    model, source = _demo_model(data, epochs, seed, progress)
    forgets = {}
    for label in labels:
        is_forget = data.train_labels == label
        forgets[digits.DIGIT_NAMES[label]] = pair_batches(data.train_images[is_forget], data.train_labels[is_forget],
                                                          32, seed)
    kept = ~torch.isin(data.train_labels, torch.tensor(labels))
    retain = pair_batches(data.train_images[kept], data.train_labels[kept], 64, seed + 1)
    return DemoManyTask(model, data, labels, forgets, retain, source, time.perf_counter() - t0)


def run_demo_many(concepts: str, out: str | Path | None = None, *, epochs: int | None = None, seed: int = 0,
                  strategy: str = "best", max_evals: int = 10, progress: bool | None = None) -> dict:
    """Forget several digits at once with slug_fast.unlearn_many (one shared retain gradient,
    the digits applied in the order given, every criterion verified on the final model) and
    return (and with `out`, write) the report; the delta is saved revertible."""
    from .many import unlearn_many
    from .report import plot_interference

    concept_labels(concepts)  # refuse a bad digit before loading anything
    out = Path(out) if out is not None else None
    if out is not None:
        from .job import check_out_dir
        check_out_dir(out)
    task = demo_many_task(concepts, epochs=epochs, seed=seed, progress=progress)
    before = task.accuracies()
    result = unlearn_many(task.model, {c: (task.forgets[c], task.criterion(c)) for c in task.concepts}, task.retain,
                          strategy=strategy, max_evals=max_evals, progress=progress)
    after = task.accuracies()
    report = {
        "concepts": task.concepts,
        "layer": {c: r.edited for c, r in result.concepts.items()},
        "step": {c: r.step for c, r in result.concepts.items()},
        "forget": {f"{c}_top1_{when}": acc[f"{c}_top1"] for c in task.concepts
                   for when, acc in (("before", before), ("after", after))},
        "kept": {"top1_before": before["kept_top1"], "top1_after": after["kept_top1"]},
        "seconds": {**{k: round(v, 4) for k, v in result.seconds.items()}, "model": round(task.load_seconds, 4)},
        "model": {"name": "digits-mini-clip", "seed": seed, **task.source, "test_images": len(task.data.test_labels)},
        "unlearn": result.to_dict(),
    }
    if out is not None:
        from .report import write_outputs

        plot = ("interference.png", lambda path: plot_interference(
            result.interference, path, f"forgetting {', '.join(task.concepts)}: every criterion after each edit"))
        report["files"] = write_outputs(out, report, result, {"interference": plot})
    return report


def run_demo(concept: str = DEFAULT_CONCEPT, out: str | Path | None = None, *, epochs: int | None = None,
             seed: int = 0, strategy: str = "best", max_evals: int = 10, progress: bool | None = None) -> dict:
    """Load the shipped mini-CLIP (or train one, given `epochs` or another `seed`), forget
    `concept`, and return (and with `out`, write) the report.

    Criterion: zero-shot top-1 on held-out images of the digit is 0; among layers
    that reach it, the one keeping the most retain accuracy wins.
    """
    from .adapters import get_adapter
    from .eval.similarity import SimilarityWatch

    concept_label(concept)  # refuse a bad digit before loading anything
    out = Path(out) if out is not None else None
    if out is not None:
        from .job import check_out_dir
        check_out_dir(out)
    task = demo_task(concept, epochs=epochs, seed=seed, progress=progress)
    before, mia_before = task.accuracies(), task.mia()
    similarity = SimilarityWatch(get_adapter(task.model, tokenizer=digits.tokenize), task.similarity_sample())

    result = unlearn(task.model, task.forget, task.retain, task.criterion, strategy=strategy, max_evals=max_evals,
                     progress=progress)
    after, mia_after = task.accuracies(), task.mia()
    similarity_stats = similarity.finish()
    report = {
        "concept": task.concept,
        "layer": result.layers,
        "step": result.step,
        "forget": {"top1_before": before["forget_top1"], "top1_after": after["forget_top1"],
                   "top5_before": before["forget_top5"], "top5_after": after["forget_top5"]},
        "retain": {"top1_before": before["retain_top1"], "top1_after": after["retain_top1"]},
        "mia": {"before": mia_before["loss"], "after": mia_after["loss"],
                "distance_before": mia_before["distance"], "distance_after": mia_after["distance"]},
        "similarity": similarity_stats,
        "seconds": {**{k: round(v, 4) for k, v in result.seconds.items()}, "model": round(task.load_seconds, 4)},
        "model": {"name": "digits-mini-clip", "seed": seed, **task.source, "test_images": len(task.data.test_labels)},
        "unlearn": result.to_dict(),
    }
    if out is not None:
        plot = ("similarity.png", lambda path: similarity.plot(path, f"image-text similarity, forgetting {task.concept}"))
        report["files"] = write_outputs(out, report, result, {"similarity": plot})
    return report
