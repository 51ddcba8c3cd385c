"""UpstreamReplay: the context manager that plans what to replay, installs it and restores the model."""
from __future__ import annotations

from torch import nn

from ..edit import LayerEdit
from ..errors import SlugError
from .cache import DEFAULT_MAX_BYTES, ByteBudget
from .linear import LinearProducts
from .stacks import StackReplay, find_stacks, find_stems


class UpstreamReplay:
    """Context manager: evaluations through `model` re-run only what `edit` can change.

    model: the nn.Module the criterion runs (an adapter's target); edit: an active
    LayerEdit whose tensors are the only ones that change while this is active.
    linear: also cache an edited nn.Linear's products (W0 x + b, G x): equal to a plain
    evaluation within float32 rounding; the default (False) keeps every output bit-identical.
    Whole stacks that hold no edited tensor (the other tower) and the modules outside stacks
    that hold none (patch and token embeddings, final norms) are replayed too.
    max_bytes: what all records together may hold (None: no limit); patience: passes without
    a hit after which a stack or Linear stops recording.
    """

    def __init__(self, model: nn.Module, edit: LayerEdit, *, linear: bool = False,
                 max_bytes: int | None = DEFAULT_MAX_BYTES, patience: int = 2):
        if not isinstance(model, nn.Module):
            raise SlugError(f"upstream_replay needs the nn.Module the criterion runs, got {type(model).__name__}")
        if not isinstance(edit, LayerEdit) or not edit.active:
            raise SlugError("upstream_replay needs an active LayerEdit: use it inside `with LayerEdit(...) as edit`")
        self.model, self.edit = model, edit
        self.linear = linear
        self.budget = ByteBudget(float("inf") if max_bytes is None else int(max_bytes))
        self.patience = max(1, int(patience))
        self.stacks: list[StackReplay] = []
        self.stems: list[StackReplay] = []  # modules outside stacks, replayed as one-block stacks
        self.linears: list[LinearProducts] = []
        self._edited = list(edit.tensors.values())
        self.edited_ids = {id(p) for p in self._edited}
        self._active = False

    def step(self) -> float:
        return self.edit.current_step

    def token(self) -> tuple:
        """Moves whenever an edited tensor is written: a new pass of every cache."""
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
            self.stacks.append(StackReplay(self, name, stack, boundary))
        self.stems = [StackReplay(self, name, [module], 1)
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
            self.linears.append(LinearProducts(self, mname, m, theta0[key], directions[key]))

    def _parent(self, name: str):
        return self.model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else self.model

    def stats(self) -> dict:
        """What was replayed and cached: per stack, per stem and per edited Linear."""
        stem_keys = ("hits", "misses", "bypassed", "off")
        return {
            "bytes": self.budget.used, "peak_bytes": self.budget.peak,
            "stacks": {s.name: s.stats() for s in self.stacks},
            "stems": {s.name: {k: v for k, v in s.stats().items() if k in stem_keys} for s in self.stems},
            "linears": {f.name: f.stats() for f in self.linears},
        }


def upstream_replay(model: nn.Module, edit: LayerEdit, **options) -> UpstreamReplay:
    """`with upstream_replay(model, edit): ...` - see UpstreamReplay and slug_fast.replay."""
    return UpstreamReplay(model, edit, **options)
