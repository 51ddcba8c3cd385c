"""bench/gpu/run.sh end to end in its smoke mode: every stage at toy sizes, on CPU tensors under
Triton's interpreter, through the same code path as on the GPU (the "triton" backend)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slug_fast import _backends

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(_backends.kernels_reason() is not None, reason=str(_backends.kernels_reason()))


def run_staged(tmp_path, *args, **env):
    env = {**os.environ, "OUT": str(tmp_path), "SMOKE": "1", **env}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # python3 is this interpreter
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu" / "run.sh"), *args], capture_output=True, text=True,
                          timeout=900, env=env, cwd=tmp_path)


def test_every_stage_runs_on_the_triton_path_and_writes_its_rows(tmp_path):
    done = run_staged(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "gpu_bench.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in rows]
    assert kinds == ["versions", "check", "bandwidth", "set", "set", "big", "host", "host", "host"]
    check = rows[1]
    assert check["ok"] and check["stats_backend"] == "triton" and check["update_backends"] == ["triton"]
    assert check["stats_bit_identical"] and check["update_matches_torch"] and check["repeat_table_builds"] == 0
    for row in rows[3:5]:
        assert row["backend"] == "triton" and row["bit_identical"] and row["repeat_table_builds"] == 0
        assert row["kernel_ms"] > 0 and row["e2e_ms"] > 0 and row["update_kernel_ms"] > 0
        assert set(row["kernel_ms_by_warps"]) == {"4", "8"}
    assert [r["set"] for r in rows[3:5]] == ["ViT-B-32 (toy)", "LLaVA (toy)"]
    assert rows[5]["ok"] and rows[5]["elements"] > 2**16
    log = (tmp_path / "run.log").read_text()
    assert [r["tensors"] for r in rows[6:]] == [906, 2058, 2052] and all(r["host_ms"] > 0 for r in rows[6:])
    for stage in ("versions", "check", "bandwidth", "sets", "big", "host", "table"):
        assert f"== {stage}: exit 0" in log
    assert "ViT-B-32 (toy)" in log and "goals:" in log


def test_a_failed_check_stops_the_run_before_any_timing(tmp_path):
    """Without the interpreter the Triton path cannot run on this machine: the check stage fails
    and the run ends there, exit 1, with the versions row kept."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the Triton path runs")
    done = run_staged(tmp_path, TRITON_INTERPRET="0")
    assert done.returncode == 1
    log = (tmp_path / "run.log").read_text()
    assert "== check: exit 1" in log and "the triton backend takes CUDA tensors" in log and "== bandwidth" not in log
    rows = [json.loads(line) for line in (tmp_path / "gpu_bench.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["versions"]
