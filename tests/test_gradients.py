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
