"""Browsers and local pages: a web page the operator visits must not be able to use the proxy.

The proxy on loopback holds OPENAI_API_KEY and, without tokens, grants /costs to anyone local.
A browser is local too, and any page it shows can send requests to 127.0.0.1: a cross-origin
`fetch(..., {mode: "no-cors"})` POST with a text/plain JSON body needs no preflight, so the
proxy would forward it with the operator's key (the attack on local LLM servers that made
Ollama and Jupyter check Origin and Host). Two rules, checked before anything else on /v1,
/costs (the live feed included), /metrics and the cost page:

- **Origin.** Browsers send `Origin` with every cross-origin request and every non-GET request
  (`null` from sandboxed frames and file:// pages). A request carrying one is refused unless it
  is the proxy's own origin (`http://` + the Host the request was sent to: the cost page's
  PUT/DELETE) or listed in PROXY_ALLOWED_ORIGINS. Requests without it (SDKs, curl, an app's
  server) are not browsers' page requests and pass.
- **Host.** DNS rebinding points the attacker's own name at 127.0.0.1, making the page
  same-origin with the proxy; only the Host header still shows the name. A request that arrives
  over loopback must name localhost (or a `*.localhost`) or an IP address (an address cannot be
  rebound), or a name of PROXY_ALLOWED_HOSTS. With PROXY_ALLOWED_HOSTS set, that holds for every
  request; without it, a request from another machine is not checked (a compose service name,
  `http://proxy:8080`, is a name the proxy cannot know; those deployments need credentials).

Cost on the hot path: two header lookups and a cached parse of the Host value.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import lru_cache

from aiohttp import hdrs, web

from costing.settings import Settings
from proxy.errors import ProxyError

ANY = "*"
SHOWN_CHARS = 200  # of a header value quoted back in a refusal


@dataclass(frozen=True, slots=True)
class BrowserRule:
    """PROXY_ALLOWED_ORIGINS and PROXY_ALLOWED_HOSTS, parsed once."""

    origins: frozenset[str]
    hosts: frozenset[str]  # exact names
    domains: tuple[str, ...]  # `.example.com`: names ending with it (and `example.com` itself)
    any_origin: bool
    any_host: bool
    hosts_listed: bool  # PROXY_ALLOWED_HOSTS set: every request's Host is checked

    @classmethod
    def from_settings(cls, settings: Settings) -> BrowserRule:
        origins = settings.allowed_origins
        hosts = settings.allowed_hosts
        return cls(origins=origins - {ANY},
                   hosts=frozenset(h for h in hosts if not h.startswith(".") and h != ANY),
                   domains=tuple(sorted(h for h in hosts if h.startswith("."))),
                   any_origin=ANY in origins, any_host=ANY in hosts, hosts_listed=bool(hosts))

    def check(self, request: web.Request) -> None:
        """Raise a 403 ProxyError for a page request from a foreign origin or a rebound name."""
        headers = request.headers
        host = headers.get(hdrs.HOST)
        if host is not None and not self.any_host:
            name = host_name(host)
            if (name is not None and not self._host_allowed(name)
                    and (self.hosts_listed or is_loopback_peer(request.remote))):
                raise ProxyError(
                    403, f"Host '{host[:SHOWN_CHARS]}' is not allowed: a name other than localhost or "
                         "an IP address may be a DNS-rebinding web page's. Reach the proxy as "
                         f"localhost or by address, or add '{name[:SHOWN_CHARS]}' to "
                         "PROXY_ALLOWED_HOSTS (e.g. the name a reverse proxy in front passes on)",
                    type="permission_error", code="host_not_allowed")
        origin = headers.get(hdrs.ORIGIN)
        if origin is not None and not self.any_origin:
            sent = origin.strip().lower()
            if sent not in self.origins and sent != f"{request.scheme}://{(host or '').lower()}":
                raise ProxyError(403, _origin_refusal(origin[:SHOWN_CHARS]), type="permission_error",
                                 code="origin_not_allowed")

    def _host_allowed(self, name: str) -> bool:
        return name in self.hosts or any(name.endswith(d) or name == d[1:] for d in self.domains)


def _origin_refusal(origin: str) -> str:
    why = ("browsers send it for a web page other than the proxy's own, and any page could "
           "otherwise spend this proxy's API key or edit its budgets")
    if origin.strip().lower() == "null":
        return (f"Origin 'null' (a sandboxed frame or a file:// page) is not allowed: {why}. "
                "Serve the page from an http(s) origin and add that to PROXY_ALLOWED_ORIGINS")
    return (f"Origin '{origin}' is not allowed: {why}. To let that page's browser app call "
            f"the proxy, add {origin} to PROXY_ALLOWED_ORIGINS")


@lru_cache(maxsize=256)
def host_name(host: str) -> str | None:
    """The name a Host header value gives (lower case, no port, no trailing dot); None for
    localhost, `*.localhost` and IP addresses, which no page can rebind."""
    value = host.strip().lower()
    if value.startswith("["):  # [IPv6]:port
        literal, closed, _port = value[1:].partition("]")
        return None if closed and _is_address(literal) else value
    name = value.rpartition(":")[0] if value.count(":") == 1 else value
    name = name.rstrip(".")
    if name == "localhost" or name.endswith(".localhost") or _is_address(name):
        return None
    return name


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    return True


@lru_cache(maxsize=1024)
def is_loopback_peer(remote: str | None) -> bool:
    """Whether the peer address is a loopback one, IPv4-mapped IPv6 (`::ffff:127.0.0.1`, a
    dual-stack listener's view of an IPv4 peer) included."""
    if not remote:
        return False
    try:
        address = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool((mapped or address).is_loopback)
