"""Client keys (PROXY_API_KEYS): who may spend the operator's upstream key, and under which
campaign. Checked at the start of every /v1 request when keys are configured.

Keys are held as SHA-256 digests and every one is compared on each request (no early exit), so
neither a key nor which key matched can be learnt from the timing; keys are never logged.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from dataclasses import dataclass

from multidict import CIMultiDictProxy

from costing.settings import Settings
from proxy.access import CHALLENGE, bearer, digest
from proxy.errors import ProxyError

UNBOUND = ""  # a key that may use any campaign


@dataclass(frozen=True, slots=True)
class ClientKeys:
    """The accepted keys' digests, each with its bound campaign (UNBOUND for none)."""

    keys: tuple[tuple[bytes, str], ...]
    campaign_header: str

    @classmethod
    def from_settings(cls, settings: Settings) -> ClientKeys | None:
        """None when PROXY_API_KEYS is unset: clients are then not asked for a key."""
        keys = settings.client_keys
        if not keys:
            return None
        return cls(tuple((digest(key), campaign or UNBOUND) for key, campaign in keys.items()),
                   settings.campaign_header)

    def admit(self, headers: CIMultiDictProxy[str]) -> str | None:
        """The campaign the key is bound to (None: unbound); 401 without a known key, 403 when the
        campaign header names another campaign than the key's."""
        sent = bearer(headers)
        if sent is None:
            raise ProxyError(401, "Missing API key: send Authorization: Bearer <key>, a key of "
                                  "this proxy's PROXY_API_KEYS", code="invalid_api_key",
                             headers=CHALLENGE)
        sent_digest = digest(sent)
        bound: str | None = None
        for known, campaign in self.keys:
            if hmac.compare_digest(sent_digest, known):
                bound = campaign
        if bound is None:
            raise ProxyError(401, "Incorrect API key: not a key of this proxy's PROXY_API_KEYS",
                             code="invalid_api_key", headers=CHALLENGE)
        if not bound:
            return None
        if any(value != bound for value in headers.getall(self.campaign_header, ())):
            raise ProxyError(403, f"This API key may only be used for campaign '{bound}': send that "
                                  f"{self.campaign_header} or none", type="permission_error",
                             code="campaign_not_allowed", param=self.campaign_header)
        return bound


def open_proxy_refusal(settings: Settings) -> str | None:
    """Why `serve` must not start as configured, or None: a non-loopback PROXY_HOST would let
    anyone who reaches the port spend OPENAI_API_KEY unless clients need a key."""
    if (settings.openai_api_key is None or settings.proxy_api_keys is not None
            or settings.allow_open_proxy or _is_loopback_host(settings.proxy_host)):
        return None
    return (f"PROXY_HOST={settings.proxy_host} is reachable from other machines and OPENAI_API_KEY is "
            "set: set PROXY_API_KEYS (keys clients must send), or ALLOW_OPEN_PROXY=true to serve "
            "anyone who reaches the port with your key")


def _is_loopback_host(host: str) -> bool:
    """Whether every address `host` names is a loopback one (an unresolvable name: left to the
    bind to report)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if not host:
        return False
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return True
    return all(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]).is_loopback for info in infos)
