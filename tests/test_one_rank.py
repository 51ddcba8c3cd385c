"""unlearn's several-process path (collectives, the distributed stores, FSDP2 shards) on one process.

A gloo group of one process runs every collective for real; `distributed.resolve` hands it
to unlearn (it returns None for a world of one, where SLUG runs alone), so this process
takes the path the ranks of a torchrun job take. The oracle is the same run alone
(process_group=False): with one rank the layers, the steps and the delta must be the same.
tests/test_distributed.py runs the same path on 2 and 3 processes under torchrun.
"""
import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

import slug_fast
from slug_fast import distributed

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="this torch has no torch.distributed")


class RecordingRanks(distributed.Ranks):
    """The real Ranks, noting which collective each step of unlearn went through and why."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def agree(self, fn, what):
        self.calls.append(("agree", what))
        return super().agree(fn, what)

    def decide(self, fn, what):
        self.calls.append(("decide", what))
        return super().decide(fn, what)


@pytest.fixture
def one_rank(monkeypatch, tmp_path):
    """A one-process gloo group that unlearn runs on as it would on several (the Ranks it made)."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    made, given = [], []

    def resolve(process_group):
        given.append(process_group)
        if process_group is False:
            return None
        made.append(RecordingRanks())
        return made[-1]

    monkeypatch.setattr(distributed, "resolve", resolve)
    try:
        yield made, given
    finally:
        dist.destroy_process_group()


def task(seed=0):
    """A 3-layer MLP whose output 0 on the forget batches SLUG drives down, and its losses."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    forget = [torch.randn(5, 6, generator=gen) + 1.0 for _ in range(3)]
    retain = [torch.randn(5, 6, generator=gen) for _ in range(3)]
    with torch.no_grad():
        base = float(torch.cat([net(x) for x in forget])[:, 0].mean())
        kept = torch.cat([net(x) for x in retain])

    def forget_loss(m, x):  # SLUG steps along +grad: up this loss, so output 0 goes down
        return -m(x)[:, 0].mean()

    def retain_loss(m, x):
        return m(x).square().mean()

    def criterion(m):
        with torch.no_grad():
            return float(torch.cat([m(x) for x in forget])[:, 0].mean()) < base - 0.3

    def utility(m):
        with torch.no_grad():
            return -float((torch.cat([m(x) for x in retain]) - kept).square().mean())

    return net, forget, retain, dict(forget_loss=forget_loss, retain_loss=retain_loss, criterion=criterion,
                                     utility=utility)


def run(net, forget, retain, fns, **options):
    return slug_fast.unlearn(net, forget, retain, fns["criterion"], utility=fns["utility"],
                             forget_loss=fns["forget_loss"], retain_loss=fns["retain_loss"], max_evals=12,
                             strategy="best", progress=False, **options)


def full_weights(model):
    return {n: distributed.full(p).detach().clone() for n, p in model.named_parameters()}


def check_same_as_alone(res, alone, net, alone_net):
    assert res.layers == alone.layers and res.step == alone.step
    assert [(c.layers, [(e.step, e.satisfied) for e in c.search.trace]) for c in res.candidates] == \
        [(c.layers, [(e.step, e.satisfied) for e in c.search.trace]) for c in alone.candidates]
    assert [c.utility for c in res.candidates] == [c.utility for c in alone.candidates]
    assert res.stats.names == alone.stats.names
    for col in ("param_norm", "forget_norm", "retain_norm", "dot"):
        torch.testing.assert_close(getattr(res.stats, col), getattr(alone.stats, col), rtol=1e-6, atol=0)
    assert res.delta.keys() == alone.delta.keys()
    for k in res.delta:
        torch.testing.assert_close(res.delta[k], alone.delta[k], rtol=1e-6, atol=1e-9)
    now, want = full_weights(net), full_weights(alone_net)
    for n in want:
        torch.testing.assert_close(now[n], want[n], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("partition", ["owner", "replicated"])
def test_data_parallel_path_on_one_rank_equals_running_alone(one_rank, partition):
    made, given = one_rank
    net, forget, retain, fns = task()
    alone_net = copy.deepcopy(net)
    alone = run(alone_net, forget, retain, fns, process_group=False)
    assert given == [False] and not made and alone.ranks is None

    theta0 = full_weights(net)
    res = run(net, forget, retain, fns, partition=partition)
    assert given == [False, None]
    check_same_as_alone(res, alone, net, alone_net)
    assert any(not torch.equal(full_weights(net)[n], theta0[n]) for n in res.layers)
    ranks, = made
    # the distributed store counted every batch (all on this rank) and the payload it sent
    assert res.ranks == {"rank": 0, "world": 1, "partition": partition,
                         "batches": {"forget": len(forget), "retain": len(retain)}, "sent": dict(ranks.sent)}
    assert ranks.sent and all(v > 0 for v in ranks.sent.values())
    assert res.writes


def test_every_step_of_the_search_and_the_edit_goes_through_the_ranks(one_rank):
    """Each trial step is agreed on, each verdict and utility decided by rank 0, and the final
    edit agreed; `what` is the phrase a failure on another rank is reported with."""
    made, _ = one_rank
    net, forget, retain, fns = task()
    res = run(net, forget, retain, fns)
    ranks, = made
    searched = []
    for c in res.candidates:
        for e in c.search.trace:
            searched += [("agree", f"stepping {c.layers} to {e.step:.4g}"),
                         ("decide", f"judging step {e.step:.4g} of {c.layers}")]
        if c.search.reached:
            searched.append(("decide", f"measuring the utility of {c.layers}"))
    first = ranks.calls.index(searched[0])  # before it: the gradient store's collectives
    assert ranks.calls[first:] == searched + [("agree", "applying the edit")]
    assert all(c.utility is not None for c in res.candidates if c.search.reached)


def test_process_group_false_runs_alone_even_with_a_group(one_rank):
    made, given = one_rank
    net, forget, retain, fns = task()
    res = run(net, forget, retain, fns, process_group=False)
    assert given == [False] and not made and res.ranks is None


def test_fsdp2_shards_on_one_rank_equal_running_alone(one_rank):
    """FSDP2 (fully_shard) parameters are DTensors: the sharded store, DTensor steps and deltas."""
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    made, _ = one_rank
    net, forget, retain, fns = task()
    alone_net = copy.deepcopy(net)
    alone = run(alone_net, forget, retain, fns, process_group=False)
    for i in (0, 2, 4):
        fsdp.fully_shard(net[i])
    assert all(distributed.is_dtensor(p) for p in net.parameters())
    res = run(net, forget, retain, fns, cache=True)
    check_same_as_alone(res, alone, net, alone_net)
    assert all(distributed.is_dtensor(p) for p in net.parameters())  # still sharded after the edit
    assert all(not distributed.is_dtensor(d) and d.dtype == torch.float32 for d in res.delta.values())
    ranks, = made
    assert res.ranks["partition"] == "fsdp" and res.ranks["world"] == 1
    assert ("agree", "applying the edit") in ranks.calls


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_a_dtensor_directions_step_is_the_plain_step_laid_out_like_it(one_rank, dtype):
    """scaled_step of a DTensor: the step of the whole tensor (float64 for float64 parameters,
    else float32), with the direction's mesh, placements, shape and stride."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from slug_fast.unlearn import scaled_step

    mesh = init_device_mesh("cpu", (1,))
    whole = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    whole = whole if dtype == torch.float64 else whole.float()
    direction = distribute_tensor(whole, mesh, [Shard(1)])
    got = scaled_step(direction, 0.1, dtype)
    assert distributed.is_dtensor(got)
    assert got.device_mesh == mesh and got.placements == (Shard(1),)
    assert got.shape == whole.shape and got.stride() == direction.stride()
    want = scaled_step(whole, 0.1, dtype)
    assert want.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got.dtype == want.dtype and torch.equal(got.full_tensor(), want)
