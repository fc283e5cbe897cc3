"""Which proxy a registry request goes through: HTTP_PROXY, HTTPS_PROXY and NO_PROXY.

The rules are those of Go's ``net/http.ProxyFromEnvironment`` (``golang.org/x/net/http/
httpproxy``), which docker, podman, skopeo and containerd use, so that a peer-to-peer proxy
such as Dragonfly's dfdaemon sits in front of lazyfs as it does in front of them:

- ``https`` URLs use HTTPS_PROXY, ``http`` URLs HTTP_PROXY; no variable, no proxy.
- A proxy value is a URL (``http``, ``https``) or a bare ``host[:port]`` (``http`` assumed).
- ``localhost`` and loopback IP literals never go through a proxy (Go's special case).
- NO_PROXY is a comma-separated list; ``*`` alone turns proxying off. Each other entry is an
  IP address (``10.0.0.1``, ``[::1]:5000``) or a CIDR block (``10.0.0.0/8``), or a domain name:
  ``example.com`` matches it and its subdomains, ``.example.com`` (or ``*.example.com``)
  subdomains only. An IP or a domain may carry a ``:port``, which must then match too (the
  scheme's port when the URL has none). Entries that make no sense are skipped, as in Go.

Where lazyfs is stricter than Go: a proxy value that is no URL, or has a scheme other than
``http`` or ``https`` (Go also takes ``socks5``, which httpx cannot speak without an extra
package), is a one-line UsageError naming the variable, instead of being ignored silently.
Go's refusal of HTTP_PROXY under CGI (REQUEST_METHOD set) does not apply: lazyfs is no CGI.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import httpx

from lazyfs.config import ProxyConfig
from lazyfs.errors import UsageError

_DEFAULT_PORTS = {"http": 80, "https": 443}
_IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class _Exempt:
    """One NO_PROXY entry: a network (an address is a /32 or /128) or a domain suffix."""

    network: _IPNetwork | None = None
    domain: str = ""  # with its leading dot
    whole_domain: bool = False  # the entry had no leading dot: the name itself matches too
    port: int | None = None

    def matches(self, host: str, ip: _IPAddress | None, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            return ip is not None and ip.version == self.network.version and ip in self.network
        return host.endswith(self.domain) or (self.whole_domain and host == self.domain[1:])


class ProxyRules:
    """The proxy for each URL, from a ProxyConfig; parsing errors raise at construction."""

    def __init__(self, config: ProxyConfig) -> None:
        self._proxies = {
            "http": _proxy_url(config.http_proxy, "HTTP_PROXY"),
            "https": _proxy_url(config.https_proxy, "HTTPS_PROXY"),
        }
        self._everything_exempt, self._exempt = _no_proxy(config.no_proxy)

    def for_url(self, url: httpx.URL) -> httpx.URL | None:
        """The proxy ``url`` goes through, or None to connect directly."""
        proxy = self._proxies.get(url.scheme)
        if proxy is None or self._everything_exempt:
            return None
        host = url.host.lower()
        if host == "localhost":
            return None
        ip = _ip(host)
        if ip is not None and ip.is_loopback:
            return None
        port = url.port or _DEFAULT_PORTS.get(url.scheme, 0)
        if any(entry.matches(host, ip, port) for entry in self._exempt):
            return None
        return proxy


def _proxy_url(value: str, variable: str) -> httpx.URL | None:
    value = value.strip()
    if not value:
        return None
    scheme, separator, _ = value.partition("://")
    if separator and scheme.lower() not in ("http", "https"):
        raise UsageError(f"{variable}={value!r}: unsupported proxy scheme {scheme!r}")
    try:
        # A bare "host[:port]" means http, as in Go.
        url = httpx.URL(value if separator else f"http://{value}")
        url.port  # noqa: B018 - a port that is no number raises here
    except (httpx.InvalidURL, ValueError) as exc:
        raise UsageError(f"{variable}={value!r}: invalid proxy URL: {exc}") from exc
    if not url.host or any(c.isspace() for c in value):
        raise UsageError(f"{variable}={value!r}: invalid proxy URL: no host, or a bad one")
    if url.port is not None and not 0 < url.port < 65536:
        raise UsageError(f"{variable}={value!r}: invalid proxy URL: port out of range")
    return url


def _no_proxy(value: str) -> tuple[bool, tuple[_Exempt, ...]]:
    entries: list[_Exempt] = []
    for raw in value.split(","):
        item = raw.strip().lower()
        if item == "*":
            return True, ()
        entry = _entry(item) if item else None
        if entry is not None:
            entries.append(entry)
    return False, tuple(entries)


def _entry(item: str) -> _Exempt | None:
    """Go's parsing of one entry; None for one it would skip."""
    if "/" in item:
        try:
            return _Exempt(network=ipaddress.ip_network(item, strict=False))
        except ValueError:
            return None
    host, port_text = _split_port(item)
    if port_text is not None and not port_text.isdigit():
        return None  # Go keeps it, but a port that is no number never matches
    port = int(port_text) if port_text is not None else None
    ip = _ip(host)
    if ip is not None:
        return _Exempt(network=ipaddress.ip_network(ip), port=port)
    if host.startswith("*."):
        host = host[1:]
    if not host or host == ".":
        return None
    whole = not host.startswith(".")
    return _Exempt(domain=f".{host}" if whole else host, whole_domain=whole, port=port)


def _split_port(item: str) -> tuple[str, str | None]:
    """``host:port``, ``[v6]:port``, or a host alone (a bare IPv6 address has many colons)."""
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else None
    if item.count(":") == 1:
        host, _, port = item.partition(":")
        return host, port
    return item, None


def _ip(host: str) -> _IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
