"""`slug-fast compare`: SLUG and every baseline on the demo task, each in a fresh process.

Every method runs in its own Python process (`python -m slug_fast.compare --method M`),
so its peak resident memory is its own. Rows: the method at its best setting, with
`seconds` (that setting's run) and `grid_seconds` (everything a user runs to find it).
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from .baselines.training import TRAINING
from .errors import SlugError
from .files import replace_dir, write_atomic, write_json_atomic

METHODS = ("slug", "slug-authors", *TRAINING, "ssd")


def run_method(method: str, concept: str, *, epochs: int | None = None, seed: int = 0) -> dict:
    """One method on the demo task, in this process: its row (and every setting it tried)."""
    from .baselines import run_baseline
    from .demo import demo_task
    from .unlearn import unlearn

    if method not in METHODS:
        raise SlugError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    task = demo_task(concept, epochs=epochs, seed=seed, progress=False)
    t0 = time.perf_counter()
    if method == "slug":
        result = unlearn(task.model, task.forget, task.retain, task.criterion, progress=False)
        seconds = grid_seconds = time.perf_counter() - t0
        setting = {"layer": result.layers, "step": result.step}
        tried = [{"setting": {"layer": c.layers, "step": c.search.step}, "reached": c.search.reached,
                  "retain_top1": c.utility, "evaluations": len(c.search.trace)} for c in result.candidates]
        reached = True
    else:
        result = run_baseline(method, task.model, task.forget, task.retain, task.criterion, apply=True,
                              progress=False)
        seconds, grid_seconds, reached = result.seconds, result.grid_seconds, result.reached
        setting = result.best.hyper if result.best is not None else None
        if method == "slug-authors" and result.best is not None:
            setting = {"layer": result.best.hyper["layers"], "step": result.best.details["step"]}
        tried = [{"setting": s.hyper, "reached": s.reached, "retain_top1": s.metrics.get("retain_top1"),
                  "forget_top1": s.metrics.get("forget_top1"), "steps": s.steps, "seconds": s.seconds}
                 for s in result.settings]
    acc = task.accuracies()
    return {"method": method, "setting": setting, "reached": reached, "seconds": seconds,
            "grid_seconds": grid_seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "forget_top1": acc["forget_top1"], "retain_top1": acc["retain_top1"], "mia": task.mia()["loss"],
            "tried": tried}


def _in_subprocess(method: str, concept: str, epochs: int | None, seed: int) -> dict:
    cmd = [sys.executable, "-m", "slug_fast.compare", "--method", method, "--forget", concept, "--seed", str(seed)]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SlugError(f"method {method} failed: {last}")
    return json.loads(done.stdout)


def run_compare(concept: str, out: str | Path | None = None, *, methods=METHODS, epochs: int | None = None,
                seed: int = 0, progress: bool | None = None) -> list[dict]:
    """Rows for every method (each in a fresh process); with `out`, compare.json, compare.md and
    compare.png (retain accuracy vs seconds, log time axis) are written there."""
    from .demo import concept_label

    concept_label(concept)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SlugError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    out = Path(out) if out is not None else None
    if out is not None:
        from .job import check_out_dir
        check_out_dir(out)
    rows = []
    for method in methods:
        if progress is not False:
            print(f"compare: running {method} ...", file=sys.stderr, flush=True)
        rows.append(_in_subprocess(method, concept, epochs, seed))
    if out is not None:
        def write(staging: Path) -> list[str]:
            write_json_atomic(staging / "compare.json", [{k: v for k, v in r.items() if k != "tried"} for r in rows])
            write_atomic(staging / "compare.md", lambda tmp: Path(tmp).write_text(markdown(rows, concept)))
            plot(rows, staging / "compare.png", concept)
            return ["compare.png", "compare.md", "compare.json"]

        replace_dir(out, write)  # the three together: a reader sees the old set or the new one
    return rows


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    if isinstance(v, list):
        return "+".join(map(str, v))
    return str(v)


def markdown(rows: list[dict], concept: str) -> str:
    """compare.md: the best setting of each method, then every setting each method tried."""
    lines = [f"# Forgetting {concept!r}: SLUG vs baselines", "",
             "| method | best setting | seconds | grid seconds | peak RSS MB | forget top-1 | retain top-1 | MIA |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {_fmt(r['setting']) if r['reached'] else 'criterion never met'} | "
              f"{_fmt(r['seconds'])} | {_fmt(r['grid_seconds'])} | {r['peak_rss_mb']:.0f} | "
              f"{_fmt(r['forget_top1'])} | {_fmt(r['retain_top1'])} | {_fmt(r['mia'])} |" for r in rows]
    for r in rows:
        lines += ["", f"## {r['method']}: every setting tried", "",
                  "| setting | criterion met | forget top-1 | retain top-1 | steps / evaluations | seconds |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {_fmt(t['setting'])} | {'yes' if t['reached'] else 'no'} | {_fmt(t.get('forget_top1'))} | "
                  f"{_fmt(t.get('retain_top1'))} | {_fmt(t.get('steps', t.get('evaluations')))} | "
                  f"{_fmt(t.get('seconds'))} |" for t in r["tried"]]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, concept: str) -> Path:
    """Retain accuracy vs seconds (log axis): filled = the best setting's run, hollow = its whole grid."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, r in enumerate(r for r in rows if r["reached"]):
        color = f"C{i}"
        ax.scatter([r["seconds"]], [r["retain_top1"]], color=color, label=r["method"])
        ax.scatter([r["grid_seconds"]], [r["retain_top1"]], facecolors="none", edgecolors=color)
        ax.plot([r["seconds"], r["grid_seconds"]], [r["retain_top1"]] * 2, color=color, lw=0.8, alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("seconds (filled: best setting's run; hollow: its whole grid)")
    ax.set_ylabel("retain top-1 at forget top-1 = 0 (%)")
    ax.set_title(f"forgetting {concept}: retain accuracy vs time")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))


def main(argv=None) -> int:
    """One method in this process; prints its row as JSON (used by run_compare)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m slug_fast.compare")
    ap.add_argument("--method", required=True, choices=METHODS)
    ap.add_argument("--forget", default="seven")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    row = run_method(args.method, args.forget, epochs=args.epochs, seed=args.seed)
    json.dump(row, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
