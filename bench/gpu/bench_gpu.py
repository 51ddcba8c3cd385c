"""The GPU path at the memory-bandwidth limit: one prepared script for a lent GPU.

    python bench/gpu/bench_gpu.py            # on the GPU (after bench/gpu/run.sh builds the package)
    python bench/gpu/bench_gpu.py --smoke    # toy sizes; without a GPU under TRITON_INTERPRET=1 (CI)

1. correctness on fresh random data: layer_stats (Triton) against a float64 reference over
   mixed dtypes, the grouped update against torch's rounding, bit-identical stats run to run;
2. the device's copy bandwidth (torch copy of a large buffer, bytes read + written / time);
3. statistics on parameter sets shaped like open_clip ViT-B-32 (151M, fp32), ViT-H-14 (986M,
   fp32) and LLaVA-1.5-7B (7.06B, bf16): ours vs the authors' loop (per-layer torch.norm +
   CosineSimilarity, a host sync per value) vs the best torch composition (_foreach_norm on
   theta, g_f, g_r + one dot per layer); ms, GB/s read, fraction of copy bandwidth, ratios;
4. the update kernel (theta = theta0 + lam * d) vs torch.add on the largest tensor of a set.
Shapes come from the architectures' formulas (no model library needed there). Medians of
--repeats timed runs after warm-up; prints a table and, where $OUT is set, writes
$OUT/gpu_bench.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

SMOKE = "--smoke" in sys.argv
if not torch.cuda.is_available():
    if not SMOKE:
        sys.exit("no CUDA device: run with --smoke (toy sizes under TRITON_INTERPRET=1) or on a GPU")
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import slug_fast  # noqa: E402
from slug_fast import kernels  # noqa: E402
from slug_fast.edit import axpy_reference  # noqa: E402


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


def timed(fn, device, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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


def check_correctness(device, gen) -> dict:
    """layer_stats vs float64, grouped update vs torch rounding, run-to-run identity."""
    shapes = [(1,), (7,), (1031,), (33, 65), (3, 5, 7, 9), (70_001,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16, torch.float16]
    params = [torch.randn(s, generator=gen).to(device, dt) for s, dt in zip(shapes, dtypes)]
    forget = [torch.randn(s, generator=gen).to(device, dt) for s, dt in zip(shapes, dtypes)]
    retain = [(0.3 * f.float() + torch.randn(s, generator=gen).to(device)).to(dt)
              for f, s, dt in zip(forget, shapes, dtypes)]
    sums = kernels.layer_sums(params, forget, retain).cpu()
    worst = 0.0
    for i, (p, f, r) in enumerate(zip(params, forget, retain)):
        p64, f64, r64 = p.double().cpu(), f.double().cpu(), r.double().cpu()
        exact = torch.stack([(p64 * p64).sum(), (f64 * f64).sum(), (r64 * r64).sum(), (f64 * r64).sum()])
        scale = torch.stack([exact[0], exact[1], exact[2], (f64 * r64).abs().sum()])
        worst = max(worst, float(((sums[i] - exact).abs() / scale.clamp_min(1e-300)).max()))
    identical = torch.equal(sums, kernels.layer_sums(params, forget, retain).cpu())
    outs = [torch.empty_like(p) for p in params]
    kernels.axpy_many(outs, params, forget, 0.37)
    update_ok = True
    for o, p, f in zip(outs, params, forget):
        ref = torch.empty_like(p)
        axpy_reference(ref, p, f, 0.37)
        update_ok &= torch.equal(o, ref)
    return {"stats_max_rel_error": worst, "stats_bit_identical": identical, "update_matches_torch": update_ok,
            "ok": worst < 1e-5 and identical and update_ok}


def copy_bandwidth(device, nbytes, repeats) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device, repeats)
    return 2 * src.numel() * 4 / seconds / 1e9  # read + written


def bench_set(name, shapes, dtype, device, repeats, gen, copy_gbs) -> dict:
    def rand(s):
        return torch.randn(s, generator=gen, dtype=torch.float32).to(device, dtype) if device.type == "cpu" else \
            torch.randn(s, dtype=dtype, device=device)

    params = [rand(s) for s in shapes]
    forget = [rand(s) for s in shapes]
    retain = [rand(s) for s in shapes]
    n = sum(p.numel() for p in params)
    bytes_read = 3 * sum(p.numel() * p.element_size() for p in params)
    names = [f"layer{i}" for i in range(len(params))]
    as_map = lambda ts: dict(zip(names, ts))  # noqa: E731
    ours = lambda: slug_fast.layer_stats(as_map(params), as_map(forget), as_map(retain))  # noqa: E731
    first, second = ours(), ours()
    identical = torch.equal(first.dot, second.dot) and torch.equal(first.param_norm, second.param_norm)
    t_ours = timed(ours, device, repeats)
    t_authors = timed(lambda: authors_loop(params, forget, retain), device, max(1, repeats // 3), warmup=1)
    t_torch = timed(lambda: torch_composition(params, forget, retain), device, repeats)
    big = max(range(len(params)), key=lambda i: params[i].numel())
    base, d = params[big], forget[big]
    out = torch.empty_like(base)
    t_update = timed(lambda: kernels.axpy_many([out], [base], [d], 0.5), device, repeats)
    t_add = timed(lambda: torch.add(base, d, alpha=0.5, out=out), device, repeats)
    update_bytes = 3 * base.numel() * base.element_size()
    row = {"set": name, "dtype": str(dtype).removeprefix("torch."), "tensors": len(params), "parameters": n,
           "backend": first.backend, "bit_identical": identical,
           "ours_ms": 1e3 * t_ours, "authors_ms": 1e3 * t_authors, "torch_ms": 1e3 * t_torch,
           "ours_GBps": bytes_read / t_ours / 1e9, "vs_authors": t_authors / t_ours, "vs_torch": t_torch / t_ours,
           "update_ms": 1e3 * t_update, "torch_add_ms": 1e3 * t_add,
           "update_GBps": update_bytes / t_update / 1e9}
    if copy_gbs:
        row["fraction_of_copy"] = row["ours_GBps"] / copy_gbs
        row["update_fraction_of_copy"] = row["update_GBps"] / copy_gbs
    del params, forget, retain
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="toy sizes (CI, no GPU needed)")
    ap.add_argument("--sets", help="comma-separated subset of the parameter sets")
    ap.add_argument("--repeats", type=int, help="timed runs per measurement (median)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sets = SMOKE_SETS if args.smoke else FULL_SETS
    if args.sets:
        sets = {k: v for k, v in sets.items() if k in args.sets.split(",")}
    repeats = args.repeats or (1 if args.smoke else 10)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)",
            "torch": torch.__version__, "triton": __import__("triton").__version__,
            "date": time.strftime("%Y-%m-%d"), "correctness": check_correctness(device, gen)}
    info["copy_GBps"] = copy_bandwidth(device, (1 << 20) if args.smoke else (4 << 30), repeats)
    info["rows"] = [bench_set(name, make(), dtype, device, repeats, gen, info["copy_GBps"])
                    for name, (make, dtype) in sets.items()]
    info["seconds"] = time.perf_counter() - t0
    print(f"{info['device']}, torch {info['torch']}, triton {info['triton']}, {info['date']}; "
          f"copy bandwidth {info['copy_GBps']:.0f} GB/s (read + write); correctness: {info['correctness']}")
    print(f"{'set':<16}{'params':>9}{'ours ms':>10}{'GB/s':>9}{'of copy':>9}{'authors ms':>12}{'x':>7}"
          f"{'torch ms':>10}{'x':>6}{'update ms':>11}{'add ms':>9}{'upd of copy':>13}  identical")
    for r in info["rows"]:
        print(f"{r['set']:<16}{r['parameters'] / 1e6:>8.1f}M{r['ours_ms']:>10.2f}{r['ours_GBps']:>9.0f}"
              f"{r.get('fraction_of_copy', 0):>9.2f}{r['authors_ms']:>12.1f}{r['vs_authors']:>7.1f}"
              f"{r['torch_ms']:>10.2f}{r['vs_torch']:>6.2f}{r['update_ms']:>11.3f}{r['torch_add_ms']:>9.3f}"
              f"{r.get('update_fraction_of_copy', 0):>13.2f}  {r['bit_identical']}")
    print(f"total {info['seconds']:.0f} s")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_bench.json"), "w") as f:
            json.dump(info, f, indent=2)
    return info


if __name__ == "__main__":
    main()
