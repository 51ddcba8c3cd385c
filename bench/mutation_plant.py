"""Plant mutmut's mutants in this source tree, one at a time, and run chosen tests against each.

    python bench/mutation_plant.py --mutants DIR --tests "tests/test_eval.py -k figure" NAME [NAME ...]
    python bench/mutation_plant.py --mutants DIR --tests "..." --survivors PATTERN

For the step between mutation runs: a new test was written for some survivors, and each should
now be killed. `DIR` is the checkout where `mutmut run` keeps its `mutants/` (it may be running;
nothing there is changed): `mutmut show NAME` gives each mutant's diff, which is applied here by
its context lines (a mutant whose context is not found exactly once is reported and skipped,
e.g. after its function changed), the tests run (-x), and the file is restored, byte for byte,
whatever happens (Ctrl-C and SIGTERM included); its mtime moves each time, so Python never runs
a cached .pyc of the other version. Outcomes as in bench/mutation_native.py:
killed (a test failed), survived, or the pytest exit code. Never run two at once in one tree.
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def mutant_diff(mutants: Path, name: str) -> tuple[str, str, str] | None:
    """(file, old block, new block) of a mutant from `mutmut show`, or None without a diff."""
    shown = subprocess.run(["mutmut", "show", name], cwd=mutants, capture_output=True, text=True, timeout=120).stdout
    lines = shown.splitlines()
    files = [ln[4:] for ln in lines if ln.startswith("--- ")]
    hunks = [i for i, ln in enumerate(lines) if ln.startswith("@@")]
    if not files or not hunks:
        return None
    body = lines[hunks[0] + 1:]
    old = "".join(ln[1:] + "\n" for ln in body if not ln.startswith("+"))
    new = "".join(ln[1:] + "\n" for ln in body if not ln.startswith("-"))
    return files[0], old, new


def indent_method(block: str) -> str:
    """mutmut shows a method dedented by one level; continuation lines keep their indentation."""
    out, continued = [], False
    for line in block.splitlines(True):
        out.append(line if continued or not line.strip() else "    " + line)
        continued = line.rstrip("\n").endswith("\\")
    return "".join(out)


def survivors(mutants: Path, pattern: str) -> list[str]:
    listed = subprocess.run(["mutmut", "results"], cwd=mutants, capture_output=True, text=True, timeout=600).stdout
    names = [ln.split(":")[0].strip() for ln in listed.splitlines() if ln.strip().endswith(": survived")]
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def plant(name: str, mutants: Path, tests: list[str]) -> str:
    found = mutant_diff(mutants, name)
    if found is None:
        return "no diff shown"
    rel, old, new = found
    path = ROOT / rel
    text = path.read_text()
    if text.count(old) != 1:
        old, new = indent_method(old), indent_method(new)
    if text.count(old) != 1:
        return f"context found {text.count(old)} times: skipped"
    original, mtime = path.read_bytes(), path.stat().st_mtime
    try:
        path.write_text(text.replace(old, new))
        # a cached .pyc is trusted while the source's size and mtime match, and a mutant often has
        # the original's size: move the mtime so the mutant is compiled, not the cached original
        os.utime(path, (mtime + 7, mtime + 7))
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                              cwd=ROOT, capture_output=True, text=True)
    finally:
        path.write_bytes(original)
        os.utime(path, (mtime + 14, mtime + 14))  # and the restored source is compiled again too
    failed = re.findall(r"^FAILED (\S+)", done.stdout, re.MULTILINE)
    if done.returncode == 1:
        return f"killed {failed[0] if failed else ''}"
    return "survived" if done.returncode == 0 else f"pytest exit {done.returncode}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mutants", type=Path, required=True, help="the checkout holding mutmut's mutants/")
    ap.add_argument("--tests", required=True, help="pytest arguments, one string")
    ap.add_argument("--survivors", metavar="PATTERN", help="every survivor whose name matches (a glob)")
    ap.add_argument("names", nargs="*")
    args = ap.parse_args()
    names = list(args.names) + (survivors(args.mutants, args.survivors) if args.survivors else [])
    if not names:
        ap.error("no mutant named: give NAMEs or --survivors PATTERN")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # restore the file on SIGTERM too
    outcomes = []
    for name in names:
        outcome = plant(name, args.mutants, shlex.split(args.tests))
        outcomes.append(outcome)
        print(f"{name}: {outcome}", flush=True)
    killed = sum(o.startswith("killed") for o in outcomes)
    print(f"{killed} of {len(outcomes)} killed")
    return 0 if killed == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
