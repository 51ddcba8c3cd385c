"""Fused per-layer statistics over all layers: one launch per dtype, whatever the layer count.

Every layer's tensors are cut into tiles of TILE = BLOCK * ITERS elements. A table gives
each tile its layer and offset, and a table of base addresses gives each layer its theta,
g_f and g_r, so one grid covers every tile of every layer (layers of another dtype get
their own launch: a pointer's element type is fixed per compilation). Each program
writes one float64 partial [sum theta^2, sum g_f^2, sum g_r^2, sum g_f*g_r] for its tile;
a second kernel adds each layer's partials in a fixed order. Elements are widened to float64
before they are multiplied, so squares of 16/32-bit values are exact and neither overflow
(|x| > 1.8e19) nor underflow (|x| < 1e-19) as float32 squares do. The kernel is bound by
memory bandwidth, and float64 arithmetic (half the float32 rate on data-centre GPUs) stays
hidden behind the loads; scaling by a per-layer max instead would cost a second read. No atomics: equal inputs give bit-identical sums every run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
ITERS = 8
TILE = BLOCK * ITERS

_ELEMENT = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
            torch.float16: tl.float16}


@triton.jit
def _tile_sums_kernel(theta_addr, gf_addr, gr_addr, numel_ptr, tile_layer_ptr, tile_start_ptr, tile_slot_ptr,
                      out_ptr, ELEMENT: tl.constexpr, ACC: tl.constexpr, HAS_RETAIN: tl.constexpr,
                      BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    layer = tl.load(tile_layer_ptr + pid)
    start = tl.load(tile_start_ptr + pid)
    n = tl.load(numel_ptr + layer)
    theta = tl.load(theta_addr + layer).to(tl.pointer_type(ELEMENT))
    gf = tl.load(gf_addr + layer).to(tl.pointer_type(ELEMENT))
    lanes = tl.arange(0, BLOCK)
    tt = tl.zeros([BLOCK], dtype=ACC)
    ff = tl.zeros([BLOCK], dtype=ACC)
    rr = tl.zeros([BLOCK], dtype=ACC)
    fr = tl.zeros([BLOCK], dtype=ACC)
    for it in tl.static_range(ITERS):
        offs = start + it * BLOCK + lanes
        mask = offs < n
        t = tl.load(theta + offs, mask=mask, other=0.0).to(ACC)
        f = tl.load(gf + offs, mask=mask, other=0.0).to(ACC)
        tt += t * t
        ff += f * f
        if HAS_RETAIN:
            gr = tl.load(gr_addr + layer).to(tl.pointer_type(ELEMENT))
            r = tl.load(gr + offs, mask=mask, other=0.0).to(ACC)
            rr += r * r
            fr += f * r
    out = out_ptr + tl.load(tile_slot_ptr + pid) * 4
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


def tile_table(numels: list[int], tile: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tile -> layer, tile -> first element, layer -> first tile, layer -> tile count), tiles in layer order."""
    counts = torch.tensor([triton.cdiv(n, tile) for n in numels], dtype=torch.int64)
    starts = torch.cumsum(counts, 0) - counts
    layer_of = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    first = (torch.arange(int(counts.sum()), dtype=torch.int64) - starts[layer_of]) * tile
    return layer_of.to(device), first.to(device), starts.to(device), counts.to(device)


def _check(tensors: list[torch.Tensor], what: str) -> None:
    for i, t in enumerate(tensors):
        if not t.is_contiguous():
            raise ValueError(f"layer {i}: the {what} tensor is not contiguous; pass contiguous tensors "
                             "(slug_fast.layer_stats makes them so)")
        if t.dtype not in _ELEMENT:
            raise ValueError(f"layer {i}: dtype {t.dtype} is not supported; use float32, float64, bfloat16 "
                             "or float16")


def layer_sums(params: list[torch.Tensor], forget: list[torch.Tensor],
               retain: list[torch.Tensor] | None = None) -> torch.Tensor:
    """(n, 4) float64: [sum theta^2, sum g_f^2, sum g_r^2, sum g_f*g_r] per layer, on the tensors' device.

    Each layer's tensors share shape and dtype (slug_fast.layer_stats checks it); every tensor
    must be contiguous (non-contiguous ones are refused).
    """
    n_layers = len(params)
    device = params[0].device if params else torch.device("cpu")
    out = torch.zeros((n_layers, 4), dtype=torch.float64, device=device)
    if n_layers == 0:
        return out
    for what, group in (("parameter", params), ("forget gradient", forget), ("retain gradient", retain or [])):
        _check(group, what)
    numels = [p.numel() for p in params]
    layer_of, first, starts, counts = tile_table(numels, TILE, device)
    partials = torch.zeros((max(int(counts.sum()), 1), 4), dtype=torch.float64, device=device)
    numel_t = torch.tensor(numels, dtype=torch.int64, device=device)

    def addresses(tensors):
        return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=device)

    theta_addr, gf_addr = addresses(params), addresses(forget)
    gr_addr = addresses(retain) if retain is not None else gf_addr
    for dtype in dict.fromkeys(p.dtype for p in params):
        in_group = torch.tensor([p.dtype == dtype for p in params], device=device)
        tiles = in_group[layer_of].nonzero().flatten()  # this dtype's tiles, in layer order
        if tiles.numel() == 0:
            continue
        _tile_sums_kernel[(tiles.numel(),)](
            theta_addr, gf_addr, gr_addr, numel_t, layer_of[tiles].contiguous(), first[tiles].contiguous(),
            tiles, partials, ELEMENT=_ELEMENT[dtype], ACC=tl.float64, HAS_RETAIN=retain is not None,
            BLOCK=BLOCK, ITERS=ITERS)
    _combine_kernel[(n_layers,)](partials, starts, counts, out, BLOCK=256)
    return out
