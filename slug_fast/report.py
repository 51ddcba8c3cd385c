"""Reports of an unlearning run: Pareto plots per tower (like the paper's figures) and report.md."""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

from .files import write_atomic
from .memory import format_bytes
from .stats import LayerStats


def plot_pareto(stats: LayerStats, members: list[str], front: list[str], chosen: list[str],
                path: str | Path, title: str) -> Path:
    """Log-log scatter of importance vs alignment for a tower's layers; front and choice labelled."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # not pyplot: the user's matplotlib backend stays as it is

    idx = [stats.index(n) for n in members]
    a, m = stats.alignment[idx].tolist(), stats.importance[idx].tolist()
    floor = min([v for v in a if v > 0] or [1e-12]) / 10  # log axes: show alignment 0 at a floor
    a = [v if v > 0 else floor for v in a]
    fig = Figure(figsize=(6.4, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.scatter(a, m, s=14, c="#9aa5b1", label="layers")
    on_front = [i for i, n in enumerate(members) if n in front]
    ax.scatter([a[i] for i in on_front], [m[i] for i in on_front], s=30, c="#d1495b", label="Pareto front")
    order = sorted(on_front, key=lambda i: a[i])
    ax.plot([a[i] for i in order], [m[i] for i in order], c="#d1495b", lw=1)
    for i in on_front:
        name = members[i]
        ax.annotate(_short(name), (a[i], m[i]), fontsize=6, xytext=(3, 3), textcoords="offset points",
                    weight="bold" if name in chosen else "normal")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("gradient alignment |cos(g_forget, g_retain)|")
    ax.set_ylabel("layer importance ||g_forget|| / ||theta||")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def pareto_plots(result, label: str = "") -> dict[str, tuple[str, Callable[[Path], object]]]:
    """report.json key -> (file name, write(path)) of the Pareto plot of every tower searched:
    `pareto_<tower>.png` for an UnlearnResult, `pareto_<concept>_<tower>.png` per concept of
    a ManyResult (slug_fast.many; a concept's name with its spaces and any character other than
    letters, digits, '.', '-' and '_' made '_', its position appended where two names would
    meet; "concept<i>" for a name of none of those)."""
    runs = [("", label, result)]
    if hasattr(result, "concepts"):
        parts = [_file_part(c.name, i) for i, c in enumerate(result.concepts.values())]
        parts = [p if parts.count(p) == 1 else f"{p}_{i + 1}" for i, p in enumerate(parts)]  # "a b", "a/b"
        runs = [(f"{part}_", c.name, c) for part, c in zip(parts, result.concepts.values())]
    plots = {}
    for prefix, title, run in runs:
        for tower, front in run.fronts.items():
            members = [n for n in run.stats.names if n in run.tower_members.get(tower, ())]
            plots[f"pareto_{prefix}{tower}"] = (
                f"pareto_{prefix}{tower}.png",
                lambda path, run=run, members=members, front=front, name=f"{title}: {tower} tower".strip(": "):
                    plot_pareto(run.stats, members, front, run.layers, path, name))
    return plots


def _file_part(name: str, index: int) -> str:
    """A concept's name as a part of a file name: no path separator, no space."""
    part = re.sub(r"[^\w.-]+", "_", name).strip("_")
    return part if part.strip(".") else f"concept{index + 1}"


def plot_interference(interference, path: str | Path, title: str) -> Path:
    """A grid of every concept's criterion (columns) after each edit (rows): green where it
    holds, red where not, labelled with the first numeric metric the criteria report."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    rows, cols = len(interference.after), len(interference.concepts)
    fig = Figure(figsize=(1.6 + 1.3 * cols, 1.0 + 0.45 * rows), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow([[1.0 if ok else 0.0 for ok in row] for row in interference.satisfied],
              cmap=ListedColormap(["#f4a6a6", "#a8d5a2"]), vmin=0, vmax=1, aspect="auto")
    metric = next(iter(interference.metric_names()), None)
    if metric is not None:
        for i, row in enumerate(interference.values(metric)):
            for j, value in enumerate(row):
                ax.text(j, i, _fmt(value), ha="center", va="center", fontsize=7)
    ax.set_xticks(range(cols), interference.concepts, fontsize=8)
    ax.set_yticks(range(rows), [f"after {a}" if a != "before" else "before" for a in interference.after], fontsize=8)
    ax.set_xlabel("criterion of" + (f" (cells: {metric})" if metric else ""))
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def _short(name: str) -> str:
    """A layer name without the parts every layer shares (for plot labels)."""
    for prefix in ("visual.transformer.resblocks.", "transformer.resblocks.", "vision_model.encoder.layers.",
                   "text_model.encoder.layers."):
        if name.startswith(prefix):
            return name[len(prefix):].removesuffix(".weight")
    return name.removesuffix(".weight")


def _fmt(value) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def markdown(report: dict) -> str:
    """report.md: what was unlearned, where, the before/after table and the search trace."""
    if "concepts" in report:
        return _markdown_many(report)
    lines = [f"# Unlearning report: {report.get('concept', '?')}", ""]
    lines += [f"- layer(s): {', '.join(f'`{n}`' for n in report['layer'])}",
              f"- step: {_fmt(report['step'])}",
              "- seconds: " + ", ".join(f"{k} {_fmt(v)}" for k, v in report["seconds"].items())]
    memory = report.get("unlearn", {}).get("memory")
    if memory:
        lines.append(f"- gradient store: {memory['mode']}, {memory['passes']} pass(es); peak "
                     f"{format_bytes(memory['measured_peak_bytes'])} above the loaded model ({memory['measured_by']})"
                     + (f", predicted {format_bytes(memory['predicted_peak_bytes'])}"
                        if memory.get("predicted_peak_bytes") is not None else "")
                     + (f", budget {format_bytes(memory['budget_bytes'])}" if memory.get("budget_bytes") else ""))
    lines.append("")
    rows = [(group, key.removesuffix("_before"), values[key], values.get(key.replace("_before", "_after")))
            for group, values in report.items() if isinstance(values, dict) and group in ("forget", "retain", "mia")
            for key in values if key.endswith("_before")]
    if rows:
        lines += ["| metric | before | after |", "|---|---|---|"]
        lines += [f"| {g} {k} | {_fmt(b)} | {_fmt(a)} |" for g, k, b, a in rows]
        lines.append("")
    trace = report.get("unlearn", {}).get("trace", [])
    if trace:
        keys = sorted({k for e in trace for k in e["metrics"]})
        lines += ["## Step search (chosen layer)", "",
                  "| step | criterion met | " + " | ".join(keys) + " | seconds |",
                  "|---|---|" + "---|" * len(keys) + "---|"]
        lines += [f"| {_fmt(e['step'])} | {'yes' if e['satisfied'] else 'no'} | "
                  + " | ".join(_fmt(e["metrics"].get(k, "")) for k in keys) + f" | {_fmt(e['seconds'])} |"
                  for e in trace]
        lines.append("")
    cands = report.get("unlearn", {}).get("candidates", [])
    if cands:
        lines += ["## Front layers searched", "", "| layer(s) | tower | step | relative change | utility |",
                  "|---|---|---|---|---|"]
        lines += [f"| {', '.join(c['layers'])} | {c['tower']} | {_fmt(c['step']) if c['reached'] else 'not reached'}"
                  f" | {_fmt(c['relative_change']) if c['reached'] else '-'} | {_fmt(c['utility'])} |"
                  for c in cands]
        lines.append("")
    return "\n".join(lines)


def _markdown_many(report: dict) -> str:
    """report.md of several concepts: each one's layer and step, the before/after table and
    the interference grid."""
    run = report["unlearn"]
    lines = [f"# Unlearning report: {', '.join(report['concepts'])}", "",
             f"- order: {', '.join(run['order'])}; layers shared between concepts: "
             f"{'allowed' if run['share_layers'] else 'no'}; verification rounds: {run['rounds']}",
             "- seconds: " + ", ".join(f"{k} {_fmt(v)}" for k, v in report["seconds"].items()), "",
             "| concept | layer(s) | step | searches |", "|---|---|---|---|"]
    lines += [f"| {name} | {', '.join(f'`{n}`' for n in c['edited'])} | {_fmt(c['step'])} | {c['searches']} |"
              for name, c in run["concepts"].items()]
    lines.append("")
    rows = [(f"{group} {key.removesuffix('_before')}", value, values.get(key.replace("_before", "_after")))
            for group, values in report.items() if isinstance(values, dict) and group in ("forget", "kept", "retain")
            for key, value in values.items() if key.endswith("_before")]
    if rows:
        lines += ["| metric | before | after |", "|---|---|---|"]
        lines += [f"| {name} | {_fmt(b)} | {_fmt(a)} |" for name, b, a in rows]
        lines.append("")
    grid = run["interference"]
    lines += ["## Interference: every criterion after each edit", "",
              "| after | " + " | ".join(grid["concepts"]) + " | utility |",
              "|---|" + "---|" * (len(grid["concepts"]) + 1)]
    lines += [f"| {after} | " + " | ".join("met" if ok else "not met" for ok in row) + f" | {_fmt(u)} |"
              for after, row, u in zip(grid["after"], grid["satisfied"], grid["utility"])]
    lines.append("")
    return "\n".join(lines)


def write_outputs(out: str | Path, report: dict, result,
                  extra: dict[str, tuple[str, Callable[[Path], object]]] | None = None) -> dict[str, str]:
    """Write delta/ (revertible: slug_fast.revert_delta), report.md, the Pareto plots
    (pareto_plots), the `extra` files and last report.json (listing them all) into `out`;
    returns what went where.

    extra maps a key of report.json's "files" to (file name, write(path)). The set is staged
    and swapped in by files.replace_dir: where `out` holds only outputs of an earlier run (the
    ones its report.json lists), in one step, so a reader sees the old set or the new one;
    beside other files, name by name with report.json last. On failure the old set stays.
    Outputs of the earlier run that this one does not write go with the old set; no other
    file in `out` is touched.
    """
    from .delta import CONFIG_FILE, ORIGINALS_FILE, TENSORS_FILE
    from .errors import DeltaError
    from .files import replace_dir, write_json_atomic

    out = Path(out)
    delta = out / "delta"
    if delta.exists() and not delta.is_dir():
        raise DeltaError(f"{delta} exists and is not a directory; a delta is saved as a directory")
    # a delta/ holding files of its own keeps them: swap only the pair inside it
    delta_own_files = delta.is_symlink() or delta.is_dir() and any(
        p.name not in (TENSORS_FILE, ORIGINALS_FILE, CONFIG_FILE) for p in delta.iterdir())
    previous = {n for n in _previous_outputs(out) if n != "delta" or not delta_own_files}
    files = {"delta": str(delta)}

    def write(staging: Path) -> list[str]:
        result.save(staging / "delta", revertible=True)
        names = [f"delta/{n}" for n in (TENSORS_FILE, ORIGINALS_FILE, CONFIG_FILE)] if delta_own_files \
            else ["delta"]
        for key, (name, write_file) in {**pareto_plots(result, report.get("concept", "")), **(extra or {})}.items():
            write_file(staging / name)
            files[key] = str(out / name)
            names.append(name)
        (staging / "report.md").write_text(markdown(report))
        files["report_md"], files["report_json"] = str(out / "report.md"), str(out / "report.json")
        write_json_atomic(staging / "report.json", {**report, "files": files})
        return [*names, "report.md", "report.json"]

    replace_dir(out, write, owned=previous.__contains__)
    return files


def _previous_outputs(out: Path) -> list[str]:
    """Names of our outputs the report.json in `out` lists (delta, plots, reports), if any."""
    import json

    try:
        files = json.loads((out / "report.json").read_text()).get("files")
    except (OSError, ValueError, AttributeError, RecursionError):
        return []
    if not isinstance(files, dict):
        return []
    ours = [Path(v) for k, v in files.items() if isinstance(k, str) and isinstance(v, str)
            and (k in ("delta", "report_md", "report_json", "similarity", "interference") or k.startswith("pareto_"))]
    return [p.name for p in ours if p.name and p.parent == out
            and (p.name in ("delta", "report.md", "report.json", "similarity.png", "interference.png")
                 or p.name.startswith("pareto_") and p.name.endswith(".png"))]
