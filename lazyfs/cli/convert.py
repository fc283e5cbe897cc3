"""``lazyfs convert SRC DST``."""

from __future__ import annotations

import argparse
import sys
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lazyfs.cli.common import (
    add_registry_flags,
    credentials,
    parse_platform,
    parse_size,
    print_json,
    registry_config,
    run_trio,
)
from lazyfs.config import ChunkingConfig
from lazyfs.errors import UsageError

if TYPE_CHECKING:  # imported when the command runs (see lazyfs/cli/common.py)
    from lazyfs.convert.converter import ConvertProgress, ConvertSummary
    from lazyfs.convert.stores import ImageStore, Location


def add_parsers(commands: Any) -> None:
    parser = commands.add_parser(
        "convert",
        help="convert an image to zstd:chunked with fs-verity digests",
        description="Convert SRC into a lazily fetchable zstd:chunked image at DST. "
        "SRC and DST are registry references or oci:PATH[:TAG].",
    )
    parser.add_argument("source", metavar="SRC")
    parser.add_argument("dest", metavar="DST")
    parser.add_argument("--platform", type=parse_platform, help="only this os/arch[/variant]")
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    parser.add_argument(
        "--prefetch",
        type=Path,
        metavar="PROFILE",
        help="access profile (from `lazyfs mount --record-profile`): the files it reads go first "
        "in each layer, in its order, and mounts prefetch its reads (changes the diff_ids)",
    )
    chunking = parser.add_argument_group("chunking (see docs/chunking.md)")
    defaults = ChunkingConfig()
    chunking.add_argument("--chunk-min", type=parse_size, default=defaults.min_chunk_bytes)
    chunking.add_argument("--chunk-avg", type=parse_size, default=defaults.avg_chunk_bytes)
    chunking.add_argument("--chunk-max", type=parse_size, default=defaults.max_chunk_bytes)
    chunking.add_argument("--compression-level", type=int, default=defaults.zstd_level)
    chunking.add_argument("--work-dir", type=Path, help="scratch directory for layer data")
    chunking.add_argument(
        "-j",
        "--jobs",
        type=_jobs,
        default=defaults.workers,
        metavar="N",
        help="processes that compress and hash (default: one per CPU; the output is the same)",
    )
    add_registry_flags(parser, directional=True)
    parser.set_defaults(handler=lambda args: run_trio(lambda: run_convert(args)))


def _jobs(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 1024:
        raise argparse.ArgumentTypeError(
            f"expected a number of processes from 1 to 1024, got {text!r}"
        )
    return int(text)


def chunking_config(args: argparse.Namespace) -> ChunkingConfig:
    config = ChunkingConfig(
        args.chunk_min, args.chunk_avg, args.chunk_max, args.compression_level, args.jobs
    )
    if not 0 < config.min_chunk_bytes <= config.avg_chunk_bytes <= config.max_chunk_bytes:
        raise UsageError("chunk sizes must satisfy 0 < --chunk-min <= --chunk-avg <= --chunk-max")
    if not 1 <= config.zstd_level <= 19:
        raise UsageError("--compression-level must be between 1 and 19")
    return config


async def run_convert(args: argparse.Namespace) -> int:
    from lazyfs.cli.progress import TerminalConvertProgress
    from lazyfs.convert.converter import Converter, ConvertOptions
    from lazyfs.convert.stores import parse_location
    from lazyfs.model.profiles import AccessProfile

    prefetch = AccessProfile.load(args.prefetch) if args.prefetch is not None else None
    source_location = parse_location(args.source)
    dest_location = parse_location(args.dest)
    options = ConvertOptions(
        chunking=chunking_config(args),
        platform=args.platform,
        work_dir=args.work_dir,
        prefetch=prefetch,
    )
    progress: ConvertProgress | None = None
    if not args.quiet and TerminalConvertProgress.wanted():
        progress = TerminalConvertProgress()
    async with AsyncExitStack() as stack:
        source = await _open_store(stack, args, source_location, "src", None, create=False)
        mount_from = _mount_source(source_location, dest_location)
        dest = await _open_store(stack, args, dest_location, "dest", mount_from, create=True)
        summary = await Converter(source, dest, options, progress).run()
    _report(args, summary)
    return 0


async def _open_store(
    stack: AsyncExitStack,
    args: argparse.Namespace,
    location: Location,
    direction: str,
    mount_from: str | None,
    *,
    create: bool,
) -> ImageStore:
    from lazyfs.convert.stores import LayoutLocation, LayoutStore, RegistryStore
    from lazyfs.registry.client import RegistryClient

    if isinstance(location, LayoutLocation):
        return LayoutStore(location, create=create)
    client = RegistryClient(registry_config(args, direction), credentials(args, direction))
    await stack.enter_async_context(client)
    return RegistryStore(client, location.reference, mount_from)


def _mount_source(source: Location, dest: Location) -> str | None:
    """Blobs can be mounted across repositories of the same registry instead of re-uploaded."""
    from lazyfs.convert.stores import LayoutLocation

    if isinstance(source, LayoutLocation) or isinstance(dest, LayoutLocation):
        return None
    same_registry = source.reference.registry == dest.reference.registry
    return source.reference.repository if same_registry else None


def _report(args: argparse.Namespace, summary: ConvertSummary) -> None:
    from lazyfs.cli.progress import human_bytes

    if args.json:
        print_json(summary.to_json())
        return
    if not args.quiet:
        for manifest in summary.manifests:
            label = f" ({manifest.platform})" if manifest.platform else ""
            tar = sum(layer.tar_size_bytes for layer in manifest.layers)
            out = sum(layer.size_bytes for layer in manifest.layers)
            firsts = [layer.profile_first for layer in manifest.layers if layer.profile_first]
            first = (
                f", {sum(f.files for f in firsts)} files of the profile first"
                f" ({sum(f.kept_files for f in firsts)} kept in place)"
                if firsts
                else ""
            )
            print(
                f"manifest {manifest.digest}{label}: {len(manifest.layers)} layers, "
                f"{human_bytes(tar)} tar -> {human_bytes(out)}{first}",
                file=sys.stderr,
            )
    print(summary.digest)
