"""The torch operators slug_fast::layer_sums, axpy_into and pareto_front: registration
(torch.library.opcheck: schema, fake kernels, autograd registration, AOT dispatch) and
values against float64 and brute-force oracles written here, on every device present."""
import math
import sys
import threading

import numpy as np
import pytest
import torch

import slug_fast
from slug_fast import _backends

ops = torch.ops.slug_fast
OPS = ("layer_sums", "axpy_into", "pareto_front")
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                      reason="no CUDA device: the CUDA kernels (Triton) need one"))
DEVICES = ["cpu", CUDA]
FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

pytestmark = pytest.mark.skipif(slug_fast.backends()["cpp"] is not None,
                                reason=f"the operators are not declared: {slug_fast.backends()['cpp']}")


def exact_sums(p, f, r=None):
    """[sum p^2, sum f^2, sum r^2, sum f*r] and sum |f*r| from math.fsum over float64 values
    (each product of 16/32-bit values is exact in float64, and fsum rounds once)."""
    p, f = (t.detach().cpu().double().flatten().tolist() for t in (p, f))
    r = r.detach().cpu().double().flatten().tolist() if r is not None else [0.0] * len(f)
    return ([math.fsum(x * x for x in p), math.fsum(x * x for x in f), math.fsum(x * x for x in r),
             math.fsum(a * b for a, b in zip(f, r))], math.fsum(abs(a * b) for a, b in zip(f, r)))


def brute_front(a, m):
    """Indices no other index strictly dominates, by comparing every pair; NaN never on the front."""
    a, m = list(map(float, a)), list(map(float, m))
    return [i for i in range(len(a)) if not (math.isnan(a[i]) or math.isnan(m[i]))
            and not any(a[j] < a[i] and m[j] > m[i] for j in range(len(a)))]


def layers(dtypes, gen, device, scale=1.0, shapes=((7,), (33, 17), (3, 5, 7), (1031,))):
    """(params, forget, retain) lists over `shapes`, one dtype per layer in turn: random signs,
    magnitudes in [scale, 2 scale), about a tenth of the values exactly zero."""
    out = ([], [], [])
    for i, shape in enumerate(shapes):
        for group in out:
            sign = torch.randint(0, 2, shape, generator=gen) * 2.0 - 1.0
            x = sign * (1 + torch.rand(shape, generator=gen, dtype=torch.float64)) * scale
            x[torch.rand(shape, generator=gen) < 0.1] = 0.0
            group.append(x.to(device, dtypes[i % len(dtypes)]))
    return out


def test_schemas_declare_the_mutation():
    schemas = {op: str(getattr(ops, op).default._schema) for op in OPS}
    assert schemas == {
        "layer_sums": "slug_fast::layer_sums(Tensor[] params, Tensor[] forget, Tensor[]? retain=None) -> Tensor",
        "axpy_into": "slug_fast::axpy_into(Tensor(a!) out, Tensor base, Tensor direction, float step) -> ()",
        "pareto_front": "slug_fast::pareto_front(Tensor alignment, Tensor importance) -> Tensor",
    }
    # the copy slug_fast declares itself where the extension is missing
    assert schemas == {op: f"slug_fast::{op}{schema}" for op, schema in _backends.SCHEMAS.items()}
    writes = {op: [a.name for a in getattr(ops, op).default._schema.arguments
                   if a.alias_info is not None and a.alias_info.is_write] for op in OPS}
    assert writes == {"layer_sums": [], "axpy_into": ["out"], "pareto_front": []}


def test_the_dispatcher_holds_a_kernel_per_device():
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert all(has(f"slug_fast::{op}", "CPU") for op in OPS)
    assert all(has(f"slug_fast::{op}", "Meta") for op in OPS)  # the fake kernels
    triton = slug_fast.backends()["triton"] is None
    assert has("slug_fast::layer_sums", "CUDA") == triton and has("slug_fast::axpy_into", "CUDA") == triton
    assert not has("slug_fast::pareto_front", "CUDA")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_retain", [True, False])
def test_layer_sums_opcheck_and_float64_values(device, with_retain, gen):
    params, forget, retain = layers(FLOATS, gen, device)
    retain = retain if with_retain else None
    torch.library.opcheck(ops.layer_sums.default, (params, forget, retain))
    sums = ops.layer_sums(params, forget, retain)
    assert sums.dtype == torch.float64 and sums.shape == (len(params), 4) and sums.device.type == device
    for i, row in enumerate(sums.cpu().tolist()):
        exact, abs_fr = exact_sums(params[i], forget[i], retain[i] if retain else None)
        assert row[:3] == pytest.approx(exact[:3], rel=1e-12, abs=0)
        assert abs(row[3] - exact[3]) <= 1e-12 * abs_fr


# magnitudes whose squares leave float32's range (3e19, 1e30: overflow; 1e-23, 1e-40: underflow,
# the last float32-subnormal), float16's subnormals and near-maximum, float64 beyond float32
EXTREMES = [(torch.float32, s) for s in (1e-40, 1e-23, 3e19, 1e30)] + [(torch.bfloat16, s) for s in (1e-30, 1e30)] + \
           [(torch.float16, s) for s in (6e-8, 3e4)] + [(torch.float64, 1e100)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,scale", EXTREMES)
def test_layer_sums_exact_at_extreme_magnitudes(device, dtype, scale, gen):
    params, forget, retain = layers([dtype], gen, device, scale, shapes=((1037,), (5,)))
    for group in (params, forget, retain):
        group[1].zero_()  # an all-zero layer sums to exact zeros
    assert all(bool(t[0].ne(0).any()) and bool(t[0].isfinite().all()) for t in (params, forget, retain))
    sums = ops.layer_sums(params, forget, retain).cpu()
    exact, abs_fr = exact_sums(params[0], forget[0], retain[0])
    assert sums[0, :3].tolist() == pytest.approx(exact[:3], rel=1e-12, abs=0)
    assert abs(sums[0, 3].item() - exact[3]) <= 1e-12 * abs_fr
    assert sums[1].eq(0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("where", [0, 1, 2])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_layer_sums_carries_nan_and_inf_to_the_layer_they_are_in(device, where, bad, gen):
    params, forget, retain = layers([torch.float32], gen, device, shapes=((50,), (9,)))
    (params, forget, retain)[where][1][4] = bad
    sums = ops.layer_sums(params, forget, retain).cpu()
    assert sums[0].isfinite().all()
    expected = torch.tensor(exact_sums(*(g[1].double() for g in (params, forget, retain)))[0], dtype=torch.float64)
    assert torch.equal(sums[1].isnan(), expected.isnan()) and torch.equal(sums[1].isinf(), expected.isinf())
    assert not sums[1].isfinite().all()


def test_layer_sums_refuses_mismatched_inputs():
    p = torch.ones(3, 4)
    with pytest.raises(RuntimeError, match="got 1 parameters but 2 forget gradients"):
        ops.layer_sums([p], [p, p])
    with pytest.raises(RuntimeError, match=r"layer 0: forget gradient has shape \[4, 3\] but the parameter has"):
        ops.layer_sums([p], [torch.ones(4, 3)])
    with pytest.raises(RuntimeError, match="layer 0: retain gradient has dtype Half but the parameter has dtype"):
        ops.layer_sums([p], [p], [p.half()])
    with pytest.raises(RuntimeError, match="layer 0: parameter is not contiguous"):
        ops.layer_sums([p.T], [p.T])
    with pytest.raises(RuntimeError, match="dtype Int is not supported"):
        ops.layer_sums([p.int()], [p.int()])


def rounded_update(base, d, step):
    """torch's rounding of base + step * d: computed in float32 (float64 for float64), then cast."""
    compute = torch.float64 if base.dtype == torch.float64 else torch.float32
    return (base.to(compute) + torch.tensor(step, dtype=compute) * d.to(compute)).to(base.dtype)


def same_bits(a, b):
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("direction_dtype", FLOATS)
def test_axpy_into_opcheck_and_rounding(device, dtype, direction_dtype, gen):
    n = 70_001  # several parallel chunks and a ragged end
    base = (torch.randn(n, generator=gen, dtype=torch.float64) * 4).to(dtype)
    d = torch.randn(n, generator=gen, dtype=torch.float64).to(direction_dtype)
    base[:5], d[5:10] = 0, 0
    step = float(torch.rand((), generator=gen, dtype=torch.float64)) * 3 + 0.01
    base, d = base.to(device), d.to(device)
    out = torch.empty_like(base)
    torch.library.opcheck(ops.axpy_into.default, (out, base, d, step))
    ops.axpy_into(out, base, d, step)
    assert same_bits(out.cpu(), rounded_update(base.cpu(), d.cpu(), step))
    # and within half an ulp of the exact value, plus the roundings of step, step * d and the sum
    exact = base.cpu().double() + step * d.cpu().double()
    eps = {torch.float32: 2**-24, torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float64: 2**-53}[dtype]
    unit = 2**-53 if dtype == torch.float64 else 2**-24
    slack = 4 * unit * (base.cpu().double().abs() + step * d.cpu().double().abs())
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps / 2  # half a subnormal spacing
    assert ((out.cpu().double() - exact).abs() <= eps * exact.abs() + slack + tiny + 1e-300).all()


@pytest.mark.parametrize("device", DEVICES)
def test_axpy_into_in_place_on_base(device, gen):
    base = torch.randn(5000, generator=gen).to(device)
    d = torch.randn(5000, generator=gen).to(device)
    expected = rounded_update(base.cpu(), d.cpu(), 0.7)
    torch.library.opcheck(ops.axpy_into.default, (base.clone(), base.clone(), d, 0.7))
    ops.axpy_into(base, base, d, 0.7)  # the update on the parameter itself
    assert same_bits(base.cpu(), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_axpy_into_ties_nan_and_overflow(device):
    one = torch.ones(6)
    # exact halfway cases round to even: 1 + half an ulp -> 1, 1 + 3 half ulps -> 1 + 2 ulps
    for dtype, half_ulp in ((torch.bfloat16, 2**-8), (torch.float16, 2**-11)):
        base = torch.tensor([1.0, 1.0 + 2 * half_ulp, 1.0, -1.0, 0.0, -0.0]).to(device, dtype)
        d = torch.tensor([1.0, 1.0, 3.0, -1.0, 0.0, -0.0]).to(device, dtype)
        out = torch.empty_like(base)
        ops.axpy_into(out, base, d, half_ulp)
        assert out.cpu().tolist() == [1.0, 1.0 + 4 * half_ulp, 1.0 + 4 * half_ulp, -1.0, 0.0, -0.0]
        assert same_bits(out.cpu(), rounded_update(base.cpu(), d.cpu(), half_ulp))  # -0.0 kept
    base = torch.tensor([float("nan"), 6e4, -6e4, 1.0, 3e38, 1e-45]).to(device)
    for dtype, step in ((torch.float16, 1e4), (torch.float32, 3e38), (torch.bfloat16, 3e38)):
        b, d, out = base.to(dtype), one.to(device, dtype), torch.empty(6, dtype=dtype, device=device)
        ops.axpy_into(out, b, d, step)
        expected = rounded_update(b.cpu(), d.cpu(), step)
        assert out[0].isnan() and out.isinf().any()  # NaN stays NaN (its payload may differ), overflow is inf
        assert same_bits(out[1:].cpu(), expected[1:])


def test_axpy_into_refuses_what_it_cannot_update():
    x = torch.ones(3, 4)
    with pytest.raises(RuntimeError, match=r"shape mismatch: out \[3, 4\], base \[3, 4\], direction \[4, 3\]"):
        ops.axpy_into(x, x, torch.ones(4, 3), 1.0)
    with pytest.raises(RuntimeError, match="base has dtype Half but out has dtype Float"):
        ops.axpy_into(x, x.half(), x, 1.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.axpy_into(x.T, x.T, x.T, 1.0)
    with pytest.raises(RuntimeError, match="step must be finite, got inf"):
        ops.axpy_into(x, x, x, float("inf"))


def test_long_update_releases_the_gil():
    """Another thread runs Python while the operator computes: with the switch interval at
    1000 s the GIL changes hands only where a thread lets it go, so reading the output's last
    element still unwritten proves the caller let it go during the computation."""
    n = 20_000_000
    base, d = torch.randn(n), torch.randn(n)
    out = torch.full((n,), float("nan"))
    entered = threading.Event()

    def worker():
        entered.set()
        ops.axpy_into(out, base, d, 0.5)  # written in order: the last element comes last

    old = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    try:
        w = threading.Thread(target=worker, daemon=True)
        w.start()
        entered.wait()
        unwritten = bool(out[-1].isnan())
        w.join()
    finally:
        sys.setswitchinterval(old)
    assert unwritten, "slug_fast::axpy_into kept the GIL while it computed"
    assert same_bits(out, rounded_update(base, d, 0.5))


def fronts_cases(gen):
    """(alignment, importance) pairs: ties and duplicates, NaN, infinities, signed zeros, sizes 0-300."""
    nan, inf = float("nan"), float("inf")
    cases = [([], []), ([0.5], [1.0]), ([0.2, 0.2, 0.2], [1.0, 1.0, 1.0]), ([0.1, 0.2], [1.0, 1.0]),
             ([nan, 0.5, 0.4], [9.0, nan, 0.0]), ([0.1, 0.2], [-inf, inf]), ([-inf, inf, 0.0], [0.0, inf, -inf]),
             ([0.0, -0.0, 0.0], [1.0, 1.0, 2.0]), ([nan, nan], [nan, 1.0])]
    for n, levels in ((30, 3), (300, 7), (300, None)):
        a = torch.rand(n, generator=gen, dtype=torch.float64)
        m = torch.rand(n, generator=gen, dtype=torch.float64)
        if levels:
            a, m = (a * levels).floor(), (m * levels).floor()
        a[torch.rand(n, generator=gen) < 0.05] = nan
        cases.append((a.tolist(), m.tolist()))
    return cases


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_pareto_front_opcheck_and_brute_force(dtype, gen):
    for a, m in fronts_cases(gen):
        a_t, m_t = torch.tensor(a, dtype=dtype), torch.tensor(m, dtype=dtype)
        torch.library.opcheck(ops.pareto_front.default, (a_t, m_t))
        front = ops.pareto_front(a_t, m_t)
        assert front.dtype == torch.int64
        assert front.tolist() == brute_front(a_t.tolist(), m_t.tolist()), (a, m)


def test_pareto_front_fake_has_a_data_dependent_length():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    with FakeTensorMode(shape_env=ShapeEnv()):
        front = ops.pareto_front(torch.empty(10, dtype=torch.float64), torch.empty(10, dtype=torch.float64))
        sums = ops.layer_sums([torch.empty(3, 4), torch.empty(5)], [torch.empty(3, 4), torch.empty(5)])
    assert isinstance(front.shape[0], torch.SymInt) and front.dtype == torch.int64
    assert sums.shape == (2, 4) and sums.dtype == torch.float64


@pytest.mark.parametrize("device", [CUDA])
def test_pareto_front_has_no_cuda_kernel(device):
    with pytest.raises(NotImplementedError, match="slug_fast::pareto_front"):
        ops.pareto_front(torch.zeros(3, device=device), torch.zeros(3, device=device))


def test_public_functions_run_the_operators(gen):
    p, f, r = (torch.randn(40, 9, generator=gen) for _ in range(3))
    stats = slug_fast.layer_stats({"w": p}, {"w": f}, {"w": r})
    sums = ops.layer_sums([p], [f], [r])
    assert stats.backend == "cpp"
    assert torch.equal(stats.param_norm, sums[:, 0].sqrt()) and torch.equal(stats.dot, sums[:, 3])
    a, m = np.random.default_rng(0).random((2, 200))
    assert slug_fast.pareto_front(a, m) == ops.pareto_front(torch.from_numpy(a), torch.from_numpy(m)).tolist()
    assert _backends.resolve("pareto_front", torch.device("cpu")) == "cpp"
