"""Allowed ranges of config values, checked when a section is loaded.

Types are checked by ``pipeline.config``; this module checks that a well-typed value makes sense
(``lr = -1``, ``batch_size = 0``, ``prompt_keep = 1.5``), so a bad setting stops the command with
one line naming the key instead of a traceback deep in training or, worse, a run that "works" and
produces nothing. A section declares ``RANGES`` (key -> rule) and may add a ``cross_checks()``
method for rules between keys; every float must also be finite (``nan`` and ``inf`` parse as TOML
floats). This module only produces the messages; ``pipeline.config`` raises them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Range:
    """A closed or half-open numeric interval; None is unbounded on that side."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
        return f"in {left}{self.lo:g}, {self.hi:g}{right}"

    def holds(self, value: float) -> bool:
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return False
        return True


@dataclass(frozen=True)
class OneOf:
    """A value from a fixed set of choices (strings such as ``executor``)."""

    choices: tuple[Any, ...]

    def __str__(self) -> str:
        return "one of " + ", ".join(repr(c) for c in self.choices)

    def holds(self, value: Any) -> bool:
        return value in self.choices


# Numeric precisions a stage may run in (pipeline.precision checks the device can).
PRECISIONS = ("fp32", "bf16", "fp16")

# The rules most keys need, named for readability in the sections.
AT_LEAST_ONE = Range(lo=1)
NON_NEGATIVE = Range(lo=0)
POSITIVE = Range(lo=0, lo_open=True)
FRACTION = Range(lo=0, hi=1)  # probabilities and thresholds on [0, 1] maps
POSITIVE_FRACTION = Range(lo=0, hi=1, lo_open=True)


def _values(name: str, value: Any) -> list[tuple[str, Any]]:
    """(name, value) pairs of a scalar, or of each item of a list (``scales[1]``)."""
    if isinstance(value, (list, tuple)):
        return [(f"{name}[{i}]", v) for i, v in enumerate(value)]
    return [(name, value)]


def section_problems(section: Any) -> list[str]:
    """Messages ("lr must be > 0, got -1.0") for every value of ``section`` out of range."""
    rules = getattr(section, "RANGES", {})
    problems = []
    for f in dataclasses.fields(section):
        for name, value in _values(f.name, getattr(section, f.name)):
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(f"{name} must be a finite number, got {value}")
                continue
            rule = rules.get(f.name)
            if rule is not None and not isinstance(value, bool) and not rule.holds(value):
                problems.append(f"{name} must be {rule}, got {value!r}")
    if not problems and hasattr(section, "cross_checks"):
        problems += section.cross_checks()
    return problems
