"""Image listing and robust decoding: every bad-input kind is made on the fly in tmp_path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from pipeline.backbones.backbone import IMAGENET_MEAN, IMAGENET_STD
from pipeline.cli import UserError
from pipeline.inputs.image_files import ImageLimits
from pipeline.inputs.images import (
    UnreadableImage,
    _to_rgb8,
    decode_image,
    normalise,
    pad_batch,
    resize_keep_ratio,
    size_hint,
)
from pipeline.inputs.listing import ImageItem, list_images

ROOT = Path(__file__).resolve().parents[2]


def _blocks(h: int = 30, w: int = 50) -> np.ndarray:
    """An asymmetric RGB test card (flips and rotations all look different)."""
    a = np.full((h, w, 3), 40, np.uint8)
    a[: h // 3, : w // 2] = (250, 20, 20)
    a[2 * h // 3 :, 3 * w // 5 :] = (20, 20, 250)
    a[h // 3 : 2 * h // 3, : w // 5] = (20, 250, 20)
    return a


def _write_cv(path: Path, rgb_or_raw: np.ndarray, rgb: bool = True) -> Path:
    img = rgb_or_raw[:, :, ::-1] if rgb and rgb_or_raw.ndim == 3 else rgb_or_raw
    ok, buf = cv2.imencode(path.suffix, np.ascontiguousarray(img))
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def _reason(path: Path, **kw) -> str:
    with pytest.raises(UnreadableImage) as e:
        decode_image(path, **kw)
    return str(e.value)


# ---------------------------------------------------------------------------------------------
# Bad files


def test_zero_byte_missing_and_not_an_image(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert _reason(tmp_path / "empty.jpg") == "zero-byte file"
    assert _reason(tmp_path / "missing.jpg") == "file not found"
    (tmp_path / "notes.jpg").write_text("these are not the pixels you are looking for\n" * 20)
    assert _reason(tmp_path / "notes.jpg") == "not an image"


def test_truncated_files(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)
    for suffix in (".jpg", ".png", ".webp", ".bmp"):
        whole = _write_cv(tmp_path / f"whole{suffix}", img)
        data = whole.read_bytes()
        assert decode_image(whole).shape == (64, 80, 3)
        cut = tmp_path / f"cut{suffix}"
        cut.write_bytes(data[: len(data) * 2 // 3])
        assert "truncated" in _reason(cut), suffix
    # a JPEG missing only its final end-of-image marker is caught too
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "noeoi.jpg").write_bytes(data[:-2])
    assert _reason(tmp_path / "noeoi.jpg") == "truncated JPEG file"
    # bytes appended after a whole JPEG do not make it truncated
    (tmp_path / "trailer.jpg").write_bytes(data + b"\x00" * 64)
    assert decode_image(tmp_path / "trailer.jpg").shape == (64, 80, 3)


def test_too_small(tmp_path):
    p = _write_cv(tmp_path / "tiny.png", _blocks(10, 10))
    assert decode_image(p).shape == (10, 10, 3)  # min_side defaults to 1
    assert _reason(p, min_side=28) == "too small (10x10)"
    p = _write_cv(tmp_path / "thin.png", _blocks(12, 40))
    assert _reason(p, min_side=28) == "too small (40x12)"


def test_over_opencv_pixel_limit_is_reported(tmp_path):
    p = _write_cv(tmp_path / "big.png", _blocks(40, 40))
    code = (
        "import sys; from pipeline.inputs.images import decode_image, UnreadableImage\n"
        "try:\n    decode_image(sys.argv[1])\nexcept UnreadableImage as e:\n    print(e)\n"
    )
    env = dict(os.environ, OPENCV_IO_MAX_IMAGE_PIXELS="1000", OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", code, str(p)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.stdout.startswith("too large to decode"), out.stdout + out.stderr


# ---------------------------------------------------------------------------------------------
# Unusual but valid files


def test_grayscale_png(tmp_path):
    gray = np.arange(20 * 30, dtype=np.uint8).reshape(20, 30)
    img = decode_image(_write_cv(tmp_path / "g.png", gray, rgb=False))
    assert img.shape == (20, 30, 3) and img.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(img[:, :, c], gray)


def test_rgba_png_composites_onto_mean_colour(tmp_path):
    rgba = np.zeros((8, 10, 4), np.uint8)
    rgba[:, :5] = (200, 10, 30, 255)  # opaque left half
    rgba[:, 5:] = (0, 0, 0, 0)  # transparent right half (black underneath)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    img = decode_image(tmp_path / "a.png")
    assert img.shape == (8, 10, 3)
    np.testing.assert_array_equal(img[:, :5], np.broadcast_to([200, 10, 30], (8, 5, 3)))
    mean = [round(255 * m) for m in IMAGENET_MEAN]
    np.testing.assert_array_equal(img[:, 5:], np.broadcast_to(mean, (8, 5, 3)))


def test_sixteen_bit_png_scaled(tmp_path):
    rgb16 = np.zeros((4, 6, 3), np.uint16)
    rgb16[..., 0] = 65535
    rgb16[..., 1] = 257 * 100
    rgb16[..., 2] = 257 * 7
    img = decode_image(_write_cv(tmp_path / "c16.png", rgb16))
    assert img.dtype == np.uint8
    np.testing.assert_array_equal(img[0, 0], [255, 100, 7])
    gray16 = np.full((4, 6), 257 * 42, np.uint16)
    img = decode_image(_write_cv(tmp_path / "g16.png", gray16, rgb=False))
    np.testing.assert_array_equal(img, np.full((4, 6, 3), 42, np.uint8))


def test_cmyk_jpeg(tmp_path):
    rgb = _blocks(32, 48)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    with Image.open(tmp_path / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
        ref = np.asarray(im.convert("RGB")).astype(int)
    img = decode_image(tmp_path / "cmyk.jpg")
    assert img.shape == (32, 48, 3)
    assert np.abs(img.astype(int) - ref).mean() < 3
    assert np.abs(img.astype(int) - rgb.astype(int)).mean() < 8


def test_palette_png(tmp_path):
    rgb = _blocks()
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(
        tmp_path / "p.png"
    )
    with Image.open(tmp_path / "p.png") as im:
        assert im.mode == "P"
        ref = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(decode_image(tmp_path / "p.png"), ref)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_jpeg(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(_blocks()).save(tmp_path / "o.jpg", quality=95, exif=exif)
    with Image.open(tmp_path / "o.jpg") as im:
        ref = np.asarray(ImageOps.exif_transpose(im).convert("RGB")).astype(int)
    img = decode_image(tmp_path / "o.jpg")
    assert img.shape == ref.shape
    assert np.abs(img.astype(int) - ref).mean() < 3
    # the batch-grouping hint reads the upright size from the header alone
    assert size_hint(tmp_path / "o.jpg") == (img.shape[1], img.shape[0])


@pytest.mark.parametrize("orientation", [3, 5, 6, 7])
def test_exif_orientation_png(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(_blocks()).save(tmp_path / "o.png", exif=exif)
    with Image.open(tmp_path / "o.png") as im:
        ref = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    np.testing.assert_array_equal(decode_image(tmp_path / "o.png"), ref)
    assert size_hint(tmp_path / "o.png") == (ref.shape[1], ref.shape[0])


def test_size_hint_is_none_when_unknown(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    assert size_hint(tmp_path / "x.jpg") is None
    assert size_hint(tmp_path / "missing.png") is None


def test_large_image_decodes_and_resizes(tmp_path):
    rgb = np.empty((4000, 6000, 3), np.uint8)
    rgb[..., 0] = (np.arange(6000) // 24 % 256).astype(np.uint8)[None]
    rgb[..., 1] = (np.arange(4000) // 16 % 256).astype(np.uint8)[:, None]
    rgb[..., 2] = 90
    p = _write_cv(tmp_path / "big.jpg", rgb)
    img = decode_image(p, min_side=28)
    assert img.shape == (4000, 6000, 3)
    small, scale = resize_keep_ratio(img, 448, 672)
    assert small.shape == (448, 672, 3) and scale == pytest.approx(672 / 6000)
    # area averaging keeps the horizontal ramp (column 336 of 672 ~ source column 3000)
    assert abs(int(small[200, 336, 0]) - 3000 // 24 % 256) <= 2


# ---------------------------------------------------------------------------------------------
# Listing


def test_list_folder(tmp_path):
    for rel in (
        "b/z.png",
        "a.JPG",
        "b/a.jpeg",
        "c/d/e.webp",
        ".hidden/x.jpg",
        "notes.txt",
        "b/.ds.jpg",
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    items = list_images(tmp_path)
    assert [it.file_name for it in items] == ["a.JPG", "b/a.jpeg", "b/z.png", "c/d/e.webp"]
    assert [it.image_id for it in items] == [0, 1, 2, 3]
    assert items[2] == ImageItem("b/z.png", 2, tmp_path / "b" / "z.png")


def test_non_utf8_file_names_are_a_counted_skip(tmp_path, capsys):
    """Such a name cannot be stored in a shard: it used to fail its shard on every retry."""
    (tmp_path / "good.png").write_bytes(b"x")
    with open(os.path.join(os.fsencode(tmp_path), b"bad_\xff.png"), "wb") as f:
        f.write(b"x")
    items = list_images(tmp_path)
    assert [it.file_name for it in items] == ["good.png"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "skipped 1 image(s)" in err[0] and "not valid UTF-8" in err[0]


def test_list_folder_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        list_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(UserError, match="no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(UserError, match="folder or a COCO JSON"):
        list_images(tmp_path / "empty" / "readme.txt")


def test_list_coco(tmp_path):
    coco = {
        "images": [
            {"id": 7, "file_name": "b.jpg", "height": 1, "width": 1},
            {"id": 3, "file_name": "sub/a.jpg"},
            {"id": 12, "file_name": "a.png"},
        ],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 1}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    (tmp_path / "imgs").mkdir()
    items = list_images(tmp_path / "ann.json", tmp_path / "imgs")
    assert [(it.file_name, it.image_id) for it in items] == [
        ("a.png", 12),
        ("b.jpg", 7),
        ("sub/a.jpg", 3),
    ]
    assert items[2].path == tmp_path / "imgs" / "sub" / "a.jpg"
    # a listed file that is missing on disk is reported when decoded, not when listed
    assert _reason(items[0].path) == "file not found"


def test_list_coco_errors(tmp_path):
    (tmp_path / "imgs").mkdir()
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}]}))
    with pytest.raises(UserError, match="image folder"):
        list_images(ann)
    with pytest.raises(UserError, match="image root not found"):
        list_images(ann, tmp_path / "nowhere")
    ann.write_text(json.dumps({"images": []}))
    with pytest.raises(UserError, match="empty"):
        list_images(ann, tmp_path / "imgs")
    ann.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        list_images(ann, tmp_path / "imgs")
    ann.write_text(
        json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}]})
    )
    with pytest.raises(UserError, match="duplicate image id"):
        list_images(ann, tmp_path / "imgs")


# ---------------------------------------------------------------------------------------------
# Network input


def test_resize_keep_ratio():
    img = np.zeros((300, 400, 3), np.uint8)
    out, scale = resize_keep_ratio(img, 600, 1000)  # short side rules: upscale x2
    assert out.shape == (600, 800, 3) and scale == 2.0
    out, scale = resize_keep_ratio(np.zeros((100, 1000, 3), np.uint8), 448, 672)  # long side caps
    assert out.shape == (67, 672, 3) and scale == pytest.approx(0.672)
    out, scale = resize_keep_ratio(img, 300, 1000)
    assert out is img and scale == 1.0


def test_normalise_and_pad_batch():
    mean = np.array([round(255 * m) for m in IMAGENET_MEAN], np.uint8)
    img = np.broadcast_to(mean, (5, 7, 3)).copy()
    img[0, 0] = 255
    x = normalise(img)
    assert x.shape == (3, 5, 7) and x.dtype == torch.float32
    assert x[:, 1:, 1:].abs().max() < 0.01
    torch.testing.assert_close(
        x[:, 0, 0],
        torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]),
    )
    a, b = torch.randn(3, 20, 30), torch.randn(3, 29, 10)
    batch = pad_batch([a, b], 14)
    assert batch.shape == (2, 3, 42, 42)
    assert torch.equal(batch[0, :, :20, :30], a) and torch.equal(batch[1, :, :29, :10], b)
    assert batch[0, :, 20:].abs().sum() == 0 and batch[1, :, :, 10:].abs().sum() == 0
    with pytest.raises(ValueError):
        pad_batch([], 14)


# ---------------------------------------------------------------------------------------------
# Untrusted files: bounded memory, no hangs, no reading outside the image root (issue 15)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    import zlib

    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return len(body).to_bytes(4, "big") + kind + body + crc.to_bytes(4, "big")


def _bomb_png(path: Path, width: int, height: int) -> Path:
    """A few hundred bytes whose header declares width x height RGBA pixels."""
    import zlib

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 6, 0, 0, 0])
    idat = zlib.compress(b"\x00" * 4096, 9)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
    path.write_bytes(data + _png_chunk(b"IEND", b""))
    return path


def test_header_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    bomb = _bomb_png(tmp_path / "bomb.png", 14000, 14000)
    assert bomb.stat().st_size < 1000
    monkeypatch.setattr(cv2, "imdecode", lambda *a: pytest.fail("decoded a bomb"))
    reason = _reason(bomb, limits=ImageLimits(max_pixels=10_000_000))
    assert reason.startswith("too large to decode (14000x14000 = 196 MP; the limit is 10 MP")
    # a JPEG whose frame header was edited to claim 20000 x 20000 pixels
    data = bytearray(_write_cv(tmp_path / "small.jpg", _blocks()).read_bytes())
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (20000).to_bytes(2, "big") * 2
    (tmp_path / "bomb.jpg").write_bytes(bytes(data))
    assert "20000x20000" in _reason(tmp_path / "bomb.jpg", limits=ImageLimits(max_pixels=10**6))


def test_default_pixel_limit_is_far_below_opencv():
    assert ImageLimits().max_pixels <= 2**30 // 16


def test_image_at_the_pixel_limit_decodes(tmp_path):
    path = _write_cv(tmp_path / "ok.png", _blocks(30, 40))
    assert decode_image(path, limits=ImageLimits(max_pixels=1200)).shape == (30, 40, 3)
    assert "too large" in _reason(path, limits=ImageLimits(max_pixels=1199))


def test_file_size_cap(tmp_path):
    path = _write_cv(tmp_path / "big.png", np.random.default_rng(0).integers(0, 255, (64, 64, 3)))
    assert "file too large" in _reason(path, limits=ImageLimits(max_bytes=1000))


def test_devices_and_fifos_are_refused_without_reading(tmp_path):
    import threading

    assert _reason(Path("/dev/null")) == "not a regular file (a device, FIFO or socket)"
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    result: list[str] = []
    # Opening a FIFO with no writer blocks forever in a plain open(): run it where a hang shows.
    t = threading.Thread(target=lambda: result.append(_reason(fifo)), daemon=True)
    t.start()
    t.join(timeout=10)
    assert result == ["not a regular file (a device, FIFO or socket)"]


def test_coco_file_names_outside_the_root_are_refused(tmp_path):
    (tmp_path / "imgs").mkdir()
    ann = tmp_path / "ann.json"
    for name in ("../secret.png", "/dev/zero", "sub/../../x.png"):
        ann.write_text(json.dumps({"images": [{"id": 1, "file_name": name}]}))
        with pytest.raises(UserError, match="outside the image root"):
            list_images(ann, tmp_path / "imgs")
    items = list_images(ann, tmp_path / "imgs", allow_outside_root=True)
    assert items[0].file_name == "sub/../../x.png"


def test_conversion_makes_no_full_size_float_copy():
    import tracemalloc

    rgba16 = np.random.default_rng(0).integers(0, 65535, (2048, 2048, 4), dtype=np.uint16)
    tracemalloc.start()
    try:
        out = _to_rgb8(rgba16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape == (2048, 2048, 3) and out.dtype == np.uint8
    assert peak < 2048 * 2048 * 4 * 4  # less than one float32 copy of the image
