"""``lazyfs pin`` / ``lazyfs unpin`` and ``lazyfs cache du`` on a real image in a real registry
(issue 13), and the image-wide TOC cap (issue 12) on a crafted manifest pushed there."""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from imagebuild import random_bytes
from lazyfs_run import run_lazyfs
from test_service import read_all, start_service, stop

from lazyfs.cache.store import ChunkCache
from lazyfs.config import LimitsConfig
from lazyfs.convert.imagebuild import regular_file, with_parent_dirs, write_image
from lazyfs.errors import TocError
from lazyfs.formats.chunked.toc import TOC_CHECKSUM_ANNOTATION, TOC_POSITION_ANNOTATION
from lazyfs.model.digest import Digest
from lazyfs.model.manifests import OCI_CONFIG, OCI_LAYER_TAR_ZSTD, OCI_MANIFEST
from lazyfs.model.platform import Platform
from lazyfs.model.reference import Reference
from lazyfs.mount.opener import open_image
from lazyfs.registry.client import RegistryClient
from lazyfs.registry.localserver import LocalRegistry

MiB = 1 << 20
FILES = {f"app/lib{i:02}.so": random_bytes(300 << 10, seed=700 + i) for i in range(8)}


@pytest.fixture(scope="module")
def image(
    registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """A converted image pushed to the registry, and a cache that holds all of it."""
    work = tmp_path_factory.mktemp("pins")
    entries = with_parent_dirs(regular_file(p, d) for p, d in FILES.items())
    built = write_image(work / "src", "v1", [entries])
    ref = f"{registry.host}/pins/app:v1"
    run_lazyfs("convert", "-q", built.reference, ref)
    cache = work / "cache"  # export opens the image and completes the cache, as a fill would
    run_lazyfs("bundle", "export", ref, "-o", str(work / "b.tar"), "--cache-dir", str(cache))
    yield {"ref": ref, "cache": str(cache), "work": str(work)}


def du(cache: str) -> dict[str, Any]:
    return json.loads(run_lazyfs("cache", "du", "--json", "--cache-dir", cache).stdout)  # type: ignore[no-any-return]


def fill_with_junk(cache_dir: Path, megabytes: int, seed: int) -> None:
    cache = ChunkCache(cache_dir, None)
    try:
        rnd = random.Random(seed)
        for _ in range(megabytes * 4):
            data = rnd.randbytes(256 << 10)
            cache.put_chunks([("sha256:" + hashlib.sha256(data).hexdigest(), data)])
    finally:
        cache.close()


def image_keys(cache_dir: Path) -> set[str]:
    cache = ChunkCache(cache_dir, None)
    try:
        return set(cache.chunk_keys())
    finally:
        cache.close()


def test_pin_keeps_an_image_through_eviction_and_unpin_releases_it(image: dict[str, str]) -> None:
    ref, cache = image["ref"], image["cache"]
    before = image_keys(Path(cache))
    assert len(before) >= 8
    pinned = json.loads(run_lazyfs("pin", "--json", "--cache-dir", cache, ref).stdout)
    assert pinned["reference"] == ref and pinned["chunks"] == len(before)
    assert pinned["bytes"] >= sum(len(d) for d in FILES.values())
    assert pinned["unresolved_chunks"] == 0
    usage = du(cache)
    assert usage["pinned_images"] == 1 and usage["pinned_bytes"] == pinned["bytes"]
    assert usage["pinned_cached_bytes"] == pinned["bytes"]
    text = run_lazyfs("cache", "du", "--cache-dir", cache).stdout
    assert "pinned" in text and ref in text
    # Bound the cache to a little more than the image, then write 12 MiB through it.
    ChunkCache(Path(cache), pinned["bytes"] + 3 * MiB).close()
    fill_with_junk(Path(cache), 12, seed=1)
    assert before <= image_keys(Path(cache))  # nothing of the image was evicted
    assert du(cache)["counted_bytes"] <= pinned["bytes"] + 3 * MiB + (256 << 10)
    released = json.loads(run_lazyfs("unpin", "--json", "--cache-dir", cache, ref).stdout)
    assert released["released"] == [pinned["image"]]
    assert du(cache)["pinned_bytes"] == 0
    fill_with_junk(Path(cache), 12, seed=2)
    assert not before <= image_keys(Path(cache))  # released: evicted like any other
    again = run_lazyfs("unpin", "--cache-dir", cache, ref, check=False)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "not pinned" in again.stderr


def test_a_pin_larger_than_the_bound_fails_and_pins_nothing(image: dict[str, str]) -> None:
    ref, cache = image["ref"], image["cache"]
    ChunkCache(Path(cache), 1 * MiB).close()
    try:
        result = run_lazyfs("pin", "--cache-dir", cache, ref, check=False)
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1 and "cannot pin" in result.stderr
        assert "Traceback" not in result.stderr
        assert du(cache)["pinned_images"] == 0
    finally:
        ChunkCache(Path(cache), 1 << 30).close()


def test_pin_needs_an_image_the_cache_knows(image: dict[str, str], tmp_path: Path) -> None:
    unknown = run_lazyfs("pin", "--cache-dir", image["cache"], "127.0.0.1:9/none/x:1", check=False)
    assert unknown.returncode == 1 and unknown.stderr.count("\n") == 1
    assert "not cached" in unknown.stderr
    missing = run_lazyfs("pin", "--cache-dir", str(tmp_path / "nothing"), image["ref"], check=False)
    assert missing.returncode == 2 and "not a lazyfs cache directory" in missing.stderr


OTHER = {f"other/f{i:02}.bin": random_bytes(512 << 10, seed=900 + i) for i in range(16)}


def test_a_pin_made_while_a_service_runs_holds_for_its_evictions(
    image: dict[str, str], registry: LocalRegistry, tmp_path: Path
) -> None:
    """Pin image A with the CLI next to a running service, then read 8 MiB of image B through
    the service, in a cache bounded a little above A: the service evicts, never A's chunks."""
    work = Path(image["work"])
    entries = with_parent_dirs(regular_file(p, d) for p, d in OTHER.items())
    built = write_image(work / "other", "v1", [entries])
    other = f"{registry.host}/pins/other:v1"
    run_lazyfs("convert", "-q", built.reference, other)
    cache = tmp_path / "site" / "cache"
    run_lazyfs(
        "bundle", "export", image["ref"], "-o", str(tmp_path / "a.tar"), "--cache-dir", str(cache)
    )
    pinned_keys = image_keys(cache)
    served = start_service(tmp_path / "site", "--cache-size", str(4 * MiB))
    try:
        pinned = json.loads(
            run_lazyfs("pin", "--json", "--cache-dir", str(cache), image["ref"]).stdout
        )
        assert pinned["chunks"] == len(pinned_keys)
        served.mount(other, tmp_path / "mnt", "--no-prefetch")
        read_all(tmp_path / "mnt", OTHER, 4)
        run_lazyfs("umount", str(tmp_path / "mnt"))
    finally:
        stop(served)
    assert pinned_keys <= image_keys(cache)
    usage = du(str(cache))
    assert usage["pinned_cached_bytes"] == pinned["bytes"]
    assert usage["counted_bytes"] <= 4 * MiB + (1 << 20), usage  # a batch of slack at most


# ------------------------------------------------------------------------ the image-wide cap


def _descriptor(media_type: str, data: bytes, **extra: object) -> dict[str, object]:
    return {"mediaType": media_type, "digest": str(Digest.of(data)), "size": len(data), **extra}


async def _push_toc_heavy_image(registry: LocalRegistry, tmp_path: Path) -> str:
    """Three layers, each declaring a 200 MiB TOC (under the 256 MiB per-TOC cap): 600 MiB."""
    ref = Reference.parse(f"{registry.host}/hostile/tocs:1")
    blob = os.urandom(4096)
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {}}).encode()
    async with RegistryClient() as client:
        for data in (blob, config):
            path = tmp_path / Digest.of(data).hex
            path.write_bytes(data)
            await client.push_blob(ref, Digest.of(data), path, len(data))
        annotations = {
            TOC_POSITION_ANNOTATION: f"100:2000:{200 * MiB}:1",
            TOC_CHECKSUM_ANNOTATION: str(Digest.of(b"never fetched")),
        }
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": _descriptor(OCI_CONFIG, config),
            "layers": [_descriptor(OCI_LAYER_TAR_ZSTD, blob, annotations=annotations)] * 3,
        }
        await client.push_manifest(ref, OCI_MANIFEST, json.dumps(manifest).encode())
    return str(ref)


def test_the_tocs_of_one_image_are_capped_before_any_is_fetched(
    registry: LocalRegistry, tmp_path: Path
) -> None:
    ref = anyio.run(_push_toc_heavy_image, registry, tmp_path, backend="trio")
    (tmp_path / "mnt").mkdir()
    blobs_before = registry.access_log_summary().count("GET", "/v2/hostile/tocs/blobs/")
    result = run_lazyfs(
        "mount", "--cache-dir", str(tmp_path / "cache"), ref, str(tmp_path / "mnt"), check=False
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    [error] = [line for line in result.stderr.splitlines() if "error" in line]  # one line
    assert f"image {ref}" in error and "max_image_toc_bytes" in error
    assert registry.access_log_summary().count("GET", "/v2/hostile/tocs/blobs/") == blobs_before


def test_the_entries_of_one_image_are_capped(image: dict[str, str]) -> None:
    async def open_with(limits: LimitsConfig) -> int:
        cache = ChunkCache(Path(image["cache"]), None)
        try:
            async with RegistryClient() as client:
                ref = Reference.parse(image["ref"])
                opened = await open_image(client, cache, ref, Platform.host(), limits=limits)
                return len(opened.tree.nodes)
        finally:
            cache.close()

    assert anyio.run(open_with, LimitsConfig(), backend="trio") > len(FILES)
    with pytest.raises(TocError) as caught:
        anyio.run(open_with, LimitsConfig(max_image_toc_entries=5), backend="trio")
    message = str(caught.value)
    assert "\n" not in message and image["ref"] in message and "max_image_toc_entries" in message


def test_reopening_a_cached_image_writes_no_metadata(
    image: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest, tag and TOCs a cache holds are not written again on every open."""
    written: list[str] = []
    put_meta = ChunkCache.put_meta

    def counting(self: ChunkCache, key: str, data: bytes) -> None:
        written.append(key)
        put_meta(self, key, data)

    monkeypatch.setattr(ChunkCache, "put_meta", counting)

    async def open_twice() -> None:
        cache = ChunkCache(Path(image["cache"]), None)
        try:
            async with RegistryClient() as client:
                ref = Reference.parse(image["ref"])
                await open_image(client, cache, ref, Platform.host())
                written.clear()  # the first open may complete what the cache held
                await open_image(client, cache, ref, Platform.host())
        finally:
            cache.close()

    anyio.run(open_twice, backend="trio")
    assert written == []
