"""RegistryClient against the fault-injecting server: retries, Range quirks, auth, secrets."""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import stat
import time
from pathlib import Path

import anyio
import pytest
from faulthelpers import FAST_RETRY, add_blob, ref_on
from faultserver import FaultServer

from lazyfs.config import RegistryConfig, RetryConfig
from lazyfs.errors import (
    AuthError,
    AuthFileError,
    IntegrityError,
    RegistryUnreachableError,
    TransientRegistryError,
    UnsupportedMediaTypeError,
    UsageError,
)
from lazyfs.model.digest import Digest
from lazyfs.model.manifests import OCI_MANIFEST
from lazyfs.model.ranges import ByteRange
from lazyfs.model.reference import Reference
from lazyfs.registry.auth import parse_www_authenticate
from lazyfs.registry.client import RegistryClient
from lazyfs.registry.credentials import (
    Credentials,
    CredentialSource,
    DockerConfigCredentials,
    StaticCredentials,
    auth_file_paths,
    parse_creds,
)
from lazyfs.registry.wire import ConnectionRefusedRegistryError

pytestmark = pytest.mark.anyio

USER, PASSWORD = "alice", "pa55-w0rd-s3cret"
FAST = RegistryConfig(retry=FAST_RETRY)


@pytest.fixture
def registry_config() -> RegistryConfig:
    return FAST


def secret_forms() -> list[str]:
    """The password and its Basic encoding: neither may ever be printed."""
    return [PASSWORD, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()]


# ----------------------------------------------------------------------------------- retries


async def test_5xx_then_success(server: FaultServer, client: RegistryClient) -> None:
    data, digest = add_blob(server)
    server.faults.fail_times = 2
    assert await client.get_blob(ref_on(server), digest) == data
    assert client.stats.retries == 2


async def test_429_is_retried(server: FaultServer, client: RegistryClient) -> None:
    data, digest = add_blob(server)
    server.faults.fail_times, server.faults.fail_status = 1, 429
    assert await client.get_blob(ref_on(server), digest) == data


async def test_persistent_5xx_gives_up(server: FaultServer, client: RegistryClient) -> None:
    _, digest = add_blob(server)
    server.faults.fail_times = 100
    with pytest.raises(TransientRegistryError, match=r"UNAVAILABLE, HTTP 503"):
        await client.get_blob(ref_on(server), digest)
    assert server.count("GET", "/v2/test/app/blobs/") == FAST_RETRY.max_attempts


async def test_retry_after_is_honoured(server: FaultServer, client: RegistryClient) -> None:
    data, digest = add_blob(server)
    server.faults.fail_times, server.faults.retry_after = 1, "1"
    started = time.monotonic()
    assert await client.get_blob(ref_on(server), digest) == data
    assert time.monotonic() - started >= 0.9


async def test_slow_answer_times_out(server: FaultServer) -> None:
    _, digest = add_blob(server)
    server.faults.delay_s = 0.5
    config = RegistryConfig(
        fetch_timeout_s=0.1, retry=RetryConfig(max_attempts=2, initial_backoff_s=0.01)
    )
    async with RegistryClient(config) as impatient:
        with pytest.raises(TransientRegistryError, match="timed out"):
            await impatient.get_blob(ref_on(server), digest)
        assert impatient.stats.retries == 1


async def test_truncated_body_is_retried(server: FaultServer, client: RegistryClient) -> None:
    data, digest = add_blob(server, 100_000)
    server.faults.truncate_times = 1
    assert await client.get_blob(ref_on(server), digest) == data
    assert client.stats.retries == 1


async def test_persistent_truncation_gives_up(
    server: FaultServer, client: RegistryClient, tmp_path: Path
) -> None:
    _, digest = add_blob(server, 100_000)
    server.faults.truncate_times = 100
    with pytest.raises(TransientRegistryError, match=str(digest)):
        await client.get_blob(ref_on(server), digest)
    with pytest.raises(TransientRegistryError):
        await client.download_blob(ref_on(server), digest, tmp_path / "blob")
    assert list(tmp_path.iterdir()) == []


async def test_download_progress_adds_up_across_retries(
    server: FaultServer, client: RegistryClient, tmp_path: Path
) -> None:
    data, digest = add_blob(server, 100_000)
    server.faults.truncate_times = 2
    progress: list[int] = []
    size = await client.download_blob(ref_on(server), digest, tmp_path / "b", progress.append)
    assert size == sum(progress) == len(data)
    assert (tmp_path / "b").read_bytes() == data


# ------------------------------------------------------------------------------------ ranges


async def test_range_ignored_answer_is_sliced(server: FaultServer, client: RegistryClient) -> None:
    data, digest = add_blob(server, 50_000)
    server.faults.ignore_range = True
    ref = ref_on(server)
    assert await client.get_blob_range(ref, digest, ByteRange(100, 300)) == data[100:300]
    ranges = [ByteRange(0, 10), ByteRange(40_000, 50_000)]
    assert await client.get_blob_ranges(ref, digest, ranges) == [data[0:10], data[40_000:]]
    assert client.stats.requests["GET"] == 2


async def test_range_ignored_answer_is_verified(
    server: FaultServer, client: RegistryClient
) -> None:
    digest = Digest.of(b"the real blob")
    server.add_blob(os.urandom(5000), str(digest))
    server.faults.ignore_range = True
    with pytest.raises(IntegrityError):
        await client.get_blob_range(ref_on(server), digest, ByteRange(0, 10))


async def test_multi_range_answered_by_one_covering_part(
    server: FaultServer, client: RegistryClient
) -> None:
    data, digest = add_blob(server, 50_000)
    server.faults.coalesce_ranges = True
    ranges = [ByteRange(10, 20), ByteRange(30, 45)]
    assert await client.get_blob_ranges(ref_on(server), digest, ranges) == [
        data[10:20],
        data[30:45],
    ]


async def test_multi_range_multipart(server: FaultServer, client: RegistryClient) -> None:
    data, digest = add_blob(server, 50_000)
    ranges = [ByteRange(10, 20), ByteRange(30_000, 30_045)]
    assert await client.get_blob_ranges(ref_on(server), digest, ranges) == [
        data[10:20],
        data[30_000:30_045],
    ]


# --------------------------------------------------------------------------------- manifests


async def test_unsupported_manifest_media_type(server: FaultServer, client: RegistryClient) -> None:
    server.add_manifest("test/app", "latest", OCI_MANIFEST, b'{"schemaVersion": 1}')
    server.faults.manifest_content_type = (
        "application/vnd.docker.distribution.manifest.v1+prettyjws"
    )
    with pytest.raises(UnsupportedMediaTypeError, match="v1\\+prettyjws"):
        await client.get_manifest(ref_on(server))


async def test_manifest_digest_header_mismatch(server: FaultServer, client: RegistryClient) -> None:
    server.add_manifest("test/app", "latest", OCI_MANIFEST, b'{"schemaVersion": 2}')
    server.faults.manifest_digest_header = str(Digest.of(b"something else"))
    with pytest.raises(IntegrityError, match="test/app:latest"):
        await client.get_manifest(ref_on(server))


async def test_generic_content_type_falls_back_to_media_type_field(
    server: FaultServer, client: RegistryClient
) -> None:
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST}).encode()
    server.add_manifest("test/app", "latest", "application/json", body)
    fetched = await client.get_manifest(ref_on(server))
    assert (fetched.media_type, fetched.digest) == (OCI_MANIFEST, Digest.of(body))


# -------------------------------------------------------------------------------- bearer auth


async def test_bearer_token_flow_and_cache(
    server: FaultServer, client: RegistryClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    data, digest = add_blob(server)
    server.faults.bearer = True
    ref = ref_on(server)
    assert await client.get_blob(ref, digest) == data
    assert await client.get_blob(ref, digest) == data
    assert len(server.token_requests) == 1
    query = server.token_requests[0]
    assert query["service"] == ["fault"]
    assert query["scope"] == ["repository:test/app:pull"]
    assert server.count("GET", "/v2/", status=401) == 1
    assert "tok-" not in caplog.text + repr(client)


async def test_access_token_field_and_default_lifetime(
    server: FaultServer, client: RegistryClient
) -> None:
    data, digest = add_blob(server)
    server.faults.bearer, server.faults.token_field = True, "access_token"
    server.faults.token_lifetime_s = None
    assert await client.get_blob(ref_on(server), digest) == data


async def test_token_refreshed_after_expiry(server: FaultServer, client: RegistryClient) -> None:
    data, digest = add_blob(server)
    server.faults.bearer, server.faults.token_lifetime_s = True, 1
    ref = ref_on(server)
    assert await client.get_blob(ref, digest) == data
    await anyio.sleep(1.0)
    assert await client.get_blob(ref, digest) == data
    assert len(server.token_requests) == 2
    # Refreshed before use, so the second fetch met no challenge.
    assert server.count("GET", "/v2/", status=401) == 1


async def test_rejected_cached_token_is_refetched_once(
    server: FaultServer, client: RegistryClient
) -> None:
    data, digest = add_blob(server)
    server.faults.bearer = True
    ref = ref_on(server)
    await client.get_blob(ref, digest)
    server.revoke_tokens()
    assert await client.get_blob(ref, digest) == data
    assert len(server.token_requests) == 2


async def test_push_and_mount_ask_for_push_scopes(
    server: FaultServer, client: RegistryClient, tmp_path: Path
) -> None:
    server.faults.bearer = True
    data = os.urandom(3000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    digest = Digest.of(data)
    ref = ref_on(server, "test/target")
    await client.push_blob(ref, digest, path, len(data))
    assert server.state.blobs[str(digest)] == data
    assert await client.mount_blob(ref_on(server, "test/other"), digest, "test/target")
    assert [query["scope"] for query in server.token_requests] == [
        ["repository:test/target:pull,push"],
        ["repository:test/other:pull,push", "repository:test/target:pull"],
    ]


async def test_chunked_push_to_fault_server(server: FaultServer, tmp_path: Path) -> None:
    data = os.urandom(10_000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    config = RegistryConfig(monolithic_upload_max_bytes=100, upload_chunk_bytes=3000)
    async with RegistryClient(config) as chunked:
        await chunked.push_blob(ref_on(server), Digest.of(data), path, len(data))
    assert server.count("PATCH") == 4
    assert server.state.blobs[str(Digest.of(data))] == data


async def test_push_of_changed_local_file_is_refused(
    server: FaultServer, client: RegistryClient, tmp_path: Path
) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"what the caller thinks")
    with pytest.raises(IntegrityError, match="local file"):
        await client.push_blob(ref_on(server), Digest.of(b"something else!!!!!"), path, 22)


async def test_bearer_realm_with_basic_credentials(server: FaultServer) -> None:
    data, digest = add_blob(server)
    server.faults.bearer, server.faults.realm_auth = True, (USER, PASSWORD)
    source = StaticCredentials(Credentials(USER, PASSWORD))
    async with RegistryClient(FAST, source) as client:
        assert await client.get_blob(ref_on(server), digest) == data
    assert server.token_requests[0]["account"] == [USER]
    async with RegistryClient(FAST) as anonymous:
        with pytest.raises(AuthError, match="requires credentials"):
            await anonymous.get_blob(ref_on(server), digest)
    wrong = StaticCredentials(Credentials(USER, "wrong"))
    async with RegistryClient(FAST, wrong) as mistaken:
        with pytest.raises(AuthError, match="refused the credentials"):
            await mistaken.get_blob(ref_on(server), digest)


async def test_redirect_drops_authorization(server: FaultServer, client: RegistryClient) -> None:
    data, digest = add_blob(server)
    server.faults.bearer, server.faults.redirect_blobs = True, True
    assert await client.get_blob(ref_on(server), digest) == data
    storage = [r for r in server.requests if r.path.startswith("/storage/")]
    assert storage
    assert all("Authorization" not in r.headers for r in storage)
    blob_gets = [r for r in server.requests if r.path.startswith("/v2/test/app/blobs/")]
    assert "Authorization" in blob_gets[-1].headers


# --------------------------------------------------------------------------------- basic auth


async def test_basic_auth(server: FaultServer) -> None:
    data, digest = add_blob(server)
    server.faults.basic_auth = (USER, PASSWORD)
    async with RegistryClient(FAST, StaticCredentials(Credentials(USER, PASSWORD))) as client:
        assert await client.get_blob(ref_on(server), digest) == data
        assert await client.get_blob(ref_on(server), digest) == data
    # After the first challenge, Basic is sent up front.
    assert server.count("GET", "/v2/", status=401) == 1


async def test_basic_auth_without_credentials(server: FaultServer, client: RegistryClient) -> None:
    _, digest = add_blob(server)
    server.faults.basic_auth = (USER, PASSWORD)
    with pytest.raises(AuthError, match="requires credentials"):
        await client.get_blob(ref_on(server), digest)


async def test_wrong_password_is_auth_error_without_secret(
    server: FaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    _, digest = add_blob(server)
    server.faults.basic_auth = (USER, "the-right-one")
    async with RegistryClient(FAST, StaticCredentials(Credentials(USER, PASSWORD))) as client:
        with pytest.raises(AuthError) as caught:
            await client.get_blob(ref_on(server), digest)
        text = f"{caught.value} {caught.value!r} {client!r} {client._auth!r} {caplog.text}"
    assert "401" in str(caught.value)
    for secret in secret_forms():
        assert secret not in text


# ------------------------------------------------------------------------ docker config files


def write_config(directory: Path, document: dict[str, object]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps(document))
    return path


def docker_environ(tmp_path: Path) -> dict[str, str]:
    return {"HOME": str(tmp_path / "home"), "DOCKER_CONFIG": str(tmp_path / "docker")}


async def fetch_with(server: FaultServer, source: CredentialSource) -> bytes:
    data, digest = add_blob(server)
    server.faults.basic_auth = (USER, PASSWORD)
    async with RegistryClient(FAST, source) as client:
        fetched = await client.get_blob(ref_on(server), digest)
    assert fetched == data
    return fetched


@pytest.mark.parametrize("key_form", ["{host}", "http://{host}/", "https://{host}/v2/"])
async def test_config_json_auths(server: FaultServer, tmp_path: Path, key_form: str) -> None:
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    key = key_form.format(host=server.host)
    write_config(tmp_path / "docker", {"auths": {key: {"auth": auth}}})
    await fetch_with(server, DockerConfigCredentials(environ=docker_environ(tmp_path)))


async def test_config_json_username_password_fields(server: FaultServer, tmp_path: Path) -> None:
    entry = {"username": USER, "password": PASSWORD}
    write_config(tmp_path / "docker", {"auths": {server.host: entry}})
    await fetch_with(server, DockerConfigCredentials(environ=docker_environ(tmp_path)))


async def test_explicit_creds_win_over_config(server: FaultServer, tmp_path: Path) -> None:
    write_config(tmp_path / "docker", {"auths": {server.host: {"username": "x", "password": "y"}}})
    source = DockerConfigCredentials(
        creds=parse_creds(f"{USER}:{PASSWORD}"), environ=docker_environ(tmp_path)
    )
    await fetch_with(server, source)


async def test_registry_auth_file_takes_precedence(server: FaultServer, tmp_path: Path) -> None:
    write_config(tmp_path / "docker", {"auths": {server.host: {"username": "x", "password": "y"}}})
    authfile = write_config(
        tmp_path / "podman", {"auths": {server.host: {"username": USER, "password": PASSWORD}}}
    )
    environ = {**docker_environ(tmp_path), "REGISTRY_AUTH_FILE": str(authfile)}
    await fetch_with(server, DockerConfigCredentials(environ=environ))


@pytest.fixture
def fake_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: FaultServer) -> Path:
    """``docker-credential-test`` on PATH: knows only the fault server; logs what it was asked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    asked = tmp_path / "asked"
    script = bin_dir / "docker-credential-test"
    answer = json.dumps({"ServerURL": server.host, "Username": USER, "Secret": PASSWORD})
    script.write_text(
        "#!/bin/sh\n"
        f'[ "$1" = get ] || exit 2\n'
        f"read -r server\n"
        f'echo "$server" >> {asked}\n'
        f'if [ "$server" = "{server.host}" ]; then echo \'{answer}\'; exit 0; fi\n'
        "echo 'credentials not found in native keychain'; exit 1\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return asked


@pytest.mark.parametrize("section", ["credHelpers", "credsStore"])
async def test_credential_helper(
    server: FaultServer,
    tmp_path: Path,
    fake_helper: Path,
    section: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    document: dict[str, object] = (
        {"credHelpers": {server.host: "test"}}
        if section == "credHelpers"
        else {"credsStore": "test"}
    )
    write_config(tmp_path / "docker", document)
    await fetch_with(server, DockerConfigCredentials(environ=docker_environ(tmp_path)))
    assert fake_helper.read_text().split() == [server.host]
    for secret in secret_forms():
        assert secret not in caplog.text


async def test_credential_helper_without_entry_goes_anonymous(
    tmp_path: Path, fake_helper: Path
) -> None:
    write_config(tmp_path / "docker", {"credsStore": "test"})
    source = DockerConfigCredentials(environ=docker_environ(tmp_path))
    assert source.lookup("example.org") is None
    assert source.lookup("docker.io") is None
    assert fake_helper.read_text().split() == ["example.org", "https://index.docker.io/v1/"]


def test_missing_helper_is_auth_error(tmp_path: Path) -> None:
    write_config(tmp_path / "docker", {"credsStore": "no-such-helper-here"})
    with pytest.raises(AuthError, match="docker-credential-no-such-helper-here not found"):
        DockerConfigCredentials(environ=docker_environ(tmp_path)).lookup("example.org")


def test_malformed_config_is_auth_file_error(tmp_path: Path) -> None:
    (tmp_path / "docker").mkdir()
    (tmp_path / "docker" / "config.json").write_text("{not json")
    with pytest.raises(AuthFileError, match="not valid JSON"):
        DockerConfigCredentials(environ=docker_environ(tmp_path)).lookup("example.org")


# ------------------------------------------------------------------------------ pure helpers


def test_auth_file_order() -> None:
    environ = {"HOME": "/h", "XDG_RUNTIME_DIR": "/run/u", "DOCKER_CONFIG": "/d"}
    assert auth_file_paths(None, environ) == [
        Path("/run/u/containers/auth.json"),
        Path("/h/.config/containers/auth.json"),
        Path("/d/config.json"),
    ]
    assert auth_file_paths(None, {"HOME": "/h"})[-1] == Path("/h/.docker/config.json")
    assert auth_file_paths(None, {**environ, "REGISTRY_AUTH_FILE": "/a.json"}) == [Path("/a.json")]
    assert auth_file_paths(Path("/x.json"), environ) == [Path("/x.json")]


def test_missing_authfile_is_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        DockerConfigCredentials(tmp_path / "nope.json")


def test_parse_creds() -> None:
    assert parse_creds("u:p:q") == Credentials("u", "p:q")
    assert parse_creds("u") == Credentials("u", "")
    with pytest.raises(UsageError):
        parse_creds(":p")
    assert PASSWORD not in repr(Credentials(USER, PASSWORD))


def test_parse_www_authenticate() -> None:
    header = (
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:a/b:pull,push repository:c:pull"'
    )
    (challenge,) = parse_www_authenticate(header)
    assert challenge.scheme == "bearer"
    assert challenge.realm == "https://auth.example/token"
    assert challenge.service == "registry.example"
    assert challenge.scope == "repository:a/b:pull,push repository:c:pull"
    basic, bearer = parse_www_authenticate(
        'Basic realm="x y", Bearer realm="r",error="invalid_token"'
    )
    assert (basic.scheme, basic.realm, bearer.scheme, bearer.params["error"]) == (
        "basic",
        "x y",
        "bearer",
        "invalid_token",
    )
    assert parse_www_authenticate("") == []


# ------------------------------------------------------------- refused, with a cached answer


def _refusing_ref() -> Reference:
    """A loopback port nothing listens on: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return Reference.parse(f"127.0.0.1:{port}/test/app:latest")


async def test_refused_with_a_cached_fallback_gets_one_immediate_retry() -> None:
    slow = RegistryConfig(retry=RetryConfig(max_attempts=5, initial_backoff_s=30.0))
    async with RegistryClient(slow) as client:
        with anyio.fail_after(20):  # not a timing assertion: a 30 s backoff would hang here
            with pytest.raises(ConnectionRefusedRegistryError):
                await client.get_manifest(_refusing_ref(), cached_fallback=True)
        assert client.stats.retries == 1
        assert client.stats.requests["GET"] == 2


async def test_refused_without_a_fallback_is_retried_with_backoff() -> None:
    async with RegistryClient(FAST) as client:
        with pytest.raises(RegistryUnreachableError):
            await client.get_manifest(_refusing_ref())
        assert client.stats.retries == FAST_RETRY.max_attempts - 1
