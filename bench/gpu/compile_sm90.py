"""What the Triton kernels compile to on sm_90 (H100/H200), on any machine: no GPU needed.

    python bench/gpu/compile_sm90.py                 # the default warps of each kernel variant
    python bench/gpu/compile_sm90.py --warps 4,8,16  # the statistics kernel at each warp count too
    python bench/gpu/compile_sm90.py --json          # one JSON object (tests/test_kernels.py reads it)

Each variant is compiled by Triton's own compiler for the sm_90 target, then assembled by the
ptxas that ships with Triton: per variant, its global loads and stores by width (16-byte
vectors are ld.global.v4.b32 / v2.b64) and the registers and spill bytes ptxas reports. Must
run without TRITON_INTERPRET (the interpreter has no compiled form); the script unsets it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a source tree too

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from slug_fast.kernels import stats, update  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
TARGET = GPUTarget("cuda", 90, 32)
TYPES = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16, "fp64": tl.float64}
POINTERS = {"addr_ptr": "*i64", "n_layers": "i32", "numel_ptr": "*i64", "tile_layer_ptr": "*i64",
            "tile_start_ptr": "*i64"}
STATS = {**POINTERS, "tile_slot_ptr": "*i64", "out_ptr": "*fp64", "ELEMENT": "constexpr", "ACC": "constexpr",
         "HAS_RETAIN": "constexpr", "ALIGNED": "constexpr", "BLOCK": "constexpr", "ITERS": "constexpr"}
UPDATE = {**POINTERS, "step_ptr": "*fp32", "OUT": "constexpr", "DIR": "constexpr", "COMPUTE": "constexpr",
          "ALIGNED": "constexpr", "BLOCK": "constexpr", "ITERS": "constexpr"}
COMBINE = {"partials_ptr": "*fp64", "starts_ptr": "*i64", "counts_ptr": "*i64", "out_ptr": "*fp64",
           "CHUNKS": "constexpr", "BLOCK": "constexpr"}


def report(fn, signature: dict, constants: dict, **options) -> dict:
    ptx = triton.compile(ASTSource(fn, signature, constants), target=TARGET, options=options).asm["ptx"]
    done = subprocess.run([PTXAS, "-arch=sm_90a", "-v", "-o", os.devnull, "-"], input=ptx, capture_output=True,
                          text=True, check=True)
    spills = re.search(r"(\d+) bytes spill stores", done.stdout + done.stderr)
    regs = re.search(r"Used (\d+) registers", done.stdout + done.stderr)
    return {"warps": options.get("num_warps", 4), "block": constants.get("BLOCK"),
            "ops": dict(Counter(re.findall(r"(?:ld|st)\.global(?:\.v\d)?\.b\d+", ptx))),
            "registers": int(regs.group(1)), "spill_bytes": int(spills.group(1)) if spills else 0}


def variants(extra_warps: list[int]) -> dict:
    out = {}
    for name, element in TYPES.items():
        size = element.primitive_bitwidth // 8
        for warps in dict.fromkeys([stats.NUM_WARPS[size], *extra_warps]):
            block = stats.block_of(size, warps)
            for aligned in (True, False):
                suffix = "" if warps == stats.NUM_WARPS[size] else f" warps={warps}"
                out[f"stats {name} aligned={aligned}{suffix}"] = report(
                    stats._tile_sums_kernel, STATS, {"ELEMENT": element, "ACC": tl.float64, "HAS_RETAIN": True,
                                                     "ALIGNED": aligned, "BLOCK": block, "ITERS": stats.TILE // block},
                    num_warps=warps)
    for name in ("fp32", "bf16"):
        out[f"update {name} aligned=True"] = report(
            update._axpy_tiles_kernel, UPDATE, {"OUT": TYPES[name], "DIR": TYPES[name], "COMPUTE": tl.float32,
                                                "ALIGNED": True, "BLOCK": update.BLOCK, "ITERS": update.ITERS},
            num_warps=update.NUM_WARPS, enable_fp_fusion=False)
    out["combine"] = report(stats._combine_kernel, COMBINE, {"CHUNKS": 4, "BLOCK": stats.COMBINE_BLOCK})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warps", default="", help="comma-separated extra warp counts for the statistics kernel")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)
    if not os.path.exists(PTXAS):
        sys.exit(f"this Triton ships no ptxas ({PTXAS})")
    found = variants([int(w) for w in args.warps.split(",") if w])
    if args.json:
        print(json.dumps(found))
        return
    print(f"Triton {triton.__version__}, target sm_90 (ptxas -arch=sm_90a)")
    print(f"{'variant':<34}{'warps':>6}{'block':>7}{'regs':>6}{'spill B':>9}  global loads and stores")
    for name, r in found.items():
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(r["ops"].items()))
        print(f"{name:<34}{r['warps']:>6}{r['block']:>7}{r['registers']:>6}{r['spill_bytes']:>9}  {ops}")


if __name__ == "__main__":
    main()
