"""TLS to registries: which certificates each registry's connections use, and their pools.

As containers/image does (``docker/docker_client.go`` ``dockerCertDir`` and
``pkg/tlsclientconfig``): registry ``HOST[:PORT]``, named as in the image reference
(``docker.io``, ``localhost:5000``), uses ``--cert-dir`` when it is given, for every registry
(as skopeo does); otherwise the first directory ``DIR/HOST[:PORT]`` that exists, ``DIR`` taken
in the order of ``RegistryConfig.per_host_cert_dirs`` (``~/.config/containers/certs.d``,
``/etc/containers/certs.d``, ``/etc/docker/certs.d``). In that directory ``*.crt`` files are CA
certificates added to the system's, and ``NAME.cert`` with ``NAME.key`` a client certificate.
A ``.cert`` without its ``.key``, a ``.key`` without its ``.cert``, or a file TLS cannot load is
a CertificateError naming the file. A directory that is missing or that this user may not read
counts as empty, as there.

``RegistryPools`` is the httpx transport under the client: each request goes to the connection
pool of its registry's certificates. The registry travels in ``request.extensions``, so
redirects (object storage) and token fetches use the registry's certificates, as they do with
containers/image's one ``http.Client`` per registry. Requests without it use their own origin's.
Each pool's ssl context is built once, in a worker thread: loading the system CAs costs ~40 ms.

A pool also has its proxy (proxy.py: HTTP_PROXY, HTTPS_PROXY, NO_PROXY, Go's rules), chosen per
request URL, so registry requests, token requests and redirects each go through the proxy their
own URL calls for; an HTTPS request through a proxy is tunnelled (CONNECT), with the registry's
certificates end to end.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
from collections.abc import Mapping
from pathlib import Path

import anyio.to_thread
import httpx

from lazyfs.config import RegistryConfig
from lazyfs.errors import CertificateError
from lazyfs.model.traffic import is_background
from lazyfs.registry.lanes import BackgroundLane
from lazyfs.registry.proxy import ProxyRules
from lazyfs.registry.wire import url_origin

log = logging.getLogger(__name__)

# The ``request.extensions`` key naming the registry a request is made for.
REGISTRY_EXTENSION = "lazyfs.registry"

# A pool per (certificate directory, verify, proxy, background): registries without a directory
# share one; the background fill has pools of its own (lanes.py).
_PoolKey = tuple[Path | None, bool, str | None, bool]


class RegistryPools(httpx.AsyncBaseTransport):
    """Routes each request to the connection pool of its registry's TLS setup."""

    def __init__(
        self,
        config: RegistryConfig,
        local: Mapping[str, httpx.AsyncBaseTransport] | None = None,
        lane: BackgroundLane | None = None,
    ) -> None:
        self._config = config
        self.lane = lane if lane is not None else BackgroundLane()
        # Registries answered in this process (an OCI layout on disk: layoutregistry.py),
        # by host name; no socket, proxy or certificate is involved.
        self._local = local if local is not None else {}
        self._dirs: dict[str, Path | None] = {}
        self._pools: dict[_PoolKey, httpx.AsyncHTTPTransport] = {}
        # Built now, so that a bad proxy variable or --cert-dir fails before any request.
        self._proxies = ProxyRules(config.proxy)
        self._default = (config.cert_dir, config.tls_verify is not False)
        self._pool((*self._default, None, False))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        local = self._local.get(url_origin(request.url))
        if local is not None:
            return await local.handle_async_request(request)
        background = is_background()
        if background:
            await self.lane.yield_to_foreground()
        proxy = self._proxies.for_url(request.url)
        via = str(proxy) if proxy is not None else None
        if request.url.scheme == "https":
            pool = await self._pool_for(request, via, background)
        else:
            pool = await self._built((*self._default, via, background))
        response = await pool.handle_async_request(request)
        return self.lane.answer(response) if background else response

    async def aclose(self) -> None:
        for pool in list(self._pools.values()):
            await pool.aclose()

    async def _pool_for(
        self, request: httpx.Request, via: str | None, background: bool
    ) -> httpx.AsyncHTTPTransport:
        origin = url_origin(request.url)
        registry = str(request.extensions.get(REGISTRY_EXTENSION, origin))
        verify = self._config.tls_verify is not False and (
            origin not in self._config.insecure_registries
        )
        if registry not in self._dirs:
            found = await anyio.to_thread.run_sync(cert_dir_for, self._config, registry)
            self._dirs[registry] = found
        return await self._built((self._dirs[registry], verify, via, background))

    async def _built(self, key: _PoolKey) -> httpx.AsyncHTTPTransport:
        pool = self._pools.get(key)
        if pool is None:
            pool = await anyio.to_thread.run_sync(self._pool, key)
        return pool

    def _pool(self, key: _PoolKey) -> httpx.AsyncHTTPTransport:
        directory, verify, via, _background = key
        pool = _connection_pool(self._config, ssl_context(directory, verify=verify), via)
        return self._pools.setdefault(key, pool)  # another task may have built one meanwhile


def _connection_pool(
    config: RegistryConfig, context: ssl.SSLContext, proxy: str | None
) -> httpx.AsyncHTTPTransport:
    return httpx.AsyncHTTPTransport(
        verify=context,
        proxy=proxy,
        http1=True,
        http2=False,
        limits=httpx.Limits(max_connections=config.max_connections),
        # Without it, Nagle's algorithm meets delayed ACK and small requests stall ~40 ms.
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    )


# ------------------------------------------------------------------- finding the directory


def cert_dir_for(config: RegistryConfig, registry: str) -> Path | None:
    """``--cert-dir``, else the first existing per-host directory of ``registry``, else None."""
    if config.cert_dir is not None:
        return config.cert_dir
    for root in config.per_host_cert_dirs:
        candidate = root / registry
        if _exists(candidate):
            log.debug("certificates for %s from %s", registry, candidate)
            return candidate
    return None


def _exists(path: Path) -> bool:
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except PermissionError:
        log.debug("skipping %s: permission denied", path)
        return False
    except OSError as exc:
        raise CertificateError(f"certificate directory {path}: {exc.strerror}") from exc
    return True


# ----------------------------------------------------------------------------- the context


def ssl_context(directory: Path | None, *, verify: bool) -> ssl.SSLContext:
    """System CAs (OpenSSL honours SSL_CERT_FILE/SSL_CERT_DIR) and ``directory``'s files; or,
    without ``verify``, no CA at all (only the client certificates)."""
    if verify:
        context = ssl.create_default_context()
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if directory is not None:
        load_cert_dir(context, directory)
    return context


def load_cert_dir(context: ssl.SSLContext, directory: Path) -> None:
    """``*.crt`` are CAs, ``NAME.cert`` + ``NAME.key`` a client certificate."""
    names = _file_names(directory)
    for name in sorted(names):
        path = directory / name
        stem, _, suffix = name.rpartition(".")
        if suffix == "crt":
            _load_ca(context, path)
        elif suffix == "cert":
            if f"{stem}.key" not in names:
                raise CertificateError(
                    f"missing key {directory / (stem + '.key')} for client certificate {path} "
                    "(CA certificates end in .crt)"
                )
            _load_client_pair(context, path, directory / f"{stem}.key")
        elif suffix == "key" and f"{stem}.cert" not in names:
            raise CertificateError(
                f"missing client certificate {directory / (stem + '.cert')} for key {path}"
            )


def _file_names(directory: Path) -> frozenset[str]:
    try:
        return frozenset(entry.name for entry in os.scandir(directory))
    except FileNotFoundError:
        return frozenset()
    except PermissionError:
        log.debug("skipping %s: permission denied", directory)
        return frozenset()
    except OSError as exc:
        raise CertificateError(f"certificate directory {directory}: {exc.strerror}") from exc


def _load_ca(context: ssl.SSLContext, path: Path) -> None:
    try:
        context.load_verify_locations(cafile=path)
    except FileNotFoundError:
        return  # removed since the listing, as containers/image allows
    except (OSError, ssl.SSLError) as exc:
        raise CertificateError(f"cannot load certificates: CA file {path}: {_reason(exc)}") from exc


def _load_client_pair(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except (OSError, ssl.SSLError) as exc:
        raise CertificateError(
            f"cannot load certificates: client certificate {cert} with key {key}: {_reason(exc)}"
        ) from exc


def _no_password() -> bytes:
    # An encrypted key fails to load instead of OpenSSL prompting on the terminal.
    return b""


def _reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return exc.strerror or str(exc)
