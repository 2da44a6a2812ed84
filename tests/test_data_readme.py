"""data/ is described by a committed README; what is generated or linked there stays ignored."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _ignored(path: str) -> bool:
    run = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", path], check=False)
    return run.returncode == 0


def test_data_readme_is_committed_and_generated_data_ignored():
    text = (ROOT / "data" / "README.md").read_text()
    for words in ("data/demo/", "instances_train.json", "ln -s /path/to/coco data/coco", "val2017"):
        assert words in text
    assert not _ignored("data/README.md")
    assert _ignored("data/demo/train/000001.png") and _ignored("data/coco")
