"""The adapter interface: what the engine needs to know about one kind of model."""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..errors import SlugError
from ..pareto import DEFAULT_EXCLUDE, NameRule, is_eligible, matches
from ..parameters import named_parameters_of


# edit_params key prefix of a mirror in a companion CLIP model; ":" never occurs in a parameter
# name, so such keys never collide with the user-object names that deltas record.
MIRROR_PREFIX = "clip_model:"


class Adapter:
    """How SLUG reaches into one kind of model; subclasses override what differs.

    The engine differentiates `target` (an nn.Module) with `forget_loss` and
    `retain_loss` over the `param_names()` that are `eligible`, ranks layers per tower
    (`tower_rules`), moves each chosen layer with its `group_of`, and edits through
    `edit_params`, which may add mirrors: tensors of the user's object that must
    move with a target tensor (a pipeline's text encoder, say). The criterion and
    deltas see the user's object, `model`.
    """

    name = "generic"
    towers: Mapping[str, NameRule] | None = None  # None: one tower, "model"
    exclude: Sequence[str] = DEFAULT_EXCLUDE  # name substrings that are never candidates
    groups_by_default = True  # group=None moves layers with their `group_of` partners

    def __init__(self, model):
        self.model = model

    @property
    def target(self) -> nn.Module:
        """The module SLUG differentiates and edits."""
        return self.model

    def rebind(self, model) -> "Adapter":
        """The same adapter (tokenizer, preprocessing, options) around another model of the same kind."""
        other = copy.copy(self)
        other.model = model
        return other

    def param_names(self) -> list[str] | None:
        """Target parameters to differentiate; None = all that require grad."""
        return None

    def tower_rules(self, names: Sequence[str]) -> Mapping[str, NameRule]:
        """Tower -> name rule, for the target's eligible parameter names `names`."""
        return self.towers or {"model": lambda n: True}

    def group_of(self, name: str, names: Sequence[str]) -> list[str]:
        """The layers among `names` that move together with `name`, itself included."""
        return [name]

    def eligible(self, name: str, shape: Sequence[int]) -> bool:
        """Whether target parameter `name` of this shape can be chosen (>= 2 dims, no `exclude` word)."""
        return is_eligible(name, shape, self.exclude)

    def forget_loss(self, module: nn.Module, batch) -> torch.Tensor:
        raise SlugError(f"the {self.name} adapter has no forget loss: pass forget_loss=")

    def retain_loss(self, module: nn.Module, batch) -> torch.Tensor:
        raise SlugError(f"the {self.name} adapter has no retain loss: pass retain_loss=")

    def delta_name(self, name: str) -> str:
        """Name in the user's object of target parameter `name` (what deltas record)."""
        return name

    def edit_params(self, names: Sequence[str]) -> dict[str, tuple[nn.Parameter, str]]:
        """key -> (tensor to edit, the target parameter whose direction it takes), mirrors included.

        Keys of user-object tensors are their `delta_name`s; other mirrors are keyed
        MIRROR_PREFIX + name.
        """
        target = dict(self.target.named_parameters())
        return {self.delta_name(n): (target[n], n) for n in names}

    def user_parameters(self) -> dict[str, nn.Parameter]:
        """The user's object's parameters by name (where deltas apply)."""
        return named_parameters_of(self.model)

    def activation_checkpointing(self):
        """A context manager in which `target` recomputes its activations in backward instead of
        keeping them (the family's own switch), restored on exit; used by unlearn(checkpointing=True)."""
        from .checkpointing import detect_checkpointing

        return detect_checkpointing(self.target)

    def tower_params(self, tower: str) -> list[nn.Parameter]:
        """Target parameters of a tower (for caches keyed on their versions)."""
        named = dict(self.target.named_parameters())
        rules = self.tower_rules(list(named))
        if tower not in rules:
            raise SlugError(f"the {self.name} adapter has no tower {tower!r}; towers: {list(rules)}")
        return [p for n, p in named.items() if matches(rules[tower], n)]
