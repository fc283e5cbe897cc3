"""Where images come from and go to: a registry repository or an OCI image layout.

``lazyfs convert`` reads from one ``ImageStore`` and writes to another; it never needs to know
which kind it has. Locations are written as skopeo writes them: a docker reference
(``registry/repo:tag``, optionally ``docker://``-prefixed) or ``oci:PATH[:TAG]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lazyfs.convert.layout import OciLayout
from lazyfs.errors import LayoutError, UsageError
from lazyfs.model.digest import Digest
from lazyfs.model.manifests import Descriptor
from lazyfs.model.reference import LAYOUT_PREFIX, Reference, split_layout_location
from lazyfs.registry.client import RegistryClient

ProgressCallback = Callable[[int], None]


@dataclass(frozen=True)
class RegistryLocation:
    reference: Reference

    def __str__(self) -> str:
        return str(self.reference)


@dataclass(frozen=True)
class LayoutLocation:
    path: Path
    tag: str | None

    def __str__(self) -> str:
        return f"oci:{self.path}" + (f":{self.tag}" if self.tag else "")


Location = RegistryLocation | LayoutLocation


def parse_location(text: str) -> Location:
    """Parse ``oci:PATH[:TAG]``, ``docker://REF`` or a plain docker reference."""
    if text.startswith(LAYOUT_PREFIX):
        path, tag = split_layout_location(text)
        return LayoutLocation(Path(path), tag)
    if text.startswith("oci-archive:") or text.startswith("docker-archive:"):
        raise UsageError(
            f"unsupported image location {text!r}: use oci:PATH or a registry reference"
        )
    return RegistryLocation(Reference.parse(text.removeprefix("docker://")))


@dataclass(frozen=True)
class RootManifest:
    """The manifest or index a location names, with its verified digest."""

    data: bytes
    media_type: str | None
    digest: Digest


class ImageStore(Protocol):
    """The operations convert needs, for reading and for writing."""

    async def get_root(self) -> RootManifest: ...

    async def get_manifest(self, descriptor: Descriptor) -> bytes: ...

    async def get_blob(self, descriptor: Descriptor) -> bytes: ...

    async def open_blob(
        self, descriptor: Descriptor, scratch_path: Path, on_progress: ProgressCallback | None
    ) -> Path:
        """A local file holding the blob: the store's own, or a download to scratch_path.

        Callers verify the digest while they read it."""
        ...

    async def has_blob(self, descriptor: Descriptor) -> bool: ...

    async def put_blob(self, descriptor: Descriptor, path: Path) -> None: ...

    async def put_manifest(self, data: bytes, media_type: str) -> Digest: ...

    async def put_root(self, data: bytes, media_type: str) -> Digest: ...


class RegistryStore:
    """A repository in a registry."""

    def __init__(
        self, client: RegistryClient, reference: Reference, mount_from: str | None = None
    ) -> None:
        self._client = client
        self._ref = reference
        self._mount_from = mount_from  # a repository on the same registry to mount blobs from

    async def get_root(self) -> RootManifest:
        fetched = await self._client.get_manifest(self._ref)
        return RootManifest(fetched.data, fetched.media_type, fetched.digest)

    async def get_manifest(self, descriptor: Descriptor) -> bytes:
        fetched = await self._client.get_manifest(self._ref.with_digest(descriptor.digest))
        return fetched.data

    async def get_blob(self, descriptor: Descriptor) -> bytes:
        return await self._client.get_blob(self._ref, descriptor.digest)

    async def open_blob(
        self, descriptor: Descriptor, scratch_path: Path, on_progress: ProgressCallback | None
    ) -> Path:
        await self._client.download_blob(self._ref, descriptor.digest, scratch_path, on_progress)
        return scratch_path

    async def has_blob(self, descriptor: Descriptor) -> bool:
        return await self._client.blob_size(self._ref, descriptor.digest) is not None

    async def put_blob(self, descriptor: Descriptor, path: Path) -> None:
        if await self.has_blob(descriptor):
            return
        if self._mount_from and await self._client.mount_blob(
            self._ref, descriptor.digest, self._mount_from
        ):
            return
        await self._client.push_blob(self._ref, descriptor.digest, path, descriptor.size)

    async def put_manifest(self, data: bytes, media_type: str) -> Digest:
        digest = Digest.of(data)
        return await self._client.push_manifest(
            self._ref.with_digest(digest).with_tag(None), media_type, data
        )

    async def put_root(self, data: bytes, media_type: str) -> Digest:
        target = self._ref if self._ref.tag or self._ref.digest else self._ref.with_tag("latest")
        if target.digest is not None and target.tag is None:
            raise UsageError(f"cannot push to {target}: a destination needs a tag, not a digest")
        return await self._client.push_manifest(_without_digest(target), media_type, data)


def _without_digest(ref: Reference) -> Reference:
    return Reference(ref.registry, ref.repository, ref.tag, None)


class LayoutStore:
    """An OCI image layout directory (read, or created on first write)."""

    def __init__(self, location: LayoutLocation, *, create: bool) -> None:
        self._location = location
        if create:
            self._layout = OciLayout.create(location.path)
        elif not (location.path / "index.json").is_file():
            raise LayoutError(f"{location}: no OCI image layout at {location.path}")
        else:
            self._layout = OciLayout(location.path)

    async def get_root(self) -> RootManifest:
        descriptor = self._layout.resolve(self._location.tag)
        data = self._layout.read_blob(descriptor.digest)
        return RootManifest(data, descriptor.media_type, descriptor.digest)

    async def get_manifest(self, descriptor: Descriptor) -> bytes:
        return self._layout.read_blob(descriptor.digest)

    async def get_blob(self, descriptor: Descriptor) -> bytes:
        return self._layout.read_blob(descriptor.digest)

    async def open_blob(
        self, descriptor: Descriptor, scratch_path: Path, on_progress: ProgressCallback | None
    ) -> Path:
        path = self._layout.blob_path(descriptor.digest)
        if not path.is_file():
            raise LayoutError(f"{self._location}: blob {descriptor.digest} is missing")
        return path

    async def has_blob(self, descriptor: Descriptor) -> bool:
        return self._layout.has_blob(descriptor.digest)

    async def put_blob(self, descriptor: Descriptor, path: Path) -> None:
        if not self._layout.has_blob(descriptor.digest):
            self._layout.add_blob_file(path, descriptor.digest)

    async def put_manifest(self, data: bytes, media_type: str) -> Digest:
        return self._layout.add_blob_bytes(data)

    async def put_root(self, data: bytes, media_type: str) -> Digest:
        digest = self._layout.add_blob_bytes(data)
        descriptor = Descriptor(media_type=media_type, digest=digest, size=len(data))
        self._layout.tag(descriptor, self._location.tag or "latest")
        return digest
