"""The one lazyfs exception tree.

Every module raises from this tree. Third-party exceptions (httpx, zstandard, json, OSError from
tools) are translated where they enter lazyfs, with ``raise X from exc``, so callers above the
boundary only ever see these classes. ``mount/fuseops.py`` maps them to errnos in one place and
the CLI prints ``str(exc)`` as a one-line error.

::

    LazyfsError
    ├── UsageError                 bad command-line input (exit 2)
    │   ├── InvalidReferenceError  an image reference docker would reject
    │   ├── ProfileError           an access profile file is unreadable or malformed
    │   ├── AuthFileError          an auth file (--authfile, auth.json, config.json) is
    │   │                          unreadable or malformed
    │   └── CertificateError       a certificate directory (--cert-dir, certs.d) is unusable
    ├── ImageError                 the image itself is unusable
    │   ├── UnsupportedMediaTypeError
    │   ├── ManifestError          malformed manifest/index/config, or no matching platform
    │   ├── TocError               malformed TOC, footer or tar stream
    │   └── IntegrityError         bytes do not match the digest that names them
    ├── RegistryError              talking to a registry failed
    │   ├── RegistryUnreachableError  connect/DNS/TLS failure (transient)
    │   ├── TransientRegistryError    5xx, 429, timeouts, truncated bodies (retried)
    │   ├── AuthError                 401/403 after the auth flow, or bad credentials
    │   ├── NotFoundError             manifest or blob unknown (404)
    │   └── RegistryProtocolError     an answer that breaks the distribution spec
    ├── LayoutError                an OCI image layout on disk is missing or malformed
    │   └── BundleError            a bundle or inventory is malformed, incomplete or forged
    ├── CacheError                 the local chunk cache failed
    ├── ServiceError               the mount service refused a request, or failed it
    │   └── ServiceUnavailableError   no service listens on the socket (or it cannot be opened)
    │       └── ServiceNotListeningError  the connection itself failed: nothing listens there
    └── FetchDeadlineError         a read could not be satisfied within its deadline
"""

from __future__ import annotations


class LazyfsError(Exception):
    """Base of every error lazyfs raises on purpose."""


class UsageError(LazyfsError):
    """The user asked for something malformed."""


class InvalidReferenceError(UsageError):
    """An image reference that docker's parser would reject."""


class ProfileError(UsageError):
    """An access profile (``--prefetch``, ``--record-profile``) is unreadable or malformed."""


class AuthFileError(UsageError):
    """An auth file that exists but cannot be read or parsed, or a missing ``--authfile``.

    Not a RegistryError: failing over to another mirror would not make the file readable.
    """


class CertificateError(UsageError):
    """A certificate directory holds a file TLS cannot use, or a client certificate without
    its key (or a key without its certificate)."""


class ImageError(LazyfsError):
    """The image (manifest, config, layer) cannot be used."""


class UnsupportedMediaTypeError(ImageError):
    """A manifest or layer media type lazyfs does not handle."""


class ManifestError(ImageError):
    """A malformed manifest, index or config, or no manifest for the platform."""


class TocError(ImageError):
    """A malformed table of contents, footer or tar stream."""


class IntegrityError(ImageError):
    """Bytes do not match the digest that names them."""

    def __init__(self, what: str, expected: str, actual: str) -> None:
        super().__init__(f"{what}: digest mismatch: expected {expected}, got {actual}")
        self.what = what
        self.expected = expected
        self.actual = actual


class RegistryError(LazyfsError):
    """Talking to a registry failed."""


class RegistryUnreachableError(RegistryError):
    """The registry could not be reached at all (connect, DNS, TLS)."""


class TransientRegistryError(RegistryError):
    """A failure worth retrying: 5xx, 429, timeouts, truncated bodies."""


class AuthError(RegistryError):
    """Authentication or authorization failed."""


class NotFoundError(RegistryError):
    """The registry does not know the manifest or blob."""


class RegistryProtocolError(RegistryError):
    """The registry answered in a way the distribution spec does not allow."""


class LayoutError(LazyfsError):
    """An OCI image layout on disk is missing or malformed."""


class BundleError(LayoutError):
    """A bundle or an inventory is malformed, incomplete, or does not match its digests."""


class CacheError(LazyfsError):
    """The local chunk cache failed."""


class PinTooLargeError(CacheError):
    """``lazyfs pin``: pinned data would leave the cache's bound no room; nothing was pinned."""


class ServiceError(LazyfsError):
    """The mount service (``lazyfs serve``) could not do what a client asked."""


class ServiceUnavailableError(ServiceError):
    """No service answers on the control socket, or the socket cannot be opened."""


class ServiceNotListeningError(ServiceUnavailableError):
    """The connection to the control socket failed: no service listens there (a client may
    start one), as opposed to one that is stopping or lost the connection."""


class FetchDeadlineError(LazyfsError):
    """A read could not be satisfied within its deadline."""
