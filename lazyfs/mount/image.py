"""One image a service serves: opened, verified, with its resolver, prefetch and statistics.

Opening fetches only metadata (mount/opener.py); the image's chunks come through the
resolver, which shares the service's cache, memory and singleflight table (SharedChunks) with
every other image. Runs on the event loop (docs/concurrency.md).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from lazyfs.cache import keys
from lazyfs.cache.store import ChunkCache
from lazyfs.config import LimitsConfig, ResolverConfig
from lazyfs.errors import LazyfsError
from lazyfs.model.platform import Platform
from lazyfs.model.profiles import AccessProfile
from lazyfs.model.reference import Reference
from lazyfs.mount import kepttocs
from lazyfs.mount.fill import (
    FillProgress,
    FillRun,
    TokenBucket,
    compressed_bytes,
    fill_order,
)
from lazyfs.mount.images import ServedImage
from lazyfs.mount.opener import OpenedImage, open_image
from lazyfs.mount.prefetch import ProfileRecorder, embedded_order, profile_order
from lazyfs.mount.readahead import BlobIndex
from lazyfs.mount.resolver import ChunkResolver, SharedChunks
from lazyfs.mount.sources import RoutingByteSource
from lazyfs.mount.tree import LayerChunk, Node
from lazyfs.registry.client import RegistryClient
from lazyfs.registry.failover import Failover
from lazyfs.registry.referrers import find_profile
from lazyfs.registry.sources import MirroredByteSource

log = logging.getLogger(__name__)

PROFILE_LOOKUP_TIMEOUT_S = 10.0  # the prefetch goes on without it after this
# A remount asks the registry for the image's attached profile again only after this long: a
# profile pushed meanwhile is used by the mounts that start after it.
PROFILE_LOOKUP_TTL_S = 60.0

Order = list[tuple[Node, LayerChunk]]


@dataclass(frozen=True)
class PrefetchOptions:
    """Access profiles (mount/prefetch.py): which to prefetch, and whether to record one."""

    enabled: bool = True  # prefetch what the image's TOC ranks, or ``profile``
    profile: AccessProfile | None = None  # a local profile, used instead of the TOC's ranks
    record: bool = False  # record the reads of this image, in order (an access profile)


@dataclass(frozen=True)
class ImageOptions:
    """What an open request asks for, beyond the registry client it goes through."""

    reference: Reference
    platform: Platform = field(default_factory=Platform.host)
    resolver: ResolverConfig = field(default_factory=ResolverConfig)
    prefetch: PrefetchOptions = field(default_factory=PrefetchOptions)
    per_layer: bool = False  # also each layer's own tree, for the layer store
    fill: bool = False  # fetch the rest of the image after the prefetch (mount/fill.py)
    limits: LimitsConfig = field(default_factory=LimitsConfig)  # what its metadata may take


def image_name(reference: Reference) -> str:
    """The directory of an image under the service root: its manifest digest."""
    assert reference.digest is not None
    return f"{reference.digest.algorithm}-{reference.digest.hex}"


class PrefetchPlan:
    """What the mounts of one indexed image work out before they prefetch, kept with it so
    that a remount does not again: the order of the TOC's ranks (a sort of every ranked chunk),
    the attached access profile's order (a registry round trip or two; looked up again after
    PROFILE_LOOKUP_TTL_S), and whether the cached chunks' files were learned (a query over every
    chunk). Event-loop state."""

    def __init__(self) -> None:
        self.embedded: Order | None = None
        # (when it was looked up, the order of the profile found, None if there was none)
        self.attached: tuple[float, Order | None] | None = None
        # ChunkResolver.files_evicted when the files were last learned
        self.learned_at_evictions: int | None = None


@dataclass(frozen=True)
class IndexedImage:
    """An opened image with its read-ahead index and prefetch plan: what a new mount of it
    can reuse."""

    opened: OpenedImage
    index: BlobIndex
    plan: PrefetchPlan = field(default_factory=PrefetchPlan, compare=False)

    @property
    def entries(self) -> int:
        trees = (self.opened.tree, *self.opened.layer_trees)
        return sum(len(tree.nodes) for tree in trees)


class MountedImage:
    def __init__(
        self,
        opened: OpenedImage,
        index: BlobIndex,
        resolver: ChunkResolver,
        client: RegistryClient,
        failover: Failover,
        recorder: ProfileRecorder | None,
        options: ImageOptions,
        cache: ChunkCache,
        plan: PrefetchPlan | None = None,
    ) -> None:
        self.opened = opened
        self.index = index
        self.plan = plan or PrefetchPlan()
        self.name = image_name(opened.reference)
        self.resolver = resolver
        self.options = options
        self._client = client
        self._failover = failover  # the endpoints the image was opened through
        self._shared_cache = cache
        self._recorder = recorder
        self._started = time.monotonic()
        self._prefetch_scope = anyio.CancelScope()
        self._first: list[tuple[Node, LayerChunk]] = []  # what the prefetch fetched first
        self.fill = FillProgress()
        self.mountpoints: list[Path] = []

    @classmethod
    async def open(
        cls,
        client: RegistryClient,
        shared: SharedChunks,
        failover: Failover,
        options: ImageOptions,
        reuse: Callable[[Reference], IndexedImage | None] | None = None,
    ) -> MountedImage:
        """Open the image; ``reuse`` may hand back one already indexed for the manifest digest
        the reference resolves to (the service keeps the recently released ones)."""
        reused: list[IndexedImage] = []

        def known(pinned: Reference) -> OpenedImage | None:
            found = reuse(pinned) if reuse is not None else None
            reused.extend([found] if found is not None else [])
            return found.opened if found is not None else None

        with _collector_paused():
            opened = await open_image(
                client,
                shared.cache,
                options.reference,
                options.platform,
                failover,
                per_layer=options.per_layer,
                reuse=known,
                limits=options.limits,
            )
            plan = None
            if reused and reused[0].opened is opened:
                index, plan = reused[0].index, reused[0].plan
            else:
                index = await anyio.to_thread.run_sync(BlobIndex.of_tree, opened.tree)
        remote = MirroredByteSource(client, opened.reference, failover)
        recorder = ProfileRecorder() if options.prefetch.record else None
        resolver = ChunkResolver(
            RoutingByteSource(shared.cache.blobs, remote),
            shared.cache,
            opened.layers,
            options.resolver,
            shared.task_group,
            index,
            recorder,
            shared,
        )
        return cls(opened, index, resolver, client, failover, recorder, options, shared.cache, plan)

    def indexed(self) -> IndexedImage:
        return IndexedImage(self.opened, self.index, self.plan)

    def served(self) -> ServedImage:
        return ServedImage(self.name, self.opened.tree, self.resolver, self.stats)

    async def prefetch(self) -> None:
        """Fetch what the access profile says a start reads. A background task: nothing
        escapes it, and closing the image cancels it."""
        with self._prefetch_scope:
            await self._guarded("prefetch", self._prefetch)

    async def background(self, bucket: TokenBucket) -> None:
        """The prefetch, then (if asked for) the fill. A background task: nothing escapes
        it, and closing the image cancels it."""
        with self._prefetch_scope:
            await self._guarded("keeping the checked TOCs", self._keep_tocs)
            await self._guarded("learning the cached files", self._learn_files)
            await self._guarded("prefetch", self._prefetch)
            if self.options.fill and not await self._guarded("fill", lambda: self._fill(bucket)):
                self.fill.state = "failed"
        if self.options.fill and self.fill.state not in ("done", "failed"):
            self.fill.state = "stopped"

    async def _keep_tocs(self) -> None:
        """Keep the TOCs this open parsed, for the next open (mount/kepttocs.py)."""
        if self.opened.unkept:
            await anyio.to_thread.run_sync(kepttocs.keep, self._shared_cache, self.opened.unkept)

    async def _learn_files(self) -> None:
        """Which files hold the image's cached chunks: a warm mount's first reads then go
        straight to the files (one query, in a worker thread; before the prefetch, which on
        a warm cache only finds hits). Once per indexed image while the service forgets none:
        what it caches after that it learns as it stores it."""
        if self.plan.learned_at_evictions == self.resolver.files_evicted:
            return
        nodes = self.opened.tree.nodes.values()
        learned = await self.resolver.learn_files(c for node in nodes for c in node.chunks)
        self.plan.learned_at_evictions = self.resolver.files_evicted
        if learned:
            log.info("%s: %d cached chunk files known", self.opened.reference, learned)

    async def _guarded(self, what: str, work: Callable[[], Awaitable[None]]) -> bool:
        """Run ``work``; False if it failed (logged, and counted if it was a bug)."""
        try:
            await work()
            return True
        except LazyfsError as exc:
            self.fill.error = self.fill.error or f"{what}: {exc}"
            log.warning("%s: %s failed: %s", self.opened.reference, what, exc)
        except Exception as exc:
            self.fill.error = self.fill.error or f"{what}: internal error: {exc!r}"
            self.resolver.stats.internal_errors += 1
            log.exception("%s: %s crashed", self.opened.reference, what)
        return False

    async def _fill(self, bucket: TokenBucket) -> None:
        tree, first = self.opened.tree, self._first
        order = await anyio.to_thread.run_sync(lambda: fill_order(tree, first))
        self.fill.total_bytes = sum(compressed_bytes(chunk) for _, chunk in order)
        # Strictly below foreground reads, of every image of the service; pipelined (fill.py).
        await FillRun(self.resolver, bucket, self.fill, self._fill_paused).run(order)
        self.fill.state = "done"
        log.info(
            "%s: filled (%d bytes): offline-safe", self.opened.reference, self.fill.total_bytes
        )

    def _fill_paused(self) -> None:
        self.fill.state = "paused"

    async def _prefetch(self) -> None:
        settings, tree = self.options.prefetch, self.opened.tree
        if not settings.enabled:
            return
        local = settings.profile
        if local is not None:
            order = await anyio.to_thread.run_sync(lambda: profile_order(tree, local))
        else:
            attached = await self._attached_order()
            order = attached if attached is not None else await self._embedded_order()
        self._first = order
        if order:
            log.info("prefetching %d chunks of the access profile", len(order))
            await self.resolver.prefetch(order)

    async def _embedded_order(self) -> Order:
        """The order of the TOC's ranks, sorted once per indexed image."""
        if self.plan.embedded is None:
            self.plan.embedded = await anyio.to_thread.run_sync(embedded_order, self.opened.tree)
        return self.plan.embedded

    async def _attached_order(self) -> Order | None:
        """The order of the attached access profile; None if there is none. Looked up once
        per PROFILE_LOOKUP_TTL_S per indexed image, unless the lookup failed."""
        now, known = time.monotonic(), self.plan.attached
        if known is not None and now - known[0] < PROFILE_LOOKUP_TTL_S:
            return known[1]
        profile, settled = await self._attached_profile()
        order = None
        if profile is not None:
            tree = self.opened.tree
            order = await anyio.to_thread.run_sync(lambda: profile_order(tree, profile))
        if settled:
            self.plan.attached = (now, order)
        return order

    async def _attached_profile(self) -> tuple[AccessProfile | None, bool]:
        """The newest access profile pushed next to the image (``lazyfs profile push``), or
        the one last found, when the registry cannot say; None if there is none. And whether
        the registry said (or the image is offline, when it is never asked)."""
        digest = self.opened.reference.digest
        assert digest is not None
        cache, key = self._shared_cache, keys.profile_key(digest)
        found, settled = None, self.opened.offline
        if not self.opened.offline:
            with anyio.move_on_after(PROFILE_LOOKUP_TIMEOUT_S):
                try:
                    # Where the image's blobs come from: mirrors in order, then the origin.
                    found = await self._failover.first(
                        self.opened.reference,
                        lambda endpoint: find_profile(self._client, endpoint, digest),
                    )
                    settled = True
                except LazyfsError as exc:
                    log.info("%s: no attached access profile: %s", self.opened.reference, exc)
        if found is not None:
            artifact, profile = found
            log.info("prefetching the access profile %s attached to the image", artifact)
            await anyio.to_thread.run_sync(cache.put_meta, key, profile.to_json())
            return profile, settled
        cached = await anyio.to_thread.run_sync(cache.get_meta, key)
        return (AccessProfile.parse(cached) if cached is not None else None), settled

    def close(self) -> None:
        self._prefetch_scope.cancel()

    def recorded_profile(self) -> AccessProfile | None:
        if self._recorder is None:
            return None
        return self._recorder.profile(str(self.opened.reference.digest or ""))

    def stats(self) -> dict[str, Any]:
        """What ``lazyfs stats MOUNTPOINT`` shows; called on the event loop."""
        image, resolver = self.opened, self.resolver
        counters = asdict(resolver.stats)
        per_layer = counters.pop("layer_bytes_fetched")
        for index, layer in enumerate(image.layers):
            if not layer.lazy:
                per_layer[index] = layer.fetched_whole_bytes
        counters["bytes_fetched"] += sum(layer.fetched_whole_bytes for layer in image.layers)
        counters["plain_layers"] = sum(1 for layer in image.layers if not layer.lazy)
        counters["network_bytes_received"] = self._client.stats.bytes_received
        return {
            "pid": os.getpid(),
            "reference": str(image.reference),
            "mountpoint": str(self.mountpoints[0]) if self.mountpoints else "",
            "mountpoints": [str(m) for m in self.mountpoints],
            "offline": image.offline,
            "uptime_s": round(time.monotonic() - self._started, 3),
            "fill": self.fill.to_json() if self.options.fill else None,
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

    def summary(self) -> str:
        s = self.resolver.stats
        return (
            f"fetched {s.bytes_fetched} bytes in {s.range_requests} range requests "
            f"({s.chunks_fetched} chunks), cache hits {s.cache_hits}, misses {s.cache_misses}, "
            f"verification failures {s.verification_failures}"
        )


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No garbage collection while a tree is built, then freeze what exists.

    Building the tree allocates a few objects per TOC entry and none of them is garbage, so
    collections in between only scan them (a quarter of the build time). Frozen, the tree
    (which lives as long as the image is served) is never scanned again by the collections
    that reads trigger."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.freeze()
