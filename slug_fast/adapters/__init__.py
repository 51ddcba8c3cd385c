"""Adapters: one module per model family, each telling the engine towers, losses and evaluation.

A user passes the plain model object; `get_adapter` picks the adapter from its type.
Adapter modules import their libraries lazily, so importing slug_fast stays light.
"""
from .base import Adapter, GenericAdapter, detect_adapter, get_adapter, named_parameters_of


def _open_clip():
    from .open_clip import OpenClipAdapter
    return OpenClipAdapter


def _hf_clip():
    from .hf_clip import HFClipAdapter
    return HFClipAdapter


def _stable_diffusion():
    from .stable_diffusion import StableDiffusionAdapter
    return StableDiffusionAdapter


def _llava():
    from .llava import LlavaAdapter
    return LlavaAdapter


# name -> a function returning the adapter class (imported on first use)
ADAPTERS = {
    "generic": lambda: GenericAdapter,
    "open_clip": _open_clip,
    "hf_clip": _hf_clip,
    "stable_diffusion": _stable_diffusion,
    "llava": _llava,
}

__all__ = ["ADAPTERS", "Adapter", "GenericAdapter", "detect_adapter", "get_adapter", "named_parameters_of"]
