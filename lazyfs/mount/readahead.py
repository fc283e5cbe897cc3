"""Readahead after a miss: the rest of the missed file, then a little of the files after it.

Cold start is RTT-bound: a workload reads files one after another, and each miss costs a round
trip. A file being read is usually read to its end, so the rest of the missed file comes first
(up to ``readahead_max_bytes``). Files that are read together usually sit together in the layer
(tar order is directory order), so the chunks after the file in the blob may be next: fetching
them in the same request costs bytes / rate, missing them later an RTT. They get about one
bandwidth-delay product (rate x RTT, both measured from the requests themselves), between
``readahead_min_bytes`` and ``readahead_next_files_max_bytes`` (256 KiB). On the bench's python
image, replaying the workload's reads (``python -m lazyfs.bench.readaheadsim``): 4 MiB of the
blob after a miss, as before, fetched 3.6x the bytes needed in 13 round trips, 27 % of it used;
the rest of the file then 256 KiB, 1.77x in 59 round trips, 55 % used; then 96 KiB, 1.38x in
78, 70 % used. Smaller shares save bytes but cost round trips: at 20 Mbit/s with 150 ms, 96 KiB
would save about 2.9 s of transfer and lose 4.7 s in round trips against the old 4 MiB
(docs/benchmarks.md).

A guess costs bytes too, and on a thin link bytes are what the operator pays for. The
:class:`ReadaheadBudget` keeps the (compressed) bytes fetched ahead at most equal to the
(uncompressed) bytes that reads needed: the chunks reads missed, plus the read-ahead ones they
then used. Read-ahead therefore stops guessing where its guesses go unused, and the bytes over
the link stay near twice what the workload reads. Counting both sides compressed was measured
too (docs/benchmarks.md): a third fewer bytes, but 1.5x slower starts on ``wan`` and ``edge``
for the bench's python image, slower than a full pull.
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from lazyfs.mount.tree import LayerChunk, Node, Tree


@dataclass
class LinkEstimate:
    """Round-trip time and throughput, estimated from completed range requests."""

    rtt_s: float | None = None
    rate_bytes_per_s: float | None = None
    _samples: int = field(default=0, repr=False)

    def record(self, size_bytes: int, elapsed_s: float) -> None:
        # Small requests measure the RTT; an average, so a stray fast or slow one fades out.
        if size_bytes <= 64 << 10:
            old_rtt = self.rtt_s
            self.rtt_s = elapsed_s if old_rtt is None else 0.7 * old_rtt + 0.3 * elapsed_s
        transfer_s = elapsed_s - (self.rtt_s or 0.0)
        if size_bytes >= 64 << 10 and transfer_s > 0:
            rate = size_bytes / transfer_s
            old = self.rate_bytes_per_s
            self.rate_bytes_per_s = rate if old is None else 0.7 * old + 0.3 * rate
        self._samples += 1

    def window_bytes(self, minimum: int, maximum: int) -> int:
        if self.rtt_s is None:
            return minimum
        rate = self.rate_bytes_per_s or minimum / max(self.rtt_s, 1e-6)
        return int(min(maximum, max(minimum, rate * self.rtt_s)))


@dataclass
class ReadaheadBudget:
    """Bytes read-ahead may still spend: needed - fetched ahead (event loop only)."""

    needed_bytes: int = 0  # uncompressed: missed by reads, or fetched ahead and then read
    ahead_bytes: int = 0  # compressed: fetched ahead
    used_bytes: int = 0  # compressed: fetched ahead and then read
    _unused: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)

    def missed(self, size_bytes: int) -> None:
        self.needed_bytes += size_bytes

    def fetched_ahead(self, key: str, compressed_bytes: int, size_bytes: int) -> None:
        self.ahead_bytes += compressed_bytes
        self._unused[key] = (compressed_bytes, size_bytes)

    def read(self, key: str) -> None:
        """A read wanted ``key``; if read-ahead brought it, it was needed after all."""
        compressed, size = self._unused.pop(key, (0, 0))
        self.needed_bytes += size
        self.used_bytes += compressed

    @property
    def allowance_bytes(self) -> int:
        return max(0, self.needed_bytes - self.ahead_bytes)


class _Placed(NamedTuple):  # a tuple: one per chunk of the image, made at mount time
    blob_offset: int
    chunk: LayerChunk
    node: Node


_blob_offset = operator.attrgetter("blob_offset")


class BlobIndex:
    """Every chunk of every layer, in blob order, to find what follows a chunk.

    A file is known by its path, not its node: the index is built from the merged tree, and a
    layer store's reads come with the nodes of each layer's own tree (mount/layerstore.py),
    which are other objects with other inode numbers for the same files."""

    def __init__(self, placed: Iterable[_Placed]) -> None:
        self._by_layer: dict[int, list[_Placed]] = {}
        for item in placed:
            self._by_layer.setdefault(item.chunk.layer, []).append(item)
        for items in self._by_layer.values():
            items.sort(key=_blob_offset)
        self._offsets = {
            layer: [p.blob_offset for p in items] for layer, items in self._by_layer.items()
        }

    @classmethod
    def of_tree(cls, tree: Tree) -> BlobIndex:
        seen: set[tuple[int, int]] = set()
        placed = []
        for node in tree.nodes.values():
            for chunk in node.chunks:
                ref = chunk.ref
                where = (chunk.layer, ref.blob_offset)
                if where not in seen and not ref.zeros:
                    seen.add(where)
                    placed.append(_Placed(ref.blob_offset, chunk, node))
        return cls(placed)

    def following(self, chunk: LayerChunk, budget_bytes: int) -> list[tuple[Node, LayerChunk]]:
        """Chunks after ``chunk`` in its blob, until about ``budget_bytes`` compressed bytes."""
        items = self._by_layer.get(chunk.layer, [])
        start = bisect.bisect_right(self._offsets.get(chunk.layer, []), chunk.ref.blob_offset)
        picked: list[tuple[Node, LayerChunk]] = []
        spent = 0
        for item in items[start:]:
            if spent >= budget_bytes:
                break
            picked.append((item.node, item.chunk))
            spent += item.chunk.ref.blob_end - item.chunk.ref.blob_offset
        return picked

    def ahead_of(
        self, chunk: LayerChunk, node: Node, file_bytes: int, other_bytes: int
    ) -> list[tuple[Node, LayerChunk]]:
        """What to fetch ahead of a miss of ``node``'s ``chunk``: the rest of ``node``, up to
        ``file_bytes`` compressed, then the chunks that follow it in the blob (the next files
        of the layer), up to ``other_bytes``. Each chunk is taken only if it fits."""
        picked: list[tuple[Node, LayerChunk]] = []
        items = self._by_layer.get(chunk.layer, [])
        start = bisect.bisect_right(self._offsets.get(chunk.layer, []), chunk.ref.blob_offset)
        in_file, beyond = 0, 0
        for item in items[start:]:
            size = item.chunk.ref.blob_end - item.chunk.ref.blob_offset
            if _same_file(item.node, node) and beyond == 0:
                if in_file + size > file_bytes:
                    break
                in_file += size
            else:
                if beyond + size > other_bytes:
                    break
                beyond += size
            picked.append((item.node, item.chunk))
        return picked


def _same_file(indexed: Node, read: Node) -> bool:
    """Whether the index's ``indexed`` is the file of ``read``, a node of the merged tree or of
    one layer's own tree (BlobIndex)."""
    return indexed is read or indexed.path == read.path
