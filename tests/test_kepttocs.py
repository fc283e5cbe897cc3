"""Checked TOCs kept in the cache (lazyfs/mount/kepttocs.py): the next open skips the JSON,
and a record that is not sound is ignored."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from test_cache_pins import image  # noqa: F401  (the fixture: a converted image, cached)

from lazyfs.cache.store import ChunkCache
from lazyfs.formats.chunked.toc import Toc, TocEntry
from lazyfs.model.platform import Platform
from lazyfs.model.reference import Reference
from lazyfs.mount import kepttocs
from lazyfs.mount.metadata import MetadataFetcher
from lazyfs.mount.opener import OpenedImage, open_image
from lazyfs.registry.client import RegistryClient


def _toc() -> Toc:
    entries = (
        TocEntry(type="dir", name="etc", mode=0o755, modtime="2024-01-02T03:04:05.000000006Z"),
        TocEntry(
            type="reg",
            name="etc/passwd",
            size=5,
            xattrs={"user.x": b"\x00\xff"},
            digest="sha256:" + "a" * 64,
            offset=10,
            end_offset=20,
        ),
    )
    return Toc(entries, "sha256:" + "b" * 64)


def test_a_kept_toc_comes_back_equal() -> None:
    toc = _toc()
    assert kepttocs.decode(kepttocs.encode(toc)) == toc


@pytest.mark.parametrize(
    "spoil",
    [
        lambda record: record[:-1],  # torn
        lambda record: record[:40] + bytes([record[40] ^ 1]) + record[41:],  # changed
        lambda record: b"",
        lambda record: record[:32],
    ],
)
def test_a_record_that_is_not_sound_is_ignored(spoil: object) -> None:
    record = kepttocs.encode(_toc())
    assert callable(spoil)
    assert kepttocs.decode(spoil(record)) is None


def test_a_record_of_other_checks_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    record = kepttocs.encode(_toc())
    monkeypatch.setattr(kepttocs, "_HEADER", (1, -1, kepttocs._ATTRIBUTES))
    assert kepttocs.decode(record) is None


def test_the_next_open_uses_the_kept_tocs(
    image: dict[str, str],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first open parses and hands its TOCs on; once kept, an open reads none of them and
    builds the same tree."""
    reads: list[str] = []
    toc = MetadataFetcher.toc

    async def counting(self: MetadataFetcher, *args: object) -> bytes:
        reads.append("toc")
        return await toc(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(MetadataFetcher, "toc", counting)

    async def open_thrice() -> tuple[OpenedImage, OpenedImage, int, int]:
        cache = ChunkCache(Path(image["cache"]), None)
        try:
            async with RegistryClient() as client:
                ref = Reference.parse(image["ref"])
                first = await open_image(client, cache, ref, Platform.host())
                parsed = len(reads)
                assert first.unkept and parsed == len(first.unkept)
                again = await open_image(client, cache, ref, Platform.host())  # none kept yet
                kepttocs.keep(cache, first.unkept)
                assert first.unkept == []
                reads.clear()
                kept = await open_image(client, cache, ref, Platform.host())
                return first, kept, len(reads), len(again.unkept)
        finally:
            cache.close()

    first, kept, toc_reads, unkept_again = anyio.run(open_thrice, backend="trio")
    assert toc_reads == 0 and kept.unkept == [] and unkept_again > 0
    assert kept.tree.nodes.keys() == first.tree.nodes.keys()
    assert [n.chunks for n in kept.tree.nodes.values()] == [
        n.chunks for n in first.tree.nodes.values()
    ]
