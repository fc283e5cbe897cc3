"""The byte-source protocol the resolver fetches from, and its registry implementation.

The resolver never sees httpx: anything that can return byte ranges of a blob (a registry, a
mirror, a local file, an OCI layout, a fault-injecting test double) can serve a mount.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import anyio.to_thread

from lazyfs.errors import NotFoundError, RegistryError
from lazyfs.model.digest import Digest
from lazyfs.model.ranges import ByteRange
from lazyfs.model.reference import Reference
from lazyfs.registry.client import RegistryClient
from lazyfs.registry.mirrors import EndpointOrder

log = logging.getLogger(__name__)


class ByteSource(Protocol):
    """Returns byte ranges of a blob, in the order asked."""

    async def read_ranges(self, blob: Digest, ranges: Sequence[ByteRange]) -> list[bytes]: ...


class RegistryByteSource:
    """Ranges of blobs in one registry repository."""

    def __init__(self, client: RegistryClient, reference: Reference) -> None:
        self._client = client
        self._ref = reference

    async def read_ranges(self, blob: Digest, ranges: Sequence[ByteRange]) -> list[bytes]:
        if len(ranges) == 1:
            return [await self._client.get_blob_range(self._ref, blob, ranges[0])]
        return await self._client.get_blob_ranges(self._ref, blob, ranges)


class DirectoryByteSource:
    """Blobs stored as files named by digest (an OCI layout's blobs/ directory)."""

    def __init__(self, blobs_dir: Path) -> None:
        self._dir = blobs_dir

    def has(self, blob: Digest) -> bool:
        return self._path(blob).is_file()

    def _path(self, blob: Digest) -> Path:
        return self._dir / blob.algorithm / blob.hex

    async def read_ranges(self, blob: Digest, ranges: Sequence[ByteRange]) -> list[bytes]:
        return await anyio.to_thread.run_sync(self._read, blob, list(ranges))

    def _read(self, blob: Digest, ranges: list[ByteRange]) -> list[bytes]:
        path = self._path(blob)
        try:
            with path.open("rb") as file:
                return [_pread(file.fileno(), rng) for rng in ranges]
        except FileNotFoundError as exc:
            raise NotFoundError(f"blob {blob} is not in {self._dir}") from exc


def _pread(fd: int, rng: ByteRange) -> bytes:
    return os.pread(fd, rng.length, rng.start)


class RoutingByteSource:
    """Blobs present in the local directory are read there; everything else from ``remote``.

    Local blobs are plain layers converted at mount time, and whole blobs that a Range request
    received anyway (a pull-through proxy's first answer); chunks are verified all the same.
    """

    def __init__(self, local: DirectoryByteSource, remote: ByteSource) -> None:
        self._local = local
        self._remote = remote

    async def read_ranges(self, blob: Digest, ranges: Sequence[ByteRange]) -> list[bytes]:
        source = self._local if self._local.has(blob) else self._remote
        return await source.read_ranges(blob, ranges)


class MirroredByteSource:
    """Ranges from the first endpoint that answers: mirrors in order, then the origin."""

    def __init__(self, client: RegistryClient, reference: Reference, order: EndpointOrder) -> None:
        self._client = client
        self._ref = reference
        self._order = order

    async def read_ranges(self, blob: Digest, ranges: Sequence[ByteRange]) -> list[bytes]:
        candidates = self._order(self._ref)
        for endpoint in candidates[:-1]:
            try:
                return await RegistryByteSource(self._client, endpoint).read_ranges(blob, ranges)
            except RegistryError as exc:
                self._order.failed(endpoint)
                log.info("blob %s: %s failed (%s); trying the next", blob, endpoint.registry, exc)
        return await RegistryByteSource(self._client, candidates[-1]).read_ranges(blob, ranges)
