"""The adapter interface: what the engine needs to know about one kind of model."""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..errors import SlugError
from ..pareto import NameRule, matches


# edit_params key prefix of a mirror in a companion CLIP model; ":" never occurs in a parameter
# name, so such keys never collide with the user-object names that deltas record.
MIRROR_PREFIX = "clip_model:"


def named_parameters_of(obj) -> dict[str, nn.Parameter]:
    """Parameters of a module, of a diffusers pipeline ("component.name") or of an adapter's model."""
    if isinstance(obj, Adapter):
        return obj.user_parameters()
    if isinstance(obj, nn.Module):
        return dict(obj.named_parameters())
    components = getattr(obj, "components", None)
    if isinstance(components, Mapping):
        return {f"{c}.{n}": p for c, m in components.items() if isinstance(m, nn.Module)
                for n, p in m.named_parameters()}
    raise SlugError(f"{type(obj).__name__} has no parameters slug_fast can reach: pass an nn.Module, "
                    "a diffusers pipeline or a slug_fast adapter")


class Adapter:
    """How SLUG reaches into one kind of model; subclasses override what differs.

    The engine differentiates `target` (an nn.Module) with `forget_loss` and
    `retain_loss` over `param_names()`, ranks layers per tower, and edits through
    `edit_params`, which may add mirrors: tensors of the user's object that must
    move with a target tensor (a pipeline's text encoder, say). The criterion and
    deltas see the user's object, `model`.
    """

    name = "generic"
    towers: Mapping[str, NameRule] | None = None  # None: slug_fast.pareto.default_towers
    group = False  # move HF q/k/v_proj and fc1/fc2 together

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
        rules = self.towers or {}
        if tower not in rules:
            raise SlugError(f"the {self.name} adapter has no tower {tower!r}; towers: {list(rules)}")
        return [p for n, p in self.target.named_parameters() if matches(rules[tower], n)]


class GenericAdapter(Adapter):
    """Any nn.Module with user losses and, optionally, tower name rules."""

    name = "generic"

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

    def forget_loss(self, module, batch):
        if self._forget is None:
            return super().forget_loss(module, batch)
        return self._forget(module, batch)

    def retain_loss(self, module, batch):
        if self._retain is None:
            return super().retain_loss(module, batch)
        return self._retain(module, batch)


def _mro_names(obj) -> set[str]:
    return {f"{c.__module__.split('.')[0]}.{c.__name__}" for c in type(obj).__mro__}


# (top-level package.ClassName in the model's MRO) -> adapter name
_KNOWN_TYPES = (("open_clip.CLIP", "open_clip"), ("open_clip.CustomTextCLIP", "open_clip"),
                ("transformers.CLIPModel", "hf_clip"),
                ("transformers.LlavaForConditionalGeneration", "llava"),
                ("diffusers.DiffusionPipeline", "stable_diffusion"))


def detect_adapter(model) -> str | None:
    """The adapter name for `model`'s type, or None when no adapter knows it."""
    kinds = _mro_names(model)
    return next((name for cls_name, name in _KNOWN_TYPES if cls_name in kinds), None)


def get_adapter(model, adapter: str | Adapter | None = None, **options) -> Adapter:
    """The adapter for `model`: given, named ("open_clip", "hf_clip", "stable_diffusion",
    "llava", "generic"), or picked from the model's type. `options` go to its constructor."""
    from . import ADAPTERS

    if isinstance(model, Adapter):
        return model
    if isinstance(adapter, Adapter):
        return adapter
    name = adapter if adapter is not None else detect_adapter(model)
    if name is None:
        raise SlugError(f"unknown model type {type(model).__module__}.{type(model).__name__}; pass adapter= "
                        f"(one of {sorted(ADAPTERS)}), or forget_loss= and retain_loss= for any nn.Module")
    if name not in ADAPTERS:
        raise SlugError(f"unknown adapter {name!r}; choose one of {sorted(ADAPTERS)}")
    return ADAPTERS[name]()(model, **options)
