"""Background fill: fetch the rest of an image after its mount, so that it becomes offline-safe.

A node on a thin link wants an image to stop depending on the link soon after it starts, but
never at the cost of the reads a workload is waiting for. So the fill:

- goes in order: what the access profile (or the TOC's ranks) lists first, then every other
  chunk of the merged tree by layer and by position in the layer blob, so that its requests are
  long contiguous ranges;
- runs strictly below foreground reads: before each batch it waits until no read has missed
  for ``pause_after_miss_s``, so a read never queues behind it (a read that misses while a
  batch is in flight joins that batch's flights or starts its own, as with any prefetch);
- is capped by a token bucket shared by every image of the service (``lazyfs serve
  --fill-rate``), charged with each batch's compressed bytes before it is fetched;
- is resumable: chunks already cached are not fetched again (ChunkResolver.prefetch skips
  them), so after a restart a fill only fetches what is still missing.

Event loop only (docs/concurrency.md); a background task, so nothing escapes it
(MountedImage.background).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import anyio

from lazyfs.mount.tree import LayerChunk, Node, Tree

FILL_BATCH_BYTES = 1 << 20
PAUSE_AFTER_MISS_S = 0.5

FillState = Literal["waiting", "filling", "paused", "done", "failed", "stopped"]


class TokenBucket:
    """``rate_bytes_per_s`` on average, bursts up to ``burst_bytes``; None: no cap."""

    def __init__(self, rate_bytes_per_s: float | None, burst_bytes: int = 4 << 20) -> None:
        if rate_bytes_per_s is not None and not (0 < rate_bytes_per_s < math.inf):
            raise ValueError("the fill rate must be finite and positive")
        self.rate_bytes_per_s = rate_bytes_per_s
        self._burst = float(burst_bytes)
        self._tokens = float(burst_bytes)
        self._stamp: float | None = None  # the loop's clock, from the first take
        self._lock: anyio.Lock | None = None  # first come, first served across images

    async def take(self, amount: int) -> None:
        if self.rate_bytes_per_s is None:
            return
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:
            self._refill()
            self._tokens -= amount  # may go negative: a big batch is paid for by waiting
            if self._tokens < 0:
                await anyio.sleep(-self._tokens / self.rate_bytes_per_s)

    def _refill(self) -> None:
        now = anyio.current_time()
        assert self.rate_bytes_per_s is not None
        elapsed = 0.0 if self._stamp is None else now - self._stamp
        self._tokens = min(self._burst, self._tokens + elapsed * self.rate_bytes_per_s)
        self._stamp = now


@dataclass
class FillProgress:
    total_bytes: int = 0  # compressed bytes of every chunk the merged tree uses
    done_bytes: int = 0  # of those, the ones the fill has seen fetched or already cached
    state: FillState = "waiting"
    error: str = ""

    def to_json(self) -> dict[str, object]:
        percent = 100.0 * self.done_bytes / self.total_bytes if self.total_bytes else 100.0
        figures: dict[str, object] = {
            "state": self.state,
            "total_bytes": self.total_bytes,
            "done_bytes": self.done_bytes,
            "percent": round(percent, 2),
        }
        if self.error:
            figures["error"] = self.error
        return figures


def fill_order(
    tree: Tree, first: Sequence[tuple[Node, LayerChunk]]
) -> list[tuple[Node, LayerChunk]]:
    """``first``, then every other chunk the merged tree uses, by layer and blob offset; each
    stored chunk once (hardlinks and duplicate files share theirs)."""
    seen: set[tuple[int, int]] = set()
    order: list[tuple[Node, LayerChunk]] = []
    for node, chunk in first:
        where = (chunk.layer, chunk.ref.blob_offset)
        if where not in seen and not chunk.ref.zeros:
            seen.add(where)
            order.append((node, chunk))
    rest = sorted(
        (
            (chunk.layer, chunk.ref.blob_offset, node.inode, node, chunk)
            for node in tree.nodes.values()
            for chunk in node.chunks
            if not chunk.ref.zeros
        ),
        key=lambda item: item[:3],
    )
    for layer, offset, _inode, node, chunk in rest:
        if (layer, offset) not in seen:
            seen.add((layer, offset))
            order.append((node, chunk))
    return order


def compressed_bytes(chunk: LayerChunk) -> int:
    return chunk.ref.blob_end - chunk.ref.blob_offset


def fill_batches(
    order: Sequence[tuple[Node, LayerChunk]], batch_bytes: int = FILL_BATCH_BYTES
) -> list[list[tuple[Node, LayerChunk]]]:
    batches: list[list[tuple[Node, LayerChunk]]] = [[]]
    size = 0
    for item in order:
        if size >= batch_bytes:
            batches.append([])
            size = 0
        batches[-1].append(item)
        size += compressed_bytes(item[1])
    return [batch for batch in batches if batch]
