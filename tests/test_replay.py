"""slug_fast.replay: search evaluations that re-run only what the edit changes, equal to plain ones.

Features are compared bit for bit (torch.equal) wherever the computation is the same one: upstream
replay returns outputs recorded from the very same computation, and everything from the edited
block on is recomputed with the same weights. Where an edited nn.Linear runs as
(W0 x + b) + lam * (G x) instead of (W0 + lam G) x + b, the sum is rounded in another order, so
features are compared with allclose at float32 tolerance. Accuracies are compared exactly.
"""
import importlib
import logging
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_adapters import word_tokenizer
from test_unlearn import FORGET, criterion_for, sets

import slug_fast
from slug_fast import digits
from slug_fast.adapters.hf_clip import HFClipAdapter
from slug_fast.demo import accuracies
from slug_fast.edit import LayerEdit
from slug_fast.errors import SlugError
from slug_fast.eval import concept_criterion
from slug_fast.replay import ByteBudget, RecordCache, find_stacks, upstream_replay
from slug_fast.replay.hooks import HF_CHECKED, HF_COLLECTOR, HF_HOOK, HF_KEY, HF_MODULE, global_hooks, \
    hf_probe_supported, inactive_hf_hook
from slug_fast.replay.placeholders import Meta, Skipped, out_meta, placeholders
from slug_fast.replay.stacks import Record, StackReplay, find_stems
from slug_fast.replay.values import nbytes, numerics_key, replayable, same, stochastic, tensors

RTOL, ATOL = 1e-5, 1e-5  # float32, features of unit norm
STEPS = (0.15, 0.4, 0.15, 0.8)  # a step met again: recorded products are reused


def direction_for(param, seed):
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(param.shape, generator=gen)
    return d * (param.detach().norm() / d.norm())


def hooks(model):
    return [(name, list(m._forward_hooks), list(m._forward_pre_hooks)) for name, m in model.named_modules()]


def no_patches(model):
    return all("forward" not in m.__dict__ for m in model.modules())


def check(got, want, exact):
    if exact:
        assert torch.equal(got, want)
    else:
        assert torch.allclose(got, want, rtol=RTOL, atol=ATOL), (got - want).abs().max()


def run_steps(model, edit, evaluate, steps, **options):
    """(plain results, replayed results, stats) of evaluate() at each step."""
    plain = []
    for s in steps:
        edit.step(s)
        plain.append(evaluate())
    before = hooks(model)
    with upstream_replay(model, edit, **options) as replay:
        assert not no_patches(model)
        got = []
        for s in steps:
            edit.step(s)
            got.append(evaluate())
        stats = replay.stats()
    assert no_patches(model) and hooks(model) == before
    return plain, got, stats


# --------------------------------------------------------------------- RecordCache


class Rec:
    """A record keyed by `key`, `nbytes` large; `broken` stands for its tensors changed in place."""

    def __init__(self, key, nbytes=10):
        self.key, self.nbytes, self.broken = key, nbytes, False

    def intact(self):
        return not self.broken


def lookup(cache, key, looked):
    """cache.find for `key`, appending every record it examines to `looked`."""
    return cache.find(lambda r: looked.append(r.key) or r.key == key)


def run_pass(cache, token, keys):
    """One pass over `keys`: each found, or stored at the cursor; returns the records looked at."""
    cache.sync(token)
    looked = []
    for k in keys:
        if lookup(cache, k, looked) is None:
            cache.store(Rec(k))
    return looked


def test_record_cache_looks_at_the_cursor_first_and_stores_in_call_order():
    cache = RecordCache("x", ByteBudget(1000), patience=2)
    run_pass(cache, 1, "abcd")
    assert [r.key for r in cache.records] == list("abcd") and cache.budget.used == 40
    assert run_pass(cache, 2, "abcd") == list("abcd")  # the same order: one look per call
    assert (cache.hits, cache.misses) == (4, 4)
    assert run_pass(cache, 3, "dcba") == list("abcd" "abc" "dab" "ca")  # the record at the cursor first
    assert (cache.hits, cache.misses) == (8, 4)
    run_pass(cache, 4, "abXd")  # a new input replaces the record at its place in the order
    assert [r.key for r in cache.records] == list("abXd") and cache.budget.used == 40
    cache.records[1].broken = True  # changed in place: dropped, its bytes released
    assert lookup(cache, "b", []) is None and cache.records[1] is None and cache.budget.used == 30


def test_record_cache_keeps_to_the_byte_budget():
    budget = ByteBudget(25)
    a, b = RecordCache("a", budget, patience=2), RecordCache("b", budget, patience=2)
    assert a.store(Rec(1)) and b.store(Rec(2))
    assert not a.store(Rec(3, nbytes=6)) and a.cursor == 1  # 26 > 25: refused, not kept, cursor stays
    assert a.store(Rec(4, nbytes=5)) and budget.used == budget.peak == 25
    a.sync("next pass")
    assert a.store(Rec(5, nbytes=10)) and [r.key for r in a.records] == [5, 4]  # replacing 1 frees its 10
    assert budget.used == sum(r.nbytes for c in (a, b) for r in c.records) == 25
    assert not b.store(Rec(6, nbytes=1)) and len(b.records) == 1  # b replaces nothing: 26 > 25
    a.clear()
    assert budget.used == 10 and a.records == [] and budget.peak == 25


def test_record_cache_gives_up_after_patience_passes_without_a_hit():
    cache = RecordCache("x", ByteBudget(1000), patience=2)
    run_pass(cache, 0, "ab")  # the recording pass: nothing to miss yet
    run_pass(cache, 1, "cd")  # no hit: cold 1
    run_pass(cache, 2, "cd")  # a hit: cold 0
    run_pass(cache, 3, "ef")  # cold 1
    assert not cache.off
    run_pass(cache, 4, "gh")  # cold 2, counted when the next pass starts
    assert not cache.off and cache.budget.used == 20
    cache.sync(5)
    assert cache.off and cache.records == [] and cache.budget.used == 0 and cache.cold == 2



def test_record_cache_skip_keeps_the_record_and_moves_the_cursor_to_the_next_call():
    """Calls whose input changed leave their records in place (skip): each next call in order is
    looked up at its own record first, and a new input after them is stored in its own place."""
    cache = RecordCache("x", ByteBudget(1000), patience=2)
    run_pass(cache, 1, "abcde")
    cache.sync(2)
    assert lookup(cache, "a", []).key == "a"
    for changed in "BC":  # b's and c's inputs changed
        assert lookup(cache, changed, []) is None and cache.at_cursor().key == changed.lower()
        cache.skip()
    looked = []
    assert lookup(cache, "d", looked).key == "d" and looked == ["d"]  # found at the first look
    assert lookup(cache, "X", []) is None and cache.at_cursor().key == "e" and cache.store(Rec("X"))
    assert [r.key for r in cache.records] == list("abcdX") and cache.budget.used == 50
    assert (cache.hits, cache.misses) == (2, 8)
    cache.sync(3)
    assert [lookup(cache, k, []).key for k in "abcdX"] == list("abcdX")

# --------------------------------------------------------------------- open_clip (digits mini-CLIP)

OPEN_CLIP_CASES = [  # (edited tensor, its forward is a Linear the replay caches)
    ("visual.transformer.resblocks.0.mlp.c_fc.weight", True),  # first block, Linear
    ("visual.transformer.resblocks.1.attn.in_proj_weight", False),  # last block, MHA in_proj
    ("visual.transformer.resblocks.1.attn.out_proj.weight", False),  # MHA reads out_proj.weight itself
    ("transformer.resblocks.1.mlp.c_proj.weight", True),  # text tower, last block
    ("transformer.resblocks.0.attn.in_proj_weight", False),  # text tower, first block
    ("visual.proj", False),  # after the whole vision stack
]


@pytest.mark.parametrize("linear", [True, False], ids=["linear", "exact"])
@pytest.mark.parametrize("name,is_linear", OPEN_CLIP_CASES, ids=[c[0] for c in OPEN_CLIP_CASES])
def test_open_clip_replay_equals_plain_evaluation(digits_model, digits_trained, name, is_linear, linear):
    data, model = digits_trained[1], digits_model
    criterion = criterion_for(data, FORGET)
    param = dict(model.named_parameters())[name]

    @torch.no_grad()
    def evaluate():
        return (criterion(model), model.encode_image(data.test_images), digits.class_text_features(model))

    with LayerEdit(model, {name: direction_for(param, 0)}) as edit:
        plain, got, stats = run_steps(model, edit, evaluate, STEPS, linear=linear)
    exact = not (linear and is_linear)
    assert {r[0][1]["forget_top1"] for r in plain} != {plain[0][0][1]["forget_top1"]} or \
        {r[0][1]["retain_top1"] for r in plain} != {plain[0][0][1]["retain_top1"]}  # the steps matter
    for (crit_p, img_p, txt_p), (crit_g, img_g, txt_g) in zip(plain, got):
        assert crit_g == crit_p
        check(img_g, img_p, exact)
        check(txt_g, txt_p, exact)
    tower = "visual.transformer.resblocks" if name.startswith("visual.") else "transformer.resblocks"
    other = "transformer.resblocks" if tower.startswith("visual") else "visual.transformer.resblocks"
    assert stats["stacks"][other]["boundary"] == 2 and stats["stacks"][other]["hits"] > 0  # the other tower
    block = int(name.split("resblocks.")[1].split(".")[0]) if ".resblocks." in name else 2
    if block:
        assert stats["stacks"][tower]["boundary"] == block and stats["stacks"][tower]["hits"] > 0
    else:
        assert tower not in stats["stacks"]  # nothing upstream of block 0
    assert stats["stems"]["token_embedding"]["hits"] > 0 and stats["stems"]["visual.conv1"]["hits"] > 0
    cached = [n for n, s in stats["linears"].items() if s["hits"] > 0]
    assert cached == ([name.rsplit(".", 1)[0]] if linear and is_linear else [])


def test_demo_criterion_and_intermediates_are_exact(digits_model, digits_trained):
    """The demo's criterion as is, and open_clip's forward_intermediates reading inside replayed blocks."""
    data, model = digits_trained[1], digits_model
    name = "visual.proj"
    tokens = digits.tokenize(["the digit three", "handwritten seven"])

    @torch.no_grad()
    def evaluate():
        inter = model.visual.forward_intermediates(data.test_images[:4], indices=[0, 1])
        return accuracies(model, data, FORGET), list(inter["image_intermediates"]), model.encode_text(tokens)

    with LayerEdit(model, {name: direction_for(model.visual.proj, 1)}) as edit:
        plain, got, stats = run_steps(model, edit, evaluate, STEPS)
    for p, g in zip(plain, got):
        assert g[0] == p[0]
        assert all(type(t) is torch.Tensor and torch.equal(t, u) for t, u in zip(g[1], p[1]))
        assert torch.equal(g[2], p[2])
    vision = stats["stacks"]["visual.transformer.resblocks"]
    assert vision["hits"] > 0 and vision["materialized"] > 0  # block 0's output was read, so computed


@pytest.mark.parametrize("linear", [True, False], ids=["linear", "exact"])
def test_criterion_with_new_data_every_call_falls_back(digits_model, linear):
    model = digits_model
    name = "visual.transformer.resblocks.1.mlp.c_proj.weight"
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(8, 3, 8, 8, generator=gen) for _ in range(len(STEPS) * 2)]
    same = torch.randn(8, 3, 8, 8, generator=gen)

    def evaluate_with(batch_a, batch_b):
        with torch.no_grad():
            return model.encode_image(batch_a), model.encode_image(batch_b), model.encode_image(same)

    with LayerEdit(model, {name: direction_for(model.visual.transformer.resblocks[1].mlp.c_proj.weight, 2)}) as edit:
        plain = []
        for i, s in enumerate(STEPS):
            edit.step(s)
            plain.append(evaluate_with(batches[2 * i], batches[2 * i + 1]))
        with upstream_replay(model, edit, linear=linear) as replay:
            for i, s in enumerate(STEPS):
                edit.step(s)
                got = evaluate_with(batches[2 * i], batches[2 * i + 1])
                for g, p in zip(got, plain[i]):
                    check(g, p, exact=not linear)
                check(evaluate_with(batches[2 * i], same)[0], got[0], exact=not linear)  # again, another order
            stats = replay.stats()
    vision = stats["stacks"]["visual.transformer.resblocks"]
    assert vision["misses"] >= 2 * len(STEPS) and vision["hits"] >= len(STEPS)  # new data missed, `same` hit
    assert no_patches(model)


def test_stack_whose_input_moves_stops_recording(digits_model, digits_trained):
    """conv1 sits before the vision stack: every step changes its input, so replay turns itself off."""
    data, model = digits_trained[1], digits_model
    name = "visual.conv1.weight"
    criterion = criterion_for(data, FORGET)
    with LayerEdit(model, {name: direction_for(model.visual.conv1.weight, 4)}) as edit:
        plain, got, stats = run_steps(model, edit, lambda: criterion(model), (0.1, 0.2, 0.3, 0.4, 0.5))
    assert got == plain
    vision = stats["stacks"]["visual.transformer.resblocks"]
    assert vision["hits"] == 0 and vision["off"]
    assert stats["stacks"]["transformer.resblocks"]["hits"] > 0


def test_grad_mode_hooks_and_budget_run_uncached(digits_model):
    model = digits_model
    name = "visual.transformer.resblocks.1.mlp.c_fc.weight"
    images = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    param = dict(model.named_parameters())[name]
    seen = []
    with LayerEdit(model, {name: direction_for(param, 6)}) as edit:
        edit.step(0.3)
        loss = model.encode_image(images).square().sum()
        want_grad = torch.autograd.grad(loss, model.visual.conv1.weight)[0]
        with torch.no_grad():
            want = model.encode_image(images)
        with upstream_replay(model, edit, linear=True) as replay:
            for _ in range(2):  # grad mode: nothing replayed, gradients exact
                loss = model.encode_image(images).square().sum()
                assert torch.equal(torch.autograd.grad(loss, model.visual.conv1.weight)[0], want_grad)
            hook = model.visual.transformer.resblocks[0].mlp.register_forward_hook(
                lambda m, i, o: seen.append(o.clone()))
            with torch.no_grad():  # a hook inside a replayed block must see every call
                for _ in range(2):
                    check(model.encode_image(images), want, exact=False)
            hook.remove()
            stats = replay.stats()
        assert len(seen) == 2 and torch.equal(seen[0], seen[1])
        assert stats["stacks"]["visual.transformer.resblocks"]["hits"] == 0
        assert stats["linears"][name[:-7]]["bypassed"] == 2
        with upstream_replay(model, edit, linear=True, max_bytes=0) as replay, torch.no_grad():
            for _ in range(2):
                check(model.encode_image(images), want, exact=False)
            assert replay.stats()["peak_bytes"] == 0
    assert no_patches(model)


def test_everything_is_restored_after_an_exception(digits_model):
    model = digits_model
    name = "transformer.resblocks.1.mlp.c_fc.weight"
    forwards = {id(m): m.forward for m in model.modules()}
    with pytest.raises(RuntimeError, match="criterion failed"):
        with LayerEdit(model, {name: direction_for(dict(model.named_parameters())[name], 7)}) as edit, \
                upstream_replay(model, edit):
            edit.step(0.5)
            assert not no_patches(model)
            with torch.no_grad():
                model.encode_text(digits.tokenize(["the digit three"]))
            raise RuntimeError("criterion failed")
    assert no_patches(model)
    assert all(m.forward.__func__ is forwards[id(m)].__func__ for m in model.modules())
    with pytest.raises(slug_fast.SlugError, match="active LayerEdit"):
        upstream_replay(model, LayerEdit(model, {name: torch.zeros_like(dict(model.named_parameters())[name])}))


# --------------------------------------------------------------------- Hugging Face CLIP

def tiny_hf_clip3():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)
    cfg = CLIPConfig(text_config=dict(**layers, vocab_size=len(word_tokenizer()), max_position_embeddings=16,
                                      pad_token_id=0, bos_token_id=2, eos_token_id=3),
                     vision_config=dict(**layers, image_size=16, patch_size=4), projection_dim=16)
    return CLIPModel(cfg).eval()


QKV = [f"vision_model.encoder.layers.1.self_attn.{x}_proj.weight" for x in "qkv"]
HF_CASES = [  # (edited tensors, whether they are Linears the replay caches)
    (QKV, True),  # middle vision block, the q/k/v group
    (["text_model.encoder.layers.2.mlp.fc1.weight", "text_model.encoder.layers.2.mlp.fc2.weight"], True),
    (["vision_model.encoder.layers.0.self_attn.out_proj.weight"], True),  # first block
    (["text_projection.weight"], True),  # after the whole text stack
    (["vision_model.embeddings.patch_embedding.weight"], False),  # a conv before the stack
]


@pytest.mark.parametrize("names,is_linear", HF_CASES, ids=[c[0][0].rsplit(".", 2)[0] for c in HF_CASES])
def test_hf_clip_replay_equals_plain_evaluation(names, is_linear):
    model, tok = tiny_hf_clip3(), word_tokenizer()
    adapter = HFClipAdapter(model, tokenizer=tok)
    gen = torch.Generator().manual_seed(8)
    images = torch.randn(24, 3, 16, 16, generator=gen)
    labels = torch.arange(24) % 4
    classes = ["cat", "dog", "car", "seven"]
    criterion = concept_criterion(adapter, images, labels, classes, "cat", templates=("a photo of the {}", "{}"),
                                  k=1, batch_size=10)
    texts = tok(["a photo of the cat", "a dog", "two"], padding=True, return_tensors="pt")
    params = dict(model.named_parameters())

    @torch.no_grad()
    def evaluate():
        vision = model.vision_model(pixel_values=images[:5], output_hidden_states=True)
        return (criterion(model), F.normalize(adapter.encode_pixels(model, images), dim=-1),
                F.normalize(adapter.encode_tokens(model, texts), dim=-1), vision.pooler_output,
                *vision.hidden_states)

    directions = {n: direction_for(params[n], i) * 0.5 for i, n in enumerate(names)}
    with LayerEdit(model, directions) as edit:
        plain, got, stats = run_steps(model, edit, evaluate, STEPS, linear=True)
    for p, g in zip(plain, got):
        assert g[0] == p[0]
        for t, u in zip(g[1:], p[1:]):
            check(t, u, exact=not is_linear)  # hidden states of replayed blocks are computed when read
    assert not torch.equal(plain[0][1], plain[1][1]) or not torch.equal(plain[0][2], plain[1][2])  # steps matter
    assert all(s["hits"] > 0 for s in stats["stacks"].values() if not s["off"])
    if is_linear:
        assert {n.rsplit(".", 1)[0] for n in names} == set(stats["linears"])
        assert stats["linears"][names[0].rsplit(".", 1)[0]]["hits"] > 0
    assert no_patches(model)


def test_hf_clip_stacks_and_boundaries():
    model = tiny_hf_clip3()
    assert [n for n, _ in find_stacks(model)] == ["text_model.encoder.layers", "vision_model.encoder.layers"]
    qkv = {n: torch.zeros_like(p) for n, p in model.named_parameters() if n in QKV}
    with LayerEdit(model, qkv) as edit, upstream_replay(model, edit) as replay:
        assert {s.name: s.boundary for s in replay.stacks} == {"text_model.encoder.layers": 3,
                                                               "vision_model.encoder.layers": 1}
        assert [s.name for s in replay.stems] == [
            "text_model.embeddings", "text_model.final_layer_norm", "vision_model.embeddings",
            "vision_model.pre_layrnorm", "vision_model.post_layernorm", "visual_projection", "text_projection"]
        with torch.no_grad():
            hidden = model.vision_model(pixel_values=torch.zeros(1, 3, 16, 16), output_hidden_states=True)
        assert not any(isinstance(h, Skipped) for h in hidden.hidden_states)


def hf_clip_with_capture_hooks():
    """tiny_hf_clip3 after a capture of hidden states: transformers installs its hooks then, and keeps them."""
    model = tiny_hf_clip3()
    with torch.no_grad():
        model.vision_model(pixel_values=torch.zeros(1, 3, 16, 16), output_hidden_states=True)
    return model


def hf_capture_hooks(model):
    return [(m, h) for m in model.modules() for h in m._forward_hooks.values() if getattr(h, "__name__", "") == HF_HOOK]


def test_transformers_hook_probe_reads_what_transformers_does():
    """Fails, naming it, when transformers changes the private hook state slug_fast/replay/hooks.py reads."""
    import transformers

    where = f"transformers {transformers.__version__}"
    assert hf_probe_supported(transformers.__version__), (
        f"{where} is outside HF_CHECKED {HF_CHECKED} (slug_fast/replay/hooks.py), so HF blocks are never "
        "replayed: check the probe against it with this test, then widen HF_CHECKED")
    try:
        collector = getattr(importlib.import_module(HF_MODULE), HF_COLLECTOR)
    except (ImportError, AttributeError) as e:
        pytest.fail(f"{where} has no {HF_MODULE}.{HF_COLLECTOR} any more: {e}")
    model = hf_clip_with_capture_hooks()
    hooks = hf_capture_hooks(model)
    assert hooks, f"{where} installs no forward hook named {HF_HOOK!r} on CLIP layers any more"
    for _, h in hooks:
        assert HF_KEY in h.__code__.co_freevars, \
            f"{where}: {HF_HOOK} no longer closes over {HF_KEY!r} (it closes over {h.__code__.co_freevars})"
    assert collector.get() is None, f"{where}: {HF_COLLECTOR}.get() is {collector.get()!r} outside a forward"
    verdicts = set()
    for capture in (None, ["hidden_states"], ["attentions"], ["hidden_states", "attentions"]):
        for module, hook in hooks:  # the probe's verdict against what the hook does when called
            collected = None if capture is None else {k: [] for k in capture}
            token = collector.set(collected)
            try:
                idle = inactive_hf_hook(hook)
                hook(module, (torch.ones(2),), (torch.ones(2), torch.ones(2)))
            finally:
                collector.reset(token)
            did = collected is not None and any(collected.values())
            verdict, deed = ("idle", "stored outputs") if idle else ("active", "did nothing")
            assert idle != did, f"{where}: with {capture} captured the probe calls a {HF_HOOK} {verdict}, but it {deed}"
            verdicts.add(idle)
    assert verdicts == {True, False}


@pytest.mark.parametrize("version,replayed", [("5.24.0", True), ("6.0.0", False), ("5.23.1", False)])
def test_hf_hooks_count_as_active_outside_checked_versions(monkeypatch, version, replayed):
    import transformers

    monkeypatch.setattr(transformers, "__version__", version)
    model = hf_clip_with_capture_hooks()
    assert hf_capture_hooks(model)
    images = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    name = "vision_model.encoder.layers.2.mlp.fc1.weight"
    features = torch.no_grad()(lambda: model.get_image_features(images).pooler_output)
    with LayerEdit(model, {name: direction_for(dict(model.named_parameters())[name], 10)}) as edit:
        plain, got, stats = run_steps(model, edit, features, STEPS)
    assert all(torch.equal(g, p) for g, p in zip(got, plain))
    vision = stats["stacks"]["vision_model.encoder.layers"]
    assert (vision["hits"] > 0) == replayed and (vision["bypassed"] == 0) == replayed


def fake_hook(module, name, key=None):
    """A function named `name` defined in `module`, closing over `key` unless it is None."""
    if key is None:
        def hook(m, args, output):
            return None
    else:
        def hook(m, args, output):
            return key
    hook.__name__, hook.__module__ = name, module
    return hook


def test_only_transformers_own_capture_hook_with_nothing_to_capture_counts_as_idle(monkeypatch):
    import functools
    import transformers

    collector = getattr(importlib.import_module(HF_MODULE), HF_COLLECTOR)
    theirs = "transformers.utils.output_capturing"
    hidden, attentions = fake_hook(theirs, HF_HOOK, "hidden_states"), fake_hook(theirs, HF_HOOK, "attentions")
    others = [fake_hook("my_package.hooks", HF_HOOK, "attentions"),  # a user's function of the same name
              fake_hook("transformers_extra.hooks", HF_HOOK, "attentions"),
              fake_hook(theirs, "another_hook", "attentions"),
              fake_hook(theirs, HF_HOOK),  # no `key` to read: in doubt, active
              functools.partial(fake_hook(theirs, HF_HOOK, "attentions"))]  # no __name__
    token = collector.set({"hidden_states": []})  # a capture of hidden states is running
    try:
        assert [inactive_hf_hook(h) for h in (hidden, attentions, *others)] == [False, True] + [False] * 5
    finally:
        collector.reset(token)
    # no capture running: idle (even without a `key` to read)
    assert [inactive_hf_hook(h) for h in (hidden, *others)] == [True, False, False, False, True, False]
    monkeypatch.setattr(transformers, "__version__", "6.0.0")  # outside HF_CHECKED: never idle
    assert not inactive_hf_hook(hidden)


# --------------------------------------------------------------------- unlearn

def test_unlearn_with_and_without_cache_choose_the_same(digits_model, digits_trained):
    data = digits_trained[1]
    forget, retain = sets(data, FORGET)
    runs = {cache: slug_fast.unlearn(digits_model, forget, retain, criterion_for(data, FORGET), apply=False,
                                     progress=False, cache=cache)
            for cache in (True, "linear", False)}
    off = runs[False]
    for on in (runs[True], runs["linear"]):
        assert on.layers == off.layers and on.step == off.step
        assert [(c.layers, c.search.step, c.utility) for c in on.candidates] == \
            [(c.layers, c.search.step, c.utility) for c in off.candidates]
        for a, b in zip(on.candidates, off.candidates):
            assert [(e.step, e.satisfied, e.metrics) for e in a.search.trace] == \
                [(e.step, e.satisfied, e.metrics) for e in b.search.trace]
    assert no_patches(digits_model)
    with pytest.raises(slug_fast.SlugError, match="cache must be"):
        slug_fast.unlearn(digits_model, forget, retain, criterion_for(data, FORGET), cache="fast", progress=False)


# --------------------------------------------------------------------- any Sequential

def test_plain_sequential_with_changing_widths_and_a_watching_hook():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Tanh(), torch.nn.Linear(12, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 4), torch.nn.Linear(4, 3)).eval()
    x = torch.randn(5, 8)
    seen = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(o.sum().item()))  # reads a replayed output
    name = "4.weight"
    with LayerEdit(model, {name: direction_for(model[4].weight, 9)}) as edit:
        plain, got, stats = run_steps(model, edit, torch.no_grad()(lambda: model(x)), STEPS, linear=False)
    assert all(torch.equal(g, p) for g, p in zip(got, plain))
    assert len(set(seen)) == 1 and len(seen) == 2 * len(STEPS)  # the hook saw the true value every call
    stack = stats["stacks"][""]
    assert stack["boundary"] == 4 and stack["hits"] == len(STEPS) - 1 and stack["materialized"] > 0


def test_an_op_that_bypasses_torch_function_reads_a_placeholders_true_value():
    """Aten ops called below torch_function (as compiled or C++ code does) reach __torch_dispatch__."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Tanh(), torch.nn.Linear(12, 6),
                                torch.nn.Linear(6, 3)).eval()
    x = torch.randn(5, 8)
    seen = []

    def read(module, args, out):
        if isinstance(out, Skipped):
            with torch._C.DisableTorchFunctionSubclass():
                seen.append((torch.ops.aten.add.Tensor(out, out, alpha=2),
                             torch.ops.aten.cat.default([out, x[:, :1]], 1), torch.ops.aten.mul.Tensor(out, 3.0)))

    model[1].register_forward_hook(read)
    with torch.no_grad():
        want = model[1](model[0](x))
    with LayerEdit(model, {"3.weight": direction_for(model[3].weight, 11)}) as edit, torch.no_grad(), \
            upstream_replay(model, edit):
        for s in STEPS:
            edit.step(s)
            model(x)
    assert len(seen) >= len(STEPS) - 1  # replayed calls after the first recorded one
    for added, joined, scaled in seen:
        assert all(type(t) is torch.Tensor for t in (added, joined, scaled))
        assert torch.equal(added, torch.add(want, want, alpha=2))
        assert torch.equal(joined, torch.cat([want, x[:, :1]], 1)) and torch.equal(scaled, want * 3.0)


def sequential_and_input():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Tanh(), torch.nn.Linear(12, 6),
                                torch.nn.Linear(6, 3)).eval()
    return model, torch.randn(5, 8)


def test_an_upstream_weight_changed_in_place_is_not_replayed():
    """Same tensor, same pointer, only its version moved: the replayed blocks must run again."""
    model, x = sequential_and_input()
    with LayerEdit(model, {"3.weight": direction_for(model[3].weight, 10)}) as edit, torch.no_grad():
        with upstream_replay(model, edit) as replay:
            edit.step(0.3)
            model(x)
            model[0].weight.mul_(2)
            got = model(x)
            edit.step(0.3)
            again = model(x)
            assert replay.stats()["stacks"][""]["boundary"] == 3
        want = model(x)
    assert torch.equal(got, want) and torch.equal(again, want)


def test_linear_cache_sees_its_input_changed_in_place():
    """The same input tensor with new values (x.mul_(2)) between two calls."""
    model, x = sequential_and_input()
    with LayerEdit(model, {"0.weight": direction_for(model[0].weight, 11)}) as edit, torch.no_grad():
        edit.step(0.3)
        with upstream_replay(model, edit, linear=True) as replay:
            model(x)
            x.mul_(2)
            got = model(x)
            stats = replay.stats()["linears"]["0"]
        check(got, model(x), exact=False)
    assert stats["misses"] == 2  # the cache was on: the first call recorded, the second missed


def test_linear_cache_follows_a_weight_written_after_the_step():
    """A write to the weight that is not the edit's step: the output follows the weight in place."""
    model, x = sequential_and_input()
    with LayerEdit(model, {"0.weight": direction_for(model[0].weight, 12)}) as edit, torch.no_grad():
        edit.step(0.3)
        with upstream_replay(model, edit, linear=True) as replay:
            model(x)
            model[0].weight.add_(0.5)
            got = model(x)
            stats = replay.stats()["linears"]["0"]
        check(got, model(x), exact=False)
    assert (stats["misses"], stats["bypassed"]) == (1, 1)  # products recorded, then not used


class AttentionBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return x + self.fc(x)


class AttentionTower(torch.nn.Module):
    """A stem (embed), a stack of three blocks, and a final norm downstream of any edit."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(4, 8)
        self.blocks = torch.nn.ModuleList([AttentionBlock() for _ in range(3)])
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def test_stats_per_stack_stem_and_linear_and_attention_owned_projections_are_not_cached():
    """MultiheadAttention reads out_proj.weight itself, never calling out_proj: no Linear cache for it,
    at any depth (blocks.1.attn.out_proj) or as the model itself (out_proj)."""
    torch.manual_seed(0)
    model, x = AttentionTower().eval(), torch.randn(2, 5, 4)
    edited = ("blocks.1.attn.out_proj.weight", "blocks.2.fc.weight")
    params = dict(model.named_parameters())
    with LayerEdit(model, {n: direction_for(params[n], i) for i, n in enumerate(edited)}) as edit, torch.no_grad():
        plain, got, stats = run_steps(model, edit, lambda: model(x), (0.1, 0.2, 0.1, 0.3), linear=True)
    for g, w in zip(got, plain):
        check(g, w, exact=False)
    # by hand: what is upstream of blocks.1 (embed, block 0) is recorded once and hit three times; the
    # norm and blocks.2.fc see inputs that move with the step: 3 distinct steps miss, and the norm
    # (no hit in `patience` = 2 passes) turns off; blocks.2.fc hits when step 0.1 comes back
    assert {k: v for k, v in stats.items() if "bytes" not in k} == {
        "stacks": {"blocks": {"boundary": 1, "blocks": 3, "hits": 3, "misses": 1, "bypassed": 0,
                              "materialized": 0, "off": False}},
        "stems": {"embed": {"hits": 3, "misses": 1, "bypassed": 0, "off": False},
                  "norm": {"hits": 0, "misses": 3, "bypassed": 1, "off": True}},
        "linears": {"blocks.2.fc": {"hits": 1, "misses": 3, "bypassed": 0, "off": False}}}
    assert 0 < stats["bytes"] < stats["peak_bytes"]  # the norm's record was dropped when it turned off

    torch.manual_seed(1)
    attention, q = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval(), torch.randn(2, 5, 8)
    direction = direction_for(attention.out_proj.weight, 7)
    with LayerEdit(attention, {"out_proj.weight": direction}) as edit, torch.no_grad():
        edit.step(0.2)
        want = attention(q, q, q)[0]
        with upstream_replay(attention, edit, linear=True) as replay:
            assert no_patches(attention)  # nothing to replay, nothing to cache
            got = attention(q, q, q)[0]
            stats = replay.stats()
    assert stats == {"bytes": 0, "peak_bytes": 0, "stacks": {}, "stems": {}, "linears": {}}
    assert torch.equal(got, want)


# --------------------------------------------------------------------- tuple outputs, keyword arguments


class PairBlock(torch.nn.Module):
    """Returns (hidden, row sums) and takes a keyword argument that changes its output."""

    def __init__(self, width):
        super().__init__()
        self.lin = torch.nn.Linear(width, width)

    def forward(self, x, scale=1.0):
        h = torch.tanh(self.lin(x)) * scale
        return h, h.sum(-1)


class PairStack(torch.nn.Module):
    def __init__(self, width=6, depth=5):
        super().__init__()
        self.blocks = torch.nn.ModuleList(PairBlock(width) for _ in range(depth))

    def forward(self, x, scale):
        for block in self.blocks:
            x, _ = block(x, scale=scale)
        return x


def pair_stack_and_input():
    """Blocks 0-3 replayed (block 4 edited): blocks 0, 1, 2 return placeholders, block 3 the boundary."""
    torch.manual_seed(0)
    return PairStack().eval(), torch.randn(4, 6)


def plain_outputs(model, x, scale):
    """Each block's true output, tuple elements included."""
    outs, h = [], x
    with torch.no_grad():
        for block in model.blocks:
            outs.append(block(h, scale=scale))
            h = outs[-1][0]
    return outs


def test_tuple_outputs_and_keyword_arguments_read_inside_replayed_blocks_are_exact():
    """A hook reads both elements of block 1's and block 2's tuple outputs, with keyword-argument ops."""
    model, x = pair_stack_and_input()
    want = plain_outputs(model, x, 0.5)
    seen = {1: [], 2: []}

    def read(j):
        def hook(module, args, out):
            h, sums = out
            seen[j].append((h.size(dim=0), h.shape, sums.dim(), torch.sum(h, dim=1), sums * 1, h.clone()))
        return hook

    model.blocks[1].register_forward_hook(read(1))
    model.blocks[2].register_forward_hook(read(2))
    edit_name = "blocks.4.lin.weight"
    with LayerEdit(model, {edit_name: direction_for(model.blocks[4].lin.weight, 13)}) as edit:
        plain, got, stats = run_steps(model, edit, torch.no_grad()(lambda: model(x, scale=0.5)), STEPS)
    assert all(torch.equal(g, p) for g, p in zip(got, plain))
    stack = stats["stacks"]["blocks"]
    assert stack["boundary"] == 4 and stack["hits"] == len(STEPS) - 1
    assert stack["materialized"] == 3 * (len(STEPS) - 1)  # blocks 0, 1, 2 once per replayed call
    for j in (1, 2):
        h, sums = want[j]
        assert len(seen[j]) == 2 * len(STEPS)
        for rows, shape, dims, summed, sums_read, h_read in seen[j]:
            assert rows == 4 and shape == h.shape and dims == 1
            assert all(type(t) is torch.Tensor for t in (summed, sums_read, h_read))
            assert torch.equal(summed, torch.sum(h, dim=1)) and torch.equal(sums_read, sums)
            assert torch.equal(h_read, h)


def test_metadata_reads_of_placeholders_compute_nothing():
    model, x = pair_stack_and_input()
    seen = []
    model.blocks[2].register_forward_hook(
        lambda m, a, out: seen.append((out[0].shape, out[0].size(), out[0].size(1), out[1].dim(), out[0].stride(),
                                       out[1].numel(), out[0].dtype, out[0].ndim)))
    with LayerEdit(model, {"blocks.4.lin.weight": direction_for(model.blocks[4].lin.weight, 14)}) as edit:
        plain, got, stats = run_steps(model, edit, torch.no_grad()(lambda: model(x, scale=0.5)), STEPS)
    assert all(torch.equal(g, p) for g, p in zip(got, plain))
    assert len(seen) == 2 * len(STEPS) and len(set(seen)) == 1
    assert seen[0] == (torch.Size([4, 6]), torch.Size([4, 6]), 6, 1, (6, 1), 4, torch.float32, 2)
    stack = stats["stacks"]["blocks"]
    assert stack["hits"] == len(STEPS) - 1 and stack["materialized"] == 0


class KeptBlock(torch.nn.Module):
    """Returns a buffer made outside inference mode: the only boundary an inference-mode call can record."""

    def __init__(self, value):
        super().__init__()
        self.register_buffer("kept", value)

    def forward(self, x, scale=1.0):
        return self.kept, None


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_placeholders_read_after_the_call_are_made_in_the_recorded_mode(mode):
    """Hidden states kept past the call and read outside its mode: values as a plain forward made them."""
    model, x = pair_stack_and_input()
    model.blocks[3] = KeptBlock(torch.randn(4, 6))
    with mode():
        want = plain_outputs(model, x, 2.0)
    kept = []
    model.blocks[1].register_forward_hook(lambda m, a, out: kept.append(out))
    reads = []
    with LayerEdit(model, {"blocks.4.lin.weight": direction_for(model.blocks[4].lin.weight, 15)}) as edit, \
            upstream_replay(model, edit) as replay:
        for s in STEPS:
            edit.step(s)
            with mode():
                model(x, scale=2.0)
            h, sums = kept[-1]
            reads.append((h.detach(), sums[:]))  # views: inference tensors stay inference tensors
        stack = replay.stats()["stacks"]["blocks"]
    assert stack["hits"] == len(STEPS) - 1 and stack["materialized"] == 2 * (len(STEPS) - 1)
    inference = mode is torch.inference_mode
    for h, sums in reads:
        assert h.is_inference() == sums.is_inference() == want[1][0].is_inference() == inference
        assert torch.equal(h, want[1][0]) and torch.equal(sums, want[1][1])


def test_calls_in_inference_mode_holding_inference_tensors_are_not_recorded():
    """Inference tensors keep no version counter, so a record of them could not see a change in place."""
    model, x = pair_stack_and_input()
    with torch.inference_mode():
        want = model(x, scale=2.0)
    with LayerEdit(model, {"blocks.4.lin.weight": direction_for(model.blocks[4].lin.weight, 16)}) as edit:
        edit.step(0.0)
        with upstream_replay(model, edit) as replay, torch.inference_mode():
            got = [model(x, scale=2.0) for _ in range(3)]
            stack = replay.stats()["stacks"]["blocks"]
    assert all(torch.equal(g, want) for g in got)
    assert (stack["hits"], stack["misses"], stack["materialized"]) == (0, 3, 0)


# --------------------------------------------------------------------- the linear cache, piece by piece


def linear_model(dtype=torch.float32, bias=True):
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(8, 12, bias=bias)).to(dtype).eval()
    return model, torch.randn(5, 8).to(dtype)


def exact_output(theta0, direction, bias, lam, x):
    """float64 (theta0 + lam * direction) x + b: what the cached products approximate."""
    w = theta0.double() + lam * direction.double()
    return F.linear(x.double(), w, None if bias is None else bias.double())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_linear_cache_reuses_its_products_at_every_step(dtype):
    """Recorded once, then every step is (W0 x + b) + lam (G x), computed in float32 (float64 for
    float64) and returned in the input's dtype, within rounding of the float64 product."""
    model, x = linear_model(dtype)
    d = direction_for(model[0].weight.float(), 21).to(dtype)
    theta0 = model[0].weight.detach().clone()
    with LayerEdit(model, {"0.weight": d}) as edit, torch.no_grad():
        with upstream_replay(model, edit, linear=True) as replay:
            for lam in (0.3, -0.2, 0.7, 0.3):
                edit.step(lam)
                got = model(x)
                want = exact_output(theta0, d, model[0].bias, lam, x)
                assert got.dtype == dtype
                tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2 ** -7}[dtype]
                assert (got.double() - want).abs().max() <= tol * want.abs().max()
            stats = replay.stats()["linears"]["0"]
            (held,) = [r for r in replay.linears[0].cache.records if r is not None]
    # the products are held in float32 (float64 for float64) and rounded once from exact sums
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert held.base.dtype == held.gx.dtype == acc
    exact_gx, exact_base = F.linear(x.double(), d.double()), F.linear(x.double(), theta0.double())
    assert (held.gx.double() - exact_gx).abs().max() <= 8 * torch.finfo(acc).eps * exact_gx.abs().max()
    assert (held.base.double() - exact_base - model[0].bias.double()).abs().max() <= \
        2 * torch.finfo(dtype).eps * exact_base.abs().max()  # W0 x + b is the module's own, in its dtype
    assert (stats["misses"], stats["hits"], stats["bypassed"]) == (1, 3, 0)


def test_linear_cache_accepts_a_weight_one_rounding_away_and_refuses_one_further():
    """The weight is checked against cast(theta0 + lam G) to 4 eps x (max|theta0| + |lam| max|G|):
    one ulp off (a fused multiply-add) still uses the products, 8 eps x that scale does not."""
    model, x = linear_model()
    gen = torch.Generator().manual_seed(22)
    d = torch.rand(model[0].weight.shape, generator=gen) - 0.5  # max |G| <= 0.5
    d.view(-1)[0] = 0.5
    lam = 50.0
    weight = model[0].weight
    scale = float(weight.detach().abs().max()) + lam * 0.5
    with LayerEdit(model, {"0.weight": d}) as edit, torch.no_grad():
        with upstream_replay(model, edit, linear=True) as replay:
            edit.step(lam)
            model(x)
            top = int(weight.abs().argmax())
            weight.view(-1)[top] = torch.nextafter(weight.view(-1)[top], torch.tensor(float("inf")))
            model(x)
            assert replay.stats()["linears"]["0"]["hits"] == 1  # one ulp of a value near the scale
            weight.view(-1)[top] += 8 * torch.finfo(torch.float32).eps * scale
            got = [model(x), model(x)]
            stats = replay.stats()["linears"]["0"]
        assert all(torch.equal(g, model(x)) for g in got)  # not the products: the weight in place
    assert (stats["hits"], stats["bypassed"]) == (1, 2)


@pytest.mark.parametrize("change", ["in place", "replaced"])
def test_linear_cache_follows_its_bias(change):
    """A bias changed in place, or replaced by a new tensor (its version then starts again)."""
    model, x = linear_model()
    with LayerEdit(model, {"0.weight": direction_for(model[0].weight, 23)}) as edit, torch.no_grad():
        edit.step(0.4)
        with upstream_replay(model, edit, linear=True) as replay:
            model(x)
            if change == "in place":
                model[0].bias.add_(1.0)
            else:  # a new tensor whose version counter reads as the old one's: only its identity differs
                old = model[0].bias
                model[0].bias = torch.nn.Parameter(old.detach() + 1.0)
                while model[0].bias._version < old._version:
                    model[0].bias.add_(0.0)
                assert model[0].bias._version == old._version
            got = model(x)
            misses = replay.stats()["linears"]["0"]["misses"]
        check(got, model(x), exact=False)
    assert misses == 2


def test_linear_cache_without_a_bias():
    model, x = linear_model(bias=False)
    d = direction_for(model[0].weight, 24)
    theta0 = model[0].weight.detach().clone()
    with LayerEdit(model, {"0.weight": d}) as edit, torch.no_grad():
        with upstream_replay(model, edit, linear=True) as replay:
            for lam in (0.2, 0.5):
                edit.step(lam)
                got = model(x)
                want = exact_output(theta0, d, None, lam, x)
                assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
            assert replay.stats()["linears"]["0"]["hits"] == 1


def test_linear_cache_passes_keyword_calls_through():
    model, x = linear_model()
    with LayerEdit(model, {"0.weight": direction_for(model[0].weight, 25)}) as edit, torch.no_grad():
        edit.step(0.4)
        with upstream_replay(model, edit, linear=True) as replay:
            got = [model[0](input=x), model[0](input=x)]
            stats = replay.stats()["linears"]["0"]
        want = model[0](x)
    assert all(torch.equal(g, want) for g in got)
    assert (stats["bypassed"], stats["hits"], stats["misses"]) == (2, 0, 0)


def test_linear_cache_is_installed_once_and_removed():
    model, x = linear_model()
    with LayerEdit(model, {"0.weight": direction_for(model[0].weight, 26)}) as edit, torch.no_grad():
        with upstream_replay(model, edit, linear=True):
            assert "forward" in model[0].__dict__
            with pytest.raises(slug_fast.SlugError, match="0 already has an instance forward; another replay"):
                with upstream_replay(model, edit, linear=True):
                    pass
            assert "forward" in model[0].__dict__  # the outer replay is intact
        assert "forward" not in model[0].__dict__


def test_linear_cache_keys_its_products_by_the_numerics():
    """The same input under another float32 matmul precision is computed again."""
    model, x = linear_model()
    before = torch.get_float32_matmul_precision()
    with LayerEdit(model, {"0.weight": direction_for(model[0].weight, 27)}) as edit, torch.no_grad():
        edit.step(0.4)
        with upstream_replay(model, edit, linear=True) as replay:
            model(x)
            try:
                torch.set_float32_matmul_precision("medium" if before != "medium" else "high")
                model(x)
            finally:
                torch.set_float32_matmul_precision(before)
            model(x)
            stats = replay.stats()["linears"]["0"]
    assert (stats["misses"], stats["hits"]) == (2, 1)


def test_linear_cache_recomputes_an_input_only_once_it_changed_twice():
    """At the cursor: an input unlike the recorded one is first run as a plain matmul (bit for bit
    the plain output), the products are computed when it changes again, and then reused."""
    model, x = linear_model()
    again = x + 2.0
    inputs = [x, x + 1.0, again, again]
    with LayerEdit(model, {"0.weight": direction_for(model[0].weight, 28)}) as edit, torch.no_grad():
        with upstream_replay(model, edit, linear=True, patience=5) as replay:  # no give-up after 2 misses
            outputs, plain = [], []
            for i, xi in enumerate(inputs):
                edit.step(0.1 * (i + 1))
                outputs.append(model(xi))
                plain.append(F.linear(xi, model[0].weight, model[0].bias))  # nn.Linear's own forward
            stats = replay.stats()["linears"]["0"]
    assert torch.equal(outputs[1], plain[1])
    for got, want in zip(outputs, plain):
        check(got, want, exact=False)
    assert (stats["misses"], stats["hits"]) == (3, 1)


def test_linear_cache_weight_check_at_exactly_four_eps_of_the_scale():
    """Dyadic values make the check exact: scale = max|theta0| + |lam| max|G| = 1 + 2 x 0.5 = 2,
    so 4 eps x scale = 2^-20. A weight that far from cast(theta0 + lam G) still uses the products;
    4.5 eps x scale does not."""
    model, x = linear_model(bias=False)
    gen = torch.Generator().manual_seed(29)
    with torch.no_grad():
        model[0].weight.copy_(torch.randint(-8, 9, model[0].weight.shape, generator=gen) / 8.0)
        model[0].weight.view(-1)[0] = 1.0
    d = torch.randint(-4, 5, model[0].weight.shape, generator=gen) / 8.0
    d.view(-1)[0] = 0.25  # the weight's first entry ends at 1.5 after the step, in [1, 2)
    eps = torch.finfo(torch.float32).eps
    with LayerEdit(model, {"0.weight": d}) as edit, torch.no_grad():
        with upstream_replay(model, edit, linear=True, patience=10) as replay:
            edit.step(2.0)
            assert float(model[0].weight.abs().max()) <= 2.0 and float(model[0].weight.view(-1)[0]) == 1.5
            model(x)
            hits = []
            for off in (4.0, 4.5):
                model[0].weight.view(-1)[0] = 1.5 + off * eps * 2.0  # a new version: checked again
                model(x)
                hits.append(replay.stats()["linears"]["0"]["hits"])
    assert hits == [1, 1]  # at 4 eps: used; at 4.5 eps: bypassed


def test_linear_cache_turns_off_after_passes_without_a_hit():
    """An input that is new at every step: after `patience` passes without a hit the cache is off
    and every call is the plain matmul, bit for bit."""
    model, x = linear_model()
    with LayerEdit(model, {"0.weight": direction_for(model[0].weight, 30)}) as edit, torch.no_grad():
        with upstream_replay(model, edit, linear=True, patience=1) as replay:
            got, plain = [], []
            for i in range(4):
                edit.step(0.1 * (i + 1))
                xi = x + i
                got.append(model(xi))
                plain.append(F.linear(xi, model[0].weight, model[0].bias))
            got.append(model(xi))  # once more in the last pass
            stats = replay.stats()["linears"]["0"]
    # recorded, then a miss (run plain), then off from the third pass on: bypassed ever since
    assert (stats["misses"], stats["hits"], stats["bypassed"], stats["off"]) == (2, 0, 2, True)
    for g, p in zip(got[2:], plain[2:] + plain[-1:]):
        assert torch.equal(g, p)


class Marked(torch.Tensor):
    """A tensor subclass: its operations may be overridden, so its values are never cached."""


@pytest.mark.parametrize("change", ["subclass input", "weight replaced"])
def test_linear_cache_runs_plain_for_a_subclass_input_or_a_replaced_weight(change):
    model, x = linear_model()
    with LayerEdit(model, {"0.weight": direction_for(model[0].weight, 32)}) as edit, torch.no_grad():
        edit.step(0.4)
        with upstream_replay(model, edit, linear=True) as replay:
            model(x)
            if change == "subclass input":
                x = x.as_subclass(Marked)
            else:
                model[0].weight = torch.nn.Parameter(model[0].weight.detach() * 2)
            got = model(x)
            stats = replay.stats()["linears"]["0"]
        assert torch.equal(got.as_subclass(torch.Tensor), F.linear(x, model[0].weight, model[0].bias).as_subclass(torch.Tensor))
    assert (stats["misses"], stats["bypassed"]) == (1, 1)


def test_linear_cache_keeps_no_products_over_its_byte_budget():
    """A budget below one record: the products are computed and used once, never kept."""
    model, x = linear_model()
    with LayerEdit(model, {"0.weight": direction_for(model[0].weight, 31)}) as edit, torch.no_grad():
        with upstream_replay(model, edit, linear=True, max_bytes=100, patience=10) as replay:
            for lam in (0.2, 0.4, 0.2):
                edit.step(lam)
                check(model(x), F.linear(x, model[0].weight, model[0].bias), exact=False)
            stats = replay.stats()
    assert stats["linears"]["0"]["hits"] == 0 and stats["linears"]["0"]["misses"] == 3 and stats["bytes"] == 0


# --------------------------------------------------------------------- the pieces, one function at a time


def test_same_is_bit_identity_for_tensors_and_equality_of_the_exact_type_for_plain_values():
    t = torch.arange(6.0).reshape(2, 3)
    twin = t.clone()
    big = 10.0 ** 300  # floats computed at run time: equal values, distinct objects
    assert same(t, twin) and same(t, t) and not same(t, t + 1) and not same(t, t.double())
    assert not same(t.t().contiguous(), t.t()) and not same(t.as_subclass(Marked), twin)
    assert not same(twin, t.as_subclass(Marked)) and not same(t.as_subclass(Marked), t.as_subclass(Marked))
    assert not same(t, 1.0) and not same(1.0, t) and not same(t, None) and not same(None, t)
    assert same(None, None) and not same(None, 0) and not same(0, None) and not same(None, ())
    assert same(big * 2, big * 2) and not same(big * 2, big * 3)
    assert not same(0.0, -0.0) and not same(-0.0, 0.0) and same(-0.0, -1.0 * 0.0) and not same(1.0, 2.0)
    assert same(7, 7) and not same(7, 8) and not same(1, 1.0) and not same(True, 1) and not same(1.0, 1)
    assert same("ab", "a" + "b") and same(torch.float32, torch.float32) and not same(torch.float32, torch.float16)
    assert same((1, big * 2, (t, None)), (1, big * 2, (twin, None))) and same([1, 2], [1, 2])
    assert not same((1,), (1, 2)) and not same((1, 2), (1,)) and not same((1, 2), (1, 3)) and not same((1,), [1])
    assert not same((t,), (t + 1,)) and not same((0.0,), (-0.0,)) and same((), ())
    assert not same(object(), object()) and not same({}, {}) and not same(type, type)


def test_replayable_accepts_plain_tensors_none_scalars_and_tuples_of_them_only():
    t = torch.ones(2)
    for ok in (t, None, True, 3, 2.5, 1j, "s", torch.float32, torch.device("cpu"), (t, (None, 1)), [t, 2], ()):
        assert replayable(ok), ok
    for no in (object(), {}, {"a": t}, t.as_subclass(Marked), (t, object()), [None, (1, t.to_sparse())],
               torch.nn.Linear(1, 1)):
        assert not replayable(no), no


def test_tensors_and_nbytes_walk_tuples_lists_and_dicts():
    a, b, c = torch.ones(3), torch.ones(2, dtype=torch.float64), torch.ones(5, dtype=torch.int8)
    assert [id(t) for t in tensors((a, [None, (b,)], {"k": c, "n": 1}))] == [id(a), id(b), id(c)]
    assert nbytes([a, [b], {"k": (c,)}]) == 3 * 4 + 2 * 8 + 5
    assert list(tensors(3)) == [] and nbytes(None) == 0


class Rated(torch.nn.Module):
    """A module that is random in training mode through one of the conventional rate attributes."""

    def __init__(self, attr, value):
        super().__init__()
        setattr(self, attr, value)


def test_stochastic_modules_in_their_current_mode():
    for p, random in ((0.5, True), (0.0, False), (1.0, True)):
        drop = torch.nn.Dropout(p)
        assert stochastic(drop.train()) == random and not stochastic(drop.eval())
    norm = torch.nn.BatchNorm1d(3)
    assert stochastic(norm.train()) and not stochastic(norm.eval())
    assert not stochastic(torch.nn.BatchNorm1d(3, track_running_stats=False).train())
    for attr in ("dropout", "drop_rate", "p", "drop_path"):
        assert stochastic(Rated(attr, 0.5).train()) and not stochastic(Rated(attr, 0.5).eval())
        assert not stochastic(Rated(attr, 0.0).train()) and not stochastic(Rated(attr, 1).train())  # 1: an int
    assert stochastic(Rated("drop_prob", 2.0).train()) and not stochastic(Rated("rate", 0.5).train())
    assert not stochastic(torch.nn.Linear(2, 2).train())


@pytest.mark.parametrize("dev", ["cpu", "cuda"])
def test_numerics_key_follows_autocast_of_each_device(dev):
    """Autocast state of cpu and cuda can be switched (and read) on a machine without a GPU."""
    enabled, dtype = torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)
    base = numerics_key()
    assert numerics_key() == base and dtype in base
    try:
        torch.set_autocast_enabled(dev, not enabled)
        flipped = numerics_key()
        torch.set_autocast_enabled(dev, enabled)
        other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
        torch.set_autocast_dtype(dev, other)
        retyped = numerics_key()
    finally:
        torch.set_autocast_enabled(dev, enabled)
        torch.set_autocast_dtype(dev, dtype)
    assert flipped != base and retyped != base and flipped != retyped and numerics_key() == base
    assert len(flipped) == len(retyped) == len(base)


def test_global_hooks_sees_either_kind_of_global_forward_hook():
    assert not global_hooks()
    for register in (torch.nn.modules.module.register_module_forward_hook,
                     torch.nn.modules.module.register_module_forward_pre_hook):
        handle = register(lambda *a: None)
        try:
            assert global_hooks()
        finally:
            handle.remove()
        assert not global_hooks()


def test_meta_and_out_meta_describe_plain_outputs_only():
    t = torch.zeros(3, 2, dtype=torch.float64).t()
    meta = Meta.of(t)
    assert (meta.shape, meta.stride, meta.dtype, meta.device) == (torch.Size([2, 3]), (1, 2), torch.float64,
                                                                   torch.device("cpu"))
    u = torch.ones(4, dtype=torch.int16)
    assert out_meta(t) == meta and out_meta((t, None, u)) == (meta, None, Meta.of(u))
    for no in (t.as_subclass(Marked), (), (None, t), [t], (t, t.as_subclass(Marked)), (t, 3), (t, [u]), {"a": t},
               None):
        assert out_meta(no) is None, no
    held = placeholders((meta, None, Meta.of(u)), None, 0)
    assert held[1] is None and [type(h) for h in held[::2]] == [Skipped, Skipped]
    assert (held[0].shape, held[0].stride(), held[0].dtype, held[2].dtype) == ((2, 3), (1, 2), torch.float64, u.dtype)


def test_a_record_sees_its_tensors_changed_in_place():
    x, y, out = torch.ones(2), torch.ones(3), torch.ones(4)
    rec = Record((x, 1.0), {"y": y}, (), [], out)
    rec.seal()
    assert rec.intact() and rec.nbytes == 9 * 4
    for t in (x, y, out):
        t.add_(1)
        assert not rec.intact()
        rec.seal()
        assert rec.intact()


# --------------------------------------------------------------------- RecordCache counters


def test_record_cache_counts_the_calls_and_hits_of_the_current_pass():
    cache = RecordCache("x", ByteBudget(1000), patience=2)
    run_pass(cache, 1, "abc")
    assert (cache.pass_calls, cache.pass_hits) == (3, 0)
    run_pass(cache, 2, "aXc")
    assert (cache.pass_calls, cache.pass_hits) == (3, 2) and (cache.hits, cache.misses) == (2, 4)
    cache.sync(3)
    assert (cache.pass_calls, cache.pass_hits) == (0, 0)
    cache.clear()
    assert cache.records == [] and cache.cursor == 0 and cache.budget.used == 0 and cache.at_cursor() is None


@pytest.mark.parametrize("gone", ["dropped", "broken"])
def test_record_cache_looks_past_an_empty_or_broken_slot_at_the_cursor(gone):
    cache = RecordCache("x", ByteBudget(1000), patience=2)
    run_pass(cache, 1, "abc")
    if gone == "dropped":
        cache.records[1] = None
        cache.budget.used -= 10
    else:
        cache.records[1].broken = True
    cache.sync(2)
    looked = []
    assert lookup(cache, "a", looked).key == "a" and cache.cursor == 1
    assert lookup(cache, "c", looked).key == "c"  # the slot at the cursor holds nothing usable: look on
    assert looked == ["a", "a", "c"] and cache.records[1] is None  # the cursor, then the others in order
    assert cache.budget.used == 20


def test_record_cache_says_when_it_turns_off(caplog):
    cache = RecordCache("blocks", ByteBudget(1000), patience=2)
    with caplog.at_level(logging.DEBUG, logger="slug_fast"):
        for token, keys in enumerate(("ab", "cd", "ef")):
            run_pass(cache, token, keys)
        assert not caplog.records
        cache.sync(9)
    assert cache.off
    assert [r.getMessage() for r in caplog.records] == ["replay blocks: recorded calls never matched for 2 passes; off"]


# --------------------------------------------------------------------- finding stacks and stems


def linears(n, width=4):
    return [torch.nn.Linear(width, width) for _ in range(n)]


def test_find_stacks_keeps_the_outermost_stacks_of_each_branch():
    nested = torch.nn.Sequential(torch.nn.Sequential(*linears(2)), torch.nn.Linear(4, 4))
    assert [(n, m) for n, m in find_stacks(nested)] == [("", nested)]
    model = torch.nn.Module()
    model.a = torch.nn.ModuleList([torch.nn.Sequential(*linears(2)), torch.nn.ModuleList(linears(3))])
    model.one = torch.nn.ModuleList(linears(1))  # a single child: no stack
    model.named = torch.nn.Sequential(OrderedDict(first=torch.nn.Linear(4, 4), second=torch.nn.Linear(4, 4)))
    model.b = torch.nn.ModuleList(linears(2))
    assert [(n, m) for n, m in find_stacks(model)] == [("a", model.a), ("b", model.b)]


def test_find_stems_branch_off_the_paths_to_stacks_and_edits_and_hold_no_edited_tensor():
    model = torch.nn.Module()
    model.embed = torch.nn.Linear(4, 4)
    model.blocks = torch.nn.ModuleList(linears(2))
    model.act = torch.nn.ReLU()  # no parameters: nothing to replay
    model.proj = torch.nn.Module()
    model.proj.lin = torch.nn.Linear(4, 4)  # edited
    model.proj.norm = torch.nn.LayerNorm(4)  # a sibling of the edited module: a stem
    model.tied = torch.nn.Module()
    model.tied.shared = model.proj.lin  # the edited module again, under a second name
    model.tied.scale = torch.nn.LayerNorm(4)
    stems = find_stems(model, ["blocks"], {id(model.proj.lin.weight)})
    assert [(n, m) for n, m in stems] == [("embed", model.embed), ("proj.norm", model.proj.norm)]
    assert [n for n, _ in find_stems(model, ["blocks"], set())] == ["embed", "proj", "tied"]


# --------------------------------------------------------------------- StackReplay, call by call


class Owner:
    """What a StackReplay reads from its UpstreamReplay: the budget, patience, edited ids and the token."""

    def __init__(self, *edited):
        self.budget, self.patience, self.edited_ids = ByteBudget(float("inf")), 2, {id(t) for t in edited}
        self.moves = 0

    def token(self):
        return (self.moves,)


def test_same_extras_compares_every_argument_but_the_chained_one():
    t, obj = torch.arange(3.0), object()
    s = SimpleNamespace(args=(torch.zeros(2), 1, t), kwargs={"k": 2.5, "o": obj})
    big = 10.0 ** 300
    s2 = SimpleNamespace(args=(None, big * 2), kwargs={})
    assert StackReplay._same_extras(s, (torch.ones(2), 1, t.clone()), {"k": 2.5, "o": obj})
    assert StackReplay._same_extras(s2, (torch.ones(2), big * 2), {})
    assert not StackReplay._same_extras(s, (torch.ones(2), 1, t + 1), {"k": 2.5, "o": obj})
    assert not StackReplay._same_extras(s, (torch.ones(2), 1), {"k": 2.5, "o": obj})  # one argument fewer
    assert not StackReplay._same_extras(s, (torch.ones(2), 1, t), {"k": 2.5, "p": obj})  # another keyword
    assert not StackReplay._same_extras(s, (torch.ones(2), 1, t), {"k": 2.5, "o": object()})
    assert not StackReplay._same_extras(s2, (None, big * 3), {})


class NoneFirst(torch.nn.Module):
    """A parameter slot left empty before the real weight (as optional biases are registered)."""

    def __init__(self):
        super().__init__()
        self.register_parameter("shift", None)
        self.weight = torch.nn.Parameter(torch.randn(4, 4))
        self.register_buffer("mask", torch.ones(4))

    def forward(self, x):
        return x @ self.weight * self.mask


def test_region_ok_reports_training_flags_and_refuses_edited_tensors():
    torch.manual_seed(0)
    stack = torch.nn.Sequential(torch.nn.Linear(4, 4), NoneFirst(), torch.nn.Linear(4, 4))
    stack[0].train()
    stack[1].eval()
    assert StackReplay(Owner(), "s", stack, 2)._region_ok() == (True, False)
    assert StackReplay(Owner(stack[0].bias), "s", stack, 2)._region_ok() is None
    assert StackReplay(Owner(stack[1].weight), "s", stack, 2)._region_ok() is None  # after an empty slot
    assert StackReplay(Owner(stack[1].mask), "s", stack, 2)._region_ok() is None
    assert StackReplay(Owner(stack[2].weight), "s", stack, 2)._region_ok() == (True, False)


def test_region_ok_drops_the_records_when_an_upstream_tensor_changes(caplog):
    torch.manual_seed(0)
    stack = torch.nn.Sequential(torch.nn.Linear(4, 4), NoneFirst(), torch.nn.Linear(4, 4))
    replay = StackReplay(Owner(), "tower", stack, 2)
    with caplog.at_level(logging.DEBUG, logger="slug_fast"):
        assert replay._region_ok() is not None
        replay.cache.store(Rec("a"))
        assert replay._region_ok() is not None and len(replay.cache.records) == 1
        assert not caplog.records  # the first look records the tensors: nothing had changed
        with torch.no_grad():
            stack[1].mask.mul_(2)  # a buffer after an empty parameter slot, written in place
        assert replay._region_ok() is not None
    assert replay.cache.records == []
    assert [r.getMessage() for r in caplog.records] == ["replay tower: upstream tensors changed; records dropped"]


class Shifted(torch.nn.Module):
    """Adds a shift between blocks 0 and 1: block 1 is not given what block 0 returned."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(linears(3))

    def forward(self, x, shift):
        h = self.blocks[0](x)
        return self.blocks[2](self.blocks[1](h + shift))


def test_a_loop_that_does_not_chain_the_blocks_runs_them_for_real():
    torch.manual_seed(0)
    model, x = Shifted().eval(), torch.randn(3, 4)
    shifts = (0.0, 1.0, 0.0, 2.0)
    with LayerEdit(model, {"blocks.2.weight": direction_for(model.blocks[2].weight, 20)}) as edit:
        want = []
        with torch.no_grad():
            for shift in shifts:
                want.append(model(x, shift))
            with upstream_replay(model, edit) as replay:
                results = [model(x, shift) for shift in shifts]
                stack = replay.stats()["stacks"]["blocks"]
    assert all(torch.equal(g, w) for g, w in zip(results, want))
    assert stack["boundary"] == 2 and stack["hits"] == 0  # block 0 recorded, the call never completed


class Tagged(torch.nn.Linear):
    """Takes a tag it ignores, positionally or by keyword."""

    def forward(self, x, tag=None):
        return super().forward(x)


class TaggedStack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Tagged(4, 4) for _ in range(3))

    def forward(self, x, tag, keyword):
        for block in self.blocks:
            x = block(x, tag=tag) if keyword else block(x, tag)
        return x


@pytest.mark.parametrize("keyword", [False, True], ids=["positional", "keyword"])
def test_calls_with_an_argument_that_cannot_be_compared_are_counted_as_bypassed(keyword):
    torch.manual_seed(0)
    model, x = TaggedStack().eval(), torch.randn(3, 4)
    with LayerEdit(model, {"blocks.2.weight": direction_for(model.blocks[2].weight, 21)}) as edit, torch.no_grad():
        edit.step(0.3)
        want = model(x, None, keyword)
        with upstream_replay(model, edit) as replay:
            unknown = [model(x, object(), keyword) for _ in range(3)]
            named = [model(x, "name", keyword) for _ in range(3)]
            stack = replay.stats()["stacks"]["blocks"]
    assert all(torch.equal(g, want) for g in unknown + named)
    assert (stack["bypassed"], stack["misses"], stack["hits"]) == (3, 1, 2)


class ModeScaled(torch.nn.Linear):
    """Computes something else in training mode, without being random."""

    def forward(self, x):
        return super().forward(x) * (3.0 if self.training else 1.0)


def test_a_call_in_another_training_mode_is_not_replayed():
    torch.manual_seed(0)
    model, x = torch.nn.Sequential(ModeScaled(4, 4), ModeScaled(4, 4), torch.nn.Linear(4, 4)).eval(), torch.randn(3, 4)
    with LayerEdit(model, {"2.weight": direction_for(model[2].weight, 22)}) as edit, torch.no_grad():
        edit.step(0.3)
        want_eval = model(x)
        model[0].train()
        want_train = model(x)
        model[0].eval()
        with upstream_replay(model, edit) as replay:
            got = [model(x), model(x)]
            model[0].train()
            got += [model(x), model(x)]
            model[0].eval()
            got.append(model(x))
            stack = replay.stats()["stacks"][""]
    assert not torch.equal(want_eval, want_train)
    assert all(torch.equal(g, w) for g, w in zip(got, [want_eval] * 2 + [want_train] * 2 + [want_eval]))
    assert (stack["hits"], stack["misses"]) == (3, 2)  # one record per mode


class ListOut(torch.nn.Linear):
    """Returns its output in a list: nothing the replay can stand in for."""

    def forward(self, x):
        return [super().forward(x)]


class ListStack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(ListOut(4, 4) for _ in range(3))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)[0]
        return x


def test_blocks_called_on_their_own_between_calls_run_for_real():
    """A caller may run one block by itself (a probe, a test) before, after or between model calls."""
    model, x = sequential_and_input()
    h = torch.randn(5, 12)
    with LayerEdit(model, {"3.weight": direction_for(model[3].weight, 23)}) as edit, torch.no_grad():
        edit.step(0.2)
        want, want_block = model(x), model[2](h)
        with upstream_replay(model, edit) as replay:
            got = [model[2](h)]  # before any call
            for _ in range(3):  # recorded, then replayed
                got += [model(x), model[2](h), model[1](h)]
            assert replay.stats()["stacks"][""]["hits"] == 2
    assert all(torch.equal(g, w) for g, w in zip(got, [want_block] + [want, want_block, torch.tanh(h)] * 3))
    torch.manual_seed(0)
    listed, x = ListStack().eval(), torch.randn(3, 4)
    with LayerEdit(listed, {"blocks.2.weight": direction_for(listed.blocks[2].weight, 24)}) as edit, \
            torch.no_grad():
        edit.step(0.2)
        want = listed(x)
        with upstream_replay(listed, edit) as replay:
            got = [listed(x) for _ in range(3)]
            stack = replay.stats()["stacks"]["blocks"]
    assert all(torch.equal(g, want) for g in got) and (stack["hits"], stack["misses"]) == (0, 3)


def test_stack_replay_can_be_removed_twice_and_installed_again():
    model, x = sequential_and_input()
    h = torch.randn(5, 12)
    with torch.no_grad():
        want, want_block = model(x), model[2](h)
        replay = StackReplay(Owner(), "", model, 3)
        for _ in range(2):
            replay.install()
            assert not no_patches(model)
            assert torch.equal(model(x), want) and torch.equal(model(x), want)
            replay.remove()
            replay.remove()
            assert no_patches(model) and replay.cache.records == []
        replay.install()
        got = model[2](h)  # the first call after installing again: a later block on its own
        replay.remove()
    assert torch.equal(got, want_block) and replay.cache.hits == 2


def test_a_block_wrapped_by_another_replay_or_wrapper_refuses_a_second_one():
    model, x = sequential_and_input()
    with LayerEdit(model, {"3.weight": direction_for(model[3].weight, 25)}) as edit, torch.no_grad():
        edit.step(0.2)
        want = model(x)
        with upstream_replay(model, edit) as replay:
            model(x)
            with pytest.raises(slug_fast.SlugError, match="block .0 already has an instance forward"):
                with upstream_replay(model, edit):
                    pass
            assert torch.equal(model(x), want) and replay.stats()["stacks"][""]["hits"] == 1
        assert no_patches(model)


class StemAndStack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(4, 4)
        self.blocks = torch.nn.ModuleList(linears(3))

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return x


def test_a_failed_install_restores_what_was_installed_before_it():
    torch.manual_seed(0)
    model = StemAndStack().eval()
    wrapped = model.embed.forward
    model.embed.forward = wrapped  # another wrapper on the stem, installed after the stack
    with LayerEdit(model, {"blocks.2.weight": direction_for(model.blocks[2].weight, 26)}) as edit:
        replay = upstream_replay(model, edit)
        with pytest.raises(slug_fast.SlugError, match="block embed.0 already has an instance forward"):
            replay.__enter__()
    assert all("forward" not in b.__dict__ for b in model.blocks) and model.embed.__dict__["forward"] is wrapped


def test_an_upstream_replay_is_entered_once_at_a_time_and_can_be_entered_again():
    model, x = sequential_and_input()
    with LayerEdit(model, {"3.weight": direction_for(model[3].weight, 27)}) as edit, torch.no_grad():
        edit.step(0.2)
        want = model(x)
        replay = upstream_replay(model, edit, max_bytes=None)
        assert replay.budget.limit == float("inf")
        assert replay.stats() == {"bytes": 0, "peak_bytes": 0, "stacks": {}, "stems": {}, "linears": {}}
        for _ in range(2):
            with replay:
                with pytest.raises(slug_fast.SlugError, match="already active"):
                    replay.__enter__()
                assert torch.equal(model(x), want) and torch.equal(model(x), want)
                assert replay.stats()["stacks"][""]["hits"] == 1 and replay.stats()["bytes"] > 0
            assert no_patches(model)


def test_linear_caches_only_edited_weights_of_the_model_given_whose_bias_is_not_edited():
    torch.manual_seed(0)
    full = torch.nn.Module()
    full.other = torch.nn.Linear(4, 4)
    full.a = torch.nn.Sequential(*linears(4))
    x = torch.randn(3, 4)
    params = dict(full.named_parameters())
    names = ("other.weight", "a.1.weight", "a.1.bias", "a.3.weight")  # `other` is outside the replayed model
    with LayerEdit(full, {n: direction_for(params[n], i) for i, n in enumerate(names)}) as edit, torch.no_grad():
        plain, got, stats = run_steps(full.a, edit, lambda: full.a(x), STEPS, linear=True)
    for g, w in zip(got, plain):
        check(g, w, exact=False)
    assert list(stats["linears"]) == ["3"] and stats["stacks"][""]["boundary"] == 1


def test_an_upstream_weight_replaced_by_a_transposed_alias_is_not_replayed():
    """A new Parameter over the same storage (same pointer, dtype, shape and version): another tensor."""
    torch.manual_seed(0)
    model, x = torch.nn.Sequential(*linears(3)).eval(), torch.randn(3, 4)
    old = model[0].weight  # kept alive: its id is not reused
    with LayerEdit(model, {"2.weight": direction_for(model[2].weight, 28)}) as edit, torch.no_grad():
        edit.step(0.2)
        with upstream_replay(model, edit):
            model(x)
            model[0].weight = torch.nn.Parameter(old.detach().t())
            assert model[0].weight.data_ptr() == old.data_ptr() and model[0].weight._version == old._version
            got = model(x)
        want = model(x)
    assert torch.equal(got, want) and not torch.equal(model[0].weight, old)


def test_a_stack_whose_input_moves_every_pass_says_so_by_name_and_turns_off(caplog):
    model, x = sequential_and_input()
    owner = Owner()
    with torch.no_grad():
        want = [model(x + i) for i in range(5)]
    replay = StackReplay(owner, "tower", model, 3)
    replay.install()
    try:
        with torch.no_grad(), caplog.at_level(logging.DEBUG, logger="slug_fast"):
            got = []
            for i in range(5):
                owner.moves += 1
                got.append(model(x + i))
    finally:
        replay.remove()
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert replay.stats()["off"] and (replay.cache.misses, replay.bypassed) == (3, 2)
    assert [r.getMessage() for r in caplog.records] == ["replay tower: recorded calls never matched for 2 passes; off"]


def test_a_stack_repeating_a_module_is_recomputed_not_refused():
    """Sequential(b, b, edited): one module at two depths cannot be told apart by its forward, so the
    stack is not replayed; evaluation equals plain and nothing stays patched."""
    torch.manual_seed(0)
    shared = torch.nn.Linear(6, 6)
    model = torch.nn.Sequential(shared, shared, torch.nn.Linear(6, 3)).eval()
    x = torch.randn(4, 6)
    with LayerEdit(model, {"2.weight": direction_for(model[2].weight, 12)}) as edit, torch.no_grad():
        with upstream_replay(model, edit) as replay:
            got = []
            for s in STEPS:
                edit.step(s)
                got.append(model(x))
            assert replay.stats()["stacks"] == {}
        want = []
        for s in STEPS:
            edit.step(s)
            want.append(model(x))
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert no_patches(model)


def test_a_refused_stack_unpatches_the_blocks_it_had_patched():
    """A block that already has an instance forward (another wrapper) is refused; the blocks of the
    same stack before it, and every stack installed before, are unpatched; the wrapper stays."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6),
                                torch.nn.Linear(6, 3)).eval()
    wrapper = model[2].forward
    model[2].forward = wrapper  # an instance attribute, as a wrapping library sets it
    with LayerEdit(model, {"3.weight": direction_for(model[3].weight, 13)}) as edit:
        with pytest.raises(SlugError, match=r"block \.2 already has an instance forward"):
            with upstream_replay(model, edit):
                pass
    assert "forward" not in model[0].__dict__ and "forward" not in model[1].__dict__
    assert model[2].__dict__["forward"] is wrapper


def test_an_upstream_weight_given_new_strides_is_not_replayed():
    """weight.data = weight.data.t(): the same tensor object, storage and version, other strides."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Tanh(), torch.nn.Linear(12, 12), torch.nn.Tanh(),
                                torch.nn.Linear(12, 3)).eval()
    x = torch.randn(5, 8)
    with LayerEdit(model, {"4.weight": direction_for(model[4].weight, 14)}) as edit, torch.no_grad():
        with upstream_replay(model, edit):
            edit.step(0.3)
            model(x)
            model[2].weight.data = model[2].weight.data.t()
            got = model(x)
        want = model(x)
    assert torch.equal(got, want)


def test_an_upstream_parameter_replaced_is_not_replayed():
    """A new Parameter object in place of an upstream weight, with other values: recomputed."""
    model, x = sequential_and_input()
    with LayerEdit(model, {"3.weight": direction_for(model[3].weight, 15)}) as edit, torch.no_grad():
        with upstream_replay(model, edit):
            edit.step(0.3)
            model(x)
            model[0].weight = torch.nn.Parameter(model[0].weight.detach() * 2)
            got = model(x)
        want = model(x)
    assert torch.equal(got, want)


def test_find_stacks_passes_over_a_stack_repeating_a_module_and_finds_the_next():
    """A container with one module at two depths is no stack; the containers after it still are."""
    shared = torch.nn.Linear(4, 4)
    model = torch.nn.Module()
    model.tied = torch.nn.Sequential(shared, shared)
    model.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])
    assert find_stacks(model) == [("blocks", model.blocks)]
