"""Background fill: fetch the rest of an image after its mount, so that it becomes offline-safe.

A node on a thin link wants an image to stop depending on the link soon after it starts, but
never at the cost of the reads a workload is waiting for. So the fill:

- goes in order: what the access profile (or the TOC's ranks) lists first, then every other
  chunk of the merged tree by layer and by position in the layer blob, so that its requests are
  long contiguous ranges;
- runs strictly below foreground reads, of any image of the service: before each batch it
  waits until no read is waiting on a chunk from the network and none has started to for
  ``PAUSE_AFTER_MISS_S`` (ForegroundMisses, shared like the chunks, SharedChunks), so a read
  never queues behind it in lazyfs (a read that misses while a batch is in flight joins that
  batch's flights or starts its own, as with any prefetch). On the link, the batches in flight
  are held too: the fill is background traffic (lazyfs/model/traffic.py), which the registry
  layer sends on connections of its own with small receive windows and stops reading while
  any foreground request is open (lazyfs/registry/lanes.py), so the sender stops within a
  window and a read's answer meets neither a standing queue nor the fill's bytes;
- keeps a few small batches in flight once reads are quiet (FillRun: one after a pause, one
  more per batch that ends with no read missing, up to ``FILL_PIPELINE``), so a thin link with
  a long round trip stays busy (python -m lazyfs.bench.fill: 1.65x the link's time with one
  1 MiB batch at a time on 20 Mbit/s, 150 ms; 1.06-1.08x pipelined);
- is capped by a token bucket shared by every image of the service (``lazyfs serve
  --fill-rate``), charged as each batch ends with the bytes the image fetched since the last
  charge (each byte once; chunks already cached are free);
- is resumable: chunks already cached are not fetched again (ChunkResolver.prefetch skips
  them), so after a restart a fill only fetches what is still missing.

Event loop only (docs/concurrency.md); a background task, so nothing escapes it
(MountedImage.background).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import anyio

from lazyfs.model.traffic import background_traffic
from lazyfs.mount.tree import LayerChunk, Node, Tree

FILL_BATCH_BYTES = 256 << 10  # small: a read that misses waits behind less of the fill
FILL_PIPELINE = 4  # batches in flight once reads are quiet: 1 MiB, a few round trips of a thin link
PAUSE_AFTER_MISS_S = 0.5
FILL_BURST_BYTES = 4 << 20

FillState = Literal["waiting", "filling", "paused", "done", "failed", "stopped"]


class TokenBucket:
    """``rate_bytes_per_s`` on average, bursts up to ``burst_bytes``; None: no cap."""

    def __init__(self, rate_bytes_per_s: float | None, burst_bytes: int = FILL_BURST_BYTES) -> None:
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


class ForegroundMisses:
    """Service-wide: the reads, of any image, waiting on chunks that were not cached (fetched
    for them, or a flight of someone else's they joined), and when the last one began. Event
    loop only; the resolver reports, the fills of every image wait on it."""

    def __init__(self) -> None:
        self._waiting: list[anyio.Event] = []  # set when the chunk a read waits on is there
        self._last_miss_s = -math.inf  # the loop's clock at the last report
        self.total = 0  # reports so far, for tests and statistics

    def missed(self, done: Iterable[anyio.Event]) -> None:
        """A read now waits on these flights (their ``done`` events)."""
        self._waiting.extend(event for event in done if not event.is_set())
        self._last_miss_s = anyio.current_time()
        self.total += 1

    def in_flight(self) -> int:
        self._waiting = [event for event in self._waiting if not event.is_set()]
        return len(self._waiting)

    def quiet_for_s(self) -> float:
        """Seconds with no read waiting on the network; 0 while one does."""
        if self.in_flight():
            self._last_miss_s = anyio.current_time()  # quiet starts once the last is served
            return 0.0
        return anyio.current_time() - self._last_miss_s

    async def wait_quiet(
        self, pause_s: float = PAUSE_AFTER_MISS_S, pausing: Callable[[], None] | None = None
    ) -> None:
        """Return once reads have been quiet for ``pause_s``; ``pausing`` is called first if
        that means waiting."""
        quiet = self.quiet_for_s()
        if quiet >= pause_s:
            return
        if pausing is not None:
            pausing()
        while quiet < pause_s:
            await anyio.sleep(min(0.1, pause_s - quiet))
            quiet = self.quiet_for_s()


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


class _Counted(Protocol):
    @property
    def bytes_fetched(self) -> int: ...


class Prefetcher(Protocol):
    """What the fill needs of a ChunkResolver (which imports this module)."""

    @property
    def foreground(self) -> ForegroundMisses: ...

    @property
    def stats(self) -> _Counted: ...

    async def prefetch(self, order: Sequence[tuple[Node, LayerChunk]]) -> None: ...


class FillRun:
    """The fill of one image: its batches, a pipeline of them once reads are quiet.

    ``FILL_PIPELINE`` batches in flight from the start; one at a time after a pause, then one
    more for each batch that completes with no read missing meanwhile: a single batch in
    flight leaves the link idle for a round trip between batches (on a 150 ms link, a third
    of the time), while a deep pipeline right after a read would put more of the fill's bytes
    in front of the next one. Each batch, as it ends and before its slot frees, pays the
    bucket for the bytes the image fetched since the last payment (so each byte once,
    whichever batch fetched it; chunks already cached are free): the cap holds whatever the
    depth, ahead of it by at most the batches in flight."""

    def __init__(
        self,
        resolver: Prefetcher,
        bucket: TokenBucket,
        progress: FillProgress,
        pausing: Callable[[], None] | None = None,
    ) -> None:
        self._resolver = resolver
        self._bucket = bucket
        self._progress = progress
        self._pausing = pausing
        # Full depth from the start, when no read has missed: the ramp is for after a read.
        self._depth = FILL_PIPELINE
        self._in_flight = 0
        self._changed = anyio.Event()
        self._charged = resolver.stats.bytes_fetched  # what the prefetch fetched is not fill

    async def run(self, order: Sequence[tuple[Node, LayerChunk]]) -> None:
        foreground = self._resolver.foreground
        # Background traffic: its own connections and receive windows, held on the wire while
        # any foreground request is open (lazyfs/registry/lanes.py).
        with background_traffic():
            await self._run(order, foreground)

    async def _run(
        self, order: Sequence[tuple[Node, LayerChunk]], foreground: ForegroundMisses
    ) -> None:
        async with anyio.create_task_group() as batches:
            for batch in fill_batches(order):
                while True:  # bounded: each pass waits for a batch to end or for quiet reads
                    if foreground.quiet_for_s() < PAUSE_AFTER_MISS_S:
                        self._depth = 1
                        await foreground.wait_quiet(PAUSE_AFTER_MISS_S, self._pausing)
                    if self._in_flight < self._depth:
                        break
                    await self._changed.wait()
                self._progress.state = "filling"
                self._in_flight += 1
                batches.start_soon(self._batch, batch, foreground.total)

    async def _batch(self, batch: list[tuple[Node, LayerChunk]], misses_before: int) -> None:
        try:
            await self._resolver.prefetch(batch)
            self._progress.done_bytes += sum(compressed_bytes(chunk) for _, chunk in batch)
            # The image's reads meanwhile are charged too: a little more than the fill's own.
            fetched = self._resolver.stats.bytes_fetched
            owed, self._charged = fetched - self._charged, fetched
            await self._bucket.take(owed)
            if self._resolver.foreground.total == misses_before:
                self._depth = min(FILL_PIPELINE, self._depth + 1)
        finally:
            self._in_flight -= 1
            self._changed.set()
            self._changed = anyio.Event()
