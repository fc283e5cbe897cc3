"""The chunk resolver: turns a read of a file range into verified chunk bytes.

For each read it finds the chunks that cover the range, takes what the cache has, and fetches
the rest from a ByteSource: nearby chunks of one blob merge into one range, several ranges go
into one multi-range request, and requests run concurrently up to a bound. Every fetched chunk
is decompressed and checked against its digest in the TOC before it is cached or returned.

Concurrency (docs/concurrency.md): all state lives on the trio event loop and is only touched
there; blocking work (cache I/O, zstd, hashing) runs in worker threads and touches no resolver
state. Fetches are owned by the resolver's long-lived task group, not by the read that started
them, so a read that hits its deadline never strands other readers waiting on the same chunk
(singleflight: one ``_Flight`` per chunk key while it is being fetched).
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import hashlib
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import anyio
import anyio.to_thread
from anyio.abc import TaskGroup

from lazyfs.cache.chunkfiles import FileRead, read_blocking
from lazyfs.cache.store import ChunkCache, LoadedChunk
from lazyfs.config import ResolverConfig
from lazyfs.errors import CacheError, FetchDeadlineError, IntegrityError, LazyfsError
from lazyfs.formats.bounded import chunk_bytes
from lazyfs.model.bytesource import ByteSource
from lazyfs.model.digest import Digest
from lazyfs.model.histogram import LatencyHistogram
from lazyfs.model.ranges import ByteRange
from lazyfs.model.verity import format_verity, fsverity_digest
from lazyfs.mount.earlyframes import EarlyFrames
from lazyfs.mount.filereaders import FileReaders
from lazyfs.mount.fill import ForegroundMisses
from lazyfs.mount.prefetch import ProfileRecorder
from lazyfs.mount.readahead import BlobIndex, LinkEstimate, ReadaheadBudget, plan_ahead
from lazyfs.mount.tree import LayerChunk, Node

log = logging.getLogger(__name__)

ChunkCheck = Literal["verity", "sha256"]

# How often access times of chunks read without the store are written (one transaction).
BOOKKEEPING_INTERVAL_S = 1.0
_SWEEP_INTERVAL_S = 30.0  # closing files diskcache deleted, when no chunk was stored meanwhile
# Sequential reads advise the files of the chunks this far ahead (WILLNEED, in a reader
# thread), so that their bytes are in the page cache when the reads get there.
FILE_READAHEAD_BYTES = 4 << 20
# A read served from the store (a chunk whose file this process did not know) has the files
# of the chunks that follow it in the blob, up to this many compressed bytes, looked up and
# advised: a fresh service on a warm cache then reads most chunks by the warm path.
CACHE_READAHEAD_BYTES = 2 << 20
_ADVISE_BATCH = 16  # files per read-ahead job
# Chunks whose files are looked up when an image is mounted (ChunkFiles keeps 65,536 in all).
LEARN_FILES_MAX = 1 << 15
_LOCATED_MAX = 1 << 16  # keys looked up ahead and not found, remembered to not ask again
_SEQUENTIAL_FILES = 1024  # files whose read position is remembered for that


@dataclass(frozen=True)
class LayerBlob:
    """A layer blob chunks are fetched from, and how its chunks are checked."""

    digest: Digest
    size: int
    compression: Literal["zstd", "gzip"] = "zstd"
    check: ChunkCheck = "verity"
    # False for a plain layer that was fetched whole and converted locally at mount time.
    lazy: bool = True
    source_digest: Digest | None = None  # the registry's blob, when this one is a local copy
    fetched_whole_bytes: int = 0  # what fetching it whole cost at this mount (plain layers)


@dataclass
class ResolverStats:
    """Counters for ``lazyfs stats``. Mutated only on the event loop."""

    bytes_fetched: int = 0
    range_requests: int = 0
    chunks_fetched: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    singleflight_waits: int = 0
    verification_failures: int = 0
    readahead_chunks: int = 0  # fetched because they follow a miss, before anyone asked
    readahead_bytes: int = 0  # their compressed bytes
    readahead_used_bytes: int = 0  # of those, the bytes of chunks that reads then asked for
    prefetch_chunks: int = 0  # fetched by the prefetch of an access profile (prefetch.py)
    memory_hits: int = 0  # chunks served from the recently used ones in memory
    nowait_reads: int = 0  # cached chunks read from the page cache on the event loop
    thread_reads: int = 0  # cached chunks read from their files in a worker thread
    internal_errors: int = 0  # bugs contained: the requests they hit failed with EIO
    layer_bytes_fetched: dict[int, int] = field(default_factory=dict)
    read_latency: LatencyHistogram = field(default_factory=LatencyHistogram)  # file reads
    fetch_latency: LatencyHistogram = field(default_factory=LatencyHistogram)  # range requests


class RecentChunks:
    """Verified chunks this mount fetched or read lately, least recently used first, bounded
    in bytes. A read they serve needs no worker thread and no diskcache lookup; that is most
    reads after a prefetch, and every re-read the page cache no longer holds. Event loop only.
    """

    def __init__(self, limit_bytes: int) -> None:
        self._limit_bytes = limit_bytes
        self._chunks: OrderedDict[str, bytes] = OrderedDict()
        self.size_bytes = 0

    def get(self, key: str) -> bytes | None:
        data = self._chunks.get(key)
        if data is not None:
            self._chunks.move_to_end(key)
        return data

    def __contains__(self, key: str) -> bool:  # no use: the order stays
        return key in self._chunks

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self._limit_bytes or key in self._chunks:
            return
        self._chunks[key] = data
        self.size_bytes += len(data)
        while self.size_bytes > self._limit_bytes:
            _, evicted = self._chunks.popitem(last=False)
            self.size_bytes -= len(evicted)


class _Flight:
    """One chunk being fetched; readers that need it wait on ``done``."""

    def __init__(self, wanted: bool = False) -> None:
        self.done = anyio.Event()
        self.data: bytes | None = None
        self.error: LazyfsError | None = None
        self.wanted = wanted  # a reader waits for it (not only read-ahead, prefetch or fill)
        self.early: tuple[EarlyFrames, int] | None = None  # its request's listener, its index

    def want(self) -> None:
        """A reader joins: its chunk may already be whole in the answer still coming in."""
        self.wanted = True
        if self.early is not None:
            listener, index = self.early
            listener.wanted(index)

    def finish(self, data: bytes | None, error: LazyfsError | None) -> None:
        self.data, self.error = data, error
        self.early = None
        self.done.set()

    async def wait(self) -> bytes:
        await self.done.wait()
        if self.error is not None:
            raise self.error
        assert self.data is not None
        return self.data


@dataclass
class _Piece:
    """The part ``[low, high)`` of one chunk that a read wants, at ``at`` in its bytes;
    ``done`` bytes of it already there. ``cached``: the chunk's file is known (ChunkFiles)."""

    chunk: LayerChunk
    key: str
    low: int
    high: int
    at: int
    done: int = 0
    cached: bool = True


@dataclass(frozen=True)
class _Wanted:
    node: Node
    chunk: LayerChunk
    key: str


@dataclass(frozen=True)
class _Request:
    """One HTTP request: ranges of one blob and the chunks they carry."""

    layer: int
    ranges: tuple[ByteRange, ...]
    chunks: tuple[tuple[_Wanted, ...], ...]  # per range, in blob order


class SharedChunks:
    """What every image of one service shares, so that a chunk two images hold is fetched once
    even when both read it at the same moment: the chunk cache, the recently used verified
    chunks in memory, the singleflight table (keyed by content: fs-verity digest, or sha256
    where a layer has no fs-verity digests), the bound on concurrent fetches, and the task
    group that owns fetches. Event loop only (docs/concurrency.md)."""

    def __init__(self, cache: ChunkCache, config: ResolverConfig, task_group: TaskGroup) -> None:
        self.cache = cache
        self.files = cache.files
        self.readers = FileReaders()
        self.recent = RecentChunks(config.memory_cache_bytes)
        self.flights: dict[str, _Flight] = {}
        self.limiter = anyio.CapacityLimiter(config.max_concurrent_fetches)
        self.task_group = task_group
        # Reads of any image waiting on the network: every image's fill pauses for them.
        self.foreground = ForegroundMisses()
        self._bookkeeping = False
        self._swept = time.monotonic()

    def read_noted(self) -> None:
        """A chunk was read without the store: make sure its access time gets written. At most
        one task at a time does that, every BOOKKEEPING_INTERVAL_S (invariant 15)."""
        if not self._bookkeeping:
            self._bookkeeping = True
            self.task_group.start_soon(self._keep_books)

    async def _keep_books(self) -> None:
        """Background task: after a while, write the noted access times (one transaction)
        and close the files of chunks diskcache evicted meanwhile. Nothing escapes it."""
        try:
            await anyio.sleep(BOOKKEEPING_INTERVAL_S)
            now = time.monotonic()
            if self.files.learned_since_sweep or now - self._swept >= _SWEEP_INTERVAL_S:
                self._swept = now
                closed = self.files.sweep()
                if closed:
                    log.debug("closed %d files of evicted chunks", closed)
            await anyio.to_thread.run_sync(self.cache.flush_reads)
        except LazyfsError as exc:
            log.warning("cannot write chunk access times: %s", exc)
        except Exception:
            log.exception("cache bookkeeping crashed")
        finally:
            self._bookkeeping = False


class ChunkResolver:
    """Reads of one image: its layers, byte source, read-ahead state and statistics. Without
    ``shared`` it has cache, memory and flights of its own (one image per process)."""

    def __init__(
        self,
        source: ByteSource,
        cache: ChunkCache,
        layers: Sequence[LayerBlob],
        config: ResolverConfig,
        task_group: TaskGroup,
        blob_index: BlobIndex | None = None,
        recorder: ProfileRecorder | None = None,
        shared: SharedChunks | None = None,
    ) -> None:
        shared = shared or SharedChunks(cache, config, task_group)
        self._source = source
        self._recorder = recorder
        self._blob_index = blob_index
        self._link = LinkEstimate()
        self._budget = ReadaheadBudget(credit_bytes=config.readahead_max_bytes)
        self._shared = shared
        self._recent = shared.recent
        self._cache = shared.cache
        self._files = shared.files
        self._readers = shared.readers
        self._verify = shared.cache.verify_reads
        # Per file, by node, never by inode: a layer store's image serves every layer's own
        # tree through this one resolver, and each tree numbers its inodes from 1.
        self._positions: dict[Node, tuple[int, int]] = {}  # (next offset, advised to)
        self._located: set[str] = set()  # keys looked up ahead (found or not)
        self._layers = list(layers)
        self._config = config
        self._task_group = shared.task_group
        self._limiter = shared.limiter
        self._flights = shared.flights
        self.foreground = shared.foreground
        self._starts: dict[Node, list[int]] = {}  # each file's chunk offsets, by node
        self.stats = ResolverStats()

    @property
    def cache(self) -> ChunkCache:
        """The chunk cache this resolver reads (the service's, shared by every image)."""
        return self._cache

    async def read(self, node: Node, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of a regular file, clipped at its end."""
        end = min(offset + size, node.size)
        if offset >= end:
            return b""
        started = time.monotonic()
        chunks = self._covering(node, offset, end)
        if self._recorder is not None:
            self._recorder.record(node, chunks)
        self._readers.poll()
        try:
            self._read_ahead(node, offset, end)
            if len(chunks) == 1:
                data = self._recent_slice(chunks[0], offset, end)
                if data is not None:
                    return data
            out = bytearray(end - offset)
            later = self._fill_at_once(chunks, offset, end, memoryview(out))
            if later:
                with anyio.fail_after(self._config.read_deadline_s):
                    await self._fill_later(node, later, memoryview(out))
            return bytes(out)
        except TimeoutError as exc:
            raise FetchDeadlineError(
                f"{node.path}: read not satisfied within {self._config.read_deadline_s} s"
            ) from exc
        finally:
            self.stats.read_latency.observe(time.monotonic() - started)

    def _read_ahead(self, node: Node, offset: int, end: int) -> None:
        """A read that goes on from where the last one of the file ended (or starts it) has
        the files of the next FILE_READAHEAD_BYTES of chunks advised, in a reader thread that
        nobody waits for: the kernel reads each chunk file ahead on its own, but not the next
        file. Synchronous."""
        position, advised = self._positions.pop(node, (0, 0))
        if len(self._positions) >= _SEQUENTIAL_FILES:
            self._positions.clear()
        if offset != position and offset != 0:
            self._positions[node] = (end, end)
            return
        if offset != position or advised > end + FILE_READAHEAD_BYTES:
            advised = end  # a new pass over the file: what was advised before is stale
        horizon = min(node.size, end + FILE_READAHEAD_BYTES)
        if advised - end >= FILE_READAHEAD_BYTES // 2 or horizon <= end:
            self._positions[node] = (end, max(advised, end))
            return
        self._positions[node] = (end, horizon)
        reads = []
        for chunk in self._covering(node, max(advised, end), horizon):
            key = _key(chunk, self._layers[chunk.layer].check)
            if chunk.ref.zeros or self._recent.get(key) is not None:
                continue
            job = self._files.job(key, 0, _EMPTY, size=chunk.ref.size, advise=True)
            if job is not None:
                reads.append(job)
        self._advise(reads)

    def _advise(self, reads: list[FileRead]) -> None:
        """Have the background reader open ``reads``' files and advise WILLNEED; nobody waits."""
        for start in range(0, len(reads), _ADVISE_BATCH):
            batch = reads[start : start + _ADVISE_BATCH]
            self._readers.submit(
                functools.partial(read_blocking, self._files.dir_fd, batch, _verity_of),
                functools.partial(self._files.settle, batch),
                background=True,
            )

    def _recent_slice(self, chunk: LayerChunk, offset: int, end: int) -> bytes | None:
        """The wanted part of a read within one chunk, if that chunk is in memory."""
        if chunk.ref.zeros:
            return None
        key = _key(chunk, self._layers[chunk.layer].check)
        data = self._recent.get(key)
        if data is None:
            return None
        self._budget.read(key)
        self.stats.readahead_used_bytes = self._budget.used_bytes
        self.stats.memory_hits += 1
        start = chunk.ref.file_offset
        return data[offset - start : end - start]

    def _fill_at_once(
        self, chunks: Sequence[LayerChunk], offset: int, end: int, out: memoryview
    ) -> list[_Piece]:
        """Fill what needs no waiting into ``out`` (the read's bytes, zeroed): runs of zeros,
        chunks in memory, and cached chunks whose bytes the page cache holds (one preadv with
        RWF_NOWAIT of just the wanted bytes; docs/concurrency.md, invariant 15). Return the
        pieces still missing. Synchronous: no task, no thread, no SQLite."""
        later: list[_Piece] = []
        for chunk in chunks:
            ref = chunk.ref
            low = max(offset, ref.file_offset) - ref.file_offset
            high = min(end, ref.file_offset + ref.size) - ref.file_offset
            at = ref.file_offset + low - offset
            if ref.zeros:  # the verified TOC says so: ``out`` is zeros already
                continue
            key = _key(chunk, self._layers[chunk.layer].check)
            self._budget.read(key)
            data = self._recent.get(key)
            if data is not None:
                out[at : at + high - low] = memoryview(data)[low:high]
                self.stats.memory_hits += 1
                continue
            piece = _Piece(chunk, key, low, high, at)
            if not self._verify:  # a verifying cache re-hashes whole chunks, in a thread
                got = self._files.read_nowait(key, low, out[at : at + high - low])
                if got is None:
                    piece.cached = False
                elif got == high - low:
                    self._served_from_file(key, nowait=True)
                    continue
                else:
                    piece.done = got
            later.append(piece)
        self.stats.readahead_used_bytes = self._budget.used_bytes
        return later

    def _served_from_file(self, key: str, *, nowait: bool) -> None:
        entry = self._files.entry(key)
        if entry is not None:
            self._cache.note_read(entry.verity)
            self._shared.read_noted()
        self.stats.cache_hits += 1
        if nowait:
            self.stats.nowait_reads += 1
        else:
            self.stats.thread_reads += 1

    async def _fill_later(self, node: Node, later: list[_Piece], out: memoryview) -> None:
        """The pieces that wait: cached chunks read in a worker thread (all of the read's in
        one), then flights (the cache lookup, a fetch) for the rest and for any whose file
        was gone."""
        flights: dict[str, _Flight] = {}
        unknown = [p for p in later if not p.cached]
        self._start_flights(node, unknown, flights)
        failed = await self._read_files(node, [p for p in later if p.cached], out)
        self._start_flights(node, failed, flights)
        for piece in unknown + failed:
            data = await flights[piece.key].wait()
            out[piece.at : piece.at + piece.high - piece.low] = memoryview(data)[
                piece.low : piece.high
            ]

    def _start_flights(self, node: Node, pieces: list[_Piece], flights: dict[str, _Flight]) -> None:
        if not pieces:
            return
        owned = self._claim([_Wanted(node, p.chunk, p.key) for p in pieces], flights)
        if owned:
            self._task_group.start_soon(self._resolve, owned)

    async def _read_files(self, node: Node, pieces: list[_Piece], out: memoryview) -> list[_Piece]:
        """Read ``pieces`` from their chunks' files in one worker thread (a verifying cache
        reads and checks whole chunks, and keeps them in memory); those it could not read."""
        if not pieces:
            return []
        jobs: list[tuple[_Piece, FileRead]] = []
        failed: list[_Piece] = []
        for piece in pieces:
            if self._verify:
                job = self._files.job(piece.key, 0, out[:0], whole=True, size=piece.chunk.ref.size)
            else:
                start = piece.at + piece.done
                job = self._files.job(
                    piece.key,
                    piece.low + piece.done,
                    out[start : piece.at + piece.high - piece.low],
                )
            if job is None:
                failed.append(piece)
            else:
                jobs.append((piece, job))
        reads = [job for _, job in jobs]
        await self._readers.run(
            functools.partial(read_blocking, self._files.dir_fd, reads, _verity_of),
            functools.partial(self._files.settle, reads),
        )
        for piece, job in jobs:
            if not job.done:
                failed.append(piece)
                continue
            if job.data is not None:  # a whole chunk, verified again
                self._recent.put(piece.key, job.data)
                out[piece.at : piece.at + piece.high - piece.low] = memoryview(job.data)[
                    piece.low : piece.high
                ]
            self._served_from_file(piece.key, nowait=False)
        return failed

    def _wanted(self, node: Node, chunk: LayerChunk) -> _Wanted:
        return _Wanted(node, chunk, _key(chunk, self._layers[chunk.layer].check))

    def _covering(self, node: Node, offset: int, end: int) -> list[LayerChunk]:
        starts = self._starts.get(node)
        if starts is None:
            starts = self._starts[node] = [c.ref.file_offset for c in node.chunks]
        low = bisect.bisect_right(starts, offset) - 1
        high = bisect.bisect_left(starts, end)
        return list(node.chunks[max(low, 0) : high])

    def _claim(
        self, wanted: Sequence[_Wanted], flights: dict[str, _Flight] | None = None
    ) -> list[_Wanted]:
        """Join the flights of ``wanted`` (into ``flights``); return those that had none, now
        owned by the caller. Synchronous: no await between looking a flight up and creating it
        (invariant 6 in docs/concurrency.md)."""
        joined: dict[str, _Flight] = {} if flights is None else flights
        owned: list[_Wanted] = []
        for item in wanted:
            if item.chunk.ref.zeros or item.key in joined:
                continue
            flight = self._flights.get(item.key)
            if flight is None:
                flight = self._flights[item.key] = _Flight(wanted=flights is not None)
                owned.append(item)
            elif flights is not None and flight.done.is_set():
                self.stats.cache_hits += 1  # fetched and verified, on its way into the cache
            elif flights is not None:
                flight.want()
                self.stats.singleflight_waits += 1
                self.foreground.missed((flight.done,))  # maybe a fill's: it pauses after it
            joined[item.key] = flight
        return owned

    async def _resolve(self, owned: list[_Wanted]) -> None:
        """Background task: serve new flights from the cache, fetch the rest. Nothing escapes
        it: a bug fails the reads waiting on these flights, not every image of the service."""
        try:
            await self._serve_or_fetch(owned)
        except Exception as exc:
            log.exception("resolving %d chunks crashed", len(owned))
            self.stats.internal_errors += 1
            self._finish(owned, [LazyfsError(f"internal error: {exc!r}")] * len(owned))
        except BaseException:  # cancelled before its fetches own them (invariant 7)
            self._finish(owned, [FetchDeadlineError("fetch cancelled")] * len(owned))
            raise

    async def _serve_or_fetch(self, owned: list[_Wanted]) -> None:
        missing = await self._serve_from_cache(owned)
        self.stats.cache_hits += len(owned) - len(missing)
        self.stats.cache_misses += len(missing)
        if missing:
            flights = (self._flights.get(item.key) for item in missing)
            self.foreground.missed(flight.done for flight in flights if flight is not None)
        for item in missing:
            self._budget.missed(item.chunk.ref.size)
        not_cached = {id(item) for item in missing}
        missing += await self._readahead(missing)
        for request in self._plan(missing):
            self._task_group.start_soon(self._fetch, request)
        await self._locate_ahead([item for item in owned if id(item) not in not_cached])

    async def _locate_ahead(self, hits: list[_Wanted]) -> None:
        """After chunks came from the store or from files not in the page cache: have the
        files of the chunks that follow them in their blobs (CACHE_READAHEAD_BYTES) advised,
        those not known here looked up first. Errors only log."""
        await self._locate_and_advise(self._advise_following(hits))

    async def _locate_and_advise(self, wanted: dict[str, _Wanted]) -> None:
        """Look up the files of ``wanted`` (chunks ahead, not known here), and have the found
        ones advised. Nothing escapes: it also runs as a task of its own."""
        if not wanted:
            return
        try:
            found = await anyio.to_thread.run_sync(self._locate, list(wanted))
        except LazyfsError as exc:
            log.warning("cache look-up ahead failed: %s", exc)
            return
        except Exception:
            log.exception("cache look-up ahead crashed")
            self.stats.internal_errors += 1
            return
        reads = []
        for key, verity, name in found:
            self._files.learn(key, verity, name)
            job = self._files.job(key, 0, _EMPTY, size=wanted[key].chunk.ref.size, advise=True)
            if job is not None:
                reads.append(job)
        self._advise(reads)

    def _advise_following(self, hits: list[_Wanted]) -> dict[str, _Wanted]:
        """Advise the known files of the chunks after ``hits`` in their blobs, once per key
        (the disk was slow for the hits: their neighbours in the blob, which the workload
        likely reads next, are not in the page cache either); return the unknown ones, to
        look up. Synchronous."""
        if self._blob_index is None or not hits:
            return {}
        last: dict[int, _Wanted] = {}
        for item in hits:
            known = last.get(item.chunk.layer)
            if known is None or item.chunk.ref.blob_offset > known.chunk.ref.blob_offset:
                last[item.chunk.layer] = item
        if len(self._located) >= _LOCATED_MAX:
            self._located.clear()
        wanted: dict[str, _Wanted] = {}
        reads = []
        for item in last.values():
            for node, chunk in self._blob_index.following(item.chunk, CACHE_READAHEAD_BYTES):
                key = _key(chunk, self._layers[chunk.layer].check)
                if (
                    chunk.ref.zeros
                    or key in self._located
                    or key in self._flights
                    or self._recent.get(key) is not None
                ):
                    continue
                self._located.add(key)
                job = self._files.job(key, 0, _EMPTY, size=chunk.ref.size, advise=True)
                if job is not None:
                    reads.append(job)
                else:
                    wanted[key] = _Wanted(node, chunk, key)
        self._advise(reads)
        return wanted

    @property
    def files_evicted(self) -> int:
        """How many chunk files the service has forgotten for its bound, ever: while that stays
        the same, every chunk it cached since a ``learn_files`` is known."""
        return self._files.evicted

    async def learn_files(self, chunks: Iterable[LayerChunk]) -> int:
        """Learn which files hold the cached ones of ``chunks`` (the first LEARN_FILES_MAX; one
        query in a worker thread), so that their first reads skip the store's lookup (a
        thread hop, SQLite, the whole chunk read): a mount of a cached image. Chunks known
        only by sha256 would cost a query each: left to the normal path. How many learned."""
        keys: list[str] = []
        for chunk in itertools.islice(chunks, LEARN_FILES_MAX):  # bounded time on the loop
            if chunk.ref.zeros:
                continue
            key = _key(chunk, self._layers[chunk.layer].check)
            if not key.startswith(_SHA256_KEY) and self._files.entry(key) is None:
                keys.append(key)
        if not keys:
            return 0
        found = await anyio.to_thread.run_sync(self._locate, list(dict.fromkeys(keys)))
        for key, verity, name in found:
            self._files.learn(key, verity, name)
        return len(found)

    def _locate(self, keys: list[str]) -> list[tuple[str, str, str]]:
        """Worker thread: (key, fs-verity digest, file) of those of ``keys`` cached in files."""
        verities = {
            key: self._cache.get_alias(key.removeprefix(_SHA256_KEY))
            if key.startswith(_SHA256_KEY)
            else key
            for key in keys
        }
        names = self._cache.locate_chunks([v for v in verities.values() if v is not None])
        return [
            (key, verity, names[verity])
            for key, verity in verities.items()
            if verity is not None and verity in names
        ]

    async def _serve_from_cache(self, owned: list[_Wanted]) -> list[_Wanted]:
        """Finish the owned flights the cache can serve; return the others."""
        if not owned:
            return []
        try:
            cached = await anyio.to_thread.run_sync(self._cached, owned)
        except LazyfsError as exc:
            log.warning("cache lookup failed: %s", exc)
            cached = [None] * len(owned)
        missing = []
        for item, hit in zip(owned, cached, strict=True):
            if hit is None:
                missing.append(item)
                continue
            verity, loaded = hit
            if loaded.file_name is not None:
                self._files.learn(item.key, verity, loaded.file_name)
            self._recent.put(item.key, loaded.data)
            self._flights.pop(item.key).finish(loaded.data, None)
        return missing

    async def _readahead(self, missing: list[_Wanted]) -> list[_Wanted]:
        """Flights for what follows each layer's last miss (docs in readahead.py)."""
        index = self._blob_index
        config = self._config
        if index is None or not missing or config.readahead_max_bytes <= 0:
            return []
        window = self._link.window_bytes(
            min(config.readahead_min_bytes, config.readahead_next_files_max_bytes),
            config.readahead_next_files_max_bytes,
        )
        last: dict[int, _Wanted] = {}
        for item in missing:
            if (
                item.chunk.layer not in last
                or item.chunk.ref.blob_offset > last[item.chunk.layer].chunk.ref.blob_offset
            ):
                last[item.chunk.layer] = item
        following: list[_Wanted] = []
        directories: dict[str, str | None] = {}
        for item in last.values():
            for ahead in plan_ahead(
                index, self._budget, item.chunk, item.node, config, window, self._present
            ):
                wanted = self._wanted(ahead.node, ahead.chunk)
                directories[wanted.key] = ahead.directory
                following.append(wanted)
        fetch = await self._serve_from_cache(self._claim(following))
        self.stats.readahead_chunks += len(fetch)
        for item in fetch:
            self._budget.fetched_ahead(
                item.key, _compressed_size(item), item.chunk.ref.size, directories[item.key]
            )
        self.stats.readahead_bytes = self._budget.ahead_bytes
        return fetch

    def _present(self, chunk: LayerChunk) -> bool:
        """Whether ``chunk`` is on its way, in memory or known to be in the cache."""
        key = _key(chunk, self._layers[chunk.layer].check)
        return key in self._flights or key in self._recent or self._files.entry(key) is not None

    async def prefetch(self, order: Sequence[tuple[Node, LayerChunk]]) -> None:
        """Fetch the chunks of ``order`` before anyone reads them, in that order.

        Batches of about ``prefetch_batch_bytes`` (compressed) go out one after another, at
        most ``prefetch_concurrency`` at a time, so the first chunks needed arrive first and
        demand misses still find free connections. A batch claims its flights only when it
        starts, so a read never waits behind a queue of unstarted prefetches: it joins a
        running fetch or starts its own."""
        slots = anyio.Semaphore(max(1, self._config.prefetch_concurrency))
        async with anyio.create_task_group() as batches:
            for batch in _batches(order, self._config.prefetch_batch_bytes):
                await slots.acquire()
                owned = self._claim([self._wanted(node, chunk) for node, chunk in batch])
                batches.start_soon(self._prefetch_batch, owned, slots)
        log.info("prefetch done: %d chunks fetched", self.stats.prefetch_chunks)

    async def _prefetch_batch(self, owned: list[_Wanted], slots: anyio.Semaphore) -> None:
        try:
            missing = await self._serve_from_cache(owned)
            self.stats.prefetch_chunks += len(missing)
            async with anyio.create_task_group() as fetches:
                for request in self._plan(missing):
                    fetches.start_soon(self._fetch, request)
        except BaseException:  # cancelled before its fetches own them: no waiter stranded (7)
            self._finish(owned, [FetchDeadlineError("prefetch cancelled")] * len(owned))
            raise
        finally:
            slots.release()

    def _cached(self, owned: list[_Wanted]) -> list[tuple[str, LoadedChunk] | None]:
        """Worker thread: the cached chunks for flight keys (fs-verity, or sha256 via alias),
        with their fs-verity digests. A cached chunk of the wrong length is a miss (and is
        dropped): the TOC, verified, gives the length."""
        verities = [
            self._cache.get_alias(item.key.removeprefix(_SHA256_KEY))
            if item.key.startswith(_SHA256_KEY)
            else item.key
            for item in owned
        ]
        found: list[tuple[str, LoadedChunk] | None] = []
        for item, verity, loaded in zip(
            owned, verities, self._cache.load_chunks(verities), strict=True
        ):
            if verity is None or loaded is None:
                found.append(None)
            elif len(loaded.data) != item.chunk.ref.size:
                log.warning("cached chunk %s has %d bytes, not %d: dropped", verity,
                            len(loaded.data), item.chunk.ref.size)  # fmt: skip
                with contextlib.suppress(CacheError):
                    self._cache.drop_chunk(verity)
                found.append(None)
            else:
                found.append((verity, loaded))
        return found

    def _plan(self, wanted: list[_Wanted]) -> list[_Request]:
        by_layer: dict[int, list[_Wanted]] = {}
        for item in wanted:
            by_layer.setdefault(item.chunk.layer, []).append(item)
        requests: list[_Request] = []
        for layer, items in sorted(by_layer.items()):
            groups = self._merge(sorted(items, key=lambda w: w.chunk.ref.blob_offset))
            step = max(1, self._config.max_ranges_per_request)
            for i in range(0, len(groups), step):
                batch = groups[i : i + step]
                requests.append(
                    _Request(layer, tuple(r for r, _ in batch), tuple(c for _, c in batch))
                )
        return requests

    def _merge(self, items: list[_Wanted]) -> list[tuple[ByteRange, tuple[_Wanted, ...]]]:
        groups: list[tuple[ByteRange, tuple[_Wanted, ...]]] = []
        for item in items:
            ref = item.chunk.ref
            if groups:
                last, members = groups[-1]
                gap = ref.blob_offset - last.end
                merged_length = ref.blob_end - last.start
                if (
                    gap <= self._config.merge_gap_bytes
                    and merged_length <= self._config.max_request_bytes
                ):
                    groups[-1] = (
                        ByteRange(last.start, max(last.end, ref.blob_end)),
                        (*members, item),
                    )
                    continue
            groups.append((ByteRange(ref.blob_offset, ref.blob_end), (item,)))
        return groups

    async def _fetch(self, request: _Request) -> None:
        """Fetch ``request``, verify its chunks and complete their flights; nothing escapes.
        Chunks that readers wait for are served as their frames arrive, in batches of the
        ``early`` task group (``_settle_early``); the answer's end waits for them and verifies
        only the chunks they did not serve."""
        items = [item for group in request.chunks for item in group]
        blob = self._layers[request.layer]
        served: set[str] = set()  # the flight keys the early batches served
        try:
            async with anyio.create_task_group() as early:  # ends once its batches are settled
                bodies = await self._read(request, items, blob, early, served)
            items = [item for item in items if item.key not in served]
            outcome = (
                bodies
                if isinstance(bodies, LazyfsError)
                else await self._verify_answer(request, blob, bodies, served)
            )
        except BaseException:  # cancelled: no waiter may be stranded (invariant 7)
            self._finish(items, [FetchDeadlineError("fetch cancelled")] * len(items))
            raise
        verified = outcome if isinstance(outcome, _Verified) else _Verified([outcome] * len(items))
        await self._keep(verified, self._finish(items, verified.results))

    async def _read(
        self,
        request: _Request,
        items: list[_Wanted],
        blob: LayerBlob,
        early: TaskGroup,
        served: set[str],
    ) -> list[bytes] | LazyfsError:
        """The bodies of ``request``'s ranges, or what the fetch failed with (the early
        batches started into ``early`` meanwhile still serve what they verified)."""
        try:
            listener = self._early_frames(request, items, blob, early, served)
            async with self._limiter:
                started = time.monotonic()
                try:
                    bodies = await self._source.read_ranges(blob.digest, request.ranges, listener)
                finally:
                    if listener is not None:
                        listener.close()
                elapsed = time.monotonic() - started
            if blob.lazy:
                self._link.record(sum(len(b) for b in bodies), elapsed)
                self.stats.fetch_latency.observe(elapsed)
            self._count_fetch(request, bodies)
        except Exception as exc:
            return self._fetch_failure(request, exc)
        return bodies

    async def _verify_answer(
        self, request: _Request, blob: LayerBlob, bodies: list[bytes], served: set[str]
    ) -> _Verified | LazyfsError:
        """Worker thread: the chunks of the answer that no early batch served, verified."""
        try:
            frames = [f for f in _cut_frames(request, bodies) if f[0].key not in served]
            return await anyio.to_thread.run_sync(_verify_frames, blob, frames)
        except Exception as exc:
            return self._fetch_failure(request, exc)

    @staticmethod
    def _fetch_failure(request: _Request, exc: Exception) -> LazyfsError:
        """What the flights of a failed fetch end with: a bug fails these reads, not the mount."""
        chunks = sum(len(group) for group in request.chunks)
        if isinstance(exc, LazyfsError):
            log.warning("fetch of %d chunks from layer %d failed: %s", chunks, request.layer, exc)
            return exc
        log.error("fetch of %d chunks from layer %d crashed", chunks, request.layer, exc_info=exc)
        return LazyfsError(f"fetch failed: {exc!r}")

    def _early_frames(
        self,
        request: _Request,
        items: list[_Wanted],
        blob: LayerBlob,
        early: TaskGroup,
        served: set[str],
    ) -> EarlyFrames | None:
        """The listener that hands on the chunks readers wait for as their bytes arrive
        (mount/earlyframes.py), each batch verified and served by ``_settle_early``; none for
        a request of one chunk, whose answer's end is its frame's."""
        if len(items) < 2:
            return None

        def waited(index: int) -> bool:
            flight = self._flights.get(items[index].key)
            return flight is not None and flight.wanted and not flight.done.is_set()

        def ready(frames: list[tuple[int, bytes]]) -> None:
            batch = [(items[index], frame) for index, frame in frames]
            early.start_soon(self._settle_early, blob, batch, served)

        range_of = [which for which, group in enumerate(request.chunks) for _ in group]
        refs = [item.chunk.ref for item in items]
        listener = EarlyFrames(request.ranges, refs, range_of, waited, ready)
        for index, item in enumerate(items):
            flight = self._flights.get(item.key)
            if flight is not None and not flight.done.is_set():
                flight.early = (listener, index)
        return listener

    async def _settle_early(
        self, blob: LayerBlob, frames: list[tuple[_Wanted, bytes]], served: set[str]
    ) -> None:
        """Task of a fetch's early group: verify and serve chunks of an answer still coming
        in, then hand their caching to the resolver's tasks. One that fails stays in flight:
        the answer's end, strictly parsed, decides (earlyframes.py). Nothing escapes it."""
        try:
            verified = await anyio.to_thread.run_sync(_verify_frames, blob, frames)
            good = [
                (item, data)
                for (item, _), data in zip(frames, verified.results, strict=True)
                if isinstance(data, bytes)
            ]
            flights = self._finish([item for item, _ in good], [data for _, data in good])
            served.update(item.key for item, _ in good)
        except Exception:
            log.exception("early frames of %d chunks crashed", len(frames))
            return
        self._task_group.start_soon(self._keep_early, verified, flights)

    async def _keep_early(self, verified: _Verified, served: list[tuple[str, _Flight]]) -> None:
        try:
            await self._keep(verified, served)
        except Exception:
            log.exception("caching %d early chunks crashed", len(served))

    async def _keep(self, verified: _Verified, served: list[tuple[str, _Flight]]) -> None:
        """Cache what ``verified`` holds; the ``served`` flights stay joinable until then."""
        try:  # readers have their bytes; the served flights stay joinable until cached
            names = await anyio.to_thread.run_sync(self._store, verified)
            for key, (verity, _data) in zip(verified.keys, verified.chunks, strict=True):
                name = names.get(verity)
                if name is not None:
                    self._files.learn(key, verity, name)
        finally:
            for key, flight in served:
                if self._flights.get(key) is flight:
                    del self._flights[key]

    def _count_fetch(self, request: _Request, bodies: list[bytes]) -> None:
        if not self._layers[request.layer].lazy:
            return  # read from the local copy, not the network
        fetched = sum(len(b) for b in bodies)
        self.stats.bytes_fetched += fetched
        self.stats.range_requests += 1
        per_layer = self.stats.layer_bytes_fetched
        per_layer[request.layer] = per_layer.get(request.layer, 0) + fetched

    def _finish(
        self, items: list[_Wanted], results: Sequence[bytes | LazyfsError]
    ) -> list[tuple[str, _Flight]]:
        """Complete the flights of ``items``. Failed ones leave ``_flights`` at once, so the
        next read retries; served ones are returned, still in ``_flights`` (the caller drops
        them once their bytes are in the cache, so no reader in between fetches again)."""
        served = []
        for item, result in zip(items, results, strict=True):
            flight = self._flights.get(item.key)
            if flight is None or flight.done.is_set():
                continue
            if isinstance(result, bytes):
                self.stats.chunks_fetched += 1
                self._recent.put(item.key, result)
                flight.finish(result, None)
                served.append((item.key, flight))
                continue
            if isinstance(result, IntegrityError):
                self.stats.verification_failures += 1
                log.error("%s: %s", item.node.path, result)
            del self._flights[item.key]
            flight.finish(None, result)
        return served

    def _store(self, verified: _Verified) -> dict[str, str]:
        """Worker thread: cache verified chunks; their files (by fs-verity digest). Touches
        no resolver state."""
        try:  # one transaction per request: concurrent writers contend for SQLite's lock
            return self._cache.put_chunks(verified.chunks, verified.aliases)
        except CacheError as exc:  # the bytes are verified and served: only caching failed
            log.warning("could not cache %d chunks: %s", len(verified.chunks), exc)
            return {}


@dataclass
class _Verified:
    """What a worker thread made of one request's frames."""

    results: list[bytes | LazyfsError] = field(default_factory=list)  # per chunk, in order
    chunks: list[tuple[str, bytes]] = field(default_factory=list)  # (fs-verity, bytes) to cache
    keys: list[str] = field(default_factory=list)  # the flight key of each of ``chunks``
    aliases: list[tuple[str, str]] = field(default_factory=list)  # (sha256, fs-verity)


def _verify_frames(blob: LayerBlob, frames: list[tuple[_Wanted, bytes]]) -> _Verified:
    """Worker thread: decompress and verify each frame."""
    out = _Verified()
    for item, frame in frames:
        try:
            verity, data = _verified(item, blob, frame)
        except LazyfsError as exc:
            out.results.append(exc)
            continue
        out.results.append(data)
        out.chunks.append((verity, data))
        out.keys.append(item.key)
        if item.key.startswith(_SHA256_KEY):
            out.aliases.append((item.chunk.ref.sha256, verity))
    return out


_SHA256_KEY = "plain-"  # flight keys of chunks known only by sha256
_EMPTY = memoryview(b"")


def _key(chunk: LayerChunk, check: ChunkCheck) -> str:
    """The flight and cache key: the fs-verity digest, only where the layer is checked by it."""
    return chunk.ref.verity if check == "verity" else _SHA256_KEY + chunk.ref.sha256


def _verity_of(data: bytes) -> str:
    return format_verity(fsverity_digest(data))


def _compressed_size(item: _Wanted) -> int:
    return item.chunk.ref.blob_end - item.chunk.ref.blob_offset


def _batches(
    order: Sequence[tuple[Node, LayerChunk]], batch_bytes: int
) -> Iterator[list[tuple[Node, LayerChunk]]]:
    """``order`` in consecutive pieces of about ``batch_bytes`` compressed bytes each."""
    batch: list[tuple[Node, LayerChunk]] = []
    size = 0
    for node, chunk in order:
        batch.append((node, chunk))
        size += chunk.ref.blob_end - chunk.ref.blob_offset
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _cut_frames(request: _Request, bodies: list[bytes]) -> list[tuple[_Wanted, bytes]]:
    frames = []
    for rng, body, members in zip(request.ranges, bodies, request.chunks, strict=True):
        for item in members:
            ref = item.chunk.ref
            frames.append((item, body[ref.blob_offset - rng.start : ref.blob_end - rng.start]))
    return frames


def _verified(item: _Wanted, blob: LayerBlob, frame: bytes) -> tuple[str, bytes]:
    """Decompress (never past the size the verified TOC gives) and check one chunk; its
    fs-verity digest and bytes."""
    ref = item.chunk.ref
    data = chunk_bytes(frame, blob.compression, ref.size, ref.inner_offset, _describe(item, blob))
    return _check(item, blob, data), data


def _describe(item: _Wanted, blob: LayerBlob) -> str:
    ref = item.chunk.ref
    return f"chunk at offset {ref.file_offset} of {item.node.path} (layer {blob.digest})"


def _check(item: _Wanted, blob: LayerBlob, data: bytes) -> str:
    """Raise IntegrityError unless ``data`` is the chunk; return its fs-verity digest."""
    ref = item.chunk.ref
    what = _describe(item, blob)
    if len(data) != ref.size:
        raise IntegrityError(what, f"{ref.size} bytes", f"{len(data)} bytes")
    verity = format_verity(fsverity_digest(data))
    if blob.check == "verity":
        if verity != ref.verity:
            raise IntegrityError(what, ref.verity, verity)
        return verity
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if actual != ref.sha256:
        raise IntegrityError(what, ref.sha256, actual)
    return verity
