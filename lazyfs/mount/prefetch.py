"""Prefetching at mount: fetch what an access profile says a start reads, before it asks.

Cold start is bound by round trips: a workload reads files one after another, and each miss
waits for the registry. An access profile (lazyfs/model/profiles.py) recorded on one start lets the
next cold mount fetch those chunks right after mounting, in the order they were first needed,
in few large multi-range requests (``ChunkResolver.prefetch``). The profile can travel with the
image: ``lazyfs convert --prefetch PROFILE`` writes each chunk's rank into the TOC
(``lazyfsPrefetch``, covered by the TOC checksum in the manifest like everything else), so any
mount of that image by reference prefetches. ``lazyfs mount --prefetch PROFILE`` applies a local
profile to any image, foreign formats included. This is what eStargz calls prioritized files
(recorded by its ``optimize`` command); lazyfs does not reorder the layer, because a
multi-range request reaches scattered chunks in one round trip.

Concurrency: docs/concurrency.md (invariants 9 and 10).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from lazyfs.model.profiles import AccessProfile, ProfileRead
from lazyfs.mount.tree import LayerChunk, Node, Tree


@dataclass
class ProfileRecorder:
    """Records the chunks that reads asked for, once each, in first-read order.

    Used on the event loop only (by the resolver's read path)."""

    _seen: set[tuple[int, int]] = field(default_factory=set)
    _reads: list[ProfileRead] = field(default_factory=list)

    def record(self, node: Node, chunks: Iterable[LayerChunk]) -> None:
        for chunk in chunks:
            key = (node.inode, chunk.ref.file_offset)
            if key not in self._seen and not chunk.ref.zeros:
                self._seen.add(key)
                self._reads.append(ProfileRead(node.path, chunk.ref.file_offset, chunk.ref.size))

    def profile(self, image: str) -> AccessProfile:
        return AccessProfile(tuple(self._reads), image)


def embedded_order(tree: Tree) -> list[tuple[Node, LayerChunk]]:
    """The chunks of the merged tree that carry a TOC rank, lowest rank first."""
    ranked = [
        (chunk.ref.prefetch, node.inode, chunk.ref.file_offset, node, chunk)
        for node in tree.nodes.values()
        for chunk in node.chunks
        if chunk.ref.prefetch > 0 and not chunk.ref.zeros
    ]
    ranked.sort(key=lambda item: item[:3])
    return [(node, chunk) for *_, node, chunk in ranked]


def profile_order(tree: Tree, profile: AccessProfile) -> list[tuple[Node, LayerChunk]]:
    """The chunks of the merged tree that the profile's reads cover, in the profile's order.

    Reads of paths the image lacks, or that are not regular files, are skipped: a profile
    recorded on another version of an image still helps with what the versions share."""
    order: list[tuple[Node, LayerChunk]] = []
    seen: set[tuple[int, int]] = set()
    for read in profile.reads:
        node = tree.find(read.path)
        if node is None or node.kind != "reg":
            continue
        for chunk in node.chunks:
            start, end = chunk.ref.file_offset, chunk.ref.file_offset + chunk.ref.size
            key = (node.inode, start)
            overlaps = start < read.offset + max(read.length, 1) and end > read.offset
            if overlaps and key not in seen and not chunk.ref.zeros:
                seen.add(key)
                order.append((node, chunk))
    return order
