"""layer_stats on every backend against an independent numpy float64 oracle."""
import math

import numpy as np
import pytest
import torch

import slug_fast
from slug_fast import _backends
from slug_fast.errors import NonFiniteError, SlugError
from slug_fast.stats import SUM_RTOL, _check_finite, layer_sums, stats_from_sums, sums_reference

from conftest import available, device_for

# "triton" without a GPU: the Triton kernels called directly on CPU tensors under TRITON_INTERPRET=1
# (the dispatcher sends CPU tensors to the C++ kernels)
TRITON = pytest.param("triton", marks=pytest.mark.skipif(_backends.kernels_reason() is not None,
                                                         reason=str(_backends.kernels_reason())))
BACKENDS = available(["cpp", "torch"]) + [TRITON]


def kernel_route(backend):
    """Whether `backend` runs here as its kernels called directly (Triton on CPU tensors)."""
    return backend == "triton" and not torch.cuda.is_available()


def kernel_sums(params, forget, retain=None):
    """The [n, 4] sums of slug_fast.kernels.layer_sums, checked finite as stats.layer_sums does."""
    from slug_fast import kernels

    names = list(forget)
    sums = kernels.layer_sums([params[n].contiguous() for n in names], [forget[n].contiguous() for n in names],
                              None if retain is None else [retain[n].contiguous() for n in names]).cpu()
    _check_finite(names, sums)
    return sums


def sums_of(backend, params, forget, retain=None):
    """stats.layer_sums on `backend` (or kernel_sums on the kernel route)."""
    if kernel_route(backend):
        return kernel_sums(params, forget, retain)
    sums, used = layer_sums(params, forget, retain, backend=backend)
    assert used == backend
    return sums


def stats_of(backend, params, forget, retain=None):
    """slug_fast.layer_stats on `backend` (or kernel_sums on the kernel route)."""
    if kernel_route(backend):
        return stats_from_sums(list(forget), kernel_sums(params, forget, retain), backend)
    return slug_fast.layer_stats(params, forget, retain, backend=backend)


def oracle(p, f, r):
    """Exact-as-float64 sums and the derived statistics, in numpy."""
    p, f, r = (t.detach().cpu().double().numpy().ravel() for t in (p, f, r))
    tt, ff, rr, fr = (p * p).sum(), (f * f).sum(), (r * r).sum(), (f * r).sum()
    abs_fr = np.abs(f * r).sum()
    pn, fn, rn = math.sqrt(tt), math.sqrt(ff), math.sqrt(rr)
    imp = fn / pn if pn > 0 and fn > 0 else 0.0
    ali = abs(fr) / (fn * rn) if fn > 0 and rn > 0 else 0.0
    return dict(tt=tt, ff=ff, rr=rr, fr=fr, abs_fr=abs_fr, imp=imp, ali=ali)


def make_layer(shape, dtype, gen, zero=None):
    p = torch.randn(shape, generator=gen) * torch.rand((), generator=gen) * 3
    f = torch.randn(shape, generator=gen) * 1e-2
    r = 0.5 * f + torch.randn(shape, generator=gen) * 1e-2  # correlated with g_f
    if zero == "forget":
        f = torch.zeros(shape)
    if zero == "retain":
        r = torch.zeros(shape)
    return p.to(dtype), f.to(dtype), r.to(dtype)


def check(stats, layers, backend):
    rtol = SUM_RTOL[backend]
    for i, (name, (p, f, r)) in enumerate(layers.items()):
        assert stats.names[i] == name
        o = oracle(p, f, r)
        assert stats.param_norm[i].item() ** 2 == pytest.approx(o["tt"], rel=rtol, abs=1e-300)
        assert stats.forget_norm[i].item() ** 2 == pytest.approx(o["ff"], rel=rtol, abs=1e-300)
        assert stats.retain_norm[i].item() ** 2 == pytest.approx(o["rr"], rel=rtol, abs=1e-300)
        assert abs(stats.dot[i].item() - o["fr"]) <= rtol * o["abs_fr"] + 1e-300
        assert stats.importance[i].item() == pytest.approx(o["imp"], rel=2 * rtol, abs=1e-300)
        # alignment error follows the dot's, relative to sum|f*r| / (|f||r|) <= 1
        bound = 2 * rtol * (o["abs_fr"] / math.sqrt(o["ff"] * o["rr"]) if o["ff"] and o["rr"] else 1)
        assert abs(stats.alignment[i].item() - o["ali"]) <= bound + 1e-12
    for col in ("param_norm", "forget_norm", "retain_norm", "dot", "importance", "alignment"):
        assert getattr(stats, col).dtype == torch.float64
        assert getattr(stats, col).shape == (len(layers),)


SHAPES = [(1,), (7,), (513,), (33, 17), (3, 5, 7), (2, 3, 4, 5), (64, 3, 3, 3), (1031, 1031)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shapes_and_dtypes_match_float64_oracle(backend, dtype, gen):
    dev = device_for(backend)
    shapes = SHAPES if backend != "triton" or dev.type == "cuda" else SHAPES[:-1] + [(300, 301)]
    layers = {f"l{i}.weight": tuple(t.to(dev) for t in make_layer(s, dtype, gen)) for i, s in enumerate(shapes)}
    stats = stats_of(backend, {n: v[0] for n, v in layers.items()}, {n: v[1] for n, v in layers.items()},
                     {n: v[2] for n, v in layers.items()})
    assert stats.backend == backend
    check(stats, layers, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_over_a_million_elements_float32(backend, gen):
    dev = device_for(backend)
    layers = {n: tuple(t.to(dev) for t in make_layer(shape, torch.float32, gen))
              for n, shape in (("big", (1200, 1001)), ("small", (3,)))}
    stats = stats_of(backend, {n: v[0] for n, v in layers.items()}, {n: v[1] for n, v in layers.items()},
                     {n: v[2] for n, v in layers.items()})
    check(stats, layers, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_layers_mixed_dtypes_and_zero_gradients(backend, gen):
    dev = device_for(backend)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    layers = {}
    for i in range(320):
        shape = tuple(int(x) for x in torch.randint(1, 9, (int(torch.randint(1, 5, (1,), generator=gen)),),
                                                    generator=gen))
        zero = {0: "forget", 1: "retain"}.get(i % 7)
        layers[f"block.{i}.w"] = tuple(t.to(dev) for t in make_layer(shape, dtypes[i % 4], gen, zero))
    stats = stats_of(backend, {n: v[0] for n, v in layers.items()}, {n: v[1] for n, v in layers.items()},
                     {n: v[2] for n, v in layers.items()})
    check(stats, layers, backend)
    zero_forget = [i for i in range(320) if i % 7 == 0]
    assert (stats.importance[zero_forget] == 0).all() and (stats.alignment[zero_forget] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_retain_gradients(backend, gen):
    dev = device_for(backend)
    p, f, _ = (t.to(dev) for t in make_layer((40, 9), torch.float32, gen))
    stats = stats_of(backend, {"w": p}, {"w": f})
    o = oracle(p, f, torch.zeros_like(f))
    assert stats.importance[0].item() == pytest.approx(o["imp"], rel=1e-5)
    assert stats.retain_norm[0].item() == 0 and stats.alignment[0].item() == 0


COLUMNS = ("param_norm", "forget_norm", "retain_norm", "dot", "importance", "alignment")


def float32_layers(gen, n=3):
    return {f"l{i}": make_layer((257, 129), torch.float32, gen) for i in range(n)}


def on(backend, layers):
    """(params, forget, retain) dicts of `layers` on `backend`'s device."""
    dev = device_for(backend)
    return tuple({n: v[k].to(dev) for n, v in layers.items()} for k in range(3))


@pytest.mark.parametrize("backend", available(["cpp"]) + [TRITON])
def test_backends_agree_run_to_run_bit_identical(backend, gen):
    args = on(backend, float32_layers(gen))
    a, b = stats_of(backend, *args), stats_of(backend, *args)
    assert all(torch.equal(getattr(a, c), getattr(b, c)) for c in COLUMNS)


SKIPS = {p.values[0]: p.marks for p in BACKENDS}
PAIRS = [pytest.param(a, b, marks=[*SKIPS[a], *SKIPS[b]], id=f"{a}-{b}")
         for a, b in (("cpp", "triton"), ("cpp", "torch"), ("triton", "torch"))]


@pytest.mark.parametrize("a,b", PAIRS)
def test_backends_agree_on_every_statistic(a, b, gen):
    """cpp, triton and the float64 torch reference, pairwise, on the same tensors."""
    layers = float32_layers(gen)
    sa, sb = stats_of(a, *on(a, layers)), stats_of(b, *on(b, layers))
    rtol = SUM_RTOL[a] + SUM_RTOL[b]
    for i, (p, f, r) in enumerate(layers.values()):
        o = oracle(p, f, r)
        for c in ("param_norm", "forget_norm", "retain_norm", "importance"):
            assert getattr(sa, c)[i].item() == pytest.approx(getattr(sb, c)[i].item(), rel=2 * rtol), c
        assert abs(sa.dot[i].item() - sb.dot[i].item()) <= rtol * o["abs_fr"]
        bound = 2 * rtol * o["abs_fr"] / math.sqrt(o["ff"] * o["rr"])
        assert abs(sa.alignment[i].item() - sb.alignment[i].item()) <= bound + 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["param", "forget", "retain"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_input_is_refused_naming_the_layer(backend, where, bad, gen):
    dev = device_for(backend)
    p, f, r = (t.to(dev) for t in make_layer((50,), torch.float32, gen))
    {"param": p, "forget": f, "retain": r}[where][17] = bad
    ok = tuple(t.to(dev) for t in make_layer((5,), torch.float32, gen))
    named = {"param": "parameter", "forget": "forget gradient", "retain": "retain gradient"}[where]
    with pytest.raises(NonFiniteError, match=rf"^NaN or Inf in {named} of 'enc\.bad'; check"):
        stats_of(backend, {"ok": ok[0], "enc.bad": p}, {"ok": ok[1], "enc.bad": f}, {"ok": ok[2], "enc.bad": r})


def test_bad_inputs_name_what_is_wrong():
    p, f = torch.ones(3, 4), torch.ones(3, 4)
    with pytest.raises(SlugError, match=r"^forget gradient of 'w' has shape \(4, 3\); the parameter has shape \(3, 4\)"):
        slug_fast.layer_stats({"w": p}, {"w": torch.ones(4, 3)})
    with pytest.raises(SlugError, match="^retain gradient of 'w' has dtype torch.float16; it must match the "
                                        "parameter's dtype torch.float32"):
        slug_fast.layer_stats({"w": p}, {"w": f}, {"w": f.half()})
    with pytest.raises(SlugError, match="^forget gradient of 'w' is list, not a tensor"):
        slug_fast.layer_stats({"w": p}, {"w": [1.0]})
    for retain in ({}, {"w": f, "v": f}):  # a layer missing from retain, or one only in retain
        with pytest.raises(SlugError, match="same layers"):
            layer_sums({"w": p, "v": p}, {"w": f}, retain)
    sums, used = layer_sums({"w": p}, {"w": 2 * f}, {"w": -f})  # the default backend: auto
    assert sums.tolist() == [[12.0, 48.0, 12.0, -24.0]] and used in ("cpp", "torch", "triton")
    with pytest.raises(SlugError, match="parameter 'wx' not found; closest: w"):
        slug_fast.layer_stats({"w": p}, {"wx": f})
    with pytest.raises(SlugError, match="same layers"):
        slug_fast.layer_stats({"w": p, "v": p}, {"w": f}, {"v": f})
    with pytest.raises(SlugError, match="takes float32, float64, bfloat16 or float16"):
        slug_fast.layer_stats({"w": p.int()}, {"w": f.int()})
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        slug_fast.layer_stats({"w": p}, {"w": f}, backend="cuda")


def test_empty_input_gives_empty_stats():
    stats = slug_fast.layer_stats({}, {})
    assert stats.names == [] and stats.importance.shape == (0,)
    for sums in (layer_sums({}, {})[0], sums_reference([], [])):
        assert sums.shape == (0, 4) and sums.dtype == torch.float64


def test_tensors_on_two_devices_are_refused():
    p = torch.ones(2, 2)
    with pytest.raises(SlugError, match=r"one device, got \['cpu', 'meta'\]"):
        layer_sums({"a": p, "b": p.to("meta")}, {"a": p, "b": p.to("meta")})


@pytest.mark.parametrize("backend", available(["cpp", "torch"]))
def test_non_contiguous_gradients_are_handled(backend, gen):
    """A strided slice, a transpose and a contiguous tensor in one layer: every statistic."""
    p, f, r = make_layer((30, 40), torch.float32, gen)
    p, f, r = p[:, ::2], f.T.contiguous().T[:, :20], r[:, :20].contiguous()
    assert not p.is_contiguous() and not f.is_contiguous()
    stats = slug_fast.layer_stats({"w": p}, {"w": f}, {"w": r}, backend=backend)
    check(stats, {"w": (p, f, r)}, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_anti_aligned_gradients_have_a_negative_dot_and_a_positive_alignment(backend, seed):
    """Fixed seeds for the sign the random layers never give: <g_f, g_r> < 0."""
    gen = torch.Generator().manual_seed(seed)
    p, f, _ = make_layer((40, 9), torch.float32, gen)
    r = -0.5 * f + torch.randn(f.shape, generator=gen) * 1e-3
    layers = {"w": (p, f, r), "opposite": (p, f, -2 * f)}
    stats = stats_of(backend, *on(backend, layers))
    check(stats, layers, backend)
    assert (stats.dot < 0).all() and stats.alignment[0] > 0.9
    assert stats.alignment[1].item() == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("backend", [TRITON])
def test_triton_kernel_refuses_non_contiguous_tensors(backend):
    from slug_fast import kernels

    dev = device_for(backend)
    p = torch.randn(8, 6, device=dev)
    with pytest.raises(ValueError, match="layer 0: the forget gradient tensor is not contiguous"):
        kernels.layer_sums([p], [p.T.contiguous().T], None)


# (dtype, scale): magnitudes whose float32 squares overflow (3e19, 1e30) or underflow (1e-23,
# 1e-30, 1e-40 is float32-subnormal); float16's own extremes (subnormal 6e-8, near-max 6e4).
EXTREMES = [(torch.float32, s) for s in (1e-23, 1e-30, 1e-40, 3e19, 1e30)] + \
           [(torch.bfloat16, s) for s in (1e-23, 1e-30, 3e19, 1e30)] + \
           [(torch.float16, s) for s in (6e-8, 1e-4, 3e4)] + [(torch.float64, 1e100)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,scale", EXTREMES)
def test_sums_exact_at_extreme_magnitudes(backend, dtype, scale, gen):
    from slug_fast.stats import sums_reference

    dev = device_for(backend)
    n = 1037  # vector blocks and a scalar tail
    signs = torch.randint(0, 2, (3, n), generator=gen) * 2.0 - 1.0
    mant = (1 + torch.rand(3, n, generator=gen, dtype=torch.float64)) * signs
    mant[:, torch.rand(n, generator=gen) < 0.1] = 0.0  # zeros among them
    p, f, r = ((mant[i] * scale).to(dtype) for i in range(3))
    assert (f != 0).any() and f.abs().max().isfinite()  # representable, not flushed to zero
    params = {"w": p.to(dev), "z": torch.zeros(5, dtype=dtype, device=dev)}
    forget = {"w": f.to(dev), "z": torch.zeros(5, dtype=dtype, device=dev)}
    retain = {"w": r.to(dev), "z": torch.zeros(5, dtype=dtype, device=dev)}
    sums = sums_of(backend, params, forget, retain)
    ref = sums_reference([p, params["z"].cpu()], [f, forget["z"].cpu()], [r, retain["z"].cpu()])
    rtol = SUM_RTOL[backend]
    assert torch.allclose(sums[:, :3], ref[:, :3], rtol=rtol, atol=0), (sums, ref)
    abs_fr = (f.double() * r.double()).abs().sum().item()
    assert abs(sums[0, 3].item() - ref[0, 3].item()) <= rtol * abs_fr
    assert sums[1].eq(0).all()
    stats = stats_from_sums(["w", "z"], sums, backend)
    assert stats.importance[0].item() == pytest.approx((ref[0, 1] / ref[0, 0]).sqrt().item(), rel=2 * rtol)


def test_rows_and_index_give_each_layer_by_name():
    """rows(): one dict per layer with every statistic; index(): a layer's position."""
    cols = ("param_norm", "forget_norm", "retain_norm", "dot", "importance", "alignment")
    values = {c: torch.arange(3, dtype=torch.float64) + 10 * k for k, c in enumerate(cols)}
    stats = slug_fast.LayerStats(["a.weight", "b.weight", "c.weight"], *(values[c] for c in cols), backend="torch")
    assert stats.rows() == [{"name": n, **{c: float(values[c][i]) for c in cols}}
                            for i, n in enumerate(["a.weight", "b.weight", "c.weight"])]
    assert [stats.index(n) for n in ("c.weight", "a.weight", "b.weight")] == [2, 0, 1]
    with pytest.raises(SlugError, match="d.weight"):
        stats.index("d.weight")


def test_statistics_of_hand_made_sums():
    """Known answers from a table of sums: a layer with a zero norm has importance 0 (not inf or NaN), a
    zero forget or retain norm gives alignment 0, and rounding that pushes |dot| past ||g_f|| ||g_r|| is
    clamped to alignment 1."""
    sums = torch.tensor([[16.0, 4.0, 9.0, -3.0],  # |theta| 4, |g_f| 2, |g_r| 3
                         [0.0, 4.0, 9.0, 6.0],    # a parameter of zeros
                         [16.0, 0.0, 9.0, 0.0],   # no forget gradient
                         [16.0, 4.0, 0.0, 0.0],   # no retain gradient
                         [1.0, 4.0, 1.0, 2.5]],   # |dot| = 2.5 > 2 * 1
                        dtype=torch.float64)
    stats = stats_from_sums(list("abcde"), sums, "torch")
    assert stats.importance.tolist() == [0.5, 0.0, 0.0, 0.5, 2.0]
    assert stats.alignment.tolist() == [0.5, 1.0, 0.0, 0.0, 1.0]
    assert stats.dot.tolist() == [-3.0, 6.0, 0.0, 0.0, 2.5] and stats.param_norm.tolist() == [4.0, 0.0, 4.0, 4.0, 1.0]


def test_empty_input_reports_the_backend_asked_for():
    """No layer: nothing runs, but the backend reported is the one the call chose, and an
    unknown one is refused as for any input."""
    assert layer_sums({}, {}, backend="torch")[1] == "torch"
    assert slug_fast.layer_stats({}, {}, backend="torch").backend == "torch"
    with pytest.raises(SlugError, match="unknown backend 'nope'"):
        layer_sums({}, {}, backend="nope")


def test_a_non_finite_dot_alone_is_blamed_on_the_retain_gradient():
    """The 4th column (sum g_f * g_r) is reported as the retain gradient's when the squares
    are finite (a table the kernels could give at the edge of float64), and left out when a
    square already names the layer."""
    inf, nan = float("inf"), float("nan")
    with pytest.raises(NonFiniteError, match=r"^NaN or Inf in retain gradient of 'b'; check"):
        _check_finite(["a", "b"], torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, nan]], dtype=torch.float64))
    with pytest.raises(NonFiniteError, match=r"^NaN or Inf in forget gradient of 'a', retain gradient of 'b'; check"):
        _check_finite(["a", "b"], torch.tensor([[1.0, inf, 1.0, inf], [1.0, 2.0, 3.0, -inf]], dtype=torch.float64))
