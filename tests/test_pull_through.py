"""A site's pull-through cache (docker-registry in proxy mode) in front of an origin: two
``lazyfs serve`` services with separate caches mount the same image through it, as a mirror from
``--config``, and read every file. The origin serves each blob byte once (issue 13, "Fleets")."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from imagebuild import build_feature_image
from lazyfs_run import run_lazyfs, stats
from oracles import assert_trees_equal, tree_snapshot
from test_service import Served, start_service, stop

from lazyfs.registry.localserver import AccessLogSummary, LocalRegistry
from lazyfs.registry.mirrors import REGISTRIES_CONF_ENV

# distribution 2.8's proxyblobstore on a miss: one fetch to store the blob, one to stream it.
PROXY_FETCHES_PER_MISS = 2
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[LocalRegistry, LocalRegistry, str]]:
    """The origin with the converted image, and the site's pull-through cache in front of it."""
    built = build_feature_image(tmp_path / "oci", "v1")
    with LocalRegistry(tmp_path / "origin") as origin:
        ref = f"{origin.host}/fleet/app:v1"
        run_lazyfs("convert", "-q", built.reference, ref)
        proxy_config = {"proxy": {"remoteurl": f"http://{origin.host}"}}
        with LocalRegistry(tmp_path / "pull-through", extra_config=proxy_config) as proxy:
            yield origin, proxy, ref


def _blobs(origin: LocalRegistry, ref: str) -> dict[str, int]:
    """Size of every blob of the image's manifest (config and layers), by digest."""
    name, _, tag = ref.removeprefix(f"{origin.host}/").rpartition(":")
    request = urllib.request.Request(
        f"{origin.url}/v2/{name}/manifests/{tag}", headers={"Accept": ", ".join(MANIFEST_TYPES)}
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        manifest = json.load(answer)
    return {d["digest"]: d["size"] for d in [manifest["config"], *manifest["layers"]]}


def _mount_and_read(served: Served, ref: str, mountpoint: Path, *flags: str) -> dict[str, object]:
    served.mount(ref, mountpoint, *flags)
    try:
        tree = tree_snapshot(mountpoint)  # reads and hashes every file
        assert stats(mountpoint)["verification_failures"] == 0
    finally:
        served.call("umount", str(mountpoint))
    return dict(tree)


def _origin_blob_gets(
    origin: LocalRegistry, before: AccessLogSummary, prefix: str
) -> dict[str, tuple[int, int]]:
    """(GETs, body bytes) per blob digest the origin served since ``before``."""
    now = origin.access_log_summary()
    fetched = {}
    for method, path in now.requests:
        count = now.requests[(method, path)] - before.requests[(method, path)]
        if method == "GET" and path.startswith(prefix) and count:
            written = now.bytes_by_request[(method, path)] - before.bytes_by_request[(method, path)]
            fetched[path.removeprefix(prefix)] = (count, written)
    return fetched


def test_two_services_behind_one_pull_through_cache_fetch_each_blob_from_the_origin_once(
    site: tuple[LocalRegistry, LocalRegistry, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docker-registry 2.8 answers a blob it does not hold by fetching it from the origin twice,
    whole (one copy stored, one streamed to the client, even for a Range request): that is its
    cost of a miss, seen with a single curl too (../shared/reference.md). What the nodes add is
    checked here: node a's reads cost the origin exactly one miss per blob, node b's nothing."""
    origin, proxy, ref = site
    config = tmp_path / "registries.toml"
    config.write_text(
        f'[[registry]]\nlocation = "{origin.host}"\n'
        f'[[registry.mirror]]\nlocation = "{proxy.host}"\ninsecure = true\n'
    )
    prefix = "/v2/fleet/app/blobs/"
    trees, origin_gets, proxy_gets = [], [], []
    # One after the other, a site's nodes, each with its own cache; node a names the mirror with
    # `lazyfs mount --config`, node b in the registries.conf its service reads.
    for node, flags in (("node-a", ("--config", str(config))), ("node-b", ())):
        before, proxy_before = origin.access_log_summary(), proxy.access_log_summary()
        with monkeypatch.context() as env:
            if not flags:
                env.setenv(REGISTRIES_CONF_ENV, str(config))
            served = start_service(tmp_path / node)
        try:
            trees.append(_mount_and_read(served, ref, tmp_path / node / "mnt", *flags))
        finally:
            stop(served)
        origin_gets.append(_origin_blob_gets(origin, before, prefix))
        proxy_gets.append(
            proxy.access_log_summary().count("GET", prefix) - proxy_before.count("GET", prefix)
        )
    assert_trees_equal(trees[0], trees[1])  # type: ignore[arg-type]
    print("origin blob GETs per node (digest: count, bytes):", origin_gets)
    print("pull-through blob GETs per node:", proxy_gets)

    blobs = _blobs(origin, ref)
    first, second = origin_gets
    assert first and set(first) <= set(blobs)
    for digest, (count, written) in first.items():  # each blob whole, in one miss, once
        assert (count, written) == (PROXY_FETCHES_PER_MISS, PROXY_FETCHES_PER_MISS * blobs[digest])
    assert second == {}  # the second node's chunk ranges never reached the origin
    assert proxy_gets[0] > 0 and proxy_gets[1] > 0  # both nodes were served by the site cache
