"""mount.tree: the merged tree of layers, OCI whiteouts, hardlinks, nlink, inodes, timestamps."""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import os
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from lazyfs.config import ChunkingConfig
from lazyfs.convert.imagebuild import (
    FIXED_MTIME,
    Entry,
    block_device,
    char_device,
    directory,
    fifo,
    hardlink,
    layer_tar_bytes,
    opaque_whiteout,
    regular_file,
    symlink,
    tar_order,
    whiteout,
    with_parent_dirs,
)
from lazyfs.errors import TocError
from lazyfs.formats.chunked.toc import Toc, TocEntry, file_chunks, parse_rfc3339_ns
from lazyfs.formats.chunked.writer import write_chunked_layer
from lazyfs.model.verity import format_verity, fsverity_digest
from lazyfs.mount.tree import (
    ROOT_INODE,
    LayerChunk,
    Node,
    Tree,
    _split,
    build_layer_tree,
    build_tree,
    build_trees,
)

NS = 1_000_000_000
_TYPES = {
    "file": "reg",
    "dir": "dir",
    "symlink": "symlink",
    "hardlink": "hardlink",
    "char": "char",
    "block": "block",
    "fifo": "fifo",
}


def rfc3339(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def toc_entry(entry: Entry, offsets: Iterator[int]) -> TocEntry:
    """The TOC entry the writer would make for ``entry`` (single-chunk files, fake offsets)."""
    data = entry.data
    kind = _TYPES[entry.type]
    start = next(offsets) if data else 0
    return TocEntry(
        type=kind,
        name=entry.path + "/" if kind == "dir" else entry.path,  # upstream keeps dirs' slash
        link_name=entry.link,
        mode=entry.mode,
        size=len(data),
        uid=entry.uid,
        gid=entry.gid,
        modtime=rfc3339(entry.mtime),
        dev_major=entry.device[0],
        dev_minor=entry.device[1],
        xattrs=dict(entry.xattrs),
        digest="sha256:" + hashlib.sha256(data).hexdigest() if data else "",
        offset=start,
        end_offset=start + 5 if data else 0,
        verity=format_verity(fsverity_digest(data)) if data else "",
    )


def layer(*entries: Entry, keep_order: bool = False) -> list[TocEntry]:
    """A layer's TOC entries, in tar order (or as given), with fake blob offsets."""
    ordered = list(entries) if keep_order else tar_order(entries)
    offsets = itertools.count(100, 10)
    return [toc_entry(e, offsets) for e in ordered]


def paths(tree: Tree) -> dict[str, Node]:
    return {path.decode("utf-8", "surrogateescape"): node for path, node in tree.walk()}


def node_at(tree: Tree, path: str) -> Node:
    node = tree.root
    for part in path.strip("/").split("/"):
        found = tree.lookup(node.inode, part.encode())
        assert found is not None, f"{path}: no {part!r}"
        node = found
    return node


def missing(tree: Tree, path: str) -> bool:
    return path not in paths(tree)


# --- one layer ----------------------------------------------------------------------------------


def test_one_layer_every_kind() -> None:
    entries = with_parent_dirs(
        [
            directory("etc", 0o750, uid=1, gid=2, xattrs={"user.d": b"dir"}),
            regular_file("etc/conf", b"hello", 0o4640, uid=3, gid=4, xattrs={"user.a": b"\0"}),
            regular_file("etc/empty"),
            symlink("etc/link", "conf", uid=5),
            char_device("dev/null", 1, 3),
            block_device("dev/big", 4095 + 5, 70_000),
            fifo("run/pipe", 0o600),
        ]
    )
    tree = build_tree([layer(*entries)])
    conf = node_at(tree, "etc/conf")
    assert (conf.kind, conf.st_mode, conf.uid, conf.gid) == ("reg", stat.S_IFREG | 0o4640, 3, 4)
    assert conf.size == 5
    assert conf.mtime_ns == FIXED_MTIME * NS
    assert conf.xattrs == {b"user.a": b"\0"}
    assert conf.verity == format_verity(fsverity_digest(b"hello"))
    assert conf.layer == 0
    (chunk,) = conf.chunks
    assert chunk.layer == 0 and (chunk.ref.file_offset, chunk.ref.size) == (0, 5)
    assert conf.children is None and not conf.is_dir
    assert node_at(tree, "etc/empty").chunks == ()
    etc = node_at(tree, "etc")
    assert (etc.st_mode, etc.uid, etc.gid) == (stat.S_IFDIR | 0o750, 1, 2)
    assert etc.xattrs == {b"user.d": b"dir"}
    link = node_at(tree, "etc/link")
    assert (link.st_mode, link.target, link.uid) == (stat.S_IFLNK | 0o777, b"conf", 5)
    assert node_at(tree, "dev/null").st_mode == stat.S_IFCHR | 0o666
    assert node_at(tree, "dev/null").rdev == os.makedev(1, 3)
    assert node_at(tree, "dev/big").st_mode == stat.S_IFBLK | 0o660
    assert node_at(tree, "dev/big").rdev == os.makedev(4095 + 5, 70_000)
    assert node_at(tree, "run/pipe").st_mode == stat.S_IFIFO | 0o600
    assert set(paths(tree)) == {
        "/",
        "/dev",
        "/dev/big",
        "/dev/null",
        "/etc",
        "/etc/conf",
        "/etc/empty",
        "/etc/link",
        "/run",
        "/run/pipe",
    }


def test_empty_image_is_a_bare_root() -> None:
    tree = build_tree([])
    assert tree.root.inode == ROOT_INODE == 1
    assert tree.root.st_mode == stat.S_IFDIR | 0o755
    assert tree.root.nlink == 2
    assert list(tree.walk()) == [(b"/", tree.root)]
    assert tree.nodes == {1: tree.root}


def test_implicit_parent_directories() -> None:
    tree = build_tree([layer(regular_file("a/b/c", b"x", uid=7))])
    for path in ("a", "a/b"):
        node = node_at(tree, path)
        assert (node.kind, node.mode, node.uid, node.gid) == ("dir", 0o755, 0, 0)
    assert node_at(tree, "a/b/c").uid == 7


def test_explicit_directory_after_its_children_sets_metadata() -> None:
    entries = layer(regular_file("a/f", b"x"), directory("a", 0o700, uid=9), keep_order=True)
    tree = build_tree([entries])
    a = node_at(tree, "a")
    assert (a.mode, a.uid) == (0o700, 9)
    assert set(a.children or {}) == {b"f"}


def test_root_entry_sets_root_metadata() -> None:
    root = TocEntry(
        "dir", "./", mode=0o700, uid=3, gid=4, modtime="2023-11-14T22:13:20.25Z",
        xattrs={"user.r": b"1"},
    )  # fmt: skip
    tree = build_tree([[root, *layer(regular_file("f", b"x"))]])
    assert tree.root.st_mode == stat.S_IFDIR | 0o700
    assert (tree.root.uid, tree.root.gid) == (3, 4)
    assert tree.root.mtime_ns == FIXED_MTIME * NS + NS // 4
    assert tree.root.xattrs == {b"user.r": b"1"}
    assert tree.root.layer == 0
    assert set(paths(tree)) == {"/", "/f"}


@pytest.mark.parametrize("name", [".", "/", "./", ".//", "a/.."])
def test_root_spellings(name: str) -> None:
    tree = build_tree([[TocEntry("dir", name, mode=0o711)]])
    assert tree.root.mode == 0o711
    assert list(paths(tree)) == ["/"]


def test_names_are_normalized() -> None:
    entries = [
        TocEntry("dir", "./a/"),
        TocEntry("reg", "./a//b/../c"),
        TocEntry("reg", "../../escape"),
        TocEntry("reg", "/abs"),
    ]
    assert set(paths(build_tree([entries]))) == {"/", "/a", "/a/c", "/escape", "/abs"}


# --- whiteouts ----------------------------------------------------------------------------------


def test_whiteout_of_a_file() -> None:
    lower = layer(*with_parent_dirs([regular_file("a/x", b"1"), regular_file("a/y", b"2")]))
    tree = build_tree([lower, layer(whiteout("a/x"))])
    assert set(paths(tree)) == {"/", "/a", "/a/y"}
    assert node_at(tree, "a/y").layer == 0


def test_whiteout_of_a_directory_subtree() -> None:
    lower = layer(
        *with_parent_dirs([regular_file("a/b/c/d", b"1"), symlink("a/b/l", "c"), regular_file("z")])
    )
    tree = build_tree([lower, layer(whiteout("a/b"))])
    assert set(paths(tree)) == {"/", "/a", "/z"}
    assert len(tree.nodes) == 3  # root, a, z: nothing of the subtree keeps an inode
    assert node_at(tree, "a").nlink == 2


def test_whiteout_of_missing_path_and_whiteout_files_are_invisible() -> None:
    tree = build_tree(
        [layer(regular_file("f")), layer(whiteout("nothing"), whiteout("no/such/dir"))]
    )
    assert set(paths(tree)) == {"/", "/f"}


def test_whiteout_acts_only_on_lower_layers() -> None:
    # The same layer's whiteout does not delete that layer's own entry, whatever the order.
    for keep_first in (True, False):
        entries = [regular_file("f", b"new"), whiteout("f")]
        if not keep_first:
            entries.reverse()
        tree = build_tree([layer(regular_file("f", b"old")), layer(*entries, keep_order=True)])
        f = node_at(tree, "f")
        assert (f.layer, f.size) == (1, 3)


def test_whiteout_and_recreation_of_a_directory_in_one_layer() -> None:
    lower = layer(directory("a", 0o700), regular_file("a/old", b"1"), directory("a/sub"))
    upper = layer(whiteout("a"), directory("a", 0o755), regular_file("a/new", b"2"))
    tree = build_tree([lower, upper])
    assert set(paths(tree)) == {"/", "/a", "/a/new"}
    assert node_at(tree, "a").mode == 0o755
    assert node_at(tree, "a").layer == 1


def test_opaque_directory_hides_lower_entries_only() -> None:
    lower = layer(
        *with_parent_dirs([regular_file("d/x", b"1"), regular_file("d/sub/y"), regular_file("k")])
    )
    # The marker sorts before "new", but the layer's own entries survive in either order.
    for upper_entries in (
        [directory("d", 0o711), opaque_whiteout("d"), regular_file("d/new", b"2")],
        [regular_file("d/new", b"2"), directory("d", 0o711), opaque_whiteout("d")],
    ):
        tree = build_tree([lower, layer(*upper_entries, keep_order=True)])
        assert set(paths(tree)) == {"/", "/d", "/d/new", "/k"}
        assert node_at(tree, "d").mode == 0o711


def test_opaque_marker_without_directory_entry_keeps_the_directory() -> None:
    lower = layer(directory("d", 0o700, uid=5), regular_file("d/x", b"1"))
    tree = build_tree([lower, layer(opaque_whiteout("d"))])
    assert set(paths(tree)) == {"/", "/d"}
    assert (node_at(tree, "d").mode, node_at(tree, "d").uid) == (0o700, 5)


def test_opaque_at_the_root() -> None:
    tree = build_tree(
        [layer(regular_file("a"), directory("b")), layer(regular_file(".wh..wh..opq"))]
    )
    assert set(paths(tree)) == {"/"}


# --- replacing across layers --------------------------------------------------------------------


def test_file_replaced_by_directory() -> None:
    tree = build_tree(
        [layer(regular_file("p", b"file")), layer(directory("p", 0o750), regular_file("p/c"))]
    )
    p = node_at(tree, "p")
    assert (p.kind, p.mode, p.layer) == ("dir", 0o750, 1)
    assert set(paths(tree)) == {"/", "/p", "/p/c"}


def test_file_replaced_by_implicit_directory() -> None:
    tree = build_tree([layer(regular_file("p", b"file")), layer(regular_file("p/c", b"x"))])
    assert node_at(tree, "p").is_dir
    assert set(paths(tree)) == {"/", "/p", "/p/c"}


def test_directory_replaced_by_file() -> None:
    lower = layer(*with_parent_dirs([regular_file("p/c/d", b"1"), regular_file("p/e")]))
    tree = build_tree([lower, layer(regular_file("p", b"now a file"))])
    p = node_at(tree, "p")
    assert (p.kind, p.size, p.children) == ("reg", 10, None)
    assert set(paths(tree)) == {"/", "/p"}
    assert len(tree.nodes) == 2


def test_directory_replaced_by_symlink() -> None:
    lower = layer(*with_parent_dirs([regular_file("p/c", b"1")]))
    tree = build_tree([lower, layer(symlink("p", "elsewhere"))])
    assert node_at(tree, "p").kind == "symlink"
    assert set(paths(tree)) == {"/", "/p"}


def test_directory_over_directory_merges_and_takes_upper_metadata() -> None:
    lower = layer(
        directory("d", 0o700, uid=1, gid=1, xattrs={"user.old": b"1"}), regular_file("d/a", b"1")
    )
    upper = layer(
        directory("d", 0o755, uid=2, gid=3, xattrs={"user.new": b"2"}), regular_file("d/b", b"2")
    )
    tree = build_tree([lower, upper])
    d = node_at(tree, "d")
    assert (d.mode, d.uid, d.gid, d.layer) == (0o755, 2, 3, 1)
    assert d.xattrs == {b"user.new": b"2"}
    assert set(paths(tree)) == {"/", "/d", "/d/a", "/d/b"}
    assert node_at(tree, "d/a").layer == 0 and node_at(tree, "d/b").layer == 1


def test_upper_file_replaces_lower_file() -> None:
    tree = build_tree([layer(regular_file("f", b"old", 0o600)), layer(regular_file("f", b"newer"))])
    f = node_at(tree, "f")
    assert (f.size, f.mode, f.layer) == (5, 0o644, 1)
    assert f.chunks[0].layer == 1


# --- hardlinks and nlink ------------------------------------------------------------------------


def hardlinked_layer() -> list[TocEntry]:
    return layer(
        *with_parent_dirs(
            [
                regular_file("a/f", b"shared", 0o640, uid=4),
                hardlink("a/g", "a/f"),
                hardlink("b/h", "a/f"),
                regular_file("a/other", b"x"),
            ]
        )
    )


def test_hardlinks_share_one_node() -> None:
    tree = build_tree([hardlinked_layer()])
    f, g, h = node_at(tree, "a/f"), node_at(tree, "a/g"), node_at(tree, "b/h")
    assert f is g is h
    assert f.nlink == 3
    assert (f.kind, f.size, f.mode, f.uid) == ("reg", 6, 0o640, 4)
    assert node_at(tree, "a/other").nlink == 1
    walked = [path for path, node in tree.walk() if node is f]
    assert walked == [b"/a/f", b"/a/g", b"/b/h"]
    assert len({id(n) for n in tree.nodes.values()}) == len(tree.nodes)
    assert sum(1 for n in tree.nodes.values() if n is f) == 1


def test_nlink_after_whiteout_of_one_name() -> None:
    tree = build_tree([hardlinked_layer(), layer(whiteout("a/g"))])
    assert node_at(tree, "a/f").nlink == 2
    assert node_at(tree, "a/f") is node_at(tree, "b/h")


def test_nlink_after_whiteout_of_the_original_name() -> None:
    tree = build_tree([hardlinked_layer(), layer(whiteout("a/f"), whiteout("b"))])
    g = node_at(tree, "a/g")
    assert (g.nlink, g.size, g.layer) == (1, 6, 0)
    assert set(paths(tree)) == {"/", "/a", "/a/g", "/a/other"}


def test_nlink_after_upper_layer_replaces_one_name() -> None:
    tree = build_tree([hardlinked_layer(), layer(regular_file("a/f", b"replaced"))])
    assert node_at(tree, "a/f").nlink == 1
    assert node_at(tree, "a/g").nlink == 2
    assert node_at(tree, "a/g") is node_at(tree, "b/h")


def test_hardlink_listed_before_its_target() -> None:
    entries = layer(hardlink("b", "d/a"), regular_file("d/a", b"x"), keep_order=True)
    tree = build_tree([entries])
    assert node_at(tree, "b") is node_at(tree, "d/a")
    assert node_at(tree, "b").nlink == 2


def test_hardlink_to_a_lower_layer_file() -> None:
    tree = build_tree([layer(regular_file("f", b"x")), layer(hardlink("g", "f"))])
    assert node_at(tree, "g") is node_at(tree, "f")
    assert node_at(tree, "f").nlink == 2


def test_hardlink_to_a_symlink() -> None:
    tree = build_tree([layer(symlink("s", "t"), hardlink("h", "s"))])
    assert node_at(tree, "h") is node_at(tree, "s")
    assert node_at(tree, "s").nlink == 2


@pytest.mark.parametrize(
    "entries",
    [
        pytest.param([hardlink("g", "missing")], id="missing"),
        pytest.param([hardlink("g", "d/missing"), directory("d")], id="missing-in-dir"),
        pytest.param([directory("d"), hardlink("g", "d")], id="to-directory"),
        pytest.param([hardlink("g", "")], id="empty-target"),
        pytest.param([hardlink("g", "/")], id="to-root"),
        pytest.param([regular_file("f"), hardlink("g", "f/x")], id="through-a-file"),
    ],
)
def test_bad_hardlink_raises_toc_error(entries: list[Entry]) -> None:
    with pytest.raises(TocError):
        build_tree([layer(*entries, keep_order=True)])


def test_hardlink_to_a_whited_out_file_raises() -> None:
    with pytest.raises(TocError):
        build_tree([layer(regular_file("f")), layer(whiteout("f"), hardlink("g", "f"))])


def test_regular_file_after_hardlink_of_same_path_wins() -> None:
    entries = layer(
        regular_file("a", b"A"),
        hardlink("b", "a"),
        regular_file("b", b"BB"),
        keep_order=True,
    )
    tree = build_tree([entries])
    assert node_at(tree, "b").size == 2
    assert node_at(tree, "a").nlink == 1


def test_hardlink_keeps_the_file_it_linked_when_the_path_is_replaced_later() -> None:
    entries = layer(
        regular_file("a", b"first"),
        hardlink("b", "a"),
        regular_file("a", b"second!"),
        keep_order=True,
    )
    tree = build_tree([entries])
    assert node_at(tree, "b").size == 5
    assert node_at(tree, "a").size == 7


# --- directory nlink, inodes, walk --------------------------------------------------------------


def test_directory_nlink_is_two_plus_subdirectories() -> None:
    entries = with_parent_dirs(
        [
            directory("d/s1"),
            directory("d/s2"),
            regular_file("d/f"),
            symlink("d/l", "s1"),
            directory("d/s1/deep"),
            directory("e"),
        ]
    )
    tree = build_tree([layer(*entries)])
    assert node_at(tree, "d").nlink == 4
    assert node_at(tree, "d/s1").nlink == 3
    assert node_at(tree, "d/s2").nlink == 2
    assert tree.root.nlink == 4
    assert node_at(tree, "d/f").nlink == 1


def test_inode_numbers_unique_and_dense() -> None:
    tree = build_tree([hardlinked_layer(), layer(*with_parent_dirs([regular_file("x/y/z")]))])
    assert tree.root.inode == ROOT_INODE == 1
    assert sorted(tree.nodes) == list(range(1, len(tree.nodes) + 1))
    for inode, node in tree.nodes.items():
        assert node.inode == inode
    distinct = {id(node) for _path, node in tree.walk()}
    assert len(distinct) == len(tree.nodes)
    for inode, listing in tree.listings.items():
        assert tree.nodes[inode].is_dir
        names = [name for name, _node in listing]
        assert names == sorted(names)
        for _name, child in listing:
            assert tree.nodes[child.inode] is child


def test_build_is_deterministic() -> None:
    layers = [hardlinked_layer(), layer(*with_parent_dirs([regular_file("x/y/z")]))]
    first = [(path, node.inode) for path, node in build_tree(layers).walk()]
    second = [(path, node.inode) for path, node in build_tree(layers).walk()]
    assert first == second


def test_walk_paths_depth_first_sorted() -> None:
    entries = with_parent_dirs(
        [regular_file("b/z"), regular_file("b/a"), regular_file("a"), directory("c/d")]
    )
    tree = build_tree([layer(*entries)])
    walked = [path for path, _node in tree.walk()]
    assert walked == [b"/", b"/a", b"/b", b"/b/a", b"/b/z", b"/c", b"/c/d"]
    assert all(isinstance(path, bytes) for path in walked)


def test_walk_non_utf8_names() -> None:
    tree = build_tree([[TocEntry("reg", "caf\udce9")]])
    assert [path for path, _ in tree.walk()] == [b"/", b"/caf\xe9"]
    assert tree.lookup(ROOT_INODE, b"caf\xe9") is not None


def test_lookup() -> None:
    tree = build_tree([layer(regular_file("f"))])
    f = tree.lookup(ROOT_INODE, b"f")
    assert f is not None and f.kind == "reg"
    assert tree.lookup(ROOT_INODE, b"g") is None
    assert tree.lookup(f.inode, b"anything") is None
    assert f.path == "/f"


# --- chunks through the tree --------------------------------------------------------------------


def multi_chunk_group(layer_index_name: str = "big") -> list[TocEntry]:
    return [
        TocEntry("reg", layer_index_name, size=30, offset=100, end_offset=400, chunk_size=10),
        TocEntry("chunk", layer_index_name, offset=200, chunk_offset=10, chunk_size=12),
        TocEntry("chunk", layer_index_name, offset=300, chunk_offset=22, chunk_size=8),
    ]


def test_multi_chunk_file_nodes_carry_layer_chunks() -> None:
    group = multi_chunk_group()
    tree = build_tree([[TocEntry("dir", "x")], [TocEntry("dir", "d"), *group]])
    big = node_at(tree, "big")
    assert big.chunks == tuple(LayerChunk(1, ref) for ref in file_chunks(group))
    assert [c.ref.size for c in big.chunks] == [10, 12, 8]


def test_bad_chunks_raise_toc_error() -> None:
    group = multi_chunk_group()
    with pytest.raises(TocError):
        build_tree([[group[0], group[2]]])  # a gap
    with pytest.raises(TocError):
        build_tree([[TocEntry("dir", "d"), group[1]]])  # chunk without its reg


# --- timestamps ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 0),
        ("1970-01-01T00:00:00Z", 0),
        ("2023-11-14T22:13:20Z", FIXED_MTIME * NS),
        ("2023-11-14T22:13:20z", FIXED_MTIME * NS),
        ("2023-11-14T22:13:20.5Z", FIXED_MTIME * NS + 500_000_000),
        ("2023-11-14T22:13:20.000000001Z", FIXED_MTIME * NS + 1),
        ("2023-11-14T22:13:20.123456789Z", FIXED_MTIME * NS + 123_456_789),
        ("2023-11-14T22:13:20.1234567891234Z", FIXED_MTIME * NS + 123_456_789),
        ("2023-11-15T00:13:20+02:00", FIXED_MTIME * NS),
        ("2023-11-15T00:13:20.25+02:00", FIXED_MTIME * NS + 250_000_000),
        ("2023-11-14T16:43:20-05:30", FIXED_MTIME * NS),
        ("2023-11-14T22:13:20+00:00", FIXED_MTIME * NS),
        ("2023-11-14T22:13:20", FIXED_MTIME * NS),  # no zone: UTC
        ("1969-12-31T23:59:59.5Z", -500_000_000),
        ("1969-12-31T23:59:58Z", -2 * NS),
    ],
)
def test_parse_rfc3339_ns(text: str, expected: int) -> None:
    assert parse_rfc3339_ns(text) == expected


@pytest.mark.parametrize(
    "text", ["garbage", "2023-13-01T00:00:00Z", "2023-11-14T25:00:00Z", "Z", "2023-11-14T22:13:20+"]
)
def test_parse_rfc3339_ns_rejects(text: str) -> None:
    with pytest.raises(TocError):
        parse_rfc3339_ns(text)


@pytest.mark.parametrize(
    "text",
    [
        "2023-11-14T22:13:20.abcZ",
        "2023-11-14T22:13:20.-5Z",
        "2023-11-14T22:13:20.+5Z",
        "2023-11-14T22:13:20.1_0Z",
        "2023-11-14T22:13:20.\u0663Z",
    ],
)
def test_parse_rfc3339_ns_rejects_bad_fractions(text: str) -> None:
    with pytest.raises(TocError):
        parse_rfc3339_ns(text)


def test_modtime_reaches_nodes() -> None:
    tree = build_tree([[TocEntry("reg", "f", modtime="2023-11-14T22:13:20.123456789Z")]])
    assert node_at(tree, "f").mtime_ns == FIXED_MTIME * NS + 123_456_789
    with pytest.raises(TocError):
        build_tree([[TocEntry("reg", "f", modtime="yesterday")]])


# --- names and xattrs that are not valid text ---------------------------------------------------


@pytest.mark.parametrize("field", ["name", "linkName"])
def test_lone_surrogate_in_toc_is_not_a_crash(field: str) -> None:
    data = b'{"version":1,"entries":[{"type":"symlink","name":"s","' + field.encode()
    data += b'":"x\\ud800"}]}'
    with contextlib.suppress(TocError):  # rejecting the TOC is fine too
        build_tree([Toc.parse(data).entries])


def test_non_utf8_xattr_name() -> None:
    tree = build_tree([[TocEntry("reg", "f", xattrs={"user.\udcff": b"v"})]])
    assert node_at(tree, "f").xattrs == {b"user.\xff": b"v"}


# --- the same layers through the real writer ----------------------------------------------------


def written_layer(entries: list[Entry], work: Path, index: int) -> list[TocEntry]:
    tar_path, blob_path = work / f"{index}.tar", work / f"{index}.zst"
    tar_path.write_bytes(layer_tar_bytes(entries))
    config = ChunkingConfig(min_chunk_bytes=1024, avg_chunk_bytes=4096, max_chunk_bytes=16384)
    return list(write_chunked_layer(tar_path, blob_path, config).toc.entries)


def summary(tree: Tree) -> dict[str, tuple[str, int, int, int, int, bytes]]:
    return {
        path: (node.kind, node.mode, node.size, node.nlink, node.layer, node.target)
        for path, node in paths(tree).items()
    }


def test_writer_layers_give_the_same_tree() -> None:
    big = bytes(range(256)) * 200
    layers = [
        with_parent_dirs(
            [
                regular_file("a/f", b"shared"),
                hardlink("a/g", "a/f"),
                regular_file("a/big", big),
                regular_file("d/x", b"1"),
                symlink("a/l", "f"),
                regular_file("gone/y"),
            ]
        ),
        with_parent_dirs(
            [whiteout("gone"), opaque_whiteout("d"), regular_file("d/new"), directory("a", 0o700)]
        ),
    ]
    with tempfile.TemporaryDirectory() as work:
        written = [written_layer(entries, Path(work), i) for i, entries in enumerate(layers)]
    expected = build_tree([layer(*entries) for entries in layers])
    actual = build_tree(written)
    assert summary(actual) == summary(expected)
    assert len(node_at(actual, "a/big").chunks) > 1
    with tarfile.open(fileobj=io.BytesIO(layer_tar_bytes(layers[0]))) as tar:
        assert len(tar.getmembers()) == len(layers[0])


# --- building the merged tree and the layers' own trees at once ---------------------------------


def _shape(tree: Tree) -> list[tuple[object, ...]]:
    """Everything a mount shows of a tree, inode by inode."""
    return [
        (inode, n.kind, n.st_mode, n.uid, n.gid, n.size, n.mtime_ns, n.rdev, n.target,
         sorted(n.xattrs.items()), [(c.layer, c.ref) for c in n.chunks], n.verity, n.layer,
         n.nlink, n.path, [(name, child.inode) for name, child in tree.listings.get(inode, ())])
        for inode, n in sorted(tree.nodes.items())
    ]  # fmt: skip


def test_build_trees_is_build_tree_and_build_layer_tree() -> None:
    lower = layer(
        *with_parent_dirs(
            [
                regular_file("a/f", b"lower", xattrs={"trusted.overlay.x": b"1"}),
                regular_file("a/gone", b"x"),
                directory("d"),
                regular_file("d/old", b"o"),
            ]
        )
    )
    upper = layer(
        regular_file("a/f", b"upper"),
        whiteout("a/gone"),
        opaque_whiteout("d"),
        regular_file("d/new", b"n"),
        hardlink("a/h", "a/f"),
    )
    merged, own = build_trees([lower, upper], per_layer=True)
    assert _shape(merged) == _shape(build_tree([lower, upper]))
    assert [_shape(t) for t in own] == [
        _shape(build_layer_tree(lower, 0)),
        _shape(build_layer_tree(upper, 1)),
    ]
    assert build_trees([lower, upper])[1] == ()
    # The chunks of a file are worked out once, for both trees.
    assert node_at(merged, "a/f").chunks is node_at(own[1], "a/f").chunks
    assert node_at(own[1], "a/gone").kind == "char"  # overlayfs whiteout in the layer's tree
    assert node_at(own[1], "d").xattrs == {b"trusted.overlay.opaque": b"y"}
    assert node_at(own[0], "a/f").xattrs == {}  # an image's own trusted.overlay.* is dropped


def test_directory_replaced_by_a_file_then_recreated_within_one_layer() -> None:
    """Entries after a replaced directory must not land in it (the builders remember the last
    parent directory they found)."""
    entries = layer(
        directory("a"),
        regular_file("a/x", b"x"),
        regular_file("a", b"file now"),
        regular_file("a/y", b"y"),
        keep_order=True,
    )
    for tree in (build_tree([entries]), build_layer_tree(entries, 0)):
        assert set(paths(tree)) == {"/", "/a", "/a/y"}
        assert node_at(tree, "a").kind == "dir"


def test_whiteout_device_replacing_a_directory_within_one_layer() -> None:
    entries = layer(
        directory("a"),
        regular_file("a/x", b"x"),
        whiteout("a"),
        regular_file("a/y", b"y"),
        keep_order=True,
    )
    tree = build_layer_tree(entries, 0)
    assert set(paths(tree)) == {"/", "/a", "/a/y"}


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("a/b/c", [b"a", b"b", b"c"]),
        ("./a//b/./c/", [b"a", b"b", b"c"]),
        ("/a/../b/c", [b"b", b"c"]),
        ("../../a", [b"a"]),
        ("a/..", []),
        (".", []),
        ("a/.../..b", [b"a", b"...", b"..b"]),
        ("d\udcff/x", [b"d\xff", b"x"]),
        ("..\ud800/x", ["..\ud800".encode("utf-8", "surrogatepass"), b"x"]),
    ],
)
def test_split_resolves_names_from_the_root(name: str, parts: list[bytes]) -> None:
    assert _split(name) == parts
