"""The zstd:chunked table of contents (TOC), footer and annotations. A pure leaf.

Format facts (containers/storage ``pkg/chunked/internal/minimal``; see docs/format.md):

- The TOC is ``{"version":1,"entries":[...],"tarSplitDigest":"sha256:..."}``, zstd-compressed in
  a skippable frame. ``tarSplitDigest`` is the sha256 of the *compressed* tar-split.
- A regular file is one ``reg`` entry, followed by ``chunk`` entries when it has more than one
  chunk; then the ``chunk*`` fields are set on all of them, including the ``reg`` one. A chunk
  entry carries ``offset`` but no ``endOffset``: a chunk ends where the next one starts, the last
  one at the ``reg`` entry's ``endOffset``.
- Upstream readers ignore unknown fields. lazyfs adds ``lazyfsVerity`` (the whole file's
  fs-verity digest) on ``reg`` entries and ``lazyfsChunkVerity`` (the chunk's) on every entry
  that stands for a chunk, so every chunk is tied to an fs-verity digest; and, for images
  converted with an access profile, ``lazyfsPrefetch`` (the chunk's rank in the order a mount
  prefetches in) on the entries of the chunks the profiled workload read.

Serialization follows Go's ``encoding/json`` (field order of the Go struct, ``omitempty``, sorted
map keys, HTML-escaping of ``<>&``), so the bytes are reproducible and look like upstream's.
"""

from __future__ import annotations

import base64
import json
import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from lazyfs.errors import TocError

# Layer annotations (current containers/storage names).
TOC_CHECKSUM_ANNOTATION = "io.github.containers.zstd-chunked.manifest-checksum"
TOC_POSITION_ANNOTATION = "io.github.containers.zstd-chunked.manifest-position"
TARSPLIT_POSITION_ANNOTATION = "io.github.containers.zstd-chunked.tarsplit-position"
# Older names, written by stargz-snapshotter's zstd:chunked writer.
LEGACY_TOC_CHECKSUM_ANNOTATION = "io.containers.zstd-chunked.manifest-checksum"
LEGACY_TOC_POSITION_ANNOTATION = "io.containers.zstd-chunked.manifest-position"
# Marks layers whose TOC carries lazyfs fs-verity digests for every chunk and file.
VERITY_ANNOTATION = "io.github.lazyfs.model.verity"
VERITY_ANNOTATION_VALUE = "fsverity-sha256-4096"

SKIPPABLE_FRAME_MAGIC = b"\x50\x2a\x4d\x18"
SKIPPABLE_HEADER_BYTES = 8
FOOTER_MAGIC = b"GNUlInUx"
LEGACY_FOOTER_MAGIC = b"GnUlInUx"
FOOTER_BYTES = 64
LEGACY_FOOTER_BYTES = 40
MANIFEST_TYPE_CRFS = 1

_SURROGATE = re.compile("[\ud800-\udfff]")
ENTRY_TYPES = frozenset({"dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk"})


@dataclass(frozen=True)
class TocEntry:
    """One TOC entry. Field order is the Go struct's, which fixes the JSON key order."""

    type: str
    name: str
    link_name: str = ""
    mode: int = 0
    size: int = 0
    uid: int = 0
    gid: int = 0
    modtime: str = ""  # RFC 3339 with nanoseconds, UTC; "" when unknown
    accesstime: str = ""
    changetime: str = ""
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: Mapping[str, bytes] = field(default_factory=dict)
    digest: str = ""  # sha256 of the whole file; "" for empty files
    offset: int = 0  # compressed byte range of this file's (or chunk's) frames in the blob
    end_offset: int = 0
    chunk_size: int = 0
    chunk_offset: int = 0
    chunk_digest: str = ""
    chunk_type: str = ""  # "" for data, "zeros" for a run of zeros
    inner_offset: int = 0  # eStargz: where the chunk starts in its decompressed gzip member(s)
    verity: str = ""  # lazyfs: fs-verity digest of the whole file
    chunk_verity: str = ""  # lazyfs: fs-verity digest of this chunk's uncompressed bytes
    prefetch: int = (
        0  # lazyfs: 1-based rank in the prefetch order (lazyfs/mount/prefetch.py); 0: none
    )


# (attribute, JSON key, kind) in Go struct order.
_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("type", "type", "str!"),
    ("name", "name", "str!"),
    ("link_name", "linkName", "str"),
    ("mode", "mode", "int"),
    ("size", "size", "int"),
    ("uid", "uid", "int"),
    ("gid", "gid", "int"),
    ("modtime", "modtime", "str"),
    ("accesstime", "accesstime", "str"),
    ("changetime", "changetime", "str"),
    ("dev_major", "devMajor", "int"),
    ("dev_minor", "devMinor", "int"),
    ("xattrs", "xattrs", "xattrs"),
    ("digest", "digest", "str"),
    ("offset", "offset", "int"),
    ("end_offset", "endOffset", "int"),
    ("chunk_size", "chunkSize", "int"),
    ("chunk_offset", "chunkOffset", "int"),
    ("chunk_digest", "chunkDigest", "str"),
    ("chunk_type", "chunkType", "str"),
    ("inner_offset", "innerOffset", "int"),
    ("verity", "lazyfsVerity", "str"),
    ("chunk_verity", "lazyfsChunkVerity", "str"),
    ("prefetch", "lazyfsPrefetch", "int"),
)


@dataclass(frozen=True)
class Toc:
    """A parsed TOC."""

    entries: tuple[TocEntry, ...]
    tar_split_digest: str = ""
    version: int = 1

    def to_json(self) -> bytes:
        return b"".join(self._json_pieces())

    def _json_pieces(self) -> Iterator[bytes]:
        yield b'{"version":%d,"entries":[' % self.version
        for index, entry in enumerate(self.entries):
            if index:
                yield b","
            yield _go_json(_entry_to_obj(entry))
        yield b"]"
        if self.tar_split_digest:
            yield b',"tarSplitDigest":' + _go_json(self.tar_split_digest)
        yield b"}"

    @classmethod
    def parse(cls, data: bytes) -> Toc:
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise TocError(f"TOC is not valid JSON: {exc}") from exc
        if not isinstance(obj, dict) or not isinstance(obj.get("entries"), list):
            raise TocError("TOC has no entries list")
        version = obj.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version != 1:
            raise TocError(f"unsupported TOC version {obj.get('version')!r}")
        entries = tuple(_entry_from_obj(raw) for raw in obj["entries"])
        return cls(entries, _expect(obj, "tarSplitDigest", str, ""), 1)


def _entry_to_obj(entry: TocEntry) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for attr, key, kind in _FIELDS:
        value = getattr(entry, attr)
        if kind == "xattrs":
            if value:
                obj[key] = {k: base64.b64encode(v).decode() for k, v in sorted(value.items())}
        elif value or kind == "str!":
            obj[key] = value
    return obj


_FIELD_BY_KEY = {key: (attr, kind) for attr, key, kind in _FIELDS}
_JSON_TYPE = {"int": int, "str": str, "str!": str}


def _entry_from_obj(raw: object) -> TocEntry:
    """One entry; only the keys present are looked at (mounts parse tens of thousands)."""
    if not isinstance(raw, dict):
        raise TocError("TOC entry is not an object")
    values: dict[str, Any] = {"type": "", "name": ""}
    for key, value in raw.items():
        field_kind = _FIELD_BY_KEY.get(key)
        if field_kind is None or value is None:
            continue  # unknown fields are ignored, as Go's encoding/json does
        attr, kind = field_kind
        if kind == "xattrs":
            values[attr] = _decode_xattrs(value)
        elif type(value) is _JSON_TYPE[kind]:  # exact: a JSON true is no int
            values[attr] = value
        else:
            raise TocError(f"TOC field {key!r} has the wrong type")
    entry = TocEntry(**values)
    if entry.type not in ENTRY_TYPES:
        raise TocError(f"TOC entry {entry.name!r} has unknown type {entry.type!r}")
    return entry


def _expect(obj: Mapping[str, object], key: str, kind: type, default: Any) -> Any:
    value = obj.get(key, default)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TocError(f"TOC field {key!r} has the wrong type")
    return value


def _decode_xattrs(raw: object) -> dict[str, bytes]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise TocError("TOC xattrs is not an object")
    if not all(isinstance(v, str) for v in raw.values()):
        raise TocError("TOC xattr values must be base64 strings")
    try:
        return {str(k): base64.b64decode(v, validate=True) for k, v in raw.items()}
    except ValueError as exc:
        raise TocError(f"TOC xattr value is not base64: {exc}") from exc


def _go_json(value: object) -> bytes:
    """Encode like Go's encoding/json: compact, sorted map keys, UTF-8, HTML-safe."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=False)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escaped)
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    # Go writes invalid UTF-8 (here: surrogates) as U+FFFD.
    return _SURROGATE.sub("\ufffd", text).encode("utf-8")


@dataclass(frozen=True)
class BlobSection:
    """Where a compressed section (TOC or tar-split) sits in the layer blob."""

    offset: int
    length: int
    uncompressed_length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def parse_toc_position(value: str) -> BlobSection:
    """Parse ``offset:length:uncompressedLength:1`` from the manifest-position annotation."""
    parts = value.split(":")
    try:
        numbers = [int(p) for p in parts]
    except ValueError as exc:
        raise TocError(f"malformed TOC position annotation {value!r}") from exc
    if len(numbers) != 4 or numbers[3] != MANIFEST_TYPE_CRFS or min(numbers) < 0:
        raise TocError(f"malformed TOC position annotation {value!r}")
    return BlobSection(numbers[0], numbers[1], numbers[2])


def format_toc_position(section: BlobSection) -> str:
    return f"{section.offset}:{section.length}:{section.uncompressed_length}:{MANIFEST_TYPE_CRFS}"


def format_tarsplit_position(section: BlobSection) -> str:
    return f"{section.offset}:{section.length}:{section.uncompressed_length}"


def skippable_frame(data: bytes) -> bytes:
    """Wrap ``data`` in a zstd skippable frame, which decoders pass over."""
    return SKIPPABLE_FRAME_MAGIC + struct.pack("<I", len(data)) + data


@dataclass(frozen=True)
class Footer:
    """The 64-byte zstd:chunked footer (the payload of the last skippable frame)."""

    toc: BlobSection
    tar_split: BlobSection

    def to_bytes(self) -> bytes:
        return (
            struct.pack(
                "<7Q",
                self.toc.offset,
                self.toc.length,
                self.toc.uncompressed_length,
                MANIFEST_TYPE_CRFS,
                self.tar_split.offset,
                self.tar_split.length,
                self.tar_split.uncompressed_length,
            )
            + FOOTER_MAGIC
        )

    @classmethod
    def parse(cls, data: bytes) -> Footer:
        """Parse a 64-byte footer, or the 40-byte legacy one (which has no tar-split)."""
        if len(data) == FOOTER_BYTES and data.endswith(FOOTER_MAGIC):
            values = struct.unpack("<7Q", data[:56])
            if values[3] != MANIFEST_TYPE_CRFS:
                raise TocError(f"unsupported zstd:chunked manifest type {values[3]}")
            return cls(BlobSection(*values[0:3]), BlobSection(*values[4:7]))
        if len(data) == LEGACY_FOOTER_BYTES and data.endswith(LEGACY_FOOTER_MAGIC):
            values = struct.unpack("<4Q", data[:32])
            if values[3] != MANIFEST_TYPE_CRFS:
                raise TocError(f"unsupported zstd:chunked manifest type {values[3]}")
            return cls(BlobSection(*values[0:3]), BlobSection(0, 0, 0))
        raise TocError("no zstd:chunked footer at the end of the layer")


@dataclass(frozen=True)
class ChunkRef:
    """One chunk of a regular file: where its bytes are, compressed and uncompressed."""

    file_offset: int  # offset of the chunk inside the file
    size: int  # uncompressed size
    blob_offset: int  # compressed byte range [blob_offset, blob_end) in the layer blob
    blob_end: int
    sha256: str  # "sha256:<hex>" of the uncompressed chunk ("" if unknown)
    verity: str  # fs-verity digest of the uncompressed chunk ("" if not a lazyfs layer)
    zeros: bool = False
    inner_offset: int = 0  # eStargz: bytes to skip in the decompressed range before the chunk
    prefetch: int = 0  # rank in the prefetch order, 1-based; 0: not prefetched


def file_chunks(entries: tuple[TocEntry, ...] | list[TocEntry]) -> list[ChunkRef]:
    """Chunks of one regular file, from its ``reg`` entry followed by its ``chunk`` entries."""
    head = entries[0]
    if head.size < 0:
        raise TocError(f"TOC entry {head.name!r} has a negative size")
    if head.size == 0:
        return []
    if len(entries) == 1:
        sha = head.chunk_digest or head.digest
        verity = head.chunk_verity or head.verity
        single = ChunkRef(
            0,
            head.size,
            head.offset,
            head.end_offset,
            sha,
            verity,
            False,
            head.inner_offset,
            head.prefetch,
        )
        _check_chunks_cover(head, [single])
        return [single]
    chunks = []
    for index, entry in enumerate(entries):
        end = _chunk_end(entries, index, head.end_offset)
        size = entry.chunk_size or _implied_chunk_size(entries, index, head.size)
        chunks.append(
            ChunkRef(
                entry.chunk_offset,
                size,
                entry.offset,
                end,
                entry.chunk_digest,
                entry.chunk_verity,
                entry.chunk_type == "zeros",
                entry.inner_offset,
                entry.prefetch,
            )
        )
    _check_chunks_cover(head, chunks)
    return chunks


def _chunk_end(entries: tuple[TocEntry, ...] | list[TocEntry], i: int, file_end: int) -> int:
    """Where chunk ``i``'s compressed bytes end: where the next chunk's start, unless that
    chunk shares the same (eStargz) gzip member, which an ``innerOffset`` says."""
    start = entries[i].offset
    for following in entries[i + 1 :]:
        if following.offset != start or following.inner_offset == 0:
            return following.offset
    return file_end


def _implied_chunk_size(entries: tuple[TocEntry, ...] | list[TocEntry], i: int, size: int) -> int:
    following = entries[i + 1].chunk_offset if i + 1 < len(entries) else size
    return following - entries[i].chunk_offset


def _check_chunks_cover(head: TocEntry, chunks: list[ChunkRef]) -> None:
    position = 0
    for chunk in chunks:
        if chunk.file_offset != position or chunk.size <= 0:
            raise TocError(f"TOC chunks of {head.name!r} do not tile the file")
        if chunk.blob_end < chunk.blob_offset or (
            not chunk.zeros and chunk.blob_end == chunk.blob_offset
        ):
            raise TocError(f"TOC chunk of {head.name!r} has an empty byte range")
        position += chunk.size
    if position != head.size:
        raise TocError(f"TOC chunks of {head.name!r} cover {position} of {head.size} bytes")


def group_file_entries(entries: tuple[TocEntry, ...]) -> Iterator[list[TocEntry]]:
    """Yield each non-chunk entry with the chunk entries that follow it."""
    group: list[TocEntry] = []
    for entry in entries:
        if entry.type == "chunk":
            if not group or group[0].type != "reg" or group[0].name != entry.name:
                raise TocError(f"TOC chunk entry {entry.name!r} does not follow its file")
            group.append(entry)
            continue
        if group:
            yield group
        group = [entry]
    if group:
        yield group


def with_chunk_fields(entry: TocEntry, chunk: ChunkRef, chunk_type: str) -> TocEntry:
    """Copy ``entry`` with the chunk* fields of ``chunk`` set."""
    return replace(
        entry,
        offset=chunk.blob_offset,
        chunk_size=chunk.size,
        chunk_offset=chunk.file_offset,
        chunk_digest=chunk.sha256,
        chunk_type=chunk_type,
        chunk_verity=chunk.verity,
    )
