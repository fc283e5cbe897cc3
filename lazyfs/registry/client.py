"""Async OCI distribution client: the registry operations, each under the retry policy.

Every public call is one logical operation wrapped in the retry policy (RetryConfig):
transient failures (5xx, 429, timeouts, broken connections, truncated bodies) are retried with
exponential backoff and jitter, honouring ``Retry-After``. A refused connection (nothing
listens) where the caller has a cached answer (``cached_fallback``: an offline remount) gets one
immediate retry, then fails, so the cache answers in milliseconds instead of after ~2 s of
backoff; without a fallback it is retried like any other unreachable registry. Each attempt
sends its requests through transport.py (auth, redirects, TLS) and reads the answers with
bodies.py.

Everything fetched is verified against its digest before it is returned or committed to a file.
Local files are written and read through lazyfs/localfiles.py; this module does no disk I/O.

Several ranges go in one request (``multipart/byteranges``) until an endpoint shows it cannot
serve them: a 416 answer, or a 200 answer with the whole blob (S3 and some proxies). From then
on, for this client's life, that registry host gets one request per range.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import anyio
import anyio.to_thread
import httpx

from lazyfs.config import RegistryConfig
from lazyfs.errors import (
    IntegrityError,
    ManifestError,
    NotFoundError,
    RegistryError,
    RegistryProtocolError,
    RegistryUnreachableError,
    TransientRegistryError,
    UnsupportedMediaTypeError,
)
from lazyfs.localfiles import AtomicFile, ExactReader, read_exactly
from lazyfs.model.bytesource import RangeListener
from lazyfs.model.digest import Digest, DigestingWriter
from lazyfs.model.manifests import ALL_MANIFEST_TYPES, MAX_MANIFEST_BYTES, OCI_INDEX
from lazyfs.model.ranges import ByteRange, range_header
from lazyfs.model.reference import Reference
from lazyfs.registry.auth import Scopes, pull_scope, push_scope
from lazyfs.registry.bodies import (
    BlobSink,
    Progress,
    StallGuard,
    early_pieces,
    read_body,
    slice_partial_answer,
    slice_whole_blob,
    stream_to_sink,
)
from lazyfs.registry.credentials import CredentialSource
from lazyfs.registry.lanes import BackgroundLane
from lazyfs.registry.transport import Call, RegistryStats, Transport
from lazyfs.registry.wire import (
    ConnectionRefusedRegistryError,
    RangeNotSatisfiableError,
    ThrottledError,
    media_type_of,
)

# RegistryStats lives in transport.py (which counts requests); it is part of this API too.
__all__ = [
    "MAX_MANIFEST_BYTES",
    "FetchedManifest",
    "RegistryClient",
    "RegistryStats",
    "WholeBlobKeeper",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Content types some registries use for manifests; the body's mediaType field then decides.
_GENERIC_CONTENT_TYPES = frozenset(
    {"", "application/json", "application/octet-stream", "text/plain"}
)

# Asked for a sink when a Range GET brings the whole blob; None: keep only the wanted bytes.
WholeBlobKeeper = Callable[[Digest], BlobSink | None]


@dataclass(frozen=True)
class FetchedManifest:
    """A manifest or index exactly as served, with its verified digest."""

    media_type: str
    digest: Digest
    data: bytes


class RegistryClient:
    """Talks the OCI distribution API to any number of registries; an async context manager.

    ``keep_whole_blob`` is asked for a sink when a Range GET is answered with the whole blob
    (pull-through proxies do that), so that the transfer is not wasted: the sink gets every
    byte and is committed only once the blob's digest checked out. It returns None for a blob
    it does not want (one already kept, say).
    """

    def __init__(
        self,
        config: RegistryConfig = RegistryConfig(),  # noqa: B008 - frozen, so sharing is safe
        credentials: CredentialSource | None = None,
        *,
        keep_whole_blob: WholeBlobKeeper | None = None,
        local_registries: Mapping[str, httpx.AsyncBaseTransport] | None = None,
        lane: BackgroundLane | None = None,
    ) -> None:
        """``local_registries``: registries answered in this process, by host name (an OCI
        layout on disk, registry/layoutregistry.py); the mapping may grow later. ``lane``:
        the background lane this client's requests share with other clients' (lanes.py);
        by default its own."""
        self.config = config
        self.stats = RegistryStats()
        self._transport = Transport(config, credentials, self.stats, local_registries, lane)
        self._auth = self._transport.auth  # its repr is checked for leaked secrets
        self._keep_whole_blob = keep_whole_blob
        self._guard = StallGuard.of(config)
        # Registry hosts that answered several ranges with 416 or the whole blob.
        self._single_range_hosts: set[str] = set()

    def __repr__(self) -> str:
        return f"RegistryClient(config={self.config!r}, stats={self.stats!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._transport.aclose()

    # ------------------------------------------------------------------------------ manifests

    async def get_manifest(
        self,
        ref: Reference,
        accept: Sequence[str] = ALL_MANIFEST_TYPES,
        *,
        cached_fallback: bool = False,
    ) -> FetchedManifest:
        """Fetch the manifest or index ``ref`` names, verified against its digest;
        ``cached_fallback``: the caller has a cached one, so a refused connection fails fast."""
        return await self._retrying(
            partial(self._get_manifest_once, ref, tuple(accept)), cached_fallback=cached_fallback
        )

    async def resolve(self, ref: Reference) -> Digest:
        """The digest ``ref`` names: HEAD the tag, falling back to GET without a digest header."""
        if ref.digest is not None:
            return ref.digest
        return await self._retrying(partial(self._resolve_once, ref))

    async def push_manifest(self, ref: Reference, media_type: str, data: bytes) -> Digest:
        """PUT ``data`` under ``ref``'s tag (or digest); returns the digest of ``data``."""
        what = f"manifest {ref}"
        digest = Digest.of(data)
        if ref.digest is not None:
            ref.digest.verify(data, what)
            digest = ref.digest
        return await self._retrying(
            partial(self._push_manifest_once, ref, media_type, data, digest)
        )

    # ---------------------------------------------------------------------------------- blobs

    async def get_blob(self, ref: Reference, digest: Digest, max_bytes: int | None = None) -> bytes:
        """The whole blob, verified; a body longer than ``max_bytes`` (a descriptor's size, say)
        is refused as soon as it passes it, rather than read whole before its digest fails."""
        return await self._retrying(partial(self._get_blob_once, ref, digest, max_bytes))

    async def download_blob(
        self,
        ref: Reference,
        digest: Digest,
        dest: Path,
        on_progress: Callable[[int], None] | None = None,
    ) -> int:
        """Stream the blob to ``dest`` (verified, then renamed into place); returns its size.

        ``on_progress`` gets the number of newly received bytes; the calls add up to the size
        even when a download is retried.
        """
        progress = Progress(on_progress)
        return await self._retrying(partial(self._download_once, ref, digest, dest, progress))

    async def get_blob_range(
        self, ref: Reference, digest: Digest, rng: ByteRange, on_data: RangeListener | None = None
    ) -> bytes:
        """Bytes ``rng`` of the blob (a whole-blob 200 answer is verified, then sliced)."""
        return (await self.get_blob_ranges(ref, digest, [rng], on_data))[0]

    async def get_blob_ranges(
        self,
        ref: Reference,
        digest: Digest,
        ranges: Sequence[ByteRange],
        on_data: RangeListener | None = None,
    ) -> list[bytes]:
        """Several ranges in one request; the answer may be multipart, one part, or the blob.

        Where the registry showed it cannot serve several ranges at once, one request each.
        ``on_data`` hears of a 206 answer's bytes as they arrive (model/bytesource.py).
        """
        if not ranges:
            return []
        if len(ranges) == 1 or ref.api_host not in self._single_range_hosts:
            try:
                return await self._retrying(
                    partial(self._get_ranges_once, ref, digest, tuple(ranges), on_data)
                )
            except RangeNotSatisfiableError:
                if len(ranges) == 1:
                    raise
                self._no_multi_range(ref, "416")
        return await self._ranges_one_by_one(ref, digest, ranges, on_data)

    async def _ranges_one_by_one(
        self,
        ref: Reference,
        digest: Digest,
        ranges: Sequence[ByteRange],
        on_data: RangeListener | None,
    ) -> list[bytes]:
        """One Range request per range, all at once (each under the retry policy)."""
        pieces: list[bytes] = [b""] * len(ranges)

        async def fetch(index: int) -> None:
            single = (ranges[index],)
            answer = await self._retrying(
                partial(self._get_ranges_once, ref, digest, single, on_data)
            )
            pieces[index] = answer[0]

        async with anyio.create_task_group() as tasks:
            for index in range(len(ranges)):
                tasks.start_soon(fetch, index)
        return pieces

    def _no_multi_range(self, ref: Reference, answer: str) -> None:
        if ref.api_host not in self._single_range_hosts:
            log.info(
                "%s answered several ranges with %s; asking one range per request from now on",
                ref.api_host,
                answer,
            )
            self._single_range_hosts.add(ref.api_host)

    async def blob_size(self, ref: Reference, digest: Digest) -> int | None:
        """The blob's size from a HEAD, or None if the registry does not have it."""
        scopes = (pull_scope(ref.repository),)
        return await self._retrying(partial(self._blob_size_once, ref, digest, scopes))

    async def mount_blob(self, ref: Reference, digest: Digest, from_repository: str) -> bool:
        """Cross-repository mount into ``ref``'s repository; True if the registry did it."""
        return await self._retrying(partial(self._mount_once, ref, digest, from_repository))

    async def push_blob(self, ref: Reference, digest: Digest, path: Path, size: int) -> None:
        """Upload ``path`` as blob ``digest`` unless the registry already has it."""
        scopes = (push_scope(ref.repository),)
        if await self._retrying(partial(self._blob_size_once, ref, digest, scopes)) is not None:
            log.debug("blob %s already in %s; not pushing", digest, ref.name)
            return
        await self._retrying(partial(self._upload_once, ref, digest, path, size))

    async def push_blob_bytes(self, ref: Reference, data: bytes) -> Digest:
        """Upload a small blob held in memory (a config, an artifact) unless it is there."""
        digest = Digest.of(data)
        scopes = (push_scope(ref.repository),)
        if await self._retrying(partial(self._blob_size_once, ref, digest, scopes)) is None:
            await self._retrying(partial(self._upload_bytes_once, ref, digest, data))
        return digest

    async def get_referrers(
        self, ref: Reference, subject: Digest, artifact_type: str
    ) -> bytes | None:
        """The referrers API's index of the manifests whose subject is ``subject``, of
        ``artifact_type``; None when the registry has no referrers API (it answers 404, as
        distribution 2.8 does), so that callers use the referrers tag schema instead."""
        try:
            return await self._retrying(
                partial(self._get_referrers_once, ref, subject, artifact_type)
            )
        except NotFoundError:
            return None

    # ------------------------------------------------------------------ one attempt of each op

    async def _upload_bytes_once(self, ref: Reference, digest: Digest, data: bytes) -> None:
        location = await self._start_upload(ref, digest)
        await self._finish_upload(ref, digest, location, data)

    async def _get_referrers_once(
        self, ref: Reference, subject: Digest, artifact_type: str
    ) -> bytes:
        url = self._transport.url(ref, f"referrers/{subject}").copy_merge_params(
            {"artifactType": artifact_type}
        )
        what = f"referrers of {subject} in {ref.name}"
        headers = {"Accept": OCI_INDEX}
        call = Call(ref, "GET", url, (pull_scope(ref.repository),), what, headers)
        async with self._transport.exchange(call) as response:
            data = await read_body(
                response, self.stats, what, limit=MAX_MANIFEST_BYTES, guard=self._guard
            )
            content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        if content_type != OCI_INDEX:  # a registry that serves something else at that path
            raise NotFoundError(f"{what}: the registry answered {content_type or 'no type'}")
        return data

    async def _get_manifest_once(self, ref: Reference, accept: tuple[str, ...]) -> FetchedManifest:
        call = self._manifest_call(ref, "GET", accept)
        async with self._transport.exchange(call) as response:
            data = await read_body(
                response, self.stats, call.what, limit=MAX_MANIFEST_BYTES, guard=self._guard
            )
        media_type = _manifest_media_type(response, data, accept, call.what)
        return FetchedManifest(
            media_type, _verified_manifest_digest(ref, response, data, call.what), data
        )

    async def _resolve_once(self, ref: Reference) -> Digest:
        call = self._manifest_call(ref, "HEAD", ALL_MANIFEST_TYPES)
        async with self._transport.exchange(call) as response:
            header = response.headers.get("Docker-Content-Digest")
        if header:
            return _digest_header(header, call.what)
        return (await self._get_manifest_once(ref, ALL_MANIFEST_TYPES)).digest

    async def _push_manifest_once(
        self, ref: Reference, media_type: str, data: bytes, digest: Digest
    ) -> Digest:
        target = ref.tag if ref.tag is not None else ref.selector
        call = Call(
            ref=ref,
            method="PUT",
            url=self._transport.url(ref, f"manifests/{target}"),
            scopes=(push_scope(ref.repository),),
            what=f"manifest {ref}",
            headers={"Content-Type": media_type},
            content=data,
        )
        async with self._transport.exchange(call) as response:
            _check_returned_digest(response, digest, call.what)
        return digest

    async def _get_blob_once(self, ref: Reference, digest: Digest, max_bytes: int | None) -> bytes:
        call = self._blob_call(ref, "GET", digest)
        async with self._transport.exchange(call) as response:
            data = await read_body(response, self.stats, call.what, max_bytes, self._guard)
        digest.verify(data, call.what)
        return data

    async def _download_once(
        self, ref: Reference, digest: Digest, dest: Path, progress: Progress
    ) -> int:
        call = self._blob_call(ref, "GET", digest)
        # A fresh file per attempt; discarded unless the whole blob arrived and verified.
        with AtomicFile(dest, call.what) as file:
            async with self._transport.exchange(call) as response:
                return await stream_to_sink(
                    response, self.stats, digest, file, progress, call.what, self._guard
                )

    async def _get_ranges_once(
        self,
        ref: Reference,
        digest: Digest,
        ranges: tuple[ByteRange, ...],
        on_data: RangeListener | None = None,
    ) -> list[bytes]:
        what = f"blob {digest} in {ref.name}, {len(ranges)} range(s)"
        call = self._blob_call(ref, "GET", digest, {"Range": range_header(ranges)}, what)
        async with self._transport.exchange(call) as response:
            if response.status_code == 200:
                # The registry (or a pull-through proxy) ignored Range and sends the whole blob.
                # Already on its way, it is used (and kept, if wanted); later requests to this
                # host ask one range each, so that one request never brings a whole blob again.
                if len(ranges) > 1:
                    self._no_multi_range(ref, "the whole blob")
                keeper = self._whole_blob_sink(digest)
                return await slice_whole_blob(
                    response, self.stats, digest, ranges, keeper, what, self._guard
                )
            observe = early_pieces(response, on_data)
            body = await read_body(response, self.stats, what, guard=self._guard, observe=observe)
        return slice_partial_answer(response, body, ranges, what)

    def _whole_blob_sink(self, digest: Digest) -> BlobSink | None:
        return self._keep_whole_blob(digest) if self._keep_whole_blob is not None else None

    async def _blob_size_once(self, ref: Reference, digest: Digest, scopes: Scopes) -> int | None:
        call = self._blob_call(ref, "HEAD", digest, scopes=scopes)
        try:
            async with self._transport.exchange(call) as response:
                length = response.headers.get("Content-Length", "")
        except NotFoundError:
            return None
        if not length.isdigit():
            raise RegistryProtocolError(f"{call.what}: HEAD answer has no Content-Length")
        return int(length)

    async def _mount_once(self, ref: Reference, digest: Digest, from_repository: str) -> bool:
        url = self._transport.url(ref, "blobs/uploads/").copy_merge_params(
            {"mount": str(digest), "from": from_repository}
        )
        scopes = (push_scope(ref.repository), pull_scope(from_repository))
        what = f"mount of blob {digest} from {from_repository} into {ref.name}"
        call = Call(ref, "POST", url, scopes, what, content=b"")
        async with self._transport.exchange(call) as response:
            mounted, location = response.status_code == 201, response.headers.get("Location")
        if not mounted and location:
            await self._cancel_upload(ref, location)
        return mounted

    async def _upload_once(self, ref: Reference, digest: Digest, path: Path, size: int) -> None:
        location = await self._start_upload(ref, digest)
        if size <= self.config.monolithic_upload_max_bytes:
            data = await anyio.to_thread.run_sync(read_exactly, path, size)
            digest.verify(data, f"local file {path}")
        else:
            location = await self._upload_chunks(ref, digest, path, size, location)
            data = b""
        await self._finish_upload(ref, digest, location, data)

    # --------------------------------------------------------------------------- upload steps

    async def _start_upload(self, ref: Reference, digest: Digest) -> httpx.URL:
        what = f"upload of blob {digest} to {ref.name}"
        url = self._transport.url(ref, "blobs/uploads/")
        call = Call(ref, "POST", url, (push_scope(ref.repository),), what, content=b"")
        async with self._transport.exchange(call) as response:
            return _upload_location(response, call.url, what)

    async def _upload_chunks(
        self, ref: Reference, digest: Digest, path: Path, size: int, location: httpx.URL
    ) -> httpx.URL:
        writer = DigestingWriter(digest.algorithm)
        with ExactReader(path) as source:
            while writer.size_bytes < size:
                wanted = min(self.config.upload_chunk_bytes, size - writer.size_bytes)
                chunk = await anyio.to_thread.run_sync(source.read, wanted)
                location = await self._patch_chunk(ref, digest, location, chunk, writer.size_bytes)
                writer.update(chunk)
        # Catch a local file that changed under us before the registry commits the blob.
        writer.check(digest, f"local file {path}")
        return location

    async def _patch_chunk(
        self, ref: Reference, digest: Digest, location: httpx.URL, chunk: bytes, offset: int
    ) -> httpx.URL:
        what = f"upload of blob {digest} to {ref.name} at byte {offset}"
        headers = {
            "Content-Type": "application/octet-stream",
            # The distribution spec's upload form: inclusive, without the "bytes " unit.
            "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
        }
        call = Call(ref, "PATCH", location, (push_scope(ref.repository),), what, headers, chunk)
        async with self._transport.exchange(call) as response:
            return _upload_location(response, location, what)

    async def _finish_upload(
        self, ref: Reference, digest: Digest, location: httpx.URL, data: bytes
    ) -> None:
        what = f"upload of blob {digest} to {ref.name}"
        url = location.copy_merge_params({"digest": str(digest)})
        headers = {"Content-Type": "application/octet-stream"}
        call = Call(ref, "PUT", url, (push_scope(ref.repository),), what, headers, data)
        async with self._transport.exchange(call) as response:
            _check_returned_digest(response, digest, what)

    async def _cancel_upload(self, ref: Reference, location: str) -> None:
        """Best effort: a refused mount opened an upload session we do not want."""
        url = self._transport.url(ref, "").join(location)
        call = Call(
            ref, "DELETE", url, (push_scope(ref.repository),), f"cancel upload in {ref.name}"
        )
        try:
            async with self._transport.exchange(call):
                pass
        except RegistryError as exc:
            log.debug("%s", exc)

    # -------------------------------------------------------------------------------- retries

    async def _retrying(
        self, attempt: Callable[[], Awaitable[T]], *, cached_fallback: bool = False
    ) -> T:
        """Run ``attempt``, retrying transient failures per RetryConfig; with
        ``cached_fallback``, a refused connection gets one immediate retry only."""
        policy = self.config.retry
        number = 1
        while True:
            try:
                return await attempt()
            except (TransientRegistryError, RegistryUnreachableError) as exc:
                refused = cached_fallback and isinstance(exc, ConnectionRefusedRegistryError)
                attempts = min(2, policy.max_attempts) if refused else policy.max_attempts
                if number >= attempts:
                    raise
                delay = 0.0 if refused else self._backoff_s(number, exc)
                self.stats.retries += 1
                log.info("%s; retry %d of %d in %.2f s", exc, number, attempts - 1, delay)
                await anyio.sleep(delay)
                number += 1

    def _backoff_s(self, number: int, exc: Exception) -> float:
        if isinstance(exc, ThrottledError) and exc.retry_after_s is not None:
            return min(exc.retry_after_s, self.config.fetch_timeout_s)
        policy = self.config.retry
        ceiling = min(policy.max_backoff_s, policy.initial_backoff_s * 2 ** (number - 1))
        # "Equal jitter": at least half the backoff, so retries never collapse to zero.
        return random.uniform(ceiling / 2, ceiling)

    # ---------------------------------------------------------------------------------- calls

    def _manifest_call(self, ref: Reference, method: str, accept: Sequence[str]) -> Call:
        url = self._transport.url(ref, f"manifests/{ref.selector}")
        headers = {"Accept": ", ".join(accept)}
        return Call(ref, method, url, (pull_scope(ref.repository),), f"manifest {ref}", headers)

    def _blob_call(
        self,
        ref: Reference,
        method: str,
        digest: Digest,
        headers: Mapping[str, str] | None = None,
        what: str | None = None,
        scopes: Scopes | None = None,
    ) -> Call:
        return Call(
            ref,
            method,
            self._transport.url(ref, f"blobs/{digest}"),
            scopes or (pull_scope(ref.repository),),
            what or f"blob {digest} in {ref.name}",
            headers or {},
        )


# --------------------------------------------------------------------------- pure helpers


def _digest_header(value: str, what: str) -> Digest:
    try:
        return Digest.parse(value.strip())
    except ManifestError as exc:
        raise RegistryProtocolError(f"{what}: malformed Docker-Content-Digest {value!r}") from exc


def _check_returned_digest(response: httpx.Response, expected: Digest, what: str) -> None:
    header = response.headers.get("Docker-Content-Digest")
    if not header:
        return
    returned = _digest_header(header, what)
    if returned.algorithm == expected.algorithm and returned != expected:
        raise IntegrityError(what, str(expected), str(returned))


def _verified_manifest_digest(
    ref: Reference, response: httpx.Response, data: bytes, what: str
) -> Digest:
    """Check ``data`` against the digest we asked for, else against the one the registry sent."""
    if ref.digest is not None:
        ref.digest.verify(data, what)
        return ref.digest
    header = response.headers.get("Docker-Content-Digest")
    if header:
        claimed = _digest_header(header, what)
        claimed.verify(data, what)
        return claimed
    return Digest.of(data)


def _manifest_media_type(
    response: httpx.Response, data: bytes, accept: Sequence[str], what: str
) -> str:
    declared = media_type_of(response.headers.get("Content-Type"))
    if declared in accept:
        return declared
    embedded = _embedded_media_type(data) if declared in _GENERIC_CONTENT_TYPES else None
    if embedded is not None and embedded in accept:
        return embedded
    raise UnsupportedMediaTypeError(
        f"{what}: unsupported manifest media type {embedded or declared or 'none'!r}"
    )


def _embedded_media_type(data: bytes) -> str | None:
    try:
        document: Any = json.loads(data)
    except ValueError:
        return None
    media_type = document.get("mediaType") if isinstance(document, dict) else None
    return media_type if isinstance(media_type, str) else None


def _upload_location(response: httpx.Response, base: httpx.URL, what: str) -> httpx.URL:
    location = response.headers.get("Location")
    if not location:
        raise RegistryProtocolError(f"{what}: upload answer has no Location")
    return base.join(location)
