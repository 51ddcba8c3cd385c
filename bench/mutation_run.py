"""`mutmut run` with each mutant's tests ordered fastest first.

    python bench/mutation_run.py [--max-children N] [NAME ...]   # the arguments of `mutmut run`

mutmut 3.8 hands each mutant the tests that reach its function as an unordered set, and
pytest stops at the first failure (-x). Most mutants are killed by a quick test, but with the
set's arbitrary order a mutant of unlearn waits behind whichever minute-long end-to-end tests
happen to come first. This runs mutmut's own `run` command with one change: each mutant's
tests are passed sorted by the durations mutmut measured for them (fastest first, then by
name), so a killed mutant costs about the tests before its first failing one. The verdicts
are the same: a survivor still runs every test that reaches its function. Run it where
`mutmut run` would run (the repository root); bench/mutation.md has the workflow.
"""
from __future__ import annotations

import sys

from mutmut.__main__ import cli
from mutmut.state import state
from mutmut.workers import isolation


def fastest_first(tests: list[str]) -> list[str]:
    durations = state().duration_by_test
    return sorted(tests, key=lambda test: (durations.get(test, 0.0), test))


def _ordered(submit):
    def submit_fastest_first(self, mutant_name: str, tests: list[str], *rest):
        return submit(self, mutant_name, fastest_first(tests), *rest)
    return submit_fastest_first


for _runner in (isolation.ForkServerRunner, isolation.ForkRunner):
    _runner.submit = _ordered(_runner.submit)

if __name__ == "__main__":
    sys.exit(cli(["run", *sys.argv[1:]]))
