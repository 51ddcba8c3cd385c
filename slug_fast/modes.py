"""Temporarily set a module's train/eval mode and which parameters require grad, restoring both."""
from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator

import torch


@contextlib.contextmanager
def training_state(module: torch.nn.Module, *, train: bool | None = None,
                   requires_grad: bool | Collection[str] | None = None,
                   clear_grads: bool = False) -> Iterator[dict[str, torch.nn.Parameter] | None]:
    """Inside: `module.train(train)` (None: modes left as they are); with `requires_grad`, the
    named parameters in it (or all, given True; none, given False) require grad and the rest
    do not; with `clear_grads`, every `.grad` is None. On exit every submodule's own mode,
    every parameter's requires_grad flag and every `.grad` are back as they were, also after
    an error. Yields the module's named parameters (None when neither `requires_grad` nor
    `clear_grads` is given: it runs once per evaluation, so it walks the parameters only when
    it must).
    """
    if isinstance(requires_grad, str):
        raise TypeError(f"requires_grad takes a collection of parameter names, not the string {requires_grad!r}")
    named = dict(module.named_parameters()) if requires_grad is not None or clear_grads else None
    # a module already in the wanted mode everywhere is left alone (train() is not called)
    modes = [(m, m.training) for m in module.modules()] if train is not None else []
    switch = any(mode != train for _, mode in modes)
    flags = {n: p.requires_grad for n, p in named.items()} if requires_grad is not None else {}
    grads = {n: p.grad for n, p in named.items()} if clear_grads else {}
    try:
        if switch:
            module.train(train)
        if requires_grad is not None:
            for n, p in named.items():
                p.requires_grad_(requires_grad if isinstance(requires_grad, bool) else n in requires_grad)
        for p in named.values() if clear_grads else ():
            p.grad = None
        yield named
    finally:
        for n, flag in flags.items():
            named[n].requires_grad_(flag)
        for n, grad in grads.items():
            named[n].grad = grad
        for m, mode in modes if switch else ():
            m.training = mode
