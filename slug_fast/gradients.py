"""The gradient pass: g_f and g_r, each the mean of its per-batch gradients at theta0."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from .errors import NonFiniteError, SlugError, unknown_name

Loss = Callable[[torch.nn.Module, object], torch.Tensor]


class Gradients:
    """Forget and retain gradients of a set of parameters, and the depth order seen in backward.

    Callers read gradients only through `forget`, `retain` and `names`, so a later
    low-memory store (streamed, offloaded, sketched) can replace these two full copies.
    """

    def __init__(self, forget: dict[str, torch.Tensor], retain: dict[str, torch.Tensor] | None,
                 depth_order: list[str], n_forget_batches: int, n_retain_batches: int):
        self.forget = forget
        self.retain = retain
        self.depth_order = depth_order
        self.n_forget_batches = n_forget_batches
        self.n_retain_batches = n_retain_batches

    @property
    def names(self) -> list[str]:
        return list(self.forget)

    def nbytes(self) -> int:
        stores = [self.forget] + ([self.retain] if self.retain is not None else [])
        return sum(t.numel() * t.element_size() for s in stores for t in s.values())


def resolve_params(model: torch.nn.Module, params: Sequence[str] | None) -> list[str]:
    """The parameter names to differentiate: `params`, or all that require grad, in model order."""
    named = dict(model.named_parameters())
    if params is None:
        chosen = [n for n, p in named.items() if p.requires_grad]
        if not chosen:
            raise SlugError("no parameter of the model requires grad; pass params=[names] to choose some")
        return chosen
    if isinstance(params, str):
        params = [params]
    for name in params:
        if name not in named:
            raise unknown_name("parameter", name, named)
    wanted = set(params)
    return [n for n in named if n in wanted]


def compute_gradients(model: torch.nn.Module, forget_batches: Iterable, retain_batches: Iterable | None,
                      forget_loss: Loss, retain_loss: Loss | None = None, *,
                      params: Sequence[str] | None = None, train_mode: bool = False,
                      progress: bool | None = None) -> Gradients:
    """Mean per-batch gradients of `forget_loss` over `forget_batches` (and of `retain_loss`
    over `retain_batches`) with respect to `params` (default: all that require grad).

    A loss is `loss(model, batch) -> scalar tensor`; `retain_loss` defaults to
    `forget_loss`. The model runs in eval mode unless `train_mode`; its modes,
    requires_grad flags and existing .grad are restored afterwards. Low-precision
    parameters accumulate in float32 and the result is cast back to their dtype.
    """
    names = resolve_params(model, params)
    named = dict(model.named_parameters())
    selected = set(names)
    modes = {m: m.training for m in model.modules()}
    flags = {n: p.requires_grad for n, p in named.items()}
    old_grads = {n: p.grad for n, p in named.items()}
    try:
        model.train(train_mode)
        for n, p in named.items():
            p.requires_grad_(n in selected)
            p.grad = None
        depth_order: list[str] = []
        forget, n_f = _mean_gradient(model, forget_batches, forget_loss, names, named, "forget",
                                     progress, depth_order)
        retain, n_r = None, 0
        if retain_batches is not None:
            retain, n_r = _mean_gradient(model, retain_batches, retain_loss or forget_loss, names,
                                         named, "retain", progress, None)
    finally:
        for n, p in named.items():
            p.requires_grad_(flags[n])
            p.grad = old_grads[n]
        for m, mode in modes.items():
            m.training = mode
    # backward visits layers from the output back; never-reached ones count as shallowest
    reached = set(depth_order)
    order = [n for n in names if n not in reached] + depth_order[::-1]
    return Gradients(forget, retain, order, n_f, n_r)


def _mean_gradient(model, batches, loss_fn, names, named, which, progress, depth_order):
    params = [named[n] for n in names]
    low_precision = [p.dtype in (torch.float16, torch.bfloat16) for p in params]
    acc: list[torch.Tensor | None] = [None] * len(params)
    hooks = []
    if depth_order is not None:  # record the order backward reaches the layers, on the first batch
        hooks = [named[n].register_post_accumulate_grad_hook(lambda _p, n=n: depth_order.append(n))
                 for n in names]
    count = 0
    try:
        total = len(batches) if hasattr(batches, "__len__") else None
        for batch in tqdm(batches, total=total, desc=f"{which} gradients",
                          disable=None if progress is None else not progress, leave=False):
            loss = loss_fn(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                got = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise SlugError(f"{which} loss must return a scalar tensor, got {got}")
            if not loss.requires_grad:
                raise SlugError(f"{which} loss does not depend on the chosen parameters "
                                "(it has no grad_fn); check params= and the loss function")
            if not bool(torch.isfinite(loss.detach())):
                raise NonFiniteError(f"{which} loss is {loss.item()} at batch {count}; "
                                     "the gradients would not be finite")
            loss.backward()
            for hook in hooks:
                hook.remove()
            hooks = []
            for i, p in enumerate(params):
                if low_precision[i] and p.grad is not None:
                    acc[i] = p.grad.float() if acc[i] is None else acc[i].add_(p.grad)
                    p.grad = None
            count += 1
    finally:
        for hook in hooks:
            hook.remove()
    if count == 0:
        raise SlugError(f"the {which} set is empty: pass at least one batch")
    grads: dict[str, torch.Tensor] = {}
    for i, (name, p) in enumerate(zip(names, params)):
        g = acc[i] if low_precision[i] else p.grad
        p.grad = None
        if g is None:  # the loss never reached this parameter
            grads[name] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            continue
        grads[name] = g.div_(count).to(p.dtype).detach()
    return grads, count
