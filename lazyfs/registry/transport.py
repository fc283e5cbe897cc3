"""HTTP transport to registries: one request with auth and redirects, no retries.

``Transport`` owns the httpx.AsyncClient (HTTP/1.1, TCP_NODELAY), its TLS context (system CAs
plus ``--cert-dir``), the plain-HTTP fallback for insecure registries, the auth flow (auth.py)
and request counting. Redirects are followed by hand and never forward ``Authorization`` to
another origin (blob GETs often redirect to object storage). Every request asks for the
identity encoding. httpx exceptions raised while sending become lazyfs errors here (wire.py).
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx

from lazyfs import __version__
from lazyfs.config import RegistryConfig
from lazyfs.errors import UsageError
from lazyfs.model.reference import Reference
from lazyfs.registry.auth import Authenticator, Scopes
from lazyfs.registry.credentials import CredentialSource
from lazyfs.registry.wire import answered_not_tls, plain_http_error, status_error, transport_error

log = logging.getLogger(__name__)

_MAX_REDIRECTS = 5
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


@dataclass
class RegistryStats:
    """Plain counters: body bytes received, requests per method, retries."""

    bytes_received: int = 0
    requests: Counter[str] = field(default_factory=Counter)
    retries: int = 0


@dataclass(frozen=True)
class Call:
    """One logical request, before auth and redirects."""

    ref: Reference
    method: str
    url: httpx.URL
    scopes: Scopes
    what: str
    headers: Mapping[str, str] = field(default_factory=dict)
    content: bytes | None = None


class Transport:
    """Sends ``Call``s to any number of registries; counts requests in ``stats``."""

    def __init__(
        self,
        config: RegistryConfig,
        credentials: CredentialSource | None,
        stats: RegistryStats,
    ) -> None:
        self._config = config
        self.stats = stats
        self._http = _http_client(config)
        self.auth = Authenticator(self._send_and_read, credentials)
        self._plain_http: set[str] = set()  # insecure registries found to speak HTTP only

    async def aclose(self) -> None:
        await self._http.aclose()

    def url(self, ref: Reference, tail: str) -> httpx.URL:
        """``/v2/<repository>/<tail>`` on ``ref``'s registry, over HTTP where it must be."""
        plain = ref.is_loopback and self._config.tls_verify is None
        scheme = "http" if plain or ref.api_host in self._plain_http else "https"
        return httpx.URL(f"{scheme}://{ref.api_host}/v2/{ref.repository}/{tail}")

    @asynccontextmanager
    async def exchange(self, call: Call) -> AsyncIterator[httpx.Response]:
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

    # ------------------------------------------------------------------- auth and redirects

    async def _authorized(self, call: Call) -> httpx.Response:
        """Send ``call`` with what auth knows; on a 401 answer the challenge and send once more."""
        registry = call.ref.registry
        sent = await self.auth.authorization(registry, call.scopes)
        response = await self._follow(call, sent)
        if response.status_code != 401:
            return response
        await self._discard(response, call.what)
        retry_with = await self.auth.answer_challenge(registry, call.scopes, response, sent)
        return await self._follow(call, retry_with)

    async def _follow(self, call: Call, authorization: str | None) -> httpx.Response:
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
        call: Call,
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

    # ------------------------------------------------------------------------------ sending

    async def _send(self, request: httpx.Request, what: str) -> httpx.Response:
        self.stats.requests[request.method] += 1
        try:
            return await self._http.send(request, stream=True)
        except httpx.ConnectError as exc:
            if not self._may_fall_back_to_http(request.url):
                if answered_not_tls(exc) and await self._speaks_plain_http(request.url):
                    raise plain_http_error(_origin(request.url), what) from exc
                raise transport_error(exc, _origin(request.url), what) from exc
        except httpx.HTTPError as exc:
            raise transport_error(exc, _origin(request.url), what) from exc
        # An insecure registry that does not speak TLS at all: plain HTTP, as docker and
        # skopeo do for insecure registries. Remembered for the rest of this transport's life.
        log.info(
            "%s does not answer HTTPS; using plain HTTP (insecure registry)", _origin(request.url)
        )
        self._plain_http.add(_origin(request.url))
        request.url = request.url.copy_with(scheme="http")
        try:
            return await self._http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise transport_error(exc, _origin(request.url), what) from exc

    async def _speaks_plain_http(self, url: httpx.URL) -> bool:
        """Whether ``url``'s server answers plain HTTP, asked once a TLS handshake met no TLS:
        an unauthenticated ``GET /v2/`` (no credentials ever go out in the clear)."""
        probe = self._http.build_request(
            "GET", url.copy_with(scheme="http", path="/v2/", query=None)
        )
        self.stats.requests[probe.method] += 1
        try:
            response = await self._http.send(probe, stream=True)
        except httpx.HTTPError:
            return False
        await response.aclose()
        return True

    def _may_fall_back_to_http(self, url: httpx.URL) -> bool:
        return url.scheme == "https" and self._insecure(_origin(url))

    def _insecure(self, host: str) -> bool:
        return self._config.tls_verify is False or host in self._config.insecure_registries

    async def _send_and_read(self, request: httpx.Request) -> httpx.Response:
        """Send and read fully: the Authenticator's way to fetch tokens through this transport."""
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


def _origin(url: httpx.URL) -> str:
    return f"{url.host}:{url.port}" if url.port is not None else url.host


# ------------------------------------------------------------------------ httpx client and TLS


def _http_client(config: RegistryConfig) -> httpx.AsyncClient:
    transport = _connection_pool(config)
    # Insecure registries (a mirror marked insecure) get a pool that skips verification.
    insecure = _connection_pool(replace(config, tls_verify=False))
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


def _connection_pool(config: RegistryConfig) -> httpx.AsyncHTTPTransport:
    return httpx.AsyncHTTPTransport(
        verify=_ssl_context(config),
        http1=True,
        http2=False,
        limits=httpx.Limits(max_connections=config.max_connections),
        # Without it, Nagle's algorithm meets delayed ACK and small requests stall ~40 ms.
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
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
