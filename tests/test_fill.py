"""Background fill (``lazyfs mount --fill``): the rest of the image fetched after the mount,
resumable, then served with the registry gone; and the service-wide token bucket that caps it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import anyio
import pytest
import trio
import trio.testing
from imagebuild import random_bytes
from lazyfs_run import run_lazyfs
from test_resolver import one_file, wait_until
from test_service import Served, read_all, start_service, stop

from lazyfs.cache.store import ChunkCache
from lazyfs.config import ResolverConfig
from lazyfs.convert.imagebuild import regular_file, with_parent_dirs, write_image
from lazyfs.mount.fill import (
    FILL_BATCH_BYTES,
    FILL_PIPELINE,
    FillProgress,
    FillRun,
    ForegroundMisses,
    TokenBucket,
    compressed_bytes,
)
from lazyfs.mount.resolver import ChunkResolver, ResolverStats, SharedChunks
from lazyfs.mount.tree import LayerChunk, Node
from lazyfs.registry.localserver import LocalRegistry

FILES = {f"lib/part{i:02}.bin": random_bytes(256 << 10, seed=300 + i) for i in range(20)}


def wait_filled(mountpoint: Path, timeout_s: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        figures = json.loads(run_lazyfs("stats", "--json", str(mountpoint)).stdout)
        if figures["fill"]["state"] in ("done", "failed"):
            return figures  # type: ignore[no-any-return]
        time.sleep(0.1)
    raise AssertionError(f"the fill did not finish: {figures['fill']}")


def test_fill_makes_the_image_offline_safe_and_resumes_without_refetching(
    service: Served, tmp_path: Path
) -> None:
    with LocalRegistry(tmp_path / "registry") as registry:
        entries = with_parent_dirs(regular_file(p, d) for p, d in FILES.items())
        built = write_image(tmp_path / "src", "v1", [entries])
        ref = f"{registry.host}/fill/app:v1"
        run_lazyfs("convert", "-q", built.reference, ref)
        mountpoint = tmp_path / "mnt"
        service.mount(ref, mountpoint, "--fill")
        figures = wait_filled(mountpoint)
        fill = figures["fill"]
        assert fill["state"] == "done" and fill["done_bytes"] == fill["total_bytes"] > 0  # type: ignore[index]
        assert "offline-safe" in run_lazyfs("stats", str(mountpoint)).stdout
        # The fill went out as background traffic (registry/lanes.py), on its own connections.
        wire = json.loads(service.call("stats", "--json").stdout)["fill_wire"]
        assert wire["background_requests"] > 0
        assert wire["background_bytes"] >= fill["total_bytes"] // 2  # type: ignore[index]
        service.call("umount", str(mountpoint))

        # After a restart, the fill finds everything cached: no blob is fetched again.
        stop(service)
        again = start_service(tmp_path / "svc")
        before = registry.access_log_summary().count("GET", "/v2/fill/app/blobs")
        again.mount(ref, mountpoint, "--fill")
        assert wait_filled(mountpoint)["fill"]["state"] == "done"  # type: ignore[index]
        assert registry.access_log_summary().count("GET", "/v2/fill/app/blobs") == before
    # The registry is gone: every byte is served from the cache.
    try:
        read_all(mountpoint, FILES, threads=4)
    finally:
        again.call("umount", str(mountpoint))
        stop(again)


def test_token_bucket_caps_the_rate_across_takers() -> None:
    async def main() -> float:
        bucket = TokenBucket(1 << 20, burst_bytes=2 << 20)
        start = trio.current_time()
        async with trio.open_nursery() as nursery:  # two images sharing the bucket
            for _ in range(2):
                nursery.start_soon(_take_all, bucket)
        return trio.current_time() - start

    elapsed = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    # 2 x 5 MiB at 1 MiB/s, the first 2 MiB from the burst: 8 s of the mocked clock.
    assert elapsed == pytest.approx(8.0, rel=0.01)


async def _take_all(bucket: TokenBucket) -> None:
    for _ in range(5):
        await bucket.take(1 << 20)


def test_no_cap_never_waits() -> None:
    async def main() -> float:
        bucket, start = TokenBucket(None), trio.current_time()
        await bucket.take(1 << 40)
        return trio.current_time() - start

    assert trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0)) == 0


# ------------------------------------------------------------- the service-wide pause signal


@pytest.fixture
def chunk_cache(tmp_path: Path) -> Iterator[ChunkCache]:
    cache = ChunkCache(tmp_path / "cache", 1 << 30)
    yield cache
    cache.close()


@pytest.mark.anyio
async def test_fill_pauses_while_another_images_read_misses(chunk_cache: ChunkCache) -> None:
    """Two images of one service: while a read of B waits on the network, the fill of A (which
    has missed nothing) waits too; once the read is served and reads stay quiet, it goes on."""
    a, b = one_file([64 << 10] * 4, seed=1), one_file([64 << 10] * 4, seed=2)
    b.source.gate = anyio.Event()
    config = ResolverConfig(memory_cache_bytes=0)
    async with anyio.create_task_group() as tasks:
        shared = SharedChunks(chunk_cache, config, tasks)
        image_a = ChunkResolver(a.source, chunk_cache, [a.layer], config, tasks, shared=shared)
        image_b = ChunkResolver(b.source, chunk_cache, [b.layer], config, tasks, shared=shared)
        assert image_a.foreground is image_b.foreground is shared.foreground
        read: list[bytes] = []
        resumed: list[bool] = []

        async def read_b() -> None:
            read.append(await image_b.read(b.node, 0, 64 << 10))

        async def fill_a() -> None:
            await image_a.foreground.wait_quiet(0.05)
            # Only once B's fetch is over (its read may still be verifying: the pause is about
            # the link, and under load that step can outlast the 0.05 s of quiet).
            resumed.append(shared.foreground.in_flight() == 0)
            await image_a.prefetch([(a.node, chunk) for chunk in a.node.chunks])

        tasks.start_soon(read_b)
        await wait_until(lambda: shared.foreground.in_flight() == 1)
        tasks.start_soon(fill_a)
        await anyio.sleep(0.3)  # however long the read waits, the fill waits with it
        assert not resumed and not a.source.calls and image_a.stats.cache_misses == 0
        b.source.gate.set()
        await wait_until(lambda: bool(a.source.calls) and bool(read))
        assert resumed == [True] and read == [b.content[: 64 << 10]]
        assert shared.foreground.in_flight() == 0
        tasks.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_read_that_joins_a_fill_flight_pauses_the_fill(chunk_cache: ChunkCache) -> None:
    """A read waiting on a chunk the fill is fetching counts as a foreground miss."""
    a = one_file([64 << 10] * 2, seed=3)
    a.source.gate = anyio.Event()
    config = ResolverConfig(memory_cache_bytes=0)
    async with anyio.create_task_group() as tasks:
        resolver = ChunkResolver(a.source, chunk_cache, [a.layer], config, tasks)
        tasks.start_soon(resolver.prefetch, [(a.node, a.node.chunks[0])])
        await wait_until(lambda: bool(a.source.calls))
        tasks.start_soon(resolver.read, a.node, 0, 100)
        await wait_until(lambda: resolver.stats.singleflight_waits == 1)
        assert resolver.foreground.in_flight() == 1 and resolver.foreground.quiet_for_s() == 0
        a.source.gate.set()
        await wait_until(lambda: resolver.foreground.in_flight() == 0)
        tasks.cancel_scope.cancel()


# ------------------------------------------------------------- the pipeline of fill batches


class _FakeResolver:
    """A Prefetcher whose batches take a round trip (0.15 s of the mocked clock) each."""

    def __init__(self) -> None:
        self.foreground = ForegroundMisses()
        self.stats = ResolverStats()
        self.in_flight = 0
        self.starts: list[tuple[float, int]] = []  # (time, batches in flight with this one)

    async def prefetch(self, order: Sequence[tuple[Node, LayerChunk]]) -> None:
        self.in_flight += 1
        self.starts.append((trio.current_time(), self.in_flight))
        await trio.sleep(0.15)
        self.stats.bytes_fetched += sum(compressed_bytes(chunk) for _, chunk in order)
        self.in_flight -= 1


def test_fill_pipeline_deepens_while_reads_are_quiet_and_charges_each_byte_once() -> None:
    a = one_file([FILL_BATCH_BYTES] * 24, seed=4)
    order = [(a.node, chunk) for chunk in a.node.chunks]
    resolver = _FakeResolver()
    progress = FillProgress(total_bytes=sum(compressed_bytes(chunk) for _, chunk in order))
    charged: list[int] = []

    class Counting(TokenBucket):
        async def take(self, amount: int) -> None:
            charged.append(amount)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(FillRun(resolver, Counting(None), progress).run, order)
            await trio.sleep(0.5)
            resolver.foreground.missed(())  # a read misses: no new batch for 0.5 s, then one

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    before = [depth for started, depth in resolver.starts if started < 0.5]
    assert before[0] == 1 and max(before) == FILL_PIPELINE
    # No read has missed yet: the whole pipeline at once, no ramp.
    assert [s for s, _ in resolver.starts[:FILL_PIPELINE]] == [0.0] * FILL_PIPELINE
    assert not [s for s in resolver.starts if 0.5 <= s[0] < 1.0]  # paused
    after = [depth for started, depth in resolver.starts if started >= 1.0]
    assert after[0] == 1 and max(after) == FILL_PIPELINE
    assert progress.done_bytes == progress.total_bytes
    assert sum(charged) == resolver.stats.bytes_fetched == progress.total_bytes
