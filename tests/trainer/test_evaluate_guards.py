"""``evaluate`` checks its inputs before it scores anything: --out writable, every validation
image within the [data] limits, whole and of its labelled size, the checkpoint's class count
sensible; each problem is one line (naming a validation image as such), never a traceback."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
import torch

from tests.trainer.helpers import run_cli
from tests.trainer.test_finetune import _finetune, tiny_project  # noqa: F401 (fixture)

CKPT = Path("runs/tiny/finetune-0.5/checkpoints/last.pt")


@pytest.fixture
def finetuned(tiny_project):  # noqa: F811
    code, _, err = _finetune(tiny_project[0], 1)
    assert code == 0, err
    return CKPT


def _evaluate(*extra: str) -> tuple[int, str]:
    code, _, err = run_cli("evaluate", "--checkpoint", str(CKPT), *extra)
    lines = [line for line in err.strip().splitlines() if "evaluate:" in line]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert not list(Path(".").rglob("*-segm.json")), "refused only after evaluating"
    return code, lines[0]


def _first_val() -> Path:
    image = json.loads(Path("data/annotations/instances_val.json").read_text())["images"][0]
    return Path("data/val") / image["file_name"]


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (its pixel data is a stub)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def test_out_that_cannot_be_written_is_refused_first(finetuned):
    Path("adir").mkdir()
    assert "is a directory" in _evaluate("--out", "adir")[1]
    Path("afile").write_text("")
    assert "cannot write into afile" in _evaluate("--out", "afile/eval.json")[1]


def test_truncated_validation_image_is_one_line_up_front(finetuned):
    image = _first_val()
    data = image.read_bytes()
    image.write_bytes(data[: len(data) * 2 // 3])  # the header intact, the pixels cut off
    line = _evaluate()[1]
    assert "validation image" in line and "truncated" in line and image.name in line


def test_data_limits_apply_to_the_validation_check(finetuned):
    line = _evaluate("--set", "data.max_image_pixels=100")[1]
    assert "validation image" in line and "max_image_pixels" in line


def test_over_pils_pixel_limit_is_one_line(finetuned):
    _first_val().write_bytes(_png_header_only(20000, 10000))  # 200 MP: PIL refuses to open it
    line = _evaluate("--set", "data.max_image_pixels=1000000000")[1]
    assert "validation image" in line and "unreadable" in line


@pytest.mark.parametrize("value", [-3, "2", 10**9])
def test_crafted_num_classes_is_refused(finetuned, value):
    state = torch.load(CKPT, weights_only=True)
    state["num_classes"] = value
    torch.save(state, CKPT)
    assert "num_classes" in _evaluate()[1]
