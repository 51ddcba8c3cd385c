"""The dispatcher: which backend runs, and the fallback when one cannot load."""
import logging

import pytest
import torch

import slug_fast
from slug_fast import _backends


def test_missing_extension_falls_back_to_torch_and_says_so(monkeypatch, caplog):
    real_load = _backends._load

    def no_cpp(backend):
        if backend == "cpp":
            return None, "the C++ extension slug_fast._C is not built (simulated)"
        return real_load(backend)

    monkeypatch.setattr(_backends, "_load", no_cpp)
    _backends._warn_once.cache_clear()
    p, f, r = torch.randn(10, 3), torch.randn(10, 3), torch.randn(10, 3)
    with caplog.at_level(logging.WARNING, logger="slug_fast"):
        stats = slug_fast.layer_stats({"w": p}, {"w": f}, {"w": r})
    assert stats.backend == "torch"
    assert "cpp backend skipped: the C++ extension slug_fast._C is not built (simulated)" in caplog.text
    expected = (f.double() * r.double()).sum().abs() / (f.double().norm() * r.double().norm())
    assert stats.alignment[0].item() == pytest.approx(expected.item(), rel=1e-12)
    assert slug_fast.pareto_front([0.1, 0.2], [1.0, 2.0]) == [0, 1]
    with pytest.raises(RuntimeError, match="backend 'cpp' is unavailable: the C\\+\\+ extension"):
        slug_fast.layer_stats({"w": p}, {"w": f}, backend="cpp")
    _backends._warn_once.cache_clear()


def test_auto_picks_cpp_for_cpu_tensors_when_built():
    if slug_fast.backends()["cpp"] is not None:
        pytest.skip(f"extension not built: {slug_fast.backends()['cpp']}")
    assert slug_fast.layer_stats({"w": torch.ones(3)}, {"w": torch.ones(3)}).backend == "cpp"


def test_triton_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the triton backend takes CUDA tensors here")
    with pytest.raises(ValueError, match="the triton backend takes CUDA tensors"):
        slug_fast.layer_stats({"w": torch.ones(3)}, {"w": torch.ones(3)}, backend="triton")
    assert "no CUDA device" in slug_fast.backends()["triton"]
