"""What is mounted where, read from ``/proc/self/mountinfo``.

The kernel writes a mountinfo line as ``ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [TAGS...] -
FSTYPE SOURCE SUPER_OPTIONS`` and escapes space, tab, newline and backslash in paths as octal
(``\\040``, ``\\011``, ``\\012``, ``\\134``); every other byte of a path is written as is, so the
file is read as bytes and paths are decoded as the file system names them (``os.fsdecode``).

Kept free of pyfuse3 and trio: the CLI front end, the benchmarks and the tests all import it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from lazyfs.model.record import Record

MOUNTINFO: Final = Path("/proc/self/mountinfo")
_OCTAL_ESCAPE: Final = re.compile(rb"\\([0-7]{3})")
_MOUNTPOINT_FIELD: Final = 4
_SEPARATOR: Final = b"-"  # ends the optional tag fields


class MountEntry(Record):
    """One line of mountinfo: where, what kind of file system, and from what source. A record,
    not a dataclass: ``lazyfs mount`` reads mountinfo at every start."""

    _FIELDS = ("mountpoint", "fstype", "source")
    __slots__ = _FIELDS
    mountpoint: Path
    fstype: str
    source: str

    def __init__(self, mountpoint: Path, fstype: str, source: str) -> None:
        self._set("mountpoint", mountpoint)
        self._set("fstype", fstype)
        self._set("source", source)


def unescape(field: bytes) -> str:
    """A mountinfo field with the kernel's octal escapes undone, as a file system name."""
    raw = _OCTAL_ESCAPE.sub(lambda match: bytes([int(match[1], 8)]), field)
    return os.fsdecode(raw)


def parse_line(line: bytes) -> MountEntry:
    fields = line.rstrip(b"\n").split(b" ")
    separator = fields.index(_SEPARATOR, _MOUNTPOINT_FIELD + 2)
    return MountEntry(
        mountpoint=Path(unescape(fields[_MOUNTPOINT_FIELD])),
        fstype=unescape(fields[separator + 1]),
        source=unescape(fields[separator + 2]),
    )


def parse_mountinfo(lines: Iterable[bytes]) -> list[MountEntry]:
    return [parse_line(line) for line in lines if line.strip()]


def mounts(mountinfo: Path = MOUNTINFO) -> list[MountEntry]:
    """Every mount this process sees, in mount order."""
    with mountinfo.open("rb") as lines:
        return parse_mountinfo(lines)


def is_mounted(path: Path) -> bool:
    """Whether something is mounted on ``path`` (symlinks resolved, as the kernel names it)."""
    target = Path(os.path.realpath(path))
    return any(entry.mountpoint == target for entry in mounts())
