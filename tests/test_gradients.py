"""The gradient pass against per-batch torch.autograd.grad in float64, and what it restores."""
import pytest
import torch

import slug_fast
from slug_fast.errors import NonFiniteError, SlugError


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(6, 12)
        self.drop = torch.nn.Dropout(0.5)
        self.mid = torch.nn.Linear(12, 12)
        self.out = torch.nn.Linear(12, 3)
        self.unused = torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.mid(self.drop(torch.tanh(self.inp(x))))))


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def batches(n, gen, size=5):
    return [(torch.randn(size, 6, generator=gen), torch.randn(size, 3, generator=gen)) for _ in range(n)]


def oracle_mean_grad(model, data, names):
    """Mean over batches of torch.autograd.grad in float64 on a copy in eval mode."""
    ref = Net().double()
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    ref.eval()
    params = [dict(ref.named_parameters())[n] for n in names]
    total = [torch.zeros_like(p) for p in params]
    for x, y in data:
        grads = torch.autograd.grad(mse(ref, (x.double(), y.double())), params, allow_unused=True)
        total = [t + (g if g is not None else 0) for t, g in zip(total, grads)]
    return {n: t / len(data) for n, t in zip(names, total)}


def test_mean_of_per_batch_gradients_matches_float64_oracle(gen):
    model = Net()
    forget, retain = batches(3, gen), batches(4, gen, size=7)
    grads = slug_fast.compute_gradients(model, forget, retain, mse, progress=False)
    names = [n for n, _ in model.named_parameters()]
    assert grads.names == names and grads.n_forget_batches == 3 and grads.n_retain_batches == 4
    for which, data in (("forget", forget), ("retain", retain)):
        expected = oracle_mean_grad(model, data, names)
        got = getattr(grads, which)
        for n in names:
            assert got[n].dtype == torch.float32
            torch.testing.assert_close(got[n].double(), expected[n], rtol=1e-5, atol=1e-7)
    assert torch.count_nonzero(grads.forget["unused.weight"]) == 0


def test_modes_flags_and_existing_grads_are_restored(gen):
    model = Net()
    model.train()
    model.drop.eval()
    model.inp.weight.requires_grad_(False)
    model.mid.weight.grad = torch.full_like(model.mid.weight, 7.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = slug_fast.compute_gradients(model, batches(2, gen), batches(2, gen), mse, progress=False)
    assert "inp.weight" not in grads.names  # default: only what requires grad
    assert model.training and not model.drop.training and model.out.training
    assert not model.inp.weight.requires_grad and model.mid.weight.requires_grad
    assert torch.equal(model.mid.weight.grad, torch.full_like(model.mid.weight, 7.0))
    assert model.out.weight.grad is None
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_failing_pass_restores_modes_flags_grads_and_the_attention_fast_path(gen):
    model = Net().train()
    model.inp.weight.requires_grad_(False)
    model.mid.weight.grad = torch.full_like(model.mid.weight, 7.0)
    seen = []

    def fails_on_the_second_batch(m, batch):
        seen.append((m.training, m.inp.weight.requires_grad, m.mid.weight.grad,
                     torch.backends.mha.get_fastpath_enabled()))
        return mse(m, batch) * (float("nan") if len(seen) == 2 else 1.0)

    fastpath = torch.backends.mha.get_fastpath_enabled()
    with pytest.raises(NonFiniteError, match="forget loss is nan at batch 1"):
        slug_fast.compute_gradients(model, batches(3, gen), None, fails_on_the_second_batch, params=["inp.weight"],
                                    progress=False)
    assert seen[0] == (False, True, None, False)  # inside: eval mode, only inp.weight differentiated, no .grad
    assert all(m.training for m in model.modules()) and not model.inp.weight.requires_grad
    assert model.mid.weight.requires_grad and torch.equal(model.mid.weight.grad, torch.full_like(model.mid.weight, 7.0))
    assert torch.backends.mha.get_fastpath_enabled() == fastpath


def test_eval_mode_makes_dropout_deterministic(gen):
    model = Net().train()
    data = batches(2, gen)
    a = slug_fast.compute_gradients(model, data, None, mse, params=["mid.weight"], progress=False)
    b = slug_fast.compute_gradients(model, data, None, mse, params=["mid.weight"], progress=False)
    assert a.names == ["mid.weight"] and torch.equal(a.forget["mid.weight"], b.forget["mid.weight"])


def test_depth_order_runs_from_input_to_output(gen):
    model = Net()
    grads = slug_fast.compute_gradients(model, batches(1, gen), None, mse, progress=False)
    order = grads.depth_order
    assert order.index("inp.weight") < order.index("mid.weight") < order.index("out.weight")


def test_bfloat16_model_accumulates_in_float32(gen):
    model = Net()
    data = batches(8, gen)
    ref = slug_fast.compute_gradients(model, data, None, mse, params=["mid.weight"], progress=False)
    low = slug_fast.compute_gradients(model.bfloat16(), [(x.bfloat16(), y.bfloat16()) for x, y in data], None,
                                      mse, params=["mid.weight"], progress=False)
    g = low.forget["mid.weight"]
    assert g.dtype == torch.bfloat16
    rel = (g.float() - ref.forget["mid.weight"]).norm() / ref.forget["mid.weight"].norm()
    assert rel < 0.05


def test_bad_input(gen):
    model = Net()
    with pytest.raises(SlugError, match="the forget set is empty"):
        slug_fast.compute_gradients(model, [], batches(1, gen), mse, progress=False)
    with pytest.raises(SlugError, match="the retain set is empty"):
        slug_fast.compute_gradients(model, batches(1, gen), iter([]), mse, progress=False)
    with pytest.raises(SlugError, match="parameter 'mid.wieght' not found; closest: mid.weight"):
        slug_fast.compute_gradients(model, batches(1, gen), None, mse, params=["mid.wieght"])
    with pytest.raises(SlugError, match="scalar tensor, got shape"):
        slug_fast.compute_gradients(model, batches(1, gen), None, lambda m, b: m(b[0]), progress=False)
    with pytest.raises(NonFiniteError, match="forget loss is nan at batch 0"):
        slug_fast.compute_gradients(model, batches(1, gen), None, lambda m, b: mse(m, b) * float("nan"),
                                    progress=False)
    with pytest.raises(SlugError, match="no grad_fn"):
        slug_fast.compute_gradients(model, batches(1, gen), None, lambda m, b: torch.tensor(1.0), progress=False)
    assert all(p.grad is None for p in model.parameters())


def test_host_sums_stage_each_layer_in_one_buffer_pinned_only_for_a_gpu_model(monkeypatch):
    """The offload store: one staging buffer per layer, reused batch after batch (allocating one a
    batch would churn host memory), pinned (page-locked, for non-blocking copies) only when the
    model is on a GPU and CUDA is there. Pinning is observed by spying on torch.empty, so this runs
    without a GPU; the copies themselves are checked on the GPU machine (bench/gpu)."""
    from types import SimpleNamespace

    from slug_fast.gradients import HostSums

    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, 4, generator=gen).bfloat16() for _ in range(3)]
    sums = HostSums({"w": torch.zeros(3, 4, dtype=torch.bfloat16)})
    staged = []
    for g in grads:
        sums.add("w", g)
        staged.append(sums.staging["w"])
        sums.end_batch()
    assert staged[0] is staged[1] is staged[2] and not staged[0].is_pinned()
    want = sum(g.float() for g in grads)  # float32 sums of bfloat16 values: exact here
    assert torch.equal(sums.sums["w"], want)

    pinned = []
    real_empty = torch.empty

    def spy_empty(*args, pin_memory=False, **kwargs):
        pinned.append(pin_memory)
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "empty", spy_empty)
    on_gpu = SimpleNamespace(device=torch.device("cuda", 0))
    on_cpu = torch.zeros(3, 4)
    assert [HostSums({"w": p}).pin for p in (on_gpu, on_cpu)] == [True, False]
    HostSums({"w": on_gpu}).add("w", grads[0])
    HostSums({"w": on_cpu}).add("w", grads[0])
    assert pinned == [True, False]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CUDA model but no CUDA: never pinned
    assert not HostSums({"w": on_gpu}).pin


class Opaque:
    """A batch leaf that is neither a tensor nor a plain value (left out of a fingerprint)."""


@pytest.mark.skipif(not hasattr(torch, "hash_tensor"), reason="torch.hash_tensor (torch >= 2.10) hashes the bits")
def test_batch_fingerprint_sees_values_and_plain_leaves_not_other_objects():
    from slug_fast.gradients import _fingerprint

    x = torch.tensor([0.5, 0.5])
    batch = {"x": x, "empty": torch.zeros(0, 3), "caption": "a photo of Ann", "n": 3, "none": None, "obj": Opaque()}
    fp = _fingerprint(batch)
    assert fp[1] == ((0, 3), torch.float32, 0.0)  # an empty tensor: its shape, dtype and a zero sum
    assert fp[0][:2] == ((2,), torch.float32) and isinstance(fp[0][2], int)  # the elements' bits hashed
    assert fp[2:] == ("a photo of Ann", 3, None)  # plain values as they are; the opaque object is left out
    assert _fingerprint({**batch, "obj": Opaque()}) == fp
    same_sum = _fingerprint({**batch, "x": torch.tensor([0.25, 0.75])})
    assert same_sum != fp  # a sum would not tell these apart
    assert _fingerprint({**batch, "caption": "a photo of Bob"}) != fp


def test_sums_count_the_gradient_bytes_alive_at_each_moment():
    """peak and held against a hand count (numel * element_size) of what is alive: the sums
    kept, the gradient being added and what earlier passes left. A float32 gradient becomes
    its own sum; a bfloat16 one is copied to a float32 sum while it is still alive."""
    from slug_fast.gradients import Sums

    a, b = torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    a_f32, b_bf16, b_f32 = 12 * 4, 2 * 2, 2 * 4  # bytes of a's gradient, b's gradient, b's float32 sum
    for before in (None, 1000):
        sums = Sums({"a": a, "b": b}) if before is None else Sums({"a": a, "b": b}, held_before=before)
        base = before or 0
        assert (sums.held, sums.peak) == (base, base)
        steps = [("a", torch.ones(3, 4), base + a_f32, base + a_f32),  # the gradient is the sum
                 ("b", torch.ones(2, dtype=torch.bfloat16), base + a_f32 + b_f32, base + a_f32 + b_f32 + b_bf16),
                 ("a", torch.ones(3, 4), base + a_f32 + b_f32, base + a_f32 + b_f32 + a_f32),  # added into a's sum
                 ("b", torch.ones(2, dtype=torch.bfloat16), base + a_f32 + b_f32, base + 2 * a_f32 + b_f32)]
        for name, grad, held, peak in steps:
            sums.add(name, grad)
            assert (sums.held, sums.peak) == (held, peak)
        assert sums.held == base + sum(t.numel() * t.element_size() for t in sums.sums.values())
        means = sums.means(2)
        assert torch.equal(means["a"], torch.ones(3, 4)) and means["b"].dtype == torch.bfloat16


def test_means_of_a_layer_without_gradient_are_contiguous_zeros_where_the_sums_live():
    """A layer the loss never reached gets zeros of its shape and dtype, contiguous even for a
    transposed parameter, on the parameter's device (host memory for the offload store's sums,
    seen here with a parameter on the meta device standing in for a GPU)."""
    from slug_fast.gradients import HostSums, Sums

    w = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64).t())
    assert not w.is_contiguous()
    for sums in (Sums({"w": w}), HostSums({"w": w})):
        z = sums.means(3)["w"]
        assert z.is_contiguous() and z.shape == (4, 3) and z.dtype == torch.float64 and z.device == w.device
        assert torch.count_nonzero(z) == 0 and not z.requires_grad
    on_meta = torch.nn.Parameter(torch.empty(3, 4, device="meta"))
    assert Sums({"w": on_meta}).means(1)["w"].device.type == "meta"
    host = HostSums({"w": on_meta}).means(1)["w"]
    assert host.device == torch.device("cpu") and torch.count_nonzero(host) == 0


def test_forward_use_order_takes_the_first_use_of_a_weight_used_twice():
    """w2 is used first (e = x @ w2) and again after w1 (x @ w1 @ w2): it comes before w1,
    whichever branch of the sum the graph walk reaches first; ties (one node using two
    parameters) keep the parameters' given order."""
    from slug_fast.gradients import forward_use_order

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, generator=gen)
    w1, w2 = (torch.nn.Parameter(torch.randn(3, 3, generator=gen)) for _ in range(2))
    for late_first in (True, False):
        e = x @ w2
        late = (x @ w1) @ w2
        loss = late.sum() + e.sum() if late_first else e.sum() + late.sum()
        assert forward_use_order(loss, {"w1": w1, "w2": w2}) == ["w2", "w1"]
        assert forward_use_order(loss, {"w2": w2, "w1": w1}) == ["w2", "w1"]
    b = torch.nn.Parameter(torch.randn(3, generator=gen))
    loss = torch.addmm(b, x, w1).sum()  # one node uses both
    assert forward_use_order(loss, {"b": b, "w1": w1}) == ["b", "w1"]
    assert forward_use_order(loss, {"w1": w1, "b": b}) == ["w1", "b"]


def test_forward_use_order_reads_each_graph_node_once(monkeypatch):
    """A residual chain has 2^depth paths from the loss to the input; the walk looks at each
    edge of the graph once (counted through the getattr it calls on every child), so the
    deep residual networks it is made for cost time linear in their size."""
    from slug_fast import gradients

    gen = torch.Generator().manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(3, 3, generator=gen) / 3) for _ in range(12)]
    h = torch.randn(2, 3, generator=gen)
    for w in ws:
        h = h + torch.tanh(h @ w)
    loss = h.sum()
    edges, seen, stack = 0, {loss.grad_fn}, [loss.grad_fn]  # the graph's edges, each node expanded once
    while stack:
        for child, _ in stack.pop().next_functions:
            if child is None:
                continue
            edges += 1
            if not hasattr(child, "variable") and child not in seen:
                seen.add(child)
                stack.append(child)
    calls = []
    monkeypatch.setattr(gradients, "getattr", lambda *a: calls.append(1) or getattr(*a), raising=False)
    order = gradients.forward_use_order(loss, {f"w{i}": w for i, w in enumerate(ws)})
    assert order == [f"w{i}" for i in range(12)]
    assert 0 < len(calls) <= edges


def either_loss(model, batch):
    """The Net's loss; on a ("tail", x, y) batch it skips `inp`, so its use order puts inp first."""
    kind, x, y = batch
    if kind == "tail":
        return ((model.out(torch.tanh(model.mid(x))) - y) ** 2).mean()
    return mse(model, (x, y))


def module_order(names):
    return list(dict.fromkeys(n.split(".")[0] for n in names))


def two_way_batches(gen, kinds):
    return [(k, torch.randn(4, 6 if k == "full" else 12, generator=gen), torch.randn(4, 3, generator=gen))
            for k in kinds]


def test_depth_order_is_recorded_on_the_first_forget_batch_only_when_asked(gen):
    """From the first forget batch (the whole net: unreached `unused` first, then input to
    output), not a later forget batch nor the retain set (whose batches skip `inp`), and not
    at all without order=True."""
    from slug_fast.gradients import GradientPass, Sums

    model = Net()
    names = [n for n, _ in model.named_parameters()]
    forget, retain = two_way_batches(gen, ["full", "tail"]), two_way_batches(gen, ["tail", "tail"])
    assert module_order(names) == ["inp", "mid", "out", "unused"]
    for order, expected in ((None, None), (False, None), (True, ["unused", "inp", "mid", "out"])):
        run = GradientPass(model, forget, retain, either_loss, None, names, progress=False)
        sinks = {"forget": Sums(run.params(names)), "retain": Sums(run.params(names))}
        run.run(sinks) if order is None else run.run(sinks, order=order)
        got = run.depth_order
        assert (got if got is None else module_order(got)) == expected
        assert run.counts == {"forget": 2, "retain": 2}
    run = GradientPass(model, retain, forget, either_loss, None, names, progress=False)
    run.run({"forget": Sums(run.params(names))}, order=True)
    assert module_order(run.depth_order) == ["inp", "unused", "mid", "out"]  # the tail batch's order


def test_gradients_report_the_forward_use_order_not_the_model_order(gen):
    model = Net()
    grads = slug_fast.compute_gradients(model, batches(2, gen), batches(1, gen), mse, progress=False)
    assert module_order(grads.depth_order) == ["unused", "inp", "mid", "out"]
    assert sorted(grads.depth_order) == sorted(grads.names)


class Reshuffled:
    """A re-iterable that gives its batches in another order each time (a shuffling loader)."""

    def __init__(self, data):
        self.data, self.reads = data, 0

    def __len__(self):
        return len(self.data)

    def __iter__(self):  # counts the reads that get as far as a batch
        self.reads += 1
        yield from (self.data if self.reads % 2 else self.data[::-1])


def test_a_pass_checks_that_sets_repeat_only_once_asked_to(gen):
    """Without require_repeats a set may come back in another order (the mean does not
    care); once a store needs the sets to repeat, a change is refused."""
    from slug_fast.gradients import GradientPass, Sums

    model = Net()
    data = batches(3, gen)
    forget = Reshuffled(data)
    run = GradientPass(model, forget, None, mse, None, ["mid.weight"], progress=False)
    means = []
    for _ in range(2):
        sums = Sums(run.params(["mid.weight"]))
        run.run({"forget": sums})
        means.append(sums.means(run.counts["forget"])["mid.weight"])
    assert forget.reads == 2  # read once in each order
    expected = oracle_mean_grad(model, data, ["mid.weight"])["mid.weight"]
    for m in means:
        torch.testing.assert_close(m.double(), expected, rtol=1e-5, atol=1e-7)
    run.require_repeats()
    run.run({"forget": Sums(run.params(["mid.weight"]))})
    with pytest.raises(SlugError, match="the forget batches differ from the first pass at batch 0"):
        run.run({"forget": Sums(run.params(["mid.weight"]))})


def test_a_loss_that_is_not_a_tensor_is_named_by_its_type(gen):
    model = Net()
    for value, kind in ((1.5, "float"), (None, "NoneType"), ([1.0], "list")):
        with pytest.raises(SlugError, match=f"^forget loss must return a scalar tensor, got {kind}$"):
            slug_fast.compute_gradients(model, batches(1, gen), None, lambda m, b, v=value: v, progress=False)
    assert all(p.grad is None for p in model.parameters())


def test_params_may_name_a_single_parameter(gen):
    from slug_fast.gradients import resolve_params

    model = Net()
    assert resolve_params(model, "mid.weight") == ["mid.weight"]
    grads = slug_fast.compute_gradients(model, batches(1, gen), None, mse, params="out.bias", progress=False)
    assert grads.names == ["out.bias"] and list(grads.forget) == ["out.bias"]


class FakeTTY:
    """A stderr that says it is a terminal and keeps what is written."""

    def __init__(self, tty):
        self.tty, self.parts = tty, []

    def isatty(self):
        return self.tty

    def write(self, s):
        self.parts.append(s)

    def flush(self):
        pass

    @property
    def text(self):
        return "".join(self.parts)


@pytest.mark.parametrize("progress, tty, shown", [(True, False, True), (True, True, True), (False, True, False),
                                                  (False, False, False), (None, True, True), (None, False, False)])
def test_progress_bars_for_each_set_shown_as_asked_and_cleared(gen, monkeypatch, progress, tty, shown):
    """progress=True shows a bar per set even off a terminal, False never, None only on a
    terminal; each bar names its set, counts its batches and is cleared when done."""
    import sys

    err = FakeTTY(tty)
    monkeypatch.setattr(sys, "stderr", err)
    slug_fast.compute_gradients(Net(), batches(2, gen), batches(3, gen), mse, progress=progress)
    text = err.text
    if not shown:
        assert text == ""
        return
    assert "forget gradients:" in text and "retain gradients:" in text
    assert "0/2" in text and "0/3" in text
    assert text.index("forget gradients") < text.index("retain gradients")
    assert "\n" not in text and text.endswith("\r")  # leave=False: each bar erased, no line left behind


def test_a_dataloader_over_an_iterable_dataset_without_a_length(gen):
    """A DataLoader whose dataset is iterable-only has __len__ but raises TypeError from it;
    the pass reads it all the same, and its means are those of the same batches in a list."""
    forget, retain = batches(3, gen), batches(2, gen)

    class Stream(torch.utils.data.IterableDataset):
        def __init__(self, items):
            self.items = items

        def __iter__(self):
            return iter(self.items)

    def loader(items):
        return torch.utils.data.DataLoader(Stream(items), batch_size=None)

    with pytest.raises(TypeError):
        len(loader(forget))
    model = Net()
    want = slug_fast.compute_gradients(model, forget, retain, mse, progress=False)
    got = slug_fast.compute_gradients(model, loader(forget), loader(retain), mse, progress=True)
    assert got.n_forget_batches == 3 and got.n_retain_batches == 2
    for which in ("forget", "retain"):
        for n in want.names:
            assert torch.equal(getattr(got, which)[n], getattr(want, which)[n])
