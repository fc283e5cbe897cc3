"""Registry auth and TLS end to end: the real docker-registry, the real CLI, real FUSE mounts.

* Token auth: distribution 2.8 with ``auth.token`` whose realm is :class:`tokenserver.TokenServer`
  (htpasswd with bcrypt hashes, ES256 JWTs whose certificate is the registry's rootcertbundle).
  The image is pushed with ``lazyfs convert --dest-creds`` and mounted with ``--creds`` and with
  an ``--authfile``; without credentials or with wrong ones the mount fails in one line.
* TLS: distribution with ``http.tls`` (a test CA, server certificate for localhost and
  127.0.0.1), reached as ``localhost:PORT`` with ``--tls-verify=true`` (loopback defaults to
  plain HTTP): trusted through ``--cert-dir`` or ``SSL_CERT_FILE``, refused without the CA,
  accepted with ``--tls-verify=false``.
* Secrets (the password, the Basic pair, the bearer tokens) never appear in lazyfs's output or
  in the daemon's log file, even at ``--log-level debug``.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from imagebuild import random_bytes
from lazyfs_run import ROOT, stats, wait_gone
from oracles import require_tool

from lazyfs.convert.imagebuild import BuiltImage, directory, regular_file, write_image
from lazyfs.mount.mountinfo import is_mounted
from lazyfs.registry.localserver import LocalRegistry

try:
    from tokenserver import (
        CertifiedKey,
        TokenServer,
        jwt_claims,
        make_ca,
        make_server_cert,
        write_htpasswd,
    )
except ModuleNotFoundError as _missing:  # cryptography or bcrypt: `make setup` installs them
    if os.environ.get("CI") == "true":
        raise
    pytest.skip(f"{_missing.name} is not installed (run make setup)", allow_module_level=True)

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")

USER = "lazyfs-tester"
# Distinctive enough that finding it anywhere means it leaked.
PASSWORD = f"pw-{secrets.token_hex(16)}"
OTHER_USER = "somebody-else"
OTHER_PASSWORD = f"other-{secrets.token_hex(16)}"
WRONG_PASSWORD = f"wrong-{secrets.token_hex(16)}"
SERVICE = "lazyfs-test-registry"
ISSUER = "lazyfs-test-token-issuer"
REPOSITORY = "secure/app"
TLS_REPOSITORY = "tls/app"

FILES: Mapping[str, bytes] = {
    "etc/motd": b"behind token auth\n",
    "data/random.bin": random_bytes(1536 * 1024 + 7, seed=41),
}


def _basic_pair(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


# Every form in which the secrets could leak (plus the bearer tokens, added per check).
_SECRETS = (
    PASSWORD,
    OTHER_PASSWORD,
    WRONG_PASSWORD,
    _basic_pair(USER, PASSWORD),
    _basic_pair(OTHER_USER, OTHER_PASSWORD),
    _basic_pair(USER, WRONG_PASSWORD),
)


# ------------------------------------------------------------------------------------- helpers


class SecretLeakError(AssertionError):
    """A secret showed up where it must not."""


class UnclearMessageError(AssertionError):
    """An error line that does not say what went wrong."""


@dataclass
class SecretWatch:
    """What must never show up: the passwords, Basic pairs, and every token issued so far."""

    token_servers: list[TokenServer]

    def assert_absent(self, text: str, where: str) -> None:
        tokens = [t for server in self.token_servers for t in server.issued]
        for secret in (*_SECRETS, *tokens):
            # Tokens are long; their signature part alone is just as secret.
            for form in {secret, secret.rsplit(".", 1)[-1]}:
                if form in text:
                    raise SecretLeakError(f"a secret leaked into {where}")

    def assert_logs_clean(self, cache_dir: Path) -> list[Path]:
        logs = sorted((cache_dir / "logs").glob("*.log"))
        for log in logs:
            self.assert_absent(log.read_text(encoding="utf-8", errors="replace"), str(log))
        return logs


def _environment(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without anything that could supply credentials or CAs."""
    dropped = {
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REGISTRY_AUTH_FILE",
        "DOCKER_CONFIG",
        "XDG_RUNTIME_DIR",
        "XDG_CONFIG_HOME",
    }
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env["HOME"] = str(home)
    env.update(extra or {})
    return env


@dataclass
class Lazyfs:
    """Runs the real CLI in a hermetic environment and checks its output for secrets."""

    home: Path
    watch: SecretWatch

    def run(
        self, *args: str, env: Mapping[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "lazyfs", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            env=_environment(self.home, env),
            check=False,
        )
        self.watch.assert_absent(result.stdout + result.stderr, f"the output of lazyfs {args}")
        return result

    def check(self, *args: str, env: Mapping[str, str] | None = None) -> None:
        result = self.run(*args, env=env)
        assert result.returncode == 0, f"lazyfs {args} failed:\n{result.stderr}"

    @contextmanager
    def mounted(
        self,
        reference: str,
        where: Path,
        *flags: str,
        env: Mapping[str, str] | None = None,
        log_level: str = "warning",
    ) -> Iterator[Path]:
        """Mount at ``where/mnt`` with cache ``where/cache``; unmount and check the log after."""
        mountpoint, cache_dir = where / "mnt", where / "cache"
        mountpoint.mkdir(parents=True, exist_ok=True)
        self.check(
            "--log-level",
            log_level,
            "mount",
            "--cache-dir",
            str(cache_dir),
            *flags,
            reference,
            str(mountpoint),
            env=env,
        )
        pid = int(stats(mountpoint)["pid"])
        try:
            yield mountpoint
        finally:
            if is_mounted(mountpoint):
                self.run("umount", str(mountpoint))
            if is_mounted(mountpoint):
                subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
            wait_gone(pid)
            assert self.watch.assert_logs_clean(cache_dir), "the daemon wrote no log file"

    def mount_fails(
        self,
        reference: str,
        where: Path,
        *flags: str,
        env: Mapping[str, str] | None = None,
        log_level: str = "warning",
    ) -> str:
        """Mount, expecting a one-line error and exit status 1; returns that line."""
        mountpoint, cache_dir = where / "mnt", where / "cache"
        mountpoint.mkdir(parents=True, exist_ok=True)
        result = self.run(
            "--log-level",
            log_level,
            "mount",
            "--cache-dir",
            str(cache_dir),
            *flags,
            reference,
            str(mountpoint),
            env=env,
        )
        assert result.returncode == 1, f"expected exit 1, got {result.returncode}:\n{result.stderr}"
        # The notice that a mount service was started on demand is not part of the error.
        lines = [
            line
            for line in result.stderr.strip().splitlines()
            if not line.startswith("lazyfs: started a mount service")
        ]
        if log_level == "warning":
            assert len(lines) == 1, f"expected one line of error, got:\n{result.stderr}"
        assert lines[-1].startswith("lazyfs: error: "), result.stderr
        assert not is_mounted(mountpoint)
        _wait_no_service(cache_dir)
        self.watch.assert_logs_clean(cache_dir)
        return lines[-1]


def _wait_no_service(cache_dir: Path, timeout_s: float = 10.0) -> None:
    """The service a failed mount started on demand exits once idle: nothing is left running."""
    deadline = time.monotonic() + timeout_s
    while _services_of(cache_dir):
        if time.monotonic() > deadline:
            raise AssertionError(f"a mount service of {cache_dir} was left running")
        time.sleep(0.05)


def _services_of(cache_dir: Path) -> list[int]:
    """PIDs of ``lazyfs serve`` processes for ``cache_dir``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and os.fsencode(cache_dir) in argv:
            found.append(int(entry.name))
    return found


def _assert_files(mountpoint: Path) -> None:
    for path, data in FILES.items():
        assert (mountpoint / path).read_bytes() == data, path


def _pulls_by(server: TokenServer, user: str | None) -> list[str]:
    return [
        scope
        for request in server.requests
        if request.user == user and request.status == 200
        for scope in request.scopes
    ]


def _write_authfile(path: Path, registry: str, user: str, password: str) -> Path:
    path.write_text(
        json.dumps({"auths": {registry: {"auth": _basic_pair(user, password)}}}), encoding="utf-8"
    )
    path.chmod(0o600)
    return path


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    entries = [directory("etc"), directory("data")]
    entries += [regular_file(path, data) for path, data in FILES.items()]
    return write_image(tmp_path_factory.mktemp("auth-image") / "oci", "v1", [entries])


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenServer]:
    work = tmp_path_factory.mktemp("token-server")
    signer = make_ca(work / "pki", "lazyfs test token signer", stem="token-signer")
    htpasswd = work / "htpasswd"
    write_htpasswd(htpasswd, {USER: PASSWORD, OTHER_USER: OTHER_PASSWORD})
    with TokenServer(htpasswd, signer, SERVICE, ISSUER) as server:
        yield server


@pytest.fixture(scope="module")
def watch(token_server: TokenServer) -> SecretWatch:
    return SecretWatch([token_server])


@pytest.fixture(scope="module")
def lazyfs(tmp_path_factory: pytest.TempPathFactory, watch: SecretWatch) -> Lazyfs:
    require_tool("fusermount3")
    return Lazyfs(tmp_path_factory.mktemp("home"), watch)


@pytest.fixture(scope="module")
def token_registry(
    tmp_path_factory: pytest.TempPathFactory, token_server: TokenServer
) -> Iterator[LocalRegistry]:
    require_tool("docker-registry")
    config = token_server.registry_config(token_server.signer.cert_path)
    with LocalRegistry(tmp_path_factory.mktemp("token-registry"), extra_config=config) as local:
        yield local


@pytest.fixture(scope="module")
def token_ref(
    image: BuiltImage, token_registry: LocalRegistry, token_server: TokenServer, lazyfs: Lazyfs
) -> str:
    """The image, converted and pushed with --dest-creds (debug logging, checked for secrets)."""
    target = f"{token_registry.host}/{REPOSITORY}:v1"
    lazyfs.check(
        "--log-level",
        "debug",
        "convert",
        "-q",
        image.reference,
        target,
        "--dest-creds",
        f"{USER}:{PASSWORD}",
    )
    return target


@dataclass(frozen=True)
class TlsSetup:
    ca: CertifiedKey
    cert_dir: Path  # holds only ca.crt, as containers-certs.d does
    registry: LocalRegistry

    @property
    def host(self) -> str:
        return f"localhost:{self.registry.host.rpartition(':')[2]}"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsSetup]:
    require_tool("docker-registry")
    work = tmp_path_factory.mktemp("tls")
    ca = make_ca(work / "pki", "lazyfs test CA")
    server = make_server_cert(work / "pki", ca, ["localhost", "127.0.0.1"])
    cert_dir = work / "certs.d"
    cert_dir.mkdir()
    shutil.copyfile(ca.cert_path, cert_dir / "ca.crt")
    config = {"http": {"tls": {"certificate": str(server.cert_path), "key": str(server.key_path)}}}
    with LocalRegistry(work / "registry", extra_config=config) as registry:
        yield TlsSetup(ca, cert_dir, registry)


@pytest.fixture(scope="module")
def tls_ref(image: BuiltImage, tls: TlsSetup, lazyfs: Lazyfs) -> str:
    target = f"{tls.host}/{TLS_REPOSITORY}:v1"
    lazyfs.check(
        "convert",
        "-q",
        image.reference,
        target,
        "--dest-tls-verify=true",
        "--cert-dir",
        str(tls.cert_dir),
    )
    return target


# --------------------------------------------------------------------------------- token auth


def test_push_with_dest_creds_got_a_push_token(token_ref: str, token_server: TokenServer) -> None:
    assert f"repository:{REPOSITORY}:pull,push" in _pulls_by(token_server, USER)
    push_grant = {"type": "repository", "name": REPOSITORY, "actions": ["pull", "push"]}
    claims = [jwt_claims(token) for token in token_server.issued]
    pushing = [c for c in claims if push_grant in c["access"]]  # type: ignore[operator]
    assert pushing, "no token granted push"
    assert all(c["aud"] == SERVICE and c["iss"] == ISSUER and c["sub"] == USER for c in pushing)


def test_mount_with_creds(
    token_ref: str, token_server: TokenServer, lazyfs: Lazyfs, tmp_path: Path
) -> None:
    before = len(token_server.requests)
    with lazyfs.mounted(token_ref, tmp_path, "--creds", f"{USER}:{PASSWORD}") as mnt:
        _assert_files(mnt)
    asked = token_server.requests[before:]
    assert asked, "the mount never asked the token server"
    assert all(r.user == USER and r.status == 200 for r in asked)
    assert all(r.account == USER for r in asked)
    assert f"repository:{REPOSITORY}:pull" in {s for r in asked for s in r.scopes}


def test_mount_with_authfile(
    token_ref: str, token_registry: LocalRegistry, lazyfs: Lazyfs, tmp_path: Path
) -> None:
    authfile = _write_authfile(tmp_path / "config.json", token_registry.host, USER, PASSWORD)
    with lazyfs.mounted(token_ref, tmp_path, "--authfile", str(authfile)) as mnt:
        _assert_files(mnt)


def test_mount_with_docker_config_in_home(
    token_ref: str, token_registry: LocalRegistry, lazyfs: Lazyfs, tmp_path: Path
) -> None:
    """No flag at all: ``$DOCKER_CONFIG/config.json`` is where docker keeps its logins."""
    docker_config = tmp_path / "docker"
    docker_config.mkdir()
    _write_authfile(docker_config / "config.json", token_registry.host, USER, PASSWORD)
    env = {"DOCKER_CONFIG": str(docker_config)}
    with lazyfs.mounted(token_ref, tmp_path, env=env) as mnt:
        _assert_files(mnt)


def test_mount_without_credentials_fails(
    token_ref: str, token_server: TokenServer, lazyfs: Lazyfs, tmp_path: Path
) -> None:
    before = len(token_server.requests)
    error = lazyfs.mount_fails(token_ref, tmp_path)
    assert "requires credentials" in error
    assert [r.status for r in token_server.requests[before:]] == [401]


def test_mount_with_anonymous_token_fails(
    token_ref: str, token_server: TokenServer, lazyfs: Lazyfs, tmp_path: Path
) -> None:
    """Docker Hub's way: anonymous requests get a token that grants nothing, then a 401."""
    token_server.anonymous = "empty-token"
    try:
        error = lazyfs.mount_fails(token_ref, tmp_path)
    finally:
        token_server.anonymous = "deny"
    assert "HTTP 401" in error or "UNAUTHORIZED" in error, error


@pytest.mark.parametrize(
    "how",
    ["creds-wrong-password", "creds-unknown-user", "authfile-wrong-password", "other-users-creds"],
)
def test_mount_with_wrong_credentials_fails(
    how: str, token_ref: str, token_registry: LocalRegistry, lazyfs: Lazyfs, tmp_path: Path
) -> None:
    if how == "creds-wrong-password":
        flags = ["--creds", f"{USER}:{WRONG_PASSWORD}"]
    elif how == "creds-unknown-user":
        flags = ["--creds", f"nobody:{PASSWORD}"]
    elif how == "other-users-creds":
        # A real user name with another user's password.
        flags = ["--creds", f"{OTHER_USER}:{PASSWORD}"]
    else:
        authfile = _write_authfile(
            tmp_path / "auth.json", token_registry.host, USER, WRONG_PASSWORD
        )
        flags = ["--authfile", str(authfile)]
    error = lazyfs.mount_fails(token_ref, tmp_path, *flags)
    assert "refused the credentials" in error, error


@pytest.mark.parametrize("outcome", ["mounted", "refused"])
def test_credentials_stay_out_of_debug_output_and_log(
    outcome: str, token_ref: str, lazyfs: Lazyfs, tmp_path: Path
) -> None:
    """At --log-level debug the parent's stderr and the daemon log carry the most detail;
    Lazyfs.run and the mount helpers check both for every secret form, tokens included."""
    if outcome == "mounted":
        flags = ("--creds", f"{USER}:{PASSWORD}")
        with lazyfs.mounted(token_ref, tmp_path, *flags, log_level="debug") as mnt:
            _assert_files(mnt)
    else:
        flags = ("--creds", f"{USER}:{WRONG_PASSWORD}")
        lazyfs.mount_fails(token_ref, tmp_path, *flags, log_level="debug")
    logs = sorted((tmp_path / "cache" / "logs").glob("*.log"))
    assert logs, "the daemon wrote no log"
    assert any(log.stat().st_size > 0 for log in logs), "the debug log is empty"


def test_daemon_command_line_holds_no_password(
    token_ref: str, lazyfs: Lazyfs, tmp_path: Path
) -> None:
    with lazyfs.mounted(token_ref, tmp_path, "--creds", f"{USER}:{PASSWORD}") as mnt:
        pid = int(stats(mnt)["pid"])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        if PASSWORD in cmdline:
            raise SecretLeakError("the daemon's command line shows the password")


# ---------------------------------------------------------------------------------------- TLS


def test_tls_mount_with_cert_dir(
    tls_ref: str, tls: TlsSetup, lazyfs: Lazyfs, tmp_path: Path
) -> None:
    flags = ("--tls-verify=true", "--cert-dir", str(tls.cert_dir))
    with lazyfs.mounted(tls_ref, tmp_path, *flags) as mnt:
        _assert_files(mnt)


def test_tls_mount_with_ssl_cert_file(
    tls_ref: str, tls: TlsSetup, lazyfs: Lazyfs, tmp_path: Path
) -> None:
    env = {"SSL_CERT_FILE": str(tls.ca.cert_path)}
    with lazyfs.mounted(tls_ref, tmp_path, "--tls-verify=true", env=env) as mnt:
        _assert_files(mnt)


@pytest.fixture(scope="module", params=["no-ca", "wrong-ca"])
def untrusted_tls_error(
    request: pytest.FixtureRequest,
    tls_ref: str,
    token_server: TokenServer,
    lazyfs: Lazyfs,
    tmp_path_factory: pytest.TempPathFactory,
) -> str:
    """Mount over TLS without the CA, or with a CA that did not sign the server's
    certificate: exit 1, one line, nothing mounted (Lazyfs.mount_fails); the error line."""
    work = tmp_path_factory.mktemp(f"tls-{request.param}")
    flags = ["--tls-verify=true"]
    if request.param == "wrong-ca":
        wrong = work / "wrong-certs"
        wrong.mkdir()
        shutil.copyfile(token_server.signer.cert_path, wrong / "ca.crt")
        flags += ["--cert-dir", str(wrong)]
    return lazyfs.mount_fails(tls_ref, work, *flags)


def test_tls_mount_with_an_untrusted_certificate_fails(untrusted_tls_error: str) -> None:
    assert untrusted_tls_error.startswith("lazyfs: error: ")


def test_tls_error_names_the_certificate_problem(untrusted_tls_error: str) -> None:
    lowered = untrusted_tls_error.lower()
    if "certificate" not in lowered or "unreachable" in lowered:
        raise UnclearMessageError(untrusted_tls_error)


def test_tls_mount_without_verification(tls_ref: str, lazyfs: Lazyfs, tmp_path: Path) -> None:
    with lazyfs.mounted(tls_ref, tmp_path, "--tls-verify=false") as mnt:
        _assert_files(mnt)
