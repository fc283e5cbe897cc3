"""Bind mounts of image directories, and clearing mounts left by a dead service.

mount(2) and umount2(2) through libc: a bind mount costs a few microseconds this way, against
milliseconds for running mount(8). Every call here blocks, and a bind of a directory of our own
FUSE session makes the kernel look it up through that session: run them in worker threads,
never on the event loop (docs/concurrency.md, invariant "no syscall on our own mountpoint").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from pathlib import Path

from lazyfs.errors import ServiceError

MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def bind(source: Path, target: Path) -> None:
    """Bind ``source`` at ``target`` as it is (the layer store: podman marks uses in it)."""
    _mount(source, target, MS_BIND, f"cannot bind {source} at {target}")


def bind_read_only(source: Path, target: Path) -> None:
    """Bind ``source`` at ``target``, read-only."""
    _mount(source, target, MS_BIND, f"cannot bind {source} at {target}")
    try:
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        _mount(None, target, flags, f"cannot make {target} read-only")
    except ServiceError:
        unmount(target, lazy=True)
        raise


def unmount(target: Path, *, lazy: bool = False) -> None:
    """Unmount ``target``; ``lazy`` detaches it even while it is busy (umount -l)."""
    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if lazy else 0)
    if _libc.umount2(os.fsencode(target), flags) != 0:
        code = ctypes.get_errno()
        if code == errno.EINVAL:  # not a mountpoint (any more)
            return
        raise ServiceError(f"cannot unmount {target}: {os.strerror(code)}")


def is_stale(path: Path) -> bool:
    """True if ``path`` is a mountpoint whose FUSE server is gone (ENOTCONN). statfs, since the
    kernel answers stat from its attribute cache even for a dead connection."""
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def _mount(source: Path | None, target: Path, flags: int, what: str) -> None:
    src = os.fsencode(source) if source is not None else None
    if _libc.mount(src, os.fsencode(target), None, flags, None) != 0:
        raise ServiceError(f"{what}: {os.strerror(ctypes.get_errno())}")
