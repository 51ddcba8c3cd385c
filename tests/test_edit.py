"""LayerEdit: bit-exact restore on every exit path, the committed value, nothing else touched."""
import pytest
import torch

import slug_fast
from slug_fast import _backends
from slug_fast.edit import axpy, axpy_reference
from slug_fast.errors import NonFiniteError, SlugError

from conftest import available, device_for

BACKENDS = available(["cpp", "triton", "torch"])
# the Triton kernels called directly: on CPU tensors under TRITON_INTERPRET=1 without a GPU
# (the dispatcher sends CPU tensors to the C++ kernel)
TRITON = pytest.param("triton", marks=pytest.mark.skipif(_backends.kernels_reason() is not None,
                                                         reason=str(_backends.kernels_reason())))
UPDATES = available(["cpp", "torch"]) + [TRITON]


def update(out, base, direction, step, backend):
    """edit.axpy on `backend`; without a GPU, Triton's kernel called directly. Returns the backend used."""
    if backend == "triton" and not torch.cuda.is_available():
        from slug_fast import kernels

        kernels.axpy_into(out, base, direction, step)
        return "triton"
    return axpy(out, base, direction, step, backend=backend)
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def snapshot(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def same_bits(a, b):
    """Bit-for-bit equality (unlike ==, tells -0.0 from 0.0 and compares NaN payloads)."""
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def model_of(dtype, gen, device="cpu"):
    """A small MLP whose weights use every bit of `dtype` (not float32 values cast up)."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = torch.nn.Sequential(torch.nn.Linear(33, 65), torch.nn.GELU(), torch.nn.Linear(65, 17)).to(device, dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / 7)
    return model


@pytest.mark.parametrize("backend", UPDATES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("direction_dtype", ["same", torch.float32])
def test_update_matches_float64_oracle_and_reference_bits(backend, dtype, direction_dtype, gen):
    dev = device_for(backend)
    n = 70_001 if backend != "triton" or dev.type == "cuda" else 9_001
    base = (torch.randn(n, generator=gen, dtype=torch.float64) * 4).to(dev, dtype)
    ddt = dtype if direction_dtype == "same" else direction_dtype
    d = torch.randn(n, generator=gen, dtype=torch.float64).to(dev, ddt)
    d[:5] = 0
    base[5:10] = 0
    step = float(torch.rand((), generator=gen, dtype=torch.float64)) * 3 + 0.01
    out = torch.empty_like(base)
    used = update(out, base, d, step, backend)
    assert used == backend
    ref = torch.empty_like(base)
    axpy_reference(ref, base, d, step)
    assert same_bits(out.cpu(), ref.cpu())  # every backend rounds exactly like the reference
    # and the reference is right: within half an ulp of the output dtype plus float32 rounding
    exact = base.double() + step * d.double()
    eps = {torch.float32: 2**-24, torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float64: 2**-53}[dtype]
    slack = 4 * 2**-24 * (base.double().abs() + step * d.double().abs()) if dtype != torch.float64 else 0
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps / 2  # half a subnormal spacing
    assert ((out.double() - exact).abs() <= eps * exact.abs() + slack + tiny + 1e-300).all()
    assert torch.equal(out[:5], base[:5])


@pytest.mark.parametrize("backend", UPDATES)
def test_update_in_place_on_base(backend, gen):
    dev = device_for(backend)
    base = torch.randn(5000, generator=gen).to(dev)
    d = torch.randn(5000, generator=gen).to(dev)
    expected = torch.empty_like(base)
    axpy_reference(expected, base, d, 0.7)
    update(base, base, d, 0.7, backend)
    assert torch.equal(base, expected)


@pytest.mark.parametrize("backend", UPDATES)
@pytest.mark.parametrize("dtype,ulp", [(torch.bfloat16, 2**-7), (torch.float16, 2**-10)])
def test_update_rounds_exact_ties_to_even(backend, dtype, ulp):
    """±(1 + k ulp) + half an ulp, k = 0..127 of both parities, over a ragged length: every result is
    an exact tie, rounded to the even neighbour ±(1 + (k + k % 2) ulp) (exact in float64 and in `dtype`)."""
    dev = device_for(backend)
    i = torch.arange(1031, dtype=torch.float64)
    k, sign = i % 128, torch.where(i % 3 == 0, -1.0, 1.0)
    base, d = (sign * (1 + k * ulp)).to(dev, dtype), sign.to(dev, dtype)
    out = torch.empty_like(base)
    update(out, base, d, ulp / 2, backend)
    assert same_bits(out.cpu(), (sign * (1 + (k + k % 2) * ulp)).to(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_restore_is_bit_exact_after_exception_and_interrupt(backend, dtype, gen):
    dev = device_for(backend)
    model = model_of(dtype, gen, dev)
    before = snapshot(model)
    dirs = {"0.weight": torch.randn(65, 33, generator=gen).to(dev, dtype),
            "2.weight": torch.randn(17, 65, generator=gen).to(dev, dtype)}
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with slug_fast.LayerEdit(model, dirs, backend=backend) as edit:
                edit.step(0.37)
                edit.step(1e-3)
                assert not same_bits(model[0].weight.detach(), before["0.weight"])
                raise exc
        after = snapshot(model)
        assert all(same_bits(after[n], before[n]) for n in before)
    with slug_fast.LayerEdit(model, dirs, backend=backend) as edit:
        edit.step(5.0)
    assert all(same_bits(snapshot(model)[n], before[n]) for n in before)  # no commit: restored


@pytest.mark.parametrize("backend", BACKENDS)
def test_commit_keeps_the_step_and_only_edited_tensors_change(backend, gen):
    dev = device_for(backend)
    model = model_of(torch.float32, gen, dev)
    before = snapshot(model)
    d = torch.randn(65, 33, generator=gen).to(dev)
    with slug_fast.LayerEdit(model, {"0.weight": d}, backend=backend) as edit:
        edit.step(3.0)
        edit.step(0.25)  # steps are not accumulated: the result is theta0 + 0.25 d
        edit.commit()
    after = snapshot(model)
    expected = torch.empty_like(d)
    axpy_reference(expected, before["0.weight"], d, 0.25)
    assert torch.equal(after["0.weight"], expected)
    assert torch.allclose(after["0.weight"], before["0.weight"] + 0.25 * d, atol=1e-6)
    assert all(torch.equal(after[n], before[n]) for n in before if n != "0.weight")


def test_bfloat16_steps_come_from_theta0_not_from_the_last_value(gen):
    model = model_of(torch.bfloat16, gen)
    before = snapshot(model)
    d = torch.randn(65, 33, generator=gen)
    with slug_fast.LayerEdit(model, {"0.weight": d}) as edit:
        for s in (0.001, 0.002, 0.003, 0.004):
            edit.step(s)
        edit.commit()
    expected = (before["0.weight"].float() + torch.tensor(0.004) * d).bfloat16()
    assert torch.equal(model[0].weight.detach(), expected)


def test_edit_keeps_autograd_working(gen):
    """The gradient through the edited weight equals a float64 one at theta0 + 0.1 d."""
    model = model_of(torch.float32, gen)
    before = {n: t.double() for n, t in snapshot(model).items()}
    d = torch.randn(65, 33, generator=gen)
    x = torch.randn(2, 33, generator=gen)
    with slug_fast.LayerEdit(model, {"0.weight": d}) as edit:
        edit.step(0.1)
        edit.commit()
    model(x).sum().backward()
    w = (before["0.weight"] + 0.1 * d.double()).requires_grad_()
    h = torch.nn.functional.gelu(x.double() @ w.T + before["0.bias"])
    want, = torch.autograd.grad((h @ before["2.weight"].T + before["2.bias"]).sum(), w)
    assert torch.allclose(model[0].weight.grad.double(), want, rtol=1e-5, atol=1e-6)


def test_bad_directions_are_refused_and_nothing_changes(gen):
    model = model_of(torch.float32, gen)
    before = snapshot(model)
    with pytest.raises(SlugError, match="parameter '0.weigth' not found; closest: 0.weight"):
        slug_fast.LayerEdit(model, {"0.weigth": torch.zeros(65, 33)})
    with pytest.raises(SlugError, match=r"shape \(33, 65\); the parameter has shape \(65, 33\)"):
        slug_fast.LayerEdit(model, {"0.weight": torch.zeros(33, 65)})
    with pytest.raises(NonFiniteError, match="'0.weight' holds NaN"):
        slug_fast.LayerEdit(model, {"0.weight": torch.full((65, 33), float("nan"))})
    with pytest.raises(SlugError, match="at least one"):
        slug_fast.LayerEdit(model, {})
    edit = slug_fast.LayerEdit(model, {"0.weight": torch.ones(65, 33)})
    with pytest.raises(SlugError, match="inside its `with` block"):
        edit.step(1.0)
    with edit:
        with pytest.raises(SlugError, match="step must be finite"):
            edit.step(float("inf"))
    assert all(torch.equal(snapshot(model)[n], before[n]) for n in before)


@pytest.mark.parametrize("backend", [TRITON])
def test_grouped_update_in_one_launch_matches_the_reference(backend, gen):
    from slug_fast import kernels

    dev = device_for(backend)
    shapes = [(65, 33), (3,), (1,), (129, 7), (0,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.float32]
    bases = [(torch.randn(s, generator=gen, dtype=torch.float64) * 3).to(dev, dt) for s, dt in zip(shapes, dtypes)]
    dirs = [torch.randn(s, generator=gen).to(dev, dt if i % 2 else torch.float32)
            for i, (s, dt) in enumerate(zip(shapes, dtypes))]
    outs = [torch.empty_like(b) for b in bases]
    kernels.axpy_many(outs, bases, dirs, 0.61)
    for out, base, d in zip(outs, bases, dirs):
        ref = torch.empty_like(base)
        axpy_reference(ref, base, d, 0.61)
        assert same_bits(out.cpu(), ref.cpu())
    with pytest.raises(ValueError, match="contiguous"):
        kernels.axpy_many([outs[0].T], [bases[0].T], [dirs[0].T], 1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_a_step_that_overflows_the_dtype_is_undone_and_refused(dtype):
    layer = torch.nn.Linear(4, 3).to(dtype)
    theta0 = layer.weight.detach().clone()
    direction = torch.ones_like(layer.weight)
    too_far = {torch.float16: 1e5, torch.bfloat16: 1e39, torch.float32: 3e38 * 4}[dtype]
    with slug_fast.LayerEdit(layer, {"weight": direction}) as edit:
        edit.step(0.5)
        with pytest.raises(NonFiniteError, match=f"takes 'weight' out of the range of {dtype}"):
            edit.step(too_far)
        assert torch.equal(layer.weight, theta0) and edit.current_step == 0.0
        edit.commit()  # committing after the refusal keeps theta0, not an inf
    assert torch.equal(layer.weight, theta0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the triton backend takes its tensors")
def test_a_backend_that_cannot_serve_the_tensors_is_refused_and_nothing_changes(gen):
    model = model_of(torch.float32, gen)
    before = snapshot(model)
    with slug_fast.LayerEdit(model, {"0.weight": torch.ones(65, 33)}, backend="triton") as edit:
        with pytest.raises(SlugError, match="axpy_into: the triton backend takes CUDA tensors, got tensors on cpu"):
            edit.step(1.0)
        edit.commit()
    assert all(torch.equal(snapshot(model)[n], before[n]) for n in before)
