"""Forward hooks that forbid replaying a block, and transformers' hooks that do nothing.

transformers 5 installs `output_capturing_hook` on its layers for output_hidden_states and
output_attentions (transformers/utils/output_capturing.py). It stays installed but returns at once
unless a capture of its key is running. Telling that apart reads transformers' private state: the
context variable `_active_collector` and the hook's closure cell `key`. The probe runs only for the
transformers versions it was checked against (HF_CHECKED); under any other every hook counts as
active, which stays exact but replays nothing inside hooked transformers blocks.
"""
from __future__ import annotations

import functools
import importlib
import re
import sys
import types

from torch import nn

HF_CHECKED = ((5, 24), (6, 0))  # [from, below): transformers versions whose hook state the probe reads
HF_MODULE, HF_HOOK, HF_COLLECTOR, HF_KEY = \
    "transformers.utils.output_capturing", "output_capturing_hook", "_active_collector", "key"


@functools.lru_cache(maxsize=8)
def hf_probe_supported(version: str) -> bool:
    """Whether transformers `version` keeps the hook state the probe reads (checked range only)."""
    m = re.match(r"(\d+)\.(\d+)", version)
    return m is not None and HF_CHECKED[0] <= (int(m[1]), int(m[2])) < HF_CHECKED[1]


def inactive_hf_hook(hook) -> bool:
    """A transformers output-capturing hook that no running capture needs (it would do nothing)."""
    if not isinstance(hook, types.FunctionType) or hook.__name__ != HF_HOOK \
            or not str(hook.__module__).startswith("transformers."):
        return False
    try:
        if not hf_probe_supported(str(sys.modules["transformers"].__version__)):
            return False
        collected = getattr(importlib.import_module(HF_MODULE), HF_COLLECTOR).get()
        if collected is None:
            return True
        cells = dict(zip(hook.__code__.co_freevars, (c.cell_contents for c in hook.__closure__)))
        return cells[HF_KEY] not in collected
    except Exception:  # noqa: BLE001 - any doubt: treat the hook as active
        return False


def hooked(m: nn.Module) -> bool:
    """Whether a forward hook on `m` may read its output."""
    return any(not inactive_hf_hook(h) for hooks in (m._forward_hooks, m._forward_pre_hooks) for h in hooks.values())


def global_hooks() -> bool:
    from torch.nn.modules import module as _module

    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks)
