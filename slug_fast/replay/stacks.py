"""Upstream replay of block stacks: the blocks before the first edited one return a recorded output."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import SlugError
from .cache import RecordCache
from .hooks import global_hooks, hooked
from .placeholders import Materializer, hidden, out_meta, placeholders
from .values import caching_allowed, nbytes, numerics_key, replayable, same, stochastic, tensors

log = logging.getLogger("slug_fast")


def find_stacks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost nn.ModuleList / nn.Sequential of two or more children named 0, 1, ..."""
    found: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)) or len(m) < 2:
            continue
        if not all(k.isdigit() for k in m._modules):
            continue
        blocks = list(m._modules.values())
        if len({id(b) for b in blocks}) != len(blocks):
            continue  # a module at two depths (weights tied across blocks): one forward cannot tell them apart
        if any(name.startswith(outer + ".") or outer == "" for outer, _ in found):
            continue
        found.append((name, m))
    return found


def find_stems(model: nn.Module, stack_names, edited_ids) -> list[tuple[str, nn.Module]]:
    """Modules with parameters that branch off the path from the root to each stack and each edited
    tensor (open_clip `visual.conv1`, `ln_pre`, `token_embedding`; HF `embeddings`): each is replayed
    as a one-block stack. Those downstream of the edit (`ln_post`, projections) never match and
    switch themselves off."""
    modules = dict(model.named_modules())
    keep: set[str] = set()

    def add_chain(name: str) -> None:
        while name not in keep:
            keep.add(name)
            if not name:
                return
            name = name.rsplit(".", 1)[0] if "." in name else ""

    for name in stack_names:
        add_chain(name)
    for name, m in modules.items():
        if any(p is not None and id(p) in edited_ids for p in m._parameters.values()):
            add_chain(name)
    stems = []
    for name, m in modules.items():
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        if not name or name in keep or parent not in keep or \
                any(not n or name.startswith(f"{n}.") for n in stack_names):
            continue
        params = list(m.parameters())
        if params and not any(id(p) in edited_ids for p in params):
            stems.append((name, m))
    return stems



@dataclass(eq=False)
class Record:
    """One recorded call: block-0 inputs, the boundary output, and what it was computed under."""

    args: tuple
    kwargs: dict
    numerics: tuple
    metas: list
    boundary: object
    versions: list = field(default_factory=list)
    nbytes: int = 0

    @property
    def inference(self) -> bool:
        return bool(self.numerics[0])

    def seal(self) -> None:
        held = [self.args, self.kwargs, self.boundary]
        self.versions = [(t, t._version) for t in tensors(held)]
        self.nbytes = nbytes(held)

    def intact(self) -> bool:
        return all(t._version == v for t, v in self.versions)

    def matches(self, args, kwargs, numerics) -> bool:
        return (numerics == self.numerics and len(args) == len(self.args) and kwargs.keys() == self.kwargs.keys()
                and all(same(a, b) for a, b in zip(args, self.args))
                and all(same(kwargs[k], self.kwargs[k]) for k in kwargs))


class Session:
    """One call going through the replayed blocks (replaying a record, or recording one)."""

    def __init__(self, args, kwargs, numerics, record: Record | None, stack: "StackReplay"):
        self.args, self.kwargs, self.numerics = args, kwargs, numerics
        self.record = record
        self.expected = None  # what the next block must receive for the chain to hold
        self.metas: list = []
        self.source = Materializer(stack, record) if record is not None else None


class StackReplay:
    """Replays blocks [0, boundary) of one stack; its records live in a RecordCache."""

    def __init__(self, owner, name: str, stack, boundary: int):
        self.owner, self.name, self.boundary = owner, name, boundary
        self.blocks = [stack[i] for i in range(boundary)]
        self.length = len(stack)
        self.originals = [b.forward for b in self.blocks]
        self.cache = RecordCache(name, owner.budget, owner.patience)
        self.session: Session | None = None
        self.region_key = None
        self.bypassed = self.materialized = 0

    # --- install / remove
    def install(self) -> None:
        """Patch each block's forward, or none: a refused block unpatches those before it."""
        for j, block in enumerate(self.blocks):
            if "forward" in block.__dict__:
                for done in self.blocks[:j]:
                    done.__dict__.pop("forward", None)
                raise SlugError(f"block {self.name}.{j} already has an instance forward; another replay or "
                                "wrapper is active on it")
            block.forward = self._forward(j)

    def remove(self) -> None:
        for block in self.blocks:
            block.__dict__.pop("forward", None)
        self.session = None
        self.cache.clear()

    def _forward(self, j: int):
        def forward(*args, **kwargs):
            return self.call(j, args, kwargs)
        return forward

    # --- per call
    def call(self, j: int, args: tuple, kwargs: dict):
        if j == 0:
            self.session = None
            return self._first(args, kwargs)
        s = self.session
        if s is None or not (args and args[0] is s.expected and self._same_extras(s, args, kwargs)):
            self.session = None  # no call in progress, or the loop does not chain blocks as recorded
            return self.originals[j](*args, **kwargs)
        return self._record(s, j, args, kwargs) if s.record is None else self._replay(s, j)

    def _first(self, args, kwargs):
        training = None
        if not self.cache.off and caching_allowed() and args and isinstance(args[0], torch.Tensor) \
                and replayable(args) and replayable(tuple(kwargs.values())):
            training = self._region_ok()
            if training is not None:
                self.cache.sync(self.owner.token())
        if training is None or self.cache.off:
            self.bypassed += 1
            return self.originals[0](*args, **kwargs)
        numerics = numerics_key() + (training,)
        rec = self.cache.find(lambda r: r.matches(args, kwargs, numerics))
        s = self.session = Session(args, kwargs, numerics, rec, self)
        return self._record(s, 0, args, kwargs) if rec is None else self._replay(s, 0)

    def _replay(self, s: Session, j: int):
        """Block j of a replayed call: the recorded boundary output, or placeholders before it."""
        last = j == self.boundary - 1
        out = s.record.boundary if last else placeholders(s.record.metas[j], s.source, j)
        s.expected = hidden(out)
        if last:
            self.session = None
        return out

    def _record(self, s: Session, j: int, args, kwargs):
        """Block j of a recorded call, run for real; the boundary output completes the record."""
        out = self.originals[j](*args, **kwargs)
        meta = out_meta(out)
        if meta is None:  # an output we cannot stand in for: this call is not recorded
            self.session = None
            return out
        s.metas.append(meta)
        s.expected = hidden(out)
        if j == self.boundary - 1:
            self._store(s, out)
            self.session = None
        return out

    @staticmethod
    def _same_extras(s: Session, args, kwargs) -> bool:
        if len(args) != len(s.args) or kwargs.keys() != s.kwargs.keys():
            return False
        pairs = list(zip(args[1:], s.args[1:])) + [(kwargs[k], s.kwargs[k]) for k in kwargs]
        return all(a is b or same(a, b) for a, b in pairs)

    def _region_ok(self):
        """The replayed blocks' training flags if replaying them is exact now, else None.

        Checks that no edited tensor is among their parameters, nothing there is random
        or stateful in its mode, no hook watches inside a block, and their tensors are
        the ones recorded (else the records are dropped).
        """
        if global_hooks():
            return None
        edited = self.owner.edited_ids
        training, key = [], []
        for block in self.blocks:
            for m in block.modules():
                if stochastic(m) or (m is not block and hooked(m)):
                    return None
                training.append(m.training)
                for t in (*m._parameters.values(), *m._buffers.values()):
                    if t is None:
                        continue
                    if id(t) in edited:
                        return None
                    key.append((id(t), t._version, t.data_ptr(), t.dtype, t.shape, t.stride()))
        key = tuple(key)
        if key != self.region_key:
            if self.region_key is not None:
                log.debug("replay %s: upstream tensors changed; records dropped", self.name)
            self.cache.clear()
            self.region_key = key
        return tuple(training)

    def _store(self, s: Session, out) -> None:
        rec = Record(s.args, dict(s.kwargs), s.numerics, s.metas, out)
        if any(t.is_inference() for t in tensors([rec.args, rec.kwargs, rec.boundary])):
            return  # inference tensors keep no version counter: a change in place could not be seen
        rec.seal()
        self.cache.store(rec)

    def stats(self) -> dict:
        c = self.cache
        return {"boundary": self.boundary, "blocks": self.length, "hits": c.hits, "misses": c.misses,
                "bypassed": self.bypassed, "materialized": self.materialized, "off": c.off}
