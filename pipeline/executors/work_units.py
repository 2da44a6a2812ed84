"""Work units of a distributed proposals run: shards cut into batches that any actor may take.

A shard is the unit of output and resume (docs/architecture.md), not a good unit of work: a run
with fewer shards than actors leaves actors idle, and the last round of whole shards runs half
empty. So the Ray executor hands out *pieces*: one backbone batch of one shard, exactly the
batches the local worker forms (``shard_batches``), so both executors compute the same numbers.
The driver collects each shard's pieces and writes the shard once all of them are in, through the
same writer and under the same rules (temporary name, rename when whole) as the local executor.

Batches group images of one shape. A batch is padded to its largest image, and the ViT computes
every padded token: on the demo's mixed portrait and landscape photos, batches of 8 consecutive
images are 72% real tokens, batches of like shapes 94%, and the bf16 forward runs 1.4x faster
(docs/benchmarks.md). The batch-invariant ViT gives each image the same features in any batch,
so grouping changes nothing written; a ResNet's border cells see the padding, so its batches stay
``batch_size`` consecutive images, as its fingerprint (which then includes ``batch_size``) assumes.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.inputs.images import size_hint
from pipeline.inputs.listing import ImageItem
from pipeline.shards.schema import ImageRecord

Job = tuple[int, list[ImageItem]]  # (shard index, the shard's images)


def _shape_key(hint: tuple[int, int] | None) -> tuple[int, float]:
    """Landscape images by aspect ratio, then portrait ones, then those of unknown size."""
    if hint is None:
        return (2, 0.0)
    width, height = hint
    if width >= height:
        return (0, width / max(1, height))
    return (1, height / max(1, width))


def shard_batches(items: list[ImageItem], batch_size: int, by_shape: bool) -> list[tuple[int, ...]]:
    """A shard's batches as positions into ``items``: ``batch_size`` at a time, in the shard's
    order, or (``by_shape``, for a batch-invariant backbone) after a stable sort by the images'
    header shapes (``size_hint``), so a batch pads little."""
    order = list(range(len(items)))
    if by_shape:
        keys = [_shape_key(size_hint(it.path)) for it in items]
        order.sort(key=keys.__getitem__)
    bs = max(1, int(batch_size))
    return [tuple(order[i : i + bs]) for i in range(0, len(order), bs)]


@dataclass(frozen=True)
class Piece:
    """The images at ``positions`` of shard ``shard``: one backbone batch."""

    shard: int
    positions: tuple[int, ...]
    items: tuple[ImageItem, ...]

    @property
    def key(self) -> tuple[int, int]:
        return (self.shard, self.positions[0])  # a shard's batches share no position


def shard_pieces(job: Job, batch_size: int, by_shape: bool) -> list[Piece]:
    """One job's batches (``shard_batches``) as pieces."""
    index, items = job
    return [
        Piece(index, positions, tuple(items[i] for i in positions))
        for positions in shard_batches(items, batch_size, by_shape)
    ]


class ShardAssembler:
    """Collects pieces' records per shard; hands a shard's records back, in order, once whole."""

    def __init__(self, jobs: list[Job]):
        self._size = {index: len(items) for index, items in jobs}
        self._parts: dict[int, dict[int, ImageRecord]] = {}  # shard -> position -> record

    def add(self, piece: Piece, records: list[ImageRecord]) -> list[ImageRecord] | None:
        """Record one piece's result; returns the shard's records when this completes it."""
        if len(records) != len(piece.items):
            raise ValueError(
                f"shard {piece.shard}: {len(records)} records for a piece of "
                f"{len(piece.items)} images"
            )
        parts = self._parts.setdefault(piece.shard, {})
        parts.update(zip(piece.positions, records))
        if len(parts) < self._size[piece.shard]:
            return None
        del self._parts[piece.shard]
        return [parts[i] for i in range(len(parts))]

    def drop(self, shard: int) -> None:
        """Forget a failed shard's pieces (it is not written; a re-run computes it)."""
        self._parts.pop(shard, None)

    def pending(self) -> int:
        """Shards with some but not all pieces in (held in memory)."""
        return len(self._parts)
