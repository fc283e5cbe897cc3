"""Access profiles and prefetch: the profile format, TOC ranks, the prefetch order, the
resolver's prefetch, and end to end (record on one mount, convert with it, prefetch on the next).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st
from imagebuild import layout_tocs, random_bytes, text_bytes
from lazyfs_run import mounted, run_lazyfs, stats
from test_resolver import BlobBuilder, FakeSource, make_node, running, wait_until

from lazyfs.cache.store import ChunkCache
from lazyfs.config import ResolverConfig
from lazyfs.convert.imagebuild import BuiltImage, directory, regular_file, write_image
from lazyfs.convert.layout import OciLayout
from lazyfs.errors import ProfileError
from lazyfs.formats.chunked.ranks import mark_entries
from lazyfs.formats.chunked.toc import Toc, TocEntry
from lazyfs.model.profiles import AccessProfile, ProfileRead
from lazyfs.mount.prefetch import ProfileRecorder, embedded_order, profile_order
from lazyfs.mount.resolver import LayerBlob
from lazyfs.mount.tree import Node, Tree, build_tree
from lazyfs.registry.localserver import LocalRegistry

# --------------------------------------------------------------------------- the format

# Absolute, normalized paths (no slashes or leading dots inside a component), as recorded.
paths = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=20).map(
    lambda text: "/" + text.replace("/", "_").lstrip(".")
)
reads = st.builds(ProfileRead, paths, st.integers(0, 1 << 40), st.integers(0, 1 << 30))


@given(st.lists(reads, max_size=20), st.text(max_size=10))
def test_profile_json_round_trip(items: list[ProfileRead], image: str) -> None:
    profile = AccessProfile(tuple(items), image)
    assert AccessProfile.parse(profile.to_json()) == profile


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"[]",
        b'{"version": 2, "reads": []}',
        b'{"version": 1}',
        b'{"version": 1, "reads": [["/a", -1, 3]]}',
        b'{"version": 1, "reads": [["/a", 0]]}',
        b'{"version": 1, "reads": [[1, 0, 3]]}',
        b'{"version": 1, "reads": [["/a", true, 3]]}',
        b'{"version": 1, "reads": [], "image": 3}',
    ],
)
def test_malformed_profiles_are_profile_errors(data: bytes) -> None:
    with pytest.raises(ProfileError):
        AccessProfile.parse(data)


def test_profile_paths_are_normalized() -> None:
    profile = AccessProfile.parse(b'{"version":1,"reads":[["usr//bin/./x",0,1]]}')
    assert profile.reads[0].path == "/usr/bin/x"


def test_save_is_atomic_and_load_reads_it_back(tmp_path: Path) -> None:
    profile = AccessProfile((ProfileRead("/a", 0, 10),), "sha256:00")
    target = tmp_path / "profile.json"
    profile.save(target)
    assert AccessProfile.load(target) == profile
    assert [p.name for p in tmp_path.iterdir()] == ["profile.json"]


def test_load_of_a_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"missing\.json"):
        AccessProfile.load(tmp_path / "missing.json")


# ------------------------------------------------------------------------- TOC ranks


def _file(name: str, chunk_sizes: list[int], start: int = 0) -> list[TocEntry]:
    """TOC entries of a file with these chunks, laid out from blob offset ``start``."""
    size = sum(chunk_sizes)
    end = start + 10 * len(chunk_sizes)
    head = TocEntry(type="reg", name=name, size=size, offset=start, end_offset=end)
    if len(chunk_sizes) == 1:
        return [head]
    entries, position = [], 0
    for index, chunk_size in enumerate(chunk_sizes):
        base = head if index == 0 else TocEntry(type="chunk", name=name)
        entries.append(
            TocEntry(
                **{
                    **base.__dict__,
                    "offset": start + 10 * index,
                    "chunk_offset": position,
                    "chunk_size": chunk_size,
                }
            )
        )
        position += chunk_size
    return entries


def _profile(*items: tuple[str, int, int]) -> AccessProfile:
    return AccessProfile(tuple(ProfileRead(*item) for item in items))


def test_mark_entries_ranks_the_chunks_a_read_overlaps() -> None:
    entries = _file("usr/lib/big", [100, 100, 100]) + _file("etc/other", [50], start=100)
    marked = mark_entries(entries, _profile(("/usr/lib/big", 150, 60)))
    assert [e.prefetch for e in marked] == [0, 1, 1, 0]


def test_mark_entries_keeps_the_earliest_rank() -> None:
    entries = _file("a", [10, 10])
    marked = mark_entries(entries, _profile(("/a", 10, 1), ("/a", 0, 20)))
    assert [e.prefetch for e in marked] == [2, 1]


def test_mark_entries_follows_hardlinks_and_leaves_other_entries_alone() -> None:
    entries = [
        TocEntry(type="dir", name="d"),
        *_file("d/target", [10]),
        TocEntry(type="hardlink", name="d/alias", link_name="d/target"),
        TocEntry(type="symlink", name="d/sym", link_name="target"),
    ]
    marked = mark_entries(entries, _profile(("/d/alias", 0, 1), ("/d/sym", 0, 1)))
    assert [e.prefetch for e in marked] == [0, 1, 0, 0]


def test_mark_entries_with_an_empty_read_names_its_chunk() -> None:
    marked = mark_entries(_file("a", [10, 10]), _profile(("/a", 12, 0)))
    assert [e.prefetch for e in marked] == [0, 1]


def test_ranks_survive_the_toc_json() -> None:
    marked = mark_entries(_file("a", [10, 10]), _profile(("/a", 12, 1)))
    parsed = Toc.parse(Toc(marked).to_json())
    assert [e.prefetch for e in parsed.entries] == [0, 1]
    assert b'"lazyfsPrefetch":1' in Toc(marked).to_json()


# ----------------------------------------------------------------------- the mount order


def _tree_with_ranks() -> Tree:
    lower = _file("a", [10, 10, 10])
    upper = _file("b", [10], start=100) + _file("c", [10], start=200)
    profile = _profile(("/x", 0, 1), ("/a", 20, 1), ("/a", 0, 1), ("/c", 0, 1))
    lower, upper = list(mark_entries(lower, profile)), list(mark_entries(upper, profile))
    return build_tree([lower, upper])


def test_tree_find() -> None:
    tree = _tree_with_ranks()
    found = tree.find("/a")
    assert found is not None and found.path == "/a"
    assert tree.find("/") is tree.root
    assert tree.find("/missing") is None
    assert tree.find("/a/below-a-file") is None


def test_embedded_order_is_by_rank() -> None:
    order = embedded_order(_tree_with_ranks())
    assert [(node.path, chunk.ref.file_offset) for node, chunk in order] == [
        ("/a", 20),
        ("/a", 0),
        ("/c", 0),
    ]


def test_profile_order_maps_reads_to_chunks_once() -> None:
    tree = build_tree([_file("a", [10, 10, 10]), _file("b", [5], start=100)])
    profile = _profile(("/b", 0, 5), ("/missing", 0, 9), ("/a", 5, 10), ("/a", 0, 30), ("/", 0, 1))
    order = profile_order(tree, profile)
    assert [(n.path, c.ref.file_offset) for n, c in order] == [
        ("/b", 0),
        ("/a", 0),
        ("/a", 10),
        ("/a", 20),
    ]


def test_recorder_keeps_first_read_order_once_per_chunk() -> None:
    builder = BlobBuilder()
    node = make_node(builder, [b"a" * 10, bytes(10), b"c" * 10], zeros=frozenset({1}))
    recorder = ProfileRecorder()
    recorder.record(node, node.chunks[2:])
    recorder.record(node, node.chunks)
    profile = recorder.profile("sha256:ab")
    assert profile.reads == (ProfileRead("/file", 20, 10), ProfileRead("/file", 0, 10))
    assert profile.image == "sha256:ab"


# ------------------------------------------------------------------ the resolver's prefetch


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[ChunkCache]:
    chunk_cache = ChunkCache(tmp_path / "cache", 1 << 30)
    yield chunk_cache
    chunk_cache.close()


def _world(count: int, size: int = 4000) -> tuple[Node, bytes, LayerBlob, FakeSource]:
    builder = BlobBuilder()
    pieces = [os.urandom(size) for _ in range(count)]
    node = make_node(builder, pieces, gaps=[100_000] * count)  # far apart: one range each
    layer = builder.layer()
    return node, b"".join(pieces), layer, FakeSource({layer.digest: bytes(builder.data)})


@pytest.mark.anyio
async def test_prefetch_fetches_in_order_and_reads_then_fetch_nothing(cache: ChunkCache) -> None:
    node, content, layer, source = _world(6)
    config = ResolverConfig(prefetch_batch_bytes=1, prefetch_concurrency=1, readahead_max_bytes=0)
    async with running(source, cache, [layer], config) as resolver:
        order = [(node, node.chunks[i]) for i in (3, 0, 5, 1, 2, 4)]
        await resolver.prefetch(order)
        assert [call.ranges[0].start for call in source.calls] == [
            node.chunks[i].ref.blob_offset for i in (3, 0, 5, 1, 2, 4)
        ]
        assert resolver.stats.prefetch_chunks == 6
        assert await resolver.read(node, 0, node.size) == content
    assert len(source.calls) == 6


@pytest.mark.anyio
async def test_prefetch_keeps_a_bounded_number_of_batches_in_flight(cache: ChunkCache) -> None:
    node, _, layer, source = _world(8)
    source.gate = anyio.Event()
    config = ResolverConfig(prefetch_batch_bytes=1, prefetch_concurrency=2)
    async with running(source, cache, [layer], config) as resolver, anyio.create_task_group() as tg:
        tg.start_soon(resolver.prefetch, [(node, chunk) for chunk in node.chunks])
        await wait_until(lambda: len(source.calls) == 2)
        await anyio.sleep(0.05)
        assert len(source.calls) == 2
        source.gate.set()
        await wait_until(lambda: resolver.stats.chunks_fetched == 8)


@pytest.mark.anyio
async def test_a_read_during_prefetch_joins_its_fetch_or_fetches_itself(
    cache: ChunkCache,
) -> None:
    node, content, layer, source = _world(4)
    source.gate = anyio.Event()
    config = ResolverConfig(prefetch_batch_bytes=1, prefetch_concurrency=1, readahead_max_bytes=0)
    async with running(source, cache, [layer], config) as resolver, anyio.create_task_group() as tg:
        tg.start_soon(resolver.prefetch, [(node, chunk) for chunk in node.chunks])
        await wait_until(lambda: len(source.calls) == 1)  # chunk 0, held at the gate
        results: dict[int, bytes] = {}

        async def read(index: int) -> None:
            ref = node.chunks[index].ref
            results[index] = await resolver.read(node, ref.file_offset, ref.size)

        tg.start_soon(read, 0)  # joins the running prefetch of chunk 0
        tg.start_soon(read, 3)  # not started by the prefetch yet: fetched on demand
        await wait_until(lambda: len(source.calls) == 2)
        source.gate.set()
        await wait_until(lambda: len(results) == 2)
        await wait_until(lambda: resolver.stats.chunks_fetched == 4)
    fetched = sorted(call.ranges[0].start for call in source.calls)
    assert fetched == sorted(chunk.ref.blob_offset for chunk in node.chunks)  # each once
    assert results[0] == content[:4000] and results[3] == content[12000:]


@pytest.mark.anyio
async def test_prefetch_skips_what_the_cache_holds(cache: ChunkCache) -> None:
    node, _, layer, source = _world(3)
    async with running(source, cache, [layer]) as resolver:
        await resolver.read(node, 0, 1)
    async with running(source, cache, [layer], ResolverConfig(readahead_max_bytes=0)) as resolver:
        source.calls.clear()
        await resolver.prefetch([(node, chunk) for chunk in node.chunks])
        assert resolver.stats.prefetch_chunks == 2
    assert [rng.start for rng in source.ranges] == [c.ref.blob_offset for c in node.chunks[1:]]


# ------------------------------------------------------------------------- end to end

pytestmark_e2e = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
READ_ORDER = ("/app/config.txt", "/app/main.bin", "/app/lib/a.bin")


@pytest.fixture(scope="module")
def app_image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    base = [
        directory("app"),
        directory("app/lib"),
        directory("data"),
        regular_file("app/main.bin", random_bytes(600_000, 1), 0o755),
        regular_file("app/lib/a.bin", random_bytes(200_000, 2)),
        *[regular_file(f"data/f{i:02d}", random_bytes(64_000, 10 + i)) for i in range(40)],
    ]
    top = [directory("app"), regular_file("app/config.txt", text_bytes(10_000, 3))]
    return write_image(tmp_path_factory.mktemp("app") / "oci", "v1", [base, top])


@pytest.fixture(scope="module")
def recorded(
    app_image: BuiltImage, registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path]:
    """The converted image, and a profile recorded by reading READ_ORDER through a mount."""
    work = tmp_path_factory.mktemp("record")
    chunked = f"{registry.host}/prefetch-app:chunked"
    run_lazyfs("convert", "-q", app_image.reference, chunked)
    profile = work / "profile.json"
    with mounted(chunked, work / "mnt", work / "cache", "--record-profile", str(profile)) as mnt:
        for path in READ_ORDER:
            (mnt / path.lstrip("/")).read_bytes()
    return chunked, profile


def _content(image: BuiltImage, path: str) -> bytes:
    """The file's bytes in the top layer that has it."""
    found = [e.data for layer in image.layers for e in layer.entries if e.path == path.lstrip("/")]
    return found[-1]


def _wait_for_prefetch(mnt: Path, minimum: int = 1) -> dict[str, object]:
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        counters = stats(mnt)
        if counters["prefetch_chunks"] >= minimum and counters["range_requests"] > 0:
            time.sleep(0.3)  # let the last batch land; it is one request at most
            settled = stats(mnt)
            if settled["prefetch_chunks"] == counters["prefetch_chunks"]:
                return settled
        time.sleep(0.05)
    raise AssertionError(f"prefetch did not finish: {stats(mnt)}")


@pytestmark_e2e
def test_recorded_profile_lists_the_reads_in_order(recorded: tuple[str, Path]) -> None:
    _, profile_path = recorded
    profile = AccessProfile.load(profile_path)
    first_seen = list(dict.fromkeys(read.path for read in profile.reads))
    assert first_seen == list(READ_ORDER)
    assert profile.image.startswith("sha256:")
    covered = {path: sum(r.length for r in profile.reads if r.path == path) for path in READ_ORDER}
    assert covered == {
        "/app/config.txt": 10_000,
        "/app/main.bin": 600_000,
        "/app/lib/a.bin": 200_000,
    }


@pytestmark_e2e
def test_convert_with_a_profile_ranks_exactly_the_read_chunks(
    app_image: BuiltImage, recorded: tuple[str, Path], tmp_path: Path
) -> None:
    _, profile = recorded
    outputs = []
    for name in ("one", "two"):
        out = tmp_path / name
        result = run_lazyfs(
            "convert", "--json", "--prefetch", str(profile), app_image.reference, f"oci:{out}:v1"
        )
        outputs.append(json.loads(result.stdout)["digest"])
    assert outputs[0] == outputs[1]  # still reproducible
    entries = [e for toc in layout_tocs(OciLayout(tmp_path / "one")) for e in toc.entries]
    ranked = {e.name for e in entries if e.prefetch}
    assert ranked == {p.lstrip("/") for p in READ_ORDER}
    ranks = {e.name: e.prefetch for e in entries if e.prefetch and e.type == "reg"}
    assert ranks["app/config.txt"] < ranks["app/main.bin"] < ranks["app/lib/a.bin"]


@pytestmark_e2e
def test_mount_prefetches_the_ranked_chunks_and_reads_then_fetch_nothing(
    app_image: BuiltImage, recorded: tuple[str, Path], registry: LocalRegistry, tmp_path: Path
) -> None:
    _, profile = recorded
    target = f"{registry.host}/prefetch-app:prefetch"
    run_lazyfs("convert", "-q", "--prefetch", str(profile), app_image.reference, target)
    expected = {p: _content(app_image, p) for p in READ_ORDER}
    with mounted(target, tmp_path / "mnt", tmp_path / "cache") as mnt:
        before = _wait_for_prefetch(mnt)
        for path, data in expected.items():
            assert (mnt / path.lstrip("/")).read_bytes() == data
        after = stats(mnt)
    assert after["range_requests"] == before["range_requests"]
    assert after["bytes_fetched"] == before["bytes_fetched"]
    assert after["bytes_fetched"] < 900_000  # the three files, not the 2.5 MB of data/
    assert before["prefetch_chunks"] == after["chunks_fetched"]


@pytestmark_e2e
def test_no_prefetch_fetches_only_what_is_read(recorded: tuple[str, Path], tmp_path: Path) -> None:
    chunked, _ = recorded
    with mounted(
        chunked, tmp_path / "mnt", tmp_path / "cache", "--no-prefetch", "--record-profile",
        str(tmp_path / "again.json"),
    ) as mnt:  # fmt: skip
        (mnt / "app/config.txt").read_bytes()
        assert stats(mnt)["prefetch_chunks"] == 0
    assert [r.path for r in AccessProfile.load(tmp_path / "again.json").reads] == [
        "/app/config.txt"
    ]


@pytestmark_e2e
def test_a_local_profile_prefetches_an_image_without_ranks(
    recorded: tuple[str, Path], tmp_path: Path
) -> None:
    chunked, profile = recorded
    with mounted(chunked, tmp_path / "mnt", tmp_path / "cache", "--prefetch", str(profile)) as mnt:
        before = _wait_for_prefetch(mnt)
        for path in READ_ORDER:
            (mnt / path.lstrip("/")).read_bytes()
        assert stats(mnt)["range_requests"] == before["range_requests"]


@pytestmark_e2e
def test_bad_profiles_are_one_line_usage_errors(
    recorded: tuple[str, Path], app_image: BuiltImage, tmp_path: Path
) -> None:
    chunked, _ = recorded
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1, "reads": [["/a", -1, 2]]}')
    (tmp_path / "mnt").mkdir()
    for args in (
        ("mount", "--prefetch", str(tmp_path / "missing.json"), chunked, str(tmp_path / "mnt")),
        ("mount", "--prefetch", str(bad), chunked, str(tmp_path / "mnt")),
        ("mount", "--record-profile", "/nonexistent/dir/p.json", chunked, str(tmp_path / "mnt")),
        ("convert", "--prefetch", str(bad), app_image.reference, f"oci:{tmp_path / 'out'}:v1"),
    ):
        result = run_lazyfs(*args, check=False)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lazyfs: error: "), result.stderr
    assert not (tmp_path / "out").exists()
