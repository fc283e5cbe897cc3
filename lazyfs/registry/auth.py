"""Registry credentials and the challenge/token auth flow.

Credentials come from ``--creds`` or from the auth files podman, skopeo and docker use
(``auths``, ``credHelpers``, ``credsStore``). The flow follows the docker token spec: a 401
carries ``WWW-Authenticate: Basic ...`` or ``Bearer realm=...,service=...,scope=...``; for Bearer
we GET the realm (with Basic credentials if we have any) and cache the token per host and scope.

Secrets never reach logs, reprs or exception messages.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread
import httpx

from lazyfs.errors import AuthError, RegistryError
from lazyfs.registry.credentials import Credentials, CredentialSource
from lazyfs.registry.tls import REGISTRY_EXTENSION
from lazyfs.registry.wire import status_error

log = logging.getLogger(__name__)

# The token spec's default lifetime when the answer has no expires_in.
DEFAULT_TOKEN_LIFETIME_S = 60.0
# Refresh a little early so a token does not expire between check and use.
_TOKEN_EXPIRY_MARGIN = 0.1
_CHALLENGE_PARAM_RE = re.compile(r'\s*([\w-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?')

Scopes = tuple[str, ...]
Send = Callable[[httpx.Request], Awaitable[httpx.Response]]


def pull_scope(repository: str) -> str:
    return f"repository:{repository}:pull"


def push_scope(repository: str) -> str:
    return f"repository:{repository}:pull,push"


def basic_authorization(credentials: Credentials) -> str:
    """The ``Authorization`` value for HTTP Basic."""
    pair = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


# --------------------------------------------------------------------------------- challenges


@dataclass(frozen=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: a lower-cased scheme and its parameters."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")

    @property
    def service(self) -> str | None:
        return self.params.get("service")

    @property
    def scope(self) -> str | None:
        return self.params.get("scope")


def parse_www_authenticate(value: str) -> list[Challenge]:
    """Parse ``Scheme k=v, k="v", Scheme2 ...`` into challenges (unknown syntax is skipped)."""
    challenges: list[Challenge] = []
    rest = value.strip()
    while rest:
        scheme, _, rest = rest.partition(" ")
        params, rest = _parse_challenge_params(rest)
        if scheme.strip(","):
            challenges.append(Challenge(scheme.strip(",").lower(), params))
    return challenges


def _parse_challenge_params(text: str) -> tuple[dict[str, str], str]:
    """Consume ``k=v`` pairs from ``text``; stop at the next scheme (a token without ``=``)."""
    params: dict[str, str] = {}
    pos = 0
    while (match := _CHALLENGE_PARAM_RE.match(text, pos)) is not None and match.end() > pos:
        key, raw = match.group(1).lower(), match.group(2)
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params[key] = raw
        pos = match.end()
    return params, text[pos:].lstrip(" ,")


# ------------------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class _CachedToken:
    authorization: str = field(repr=False)
    expires_at: float  # time.monotonic() deadline

    @property
    def fresh(self) -> bool:
        return time.monotonic() < self.expires_at


class Authenticator:
    """Chooses the ``Authorization`` for each request and answers 401 challenges.

    ``send`` performs one request and returns the fully read answer; it is the client's, so
    token fetches are counted and their transport errors translated like any other request.
    """

    def __init__(self, send: Send, credentials: CredentialSource | None) -> None:
        self._send = send
        self._source = credentials
        self._credentials: dict[str, Credentials | None] = {}
        self._basic_hosts: set[str] = set()
        self._tokens: dict[tuple[str, Scopes], _CachedToken] = {}
        self._bearer_challenges: dict[str, Challenge] = {}
        self._locks: dict[tuple[str, Scopes], anyio.Lock] = {}

    def __repr__(self) -> str:
        return f"Authenticator(tokens={len(self._tokens)}, basic_hosts={sorted(self._basic_hosts)})"

    async def authorization(self, registry: str, scopes: Scopes) -> str | None:
        """What to send before any challenge: a fresh cached token, or Basic if it was asked."""
        token = self._tokens.get((registry, scopes))
        if token is not None and token.fresh:
            return token.authorization
        challenge = self._bearer_challenges.get(registry)
        if challenge is not None:
            # A token realm we already know: fetch (or refresh) without a 401 round trip.
            return await self._bearer(registry, scopes, challenge, sent=None)
        if registry in self._basic_hosts:
            credentials = await self.credentials_for(registry)
            return basic_authorization(credentials) if credentials else None
        return None

    async def answer_challenge(
        self, registry: str, scopes: Scopes, response: httpx.Response, sent: str | None
    ) -> str:
        """The ``Authorization`` to retry with after ``response`` (a 401) to a request that
        carried ``sent``; raises AuthError when there is nothing new to try."""
        challenges = parse_www_authenticate(response.headers.get("WWW-Authenticate", ""))
        bearer = next((c for c in challenges if c.scheme == "bearer" and c.realm), None)
        if bearer is not None:
            # The scope named here belongs to that one request; ours are added per fetch.
            realm_only = {k: v for k, v in bearer.params.items() if k != "scope"}
            self._bearer_challenges[registry] = Challenge(bearer.scheme, realm_only)
            return await self._bearer(registry, scopes, bearer, sent)
        if any(c.scheme == "basic" for c in challenges):
            return await self._basic(registry)
        raise AuthError(f"{registry}: unauthorized, and no usable WWW-Authenticate challenge")

    async def credentials_for(self, registry: str) -> Credentials | None:
        if registry not in self._credentials:
            source = self._source
            found = (
                None if source is None else await anyio.to_thread.run_sync(source.lookup, registry)
            )
            self._credentials[registry] = found
        return self._credentials[registry]

    async def _basic(self, registry: str) -> str:
        credentials = await self.credentials_for(registry)
        if credentials is None:
            raise AuthError(f"{registry} requires credentials (use --creds or log in)")
        self._basic_hosts.add(registry)
        return basic_authorization(credentials)

    async def _bearer(
        self, registry: str, scopes: Scopes, challenge: Challenge, sent: str | None
    ) -> str:
        key = (registry, scopes)
        async with self._locks.setdefault(key, anyio.Lock()):
            cached = self._tokens.get(key)
            # Another task may have refreshed the token while this request was failing.
            if cached is not None and cached.fresh and cached.authorization != sent:
                return cached.authorization
            token = await self._fetch_token(registry, scopes, challenge)
            self._tokens[key] = token
            return token.authorization

    async def _fetch_token(
        self, registry: str, scopes: Scopes, challenge: Challenge
    ) -> _CachedToken:
        request = await self._token_request(registry, scopes, challenge)
        log.debug(
            "fetching a token for %s scope %s",
            registry,
            " ".join(request.url.params.get_list("scope")),
        )
        response = await self._send(request)
        what = f"token for {registry} from {request.url.host}"
        if response.status_code in (401, 403):
            refused = (
                "refused the credentials"
                if request.headers.get("Authorization")
                else "requires credentials (use --creds or log in)"
            )
            raise AuthError(f"{what}: the token service {refused} (HTTP {response.status_code})")
        if not response.is_success:
            raise status_error(response, what)
        return _token_from_answer(response.content, what)

    async def _token_request(
        self, registry: str, scopes: Scopes, challenge: Challenge
    ) -> httpx.Request:
        realm = challenge.realm or ""
        wanted = _merge_scopes(scopes, challenge.scope)
        params: list[tuple[str, str | int | float | bool | None]] = [
            ("scope", scope) for scope in wanted
        ]
        if challenge.service:
            params.insert(0, ("service", challenge.service))
        headers = {}
        credentials = await self.credentials_for(registry)
        if credentials is not None:
            params.append(("account", credentials.username))
            headers["Authorization"] = basic_authorization(credentials)
        try:
            return httpx.Request(
                "GET",
                httpx.URL(realm).copy_merge_params(params),
                headers=headers,
                extensions={REGISTRY_EXTENSION: registry},  # the registry's certificates
            )
        except (httpx.InvalidURL, httpx.UnsupportedProtocol, ValueError) as exc:
            raise RegistryError(f"{registry}: invalid token realm {realm!r}") from exc


def _merge_scopes(ours: Sequence[str], challenged: str | None) -> list[str]:
    """Our scopes plus what the registry named (it may want more than we guessed), with the
    actions for one resource merged: ``repository:a:pull`` joins ``repository:a:pull,push``."""
    actions_by_resource: dict[str, list[str]] = {}
    for scope in [*ours, *(challenged or "").split(" ")]:
        resource, colon, actions = scope.rpartition(":")
        if not colon or not resource:
            continue
        merged = actions_by_resource.setdefault(resource, [])
        merged.extend(a for a in actions.split(",") if a and a not in merged)
    return [f"{resource}:{','.join(actions)}" for resource, actions in actions_by_resource.items()]


def _token_from_answer(body: bytes, what: str) -> _CachedToken:
    try:
        answer: Any = json.loads(body)
        token = answer.get("token") or answer.get("access_token")
        lifetime = float(answer.get("expires_in") or DEFAULT_TOKEN_LIFETIME_S)
    except (ValueError, AttributeError, TypeError) as exc:
        raise AuthError(f"{what}: malformed token answer") from exc
    if not isinstance(token, str) or not token:
        raise AuthError(f"{what}: the answer holds no token")
    expires_at = time.monotonic() + lifetime * (1 - _TOKEN_EXPIRY_MARGIN)
    return _CachedToken(f"Bearer {token}", expires_at)
