"""Zero-shot classification through a CLIP-family adapter: the paper's identity and ImageNet metrics.

Class weights are the renormalised mean of the normalised text embeddings of
every template filled with the class name. They are cached and re-encoded only
when a text-tower parameter changed (each parameter's autograd version counter,
which LayerEdit bumps on every step), so a step search that edits the vision
tower never re-encodes a prompt; image features are cached the same way on the
vision tower.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..adapters.clip import ClipFamilyAdapter
from ..errors import SlugError, unknown_name
from ..modes import training_state

# Identities, as in the authors' CelebA evaluation ("{}.") plus common CLIP phrasings.
IDENTITY_TEMPLATES = ("{}.", "a photo of {}.", "a portrait of {}.", "a close-up photo of {}.", "an image of {}.")
# Objects: the 7-template ensemble CLIP recommends for ImageNet, plus the plain prompt.
OBJECT_TEMPLATES = ("a photo of a {}.", "itap of a {}.", "a bad photo of the {}.", "a origami {}.",
                    "a photo of the large {}.", "a {} in a video game.", "art of the {}.", "a photo of the small {}.")


def check_adapter(adapter) -> ClipFamilyAdapter:
    """`adapter` if it is a CLIP-family adapter, else an error saying how to get one."""
    if not isinstance(adapter, ClipFamilyAdapter):
        raise SlugError(f"evaluation needs a CLIP-family adapter, got {type(adapter).__name__}; use "
                        "slug_fast.adapters.get_adapter(model, tokenizer=..., preprocess=...) (open_clip) or "
                        "get_adapter(model, processor=...) (Hugging Face CLIP)")
    return adapter


def _count(images) -> int:
    return images.shape[0] if isinstance(images, torch.Tensor) else len(images)


def encode_images(adapter: ClipFamilyAdapter, images, batch_size: int = 64) -> torch.Tensor:
    """Normalised image embeddings (N, D) of PIL images or a pixel tensor, `batch_size` at a time."""
    n = _count(images)
    if n == 0:
        raise SlugError("no images to encode")
    if batch_size < 1:
        raise SlugError(f"batch_size must be at least 1, got {batch_size}")
    with training_state(adapter.target, train=False):
        return torch.cat([adapter.image_features(images[i:i + batch_size]).float() for i in range(0, n, batch_size)])


def encode_texts(adapter: ClipFamilyAdapter, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Normalised text embeddings (N, D) of strings, `batch_size` at a time."""
    texts = list(texts)
    if not texts:
        raise SlugError("no texts to encode")
    if batch_size < 1:
        raise SlugError(f"batch_size must be at least 1, got {batch_size}")
    with training_state(adapter.target, train=False):
        return torch.cat([adapter.text_features(texts[i:i + batch_size]).float()
                          for i in range(0, len(texts), batch_size)])


class TowerCache:
    """A value recomputed only when one of a tower's parameters changed.

    The key is each parameter's identity, autograd version counter (bumped by
    in-place writes through the parameter: optimizers, load_state_dict,
    LayerEdit), storage address and dtype (moving the model changes them).
    """

    def __init__(self, adapter: ClipFamilyAdapter, tower: str, compute: Callable[[], torch.Tensor]):
        adapter.tower_params(tower)  # an unknown tower fails here, not at first use
        self.adapter, self.tower, self.compute = adapter, tower, compute
        self._key = None
        self._value = None
        self.computed = 0  # how many times `compute` ran

    def key(self) -> tuple:
        return tuple((id(p), p._version, p.data_ptr(), p.dtype) for p in self.adapter.tower_params(self.tower))

    def get(self) -> torch.Tensor:
        key = self.key()
        if key != self._key:
            self._value = self.compute()
            self._key = key
            self.computed += 1
        return self._value


def _check_topk(topk: Sequence[int], n_classes: int) -> tuple[int, ...]:
    topk = tuple(int(k) for k in topk)
    if not topk or any(k < 1 or k > n_classes for k in topk):
        raise SlugError(f"topk {topk} must be between 1 and the number of classes ({n_classes})")
    return topk


class ZeroShotClassifier:
    """Zero-shot classifier over `class_names` x `templates` ("{}" marks the name) through an adapter."""

    def __init__(self, adapter: ClipFamilyAdapter, class_names: Sequence[str],
                 templates: Sequence[str] = OBJECT_TEMPLATES, text_batch_size: int = 256):
        self.adapter = check_adapter(adapter)
        self.class_names = [str(c) for c in class_names]
        self.templates = list(templates)
        if not self.class_names:
            raise SlugError("class_names is empty; pass the names of the classes to choose among")
        duplicates = sorted({c for c in self.class_names if self.class_names.count(c) > 1})
        if duplicates:
            raise SlugError(f"class_names repeats {duplicates[:3]}; each class needs one distinct name")
        if not self.templates or any("{}" not in t for t in self.templates):
            bad = [t for t in self.templates if "{}" not in t][:3]
            raise SlugError(f"every template needs a '{{}}' where the class name goes, e.g. 'a photo of {{}}.'; "
                            f"got {bad or 'no templates'}")
        if text_batch_size < 1:
            raise SlugError(f"text_batch_size must be at least 1, got {text_batch_size}")
        self.text_batch_size = text_batch_size
        self._tokens = None  # (device, the prompts' token batches): the prompts never change
        self._weights = TowerCache(self.adapter, "text", self._encode_classes)

    def _encode_classes(self) -> torch.Tensor:
        device = self.adapter.device
        if self._tokens is None or self._tokens[0] != device:  # made again only if the model moved
            texts = [t.format(c) for c in self.class_names for t in self.templates]
            step = self.text_batch_size
            self._tokens = device, [self.adapter.tokens(texts[i:i + step]) for i in range(0, len(texts), step)]
        with training_state(self.adapter.target, train=False):
            emb = torch.cat([self.adapter.token_features(tokens).float() for tokens in self._tokens[1]])
        emb = emb.view(len(self.class_names), len(self.templates), -1).mean(dim=1)
        return F.normalize(emb, dim=-1)

    def weights(self) -> torch.Tensor:
        """(C, D) unit-norm class weights, re-encoded only after the text tower changed."""
        return self._weights.get()

    @property
    def encodes(self) -> int:
        """How many times the class prompts were encoded."""
        return self._weights.computed

    def labels(self, labels) -> torch.Tensor:
        """Class indices (int64) from indices or class names."""
        if isinstance(labels, torch.Tensor):
            out = labels.to(torch.int64).flatten().cpu()
        else:
            labels = list(labels)
            out = torch.tensor([self.index(y) if isinstance(y, str) else int(y) for y in labels], dtype=torch.int64)
        bad = out[(out < 0) | (out >= len(self.class_names))]
        if len(bad):
            raise SlugError(f"label {int(bad[0])} is out of range for {len(self.class_names)} classes")
        return out

    def index(self, name: str | int) -> int:
        """The index of a class given by name or index."""
        if isinstance(name, str):
            if name not in self.class_names:
                raise unknown_name("class", name, self.class_names)
            return self.class_names.index(name)
        if not 0 <= int(name) < len(self.class_names):
            raise SlugError(f"class index {name} is out of range for {len(self.class_names)} classes")
        return int(name)

    def similarities(self, images=None, features: torch.Tensor | None = None, batch_size: int = 64) -> torch.Tensor:
        """(N, C) cosine similarities of images (or precomputed normalised features) to each class."""
        if features is None:
            features = encode_images(self.adapter, images, batch_size)
        weights = self.weights()
        return features.to(weights.device, weights.dtype) @ weights.T

    def hits(self, labels, topk: Sequence[int] = (1, 5), images=None, features=None, batch_size: int = 64) -> dict:
        """k -> bool tensor (N,): whether each image's label is among its k most similar classes."""
        topk = _check_topk(topk, len(self.class_names))
        labels = self.labels(labels)
        sims = self.similarities(images, features, batch_size).cpu()
        if len(labels) != len(sims):
            raise SlugError(f"{len(sims)} images but {len(labels)} labels; give one label per image")
        ranked = sims.topk(max(topk), dim=-1).indices
        return {k: (ranked[:, :k] == labels[:, None]).any(dim=-1) for k in topk}

    def accuracy(self, images, labels, topk: Sequence[int] = (1, 5), batch_size: int = 64) -> dict[str, float]:
        """{"top1": %, "top5": %}: zero-shot accuracy over all images (ImageNet-style utility)."""
        return {f"top{k}": _percent(h) for k, h in self.hits(labels, topk, images, batch_size=batch_size).items()}

    def concept_accuracy(self, images, labels, concept: str | int, topk: Sequence[int] = (1, 5),
                         batch_size: int = 64, features: torch.Tensor | None = None) -> dict[str, float | int | None]:
        """Accuracy on the concept's images (forget_topK) and on the other classes' (others_topK), in percent.

        others_topK is the mean of the per-class accuracies of the other classes
        that have images (as the paper's CelebA-100 number), None when there are none.
        """
        label = self.index(concept)
        labels = self.labels(labels)
        if not bool((labels == label).any()):
            raise SlugError(f"no image is labelled {self.class_names[label]!r}; the forget accuracy needs "
                            "images of the concept")
        topk = _check_topk(topk, len(self.class_names))
        counts, hit_counts = self.class_counts(labels, self.hits(labels, topk, images, features, batch_size))
        return self.concept_metrics(label, topk, counts, hit_counts)

    def class_counts(self, labels: torch.Tensor, hits: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(images per class [C], hits per k and class [len(hits), C]), int64: counts that
        add up across shards of the images (the distributed criterion all-reduces them)."""
        n = len(self.class_names)  # every class, present or not: the shards' tables must line up
        counts = torch.bincount(labels, minlength=n)
        hit_counts = torch.stack([torch.bincount(labels[h], minlength=n) for h in hits.values()])
        return counts, hit_counts

    def concept_metrics(self, label: int, topk: Sequence[int], counts: torch.Tensor,
                        hit_counts: torch.Tensor) -> dict[str, float | int | None]:
        """concept_accuracy's metrics from class_counts (of every image, or summed over shards)."""
        n, hits = counts.tolist(), hit_counts.tolist()
        others = [c for c in range(len(n)) if c != label and n[c] > 0]
        out: dict[str, float | int | None] = {"n_forget": n[label], "n_others": sum(n) - n[label]}
        for j, k in enumerate(topk):
            out[f"forget_top{k}"] = 100.0 * (hits[j][label] / n[label])
            out[f"others_top{k}"] = (sum(100.0 * (hits[j][c] / n[c]) for c in others) / len(others)) if others \
                else None
        return out


def _percent(hits: torch.Tensor) -> float:
    return 100.0 * hits.double().mean().item()


def zero_shot_accuracy(adapter: ClipFamilyAdapter, images, labels, class_names: Sequence[str],
                       templates: Sequence[str] = OBJECT_TEMPLATES, topk: Sequence[int] = (1, 5),
                       batch_size: int = 64) -> dict[str, float]:
    """Zero-shot top-k accuracy (percent) of a labelled test set among `class_names`.

    For repeated evaluations keep a ZeroShotClassifier and call its `accuracy`:
    it re-encodes the prompts only when the text tower changed.
    """
    return ZeroShotClassifier(adapter, class_names, templates).accuracy(images, labels, topk, batch_size)


def concept_accuracy(adapter: ClipFamilyAdapter, images, labels, class_names: Sequence[str], concept: str | int,
                     templates: Sequence[str] = IDENTITY_TEMPLATES, topk: Sequence[int] = (1, 5),
                     batch_size: int = 64) -> dict[str, float | int | None]:
    """Forget and other-class zero-shot accuracy of `concept` among N class names (see
    ZeroShotClassifier.concept_accuracy)."""
    return ZeroShotClassifier(adapter, class_names, templates).concept_accuracy(images, labels, concept, topk,
                                                                                batch_size)


def concept_criterion(adapter: ClipFamilyAdapter, images, labels, class_names: Sequence[str], concept: str | int,
                      templates: Sequence[str] = IDENTITY_TEMPLATES, k: int = 5,
                      utility: Callable[[object], float] | None = None, batch_size: int = 64,
                      process_group=None):
    """A `criterion(model) -> (forgotten, metrics)` for slug_fast.unlearn, the paper's CLIP identity test.

    Forgotten when the concept's top-`k` zero-shot accuracy is 0. The metrics
    are concept_accuracy's (top-1 and top-k) plus "utility": `utility(model)`
    if given, else others_top1. Prompts are re-encoded only after a text-tower
    edit and images only after a vision-tower edit.
    `criterion(m)` judges `m` when it is another model of the adapter's type (a copy,
    uncached); anything else (the pipeline whose CLIP model the adapter holds, say)
    is judged through the adapter's own model, which every edit reaches.
    process_group: judge the images on several processes (torch.distributed): a
    ProcessGroup, or "world". Every rank passes all the images and labels, encodes its own
    contiguous share (slug_fast.data.shard) and the per-class hit counts are all-reduced,
    so every rank gets the metrics of all images, equal to one process's. Call it on every
    rank of the group together, as unlearn does.
    """
    classifier = ZeroShotClassifier(adapter, class_names, templates)
    label_ids = classifier.labels(labels)
    label = classifier.index(concept)
    if not bool((label_ids == label).any()):
        raise SlugError(f"no image is labelled {classifier.class_names[label]!r}; the forget accuracy needs "
                        "images of the concept")
    if utility is None and not bool((label_ids != label).any()):
        raise SlugError("every image shows the concept, so there is no utility to keep; add images of the other "
                        "classes or pass utility=")
    topk = tuple(sorted({1, k}))
    _check_topk(topk, len(classifier.class_names))
    if process_group is not None:
        return _sharded_criterion(adapter, classifier, images, label_ids, label, topk, k, utility, batch_size,
                                  process_group)
    pixels = images if isinstance(images, torch.Tensor) else adapter.pixels(list(images))
    features = TowerCache(adapter, "vision", lambda: encode_images(adapter, pixels, batch_size))

    def criterion(model) -> tuple[bool, dict]:
        if model is adapter.model or type(model) is not type(adapter.model):
            metrics = classifier.concept_accuracy(None, label_ids, concept, topk, features=features.get())
        else:
            other = adapter.rebind(model)
            metrics = ZeroShotClassifier(other, class_names, templates).concept_accuracy(
                None, label_ids, concept, topk, features=encode_images(other, pixels, batch_size))
        metrics["utility"] = float(utility(model)) if utility is not None else metrics["others_top1"]
        return metrics[f"forget_top{k}"] == 0.0, metrics

    return criterion


def _sharded_criterion(adapter, classifier: ZeroShotClassifier, images, label_ids: torch.Tensor, label: int,
                       topk: tuple[int, ...], k: int, utility, batch_size: int, process_group):
    """concept_criterion on this rank's share of the images, hit counts all-reduced."""
    from ..data import shard
    from ..distributed import Ranks

    ranks = Ranks(None if process_group == "world" else process_group)
    mine = shard(range(len(label_ids)), ranks.rank, ranks.world)
    local_labels = label_ids[mine]
    if isinstance(images, torch.Tensor):
        pixels = images[mine]
    else:
        images = list(images)
        pixels = adapter.pixels([images[i] for i in mine]) if mine else None
    features = TowerCache(adapter, "vision", lambda: encode_images(adapter, pixels, batch_size))

    def criterion(model) -> tuple[bool, dict]:
        if model is not adapter.model and type(model) is type(adapter.model):
            raise SlugError("the distributed concept criterion judges the adapter's own model; build one for the "
                            "other model")
        if len(mine):
            hits = classifier.hits(local_labels, topk, features=features.get())
            counts, hit_counts = classifier.class_counts(local_labels, hits)
        else:
            counts = torch.zeros(len(classifier.class_names), dtype=torch.int64)
            hit_counts = torch.zeros((len(topk), len(classifier.class_names)), dtype=torch.int64)
        table = ranks.all_reduce(torch.cat([counts[None], hit_counts]))
        metrics = classifier.concept_metrics(label, topk, table[0], table[1:])
        metrics["utility"] = float(utility(model)) if utility is not None else metrics["others_top1"]
        return metrics[f"forget_top{k}"] == 0.0, metrics

    return criterion
