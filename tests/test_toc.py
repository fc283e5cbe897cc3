"""formats.chunked.toc: Go-compatible TOC JSON, parsing errors, footer, positions, chunk tiling."""

from __future__ import annotations

import base64
import dataclasses
import json
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lazyfs.errors import TocError
from lazyfs.formats.chunked.toc import (
    ENTRY_TYPES,
    FOOTER_BYTES,
    FOOTER_MAGIC,
    LEGACY_FOOTER_BYTES,
    LEGACY_FOOTER_MAGIC,
    SKIPPABLE_FRAME_MAGIC,
    BlobSection,
    ChunkRef,
    Footer,
    Toc,
    TocEntry,
    chunk_ref,
    file_chunks,
    format_tarsplit_position,
    format_toc_position,
    group_file_entries,
    parse_toc_position,
    skippable_frame,
    trusted_entry,
    with_chunk_fields,
)

SHA_A = "sha256:" + "a" * 64
SHA_B = "sha256:" + "b" * 64
SHA_C = "sha256:" + "c" * 64
SHA_D = "sha256:" + "d" * 64

# Key order of containers/storage's minimal.FileMetadata, then the lazyfs extensions.
GO_KEY_ORDER = [
    "type",
    "name",
    "linkName",
    "mode",
    "size",
    "uid",
    "gid",
    "modtime",
    "accesstime",
    "changetime",
    "devMajor",
    "devMinor",
    "xattrs",
    "digest",
    "offset",
    "endOffset",
    "chunkSize",
    "chunkOffset",
    "chunkDigest",
    "chunkType",
    "lazyfsVerity",
    "lazyfsChunkVerity",
]


def full_entry() -> TocEntry:
    """An entry with every field set to a non-empty value."""
    return TocEntry(
        type="reg",
        name="usr/bin/tool",
        link_name="target",
        mode=0o4755,
        size=5,
        uid=1000,
        gid=100,
        modtime="2023-11-14T22:13:20.5Z",
        accesstime="2023-11-14T22:13:21Z",
        changetime="2023-11-14T22:13:22Z",
        dev_major=8,
        dev_minor=1,
        xattrs={"user.b": b"\x00\xff", "user.a": b"hi"},
        digest=SHA_A,
        offset=10,
        end_offset=20,
        chunk_size=5,
        chunk_offset=7,
        chunk_digest=SHA_B,
        chunk_type="zeros",
        verity=SHA_C,
        chunk_verity=SHA_D,
    )


def toc_bytes(*entries: object, **top: object) -> bytes:
    return json.dumps({"version": 1, "entries": list(entries), **top}).encode()


# --- JSON output: Go's encoding/json conventions ----------------------------------------------


def test_entry_keys_follow_go_struct_order() -> None:
    data = Toc((full_entry(),), SHA_A).to_json()
    top = json.loads(data, object_pairs_hook=lambda pairs: pairs)
    assert [key for key, _ in top] == ["version", "entries", "tarSplitDigest"]
    entry_pairs = top[1][1][0]
    assert [key for key, _ in entry_pairs] == GO_KEY_ORDER


def test_full_entry_exact_bytes() -> None:
    assert Toc((full_entry(),), SHA_A).to_json() == (
        b'{"version":1,"entries":[{"type":"reg","name":"usr/bin/tool","linkName":"target",'
        b'"mode":2541,"size":5,"uid":1000,"gid":100,"modtime":"2023-11-14T22:13:20.5Z",'
        b'"accesstime":"2023-11-14T22:13:21Z","changetime":"2023-11-14T22:13:22Z",'
        b'"devMajor":8,"devMinor":1,"xattrs":{"user.a":"aGk=","user.b":"AP8="},'
        b'"digest":"' + SHA_A.encode() + b'","offset":10,"endOffset":20,"chunkSize":5,'
        b'"chunkOffset":7,"chunkDigest":"' + SHA_B.encode() + b'","chunkType":"zeros",'
        b'"lazyfsVerity":"'
        + SHA_C.encode()
        + b'","lazyfsChunkVerity":"'
        + SHA_D.encode()
        + b'"}],"tarSplitDigest":"'
        + SHA_A.encode()
        + b'"}'
    )


def test_omitempty_drops_zero_fields_but_keeps_type_and_name() -> None:
    assert Toc((TocEntry("dir", "d"),)).to_json() == (
        b'{"version":1,"entries":[{"type":"dir","name":"d"}]}'
    )
    # type and name have no omitempty in the Go struct.
    assert Toc((TocEntry("reg", ""),)).to_json() == (
        b'{"version":1,"entries":[{"type":"reg","name":""}]}'
    )


def test_empty_toc_and_tar_split_digest_omitempty() -> None:
    assert Toc(()).to_json() == b'{"version":1,"entries":[]}'
    assert Toc((), SHA_A).to_json() == (
        b'{"version":1,"entries":[],"tarSplitDigest":"' + SHA_A.encode() + b'"}'
    )


def test_xattrs_sorted_and_base64() -> None:
    entry = TocEntry("dir", "d", xattrs={"z": b"", "user.\u00e9": b"\xff", "a": b"\x00\x01\x02"})
    data = Toc((entry,)).to_json()
    assert b'"xattrs":{"a":"AAEC","user.\xc3\xa9":"/w==","z":""}' in data
    assert Toc((TocEntry("dir", "d", xattrs={}),)).to_json().count(b"xattrs") == 0


@pytest.mark.parametrize(
    ("name", "encoded"),
    [
        ("a<b>&c", b'"a\\u003cb\\u003e\\u0026c"'),
        ("line\u2028sep\u2029", b'"line\\u2028sep\\u2029"'),
        ("caf\u00e9 \U0001f600", b'"caf\xc3\xa9 \xf0\x9f\x98\x80"'),
        ('q"b\\s/', b'"q\\"b\\\\s/"'),
        ("\n\r\t", b'"\\n\\r\\t"'),
        ("\x01\x1f\x7f", b'"\\u0001\\u001f\x7f"'),
    ],
)
def test_strings_escaped_like_go(name: str, encoded: bytes) -> None:
    data = Toc((TocEntry("reg", name, link_name=name),)).to_json()
    assert b'"name":' + encoded + b',"linkName":' + encoded in data
    assert Toc.parse(data).entries[0].name == name


def test_json_output_is_always_valid_utf8() -> None:
    entry = TocEntry("reg", "f", xattrs={"user.\udcff": b"v"})
    Toc((entry,)).to_json().decode("utf-8")


# --- round trip ---------------------------------------------------------------------------------

_int64 = st.integers(-(2**63), 2**63 - 1)
_text = st.text(max_size=12)
_entries = st.builds(
    TocEntry,
    type=st.sampled_from(sorted(ENTRY_TYPES)),
    name=_text,
    link_name=_text,
    mode=_int64,
    size=_int64,
    uid=_int64,
    gid=_int64,
    modtime=_text,
    accesstime=_text,
    changetime=_text,
    dev_major=_int64,
    dev_minor=_int64,
    xattrs=st.dictionaries(_text, st.binary(max_size=8), max_size=3),
    digest=_text,
    offset=_int64,
    end_offset=_int64,
    chunk_size=_int64,
    chunk_offset=_int64,
    chunk_digest=_text,
    chunk_type=st.sampled_from(["", "zeros"]),
    verity=_text,
    chunk_verity=_text,
)

# Entries whose every field is in range (docs/reliability.md): these must round-trip.
_path = (
    st.text(
        st.characters(exclude_categories=["Cs"], exclude_characters="\x00/"),
        min_size=1,
        max_size=8,
    )
    .filter(lambda part: part not in (".", ".."))
    .map(lambda part: "d/" + part)
)
_digest = st.sampled_from(["", SHA_A, SHA_B])
_time = st.sampled_from(["", "2023-11-14T22:13:20.5Z", "0001-01-01T00:00:00Z"])
_valid_entries = st.builds(
    TocEntry,
    type=st.sampled_from(["dir", "symlink", "hardlink", "char", "block", "fifo", "reg"]),
    name=_path,
    link_name=_path,
    mode=st.integers(0, 0o7777),
    size=st.just(0),  # files with content need chunks that tile them: tested below
    uid=st.integers(0, 2**32 - 1),
    gid=st.integers(0, 2**32 - 1),
    modtime=_time,
    accesstime=_time,
    changetime=_time,
    dev_major=st.integers(0, 4095),
    dev_minor=st.integers(0, 2**20 - 1),
    xattrs=st.dictionaries(
        st.text(
            st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
            min_size=1,
            max_size=12,
        ),
        st.binary(max_size=8),
        max_size=3,
    ),
    digest=_digest,
    offset=st.integers(0, 2**63 - 1),
    end_offset=st.integers(0, 2**63 - 1),
    chunk_size=st.integers(0, 2**63 - 1),
    chunk_offset=st.integers(0, 2**63 - 1),
    chunk_digest=_digest,
    chunk_type=st.sampled_from(["", "zeros"]),
    verity=_digest,
    chunk_verity=_digest,
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_valid_entries, max_size=5), st.sampled_from(["", SHA_C]))
def test_parse_round_trip(entries: list[TocEntry], tar_split_digest: str) -> None:
    toc = Toc(tuple(entries), tar_split_digest)
    data = toc.to_json()
    assert Toc.parse(data) == toc
    assert not any(char in data for char in b"<>&")
    data.decode("utf-8")  # strict: Go only writes valid UTF-8
    assert Toc(Toc.parse(data).entries, tar_split_digest).to_json() == data


@settings(max_examples=150, deadline=None)
@given(st.lists(_entries, max_size=5), _text)
def test_any_entries_round_trip_or_are_refused_in_one_line(
    entries: list[TocEntry], tar_split_digest: str
) -> None:
    toc = Toc(tuple(entries), tar_split_digest)
    try:
        parsed = Toc.parse(toc.to_json())
    except TocError as exc:
        assert "\n" not in str(exc)
        return
    assert parsed == toc


def test_parse_accepts_go_nulls_and_unknown_fields() -> None:
    data = toc_bytes(
        {"type": "reg", "name": "a", "size": None, "xattrs": None, "digest": None, "extra": [1]},
        tarSplitDigest=None,
        somethingNew={"x": 1},
    )
    toc = Toc.parse(data)
    assert toc.entries == (TocEntry("reg", "a"),)
    assert toc.tar_split_digest == ""


def test_parse_reads_upstream_style_entries() -> None:
    data = (
        b'{"version":1,"entries":[{"type":"dir","name":"etc/","mode":493,'
        b'"modtime":"2023-11-14T22:13:20Z"},{"type":"reg","name":"etc/big","mode":420,'
        b'"size":30,"digest":"' + SHA_A.encode() + b'","offset":100,"endOffset":300,'
        b'"chunkSize":10,"chunkDigest":"' + SHA_B.encode() + b'"},{"type":"chunk",'
        b'"name":"etc/big","offset":150,"chunkSize":20,"chunkOffset":10,"chunkType":"zeros"}],'
        b'"tarSplitDigest":"' + SHA_C.encode() + b'"}'
    )
    toc = Toc.parse(data)
    assert toc.tar_split_digest == SHA_C
    d, reg, chunk = toc.entries
    assert (d.type, d.name, d.mode, d.modtime) == ("dir", "etc/", 0o755, "2023-11-14T22:13:20Z")
    assert (reg.size, reg.offset, reg.end_offset, reg.chunk_size) == (30, 100, 300, 10)
    assert (chunk.offset, chunk.end_offset, chunk.chunk_offset) == (150, 0, 10)
    assert chunk.chunk_type == "zeros"


# --- malformed TOCs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{",
        b"\xff\xfe\x00",
        b"not json",
        b"[]",
        b"1",
        b"null",
        b'"toc"',
        b'{"version":1}',
        b'{"version":1,"entries":{}}',
        b'{"version":1,"entries":null}',
        b'{"entries":[]}',
        b'{"version":2,"entries":[]}',
        b'{"version":0,"entries":[]}',
        b'{"version":"1","entries":[]}',
        b'{"version":null,"entries":[]}',
        b'{"version":1,"entries":[],"tarSplitDigest":5}',
        b'{"version":1,"entries":[1]}',
        b'{"version":1,"entries":[null]}',
        b'{"version":1,"entries":[["reg","a"]]}',
        b'{"version":1,"entries":[{"name":"a"}]}',
        b'{"version":1,"entries":[{"type":"socket","name":"a"}]}',
        b'{"version":1,"entries":[{"type":"REG","name":"a"}]}',
        b'{"version":1,"entries":[{"type":5,"name":"a"}]}',
        b'{"version":1,"entries":[{"type":"reg","name":5}]}',
        b'{"version":1,"entries":[{"type":"reg","name":"a","linkName":[]}]}',
        b'{"version":1,"entries":[{"type":"reg","name":"a","size":"5"}]}',
        b'{"version":1,"entries":[{"type":"reg","name":"a","size":1.5}]}',
        b'{"version":1,"entries":[{"type":"reg","name":"a","size":1.0}]}',
        b'{"version":1,"entries":[{"type":"reg","name":"a","mode":true}]}',
        b'{"version":1,"entries":[{"type":"reg","name":"a","offset":{}}]}',
        b'{"version":1,"entries":[{"type":"reg","name":"a","modtime":0}]}',
        b'{"version":1,"entries":[{"type":"reg","name":"a","xattrs":[]}]}',
        b'{"version":1,"entries":[{"type":"reg","name":"a","xattrs":"x"}]}',
        b'{"version":1,"entries":[{"type":"reg","name":"a","xattrs":{"k":"!!!!"}}]}',
        b'{"version":1,"entries":[{"type":"reg","name":"a","xattrs":{"k":"QQ"}}]}',
        b'{"version":1,"entries":[{"type":"reg","name":"a","chunkType":false}]}',
    ],
)
def test_malformed_toc_raises_toc_error(data: bytes) -> None:
    with pytest.raises(TocError):
        Toc.parse(data)


@pytest.mark.parametrize("version", [b"true", b"1.0"])
def test_version_must_be_the_integer_one(version: bytes) -> None:
    with pytest.raises(TocError):
        Toc.parse(b'{"version":' + version + b',"entries":[]}')


@pytest.mark.parametrize("value", [b"null", b"1234", b"true"])
def test_non_string_xattr_value_rejected(value: bytes) -> None:
    data = b'{"version":1,"entries":[{"type":"reg","name":"a","xattrs":{"user.k":' + value + b"}}]}"
    with pytest.raises(TocError):
        Toc.parse(data)


def test_deeply_nested_json_is_toc_error() -> None:
    with pytest.raises(TocError):
        Toc.parse(b'{"version":1,"entries":[' + b"[" * 100_000 + b"]" * 100_000 + b"]}")


# --- footer, skippable frames, positions --------------------------------------------------------


def test_footer_round_trip_and_layout() -> None:
    footer = Footer(BlobSection(1000, 200, 5000), BlobSection(1208, 300, 9000))
    data = footer.to_bytes()
    assert len(data) == FOOTER_BYTES == 64
    assert data.endswith(FOOTER_MAGIC) and FOOTER_MAGIC == b"GNUlInUx"
    assert struct.unpack("<7Q", data[:56]) == (1000, 200, 5000, 1, 1208, 300, 9000)
    assert Footer.parse(data) == footer


def test_footer_round_trip_large_values() -> None:
    big = 2**64 - 1
    footer = Footer(BlobSection(big, big, big), BlobSection(0, 0, 0))
    assert Footer.parse(footer.to_bytes()) == footer


def test_legacy_footer_parses_without_tar_split() -> None:
    data = struct.pack("<4Q", 77, 66, 555, 1) + LEGACY_FOOTER_MAGIC
    assert len(data) == LEGACY_FOOTER_BYTES == 40
    footer = Footer.parse(data)
    assert footer.toc == BlobSection(77, 66, 555)
    assert footer.tar_split == BlobSection(0, 0, 0)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        bytes(64),
        struct.pack("<7Q", 1, 2, 3, 1, 4, 5, 6) + b"GNUlInUX",
        struct.pack("<7Q", 1, 2, 3, 1, 4, 5, 6) + LEGACY_FOOTER_MAGIC,  # legacy magic, new size
        struct.pack("<4Q", 1, 2, 3, 1) + FOOTER_MAGIC,  # new magic, legacy size
        struct.pack("<7Q", 1, 2, 3, 2, 4, 5, 6) + FOOTER_MAGIC,  # manifest type 2
        struct.pack("<7Q", 1, 2, 3, 0, 4, 5, 6) + FOOTER_MAGIC,
        b"\0" + struct.pack("<7Q", 1, 2, 3, 1, 4, 5, 6) + FOOTER_MAGIC,  # 65 bytes
        (struct.pack("<7Q", 1, 2, 3, 1, 4, 5, 6) + FOOTER_MAGIC)[1:],  # 63 bytes
    ],
)
def test_bad_footer_raises_toc_error(data: bytes) -> None:
    with pytest.raises(TocError):
        Footer.parse(data)


def test_legacy_footer_with_wrong_manifest_type_rejected() -> None:
    with pytest.raises(TocError):
        Footer.parse(struct.pack("<4Q", 1, 2, 3, 7) + LEGACY_FOOTER_MAGIC)


def test_skippable_frame() -> None:
    assert skippable_frame(b"abc") == b"\x50\x2a\x4d\x18\x03\x00\x00\x00abc"
    assert skippable_frame(b"") == SKIPPABLE_FRAME_MAGIC + bytes(4)


def test_toc_position_round_trip() -> None:
    section = BlobSection(123, 45, 6789)
    assert format_toc_position(section) == "123:45:6789:1"
    assert parse_toc_position("123:45:6789:1") == section
    assert parse_toc_position(format_toc_position(section)) == section
    assert section.end == 168
    assert format_tarsplit_position(section) == "123:45:6789"


@pytest.mark.parametrize(
    "value",
    [
        "",
        "1:2:3",
        "1:2:3:2",
        "1:2:3:0",
        "1:2:3:1:0",
        "a:2:3:1",
        "1:2:x:1",
        "-1:2:3:1",
        "1:-2:3:1",
        "1.5:2:3:1",
        "1::3:1",
        ":::",
        "1,2,3,1",
    ],
)
def test_parse_toc_position_errors(value: str) -> None:
    with pytest.raises(TocError):
        parse_toc_position(value)


# --- file_chunks: tiling ------------------------------------------------------------------------


def reg(size: int, offset: int = 100, end: int = 400, **fields: object) -> TocEntry:
    return TocEntry("reg", "f", size=size, offset=offset, end_offset=end, **fields)  # type: ignore[arg-type]


def chunk(offset: int, chunk_offset: int, chunk_size: int = 0, **fields: object) -> TocEntry:
    return TocEntry(
        "chunk",
        "f",
        offset=offset,
        chunk_offset=chunk_offset,
        chunk_size=chunk_size,
        **fields,  # type: ignore[arg-type]
    )


def test_single_chunk_file() -> None:
    head = reg(42, 100, 130, digest=SHA_A, verity=SHA_C)
    assert file_chunks([head]) == [ChunkRef(0, 42, 100, 130, SHA_A, SHA_C)]


def test_single_chunk_file_prefers_chunk_fields() -> None:
    head = reg(42, 100, 130, digest=SHA_A, verity=SHA_C, chunk_digest=SHA_B, chunk_verity=SHA_D)
    assert file_chunks((head,)) == [ChunkRef(0, 42, 100, 130, SHA_B, SHA_D)]


def test_empty_file_has_no_chunks() -> None:
    assert file_chunks([reg(0, 0, 0)]) == []


def test_multi_chunk_file_upstream_layout() -> None:
    entries = [
        reg(30, 100, 400, chunk_size=10, chunk_digest=SHA_A, chunk_verity=SHA_C),
        chunk(200, 10, 12, chunk_digest=SHA_B, chunk_type="zeros"),
        chunk(250, 22, 8, chunk_digest=SHA_D),
    ]
    assert file_chunks(entries) == [
        ChunkRef(0, 10, 100, 200, SHA_A, SHA_C, False),
        ChunkRef(10, 12, 200, 250, SHA_B, "", True),
        ChunkRef(22, 8, 250, 400, SHA_D, "", False),
    ]


def test_chunk_sizes_implied_by_next_chunk_offset() -> None:
    entries = [reg(30, 100, 400), chunk(200, 10), chunk(250, 25)]
    assert [(c.file_offset, c.size) for c in file_chunks(entries)] == [(0, 10), (10, 15), (25, 5)]


@pytest.mark.parametrize(
    "entries",
    [
        pytest.param([reg(30, chunk_size=10), chunk(200, 12, 18)], id="gap"),
        pytest.param([reg(30, chunk_size=10), chunk(200, 8, 22)], id="overlap"),
        pytest.param([reg(30, chunk_size=10), chunk(200, 10, 10)], id="short"),
        pytest.param([reg(30, chunk_size=10), chunk(200, 10, 30)], id="long"),
        pytest.param([reg(30, chunk_offset=5, chunk_size=10), chunk(200, 15, 15)], id="late-start"),
        pytest.param([reg(30), chunk(200, 0)], id="zero-size-chunk"),
        pytest.param([reg(30, chunk_size=10), chunk(100, 10, 20)], id="empty-byte-range"),
        pytest.param([reg(30, chunk_size=10), chunk(450, 10, 20)], id="past-end-offset"),
        pytest.param([reg(30, 300, chunk_size=10), chunk(200, 10, 20)], id="backwards"),
    ],
)
def test_chunks_must_tile_the_file(entries: list[TocEntry]) -> None:
    with pytest.raises(TocError):
        file_chunks(entries)


def test_zeros_chunk_may_have_empty_byte_range() -> None:
    entries = [reg(30, chunk_size=10), chunk(200, 10, 10, chunk_type="zeros"), chunk(200, 20, 10)]
    chunks = file_chunks(entries)
    assert [c.zeros for c in chunks] == [False, True, False]
    assert (chunks[1].blob_offset, chunks[1].blob_end) == (200, 200)


@pytest.mark.parametrize(
    "head",
    [reg(10, 100, 100), reg(10, 100, 50), reg(-5, 100, 200)],
    ids=["empty-range", "negative-range", "negative-size"],
)
def test_single_chunk_file_is_checked(head: TocEntry) -> None:
    with pytest.raises(TocError):
        file_chunks([head])


def test_with_chunk_fields() -> None:
    ref = ChunkRef(10, 20, 300, 350, SHA_A, SHA_B, True)
    entry = with_chunk_fields(TocEntry("chunk", "f"), ref, "zeros")
    assert entry == TocEntry(
        "chunk",
        "f",
        offset=300,
        chunk_size=20,
        chunk_offset=10,
        chunk_digest=SHA_A,
        chunk_type="zeros",
        chunk_verity=SHA_B,
    )
    assert entry.end_offset == 0


# --- group_file_entries -------------------------------------------------------------------------


def test_group_file_entries() -> None:
    d = TocEntry("dir", "d")
    a = TocEntry("reg", "d/a", size=30)
    a1, a2 = TocEntry("chunk", "d/a"), TocEntry("chunk", "d/a", chunk_offset=9)
    b = TocEntry("reg", "d/b")
    s = TocEntry("symlink", "d/s", link_name="b")
    groups = list(group_file_entries((d, a, a1, a2, b, s)))
    assert groups == [[d], [a, a1, a2], [b], [s]]
    assert list(group_file_entries(())) == []


@pytest.mark.parametrize(
    "entries",
    [
        pytest.param((TocEntry("chunk", "a"),), id="chunk-first"),
        pytest.param((TocEntry("reg", "a"), TocEntry("chunk", "b")), id="other-name"),
        pytest.param((TocEntry("dir", "a"), TocEntry("chunk", "a")), id="after-dir"),
        pytest.param((TocEntry("hardlink", "a"), TocEntry("chunk", "a")), id="after-hardlink"),
        pytest.param(
            (TocEntry("reg", "a"), TocEntry("reg", "b"), TocEntry("chunk", "a")),
            id="not-adjacent",
        ),
    ],
)
def test_chunk_entry_without_its_reg_raises(entries: tuple[TocEntry, ...]) -> None:
    with pytest.raises(TocError):
        list(group_file_entries(entries))


def test_base64_of_xattrs_matches_standard_padding() -> None:
    values = [b"", b"a", b"ab", b"abc", bytes(range(256))]
    entry = TocEntry("dir", "d", xattrs={f"user.{i}": v for i, v in enumerate(values)})
    parsed = json.loads(Toc((entry,)).to_json())["entries"][0]["xattrs"]
    assert parsed == {
        f"user.{i}": base64.standard_b64encode(v).decode() for i, v in enumerate(values)
    }


def test_parsed_entries_are_the_dataclass_s_own() -> None:
    """Parsing builds entries without TocEntry's __init__ (speed): they must be the same
    values, equal, frozen, and ``replace`` must work on them."""
    made = [
        TocEntry(type="dir", name="d", mode=0o755, modtime="2023-01-02T03:04:05Z"),
        TocEntry(type="reg", name="d/f", size=3, offset=10, end_offset=20, xattrs={"user.a": b"1"}),
        TocEntry(type="symlink", name="l", link_name="d/f"),
    ]
    parsed = Toc.parse(Toc(tuple(made)).to_json()).entries
    assert parsed == tuple(made)
    assert parsed[0].xattrs == {} and parsed[0].xattrs is not parsed[2].xattrs
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed[0].name = "x"  # type: ignore[misc]
    assert dataclasses.replace(parsed[1], size=4) == dataclasses.replace(made[1], size=4)
    assert file_chunks([parsed[1]]) == file_chunks([made[1]])


@pytest.mark.parametrize("xattrs", [{}, {"user.b": b"\x00<&>", "security.a": b"x"}])
def test_a_writers_fast_entries_are_the_dataclass_ones_and_encode_alike(
    xattrs: dict[str, bytes],
) -> None:
    values: dict[str, Any] = dict(type="reg", name="d/f<\u2028>\udcff", mode=0o644, size=5, uid=1,
                  modtime="2024-01-01T00:00:00Z", xattrs=xattrs, digest=SHA_A, offset=3,
                  end_offset=9, chunk_verity=SHA_B)  # fmt: skip
    fast, slow = trusted_entry(dict(values)), TocEntry(**values)
    assert fast == slow
    assert trusted_entry({"type": "dir", "name": "d"}).xattrs == {}
    assert Toc((fast,), SHA_C).to_json() == Toc((slow,), SHA_C).to_json()
    ref = chunk_ref(0, 5, 3, 9, SHA_A, SHA_B, False, 0, 0)
    assert ref == ChunkRef(0, 5, 3, 9, SHA_A, SHA_B)
