"""The additional layer store: the images podman pulls, one layer directory at a time.

containers/storage (its PR #795, with containers/image PR #1109) asks, for each layer of an
image it pulls, for ``STORE/<base64(image reference)>/<layer digest>/`` and needs there:

- ``diff/``: the layer's own tree. containers/storage stacks the ``diff`` directories itself
  with overlayfs, so whiteouts are in overlayfs form (mount/tree.py ``build_layer_tree``);
- ``info``: JSON of the fields of its ``Layer`` struct it takes from the store
  (``compressed-diff-digest``, ``compressed-size``, ``diff-digest``, ``diff-size``,
  ``compression``, the last in containers/storage's numbering: 0 none, 2 gzip, 4 zstd);
- ``blob``: the layer blob, read whole by ``podman save`` and ``podman push``. It is served
  from a local copy checked against the layer digest (StoreHost.local_blob), never from
  unverified ranges.

It also counts uses, through the file system: creating ``use`` in a layer directory means
"in use" (answered ENOENT: nothing is created), and removing the layer directory means
"released" (answered ENOENT as well, which containers/storage takes as done). When no layer of a
reference is in use any more, its image is released; its chunks stay cached.

A reference directory costs nothing until one of its layers is looked up: that lookup opens
the image (manifest, config, TOCs, verified as for ``lazyfs mount``) through the StoreHost, at
most once at a time per reference. Each layer tree is served through the ImageTable, unlisted,
with the image's resolver, so the cache, singleflight table and statistics are the service's.

Event loop only (docs/concurrency.md). The FUSE operations (fuseops.py) call in here for every
inode of slot 0 above STORE_ROOT_INODE; nothing here raises FUSEError: a missing name is None,
and domain errors propagate to fuseops' one mapping.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import anyio

from lazyfs.errors import CacheError, LazyfsError, NotFoundError, UsageError
from lazyfs.model.digest import Digest
from lazyfs.model.reference import Reference
from lazyfs.mount.image import MountedImage
from lazyfs.mount.images import STORE_ROOT_INODE, ImageTable, ServedImage

log = logging.getLogger(__name__)

USE_FILE = b"use"
_FIRST_INODE = 16  # slot-0 inodes below this are fixed (images.py)
# containers/storage's pkg/archive Compression values.
_COMPRESSION_NUMBER = {"zstd": 4, "gzip": 2}
_UNCOMPRESSED_SIZE_ANNOTATIONS = ("io.containers.estargz.uncompressed-size",)


class StoreHost(Protocol):
    """What the store needs of the service that owns it."""

    async def open_store_image(self, reference: Reference) -> MountedImage:
        """Open ``reference`` with per-layer trees (raises LazyfsError)."""
        ...

    def release_store_image(self, image: MountedImage) -> None: ...

    async def local_blob(self, image: MountedImage, index: int) -> Path:
        """A verified local copy of the image's layer ``index`` as the registry has it."""
        ...

    def uses_changed(self) -> None:
        """The use counts changed: persist them (``StoreState.uses``)."""
        ...


@dataclass(eq=False)
class StoreLayer:
    ref: StoreRef
    index: int
    digest: Digest
    size: int
    inode: int
    info_inode: int
    blob_inode: int
    slot: int  # the ImageTable slot of its diff tree
    info: bytes

    @property
    def name(self) -> bytes:
        return str(self.digest).encode()


@dataclass(eq=False)
class StoreRef:
    inode: int
    name: bytes  # base64 of the reference, as looked up
    reference: Reference
    image: MountedImage | None = None
    layers: dict[bytes, StoreLayer] = field(default_factory=dict)
    opening: anyio.Event | None = None


@dataclass(frozen=True)
class StoreEntry:
    """A node of the store's own levels, as the FUSE operations describe it."""

    inode: int
    kind: Literal["dir", "file"]
    size: int = 0
    subdirs: int = 0  # for st_nlink


@dataclass(frozen=True)
class DiffRoot:
    """The ``diff`` directory of a layer: the root of the tree in ``slot``."""

    slot: int


class LayerStore:
    def __init__(self, table: ImageTable, host: StoreHost, uses: dict[str, int] | None = None):
        self._table = table
        self._host = host
        self._inodes = itertools.count(_FIRST_INODE)
        self._refs: dict[bytes, StoreRef] = {}
        self._nodes: dict[int, StoreRef | StoreLayer | tuple[StoreLayer, str]] = {}
        # Uses by "<base64 ref>/<digest>", kept across restarts by the service (state.py).
        self.uses: dict[str, int] = dict(uses or {})

    # ------------------------------------------------------------------------------ lookups

    def owns(self, inode: int) -> bool:
        return inode == STORE_ROOT_INODE or inode in self._nodes

    def root_entry(self) -> StoreEntry:
        return StoreEntry(STORE_ROOT_INODE, "dir", subdirs=len(self._refs))

    def entry(self, inode: int) -> StoreEntry | None:
        if inode == STORE_ROOT_INODE:
            return self.root_entry()
        node = self._nodes.get(inode)
        if isinstance(node, StoreRef):
            return StoreEntry(node.inode, "dir", subdirs=len(node.layers))
        if isinstance(node, StoreLayer):
            return StoreEntry(node.inode, "dir", subdirs=1)
        if isinstance(node, tuple):
            layer, what = node
            if what == "info":
                return StoreEntry(layer.info_inode, "file", len(layer.info))
            return StoreEntry(layer.blob_inode, "file", layer.size)
        return None

    async def lookup(self, parent: int, name: bytes) -> StoreEntry | DiffRoot | None:
        if parent == STORE_ROOT_INODE:
            ref = self._ref(name)
            return None if ref is None else self.entry(ref.inode)
        node = self._nodes.get(parent)
        if isinstance(node, StoreRef):
            layer = await self._layer(node, name)
            return None if layer is None else self.entry(layer.inode)
        if isinstance(node, StoreLayer):
            return self._layer_child(node, name)
        return None

    def _layer_child(self, layer: StoreLayer, name: bytes) -> StoreEntry | DiffRoot | None:
        if name == b"diff":
            return DiffRoot(layer.slot)
        if name == b"info":
            return self.entry(layer.info_inode)
        if name == b"blob":
            return self.entry(layer.blob_inode)
        return None  # "use" included: it never exists

    def listing(self, inode: int) -> list[tuple[bytes, StoreEntry | DiffRoot]]:
        """A directory's entries, sorted (for ``ls``; podman never lists)."""
        if inode == STORE_ROOT_INODE:
            return [(ref.name, self.root_ref_entry(ref)) for _, ref in sorted(self._refs.items())]
        node = self._nodes.get(inode)
        if isinstance(node, StoreRef):
            return [(name, self._dir(layer.inode)) for name, layer in sorted(node.layers.items())]
        if isinstance(node, StoreLayer):
            return [
                (b"blob", self._dir(node.blob_inode)),
                (b"diff", DiffRoot(node.slot)),
                (b"info", self._dir(node.info_inode)),
            ]
        return []

    def root_ref_entry(self, ref: StoreRef) -> StoreEntry:
        return StoreEntry(ref.inode, "dir", subdirs=len(ref.layers))

    def _dir(self, inode: int) -> StoreEntry:
        entry = self.entry(inode)
        assert entry is not None
        return entry

    def is_dir(self, inode: int) -> bool:
        entry = self.entry(inode)
        return entry is not None and entry.kind == "dir"

    # ------------------------------------------------------------------------------ content

    async def read(self, inode: int, offset: int, size: int) -> bytes | None:
        """The bytes of ``info`` or ``blob``; None if ``inode`` is neither."""
        node = self._nodes.get(inode)
        if not isinstance(node, tuple):
            return None
        layer, what = node
        if what == "info":
            return layer.info[offset : offset + size]
        image = layer.ref.image
        if image is None:  # released meanwhile
            return None
        path = await self._host.local_blob(image, layer.index)
        return await anyio.to_thread.run_sync(_pread, path, offset, size)

    # ---------------------------------------------------------------------------- use counts

    def use(self, parent: int, name: bytes) -> bool:
        """``create(parent, name)``: True if it was a use mark (counted)."""
        layer = self._nodes.get(parent)
        if name != USE_FILE or not isinstance(layer, StoreLayer):
            return False
        key = _use_key(layer)
        self.uses[key] = self.uses.get(key, 0) + 1
        log.info("layer %s of %s: in use (%d)", layer.digest, layer.ref.reference, self.uses[key])
        self._host.uses_changed()
        return True

    def release(self, parent: int, name: bytes) -> bool:
        """``rmdir(parent, name)``: True if it released a layer of a reference."""
        ref = self._nodes.get(parent)
        if not isinstance(ref, StoreRef):
            return False
        key = f"{ref.name.decode()}/{name.decode(errors='replace')}"
        left = max(self.uses.get(key, 0) - 1, 0)
        if left:
            self.uses[key] = left
        else:
            self.uses.pop(key, None)
        log.info("layer %s of %s: released (%d left)", name.decode(errors="replace"),
                 ref.reference, left)  # fmt: skip
        self._host.uses_changed()
        in_use = any(_use_key(layer) in self.uses for layer in ref.layers.values())
        if ref.image is not None and not in_use:
            self._close(ref)
        return True

    def close_all(self) -> None:
        for ref in list(self._refs.values()):
            self._close(ref)

    def images(self) -> Iterator[MountedImage]:
        for ref in self._refs.values():
            if ref.image is not None:
                yield ref.image

    # ------------------------------------------------------------------------------ opening

    def _ref(self, name: bytes) -> StoreRef | None:
        ref = self._refs.get(name)
        if ref is not None:
            return ref
        reference = parse_store_reference(name)
        if reference is None:
            return None
        ref = StoreRef(next(self._inodes), name, reference)
        self._refs[name] = ref
        self._nodes[ref.inode] = ref
        return ref

    async def _layer(self, ref: StoreRef, name: bytes) -> StoreLayer | None:
        if ref.image is None:
            try:
                await self._open(ref)
            except NotFoundError as exc:  # no such image: no such layer (podman pulls itself)
                log.info("layer store: %s", exc)
                return None
        return ref.layers.get(name)

    async def _open(self, ref: StoreRef) -> None:
        """Open the reference's image, once: concurrent lookups wait for the first."""
        if ref.opening is not None:
            await ref.opening.wait()
            if ref.image is None:
                raise LazyfsError(f"{ref.reference}: opening the image failed")
            return
        ref.opening = anyio.Event()
        try:
            image = await self._host.open_store_image(ref.reference)
            self._serve(ref, image)
        finally:
            ref.opening.set()
            ref.opening = None

    def _serve(self, ref: StoreRef, image: MountedImage) -> None:
        opened = image.opened
        for index, descriptor in enumerate(opened.manifest.layers):
            name = str(descriptor.digest).encode()
            if name in ref.layers:  # the same blob twice in one image: the first serves both
                continue
            served = ServedImage(
                f"{image.name}/{index}", opened.layer_trees[index], image.resolver, image.stats
            )
            layer = StoreLayer(
                ref,
                index,
                descriptor.digest,
                descriptor.size,
                self._known_inode(ref, name),
                next(self._inodes),
                next(self._inodes),
                self._table.add(served, listed=False),
                layer_info(image, index),
            )
            ref.layers[name] = layer
            self._nodes[layer.inode] = layer
            self._nodes[layer.info_inode] = (layer, "info")
            self._nodes[layer.blob_inode] = (layer, "blob")
        ref.image = image
        log.info("layer store: serving %s (%d layers)", ref.reference, len(ref.layers))

    def _known_inode(self, ref: StoreRef, name: bytes) -> int:
        old = ref.layers.get(name)
        return old.inode if old is not None else next(self._inodes)

    def _close(self, ref: StoreRef) -> None:
        """Forget the image of ``ref``; lookups reopen it."""
        image, ref.image = ref.image, None
        for layer in ref.layers.values():
            self._table.remove_slot(layer.slot)
            for inode in (layer.inode, layer.info_inode, layer.blob_inode):
                self._nodes.pop(inode, None)
        ref.layers.clear()
        if image is not None:
            log.info("layer store: released %s", ref.reference)
            self._host.release_store_image(image)


def parse_store_reference(name: bytes) -> Reference | None:
    """The image reference a store directory names (base64, as containers/storage writes it),
    or None if it names none."""
    try:
        text = base64.b64decode(name, validate=True).decode()
        for prefix in ("docker://", "//"):
            text = text.removeprefix(prefix)
        return Reference.parse(text)
    except (binascii.Error, UnicodeDecodeError, UsageError, LazyfsError, ValueError):
        return None


def layer_info(image: MountedImage, index: int) -> bytes:
    """The ``info`` file: what containers/storage takes from the store for the layer."""
    opened = image.opened
    descriptor = opened.manifest.layers[index]
    info: dict[str, object] = {
        "compressed-diff-digest": str(descriptor.digest),
        "compressed-size": descriptor.size,
        "diff-digest": str(opened.diff_ids[index]),
        "compression": _COMPRESSION_NUMBER.get(_compression(descriptor.media_type), 0),
    }
    for key in _UNCOMPRESSED_SIZE_ANNOTATIONS:
        size = descriptor.annotations.get(key, "")
        if size.isdigit():
            info["diff-size"] = int(size)
    return json.dumps(info, sort_keys=True).encode() + b"\n"


def _compression(media_type: str) -> str:
    if "zstd" in media_type:
        return "zstd"
    if "gzip" in media_type:
        return "gzip"
    return "none"


def _use_key(layer: StoreLayer) -> str:
    return f"{layer.ref.name.decode()}/{layer.digest}"


def _pread(path: Path, offset: int, size: int) -> bytes:
    """Worker thread: the blob is a local file under the cache directory, never our mount."""
    try:
        with path.open("rb") as file:
            return os.pread(file.fileno(), size, offset)
    except OSError as exc:
        raise CacheError(f"cannot read the local blob {path}: {exc.strerror}") from exc
