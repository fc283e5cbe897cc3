"""Access profiles: the reads of one workload start, in the order they first happened.

A profile is recorded by ``lazyfs mount --record-profile`` and used by ``lazyfs convert
--prefetch`` (which writes each chunk's rank into the TOC: formats/chunked/ranks.py) and by
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
from dataclasses import dataclass
from pathlib import Path

from lazyfs.errors import ProfileError

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
    return ProfileRead(normalize_path(raw[0]), raw[1], raw[2])


def normalize_path(path: str) -> str:
    """A path in the merged tree, as profiles spell it: absolute, normalised."""
    return posixpath.normpath("/" + path.lstrip("/"))
