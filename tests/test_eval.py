"""Evaluation: zero-shot accuracy and its cache, membership inference, similarity matrix and plot."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from slug_fast import LayerEdit, digits
from slug_fast.adapters import get_adapter
from slug_fast.adapters.clip import ClipFamilyAdapter
from slug_fast.adapters.open_clip import OpenClipAdapter
from slug_fast.errors import SlugError
from slug_fast.eval import (SimilarityWatch, ZeroShotClassifier, clip_membership_inference, clip_sample_scores,
                            concept_accuracy, concept_criterion, encode_images, encode_texts, generate_and_score,
                            membership_inference, plot_similarity, similarity_change, similarity_figure,
                            similarity_matrix, table_scores, zero_shot_accuracy)
from slug_fast.data import LabelledImages

NAMES = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")
# Two templates whose embeddings differ in norm (2x and 1x) and lean opposite ways on an extra axis:
# the mean of the normalised embeddings is exactly the class axis, the plain mean is not.
TEMPLATES = {"a photo of {}.": (2.0, 1.0), "{}, drawn.": (1.0, -1.0)}
DIM = len(NAMES) + 1


class StubClip(nn.Module):
    """Identity towers over hand-set inputs: a text is one class axis plus a template lean."""

    def __init__(self):
        super().__init__()
        self.visual = nn.Linear(DIM, DIM, bias=False)
        self.text_proj = nn.Linear(DIM, DIM, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        with torch.no_grad():
            self.visual.weight.copy_(torch.eye(DIM))
            self.text_proj.weight.copy_(torch.eye(DIM))


def text_input(text):
    """The stub's 'tokens' of a filled template (independent of the code under test)."""
    for template, (scale, lean) in TEMPLATES.items():
        for c, name in enumerate(NAMES):
            if template.format(name) == text:
                v = torch.zeros(DIM)
                v[c], v[-1] = 1.0, lean
                return scale * v
    raise AssertionError(f"unexpected prompt {text!r}")


class StubAdapter(ClipFamilyAdapter):
    name = "stub"
    towers = {"vision": "visual.", "text": "text_proj."}

    def __init__(self, model):
        super().__init__(model)
        self.texts_encoded = 0
        self.images_encoded = 0

    def encode_pixels(self, module, pixels):
        self.images_encoded += len(pixels)
        return module.visual(pixels)

    def encode_tokens(self, module, tokens):
        self.texts_encoded += len(tokens)
        return module.text_proj(tokens)

    def log_logit_scale(self, module):
        return module.logit_scale

    def split(self, batch):
        return batch

    def join(self, pixels, tokens):
        return pixels, tokens

    def pixels(self, images):
        return torch.stack(list(images))

    def tokens(self, texts):
        return torch.stack([text_input(t) for t in texts])


def images_with_ranks(labels, ranks, gen):
    """Image vectors whose true class is the ranks[i]-th most similar (0 = best), with distinct similarities."""
    out = torch.zeros(len(labels), DIM)
    for i, (y, r) in enumerate(zip(labels.tolist(), ranks.tolist())):
        values = torch.linspace(2.0, 1.0, len(NAMES))  # distinct, descending
        others = [c for c in torch.randperm(len(NAMES), generator=gen).tolist() if c != y]
        order = others[:r] + [y] + others[r:]
        out[i, order] = values
    return out


def test_encoding_runs_in_eval_mode_and_restores_each_submodules_own_mode():
    model = StubClip()
    model.train()
    model.text_proj.eval()  # mixed modes: each comes back as it was
    seen = []

    class Watching(StubAdapter):
        def encode_pixels(self, module, pixels):
            seen.append([m.training for m in module.modules()])
            return super().encode_pixels(module, pixels)

        def encode_tokens(self, module, tokens):
            seen.append([m.training for m in module.modules()])
            return super().encode_tokens(module, tokens)

    ad = Watching(model)
    encode_images(ad, torch.eye(DIM)[:3], batch_size=2)
    encode_texts(ad, ["a photo of alpha.", "{}, drawn.".format("bravo")])
    clip_sample_scores(ad, [(torch.eye(DIM)[i], f"a photo of {NAMES[i]}.") for i in range(3)], batch_size=2)
    assert len(seen) == 2 + 1 + 2 * 2 and not any(any(modes) for modes in seen)  # every encode in eval mode
    assert [m.training for m in model.modules()] == [True, True, False]


def test_class_counts_cover_every_class_so_shards_add_up():
    """Per-class counts of images and hits, int64, one column per class even where no image is (the
    distributed criterion all-reduces them, so every shard's table must have the same shape)."""
    classifier = ZeroShotClassifier(StubAdapter(StubClip()), NAMES, list(TEMPLATES))
    labels = torch.tensor([0, 2, 2, 0, 2, 5])  # classes 1, 3, 4, 6 and 7 have no image
    hits = {1: torch.tensor([True, False, True, True, False, False]), 5: torch.tensor([True] * 5 + [False])}
    counts, hit_counts = classifier.class_counts(labels, hits)
    assert counts.dtype == hit_counts.dtype == torch.int64
    assert counts.tolist() == [2, 0, 3, 0, 0, 1, 0, 0]
    assert hit_counts.tolist() == [[2, 0, 1, 0, 0, 0, 0, 0], [2, 0, 3, 0, 0, 0, 0, 0]]
    halves = [classifier.class_counts(labels[s], {k: h[s] for k, h in hits.items()})
              for s in (slice(0, 2), slice(2, 6))]  # the first half has class 0 only
    assert torch.equal(halves[0][0] + halves[1][0], counts) and torch.equal(halves[0][1] + halves[1][1], hit_counts)


def test_zero_shot_accuracy_is_the_known_answer(gen):
    n = 300
    labels = torch.randint(len(NAMES), (n,), generator=gen)
    ranks = torch.randint(len(NAMES), (n,), generator=gen)
    images = images_with_ranks(labels, ranks, gen)
    adapter = StubAdapter(StubClip())
    classifier = ZeroShotClassifier(adapter, NAMES, list(TEMPLATES))
    torch.testing.assert_close(classifier.weights(), torch.eye(DIM)[:len(NAMES)], atol=1e-6, rtol=0)
    acc = classifier.accuracy(images, labels, topk=(1, 5))
    assert acc["top1"] == pytest.approx(100 * (ranks == 0).double().mean().item(), abs=1e-9)
    assert acc["top5"] == pytest.approx(100 * (ranks < 5).double().mean().item(), abs=1e-9)
    by_name = zero_shot_accuracy(adapter, list(images), [NAMES[y] for y in labels.tolist()], NAMES,
                                 list(TEMPLATES), topk=(1, 5), batch_size=7)
    assert by_name == pytest.approx(acc)

    concept = 3
    res = concept_accuracy(adapter, images, labels, NAMES, NAMES[concept], list(TEMPLATES), topk=(1, 5))
    mine = labels == concept
    assert res["n_forget"] == int(mine.sum()) and res["n_others"] == n - int(mine.sum())
    assert res["forget_top1"] == pytest.approx(100 * (ranks[mine] == 0).double().mean().item())
    assert res["forget_top5"] == pytest.approx(100 * (ranks[mine] < 5).double().mean().item())
    per_class = [100 * (ranks[labels == c] == 0).double().mean().item() for c in range(len(NAMES))
                 if c != concept and (labels == c).any()]
    assert res["others_top1"] == pytest.approx(sum(per_class) / len(per_class))


def test_zero_shot_bad_input():
    adapter = StubAdapter(StubClip())
    with pytest.raises(SlugError, match=r"needs a '\{\}' where the class name goes.*; got \['a photo'\]$"):
        ZeroShotClassifier(adapter, NAMES, ["a photo"])
    with pytest.raises(SlugError, match=r"; got \['one', 'two', 'three'\]$"):  # the first three of them
        ZeroShotClassifier(adapter, NAMES, ["a {}", "one", "two", "three", "four"])
    with pytest.raises(SlugError, match="text_batch_size must be at least 1, got 0"):
        ZeroShotClassifier(adapter, NAMES, list(TEMPLATES), text_batch_size=0)
    assert ZeroShotClassifier(adapter, NAMES, list(TEMPLATES), text_batch_size=1).text_batch_size == 1
    with pytest.raises(SlugError, match="repeats \\['alpha'\\]"):
        ZeroShotClassifier(adapter, ("alpha", "alpha"), list(TEMPLATES))
    with pytest.raises(SlugError, match="needs a CLIP-family adapter"):
        ZeroShotClassifier(digits.build_model(0), NAMES)
    classifier = ZeroShotClassifier(adapter, NAMES, list(TEMPLATES))
    images = torch.eye(DIM)[:3]
    with pytest.raises(SlugError, match="topk \\(1, 9\\) must be between 1 and the number of classes \\(8\\)"):
        classifier.accuracy(images, [0, 1, 2], topk=(1, 9))
    with pytest.raises(SlugError, match="class 'alfa' not found; closest: alpha"):
        classifier.accuracy(images, ["alfa", "bravo", "echo"])
    with pytest.raises(SlugError, match="3 images but 2 labels"):
        classifier.accuracy(images, [0, 1])
    with pytest.raises(SlugError, match="no image is labelled 'hotel'"):
        classifier.concept_accuracy(images, [0, 1, 2], "hotel")


def test_class_weights_are_cached_until_the_text_tower_changes(gen):
    model = StubClip()
    adapter = StubAdapter(model)
    classifier = ZeroShotClassifier(adapter, NAMES, list(TEMPLATES))
    prompts = len(NAMES) * len(TEMPLATES)
    first = classifier.weights().clone()
    classifier.weights()
    assert adapter.texts_encoded == prompts and classifier.encodes == 1

    with LayerEdit(model, {"visual.weight": torch.randn(DIM, DIM, generator=gen)}) as edit:
        edit.step(0.5)
        classifier.weights()
        assert adapter.texts_encoded == prompts  # a vision edit leaves the prompts alone

    direction = torch.randn(DIM, DIM, generator=gen)
    with LayerEdit(model, {"text_proj.weight": direction}) as edit:
        edit.step(0.5)
        edited = classifier.weights()
        assert adapter.texts_encoded == 2 * prompts
        # brute force, float64: mean of the normalised edited embeddings, renormalised
        w = torch.eye(DIM, dtype=torch.float64) + 0.5 * direction.double()
        expected = torch.stack([F.normalize(torch.stack([F.normalize(w @ text_input(t.format(c)).double(), dim=0)
                                                         for t in TEMPLATES]).mean(0), dim=0) for c in NAMES])
        torch.testing.assert_close(edited.double(), expected, atol=1e-5, rtol=0)
        assert not torch.allclose(edited, first, atol=1e-3)
        edit.commit()
    classifier.weights()
    assert adapter.texts_encoded == 2 * prompts


def test_class_prompts_are_tokenized_once_per_device_and_encoded_in_eval_mode(gen):
    """The prompts never change: they are tokenized once, and again only after the model moved to
    another device; encoding them runs every module in eval mode (dropout off)."""
    class Counting(StubAdapter):
        def __init__(self, model):
            super().__init__(model)
            self.where, self.tokenized, self.modes = torch.device("cpu"), 0, []

        @property
        def device(self):
            return self.where

        def tokens(self, texts):
            self.tokenized += 1
            return super().tokens(texts)

        def encode_tokens(self, module, tokens):
            self.modes.append({m.training for m in module.modules()})
            return super().encode_tokens(module, tokens)

    model = StubClip().train()
    adapter = Counting(model)
    classifier = ZeroShotClassifier(adapter, NAMES, list(TEMPLATES), text_batch_size=5)
    batches = -(-len(NAMES) * len(TEMPLATES) // 5)
    classifier.weights()
    assert adapter.tokenized == batches and adapter.modes == [{False}] * batches
    assert all(m.training for m in model.modules())  # the caller's mode is back
    for moved, tokenized in ((False, batches), (True, 2 * batches)):
        if moved:
            adapter.where = torch.device("meta")  # what the adapter reports after model.to(...)
        with LayerEdit(model, {"text_proj.weight": torch.randn(DIM, DIM, generator=gen)}) as edit:
            edit.step(0.1)
            classifier.weights()  # encoded again: the text tower changed
            assert classifier.encodes == 2 + moved and adapter.tokenized == tokenized


def test_class_weights_follow_a_parameter_replaced_over_the_same_memory(gen):
    """A new parameter object over the same storage (same version counter, address and dtype) is a
    change: the cache key holds each parameter's identity."""
    model = StubClip()
    model.text_proj.weight.data = torch.randn(DIM, DIM, generator=gen)
    classifier = ZeroShotClassifier(StubAdapter(model), NAMES, list(TEMPLATES))
    before = classifier.weights().clone()
    old = model.text_proj.weight  # kept alive, so the new parameter cannot reuse its id
    model.text_proj.weight = torch.nn.Parameter(old.detach().t())
    assert model.text_proj.weight.data_ptr() == old.data_ptr()
    expected = F.normalize(torch.stack([F.normalize(torch.stack(
        [F.normalize(old.detach().double().t() @ text_input(t.format(c)).double(), dim=0) for t in TEMPLATES]
    ).mean(0), dim=0) for c in NAMES]), dim=-1)
    torch.testing.assert_close(classifier.weights().double(), expected, atol=1e-6, rtol=0)
    assert not torch.allclose(classifier.weights(), before, atol=1e-3)


def test_cache_on_a_real_open_clip_model_follows_layer_edits(gen):
    model = digits.build_model(0).eval()
    adapter = get_adapter(model, tokenizer=digits.tokenizer())
    data = digits.load_digits_data(0)
    classifier = ZeroShotClassifier(adapter, digits.DIGIT_NAMES, digits.TEMPLATES)

    def brute_force():
        with torch.no_grad():
            texts = [t.format(n) for n in digits.DIGIT_NAMES for t in digits.TEMPLATES]
            emb = F.normalize(model.encode_text(digits.tokenize(texts)).double(), dim=-1)
            return F.normalize(emb.view(len(digits.DIGIT_NAMES), len(digits.TEMPLATES), -1).mean(1), dim=-1)

    torch.testing.assert_close(classifier.weights().double(), brute_force(), atol=1e-5, rtol=0)
    for k in (1, 3):  # slug_fast.digits' own zero-shot evaluation is the oracle
        got = classifier.accuracy(data.test_images, data.test_labels, topk=(k,))[f"top{k}"]
        assert got == pytest.approx(digits.zero_shot_accuracy(model, data.test_images, data.test_labels, k), abs=1e-4)
    assert classifier.encodes == 1
    params = dict(model.named_parameters())
    for name, reencoded in (("visual.proj", False), ("text_projection", True)):
        before = classifier.encodes
        with LayerEdit(model, {name: torch.randn(params[name].shape, generator=gen)}) as edit:
            edit.step(0.3)
            torch.testing.assert_close(classifier.weights().double(), brute_force(), atol=1e-5, rtol=0)
            assert classifier.encodes == before + reencoded


def test_cache_sees_a_layer_edit_restore(gen):
    model = StubClip()
    classifier = ZeroShotClassifier(StubAdapter(model), NAMES, list(TEMPLATES))
    original = classifier.weights().clone()
    with LayerEdit(model, {"text_proj.weight": torch.randn(DIM, DIM, generator=gen)}) as edit:
        edit.step(1.0)
        classifier.weights()
    torch.testing.assert_close(classifier.weights(), original)  # the model is back to its original weights


def test_concept_criterion_reencodes_only_the_edited_tower(gen):
    n = 120
    labels = torch.arange(n) % len(NAMES)
    concept = 2
    ranks = torch.where(labels == concept, torch.randint(5, len(NAMES), (n,), generator=gen),
                        torch.randint(0, 3, (n,), generator=gen))
    model = StubClip()
    adapter = StubAdapter(model)
    criterion = concept_criterion(adapter, images_with_ranks(labels, ranks, gen), labels, NAMES, NAMES[concept],
                                  list(TEMPLATES), k=5)
    forgotten, metrics = criterion(model)
    assert forgotten and metrics["forget_top5"] == 0.0 and metrics["forget_top1"] == 0.0
    others = [100 * (ranks[labels == c] == 0).double().mean().item() for c in range(len(NAMES)) if c != concept]
    assert metrics["utility"] == pytest.approx(sum(others) / len(others))
    assert (adapter.images_encoded, adapter.texts_encoded) == (n, len(NAMES) * len(TEMPLATES))
    criterion(model)
    assert (adapter.images_encoded, adapter.texts_encoded) == (n, len(NAMES) * len(TEMPLATES))
    with LayerEdit(model, {"visual.weight": torch.randn(DIM, DIM, generator=gen)}) as edit:
        edit.step(0.1)
        criterion(model)
        assert (adapter.images_encoded, adapter.texts_encoded) == (2 * n, len(NAMES) * len(TEMPLATES))
        edit.commit()
    with LayerEdit(model, {"text_proj.weight": torch.randn(DIM, DIM, generator=gen)}) as edit:
        edit.step(0.1)
        criterion(model)
        assert (adapter.images_encoded, adapter.texts_encoded) == (2 * n, 2 * len(NAMES) * len(TEMPLATES))
        edit.commit()
    not_yet = concept_criterion(adapter, torch.eye(DIM)[:2], [concept, 0], NAMES, concept, list(TEMPLATES),
                                utility=lambda m: 42.0)
    forgotten, metrics = not_yet(model)
    assert metrics["utility"] == 42.0 and forgotten == (metrics["forget_top5"] == 0.0)



def test_concept_criterion_inputs_and_class_indices():
    """Images as a list or a tensor judge alike, in batches of batch_size; a concept with no image, or no
    other class without utility=, is refused; class indices run from 0 to n-1."""
    labels = torch.tensor([2, 2, 0, 5, 2])
    images = torch.eye(DIM)[[3, 2, 0, 5, 1]]  # images 1, 2 and 3 are recognised, 0 and 4 are not
    model = StubClip()
    adapter = StubAdapter(model)
    seen = []

    class Batches(StubAdapter):
        def encode_pixels(self, module, pixels):
            seen.append(len(pixels))
            return super().encode_pixels(module, pixels)
    want = concept_criterion(adapter, images, labels, NAMES, 2, list(TEMPLATES), k=1)(model)
    assert want == (False, {"forget_top1": pytest.approx(100 / 3), "others_top1": 100.0, "n_forget": 3,
                            "n_others": 2, "utility": 100.0})
    listed = concept_criterion(Batches(model), list(images), labels.tolist(), NAMES, 2, list(TEMPLATES), k=1,
                               batch_size=2)
    assert listed(model) == want and seen == [2, 2, 1]
    only_concept = concept_criterion(adapter, images[[0, 1]], [2, 2], NAMES, 2, list(TEMPLATES), k=1,
                                     utility=lambda m: 7.0)(model)
    assert only_concept[1]["utility"] == 7.0 and only_concept[1]["others_top1"] is None
    with pytest.raises(SlugError, match="no image is labelled 'delta'"):
        concept_criterion(adapter, images, labels, NAMES, 3, list(TEMPLATES), k=1)
    with pytest.raises(SlugError, match="every image shows the concept"):
        concept_criterion(adapter, images[[0, 1]], [2, 2], NAMES, 2, list(TEMPLATES), k=1)
    classifier = ZeroShotClassifier(adapter, NAMES, list(TEMPLATES))
    assert [classifier.index(i) for i in (0, len(NAMES) - 1)] == [0, len(NAMES) - 1]
    for bad in (-1, len(NAMES)):
        with pytest.raises(SlugError, match=f"class index {bad} is out of range for {len(NAMES)} classes"):
            classifier.index(bad)
        for labels_of in (list, torch.tensor):  # a label out of range, as a list or a tensor
            with pytest.raises(SlugError, match=f"^label {bad} is out of range for {len(NAMES)} classes"):
                classifier.labels(labels_of([0, bad]))
    as_float = classifier.labels(torch.tensor([[2.0], [0.0]]))  # any tensor of whole numbers: int64, flat
    assert as_float.dtype == torch.int64 and as_float.tolist() == [2, 0]
    assert classifier.labels([]).dtype == torch.int64  # int64 even with nothing to infer it from
    every = classifier.accuracy(images, labels, topk=(len(NAMES),))  # top-k over every class: all right
    assert every == {f"top{len(NAMES)}": 100.0}

def phi(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_membership_inference_runs_the_folds_and_repeats_asked_for():
    """folds x repeats scores; the smallest legal settings (2 folds, 1 repeat, as many samples as
    folds) run; identical groups score 50 in every fold, separated ones 100."""
    same = membership_inference(np.full(6, 0.5), np.full(9, 0.5), folds=3, repeats=1)
    assert same.scores == (50.0,) * 3 and same.n_per_group == 6
    smallest = membership_inference(np.zeros(2), np.ones(2), folds=2, repeats=1)
    assert smallest.scores == (100.0, 100.0) and smallest.n_per_group == 2
    assert membership_inference(np.zeros(3), np.ones(5), folds=3, repeats=2).scores == (100.0,) * 6
    for folds, repeats in ((1, 1), (5, 0)):  # either one out of range is refused
        with pytest.raises(SlugError, match="folds must be at least 2 and repeats at least 1"):
            membership_inference(np.zeros(10), np.ones(10), folds=folds, repeats=repeats)


def test_membership_inference_known_answers():
    rng = np.random.default_rng()
    separated = membership_inference(rng.normal(0, 0.1, 400), rng.normal(3, 0.1, 400))
    assert separated.scores == (100.0,) * 50 and separated.std == 0.0 and separated.n_per_group == 400
    # identical features: the folds are balanced, so every fold is right on exactly half
    assert membership_inference(np.full(500, 0.5), np.full(500, 0.5)).scores == (50.0,) * 50
    # 40 forget samples against 4000 held-out ones: the larger group is subsampled, so still chance, not 99%
    unbalanced = membership_inference(np.full(40, 2.5), np.full(4000, 2.5), repeats=20)
    assert unbalanced.n_per_group == 40 and unbalanced.scores == (50.0,) * 100
    # forget all at 1, held-out half at 1 and half at -1: the best rule (1 -> forget) is right on 3/4 of the
    # samples, and each repeat tests every sample once in equal folds: each repeat's mean is exactly 75
    mixed = membership_inference(np.ones(50), np.repeat([1.0, -1.0], 25), repeats=3)
    assert len(mixed.scores) == 15 and np.reshape(mixed.scores, (3, 5)).mean(1) == pytest.approx([75.0] * 3)
    assert mixed.mean == pytest.approx(75.0) and mixed.std == pytest.approx(np.std(mixed.scores)) and mixed.std > 0
    assert mixed.to_dict() == {"mean": mixed.mean, "std": mixed.std, "scores": mixed.scores, "n_per_group": 50}
    # two unit Gaussians d apart: the best threshold is right 100 * Phi(d / 2) % of the time
    d = 2.0
    shifted = membership_inference(rng.normal(d, 1, 1000), rng.normal(0, 1, 1000), repeats=4)
    assert len(shifted.scores) == 20 and shifted.mean == pytest.approx(np.mean(shifted.scores))
    assert shifted.mean == pytest.approx(100 * phi(d / 2), abs=3.0)
    assert shifted.std == pytest.approx(np.std(shifted.scores))  # over every fold, not over repeat means
    two_features = membership_inference(rng.normal(0, 1, (300, 2)) + [0, 3], rng.normal(0, 1, (300, 2)))
    assert two_features.mean == pytest.approx(100 * phi(1.5), abs=5.0)


def test_membership_inference_bad_input():
    with pytest.raises(SlugError, match="forget holds NaN or Inf at sample 1"):
        membership_inference([0.0, float("nan"), 1.0], [1.0, 2.0, 3.0])
    with pytest.raises(SlugError, match="5-fold cross-validation needs at least 5 samples in each group"):
        membership_inference(np.arange(3.0), np.arange(10.0))
    with pytest.raises(SlugError, match="forget has 2 features per sample but held_out has 1"):
        membership_inference(np.zeros((10, 2)), np.zeros(10))
    for bad, where in (([1.0, 2.0, float("inf")], "at sample 2"), ([], "must be a non-empty"),
                       (np.zeros((2, 2, 2)), "must be a non-empty")):
        with pytest.raises(SlugError, match=f"held_out (holds NaN or Inf )?{where}"):
            membership_inference(np.arange(10.0), bad)
    with pytest.raises(SlugError, match="5-fold cross-validation needs at least 5 samples"):  # one is not none
        membership_inference([0.5], np.arange(10.0))


def test_membership_inference_reads_any_numbers_as_float64():
    """Per-sample values of any numeric type (Decimal, Fraction, int) give the float64 values' result."""
    from decimal import Decimal
    from fractions import Fraction

    f, h = np.arange(12) % 5, np.arange(15) % 7 + 0.5
    want = membership_inference(f.astype(np.float64), h, folds=3, repeats=2)
    assert membership_inference([Decimal(int(v)) for v in f], [Fraction(str(v)) for v in h], folds=3, repeats=2) \
        == want
    assert membership_inference(f.tolist(), h, folds=3, repeats=2) == want


def test_membership_inference_draws_each_sample_once_per_repeat():
    """Equal groups: every repeat uses each sample exactly once (drawn without replacement). One
    forget sample lies among the held-out ones, so in every repeat exactly one of the 5 folds (4
    samples each) misclassifies it: four scores of 100 and one of 75 (a sample drawn twice or never
    would give two 75s, or none)."""
    forget = np.concatenate([np.arange(20.0, 29.0), [-5.5]])  # far from the held-out ones but one
    held_out = np.arange(-10.0, 0.0)
    res = membership_inference(forget, held_out, folds=5, repeats=10)
    for r in range(10):
        assert sorted(res.scores[5 * r:5 * r + 5]) == [75.0] + [100.0] * 4, r
    assert res.mean == 95.0


def brute_force_scores(model, pairs, batch_size):
    """Per-sample symmetric contrastive loss and 1 - cos in float64, sample by sample."""
    model = digits.build_model(0).double().eval() if model is None else model
    with torch.no_grad():
        img = F.normalize(torch.cat([model.encode_image(im[None].double()) for im, _ in pairs]), dim=-1)
        txt = F.normalize(torch.cat([model.encode_text(digits.tokenize([c])) for _, c in pairs]), dim=-1)
        scale = model.logit_scale.exp()
    n, losses = len(pairs), []
    for i in range(n):
        start = i // batch_size * batch_size
        members = list(range(start, min(start + batch_size, n)))
        if len(members) < batch_size <= n:  # the documented wrap-around of the last batch
            members += list(range(batch_size - len(members)))
        j = members.index(i)
        logits = scale * img[members] @ txt[members].T
        losses.append(0.5 * (-torch.log_softmax(logits[j], 0)[j] - torch.log_softmax(logits[:, j], 0)[j]).item())
    return np.array(losses), (1 - (img * txt).sum(-1)).numpy()


def digit_pairs(data, count, offset=0):
    idx = range(offset, offset + count)
    return [(data.test_images[i], f"the digit {digits.DIGIT_NAMES[data.test_labels[i]]}") for i in idx]


def test_clip_sample_scores_match_a_float64_brute_force():
    data = digits.load_digits_data(0)
    model = digits.build_model(0).eval()
    adapter = get_adapter(model, tokenizer=digits.tokenizer())
    pairs = digit_pairs(data, 45)
    got = clip_sample_scores(adapter, pairs, batch_size=16)
    reference = digits.build_model(0).double().eval()
    loss, distance = brute_force_scores(reference, pairs, 16)
    np.testing.assert_allclose(got.loss, loss, atol=1e-4)
    np.testing.assert_allclose(got.distance, distance, atol=1e-5)
    small = clip_sample_scores(adapter, pairs[:5], batch_size=16)  # fewer pairs than a batch: one batch
    np.testing.assert_allclose(small.loss, brute_force_scores(reference, pairs[:5], 16)[0], atol=1e-4)
    held_out = digit_pairs(data, 20, 100)
    result = clip_membership_inference(adapter, pairs[:20], held_out, batch_size=10, repeats=2)
    # the attack on the float64 brute-force scores (features 1e-6 apart at most, far below their spacing)
    forget_loss, forget_distance = brute_force_scores(reference, pairs[:20], 10)
    held_out_loss, held_out_distance = brute_force_scores(reference, held_out, 10)
    assert result == {"loss": membership_inference(forget_loss, held_out_loss, repeats=2),
                      "distance": membership_inference(forget_distance, held_out_distance, repeats=2)}


def brute_force_similarity(model, images, captions):
    """(images, captions) cosine similarities in float64, pair by pair, on a float64 copy of `model`."""
    import copy

    reference = copy.deepcopy(model).double().eval()
    expected = torch.empty(len(images), len(captions), dtype=torch.float64)
    with torch.no_grad():
        for i in range(len(images)):
            a = reference.encode_image(images[i][None].double())[0]
            for j, caption in enumerate(captions):
                b = reference.encode_text(digits.tokenize([caption]))[0]
                expected[i, j] = (a @ b) / (a.norm() * b.norm())
    return expected


def test_similarity_matrix_matches_a_float64_brute_force():
    data = digits.load_digits_data(0)
    model = digits.build_model(0).eval()
    adapter = get_adapter(model, tokenizer=digits.tokenizer())
    images = data.test_images[:4]
    captions = ["the digit one", "handwritten seven", "a drawing of the number two", "the number nine",
                "a scan of a handwritten zero", "the digit three"]
    got = similarity_matrix(adapter, list(images), captions, batch_size=3)
    assert got.shape == (4, 6) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), brute_force_similarity(model, images, captions), atol=1e-5, rtol=0)


def test_similarity_watch_compares_before_with_after_the_edit(tmp_path, gen):
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib")
    data = digits.load_digits_data(0)
    model = digits.build_model(0).eval()
    adapter = get_adapter(model, tokenizer=digits.tokenizer())
    pairs = digit_pairs(data, 3)
    images, captions = [im for im, _ in pairs], [c for _, c in pairs]
    watch = SimilarityWatch(adapter, pairs, batch_size=2)
    before = brute_force_similarity(model, images, captions)
    torch.testing.assert_close(watch.before.double(), before, atol=1e-5, rtol=0)
    with pytest.raises(SlugError, match="call finish\\(\\) first"):
        watch.plot(tmp_path / "early.png")
    assert watch.finish() == similarity_change(watch.before, watch.before)  # no edit, no change
    proj = model.visual.proj
    with LayerEdit(model, {"visual.proj": torch.randn(proj.shape, generator=gen) * proj.detach().norm()}) as edit:
        edit.step(0.5)
        after = brute_force_similarity(model, images, captions)
        out = watch.finish(tmp_path / "watch.png", title="an edit")
    torch.testing.assert_close(watch.after.double(), after, atol=1e-5, rtol=0)
    assert (after - before).abs().max() > 0.01  # the edit moved the similarities
    assert out.pop("plot") == str(tmp_path / "watch.png")
    assert out == similarity_change(watch.before, watch.after)
    assert out["max_abs_change"] == pytest.approx((after - before).abs().max().item(), abs=1e-5)
    expected = plot_similarity(tmp_path / "expected.png", watch.before, watch.after, captions=captions,
                               title="an edit").read_bytes()
    assert (tmp_path / "watch.png").read_bytes() == expected  # before, after, captions and title
    assert watch.plot(tmp_path / "again.png", "an edit").read_bytes() == expected
    assert watch.plot(tmp_path / "untitled.png").read_bytes() != expected


def test_similarity_change_and_plot(tmp_path, gen):
    before = torch.rand(3, 3, generator=gen, dtype=torch.float64)
    after = before.clone()
    after[1, 1] -= 0.5
    after[0, 2] += 0.25
    change = similarity_change(before, after)
    diag = before.diagonal()
    off = before[~torch.eye(3, dtype=torch.bool)]
    assert change["matched_before"] == pytest.approx(diag.mean().item())
    assert change["matched_after"] == pytest.approx(diag.mean().item() - 0.5 / 3)
    assert change["unmatched_after"] == pytest.approx(off.mean().item() + 0.25 / 6)
    assert change["max_abs_change"] == pytest.approx(0.5) and change["mean_abs_change"] == pytest.approx(0.75 / 9)
    assert "matched_before" not in similarity_change(before[:2], after[:2])
    two = similarity_change(before[:2, :2], after[:2, :2])
    assert two["unmatched_before"] == pytest.approx((before[0, 1] + before[1, 0]).item() / 2)
    one = similarity_change(before[:1, :1], after[:1, :1])  # no unmatched pair to average
    assert set(one) == {"mean_abs_change", "max_abs_change", "matched_before", "matched_after"}
    with pytest.raises(SlugError, match="one shape"):
        similarity_change(before, after[:2])

    path = plot_similarity(tmp_path / "similarity.png", before, after, captions=["a", "b", "c"],
                           image_labels=["x", "y", "z"], title="edit")
    assert path == tmp_path / "similarity.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:  # figsize (3 panels of 2.5 + 0.45 in per column, 1.5 + 0.45 in per row) x 100 dpi
        assert im.format == "PNG" and im.size == (round(3 * (2.5 + 3 * 0.45) * 100), round((1.5 + 3 * 0.45) * 100))
    assert [p.name for p in tmp_path.iterdir()] == ["similarity.png"]  # no temporary file left
    with Image.open(plot_similarity(tmp_path / "one.png", before[:, :2], dpi=50)) as im:  # one panel, 50 dpi
        assert im.size == (round((2.5 + 2 * 0.45) * 50), round((1.5 + 3 * 0.45) * 50))
    plot_similarity(tmp_path / "single.png", before[:1, :1])  # one image, one caption
    for bad in (before[0], before[:0]):
        with pytest.raises(SlugError, match="expected a non-empty \\(images, captions\\) matrix"):
            plot_similarity(tmp_path / "bad.png", bad)
    with pytest.raises(SlugError, match="must end in .png"):
        plot_similarity(tmp_path / "similarity.jpg", before)
    with pytest.raises(SlugError, match="captions has 2 entries for a matrix with 3"):
        plot_similarity(tmp_path / "similarity.png", before, captions=["a", "b"])
    with pytest.raises(SlugError, match="image_labels has 4 entries for a matrix with 3"):
        plot_similarity(tmp_path / "similarity.png", before, image_labels=["a", "b", "c", "d"])
    with pytest.raises(SlugError, match="directory .* does not exist"):
        plot_similarity(tmp_path / "missing" / "similarity.png", before)


def test_similarity_figure_shows_what_it_says():
    """Panels, colour scales, labels and cell values of the figure plot_similarity writes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.layout_engine import ConstrainedLayoutEngine

    before = torch.tensor([[0.30, 0.10, -0.20], [0.05, 0.40, 0.00], [0.10, -0.10, 0.25]], dtype=torch.float64)
    after = before.clone()
    after[0, 0], after[2, 1], after[1, 1] = -0.50, 0.35, 0.20  # after's own range: [-0.5, 0.35]
    long = "a caption far longer than thirty-two characters"
    fig = similarity_figure(before, after, captions=["a", long, "c"], image_labels=["x", "y", "z"], title="edit")
    panels = [ax for ax in fig.axes if ax.get_title()]  # the colorbars have no title
    assert [ax.get_title() for ax in panels] == ["before", "after", "after - before"]
    assert [ax.get_subplotspec().get_geometry() for ax in panels] == [(1, 3, i, i) for i in range(3)]  # one row
    assert isinstance(fig.canvas, FigureCanvasAgg) and isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine)
    assert fig.get_suptitle() == "edit"
    images = [ax.get_images()[0] for ax in panels]
    assert [im.get_cmap().name for im in images] == ["viridis", "viridis", "RdBu_r"]
    # before and after share one scale over both; the change is symmetric around 0
    assert [im.get_clim() for im in images[:2]] == [(-0.5, 0.4)] * 2
    assert images[2].get_clim() == pytest.approx((-0.8, 0.8))
    for im, m in zip(images, (before, after, after - before)):
        assert np.array_equal(im.get_array(), m.numpy())
    for ax in panels:
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("caption", "image")
        assert [t.get_text() for t in ax.get_xticklabels()] == ["a", long[:31] + "…", "c"]
        assert [t.get_text() for t in ax.get_yticklabels()] == ["x", "y", "z"]
    cells = [(t.get_position(), t.get_text()) for t in panels[2].texts]
    assert len(cells) == 9 and cells[0] == ((0, 0), "-0.80") and cells[7] == ((1, 2), "0.45")
    assert cells[4] == ((1, 1), "-0.20")
    assert [t.get_text() for t in panels[0].texts][:3] == ["0.30", "0.10", "-0.20"]
    # the layout: cells fill their panel (aspect auto) with a colour bar of 0.8 its height beside it;
    # captions at 60 degrees, right-aligned (their ends under their columns), 7 pt like the image
    # labels; cell values centred in their cells at 6 pt
    fig.canvas.draw()
    for ax, im in zip(panels, images):
        bar = im.colorbar.ax.get_position()
        assert ax.get_aspect() == "auto" and bar.height == pytest.approx(0.8 * ax.get_position().height)
        assert ax.get_position().x1 < bar.x0 < bar.x1 < min([p.get_position().x0 for p in panels
                                                             if p.get_position().x0 > bar.x0] + [1.0])
        assert {(t.get_rotation(), t.get_ha(), t.get_fontsize()) for t in ax.get_xticklabels()} == {(60.0, "right", 7)}
        assert {t.get_fontsize() for t in ax.get_yticklabels()} == {7}
        assert {(t.get_ha(), t.get_va(), t.get_fontsize()) for t in ax.texts} == {("center", "center", 6)}

    one = similarity_figure(before)
    assert [ax.get_title() for ax in one.axes if ax.get_title()] == ["similarity"] and one.get_suptitle() == ""
    assert one.axes[0].get_images()[0].get_clim() == (-0.2, 0.4)
    assert [t.get_text() for t in one.axes[0].get_xticklabels()] == ["0", "1", "2"]
    edge = similarity_figure(before, captions=["x" * 32, "y" * 33, "z"])  # 32 characters fit, 33 do not
    assert [t.get_text() for t in edge.axes[0].get_xticklabels()] == ["x" * 32, "y" * 31 + "…", "z"]
    unchanged = similarity_figure(before, before.clone())  # no change: a tiny symmetric scale, not (0, 0)
    assert unchanged.axes[4].get_images()[0].get_clim() == (-1e-12, 1e-12)
    # up to 12 x 12 cells carry their value; beyond, none
    assert len(similarity_figure(torch.zeros(12, 12)).axes[0].texts) == 144
    assert len(similarity_figure(torch.zeros(12, 13)).axes[0].texts) == 0
    assert len(similarity_figure(torch.zeros(5, 29)).axes[0].texts) == 0  # 145 cells
    # the figure grows with the matrix: 2.5 + 0.45 in per column and panel, 1.5 + 0.45 in per row
    assert tuple(similarity_figure(before, after).get_size_inches()) == pytest.approx((3 * (2.5 + 3 * 0.45),
                                                                                       1.5 + 3 * 0.45))


def test_concept_criterion_judges_the_model_it_is_given(digits_model, digits_trained):
    import copy

    from slug_fast.adapters import get_adapter
    from slug_fast.edit import LayerEdit
    from slug_fast.eval import concept_criterion

    data = digits_trained[1]
    adapter = get_adapter(digits_model)
    criterion = concept_criterion(adapter, data.test_images, data.test_labels, list(digits.DIGIT_NAMES), "seven", k=1)
    _, original = criterion(digits_model)
    broken = copy.deepcopy(digits_model)
    with torch.no_grad():
        broken.visual.proj.mul_(-1)  # flips every image embedding: accuracy collapses
    _, on_copy = criterion(broken)
    assert on_copy["others_top1"] < 20 < original["others_top1"]
    assert criterion(digits_model)[1] == original  # the bound model is untouched and still judged as before
    with LayerEdit(digits_model, {"visual.proj": -2 * digits_model.visual.proj.detach()}) as edit:
        edit.step(1.0)  # the bound model itself, edited the same way
        assert criterion(digits_model)[1]["others_top1"] == on_copy["others_top1"]


class ThreadRanks:
    """Rank `rank` of `world` threads of this process, standing in for slug_fast.distributed.Ranks:
    all_reduce sums the tensors every thread passes (one collective per criterion call)."""

    def __init__(self, rank, world, board):
        self.rank, self.world, self.board = rank, world, board

    def all_reduce(self, t):
        self.board["slots"][self.rank] = t.clone()
        self.board["barrier"].wait(timeout=60)
        slots = self.board["slots"]
        assert len({(s.dtype, s.shape) for s in slots}) == 1, "ranks passed different tensors to all_reduce"
        return t.copy_(torch.stack(slots).sum(0))


def on_threads(criteria, model, board):
    """criterion(model) of every rank, each on its own thread, as ranks call it together."""
    import threading

    board["slots"], board["barrier"] = [None] * len(criteria), threading.Barrier(len(criteria))
    results, errors = [None] * len(criteria), []

    def run(r):
        try:
            results[r] = criteria[r](model)
        except BaseException as err:  # noqa: BLE001 - re-raised below
            errors.append(err)
            board["barrier"].abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(criteria))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_sharded_concept_criterion_equals_one_process(monkeypatch, gen):
    """Each of `world` ranks judges its share of the images; the summed counts give one process's metrics."""
    monkeypatch.setattr("slug_fast.distributed.Ranks", lambda group: group)
    n, concept = 24, 2
    labels = torch.arange(n) % len(NAMES)
    model = StubClip().eval()
    adapter = StubAdapter(model)
    forgotten = torch.where(labels == concept, torch.randint(5, len(NAMES), (n,), generator=gen),
                            torch.randint(0, 3, (n,), generator=gen))
    for ranks in (forgotten, torch.randint(len(NAMES), (n,), generator=gen) * (labels != concept)):
        images = images_with_ranks(labels, ranks, gen)
        for given in (images, list(images)):
            for utility in (None, lambda m: 42.0 if m is model else -1.0):
                want = concept_criterion(adapter, given, labels, NAMES, NAMES[concept], list(TEMPLATES), k=5,
                                         utility=utility)(model)
                for world in (1, 2, 5, n + 3):  # n + 3: some ranks hold no image
                    board = {}
                    criteria = [concept_criterion(adapter, given, labels, NAMES, NAMES[concept], list(TEMPLATES),
                                                  k=5, utility=utility, process_group=ThreadRanks(r, world, board))
                                for r in range(world)]
                    assert on_threads(criteria, model, board) == [want] * world
        assert want[0] == (ranks is forgotten) and want[1]["utility"] == 42.0
        assert type(want[1]["n_forget"]) is int and want[1]["n_forget"] == n // len(NAMES)
    assert adapter.images_encoded == 2 * 2 * 2 * (1 + 4) * n  # each rank encoded its own share once


def test_distributed_concept_criterion_on_a_one_process_group(gloo_world, gen):
    n, concept = 24, 2
    labels = torch.arange(n) % len(NAMES)
    model = StubClip().eval()
    adapter = StubAdapter(model)
    images = images_with_ranks(labels, torch.randint(len(NAMES), (n,), generator=gen), gen)
    seen = []

    def utility(m):
        seen.append(m)
        return 7.0

    want = concept_criterion(adapter, images, labels, NAMES, NAMES[concept], list(TEMPLATES), k=5)(model)
    for group in ("world", gloo_world.new_group([0])):
        criterion = concept_criterion(adapter, images, labels, NAMES, NAMES[concept], list(TEMPLATES), k=5,
                                      process_group=group)
        assert criterion(model) == want
        assert criterion("the pipeline holding the model") == want  # judged through the adapter's model
        with pytest.raises(SlugError, match="judges the adapter's own model"):
            criterion(StubClip())
        with_utility = concept_criterion(adapter, list(images), labels, NAMES, NAMES[concept], list(TEMPLATES),
                                         k=5, utility=utility, process_group=group)
        assert with_utility("pipeline") == (want[0], {**want[1], "utility": 7.0}) and seen[-1] == "pipeline"
        with LayerEdit(model, {"visual.weight": torch.randn(DIM, DIM, generator=gen)}) as edit:
            edit.step(0.5)  # a vision-tower edit: the images are encoded again
            edited = concept_criterion(adapter, images, labels, NAMES, NAMES[concept], list(TEMPLATES), k=5)(model)
            assert criterion(model) == edited != want


# --------------------------------------------------------------------- batch sizes reach the encoders


class Batches(StubAdapter):
    """The stub adapter, recording the size of every batch each tower encodes."""

    def __init__(self, model):
        super().__init__(model)
        self.image_batches, self.text_batches = [], []

    def encode_pixels(self, module, pixels):
        self.image_batches.append(len(pixels))
        return super().encode_pixels(module, pixels)

    def encode_tokens(self, module, tokens):
        self.text_batches.append(len(tokens))
        return super().encode_tokens(module, tokens)


def chunks(n, size):
    """Brute force: the batch sizes of n items taken `size` at a time."""
    out = []
    while n > 0:
        out.append(min(size, n))
        n -= out[-1]
    return out


def prompts(n):
    """n prompts the stub knows, the 16 of TEMPLATES x NAMES over and over."""
    every = [t.format(c) for t in TEMPLATES for c in NAMES]
    return [every[i % len(every)] for i in range(n)]


def test_similarity_matrix_encodes_both_towers_batch_size_at_a_time(gen):
    images, captions = torch.randn(130, DIM, generator=gen), prompts(131)
    texts = torch.stack([text_input(c) for c in captions]).double()
    expected = images.double() @ texts.T / (images.double().norm(dim=1)[:, None] * texts.norm(dim=1))  # float64
    for batch_size, default in ((None, 64), (50, 50), (1000, 1000)):
        adapter = Batches(StubClip())
        got = similarity_matrix(adapter, images, captions, **({} if batch_size is None else {"batch_size": batch_size}))
        assert adapter.image_batches == chunks(130, default) and adapter.text_batches == chunks(131, default)
        torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=0)


def test_encode_texts_default_batch_and_batches_of_one():
    texts = prompts(300)
    expected = F.normalize(torch.stack([text_input(t) for t in texts]), dim=-1)
    for kwargs, sizes in (({}, [256, 44]), ({"batch_size": 1}, [1] * 300), ({"batch_size": 7}, chunks(300, 7))):
        adapter = Batches(StubClip())
        torch.testing.assert_close(encode_texts(adapter, texts, **kwargs), expected, atol=1e-6, rtol=0)
        assert adapter.text_batches == sizes
    for bad in (0, -1):
        with pytest.raises(SlugError, match=f"batch_size must be at least 1, got {bad}"):
            encode_texts(Batches(StubClip()), texts, batch_size=bad)


def test_accuracies_encode_images_batch_size_at_a_time(gen):
    n = 130
    labels = torch.randint(len(NAMES), (n,), generator=gen)
    labels[:3] = 3  # the concept has images
    ranks = torch.randint(len(NAMES), (n,), generator=gen)
    images = images_with_ranks(labels, ranks, gen)
    top1 = 100 * (ranks == 0).double().mean().item()
    mine = labels == 3
    forget_top1 = 100 * (ranks[mine] == 0).double().mean().item()
    for batch_size, size in ((None, 64), (50, 50), (1, 1)):
        kw = {} if batch_size is None else {"batch_size": batch_size}
        runs = {
            "classifier": lambda a, kw: ZeroShotClassifier(a, NAMES, list(TEMPLATES)).accuracy(images, labels, (1,),
                                                                                                **kw),
            "zero_shot_accuracy": lambda a, kw: zero_shot_accuracy(a, images, labels, NAMES, list(TEMPLATES), (1,),
                                                                   **kw),
            "concept_accuracy": lambda a, kw: concept_accuracy(a, images, labels, NAMES, 3, list(TEMPLATES), (1,),
                                                               **kw),
        }
        for what, run in runs.items():
            adapter = Batches(StubClip())
            res = run(adapter, kw)
            assert adapter.image_batches == chunks(n, size), what
            if what == "concept_accuracy":
                assert res["forget_top1"] == pytest.approx(forget_top1) and res["n_forget"] == int(mine.sum())
            else:
                assert res == {"top1": pytest.approx(top1, abs=1e-9)}


# --------------------------------------------------------------------- generate_and_score's pixels

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # OpenAI CLIP's


class FakePipe:
    """A text-to-image pipeline's calling convention; each image drawn from the call's generator."""

    def __init__(self, draw):
        self.draw = draw

    def __call__(self, prompt, *, num_inference_steps, generator, height, width, output_type):
        assert output_type == "pt" and num_inference_steps == 2
        return type("Output", (), {"images": self.draw(generator)})()


class SeeingScorer(OpenClipAdapter):
    """The open_clip adapter, keeping the pixels its vision tower is given."""

    seen = None

    def encode_pixels(self, module, pixels):
        self.seen = pixels.clone()
        return super().encode_pixels(module, pixels)


def open_clip_scorer(preprocess=None):
    """The digits mini-CLIP (an 8x8 input) in float64, so its pixels must be cast to float64."""
    return SeeingScorer(digits.build_model(0).double().eval(), tokenizer=digits.tokenizer(), preprocess=preprocess)


def expected_probabilities(model, pixels, classes):
    """Softmax of logit scale x cosine to the "a photo of a {}." prompts, float64, from the pixels given."""
    with torch.no_grad():
        image = F.normalize(model.encode_image(pixels.double()), dim=-1)
        text = F.normalize(model.encode_text(digits.tokenize([f"a photo of a {c}." for c in classes])), dim=-1)
        return (model.logit_scale.exp() * image @ text.T).softmax(-1)


def test_generate_and_score_resizes_numpy_images_and_normalises_them_with_clip_statistics():
    """A pipeline's "np" output (N, H, W, 3) float64, out of [0, 1]; a scorer with no preprocessing: its
    pixels are the clamped images resized bicubic with antialiasing as PIL does (20x5 to 8x8: down in
    height, up in width), clamped again, normalised with CLIP's mean and std, in the scorer's dtype."""
    def draw(generator):
        x = torch.rand(1, 20, 5, 3, generator=generator, dtype=torch.float64)
        return torch.where(x < 0.5, x * 0.2 - 0.25, x * 0.2 + 1.05).numpy()  # below 0 or above 1, sharp edges

    scorer, classes = open_clip_scorer(), ["zero", "one", "two"]
    out = generate_and_score(FakePipe(draw), ["a", "b", "c"], scorer, classes, num_inference_steps=2, seed=5)
    drawn = np.concatenate([draw(torch.Generator().manual_seed(5 + i)) for i in range(3)])
    images = torch.from_numpy(np.clip(drawn, 0, 1)).permute(0, 3, 1, 2).float()
    assert out["images"].dtype == torch.float32 and torch.equal(out["images"], images)

    resized = torch.tensor(np.array([[np.asarray(Image.fromarray(images[n, c].numpy(), mode="F").resize(
        (8, 8), Image.BICUBIC)) for c in range(3)] for n in range(3)]), dtype=torch.float64)
    assert resized.min() < -0.05 and resized.max() > 1.05  # bicubic overshoots at the edges: clamped
    pixels = (resized.clamp(0, 1) - torch.tensor(CLIP_MEAN, dtype=torch.float64)[:, None, None]) / \
        torch.tensor(CLIP_STD, dtype=torch.float64)[:, None, None]
    assert scorer.seen.dtype == torch.float64 and scorer.seen.shape == (3, 3, 8, 8)
    torch.testing.assert_close(scorer.seen, pixels, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["probabilities"].double(), expected_probabilities(scorer.model, pixels, classes),
                               atol=1e-5, rtol=0)


def test_generate_and_score_gives_a_scorer_with_preprocessing_the_8_bit_images():
    """A pipeline's "pt" output in float16, out of [0, 1]; the scorer's own preprocess sees each image as
    the 8-bit PIL image of its clamped values, and its output is cast to the scorer's dtype."""
    def draw(generator):
        return (torch.rand(1, 3, 12, 10, generator=generator) * 1.6 - 0.3).half()

    def preprocess(im):  # float32, like torchvision's ToTensor
        a = np.asarray(im.resize((8, 8), Image.NEAREST), dtype=np.float32) / 255
        return torch.from_numpy(a).permute(2, 0, 1) * 2 - 1

    scorer, classes = open_clip_scorer(preprocess), ["zero", "one"]
    out = generate_and_score(FakePipe(draw), ["a", "b"], scorer, classes, num_inference_steps=2, seed=9)
    drawn = torch.cat([draw(torch.Generator().manual_seed(9 + i)) for i in range(2)]).float().clamp(0, 1)
    assert out["images"].dtype == torch.float32 and torch.equal(out["images"], drawn)
    as_uint8 = np.round(drawn.permute(0, 2, 3, 1).numpy().astype(np.float64) * 255).astype(np.uint8)
    pixels = torch.stack([preprocess(Image.fromarray(a)) for a in as_uint8]).double()
    assert scorer.seen.dtype == torch.float64 and torch.equal(scorer.seen, pixels)
    torch.testing.assert_close(out["probabilities"].double(), expected_probabilities(scorer.model, pixels, classes),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("images", [[Image.new("RGB", (8, 8))], torch.zeros(3, 8, 8)], ids=["PIL", "3-dim"])
def test_generate_and_score_refuses_images_that_are_not_a_batch_tensor(images):
    with pytest.raises(SlugError, match=r"expected a \(N, 3, H, W\) tensor"):
        generate_and_score(FakePipe(lambda g: images), "a", open_clip_scorer(), ["zero", "one"],
                           num_inference_steps=2, seed=0)


class NoSizeClip(StubClip):
    """A model with neither a config nor a `visual` tower: nothing says its input size."""

    def __init__(self):
        super().__init__()
        self.vis = self.visual
        del self.visual


class NoSizeAdapter(StubAdapter):
    towers = {"vision": "vis.", "text": "text_proj."}

    def encode_pixels(self, module, pixels):
        return module.vis(pixels)


@pytest.mark.parametrize("model", [StubClip, NoSizeClip], ids=["visual-without-size", "no-visual"])
def test_generate_and_score_asks_for_preprocessing_when_the_input_size_is_unknown(model):
    scorer = (StubAdapter if model is StubClip else NoSizeAdapter)(model())
    with pytest.raises(SlugError, match="cannot tell the input size of the .* scorer; give its adapter an image"):
        generate_and_score(FakePipe(lambda g: torch.rand(1, 3, 8, 8, generator=g)), "a", scorer, ["alpha"],
                           num_inference_steps=2, seed=0)


def test_clip_membership_inference_defaults_and_seed():
    """Batches of 32 pairs and 10 repeats unless told; the seed reaches both attacks."""
    data = digits.load_digits_data(0)
    model = digits.build_model(0).eval()
    adapter = get_adapter(model, tokenizer=digits.tokenizer())
    forget, held_out = digit_pairs(data, 40), digit_pairs(data, 45, 100)  # unequal: each repeat subsamples
    reference = digits.build_model(0).double().eval()
    (forget_loss, forget_distance), (held_loss, held_distance) = (brute_force_scores(reference, p, 32)
                                                                  for p in (forget, held_out))
    result = clip_membership_inference(adapter, forget, held_out, seed=3)
    assert result == {"loss": membership_inference(forget_loss, held_loss, repeats=10, seed=3),
                      "distance": membership_inference(forget_distance, held_distance, repeats=10, seed=3)}


def test_sharded_concept_criterion_takes_k_and_encodes_batch_size_at_a_time(monkeypatch, gen):
    monkeypatch.setattr("slug_fast.distributed.Ranks", lambda group: group)
    n, concept = 20, 2
    labels = torch.arange(n) % len(NAMES)  # the concept: images 2, 10 and 18
    ranks = torch.randint(len(NAMES), (n,), generator=gen)
    ranks[labels == concept] = torch.tensor([2, 3, 4])  # in the top 3: one of three; in the top 5: all
    images = images_with_ranks(labels, ranks, gen)
    model = StubClip().eval()
    want = concept_criterion(StubAdapter(model), images, labels, NAMES, NAMES[concept], list(TEMPLATES), k=3)(model)
    assert want[0] is False and want[1]["forget_top3"] == pytest.approx(100 / 3, abs=1e-12)
    adapter, board = Batches(model), {}
    criteria = [concept_criterion(adapter, images, labels, NAMES, NAMES[concept], list(TEMPLATES), k=3,
                                  batch_size=3, process_group=ThreadRanks(r, 2, board)) for r in range(2)]
    assert on_threads(criteria, model, board) == [want] * 2
    assert sorted(adapter.image_batches) == sorted(chunks(10, 3) * 2)  # each rank its 10 images, 3 at a time


def test_concept_criterion_judges_another_model_with_the_same_settings(gen):
    """A copy of the model (same type) is judged with the criterion's own templates, k and batch size."""
    n, concept = 20, 2
    labels = torch.arange(n) % len(NAMES)
    ranks = torch.randint(len(NAMES), (n,), generator=gen)
    ranks[labels == concept] = torch.tensor([2, 3, 4])  # in the top 3: one of three; in the top 5: all
    images = images_with_ranks(labels, ranks, gen)
    model, copy = StubClip().eval(), StubClip().eval()
    adapter = Batches(model)  # rebinding copies it: the copy's batches are recorded here too
    criterion = concept_criterion(adapter, images, labels, NAMES, NAMES[concept], list(TEMPLATES), k=3,
                                  batch_size=3)
    want = criterion(model)
    assert want[0] is False and want[1]["forget_top3"] == pytest.approx(100 / 3, abs=1e-12)
    adapter.image_batches.clear()
    assert criterion(copy) == want
    assert adapter.image_batches == chunks(n, 3)
    with torch.no_grad():
        copy.visual.weight.mul_(-1)  # every similarity reversed: judged on the copy's own weights
    assert criterion(copy)[1]["forget_top3"] == 0.0 and criterion(model) == want  # ranks 5, 4, 3
    once = concept_criterion(adapter, (x for x in images), labels, NAMES, NAMES[concept], list(TEMPLATES), k=3)
    assert once(model) == want and once(model) == want  # any iterable of images, read once


def test_concept_accuracy_and_criterion_encode_64_images_a_batch_by_default(gen):
    n = 130
    labels = torch.randint(len(NAMES), (n,), generator=gen)
    labels[:3] = 3
    images = images_with_ranks(labels, torch.randint(len(NAMES), (n,), generator=gen), gen)
    adapter = Batches(StubClip().eval())
    ZeroShotClassifier(adapter, NAMES, list(TEMPLATES)).concept_accuracy(images, labels, 3)
    assert adapter.image_batches == [64, 64, 2]
    criterion = concept_criterion(adapter, images, labels, NAMES, 3, list(TEMPLATES))
    for model in (adapter.model, StubClip().eval()):  # its own model (encoded once, cached) and a copy
        adapter.image_batches.clear()
        criterion(model)
        assert adapter.image_batches == [64, 64, 2]


def test_membership_inference_does_not_depend_on_the_features_units():
    """The features are standardised before the (regularised) logistic regression: micro-units or
    kilo-units of the same values give the same attack (unscaled, 1e-6 units would leave the
    regularised model at chance)."""
    rng = np.random.default_rng(0)
    f, h = rng.normal(1, 1, (200, 2)), rng.normal(0, 1, (200, 2))
    want = membership_inference(f, h, repeats=2)
    assert 65 < want.mean < 80  # overlapping groups: a real attack, not a trivial one
    for scale, shift in ((1e-6, 5e-6), (1e3, -2e3)):
        got = membership_inference(f * scale + shift, h * scale + shift, repeats=2)
        assert got.scores == pytest.approx(want.scores, abs=1e-9)


def test_classifier_similarities_and_hits_defaults_and_precomputed_features(gen):
    n = 130
    labels = torch.randint(len(NAMES), (n,), generator=gen)
    ranks = torch.randint(len(NAMES), (n,), generator=gen)
    images = images_with_ranks(labels, ranks, gen)
    adapter = Batches(StubClip().eval())
    classifier = ZeroShotClassifier(adapter, NAMES, list(TEMPLATES))
    sims = classifier.similarities(images)
    hits = classifier.hits(labels, images=images)
    assert adapter.image_batches == [64, 64, 2] * 2  # 64 images a batch by default, both ways
    assert sorted(hits) == [1, 5] and torch.equal(hits[5], ranks < 5)  # top-1 and top-5 by default
    features = encode_images(adapter, images).double()  # precomputed, in another dtype: cast to the weights'
    got = classifier.similarities(features=features)
    assert got.dtype == torch.float32 and torch.allclose(got, sims, atol=1e-6)
    assert all(torch.equal(h, hits[k]) for k, h in classifier.hits(labels, features=features.half()).items())


def test_similarity_watch_encodes_batch_size_pairs_at_a_time(gen):
    images, captions = torch.randn(130, DIM, generator=gen), prompts(130)
    for kwargs, sizes in (({}, [64, 64, 2]), ({"batch_size": 50}, [50, 50, 30])):
        adapter = Batches(StubClip())
        watch = SimilarityWatch(adapter, list(zip(images, captions)), **kwargs)
        assert adapter.image_batches == sizes and adapter.text_batches == sizes  # before
        watch.finish()
        assert adapter.image_batches == sizes * 2 and adapter.text_batches == sizes * 2  # and after


def test_table_scores_are_the_criterion_metrics_utility_and_mia(gen):
    """slug-fast eval's scores: the concept criterion's metrics on the same images, zero-shot top-1
    on the utility set, and both membership-inference accuracies (known answers from the ranks)."""
    n, concept = 240, 2
    labels = torch.randint(len(NAMES), (n,), generator=gen)
    labels[:30] = concept
    ranks = torch.randint(len(NAMES), (n,), generator=gen)
    images = images_with_ranks(labels, ranks, gen)
    u_labels, u_ranks = torch.randint(len(NAMES), (90,), generator=gen), torch.randint(3, (90,), generator=gen)
    utility = LabelledImages(list(images_with_ranks(u_labels, u_ranks, gen)), u_labels.tolist(), list(NAMES), [])
    adapter = StubAdapter(StubClip())
    pairs = [(torch.eye(DIM)[i % len(NAMES)] + 0.1 * torch.randn(DIM, generator=gen),
              f"a photo of {NAMES[concept]}.") for i in range(20)]
    scores = table_scores(adapter, images, labels, NAMES, NAMES[concept], k=3, templates=list(TEMPLATES),
                          utility=utility, utility_templates=list(TEMPLATES), forget_pairs=pairs[:10],
                          held_out_pairs=pairs[10:])
    mine = labels == concept
    others = [100 * (ranks[labels == c] < 1).double().mean().item() for c in range(len(NAMES))
              if c != concept and (labels == c).any()]
    assert scores["forget_top1"] == pytest.approx(100 * (ranks[mine] < 1).double().mean().item())
    assert scores["forget_top3"] == pytest.approx(100 * (ranks[mine] < 3).double().mean().item())
    assert scores["others_top1"] == pytest.approx(sum(others) / len(others))
    assert scores["n_forget"] == int(mine.sum()) and scores["n_others"] == n - int(mine.sum())
    assert scores["utility_top1"] == pytest.approx(100 * (u_ranks == 0).double().mean().item())
    mia = clip_membership_inference(adapter, pairs[:10], pairs[10:])
    assert scores["mia"] == mia["loss"].mean and scores["mia_distance"] == mia["distance"].mean
    assert "utility" not in scores
    _, metrics = concept_criterion(adapter, images, labels, NAMES, NAMES[concept], list(TEMPLATES), k=3)(adapter.model)
    assert {k: v for k, v in scores.items() if k in metrics} == {k: v for k, v in metrics.items() if k != "utility"}

    bare = table_scores(adapter, images, labels, NAMES, NAMES[concept], templates=list(TEMPLATES))
    assert bare["utility_top1"] is None and bare["mia"] is None and bare["mia_distance"] is None
    assert set(bare) == {"forget_top1", "forget_top5", "others_top1", "others_top5", "n_forget", "n_others",
                         "utility_top1", "mia", "mia_distance"}
    with pytest.raises(SlugError, match="needs both the forget pairs .* and held-out pairs"):
        table_scores(adapter, images, labels, NAMES, NAMES[concept], templates=list(TEMPLATES), forget_pairs=pairs)
    with pytest.raises(SlugError, match="needs a CLIP-family adapter"):
        table_scores(digits.build_model(0), images, labels, NAMES, NAMES[concept])


def test_table_scores_batches_images_as_asked_and_scores_a_utility_set_of_few_classes(gen):
    """batch_size reaches both the concept images and the utility images (64 by default); a
    utility set of 3 classes is scored at top-1 only (a top-5 would not exist): known answer."""
    labels = torch.randint(len(NAMES), (130,), generator=gen)
    labels[:10] = 2
    images = images_with_ranks(labels, torch.randint(3, (130,), generator=gen), gen)
    u_labels = torch.randint(3, (70,), generator=gen)
    wrong = torch.rand(70, generator=gen) < 0.3
    u_images = torch.eye(DIM)[torch.where(wrong, (u_labels + 1) % 3, u_labels)]  # a class's own axis, or the next's
    utility = LabelledImages(list(u_images), u_labels.tolist(), list(NAMES[:3]), [])
    for kwargs, size in (({}, 64), ({"batch_size": 50}, 50)):
        adapter = Batches(StubClip())
        scores = table_scores(adapter, images, labels, NAMES, NAMES[2], templates=list(TEMPLATES), utility=utility,
                              utility_templates=list(TEMPLATES), **kwargs)
        assert adapter.image_batches == chunks(130, size) + chunks(70, size)
        assert scores["utility_top1"] == pytest.approx(100 * (~wrong).double().mean().item())


def test_default_batch_sizes_images_64_and_class_prompts_256(gen):
    adapter = Batches(StubClip())
    encode_images(adapter, torch.randn(130, DIM, generator=gen))
    assert adapter.image_batches == [64, 64, 2]
    names = [f"class{i}" for i in range(300)]  # 300 prompts with one template

    class ManyNames(Batches):
        def tokens(self, texts):
            return torch.stack([torch.eye(DIM)[names.index(t.split()[-1]) % DIM] for t in texts])

    many = ManyNames(StubClip())
    ZeroShotClassifier(many, names, ["a photo of {}"]).weights()
    assert many.text_batches == [256, 44]
