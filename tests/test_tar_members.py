"""``members.iter_members`` parses plain ustar headers itself: it must give exactly the members
tarfile gives (every field), and fail exactly where tarfile fails, for any tar."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

import pytest

from lazyfs.errors import TocError
from lazyfs.formats.chunked.members import iter_members

_FIELDS = (
    "name", "mode", "uid", "gid", "size", "mtime", "chksum", "type", "linkname", "uname",
    "gname", "devmajor", "devminor", "offset", "offset_data", "pax_headers", "sparse",
)  # fmt: skip


def _members(*, fmt: int) -> list[tuple[tarfile.TarInfo, bytes]]:
    def member(name: str, kind: bytes = tarfile.REGTYPE, **fields: object) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = kind
        for key, value in fields.items():
            setattr(info, key, value)
        return info

    long_dir = "usr/" + "d" * 90 + "/" + "e" * 60
    return [
        (member("etc", tarfile.DIRTYPE, mode=0o755), b""),
        (member("etc/hosts", mtime=1_700_000_000, uname="root", gname="wheel"), b"127.0.0.1\n"),
        (member(long_dir + "/lib.so", uid=1000, gid=1000), b"x" * 1500),  # ustar prefix
        (member(long_dir, tarfile.DIRTYPE), b""),
        (member("bin/sh", tarfile.SYMTYPE, linkname="dash"), b""),
        (member("bin/hard", tarfile.LNKTYPE, linkname="etc/hosts"), b""),
        (member("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3), b""),
        (member("run/fifo", tarfile.FIFOTYPE), b""),
        (member("exact", size=512), bytes(512)),
        (member("empty"), b""),
        (member("n\xe9-utf8-\udcff", mode=0o4755), b"abc"),
    ] + ([] if fmt == tarfile.USTAR_FORMAT else [(member("p/" + "q" * 120), b"PAX or GNU")])


def _tar(fmt: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(
        fileobj=buffer, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape"
    ) as archive:
        for info, data in _members(fmt=fmt):
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _reference(path: Path) -> list[tuple[object, ...]] | str:
    """What plain tarfile gives (the members' fields), or how it fails."""
    try:
        with tarfile.open(path, mode="r:", errors="surrogateescape") as archive:
            return [tuple(getattr(m, f) for f in _FIELDS) for m in archive]
    except tarfile.TarError as exc:
        return f"layer is not a valid tar stream: {exc}"


def _ours(path: Path) -> list[tuple[object, ...]] | str:
    found: list[tuple[object, ...]] = []
    try:
        for info in iter_members(path):
            found.append(tuple(getattr(info, f) for f in _FIELDS))
    except TocError as exc:
        if "does not fit in the tar" in str(exc):  # our own range check: tarfile has none
            return [*found, ("range",)]
        return str(exc)
    return found


def _compare(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    ours, reference = _ours(path), _reference(path)
    if isinstance(ours, list) and ours and ours[-1] == ("range",):
        assert isinstance(reference, list)
        assert ours[:-1] == reference[: len(ours) - 1]
    else:
        assert ours == reference


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_are_tarfiles_own(tmp_path: Path, fmt: int) -> None:
    data = _tar(fmt)
    path = tmp_path / "layer.tar"
    _compare(path, data)
    assert len(_ours(path)) == (11 if fmt == tarfile.USTAR_FORMAT else 12)


def test_v7_directories_global_pax_and_base256_match_tarfile(tmp_path: Path) -> None:
    # tarfile itself reads the first member: the crafted one comes second
    lead = _tar(tarfile.USTAR_FORMAT)[:512]
    header = bytearray(lead)
    for kind, name, prefix in [
        (tarfile.REGTYPE, b"file-with-slash/", b""),
        (tarfile.DIRTYPE, b"/", b"pre/fix"),
        (tarfile.DIRTYPE, b"dir//", b"pre"),
        (tarfile.AREGTYPE, b"olddir/", b""),  # V7 tar's directory
    ]:
        header[0:100], header[345:500] = name.ljust(100, b"\0"), prefix.ljust(155, b"\0")
        header[156:157] = kind
        _compare(tmp_path / "v7.tar", lead + _with_checksum(header) + bytes(1024))
    big = bytearray(header)
    big[108:116] = b"\x80" + (2**40).to_bytes(7, "big")  # a base-256 uid
    big[136:148] = b"\xff" * 11 + b"\xfe"  # a base-256 mtime of -2
    _compare(tmp_path / "b256.tar", lead + _with_checksum(big) + bytes(1024))
    big[124:136] = b"\xff" * 12  # a base-256 size of -1: refused, in one line
    _compare(tmp_path / "b256.tar", lead + _with_checksum(big) + bytes(1024))
    with pytest.raises(TocError, match="size -1 does not fit"):
        list(iter_members(tmp_path / "b256.tar"))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        archive.pax_headers = {"comment": "global", "uid": "7"}
        for info, data in _members(fmt=tarfile.PAX_FORMAT)[:4]:
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    _compare(tmp_path / "global.tar", buffer.getvalue())


def test_mutated_headers_give_what_tarfile_gives(tmp_path: Path) -> None:
    """Bytes of the headers changed at random (checksums mostly fixed up, so that the field
    parsing is reached): the members, or the error, are tarfile's."""
    rng = random.Random(14)
    tars = [_tar(fmt) for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT)]
    path = tmp_path / "mutated.tar"
    for case in range(400):
        data = bytearray(rng.choice(tars))
        starts = [i for i in range(0, len(data), 512) if _looks_like_header(data[i : i + 512])]
        start = rng.choice(starts)
        for _ in range(rng.randint(1, 4)):
            data[start + rng.randrange(512)] = rng.choice(
                b"\0 /7\x80\xff\x1c+-_x" + bytes([case % 256])
            )
        if rng.random() < 0.9:
            data[start : start + 512] = _with_checksum(data[start : start + 512])
        _compare(path, bytes(data))


def _looks_like_header(block: bytes | bytearray) -> bool:
    return block[257:262] == b"ustar"


def _with_checksum(header: bytes | bytearray) -> bytes:
    block = bytearray(header)
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _pax_tar(records: bytes, name: str, kind: bytes, size: int | None = None) -> bytes:
    """A tar: a plain lead member (tarfile itself reads the first one), then a PAX extended
    header of ``records`` (its size ``size``, or theirs), then a plain member."""
    first = _tar(tarfile.USTAR_FORMAT)[:512]  # the "etc" directory
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, len(records) if size is None else size
    pax = info.tobuf(tarfile.USTAR_FORMAT)
    body = records.ljust(-(-len(records) // 512) * 512, b"\0")
    member = tarfile.TarInfo(name)
    member.type, member.size = kind, 3 if kind == tarfile.REGTYPE else 0
    payload = b"abc".ljust(512, b"\0") if kind == tarfile.REGTYPE else b""
    return first + pax + body + member.tobuf(tarfile.USTAR_FORMAT) + payload + bytes(1024)


def _record(keyword: bytes, value: bytes) -> bytes:
    """One PAX record: its length counts its own digits."""
    text = b" " + keyword + b"=" + value + b"\n"
    digits = 1
    while len(b"%d" % (len(text) + digits)) != digits:
        digits += 1
    return b"%d" % (len(text) + digits) + text


@pytest.mark.parametrize(
    ("records", "name", "kind", "size"),
    [
        (_record(b"path", b"a/" + b"b" * 150), "short", tarfile.REGTYPE, None),
        (_record(b"path", b"dir/" + b"d" * 120 + b"/"), "dir", tarfile.DIRTYPE, None),
        (_record(b"path", b"file/with/slash/"), "f", tarfile.REGTYPE, None),
        (_record(b"path", b"n\xe9-latin1-not-utf8"), "f", tarfile.REGTYPE, None),
        (_record(b"path", "ü/ß".encode()), "f", tarfile.SYMTYPE, None),
        (_record(b"path", b"p") + _record(b"mtime", b"1.5"), "f", tarfile.REGTYPE, None),
        (_record(b"hdrcharset", b"BINARY") + _record(b"path", b"\xff"), "f", tarfile.REGTYPE, None),
        (_record(b"path", b"x") + b"12 path=yy\n", "f", tarfile.REGTYPE, None),  # garbage after
        (_record(b"path", b"x")[:-1] + b"!", "f", tarfile.REGTYPE, None),  # no newline
        (b"99 path=short\n", "f", tarfile.REGTYPE, None),  # a length that overruns
        (_record(b"path", b"a 1 hdrcharset=BINARY\n"), "f", tarfile.REGTYPE, None),
        (_record(b"path", b"x") + b"12 path=yy\n", "f", tarfile.REGTYPE, 10),  # in the padding
        (_record(b"path", b"x" * 9000), "f", tarfile.REGTYPE, None),  # longer than the fast path's
    ],
)
def test_pax_path_headers_give_what_tarfile_gives(
    tmp_path: Path, records: bytes, name: str, kind: bytes, size: int | None
) -> None:
    _compare(tmp_path / "pax.tar", _pax_tar(records, name, kind, size))
