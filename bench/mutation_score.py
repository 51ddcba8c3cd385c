"""The mutation score per core module, from mutmut's results (run `mutmut run` first).

    python bench/mutation_score.py [--survivors] [--markdown] [--listed bench/mutation_listed.tsv]

Reads `mutmut results --all true` in the repository root and prints, per module, the mutants
killed (a test failed, the tests ran past their time limit or crashed), survived, not reached
by any selected test, and not yet checked; the score is killed / (every mutant checked), "no
tests" and "suspicious" counting as survived. --survivors lists the surviving mutants' names
(`mutmut show NAME` prints each one's diff). Mutation testing is not part of CI: see
bench/mutation.md.

--listed reads the survivors checked by hand (name, kind, the mutated line, why; tab-separated):
"equivalent" ones (no input tells them from the original) count as killed in the last column,
"cuda" and "not pinned" ones stay survivors. An entry whose mutant is no longer a survivor, or
whose mutated line differs from the one listed (mutmut renumbers a function's mutants when it
changes), is reported as stale and counts as nothing.
"""
import argparse
import collections
import re
import subprocess
import sys

KILLED = {"killed", "timeout", "segfault"}
KINDS = ("equivalent", "cuda", "not pinned")  # a mutant that loops or crashes the tests is caught
UNCHECKED = {"not checked", "check was interrupted by user"}
STATUS = re.compile(r"^\s*(slug_fast\.[\w.ǁ]+?)__mutmut_\d+: (.+)$")


def module_of(mutant: str) -> str:
    """slug_fast.eval.mia.x_attack__mutmut_3 -> slug_fast/eval/mia.py."""
    dotted = mutant.split(".x_")[0].split(".xǁ")[0]
    return dotted.replace(".", "/") + ".py"


def read_results() -> list[tuple[str, str]]:
    out = subprocess.run(["mutmut", "results", "--all", "true"], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        m = STATUS.match(line)
        if m:
            rows.append((line.split(":")[0].strip(), m.group(2).strip()))
    if not rows:
        sys.exit("no mutmut results here: run `mutmut run` in the repository root first")
    return rows


def read_listed(path: str) -> dict[str, tuple[str, str, str]]:
    """name -> (kind, mutated line, why) from a tab-separated file (# comments, blank lines)."""
    listed = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip() or line.startswith("#"):
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 4 or fields[1] not in KINDS:
                sys.exit(f"{path}:{i}: want name<TAB>kind<TAB>mutated line<TAB>why, kind one of {KINDS}")
            listed[fields[0]] = (fields[1], fields[2].strip(), fields[3])
    return listed


def mutated_lines(name: str) -> list[str]:
    """The lines `mutmut show NAME` adds (the mutant's side of the diff), stripped."""
    shown = subprocess.run(["mutmut", "show", name], capture_output=True, text=True, check=True).stdout
    return [ln[1:].strip() for ln in shown.splitlines() if ln.startswith("+") and not ln.startswith("+++")]


def tally(results: list[tuple[str, str]], listed: dict, lines_of=mutated_lines):
    """(per-module status counts, survivors' lines, stale listed entries) of mutmut's results;
    `lines_of(name)` gives a mutant's mutated lines (mutmut show, by default)."""
    counts = collections.defaultdict(collections.Counter)
    survivors, stale = [], []
    names = {n for n, _ in results}
    stale += [f"{name}: listed as {kind}, but no such mutant" for name, (kind, _, _) in listed.items()
              if name not in names]
    for name, status in results:
        module = module_of(name)
        counts[module][status] += 1
        if status in KILLED | UNCHECKED:
            if name in listed and status in KILLED:  # a listed mutant not checked yet is not stale
                stale.append(f"{name}: listed as {listed[name][0]}, but {status}")
            continue
        kind = listed.get(name, (None,))[0]
        if kind is not None and listed[name][1] not in lines_of(name):
            stale.append(f"{name}: listed as {kind}, but its mutated line is not {listed[name][1]!r}")
            kind = None
        if kind:
            counts[module][f"listed {kind}"] += 1
        survivors.append(f"{name}: {status}" + (f" (listed: {kind})" if kind else ""))
    return counts, survivors, stale


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--survivors", action="store_true", help="list the surviving mutants")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    ap.add_argument("--listed", metavar="TSV", help="survivors checked by hand (see above)")
    args = ap.parse_args()
    counts, survivors, stale = tally(read_results(), read_listed(args.listed) if args.listed else {})
    head = ("module", "mutants", "killed", "survived", "no tests", "not checked", "score %",
            "listed equivalent", "listed other", "score with equivalents %")
    rows, total = [], collections.Counter()
    for module in sorted(counts):
        c = counts[module]
        total.update(c)
        rows.append(_row(module, c))
    rows.append(_row("all core modules", total))
    if args.markdown:
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for r in rows:
            print("| " + " | ".join(map(str, r)) + " |")
    else:
        print("".join(f"{h:>12}" for h in head[1:]).rjust(40 + 12 * (len(head) - 1)))
        for r in rows:
            print(f"{r[0]:<40}" + "".join(f"{v:>12}" for v in r[1:]))
    if args.survivors:
        print("\n".join(survivors))
    if stale:
        print("stale entries in " + args.listed + ":\n" + "\n".join(stale), file=sys.stderr)


def _row(module: str, c: collections.Counter) -> tuple:
    killed = sum(c[s] for s in KILLED)
    checked = sum(v for s, v in c.items() if s not in UNCHECKED and not s.startswith("listed "))
    equivalent = c["listed equivalent"]
    other = c["listed cuda"] + c["listed not pinned"]
    mutants = sum(v for s, v in c.items() if not s.startswith("listed "))

    def score(k):
        return f"{100.0 * k / checked:.1f}" if checked else "-"
    return (module, mutants, killed, c["survived"], c["no tests"], sum(c[s] for s in UNCHECKED), score(killed),
            equivalent, other, score(killed + equivalent))


if __name__ == "__main__":
    main()
