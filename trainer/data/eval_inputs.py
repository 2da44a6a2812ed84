"""What ``evaluate`` checks before it loads a model or scores an image, and how it reports a
failure while scoring: one line each, never a DataLoader worker's traceback.

- ``--out`` must be a file that can be written: a directory, or a folder that cannot be created
  or written to, is refused before the evaluation instead of after it.
- Every validation image is checked without decoding (trainer/data/labelled_check.py): there, within
  the ``[data]`` limits, not visibly truncated, of the size its labels say. A bad one would fail
  the evaluation part-way (and every fine-tuning resume at its first evaluation).
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.cli import UserError
from pipeline.inputs.image_files import ImageLimits
from trainer.config import Config
from trainer.data.labelled_check import check_validation_set
from trainer.data.loader import worker_error_line


def check_output(out: Path) -> None:
    """UserError naming ``out`` unless a metrics file can be written there (and its results
    file beside it)."""
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name such as {out}/eval.json")
    folder = out.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".{out.name}.{os.getpid()}.probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--out {out}: cannot write into {folder} ({e.strerror or e})") from None


def check_validation_images(cfg: Config, coco: dict) -> None:
    """UserError naming the first bad validation image (see the module docstring)."""
    check_validation_set(
        coco, cfg.data.val_images, cfg.data.val_json, ImageLimits.from_data(cfg.data)
    )


def validation_error(e: UserError) -> UserError:
    """A dataset error raised while scoring as one line (a loader worker's copy carries the
    worker's traceback), saying "validation image" for the image it names."""
    line = worker_error_line(str(e))
    return UserError(line.replace("training image", "validation image"))
