"""Several digits at once (unlearn_many) against one `unlearn` call per digit, on the demo task.

    OMP_NUM_THREADS=2 python bench/bench_many.py [--sets seven,three seven,three,five ...] [--rounds 3]

For each set of digits: unlearn_many on the shipped mini-CLIP (one shared retain gradient of the
kept digits' training images), and separately one unlearn call per digit on a fresh copy of the
model with the same forget and retain batches and criterion, the two taking turns round by round.
Prints every criterion's outcome on the final model, the kept digits' held-out top-1 after
unlearn_many against each single-digit run, and the median wall times and their ratio.
"""
import argparse
import dataclasses
import json
import statistics
import time

import slug_fast
from slug_fast import digits
from slug_fast.demo import demo_many_task

SETS = ("seven,three", "seven,three,five", "seven,three,five,one,eight")


def fresh(task):
    """The task on a fresh copy of its model (the criteria's caches are per model)."""
    model = digits.build_model(0)
    model.load_state_dict(task.model.state_dict())
    return dataclasses.replace(task, model=model.eval())


def separate(task, options):
    """One unlearn per digit, each on a fresh copy of the original model: (seconds, kept top-1 of each)."""
    kept, t0 = {}, time.perf_counter()
    for concept in task.concepts:
        copy = fresh(task)
        slug_fast.unlearn(copy.model, task.forgets[concept], task.retain, copy.criterion(concept), progress=False,
                         **options)
        kept[concept] = copy.accuracies()["kept_top1"]
    return time.perf_counter() - t0, kept


def together(task, options):
    copy = fresh(task)
    t0 = time.perf_counter()
    result = slug_fast.unlearn_many(copy.model, {c: (task.forgets[c], copy.criterion(c)) for c in task.concepts},
                                    task.retain, progress=False, **options)
    return time.perf_counter() - t0, result, copy


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sets", nargs="+", default=list(SETS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--strategy", default="best", choices=("best", "deepest"))
    ap.add_argument("--max-evals", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    options = {"strategy": args.strategy, "max_evals": args.max_evals}
    rows = []
    for digit_set in args.sets:
        task = demo_many_task(digit_set)
        before = task.accuracies()
        times_many, times_apart = [], []
        for r in range(args.rounds):  # the two take turns going first
            for which in (("many", "apart") if r % 2 == 0 else ("apart", "many")):
                if which == "many":
                    seconds, result, final = together(task, options)
                    times_many.append(seconds)
                else:
                    seconds, kept_single = separate(task, options)
                    times_apart.append(seconds)
        after = final.accuracies()
        outcomes = {c: bool(final.criterion(c)(final.model)[0]) for c in task.concepts}
        row = {"digits": task.concepts, **options, "order": result.order, "criteria_met": outcomes,
               "layers": {c: result.concepts[c].edited for c in task.concepts},
               "rounds": result.rounds, "kept_top1_before": before["kept_top1"], "kept_top1_many": after["kept_top1"],
               "kept_top1_single": kept_single, "worst_single": min(kept_single.values()),
               "seconds_many": statistics.median(times_many), "seconds_apart": statistics.median(times_apart),
               "seconds_many_all": times_many, "seconds_apart_all": times_apart}
        row["ratio"] = row["seconds_many"] / row["seconds_apart"]
        rows.append(row)
        if not args.json:
            print(f"{digit_set}: criteria {outcomes}, rounds {result.rounds}; kept top-1 {before['kept_top1']:.2f} "
                  f"-> many {after['kept_top1']:.2f} (single runs {kept_single}); many {row['seconds_many']:.2f} s "
                  f"vs apart {row['seconds_apart']:.2f} s: {row['ratio']:.2f}x", flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
