"""Test PKI and a small docker-token-spec token server for the registry auth tests.

The token server answers ``GET /token?service=...&scope=...`` the way distribution's token auth
expects (docker's token spec): it checks HTTP Basic credentials against an htpasswd file (bcrypt
hashes), and answers ``{"token", "access_token", "expires_in", "issued_at"}`` with a JWT signed
ES256 by a key whose certificate is in the registry's ``rootcertbundle``. The JWT header carries
that certificate in ``x5c`` and its libtrust key ID in ``kid``; distribution 2.8 accepts either.

Every request is recorded (without secrets) so tests can check what lazyfs asked for.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import secrets
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

import bcrypt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TOKEN_LIFETIME_S = 300
_CERT_LIFETIME = datetime.timedelta(days=2)
_P256_COORDINATE_BYTES = 32


# --------------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class CertifiedKey:
    """A private key and its certificate, both also written as PEM files."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    key_path: Path
    cert_path: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_pair(
    key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, directory: Path, stem: str
) -> CertifiedKey:
    directory.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = directory / f"{stem}.key", directory / f"{stem}.crt"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return CertifiedKey(key, cert, key_path, cert_path)


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _CERT_LIFETIME)
    )


def make_ca(directory: Path, common_name: str, stem: str = "ca") -> CertifiedKey:
    """A self-signed CA certificate (P-256)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(_name(common_name), _name(common_name), key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write_pair(key, cert, directory, stem)


def make_server_cert(
    directory: Path, ca: CertifiedKey, hosts: Sequence[str], stem: str = "server"
) -> CertifiedKey:
    """A TLS server certificate for ``hosts`` (DNS names or IP addresses), signed by ``ca``."""
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        _builder(_name(hosts[0]), ca.cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    return _write_pair(key, cert, directory, stem)


def libtrust_key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """docker/libtrust's key ID: SHA-256 of the DER SubjectPublicKeyInfo, first 240 bits,
    base32 without padding, in colon-separated groups of four characters."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode("ascii").rstrip("=")
    return ":".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))


# ------------------------------------------------------------------------------------ htpasswd


def write_htpasswd(path: Path, users: Mapping[str, str]) -> None:
    """An htpasswd file with bcrypt hashes (what ``htpasswd -Bbn USER PASS`` writes)."""
    lines = [
        f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()}"
        for user, password in users.items()
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    path.chmod(0o600)


def read_htpasswd(path: Path) -> dict[str, bytes]:
    users: dict[str, bytes] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        user, colon, hashed = line.strip().partition(":")
        if colon and user:
            users[user] = hashed.encode()
    return users


# --------------------------------------------------------------------------------------- JWTs


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def sign_jwt(claims: Mapping[str, object], signer: CertifiedKey) -> str:
    """A compact JWS, ES256, with the signer's certificate in ``x5c`` and libtrust ``kid``."""
    header = {
        "typ": "JWT",
        "alg": "ES256",
        "kid": libtrust_key_id(signer.key.public_key()),
        "x5c": [base64.b64encode(signer.cert.public_bytes(serialization.Encoding.DER)).decode()],
    }
    signing_input = (
        _b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + _b64url(json.dumps(claims, separators=(",", ":")).encode())
    )
    der = signer.key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    raw = r.to_bytes(_P256_COORDINATE_BYTES, "big") + s.to_bytes(_P256_COORDINATE_BYTES, "big")
    return f"{signing_input}.{_b64url(raw)}"


def jwt_claims(token: str) -> dict[str, object]:
    """The (unverified) claims of a compact JWT."""
    payload = token.split(".")[1]
    decoded: dict[str, object] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return decoded


# -------------------------------------------------------------------------------- token server


@dataclass(frozen=True)
class TokenRequest:
    """One request the token server saw; secrets are left out."""

    account: str | None  # the ``account`` query parameter
    user: str | None  # the user whose Basic credentials were checked, if any were sent
    scopes: tuple[str, ...]
    status: int


AnonymousPolicy = Literal["deny", "empty-token"]


@dataclass
class TokenServer:
    """A threaded token server on 127.0.0.1; a context manager.

    ``anonymous`` says what a request without credentials gets: ``deny`` answers 401,
    ``empty-token`` a token that grants nothing (what Docker Hub does for private images).
    """

    htpasswd: Path
    signer: CertifiedKey
    service: str
    issuer: str
    anonymous: AnonymousPolicy = "deny"
    requests: list[TokenRequest] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def realm(self) -> str:
        if self._server is None:
            raise RuntimeError("token server not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/token"

    def __enter__(self) -> Self:
        handler = _handler_for(self)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="token-server", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def registry_config(self, rootcertbundle: Path) -> dict[str, object]:
        """The ``auth.token`` section of a distribution config that trusts this server."""
        return {
            "auth": {
                "token": {
                    "realm": self.realm,
                    "service": self.service,
                    "issuer": self.issuer,
                    "rootcertbundle": str(rootcertbundle),
                }
            }
        }

    def answer(self, query: str, authorization: str | None) -> tuple[int, dict[str, object]]:
        """The status and JSON body for a token request (also recorded)."""
        params = urllib.parse.parse_qs(query)
        account = params.get("account", [None])[0]
        scopes = tuple(s for value in params.get("scope", []) for s in value.split(" ") if s)
        user, authenticated = self._check_basic(authorization)
        if authorization is not None and not authenticated:
            return self._record(TokenRequest(account, user, scopes, 401), _unauthorized())
        if params.get("service", [None])[0] != self.service:
            return self._record(TokenRequest(account, user, scopes, 400), _error("bad service"))
        if user is None and self.anonymous == "deny":
            return self._record(TokenRequest(account, None, scopes, 401), _unauthorized())
        access = [] if user is None else [_grant(scope) for scope in scopes]
        token = self._issue(user or "", [a for a in access if a is not None])
        self.issued.append(token)
        body: dict[str, object] = {
            "token": token,
            "access_token": token,
            "expires_in": TOKEN_LIFETIME_S,
            "issued_at": datetime.datetime.now(datetime.UTC).isoformat(),
        }
        return self._record(TokenRequest(account, user, scopes, 200), body)

    def _record(
        self, request: TokenRequest, body: dict[str, object]
    ) -> tuple[int, dict[str, object]]:
        self.requests.append(request)
        return request.status, body

    def _check_basic(self, authorization: str | None) -> tuple[str | None, bool]:
        """(user name, whether the password matched); (None, False) without Basic auth."""
        if authorization is None or not authorization.lower().startswith("basic "):
            return None, False
        try:
            decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            return None, False
        user, _, password = decoded.partition(":")
        hashed = read_htpasswd(self.htpasswd).get(user)
        ok = hashed is not None and bcrypt.checkpw(password.encode(), hashed)
        return user, ok

    def _issue(self, subject: str, access: list[dict[str, object]]) -> str:
        now = int(time.time())
        claims: dict[str, object] = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + TOKEN_LIFETIME_S,
            "nbf": now - 5,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        return sign_jwt(claims, self.signer)


def _grant(scope: str) -> dict[str, object] | None:
    """Everything asked for, for an authenticated user: ``repository:NAME:pull,push``."""
    kind, colon, rest = scope.partition(":")
    name, colon2, actions = rest.rpartition(":")
    if not colon or not colon2 or kind != "repository" or not name:
        return None
    allowed = [a for a in actions.split(",") if a in ("pull", "push")]
    return {"type": kind, "name": name, "actions": allowed}


def _unauthorized() -> dict[str, object]:
    return {"details": "incorrect username or password"}


def _error(message: str) -> dict[str, object]:
    return {"details": message}


def _handler_for(server: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            if url.path != "/token":
                self._send(404, {"details": "not found"})
                return
            status, body = server.answer(url.query, self.headers.get("Authorization"))
            self._send(status, body)

        def _send(self, status: int, body: dict[str, object]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 401:
                self.send_header("WWW-Authenticate", 'Basic realm="lazyfs-test"')
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass  # keep the test output quiet

    return Handler
