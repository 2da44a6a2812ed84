"""Collect the fixed set of real photographs stage one is judged on (issue 22's photo set).

    python bench/photos.py [--out data/photos]

Copies 48 photographs, byte for byte, from packages installed in the environment into one flat
folder (git-ignored under data/), named ``<package>-<file>``: scikit-image's data, matplotlib's
sample data and the PyPI package ``mvtb-data`` (the Machine Vision Toolbox's images; install it
with ``pip install mvtb-data`` if missing). Only the list is committed, not the photographs.
The list keeps photographs of objects, scenes and textures alike (textures such as brick and
gravel are where "nothing salient" is the right answer) and leaves out drawings, calibration
targets and synthetic test patterns. A missing package or file is a one-line error (exit 2).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
from pathlib import Path

PHOTOS = {
    "skimage": (
        "data",
        [
            "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png",
            "clock_motion.png", "coffee.png", "coins.png", "grass.png", "gravel.png",
            "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png",
            "retina.jpg", "rocket.jpg",
        ],
    ),
    "matplotlib": ("mpl-data/sample_data", ["grace_hopper.jpg"]),
    "mvtbdata": (
        "images",
        [
            "58060.png", "Image18.png", "building2-1.png", "butterfly.jpg", "castle.png",
            "church.jpg", "eiffel-1.png", "eiffel-2.png", "flowers1.png", "flowers2.png",
            "flowers3.png", "flowers4.png", "flowers5.png", "flowers6.png", "flowers7.png",
            "flowers8.png", "flowers9.png", "greenscreen.png", "image3.jpg", "lab-scene.png",
            "lena.png", "monalisa.png", "notre-dame.png", "parks.png", "penguins.png",
            "road.png", "rocks2-l.png", "roof.png", "street.png", "tomato_14.png",
            "tomato_54.png",
        ],
    ),
}  # fmt: skip


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        hint = "pip install mvtb-data" if name == "mvtbdata" else f"pip install {name}"
        raise SystemExit(f"error: package {name} is not installed ({hint})")
    return Path(spec.origin).parent


def collect(out: Path) -> list[Path]:
    """Copy every listed photograph into ``out``; returns the copied paths in list order."""
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for package, (sub, names) in PHOTOS.items():
        folder = package_dir(package) / sub
        for name in names:
            src = folder / name
            if not src.is_file():
                raise SystemExit(f"error: {src} not found (another {package} version?)")
            dst = out / f"{package}-{name}"
            shutil.copyfile(src, dst)
            copied.append(dst)
    return copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/photos", help="folder to copy the photographs to")
    args = parser.parse_args(argv)
    try:
        copied = collect(Path(args.out))
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    print(f"copied {len(copied)} photographs to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
