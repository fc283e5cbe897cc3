"""Answer bodies: read with a size limit, check Content-Length, cut out the wanted ranges.

A Range GET may be answered 206 with one part or ``multipart/byteranges``, or 200 with the
whole blob (pull-through proxies do that); the whole blob is verified before any range of it is
returned. Streamed blobs go to a ``BlobSink``, committed only once their digest checked out.

Use these inside ``Transport.exchange``, which turns httpx errors raised while reading into
lazyfs errors. Every body byte is counted in ``RegistryStats.bytes_received``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import httpx

from lazyfs.errors import RegistryProtocolError, TransientRegistryError
from lazyfs.model.digest import Digest, DigestingWriter
from lazyfs.model.ranges import (
    ByteRange,
    parse_content_range,
    parse_multipart_byteranges,
    slice_ranges,
)
from lazyfs.registry.transport import RegistryStats
from lazyfs.registry.wire import media_type_of

STREAM_CHUNK_BYTES = 1 << 20


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
    response: httpx.Response, stats: RegistryStats, what: str, limit: int | None = None
) -> bytes:
    """The whole body, counted; raises on an oversized or truncated body."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        stats.bytes_received += len(chunk)
        if limit is not None and size > limit:
            raise RegistryProtocolError(f"{what}: answer larger than {limit} bytes")
        chunks.append(chunk)
    check_length(response, size, what)
    return b"".join(chunks)


def check_length(response: httpx.Response, received: int, what: str) -> None:
    """A body shorter or longer than its Content-Length is a broken transfer (retried)."""
    declared = response.headers.get("Content-Length")
    if declared is None or not declared.isdigit() or "Content-Encoding" in response.headers:
        return
    if int(declared) != received:
        raise TransientRegistryError(f"{what}: truncated answer, {received} of {declared} bytes")


async def stream_to_sink(
    response: httpx.Response,
    stats: RegistryStats,
    digest: Digest,
    sink: BlobSink,
    progress: Progress,
    what: str,
) -> int:
    """Feed the blob to ``sink``, commit it once verified (else discard it); returns its size."""

    def report(chunk: bytes, offset: int) -> None:
        progress.reached(offset + len(chunk))

    return await _stream_verified(response, stats, digest, sink, report, what)


async def slice_whole_blob(
    response: httpx.Response,
    stats: RegistryStats,
    digest: Digest,
    ranges: Sequence[ByteRange],
    sink: BlobSink | None,
    what: str,
) -> list[bytes]:
    """Keep the wanted bytes of a whole-blob answer, verifying all of it.

    With a ``sink``, the whole blob goes there too (committed only once verified): a pull-through
    proxy answers a first Range request with the whole blob, and that transfer should not be
    wasted.
    """
    pieces = [bytearray() for _ in ranges]

    def collect(chunk: bytes, offset: int) -> None:
        _collect_overlaps(chunk, offset, ranges, pieces)

    size = await _stream_verified(response, stats, digest, sink, collect, what)
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
) -> int:
    """Feed each chunk to ``sink`` and to ``on_chunk(chunk, blob offset)``; returns the size.

    Length and digest are checked at the end; only then is ``sink`` committed. On any failure
    it is discarded, so a partial or corrupt blob is never kept.
    """
    writer = DigestingWriter(digest.algorithm)
    try:
        async for chunk in response.aiter_bytes(STREAM_CHUNK_BYTES):
            if sink is not None:
                # A blocking write of <= 1 MiB to local disk costs less than a thread hop.
                sink.write(chunk)
            on_chunk(chunk, writer.size_bytes)
            writer.update(chunk)
            stats.bytes_received += len(chunk)
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
