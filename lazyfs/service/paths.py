"""Where a service lives: its run directory, control socket, store root and state file.

A service owns one cache directory. Its run directory is under ``/run/lazyfs`` for root
(``$XDG_RUNTIME_DIR/lazyfs`` or ``/tmp/lazyfs-UID`` otherwise): ``default/`` for the default
cache, ``c-<hash of the cache path>/`` for any other, so a client that knows only the cache
directory finds (or starts) the service that owns it. Light: the CLI imports it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lazyfs"


def run_base() -> Path:
    if os.geteuid() == 0:
        return Path("/run/lazyfs")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "lazyfs" if runtime else Path(f"/tmp/lazyfs-{os.geteuid()}")


@dataclass(frozen=True)
class ServicePaths:
    run_dir: Path
    socket: Path
    root: Path
    state: Path

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


def run_dir_name(cache_dir: Path) -> str:
    resolved = cache_dir.absolute()
    if resolved == default_cache_dir().absolute():
        return "default"
    import hashlib  # here: clients given --socket never need it

    return "c-" + hashlib.sha256(os.fsencode(resolved)).hexdigest()[:16]
