"""Per-host certificate directories (``certs.d/HOST[:PORT]/``) and ``--cert-dir``, against a
real TLS server on loopback: the fault server wrapped in TLS with a test CA, and one that
requires a client certificate. The directories come from ``RegistryConfig.per_host_cert_dirs``
(the tests' own, never /etc)."""

from __future__ import annotations

import datetime
import os
import shutil
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from faultserver import FaultServer
from tokenserver import CertifiedKey, make_ca, make_server_cert

from lazyfs.config import RegistryConfig, RetryConfig
from lazyfs.errors import CertificateError, RegistryError
from lazyfs.model.digest import Digest
from lazyfs.model.reference import Reference
from lazyfs.registry.client import RegistryClient
from lazyfs.registry.tls import cert_dir_for

pytestmark = pytest.mark.anyio

ONCE = RetryConfig(max_attempts=1)
UNTRUSTED = "TLS verification failed.*CERTIFICATE_VERIFY_FAILED"


@dataclass(frozen=True)
class Pki:
    ca: CertifiedKey
    server: CertifiedKey
    client_cert: Path  # PEM, signed by ca, for client authentication
    client_key: Path


def _make_client_cert(directory: Path, ca: CertifiedKey) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lazyfs client")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    cert_path, key_path = directory / "client.pem", directory / "client-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca(directory, "lazyfs certs.d test CA")
    server = make_server_cert(directory, ca, ["127.0.0.1", "localhost"])
    return Pki(ca, server, *_make_client_cert(directory, ca))


def _server_context(pki: Pki, *, client_certificates: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server.cert_path, pki.server.key_path)
    if client_certificates:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=pki.ca.cert_path)
    return context


@pytest.fixture
def server(pki: Pki) -> Iterator[FaultServer]:
    with FaultServer(tls=_server_context(pki, client_certificates=False)) as tls_server:
        yield tls_server


@pytest.fixture
def mtls_server(pki: Pki) -> Iterator[FaultServer]:
    with FaultServer(tls=_server_context(pki, client_certificates=True)) as tls_server:
        yield tls_server


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    """Stand-ins for /etc/containers/certs.d and /etc/docker/certs.d, in that order."""
    return tmp_path / "containers-certs.d", tmp_path / "docker-certs.d"


def _config(roots: tuple[Path, ...], cert_dir: Path | None = None) -> RegistryConfig:
    # tls_verify=True: a loopback registry is otherwise spoken to over plain HTTP.
    return RegistryConfig(tls_verify=True, cert_dir=cert_dir, per_host_cert_dirs=roots, retry=ONCE)


def _host_dir(root: Path, server: FaultServer, *files: tuple[Path, str]) -> Path:
    directory = root / server.host
    directory.mkdir(parents=True, exist_ok=True)
    for source, name in files:
        shutil.copyfile(source, directory / name)
    return directory


async def _fetch(server: FaultServer, config: RegistryConfig) -> None:
    data = os.urandom(5000)
    digest = Digest.parse(server.add_blob(data))
    ref = Reference.parse(f"{server.host}/test/app:latest")
    async with RegistryClient(config) as client:
        assert await client.get_blob(ref, digest) == data


# ---------------------------------------------------------------------------------- CA roots


async def test_ca_in_per_host_dir_is_trusted(
    server: FaultServer, pki: Pki, roots: tuple[Path, Path]
) -> None:
    _host_dir(roots[0], server, (pki.ca.cert_path, "ca.crt"))
    await _fetch(server, _config(roots))


async def test_ca_in_docker_dir_is_trusted(
    server: FaultServer, pki: Pki, roots: tuple[Path, Path]
) -> None:
    _host_dir(roots[1], server, (pki.ca.cert_path, "ca.crt"))
    await _fetch(server, _config(roots))


async def test_without_the_ca_the_server_is_refused(
    server: FaultServer, roots: tuple[Path, Path]
) -> None:
    with pytest.raises(RegistryError, match=UNTRUSTED):
        await _fetch(server, _config(roots))


async def test_another_hosts_dir_is_not_used(
    server: FaultServer, pki: Pki, roots: tuple[Path, Path]
) -> None:
    other = roots[0] / f"127.0.0.1:{server.port + 1}"
    other.mkdir(parents=True)
    shutil.copyfile(pki.ca.cert_path, other / "ca.crt")
    with pytest.raises(RegistryError, match=UNTRUSTED):
        await _fetch(server, _config(roots))


async def test_first_existing_dir_wins(
    server: FaultServer, pki: Pki, roots: tuple[Path, Path]
) -> None:
    """As containers/image: the first HOST directory that exists is the only one read."""
    _host_dir(roots[0], server)  # exists, empty
    _host_dir(roots[1], server, (pki.ca.cert_path, "ca.crt"))
    with pytest.raises(RegistryError, match=UNTRUSTED):
        await _fetch(server, _config(roots))


async def test_cert_dir_replaces_per_host_dirs(
    server: FaultServer, pki: Pki, roots: tuple[Path, Path], tmp_path: Path
) -> None:
    _host_dir(roots[0], server, (pki.ca.cert_path, "ca.crt"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RegistryError, match=UNTRUSTED):
        await _fetch(server, _config(roots, cert_dir=empty))
    given = tmp_path / "given"
    given.mkdir()
    shutil.copyfile(pki.ca.cert_path, given / "ca.crt")
    await _fetch(server, _config((), cert_dir=given))


async def test_redirects_and_tokens_use_the_registrys_certificates(
    server: FaultServer, pki: Pki, roots: tuple[Path, Path]
) -> None:
    """The blob redirect goes to localhost:PORT and the token realm is https too: both are
    trusted through the registry's (127.0.0.1:PORT) directory, as with containers/image."""
    server.faults.redirect_blobs = True
    server.faults.bearer = True
    _host_dir(roots[0], server, (pki.ca.cert_path, "ca.crt"))
    await _fetch(server, _config(roots))
    assert any(r.path.startswith("/storage/") for r in server.requests)
    assert server.token_requests


async def test_plain_http_loopback_reads_no_certificates(roots: tuple[Path, Path]) -> None:
    """A loopback registry without --tls-verify is plain HTTP: its (broken) directory is
    never read."""
    with FaultServer() as plain:
        directory = _host_dir(roots[0], plain)
        (directory / "orphan.cert").write_text("unused")
        config = RegistryConfig(per_host_cert_dirs=roots, retry=ONCE)
        await _fetch(plain, config)


# ------------------------------------------------------------------------ client certificates


async def test_client_certificate_from_per_host_dir(
    mtls_server: FaultServer, pki: Pki, roots: tuple[Path, Path]
) -> None:
    _host_dir(
        roots[0],
        mtls_server,
        (pki.ca.cert_path, "ca.crt"),
        (pki.client_cert, "client.cert"),
        (pki.client_key, "client.key"),
    )
    await _fetch(mtls_server, _config(roots))


async def test_client_certificate_from_cert_dir(
    mtls_server: FaultServer, pki: Pki, tmp_path: Path
) -> None:
    given = tmp_path / "given"
    given.mkdir()
    for source, name in [
        (pki.ca.cert_path, "ca.crt"),
        (pki.client_cert, "me.cert"),
        (pki.client_key, "me.key"),
    ]:
        shutil.copyfile(source, given / name)
    await _fetch(mtls_server, _config((), cert_dir=given))


async def test_without_client_certificate_the_server_refuses(
    mtls_server: FaultServer, pki: Pki, roots: tuple[Path, Path]
) -> None:
    _host_dir(roots[0], mtls_server, (pki.ca.cert_path, "ca.crt"))
    with pytest.raises(RegistryError):
        await _fetch(mtls_server, _config(roots))


async def test_cert_without_key_is_one_line_error(
    server: FaultServer, pki: Pki, roots: tuple[Path, Path]
) -> None:
    directory = _host_dir(roots[0], server, (pki.client_cert, "client.cert"))
    expected = f"missing key {directory / 'client.key'} for client certificate"
    with pytest.raises(CertificateError, match=expected) as caught:
        await _fetch(server, _config(roots))
    assert "\n" not in str(caught.value)


async def test_key_without_cert_is_one_line_error(
    server: FaultServer, pki: Pki, roots: tuple[Path, Path]
) -> None:
    directory = _host_dir(roots[0], server, (pki.client_key, "client.key"))
    expected = f"missing client certificate {directory / 'client.cert'} for key"
    with pytest.raises(CertificateError, match=expected):
        await _fetch(server, _config(roots))


async def test_mismatched_pair_names_the_files(
    server: FaultServer, pki: Pki, roots: tuple[Path, Path]
) -> None:
    directory = _host_dir(
        roots[0], server, (pki.client_cert, "client.cert"), (pki.server.key_path, "client.key")
    )
    with pytest.raises(CertificateError, match=f"client certificate {directory}/client.cert"):
        await _fetch(server, _config(roots))


def test_broken_crt_in_cert_dir_fails_at_start(tmp_path: Path) -> None:
    (tmp_path / "broken.crt").write_text("not a certificate")
    with pytest.raises(CertificateError, match=f"CA file {tmp_path}/broken.crt"):
        RegistryClient(RegistryConfig(cert_dir=tmp_path))


def test_cert_dir_for_order(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    (second / "example.org:5000").mkdir(parents=True)
    config = RegistryConfig(per_host_cert_dirs=(first, second))
    assert cert_dir_for(config, "example.org:5000") == second / "example.org:5000"
    assert cert_dir_for(config, "example.org") is None
    (first / "example.org:5000").mkdir(parents=True)
    assert cert_dir_for(config, "example.org:5000") == first / "example.org:5000"
    given = RegistryConfig(cert_dir=tmp_path, per_host_cert_dirs=(first, second))
    assert cert_dir_for(given, "example.org:5000") == tmp_path


def test_default_per_host_dirs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/u")
    assert RegistryConfig().per_host_cert_dirs == (
        Path("/home/u/.config/containers/certs.d"),
        Path("/etc/containers/certs.d"),
        Path("/etc/docker/certs.d"),
    )
