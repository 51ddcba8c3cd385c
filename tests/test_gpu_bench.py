"""bench/gpu/bench_gpu.py end to end in its smoke mode (toy sizes; Triton's interpreter without a GPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu" / "bench_gpu.py"


def test_smoke_mode_checks_correctness_and_prints_the_table(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True, timeout=600,
                          env=env)
    assert done.returncode == 0, done.stderr
    info = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert info["correctness"]["ok"] and info["correctness"]["stats_bit_identical"]
    assert [r["set"] for r in info["rows"]] == ["ViT-B-32 (toy)", "LLaVA (toy)"]
    for row in info["rows"]:
        assert row["bit_identical"] and row["ours_ms"] > 0 and row["authors_ms"] > 0 and row["update_ms"] > 0
    assert "ViT-B-32 (toy)" in done.stdout and "copy bandwidth" in done.stdout
