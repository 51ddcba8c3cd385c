"""Memory and time of the gradient stores on open_clip models at random init, one process per run.

    python bench/bench_memory.py [--models ViT-B-32,ViT-L-14,ViT-H-14] [--dtypes fp32,bf16]
        [--modes full,chunked4,budget0.5] [--images 4] [--device cpu|cuda] [--jsonl FILE]

Models: open_clip architectures at random init ("digits": the shipped mini-CLIP), or with
--family hf transformers CLIPModels of the same shapes (HF_ARCHS; "tiny" for a smoke run).
Modes: `full`; `chunkedK` (the chunked store with K passes); `offload` (CUDA); `budgetF`
(memory_budget = F x the model's weight bytes, store auto); a `+ckpt` suffix adds
checkpointing=True (e.g. `budget0.5+ckpt`). Every run unlearns with 1 forget and 1 retain
batch of --images synthetic image-text pairs, strategy="deepest", max 3 evaluations per
layer, and a criterion that the forget pairs' mean image-text cosine fell by 0.001.

Per run (printed as it finishes, and appended to --jsonl): the peak memory above the loaded
model and data in units of the model's weight bytes (peak RSS on CPU,
torch.cuda.max_memory_allocated on CUDA; read by unlearn's own meter, which resets the
high-water mark when it starts), the predicted peak, the unlearn wall time and the
gradient phase's time, each with its ratio to the full mode's of the same model and dtype
(measured in this invocation), and the number of passes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# transformers CLIPModel configs of open_clip's architectures (vision width, layers, heads, mlp;
# text width, layers, heads, mlp; projection), for machines without open_clip (the lent GPU's)
HF_ARCHS = {
    "ViT-B-32": (768, 12, 12, 3072, 32, 512, 12, 8, 2048, 512),
    "ViT-L-14": (1024, 24, 16, 4096, 14, 768, 12, 12, 3072, 768),
    "ViT-H-14": (1280, 32, 16, 5120, 14, 1024, 24, 16, 4096, 1024),
    "ViT-bigG-14": (1664, 48, 16, 8192, 14, 1280, 32, 20, 5120, 1280),
    "tiny": (32, 2, 2, 64, 8, 32, 2, 2, 64, 16),
}


def build(name: str, dtype: str, device: str, family: str = "open_clip"):
    """A CLIP model at random init: open_clip's architecture `name` ("digits": the shipped
    mini-CLIP), or with family="hf" a transformers CLIPModel of the same shape."""
    import torch

    torch.manual_seed(0)
    if family == "hf":
        from transformers import CLIPConfig, CLIPModel

        vw, vl, vh, vm, patch, tw, tl, th, tm, proj = HF_ARCHS[name]
        cfg = CLIPConfig(vision_config=dict(hidden_size=vw, num_hidden_layers=vl, num_attention_heads=vh,
                                            intermediate_size=vm, patch_size=patch,
                                            image_size=32 if name == "tiny" else 224),
                         text_config=dict(hidden_size=tw, num_hidden_layers=tl, num_attention_heads=th,
                                          intermediate_size=tm, max_position_embeddings=77),
                         projection_dim=proj)
        with torch.device(device):
            model = CLIPModel(cfg)
    elif name == "digits":
        from slug_fast import digits

        model = digits.load_pretrained()[0]
    else:
        import open_clip

        model = open_clip.create_model(name)
    return model.to(device=device, dtype=getattr(torch, DTYPES[dtype])).eval()


def workload(model, images: int, device: str):
    """One forget and one retain batch of random image-text pairs, and a criterion on the forget batch."""
    import torch
    import torch.nn.functional as F

    import slug_fast

    adapter = slug_fast.adapters.get_adapter(model)
    dtype = next(model.parameters()).dtype
    hf = adapter.name == "hf_clip"
    if hf:
        size, vocab = model.config.vision_config.image_size, model.config.text_config.vocab_size
        context, eot = model.config.text_config.max_position_embeddings, model.config.text_config.eos_token_id
    else:
        size, vocab, context = model.visual.image_size, model.vocab_size, model.context_length
        eot = vocab - 1  # open_clip pools at the highest token id, end-of-text
    size = size if isinstance(size, (tuple, list)) else (size, size)
    gen = torch.Generator().manual_seed(1)

    def batch():
        pixels = torch.randn(images, 3, *size, generator=gen).to(device=device, dtype=dtype)
        tokens = torch.randint(3, vocab - 1, (images, context), generator=gen)
        end = min(20, context - 1)
        tokens[:, end] = eot
        tokens[:, end + 1:] = 0
        if hf:
            mask = (torch.arange(context) <= end).long().expand(images, -1)
            return {"pixel_values": pixels, "input_ids": tokens.to(device), "attention_mask": mask.to(device)}
        return pixels, tokens.to(device)

    forget, retain = [batch()], [batch()]
    probe = forget[0]

    def cosine(m):
        with torch.no_grad():
            image, text = adapter.embed(m, probe)
            return F.cosine_similarity(image.float(), text.float()).mean().item()

    start = cosine(model)

    def criterion(m):
        value = cosine(m)
        return value < start - 1e-3, {"cosine": value}

    return forget, retain, criterion


def options(mode: str, weight_bytes: int) -> dict:
    base, _, extra = mode.partition("+")
    out = {"checkpointing": extra == "ckpt"}
    if base == "full":
        out["store"] = "full"
    elif base == "offload":
        out["store"] = "offload"
    elif base.startswith("chunked"):
        out.update(store="chunked", passes=int(base[len("chunked"):]))
    elif base.startswith("budget"):
        out["memory_budget"] = int(float(base[len("budget"):]) * weight_bytes)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    return out


def run_one(args) -> dict:
    import torch

    import slug_fast

    t_build = time.perf_counter()
    model = build(args.model, args.dtype, args.device, args.family)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    forget, retain, criterion = workload(model, args.images, args.device)
    t_build = time.perf_counter() - t_build
    opts = options(args.mode, weight_bytes)
    t0 = time.perf_counter()
    result = slug_fast.unlearn(model, forget, retain, criterion, strategy="deepest", max_evals=3, apply=False,
                               progress=False, **opts)
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    mem = result.memory
    return {"model": args.model, "family": args.family, "dtype": args.dtype, "mode": args.mode, "device": args.device,
            "images": args.images, "params": sum(p.numel() for p in model.parameters()),
            "weight_bytes": weight_bytes, "store": mem.mode, "passes": mem.passes, "final_pass": mem.final_pass,
            "budget_bytes": mem.budget_bytes, "peak_bytes": mem.measured_peak_bytes, "measured_by": mem.measured_by,
            "predicted_bytes": mem.predicted_peak_bytes, "predicted_full_bytes": mem.predicted_full_bytes,
            "activation_bytes": mem.activation_bytes, "seconds": seconds,
            "gradient_seconds": result.seconds["gradients"], "build_seconds": t_build,
            "chosen": result.layers, "step": result.step}


def fmt(row: dict, full: dict | None) -> str:
    w = row["weight_bytes"]
    ratio = lambda key: f"{row[key] / full[key]:.2f}" if full else "-"  # noqa: E731
    pred = f"{row['predicted_bytes'] / w:.2f}" if row["predicted_bytes"] is not None else "-"
    act = row["activation_bytes"]
    beyond = f"{(row['peak_bytes'] - act) / w:.3f}" if act is not None else "-"
    return (f"{row['model']:<12}{row['dtype']:<6}{row['mode']:<16}{row['store']:<9}{row['passes']:>6}"
            f"{row['peak_bytes'] / w:>9.2f}{pred:>9}{beyond:>9}{row['seconds']:>9.1f}{ratio('seconds'):>7}"
            f"{row['gradient_seconds']:>9.1f}{ratio('gradient_seconds'):>7}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="ViT-B-32,ViT-L-14,ViT-H-14")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--modes", default="full,chunked4,budget0.5")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--family", choices=["open_clip", "hf"], default="open_clip",
                    help="open_clip models, or transformers CLIPModels of the same shapes (default open_clip)")
    ap.add_argument("--jsonl", help="append each run's row to this file as it finishes")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of every mode (medians of the time ratios)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # one run, in this process
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args)))
        return
    print("peak and predicted: bytes above the loaded model / the model's weight bytes; -act: the peak less one "
          "batch's activations (as the probe measured them), same unit; x full: ratio to the full mode of the same "
          "model and dtype", flush=True)
    print(f"{'model':<12}{'dtype':<6}{'mode':<16}{'store':<9}{'passes':>6}{'peak':>9}{'pred':>9}{'-act':>9}"
          f"{'wall s':>9}{'x full':>7}{'grad s':>9}{'x full':>7}", flush=True)
    ratios: dict[tuple, list[float]] = {}
    for model in args.models.split(","):
        for dtype in args.dtypes.split(","):
            for repeat in range(args.repeats):  # modes interleaved, round by round
                full = None
                for mode in args.modes.split(","):
                    cmd = [sys.executable, __file__, "--one", "--model", model, "--dtype", dtype, "--mode", mode,
                           "--images", str(args.images), "--device", args.device, "--family", args.family]
                    done = subprocess.run(cmd, capture_output=True, text=True)
                    if done.returncode != 0:
                        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
                        print(f"{model:<12}{dtype:<6}{mode:<16}failed: {tail}", flush=True)
                        continue
                    row = {**json.loads(done.stdout.strip().splitlines()[-1]), "repeat": repeat}
                    if mode == "full":
                        full = row
                    elif full is not None:
                        ratios.setdefault((model, dtype, mode), []).append(row["seconds"] / full["seconds"])
                    print(fmt(row, full if mode != "full" else None), flush=True)
                    if args.jsonl:
                        with open(args.jsonl, "a") as f:
                            f.write(json.dumps(row) + "\n")
    if args.repeats > 1:
        print("median wall-time ratio to full over the rounds:", flush=True)
        for (model, dtype, mode), values in ratios.items():
            print(f"  {model} {dtype} {mode}: {statistics.median(values):.2f} "
                  f"({', '.join(f'{v:.2f}' for v in values)})", flush=True)


if __name__ == "__main__":
    main()
