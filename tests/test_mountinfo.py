"""Reading /proc/self/mountinfo: the kernel's octal escapes, the fields after the separator,
and a real bind mount on a path with a space."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from lazyfs.mount.mountinfo import (
    is_mounted,
    mounts,
    parse_line,
    parse_mountinfo,
    unescape,
)


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        (rb"/mnt/plain", "/mnt/plain"),
        (rb"/mnt/with\040space", "/mnt/with space"),
        (rb"/mnt/tab\011and\012newline", "/mnt/tab\tand\nnewline"),
        (rb"/mnt/back\134slash", "/mnt/back\\slash"),
        (rb"/mnt/\134040", "/mnt/\\040"),  # an escaped backslash followed by digits
        ("/mnt/ünï".encode(), "/mnt/ünï"),  # other bytes are written as they are
        (b"/mnt/\xff", os.fsdecode(b"/mnt/\xff")),  # not UTF-8: as the file system names it
    ],
)
def test_unescape(field: bytes, expected: str) -> None:
    assert unescape(field) == expected


def test_parse_line_with_optional_fields() -> None:
    line = (
        rb"36 35 0:42 / /var/tmp/a\040b rw,nosuid,nodev shared:1 master:2 - fuse.lazyfs lazyfs "
        b"ro,user_id=0,group_id=0\n"
    )
    entry = parse_line(line)
    assert entry.mountpoint == Path("/var/tmp/a b")
    assert (entry.fstype, entry.source) == ("fuse.lazyfs", "lazyfs")


def test_parse_mountinfo_skips_blank_lines() -> None:
    lines = [b"1 0 8:1 / / rw - ext4 /dev/sda1 rw\n", b"\n"]
    assert [entry.mountpoint for entry in parse_mountinfo(lines)] == [Path("/")]


def test_mountinfo_of_this_process() -> None:
    assert any(entry.mountpoint == Path("/") for entry in mounts())
    assert is_mounted(Path("/"))


@pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")
def test_bind_mount_on_a_path_with_a_space(tmp_path: Path) -> None:
    source, target = tmp_path / "source", tmp_path / "with space"
    source.mkdir()
    target.mkdir()
    assert not is_mounted(target)
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
    try:
        assert is_mounted(target)
        assert is_mounted(tmp_path / "." / "with space")  # the same place, named otherwise
    finally:
        subprocess.run(["umount", str(target)], check=True)
    assert not is_mounted(target)
