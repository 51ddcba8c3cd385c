"""SlugConfig: unlearn's settings as one typed, checked record (PEFT-style typed configs).

    config = slug_fast.SlugConfig(strategy="deepest", max_evals=6, memory_budget="0.5x")
    slug_fast.unlearn(model, forget, retain, criterion, config=config)

Every setting is checked when the record is made, so a typo never costs a gradient pass;
unlearn's keywords build the same record. A config gives every setting at once (the
defaults below for those it leaves out), so a setting may not also come as a keyword.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ._backends import BACKENDS
from .choice import check_strategy
from .distributed import PARTITIONS
from .errors import SlugError
from .memory import MODES, Budget, parse_budget
from .search import check_max_evals


@dataclass(frozen=True)
class SlugConfig:
    """unlearn's settings (see `unlearn` for what each does); checked when made.

    strategy: "best" (every front layer searched) or "deepest" (the deepest of each tower).
    tower: a tower name or names to restrict the choice to (None: all).
    group: move each chosen layer with the layers its adapter groups it with (Hugging Face
        q/k/v, fc1/fc2); False: every layer alone; None: the adapter's default (True, but
        False for the generic adapter).
    max_evals: step-search evaluations per layer.
    cache: True, False or "linear" (how search evaluations re-run the model).
    backend: "auto" or one of slug_fast._backends.BACKENDS.
    memory_budget, store, passes: the gradient store's budget, mode and chunked passes.
    checkpointing: recompute activations in backward.
    partition: "owner" or "replicated", on several processes.
    """

    strategy: str = "best"
    tower: str | tuple[str, ...] | None = None
    group: bool | None = None
    max_evals: int = 10
    cache: bool | str = True
    backend: str = "auto"
    memory_budget: int | str | Budget | None = None
    store: str = "auto"
    passes: int | None = None
    checkpointing: bool = False
    partition: str = "owner"

    def __post_init__(self):
        check_strategy(self.strategy)
        if self.tower is not None:
            towers = [self.tower] if isinstance(self.tower, str) else self.tower
            if not isinstance(towers, Sequence) or not towers or not all(isinstance(t, str) for t in towers):
                raise SlugError(f"tower must be a tower name or a non-empty list of names, got {self.tower!r}")
            if not isinstance(self.tower, str):
                object.__setattr__(self, "tower", tuple(self.tower))  # frozen: hashable like the rest
        for name, allowed in (("group", (None, True, False)), ("checkpointing", (True, False))):
            if getattr(self, name) not in allowed:
                raise SlugError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        check_max_evals(self.max_evals)
        if self.cache not in (True, False, "linear"):
            raise SlugError(f"cache must be True, False or 'linear', got {self.cache!r}")
        if self.backend not in ("auto",) + BACKENDS:
            raise SlugError(f"backend must be 'auto' or one of {BACKENDS}, got {self.backend!r}")
        parse_budget(self.memory_budget)
        if self.store not in MODES:
            raise SlugError(f"store must be one of {MODES}, got {self.store!r}")
        if self.passes is not None:
            if self.store != "chunked":
                raise SlugError(f"passes= sets the chunked store's number of passes; pass store='chunked' with it "
                                f"(got store={self.store!r})")
            if isinstance(self.passes, bool) or not isinstance(self.passes, int) or self.passes < 1:
                raise SlugError(f"passes must be a positive integer, got {self.passes!r}")
        if self.partition not in PARTITIONS:
            raise SlugError(f"partition must be one of {PARTITIONS}, got {self.partition!r}")

    @property
    def budget(self) -> Budget | None:
        """memory_budget parsed (slug_fast.memory.parse_budget)."""
        return parse_budget(self.memory_budget)

    def check_several_processes(self) -> None:
        """Refuse the settings that plan one process's gradients (several processes partition them)."""
        if self.memory_budget is not None or self.store != "auto" or self.passes is not None:
            raise SlugError("memory_budget=, store= and passes= plan one process's gradients; on several processes "
                            "partition='owner' keeps 1/N of them per rank (or pass process_group=False)")


class Unset:
    """A setting keyword left out of an unlearn call; shows as SlugConfig's default (help(unlearn))."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return repr(SlugConfig.__dataclass_fields__[self.name].default)


def settings_of(config: SlugConfig | None, keywords: Mapping[str, object]) -> SlugConfig:
    """The settings of an unlearn call: `config`, or a SlugConfig of the setting keywords given
    (those left `Unset` take SlugConfig's defaults); a setting given both ways is refused."""
    given = {k: v for k, v in keywords.items() if not isinstance(v, Unset)}
    if config is None:
        return SlugConfig(**given)
    if not isinstance(config, SlugConfig):
        raise SlugError(f"config must be a slug_fast.SlugConfig, got {type(config).__name__}")
    if given:
        change = ", ".join(f"{k}={v!r}" for k, v in given.items())
        raise SlugError(f"{', '.join(given)} given both as keyword(s) and by config= (a SlugConfig holds every "
                        f"setting); give each setting once: config=dataclasses.replace(config, {change})")
    return config
