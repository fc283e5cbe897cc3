"""Access profiles kept next to an image (``lazyfs profile push``): an OCI artifact whose
subject is the image, through the referrers tag schema (distribution 2.8 has no referrers API),
found and prefetched by ``lazyfs mount``, the image's digest unchanged."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from imagebuild import random_bytes
from lazyfs_run import run_lazyfs
from test_service import Served

from lazyfs.convert.imagebuild import regular_file, with_parent_dirs, write_image
from lazyfs.registry.localserver import LocalRegistry

FILES = {f"app/m{i:02}.py": random_bytes(96 << 10, seed=100 + i) for i in range(16)}
PROFILE = {
    "version": 1,
    "image": "",
    "reads": [["/app/m03.py", 0, 96 << 10], ["/app/m07.py", 0, 96 << 10]],
}


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalRegistry, str]]:
    work = tmp_path_factory.mktemp("referrers")
    with LocalRegistry(work / "registry") as registry:
        built = write_image(
            work / "src", "v1", [with_parent_dirs(regular_file(p, d) for p, d in FILES.items())]
        )
        ref = f"{registry.host}/referrers/app:v1"
        run_lazyfs("convert", "-q", built.reference, ref)
        yield registry, ref


def digest_of(ref: str) -> str:
    out = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{ref}"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return str(json.loads(out.stdout)["Digest"])


def test_push_keeps_the_image_and_mount_prefetches_the_profile(
    image: tuple[LocalRegistry, str], service: Served, tmp_path: Path
) -> None:
    _registry, ref = image
    before = digest_of(ref)
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(PROFILE))
    pushed = json.loads(run_lazyfs("profile", "push", ref, str(profile), "--json").stdout)
    assert digest_of(ref) == before == pushed["image"]  # the image is untouched

    # The referrers tag schema: an index tagged with the subject's digest lists the artifact.
    algorithm, hexdigest = before.split(":")
    index_ref = ref.rsplit(":", 1)[0] + f":{algorithm}-{hexdigest}"
    raw = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{index_ref}"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    listed = json.loads(raw)["manifests"]
    assert [m["digest"] for m in listed] == [pushed["artifact"]]
    assert listed[0]["artifactType"] == "application/vnd.lazyfs.access-profile.v1+json"

    shown = json.loads(run_lazyfs("profile", "show", ref).stdout)
    assert shown["reads"] == PROFILE["reads"] and shown["image"] == before

    mountpoint = tmp_path / "mnt"
    service.mount(ref, mountpoint)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            figures = json.loads(run_lazyfs("stats", "--json", str(mountpoint)).stdout)
            if figures["prefetch_chunks"] > 0 and figures["range_requests"] > 0:
                break
            time.sleep(0.1)
        assert figures["prefetch_chunks"] > 0, figures
        fetched_before = figures["bytes_fetched"]
        assert (mountpoint / "app/m07.py").read_bytes() == FILES["app/m07.py"]
        after = json.loads(run_lazyfs("stats", "--json", str(mountpoint)).stdout)
        assert after["bytes_fetched"] == fetched_before  # it was prefetched
    finally:
        service.call("umount", str(mountpoint))


def test_bad_profiles_and_missing_images_are_one_line_errors(
    image: tuple[LocalRegistry, str], tmp_path: Path
) -> None:
    registry, ref = image
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for argv in (
        ("profile", "push", ref, str(tmp_path / "missing.json")),
        ("profile", "push", ref, str(bad)),
        ("profile", "show", f"{registry.host}/referrers/none:v1"),
    ):
        done = run_lazyfs(*argv, check=False)
        assert done.returncode != 0, argv
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr


def _log_count(served: Served, line: str) -> int:
    return served.log.read_text(errors="replace").count(line)


def test_a_remount_neither_asks_for_the_profile_again_nor_reorders(
    image: tuple[LocalRegistry, str], service: Served, tmp_path: Path
) -> None:
    """The service keeps what the first mount of an image worked out for its prefetch (the
    attached profile's order) with the indexed image: a remount asks the registry for the
    tag's manifest and nothing else."""
    registry, ref = image
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(PROFILE))
    run_lazyfs("profile", "push", ref, str(profile))
    for attempt, name in enumerate(("m1", "m2")):
        if attempt:
            before = registry.access_log_summary().requests.copy()
        service.mount(ref, tmp_path / name)
        deadline = time.monotonic() + 20
        while _log_count(service, "prefetch done") <= attempt and time.monotonic() < deadline:
            time.sleep(0.05)
        service.call("umount", str(tmp_path / name))
    after = registry.access_log_summary().requests
    new = {key for key in after if after[key] != before.get(key, 0)}
    assert new == {(method, "/v2/referrers/app/manifests/v1") for method, _ in new}, new
    prefetching = [
        line.split("prefetching ", 1)[1]
        for line in service.log.read_text(errors="replace").splitlines()
        if "prefetching" in line and "chunks of the access profile" in line
    ]
    assert len(prefetching) == 2 and prefetching[0] == prefetching[1], prefetching
