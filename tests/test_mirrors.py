"""Mirrors: registries.conf-style TOML, fallback to the origin, a pull-through proxy mirror."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from imagebuild import build_feature_image
from lazyfs_run import mounted, run_lazyfs, stats
from oracles import assert_trees_equal, tree_snapshot

from lazyfs.convert.imagebuild import BuiltImage
from lazyfs.errors import UsageError
from lazyfs.model.reference import Reference
from lazyfs.registry.localserver import LocalRegistry
from lazyfs.registry.mirrors import MirrorConfig


def _config(tmp_path: Path, text: str) -> MirrorConfig:
    path = tmp_path / "registries.toml"
    path.write_text(text)
    return MirrorConfig.load(path)


def test_mirrors_come_before_the_origin_and_rewrite_the_prefix(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        """
[[registry]]
prefix = "docker.io/library"
location = "origin.example:5000/hub"
[[registry.mirror]]
location = "edge.local:5001"
insecure = true
[[registry.mirror]]
location = "regional.example/cache"
""",
    )
    ref = Reference.parse("ubuntu:22.04")
    assert [str(r) for r in config.endpoints(ref)] == [
        "edge.local:5001/ubuntu:22.04",
        "regional.example/cache/ubuntu:22.04",
        "origin.example:5000/hub/ubuntu:22.04",
    ]
    assert config.insecure_hosts() == frozenset({"edge.local:5001"})
    other = Reference.parse("quay.io/x/y:1")
    assert config.endpoints(other) == [other]


def test_longest_prefix_wins(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        """
[[registry]]
location = "r.example"
[[registry.mirror]]
location = "m1.example"
[[registry]]
prefix = "r.example/team"
location = "r.example/team"
[[registry.mirror]]
location = "m2.example/team"
""",
    )
    assert config.endpoints(Reference.parse("r.example/team/app:1"))[0].registry == "m2.example"
    assert config.endpoints(Reference.parse("r.example/other/app:1"))[0].registry == "m1.example"


@pytest.mark.parametrize("text", ["registry = 3", "[[registry]]\ninsecure = true", "[[registry]\n"])
def test_bad_config_is_a_usage_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(UsageError):
        _config(tmp_path, text)


@pytest.fixture(scope="module")
def feature(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    return build_feature_image(tmp_path_factory.mktemp("feature") / "oci", "v1")


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_mount_through_proxy_mirror_with_first_mirror_down(
    feature: BuiltImage, tmp_path: Path
) -> None:
    with LocalRegistry(tmp_path / "origin") as origin:
        ref = f"{origin.host}/app:v1"
        run_lazyfs("convert", "-q", feature.reference, ref)
        proxy_config = {"proxy": {"remoteurl": f"http://{origin.host}"}}
        with LocalRegistry(tmp_path / "proxy", extra_config=proxy_config) as proxy:
            config = tmp_path / "registries.toml"
            config.write_text(
                f'[[registry]]\nlocation = "{origin.host}"\n'
                f'[[registry.mirror]]\nlocation = "127.0.0.1:{_dead_port()}"\n'
                f'[[registry.mirror]]\nlocation = "{proxy.host}"\n'
            )
            origin_before = origin.access_log_summary().bytes_written
            with mounted(ref, tmp_path / "mnt", tmp_path / "cache", "--config", str(config)) as mnt:
                mounted_tree = tree_snapshot(mnt)
                assert stats(mnt)["verification_failures"] == 0
            proxy_log = proxy.access_log_summary()
            served_by_proxy = proxy_log.bytes_written
            layers = len(feature.layers)
            # The proxy answers the first Range request of each blob with the whole blob; lazyfs
            # keeps it, so it asks the proxy about each layer blob once (the TOC read) and
            # reads every later chunk of that layer from the kept copy.
            print("proxy blob GETs:", proxy_log.count("GET", "/v2/app/blobs/"), "layers:", layers)
            assert proxy_log.count("GET", "/v2/app/blobs/") <= layers + 1
        with mounted(ref, tmp_path / "direct", tmp_path / "cache2") as mnt:
            direct_tree = tree_snapshot(mnt)
    assert_trees_equal(direct_tree, mounted_tree)
    assert served_by_proxy > 0
    assert origin_before >= 0
