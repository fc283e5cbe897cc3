"""HTTP_PROXY, HTTPS_PROXY and NO_PROXY for registry traffic (lazyfs/registry/proxy.py): Go's
rules, and a real mount through a real forwarding proxy in front of the real docker-registry."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from faultserver import FaultServer
from forwardproxy import ForwardProxy
from imagebuild import random_bytes
from lazyfs_run import run_lazyfs
from test_service import read_all, start_service, stop

from lazyfs.config import ProxyConfig, RegistryConfig
from lazyfs.convert.imagebuild import regular_file, with_parent_dirs, write_image
from lazyfs.errors import UsageError
from lazyfs.model.digest import Digest
from lazyfs.model.reference import Reference
from lazyfs.registry.client import RegistryClient
from lazyfs.registry.localserver import LocalRegistry
from lazyfs.registry.proxy import ProxyRules

PROXY = "http://proxy.example:3128"
FILES = {f"p/f{i}.bin": random_bytes(96 << 10, seed=700 + i) for i in range(6)}
# Only the proxy resolves it (as a site's dfdaemon resolves names for the nodes behind it).
PROXIED_NAME = "registry.lazyfs.test"


@pytest.mark.parametrize(
    ("no_proxy", "url", "proxied"),
    [
        ("", "https://registry.example/v2/", True),
        ("", "http://registry.example/v2/", True),
        # Go's special case: localhost and loopback literals are never proxied.
        ("", "http://localhost:5000/v2/", False),
        ("", "http://127.0.0.9:5000/v2/", False),
        ("", "https://[::1]:5000/v2/", False),
        ("*", "https://registry.example/v2/", False),
        ("example.com", "https://example.com/", False),
        ("example.com", "https://a.b.example.com/", False),
        ("example.com", "https://notexample.com/", True),
        (".example.com", "https://example.com/", True),
        (".example.com", "https://a.example.com/", False),
        ("*.example.com", "https://a.example.com/", False),
        ("Example.COM ,other", "https://EXAMPLE.com/", False),
        ("example.com:5000", "https://example.com:5000/", False),
        ("example.com:5000", "https://example.com/", True),
        ("example.com:443", "https://example.com/", False),  # the scheme's port
        ("10.0.0.0/8", "https://10.20.30.40:5000/", False),
        ("10.0.0.0/8", "https://11.0.0.1/", True),
        ("192.168.1.7", "http://192.168.1.7:8080/", False),
        ("192.168.1.7:80", "http://192.168.1.7:8080/", True),
        ("[fd00::1]:5000", "https://[fd00::1]:5000/", False),
        ("fd00::/8", "https://[fd12::3]/", False),
        ("bad/cidr,,", "https://registry.example/", True),  # skipped entries, as in Go
    ],
)
def test_no_proxy_follows_go(no_proxy: str, url: str, proxied: bool) -> None:
    rules = ProxyRules(ProxyConfig(PROXY, PROXY, no_proxy))
    assert (rules.for_url(httpx.URL(url)) is not None) is proxied


def test_scheme_picks_the_variable_and_bare_hosts_mean_http() -> None:
    rules = ProxyRules(ProxyConfig("", "proxy.example:3128", ""))
    assert rules.for_url(httpx.URL("http://registry.example/")) is None
    assert rules.for_url(httpx.URL("https://registry.example/")) == httpx.URL(PROXY)


def test_uppercase_variables_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://upper:1")
    monkeypatch.setenv("https_proxy", "http://lower:1")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.setenv("no_proxy", "lower.example")
    assert ProxyConfig.from_environment().https_proxy == "http://upper:1"
    assert ProxyConfig.from_environment().no_proxy == "lower.example"


@pytest.mark.parametrize(
    "value", ["socks5://127.0.0.1:1080", "http://", "http://proxy:port", "http://p:70000"]
)
def test_a_bad_proxy_value_is_a_usage_error_naming_the_variable(value: str) -> None:
    with pytest.raises(UsageError, match=r"^HTTPS_PROXY="):
        ProxyRules(ProxyConfig("", value, ""))


def test_mount_goes_through_the_proxy_and_no_proxy_bypasses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with LocalRegistry(tmp_path / "registry") as registry:
        entries = with_parent_dirs(regular_file(p, d) for p, d in FILES.items())
        built = write_image(tmp_path / "src", "v1", [entries])
        run_lazyfs("convert", "-q", built.reference, f"{registry.host}/proxied/app:v1")
        # Another image for the direct mount: one of the same digest would share the first.
        other = write_image(tmp_path / "other", "v1", [[regular_file("o.txt", b"direct\n")]])
        run_lazyfs("convert", "-q", other.reference, f"{registry.host}/direct/app:v1")
        port = registry.host.rpartition(":")[2]
        with ForwardProxy({PROXIED_NAME: "127.0.0.1"}) as proxy:
            with monkeypatch.context() as env:  # the service's environment only
                env.setenv("HTTP_PROXY", proxy.url)
                env.setenv("https_proxy", proxy.url)
                # 0.0.0.0 reaches the registry directly but, not being a loopback literal, is
                # proxied unless NO_PROXY says otherwise.
                env.setenv("NO_PROXY", "0.0.0.0")
                served = start_service(tmp_path / "svc")
            try:
                # The name only the proxy can resolve: every request goes through it. TLS first
                # (a CONNECT tunnel), then plain HTTP, as for any insecure registry.
                via = tmp_path / "via"
                ref = f"{PROXIED_NAME}:{port}/proxied/app:v1"
                served.mount(ref, via, "--tls-verify=false", "--no-prefetch")
                read_all(via, FILES, threads=2)
                assert proxy.requests[f"GET {PROXIED_NAME}:{port}"] > 0, proxy.requests
                assert proxy.requests[f"CONNECT {PROXIED_NAME}:{port}"] > 0, proxy.requests
                served.call("umount", str(via))

                # NO_PROXY: the registry is asked directly; the proxy sees none of it.
                direct = tmp_path / "direct"
                served.mount(f"0.0.0.0:{port}/direct/app:v1", direct, "--tls-verify=false")
                assert (direct / "o.txt").read_bytes() == b"direct\n"
                assert not [kind for kind in proxy.requests if "0.0.0.0" in kind], proxy.requests
                assert registry.access_log_summary().count("GET", "/v2/direct/app/") > 0
                served.call("umount", str(direct))
            finally:
                stop(served)


def test_a_bad_proxy_url_is_a_one_line_error(
    registry: LocalRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "socks5://127.0.0.1:1080")  # the on-demand service's too
    (tmp_path / "mnt").mkdir()
    result = run_lazyfs(
        "mount", "--cache-dir", str(tmp_path / "cache"), f"{registry.host}/x:v1",
        str(tmp_path / "mnt"), check=False,
    )  # fmt: skip
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "started a mount service" not in line]
    assert len(lines) == 1 and "HTTPS_PROXY=" in lines[0] and "socks5" in lines[0], result.stderr


@pytest.mark.anyio
async def test_token_requests_and_redirects_go_through_the_proxy() -> None:
    """Bearer auth and a redirected blob, every origin a name only the proxy resolves: the
    registry, its token realm and the redirect's storage host each go through the proxy."""
    with FaultServer() as server, ForwardProxy() as proxy:
        names = {"registry.lazyfs.test": "127.0.0.1", "auth.lazyfs.test": "127.0.0.1"}
        proxy.hosts.update({**names, "storage.lazyfs.test": "127.0.0.1"})
        server.state.realm_host, server.state.redirect_host = (
            "auth.lazyfs.test",
            "storage.lazyfs.test",
        )
        server.faults.bearer, server.faults.redirect_blobs = True, True
        data = random_bytes(10_000, seed=9)
        digest = Digest.parse(server.add_blob(data))
        config = RegistryConfig(tls_verify=False, proxy=ProxyConfig(proxy.url, proxy.url, ""))
        ref = Reference.parse(f"registry.lazyfs.test:{server.port}/test/app:latest")
        async with RegistryClient(config) as client:
            assert await client.get_blob(ref, digest) == data
        hosts = {kind.split()[1].rpartition(":")[0] for kind in proxy.requests}
        assert hosts == {"registry.lazyfs.test", "auth.lazyfs.test", "storage.lazyfs.test"}
        assert len(server.token_requests) == 1
