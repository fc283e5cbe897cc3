"""An image's chunks by the keys the cache stores them under, found from the cache alone.

One place for what ``lazyfs pin`` keeps and ``lazyfs bundle export`` carries: every chunk the
merged tree uses, once each, in fill order (the access profile's ranks first, then layer order;
mount/fill.py), with its fs-verity digest. Layers with fs-verity digests in their TOC name it;
sha256-checked layers (other writers' zstd:chunked, eStargz) are cached by fs-verity digest too,
found through the alias written when a chunk was first verified, so a chunk of theirs that was
never fetched has no key yet (None).
"""

from __future__ import annotations

from collections.abc import Sequence

from lazyfs.cache.store import ChunkCache
from lazyfs.model.platform import Platform
from lazyfs.model.reference import Reference
from lazyfs.mount.fill import fill_order
from lazyfs.mount.opener import OpenedImage, open_image
from lazyfs.mount.prefetch import embedded_order
from lazyfs.mount.tree import LayerChunk, Node, Tree
from lazyfs.registry.client import RegistryClient


def stored_chunks(tree: Tree) -> list[tuple[Node, LayerChunk]]:
    """Every chunk ``tree`` uses, once each, in fill order (runs of zeros are never stored)."""
    return fill_order(tree, embedded_order(tree))


def chunk_keys(
    opened: OpenedImage, cache: ChunkCache, order: Sequence[tuple[Node, LayerChunk]]
) -> list[str | None]:
    """Worker thread: the fs-verity digest each chunk of ``order`` is cached under, or None for
    a chunk of a sha256-checked layer that was never fetched (no alias yet)."""
    found: list[str | None] = []
    for _node, chunk in order:
        ref = chunk.ref
        if opened.layers[chunk.layer].check == "verity":
            found.append(ref.verity)
        else:
            found.append(cache.get_alias(ref.sha256))
    return found


async def open_cached(cache: ChunkCache, ref: Reference, platform: Platform) -> OpenedImage:
    """Open ``ref`` from the cache's metadata alone, as an offline mount does (no request is
    made: RegistryUnreachableError names what is not cached)."""
    async with RegistryClient() as client:  # never used offline; open_image wants one
        return await open_image(client, cache, ref, platform, offline=True)
