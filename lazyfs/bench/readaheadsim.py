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
from lazyfs.config import RegistryConfig, ResolverConfig
from lazyfs.errors import LazyfsError
from lazyfs.model.platform import Platform
from lazyfs.model.profiles import AccessProfile
from lazyfs.model.reference import Reference
from lazyfs.mount.opener import OpenedImage, open_image
from lazyfs.mount.prefetch import profile_order
from lazyfs.mount.readahead import Ahead, BlobIndex, ReadaheadBudget, plan_ahead
from lazyfs.mount.tree import LayerChunk, Node
from lazyfs.registry.client import RegistryClient
from lazyfs.registry.credentials import DockerConfigCredentials

Present = Callable[[LayerChunk], bool]
Pick = Callable[[Node, LayerChunk, ReadaheadBudget, Present], list[Ahead]]
_Key = tuple[int, int]  # (layer, blob offset): a chunk's place
WINDOW_BYTES = 256 << 10  # the bandwidth-delay window: its cap, reached on loopback and edge


@dataclass(frozen=True)
class Outcome:
    policy: str
    round_trips: int
    fetched_bytes: int  # the chunks' compressed bytes
    needed_bytes: int
    ahead_bytes: int
    ahead_used_bytes: int
    requests: int = 0  # range requests, ranges merged and batched as the resolver does
    gap_bytes: int = 0  # blob bytes between merged ranges, fetched and thrown away


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


def replay(
    name: str,
    wanted: list[tuple[Node, LayerChunk]],
    pick: Pick,
    budget: ReadaheadBudget | None = None,
    resolver: ResolverConfig | None = None,
) -> Outcome:
    """``wanted`` read one after another; a miss fetches what ``pick`` chooses. ``budget``
    (a fresh one if None) is kept as the resolver keeps it, for policies that use it."""
    config = resolver or ResolverConfig()
    budget = budget or ReadaheadBudget()
    have: set[_Key] = set()
    ahead: set[_Key] = set()
    trips = fetched = ahead_bytes = used = requests = gaps = 0

    def fetched_already(chunk: LayerChunk) -> bool:
        return (chunk.layer, chunk.ref.blob_offset) in have

    for node, chunk in wanted:
        key = (chunk.layer, chunk.ref.blob_offset)
        if key in have:
            if key in ahead:
                used += _size(chunk)
                ahead.discard(key)
                budget.read(_name(key))
            continue
        trips += 1
        have.add(key)
        fetched += _size(chunk)
        budget.missed(chunk.ref.size)
        sent = [chunk]
        for extra in pick(node, chunk, budget, fetched_already):
            extra_key = (extra.chunk.layer, extra.chunk.ref.blob_offset)
            if extra_key not in have and not extra.chunk.ref.zeros:
                have.add(extra_key)
                ahead.add(extra_key)
                size = _size(extra.chunk)
                fetched += size
                ahead_bytes += size
                budget.fetched_ahead(_name(extra_key), size, extra.chunk.ref.size, extra.directory)
                sent.append(extra.chunk)
        trip_requests, trip_gaps = _requests(sent, config)
        requests += trip_requests
        gaps += trip_gaps
    needed = sum(_size(chunk) for _, chunk in wanted)
    return Outcome(name, trips, fetched, needed, ahead_bytes, used, requests, gaps)


def _requests(chunks: list[LayerChunk], config: ResolverConfig) -> tuple[int, int]:
    """Range requests and gap bytes for one trip's chunks (resolver._plan's merge)."""
    requests = gaps = 0
    for layer in {chunk.layer for chunk in chunks}:
        places = sorted((c.ref.blob_offset, c.ref.blob_end) for c in chunks if c.layer == layer)
        ranges = 1
        start, end = places[0]
        for low, high in places[1:]:
            gap = low - end
            if gap <= config.merge_gap_bytes and high - start <= config.max_request_bytes:
                gaps += max(0, gap)
                end = max(end, high)
            else:
                ranges += 1
                start, end = low, high
        requests += -(-ranges // max(1, config.max_ranges_per_request))
    return requests, gaps


def _name(key: _Key) -> str:
    return f"{key[0]}:{key[1]}"


def policies(index: BlobIndex) -> dict[str, tuple[Pick, ResolverConfig | None]]:
    """Policies of before (the blob after the miss; the rest of the file, then a share for the
    next files) and of now (the rest of the file and its source, then the next files of its
    directory, each directory's share earned: ``plan_ahead``), with the configs they need."""
    found: dict[str, tuple[Pick, ResolverConfig | None]] = {"none": (_nothing, None)}
    for window in (256 << 10, 1 << 20, 4 << 20):
        found[f"next {window >> 10} KiB of the blob"] = (_following(index, window), None)
    for share in (0, 64 << 10, 96 << 10, 128 << 10, 256 << 10):
        found[f"rest of file, then {share >> 10} KiB of next files"] = (_ahead(index, share), None)
    found["same, 256 KiB, with the budget (before)"] = (_before(index), None)
    found["rest of file and its source"] = (_directory(index, 0), None)
    for share in (64 << 10, 128 << 10, 256 << 10):
        found[f"and {share >> 10} KiB of its directory"] = (_directory(index, share), None)
    for first, gain, least in (
        (192 << 10, 3.0, 0),
        (192 << 10, 2.0, 0),
        (64 << 10, 2.0, 16 << 10),
        (128 << 10, 3.0, 16 << 10),
        (192 << 10, 2.0, 16 << 10),
        (192 << 10, 2.0, 32 << 10),
    ):
        config = ResolverConfig(
            readahead_directory_bytes=first,
            readahead_directory_gain=gain,
            readahead_directory_min_bytes=least,
        )
        label = f"earned: {first >> 10} KiB first, gain {gain:g}, least {least >> 10} KiB"
        found[label] = (_planned(index, config), config)
    return found


def _nothing(node: Node, chunk: LayerChunk, budget: ReadaheadBudget, _: Present) -> list[Ahead]:
    return []


def _following(index: BlobIndex, window: int) -> Pick:
    return lambda node, chunk, budget, present: _tagged(index.following(chunk, window))


def _ahead(index: BlobIndex, share: int) -> Pick:
    return lambda node, chunk, budget, present: _tagged(index.ahead_of(chunk, node, 4 << 20, share))


def _before(index: BlobIndex) -> Pick:
    def pick(node: Node, chunk: LayerChunk, budget: ReadaheadBudget, _: Present) -> list[Ahead]:
        allowance = budget.allowance_bytes
        return _tagged(
            index.ahead_of(chunk, node, min(allowance, 4 << 20), min(allowance, WINDOW_BYTES))
        )

    return pick


def _directory(index: BlobIndex, share: int) -> Pick:
    return lambda node, chunk, budget, present: index.ahead_in_directory(
        chunk, node, 4 << 20, share, present
    )


def _planned(index: BlobIndex, config: ResolverConfig) -> Pick:
    return lambda node, chunk, budget, present: plan_ahead(
        index, budget, chunk, node, config, WINDOW_BYTES, present
    )


def _tagged(picked: list[tuple[Node, LayerChunk]]) -> list[Ahead]:
    return [Ahead(node, chunk, None) for node, chunk in picked]


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
        f"{'policy':46} {'round trips':>11} {'requests':>8} {'fetched MB':>10} {'x needed':>8} "
        f"{'ahead used':>10}"
    )
    for name, (pick, config) in policies(index).items():
        budget = ReadaheadBudget(credit_bytes=config.readahead_max_bytes if config else 0)
        out = replay(name, wanted, pick, budget)
        used = out.ahead_used_bytes / out.ahead_bytes if out.ahead_bytes else 0.0
        total = out.fetched_bytes + out.gap_bytes
        print(
            f"{name:46} {out.round_trips:11d} {out.requests:8d} {total / 1e6:10.2f} "
            f"{total / out.needed_bytes:8.2f} {used:10.0%}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
