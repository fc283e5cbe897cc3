"""The profile-first layout of ``lazyfs convert --prefetch`` (formats/chunked/order.py).

The order of members a profile gives, what may not move (and why), the tar bytes kept member
for member, the ranks and their one run at the start of each blob; then end to end: umoci and
skopeo as oracles of the tree and the image, reproducibility, and a real mount counting its
prefetch requests in the registry's access log.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import random
import tarfile
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from imagebuild import LONG_DIR, MIB, build_feature_image, random_bytes, text_bytes
from lazyfs_run import mounted, run_lazyfs, stats
from oracles import assert_trees_equal, skopeo_copy, skopeo_inspect, tree_snapshot, umoci_unpack
from test_prefetch import _wait_for_prefetch

from lazyfs.config import ChunkingConfig
from lazyfs.convert.imagebuild import (
    BuiltImage,
    Entry,
    directory,
    hardlink,
    opaque_whiteout,
    regular_file,
    symlink,
    whiteout,
    write_image,
)
from lazyfs.convert.layout import OciLayout
from lazyfs.formats.chunked.order import MemberOrder, profile_first_order, write_member_order
from lazyfs.formats.chunked.toc import (
    TOC_POSITION_ANNOTATION,
    ChunkRef,
    Toc,
    file_chunks,
    group_file_entries,
    parse_toc_position,
)
from lazyfs.formats.chunked.writer import write_chunked_layer
from lazyfs.model.digest import Digest
from lazyfs.model.manifests import OCI_MANIFEST, Descriptor, ImageConfig, Manifest
from lazyfs.model.profiles import AccessProfile, ProfileRead
from lazyfs.registry.localserver import LocalRegistry

# --------------------------------------------------------------------------- layer tars


@dataclass(frozen=True)
class M:
    """A tar member to write: ``kind`` file, dir, hardlink or symlink."""

    name: str
    kind: str = "file"
    data: bytes = b"x"
    link: str = ""
    mtime: int = 1_700_000_000


def _info(member: M) -> tarfile.TarInfo:
    info = tarfile.TarInfo(member.name)
    info.mtime = member.mtime
    info.type = {
        "file": tarfile.REGTYPE,
        "dir": tarfile.DIRTYPE,
        "hardlink": tarfile.LNKTYPE,
        "symlink": tarfile.SYMTYPE,
    }[member.kind]
    info.mode = 0o755 if member.kind == "dir" else 0o644
    info.linkname = member.link
    info.size = len(member.data) if member.kind == "file" else 0
    return info


def _write_tar(path: Path, members: Sequence[M], pax_headers: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, pax_headers=pax_headers) as tar:
        for member in members:
            data = io.BytesIO(member.data) if member.kind == "file" else None
            tar.addfile(_info(member), data)
    return path


def _profile(*reads: str | tuple[str, int, int]) -> AccessProfile:
    items = [(r, 0, 1) if isinstance(r, str) else r for r in reads]
    return AccessProfile(tuple(ProfileRead(path, offset, length) for path, offset, length in items))


def _reorder(
    tmp_path: Path, members: Sequence[M], profile: AccessProfile
) -> tuple[MemberOrder, list[str]]:
    """The order the profile gives, and the member names of the tar written in it."""
    source = _write_tar(tmp_path / "in.tar", members)
    order = profile_first_order(source, profile)
    write_member_order(source, order, tmp_path / "out.tar")
    with tarfile.open(tmp_path / "out.tar") as tar:
        return order, [info.name for info in tar.getmembers()]


def _member_bytes(path: Path) -> dict[int, bytes]:
    """Each member's bytes (extension headers to padding) by position; the trailer as -1."""
    data = path.read_bytes()
    pieces: dict[int, bytes] = {}
    end = 0
    with tarfile.open(path) as tar:
        for index, info in enumerate(tar.getmembers()):
            size = info.size if info.isreg() else 0
            end = info.offset_data + size + (-size % 512)
            pieces[index] = data[info.offset : end]
    pieces[-1] = data[end:]
    return pieces


# --------------------------------------------------------------------------- the order


def test_profile_files_come_first_in_profile_order_after_their_directories(
    tmp_path: Path,
) -> None:
    members = [
        M("./", "dir"),
        M("etc/", "dir"),
        M("etc/a", data=b"a" * 700),
        M("etc/b"),
        M("usr/", "dir"),
        M("usr/bin/", "dir"),
        M("usr/bin/x", data=b"x" * 2000),
        M("usr/lib/", "dir"),
        M("usr/lib/y", data=b"y" * 3000),
        M("var/", "dir"),
        M("var/z"),
    ]
    profile = _profile("/usr/lib/y", "/missing", "/etc/a", "/usr/lib/y", "/usr/bin/x")
    order, names = _reorder(tmp_path, members, profile)
    assert names == [
        ".",
        "usr",
        "usr/lib",
        "usr/lib/y",
        "etc",
        "etc/a",
        "usr/bin",
        "usr/bin/x",
        "etc/b",
        "var",
        "var/z",
    ]
    assert (order.moved_files, order.moved_members, order.kept_files) == (3, 8, 0)
    before, after = _member_bytes(tmp_path / "in.tar"), _member_bytes(tmp_path / "out.tar")
    assert sorted(before.values()) == sorted(after.values())  # every member byte for byte
    assert after[-1] == before[-1] and after[-1].strip(b"\0") == b""  # the trailer stays last
    assert order.moved_bytes == sum(len(after[i]) for i in range(8))


def test_the_digest_is_the_written_tars(tmp_path: Path) -> None:
    source = _write_tar(tmp_path / "in.tar", [M("d/", "dir"), M("d/f"), M("e")])
    order = profile_first_order(source, _profile("/e"))
    digest = write_member_order(source, order, tmp_path / "out.tar")
    assert digest == Digest.of((tmp_path / "out.tar").read_bytes())
    assert digest != Digest.of(source.read_bytes())


def test_reads_that_rank_no_chunk_move_nothing(tmp_path: Path) -> None:
    members = [
        M("d/", "dir"),
        M("d/empty", data=b""),
        M("d/f", data=b"12345"),
        M("d/s", "symlink", link="f"),
        M("z"),
    ]
    profile = _profile("/d/empty", ("/d/f", 5, 10), "/d/s", "/d", "/")
    order, names = _reorder(tmp_path, members, profile)
    assert not order.changed
    assert names == ["d", "d/empty", "d/f", "d/s", "z"]


def test_a_read_hardlink_moves_its_target_and_the_links_stay_after_it(tmp_path: Path) -> None:
    members = [
        M("a"),
        M("b", data=b"target"),
        M("c"),
        M("l1", "hardlink", link="b"),
        M("l2", "hardlink", link="b"),
    ]
    order, names = _reorder(tmp_path, members, _profile("/l2"))
    assert names == ["b", "a", "c", "l1", "l2"]
    assert order.moved_files == 1


def test_a_file_named_by_an_earlier_hardlink_stays(tmp_path: Path) -> None:
    # The link names the file of a lower layer, which this layer then replaces: moving the
    # file ahead of the link would give the link the new content.
    members = [M("a"), M("link", "hardlink", link="f"), M("f", data=b"new")]
    order, names = _reorder(tmp_path, members, _profile("/f"))
    assert names == ["a", "link", "f"]
    assert (order.moved_files, order.kept_files) == (0, 1)


def test_a_file_after_its_whiteout_or_a_duplicate_stays(tmp_path: Path) -> None:
    members = [
        M("d/", "dir"),
        M("d/.wh.f", data=b""),
        M("d/f"),
        M("g", data=b"1"),
        M("h"),
        M("g", data=b"22"),
    ]
    order, names = _reorder(tmp_path, members, _profile("/d/f", ("/g", 1, 1)))
    assert names == ["d", "d/.wh.f", "d/f", "g", "h", "g"]
    assert order.kept_files == 2  # /d/f after its whiteout, the second /g after the first


def test_a_duplicate_moves_after_the_earlier_one(tmp_path: Path) -> None:
    members = [M("a"), M("g", data=b"1"), M("h"), M("g", data=b"2")]
    order, names = _reorder(tmp_path, members, _profile("/g"))
    assert names == ["g", "g", "a", "h"]
    assert order.moved_files == 2


def test_an_opaque_marker_moves_with_its_directory(tmp_path: Path) -> None:
    members = [
        M("o/", "dir"),
        M("o/.wh..wh..opq", data=b""),
        M("o/a"),
        M("o/f", data=b"read"),
        M("p"),
    ]
    order, names = _reorder(tmp_path, members, _profile("/o/f"))
    assert names == ["o", "o/.wh..wh..opq", "o/f", "o/a", "p"]
    assert order.moved_members == 3


def test_files_of_a_directory_whose_marker_follows_a_sibling_stay(tmp_path: Path) -> None:
    # An extractor that applies the marker where it meets it removes o/a; moving the marker
    # ahead of o/a would keep it.
    members = [M("o/", "dir"), M("o/a"), M("o/.wh..wh..opq", data=b""), M("o/f", data=b"read")]
    order, names = _reorder(tmp_path, members, _profile("/o/f"))
    assert names == ["o", "o/a", "o/.wh..wh..opq", "o/f"]
    assert order.kept_files == 1


def test_a_file_below_a_symlink_of_the_layer_stays(tmp_path: Path) -> None:
    members = [
        M("usr/", "dir"),
        M("usr/lib/", "dir"),
        M("lib", "symlink", link="usr/lib"),
        M("lib/f", data=b"via the link"),
    ]
    order, names = _reorder(tmp_path, members, _profile("/lib/f"))
    assert names == ["usr", "usr/lib", "lib", "lib/f"]
    assert order.kept_files == 1


def test_a_directory_listed_after_its_children_keeps_the_files_after_it(tmp_path: Path) -> None:
    # d/ may replace a lower layer's symlink d: d/g went through that symlink, d/f goes into
    # the new directory; moving d/ ahead of d/g would change where d/g lands.
    members = [M("d/g"), M("d/", "dir"), M("d/f", data=b"read"), M("e/f", data=b"read too")]
    order, names = _reorder(tmp_path, members, _profile("/d/f", "/e/f"))
    assert names == ["e/f", "d/g", "d", "d/f"]
    assert (order.moved_files, order.kept_files) == (1, 1)


def test_the_root_entry_moves_ahead_of_entries_listed_before_it(tmp_path: Path) -> None:
    members = [M("./dev/", "dir"), M("./", "dir"), M("./etc/", "dir"), M("./etc/f", data=b"read")]
    order, names = _reorder(tmp_path, members, _profile("/etc/f"))
    assert names == [".", "./etc", "./etc/f", "./dev"]
    assert order.kept_files == 0


def test_a_global_pax_header_keeps_the_order(tmp_path: Path) -> None:
    source = _write_tar(tmp_path / "in.tar", [M("a"), M("b")], pax_headers={"comment": "x"})
    order = profile_first_order(source, _profile("/b"))
    assert not order.changed and "global PAX header" in order.note
    write_member_order(source, order, tmp_path / "out.tar")
    assert (tmp_path / "out.tar").read_bytes() == source.read_bytes()


def test_the_order_is_the_same_every_time(tmp_path: Path) -> None:
    rng = random.Random(7)
    members = [M("d/", "dir")] + [
        M(f"d/f{i:02d}", data=rng.randbytes(rng.randint(0, 3000))) for i in range(40)
    ]
    profile = _profile(*(f"/d/f{i:02d}" for i in rng.sample(range(40), 15)))
    source = _write_tar(tmp_path / "in.tar", members)
    digests = set()
    for name in ("one", "two"):
        order = profile_first_order(source, profile)
        digests.add(write_member_order(source, order, tmp_path / name))
    assert len(digests) == 1


# ------------------------------------------------------------------ any layer, any profile


@dataclass(frozen=True)
class _Parsed:
    index: int
    path: str
    kind: str
    link: str

    @property
    def affects(self) -> set[str]:
        """Paths whose subtree extracting this member touches (the spec in order.py's
        docstring, written out again on its own)."""
        parent, name = posixpath.split(self.path)
        paths = {self.path}
        if name == ".wh..wh..opq":
            paths.add(parent)
        elif name.startswith(".wh."):
            paths.add(posixpath.join(parent, name[4:]))
        if self.kind == "hardlink":
            paths.add(self.link)
        return paths


def _under(a: str, b: str) -> bool:
    """``a`` is ``b`` or inside it."""
    return a == b or b == "/" or a.startswith(b + "/")


def _interact(x: _Parsed, y: _Parsed) -> bool:
    return any(_under(p, q) or _under(q, p) for p in x.affects for q in y.affects)


def _parsed(path: Path) -> list[tuple[_Parsed, bytes]]:
    result = []
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        for index, info in enumerate(tar.getmembers()):
            kind = {
                tarfile.DIRTYPE: "dir",
                tarfile.LNKTYPE: "hardlink",
                tarfile.SYMTYPE: "symlink",
            }.get(info.type, "file")
            normal = posixpath.normpath("/" + info.name)
            link = posixpath.normpath("/" + info.linkname) if kind == "hardlink" else ""
            size = info.size if info.isreg() else 0
            raw = data[info.offset : info.offset_data + size + (-size % 512)]
            result.append((_Parsed(index, normal, kind, link), raw))
    return result


_NAMES = ["a", "b", "a/c", "a/c/d", "b/e"]
_LEAVES = ["x", "y", ".wh.x", ".wh..wh..opq"]


@st.composite
def _layers(draw: st.DrawFn) -> tuple[list[M], AccessProfile]:
    members: list[M] = []
    count = draw(st.integers(1, 25))
    for _ in range(count):
        kind = draw(st.sampled_from(["dir", "file", "file", "file", "hardlink", "symlink"]))
        parent = draw(st.sampled_from(["", *_NAMES]))
        if kind == "dir":
            name = draw(st.sampled_from(_NAMES))
        else:
            leaf = draw(st.sampled_from(_LEAVES))
            name = f"{parent}/{leaf}" if parent else leaf
        size = draw(st.integers(0, 1500))
        link = ""
        if kind == "hardlink":
            link = draw(st.sampled_from([m.name for m in members if m.kind == "file"] or ["x"]))
        elif kind == "symlink":
            link = "elsewhere"
        members.append(M(name + ("/" if kind == "dir" else ""), kind, bytes(size), link))
    if draw(st.booleans()):
        members = sorted(members, key=lambda m: (m.kind == "hardlink", m.name))
    paths = sorted({"/" + m.name.rstrip("/") for m in members})
    reads = draw(
        st.lists(
            st.tuples(st.sampled_from(paths), st.integers(0, 1600), st.integers(0, 50)), max_size=12
        )
    )
    return members, AccessProfile(tuple(ProfileRead(*r) for r in reads))


@settings(max_examples=300, deadline=None)
@given(_layers())
def test_any_layer_keeps_every_member_and_the_order_of_those_that_interact(
    case: tuple[list[M], AccessProfile],
) -> None:
    members, profile = case
    with tempfile.TemporaryDirectory() as scratch:
        source = _write_tar(Path(scratch, "in.tar"), members)
        order = profile_first_order(source, profile)
        assert order == profile_first_order(source, profile)
        write_member_order(source, order, Path(scratch, "out.tar"))
        before, after = _parsed(source), _parsed(Path(scratch, "out.tar"))
        assert Path(scratch, "out.tar").stat().st_size == source.stat().st_size
    # The new tar holds the same members, byte for byte: find where each one went.
    position: dict[int, int] = {}
    free: dict[bytes, list[int]] = {}
    for new_index, (_, raw) in enumerate(after):
        free.setdefault(raw, []).append(new_index)
    for parsed, raw in before:
        position[parsed.index] = free[raw].pop(0)
    # Same bytes for several members (duplicates): any assignment keeps the order of equal ones.
    for i, (x, _) in enumerate(before):
        for y, _ in before[i + 1 :]:
            if _interact(x, y):
                assert position[x.index] < position[y.index], (x, y)
    moved = [p for p, _ in before if position[p.index] < order.moved_members]
    assert len(moved) == order.moved_members
    assert (
        sum(p.kind == "file" and _is_ranked(p, members, profile) for p in moved)
        == order.moved_files
    )


def _is_ranked(p: _Parsed, members: list[M], profile: AccessProfile) -> bool:
    """A file (not a whiteout or marker) that one of the profile's reads starts inside."""
    if posixpath.basename(p.path).startswith(".wh."):
        return False
    size = len(members[p.index].data)
    aliases = {
        posixpath.normpath("/" + m.name)
        for m in members
        if m.kind == "hardlink" and posixpath.normpath("/" + m.link) == p.path
    }
    return size > 0 and any(r.path in aliases | {p.path} and r.offset < size for r in profile.reads)


# --------------------------------------------------------------------- ranks in the blob


def _layer_files(tmp_path: Path) -> tuple[list[M], AccessProfile]:
    rng = random.Random(3)
    members = [M("./", "dir"), M("lib/", "dir"), M("data/", "dir")]
    for i in range(30):
        members.append(M(f"data/f{i:02d}", data=rng.randbytes(rng.randint(5_000, 60_000))))
    members += [
        M("lib/big", data=rng.randbytes(400_000)),
        M("lib/alias", "hardlink", link="lib/big"),
    ]
    # lib/big is read in part (its first 150 kB, through the hardlink), the data files whole
    reads: list[tuple[str, int, int]] = [("/lib/alias", 0, 150_000)]
    reads += [(f"/data/f{i:02d}", 0, 70_000) for i in rng.sample(range(30), 12)]
    return members, AccessProfile(tuple(ProfileRead(*r) for r in reads))


def _chunks(toc: Toc) -> dict[tuple[str, int], ChunkRef]:
    return {
        (group[0].name, chunk.file_offset): chunk
        for group in group_file_entries(toc.entries)
        if group[0].type == "reg"
        for chunk in file_chunks(group)
    }


def test_ranks_are_unchanged_and_form_one_run_at_the_start_of_the_blob(tmp_path: Path) -> None:
    members, profile = _layer_files(tmp_path)
    source = _write_tar(tmp_path / "in.tar", members)
    order = profile_first_order(source, profile)
    write_member_order(source, order, tmp_path / "ordered.tar")
    config = ChunkingConfig(16 << 10, 32 << 10, 64 << 10, workers=1)
    kept = write_chunked_layer(source, tmp_path / "kept.zst", config, prefetch=profile)
    first = write_chunked_layer(
        tmp_path / "ordered.tar", tmp_path / "first.zst", config, prefetch=profile
    )
    kept_chunks, first_chunks = _chunks(kept.toc), _chunks(first.toc)
    ranks = {key: c.prefetch for key, c in first_chunks.items()}
    assert ranks == {key: c.prefetch for key, c in kept_chunks.items()}
    assert first.diff_id == Digest.of((tmp_path / "ordered.tar").read_bytes())
    # one run, cut once: by the part of lib/big (first in the profile) that nobody reads
    assert _runs(first_chunks.values()) == 2
    assert _runs(kept_chunks.values()) > 8
    ranked = sorted((c for c in first_chunks.values() if c.prefetch), key=lambda c: c.blob_offset)
    assert ranked[0].blob_offset < 2048  # after the directory headers


def _runs(chunks: Iterable[ChunkRef]) -> int:
    """Runs of ranked chunks in the blob, between chunks nobody prefetches."""
    ordered = sorted(chunks, key=lambda c: c.blob_offset)
    runs, previous = 0, False
    for chunk in ordered:
        ranked = chunk.prefetch > 0
        runs += ranked and not previous
        previous = ranked
    return runs


# ------------------------------------------------------------------------- end to end

needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
KIB = 1024
# The scattered image: the files its profile reads lie between files nobody reads, each gap
# wider than the mount's merge gap (32 KiB), so that in the tar's order every read file is a
# range of its own. What the profile reads (about 560 KiB) fits in one prefetch batch (1 MiB).
READ_DATA = [f"data/f{i:02d}" for i in random.Random(5).sample(range(0, 48, 2), 24)]
SCATTERED_READS = [
    "/app/config.txt",
    "/app/main.bin",
    *(f"/{path}" for path in READ_DATA),
    "/data/link07",  # a hardlink: its target data/f07 moves
    "/etc/new.conf",  # in a directory made opaque by the top layer
    "/app/lib/a.bin",
]


def _scattered_layers() -> list[list[Entry]]:
    base: list[Entry] = [
        directory("app"),
        directory("app/lib"),
        directory("data"),
        directory("etc"),
        regular_file("app/main.bin", random_bytes(200 * KIB, 1), 0o755),
        regular_file("app/lib/a.bin", random_bytes(100 * KIB, 2)),
        regular_file("etc/old.conf", b"hidden by the opaque marker\n"),
        hardlink("data/link07", "data/f07"),
    ]
    for i in range(48):
        size = 8 * KIB if i % 2 == 0 or i == 7 else 40 * KIB
        base.append(regular_file(f"data/f{i:02d}", random_bytes(size, 100 + i)))
    top: list[Entry] = [
        directory("app"),
        regular_file("app/config.txt", text_bytes(10_000, 3)),
        directory("data"),
        whiteout("data/f41"),
        directory("etc"),
        opaque_whiteout("etc"),
        regular_file("etc/new.conf", b"after the opaque marker\n"),
        symlink("app/current", "main.bin"),
    ]
    return [base, top]


@pytest.fixture(scope="module")
def scattered(tmp_path_factory: pytest.TempPathFactory) -> tuple[BuiltImage, Path]:
    work = tmp_path_factory.mktemp("scattered")
    image = write_image(work / "oci", "v1", _scattered_layers())
    profile = work / "profile.json"
    _profile(*((path, 0, MIB) for path in SCATTERED_READS)).save(profile)  # whole files
    return image, profile


@pytest.fixture(scope="module")
def feature_with_profile(tmp_path_factory: pytest.TempPathFactory) -> tuple[BuiltImage, Path]:
    work = tmp_path_factory.mktemp("feature-first")
    image = build_feature_image(work / "oci", "v1")
    reads = [
        ("/data/big-random.bin", MIB, 300 * KIB),
        ("/usr/bin/tool-alias", 0, 10),
        ("/etc/hostname", 0, 5),
        ("/opaque/new-b", 0, 5),
        ("/opaque/new-c", 0, 5),
        ("/home/user/notes.txt", 0, 5),
        ("/gone/reborn", 0, 5),
        ("/data/l3-link", 0, 5),
        ("/data/zeros.bin", 0, 4096),
        ("/becomes-dir/inner", 0, 5),
        ("/usr/bin/su", 0, 5),
        ("/data/hl/three", 0, 5),
        (f"/{LONG_DIR}/file", 0, 5),
        ("/data/big-text.txt", 0, 3 * MIB),
        ("/usr/bin/ping", 0, 5),
    ]
    profile = work / "profile.json"
    _profile(*reads).save(profile)
    return image, profile


def _convert(image: BuiltImage, profile: Path | None, dest: str, *extra: str) -> dict[str, Any]:
    prefetch = ("--prefetch", str(profile)) if profile else ()
    result = run_lazyfs("convert", "--json", *prefetch, *extra, image.reference, dest)
    summary: dict[str, Any] = json.loads(result.stdout)
    return summary


def _layout_manifest(layout: OciLayout, tag: str = "v1") -> Manifest:
    descriptor = layout.resolve(tag)
    return Manifest.parse(layout.read_blob(descriptor.digest), descriptor.media_type)


def _layout_tocs(layout: OciLayout) -> list[tuple[Descriptor, Toc]]:
    tocs = []
    for layer in _layout_manifest(layout).layers:
        section = parse_toc_position(layer.annotations[TOC_POSITION_ANNOTATION])
        compressed = layout.read_blob(layer.digest)[section.offset : section.end]
        data = zstandard.ZstdDecompressor().decompressobj().decompress(compressed)
        tocs.append((layer, Toc.parse(data)))
    return tocs


def _decompressed(blob: bytes) -> bytes:
    """The whole layer: every frame (zstd:chunked has one per chunk), skippable ones skipped."""
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True)
    return reader.read()


def _mtimes(root: Path) -> dict[str, int]:
    times = {".": root.lstat().st_mtime_ns}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath, name)
            times[path.relative_to(root).as_posix()] = path.lstat().st_mtime_ns
    return times


@pytest.mark.parametrize("which", ["feature", "scattered"])
def test_the_profile_first_image_unpacks_to_the_source_tree(
    which: str,
    feature_with_profile: tuple[BuiltImage, Path],
    scattered: tuple[BuiltImage, Path],
    tmp_path: Path,
) -> None:
    image, profile = feature_with_profile if which == "feature" else scattered
    out = tmp_path / "first"
    summary = _convert(image, profile, f"oci:{out}:v1")
    layers = summary["manifests"][0]["layers"]
    assert all(layer["profileFirst"]["files"] > 0 for layer in layers)
    assert sum(layer["profileFirst"]["keptFiles"] for layer in layers) == 0
    source_root = umoci_unpack(image.layout.path, "v1", tmp_path / "source")
    first_root = umoci_unpack(out, "v1", tmp_path / "unpacked")
    assert_trees_equal(tree_snapshot(source_root), tree_snapshot(first_root))
    # umoci sets a directory's times once it is done with it: they come out the same too.
    assert _mtimes(source_root) == _mtimes(first_root)


@pytest.mark.parametrize("which", ["feature", "scattered"])
def test_the_config_lists_the_new_diff_ids_and_skopeo_copies_the_image(
    which: str,
    feature_with_profile: tuple[BuiltImage, Path],
    scattered: tuple[BuiltImage, Path],
    tmp_path: Path,
) -> None:
    image, profile = feature_with_profile if which == "feature" else scattered
    out = tmp_path / "first"
    summary = _convert(image, profile, f"oci:{out}:v1")
    layout = OciLayout(out)
    manifest = _layout_manifest(layout)
    config = ImageConfig.parse(layout.read_blob(manifest.config.digest))
    tars = [_decompressed(layout.read_blob(layer.digest)) for layer in manifest.layers]
    assert config.diff_ids == tuple(Digest.of(tar) for tar in tars)
    assert [str(d) for d in config.diff_ids] == [
        layer["diffID"] for layer in summary["manifests"][0]["layers"]
    ]
    assert all(
        new != old
        for new, old in zip(config.diff_ids, (layer.diff_id for layer in image.layers), strict=True)
    )
    inspected = json.loads(skopeo_inspect(f"oci:{out}:v1"))
    assert inspected["Layers"] == [str(layer.digest) for layer in manifest.layers]
    skopeo_copy(f"oci:{out}:v1", f"dir:{tmp_path / 'dir'}")
    skopeo_copy(f"oci:{out}:v1", f"oci:{tmp_path / 'again'}:v1")  # checks every digest
    assert _layout_manifest(OciLayout(tmp_path / "again")) == manifest


def test_ranks_are_those_of_the_tar_order_and_one_run_at_the_start_of_each_layer(
    scattered: tuple[BuiltImage, Path], tmp_path: Path
) -> None:
    image, profile = scattered
    _convert(image, profile, f"oci:{tmp_path / 'first'}:v1")
    kept_layout = tmp_path / "kept"
    _convert(image, None, f"oci:{kept_layout}:v1")
    firsts = _layout_tocs(OciLayout(tmp_path / "first"))
    for layer, toc in firsts:
        chunks = _chunks(toc).values()
        assert _runs(chunks) == 1, layer.digest
        ranked = min(c.blob_offset for c in chunks if c.prefetch)
        assert ranked < 4096  # only the headers of the directories before it
    # The ranks are those that --prefetch gave before the layout existed: the same reads,
    # the same chunks (a chunk depends on the file's bytes only).
    old = _old_ranks(image, profile, tmp_path)
    new = {
        (toc_index, key): chunk.prefetch
        for toc_index, (_, toc) in enumerate(firsts)
        for key, chunk in _chunks(toc).items()
    }
    assert new == old


def _old_ranks(
    image: BuiltImage, profile: Path, tmp_path: Path
) -> dict[tuple[int, tuple[str, int]], int]:
    """The ranks ``mark_entries`` gives the TOCs of the tar order (the layout off)."""
    from lazyfs.formats.chunked.ranks import mark_entries

    profile_data = AccessProfile.load(profile)
    kept = _layout_tocs(OciLayout(tmp_path / "kept"))
    return {
        (index, key): chunk.prefetch
        for index, (_, toc) in enumerate(kept)
        for key, chunk in _chunks(Toc(mark_entries(toc.entries, profile_data))).items()
    }


def test_the_output_is_the_same_whatever_the_number_of_processes(
    feature_with_profile: tuple[BuiltImage, Path], tmp_path: Path
) -> None:
    image, profile = feature_with_profile
    digests = {
        _convert(image, profile, f"oci:{tmp_path / str(jobs)}:v1", "-j", str(jobs))["digest"]
        for jobs in (1, 3)
    }
    digests.add(_convert(image, profile, f"oci:{tmp_path / 'again'}:v1")["digest"])
    assert len(digests) == 1


def _blob_gets(registry: LocalRegistry, repository: str, layers: Sequence[Descriptor]) -> list[int]:
    summary = registry.access_log_summary()
    return [summary.count("GET", f"/v2/{repository}/blobs/{layer.digest}") for layer in layers]


def _mount_requests(
    registry: LocalRegistry, repository: str, reference: str, work: Path, *extra: str
) -> list[int]:
    """Blob GETs of each layer for a cold mount that prefetches and reads nothing else."""
    layers = _layers_of(reference)
    before = _blob_gets(registry, repository, layers)
    with mounted(reference, work / "mnt", work / "cache", *extra) as mnt:
        if "--no-prefetch" not in extra:
            _wait_for_prefetch(mnt)
        assert stats(mnt)["chunks_fetched"] == stats(mnt)["prefetch_chunks"]
    time.sleep(0.2)  # the registry writes its access log line after the response
    after = _blob_gets(registry, repository, layers)
    return [b - a for a, b in zip(before, after, strict=True)]


def _layers_of(reference: str) -> tuple[Descriptor, ...]:
    """The layers of the image at ``reference``, from its manifest alone (no blob GET)."""
    raw = skopeo_inspect(f"docker://{reference}", "--raw")
    return Manifest.parse(raw.encode(), OCI_MANIFEST).layers


@needs_fuse
def test_a_mount_prefetches_each_layer_in_one_request(
    scattered: tuple[BuiltImage, Path], registry: LocalRegistry, tmp_path: Path
) -> None:
    image, profile = scattered
    first = f"{registry.host}/scattered:first"
    plain = f"{registry.host}/scattered:plain"
    run_lazyfs("convert", "-q", "--prefetch", str(profile), image.reference, first)
    run_lazyfs("convert", "-q", image.reference, plain)
    # What a mount fetches of each layer blob without a prefetch: its TOC.
    tocs = _mount_requests(registry, "scattered", plain, tmp_path / "toc", "--no-prefetch")
    assert tocs == [1, 1]
    # The profile-first image, prefetching what its TOC ranks: one request per layer.
    ranked = _mount_requests(registry, "scattered", first, tmp_path / "first")
    assert [n - t for n, t in zip(ranked, tocs, strict=True)] == [1, 1]
    # The same profile on the tar order: 27 ranges in the base layer, in 2 requests.
    scattered_requests = _mount_requests(
        registry, "scattered", plain, tmp_path / "plain", "--prefetch", str(profile)
    )
    assert scattered_requests[0] - tocs[0] >= 2
    # And the reads find everything prefetched.
    with mounted(first, tmp_path / "mnt", tmp_path / "cache") as mnt:
        counters = _wait_for_prefetch(mnt)
        for path in SCATTERED_READS:
            data = (mnt / path.lstrip("/")).read_bytes()
            assert data, path
        assert stats(mnt)["range_requests"] == counters["range_requests"]
