"""An OCI image layout on disk, served to the registry client as a read-only registry.

``lazyfs mount oci:PATH[:TAG]`` (as skopeo and podman name a layout) mounts an image that is
on disk, not in a registry. Everything a mount does with an image (the manifest and its TOC
annotations, range reads of TOCs and chunks, the cache, offline remounts) goes through the
registry client; so the layout is given a host name of its own, :func:`layout_host` (under
``.invalid``, which never resolves), and requests for that host are answered here, in
process, instead of over a socket (registry/tls.py ``RegistryPools``). The image is the
repository :data:`LAYOUT_REPOSITORY` of that host. The layout itself is read through
:class:`LayoutFiles`, which convert/layout.py's ``OciLayout`` is.

Nothing here is trusted more than a registry's answer: the client checks the manifest against
its digest, each TOC against the manifest's annotation and each chunk against the TOC. This
module only finds the bytes: ``index.json`` tags, ``blobs/ALG/HEX`` files, ``Range`` (one range,
or several as ``multipart/byteranges``). File reads run in worker threads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Protocol

import anyio.to_thread
import httpx

from lazyfs.errors import LazyfsError
from lazyfs.model.digest import Digest
from lazyfs.model.manifests import MAX_MANIFEST_BYTES, OCI_MANIFEST, Descriptor
from lazyfs.model.ranges import ByteRange

LAYOUT_REPOSITORY = "layout"
_HOST_SUFFIX = ".oci-layout.invalid"
_PATH = re.compile(rf"^/v2/{LAYOUT_REPOSITORY}/(manifests|blobs|referrers)/([^/]+)$")
_RANGE_SPEC = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")
_STREAM_BYTES = 1 << 20
_MAX_RANGES = 64  # more in one request is refused (416): the client sends at most 16


def layout_host(path: Path) -> str:
    """The registry host name a layout at ``path`` (absolute) is served under."""
    return hashlib.sha256(os.fsencode(path)).hexdigest()[:16] + _HOST_SUFFIX


def is_layout_host(host: str) -> bool:
    return host.endswith(_HOST_SUFFIX)


class LayoutFiles(Protocol):
    """An OCI layout's files (convert/layout.py ``OciLayout``); LayoutError when they are not
    there or are malformed."""

    path: Path

    def resolve(self, tag: str | None) -> Descriptor: ...

    def read_blob(self, digest: Digest, max_bytes: int | None = None) -> bytes: ...

    def blob_size(self, digest: Digest) -> int: ...

    def read_blob_ranges(
        self, digest: Digest, ranges: Sequence[tuple[int, int]]
    ) -> list[bytes]: ...


class LayoutRegistry(httpx.AsyncBaseTransport):
    """The registry API (``/v2/``, manifests, blobs) of one OCI layout."""

    def __init__(self, layout: LayoutFiles) -> None:
        self.layout = layout

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method not in ("GET", "HEAD"):
            return _error(405, "UNSUPPORTED", "a layout is read-only")
        if request.url.path in ("/v2", "/v2/"):
            return httpx.Response(200, json={})
        match = _PATH.match(request.url.path)
        if match is None:
            return _error(404, "NAME_UNKNOWN", f"no repository at {request.url.path}")
        kind, name = match.groups()
        try:
            if kind == "manifests":
                return await self._manifest(request, name)
            if kind == "blobs":
                return await self._blob(request, Digest.parse(name))
        except LazyfsError as exc:
            return _error(404, "BLOB_UNKNOWN", str(exc))
        return _error(404, "NAME_UNKNOWN", "a layout has no referrers API")

    async def _manifest(self, request: httpx.Request, name: str) -> httpx.Response:
        def read() -> tuple[Digest, bytes, str]:
            if name.startswith("sha256:") or name.startswith("sha512:"):
                digest, media_type = Digest.parse(name), None
            else:
                entry = self.layout.resolve(name)
                digest, media_type = entry.digest, entry.media_type
            # As a registry's answer is capped: a larger one is refused unread.
            data = self.layout.read_blob(digest, MAX_MANIFEST_BYTES)
            return digest, data, media_type or _media_type_of(data)

        digest, data, media_type = await anyio.to_thread.run_sync(read)
        headers = {"Content-Type": media_type, "Docker-Content-Digest": str(digest)}
        body = b"" if request.method == "HEAD" else data
        return httpx.Response(
            200, headers={**headers, "Content-Length": str(len(data))}, content=body
        )

    async def _blob(self, request: httpx.Request, digest: Digest) -> httpx.Response:
        size = await anyio.to_thread.run_sync(self.layout.blob_size, digest)
        header = request.headers.get("Range")
        ranges = parse_range_header(header, size) if header else None
        if ranges == []:
            return httpx.Response(416, headers={"Content-Range": f"bytes */{size}"})
        if request.method == "HEAD":
            return httpx.Response(200, headers={"Content-Length": str(size)})
        if ranges is None:
            stream = _BlobStream(self.layout, digest, size)
            return httpx.Response(200, headers={"Content-Length": str(size)}, stream=stream)
        spans = [(r.start, r.end) for r in ranges]
        parts = await anyio.to_thread.run_sync(self.layout.read_blob_ranges, digest, spans)
        if len(ranges) == 1:
            only = ranges[0]
            content_range = f"bytes {only.start}-{only.end - 1}/{size}"
            return httpx.Response(206, headers={"Content-Range": content_range}, content=parts[0])
        boundary = secrets.token_hex(12)
        body = _multipart(ranges, parts, size, boundary)
        content_type = f"multipart/byteranges; boundary={boundary}"
        return httpx.Response(206, headers={"Content-Type": content_type}, content=body)


def parse_range_header(header: str, size: int) -> list[ByteRange] | None:
    """The ranges of a ``Range`` header, clipped to ``size``; None: not a byte range (serve
    the whole blob, as a server that ignores it would); []: none satisfiable (416)."""
    unit, _, specs = header.partition("=")
    if unit.strip().lower() != "bytes" or not specs:
        return None
    found: list[ByteRange] = []
    for spec in specs.split(",")[: _MAX_RANGES + 1]:
        match = _RANGE_SPEC.match(spec)
        if match is None:
            return None
        first, last = match.groups()
        if not first and not last:
            return None
        if not first:  # the last N bytes
            start, end = max(0, size - int(last)), size
        else:
            start, end = int(first), min(size, int(last) + 1) if last else size
        if start < end:
            found.append(ByteRange(start, end))
    return [] if len(found) > _MAX_RANGES else found


def _multipart(
    ranges: Sequence[ByteRange], parts: Sequence[bytes], size: int, boundary: str
) -> bytes:
    pieces: list[bytes] = []
    for byte_range, data in zip(ranges, parts, strict=True):
        head = (
            f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Range: bytes {byte_range.start}-{byte_range.end - 1}/{size}\r\n\r\n"
        )
        pieces += [head.encode(), data, b"\r\n"]
    pieces.append(f"--{boundary}--\r\n".encode())
    return b"".join(pieces)


def _media_type_of(data: bytes) -> str:
    """A manifest asked for by digest has no index entry: its own ``mediaType``, if any."""
    try:
        document = json.loads(data)
    except ValueError:
        return OCI_MANIFEST
    media_type = document.get("mediaType") if isinstance(document, dict) else None
    return media_type if isinstance(media_type, str) else OCI_MANIFEST


def _error(status: int, code: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"errors": [{"code": code, "message": message}]})


class _BlobStream(httpx.AsyncByteStream):
    """A whole blob, read a MiB at a time in worker threads."""

    def __init__(self, layout: LayoutFiles, digest: Digest, size: int) -> None:
        self._layout, self._digest, self._size = layout, digest, size

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for start in range(0, self._size, _STREAM_BYTES):
            span = (start, min(self._size, start + _STREAM_BYTES))
            parts = await anyio.to_thread.run_sync(
                self._layout.read_blob_ranges, self._digest, [span]
            )
            yield parts[0]
