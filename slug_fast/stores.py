"""Gradient stores: where a gradient pass leaves g_f and g_r, and how the statistics read them.

- FullStore: one pass; every layer's g_f and g_r in memory at once.
- ChunkedStore: one pass per group of layers, deepest group first (backward stops at the
  group and computes no other weight gradient); each group's statistics are taken as soon as its
  gradients are done and the gradients dropped, except the forget gradients of layers on
  the running Pareto fronts. A layer off the front of the layers seen so far is off the
  final front too, so nothing the engine will need is lost; a needed one that did not fit
  the keep allowance is recomputed by one forget-only pass over just that layer.
- OffloadStore: one pass whose running sums live in host memory (a model on a GPU); the
  statistics stream the gradients back to the device a group at a time.

All three give the same gradients bit for bit: every pass records the same forward graph
and each layer's sum is formed the same way (GradientPass).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence

import torch

from .errors import SlugError
from .gradients import GradientPass, HostSums, Loss, Sums, resolve_params
from .memory import STREAM_BYTES, Layer, balanced_groups
from .stats import LayerStats, layer_stats, layer_sums, stats_from_sums

# keep(stats of the layers seen so far) -> names whose forget gradients to keep, most wanted first
KeepPolicy = Callable[[LayerStats], Iterable[str]]


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def layers_of(run: GradientPass, names: Sequence[str]) -> list[Layer]:
    return [Layer(n, run.named[n].numel(), run.named[n].element_size()) for n in names]


class GradientStore:
    """What every store offers the engine (see the module docstring for the three kinds)."""

    mode = ""
    passes = 0
    final_pass = False  # whether a forget-only pass had to recompute directions

    def collect(self, run: GradientPass) -> None:
        raise NotImplementedError

    def layer_stats(self, backend: str = "auto") -> LayerStats:
        raise NotImplementedError

    def directions(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def all_gradients(self, which: str) -> dict[str, torch.Tensor] | None:
        raise SlugError(f"the {self.mode} gradient store never holds every layer's gradient at once; read "
                        "layer_stats() and directions(names), or use the full store")

    def nbytes(self) -> int:
        return 0


class _StatsAsItGoes(GradientStore):
    """A store that takes the statistics during its passes, with one backend."""

    def __init__(self, backend: str):
        self.backend = self.used_backend = backend
        self.stats: LayerStats | None = None

    def layer_stats(self, backend: str = "auto") -> LayerStats:
        if backend not in ("auto", self.backend):
            raise SlugError(f"the {self.mode} store took its statistics with backend {self.backend!r} during the "
                            f"passes; pass backend={backend!r} to the store to use that one")
        return self.stats


class FullStore(GradientStore):
    """Every layer's forget and retain gradient in memory at once, after one pass."""

    mode = "full"

    def __init__(self):
        self.run: GradientPass | None = None
        self.forget: dict[str, torch.Tensor] = {}
        self.retain: dict[str, torch.Tensor] | None = None
        self.peak_bytes = 0  # the most gradient bytes held at once (counted, not sampled)

    def collect(self, run: GradientPass) -> None:
        self.run = run
        params = run.params(run.names)
        sums = Sums(params)
        run.run({"forget": sums}, order=run.depth_order is None)
        self.peak_bytes = sums.peak
        self.forget = sums.means(run.counts["forget"])
        if run.has_retain:
            sums = Sums(params, held_before=self.nbytes())
            run.run({"retain": sums})
            self.peak_bytes = max(self.peak_bytes, sums.peak)
            self.retain = sums.means(run.counts["retain"])
        self.passes = 1

    def layer_stats(self, backend: str = "auto") -> LayerStats:
        return layer_stats(self.run.params(self.forget), self.forget, self.retain, backend)

    def directions(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        return {n: self.forget[n] for n in names}

    def all_gradients(self, which: str) -> dict[str, torch.Tensor] | None:
        return self.forget if which == "forget" else self.retain

    def nbytes(self) -> int:
        return _nbytes(self.forget.values()) + _nbytes((self.retain or {}).values())


class ChunkedStore(_StatsAsItGoes):
    """Exact statistics in several passes, one group of layers each, deepest group first.

    passes: how many groups to cut the layers into (balanced by bytes); or groups: the
    groups themselves (lists of names, the planner's). keep: which layers' forget
    gradients to keep after each group (slug_fast.unlearn keeps the running Pareto
    fronts; default none, so directions() recomputes what it is asked for); keep_bytes
    caps what is kept. backend: the statistics backend.
    """

    mode = "chunked"

    def __init__(self, passes: int | None = None, groups: Sequence[Sequence[str]] | None = None, *,
                 keep: KeepPolicy | None = None, keep_bytes: int | None = None, backend: str = "auto"):
        if (passes is None) == (groups is None):
            raise SlugError("ChunkedStore takes passes= (a number of groups) or groups= (lists of layer names)")
        if passes is not None and (not isinstance(passes, int) or passes < 1):
            raise SlugError(f"passes must be a positive integer, got {passes!r}")
        super().__init__(backend)
        self.requested = passes
        self.groups = [list(g) for g in groups] if groups is not None else None
        self.keep, self.keep_bytes = keep, keep_bytes
        self.run: GradientPass | None = None
        self.kept: dict[str, torch.Tensor] = {}

    def collect(self, run: GradientPass) -> None:
        if not run.has_retain:
            raise SlugError("the chunked store computes statistics as it goes and needs the retain set")
        run.require_repeats()
        self.run = run
        if self.groups is None:
            order = run.depth_order or run.probe().use_order
            deepest_first = [[layer] for layer in layers_of(run, order[::-1])]
            self.groups = [[l.name for l in g] for g in balanced_groups(deepest_first, self.requested)]
        flat = [n for g in self.groups for n in g]
        if sorted(flat) != sorted(run.names):
            raise SlugError("the chunked store's groups must hold every differentiated layer exactly once")
        rows: dict[str, torch.Tensor] = {}
        for group in self.groups:
            params = run.params(group)
            forget = Sums(params)
            run.run({"forget": forget}, order=run.depth_order is None)
            forget_grads = forget.means(run.counts["forget"])
            retain = Sums(params)
            run.run({"retain": retain})
            retain_grads = retain.means(run.counts["retain"])
            sums, self.used_backend = layer_sums(params, forget_grads, retain_grads, self.backend)
            del retain_grads, retain
            rows.update(zip(group, sums))
            seen = [n for n in run.names if n in rows]
            self._keep(stats_from_sums(seen, torch.stack([rows[n] for n in seen]), self.used_backend),
                       forget_grads)
            del forget_grads
        self.passes = len(self.groups)
        table = torch.stack([rows[n] for n in run.names])
        self.stats = stats_from_sums(run.names, table, self.used_backend)

    def _keep(self, seen: LayerStats, fresh: dict[str, torch.Tensor]) -> None:
        wanted = list(dict.fromkeys(self.keep(seen))) if self.keep is not None else []
        kept, used = {}, 0
        limit = self.keep_bytes if self.keep_bytes is not None else float("inf")
        for name in wanted:
            t = self.kept.get(name)
            if t is None:
                t = fresh.get(name)
            if t is None:
                continue  # dropped earlier for lack of room: recomputed if it is needed
            size = t.numel() * t.element_size()
            if used + size > limit:
                continue
            kept[name] = t
            used += size
        self.kept = kept

    def directions(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        missing = [n for n in dict.fromkeys(names) if n not in self.kept]
        if missing:  # one forget-only pass over just those layers
            sums = Sums(self.run.params(missing))
            self.run.run({"forget": sums})
            self.kept.update(sums.means(self.run.counts["forget"]))
            self.final_pass = True
            self.passes += 1
        return {n: self.kept[n] for n in names}

    def nbytes(self) -> int:
        return _nbytes(self.kept.values())


class OffloadStore(_StatsAsItGoes):
    """One pass whose running sums live in (pinned) host memory: the device holds activations
    and about one layer's gradient beyond the weights. The statistics stream the gradients
    back to the parameters' device `stream_bytes` at a time and use its backend."""

    mode = "offload"

    def __init__(self, *, backend: str = "auto", stream_bytes: int = STREAM_BYTES):
        super().__init__(backend)
        self.stream_bytes = int(stream_bytes)
        self.forget: dict[str, torch.Tensor] = {}

    def collect(self, run: GradientPass) -> None:
        if not run.has_retain:
            raise SlugError("the offload store computes statistics as it goes and needs the retain set")
        params = run.params(run.names)
        sums = HostSums(params)
        run.run({"forget": sums}, order=run.depth_order is None)
        self.forget = sums.means(run.counts["forget"])
        sums = HostSums(params)
        run.run({"retain": sums})
        retain = sums.means(run.counts["retain"])
        del sums
        rows = []
        for group in self._stream_groups(run):
            on_device = {n: params[n] for n in group}
            f = {n: self.forget[n].to(params[n].device) for n in group}
            r = {n: retain[n].to(params[n].device) for n in group}
            part, self.used_backend = layer_sums(on_device, f, r, self.backend)
            rows.append(part)
            del f, r
        self.passes = 1
        self.stats = stats_from_sums(run.names, torch.cat(rows), self.used_backend)

    def _stream_groups(self, run: GradientPass) -> list[list[str]]:
        groups, current, size = [], [], 0
        for name in run.names:
            nbytes = 2 * run.named[name].numel() * run.named[name].element_size()
            if current and size + nbytes > self.stream_bytes:
                groups.append(current)
                current, size = [], 0
            current.append(name)
            size += nbytes
        return groups + ([current] if current else [])

    def directions(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        return {n: self.forget[n] for n in names}

    def nbytes(self) -> int:
        return _nbytes(self.forget.values())


def make_store(store) -> GradientStore:
    """A store from a name ("full", "offload") or a GradientStore."""
    if isinstance(store, GradientStore):
        return store
    if store == "full":
        return FullStore()
    if store == "offload":
        return OffloadStore()
    if store == "chunked":
        raise SlugError("the chunked store needs its number of passes: pass store=ChunkedStore(passes=K), or "
                        "memory_budget= to unlearn, which sizes the groups")
    raise SlugError(f"store must be 'full', 'offload' or a slug_fast.stores.GradientStore, got {store!r}")


class Gradients:
    """The outcome of a gradient pass, read through its store.

    `layer_stats()` gives every layer's statistics and `directions(names)` the forget
    gradients of a few layers, whatever the store; `forget` and `retain` (name -> tensor)
    exist only for the full store, which holds every gradient at once.
    depth_order lists the layers from input to output (forward use on the first forget batch).
    """

    def __init__(self, store, run: GradientPass):
        self.store = store
        self.names = list(run.names)
        self.depth_order = list(run.depth_order or self.names)
        self.n_forget_batches = run.counts.get("forget", 0)
        self.n_retain_batches = run.counts.get("retain", 0)

    @property
    def mode(self) -> str:
        return self.store.mode

    @property
    def forget(self) -> dict[str, torch.Tensor]:
        return self.store.all_gradients("forget")

    @property
    def retain(self) -> dict[str, torch.Tensor] | None:
        return self.store.all_gradients("retain")

    def layer_stats(self, backend: str = "auto"):
        """LayerStats of every differentiated layer, in `names` order."""
        return self.store.layer_stats(backend)

    def directions(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Forget gradients (each layer's dtype) of `names`."""
        return self.store.directions(list(names))


def compute_gradients(model: torch.nn.Module, forget_batches: Iterable, retain_batches: Iterable | None,
                      forget_loss: Loss, retain_loss: Loss | None = None, *,
                      params: Sequence[str] | None = None, train_mode: bool = False,
                      progress: bool | None = None, store="full",
                      checkpointing: Callable[[], contextlib.AbstractContextManager] | None = None) -> Gradients:
    """Mean per-batch gradients of `forget_loss` over `forget_batches` (and of `retain_loss`
    over `retain_batches`) with respect to `params` (default: all that require grad).

    A loss is `loss(model, batch) -> scalar tensor`; `retain_loss` defaults to
    `forget_loss`. The model runs in eval mode unless `train_mode`; its modes,
    requires_grad flags and existing .grad are restored afterwards. Low-precision
    parameters accumulate in float32 and the result is cast back to their dtype.
    store: "full" (every gradient in memory), or a slug_fast.stores store such as
    ChunkedStore(passes=4) (statistics in several passes, a group of layers each) or
    OffloadStore() (sums in host memory, for a model on a GPU).
    """
    names = resolve_params(model, params)
    chosen = make_store(store)
    run = GradientPass(model, forget_batches, retain_batches, forget_loss, retain_loss, names,
                       train_mode=train_mode, progress=progress, checkpointing=checkpointing)
    chosen.collect(run)
    return Gradients(chosen, run)
