"""The gradient pass: g_f and g_r, each the mean of its per-batch gradients at theta0.

`GradientPass` runs the forget and retain sets through a model with a chosen subset of
parameters requiring grad; post-accumulate-grad hooks hand each layer's gradient to a
running sum the moment autograd finishes it, so no second copy of all gradients ever
exists. Where the sums live and how many passes run is the gradient store's business
(slug_fast.stores, which also holds the entry point, `compute_gradients`).
"""
from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch.utils._pytree import tree_leaves
from tqdm.auto import tqdm

from .errors import EmptySetError, NonFiniteError, SlugError, unknown_name
from .modes import training_state

Loss = Callable[[torch.nn.Module, object], torch.Tensor]
SETS = ("forget", "retain")


def resolve_params(model: torch.nn.Module, params: Sequence[str] | None) -> list[str]:
    """The parameter names to differentiate: `params`, or all that require grad, in model order."""
    named = dict(model.named_parameters())
    if params is None:
        chosen = [n for n, p in named.items() if p.requires_grad]
        if not chosen:
            raise SlugError("no parameter of the model requires grad; pass params=[names] to choose some")
        return chosen
    if isinstance(params, str):
        params = [params]
    for name in params:
        if name not in named:
            raise unknown_name("parameter", name, named)
    wanted = set(params)
    return [n for n in named if n in wanted]


def sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype per-batch gradients are summed in: float32 for 16-bit tensors, else their own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class Sums:
    """Running sums of one set's per-batch gradients, one per layer, on the layers' device.

    The first batch's gradient becomes the sum itself (float32 and float64 layers keep
    autograd's own buffer, 16-bit ones a float32 copy) and later ones are added in place:
    the order and rounding of autograd's own accumulation, bit for bit. `peak` counts the
    most gradient bytes alive at once: the sums, the gradient being added, and
    `held_before` (what earlier passes left).
    """

    def __init__(self, params: Mapping[str, torch.nn.Parameter], held_before: int = 0):
        self.params = dict(params)
        self.sums: dict[str, torch.Tensor] = {}
        self.held = self.peak = held_before

    def add(self, name: str, grad: torch.Tensor) -> None:
        acc = self.sums.get(name)
        size = grad.numel() * grad.element_size()
        if acc is None:
            acc = self.sums[name] = grad.to(sum_dtype(grad.dtype))
            self.held += acc.numel() * acc.element_size()
        else:
            acc.add_(grad)
        self.peak = max(self.peak, self.held if acc is grad else self.held + size)

    def end_batch(self) -> None:
        """Called once a batch's backward has returned."""

    def means(self, count: int) -> dict[str, torch.Tensor]:
        """sum / count in each layer's dtype (zeros where the loss never reached it); the
        sums are released one layer at a time as their means are made."""
        out = {}
        for name, p in self.params.items():
            acc = self.sums.pop(name, None)
            if acc is None:
                out[name] = torch.zeros_like(p, memory_format=torch.contiguous_format,
                                             device=self._home(p)).detach()
            else:
                out[name] = acc.div_(count).to(p.dtype).detach()
        return out

    def _home(self, p: torch.Tensor) -> torch.device:
        return p.device


class HostSums(Sums):
    """Running sums in host memory for a model on a GPU (the offload store).

    Each batch's gradient of a layer is copied off the device into a pinned buffer
    (non-blocking) the moment autograd finishes it, and the device copy is dropped; once
    the batch's backward has returned, the buffers are added to the sums on the host.
    Float32 additions and the final division are exactly rounded on either side, so the
    means equal the device sums' bit for bit.
    """

    def __init__(self, params: Mapping[str, torch.nn.Parameter]):
        super().__init__(params)
        devices = {p.device.type for p in self.params.values()}
        self.pin = "cuda" in devices and torch.cuda.is_available()
        self.staging: dict[str, torch.Tensor] = {}
        self.pending: list[str] = []

    def add(self, name: str, grad: torch.Tensor) -> None:
        buf = self.staging.get(name)
        if buf is None:
            buf = self.staging[name] = torch.empty(grad.shape, dtype=grad.dtype, pin_memory=self.pin)
        buf.copy_(grad, non_blocking=self.pin)
        self.pending.append(name)

    def end_batch(self) -> None:
        if self.pending and self.pin:
            torch.cuda.synchronize()  # every copy of this batch has landed
        for name in self.pending:
            buf = self.staging[name]
            acc = self.sums.get(name)
            if acc is not None:
                acc.add_(buf)
            elif sum_dtype(buf.dtype) == buf.dtype:
                self.sums[name] = self.staging.pop(name)  # the buffer becomes the sum
            else:
                self.sums[name] = buf.to(sum_dtype(buf.dtype))
        self.pending = []

    def means(self, count: int) -> dict[str, torch.Tensor]:
        self.staging.clear()
        return super().means(count)

    def _home(self, p: torch.Tensor) -> torch.device:
        return torch.device("cpu")


def _deliver(sums: Sums, name: str, p: torch.nn.Parameter) -> None:
    sums.add(name, p.grad)
    p.grad = None


def forward_use_order(loss: torch.Tensor, params: Mapping[str, torch.nn.Parameter]) -> list[str]:
    """Names of `params` from input to output: ordered by the forward position (autograd
    sequence number) of the first graph node that consumes each; those `loss` never
    reaches come first. Read off the graph, so it costs no backward."""
    position = {id(p): i for i, p in enumerate(params.values())}
    names = list(params)
    first: dict[int, int] = {}
    if loss.grad_fn is not None:
        seen = {loss.grad_fn}
        stack = [loss.grad_fn]
        while stack:
            node = stack.pop()
            seq = node._sequence_nr()
            for child, _ in node.next_functions:
                if child is None:
                    continue
                variable = getattr(child, "variable", None)
                if variable is not None:
                    i = position.get(id(variable))
                    if i is not None and seq < first.get(i, math.inf):
                        first[i] = seq
                elif child not in seen:
                    seen.add(child)
                    stack.append(child)
    unreached = [n for i, n in enumerate(names) if i not in first]
    return unreached + [names[i] for i in sorted(first, key=lambda i: (first[i], i))]


def _fingerprint(batch) -> tuple:
    """Shapes, dtypes and a hash of every tensor in a batch (to see a set change between passes)."""
    out = []
    for leaf in tree_leaves(batch):
        if isinstance(leaf, torch.Tensor):
            t = leaf.detach()
            if hasattr(torch, "hash_tensor") and t.numel():  # xor of the elements' bits
                digest = int(torch.hash_tensor(t.reshape(-1)).view(torch.int64))
            else:
                digest = float(t.double().sum())
            out.append((tuple(t.shape), t.dtype, digest))
        elif isinstance(leaf, (str, int, float, bool)) or leaf is None:
            out.append(leaf)
    return tuple(out)


@dataclass
class Probe:
    """What one forward of the first forget batch shows before any pass: the parameters'
    forward use order, the bytes its graph keeps for backward, the largest saved tensor,
    and how far the forward rose above what it kept (the short-lived tensors inside one
    block, which a checkpointed block makes again when backward recomputes it)."""

    use_order: list[str]
    activation_bytes: int
    largest_activation: int
    forward_transient: int = 0


class GradientPass:
    """Runs the forget and retain sets through `model`, differentiating some of `names` each run.

    Every run sets the model's mode (eval unless train_mode), lets exactly `names` require
    grad whichever group the run differentiates (so every run records the same forward:
    torch.matmul, for one, folds batch dimensions only for a weight that requires grad),
    and backward is restricted to the group with `backward(inputs=...)`, which prunes the
    graph: it stops at the group's shallowest layer and skips every other weight gradient.
    nn.MultiheadAttention's fast path is off (eval-mode attention takes it where no
    parameter needs a gradient, with results that differ in the last bits), `checkpointing`
    (a context manager factory: the adapter's activation checkpointing) is entered, and all
    of it is restored afterwards.
    """

    def __init__(self, model: torch.nn.Module, forget_batches: Iterable, retain_batches: Iterable | None,
                 forget_loss: Loss, retain_loss: Loss | None, names: Sequence[str], *, train_mode: bool = False,
                 progress: bool | None = None,
                 checkpointing: Callable[[], contextlib.AbstractContextManager] | None = None):
        self.model = model
        self.named = dict(model.named_parameters())
        self.names = list(names)
        self.sets = {"forget": forget_batches, "retain": retain_batches}
        self.losses = {"forget": forget_loss, "retain": retain_loss or forget_loss}
        self.train_mode, self.progress, self.checkpointing = train_mode, progress, checkpointing
        self.repeats = False
        self.counts: dict[str, int] = {}
        self.fingerprints: dict[str, list] = {}
        self.depth_order: list[str] | None = None
        self.versions: list[int] = []

    def require_repeats(self) -> None:
        """For stores that read each set more than once: refuse one-shot iterators, and from the
        next run on fingerprint every batch to check that the sets come back the same."""
        for which, batches in self.sets.items():
            if batches is not None and iter(batches) is batches:
                raise SlugError(f"the {which} batches are a one-shot iterator, but this gradient store reads each "
                                "set once per pass: pass a list of batches or a re-iterable such as a DataLoader")
        self.repeats = True

    @property
    def has_retain(self) -> bool:
        return self.sets["retain"] is not None

    def params(self, names: Iterable[str]) -> dict[str, torch.nn.Parameter]:
        return {n: self.named[n] for n in names}

    @contextlib.contextmanager
    def prepared(self):
        fastpath = torch.backends.mha.get_fastpath_enabled()
        with training_state(self.model, train=self.train_mode, requires_grad=set(self.names), clear_grads=True):
            try:
                torch.backends.mha.set_fastpath_enabled(False)
                with (self.checkpointing() if self.checkpointing is not None else contextlib.nullcontext()):
                    yield
            finally:
                torch.backends.mha.set_fastpath_enabled(fastpath)

    def check_unchanged(self) -> None:
        """Refuse to run again once a differentiated tensor changed since the first run."""
        now = [self.named[n]._version for n in self.names]
        if self.versions and now != self.versions:
            raise SlugError("the model's parameters changed since the gradient pass began; recompute the gradients "
                            "(compute_gradients / unlearn) instead of reading them from an earlier pass")
        self.versions = now

    def run(self, sinks: Mapping[str, Sums], *, order: bool = False) -> None:
        """One pass: each set named in `sinks` through the model, the per-batch gradients of
        the layers of that set's sums handed to them. `order` records the forward use order
        on the first forget batch."""
        self.check_unchanged()
        with self.prepared():
            for which, sums in sinks.items():
                self._run_set(which, sums, order and which == "forget")

    def _run_set(self, which: str, sums: Sums, order: bool) -> None:
        params = sums.params
        inputs = None if len(params) == len(self.names) else list(params.values())
        hooks = [p.register_post_accumulate_grad_hook(partial(_deliver, sums, n)) for n, p in params.items()]
        batches = self.sets[which]
        loss_fn = self.losses[which]
        seen = self.fingerprints.get(which)
        record = self.repeats and seen is None
        prints = []
        count = 0
        try:
            for batch in tqdm(batches, desc=f"{which} gradients",  # tqdm takes len(batches) when it has one
                              disable=None if self.progress is None else not self.progress, leave=False):
                if self.repeats:
                    fp = _fingerprint(batch)
                    if record:
                        prints.append(fp)
                    elif count >= len(seen):
                        raise SlugError(f"the {which} set had {len(seen)} batches in the first pass and more now; "
                                        "it must be the same every pass")
                    elif fp != seen[count]:
                        raise SlugError(f"the {which} batches differ from the first pass at batch {count}; this "
                                        "gradient store reads each set once per pass, so they must be the same "
                                        "every time: a list of batches, or a DataLoader without shuffling or "
                                        "random augmentation")
                loss = _checked_loss(loss_fn(self.model, batch), which, count)
                if order and count == 0:
                    self.depth_order = forward_use_order(loss, self.params(self.names))
                loss.backward(inputs=inputs)
                sums.end_batch()
                count += 1
        finally:
            for hook in hooks:
                hook.remove()
            for p in params.values():
                p.grad = None
        if count == 0:
            raise EmptySetError(f"the {which} set is empty: pass at least one batch")
        if record:
            self.fingerprints[which] = prints
        elif self.repeats and count != len(seen):
            raise SlugError(f"the {which} set had {len(seen)} batches in the first pass and {count} now; "
                            "it must be the same every pass")
        self.counts[which] = count

    def probe(self) -> Probe:
        """One forward of the first forget batch with every layer requiring grad, its graph
        then dropped unused: the forward use order, and the bytes held for backward (tensors
        saved by autograd that are neither parameters nor the batch itself, or the growth in
        memory while the graph is alive, whichever is larger: checkpointed regions save their
        inputs outside autograd's hooks)."""
        from .memory import PeakMeter

        batches = self.sets["forget"]
        rest = iter(batches)
        batch = next(rest, None)
        if batch is None:
            raise EmptySetError("the forget set is empty: pass at least one batch")
        if rest is batches:  # a one-shot iterator: put the batch back in front
            self.sets["forget"] = itertools.chain([batch], rest)
        params = self.params(self.names)
        skip = {t.untyped_storage().data_ptr() for t in self.named.values()}
        skip |= {t.untyped_storage().data_ptr() for t in tree_leaves(batch) if isinstance(t, torch.Tensor)}
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor):
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in skip:
                saved[ptr] = storage.nbytes()
            # detached: a saved output that kept its own grad_fn would make a reference cycle
            # through C++ that the garbage collector cannot break (the graph would leak)
            return t.detach()

        device = next(iter(params.values())).device
        with self.prepared(), PeakMeter(device) as meter:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = _checked_loss(self.losses["forget"](self.model, batch), "forget", 0)
            grown, peak = meter.now(), meter.peak()
            order = forward_use_order(loss, params)
            del loss
        self.depth_order = order
        return Probe(order, max(sum(saved.values()), grown), max(saved.values(), default=0),
                     max(peak - grown, 0))


def _checked_loss(loss, which: str, count: int) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise SlugError(f"{which} loss must return a scalar tensor, got {got}")
    if not loss.requires_grad:
        raise SlugError(f"{which} loss does not depend on the chosen parameters "
                        "(it has no grad_fn); check params= and the loss function")
    if not bool(torch.isfinite(loss.detach())):
        raise NonFiniteError(f"{which} loss is {loss.item()} at batch {count}; "
                             "the gradients would not be finite")
    return loss
