"""bench/bench_distributed.py end to end on a tiny open_clip config: one process, then two (owner and replicated)."""
import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_distributed.py"
BATCHES = 4  # of each set: two per rank on two ranks


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_distributed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """(stdout, {(world, partition): [rows of the one launch]}) of one bench run."""
    out = tmp_path_factory.mktemp("bench_distributed") / "rows.jsonl"
    done = subprocess.run([sys.executable, str(SCRIPT), "--model", "tiny", "--batches", str(BATCHES), "--worlds", "1,2",
                           "--jsonl", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    runs = {}
    for line in out.read_text().splitlines():
        row = json.loads(line)
        runs.setdefault((row["world"], row["partition"]), [[]])[0].append(row)
    return done.stdout, runs


def sizes(row):
    """(bytes of every eligible layer, of their float32 sums, of the largest sum): tiny is float32."""
    assert {d for _, d in row["eligible"]} == {"float32"}
    total = sum(4 * n for n, _ in row["eligible"])
    return total, total, max(4 * n for n, _ in row["eligible"])


def test_every_rank_reports_the_same_decision_and_the_predicted_costs(bench_run):
    import torch

    from slug_fast.distributed import predicted_cost

    stdout, runs = bench_run
    assert set(runs) == {(1, "single"), (2, "owner"), (2, "replicated")}
    (single,), owner, replicated = runs[1, "single"][0], runs[2, "owner"][0], runs[2, "replicated"][0]
    for rows in (owner, replicated):
        assert sorted(r["rank"] for r in rows) == [0, 1]
        assert all(r["mine"] == {"forget": 2, "retain": 2} and r["batches"] == {"forget": 4, "retain": 4}
                   for r in rows)
    for r in owner + replicated:
        assert r["layers"] == single["layers"] and r["step"] == pytest.approx(single["step"], rel=1e-6)
        assert r["measured_peak_bytes"] > 0 and r["seconds"] > 0

    weights, sums, largest = sizes(single)
    n_layers = len(single["eligible"])
    # one process: the forget means and the retain sums, and a gradient being added to its sum
    assert single["gradient_peak_bytes"] == weights + sums + largest
    # by hand, not through predicted_cost: owner, each of the 2 forget and 2 retain rounds reduces every
    # layer; all_reduce: two int64 flags per round and one more per set, two counts, the [layers, 4] table
    hand = {"owner": {"reduce": 4 * sums, "all_reduce": 16 * (4 + 2) + 16 + 32 * n_layers},
            "replicated": {"reduce": 0, "all_reduce": 2 * sums + 16 + 32 * n_layers}}
    layers = [(n, getattr(torch, d)) for n, d in single["eligible"]]
    for partition, rows in (("owner", owner), ("replicated", replicated)):
        cost = predicted_cost(layers, 2, {"forget": 2, "retain": 2}, partition)
        for r, c in zip(sorted(rows, key=lambda r: r["rank"]), cost):
            for kind in ("reduce", "all_reduce"):
                assert r["sent"].get(kind, 0) == c["sent"].get(kind, 0) == hand[partition][kind], (partition, kind)
            assert r["gradient_peak_bytes"] == c["gradient_bytes"]
    assert all(r["gradient_peak_bytes"] == single["gradient_peak_bytes"] for r in replicated)
    # owner: each rank within one process's / N + the largest layer, and every layer kept by one rank only
    assert all(r["gradient_peak_bytes"] <= single["gradient_peak_bytes"] / 2 + largest for r in owner)
    assert sum(r["gradient_peak_bytes"] for r in owner) == weights + sums + 2 * largest
    assert load_bench().check(runs) == []
    assert "checks: all hold" in stdout and "x 1" in stdout and "predicted" in stdout


def test_the_checks_catch_a_doubled_count_a_wrong_partition_and_a_different_step(bench_run, monkeypatch):
    import slug_fast.distributed as distributed

    bench = load_bench()
    _, runs = bench_run

    def corrupted(world, partition, rank, **changes):
        out = copy.deepcopy(runs)
        row = next(r for r in out[world, partition][0] if r["rank"] == rank)
        for key, fn in changes.items():
            row[key] = fn(row[key])
        return out

    doubled = corrupted(2, "owner", 1, sent=lambda s: {**s, "reduce": 2 * s["reduce"]})
    assert any("rank 1: sent reduce" in p for p in bench.check(doubled))
    halved = corrupted(2, "replicated", 0, sent=lambda s: {**s, "all_reduce": s["all_reduce"] // 2})
    assert any("replicated rank 0: sent all_reduce" in p for p in bench.check(halved))
    _, _, largest = sizes(runs[1, "single"][0][0])
    twice = corrupted(2, "owner", 0, gradient_peak_bytes=lambda g: g + largest)  # as if a layer were kept twice
    problems = bench.check(twice)
    assert any("add up to" in p for p in problems) and any("owner rank 0: gradient peak" in p for p in problems)
    stepped = corrupted(2, "replicated", 1, step=lambda s: s * (1 + 1e-5))
    assert any("replicated rank 1: chose" in p for p in bench.check(stepped))

    true_cost = distributed.predicted_cost

    def doubled_cost(*args, **kwargs):
        out = true_cost(*args, **kwargs)
        for c in out:
            c["sent"] = {k: 2 * v for k, v in c["sent"].items()}
        return out

    monkeypatch.setattr(distributed, "predicted_cost", doubled_cost)
    assert sum("sent" in p for p in bench.check(runs)) == 6  # owner: 2 kinds x 2 ranks; replicated: no reduce
    monkeypatch.setattr(distributed, "predicted_cost", true_cost)
    # a partition other than the stores': every layer to rank 0
    monkeypatch.setattr(distributed, "owners", lambda sizes, world: [0] * len(sizes))
    assert any("2 owner rank 1: gradient peak" in p for p in bench.check(runs))
    monkeypatch.undo()
    assert bench.check(runs) == []
