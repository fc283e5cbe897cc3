"""Run lazyfs itself as a child process (the demo and bench drive the real CLI)."""

from __future__ import annotations

import subprocess
import sys

from lazyfs.errors import LazyfsError


def lazyfs_command(*args: str) -> str:
    """Run ``lazyfs ARGS``; return stdout; raise LazyfsError with its error line on failure."""
    result = subprocess.run(
        [sys.executable, "-m", "lazyfs", *args], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        raise LazyfsError(f"lazyfs {args[0]} failed: {lines[-1].removeprefix('lazyfs: error: ')}")
    return result.stdout
