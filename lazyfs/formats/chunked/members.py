"""Tar members as TOC entries: the metadata half of writing a layer.

tarfile parses the headers (PAX and GNU extensions included), but for plain ustar headers, the
common case, which are parsed here the very way tarfile does it, ~3x faster (tarfile takes
~60 µs a member on the 2-core VM of docs/benchmarks.md, a layer has 10^4 members); this module
maps each member to its TOC entry the way containers/storage fills one, and recovers the raw
name tar-split stores.
"""

from __future__ import annotations

import functools
import os
import re
import struct
import tarfile
import zlib
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from lazyfs.errors import TocError
from lazyfs.formats.chunked.toc import TocEntry

_TAR_TYPES = {
    tarfile.REGTYPE: "reg",
    tarfile.AREGTYPE: "reg",
    tarfile.CONTTYPE: "reg",
    tarfile.LNKTYPE: "hardlink",
    tarfile.SYMTYPE: "symlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.DIRTYPE: "dir",
    tarfile.FIFOTYPE: "fifo",
}
_HEADER_BYTES = 512
_NAME_FIELD_BYTES = 100


def iter_members(tar_path: Path) -> Iterator[tarfile.TarInfo]:
    """The members of the tar at ``tar_path``, in order; TocError if it is not a tar.

    The same members ``tarfile`` gives, faster: a plain ustar header (the common case) is
    parsed here, straight from its 512 bytes; anything else (PAX and GNU extension headers, a
    bad checksum, zero blocks, odd number fields, ...) is left to tarfile, which reads on from
    the same offset, so it decides every case that is not plain.
    """
    try:
        tar_size = tar_path.stat().st_size
        with (
            tar_path.open("rb") as source,
            tarfile.open(fileobj=source, mode="r:", errors="surrogateescape") as archive,
        ):
            # TarFile keeps every member it reads (~1 KB each); only the current one is needed.
            kept: list[tarfile.TarInfo] = archive.members  # type: ignore[attr-defined]
            fd = source.fileno()
            member = archive.next()
            while member is not None:
                kept.clear()
                _check_size(member, tar_size)
                yield member
                member = _plain_member(archive, fd) or archive.next()
    except tarfile.TarError as exc:
        raise TocError(f"layer is not a valid tar stream: {exc}") from exc


# Types whose header alone is the member (no extension header, no sparse map).
_PLAIN_TYPES = frozenset(
    (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.DIRTYPE)
)
# name mode uid gid size mtime chksum type linkname magic version uname gname devmajor devminor
# prefix: the ustar header's fields.
_USTAR = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s")


def _plain_member(archive: tarfile.TarFile, fd: int) -> tarfile.TarInfo | None:
    """The member at the archive's offset, parsed as tarfile would, if its header is plain
    (or a PAX header with a path only, then a plain one); else None, and tarfile reads it.
    Mirrors ``TarInfo.frombuf`` and ``_proc_builtin``."""
    offset: int = archive.offset
    if archive.pax_headers:  # a global PAX header applies to every member: tarfile's job
        return None
    buf = os.pread(fd, _HEADER_BYTES, offset)
    if len(buf) != _HEADER_BYTES:
        return None
    if buf[156:157] == tarfile.XHDTYPE:
        info = _pax_path_member(archive, fd, buf, offset)
    elif buf[156:157] in _PLAIN_TYPES:
        info = _ustar_info(archive, buf, offset)
    else:
        return None
    if info is not None:
        blocks = -(-info.size // _HEADER_BYTES) if info.isreg() else 0  # = tarfile's _block()
        archive.offset = info.offset_data + blocks * _HEADER_BYTES
    return info


def _header_numbers(buf: bytes) -> list[int] | None:
    """mode, uid, gid, size, mtime, chksum, devmajor, devminor of a ustar header, as tarfile's
    nti gives them; None if a field is one int() refuses (base-256: tarfile's job) or the
    checksum does not match as unsigned (perhaps signed, or bad: tarfile decides)."""
    fields = _USTAR.unpack_from(buf)
    raw = [*fields[1:7], fields[13], fields[14]]
    try:
        numbers = [int(field.partition(b"\0")[0] or b"0", 8) for field in raw]
    except ValueError:
        return None
    if numbers[5] != 256 + _byte_sum(buf) - sum(raw[5]):
        return None
    return numbers


def _ustar_info(archive: tarfile.TarFile, buf: bytes, offset: int) -> tarfile.TarInfo | None:
    """The member whose plain ustar header is ``buf``, at ``offset``, as tarfile makes it."""
    numbers = _header_numbers(buf)
    if numbers is None:
        return None
    name, *_, kind, link, _, _, uname, gname, _, _, prefix = _USTAR.unpack_from(buf)
    encoding, errors = archive.encoding, archive.errors
    info = tarfile.TarInfo()
    info.mode, info.uid, info.gid, info.size, info.mtime = numbers[:5]
    info.chksum, info.devmajor, info.devminor, info.type = *numbers[5:], kind
    name_text = name.partition(b"\0")[0].decode(encoding, errors)
    info.linkname = link.partition(b"\0")[0].decode(encoding, errors)
    info.uname = uname.partition(b"\0")[0].decode(encoding, errors)
    info.gname = gname.partition(b"\0")[0].decode(encoding, errors)
    prefix_text = prefix.partition(b"\0")[0].decode(encoding, errors)
    if kind == tarfile.AREGTYPE and name_text.endswith("/"):
        info.type = tarfile.DIRTYPE  # V7 tar's directories
    is_dir = info.type == tarfile.DIRTYPE
    if is_dir:
        name_text = name_text.rstrip("/")
    if prefix_text:
        name_text = prefix_text + "/" + name_text
    info.name = name_text.rstrip("/") if is_dir else name_text
    info.offset = offset
    info.offset_data = offset + _HEADER_BYTES
    return info


# A PAX record buffer of one "path" record, as tarfile's _proc_pax reads records.
_PAX_PATH = re.compile(rb"(\d+) path=")
_MAX_PAX_PATH_BYTES = 8192  # longer (rare) ones are tarfile's


def _pax_path_member(
    archive: tarfile.TarFile, fd: int, buf: bytes, offset: int
) -> tarfile.TarInfo | None:
    """A PAX extended header whose only record is ``path`` (how tar writers store a long
    name, 9 % of /usr's members), and the plain member after it, as tarfile's ``_proc_pax``
    and ``_apply_pax_info`` make it. Anything else in the records is tarfile's job."""
    numbers = _header_numbers(buf)
    if numbers is None or not 0 < numbers[3] <= _MAX_PAX_PATH_BYTES:
        return None
    size = numbers[3]
    blocks = -(-size // _HEADER_BYTES)
    data = os.pread(fd, (blocks + 1) * _HEADER_BYTES, offset + _HEADER_BYTES)
    records, padding, header = data[:size], data[size : blocks * _HEADER_BYTES], data[-512:]
    match = _PAX_PATH.match(records)
    if (
        len(data) != (blocks + 1) * _HEADER_BYTES
        or match is None
        or int(match.group(1)) != size  # one record, filling the size exactly
        or not records.endswith(b"\n")
        or padding.strip(b"\0")  # tarfile would read on into the padding
        or b"hdrcharset=" in records
        or header[156:157] not in _PLAIN_TYPES
    ):
        return None
    info = _ustar_info(archive, header, offset + (blocks + 1) * _HEADER_BYTES)
    if info is None:
        return None
    raw_path = records[match.end() : size - 1]
    try:
        path = raw_path.decode("utf-8", "strict")
    except UnicodeDecodeError:
        path = raw_path.decode(archive.encoding, archive.errors)
    info.name = path.rstrip("/")
    info.pax_headers = {"path": path}
    info.offset = offset  # tarfile's: the member starts at its extended header
    return info


def _byte_sum(block: bytes) -> int:
    """The sum of the bytes of a header block. An ASCII block's sum is below 512 * 128, less
    than Adler-32's modulus, so Adler-32's low half (1 + the sum) gives it, in C."""
    if block.isascii():
        return (zlib.adler32(block) & 0xFFFF) - 1
    return sum(block)


def _check_size(member: tarfile.TarInfo, tar_size: int) -> None:
    """PAX and GNU base-256 headers can say any size, negative or huge: a member's payload must
    lie inside the tar."""
    if not 0 <= member.size <= tar_size - member.offset_data:
        name = _text(member.name)[:200]
        raise TocError(
            f"tar member {name!r}: size {member.size} does not fit in the tar "
            f"({tar_size - member.offset_data} bytes left)"
        )


def entry_for(member: tarfile.TarInfo) -> TocEntry:
    """The TOC entry of ``member``, without digests or offsets."""
    return TocEntry(**entry_fields(member))


def entry_fields(member: tarfile.TarInfo) -> dict[str, Any]:
    """The fields of ``member``'s TOC entry, without digests or offsets: the writer adds them
    and builds each entry once (a TocEntry costs ~10 µs to build, a layer has 10^4)."""
    if member.type == tarfile.GNUTYPE_SPARSE or member.issparse():
        raise TocError(f"sparse file {member.name!r} is not supported")
    kind = _TAR_TYPES.get(member.type)
    if kind is None:
        raise TocError(f"unsupported tar entry type {member.type!r} for {member.name!r}")
    pax = member.pax_headers
    return dict(
        type=kind,
        name=_text(member.name),
        link_name=_text(member.linkname) if kind in ("symlink", "hardlink") else "",
        mode=member.mode,
        size=member.size if kind == "reg" else 0,
        uid=member.uid,
        gid=member.gid,
        modtime=_rfc3339(pax.get("mtime"), member.mtime),
        accesstime=_rfc3339(pax.get("atime"), None),
        changetime=_rfc3339(pax.get("ctime"), None),
        dev_major=member.devmajor if kind in ("char", "block") else 0,
        dev_minor=member.devminor if kind in ("char", "block") else 0,
        xattrs=_xattrs(pax),
    )


def raw_name(member: tarfile.TarInfo, headers: bytes) -> bytes:
    """The member name as its header spells it; tarfile drops a directory's trailing slash.

    ``headers`` are the tar bytes that end where the member's payload starts.
    """
    name = member.name.encode("utf-8", "surrogateescape")
    if member.isdir() and not name.endswith(b"/"):
        header = headers[-_HEADER_BYTES : -_HEADER_BYTES + _NAME_FIELD_BYTES].rstrip(b"\0")
        if header.endswith(b"/") or member.pax_headers.get("path", "").endswith("/"):
            name += b"/"
    return name


def _text(name: str) -> str:
    # Names that are not UTF-8 arrive with surrogate escapes; JSON needs real text.
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _xattrs(pax: Mapping[str, str]) -> dict[str, bytes]:
    prefix = "SCHILY.xattr."
    return {
        _text(key[len(prefix) :]): value.encode("utf-8", "surrogateescape")
        for key, value in pax.items()
        if key.startswith(prefix)
    }


@functools.lru_cache(maxsize=4096)  # the members of a layer share a few timestamps
def _rfc3339(exact: str | None, fallback: float | None) -> str:
    """Format a tar timestamp as Go's RFC3339Nano in UTC."""
    try:
        seconds = Decimal(exact) if exact is not None else None
    except InvalidOperation:
        seconds = None
    if seconds is None:
        if fallback is None:
            return ""
        seconds = Decimal(int(fallback))
    try:
        whole = int(seconds.to_integral_value(rounding="ROUND_FLOOR"))
        nanos = int((seconds - whole) * 1_000_000_000)
        stamp = datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    except (ValueError, OverflowError, ArithmeticError) as exc:
        raise TocError(f"tar timestamp {exact or fallback!r} is out of range") from exc
    fraction = f".{nanos:09d}".rstrip("0") if nanos else ""
    return f"{stamp}{fraction}Z"
