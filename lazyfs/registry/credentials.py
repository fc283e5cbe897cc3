"""Registry credentials: ``--creds``, and the auth files podman, skopeo and docker use.

Auth files hold ``auths`` (inline, base64 ``user:password``), ``credHelpers`` and ``credsStore``
(run as ``docker-credential-NAME get``). No network and no httpx here: ``lazyfs mount`` as a
client looks its credentials up with this module, as the user it runs as, and sends them to
the service over the control socket. Secrets never reach logs, reprs or exception messages.

Files are searched in podman's order (``auth_file_paths``) until one knows the registry, as
containers/image's ``pkg/docker/config`` does: a default file that does not exist is skipped;
one that exists but cannot be read, or is not a JSON object of the expected shape, stops the
lookup with an AuthFileError naming it (one line, exit 2). An ``--authfile`` given on the
command line must exist and is read as soon as the source is made.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lazyfs.errors import AuthError, AuthFileError, UsageError
from lazyfs.model.record import Record

if TYPE_CHECKING:
    import logging
    import subprocess


def _log() -> logging.Logger:
    """logging is imported when something is logged: ``lazyfs mount`` looks credentials up at
    every start, and logging costs it ~9 ms."""
    import logging

    return logging.getLogger(__name__)


class Credentials(Record):
    """A user name and secret for one registry. ``repr`` never shows the secret. A record, not
    a dataclass: ``lazyfs mount`` imports this module at every start."""

    _FIELDS = ("username", "password")
    __slots__ = _FIELDS
    _REPR_HIDDEN = frozenset({"password"})
    username: str
    password: str

    def __init__(self, username: str, password: str) -> None:
        self._set("username", username)
        self._set("password", password)


_HELPER_TIMEOUT_S = 30.0
_HELPER_NOT_FOUND = "credentials not found"
# Docker Hub's names: helpers and config files key it by the legacy index URL.
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_DOCKER_HUB_SERVER_URL = "https://index.docker.io/v1/"
# A helper answering with this user name hands out an OAuth identity token instead.
_IDENTITY_TOKEN_USER = "<token>"


class CredentialSource(Protocol):
    """Finds the credentials for a registry (``docker.io``, ``host:port``); may block."""

    def lookup(self, registry: str) -> Credentials | None: ...


class StaticCredentials(Record):
    """The same credentials for every registry (``--creds``)."""

    _FIELDS = ("credentials",)
    __slots__ = _FIELDS
    credentials: Credentials

    def __init__(self, credentials: Credentials) -> None:
        self._set("credentials", credentials)

    def lookup(self, registry: str) -> Credentials | None:
        return self.credentials


def parse_creds(text: str) -> Credentials:
    """Parse ``--creds user[:password]``; a missing password is empty."""
    username, _, password = text.partition(":")
    if not username:
        raise UsageError("--creds needs a user name: USER[:PASSWORD]")
    return Credentials(username, password)


def auth_file_paths(authfile: Path | None, environ: Mapping[str, str]) -> list[Path]:
    """The auth files to search, in podman/skopeo order."""
    if authfile is not None:
        return [authfile]
    if environ.get("REGISTRY_AUTH_FILE"):
        return [Path(environ["REGISTRY_AUTH_FILE"])]
    home = Path(environ.get("HOME") or Path.home())
    paths = []
    if environ.get("XDG_RUNTIME_DIR"):
        paths.append(Path(environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    config_home = Path(environ.get("XDG_CONFIG_HOME") or home / ".config")
    paths.append(config_home / "containers" / "auth.json")
    docker_dir = (
        Path(environ["DOCKER_CONFIG"]) if environ.get("DOCKER_CONFIG") else home / ".docker"
    )
    paths.append(docker_dir / "config.json")
    return paths


class DockerConfigCredentials:
    """Credentials from ``--creds``, else from the first auth file that knows the registry."""

    def __init__(
        self,
        authfile: Path | None = None,
        *,
        creds: Credentials | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        if authfile is not None and _load_auth_file(authfile) is None:
            raise AuthFileError(f"auth file {authfile} does not exist")
        self._explicit = creds
        self._paths = auth_file_paths(authfile, os.environ if environ is None else environ)

    def __repr__(self) -> str:
        return (
            f"DockerConfigCredentials(paths={self._paths}, explicit={self._explicit is not None})"
        )

    def lookup(self, registry: str) -> Credentials | None:
        if self._explicit is not None:
            return self._explicit
        for path in self._paths:
            found = _lookup_in_file(path, registry)
            if found is not None:
                _log().debug("credentials for %s from %s", registry, path)
                return found
        return None


def _lookup_in_file(path: Path, registry: str) -> Credentials | None:
    config = _load_auth_file(path)
    if config is None:
        return None
    helper = _entry_for(config.get("credHelpers"), registry)
    if isinstance(helper, str) and helper:
        return run_credential_helper(helper, registry)
    inline = _inline_credentials(_entry_for(config.get("auths"), registry), path, registry)
    if inline is not None:
        return inline
    store = config.get("credsStore")
    if isinstance(store, str) and store:
        return run_credential_helper(store, registry)
    return None


def _load_auth_file(path: Path) -> dict[str, Any] | None:
    """The document in ``path``; None if there is no such file. Anything else that keeps it
    from being read is an AuthFileError: containers/image fails the same way ("reading JSON
    file ...") rather than pulling anonymously past a file it could not read."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuthFileError(f"reading JSON file {path}: {exc.strerror}") from exc
    try:
        document = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise AuthFileError(f"reading JSON file {path}: not UTF-8 text") from exc
    except json.JSONDecodeError as exc:  # its message quotes no part of the file
        raise AuthFileError(
            f"reading JSON file {path}: not valid JSON ({exc.msg}: line {exc.lineno} "
            f"column {exc.colno})"
        ) from exc
    return _checked_document(path, document)


def _checked_document(path: Path, document: Any) -> dict[str, Any]:
    """The shape Go's json.Unmarshal into containers/image's struct accepts: an object (or
    null), ``auths`` an object of objects, ``credHelpers`` an object of strings."""
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise AuthFileError(f"reading JSON file {path}: not a JSON object")
    auths, helpers = document.get("auths"), document.get("credHelpers")
    if auths is not None and not _object_of(auths, (dict, type(None))):
        raise AuthFileError(f'reading JSON file {path}: "auths" is not an object of objects')
    if helpers is not None and not _object_of(helpers, (str,)):
        raise AuthFileError(f'reading JSON file {path}: "credHelpers" is not an object of strings')
    return document


def _object_of(value: Any, kinds: tuple[type, ...]) -> bool:
    return isinstance(value, dict) and all(isinstance(v, kinds) for v in value.values())


def _normalize_registry(key: str) -> str:
    """``https://index.docker.io/v1/`` -> ``docker.io``; ``http://host:5000/`` -> ``host:5000``."""
    host = key.split("://", 1)[-1].split("/", 1)[0].lower()
    return "docker.io" if host in _DOCKER_HUB_ALIASES else host


def _entry_for(section: Any, registry: str) -> Any:
    if not isinstance(section, dict):
        return None
    wanted = _normalize_registry(registry)
    for key, value in section.items():
        if isinstance(key, str) and _normalize_registry(key) == wanted:
            return value
    return None


def _inline_credentials(entry: Any, path: Path, registry: str) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        return _decode_auth_field(encoded, path, registry)
    username, password = entry.get("username"), entry.get("password")
    if isinstance(username, str) and username and isinstance(password, str):
        return Credentials(username, password)
    return None


def _decode_auth_field(encoded: str, path: Path, registry: str) -> Credentials:
    import base64  # here: most starts of `lazyfs mount` find no inline auth entry
    import binascii

    try:
        decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise AuthError(f"auth file {path}: malformed auth entry for {registry}") from exc
    username, colon, password = decoded.partition(":")
    if not colon or not username:
        raise AuthError(f"auth file {path}: auth entry for {registry} is not user:password")
    return Credentials(username, password)


def helper_server_url(registry: str) -> str:
    """What to hand a credential helper: docker keys Docker Hub by its legacy index URL."""
    return _DOCKER_HUB_SERVER_URL if _normalize_registry(registry) == "docker.io" else registry


def run_credential_helper(name: str, registry: str) -> Credentials | None:
    """Run ``docker-credential-NAME get`` with the server on stdin; None if it has no entry."""
    import subprocess  # here: `lazyfs mount` rarely needs it, and it costs its start-up

    program = f"docker-credential-{name}"
    try:
        result = subprocess.run(
            [program, "get"],
            input=helper_server_url(registry).encode(),
            capture_output=True,
            timeout=_HELPER_TIMEOUT_S,
            check=False,
        )
    except FileNotFoundError as exc:
        raise AuthError(f"credential helper {program} not found on PATH") from exc
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AuthError(f"credential helper {program} failed to run for {registry}") from exc
    return _parse_helper_answer(program, registry, result)


def _parse_helper_answer(
    program: str, registry: str, result: subprocess.CompletedProcess[bytes]
) -> Credentials | None:
    # The helper's output may hold a secret, so it never goes into a message.
    if result.returncode != 0:
        if _HELPER_NOT_FOUND in (result.stdout + result.stderr).decode(errors="replace").lower():
            return None
        raise AuthError(
            f"credential helper {program} failed for {registry} (exit {result.returncode})"
        )
    try:
        answer = json.loads(result.stdout)
        username, secret = answer["Username"], answer["Secret"]
    except (ValueError, KeyError, TypeError) as exc:
        raise AuthError(
            f"credential helper {program} gave a malformed answer for {registry}"
        ) from exc
    if not isinstance(username, str) or not isinstance(secret, str):
        raise AuthError(f"credential helper {program} gave a malformed answer for {registry}")
    if username == _IDENTITY_TOKEN_USER:
        _log().warning(
            "%s: identity tokens from %s are not supported; going anonymous", registry, program
        )
        return None
    return Credentials(username, secret)
