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
import re
from dataclasses import dataclass
from typing import Any


def _number(v: float | None) -> str:
    """Whole bounds in full (a seed's 4294967295), others as %g."""
    if v is None:
        return ""
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


@dataclass(frozen=True)
class Range:
    """A closed or half-open numeric interval; None is unbounded on that side."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __str__(self) -> str:
        lo, hi = _number(self.lo), _number(self.hi)
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {lo}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {hi}"
        left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
        return f"in {left}{lo}, {hi}{right}"

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


# Numeric precisions a stage may run in (pipeline.precision checks the device can); "auto" is
# resolved when the config is loaded: bf16 where the device runs it natively, else fp32.
PRECISIONS = ("fp32", "bf16", "fp16", "auto")

# The rules most keys need, named for readability in the sections.
AT_LEAST_ONE = Range(lo=1)
NON_NEGATIVE = Range(lo=0)
POSITIVE = Range(lo=0, lo_open=True)
FRACTION = Range(lo=0, hi=1)  # probabilities and thresholds on [0, 1] maps
POSITIVE_FRACTION = Range(lo=0, hi=1, lo_open=True)
SEED = Range(lo=0, hi=2**32 - 1)  # what NumPy's and torch's seeding take
# Input sizes in pixels: below this an image is a few feature cells, and the run "works" on
# nothing (a short_side of 1 gave empty proposals and masks that vanish in training).
IMAGE_SIDE = Range(lo=32)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def name_problems(name: str) -> list[str]:
    """The experiment ``name`` becomes the folder runs/<name>: one plain folder name only."""
    if _NAME_RE.match(name):
        return []
    return [
        "name must be one folder name of letters, digits, '.', '_' and '-' (not starting with "
        f"'.' or '-'; it becomes runs/<name>), got {name!r}"
    ]


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
