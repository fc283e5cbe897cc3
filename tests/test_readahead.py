"""Readahead: the bandwidth-delay window, the chunks that follow a miss (the rest of the file,
its source, the next files of its directory and their shares), and the replay of a profile
against read-ahead policies (bench/readaheadsim.py)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import cast

from lazyfs.bench.readaheadsim import replay, touched_chunks
from lazyfs.config import ResolverConfig
from lazyfs.formats.chunked.toc import ChunkRef, TocEntry
from lazyfs.model.profiles import AccessProfile, ProfileRead
from lazyfs.mount.opener import OpenedImage
from lazyfs.mount.readahead import (
    SOURCES,
    Ahead,
    BlobIndex,
    LinkEstimate,
    ReadaheadBudget,
    plan_ahead,
)
from lazyfs.mount.tree import LayerChunk, Node, Tree, build_tree, build_trees


def test_window_is_the_bandwidth_delay_product_within_bounds() -> None:
    link = LinkEstimate()
    assert link.window_bytes(64 << 10, 4 << 20) == 64 << 10  # nothing measured yet
    link.record(4096, 0.05)  # a small request: RTT 50 ms
    link.record(1_050_000, 0.05 + 0.084)  # 1.05 MB in 84 ms after the RTT: 12.5 MB/s
    window = link.window_bytes(64 << 10, 4 << 20)
    assert 500_000 < window < 750_000  # about 12.5 MB/s x 50 ms
    assert link.window_bytes(64 << 10, 100_000) == 100_000


def test_loopback_like_link_keeps_the_minimum() -> None:
    link = LinkEstimate()
    for _ in range(5):
        link.record(4096, 0.0003)
        link.record(1 << 20, 0.0003 + 0.001)
    assert link.window_bytes(64 << 10, 4 << 20) <= 1 << 20


def _node(inode: int, offsets: list[tuple[int, int]], layer: int = 0) -> Node:
    chunks = tuple(
        LayerChunk(
            layer, ChunkRef(0, 10, start, end, f"sha256:{inode}-{start}", f"v{inode}-{start}")
        )
        for start, end in offsets
    )
    return Node(kind="reg", mode=0o644, size=10, chunks=chunks, inode=inode, path=f"/f{inode}")


def test_following_walks_blob_order_across_files_until_the_budget() -> None:
    a, b, c = _node(2, [(100, 200)]), _node(3, [(200, 300)]), _node(4, [(300, 400), (400, 500)])
    root = Node(kind="dir", mode=0o755, inode=1, children={})
    tree = Tree({1: root, 2: a, 3: b, 4: c}, {1: ()})
    index = BlobIndex.of_tree(tree)
    following = index.following(a.chunks[0], 250)
    assert [chunk.ref.blob_offset for _, chunk in following] == [200, 300, 400]
    assert [node.inode for node, _ in following] == [3, 4, 4]
    assert index.following(c.chunks[1], 1000) == []
    assert index.following(a.chunks[0], 0) == []


def test_ahead_of_takes_the_rest_of_the_file_then_the_next_files() -> None:
    a = _node(2, [(0, 100), (100, 200), (200, 300)])
    b, c = _node(3, [(300, 350)]), _node(4, [(350, 450), (450, 550)])
    root = Node(kind="dir", mode=0o755, inode=1, children={})
    index = BlobIndex.of_tree(Tree({1: root, 2: a, 3: b, 4: c}, {1: ()}))

    def offsets(picked: list[tuple[Node, LayerChunk]]) -> list[int]:
        return [chunk.ref.blob_offset for _, chunk in picked]

    # the whole rest of the file, whatever the next files' share
    assert offsets(index.ahead_of(a.chunks[0], a, 200, 0)) == [100, 200]
    # then the next files, each chunk only if it fits
    assert offsets(index.ahead_of(a.chunks[0], a, 200, 160)) == [100, 200, 300, 350]
    # a file longer than its share: nothing of the files after it
    assert offsets(index.ahead_of(a.chunks[0], a, 150, 1000)) == [100]
    # the missed chunk was the file's last: straight to the next files
    assert offsets(index.ahead_of(a.chunks[2], a, 1000, 50)) == [300]


def test_reads_of_a_layers_own_tree_are_read_ahead_as_the_merged_trees() -> None:
    """A layer store reads through each layer's own tree, whose nodes and inode numbers are
    not the merged tree's the index was built from: the files are matched by path."""
    lower = _file_entries("a/x", [10], 0)
    upper = _file_entries("b/big", [10, 10, 10], 0) + _file_entries("b/next", [10], 30)
    merged, layers = build_trees([lower, upper], per_layer=True)
    index = BlobIndex.of_tree(merged)
    big, own_big = merged.find("/b/big"), layers[1].find("/b/big")
    assert big is not None and own_big is not None
    assert own_big is not big and own_big.inode != big.inode
    # the rest of the file comes within the file's allowance, the next file within the other
    picked = index.ahead_of(own_big.chunks[0], own_big, 20, 10)
    assert [(n.path, c.ref.blob_offset) for n, c in picked] == [
        ("/b/big", 10), ("/b/big", 20), ("/b/next", 30),
    ]  # fmt: skip
    assert picked == index.ahead_of(big.chunks[0], big, 20, 10)


def test_budget_allows_as_much_ahead_as_reads_needed() -> None:
    budget = ReadaheadBudget()
    assert budget.allowance_bytes == 0
    budget.missed(100)
    assert budget.allowance_bytes == 100
    budget.fetched_ahead("a", 60, 60)
    budget.fetched_ahead("b", 40, 90)
    assert budget.allowance_bytes == 0
    budget.read("a")  # a guess that paid off earns its (uncompressed) bytes back
    assert budget.allowance_bytes == 60
    budget.read("b")
    assert budget.allowance_bytes == 150
    assert budget.used_bytes == 100
    budget.read("a")  # once
    budget.read("never-fetched-ahead")
    assert budget.allowance_bytes == 150


def test_budget_credit_and_directory_shares() -> None:
    budget = ReadaheadBudget(credit_bytes=50)
    assert budget.allowance_bytes == 50  # the rest of a first file, before any read needed
    assert budget.directory_share("/d", 100, 3.0) == 100  # nothing known yet: the first share
    budget.fetched_ahead("a", 40, 40, "/d")
    budget.fetched_ahead("b", 40, 40, "/d")
    budget.fetched_ahead("own", 30, 30)  # the missed file's rest: no directory pays
    assert budget.directory_share("/d", 100, 3.0) == 20
    assert budget.directory_share("/e", 100, 3.0) == 100  # each directory has its own
    budget.read("a")  # used: earns three times its bytes
    assert budget.directory_share("/d", 100, 3.0) == 140
    budget.fetched_ahead("c", 200, 200, "/d")
    assert budget.directory_share("/d", 100, 3.0) == 0  # never below nothing
    assert budget.directory_share("/d", 100, 3.0, least_bytes=16) == 16  # or the least
    budget.read("own")
    assert budget.used_bytes == 70
    assert budget.allowance_bytes == 0  # 50 + 70 needed - 310 ahead


def _package_tree() -> Tree:
    """A package, as a tar of a Python install lays it out: the directory's own files, then
    its __pycache__ (name order), then its modules; then another directory."""
    files = [
        ("p/__init__.py", [10]),
        ("p/__pycache__/__init__.cpython-311.pyc", [10, 10]),
        ("p/__pycache__/a.cpython-311.pyc", [10, 10]),
        ("p/__pycache__/b.cpython-311.pyc", [10]),
        ("p/a.py", [10]),
        ("p/b.py", [10]),
        ("q/__pycache__/c.cpython-311.pyc", [10]),
        ("q/c.py", [10]),
    ]
    entries: list[TocEntry] = []
    start = 0
    for name, sizes in files:
        entries += _file_entries(name, sizes, start)
        start += 10 * len(sizes)
    return build_tree([entries])


def _places(picked: list[Ahead]) -> list[tuple[str, int, str | None]]:
    return [(a.node.path, a.chunk.ref.file_offset, a.directory) for a in picked]


_CACHE = "/p/__pycache__"
_A_PYC = "/p/__pycache__/a.cpython-311.pyc"
_A = [(_A_PYC, 0, _CACHE), (_A_PYC, 10, _CACHE), ("/p/a.py", 0, _CACHE)]
_B = [("/p/__pycache__/b.cpython-311.pyc", 0, _CACHE), ("/p/b.py", 0, _CACHE)]


def test_ahead_in_directory_takes_the_file_its_source_then_its_directory() -> None:
    tree = _package_tree()
    index = BlobIndex.of_tree(tree)
    init = tree.find("/p/__pycache__/__init__.cpython-311.pyc")
    assert init is not None
    own = [(init.path, 10, None), ("/p/__init__.py", 0, SOURCES)]
    # the rest of the file, its source (not next in the blob), then the next files of its
    # directory, each whole with its source; q's files are another directory
    assert _places(index.ahead_in_directory(init.chunks[0], init, 100, 1000)) == own + _A + _B
    # the directory's share: a (30 bytes with its source) fits, then b (20) does not
    assert _places(index.ahead_in_directory(init.chunks[0], init, 100, 30)) == own + _A
    # a file too big for what is left is passed over: b still fits
    assert _places(index.ahead_in_directory(init.chunks[0], init, 100, 25)) == own + _B
    # a file here already costs nothing, and is not taken again (nor its source)
    a_pyc = tree.find("/p/__pycache__/a.cpython-311.pyc")
    assert a_pyc is not None
    here = {chunk.ref.blob_offset for chunk in a_pyc.chunks}
    passed = index.ahead_in_directory(
        init.chunks[0], init, 100, 20, lambda chunk: chunk.ref.blob_offset in here
    )
    assert _places(passed) == own + _B
    # a source that does not fit in what the file's rest left is not taken
    assert _places(index.ahead_in_directory(init.chunks[0], init, 15, 0)) == [(init.path, 10, None)]
    # a source file has no source; the last of a directory has no next files
    b_py = tree.find("/p/b.py")
    assert b_py is not None
    assert index.ahead_in_directory(b_py.chunks[0], b_py, 100, 1000) == []


def test_plan_ahead_gives_a_directory_less_when_its_read_ahead_goes_unused() -> None:
    tree = _package_tree()
    index = BlobIndex.of_tree(tree)
    config = ResolverConfig(
        readahead_directory_bytes=30,
        readahead_directory_gain=3.0,
        readahead_directory_min_bytes=0,
    )
    budget = ReadaheadBudget(credit_bytes=1000)
    init = tree.find("/p/__pycache__/__init__.cpython-311.pyc")
    assert init is not None
    first = plan_ahead(index, budget, init.chunks[0], init, config, 1000)
    assert [place for place in _places(first) if place[2] == _CACHE] == _A
    for ahead in first:
        budget.fetched_ahead(_key(ahead), 10, 10, ahead.directory)
    # nothing of a.pyc read yet: the directory's first 30 bytes are spent, nothing more
    assert all(
        a.directory != _CACHE for a in plan_ahead(index, budget, init.chunks[0], init, config, 99)
    )
    # with a least share, a probe still goes out
    probing = ResolverConfig(readahead_directory_bytes=30, readahead_directory_min_bytes=20)
    assert _places(plan_ahead(index, budget, init.chunks[0], init, probing, 99))[2:] == _B
    budget.read(_key(first[2]))  # a.pyc was read: 30 + 3 x 10 - 30 = 30 for the directory
    a_pyc = tree.find("/p/__pycache__/a.cpython-311.pyc")
    assert a_pyc is not None
    assert _places(plan_ahead(index, budget, a_pyc.chunks[0], a_pyc, config, 1000)) == [
        ("/p/__pycache__/a.cpython-311.pyc", 10, None),
        ("/p/a.py", 0, SOURCES),
        *_B,
    ]
    # the window (one bandwidth-delay product) caps the share; an empty budget stops all
    assert all(
        a.directory != _CACHE for a in plan_ahead(index, budget, a_pyc.chunks[0], a_pyc, config, 0)
    )
    assert plan_ahead(index, ReadaheadBudget(), init.chunks[0], init, config, 1000) == []


def test_plan_ahead_stops_fetching_sources_nobody_reads() -> None:
    """Timestamp-checked pycs: CPython does not read their sources, which then stop coming."""
    tree = _package_tree()
    index = BlobIndex.of_tree(tree)
    config = ResolverConfig(readahead_directory_bytes=15, readahead_directory_min_bytes=0)
    budget = ReadaheadBudget(credit_bytes=1000)
    init = tree.find("/p/__pycache__/__init__.cpython-311.pyc")
    assert init is not None
    first = plan_ahead(index, budget, init.chunks[0], init, config, 1000)
    assert [place for place in _places(first) if place[2] == SOURCES] == [
        ("/p/__init__.py", 0, SOURCES)
    ]
    for ahead in first:
        budget.fetched_ahead(_key(ahead), 20, 20, ahead.directory)  # 20 > the 15 of a share
    again = plan_ahead(index, budget, init.chunks[0], init, config, 1000)
    # no source any more, not even a next file's, so b.pyc alone now fits the 15 bytes
    assert _places(again) == [(init.path, 10, None), _B[0]]
    budget.read(_key(first[1]))  # the source was read after all: sources earn again
    assert ("/p/__init__.py", 0, SOURCES) in _places(
        plan_ahead(index, budget, init.chunks[0], init, config, 1000)
    )


def _key(ahead: Ahead) -> str:
    return f"{ahead.chunk.layer}:{ahead.chunk.ref.blob_offset}"


def test_readaheadsim_replays_the_profiles_chunks_once_each() -> None:
    """bench/readaheadsim.py: the chunks in prefetch's order, a place two files share once;
    a miss is a round trip, and a picked chunk read later counts as read-ahead used."""
    a = _file_entries("a", [10, 10, 10], start=0)
    shared = _file_entries("b", [10], start=10)  # the blob bytes of a's second chunk
    tree = build_tree([a + shared])
    profile = AccessProfile(
        (ProfileRead("/b", 0, 1), ProfileRead("/a", 0, 30), ProfileRead("/missing", 0, 1))
    )
    image = SimpleNamespace(tree=tree)
    wanted = touched_chunks(cast(OpenedImage, image), profile)
    assert [(node.path, chunk.ref.blob_offset) for node, chunk in wanted] == [
        ("/b", 10),
        ("/a", 0),
        ("/a", 20),
    ]
    none = replay("none", wanted, lambda node, chunk, budget, present: [])
    assert (none.round_trips, none.fetched_bytes, none.needed_bytes) == (3, 30, 30)
    assert (none.requests, none.gap_bytes) == (3, 0)
    by_blob = {chunk.ref.blob_offset: Ahead(node, chunk, None) for node, chunk in wanted}

    def third(
        node: Node,
        chunk: LayerChunk,
        budget: ReadaheadBudget,
        present: Callable[[LayerChunk], bool],
    ) -> list[Ahead]:
        return [by_blob[20]] if chunk.ref.blob_offset == 0 else []

    ahead = replay("next", wanted, third)
    assert (ahead.round_trips, ahead.ahead_bytes, ahead.ahead_used_bytes) == (2, 10, 10)
    # chunks 0 and 20 go in one request, the 10 bytes between them fetched and thrown away
    assert (ahead.requests, ahead.gap_bytes) == (2, 10)
    apart = replay("apart", wanted, third, resolver=ResolverConfig(merge_gap_bytes=5))
    assert (apart.requests, apart.gap_bytes) == (2, 0)  # two ranges, one request


def _file_entries(name: str, chunk_sizes: list[int], start: int) -> list[TocEntry]:
    """TOC entries of a file whose chunks are 10 blob bytes each from ``start``."""
    entries, position = [], 0
    for index, size in enumerate(chunk_sizes):
        kind = "reg" if index == 0 else "chunk"
        entries.append(
            TocEntry(
                type=kind, name=name, size=sum(chunk_sizes) if index == 0 else 0,
                offset=start + 10 * index, end_offset=start + 10 * len(chunk_sizes),
                chunk_offset=position, chunk_size=size,
            )
        )  # fmt: skip
        position += size
    return entries


def test_a_files_first_miss_brings_one_window_of_its_rest_a_later_one_the_rest() -> None:
    """``head -c 64k`` of a big file costs one window; a file read on (an executable, a
    library) brings its rest at its second miss."""
    entries = _file_entries("big", [10] * 100, 0)
    tree = build_tree([entries])
    index = BlobIndex.of_tree(tree)
    big = tree.find("/big")
    assert big is not None
    config = ResolverConfig(readahead_first_bytes=30, readahead_max_bytes=500)
    budget = ReadaheadBudget(credit_bytes=10_000)
    first = plan_ahead(index, budget, big.chunks[0], big, config, 1000)
    assert [a.chunk.ref.file_offset for a in first] == [10, 20, 30]
    later = plan_ahead(index, budget, big.chunks[40], big, config, 1000)
    assert [a.chunk.ref.file_offset for a in later] == [410 + 10 * i for i in range(50)]
    other = ReadaheadBudget(credit_bytes=10_000)  # another mount's budget knows nothing
    assert len(plan_ahead(index, other, big.chunks[40], big, config, 1000)) == 3
