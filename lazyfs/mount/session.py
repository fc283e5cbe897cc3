"""The mount service: open the image, mount it with pyfuse3, serve until unmounted.

Runs on trio (pyfuse3's loop) through anyio. It ends when the kernel drops the FUSE connection
(``fusermount3 -u`` or ``lazyfs umount``), or on SIGTERM/SIGINT, and logs a summary of what it
fetched. See docs/concurrency.md for the rules the event loop lives by.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pyfuse3

from lazyfs.cache.store import ChunkCache
from lazyfs.config import CacheConfig, RegistryConfig, ResolverConfig
from lazyfs.errors import LazyfsError
from lazyfs.model.bytesource import ByteSource
from lazyfs.model.platform import Platform
from lazyfs.model.profiles import AccessProfile
from lazyfs.model.reference import Reference
from lazyfs.mount.fuseops import LazyOperations
from lazyfs.mount.opener import OpenedImage, open_image
from lazyfs.mount.prefetch import ProfileRecorder, embedded_order, profile_order
from lazyfs.mount.readahead import BlobIndex
from lazyfs.mount.resolver import ChunkResolver
from lazyfs.mount.sources import RoutingByteSource
from lazyfs.registry.auth import CredentialSource
from lazyfs.registry.client import RegistryClient
from lazyfs.registry.failover import Failover
from lazyfs.registry.mirrors import EndpointOrder, MirrorConfig
from lazyfs.registry.sources import MirroredByteSource

log = logging.getLogger(__name__)

READ_AHEAD_KB = 1024  # 1 MiB FUSE reads instead of 128 KiB: several times the throughput


@dataclass(frozen=True)
class PrefetchOptions:
    """Access profiles (lazyfs/mount/prefetch.py): which to prefetch, and where to record one."""

    enabled: bool = True  # prefetch what the image's TOC ranks, or ``profile``
    profile: AccessProfile | None = None  # a local profile, used instead of the TOC's ranks
    record_path: Path | None = None  # write the reads of this mount here at unmount


@dataclass(frozen=True)
class MountOptions:
    reference: Reference
    mountpoint: Path
    cache: CacheConfig
    platform: Platform = field(default_factory=Platform.host)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    resolver: ResolverConfig = field(default_factory=ResolverConfig)
    mirrors: MirrorConfig = field(default_factory=MirrorConfig)
    allow_other: bool = False
    prefetch: PrefetchOptions = field(default_factory=PrefetchOptions)


def fuse_options(options: MountOptions) -> set[str]:
    flags = {"fsname=lazyfs", "subtype=lazyfs", "ro", "default_permissions"}
    if options.allow_other:
        flags.add("allow_other")
    return flags


class MountService:
    """One mounted image."""

    def __init__(self, options: MountOptions, credentials: CredentialSource | None) -> None:
        self._options = options
        self._credentials = credentials
        self._started = time.monotonic()
        self._image: OpenedImage | None = None
        self._client: RegistryClient | None = None
        self._failover = Failover(EndpointOrder(options.mirrors))
        self._resolver: ChunkResolver | None = None
        self._recorder = ProfileRecorder() if options.prefetch.record_path else None

    async def run(self, on_ready: Callable[[], None]) -> None:
        cache_config = self._options.cache
        cache = ChunkCache(
            cache_config.directory,
            cache_config.size_limit_bytes,
            verify_reads=cache_config.verify_reads,
        )
        try:
            async with RegistryClient(
                self._options.registry, self._credentials, keep_whole_blob=cache.blobs.keeper
            ) as client:
                self._client = client
                with _collector_paused():
                    self._image = await open_image(
                        client,
                        cache,
                        self._options.reference,
                        self._options.platform,
                        self._failover,
                    )
                    index = await anyio.to_thread.run_sync(BlobIndex.of_tree, self._image.tree)
                await self._serve(client, cache, index, on_ready)
        finally:
            cache.close()

    async def _serve(
        self,
        client: RegistryClient,
        cache: ChunkCache,
        index: BlobIndex,
        on_ready: Callable[[], None],
    ) -> None:
        assert self._image is not None
        async with anyio.create_task_group() as tasks:
            source = self._byte_source(client, cache)
            self._resolver = ChunkResolver(
                source,
                cache,
                self._image.layers,
                self._options.resolver,
                tasks,
                index,
                self._recorder,
            )
            operations = LazyOperations(self._image.tree, self._resolver, self.stats)
            pyfuse3.init(operations, str(self._options.mountpoint), fuse_options(self._options))
            unmounted = False
            try:
                tasks.start_soon(self._stop_on_signals)
                tasks.start_soon(
                    anyio.to_thread.run_sync, tune_read_ahead, self._options.mountpoint
                )
                on_ready()
                tasks.start_soon(self._prefetch)
                await pyfuse3.main()
                unmounted = True
            finally:
                log.info("unmounting %s: %s", self._options.mountpoint, self.summary())
                pyfuse3.close(unmount=not unmounted)
                tasks.cancel_scope.cancel()
                self._save_profile()

    async def _prefetch(self) -> None:
        """Fetch what the access profile says a start reads, right after mounting."""
        assert self._image is not None and self._resolver is not None
        settings, tree = self._options.prefetch, self._image.tree
        if not settings.enabled:
            return
        if settings.profile is not None:
            profile = settings.profile
            order = await anyio.to_thread.run_sync(lambda: profile_order(tree, profile))
        else:
            order = await anyio.to_thread.run_sync(embedded_order, tree)
        if order:
            log.info("prefetching %d chunks of the access profile", len(order))
            await self._resolver.prefetch(order)

    def _save_profile(self) -> None:
        """After unmounting (so a path under the mountpoint cannot deadlock us)."""
        path = self._options.prefetch.record_path
        if path is None or self._recorder is None or self._image is None:
            return
        profile = self._recorder.profile(str(self._image.reference.digest or ""))
        try:
            profile.save(path)
            log.info("wrote the access profile (%d reads) to %s", len(profile.reads), path)
        except LazyfsError as exc:
            log.error("%s", exc)

    def _byte_source(self, client: RegistryClient, cache: ChunkCache) -> ByteSource:
        assert self._image is not None
        remote = MirroredByteSource(client, self._image.reference, self._failover)
        return RoutingByteSource(cache.blobs, remote)

    async def _stop_on_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for _signum in signals:
                pyfuse3.terminate()
                return

    def stats(self) -> dict[str, Any]:
        """What ``lazyfs stats`` shows; called on the event loop."""
        image, resolver = self._image, self._resolver
        assert image is not None and resolver is not None
        counters = asdict(resolver.stats)
        per_layer = counters.pop("layer_bytes_fetched")
        for index, layer in enumerate(image.layers):
            if not layer.lazy:
                per_layer[index] = layer.fetched_whole_bytes
        counters["bytes_fetched"] += sum(layer.fetched_whole_bytes for layer in image.layers)
        counters["plain_layers"] = sum(1 for layer in image.layers if not layer.lazy)
        counters["network_bytes_received"] = self._client_bytes()
        return {
            "pid": os.getpid(),
            "reference": str(image.reference),
            "mountpoint": str(self._options.mountpoint),
            "offline": image.offline,
            "uptime_s": round(time.monotonic() - self._started, 3),
            **counters,
            "layers": [
                {
                    "digest": str(layer.source_digest or layer.digest),
                    "size": layer.size,
                    "lazy": layer.lazy,
                    "bytes_fetched": per_layer.get(index, 0),
                    "fetched_percent": round(
                        100.0 * per_layer.get(index, 0) / max(layer.size, 1), 3
                    ),
                }
                for index, layer in enumerate(image.layers)
            ],
        }

    def _client_bytes(self) -> int:
        """Body bytes the registry client really received (metadata, chunks, whole blobs)."""
        return self._client.stats.bytes_received if self._client else 0

    def summary(self) -> str:
        if self._resolver is None:
            return "nothing served"
        s = self._resolver.stats
        return (
            f"fetched {s.bytes_fetched} bytes in {s.range_requests} range requests "
            f"({s.chunks_fetched} chunks), cache hits {s.cache_hits}, misses {s.cache_misses}, "
            f"verification failures {s.verification_failures}"
        )


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No garbage collection while the tree is built, then freeze what exists.

    Building the tree allocates a few objects per TOC entry and none of them is garbage, so
    collections in between only scan them (a quarter of the build time). Frozen, the tree
    (which lives as long as the mount) is never scanned again by the collections that reads
    trigger."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.freeze()


def tune_read_ahead(mountpoint: Path) -> None:
    """Raise the mount's read-ahead. Runs in a worker thread: it stats our own mountpoint."""
    try:
        device = os.stat(mountpoint).st_dev
        bdi = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
        bdi.write_text(str(READ_AHEAD_KB))
    except OSError as exc:
        log.info("could not raise read-ahead on %s: %s", mountpoint, exc)
