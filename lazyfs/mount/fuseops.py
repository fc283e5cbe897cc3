"""The pyfuse3 front end: read-only views of the served images, content from their resolvers.

This is the only module that raises ``pyfuse3.FUSEError``. Handlers are thin; domain errors are
mapped to an errno in one place (``_errno_for``), and nothing else escapes a handler: an
unexpected exception is logged with its traceback, counted (``internal_errors``) and answered
with EIO, and the session goes on serving every other request. Metadata comes from the
in-memory trees, so stat, lookup and readdir never touch the network. Every request runs as a
trio task on the event loop (docs/concurrency.md); nothing here blocks.

The root directory lists the images of the table (mount/images.py); each image's tree hangs
below its directory, which ``lazyfs mount`` bind-mounts where the user asked. With a layer
store (mount/layerstore.py), the root also holds its directory, and the inodes of its own
levels (slot 0) are answered from it; its ``diff`` trees are unlisted images of the table.
Only the store takes ``create`` (of ``use``) and ``rmdir`` (of a layer), its use counts.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import stat
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3

from lazyfs.config import STATS_XATTR
from lazyfs.errors import LazyfsError
from lazyfs.mount.images import (
    SERVICE_ROOT_INODE,
    SLOT_SHIFT,
    STORE_DIR_NAME,
    ImageTable,
    ServedImage,
    global_inode,
)
from lazyfs.mount.layerstore import DiffRoot, LayerStore, StoreEntry
from lazyfs.mount.tree import ROOT_INODE, Node

log = logging.getLogger(__name__)

# Metadata never changes under an image: let the kernel cache it for a day.
ATTR_TIMEOUT_S = 86400.0
# The root's listing changes as images come and go; the service invalidates released names.
ROOT_ENTRY_TIMEOUT_S = 1.0
# A name missing from an image's tree stays missing: st_ino 0 lets the kernel cache the miss.
_NEGATIVE_ENTRY = pyfuse3.EntryAttributes()
_NEGATIVE_ENTRY.st_ino = 0
_NEGATIVE_ENTRY.entry_timeout = ATTR_TIMEOUT_S
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

P = ParamSpec("P")
R = TypeVar("R")


def _errno_for(exc: LazyfsError) -> int:
    """The one place where domain errors become errnos.

    A read that cannot produce verified bytes fails with EIO whatever the cause (bad digest,
    registry down, deadline passed, cache failure); the log names the cause.
    """
    return errno.EIO


def _contained(
    handler: Callable[Concatenate[LazyOperations, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[LazyOperations, P], Coroutine[Any, Any, R]]:
    async def wrapper(self: LazyOperations, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await handler(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except LazyfsError as exc:
            log.error("%s: %s", handler.__name__, exc)
            raise pyfuse3.FUSEError(_errno_for(exc)) from exc
        except Exception as exc:
            self.internal_errors += 1
            log.exception("%s crashed; answering EIO", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from exc

    wrapper.__name__ = wrapper.__qualname__ = handler.__name__
    wrapper.__doc__ = handler.__doc__
    return wrapper


def _fail(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


class LazyOperations(pyfuse3.Operations):
    """Read-only FUSE operations over the images of an ImageTable."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        table: ImageTable,
        service_stats: Callable[[], dict[str, Any]],
        store: LayerStore | None = None,
    ) -> None:
        super().__init__()
        self._table = table
        self._service_stats = service_stats
        self._store = store
        self._root_listings: dict[int, list[tuple[str, int]]] = {}
        self._store_listings: dict[int, list[tuple[bytes, StoreEntry | DiffRoot]]] = {}
        self._handles = itertools.count(1 << 62)  # apart from inode numbers, used as fh too
        self.internal_errors = 0

    # ------------------------------------------------------------------ inodes and attributes

    def _resolve(self, inode: int) -> tuple[int, ServedImage, Node]:
        found = self._table.resolve(inode)
        if found is None:
            raise _fail(errno.ENOENT)
        return found

    def _attributes(self, slot: int, node: Node) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = global_inode(slot, node)
        attrs.generation = 0
        attrs.entry_timeout = ATTR_TIMEOUT_S
        attrs.attr_timeout = ATTR_TIMEOUT_S
        attrs.st_mode = node.st_mode
        attrs.st_nlink = node.nlink
        attrs.st_uid = node.uid
        attrs.st_gid = node.gid
        attrs.st_rdev = node.rdev
        attrs.st_size = len(node.target) if node.kind == "symlink" else node.size
        attrs.st_blksize = 4096
        attrs.st_blocks = (attrs.st_size + 511) // 512
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = node.mtime_ns
        return attrs

    def _image_root_attributes(self, slot: int, image: ServedImage) -> pyfuse3.EntryAttributes:
        attrs = self._attributes(slot, image.tree.nodes[ROOT_INODE])
        attrs.entry_timeout = ROOT_ENTRY_TIMEOUT_S
        return attrs

    def _store_attributes(self, entry: StoreEntry | DiffRoot) -> pyfuse3.EntryAttributes:
        if isinstance(entry, DiffRoot):
            image = self._table.by_slot(entry.slot)
            if image is None:
                raise _fail(errno.ENOENT)
            return self._image_root_attributes(entry.slot, image)
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = entry.inode
        attrs.entry_timeout = attrs.attr_timeout = ROOT_ENTRY_TIMEOUT_S
        if entry.kind == "dir":
            attrs.st_mode = stat.S_IFDIR | 0o755
            attrs.st_nlink = 2 + entry.subdirs
        else:
            attrs.st_mode = stat.S_IFREG | 0o444
            attrs.st_nlink = 1
            attrs.st_size = entry.size
            attrs.st_blocks = (entry.size + 511) // 512
        attrs.st_blksize = 4096
        return attrs

    def _in_store(self, inode: int) -> bool:
        return self._store is not None and inode >> SLOT_SHIFT == 0 and self._store.owns(inode)

    def _service_root_attributes(self) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = SERVICE_ROOT_INODE
        attrs.entry_timeout = attrs.attr_timeout = ROOT_ENTRY_TIMEOUT_S
        attrs.st_mode = stat.S_IFDIR | 0o755
        attrs.st_nlink = 2 + len(self._table)
        attrs.st_blksize = 4096
        return attrs

    # ------------------------------------------------------------------------------ handlers

    @_contained
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: Any = None
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == SERVICE_ROOT_INODE:
            if name == b".":
                return self._service_root_attributes()
            if self._store is not None and name == STORE_DIR_NAME.encode():
                return self._store_attributes(self._store.root_entry())
            found = self._table.by_name(os.fsdecode(name))
            if found is None:
                raise _fail(errno.ENOENT)
            return self._image_root_attributes(*found)
        if self._in_store(parent_inode):
            assert self._store is not None
            entry = await self._store.lookup(parent_inode, name)
            if entry is None:
                raise _fail(errno.ENOENT)
            return self._store_attributes(entry)
        slot, image, parent = self._resolve(parent_inode)
        if name == b".":
            return self._attributes(slot, parent)
        child = image.tree.lookup(parent.inode, name)
        if child is None:
            return _NEGATIVE_ENTRY  # the tree never changes: the kernel may remember the miss
        return self._attributes(slot, child)

    @_contained
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if inode == SERVICE_ROOT_INODE:
            return self._service_root_attributes()
        if self._in_store(inode):
            assert self._store is not None
            entry = self._store.entry(inode)
            if entry is None:
                raise _fail(errno.ENOENT)
            return self._store_attributes(entry)
        slot, image, node = self._resolve(inode)
        if node.inode == ROOT_INODE:
            return self._image_root_attributes(slot, image)
        return self._attributes(slot, node)

    @_contained
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        _slot, _image, node = self._resolve(inode)
        if node.kind != "symlink":
            raise _fail(errno.EINVAL)
        return node.target

    @_contained
    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode == SERVICE_ROOT_INODE:
            handle = next(self._handles)
            self._root_listings[handle] = self._table.names()  # a snapshot, stable for offsets
            return handle
        if self._in_store(inode):
            assert self._store is not None
            if not self._store.is_dir(inode):
                raise _fail(errno.ENOTDIR)
            handle = next(self._handles)
            self._store_listings[handle] = self._store.listing(inode)
            return handle
        _slot, _image, node = self._resolve(inode)
        if not node.is_dir:
            raise _fail(errno.ENOTDIR)
        return inode

    @_contained
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        root_listing = self._root_listings.get(fh)
        if root_listing is not None:
            self._read_root(root_listing, start_id, token)
            return
        store_listing = self._store_listings.get(fh)
        if store_listing is not None:
            self._read_store(store_listing, start_id, token)
            return
        slot, image, node = self._resolve(fh)
        listing = image.tree.listings.get(node.inode, ())
        for index in range(start_id, len(listing)):
            name, child = listing[index]
            if not pyfuse3.readdir_reply(token, name, self._attributes(slot, child), index + 1):
                return

    def _read_root(self, listing: list[tuple[str, int]], start_id: int, token: Any) -> None:
        for index in range(start_id, len(listing)):
            name, slot = listing[index]
            image = self._table.by_slot(slot)
            if image is None:  # released since opendir
                continue
            attrs = self._image_root_attributes(slot, image)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attrs, index + 1):
                return

    def _read_store(
        self, listing: list[tuple[bytes, StoreEntry | DiffRoot]], start_id: int, token: Any
    ) -> None:
        for index in range(start_id, len(listing)):
            name, entry = listing[index]
            try:
                attrs = self._store_attributes(entry)
            except pyfuse3.FUSEError:  # a layer released since opendir
                continue
            if not pyfuse3.readdir_reply(token, name, attrs, index + 1):
                return

    @_contained
    async def releasedir(self, fh: int) -> None:
        self._root_listings.pop(fh, None)
        self._store_listings.pop(fh, None)

    @_contained
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if flags & _WRITE_FLAGS:
            raise _fail(errno.EROFS)
        if inode == SERVICE_ROOT_INODE:
            raise _fail(errno.EISDIR)
        if self._in_store(inode):
            assert self._store is not None
            entry = self._store.entry(inode)
            if entry is None:
                raise _fail(errno.ENOENT)
            if entry.kind == "dir":
                raise _fail(errno.EISDIR)
            return pyfuse3.FileInfo(fh=inode, keep_cache=True)
        _slot, _image, node = self._resolve(inode)
        if node.is_dir:
            raise _fail(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    @_contained
    async def read(self, fh: int, off: int, size: int) -> bytes:
        if self._in_store(fh):
            assert self._store is not None
            data = await self._store.read(fh, off, size)
            if data is None:
                raise _fail(errno.ENOENT)
            return data
        _slot, image, node = self._resolve(fh)
        return await image.resolver.read(node, off, size)

    @_contained
    async def release(self, fh: int) -> None:
        return None

    @_contained
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        if inode == SERVICE_ROOT_INODE:
            if name == STATS_XATTR:
                return json.dumps(self._service_stats()).encode()
            raise _fail(pyfuse3.ENOATTR)
        if self._in_store(inode):
            raise _fail(pyfuse3.ENOATTR)
        _slot, image, node = self._resolve(inode)
        if node.inode == ROOT_INODE and name == STATS_XATTR:
            return json.dumps(image.stats()).encode()
        value = node.xattrs.get(name)
        if value is None:
            raise _fail(pyfuse3.ENOATTR)
        return value

    @_contained
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        if inode == SERVICE_ROOT_INODE or self._in_store(inode):
            return []
        _slot, _image, node = self._resolve(inode)
        return sorted(node.xattrs)

    @_contained
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        images = list(self._table)
        total_bytes = sum(n.size for image in images for n in image.tree.nodes.values())
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_blocks = (total_bytes + 4095) // 4096
        data.f_bfree = data.f_bavail = 0
        data.f_files = sum(len(image.tree.nodes) for image in images)
        data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    @_contained
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        if mode & os.W_OK:
            raise _fail(errno.EROFS)
        return True

    async def forget(self, inode_list: Any) -> None:
        return None  # the trees are static: nothing to free

    # Every write is refused: images are immutable.
    async def setattr(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise _fail(errno.EROFS)

    async def write(self, *args: Any) -> int:
        raise _fail(errno.EROFS)

    @_contained
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        """Only a layer store's ``use`` mark: counted, and answered ENOENT (nothing made)."""
        if self._in_store(parent_inode):
            assert self._store is not None
            if self._store.use(parent_inode, name):
                raise _fail(errno.ENOENT)
        raise _fail(errno.EROFS)

    async def mkdir(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise _fail(errno.EROFS)

    async def mknod(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise _fail(errno.EROFS)

    async def symlink(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise _fail(errno.EROFS)

    async def link(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise _fail(errno.EROFS)

    async def unlink(self, *args: Any) -> None:
        raise _fail(errno.EROFS)

    @_contained
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        """Only a layer store's release of a layer: counted, and answered ENOENT."""
        if self._in_store(parent_inode):
            assert self._store is not None
            if self._store.release(parent_inode, name):
                raise _fail(errno.ENOENT)
        raise _fail(errno.EROFS)

    async def rename(self, *args: Any) -> None:
        raise _fail(errno.EROFS)

    async def setxattr(self, *args: Any) -> None:
        raise _fail(errno.EROFS)

    async def removexattr(self, *args: Any) -> None:
        raise _fail(errno.EROFS)
