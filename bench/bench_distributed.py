"""Data-parallel SLUG on several CPU processes (torch.distributed, gloo): time, memory, bytes sent.

    python bench/bench_distributed.py [--model ViT-B-32] [--dtype fp32] [--batches 6] [--images 2]
        [--worlds 1,2,3] [--partitions owner,replicated] [--repeats 1] [--cores N] [--jsonl FILE]
    python bench/bench_distributed.py --project [--gpus 8,64,512] [--forget-batches 1000]
        [--retain-batches 1000]

Models: an open_clip architecture at random init (built from its config, no download), or
one of the small configs in ARCHS ("tiny" for a smoke run). Data: --batches forget and
--batches retain batches of --images random image-token pairs, the same on every process
(seeded); each rank unlearns with its own share (slug_fast.data.shard), so every process
count sees the same global batches. The criterion, identical on every rank: the forget loss
of the first forget batch rose by 1e-3 (strategy="deepest", at most --max-evals evaluations
per layer, apply=False).

Each (process count, partition) is one launch of fresh processes (torchrun --standalone for
more than one, a plain interpreter for one), repeated --repeats times; --cores are shared
out (each process gets cores // world threads, at least one). Every rank writes one row
(appended to --jsonl with the launch's fields): its unlearn wall time, gradient-phase time,
measured_peak_bytes (peak RSS above the start of unlearn), gradient_peak_bytes (the store's
own count), res.ranks["sent"], the chosen layers and step. Printed: median wall times and
their ratio to one process; per-rank memory beside the single process's and beside
slug_fast.distributed.predicted_cost; the goal owner gradient bytes <= single / N + the
largest layer; bytes sent beside predicted_cost's (reduce and all_reduce must match; the
broadcast of the chosen directions and the pickled objects are not predicted); and whether
every launch chose the same layers and step (1e-6 relative).

--project prints predicted_cost for ViT-bigG-14 and a LLaVA-1.5-7B-shaped VLM in bf16 (both
built on the meta device: no weight is allocated) at --gpus ranks, forget and retain batches
split evenly: per-rank gradient bytes and payload bytes, owner vs replicated, with the wire
bytes of the usual algorithms (ring all-reduce 2(N-1)/N x the payload per rank; reduce and
broadcast about 1x).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# small open_clip CLIP configs beside open_clip's own architectures (which are built from their configs)
ARCHS = {
    "tiny": dict(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
                 text_cfg=dict(context_length=16, vocab_size=512, width=64, heads=2, layers=2)),
    "small": dict(embed_dim=256, vision_cfg=dict(image_size=96, patch_size=16, width=384, layers=6, head_width=64),
                  text_cfg=dict(context_length=32, vocab_size=4096, width=256, heads=4, layers=6)),
}
MiB = 2 ** 20
THRESHOLD = 1e-3  # the criterion: the probe batch's forget loss rose by this much


# ----------------------------------------------------------------------------- one rank

def build(name: str, dtype: str = "fp32", device: str = "cpu"):
    """An open_clip CLIP at random init (seeded: every rank builds the same weights) from
    ARCHS[name] or open_clip's config of `name`; device="meta" allocates nothing."""
    import open_clip
    import torch
    from open_clip.model import CLIP

    cfg = ARCHS.get(name) or open_clip.get_model_config(name)
    if cfg is None:
        raise SystemExit(f"unknown model {name!r}: one of {sorted(ARCHS)} or an open_clip architecture")
    torch.manual_seed(0)
    with torch.device(device):
        model = CLIP(**cfg)
    return model.to(dtype=getattr(torch, DTYPES[dtype])).eval()


def eligible_layers(model) -> list[tuple[str, int, str]]:
    """(name, numel, dtype) of the parameters unlearn differentiates, in its order: the
    adapter's parameters (all that require grad when it names none) that it finds eligible."""
    import slug_fast
    from slug_fast.gradients import resolve_params

    adapter = slug_fast.adapters.get_adapter(model)
    named = dict(adapter.target.named_parameters())
    names = resolve_params(adapter.target, adapter.param_names())
    return [(n, named[n].numel(), str(named[n].dtype).removeprefix("torch."))
            for n in names if adapter.eligible(n, tuple(named[n].shape))]


def batches(model, count: int, images: int, seed: int) -> list:
    """`count` batches of `images` random (pixels, tokens) pairs for an open_clip model."""
    import torch

    dtype = next(model.parameters()).dtype
    size = model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    vocab, context = model.vocab_size, model.context_length
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        pixels = torch.randn(images, 3, *size, generator=gen).to(dtype)
        tokens = torch.randint(1, vocab - 1, (images, context), generator=gen)
        end = min(12, context - 1)
        tokens[:, end] = vocab - 1  # open_clip pools at the highest token id (end of text)
        tokens[:, end + 1:] = 0
        out.append((pixels, tokens))
    return out


def worker(args) -> None:
    """One rank of a launch (torchrun sets RANK / WORLD_SIZE; absent: a single process)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    import slug_fast
    from slug_fast.data import shard

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(args.threads)
    if world > 1:
        dist.init_process_group("gloo", timeout=timedelta(minutes=20))
    rank = dist.get_rank() if world > 1 else 0
    model = build(args.model, args.dtype)
    forget, retain = batches(model, args.batches, args.images, 1), batches(model, args.batches, args.images, 2)
    adapter = slug_fast.adapters.get_adapter(model)
    probe = forget[0]  # the same batch on every rank

    def forget_loss(m) -> float:
        with torch.no_grad():
            return float(adapter.forget_loss(m, probe))

    start = forget_loss(model)

    def criterion(m):
        value = forget_loss(m)
        return value > start + THRESHOLD, {"forget_loss": value}

    mine_f, mine_r = shard(forget, rank, world), shard(retain, rank, world)
    if world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    res = slug_fast.unlearn(model, mine_f, mine_r, criterion, strategy="deepest", max_evals=args.max_evals,
                            apply=False, progress=False, partition=args.partition if world > 1 else "owner")
    seconds = time.perf_counter() - t0
    ranks = res.ranks or {"rank": 0, "world": 1, "partition": "single",
                          "batches": {"forget": len(forget), "retain": len(retain)}, "sent": {}}
    row = {"rank": rank, "world": world, "partition": ranks["partition"], "model": args.model,
           "dtype": args.dtype, "images": args.images, "threads": args.threads,
           "mine": {"forget": len(mine_f), "retain": len(mine_r)}, "batches": ranks["batches"],
           "sent": ranks["sent"], "seconds": seconds, "gradient_seconds": res.seconds["gradients"],
           "measured_peak_bytes": res.memory.measured_peak_bytes, "measured_by": res.memory.measured_by,
           "gradient_peak_bytes": res.memory.gradient_peak_bytes, "weight_bytes": res.memory.weight_bytes,
           "layers": res.layers, "step": res.step,
           "eligible": [[numel, dtype] for _, numel, dtype in eligible_layers(model)]}
    with open(f"{args.out}.rank{rank}.json", "w") as f:
        json.dump(row, f)
    if world > 1:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- launches

def launch(args, world: int, partition: str, prefix: str) -> tuple[list[dict] | None, str]:
    """Run one configuration in fresh processes; (rows by rank, or None, and an error tail)."""
    threads = max(1, args.cores // world)
    worker_args = [os.path.abspath(__file__), "--worker", "--model", args.model, "--dtype", args.dtype,
                   "--batches", str(args.batches), "--images", str(args.images), "--max-evals", str(args.max_evals),
                   "--partition", partition, "--threads", str(threads), "--out", prefix]
    if world == 1:
        cmd = [sys.executable, *worker_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
               *worker_args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    paths = [f"{prefix}.rank{r}.json" for r in range(world)]
    if done.returncode != 0 or not all(os.path.exists(p) for p in paths):
        lines = [ln for ln in done.stderr.strip().splitlines() if "Error" in ln or "error" in ln]
        return None, (lines or done.stderr.strip().splitlines() or ["?"])[-1]
    rows = []
    for p in paths:
        with open(p) as f:
            rows.append(json.load(f))
    return rows, ""


def predicted(rows: list[dict]) -> list[dict]:
    """predicted_cost for a launch's rows: its layers, world, partition and rounds (the most
    batches any rank held of each set)."""
    import torch

    from slug_fast.distributed import predicted_cost

    first = rows[0]
    layers = [(numel, getattr(torch, dtype)) for numel, dtype in first["eligible"]]
    rounds = {s: max(r["mine"][s] for r in rows) for s in ("forget", "retain")}
    partition = first["partition"] if first["world"] > 1 else "owner"  # one rank: the full store
    return predicted_cost(layers, first["world"], rounds, partition)


def largest_layer_bytes(row: dict) -> int:
    """The largest eligible layer's gradient in the dtype it is summed in (float32 for 16-bit)."""
    import torch

    from slug_fast.gradients import sum_dtype

    return max(numel * torch.empty((), dtype=sum_dtype(getattr(torch, d))).element_size()
               for numel, d in row["eligible"])


def same_decision(a: dict, b: dict) -> bool:
    return a["layers"] == b["layers"] and abs(a["step"] - b["step"]) <= 1e-6 * abs(b["step"])


def exact(rows: list[dict]) -> bool:
    """Whether predicted_cost's gradient bytes are what the stores count, not only a bound:
    float32/float64 layers (a 16-bit gradient is added beside its float32 sum, smaller than
    the float32 layer the prediction allows in flight) and at least two batches of each set
    on every rank (every layer's gradient then arrives while all the sums are held)."""
    wide = all(d in ("float32", "float64") for _, d in rows[0]["eligible"])
    return wide and all(min(r["mine"].values()) >= 2 for r in rows)


def held_by_all(row: dict, world: int) -> int:
    """The owner ranks' gradient peaks added up when each layer belongs to exactly one rank:
    every layer's mean and sum once, and one layer in flight on each rank (exact() runs).
    Independent of the partition that predicted_cost and the store share."""
    import torch

    from slug_fast.gradients import sum_dtype

    total = 0
    for numel, d in row["eligible"]:
        dtype = getattr(torch, d)
        total += numel * (torch.empty((), dtype=dtype).element_size()
                          + torch.empty((), dtype=sum_dtype(dtype)).element_size())
    return total + world * largest_layer_bytes(row)


def check(runs: dict[tuple[int, str], list[list[dict]]]) -> list[str]:
    """What the rows break of the contract: every rank wrote a row; every launch chose the
    single process's layers and step (1e-6 relative); each rank's reduce and all_reduce
    payloads equal predicted_cost's; each rank's gradient peak is at most predicted_cost's
    (equal where exact()); each owner rank's is at most the single process's / N + the
    largest layer; and where exact(), the owner ranks' peaks add up to held_by_all (every
    layer kept by one rank: a layer kept twice or by none shows)."""
    problems = []
    single = runs.get((1, "single"))
    ref = single[0][0] if single else None
    for (world, partition), launches in runs.items():
        for rows in launches:
            what = f"{world} {partition}"
            if sorted(r["rank"] for r in rows) != list(range(world)):
                problems.append(f"{what}: rows for ranks {sorted(r['rank'] for r in rows)}")
                continue
            if ref is not None:
                problems += [f"{what} rank {r['rank']}: chose {r['layers']} step {r['step']!r}, one process "
                             f"{ref['layers']} step {ref['step']!r}" for r in rows if not same_decision(r, ref)]
            pred, tight = predicted(rows), exact(rows)
            for r, p in zip(rows, pred):
                for kind in ("reduce", "all_reduce"):
                    if world > 1 and r["sent"].get(kind, 0) != p["sent"].get(kind, 0):
                        problems.append(f"{what} rank {r['rank']}: sent {kind} {r['sent'].get(kind, 0)} bytes, "
                                        f"predicted {p['sent'].get(kind, 0)}")
                g = r["gradient_peak_bytes"]
                if g > p["gradient_bytes"] or (tight and g != p["gradient_bytes"]):
                    problems.append(f"{what} rank {r['rank']}: gradient peak {g} bytes, predicted "
                                    f"{p['gradient_bytes']}{'' if tight else ' at most'}")
            if partition != "owner":
                continue
            if ref is not None:
                bound = ref["gradient_peak_bytes"] / world + largest_layer_bytes(rows[0])
                problems += [f"{what} rank {r['rank']}: gradient peak {r['gradient_peak_bytes']} over one "
                             f"process's / N + the largest layer = {bound:.0f}"
                             for r in rows if r["gradient_peak_bytes"] > bound]
            total = sum(r["gradient_peak_bytes"] for r in rows)
            if tight and total != held_by_all(rows[0], world):
                problems.append(f"{what}: the ranks' gradient peaks add up to {total}, not "
                                f"{held_by_all(rows[0], world)} (every layer's mean and sum once, a layer in "
                                "flight per rank)")
    return problems


def report(runs: dict[tuple[int, str], list[list[dict]]]) -> None:
    """The time, memory, communication and decision tables of the collected rows."""
    single = runs.get((1, "single"))

    def wall(rows):  # a launch's time: its slowest rank (they finish together)
        return max(r["seconds"] for r in rows)

    print("\nwall time (unlearn call, slowest rank; median over repeats), and its ratio to one process")
    print(f"{'procs':>5} {'partition':<11}{'threads':>8}{'wall s':>9}{'x 1':>7}{'grad s':>9}{'x 1':>7}  runs")
    base = (statistics.median(wall(x) for x in single), statistics.median(
        max(r["gradient_seconds"] for r in x) for x in single)) if single else None
    for (world, partition), launches in runs.items():
        w = statistics.median(wall(x) for x in launches)
        g = statistics.median(max(r["gradient_seconds"] for r in x) for x in launches)
        rw = f"{w / base[0]:.2f}" if base else "-"
        rg = f"{g / base[1]:.2f}" if base else "-"
        print(f"{world:>5} {partition:<11}{launches[0][0]['threads']:>8}{w:>9.2f}{rw:>7}{g:>9.2f}{rg:>7}  "
              f"{', '.join(f'{wall(x):.2f}' for x in launches)}")

    ref = single[0][0] if single else None
    print("\nper-rank memory, MiB (first repeat): measured = peak RSS above the start of unlearn; grad = the store's "
          "gradient_peak_bytes; pred = predicted_cost's gradient_bytes; x1 = ratio to one process's; bound = one "
          "process's grad / N + the largest layer (float32)")
    print(f"{'procs':>5} {'partition':<11}{'rank':>5}{'measured':>10}{'x1':>6}{'grad':>9}{'pred':>9}{'x1':>7}"
          f"{'bound':>9}  goal")
    for (world, partition), launches in runs.items():
        rows = launches[0]
        for r, p in zip(rows, predicted(rows)):
            g = r["gradient_peak_bytes"]
            mx = f"{r['measured_peak_bytes'] / ref['measured_peak_bytes']:.2f}" if ref else "-"
            gx = f"{g / ref['gradient_peak_bytes']:.3f}" if ref else "-"
            bound = ref["gradient_peak_bytes"] / world + largest_layer_bytes(r) if ref and world > 1 else None
            goal = "-" if bound is None or partition != "owner" else ("ok" if g <= bound else "MISSED")
            bs = f"{bound / MiB:.1f}" if bound is not None else "-"
            print(f"{world:>5} {partition:<11}{r['rank']:>5}{r['measured_peak_bytes'] / MiB:>10.1f}{mx:>6}"
                  f"{g / MiB:>9.1f}{p['gradient_bytes'] / MiB:>9.1f}{gx:>7}{bs:>9}  {goal}")

    print("\nbytes each rank handed to collectives (payload, res.ranks['sent']) beside predicted_cost's")
    print(f"{'procs':>5} {'partition':<11}{'rank':>5}{'reduce':>15}{'predicted':>15}{'all_reduce':>15}"
          f"{'predicted':>15}{'broadcast':>12}{'objects':>9}  match")
    for (world, partition), launches in runs.items():
        if world == 1:
            continue
        rows = launches[0]
        for r, p in zip(rows, predicted(rows)):
            s, q = r["sent"], p["sent"]
            ok = all(s.get(k, 0) == q.get(k, 0) for k in ("reduce", "all_reduce"))
            print(f"{world:>5} {partition:<11}{r['rank']:>5}{s.get('reduce', 0):>15,}{q.get('reduce', 0):>15,}"
                  f"{s.get('all_reduce', 0):>15,}{q.get('all_reduce', 0):>15,}{s.get('broadcast', 0):>12,}"
                  f"{s.get('objects', 0):>9,}  {'yes' if ok else 'NO'}")

    print("\nchosen layers and step (rank 0, every repeat)")
    for (world, partition), launches in runs.items():
        steps = ", ".join(f"{x[0]['step']:.9g}" for x in launches)
        print(f"{world:>5} {partition:<11}{'+'.join(launches[0][0]['layers'])}  step {steps}")


# ----------------------------------------------------------------------------- projection

def llava_7b():
    """A LLaVA-1.5-7B-shaped LlavaForConditionalGeneration on the meta device: LLaMA-7B (hidden
    4096, 32 layers, intermediate 11008, vocab 32000) and a CLIP ViT-L/14-336 vision tower."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                       intermediate_size=4096, image_size=336, patch_size=14, projection_dim=768),
        text_config=LlamaConfig(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, vocab_size=32000,
                                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
        image_token_index=32000)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    return model.to(torch.bfloat16)


def project_models() -> dict[str, list[tuple[int, str]]]:
    """Eligible (numel, dtype) lists of the projected models, in unlearn's order."""
    import slug_fast

    out = {"ViT-bigG-14 bf16": [(n, d) for _, n, d in eligible_layers(build("ViT-bigG-14", "bf16", "meta"))]}
    llava = llava_7b()
    # what SLUG differentiates on LLaVA (mode="vlm"): the vision tower's used layers
    out["LLaVA-7B bf16, vision tower (vlm mode)"] = [(n, d) for _, n, d in eligible_layers(llava)]
    # every tensor of the VLM its adapter finds eligible, as when params= names the language model too
    eligible = slug_fast.adapters.get_adapter(llava).eligible
    out["LLaVA-7B bf16, whole model"] = [(p.numel(), str(p.dtype).removeprefix("torch."))
                                         for name, p in llava.named_parameters() if eligible(name, tuple(p.shape))]
    return out


def project(gpus: list[int], forget: int, retain: int) -> list[dict]:
    """predicted_cost of each projected model at each rank count (batches split evenly:
    rounds = ceil(batches / N) per set), with the wire bytes per rank of the usual algorithms."""
    import torch

    from slug_fast.distributed import predicted_cost

    rows = []
    for name, layers in project_models().items():
        typed = [(n, getattr(torch, d)) for n, d in layers]
        largest = max(n * 4 for n, _ in layers)  # float32 sums, whatever the layer's dtype
        single = predicted_cost(typed, 1, {"forget": forget, "retain": retain})[0]["gradient_bytes"]
        for n in gpus:
            rounds = {"forget": math.ceil(forget / n), "retain": math.ceil(retain / n)}
            for partition in ("owner", "replicated"):
                cost = predicted_cost(typed, n, rounds, partition)
                held = [c["gradient_bytes"] for c in cost]
                sent = max((c["sent"] for c in cost), key=lambda s: sum(s.values()))
                ring = 2 * (n - 1) / n
                rows.append({"model": name, "gpus": n, "partition": partition, "rounds": rounds,
                             "params": sum(x for x, _ in layers), "layers": len(layers), "largest_bytes": largest,
                             "single_gradient_bytes": single, "bound": single / n + largest,
                             "gradient_bytes_max": max(held), "gradient_bytes_min": min(held),
                             "reduce": sent.get("reduce", 0), "all_reduce": sent.get("all_reduce", 0),
                             "wire": sent.get("reduce", 0) + ring * sent.get("all_reduce", 0)})
    return rows


def human(nbytes: float) -> str:
    for unit, size in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if nbytes >= size:
            return f"{nbytes / size:.3g} {unit}" if nbytes < 100 * size else f"{nbytes / size:.0f} {unit}"
    return f"{nbytes:.0f} B"


def print_projection(rows: list[dict], forget: int, retain: int) -> None:
    print(f"predicted_cost per rank: {forget} forget + {retain} retain batches split evenly over N ranks (rounds = "
          "ceil(batches / N) per set). grad: the most gradient bytes a rank holds (max and min over ranks); bound: "
          "one process's / N + the largest layer (float32); payload: bytes handed to reduce / all_reduce (the "
          "chosen directions' broadcast not included); wire: reduce x 1 + all_reduce x 2(N-1)/N (ring)")
    last = None
    for r in rows:
        if r["model"] != last:
            last = r["model"]
            print(f"\n{last}: {r['layers']} eligible layers, {r['params'] / 1e9:.3f} B params, one process "
                  f"{human(r['single_gradient_bytes'])} of gradients, largest layer {human(r['largest_bytes'])}")
            print(f"{'N':>5} {'partition':<11}{'rounds':>7}{'grad max':>11}{'grad min':>11}{'bound':>11}"
                  f"{'reduce':>11}{'all_reduce':>12}{'wire':>11}")
        over = "" if r["partition"] != "owner" or r["gradient_bytes_max"] <= r["bound"] else " over bound"
        print(f"{r['gpus']:>5} {r['partition']:<11}{r['rounds']['forget'] + r['rounds']['retain']:>7}"
              f"{human(r['gradient_bytes_max']):>11}{human(r['gradient_bytes_min']):>11}{human(r['bound']):>11}"
              f"{human(r['reduce']):>11}{human(r['all_reduce']):>12}{human(r['wire']):>11}{over}")


# ----------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32", help=f"an open_clip architecture or one of {sorted(ARCHS)}")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--batches", type=int, default=6, help="forget batches, and as many retain batches (global)")
    ap.add_argument("--images", type=int, default=2, help="image-text pairs per batch")
    ap.add_argument("--max-evals", type=int, default=3)
    ap.add_argument("--worlds", default="1,2,3", help="process counts to run (1: the single-process reference)")
    ap.add_argument("--partitions", default="owner,replicated")
    ap.add_argument("--repeats", type=int, default=1, help="launches of every configuration (medians of the times)")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores the processes share")
    ap.add_argument("--jsonl", help="append every rank's row to this file")
    ap.add_argument("--project", action="store_true", help="print the predicted_cost projection and exit")
    ap.add_argument("--gpus", default="8,64,512")
    ap.add_argument("--forget-batches", type=int, default=1000)
    ap.add_argument("--retain-batches", type=int, default=1000)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one rank, in this process
    ap.add_argument("--partition", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return
    if args.project:
        rows = project([int(n) for n in args.gpus.split(",")], args.forget_batches, args.retain_batches)
        print_projection(rows, args.forget_batches, args.retain_batches)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        return
    worlds = [int(w) for w in args.worlds.split(",")]
    configs = [(w, "single") for w in worlds if w == 1] + \
        [(w, p) for w in worlds if w > 1 for p in args.partitions.split(",")]
    print(f"{args.model} {args.dtype} at random init, {args.batches} forget + {args.batches} retain batches of "
          f"{args.images} pairs, {args.cores} cores shared, gloo", flush=True)
    runs: dict[tuple[int, str], list[list[dict]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):  # configurations interleaved, round by round
            for world, partition in configs:
                t0 = time.perf_counter()
                rows, error = launch(args, world, partition, os.path.join(tmp, f"{world}-{partition}-{repeat}"))
                if rows is None:
                    print(f"{world} processes, {partition}: failed: {error}", flush=True)
                    continue
                print(f"{world} processes, {partition}, repeat {repeat}: {max(r['seconds'] for r in rows):.2f} s "
                      f"in unlearn ({time.perf_counter() - t0:.1f} s launched)", flush=True)
                runs.setdefault((world, partition), []).append(rows)
                if args.jsonl:
                    with open(args.jsonl, "a") as f:
                        f.writelines(json.dumps({**r, "repeat": repeat}) + "\n" for r in rows)
    if not runs:
        raise SystemExit("every launch failed")
    report(runs)
    problems = check(runs)
    print("\nchecks: " + ("all hold" if not problems else f"{len(problems)} failed"))
    for p in problems:
        print(f"  {p}")


if __name__ == "__main__":
    main()
