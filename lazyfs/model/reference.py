"""Image references (``[registry[:port]/]repository[:tag][@digest]``), normalised as docker does.

The grammar is that of github.com/distribution/reference::

    reference   := name [":" tag] ["@" digest]
    name        := [registry "/"] path-component ["/" path-component]*
    registry    := (domain-name | "[" ipv6 "]") [":" port]
    path-component := [a-z0-9]+ (separator [a-z0-9]+)*    ; separator: . _ __ or dashes
    tag         := [\\w][\\w.-]{0,127}

Normalisation follows ``ParseNormalizedNamed``: the first path component names a registry only
when it is ``localhost``, contains ``.`` or ``:``, or has uppercase letters; otherwise the image
lives on Docker Hub (``docker.io``), where single-component repositories get ``library/``.

A pure leaf: no I/O. Light: ``lazyfs mount`` parses its reference with it, so it needs no
dataclasses (model/record.py), and Digest only for a reference that has one.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from lazyfs.errors import InvalidReferenceError, ManifestError
from lazyfs.model.record import Record

if TYPE_CHECKING:
    from lazyfs.model.digest import Digest

DOCKER_HUB = "docker.io"
DOCKER_HUB_API_HOST = "registry-1.docker.io"
DEFAULT_TAG = "latest"
# Current distribution/reference limits the repository path only; the registry is not counted.
MAX_REPOSITORY_LENGTH = 255

_LEGACY_DOCKER_HUB = "index.docker.io"
_OFFICIAL_PREFIX = "library/"

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|-+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_REPOSITORY_RE = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*")

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*"
_IPV6_LITERAL = r"\[[a-fA-F0-9:]+\]"
_REGISTRY_RE = re.compile(rf"(?:{_DOMAIN_NAME}|{_IPV6_LITERAL})(?::[0-9]+)?")

# Go's \w is ASCII-only, so spell the class out rather than rely on Python's Unicode \w.
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
# Checked before Digest.parse, whose "$" anchor would let a trailing newline through.
_DIGEST_SHAPE_RE = re.compile(r"[a-z0-9]+:[a-f0-9]+")
# A bare image ID; docker refuses it as a name because it is ambiguous with an ID lookup.
_IDENTIFIER_RE = re.compile(r"[a-f0-9]{64}")


class Reference(Record):
    """A fully qualified image reference; construct it with :meth:`parse`."""

    _FIELDS = ("registry", "repository", "tag", "digest")
    __slots__ = _FIELDS
    registry: str
    repository: str
    tag: str | None
    digest: Digest | None

    def __init__(
        self, registry: str, repository: str, tag: str | None = None, digest: Digest | None = None
    ) -> None:
        # Validate here too so that with_tag() and direct construction cannot build a bad ref.
        where = f"{registry}/{repository}"
        _check_registry(registry, where)
        _check_repository(repository, where)
        if tag is not None:
            _check_tag(tag, where)
        self._set("registry", registry)
        self._set("repository", repository)
        self._set("tag", tag)
        self._set("digest", digest)

    @classmethod
    def parse(cls, text: str) -> Reference:
        """Parse ``text`` as docker would, raising InvalidReferenceError if docker would not."""
        if not text:
            raise InvalidReferenceError("invalid reference: empty string")
        if _IDENTIFIER_RE.fullmatch(text):
            raise _invalid(text, "a 64-character hex string is an image ID, not a repository name")
        registry, remainder = _split_registry(text)
        name_and_tag, at_sign, digest_text = remainder.partition("@")
        repository, colon, tag = name_and_tag.partition(":")
        if colon and not tag:
            raise _invalid(text, "empty tag after ':'")
        if at_sign and not digest_text:
            raise _invalid(text, "empty digest after '@'")
        _check_registry(registry, text)
        _check_repository(repository, text)
        if colon:
            _check_tag(tag, text)
        digest = _parse_digest(digest_text, text) if at_sign else None
        return cls(registry, repository, tag if colon else None, digest)

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        if self.tag is None and self.digest is None:
            text += f":{DEFAULT_TAG}"
        return text

    @property
    def name(self) -> str:
        """``registry/repository`` without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def api_host(self) -> str:
        """The host[:port] that serves the distribution API for this registry."""
        return DOCKER_HUB_API_HOST if self.registry == DOCKER_HUB else self.registry

    @property
    def selector(self) -> str:
        """What to put after ``/manifests/``: the digest if pinned, else the tag."""
        if self.digest is not None:
            return str(self.digest)
        return self.tag if self.tag is not None else DEFAULT_TAG

    @property
    def is_loopback(self) -> bool:
        """True for localhost, 127.0.0.0/8 and ::1, with any port (plain HTTP is acceptable)."""
        host = _host_without_port(self.registry)
        if host.lower() == "localhost":
            return True
        import ipaddress  # here: the client parses references, and never asks this

        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def with_digest(self, digest: Digest | None) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)

    def with_tag(self, tag: str | None) -> Reference:
        return Reference(self.registry, self.repository, tag, self.digest)


LAYOUT_PREFIX = "oci:"


def split_layout_location(text: str) -> tuple[str, str | None]:
    """``oci:PATH[:TAG]`` -> (PATH, TAG or None), split at the first colon after ``oci:`` as
    containers/image splits it (a layout's tag names any one image of its index.json)."""
    path, _, tag = text.removeprefix(LAYOUT_PREFIX).partition(":")
    if not path:
        raise _invalid(text, "oci: needs a path")
    return path, tag or None


def _invalid(text: str, why: str) -> InvalidReferenceError:
    return InvalidReferenceError(f"invalid reference {text!r}: {why}")


def _split_registry(text: str) -> tuple[str, str]:
    """Split ``text`` into (registry, rest) following docker's splitDockerDomain."""
    first, slash, rest = text.partition("/")
    if not slash:
        return DOCKER_HUB, _OFFICIAL_PREFIX + text
    if first == _LEGACY_DOCKER_HUB:
        registry, remainder = DOCKER_HUB, rest
    elif _looks_like_registry(first):
        registry, remainder = first, rest
    else:
        registry, remainder = DOCKER_HUB, text
    if registry == DOCKER_HUB and "/" not in remainder:
        remainder = _OFFICIAL_PREFIX + remainder
    return registry, remainder


def _looks_like_registry(component: str) -> bool:
    # Uppercase is never valid in a repository, so docker reads such a component as a host.
    return (
        component == "localhost"
        or "." in component
        or ":" in component
        or component != component.lower()
    )


def _check_registry(registry: str, text: str) -> None:
    if not _REGISTRY_RE.fullmatch(registry):
        raise _invalid(text, f"invalid registry host {registry!r}")


def _check_repository(repository: str, text: str) -> None:
    if not _REPOSITORY_RE.fullmatch(repository):
        if _REPOSITORY_RE.fullmatch(repository.lower()):
            raise _invalid(text, f"repository name {repository!r} must be lowercase")
        raise _invalid(text, f"invalid repository name {repository!r}")
    if len(repository) > MAX_REPOSITORY_LENGTH:
        raise _invalid(
            text, f"repository name must not be more than {MAX_REPOSITORY_LENGTH} characters"
        )


def _check_tag(tag: str, text: str) -> None:
    if not _TAG_RE.fullmatch(tag):
        raise _invalid(text, f"invalid tag {tag!r}")


def _parse_digest(digest_text: str, text: str) -> Digest:
    from lazyfs.model.digest import Digest  # here: most references a client parses have none

    if not _DIGEST_SHAPE_RE.fullmatch(digest_text):
        raise _invalid(text, f"invalid digest {digest_text!r}")
    try:
        return Digest.parse(digest_text)
    except ManifestError as exc:
        raise _invalid(text, f"invalid digest {digest_text!r}") from exc


def _host_without_port(registry: str) -> str:
    if registry.startswith("["):
        return registry[1 : registry.index("]")]
    return registry.partition(":")[0]
