"""``lazyfs mount``, ``lazyfs umount`` and ``lazyfs stats``.

``mount`` without ``--foreground`` starts the daemon as a new session (a fresh interpreter, not
a fork, so no trio state is inherited) and waits on a pipe until the daemon says the mount is
ready, or why it failed; then it returns and the daemon keeps serving.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lazyfs.cache.layout import CacheLayout
from lazyfs.cli.common import (
    add_registry_flags,
    credentials,
    parse_platform,
    parse_size,
    print_json,
    registry_config,
    run_trio,
)
from lazyfs.config import STATS_XATTR, CacheConfig, ResolverConfig
from lazyfs.errors import LazyfsError, UsageError
from lazyfs.model.platform import Platform
from lazyfs.model.reference import Reference
from lazyfs.mount.mountinfo import is_mounted
from lazyfs.registry.mirrors import MirrorConfig

if TYPE_CHECKING:
    from lazyfs.model.profiles import AccessProfile
    from lazyfs.mount.session import MountService

log = logging.getLogger("lazyfs")

_READY = b"ready\n"
CREDS_ENV = "LAZYFS_MOUNT_CREDS"
_MOUNT_TIMEOUT_S = 300.0
_UMOUNT_WAIT_S = 30.0


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lazyfs"


def run_mount(args: argparse.Namespace) -> int:
    if args.creds is None:  # a daemon started by `lazyfs mount` gets them this way
        args.creds = os.environ.pop(CREDS_ENV, None)
    mountpoint = _check_mountpoint(args.mountpoint)
    reference = Reference.parse(args.reference)
    profile = _prefetch_profile(args)  # in the front end too, to fail before daemonising
    if not args.foreground:
        return _start_daemon(args, mountpoint)
    from lazyfs.mount.session import MountOptions, MountService, PrefetchOptions  # see common.py

    mirrors = MirrorConfig.load(args.config) if args.config else MirrorConfig()
    options = MountOptions(
        reference=reference,
        mountpoint=mountpoint,
        cache=CacheConfig(args.cache_dir, args.cache_size, args.verify_cache_reads),
        platform=args.platform or Platform.host(),
        registry=replace(registry_config(args), insecure_registries=mirrors.insecure_hosts()),
        mirrors=mirrors,
        resolver=ResolverConfig(read_deadline_s=args.read_timeout),
        allow_other=args.allow_other,
        prefetch=PrefetchOptions(not args.no_prefetch, profile, args.record_profile),
    )
    service = MountService(options, credentials(args))
    ready_fd: int | None = args.ready_fd
    try:
        return run_trio(lambda: _serve(service, ready_fd))
    except LazyfsError as exc:
        _tell_parent(ready_fd, f"error: {exc}\n".encode())
        raise


async def _serve(service: MountService, ready_fd: int | None) -> int:
    def ready() -> None:
        log.info("mounted")
        _tell_parent(ready_fd, _READY)

    await service.run(ready)
    return 0


def _prefetch_profile(args: argparse.Namespace) -> AccessProfile | None:
    if args.prefetch is not None and args.no_prefetch:
        raise UsageError("--prefetch and --no-prefetch exclude each other")
    record = args.record_profile
    if record is not None:
        args.record_profile = record = record.absolute()
        if not record.parent.is_dir():
            raise UsageError(f"--record-profile: directory {record.parent} does not exist")
    if args.prefetch is None:
        return None
    from lazyfs.model.profiles import AccessProfile

    return AccessProfile.load(args.prefetch)


def _tell_parent(fd: int | None, message: bytes) -> None:
    if fd is None:
        return
    try:
        os.write(fd, message)
        os.close(fd)
    except OSError:
        pass  # the parent is gone or already told


def _check_mountpoint(path: Path) -> Path:
    resolved = path.resolve()
    if not resolved.is_dir():
        raise UsageError(f"mountpoint {path} is not a directory")
    if is_mounted(resolved):
        raise UsageError(f"{path} is already a mountpoint")
    return resolved


def _start_daemon(args: argparse.Namespace, mountpoint: Path) -> int:
    log_path = _log_path(args.cache_dir, mountpoint)
    read_fd, write_fd = os.pipe()
    argv = [
        sys.executable,
        "-m",
        "lazyfs",
        *_without_creds(args.raw_argv),
        "--foreground",
        "--ready-fd",
        str(write_fd),
    ]
    # Credentials go through the environment (readable by this user only), never the command
    # line, which every user can read in /proc for as long as the daemon runs.
    environment = dict(os.environ)
    if args.creds:
        environment[CREDS_ENV] = args.creds
    with log_path.open("ab") as log_file:
        daemon = subprocess.Popen(
            argv,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            pass_fds=(write_fd,),
            start_new_session=True,
        )
    os.close(write_fd)
    answer = _read_answer(read_fd)
    if answer == _READY:
        print(
            f"mounted {args.reference} at {mountpoint} (daemon pid {daemon.pid}, log {log_path})",
            file=sys.stderr,
        )
        return 0
    daemon.wait(timeout=10)
    message = answer.decode(errors="replace").strip().removeprefix("error: ")
    raise LazyfsError(
        message or f"the mount daemon exited with status {daemon.returncode}; see {log_path}"
    )


def _without_creds(argv: list[str]) -> list[str]:
    kept: list[str] = []
    skip_next = False
    for word in argv:
        if skip_next:
            skip_next = False
        elif word == "--creds":
            skip_next = True
        elif not word.startswith("--creds="):
            kept.append(word)
    return kept


def _read_answer(fd: int) -> bytes:
    deadline = time.monotonic() + _MOUNT_TIMEOUT_S
    answer = b""
    with os.fdopen(fd, "rb") as pipe:
        while time.monotonic() < deadline:
            data = pipe.read1(4096)
            if not data:
                break
            answer += data
            if answer.endswith(b"\n"):
                break
    return answer


def _log_path(cache_dir: Path, mountpoint: Path) -> Path:
    path = CacheLayout(cache_dir).mount_log(mountpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def read_stats(mountpoint: Path) -> dict[str, Any]:
    try:
        raw = os.getxattr(mountpoint, STATS_XATTR)
    except OSError as exc:
        raise UsageError(f"{mountpoint} is not a lazyfs mount ({exc.strerror})") from exc
    stats: dict[str, Any] = json.loads(raw)
    return stats


def run_umount(args: argparse.Namespace) -> int:
    mountpoint = args.mountpoint.resolve()
    pid = int(read_stats(mountpoint)["pid"])
    command = ["fusermount3", "-u", *(["-z"] if args.lazy else []), str(mountpoint)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LazyfsError(
            f"cannot unmount {mountpoint}: {result.stderr.strip() or 'fusermount3 failed'}"
        )
    _wait_for_exit(pid)
    return 0


def _wait_for_exit(pid: int) -> None:
    deadline = time.monotonic() + _UMOUNT_WAIT_S
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise LazyfsError(f"unmounted, but daemon {pid} is still running after {_UMOUNT_WAIT_S} s")


def run_stats(args: argparse.Namespace) -> int:
    stats = read_stats(args.mountpoint.resolve())
    if args.json:
        print_json(stats)
        return 0
    for key, value in stats.items():
        if key != "layers":
            print(f"{key:<24} {value}")
    for layer in stats["layers"]:
        kind = "lazy" if layer["lazy"] else "full"
        print(
            f"layer {layer['digest'][7:19]} {kind} {layer['bytes_fetched']:>12} / "
            f"{layer['size']:>12} bytes ({layer['fetched_percent']:.2f}%)"
        )
    return 0


def add_parsers(commands: Any) -> None:
    mount = commands.add_parser("mount", help="mount an image lazily (read-only)")
    mount.add_argument("reference", metavar="REF")
    mount.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    mount.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    mount.add_argument("--cache-size", type=parse_size, default=10 << 30, help="e.g. 10G (default)")
    mount.add_argument("--platform", type=parse_platform, help="os/arch[/variant] (default: host)")
    mount.add_argument("--allow-other", action="store_true", help="let other users read the mount")
    mount.add_argument(
        "--foreground", action="store_true", help="stay attached; serve until unmounted"
    )
    mount.add_argument(
        "--read-timeout",
        type=float,
        default=ResolverConfig().read_deadline_s,
        help="seconds before a read fails with EIO",
    )
    mount.add_argument(
        "--verify-cache-reads", action="store_true", help="re-hash chunks read from the cache"
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
        "--record-profile",
        type=Path,
        metavar="PATH",
        help="write the reads of this mount, in order, to PATH at unmount",
    )
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    add_registry_flags(mount, directional=False)
    mount.set_defaults(handler=run_mount)

    umount = commands.add_parser("umount", help="unmount a lazyfs mount and stop its daemon")
    umount.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    umount.add_argument("-z", "--lazy", action="store_true", help="lazy unmount (detach now)")
    umount.set_defaults(handler=run_umount)

    stats = commands.add_parser("stats", help="show what a live mount has fetched")
    stats.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(handler=run_stats)
