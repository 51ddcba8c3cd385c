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
    for outside in (lambda: edit.step(1.0), edit.restore, edit.commit, lambda: edit.__exit__(None, None, None)):
        with pytest.raises(SlugError, match=r"\(\) must be called inside its `with` block"):
            outside()  # leaving a block never entered is the same misuse
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
def test_a_backend_that_cannot_serve_the_tensors_is_refused_and_nothing_changes(gen, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # without the interpreter Triton takes CUDA tensors only
    model = model_of(torch.float32, gen)
    before = snapshot(model)
    with slug_fast.LayerEdit(model, {"0.weight": torch.ones(65, 33)}, backend="triton") as edit:
        with pytest.raises(SlugError, match="axpy_into: the triton backend takes CUDA tensors, got tensors on cpu"):
            edit.step(1.0)
        edit.commit()
    assert all(torch.equal(snapshot(model)[n], before[n]) for n in before)


def dyadic(shape, gen, scale):
    """Values k / scale, |k| < 4096: sums and products of a few are exact in float32 and float64."""
    return torch.randint(-4095, 4096, shape, generator=gen).double() / scale


def test_axpy_defaults_to_the_kernel_of_the_device(gen):
    """No backend given: the C++ kernel on CPU tensors where it is built (else the reference), float64-exact."""
    base, d = dyadic((1000,), gen, 256).float(), dyadic((1000,), gen, 64).float()
    out = torch.empty_like(base)
    used = axpy(out, base, d, 0.625)
    assert used == ("cpp" if slug_fast.backends()["cpp"] is None else "torch")
    assert torch.equal(out.double(), base.double() + 0.625 * d.double())


def non_contiguous(t):
    """The same values as `t` in a transposed (dense, non-contiguous) layout."""
    return t.T.contiguous().T


@pytest.mark.parametrize("requested", available(["cpp"]) + ["auto"])
@pytest.mark.parametrize("strided", ["out", "base", "direction"])
def test_axpy_on_a_non_contiguous_tensor_falls_back_to_torch(requested, strided, gen):
    """Any one of out/base/direction non-contiguous: the torch reference runs (and says so), with the
    float64 result rounded once to bfloat16 (float32 is exact on these dyadic values)."""
    base = dyadic((37, 23), gen, 256).float()
    d = dyadic((37, 23), gen, 64).float()
    out = torch.zeros(37, 23, dtype=torch.bfloat16)
    base, d = (non_contiguous(base) if strided == "base" else base), (non_contiguous(d) if strided == "direction" else d)
    out = non_contiguous(out) if strided == "out" else out
    assert [t.is_contiguous() for t in (out, base, d)].count(False) == 1
    assert axpy(out, base.bfloat16(), d, 0.625, backend=requested) == "torch"
    assert same_bits(out.contiguous(), (base.bfloat16().double() + 0.625 * d.double()).bfloat16())


@pytest.mark.parametrize("requested", available(["cpp"]) + ["auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_axpy_with_a_float64_direction_on_a_narrower_tensor_falls_back_to_torch(requested, dtype, gen):
    """A float64 direction into a float32/bfloat16 tensor is computed in float64 (which only torch does),
    rounded once; a float32 direction into bfloat16 stays on the kernel."""
    base = (torch.randn(3001, generator=gen, dtype=torch.float64) * 3).to(dtype)
    d = torch.randn(3001, generator=gen, dtype=torch.float64)
    step = 0.3 + float(torch.rand((), generator=gen, dtype=torch.float64))
    out = torch.empty_like(base)
    assert axpy(out, base, d, step, backend=requested) == "torch"
    assert same_bits(out, (base.double() + step * d).to(dtype))
    if dtype == torch.bfloat16:  # narrower direction: the device's kernel
        d32 = dyadic((3001,), gen, 64).float()
        assert axpy(out, base, d32, 0.625, backend=requested) == ("cpp" if slug_fast.backends()["cpp"] is None
                                                                   else "torch")
        assert same_bits(out, (base.double() + 0.625 * d32.double()).bfloat16())


def test_a_mapping_of_tensors_is_edited_like_a_module(gen):
    """The model may be a mapping name -> tensor (tensors of several modules); they are edited in place."""
    a, b = torch.nn.Linear(5, 4), torch.nn.Linear(4, 3)
    with torch.no_grad():
        a.weight.copy_(dyadic((4, 5), gen, 256))
        b.bias.copy_(dyadic((3,), gen, 256))
    tensors = {"a.weight": a.weight, "b.bias": b.bias, "b.weight": b.weight}
    w0, b0, other = a.weight.detach().double(), b.bias.detach().double(), b.weight.detach().clone()
    da, db = dyadic((4, 5), gen, 64).float(), dyadic((3,), gen, 64).float()
    with slug_fast.LayerEdit(tensors, {"a.weight": da, "b.bias": db}) as edit:
        edit.step(0.625)
        assert torch.equal(a.weight.double(), w0 + 0.625 * da.double())
        assert torch.equal(b.bias.double(), b0 + 0.625 * db.double())
        edit.commit()
    assert torch.equal(a.weight.double(), w0 + 0.625 * da.double()) and torch.equal(b.weight, other)
    with pytest.raises(SlugError, match="parameter 'a.wieght' not found"):
        slug_fast.LayerEdit(tensors, {"a.wieght": da})


def test_a_direction_that_is_not_a_tensor_is_refused_by_its_type(gen):
    model = model_of(torch.float32, gen)
    with pytest.raises(SlugError, match=r"direction for '0.weight' has shape list; the parameter has shape \(65, 33\)"):
        slug_fast.LayerEdit(model, {"0.weight": [[0.0] * 33] * 65})


def test_state_before_during_and_after_the_block(gen):
    """A new edit: no backend used yet, step 0, inactive; current_step follows step(); leaving the block
    makes it inactive (theta0 released) and it can be entered again."""
    model = model_of(torch.float32, gen)
    d = torch.randn(65, 33, generator=gen)
    edit = slug_fast.LayerEdit(model, {"0.weight": d})
    assert edit.used_backend is None and edit.current_step == 0.0 and not edit.active
    with edit:
        assert edit.active and edit.current_step == 0.0
        edit.step(0.25)
        assert edit.current_step == 0.25
        assert edit.used_backend == ("cpp" if slug_fast.backends()["cpp"] is None else "torch")
    assert not edit.active
    with pytest.raises(SlugError, match="only held inside its `with` block"):
        edit.theta0
    with edit:  # a finished edit can be entered again
        edit.step(0.5)
        assert edit.current_step == 0.5
    assert not edit.active


def test_theta0_is_a_contiguous_copy_of_a_non_contiguous_parameter(gen):
    """theta0 holds copies in contiguous layout (flat views work), unchanged by steps; restore is exact."""
    w = torch.nn.Parameter(non_contiguous(torch.randn(9, 7, generator=gen)))
    before = w.detach().clone()
    d = torch.randn(9, 7, generator=gen)
    with slug_fast.LayerEdit({"w": w}, {"w": d}) as edit:
        edit.step(0.5)
        assert edit.used_backend == "torch"  # the parameter itself is non-contiguous
        theta0 = edit.theta0["w"]
        assert theta0.is_contiguous() and torch.equal(theta0.view(-1), before.reshape(-1))
        assert theta0.data_ptr() != w.data_ptr()
        expected = torch.empty_like(before)
        axpy_reference(expected, before, d, 0.5)
        assert torch.equal(w.detach(), expected)
    assert same_bits(w.detach(), before) and w.stride() == before.stride()


@pytest.mark.parametrize("direction_kind", ["dtensor", "local"])
def test_a_dtensor_parameter_is_edited_in_its_local_shard(gloo_world, direction_kind, gen):
    """FSDP2-style parameters (DTensors on a one-process gloo mesh): the local shards are edited exactly
    like plain parameters (float64-exact values), both version counters move, and theta0 is restored."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = DeviceMesh("cpu", [0])
    w, bias = dyadic((6, 5), gen, 256).float(), dyadic((6,), gen, 256).float()
    plain = torch.nn.Linear(5, 6)
    sharded = torch.nn.Linear(5, 6)
    with torch.no_grad():
        plain.weight.copy_(w)
        plain.bias.copy_(bias)
    sharded.weight = torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)]))
    sharded.bias = torch.nn.Parameter(distribute_tensor(bias.clone(), mesh, [Shard(0)]))
    g = dyadic((6, 5), gen, 64).float()
    direction = distribute_tensor(g.clone(), mesh, [Shard(0)]) if direction_kind == "dtensor" else g.clone()
    version = sharded.weight._version
    with slug_fast.LayerEdit(plain, {"weight": g}) as ref_edit, \
            slug_fast.LayerEdit(sharded, {"weight": direction}) as edit:
        assert type(edit.directions["weight"]) is torch.Tensor and torch.equal(edit.directions["weight"], g)
        assert edit.tensors["weight"].data_ptr() == sharded.weight.to_local().data_ptr()
        ref_edit.step(0.625)
        edit.step(0.625)
        local = sharded.weight.to_local().detach()
        assert torch.equal(local.double(), w.double() + 0.625 * g.double())
        assert same_bits(local, plain.weight.detach())
        assert edit.used_backend == ref_edit.used_backend
        assert sharded.weight._version > version  # the DTensor's own counter moved too
        assert torch.equal(sharded.bias.to_local(), bias)
    assert same_bits(sharded.weight.to_local().detach(), w) and same_bits(plain.weight.detach(), w)
    with slug_fast.LayerEdit(sharded, {"weight": direction}) as edit:
        edit.step(-0.25)
        edit.commit()
    assert torch.equal(sharded.weight.to_local().double(), w.double() - 0.25 * g.double())


def test_the_reference_computes_in_float32_unless_out_or_direction_is_float64():
    """A float64 base into float32 out with a float32 direction: base is rounded to float32 first, then
    base + step * d in float32 (known answer: 1 + 0.75 ulp/2 rounds to 1, and 1 + 2**-25 to 1 again);
    in float64 throughout the sum 1 + 1.25 ulp/2 would round up to 1 + 2**-23."""
    base = torch.tensor([1 + 3 * 2.0**-26], dtype=torch.float64)
    d = torch.tensor([2.0**-25])
    out = torch.empty(1)
    axpy_reference(out, base, d, 1.0)
    assert out.item() == 1.0
    out64 = torch.empty(1, dtype=torch.float64)  # a float64 out: float64 throughout
    axpy_reference(out64, base, d, 1.0)
    assert out64.item() == 1 + 5 * 2.0**-26
