"""Carry mutmut's verdicts from one machine to the next, so that a run continues where the last stopped.

    python bench/mutation_state.py save      # mutants/ -> bench/mutation-state.tar.xz (stop the run first)
    python bench/mutation_state.py restore   # bench/mutation-state.tar.xz -> mutants/, before `mutmut run`

mutmut keeps each mutant's verdict in mutants/<source>.meta, beside the hash of the function it
was checked against, and which tests reach which function in mutants/mutmut-stats.json. A run
on a fresh checkout with these files restored checks only the mutants not checked yet and those
of functions whose source changed, and maps only the tests that are new (bench/mutation.md).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = ROOT / "mutants"
STATE = ROOT / "bench" / "mutation-state.tar.xz"


def state_files(mutants: Path) -> list[Path]:
    """The verdict and stats files under `mutants`, relative to it, each checked to be whole JSON."""
    files = sorted(p.relative_to(mutants) for p in mutants.rglob("*.meta"))
    if not files or not (mutants / "mutmut-stats.json").is_file():
        sys.exit(f"no mutmut results in {mutants}: run `mutmut run` first")
    files.append(Path("mutmut-stats.json"))
    for f in files:
        try:
            json.loads((mutants / f).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            sys.exit(f"{mutants / f} is not whole JSON ({err}): was the run stopped while writing it?")
    return files


def save(mutants: Path, state: Path) -> None:
    files = state_files(mutants)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for f in files:
            tar.add(mutants / f, arcname=f.as_posix())
    tmp = state.with_name(state.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, state)
    print(f"{state}: {len(files) - 1} verdict files and the stats, {len(buf.getvalue())} bytes")


def restore(mutants: Path, state: Path, force: bool) -> None:
    if not state.is_file():
        sys.exit(f"{state} does not exist: nothing to restore")
    if any(mutants.rglob("*.meta")) and not force:
        sys.exit(f"{mutants} already holds verdicts; --force replaces them with the saved ones")
    with tarfile.open(state, mode="r:xz") as tar:
        members = tar.getmembers()
        for m in members:  # plain files named *.meta or the stats, inside mutants/ only
            name = Path(m.name)
            if not m.isfile() or name.is_absolute() or ".." in name.parts or \
                    not (m.name.endswith(".meta") or m.name == "mutmut-stats.json"):
                sys.exit(f"{state}: unexpected member {m.name!r}")
        tar.extractall(mutants, filter="data")
    print(f"{mutants}: {len(members) - 1} verdict files and the stats restored; now `mutmut run`")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("save", "restore"))
    ap.add_argument("--force", action="store_true", help="restore over verdicts already in mutants/")
    ap.add_argument("--mutants", type=Path, default=MUTANTS, help="mutmut's folder (default: %(default)s)")
    ap.add_argument("--state", type=Path, default=STATE, help="the archive (default: %(default)s)")
    args = ap.parse_args()
    if args.action == "save":
        save(args.mutants, args.state)
    else:
        restore(args.mutants, args.state, args.force)


if __name__ == "__main__":
    main()
