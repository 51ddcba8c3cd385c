"""Gradient stores: full, chunked and offload give the same statistics, layer, step and delta;
the probe, the pass's safety checks and activation checkpointing."""
import weakref

import pytest
import torch

import slug_fast
from slug_fast.errors import EmptySetError, NonFiniteError, SlugError
from slug_fast.gradients import GradientPass, forward_use_order
from slug_fast.stores import ChunkedStore, FullStore, OffloadStore

from test_adapters import random_pairs, tiny_hf_clip, word_tokenizer
from test_gradients import Net, batches, mse, oracle_mean_grad
from test_unlearn import FORGET, sets

SUMS = ("param_norm", "forget_norm", "retain_norm", "dot")


def cast_batches(data, dtype):
    """open_clip (images, tokens) batches with the images in `dtype`."""
    return [(images.to(dtype), tokens) for images, tokens in data]


def loss_rise_criterion(adapter, forget, rise):
    """The concept is forgotten once the mean forget loss rose by `rise` (any dtype, any CLIP adapter)."""
    def mean_loss(model):
        with torch.no_grad():
            return sum(adapter.forget_loss(model, b).float().item() for b in forget) / len(forget)

    start = mean_loss(adapter.target)

    def criterion(model):
        value = mean_loss(adapter.target)
        return value > start + rise, {"forget_loss": value, "utility": -value}
    return criterion


def assert_same_outcome(reference, other):
    for column in SUMS:
        a, b = getattr(reference.stats, column), getattr(other.stats, column)
        torch.testing.assert_close(b, a, rtol=1e-6, atol=0)  # the requirement
        assert torch.equal(a, b), column  # and in fact bit for bit
    assert other.stats.names == reference.stats.names
    assert other.fronts == reference.fronts
    assert other.layers == reference.layers and other.step == reference.step
    assert other.delta.keys() == reference.delta.keys()
    assert all(torch.equal(other.delta[k], reference.delta[k]) for k in reference.delta)


def run_stores(model, adapter, forget, retain, criterion, **options):
    """unlearn with the full store, chunked with 2, 3 and 5 passes, and a budget that forces chunking."""
    common = dict(apply=False, progress=False, **options)
    full = slug_fast.unlearn(model, forget, retain, criterion, store="full", **common)
    assert full.memory.mode == "full" and full.memory.passes == 1
    outcomes = [full]
    for passes in (2, 3, 5):
        res = slug_fast.unlearn(model, forget, retain, criterion, store="chunked", passes=passes, **common)
        assert res.memory.mode == "chunked" and len(res.memory.groups) == passes
        outcomes.append(res)
    probe = outcomes[1].memory
    fixed = sum(v for part, v in probe.predicted.items() if part not in ("gradients", "kept"))
    budget = fixed + probe.weight_bytes  # below the full store's need of about 2-3x the weights
    res = slug_fast.unlearn(model, forget, retain, criterion, memory_budget=budget, **common)
    assert res.memory.mode == "chunked" and res.memory.budget_bytes == budget
    assert res.memory.predicted_peak_bytes <= budget < res.memory.predicted_full_bytes
    outcomes.append(res)
    return outcomes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_open_clip_every_store_gives_the_same_answer(digits_model, digits_trained, dtype):
    model = digits_model.to(dtype)
    forget, retain = (cast_batches(b, dtype) for b in sets(digits_trained[1], FORGET))
    adapter = slug_fast.adapters.get_adapter(model)
    criterion = loss_rise_criterion(adapter, forget, 0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    full, *others = run_stores(model, adapter, forget, retain, criterion)
    assert len(full.candidates) > 1  # "best" searched several front layers: their directions were kept
    for other in others:
        assert_same_outcome(full, other)
    # without a budget every front layer's forget gradient was kept; the tight budget may
    # have had room for only some of them and recomputed the rest in one forget-only pass
    assert not any(other.memory.final_pass for other in others[:-1])
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hf_clip_every_store_gives_the_same_answer_with_grouped_layers(dtype):
    model, tok = tiny_hf_clip(), word_tokenizer()
    model = model.to(dtype)
    adapter = slug_fast.adapters.get_adapter(model, tokenizer=tok)
    gen = torch.Generator().manual_seed(3)
    forget = adapter.make_batches(random_pairs(16, gen, ["a photo of the cat"]), 8)
    retain = adapter.make_batches(random_pairs(32, gen, ["a dog", "the car", "two", "a photo of a dog"]), 16)
    forget = [{k: (v.to(dtype) if k == "pixel_values" else v) for k, v in b.items()} for b in forget]
    retain = [{k: (v.to(dtype) if k == "pixel_values" else v) for k, v in b.items()} for b in retain]
    criterion = loss_rise_criterion(adapter, forget, 0.02)
    full, *others = run_stores(model, adapter, forget, retain, criterion, tokenizer=tok)
    for other in others:
        assert_same_outcome(full, other)
    assert not any(other.memory.final_pass for other in others[:-1])  # q/k/v kept with their front layer
    for res in (full, *others):  # q/k/v (fc1/fc2) never split across passes
        for groups in [res.memory.groups]:
            assert sum(groups) == len(full.stats.names)


def gradient_sets(gen):
    model = Net()
    return model, batches(3, gen), batches(2, gen, size=7)


def test_chunked_recomputes_what_it_could_not_keep(gen):
    model, forget, retain = gradient_sets(gen)
    names = [n for n, _ in model.named_parameters()]
    full = slug_fast.compute_gradients(model, forget, retain, mse, params=names, progress=False)
    keep_all = ChunkedStore(passes=3, keep=lambda seen: seen.names, keep_bytes=0)
    chunked = slug_fast.compute_gradients(model, forget, retain, mse, params=names, progress=False, store=keep_all)
    assert chunked.mode == "chunked" and keep_all.passes == 3 and not keep_all.final_pass
    stats_full, stats_chunked = full.layer_stats(), chunked.layer_stats()
    for column in SUMS:
        assert torch.equal(getattr(stats_full, column), getattr(stats_chunked, column))
    got = chunked.directions(["mid.weight", "out.weight"])  # nothing fit: one forget-only pass
    assert keep_all.final_pass and keep_all.passes == 4
    assert all(torch.equal(got[n], full.forget[n]) for n in got)
    with pytest.raises(SlugError, match="never holds every layer's gradient at once"):
        chunked.forget
    with torch.no_grad():
        model.mid.weight.add_(1.0)
    with pytest.raises(SlugError, match="parameters changed since the gradient pass began"):
        chunked.directions(["inp.weight"])


def test_chunked_keeps_what_the_policy_names_within_its_allowance(gen):
    model, forget, retain = gradient_sets(gen)
    full = slug_fast.compute_gradients(model, forget, retain, mse, progress=False)
    store = ChunkedStore(passes=2, keep=lambda seen: [n for n in ("out.weight", "inp.weight") if n in seen.names])
    chunked = slug_fast.compute_gradients(model, forget, retain, mse, progress=False, store=store)
    assert set(store.kept) == {"out.weight", "inp.weight"}
    got = chunked.directions(["out.weight", "inp.weight"])
    assert not store.final_pass and all(torch.equal(got[n], full.forget[n]) for n in got)


def test_offload_host_sums_equal_the_full_store(gen):
    """The offload store's hooks, host sums and streamed statistics, on the CPU (its CUDA run is
    test_offload_on_cuda); streaming a few bytes at a time forces one layer per group."""
    model, forget, retain = gradient_sets(gen)
    full = slug_fast.compute_gradients(model, forget, retain, mse, progress=False)
    store = OffloadStore(stream_bytes=1)
    off = slug_fast.compute_gradients(model, forget, retain, mse, progress=False, store=store)
    a, b = full.layer_stats(), off.layer_stats()
    for column in SUMS:
        assert torch.equal(getattr(a, column), getattr(b, column))
    assert all(torch.equal(off.directions([n])[n], full.forget[n]) for n in full.names)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the offload store's pinned copies need CUDA")
def test_offload_on_cuda(gen):
    model, forget, retain = gradient_sets(gen)
    model = model.cuda()
    forget = [(x.cuda(), y.cuda()) for x, y in forget]
    retain = [(x.cuda(), y.cuda()) for x, y in retain]
    full = slug_fast.compute_gradients(model, forget, retain, mse, progress=False)
    off = slug_fast.compute_gradients(model, forget, retain, mse, progress=False, store=OffloadStore())
    for column in SUMS:
        assert torch.equal(getattr(full.layer_stats(), column), getattr(off.layer_stats(), column))
    direction = off.directions(["mid.weight"])["mid.weight"]
    assert direction.device.type == "cpu" and torch.equal(direction, full.forget["mid.weight"].cpu())


def test_store_names_are_checked():
    model = Net()
    with pytest.raises(SlugError, match="chunked store needs its number of passes"):
        slug_fast.compute_gradients(model, [], None, mse, store="chunked")
    with pytest.raises(SlugError, match="store must be 'full', 'offload'"):
        slug_fast.compute_gradients(model, [], None, mse, store="disk")
    with pytest.raises(SlugError, match="passes= .* or groups="):
        ChunkedStore()
    with pytest.raises(SlugError, match="positive integer"):
        ChunkedStore(passes=0)
    assert FullStore().mode == "full"


def test_chunked_reads_each_set_again_and_insists_it_is_the_same(gen):
    model, forget, retain = gradient_sets(gen)
    with pytest.raises(SlugError, match="one-shot iterator"):
        slug_fast.compute_gradients(model, iter(forget), retain, mse, store=ChunkedStore(passes=2))
    with pytest.raises(SlugError, match="the retain batches are a one-shot iterator"):
        slug_fast.unlearn(model, forget, (b for b in retain), lambda m: True, forget_loss=mse, retain_loss=mse,
                          store="chunked", passes=2, progress=False)

    class Shuffled:  # re-iterable, but in another order each time
        def __init__(self, items):
            self.items, self.turn = items, 0

        def __iter__(self):
            self.turn += 1
            return iter(self.items[self.turn % len(self.items):] + self.items[:self.turn % len(self.items)])

    with pytest.raises(SlugError, match="forget batches differ from the first pass at batch 0"):
        slug_fast.compute_gradients(model, Shuffled(forget), retain, mse, progress=False,
                                    store=ChunkedStore(passes=2))

    class Changing:  # once read to the end, one batch fewer or one more
        def __init__(self, items, change):
            self.items, self.change, self.done = items, change, False

        def __iter__(self):
            yield from (self.items if not self.done else self.items[:-1] if self.change < 0 else
                        self.items + self.items[:1])
            self.done = True

    with pytest.raises(SlugError, match="retain set had 2 batches in the first pass and 1 now"):
        slug_fast.compute_gradients(model, forget, Changing(retain, -1), mse, progress=False,
                                    store=ChunkedStore(passes=2))
    with pytest.raises(SlugError, match="retain set had 2 batches in the first pass and more now"):
        slug_fast.compute_gradients(model, forget, Changing(retain, +1), mse, progress=False,
                                    store=ChunkedStore(passes=2))
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


class Exp(torch.nn.Module):
    """exp saves its own output for backward: the case where a saved tensor refers to its grad_fn."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.seen = []

    def forward(self, x):
        y = self.lin(x).exp()
        self.seen.append(weakref.ref(y))
        return y


def test_probe_measures_activations_and_keeps_no_graph_alive(gen):
    model = Exp()
    x = torch.randn(64, 4, generator=gen)
    run = GradientPass(model, [x], [x], lambda m, b: m(b).sum(), None, ["lin.weight", "lin.bias"])
    probe = run.probe()
    assert probe.use_order == ["lin.weight", "lin.bias"] and run.depth_order == probe.use_order
    assert probe.activation_bytes >= 64 * 4 * 4 and probe.largest_activation == 64 * 4 * 4
    assert model.seen and model.seen[-1]() is None  # the probe's graph is gone with its tensors
    assert all(p.grad is None for p in model.parameters())


class TwoExps(torch.nn.Module):
    """Two saved outputs of different sizes (exp saves its result; a linear layer its input, which is
    the first exp's result, and its weight): 64x3 and 64x2 floats, apart from the batch and weights."""

    def __init__(self):
        super().__init__()
        self.lin1, self.lin2 = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.lin2(self.lin1(x).exp()).exp()


class FixedMeter:
    """A PeakMeter stand-in reporting set levels (the real one reads the process's RSS)."""

    def __init__(self, grown, peak):
        self.grown, self.level = grown, peak

    def __call__(self, device):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def now(self):
        return self.grown

    def peak(self):
        return self.level


@pytest.mark.parametrize("grown, peak, activations, transient", [
    (0, 0, 64 * 3 * 4 + 64 * 2 * 4, 0),  # the saved tensors: neither the batch nor a weight counts
    (5000, 12000, 5000, 7000),  # memory grew more than autograd saved (checkpointed regions)
    (5000, 100, 5000, 0),
])
def test_probe_counts_saved_tensors_exactly_and_the_forward_transient(gen, monkeypatch, grown, peak, activations,
                                                                       transient):
    import slug_fast.memory

    monkeypatch.setattr(slug_fast.memory, "PeakMeter", FixedMeter(grown, peak))
    model = TwoExps()
    x = torch.randn(64, 4, generator=gen)
    run = GradientPass(model, [x], None, lambda m, b: m(b).sum(), None, [n for n, _ in model.named_parameters()])
    probe = run.probe()
    assert (probe.activation_bytes, probe.largest_activation, probe.forward_transient) == \
        (activations, 64 * 3 * 4, transient)
    assert probe.use_order == ["lin1.weight", "lin1.bias", "lin2.weight", "lin2.bias"]

    nothing_saved = GradientPass(model, [x], None, lambda m, b: m.lin1.weight.sum(), None, ["lin1.weight"]).probe()
    assert (nothing_saved.activation_bytes, nothing_saved.largest_activation) == (grown, 0)


def test_probe_takes_a_loss_that_differentiates_inside_and_checks_the_loss(gen):
    model = TwoExps()
    x = torch.randn(8, 4, generator=gen)
    names = [n for n, _ in model.named_parameters()]

    def penalty(m, b):  # a gradient penalty: autograd unpacks the saved tensors during the forward
        g, = torch.autograd.grad(m(b).sum(), m.lin1.weight, create_graph=True)
        return g.pow(2).sum()

    assert GradientPass(model, [x], None, penalty, None, names).probe().use_order[:2] == ["lin1.weight", "lin1.bias"]
    with pytest.raises(SlugError, match=r"^forget loss must return a scalar tensor, got shape \(8, 2\)$"):
        GradientPass(model, [x], None, lambda m, b: m(b), None, names).probe()
    with pytest.raises(NonFiniteError, match="^forget loss is nan at batch 0;"):
        GradientPass(model, [x], None, lambda m, b: m(b).sum() * float("nan"), None, names).probe()
    with pytest.raises(EmptySetError, match="the forget set is empty"):
        GradientPass(model, [], None, lambda m, b: m(b).sum(), None, names).probe()


def test_probe_puts_back_the_first_batch_of_a_one_shot_iterator(gen):
    model, forget, retain = gradient_sets(gen)
    full = slug_fast.compute_gradients(model, forget, retain, mse, progress=False)
    run = GradientPass(model, iter(forget), retain, mse, None, full.names)
    run.probe()
    store = FullStore()
    store.collect(run)
    assert run.counts == {"forget": 3, "retain": 2}
    assert all(torch.equal(store.forget[n], full.forget[n]) for n in full.names)


def test_forward_use_order_follows_the_forward_not_the_parameter_list(gen):
    class Backwards(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.last = torch.nn.Linear(3, 3)
            self.first = torch.nn.Linear(3, 3)
            self.unused = torch.nn.Linear(3, 3)

        def forward(self, x):
            h = self.first(x)
            return self.last(h) + self.first(h)  # `first` used twice: its first use counts

    model = Backwards()
    loss = model(torch.randn(2, 3, generator=gen)).sum()
    order = forward_use_order(loss, dict(model.named_parameters()))
    assert order == ["unused.weight", "unused.bias", "first.weight", "first.bias", "last.weight", "last.bias"]


@pytest.mark.parametrize("user_setting", [True, False])
def test_multihead_attention_fast_path_is_off_during_passes_and_restored(gen, user_setting):
    model, forget, retain = gradient_sets(gen)
    seen = []

    def loss(m, batch):
        seen.append(torch.backends.mha.get_fastpath_enabled())
        return mse(m, batch)

    torch.backends.mha.set_fastpath_enabled(user_setting)
    try:
        slug_fast.compute_gradients(model, forget, retain, loss, progress=False, store=ChunkedStore(passes=2))
        assert seen and not any(seen)
        assert torch.backends.mha.get_fastpath_enabled() is user_setting
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


def test_a_budget_no_plan_fits_is_refused_before_any_gradient(digits_model, digits_trained):
    forget, retain = sets(digits_trained[1], FORGET)
    calls = []
    adapter = slug_fast.adapters.get_adapter(digits_model)

    def counting(model, batch):
        calls.append(torch.is_grad_enabled())
        return adapter.forget_loss(model, batch)

    before = {n: p.detach().clone() for n, p in digits_model.named_parameters()}
    with pytest.raises(SlugError, match=r"memory_budget 1000 B is too small: the smallest plan \(chunked with one "
                                        r"layer per pass\) needs .* raise memory_budget to at least \d+ bytes"):
        slug_fast.unlearn(digits_model, forget, retain, lambda m: True, forget_loss=counting,
                          retain_loss=adapter.retain_loss, memory_budget=1000, progress=False)
    assert len(calls) == 1  # the probe's one forward; no pass ran
    assert all(torch.equal(p.detach(), before[n]) and p.grad is None for n, p in digits_model.named_parameters())
    with pytest.raises(SlugError, match="memory_budget is bytes"):
        slug_fast.unlearn(digits_model, forget, retain, lambda m: True, memory_budget="lots")
    with pytest.raises(SlugError, match="passes= sets the chunked store's number of passes"):
        slug_fast.unlearn(digits_model, forget, retain, lambda m: True, passes=3)
    with pytest.raises(SlugError, match="offload store keeps gradients in host memory"):
        slug_fast.unlearn(digits_model, forget, retain, lambda m: True, store="offload")


def block_calls(module):
    """Counts calls of `module` (a pre-hook: checkpointing's recomputation may stop early inside it)."""
    calls = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def test_open_clip_checkpointing_recomputes_gives_the_same_gradients_and_restores(digits_model, digits_trained):
    forget, retain = sets(digits_trained[1], FORGET)
    adapter = slug_fast.adapters.get_adapter(digits_model)
    names = [n for n, p in digits_model.named_parameters() if slug_fast.is_eligible(n, p.shape)]
    args = (digits_model, forget, retain, adapter.forget_loss, adapter.retain_loss)
    calls = block_calls(digits_model.visual.transformer.resblocks[0])
    plain = slug_fast.compute_gradients(*args, params=names, progress=False)
    n_plain = len(calls)
    ckpt = slug_fast.compute_gradients(*args, params=names, progress=False,
                                       checkpointing=adapter.activation_checkpointing)
    assert len(calls) - n_plain == 2 * n_plain  # each block ran again in backward
    assert all(torch.equal(plain.forget[n], ckpt.forget[n]) and torch.equal(plain.retain[n], ckpt.retain[n])
               for n in names)
    assert digits_model.visual.transformer.grad_checkpointing is False
    assert digits_model.transformer.grad_checkpointing is False


def test_hf_checkpointing_acts_in_eval_mode_and_restores_every_flag():
    model, tok = tiny_hf_clip(), word_tokenizer()
    adapter = slug_fast.adapters.get_adapter(model, tokenizer=tok)
    gen = torch.Generator().manual_seed(4)
    forget = adapter.make_batches(random_pairs(8, gen, ["a photo of the cat"]), 4)
    retain = adapter.make_batches(random_pairs(8, gen, ["a dog", "the car"]), 8)
    names = [n for n, p in model.named_parameters() if slug_fast.is_eligible(n, p.shape)]
    args = (model, forget, retain, adapter.forget_loss, adapter.retain_loss)
    layer = model.vision_model.encoder.layers[1]
    calls = block_calls(layer.mlp)
    model.text_model.encoder.layers[0].train()  # a user's odd mode, to be restored
    modes = {m: m.training for m in model.modules()}
    plain = slug_fast.compute_gradients(*args, params=names, progress=False)
    n_plain = len(calls)
    ckpt = slug_fast.compute_gradients(*args, params=names, progress=False,
                                       checkpointing=adapter.activation_checkpointing)
    assert len(calls) - n_plain == 2 * n_plain
    assert all(torch.equal(plain.forget[n], ckpt.forget[n]) and torch.equal(plain.retain[n], ckpt.retain[n])
               for n in names)
    assert {m: m.training for m in model.modules()} == modes
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert not any("_gradient_checkpointing_func" in m.__dict__ for m in model.modules())


def test_hf_checkpointing_context_flags_only_the_layers_and_restores_them():
    from transformers.modeling_layers import GradientCheckpointingLayer

    from slug_fast.adapters.checkpointing import hf_checkpointing

    model = tiny_hf_clip()
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    with hf_checkpointing(model):
        assert layers and all(m.training and m.gradient_checkpointing for m in layers)
        assert not any(m.training for m in model.modules() if not isinstance(m, GradientCheckpointingLayer))
    assert not any(m.training or m.gradient_checkpointing for m in layers)
    assert not any("gradient_checkpointing" in m.__dict__ for m in layers)


def test_checkpointing_of_an_unknown_model_is_refused():
    from slug_fast.adapters import GenericAdapter

    with pytest.raises(SlugError, match="has no activation-checkpointing switch slug_fast knows"):
        with GenericAdapter(Net()).activation_checkpointing():
            pass


def test_unlearn_with_checkpointing_and_a_budget_reports_its_memory(digits_model, digits_trained):
    forget, retain = sets(digits_trained[1], FORGET)
    adapter = slug_fast.adapters.get_adapter(digits_model)
    criterion = loss_rise_criterion(adapter, forget, 0.05)
    plain = slug_fast.unlearn(digits_model, forget, retain, criterion, apply=False, progress=False)
    ckpt = slug_fast.unlearn(digits_model, forget, retain, criterion, apply=False, progress=False,
                             checkpointing=True, memory_budget="1GB")
    assert_same_outcome(plain, ckpt)
    mem = ckpt.memory.to_dict()
    assert mem["mode"] == "full" and mem["checkpointing"] and mem["budget_bytes"] == 10**9
    assert 0 < mem["activation_bytes"] and mem["predicted_peak_bytes"] <= 10**9
    assert mem["measured_peak_bytes"] >= 0 and mem["measured_by"] == "peak RSS (VmHWM)"
    assert plain.memory.predicted_peak_bytes is None  # no budget: no probe, no prediction
    assert plain.to_dict()["memory"]["mode"] == "full"


def test_chunked_passes_record_one_forward_and_compute_each_gradient_once(gen):
    """Every pass sees the same requires_grad flags (the same forward graph), and backward
    stops at the pass's group: each layer's gradient is computed in its own pass only."""
    model, forget, retain = gradient_sets(gen)
    names = ["inp.weight", "mid.weight", "mid.bias", "out.weight"]
    computed = {n: 0 for n in names}
    for n, p in model.named_parameters():
        if n in computed:
            p.register_hook(lambda g, n=n: computed.__setitem__(n, computed[n] + 1))
    flags = []

    def loss(m, batch):
        flags.append(tuple(p.requires_grad for p in m.parameters()))
        return mse(m, batch)

    store = ChunkedStore(passes=3, keep=lambda seen: seen.names)
    slug_fast.compute_gradients(model, forget, retain, loss, params=names, progress=False, store=store)
    assert len(store.groups) == 3 and not store.final_pass
    assert computed == {n: len(forget) + len(retain) for n in names}
    assert len(set(flags)) == 1 and sum(flags[0]) == len(names)


def test_a_budget_that_needs_many_passes_says_checkpointing_would_help(gen, caplog):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(20)])
    x = torch.randn(4, 256, generator=gen)

    def forget_loss(m, batch):
        return m(batch).pow(2).mean()

    def retain_loss(m, batch):
        return m(batch).abs().mean()

    kw = dict(forget_loss=forget_loss, retain_loss=retain_loss, apply=False, progress=False)
    for _ in range(2):  # the second probe's figures: the first run in a process also grows the allocator
        first = slug_fast.unlearn(model, [x], [x], lambda m: True, store="chunked", passes=2, **kw).memory
    fixed = sum(v for part, v in first.predicted.items() if part not in ("gradients", "kept"))
    layer = 256 * 256 * 4  # bytes of one weight; its pass holds twice that (gradient and running sum)
    budget = fixed + layer + 2 * 2 * layer  # room to keep one direction and two layers' gradients per pass
    with caplog.at_level("INFO", logger="slug_fast"):
        result = slug_fast.unlearn(model, [x], [x], lambda m: True, memory_budget=budget, **kw)
    passes = len(result.memory.groups)
    assert result.memory.mode == "chunked" and passes >= 9  # 10, one fewer if the probe measured less
    assert any(f"gradient store chunked: {passes} pass(es)" in r.getMessage() for r in caplog.records)
    assert any(r.levelname == "WARNING" and "checkpointing=True or smaller batches" in r.getMessage()
               for r in caplog.records)


def test_stores_that_take_statistics_during_their_passes_keep_their_backend(gen):
    model, forget, retain = gradient_sets(gen)
    full = slug_fast.compute_gradients(model, forget, retain, mse, progress=False).layer_stats("torch")
    for store in (ChunkedStore(passes=2, backend="torch"), OffloadStore(backend="torch")):
        grads = slug_fast.compute_gradients(model, forget, retain, mse, progress=False, store=store)
        stats = grads.layer_stats()
        assert stats.backend == "torch" and all(torch.equal(getattr(stats, c), getattr(full, c)) for c in SUMS)
        with pytest.raises(SlugError, match="took its statistics with backend 'torch' during the passes"):
            grads.layer_stats("cpp")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_offload_host_sums_of_every_batch_in_the_layers_dtype(gen, dtype):
    """Several batches of a float64 or 16-bit model: the host sums hold each batch's gradient exactly
    (float64 kept in float64, 16-bit summed in float32 from the first batch on), so the offload
    means equal the full store's bit for bit and a float64 oracle to the layers' precision."""
    model = Net().to(dtype)
    forget = [(x.to(dtype), y.to(dtype)) for x, y in batches(4, gen)]
    retain = [(x.to(dtype), y.to(dtype)) for x, y in batches(3, gen, size=7)]
    names = [n for n, _ in model.named_parameters()]
    full = slug_fast.compute_gradients(model, forget, retain, mse, progress=False)
    off = slug_fast.compute_gradients(model, forget, retain, mse, progress=False, store=OffloadStore(stream_bytes=1))
    for column in SUMS:
        assert torch.equal(getattr(full.layer_stats(), column), getattr(off.layer_stats(), column)), column
    oracle = oracle_mean_grad(model, forget, names)
    tol = 1e-12 if dtype == torch.float64 else 0.03  # relative, of the whole layer's gradient
    for n in names:
        got = off.directions([n])[n]
        assert got.dtype == dtype and torch.equal(got, full.forget[n]), n
        assert (got.double() - oracle[n]).norm() <= tol * oracle[n].norm(), n
    assert oracle["inp.weight"].norm() > 0


def test_unlearn_plans_and_builds_the_store_its_plan_names(digits_model, digits_trained, monkeypatch, caplog):
    """The plan unlearn logs and reports, and the store it builds from it (spied): the full store
    without a budget (no probe forward), the chunked one with the plan's groups, deepest layers first,
    and its allowance for kept gradients; a budget as a multiple of the differentiated weights."""
    import logging
    import sys

    un = sys.modules["slug_fast.unlearn"]  # the module (slug_fast.unlearn is also the function)
    built = []

    def spy(cls):
        class Spy(cls):
            def __init__(self, *args, **kwargs):
                built.append((cls.__name__, kwargs))
                super().__init__(*args, **kwargs)
        return Spy

    for name in ("FullStore", "ChunkedStore", "OffloadStore"):
        monkeypatch.setattr(un, name, spy(getattr(un, name)))
    forget, retain = sets(digits_trained[1], FORGET)
    common = dict(apply=False, progress=False)
    for store in ("full", "auto"):
        with caplog.at_level(logging.INFO, logger="slug_fast"):
            res = slug_fast.unlearn(digits_model, forget, retain, lambda m: True, store=store, **common)
        assert built == [("FullStore", {})] and res.memory.mode == "full"
        built.clear()
        assert res.memory.activation_bytes is None and list(res.memory.predicted) == ["gradients"]
        described = [r.getMessage() for r in caplog.records if r.getMessage().startswith("gradient store full:")]
        assert len(described) == 1 and " above the loaded model on cpu (gradients " in described[0]
        caplog.clear()

    res = slug_fast.unlearn(digits_model, forget, retain, lambda m: True, store="chunked", passes=2, **common)
    (kind, kwargs), = built
    assert kind == "ChunkedStore" and kwargs["keep_bytes"] is None  # no budget: every front layer is kept
    built.clear()
    fixed = sum(v for part, v in res.memory.predicted.items() if part not in ("gradients", "kept"))
    times = (fixed + 1.5 * res.memory.weight_bytes) / res.memory.weight_bytes  # between chunked's need and full's
    res = slug_fast.unlearn(digits_model, forget, retain, lambda m: True, memory_budget=f"{times:.4f}x", **common)
    memory = res.memory
    assert memory.budget_bytes == pytest.approx(times * memory.weight_bytes, rel=1e-4) and memory.mode == "chunked"
    (kind, kwargs), = built
    assert kind == "ChunkedStore" and kwargs["keep_bytes"] == memory.predicted["kept"]
    assert [len(g) for g in kwargs["groups"]] == memory.groups and kwargs["backend"] == "auto"
    names = [n for g in kwargs["groups"] for n in g]
    names_probe = GradientPass(digits_model, forget, retain, slug_fast.adapters.get_adapter(digits_model).forget_loss, None,
                               sorted(names)).probe().use_order
    assert names == names_probe[::-1]  # deepest first (no layer is grouped with another here)


def test_unlearn_passes_its_adapter_eligibility_and_forward_transient_on(digits_model, digits_trained, monkeypatch):
    """An adapter named explicitly is the one used (not the detected one); `eligible` picks the
    layers; the probe's forward transient reaches the plan's prediction."""
    import slug_fast.memory

    forget, retain = sets(digits_trained[1], FORGET)
    ad = slug_fast.adapters.get_adapter(digits_model)
    common = dict(apply=False, progress=False)
    generic = slug_fast.unlearn(digits_model, forget, retain, lambda m: True, adapter="generic",
                                forget_loss=ad.forget_loss, retain_loss=ad.retain_loss, **common)
    assert generic.backends["adapter"] == "generic"
    only = slug_fast.unlearn(digits_model, forget, retain, lambda m: True,
                             eligible=lambda name, shape: name == "visual.proj", tower="vision", **common)
    assert only.stats.names == ["visual.proj"] and only.layers == ["visual.proj"]
    monkeypatch.setattr(slug_fast.memory, "PeakMeter", FixedMeter(0, 10**9))  # the probe's meter only
    res = slug_fast.unlearn(digits_model, forget, retain, lambda m: True, store="chunked", passes=2, **common)
    assert res.memory.predicted["transient"] >= 10**9  # the forward rose 1 GB above what it kept


def test_a_plan_of_many_passes_warns_unless_they_were_asked_for_or_checkpointing_is_on(gen, monkeypatch, caplog):
    """More than 2 x MAX_PREFERRED_PASSES passes chosen by the budget: a warning naming the count
    and the remedies; not at exactly that many, not when `passes=` asked for them, not with
    checkpointing (the plan's count is forced through a spy on the real planner)."""
    import logging
    import sys

    from slug_fast.memory import MAX_PREFERRED_PASSES, format_bytes

    un = sys.modules["slug_fast.unlearn"]
    real_plan, forced = un._plan_memory, {}

    def plan_with(run, names, budget_spec, store, passes, *rest):
        return real_plan(run, names, budget_spec, "chunked", forced["passes"], *rest)

    monkeypatch.setattr(un, "_plan_memory", plan_with)
    class Deep(torch.nn.Sequential):  # ten blocks, checkpointed as open_clip's are when switched on
        grad_checkpointing = False

        def set_grad_checkpointing(self, enable=True):
            self.grad_checkpointing = enable

        def forward(self, x):
            for block in self:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing \
                    else block(x)
            return x

    model = Deep(*[torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh()) for _ in range(10)])
    data = [(torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen)) for _ in range(2)]
    many = 2 * MAX_PREFERRED_PASSES

    def warnings(planned, **options):
        forced["passes"] = planned
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="slug_fast"):
            res = slug_fast.unlearn(model, data, data, lambda m: True, forget_loss=mse, retain_loss=mse,
                                    apply=False, progress=False, **options)
        assert res.memory.passes == planned and res.memory.mode == "chunked"
        forced["activations"] = format_bytes(res.memory.activation_bytes)
        return [r.getMessage() for r in caplog.records if "passes" in r.getMessage()]

    warned, = warnings(many + 1)
    assert warned == ("the budget leaves room for few gradients beside one batch's activations "
                      f"({forced['activations']}): {many + 1} passes; checkpointing=True or smaller batches would "
                      "need fewer")
    assert warnings(many) == [] and warnings(2) == []
    assert warnings(many + 1, checkpointing=True) == []
    assert warnings(many + 1, store="chunked", passes=many + 1) == []


def test_the_chunked_store_keeps_the_running_fronts_deepest_first_and_honours_backend_torch(gen, monkeypatch):
    """What unlearn asks the chunked store to keep after each group: the Pareto front of the
    layers seen so far (brute force over their statistics), deepest in the forward pass first,
    even when the model registers its modules in another order; with backend="torch" every
    front, the running ones too, is taken by the torch reference."""
    import sys

    un = sys.modules["slug_fast.unlearn"]
    kept_lists, backends = [], []

    class Spy(un.ChunkedStore):
        def __init__(self, *args, keep, **kwargs):
            def recorded(seen):
                wanted = keep(seen)
                kept_lists.append((seen, wanted))
                return wanted
            super().__init__(*args, keep=recorded, **kwargs)

    def pareto_spy(alignment, importance, backend="auto"):
        backends.append(backend)
        return real_pareto(alignment, importance, backend=backend)

    real_pareto = un.pareto_front
    monkeypatch.setattr(un, "ChunkedStore", Spy)
    monkeypatch.setattr(un, "pareto_front", pareto_spy)

    class Shuffled(torch.nn.Module):  # registered in neither forward nor reverse order; the forward runs l0 .. l5
        def __init__(self):
            super().__init__()
            for i in (2, 5, 0, 3, 1, 4):
                self.add_module(f"l{i}", torch.nn.Linear(6, 3 if i == 5 else 6))

        def forward(self, x):
            for i in range(5):
                x = torch.tanh(getattr(self, f"l{i}")(x))
            return self.l5(x)

    forward = [f"l{i}.weight" for i in range(6)]
    longest = 0
    for _ in range(20):  # fresh data until a front holds two layers or more: an order to check
        kept_lists.clear()
        backends.clear()
        model = Shuffled()
        forget, retain = batches(3, gen), batches(2, gen, size=7)
        res = slug_fast.unlearn(model, forget, retain, lambda m: True, forget_loss=mse, retain_loss=mse,
                                store="chunked", passes=3, backend="torch", apply=False, progress=False)
        assert len(kept_lists) == 3 and set(backends) == {"torch"}
        for seen, wanted in kept_lists:
            usable = [n for n in seen.names if n in forward and seen.importance[seen.index(n)] > 0]
            a, m = ([float(getattr(seen, c)[seen.index(n)]) for n in usable] for c in ("alignment", "importance"))
            front = [n for i, n in enumerate(usable)
                     if not any(a[j] < a[i] and m[j] > m[i] for j in range(len(usable)))]
            assert wanted == sorted(front, key=forward.index, reverse=True)
        assert res.fronts == {"model": sorted(kept_lists[-1][1], key=list(res.stats.names).index)}
        longest = max(longest, *(len(w) for _, w in kept_lists))
        if longest >= 2:
            break
    assert longest >= 2


def test_unlearn_reports_the_full_stores_counted_gradient_peak_and_its_phase_times(gen):
    """memory.gradient_peak_bytes is the full store's own count (the same pass run by hand);
    each phase's seconds is a duration within the call, the phases within the total."""
    import time

    model, forget, retain = gradient_sets(gen)
    start = time.perf_counter()
    res = slug_fast.unlearn(model, forget, retain, lambda m: True, forget_loss=mse, retain_loss=mse, store="full",
                            apply=False, progress=False)
    wall = time.perf_counter() - start
    by_hand = FullStore()
    slug_fast.compute_gradients(model, forget, retain, mse, params=list(res.stats.names), progress=False,
                                store=by_hand)
    assert by_hand.peak_bytes > 0 and res.memory.gradient_peak_bytes == by_hand.peak_bytes
    phases = [res.seconds[p] for p in ("gradients", "select", "search")]
    assert all(isinstance(s, float) and 0 <= s <= res.seconds["total"] for s in phases)
    assert sum(phases) <= res.seconds["total"] <= wall
