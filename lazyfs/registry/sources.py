"""Byte sources (lazyfs/model/bytesource.py) backed by a registry and its mirrors."""

from __future__ import annotations

from collections.abc import Sequence

from lazyfs.model.bytesource import RangeListener
from lazyfs.model.digest import Digest
from lazyfs.model.ranges import ByteRange
from lazyfs.model.reference import Reference
from lazyfs.registry.client import RegistryClient
from lazyfs.registry.failover import Failover


class RegistryByteSource:
    """Ranges of blobs in one registry repository."""

    def __init__(self, client: RegistryClient, reference: Reference) -> None:
        self._client = client
        self._ref = reference

    async def read_ranges(
        self, blob: Digest, ranges: Sequence[ByteRange], on_data: RangeListener | None = None
    ) -> list[bytes]:
        return await _read_ranges(self._client, self._ref, blob, ranges, on_data)


class MirroredByteSource:
    """Ranges from the first endpoint that answers: mirrors in order, then the origin."""

    def __init__(self, client: RegistryClient, reference: Reference, failover: Failover) -> None:
        self._client = client
        self._ref = reference
        self._failover = failover

    async def read_ranges(
        self, blob: Digest, ranges: Sequence[ByteRange], on_data: RangeListener | None = None
    ) -> list[bytes]:
        return await self._failover.first(
            self._ref,
            lambda endpoint: _read_ranges(self._client, endpoint, blob, ranges, on_data),
        )


async def _read_ranges(
    client: RegistryClient,
    ref: Reference,
    blob: Digest,
    ranges: Sequence[ByteRange],
    on_data: RangeListener | None,
) -> list[bytes]:
    if len(ranges) == 1:
        return [await client.get_blob_range(ref, blob, ranges[0], on_data)]
    return await client.get_blob_ranges(ref, blob, ranges, on_data)
