"""Build OCI images into local layouts from descriptions of their layers.

The one image builder of lazyfs: the demo's sample image, the benchmarks' images and the tests'
images are all written here. A layer is either a list of :class:`Entry` (regular files,
directories, symlinks, hard links, devices, fifos, whiteouts; with modes, owners, mtimes and
xattrs) or a tar file already on disk. Layers are compressed (none, gzip or zstd) as they are
streamed into the layout, hashed on the way (blob digest and diff_id); then
:meth:`OciLayout.add_image` writes the config and manifest and tags the image.

Everything is reproducible: tars are PAX with fixed mtimes, empty user and group names and
entries sorted by path (hard links after the files they name); gzip headers carry no name or
time; the config has a fixed creation time. The same description always gives the same digests.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import BinaryIO, Final, Literal, Protocol, cast

import zstandard

from lazyfs.convert.layout import OciLayout
from lazyfs.model.digest import Digest
from lazyfs.model.manifests import (
    OCI_LAYER_TAR,
    OCI_LAYER_TAR_GZIP,
    OCI_LAYER_TAR_ZSTD,
    OCI_MANIFEST,
    Descriptor,
    ImageConfig,
    LayerCompression,
    Manifest,
)
from lazyfs.model.platform import Platform

FIXED_MTIME: Final = 1_700_000_000  # 2023-11-14T22:13:20Z; any fixed instant keeps tars stable
FIXED_CREATED: Final = "2023-11-14T22:13:20Z"  # FIXED_MTIME, as the config's timestamps
WHITEOUT_PREFIX: Final = ".wh."
OPAQUE_MARKER: Final = ".wh..wh..opq"
_COPY_BYTES: Final = 1 << 20

EntryType = Literal["dir", "file", "symlink", "hardlink", "char", "block", "fifo"]

_TAR_TYPES: Final[Mapping[EntryType, bytes]] = MappingProxyType(
    {
        "dir": tarfile.DIRTYPE,
        "file": tarfile.REGTYPE,
        "symlink": tarfile.SYMTYPE,
        "hardlink": tarfile.LNKTYPE,
        "char": tarfile.CHRTYPE,
        "block": tarfile.BLKTYPE,
        "fifo": tarfile.FIFOTYPE,
    }
)
_LAYER_MEDIA_TYPES: Final[Mapping[LayerCompression, str]] = MappingProxyType(
    {"none": OCI_LAYER_TAR, "gzip": OCI_LAYER_TAR_GZIP, "zstd": OCI_LAYER_TAR_ZSTD}
)
_DEFAULT_LEVELS: Final[Mapping[LayerCompression, int]] = MappingProxyType(
    {"none": 0, "gzip": 6, "zstd": 3}
)
_NO_XATTRS: Final[Mapping[str, bytes]] = MappingProxyType({})


# --- entries -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One tar member: ``link`` is a symlink's target or the path a hardlink names.

    A regular file's bytes are ``data``, or what ``read()`` returns when the tar is written (so
    a layer of big inputs is never all in memory; ``read`` takes no part in equality).
    """

    path: str
    type: EntryType
    mode: int
    uid: int = 0
    gid: int = 0
    data: bytes = b""
    link: str = ""
    xattrs: Mapping[str, bytes] = field(default_factory=dict)
    device: tuple[int, int] = (0, 0)
    mtime: int = FIXED_MTIME
    read: Callable[[], bytes] | None = field(default=None, compare=False, repr=False)

    @property
    def is_whiteout(self) -> bool:
        return self.path.rsplit("/", 1)[-1].startswith(WHITEOUT_PREFIX)

    def loaded(self) -> Entry:
        """This entry with its bytes in ``data``."""
        return self if self.read is None else replace(self, data=self.read(), read=None)


def directory(
    path: str,
    mode: int = 0o755,
    *,
    uid: int = 0,
    gid: int = 0,
    xattrs: Mapping[str, bytes] = _NO_XATTRS,
) -> Entry:
    return Entry(path, "dir", mode, uid, gid, xattrs=xattrs)


def regular_file(
    path: str,
    data: bytes = b"",
    mode: int = 0o644,
    *,
    uid: int = 0,
    gid: int = 0,
    xattrs: Mapping[str, bytes] = _NO_XATTRS,
) -> Entry:
    return Entry(path, "file", mode, uid, gid, data=data, xattrs=xattrs)


def file_read_when_written(path: str, read: Callable[[], bytes], mode: int = 0o644) -> Entry:
    """A regular file whose bytes ``read()`` returns, called only while its tar is written."""
    return Entry(path, "file", mode, read=read)


def symlink(path: str, target: str, *, uid: int = 0, gid: int = 0) -> Entry:
    return Entry(path, "symlink", 0o777, uid, gid, link=target)


def hardlink(path: str, target: str) -> Entry:
    """A second name for the file ``target``, which must come from the same layer."""
    return Entry(path, "hardlink", 0o644, link=target)


def char_device(path: str, major: int, minor: int, mode: int = 0o666) -> Entry:
    return Entry(path, "char", mode, device=(major, minor))


def block_device(path: str, major: int, minor: int, mode: int = 0o660) -> Entry:
    return Entry(path, "block", mode, device=(major, minor))


def fifo(path: str, mode: int = 0o644) -> Entry:
    return Entry(path, "fifo", mode)


def whiteout(path: str) -> Entry:
    """Deletes ``path`` (file or whole directory) of the layers below."""
    parent, _, name = path.rpartition("/")
    return regular_file(_join(parent, WHITEOUT_PREFIX + name))


def opaque_whiteout(dir_path: str) -> Entry:
    """Hides everything the layers below put in ``dir_path``."""
    return regular_file(_join(dir_path, OPAQUE_MARKER))


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def with_parent_dirs(entries: Iterable[Entry], mode: int = 0o755) -> list[Entry]:
    """``entries`` plus a directory entry for every parent that has none."""
    entries = list(entries)
    present = {e.path for e in entries}
    parents = {p for e in entries for p in _ancestors(e.path)} - present
    return [*(directory(p, mode) for p in sorted(parents)), *entries]


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


# --- layer tars --------------------------------------------------------------------------------


def tar_order(entries: Iterable[Entry]) -> list[Entry]:
    """Sorted by path (parents first), hardlinks last so their targets precede them."""
    ordered = sorted(entries, key=lambda e: e.path)
    return [e for e in ordered if e.type != "hardlink"] + [
        e for e in ordered if e.type == "hardlink"
    ]


def _pax_xattrs(xattrs: Mapping[str, bytes]) -> dict[str, str]:
    # tarfile takes str values; surrogateescape carries arbitrary bytes (it then writes
    # hdrcharset=BINARY and the raw bytes, which is what Go's archive/tar reads).
    return {
        f"SCHILY.xattr.{name}": value.decode("utf-8", "surrogateescape")
        for name, value in sorted(xattrs.items())
    }


def tar_member(entry: Entry) -> tarfile.TarInfo:
    """The tar header of ``entry`` (a file's size from ``data``: see :meth:`Entry.loaded`)."""
    info = tarfile.TarInfo(entry.path)
    info.type = _TAR_TYPES[entry.type]
    info.mode = entry.mode
    info.uid, info.gid = entry.uid, entry.gid
    info.uname = info.gname = ""
    info.mtime = entry.mtime
    info.size = len(entry.data) if entry.type == "file" else 0
    info.linkname = entry.link
    info.devmajor, info.devminor = entry.device
    info.pax_headers = _pax_xattrs(entry.xattrs)
    return info


def write_layer_tar(entries: Iterable[Entry], out: BinaryIO) -> None:
    """Write the layer tar of ``entries`` (in :func:`tar_order`) to a stream."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for entry in tar_order(entries):
            if entry.type == "file":
                loaded = entry.loaded()
                tar.addfile(tar_member(loaded), io.BytesIO(loaded.data))
            else:
                tar.addfile(tar_member(entry))


def layer_tar_bytes(entries: Iterable[Entry]) -> bytes:
    buffer = io.BytesIO()
    write_layer_tar(entries, buffer)
    return buffer.getvalue()


def write_tar_file(entries: Iterable[Entry], path: Path) -> int:
    """Write the layer tar of ``entries`` to ``path``; its size in bytes."""
    with path.open("wb") as out:
        write_layer_tar(entries, out)
    return path.stat().st_size


# --- compressed blobs --------------------------------------------------------------------------


class _Writable(Protocol):
    def write(self, data: bytes | bytearray | memoryview, /) -> object: ...


class _HashingSink(io.RawIOBase):
    """A write-only stream that hashes and counts what passes through to ``target``."""

    def __init__(self, target: _Writable) -> None:
        self._target = target
        self._hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        self._hash.update(data)
        self.size += len(data)
        self._target.write(data)
        return len(data)

    @property
    def digest(self) -> Digest:
        return Digest("sha256", self._hash.hexdigest())


class _Uncloseable(io.RawIOBase):
    """Passes writes through; closing it leaves the target open."""

    def __init__(self, target: io.RawIOBase) -> None:
        self._target = target

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        self._target.write(data)
        return len(data)


def _compressing_writer(sink: _HashingSink, compression: LayerCompression, level: int) -> BinaryIO:
    """A stream that compresses into ``sink``; closing it finishes the stream, not ``sink``."""
    if compression == "gzip":
        # filename="" and mtime=0 keep the gzip header free of anything that varies.
        return cast(
            BinaryIO,
            gzip.GzipFile(filename="", mode="wb", fileobj=sink, mtime=0, compresslevel=level),
        )
    if compression == "zstd":
        compressor = zstandard.ZstdCompressor(level=level)
        return cast(BinaryIO, compressor.stream_writer(cast(BinaryIO, sink), closefd=False))
    return cast(BinaryIO, _Uncloseable(sink))


# --- layers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltLayer:
    """A layer blob in a layout; ``entries`` is empty for a layer made from a tar file."""

    entries: tuple[Entry, ...]
    compression: LayerCompression
    descriptor: Descriptor
    diff_id: Digest
    tar_size: int


def write_layer(
    layout: OciLayout,
    entries: Sequence[Entry],
    compression: LayerCompression = "gzip",
    level: int | None = None,
) -> BuiltLayer:
    """Write the layer of ``entries`` into ``layout`` as one blob."""
    return _write_layer_blob(
        layout, compression, level, lambda out: write_layer_tar(entries, out), tuple(entries)
    )


def write_tar_layer(
    layout: OciLayout,
    tar_path: Path,
    compression: LayerCompression = "gzip",
    level: int | None = None,
) -> BuiltLayer:
    """Compress the tar file ``tar_path`` (left in place) into ``layout`` as a layer blob."""

    def copy_tar(out: BinaryIO) -> None:
        with tar_path.open("rb") as source:
            shutil.copyfileobj(source, out, _COPY_BYTES)

    return _write_layer_blob(layout, compression, level, copy_tar, ())


def _write_layer_blob(
    layout: OciLayout,
    compression: LayerCompression,
    level: int | None,
    write_tar: Callable[[BinaryIO], None],
    entries: tuple[Entry, ...],
) -> BuiltLayer:
    """Stream the tar ``write_tar`` writes through the compressor into a new blob of
    ``layout``, hashing the tar (diff_id) and the blob (digest) on the way."""
    level = _DEFAULT_LEVELS[compression] if level is None else level
    with tempfile.NamedTemporaryFile(dir=layout.path, prefix=".layer-", delete=False) as temp:
        temp_path = Path(temp.name)
        try:
            blob_sink = _HashingSink(temp)
            with _compressing_writer(blob_sink, compression, level) as compressed:
                tar_sink = _HashingSink(compressed)
                write_tar(cast(BinaryIO, tar_sink))
        except BaseException:
            temp_path.unlink(missing_ok=True)
            raise
    layout.add_blob_file(temp_path, blob_sink.digest)
    descriptor = Descriptor(_LAYER_MEDIA_TYPES[compression], blob_sink.digest, blob_sink.size)
    return BuiltLayer(entries, compression, descriptor, tar_sink.digest, tar_sink.size)


# --- images ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContainerConfig:
    """What a runtime starts the image with: the ``config`` object of the image config."""

    command: tuple[str, ...] = ("/bin/sh",)
    env: tuple[str, ...] = ("PATH=/usr/bin:/bin",)
    working_dir: str = "/"


DEFAULT_CONTAINER: Final = ContainerConfig()


@dataclass(frozen=True)
class BuiltImage:
    layout: OciLayout
    tag: str
    manifest_descriptor: Descriptor
    manifest: Manifest
    config: ImageConfig
    layers: tuple[BuiltLayer, ...]

    @property
    def reference(self) -> str:
        """``oci:PATH:TAG``, as skopeo and lazyfs name it."""
        return f"oci:{self.layout.path}:{self.tag}"


def image_config(
    diff_ids: Sequence[Digest],
    platform: Platform,
    container: ContainerConfig = DEFAULT_CONTAINER,
) -> ImageConfig:
    """A reproducible image config for ``platform``, one history entry per layer."""
    fields: dict[str, object] = {
        "created": FIXED_CREATED,
        "architecture": platform.architecture,
        "os": platform.os,
    }
    if platform.variant is not None:
        fields["variant"] = platform.variant
    fields["config"] = {
        "Env": list(container.env),
        "Cmd": list(container.command),
        "WorkingDir": container.working_dir,
    }
    fields["rootfs"] = {"type": "layers", "diff_ids": []}
    fields["history"] = [{"created": FIXED_CREATED, "created_by": "imagebuild"} for _ in diff_ids]
    return ImageConfig(fields).with_diff_ids(diff_ids)


def tag_image(
    layout: OciLayout,
    tag: str,
    layers: Sequence[BuiltLayer],
    *,
    platform: Platform | None = None,
    container: ContainerConfig = DEFAULT_CONTAINER,
) -> BuiltImage:
    """Write the config and manifest of an image of ``layers`` (bottom first); tag it."""
    diff_ids = [layer.diff_id for layer in layers]
    config = image_config(diff_ids, platform or Platform.host(), container)
    descriptors = [layer.descriptor for layer in layers]
    manifest_bytes = layout.read_blob(layout.add_image(config.to_bytes(), descriptors, tag))
    return BuiltImage(
        layout,
        tag,
        Descriptor.of_bytes(OCI_MANIFEST, manifest_bytes),
        Manifest.parse(manifest_bytes, OCI_MANIFEST),
        config,
        tuple(layers),
    )


def write_image(
    layout_dir: Path,
    tag: str,
    layers: Sequence[Sequence[Entry]],
    compression: LayerCompression | Sequence[LayerCompression] = "gzip",
    *,
    platform: Platform | None = None,
    container: ContainerConfig = DEFAULT_CONTAINER,
) -> BuiltImage:
    """An image of ``layers`` (bottom first) in the layout at ``layout_dir`` (created if need
    be), tagged ``tag``. ``compression`` is one method for all layers or one per layer."""
    layout = OciLayout.create(layout_dir)
    methods = _per_layer(compression, len(layers))
    built = [
        write_layer(layout, entries, method)
        for entries, method in zip(layers, methods, strict=True)
    ]
    return tag_image(layout, tag, built, platform=platform, container=container)


def write_tar_image(
    layout_dir: Path,
    tag: str,
    tars: Sequence[Path],
    compression: LayerCompression = "gzip",
    *,
    platform: Platform | None = None,
    container: ContainerConfig = DEFAULT_CONTAINER,
) -> BuiltImage:
    """An image whose layers (bottom first) are the tar files ``tars``, compressed here."""
    layout = OciLayout.create(layout_dir)
    built = [write_tar_layer(layout, tar, compression) for tar in tars]
    return tag_image(layout, tag, built, platform=platform, container=container)


def _per_layer(
    compression: LayerCompression | Sequence[LayerCompression], count: int
) -> list[LayerCompression]:
    if isinstance(compression, str):
        return [compression] * count
    if len(compression) != count:
        raise ValueError(f"{len(compression)} compressions for {count} layers")
    return list(compression)
