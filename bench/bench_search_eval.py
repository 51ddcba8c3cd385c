"""One step-search evaluation with caching vs a full evaluation, on an open_clip ViT-B-32.

    OMP_NUM_THREADS=1 python bench/bench_search_eval.py [--rounds 3] [--images 64] [--layers TEXT ...] [--demo]

Model: open_clip ViT-B-32 at random init (no weights needed). Criterion: the paper's zero-shot
identity test (slug_fast.eval.concept_criterion): concept top-1/top-5 among 10 class names with
3 templates, on random images. For each edited layer, rounds interleave:

- full: the criterion with no caches at all (every image and every class prompt encoded);
- cached: inside `upstream_replay(model, edit)`, at a new step, after one recording
  evaluation: concept_criterion's TowerCache keeps the other tower's features, the blocks
  upstream of the edit are replayed; "exact" is bit-identical to a plain evaluation, "linear"
  also caches the edited Linear's products (equal within float32 rounding);
- first: the recording evaluation of that context (what the search pays once per layer).

Medians over rounds; the goal: cached / full <= 0.25 for layers in the last third of a tower.
"linear / exact": the median over rounds of cached linear / cached exact, the two modes taking
turns to go first; `unlearn(cache="linear")` is worth its rounding where it is <= 0.9.
`--layers` keeps the edited tensors whose name contains one of the texts.
`--demo` times the built-in demo's criterion (DemoTask.criterion, which encodes the class prompts
on every call) plainly, under upstream_replay, and as a TowerCache classifier under it.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from slug_fast.adapters import get_adapter
from slug_fast.edit import LayerEdit
from slug_fast.eval import concept_criterion
from slug_fast.eval.zero_shot import ZeroShotClassifier
from slug_fast.replay import upstream_replay

CLASSES = ["Elon Musk", "Taylor Swift", "Jeff Bezos", "Mark Zuckerberg", "Barack Obama", "Lionel Messi",
           "Serena Williams", "Emma Watson", "Keanu Reeves", "Oprah Winfrey"]
TEMPLATES = ("a photo of {}.", "a portrait of {}.", "an image of {}.")
CONCEPT = "Elon Musk"
LAYERS = [  # (tensor, its forward is a Linear), vision resblocks 8-11 of 12 and the text tower
    ("visual.transformer.resblocks.8.mlp.c_fc.weight", True),
    ("visual.transformer.resblocks.9.attn.out_proj.weight", False),
    ("visual.transformer.resblocks.10.mlp.c_proj.weight", True),
    ("visual.transformer.resblocks.11.attn.in_proj_weight", False),
    ("transformer.resblocks.10.mlp.c_proj.weight", True),
]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench_vit(rounds: int, n_images: int, only=None) -> list[dict]:
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32").eval()
    adapter = get_adapter(model, tokenizer=open_clip.get_tokenizer("ViT-B-32"))
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(n_images, 3, 224, 224, generator=gen)
    labels = torch.arange(n_images) % len(CLASSES)
    params = dict(model.named_parameters())

    def full():  # no caches at all: a fresh classifier encodes the prompts, every image is encoded
        return ZeroShotClassifier(adapter, CLASSES, TEMPLATES).concept_accuracy(pixels, labels, CONCEPT, (1, 5))

    rows = []
    for name, is_linear in LAYERS:
        if only and not any(o in name for o in only):
            continue
        p = params[name]
        d = torch.randn(p.shape, generator=gen)
        d *= p.detach().norm() / d.norm()
        criterion = concept_criterion(adapter, pixels, labels, CLASSES, CONCEPT, TEMPLATES, k=5)
        modes = ["exact", "linear"] if is_linear else ["exact"]
        times = {"full": [], **{f"cached_{m}": [] for m in modes}, **{f"first_{m}": [] for m in modes}}
        with LayerEdit(model, {name: d}) as edit:
            for r in range(rounds):
                edit.step(0.01 * (r + 1))
                t, want = timed(full)
                times["full"].append(t)
                for mode in modes if r % 2 == 0 else modes[::-1]:  # alternate which mode goes first
                    with upstream_replay(model, edit, linear=mode == "linear"):
                        edit.step(0.02 * (r + 1))
                        times[f"first_{mode}"].append(timed(lambda: criterion(model))[0])
                        edit.step(0.01 * (r + 1))
                        t, (_, got) = timed(lambda: criterion(model))
                        times[f"cached_{mode}"].append(t)
                    same = all(got[k] == want[k] for k in want)
                    assert same or mode == "linear", (got, want)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"layer": name, **{k: round(v, 3) for k, v in med.items()}}
        for mode in modes:
            row[f"ratio_{mode}"] = round(med[f"cached_{mode}"] / med["full"], 3)
            row[f"first_ratio_{mode}"] = round(med[f"first_{mode}"] / med["full"], 3)
        if "linear" in modes:  # < 0.9: the linear cache saves at least 10% of a cached evaluation
            row["linear_vs_exact"] = round(statistics.median(
                a / b for a, b in zip(times["cached_linear"], times["cached_exact"])), 3)
        rows.append(row)
        print(row, flush=True)
    return rows


def bench_demo(rounds: int) -> dict:
    """DemoTask.criterion as it is vs under replay vs a TowerCache classifier under replay."""
    from slug_fast import digits
    from slug_fast.demo import demo_task

    task = demo_task("seven")
    model, data = task.model, task.data
    adapter = get_adapter(model, tokenizer=digits.tokenize)
    classifier = ZeroShotClassifier(adapter, list(digits.DIGIT_NAMES), digits.TEMPLATES)
    test = data.test_images

    def cached_criterion(m):
        hits = classifier.hits(data.test_labels, (1, 5), features=adapter.image_features(test))
        is_f = data.test_labels == task.label
        pct = lambda h: round(100.0 * h.double().mean().item(), 4)  # noqa: E731
        acc = {"forget_top1": pct(hits[1][is_f]), "forget_top5": pct(hits[5][is_f]),
               "retain_top1": pct(hits[1][~is_f]), "retain_top5": pct(hits[5][~is_f])}
        return acc["forget_top1"] == 0.0, {**acc, "utility": acc["retain_top1"]}

    name = "visual.transformer.resblocks.1.mlp.c_proj.weight"
    p = dict(model.named_parameters())[name]
    d = torch.randn(p.shape, generator=torch.Generator().manual_seed(1))
    d *= p.detach().norm() / d.norm()
    times = {"plain": [], "replay": [], "towercache+replay": []}
    with LayerEdit(model, {name: d}) as edit:
        for r in range(rounds * 5):
            step = 0.05 * (r + 1)
            edit.step(step)
            t, want = timed(lambda: task.criterion(model))
            times["plain"].append(t)
            for key, crit in (("replay", task.criterion), ("towercache+replay", cached_criterion)):
                with upstream_replay(model, edit):
                    edit.step(step / 2)
                    crit(model)  # the recording evaluation
                    edit.step(step)
                    t, got = timed(lambda: crit(model))
                times[key].append(t)
                assert got == want, (key, got, want)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    row = {f"{k}_ms": round(v, 2) for k, v in med.items()}
    row.update({f"ratio_{k}": round(v / med["plain"], 3) for k, v in med.items() if k != "plain"})
    print({"demo_criterion": name, **row}, flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--demo", action="store_true", help="also time the demo's criterion")
    ap.add_argument("--skip-vit", action="store_true")
    ap.add_argument("--layers", nargs="+", metavar="TEXT", help="only the edited tensors whose name contains one")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)", flush=True)
    rows = [] if args.skip_vit else bench_vit(args.rounds, args.images, args.layers)
    if rows:
        print("\n| layer | full s | cached exact s | ratio | cached linear s | ratio | linear / exact | "
              "first eval / full |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['layer']} | {r['full']} | {r['cached_exact']} | {r['ratio_exact']} | "
                  f"{r.get('cached_linear', '-')} | {r.get('ratio_linear', '-')} | {r.get('linear_vs_exact', '-')} | "
                  f"{r['first_ratio_exact']} |")
    if args.demo:
        bench_demo(args.rounds)


if __name__ == "__main__":
    main()
