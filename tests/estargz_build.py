"""Write eStargz layers and images for tests, from the public format description.

Written from the facts in containerd/stargz-snapshotter ``docs/estargz.md`` (and the field
meanings of ``estargz/types.go``), independently of lazyfs's reader:

- the layer tar is the one :mod:`imagebuild` writes for the same entries (PAX headers, sorted
  paths), plus a landmark file first (``.no.prefetch.landmark``, or the prefetched paths and then
  ``.prefetch.landmark``) and ``stargz.index.json`` last, then the two zero blocks;
- every regular file's payload, cut into ``chunk_size`` pieces, starts a new gzip member, and the
  tar headers and padding that follow ride in the member that is open. With ``min_chunk_size``,
  a payload only starts a member once the open one holds that many compressed bytes; otherwise
  it shares the member and gets an ``innerOffset`` (landmarks always start one);
- the TOC member starts at the TOC offset and holds the TOC's tar header, the JSON (indented with
  tabs, as Go's ``MarshalIndent`` does) and the tar trailer; then the 51-byte footer (or the
  47-byte legacy stargz one).

Layers are reproducible: zlib's gzip headers carry no name and no time.
"""

from __future__ import annotations

import base64
import hashlib
import json
import tarfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from imagebuild import MIB

from lazyfs.convert.imagebuild import (
    BuiltImage,
    BuiltLayer,
    Entry,
    tag_image,
    tar_member,
    tar_order,
)
from lazyfs.convert.layout import OciLayout
from lazyfs.formats.estargz import (
    FOOTER_BYTES,
    LEGACY_FOOTER_BYTES,
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC_DIGEST_ANNOTATION,
    TOC_TAR_NAME,
    UNCOMPRESSED_SIZE_ANNOTATION,
)
from lazyfs.model.digest import Digest
from lazyfs.model.manifests import (
    OCI_LAYER_TAR_GZIP,
    Descriptor,
)
from lazyfs.model.platform import Platform

DEFAULT_CHUNK_BYTES = 4 * MIB  # upstream's default
LANDMARK_CONTENTS = b"\x0f"
BLOCK = 512
_TRAILER = bytes(2 * BLOCK)

_TOC_TYPES: Mapping[str, str] = {
    "dir": "dir",
    "file": "reg",
    "symlink": "symlink",
    "hardlink": "hardlink",
    "char": "char",
    "block": "block",
    "fifo": "fifo",
}
# The JSON key order of upstream's TOCEntry struct.
_KEY_ORDER = (
    "name",
    "type",
    "size",
    "modtime",
    "linkName",
    "mode",
    "uid",
    "gid",
    "offset",
    "innerOffset",
    "devMajor",
    "devMinor",
    "xattrs",
    "digest",
    "chunkOffset",
    "chunkSize",
    "chunkDigest",
)


@dataclass(frozen=True)
class EstargzLayer:
    """One eStargz layer blob and what its descriptor and config need."""

    blob: bytes
    diff_id: Digest  # sha256 of the decompressed blob (the tar, TOC entry included)
    toc_digest: Digest  # sha256 of the TOC JSON: the toc.digest annotation
    toc_offset: int
    toc_json: bytes
    tar: bytes  # the decompressed blob

    @property
    def digest(self) -> Digest:
        return Digest.of(self.blob)

    @property
    def annotations(self) -> dict[str, str]:
        return {
            TOC_DIGEST_ANNOTATION: str(self.toc_digest),
            UNCOMPRESSED_SIZE_ANNOTATION: str(len(self.tar)),
        }


# --- gzip members ------------------------------------------------------------------------------


class _MemberWriter:
    """Appends gzip members to a blob, and tracks the uncompressed tar that passes through."""

    def __init__(self, level: int) -> None:
        self.blob = bytearray()
        self.tar = bytearray()
        self._level = level
        self._member: Any = None  # the open zlib compressor (zlib has no public type for it)
        self.member_start = 0
        self.member_bytes = 0  # uncompressed bytes in the open member so far

    def write(self, data: bytes) -> None:
        if self._member is None:
            self._open()
        self.tar += data
        self.blob += self._member.compress(data)
        self.member_bytes += len(data)

    def close_member(self) -> None:
        if self._member is not None:
            self.blob += self._member.flush()
            self._member = None

    def start_payload(self, min_chunk_size: int, force_new: bool) -> tuple[int, int]:
        """(offset, innerOffset) for the payload about to be written."""
        if force_new or self._member is None or self._compressed_so_far(min_chunk_size):
            self.close_member()
            self._open()
        return self.member_start, self.member_bytes

    def _compressed_so_far(self, min_chunk_size: int) -> bool:
        """Whether the open member holds ``min_chunk_size`` compressed bytes (after a sync
        flush, so that the count is exact)."""
        if min_chunk_size <= 0:
            return True
        self.blob += self._member.flush(zlib.Z_SYNC_FLUSH)
        return len(self.blob) - self.member_start >= min_chunk_size

    def _open(self) -> None:
        self._member = zlib.compressobj(self._level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        self.member_start = len(self.blob)
        self.member_bytes = 0


def footer_bytes(toc_offset: int, *, legacy: bool = False) -> bytes:
    """The empty gzip member whose Extra field points at the TOC (docs/estargz.md, "Footer")."""
    subfield = b"%016xSTARGZ" % toc_offset
    extra = subfield if legacy else b"SG" + len(subfield).to_bytes(2, "little") + subfield
    header = b"\x1f\x8b\x08\x04" + bytes(4) + b"\x00\xff" + len(extra).to_bytes(2, "little")
    stored_empty_final_block = b"\x01\x00\x00\xff\xff"
    footer = header + extra + stored_empty_final_block + bytes(8)  # CRC-32 and size of nothing
    assert len(footer) == (LEGACY_FOOTER_BYTES if legacy else FOOTER_BYTES)
    return footer


# --- layers ------------------------------------------------------------------------------------


def build_estargz(
    entries: Sequence[Entry],
    *,
    chunk_size: int = DEFAULT_CHUNK_BYTES,
    min_chunk_size: int = 0,
    prefetch: Sequence[str] = (),
    landmark: bool = True,
    level: int = 6,
    legacy_footer: bool = False,
) -> EstargzLayer:
    """The eStargz layer of ``entries``.

    ``prefetch`` paths (with their parent directories) come first, then ``.prefetch.landmark``;
    without them ``.no.prefetch.landmark`` comes first. ``landmark=False`` writes neither.
    """
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    writer = _MemberWriter(level)
    records: list[dict[str, Any]] = []
    for entry in _layer_order(entries, prefetch, landmark):
        records.extend(_write_entry(writer, entry, chunk_size, min_chunk_size))
    writer.close_member()
    toc_offset = len(writer.blob)
    toc_json = _toc_json(records)
    for piece in _toc_tar(toc_json):
        writer.write(piece)
    writer.close_member()
    blob = bytes(writer.blob) + footer_bytes(toc_offset, legacy=legacy_footer)
    tar = bytes(writer.tar)
    return EstargzLayer(blob, Digest.of(tar), Digest.of(toc_json), toc_offset, toc_json, tar)


def _layer_order(entries: Sequence[Entry], prefetch: Sequence[str], landmark: bool) -> list[Entry]:
    rest = tar_order(entries)
    first: list[Entry] = []
    for path in prefetch:
        for wanted in (*_ancestors(path), path):
            first.extend(e for e in rest if e.path == wanted)
            rest = [e for e in rest if e.path != wanted]
    if landmark:
        name = PREFETCH_LANDMARK if prefetch else NO_PREFETCH_LANDMARK
        first.append(Entry(name, "file", 0o644, data=LANDMARK_CONTENTS))
    return first + rest


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def _write_entry(
    writer: _MemberWriter, entry: Entry, chunk_size: int, min_chunk_size: int
) -> Iterator[dict[str, Any]]:
    """Write one tar entry; yield its TOC record(s)."""
    info = tar_member(entry)
    writer.write(info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape"))
    name = info.name + "/" if entry.type == "dir" else info.name  # as tarfile wrote it
    record = _metadata_record(entry, name)
    if entry.type != "file":
        yield record
        return
    record["digest"] = _sha256(entry.data)
    if not entry.data:
        yield record
        return
    is_landmark = entry.path in (PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK)
    for start in range(0, len(entry.data), chunk_size):
        piece = entry.data[start : start + chunk_size]
        offset, inner = writer.start_payload(min_chunk_size, is_landmark and start == 0)
        writer.write(piece)
        chunk: dict[str, Any] = record if start == 0 else {"name": name, "type": "chunk"}
        chunk.update(offset=offset, innerOffset=inner, chunkOffset=start)
        chunk.update(chunkSize=chunk_size if len(piece) == chunk_size else 0)  # 0: to the end
        chunk["chunkDigest"] = _sha256(piece)
        yield chunk
    writer.write(bytes(-len(entry.data) % BLOCK))


def _metadata_record(entry: Entry, tar_name: str) -> dict[str, Any]:
    record: dict[str, Any] = {
        "name": tar_name,
        "type": _TOC_TYPES[entry.type],
        "size": len(entry.data) if entry.type == "file" else 0,
        "modtime": _modtime(entry.mtime),
        "linkName": entry.link,
        "mode": entry.mode,
        "uid": entry.uid,
        "gid": entry.gid,
        "xattrs": {k: base64.b64encode(v).decode() for k, v in sorted(entry.xattrs.items())},
    }
    if entry.type in ("char", "block"):
        record["devMajor"], record["devMinor"] = entry.device
    return record


def _modtime(mtime: int) -> str:
    """RFC 3339 in UTC, whole seconds; empty for the epoch (upstream's formatModtime)."""
    if mtime == 0:
        return ""
    return datetime.fromtimestamp(mtime, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _toc_json(records: list[dict[str, Any]]) -> bytes:
    toc = {"version": 1, "entries": [_omit_empty(record) for record in records]}
    return json.dumps(toc, indent="\t", ensure_ascii=False).encode()


def _omit_empty(record: dict[str, Any]) -> dict[str, Any]:
    """In upstream's key order, without the empty optional fields (Go's ``omitempty``)."""
    return {k: record[k] for k in _KEY_ORDER if k in ("name", "type") or record.get(k)}


def _toc_tar(toc_json: bytes) -> Iterator[bytes]:
    info = tarfile.TarInfo(TOC_TAR_NAME)
    info.size = len(toc_json)
    info.mode = 0o644
    info.mtime = 0
    info.uname = info.gname = ""
    yield info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")
    yield toc_json + bytes(-len(toc_json) % BLOCK)
    yield _TRAILER


# --- images ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EstargzImage:
    image: BuiltImage
    layers: tuple[EstargzLayer, ...]


def write_estargz_image(
    layout_dir: Path,
    tag: str,
    layers: Sequence[Sequence[Entry]],
    *,
    chunk_size: int = DEFAULT_CHUNK_BYTES,
    min_chunk_size: int = 0,
    platform: Platform | None = None,
) -> EstargzImage:
    """An image of eStargz layers (bottom first) in the OCI layout at ``layout_dir`` as ``tag``.

    Layers are ``tar+gzip`` with the toc.digest and uncompressed-size annotations, as
    ``ctr-remote optimize`` and ``nerdctl --estargz`` write them; skopeo pushes them unchanged.
    """
    layout = OciLayout.create(layout_dir)
    estargz = tuple(
        build_estargz(entries, chunk_size=chunk_size, min_chunk_size=min_chunk_size)
        for entries in layers
    )
    built = tuple(
        _add_layer(layout, entries, layer) for entries, layer in zip(layers, estargz, strict=True)
    )
    image = tag_image(layout, tag, built, platform=platform)
    return EstargzImage(image, estargz)


def _add_layer(layout: OciLayout, entries: Sequence[Entry], layer: EstargzLayer) -> BuiltLayer:
    digest = layout.add_blob_bytes(layer.blob)
    descriptor = Descriptor(OCI_LAYER_TAR_GZIP, digest, len(layer.blob), layer.annotations)
    return BuiltLayer(tuple(entries), "gzip", descriptor, layer.diff_id, len(layer.tar))
