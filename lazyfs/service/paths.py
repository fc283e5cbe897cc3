"""Where a service lives: its run directory, control socket, store root and state file.

A service owns one cache directory. Its run directory is under ``/run/lazyfs`` for root
(``$XDG_RUNTIME_DIR/lazyfs`` or ``/tmp/lazyfs-UID`` otherwise): ``default/`` for the default
cache, ``c-<hash of the cache path>/`` for any other, so a client that knows only the cache
directory finds (or starts) the service that owns it. Light: the CLI imports it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lazyfs.cache.layout import CacheLayout
from lazyfs.model.record import Record


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lazyfs"


def run_base() -> Path:
    if os.geteuid() == 0:
        return Path("/run/lazyfs")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "lazyfs" if runtime else Path(f"/tmp/lazyfs-{os.geteuid()}")


class ServicePaths(Record):  # a record, not a dataclass: the CLI imports this module
    _FIELDS = ("run_dir", "socket", "root", "state")
    __slots__ = _FIELDS
    run_dir: Path
    socket: Path
    root: Path
    state: Path

    def __init__(self, run_dir: Path, socket: Path, root: Path, state: Path) -> None:
        self._set("run_dir", run_dir)
        self._set("socket", socket)
        self._set("root", root)
        self._set("state", state)

    @classmethod
    def in_run_dir(
        cls, run_dir: Path, socket: Path | None = None, root: Path | None = None
    ) -> ServicePaths:
        return cls(
            run_dir,
            socket or run_dir / "control.sock",
            root or run_dir / "root",
            run_dir / "state.json",
        )

    @classmethod
    def for_cache(cls, cache_dir: Path) -> ServicePaths:
        return cls.in_run_dir(run_base() / run_dir_name(cache_dir))


def sockets_for_cache(cache_dir: Path) -> list[Path]:
    """Where the service that owns ``cache_dir`` may listen, in the order to try: the socket its
    record names (``CACHE_DIR/service.json``: a service given --run-dir or --socket), then the
    cache's default one. Nothing is probed."""
    default = ServicePaths.for_cache(cache_dir).socket
    try:
        record = json.loads(CacheLayout(cache_dir).service_record.read_bytes())
        recorded = Path(record["socket"])
    except (OSError, ValueError, KeyError, TypeError):
        return [default]
    return [recorded] if recorded == default else [recorded, default]


def run_dir_name(cache_dir: Path) -> str:
    resolved = cache_dir.absolute()
    if resolved == default_cache_dir().absolute():
        return "default"
    import hashlib  # here: clients given --socket never need it

    return "c-" + hashlib.sha256(os.fsencode(resolved)).hexdigest()[:16]
