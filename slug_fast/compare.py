"""`slug-fast compare`: SLUG and every baseline on the demo task or on a user's CLIP model and
data, each in a fresh process.

Every method runs in its own Python process (`python -m slug_fast.compare --method M`),
so its peak resident memory is its own. Rows: the method at its best setting, with
`seconds` (that setting's run) and `grid_seconds` (everything a user runs to find it).
On a user's model (`run_compare_model`) the rows hold the columns of the paper's Table 1
(arXiv 2407.11867), measured by slug_fast.eval.table_scores as `slug-fast eval` does, and a
first row "original" scores the model before any edit.
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .baselines.training import TRAINING
from .errors import SlugError
from .files import replace_dir, write_atomic, write_json_atomic

METHODS = ("slug", "slug-authors", *TRAINING, "ssd")


def run_method(method: str, concept: str, *, epochs: int | None = None, seed: int = 0) -> dict:
    """One method on the demo task, in this process: its row (and every setting it tried)."""
    from .demo import demo_task

    if method not in METHODS:
        raise SlugError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    task = demo_task(concept, epochs=epochs, seed=seed, progress=False)
    setting, reached, seconds, grid_seconds, tried = _run(method, task.model, task.forget, task.retain,
                                                          task.criterion, "retain_top1")
    acc = task.accuracies()
    return {"method": method, "setting": setting, "reached": reached, "seconds": seconds,
            "grid_seconds": grid_seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "forget_top1": acc["forget_top1"], "retain_top1": acc["retain_top1"], "mia": task.mia()["loss"],
            "tried": tried}


def _run(method: str, model, forget, retain, criterion, utility: str, **slug_options) -> tuple:
    """(best setting, reached, its seconds, the grid's seconds, every setting tried) of one method
    run on `model` (edited in place); `utility` names the criterion's utility metric."""
    from .baselines import run_baseline
    from .unlearn import unlearn

    t0 = time.perf_counter()
    if method == "slug":
        result = unlearn(model, forget, retain, criterion, progress=False, **slug_options)
        seconds = time.perf_counter() - t0
        tried = [{"setting": {"layer": c.layers, "step": c.search.step}, "reached": c.search.reached,
                  utility: c.utility, "evaluations": len(c.search.trace)} for c in result.candidates]
        return {"layer": result.edited, "step": result.step}, True, seconds, seconds, tried
    result = run_baseline(method, model, forget, retain, criterion, apply=True, progress=False)
    setting = result.best.hyper if result.best is not None else None
    if method == "slug-authors" and result.best is not None:
        setting = {"layer": result.best.hyper["layers"], "step": result.best.details["step"]}
    tried = [{"setting": r.hyper, "reached": r.reached, utility: r.metrics.get(utility),
              "forget_top1": r.metrics.get("forget_top1"), "steps": r.steps, "seconds": r.seconds}
             for r in result.settings]
    return setting, result.reached, result.seconds, result.grid_seconds, tried


@dataclasses.dataclass
class ModelTask:
    """What `slug-fast compare --model` runs every method on (the `slug-fast unlearn` and `eval`
    flags of the same names; passed to each method's process as JSON)."""

    model: str
    concept: str
    class_names: str
    pretrained: str | None = None
    aliases: tuple[str, ...] = ()
    data: str | None = None
    forget_data: str | None = None
    retain_data: str | None = None
    eval_data: str | None = None
    utility_data: str | None = None
    utility_classes: str | None = None
    utility_templates: str | None = None
    utility_per_class: int | None = None
    k: int = 5
    batch_size: int = 32
    limit: int | None = None
    device: str = "cpu"
    memory_budget: int | str | None = None
    max_evals: int = 10


def run_model_method(method: str, task: ModelTask) -> dict:
    """One method on a user's model and data, in this process: its row (and every setting tried).
    "original" scores the model as loaded; every other method edits it first."""
    import torch

    from .eval.benchmark import table_scores
    from .eval.zero_shot import OBJECT_TEMPLATES, concept_criterion
    from .job import _batches, _class_list, _prepare, template_list, utility_set
    from .memory import parse_budget

    if method not in ("original", *METHODS):
        raise SlugError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    names = _class_list(task.class_names, [task.concept])
    budget = parse_budget(task.memory_budget)
    templates = template_list(task.utility_templates, OBJECT_TEMPLATES)
    forget_pairs, retain_pairs, eval_images, eval_labels, held_out, adapter = _prepare(
        task.model, task.concept, names, task.pretrained, task.data, task.forget_data, task.retain_data,
        task.eval_data, tuple(task.aliases), task.limit, task.device)
    utility = utility_set(task.utility_data, task.utility_classes, task.utility_per_class) \
        if task.utility_data is not None else None
    criterion = concept_criterion(adapter, eval_images, eval_labels, names, task.concept, k=task.k)
    forget = _batches(adapter, forget_pairs, task.batch_size, None)
    retain = _batches(adapter, retain_pairs, task.batch_size, None)
    cuda = str(task.device).startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if method == "original":
        setting, reached, seconds, grid_seconds, tried = None, None, 0.0, 0.0, []
    else:
        setting, reached, seconds, grid_seconds, tried = _run(method, adapter, forget, retain, criterion, "utility",
                                                              max_evals=task.max_evals, memory_budget=budget)
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    scores = table_scores(adapter, eval_images, eval_labels, names, task.concept, k=task.k, utility=utility,
                          utility_templates=templates, forget_pairs=forget_pairs if held_out else None,
                          held_out_pairs=held_out or None)
    return {"method": method, "setting": setting, "reached": reached, "seconds": seconds,
            "grid_seconds": grid_seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_gpu_mb": peak_gpu, **scores, "tried": tried}


def run_compare_model(task: ModelTask, out: str | Path | None = None, *, methods=METHODS,
                      progress: bool | None = None) -> list[dict]:
    """The model as loaded ("original"), then every method, each in a fresh process on the same
    data, criterion and grids; with `out`, compare.json, compare.md (the paper's Table 1
    layout) and compare.png (utility vs cost) are written there."""
    from .job import _class_list, check_out_dir, template_list
    from .memory import parse_budget

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SlugError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    out = check_out_dir(out) if out is not None else None
    _class_list(task.class_names, [task.concept])  # refuse what every process would refuse, once, first
    parse_budget(task.memory_budget)
    template_list(task.utility_templates, ())
    rows = []
    with tempfile.TemporaryDirectory(prefix="slug-fast-compare-") as tmp:
        spec = Path(tmp) / "task.json"
        spec.write_text(json.dumps(dataclasses.asdict(task)))
        for method in ("original", *methods):
            if progress is not False:
                print(f"compare: running {method} ...", file=sys.stderr, flush=True)
            rows.append(_run_child(method, ["--task", str(spec)]))
    if out is not None:
        _write_outputs(out, rows, lambda: markdown_table(rows, task.concept, task.k),
                       lambda path: plot(rows[1:], path, task.concept, "utility_top1" if task.utility_data
                                         else "others_top1"))
    return rows


def _in_subprocess(method: str, concept: str, epochs: int | None, seed: int) -> dict:
    args = ["--forget", concept, "--seed", str(seed)] + (["--epochs", str(epochs)] if epochs is not None else [])
    return _run_child(method, args)


def _run_child(method: str, args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "slug_fast.compare", "--method", method, *args]
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
        _write_outputs(out, rows, lambda: markdown(rows, concept),
                       lambda path: plot(rows, path, concept, "retain_top1"))
    return rows


def _write_outputs(out: Path, rows: list[dict], text, draw) -> None:
    """compare.json (the rows, each with every setting tried), compare.md and compare.png."""
    def write(staging: Path) -> list[str]:
        write_json_atomic(staging / "compare.json", rows)
        write_atomic(staging / "compare.md", lambda tmp: Path(tmp).write_text(text()))
        draw(staging / "compare.png")
        return ["compare.png", "compare.md", "compare.json"]

    replace_dir(out, write)  # the three together: a reader sees the old set or the new one


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
    return "\n".join(lines + _tried(rows, "retain_top1", "retain top-1")) + "\n"


def _tried(rows: list[dict], utility: str, heading: str) -> list[str]:
    """compare.md's sections of every setting each method tried; `utility` is its key in them."""
    lines = []
    for r in rows:
        lines += ["", f"## {r['method']}: every setting tried", "",
                  f"| setting | criterion met | forget top-1 | {heading} | steps / evaluations | seconds |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {_fmt(t['setting'])} | {'yes' if t['reached'] else 'no'} | {_fmt(t.get('forget_top1'))} | "
                  f"{_fmt(t.get(utility))} | {_fmt(t.get('steps', t.get('evaluations')))} | "
                  f"{_fmt(t.get('seconds'))} |" for t in r["tried"]]
    return lines


def markdown_table(rows: list[dict], concept: str, k: int = 5) -> str:
    """compare.md on a user's model: the paper's Table 1 columns per method, then every setting tried."""
    ks = sorted({1, k})
    forget = " | ".join(f"forget top-{j}" for j in ks)
    lines = [f"# Forgetting {concept!r}: SLUG vs baselines", "",
             f"| method | best setting | {forget} | others top-1 | utility top-1 | MIA | seconds | grid seconds "
             "| peak RSS MB | peak GPU MB |", "|---" * (9 + len(ks)) + "|"]
    for r in rows:
        setting = "-" if r["method"] == "original" else \
            _fmt(r["setting"]) if r["reached"] else "criterion never met"
        gpu = "-" if r["peak_gpu_mb"] is None else f"{r['peak_gpu_mb']:.0f}"
        lines.append(f"| {r['method']} | {setting} | " + " | ".join(_fmt(r[f"forget_top{j}"]) for j in ks)
                     + f" | {_fmt(r['others_top1'])} | {_fmt(r['utility_top1'])} | {_fmt(r['mia'])} | "
                     f"{_fmt(r['seconds'])} | {_fmt(r['grid_seconds'])} | {r['peak_rss_mb']:.0f} | {gpu} |")
    lines += ["", "Accuracies in percent: forget = the concept's images among the class names (0 is forgotten), "
              "others = the other classes' images, utility = zero-shot on the labelled folder; MIA = "
              "membership-inference accuracy on the forget pairs vs held-out ones (50 = cannot tell)."]
    return "\n".join(lines + _tried(rows[1:], "utility", "utility")) + "\n"


def plot(rows: list[dict], path: Path, concept: str, metric: str = "retain_top1") -> Path:
    """`metric` (an accuracy) vs seconds (log axis): filled = the best setting's run, hollow = its whole grid."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, r in enumerate(r for r in rows if r["reached"]):
        color = f"C{i}"
        ax.scatter([r["seconds"]], [r[metric]], color=color, label=r["method"])
        ax.scatter([r["grid_seconds"]], [r[metric]], facecolors="none", edgecolors=color)
        ax.plot([r["seconds"], r["grid_seconds"]], [r[metric]] * 2, color=color, lw=0.8, alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("seconds (filled: best setting's run; hollow: its whole grid)")
    what = metric.replace("_top1", " top-1")
    ax.set_ylabel(f"{what} once the concept is forgotten (%)")
    ax.set_title(f"forgetting {concept}: {what} vs time")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))


def main(argv=None) -> int:
    """One method in this process; prints its row as JSON (used by run_compare)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m slug_fast.compare")
    ap.add_argument("--method", required=True, choices=("original", *METHODS))
    ap.add_argument("--forget", default="seven")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--task", help="a ModelTask as JSON (run_compare_model writes it)")
    args = ap.parse_args(argv)
    try:
        if args.task is not None:
            task = ModelTask(**json.loads(Path(args.task).read_text()))
            row = run_model_method(args.method, task)
        else:
            row = run_method(args.method, args.forget, epochs=args.epochs, seed=args.seed)
    except (SlugError, OSError) as err:
        print(" ".join(str(err).split()), file=sys.stderr)  # one line: run_compare reports it
        return 2
    json.dump(row, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
