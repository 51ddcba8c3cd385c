"""Fused per-layer statistics: each layer's theta, g_f and g_r are read once.

Two fixed-order stages, no atomics, so equal inputs give bit-identical sums:
stage 1 writes one float64 partial per block of BLOCK * ITERS elements (summed in
float32 lanes, float64 for float64 inputs); stage 2 sums each layer's partials.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
ITERS = 8


@triton.jit
def _partials_kernel(theta_ptr, gf_ptr, gr_ptr, out_ptr, n,
                     HAS_RETAIN: tl.constexpr, ACC: tl.constexpr,
                     BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    tt = tl.zeros([BLOCK], dtype=ACC)
    ff = tl.zeros([BLOCK], dtype=ACC)
    rr = tl.zeros([BLOCK], dtype=ACC)
    fr = tl.zeros([BLOCK], dtype=ACC)
    for it in tl.static_range(ITERS):
        offs = (pid * ITERS + it) * BLOCK + lanes
        mask = offs < n
        t = tl.load(theta_ptr + offs, mask=mask, other=0.0).to(ACC)
        f = tl.load(gf_ptr + offs, mask=mask, other=0.0).to(ACC)
        tt += t * t
        ff += f * f
        if HAS_RETAIN:
            r = tl.load(gr_ptr + offs, mask=mask, other=0.0).to(ACC)
            rr += r * r
            fr += f * r
    out = out_ptr + pid * 4
    tl.store(out + 0, tl.sum(tt, axis=0).to(tl.float64))
    tl.store(out + 1, tl.sum(ff, axis=0).to(tl.float64))
    tl.store(out + 2, tl.sum(rr, axis=0).to(tl.float64))
    tl.store(out + 3, tl.sum(fr, axis=0).to(tl.float64))


@triton.jit
def _combine_kernel(partials_ptr, starts_ptr, counts_ptr, out_ptr, BLOCK: tl.constexpr):
    layer = tl.program_id(0)
    start = tl.load(starts_ptr + layer)
    count = tl.load(counts_ptr + layer)
    rows = tl.arange(0, BLOCK)
    cols = tl.arange(0, 4)
    acc = tl.zeros([BLOCK, 4], dtype=tl.float64)
    for first in range(0, count, BLOCK):
        idx = first + rows
        ptrs = partials_ptr + (start + idx)[:, None] * 4 + cols[None, :]
        acc += tl.load(ptrs, mask=(idx < count)[:, None], other=0.0)
    tl.store(out_ptr + layer * 4 + cols, tl.sum(acc, axis=0))


def layer_sums(params: list[torch.Tensor], forget: list[torch.Tensor],
               retain: list[torch.Tensor] | None = None) -> torch.Tensor:
    """(n, 4) float64: [sum theta^2, sum g_f^2, sum g_r^2, sum g_f*g_r] per layer.

    Inputs are contiguous, and each layer's three tensors share shape and dtype
    (slug_fast.layer_stats checks this before calling).
    """
    n_layers = len(params)
    device = params[0].device if params else torch.device("cpu")
    per_block = BLOCK * ITERS
    counts = [triton.cdiv(p.numel(), per_block) for p in params]
    starts = [0] * n_layers
    for i in range(1, n_layers):
        starts[i] = starts[i - 1] + counts[i - 1]
    partials = torch.zeros((max(sum(counts), 1), 4), dtype=torch.float64, device=device)
    for i, (p, f) in enumerate(zip(params, forget)):
        if counts[i] == 0:
            continue
        r = retain[i] if retain is not None else f
        acc = tl.float64 if p.dtype == torch.float64 else tl.float32
        _partials_kernel[(counts[i],)](p, f, r, partials[starts[i]:], p.numel(),
                                       HAS_RETAIN=retain is not None, ACC=acc,
                                       BLOCK=BLOCK, ITERS=ITERS)
    out = torch.zeros((n_layers, 4), dtype=torch.float64, device=device)
    if n_layers:
        starts_t = torch.tensor(starts, dtype=torch.int64, device=device)
        counts_t = torch.tensor(counts, dtype=torch.int64, device=device)
        _combine_kernel[(n_layers,)](partials, starts_t, counts_t, out, BLOCK=256)
    return out
