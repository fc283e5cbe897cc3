"""``lazyfs demo`` (what the README's first command, ``make demo``, runs), end to end."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from lazyfs_run import run_lazyfs

from lazyfs.mount.mountinfo import is_mounted

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")


def test_demo_converts_mounts_reads_and_cleans_up(tmp_path: Path) -> None:
    result = run_lazyfs("demo", "--work-dir", str(tmp_path), timeout=240)
    steps = [line for line in result.stderr.splitlines() if line.startswith("==> ")]
    assert any("converted and pushed" in step for step in steps), result.stderr
    assert any(step.startswith("==> mounted at") for step in steps), result.stderr
    assert any("chunks verified and cached" in step for step in steps), result.stderr
    assert steps[-1] == "==> unmounted"
    assert "motd" in result.stdout or result.stdout.strip()  # it printed what it read
    assert not is_mounted(tmp_path / "mnt")
