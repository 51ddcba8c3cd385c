"""Activation checkpointing through each model family's own switch, restored on exit.

A checkpointed block keeps only its input during the forward and recomputes its
activations in backward: the gradient pass then holds about one block's activations
instead of all of them, for one more forward of each block. Recomputation runs the same
operations on the same inputs, so the gradients are unchanged.
"""
from __future__ import annotations

import contextlib

from torch import nn

from ..errors import SlugError

_MISSING = object()


@contextlib.contextmanager
def open_clip_checkpointing(model: nn.Module):
    """open_clip's `set_grad_checkpointing(True)` (non-reentrant torch.utils.checkpoint per block)."""
    setter = getattr(model, "set_grad_checkpointing", None)
    if not callable(setter):
        raise SlugError(f"checkpointing=True: {type(model).__name__} has no set_grad_checkpointing (open_clip's switch)")
    saved = {m: m.__dict__.get("grad_checkpointing", _MISSING) for m in model.modules()}
    setter(True)
    try:
        yield
    finally:
        for m, value in saved.items():
            if value is _MISSING:
                m.__dict__.pop("grad_checkpointing", None)
            else:
                m.grad_checkpointing = value


_HF_ATTRS = ("gradient_checkpointing", "_gradient_checkpointing_func")


@contextlib.contextmanager
def hf_checkpointing(model: nn.Module):
    """transformers' activation checkpointing (non-reentrant), for a PreTrainedModel.

    transformers checkpoints a layer only while the layer is in training mode; the gradient
    pass runs in eval mode, so the checkpointed layers themselves are flagged as training
    while their submodules (dropout, attention) stay in eval and compute as before.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    legacy = getattr(model, "gradient_checkpointing_enable", None)
    if not callable(enable) and not callable(legacy):
        raise SlugError(f"checkpointing=True: {type(model).__name__} is not a transformers model with "
                        "activation_checkpointing_enable")
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise SlugError(f"checkpointing=True: {type(model).__name__} does not support activation checkpointing "
                        "in transformers")
    saved = {m: (m.training, {a: m.__dict__.get(a, _MISSING) for a in _HF_ATTRS}) for m in model.modules()}
    from transformers.modeling_layers import GradientCheckpointingLayer

    try:
        if callable(enable):
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            legacy(gradient_checkpointing_kwargs={"use_reentrant": False})
        for m in model.modules():
            if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing:
                m.training = True
        yield
    finally:
        for m, (training, attrs) in saved.items():
            m.training = training
            for a, value in attrs.items():
                if value is _MISSING:
                    m.__dict__.pop(a, None)
                else:
                    setattr(m, a, value)


def detect_checkpointing(model: nn.Module):
    """The checkpointing switch of a model of a known family (open_clip or transformers)."""
    if callable(getattr(model, "set_grad_checkpointing", None)):
        return open_clip_checkpointing(model)
    if callable(getattr(model, "activation_checkpointing_enable", None)) or \
            callable(getattr(model, "gradient_checkpointing_enable", None)):
        return hf_checkpointing(model)
    raise SlugError(f"checkpointing=True: {type(model).__name__} has no activation-checkpointing switch slug_fast "
                    "knows (open_clip's set_grad_checkpointing, transformers' activation_checkpointing_enable); "
                    "wrap its blocks in torch.utils.checkpoint yourself, or leave checkpointing off")
