"""Adapters: one module per model family, each telling the engine towers, groups, losses and inputs.

FAMILIES is the registry: one line per family, with its adapter class, the model types it
takes (how `get_adapter` picks it for a plain model object) and, for the command line, its
loader. A user passes the plain model object; `get_adapter` picks the adapter from its type.
Adapter modules import their libraries lazily, so importing slug_fast stays light.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import SlugError
from .base import Adapter
from .generic import GenericAdapter


def _resolve(ref: str | Callable):
    """The object a "module:attribute" reference names (a module path starting with "." is
    inside slug_fast.adapters), imported on first use; anything else as it is."""
    if not isinstance(ref, str):
        return ref
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module, __name__), attribute)


@dataclass(frozen=True)
class Family:
    """One model family.

    adapter: the Adapter subclass, or "module:Class" (".module" = slug_fast.adapters.module).
    types: "package.ClassName" of the model classes it takes (matched against the model's
    type and its bases, package = the top-level module), so detection imports no library.
    load: "module:function" or the function `load(model, pretrained, device)` that the command
    line calls with a model name: an adapter, or None when the name is not this family's.
    """

    name: str
    adapter: str | type[Adapter]
    types: tuple[str, ...] = ()
    load: str | Callable | None = None

    def adapter_class(self) -> type[Adapter]:
        return _resolve(self.adapter)

    def loader(self) -> Callable | None:
        return None if self.load is None else _resolve(self.load)


# The registry. Detection takes the first family whose types the model has; the command line
# tries the loaders in this order (hf_clip's takes any name, so it stays the last loader).
FAMILIES: list[Family] = [
    Family("generic", GenericAdapter),
    Family("open_clip", ".open_clip:OpenClipAdapter", ("open_clip.CLIP", "open_clip.CustomTextCLIP"), ".open_clip:load"),
    Family("hf_clip", ".hf_clip:HFClipAdapter", ("transformers.CLIPModel",), ".hf_clip:load"),
    Family("stable_diffusion", ".stable_diffusion:StableDiffusionAdapter", ("diffusers.DiffusionPipeline",)),
    Family("llava", ".llava:LlavaAdapter", ("transformers.LlavaForConditionalGeneration",)),
]


def _type_names(obj) -> set[str]:
    return {f"{c.__module__.split('.')[0]}.{c.__name__}" for c in type(obj).__mro__}


def detect_adapter(model) -> str | None:
    """The name of the family whose types `model` has, or None when no family takes it."""
    kinds = _type_names(model)
    return next((f.name for f in FAMILIES if kinds.intersection(f.types)), None)


def family(name: str) -> Family:
    """The registered family called `name`."""
    found = next((f for f in FAMILIES if f.name == name), None)
    if found is None:
        raise SlugError(f"unknown adapter {name!r}; choose one of {sorted(f.name for f in FAMILIES)}")
    return found


def get_adapter(model, adapter: str | Adapter | None = None, **options) -> Adapter:
    """The adapter for `model`: given, named (a family in FAMILIES: "open_clip", "hf_clip",
    "stable_diffusion", "llava", "generic", ...), or picked from the model's type. `options` go
    to its constructor."""
    if isinstance(model, Adapter):
        return model
    if isinstance(adapter, Adapter):
        return adapter
    name = adapter if adapter is not None else detect_adapter(model)
    if name is None:
        raise SlugError(f"unknown model type {type(model).__module__}.{type(model).__name__}; pass adapter= "
                        f"(one of {sorted(f.name for f in FAMILIES)}), or forget_loss= and retain_loss= for "
                        "any nn.Module")
    return family(name).adapter_class()(model, **options)


__all__ = ["FAMILIES", "Adapter", "Family", "GenericAdapter", "detect_adapter", "family", "get_adapter"]
