"""Answer bodies: read with a size limit, check Content-Length, cut out the wanted ranges.

A Range GET may be answered 206 with one part or ``multipart/byteranges``, or 200 with the
whole blob (pull-through proxies do that); the whole blob is verified before any range of it is
returned. Streamed blobs go to a ``BlobSink``, committed only once their digest checked out.

Use these inside ``Transport.exchange``, which turns httpx errors raised while reading into
lazyfs errors. Every body byte is counted in ``RegistryStats.bytes_received``.

Every body is read under a ``StallGuard``: httpx's timeouts apply to each socket read, so a
server that sends a byte now and then would hold a request forever; the guard ends a body that
brings fewer than ``min_bytes`` in ``timeout_s`` with a TransientRegistryError, which the retry
policy (client.py) retries like any broken transfer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import anyio
import httpx

from lazyfs.config import RegistryConfig
from lazyfs.errors import RegistryProtocolError, TransientRegistryError
from lazyfs.model.bytesource import RangeListener
from lazyfs.model.digest import Digest, DigestingWriter
from lazyfs.model.ranges import (
    ByteRange,
    PartialBody,
    parse_content_range,
    parse_multipart_byteranges,
    slice_ranges,
)
from lazyfs.registry.transport import RegistryStats
from lazyfs.registry.wire import media_type_of


@dataclass(frozen=True)
class StallGuard:
    """A body stalls when fewer than ``min_bytes`` arrive within ``timeout_s``."""

    timeout_s: float = RegistryConfig.stall_timeout_s
    min_bytes: int = RegistryConfig.stall_min_bytes

    @classmethod
    def of(cls, config: RegistryConfig) -> StallGuard:
        return cls(config.stall_timeout_s, config.stall_min_bytes)


_DEFAULT_GUARD = StallGuard()


async def each_chunk(
    response: httpx.Response, guard: StallGuard, what: str, handle: Callable[[bytes], None]
) -> None:
    """Hand every chunk of the body to ``handle`` as it arrives, under ``guard``.

    One cancel scope covers the whole body; its deadline moves on each time ``min_bytes`` more
    have arrived. (A callback, not an async generator: a generator may not yield inside a
    cancel scope.) Chunks are what each socket read brings, so progress is seen as it happens.
    """
    with anyio.CancelScope(deadline=anyio.current_time() + guard.timeout_s) as scope:
        since_progress = 0
        async for chunk in response.aiter_bytes():
            handle(chunk)
            since_progress += len(chunk)
            if since_progress >= guard.min_bytes:
                since_progress = 0
                scope.deadline = anyio.current_time() + guard.timeout_s
    if scope.cancelled_caught:
        raise TransientRegistryError(
            f"{what}: the answer stalled (fewer than {guard.min_bytes} bytes in "
            f"{guard.timeout_s:g} s)"
        )


class BlobSink(Protocol):
    """Where a streamed blob goes: every byte, then ``commit`` if it verified, else ``discard``."""

    def write(self, data: bytes) -> None: ...

    def commit(self) -> None: ...

    def discard(self) -> None: ...


class Progress:
    """Reports newly received bytes; a retried download reports only bytes past the old mark."""

    def __init__(self, callback: Callable[[int], None] | None) -> None:
        self._callback = callback
        self._reported = 0

    def reached(self, total: int) -> None:
        if self._callback is not None and total > self._reported:
            self._callback(total - self._reported)
            self._reported = total


async def read_body(
    response: httpx.Response,
    stats: RegistryStats,
    what: str,
    limit: int | None = None,
    guard: StallGuard = _DEFAULT_GUARD,
    observe: Callable[[bytes], None] | None = None,
) -> bytes:
    """The whole body, counted; raises on an oversized, truncated or stalled body.
    ``observe`` sees each piece as it arrives (``early_pieces``)."""
    declared = _declared_length(response)
    if limit is not None and declared is not None and declared > limit:
        raise RegistryProtocolError(f"{what}: answer of {declared} bytes, larger than {limit}")
    chunks: list[bytes] = []
    size = 0

    def keep(chunk: bytes) -> None:
        nonlocal size
        size += len(chunk)
        stats.bytes_received += len(chunk)
        if limit is not None and size > limit:
            raise RegistryProtocolError(f"{what}: answer larger than {limit} bytes")
        chunks.append(chunk)
        if observe is not None:
            observe(chunk)

    await each_chunk(response, guard, what, keep)
    check_length(response, size, what)
    return b"".join(chunks)


def early_pieces(
    response: httpx.Response, on_data: RangeListener | None
) -> Callable[[bytes], None] | None:
    """An observer for ``read_body`` that tells ``on_data`` which blob bytes each piece of a
    206 answer carries (one part or multipart), before the body is whole and checked."""
    if on_data is None or response.status_code != 206:
        return None
    body = PartialBody(
        response.headers.get("Content-Type", ""), response.headers.get("Content-Range")
    )

    def observe(chunk: bytes) -> None:
        for offset, data in body.feed(chunk):
            on_data(offset, data)

    return observe


def _declared_length(response: httpx.Response) -> int | None:
    declared = response.headers.get("Content-Length")
    if declared is None or not declared.isdigit() or "Content-Encoding" in response.headers:
        return None
    return int(declared)


def check_length(response: httpx.Response, received: int, what: str) -> None:
    """A body shorter or longer than its Content-Length is a broken transfer (retried)."""
    declared = _declared_length(response)
    if declared is not None and declared != received:
        raise TransientRegistryError(f"{what}: truncated answer, {received} of {declared} bytes")


async def stream_to_sink(
    response: httpx.Response,
    stats: RegistryStats,
    digest: Digest,
    sink: BlobSink,
    progress: Progress,
    what: str,
    guard: StallGuard = _DEFAULT_GUARD,
) -> int:
    """Feed the blob to ``sink``, commit it once verified (else discard it); returns its size."""

    def report(chunk: bytes, offset: int) -> None:
        progress.reached(offset + len(chunk))

    return await _stream_verified(response, stats, digest, sink, report, what, guard)


async def slice_whole_blob(
    response: httpx.Response,
    stats: RegistryStats,
    digest: Digest,
    ranges: Sequence[ByteRange],
    sink: BlobSink | None,
    what: str,
    guard: StallGuard = _DEFAULT_GUARD,
) -> list[bytes]:
    """Keep the wanted bytes of a whole-blob answer, verifying all of it.

    With a ``sink``, the whole blob goes there too (committed only once verified): a pull-through
    proxy answers a first Range request with the whole blob, and that transfer should not be
    wasted.
    """
    pieces = [bytearray() for _ in ranges]

    def collect(chunk: bytes, offset: int) -> None:
        _collect_overlaps(chunk, offset, ranges, pieces)

    size = await _stream_verified(response, stats, digest, sink, collect, what, guard)
    if size < max(r.end for r in ranges):
        raise RegistryProtocolError(f"{what}: blob has only {size} bytes")
    return [bytes(piece) for piece in pieces]


def slice_partial_answer(
    response: httpx.Response, body: bytes, ranges: Sequence[ByteRange], what: str
) -> list[bytes]:
    """Cut the requested ranges out of a 206 answer (multipart, or one covering part)."""
    if response.status_code != 206:
        raise RegistryProtocolError(
            f"{what}: unexpected HTTP {response.status_code} to a Range GET"
        )
    content_type = response.headers.get("Content-Type", "")
    if media_type_of(content_type) == "multipart/byteranges":
        parts = parse_multipart_byteranges(body, content_type)
    else:
        parts = [(_single_part_range(response, body, what), body)]
    return [_cut(parts, rng, what) for rng in ranges]


async def _stream_verified(
    response: httpx.Response,
    stats: RegistryStats,
    digest: Digest,
    sink: BlobSink | None,
    on_chunk: Callable[[bytes, int], None],
    what: str,
    guard: StallGuard,
) -> int:
    """Feed each chunk to ``sink`` and to ``on_chunk(chunk, blob offset)``; returns the size.

    Length and digest are checked at the end; only then is ``sink`` committed. On any failure
    it is discarded, so a partial or corrupt blob is never kept.
    """
    writer = DigestingWriter(digest.algorithm)

    def feed(chunk: bytes) -> None:
        if sink is not None:
            # A blocking write of one socket read to local disk costs less than a thread hop.
            sink.write(chunk)
        on_chunk(chunk, writer.size_bytes)
        writer.update(chunk)
        stats.bytes_received += len(chunk)

    try:
        await each_chunk(response, guard, what, feed)
        check_length(response, writer.size_bytes, what)
        writer.check(digest, what)
    except BaseException:
        if sink is not None:
            sink.discard()
        raise
    if sink is not None:
        sink.commit()
    return writer.size_bytes


def _single_part_range(response: httpx.Response, body: bytes, what: str) -> ByteRange:
    header = response.headers.get("Content-Range")
    if header is None:
        raise RegistryProtocolError(f"{what}: 206 answer without Content-Range")
    received, _total = parse_content_range(header)
    if received.length != len(body):
        raise TransientRegistryError(f"{what}: {len(body)} bytes for Content-Range {header}")
    return received


def _cut(parts: Sequence[tuple[ByteRange, bytes]], rng: ByteRange, what: str) -> bytes:
    for part_range, data in parts:
        if part_range.start <= rng.start and rng.end <= part_range.end:
            return slice_ranges(data, part_range.start, [rng])[0]
    raise RegistryProtocolError(f"{what}: answer lacks bytes {rng.start}-{rng.end - 1}")


def _collect_overlaps(
    chunk: bytes, offset: int, ranges: Sequence[ByteRange], pieces: list[bytearray]
) -> None:
    """Append the parts of ``chunk`` (starting at blob ``offset``) that fall in each range."""
    chunk_end = offset + len(chunk)
    for rng, piece in zip(ranges, pieces, strict=True):
        start, end = max(rng.start, offset), min(rng.end, chunk_end)
        if start < end:
            piece += chunk[start - offset : end - offset]
