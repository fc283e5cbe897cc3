"""``lazyfs pin REF`` / ``lazyfs unpin REF``: keep an image's chunks from eviction, or release
them (cache/pins.py).

Both work on the cache directory itself, next to a running service or none: pins live in the
chunk store's database, and every process's eviction honours them. ``pin`` reads the image from
the cache only (its manifest and TOCs must be there: mount or import it first); chunks of
sha256-checked layers that were never fetched have no cache key yet and are reported, not
pinned (pin again once they are cached, e.g. after ``lazyfs mount --fill``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lazyfs.cli.common import parse_platform, print_json, run_trio
from lazyfs.errors import UsageError
from lazyfs.service.paths import default_cache_dir


def add_parsers(commands: Any) -> None:
    pin = commands.add_parser("pin", help="keep an image's chunks in the cache (no eviction)")
    pin.add_argument("reference", metavar="REF")
    pin.add_argument("--platform", type=parse_platform, help="of an index (default: host)")
    pin.set_defaults(handler=run_pin)
    unpin = commands.add_parser("unpin", help="let an image's pinned chunks be evicted again")
    unpin.add_argument("reference", metavar="REF")
    unpin.set_defaults(handler=run_unpin)
    for sub in (pin, unpin):
        sub.add_argument("--cache-dir", type=Path, default=default_cache_dir())
        sub.add_argument("--json", action="store_true", help="print the result as JSON")


def _open_cache(directory: Path) -> Any:
    from lazyfs.cache.store import ChunkCache  # diskcache: only when the command runs

    if not (directory / "chunks").is_dir():
        raise UsageError(f"{directory} is not a lazyfs cache directory")
    return ChunkCache(directory, None)


def _reference(text: str) -> Any:
    from lazyfs.model.reference import Reference

    return Reference.parse(text.removeprefix("docker://"))


def run_pin(args: argparse.Namespace) -> int:
    ref = _reference(args.reference)
    cache = _open_cache(args.cache_dir)
    try:
        result, text = run_trio(lambda: _pin(cache, ref, args.platform))
    finally:
        cache.close()
    _report(args, result, text)
    return 0


async def _pin(cache: Any, ref: Any, platform: Any) -> tuple[dict[str, Any], str]:
    import anyio.to_thread

    from lazyfs.cache import keys as meta_keys
    from lazyfs.cache.pins import PinnedImage
    from lazyfs.errors import CacheError, RegistryUnreachableError
    from lazyfs.model.platform import Platform
    from lazyfs.mount.imagechunks import chunk_keys, open_cached, stored_chunks

    known = meta_keys.blob_key(ref.digest) if ref.digest is not None else meta_keys.tag_key(ref)
    if await anyio.to_thread.run_sync(cache.get_meta, known) is None:
        raise CacheError(
            f"{ref} is not cached in {cache.directory}: mount, fill or import it first"
        )
    try:
        opened = await open_cached(cache, ref, platform or Platform.host())
    except RegistryUnreachableError as exc:  # offline: something the image needs is missing
        raise CacheError(f"cannot pin {ref}: not all of its metadata is cached ({exc})") from exc
    order = await anyio.to_thread.run_sync(stored_chunks, opened.tree)
    keys = await anyio.to_thread.run_sync(chunk_keys, opened, cache, order)
    sizes: dict[str, int] = {}
    for (_node, chunk), key in zip(order, keys, strict=True):
        if key is not None:
            sizes[key] = max(sizes.get(key, 0), chunk.ref.size)
    unresolved = sum(1 for key in keys if key is None)
    image = PinnedImage(
        str(opened.reference.digest), str(ref), len(sizes), sum(sizes.values()), unresolved
    )
    totals = await anyio.to_thread.run_sync(cache.pin, image, sorted(sizes.items()))
    result = {
        "reference": str(ref),
        "image": image.image,
        "chunks": image.chunks,
        "bytes": image.bytes,
        "unresolved_chunks": unresolved,
        "pinned_chunks": totals.chunks,
        "pinned_bytes": totals.bytes,
        "size_limit_bytes": cache.size_limit_bytes,
    }
    text = f"pinned {ref}: {image.chunks} chunks, {image.bytes} bytes"
    if unresolved:
        text += (
            f"; {unresolved} chunks of sha256-checked layers were never fetched and are not "
            "pinned (pin again once they are cached)"
        )
    return result, text


def run_unpin(args: argparse.Namespace) -> int:
    from lazyfs.cache import keys

    ref = _reference(args.reference)
    cache = _open_cache(args.cache_dir)
    try:
        digest = ref.digest
        if digest is None:  # the digest the tag resolved to when last seen, if cached
            with_tag = cache.get_meta(keys.tag_key(ref))
            digest = with_tag.decode() if with_tag is not None else None
        found = cache.unpin(str(ref), str(digest) if digest is not None else None)
    finally:
        cache.close()
    if not found:
        raise UsageError(f"{ref} is not pinned in {args.cache_dir}")
    _report(
        args,
        {"reference": str(ref), "released": found},
        f"unpinned {ref} ({', '.join(found)})",
    )
    return 0


def _report(args: argparse.Namespace, result: dict[str, Any], text: str) -> None:
    if args.json:
        print_json(result)
    else:
        print(text)
