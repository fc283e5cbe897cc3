"""podman: the configuration lazyfs writes for it (lazyfs/service/podmanconf.py, ``lazyfs
podman-config``), and a baseline: a private podman pulls an image from the loopback registry,
as built (gzip) and as ``lazyfs convert`` wrote it (zstd:chunked), runs it, removes it."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest
from lazyfs_run import ROOT, run_lazyfs
from oracles import skopeo_copy
from podmanenv import Podman, private_podman, require_podman

from lazyfs.convert.imagebuild import (
    ContainerConfig,
    regular_file,
    symlink,
    with_parent_dirs,
    write_image,
)
from lazyfs.errors import UsageError
from lazyfs.mount.mountinfo import mounts
from lazyfs.registry.localserver import LocalRegistry
from lazyfs.service.podmanconf import podman_config, registries_conf

BUSYBOX = Path("/bin/busybox")
HELLO = b"hello from a lazyfs test image\n"

# --- the configuration -----------------------------------------------------------------------


def test_config_names_the_store_and_the_roots() -> None:
    config = podman_config(
        PurePosixPath("/var/lib/lazyfs-store"), PurePosixPath("/g"), PurePosixPath("/r")
    )
    storage = tomllib.loads(config.storage_conf)
    assert storage["storage"]["driver"] == "overlay"
    assert storage["storage"]["graphroot"] == "/g" and storage["storage"]["runroot"] == "/r"
    assert storage["storage"]["options"]["additionallayerstores"] == ["/var/lib/lazyfs-store:ref"]
    containers = tomllib.loads(config.containers_conf)
    assert containers["engine"]["runtime"] == "runc"
    assert containers["engine"]["tmp_dir"] == "/r/libpod-tmp"  # nothing shared with /run/libpod
    assert containers["containers"]["default_ulimits"] == ["nofile=1024:1024", "nproc=1024:1024"]
    assert config.storage_conf.startswith("# storage.conf: put it at /etc/containers/")
    assert config.containers_conf.startswith("# containers.conf: put it at /etc/containers/")


def test_config_defaults_and_systemd() -> None:
    plain = podman_config(None)
    storage = tomllib.loads(plain.storage_conf)["storage"]
    assert storage["graphroot"] == "/var/lib/containers/storage"
    assert storage["options"]["additionallayerstores"] == []
    engine = tomllib.loads(plain.containers_conf)["engine"]
    assert (engine["cgroup_manager"], engine["events_logger"]) == ("cgroupfs", "file")
    assert "tmp_dir" not in engine  # podman's own, with podman's own runroot
    systemd = tomllib.loads(podman_config(None, systemd=True).containers_conf)["engine"]
    assert (systemd["cgroup_manager"], systemd["events_logger"]) == ("systemd", "journald")


def test_config_quotes_paths() -> None:
    odd = PurePosixPath('/tmp/a "quoted" \\ dir')
    storage = tomllib.loads(podman_config(odd, odd).storage_conf)["storage"]
    assert storage["graphroot"] == str(odd)
    assert storage["options"]["additionallayerstores"] == [f"{odd}:ref"]


@pytest.mark.parametrize(
    ("store", "message"),
    [("/a:b", "with : or ,"), ("/a,b", "with : or ,"), ("rel", "absolute"), ("/a\nb", "control")],
)
def test_config_refuses_bad_store(store: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        podman_config(PurePosixPath(store))


def test_registries_conf() -> None:
    parsed = tomllib.loads(registries_conf(["127.0.0.1:5000", "10.200.1.2:5000"]))
    assert parsed["unqualified-search-registries"] == []
    assert [(r["location"], r["insecure"]) for r in parsed["registry"]] == [
        ("127.0.0.1:5000", True),
        ("10.200.1.2:5000", True),
    ]
    with pytest.raises(UsageError, match="invalid registry host"):
        registries_conf(['a"b'])


def test_cli_prints_both_files(tmp_path: Path) -> None:
    result = run_lazyfs(
        "podman-config", str(tmp_path / "store"), "--graphroot", "g", "--runroot", "/r"
    )
    storage_text, marker, rest = result.stdout.partition("\n\n# containers.conf")
    containers_text = marker + rest
    storage = tomllib.loads(storage_text)["storage"]
    assert storage["options"]["additionallayerstores"] == [f"{tmp_path / 'store'}:ref"]
    assert storage["graphroot"] == str(ROOT / "g")  # relative to where it ran
    assert tomllib.loads(containers_text)["engine"]["runtime"] == "runc"
    document = json.loads(run_lazyfs("podman-config", "/s", "--json").stdout)
    assert document["storage_conf"]["env"] == "CONTAINERS_STORAGE_CONF"
    assert document["containers_conf"]["path"] == "/etc/containers/containers.conf"
    assert tomllib.loads(document["storage_conf"]["text"])["storage"]["driver"] == "overlay"


@pytest.mark.parametrize(
    ("args", "message"), [(["/a:b"], "with : or ,"), ([], "the following arguments")]
)
def test_cli_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lazyfs", "podman-config", *args],
        capture_output=True, text=True, cwd=ROOT, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert result.stdout == ""


# --- podman end to end -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def hello_refs(registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A static-busybox image whose command prints a file, pushed as built and converted."""
    if not BUSYBOX.is_file():
        pytest.skip("needs /bin/busybox (busybox-static)")
    entries = with_parent_dirs(
        [
            regular_file("bin/busybox", BUSYBOX.read_bytes(), 0o755),
            symlink("bin/cat", "busybox"),
            regular_file("etc/hello.txt", HELLO),
        ]
    )
    container = ContainerConfig(command=("/bin/cat", "/etc/hello.txt"))
    image = write_image(
        tmp_path_factory.mktemp("podman-image"), "v1", [entries], container=container
    )
    refs = {"gzip": f"{registry.host}/podman-hello:gzip"}
    skopeo_copy(image.reference, f"docker://{refs['gzip']}")
    refs["chunked"] = f"{registry.host}/podman-hello:chunked"
    run_lazyfs("convert", "-q", image.reference, refs["chunked"])
    return refs


@pytest.fixture
def podman(tmp_path: Path, registry: LocalRegistry) -> Iterator[Podman]:
    require_podman()
    with private_podman(tmp_path / "podman", insecure=[registry.host]) as private:
        yield private
    assert not [m for m in mounts() if m.mountpoint.is_relative_to(tmp_path)]


@pytest.mark.parametrize("variant", ["gzip", "chunked"])
def test_podman_pulls_runs_and_removes(
    podman: Podman, hello_refs: dict[str, str], variant: str
) -> None:
    reference = hello_refs[variant]
    podman.run("pull", "--quiet", reference)
    assert podman.run("run", "--rm", "--network=none", reference).stdout.encode() == HELLO
    output = podman.run("run", "--rm", "--network=none", reference, "cat", "/etc/hello.txt")
    assert output.stdout.encode() == HELLO
    podman.run("rmi", reference)
    assert podman.run("images", "--quiet").stdout.strip() == ""
