"""RecordCache: one replayed region's records, the cursor, its share of the byte budget, giving up."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("slug_fast")

DEFAULT_MAX_BYTES = 2 << 30


@dataclass
class ByteBudget:
    """Bytes held by all the caches of one replay, against one limit (inf: no limit)."""

    limit: float = DEFAULT_MAX_BYTES
    used: int = 0
    peak: int = 0


class RecordCache:
    """The records of one region in call order, looked up at a cursor, kept within a byte budget.

    A pass is one evaluation: the calls between two moves of `token` (versions of the edited
    tensors, which move at each step). Calls usually come in the same order every pass, so a lookup tries the record
    at the cursor first, then the others; a miss is recorded at the cursor, replacing what was
    there, unless the budget would be exceeded (then that call stays uncached). A record
    reports `intact()` (its tensors unchanged in place; else it is dropped) and `nbytes`. A
    region whose records existed but never matched for `patience` passes in a row is `off`:
    its input moves with the step, so it stops recording and lets its records go.
    """

    def __init__(self, name: str, budget: ByteBudget, patience: int):
        self.name, self.budget, self.patience = name, budget, max(1, int(patience))
        self.records: list = []
        self.cursor = 0
        self.token = None
        self.pass_hits = self.pass_calls = self.cold = 0
        self.pass_had_records = self.off = False
        self.hits = self.misses = 0

    def sync(self, token) -> None:
        """Start a new pass if `token` moved; give up after `patience` passes without a hit."""
        if token == self.token:
            return
        if self.pass_had_records and self.pass_calls:
            self.cold = 0 if self.pass_hits else self.cold + 1
        if self.cold >= self.patience:
            self.off = True
            self.clear()
            log.debug("replay %s: recorded calls never matched for %d passes; off", self.name, self.cold)
        self.token, self.cursor = token, 0
        self.pass_hits = self.pass_calls = 0
        self.pass_had_records = any(r is not None for r in self.records)

    def find(self, matches: Callable[[object], bool]):
        """The intact record `matches` accepts (counted as a hit), or None (a miss)."""
        self.pass_calls += 1
        n = len(self.records)
        for i in ([self.cursor] if self.cursor < n else []) + [i for i in range(n) if i != self.cursor]:
            rec = self.records[i]
            if rec is None:
                continue
            if not rec.intact():
                self.budget.used -= rec.nbytes
                self.records[i] = None
                continue
            if matches(rec):
                self.cursor = i + 1
                self.hits += 1
                self.pass_hits += 1
                return rec
        self.misses += 1
        return None

    def at_cursor(self):
        """The record the next call in order would replace."""
        return self.records[self.cursor] if self.cursor < len(self.records) else None

    def skip(self) -> None:
        """Leave the record at the cursor in place for this call."""
        self.cursor += 1

    def store(self, rec) -> bool:
        """Record `rec` at the cursor if the budget allows; whether it was kept."""
        old = self.at_cursor()
        freed = old.nbytes if old is not None else 0
        budget = self.budget
        if budget.used - freed + rec.nbytes > budget.limit:
            return False
        budget.used += rec.nbytes - freed
        budget.peak = max(budget.peak, budget.used)
        if self.cursor < len(self.records):
            self.records[self.cursor] = rec
        else:
            self.records.append(rec)
        self.cursor += 1
        return True

    def clear(self) -> None:
        self.budget.used -= sum(r.nbytes for r in self.records if r is not None)
        self.records, self.cursor = [], 0
