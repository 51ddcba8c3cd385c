"""The single-layer update out = cast(base + step * d), for several tensors in one launch.

The same tile tables as the statistics kernel: one grid covers every tile of every
tensor of a (parameter dtype, direction dtype) pair, so a grouped HF q/k/v edit can be one
launch; axpy_into, the CUDA kernel of the operator slug_fast::axpy_into, is the one-tensor
case. Computed in float32 (float64 for float64 parameters) as base + (step * d), two
roundings and no fused multiply-add, which equals torch's `base.float() + step * d.float()`
bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .stats import _ELEMENT, tile_table

BLOCK = 1024
ITERS = 4
TILE = BLOCK * ITERS


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
def _axpy_tiles_kernel(out_addr, base_addr, d_addr, numel_ptr, tile_layer_ptr, tile_start_ptr, step_ptr,
                       OUT: tl.constexpr, DIR: tl.constexpr, COMPUTE: tl.constexpr,
                       BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    layer = tl.load(tile_layer_ptr + pid)
    start = tl.load(tile_start_ptr + pid)
    n = tl.load(numel_ptr + layer)
    out = tl.load(out_addr + layer).to(tl.pointer_type(OUT))
    base = tl.load(base_addr + layer).to(tl.pointer_type(OUT))
    d = tl.load(d_addr + layer).to(tl.pointer_type(DIR))
    step = tl.load(step_ptr)
    lanes = tl.arange(0, BLOCK)
    for it in tl.static_range(ITERS):
        offs = start + it * BLOCK + lanes
        mask = offs < n
        b = tl.load(base + offs, mask=mask).to(COMPUTE)
        scaled = step * tl.load(d + offs, mask=mask).to(COMPUTE)
        y = b + scaled
        if OUT == tl.bfloat16:
            tl.store(out + offs, _round_to_bf16(y), mask=mask)
        else:
            tl.store(out + offs, y.to(OUT), mask=mask)


def axpy_many(outs: list[torch.Tensor], bases: list[torch.Tensor], directions: list[torch.Tensor],
              step: float) -> None:
    """outs[i] = cast(bases[i] + step * directions[i]) for every i; one launch per dtype pair.

    Tensors are contiguous and on one device; outs[i] may be bases[i] itself.
    """
    if not outs:
        return
    device = outs[0].device
    for i, (o, b, d) in enumerate(zip(outs, bases, directions)):
        if not (o.is_contiguous() and b.is_contiguous() and d.is_contiguous()):
            raise ValueError(f"tensor {i}: axpy_many takes contiguous tensors")
        if o.dtype != b.dtype or o.shape != b.shape or d.shape != o.shape:
            raise ValueError(f"tensor {i}: out {o.dtype} {tuple(o.shape)}, base {b.dtype} {tuple(b.shape)} and "
                             f"direction {tuple(d.shape)} must agree")
    numels = [o.numel() for o in outs]
    layer_of, first, _, _ = tile_table(numels, TILE, device)
    numel_t = torch.tensor(numels, dtype=torch.int64, device=device)

    def addresses(tensors):
        return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=device)

    out_addr, base_addr, d_addr = addresses(outs), addresses(bases), addresses(directions)
    for out_dtype, dir_dtype in dict.fromkeys((o.dtype, d.dtype) for o, d in zip(outs, directions)):
        member = torch.tensor([o.dtype == out_dtype and d.dtype == dir_dtype for o, d in zip(outs, directions)],
                              device=device)
        tiles = member[layer_of].nonzero().flatten()
        if tiles.numel() == 0:
            continue
        compute = torch.float64 if out_dtype == torch.float64 else torch.float32
        step_t = torch.tensor([step], dtype=compute, device=device)
        _axpy_tiles_kernel[(tiles.numel(),)](
            out_addr, base_addr, d_addr, numel_t, layer_of[tiles].contiguous(), first[tiles].contiguous(), step_t,
            OUT=_ELEMENT[out_dtype], DIR=_ELEMENT[dir_dtype], COMPUTE=_ELEMENT[compute], BLOCK=BLOCK, ITERS=ITERS,
            enable_fp_fusion=False)


def axpy_into(out: torch.Tensor, base: torch.Tensor, direction: torch.Tensor, step: float) -> None:
    """out = cast(base + step * direction), in float32 (float64 for float64 tensors); `out` may be `base`."""
    if out.numel():
        axpy_many([out], [base], [direction], step)
