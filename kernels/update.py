"""The single-layer update out = cast(base + step * d), for several tensors in one launch.

The same tile tables as the statistics kernel: one grid covers every tile of every
tensor of a (parameter dtype, direction dtype) pair, so a grouped HF q/k/v edit can be one
launch; axpy_into, the CUDA kernel of the operator slug_fast::axpy_into, is the one-tensor
case. Computed in float32 (float64 for float64 parameters) as base + (step * d), two
roundings and no fused multiply-add, which equals torch's `base.float() + step * d.float()`
bit for bit. The tables are cached and the aligned full-tile path is the statistics
kernel's (kernels/stats.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .stats import _ELEMENT, layer_pointers
from .tables import Tables, device_guard, tables_for

BLOCK = 1024
ITERS = 4
TILE = BLOCK * ITERS
NUM_WARPS = 4


@triton.jit
def _round_to_bf16(x):
    """float32 -> bfloat16 rounding to nearest even, by integer arithmetic.

    Spelled out because Triton's interpreter truncates in `.to(tl.bfloat16)`;
    compiled kernels round to nearest even either way, so both agree with torch.
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)  # NaN stays NaN
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _axpy_tile(out, base, d, step, start, n, FULL: tl.constexpr, OUT: tl.constexpr, COMPUTE: tl.constexpr,
               BLOCK: tl.constexpr, ITERS: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    for it in tl.static_range(ITERS):
        offs = start + it * BLOCK + lanes
        if FULL:
            b = tl.load(base + offs).to(COMPUTE)
            scaled = step * tl.load(d + offs).to(COMPUTE)
        else:
            mask = offs < n
            b = tl.load(base + offs, mask=mask).to(COMPUTE)
            scaled = step * tl.load(d + offs, mask=mask).to(COMPUTE)
        y = b + scaled
        if OUT == tl.bfloat16:
            y = _round_to_bf16(y)
        else:
            y = y.to(OUT)
        if FULL:
            tl.store(out + offs, y)
        else:
            tl.store(out + offs, y, mask=mask)


@triton.jit
def _axpy_tiles_kernel(addr_ptr, n_layers, numel_ptr, tile_layer_ptr, tile_start_ptr, step_ptr,
                       OUT: tl.constexpr, DIR: tl.constexpr, COMPUTE: tl.constexpr, ALIGNED: tl.constexpr,
                       BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    layer = tl.load(tile_layer_ptr + pid)
    start = tl.load(tile_start_ptr + pid)
    n = tl.load(numel_ptr + layer)
    out, base, d = layer_pointers(addr_ptr, n_layers, layer, OUT, OUT, DIR, ALIGNED)  # rows: out, base, direction
    if ALIGNED:
        start = tl.multiple_of(start, BLOCK * ITERS)
    step = tl.load(step_ptr)
    if start + BLOCK * ITERS <= n:
        _axpy_tile(out, base, d, step, start, n, True, OUT, COMPUTE, BLOCK, ITERS)
    else:
        _axpy_tile(out, base, d, step, start, n, False, OUT, COMPUTE, BLOCK, ITERS)


def plan(outs: list[torch.Tensor], bases: list[torch.Tensor], directions: list[torch.Tensor]) -> Tables:
    """The (cached) tables of an axpy_many call: what `launch` needs besides the tensors' data."""
    def check():
        for i, (o, b, d) in enumerate(zip(outs, bases, directions)):
            if not (o.is_contiguous() and b.is_contiguous() and d.is_contiguous()):
                raise ValueError(f"tensor {i}: axpy_many takes contiguous tensors")
            if o.dtype != b.dtype or o.shape != b.shape or d.shape != o.shape:
                raise ValueError(f"tensor {i}: out {o.dtype} {tuple(o.shape)}, base {b.dtype} {tuple(b.shape)} "
                                 f"and direction {tuple(d.shape)} must agree")
            if o.dtype not in _ELEMENT or d.dtype not in _ELEMENT:
                raise ValueError(f"tensor {i}: dtypes {o.dtype} and {d.dtype}; use float32, float64, bfloat16 "
                                 "or float16")

    check()  # a few tensors: checked on every call, shapes too
    return tables_for([outs, bases, directions], TILE, lambda: None)


def launch(tables: Tables, step: float) -> None:
    """out = cast(base + step * direction) for every tensor triple `tables` describes: the kernels only."""
    with device_guard(tables.device):
        for group in tables.groups:
            if group.tiles == 0:
                continue
            out_dtype, _, dir_dtype = group.dtypes
            compute = torch.float64 if out_dtype == torch.float64 else torch.float32
            step_t = torch.full((1,), step, dtype=compute, device=tables.device)  # a fill, no host copy
            _axpy_tiles_kernel[(group.tiles,)](
                tables.addresses, tables.numels.numel(), tables.numels, group.tile_layer, group.tile_start, step_t,
                OUT=_ELEMENT[out_dtype], DIR=_ELEMENT[dir_dtype], COMPUTE=_ELEMENT[compute], ALIGNED=group.aligned,
                BLOCK=BLOCK, ITERS=ITERS, num_warps=NUM_WARPS, enable_fp_fusion=False)


def axpy_many(outs: list[torch.Tensor], bases: list[torch.Tensor], directions: list[torch.Tensor],
              step: float) -> None:
    """outs[i] = cast(bases[i] + step * directions[i]) for every i; one launch per dtype pair.

    Tensors are contiguous and on one device; outs[i] may be bases[i] itself.
    """
    if outs:
        launch(plan(outs, bases, directions), step)


def axpy_into(out: torch.Tensor, base: torch.Tensor, direction: torch.Tensor, step: float) -> None:
    """out = cast(base + step * direction), in float32 (float64 for float64 tensors); `out` may be `base`."""
    if out.numel():
        axpy_many([out], [base], [direction], step)
