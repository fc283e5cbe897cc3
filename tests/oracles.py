"""Independent tools and tree snapshots that tests compare lazyfs against.

``skopeo`` and ``umoci`` are the oracles for images; :func:`tree_snapshot` turns an unpacked
root filesystem into plain data so two trees (umoci's unpack, a lazyfs mount ...) can be
compared with :func:`assert_trees_equal`. A missing tool skips the test, except under
``CI=true`` where it fails: CI must not pass by testing nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import pytest

from lazyfs.convert.layout import OciLayout
from lazyfs.model.manifests import Manifest, layer_compression, parse_manifest_or_index

ROOT_KEY = "."
_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
_HASH_BUFFER_BYTES = 1 << 20

EntryKind = Literal["dir", "file", "symlink", "char", "block", "fifo", "socket"]


def require_tool(name: str) -> str:
    """The path of the executable ``name``; skip the test without it (fail under CI=true)."""
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not installed"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}, and CI must run every oracle test")
    pytest.skip(message)


def run_tool(args: Sequence[str | os.PathLike[str]]) -> str:
    """Run a command; its stdout, or AssertionError carrying its stderr."""
    argv = [os.fspath(a) for a in args]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited with {result.returncode}:\n{result.stderr.strip()}"
        )
    return result.stdout


# --- skopeo and umoci --------------------------------------------------------------------------


def _is_loopback_registry(location: str) -> bool:
    if not location.startswith("docker://"):
        return False
    host = urlsplit("//" + location.removeprefix("docker://")).hostname
    return host in _LOOPBACK_HOSTS


def skopeo_copy(src: str, dst: str, *args: str) -> None:
    """``skopeo copy [args] SRC DST``; loopback registries are spoken to without TLS."""
    skopeo = require_tool("skopeo")
    flags = ["--quiet"]
    if _is_loopback_registry(src):
        flags.append("--src-tls-verify=false")
    if _is_loopback_registry(dst):
        flags.append("--dest-tls-verify=false")
    run_tool([skopeo, "copy", *flags, *args, src, dst])


def skopeo_inspect(location: str, *args: str) -> str:
    """``skopeo inspect [args] LOCATION``: its JSON output as text."""
    skopeo = require_tool("skopeo")
    flags = ["--tls-verify=false"] if _is_loopback_registry(location) else []
    return run_tool([skopeo, "inspect", *flags, *args, location])


def umoci_unpack(layout: Path, tag: str, dest: Path) -> Path:
    """Unpack ``layout:tag`` into the new bundle directory ``dest``; the rootfs path.

    Must run as root so that owners, devices and ``security.*`` xattrs are restored. umoci 0.4.7
    refuses ``tar+zstd`` layers, so such images are first recompressed to gzip by skopeo (zstd
    and zstd:chunked layers decompress to the same tar, so the tree is the same).
    """
    umoci = require_tool("umoci")
    if os.geteuid() != 0:
        pytest.skip("umoci unpack needs root to restore owners, devices and xattrs")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".gzip-layout-") as scratch:
        source = layout
        if _has_zstd_layers(layout, tag):
            source = Path(scratch, "layout")
            skopeo_copy(f"oci:{layout}:{tag}", f"oci:{source}:{tag}", "--dest-compress-format=gzip")
        run_tool([umoci, "unpack", "--image", f"{source}:{tag}", dest])
    return dest / "rootfs"


def _has_zstd_layers(layout: Path, tag: str) -> bool:
    oci = OciLayout(layout)
    descriptor = oci.resolve(tag)
    document = parse_manifest_or_index(oci.read_blob(descriptor.digest), descriptor.media_type)
    return isinstance(document, Manifest) and any(
        layer_compression(layer.media_type) == "zstd" for layer in document.layers
    )


# --- tree snapshots ----------------------------------------------------------------------------


@dataclass(frozen=True)
class EntryInfo:
    """What a tree comparison looks at for one path (mtimes and inode numbers are left out).

    ``hardlink_group`` is the smallest path among the paths of the tree sharing this inode, or
    None for an inode seen once, so that equal trees have equal groups.
    """

    kind: EntryKind
    mode: int  # permission bits including setuid, setgid and sticky
    uid: int
    gid: int
    size: int | None = None  # regular files only
    sha256: str | None = None  # regular files only
    target: str | None = None  # symlinks only
    xattrs: tuple[tuple[str, bytes], ...] = ()
    device: tuple[int, int] | None = None  # (major, minor) of char and block devices
    hardlink_group: str | None = None

    def describe(self) -> str:
        """One line: kind, mode, owner, then the optional fields that are set."""
        parts = [self.kind, f"mode={self.mode:04o}", f"owner={self.uid}:{self.gid}"]
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name not in _ALWAYS_SHOWN and value not in (None, ()):
                parts.append(f"{f.name}={value!r}")
        return " ".join(parts)


_ALWAYS_SHOWN = frozenset({"kind", "mode", "uid", "gid"})


def _kind_of(mode: int, path: Path) -> EntryKind:
    kinds: list[tuple[bool, EntryKind]] = [
        (stat.S_ISDIR(mode), "dir"),
        (stat.S_ISREG(mode), "file"),
        (stat.S_ISLNK(mode), "symlink"),
        (stat.S_ISCHR(mode), "char"),
        (stat.S_ISBLK(mode), "block"),
        (stat.S_ISFIFO(mode), "fifo"),
        (stat.S_ISSOCK(mode), "socket"),
    ]
    for matches, kind in kinds:
        if matches:
            return kind
    raise AssertionError(f"{path}: unknown file type {mode:o}")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(_HASH_BUFFER_BYTES):
            digest.update(block)
    return digest.hexdigest()


def read_xattrs(path: Path) -> tuple[tuple[str, bytes], ...]:
    """All extended attributes of ``path`` itself (not a symlink's target), sorted by name."""
    names = os.listxattr(path, follow_symlinks=False)
    return tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in names))


def _entry_info(path: Path, st: os.stat_result) -> EntryInfo:
    kind = _kind_of(st.st_mode, path)
    is_device = kind in ("char", "block")
    return EntryInfo(
        kind=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=st.st_size if kind == "file" else None,
        sha256=_file_sha256(path) if kind == "file" else None,
        target=os.readlink(path) if kind == "symlink" else None,
        xattrs=read_xattrs(path),
        device=(os.major(st.st_rdev), os.minor(st.st_rdev)) if is_device else None,
    )


def _walk(root: Path) -> dict[str, tuple[Path, os.stat_result]]:
    """Every path under ``root`` (and root itself as ``.``) with its lstat, never following
    symlinks and never crossing into another filesystem silently (that is an error)."""
    root_stat = root.lstat()
    found = {ROOT_KEY: (root, root_stat)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=_raise):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath, name)
            st = path.lstat()
            if st.st_dev != root_stat.st_dev:
                raise AssertionError(f"{path} is on another filesystem than {root}")
            found[path.relative_to(root).as_posix()] = (path, st)
    return found


def _raise(error: OSError) -> None:
    raise error


def _hardlink_groups(stats: Mapping[str, os.stat_result]) -> dict[str, str]:
    """path -> smallest path sharing its inode, for non-directory inodes seen more than once."""
    by_inode: defaultdict[int, list[str]] = defaultdict(list)
    for rel, st in stats.items():
        if not stat.S_ISDIR(st.st_mode):
            by_inode[st.st_ino].append(rel)
    return {rel: min(paths) for paths in by_inode.values() if len(paths) > 1 for rel in paths}


def tree_snapshot(root: Path) -> dict[str, EntryInfo]:
    """Every entry under ``root`` by its relative path (``.`` for root), sorted by path."""
    walked = _walk(root)
    groups = _hardlink_groups({rel: st for rel, (_, st) in walked.items()})
    snapshot: dict[str, EntryInfo] = {}
    for rel in sorted(walked):
        path, st = walked[rel]
        info = _entry_info(path, st)
        if rel in groups:
            info = _with_group(info, groups[rel])
        snapshot[rel] = info
    return snapshot


def _with_group(info: EntryInfo, group: str) -> EntryInfo:
    return EntryInfo(**{**info.__dict__, "hardlink_group": group})


# --- comparison --------------------------------------------------------------------------------


def tree_differences(a: Mapping[str, EntryInfo], b: Mapping[str, EntryInfo]) -> list[str]:
    """One readable line per difference between two snapshots, in path order."""
    lines: list[str] = []
    for rel in sorted(a.keys() | b.keys()):
        left, right = a.get(rel), b.get(rel)
        if left is None:
            lines.append(f"only in second: {rel}: {right.describe() if right else ''}")
        elif right is None:
            lines.append(f"only in first:  {rel}: {left.describe()}")
        elif left != right:
            lines.extend(_field_differences(rel, left, right))
    return lines


def _field_differences(rel: str, left: EntryInfo, right: EntryInfo) -> list[str]:
    lines = []
    for f in fields(EntryInfo):
        mine, theirs = getattr(left, f.name), getattr(right, f.name)
        if mine != theirs:
            lines.append(
                f"differs: {rel}: {f.name}: {_show(f.name, mine)} != {_show(f.name, theirs)}"
            )
    return lines


def _show(field_name: str, value: object) -> str:
    return f"{value:04o}" if field_name == "mode" and isinstance(value, int) else repr(value)


def assert_trees_equal(
    a: Mapping[str, EntryInfo], b: Mapping[str, EntryInfo], max_lines: int = 25
) -> None:
    """AssertionError listing the first ``max_lines`` differences if the snapshots differ."""
    lines = tree_differences(a, b)
    if lines:
        shown = "\n  ".join(lines[:max_lines])
        more = f"\n  ... and {len(lines) - max_lines} more" if len(lines) > max_lines else ""
        raise AssertionError(f"trees differ ({len(lines)} differences):\n  {shown}{more}")
