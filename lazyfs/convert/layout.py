"""An OCI image layout directory on disk (``oci-layout``, ``index.json``, ``blobs/``).

Tags are the ``org.opencontainers.image.ref.name`` annotations of the ``index.json`` entries, as
``skopeo copy ... oci:PATH:TAG`` writes them. Every write is atomic: blobs and ``index.json``
are written under a temporary name in the same directory and renamed into place, so a reader
never sees a partial file. ``tag`` holds an ``flock`` on the layout directory while it rewrites
``index.json``, so concurrent taggers on one host do not lose each other's entries.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

from lazyfs.errors import ImageError, LayoutError, UsageError
from lazyfs.model.digest import Digest, DigestingWriter
from lazyfs.model.manifests import (
    MAX_MANIFEST_BYTES,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    REF_NAME_ANNOTATION,
    Descriptor,
    Index,
    Manifest,
    load_json_object,
)

LAYOUT_VERSION: Final = "1.0.0"
_LAYOUT_FILE: Final = "oci-layout"
_INDEX_FILE: Final = "index.json"
_BLOBS_DIR: Final = "blobs"
_COPY_BUFFER_BYTES: Final = 1 << 20
# Whoever wrote the layout controls its files: index.json is an image index, capped as a
# registry's is; oci-layout holds one short field.
MAX_INDEX_BYTES: Final = MAX_MANIFEST_BYTES
_MAX_LAYOUT_FILE_BYTES: Final = 64 << 10
_EMPTY_INDEX: Final = Index(OCI_INDEX, ())


class OciLayout:
    """A handle on an existing OCI image layout; LayoutError if ``path`` is not one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._check_layout_file()
        if not (path / _BLOBS_DIR).is_dir():
            raise LayoutError(f"{path}: not an OCI image layout (no {_BLOBS_DIR}/ directory)")

    @classmethod
    def create(cls, path: Path) -> OciLayout:
        """Create a layout at ``path``, or open the one already there."""
        try:
            (path / _BLOBS_DIR / "sha256").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LayoutError(f"{path}: cannot create an OCI image layout: {exc}") from exc
        if not (path / _LAYOUT_FILE).exists():
            _write_atomically(path / _LAYOUT_FILE, b'{"imageLayoutVersion":"1.0.0"}')
        if not (path / _INDEX_FILE).exists():
            _write_atomically(path / _INDEX_FILE, _EMPTY_INDEX.to_bytes())
        return cls(path)

    def __repr__(self) -> str:
        return f"OciLayout({str(self.path)!r})"

    # --- index.json and tags ------------------------------------------------------------------

    def index(self) -> Index:
        """The parsed ``index.json``."""
        path = self.path / _INDEX_FILE
        try:
            return Index.parse(_read_file(path, MAX_INDEX_BYTES), None)
        except ImageError as exc:
            raise LayoutError(f"{path}: malformed index: {exc}") from exc

    def tags(self) -> list[str]:
        """The ref names in ``index.json``, in index order."""
        return [d.ref_name for d in self.index().manifests if d.ref_name is not None]

    def resolve(self, tag: str | None) -> Descriptor:
        """The ``index.json`` entry named ``tag``; with None, the layout's only entry."""
        entries = self.index().manifests
        if tag is None:
            if len(entries) == 1:
                return entries[0]
            raise LayoutError(
                f"{self.path}: holds {len(entries)} images, name one (tags: {self._tag_list()})"
            )
        for entry in entries:
            if entry.ref_name == tag:
                return entry
        raise LayoutError(f"{self.path}: no image tagged {tag!r} (tags: {self._tag_list()})")

    def _tag_list(self) -> str:
        return ", ".join(self.tags()) or "none"

    def tag(self, descriptor: Descriptor, tag: str) -> None:
        """Point ``tag`` at ``descriptor``, replacing whatever entry had that name."""
        if not tag:
            raise UsageError("an image layout tag must not be empty")
        named = descriptor.with_annotations({**descriptor.annotations, REF_NAME_ANNOTATION: tag})
        with self._locked():
            index = self.index()
            kept = [entry for entry in index.manifests if entry.ref_name != tag]
            new_index = index.with_manifests([*kept, named])
            _write_atomically(self.path / _INDEX_FILE, new_index.to_bytes())

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold an exclusive flock on the layout directory (index.json itself gets replaced)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise LayoutError(f"{self.path}: cannot open layout: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    # --- blobs --------------------------------------------------------------------------------

    def blob_path(self, digest: Digest) -> Path:
        return self.path / _BLOBS_DIR / digest.algorithm / digest.hex

    def has_blob(self, digest: Digest) -> bool:
        return self.blob_path(digest).is_file()

    def read_blob(self, digest: Digest, max_bytes: int | None = None) -> bytes:
        """The blob's bytes, checked against ``digest`` (IntegrityError if they differ); with
        ``max_bytes``, a larger blob is a LayoutError and is not read."""
        if not self.has_blob(digest):
            raise LayoutError(f"{self.path}: no blob {digest}")
        data = _read_file(self.blob_path(digest), max_bytes)
        digest.verify(data, f"blob {digest} in {self.path}")
        return data

    def blob_size(self, digest: Digest) -> int:
        """The size of blob ``digest``; LayoutError if the layout lacks it."""
        try:
            return self.blob_path(digest).stat().st_size
        except OSError as exc:
            raise LayoutError(f"{self.path}: no blob {digest}") from exc

    def read_blob_ranges(self, digest: Digest, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """The bytes ``[start, end)`` of blob ``digest`` for each range, unchecked: whoever
        asked checks them against the digests the manifest and TOC give."""
        path = self.blob_path(digest)
        try:
            with path.open("rb") as blob:
                return [os.pread(blob.fileno(), end - start, start) for start, end in ranges]
        except OSError as exc:
            raise LayoutError(f"cannot read {path}: {exc.strerror or exc}") from exc

    def add_blob_bytes(self, data: bytes) -> Digest:
        """Store ``data`` as a blob (a no-op if it is already there) and return its digest."""
        digest = Digest.of(data)
        if not self.has_blob(digest):
            _write_atomically(self.blob_path(digest), data)
        return digest

    def add_image(self, config: bytes, layers: Sequence[Descriptor], tag: str) -> Digest:
        """Store ``config`` and an OCI manifest of it and ``layers`` (already stored); tag it.

        Returns the manifest digest."""
        config_digest = self.add_blob_bytes(config)
        manifest = Manifest(
            media_type=OCI_MANIFEST,
            config=Descriptor(media_type=OCI_CONFIG, digest=config_digest, size=len(config)),
            layers=tuple(layers),
        )
        data = manifest.to_bytes()
        digest = self.add_blob_bytes(data)
        self.tag(Descriptor(media_type=OCI_MANIFEST, digest=digest, size=len(data)), tag)
        return digest

    def add_blob_file(self, src: Path, digest: Digest) -> None:
        """Move the file ``src`` into the layout as blob ``digest``.

        ``src`` is consumed: renamed into place when on the same filesystem, else copied to a
        temporary file beside the blob, renamed, and deleted. Its content is checked against
        ``digest`` first (IntegrityError), so a wrong blob never lands in the layout.
        """
        _check_file_digest(src, digest)
        dest = self.blob_path(digest)
        _make_parent(dest)
        try:
            os.chmod(src, 0o644)  # the writer's temporary file may be private
            os.replace(src, dest)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise LayoutError(f"cannot move {src} into {self.path}: {exc}") from exc
            _copy_atomically(src, dest)
            _unlink(src)

    # --- validation ---------------------------------------------------------------------------

    def _check_layout_file(self) -> None:
        path = self.path / _LAYOUT_FILE
        if not path.is_file():
            raise LayoutError(f"{self.path}: not an OCI image layout (no {_LAYOUT_FILE} file)")
        try:
            fields = load_json_object(_read_file(path, _MAX_LAYOUT_FILE_BYTES), str(path))
        except ImageError as exc:
            raise LayoutError(f"{path}: {exc}") from exc
        version = fields.get("imageLayoutVersion")
        if not isinstance(version, str) or not version:
            raise LayoutError(f"{path}: no imageLayoutVersion")
        if version.split(".")[0] != LAYOUT_VERSION.split(".")[0]:
            raise LayoutError(f"{path}: unsupported imageLayoutVersion {version}")


# --- file helpers ------------------------------------------------------------------------------


def _read_file(path: Path, max_bytes: int | None = None) -> bytes:
    """The bytes of ``path``; with ``max_bytes``, a larger file is a LayoutError, and at most
    ``max_bytes + 1`` bytes are read even if it grows meanwhile."""
    try:
        with path.open("rb") as src:
            if max_bytes is None:
                return src.read()
            size = os.fstat(src.fileno()).st_size
            data = src.read(max_bytes + 1) if size <= max_bytes else b""
    except OSError as exc:
        raise LayoutError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if size > max_bytes:
        raise LayoutError(f"{path} is {size} bytes, more than the {max_bytes} allowed")
    if len(data) > max_bytes:
        raise LayoutError(f"{path} grew past the {max_bytes} bytes allowed as it was read")
    return data


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LayoutError(f"cannot create {path.parent}: {exc}") from exc


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError as exc:
        raise LayoutError(f"cannot remove {path}: {exc}") from exc


def _check_file_digest(path: Path, digest: Digest) -> None:
    writer = DigestingWriter(digest.algorithm)
    try:
        with path.open("rb") as src:
            while block := src.read(_COPY_BUFFER_BYTES):
                writer.update(block)
    except OSError as exc:
        raise LayoutError(f"cannot read {path}: {exc}") from exc
    writer.check(digest, f"blob file {path}")


@contextlib.contextmanager
def _temporary_beside(dest: Path) -> Iterator[tuple[int, Path]]:
    """A temporary file in ``dest``'s directory; removed unless the caller renamed it away."""
    _make_parent(dest)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    except OSError as exc:
        raise LayoutError(f"cannot write in {dest.parent}: {exc}") from exc
    temp = Path(name)
    try:
        yield fd, temp
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


def _write_atomically(dest: Path, data: bytes) -> None:
    with _temporary_beside(dest) as (fd, temp):
        try:
            with os.fdopen(os.dup(fd), "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(temp, 0o644)  # mkstemp makes 0600; blobs are meant to be shared
            os.replace(temp, dest)
        except OSError as exc:
            raise LayoutError(f"cannot write {dest}: {exc}") from exc


def _copy_atomically(src: Path, dest: Path) -> None:
    with _temporary_beside(dest) as (fd, temp):
        try:
            with src.open("rb") as source, os.fdopen(os.dup(fd), "wb") as out:
                shutil.copyfileobj(source, out, _COPY_BUFFER_BYTES)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(temp, 0o644)
            os.replace(temp, dest)
        except OSError as exc:
            raise LayoutError(f"cannot copy {src} to {dest}: {exc}") from exc
