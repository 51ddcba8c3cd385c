"""SLUG and the strongest baselines on every digit of the demo task (one fresh process per method).

    python bench/bench_all_digits.py [--methods slug,ga,gaft]

Prints, per digit and method: the best setting's retain top-1 at forget top-1 = 0, its seconds
and the grid's seconds (the compare command's rows), then the mean per method.
"""
import argparse
import statistics

from slug_fast import digits
from slug_fast.compare import run_compare


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--methods", default="slug,ga,gaft")
    methods = ap.parse_args().methods.split(",")
    table = {}
    for name in digits.DIGIT_NAMES:
        rows = run_compare(name, methods=methods, progress=False)
        table[name] = {r["method"]: r for r in rows}
        cells = "  ".join(f"{m} {r['retain_top1']:6.2f}% {r['seconds']:.2f}s/{r['grid_seconds']:.1f}s"
                          if r["reached"] else f"{m} not reached" for m, r in table[name].items())
        print(f"{name:<6} {cells}", flush=True)
    for m in methods:
        reached = [t[m] for t in table.values() if t[m]["reached"]]
        print(f"mean {m}: retain top-1 {statistics.mean(r['retain_top1'] for r in reached):.2f}% over "
              f"{len(reached)} digits, seconds {statistics.mean(r['seconds'] for r in reached):.2f}, "
              f"grid seconds {statistics.mean(r['grid_seconds'] for r in reached):.2f}")


if __name__ == "__main__":
    main()
