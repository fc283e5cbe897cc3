"""lazyfs.formats.chunked.writer: tar -> zstd:chunked blob, checked against the tar it came from."""

from __future__ import annotations

import hashlib
import io
import random
import struct
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import require_tool

from lazyfs.config import ChunkingConfig
from lazyfs.errors import CacheError, LayoutError, TocError
from lazyfs.formats.chunked.tarsplit import parse_tar_split, reassemble_tar
from lazyfs.formats.chunked.toc import (
    FOOTER_BYTES,
    SKIPPABLE_FRAME_MAGIC,
    TARSPLIT_POSITION_ANNOTATION,
    TOC_CHECKSUM_ANNOTATION,
    TOC_POSITION_ANNOTATION,
    VERITY_ANNOTATION,
    VERITY_ANNOTATION_VALUE,
    BlobSection,
    Footer,
    Toc,
    TocEntry,
    file_chunks,
    format_tarsplit_position,
    format_toc_position,
    group_file_entries,
)
from lazyfs.formats.chunked.writer import ChunkedLayer, LayerStats, write_chunked_layer
from lazyfs.model.digest import Digest
from lazyfs.model.verity import format_verity, fsverity_digest
from lazyfs.mount.tree import build_tree

# Small chunks, so that files of tens of KiB are split into many chunks.
SMALL = ChunkingConfig(min_chunk_bytes=1024, avg_chunk_bytes=4096, max_chunk_bytes=16384)
MTIME = 1_700_000_000
NON_UTF8_NAME = "d/caf\udce9"  # b"d/caf\xe9" through surrogateescape
LONG_NAME = "d/" + "long" * 40 + ".txt"
CAPABILITY = bytes.fromhex("0100000200200000000000000000000000000000")

_rng = random.Random(7)
RANDOM_DATA = _rng.randbytes(70_000)
MIXED_DATA = _rng.randbytes(20_000) + bytes(50_000) + _rng.randbytes(20_000)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def verity(data: bytes) -> str:
    return format_verity(fsverity_digest(data))


def zstd_decompress(data: bytes) -> bytes:
    """Every frame of ``data``, skippable frames skipped, like any zstd reader."""
    return zstandard.ZstdDecompressor().decompressobj(read_across_frames=True).decompress(data)


# --- building tars ------------------------------------------------------------------------------


def member(name: str, kind: bytes = tarfile.REGTYPE, **attrs: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mtime = MTIME
    info.mode = 0o644
    info.uname = info.gname = ""
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


Items = Sequence[tuple[tarfile.TarInfo, bytes | None]]


def tar_of(items: Items, tar_format: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tar_format) as tar:
        for info, data in items:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def feature_items(tar_format: int) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    pax = tar_format == tarfile.PAX_FORMAT
    items: list[tuple[tarfile.TarInfo, bytes | None]] = [
        (member("d", tarfile.DIRTYPE, mode=0o750, uid=1, gid=2), None),
        (member("d/empty"), b""),
        (member("d/one", mode=0o4755, uid=1000, gid=100), b"x"),
        (member("d/block"), b"b" * 512),
        (member("d/big"), RANDOM_DATA),
        (member("d/copy", mode=0o600), RANDOM_DATA),
        (member("d/zeros"), bytes(40_000)),
        (member("d/mixed"), MIXED_DATA),
        (member("d/small-zeros"), bytes(100)),
        (member("d/bigid", uid=3_000_000, gid=4_000_000), b"ids beyond 8**7"),
        (member("d/old", mtime=-86_400 * 365), b"before 1970"),
        (member(LONG_NAME), b"long name"),
        (member(NON_UTF8_NAME), b"latin-1 name"),
        (member("d/a<b>&c\u00e9"), b"escaped name"),
        (member("d/link", tarfile.SYMTYPE, mode=0o777, linkname="one"), None),
        (member("d/hard", tarfile.LNKTYPE, linkname="d/one"), None),
        (member("dev", tarfile.DIRTYPE, mode=0o755), None),
        (member("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3), None),
        (member("dev/sda", tarfile.BLKTYPE, mode=0o660, devmajor=8, devminor=0), None),
        (member("d/fifo", tarfile.FIFOTYPE), None),
    ]
    if pax:
        xattrs = {
            "SCHILY.xattr.user.bin": "\x00\udcff",  # raw bytes 00 ff (hdrcharset=BINARY)
            "SCHILY.xattr.security.capability": CAPABILITY.decode("utf-8", "surrogateescape"),
        }
        times = {
            "mtime": "1700000000.123456789",
            "atime": "1700000001.5",
            "ctime": "1700000002",
        }
        items += [
            (member("d/xattrs", pax_headers=xattrs), b"has xattrs"),
            (member("d/xdir", tarfile.DIRTYPE, pax_headers={"SCHILY.xattr.user.d": "v"}), None),
            (member("d/nanos", pax_headers=times), b"fractional mtime"),
            (member("d/neg", pax_headers={"mtime": "-1.5"}), b"negative fraction"),
        ]
    return items


@dataclass(frozen=True)
class Converted:
    tar: bytes
    blob: bytes
    layer: ChunkedLayer
    members: list[tarfile.TarInfo]
    blob_path: Path
    progress: list[int]


def convert(
    tar: bytes, work: Path, config: ChunkingConfig = SMALL, name: str = "layer"
) -> Converted:
    tar_path, blob_path = work / f"{name}.tar", work / f"{name}.zst"
    tar_path.write_bytes(tar)
    progress: list[int] = []
    layer = write_chunked_layer(tar_path, blob_path, config, on_progress=progress.append)
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        members = archive.getmembers()
    return Converted(tar, blob_path.read_bytes(), layer, members, blob_path, progress)


def convert_bytes(tar: bytes, config: ChunkingConfig = SMALL) -> Converted:
    with tempfile.TemporaryDirectory() as work:
        return convert(tar, Path(work), config)


@pytest.fixture(scope="module", params=[tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def converted(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Converted:
    tar_format: int = request.param
    work = tmp_path_factory.mktemp("writer")
    return convert(tar_of(feature_items(tar_format), tar_format), work)


def groups(layer: ChunkedLayer) -> list[list[TocEntry]]:
    return list(group_file_entries(layer.toc.entries))


def payload(conv: Converted, info: tarfile.TarInfo) -> bytes:
    return conv.tar[info.offset_data : info.offset_data + info.size] if info.isreg() else b""


def toc_name(info: tarfile.TarInfo) -> str:
    return info.name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def paired(conv: Converted) -> list[tuple[tarfile.TarInfo, list[TocEntry]]]:
    """Each member with its TOC group, matched by name (the TOC order is checked elsewhere)."""
    by_name = {group[0].name: group for group in groups(conv.layer)}
    assert len(by_name) == len(conv.members)
    return [(info, by_name[toc_name(info)]) for info in conv.members]


def reg_groups(conv: Converted) -> Iterator[tuple[tarfile.TarInfo, list[TocEntry], bytes]]:
    for info, group in paired(conv):
        if group[0].type == "reg":
            yield info, group, payload(conv, info)


def frame(blob: bytes, start: int, end: int) -> bytes:
    return zstd_decompress(blob[start:end])


def rebuilt_content(conv: Converted, group: list[TocEntry]) -> bytes:
    return b"".join(frame(conv.blob, c.blob_offset, c.blob_end) for c in file_chunks(group))


# --- the blob is an ordinary zstd stream of the tar ---------------------------------------------


def test_blob_decompresses_to_the_tar(converted: Converted) -> None:
    assert zstd_decompress(converted.blob) == converted.tar


def test_blob_decompresses_with_zstd_cli(converted: Converted) -> None:
    zstd = require_tool("zstd")
    result = subprocess.run([zstd, "-dc", converted.blob_path], capture_output=True, check=True)
    assert result.stdout == converted.tar


def test_digests_and_size(converted: Converted) -> None:
    layer = converted.layer
    assert layer.diff_id == Digest("sha256", hashlib.sha256(converted.tar).hexdigest())
    assert layer.digest == Digest("sha256", hashlib.sha256(converted.blob).hexdigest())
    assert layer.size == len(converted.blob)


def test_diff_id_given_is_used(tmp_path: Path) -> None:
    tar_path = tmp_path / "l.tar"
    tar_path.write_bytes(tar_of([(member("f"), b"data")], tarfile.PAX_FORMAT))
    given_id = Digest("sha256", "0" * 64)
    layer = write_chunked_layer(tar_path, tmp_path / "l.zst", SMALL, diff_id=given_id)
    assert layer.diff_id == given_id


def test_progress_is_monotonic_and_complete(converted: Converted) -> None:
    assert converted.progress
    assert converted.progress == sorted(converted.progress)
    assert converted.progress[-1] == len(converted.tar)


# --- TOC entries --------------------------------------------------------------------------------


def expected_modtime(info: tarfile.TarInfo) -> str:
    exact = {
        "1700000000.123456789": "2023-11-14T22:13:20.123456789Z",
        "-1.5": "1969-12-31T23:59:58.5Z",
    }
    if "mtime" in info.pax_headers and info.pax_headers["mtime"] in exact:
        return exact[info.pax_headers["mtime"]]
    stamp = datetime.fromtimestamp(int(info.mtime), UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_one_entry_per_member(converted: Converted) -> None:
    types = {
        tarfile.REGTYPE: "reg",
        tarfile.DIRTYPE: "dir",
        tarfile.SYMTYPE: "symlink",
        tarfile.LNKTYPE: "hardlink",
        tarfile.CHRTYPE: "char",
        tarfile.BLKTYPE: "block",
        tarfile.FIFOTYPE: "fifo",
    }
    assert len(groups(converted.layer)) == len(converted.members)
    for info, (head, *_chunks) in paired(converted):
        assert head.type == types[info.type], info.name
        assert head.mode == info.mode
        assert (head.uid, head.gid) == (info.uid, info.gid)
        assert head.size == (info.size if info.isreg() else 0)
        assert head.link_name == (info.linkname if info.issym() or info.islnk() else "")
        device = (info.devmajor, info.devminor) if info.ischr() or info.isblk() else (0, 0)
        assert (head.dev_major, head.dev_minor) == device
        assert head.modtime == expected_modtime(info), info.name


def test_toc_entries_follow_tar_order(converted: Converted) -> None:
    heads = [group[0].name for group in groups(converted.layer)]
    assert heads == [toc_name(info) for info in converted.members]


def test_repeated_path_later_member_wins_in_tree() -> None:
    tar = tar_of(
        [(member("x"), b"old data"), (member("x", tarfile.SYMTYPE, linkname="y"), None)],
        tarfile.PAX_FORMAT,
    )
    tree = build_tree([convert_bytes(tar).layer.toc.entries])
    node = tree.lookup(tree.root.inode, b"x")
    assert node is not None and node.kind == "symlink"


def entry_named(layer: ChunkedLayer, name: str) -> TocEntry:
    (found,) = [e for e in layer.toc.entries if e.name == name and e.type != "chunk"]
    return found


def test_specific_entries(converted: Converted) -> None:
    layer = converted.layer
    assert entry_named(layer, "d").mode == 0o750
    one = entry_named(layer, "d/one")
    assert (one.mode, one.uid, one.gid, one.size) == (0o4755, 1000, 100, 1)
    assert entry_named(layer, "d/bigid").uid == 3_000_000
    assert entry_named(layer, "d/hard").link_name == "d/one"
    assert entry_named(layer, "d/link").link_name == "one"
    null = entry_named(layer, "dev/null")
    assert (null.type, null.dev_major, null.dev_minor) == ("char", 1, 3)
    assert entry_named(layer, "d/old").modtime == "1969-01-01T00:00:00Z"
    assert entry_named(layer, "d/caf\ufffd").size == len(b"latin-1 name")
    assert entry_named(layer, "d/a<b>&c\u00e9").size == len(b"escaped name")
    assert entry_named(layer, LONG_NAME).size == len(b"long name")
    for entry in layer.toc.entries:
        if entry.type not in ("reg", "chunk"):
            assert (entry.digest, entry.verity, entry.offset, entry.end_offset) == ("", "", 0, 0)


def test_pax_xattrs_and_times() -> None:
    conv = convert_bytes(tar_of(feature_items(tarfile.PAX_FORMAT), tarfile.PAX_FORMAT))
    xattrs = entry_named(conv.layer, "d/xattrs")
    assert xattrs.xattrs == {"user.bin": b"\x00\xff", "security.capability": CAPABILITY}
    assert entry_named(conv.layer, "d/xdir").xattrs == {"user.d": b"v"}
    nanos = entry_named(conv.layer, "d/nanos")
    assert nanos.modtime == "2023-11-14T22:13:20.123456789Z"
    assert nanos.accesstime == "2023-11-14T22:13:21.5Z"
    assert nanos.changetime == "2023-11-14T22:13:22Z"
    assert entry_named(conv.layer, "d/neg").modtime == "1969-12-31T23:59:58.5Z"
    assert entry_named(conv.layer, "d/one").accesstime == ""
    assert entry_named(conv.layer, "d/one").xattrs == {}


@pytest.mark.parametrize(
    ("pax_mtime", "expected"),
    [
        ("1700000000", "2023-11-14T22:13:20Z"),
        ("1700000000.5", "2023-11-14T22:13:20.5Z"),
        ("1700000000.000000001", "2023-11-14T22:13:20.000000001Z"),
        ("1700000000.100", "2023-11-14T22:13:20.1Z"),
        ("0", "1970-01-01T00:00:00Z"),
        ("-0.25", "1969-12-31T23:59:59.75Z"),
    ],
)
def test_pax_mtime_formatting(pax_mtime: str, expected: str) -> None:
    tar = tar_of([(member("f", pax_headers={"mtime": pax_mtime}), b"x")], tarfile.PAX_FORMAT)
    assert convert_bytes(tar).layer.toc.entries[0].modtime == expected


def test_reg_digest_and_verity(converted: Converted) -> None:
    seen = 0
    for _info, group, data in reg_groups(converted):
        head = group[0]
        if data:
            assert head.digest == sha256(data)
            assert head.verity == verity(data)
            seen += 1
        else:  # upstream: digest is empty for empty files; nothing to fetch
            assert (head.digest, head.offset, head.end_offset, len(group)) == ("", 0, 0, 1)
    assert seen >= 10


def test_chunk_frames_decompress_to_their_bytes(converted: Converted) -> None:
    for _info, group, data in reg_groups(converted):
        assert rebuilt_content(converted, group) == data
        for chunk in file_chunks(group):
            piece = data[chunk.file_offset : chunk.file_offset + chunk.size]
            assert frame(converted.blob, chunk.blob_offset, chunk.blob_end) == piece
            assert chunk.sha256 == sha256(piece)
            assert chunk.verity == verity(piece)


def test_multi_chunk_upstream_layout(converted: Converted) -> None:
    big = next(g for _i, g, _d in reg_groups(converted) if g[0].name == "d/big")
    assert len(big) > 2
    head, chunks = big[0], big[1:]
    assert head.type == "reg" and head.chunk_offset == 0 and head.chunk_size > 0
    assert head.chunk_digest and head.chunk_verity
    assert head.offset < chunks[0].offset
    for entry in chunks:
        assert entry.type == "chunk" and entry.name == "d/big"
        assert entry.end_offset == 0  # a chunk ends where the next one starts
        assert entry.chunk_size > 0 and entry.chunk_digest and entry.chunk_verity
        # only type, name and the chunk fields are set on chunk entries
        assert entry == TocEntry(
            "chunk",
            "d/big",
            offset=entry.offset,
            chunk_size=entry.chunk_size,
            chunk_offset=entry.chunk_offset,
            chunk_digest=entry.chunk_digest,
            chunk_type=entry.chunk_type,
            chunk_verity=entry.chunk_verity,
        )
    offsets = [e.offset for e in big]
    assert offsets == sorted(set(offsets))
    assert head.end_offset > offsets[-1]
    assert sum(e.chunk_size for e in big) == head.size


def test_single_chunk_file_layout(converted: Converted) -> None:
    one = next(g for _i, g, _d in reg_groups(converted) if g[0].name == "d/one")
    assert len(one) == 1
    head = one[0]
    assert head.end_offset > head.offset > 0
    assert (head.chunk_size, head.chunk_offset, head.chunk_digest) == (0, 0, "")
    assert head.chunk_verity == head.verity == verity(b"x")


def test_all_zero_chunks_are_typed_zeros(converted: Converted) -> None:
    kinds: dict[str, set[str]] = {}
    for _info, group, data in reg_groups(converted):
        if len(group) == 1:
            continue
        for entry, chunk in zip(group, file_chunks(group), strict=True):
            piece = data[chunk.file_offset : chunk.file_offset + chunk.size]
            is_zero = piece == bytes(len(piece))
            assert entry.chunk_type == ("zeros" if is_zero else ""), entry.name
            assert chunk.zeros == is_zero
            kinds.setdefault(group[0].name, set()).add(entry.chunk_type)
    assert kinds["d/zeros"] == {"zeros"}
    assert kinds["d/mixed"] == {"", "zeros"}
    assert kinds["d/big"] == {""}


def test_frames_before_the_toc_are_exactly_the_tar(converted: Converted) -> None:
    footer = Footer.parse(converted.blob[-FOOTER_BYTES:])
    assert zstd_decompress(converted.blob[: footer.toc.offset - 8]) == converted.tar


# --- footer, TOC and tar-split sections ---------------------------------------------------------


def test_footer_points_at_toc_and_tar_split(converted: Converted) -> None:
    blob, layer = converted.blob, converted.layer
    assert blob[-72:-64] == SKIPPABLE_FRAME_MAGIC + struct.pack("<I", 64)
    footer = Footer.parse(blob[-FOOTER_BYTES:])
    toc, split = footer.toc, footer.tar_split
    for section in (toc, split):
        header = SKIPPABLE_FRAME_MAGIC + struct.pack("<I", section.length)
        assert blob[section.offset - 8 : section.offset] == header
    assert split.offset == toc.end + 8 and split.end + 8 + 64 == len(blob)
    toc_json = zstd_decompress(blob[toc.offset : toc.end])
    assert len(toc_json) == toc.uncompressed_length
    assert toc_json == layer.toc.to_json()
    assert Toc.parse(toc_json) == layer.toc
    split_compressed = blob[split.offset : split.end]
    assert len(zstd_decompress(split_compressed)) == split.uncompressed_length
    assert layer.toc.tar_split_digest == sha256(split_compressed)


def test_annotations(converted: Converted) -> None:
    blob, annotations = converted.blob, converted.layer.annotations
    footer = Footer.parse(blob[-FOOTER_BYTES:])
    assert annotations == {
        TOC_CHECKSUM_ANNOTATION: sha256(blob[footer.toc.offset : footer.toc.end]),
        TOC_POSITION_ANNOTATION: format_toc_position(footer.toc),
        TARSPLIT_POSITION_ANNOTATION: format_tarsplit_position(footer.tar_split),
        VERITY_ANNOTATION: VERITY_ANNOTATION_VALUE,
    }


def reassemble_from_blob(conv: Converted) -> bytes:
    """The tar rebuilt from the tar-split and the file chunks the TOC points at."""
    footer = Footer.parse(conv.blob[-FOOTER_BYTES:])
    section: BlobSection = footer.tar_split
    split = parse_tar_split(zstd_decompress(conv.blob[section.offset : section.end]))
    files = iter(g for g in groups(conv.layer) if g[0].type == "reg" and g[0].size)

    def read_file(name: bytes, size: int) -> bytes:
        group = next(files)
        assert group[0].name == name.decode("utf-8", "replace")
        assert group[0].size == size
        return rebuilt_content(conv, group)

    rebuilt = b"".join(reassemble_tar(split, read_file))
    assert next(files, None) is None
    return rebuilt


def test_tar_split_reassembles_exact_tar(converted: Converted) -> None:
    assert reassemble_from_blob(converted) == converted.tar


def test_tar_split_keeps_raw_names(converted: Converted) -> None:
    section = Footer.parse(converted.blob[-FOOTER_BYTES:]).tar_split
    split = parse_tar_split(zstd_decompress(converted.blob[section.offset : section.end]))
    names = [e.name for e in split if e.kind == "file"]
    assert b"d/caf\xe9" in names
    assert b"d/" in names and b"dev/" in names  # directories keep their trailing slash
    assert LONG_NAME.encode() in names
    assert len(names) == len(converted.members)


# --- reproducibility, stats ---------------------------------------------------------------------


def test_reproducible(converted: Converted, tmp_path: Path) -> None:
    again = convert(converted.tar, tmp_path, name="again")
    assert again.blob == converted.blob
    assert again.layer.toc == converted.layer.toc
    assert again.layer.digest == converted.layer.digest


def test_stats(converted: Converted) -> None:
    stats: LayerStats = converted.layer.stats
    regs = [(g, d) for _i, g, d in reg_groups(converted)]
    all_chunks = [c for g, _d in regs for c in file_chunks(g)]
    assert stats.tar_bytes == len(converted.tar)
    assert stats.file_count == len(regs)
    assert stats.chunk_count == len(all_chunks)
    assert stats.payload_bytes == sum(len(d) for _g, d in regs)
    unique = {c.verity: c.size for c in all_chunks}
    assert stats.unique_payload_bytes == sum(unique.values())
    assert stats.dedup_ratio == stats.payload_bytes / stats.unique_payload_bytes > 1.0


def test_dedup_ratio_of_two_identical_files() -> None:
    tar = tar_of([(member("a"), RANDOM_DATA), (member("b"), RANDOM_DATA)], tarfile.PAX_FORMAT)
    layer = convert_bytes(tar).layer
    stats = layer.stats
    per_file = len(file_chunks(groups(layer)[0]))
    assert per_file > 1
    assert stats.file_count == 2
    assert stats.chunk_count == 2 * per_file
    assert stats.payload_bytes == 2 * len(RANDOM_DATA)
    assert stats.unique_payload_bytes == len(RANDOM_DATA)
    assert stats.dedup_ratio == 2.0


def test_default_chunking_config() -> None:
    data = random.Random(3).randbytes(600_000)
    conv = convert_bytes(tar_of([(member("f"), data)], tarfile.PAX_FORMAT), ChunkingConfig())
    (group,) = groups(conv.layer)
    sizes = [c.size for c in file_chunks(group)]
    assert len(sizes) >= 3 and max(sizes) <= 256 << 10
    assert all(s >= 16 << 10 for s in sizes[:-1])
    assert rebuilt_content(conv, group) == data
    assert zstd_decompress(conv.blob) == conv.tar


# --- edge cases and errors ----------------------------------------------------------------------


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_empty_tar(tar_format: int) -> None:
    conv = convert_bytes(tar_of([], tar_format))
    assert conv.layer.toc.entries == ()
    assert zstd_decompress(conv.blob) == conv.tar
    assert reassemble_from_blob(conv) == conv.tar
    assert conv.layer.stats.file_count == conv.layer.stats.chunk_count == 0
    assert conv.layer.stats.dedup_ratio == 1.0


def test_tar_without_end_blocks_and_with_trailing_bytes() -> None:
    tar = tar_of([(member("f"), b"payload")], tarfile.PAX_FORMAT)
    for variant in (tar[: 1024 + 512], tar + bytes(20_000)):  # no end blocks; extra zeros
        conv = convert_bytes(variant)
        assert zstd_decompress(conv.blob) == variant
        assert reassemble_from_blob(conv) == variant


def test_non_utf8_names_gnu_and_pax() -> None:
    for tar_format in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        tar = tar_of(
            [
                (member("\udcff\udcfe"), b"a"),
                (member("l", tarfile.SYMTYPE, linkname="t\udce9"), None),
            ],
            tar_format,
        )
        conv = convert_bytes(tar)
        assert entry_named(conv.layer, "\ufffd\ufffd").size == 1
        assert entry_named(conv.layer, "l").link_name == "t\ufffd"
        conv.layer.toc.to_json().decode("utf-8")
        assert zstd_decompress(conv.blob) == tar
        assert reassemble_from_blob(conv) == tar


def gnu_sparse_tar(prefix: Items = ()) -> bytes:
    """A GNU tar whose last member has the old GNU sparse type flag 'S'."""
    items = [*prefix, (member("sparse"), b"abc")]
    raw = bytearray(tar_of(items, tarfile.GNU_FORMAT))
    with tarfile.open(fileobj=io.BytesIO(bytes(raw))) as archive:
        header = archive.getmembers()[-1].offset
    raw[header + 156 : header + 157] = b"S"
    raw[header + 148 : header + 156] = b" " * 8
    raw[header + 148 : header + 156] = b"%06o\0 " % sum(raw[header : header + 512])
    return bytes(raw)


def pax_sparse_tar(prefix: Items = ()) -> bytes:
    """A PAX tar whose last member is a GNU sparse 0.1 file."""
    sparse = member("sparse", pax_headers={"GNU.sparse.map": "0,3", "GNU.sparse.size": "10"})
    return tar_of([*prefix, (sparse, b"abc")], tarfile.PAX_FORMAT)


@pytest.mark.parametrize("make", [gnu_sparse_tar, pax_sparse_tar], ids=["gnu", "pax"])
def test_sparse_member_raises(make: Callable[[Items], bytes]) -> None:
    tar = make(())
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        assert archive.getmembers()[-1].issparse()
    with pytest.raises(TocError, match="sparse"):
        convert_bytes(tar)


@pytest.mark.parametrize("make", [gnu_sparse_tar, pax_sparse_tar], ids=["gnu", "pax"])
def test_sparse_member_after_a_file_raises_toc_error(make: Callable[[Items], bytes]) -> None:
    with pytest.raises(TocError):
        convert_bytes(make([(member("before"), b"data")]))


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(random.Random(5).randbytes(3000), id="random"),
        pytest.param(b"hello world\n" * 100, id="text"),
        pytest.param(b"\x28\xb5\x2f\xfd" + bytes(600), id="zstd-magic"),
        pytest.param(bytes(511), id="short-zero-block"),
    ],
)
def test_garbage_input_raises_toc_error(data: bytes) -> None:
    with pytest.raises(TocError):
        convert_bytes(data)


@pytest.mark.parametrize("cut", [600, 5000, 512 + 60_000])
def test_truncated_tar_raises_toc_error(cut: int) -> None:
    tar = tar_of([(member("f"), RANDOM_DATA)], tarfile.GNU_FORMAT)
    with pytest.raises(TocError):
        convert_bytes(tar[:cut])


@pytest.mark.parametrize(
    ("tar_format", "attrs"),
    [
        (tarfile.GNU_FORMAT, {"mtime": 2**40}),
        (tarfile.PAX_FORMAT, {"pax_headers": {"mtime": "1e30"}}),
        (tarfile.PAX_FORMAT, {"pax_headers": {"mtime": "nan"}}),
    ],
    ids=["gnu-base256", "pax-huge", "pax-nan"],
)
def test_unrepresentable_mtime_raises_toc_error(tar_format: int, attrs: dict[str, object]) -> None:
    with pytest.raises(TocError):
        convert_bytes(tar_of([(member("f", tarfile.REGTYPE, **attrs), b"x")], tar_format))


def test_non_utf8_xattr_name() -> None:
    tar = tar_of(
        [(member("f", pax_headers={"SCHILY.xattr.user.QQ": "v"}), b"x")], tarfile.PAX_FORMAT
    ).replace(b"user.QQ", b"user.\xff\xfe")  # same length: the PAX record stays valid
    conv = convert_bytes(tar)
    assert zstd_decompress(conv.blob) == tar
    toc_json = conv.layer.toc.to_json()
    toc_json.decode("utf-8")
    build_tree([Toc.parse(toc_json).entries])


# --- property: any set of files round-trips -----------------------------------------------------

_contents = st.one_of(
    st.binary(max_size=3000),
    st.integers(0, 40_000).map(bytes),
    st.tuples(st.integers(0, 2**32), st.integers(1, 30_000)).map(
        lambda seed_size: random.Random(seed_size[0]).randbytes(seed_size[1])
    ),
)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(_contents, min_size=1, max_size=5),
    st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]),
)
def test_any_files_round_trip(contents: list[bytes], tar_format: int) -> None:
    items: list[tuple[tarfile.TarInfo, bytes | None]] = [
        (member(f"f{i}"), data) for i, data in enumerate(contents)
    ]
    conv = convert_bytes(tar_of(items, tar_format))
    assert zstd_decompress(conv.blob) == conv.tar
    file_groups = groups(conv.layer)
    assert len(file_groups) == len(contents)
    for group, data in zip(file_groups, contents, strict=True):
        assert group[0].size == len(data)
        assert rebuilt_content(conv, group) == data
        if data:
            assert group[0].digest == sha256(data)
            assert group[0].verity == verity(data)
    assert reassemble_from_blob(conv) == conv.tar
    assert conv.layer.stats.payload_bytes == sum(map(len, contents))


# --- local file errors are lazyfs errors ---------------------------------------------------------


def test_unreadable_tar_is_a_layout_error(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="cannot read the layer tar"):
        write_chunked_layer(tmp_path / "missing.tar", tmp_path / "out.zst", SMALL)
    with pytest.raises(LayoutError, match="cannot read the layer tar"):
        write_chunked_layer(tmp_path, tmp_path / "out.zst", SMALL, Digest("sha256", "0" * 64))


def test_unwritable_blob_is_a_cache_error(tmp_path: Path) -> None:
    tar = tmp_path / "layer.tar"
    tar.write_bytes(tar_of(feature_items(tarfile.PAX_FORMAT), tarfile.PAX_FORMAT))
    with pytest.raises(CacheError, match="cannot write the layer blob"):
        write_chunked_layer(tar, tmp_path / "no" / "such" / "dir.zst", SMALL)


def test_toc_encoded_as_files_complete_is_the_tocs_own_json(tmp_path: Path) -> None:
    """The writer encodes TOC entries in groups as members complete; the TOC frame must be
    exactly ``Toc.to_json()`` (many groups here, with names JSON escapes)."""
    items = [
        (member(f"d/{index}<&>\u2028{NON_UTF8_NAME[-4:]}"), RANDOM_DATA[: index * 97])
        for index in range(700)
    ]
    conv = convert(tar_of(items, tarfile.PAX_FORMAT), tmp_path)
    footer = Footer.parse(conv.blob[-FOOTER_BYTES:])
    toc_json = zstd_decompress(conv.blob[footer.toc.offset : footer.toc.end])
    assert len(conv.layer.toc.entries) > 700
    assert toc_json == conv.layer.toc.to_json()


@pytest.mark.parametrize(
    "size", [1, 4095, 4096, 4097, 65_536, 70_000, 4096 * 128, 4096 * 128 + 1, 4096 * 129 + 7]
)
def test_chunk_verity_is_fsverity_digest(size: int) -> None:
    from lazyfs.formats.chunked.frames import verity_digest

    data = (RANDOM_DATA * 10)[:size]
    assert verity_digest(memoryview(data)) == fsverity_digest(data)
