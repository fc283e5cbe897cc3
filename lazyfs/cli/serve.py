"""``lazyfs serve``: the long-running mount service (lazyfs/service/, docs/service.md)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from lazyfs.cli.common import (
    add_registry_flags,
    credentials,
    parse_count,
    parse_duration,
    parse_platform,
    parse_size,
    registry_config,
    run_trio,
)
from lazyfs.config import CacheConfig, LimitsConfig, ResolverConfig
from lazyfs.service.paths import ServicePaths, default_cache_dir, run_base, run_dir_name

log = logging.getLogger("lazyfs")


def run_serve(args: argparse.Namespace) -> int:
    from lazyfs.service.server import serve_control  # heavy: see lazyfs/cli/common.py
    from lazyfs.service.service import Service, ServiceConfig
    from lazyfs.service.storehost import StoreSettings

    cache_dir = args.cache_dir.absolute()
    run_dir = (args.run_dir or run_base() / run_dir_name(cache_dir)).absolute()
    paths = ServicePaths.in_run_dir(
        run_dir, args.socket and args.socket.absolute(), args.root and args.root.absolute()
    )
    resolver = ResolverConfig()
    if args.max_fetches is not None:
        resolver = ResolverConfig(max_concurrent_fetches=args.max_fetches)
    registry = registry_config(args)
    store = None
    if args.store is not None:
        from dataclasses import replace

        from lazyfs.registry.mirrors import MirrorConfig

        mirrors = MirrorConfig.load(args.config) if args.config else MirrorConfig()
        registry = replace(registry, insecure_registries=mirrors.insecure_hosts())
        store = StoreSettings(args.store.absolute(), mirrors, args.platform)
    config = ServiceConfig(
        cache=CacheConfig(cache_dir, args.cache_size, args.verify_cache_reads),
        paths=paths,
        resolver=resolver,
        registry=registry,
        store=store,
        store_credentials=credentials(args) if store is not None else None,
        fill_by_default=args.fill,
        fill_rate_bytes_per_s=args.fill_rate,
        limits=_limits(args),
        socket_group=args.socket_group,
        metrics_addr=args.metrics_addr,
        idle_exit_s=args.idle_exit,
        allow_other=args.allow_other,
        lock_wait_s=args.lock_wait,
    )

    def ready() -> None:
        print(f"lazyfs: serving at {paths.root}, socket {paths.socket}", file=sys.stderr)

    _detach_stdin()

    async def main() -> int:
        if args.worker_threads is not None:
            import anyio.to_thread

            anyio.to_thread.current_default_thread_limiter().total_tokens = args.worker_threads
        await Service(config).run(ready, serve_control)
        return 0

    return run_trio(main)


def _detach_stdin() -> None:
    """A service reads nothing from its caller: stdin becomes /dev/null (as under systemd),
    so a long-running service never holds its caller's terminal or pipe open."""
    import os

    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
    except OSError as exc:
        log.warning("cannot detach stdin: %s", exc)


def parse_address(text: str) -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def _limits(args: argparse.Namespace) -> LimitsConfig:
    """The metadata bounds of each image (docs/reliability.md), the defaults unless given."""
    given = {
        "max_toc_bytes": args.max_toc_bytes,
        "max_image_toc_bytes": args.max_image_toc_bytes,
        "max_image_toc_entries": args.max_image_toc_entries,
    }
    return LimitsConfig(**{name: value for name, value in given.items() if value is not None})


def add_parsers(commands: Any) -> None:
    serve = commands.add_parser("serve", help="run the mount service that serves every image")
    serve.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    serve.add_argument(
        "--cache-size",
        type=parse_size,
        default=None,
        help="bound of all under --cache-dir, stored with it (default: the stored one; 10G)",
    )
    serve.add_argument(
        "--run-dir",
        type=Path,
        help=f"where socket, root and state live (default under {run_base()})",
    )
    serve.add_argument("--root", type=Path, help="the store root (default RUN_DIR/root)")
    serve.add_argument(
        "--socket", type=Path, help="the control socket (default RUN_DIR/control.sock)"
    )
    serve.add_argument("--socket-group", metavar="GROUP", help="make the socket 0660 for GROUP")
    serve.add_argument(
        "--metrics-addr", type=parse_address, metavar="HOST:PORT", help="Prometheus /metrics"
    )
    serve.add_argument(
        "--idle-exit",
        type=parse_duration,
        metavar="SECONDS",
        help="exit this long after the last image is released (default: serve until stopped)",
    )
    serve.add_argument(
        "--lock-wait",
        type=parse_duration,
        default=0.0,
        metavar="SECONDS",
        help="wait this long for a stopping service that owns the cache (default: fail at once)",
    )
    serve.add_argument("--max-fetches", type=_positive_int, help="range requests in flight (8)")
    serve.add_argument("--worker-threads", type=_positive_int, help="worker threads (40)")
    serve.add_argument(
        "--verify-cache-reads", action="store_true", help="re-hash chunks read from the cache"
    )
    serve.add_argument(
        "--fill",
        action="store_true",
        help="fetch the rest of every image after its mount (lazyfs mount --no-fill opts out)",
    )
    serve.add_argument(
        "--fill-rate",
        type=parse_size,
        metavar="BYTES",
        help="cap on the fill, in bytes per second over all images (e.g. 2M; default: none)",
    )
    limits = serve.add_argument_group("bounds on each image's metadata (docs/reliability.md)")
    defaults = LimitsConfig()
    limits.add_argument(
        "--max-toc-bytes",
        type=parse_size,
        metavar="SIZE",
        help=f"one layer's TOC, uncompressed (default {defaults.max_toc_bytes >> 20}M)",
    )
    limits.add_argument(
        "--max-image-toc-bytes",
        type=parse_size,
        metavar="SIZE",
        help=f"all TOCs of one image (default {defaults.max_image_toc_bytes >> 20}M)",
    )
    limits.add_argument(
        "--max-image-toc-entries",
        type=parse_count,
        metavar="N",
        help=f"entries of all TOCs of one image (default {defaults.max_image_toc_entries:,})",
    )
    serve.add_argument(
        "--allow-other",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="let every user read the mounts, file modes permitting (default: on)",
    )
    store = serve.add_argument_group(
        "additional layer store (podman, CRI-O: `lazyfs podman-config`, docs/service.md)"
    )
    store.add_argument(
        "--store", type=Path, metavar="DIR", help="expose podman's additional layer store at DIR"
    )
    store.add_argument(
        "--config", type=Path, help="TOML file of registries and their mirrors, for the store"
    )
    store.add_argument(
        "--platform", type=parse_platform, help="os/arch[/variant] of the store's images (host)"
    )
    add_registry_flags(serve, directional=False)
    serve.set_defaults(handler=run_serve)
