"""The service's side of the additional layer store (mount/layerstore.py, docs/service.md).

podman looks layers up with nothing but an image reference, so the store's images are opened
with the service's own registry settings (``lazyfs serve --tls-verify``, ``--authfile``, the
default auth files as the service's user sees them, mirrors from ``--mirrors``) and the host
platform. They share the service's cache, recent chunks and singleflight table (SharedChunks)
with every ``lazyfs mount``, and count in its statistics. A store image is its own MountedImage
(it carries per-layer trees), apart from the merged images that ``lazyfs mount`` binds.

``blob`` is served from a whole local copy, downloaded once, checked against the layer digest
and renamed into place among the cache's local blobs (cache/blobs.py) before its first byte is
read; one download at a time per blob.

Event loop only (docs/concurrency.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from anyio.abc import TaskGroup

from lazyfs.config import LimitsConfig, ResolverConfig
from lazyfs.model.digest import Digest
from lazyfs.model.platform import Platform
from lazyfs.model.reference import Reference
from lazyfs.mount.fill import TokenBucket
from lazyfs.mount.image import ImageOptions, IndexedImage, MountedImage, PrefetchOptions
from lazyfs.mount.resolver import SharedChunks
from lazyfs.registry.client import RegistryClient
from lazyfs.registry.failover import Failover
from lazyfs.registry.mirrors import EndpointOrder, MirrorConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreSettings:
    directory: Path  # where the store is bound (``lazyfs serve --store``)
    mirrors: MirrorConfig = field(default_factory=MirrorConfig)
    platform: Platform | None = None  # None: the host's


class ServiceStoreHost:
    """Opens, releases and serves the blobs of the store's images for a Service."""

    def __init__(
        self,
        settings: StoreSettings,
        client: RegistryClient,
        shared: SharedChunks,
        tasks: TaskGroup,
        resolver: ResolverConfig,
        on_release: Callable[[MountedImage], None],
        on_uses_changed: Callable[[], None],
        reuse: Callable[[Reference], IndexedImage | None] | None = None,
        fill: tuple[bool, TokenBucket] = (False, TokenBucket(None)),
        limits: LimitsConfig = LimitsConfig(),  # noqa: B008 - frozen, so sharing is safe
    ) -> None:
        self.settings = settings
        self._limits = limits
        self._client = client
        self._shared = shared
        self._tasks = tasks
        self._resolver = resolver
        self._on_release = on_release
        self._on_uses_changed = on_uses_changed
        self._reuse = reuse
        self._fill, self._fill_bucket = fill
        self._downloads: dict[Digest, anyio.Lock] = {}

    async def open_store_image(self, reference: Reference) -> MountedImage:
        options = ImageOptions(
            reference,
            self.settings.platform or Platform.host(),
            self._resolver,
            PrefetchOptions(),
            per_layer=True,
            fill=self._fill,
            limits=self._limits,
        )
        failover = Failover(EndpointOrder(self.settings.mirrors))
        image = await MountedImage.open(self._client, self._shared, failover, options, self._reuse)
        self._tasks.start_soon(image.background, self._fill_bucket)
        return image

    def release_store_image(self, image: MountedImage) -> None:
        image.close()
        self._on_release(image)

    async def local_blob(self, image: MountedImage, index: int) -> Path:
        descriptor = image.opened.manifest.layers[index]
        blobs = self._shared.cache.blobs
        lock = self._downloads.setdefault(descriptor.digest, anyio.Lock())
        async with lock:
            if not blobs.has(descriptor.digest):
                await self._download(image.opened.reference, descriptor.digest)
        return blobs.path(descriptor.digest)

    async def _download(self, ref: Reference, digest: Digest) -> None:
        blobs = self._shared.cache.blobs
        log.info("layer store: fetching blob %s whole (its `blob` file is read)", digest)
        with blobs.staging() as scratch:
            dest = scratch / "blob"
            await self._client.download_blob(ref, digest, dest)  # verified before the rename
            blobs.adopt(dest, digest)

    def uses_changed(self) -> None:
        self._on_uses_changed()
