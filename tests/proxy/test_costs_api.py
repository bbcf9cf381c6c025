"""The /costs API: totals equal the ledger written through the proxy, deleted sessions keep their
cost, pagination, trends, errors in OpenAI's shape, and the access rule."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from unittest import mock

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request
from ledger_check import assert_aggregates_match_ledger, ledger_rows

from proxy.access import is_loopback
from proxy.costs_api import check_access
from proxy.errors import ProxyError


async def _traffic(proxy, plan: dict[str, list[str]]) -> None:
    for campaign, sessions in plan.items():
        for i, session in enumerate(sessions):
            await proxy.client(campaign=campaign, session=session).chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hello " * (i + 1)}])
    await proxy.flush()


async def _get(http: aiohttp.ClientSession, url: str, status: int = 200) -> dict:
    async with http.get(url) as response:
        assert response.status == status, await response.text()
        return await response.json()


async def test_campaign_and_session_totals_equal_the_ledger(proxy, fake):
    fake.behaviour.cache_write_tokens = 5
    await _traffic(proxy, {"alpha": ["s1", "s1", "s2"], "beta": ["s9"]})
    sums = await assert_aggregates_match_ledger(proxy.engine)
    rows = await ledger_rows(proxy.engine)
    async with aiohttp.ClientSession() as http:
        alpha = await _get(http, f"{proxy.url}/costs/campaigns/alpha")
        assert Decimal(alpha["cost_usd"]) == sums["alpha"][0]
        assert alpha["requests"] == 3 and alpha["session_count"] == 2
        assert alpha["tokens"] == {"input": sums["alpha"][2], "cached_input": sums["alpha"][3],
                                   "output": sums["alpha"][4], "reasoning": sums["alpha"][5],
                                   "audio_input": sums["alpha"][6], "audio_output": sums["alpha"][7],
                                   "cache_write_input": sums["alpha"][8],
                                   "cached_audio_input": sums["alpha"][9]}
        assert alpha["tokens"]["cache_write_input"] == 15
        assert alpha["budget"]["spent_usd"] == alpha["cost_usd"] and alpha["budget"]["status"] == "ok"
        assert Decimal(alpha["budget"]["remaining_usd"]) == Decimal(5) - sums["alpha"][0]
        assert alpha["first_seen"].endswith("Z") and alpha["last_seen"].endswith("Z")
        sessions = await _get(http, f"{proxy.url}/costs/campaigns/alpha/sessions")
        by_id = {s["session_id"]: s for s in sessions["sessions"]}
        s1_rows = [r for r in rows if r.campaign_id == "alpha" and r.session_id == "s1"]
        assert Decimal(by_id["s1"]["cost_usd"]) == sum(r.cost_usd for r in s1_rows)
        assert by_id["s1"]["requests"] == 2 and by_id["s1"]["deleted_at"] is None
        one = await _get(http, f"{proxy.url}/costs/campaigns/alpha/sessions/s2")
        assert one == by_id["s2"]
        by_cost = await _get(http, f"{proxy.url}/costs/campaigns/alpha/sessions?order=cost")
        costs = [Decimal(s["cost_usd"]) for s in by_cost["sessions"]]
        assert costs == sorted(costs, reverse=True)


async def test_deleted_sessions_keep_their_cost_in_the_campaign(proxy, fake):
    await _traffic(proxy, {"gamma": ["keep", "gone", "gone"]})
    async with aiohttp.ClientSession() as http:
        before = await _get(http, f"{proxy.url}/costs/campaigns/gamma")
        gone = await _get(http, f"{proxy.url}/costs/campaigns/gamma/sessions/gone")
        async with http.delete(f"{proxy.url}/costs/campaigns/gamma/sessions/gone") as response:
            assert response.status == 200
            assert (await response.json())["deleted_at"] is not None
        after = await _get(http, f"{proxy.url}/costs/campaigns/gamma")
        assert after["cost_usd"] == before["cost_usd"]
        assert after["deleted_sessions_cost_usd"] == gone["cost_usd"]
        listed = await _get(http, f"{proxy.url}/costs/campaigns/gamma/sessions")
        assert [s["session_id"] for s in listed["sessions"]] == ["keep"]
        everything = await _get(http, f"{proxy.url}/costs/campaigns/gamma/sessions?include_deleted=true")
        assert {s["session_id"] for s in everything["sessions"]} == {"keep", "gone"}
    await assert_aggregates_match_ledger(proxy.engine)


async def test_a_call_in_a_deleted_session_revives_it(proxy, fake):
    """A deleted session that is used again is listed again with all its cost (the earlier
    included), so the session list still adds up to the campaign."""
    await _traffic(proxy, {"gamma": ["keep", "gone", "gone"]})
    async with aiohttp.ClientSession() as http:
        gone = await _get(http, f"{proxy.url}/costs/campaigns/gamma/sessions/gone")
        async with http.delete(f"{proxy.url}/costs/campaigns/gamma/sessions/gone") as response:
            assert response.status == 200
    await _traffic(proxy, {"gamma": ["gone"]})
    async with aiohttp.ClientSession() as http:
        campaign = await _get(http, f"{proxy.url}/costs/campaigns/gamma")
        listed = await _get(http, f"{proxy.url}/costs/campaigns/gamma/sessions")
        revived = await _get(http, f"{proxy.url}/costs/campaigns/gamma/sessions/gone")
    assert {s["session_id"] for s in listed["sessions"]} == {"keep", "gone"}
    assert revived["deleted_at"] is None and revived["requests"] == 3
    assert Decimal(revived["cost_usd"]) > Decimal(gone["cost_usd"])
    assert campaign["deleted_sessions_cost_usd"] == "0.00"
    assert sum(Decimal(s["cost_usd"]) for s in listed["sessions"]) == Decimal(campaign["cost_usd"])
    assert sum(s["requests"] for s in listed["sessions"]) == campaign["requests"]
    await assert_aggregates_match_ledger(proxy.engine)


async def test_campaign_list_is_paginated_with_an_opaque_cursor(proxy, fake):
    await _traffic(proxy, {f"camp-{i:02d}": ["s"] for i in range(7)})
    seen: list[str] = []
    cursor = None
    async with aiohttp.ClientSession() as http:
        while True:
            url = f"{proxy.url}/costs/campaigns?limit=3" + (f"&cursor={cursor}" if cursor else "")
            page = await _get(http, url)
            assert len(page["campaigns"]) <= 3
            seen += [c["campaign_id"] for c in page["campaigns"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
    assert seen == [f"camp-{i:02d}" for i in range(7)]


async def test_daily_trend_is_zero_filled_and_sums_to_the_total(proxy, fake):
    await _traffic(proxy, {"delta": ["a", "b"]})
    today = datetime.now(UTC).date()
    start = today - timedelta(days=6)
    async with aiohttp.ClientSession() as http:
        daily = await _get(http, f"{proxy.url}/costs/campaigns/delta/daily?from={start}&to={today}")
        total = await _get(http, f"{proxy.url}/costs/campaigns/delta")
    assert [d["date"] for d in daily["days"]] == [str(start + timedelta(days=i)) for i in range(7)]
    assert all(d["cost_usd"] == "0.00" and d["requests"] == 0 for d in daily["days"][:-1])
    assert daily["days"][-1]["cost_usd"] == total["cost_usd"]
    assert daily["days"][-1]["tokens"] == total["tokens"]


@pytest.mark.parametrize(("path", "status", "code"), [
    ("/costs/campaigns/nope", 404, "not_found"),
    ("/costs/campaigns/nope/sessions", 404, "not_found"),
    ("/costs/campaigns/delta/sessions/nope", 404, "not_found"),
    ("/costs/campaigns?limit=0", 400, "invalid_parameter"),
    ("/costs/campaigns?limit=abc", 400, "invalid_parameter"),
    ("/costs/campaigns?cursor=%25%25", 400, "invalid_parameter"),
    ("/costs/campaigns/delta/daily?from=2026-13-01", 400, "invalid_parameter"),
    ("/costs/campaigns/delta/daily?from=2026-02-01&to=2026-01-01", 400, "invalid_parameter"),
    ("/costs/campaigns/delta/daily?from=2020-01-01&to=2026-01-01", 400, "invalid_parameter"),
    ("/costs/campaigns/delta/sessions?include_deleted=maybe", 400, "invalid_parameter"),
    ("/costs/campaigns/delta/sessions?order=name", 400, "invalid_parameter"),
    ("/costs/campaigns/bad%20id", 400, "invalid_id"),
    ("/nowhere", 404, "not_found"),
])
async def test_errors_are_in_openai_shape_with_exact_statuses(proxy, fake, path, status, code):
    await _traffic(proxy, {"delta": ["a"]})
    async with aiohttp.ClientSession() as http, http.get(proxy.url + path) as response:
        assert response.status == status
        body = await response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code and body["error"]["message"]


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("POST", "/healthz", {"GET", "HEAD"}),
    ("PATCH", "/costs/campaigns", {"GET", "HEAD"}),
    ("POST", "/costs/campaigns/delta/budget", {"PUT", "DELETE"}),
    ("GET", "/costs/campaigns/delta/budget", {"PUT", "DELETE"}),
])
async def test_a_wrong_method_is_405_with_allow_in_openai_shape(proxy, method, path, allowed):
    async with aiohttp.ClientSession() as http, http.request(method, proxy.url + path) as response:
        assert response.status == 405
        assert set(response.headers["Allow"].split(",")) == allowed
        body = await response.json()
    assert body["error"]["code"] == "method_not_allowed" and body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("path", ["/nowhere", "/costs/nowhere", "/costs/campaigns/a/b/c/d/e", "/v1"])
async def test_an_unknown_path_is_404_in_openai_shape_for_any_method(proxy, path):
    async with aiohttp.ClientSession() as http:
        for method in ("GET", "POST", "DELETE"):
            async with http.request(method, proxy.url + path) as response:
                assert response.status == 404, (method, path)
                assert (await response.json())["error"]["code"] == "not_found"


async def test_token_rule_when_a_costs_token_is_set(start_proxy, fake):
    proxy = await start_proxy(costs_api_token="s3cret-token")
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"}):
            async with http.get(f"{proxy.url}/costs/campaigns", headers=headers) as response:
                assert response.status == 401
                assert (await response.json())["error"]["type"] == "authentication_error"
        async with http.get(f"{proxy.url}/costs/campaigns",
                            headers={"Authorization": "Bearer s3cret-token"}) as response:
            assert response.status == 200


async def test_without_a_token_only_loopback_clients_are_served(start_proxy, fake):
    proxy = await start_proxy()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{proxy.url}/costs/campaigns") as response:
            assert response.status == 200
    # A remote peer, as aiohttp would see it behind a real socket (no traffic leaves loopback here).
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        ("203.0.113.9", 40000) if name == "peername" else default)
    request = make_mocked_request("GET", "/costs/campaigns", app=proxy.app, transport=transport)
    with pytest.raises(ProxyError) as caught:
        check_access(request)
    assert caught.value.status == 403 and caught.value.code == "costs_loopback_only"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("127.8.9.1")
    assert not is_loopback("10.0.0.5") and not is_loopback("192.168.1.2") and not is_loopback(None)


async def test_readyz_reports_migrations_pending(start_proxy, fake, database_url):
    proxy = await start_proxy()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{proxy.url}/readyz") as response:
            assert response.status == 200
        async with proxy.engine.begin() as conn:
            from sqlalchemy import text

            await conn.execute(text("UPDATE alembic_version SET version_num = 'older'"))
        async with http.get(f"{proxy.url}/readyz") as response:
            assert response.status == 503
            body = await response.json()
        assert "migrations pending" in body["checks"]["schema"]
        async with http.get(f"{proxy.url}/healthz") as response:
            assert response.status == 200


# -- regressions found by the schemathesis run (tests/proxy/test_openapi.py) ------------------------


async def test_daily_at_the_first_representable_date_is_not_a_server_error(proxy, fake):
    await _traffic(proxy, {"epoch": ["a"]})
    async with aiohttp.ClientSession() as http:
        # The default `from` (`to` minus 29 days) used to overflow below 0001-01-01: 500.
        early = await _get(http, f"{proxy.url}/costs/campaigns/epoch/daily?to=0001-01-05")
        assert [d["date"] for d in early["days"]] == [f"0001-01-0{i}" for i in range(1, 6)]
        late = await _get(http, f"{proxy.url}/costs/campaigns/epoch/daily?from=9999-12-31&to=9999-12-31")
        assert [d["date"] for d in late["days"]] == ["9999-12-31"]
        # Only YYYY-MM-DD, as documented (date.fromisoformat also takes 20260101 and 2026-W01-1).
        for other in ("20260101", "2026-W01-1", "2026-1-01", "\uff12\uff10\uff12\uff16-01-01"):
            body = await _get(http, f"{proxy.url}/costs/campaigns/epoch/daily?from={other}", 400)
            assert body["error"]["code"] == "invalid_parameter" and body["error"]["param"] == "from"


@pytest.mark.parametrize(("body", "status", "code", "param"), [
    # 9.3e8 USD is 9.3e18 units of 1e-10 USD: past SQLite's 64-bit integer, used to be a 500.
    ({"warning_usd": "1.00", "limit_usd": "930000000"}, 422, "invalid_budget", "limit_usd"),
    ({"warning_usd": "1.00", "limit_usd": 1229768984.829549}, 422, "invalid_budget", "limit_usd"),
    ({"warning_usd": "-1e30", "limit_usd": "5.00"}, 422, "invalid_budget", "warning_usd"),
    ({"warning_usd": "99999999.9999999999", "limit_usd": "99999999.9999999999"}, 200, None, None),
])
async def test_budget_amounts_are_capped_below_what_both_databases_store(proxy, fake, body, status,
                                                                          code, param):
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{proxy.url}/costs/campaigns/rich/budget", json=body) as response:
            assert response.status == status, await response.text()
            answer = await response.json()
    if status == 200:
        assert answer["budget"]["limit_usd"] == "99999999.9999999999"
        assert answer["budget"]["source"] == "override"
    else:
        assert answer["error"]["code"] == code and answer["error"]["param"] == param


async def test_a_deeply_nested_budget_body_is_a_400_not_a_server_error(proxy, fake):
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{proxy.url}/costs/campaigns/deep/budget", data=b"[" * 100_000) as response:
            assert response.status == 400
            assert (await response.json())["error"]["code"] == "invalid_json"


async def test_a_session_list_cut_at_its_limit_says_so(proxy, fake):
    """A page that sums the list must know when it is not the whole campaign."""
    await _traffic(proxy, {"epsilon": ["s1", "s2", "s3"]})
    async with aiohttp.ClientSession() as http:
        cut = await _get(http, f"{proxy.url}/costs/campaigns/epsilon/sessions?limit=2")
        whole = await _get(http, f"{proxy.url}/costs/campaigns/epsilon/sessions?limit=3")
    assert (len(cut["sessions"]), cut["has_more"]) == (2, True)
    assert (len(whole["sessions"]), whole["has_more"]) == (3, False)
