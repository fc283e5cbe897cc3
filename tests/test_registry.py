"""RegistryClient against a real docker-registry (distribution 2.8) on loopback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from lazyfs.config import RegistryConfig, RetryConfig
from lazyfs.errors import (
    IntegrityError,
    NotFoundError,
    RegistryError,
    RegistryUnreachableError,
    UsageError,
)
from lazyfs.model.digest import Digest
from lazyfs.model.manifests import (
    ALL_MANIFEST_TYPES,
    DOCKER_MANIFEST_LIST,
    DOCKER_MANIFEST_V2,
    OCI_INDEX,
    OCI_MANIFEST,
)
from lazyfs.model.ranges import ByteRange
from lazyfs.model.reference import Reference
from lazyfs.registry.client import RegistryClient
from lazyfs.registry.localserver import AccessLogSummary, LocalRegistry

pytestmark = pytest.mark.anyio

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


@dataclass(frozen=True)
class PushedImage:
    manifest_ref: Reference
    manifest: bytes
    manifest_digest: Digest
    index_ref: Reference
    index: bytes
    index_digest: Digest


def fresh_ref(registry: LocalRegistry, tag: str = "latest") -> Reference:
    return Reference.parse(f"{registry.host}/test/r{uuid.uuid4().hex[:12]}:{tag}")


def blob_file(tmp_path: Path, data: bytes) -> tuple[Path, Digest]:
    path = tmp_path / f"blob-{uuid.uuid4().hex[:8]}"
    path.write_bytes(data)
    return path, Digest.of(data)


def stored_blob_path(registry: LocalRegistry, digest: Digest) -> Path:
    return (
        registry.storage_dir / "docker/registry/v2/blobs" / digest.algorithm / digest.hex[:2]
        / digest.hex / "data"
    )  # fmt: skip


def descriptor(media_type: str, data: bytes, **extra: object) -> dict[str, object]:
    return {"mediaType": media_type, "digest": str(Digest.of(data)), "size": len(data), **extra}


async def push_data(client: RegistryClient, ref: Reference, tmp_path: Path, data: bytes) -> Digest:
    path, digest = blob_file(tmp_path, data)
    await client.push_blob(ref, digest, path, len(data))
    return digest


async def push_image(
    client: RegistryClient,
    ref: Reference,
    tmp_path: Path,
    types: tuple[str, str, str, str] = (OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, OCI_INDEX),
) -> PushedImage:
    """Push config + layer, a manifest under ``ref``'s tag and an index under ``<tag>-index``."""
    config_type, layer_type, manifest_type, index_type = types
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {}}).encode()
    layer = os.urandom(3000)
    for data in (config, layer):
        await push_data(client, ref, tmp_path, data)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": descriptor(config_type, config),
            "layers": [descriptor(layer_type, layer)],
        }
    ).encode()
    manifest_digest = await client.push_manifest(ref, manifest_type, manifest)
    platform = {"architecture": "amd64", "os": "linux"}
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": index_type,
            "manifests": [descriptor(manifest_type, manifest, platform=platform)],
        }
    ).encode()
    index_ref = ref.with_tag(f"{ref.tag}-index")
    index_digest = await client.push_manifest(index_ref, index_type, index)
    return PushedImage(ref, manifest, manifest_digest, index_ref, index, index_digest)


@pytest.fixture
async def client() -> AsyncIterator[RegistryClient]:
    async with RegistryClient() as registry_client:
        yield registry_client


# ------------------------------------------------------------------------------------- blobs


async def test_monolithic_push_then_get(
    registry: LocalRegistry, client: RegistryClient, tmp_path: Path
) -> None:
    ref = fresh_ref(registry)
    data = os.urandom(50_000)
    digest = await push_data(client, ref, tmp_path, data)
    assert client.stats.requests["PUT"] == 1
    assert client.stats.requests["PATCH"] == 0
    assert await client.blob_size(ref, digest) == len(data)
    assert await client.get_blob(ref, digest) == data


async def test_chunked_push_when_over_threshold(registry: LocalRegistry, tmp_path: Path) -> None:
    config = RegistryConfig(monolithic_upload_max_bytes=1000, upload_chunk_bytes=4096)
    ref = fresh_ref(registry)
    data = os.urandom(10_000)
    async with RegistryClient(config) as chunked:
        digest = await push_data(chunked, ref, tmp_path, data)
        assert chunked.stats.requests["PATCH"] == 3  # 4096 + 4096 + 1808
        assert await chunked.get_blob(ref, digest) == data


async def test_push_skips_blob_the_registry_has(
    registry: LocalRegistry, client: RegistryClient, tmp_path: Path
) -> None:
    ref = fresh_ref(registry)
    data = os.urandom(1000)
    await push_data(client, ref, tmp_path, data)
    posts = client.stats.requests["POST"]
    await push_data(client, ref, tmp_path, data)
    assert client.stats.requests["POST"] == posts


async def test_cross_repository_mount(
    registry: LocalRegistry, client: RegistryClient, tmp_path: Path
) -> None:
    source, target = fresh_ref(registry), fresh_ref(registry)
    data = os.urandom(2000)
    digest = await push_data(client, source, tmp_path, data)
    assert await client.blob_size(target, digest) is None
    assert await client.mount_blob(target, digest, source.repository)
    assert await client.get_blob(target, digest) == data


async def test_mount_of_unknown_blob_is_refused(
    registry: LocalRegistry, client: RegistryClient
) -> None:
    ref = fresh_ref(registry)
    missing = Digest.of(os.urandom(16))
    assert not await client.mount_blob(ref, missing, "test/nowhere")


async def test_download_blob_streams_to_file(
    registry: LocalRegistry, client: RegistryClient, tmp_path: Path
) -> None:
    ref = fresh_ref(registry)
    data = os.urandom(3 << 20)
    digest = await push_data(client, ref, tmp_path, data)
    progress: list[int] = []
    dest = tmp_path / "out" / "layer"
    dest.parent.mkdir()
    size = await client.download_blob(ref, digest, dest, on_progress=progress.append)
    assert size == len(data) == sum(progress)
    assert dest.read_bytes() == data
    assert sorted(p.name for p in dest.parent.iterdir()) == ["layer"]


# --------------------------------------------------------------------------------- manifests


@pytest.mark.parametrize(
    ("types", "accept_manifest", "accept_index"),
    [
        ((OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, OCI_INDEX), OCI_MANIFEST, OCI_INDEX),
        (
            (DOCKER_CONFIG, DOCKER_LAYER, DOCKER_MANIFEST_V2, DOCKER_MANIFEST_LIST),
            DOCKER_MANIFEST_V2,
            DOCKER_MANIFEST_LIST,
        ),
    ],
    ids=["oci", "docker"],
)
async def test_manifest_and_index_round_trip(
    registry: LocalRegistry,
    client: RegistryClient,
    tmp_path: Path,
    types: tuple[str, str, str, str],
    accept_manifest: str,
    accept_index: str,
) -> None:
    image = await push_image(client, fresh_ref(registry), tmp_path, types)
    for ref, data, digest, media_type in [
        (image.manifest_ref, image.manifest, image.manifest_digest, accept_manifest),
        (image.index_ref, image.index, image.index_digest, accept_index),
    ]:
        assert digest == Digest.of(data)
        for accept in (ALL_MANIFEST_TYPES, [media_type]):
            by_tag = await client.get_manifest(ref, accept)
            assert (by_tag.media_type, by_tag.digest, by_tag.data) == (media_type, digest, data)
        by_digest = await client.get_manifest(ref.with_tag(None).with_digest(digest), [media_type])
        assert by_digest.data == data
        assert await client.resolve(ref) == digest


async def test_oci_manifest_needs_oci_accept_types(
    registry: LocalRegistry, client: RegistryClient, tmp_path: Path
) -> None:
    image = await push_image(client, fresh_ref(registry), tmp_path)
    # The distribution 2.8 quirk reference.md describes: no OCI type in Accept, no manifest.
    with pytest.raises(NotFoundError, match="MANIFEST_UNKNOWN"):
        await client.get_manifest(image.manifest_ref, [DOCKER_MANIFEST_V2])


async def test_corrupted_blob_raises_integrity_error(
    registry: LocalRegistry, client: RegistryClient, tmp_path: Path
) -> None:
    ref = fresh_ref(registry)
    data = os.urandom(4096)
    digest = await push_data(client, ref, tmp_path, data)
    stored_blob_path(registry, digest).write_bytes(os.urandom(4096))
    with pytest.raises(IntegrityError, match=str(digest)):
        await client.get_blob(ref, digest)
    dest = tmp_path / "dl" / "blob"
    dest.parent.mkdir()
    with pytest.raises(IntegrityError):
        await client.download_blob(ref, digest, dest)
    assert list(dest.parent.iterdir()) == []


async def test_corrupted_manifest_raises_integrity_error(
    registry: LocalRegistry, client: RegistryClient, tmp_path: Path
) -> None:
    image = await push_image(client, fresh_ref(registry), tmp_path)
    stored = stored_blob_path(registry, image.manifest_digest)
    stored.write_bytes(image.manifest.replace(b'"schemaVersion": 2', b'"schemaVersion":  2'))
    pinned = image.manifest_ref.with_tag(None).with_digest(image.manifest_digest)
    with pytest.raises(IntegrityError, match="digest mismatch"):
        await client.get_manifest(pinned)
    with pytest.raises(IntegrityError):
        await client.get_manifest(image.manifest_ref)  # checked against Docker-Content-Digest


async def test_wrong_digest_in_reference_is_not_found(
    registry: LocalRegistry, client: RegistryClient, tmp_path: Path
) -> None:
    image = await push_image(client, fresh_ref(registry), tmp_path)
    wrong = Digest.of(b"not this manifest")
    with pytest.raises(NotFoundError):
        await client.get_manifest(image.manifest_ref.with_digest(wrong))


# ------------------------------------------------------------------------------------ ranges


async def test_single_range(
    registry: LocalRegistry, client: RegistryClient, tmp_path: Path
) -> None:
    ref = fresh_ref(registry)
    data = os.urandom(100_000)
    digest = await push_data(client, ref, tmp_path, data)
    assert await client.get_blob_range(ref, digest, ByteRange(10, 20)) == data[10:20]
    assert await client.get_blob_range(ref, digest, ByteRange(99_000, 100_000)) == data[99_000:]


async def test_multi_range_uses_multipart_answer(
    registry: LocalRegistry, client: RegistryClient, tmp_path: Path
) -> None:
    ref = fresh_ref(registry)
    data = os.urandom(100_000)
    digest = await push_data(client, ref, tmp_path, data)
    ranges = [ByteRange(0, 5), ByteRange(1000, 3000), ByteRange(90_000, 100_000)]
    gets = client.stats.requests["GET"]
    pieces = await client.get_blob_ranges(ref, digest, ranges)
    assert pieces == [data[r.start : r.end] for r in ranges]
    assert client.stats.requests["GET"] == gets + 1
    # And the registry really answered multipart/byteranges, not the whole blob.
    url = f"http://{registry.host}/v2/{ref.repository}/blobs/{digest}"
    async with httpx.AsyncClient() as raw:
        answer = await raw.get(url, headers={"Range": "bytes=0-4,1000-2999"})
    assert answer.status_code == 206
    assert answer.headers["Content-Type"].startswith("multipart/byteranges")


@pytest.mark.parametrize(
    "ranges",
    [
        [ByteRange(1000, 3_000_000)],  # one part
        [ByteRange(0, 5), ByteRange(1000, 1_500_000), ByteRange(2_000_000, 3_000_000)],
    ],
)
async def test_a_listener_hears_every_range_byte_as_it_arrives(
    registry: LocalRegistry, client: RegistryClient, tmp_path: Path, ranges: list[ByteRange]
) -> None:
    """``on_data`` (early frames) gets the blob bytes of each part of a real registry's 206
    answer, in order, in more than one piece, before the call returns."""
    ref = fresh_ref(registry)
    data = os.urandom(3_000_000)
    digest = await push_data(client, ref, tmp_path, data)
    heard: list[tuple[int, bytes]] = []
    pieces = await client.get_blob_ranges(
        ref, digest, ranges, lambda offset, piece: heard.append((offset, piece))
    )
    assert pieces == [data[r.start : r.end] for r in ranges]
    assert len(heard) > len(ranges)  # socket reads, not the whole answer at once
    for offset, piece in heard:
        assert piece == data[offset : offset + len(piece)]
    runs: list[list[int]] = []  # what was told, as contiguous runs
    for offset, piece in heard:
        if runs and runs[-1][1] == offset:
            runs[-1][1] += len(piece)
        else:
            runs.append([offset, offset + len(piece)])
    assert runs == [[r.start, r.end] for r in ranges]


async def test_pull_through_proxy_ignores_first_range(
    registry: LocalRegistry, client: RegistryClient, tmp_path: Path
) -> None:
    ref = fresh_ref(registry)
    data = os.urandom(50_000)
    digest = await push_data(client, ref, tmp_path, data)
    proxy_config = {"proxy": {"remoteurl": registry.url}}
    with LocalRegistry(tmp_path / "proxy", extra_config=proxy_config) as proxy:
        proxied = Reference.parse(f"{proxy.host}/{ref.repository}:latest")
        assert await client.get_blob_range(proxied, digest, ByteRange(100, 200)) == data[100:200]
        first = _wait_for_log(proxy, requests=2)  # the readiness probe, then our GET
        # The quirk: the first answer carried the whole blob although Range was asked.
        assert first.written("GET", f"/v2/{ref.repository}/") == len(data)
        # Later answers may be 206 once the proxy has cached the blob (it does so async).
        assert await client.get_blob_range(proxied, digest, ByteRange(300, 400)) == data[300:400]


# ----------------------------------------------------------------------------------- errors


async def test_unknown_manifest_and_blob_are_not_found(
    registry: LocalRegistry, client: RegistryClient
) -> None:
    ref = fresh_ref(registry)
    with pytest.raises(NotFoundError, match=f"{ref}.*MANIFEST_UNKNOWN|NAME_UNKNOWN"):
        await client.get_manifest(ref)
    missing = Digest.of(b"missing")
    with pytest.raises(NotFoundError, match="BLOB_UNKNOWN"):
        await client.get_blob(ref, missing)
    assert await client.blob_size(ref, missing) is None


async def test_unreachable_port(tmp_path: Path) -> None:
    ref = Reference.parse("127.0.0.1:9/test/nothing:latest")  # discard port: nothing listens
    config = RegistryConfig(retry=RetryConfig(max_attempts=2, initial_backoff_s=0.01))
    async with RegistryClient(config) as unreachable:
        with pytest.raises(RegistryUnreachableError, match=r"127\.0\.0\.1:9"):
            await unreachable.get_manifest(ref)
        assert unreachable.stats.retries == 1


# ------------------------------------------------------------------------------- access log


def _wait_for_log(local: LocalRegistry, requests: int) -> AccessLogSummary:
    """The access-log summary once it shows ``requests`` responses (it is written async)."""
    deadline = time.monotonic() + 5
    while True:
        summary = local.access_log_summary()
        if sum(summary.requests.values()) >= requests or time.monotonic() > deadline:
            return summary
        time.sleep(0.05)


async def test_access_log_counts_match_client_stats(
    registry: LocalRegistry, tmp_path: Path
) -> None:
    ref = fresh_ref(registry)
    data = os.urandom(200_000)
    async with RegistryClient() as pusher:
        digest = await push_data(pusher, ref, tmp_path, data)
    before = _wait_for_log(registry, 0)
    async with RegistryClient() as reader:
        await reader.get_blob(ref, digest)
        await reader.get_blob_ranges(ref, digest, [ByteRange(0, 10), ByteRange(500, 700)])
        await reader.blob_size(ref, digest)
        with pytest.raises(NotFoundError):
            await reader.get_blob(ref, Digest.of(b"absent"))
    total_before = sum(before.requests.values())
    after = _wait_for_log(registry, total_before + 4)
    assert after.bytes_written - before.bytes_written == reader.stats.bytes_received
    blob_path = f"/v2/{ref.repository}/blobs/"
    assert after.count("GET", blob_path) - before.count("GET", blob_path) == 3
    assert after.count("HEAD", blob_path) - before.count("HEAD", blob_path) == 1


# ---------------------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalRegistry, Path]]:
    """A registry serving HTTPS with a fresh self-signed certificate for 127.0.0.1."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    root = tmp_path_factory.mktemp("tls")
    cert, key = root / "certs" / "ca.crt", root / "server.key"
    cert.parent.mkdir()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    tls = {"http": {"tls": {"certificate": str(cert), "key": str(key)}}}
    with LocalRegistry(root / "registry", extra_config=tls) as local:
        yield local, cert.parent


@pytest.mark.parametrize("mode", ["no-verify", "cert-dir", "untrusted"])
async def test_tls(tls_registry: tuple[LocalRegistry, Path], tmp_path: Path, mode: str) -> None:
    local, cert_dir = tls_registry
    fast = RetryConfig(max_attempts=1)
    config = {
        "no-verify": RegistryConfig(tls_verify=False, retry=fast),
        "cert-dir": RegistryConfig(tls_verify=True, cert_dir=cert_dir, retry=fast),
        "untrusted": RegistryConfig(tls_verify=True, retry=fast),
    }[mode]
    ref = fresh_ref(local)
    async with RegistryClient(config) as client:
        if mode == "untrusted":
            failed = r"TLS verification failed.*CERTIFICATE_VERIFY_FAILED"
            with pytest.raises(RegistryError, match=failed):
                await client.blob_size(ref, Digest.of(b"x"))
            return
        digest = await push_data(client, ref, tmp_path, b"over tls")
        assert await client.get_blob(ref, digest) == b"over tls"


def test_bad_cert_dir_is_usage_error(tmp_path: Path) -> None:
    (tmp_path / "broken.crt").write_text("not a certificate")
    with pytest.raises(UsageError, match="cannot load certificates"):
        RegistryClient(RegistryConfig(cert_dir=tmp_path))


# ------------------------------------------------------------------------------ LocalRegistry


def test_local_registry_without_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RegistryError, match="docker-registry not found"):
        LocalRegistry(tmp_path / "r").start()


def test_local_registry_that_cannot_start(tmp_path: Path) -> None:
    broken = {"http": {"tls": {"certificate": "/nonexistent.crt", "key": "/nonexistent.key"}}}
    with pytest.raises(RegistryError, match="exited at startup"):
        LocalRegistry(tmp_path / "r", extra_config=broken).start()
