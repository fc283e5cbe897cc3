"""Mirrors, configured the way containers-registries.conf(5) does it, in a TOML file.

::

    [[registry]]
    prefix = "docker.io/library"          # optional; defaults to location
    location = "registry.example:5000"    # where the origin really is (optional rewrite)
    insecure = false
    [[registry.mirror]]
    location = "edge-cache.local:5000"    # tried first
    insecure = true
    [[registry.mirror]]
    location = "regional-mirror.example"

Pulls try each mirror in order, then the origin. The longest matching prefix wins.
"""

from __future__ import annotations

import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lazyfs.errors import UsageError
from lazyfs.model.reference import Reference


@dataclass(frozen=True)
class Endpoint:
    location: str  # "host[:port][/path]"
    insecure: bool = False


@dataclass(frozen=True)
class RegistryRule:
    prefix: str
    origin: Endpoint
    mirrors: tuple[Endpoint, ...]

    def matches(self, name: str) -> bool:
        return name == self.prefix or name.startswith(self.prefix.rstrip("/") + "/")


@dataclass(frozen=True)
class MirrorConfig:
    rules: tuple[RegistryRule, ...] = ()

    @classmethod
    def load(cls, path: Path) -> MirrorConfig:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read config {path}: {exc}") from exc
        return cls.loads(text, str(path))

    @classmethod
    def loads(cls, text: str, source: str) -> MirrorConfig:
        """Parse the TOML ``text``; ``source`` names it in messages."""
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"cannot read config {source}: {exc}") from exc
        tables = document.get("registry", [])
        if not isinstance(tables, list):
            raise UsageError(f"{source}: [[registry]] must be an array of tables")
        return cls(tuple(_rule(table, source) for table in tables))

    def endpoints(self, ref: Reference) -> list[Reference]:
        """Where to pull ``ref`` from, in order: each mirror, then the origin."""
        rule = self._rule_for(ref.name)
        if rule is None:
            return [ref]
        return [_rewrite(ref, rule.prefix, e.location) for e in (*rule.mirrors, rule.origin)]

    def insecure_hosts(self) -> frozenset[str]:
        endpoints = [e for rule in self.rules for e in (*rule.mirrors, rule.origin)]
        return frozenset(e.location.split("/", 1)[0] for e in endpoints if e.insecure)

    def _rule_for(self, name: str) -> RegistryRule | None:
        matching = [rule for rule in self.rules if rule.matches(name)]
        return max(matching, key=lambda rule: len(rule.prefix), default=None)


def _rule(table: Any, path: str) -> RegistryRule:
    if not isinstance(table, dict):
        raise UsageError(f"{path}: each [[registry]] must be a table")
    location = _text(table, "location", path) or _text(table, "prefix", path)
    if not location:
        raise UsageError(f"{path}: a [[registry]] needs a location or a prefix")
    prefix = _text(table, "prefix", path) or location
    mirrors = table.get("mirror", [])
    if not isinstance(mirrors, list):
        raise UsageError(f"{path}: [[registry.mirror]] must be an array of tables")
    origin = Endpoint(location, bool(table.get("insecure", False)))
    return RegistryRule(_normalize(prefix), origin, tuple(_endpoint(m, path) for m in mirrors))


def _endpoint(table: Any, path: str) -> Endpoint:
    if not isinstance(table, dict) or not _text(table, "location", path):
        raise UsageError(f"{path}: each [[registry.mirror]] needs a location")
    return Endpoint(_text(table, "location", path), bool(table.get("insecure", False)))


def _text(table: dict[str, Any], key: str, path: str) -> str:
    value = table.get(key, "")
    if not isinstance(value, str):
        raise UsageError(f"{path}: {key} must be a string")
    return value


def _normalize(prefix: str) -> str:
    """``docker.io/ubuntu`` is ``docker.io/library/ubuntu``, as references are."""
    host, _, path = prefix.partition("/")
    if host == "index.docker.io":
        host = "docker.io"
    if host == "docker.io" and path and "/" not in path and path != "library":
        path = f"library/{path}"
    return f"{host}/{path}" if path else host


def _rewrite(ref: Reference, prefix: str, location: str) -> Reference:
    rest = ref.name[len(prefix) :].lstrip("/")
    name = f"{location.rstrip('/')}/{rest}" if rest else location
    rewritten = Reference.parse(name)
    return Reference(rewritten.registry, rewritten.repository, ref.tag, ref.digest)


class EndpointOrder:
    """The endpoints to try for a reference: mirrors, then the origin; ones that just failed
    go last for ``cooldown_s``, so a dead mirror costs one timeout, not one per request."""

    def __init__(self, config: MirrorConfig | None = None, cooldown_s: float = 30.0) -> None:
        self._config = config or MirrorConfig()
        self._cooldown_s = cooldown_s
        self._down_until: dict[str, float] = {}

    def __call__(self, ref: Reference) -> list[Reference]:
        now = time.monotonic()
        endpoints = self._config.endpoints(ref)
        return sorted(endpoints, key=lambda e: self._down_until.get(e.registry, 0.0) > now)

    def failed(self, endpoint: Reference) -> None:
        self._down_until[endpoint.registry] = time.monotonic() + self._cooldown_s
