"""SLUG machinery on a ViT-B-32: slug_fast.unlearn vs the authors' way, same data, same search.

    python bench/bench_machinery.py [--images 8] [--batches 2] [--max-evals 3] [--device cpu|cuda]

open_clip ViT-B-32 at random init (151M parameters) with synthetic image-text pairs
(random images, random token captions): forget and retain sets of `--batches` batches
of `--images` pairs. Both methods get the same batches and the same criterion (the
forget pairs' mean image-text cosine fell by 0.05), search the vision tower's front
with the same budget, and each runs in its own process, so the peak memory is its own:
peak RSS on CPU, torch.cuda.max_memory_allocated on a GPU. Prints wall time, peak
memory and their ratios; --json for machine-readable rows.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def workload(args):
    import open_clip
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = open_clip.create_model("ViT-B-32").to(device).eval()
    gen = torch.Generator().manual_seed(1)

    def batch():
        images = torch.randn(args.images, 3, 224, 224, generator=gen).to(device)
        tokens = torch.randint(1, 49400, (args.images, 77), generator=gen)
        tokens[:, 20] = 49407  # end-of-text token: the text tower pools there
        tokens[:, 21:] = 0
        return images, tokens.to(device)

    forget = [batch() for _ in range(args.batches)]
    retain = [batch() for _ in range(args.batches)]
    probe = forget[0]

    def cosine(m):
        with torch.no_grad():
            return F.cosine_similarity(m.encode_image(probe[0]), m.encode_text(probe[1])).mean().item()

    start = cosine(model)

    def criterion(m):
        value = cosine(m)
        return value < start - 0.05, {"cosine": value, "utility": -abs(value - start)}

    return model, forget, retain, criterion


def run_one(args) -> dict:
    import torch

    model, forget, retain, criterion = workload(args)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if args.method == "ours":
        import slug_fast

        result = slug_fast.unlearn(model, forget, retain, criterion, tower="vision", max_evals=args.max_evals,
                                   progress=False)
        evaluations = sum(len(c.search.trace) for c in result.candidates)
        chosen = result.layers
    else:
        from slug_fast.baselines import slug_authors

        result = slug_authors(model, forget, retain, criterion, tower="vision", max_evals=args.max_evals,
                              progress=False)
        evaluations = sum(len(s.trace) for s in result.settings)
        chosen = result.best.hyper["layers"] if result.best is not None else None
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"method": args.method, "seconds": seconds, "peak_mb": peak, "evaluations": evaluations,
            "chosen": chosen}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--max-evals", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=1, help="runs of each method (medians reported)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--method", choices=["ours", "authors"], help=argparse.SUPPRESS)  # one run, in this process
    args = ap.parse_args(argv)
    if args.method:
        print(json.dumps(run_one(args)))
        return
    runs = {"ours": [], "authors": []}
    for _ in range(args.repeats):
        for method in runs:  # interleaved
            cmd = [sys.executable, __file__, "--method", method, "--images", str(args.images), "--batches",
                   str(args.batches), "--max-evals", str(args.max_evals), "--device", args.device]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[method].append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows = [{"method": m, "seconds": statistics.median(r["seconds"] for r in rs),
             "peak_mb": statistics.median(r["peak_mb"] for r in rs), "evaluations": rs[0]["evaluations"],
             "chosen": rs[0]["chosen"]} for m, rs in runs.items()]
    ours, authors = rows
    summary = {"time_ratio": authors["seconds"] / ours["seconds"], "memory_ratio": ours["peak_mb"] / authors["peak_mb"]}
    if args.json:
        print(json.dumps({"rows": rows, **summary, "config": vars(args)}, indent=2))
        return
    unit = "max allocated MB" if args.device == "cuda" else "peak RSS MB"
    print(f"ViT-B-32 on {args.device}: {args.batches}+{args.batches} batches of {args.images} pairs, "
          f"max {args.max_evals} evaluations per front layer, {args.repeats} run(s) each")
    print(f"{'method':<10}{'seconds':>10}{unit:>20}{'evaluations':>13}  chosen")
    for r in rows:
        print(f"{r['method']:<10}{r['seconds']:>10.2f}{r['peak_mb']:>20.0f}{r['evaluations']:>13}  {r['chosen']}")
    print(f"ours takes {1 / summary['time_ratio']:.2f}x the time ({summary['time_ratio']:.2f}x less) and "
          f"{summary['memory_ratio']:.2f}x the peak memory of the authors' way")


if __name__ == "__main__":
    main()
