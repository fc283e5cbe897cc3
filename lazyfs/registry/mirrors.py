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

Pulls try each mirror in order, then the origin. The longest matching prefix wins. As in
containers-registries.conf(5), ``blocked = true`` refuses pulls of matching references, and
``mirror-by-digest-only = true`` uses the mirrors only for references by digest (a mount reads
its blobs and pinned manifest by digest, so only the tag lookup skips them). Other keys and
tables (``unqualified-search-registries``, ``[aliases]``, ...) are not about mirrors and are
ignored; so is the v1 format (``[registries.search]``).

Where the rules come from (:func:`system_mirrors`, as podman reads them): the file
``$CONTAINERS_REGISTRIES_CONF`` names, alone; without it, ``~/.config/containers/
registries.conf`` if it exists, else ``/etc/containers/registries.conf``, then the drop-ins
``*.conf`` of ``/etc/containers/registries.conf.d`` and ``~/.config/containers/
registries.conf.d``, in name order. A missing file or directory is no error; an unreadable or
malformed one is a UsageError naming it. Each later source (a drop-in, then ``--config``)
replaces the rules of the same prefix and adds the others (:meth:`MirrorConfig.merged`).
A file is parsed again only when it changes (its mtime, ctime, size or inode), or if it
changed in the last two seconds.
"""

from __future__ import annotations

import os
import time
import tomllib
from collections.abc import Mapping
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
    blocked: bool = False
    mirror_by_digest_only: bool = False
    source: str = ""  # the file it came from, for messages

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
        if rule.blocked:
            raise UsageError(f"{ref}: registry {rule.prefix} is blocked in {rule.source}")
        mirrors = rule.mirrors if ref.digest is not None or not rule.mirror_by_digest_only else ()
        return [_rewrite(ref, rule.prefix, e.location) for e in (*mirrors, rule.origin)]

    def merged(self, later: MirrorConfig) -> MirrorConfig:
        """These rules with ``later``'s on top: a rule of the same prefix replaces one of
        these, the others are added (how drop-ins and ``--config`` combine)."""
        replaced = {rule.prefix for rule in later.rules}
        kept = tuple(rule for rule in self.rules if rule.prefix not in replaced)
        return MirrorConfig(kept + later.rules)

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
    origin = Endpoint(location, _flag(table, "insecure", path))
    return RegistryRule(
        _normalize(prefix),
        origin,
        tuple(_endpoint(m, path) for m in mirrors),
        blocked=_flag(table, "blocked", path),
        mirror_by_digest_only=_flag(table, "mirror-by-digest-only", path),
        source=path,
    )


def _endpoint(table: Any, path: str) -> Endpoint:
    if not isinstance(table, dict) or not _text(table, "location", path):
        raise UsageError(f"{path}: each [[registry.mirror]] needs a location")
    return Endpoint(_text(table, "location", path), _flag(table, "insecure", path))


def _flag(table: dict[str, Any], key: str, path: str) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise UsageError(f"{path}: {key} must be true or false")
    return value


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


# ---------------------------------------------------------------- the host's registries.conf

REGISTRIES_CONF_ENV = "CONTAINERS_REGISTRIES_CONF"
SYSTEM_REGISTRIES_CONF = Path("/etc/containers/registries.conf")


def system_mirrors(environ: Mapping[str, str] = os.environ) -> MirrorConfig:
    """The rules podman would use, from the files named in this module's docstring."""
    override = environ.get(REGISTRIES_CONF_ENV)
    if override:
        return _load_if_present(Path(override))
    home = environ.get("HOME")
    user_dir = Path(home) / ".config" / "containers" if home else None
    user_file = user_dir / "registries.conf" if user_dir is not None else None
    main = user_file if user_file is not None and _is_file(user_file) else SYSTEM_REGISTRIES_CONF
    config = _load_if_present(main)
    drop_in_dirs = [SYSTEM_REGISTRIES_CONF.with_suffix(".conf.d")]
    if user_dir is not None:
        drop_in_dirs.append(user_dir / "registries.conf.d")
    for directory in drop_in_dirs:
        for path in _drop_ins(directory):
            config = config.merged(_load_if_present(path))
    return config


# path -> (what stat said of it, its rules): the service reads the host's rules at every open,
# and parsing them (TOML) took ~6 % of a remount's service time. A file is read again as soon
# as its mtime, ctime, size or inode change; one changed in the last seconds is not kept at
# all, as timestamps are coarse (a second write of the same size in the same tick keeps them).
_PARSED: dict[Path, tuple[tuple[int, int, int, int], MirrorConfig]] = {}
_PARSED_MAX = 64
_SETTLED_NS = 2_000_000_000


def _load_if_present(path: Path) -> MirrorConfig:
    try:
        found = path.stat()
    except FileNotFoundError:
        return MirrorConfig()
    except OSError as exc:
        raise UsageError(f"cannot read registries config {path}: {_reason(exc)}") from exc
    signature = (found.st_mtime_ns, found.st_ctime_ns, found.st_size, found.st_ino)
    cached = _PARSED.get(path)
    if cached is not None and cached[0] == signature:
        return cached[1]
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return MirrorConfig()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read registries config {path}: {_reason(exc)}") from exc
    config = MirrorConfig.loads(text, str(path))
    if time.time_ns() - max(found.st_mtime_ns, found.st_ctime_ns) > _SETTLED_NS:
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        _PARSED[path] = (signature, config)  # stat before read: a change meanwhile re-reads it
    return config


def _drop_ins(directory: Path) -> list[Path]:
    try:
        names = sorted(entry.name for entry in os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise UsageError(f"cannot read registries config {directory}: {_reason(exc)}") from exc
    return [directory / name for name in names if name.endswith(".conf")]


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def _reason(exc: OSError | UnicodeDecodeError) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8"
    return exc.strerror or str(exc)


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
