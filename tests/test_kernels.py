"""The Triton kernels' cached tile tables, their aligned full-tile path, and what they compile to.

Run on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py sets it) or on a GPU. The
compiled-code tests build the kernels for sm_90 with Triton's own compiler and ptxas, which
need no GPU.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slug_fast import _backends
from slug_fast.edit import axpy_reference
from slug_fast.stats import sums_reference

pytestmark = pytest.mark.skipif(_backends.kernels_reason() is not None, reason=str(_backends.kernels_reason()))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def kernels():
    from slug_fast import kernels
    kernels.tables.clear_cache()
    yield kernels
    kernels.tables.clear_cache()


def rand(shape, dtype, gen):
    return torch.randn(shape, generator=gen).to(DEVICE, dtype)


def exact(params, forget, retain):
    return sums_reference([p.cpu() for p in params], [f.cpu() for f in forget], [r.cpu() for r in retain])


def test_a_repeated_call_builds_no_table_and_gives_the_same_bits(kernels, gen):
    params = [rand(s, torch.float32, gen) for s in [(5,), (8193,), (2, 3)]]
    forget = [rand(p.shape, torch.float32, gen) for p in params]
    first = kernels.layer_sums(params, forget, params)
    assert kernels.tables.cache_info() == {"hits": 0, "builds": 1, "size": 1}
    for _ in range(3):
        assert torch.equal(kernels.layer_sums(params, forget, params), first)
    assert kernels.tables.cache_info() == {"hits": 3, "builds": 1, "size": 1}
    # the same tensors without retain gradients: other addresses in the g_r row, another entry
    kernels.layer_sums(params, forget)
    assert kernels.tables.cache_info()["builds"] == 2


def test_values_changed_in_place_are_read_again(kernels, gen):
    """The tables hold addresses, not data: new values at the same addresses give new sums."""
    params = [rand((3000,), torch.bfloat16, gen)]
    forget = [rand((3000,), torch.bfloat16, gen)]
    kernels.layer_sums(params, forget, forget)
    params[0].mul_(2)
    forget[0].neg_()
    torch.testing.assert_close(kernels.layer_sums(params, forget, forget).cpu(), exact(params, forget, forget),
                               rtol=1e-12, atol=0)
    assert kernels.tables.cache_info() == {"hits": 1, "builds": 1, "size": 1}

    out = torch.empty_like(params[0])
    kernels.axpy_into(out, params[0], forget[0], 0.5)
    params[0].add_(1)
    kernels.axpy_into(out, params[0], forget[0], 0.5)
    ref = torch.empty_like(out)
    axpy_reference(ref, params[0], forget[0], 0.5)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("change", ["shape", "dtype", "storage"])
def test_a_tensor_that_changes_shape_dtype_or_storage_gets_new_tables(kernels, change, gen):
    storage = rand((4096 + 7,), torch.float16, gen)
    g = rand((4096 + 7,), torch.float16, gen)
    kernels.layer_sums([storage], [g], [g])
    if change == "shape":  # same address, fewer elements: a table of the old size would read past the end
        p, f = storage[:4096], g[:4096]
    elif change == "dtype":  # same address and bytes read as bfloat16
        p, f = storage.view(torch.bfloat16), g.view(torch.bfloat16)
    else:  # the parameter's storage replaced (as `param.data = ...` does)
        p, f = storage.clone(), g
    sums = kernels.layer_sums([p], [f], [f])
    assert kernels.tables.cache_info()["builds"] == 2
    torch.testing.assert_close(sums.cpu(), exact([p], [f], [f]), rtol=1e-12, atol=0)


def test_a_transposed_view_of_a_cached_tensor_is_refused(kernels, gen):
    """x.T has x's address, size and dtype: only the contiguity check tells them apart."""
    x = rand((64, 48), torch.float32, gen)
    kernels.layer_sums([x], [x], [x])
    with pytest.raises(ValueError, match="layer 0: the forget gradient tensor is not contiguous"):
        kernels.layer_sums([x.T.contiguous()], [x.T], [x.T.contiguous()])
    with pytest.raises(ValueError, match="tensor 0: axpy_many takes contiguous tensors"):
        kernels.axpy_many([x.T], [x.T.contiguous()], [x.T.contiguous()], 1.0)


def test_tensors_allocated_where_freed_ones_were_are_summed_correctly(kernels, gen):
    """A cached entry is used only by tensors at exactly its addresses, so after the tensors are
    freed and new ones allocated (often at the same addresses), the sums are the new tensors'."""
    for round_ in range(4):
        shape = (9000,) if round_ % 2 else (4500, 2)  # same bytes, another shape: another key
        params = [rand(shape, torch.float32, gen)]
        forget = [rand(shape, torch.float32, gen)]
        sums = kernels.layer_sums(params, forget, forget)
        torch.testing.assert_close(sums.cpu(), exact(params, forget, forget), rtol=1e-12, atol=0)
        del params, forget


def test_the_cache_keeps_the_most_recent_entries(kernels, gen, monkeypatch):
    monkeypatch.setattr(kernels.tables, "CACHE_SIZE", 2)
    sets = [[rand((n,), torch.float32, gen)] for n in (3, 4, 5)]
    for s in sets:
        kernels.layer_sums(s, s)
    assert kernels.tables.cache_info()["size"] == 2
    kernels.layer_sums(sets[2], sets[2])  # kept
    kernels.layer_sums(sets[0], sets[0])  # evicted: built again
    assert kernels.tables.cache_info() == {"hits": 1, "builds": 4, "size": 2}


def test_aligned_and_unaligned_tensors_and_partial_tiles_match_float64(kernels, gen):
    """Full tiles, a partial last tile and a layer shorter than a block, in a group whose tensors
    all start at 16-byte boundaries (the vector path) and in one that does not."""
    tile = kernels.stats.TILE
    sizes = [tile, 2 * tile + 1, tile - 1, 3]
    aligned = [rand((n,), torch.float32, gen) for n in sizes]
    backing = [rand((n + 1,), torch.float32, gen) for n in sizes]
    unaligned = [b[1:] for b in backing]  # 4 bytes past a 16-byte boundary
    assert all(t.data_ptr() % 16 == 0 for t in aligned) and all(t.data_ptr() % 16 == 4 for t in unaligned)
    plan = kernels.stats.plan(aligned, unaligned, aligned)
    assert [g.aligned for g in plan.groups] == [False]  # one unaligned tensor makes the group unaligned
    assert [g.aligned for g in kernels.stats.plan(aligned, aligned, aligned).groups] == [True]
    for p, f in [(aligned, [rand((n,), torch.float32, gen) for n in sizes]), (aligned, unaligned)]:
        sums = kernels.layer_sums(p, f, p)
        torch.testing.assert_close(sums.cpu(), exact(p, f, p), rtol=1e-12, atol=0)
    outs = [torch.empty_like(t) for t in aligned]
    kernels.axpy_many(outs, aligned, unaligned, 1.25)
    for o, b, d in zip(outs, aligned, unaligned):
        ref = torch.empty_like(o)
        axpy_reference(ref, b, d, 1.25)
        assert torch.equal(o, ref)


def test_launch_with_a_prebuilt_plan_equals_a_call(kernels, gen):
    params = [rand((700,), torch.bfloat16, gen), rand((20, 30), torch.float32, gen)]
    forget = [rand(p.shape, p.dtype, gen) for p in params]
    plan = kernels.stats.plan(params, forget)
    assert plan.tiles == 2 and [g.dtypes[0] for g in plan.groups] == [torch.bfloat16, torch.float32]
    assert torch.equal(kernels.stats.launch(plan, False), kernels.layer_sums(params, forget))


def test_launches_go_to_the_tensors_gpu():
    """Raw addresses are valid only on their own GPU: kernels launch under its device guard."""
    from slug_fast.kernels.tables import device_guard
    guard = device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(device_guard(torch.device("cpu")), torch.cuda.device)


# ---------------------------------------------------------------- compiled for sm_90, no GPU needed

@pytest.fixture(scope="module")
def compiled():
    """Each kernel variant's global memory operations and ptxas report, compiled for sm_90."""
    triton = pytest.importorskip("triton")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this Triton ships no CUDA backend with ptxas")
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu" / "compile_sm90.py"
    done = subprocess.run([sys.executable, str(script), "--json"], capture_output=True, text=True, timeout=600)
    if done.returncode != 0 and "ImportError" in done.stderr and "GPUTarget" in done.stderr:
        pytest.skip(f"this Triton has no ahead-of-time compile API: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("element", ["fp32", "bf16", "fp16", "fp64"])
def test_aligned_stats_tiles_load_16_bytes_at_a_time_on_sm90(compiled, element):
    """The full-tile branch loads 16-byte vectors (the masked tail stays scalar); without the
    alignment hint nothing is vectorised."""
    vector = compiled[f"stats {element} aligned=True"]["ops"]
    scalar = compiled[f"stats {element} aligned=False"]["ops"]
    wide = "ld.global.v2.b64" if element == "fp64" else "ld.global.v4.b32"
    assert vector.get(wide, 0) > 0, vector
    assert not any(".v" in op for op in scalar), scalar


def test_the_default_warps_compile_without_register_spills_on_sm90(compiled):
    for variant, report in compiled.items():
        assert report["spill_bytes"] == 0, (variant, report)


@pytest.mark.parametrize("element", ["fp32", "bf16"])
def test_aligned_update_tiles_load_and_store_16_bytes_at_a_time_on_sm90(compiled, element):
    ops = compiled[f"update {element} aligned=True"]["ops"]
    assert ops.get("ld.global.v4.b32", 0) > 0 and ops.get("st.global.v4.b32", 0) > 0, ops


def test_the_combine_kernel_compiles_for_sm90(compiled):
    assert compiled["combine"]["ops"].get("ld.global.b64", 0) + compiled["combine"]["ops"].get("ld.global.v2.b64", 0) > 0
