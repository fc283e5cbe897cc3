"""eStargz layers: footer, TOC member, TOC entries, the tree they build, and resolver reads.

Layers come from tests/estargz_build.py, written from the public format description; gzip,
tarfile, the ``gunzip`` CLI and skopeo check them independently of lazyfs's reader.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import itertools
import json
import subprocess
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import anyio
import pytest
from estargz_build import (
    LANDMARK_CONTENTS,
    EstargzLayer,
    build_estargz,
    footer_bytes,
    write_estargz_image,
)
from imagebuild import KIB, MIB, feature_layers, random_bytes, text_bytes
from oracles import require_tool, run_tool, skopeo_copy

from lazyfs.cache.store import ChunkCache
from lazyfs.config import ChunkingConfig, LimitsConfig, ResolverConfig
from lazyfs.convert.imagebuild import (
    Entry,
    directory,
    hardlink,
    layer_tar_bytes,
    regular_file,
    symlink,
    whiteout,
)
from lazyfs.convert.layout import OciLayout
from lazyfs.errors import LazyfsError, TocError
from lazyfs.formats.chunked.toc import ChunkRef, TocEntry, file_chunks, group_file_entries
from lazyfs.formats.chunked.writer import write_chunked_layer
from lazyfs.formats.estargz import (
    FOOTER_BYTES,
    LEGACY_FOOTER_BYTES,
    TOC_DIGEST_ANNOTATION,
    UNCOMPRESSED_SIZE_ANNOTATION,
    Footer,
    parse_footer,
    parse_tail,
    read_toc_member,
    tail_read_size,
    toc_digest,
    toc_entries,
    toc_section,
)
from lazyfs.model.digest import Digest
from lazyfs.model.manifests import OCI_LAYER_TAR_GZIP, Manifest
from lazyfs.model.ranges import ByteRange
from lazyfs.mount.resolver import ChunkResolver, LayerBlob
from lazyfs.mount.tree import LayerChunk, Node, Tree, build_tree

SHA_A = "sha256:" + "a" * 64
SHA_B = "sha256:" + "b" * 64
SHA_C = "sha256:" + "c" * 64


def small_files_layer() -> list[Entry]:
    """Many small files (they share members with a minimum chunk size) and a few large ones."""
    entries: list[Entry] = [directory("etc"), directory("lib"), directory("bin")]
    entries += [
        regular_file(f"etc/conf{i:02d}", text_bytes(300 + 37 * i, seed=i)) for i in range(30)
    ]
    entries += [
        regular_file("lib/big.bin", random_bytes(200 * KIB + 11, seed=7)),
        regular_file("lib/text.txt", text_bytes(300 * KIB, seed=8)),
        regular_file("lib/exact", random_bytes(64 * KIB, seed=9)),  # exactly one chunk
        regular_file("lib/empty"),
        symlink("bin/sh", "/lib/big.bin"),
        hardlink("bin/conf-link", "etc/conf03"),
    ]
    return entries


def toc_json(*entries: dict[str, object]) -> bytes:
    return json.dumps({"version": 1, "entries": list(entries)}).encode()


def member_starts(blob: bytes) -> list[int]:
    """Where each gzip member of ``blob`` starts, found by decompressing member by member."""
    starts: list[int] = []
    position = 0
    while position < len(blob):
        starts.append(position)
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        inflater.decompress(blob[position:])
        assert inflater.eof
        position = len(blob) - len(inflater.unused_data)
    return starts


def layer_entries(layer: EstargzLayer) -> list[TocEntry]:
    footer = parse_tail(layer.blob[-tail_read_size(len(layer.blob)) :])
    section = toc_section(len(layer.blob), footer)
    return toc_entries(read_toc_member(layer.blob[section.start : section.end]), footer.toc_offset)


# ------------------------------------------------------------------------------------- footer


@pytest.mark.parametrize("offset", [0, 1, 0x1234, 10**12, 2**63 - 1])
def test_footer_round_trip(offset: int) -> None:
    footer = footer_bytes(offset)
    assert len(footer) == FOOTER_BYTES
    assert gzip.decompress(footer) == b""  # an empty, valid gzip member
    assert footer[12:16] == b"SG\x16\x00"
    assert footer[16:38] == b"%016xSTARGZ" % offset
    assert parse_footer(footer) == offset
    assert parse_tail(b"padding" + footer) == Footer(offset, FOOTER_BYTES)


def test_legacy_stargz_footer() -> None:
    legacy = footer_bytes(0xABCDEF, legacy=True)
    assert len(legacy) == LEGACY_FOOTER_BYTES
    assert gzip.decompress(legacy) == b""
    assert parse_footer(legacy) == 0xABCDEF
    # Readers fetch the last 51 bytes; a legacy blob's tail ends with its 47-byte footer.
    assert parse_tail(b"\x00" * 4 + legacy) == Footer(0xABCDEF, LEGACY_FOOTER_BYTES)
    assert parse_footer(b"\x00" * 4 + legacy) == 0xABCDEF


def test_footer_of_a_built_layer() -> None:
    layer = build_estargz([regular_file("a", b"x" * 100)])
    assert parse_footer(layer.blob[-FOOTER_BYTES:]) == layer.toc_offset
    legacy = build_estargz([regular_file("a", b"x" * 100)], legacy_footer=True)
    tail = legacy.blob[-tail_read_size(len(legacy.blob)) :]
    footer = parse_tail(tail)
    assert footer == Footer(legacy.toc_offset, LEGACY_FOOTER_BYTES)
    section = toc_section(len(legacy.blob), footer)
    assert read_toc_member(legacy.blob[section.start : section.end]) == legacy.toc_json


def _patched(data: bytes, at: int, value: bytes) -> bytes:
    return data[:at] + value + data[at + len(value) :]


@pytest.mark.parametrize(
    ("footer", "why"),
    [
        pytest.param(footer_bytes(5)[:50], "short", id="short"),
        pytest.param(footer_bytes(5) + b"\x00", "long", id="long"),
        pytest.param(_patched(footer_bytes(5), 0, b"\x1f\x8c"), "magic", id="gzip-magic"),
        pytest.param(_patched(footer_bytes(5), 3, b"\x00"), "no-fextra", id="no-fextra"),
        pytest.param(_patched(footer_bytes(5), 3, b"\x0c"), "fname", id="fname-flag"),
        pytest.param(_patched(footer_bytes(5), 12, b"XG"), "subfield-id", id="subfield-id"),
        pytest.param(_patched(footer_bytes(5), 14, b"\x15"), "subfield-len", id="subfield-len"),
        pytest.param(_patched(footer_bytes(5), 32, b"STARGY"), "magic", id="stargz-magic"),
        pytest.param(_patched(footer_bytes(5), 16, b"-"), "hex", id="sign"),
        pytest.param(_patched(footer_bytes(5), 16, b"g"), "hex", id="not-hex"),
        pytest.param(_patched(footer_bytes(5), 43, b"\x01"), "crc", id="bad-crc"),
        pytest.param(_patched(footer_bytes(5), 38, b"\x00"), "deflate", id="not-final-block"),
        pytest.param(bytes(FOOTER_BYTES), "zeros", id="zeros"),
    ],
)
def test_malformed_footer(footer: bytes, why: str) -> None:
    with pytest.raises(TocError):
        parse_footer(footer)


def test_tail_sizes_and_toc_section_bounds() -> None:
    assert tail_read_size(10**9) == FOOTER_BYTES
    assert tail_read_size(49) == 49
    with pytest.raises(TocError):
        tail_read_size(LEGACY_FOOTER_BYTES - 1)
    with pytest.raises(TocError):
        parse_tail(footer_bytes(1)[-40:])
    assert toc_section(200, Footer(100, FOOTER_BYTES)) == ByteRange(100, 149)
    for offset in (149, 500):
        with pytest.raises(TocError):
            toc_section(200, Footer(offset, FOOTER_BYTES))


def test_a_footer_cannot_make_the_toc_member_the_whole_blob() -> None:
    """The footer, not the manifest, says where the TOC is: its range is bounded."""
    huge = 10 << 30
    with pytest.raises(
        TocError, match=r"TOC member is \d+ bytes, more than the limit of 134217728"
    ):
        toc_section(huge, Footer(0, FOOTER_BYTES))
    small = LimitsConfig(max_toc_compressed_bytes=100)
    with pytest.raises(TocError, match="more than the limit of 100"):
        toc_section(1000, Footer(10, FOOTER_BYTES), small)
    assert toc_section(1000, Footer(900, FOOTER_BYTES), small) == ByteRange(900, 949)


def test_chunks_beyond_the_limits_are_refused_naming_the_layer() -> None:
    data = toc_json(reg("big", size=100 << 20, offset=0, chunkDigest=SHA_A))
    with pytest.raises(TocError) as caught:
        toc_entries(data, 1000, layer="sha256:abc")
    assert str(caught.value).startswith("layer sha256:abc: eStargz TOC entry 0 ('big'): ")
    assert "more than the limit of 67108864" in str(caught.value)
    inner = toc_json(reg("f", size=10, offset=0, innerOffset=(64 << 20), chunkDigest=SHA_A))
    with pytest.raises(TocError, match="bytes uncompressed, more than the limit"):
        toc_entries(inner, 1000)
    negative = toc_json(reg("f", size=10, offset=0, uid=-1, chunkDigest=SHA_A))
    with pytest.raises(TocError, match="uid -1 out of range"):
        toc_entries(negative, 1000)


# ---------------------------------------------------------------------------------- TOC member


def _tar_gz(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return gzip.compress(buffer.getvalue())


def test_read_toc_member_and_digest() -> None:
    layer = build_estargz(small_files_layer())
    section = layer.blob[layer.toc_offset : len(layer.blob) - FOOTER_BYTES]
    assert read_toc_member(section) == layer.toc_json
    assert toc_digest(layer.toc_json) == str(layer.toc_digest)
    assert layer.toc_digest == Digest.of(layer.toc_json)
    assert read_toc_member(_tar_gz("stargz.index.json", b'{"x":1}')) == b'{"x":1}'


@pytest.mark.parametrize(
    "section",
    [
        pytest.param(b"not gzip at all", id="not-gzip"),
        pytest.param(_tar_gz("stargz.index.json", b"{}")[:-9], id="truncated"),
        pytest.param(_tar_gz("stargz.index.json", b"{}") + gzip.compress(b""), id="trailing"),
        pytest.param(_tar_gz("other.json", b"{}"), id="wrong-name"),
        pytest.param(gzip.compress(b"not a tar" * 100), id="not-tar"),
        pytest.param(gzip.compress(b""), id="empty"),
    ],
)
def test_malformed_toc_member(section: bytes) -> None:
    with pytest.raises(TocError):
        read_toc_member(section)


# --------------------------------------------------------------------------------- TOC entries


def reg(name: str, **fields: object) -> dict[str, object]:
    """A ``reg`` TOC entry object, with its JSON keys."""
    return {"name": name, "type": "reg", **fields}


def chunk(**fields: object) -> dict[str, object]:
    """A ``chunk`` TOC entry object; upstream may leave its name out."""
    return {"type": "chunk", **fields}


def test_toc_entries_from_a_handwritten_toc() -> None:
    """The field meanings of docs/estargz.md, written out by hand: modes with type bits, names
    as tar stores them, a chunk without name or size, a single chunk known by ``digest``."""
    xattr = base64.b64encode(b"\x00\xffvalue").decode()
    data = toc_json(
        {"name": "./", "type": "dir", "mode": 0o40755},
        {"name": "bin/", "type": "dir", "modtime": "2019-08-20T10:30:43Z", "mode": 16877},
        reg("bin/busybox", size=10, mode=33261, offset=126, uid=1, gid=2, userName="u",
            digest=SHA_A, xattrs={"user.x": xattr}),
        reg(".prefetch.landmark", size=1, offset=400, chunkDigest=SHA_B),
        reg("lib/big", size=30, offset=500, chunkSize=20, digest=SHA_C, chunkDigest=SHA_A,
            NumLink=0),
        chunk(offset=900, chunkOffset=20, chunkDigest=SHA_B),
        reg("lib/empty", digest=SHA_C),
        {"name": "dev/null", "type": "char", "devMajor": 1, "devMinor": 3, "mode": 0o20666},
        {"name": "bin/sh", "type": "symlink", "linkName": "busybox"},
        {"name": "bin/ash", "type": "hardlink", "linkName": "bin/busybox"},
    )  # fmt: skip
    assert toc_entries(data, 1000) == [
        TocEntry("dir", "./", mode=0o40755),
        TocEntry("dir", "bin/", mode=16877, modtime="2019-08-20T10:30:43Z"),
        TocEntry("reg", "bin/busybox", mode=33261, size=10, uid=1, gid=2, digest=SHA_A,
                 xattrs={"user.x": b"\x00\xffvalue"}, offset=126, end_offset=400,
                 chunk_size=10, chunk_digest=SHA_A),
        TocEntry("reg", "lib/big", size=30, digest=SHA_C, offset=500, end_offset=1000,
                 chunk_size=20, chunk_digest=SHA_A),
        TocEntry("chunk", "lib/big", offset=900, chunk_offset=20, chunk_size=10,
                 chunk_digest=SHA_B),
        TocEntry("reg", "lib/empty", digest=SHA_C),
        TocEntry("char", "dev/null", mode=0o20666, dev_major=1, dev_minor=3),
        TocEntry("symlink", "bin/sh", link_name="busybox"),
        TocEntry("hardlink", "bin/ash", link_name="bin/busybox"),
    ]  # fmt: skip


# The start of the example TOC in docs/estargz.md (stargz-snapshotter); the rest is omitted there.
DOC_BUSYBOX = "sha256:8b7c559b8cccca0d30d01bc4b5dc944766208a53d18a03aa8afe97252207521f"
DOC_MUSL = "sha256:45c6ee3bd1862697eab8058ec0e462f5a760927331c709d7d233da8ffee40e9e"
DOC_LANDMARK = "sha256:dc0e9c3658a1a3ed1ec94274d8b19925c93e1abb7ddba294923ad9bde30f8cb8"
DOC_EXAMPLE = toc_json(
    {"name": "bin/", "type": "dir", "modtime": "2019-08-20T10:30:43Z", "mode": 16877,
     "NumLink": 0},
    reg("bin/busybox", size=833104, modtime="2019-06-12T17:52:45Z", mode=33261, offset=126,
        NumLink=0, digest=DOC_BUSYBOX, chunkDigest=DOC_BUSYBOX),
    {"name": "lib/", "type": "dir", "modtime": "2019-08-20T10:30:43Z", "mode": 16877,
     "NumLink": 0},
    reg("lib/ld-musl-x86_64.so.1", size=580144, modtime="2019-08-07T07:15:30Z", mode=33261,
        offset=512427, NumLink=0, digest=DOC_MUSL, chunkDigest=DOC_MUSL),
    reg(".prefetch.landmark", size=1, offset=886633, NumLink=0, digest=DOC_LANDMARK,
        chunkDigest=DOC_LANDMARK),
)  # fmt: skip


def test_toc_entries_of_the_documented_example() -> None:
    entries = toc_entries(DOC_EXAMPLE, 887000)
    assert [e.name for e in entries] == ["bin/", "bin/busybox", "lib/", "lib/ld-musl-x86_64.so.1"]
    assert _ranges(entries) == {
        "bin/busybox": [(126, 512427, 0, 833104)],
        "lib/ld-musl-x86_64.so.1": [(512427, 886633, 0, 580144)],  # up to the landmark
    }
    assert hashlib.sha256(LANDMARK_CONTENTS).hexdigest() == DOC_LANDMARK.removeprefix("sha256:")
    tree = build_tree([entries])
    bin_dir = tree.lookup(tree.root.inode, b"bin")
    busybox = tree.lookup(bin_dir.inode, b"busybox") if bin_dir else None
    assert busybox is not None
    assert (busybox.st_mode, busybox.size) == (0o100755, 833104)


def _ranges(entries: list[TocEntry]) -> dict[str, list[tuple[int, int, int, int]]]:
    """Per file: (blob_offset, blob_end, inner_offset, size) of each chunk."""
    return {
        group[0].name: [(c.blob_offset, c.blob_end, c.inner_offset, c.size) for c in chunks]
        for group in group_file_entries(tuple(entries))
        if (chunks := file_chunks(group))
    }


def test_shared_member_ends_and_inner_offsets() -> None:
    data = toc_json(
        reg("a", size=5, offset=0, innerOffset=512, digest=SHA_A),
        reg("b", size=7, offset=0, innerOffset=1536, digest=SHA_B),
        reg("c", size=9, offset=300, digest=SHA_C),
        reg("d", size=4, offset=300, innerOffset=1024, chunkSize=2, chunkDigest=SHA_A),
        chunk(name="d", offset=300, innerOffset=1026, chunkOffset=2, chunkDigest=SHA_B),
    )
    assert _ranges(toc_entries(data, 700)) == {
        "a": [(0, 300, 512, 5)],
        "b": [(0, 300, 1536, 7)],
        "c": [(300, 700, 0, 9)],
        "d": [(300, 700, 1024, 2), (300, 700, 1026, 2)],  # two chunks in one member
    }


def test_landmarks_and_toc_entry_are_dropped_but_bound_members() -> None:
    data = toc_json(
        reg("./.no.prefetch.landmark", size=1, offset=50, chunkDigest=SHA_A),
        reg("f", size=3, offset=50, innerOffset=1024, digest=SHA_B),
        reg("/.prefetch.landmark", size=1, offset=90, chunkDigest=SHA_A),
        reg("g", size=3, offset=130, digest=SHA_C),
        reg("stargz.index.json", size=2, offset=200, digest=SHA_A),  # the TOC's own member
    )
    entries = toc_entries(data, 200)
    assert [(e.name, e.offset, e.end_offset) for e in entries] == [("f", 50, 90), ("g", 130, 200)]


def test_toc_entries_drop_fields_estargz_does_not_have() -> None:
    data = toc_json(
        reg("f", size=3, offset=10, digest=SHA_A, endOffset=11, chunkType="zeros",
            lazyfsVerity=SHA_B, lazyfsChunkVerity=SHA_C, accesstime="2020-01-01T00:00:00Z"),
        {"name": "d", "type": "dir", "offset": 99, "digest": SHA_A, "size": 7},
    )  # fmt: skip
    assert toc_entries(data, 20) == [
        TocEntry("reg", "f", size=3, digest=SHA_A, offset=10, end_offset=20, chunk_size=3,
                 chunk_digest=SHA_A),
        TocEntry("dir", "d"),
    ]  # fmt: skip


SHA512 = "sha512:" + "a" * 128


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"{not json", id="not-json"),
        pytest.param(b'{"version":2,"entries":[]}', id="version"),
        pytest.param(b'{"version":1}', id="no-entries"),
        pytest.param(toc_json({"name": "f", "type": "socket"}), id="unknown-type"),
        pytest.param(toc_json(reg("f", size=3, offset=5)), id="no-digest"),
        pytest.param(toc_json(reg("f", size=3, offset=5, digest=SHA512)), id="not-sha256"),
        pytest.param(toc_json(reg("f", size=3, offset=100, digest=SHA_A)), id="offset-past-toc"),
        pytest.param(
            toc_json(reg("f", size=3, offset=5, innerOffset=-1, digest=SHA_A)), id="negative"
        ),
        pytest.param(
            toc_json({"name": "d", "type": "dir"}, chunk(offset=5, chunkDigest=SHA_A)),
            id="chunk-after-dir",
        ),
        pytest.param(toc_json(chunk(offset=5, chunkDigest=SHA_A)), id="chunk-first"),
        pytest.param(
            toc_json(
                reg("f", size=9, offset=5, chunkSize=4, chunkDigest=SHA_A),
                chunk(offset=9, chunkOffset=3, chunkDigest=SHA_B),
            ),
            id="chunks-overlap",
        ),
        pytest.param(
            toc_json(
                reg("f", size=9, offset=5, chunkSize=4, chunkDigest=SHA_A),
                chunk(offset=9, chunkOffset=4),
            ),
            id="chunk-without-digest",
        ),
        pytest.param(
            toc_json(
                reg("f", offset=5, digest=SHA_A), chunk(offset=9, chunkOffset=4, chunkDigest=SHA_A)
            ),
            id="empty-file-with-chunks",
        ),
        pytest.param(
            toc_json(reg("f", size=3, offset=5, digest=SHA_A, xattrs={"a": "!"})),
            id="xattr-not-base64",
        ),
    ],
)
def test_malformed_toc(data: bytes) -> None:
    with pytest.raises(TocError):
        toc_entries(data, 50)


@pytest.mark.parametrize("min_chunk_size", [0, 2 * KIB, 64 * KIB])
def test_chunk_ranges_are_exactly_the_gzip_members(min_chunk_size: int) -> None:
    """Every chunk's range is one whole gzip member of the blob, and skipping ``innerOffset``
    bytes of it gives the chunk's bytes."""
    entries = small_files_layer()
    layer = build_estargz(entries, chunk_size=64 * KIB, min_chunk_size=min_chunk_size)
    starts = member_starts(layer.blob)
    next_start = dict(itertools.pairwise(starts))
    contents = {e.path: e.data for e in entries if e.type == "file"}
    inner_offsets = []
    for group in group_file_entries(tuple(layer_entries(layer))):
        if group[0].type != "reg":
            continue
        data = contents.pop(group[0].name)
        for ref in file_chunks(group):
            assert ref.blob_end == next_start[ref.blob_offset]
            member = gzip.decompress(layer.blob[ref.blob_offset : ref.blob_end])
            piece = data[ref.file_offset : ref.file_offset + ref.size]
            assert member[ref.inner_offset : ref.inner_offset + ref.size] == piece
            assert ref.sha256 == "sha256:" + hashlib.sha256(piece).hexdigest()
            inner_offsets.append(ref.inner_offset)
    assert not contents  # every file was in the TOC
    assert (max(inner_offsets) > 0) == (min_chunk_size > 0)


def test_chunks_of_one_file_sharing_a_member() -> None:
    """Highly compressible chunks stay under the minimum member size, so consecutive chunks of
    one file share a member; each still ends where the member does."""
    zeros = regular_file("zeros", bytes(200 * KIB) + b"end")
    layer = build_estargz(
        [zeros, regular_file("z", b"after")], chunk_size=16 * KIB, min_chunk_size=8 * KIB
    )
    entries = layer_entries(layer)
    refs = file_chunks(next(g for g in group_file_entries(tuple(entries)) if g[0].name == "zeros"))
    assert len(refs) == 13
    assert len({r.blob_offset for r in refs}) < len(refs)  # some chunks share a member
    starts = member_starts(layer.blob)
    for ref in refs:
        assert ref.blob_end == starts[starts.index(ref.blob_offset) + 1]
        member = gzip.decompress(layer.blob[ref.blob_offset : ref.blob_end])
        expected = zeros.data[ref.file_offset : ref.file_offset + ref.size]
        assert member[ref.inner_offset : ref.inner_offset + ref.size] == expected


# ------------------------------------------------------------------------------------- the tree


def _summary(tree: Tree) -> dict[bytes, tuple[object, ...]]:
    """Everything a mount shows of each path; hardlinks as the first path of their inode."""
    first_path: dict[int, bytes] = {}
    summary: dict[bytes, tuple[object, ...]] = {}
    for path, node in tree.walk():
        link = first_path.setdefault(node.inode, path)
        summary[path] = (
            node.kind, node.st_mode, node.uid, node.gid, node.size, node.mtime_ns, node.rdev,
            node.target, sorted(node.xattrs.items()), node.nlink, link,
        )  # fmt: skip
    return summary


def _plain_tar_toc(entries: Sequence[Entry], work: Path) -> list[TocEntry]:
    """The same entries as a plain tar, through lazyfs's own tar reader (the converter)."""
    tar_path = work / "layer.tar"
    tar_path.write_bytes(layer_tar_bytes(entries))
    return list(write_chunked_layer(tar_path, work / "layer.zc", ChunkingConfig()).toc.entries)


@pytest.mark.parametrize("min_chunk_size", [0, 4 * KIB])
def test_tree_of_estargz_layers_equals_tree_of_plain_tars(
    min_chunk_size: int, tmp_path: Path
) -> None:
    layers = feature_layers()
    estargz = [
        layer_entries(build_estargz(e, chunk_size=256 * KIB, min_chunk_size=min_chunk_size))
        for e in layers
    ]
    plain = []
    for index, entries in enumerate(layers):
        work = tmp_path / str(index)
        work.mkdir()
        plain.append(_plain_tar_toc(entries, work))
    assert _summary(build_tree(estargz)) == _summary(build_tree(plain))


# ----------------------------------------------------------------------------------- resolver


class MemorySource:
    """A ByteSource serving blobs from memory; records the ranges asked for."""

    def __init__(self, blobs: dict[Digest, bytes]) -> None:
        self.blobs = blobs
        self.ranges: list[tuple[Digest, ByteRange]] = []

    async def read_ranges(
        self, blob: Digest, ranges: Sequence[ByteRange], on_data: object = None
    ) -> list[bytes]:
        self.ranges.extend((blob, r) for r in ranges)
        data = self.blobs[blob]
        return [data[r.start : r.end] for r in ranges]


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[ChunkCache]:
    chunk_cache = ChunkCache(tmp_path / "cache", 1 << 30)
    yield chunk_cache
    chunk_cache.close()


def _files(tree: Tree) -> dict[str, Node]:
    return {path.decode(): node for path, node in tree.walk() if node.kind == "reg"}


async def _read_all(
    source: MemorySource, cache: ChunkCache, blobs: list[LayerBlob], nodes: dict[str, Node]
) -> dict[str, bytes]:
    async with anyio.create_task_group() as tasks:
        resolver = ChunkResolver(source, cache, blobs, ResolverConfig(), tasks)
        contents = {
            path: await resolver.read(node, 0, node.size + 10) for path, node in nodes.items()
        }
        tasks.cancel_scope.cancel()
    return contents


@pytest.mark.anyio
@pytest.mark.parametrize("min_chunk_size", [0, 4 * KIB])
async def test_resolver_reads_estargz_files(min_chunk_size: int, cache: ChunkCache) -> None:
    layers = [small_files_layer(), feature_layers()[0]]
    built = [build_estargz(e, chunk_size=64 * KIB, min_chunk_size=min_chunk_size) for e in layers]
    blobs = [LayerBlob(layer.digest, len(layer.blob), "gzip", "sha256") for layer in built]
    source = MemorySource({layer.digest: layer.blob for layer in built})
    tree = build_tree([layer_entries(layer) for layer in built])
    contents = await _read_all(source, cache, blobs, _files(tree))
    assert contents == _contents(layers)
    assert len(contents) == len(_files(tree)) > 40
    toc_offsets = {layer.digest: layer.toc_offset for layer in built}
    assert all(rng.end <= toc_offsets[digest] for digest, rng in source.ranges)  # no TOC bytes


def _contents(layers: Sequence[Sequence[Entry]]) -> dict[str, bytes]:
    """Each regular file's bytes by path (hardlinks included), later layers winning."""
    contents: dict[str, bytes] = {}
    for entries in layers:
        for entry in entries:
            if entry.type == "file" and not entry.is_whiteout:
                contents[f"/{entry.path}"] = entry.data
            elif entry.type == "hardlink":
                contents[f"/{entry.path}"] = contents[f"/{entry.link}"]
    return contents


@pytest.mark.anyio
async def test_resolver_reads_a_middle_range_of_a_shared_member(cache: ChunkCache) -> None:
    entries = small_files_layer()
    layer = build_estargz(entries, chunk_size=64 * KIB, min_chunk_size=16 * KIB)
    blob = LayerBlob(layer.digest, len(layer.blob), "gzip", "sha256")
    source = MemorySource({layer.digest: layer.blob})
    node = _files(build_tree([layer_entries(layer)]))["/etc/conf17"]
    assert node.chunks[0].ref.inner_offset > 0
    data = next(e.data for e in entries if e.path == "etc/conf17")
    async with anyio.create_task_group() as tasks:
        resolver = ChunkResolver(source, cache, [blob], ResolverConfig(), tasks)
        assert await resolver.read(node, 100, 50) == data[100:150]
        tasks.cancel_scope.cancel()


@pytest.mark.anyio
async def test_resolver_decompresses_a_range_of_several_members(cache: ChunkCache) -> None:
    """A range may hold several concatenated members, the first one with other bytes first."""
    first, second = b"other file bytes|chunk starts here:", b" and continues in the next member"
    blob_bytes = gzip.compress(b"unrelated") + gzip.compress(first) + gzip.compress(second)
    start = len(gzip.compress(b"unrelated"))
    chunk = first[17:] + second
    sha = "sha256:" + hashlib.sha256(chunk).hexdigest()
    ref = ChunkRef(0, len(chunk), start, len(blob_bytes), sha, "", inner_offset=17)
    node = Node(kind="reg", mode=0o644, size=len(chunk), chunks=(LayerChunk(0, ref),), inode=2)
    digest = Digest.of(blob_bytes)
    source = MemorySource({digest: blob_bytes})
    blob = LayerBlob(digest, len(blob_bytes), "gzip", "sha256")
    async with anyio.create_task_group() as tasks:
        resolver = ChunkResolver(source, cache, [blob], ResolverConfig(), tasks)
        assert await resolver.read(node, 0, len(chunk)) == chunk
        tasks.cancel_scope.cancel()


@pytest.mark.anyio
async def test_resolver_refuses_a_tampered_estargz_member(cache: ChunkCache) -> None:
    layer = build_estargz([regular_file("f", text_bytes(40 * KIB, seed=3))])
    node = _files(build_tree([layer_entries(layer)]))["/f"]
    ref = node.chunks[0].ref
    tampered = bytearray(layer.blob)
    tampered[(ref.blob_offset + ref.blob_end) // 2] ^= 0x55
    source = MemorySource({layer.digest: bytes(tampered)})
    blob = LayerBlob(layer.digest, len(layer.blob), "gzip", "sha256")
    async with anyio.create_task_group() as tasks:
        resolver = ChunkResolver(source, cache, [blob], ResolverConfig(), tasks)
        with pytest.raises(LazyfsError):
            await resolver.read(node, 0, 10)
        tasks.cancel_scope.cancel()
    assert cache.chunk_keys() == []


# -------------------------------------------------------------------------- independent tools


def test_gunzip_cli_and_tarfile_read_the_blob(tmp_path: Path) -> None:
    gunzip = require_tool("gunzip")
    entries = small_files_layer()
    layer = build_estargz(entries, chunk_size=64 * KIB, min_chunk_size=2 * KIB)
    path = tmp_path / "layer.tar.gz"
    path.write_bytes(layer.blob)
    tar = subprocess.run([gunzip, "-c", path], capture_output=True, check=True).stdout
    assert tar == layer.tar
    assert "sha256:" + hashlib.sha256(tar).hexdigest() == str(layer.diff_id)
    run_tool([gunzip, "-t", path])  # every member's CRC and size check out
    with tarfile.open(path, mode="r:gz") as archive:
        members = archive.getmembers()
        names = [m.name for m in members]
        files = {m.name: archive.extractfile(m).read() for m in members if m.isreg()}  # type: ignore[union-attr]
    assert names[0] == ".no.prefetch.landmark"
    assert names[-1] == "stargz.index.json"
    assert sorted(names[1:-1]) == sorted(e.path for e in entries)
    assert files["stargz.index.json"] == layer.toc_json
    assert files[".no.prefetch.landmark"] == b"\x0f"
    assert all(files[e.path] == e.data for e in entries if e.type == "file")


def test_prefetch_landmark_layout() -> None:
    entries = small_files_layer()
    layer = build_estargz(entries, prefetch=["lib/text.txt", "etc/conf05"])
    with tarfile.open(fileobj=io.BytesIO(layer.tar)) as archive:
        names = archive.getnames()
    assert names[:5] == ["lib", "lib/text.txt", "etc", "etc/conf05", ".prefetch.landmark"]
    landmark = json.loads(layer.toc_json)["entries"][4]
    assert landmark["name"] == ".prefetch.landmark"
    assert landmark["offset"] in member_starts(layer.blob)
    assert all(e.name != ".prefetch.landmark" for e in layer_entries(layer))


def test_whiteouts_survive_as_entries() -> None:
    layer = build_estargz([whiteout("gone"), regular_file("kept", b"k")])
    names = [e.name for e in layer_entries(layer)]
    assert names == [".wh.gone", "kept"]


def test_estargz_image_in_an_oci_layout(tmp_path: Path) -> None:
    layers = [small_files_layer(), [regular_file("top", b"top layer\n")]]
    built = write_estargz_image(tmp_path / "oci", "v1", layers, chunk_size=64 * KIB)
    layout = OciLayout(tmp_path / "oci")
    descriptor = layout.resolve("v1")
    manifest = Manifest.parse(layout.read_blob(descriptor.digest), descriptor.media_type)
    assert [layer.media_type for layer in manifest.layers] == [OCI_LAYER_TAR_GZIP] * 2
    for layer, estargz in zip(manifest.layers, built.layers, strict=True):
        blob = layout.read_blob(layer.digest)
        assert blob == estargz.blob
        assert layer.annotations[TOC_DIGEST_ANNOTATION] == str(estargz.toc_digest)
        assert layer.annotations[UNCOMPRESSED_SIZE_ANNOTATION] == str(len(gzip.decompress(blob)))
        assert toc_digest(read_toc_member(blob[parse_footer(blob[-51:]) : -51])) == str(
            estargz.toc_digest
        )
    assert built.image.config.diff_ids == tuple(layer.diff_id for layer in built.layers)


def test_skopeo_copies_an_estargz_image_unchanged(tmp_path: Path) -> None:
    require_tool("skopeo")
    built = write_estargz_image(tmp_path / "src", "v1", [small_files_layer()], chunk_size=MIB)
    skopeo_copy(built.image.reference, f"oci:{tmp_path / 'dst'}:v1")
    layout = OciLayout(tmp_path / "dst")
    descriptor = layout.resolve("v1")
    manifest = Manifest.parse(layout.read_blob(descriptor.digest), descriptor.media_type)
    assert manifest.layers == built.image.manifest.layers
    assert dict(manifest.layers[0].annotations) == built.layers[0].annotations
