"""Memory as a budget: parse it, predict what each gradient store needs, pick one, measure the peak.

Every figure here is bytes ABOVE what is in use when the gradient pass starts (the loaded
model and data): what SLUG itself adds. Per differentiated parameter of element size S a
full gradient pass holds one finished gradient (S bytes) and one running float32 sum
(4 bytes; 8 for float64 parameters) at once, so (S + 4) bytes: 2x the weights in float32,
3x in bfloat16. The chunked store holds that for one group of layers at a time; the
offload store holds it in host memory and leaves activations and one layer's gradient on
the device.
"""
from __future__ import annotations

import math
import os
import re
import resource
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from .errors import SlugError

MODES = ("auto", "full", "chunked", "offload")
# On a GPU the chunked store is preferred to offloading only while it needs few passes:
# each pass is a forward of both sets, while offload costs one pass plus host transfers.
MAX_PREFERRED_PASSES = 4
# Without a budget, the share of the gradient state the chunked store may spend on keeping
# the forget gradients of layers on the running Pareto fronts (the rest is recomputed);
# with one, it keeps what the budget leaves beside its largest group.
KEEP_SHARE = 0.125
# Bytes of gradients streamed back to the device at a time by the offload store's statistics.
STREAM_BYTES = 256 << 20
# On the CPU the peak is read as resident memory, which holds more than the live tensors:
# memory the allocator keeps after a free, and library workspaces. bench/bench_memory.py
# measured peaks 15-37 MiB above the tensor bytes for bfloat16 open_clip models (RESULTS.md).
CPU_ALLOCATOR_SLACK = 32 << 20

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9}


@dataclass(frozen=True)
class Budget:
    """A memory budget: `bytes`, or `weights` times the differentiated weights' bytes ("0.5x")."""

    bytes: int | None = None
    weights: float | None = None

    def resolve(self, weight_bytes: int) -> int:
        return int(self.bytes) if self.bytes is not None else int(self.weights * weight_bytes)

    def __str__(self) -> str:
        return f"{self.weights:g}x the weights" if self.weights is not None else format_bytes(self.bytes)


def parse_budget(value) -> Budget | None:
    """None, bytes (an int), or a string: "12GB", "512 MiB", "2.5e9", or "0.5x" (of the weights)."""
    if value is None or isinstance(value, Budget):
        return value
    hint = ("memory_budget is bytes (an int) or a string like '12GB', '512MiB' or '0.5x' "
            "(a multiple of the differentiated weights' bytes)")
    if isinstance(value, bool):
        raise SlugError(f"{hint}; got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value <= 0:
            raise SlugError(f"{hint}, and positive; got {value!r}")
        return Budget(bytes=int(value))
    if not isinstance(value, str):
        raise SlugError(f"{hint}; got {type(value).__name__}")
    text = value.strip().lower().replace(" ", "").replace("_", "")
    hit = re.fullmatch(r"(\d+(?:\.\d*)?(?:e\d+)?|\.\d+)(x|[kmgt]i?b?|b)?", text)
    if not hit:
        raise SlugError(f"{hint}; got {value!r}")
    number, unit = float(hit.group(1)), hit.group(2) or ""
    if number <= 0:
        raise SlugError(f"{hint}, and positive; got {value!r}")
    if unit == "x":
        return Budget(weights=number)
    return Budget(bytes=int(number * _UNITS[unit]))


def format_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# ----------------------------------------------------------------------------- measuring


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def in_use(device: torch.device | str = "cpu") -> int:
    """Bytes in use now: allocated by torch on a GPU, the resident set on the CPU (0 if unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        return _rss()
    except OSError:
        return 0


def _peak_level(device: torch.device, exact: bool) -> int:
    """The absolute peak since the counter was last reset (CUDA allocated, or RSS)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    hwm = _hwm() if exact else None
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# started meters, whose peaks an inner meter's reset must not lose (weak: a meter dropped
# without stop(), by an exception say, leaves with its last reference)
_ACTIVE: "weakref.WeakSet[PeakMeter]" = weakref.WeakSet()


class PeakMeter:
    """Measures the peak memory above the level at start, on a device; meters nest.

    CUDA: torch.cuda.max_memory_allocated (its peak counter is reset at start).
    CPU: the process's peak RSS; on Linux its high-water mark is reset at start
    (/proc/self/clear_refs), elsewhere the peak since the process started is used. Memory
    the process frees during the run (garbage of earlier work collected then) lowers RSS
    and so hides as much of a rise above the base; a full gc.collect() at start would
    prevent that but costs about 0.3 s in a process that has torch loaded.
    A meter started inside another first hands the outer one the peak so far.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.base = 0
        self.carried = 0  # the highest level seen before an inner meter's reset
        self.source = ""
        self.exact = True

    def __enter__(self) -> "PeakMeter":
        return self.start()

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False

    def start(self) -> "PeakMeter":
        """Take the current level as the base and reset the peak counter."""
        for outer in _ACTIVE:
            if outer.device.type == self.device.type:
                outer.carried = max(outer.carried, _peak_level(outer.device, outer.exact))
        self.carried = 0
        _ACTIVE.add(self)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.source = "torch.cuda.max_memory_allocated"
            return self
        try:
            self.base = _rss()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.source = "peak RSS (VmHWM)"
        except OSError:  # no /proc: how far the process's lifetime peak rises from here
            self.exact = False
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.source = "rise of ru_maxrss (the process's lifetime peak)"
        return self

    def stop(self) -> None:
        _ACTIVE.discard(self)

    def now(self) -> int:
        """Bytes in use above the level at start, now."""
        return in_use(self.device) - self.base

    def peak(self) -> int:
        """Peak bytes above the level at start so far."""
        return max(max(self.carried, _peak_level(self.device, self.exact)) - self.base, 0)


# ----------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Layer:
    """A differentiated tensor as the planner sees it."""

    name: str
    numel: int
    element_size: int

    @property
    def sum_size(self) -> int:
        """Bytes per element of its running sum (float32, float64 for float64 tensors)."""
        return 8 if self.element_size == 8 else 4

    @property
    def state_bytes(self) -> int:
        """Finished forget gradient + running retain sum (the most a pass holds for it)."""
        return self.numel * (self.element_size + self.sum_size)

    @property
    def bytes(self) -> int:
        return self.numel * self.element_size


@dataclass
class MemoryPlan:
    """What the gradient pass will hold, by part, and in which store.

    groups: the layers differentiated in each pass (one group for full and offload),
    deepest first. predicted: bytes above the loaded model on the model's device, by part.
    keep_bytes: what the chunked store may spend on forget gradients of front layers
    (None: no limit).
    """

    mode: str
    groups: list[list[str]]
    budget: int | None
    predicted: dict[str, int]
    keep_bytes: int | None = None  # None: no limit
    host_bytes: int = 0
    device: str = "cpu"
    stream_bytes: int = STREAM_BYTES

    @property
    def predicted_peak(self) -> int:
        return sum(self.predicted.values())

    @property
    def passes(self) -> int:
        return len(self.groups)

    def describe(self) -> str:
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.predicted.items())
        where = f" (host memory: {format_bytes(self.host_bytes)})" if self.mode == "offload" else ""
        within = f" within a budget of {format_bytes(self.budget)}" if self.budget is not None else ""
        return (f"gradient store {self.mode}: {self.passes} pass(es) over {sum(map(len, self.groups))} tensors, "
                f"predicted peak {format_bytes(self.predicted_peak)} above the loaded model on {self.device}"
                f"{within} ({parts}){where}")


@dataclass
class MemoryReport:
    """How the gradient pass used memory: the plan and what was measured.

    Bytes are above what was in use when unlearn started (the loaded model and data).
    measured_peak_bytes covers the whole unlearn call; measured_by says how it was read.
    """

    mode: str
    passes: int
    budget_bytes: int | None
    predicted_peak_bytes: int | None
    measured_peak_bytes: int | None
    measured_by: str
    weight_bytes: int
    activation_bytes: int | None = None
    checkpointing: bool = False
    final_pass: bool = False
    groups: list[int] = field(default_factory=list)  # tensors per pass
    predicted: dict[str, int] = field(default_factory=dict)
    predicted_full_bytes: int | None = None  # what the full store would have needed
    # the most gradient bytes the store held at once, counted tensor by tensor (the full and
    # the distributed stores; None for the others)
    gradient_peak_bytes: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def transient_bytes(layers: Sequence[Layer], largest_activation: int, forward_transient: int = 0) -> int:
    """Short-lived extras of a pass: one layer's gradient as autograd hands it over and its
    float32 copy while it is finished, and in backward either the activation gradients in
    flight or, where larger, a block's short-lived tensors (measured in the probe's forward;
    a checkpointed block makes them again when backward recomputes it)."""
    largest = max((l.numel for l in layers), default=0)
    element = max((l.element_size for l in layers), default=4)
    return largest * (element + 4) + max(2 * largest_activation, forward_transient)


def balanced_groups(units: Sequence[Sequence[Layer]], count: int) -> list[list[Layer]]:
    """`units` (in order) cut into `count` consecutive groups (fewer only if there are fewer
    units) with the smallest largest group by state bytes: binary search on the capacity,
    greedy cuts, then the biggest splittable groups halved until there are `count`."""
    sizes = [sum(l.state_bytes for l in u) for u in units]
    if not units:
        return []
    lo, hi = max(sizes), sum(sizes)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(_cut(sizes, mid)) <= count:
            hi = mid
        else:
            lo = mid + 1
    spans = _cut(sizes, lo)
    while len(spans) < min(count, len(units)):
        a, b = max((s for s in spans if s[1] - s[0] > 1), key=lambda s: sum(sizes[s[0]:s[1]]))
        half, total, mid = sum(sizes[a:b]) / 2, 0, a + 1
        for i in range(a, b - 1):
            total += sizes[i]
            mid = i + 1
            if total >= half:
                break
        i = spans.index((a, b))
        spans[i:i + 1] = [(a, mid), (mid, b)]
    return [[l for u in units[a:b] for l in u] for a, b in spans]


def _cut(sizes: Sequence[int], capacity: int) -> list[tuple[int, int]]:
    """Greedy consecutive cuts with each group's total <= capacity (the fewest groups there are)."""
    out, start, total = [], 0, 0
    for i, s in enumerate(sizes):
        if total and total + s > capacity:
            out.append((start, i))
            start, total = i, 0
        total += s
    out.append((start, len(sizes)))
    return out


def plan(units: Sequence[Sequence[Layer]], *, budget: int | None, activations: int, largest_activation: int,
         device: torch.device, mode: str = "auto", passes: int | None = None,
         forward_transient: int = 0) -> MemoryPlan:
    """Choose the store and its passes for `units` (groups of layers that move together,
    deepest first) so that the predicted peak fits `budget` (bytes, or None for no limit).

    auto: full if it fits, else chunked with the fewest passes that fit (on a GPU only up to
    MAX_PREFERRED_PASSES before offload is preferred), else offload (CUDA), else an error
    that states the smallest plan's need.
    """
    if mode not in MODES:
        raise SlugError(f"gradient store must be one of {MODES}, got {mode!r}")
    layers = [l for u in units for l in u]
    if not layers:
        raise SlugError("nothing to differentiate: no layer was chosen")
    transient = transient_bytes(layers, largest_activation, forward_transient)
    state = sum(l.state_bytes for l in layers)
    cuda = device.type == "cuda"
    base = {"activations": activations, "transient": transient}
    if not cuda:
        base["allocator"] = CPU_ALLOCATOR_SLACK
    fixed = sum(base.values())  # what every plan holds besides gradients
    dev = str(device)

    def full() -> MemoryPlan:
        return MemoryPlan("full", [[l.name for l in layers]], budget, {"gradients": state, **base}, device=dev)

    def offload() -> MemoryPlan:
        stream = min(STREAM_BYTES, 2 * sum(l.bytes for l in layers))
        if budget is not None:  # stream in smaller groups when the budget is tight (one layer at least)
            stream = min(stream, budget - fixed)
        stream = max(stream, 2 * max(l.bytes for l in layers))
        return MemoryPlan("offload", [[l.name for l in layers]], budget, {"stream": stream, **base},
                          host_bytes=state + sum(l.bytes for l in layers), device=dev, stream_bytes=stream)

    def chunked(count: int | None) -> MemoryPlan | None:
        largest_unit = max(sum(l.state_bytes for l in u) for u in units)
        keep_min = max(sum(l.bytes for l in u) for u in units)
        if count is None:  # the fewest passes that fit beside room to keep one front layer
            capacity = budget - fixed - keep_min
            if capacity < largest_unit:
                return None
            count = len(_cut([sum(l.state_bytes for l in u) for u in units], capacity))
        groups = balanced_groups(units, count)
        peak_state = max(sum(l.state_bytes for l in g) for g in groups)
        if budget is not None:
            keep = allowance = max(keep_min, budget - fixed - peak_state)
        else:  # no limit: keep every front layer; predict a typical front's share
            keep, allowance = max(keep_min, int(KEEP_SHARE * state)), None
        return MemoryPlan("chunked", [[l.name for l in g] for g in groups], budget,
                          {"gradients": peak_state, "kept": keep, **base}, keep_bytes=allowance, device=dev)

    if mode != "auto":
        if mode == "full":
            chosen = full()
        elif mode == "offload":
            if not cuda:
                raise SlugError(f"the offload store keeps gradients in host memory for a model on a GPU; this "
                                f"model is on {dev}: use 'chunked' to fit a budget there")
            chosen = offload()
        else:
            if passes is None and budget is None:
                raise SlugError("the chunked store needs memory_budget= or a number of passes to size its groups")
            if passes is not None and passes < 1:
                raise SlugError(f"passes must be at least 1, got {passes}")
            chosen = chunked(passes)
            if chosen is None:
                raise _too_small(budget, units, activations, fixed, cuda)
        if budget is not None and chosen.predicted_peak > budget:
            what = f"the chunked store in {chosen.passes} passes" if mode == "chunked" else f"the {mode} store"
            raise SlugError(f"{what} needs {format_bytes(chosen.predicted_peak)} above the loaded model, over "
                            f"memory_budget {format_bytes(budget)}: leave store='auto' (and passes unset) to "
                            "let the planner fit the budget, or raise it")
        return chosen
    if budget is None or full().predicted_peak <= budget:
        return full()
    chosen = chunked(None)
    if chosen is not None and (not cuda or chosen.passes <= MAX_PREFERRED_PASSES):
        return chosen
    if cuda and offload().predicted_peak <= budget:
        return offload()
    if chosen is not None:
        return chosen
    raise _too_small(budget, units, activations, fixed, cuda)


def minimum_need(units, fixed: int, cuda: bool) -> int:
    """The smallest predicted peak of any plan (one unit per pass, or offload on a GPU), with
    `fixed` the bytes every plan holds besides gradients (activations, transients)."""
    one_unit = max(sum(l.state_bytes + l.bytes for l in u) for u in units)
    need = fixed + one_unit
    if cuda:
        need = min(need, fixed + 2 * max(l.bytes for u in units for l in u))
    return need


def _too_small(budget, units, activations, fixed, cuda) -> SlugError:
    need = minimum_need(units, fixed, cuda)
    smallest = "offload" if cuda else "chunked with one layer per pass"
    return SlugError(f"memory_budget {format_bytes(budget)} is too small: the smallest plan ({smallest}) needs "
                     f"{format_bytes(need)} above the loaded model (activations of one batch "
                     f"{format_bytes(activations)}); raise memory_budget to at least {need} bytes, or lower that "
                     "need with smaller batches or checkpointing=True")
