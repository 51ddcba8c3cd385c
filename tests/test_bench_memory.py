"""bench/bench_memory.py end to end on the shipped mini-CLIP and a tiny transformers CLIP (one process per run)."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_memory.py"


def run(tmp_path, *args):
    out = tmp_path / "rows.jsonl"
    done = subprocess.run([sys.executable, str(SCRIPT), "--dtypes", "fp32", "--images", "4", "--jsonl", str(out),
                           *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout, [json.loads(line) for line in out.read_text().splitlines()]


def test_each_mode_runs_in_its_own_process_and_prints_its_row(tmp_path):
    stdout, rows = run(tmp_path, "--models", "digits", "--modes", "full,chunked3,budget100")
    assert [r["mode"] for r in rows] == ["full", "chunked3", "budget100"]
    assert [r["store"] for r in rows[:2]] == ["full", "chunked"] and rows[1]["passes"] == 3
    assert rows[2]["budget_bytes"] == 100 * rows[2]["weight_bytes"] and rows[2]["predicted_bytes"] <= rows[2]["budget_bytes"]
    assert rows[0]["chosen"] == rows[1]["chosen"] == rows[2]["chosen"] and rows[0]["step"] == rows[1]["step"]
    assert all(r["peak_bytes"] >= 0 and r["seconds"] > 0 for r in rows)
    assert "chunked3" in stdout and "x full" in stdout


def test_transformers_family_and_a_failing_mode_is_reported(tmp_path):
    stdout, rows = run(tmp_path, "--family", "hf", "--models", "tiny", "--modes", "full,offload,chunked2+ckpt")
    assert [r["mode"] for r in rows] == ["full", "chunked2+ckpt"]  # offload needs CUDA: reported, not fatal
    assert "offload         failed: slug_fast.errors.SlugError: the offload store" in stdout
    assert rows[1]["passes"] == 2 and rows[0]["chosen"] == rows[1]["chosen"]
