"""Stage-one image input: list an image source, decode robustly, resize, normalise, batch.

A source is either a folder (searched recursively for common image extensions) or a COCO JSON file
plus the folder its ``file_name`` entries are relative to; labels in the JSON are ignored, COCO ids
are kept. Decoding goes through OpenCV (``cv2.imdecode`` on the file's bytes) and always returns an
``(H, W, 3)`` uint8 RGB array in the image's upright (EXIF-corrected) orientation, or raises
:class:`UnreadableImage` whose message is the reason, so the proposals driver can record the file as
unreadable and carry on. Files are untrusted: ``pipeline.inputs.image_files`` bounds what one may
cost (regular files only, a size cap, a pixel limit read from the header) before decoding.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor

from pipeline.backbones.backbone import IMAGENET_MEAN, IMAGENET_STD
from pipeline.inputs.image_files import (
    ImageLimits,
    UnreadableImage,
    check_pixels,
    declared_size,
    read_image_bytes,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# Transparent pixels are composited onto the ImageNet mean colour: after normalise() they are
# zero, exactly like the batch padding, so transparency carries no signal into the backbone.
_ALPHA_BACKGROUND = np.array([round(255 * m) for m in IMAGENET_MEAN], dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Listing


# --------------------------------------------------------------------------------------------
# Decoding


def _sniff(data: bytes) -> str:
    """Container format from the magic bytes ("" when unknown: OpenCV still gets a try)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return ""


def _is_truncated(data: bytes, fmt: str) -> bool:
    """True when the file visibly ends early (OpenCV may half-decode such files silently)."""
    if fmt == "jpeg":
        # Entropy-coded data cannot contain 0xFFD9 (0xFF bytes are stuffed), so a whole file has
        # an end-of-image marker after its last start-of-scan; an EXIF thumbnail's own markers
        # come before the main image's scans and do not fool this.
        sos = data.rfind(b"\xff\xda")
        return sos < 0 or data.find(b"\xff\xd9", sos + 2) < 0
    if fmt == "png":
        return data.rfind(b"IEND") < 0
    if fmt == "webp":
        return len(data) < 8 + struct.unpack_from("<I", data, 4)[0]
    if fmt == "bmp" and len(data) >= 6:
        return len(data) < struct.unpack_from("<I", data, 2)[0]
    return False


def _tiff_orientation(tiff: bytes) -> int:
    """EXIF orientation (1-8) from a TIFF-structured EXIF block; 1 when absent or malformed."""
    try:
        endian = {b"II": "<", b"MM": ">"}[tiff[:2]]
        ifd = struct.unpack_from(endian + "I", tiff, 4)[0]
        count = struct.unpack_from(endian + "H", tiff, ifd)[0]
        for k in range(count):
            tag, kind = struct.unpack_from(endian + "HH", tiff, ifd + 2 + 12 * k)
            if tag == 0x0112:  # Orientation, type SHORT: value sits in the entry's first 2 bytes
                value = struct.unpack_from(endian + "H", tiff, ifd + 2 + 12 * k + 8)[0]
                return value if kind == 3 and 1 <= value <= 8 else 1
    except (KeyError, struct.error):
        pass
    return 1


def _exif_orientation(data: bytes, fmt: str) -> int:
    """Read the EXIF orientation tag without decoding pixels (JPEG APP1, PNG eXIf, WebP, TIFF).

    ``cv2.IMREAD_UNCHANGED`` (needed to keep alpha and 16-bit samples) ignores EXIF, so the
    orientation is applied here instead; this also keeps the behaviour independent of OpenCV's
    per-format EXIF support.
    """
    try:
        if fmt == "jpeg":
            i = 2
            while i + 4 <= len(data) and data[i] == 0xFF:
                marker = data[i + 1]
                if marker == 0xDA:  # start of scan: no metadata after it
                    break
                if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD8:
                    i += 1 if marker == 0xFF else 2  # fill byte or a marker without a length
                    continue
                length = struct.unpack_from(">H", data, i + 2)[0]
                if marker == 0xE1 and data[i + 4 : i + 10] == b"Exif\x00\x00":
                    return _tiff_orientation(data[i + 10 : i + 2 + length])
                i += 2 + length
        elif fmt == "png":
            i = 8
            while i + 8 <= len(data):
                length, kind = struct.unpack_from(">I4s", data, i)
                if kind == b"eXIf":
                    return _tiff_orientation(data[i + 8 : i + 8 + length])
                if kind == b"IEND":
                    break
                i += 12 + length
        elif fmt == "webp":
            i = 12
            while i + 8 <= len(data):
                kind, length = struct.unpack_from("<4sI", data, i)
                if kind == b"EXIF":
                    block = data[i + 8 : i + 8 + length]
                    return _tiff_orientation(block[6:] if block[:6] == b"Exif\x00\x00" else block)
                i += 8 + length + (length & 1)
        elif fmt == "tiff":
            return _tiff_orientation(data)
    except struct.error:
        pass
    return 1


def _apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """Turn a stored image upright for EXIF orientation 1-8 (as PIL's exif_transpose does)."""
    ops = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),  # transverse (anti-diagonal mirror)
        8: lambda a: np.rot90(a, 1),
    }
    if orientation in ops:
        img = np.ascontiguousarray(ops[orientation](img))
    return img


def _rows_to_rgb8(img: np.ndarray) -> np.ndarray:
    """A band of rows of an OpenCV decode result -> (rows, W, 3) RGB, uint8 or float32."""
    if img.dtype == np.uint16:
        img = (img.astype(np.float32) / 257.0).round()  # 65535 -> 255 exactly
    elif img.dtype in (np.float32, np.float64):
        img = np.clip(img.astype(np.float32), 0.0, 1.0) * 255.0
    elif img.dtype != np.uint8:
        raise UnreadableImage(f"unsupported pixel type {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 2:
        rgb = np.repeat(img[:, :, None], 3, axis=2)
    elif img.ndim == 3 and img.shape[2] == 3:
        rgb = img[:, :, ::-1]
    elif img.ndim == 3 and img.shape[2] == 4:
        alpha = img[:, :, 3:4].astype(np.float32) / 255.0
        bgr = img[:, :, :3].astype(np.float32)
        rgb = (bgr * alpha + _ALPHA_BACKGROUND[::-1] * (1.0 - alpha))[:, :, ::-1]
    else:
        raise UnreadableImage(f"unsupported channel layout {img.shape}")
    return rgb


# Rows converted at a time: float32 intermediates exist for one band only, never for the whole
# image (at the pixel limit a full-size float32 RGBA copy would be over 1 GB).
_BAND_ROWS = 256


def _to_rgb8(img: np.ndarray) -> np.ndarray:
    """Any OpenCV decode result (gray, BGR, BGRA; 8/16-bit or float) -> (H, W, 3) uint8 RGB."""
    if img.dtype not in (np.uint8, np.uint16, np.float32, np.float64):
        raise UnreadableImage(f"unsupported pixel type {img.dtype}")
    channels = 1 if img.ndim == 2 else img.shape[2] if img.ndim == 3 else 0
    if channels not in (1, 3, 4):
        raise UnreadableImage(f"unsupported channel layout {img.shape}")
    out = np.empty((img.shape[0], img.shape[1], 3), np.uint8)
    for top in range(0, img.shape[0], _BAND_ROWS):
        band = _rows_to_rgb8(img[top : top + _BAND_ROWS])
        if band.dtype != np.uint8:
            band = np.clip(np.round(band), 0, 255)
        out[top : top + _BAND_ROWS] = band
    return out


def read_checked(path: Path, limits: ImageLimits | None = None) -> tuple[bytes, str]:
    """The bytes and sniffed format of an image file that passes every check short of decoding:
    a regular file within ``limits`` (bytes, header pixels), not empty, not visibly truncated.
    UnreadableImage with a short reason otherwise."""
    limits = limits or ImageLimits()
    data = read_image_bytes(path, limits)
    if not data:
        raise UnreadableImage("zero-byte file")
    fmt = _sniff(data)
    if fmt and _is_truncated(data, fmt):
        raise UnreadableImage(f"truncated {fmt.upper()} file")
    check_pixels(data, fmt, limits)
    return data, fmt


# The first bytes of a file hold its header and, in practice, its EXIF orientation.
_HINT_BYTES = 1 << 16


def size_hint(path: Path) -> tuple[int, int] | None:
    """(width, height) of the upright image from the header in the file's first 64 KiB, without
    decoding; None when unknown. A scheduling hint only (stage one groups images of one shape
    into a batch): nothing computed depends on it, so a wrong or missing hint costs speed, never
    a different result."""
    try:
        with open(path, "rb") as f:
            data = f.read(_HINT_BYTES)
    except OSError:
        return None
    fmt = _sniff(data)
    size = declared_size(data, fmt)
    if size is None:
        return None
    width, height = size
    # EXIF orientations 5-8 turn the image by a quarter: its upright width is the stored height
    return (height, width) if _exif_orientation(data, fmt) >= 5 else (width, height)


def decode_image(path: Path, min_side: int = 1, limits: ImageLimits | None = None) -> np.ndarray:
    """Decode ``path`` to an upright ``(H, W, 3)`` uint8 RGB array.

    Grayscale, RGBA / palette with transparency (composited onto the ImageNet mean colour),
    16-bit (scaled to 8-bit), CMYK JPEG and palette images all come out as RGB. EXIF orientation
    is applied. ``min_side``: the smallest allowed height and width (callers pass two backbone
    patches). Raises :class:`UnreadableImage` with a short reason otherwise.
    """
    data, fmt = read_checked(Path(path), limits)
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as e:
        if "CV_IO_MAX_IMAGE_PIXELS" in str(e):
            raise UnreadableImage(
                "too large to decode (over OpenCV's pixel limit; raise "
                "OPENCV_IO_MAX_IMAGE_PIXELS to allow it)"
            ) from None
        raise UnreadableImage(f"cannot decode ({str(e).strip().splitlines()[-1]})") from None
    if img is None:
        raise UnreadableImage(f"corrupt {fmt.upper()} file" if fmt else "not an image")
    img = _apply_orientation(_to_rgb8(img), _exif_orientation(data, fmt))
    h, w = img.shape[:2]
    if min(h, w) < min_side:
        raise UnreadableImage(f"too small ({w}x{h})")
    return img


# --------------------------------------------------------------------------------------------
# Network input


def resize_keep_ratio(img: np.ndarray, short_side: int, max_side: int) -> tuple[np.ndarray, float]:
    """Resize so the short side is ``short_side`` unless the long side would exceed ``max_side``.

    Returns the resized ``(h, w, 3)`` image and the scale factor applied (new / old; the two
    axes differ from it only by rounding to whole pixels). Downscaling uses area averaging (no
    aliasing on very large photos), upscaling bilinear interpolation.
    """
    h, w = img.shape[:2]
    scale = min(short_side / min(h, w), max_side / max(h, w))
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    if (new_h, new_w) == (h, w):
        return img, 1.0
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(img, (new_w, new_h), interpolation=interp), scale


def normalise(img: np.ndarray) -> Tensor:
    """``(H, W, 3)`` uint8 RGB -> ``(3, H, W)`` float32 normalised with ImageNet mean/std."""
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    return (x - mean) / std


def pad_batch(images: list[Tensor], divisor: int) -> Tensor:
    """Stack ``(3, H_i, W_i)`` tensors into ``(B, 3, Hp, Wp)``, zero-padded bottom/right.

    ``Hp`` and ``Wp`` are the largest height and width rounded up to a multiple of ``divisor``.
    Zero is the ImageNet mean after normalisation, i.e. neutral grey.
    """
    if not images:
        raise ValueError("pad_batch needs at least one image")
    hp = math.ceil(max(x.shape[-2] for x in images) / divisor) * divisor
    wp = math.ceil(max(x.shape[-1] for x in images) / divisor) * divisor
    out = images[0].new_zeros((len(images), images[0].shape[0], hp, wp))
    for i, x in enumerate(images):
        out[i, :, : x.shape[-2], : x.shape[-1]] = x
    return out
