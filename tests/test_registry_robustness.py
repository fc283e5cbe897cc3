"""RegistryClient against registries and links that fail (issue 12; docs/reliability.md).

Each test injects one fault with tests/faultserver.py and checks the outcome: served right
anyway, retried, or refused with one line naming what went wrong. Several ranges answered with
416 or the whole blob fall back to one range per request, remembered per registry host; a
stalled or trickling body ends within the stall timeout and is retried; a wrong Content-Range
or a truncated body is caught; a redirect carries no credentials; plain HTTP where HTTPS was
expected is reported as such, not as an unreachable registry.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from faulthelpers import FAST_RETRY, add_blob, ref_on
from faultserver import FaultServer

from lazyfs.config import RegistryConfig, RetryConfig
from lazyfs.errors import (
    RegistryError,
    RegistryProtocolError,
    RegistryUnreachableError,
    TransientRegistryError,
)
from lazyfs.model.manifests import OCI_MANIFEST
from lazyfs.model.ranges import ByteRange
from lazyfs.model.reference import Reference
from lazyfs.registry.client import RegistryClient
from lazyfs.registry.credentials import Credentials, StaticCredentials

pytestmark = pytest.mark.anyio

# A stall is declared after 0.3 s without 4 KiB of progress.
FAST = RegistryConfig(retry=FAST_RETRY, stall_timeout_s=0.3, stall_min_bytes=4096)
BLOB_BYTES = 50_000
RANGES = [ByteRange(10, 20), ByteRange(30_000, 30_045), ByteRange(49_000, 50_000)]


@pytest.fixture
def registry_config() -> RegistryConfig:
    return FAST


def wanted(data: bytes) -> list[bytes]:
    return [data[r.start : r.end] for r in RANGES]


def range_headers(server: FaultServer) -> list[str]:
    return [r.headers.get("Range", "") for r in server.requests if "/blobs/" in r.path]


def assert_one_line(exc: BaseException) -> None:
    assert "\n" not in str(exc) and str(exc)


# ----------------------------------------------------------------------- several ranges at once


async def test_416_to_several_ranges_falls_back_to_one_range_each(
    server: FaultServer, client: RegistryClient
) -> None:
    data, digest = add_blob(server, BLOB_BYTES)
    server.faults.multi_range_status = 416
    assert await client.get_blob_ranges(ref_on(server), digest, RANGES) == wanted(data)
    assert await client.get_blob_ranges(ref_on(server), digest, RANGES) == wanted(data)
    headers = range_headers(server)
    # One multi-range request was refused; everything after it asked for one range.
    assert [h.count(",") for h in headers] == [2] + [0] * 6
    assert client.stats.retries == 0


async def test_whole_blob_to_several_ranges_is_used_then_one_range_each(
    server: FaultServer, client: RegistryClient
) -> None:
    data, digest = add_blob(server, BLOB_BYTES)
    server.faults.multi_range_status = 200
    assert await client.get_blob_ranges(ref_on(server), digest, RANGES) == wanted(data)
    assert await client.get_blob_ranges(ref_on(server), digest, RANGES) == wanted(data)
    statuses = [r.status for r in server.requests if "/blobs/" in r.path]
    assert statuses == [200, 206, 206, 206]
    assert [h.count(",") for h in range_headers(server)] == [2, 0, 0, 0]


async def test_single_range_hosts_are_remembered_per_registry(client: RegistryClient) -> None:
    with FaultServer() as refusing, FaultServer() as serving:
        data, digest = add_blob(refusing, BLOB_BYTES)
        serving.add_blob(data)
        refusing.faults.multi_range_status = 416
        assert await client.get_blob_ranges(ref_on(refusing), digest, RANGES) == wanted(data)
        assert await client.get_blob_ranges(ref_on(serving), digest, RANGES) == wanted(data)
        assert [h.count(",") for h in range_headers(serving)] == [2]  # still multipart there


async def test_416_to_one_range_is_an_error_without_retries(
    server: FaultServer, client: RegistryClient
) -> None:
    _, digest = add_blob(server, 50)
    with pytest.raises(RegistryError, match="HTTP 416") as caught:
        await client.get_blob_range(ref_on(server), digest, ByteRange(100, 200))
    assert_one_line(caught.value)
    assert client.stats.retries == 0


# ----------------------------------------------------------------------------- stalled bodies


@pytest.mark.parametrize("operation", ["get_blob", "get_blob_range", "download_blob"])
async def test_a_stalled_body_ends_and_is_retried(
    server: FaultServer, client: RegistryClient, operation: str, tmp_path: Path
) -> None:
    data, digest = add_blob(server, 100_000)
    server.faults.stall_after_bytes, server.faults.stall_times = 1000, 1
    started = time.monotonic()
    ref = ref_on(server)
    if operation == "get_blob":
        assert await client.get_blob(ref, digest) == data
    elif operation == "get_blob_range":
        assert await client.get_blob_range(ref, digest, ByteRange(0, 50_000)) == data[:50_000]
    else:
        path = tmp_path / "blob"
        assert await client.download_blob(ref, digest, path) == len(data)
        assert path.read_bytes() == data
    assert client.stats.retries == 1
    assert time.monotonic() - started < 3  # the stall timeout, not the 30 s the server waits


async def test_a_body_that_stays_stalled_gives_up_in_one_line(
    server: FaultServer, client: RegistryClient
) -> None:
    _, digest = add_blob(server, 100_000)
    server.faults.stall_after_bytes, server.faults.stall_times = 1000, 100
    with pytest.raises(TransientRegistryError, match="stalled") as caught:
        await client.get_blob(ref_on(server), digest)
    assert_one_line(caught.value)
    assert client.stats.retries == FAST_RETRY.max_attempts - 1


async def test_a_trickle_is_a_stall(server: FaultServer, client: RegistryClient) -> None:
    _, digest = add_blob(server, 100_000)
    server.faults.stall_times, server.faults.trickle_interval_s = 100, 0.01  # ~100 bytes/s
    started = time.monotonic()
    with pytest.raises(TransientRegistryError, match="stalled"):
        await client.get_blob(ref_on(server), digest)
    assert time.monotonic() - started < 5


async def test_a_slow_body_that_progresses_is_no_stall(server: FaultServer) -> None:
    data, digest = add_blob(server, 40)
    server.faults.stall_times, server.faults.trickle_interval_s = 1, 0.02  # 40 bytes in 0.8 s
    patient = RegistryConfig(retry=FAST_RETRY, stall_timeout_s=0.3, stall_min_bytes=4)
    async with RegistryClient(patient) as client:
        assert await client.get_blob(ref_on(server), digest) == data
        assert client.stats.retries == 0


async def test_a_stalled_multipart_answer_ends(server: FaultServer, client: RegistryClient) -> None:
    _, digest = add_blob(server, 100_000)
    server.faults.stall_after_bytes, server.faults.stall_times = 10, 100
    with pytest.raises(TransientRegistryError, match="stalled"):
        await client.get_blob_ranges(ref_on(server), digest, RANGES)


async def test_a_stalled_manifest_ends(server: FaultServer, client: RegistryClient) -> None:
    manifest = b'{"schemaVersion":2,"mediaType":"' + OCI_MANIFEST.encode() + b'"}' + b" " * 9000
    server.add_manifest("test/app", "latest", OCI_MANIFEST, manifest)
    server.faults.stall_after_bytes, server.faults.stall_times = 100, 1
    fetched = await client.get_manifest(ref_on(server))
    assert fetched.data == manifest
    assert client.stats.retries == 1


# ------------------------------------------------------------------ wrong or truncated answers


async def test_a_shifted_content_range_is_refused(
    server: FaultServer, client: RegistryClient
) -> None:
    _, digest = add_blob(server, BLOB_BYTES)
    server.faults.content_range_shift = 1  # claims bytes 101-200 for a request of 100-199
    with pytest.raises(RegistryProtocolError, match="lacks bytes") as caught:
        await client.get_blob_range(ref_on(server), digest, ByteRange(100, 200))
    assert_one_line(caught.value)


@pytest.mark.parametrize(
    ("content_range", "error"),
    [
        ("bytes 100-149/50000", TransientRegistryError),  # shorter than the body
        ("bytes 100-299/50000", TransientRegistryError),  # longer than the body
        ("bytes 199-100/50000", RegistryProtocolError),  # ends before it starts
        ("bytes 100-199/150", RegistryProtocolError),  # past the total
        ("items 100-199/50000", RegistryProtocolError),  # not bytes
        ("garbage", RegistryProtocolError),
    ],
)
async def test_a_wrong_content_range_is_caught(
    server: FaultServer, client: RegistryClient, content_range: str, error: type[Exception]
) -> None:
    _, digest = add_blob(server, BLOB_BYTES)
    server.faults.content_range_override = content_range
    with pytest.raises(error) as caught:
        await client.get_blob_range(ref_on(server), digest, ByteRange(100, 200))
    assert_one_line(caught.value)


async def test_a_206_without_content_range_is_refused(
    server: FaultServer, client: RegistryClient
) -> None:
    _, digest = add_blob(server, BLOB_BYTES)
    server.faults.content_range_override = ""
    with pytest.raises(RegistryProtocolError, match="without Content-Range") as caught:
        await client.get_blob_range(ref_on(server), digest, ByteRange(100, 200))
    assert_one_line(caught.value)


@pytest.mark.parametrize("ranges", [[ByteRange(100, 30_000)], RANGES])
async def test_a_truncated_range_answer_is_retried(
    server: FaultServer, client: RegistryClient, ranges: list[ByteRange]
) -> None:
    data, digest = add_blob(server, BLOB_BYTES)
    server.faults.truncate_times = 1
    answer = await client.get_blob_ranges(ref_on(server), digest, ranges)
    assert answer == [data[r.start : r.end] for r in ranges]
    assert client.stats.retries == 1


async def test_a_truncated_whole_blob_answer_to_a_range_is_retried(
    server: FaultServer, client: RegistryClient
) -> None:
    data, digest = add_blob(server, BLOB_BYTES)
    server.faults.ignore_range, server.faults.truncate_times = True, 1
    assert await client.get_blob_range(ref_on(server), digest, ByteRange(5, 50)) == data[5:50]
    assert client.stats.retries == 1


async def test_a_body_longer_than_the_descriptor_says_is_refused_early(
    server: FaultServer, client: RegistryClient
) -> None:
    _, digest = add_blob(server, 100_000)
    with pytest.raises(RegistryProtocolError, match="larger than 1000") as caught:
        await client.get_blob(ref_on(server), digest, max_bytes=1000)
    assert_one_line(caught.value)
    assert client.stats.bytes_received == 0  # refused by its Content-Length, before reading


# ------------------------------------------------------------------------------------ redirects


@pytest.mark.parametrize("bearer", [False, True])
async def test_a_redirect_to_another_host_carries_no_credentials(
    server: FaultServer, bearer: bool
) -> None:
    data, digest = add_blob(server, BLOB_BYTES)
    server.faults.redirect_blobs = True
    if bearer:
        server.faults.bearer = True
    else:
        server.faults.basic_auth = ("alice", "s3cret")
    credentials = StaticCredentials(Credentials("alice", "s3cret"))
    async with RegistryClient(FAST, credentials) as client:
        assert await client.get_blob_ranges(ref_on(server), digest, RANGES) == wanted(data)
        assert await client.get_blob(ref_on(server), digest) == data
    storage = [r for r in server.requests if r.path.startswith("/storage/")]
    assert len(storage) == 2
    assert all("Authorization" not in r.headers for r in storage)
    sent = [r for r in server.requests if r.path.startswith("/v2/test/app/blobs/")]
    assert "Authorization" in sent[-1].headers


# ------------------------------------------------------------------------- HTTP where HTTPS was


async def test_plain_http_with_tls_verify_on_a_loopback_registry_says_so(
    server: FaultServer,
) -> None:
    """What a remote registry that answers plain HTTP on its TLS port gets: a loopback one
    with --tls-verify=true is spoken to over HTTPS in the same way (traffic stays on
    loopback)."""
    async with RegistryClient(RegistryConfig(retry=FAST_RETRY, tls_verify=True)) as client:
        with pytest.raises(RegistryError) as caught:
            await client.get_manifest(ref_on(server))
    _assert_plain_http_error(caught.value, server.host)


def _assert_plain_http_error(exc: BaseException, host: str) -> None:
    assert type(exc) is RegistryError  # neither unreachable nor transient: no cache fallback
    assert "http: server gave HTTP response to HTTPS client" in str(exc)
    assert host in str(exc)
    assert_one_line(exc)


async def test_an_insecure_registry_still_falls_back_to_plain_http(server: FaultServer) -> None:
    data, digest = add_blob(server, BLOB_BYTES)
    config = RegistryConfig(
        retry=FAST_RETRY, tls_verify=True, insecure_registries=frozenset({server.host})
    )
    async with RegistryClient(config) as client:
        assert await client.get_blob(ref_on(server), digest) == data


async def test_a_closed_tls_port_is_still_unreachable() -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    ref = Reference.parse(f"127.0.0.1:{port}/test/app:latest")
    config = RegistryConfig(retry=RetryConfig(max_attempts=1), tls_verify=True)
    async with RegistryClient(config) as client:
        with pytest.raises(RegistryUnreachableError) as caught:
            await client.get_manifest(ref)
    assert_one_line(caught.value)
