"""Tar members as TOC entries: the metadata half of writing a layer.

tarfile parses the headers (PAX and GNU extensions included); this module maps each member to
its TOC entry the way containers/storage fills one, and recovers the raw name tar-split stores.
"""

from __future__ import annotations

import functools
import tarfile
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path

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
    """The members of the tar at ``tar_path``, in order; TocError if it is not a tar."""
    try:
        tar_size = tar_path.stat().st_size
        with tarfile.open(tar_path, mode="r:", errors="surrogateescape") as archive:
            # TarFile keeps every member it reads (~1 KB each); only the current one is needed.
            kept: list[tarfile.TarInfo] = archive.members  # type: ignore[attr-defined]
            while (member := archive.next()) is not None:
                kept.clear()
                _check_size(member, tar_size)
                yield member
    except tarfile.TarError as exc:
        raise TocError(f"layer is not a valid tar stream: {exc}") from exc


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
    if member.type == tarfile.GNUTYPE_SPARSE or member.issparse():
        raise TocError(f"sparse file {member.name!r} is not supported")
    kind = _TAR_TYPES.get(member.type)
    if kind is None:
        raise TocError(f"unsupported tar entry type {member.type!r} for {member.name!r}")
    pax = member.pax_headers
    return TocEntry(
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
