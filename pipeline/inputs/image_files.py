"""Reading an untrusted image file with bounded memory and no hangs.

Image paths come from folders and COCO files that someone handed you, so before a single pixel is
decoded: the path must be a regular file (``/dev/zero`` would be read until the OOM killer acts, a
FIFO would block ``proposals`` forever), no larger than a size cap, and its header must declare at
most ``max_pixels`` pixels. A 763 KB PNG can declare 14000 x 14000 RGBA pixels (several GB once
decoded); OpenCV's own limit is 2^30 pixels, far too high for a worker that decodes several images
at once. The limits come from the ``[data]`` section (``max_image_pixels``, ``max_image_mb``).
"""

from __future__ import annotations

import io
import os
import stat
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class UnreadableImage(Exception):
    """An image that cannot be used; ``str(e)`` is the reason ("truncated", "not an image"...)."""


@dataclass(frozen=True)
class ImageLimits:
    """What one input image may cost: pixels declared by its header, bytes on disk."""

    max_pixels: int = 64_000_000
    max_bytes: int = 256 * 2**20

    @classmethod
    def from_data(cls, data_cfg: Any) -> ImageLimits:
        """The limits of a ``[data]`` config section."""
        return cls(int(data_cfg.max_image_pixels), int(data_cfg.max_image_mb * 2**20))


def read_image_bytes(path: Path, limits: ImageLimits) -> bytes:
    """The bytes of ``path`` if it is a regular file within the size cap; UnreadableImage if not.

    The file is opened non-blocking and checked again through its descriptor, so a path swapped
    for a FIFO or a device between the check and the open cannot hang or flood the reader.
    """
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise UnreadableImage("is a directory")
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableImage("not a regular file (a device, FIFO or socket)")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise UnreadableImage("file not found") from None
    except OSError as e:
        raise UnreadableImage(f"cannot read file ({e.strerror or e})") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableImage("not a regular file (a device, FIFO or socket)")
        if info.st_size > limits.max_bytes:
            raise UnreadableImage(
                f"file too large ({info.st_size / 2**20:.0f} MB; the limit is "
                f"{limits.max_bytes / 2**20:.0f} MB, data.max_image_mb)"
            )
        try:
            return fh.read(limits.max_bytes + 1)
        except OSError as e:
            raise UnreadableImage(f"cannot read file ({e.strerror or e})") from None


def _png_size(data: bytes) -> tuple[int, int] | None:
    if len(data) >= 24 and data[12:16] == b"IHDR":
        return struct.unpack_from(">II", data, 16)
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from the first start-of-frame marker (any SOFn but DHT/JPG/DAC)."""
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack_from(">HH", data, i + 5)
            return width, height
        if marker == 0xDA:  # start of scan before any frame header: malformed
            return None
        i += 2 + struct.unpack_from(">H", data, i + 2)[0]
    return None


def _pil_size(data: bytes) -> tuple[int, int] | None:
    """Any other format: PIL reads the header only (its lazy open decodes no pixel)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's own bomb warning: the caller decides
            with Image.open(io.BytesIO(data)) as im:
                return im.size
    except Image.DecompressionBombError:
        return (2**31 - 1, 1)  # over PIL's hard limit: surely over ours too
    except Exception:  # PIL raises many kinds for unknown or broken headers
        return None


def declared_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) the file's header declares, without decoding; None when unknown."""
    if fmt == "png":
        return _png_size(data)
    if fmt == "jpeg":
        return _jpeg_size(data) or _pil_size(data)
    return _pil_size(data)


def check_pixels(data: bytes, fmt: str, limits: ImageLimits) -> None:
    """UnreadableImage when the header declares more than ``limits.max_pixels`` pixels."""
    size = declared_size(data, fmt)
    if size is None:
        if fmt:
            raise UnreadableImage(f"corrupt {fmt.upper()} header")
        raise UnreadableImage("not an image")
    width, height = size
    if width * height > limits.max_pixels:
        raise UnreadableImage(
            f"too large to decode ({width}x{height} = {width * height / 1e6:.0f} MP; the limit "
            f"is {limits.max_pixels / 1e6:g} MP, data.max_image_pixels)"
        )
