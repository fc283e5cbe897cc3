"""``lazyfs cache du|gc|verify|clear``: look after a cache directory (cache/maintenance.py)."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lazyfs.cli.common import print_json
from lazyfs.errors import UsageError
from lazyfs.service.paths import default_cache_dir


def run_cache(args: argparse.Namespace) -> int:
    from lazyfs.cache import maintenance  # diskcache: only when the command runs
    from lazyfs.cache.store import ChunkCache

    directory: Path = args.cache_dir
    if not (directory / "chunks").is_dir():
        raise UsageError(f"{directory} is not a lazyfs cache directory")
    cache = ChunkCache(directory, None)
    try:
        result: dict[str, Any]
        if args.action == "du":
            result = asdict(maintenance.usage(cache))
            text = _usage_text(result)
        elif args.action == "verify":
            result = asdict(maintenance.verify(cache))
            text = (
                f"checked {result['chunks_checked']} chunks and {result['blobs_checked']} local "
                f"blobs; dropped {result['chunks_dropped']} chunks and "
                f"{result['blobs_dropped']} blobs that did not match their digests"
            )
        elif args.action == "gc":
            report = maintenance.gc(cache)
            result = asdict(report)
            text = (
                f"evicted {report.chunks_evicted} chunks and {report.blobs_evicted} local blobs; "
                f"removed {report.scratch_entries_removed} scratch entries"
            )
        else:
            maintenance.clear(cache)
            result, text = {"cleared": str(directory)}, f"cleared {directory}"
    finally:
        cache.close()
    if args.json:
        print_json(result)
    else:
        print(text)
    return 0


def _usage_text(usage: dict[str, Any]) -> str:
    from lazyfs.cli.progress import human_bytes  # it loads the converter: only when needed

    lines = [
        f"chunks        {usage['chunks']:>10}  {human_bytes(usage['chunk_bytes'])}",
        f"  pinned      {usage['pinned_chunks']:>10}  {human_bytes(usage['pinned_bytes'])}"
        f" ({human_bytes(usage['pinned_cached_bytes'])} cached) for"
        f" {usage['pinned_images']} images",
        f"metadata      {'':>10}  {human_bytes(usage['metadata_bytes'])}",
        f"local blobs   {usage['local_blobs']:>10}  {human_bytes(usage['local_blob_bytes'])}",
        f"other         {'':>10}  {human_bytes(usage['other_bytes'])}",
        f"counted       {'':>10}  {human_bytes(usage['counted_bytes'])}"
        f" of {human_bytes(usage['size_limit_bytes'])} (the bound)",
        f"on disk       {'':>10}  {human_bytes(usage['disk_bytes'])}",
    ]
    lines.extend(f"pinned: {pin['reference']} ({pin['image']})" for pin in usage["pins"])
    return "\n".join(lines)


def add_parsers(commands: Any) -> None:
    parser = commands.add_parser("cache", help="show, check, trim or clear a cache directory")
    parser.add_argument(
        "action",
        choices=["du", "verify", "gc", "clear"],
        help="du: usage; verify: re-hash and drop what fails; gc: trim to the bound and remove "
        "scratch; clear: drop everything",
    )
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=run_cache)
