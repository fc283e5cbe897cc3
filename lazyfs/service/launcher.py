"""Finding the service that owns a cache directory, and starting one on demand.

``lazyfs mount`` without ``--socket`` uses the service that owns its cache directory: the one
named by ``CACHE_DIR/service.json``, else the one at the cache's default socket. If none
answers, it starts ``lazyfs serve`` for that cache as a daemon, which exits a few seconds after
its last image is released. Light: the CLI imports it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lazyfs.cache.layout import CacheLayout
from lazyfs.errors import ServiceError
from lazyfs.service import client
from lazyfs.service.paths import ServicePaths, sockets_for_cache

START_TIMEOUT_S = 60.0
LOCK_WAIT_S = 30.0  # for a service of the same cache that is still stopping
_POLL_S = 0.02


@dataclass(frozen=True)
class ServiceSettings:
    """What a service started on demand is given."""

    cache_dir: Path
    cache_size_bytes: int | None  # None: the bound stored with the cache
    idle_exit_s: float
    verify_cache_reads: bool = False
    log_level: str = "info"


def socket_for_cache(cache_dir: Path) -> Path:
    """The socket of the service that owns ``cache_dir`` (running or not)."""
    *recorded, default = sockets_for_cache(cache_dir)
    return next((socket for socket in recorded if client.is_listening(socket)), default)


def start_service(settings: ServiceSettings) -> tuple[Path, int]:
    """Start a service for the cache as a daemon; its socket and pid, once it answers."""
    paths = ServicePaths.for_cache(settings.cache_dir)
    log_path = CacheLayout(settings.cache_dir).service_log
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = log_path.open("ab")
    except OSError as exc:
        raise ServiceError(f"cannot write the service log {log_path}: {exc.strerror}") from exc
    argv = [
        sys.executable, "-m", "lazyfs", "--log-level", settings.log_level, "serve",
        "--cache-dir", str(settings.cache_dir),
        *(["--cache-size", str(settings.cache_size_bytes)] if settings.cache_size_bytes else []),
        "--run-dir", str(paths.run_dir),
        "--idle-exit", str(settings.idle_exit_s),
        "--lock-wait", str(LOCK_WAIT_S),
        *(["--verify-cache-reads"] if settings.verify_cache_reads else []),
    ]  # fmt: skip
    with log_file:
        daemon = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    _wait_until_listening(paths.socket, daemon, log_path)
    return paths.socket, daemon.pid


def _wait_until_listening(socket: Path, daemon: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if client.is_listening(socket):
            return
        if daemon.poll() is not None:
            if client.is_listening(socket):  # lost a race to another one: use it
                return
            raise ServiceError(f"the mount service could not start: {_last_error(log_path)}")
        time.sleep(_POLL_S)
    raise ServiceError(f"the mount service did not answer within {START_TIMEOUT_S:.0f} s")


def _last_error(log_path: Path) -> str:
    try:
        lines = log_path.read_text(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    for line in reversed(lines[-50:]):
        if "error" in line.lower():
            return line.split("error: ", 1)[-1]
    return f"see {log_path}"
