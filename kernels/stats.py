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
hidden behind the loads; scaling by a per-layer max instead would cost a second read. No
atomics: equal inputs give bit-identical sums every run.

The tables are cached per set of tensors (kernels/tables.py), so a repeated call costs a launch
per dtype and the combine. Where every tensor of a group starts at a multiple of 16 bytes the
kernel is told so (`tl.multiple_of`), and a tile that lies wholly inside its layer loads
without masks: both are needed for 16-byte vector loads.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tables import Tables, device_guard, tables_for

TILE = 8192  # elements per program, for every dtype (one tile table serves a mixed-dtype call)
COMBINE_BLOCK = 256
# Warps per program by element size. A block gives each thread 16 bytes (one vector load) of
# each tensor, so BLOCK = warps * 32 * 16 / element size and a tile is TILE / BLOCK blocks.
# With 8 warps no variant spills registers on sm_90 (4 warps spill for float32 and float16;
# tests/test_kernels.py checks with ptxas); the GPU bench compares 4, 8 and 16.
NUM_WARPS = {2: 8, 4: 8, 8: 8}


def block_of(element_size: int, warps: int) -> int:
    return min(TILE, warps * 32 * 16 // element_size)

_ELEMENT = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
            torch.float16: tl.float16}


@triton.jit
def layer_pointers(addr_ptr, n_layers, layer, A: tl.constexpr, B: tl.constexpr, C: tl.constexpr,
                   ALIGNED: tl.constexpr):
    """The base pointers of `layer`'s three tensors from a [3, n_layers] address table, typed A,
    B and C; ALIGNED: the host found every address a multiple of 16 bytes (a vector-load hint)."""
    a = tl.load(addr_ptr + layer).to(tl.pointer_type(A))
    b = tl.load(addr_ptr + n_layers + layer).to(tl.pointer_type(B))
    c = tl.load(addr_ptr + 2 * n_layers + layer).to(tl.pointer_type(C))
    if ALIGNED:
        a = tl.multiple_of(a, 16)
        b = tl.multiple_of(b, 16)
        c = tl.multiple_of(c, 16)
    return a, b, c


@triton.jit
def _tile_sums(theta, gf, gr, out, start, n, FULL: tl.constexpr, ACC: tl.constexpr, HAS_RETAIN: tl.constexpr,
               BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Write the tile's four sums to out[0:4]; FULL: the tile lies wholly inside its layer (no masks)."""
    lanes = tl.arange(0, BLOCK)
    tt = tl.zeros([BLOCK], dtype=ACC)
    ff = tl.zeros([BLOCK], dtype=ACC)
    rr = tl.zeros([BLOCK], dtype=ACC)
    fr = tl.zeros([BLOCK], dtype=ACC)
    for it in tl.static_range(ITERS):
        offs = start + it * BLOCK + lanes
        if FULL:
            t = tl.load(theta + offs).to(ACC)
            f = tl.load(gf + offs).to(ACC)
        else:
            mask = offs < n
            t = tl.load(theta + offs, mask=mask, other=0.0).to(ACC)
            f = tl.load(gf + offs, mask=mask, other=0.0).to(ACC)
        tt += t * t
        ff += f * f
        if HAS_RETAIN:
            if FULL:
                r = tl.load(gr + offs).to(ACC)
            else:
                r = tl.load(gr + offs, mask=mask, other=0.0).to(ACC)
            rr += r * r
            fr += f * r
    tl.store(out + 0, tl.sum(tt, axis=0).to(tl.float64))
    tl.store(out + 1, tl.sum(ff, axis=0).to(tl.float64))
    tl.store(out + 2, tl.sum(rr, axis=0).to(tl.float64))
    tl.store(out + 3, tl.sum(fr, axis=0).to(tl.float64))


@triton.jit
def _tile_sums_kernel(addr_ptr, n_layers, numel_ptr, tile_layer_ptr, tile_start_ptr, tile_slot_ptr, out_ptr,
                      ELEMENT: tl.constexpr, ACC: tl.constexpr, HAS_RETAIN: tl.constexpr, ALIGNED: tl.constexpr,
                      BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    layer = tl.load(tile_layer_ptr + pid)
    start = tl.load(tile_start_ptr + pid)
    n = tl.load(numel_ptr + layer)
    # rows: theta, g_f, g_r (g_r's row is g_f's without retain)
    theta, gf, gr = layer_pointers(addr_ptr, n_layers, layer, ELEMENT, ELEMENT, ELEMENT, ALIGNED)
    if ALIGNED:
        start = tl.multiple_of(start, BLOCK * ITERS)
    out = out_ptr + tl.load(tile_slot_ptr + pid) * 4
    if start + BLOCK * ITERS <= n:
        _tile_sums(theta, gf, gr, out, start, n, True, ACC, HAS_RETAIN, BLOCK, ITERS)
    else:
        _tile_sums(theta, gf, gr, out, start, n, False, ACC, HAS_RETAIN, BLOCK, ITERS)


@triton.jit
def _combine_kernel(partials_ptr, starts_ptr, counts_ptr, out_ptr, CHUNKS: tl.constexpr, BLOCK: tl.constexpr):
    layer = tl.program_id(0)
    start = tl.load(starts_ptr + layer)
    count = tl.load(counts_ptr + layer)
    rows = tl.arange(0, BLOCK)
    cols = tl.arange(0, 4)
    acc = tl.zeros([BLOCK, 4], dtype=tl.float64)
    # CHUNKS covers the layer with the most tiles; a constant bound because Triton 3.6's
    # interpreter cannot loop to a runtime value (it is rounded up to a power of two on the
    # host, so few variants compile)
    for chunk in range(0, CHUNKS):
        idx = chunk * BLOCK + rows
        ptrs = partials_ptr + (start + idx)[:, None] * 4 + cols[None, :]
        acc += tl.load(ptrs, mask=(idx < count)[:, None], other=0.0)
    tl.store(out_ptr + layer * 4 + cols, tl.sum(acc, axis=0))


def _check(tensors: list[torch.Tensor], what: str) -> None:
    for i, t in enumerate(tensors):
        if not t.is_contiguous():
            raise ValueError(f"layer {i}: the {what} tensor is not contiguous; pass contiguous tensors "
                             "(slug_fast.layer_stats makes them so)")
        if t.dtype not in _ELEMENT:
            raise ValueError(f"layer {i}: dtype {t.dtype} is not supported; use float32, float64, bfloat16 "
                             "or float16")


def plan(params: list[torch.Tensor], forget: list[torch.Tensor],
         retain: list[torch.Tensor] | None = None) -> Tables:
    """The (cached) tables of a layer_sums call: what `launch` needs besides the tensors' data."""
    def check():
        for what, group in (("parameter", params), ("forget gradient", forget), ("retain gradient", retain or [])):
            _check(group, what)

    return tables_for([params, forget, retain if retain is not None else forget], TILE, check)


def launch(tables: Tables, has_retain: bool) -> torch.Tensor:
    """(n, 4) float64 sums of the layers `tables` describes: the kernels only."""
    n_layers = tables.numels.numel()
    out = torch.empty((n_layers, 4), dtype=torch.float64, device=tables.device)
    partials = torch.empty((max(tables.tiles, 1), 4), dtype=torch.float64, device=tables.device)
    with device_guard(tables.device):
        for group in tables.groups:
            if group.tiles == 0:
                continue
            dtype = group.dtypes[0]
            warps = NUM_WARPS[dtype.itemsize]
            block = block_of(dtype.itemsize, warps)
            _tile_sums_kernel[(group.tiles,)](
                tables.addresses, n_layers, tables.numels, group.tile_layer, group.tile_start, group.tile_slot,
                partials, ELEMENT=_ELEMENT[dtype], ACC=tl.float64, HAS_RETAIN=has_retain, ALIGNED=group.aligned,
                BLOCK=block, ITERS=TILE // block, num_warps=warps)
        chunks = triton.next_power_of_2(max(1, triton.cdiv(tables.max_layer_tiles, COMBINE_BLOCK)))
        _combine_kernel[(n_layers,)](partials, tables.layer_first_tile, tables.layer_tiles, out,
                                     CHUNKS=chunks, BLOCK=COMBINE_BLOCK)
    return out


def layer_sums(params: list[torch.Tensor], forget: list[torch.Tensor],
               retain: list[torch.Tensor] | None = None) -> torch.Tensor:
    """(n, 4) float64: [sum theta^2, sum g_f^2, sum g_r^2, sum g_f*g_r] per layer, on the tensors' device.

    Each layer's tensors share shape and dtype (slug_fast.layer_stats checks it); every tensor
    must be contiguous (non-contiguous ones are refused).
    """
    if not params:
        return torch.zeros((0, 4), dtype=torch.float64)
    return launch(plan(params, forget, retain), retain is not None)
