"""The parameters of whatever object a user passes: a module, a diffusers pipeline or an adapter."""
from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from .errors import SlugError


def named_parameters_of(obj) -> dict[str, nn.Parameter]:
    """Parameters of a module, of a diffusers pipeline ("component.name") or of an adapter's model
    (anything with `user_parameters()`)."""
    user_parameters = getattr(obj, "user_parameters", None)
    if callable(user_parameters):
        return user_parameters()
    if isinstance(obj, nn.Module):
        return dict(obj.named_parameters())
    components = getattr(obj, "components", None)
    if isinstance(components, Mapping):
        return {f"{c}.{n}": p for c, m in components.items() if isinstance(m, nn.Module)
                for n, p in m.named_parameters()}
    raise SlugError(f"{type(obj).__name__} has no parameters slug_fast can reach: pass an nn.Module, "
                    "a diffusers pipeline or a slug_fast adapter")
