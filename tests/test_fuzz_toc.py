"""Hostile TOCs and tar headers, and decompression bombs (issue 12; docs/reliability.md).

Hypothesis mutates REAL metadata field by field: the TOC of a zstd:chunked layer that lazyfs's
writer made from an imagebuild tar, the TOC of an eStargz layer as tests/estargz_build.py
writes it, and the tar headers (ustar fields and PAX records) that the writer reads for plain
layers. Values are out of range, negative or huge, of the wrong JSON type, names that traverse
or are too long or hold NUL, duplicated entries and keys, hardlinks in cycles.

The contract, for every case: the parser either refuses with a LazyfsError whose message is one
line, or returns entries that are all in range (checked here independently of the parser);
then the merged tree is built from them and raises nothing but LazyfsError.

Decompression bombs run in a subprocess that measures its peak RSS: a frame of a few KB that
declares (or really holds) 1 GiB must be refused with less than 64 MiB of growth.

``LAZYFS_FUZZ_FIGURES=path`` writes the outcome counts (docs/reliability.md quotes them).
"""

from __future__ import annotations

import base64
import copy
import functools
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from estargz_build import build_estargz
from fuzzing import FUZZ, OUTCOMES, write_figures
from hypothesis import given
from hypothesis import strategies as st
from imagebuild import KIB, random_bytes, text_bytes

from lazyfs.config import ChunkingConfig, LimitsConfig
from lazyfs.convert.imagebuild import (
    Entry,
    block_device,
    char_device,
    directory,
    fifo,
    hardlink,
    layer_tar_bytes,
    regular_file,
    symlink,
    with_parent_dirs,
)
from lazyfs.errors import IntegrityError, LazyfsError, TocError
from lazyfs.formats import estargz
from lazyfs.formats.bounded import chunk_bytes, gunzip_bounded, zstd_bounded, zstd_exact
from lazyfs.formats.chunked.toc import (
    Toc,
    TocEntry,
    file_chunks,
    group_file_entries,
    parse_rfc3339_ns,
    parse_toc_position,
)
from lazyfs.formats.chunked.writer import write_chunked_layer
from lazyfs.mount.tree import build_tree

LIMITS = LimitsConfig()
CHUNKING = ChunkingConfig(min_chunk_bytes=1024, avg_chunk_bytes=4096, max_chunk_bytes=16384)


@pytest.fixture(scope="module", autouse=True)
def _figures() -> Iterator[None]:
    yield
    write_figures()


# --- the real layers the mutations start from ------------------------------------------------


def sample_entries() -> list[Entry]:
    """Every kind of entry, a file of several chunks, a run of zeros, xattrs, a hardlink."""
    return with_parent_dirs(
        [
            regular_file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
            regular_file(
                "usr/bin/tool",
                random_bytes(6 * KIB, seed=1),
                0o4755,
                uid=1000,
                gid=100,
                xattrs={"user.note": b"\x00\xff", "security.selinux": b"system_u"},
            ),
            regular_file("usr/lib/big", text_bytes(40 * KIB, seed=2)),
            regular_file("usr/lib/zeros", bytes(20 * KIB)),
            regular_file("empty"),
            symlink("usr/bin/sh", "tool"),
            hardlink("usr/bin/tool2", "usr/bin/tool"),
            char_device("dev/null", 1, 3),
            block_device("dev/sda", 8, 0),
            fifo("run/fifo"),
        ]
    )


@dataclass(frozen=True)
class Sample:
    """A parsed TOC object to mutate, and what its parser is told about the layer."""

    toc: dict[str, Any]
    blob_size: int  # chunk ranges must end before this
    layer: str


@functools.cache
def chunked_sample() -> Sample:
    with tempfile.TemporaryDirectory() as work:
        tar_path, blob_path = Path(work) / "layer.tar", Path(work) / "layer.zst"
        tar_path.write_bytes(layer_tar_bytes(sample_entries()))
        layer = write_chunked_layer(tar_path, blob_path, CHUNKING)
    return Sample(json.loads(layer.toc.to_json()), layer.size, str(layer.digest))


@functools.cache
def estargz_sample() -> Sample:
    layer = build_estargz(sample_entries(), chunk_size=8 * KIB, min_chunk_size=2 * KIB)
    return Sample(json.loads(layer.toc_json), layer.toc_offset, str(layer.digest))


def test_the_samples_are_accepted_as_they_are() -> None:
    for parse, sample in ((parse_chunked, chunked_sample()), (parse_estargz, estargz_sample())):
        entries = parse(json.dumps(sample.toc).encode(), sample)
        assert_in_range(entries, sample.blob_size)
        build_tree([entries])
        assert any(entry.type == "chunk" for entry in entries)  # several chunks
        assert any(entry.chunk_type == "zeros" for entry in entries) or parse is parse_estargz


def parse_chunked(data: bytes, sample: Sample) -> list[TocEntry]:
    return list(Toc.parse(data, layer=sample.layer, blob_size=sample.blob_size).entries)


def parse_estargz(data: bytes, sample: Sample) -> list[TocEntry]:
    return estargz.toc_entries(data, sample.blob_size, layer=sample.layer)


# --- hostile values ----------------------------------------------------------------------------

TOC_KEYS = [
    "type", "name", "linkName", "mode", "size", "uid", "gid", "modtime", "accesstime",
    "changetime", "devMajor", "devMinor", "xattrs", "digest", "offset", "endOffset",
    "chunkSize", "chunkOffset", "chunkDigest", "chunkType", "innerOffset", "lazyfsVerity",
    "lazyfsChunkVerity", "lazyfsPrefetch", "somethingNew",
]  # fmt: skip
INTEGERS = [
    -1, -(2**31), -(2**63), -(2**64), 0, 1, 0o7777, 0o170000, 0o177777, 0o1000000, 2**12, 2**20,
    2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**30, 10**400,
]  # fmt: skip
WRONG_TYPES: list[object] = [True, False, None, 1.5, 1e300, float("nan"), float("inf"), "17"]
WRONG_TYPES += ["", [], {}, [1]]
NAMES = [
    "", ".", "..", "/", "./", "../../etc/passwd", "a/../../b", "/abs/path", "a\x00b", "a\nb",
    "x" * 256, "/".join(["y" * 255] * 17), "\udc80\udcff", "\ud800", "ok/name",
    "usr/bin/tool", "usr/bin", ".wh..wh..opq", "etc/.wh.passwd", "\u202e\u0000",
]  # fmt: skip
TIMES = [
    "garbage", "2023-13-45T00:00:00Z", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999999Z",
    "10000-01-01T00:00:00Z", "2023-11-14T22:13:20.5+25:00", "2023-11-14T22:13:20.\u0663Z",
    "2023-11-14T22:13:20Z",
]  # fmt: skip
DIGESTS = [
    "sha256:" + "a" * 64, "sha256:" + "A" * 64, "sha256:" + "g" * 64, "sha512:" + "a" * 128,
    "md5:x", "sha256:../../etc",
]  # fmt: skip
XATTRS: list[object] = [
    {"user.a": "AAAA"},
    {"": "AA=="},
    {"user.\x00": "AA=="},
    {"x" * 300: ""},
    {"user.big": base64.b64encode(bytes(70_000)).decode()},
    {"a": 5},
    {"a": "!!"},
    {f"user.{i:03d}" + "n" * 240: "" for i in range(300)},
]
ANY_VALUE = st.one_of(
    st.sampled_from(INTEGERS + WRONG_TYPES + NAMES + TIMES + DIGESTS + XATTRS),
    st.sampled_from(["reg", "dir", "chunk", "hardlink", "symlink", "char", "fifo", "sock"]),
    st.sampled_from(["", "zeros", "data"]),
    st.integers(),
    st.text(max_size=20),
)


# --- mutations ---------------------------------------------------------------------------------

Mutation = Callable[[dict[str, Any]], None]


def _entries(toc: dict[str, Any]) -> list[Any]:
    entries = toc.get("entries")
    return entries if isinstance(entries, list) and entries else [{}]


def _pick(items: list[Any], index: int) -> Any:
    return items[index % len(items)]


@st.composite
def mutations(draw: st.DrawFn) -> Mutation:
    kind = draw(st.sampled_from(["set", "set", "set", "drop", "copy", "move", "link", "top"]))
    i, j = draw(st.integers(0, 63)), draw(st.integers(0, 63))
    key, value = draw(st.sampled_from(TOC_KEYS)), draw(ANY_VALUE)

    def mutate(toc: dict[str, Any]) -> None:
        entries = _entries(toc)
        entry = _pick(entries, i)
        if not isinstance(entry, dict):
            return
        if kind == "set":
            entry[key] = value
        elif kind == "drop":
            entry.pop(key, None)
        elif kind == "copy":  # a duplicate entry, anywhere
            entries.insert(j % (len(entries) + 1), copy.deepcopy(entry))
        elif kind == "move":
            entries.insert(j % len(entries), entries.pop(i % len(entries)))
        elif kind == "link":  # a hardlink to another entry, to itself, or a cycle of two
            other = _pick(entries, j)
            other_name = other.get("name") if isinstance(other, dict) else None
            entry.update(type="hardlink", linkName=other_name if other_name else "x")
            if isinstance(other, dict) and value is True:
                other.update(type="hardlink", linkName=entry.get("name", "y"))
        else:
            toc[draw_top_key(key)] = value

    return mutate


def draw_top_key(key: str) -> str:
    return {"type": "version", "name": "entries", "digest": "tarSplitDigest"}.get(key, key)


def mutated_toc(sample: Sample, steps: list[Mutation], duplicate_key: bool) -> bytes:
    toc = copy.deepcopy(sample.toc)
    for step in steps:
        step(toc)
    data = json.dumps(toc).encode()  # NaN and Infinity come out as Python writes them
    if duplicate_key:  # a key twice in one entry: parsers disagree on which one wins
        data = data.replace(b'{"type": ', b'{"uid": 0, "uid": 7, "type": ', 1)
    return data


# --- the contract ------------------------------------------------------------------------------


def assert_one_line(exc: BaseException) -> None:
    text = str(exc)
    assert text and "\n" not in text and "\r" not in text, repr(text)


def check_outcome(suite: str, parse: Callable[[], list[TocEntry]], blob_size: int) -> None:
    try:
        entries = parse()
    except LazyfsError as exc:
        assert_one_line(exc)
        OUTCOMES[f"{suite}: refused by the parser"] += 1
        return
    assert_in_range(entries, blob_size)
    try:
        build_tree([entries])
    except LazyfsError as exc:
        assert_one_line(exc)
        OUTCOMES[f"{suite}: accepted, refused by the tree ({_reason(exc)})"] += 1
        return
    OUTCOMES[f"{suite}: accepted, in range, tree built"] += 1


def _reason(exc: LazyfsError) -> str:
    """What kind of refusal: the message without the names and numbers that vary."""
    text = str(exc)
    return "hardlink target missing" if "points to missing" in text else type(exc).__name__


def assert_in_range(entries: list[TocEntry], blob_size: int) -> None:
    """Every field within the range the kernel, FUSE and lazyfs can represent, checked from
    the ranges themselves (docs/reliability.md), not with the parser's code."""
    for entry in entries:
        assert entry.type in {"dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk"}
        numbers = [entry.size, entry.offset, entry.end_offset, entry.chunk_size]
        numbers += [entry.chunk_offset, entry.inner_offset, entry.prefetch]
        assert all(type(n) is int and 0 <= n < 2**63 for n in numbers)
        assert all(type(n) is int and 0 <= n < 2**32 for n in (entry.uid, entry.gid))
        assert 0 <= entry.dev_major < 2**12 and 0 <= entry.dev_minor < 2**20
        assert type(entry.mode) is int and 0 <= entry.mode <= 0o177777
        for name in (entry.name, entry.link_name):
            _assert_path(name)
        for stamp in (entry.modtime, entry.accesstime, entry.changetime):
            parse_rfc3339_ns(stamp)  # the tree's own parser: must not raise
        for key, value in entry.xattrs.items():
            raw = _kernel_bytes(key)
            assert raw and b"\x00" not in raw and len(raw) <= 255 and len(value) <= 65536
    for group in group_file_entries(tuple(entries)):
        for chunk in file_chunks(group) if group[0].type == "reg" else []:
            assert 0 <= chunk.blob_offset <= chunk.blob_end <= blob_size
            assert chunk.zeros or chunk.inner_offset + chunk.size <= LIMITS.max_chunk_bytes


def _assert_path(name: str) -> None:
    raw = _kernel_bytes(name)
    assert b"\x00" not in raw and len(raw) <= 4095
    assert all(len(part) <= 255 for part in raw.split(b"/"))


def _kernel_bytes(text: str) -> bytes:
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


# --- fuzzing the TOC parsers -------------------------------------------------------------------


@FUZZ
@given(st.lists(mutations(), min_size=1, max_size=4), st.booleans())
def test_mutated_zstd_chunked_tocs(steps: list[Mutation], duplicate_key: bool) -> None:
    sample = chunked_sample()
    data = mutated_toc(sample, steps, duplicate_key)
    check_outcome("zstd:chunked TOC", lambda: parse_chunked(data, sample), sample.blob_size)


@FUZZ
@given(st.lists(mutations(), min_size=1, max_size=4), st.booleans())
def test_mutated_estargz_tocs(steps: list[Mutation], duplicate_key: bool) -> None:
    sample = estargz_sample()
    data = mutated_toc(sample, steps, duplicate_key)
    check_outcome("eStargz TOC", lambda: parse_estargz(data, sample), sample.blob_size)


@FUZZ
@given(st.binary(max_size=64), st.integers(0, 2000))
def test_garbage_spliced_into_a_toc(garbage: bytes, at: int) -> None:
    sample = chunked_sample()
    text = json.dumps(sample.toc).encode()
    data = text[: at % len(text)] + garbage + text[at % len(text) :]
    check_outcome("zstd:chunked TOC", lambda: parse_chunked(data, sample), sample.blob_size)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("uid", 2**32, "uid 4294967296 out of range 0..4294967295"),
        ("gid", -1, "gid -1 out of range 0..4294967295"),
        ("devMajor", 2**32, "devMajor 4294967296 out of range 0..4095"),
        ("size", 2**64, "size 18446744073709551616 out of range 0..9223372036854775807"),
        ("chunkOffset", -5, "chunkOffset -5 out of range"),
        ("mode", 0o1000000, "mode 0o1000000 is not permission bits"),
        ("modtime", "2023-13-45T00:00:00Z", "modtime '2023-13-45T00:00:00Z' is not an RFC 3339"),
        ("name", "a\x00b", "name holds a NUL byte"),
        ("uid", True, "uid is a boolean, not int"),
    ],
)
def test_refusals_name_the_layer_the_entry_and_the_field(
    field: str, value: object, message: str
) -> None:
    sample = chunked_sample()
    toc = copy.deepcopy(sample.toc)
    index = next(i for i, e in enumerate(toc["entries"]) if e["name"] == "usr/bin/tool")
    toc["entries"][index][field] = value
    with pytest.raises(TocError) as caught:
        parse_chunked(json.dumps(toc).encode(), sample)
    name = "usr/bin/tool" if field != "name" else "'a\\x00b'"
    assert str(caught.value).startswith(f"layer {sample.layer}: TOC entry {index} ({name}): ")
    assert message in str(caught.value)


def test_a_chunk_past_the_blob_is_refused() -> None:
    sample = chunked_sample()
    data = json.dumps(sample.toc).encode()
    with pytest.raises(TocError, match="past the blob"):
        Toc.parse(data, layer=sample.layer, blob_size=100)


def test_toc_limits_are_enforced_before_parsing() -> None:
    data = json.dumps(chunked_sample().toc).encode()
    entries = len(chunked_sample().toc["entries"])
    with pytest.raises(TocError, match="more than the limit of 100"):
        Toc.parse(data, limits=LimitsConfig(max_toc_bytes=100))
    with pytest.raises(TocError, match="entries may hold"):
        Toc.parse(data, limits=LimitsConfig(max_toc_entries=entries // 4))
    with pytest.raises(TocError, match=f"{entries} entries, more than the limit of"):
        Toc.parse(data, limits=LimitsConfig(max_toc_entries=entries - 1))


def test_a_json_bomb_of_small_objects_is_refused_by_its_shape() -> None:
    bomb = b'{"version":1,"entries":[' + b"{}," * 3_000_000 + b"{}]}"  # 9 MB, ~300 MB parsed
    with pytest.raises(TocError, match="JSON objects and arrays"):
        Toc.parse(bomb, limits=LimitsConfig(max_toc_entries=100_000))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1:2:3", "expected 4 decimal numbers"),
        ("-1:2:3:1", "expected 4 decimal numbers"),
        ("+1:2:3:1", "expected 4 decimal numbers"),
        ("1_0:2:3:1", "expected 4 decimal numbers"),
        ("\u0661:2:3:1", "expected 4 decimal numbers"),
        ("10:0:3:1", "the section is empty"),
        ("10:20:30:2", "unsupported manifest type 2"),
        ("9223372036854775808:1:1:1", "out of range"),
        ("100:950:30:1", "ends past the 1000-byte blob"),
        (f"0:{(128 << 20) + 1}:30:1", "more than the limit of 134217728"),
        (f"0:10:{(256 << 20) + 1}:1", "uncompressed, more than the limit of 268435456"),
    ],
)
def test_toc_position_annotations_are_checked(value: str, message: str) -> None:
    with pytest.raises(TocError, match=message) as caught:
        parse_toc_position(value, layer="sha256:abc", blob_size=1000 if "950" in value else None)
    assert str(caught.value).startswith("layer sha256:abc: TOC position annotation ")


# --- fuzzing the tar headers the writer reads (plain layers) -----------------------------------

USTAR_FIELDS = {  # name: (offset, length) in a ustar header block
    "name": (0, 100),
    "mode": (100, 8),
    "uid": (108, 8),
    "gid": (116, 8),
    "size": (124, 12),
    "mtime": (136, 12),
    "typeflag": (156, 1),
    "linkname": (157, 100),
    "devmajor": (329, 8),
    "devminor": (337, 8),
    "prefix": (345, 155),
}
PAX_KEYS = ["uid", "gid", "size", "mtime", "atime", "ctime", "path", "linkpath", "uname"]
PAX_KEYS += ["SCHILY.xattr.user.x", "SCHILY.xattr.", "GNU.sparse.major"]
PAX_VALUES = [
    "-1", "4294967296", "18446744073709551616", "99999999999999999999999", "1e400", "nan",
    "-9999999999999", "0.5", "../../etc/passwd", "x" * 5000, "", "a/../../b", "\udcff",
]  # fmt: skip


def tar_sample() -> bytes:
    return layer_tar_bytes(
        [
            directory("d"),
            regular_file("d/file", b"hello world\n" * 50, uid=5, gid=6),
            symlink("d/link", "file"),
            char_device("d/tty", 4, 1),
            hardlink("d/again", "d/file"),
        ]
    )


def header_offsets(tar: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
        return [member.offset_data - 512 for member in archive.getmembers()]


def _field_value(length: int, choice: int, number: int) -> bytes:
    """A hostile encoding of ``number`` for a numeric field of ``length`` bytes."""
    if choice == 0:  # octal, as long as it is
        return f"{number:o}".encode()[:length].ljust(length, b"\0")
    if choice == 1:  # GNU base-256, which can say negative and huge numbers
        value = number % (1 << (8 * (length - 1)))
        return b"\x80" + value.to_bytes(length - 1, "big")
    if choice == 2:
        return b"\xff" * length  # base-256 -1 (all ones)
    return bytes([32 + (number % 90)]) * length  # garbage text


def with_checksum(header: bytearray) -> bytes:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


HeaderEdit = tuple[int, str, bytes, bool]  # member, field, new bytes, checksum fixed


@st.composite
def header_edits(draw: st.DrawFn) -> HeaderEdit:
    member = draw(st.integers(0, 4))
    name = draw(st.sampled_from(sorted(USTAR_FIELDS)))
    length = USTAR_FIELDS[name][1]
    if name in ("name", "linkname", "prefix"):
        raw = draw(st.sampled_from(NAMES)).encode("utf-8", "surrogatepass")
        value = raw[:length].ljust(length, b"\0")
    elif name == "typeflag":
        value = draw(st.sampled_from([b"0", b"1", b"2", b"3", b"5", b"6", b"7", b"S", b"x"]))
    else:
        number = draw(st.sampled_from(INTEGERS[:20]) | st.integers(-(2**70), 2**70))
        value = _field_value(length, draw(st.integers(0, 3)), number)
    return member, name, value, draw(st.booleans())


def edited_tar(edits: list[HeaderEdit]) -> bytes:
    tar = bytearray(tar_sample())
    offsets = header_offsets(bytes(tar))
    for member, name, value, fix_checksum in edits:
        start = offsets[member % len(offsets)]
        offset, length = USTAR_FIELDS[name]
        header = bytearray(tar[start : start + 512])
        header[offset : offset + length] = value
        tar[start : start + 512] = with_checksum(header) if fix_checksum else header
    return bytes(tar)


def pax_tar(records: dict[str, str]) -> bytes:
    member = tarfile.TarInfo("d/file")
    member.size = 12
    member.pax_headers = records
    buffer = io.BytesIO()
    try:
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
            archive.addfile(member, io.BytesIO(b"hello world\n"))
    except (ValueError, UnicodeError, tarfile.TarError):
        return tar_sample()  # tarfile would not write it; nothing to test
    return buffer.getvalue()


def convert_and_parse(tar: bytes) -> list[TocEntry]:
    """The plain-layer path: the writer reads the tar, then its TOC is checked as parsed."""
    with tempfile.TemporaryDirectory() as work:
        tar_path, blob_path = Path(work) / "layer.tar", Path(work) / "layer.zst"
        tar_path.write_bytes(tar)
        layer = write_chunked_layer(tar_path, blob_path, CHUNKING)
    return list(Toc.parse(layer.toc.to_json(), blob_size=layer.size).entries)


def has_negative_size(tar: bytes) -> bool:
    """A member whose size tarfile reads as negative (PAX ``size=-1``, base-256 -1): the
    writer's in-progress chunker fails on it with IndexError (reported; see below)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
            return any(member.size < 0 for member in archive)
    except (tarfile.TarError, EOFError, ValueError, UnicodeError, OverflowError):
        return False


@FUZZ
@given(st.lists(header_edits(), min_size=1, max_size=3))
def test_mutated_ustar_headers(edits: list[HeaderEdit]) -> None:
    tar = edited_tar(edits)
    check_outcome("tar headers (ustar)", lambda: convert_and_parse(tar), 2**63 - 1)


@FUZZ
@given(st.dictionaries(st.sampled_from(PAX_KEYS), st.sampled_from(PAX_VALUES), min_size=1))
def test_mutated_pax_records(records: dict[str, str]) -> None:
    tar = pax_tar(records)
    check_outcome("tar headers (PAX)", lambda: convert_and_parse(tar), 2**63 - 1)


def test_a_negative_tar_size_is_refused_in_one_line() -> None:
    tar = pax_tar({"size": "-1"})
    assert has_negative_size(tar)
    with pytest.raises(TocError) as caught:
        convert_and_parse(tar)
    assert_one_line(caught.value)


def test_a_pax_uid_out_of_range_is_refused_in_one_line() -> None:
    member = tarfile.TarInfo("big-uid")
    member.pax_headers = {"uid": str(2**40)}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        archive.addfile(member, io.BytesIO(b""))
    with pytest.raises(TocError, match="uid 1099511627776 out of range") as caught:
        convert_and_parse(buffer.getvalue())
    assert_one_line(caught.value)


# --- bounded decompression ---------------------------------------------------------------------


def test_zstd_bounded_gives_what_fits_and_refuses_more() -> None:
    import zstandard

    data = random_bytes(5000, seed=3) + bytes(5000)
    for frame in (
        zstandard.ZstdCompressor().compress(data),
        zstandard.ZstdCompressor(write_content_size=False).compress(data),
    ):
        assert zstd_bounded(frame, len(data), "x") == data
        assert zstd_exact(frame, len(data), "x") == data
        with pytest.raises(TocError, match="more than 9999 bytes"):
            zstd_bounded(frame, len(data) - 1, "x")
        with pytest.raises(TocError, match="not valid zstd"):
            zstd_bounded(frame[:-7], len(data), "x")
        with pytest.raises(TocError, match="decompresses to 10000 bytes, not 10001"):
            zstd_exact(frame, len(data) + 1, "x")
        with pytest.raises(IntegrityError, match="got more than 9999 bytes"):
            chunk_bytes(frame, "zstd", len(data) - 1, 0, "chunk")
        with pytest.raises(IntegrityError, match="undecodable"):
            chunk_bytes(b"garbage!", "zstd", 10, 0, "chunk")


def test_gzip_slices_and_members_are_bounded() -> None:
    first, second = text_bytes(3000, seed=4), text_bytes(2000, seed=5)
    members = _gzip(first) + _gzip(second)
    assert chunk_bytes(members, "gzip", 2500, 2000, "c") == (first + second)[2000:4500]
    with pytest.raises(IntegrityError, match="got 3000 bytes"):
        chunk_bytes(members, "gzip", 4000, 2000, "c")
    assert gunzip_bounded(_gzip(first), 3000, "t") == first
    for bad, message in [
        (_gzip(first), "more than 2999 bytes"),
        (_gzip(first)[:-4], "truncated"),
        (_gzip(first) + b"x", "bytes follow"),
        (b"not gzip", "not valid gzip"),
    ]:
        with pytest.raises(TocError, match=message):
            gunzip_bounded(bad, 3000 if message != "more than 2999 bytes" else 2999, "t")


def _gzip(data: bytes) -> bytes:
    import zlib

    packer = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


BOMB_SCRIPT = r"""
import json, sys, zlib
import zstandard
from lazyfs.config import LimitsConfig
from lazyfs.errors import LazyfsError
from lazyfs.formats import estargz
from lazyfs.formats.bounded import chunk_bytes, zstd_exact

GIB = 1 << 30

def peak_kib():
    # VmHWM, this process's own peak: ru_maxrss would start at the parent's (a vfork'd child
    # inherits the high-water mark of the pytest process that spawned it).
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

def zstd_zeros(total, declared):
    packer = zstandard.ZstdCompressor(write_content_size=declared).compressobj(size=total)
    block = bytes(1 << 20)
    return b"".join(packer.compress(block) for _ in range(total >> 20)) + packer.flush()

def declares_only(size):
    # A frame header that declares `size` bytes, then one 1-byte RLE block: a lie of 13 bytes.
    header = b"\x28\xb5\x2f\xfd" + bytes([0b11100000]) + size.to_bytes(8, "little")
    return header + ((1 << 3) | (1 << 1) | 1).to_bytes(3, "little") + b"\x00"

def gzip_zeros(total):
    packer = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    return b"".join(packer.compress(block) for _ in range(total >> 20)) + packer.flush()

cases = {  # name: (build the input, decompress it)
    "zstd chunk, 1 GiB declared and real": (
        lambda: zstd_zeros(GIB, True), lambda f: chunk_bytes(f, "zstd", 65536, 0, "chunk")),
    "zstd chunk, 1 GiB real, size not declared": (
        lambda: zstd_zeros(GIB, False), lambda f: chunk_bytes(f, "zstd", 65536, 0, "chunk")),
    "zstd TOC, 2 GiB declared by 13 bytes": (
        lambda: declares_only(2 * GIB), lambda f: zstd_exact(f, 10_000, "TOC")),
    "gzip chunk, 256 MiB real": (
        lambda: gzip_zeros(GIB // 4), lambda f: chunk_bytes(f, "gzip", 65536, 1000, "chunk")),
    "eStargz TOC member, 256 MiB real": (
        lambda: gzip_zeros(GIB // 4),
        lambda f: estargz.read_toc_member(f, LimitsConfig(max_toc_bytes=1 << 20))),
}
results = {}
for name, (build, decompress) in cases.items():
    data = build()
    before = peak_kib()
    try:
        decompress(data)
        outcome = "accepted"
    except LazyfsError as exc:
        outcome = type(exc).__name__ + ": " + str(exc)
    after = peak_kib()
    results[name] = {"growth_kib": after - before, "input_bytes": len(data), "outcome": outcome}
print(json.dumps(results))
"""


@functools.cache
def bomb_results() -> dict[str, dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-c", BOMB_SCRIPT], capture_output=True, text=True, check=True, timeout=120
    )
    results: dict[str, dict[str, Any]] = json.loads(done.stdout)
    return results


@pytest.mark.parametrize(
    ("case", "outcome"),
    [
        ("zstd chunk, 1 GiB declared and real", "IntegrityError"),
        ("zstd chunk, 1 GiB real, size not declared", "IntegrityError"),
        ("zstd TOC, 2 GiB declared by 13 bytes", "TocError"),
        # eStargz members go on with the next file's bytes: only the chunk's are inflated.
        ("gzip chunk, 256 MiB real", "accepted"),
        ("eStargz TOC member, 256 MiB real", "TocError"),
    ],
)
def test_decompression_bombs_stay_in_little_memory(case: str, outcome: str) -> None:
    result = bomb_results()[case]
    growth_mib, input_kib = result["growth_kib"] / 1024, result["input_bytes"] / 1024
    OUTCOMES[f"bomb: {case} ({input_kib:.0f} KiB): {outcome}, +{growth_mib:.1f} MiB RSS"] += 1
    assert result["outcome"].split(":")[0] == outcome, result
    assert result["growth_kib"] < 64 * 1024, result


CONTROL_SCRIPT = r"""
import sys, zstandard
total = 1 << 28
packer = zstandard.ZstdCompressor(write_content_size=True).compressobj(size=total)
frame = b"".join(packer.compress(bytes(1 << 20)) for _ in range(total >> 20)) + packer.flush()
if sys.argv[1] == "decompress":  # the call the bound replaced
    out = zstandard.ZstdDecompressor().decompress(frame, max_output_size=65537)
    assert len(out) == total
with open("/proc/self/status") as status:  # VmHWM: ru_maxrss would start at the parent's
    print(next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")))
"""


def _peak_rss_kib(*args: str) -> int:
    """Peak RSS of one child process, as it reports its own VmHWM."""
    done = subprocess.run(
        [sys.executable, "-c", CONTROL_SCRIPT, *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return int(done.stdout.split()[-1])


def test_the_memory_measurement_sees_an_unbounded_decompression() -> None:
    """The control: the call the bound replaced allocates what a 256 MiB frame declares, and a
    process's peak RSS shows it (each case in a process of its own: a peak never goes down)."""
    growth_kib = _peak_rss_kib("decompress") - _peak_rss_kib("build-only")
    assert growth_kib > 128 * 1024, growth_kib
