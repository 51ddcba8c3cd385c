"""Cheaper step-search evaluations: replay what an edit cannot change, exactly.

A step search evaluates the same criterion many times while only the edited
tensors move. `upstream_replay(model, edit)` is a context manager installed
around one candidate's search (`unlearn(..., cache=True)` does it); while it is
active, calls through `model` cost only what the edit can change. The criterion
stays an opaque function: nothing here assumes what it runs.

1. Upstream replay. For every block stack of the model (the outermost
   nn.ModuleList / nn.Sequential whose children are named 0, 1, ...: open_clip
   `visual.transformer.resblocks` and `transformer.resblocks`, HF
   `vision_model.encoder.layers` and `text_model.encoder.layers`, plain
   Sequentials), the blocks before the first one that holds an edited tensor
   are replayed; so are all blocks of a stack that holds none (the other tower)
   and, as one-block stacks, the modules outside stacks that hold no edited
   tensor (`stems`: patch and token embeddings, final norms, projections).
   The first pass records, per call, the inputs of block 0 and the output of
   the last replayed block (the boundary). A later call whose block-0 inputs are
   bit-identical to a recorded call's (torch.equal, same shape, dtype, device
   and strides; other arguments equal plain values) gets the recorded boundary
   back without running those blocks; anything else runs for real and is
   recorded in its place (the "fallback"). Exact, because nothing in the
   replayed blocks changes: each call checks that their parameters and buffers
   are the same tensors at the same versions (else the records are dropped),
   that no edited tensor is among them, that nothing there is random or
   stateful (dropout, batch-norm statistics in training mode) or watched by a
   hook on a submodule; and the recorded call must have run under the same
   numerics settings (inference mode, autocast, TF32/matmul precision, SDPA and
   MHA fast-path switches, the modules' training flags).
   Blocks between block 0 and the boundary return placeholders (torch.Tensor
   subclasses without storage) that the next block takes as is; any other use
   (a hook on a block, HF `output_hidden_states`, open_clip
   `forward_intermediates`) computes the true value from the recorded block-0
   inputs first, so code that reads inside the replayed blocks sees exact
   values. Such hidden-state tuples may hold placeholders after the call.
2. Linear products (`linear=True`, `unlearn(cache="linear")`). For an edited
   nn.Linear weight whose forward is called (open_clip `mlp.c_fc` /
   `mlp.c_proj`, HF `q/k/v_proj`, `out_proj`, `fc1` / `fc2`,
   `visual_projection`; not nn.MultiheadAttention's `out_proj`, whose weight
   MultiheadAttention reads itself without calling out_proj), the output is
   (W0 x + b) + lam * (G x) with both products cached per input verified
   bit-identical to the recorded one, lam the edit's current step (checked
   against the weight once per step), G the direction: one axpy instead of the
   matmul. The same function summed in another order: equal to a plain
   evaluation within float32 rounding, not bit for bit, hence opt-in. Edited
   tensors that are not a called Linear's weight (MultiheadAttention
   in_proj_weight, a conv, a projection Parameter) are recomputed from the
   edited block on, as are all edits when linear is off.

Nothing is replayed or cached while autograd records (grad mode on), so
gradients stay exact; the built-in criteria run under torch.no_grad().

Memory held, per call of the current pass (a call = one batch through a stack):
references to the block-0 inputs and to the boundary output, e.g. for an
open_clip ViT-B-32 and 64 images of 50 tokens 2 x 9.8 MB, plus the stem's
pixels and patch embedding (38.5 + 9.6 MB, the pixels usually being the
caller's own tensor); never the other blocks' activations. Per call of an
edited Linear (linear=True): its input x and the products W0 x + b and G x in
float32 (ViT-B-32 `c_fc`, 64 images: 9.8 + 2 x 39 MB). All of it counts against
`max_bytes` (default 2 GiB); calls past it run uncached. Something whose
recorded calls never match for `patience` passes (its input moves with the
step: a stack after an edited conv, a final norm of the edited tower) stops
recording and lets its records go. Everything is restored on exit, exceptions
included. Not thread-safe.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map_only

from .edit import LayerEdit, axpy_reference
from .errors import SlugError

log = logging.getLogger("slug_fast")

DEFAULT_MAX_BYTES = 2 << 30
# float attributes that make a module random in training mode (dropout rates and the like)
_STOCHASTIC_ATTRS = ("dropout", "attention_dropout", "dropout_p", "attn_drop", "drop_prob", "drop_rate",
                     "drop_path", "prob", "p")


# ----------------------------------------------------------------------------- helpers


def _numerics_key() -> tuple:
    """The global settings that can change what a block computes from the same inputs."""
    key = [torch.is_inference_mode_enabled(), torch.get_float32_matmul_precision(),
           torch.backends.mha.get_fastpath_enabled(), torch.are_deterministic_algorithms_enabled()]
    for dev in ("cpu", "cuda"):
        try:
            key += [torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)]
        except (RuntimeError, TypeError):  # pragma: no cover - older torch
            key.append(None)
    cuda = torch.backends.cuda
    key += [cuda.matmul.allow_tf32, cuda.matmul.allow_fp16_reduced_precision_reduction,
            cuda.matmul.allow_bf16_reduced_precision_reduction, torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.enabled, torch.backends.cudnn.deterministic,
            cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled()]
    return tuple(key)


def _caching_allowed() -> bool:
    """Replay only where no graph is recorded and nothing traces or compiles."""
    if torch.is_grad_enabled() or torch._C._get_tracing_state() is not None:
        return False
    return not torch.compiler.is_compiling()


def _plain(t) -> bool:
    return type(t) in (torch.Tensor, nn.Parameter) and t.layout == torch.strided


def _replayable(obj) -> bool:
    """Arguments whose value we can record and compare: tensors, None, scalars, tuples of those."""
    if isinstance(obj, torch.Tensor):
        return _plain(obj)
    if obj is None or isinstance(obj, (bool, int, float, complex, str, torch.dtype, torch.device)):
        return True
    if isinstance(obj, (tuple, list)):
        return all(_replayable(o) for o in obj)
    return False


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and a.stride() == b.stride()
            and a.is_conj() == b.is_conj() and a.is_neg() == b.is_neg() and bool(torch.equal(a, b)))


def _same(a, b) -> bool:
    """Bit-identical values (tensors) or equal plain values; unknown objects never match."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and _plain(a) and _plain(b)):
            return False
        return a is b or _same_tensor(a, b)
    if a is None or b is None:
        return a is b
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, (bool, int, complex, str, torch.dtype, torch.device)):
        return a == b
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return False


def _tensors(obj) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _nbytes(obj) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(obj))


def _stochastic(m: nn.Module) -> bool:
    """A module whose output or state depends on more than its input in its current mode."""
    if not m.training:
        return False
    if isinstance(m, nn.modules.dropout._DropoutNd):
        return m.p > 0
    if isinstance(m, nn.modules.batchnorm._NormBase):
        return bool(m.track_running_stats)
    return any(isinstance(v, float) and v > 0 for v in (m.__dict__.get(a) for a in _STOCHASTIC_ATTRS))


def _inactive_hf_hook(hook) -> bool:
    """transformers' output-capturing hooks stay installed but do nothing unless a capture of their key runs."""
    if getattr(hook, "__name__", "") != "output_capturing_hook" or \
            not str(getattr(hook, "__module__", "")).startswith("transformers."):
        return False
    try:
        from transformers.utils.output_capturing import _active_collector

        collected = _active_collector.get()
        if collected is None:
            return True
        cells = dict(zip(hook.__code__.co_freevars, (c.cell_contents for c in hook.__closure__)))
        return cells["key"] not in collected
    except Exception:  # noqa: BLE001 - any doubt: treat the hook as active
        return False


def _hooked(m: nn.Module) -> bool:
    return any(not _inactive_hf_hook(h) for hooks in (m._forward_hooks, m._forward_pre_hooks)
               for h in hooks.values())


def _global_hooks() -> bool:
    from torch.nn.modules import module as _module

    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks)


@dataclass(frozen=True)
class _Meta:
    shape: torch.Size
    stride: tuple
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, t: torch.Tensor) -> "_Meta":
        return cls(t.shape, t.stride(), t.dtype, t.device)


def _out_meta(out):
    """Structure of a block's output: a tensor, or a tuple of tensors / None led by a tensor."""
    if isinstance(out, torch.Tensor) and _plain(out):
        return _Meta.of(out)
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor) and \
            all(o is None or (isinstance(o, torch.Tensor) and _plain(o)) for o in out):
        return tuple(None if o is None else _Meta.of(o) for o in out)
    return None


def _hidden(out):
    """The tensor a chained loop hands to the next block."""
    return out if isinstance(out, torch.Tensor) else out[0]


# ----------------------------------------------------------------------------- skipped outputs


class _Skipped(torch.Tensor):
    """The output of a replayed block before the boundary: metadata only, no storage.

    Passing it to the next replayed block costs nothing; any other use (an op, a
    hook, printing) first computes the true value from the recorded block-0
    inputs, so code that reads inside the replayed blocks still gets exact values.
    """

    @staticmethod
    def __new__(cls, meta: _Meta, source: "_Materializer", block: int, index: int | None):
        t = torch.Tensor._make_wrapper_subclass(cls, meta.shape, strides=meta.stride, dtype=meta.dtype,
                                                device=meta.device, requires_grad=False)
        t._slug_at = (source, block, index)
        return t

    def _slug_real(self) -> torch.Tensor:
        source, block, index = self._slug_at
        return source.value(block, index)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        args, kwargs = tree_map_only(_Skipped, lambda t: t._slug_real(), (args, kwargs))
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # only code that bypasses torch_function
        args, kwargs = tree_map_only(_Skipped, lambda t: t._slug_real(), (args, kwargs or {}))
        return func(*args, **kwargs)


_METADATA = {torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__, torch.Tensor.device.__get__,
             torch.Tensor.ndim.__get__, torch.Tensor.requires_grad.__get__, torch.Tensor.is_cuda.__get__,
             torch.Tensor.size, torch.Tensor.dim, torch.Tensor.stride, torch.Tensor.numel}


class _Materializer:
    """Recomputes the replayed blocks' true outputs of one call on demand (rarely needed)."""

    def __init__(self, stack: "_StackReplay", record: "_Record"):
        self.stack, self.record = stack, record
        self.outputs: list = []

    def value(self, block: int, index: int | None) -> torch.Tensor:
        rec = self.record
        if not rec.intact():
            raise SlugError(f"a replayed output of {self.stack.name}.{block} was read after its recorded inputs "
                            "were changed in place; it can no longer be computed")
        mode = torch.inference_mode() if rec.inference else torch.no_grad()
        with mode:
            while len(self.outputs) <= block:
                j = len(self.outputs)
                args = rec.args if j == 0 else (_hidden(self.outputs[-1]), *rec.args[1:])
                self.outputs.append(self.stack.originals[j](*args, **rec.kwargs))
                self.stack.materialized += 1
        out = self.outputs[block]
        return out if index is None else out[index]


# ----------------------------------------------------------------------------- block stacks


def find_stacks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost nn.ModuleList / nn.Sequential of two or more children named 0, 1, ..."""
    found: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)) or len(m) < 2:
            continue
        if not all(k.isdigit() for k in m._modules):
            continue
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
class _Record:
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
        self.versions = [(t, t._version) for t in _tensors(held)]
        self.nbytes = _nbytes(held)

    def intact(self) -> bool:
        return all(t._version == v for t, v in self.versions)

    def matches(self, args, kwargs, numerics) -> bool:
        return (numerics == self.numerics and len(args) == len(self.args) and kwargs.keys() == self.kwargs.keys()
                and all(_same(a, b) for a, b in zip(args, self.args))
                and all(_same(kwargs[k], self.kwargs[k]) for k in kwargs))


class _Session:
    """One call going through the replayed blocks (replaying a record, or recording one)."""

    def __init__(self, args, kwargs, numerics, record: _Record | None, stack: "_StackReplay"):
        self.args, self.kwargs, self.numerics = args, kwargs, numerics
        self.record = record
        self.expected = None  # what the next block must receive for the chain to hold
        self.metas: list = []
        self.source = _Materializer(stack, record) if record is not None else None


class _StackReplay:
    """Replays blocks [0, boundary) of one stack."""

    def __init__(self, owner: "UpstreamReplay", name: str, stack, boundary: int):
        self.owner, self.name, self.boundary = owner, name, boundary
        self.blocks = [stack[i] for i in range(boundary)]
        self.length = len(stack)
        self.originals = [b.forward for b in self.blocks]
        self.records: list[_Record | None] = []
        self.cursor = 0
        self.session: _Session | None = None
        self.token = None
        self.region_key = None
        self.pass_hits = self.pass_calls = 0
        self.pass_had_records = False
        self.cold = 0
        self.disabled = False
        self.hits = self.misses = self.bypassed = self.materialized = 0

    # --- install / remove
    def install(self) -> None:
        for j, block in enumerate(self.blocks):
            if "forward" in block.__dict__:
                raise SlugError(f"block {self.name}.{j} already has an instance forward; another replay or "
                                "wrapper is active on it")
            block.forward = self._forward(j)

    def remove(self) -> None:
        for block in self.blocks:
            block.__dict__.pop("forward", None)
        self.session = None
        self.clear()

    def clear(self) -> None:
        for rec in self.records:
            if rec is not None:
                self.owner.bytes -= rec.nbytes
        self.records, self.cursor = [], 0

    def _forward(self, j: int):
        def forward(*args, **kwargs):
            return self.call(j, args, kwargs)
        return forward

    # --- per call
    def call(self, j: int, args: tuple, kwargs: dict):
        orig = self.originals[j]
        if j == 0:
            self.session = None
            return self._first(args, kwargs)
        s = self.session
        if s is None:
            return orig(*args, **kwargs)
        if not (args and args[0] is s.expected and self._same_extras(s, args, kwargs)):
            self.session = None  # the loop does not chain blocks as recorded: compute for real
            return orig(*args, **kwargs)
        if s.record is not None:  # replaying
            out = self._replayed(s, j)
        else:  # recording
            out = orig(*args, **kwargs)
            meta = _out_meta(out)
            if meta is None:
                self.session = None
                return out
            s.metas.append(meta)
            if j == self.boundary - 1:
                self._store(s, out)
        s.expected = _hidden(out)
        if j == self.boundary - 1:
            self.session = None
        return out

    def _first(self, args, kwargs):
        orig = self.originals[0]
        if self.disabled or not _caching_allowed() or not args or not isinstance(args[0], torch.Tensor) \
                or not _replayable(args) or not _replayable(tuple(kwargs.values())):
            self.bypassed += 1
            return orig(*args, **kwargs)
        training = self._region_ok()
        if training is None:
            self.bypassed += 1
            return orig(*args, **kwargs)
        self._sync_pass()
        numerics = _numerics_key() + (training,)
        self.pass_calls += 1
        rec = self._find(args, kwargs, numerics)
        if rec is not None:
            self.hits += 1
            self.pass_hits += 1
            s = self.session = _Session(args, kwargs, numerics, rec, self)
            out = self._replayed(s, 0)
            s.expected = _hidden(out)
            if self.boundary == 1:
                self.session = None
            return out
        self.misses += 1
        s = self.session = _Session(args, kwargs, numerics, None, self)
        out = orig(*args, **kwargs)
        meta = _out_meta(out)
        if meta is None:
            self.session = None
            return out
        s.metas.append(meta)
        s.expected = _hidden(out)
        if self.boundary == 1:
            self._store(s, out)
            self.session = None
        return out

    def _replayed(self, s: _Session, j: int):
        rec = s.record
        if j == self.boundary - 1:
            return rec.boundary
        meta = rec.metas[j]
        if isinstance(meta, _Meta):
            return _Skipped(meta, s.source, j, None)
        return tuple(None if m is None else _Skipped(m, s.source, j, i) for i, m in enumerate(meta))

    @staticmethod
    def _same_extras(s: _Session, args, kwargs) -> bool:
        if len(args) != len(s.args) or kwargs.keys() != s.kwargs.keys():
            return False
        pairs = list(zip(args[1:], s.args[1:])) + [(kwargs[k], s.kwargs[k]) for k in kwargs]
        return all(a is b or _same(a, b) for a, b in pairs)

    def _region_ok(self):
        """The replayed blocks' training flags if replaying them is exact now, else None.

        Checks that no edited tensor is among their parameters, nothing there is random
        or stateful in its mode, no hook watches inside a block, and their tensors are
        the ones recorded (else the records are dropped).
        """
        if _global_hooks():
            return None
        edited = self.owner.edited_ids
        training, key = [], []
        for block in self.blocks:
            for m in block.modules():
                if _stochastic(m) or (m is not block and _hooked(m)):
                    return None
                training.append(m.training)
                for t in (*m._parameters.values(), *m._buffers.values()):
                    if t is None:
                        continue
                    if id(t) in edited:
                        return None
                    key.append((id(t), t._version, t.data_ptr(), t.dtype, t.shape))
        key = tuple(key)
        if key != self.region_key:
            if self.region_key is not None:
                log.debug("replay %s: upstream tensors changed; records dropped", self.name)
            self.clear()
            self.region_key = key
        return tuple(training)

    def _sync_pass(self) -> None:
        token = self.owner.token()
        if token == self.token:
            return
        if self.pass_had_records and self.pass_calls:
            self.cold = 0 if self.pass_hits else self.cold + 1
        if self.cold >= self.owner.patience:
            self.disabled = True
            self.clear()
            log.debug("replay %s: recorded calls never matched for %d passes; off", self.name, self.cold)
        self.token, self.cursor = token, 0
        self.pass_hits = self.pass_calls = 0
        self.pass_had_records = any(r is not None for r in self.records)

    def _find(self, args, kwargs, numerics) -> _Record | None:
        n = len(self.records)
        order = ([self.cursor] if self.cursor < n else []) + [i for i in range(n) if i != self.cursor]
        for i in order:
            rec = self.records[i]
            if rec is None:
                continue
            if not rec.intact():
                self.owner.bytes -= rec.nbytes
                self.records[i] = None
                continue
            if rec.matches(args, kwargs, numerics):
                self.cursor = i + 1
                return rec
        return None

    def _store(self, s: _Session, out) -> None:
        rec = _Record(s.args, dict(s.kwargs), s.numerics, s.metas, out)
        rec.seal()
        old = self.records[self.cursor] if self.cursor < len(self.records) else None
        freed = old.nbytes if old is not None else 0
        if self.owner.bytes - freed + rec.nbytes > self.owner.max_bytes:
            return  # over budget: this call stays uncached
        self.owner.grow(rec.nbytes - freed)
        if self.cursor < len(self.records):
            self.records[self.cursor] = rec
        else:
            self.records.append(rec)
        self.cursor += 1


# ----------------------------------------------------------------------------- edited Linear


@dataclass(eq=False)
class _Products:
    x: torch.Tensor
    version: int
    numerics: tuple
    base: torch.Tensor  # W0 x + b
    gx: torch.Tensor  # G x
    nbytes: int
    stale: bool = False


class _LinearFast:
    """y = (W0 x + b) + lam * (G x) for an edited nn.Linear weight, products cached per input."""

    def __init__(self, owner: "UpstreamReplay", name: str, module: nn.Linear, theta0: torch.Tensor,
                 direction: torch.Tensor):
        self.owner, self.name, self.module = owner, name, module
        self.weight = module.weight
        self.theta0, self.direction = theta0, direction
        self.original = module.forward
        self.entries: list[_Products | None] = []
        self.cursor = 0
        self.seen = None  # (weight version, bias version) the check below ran for
        self.step_ok = False
        self.pass_hits = self.pass_calls = self.cold = 0
        self.pass_had_entries = self.disabled = False
        self.hits = self.misses = self.bypassed = 0

    def install(self) -> None:
        if "forward" in self.module.__dict__:
            raise SlugError(f"{self.name} already has an instance forward; another replay or wrapper is active on it")
        self.module.forward = self.forward

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)
        self.clear()

    def clear(self) -> None:
        self.owner.bytes -= sum(e.nbytes for e in self.entries if e is not None)
        self.entries, self.cursor = [], 0

    def forward(self, *args, **kwargs):
        m = self.module
        x = args[0] if len(args) == 1 and not kwargs else None
        if self.disabled or x is None or not _plain(x) or not x.is_floating_point() or m.weight is not self.weight \
                or not _caching_allowed() or torch.is_autocast_enabled(x.device.type):
            self.bypassed += 1
            return self.original(*args, **kwargs)
        bias = m.bias
        seen = (self.weight._version, None if bias is None else (id(bias), bias._version))
        if seen != self.seen:  # a new step (or a restore): a new pass; check the weight once
            if self.seen is not None and seen[1] != self.seen[1]:
                self.clear()
            self._new_pass()
            self.seen = seen
            self.step_ok = self._weight_is_at_step()
            if self.disabled:
                return self.original(*args, **kwargs)
        if not self.step_ok:
            self.bypassed += 1
            return self.original(*args, **kwargs)
        numerics = _numerics_key()
        self.pass_calls += 1
        entry = self._find(x, numerics)
        if entry is None:
            self.misses += 1
            slot = self.entries[self.cursor] if self.cursor < len(self.entries) else None
            if slot is not None and not slot.stale:
                # the input changed since it was recorded: one plain matmul now; products are
                # recomputed (two matmuls) only if it changes again, e.g. for a Linear that
                # follows another edited one (HF fc2 after fc1), whose input moves every step
                slot.stale = True
                self.cursor += 1
                return self.original(x)
            entry = self._compute(x, numerics)
        else:
            self.hits += 1
            self.pass_hits += 1
        return torch.add(entry.base, entry.gx, alpha=self.owner.step()).to(x.dtype)

    def _new_pass(self) -> None:
        if self.pass_had_entries and self.pass_calls:
            self.cold = 0 if self.pass_hits else self.cold + 1
        if self.cold >= self.owner.patience:
            self.disabled = True
            self.clear()
            log.debug("linear cache %s: inputs never matched for %d steps; off", self.name, self.cold)
        self.cursor = self.pass_hits = self.pass_calls = 0
        self.pass_had_entries = any(e is not None for e in self.entries)

    def _weight_is_at_step(self) -> bool:
        """Whether the weight holds cast(theta0 + lam * G) for the edit's current step (to rounding:
        the C++ and Triton updates may fuse the multiply-add)."""
        w = self.weight.detach()
        ref = torch.empty_like(w)
        lam = self.owner.step()
        axpy_reference(ref, self.theta0, self.direction, lam)
        if torch.equal(ref, w):
            return True
        eps = torch.finfo(w.dtype).eps
        scale = float(self.theta0.abs().max()) + abs(lam) * float(self.direction.abs().max())
        return float((ref.double() - w.double()).abs().max()) <= 4 * eps * scale

    def _find(self, x, numerics) -> _Products | None:
        n = len(self.entries)
        order = ([self.cursor] if self.cursor < n else []) + [i for i in range(n) if i != self.cursor]
        for i in order:
            e = self.entries[i]
            if e is None:
                continue
            if e.x._version != e.version:
                self.owner.bytes -= e.nbytes
                self.entries[i] = None
                continue
            if e.numerics == numerics and (e.x is x or _same_tensor(e.x, x)):
                self.cursor = i + 1
                return e
        return None

    def _compute(self, x, numerics) -> _Products:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        bias = self.module.bias
        base = F.linear(x, self.theta0.to(x.dtype), bias).to(acc)
        gx = F.linear(x.to(acc), self.direction.to(device=x.device, dtype=acc))
        entry = _Products(x, x._version, numerics, base, gx, _nbytes((x, base, gx)))
        old = self.entries[self.cursor] if self.cursor < len(self.entries) else None
        freed = old.nbytes if old is not None else 0
        if self.owner.bytes - freed + entry.nbytes > self.owner.max_bytes:
            return entry  # over budget: used once, not kept
        self.owner.grow(entry.nbytes - freed)
        if self.cursor < len(self.entries):
            self.entries[self.cursor] = entry
        else:
            self.entries.append(entry)
        self.cursor += 1
        return entry


# ----------------------------------------------------------------------------- the context manager


class UpstreamReplay:
    """Context manager: evaluations through `model` re-run only what `edit` can change.

    model: the nn.Module the criterion runs (an adapter's target); edit: an active
    LayerEdit whose tensors are the only ones that change while this is active.
    linear: also cache an edited nn.Linear's products (W0 x + b, G x): equal to a plain
    evaluation within float32 rounding; the default (False) keeps every output bit-identical.
    Whole stacks that hold no edited tensor (the other tower) and the modules outside stacks
    that hold none (patch and token embeddings, final norms) are replayed too.
    """

    def __init__(self, model: nn.Module, edit: LayerEdit, *, linear: bool = False,
                 max_bytes: int | None = DEFAULT_MAX_BYTES, patience: int = 2):
        if not isinstance(model, nn.Module):
            raise SlugError(f"upstream_replay needs the nn.Module the criterion runs, got {type(model).__name__}")
        if not isinstance(edit, LayerEdit) or not edit.active:
            raise SlugError("upstream_replay needs an active LayerEdit: use it inside `with LayerEdit(...) as edit`")
        self.model, self.edit = model, edit
        self.linear = linear
        self.max_bytes = math.inf if max_bytes is None else int(max_bytes)
        self.patience = max(1, int(patience))
        self.bytes = 0
        self.peak_bytes = 0
        self.stacks: list[_StackReplay] = []
        self.stems: list[_StackReplay] = []  # modules outside stacks, replayed as one-block stacks
        self.linears: list[_LinearFast] = []
        self._edited = list(edit.tensors.values())
        self.edited_ids = {id(p) for p in self._edited}
        self._active = False

    def step(self) -> float:
        return self.edit.current_step

    def grow(self, nbytes: int) -> None:
        self.bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def token(self) -> tuple:
        return tuple(p._version for p in self._edited)

    def __enter__(self) -> "UpstreamReplay":
        if self._active:
            raise SlugError("this upstream_replay is already active")
        self._plan()
        installed = []
        try:
            for part in (*self.stacks, *self.stems, *self.linears):
                part.install()
                installed.append(part)
        except BaseException:
            for part in reversed(installed):
                part.remove()
            raise
        self._active = True
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._active = False
        for part in (*self.linears, *self.stems, *self.stacks):
            part.remove()
        return False

    def _plan(self) -> None:
        self.stacks, self.stems, self.linears = [], [], []
        stacks = find_stacks(self.model)
        for name, stack in stacks:
            holds = [i for i, block in enumerate(stack)
                     if any(id(p) in self.edited_ids for _, p in block.named_parameters(remove_duplicate=False))]
            boundary = min(holds) if holds else len(stack)
            if boundary == 0:
                continue
            self.stacks.append(_StackReplay(self, name, stack, boundary))
        self.stems = [_StackReplay(self, name, [module], 1)
                      for name, module in find_stems(self.model, [n for n, _ in stacks], self.edited_ids)]
        if not self.linear:
            return
        theta0, directions = self.edit.theta0, self.edit.directions
        owners = {}
        for mname, m in self.model.named_modules():
            for pname, p in m._parameters.items():
                if p is not None and id(p) in self.edited_ids:
                    owners.setdefault(id(p), []).append((mname, pname, m))
        for key, p in self.edit.tensors.items():
            uses = owners.get(id(p), [])
            if len(uses) != 1:
                continue  # not in the model, or shared by several modules: recomputed
            mname, pname, m = uses[0]
            if not (isinstance(m, nn.Linear) and pname == "weight") or isinstance(self._parent(mname),
                                                                                  nn.MultiheadAttention):
                continue  # MultiheadAttention reads out_proj.weight itself, never calling out_proj
            if m.bias is not None and id(m.bias) in self.edited_ids:
                continue
            self.linears.append(_LinearFast(self, mname, m, theta0[key], directions[key]))

    def _parent(self, name: str):
        return self.model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else self.model

    def stats(self) -> dict:
        """What was replayed and cached: per stack and per edited Linear."""
        return {
            "bytes": self.bytes, "peak_bytes": self.peak_bytes,
            "stacks": {s.name: {"boundary": s.boundary, "blocks": s.length, "hits": s.hits, "misses": s.misses,
                                "bypassed": s.bypassed, "materialized": s.materialized, "off": s.disabled}
                       for s in self.stacks},
            "stems": {s.name: {"hits": s.hits, "misses": s.misses, "bypassed": s.bypassed, "off": s.disabled}
                      for s in self.stems},
            "linears": {f.name: {"hits": f.hits, "misses": f.misses, "bypassed": f.bypassed, "off": f.disabled}
                        for f in self.linears},
        }


def upstream_replay(model: nn.Module, edit: LayerEdit, **options) -> UpstreamReplay:
    """`with upstream_replay(model, edit): ...` - see UpstreamReplay and this module's docstring."""
    return UpstreamReplay(model, edit, **options)
