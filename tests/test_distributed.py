"""SLUG on several processes (torch.distributed, gloo on the CPU) against one process.

tests/dist_worker.py runs every scenario under torchrun with 2 and 3 ranks holding unequal
numbers of batches (one rank has none in the data-parallel runs); rank 0 also runs each
alone on all the batches, the oracle. Decisions must match exactly (fronts, layer, the
search's verdicts), statistics to 1e-6 relative, deltas and edited weights to float32
rounding.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slug_fast.demo import demo_task
from slug_fast.pareto import is_eligible

HERE = Path(__file__).parent
SCENARIOS = ("owner", "replicated", "hf_clip", "fsdp")


def torchrun(nproc: int, *args, timeout: int = 600, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"{n}ranks")
def runs(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"dist{world}")
    res = torchrun(world, HERE / "dist_worker.py", out)
    assert res.returncode == 0, res.stderr[-4000:]
    load = lambda name, r: torch.load(out / f"{name}-{r}.pt", weights_only=False)  # noqa: E731 - our own files
    return world, load


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1e-30)).max())


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_same_decisions_statistics_and_delta_as_one_process(runs, scenario):
    world, load = runs
    single = load(scenario, 0)["single"]
    for rank in range(world):
        got = load(scenario, rank)
        multi = got["multi"]
        assert multi["names"] == single["names"]
        assert relative(multi["stats"], single["stats"]) <= 1e-6
        assert multi["fronts"] == single["fronts"]
        assert multi["layers"] == single["layers"]
        # the same search path: the same verdicts at the same multiples of the start step
        for (layers, start, trace), (layers1, start1, trace1) in zip(multi["candidates"], single["candidates"]):
            assert layers == layers1 and [s for _, s in trace] == [s for _, s in trace1]
            assert abs(start / start1 - 1) <= 1e-6
            assert [step / start for step, _ in trace] == pytest.approx([s / start1 for s, _ in trace1], rel=1e-12)
        assert multi["step"] == pytest.approx(single["step"], rel=1e-6)
        for key, d in single["delta"].items():
            assert float((multi["delta"][key] - d).abs().max()) <= 1e-5 * float(d.abs().max())
        if "single_weights" in load(scenario, 0):
            for name, w in load(scenario, 0)["single_weights"].items():
                assert float((got["multi_weights"][name] - w).abs().max()) <= 1e-5 * float(w.abs().max())
        # the global batch counts, though every rank held a different share
        assert multi["ranks"]["world"] == world and multi["ranks"]["rank"] == rank


def test_ranks_held_unequal_shares(runs):
    world, load = runs
    task = demo_task("seven")
    counts = load("owner", 0)["multi"]["ranks"]["batches"]
    assert counts == {"forget": len(task.forget), "retain": len(task.retain)}


def test_owner_partition_keeps_a_share_of_the_gradients(runs):
    """Counted gradient bytes per rank: at most 1/N of one process's plus the largest layer;
    the replicated partition holds what one process holds."""
    world, load = runs
    model = demo_task("seven").model
    largest = max(p.numel() * 4 for n, p in model.named_parameters() if is_eligible(n, tuple(p.shape)))
    single = load("owner", 0)["single"]["gradient_peak"]
    owned = [load("owner", r)["multi"]["gradient_peak"] for r in range(world)]
    assert all(0 < g <= single / world + largest for g in owned), (owned, single, largest)
    assert sum(owned) < single + world * largest
    replicated = [load("replicated", r)["multi"]["gradient_peak"] for r in range(world)]
    assert all(g == single for g in replicated)


def test_fsdp_edits_each_rank_shard_and_nothing_else(runs):
    world, load = runs
    for rank in range(world):
        got = load("fsdp", rank)
        assert got["sharded"] and got["unchanged_elsewhere"]
        layer = got["multi"]["layers"][0]
        full = got["multi_weights"][layer].shape
        assert got["local_shapes"][layer][0] < full[0]  # this rank held a slice of the edited layer
        assert got["multi"]["ranks"]["partition"] == "fsdp"


def test_a_failure_on_one_rank_stops_and_restores_every_rank(runs):
    world, load = runs
    last = world - 1
    for rank in range(world):
        got = load("failures", rank)
        assert got["criterion_restored"] and got["nan_restored"] and got["edit_restored"]
        if rank == last:
            assert got["criterion"] == "RuntimeError: this rank's evaluation broke"
            assert got["edit"] == "RuntimeError: this rank's edit broke"
            assert got["owner"].startswith("NonFiniteError: forget loss is nan")
        else:
            assert got["criterion"].startswith(f"RankFailed: rank {last} of {world} failed while judging step")
            assert got["criterion"].endswith("RuntimeError: this rank's evaluation broke")
            assert got["edit"] == (f"RankFailed: rank {last} of {world} failed while applying the edit: "
                                   "RuntimeError: this rank's edit broke")
            assert got["owner"].startswith(f"RankFailed: rank {last} of {world} failed while computing the forget")
        assert "forget loss is nan" in got["replicated"]


def test_rank0_verdicts_decide_even_when_ranks_disagree(runs):
    world, load = runs
    single = load("owner", 0)["single"]
    for rank in range(world):
        got = load("verdicts", rank)
        assert got["multi"]["layers"] == single["layers"]
        assert [s for _, s in got["multi"]["trace"]] == [s for _, s in single["trace"]]
        assert got["multi"]["step"] == pytest.approx(single["step"], rel=1e-6)
        for name, w in load("verdicts", 0)["multi_weights"].items():
            assert torch.equal(got["multi_weights"][name], w)  # the same edit on every rank, bit for bit


def test_distributed_concept_criterion_equals_one_process(runs):
    world, load = runs
    for rank in range(world):
        got = load("criterion", rank)
        assert got["spread"] == got["alone"]
        assert got["alone"][1]["n_forget"] + got["alone"][1]["n_others"] == 101


@pytest.fixture(scope="module")
def saved_job(tmp_path_factory, digits_trained):
    from safetensors.torch import save_file
    from test_cli_jobs import write_shard

    from slug_fast import digits

    state, data = digits_trained
    root = tmp_path_factory.mktemp("distjob")
    (root / "model").mkdir()
    (root / "model" / "open_clip_config.json").write_text(json.dumps(digits.open_clip_config(data)))
    save_file({k: v.contiguous() for k, v in state.items()}, root / "model" / "open_clip_model.safetensors")
    gen = torch.Generator().manual_seed(0)
    write_shard(root / "train.tar", data.train_images[:300], data.train_labels[:300], data, gen)
    return root


def job_args(root, out):
    from slug_fast import digits

    return ["-m", "slug_fast", "unlearn", "--model", root / "model", "--data", root / "train.tar",
            "--concept", "seven", "--class-names", ",".join(digits.DIGIT_NAMES), "--out", out, "--quiet",
            "--batch-size", "16"]


def test_cli_under_torchrun_matches_one_process_and_only_rank0_writes(saved_job, tmp_path):
    alone = subprocess.run([sys.executable, *map(str, job_args(saved_job, tmp_path / "alone"))], capture_output=True,
                           text=True, timeout=600, env={**os.environ, "TQDM_DISABLE": "1"})
    assert alone.returncode == 0, alone.stderr
    res = torchrun(2, *job_args(saved_job, tmp_path / "two"), "--timeout", "120")
    assert res.returncode == 0, res.stderr[-3000:]
    report, single = json.loads(res.stdout), json.loads(alone.stdout)  # one JSON document: rank 0's
    assert report == json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["layer"] == single["layer"]
    assert report["step"] == pytest.approx(single["step"], rel=1e-6)
    assert report["forget"] == single["forget"] and report["retain"] == single["retain"]
    assert report["unlearn"]["ranks"]["world"] == 2 and report["unlearn"]["ranks"]["partition"] == "owner"
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "alone").iterdir())
    assert not list((tmp_path / "two").glob("*.tmp*"))


def test_cli_under_torchrun_bad_input_is_one_line_from_rank0(saved_job, tmp_path):
    args = job_args(saved_job, tmp_path / "out")
    args[args.index("--data") + 1] = tmp_path / "missing.tar"
    res = torchrun(2, *args, timeout=300)
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("slug-fast: error:")]
    assert len(errors) == 1 and "missing.tar" in errors[0]
    assert not (tmp_path / "out").exists()
    other = torchrun(2, "-m", "slug_fast", "demo", timeout=300)
    assert other.returncode != 0 and other.stderr.count("only `unlearn` runs on several processes") == 1
