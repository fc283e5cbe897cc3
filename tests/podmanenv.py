"""A private podman for tests: its own storage.conf, containers.conf and registries.conf.

:func:`private_podman` writes the three files (lazyfs/service/podmanconf.py) under a test's
directory, with graphroot and runroot there too, and yields a :class:`Podman` whose ``env``
points podman at them; :meth:`Podman.run` runs ``podman ARGS`` with a timeout. On the way out
every container and image is removed, whatever is still mounted under the directory is
unmounted, and the directory is deleted: the system's podman storage is never touched.

``require_podman`` skips a test when podman or runc is missing, and fails it under ``CI=true``
(the suite's policy: CI runs every test).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from lazyfs.mount.mountinfo import mounts
from lazyfs.service.podmanconf import write_private_config

PODMAN_TIMEOUT_S = 120.0
_CLEANUP_TIMEOUT_S = 60.0
_MNT_DETACH = 2


def require_podman() -> None:
    """Skip without podman and runc; fail instead under CI=true."""
    missing = [tool for tool in ("podman", "runc") if shutil.which(tool) is None]
    if not missing:
        return
    message = f"{' and '.join(missing)} not installed (make setup installs them)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}, and CI must run every test")
    pytest.skip(message)


@dataclass(frozen=True)
class Podman:
    """podman with private configuration files, storage and run state under ``root``."""

    root: Path
    env: dict[str, str]

    def run(
        self, *args: str, timeout: float = PODMAN_TIMEOUT_S, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``podman ARGS``; with check, fail the test with podman's stderr on a non-zero exit."""
        result = subprocess.run(
            ["podman", *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args)} failed ({result.returncode}):\n{result.stderr.strip()}"
            )
        return result


@contextlib.contextmanager
def private_podman(
    root: Path, store: Path | None = None, insecure: Sequence[str] = ()
) -> Iterator[Podman]:
    """A :class:`Podman` under ``root`` (``store``: its additional layer store; ``insecure``:
    registries spoken to over plain HTTP); everything it made is removed afterwards."""
    podman = Podman(root, write_private_config(root, store, insecure))
    try:
        yield podman
    finally:
        clean_up(podman)


def clean_up(podman: Podman) -> None:
    """Remove containers and images, unmount what is left under the root, delete it."""
    for args in (("rm", "--all", "--force"), ("rmi", "--all", "--force")):
        with contextlib.suppress(subprocess.TimeoutExpired):
            podman.run(*args, timeout=_CLEANUP_TIMEOUT_S, check=False)
    unmount_under(podman.root)
    shutil.rmtree(podman.root, ignore_errors=True)


def unmount_under(root: Path) -> None:
    """Lazily unmount every mount under ``root``, innermost first (overlay, shm, the driver's
    private bind mount of its home)."""
    libc = ctypes.CDLL(None, use_errno=True)
    resolved = Path(os.path.realpath(root))
    for entry in reversed(mounts()):
        if entry.mountpoint.is_relative_to(resolved):
            libc.umount2(os.fsencode(entry.mountpoint), _MNT_DETACH)
