"""The tar-split stream that zstd:chunked layers carry, so the exact tar can be rebuilt.

Format facts (vbatts/tar-split ``tar/storage/entry.go``, ``packer.go``, ``getter.go``,
``tar/asm/disassemble.go``, ``assemble.go``, ``tar/common/utf8.go``; containers/storage
``pkg/chunked/compressor/compressor.go``, which feeds the layer's tar through
``asm.NewInputTarStream`` into ``storage.NewJSONPacker``):

* One JSON object per entry, each written by Go's ``json.Encoder`` and so ended by ``\\n``.
  Fields in this order: ``type`` (1 = file, 2 = segment), ``name`` (omitempty),
  ``name_raw`` (omitempty, base64), ``size`` (omitempty), ``payload`` (base64, ``null``
  when Go's slice is nil), ``position`` (0, 1, 2, ... over all entries of both types).
* A *segment* holds raw tar bytes that are not file payload. The disassembler records one
  per ``tar.Reader.RawBytes()`` and skips empty ones, so each segment is: the previous
  file's padding, any PAX/GNU extension headers with their data, and the member's header
  block. At the end come the last padding plus the two zero blocks, then whatever follows
  (tar's record padding) in reads of at most 1 MiB. Segments are never merged.
* A *file* entry follows every header, whatever its type (dirs, links, ...). ``size`` is
  the header size; ``payload`` is the 8-byte big-endian Go ``crc64.ISO`` of the data
  (``hash.Sum(nil)``), or ``null`` when size is 0 (the checksum is only taken if size > 0).
* The name is Go's ``hdr.Name`` (PAX/GNU long names applied, dirs keep their trailing
  ``/``). It goes to ``name_raw`` when it is not valid UTF-8 or contains U+FFFD (the
  disassembler's check), else to ``name``.
* Go's packer and unpacker reject two file entries whose ``filepath.Clean``ed names match
  (``ErrDuplicatePath``); the assembler re-reads files with size > 0 and checks the CRC.
* Strings use Go's escaping: ``<``, ``>``, ``&``, U+2028 and U+2029 as ``\\u....``;
  ``\\b``/``\\f``/``\\n``/``\\r``/``\\t`` short forms (``\\b`` and ``\\f`` since Go 1.22); other
  control bytes as lowercase ``\\u00xx``; everything else literal UTF-8.
"""

from __future__ import annotations

import base64
import binascii
import json
import posixpath
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import fastcrc.crc64

from lazyfs.config import LimitsConfig
from lazyfs.errors import IntegrityError, TocError
from lazyfs.formats.bounded import zstd_exact

FILE_TYPE = 1
SEGMENT_TYPE = 2
CRC64_SIZE_BYTES = 8
# The disassembler reads what follows the end-of-archive blocks in chunks of this size.
TRAILER_CHUNK_BYTES = 1024 * 1024
END_OF_ARCHIVE_BYTES = 1024

EntryKind = Literal["file", "segment"]

_MAX_INT64 = 2**63 - 1
_KIND_BY_TYPE: dict[int, EntryKind] = {FILE_TYPE: "file", SEGMENT_TYPE: "segment"}
_TYPE_BY_KIND = {kind: type_ for type_, kind in _KIND_BY_TYPE.items()}
# Characters Go's encoder escapes (HTML safety, JS line terminators) but Python's does not.
_GO_EXTRA_ESCAPES = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)
_GO_EXTRA_ESCAPED = re.compile("[<>&\u2028\u2029]")
# One encoder for every string: json.dumps(..., ensure_ascii=False) builds a new one per call.
_encode_json_text = json.JSONEncoder(ensure_ascii=False).encode


class Crc64:
    """Streaming Go ``crc64.ISO`` checksum, the integrity check tar-split stores per file.

    fastcrc's ``go_iso`` (compiled; about 17 GB/s here, against 0.44 GB/s for
    crcmod's C extension) releases the GIL; ``initial`` carries the running value.
    """

    def __init__(self) -> None:
        self._crc = 0

    def update(self, data: bytes | memoryview) -> None:
        self._crc = fastcrc.crc64.go_iso(data, self._crc)

    def digest(self) -> bytes:
        """The 8 big-endian bytes Go's ``hash.Sum(nil)`` returns."""
        return self._crc.to_bytes(CRC64_SIZE_BYTES, "big")


def crc64_digest(data: bytes | memoryview) -> bytes:
    """One-shot :class:`Crc64`."""
    crc = Crc64()
    crc.update(data)
    return crc.digest()


@dataclass(frozen=True)
class TarSplitEntry:
    """One tar-split record. ``payload`` is the raw bytes of a segment or a file's CRC64."""

    kind: EntryKind
    name: bytes
    size: int
    payload: bytes
    position: int


# --- encoding -------------------------------------------------------------------------


def encode_entry(entry: TarSplitEntry) -> bytes:
    """The JSON line Go's ``json.Encoder`` writes for ``entry``; an empty payload is ``null``."""
    return _encode_line(
        _TYPE_BY_KIND[entry.kind], entry.name, entry.size, entry.payload, entry.position
    )


def _encode_line(type_: int, name: bytes, size: int, payload: bytes, position: int) -> bytes:
    # Bytes formatting, not an f-string and .encode(): a layer has two lines per member.
    return b"".join(
        (
            b'{"type":%d' % type_,
            _name_fields(name).encode("utf-8") if name else b"",
            b',"size":%d' % size if size else b"",
            b',"payload":"%s"' % base64.b64encode(payload) if payload else b',"payload":null',
            b',"position":%d}\n' % position,
        )
    )


def _name_fields(name: bytes) -> str:
    if not name:
        return ""
    text = _utf8_name(name)
    if text is None:
        return f',"name_raw":"{base64.b64encode(name).decode("ascii")}"'
    return f',"name":{go_json_string(text)}'


def _utf8_name(name: bytes) -> str | None:
    """``name`` as text when tar-split would store it in ``name``, else None."""
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        return None
    # tar-split treats a literal U+FFFD like an invalid byte (tar/common/utf8.go).
    return None if "\ufffd" in text else text


def go_json_string(text: str) -> str:
    """``text`` as a JSON string literal, escaped exactly as Go's ``encoding/json`` does."""
    quoted = _encode_json_text(text)
    return quoted.translate(_GO_EXTRA_ESCAPES) if _GO_EXTRA_ESCAPED.search(quoted) else quoted


def _base64_or_null(data: bytes) -> str:
    return f'"{base64.b64encode(data).decode("ascii")}"' if data else "null"


class TarSplitWriter:
    """Builds the uncompressed tar-split stream, entry by entry, as Go's JSON packer would.

    Each ``add_segment`` call is one segment entry (tar-split never merges them); empty
    segments are dropped because the disassembler never records them.
    """

    def __init__(self) -> None:
        self._lines: list[bytes] = []

    @property
    def entry_count(self) -> int:
        return len(self._lines)

    def add_segment(self, raw: bytes | memoryview) -> None:
        """Record raw tar bytes that are not file payload (headers, padding, trailer)."""
        if len(raw):
            self._append("segment", b"", 0, bytes(raw))

    def add_file(self, name: bytes, size: int, crc64: bytes) -> None:
        """Record a member; ``name`` is the raw header name, ``crc64`` its payload's CRC."""
        # A tar may repeat a path (the later member wins). Go's unpacker refuses such a stream,
        # but the layer itself is valid, so the writer records it as it is.
        _check_file_fields(size, crc64)
        self._append("file", name, size, bytes(crc64) if size else b"")

    def getvalue(self) -> bytes:
        """The uncompressed JSON-lines stream."""
        return b"".join(self._lines)

    def _append(self, kind: EntryKind, name: bytes, size: int, payload: bytes) -> None:
        line = _encode_line(_TYPE_BY_KIND[kind], name, size, payload, len(self._lines))
        self._lines.append(line)


def _check_file_fields(size: int, crc64: bytes) -> None:
    if not 0 <= size <= _MAX_INT64:
        raise TocError(f"tar-split file size {size} out of range")
    if len(crc64) != CRC64_SIZE_BYTES and (size or crc64):
        raise TocError(f"tar-split crc64 must be {CRC64_SIZE_BYTES} bytes, got {len(crc64)}")


class _SeenNames:
    """Go's duplicate-path check: file names equal after ``filepath.Clean`` are rejected."""

    def __init__(self) -> None:
        self._names: set[bytes] = set()

    def add(self, name: bytes) -> None:
        cleaned = _go_clean(name)
        if cleaned in self._names:
            raise TocError(f"tar-split: duplicate path {name!r}")
        self._names.add(cleaned)


def _go_clean(name: bytes) -> bytes:
    """Go's ``filepath.Clean`` on POSIX; unlike ``normpath`` it folds a leading ``//``."""
    cleaned = posixpath.normpath(name)
    return cleaned[1:] if cleaned.startswith(b"//") else cleaned


def trailer_segments(rest: bytes, padding_bytes: int) -> list[bytes]:
    """Split what follows the last member's payload the way the disassembler does.

    ``rest`` starts with that payload's ``padding_bytes`` of block padding. The first
    segment ends after the two end-of-archive blocks; the remainder follows in pieces of
    at most 1 MiB (Go reads it in such chunks; the real sizes depend on its reader).
    """
    first = min(len(rest), padding_bytes + END_OF_ARCHIVE_BYTES)
    tail = rest[first:]
    pieces = [tail[i : i + TRAILER_CHUNK_BYTES] for i in range(0, len(tail), TRAILER_CHUNK_BYTES)]
    return [piece for piece in [rest[:first], *pieces] if piece]


# --- decoding -------------------------------------------------------------------------


# Reading is a trust boundary like the TOC's (docs/reliability.md): the whole stream within
# LimitsConfig. Names are kept as Go's reader keeps them; lazyfs never uses them as paths.
_ENTRIES_PER_TOC_ENTRY = 4  # a member's file entry, its header segment, padding, PAX data
_DEFAULT_LIMITS = LimitsConfig()


def decode_entry(line: bytes) -> TarSplitEntry:
    """Parse one JSON line; TocError if it is not a well-formed tar-split entry."""
    obj = _load_object(line)
    kind = _kind(obj.get("type"))
    size = _int_field(obj, "size")
    payload = _base64_field(obj, "payload")
    if kind == "file":
        _check_file_fields(size, payload)
    return TarSplitEntry(kind, _decoded_name(obj), size, payload, _int_field(obj, "position"))


def _load_object(line: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(
            line, object_pairs_hook=_refuse_duplicate_keys, parse_constant=_refuse_constant
        )
    except (ValueError, RecursionError) as exc:
        raise TocError(f"tar-split: invalid JSON line: {exc}") from exc
    if not isinstance(obj, dict):
        raise TocError("tar-split: entry is not a JSON object")
    return obj


def _refuse_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):  # parsers disagree on which one wins
        raise ValueError("duplicate key in an object")
    return result


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _kind(value: object) -> EntryKind:
    if type(value) is not int or value not in _KIND_BY_TYPE:
        raise TocError(f"tar-split: unknown entry type {value!r}")
    return _KIND_BY_TYPE[value]


def _int_field(obj: dict[str, Any], key: str) -> int:
    """A non-negative int64 field; absent means 0, as for Go's omitempty."""
    value = obj.get(key, 0)
    if type(value) is not int or not 0 <= value <= _MAX_INT64:
        raise TocError(f"tar-split: invalid {key} {value!r}")
    return value


def _base64_field(obj: dict[str, Any], key: str) -> bytes:
    """A Go ``[]byte`` field: standard base64 with padding; null or absent is empty."""
    value = obj.get(key)
    if value is None:
        return b""
    if not isinstance(value, str):
        raise TocError(f"tar-split: {key} is not a base64 string")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error) as exc:
        raise TocError(f"tar-split: {key} is not valid base64") from exc


def _decoded_name(obj: dict[str, Any]) -> bytes:
    """Go's ``GetNameBytes``: ``name_raw`` when present and non-empty, else ``name``."""
    raw = _base64_field(obj, "name_raw")
    if raw:
        return raw
    name = obj.get("name", "")
    if not isinstance(name, str):
        raise TocError("tar-split: name is not a string")
    try:
        return name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TocError("tar-split: name holds a lone surrogate") from exc


def parse_tar_split(data: bytes, limits: LimitsConfig = _DEFAULT_LIMITS) -> list[TarSplitEntry]:
    """Parse a whole uncompressed tar-split stream (one JSON object per line).

    Blank lines are skipped and a last line without ``\\n`` is accepted, like Go's reader.
    Duplicate file paths are rejected, as Go's unpacker does. The stream may hold at most
    ``limits.max_tar_split_bytes``, and four entries per TOC entry the limits allow.
    """
    if len(data) > limits.max_tar_split_bytes:
        raise TocError(
            f"tar-split is {len(data)} bytes, more than the limit of {limits.max_tar_split_bytes}"
        )
    max_entries = _ENTRIES_PER_TOC_ENTRY * limits.max_toc_entries
    if data.count(b"\n") > max_entries:
        raise TocError(f"tar-split has more than {max_entries} lines")
    seen = _SeenNames()
    entries = [decode_entry(line) for line in data.split(b"\n") if line.strip()]
    for entry in entries:
        if entry.kind == "file":
            seen.add(entry.name)
    return entries


def read_tar_split(
    compressed: bytes,
    uncompressed_length: int,
    *,
    layer: str = "",
    limits: LimitsConfig = _DEFAULT_LIMITS,
) -> list[TarSplitEntry]:
    """Decompress (bounded by the tarsplit-position annotation) and parse a layer's tar-split."""
    where = f"layer {layer}: tar-split" if layer else "tar-split"
    if uncompressed_length > limits.max_tar_split_bytes:
        raise TocError(
            f"{where} is {uncompressed_length} bytes, more than the limit of "
            f"{limits.max_tar_split_bytes}"
        )
    return parse_tar_split(zstd_exact(compressed, uncompressed_length, where), limits)


# --- reassembly -----------------------------------------------------------------------


def reassemble_tar(
    entries: Iterable[TarSplitEntry], read_file: Callable[[bytes, int], bytes]
) -> Iterator[bytes]:
    """Rebuild the original tar stream; ``read_file(name, size)`` returns a file's payload.

    Like tar-split's assembler, files of size 0 are not read, and every payload read is
    checked against the stored CRC64 (and, here, its size).
    """
    for entry in entries:
        if entry.kind == "segment":
            if entry.payload:
                yield entry.payload
        elif entry.size:
            yield _checked_payload(entry, read_file(entry.name, entry.size))


def _checked_payload(entry: TarSplitEntry, data: bytes) -> bytes:
    what = f"tar-split file {entry.name!r}"
    if len(data) != entry.size:
        raise IntegrityError(what, f"{entry.size} bytes", f"{len(data)} bytes")
    actual = crc64_digest(data)
    if actual != entry.payload:
        raise IntegrityError(what, f"crc64:{entry.payload.hex()}", f"crc64:{actual.hex()}")
    return data
