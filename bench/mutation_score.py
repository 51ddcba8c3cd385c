"""The mutation score per core module, from mutmut's results (run `mutmut run` first).

    python bench/mutation_score.py [--survivors] [--markdown]

Reads `mutmut results --all true` in the repository root and prints, per module, the mutants
killed (a test failed, the tests ran past their time limit or crashed), survived, not reached
by any selected test, and not yet checked; the score is killed / (every mutant checked), "no
tests" and "suspicious" counting as survived. --survivors lists the surviving mutants' names
(`mutmut show NAME` prints each one's diff). Mutation testing is not part of CI: see
bench/mutation.md.
"""
import argparse
import collections
import re
import subprocess
import sys

KILLED = {"killed", "timeout", "segfault"}  # a mutant that loops or crashes the tests is caught
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--survivors", action="store_true", help="list the surviving mutants")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = ap.parse_args()
    counts = collections.defaultdict(collections.Counter)
    survivors = []
    for name, status in read_results():
        counts[module_of(name)][status] += 1
        if status not in KILLED | UNCHECKED:
            survivors.append(f"{name}: {status}")
    head = ("module", "mutants", "killed", "survived", "no tests", "not checked", "score %")
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


def _row(module: str, c: collections.Counter) -> tuple:
    killed = sum(c[s] for s in KILLED)
    checked = sum(v for s, v in c.items() if s not in UNCHECKED)
    score = f"{100.0 * killed / checked:.1f}" if checked else "-"
    return (module, sum(c.values()), killed, c["survived"], c["no tests"], sum(c[s] for s in UNCHECKED), score)


if __name__ == "__main__":
    main()
