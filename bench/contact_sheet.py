"""A contact sheet of pseudo masks before and after the clean-up, for docs/results.md.

    python bench/contact_sheet.py BEFORE_DIR AFTER_DIR [--images data/photos] [--every 2]
                                  [--tile 128] [--pairs-per-row 4] [--out docs/photos_masks.png]

Each pair of tiles is one photograph: on the left the masks of the proposals folder
``BEFORE_DIR`` (the paper's form), on the right those of ``AFTER_DIR`` (the cleaned form), drawn
as ``pipeline inspect --render`` draws them (best mask on top, scores in the corners, the reason
on an empty image). ``--every N`` takes every N-th image of the folder's sorted list. The sheet
is saved as a 128-colour palette PNG so that it stays small enough to commit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.inputs.images import decode_image  # noqa: E402
from pipeline.inspection.render import render_tile  # noqa: E402
from pipeline.shards.folder_reader import iter_records, shard_paths  # noqa: E402
from pipeline.shards.schema import STATUS_EMPTY  # noqa: E402


def records(folder: str) -> dict:
    return {rec.file_name: rec for _, _, rec in iter_records(shard_paths(folder))}


def tile_of(rec, image: np.ndarray, tile: int) -> np.ndarray:
    note = f"empty: {rec.error}" if rec.status == STATUS_EMPTY else ""
    return render_tile(rec, image, note, tile)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--images", default="data/photos")
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--pairs-per-row", type=int, default=4)
    p.add_argument("--out", default="docs/photos_masks.png")
    args = p.parse_args()
    before, after = records(args.before), records(args.after)
    names = sorted(before)[:: args.every]
    tiles = []
    for name in names:
        image = decode_image(Path(args.images) / name)
        tiles += [tile_of(before[name], image, args.tile), tile_of(after[name], image, args.tile)]
    per_row = 2 * args.pairs_per_row
    rows = -(-len(tiles) // per_row)
    sheet = np.zeros((rows * args.tile, per_row * args.tile, 3), np.uint8)
    for j, t in enumerate(tiles):
        r, c = divmod(j, per_row)
        sheet[r * args.tile : (r + 1) * args.tile, c * args.tile : (c + 1) * args.tile] = t
        if c % 2 == 1:  # a light line between pairs
            sheet[r * args.tile : (r + 1) * args.tile, (c + 1) * args.tile - 1] = 200
    Image.fromarray(sheet).quantize(colors=128).save(args.out, optimize=True)
    print(f"wrote {args.out}: {len(names)} images, {Path(args.out).stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
