"""Bundles (``lazyfs bundle``): export from a node with a registry, import on one without, then
``lazyfs mount`` with no registry at all; a delta that carries only what changed; tampered
bundles refused whole."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard
from imagebuild import random_bytes
from lazyfs_run import run_lazyfs
from test_service import read_all, start_service, stop

from lazyfs.bundle import tocdelta
from lazyfs.bundle.format import (
    BUNDLE_ARTIFACT_TYPE,
    CONTENTS_MEDIA_TYPE,
    BundleContents,
)
from lazyfs.bundle.importer import import_bundle
from lazyfs.bundle.inventory import read_inventory, read_inventory_file, write_inventory
from lazyfs.bundle.tocdelta import TocDelta
from lazyfs.cache.store import ChunkCache
from lazyfs.convert.imagebuild import regular_file, with_parent_dirs, write_image
from lazyfs.convert.layout import OciLayout
from lazyfs.errors import BundleError
from lazyfs.model.digest import Digest
from lazyfs.model.manifests import MAX_MANIFEST_BYTES, OCI_EMPTY, OCI_MANIFEST, Descriptor, Manifest
from lazyfs.registry.localserver import LocalRegistry

V1 = {f"srv/lib{i:02}.so": random_bytes(200 << 10, seed=500 + i) for i in range(15)}
V2 = {**V1, "srv/lib03.so": random_bytes(200 << 10, seed=999), "srv/new.txt": b"added in v2\n"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path | str]]:
    """v1 and v2 in a registry; a bundle of v1 (a tar), made on a node that then goes away."""
    work = tmp_path_factory.mktemp("bundles")
    with LocalRegistry(work / "registry") as registry:
        refs = {}
        for version, files in (("v1", V1), ("v2", V2)):
            entries = with_parent_dirs(regular_file(p, d) for p, d in files.items())
            built = write_image(work / f"src-{version}", version, [entries])
            refs[version] = f"{registry.host}/bundles/app:{version}"
            run_lazyfs("convert", "-q", built.reference, refs[version])
        bundle = work / "v1.tar"
        run_lazyfs(
            "bundle",
            "export",
            refs["v1"],
            "-o",
            str(bundle),
            "--cache-dir",
            str(work / "src-cache"),
        )
        yield {"work": work, "bundle": bundle, **refs, "registry_dir": work / "registry"}


def _cache_entries(cache: Path) -> int:
    return len(list((cache / "chunks").rglob("*.val")))


def test_import_then_mount_with_no_registry(
    exported: dict[str, Path | str], tmp_path: Path
) -> None:
    cache = tmp_path / "node"
    result = json.loads(
        run_lazyfs(
            "bundle", "import", str(exported["bundle"]), "--cache-dir", str(cache), "--json"
        ).stdout
    )
    assert result["images"] == [exported["v1"]] and result["chunks"] > 0
    served = start_service(tmp_path / "svc", "--cache-dir", str(cache))
    try:  # the registry of the fixture is stopped: nothing to fall back on
        mountpoint = tmp_path / "mnt"
        served.mount(str(exported["v1"]), mountpoint)
        try:
            read_all(mountpoint, V1, threads=4)
        finally:
            served.call("umount", str(mountpoint))
    finally:
        stop(served)


def test_a_delta_carries_only_what_changed(exported: dict[str, Path | str], tmp_path: Path) -> None:
    work = Path(exported["work"])
    node = tmp_path / "node"
    run_lazyfs("bundle", "import", str(exported["bundle"]), "--cache-dir", str(node))
    inventory = tmp_path / "node.inventory"
    run_lazyfs("bundle", "inventory", "-o", str(inventory), "--cache-dir", str(node))
    with LocalRegistry(Path(exported["registry_dir"])):  # the same registry, back up
        full = json.loads(
            run_lazyfs(
                "bundle", "export", str(exported["v2"]), "-o", str(tmp_path / "full"),
                "--cache-dir", str(work / "src-cache"), "--json",
            ).stdout
        )  # fmt: skip
        delta = json.loads(
            run_lazyfs(
                "bundle", "export", str(exported["v2"]), "-o", str(tmp_path / "delta.tar"),
                "--have", str(inventory), "--cache-dir", str(work / "src-cache"), "--json",
            ).stdout
        )  # fmt: skip
    print(
        f"v2 bundle: full {full['bundle_bytes']} bytes, delta {delta['bundle_bytes']} bytes; "
        f"TOC {delta['toc_bytes']} bytes sent as a {delta['toc_delta_bytes']}-byte delta"
    )
    assert delta["chunks"] < full["chunks"] / 4
    # The node holds v1's TOC (its inventory says so): v2's goes as a delta against it.
    assert full["toc_deltas"] == 0 and delta["toc_deltas"] == 1
    assert 0 < delta["toc_delta_bytes"] < delta["toc_bytes"] / 2
    assert delta["skipped_chunks"] >= full["chunks"] - delta["chunks"]
    run_lazyfs("bundle", "import", str(tmp_path / "delta.tar"), "--cache-dir", str(node))
    served = start_service(tmp_path / "svc", "--cache-dir", str(node))
    try:
        served.mount(str(exported["v2"]), tmp_path / "mnt")
        try:
            read_all(tmp_path / "mnt", V2, threads=4)
        finally:
            served.call("umount", str(tmp_path / "mnt"))
    finally:
        stop(served)


def test_a_tampered_bundle_is_refused_whole(
    exported: dict[str, Path | str], tmp_path: Path
) -> None:
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    os.system(f"tar -xf {exported['bundle']} -C {unpacked}")
    contents = json.loads((unpacked / "index.json").read_bytes())
    assert contents["manifests"]
    packs = sorted((unpacked / "blobs/sha256").iterdir(), key=lambda p: -p.stat().st_size)
    biggest = packs[0]  # a pack: flip one byte, and keep the name (its old digest)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    biggest.write_bytes(bytes(data))
    node = tmp_path / "node"
    done = run_lazyfs("bundle", "import", str(unpacked), "--cache-dir", str(node), check=False)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert _cache_entries(node) == 0 if (node / "chunks").exists() else True
    assert not (node / "meta").exists() or not any(
        b"tag:" in p.read_bytes() for p in (node / "meta").rglob("*") if p.is_file()
    )


def test_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "junk").write_bytes(b"not a bundle")
    for argv in (
        ("bundle", "import", str(tmp_path / "junk"), "--cache-dir", str(tmp_path / "c")),
        ("bundle", "import", str(tmp_path / "none"), "--cache-dir", str(tmp_path / "c")),
        ("bundle", "export", "127.0.0.1:1/x:y", "-o", str(tmp_path / "o"), "--have",
         str(tmp_path / "junk"), "--cache-dir", str(tmp_path / "c")),
    ):  # fmt: skip
        done = run_lazyfs(*argv, check=False)
        assert done.returncode != 0 and done.stderr.count("\n") == 1, (argv, done.stderr)
        assert "Traceback" not in done.stderr


def test_a_delta_against_a_toc_the_node_lacks_is_refused_whole(
    exported: dict[str, Path | str], tmp_path: Path
) -> None:
    """A delta bundle imported on a node without the base TOC: one line, nothing admitted."""
    work = Path(exported["work"])
    node = tmp_path / "node"
    run_lazyfs("bundle", "import", str(exported["bundle"]), "--cache-dir", str(node))
    inventory = tmp_path / "node.inventory"
    run_lazyfs("bundle", "inventory", "-o", str(inventory), "--cache-dir", str(node))
    with LocalRegistry(Path(exported["registry_dir"])):
        run_lazyfs(
            "bundle", "export", str(exported["v2"]), "-o", str(tmp_path / "delta"),
            "--have", str(inventory), "--cache-dir", str(work / "src-cache"),
        )  # fmt: skip
    other = tmp_path / "empty-node"
    done = run_lazyfs("bundle", "import", str(tmp_path / "delta"), "--cache-dir", str(other),
                      check=False)  # fmt: skip
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "does not hold" in done.stderr
    assert not (other / "chunks").exists() or _cache_entries(other) == 0


def _tiny_bundle(path: Path, carried: bytes, manifest_bytes: int) -> str:
    """A bundle at ``path`` carrying one metadata entry, ``carried`` (no images, no chunks),
    its manifest padded with an annotation to ``manifest_bytes``; the entry's key."""
    layout = OciLayout.create(path)
    key = f"blob:{Digest.of(carried)}"
    contents = BundleContents((), ((key, layout.add_blob_bytes(carried)),), (), ()).to_json()
    layer = Descriptor(CONTENTS_MEDIA_TYPE, layout.add_blob_bytes(contents), len(contents))
    config = Descriptor(OCI_EMPTY, layout.add_blob_bytes(b"{}"), 2)
    extra = {"artifactType": BUNDLE_ARTIFACT_TYPE}
    unpadded = len(Manifest(OCI_MANIFEST, config, (layer,), {"pad": ""}, extra).to_bytes())
    pad = {"pad": "x" * (manifest_bytes - unpadded)}
    manifest = Manifest(OCI_MANIFEST, config, (layer,), pad, extra).to_bytes()
    assert len(manifest) == manifest_bytes
    descriptor = Descriptor(OCI_MANIFEST, layout.add_blob_bytes(manifest), len(manifest))
    layout.tag(descriptor, "lazyfs-bundle")
    return key


@pytest.mark.parametrize("manifest_bytes", [MAX_MANIFEST_BYTES, MAX_MANIFEST_BYTES + 1])
def test_a_bundle_manifest_over_the_manifest_cap_is_refused(
    tmp_path: Path, manifest_bytes: int
) -> None:
    """The bundle manifest is read no bigger than a registry's manifest may be; over it,
    one line and nothing imported."""
    key = _tiny_bundle(tmp_path / "bundle", b"carried", manifest_bytes)
    cache = ChunkCache(tmp_path / "cache", None)
    try:
        if manifest_bytes <= MAX_MANIFEST_BYTES:
            import_bundle(tmp_path / "bundle", cache, tmp_path / "staging")
            assert cache.get_meta(key) == b"carried"
            return
        with pytest.raises(BundleError, match=r"the bundle manifest is \d+ bytes, more than") as e:
            import_bundle(tmp_path / "bundle", cache, tmp_path / "staging")
        assert "\n" not in str(e.value)
        assert cache.get_meta(key) is None
    finally:
        cache.close()


def test_bundles_without_deltas_stay_version_1(exported: dict[str, Path | str]) -> None:
    """What older importers read: a bundle with no TOC delta is written as version 1."""
    import tarfile

    with tarfile.open(exported["bundle"]) as tar:
        blobs = [m for m in tar.getmembers() if m.name.startswith("blobs/") and m.isfile()]
        documents = [tar.extractfile(m).read() for m in blobs]  # type: ignore[union-attr]
    contents = [d for d in documents if d.startswith(b'{"chunks"')]
    assert len(contents) == 1 and b'"version":1' in contents[0]
    assert BundleContents.parse(contents[0]).deltas == ()


def _toc(entries: int, seed: int, changed: int = 0) -> bytes:
    rows = [
        f'{{"name":"f{i}","digest":"sha256:{(i * 7919 + (seed if i < changed else 0)):064x}"}}'
        for i in range(entries)
    ]
    return ('{"version":1,"entries":[' + ",".join(rows) + "]}").encode()


def test_toc_delta_rebuilds_the_exact_bytes_and_checks_them() -> None:
    base_json, target_json = _toc(4000, 0), _toc(4000, 1, changed=40)
    value = zstandard.ZstdCompressor(level=3).compress(target_json)
    base_value = zstandard.ZstdCompressor(level=3).compress(base_json)
    encoded = tocdelta.encode(value, target_json, base_json)
    assert encoded is not None
    data, level = encoded
    print(f"TOC {len(value)} bytes compressed, delta {len(data)} bytes")
    assert len(data) < len(value) / 5
    key = f"blob:{Digest.of(value)}"
    delta = TocDelta(key, f"blob:{Digest.of(base_value)}", Digest.of(data), len(target_json), level)
    assert tocdelta.decode(delta, data, base_value) == value
    assert tocdelta.pick_base(target_json, {"a": b"{}", "b": base_json}) == "b"
    wrong_base = zstandard.ZstdCompressor(level=3).compress(_toc(4000, 5, changed=4000))
    with pytest.raises(BundleError):
        tocdelta.decode(delta, data, wrong_base)
    with pytest.raises(BundleError, match="declare"):
        tocdelta.decode(TocDelta(key, delta.base, delta.blob, 10, level), data, base_value)
    # A TOC that recompression does not give back (another writer's) gets no delta.
    foreign = zstandard.ZstdCompressor(level=9).compress(target_json)
    assert tocdelta.encode(foreign, target_json, base_json) is None


def test_inventories_of_both_versions_read(tmp_path: Path) -> None:
    verity = "sha256:" + "ab" * 32
    write_inventory([verity], tmp_path / "v1.inv")
    assert (tmp_path / "v1.inv").read_bytes().startswith(b"LAZYFS-INVENTORY 1\n")
    assert read_inventory(tmp_path / "v1.inv") == {verity}
    blob = "blob:sha256:" + "cd" * 32
    write_inventory([verity], tmp_path / "v2.inv", [blob, "tag:x", "alias:y"])
    held = read_inventory_file(tmp_path / "v2.inv")
    assert held.chunks == {verity} and held.blobs == {blob}
    assert held.zstd == tocdelta.zstd_library()
    (tmp_path / "bad.inv").write_bytes(b"LAZYFS-INVENTORY 2\n" + (1 << 40).to_bytes(8, "big"))
    with pytest.raises(BundleError):
        read_inventory_file(tmp_path / "bad.inv")
