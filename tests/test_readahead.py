"""Readahead: the bandwidth-delay window, the chunks that follow a miss, and the replay of a
profile against read-ahead policies (bench/readaheadsim.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

from lazyfs.bench.readaheadsim import replay, touched_chunks
from lazyfs.formats.chunked.toc import ChunkRef, TocEntry
from lazyfs.model.profiles import AccessProfile, ProfileRead
from lazyfs.mount.opener import OpenedImage
from lazyfs.mount.readahead import BlobIndex, LinkEstimate, ReadaheadBudget
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
    none = replay("none", wanted, lambda node, chunk: [])
    assert (none.round_trips, none.fetched_bytes, none.needed_bytes) == (3, 30, 30)
    by_blob = {chunk.ref.blob_offset: (node, chunk) for node, chunk in wanted}
    ahead = replay(
        "next", wanted, lambda node, chunk: [by_blob[20]] if chunk.ref.blob_offset == 0 else []
    )
    assert (ahead.round_trips, ahead.ahead_bytes, ahead.ahead_used_bytes) == (2, 10, 10)


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
