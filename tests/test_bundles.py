"""Bundles (``lazyfs bundle``): export from a node with a registry, import on one without, then
``lazyfs mount`` with no registry at all; a delta that carries only what changed; tampered
bundles refused whole."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from imagebuild import random_bytes
from lazyfs_run import run_lazyfs
from test_service import read_all, start_service, stop

from lazyfs.convert.imagebuild import regular_file, with_parent_dirs, write_image
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
    print(f"v2 bundle: full {full['bundle_bytes']} bytes, delta {delta['bundle_bytes']} bytes")
    assert delta["chunks"] < full["chunks"] / 4
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
