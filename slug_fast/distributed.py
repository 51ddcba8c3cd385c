"""SLUG across processes on torch.distributed (torchrun; NCCL on GPUs, gloo on CPUs).

SLUG distributes exactly: its statistics are per-layer sums, so per-rank partial sums
combine with one all-reduce of the [n_layers, 4] table (4 x 8 bytes per layer).

- Data parallel (every rank holds the whole model and a share of the batches;
  `slug_fast.data.shard` splits a pair list by rank). The gradients are the mean over
  every rank's batches, divided by the global batch count, so ranks may hold unequal
  numbers of batches. Two ways to hold them (`partition=`):
  * "owner" (ZeRO-2 style, the default): each layer belongs to one rank (layers
    partitioned by size); every batch's gradient of a layer is reduced to its owner the
    moment autograd finishes it and dropped elsewhere, so a rank holds its own layers'
    sums and about one layer in flight: 1/N of the gradients plus the largest layer.
    Ranks run their batches in lockstep rounds; one that has run out contributes zeros.
  * "replicated": each rank sums its own batches and every layer is all-reduced once at
    the end of each pass: the fewest collectives, every gradient on every rank.
  The owners compute their layers' statistics, the table is all-reduced, and the front
  layers' forget directions are broadcast from their owners.
- FSDP2 models (`torch.distributed.fsdp.fully_shard`): parameters and gradients are
  DTensor shards. FSDP reduce-scatters each batch's gradient; the statistics come from
  the local shards plus one all-reduce, and each rank edits its own slice.

Everything that decides (the statistics, the criterion's verdict) is made identical on
every rank, so ranks never diverge; a failure on any rank raises RankFailed on every
rank (see Ranks.agree), and every edit is undone everywhere. Collectives wait at most the
process group's timeout (init_process_group(timeout=...); the CLI sets one).
"""
from __future__ import annotations

import pickle
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.distributed as dist

from .errors import EmptySetError, SlugError
from .gradients import GradientPass, Sums, _checked_loss, forward_use_order, sum_dtype
from .stats import LayerStats, layer_sums, stats_from_sums
from .stores import GradientStore

PARTITIONS = ("owner", "replicated")


class RankFailed(SlugError):
    """Another rank failed; this one stopped with it (its weights restored)."""


def is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: a DTensor's local shard, any other tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor gathered from every rank (a collective), any other tensor itself."""
    return t.full_tensor() if is_dtensor(t) else t


def _fsdp_modules(module: torch.nn.Module) -> list:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return []
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def is_fsdp(module: torch.nn.Module) -> bool:
    """Whether `module` has FSDP2 (fully_shard) submodules."""
    return bool(_fsdp_modules(module))


def reshard(module: torch.nn.Module) -> None:
    """Put an FSDP2 model's parameters back in their sharded form. A root module keeps them
    gathered after a forward, and gathered parameters are plain tensors that the next
    forward reuses as they are: an edit must reach the shards, and be gathered afresh."""
    for m in _fsdp_modules(module):
        m.reshard()


def owners(sizes: Sequence[int], world: int) -> list[int]:
    """The owner rank of each layer: largest layers first, each to the least-loaded rank
    (lowest rank on ties), so every rank holds about 1/world of the bytes. Deterministic,
    so every rank computes the same partition."""
    load = [0] * world
    out = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        out[i] = r
        load[r] += sizes[i]
    return out


def predicted_cost(layers: Sequence[tuple[int, torch.dtype]], world: int, rounds: Mapping[str, int],
                   partition: str = "owner") -> list[dict]:
    """What each rank holds and sends in a data-parallel gradient pass, from the layers'
    (numel, dtype), the number of ranks and each set's rounds (its most batches on any
    rank), by the rules the stores follow: the partition of `owners`, sums in sum_dtype,
    means in the layer's dtype, the retain pass's sums beside the forget means, one
    layer's gradient in transit (owner: its sum-dtype copy on the wire; replicated:
    autograd's, being added). Per rank: gradient_bytes (the most held at once) and
    sent (payload bytes by collective, as Ranks.sent counts them, before the final
    broadcast of the chosen directions)."""
    if partition not in PARTITIONS:
        raise SlugError(f"partition must be one of {PARTITIONS}, got {partition!r}")
    size = [n * torch.empty((), dtype=d).element_size() for n, d in layers]
    summed = [n * torch.empty((), dtype=sum_dtype(d)).element_size() for n, d in layers]
    owner = owners(size, world)
    n_sets = len(rounds)
    table = 32 * len(layers)  # [n_layers, 4] float64
    counts = 8 * n_sets  # one int64 per set: the global batch count
    out = []
    for r in range(world):
        if partition == "owner":
            mine = [i for i in range(len(layers)) if owner[i] == r]
            held = sum(size[i] for i in mine) + sum(summed[i] for i in mine) + max(summed, default=0)
            sent = {"reduce": sum(rounds.values()) * sum(summed),
                    "all_reduce": 16 * (sum(rounds.values()) + n_sets) + counts + table}
        else:
            # the gradient being added is autograd's, in the layer's dtype
            held = (sum(size) if n_sets > 1 else 0) + sum(summed) + max(size, default=0)
            sent = {"all_reduce": n_sets * sum(summed) + counts + table}
        out.append({"rank": r, "gradient_bytes": held, "sent": sent})
    return out


class Ranks:
    """The process group SLUG runs on, its collectives, and how many bytes each put on the wire.

    `sent` counts the payload bytes this rank handed to each kind of collective (the
    tensor it contributes; objects counted pickled), which is what bench_distributed
    reports; the wire traffic of an algorithm is a known multiple of it (bench/RESULTS.md).
    """

    def __init__(self, group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.backend = dist.get_backend(group)
        self.sent: Counter = Counter()

    def __repr__(self) -> str:
        return f"Ranks(rank={self.rank}, world={self.world}, backend={self.backend!r})"

    def global_rank(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    # tensors travel on the collective's device: CUDA for NCCL, the CPU for gloo
    def _wire(self, t: torch.Tensor) -> torch.Tensor:
        device = self._device()
        return t if t.device == device else t.to(device)

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        w = self._wire(t)
        self.sent["all_reduce"] += w.numel() * w.element_size()
        dist.all_reduce(w, op=op, group=self.group)
        if w is not t:
            t.copy_(w)
        return t

    def reduce(self, t: torch.Tensor, dst: int, async_op: bool = False):
        """Sum `t` into rank `dst`'s `t` (group rank). With async_op, (work, wire tensor, copy back)."""
        w = self._wire(t)
        self.sent["reduce"] += w.numel() * w.element_size()
        work = dist.reduce(w, dst=self.global_rank(dst), op=dist.ReduceOp.SUM, group=self.group, async_op=async_op)
        if async_op:
            return work, w
        if w is not t:
            t.copy_(w)
        return t

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        w = self._wire(t)
        if self.rank == src:
            self.sent["broadcast"] += w.numel() * w.element_size()
        dist.broadcast(w, src=self.global_rank(src), group=self.group)
        if w is not t:
            t.copy_(w)
        return t

    def all_gather_object(self, obj) -> list:
        self.sent["objects"] += len(pickle.dumps(obj))
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def total(self, count: int) -> int:
        """The sum of an integer over ranks."""
        t = torch.tensor([count], dtype=torch.int64, device=self._device())
        return int(self.all_reduce(t).item())

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def agree(self, fn: Callable[[], object], what: str):
        """fn() on every rank, then one exchange of outcomes: if any rank raised, every rank
        raises (the first failing rank its own error, the others RankFailed naming it)."""
        result, error = _attempt(fn)
        outcomes = self.all_gather_object(None if error is None else _describe(error))
        self.check(outcomes, error, what)
        return result

    def decide(self, fn: Callable[[], object], what: str):
        """fn() on every rank, and rank 0's result on every rank (failures as in agree):
        a verdict that cannot split the ranks, even from a criterion that is not deterministic."""
        result, error = _attempt(fn)
        gathered = self.all_gather_object((None if error is None else _describe(error),
                                           result if (error is None and self.rank == 0) else None))
        self.check([g[0] for g in gathered], error, what)
        return gathered[0][1]

    def check(self, outcomes: Sequence[str | None], error: BaseException | None, what: str) -> None:
        failed = [(r, m) for r, m in enumerate(outcomes) if m is not None]
        if not failed:
            return
        first, message = failed[0]
        if error is not None and first == self.rank:
            raise error
        raise RankFailed(f"rank {first} of {self.world} failed while {what}: {message}")


def _attempt(fn):
    try:
        return fn(), None
    except Exception as err:  # noqa: BLE001 - handed to every rank, then re-raised
        return None, err


def _describe(error: BaseException) -> str:
    return str(error) if isinstance(error, SlugError) else f"{type(error).__name__}: {error}"


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher) as one of several."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str = "cpu", timeout_s: float = 600.0) -> Ranks | None:
    """Join the process group torchrun describes in the environment (NCCL for a CUDA device,
    gloo otherwise; every collective waits at most `timeout_s`); None when not launched as
    one of several. A CUDA rank takes the GPU of its LOCAL_RANK."""
    import datetime
    import os

    if not launched():
        return None
    if not dist.is_initialized():
        cuda = str(device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return Ranks()


def resolve(process_group) -> Ranks | None:
    """The Ranks `unlearn` runs on: process_group=None takes the world group when
    torch.distributed is initialised with more than one process (else one process);
    False always runs alone; a ProcessGroup runs on that group."""
    if process_group is False:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise SlugError("process_group= was given but torch.distributed is not initialised; call "
                            "torch.distributed.init_process_group first (torchrun sets the environment)")
        return None
    ranks = Ranks(None if process_group is None else process_group)
    return ranks if ranks.world > 1 else None


class _OwnerSums(Sums):
    """Each batch's gradient of a layer reduced to the layer's owner as autograd finishes it.

    Every rank issues the reductions in one shared order (deepest layer first) whatever
    order its hooks fire in: a gradient that arrives early waits until those before it
    are sent; one the batch never reached is sent as zeros at the end of the batch, as is
    every layer on a rank that has run out of batches. Between two gradients at most
    `in_flight` bytes stay on the wire (0: each reduction finishes before autograd goes on). Only the owner keeps a sum. `held` counts the gradient bytes alive here (from
    `held_before`, what earlier passes left) and `peak` the most at once.
    """

    def __init__(self, params: Mapping[str, torch.nn.Parameter], ranks: Ranks, owner_of: Mapping[str, int],
                 order: Sequence[str], in_flight: int, held_before: int = 0):
        super().__init__(params)
        self.held = self.peak = held_before
        self.ranks, self.owner_of, self.order, self.cap = ranks, dict(owner_of), list(order), in_flight
        self.waiting: dict[str, torch.Tensor] = {}
        self.next = 0
        self.wire: list[tuple[str, torch.Tensor, object, torch.Tensor]] = []
        self.wire_bytes = 0

    def add(self, name: str, grad: torch.Tensor) -> None:
        # float32 gradients: autograd's own buffer (its .grad is cleared), the reduction writes into it
        t = self.waiting[name] = grad.to(sum_dtype(grad.dtype))
        self._count(t.numel() * t.element_size())
        self._send_ready()

    def _send_ready(self) -> None:
        while self.next < len(self.order) and self.order[self.next] in self.waiting:
            name = self.order[self.next]
            self._send(name, self.waiting.pop(name))
            self.next += 1

    def _send(self, name: str, t: torch.Tensor) -> None:
        work, w = self.ranks.reduce(t, self.owner_of[name], async_op=True)
        self.wire.append((name, t, work, w))
        self.wire_bytes += t.numel() * t.element_size()
        while self.wire_bytes > self.cap:
            self._land()

    def _land(self) -> None:
        name, t, work, w = self.wire.pop(0)
        work.wait()
        size = t.numel() * t.element_size()
        self.wire_bytes -= size
        if self.owner_of[name] != self.ranks.rank:
            self._count(-size)
            return
        if w is not t:
            t.copy_(w)
        acc = self.sums.get(name)
        if acc is None:
            self.sums[name] = t
        else:
            acc.add_(t)
            self._count(-size)

    def _count(self, nbytes: int) -> None:
        self.held += nbytes
        self.peak = max(self.peak, self.held)

    def end_batch(self) -> None:
        while self.next < len(self.order):
            name = self.order[self.next]
            t = self.waiting.pop(name, None)
            if t is None:
                p = self.params[name]
                t = torch.zeros(p.shape, dtype=sum_dtype(p.dtype), device=p.device)
                self._count(t.numel() * t.element_size())
            self._send(name, t)
            self.next += 1
        while self.wire:
            self._land()
        self.next = 0

    def owned_means(self, count: int) -> dict[str, torch.Tensor]:
        """The means of this rank's own layers (sum / global batch count)."""
        mine = {n: p for n, p in self.params.items() if self.owner_of[n] == self.ranks.rank}
        out = {}
        for name, p in mine.items():
            acc = self.sums.pop(name, None)
            out[name] = (torch.zeros_like(p, memory_format=torch.contiguous_format).detach() if acc is None
                         else acc.div_(count).to(p.dtype).detach())
        return out


class _ShardSums(Sums):
    """Running sums of an FSDP model's gradients: a DTensor parameter's local shard (which
    FSDP reduced across ranks already, dividing it by its gradient divide factor), and
    this rank's own gradient of a parameter FSDP does not manage."""

    def add(self, name: str, grad: torch.Tensor) -> None:
        super().add(name, local(grad))

    def reduced_means(self, ranks: Ranks, count: int, factor: float) -> dict[str, torch.Tensor]:
        """Means over every rank's batches: shard sums times FSDP's divide factor, plain sums
        all-reduced here (once, in name order on every rank), both over the global count."""
        out = {}
        for name, p in self.params.items():
            acc = self.sums.pop(name, None)
            if acc is None:
                acc = torch.zeros(local(p).shape, dtype=sum_dtype(p.dtype), device=p.device)
            if is_dtensor(p):
                if factor != 1:
                    acc.mul_(factor)
            else:
                ranks.all_reduce(acc)
            out[name] = acc.div_(count).to(p.dtype).detach()
        return out


def _lockstep_set(run: GradientPass, ranks: Ranks, which: str, sums: Sums, order: bool, idle: str) -> int:
    """One set through the model in rounds that every rank enters together, so that no
    rank waits in a collective another never reaches. Each round every rank says whether it
    has a batch and whether it failed (one all-reduce of two integers; any failure stops
    every rank); a rank that has run out contributes zeros: idle="zeros" to the owner
    reductions; idle="repeat" reruns its last batch with the loss times 0, because an FSDP
    forward gathers parameters from every rank (there the flags go round before the
    forward, and once more before the backward). Returns this rank's batch count."""
    from tqdm.auto import tqdm

    params = sums.params
    hooks = [p.register_post_accumulate_grad_hook(_deliver_to(sums, n)) for n, p in params.items()]
    batches = run.sets[which]
    loss_fn = run.losses[which]
    collective_forward = idle == "repeat"
    total = len(batches) if hasattr(batches, "__len__") else None
    it = iter(tqdm(batches, total=total, desc=f"{which} gradients",
                   disable=(None if run.progress is None else not run.progress) if ranks.rank == 0 else True,
                   leave=False))
    count, last = 0, None
    flag = torch.zeros(2, dtype=torch.int64, device=ranks._device())

    def exchange(has_batch: bool, error: BaseException | None, what: str) -> bool:
        """Whether any rank has a batch this round; raises on every rank if any failed."""
        flag[0], flag[1] = int(has_batch), int(error is not None)
        ranks.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag[1]):
            ranks.check(ranks.all_gather_object(None if error is None else _describe(error)), error, what)
        return bool(flag[0])

    def forward(batch, scale: float = 1.0):
        loss = _checked_loss(loss_fn(run.model, batch), which, count)
        if order and count == 0 and scale:
            run.depth_order = forward_use_order(loss, run.params(run.names))
        return loss * scale if scale != 1.0 else loss

    try:
        while True:
            loss, error, batch = None, None, None
            try:
                batch = next(it, None)
                if batch is None and count == 0 and collective_forward:
                    raise SlugError(f"rank {ranks.rank} has no {which} batch; with an FSDP model every rank runs "
                                    "every forward, so each needs at least one batch of each set")
                if batch is not None and not collective_forward:
                    loss = forward(batch)
            except Exception as err:  # noqa: BLE001 - every rank learns of it in the exchange
                error = err
            if not exchange(batch is not None, error, f"computing the {which} loss"):
                break
            if collective_forward:  # every rank: its batch, or its last one contributing zero
                try:
                    loss = forward(batch) if batch is not None else forward(last, 0.0)
                except Exception as err:  # noqa: BLE001
                    error = err
                exchange(True, error, f"computing the {which} loss")
            if loss is not None:
                loss.backward()
            if batch is not None:
                count += 1
                last = batch
            sums.end_batch()
    finally:
        for hook in hooks:
            hook.remove()
        for p in params.values():
            p.grad = None
    return count


def _deliver_to(sums: Sums, name: str):
    def deliver(p):
        sums.add(name, p.grad)
        p.grad = None
    return deliver


class DistributedStore(GradientStore):
    """g_f and g_r of a data-parallel model over every rank's batches (see the module docstring).

    partition: "owner" (each rank keeps the layers it owns; reductions stream during
    backward) or "replicated" (each rank sums its own batches, every layer all-reduced once
    per pass). in_flight: bytes of owner reductions that may still be on the wire while
    backward goes on (default 0: each finishes in its hook, so a rank holds its own layers
    and one more layer's gradient; more overlaps communication with backward).
    """

    mode = "full"

    def __init__(self, ranks: Ranks, partition: str = "owner", in_flight: int = 0):
        if partition not in PARTITIONS:
            raise SlugError(f"partition must be one of {PARTITIONS}, got {partition!r}")
        self.ranks, self.partition, self.in_flight = ranks, partition, in_flight
        self.run: GradientPass | None = None
        self.owner_of: dict[str, int] = {}
        self.forget: dict[str, torch.Tensor] = {}  # the layers this rank holds (all when replicated)
        self.retain: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.stats: LayerStats | None = None
        self.used_backend = "auto"
        self.peak_bytes = 0  # the most gradient bytes this store held at once (counted, not sampled)

    def collect(self, run: GradientPass) -> None:
        self.run = run
        params = run.params(run.names)
        sizes = [p.numel() * p.element_size() for p in params.values()]
        self.owner_of = dict(zip(run.names, owners(sizes, self.ranks.world)))
        for which in ("forget", "retain"):
            if which == "retain" and not run.has_retain:
                continue
            got = self._owner_pass(run, which) if self.partition == "owner" else self._replicated_pass(run, which)
            setattr(self, which, got)
        share_depth_order(self.ranks, run)
        self.passes = 1

    def _reduce_order(self, run: GradientPass) -> list[str]:
        """The shared order of owner reductions: deepest first (the order backward finishes
        them), read off one forward; layers no loss reached last."""
        if run.depth_order is None:
            run.depth_order = self.ranks.agree(lambda: _probe_order(run), "reading the forward order")
        share_depth_order(self.ranks, run)
        return run.depth_order[::-1]

    def _owner_pass(self, run: GradientPass, which: str) -> dict[str, torch.Tensor]:
        params = run.params(run.names)
        sums = _OwnerSums(params, self.ranks, self.owner_of, self._reduce_order(run), self.in_flight, self.nbytes())
        run.check_unchanged()
        with run.prepared():
            mine = _lockstep_set(run, self.ranks, which, sums, False, "zeros")
        run.counts[which] = mine
        total = self._total(which, mine)
        self.peak_bytes = max(self.peak_bytes, sums.peak)
        return sums.owned_means(total)

    def _replicated_pass(self, run: GradientPass, which: str) -> dict[str, torch.Tensor]:
        params = run.params(run.names)
        sums = Sums(params, held_before=self.nbytes())

        def local_pass():
            try:
                run.run({which: sums}, order=which == "forget" and run.depth_order is None)
            except EmptySetError:  # a rank may hold no batch; the global count decides
                run.counts[which] = 0
        self.ranks.agree(local_pass, f"computing the {which} gradients")
        total = self._total(which, run.counts[which])
        self.peak_bytes = max(self.peak_bytes, sums.peak)
        out = {}
        for name, p in params.items():
            acc = sums.sums.pop(name, None)
            if acc is None:
                acc = torch.zeros(p.shape, dtype=sum_dtype(p.dtype), device=p.device)
            self.ranks.all_reduce(acc)
            out[name] = acc.div_(total).to(p.dtype).detach()
        return out

    def _total(self, which: str, mine: int) -> int:
        total = self.ranks.total(mine)
        if total == 0:
            raise SlugError(f"the {which} set is empty on every rank: pass at least one batch")
        self.counts[which] = total
        return total

    def owned(self) -> list[str]:
        """The layers this rank owns, in name order."""
        return [n for n in self.run.names if self.owner_of[n] == self.ranks.rank]

    def layer_stats(self, backend: str = "auto") -> LayerStats:
        if self.stats is None:
            names = self.run.names
            rows = self.owned()
            table = torch.zeros((len(names), 4), dtype=torch.float64)
            if rows:
                retain = {n: self.retain[n] for n in rows} if self.run.has_retain else None
                part, self.used_backend = self.ranks.agree(
                    lambda: layer_sums(self.run.params(rows), {n: self.forget[n] for n in rows}, retain, backend),
                    "computing the layer statistics")
                index = {n: i for i, n in enumerate(names)}
                table[[index[n] for n in rows]] = part
            else:
                self.ranks.agree(lambda: None, "computing the layer statistics")
            self.ranks.all_reduce(table)
            self.stats = stats_from_sums(names, table, self.used_backend)
        return self.stats

    def directions(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        out = {}
        for name in names:  # the same order on every rank
            if self.partition == "replicated":
                out[name] = self.forget[name]
                continue
            p = self.run.named[name]
            t = self.forget[name] if self.owner_of[name] == self.ranks.rank else \
                torch.empty(p.shape, dtype=p.dtype, device=p.device)
            out[name] = self.ranks.broadcast(t, self.owner_of[name])
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.forget, self.retain) for t in d.values())


def share_depth_order(ranks: Ranks, run: GradientPass) -> None:
    """Give every rank the forward use order of the first rank that saw a forget batch (a
    rank without batches has none), so that "deepest" means the same layer everywhere."""
    orders = [o for o in ranks.all_gather_object(run.depth_order) if o is not None]
    if not orders:
        raise SlugError("the forget set is empty on every rank: pass at least one batch")
    run.depth_order = list(orders[0])


def _probe_order(run: GradientPass) -> list[str] | None:
    try:
        return run.probe().use_order
    except EmptySetError:  # this rank holds no forget batch; another rank's order is taken
        return None


class ShardedStore(GradientStore):
    """g_f and g_r of an FSDP2 model: local gradient shards, statistics by one all-reduce.

    Every rank runs every round (FSDP gathers parameters in each forward); FSDP reduces
    each batch's gradient across ranks and divides it by its gradient divide factor (the
    world size unless set_gradient_divide_factor changed it), which the means undo.
    directions() returns DTensors sharded as the parameters.
    """

    mode = "full"

    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        self.run: GradientPass | None = None
        self.forget: dict[str, torch.Tensor] = {}
        self.retain: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.stats: LayerStats | None = None

    def collect(self, run: GradientPass) -> None:
        self.run = run
        params = run.params(run.names)
        factor = _divide_factor(run.model, self.ranks.world)
        for which in ("forget", "retain"):
            if which == "retain" and not run.has_retain:
                continue
            sums = _ShardSums(params)
            run.check_unchanged()
            with run.prepared():
                mine = _lockstep_set(run, self.ranks, which, sums, which == "forget" and run.depth_order is None,
                                     "repeat")
            run.counts[which] = mine
            total = self.ranks.total(mine)
            self.counts[which] = total
            setattr(self, which, sums.reduced_means(self.ranks, total, factor))
        share_depth_order(self.ranks, run)
        self.passes = 1

    def layer_stats(self, backend: str = "auto") -> LayerStats:
        """Each sharded layer's sums over its local shards on every rank, a replicated layer's
        on rank 0 alone; one all-reduce of the table adds them up."""
        if self.stats is None:
            names = self.run.names
            counted = [n for n in names if is_dtensor(self.run.named[n]) or self.ranks.rank == 0]
            shards = {n: local(self.run.named[n]).detach() for n in counted}
            retain = {n: self.retain[n] for n in counted} if self.run.has_retain else None
            part, used = self.ranks.agree(
                lambda: layer_sums(shards, {n: self.forget[n] for n in counted}, retain, backend),
                "computing the layer statistics")
            table = torch.zeros((len(names), 4), dtype=torch.float64)
            index = {n: i for i, n in enumerate(names)}
            table[[index[n] for n in counted]] = part
            self.ranks.all_reduce(table)
            self.stats = stats_from_sums(names, table, used)
        return self.stats

    def directions(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        from torch.distributed.tensor import DTensor

        out = {}
        for name in names:
            p = self.run.named[name]
            out[name] = self.forget[name] if not is_dtensor(p) else DTensor.from_local(
                self.forget[name], p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.forget, self.retain) for t in d.values())


def _divide_factor(model: torch.nn.Module, world: int) -> float:
    """What FSDP divides each reduced gradient by: the world size unless a module set another."""
    factors = set()
    for m in model.modules():
        get_state = getattr(m, "_get_fsdp_state", None)
        if get_state is None:
            continue
        group = getattr(get_state(), "_fsdp_param_group", None)
        if group is not None:
            factor = getattr(group, "gradient_divide_factor", None)
            factors.add(float(factor) if factor is not None else float(world))
    if len(factors) > 1:
        raise SlugError(f"the FSDP modules divide gradients by different factors {sorted(factors)}; "
                        "SLUG needs one (set_gradient_divide_factor on every module, or on none)")
    return factors.pop() if factors else float(world)


def store_for(model: torch.nn.Module, ranks: Ranks, partition: str) -> GradientStore:
    return ShardedStore(ranks) if is_fsdp(model) else DistributedStore(ranks, partition)


def gather_full(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors on the CPU (DTensors gathered: a collective every rank must enter)."""
    return {k: full(t).detach().cpu() for k, t in tensors.items()}


__all__ = ["PARTITIONS", "RankFailed", "Ranks", "DistributedStore", "ShardedStore", "resolve", "owners",
           "predicted_cost", "launched", "init_from_env", "is_fsdp", "is_dtensor", "reshard", "local", "full",
           "gather_full", "store_for"]
