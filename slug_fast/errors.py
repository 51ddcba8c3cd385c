"""Errors slug_fast raises; each names what was wrong and what would be right."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class SlugError(ValueError):
    """Bad input to slug_fast (a name, a shape, a dtype, a file, an empty set)."""


class NonFiniteError(SlugError):
    """A parameter or gradient holds NaN or Inf."""


class CriterionNotReached(Exception):
    """The step search spent its budget without the criterion holding; nothing was changed.

    An outcome, not bad input: not a SlugError (nor a ValueError), so `except SlugError` does not take it."""

    def __init__(self, message: str, searches: list):
        super().__init__(message)
        self.searches = searches


class EmptySetError(SlugError):
    """A forget or retain set held no batch."""


class DeltaError(SlugError):
    """A delta file is corrupt or does not match the model it is applied to."""


def unknown_name(kind: str, name: str, known: Iterable[str]) -> SlugError:
    """'<kind> 'x' not found; closest: a, b, c' with candidates from `known`."""
    known = list(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.4) or known[:3]
    hint = f"; closest: {', '.join(close)}" if close else "; the model has no parameters"
    return SlugError(f"{kind} {name!r} not found{hint}")
