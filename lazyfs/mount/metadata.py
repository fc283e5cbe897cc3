"""Image metadata for a mount: from the registry (through failover), else from the cache.

Manifests, configs and TOCs are fetched through the one failover mechanism
(lazyfs/registry/failover.py) and kept in the cache's metadata store, keyed by digest
(lazyfs/cache/keys.py), so that a remount works with the registry down: once the registry
cannot be reached, the tag resolves to the last digest seen and every blob is read from the
cache. Everything read back is checked against its digest as it was when fetched.
"""

from __future__ import annotations

import hashlib
import logging
from functools import partial

import anyio.to_thread

from lazyfs.cache import keys
from lazyfs.cache.store import ChunkCache
from lazyfs.errors import IntegrityError, RegistryUnreachableError, TransientRegistryError
from lazyfs.formats.chunked.toc import BlobSection, Toc
from lazyfs.model.digest import Digest
from lazyfs.model.manifests import Descriptor
from lazyfs.model.ranges import ByteRange
from lazyfs.model.reference import Reference
from lazyfs.registry.client import RegistryClient
from lazyfs.registry.failover import Failover

log = logging.getLogger(__name__)

_OFFLINE_ERRORS = (RegistryUnreachableError, TransientRegistryError)


class MetadataFetcher:
    """Fetches one image's metadata; ``offline`` once the registry was found unreachable."""

    def __init__(self, client: RegistryClient, cache: ChunkCache, failover: Failover) -> None:
        self.client = client
        self.cache = cache
        self.failover = failover
        self.offline = False
        self.unkept_tocs: list[tuple[str, Toc]] = []  # parsed here, for kepttocs.keep

    async def root(self, ref: Reference) -> tuple[Digest, bytes, str | None]:
        """The manifest or index ``ref`` names: its digest, bytes and media type if known."""
        tag_key = keys.tag_key(ref)
        if not self.offline:
            # With a digest remembered for the tag, a refused connection falls back at once.
            known = await self.get(tag_key)
            get = partial(self.client.get_manifest, cached_fallback=known is not None)
            try:
                fetched = await self.failover.first(ref, get)
            except _OFFLINE_ERRORS as exc:
                log.warning("registry unreachable (%s); trying the cache", exc)
                self.offline = True
            else:
                remembered = str(fetched.digest).encode()
                if known != remembered:  # else both are cached already: no write on a remount
                    await self.remember(keys.blob_key(fetched.digest), fetched.data)
                    await self.remember(tag_key, remembered)
                return fetched.digest, fetched.data, fetched.media_type
        digest = Digest.parse((await self.cached(tag_key, f"{ref} (registry down)")).decode())
        data = await self.cached(keys.blob_key(digest), str(digest))
        digest.verify(data, f"cached manifest {digest}")
        return digest, data, None

    async def manifest(self, ref: Reference, digest: Digest) -> bytes:
        key = keys.blob_key(digest)
        cached = await self.get(key) if not self.offline else await self.cached(key, str(digest))
        if cached is not None:
            digest.verify(cached, f"cached manifest {digest}")
            return cached
        fetched = await self.failover.first(ref.with_digest(digest), self.client.get_manifest)
        await self.remember(key, fetched.data)
        return fetched.data

    async def blob(self, ref: Reference, digest: Digest, size: int | None = None) -> bytes:
        """A blob (a config), verified; ``size`` (its descriptor's) bounds what is read."""
        key = keys.blob_key(digest)
        cached = await self.get(key)
        if cached is not None:
            digest.verify(cached, f"cached blob {digest}")
            return cached
        if self.offline:
            raise RegistryUnreachableError(f"blob {digest} is not cached and the registry is down")
        data = await self.failover.first(ref, lambda r: self.client.get_blob(r, digest, size))
        await self.remember(key, data)
        return data

    async def toc(
        self, ref: Reference, layer: Descriptor, section: BlobSection, checksum: Digest
    ) -> bytes:
        """The compressed TOC, checked against the manifest's checksum annotation."""
        key = keys.blob_key(checksum)
        cached = await self.get(key)
        if cached is None and self.offline:
            raise RegistryUnreachableError(
                f"TOC of {layer.digest} is not cached and the registry is down"
            )
        data = cached
        if data is None:
            data = await self.blob_range(ref, layer, ByteRange(section.offset, section.end))
        actual = Digest("sha256", hashlib.sha256(data).hexdigest())
        if actual != checksum:
            raise IntegrityError(f"TOC of layer {layer.digest}", str(checksum), str(actual))
        if cached is None:  # a cached TOC is not written again (a megabyte per layer)
            await self.remember(key, data)
        return data

    async def blob_range(self, ref: Reference, layer: Descriptor, rng: ByteRange) -> bytes:
        if self.offline:
            raise RegistryUnreachableError(f"layer {layer.digest} metadata is not cached")
        return await self.failover.first(
            ref, lambda r: self.client.get_blob_range(r, layer.digest, rng)
        )

    async def get(self, key: str) -> bytes | None:
        return await anyio.to_thread.run_sync(self.cache.get_meta, key)

    async def remember(self, key: str, data: bytes) -> None:
        await anyio.to_thread.run_sync(self.cache.put_meta, key, data)

    async def cached(self, key: str, what: str) -> bytes:
        data = await self.get(key)
        if data is None:
            raise RegistryUnreachableError(f"the registry is unreachable and {what} is not cached")
        return data
