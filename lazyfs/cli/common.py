"""Helpers shared by the command modules: argument types, registry flags, output.

Command modules import only light leaves at the top and the heavy parts (httpx, trio, pyfuse3,
the converter) when their command runs: ``lazyfs mount`` is a client of the mount service, and
every import it does not need costs its mount time.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from lazyfs.errors import UsageError

# Imported where used: `lazyfs mount` is a client whose start-up is its mount time.
if TYPE_CHECKING:
    from lazyfs.config import RegistryConfig
    from lazyfs.model.platform import Platform
    from lazyfs.registry.credentials import DockerConfigCredentials

T = TypeVar("T")


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_size(text: str) -> int:
    """Parse ``10G``, ``512M``, ``64KiB``, ``1000`` into bytes (binary units, as podman does)."""
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    cleaned = text.strip().lower().removesuffix("ib").removesuffix("b")
    number, unit = cleaned, ""
    if cleaned and cleaned[-1] in units:
        number, unit = cleaned[:-1], cleaned[-1]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"invalid size {text!r}") from None
    if not 0 < value < 1 << 63:  # refuses nan, inf and 1e400 too
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must be positive and finite")
    return int(value)


def parse_count(text: str) -> int:
    """A positive whole number (``1000000``)."""
    try:
        value = int(text.strip().replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: must be positive")
    return value


def parse_duration(text: str) -> float:
    """Seconds: a finite, positive number (``nan``, ``inf`` and ``-1`` are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}") from None
    if not 0 < value < 1e9:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: must be a positive, finite number of seconds"
        )
    return value


def parse_platform(text: str) -> Platform:
    from lazyfs.model.platform import Platform

    try:
        return Platform.parse(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_registry_flags(parser: argparse.ArgumentParser, *, directional: bool) -> None:
    group = parser.add_argument_group("registry access")
    group.add_argument("--creds", metavar="USER[:PASS]", help="credentials for the registry")
    group.add_argument(
        "--authfile",
        type=Path,
        help="path of a docker/containers auth file (default: REGISTRY_AUTH_FILE, else "
        "podman's and docker's files)",
    )
    group.add_argument(
        "--tls-verify",
        type=parse_bool,
        default=None,
        metavar="BOOL",
        help="verify TLS: --tls-verify, --tls-verify=false (default: true; loopback registries "
        "use plain HTTP)",
    )
    group.add_argument(
        "--cert-dir",
        type=Path,
        metavar="DIR",
        help="certificates for every registry: *.crt CAs, NAME.cert + NAME.key client "
        "certificates (default: each registry's certs.d/HOST[:PORT] directory)",
    )
    if directional:
        group.add_argument("--src-creds", metavar="USER[:PASS]", help="credentials for SRC")
        group.add_argument("--dest-creds", metavar="USER[:PASS]", help="credentials for DST")
        group.add_argument("--src-tls-verify", type=parse_bool, default=None, metavar="BOOL")
        group.add_argument("--dest-tls-verify", type=parse_bool, default=None, metavar="BOOL")


def registry_config(args: argparse.Namespace, direction: str | None = None) -> RegistryConfig:
    tls_verify = args.tls_verify
    directional = getattr(args, f"{direction}_tls_verify", None) if direction else None
    if directional is not None:
        tls_verify = directional
    from lazyfs.config import RegistryConfig

    return RegistryConfig(tls_verify=tls_verify, cert_dir=args.cert_dir)


def credentials(args: argparse.Namespace, direction: str | None = None) -> DockerConfigCredentials:
    from lazyfs.registry.credentials import DockerConfigCredentials, parse_creds

    creds = (getattr(args, f"{direction}_creds", None) if direction else None) or args.creds
    return DockerConfigCredentials(
        args.authfile, creds=parse_creds(with_password(creds)) if creds else None
    )


def with_password(creds: str) -> str:
    """``USER[:PASSWORD]``; with no password, ask for one on the terminal, as podman does."""
    if ":" in creds:
        return creds
    if not sys.stdin.isatty():
        raise UsageError(
            f"--creds {creds}: no password given, and no terminal to ask for one "
            "(use --creds USER:PASSWORD or --authfile)"
        )
    import getpass

    try:
        return f"{creds}:{getpass.getpass(f'Password for {creds}: ')}"
    except (EOFError, KeyboardInterrupt):
        raise UsageError("--creds: no password given") from None


def run_trio(main: Callable[[], Awaitable[T]]) -> T:
    """Run ``main`` under trio; what it returns (an exit status, or a command's result)."""
    import anyio  # see module docstring

    return anyio.run(main, backend="trio")


def print_json(obj: object) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")
