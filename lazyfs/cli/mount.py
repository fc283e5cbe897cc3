"""``lazyfs mount``, ``lazyfs umount`` and ``lazyfs stats``: clients of the mount service.

``mount`` asks the service (lazyfs/service/, docs/service.md) to open the image and bind it at
the mountpoint; with no ``--socket`` (or ``LAZYFS_SOCKET``) it uses the service that owns its
cache directory, and starts one if none runs. It imports only what talking to the socket needs:
the service has paid for everything else once. Credentials are looked up here, as the user
who runs the command, and travel over the socket only.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lazyfs.cli.common import (
    add_registry_flags,
    parse_duration,
    parse_platform,
    parse_size,
    print_json,
    with_password,
)
from lazyfs.errors import ServiceNotListeningError, ServiceUnavailableError, UsageError
from lazyfs.model.reference import LAYOUT_PREFIX, Reference, split_layout_location
from lazyfs.mount import mountinfo
from lazyfs.service import client
from lazyfs.service.paths import default_cache_dir, sockets_for_cache

# The rest is imported where it is used: a mount through a running service needs none of it.
if TYPE_CHECKING:
    from lazyfs.registry.credentials import Credentials

SOCKET_ENV = "LAZYFS_SOCKET"
IDLE_EXIT_ENV = "LAZYFS_SERVICE_IDLE_EXIT_S"
DEFAULT_IDLE_EXIT_S = 5.0
_OPEN_ATTEMPTS = 3
LAZYFS_FSTYPE = "fuse.lazyfs"


def run_mount(args: argparse.Namespace) -> int:
    mountpoint = _check_mountpoint(args.mountpoint)
    if args.reference.startswith(LAYOUT_PREFIX):
        return _mount_layout(args, mountpoint)
    reference = Reference.parse(args.reference.removeprefix("docker://"))
    request = {
        "reference": str(reference),
        "mountpoint": str(mountpoint),
        "platform": str(args.platform) if args.platform else None,
        "tls_verify": args.tls_verify,
        "cert_dir": str(args.cert_dir.absolute()) if args.cert_dir else None,
        "mirrors": _read_text(args.config, "--config") if args.config else None,
        "read_timeout_s": args.read_timeout,
        "fill": args.fill,
        **_prefetch_arguments(args),
    }
    request["credentials"] = _credentials(args, reference, request["mirrors"])
    answer = _open(args, request)
    print(
        f"mounted {reference} at {mountpoint} (service pid {answer['pid']}, image "
        f"{answer['image'][:19]}{', offline' if answer.get('offline') else ''})",
        file=sys.stderr,
    )
    return 0


def _mount_layout(args: argparse.Namespace, mountpoint: Path) -> int:
    """``oci:PATH[:TAG]``: an image in an OCI layout on disk, read by the service (which
    verifies it as it does a registry's); no registry, mirrors or credentials."""
    path, tag = split_layout_location(args.reference)
    request = {
        "layout": str(Path(path).absolute()),
        "tag": tag,
        "mountpoint": str(mountpoint),
        "platform": str(args.platform) if args.platform else None,
        "read_timeout_s": args.read_timeout,
        "fill": args.fill,
        **_prefetch_arguments(args),
    }
    answer = _open(args, request)
    print(
        f"mounted {args.reference} at {mountpoint} (service pid {answer['pid']}, image "
        f"{answer['image'][:19]})",
        file=sys.stderr,
    )
    return 0


def _open(args: argparse.Namespace, request: dict[str, Any]) -> Any:
    """The open request, sent to the service; once more to a new one if that one was stopping
    (an on-demand service whose idle time ran out just then)."""
    explicit = _explicit_socket(args)
    if explicit is not None:
        return client.call(explicit, "open", **request)
    for attempt in range(_OPEN_ATTEMPTS):
        try:
            return _open_for_cache(args, request)
        except ServiceUnavailableError:
            if attempt == _OPEN_ATTEMPTS - 1:
                raise
            time.sleep(0.1)
    raise AssertionError("unreachable")


def _open_for_cache(args: argparse.Namespace, request: dict[str, Any]) -> Any:
    """The open, sent to the service that owns the cache, or to one started for it if none
    listens. Sent without asking first whether one listens: a refused connection says as much,
    and a running service (the usual case) then costs one round trip, not three."""
    cache_dir = args.cache_dir.absolute()
    for socket in sockets_for_cache(cache_dir):
        try:
            return client.call(socket, "open", **request)
        except ServiceNotListeningError:
            continue
    return client.call(_start_service(args, cache_dir), "open", **request)


def _explicit_socket(args: argparse.Namespace) -> Path | None:
    """--socket, else LAZYFS_SOCKET."""
    if args.socket:
        return Path(args.socket)
    return Path(os.environ[SOCKET_ENV]) if os.environ.get(SOCKET_ENV) else None


def _socket(args: argparse.Namespace) -> Path:
    """The service to talk to: --socket, LAZYFS_SOCKET, or the cache's (running or not)."""
    explicit = _explicit_socket(args)
    if explicit is not None:
        return explicit
    from lazyfs.service import launcher

    return launcher.socket_for_cache(args.cache_dir.absolute())


def _start_service(args: argparse.Namespace, cache_dir: Path) -> Path:
    """A service for the cache, started now; its socket."""
    from lazyfs.service import launcher

    settings = launcher.ServiceSettings(
        cache_dir,
        args.cache_size,
        args.service_idle_exit,
        args.verify_cache_reads,
        args.log_level,
    )
    socket, pid = launcher.start_service(settings)
    print(
        f"lazyfs: started a mount service for {cache_dir} (pid {pid}, socket {socket}); "
        f"it exits {settings.idle_exit_s:g} s after its last image is released",
        file=sys.stderr,
    )
    return socket


def _prefetch_arguments(args: argparse.Namespace) -> dict[str, Any]:
    if args.prefetch is not None and args.no_prefetch:
        raise UsageError("--prefetch and --no-prefetch exclude each other")
    record = args.record_profile.absolute() if args.record_profile else None
    if record is not None and not record.parent.is_dir():
        raise UsageError(f"--record-profile: directory {record.parent} does not exist")
    profile = None
    if args.prefetch is not None:
        from lazyfs.model.profiles import AccessProfile

        profile = json.loads(AccessProfile.load(args.prefetch).to_json())
    return {
        "prefetch": not args.no_prefetch,
        "profile": profile,
        "record_profile": str(record) if record else None,
    }


def _credentials(
    args: argparse.Namespace, reference: Reference, mirrors: str | None
) -> dict[str, list[str]]:
    """The credentials of every registry the request may use, looked up as this user."""
    from lazyfs.registry.credentials import DockerConfigCredentials, parse_creds

    explicit: Credentials | None = parse_creds(with_password(args.creds)) if args.creds else None
    source = DockerConfigCredentials(args.authfile, creds=explicit)
    registries = {reference.registry}
    if mirrors:
        from lazyfs.registry.mirrors import MirrorConfig

        config = MirrorConfig.loads(mirrors, "--config")
        registries |= {e.registry for e in config.endpoints(reference)}
    found = {}
    for registry in sorted(registries):
        credentials = source.lookup(registry)
        if credentials is not None:
            found[registry] = [credentials.username, credentials.password]
    return found


def _read_text(path: Path, flag: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{flag}: cannot read {path}: {exc}") from exc


def _check_mountpoint(path: Path) -> Path:
    """An existing directory, or a dead lazyfs mount (which the service replaces)."""
    resolved = Path(os.path.realpath(path))
    if _is_dead_lazyfs_mount(resolved):
        return resolved
    try:
        is_dir = resolved.is_dir()
    except OSError as exc:
        raise UsageError(f"mountpoint {path}: {exc.strerror}") from exc
    if not is_dir:
        raise UsageError(f"mountpoint {path} is not a directory")
    if mountinfo.is_mounted(resolved):
        raise UsageError(f"{path} is already a mountpoint")
    return resolved


def _lazyfs_mount_at(path: Path) -> bool:
    return any(e.mountpoint == path and e.fstype == LAZYFS_FSTYPE for e in mountinfo.mounts())


def _is_dead_lazyfs_mount(path: Path) -> bool:
    """statfs, not stat: the kernel answers stat from its cache even for a dead mount."""
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN and _lazyfs_mount_at(path)
    return False


def read_stats(mountpoint: Path) -> dict[str, Any]:
    from lazyfs.config import STATS_XATTR

    try:
        raw = os.getxattr(mountpoint, STATS_XATTR)
    except OSError as exc:
        raise UsageError(f"{mountpoint} is not a lazyfs mount ({exc.strerror})") from exc
    stats: dict[str, Any] = json.loads(raw)
    return stats


def run_umount(args: argparse.Namespace) -> int:
    mountpoint = Path(os.path.realpath(args.mountpoint))
    if not _lazyfs_mount_at(mountpoint):
        raise UsageError(f"{mountpoint} is not a lazyfs mount")
    if _is_dead_lazyfs_mount(mountpoint):
        _clear_dead_mount(mountpoint)
        return 0
    try:
        client.call(
            _owning_socket(args, mountpoint), "release", mountpoint=str(mountpoint), lazy=args.lazy
        )
    except ServiceUnavailableError:  # the service is gone: the mount is dead or dying
        _clear_dead_mount(mountpoint)
    return 0


def _owning_socket(args: argparse.Namespace, mountpoint: Path) -> Path:
    """--socket or LAZYFS_SOCKET, else the service whose pid the mount's stats name."""
    explicit = _explicit_socket(args)
    if explicit is not None:
        return explicit
    from lazyfs.service import launcher

    stats = read_stats(mountpoint)
    return Path(stats.get("socket") or launcher.socket_for_cache(args.cache_dir.absolute()))


def _clear_dead_mount(mountpoint: Path) -> None:
    from lazyfs.service import bindmounts

    bindmounts.unmount(mountpoint, lazy=True)
    print(f"lazyfs: cleared the dead mount at {mountpoint}", file=sys.stderr)


def run_stats(args: argparse.Namespace) -> int:
    if args.mountpoint is None:
        stats = client.call(_socket(args), "stats")
        stats.pop("ok", None)
    else:
        stats = read_stats(Path(os.path.realpath(args.mountpoint)))
    if args.json:
        print_json(stats)
        return 0
    for key, value in stats.items():
        if key not in ("layers", "image_list", "read_latency", "fetch_latency", "fill"):
            print(f"{key:<24} {value}")
    fill = stats.get("fill")
    if fill:
        print(
            f"{'fill':<24} {fill['state']} {fill['done_bytes']} / {fill['total_bytes']} bytes "
            f"({fill['percent']:.2f}%){', offline-safe' if fill['state'] == 'done' else ''}"
        )
    for layer in stats.get("layers", ()):
        kind = "lazy" if layer["lazy"] else "full"
        print(
            f"layer {layer['digest'][7:19]} {kind} {layer['bytes_fetched']:>12} / "
            f"{layer['size']:>12} bytes ({layer['fetched_percent']:.2f}%)"
        )
    for image in stats.get("image_list", ()):
        print(f"image {image['reference']} at {', '.join(image['mountpoints'])}")
    return 0


def _add_service_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("mount service")
    group.add_argument(
        "--socket",
        type=Path,
        help=f"the service's control socket (default: ${SOCKET_ENV}, "
        "else the service that owns --cache-dir)",
    )
    group.add_argument("--cache-dir", type=Path, default=default_cache_dir())


def add_parsers(commands: Any) -> None:
    mount = commands.add_parser("mount", help="mount an image lazily (read-only)")
    mount.add_argument(
        "reference", metavar="REF", help="[docker://]REFERENCE, or oci:PATH[:TAG] (an OCI layout)"
    )
    mount.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    _add_service_flags(mount)
    mount.add_argument(
        "--cache-size",
        type=parse_size,
        default=None,
        help="for a service it starts (default: the bound stored with the cache; 10G if new)",
    )
    mount.add_argument(
        "--service-idle-exit",
        type=parse_duration,
        default=float(os.environ.get(IDLE_EXIT_ENV) or DEFAULT_IDLE_EXIT_S),
        metavar="SECONDS",
        help=f"a service it starts exits this long after its last image ({DEFAULT_IDLE_EXIT_S:g})",
    )
    mount.add_argument("--platform", type=parse_platform, help="os/arch[/variant] (default: host)")
    mount.add_argument(
        "--read-timeout", type=parse_duration, help="seconds before a read fails with EIO (120)"
    )
    mount.add_argument(
        "--verify-cache-reads", action="store_true", help="for a service it starts: re-hash reads"
    )
    mount.add_argument(
        "--config",
        type=Path,
        help="TOML file of registries and their mirrors (containers-registries.conf style)",
    )
    profiles = mount.add_argument_group("access profiles (prefetch at start)")
    profiles.add_argument(
        "--prefetch",
        type=Path,
        metavar="PROFILE",
        help="prefetch what this access profile reads (default: what the image's TOC ranks)",
    )
    profiles.add_argument(
        "--no-prefetch", action="store_true", help="fetch only what is read, never ahead"
    )
    profiles.add_argument(
        "--fill",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fetch the rest of the image in the background, below reads and at the "
        "service's --fill-rate, until it is offline-safe (default: the service's --fill)",
    )
    profiles.add_argument(
        "--record-profile",
        type=Path,
        metavar="PATH",
        help="write the reads of this mount, in order, to PATH at unmount",
    )
    add_registry_flags(mount, directional=False)
    mount.set_defaults(handler=run_mount)

    umount = commands.add_parser("umount", help="unmount a lazyfs mount (a dead one too)")
    umount.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    umount.add_argument("-z", "--lazy", action="store_true", help="lazy unmount (detach now)")
    _add_service_flags(umount)
    umount.set_defaults(handler=run_umount)

    stats = commands.add_parser("stats", help="show what a mount, or the service, has fetched")
    stats.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path, nargs="?")
    stats.add_argument("--json", action="store_true")
    _add_service_flags(stats)
    stats.set_defaults(handler=run_stats)
