"""``lazyfs bundle inventory|export|import``: carry images to nodes without a link
(lazyfs/bundle/, docs/bundles.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lazyfs.cli.common import (
    add_registry_flags,
    credentials,
    parse_platform,
    print_json,
    registry_config,
    run_trio,
)
from lazyfs.errors import UsageError
from lazyfs.service.paths import default_cache_dir


def add_parsers(commands: Any) -> None:
    parser = commands.add_parser("bundle", help="carry images to nodes without a link")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    inventory = actions.add_parser("inventory", help="list, by digest, the chunks this node has")
    inventory.add_argument("-o", "--output", type=Path, required=True, metavar="FILE")
    export = actions.add_parser("export", help="write a bundle of images for another node")
    export.add_argument("references", metavar="REF", nargs="+")
    export.add_argument("-o", "--output", type=Path, required=True, metavar="FILE|DIR")
    export.add_argument("--have", type=Path, metavar="INVENTORY", help="leave out what it lists")
    export.add_argument("--platform", type=parse_platform, help="of an index (default: host)")
    add_registry_flags(export, directional=False)
    load = actions.add_parser("import", help="verify a bundle, then admit it into the cache")
    load.add_argument("bundle", type=Path, metavar="FILE|DIR")
    for sub in (inventory, export, load):
        sub.add_argument("--cache-dir", type=Path, default=default_cache_dir())
        sub.add_argument("--json", action="store_true", help="print the result as JSON")
        sub.set_defaults(handler=run_bundle)


def run_bundle(args: argparse.Namespace) -> int:
    from lazyfs.cache.store import ChunkCache

    if args.action == "inventory" and not (args.cache_dir / "chunks").is_dir():
        raise UsageError(f"{args.cache_dir} is not a lazyfs cache directory")
    cache = ChunkCache(args.cache_dir, None)
    try:
        if args.action == "inventory":
            result, text = _inventory(cache, args.output)
        elif args.action == "import":
            result, text = _import(cache, args)
        else:
            result, text = run_trio(lambda: _export(cache, args))
    finally:
        cache.close()
    if args.json:
        print_json(result)
    else:
        print(text, file=sys.stderr)
    return 0


def _inventory(cache: Any, output: Path) -> tuple[dict[str, Any], str]:
    from lazyfs.bundle.inventory import write_inventory

    verities = cache.chunk_keys()
    size = write_inventory(verities, output, cache.meta_keys())  # blobs: for TOC deltas
    result = {"chunks": len(verities), "bytes": size, "path": str(output)}
    return result, f"wrote the inventory of {len(verities)} chunks to {output} ({size} bytes)"


def _import(cache: Any, args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from dataclasses import asdict

    from lazyfs.bundle.importer import import_bundle
    from lazyfs.cache.layout import CacheLayout

    summary = import_bundle(args.bundle, cache, CacheLayout(args.cache_dir).staging_dir)
    text = (
        f"imported {', '.join(summary.images)}: {summary.chunks} chunks "
        f"({summary.chunk_bytes} bytes), {summary.metadata_entries} metadata entries"
    )
    return asdict(summary), text


async def _export(cache: Any, args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from dataclasses import asdict

    from lazyfs.bundle.export import export_bundle
    from lazyfs.bundle.inventory import read_inventory_file
    from lazyfs.model.platform import Platform
    from lazyfs.model.reference import Reference
    from lazyfs.registry.client import RegistryClient

    refs = [Reference.parse(text.removeprefix("docker://")) for text in args.references]
    held = read_inventory_file(args.have) if args.have else None
    have = held.chunks if held is not None else frozenset()
    show = sys.stderr.isatty() and not args.json
    async with RegistryClient(registry_config(args), credentials(args)) as client:
        summary = await export_bundle(
            refs,
            args.output,
            cache,
            client,
            args.platform or Platform.host(),
            have,
            step=lambda line: print(f"  {line}", file=sys.stderr) if show else None,
            held=held,
        )
    text = (
        f"wrote {args.output}: {summary.images} images, {summary.chunks} chunks "
        f"({summary.chunk_bytes} bytes; {summary.skipped_chunks} left out, the target has "
        f"them), {summary.bundle_bytes} bytes in all"
    )
    return asdict(summary), text
