"""podman (Debian's 4.3.1) runs images lazily through ``lazyfs serve --store``: pull without
fetching layers, run reading a small part, writes in the container's own layer, rmi releasing
the layers. zstd:chunked and eStargz images. Real registry, real podman, runc."""

from __future__ import annotations

import base64
import json
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from imagebuild import random_bytes
from lazyfs_run import run_lazyfs
from podmanenv import Podman, private_podman, require_podman
from test_service import Served, start_service, stop

from lazyfs.convert.imagebuild import regular_file, whiteout, with_parent_dirs, write_image
from lazyfs.registry.localserver import LocalRegistry

BIG = random_bytes(12 << 20, seed=11)  # never read by the workloads
LOWER = with_parent_dirs(
    [
        regular_file("bin/busybox", Path("/bin/busybox").read_bytes(), mode=0o755),
        regular_file("etc/motd", b"served lazily by lazyfs\n"),
        regular_file("etc/gone", b"whited out above\n"),
        regular_file("data/big.bin", BIG),
    ]
)
UPPER = [whiteout("etc/gone"), regular_file("etc/upper.txt", b"from the upper layer\n")]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalRegistry, str, str]]:
    from estargz_build import write_estargz_image
    from oracles import skopeo_copy

    work = tmp_path_factory.mktemp("podman-store")
    with LocalRegistry(work / "registry") as registry:
        image = write_image(work / "src", "v1", [LOWER, UPPER])
        chunked = f"{registry.host}/podman/chunked:v1"
        run_lazyfs("convert", "-q", image.reference, chunked)
        built = write_estargz_image(work / "esgz", "v1", [LOWER, UPPER], chunk_size=256 << 10)
        estargz = f"{registry.host}/podman/estargz:v1"
        skopeo_copy(f"oci:{built.image.layout.path}:v1", f"docker://{estargz}")
        yield registry, chunked, estargz


@pytest.fixture
def podman_store(tmp_path: Path) -> Iterator[tuple[Podman, Served, Path]]:
    require_podman()
    store = tmp_path / "store"
    served = start_service(tmp_path / "svc", "--store", str(store))
    try:
        with private_podman(short_dir(), store) as podman:
            yield podman, served, store
    finally:
        stop(served)
        subprocess.run(["umount", "-l", str(store)], check=False, capture_output=True)


def short_dir() -> Path:
    """podman's root, short: conmon's attach socket lives under it, and a UNIX socket path
    longer than 108 bytes makes every ``podman run`` wait 20 s for conmon at exit."""
    return Path(tempfile.mkdtemp(prefix="pm-", dir="/tmp"))


def fetched(registry: LocalRegistry) -> int:
    return registry.access_log_summary().written("GET", "/v2/")


def image_bytes(registry: LocalRegistry, ref: str) -> int:
    raw = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return sum(layer["size"] for layer in json.loads(raw)["layers"])


@pytest.mark.parametrize("which", ["chunked", "estargz"])
def test_podman_pulls_and_runs_lazily_through_the_store(
    which: str, images: tuple[LocalRegistry, str, str], podman_store: tuple[Podman, Served, Path]
) -> None:
    registry, chunked, estargz = images
    ref = chunked if which == "chunked" else estargz
    podman, served, store = podman_store
    total = image_bytes(registry, ref)

    before = fetched(registry)
    podman.run("pull", "--tls-verify=false", ref)
    pulled = fetched(registry) - before
    assert pulled < total / 10, f"the pull fetched {pulled} of {total} bytes"

    run = podman.run("run", "--rm", "--net=none", ref, "/bin/busybox", "cat", "/etc/motd")
    assert run.stdout == "served lazily by lazyfs\n"
    listing = podman.run("run", "--rm", "--net=none", ref, "/bin/busybox", "ls", "/etc")
    assert "upper.txt" in listing.stdout.split() and "gone" not in listing.stdout.split()
    ran = fetched(registry) - before
    assert ran < total / 2, f"pull and run fetched {ran} of {total} bytes"
    service = json.loads(served.call("stats", "--json").stdout)
    assert service["store_images"] == 1 and service["verification_failures"] == 0

    # The container writes to its own layer; the image's layer is untouched.
    def in_container(*argv: str) -> str:
        return podman.run("run", "--rm", "--net=none", ref, "/bin/busybox", *argv).stdout

    assert in_container("sh", "-c", "echo changed > /etc/motd; cat /etc/motd") == "changed\n"
    assert in_container("cat", "/etc/motd") == "served lazily by lazyfs\n"
    ref_dir = store / base64.b64encode(ref.encode()).decode()
    assert any((d / "diff/etc/motd").exists() for d in ref_dir.iterdir())

    podman.run("rmi", ref)
    assert json.loads(served.call("stats", "--json").stdout)["store_images"] == 0


def test_without_the_store_podman_pulls_in_full(
    images: tuple[LocalRegistry, str, str], tmp_path: Path
) -> None:
    """The baseline: the same image, no layer store, is fetched whole (and still runs)."""
    require_podman()
    registry, chunked, _ = images
    with private_podman(short_dir()) as podman:
        before = fetched(registry)
        podman.run("pull", "--tls-verify=false", chunked)
        assert fetched(registry) - before >= image_bytes(registry, chunked)
        run = podman.run("run", "--rm", "--net=none", chunked, "/bin/busybox", "cat", "/etc/motd")
        assert run.stdout == "served lazily by lazyfs\n"
