"""The byte source a mount reads from: whole blobs kept in the cache, else the registry."""

from __future__ import annotations

from collections.abc import Sequence

from lazyfs.cache.blobs import LocalBlobs
from lazyfs.model.bytesource import ByteSource, RangeListener
from lazyfs.model.digest import Digest
from lazyfs.model.ranges import ByteRange


class RoutingByteSource:
    """Blobs present in the cache's blob directory are read there; everything else remotely.

    Local blobs are plain layers converted at mount time, and whole blobs that a Range request
    received anyway (a pull-through proxy's first answer); chunks are verified all the same.
    """

    def __init__(self, local: LocalBlobs, remote: ByteSource) -> None:
        self._local = local
        self._remote = remote

    async def read_ranges(
        self, blob: Digest, ranges: Sequence[ByteRange], on_data: RangeListener | None = None
    ) -> list[bytes]:
        if self._local.has(blob):  # a local read is over at once: nothing to hear of early
            return await self._local.read_ranges(blob, ranges)
        return await self._remote.read_ranges(blob, ranges, on_data)
