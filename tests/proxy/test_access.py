"""Who may read /metrics and /costs: with a token, its bearer (any letter case of the scheme,
compared in constant time, 401 with `WWW-Authenticate: Bearer` otherwise); without one, loopback
clients only. /metrics takes METRICS_TOKEN, else COSTS_API_TOKEN: it shows campaign ids and spend."""

from __future__ import annotations

from unittest import mock

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request

from proxy import access
from proxy.errors import ProxyError
from proxy.health import metrics


async def _status(url: str, token: str | None = None, scheme: str = "Bearer") -> int:
    headers = {"Authorization": f"{scheme} {token}"} if token is not None else {}
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as response:
        if response.status == 401:
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert (await response.json())["error"]["type"] == "authentication_error"
        return response.status


async def test_metrics_token_guards_metrics_and_only_metrics(start_proxy, fake):
    proxy = await start_proxy(metrics_token="m-token", costs_api_token="c-token")
    url = f"{proxy.url}/metrics"
    assert await _status(url) == 401
    assert await _status(url, "wrong") == 401
    assert await _status(url, "c-token") == 401  # the /costs token is not the metrics token
    assert await _status(url, "m-token") == 200
    assert await _status(url, "m-token", scheme="bearer") == 200
    assert await _status(f"{proxy.url}/costs/campaigns", "m-token") == 401
    assert await _status(f"{proxy.url}/costs/campaigns", "c-token", scheme="bearer") == 200


async def test_without_a_metrics_token_the_costs_token_guards_metrics(start_proxy, fake):
    proxy = await start_proxy(costs_api_token="c-token")
    assert await _status(f"{proxy.url}/metrics") == 401
    assert await _status(f"{proxy.url}/metrics", "c-token") == 200


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_without_any_token_metrics_answers_loopback_clients_only(start_proxy, fake):
    proxy = await start_proxy()
    assert await _status(f"{proxy.url}/metrics") == 200
    transport = mock.Mock()  # a remote peer, as aiohttp would see it behind a real socket
    transport.get_extra_info.side_effect = lambda name, default=None: (
        ("203.0.113.9", 40000) if name == "peername" else default)
    request = make_mocked_request("GET", "/metrics", app=proxy.app, transport=transport)
    with pytest.raises(ProxyError) as caught:
        await metrics(request)
    assert caught.value.status == 403 and "METRICS_TOKEN" in caught.value.message


def test_the_bearer_scheme_is_read_in_any_letter_case():
    from multidict import CIMultiDict, CIMultiDictProxy

    def sent(value: str) -> str | None:
        return access.bearer(CIMultiDictProxy(CIMultiDict({"Authorization": value})))

    assert sent("Bearer abc") == sent("bearer abc") == sent("BEARER  abc ") == "abc"
    assert sent("Basic abc") is None and sent("Bearer") is None and sent("abc") is None
