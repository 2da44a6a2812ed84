"""Writing output files atomically, so a crash or a second writer never leaves half a file.

Every JSON file a command writes (plans, summaries, splits, metrics, COCO exports, detections)
goes through :func:`write_json`: the text goes to a temporary name in the same folder, then
``os.replace`` renames it, which is atomic on POSIX and Windows. The process id in the temporary
name keeps concurrent writers (torch.distributed ranks writing the same file) apart.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text(path: str | Path, text: str) -> Path:
    """Replace ``path`` with ``text`` in one step (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | Path, data: Any, *, indent: int | None = 2) -> Path:
    """``data`` as JSON at ``path``, atomically. ``indent=None`` writes the compact form (large
    files: COCO exports, detections)."""
    separators = (",", ":") if indent is None else None
    return write_text(path, json.dumps(data, indent=indent, separators=separators) + "\n")
