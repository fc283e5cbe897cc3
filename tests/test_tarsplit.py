"""lazyfs.formats.chunked.tarsplit: Go-identical JSON lines, CRC64, and exact tar reassembly."""

from __future__ import annotations

import base64
import io
import json
import random
import tarfile

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lazyfs.errors import IntegrityError, TocError
from lazyfs.formats.chunked.tarsplit import (
    Crc64,
    TarSplitEntry,
    TarSplitWriter,
    crc64_digest,
    decode_entry,
    encode_entry,
    go_json_string,
    parse_tar_split,
    reassemble_tar,
    trailer_segments,
)

BLOCK = 512
LONG_NAME = "d/" + "n" * 150 + ".txt"
NON_UTF8_NAME = "d/caf\udce9"  # b"d/caf\xe9" through surrogateescape
# Real lines written by Go's tar-split packer (seen in containers/storage layer metadata).
GO_LINES = [
    b'{"type":1,"name":"bin/","payload":null,"position":1}\n',
    b'{"type":1,"name":"usr/share/logstash/vendor/bundle/jruby/2.5.0/gems/rufus-scheduler-3.0.9'
    b'/spec/lock_custom_spec.rb","size":630,"payload":"uGCeMrBUE1c=","position":25343}\n',
    b'{"type":2,"payload":"AAAAAAAAAAA=","position":0}\n',
]


# --- building and splitting a tar with Python's tarfile --------------------------------


def add_member(tar: tarfile.TarFile, name: str, data: bytes | None = None, **attrs: object) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = 1_700_000_000
    for key, value in attrs.items():
        setattr(info, key, value)
    if data is not None:
        info.size = len(data)
    tar.addfile(info, io.BytesIO(data) if data is not None else None)


def build_tar(tar_format: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tar_format) as tar:
        add_member(tar, "d", type=tarfile.DIRTYPE, mode=0o755)
        add_member(tar, "d/empty", b"")
        add_member(tar, "d/one", b"x")
        add_member(tar, "d/block", b"b" * BLOCK)
        add_member(tar, "d/big", random.Random(1).randbytes(70_000))
        add_member(tar, LONG_NAME, b"long name")
        add_member(tar, NON_UTF8_NAME, b"latin-1 name")
        add_member(tar, "d/a<b>&c\u2028\u00e9", b"escaped")
        add_member(tar, "d/repl\ufffd", b"literal U+FFFD")
        add_member(tar, "d/hard", type=tarfile.LNKTYPE, linkname="d/one")
        add_member(tar, "d/link", type=tarfile.SYMTYPE, linkname="one")
    return buf.getvalue()


def go_name(member: tarfile.TarInfo) -> bytes:
    """Go's hdr.Name: raw bytes, and directories keep the trailing slash tarfile strips."""
    name = member.name.encode("utf-8", "surrogateescape")
    return name + b"/" if member.isdir() else name


def split_tar(raw: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    """Disassemble like tar-split: segment before each payload, file entry, then trailer."""
    writer = TarSplitWriter()
    files: dict[bytes, bytes] = {}
    position = 0
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        for member in tar:
            writer.add_segment(raw[position : member.offset_data])
            size = member.size if member.isreg() else 0
            data = raw[member.offset_data : member.offset_data + size]
            writer.add_file(go_name(member), size, crc64_digest(data))
            files[go_name(member)] = data
            position = member.offset_data + size
    for segment in trailer_segments(raw[position:], -position % BLOCK):
        writer.add_segment(segment)
    return writer.getvalue(), files


@pytest.fixture(params=[tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def tar_bytes(request: pytest.FixtureRequest) -> bytes:
    return build_tar(request.param)


def test_reassembles_byte_identical_tar(tar_bytes: bytes) -> None:
    stream, files = split_tar(tar_bytes)
    entries = parse_tar_split(stream)
    rebuilt = b"".join(reassemble_tar(entries, lambda name, size: files[name]))
    assert rebuilt == tar_bytes


def test_stream_structure(tar_bytes: bytes) -> None:
    stream, _ = split_tar(tar_bytes)
    entries = parse_tar_split(stream)
    assert [e.position for e in entries] == list(range(len(entries)))
    assert entries[0].kind == "segment" and len(entries[0].payload) == BLOCK
    kinds = [e.kind for e in entries[:22]]
    assert kinds == ["segment", "file"] * 11
    trailer = entries[22]
    assert trailer.kind == "segment" and trailer.payload.endswith(bytes(1024))
    assert all(e.kind == "segment" for e in entries[22:])
    assert stream.endswith(b"}\n") and stream.count(b"\n") == len(entries)


def test_file_lines_are_go_encoded(tar_bytes: bytes) -> None:
    lines = split_tar(tar_bytes)[0].splitlines(keepends=True)
    assert lines[1] == b'{"type":1,"name":"d/","payload":null,"position":1}\n'
    assert lines[3] == b'{"type":1,"name":"d/empty","payload":null,"position":3}\n'
    crc = base64.b64encode(crc64_digest(b"x"))
    assert lines[5] == b'{"type":1,"name":"d/one","size":1,"payload":"' + crc + b'","position":5}\n'
    assert b'"name":"' + LONG_NAME.encode() + b'"' in lines[11]
    assert lines[13].startswith(b'{"type":1,"name_raw":"ZC9jYWbp","size":12,')
    assert b'"name":"d/a\\u003cb\\u003e\\u0026c\\u2028\xc3\xa9"' in lines[15]
    assert lines[17].startswith(b'{"type":1,"name_raw":"ZC9yZXBs77+9",')


def test_segment_lines_are_go_encoded() -> None:
    writer = TarSplitWriter()
    writer.add_segment(b"ab")
    writer.add_segment(b"")  # the disassembler never records empty segments
    writer.add_segment(memoryview(b"\0\0\0"))
    assert writer.getvalue() == (
        b'{"type":2,"payload":"YWI=","position":0}\n{"type":2,"payload":"AAAA","position":1}\n'
    )
    assert writer.entry_count == 2


def test_trailer_segments_split_like_disassembler() -> None:
    rest = bytes(100 + 1024 + 3 * 1024 * 1024 + 5)
    pieces = trailer_segments(rest, 100)
    assert [len(p) for p in pieces] == [1124, 1 << 20, 1 << 20, 1 << 20, 5]
    assert trailer_segments(bytes(1024), 0) == [bytes(1024)]


# --- writer and parser errors ------------------------------------------------------------


def test_empty_file_crc_is_stored_as_null() -> None:
    writer = TarSplitWriter()
    writer.add_file(b"e", 0, Crc64().digest())
    assert writer.getvalue() == b'{"type":1,"name":"e","payload":null,"position":0}\n'


@pytest.mark.parametrize("names", [[b"a", b"a"], [b"a", b"./a"], [b"d/", b"d"], [b"//x", b"/x"]])
def test_duplicate_paths_written_but_rejected_on_parse_like_go(names: list[bytes]) -> None:
    writer = TarSplitWriter()
    writer.add_file(names[0], 0, b"")
    writer.add_file(names[1], 0, b"")  # a valid tar may repeat a path
    lines = [encode_entry(TarSplitEntry("file", n, 0, b"", i)) for i, n in enumerate(names)]
    with pytest.raises(TocError):
        parse_tar_split(b"".join(lines))


@pytest.mark.parametrize(("size", "crc"), [(-1, b""), (1, b""), (1, b"1234567"), (0, b"12")])
def test_bad_file_fields_rejected(size: int, crc: bytes) -> None:
    with pytest.raises(TocError):
        TarSplitWriter().add_file(b"f", size, crc)


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b"[1]",
        b'{"type":3,"position":0}',
        b'{"type":"1","position":0}',
        b'{"type":true,"position":0}',
        b'{"position":0}',
        b'{"type":2,"payload":"!!!","position":0}',
        b'{"type":2,"payload":"YWI","position":0}',
        b'{"type":2,"payload":7,"position":0}',
        b'{"type":2,"payload":null,"position":-1}',
        b'{"type":1,"name":"f","size":-5,"payload":null,"position":0}',
        b'{"type":1,"name":"f","size":3,"payload":null,"position":0}',
        b'{"type":1,"name":"\\ud800","payload":null,"position":0}',
        b'{"type":1,"name":5,"payload":null,"position":0}',
        b'{"type":1,"name":"f","size":1.5,"payload":null,"position":0}',
        b"\xff\xfe",
    ],
)
def test_malformed_lines_rejected(line: bytes) -> None:
    with pytest.raises(TocError):
        parse_tar_split(line + b"\n")


def test_parse_tolerates_blank_lines_and_missing_final_newline() -> None:
    stream = GO_LINES[2] + b"\n" + GO_LINES[0].rstrip(b"\n")
    assert [e.position for e in parse_tar_split(stream)] == [0, 1]


# --- reassembly checks -------------------------------------------------------------------


def test_reassembly_checks_crc_and_size() -> None:
    entry = TarSplitEntry("file", b"f", 3, crc64_digest(b"abc"), 0)
    assert list(reassemble_tar([entry], lambda name, size: b"abc")) == [b"abc"]
    with pytest.raises(IntegrityError):
        list(reassemble_tar([entry], lambda name, size: b"abd"))
    with pytest.raises(IntegrityError):
        list(reassemble_tar([entry], lambda name, size: b"ab"))


def test_reassembly_never_reads_empty_files() -> None:
    def refuse(name: bytes, size: int) -> bytes:
        raise AssertionError(f"read {name!r}")

    entries = [TarSplitEntry("segment", b"", 0, b"hdr", 0), TarSplitEntry("file", b"d/", 0, b"", 1)]
    assert b"".join(reassemble_tar(entries, refuse)) == b"hdr"


# --- CRC64 -------------------------------------------------------------------------------


def test_crc64_check_value() -> None:
    assert crc64_digest(b"123456789") == bytes.fromhex("b90956c775a41001")
    assert Crc64().digest() == bytes(8)


def test_crc64_streaming_equals_one_shot() -> None:
    data = random.Random(3).randbytes(100_003)
    crc = Crc64()
    for start in range(0, len(data), 7777):
        crc.update(memoryview(data)[start : start + 7777])
    assert crc.digest() == crc64_digest(data)


# --- JSON line codec ---------------------------------------------------------------------


@pytest.mark.parametrize("line", GO_LINES)
def test_real_go_lines_round_trip_byte_for_byte(line: bytes) -> None:
    assert encode_entry(decode_entry(line)) == line


def test_go_json_string_escapes() -> None:
    assert go_json_string("<>&\u2028\u2029") == '"\\u003c\\u003e\\u0026\\u2028\\u2029"'
    assert (
        go_json_string('"\\\b\f\n\r\t\x01\x1f\x7f') == '"\\"\\\\\\b\\f\\n\\r\\t\\u0001\\u001f\x7f"'
    )
    assert go_json_string("é€😀") == '"é€😀"'


entries_strategy = st.one_of(
    st.builds(
        TarSplitEntry,
        kind=st.just("segment"),
        name=st.just(b""),
        size=st.just(0),
        payload=st.binary(min_size=1, max_size=600),
        position=st.integers(0, 2**63 - 1),
    ),
    st.builds(
        TarSplitEntry,
        kind=st.just("file"),
        name=st.one_of(st.binary(max_size=60), st.text(max_size=40).map(str.encode)),
        size=st.just(0),
        payload=st.just(b""),
        position=st.integers(0, 2**31),
    ),
    st.builds(
        TarSplitEntry,
        kind=st.just("file"),
        name=st.one_of(st.binary(max_size=60), st.text(max_size=40).map(str.encode)),
        size=st.integers(1, 2**63 - 1),
        payload=st.binary(min_size=8, max_size=8),
        position=st.integers(0, 2**31),
    ),
)


@given(entries_strategy)
def test_codec_round_trip(entry: TarSplitEntry) -> None:
    line = encode_entry(entry)
    assert line.endswith(b"}\n") and line.count(b"\n") == 1
    assert decode_entry(line) == entry
    keys = list(json.loads(line))
    assert keys == [
        k for k in ("type", "name", "name_raw", "size", "payload", "position") if k in keys
    ]


@given(st.text())
def test_go_json_string_is_valid_json(text: str) -> None:
    encoded = go_json_string(text)
    assert not any(c in encoded for c in "<>&\u2028\u2029")
    assert not any(ord(c) < 0x20 for c in encoded)
    assert json.loads(encoded) == text


@given(st.lists(entries_strategy, max_size=8))
def test_writer_matches_codec(entries: list[TarSplitEntry]) -> None:
    writer = TarSplitWriter()
    expected: list[TarSplitEntry] = []
    for index, entry in enumerate(entries):
        if entry.kind == "segment":
            writer.add_segment(entry.payload)
        else:
            # A unique last path element keeps Go's duplicate-path check quiet.
            name = entry.name + b"\0" + str(index).encode()
            writer.add_file(name, entry.size, entry.payload)
            entry = TarSplitEntry("file", name, entry.size, entry.payload, 0)
        expected.append(TarSplitEntry(entry.kind, entry.name, entry.size, entry.payload, index))
    assert writer.getvalue() == b"".join(encode_entry(e) for e in expected)
    assert parse_tar_split(writer.getvalue()) == expected
