"""Mirrors: registries.conf-style TOML, fallback to the origin, a pull-through proxy mirror."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
from imagebuild import build_feature_image, random_bytes
from lazyfs_run import mounted, run_lazyfs, stats
from oracles import assert_trees_equal, tree_snapshot
from test_service import start_service, stop

from lazyfs.convert.imagebuild import BuiltImage, regular_file, with_parent_dirs, write_image
from lazyfs.errors import UsageError
from lazyfs.model.digest import Digest
from lazyfs.model.reference import Reference
from lazyfs.registry import mirrors
from lazyfs.registry.localserver import LocalRegistry
from lazyfs.registry.mirrors import REGISTRIES_CONF_ENV, MirrorConfig, system_mirrors


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


def test_the_attached_profile_is_found_through_the_mirrors(tmp_path: Path) -> None:
    """The referrers lookup of a mount's access profile goes where its blobs do: mirrors in
    order, then the origin. Here the origin is down and only the mirror holds the image and
    its profile; the image has no ranks of its own, so a prefetch shows the profile was found."""
    files = {f"app/m{i:02}.py": random_bytes(96 << 10, seed=300 + i) for i in range(8)}
    built = write_image(
        tmp_path / "src", "v1", [with_parent_dirs(regular_file(p, d) for p, d in files.items())]
    )
    profile = tmp_path / "profile.json"
    reads = [["/app/m03.py", 0, 96 << 10], ["/app/m05.py", 0, 96 << 10]]
    profile.write_text(json.dumps({"version": 1, "image": "", "reads": reads}))
    origin = f"127.0.0.1:{_dead_port()}"
    with LocalRegistry(tmp_path / "mirror") as mirror:
        run_lazyfs("convert", "-q", built.reference, f"{mirror.host}/app:v1")
        run_lazyfs("profile", "push", f"{mirror.host}/app:v1", str(profile))
        config = tmp_path / "registries.toml"
        config.write_text(
            f'[[registry]]\nlocation = "{origin}"\n'
            f'[[registry.mirror]]\nlocation = "127.0.0.1:{_dead_port()}"\n'
            f'[[registry.mirror]]\nlocation = "{mirror.host}"\n'
        )
        ref, lookups = f"{origin}/app:v1", "/v2/app/manifests/sha256-"  # the tag schema's
        before = mirror.access_log_summary().count("GET", lookups)
        with mounted(ref, tmp_path / "mnt", tmp_path / "cache", "--config", str(config)) as mnt:
            deadline = time.monotonic() + 20
            while stats(mnt)["prefetch_chunks"] == 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            figures = stats(mnt)
            assert figures["prefetch_chunks"] > 0, figures
            assert (mnt / "app/m05.py").read_bytes() == files["app/m05.py"]
        assert mirror.access_log_summary().count("GET", lookups) > before


# ------------------------------------------------------------ the host's registries.conf


def test_registries_conf_from_the_environment_variable(tmp_path: Path) -> None:
    path = tmp_path / "registries.conf"
    path.write_text(
        'unqualified-search-registries = ["docker.io"]\n'
        '[[registry]]\nprefix = "r.example/app"\nlocation = "r.example/app"\n'
        '[[registry.mirror]]\nlocation = "edge.local:5000/app"\ninsecure = true\n'
        '[aliases]\n"x" = "docker.io/library/x"\n'
    )
    config = system_mirrors({REGISTRIES_CONF_ENV: str(path), "HOME": str(tmp_path)})
    ref = Reference.parse("r.example/app/web:1")
    assert [e.registry for e in config.endpoints(ref)] == ["edge.local:5000", "r.example"]
    assert config.insecure_hosts() == frozenset({"edge.local:5000"})


def test_a_missing_registries_conf_is_no_error(tmp_path: Path) -> None:
    missing = tmp_path / "none.conf"
    assert system_mirrors({REGISTRIES_CONF_ENV: str(missing)}).rules == ()


@pytest.mark.parametrize("text", ["[[registry]\n", "[[registry]]\nblocked = 'yes'\n", None])
def test_a_malformed_or_unreadable_registries_conf_is_a_one_line_error(
    tmp_path: Path, text: str | None
) -> None:
    path = tmp_path / "registries.conf"
    if text is None:
        path.mkdir()  # unreadable as a file (root reads any mode, so not by chmod)
    else:
        path.write_text(text)
    with pytest.raises(UsageError, match=str(path)) as caught:
        system_mirrors({REGISTRIES_CONF_ENV: str(path)})
    assert "\n" not in str(caught.value)


def _conf(path: Path, mirror: str, mtime_ns: int | None = None) -> None:
    """A registries.conf with one mirror for r.example (every mirror name of the same size)."""
    text = f'[[registry]]\nlocation = "r.example"\n[[registry.mirror]]\nlocation = "{mirror}"\n'
    path.write_text(text)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def _first_mirror(path: Path) -> str:
    config = system_mirrors({REGISTRIES_CONF_ENV: str(path)})
    return config.endpoints(Reference.parse("r.example/app:1"))[0].registry


def test_registries_conf_is_parsed_again_only_when_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if its last change were long ago (ctime cannot be set back).
    monkeypatch.setattr(mirrors, "_SETTLED_NS", -(10**12))
    parsed: list[str] = []
    loads = MirrorConfig.loads

    def counted(text: str, source: str) -> MirrorConfig:
        parsed.append(source)
        return loads(text, source)

    monkeypatch.setattr(MirrorConfig, "loads", counted)
    path = tmp_path / "registries.conf"
    _conf(path, "m1.example", mtime_ns=time.time_ns() - 60 * 10**9)
    assert [_first_mirror(path) for _ in range(3)] == ["m1.example"] * 3
    assert parsed == [str(path)]  # once, though the service asks at every open
    _conf(path, "m2.example", mtime_ns=time.time_ns() - 30 * 10**9)  # same size, new mtime
    assert _first_mirror(path) == "m2.example"
    replacement = tmp_path / "new.conf"  # an editor's rename: another inode
    _conf(replacement, "m3.example", mtime_ns=time.time_ns() - 30 * 10**9)
    replacement.rename(path)
    assert _first_mirror(path) == "m3.example"
    path.unlink()
    assert system_mirrors({REGISTRIES_CONF_ENV: str(path)}).rules == ()


def test_a_registries_conf_changed_just_now_is_never_kept(tmp_path: Path) -> None:
    """Timestamps are coarse: two writes of the same size in one tick look alike to stat."""
    path = tmp_path / "registries.conf"
    _conf(path, "m1.example")
    assert _first_mirror(path) == "m1.example"
    before = path.stat()
    _conf(path, "m2.example", mtime_ns=before.st_mtime_ns)  # the same size and mtime
    assert _first_mirror(path) == "m2.example"


def test_the_user_file_and_drop_ins_as_podman_reads_them(tmp_path: Path) -> None:
    user = tmp_path / ".config" / "containers"
    (user / "registries.conf.d").mkdir(parents=True)
    (user / "registries.conf").write_text(
        '[[registry]]\nlocation = "a.example"\n[[registry.mirror]]\nlocation = "m1.example"\n'
        '[[registry]]\nlocation = "b.example"\n[[registry.mirror]]\nlocation = "m2.example"\n'
    )
    # A drop-in replaces the rules of its prefixes and keeps the others.
    (user / "registries.conf.d" / "50-edge.conf").write_text(
        '[[registry]]\nlocation = "a.example"\n[[registry.mirror]]\nlocation = "edge.local"\n'
    )
    (user / "registries.conf.d" / "ignored.txt").write_text("not toml [")
    config = system_mirrors({"HOME": str(tmp_path)})
    hosts = ("a.example", "b.example")
    first = [config.endpoints(Reference.parse(f"{h}/x:1"))[0].registry for h in hosts]
    assert first == ["edge.local", "m2.example"]


def test_config_rules_replace_the_hosts_of_the_same_prefix() -> None:
    host = MirrorConfig.loads(
        '[[registry]]\nlocation = "a.example"\n[[registry.mirror]]\nlocation = "m1.example"\n'
        '[[registry]]\nlocation = "b.example"\nblocked = true\n',
        "host",
    )
    given = MirrorConfig.loads(
        '[[registry]]\nlocation = "a.example"\n[[registry.mirror]]\nlocation = "m9.example"\n',
        "--config",
    )
    merged = host.merged(given)
    assert merged.endpoints(Reference.parse("a.example/x:1"))[0].registry == "m9.example"
    with pytest.raises(UsageError, match=r"b\.example is blocked in host"):
        merged.endpoints(Reference.parse("b.example/x:1"))


def test_mirror_by_digest_only_skips_mirrors_for_tags() -> None:
    config = MirrorConfig.loads(
        '[[registry]]\nlocation = "a.example"\nmirror-by-digest-only = true\n'
        '[[registry.mirror]]\nlocation = "m.example"\n',
        "test",
    )
    tagged = Reference.parse("a.example/x:1")
    assert [e.registry for e in config.endpoints(tagged)] == ["a.example"]
    pinned = tagged.with_digest(Digest.of(b"manifest"))
    assert [e.registry for e in config.endpoints(pinned)] == ["m.example", "a.example"]


def test_the_service_reads_registries_conf_from_its_environment(
    feature: BuiltImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The origin named in the reference is down; registries.conf sends the mount to a mirror.
    A blocked prefix is refused in one line."""
    dead = f"127.0.0.1:{_dead_port()}"
    with LocalRegistry(tmp_path / "mirror") as mirror:
        run_lazyfs("convert", "-q", feature.reference, f"{mirror.host}/app:v1")
        conf = tmp_path / "registries.conf"
        conf.write_text(
            f'[[registry]]\nlocation = "{dead}"\n'
            f'[[registry.mirror]]\nlocation = "{mirror.host}"\n'
            f'[[registry]]\nprefix = "{mirror.host}/secret"\nlocation = "{mirror.host}/secret"\n'
            "blocked = true\n"
        )
        with monkeypatch.context() as env:
            env.setenv(REGISTRIES_CONF_ENV, str(conf))
            served = start_service(tmp_path / "svc")
        try:
            mnt = tmp_path / "mnt"
            served.mount(f"{dead}/app:v1", mnt)
            assert tree_snapshot(mnt)
            assert mirror.access_log_summary().count("GET", "/v2/app/manifests/") > 0
            served.call("umount", str(mnt))
            (tmp_path / "blocked").mkdir()
            refused = run_lazyfs(
                "mount", "--socket", str(served.socket), f"{mirror.host}/secret/app:v1",
                str(tmp_path / "blocked"), check=False,
            )  # fmt: skip
            assert refused.returncode != 0
            assert refused.stderr.strip().count("\n") == 0 and "blocked" in refused.stderr
        finally:
            stop(served)
