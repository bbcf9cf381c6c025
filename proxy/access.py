"""Who may read what: bearer tokens compared in constant time, and the loopback rule for
endpoints that have no token configured (/costs, /metrics)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

from aiohttp import web
from multidict import CIMultiDictProxy
from pydantic import SecretStr

from proxy.errors import ProxyError

CHALLENGE = {"WWW-Authenticate": "Bearer"}


def bearer(headers: CIMultiDictProxy[str]) -> str | None:
    """The credentials of `Authorization: Bearer <credentials>`; the scheme is case-insensitive."""
    scheme, _, credentials = headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credentials.strip() or None


def digest(secret: str) -> bytes:
    """Secrets are compared as SHA-256 digests: equal lengths, nothing learnt from the timing."""
    return hashlib.sha256(secret.encode()).digest()


def is_loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        return ipaddress.ip_address(remote.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def check(request: web.Request, token: SecretStr | None, what: str, variable: str) -> None:
    """Raise unless the caller may use `what`: the bearer token when one is set, else loopback."""
    if token is not None:
        sent = bearer(request.headers)
        if sent is None or not hmac.compare_digest(digest(sent), digest(token.get_secret_value())):
            raise ProxyError(401, f"Send Authorization: Bearer <{variable}> to use {what}",
                             type="authentication_error", code="invalid_costs_token", headers=CHALLENGE)
    elif not is_loopback(request.remote):
        raise ProxyError(403, f"{what} answers loopback clients only; set {variable} to allow "
                              "remote clients with a bearer token", type="permission_error",
                         code="costs_loopback_only")
