"""eStargz layers: the footer, the TOC member, and the TOC as lazyfs TOC entries. A pure leaf.

Format facts (containerd/stargz-snapshotter ``docs/estargz.md``, ``estargz/types.go``,
``estargz/gzip.go``, ``estargz/estargz.go``, ``estargz/build.go``):

- The blob is an ordinary ``tar+gzip`` layer made of concatenated gzip members. A member starts
  at the blob's start, at each regular file's payload (or each chunk of it; 4 MiB by default),
  at the TOC, and at the footer. Tar headers and padding ride in whatever member is open.
- The last tar entry, ``stargz.index.json``, is the TOC: ``{"version":1,"entries":[...]}``. Its
  member starts at the TOC offset and holds the TOC's tar header, the JSON, and the tar trailer.
- The 51-byte footer is an empty gzip member whose Extra field is the subfield ``SG`` of length
  22: ``%016x`` of the TOC offset, then ``STARGZ``. The older stargz footer is 47 bytes: the
  22 bytes are the whole Extra field, without subfield ID or length.
- A ``reg`` entry's ``offset`` is where the member holding its payload starts; ``chunk`` entries
  follow it for the file's further chunks. ``chunkSize`` is 0 (omitted) for a file's last chunk
  and means "to the end of the file". With the writer's minimum chunk size, several payloads
  share one member: they share ``offset`` and ``innerOffset`` says where each starts in the
  decompressed member. A chunk's compressed bytes end where the next member starts, that is at
  the next larger offset of any file in the TOC, or at the TOC.
- ``chunkDigest`` is the sha256 of the chunk's bytes; a file of one chunk may carry only
  ``digest`` (the whole file's sha256).
- ``.prefetch.landmark`` and ``.no.prefetch.landmark`` are 1-byte regular files that only mark
  where prefetching ends; they are not part of the image's filesystem.
- The layer annotation ``containerd.io/snapshot/stargz/toc.digest`` is the sha256 of the
  uncompressed TOC JSON; ``io.containers.estargz.uncompressed-size`` is the size of the
  decompressed blob (the tar the diff_id names), in decimal.

Everything here is bounded by ``LimitsConfig`` (docs/reliability.md): the TOC member's fetched
range and its decompressed size, the TOC's entries, and each chunk's range and size.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from lazyfs.config import LimitsConfig
from lazyfs.errors import TocError
from lazyfs.formats.bounded import gunzip_bounded
from lazyfs.formats.chunked.toc import Toc, TocEntry, file_problem
from lazyfs.model.ranges import ByteRange

FOOTER_BYTES = 51
LEGACY_FOOTER_BYTES = 47  # the footer of stargz (google/crfs), which eStargz extends
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"
TOC_TAR_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
# The TOC member's tar around the JSON: its header (PAX records included) and the trailer.
_TOC_TAR_OVERHEAD_BYTES = 1 << 20
_DEFAULT_LIMITS = LimitsConfig()

_GZIP_ID_CM = b"\x1f\x8b\x08"
_FEXTRA = 0x04
_FHCRC_FNAME_FCOMMENT = 0x02 | 0x08 | 0x10
_SUBFIELD_HEADER = b"SG" + (22).to_bytes(2, "little")
_OFFSET_RE = re.compile(rb"[0-9a-fA-F]{16}STARGZ")
_SHA256_RE = re.compile(r"sha256:[0-9a-f]{64}")
_LANDMARKS = frozenset({PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK})


# --- footer ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Footer:
    """A parsed footer: where the TOC member starts, and how many bytes the footer takes."""

    toc_offset: int
    size: int  # FOOTER_BYTES, or LEGACY_FOOTER_BYTES for a stargz blob


def tail_read_size(blob_size: int) -> int:
    """How many bytes to read from the end of a blob to find either kind of footer."""
    if blob_size < LEGACY_FOOTER_BYTES:
        raise TocError(f"a {blob_size}-byte blob is too small to hold an eStargz footer")
    return min(FOOTER_BYTES, blob_size)


def parse_tail(tail: bytes) -> Footer:
    """The footer at the end of ``tail``, the last bytes of the blob (``tail_read_size``)."""
    problems: list[str] = []
    if len(tail) >= FOOTER_BYTES:
        try:
            return Footer(_parse_estargz_footer(tail[-FOOTER_BYTES:]), FOOTER_BYTES)
        except TocError as exc:
            problems.append(str(exc))
    if len(tail) >= LEGACY_FOOTER_BYTES:
        try:
            return Footer(_parse_legacy_footer(tail[-LEGACY_FOOTER_BYTES:]), LEGACY_FOOTER_BYTES)
        except TocError as exc:
            problems.append(str(exc))
    raise TocError("no eStargz footer at the end of the layer: " + "; ".join(problems or ["short"]))


def parse_footer(footer: bytes) -> int:
    """The TOC's offset, from the blob's last 51 bytes (or the 47 of a legacy stargz footer)."""
    if len(footer) not in (FOOTER_BYTES, LEGACY_FOOTER_BYTES):
        raise TocError(f"an eStargz footer is {FOOTER_BYTES} bytes, not {len(footer)}")
    return parse_tail(footer).toc_offset


def toc_section(
    blob_size: int, footer: Footer, limits: LimitsConfig = _DEFAULT_LIMITS
) -> ByteRange:
    """The blob range of the TOC member: from the TOC offset to the footer, if it is no longer
    than ``limits.max_toc_compressed_bytes`` (the footer, not the manifest, says where it is)."""
    end = blob_size - footer.size
    if not 0 <= footer.toc_offset < end:
        where = f"outside the {blob_size}-byte blob"
        raise TocError(f"eStargz TOC offset {footer.toc_offset} is {where}")
    length = end - footer.toc_offset
    if length > limits.max_toc_compressed_bytes:
        raise TocError(
            f"eStargz TOC member is {length} bytes, more than the limit of "
            f"{limits.max_toc_compressed_bytes}"
        )
    return ByteRange(footer.toc_offset, end)


def _parse_estargz_footer(footer: bytes) -> int:
    extra = _gzip_extra(footer, 4 + 22)
    if not extra.startswith(_SUBFIELD_HEADER):
        raise TocError("eStargz footer lacks the SG subfield of 22 bytes")
    return _parse_offset(extra[4:])


def _parse_legacy_footer(footer: bytes) -> int:
    return _parse_offset(_gzip_extra(footer, 22))


def _gzip_extra(member: bytes, extra_length: int) -> bytes:
    """The Extra field of ``member``, an empty gzip member whose only header extra is FEXTRA."""
    flags = member[3] if len(member) > 3 else 0
    if not member.startswith(_GZIP_ID_CM) or not flags & _FEXTRA or flags & _FHCRC_FNAME_FCOMMENT:
        raise TocError("footer is not a gzip member with an Extra field")
    if int.from_bytes(member[10:12], "little") != extra_length:
        raise TocError(f"footer Extra field is not {extra_length} bytes")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        data = inflater.decompress(member)
    except zlib.error as exc:
        raise TocError(f"footer is not a valid gzip member: {exc}") from exc
    if data or not inflater.eof or inflater.unused_data:
        raise TocError("footer is not one empty gzip member")
    return member[12 : 12 + extra_length]


def _parse_offset(subfield: bytes) -> int:
    if not _OFFSET_RE.fullmatch(subfield):
        raise TocError("footer does not hold a %016x offset followed by STARGZ")
    return int(subfield[:16], 16)


# --- the TOC member ----------------------------------------------------------------------------


def read_toc_member(section: bytes, limits: LimitsConfig = _DEFAULT_LIMITS) -> bytes:
    """The TOC JSON, from ``blob[toc_offset : blob_size - footer size]``: one gzip member
    holding a tar whose first entry is ``stargz.index.json``.

    At most ``limits.max_toc_bytes`` (plus the tar's own headers) is ever decompressed.
    """
    if len(section) > limits.max_toc_compressed_bytes:
        raise TocError(
            f"eStargz TOC member is {len(section)} bytes, more than the limit of "
            f"{limits.max_toc_compressed_bytes}"
        )
    tar_limit = limits.max_toc_bytes + _TOC_TAR_OVERHEAD_BYTES
    tar_bytes = gunzip_bounded(section, tar_limit, "eStargz TOC member")
    try:
        with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as archive:
            member = archive.next()
            if member is None or member.name != TOC_TAR_NAME or not member.isreg():
                name = None if member is None else member.name
                raise TocError(f"eStargz TOC tar entry is {name!r}, not {TOC_TAR_NAME!r}")
            if member.size > limits.max_toc_bytes:
                raise TocError(
                    f"eStargz TOC is {member.size} bytes, more than the limit of "
                    f"{limits.max_toc_bytes}"
                )
            stream = archive.extractfile(member)
            assert stream is not None  # a regular file always has one
            return stream.read()
    except (tarfile.TarError, EOFError, ValueError, UnicodeError, OverflowError) as exc:
        message = " ".join(str(exc).split())
        raise TocError(f"eStargz TOC member is not a valid tar: {message}") from exc


def toc_digest(toc_json: bytes) -> str:
    """What the ``toc.digest`` annotation must say for this TOC JSON."""
    return "sha256:" + hashlib.sha256(toc_json).hexdigest()


# --- TOC entries -------------------------------------------------------------------------------


def toc_entries(
    toc_json: bytes,
    toc_offset: int,
    *,
    layer: str = "",
    limits: LimitsConfig = _DEFAULT_LIMITS,
) -> list[TocEntry]:
    """The eStargz TOC as lazyfs TOC entries, ready for ``file_chunks`` and ``build_tree``.

    Landmarks and the TOC's own entry are dropped. Regular files get their compressed ranges:
    ``offset``/``innerOffset`` per chunk and ``end_offset`` on the ``reg`` entry, where the
    member of its last chunk ends. Every field is checked as :meth:`Toc.parse` checks it, and
    each file's converted chunks as ``check_entries`` does, all payload lying before the TOC;
    ``layer`` names the layer in messages.
    """
    where = f"layer {layer}: eStargz " if layer else "eStargz "
    parsed = Toc.parse(toc_json, layer=layer, limits=limits, check_chunks=False)
    groups = [
        (index, group)
        for index, group in _file_groups(parsed.entries, where)
        if _clean_name(group[0].name) != TOC_TAR_NAME  # upstream never lists it; some might
    ]
    kept = [entry for _, group in groups for entry in group]
    for index, group in groups:
        _check_offsets(group, toc_offset, f"{where}TOC entry {index} ({group[0].name!r}): ")
    ends = _MemberEnds(kept, toc_offset)  # landmarks still start members
    converted: list[TocEntry] = []
    for index, group in groups:
        if _clean_name(group[0].name) in _LANDMARKS:
            continue
        if group[0].type == "reg":
            here = f"{where}TOC entry {index} ({group[0].name!r}): "
            regular = _regular_file(group, ends, here)
            problem = file_problem(regular, toc_offset, limits)
            if problem is not None:
                raise TocError(here + problem)
            converted.extend(regular)
        else:
            converted.append(_metadata(group[0]))
    return converted


class _MemberEnds:
    """Where gzip members end: at the next larger payload offset, or at the TOC."""

    def __init__(self, entries: Sequence[TocEntry], toc_offset: int) -> None:
        starts = {e.offset for e in entries if _has_payload(e)}
        self._starts = sorted(starts | {toc_offset})

    def after(self, offset: int) -> int:
        return self._starts[bisect.bisect_right(self._starts, offset)]


def _has_payload(entry: TocEntry) -> bool:
    return entry.type == "chunk" or (entry.type == "reg" and entry.size > 0)


def _check_offsets(group: list[TocEntry], toc_offset: int, here: str) -> None:
    for entry in group:
        if _has_payload(entry) and entry.offset >= toc_offset:
            raise TocError(f"{here}offset {entry.offset} is not before the TOC at {toc_offset}")


def _file_groups(entries: Sequence[TocEntry], where: str) -> Iterator[tuple[int, list[TocEntry]]]:
    """Each entry with the ``chunk`` entries after it (renamed to its file, as upstream does),
    and the index of the group's first entry."""
    group: list[TocEntry] = []
    start = 0
    for index, entry in enumerate(entries):
        if entry.type != "chunk":
            if group:
                yield start, group
            group, start = [entry], index
        elif group and group[0].type == "reg":
            group.append(replace(entry, name=group[0].name))
        else:
            raise TocError(
                f"{where}TOC entry {index} ({entry.name!r}): chunk entry does not follow a file"
            )
    if group:
        yield start, group


def _clean_name(name: str) -> str:
    return posixpath.normpath("/" + name).lstrip("/")


def _metadata(entry: TocEntry) -> TocEntry:
    """Only the fields eStargz gives every entry; anything else in the JSON is dropped."""
    return TocEntry(
        type=entry.type,
        name=entry.name,
        link_name=entry.link_name,
        mode=entry.mode,
        uid=entry.uid,
        gid=entry.gid,
        modtime=entry.modtime,
        dev_major=entry.dev_major,
        dev_minor=entry.dev_minor,
        xattrs=entry.xattrs,
    )


def _regular_file(group: list[TocEntry], ends: _MemberEnds, here: str) -> list[TocEntry]:
    head = group[0]
    base = replace(_metadata(head), size=head.size, digest=head.digest)
    if head.size == 0:
        if len(group) > 1:
            raise TocError(f"{here}an empty file has chunk entries")
        return [base]
    first, *rest = [_chunk_fields(entry, head, len(group) == 1, here) for entry in group]
    reg = replace(
        base,
        offset=first.offset,
        inner_offset=first.inner_offset,
        end_offset=ends.after(group[-1].offset),
        chunk_offset=first.chunk_offset,
        chunk_size=first.chunk_size,
        chunk_digest=first.chunk_digest,
    )
    return [reg, *rest]  # the caller checks that the chunks tile the file


def _chunk_fields(entry: TocEntry, head: TocEntry, only_chunk: bool, here: str) -> TocEntry:
    digest = entry.chunk_digest or (head.digest if only_chunk else "")
    if not _SHA256_RE.fullmatch(digest):
        what = f"chunk at {entry.chunk_offset}"
        raise TocError(f"{here}{what} has no sha256 chunk digest (has {digest!r})")
    if entry.chunk_offset > head.size:
        raise TocError(f"{here}chunk at {entry.chunk_offset} starts past the file's end")
    return TocEntry(
        type="chunk",
        name=head.name,
        offset=entry.offset,
        inner_offset=entry.inner_offset,
        chunk_offset=entry.chunk_offset,
        chunk_size=entry.chunk_size or head.size - entry.chunk_offset,
        chunk_digest=digest,
    )
