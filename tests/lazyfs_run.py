"""Run the real ``lazyfs`` CLI in a child process, as a user would, and mount helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lazyfs.mount.mountinfo import is_mounted

ROOT = Path(__file__).resolve().parent.parent


def run_lazyfs(
    *args: str, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """``python -m lazyfs ARGS``; with check, fail the test with its stderr on a non-zero exit."""
    result = subprocess.run(
        [sys.executable, "-m", "lazyfs", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"lazyfs {' '.join(args)} failed ({result.returncode}):\n{result.stderr}"
        )
    return result


def stats(mountpoint: Path) -> dict[str, Any]:
    return json.loads(os.getxattr(mountpoint, "user.lazyfs.stats"))  # type: ignore[no-any-return]


def settled_stats(
    mountpoint: Path, quiet_s: float = 0.3, timeout_s: float = 20.0
) -> dict[str, Any]:
    """The mount's stats once its fetches have settled: a read returns as soon as its own
    chunks are verified, while the rest of the answer (read-ahead) may still be coming in."""
    deadline = time.monotonic() + timeout_s
    last = stats(mountpoint)
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = stats(mountpoint)
        if all(now[key] == last[key] for key in _SETTLED_KEYS):
            return now
        last = now
    return last


_SETTLED_KEYS = ("chunks_fetched", "range_requests", "bytes_fetched")


@contextmanager
def mounted(reference: str, mountpoint: Path, cache_dir: Path, *extra: str) -> Iterator[Path]:
    """Mount with the real CLI; unmount afterwards and check the daemon is gone."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    run_lazyfs("mount", "--cache-dir", str(cache_dir), *extra, reference, str(mountpoint))
    pid = stats(mountpoint)["pid"]
    try:
        yield mountpoint
    finally:
        if is_mounted(mountpoint):
            run_lazyfs("umount", str(mountpoint), check=False)
        if is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
        wait_gone(pid)


def wait_gone(pid: int, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"daemon {pid} still running")
