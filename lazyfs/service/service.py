"""The mount service: one pyfuse3 session for every image, its bind mounts, and its lifetime.

``lazyfs serve`` runs one ``Service``. Its FUSE session is mounted at the store root, where
each open image is a directory (mount/images.py); ``lazyfs mount REF DIR`` asks it, over the
control socket (server.py), to open the image and bind its directory at DIR. Everything an
image needs beyond its own tree is shared: one registry client per registry configuration and
credentials (connection pools, token cache), one cache handle, one in-memory cache of recent
chunks and one singleflight table (mount/resolver.py SharedChunks), so two images that share a
chunk fetch it once even when both read it at the same moment.

Runs on trio through anyio (docs/concurrency.md). Bind and unmount calls go to worker threads:
they make the kernel look paths up through our own session. Signals unmount every bind mount,
then the root. The mounts are recorded in a state file (state.py), from which a restarted
service, after a crash, a ``kill -9`` or an upgrade, restores them. docs/service.md has the
protocol and the rules.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import hashlib
import json
import logging
import os
import signal
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.to_thread
import pyfuse3
from anyio.abc import TaskGroup

from lazyfs import __version__
from lazyfs.cache.layout import CacheLayout
from lazyfs.cache.store import ChunkCache
from lazyfs.config import CacheConfig, LimitsConfig, RegistryConfig, ResolverConfig
from lazyfs.convert.layout import OciLayout
from lazyfs.errors import (
    InvalidReferenceError,
    LazyfsError,
    ServiceError,
    ServiceUnavailableError,
    UsageError,
)
from lazyfs.localfiles import AtomicFile
from lazyfs.model.platform import Platform
from lazyfs.model.profiles import AccessProfile
from lazyfs.model.reference import Reference
from lazyfs.mount import mountinfo
from lazyfs.mount.fill import TokenBucket
from lazyfs.mount.fuseops import LazyOperations
from lazyfs.mount.image import (
    ImageOptions,
    IndexedImage,
    MountedImage,
    PrefetchOptions,
    image_name,
)
from lazyfs.mount.images import SERVICE_ROOT_INODE, STORE_DIR_NAME, ImageTable
from lazyfs.mount.layerstore import LayerStore
from lazyfs.mount.resolver import ResolverStats, SharedChunks
from lazyfs.registry.client import RegistryClient
from lazyfs.registry.credentials import Credentials, CredentialSource
from lazyfs.registry.failover import Failover
from lazyfs.registry.lanes import BackgroundLane
from lazyfs.registry.layoutregistry import LAYOUT_REPOSITORY, LayoutRegistry, layout_host
from lazyfs.registry.mirrors import EndpointOrder, MirrorConfig, system_mirrors
from lazyfs.service import bindmounts
from lazyfs.service.layouts import ServedLayouts
from lazyfs.service.metrics import COUNTERS, ImageFigures, ServiceFigures, serve_metrics
from lazyfs.service.paths import ServicePaths
from lazyfs.service.state import MountRecord, ServiceState
from lazyfs.service.storehost import ServiceStoreHost, StoreSettings

log = logging.getLogger(__name__)

# Released images kept indexed, so that a remount skips fetching, parsing and building the
# TOCs and trees: at most this many, holding at most this many tree entries in all.
RECENT_IMAGES_MAX = 8
RECENT_IMAGES_MAX_ENTRIES = 400_000
READ_AHEAD_KB = 1024  # 1 MiB FUSE reads instead of 128 KiB: several times the throughput
WATCH_INTERVAL_S = 0.5  # how often external unmounts and idleness are checked
FUSE_FSTYPE = "fuse.lazyfs"


@dataclass(frozen=True)
class ServiceConfig:
    cache: CacheConfig
    paths: ServicePaths
    resolver: ResolverConfig = field(default_factory=ResolverConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    socket_group: str | None = None  # the socket is 0660 with this group, else 0600
    metrics_addr: tuple[str, int] | None = None
    idle_exit_s: float | None = None  # None: serve until stopped
    allow_other: bool = True  # other users may read the mounts (file modes still apply)
    lock_wait_s: float = 0.0  # how long to wait for a stopping service that owns the cache
    store: StoreSettings | None = None  # an additional layer store for podman (storehost.py)
    store_credentials: CredentialSource | None = None  # what the store's images use
    fill_by_default: bool = False  # fill every image after its mount (mount/fill.py)
    fill_rate_bytes_per_s: float | None = None  # the fill's cap, over all images; None: none
    limits: LimitsConfig = field(default_factory=LimitsConfig)  # each image's metadata bounds


@dataclass(frozen=True)
class Peer:
    """Who sent a request (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int


@dataclass
class _Mount:
    mountpoint: Path
    image: MountedImage
    owner: Peer
    record_profile: Path | None


class MappedCredentials:
    """Credentials a client looked up for each registry of its request (a CredentialSource)."""

    def __init__(self, by_registry: dict[str, Credentials]) -> None:
        self._by_registry = by_registry

    def lookup(self, registry: str) -> Credentials | None:
        return self._by_registry.get(registry)


class Service:
    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.paths = config.paths
        self._layout = CacheLayout(config.cache.directory)
        self._table = ImageTable()
        self._images: dict[str, MountedImage] = {}
        self._mounts: dict[Path, _Mount] = {}
        self._clients: dict[str, RegistryClient] = {}
        # Every client's fill below every client's reads (registry/lanes.py).
        self._lane = BackgroundLane()
        # OCI layouts opened by `lazyfs mount oci:PATH`, by the host name each is served as.
        self._layouts = ServedLayouts()
        self._retired = ResolverStats()  # counters of images released since start
        self._state = ServiceState.load(self.paths.state)
        self._started = time.monotonic()
        self._idle_since = time.monotonic()
        self._opening = 0
        self._stopping = False
        self._cache: ChunkCache | None = None
        self._shared: SharedChunks | None = None
        self._operations: LazyOperations | None = None
        self._store: LayerStore | None = None
        self._recent: OrderedDict[tuple[str, bool], IndexedImage] = OrderedDict()
        self._fill_bucket = TokenBucket(config.fill_rate_bytes_per_s)
        self._tasks: TaskGroup | None = None
        self._cache_chunk_bytes = 0
        self._control_scope = anyio.CancelScope()

    # -------------------------------------------------------------------------- life cycle

    async def run(self, on_ready: Callable[[], None], serve_control: Callable[..., Any]) -> None:
        """Serve until a signal, a shutdown request or (if configured) idleness ends it."""
        lock = _lock_cache(self._layout, self.config.lock_wait_s)
        try:
            self._cache = ChunkCache(
                self.config.cache.directory,
                self.config.cache.size_limit_bytes,
                verify_reads=self.config.cache.verify_reads,
            )
            try:
                await self._serve(on_ready, serve_control)
            finally:
                for client in self._clients.values():
                    await client.aclose()
                self._cache.close()
        finally:
            self._forget_record()
            lock.close()

    async def _serve(self, on_ready: Callable[[], None], serve_control: Callable[..., Any]) -> None:
        assert self._cache is not None
        root = self.paths.root
        await anyio.to_thread.run_sync(_prepare_root, root)
        async with anyio.create_task_group() as tasks:
            self._tasks = tasks
            self._shared = SharedChunks(self._cache, self.config.resolver, tasks)
            self._store = self._layer_store(self._shared, tasks)
            self._operations = LazyOperations(self._table, self.stats, self._store)
            pyfuse3.init(self._operations, str(root), self._fuse_options())
            try:
                await tasks.start(self._control, serve_control)
                if self.config.metrics_addr is not None:
                    host, port = self.config.metrics_addr
                    await tasks.start(_started(serve_metrics), host, port, self.figures)
                tasks.start_soon(anyio.to_thread.run_sync, tune_read_ahead, root)
                tasks.start_soon(self._stop_on_signals)
                tasks.start_soon(self._watch)
                tasks.start_soon(self._restore)
                self._write_record()
                tasks.start_soon(self._ready, on_ready)
                await pyfuse3.main()
            finally:
                log.info("stopping: %s", self._summary())
                pyfuse3.close(unmount=True)
                tasks.cancel_scope.cancel()

    async def _ready(self, on_ready: Callable[[], None]) -> None:
        """Bind the layer store, if any (through our own session: a worker thread), then
        tell the caller the service is up."""
        if self.config.store is not None:
            source, target = self.paths.root / STORE_DIR_NAME, self.config.store.directory
            try:
                await anyio.to_thread.run_sync(_bind_store, source, target)
            except LazyfsError as exc:
                log.error("%s", exc)
                await self.shutdown(restore_later=True)
                raise
            log.info("layer store at %s", target)
        # Paid here, once, not by the first mount: the HTTP stack's imports and TLS set-up
        # (about 90 ms on the benchmark machine), with the client of the service's defaults.
        self._client_for(self.config.registry, {})
        log.info("serving at %s, control socket %s", self.paths.root, self.paths.socket)
        on_ready()

    def _layer_store(self, shared: SharedChunks, tasks: TaskGroup) -> LayerStore | None:
        settings = self.config.store
        if settings is None:
            return None
        assert self._cache is not None
        client = RegistryClient(
            self.config.registry,
            self.config.store_credentials,
            keep_whole_blob=self._cache.blobs.keeper,
            local_registries=self._layouts.by_host,
            lane=self._lane,
        )
        self._clients["layer-store"] = client
        host = ServiceStoreHost(
            settings,
            client,
            shared,
            tasks,
            self.config.resolver,
            on_release=self._retire,
            reuse=self.reusable,
            fill=(self.config.fill_by_default, self._fill_bucket),
            limits=self.config.limits,
            on_uses_changed=lambda: self._state.set_store_uses(self._store_uses()),
        )
        return LayerStore(self._table, host, self._state.store_uses)

    def reusable(self, pinned: Reference) -> IndexedImage | None:
        """An image already indexed for this manifest digest: open, or released recently."""
        name = image_name(pinned)
        image = self._images.get(name)
        if image is not None:
            return image.indexed()
        for key in ((name, False), (name, True)):
            found = self._recent.get(key)
            if found is not None:
                self._recent.move_to_end(key)
                return found
        return None

    def _retire(self, image: MountedImage) -> None:
        """A released image: count its figures, and keep it indexed for a while."""
        _add_stats(self._retired, image.resolver.stats)
        self._recent[(image.name, bool(image.opened.layer_trees))] = image.indexed()
        self._recent.move_to_end((image.name, bool(image.opened.layer_trees)))
        while len(self._recent) > RECENT_IMAGES_MAX or (
            len(self._recent) > 1
            and sum(i.entries for i in self._recent.values()) > RECENT_IMAGES_MAX_ENTRIES
        ):
            self._recent.popitem(last=False)
        self._prune_layouts()

    def _prune_layouts(self) -> None:
        """Stop serving the OCI layouts nothing reads through any more (service/layouts.py):
        the hosts of open images, and of released ones a new mount may reuse, stay."""
        used = [image.opened.reference.registry for image in self._all_images()]
        used += [indexed.opened.reference.registry for indexed in self._recent.values()]
        for served in self._layouts.prune(used):
            log.info("no longer serving the OCI layout %s", served.layout.path)

    def _store_uses(self) -> dict[str, int]:
        return dict(self._store.uses) if self._store is not None else {}

    def _all_images(self) -> list[MountedImage]:
        """The merged images of ``lazyfs mount`` and the layer store's images."""
        store_images = list(self._store.images()) if self._store is not None else []
        return list(self._images.values()) + store_images

    async def _control(
        self, serve_control: Callable[..., Any], *, task_status: Any = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """The control server, until the service starts stopping (clients then start anew)."""
        with self._control_scope:
            await serve_control(self, task_status=task_status)

    def _fuse_options(self) -> set[str]:
        # No max_read: 1 MiB requests (libfuse's buffer). Chosen by measurement with the
        # read-ahead and max_background: docs/concurrency.md, "FUSE session options".
        flags = {"fsname=lazyfs", "subtype=lazyfs", "default_permissions"}
        if self.config.store is None:  # the store takes podman's use marks (create, rmdir)
            flags.add("ro")
        if self.config.allow_other:
            flags.add("allow_other")
        return flags

    async def shutdown(self, *, restore_later: bool) -> None:
        """Unmount every bind mount (lazily: busy ones detach), then end the FUSE session."""
        if self._stopping:
            return
        self._stopping = True
        self._control_scope.cancel()
        if restore_later:
            self._state.mark_all("always")
        for mountpoint in list(self._mounts):
            try:
                await anyio.to_thread.run_sync(partial(bindmounts.unmount, mountpoint, lazy=True))
            except LazyfsError as exc:
                log.error("%s", exc)
        for mount in list(self._mounts.values()):
            self._forget_mount(mount, keep_record=restore_later)
        await self._unbind_store()
        pyfuse3.terminate()

    async def _unbind_store(self) -> None:
        if self._store is None or self.config.store is None:
            return
        self._store.close_all()
        target = self.config.store.directory
        try:
            if await anyio.to_thread.run_sync(mountinfo.is_mounted, target):
                await anyio.to_thread.run_sync(partial(bindmounts.unmount, target, lazy=True))
        except LazyfsError as exc:
            log.error("%s", exc)

    async def _stop_on_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("signal %d: unmounting everything", signum)
                await self.shutdown(restore_later=True)
                return

    async def _watch(self) -> None:
        """Notice bind mounts removed behind our back (``fusermount3 -u``), and idleness."""
        assert self._cache is not None
        while not self._stopping:
            await anyio.sleep(WATCH_INTERVAL_S)
            try:
                await self._watch_once()
            except Exception:  # a background task: log, and keep watching
                log.exception("the mount watcher failed")

    async def _watch_once(self) -> None:
        # Mounts bound while the table is being read are not in it yet: judge only the ones
        # that existed before the read began.
        known = dict(self._mounts)
        try:
            present = await anyio.to_thread.run_sync(_mounted_paths)
            self._cache_chunk_bytes = await anyio.to_thread.run_sync(
                lambda: self._cache.chunk_bytes if self._cache else 0
            )
        except (OSError, LazyfsError) as exc:
            log.warning("cannot read the mount table: %s", exc)
            return
        for mountpoint, mount in known.items():
            if mountpoint not in present and self._mounts.get(mountpoint) is mount:
                log.info("%s was unmounted from outside: releasing it", mountpoint)
                self._forget_mount(mount, keep_record=False)
        await self._exit_if_idle()

    async def _exit_if_idle(self) -> None:
        if self._images or self._opening or self._store is not None:  # podman may come any time
            self._idle_since = time.monotonic()
            return
        limit = self.config.idle_exit_s
        if limit is not None and time.monotonic() - self._idle_since >= limit:
            log.info("no image for %.1f s: exiting", limit)
            await self.shutdown(restore_later=False)

    async def _restore(self) -> None:
        """Reopen the images of the state file and replace their stale bind mounts."""
        for record in list(self._state.mounts.values()):
            mountpoint = Path(record.mountpoint)
            stale = await anyio.to_thread.run_sync(bindmounts.is_stale, mountpoint)
            if record.restore != "always" and not stale:
                log.info("not restoring %s: it was unmounted meanwhile", mountpoint)
                self._state.remove(record.mountpoint)
                continue
            owner = Peer(0, record.owner_uid, record.owner_gid)
            try:
                await self.open(dict(record.request), owner, restoring=True)
                log.info("restored %s", mountpoint)
            except LazyfsError as exc:
                log.error("cannot restore %s: %s", mountpoint, exc)
                self._state.remove(record.mountpoint)
            except Exception:  # a background task: one bad record must not stop the others
                log.exception("restoring %s crashed", mountpoint)
                self._state.remove(record.mountpoint)

    # ------------------------------------------------------------------------------ requests

    async def open(self, args: dict[str, Any], peer: Peer, *, restoring: bool = False) -> Any:
        """Open the image of an open request and bind it at its mountpoint."""
        if self._stopping:
            raise ServiceUnavailableError("the service is stopping")
        mountpoint = _absolute(args.get("mountpoint"), "mountpoint")
        if mountpoint in self._mounts:
            raise UsageError(f"{mountpoint} is already a lazyfs mount")
        await anyio.to_thread.run_sync(_check_mountpoint, mountpoint, peer)
        if args.get("layout") is None:
            return await self._open(args, mountpoint, peer, restoring=restoring)
        args, host, served = await anyio.to_thread.run_sync(_layout_request, args)
        try:
            with self._layouts.opening(host, served):
                return await self._open(args, mountpoint, peer, restoring=restoring)
        finally:
            self._prune_layouts()  # a failed open's, or one whose image reads through another

    async def _open(
        self, args: dict[str, Any], mountpoint: Path, peer: Peer, *, restoring: bool
    ) -> Any:
        host_mirrors = await anyio.to_thread.run_sync(system_mirrors)  # stat, parse if changed
        options, client, failover = self._image_setup(args, host_mirrors)
        record = _optional_path(args.get("record_profile"), "record_profile")
        self._opening += 1
        try:
            image = await self._image_for(options, client, failover)
            try:
                await anyio.to_thread.run_sync(self._bind, image, mountpoint)
            except BaseException:
                if not image.mountpoints:
                    self._forget_image(image)
                raise
        finally:
            self._opening -= 1
        image.mountpoints.append(mountpoint)
        self._mounts[mountpoint] = _Mount(mountpoint, image, peer, record)
        request = {k: v for k, v in args.items() if k != "credentials"}
        self._state.add(MountRecord(str(mountpoint), request, peer.uid, peer.gid))
        log.info(
            "mounted %s at %s%s", image.opened.reference, mountpoint, " (restored)" * restoring
        )
        return {
            "image": image.name,
            "reference": str(image.opened.reference),
            "path": str(self.paths.root / image.name),
            "offline": image.opened.offline,
            "pid": os.getpid(),
        }

    def _bind(self, image: MountedImage, mountpoint: Path) -> None:
        """Worker thread: replace a dead lazyfs mount there, then bind the image's directory."""
        if bindmounts.is_stale(mountpoint):
            log.info("replacing the dead mount at %s", mountpoint)
            bindmounts.unmount(mountpoint, lazy=True)
        if _is_mountpoint(mountpoint):
            raise UsageError(f"{mountpoint} is already a mountpoint")
        bindmounts.bind_read_only(self.paths.root / image.name, mountpoint)

    async def _image_for(
        self, options: ImageOptions, client: RegistryClient, failover: Failover
    ) -> MountedImage:
        assert self._shared is not None and self._tasks is not None
        image = await MountedImage.open(client, self._shared, failover, options, self.reusable)
        existing = self._images.get(image.name)
        if existing is not None:  # opened meanwhile, or mounted elsewhere: share it
            return existing
        self._images[image.name] = image
        socket = str(self.paths.socket)  # how `lazyfs umount` finds the service of a mount
        served = image.served()
        self._table.add(replace(served, stats=lambda: {**image.stats(), "socket": socket}))
        self._tasks.start_soon(image.background, self._fill_bucket)
        return image

    def _image_setup(
        self, args: dict[str, Any], host_mirrors: MirrorConfig
    ) -> tuple[ImageOptions, RegistryClient, Failover]:
        reference = Reference.parse(_text(args.get("reference"), "reference"))
        platform_text = args.get("platform")
        platform = Platform.parse(_text(platform_text, "platform")) if platform_text else None
        # --config's rules replace the host's of the same prefix (mirrors.py).
        mirrors = host_mirrors.merged(MirrorConfig.loads(str(args.get("mirrors") or ""), "mirrors"))
        profile_json = args.get("profile")
        profile = AccessProfile.parse(json.dumps(profile_json).encode()) if profile_json else None
        resolver = self.config.resolver
        timeout = args.get("read_timeout_s")
        if timeout is not None:
            resolver = replace(resolver, read_deadline_s=_positive(timeout, "read_timeout_s"))
        prefetch = PrefetchOptions(
            enabled=bool(args.get("prefetch", True)),
            profile=profile,
            record=args.get("record_profile") is not None,
        )
        fill = _optional_bool(args.get("fill"), "fill")
        options = ImageOptions(
            reference,
            platform or Platform.host(),
            resolver,
            prefetch,
            fill=self.config.fill_by_default if fill is None else fill,
            limits=self.config.limits,
        )
        registry = replace(
            self.config.registry,
            tls_verify=_optional_bool(args.get("tls_verify"), "tls_verify"),
            cert_dir=_optional_path(args.get("cert_dir"), "cert_dir"),
            insecure_registries=mirrors.insecure_hosts(),
        )
        client = self._client_for(registry, _credentials(args.get("credentials")))
        return options, client, Failover(EndpointOrder(mirrors))

    def _client_for(
        self, registry: RegistryConfig, credentials: dict[str, Credentials]
    ) -> RegistryClient:
        """One client per registry configuration and credentials: images that share them share
        its connection pools and tokens."""
        secret = json.dumps(
            {k: [c.username, c.password] for k, c in sorted(credentials.items())}
        ).encode()
        key = f"{registry!r}/{hashlib.sha256(secret).hexdigest()}"
        client = self._clients.get(key)
        if client is None:
            assert self._cache is not None
            client = RegistryClient(
                registry,
                MappedCredentials(credentials),
                keep_whole_blob=self._cache.blobs.keeper,
                local_registries=self._layouts.by_host,
                lane=self._lane,
            )
            self._clients[key] = client
        return client

    async def release(self, args: dict[str, Any], peer: Peer) -> Any:
        mountpoint = _absolute(args.get("mountpoint"), "mountpoint")
        mount = self._mounts.get(mountpoint)
        if mount is None:
            raise UsageError(f"{mountpoint} is not a mount of this service")
        if peer.uid not in (0, mount.owner.uid):
            raise UsageError(f"{mountpoint} was mounted by another user")
        lazy = bool(args.get("lazy", False))
        await anyio.to_thread.run_sync(lambda: bindmounts.unmount(mountpoint, lazy=lazy))
        self._forget_mount(mount, keep_record=False)
        return {}

    def _forget_mount(self, mount: _Mount, *, keep_record: bool) -> None:
        self._mounts.pop(mount.mountpoint, None)
        if not keep_record:
            self._state.remove(str(mount.mountpoint))
        image = mount.image
        if mount.mountpoint in image.mountpoints:
            image.mountpoints.remove(mount.mountpoint)
        if mount.record_profile is not None:
            self._save_profile(image, mount)
        if not image.mountpoints:
            self._forget_image(image)

    def _forget_image(self, image: MountedImage) -> None:
        """The last mount is gone: stop serving the image; its chunks stay cached."""
        if self._images.get(image.name) is not image:
            return
        log.info("released %s: %s", image.opened.reference, image.summary())
        del self._images[image.name]
        self._table.remove(image.name)
        image.close()
        self._retire(image)
        try:
            pyfuse3.invalidate_entry_async(SERVICE_ROOT_INODE, os.fsencode(image.name))
        except Exception as exc:  # the kernel drops it on its own after the entry timeout
            log.debug("cannot invalidate %s: %s", image.name, exc)

    def _save_profile(self, image: MountedImage, mount: _Mount) -> None:
        profile, path = image.recorded_profile(), mount.record_profile
        if profile is None or path is None or self._tasks is None:
            return
        owner = mount.owner

        def write() -> None:  # a worker thread: the path could be anywhere, even under a mount
            try:
                with AtomicFile(path, f"access profile {path}") as out:
                    out.write(profile.to_json())
                    out.commit()
                os.chown(path, owner.uid, owner.gid)
                log.info("wrote the access profile (%d reads) to %s", len(profile.reads), path)
            except (OSError, LazyfsError) as exc:
                log.error("cannot write the access profile to %s: %s", path, exc)

        self._tasks.start_soon(anyio.to_thread.run_sync, write)

    # ------------------------------------------------------------------------ introspection

    def health(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "pid": os.getpid(),
            "root": str(self.paths.root),
            "socket": str(self.paths.socket),
            "cache_dir": str(self.config.cache.directory),
            "images": len(self._images),
            "mounts": len(self._mounts),
            "store": str(self.config.store.directory) if self.config.store else None,
            "store_images": len(list(self._store.images())) if self._store else 0,
            "uptime_s": round(time.monotonic() - self._started, 3),
        }

    def list_mounts(self) -> dict[str, Any]:
        return {
            "mounts": [
                {
                    "mountpoint": str(m.mountpoint),
                    "image": m.image.name,
                    "reference": str(m.image.opened.reference),
                    "owner_uid": m.owner.uid,
                }
                for m in self._mounts.values()
            ]
        }

    def image_stats(self, mountpoint: Path) -> dict[str, Any]:
        mount = self._mounts.get(mountpoint)
        if mount is None:
            raise UsageError(f"{mountpoint} is not a mount of this service")
        return mount.image.stats()

    def stats(self) -> dict[str, Any]:
        """The service as a whole: what ``lazyfs stats`` with no mountpoint shows."""
        totals = self._totals()
        return {
            **self.health(),
            "cache_chunk_bytes": self._cache_chunk_bytes,
            # Chunks being fetched, or served and not yet written to the cache (lost to a kill).
            "chunks_in_flight": len(self._shared.flights) if self._shared is not None else 0,
            "cache_size_limit_bytes": self._cache.size_limit_bytes if self._cache else 0,
            "network_bytes_received": sum(c.stats.bytes_received for c in self._clients.values()),
            "fill_wire": self._lane.stats.to_json(),
            **{key: getattr(totals, key) for key, _, _ in COUNTERS},
            "internal_errors": totals.internal_errors + self._fuse_internal_errors(),
            "image_list": [
                {"image": name, "reference": str(image.opened.reference),
                 "mountpoints": [str(m) for m in image.mountpoints]}
                for name, image in sorted(self._images.items())
            ],
        }  # fmt: skip

    def figures(self) -> ServiceFigures:
        images = []
        for image in self._all_images():
            counters = image.stats()
            images.append(
                ImageFigures(
                    str(image.opened.reference),
                    {key: int(counters[key]) for key, _, _ in COUNTERS},
                    image.resolver.stats.read_latency,
                    image.resolver.stats.fetch_latency,
                )
            )
        totals = self._totals()
        counters = {key: int(getattr(totals, key)) for key, _, _ in COUNTERS}
        counters["internal_errors"] += self._fuse_internal_errors()
        counters["bytes_fetched"] += sum(
            layer.fetched_whole_bytes for i in self._all_images() for layer in i.opened.layers
        )
        summed = ImageFigures("", counters, totals.read_latency, totals.fetch_latency)
        return ServiceFigures(
            images, summed, len(self._mounts), self._cache_chunk_bytes, self._lane.stats
        )

    def _totals(self) -> ResolverStats:
        totals = ResolverStats()
        _add_stats(totals, self._retired)
        for image in self._all_images():
            _add_stats(totals, image.resolver.stats)
        return totals

    def _fuse_internal_errors(self) -> int:
        return self._operations.internal_errors if self._operations else 0

    def _summary(self) -> str:
        totals = self._totals()
        return (
            f"{len(self._images)} images, fetched {totals.bytes_fetched} bytes in "
            f"{totals.range_requests} range requests"
        )

    # ------------------------------------------------------------------------ service record

    def _write_record(self) -> None:
        """Tell clients that know only the cache directory where this service listens."""
        record = {
            "socket": str(self.paths.socket),
            "root": str(self.paths.root),
            "pid": os.getpid(),
        }
        try:
            with AtomicFile(self._layout.service_record) as out:
                out.write(json.dumps(record).encode())
                out.commit()
        except LazyfsError as exc:
            log.warning("cannot write %s: %s", self._layout.service_record, exc)

    def _forget_record(self) -> None:
        try:
            record = json.loads(self._layout.service_record.read_bytes())
            if record.get("pid") == os.getpid():
                self._layout.service_record.unlink()
        except (OSError, ValueError, AttributeError):
            pass


# ------------------------------------------------------------------------------- helpers


def _add_stats(total: ResolverStats, stats: ResolverStats) -> None:
    for key, _, _ in COUNTERS:
        setattr(total, key, getattr(total, key) + getattr(stats, key))
    for key in ("singleflight_waits", "readahead_chunks", "readahead_bytes", "prefetch_chunks"):
        setattr(total, key, getattr(total, key) + getattr(stats, key))
    total.read_latency.add(stats.read_latency)
    total.fetch_latency.add(stats.fetch_latency)


def _lock_cache(layout: CacheLayout, wait_s: float) -> IO[bytes]:
    """Hold the cache's service lock for the service's life: one service per cache. A service
    started while the last one is still stopping waits up to ``wait_s`` for it to be gone."""
    try:
        layout.root.mkdir(parents=True, exist_ok=True)
        handle = layout.service_lock.open("ab")
    except OSError as exc:
        raise UsageError(f"cannot use cache directory {layout.root}: {exc.strerror}") from exc
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() >= deadline:
                handle.close()
                raise ServiceError(
                    f"another lazyfs service already owns the cache {layout.root}"
                ) from None
            time.sleep(0.05)


def _prepare_root(root: Path) -> None:
    """Worker thread: make the root directory, clearing a dead session's mount there."""
    if bindmounts.is_stale(root):
        log.info("clearing the dead session at %s", root)
        bindmounts.unmount(root, lazy=True)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the store root {root}: {exc.strerror}") from exc
    if _is_mountpoint(root):
        raise UsageError(f"the store root {root} is already a mountpoint")


def _bind_store(source: Path, target: Path) -> None:
    """Worker thread: bind the store's directory at ``target`` (replacing a dead one)."""
    if bindmounts.is_stale(target):
        bindmounts.unmount(target, lazy=True)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the layer store {target}: {exc.strerror}") from exc
    if _is_mountpoint(target):
        raise UsageError(f"the layer store {target} is already a mountpoint")
    bindmounts.bind(source, target)


def _check_mountpoint(mountpoint: Path, peer: Peer) -> None:
    """Worker thread: a directory the requesting user owns (root may use any)."""
    try:
        info = os.stat(mountpoint)
    except OSError as exc:
        if bindmounts.is_stale(mountpoint):
            return  # a dead lazyfs mount: _bind replaces it
        raise UsageError(f"mountpoint {mountpoint}: {exc.strerror}") from exc
    if not os.path.isdir(mountpoint):
        raise UsageError(f"mountpoint {mountpoint} is not a directory")
    if peer.uid != 0 and info.st_uid != peer.uid:
        raise UsageError(f"mountpoint {mountpoint} is not yours")


def _is_mountpoint(path: Path) -> bool:
    return mountinfo.is_mounted(path)


def _mounted_paths() -> set[Path]:
    return {entry.mountpoint for entry in mountinfo.mounts()}


def tune_read_ahead(mountpoint: Path) -> None:
    """Raise the session's read-ahead (bind mounts share it). Worker thread: it stats our own
    mountpoint."""
    try:
        device = os.stat(mountpoint).st_dev
        bdi = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
        bdi.write_text(str(READ_AHEAD_KB))
    except OSError as exc:
        log.info("could not raise read-ahead on %s: %s", mountpoint, exc)


def _started(serve: Callable[..., Any]) -> Callable[..., Any]:
    """Adapt a serve-forever coroutine to ``TaskGroup.start``: started once it is listening."""

    async def run(*args: Any, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await serve(*args)

    return run


def _layout_request(args: dict[str, Any]) -> tuple[dict[str, Any], str, LayoutRegistry]:
    """Worker thread: an open request for an OCI layout on disk, as one for the registry host
    it is served under (registry/layoutregistry.py), by tag, or by the digest of the layout's only
    image (or of a tag no docker reference can spell); that host; what serves it."""
    path = _absolute(args.get("layout"), "layout")
    tag_text = args.get("tag")
    tag = _text(tag_text, "tag") if tag_text is not None else None
    layout = OciLayout(path)
    entry = layout.resolve(tag)
    host = layout_host(path)
    reference = f"{host}/{LAYOUT_REPOSITORY}@{entry.digest}"
    if tag is not None:
        with contextlib.suppress(InvalidReferenceError):
            reference = str(Reference.parse(f"{host}/{LAYOUT_REPOSITORY}:{tag}"))
    request = {**args, "reference": reference, "mirrors": None, "credentials": {}}
    return request, host, LayoutRegistry(layout)


def _absolute(value: object, name: str) -> Path:
    path = Path(_text(value, name))
    if not path.is_absolute():
        raise UsageError(f"{name} must be an absolute path")
    return Path(os.path.normpath(path))


def _text(value: object, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise UsageError(f"{name} must be a non-empty string")
    return value


def _optional_path(value: object, name: str) -> Path | None:
    return None if value is None else _absolute(value, name)


def _optional_bool(value: object, name: str) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise UsageError(f"{name} must be true, false or null")
    return value


def _positive(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UsageError(f"{name} must be a number")
    number = float(value)
    if not (0 < number < float("inf")):
        raise UsageError(f"{name} must be finite and positive, not {value!r}")
    return number


def _credentials(value: object) -> dict[str, Credentials]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UsageError("credentials must map registries to [user, password]")
    found = {}
    for registry, pair in value.items():
        if not (
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)
        ):
            raise UsageError("credentials must map registries to [user, password]")
        found[str(registry)] = Credentials(pair[0], pair[1])
    return found


def socket_mode(group: str | None) -> tuple[int, int | None]:
    """The control socket's mode and group: 0600, or 0660 with ``group``."""
    if group is None:
        return 0o600, None
    try:
        return 0o660, grp.getgrnam(group).gr_gid
    except KeyError:
        raise UsageError(f"--socket-group: no group named {group!r}") from None
