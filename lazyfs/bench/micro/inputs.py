"""The micro-benchmarks' input data: deterministic samples of this machine's /usr, what they
are made of, and the layer entries that read them (written by lazyfs.convert.imagebuild).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lazyfs.bench.micro.common import MB, MIB
from lazyfs.convert.imagebuild import Entry, file_read_when_written


@dataclass(frozen=True)
class SourceFile:
    """A regular file of this machine, and the name it gets in a layer tar."""

    path: Path
    name: str
    size: int
    mode: int


def usr_files(root: Path = Path("/usr"), max_file_bytes: int = 32 * MIB) -> list[SourceFile]:
    """Every readable regular file under ``root`` up to ``max_file_bytes``, in sorted path order.

    Symlinks are not followed. The order is deterministic for a given machine.
    """
    found: list[SourceFile] = []
    for directory, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = Path(directory, name)
            try:
                st = path.lstat()
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_size > max_file_bytes:
                continue
            if not os.access(path, os.R_OK):
                continue
            arcname = str(path.relative_to(root.parent))
            found.append(SourceFile(path, arcname, st.st_size, st.st_mode & 0o7777))
    return found


def sample_files(
    files: Sequence[SourceFile],
    *,
    target_bytes: int | None = None,
    target_count: int | None = None,
    salt: str = "lazyfs-bench",
) -> list[SourceFile]:
    """A deterministic uniform sample of ``files`` up to a target size or count, in path order.

    Files are ranked by the sha256 of their name (with ``salt``) and taken in that order, so the
    sample keeps the tree's mix of binaries, libraries, scripts and text, and a file added to or
    removed from the tree changes the sample by at most that file.
    """
    if not files:
        raise RuntimeError("no input files found")
    ranked = sorted(files, key=lambda f: hashlib.sha256(f"{salt}/{f.name}".encode()).digest())
    chosen: list[SourceFile] = []
    size = 0
    for f in ranked:
        if _reached(size, len(chosen), target_bytes, target_count):
            break
        chosen.append(f)
        size += f.size
    return sorted(chosen, key=lambda f: f.name)


def _reached(size: int, count: int, target_bytes: int | None, target_count: int | None) -> bool:
    if target_bytes is not None and size >= target_bytes:
        return True
    return target_count is not None and count >= target_count


@dataclass(frozen=True)
class Composition:
    files: int
    bytes: int
    elf_bytes: int
    text_bytes: int
    other_bytes: int

    def describe(self) -> str:
        def pct(n: int) -> str:
            return f"{100 * n / max(self.bytes, 1):.0f}%"

        return (
            f"{self.files} files, {self.bytes / MB:.1f} MB: ELF {pct(self.elf_bytes)}, "
            f"text-like {pct(self.text_bytes)}, other binary {pct(self.other_bytes)}"
        )


def composition(files: Sequence[SourceFile]) -> Composition:
    """How much of the input is ELF, text-like (no NUL in the first 8 KiB), other binary."""
    elf = text = other = 0
    for f in files:
        try:
            with f.path.open("rb") as handle:
                head = handle.read(8192)
        except OSError:
            head = b""
        if head.startswith(b"\x7fELF"):
            elf += f.size
        elif b"\0" not in head:
            text += f.size
        else:
            other += f.size
    return Composition(len(files), sum(f.size for f in files), elf, text, other)


def file_entries(files: Sequence[SourceFile]) -> list[Entry]:
    """Layer entries for ``files``, each read from disk only while its tar is written."""
    return [file_read_when_written(f.name, f.path.read_bytes, f.mode) for f in files]
