"""Any nn.Module, with the user's losses and, optionally, tower rules."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from ..errors import SlugError
from ..pareto import NameRule
from .base import Adapter
from .hf_clip import HFClipAdapter
from .open_clip import OpenClipAdapter


def towers_from_names(names: Sequence[str]) -> Mapping[str, NameRule] | None:
    """open_clip's towers (visual.* / the rest) or Hugging Face CLIP's (vision_model.* /
    text_model.*) when the parameter names are theirs, else None."""
    if any(n.startswith("visual.") for n in names):
        return OpenClipAdapter.towers
    if any(n.startswith("vision_model.") for n in names) and any(n.startswith("text_model.") for n in names):
        return HFClipAdapter.towers
    return None


class GenericAdapter(Adapter):
    """Any nn.Module with user losses and, optionally, tower name rules (else the CLIP towers its
    names show, see `towers_from_names`, else one tower "model"); single tensors move alone
    unless group=True asks for Hugging Face q/k/v_proj and fc1/fc2 groups."""

    name = "generic"
    group_of = HFClipAdapter.group_of  # Hugging Face names' q/k/v_proj and fc1/fc2, with group=True
    groups_by_default = False

    def __init__(self, model: nn.Module, forget_loss=None, retain_loss=None,
                 towers: Mapping[str, NameRule] | None = None, params: Sequence[str] | None = None):
        if not isinstance(model, nn.Module):
            raise SlugError(f"the generic adapter takes an nn.Module, got {type(model).__name__}")
        super().__init__(model)
        self._forget, self._retain = forget_loss, retain_loss
        self.towers = towers
        self._params = list(params) if params is not None else None

    def param_names(self):
        return self._params

    def tower_rules(self, names):
        return self.towers or towers_from_names(names) or super().tower_rules(names)

    def forget_loss(self, module, batch):
        if self._forget is None:
            return super().forget_loss(module, batch)
        return self._forget(module, batch)

    def retain_loss(self, module, batch):
        if self._retain is None:
            return super().retain_loss(module, batch)
        return self._retain(module, batch)
