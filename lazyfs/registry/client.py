"""Async OCI distribution client on one httpx.AsyncClient (HTTP/1.1, TCP_NODELAY).

Every public call is one logical operation wrapped in the retry policy (RetryConfig):
transient failures (5xx, 429, timeouts, broken connections, truncated bodies) are retried with
exponential backoff and jitter, honouring ``Retry-After``. Below that, each request goes through
the auth flow (auth.py) and manual redirect handling, which never forwards ``Authorization`` to
another origin (blob GETs often redirect to object storage).

Everything fetched is verified against its digest before it is returned or renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import secrets
import socket
import ssl
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self, TypeVar

import anyio
import anyio.to_thread
import httpx

from lazyfs import __version__
from lazyfs.config import RegistryConfig
from lazyfs.errors import (
    CacheError,
    IntegrityError,
    LayoutError,
    ManifestError,
    NotFoundError,
    RegistryError,
    RegistryProtocolError,
    RegistryUnreachableError,
    TransientRegistryError,
    UnsupportedMediaTypeError,
    UsageError,
)
from lazyfs.model.digest import Digest, DigestingWriter
from lazyfs.model.manifests import ALL_MANIFEST_TYPES
from lazyfs.model.ranges import (
    ByteRange,
    parse_content_range,
    parse_multipart_byteranges,
    range_header,
    slice_ranges,
)
from lazyfs.model.reference import Reference
from lazyfs.registry.auth import Authenticator, CredentialSource, Scopes, pull_scope, push_scope
from lazyfs.registry.wire import ThrottledError, media_type_of, status_error, transport_error

log = logging.getLogger(__name__)

T = TypeVar("T")

# containerd's limit; a bigger "manifest" is an attack or a mistake.
MAX_MANIFEST_BYTES = 4 << 20
_MAX_REDIRECTS = 5
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_STREAM_CHUNK_BYTES = 1 << 20
# Content types some registries use for manifests; the body's mediaType field then decides.
_GENERIC_CONTENT_TYPES = frozenset(
    {"", "application/json", "application/octet-stream", "text/plain"}
)


@dataclass(frozen=True)
class FetchedManifest:
    """A manifest or index exactly as served, with its verified digest."""

    media_type: str
    digest: Digest
    data: bytes


@dataclass
class RegistryStats:
    """Plain counters: body bytes received, requests per method, retries."""

    bytes_received: int = 0
    requests: Counter[str] = field(default_factory=Counter)
    retries: int = 0


@dataclass(frozen=True)
class _Call:
    """One logical request, before auth and redirects."""

    ref: Reference
    method: str
    url: httpx.URL
    scopes: Scopes
    what: str
    headers: Mapping[str, str] = field(default_factory=dict)
    content: bytes | None = None


class _BlobKeeper:
    """Writes a streamed blob to ``directory/ALG/HEX`` if a directory is given; atomic."""

    def __init__(self, directory: Path | None, digest: Digest) -> None:
        self._final = directory / digest.algorithm / digest.hex if directory else None
        self._file: IO[bytes] | None = None

    def __enter__(self) -> _BlobKeeper:
        if self._final is not None and not self._final.exists():
            self._final.parent.mkdir(parents=True, exist_ok=True)
            self._file = tempfile.NamedTemporaryFile(dir=self._final.parent, delete=False)
        return self

    def write(self, data: bytes) -> None:
        if self._file is not None:
            self._file.write(data)

    def commit(self) -> None:
        if self._file is not None and self._final is not None:
            self._file.close()
            os.replace(self._file.name, self._final)
            self._file = None

    def __exit__(self, *_exc: object) -> None:
        if self._file is not None:  # not committed: never leave a partial blob
            self._file.close()
            with contextlib.suppress(OSError):
                os.unlink(self._file.name)


class _Progress:
    """Reports newly received bytes; a retried download reports only bytes past the old mark."""

    def __init__(self, callback: Callable[[int], None] | None) -> None:
        self._callback = callback
        self._reported = 0

    def reached(self, total: int) -> None:
        if self._callback is not None and total > self._reported:
            self._callback(total - self._reported)
            self._reported = total


class RegistryClient:
    """Talks the OCI distribution API to any number of registries; an async context manager."""

    def __init__(
        self,
        config: RegistryConfig = RegistryConfig(),  # noqa: B008 - frozen, so sharing is safe
        credentials: CredentialSource | None = None,
    ) -> None:
        self.config = config
        self.stats = RegistryStats()
        self._http = _http_client(config)
        self._auth = Authenticator(self._send_and_read, credentials)
        self._plain_http: set[str] = set()  # insecure registries found to speak HTTP only

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
        await self._http.aclose()

    # ------------------------------------------------------------------------------ manifests

    async def get_manifest(
        self, ref: Reference, accept: Sequence[str] = ALL_MANIFEST_TYPES
    ) -> FetchedManifest:
        """Fetch the manifest or index ``ref`` names, verified against its digest."""
        return await self._retrying(partial(self._get_manifest_once, ref, tuple(accept)))

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

    async def get_blob(self, ref: Reference, digest: Digest) -> bytes:
        """The whole blob, verified."""
        return await self._retrying(partial(self._get_blob_once, ref, digest))

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
        progress = _Progress(on_progress)
        return await self._retrying(partial(self._download_once, ref, digest, dest, progress))

    async def get_blob_range(self, ref: Reference, digest: Digest, rng: ByteRange) -> bytes:
        """Bytes ``rng`` of the blob (a whole-blob 200 answer is verified, then sliced)."""
        return (await self.get_blob_ranges(ref, digest, [rng]))[0]

    async def get_blob_ranges(
        self, ref: Reference, digest: Digest, ranges: Sequence[ByteRange]
    ) -> list[bytes]:
        """Several ranges in one request; the answer may be multipart, one part, or the blob."""
        if not ranges:
            return []
        return await self._retrying(partial(self._get_ranges_once, ref, digest, tuple(ranges)))

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

    # ------------------------------------------------------------------ one attempt of each op

    async def _get_manifest_once(self, ref: Reference, accept: tuple[str, ...]) -> FetchedManifest:
        call = self._manifest_call(ref, "GET", accept)
        async with self._exchange(call) as response:
            data = await self._read(response, call.what, limit=MAX_MANIFEST_BYTES)
        media_type = _manifest_media_type(response, data, accept, call.what)
        return FetchedManifest(
            media_type, _verified_manifest_digest(ref, response, data, call.what), data
        )

    async def _resolve_once(self, ref: Reference) -> Digest:
        call = self._manifest_call(ref, "HEAD", ALL_MANIFEST_TYPES)
        async with self._exchange(call) as response:
            header = response.headers.get("Docker-Content-Digest")
        if header:
            return _digest_header(header, call.what)
        return (await self._get_manifest_once(ref, ALL_MANIFEST_TYPES)).digest

    async def _push_manifest_once(
        self, ref: Reference, media_type: str, data: bytes, digest: Digest
    ) -> Digest:
        target = ref.tag if ref.tag is not None else ref.selector
        call = _Call(
            ref=ref,
            method="PUT",
            url=self._url(ref, f"manifests/{target}"),
            scopes=(push_scope(ref.repository),),
            what=f"manifest {ref}",
            headers={"Content-Type": media_type},
            content=data,
        )
        async with self._exchange(call) as response:
            _check_returned_digest(response, digest, call.what)
        return digest

    async def _get_blob_once(self, ref: Reference, digest: Digest) -> bytes:
        call = self._blob_call(ref, "GET", digest)
        async with self._exchange(call) as response:
            data = await self._read(response, call.what)
        digest.verify(data, call.what)
        return data

    async def _download_once(
        self, ref: Reference, digest: Digest, dest: Path, progress: _Progress
    ) -> int:
        call = self._blob_call(ref, "GET", digest)
        partial_path = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
        try:
            with _open_for_writing(partial_path) as out:
                async with self._exchange(call) as response:
                    size = await self._stream_to_file(response, out, digest, progress, call.what)
            _rename(partial_path, dest)
        except BaseException:
            partial_path.unlink(missing_ok=True)
            raise
        return size

    async def _get_ranges_once(
        self, ref: Reference, digest: Digest, ranges: tuple[ByteRange, ...]
    ) -> list[bytes]:
        what = f"blob {digest} in {ref.name}, {len(ranges)} range(s)"
        call = self._blob_call(ref, "GET", digest, {"Range": range_header(ranges)}, what)
        async with self._exchange(call) as response:
            if response.status_code == 200:
                # The registry (or a pull-through proxy) ignored Range and sends the whole blob.
                return await self._slice_whole_blob(response, digest, ranges, what)
            body = await self._read(response, what)
        return _slice_partial_answer(response, body, ranges, what)

    async def _blob_size_once(self, ref: Reference, digest: Digest, scopes: Scopes) -> int | None:
        call = self._blob_call(ref, "HEAD", digest, scopes=scopes)
        try:
            async with self._exchange(call) as response:
                length = response.headers.get("Content-Length", "")
        except NotFoundError:
            return None
        if not length.isdigit():
            raise RegistryProtocolError(f"{call.what}: HEAD answer has no Content-Length")
        return int(length)

    async def _mount_once(self, ref: Reference, digest: Digest, from_repository: str) -> bool:
        url = self._url(ref, "blobs/uploads/").copy_merge_params(
            {"mount": str(digest), "from": from_repository}
        )
        scopes = (push_scope(ref.repository), pull_scope(from_repository))
        what = f"mount of blob {digest} from {from_repository} into {ref.name}"
        async with self._exchange(_Call(ref, "POST", url, scopes, what, content=b"")) as response:
            mounted, location = response.status_code == 201, response.headers.get("Location")
        if not mounted and location:
            await self._cancel_upload(ref, location)
        return mounted

    async def _upload_once(self, ref: Reference, digest: Digest, path: Path, size: int) -> None:
        location = await self._start_upload(ref, digest)
        if size <= self.config.monolithic_upload_max_bytes:
            data = await anyio.to_thread.run_sync(_read_exactly, path, size)
            digest.verify(data, f"local file {path}")
        else:
            location = await self._upload_chunks(ref, digest, path, size, location)
            data = b""
        await self._finish_upload(ref, digest, location, data)

    # --------------------------------------------------------------------------- upload steps

    async def _start_upload(self, ref: Reference, digest: Digest) -> httpx.URL:
        what = f"upload of blob {digest} to {ref.name}"
        call = _Call(
            ref,
            "POST",
            self._url(ref, "blobs/uploads/"),
            (push_scope(ref.repository),),
            what,
            content=b"",
        )
        async with self._exchange(call) as response:
            return _upload_location(response, call.url, what)

    async def _upload_chunks(
        self, ref: Reference, digest: Digest, path: Path, size: int, location: httpx.URL
    ) -> httpx.URL:
        writer = DigestingWriter(digest.algorithm)
        with _open_for_reading(path) as source:
            while writer.size_bytes < size:
                wanted = min(self.config.upload_chunk_bytes, size - writer.size_bytes)
                chunk = await anyio.to_thread.run_sync(_read_chunk, source, path, wanted)
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
        call = _Call(ref, "PATCH", location, (push_scope(ref.repository),), what, headers, chunk)
        async with self._exchange(call) as response:
            return _upload_location(response, location, what)

    async def _finish_upload(
        self, ref: Reference, digest: Digest, location: httpx.URL, data: bytes
    ) -> None:
        what = f"upload of blob {digest} to {ref.name}"
        url = location.copy_merge_params({"digest": str(digest)})
        headers = {"Content-Type": "application/octet-stream"}
        call = _Call(ref, "PUT", url, (push_scope(ref.repository),), what, headers, data)
        async with self._exchange(call) as response:
            _check_returned_digest(response, digest, what)

    async def _cancel_upload(self, ref: Reference, location: str) -> None:
        """Best effort: a refused mount opened an upload session we do not want."""
        url = self._url(ref, "").join(location)
        call = _Call(
            ref, "DELETE", url, (push_scope(ref.repository),), f"cancel upload in {ref.name}"
        )
        try:
            async with self._exchange(call):
                pass
        except RegistryError as exc:
            log.debug("%s", exc)

    # ------------------------------------------------------------------------- body handling

    async def _read(self, response: httpx.Response, what: str, limit: int | None = None) -> bytes:
        """The whole body, counted; raises on an oversized or truncated body."""
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            self.stats.bytes_received += len(chunk)
            if limit is not None and size > limit:
                raise RegistryProtocolError(f"{what}: answer larger than {limit} bytes")
            chunks.append(chunk)
        _check_length(response, size, what)
        return b"".join(chunks)

    async def _stream_to_file(
        self,
        response: httpx.Response,
        out: IO[bytes],
        digest: Digest,
        progress: _Progress,
        what: str,
    ) -> int:
        writer = DigestingWriter(digest.algorithm)
        async for chunk in response.aiter_bytes(_STREAM_CHUNK_BYTES):
            # A blocking write of <= 1 MiB to local disk costs less than a thread hop.
            _write(out, chunk, what)
            writer.update(chunk)
            self.stats.bytes_received += len(chunk)
            progress.reached(writer.size_bytes)
        _check_length(response, writer.size_bytes, what)
        writer.check(digest, what)
        return writer.size_bytes

    async def _slice_whole_blob(
        self, response: httpx.Response, digest: Digest, ranges: Sequence[ByteRange], what: str
    ) -> list[bytes]:
        """Keep the wanted bytes of a whole-blob answer, verifying all of it.

        With ``config.whole_blob_dir`` set, the whole blob is kept there too (as
        ``sha256/<hex>``, renamed into place only once verified): a pull-through proxy answers
        a first Range request with the whole blob, and that transfer should not be wasted.
        """
        writer = DigestingWriter(digest.algorithm)
        pieces = [bytearray() for _ in ranges]
        with _BlobKeeper(self.config.whole_blob_dir, digest) as keeper:
            async for chunk in response.aiter_bytes(_STREAM_CHUNK_BYTES):
                _collect_overlaps(chunk, writer.size_bytes, ranges, pieces)
                writer.update(chunk)
                keeper.write(chunk)
                self.stats.bytes_received += len(chunk)
            _check_length(response, writer.size_bytes, what)
            writer.check(digest, what)
            keeper.commit()
        if writer.size_bytes < max(r.end for r in ranges):
            raise RegistryProtocolError(f"{what}: blob has only {writer.size_bytes} bytes")
        return [bytes(piece) for piece in pieces]

    # ------------------------------------------------------------------ requests and retries

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run ``attempt``, retrying transient failures per RetryConfig."""
        policy = self.config.retry
        number = 1
        while True:
            try:
                return await attempt()
            except (TransientRegistryError, RegistryUnreachableError) as exc:
                if number >= policy.max_attempts:
                    raise
                delay = self._backoff_s(number, exc)
                self.stats.retries += 1
                log.info(
                    "%s; retry %d of %d in %.2f s", exc, number, policy.max_attempts - 1, delay
                )
                await anyio.sleep(delay)
                number += 1

    def _backoff_s(self, number: int, exc: Exception) -> float:
        if isinstance(exc, ThrottledError) and exc.retry_after_s is not None:
            return min(exc.retry_after_s, self.config.fetch_timeout_s)
        policy = self.config.retry
        ceiling = min(policy.max_backoff_s, policy.initial_backoff_s * 2 ** (number - 1))
        # "Equal jitter": at least half the backoff, so retries never collapse to zero.
        return random.uniform(ceiling / 2, ceiling)

    @asynccontextmanager
    async def _exchange(self, call: _Call) -> AsyncIterator[httpx.Response]:
        """Yield the streaming 2xx answer to ``call``; raise the lazyfs error for any other."""
        response = await self._authorized(call)
        try:
            if not response.is_success:
                await self._drain(response)
                raise status_error(response, call.what)
            yield response
        except httpx.HTTPError as exc:
            raise transport_error(exc, _origin(response.url), call.what) from exc
        finally:
            await response.aclose()

    async def _authorized(self, call: _Call) -> httpx.Response:
        """Send ``call`` with what auth knows; on a 401 answer the challenge and send once more."""
        registry = call.ref.registry
        sent = await self._auth.authorization(registry, call.scopes)
        response = await self._follow(call, sent)
        if response.status_code != 401:
            return response
        await self._discard(response, call.what)
        retry_with = await self._auth.answer_challenge(registry, call.scopes, response, sent)
        return await self._follow(call, retry_with)

    async def _follow(self, call: _Call, authorization: str | None) -> httpx.Response:
        """Send ``call``, following redirects; Authorization goes to the call's origin only."""
        method, url, content = call.method, call.url, call.content
        for hop in range(_MAX_REDIRECTS + 1):
            same_origin = _origin(url) == _origin(call.url) and url.scheme == call.url.scheme
            request = self._build(
                call, method, url, content, authorization if same_origin else None
            )
            response = await self._send(request, call.what)
            location = response.headers.get("Location")
            if (
                response.status_code not in _REDIRECT_STATUSES
                or not location
                or hop == _MAX_REDIRECTS
            ):
                return response
            await self._discard(response, call.what)
            url = response.url.join(location)
            if response.status_code == 303:
                method, content = "GET", None
        raise AssertionError("unreachable")

    def _build(
        self,
        call: _Call,
        method: str,
        url: httpx.URL,
        content: bytes | None,
        authorization: str | None,
    ) -> httpx.Request:
        # identity: byte ranges and digests are about the stored bytes, not an encoding of them.
        headers = {**call.headers, "Accept-Encoding": "identity"}
        if authorization is not None:
            headers["Authorization"] = authorization
        return self._http.build_request(method, url, headers=headers, content=content)

    async def _send(self, request: httpx.Request, what: str) -> httpx.Response:
        self.stats.requests[request.method] += 1
        try:
            return await self._http.send(request, stream=True)
        except httpx.ConnectError as exc:
            if not self._may_fall_back_to_http(request.url):
                raise transport_error(exc, _origin(request.url), what) from exc
        except httpx.HTTPError as exc:
            raise transport_error(exc, _origin(request.url), what) from exc
        # An insecure registry that does not speak TLS at all: plain HTTP, as docker and
        # skopeo do for insecure registries. Remembered for the rest of this client's life.
        log.info(
            "%s does not answer HTTPS; using plain HTTP (insecure registry)", _origin(request.url)
        )
        self._plain_http.add(_origin(request.url))
        request.url = request.url.copy_with(scheme="http")
        try:
            return await self._http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise transport_error(exc, _origin(request.url), what) from exc

    def _may_fall_back_to_http(self, url: httpx.URL) -> bool:
        return url.scheme == "https" and self._insecure(_origin(url))

    def _insecure(self, host: str) -> bool:
        return self.config.tls_verify is False or host in self.config.insecure_registries

    async def _send_and_read(self, request: httpx.Request) -> httpx.Response:
        """Send and read fully: the Authenticator's way to fetch tokens through this client."""
        what = f"token request to {_origin(request.url)}"
        response = await self._send(request, what)
        await self._discard(response, what)
        return response

    async def _drain(self, response: httpx.Response) -> None:
        """Read a (small) error or redirect body so it is counted and parseable."""
        await response.aread()
        self.stats.bytes_received += len(response.content)

    async def _discard(self, response: httpx.Response, what: str) -> None:
        try:
            await self._drain(response)
        except httpx.HTTPError as exc:
            raise transport_error(exc, _origin(response.url), what) from exc
        finally:
            await response.aclose()

    # -------------------------------------------------------------------------------- URLs

    def _url(self, ref: Reference, tail: str) -> httpx.URL:
        plain = ref.is_loopback and self.config.tls_verify is None
        scheme = "http" if plain or ref.api_host in self._plain_http else "https"
        return httpx.URL(f"{scheme}://{ref.api_host}/v2/{ref.repository}/{tail}")

    def _manifest_call(self, ref: Reference, method: str, accept: Sequence[str]) -> _Call:
        url = self._url(ref, f"manifests/{ref.selector}")
        headers = {"Accept": ", ".join(accept)}
        return _Call(ref, method, url, (pull_scope(ref.repository),), f"manifest {ref}", headers)

    def _blob_call(
        self,
        ref: Reference,
        method: str,
        digest: Digest,
        headers: Mapping[str, str] | None = None,
        what: str | None = None,
        scopes: Scopes | None = None,
    ) -> _Call:
        return _Call(
            ref,
            method,
            self._url(ref, f"blobs/{digest}"),
            scopes or (pull_scope(ref.repository),),
            what or f"blob {digest} in {ref.name}",
            headers or {},
        )


# ----------------------------------------------------------------------- transport and TLS


def _transport(config: RegistryConfig) -> httpx.AsyncHTTPTransport:
    return httpx.AsyncHTTPTransport(
        verify=_ssl_context(config),
        http1=True,
        http2=False,
        limits=httpx.Limits(max_connections=config.max_connections),
        # Without it, Nagle's algorithm meets delayed ACK and small requests stall ~40 ms.
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    )


def _http_client(config: RegistryConfig) -> httpx.AsyncClient:
    transport = _transport(config)
    # Insecure registries (a mirror marked insecure) get a transport that skips verification.
    insecure = _transport(replace(config, tls_verify=False))
    mounts = {f"https://{host}": insecure for host in sorted(config.insecure_registries)}
    timeout = httpx.Timeout(config.fetch_timeout_s, connect=config.connect_timeout_s)
    return httpx.AsyncClient(
        mounts=mounts,
        transport=transport,
        timeout=timeout,
        follow_redirects=False,  # done by hand so Authorization never leaves its origin
        trust_env=False,
        headers={"User-Agent": f"lazyfs/{__version__}"},
    )


def _ssl_context(config: RegistryConfig) -> ssl.SSLContext:
    """System CAs (OpenSSL honours SSL_CERT_FILE/SSL_CERT_DIR), plus ``cert_dir``."""
    if config.tls_verify is False:  # no CA store to load (it costs ~40 ms at every start)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = ssl.create_default_context()
    if config.cert_dir is not None:
        _load_cert_dir(context, config.cert_dir)
    return context


def _load_cert_dir(context: ssl.SSLContext, cert_dir: Path) -> None:
    """containers-certs.d layout: ``*.crt`` are CAs, ``NAME.cert`` + ``NAME.key`` a client pair."""
    try:
        for ca in sorted(cert_dir.glob("*.crt")):
            context.load_verify_locations(cafile=ca)
        for cert in sorted(cert_dir.glob("*.cert")):
            key = cert.with_suffix(".key")
            if not key.is_file():
                raise UsageError(f"client certificate {cert} has no matching {key.name}")
            context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load certificates from {cert_dir}: {exc}") from exc


# --------------------------------------------------------------------------- pure helpers


def _origin(url: httpx.URL) -> str:
    return f"{url.host}:{url.port}" if url.port is not None else url.host


def _check_length(response: httpx.Response, received: int, what: str) -> None:
    declared = response.headers.get("Content-Length")
    if declared is None or not declared.isdigit() or "Content-Encoding" in response.headers:
        return
    if int(declared) != received:
        raise TransientRegistryError(f"{what}: truncated answer, {received} of {declared} bytes")


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


def _slice_partial_answer(
    response: httpx.Response, body: bytes, ranges: Sequence[ByteRange], what: str
) -> list[bytes]:
    """Cut the requested ranges out of a 206 answer (multipart, or one covering part)."""
    if response.status_code != 206:
        raise RegistryProtocolError(
            f"{what}: unexpected HTTP {response.status_code} to a Range GET"
        )
    content_type = response.headers.get("Content-Type", "")
    if media_type_of(content_type) == "multipart/byteranges":
        parts = parse_multipart_byteranges(body, content_type)
    else:
        parts = [(_single_part_range(response, body, what), body)]
    return [_cut(parts, rng, what) for rng in ranges]


def _single_part_range(response: httpx.Response, body: bytes, what: str) -> ByteRange:
    header = response.headers.get("Content-Range")
    if header is None:
        raise RegistryProtocolError(f"{what}: 206 answer without Content-Range")
    received, _total = parse_content_range(header)
    if received.length != len(body):
        raise TransientRegistryError(f"{what}: {len(body)} bytes for Content-Range {header}")
    return received


def _cut(parts: Sequence[tuple[ByteRange, bytes]], rng: ByteRange, what: str) -> bytes:
    for part_range, data in parts:
        if part_range.start <= rng.start and rng.end <= part_range.end:
            return slice_ranges(data, part_range.start, [rng])[0]
    raise RegistryProtocolError(f"{what}: answer lacks bytes {rng.start}-{rng.end - 1}")


def _collect_overlaps(
    chunk: bytes, offset: int, ranges: Sequence[ByteRange], pieces: list[bytearray]
) -> None:
    """Append the parts of ``chunk`` (starting at blob ``offset``) that fall in each range."""
    chunk_end = offset + len(chunk)
    for rng, piece in zip(ranges, pieces, strict=True):
        start, end = max(rng.start, offset), min(rng.end, chunk_end)
        if start < end:
            piece += chunk[start - offset : end - offset]


# ------------------------------------------------------------------------- local file I/O


def _open_for_writing(path: Path) -> IO[bytes]:
    try:
        return path.open("wb")
    except OSError as exc:
        raise CacheError(f"cannot write {path}: {exc.strerror}") from exc


def _write(out: IO[bytes], chunk: bytes, what: str) -> None:
    try:
        out.write(chunk)
    except OSError as exc:
        raise CacheError(f"{what}: cannot write to disk: {exc.strerror}") from exc


def _rename(source: Path, dest: Path) -> None:
    try:
        os.replace(source, dest)
    except OSError as exc:
        raise CacheError(f"cannot rename {source} to {dest}: {exc.strerror}") from exc


def _open_for_reading(path: Path) -> IO[bytes]:
    try:
        return path.open("rb")
    except OSError as exc:
        raise LayoutError(f"cannot read {path}: {exc.strerror}") from exc


def _read_chunk(source: IO[bytes], path: Path, size: int) -> bytes:
    try:
        chunk = source.read(size)
    except OSError as exc:
        raise LayoutError(f"cannot read {path}: {exc.strerror}") from exc
    if len(chunk) != size:
        raise LayoutError(f"{path} is shorter than the size given for it")
    return chunk


def _read_exactly(path: Path, size: int) -> bytes:
    with _open_for_reading(path) as source:
        return _read_chunk(source, path, size)
