"""Access profiles: the reads of one workload start, in the order they first happened.

A profile is recorded by ``lazyfs mount --record-profile`` and used by ``lazyfs convert
--prefetch`` (which writes each chunk's rank into the TOC, :func:`mark_entries`) and by
``lazyfs mount --prefetch``; lazyfs/mount/prefetch.py says why. It is JSON (docs/format.md)::

    {"version": 1, "image": "sha256:...", "reads": [["/usr/bin/python3.11", 0, 65536], ...]}

each read a path in the merged tree, an offset and a length. Offsets rather than chunk digests
keep a profile valid when an image is converted again with other chunk sizes. A pure leaf, but
for ``load`` and ``save``.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from lazyfs.errors import ProfileError
from lazyfs.formats.chunked.toc import TocEntry, group_file_entries

PROFILE_VERSION = 1


@dataclass(frozen=True)
class ProfileRead:
    """A byte range of a file that the workload read."""

    path: str  # absolute, in the merged tree
    offset: int
    length: int


@dataclass(frozen=True)
class AccessProfile:
    """The reads of one workload start, in the order they first happened."""

    reads: tuple[ProfileRead, ...]
    image: str = ""  # manifest digest of the image it was recorded on (informational)

    def to_json(self) -> bytes:
        reads = [[r.path, r.offset, r.length] for r in self.reads]
        body = {"version": PROFILE_VERSION, "image": self.image, "reads": reads}
        return json.dumps(body, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def parse(cls, data: bytes) -> AccessProfile:
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise ProfileError(f"access profile is not valid JSON: {exc}") from exc
        if not isinstance(obj, dict) or obj.get("version") != PROFILE_VERSION:
            raise ProfileError(f"access profile is not version {PROFILE_VERSION}")
        reads = obj.get("reads")
        image = obj.get("image", "")
        if not isinstance(reads, list) or not isinstance(image, str):
            raise ProfileError("access profile has no reads list")
        return cls(tuple(_parse_read(raw) for raw in reads), image)

    @classmethod
    def load(cls, path: Path) -> AccessProfile:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ProfileError(f"cannot read access profile {path}: {exc.strerror}") from exc
        try:
            return cls.parse(data)
        except ProfileError as exc:
            raise ProfileError(f"{path}: {exc}") from exc

    def save(self, path: Path) -> None:
        """Write atomically: a reader sees the old file or the whole new one."""
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            temporary.write_bytes(self.to_json())
            temporary.replace(path)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            raise ProfileError(f"cannot write access profile {path}: {exc.strerror}") from exc


def _parse_read(raw: object) -> ProfileRead:
    if (
        not isinstance(raw, list)
        or len(raw) != 3
        or not isinstance(raw[0], str)
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in raw[1:])
    ):
        raise ProfileError(f"access profile read {raw!r} is not [path, offset, length]")
    return ProfileRead(_normalize(raw[0]), raw[1], raw[2])


def _normalize(path: str) -> str:
    return posixpath.normpath("/" + path.lstrip("/"))


def mark_entries(entries: Sequence[TocEntry], profile: AccessProfile) -> tuple[TocEntry, ...]:
    """The entries of one layer, with ``prefetch`` ranks on the chunks the profile read.

    A chunk's rank is 1 + the index of the first read that overlaps it. Reads of a hardlink's
    other names count for the file it names."""
    wanted = _reads_by_path(profile)
    aliases = _hardlink_targets(entries)
    marked: list[TocEntry] = []
    for group in group_file_entries(tuple(entries)):
        path = _normalize(group[0].name)
        reads = wanted.get(path, []) + [r for a in aliases.get(path, ()) for r in wanted.get(a, [])]
        if group[0].type != "reg" or not reads:
            marked.extend(group)
            continue
        marked.extend(_mark_file(group, reads))
    return tuple(marked)


def _reads_by_path(profile: AccessProfile) -> dict[str, list[tuple[int, int, int]]]:
    """path -> [(start, end, rank)]"""
    by_path: dict[str, list[tuple[int, int, int]]] = {}
    for rank, read in enumerate(profile.reads, start=1):
        end = read.offset + max(read.length, 1)  # an empty read still names its chunk
        by_path.setdefault(read.path, []).append((read.offset, end, rank))
    return by_path


def _hardlink_targets(entries: Sequence[TocEntry]) -> dict[str, list[str]]:
    """target path -> the other names hardlinks in this layer give it"""
    aliases: dict[str, list[str]] = {}
    for entry in entries:
        if entry.type == "hardlink":
            target = _normalize(entry.link_name)
            aliases.setdefault(target, []).append(_normalize(entry.name))
    return aliases


def _mark_file(group: list[TocEntry], reads: list[tuple[int, int, int]]) -> list[TocEntry]:
    size = group[0].size
    starts = [entry.chunk_offset for entry in group]
    marked = []
    for index, entry in enumerate(group):
        end = starts[index + 1] if index + 1 < len(group) else size
        ranks = [rank for lo, hi, rank in reads if lo < end and hi > starts[index]]
        marked.append(replace(entry, prefetch=min(ranks)) if ranks else entry)
    return marked
