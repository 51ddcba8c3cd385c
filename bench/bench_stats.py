"""layer_stats backends on a ViT-B-32-sized parameter set, side by side in one run.

    python bench/bench_stats.py [--rounds 7] [--model ViT-B-32] [--dtype float32]

Parameters: open_clip's ViT-B-32 architecture, random init (~151M parameters);
g_f and g_r: random tensors of the same shapes. Methods, timed interleaved and
reported as medians over rounds:
  authors  - per layer torch.norm(theta), torch.norm(g_f) and CosineSimilarity(g_f, g_r),
             each brought to the host with .item() (the research scripts' way)
  foreach  - torch._foreach_norm on theta, g_f, g_r plus one torch.dot per layer,
             one host transfer at the end (the best plain-torch composition)
  ours     - slug_fast.layer_stats (C++ on CPU, Triton on CUDA), including its checks
  floor    - one torch.sum over a flat buffer holding the same bytes (read bandwidth)
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import open_clip
import torch

import slug_fast


def authors_way(params, forget, retain):
    cos = torch.nn.CosineSimilarity(dim=0)
    out = {}
    for name in params:
        p_norm = torch.norm(params[name]).item()
        f_norm = torch.norm(forget[name]).item()
        alignment = abs(cos(forget[name].flatten(), retain[name].flatten()).item())
        out[name] = (f_norm / p_norm if p_norm else 0.0, alignment)
    return out


def foreach_way(params, forget, retain):
    names = list(params)
    p_norm = torch.stack(torch._foreach_norm([params[n] for n in names]))
    f_norm = torch.stack(torch._foreach_norm([forget[n] for n in names]))
    r_norm = torch.stack(torch._foreach_norm([retain[n] for n in names]))
    dot = torch.stack([torch.dot(forget[n].flatten(), retain[n].flatten()) for n in names])
    importance = f_norm / p_norm
    alignment = dot.abs() / (f_norm * r_norm)
    return torch.stack([importance, alignment]).cpu()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random init)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", action="store_true", help="print the table as JSON")
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    torch.manual_seed(0)
    model = open_clip.create_model(args.model).to(device, dtype)
    params = {n: p.detach() for n, p in model.named_parameters()}
    forget = {n: torch.randn_like(p) for n, p in params.items()}
    retain = {n: torch.randn_like(p) for n, p in params.items()}
    n_params = sum(p.numel() for p in params.values())
    bytes_read = 3 * sum(p.numel() * p.element_size() for p in params.values())
    flat = torch.ones(bytes_read // torch.empty((), dtype=dtype).element_size(), dtype=dtype, device=device)

    methods = {
        "authors": lambda: authors_way(params, forget, retain),
        "foreach": lambda: foreach_way(params, forget, retain),
        "ours": lambda: slug_fast.layer_stats(params, forget, retain),
        "floor": lambda: flat.sum().item(),
    }
    ours = slug_fast.layer_stats(params, forget, retain)
    ref = foreach_way(params, forget, retain).double()
    nonzero = ours.param_norm > 0  # zero tensors (fresh biases): ours says 0, the division says inf
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # torch's 16-bit norms come back rounded to 16 bits
    assert torch.allclose(ours.importance[nonzero], ref[0][nonzero], rtol=tol)
    assert torch.allclose(ours.alignment, ref[1], atol=tol)

    times = {m: [] for m in methods}
    for fn in methods.values():  # warm-up
        fn()
    for _ in range(args.rounds):
        for m, fn in methods.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[m].append(time.perf_counter() - t0)
    med = {m: statistics.median(t) for m, t in times.items()}
    rows = [{"method": m, "median_ms": 1e3 * med[m], "GB_per_s": bytes_read / med[m] / 1e9,
             "ours_speedup": med[m] / med["ours"]} for m in methods]
    info = {"model": args.model, "dtype": args.dtype, "device": str(device), "layers": len(params),
            "parameters": n_params, "bytes_read": bytes_read, "rounds": args.rounds,
            "threads": torch.get_num_threads(), "backend": ours.backend, "rows": rows}
    if args.json:
        print(json.dumps(info, indent=2))
        return info
    print(f"{args.model} {args.dtype} on {device}: {len(params)} tensors, {n_params / 1e6:.1f}M parameters, "
          f"{bytes_read / 1e9:.2f} GB read per call, {args.rounds} rounds, {torch.get_num_threads()} threads, "
          f"ours = {ours.backend}")
    print(f"{'method':<10}{'median ms':>12}{'GB/s':>10}{'ours is x faster':>20}")
    for r in rows:
        print(f"{r['method']:<10}{r['median_ms']:>12.1f}{r['GB_per_s']:>10.1f}{r['ours_speedup']:>20.2f}")
    return info


if __name__ == "__main__":
    main()
