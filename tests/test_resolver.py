"""ChunkResolver: reads, range planning, singleflight, cache use, verification and faults.

Most tests drive the resolver against an in-memory ByteSource that records every call and can
block, fail or serve wrong bytes; the last few go through real HTTP (RegistryByteSource and
RegistryClient against tests/faultserver.py).
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest
import zstandard
from faulthelpers import FAST_RETRY
from faultserver import FaultServer

from lazyfs.cache.store import ChunkCache, LoadedChunk
from lazyfs.config import RegistryConfig, ResolverConfig
from lazyfs.errors import (
    FetchDeadlineError,
    IntegrityError,
    LazyfsError,
    NotFoundError,
    TransientRegistryError,
)
from lazyfs.formats.chunked.toc import ChunkRef
from lazyfs.model.bytesource import RangeListener
from lazyfs.model.digest import Digest
from lazyfs.model.ranges import ByteRange
from lazyfs.model.reference import Reference
from lazyfs.model.verity import format_verity, fsverity_digest
from lazyfs.mount.readahead import BlobIndex
from lazyfs.mount.resolver import ChunkCheck, ChunkResolver, LayerBlob, RecentChunks
from lazyfs.mount.tree import LayerChunk, Node, Tree
from lazyfs.registry.client import RegistryClient
from lazyfs.registry.sources import RegistryByteSource

pytestmark = pytest.mark.anyio

GAP_FILL = b"\xa5"  # bytes between frames that belong to no chunk of the file under test


# ------------------------------------------------------------------------------- building


def verity_of(data: bytes) -> str:
    return format_verity(fsverity_digest(data))


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def random_bytes(size: int, seed: int) -> bytes:
    """Incompressible, so each zstd frame is ``size`` plus a fixed header: lengths are known."""
    return random.Random(seed).randbytes(size)


class BlobBuilder:
    """Lays zstd frames out in one fake layer blob, with optional filler between them."""

    def __init__(self) -> None:
        self.data = bytearray()

    def add(self, compressed: bytes, gap: int = 0) -> tuple[int, int]:
        self.data += GAP_FILL * gap
        start = len(self.data)
        self.data += compressed
        return start, len(self.data)

    @property
    def digest(self) -> Digest:
        return Digest.of(bytes(self.data))

    def layer(self, check: ChunkCheck = "verity") -> LayerBlob:
        return LayerBlob(self.digest, len(self.data), "zstd", check)


def make_node(
    builder: BlobBuilder,
    pieces: Sequence[bytes],
    *,
    gaps: Sequence[int] = (),
    zeros: frozenset[int] = frozenset(),
    layer: int = 0,
    inode: int = 2,
    path: str = "/file",
    with_verity: bool = True,
) -> Node:
    """A regular file made of ``pieces``, each one zstd frame in ``builder``'s blob.

    ``gaps[i]`` filler bytes go before piece i; pieces whose index is in ``zeros`` are zero
    chunks (no bytes in the blob). ``with_verity=False`` leaves only sha256 digests, as in a
    foreign zstd:chunked layer.
    """
    compressor = zstandard.ZstdCompressor()
    chunks = []
    position = 0
    for index, piece in enumerate(pieces):
        if index in zeros:
            assert piece == bytes(len(piece))
            start = end = len(builder.data)
        else:
            gap = gaps[index] if index < len(gaps) else 0
            start, end = builder.add(compressor.compress(piece), gap)
        ref = ChunkRef(
            file_offset=position,
            size=len(piece),
            blob_offset=start,
            blob_end=end,
            sha256=sha256_of(piece),
            verity=verity_of(piece) if with_verity else "",
            zeros=index in zeros,
        )
        chunks.append(LayerChunk(layer, ref))
        position += len(piece)
    return Node(kind="reg", mode=0o644, size=position, chunks=tuple(chunks), inode=inode, path=path)


# ----------------------------------------------------------------------------- fake source


@dataclass(frozen=True)
class Call:
    blob: Digest
    ranges: tuple[ByteRange, ...]


@dataclass
class FakeSource:
    """An in-memory ByteSource that records calls and misbehaves on request.

    Order inside a call: record it, sleep ``delay_s``, wait for ``gate`` (if set), raise the
    next of ``errors`` (if any), then answer from ``blobs`` (through ``tamper``, if set).
    """

    blobs: dict[Digest, bytes]
    calls: list[Call] = field(default_factory=list)
    gate: anyio.Event | None = None
    errors: list[LazyfsError] = field(default_factory=list)
    delay_s: float = 0.0
    tamper: Callable[[ByteRange, bytes], bytes] | None = None

    # With a listener: ``early_bytes`` of the answer (through ``early_tamper``, if set) are
    # told as they "arrive", before the delay and the gate.
    early_bytes: int = 0
    early_tamper: Callable[[ByteRange, bytes], bytes] | None = None

    async def read_ranges(
        self, blob: Digest, ranges: Sequence[ByteRange], on_data: RangeListener | None = None
    ) -> list[bytes]:
        self.calls.append(Call(blob, tuple(ranges)))
        if on_data is not None and self.early_bytes:
            await self._tell_early(blob, ranges, on_data)
        if self.delay_s:
            await anyio.sleep(self.delay_s)
        if self.gate is not None:
            await self.gate.wait()
        if self.errors:
            raise self.errors.pop(0)
        data = self.blobs[blob]
        bodies = [data[rng.start : rng.end] for rng in ranges]
        if self.tamper is not None:
            bodies = [self.tamper(rng, body) for rng, body in zip(ranges, bodies, strict=True)]
        return bodies

    async def _tell_early(
        self, blob: Digest, ranges: Sequence[ByteRange], on_data: RangeListener
    ) -> None:
        left = self.early_bytes
        for rng in ranges:
            body = self.blobs[blob][rng.start : rng.end]
            if self.early_tamper is not None:
                body = self.early_tamper(rng, body)
            for at in range(0, min(left, len(body)), 1000):  # socket reads of 1,000 bytes
                on_data(rng.start + at, body[at : min(at + 1000, left)])
                await anyio.sleep(0)
            left -= min(left, len(body))

    @property
    def ranges(self) -> list[ByteRange]:
        return [rng for call in self.calls for rng in call.ranges]


def flip_byte_at(blob_offset: int) -> Callable[[ByteRange, bytes], bytes]:
    """A tamper function that flips one byte of the blob wherever a range carries it."""

    def tamper(rng: ByteRange, body: bytes) -> bytes:
        if not rng.start <= blob_offset < rng.end:
            return body
        out = bytearray(body)
        out[blob_offset - rng.start] ^= 0xFF
        return bytes(out)

    return tamper


def chunk_range(node: Node, index: int) -> ByteRange:
    ref = node.chunks[index].ref
    return ByteRange(ref.blob_offset, ref.blob_end)


def span(node: Node, first: int, last: int) -> ByteRange:
    """The blob range from chunk ``first``'s start to chunk ``last``'s end."""
    return ByteRange(node.chunks[first].ref.blob_offset, node.chunks[last].ref.blob_end)


def chunk_bounds(node: Node, index: int) -> tuple[int, int]:
    """File offset and size of chunk ``index``."""
    ref = node.chunks[index].ref
    return ref.file_offset, ref.size


@asynccontextmanager
async def running(
    source: FakeSource | RegistryByteSource,
    cache: ChunkCache,
    layers: Sequence[LayerBlob],
    config: ResolverConfig | None = None,
) -> AsyncIterator[ChunkResolver]:
    """A resolver whose fetches run in a task group that is cancelled when the block ends.

    Without a config, it keeps no chunks in memory, so that re-reads exercise the cache."""
    config = config or ResolverConfig(memory_cache_bytes=0)
    async with anyio.create_task_group() as tasks:
        resolver = ChunkResolver(source, cache, layers, config, tasks)
        try:
            yield resolver
        finally:
            tasks.cancel_scope.cancel()


async def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    with anyio.fail_after(timeout_s):
        while not condition():
            await anyio.sleep(0.001)


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[ChunkCache]:
    chunk_cache = ChunkCache(tmp_path / "cache", 1 << 30)
    yield chunk_cache
    chunk_cache.close()


@dataclass
class World:
    """One file in one layer blob, and a fake source serving that blob."""

    node: Node
    content: bytes
    layer: LayerBlob
    source: FakeSource


def one_file(
    sizes: Sequence[int],
    *,
    gaps: Sequence[int] = (),
    zeros: frozenset[int] = frozenset(),
    check: ChunkCheck = "verity",
    seed: int = 0,
) -> World:
    pieces = [
        bytes(size) if i in zeros else random_bytes(size, seed * 1000 + i)
        for i, size in enumerate(sizes)
    ]
    builder = BlobBuilder()
    node = make_node(builder, pieces, gaps=gaps, zeros=zeros, with_verity=check == "verity")
    layer = builder.layer(check)
    source = FakeSource({layer.digest: bytes(builder.data)})
    return World(node, b"".join(pieces), layer, source)


# ------------------------------------------------------------------------- reading bytes

SIZES = (5000, 7000, 4096, 3000, 1)  # a 1-byte chunk at the end, too
TOTAL = sum(SIZES)


@pytest.mark.parametrize(
    ("offset", "size"),
    [
        (0, TOTAL),  # the whole file
        (0, 1),
        (4999, 2),  # across the first boundary
        (5000, 7000),  # exactly chunk 1
        (5000, 7001),  # chunk 1 and the first byte of chunk 2
        (4999, 7002),  # chunk 1 and one byte either side
        (100, 15_000),  # inside chunk 0 to inside chunk 3
        (12_000, 4096),  # exactly chunk 2
        (TOTAL - 1, 1),  # the last chunk (1 byte)
        (TOTAL - 2, 100),  # clipped at EOF
        (0, 10**9),  # clipped at EOF
    ],
)
async def test_read_returns_exact_bytes(cache: ChunkCache, offset: int, size: int) -> None:
    world = one_file(SIZES)
    async with running(world.source, cache, [world.layer]) as resolver:
        data = await resolver.read(world.node, offset, size)
    assert data == world.content[offset : offset + size]


@pytest.mark.parametrize(("offset", "size"), [(TOTAL, 10), (TOTAL + 5, 10), (123, 0), (0, 0)])
async def test_empty_reads_fetch_nothing(cache: ChunkCache, offset: int, size: int) -> None:
    world = one_file(SIZES)
    async with running(world.source, cache, [world.layer]) as resolver:
        assert await resolver.read(world.node, offset, size) == b""
    assert world.source.calls == []


async def test_empty_file_reads_nothing(cache: ChunkCache) -> None:
    node = Node(kind="reg", mode=0o644, size=0, inode=3, path="/empty")
    source = FakeSource({})
    async with running(source, cache, []) as resolver:
        assert await resolver.read(node, 0, 4096) == b""
    assert source.calls == []


async def test_many_random_reads_match_the_content(cache: ChunkCache) -> None:
    world = one_file([random.Random(7).randrange(1, 9000) for _ in range(40)], seed=3)
    rng = random.Random(11)
    async with running(world.source, cache, [world.layer]) as resolver:
        for _ in range(200):
            offset = rng.randrange(0, len(world.content) + 10)
            size = rng.choice([1, 7, 4096, 65536, rng.randrange(0, 40_000)])
            data = await resolver.read(world.node, offset, size)
            assert data == world.content[offset : offset + size], (offset, size)


# ------------------------------------------------------------------------- range planning


async def test_adjacent_chunks_merge_into_one_range(cache: ChunkCache) -> None:
    world = one_file([4000] * 5)
    async with running(world.source, cache, [world.layer]) as resolver:
        assert await resolver.read(world.node, 0, 20_000) == world.content
        stats = resolver.stats
    assert world.source.calls == [Call(world.layer.digest, (span(world.node, 0, 4),))]
    assert stats.range_requests == 1
    assert stats.chunks_fetched == 5
    assert stats.bytes_fetched == span(world.node, 0, 4).length
    assert stats.layer_bytes_fetched == {0: span(world.node, 0, 4).length}


async def test_nearby_chunks_merge_across_small_gaps(cache: ChunkCache) -> None:
    gap = 100
    # chunk 1 sits exactly merge_gap_bytes after chunk 0; chunk 2 one byte further than that.
    world = one_file([3000, 3000, 3000], gaps=[0, gap, gap + 1])
    config = ResolverConfig(merge_gap_bytes=gap)
    async with running(world.source, cache, [world.layer], config) as resolver:
        assert await resolver.read(world.node, 0, 9000) == world.content
    assert world.source.calls == [
        Call(world.layer.digest, (span(world.node, 0, 1), chunk_range(world.node, 2)))
    ]


async def test_far_chunks_become_separate_ranges_of_one_request(cache: ChunkCache) -> None:
    world = one_file([2000] * 4, gaps=[0, 50_000, 50_000, 50_000])
    config = ResolverConfig(merge_gap_bytes=32 << 10, max_ranges_per_request=16)
    async with running(world.source, cache, [world.layer], config) as resolver:
        assert await resolver.read(world.node, 0, 8000) == world.content
    expected = tuple(chunk_range(world.node, i) for i in range(4))
    assert world.source.calls == [Call(world.layer.digest, expected)]


@pytest.mark.parametrize(("per_request", "expected_calls"), [(1, 5), (2, 3), (5, 1), (16, 1)])
async def test_ranges_per_request_are_bounded(
    cache: ChunkCache, per_request: int, expected_calls: int
) -> None:
    world = one_file([1000] * 5, gaps=[0, 10_000, 10_000, 10_000, 10_000])
    config = ResolverConfig(merge_gap_bytes=0, max_ranges_per_request=per_request)
    async with running(world.source, cache, [world.layer], config) as resolver:
        assert await resolver.read(world.node, 0, 5000) == world.content
        assert resolver.stats.range_requests == expected_calls
    calls = world.source.calls
    assert len(calls) == expected_calls
    assert all(len(call.ranges) <= per_request for call in calls)
    # Every chunk is asked for exactly once, in blob order.
    assert sorted(world.source.ranges) == [chunk_range(world.node, i) for i in range(5)]
    for call in calls:
        assert list(call.ranges) == sorted(call.ranges)


async def test_merging_stops_at_max_request_bytes(cache: ChunkCache) -> None:
    world = one_file([3000] * 4)
    frame = chunk_range(world.node, 0).length
    config = ResolverConfig(max_request_bytes=2 * frame, max_ranges_per_request=16)
    async with running(world.source, cache, [world.layer], config) as resolver:
        assert await resolver.read(world.node, 0, 12_000) == world.content
    assert world.source.calls == [
        Call(world.layer.digest, (span(world.node, 0, 1), span(world.node, 2, 3)))
    ]


async def test_only_the_chunks_covering_the_read_are_fetched(cache: ChunkCache) -> None:
    world = one_file([4096] * 6)
    async with running(world.source, cache, [world.layer]) as resolver:
        # Bytes 4096*2-1 .. 4096*3: the last byte of chunk 1, all of chunk 2, first of chunk 3.
        data = await resolver.read(world.node, 4096 * 2 - 1, 4096 + 2)
    assert data == world.content[4096 * 2 - 1 : 4096 * 3 + 1]
    assert world.source.ranges == [span(world.node, 1, 3)]


async def test_chunks_of_two_layers_go_to_their_own_blobs(cache: ChunkCache) -> None:
    first, second = BlobBuilder(), BlobBuilder()
    lower = make_node(first, [random_bytes(3000, 1)], inode=2, path="/lower")
    upper = make_node(second, [random_bytes(3000, 2)], layer=1, inode=3, path="/upper")
    layers = [first.layer(), second.layer()]
    source = FakeSource({first.digest: bytes(first.data), second.digest: bytes(second.data)})
    async with running(source, cache, layers) as resolver:
        assert await resolver.read(upper, 0, 3000) == random_bytes(3000, 2)
        assert await resolver.read(lower, 0, 3000) == random_bytes(3000, 1)
        assert resolver.stats.layer_bytes_fetched == {
            0: chunk_range(lower, 0).length,
            1: chunk_range(upper, 0).length,
        }
    assert [call.blob for call in source.calls] == [second.digest, first.digest]


async def test_files_of_two_trees_with_one_inode_number_are_read_apart(cache: ChunkCache) -> None:
    """A layer store's image serves each layer's own tree through one resolver, and each tree
    numbers its inodes from 1: what the resolver keeps per file is per node, not per inode."""
    first, second = BlobBuilder(), BlobBuilder()
    small = make_node(first, [random_bytes(3000, 1)], inode=2, path="/etc/small")
    pieces = [random_bytes(4000, 10 + i) for i in range(4)]
    big = make_node(second, pieces, layer=1, inode=2, path="/usr/lib/big")
    layers = [first.layer(), second.layer()]
    source = FakeSource({first.digest: bytes(first.data), second.digest: bytes(second.data)})
    async with running(source, cache, layers) as resolver:
        assert await resolver.read(small, 0, 3000) == random_bytes(3000, 1)
        assert await resolver.read(big, 0, 8000) == b"".join(pieces[:2])
        assert await resolver.read(big, 8000, 8000) == b"".join(pieces[2:])
        assert await resolver.read(small, 0, 3000) == random_bytes(3000, 1)


# ----------------------------------------------------------------------------- singleflight


async def test_concurrent_readers_of_one_chunk_share_one_fetch(cache: ChunkCache) -> None:
    world = one_file([8000, 8000])
    world.source.gate = gate = anyio.Event()
    readers = 32
    results: list[bytes] = []
    async with running(world.source, cache, [world.layer]) as resolver:

        async def reader(index: int) -> None:
            # Different slices of chunk 1, including the whole of it.
            offset = 8000 + index * 100
            results.append(await resolver.read(world.node, offset, 8000))

        async with anyio.create_task_group() as tasks:
            for index in range(readers):
                tasks.start_soon(reader, index)
            await wait_until(
                lambda: (
                    resolver.stats.singleflight_waits == readers - 1
                    and len(world.source.calls) == 1
                )
            )
            gate.set()
        stats = resolver.stats
    assert len(results) == readers
    assert sorted(results, key=len) == sorted(
        (world.content[8000 + i * 100 : 16_000] for i in range(readers)), key=len
    )
    assert world.source.calls == [Call(world.layer.digest, (chunk_range(world.node, 1),))]
    assert stats.chunks_fetched == 1
    assert stats.range_requests == 1


class _SlowLookups(ChunkCache):
    """A cache whose lookups take a while, so a second reader arrives during the first's."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, 1 << 30)
        self.lookups = 0

    def load_chunks(self, verities: Sequence[str | None]) -> list[LoadedChunk | None]:
        self.lookups += 1
        time.sleep(0.2)
        return super().load_chunks(verities)


async def test_reader_arriving_during_a_cache_lookup_does_not_refetch(tmp_path: Path) -> None:
    world = one_file([8000])
    slow = _SlowLookups(tmp_path / "cache")
    try:
        async with running(world.source, slow, [world.layer]) as resolver:
            results: list[bytes] = []

            async def reader() -> None:
                results.append(await resolver.read(world.node, 0, 8000))

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(reader)
                await anyio.sleep(0.05)  # the first reader is inside its cache lookup
                tasks.start_soon(reader)
        assert results == [world.content] * 2
        assert len(world.source.calls) == 1
        assert slow.lookups == 1  # the second reader joined the flight, no lookup of its own
    finally:
        slow.close()


# ------------------------------------------------------------------------------------ cache


async def test_cached_chunks_are_not_fetched_again(cache: ChunkCache) -> None:
    world = one_file([4096] * 4)
    async with running(world.source, cache, [world.layer]) as resolver:
        assert await resolver.read(world.node, 0, 8192) == world.content[:8192]
        assert world.source.ranges == [span(world.node, 0, 1)]
        assert resolver.stats.cache_misses == 2
        assert resolver.stats.cache_hits == 0

        assert await resolver.read(world.node, 0, 8192) == world.content[:8192]
        assert len(world.source.calls) == 1
        assert resolver.stats.cache_hits == 2

        # Chunks 0-1 come from the cache, only 2-3 are fetched.
        assert await resolver.read(world.node, 0, 4 * 4096) == world.content
        assert world.source.ranges == [span(world.node, 0, 1), span(world.node, 2, 3)]
        assert resolver.stats.cache_hits == 4
        assert resolver.stats.cache_misses == 4
    assert sorted(cache.chunk_keys()) == sorted(c.ref.verity for c in world.node.chunks)


async def test_a_new_resolver_on_the_same_cache_fetches_nothing(cache: ChunkCache) -> None:
    world = one_file([4096] * 3)
    async with running(world.source, cache, [world.layer]) as resolver:
        assert await resolver.read(world.node, 0, 3 * 4096) == world.content
    world.source.errors = [NotFoundError("the registry is gone")] * 10
    async with running(world.source, cache, [world.layer]) as remounted:
        assert await remounted.read(world.node, 0, 3 * 4096) == world.content
        assert remounted.stats.cache_hits == 3
    assert len(world.source.calls) == 1


async def test_identical_chunks_are_fetched_and_cached_once(cache: ChunkCache) -> None:
    piece = random_bytes(5000, 42)
    builder = BlobBuilder()
    node = make_node(builder, [piece, piece, piece])  # three frames with one digest
    layer = builder.layer()
    source = FakeSource({layer.digest: bytes(builder.data)})
    async with running(source, cache, [layer]) as resolver:
        assert await resolver.read(node, 0, 15_000) == piece * 3
    assert len(source.ranges) == 1
    assert source.ranges[0].length == chunk_range(node, 0).length
    assert cache.chunk_keys() == [verity_of(piece)]


# ----------------------------------------------------------------------------- verification


async def test_corrupt_chunk_gives_integrity_error_and_is_not_cached(cache: ChunkCache) -> None:
    world = one_file([5000, 5000, 5000], gaps=[0, 50_000, 50_000])
    bad = world.node.chunks[1].ref
    # The last byte of a raw zstd block: the frame still decodes, to the wrong bytes.
    world.source.tamper = flip_byte_at(bad.blob_end - 1)
    async with running(world.source, cache, [world.layer]) as resolver:
        with pytest.raises(IntegrityError) as caught:
            await resolver.read(world.node, 5000, 5000)
        assert caught.value.expected == bad.verity
        assert "/file" in str(caught.value)
        assert resolver.stats.verification_failures == 1
        assert not cache.has_chunk(bad.verity)

        # The other chunks still read (and the corrupt one fails again: it was not cached).
        assert await resolver.read(world.node, 0, 5000) == world.content[:5000]
        assert await resolver.read(world.node, 10_000, 5000) == world.content[10_000:]
        with pytest.raises(IntegrityError):
            await resolver.read(world.node, 5000, 1)
        assert resolver.stats.verification_failures == 2

        # Once the source serves the right bytes, the chunk reads and is cached.
        world.source.tamper = None
        assert await resolver.read(world.node, 0, 15_000) == world.content
        await wait_until(lambda: cache.has_chunk(bad.verity))
    assert sorted(cache.chunk_keys()) == sorted(c.ref.verity for c in world.node.chunks)


async def test_truncated_chunk_gives_integrity_error(cache: ChunkCache) -> None:
    world = one_file([5000])
    world.source.tamper = lambda rng, body: body[: len(body) // 2]
    async with running(world.source, cache, [world.layer]) as resolver:
        with pytest.raises(IntegrityError):
            await resolver.read(world.node, 0, 5000)
        assert resolver.stats.verification_failures == 1
    assert cache.chunk_keys() == []


async def test_undecodable_chunk_counts_as_verification_failure(cache: ChunkCache) -> None:
    world = one_file([5000])
    world.source.tamper = flip_byte_at(world.node.chunks[0].ref.blob_offset)  # zstd magic
    async with running(world.source, cache, [world.layer]) as resolver:
        try:
            with pytest.raises(IntegrityError):
                await resolver.read(world.node, 0, 5000)
        finally:
            assert cache.chunk_keys() == []
        assert resolver.stats.verification_failures == 1


async def test_corrupt_chunk_inside_a_multi_chunk_read(cache: ChunkCache) -> None:
    world = one_file([5000, 5000, 5000])  # adjacent: one request carries all three
    world.source.tamper = flip_byte_at(world.node.chunks[1].ref.blob_end - 1)
    async with running(world.source, cache, [world.layer]) as resolver:
        with pytest.raises(IntegrityError):
            await resolver.read(world.node, 0, 15_000)


async def test_sha256_layers_are_checked_by_sha256(cache: ChunkCache) -> None:
    world = one_file([5000, 6000], check="sha256")
    assert all(c.ref.verity == "" for c in world.node.chunks)
    pieces = [world.content[:5000], world.content[5000:]]
    async with running(world.source, cache, [world.layer]) as resolver:
        assert await resolver.read(world.node, 0, 11_000) == world.content
        # Cached by fs-verity digest like every chunk, found again through the sha256 alias
        # (written just after the bytes were served).
        await wait_until(lambda: all(cache.get_alias(sha256_of(p)) for p in pieces))
        assert sorted(cache.chunk_keys()) == sorted(verity_of(p) for p in pieces)
        for piece in pieces:
            assert cache.get_alias(sha256_of(piece)) == verity_of(piece)
        assert await resolver.read(world.node, 0, 11_000) == world.content
        assert resolver.stats.cache_hits == 2
    assert len(world.source.calls) == 1


async def test_sha256_layer_corrupt_chunk_gives_integrity_error(cache: ChunkCache) -> None:
    world = one_file([5000], check="sha256")
    bad = world.node.chunks[0].ref
    world.source.tamper = flip_byte_at(bad.blob_end - 1)
    async with running(world.source, cache, [world.layer]) as resolver:
        with pytest.raises(IntegrityError) as caught:
            await resolver.read(world.node, 0, 5000)
        assert caught.value.expected == bad.sha256
        assert resolver.stats.verification_failures == 1
    assert cache.chunk_keys() == []
    assert cache.get_alias(bad.sha256) is None


async def test_sha256_layer_chunks_hit_a_verifying_cache(tmp_path: Path) -> None:
    world = one_file([5000, 5000], check="sha256")
    verifying = ChunkCache(tmp_path / "cache", 1 << 30, verify_reads=True)
    try:
        async with running(world.source, verifying, [world.layer]) as resolver:
            assert await resolver.read(world.node, 0, 10_000) == world.content
            assert await resolver.read(world.node, 0, 10_000) == world.content
            assert resolver.stats.cache_hits == 2
        assert len(world.source.calls) == 1
    finally:
        verifying.close()


def _with_claimed_verity(node: Node, claimed: str) -> Node:
    """``node`` with its one chunk claiming fs-verity digest ``claimed``."""
    ref = node.chunks[0].ref
    bogus = ChunkRef(ref.file_offset, ref.size, ref.blob_offset, ref.blob_end, ref.sha256, claimed)
    node.chunks = (LayerChunk(0, bogus),)
    return node


async def test_sha256_check_is_by_sha256_even_with_a_verity_field(cache: ChunkCache) -> None:
    """A layer checked by sha256 passes on its sha256, whatever verity its TOC claims."""
    piece = random_bytes(5000, 5)
    builder = BlobBuilder()
    node = _with_claimed_verity(make_node(builder, [piece]), verity_of(b"something else"))
    layer = builder.layer("sha256")
    source = FakeSource({layer.digest: bytes(builder.data)})
    async with running(source, cache, [layer]) as resolver:
        assert await resolver.read(node, 0, 5000) == piece
    assert cache.chunk_keys() == [verity_of(piece)]


async def test_sha256_layer_never_returns_bytes_failing_its_sha256(cache: ChunkCache) -> None:
    piece, other = random_bytes(5000, 5), random_bytes(5000, 6)
    cache.put_chunk(verity_of(other), other)  # e.g. a chunk of another image
    builder = BlobBuilder()
    node = _with_claimed_verity(make_node(builder, [piece]), verity_of(other))
    layer = builder.layer("sha256")
    source = FakeSource({layer.digest: bytes(builder.data)})
    async with running(source, cache, [layer]) as resolver:
        assert await resolver.read(node, 0, 5000) == piece  # what ref.sha256 names


async def test_read_larger_than_the_cache(tmp_path: Path) -> None:
    world = one_file([64 << 10] * 24)  # 1.5 MiB in one request, values stored as files
    small = ChunkCache(tmp_path / "cache", 1 << 20)
    try:
        async with running(world.source, small, [world.layer]) as resolver:
            assert await resolver.read(world.node, 0, len(world.content)) == world.content
    finally:
        small.close()


# ------------------------------------------------------------------------------ zero chunks


async def test_zero_chunks_are_never_fetched(cache: ChunkCache) -> None:
    world = one_file([3000, 8192, 3000, 4096], zeros=frozenset({1, 3}))
    async with running(world.source, cache, [world.layer]) as resolver:
        assert await resolver.read(world.node, 3000, 8192) == bytes(8192)
        assert await resolver.read(world.node, 14_192, 4096) == bytes(4096)
        assert world.source.calls == []
        assert await resolver.read(world.node, 0, len(world.content)) == world.content
        assert await resolver.read(world.node, 2990, 20) == world.content[2990:3010]
    # The zero chunk takes no blob bytes, so chunks 0 and 2 are adjacent: one range.
    assert world.source.ranges == [span(world.node, 0, 2)]
    assert sorted(cache.chunk_keys()) == sorted(world.node.chunks[i].ref.verity for i in (0, 2))


# ------------------------------------------------------------------------ deadlines, errors


async def test_deadline_then_a_later_read_joins_the_same_fetch(cache: ChunkCache) -> None:
    world = one_file([5000])
    world.source.gate = gate = anyio.Event()
    config = ResolverConfig(read_deadline_s=0.5)
    async with running(world.source, cache, [world.layer], config) as resolver:
        with pytest.raises(FetchDeadlineError, match="/file"):
            await resolver.read(world.node, 0, 5000)

        results: list[bytes] = []

        async def reader() -> None:
            results.append(await resolver.read(world.node, 0, 5000))

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(reader)
            await wait_until(lambda: resolver.stats.singleflight_waits == 1)
            gate.set()
        assert results == [world.content]
        # The flight the first read left behind finished and filled the cache.
        await wait_until(lambda: cache.has_chunk(world.node.chunks[0].ref.verity))
        assert cache.has_chunk(world.node.chunks[0].ref.verity)
        assert await resolver.read(world.node, 0, 5000) == world.content
    assert len(world.source.calls) == 1


async def test_deadline_then_unblocked_source_serves_a_later_read(cache: ChunkCache) -> None:
    world = one_file([5000, 5000])
    world.source.gate = gate = anyio.Event()
    config = ResolverConfig(read_deadline_s=0.3)
    async with running(world.source, cache, [world.layer], config) as resolver:
        with pytest.raises(FetchDeadlineError):
            await resolver.read(world.node, 0, 10_000)
        gate.set()
        await wait_until(lambda: resolver.stats.chunks_fetched == 2)
        assert await resolver.read(world.node, 0, 10_000) == world.content
        assert resolver.stats.cache_hits + resolver.stats.memory_hits == 2
    assert len(world.source.calls) == 1


async def test_slow_source_hits_the_deadline(cache: ChunkCache) -> None:
    world = one_file([5000])
    world.source.delay_s = 1.0
    config = ResolverConfig(read_deadline_s=0.05)
    async with running(world.source, cache, [world.layer], config) as resolver:
        with anyio.fail_after(0.8):  # the read gives up at its deadline, not with the source
            with pytest.raises(FetchDeadlineError):
                await resolver.read(world.node, 0, 5000)


@pytest.mark.parametrize(
    "error", [TransientRegistryError("HTTP 503 for the blob"), NotFoundError("blob unknown")]
)
async def test_source_error_reaches_every_waiter_and_a_later_read_retries(
    cache: ChunkCache, error: LazyfsError
) -> None:
    world = one_file([6000, 6000])
    world.source.gate = gate = anyio.Event()
    world.source.errors = [error]
    readers = 8
    failures: list[BaseException] = []
    async with running(world.source, cache, [world.layer]) as resolver:

        async def reader() -> None:
            try:
                await resolver.read(world.node, 0, 12_000)
            except LazyfsError as exc:
                failures.append(exc)

        async with anyio.create_task_group() as tasks:
            for _ in range(readers):
                tasks.start_soon(reader)
            await wait_until(lambda: resolver.stats.singleflight_waits == 2 * (readers - 1))
            gate.set()
        assert len(failures) == readers
        assert all(exc is error for exc in failures)
        assert cache.chunk_keys() == []

        # Nothing about the failure sticks: the next read fetches again and succeeds.
        assert await resolver.read(world.node, 0, 12_000) == world.content
    assert len(world.source.calls) == 2


async def test_shutdown_fails_waiting_readers(cache: ChunkCache) -> None:
    """Cancelling the resolver's task group fails its flights, so no reader hangs."""
    world = one_file([5000])
    world.source.gate = anyio.Event()  # never set
    failures: list[BaseException] = []

    async def reader(resolver: ChunkResolver) -> None:
        try:
            await resolver.read(world.node, 0, 5000)
        except LazyfsError as exc:
            failures.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as readers:
            async with running(world.source, cache, [world.layer]) as resolver:
                readers.start_soon(reader, resolver)
                readers.start_soon(reader, resolver)
                await wait_until(lambda: resolver.stats.singleflight_waits == 1)
            # The resolver's task group is cancelled here; the readers live on in ``readers``.
            await anyio.sleep(0)
    assert len(failures) == 2
    assert all(isinstance(exc, FetchDeadlineError) for exc in failures)


# ------------------------------------------------------------------------ through real HTTP


@pytest.fixture
def registry_config() -> RegistryConfig:
    return RegistryConfig(retry=FAST_RETRY)


def served(server: FaultServer, client: RegistryClient, world: World) -> RegistryByteSource:
    """Serve ``world``'s blob from ``server``; a ByteSource reading it over HTTP."""
    data = world.source.blobs[world.layer.digest]
    assert server.add_blob(data) == str(world.layer.digest)
    return RegistryByteSource(client, Reference.parse(f"{server.host}/test/app:latest"))


def blob_gets(server: FaultServer) -> int:
    return server.count("GET", "/v2/test/app/blobs/")


@pytest.mark.parametrize("per_request", [1, 16])
async def test_http_whole_blob_answer_to_a_range_request(
    server: FaultServer, client: RegistryClient, cache: ChunkCache, per_request: int
) -> None:
    """A server that ignores Range (200 with the whole blob) still yields the right chunks."""
    world = one_file([3000] * 4, gaps=[0, 50_000, 0, 50_000])
    source = served(server, client, world)
    server.faults.ignore_range = True
    config = ResolverConfig(max_ranges_per_request=per_request)
    async with running(source, cache, [world.layer], config) as resolver:
        assert await resolver.read(world.node, 0, 12_000) == world.content
        # Chunks 0, 1-2 and 3 are three ranges: in one request, or one request each.
        assert resolver.stats.range_requests == (1 if per_request > 1 else 3)
    assert blob_gets(server) == resolver.stats.range_requests
    assert all(r.status == 200 for r in server.requests if r.path.startswith("/v2/test/"))
    assert sorted(cache.chunk_keys()) == sorted(c.ref.verity for c in world.node.chunks)


async def test_http_multi_range_request(
    server: FaultServer, client: RegistryClient, cache: ChunkCache
) -> None:
    world = one_file([3000] * 3, gaps=[0, 50_000, 50_000])
    source = served(server, client, world)
    async with running(source, cache, [world.layer]) as resolver:
        assert await resolver.read(world.node, 1000, 7000) == world.content[1000:8000]
    [request] = [r for r in server.requests if r.path.startswith("/v2/test/app/blobs/")]
    assert request.status == 206
    expected = ",".join(
        f"{r.start}-{r.end - 1}" for r in map(chunk_range, [world.node] * 3, range(3))
    )
    assert request.headers["Range"] == f"bytes={expected}"


async def test_http_503_twice_then_success(
    server: FaultServer, client: RegistryClient, cache: ChunkCache
) -> None:
    world = one_file([4000, 4000])
    source = served(server, client, world)
    server.faults.fail_times = 2
    async with running(source, cache, [world.layer]) as resolver:
        assert await resolver.read(world.node, 0, 8000) == world.content
        assert resolver.stats.range_requests == 1
    assert client.stats.retries == 2
    assert blob_gets(server) == 3
    assert [r.status for r in server.requests] == [503, 503, 206]


async def test_http_slow_reply_hits_the_read_deadline(
    server: FaultServer, client: RegistryClient, cache: ChunkCache
) -> None:
    world = one_file([4000])
    source = served(server, client, world)
    server.faults.delay_s = 0.6
    config = ResolverConfig(read_deadline_s=0.1)
    async with running(source, cache, [world.layer], config) as resolver:
        with pytest.raises(FetchDeadlineError):
            await resolver.read(world.node, 0, 4000)
        # The fetch carries on; once the slow answer arrives a read (within its own deadline)
        # gets the chunk without another request.
        server.faults.delay_s = 0.0
        await wait_until(lambda: resolver.stats.chunks_fetched == 1)
        assert await resolver.read(world.node, 0, 4000) == world.content
    assert blob_gets(server) == 1


# ------------------------------------------------------------------ recently used, in memory


def test_recent_chunks_evict_the_least_recently_used() -> None:
    recent = RecentChunks(10)
    recent.put("a", b"aaaa")
    recent.put("b", b"bbbb")
    assert recent.get("a") == b"aaaa"  # now b is the least recently used
    recent.put("c", b"cccc")
    assert recent.get("b") is None
    assert recent.get("a") == b"aaaa" and recent.get("c") == b"cccc"
    assert recent.size_bytes == 8
    recent.put("huge", b"x" * 11)  # larger than the bound: not kept
    assert recent.get("huge") is None and recent.size_bytes == 8


async def test_re_reads_come_from_memory_without_the_cache(cache: ChunkCache) -> None:
    world = one_file([4096] * 3)
    async with running(world.source, cache, [world.layer], ResolverConfig()) as resolver:
        assert await resolver.read(world.node, 0, 3 * 4096) == world.content
        hits = resolver.stats.cache_hits
        assert await resolver.read(world.node, 0, 3 * 4096) == world.content
        assert resolver.stats.memory_hits == 3
        assert resolver.stats.cache_hits == hits  # diskcache was not asked
    assert len(world.source.calls) == 1


# --------------------------------------------------------------------- the warm read path


async def _cached_world(cache: ChunkCache, sizes: Sequence[int]) -> World:
    """A file whose chunks are all in ``cache`` (fetched once by a resolver of its own)."""
    world = one_file(sizes, seed=5)
    async with running(world.source, cache, [world.layer]) as resolver:
        assert await resolver.read(world.node, 0, len(world.content)) == world.content
        await wait_until(lambda: len(cache.files) == len(sizes))  # stored, files known
    return world


async def test_warm_reads_are_one_preadv_of_the_wanted_bytes(cache: ChunkCache) -> None:
    world = await _cached_world(cache, [40_000, 50_000, 30_000])
    calls = len(world.source.calls)
    async with running(world.source, cache, [world.layer]) as resolver:
        # Just written: in the page cache, so RWF_NOWAIT serves them on the event loop.
        for offset, size in [(0, 4096), (39_000, 2000), (100, 119_000), (119_999, 10)]:
            data = await resolver.read(world.node, offset, size)
            assert data == world.content[offset : offset + size]
        stats = resolver.stats
        assert stats.nowait_reads + stats.thread_reads == stats.cache_hits == 7
        assert stats.cache_misses == 0 and stats.memory_hits == 0
    assert len(world.source.calls) == calls


async def test_warm_reads_write_no_sqlite_until_the_books_are_kept(cache: ChunkCache) -> None:
    world = await _cached_world(cache, [40_000])
    cache.flush_reads()
    async with running(world.source, cache, [world.layer]) as resolver:
        assert await resolver.read(world.node, 0, 4096) == world.content[:4096]
        assert cache.flush_reads() == 1  # the read was noted, not written
        assert await resolver.read(world.node, 4096, 4096) == world.content[4096:8192]
        await wait_until(lambda: cache.flush_reads() == 0 and not cache._reads, 5)


async def test_warm_read_of_an_evicted_chunk_takes_the_normal_path(cache: ChunkCache) -> None:
    world = await _cached_world(cache, [40_000, 40_000])
    victim = world.node.chunks[1].ref.verity
    entry = cache.files.entry(victim)
    assert entry is not None
    cache.files.forget(victim)  # no descriptor open: the next open finds the file gone
    cache.files.learn(victim, victim, entry.name)
    cache.drop_chunk(victim)  # diskcache deletes the file, as an eviction would
    async with running(world.source, cache, [world.layer]) as resolver:
        assert await resolver.read(world.node, 0, 80_000) == world.content
        assert resolver.stats.cache_misses == 1  # fetched again, once
    assert cache.has_chunk(victim)


async def test_a_descriptor_open_before_eviction_still_reads_the_verified_bytes(
    cache: ChunkCache,
) -> None:
    world = await _cached_world(cache, [40_000])
    verity = world.node.chunks[0].ref.verity
    async with running(world.source, cache, [world.layer]) as resolver:
        assert await resolver.read(world.node, 0, 100) == world.content[:100]  # opens it
        assert cache.files.open_count == 1
        cache.drop_chunk(verity)
        assert await resolver.read(world.node, 100, 100) == world.content[100:200]
        assert cache.files.sweep() == 1  # deleted under it: closed and forgotten
        assert cache.files.entry(verity) is None
        assert await resolver.read(world.node, 0, 40_000) == world.content  # refetched
        assert resolver.stats.cache_misses == 1


@pytest.mark.parametrize("check", ["verity", "sha256"])
async def test_a_verifying_cache_checks_warm_reads(tmp_path: Path, check: ChunkCheck) -> None:
    verifying = ChunkCache(tmp_path / "cache", 1 << 30, verify_reads=True)
    try:
        world = one_file([40_000, 40_000], check=check, seed=9)
        async with running(world.source, verifying, [world.layer]) as resolver:
            assert await resolver.read(world.node, 0, 80_000) == world.content
            await wait_until(lambda: len(verifying.files) == 2)
        bad = verifying.files.entry(_flight_key(world.node.chunks[1], check))
        assert bad is not None
        path = verifying.layout.chunks_dir / bad.name
        rotted = bytearray(path.read_bytes())
        rotted[123] ^= 0x40
        path.write_bytes(bytes(rotted))  # same inode: an open descriptor sees it too
        async with running(world.source, verifying, [world.layer]) as resolver:
            assert await resolver.read(world.node, 0, 80_000) == world.content
            assert await resolver.read(world.node, 40_100, 10) == world.content[40_100:40_110]
            assert resolver.stats.nowait_reads == 0  # whole chunks, hashed in a thread
            assert resolver.stats.cache_misses == 1  # the rotted one, dropped and refetched
        assert len(world.source.calls) == 2
    finally:
        verifying.close()


def _flight_key(chunk: LayerChunk, check: ChunkCheck) -> str:
    return chunk.ref.verity if check == "verity" else "plain-" + chunk.ref.sha256


async def test_warm_reads_of_one_file_from_many_readers(cache: ChunkCache) -> None:
    world = await _cached_world(cache, [random.Random(3).randrange(1, 70_000) for _ in range(30)])
    # Files known, none open yet, page cache dropped for them: reads go to reader threads.
    for name in {e.name for e in (cache.files.entry(c.ref.verity) for c in world.node.chunks) if e}:
        fd = os.open(cache.layout.chunks_dir / name, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    rng = random.Random(4)
    async with running(world.source, cache, [world.layer]) as resolver:
        results: list[tuple[int, int, bytes]] = []

        async def reader() -> None:
            for _ in range(40):
                offset = rng.randrange(len(world.content))
                size = rng.choice([1, 4096, 65_536, 300_000])
                results.append((offset, size, await resolver.read(world.node, offset, size)))

        async with anyio.create_task_group() as readers:
            for _ in range(8):
                readers.start_soon(reader)
        assert resolver.stats.cache_misses == 0
    for offset, size, data in results:
        assert data == world.content[offset : offset + size]
    assert cache.files.open_count <= len(world.node.chunks)


async def test_a_fresh_resolver_learns_files_ahead_from_the_store(cache: ChunkCache) -> None:
    world = await _cached_world(cache, [40_000] * 6)
    fresh = ChunkCache(cache.directory, None)  # another handle: knows no file yet
    try:
        index = BlobIndex.of_tree(_tree_of(world.node))
        async with anyio.create_task_group() as tasks:
            resolver = ChunkResolver(
                world.source, fresh, [world.layer], ResolverConfig(), tasks, index
            )
            assert await resolver.read(world.node, 0, 100) == world.content[:100]
            await wait_until(lambda: len(fresh.files) == 6)  # the rest looked up ahead
            assert await resolver.read(world.node, 40_000, 200_000) == world.content[40_000:]
            assert resolver.stats.nowait_reads + resolver.stats.thread_reads == 5
            tasks.cancel_scope.cancel()
    finally:
        fresh.close()


async def test_a_mount_learns_its_cached_files_before_the_first_read(cache: ChunkCache) -> None:
    world = await _cached_world(cache, [40_000] * 4)
    fresh = ChunkCache(cache.directory, None)  # another handle: knows no file yet
    try:
        async with anyio.create_task_group() as tasks:
            resolver = ChunkResolver(world.source, fresh, [world.layer], ResolverConfig(), tasks)
            assert await resolver.learn_files(world.node.chunks) == 4
            assert await resolver.learn_files(world.node.chunks) == 0  # known already
            assert await resolver.read(world.node, 0, 160_000) == world.content
            stats = resolver.stats
            assert stats.nowait_reads + stats.thread_reads == stats.cache_hits == 4
            tasks.cancel_scope.cancel()
    finally:
        fresh.close()


def _tree_of(node: Node) -> Tree:
    return Tree({node.inode: node}, {})


def _dir(inode: int, children: dict[bytes, Node], path: str) -> Node:
    return Node(kind="dir", mode=0o755, inode=inode, children=children, path=path)


async def test_a_miss_fetches_its_source_and_its_directorys_next_files(cache: ChunkCache) -> None:
    """A miss of a package's pyc: its .py (elsewhere in the blob), and the next pycs of its
    __pycache__ with their .py files, in one request; another directory's file is left."""
    builder = BlobBuilder()
    names = ["__pycache__/a.cpython-311.pyc", "__pycache__/b.cpython-311.pyc", "a.py", "b.py"]
    nodes: dict[str, Node] = {}
    for i, name in enumerate(names):
        if name == "a.py":  # another directory's file between the pycs and the sources
            other = make_node(builder, [random_bytes(3000, 60)], inode=20, path="/q/c.py")
        piece = random_bytes(3000, 50 + i)
        nodes[name] = make_node(builder, [piece], inode=10 + i, path=f"/p/{name}", gaps=[100])
    cached = {name[len("__pycache__/") :].encode(): nodes[name] for name in names[:2]}
    pycache = _dir(3, cached, "/p/__pycache__")
    package = _dir(
        2, {b"__pycache__": pycache, b"a.py": nodes["a.py"], b"b.py": nodes["b.py"]}, "/p"
    )
    q = _dir(4, {b"c.py": other}, "/q")
    root = _dir(1, {b"p": package, b"q": q}, "/")
    every = [root, package, pycache, q, other, *nodes.values()]
    tree = Tree({node.inode: node for node in every}, {})
    layer = builder.layer()
    source = FakeSource({layer.digest: bytes(builder.data)})
    config = ResolverConfig(memory_cache_bytes=1 << 20, merge_gap_bytes=0)
    async with anyio.create_task_group() as tasks:
        resolver = ChunkResolver(source, cache, [layer], config, tasks, BlobIndex.of_tree(tree))
        for name in names:
            node = nodes[name]
            assert await resolver.read(node, 0, 3000) == random_bytes(3000, 50 + names.index(name))
        assert len(source.calls) == 1  # the first miss brought the other three
        assert sorted(source.calls[0].ranges) == sorted(chunk_range(n, 0) for n in nodes.values())
        stats = resolver.stats
        assert stats.readahead_bytes == stats.readahead_used_bytes > 0
        tasks.cancel_scope.cancel()


# ----------------------------------------------------------------- early frames (earlyframes.py)


def _file_with_readahead(sizes: Sequence[int]) -> tuple[World, BlobIndex]:
    world = one_file(sizes)
    return world, BlobIndex.of_tree(_tree_of(world.node))


async def test_a_read_is_served_before_its_read_ahead_arrives(cache: ChunkCache) -> None:
    """A miss of chunk 0 brings the rest of the file in the same request; the read returns
    once chunk 0's bytes are in and verified, while the answer is held back."""
    world, index = _file_with_readahead([6000, 6000, 6000, 6000])
    first = chunk_range(world.node, 0)
    world.source.early_bytes = first.length
    world.source.gate = gate = anyio.Event()
    async with anyio.create_task_group() as tasks:
        resolver = ChunkResolver(world.source, cache, [world.layer], ResolverConfig(), tasks, index)
        with anyio.fail_after(5):
            assert await resolver.read(world.node, 0, 6000) == world.content[:6000]
        assert not gate.is_set() and len(world.source.calls) == 1
        assert world.source.calls[0].ranges == (span(world.node, 0, 3),)  # read-ahead: one range
        gate.set()
        with anyio.fail_after(5):
            assert await resolver.read(world.node, 6000, 18_000) == world.content[6000:]
        assert len(world.source.calls) == 1
        assert resolver.stats.chunks_fetched == 4
        assert resolver.stats.verification_failures == 0
        tasks.cancel_scope.cancel()
    assert cache.get_chunk(world.node.chunks[0].ref.verity) == world.content[:6000]


async def test_a_read_of_two_chunks_is_served_before_the_read_ahead_behind_them(
    cache: ChunkCache,
) -> None:
    world, index = _file_with_readahead([6000, 6000, 6000, 6000])
    world.source.gate = gate = anyio.Event()
    world.source.early_bytes = span(world.node, 0, 1).length  # chunks 0 and 1, then held
    async with anyio.create_task_group() as tasks:
        resolver = ChunkResolver(world.source, cache, [world.layer], ResolverConfig(), tasks, index)
        with anyio.fail_after(5):
            assert await resolver.read(world.node, 0, 12_000) == world.content[:12_000]
        assert not gate.is_set()
        gate.set()
        tasks.cancel_scope.cancel()


async def test_early_bytes_that_fail_are_left_to_the_whole_answer(cache: ChunkCache) -> None:
    """Early bytes are never trusted: a corrupt early copy of chunk 0 is dropped, the read
    waits for the answer's end, and gets the verified bytes; no verification failure counts."""
    world, index = _file_with_readahead([6000, 6000, 6000])
    first = chunk_range(world.node, 0)
    world.source.early_bytes = first.length
    world.source.early_tamper = flip_byte_at(first.start + 10)
    world.source.delay_s = 0.05
    async with anyio.create_task_group() as tasks:
        resolver = ChunkResolver(world.source, cache, [world.layer], ResolverConfig(), tasks, index)
        with anyio.fail_after(5):
            assert await resolver.read(world.node, 0, 18_000) == world.content
        assert resolver.stats.verification_failures == 0
        assert resolver.stats.chunks_fetched == 3
        tasks.cancel_scope.cancel()


async def test_a_corrupt_chunk_fails_once_early_or_not(cache: ChunkCache) -> None:
    world, index = _file_with_readahead([6000, 6000, 6000])
    first = chunk_range(world.node, 0)
    world.source.early_bytes = first.length
    world.source.tamper = world.source.early_tamper = flip_byte_at(first.start + 10)
    async with anyio.create_task_group() as tasks:
        resolver = ChunkResolver(world.source, cache, [world.layer], ResolverConfig(), tasks, index)
        with anyio.fail_after(5), pytest.raises(IntegrityError):
            await resolver.read(world.node, 0, 6000)
        assert resolver.stats.verification_failures == 1
        assert await resolver.read(world.node, 6000, 12_000) == world.content[6000:]
        tasks.cancel_scope.cancel()
    assert cache.get_chunk(world.node.chunks[0].ref.verity) is None


async def test_chunks_served_early_stand_when_the_answer_fails_later(cache: ChunkCache) -> None:
    """Chunk 0 came early and verified; the answer then fails: its reader keeps its bytes,
    chunk 0 is cached, the rest fail and are fetched again by the next read."""
    world, index = _file_with_readahead([6000, 6000, 6000])
    world.source.early_bytes = chunk_range(world.node, 0).length
    world.source.gate = gate = anyio.Event()
    world.source.errors = [TransientRegistryError("connection dropped mid-answer")]
    async with anyio.create_task_group() as tasks:
        resolver = ChunkResolver(world.source, cache, [world.layer], ResolverConfig(), tasks, index)
        with anyio.fail_after(5):
            assert await resolver.read(world.node, 0, 6000) == world.content[:6000]
            gate.set()
            await wait_until(lambda: cache.get_chunk(world.node.chunks[0].ref.verity) is not None)
            assert await resolver.read(world.node, 6000, 12_000) == world.content[6000:]
        assert world.source.calls[1].ranges == (span(world.node, 1, 2),)  # chunk 0 not again
        tasks.cancel_scope.cancel()


async def test_shutdown_while_early_batches_are_held_fails_the_rest(cache: ChunkCache) -> None:
    """The answer is held after chunk 0 came early: cancelling the resolver serves chunk 0's
    reader and fails the reader of chunk 1, neither hangs."""
    world, index = _file_with_readahead([6000, 6000, 6000])
    world.source.early_bytes = chunk_range(world.node, 0).length
    world.source.gate = anyio.Event()  # never set
    results: list[bytes | LazyfsError] = []

    async def reader(resolver: ChunkResolver, offset: int) -> None:
        try:
            results.append(await resolver.read(world.node, offset, 6000))
        except LazyfsError as exc:
            results.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as readers, anyio.create_task_group() as tasks:
            config = ResolverConfig()
            resolver = ChunkResolver(world.source, cache, [world.layer], config, tasks, index)
            readers.start_soon(reader, resolver, 0)
            await wait_until(lambda: len(results) == 1)
            readers.start_soon(reader, resolver, 6000)
            await wait_until(lambda: resolver.stats.singleflight_waits == 1)
            tasks.cancel_scope.cancel()
    assert results[0] == world.content[:6000]
    assert isinstance(results[1], FetchDeadlineError)


async def test_a_reader_joining_read_ahead_already_in_is_served_at_once(cache: ChunkCache) -> None:
    """Chunk 1 came in as read-ahead while the answer is held back; a read of it, arriving
    then, gets it without waiting for the answer's end."""
    world, index = _file_with_readahead([6000, 6000, 6000, 6000])
    world.source.gate = gate = anyio.Event()
    world.source.early_bytes = span(world.node, 0, 1).length
    async with anyio.create_task_group() as tasks:
        resolver = ChunkResolver(world.source, cache, [world.layer], ResolverConfig(), tasks, index)
        with anyio.fail_after(5):
            assert await resolver.read(world.node, 0, 6000) == world.content[:6000]
            assert await resolver.read(world.node, 6000, 6000) == world.content[6000:12_000]
        assert not gate.is_set() and len(world.source.calls) == 1
        gate.set()
        tasks.cancel_scope.cancel()
