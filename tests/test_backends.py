"""Backend names over torch's dispatcher: which kernel runs, the fallback when the extension is
missing, and the SlugError for a backend that cannot serve the tensors."""
import json
import os
import subprocess
import sys

import pytest
import torch

import slug_fast
from slug_fast import _backends
from slug_fast.errors import SlugError

# A process in which slug_fast._C cannot be imported: slug_fast declares the operators itself,
# without CPU kernels (the GPU bench runs so from a source tree).
WITHOUT_EXTENSION = r"""
import json, logging, sys
sys.modules["slug_fast._C"] = None  # `import slug_fast._C` now raises ImportError
logging.basicConfig(level=logging.WARNING, format="%(message)s")
import torch, slug_fast
from slug_fast.errors import SlugError
p, f, r = (torch.arange(30.0).reshape(10, 3) - k for k in (0, 7, 11))
stats = slug_fast.layer_stats({"w": p}, {"w": f}, {"w": r})
out = {"backend": stats.backend, "alignment": stats.alignment[0].item(), "backends": slug_fast.backends(),
       "front": slug_fast.pareto_front([0.1, 0.2, 0.3], [1.0, 2.0, 0.5]),
       "schemas": {op: str(getattr(torch.ops.slug_fast, op).default._schema) for op in slug_fast._backends.SCHEMAS},
       "triton": slug_fast.layer_stats({"w": p}, {"w": f}, {"w": r}, backend="triton").backend
       if slug_fast._backends.kernels_reason() is None else None}
with slug_fast.LayerEdit({"w": p}, {"w": f}) as edit:
    edit.step(0.5)
    out["edit"] = edit.used_backend
    out["edited"] = torch.equal(p, (torch.arange(30.0).reshape(10, 3) + 0.5 * f))
try:
    slug_fast.layer_stats({"w": p}, {"w": f}, backend="cpp")
except SlugError as e:
    out["forced"] = str(e)
print(json.dumps(out))
"""


def test_missing_extension_falls_back_to_torch_and_says_so():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", WITHOUT_EXTENSION], capture_output=True, text=True, timeout=600,
                          env=env)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["schemas"] == {op: f"slug_fast::{op}{schema}" for op, schema in _backends.SCHEMAS.items()}
    assert out["backend"] == "torch" and out["edit"] == "torch" and out["edited"]
    if _backends.kernels_reason() is None:  # the Triton kernels still run by name, interpreted
        assert out["triton"] == "triton"
    assert "layer_sums: cpp backend skipped: the C++ extension slug_fast._C is not built" in done.stderr
    assert "axpy_into: cpp backend skipped" in done.stderr and "pareto_front: cpp backend skipped" in done.stderr
    assert done.stderr.count("layer_sums: cpp backend skipped") == 1  # once per operator and reason
    f = torch.arange(30.0, dtype=torch.float64) - 7
    r = torch.arange(30.0, dtype=torch.float64) - 11
    assert out["alignment"] == pytest.approx(abs(float(f @ r)) / float(f.norm() * r.norm()), rel=1e-12)
    assert out["front"] == [0, 1]
    assert out["backends"]["cpp"].startswith("the C++ extension slug_fast._C is not built")
    assert out["backends"]["triton"] and out["backends"]["torch"] is None
    assert out["forced"].startswith("layer_sums: backend 'cpp' is unavailable: the C++ extension")


def test_auto_picks_the_kernel_of_the_device():
    if slug_fast.backends()["cpp"] is not None:
        pytest.skip(f"extension not built: {slug_fast.backends()['cpp']}")
    assert slug_fast.layer_stats({"w": torch.ones(3)}, {"w": torch.ones(3)}).backend == "cpp"
    if torch.cuda.is_available() and slug_fast.backends()["triton"] is None:
        x = torch.ones(3, device="cuda")
        assert slug_fast.layer_stats({"w": x}, {"w": x}).backend == "triton"
    # a device without a kernel: the reference
    assert _backends.resolve("axpy_into", torch.device("meta")) == "torch"


def test_triton_takes_cuda_tensors(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the triton backend takes its tensors here")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SlugError, match="layer_sums: the triton backend takes CUDA tensors, got tensors on cpu"):
        slug_fast.layer_stats({"w": torch.ones(3)}, {"w": torch.ones(3)}, backend="triton")
    with pytest.raises(SlugError, match="axpy_into: the triton backend takes CUDA tensors"):
        slug_fast.edit.axpy(torch.ones(3), torch.ones(3), torch.ones(3), 1.0, backend="triton")
    assert "no CUDA device" in slug_fast.backends()["triton"]


def test_triton_named_runs_cpu_tensors_under_the_interpreter(monkeypatch):
    """TRITON_INTERPRET=1: backend="triton" runs the Triton kernels on CPU tensors (the GPU
    bench's smoke mode tests its own code path so); "auto" still picks the kernel of the device."""
    if _backends.kernels_reason() is not None:
        pytest.skip(_backends.kernels_reason())
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    theta, g_f, g_r = torch.tensor([3.0, 4.0]), torch.tensor([1.0, 0.0]), torch.tensor([-2.0, 0.0])
    stats = slug_fast.layer_stats({"w": theta}, {"w": g_f}, {"w": g_r}, backend="triton")
    assert stats.backend == "triton"
    assert stats.importance.tolist() == [0.2] and stats.alignment.tolist() == [1.0] and stats.dot.tolist() == [-2.0]
    out = torch.empty(2)
    assert slug_fast.edit.axpy(out, theta, g_f, -0.5, backend="triton") == "triton"
    assert out.tolist() == [2.5, 4.0]
    auto = slug_fast.layer_stats({"w": theta}, {"w": g_f}).backend
    assert auto == ("cpp" if slug_fast.backends()["cpp"] is None else "torch")



def test_cpp_takes_cpu_tensors():
    meta = torch.ones(3, device="meta")
    with pytest.raises(SlugError, match="layer_sums: the cpp backend takes CPU tensors, got tensors on meta"):
        slug_fast.layer_stats({"w": meta}, {"w": meta}, backend="cpp")


def test_pareto_front_names_the_backends_it_has():
    assert slug_fast.pareto_front([0.1, 0.2], [1.0, 2.0], backend="cpp") == [0, 1]
    no_triton = r"pareto_front has no triton kernel .* choose 'auto', 'torch' or one of \('cpp',\)"
    with pytest.raises(SlugError, match=no_triton):
        slug_fast.pareto_front([0.1, 0.2], [1.0, 2.0], backend="triton")
    with pytest.raises(SlugError, match="pareto_front: unknown backend 'gpu'; choose 'auto' or one of"):
        slug_fast.pareto_front([0.1], [1.0], backend="gpu")
