"""Byte ranges for HTTP range requests: coalescing, ``Range`` headers and 206 response parsing.

Ranges are half-open (``end`` exclusive) everywhere in lazyfs; only the HTTP text forms use the
inclusive last-byte positions RFC 9110 prescribes.

A pure leaf: no I/O.
"""

from __future__ import annotations

import email.message
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lazyfs.errors import RegistryProtocolError

_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE | re.ASCII)
_MULTIPART_BYTERANGES = "multipart/byteranges"
# Looser than RFC 2046's boundary alphabet on purpose; only line breaks and controls would
# make the boundary unmatchable.
_BOUNDARY_RE = re.compile(r"[\x20-\x7e]+")


@dataclass(frozen=True, order=True)
class ByteRange:
    """The half-open byte interval ``[start, end)``; never empty."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.start >= self.end:
            raise ValueError(f"invalid byte range [{self.start}, {self.end})")

    @property
    def length(self) -> int:
        return self.end - self.start


def merge_ranges(ranges: Iterable[ByteRange], max_gap_bytes: int = 0) -> list[ByteRange]:
    """Sort ``ranges`` and coalesce those that overlap, touch, or sit within ``max_gap_bytes``.

    A gap is worth bridging when one request (and some wasted bytes) costs less than two.
    """
    if max_gap_bytes < 0:
        raise ValueError(f"max_gap_bytes must be >= 0, got {max_gap_bytes}")
    merged: list[ByteRange] = []
    for current in sorted(ranges):
        if merged and current.start <= merged[-1].end + max_gap_bytes:
            previous = merged[-1]
            if current.end > previous.end:
                merged[-1] = ByteRange(previous.start, current.end)
        else:
            merged.append(current)
    return merged


def range_header(ranges: Sequence[ByteRange]) -> str:
    """The ``Range`` header value for ``ranges``, e.g. ``bytes=0-99,200-299``."""
    if not ranges:
        raise ValueError("a Range header needs at least one range")
    return "bytes=" + ",".join(f"{r.start}-{r.end - 1}" for r in ranges)


def parse_content_range(value: str) -> tuple[ByteRange, int | None]:
    """Parse ``bytes first-last/total`` (total may be ``*``) into a range and the total size."""
    match = _CONTENT_RANGE_RE.fullmatch(value.strip())
    if match is None:
        raise RegistryProtocolError(f"malformed Content-Range {value!r}")
    first, last = int(match[1]), int(match[2])
    total = None if match[3] == "*" else int(match[3])
    if last < first:
        raise RegistryProtocolError(f"Content-Range {value!r} ends before it starts")
    if total is not None and last >= total:
        raise RegistryProtocolError(f"Content-Range {value!r} extends past the total length")
    return ByteRange(first, last + 1), total


def parse_multipart_byteranges(body: bytes, content_type: str) -> list[tuple[ByteRange, bytes]]:
    """Split a ``multipart/byteranges`` 206 body into (range, bytes) pairs, in body order.

    Each part's length comes from its Content-Range rather than from searching for the next
    boundary, so binary data is taken exactly and a short part is caught as truncation.
    """
    delimiter = b"--" + _multipart_boundary(content_type)
    pos = _first_delimiter(body, delimiter)
    newline = _line_ending_after(body, pos + len(delimiter))
    parts: list[tuple[ByteRange, bytes]] = []
    while True:
        pos += len(delimiter)
        if body.startswith(b"--", pos):
            break
        pos = _skip_delimiter_line_end(body, pos, newline)
        headers, pos = _read_part_headers(body, pos)
        byte_range = _part_range(headers)
        data = body[pos : pos + byte_range.length]
        if len(data) != byte_range.length:
            raise RegistryProtocolError(
                f"multipart/byteranges part for {byte_range.start}-{byte_range.end - 1} "
                f"is truncated: {len(data)} of {byte_range.length} bytes"
            )
        parts.append((byte_range, data))
        pos = _expect_next_delimiter(body, pos + byte_range.length, delimiter, newline)
    if not parts:
        raise RegistryProtocolError("multipart/byteranges body has no parts")
    return parts


def slice_ranges(data: bytes, base_offset: int, ranges: Sequence[ByteRange]) -> list[bytes]:
    """Cut each of ``ranges`` out of ``data``, whose first byte sits at ``base_offset``."""
    data_end = base_offset + len(data)
    slices: list[bytes] = []
    for r in ranges:
        if r.start < base_offset or r.end > data_end:
            raise RegistryProtocolError(
                f"received bytes {base_offset}-{data_end - 1} do not cover "
                f"requested bytes {r.start}-{r.end - 1}"
            )
        slices.append(data[r.start - base_offset : r.end - base_offset])
    return slices


def _content_type(value: str) -> email.message.Message:
    # email.message handles parameter quoting and RFC 2231 for us.
    message = email.message.Message()
    message["Content-Type"] = value
    return message


def _multipart_boundary(content_type: str) -> bytes:
    message = _content_type(content_type)
    if message.get_content_type() != _MULTIPART_BYTERANGES:
        raise RegistryProtocolError(f"expected {_MULTIPART_BYTERANGES}, got {content_type!r}")
    boundary = message.get_boundary()
    if not boundary:
        raise RegistryProtocolError(f"no boundary in Content-Type {content_type!r}")
    if not _BOUNDARY_RE.fullmatch(boundary):
        raise RegistryProtocolError(f"invalid multipart boundary {boundary!r}")
    return boundary.encode("ascii")


def _first_delimiter(body: bytes, delimiter: bytes) -> int:
    """Offset of the first delimiter, which must start the body or a line (after a preamble)."""
    index = _find_delimiter(body, delimiter)
    if index < 0:
        raise RegistryProtocolError("multipart/byteranges body has no boundary delimiter")
    return index


def _find_delimiter(body: bytes, delimiter: bytes) -> int:
    """Offset of the first delimiter that starts ``body`` or a line of it; -1 if none."""
    if body.startswith(delimiter):
        return 0
    index = body.find(b"\n" + delimiter)
    return index + 1 if index >= 0 else -1


def _line_ending_after(body: bytes, pos: int) -> bytes:
    """The line ending the body uses, judged by the first delimiter line.

    Bare LF is tolerated for sloppy servers, but one style is then required throughout:
    mixing them would let a part one byte short pass (``data\\r`` + ``\\n--boundary``).
    """
    line_end = body.find(b"\n", pos)
    return b"\r\n" if line_end > pos and body[line_end - 1 : line_end] == b"\r" else b"\n"


def _skip_delimiter_line_end(body: bytes, pos: int, newline: bytes) -> int:
    # RFC 2046 allows linear whitespace ("transport padding") after a delimiter.
    while body[pos : pos + 1] in (b" ", b"\t"):
        pos += 1
    return _skip_line_end(body, pos, newline, "after a boundary delimiter")


def _skip_line_end(body: bytes, pos: int, newline: bytes, where: str) -> int:
    if not body.startswith(newline, pos):
        raise RegistryProtocolError(f"multipart/byteranges: expected a line break {where}")
    return pos + len(newline)


def _read_part_headers(body: bytes, pos: int) -> tuple[dict[str, str], int]:
    """Read header lines up to the blank line; return lower-cased names and the body offset."""
    headers: dict[str, str] = {}
    while True:
        line_end = body.find(b"\n", pos)
        if line_end < 0:
            raise RegistryProtocolError("multipart/byteranges: part headers are not terminated")
        line = body[pos:line_end].removesuffix(b"\r")
        pos = line_end + 1
        if not line:
            return headers, pos
        name, colon, value = line.decode("latin-1").partition(":")
        if not colon or not name.strip():
            raise RegistryProtocolError(f"multipart/byteranges: malformed header line {line!r}")
        headers[name.strip().lower()] = value.strip()


def _part_range(headers: dict[str, str]) -> ByteRange:
    value = headers.get("content-range")
    if value is None:
        raise RegistryProtocolError("multipart/byteranges part has no Content-Range")
    return parse_content_range(value)[0]


def _expect_next_delimiter(body: bytes, pos: int, delimiter: bytes, newline: bytes) -> int:
    pos = _skip_line_end(body, pos, newline, "after part data")
    if not body.startswith(delimiter, pos):
        raise RegistryProtocolError("multipart/byteranges: part data is not followed by a boundary")
    return pos


_PART_HEADERS_MAX_BYTES = 16 << 10  # a delimiter line and a part's headers, at most


class PartialBody:
    """Follows a 206 body as it streams in and says which blob bytes each piece carries, so
    that work on them can start before the answer is whole (the resolver's early frames).

    Best effort by design: the whole body is still parsed strictly at its end
    (``parse_multipart_byteranges``), and whatever is done early with these bytes is checked
    by the chunks' digests first. A body this cannot follow (a missing or malformed header,
    headers past ``_PART_HEADERS_MAX_BYTES``) just stops it: ``feed`` returns nothing more.
    """

    def __init__(self, content_type: str, content_range: str | None) -> None:
        self._stopped = False
        self._offset = 0  # blob offset of the next part byte
        self._remaining = 0  # part bytes still to come; 0 while between parts
        self._pending = bytearray()  # a delimiter line and headers, not yet complete
        self._delimiter = b""
        try:
            if _content_type(content_type).get_content_type() == _MULTIPART_BYTERANGES:
                self._delimiter = b"--" + _multipart_boundary(content_type)
            elif content_range is not None:
                part = parse_content_range(content_range)[0]
                self._offset, self._remaining = part.start, part.length
            else:
                self._stopped = True
        except RegistryProtocolError:
            self._stopped = True

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """The (blob offset, bytes) pieces of part data in ``data``, the next bytes of the body."""
        found: list[tuple[int, bytes]] = []
        view, pos = data, 0
        while pos < len(view) and not self._stopped:
            if self._remaining:
                take = min(self._remaining, len(view) - pos)
                found.append((self._offset, bytes(view[pos : pos + take])))
                self._offset += take
                self._remaining -= take
                pos += take
                continue
            if not self._delimiter:  # a single part, and it is over
                self._stopped = True
                break
            self._pending += view[pos:]
            view, pos = self._next_part(), 0
        return found

    def _next_part(self) -> bytes:
        """Parse the next part's headers out of what is pending, as the strict parser does
        (``_read_part_headers``, ``_part_range``); the bytes after them (empty while they are
        not all in)."""
        pending = bytes(self._pending)
        at = _find_delimiter(pending, self._delimiter)
        line_end = pending.find(b"\n", at + len(self._delimiter)) if at >= 0 else -1
        if line_end < 0 or not _headers_complete(pending, line_end):
            if len(pending) > _PART_HEADERS_MAX_BYTES:
                self._stopped = True
            return b""
        self._pending.clear()
        try:
            headers, body_start = _read_part_headers(pending, line_end + 1)
            part = _part_range(headers)
        except RegistryProtocolError:
            self._stopped = True  # the closing delimiter, or a part this cannot follow
            return b""
        self._offset, self._remaining = part.start, part.length
        return pending[body_start:]


def _headers_complete(data: bytes, line_end: int) -> bool:
    """Whether a blank line follows the line ending at ``line_end`` somewhere in ``data``."""
    return data.find(b"\n\r\n", line_end) >= 0 or data.find(b"\n\n", line_end) >= 0
