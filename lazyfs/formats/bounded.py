"""Bounded decompression: never more output than the verified metadata allows, plus one byte.

Whoever publishes an image controls its blobs, so a frame's own claims about its size are not
trusted. Each function is given the most the output may be (a chunk's size from the TOC, a
TOC's length from its annotation) and stops there; a frame that goes further is refused without
its output ever existing in memory.

- zstd: python-zstandard's one-shot ``decompress(data, max_output_size=N)`` allocates the size
  a frame *declares* and ignores ``N`` then (8 KB of frame took 256 MiB), but it is a true bound
  for frames that declare no size. So the declared size is read from the frame header first and
  refused above the limit; below it, the one-shot call allocates at most the limit. Unlike a
  ``stream_reader``, which returns a short read at a cut, the one-shot call also reports a
  truncated frame. Only the first frame is decompressed, as each chunk and TOC is one frame.
- gzip: zlib's ``max_length`` bounds each call; output is produced piece by piece, and bytes
  before the wanted ones (eStargz's ``innerOffset``) are discarded as they come.

Every failure is one ``TocError`` (malformed or oversized metadata) or, for chunks,
``IntegrityError`` (bytes that do not match the verified TOC); callers never see zlib or
zstandard exceptions.
"""

from __future__ import annotations

import zlib
from typing import Literal

import zstandard

from lazyfs.errors import IntegrityError, TocError

_GZIP_WBITS = 16 + zlib.MAX_WBITS
_GZIP_PIECE_BYTES = 1 << 20  # output per zlib call while discarding skipped bytes

Compression = Literal["zstd", "gzip"]


class _Oversize(Exception):
    """Internal: the output would pass the limit."""


class _Corrupt(Exception):
    """Internal: the data does not decompress (the message says why)."""


# --- zstd --------------------------------------------------------------------------------------


def zstd_bounded(data: bytes, limit: int, what: str) -> bytes:
    """The first zstd frame of ``data``, decompressed: at most ``limit`` bytes.

    TocError if the frame is malformed or truncated, or would give more than ``limit`` bytes.
    """
    try:
        return _unzstd(data, limit)
    except _Oversize:
        raise TocError(f"{what}: decompresses to more than {limit} bytes") from None
    except _Corrupt as exc:
        raise TocError(f"{what}: not valid zstd: {exc}") from None


def zstd_exact(data: bytes, size: int, what: str) -> bytes:
    """The first zstd frame of ``data``, which must decompress to exactly ``size`` bytes."""
    out = zstd_bounded(data, size, what)
    if len(out) != size:
        raise TocError(f"{what}: decompresses to {len(out)} bytes, not {size}")
    return out


def _unzstd(data: bytes, limit: int) -> bytes:
    declared = _declared_size(data)
    decompressor = zstandard.ZstdDecompressor()
    if declared is not None:
        if declared > limit:
            raise _Oversize
        # A frame that declares its size gets a buffer of exactly that size, and zstd checks
        # that the content fills it: nothing more can come out.
        return _one_shot(decompressor, data, 0)
    # No declared size: the buffer is limit + 1 bytes, and zstd fails before overflowing it.
    out = _one_shot_or_oversize(decompressor, data, limit)
    if len(out) > limit:
        raise _Oversize
    return out


def _declared_size(data: bytes) -> int | None:
    """The content size the frame header declares, or None if it declares none."""
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise _Corrupt(str(exc)) from None
    return None if declared < 0 else declared  # CONTENTSIZE_UNKNOWN is -1 here


def _one_shot(decompressor: zstandard.ZstdDecompressor, data: bytes, capacity: int) -> bytes:
    try:
        return decompressor.decompress(data, max_output_size=capacity)
    except zstandard.ZstdError as exc:
        raise _Corrupt(str(exc)) from None


def _one_shot_or_oversize(
    decompressor: zstandard.ZstdDecompressor, data: bytes, limit: int
) -> bytes:
    """One-shot into a ``limit + 1`` buffer; on failure, tell "too long" from "corrupt"."""
    try:
        return decompressor.decompress(data, max_output_size=limit + 1)
    except zstandard.ZstdError as exc:
        # The one-shot error does not say whether the buffer filled or the data is bad; a
        # streaming read of at most limit + 1 bytes does (only on this failure path).
        reader = zstandard.ZstdDecompressor().stream_reader(data)
        try:
            if len(_read_up_to(reader, limit + 1)) > limit:
                raise _Oversize from None
        except zstandard.ZstdError:
            pass
        raise _Corrupt(str(exc)) from None


def _read_up_to(reader: zstandard.ZstdDecompressionReader, size: int) -> bytes:
    pieces: list[bytes] = []
    got = 0
    while got < size:
        piece = reader.read(size - got)
        if not piece:
            break
        pieces.append(piece)
        got += len(piece)
    return b"".join(pieces)


# --- gzip --------------------------------------------------------------------------------------


def gunzip_bounded(data: bytes, limit: int, what: str) -> bytes:
    """One whole gzip member: at most ``limit`` bytes; nothing may follow it.

    TocError if it is malformed, truncated, followed by other bytes, or longer than ``limit``.
    """
    inflater = zlib.decompressobj(_GZIP_WBITS)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise TocError(f"{what}: not valid gzip: {exc}") from None
    if len(out) > limit:
        raise TocError(f"{what}: decompresses to more than {limit} bytes")
    if not inflater.eof:
        raise TocError(f"{what}: truncated gzip member")
    if inflater.unused_data:
        raise TocError(f"{what}: bytes follow the gzip member")
    return out


def gunzip_slice(data: bytes, skip: int, size: int) -> bytes:
    """Bytes ``[skip, skip + size)`` of the concatenated gzip members in ``data``; fewer if
    they end first. Skipped bytes are discarded as they come; what follows the slice is not
    decompressed (in eStargz it is the next file's, sharing the member).

    Raises zlib.error on corrupt data: use :func:`chunk_bytes` for the checked form.
    """
    skipper = _Skipper(skip, size)
    rest = data
    while rest and not skipper.full:
        member = zlib.decompressobj(_GZIP_WBITS)
        rest = _inflate_member(member, rest, skipper)
        if not member.eof:  # enough bytes, or a truncated member
            break
    return skipper.result()


class _Skipper:
    """Collects output bytes past the first ``skip``, up to ``keep`` of them."""

    def __init__(self, skip: int, keep: int) -> None:
        self._skip = skip
        self._keep = keep
        self._kept = bytearray()

    @property
    def full(self) -> bool:
        return len(self._kept) >= self._keep

    def wanted(self) -> int:
        """How many more output bytes are of any use (skipped ones included)."""
        return self._skip + self._keep - len(self._kept)

    def take(self, piece: bytes) -> None:
        if self._skip:
            dropped = min(self._skip, len(piece))
            self._skip -= dropped
            piece = piece[dropped:]
        self._kept += piece[: self._keep - len(self._kept)]

    def result(self) -> bytes:
        return bytes(self._kept)


def _inflate_member(member: zlib._Decompress, data: bytes, skipper: _Skipper) -> bytes:
    """Feed one member into ``skipper``; return the bytes after the member."""
    pending = data
    while not skipper.full:
        piece = member.decompress(pending, min(skipper.wanted(), _GZIP_PIECE_BYTES))
        skipper.take(piece)
        pending = member.unconsumed_tail
        if member.eof or not (piece or pending):
            break
    return member.unused_data


# --- chunks ------------------------------------------------------------------------------------


def chunk_bytes(
    frame: bytes, compression: Compression, size: int, inner_offset: int, what: str
) -> bytes:
    """A chunk's ``size`` uncompressed bytes from its compressed ``frame``, exactly.

    ``inner_offset`` (eStargz) is where the chunk starts in the decompressed gzip members.
    IntegrityError, naming ``what``, if the frame does not decompress or gives another size.
    """
    expected = f"{size} bytes"
    try:
        if compression == "zstd":
            data = _unzstd(frame, size)
        else:
            data = gunzip_slice(frame, inner_offset, size)
    except _Oversize:
        raise IntegrityError(what, expected, f"more than {size} bytes") from None
    except (_Corrupt, zlib.error) as exc:
        raise IntegrityError(what, expected, f"undecodable data ({exc})") from None
    if len(data) != size:
        raise IntegrityError(what, expected, f"{len(data)} bytes")
    return data
