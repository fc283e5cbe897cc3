"""The runtime modes: podman pulls the image and runs the workload in it (issue 10).

- ``podman-pull``: a podman with no layer store pulls the image as built (gzip, ``:latest``)
  in full, then ``podman run --rm`` runs the workload;
- ``podman-lazyfs``: a ``lazyfs serve --store DIR`` is started first (not timed: *service
  up*, as for the lazy modes), and a podman whose ``storage.conf`` names DIR as its additional
  layer store pulls and runs the converted image (zstd:chunked, ``:chunked``);
- ``podman-peer``: the same with the peer's store (stargz-store, ``--peer-store PATH``,
  :mod:`lazyfs.bench.peerstore`; its *service up* is until its mount appears) and the eStargz
  conversion (``:estargz``).

Every podman is private and new for each start: its configuration files (the service's
lazyfs/service/podmanconf.py), graphroot and runroot live in a fresh directory under /tmp, kept
short because conmon's attach socket goes under it and a UNIX socket path longer than 108 bytes
makes every ``podman run`` wait 20 s. Afterwards its containers and images are removed (which
releases the store's layers), what it left mounted is detached, and the directory deleted.

The timed part starts just after the page cache is dropped and covers ``podman pull`` and
``podman run``: *mount* is when the pull returned (there is no first-byte probe: the first
byte figure is the pull's end too), *ready* when the run returned (or, with a ready line, when
it returned having printed it). Bytes and requests are the link proxy's, so the manifests and
configs podman fetches count. ``daemon`` CPU and peak RSS are the layer store's process (the
lazyfs service, stargz-store), or podman's own in ``podman-pull``, whose pull does the work;
``workload_cpu_s`` is podman's (the client: pull and run).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lazyfs.bench import PODMAN_LAZYFS, PODMAN_PEER, PODMAN_PULL
from lazyfs.bench.images import TAG
from lazyfs.bench.modes import (
    CHUNKED_TAG,
    ModeContext,
    ProcessCost,
    RunMetrics,
    _metrics,
    drop_page_cache,
    process_cost,
    run_measured,
)
from lazyfs.bench.mountservice import detach_mounts, mount_service
from lazyfs.bench.peerstore import ESTARGZ_TAG, peer_store
from lazyfs.bench.workload import WorkloadResult
from lazyfs.errors import LazyfsError
from lazyfs.mount.mountinfo import mounts
from lazyfs.service.podmanconf import (
    CONTAINERS_CONF_ENV,
    REGISTRIES_CONF_ENV,
    STORAGE_CONF_ENV,
    write_private_config,
)

PODMAN_TOOLS = ("podman", "runc")
PODMAN_PARENT = Path("/tmp")  # short paths: see the module docstring
_CLEANUP_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class BenchPodman:
    """podman with private configuration, storage and run state under ``root``."""

    root: Path
    env: dict[str, str]
    log: Path

    def run(self, *args: str, timeout_s: float) -> ProcessCost:
        """``podman ARGS`` to completion (LazyfsError on failure); its CPU time and peak RSS."""
        return run_measured(["podman", *args], self.log, timeout_s, self.env)


def missing_tools() -> list[str]:
    return [tool for tool in PODMAN_TOOLS if shutil.which(tool) is None]


@contextlib.contextmanager
def private_podman(ctx: ModeContext, store: Path | None) -> Iterator[BenchPodman]:
    root = Path(tempfile.mkdtemp(prefix="lzb-pm-", dir=PODMAN_PARENT))
    try:
        env = write_private_config(root, store, [ctx.link.registry_host])
        yield BenchPodman(root, env, ctx.work / "podman.log")
    finally:
        _clean_up(root)


def _clean_up(root: Path) -> None:
    """Containers and images removed (the store's layers released), mounts detached, gone."""
    env = {
        **os.environ,
        STORAGE_CONF_ENV: str(root / "storage.conf"),
        CONTAINERS_CONF_ENV: str(root / "containers.conf"),
        REGISTRIES_CONF_ENV: str(root / "registries.conf"),
        "XDG_RUNTIME_DIR": str(root / "xdg"),
    }
    if (root / "storage.conf").is_file():  # else podman would use the system's storage
        for args in (("rm", "--all", "--force"), ("rmi", "--all", "--force")):
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run(
                    ["podman", *args], env=env, capture_output=True, check=False,
                    stdin=subprocess.DEVNULL, timeout=_CLEANUP_TIMEOUT_S,
                )  # fmt: skip
    resolved = Path(os.path.realpath(root))
    detach_mounts([m.mountpoint for m in mounts() if m.mountpoint.is_relative_to(resolved)])
    shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class Timed:
    """The timed part: started, pulled and ready instants, podman's cost, the link counters."""

    started: float
    pulled: float
    ready: float
    podman: ProcessCost
    traffic: tuple[dict[str, int], dict[str, int]]


def pull_and_run(ctx: ModeContext, podman: BenchPodman, tag: str) -> Timed:
    """Drop the page cache; then, timed, ``podman pull`` and ``podman run --rm`` the workload."""
    reference = ctx.reference(tag)
    timeout = ctx.timeout_s
    drop_page_cache()
    before = ctx.link.counters()
    started = time.monotonic()
    cost = podman.run("pull", "--quiet", "--tls-verify=false", reference, timeout_s=timeout)
    pulled = time.monotonic()
    output = ctx.work / "workload.out"
    run = ["run", "--rm", "--net=none", "--pull=never", reference, *ctx.image.command]
    cost.add(run_measured(["podman", *run], output, timeout, podman.env))
    ready = time.monotonic()
    after = ctx.link.counters()
    ready_line = ctx.image.ready_line
    if ready_line is not None and ready_line not in output.read_text(errors="replace"):
        raise LazyfsError(f"podman run {reference}: the workload did not print {ready_line!r}")
    return Timed(started, pulled, ready, cost, (before, after))


def _figures(
    ctx: ModeContext,
    mode: str,
    timed: Timed,
    daemon: ProcessCost,
    stats: dict[str, Any] | None = None,
    up_s: float | None = None,
) -> RunMetrics:
    result = WorkloadResult(
        t_first_byte=timed.pulled, t_ready=timed.ready, workload_cpu_s=round(timed.podman.cpu_s, 3)
    )
    return _metrics(
        ctx, mode, timed.started, timed.pulled, result, timed.traffic, daemon, stats, up_s
    )


def podman_pull(ctx: ModeContext) -> RunMetrics:
    with private_podman(ctx, None) as podman:
        timed = pull_and_run(ctx, podman, TAG)
    return _figures(ctx, PODMAN_PULL, timed, timed.podman)


def podman_lazyfs(ctx: ModeContext) -> RunMetrics:
    store = ctx.work / "store"
    extra = ("--store", str(store), "--tls-verify=false")
    with mount_service(ctx.work / "cache", ctx.work / "service", ctx.work, extra) as service:
        idle = process_cost(service.pid)
        with private_podman(ctx, store) as podman:
            timed = pull_and_run(ctx, podman, CHUNKED_TAG)
            daemon = process_cost(service.pid).since(idle)
            stats = service.stats()
    return _figures(ctx, PODMAN_LAZYFS, timed, daemon, stats, service.up_s)


def podman_peer(ctx: ModeContext) -> RunMetrics:
    if ctx.peer_store is None:
        raise LazyfsError(f"{PODMAN_PEER} needs --peer-store PATH")
    with peer_store(ctx.peer_store, ctx.work, ctx.link.registry_host) as peer:
        idle = process_cost(peer.pid)
        with private_podman(ctx, peer.mountpoint) as podman:
            timed = pull_and_run(ctx, podman, ESTARGZ_TAG)
            daemon = process_cost(peer.pid).since(idle)
    return _figures(ctx, PODMAN_PEER, timed, daemon, None, peer.up_s)


RUNTIME_RUNNERS: dict[str, Callable[[ModeContext], RunMetrics]] = {
    PODMAN_PULL: podman_pull,
    PODMAN_LAZYFS: podman_lazyfs,
    PODMAN_PEER: podman_peer,
}
