"""Work units of a distributed proposals run: shards cut into batches that any actor may take.

A shard is the unit of output and resume (docs/architecture.md), not a good unit of work: a run
with fewer shards than actors leaves actors idle, and the last round of whole shards runs half
empty. So the Ray executor hands out *pieces*: one backbone batch of one shard, exactly the
batches the local worker forms (``batch_size`` consecutive images from the shard's start), so a
ResNet, whose border cells see the batch padding, computes the same numbers either way. The
driver collects each shard's pieces and writes the shard once all of them are in, through the
same writer and under the same rules (temporary name, rename when whole) as the local executor.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.inputs.listing import ImageItem
from pipeline.shards.schema import ImageRecord

Job = tuple[int, list[ImageItem]]  # (shard index, the shard's images)


@dataclass(frozen=True)
class Piece:
    """Images ``start .. start + len(items)`` of shard ``shard``."""

    shard: int
    start: int
    items: tuple[ImageItem, ...]

    @property
    def key(self) -> tuple[int, int]:
        return (self.shard, self.start)


def plan_pieces(jobs: list[Job], batch_size: int) -> list[Piece]:
    """Every job's images as consecutive batches of ``batch_size``, in shard order."""
    bs = max(1, int(batch_size))
    return [
        Piece(index, start, tuple(items[start : start + bs]))
        for index, items in jobs
        for start in range(0, len(items), bs)
    ]


class ShardAssembler:
    """Collects pieces' records per shard; hands a shard's records back, in order, once whole."""

    def __init__(self, jobs: list[Job]):
        self._size = {index: len(items) for index, items in jobs}
        self._parts: dict[int, dict[int, list[ImageRecord]]] = {}

    def add(self, piece: Piece, records: list[ImageRecord]) -> list[ImageRecord] | None:
        """Record one piece's result; returns the shard's records when this completes it."""
        if len(records) != len(piece.items):
            raise ValueError(
                f"shard {piece.shard}: {len(records)} records for a piece of "
                f"{len(piece.items)} images"
            )
        parts = self._parts.setdefault(piece.shard, {})
        parts[piece.start] = records
        if sum(len(r) for r in parts.values()) < self._size[piece.shard]:
            return None
        del self._parts[piece.shard]
        return [r for start in sorted(parts) for r in parts[start]]

    def drop(self, shard: int) -> None:
        """Forget a failed shard's pieces (it is not written; a re-run computes it)."""
        self._parts.pop(shard, None)

    def pending(self) -> int:
        """Shards with some but not all pieces in (held in memory)."""
        return len(self._parts)
