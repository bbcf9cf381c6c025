"""Browsers and local pages (proxy/browsers.py): a web page the operator visits cannot spend the
operator's key through a proxy on loopback, nor read /costs or edit budgets, either with a
cross-origin request (foreign `Origin`, `null` included) or by DNS rebinding (a foreign name in
`Host` on a loopback connection). Same-origin requests (the cost page's own), requests without
`Origin` (SDKs, curl, an app's server) and what PROXY_ALLOWED_ORIGINS / PROXY_ALLOWED_HOSTS list
still pass.

Through the real proxy in the README's quick-start configuration (loopback, OPENAI_API_KEY set,
no PROXY_API_KEYS, no COSTS_API_TOKEN), against the loopback fake upstream.
"""

from __future__ import annotations

from typing import Any
from unittest import mock

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import make_mocked_request
from conftest import make_settings
from ledger_check import ledger_rows
from pydantic import ValidationError

from costing.settings import Settings, describe_error, parse_allowed_hosts, parse_allowed_origins
from proxy.browsers import BrowserRule, host_name, is_loopback_peer
from proxy.errors import ProxyError

# What the rule decides does not depend on the database: one backend is enough.
sqlite_only = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)

SERVER_KEY = "sk-operator-secret-42"
CHAT = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "spend"}]})
# What `fetch(url, {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"}, body})`
# sends: a "simple" request, no preflight, the body JSON all the same.
NO_CORS = {"Content-Type": "text/plain;charset=UTF-8", "X-Campaign-Id": "c1"}


@pytest.fixture
async def quick_start(start_proxy: Any) -> Any:
    return await start_proxy(openai_api_key=SERVER_KEY)


async def _send(method: str, url: str, headers: dict[str, str],
                body: bytes | None = None) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.request(
            method, url, headers=headers, data=body) as response:
        text = await response.read()
        return response.status, orjson.loads(text) if text.startswith(b"{") else {}


async def _budget(proxy: Any, campaign: str = "c1") -> dict[str, Any]:
    status, body = await _send("GET", f"{proxy.url}/costs/campaigns/{campaign}", {})
    assert status == 200, body
    budget: dict[str, Any] = body["budget"]
    return budget


# -- Origin ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://127.0.0.1:9",
                                    "chrome-extension://abcdefghijklmnop"])
@sqlite_only
async def test_a_no_cors_post_from_a_foreign_page_is_refused_and_never_forwarded(quick_start, fake,
                                                                                 origin):
    proxy = quick_start
    status, body = await _send("POST", f"{proxy.url}/v1/chat/completions",
                               {**NO_CORS, "Origin": origin}, CHAT)
    assert status == 403, body
    error = body["error"]
    assert (error["code"], error["type"]) == ("origin_not_allowed", "permission_error")
    assert f"'{origin}'" in error["message"] and "PROXY_ALLOWED_ORIGINS" in error["message"]
    await proxy.flush()
    assert fake.requests == []
    assert await ledger_rows(proxy.engine) == []


@sqlite_only
async def test_every_route_that_does_something_refuses_a_foreign_origin(quick_start, fake):
    proxy = quick_start
    await proxy.client().chat.completions.create(  # a campaign to aim at; no Origin: served
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    await proxy.flush()
    before = await _budget(proxy)
    evil = {"Origin": "https://evil.example"}
    budget = orjson.dumps({"warning_usd": "0", "limit_usd": "1000"})
    for method, path, body in [
        ("OPTIONS", "/v1/chat/completions", None),  # a preflight, never passed to the upstream
        ("GET", "/v1/models", None),
        ("POST", "/v1/files", b"x"),
        ("GET", "/costs/campaigns", None),
        ("GET", "/costs/events", None),
        ("GET", "/costs/openapi.json", None),
        ("PUT", "/costs/campaigns/c1/budget", budget),
        ("DELETE", "/costs/campaigns/c1/budget", None),
        ("DELETE", "/costs/campaigns/c1/sessions/s1", None),
        ("GET", "/metrics", None),
    ]:
        status, answer = await _send(method, proxy.url + path, evil, body)
        assert status == 403, (method, path, answer)
        assert answer["error"]["code"] == "origin_not_allowed", (method, path)
    assert len(fake.requests) == 1  # the SDK's call only
    assert await _budget(proxy) == before
    status, sessions = await _send("GET", f"{proxy.url}/costs/campaigns/c1/sessions/s1", {})
    assert status == 200 and sessions["deleted_at"] is None


@sqlite_only
async def test_the_proxys_own_origin_and_requests_without_origin_pass(quick_start, fake):
    proxy = quick_start
    own = {"Origin": proxy.url}  # the cost page's PUT/DELETE: http://127.0.0.1:<port>
    status, body = await _send("POST", f"{proxy.url}/v1/chat/completions",
                               {**own, "Content-Type": "application/json", "X-Campaign-Id": "c1"}, CHAT)
    assert status == 200, body
    status, body = await _send("POST", f"{proxy.url}/v1/chat/completions",
                               {"Content-Type": "application/json", "X-Campaign-Id": "c1"}, CHAT)
    assert status == 200, body
    await proxy.client().chat.completions.create(model="gpt-4o-mini",
                                                  messages=[{"role": "user", "content": "sdk"}])
    assert len(fake.requests) == 3
    # The two without a key of their own were sent with the operator's (the SDK sent its own).
    assert [r.headers.get("Authorization") for r in fake.requests[:2]] == [f"Bearer {SERVER_KEY}"] * 2
    status, body = await _send("PUT", f"{proxy.url}/costs/campaigns/c1/budget", own,
                               orjson.dumps({"warning_usd": "1.00", "limit_usd": "9.00"}))
    assert status == 200, body
    # The page opened as localhost: its Origin matches the Host it was sent to.
    local = {"Host": f"localhost:{proxy.port}", "Origin": f"http://localhost:{proxy.port}"}
    status, body = await _send("DELETE", f"{proxy.url}/costs/campaigns/c1/budget", local)
    assert status == 200, body
    assert (await _budget(proxy))["source"] == "default"
    # Same host, another port: another origin (any other local web app).
    other = {"Origin": f"http://127.0.0.1:{proxy.port + 1}"}
    assert (await _send("GET", f"{proxy.url}/costs/campaigns", other))[0] == 403


@sqlite_only
async def test_allowed_origins_admit_the_listed_pages_only(start_proxy, fake):
    proxy = await start_proxy(openai_api_key=SERVER_KEY,
                              proxy_allowed_origins="http://localhost:3000, https://App.example.com:443/")
    url = f"{proxy.url}/v1/chat/completions"
    for origin in ("http://localhost:3000", "https://app.example.com"):
        status, body = await _send("POST", url, {**NO_CORS, "Origin": origin}, CHAT)
        assert status == 200, (origin, body)
    for origin in ("http://localhost:3001", "https://app.example.com:8443", "http://app.example.com",
                   "null"):
        status, body = await _send("POST", url, {**NO_CORS, "Origin": origin}, CHAT)
        assert (status, body["error"]["code"]) == (403, "origin_not_allowed"), origin
    assert len(fake.requests) == 2


@sqlite_only
async def test_a_star_allows_every_origin(start_proxy, fake):
    proxy = await start_proxy(proxy_allowed_origins="*")
    status, _ = await _send("POST", f"{proxy.url}/v1/chat/completions",
                            {**NO_CORS, "Origin": "null"}, CHAT)
    assert status == 200 and len(fake.requests) == 1


@sqlite_only
async def test_with_tokens_set_the_rule_still_applies(start_proxy, fake):
    """Tokens stop pages that lack them; the rule holds all the same, on every way in."""
    proxy = await start_proxy(costs_api_token="c-token", metrics_token="m-token")
    evil, rebound = {"Origin": "https://evil.example"}, {"Host": f"attacker.example:{proxy.port}"}
    for path, headers in [("/costs/events?token=c-token", evil), ("/costs/events?token=c-token", rebound),
                          ("/costs/campaigns", {**evil, "Authorization": "Bearer c-token"}),
                          ("/metrics", {**rebound, "Authorization": "Bearer m-token"}),
                          ("/", rebound), ("/page/app.js", rebound)]:
        status, answer = await _send("GET", proxy.url + path, headers)
        assert status == 403, (path, headers, answer)
    # and the page itself still loads for a page of its own origin
    assert (await _send("GET", proxy.url + "/", {"Host": f"localhost:{proxy.port}"}))[0] == 200


# -- Host (DNS rebinding) --------------------------------------------------------------------------


@sqlite_only
async def test_a_rebound_name_is_refused_on_v1_costs_metrics_and_the_page(quick_start, fake):
    proxy = quick_start
    rebound = f"attacker.example:{proxy.port}"
    # The rebinding page is same-origin with the proxy under its own name: its Origin matches.
    same_origin = {"Host": rebound, "Origin": f"http://{rebound}"}
    for method, path, headers, body in [
        ("POST", "/v1/chat/completions", {**NO_CORS, **same_origin}, CHAT),
        ("POST", "/v1/chat/completions", {**NO_CORS, "Host": rebound}, CHAT),
        ("GET", "/v1/models", {"Host": rebound}, None),
        ("GET", "/costs/campaigns", {"Host": rebound}, None),
        ("GET", "/costs/events", {"Host": rebound}, None),
        ("PUT", "/costs/campaigns/c1/budget", same_origin,
         orjson.dumps({"warning_usd": "0", "limit_usd": "1000"})),
        ("GET", "/metrics", {"Host": rebound}, None),
        ("GET", "/", {"Host": rebound}, None),
    ]:
        status, answer = await _send(method, proxy.url + path, headers, body)
        assert status == 403, (method, path, answer)
        error = answer["error"]
        assert (error["code"], error["type"]) == ("host_not_allowed", "permission_error"), path
        assert "'attacker.example'" in error["message"] and "PROXY_ALLOWED_HOSTS" in error["message"]
    assert fake.requests == []
    # No budget was set: the campaign is still unknown.
    assert (await _send("GET", f"{proxy.url}/costs/campaigns/c1", {}))[0] == 404
    # Health checks are left alone: they hold nothing and probes must never fail on a name.
    assert (await _send("GET", f"{proxy.url}/healthz", {"Host": rebound}))[0] == 200


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST.", "127.0.0.1", "[::1]", "10.0.0.7",
                                  "app.localhost"])
@sqlite_only
async def test_loopback_names_and_addresses_pass(quick_start, fake, host):
    proxy = quick_start
    status, body = await _send("POST", f"{proxy.url}/v1/chat/completions",
                               {"Host": f"{host}:{proxy.port}", "X-Campaign-Id": "c1",
                                "Content-Type": "application/json"}, CHAT)
    assert status == 200, body
    status, body = await _send("GET", f"{proxy.url}/costs/campaigns", {"Host": host})
    assert status == 200, body
    assert len(fake.requests) == 1


@sqlite_only
async def test_allowed_hosts_admit_a_reverse_proxys_names(start_proxy, fake):
    proxy = await start_proxy(proxy_allowed_hosts="costs.example.com, .internal")
    for host in ("costs.example.com", "COSTS.example.com:443", "api.internal", "internal"):
        status, body = await _send("GET", f"{proxy.url}/costs/campaigns", {"Host": host})
        assert status == 200, (host, body)
    for host in ("evil.example", "costs.example.com.evil.example", "xinternal"):
        status, body = await _send("GET", f"{proxy.url}/costs/campaigns", {"Host": host})
        assert (status, body["error"]["code"]) == (403, "host_not_allowed"), host


# -- the rule for other machines' requests (not on loopback) ---------------------------------------


def _request(peer: str, headers: dict[str, str]) -> Any:
    transport = mock.Mock()  # a peer as aiohttp would see it behind a real socket
    transport.get_extra_info.side_effect = lambda name, default=None: (
        (peer, 40000) if name == "peername" else default)
    return make_mocked_request("POST", "/v1/chat/completions", headers=headers, transport=transport)


def _rule(**values: str) -> BrowserRule:
    return BrowserRule.from_settings(make_settings(**values))


def test_a_name_from_another_machine_passes_unless_allowed_hosts_are_listed():
    """A compose service (`http://proxy:8080`) or a cluster name: unknown to the proxy, and not a
    browser on this machine; with PROXY_ALLOWED_HOSTS set, those names are the whole list."""
    from_a_container = _request("172.18.0.5", {"Host": "proxy:8080"})
    _rule().check(from_a_container)
    with pytest.raises(ProxyError) as caught:
        _rule(proxy_allowed_hosts="costs.example.com").check(from_a_container)
    assert caught.value.code == "host_not_allowed" and caught.value.status == 403
    _rule(proxy_allowed_hosts="proxy").check(from_a_container)
    _rule(proxy_allowed_hosts="costs.example.com").check(_request("172.18.0.5", {"Host": "10.0.0.2:8080"}))
    # Origin is checked for every peer.
    with pytest.raises(ProxyError) as caught:
        _rule().check(_request("172.18.0.5", {"Host": "proxy:8080", "Origin": "https://evil.example"}))
    assert caught.value.code == "origin_not_allowed"


@pytest.mark.parametrize("peer", ["127.0.0.1", "127.3.4.5", "::1", "::ffff:127.0.0.1"])
def test_a_name_over_loopback_is_refused_whatever_proxy_host_is(peer):
    """PROXY_HOST=0.0.0.0 on the machine itself: a local browser still connects over loopback."""
    with pytest.raises(ProxyError) as caught:
        _rule(proxy_host="0.0.0.0").check(_request(peer, {"Host": "attacker.example:8080"}))
    assert caught.value.code == "host_not_allowed"


def test_host_names_and_peers_are_read_as_browsers_send_them():
    assert host_name("attacker.example:8080") == "attacker.example"
    assert host_name("Attacker.Example.") == "attacker.example"
    assert host_name("proxy") == "proxy"
    for local in ("localhost", "localhost:1", "a.b.localhost:8080", "127.0.0.1:8080", "[::1]:8080",
                  "::1", "[fe80::1%25eth0]", "192.168.1.20"):
        assert host_name(local) is None, local
    assert host_name("[not-an-address]:80") == "[not-an-address]:80"
    assert is_loopback_peer("::ffff:127.0.0.1") and is_loopback_peer("127.9.9.9")
    assert not is_loopback_peer("::ffff:10.0.0.1") and not is_loopback_peer(None)
    assert not is_loopback_peer("not-an-ip")


# -- settings ----------------------------------------------------------------------------------------


def test_allowed_origins_are_kept_as_browsers_serialize_them():
    assert parse_allowed_origins(" http://LocalHost:3000/, https://app.example.com:443,"
                                 "http://[::1]:80, chrome-extension://abc, * ") == {
        "http://localhost:3000", "https://app.example.com", "http://[::1]", "chrome-extension://abc", "*"}
    assert parse_allowed_origins("") == frozenset()
    assert parse_allowed_hosts(" Costs.Example.com., .internal ,*") == {
        "costs.example.com", ".internal", "*"}


@pytest.mark.parametrize(("variable", "value", "says"), [
    ("proxy_allowed_origins", "localhost:3000", "not an origin"),
    ("proxy_allowed_origins", "http://localhost:3000/app", "without a path"),
    ("proxy_allowed_origins", "http://localhost:99999", "invalid port"),
    ("proxy_allowed_origins", "null", "sandboxed"),
    ("proxy_allowed_hosts", "https://costs.example.com", "no scheme"),
    ("proxy_allowed_hosts", "costs.example.com:8080", "without a port"),
    ("proxy_allowed_hosts", "costs example", "not a host name"),
])
def test_a_bad_value_is_one_line_naming_the_variable(variable, value, says):
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None, **{variable: value})  # type: ignore[call-arg]
    line = describe_error(caught.value)
    assert line.startswith(f"invalid configuration: {variable.upper()}: "), line
    assert says in line and "\n" not in line
