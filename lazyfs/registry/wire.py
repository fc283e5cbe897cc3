"""HTTP-level translation: httpx failures and registry error answers into lazyfs errors.

This is the boundary where httpx exceptions stop; everything above it sees lazyfs/errors.py
classes only. Messages are one line and start with what was being fetched.
"""

from __future__ import annotations

import email.utils
import errno
import json
import ssl
import time
from typing import Any

import httpx

from lazyfs.errors import (
    AuthError,
    NotFoundError,
    RegistryError,
    RegistryProtocolError,
    RegistryUnreachableError,
    TransientRegistryError,
    UnsupportedMediaTypeError,
)

_NOT_FOUND_CODES = frozenset({"MANIFEST_UNKNOWN", "BLOB_UNKNOWN", "NAME_UNKNOWN"})
_AUTH_CODES = frozenset({"UNAUTHORIZED", "DENIED"})
_TRANSIENT_STATUSES = frozenset({408, 429})
_MAX_MESSAGE_CHARS = 200


# What OpenSSL reports when the first record it reads is no TLS record: a plain HTTP answer
# ("HTTP/1.1 400 ..."), among other things (OpenSSL 3.0: WRONG_VERSION_NUMBER; later versions:
# RECORD_LAYER_FAILURE or PACKET_LENGTH_TOO_LONG). The transport then checks for plain HTTP.
_NOT_TLS_REASONS = frozenset(
    {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"}
)


class ThrottledError(TransientRegistryError):
    """A transient answer that said how long to wait (``Retry-After``)."""

    def __init__(self, message: str, retry_after_s: float | None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ConnectionRefusedRegistryError(RegistryUnreachableError):
    """Nothing listens at the registry's address: the retry policy (client.py) gives it one
    immediate retry, not a backoff, when the caller has a cached answer to fall back to."""


class RangeNotSatisfiableError(RegistryProtocolError):
    """HTTP 416 to a Range GET: some servers answer so to several ranges in one request."""


def answered_not_tls(exc: BaseException) -> bool:
    """True if a TLS handshake failed because the server answered with something not TLS."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return False
        if isinstance(seen, ssl.SSLError) and seen.reason in _NOT_TLS_REASONS:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def plain_http_error(host: str, what: str) -> RegistryError:
    """The error for a registry that speaks plain HTTP where HTTPS was expected: not
    "unreachable" (it answered), not transient, and worded as skopeo and docker word it."""
    return RegistryError(
        f"{what}: http: server gave HTTP response to HTTPS client ({host}; use "
        "--tls-verify=false, or list it as an insecure registry, to speak plain HTTP to it)"
    )


def url_origin(url: httpx.URL) -> str:
    """``host:port``, or ``host`` for the scheme's default port: how registries are named."""
    return f"{url.host}:{url.port}" if url.port is not None else url.host


def one_line(text: str) -> str:
    """Collapse whitespace and cap the length: registry messages end up in one-line errors."""
    collapsed = " ".join(text.split())
    if len(collapsed) > _MAX_MESSAGE_CHARS:
        return collapsed[: _MAX_MESSAGE_CHARS - 1] + "…"
    return collapsed


def transport_error(exc: httpx.HTTPError, host: str, what: str) -> RegistryError:
    """Translate an httpx failure (no HTTP answer, or a broken one) for ``what`` on ``host``."""
    detail = _innermost_detail(exc)
    if _caused_by(exc, ssl.SSLCertVerificationError):
        # Not transient and not "offline": retrying or falling back to the cache would hide it.
        return RegistryError(
            f"{what}: TLS verification failed for {host}: {detail} "
            "(put its CA in /etc/containers/certs.d/HOST/ or give --cert-dir, "
            "or use --tls-verify=false)"
        )
    if isinstance(exc, httpx.ConnectError) and _refused(exc):
        return ConnectionRefusedRegistryError(f"{what}: cannot reach registry {host}: {detail}")
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return RegistryUnreachableError(f"{what}: cannot reach registry {host}: {detail}")
    if isinstance(exc, httpx.TimeoutException):
        return TransientRegistryError(f"{what}: {host} timed out ({type(exc).__name__})")
    if isinstance(exc, httpx.NetworkError | httpx.RemoteProtocolError):
        return TransientRegistryError(f"{what}: connection to {host} broke: {detail}")
    return RegistryProtocolError(f"{what}: bad exchange with {host}: {detail}")


def _refused(exc: BaseException) -> bool:
    """Whether every connection attempt behind ``exc`` was refused (ECONNREFUSED); trio
    groups the attempts of a host with several addresses."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_refused(inner) for inner in exc.exceptions)
    if isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED:
        return True
    cause = exc.__cause__ or exc.__context__
    return cause is not None and _refused(cause)


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _innermost_detail(exc: BaseException) -> str:
    """The most specific message in the cause chain: httpx often wraps an empty-message
    error around the one that says what happened (refused, TLS verification, DNS)."""
    detail = type(exc).__name__
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, BaseExceptionGroup):
            # trio groups per-address connect failures; the first says enough.
            current = current.exceptions[0]
            continue
        if str(current).strip():
            detail = one_line(str(current))
        current = current.__cause__ or current.__context__
    return detail


def error_code_and_message(body: bytes) -> tuple[str | None, str | None]:
    """``errors[0].code`` and ``.message`` of a distribution error body, if it has them."""
    try:
        document: Any = json.loads(body)
        first = document["errors"][0]
        code, message = first.get("code"), first.get("message")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None, None
    return (
        code if isinstance(code, str) else None,
        message if isinstance(message, str) else None,
    )


def status_error(response: httpx.Response, what: str) -> RegistryError | UnsupportedMediaTypeError:
    """The lazyfs error for a non-success answer whose body has been read."""
    status = response.status_code
    code, message = error_code_and_message(response.content)
    reason = one_line(message or response.reason_phrase or "error")
    text = f"{what}: {reason} ({code + ', ' if code else ''}HTTP {status})"
    if status in (401, 403) or code in _AUTH_CODES:
        return AuthError(text)
    if status == 404 or code in _NOT_FOUND_CODES:
        return NotFoundError(text)
    if status in _TRANSIENT_STATUSES or status >= 500 or code == "TOOMANYREQUESTS":
        return ThrottledError(text, retry_after_seconds(response.headers.get("Retry-After")))
    if status == 415:
        return UnsupportedMediaTypeError(text)
    if status == 416:
        return RangeNotSatisfiableError(text)
    return RegistryError(text)


def retry_after_seconds(value: str | None) -> float | None:
    """Parse ``Retry-After`` (delta seconds or an HTTP date) into seconds from now."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def media_type_of(content_type: str | None) -> str:
    """``type/subtype`` of a Content-Type value, lower-cased, without parameters."""
    return (content_type or "").partition(";")[0].strip().lower()
