"""The single-layer update out = cast(base + step * d) in one pass."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


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
def _axpy_kernel(out_ptr, base_ptr, d_ptr, step_ptr, n,
                 COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    step = tl.load(step_ptr)
    base = tl.load(base_ptr + offs, mask=mask).to(COMPUTE)
    d = tl.load(d_ptr + offs, mask=mask).to(COMPUTE)
    scaled = step * d
    y = base + scaled
    if out_ptr.dtype.element_ty == tl.bfloat16:
        tl.store(out_ptr + offs, _round_to_bf16(y), mask=mask)
    else:
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def axpy_into(out: torch.Tensor, base: torch.Tensor, direction: torch.Tensor, step: float) -> None:
    """out = cast(base + step * direction), in float32 (float64 for float64 tensors).

    Built without fused multiply-add so the result equals torch's
    `base.float() + step * direction.float()` bit for bit. `out` may be `base`.
    """
    compute = torch.float64 if out.dtype == torch.float64 else torch.float32
    step_t = torch.tensor([step], dtype=compute, device=out.device)
    n = out.numel()
    if n == 0:
        return
    _axpy_kernel[(triton.cdiv(n, BLOCK),)](
        out, base, direction, step_t, n,
        COMPUTE=tl.float64 if compute == torch.float64 else tl.float32, BLOCK=BLOCK,
        enable_fp_fusion=False)
