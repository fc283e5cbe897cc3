"""Replay an access profile against read-ahead policies: bytes fetched and round trips.

``python -m lazyfs.bench.readaheadsim REF PROFILE [--cache-dir DIR] [--tls-verify=false]``
opens the image as a mount would (its TOCs, from the cache when they are there), takes the
chunks that the profile's reads touch, in the order they are first touched, and replays them
one after another, as a workload that reads one file after the other does: a chunk nobody has
fetched yet is a miss (one round trip), and a miss fetches what the policy picks ahead of it
with lazyfs's own selection code (``BlobIndex.following``, ``BlobIndex.ahead_of``). It prints,
per policy, the round trips, the compressed bytes fetched against the bytes the reads needed,
and the share of read-ahead that was used. Link effects (concurrent misses, merged gaps, the
budget) are left out: they are what ``lazyfs bench`` measures. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio

from lazyfs.cache.store import ChunkCache
from lazyfs.config import RegistryConfig
from lazyfs.errors import LazyfsError
from lazyfs.model.platform import Platform
from lazyfs.model.profiles import AccessProfile
from lazyfs.model.reference import Reference
from lazyfs.mount.opener import OpenedImage, open_image
from lazyfs.mount.prefetch import profile_order
from lazyfs.mount.readahead import BlobIndex
from lazyfs.mount.tree import LayerChunk, Node
from lazyfs.registry.client import RegistryClient
from lazyfs.registry.credentials import DockerConfigCredentials

Pick = Callable[[Node, LayerChunk], list[tuple[Node, LayerChunk]]]
_Key = tuple[int, int]  # (layer, blob offset): a chunk's place


@dataclass(frozen=True)
class Outcome:
    policy: str
    round_trips: int
    fetched_bytes: int
    needed_bytes: int
    ahead_bytes: int
    ahead_used_bytes: int


def touched_chunks(image: OpenedImage, profile: AccessProfile) -> list[tuple[Node, LayerChunk]]:
    """The chunks the profile's reads touch, in the order they are first touched (prefetch's
    order), each place once: a chunk that two files share is fetched once."""
    seen: set[_Key] = set()
    order: list[tuple[Node, LayerChunk]] = []
    for node, chunk in profile_order(image.tree, profile):
        key = (chunk.layer, chunk.ref.blob_offset)
        if key not in seen:
            seen.add(key)
            order.append((node, chunk))
    return order


def replay(name: str, wanted: list[tuple[Node, LayerChunk]], pick: Pick) -> Outcome:
    have: set[_Key] = set()
    ahead: set[_Key] = set()
    trips = fetched = ahead_bytes = used = 0
    for node, chunk in wanted:
        key = (chunk.layer, chunk.ref.blob_offset)
        if key in have:
            used += _size(chunk) if key in ahead else 0
            continue
        trips += 1
        have.add(key)
        fetched += _size(chunk)
        for _, extra in pick(node, chunk):
            extra_key = (extra.layer, extra.ref.blob_offset)
            if extra_key not in have:
                have.add(extra_key)
                ahead.add(extra_key)
                fetched += _size(extra)
                ahead_bytes += _size(extra)
    needed = sum(_size(chunk) for _, chunk in wanted)
    return Outcome(name, trips, fetched, needed, ahead_bytes, used)


def policies(index: BlobIndex) -> dict[str, Pick]:
    """The policy of before this change (the blob after the miss, a window of it), and the
    one lazyfs uses (the rest of the file, then a share for the next files)."""
    found: dict[str, Pick] = {"none": lambda node, chunk: []}
    for window in (256 << 10, 1 << 20, 4 << 20):
        found[f"next {window >> 10} KiB of the blob"] = _following(index, window)
    for share in (0, 64 << 10, 96 << 10, 128 << 10, 256 << 10):
        found[f"rest of file, then {share >> 10} KiB of next files"] = _ahead(index, share)
    return found


def _following(index: BlobIndex, window: int) -> Pick:
    return lambda node, chunk: index.following(chunk, window)


def _ahead(index: BlobIndex, share: int) -> Pick:
    return lambda node, chunk: index.ahead_of(chunk, node, 4 << 20, share)


def _size(chunk: LayerChunk) -> int:
    return chunk.ref.blob_end - chunk.ref.blob_offset


async def _open(args: argparse.Namespace) -> OpenedImage:
    cache = ChunkCache(args.cache_dir, None)
    client = RegistryClient(RegistryConfig(tls_verify=args.tls_verify), DockerConfigCredentials())
    return await open_image(client, cache, Reference.parse(args.reference), Platform.host())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lazyfs.bench.readaheadsim")
    parser.add_argument("reference")
    parser.add_argument("profile", type=Path, help="from `lazyfs mount --record-profile`")
    parser.add_argument("--cache-dir", type=Path, default=Path("readaheadsim-cache"))
    parser.add_argument(
        "--tls-verify",
        type=lambda text: text.lower() in ("true", "1", "yes"),
        default=None,
        metavar="BOOL",
        help="--tls-verify=false for a plain-HTTP registry that is not on loopback",
    )
    args = parser.parse_args(argv)
    try:
        profile = AccessProfile.load(args.profile)
        image = anyio.run(_open, args, backend="trio")
    except LazyfsError as exc:
        print(f"readaheadsim: error: {exc}", file=sys.stderr)
        return 1
    wanted = touched_chunks(image, profile)
    index = BlobIndex.of_tree(image.tree)
    print(f"{len(wanted)} chunks touched by {len(profile.reads)} reads")
    print(
        f"{'policy':42} {'round trips':>11} {'fetched MB':>10} {'x needed':>8} {'ahead used':>10}"
    )
    for name, pick in policies(index).items():
        out = replay(name, wanted, pick)
        used = out.ahead_used_bytes / out.ahead_bytes if out.ahead_bytes else 0.0
        print(
            f"{name:42} {out.round_trips:11d} {out.fetched_bytes / 1e6:10.2f} "
            f"{out.fetched_bytes / out.needed_bytes:8.2f} {used:10.0%}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
