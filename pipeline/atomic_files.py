"""Writing output files atomically, so a crash or a second writer never leaves half a file.

Every JSON file a command writes (plans, summaries, splits, metrics, COCO exports, detections)
goes through :func:`write_json`: the text goes to a temporary name in the same folder, then
``os.replace`` renames it, which is atomic on POSIX and Windows. The process id in the temporary
name keeps concurrent writers (torch.distributed ranks writing the same file) apart.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

# errno values meaning "this disk or folder cannot take the write": the CLI reports them as one
# line naming the path (pipeline/cli.py), so writers make sure the path is attached.
DISK_ERRORS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (a file-size limit: ulimit -f, or the file system's)",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied (read-only?)",
    errno.EPERM: "operation not permitted (read-only?)",
}


def with_path(e: OSError, path: str | Path) -> OSError:
    """``e`` with ``path`` as its file name when it has none (a failed write() names no file)."""
    if e.filename is None and e.errno is not None:
        return OSError(e.errno, e.strerror or os.strerror(e.errno), str(path))
    return e


def disk_full_or_read_only(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in DISK_ERRORS


def write_text(path: str | Path, text: str) -> Path:
    """Replace ``path`` with ``text`` in one step (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        raise with_path(e, path) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | Path, data: Any, *, indent: int | None = 2) -> Path:
    """``data`` as JSON at ``path``, atomically. ``indent=None`` writes the compact form (large
    files: COCO exports, detections)."""
    separators = (",", ":") if indent is None else None
    return write_text(path, json.dumps(data, indent=indent, separators=separators) + "\n")
