"""The GPU path at the memory-bandwidth limit: the stages of bench/gpu/run.sh.

    python bench/gpu/bench_gpu.py --stage check      # one stage (run.sh runs them in order)
    python bench/gpu/bench_gpu.py --smoke            # every stage at toy sizes, in one process: CI,
                                                     # on CPU tensors under TRITON_INTERPRET=1

Stages; each appends its rows to $OUT/gpu_bench.jsonl (default: the current folder) as soon
as they exist, so a timeout or a crash later loses nothing measured before:
  versions   Python, torch, Triton, the device;
  check      correctness at toy sizes through the library's entry points: layer_stats and axpy
             must run the "triton" backend; statistics against float64, the update against
             torch's rounding bit for bit, run-to-run identity, a repeated call builds no
             table. Exits 1 on any mismatch (run.sh then stops: no timing of wrong kernels);
  bandwidth  clocks warmed, then the device's copy bandwidth (bytes read + written) and
             read bandwidth (torch.sum, bytes read): the floors of the update and the stats;
  set        statistics on parameter sets shaped like open_clip ViT-B-32 (151M, fp32),
             ViT-H-14 (986M, fp32) and LLaVA-1.5-7B (7.06B, bf16): the kernels alone with
             prebuilt tables at 4, 8 and 16 warps, the library's layer_stats end to end
             (first and repeated call), the authors' loop (per-layer torch.norm +
             CosineSimilarity, a host sync per value) and the best torch composition; the
             update on the set's largest tensor, kernel alone and end to end, against
             torch.add and the copy-bandwidth floor;
  big        one bf16 tensor of more than 2^31 elements against a chunked float64 reference;
  host       the host's part of a repeated layer_stats call at each full-size set's tensor count
             (1-element tensors, the launch replaced by a zeros table);
  table      the summary table of every row so far, and the goals.
Times on CUDA are medians from triton.testing.do_bench (CUDA events, L2 flushed between runs);
on CPU medians of wall-clock runs. Shapes come from the architectures' formulas.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

SMOKE = "--smoke" in sys.argv
if not torch.cuda.is_available():
    if not SMOKE:
        sys.exit("no CUDA device: run with --smoke (toy sizes under TRITON_INTERPRET=1) or on a GPU")
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import triton  # noqa: E402

import slug_fast  # noqa: E402
from slug_fast import kernels  # noqa: E402
from slug_fast.edit import axpy, axpy_reference  # noqa: E402
from slug_fast.kernels import tables  # noqa: E402
from slug_fast.stats import SUM_RTOL, layer_sums  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# On a GPU the library picks its backend and the check asserts it is Triton; without one the
# interpreter runs Triton only when asked by name.
BACKEND = "auto" if DEVICE.type == "cuda" else "triton"
WARPS = (4, 8) if SMOKE else (4, 8, 16)  # the interpreter ignores warps: the smoke only runs the loop
REPEATS = 1 if SMOKE else 10


def clip_shapes(width, layers, patch, image, embed, text_width, text_layers, vocab=49408, context=77):
    """open_clip CLIP parameter shapes (ViT image tower + text transformer)."""
    shapes = []

    def blocks(w, n):
        for _ in range(n):
            shapes.extend([(w,), (w,), (3 * w, w), (3 * w,), (w, w), (w,), (w,), (w,), (4 * w, w), (4 * w,),
                           (w, 4 * w), (w,)])

    grid = image // patch
    shapes += [(width, 3, patch, patch), (width,), (grid * grid + 1, width), (width,), (width,)]
    blocks(width, layers)
    shapes += [(width,), (width,), (width, embed)]
    shapes += [(vocab, text_width), (context, text_width)]
    blocks(text_width, text_layers)
    shapes += [(text_width,), (text_width,), (text_width, embed), ()]
    return shapes


def llava_shapes(vision=(1024, 24, 14, 336), hidden=4096, inter=11008, layers=32, vocab=32064):
    """LLaVA-1.5 shapes: CLIP ViT-L/14-336 tower, 2-layer projector, LLaMA decoder and head."""
    w, n, patch, image = vision
    shapes = [(w, 3, patch, patch), (w,), ((image // patch) ** 2 + 1, w), (w,), (w,)]
    for _ in range(n):
        shapes += [(w, w), (w,)] * 4 + [(w,), (w,), (4 * w, w), (4 * w,), (w, 4 * w), (w,), (w,), (w,)]
    shapes += [(hidden, w), (hidden,), (hidden, hidden), (hidden,), (vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4 + [(inter, hidden), (inter, hidden), (hidden, inter), (hidden,), (hidden,)]
    shapes += [(hidden,), (vocab, hidden)]
    return shapes


FULL_SETS = {
    "ViT-B-32": (lambda: clip_shapes(768, 12, 32, 224, 512, 512, 12), torch.float32),
    "ViT-H-14": (lambda: clip_shapes(1280, 32, 14, 224, 1024, 1024, 24), torch.float32),
    "LLaVA-1.5-7B": (lambda: llava_shapes(), torch.bfloat16),
}
SMOKE_SETS = {
    "ViT-B-32 (toy)": (lambda: clip_shapes(32, 2, 8, 32, 16, 32, 2, vocab=300, context=8), torch.float32),
    "LLaVA (toy)": (lambda: llava_shapes((32, 2, 8, 32), 64, 96, 2, 300), torch.bfloat16),
}
BIG_ELEMENTS = 2**31 + 2**20 + 3 if not SMOKE else 2**16 + 3  # past int32 offsets on the GPU


def out_path() -> str:
    return os.path.join(os.environ.get("OUT", "."), "gpu_bench.jsonl")


def emit(row: dict) -> dict:
    """Print a row and append it to the JSONL file at once."""
    print(json.dumps(row), flush=True)
    with open(out_path(), "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def rows(kind: str) -> list[dict]:
    if not os.path.exists(out_path()):
        return []
    with open(out_path()) as f:
        return [r for r in map(json.loads, f) if r.get("kind") == kind]


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def seconds(fn, repeats: int = REPEATS) -> float:
    """Median time of fn: CUDA events via do_bench on a GPU, wall clock on the CPU."""
    if DEVICE.type == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def warm_clocks(duration: float = 1.0) -> None:
    """Run matrix products for about `duration` seconds so the clocks leave their idle state."""
    if DEVICE.type != "cuda":
        return
    a = torch.randn(4096, 4096, device=DEVICE, dtype=torch.bfloat16)
    end = time.perf_counter() + duration
    while time.perf_counter() < end:
        for _ in range(20):
            a @ a
        sync()


def rand(shape, dtype, gen):
    if DEVICE.type == "cpu":
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randn(shape, dtype=dtype, device=DEVICE)


# ---------------------------------------------------------------- stages

def stage_versions() -> dict:
    return emit({"kind": "versions", "python": platform.python_version(), "torch": torch.__version__,
                 "triton": triton.__version__, "device": torch.cuda.get_device_name() if DEVICE.type == "cuda"
                 else "cpu (Triton interpreter)", "gpus": torch.cuda.device_count(),
                 "backends": slug_fast.backends(), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})


def float64_sums(p, f, r) -> torch.Tensor:
    p64, f64, r64 = p.double(), f.double(), r.double()
    return torch.stack([(p64 * p64).sum(), (f64 * f64).sum(), (r64 * r64).sum(), (f64 * r64).sum()]).cpu()


def stage_check() -> dict:
    """Correctness through the library's entry points at toy sizes; exit 1 on a mismatch."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(1,), (7,), (1031,), (33, 65), (3, 5, 7, 9), (70_001,), (0,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16, torch.float16,
              torch.float32]
    names = [f"layer{i}" for i in range(len(shapes))]
    params = {n: rand(s, dt, gen) for n, s, dt in zip(names, shapes, dtypes)}
    forget = {n: rand(s, dt, gen) for n, s, dt in zip(names, shapes, dtypes)}
    retain = {n: (0.3 * forget[n].float() + rand(s, torch.float32, gen)).to(dt)
              for n, s, dt in zip(names, shapes, dtypes)}
    # an unaligned view: the kernels' masked, scalar path
    tail = rand((4097,), torch.float32, gen)
    params["unaligned"], forget["unaligned"], retain["unaligned"] = tail[1:], tail[1:] * 2, tail[1:] * -3
    tables.clear_cache()
    stats = slug_fast.layer_stats(params, forget, retain, backend=BACKEND)
    sums, _ = layer_sums(params, forget, retain, backend=BACKEND)
    worst = 0.0
    for i, n in enumerate(forget):
        exact = float64_sums(params[n], forget[n], retain[n])
        f64, r64 = forget[n].double(), retain[n].double()
        scale = torch.stack([exact[0], exact[1], exact[2], (f64 * r64).abs().sum().cpu()])
        worst = max(worst, float(((sums[i] - exact).abs() / scale.clamp_min(1e-300)).max()))
    builds = tables.cache_info()["builds"]
    again, _ = layer_sums(params, forget, retain, backend=BACKEND)
    identical = torch.equal(sums, again)
    repeat_builds = tables.cache_info()["builds"] - builds
    update_backends, update_ok = set(), True
    for n in forget:
        if params[n].numel() == 0:
            continue
        base = params[n].contiguous()
        out, ref = torch.empty_like(base), torch.empty_like(base)
        update_backends.add(axpy(out, base, forget[n].contiguous(), 0.37, backend=BACKEND))
        axpy_reference(ref, base, forget[n].contiguous(), 0.37)
        update_ok &= torch.equal(out, ref)
    outs = [torch.empty_like(p) for p in params.values()]
    kernels.axpy_many(outs, [p.contiguous() for p in params.values()], [f.contiguous() for f in forget.values()],
                      -1.5)
    for o, p, f in zip(outs, params.values(), forget.values()):
        ref = torch.empty_like(o)
        axpy_reference(ref, p.contiguous(), f.contiguous(), -1.5)
        update_ok &= torch.equal(o, ref)
    row = {"kind": "check", "stats_backend": stats.backend, "update_backends": sorted(update_backends),
           "stats_max_rel_error": worst, "stats_bit_identical": identical, "repeat_table_builds": repeat_builds,
           "update_matches_torch": update_ok}
    row["ok"] = (stats.backend == "triton" and row["update_backends"] == ["triton"] and worst < SUM_RTOL["triton"]
                 and identical and repeat_builds == 0 and update_ok)
    emit(row)
    if not row["ok"]:
        sys.exit(f"check failed: {row}")
    return row


def stage_bandwidth() -> dict:
    warm_clocks()
    nbytes = (1 << 20) if SMOKE else (4 << 30)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=DEVICE).uniform_()
    dst = torch.empty_like(src)
    copy = seconds(lambda: dst.copy_(src))
    read = seconds(lambda: src.sum())
    return emit({"kind": "bandwidth", "bytes": nbytes, "copy_GBps": 2 * nbytes / copy / 1e9,
                 "read_GBps": nbytes / read / 1e9})


def authors_loop(params, forget, retain):
    cos = torch.nn.CosineSimilarity(dim=0)
    out = []
    for p, f, r in zip(params, forget, retain):
        p_norm = torch.norm(p).item()
        f_norm = torch.norm(f).item()
        out.append((f_norm / p_norm if p_norm else 0.0, abs(cos(f.flatten(), r.flatten()).item())))
    return out


def torch_composition(params, forget, retain):
    p_norm = torch.stack(torch._foreach_norm(params))
    f_norm = torch.stack(torch._foreach_norm(forget))
    r_norm = torch.stack(torch._foreach_norm(retain))
    dot = torch.stack([torch.dot(f.flatten(), r.flatten()) for f, r in zip(forget, retain)])
    return torch.stack([f_norm / p_norm, dot.abs() / (f_norm * r_norm)]).cpu()


def stage_set(name: str, shapes, dtype) -> dict:
    warm_clocks(0.5)
    gen = torch.Generator().manual_seed(1)
    params = [rand(s, dtype, gen) for s in shapes]
    forget = [rand(s, dtype, gen) for s in shapes]
    retain = [rand(s, dtype, gen) for s in shapes]
    names = [f"layer{i}" for i in range(len(params))]
    as_map = lambda ts: dict(zip(names, ts))  # noqa: E731
    p_map, f_map, r_map = as_map(params), as_map(forget), as_map(retain)
    bytes_read = 3 * sum(p.numel() * p.element_size() for p in params)

    def ours():
        return slug_fast.layer_stats(p_map, f_map, r_map, backend=BACKEND)

    tables.clear_cache()
    sync()
    t0 = time.perf_counter()
    first = ours()
    sync()
    first_s = time.perf_counter() - t0
    builds = tables.cache_info()["builds"]
    second = ours()
    identical = torch.equal(first.dot, second.dot) and torch.equal(first.param_norm, second.param_norm)
    e2e = seconds(ours)
    repeat_builds = tables.cache_info()["builds"] - builds
    tables.clear_cache()
    t0 = time.perf_counter()
    plan = kernels.stats.plan(params, forget, retain)
    sync()
    build_s = time.perf_counter() - t0
    default_warps = dict(kernels.stats.NUM_WARPS)
    by_warps = {}
    try:
        for w in sorted(set(WARPS) | {default_warps[params[0].element_size()]}):
            kernels.stats.NUM_WARPS.update({k: w for k in default_warps})
            by_warps[w] = seconds(lambda: kernels.stats.launch(plan, True))
    finally:
        kernels.stats.NUM_WARPS.update(default_warps)
    kernel = by_warps[default_warps[params[0].element_size()]]
    authors = seconds(lambda: authors_loop(params, forget, retain), repeats=min(REPEATS, 3))
    composed = seconds(lambda: torch_composition(params, forget, retain))
    big = max(range(len(params)), key=lambda i: params[i].numel())
    base, d = params[big], forget[big]
    out = torch.empty_like(base)
    update_plan = kernels.update.plan([out], [base], [d])
    update_kernel = seconds(lambda: kernels.update.launch(update_plan, 0.5))
    update_e2e = seconds(lambda: axpy(out, base, d, 0.5, backend=BACKEND))
    torch_add = seconds(lambda: torch.add(base, d, alpha=0.5, out=out))
    update_bytes = 3 * base.numel() * base.element_size()
    row = {"kind": "set", "set": name, "dtype": str(dtype).removeprefix("torch."), "tensors": len(params),
           "parameters": sum(p.numel() for p in params), "backend": first.backend, "bit_identical": identical,
           "bytes_read": bytes_read, "first_call_ms": 1e3 * first_s, "table_build_ms": 1e3 * build_s,
           "repeat_table_builds": repeat_builds, "e2e_ms": 1e3 * e2e, "kernel_ms": 1e3 * kernel,
           "kernel_ms_by_warps": {str(w): 1e3 * t for w, t in by_warps.items()},
           "kernel_GBps": bytes_read / kernel / 1e9, "e2e_over_kernel": e2e / kernel,
           "authors_ms": 1e3 * authors, "torch_ms": 1e3 * composed, "vs_authors": authors / e2e,
           "vs_torch": composed / e2e, "update_tensor": list(base.shape), "update_bytes": update_bytes,
           "update_kernel_ms": 1e3 * update_kernel, "update_e2e_ms": 1e3 * update_e2e,
           "torch_add_ms": 1e3 * torch_add, "update_GBps": update_bytes / update_kernel / 1e9}
    return emit(row)


def stage_big() -> dict:
    """One bf16 tensor past 2^31 elements: the sums against float64 chunk by chunk, the update bit for bit."""
    n = BIG_ELEMENTS
    gen = torch.Generator().manual_seed(2)
    theta, gf, gr = (rand((n,), torch.bfloat16, gen) for _ in range(3))
    sums, backend = layer_sums({"w": theta}, {"w": gf}, {"w": gr}, backend=BACKEND)
    exact = torch.zeros(4, dtype=torch.float64)
    scale = torch.zeros(4, dtype=torch.float64)
    chunk = 1 << 28
    for lo in range(0, n, chunk):
        p, f, r = theta[lo:lo + chunk], gf[lo:lo + chunk], gr[lo:lo + chunk]
        part = float64_sums(p, f, r)
        exact += part
        scale += torch.cat([part[:3], (f.double() * r.double()).abs().sum().cpu().reshape(1)])
    rel = float(((sums[0] - exact).abs() / scale).max())
    out = torch.empty_like(theta)
    axpy(out, theta, gf, 0.25, backend=BACKEND)
    update_ok = True
    for lo in range(0, n, chunk):
        ref = torch.empty_like(theta[lo:lo + chunk])
        axpy_reference(ref, theta[lo:lo + chunk], gf[lo:lo + chunk], 0.25)
        update_ok &= torch.equal(out[lo:lo + chunk], ref)
    return emit({"kind": "big", "elements": n, "backend": backend, "stats_max_rel_error": rel,
                 "update_matches_torch": update_ok, "ok": rel < SUM_RTOL["triton"] and update_ok})


def stage_host() -> list[dict]:
    """The host's share of a repeated layer_stats call on each full-size set's tensor count:
    1-element tensors (so every per-tensor step of the Python path runs) with the kernel launch
    replaced by a zeros table; what remains is validation, the table-cache lookup, the copy of
    the sums to the host and the statistics."""
    out = []
    real_launch = kernels.stats.launch
    kernels.stats.launch = lambda plan, has_retain: torch.zeros((plan.numels.numel(), 4), dtype=torch.float64,
                                                                device=plan.device)
    try:
        for name, (make, dtype) in FULL_SETS.items():
            n = len(make())
            names = [f"layer{i}" for i in range(n)]
            params = {k: torch.zeros(1, dtype=dtype, device=DEVICE, requires_grad=True) for k in names}
            forget = {k: torch.zeros(1, dtype=dtype, device=DEVICE) for k in names}
            retain = {k: torch.zeros(1, dtype=dtype, device=DEVICE) for k in names}
            call = lambda: slug_fast.layer_stats(params, forget, retain, backend=BACKEND)  # noqa: E731
            call()
            times = []
            for _ in range(30):
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            plan_s = seconds(lambda: kernels.stats.plan(list(params.values()), list(forget.values()),
                                                        list(retain.values())), repeats=30)
            out.append(emit({"kind": "host", "set": name, "tensors": 3 * n, "host_ms": 1e3 * statistics.median(times),
                             "table_lookup_ms": 1e3 * plan_s}))
    finally:
        kernels.stats.launch = real_launch
    return out


def stage_table() -> None:
    """The summary of every row in the JSONL file so far, with the goals of the GPU path."""
    versions = (rows("versions") or [{}])[-1]
    bandwidth = (rows("bandwidth") or [{}])[-1]
    copy, read = bandwidth.get("copy_GBps"), bandwidth.get("read_GBps")
    print(f"{versions.get('device')}, Python {versions.get('python')}, torch {versions.get('torch')}, "
          f"triton {versions.get('triton')}, {versions.get('date')}")
    if copy:
        print(f"copy bandwidth {copy:.0f} GB/s (read + write), read bandwidth {read:.0f} GB/s")
    for check in rows("check") + rows("big"):
        print(f"{check['kind']}: {'ok' if check['ok'] else 'FAILED'} {check}")
    for host in rows("host"):
        print(f"host part of a repeated layer_stats call, {host['set']} ({host['tensors']} tensors): "
              f"{host['host_ms']:.2f} ms, of which the table-cache lookup {host['table_lookup_ms']:.2f} ms")
    print(f"{'set':<16}{'params':>9}{'kernel ms':>11}{'GB/s':>7}{'of read':>9}{'ms by warps':>24}{'e2e ms':>9}"
          f"{'e2e/k':>7}{'first ms':>10}{'authors x':>11}{'torch x':>9}{'upd ms':>9}{'of floor':>9}{'add ms':>9}")
    for r in rows("set"):
        warps = " ".join(f"{w}:{v:.2f}" for w, v in r["kernel_ms_by_warps"].items())
        of_read = r["kernel_GBps"] / read if read else float("nan")
        floor = r["update_bytes"] / (copy * 1e9) * 1e3 if copy else float("nan")  # ms to read 2 and write 1
        print(f"{r['set']:<16}{r['parameters'] / 1e6:>8.1f}M{r['kernel_ms']:>11.3f}{r['kernel_GBps']:>7.0f}"
              f"{of_read:>9.2f}{warps:>24}{r['e2e_ms']:>9.3f}{r['e2e_over_kernel']:>7.2f}{r['first_call_ms']:>10.1f}"
              f"{r['vs_authors']:>11.1f}{r['vs_torch']:>9.2f}{r['update_kernel_ms']:>9.3f}"
              f"{r['update_kernel_ms'] / floor:>9.2f}{r['torch_add_ms']:>9.3f}")
    print("goals: kernel >= 0.80 of read bandwidth on ViT-H-14 and LLaVA-1.5-7B; e2e/k <= 1.5 on a repeated call; "
          "update within 1.10 of the copy-bandwidth floor")


STAGES = ("versions", "check", "bandwidth", "set", "big", "host", "table")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=STAGES, help="run one stage (default: all of them in order)")
    ap.add_argument("--smoke", action="store_true", help="toy sizes (CI, no GPU needed)")
    ap.add_argument("--sets", help="comma-separated subset of the parameter sets (stage 'set')")
    args = ap.parse_args(argv)
    sets = SMOKE_SETS if args.smoke else FULL_SETS
    if args.sets:
        unknown = set(args.sets.split(",")) - set(sets)
        if unknown:
            ap.error(f"unknown sets {sorted(unknown)}; choose from {list(sets)}")
        sets = {k: v for k, v in sets.items() if k in args.sets.split(",")}
    for stage in [args.stage] if args.stage else STAGES:
        if stage == "set":
            for name, (make, dtype) in sets.items():
                stage_set(name, make(), dtype)
                if DEVICE.type == "cuda":
                    torch.cuda.empty_cache()
        else:
            globals()[f"stage_{stage}"]()


if __name__ == "__main__":
    main()
