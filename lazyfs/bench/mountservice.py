"""The mount service as a node runs it: ``lazyfs serve`` started first, images mounted through it.

:func:`mount_service` starts ``lazyfs serve --cache-dir C --run-dir R`` and times how long it
takes to answer the ``stats`` request (the one ``lazyfs stats --socket S`` sends): *service up*.
It is polled in-process every few milliseconds, so no client interpreter start counts. On the
way out the service is stopped the way an init system would (SIGTERM, then wait), and no
``fuse.lazyfs`` mount may remain under the caller's scope directory: any left is detached and
reported. :func:`service_mount` is ``lazyfs mount --socket S`` (the real thin client, what the
bench times) and ``lazyfs umount --socket S`` afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lazyfs.bench.command import lazyfs_command
from lazyfs.bench.processes import stop_process
from lazyfs.errors import LazyfsError, ServiceError, ServiceUnavailableError
from lazyfs.mount import mountinfo
from lazyfs.service import bindmounts, client

LAZYFS_FSTYPE = "fuse.lazyfs"
SERVICE_START_TIMEOUT_S = 120.0
SERVICE_STOP_TIMEOUT_S = 30.0
_UP_POLL_S = 0.005
_STATS_TIMEOUT_S = 5.0
_SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes, NUL included
_LOG_TAIL_LINES = 3
_SELF_RELEASE = "was unmounted from outside"


@dataclass(frozen=True)
class RunningService:
    """A ``lazyfs serve`` process the bench started, and how long it took to answer."""

    pid: int
    socket: Path
    run_dir: Path
    log: Path
    up_s: float

    def stats(self) -> dict[str, Any]:
        """The service's ``stats`` answer (what ``lazyfs stats --socket S`` prints)."""
        answer: dict[str, Any] = client.call(self.socket, "stats", timeout_s=_STATS_TIMEOUT_S)
        return answer


def lazyfs_mounts_under(scope: Path) -> list[Path]:
    """Mountpoints of ``fuse.lazyfs`` (the service's root and its bind mounts) under ``scope``,
    innermost last, as /proc/self/mountinfo lists them."""
    resolved = Path(os.path.realpath(scope))
    return [
        entry.mountpoint
        for entry in mountinfo.mounts()
        if entry.fstype == LAZYFS_FSTYPE and entry.mountpoint.is_relative_to(resolved)
    ]


def detach_mounts(mountpoints: list[Path]) -> None:
    """Lazily unmount ``mountpoints``, most recent first (bind mounts before the root)."""
    for mountpoint in reversed(mountpoints):
        with contextlib.suppress(LazyfsError):
            bindmounts.unmount(mountpoint, lazy=True)


@contextlib.contextmanager
def mount_service(
    cache_dir: Path, run_dir: Path, scope: Path, extra: Sequence[str] = ()
) -> Iterator[RunningService]:
    """A ``lazyfs serve`` for ``cache_dir`` with its own ``run_dir`` (and ``extra`` arguments,
    e.g. ``--store DIR``), up and answering; stopped with SIGTERM afterwards. Raises
    LazyfsError (after cleaning up) if it did not stop in time or left a lazyfs mount under
    ``scope``."""
    socket = run_dir / "control.sock"
    if len(os.fsencode(socket)) > _SOCKET_PATH_MAX:
        raise LazyfsError(f"socket path {socket} is too long for a UNIX socket: shorten --work-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{run_dir.name}.log"  # beside the run dir: the service owns that
    process, started = _spawn(cache_dir, run_dir, log, extra)
    problems: list[str] = []
    try:
        up_s = _wait_until_up(process, socket, log, started)
        yield RunningService(process.pid, socket, run_dir, log, up_s)
    except LazyfsError as exc:
        releases = _released_by_itself(log)
        if not releases:
            raise
        raise LazyfsError(f"{exc} [the service released it by itself: {releases[-1]}]") from exc
    finally:
        problems = _stop(process, scope)
    if problems:
        raise LazyfsError(f"the mount service did not stop cleanly: {'; '.join(problems)}")


def _spawn(
    cache_dir: Path, run_dir: Path, log: Path, extra: Sequence[str] = ()
) -> tuple[subprocess.Popen[bytes], float]:
    argv = [
        sys.executable, "-m", "lazyfs", "--log-level", "info", "serve",  # as the launcher's
        "--cache-dir", str(cache_dir), "--run-dir", str(run_dir), *extra,
    ]  # fmt: skip
    with log.open("wb") as log_file:  # this service's own: _released_by_itself reads it
        started = time.monotonic()
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C reaches the bench, which stops it in order
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    return process, started


def _wait_until_up(
    process: subprocess.Popen[bytes], socket: Path, log: Path, started: float
) -> float:
    """Seconds from the spawn until the service answers ``stats`` (bounded)."""
    deadline = started + SERVICE_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServiceError(f"lazyfs serve exited ({process.returncode}): {_tail(log)}")
        try:
            client.call(socket, "stats", timeout_s=_STATS_TIMEOUT_S)
        except ServiceUnavailableError:  # not listening yet
            time.sleep(_UP_POLL_S)
            continue
        return time.monotonic() - started
    raise ServiceError(f"lazyfs serve did not answer within {SERVICE_START_TIMEOUT_S:.0f} s")


def _stop(process: subprocess.Popen[bytes], scope: Path) -> list[str]:
    """SIGTERM and wait (SIGKILL if it will not go); then detach any lazyfs mount it left."""
    problems = []
    if stop_process(process, SERVICE_STOP_TIMEOUT_S):
        problems.append(f"still running {SERVICE_STOP_TIMEOUT_S:.0f} s after SIGTERM: killed")
    if process.returncode not in (0, -signal.SIGTERM) and not problems:
        problems.append(f"exit status {process.returncode}")
    left = lazyfs_mounts_under(scope)
    if left:
        problems.append(f"left {len(left)} lazyfs mounts: {', '.join(map(str, left))}")
        detach_mounts(left)
    return problems


def _released_by_itself(log: Path) -> list[str]:
    """The service's log lines saying it released a mount it believed unmounted from outside
    (what makes a workload fail if the mount was still in use)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line.partition("INFO: ")[2] for line in lines if _SELF_RELEASE in line]


def _tail(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return f"see {log}"
    return " | ".join(lines[-_LOG_TAIL_LINES:]) or "no output"


# --- mounts through the service ---------------------------------------------------------------


@contextlib.contextmanager
def service_mount(
    service: RunningService, reference: str, mountpoint: Path, *options: str
) -> Iterator[Path]:
    """``lazyfs mount --socket S`` (plain HTTP allowed); always released afterwards."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    try:
        lazyfs_command(
            "mount", "--socket", str(service.socket), "--tls-verify=false",
            *options, reference, str(mountpoint),
        )  # fmt: skip
        yield mountpoint
    finally:
        # Also when interrupted between the service binding and `lazyfs mount` returning.
        if mountinfo.is_mounted(mountpoint):
            release(service, mountpoint)


def release(service: RunningService, mountpoint: Path) -> None:
    """``lazyfs umount --socket S``; a lazy unmount if the service cannot."""
    try:
        lazyfs_command("umount", "--socket", str(service.socket), str(mountpoint))
    except LazyfsError:
        detach_mounts([mountpoint])
