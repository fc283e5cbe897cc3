"""HTTP transport to registries: one request with auth and redirects, no retries.

``Transport`` owns the httpx.AsyncClient (HTTP/1.1, TCP_NODELAY) over tls.py's pools (each
registry's certificates: ``--cert-dir`` or its ``certs.d`` directory), the plain-HTTP
fallback for insecure registries, the auth flow (auth.py) and request counting. Redirects are
followed by hand and never forward ``Authorization`` to another origin (blob GETs often
redirect to object storage). Every request asks for the identity encoding. httpx exceptions
raised while sending become lazyfs errors here (wire.py).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx

from lazyfs import __version__
from lazyfs.config import RegistryConfig
from lazyfs.model.reference import Reference
from lazyfs.model.traffic import is_background
from lazyfs.registry.auth import Authenticator, Scopes
from lazyfs.registry.credentials import CredentialSource
from lazyfs.registry.lanes import BackgroundLane
from lazyfs.registry.tls import REGISTRY_EXTENSION, RegistryPools
from lazyfs.registry.wire import (
    answered_not_tls,
    plain_http_error,
    status_error,
    transport_error,
    url_origin,
)

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
        local: Mapping[str, httpx.AsyncBaseTransport] | None = None,
        lane: BackgroundLane | None = None,
    ) -> None:
        self._config = config
        self.stats = stats
        # The fill below every foreground request (lanes.py), shared by the service's clients.
        self.lane = lane if lane is not None else BackgroundLane()
        self._http = _http_client(config, local, self.lane)
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
        """Yield the streaming 2xx answer to ``call``; raise the lazyfs error for any other.
        A foreground call holds the background lane from before it is sent until its answer
        is closed."""
        if is_background():
            async with self._exchange(call) as response:
                yield response
        else:
            async with self.lane.foreground(), self._exchange(call) as response:
                yield response

    @asynccontextmanager
    async def _exchange(self, call: Call) -> AsyncIterator[httpx.Response]:
        response = await self._authorized(call)
        try:
            if not response.is_success:
                await self._drain(response)
                raise status_error(response, call.what)
            yield response
        except httpx.HTTPError as exc:
            raise transport_error(exc, url_origin(response.url), call.what) from exc
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
            same_origin = url_origin(url) == url_origin(call.url) and url.scheme == call.url.scheme
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
        return self._http.build_request(
            method,
            url,
            headers=headers,
            content=content,
            extensions={REGISTRY_EXTENSION: call.ref.registry},  # its certificates (tls.py)
        )

    # ------------------------------------------------------------------------------ sending

    async def _send(self, request: httpx.Request, what: str) -> httpx.Response:
        self.stats.requests[request.method] += 1
        try:
            return await self._http.send(request, stream=True)
        except httpx.ConnectError as exc:
            if not self._may_fall_back_to_http(request.url):
                if answered_not_tls(exc) and await self._speaks_plain_http(request.url):
                    raise plain_http_error(url_origin(request.url), what) from exc
                raise transport_error(exc, url_origin(request.url), what) from exc
        except httpx.HTTPError as exc:
            raise transport_error(exc, url_origin(request.url), what) from exc
        # An insecure registry that does not speak TLS at all: plain HTTP, as docker and
        # skopeo do for insecure registries. Remembered for the rest of this transport's life.
        origin = url_origin(request.url)
        log.info("%s does not answer HTTPS; using plain HTTP (insecure registry)", origin)
        self._plain_http.add(origin)
        request.url = request.url.copy_with(scheme="http")
        try:
            return await self._http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise transport_error(exc, url_origin(request.url), what) from exc

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
        return url.scheme == "https" and self._insecure(url_origin(url))

    def _insecure(self, host: str) -> bool:
        return self._config.tls_verify is False or host in self._config.insecure_registries

    async def _send_and_read(self, request: httpx.Request) -> httpx.Response:
        """Send and read fully: the Authenticator's way to fetch tokens through this transport."""
        what = f"token request to {url_origin(request.url)}"
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
            raise transport_error(exc, url_origin(response.url), what) from exc
        finally:
            await response.aclose()


# ------------------------------------------------------------------------------ httpx client


def _http_client(
    config: RegistryConfig,
    local: Mapping[str, httpx.AsyncBaseTransport] | None,
    lane: BackgroundLane,
) -> httpx.AsyncClient:
    timeout = httpx.Timeout(config.fetch_timeout_s, connect=config.connect_timeout_s)
    return httpx.AsyncClient(
        # per registry: its certificates, or in process; the background lane's own pools
        transport=RegistryPools(config, local, lane),
        timeout=timeout,
        follow_redirects=False,  # done by hand so Authorization never leaves its origin
        trust_env=False,  # proxies: RegistryPools, by Go's rules (proxy.py), not httpx's
        headers={"User-Agent": f"lazyfs/{__version__}"},
    )
