"""Per-campaign budgets at the HTTP edge: thresholds, refusals the SDK understands, reservations
under concurrency, several proxy processes on one database, overrides."""

from __future__ import annotations

import asyncio
import signal
from decimal import Decimal
from typing import Any

import aiohttp
import openai
import pytest
from conftest import make_settings, spawn_proxy
from dblocks import database_locked
from ledger_check import assert_aggregates_match_ledger, ledger_rows
from sqlalchemy import text

from costing.budget import worst_case_units
from costing.db import create_engine
from costing.money import from_units, to_units
from costing.pricing import PriceTable
from costing.usage import Operation, request_facts

PRICES = PriceTable.load(default_per_1k_prompt=Decimal("0.00015"),
                         default_per_1k_completion=Decimal("0.0006"))
MESSAGES = [{"role": "user", "content": "Roll a d20 for the goblin."}]


CAPPED_CALL = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 100}


def answer_what_is_reserved(fake: Any) -> Decimal:
    """The reservation of CAPPED_CALL; the upstream will count the prompt as the proxy estimated
    it and answer with max_tokens, so each call costs exactly what it reserved."""
    facts = request_facts(Operation.CHAT, CAPPED_CALL)
    fake.behaviour.prompt_tokens = facts.prompt_tokens
    fake.behaviour.completion_tokens = 100
    return from_units(worst_case_units(PRICES.quote("gpt-4o-mini"), facts, 4096))


async def alternate_calls(clients: list[openai.AsyncOpenAI], body: dict[str, Any],
                          count: int = 200) -> list[bool]:
    """`count` concurrent calls spread over the clients in turn: True where admitted."""
    async def call(i: int) -> bool:
        try:
            await clients[i % len(clients)].chat.completions.create(**body)
            return True
        except openai.RateLimitError:
            return False

    return list(await asyncio.gather(*(call(i) for i in range(count))))


def call_cost(prompt_tokens: int, completion_tokens: int, model: str = "gpt-4o-mini") -> Decimal:
    price = PRICES.quote(model).price
    return (prompt_tokens * price.input + completion_tokens * price.output) / Decimal(1_000_000)


async def test_warning_and_block_at_exactly_the_thresholds(start_proxy, fake):
    fake.behaviour.prompt_tokens, fake.behaviour.completion_tokens = 1000, 1000
    one = call_cost(1000, 1000)
    proxy = await start_proxy(cost_warning_threshold_usd=one, cost_limit_threshold_usd=2 * one,
                              budget_default_max_output_tokens=0)
    client = proxy.client()
    first = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES,
                                                                        max_tokens=1000)
    # Spent == warning after the first call (Decimal equality at the boundary): warned.
    assert Decimal(first.headers["X-Campaign-Cost-USD"]) == one
    assert "X-Cost-Warning" in first.headers
    assert Decimal(first.headers["X-Campaign-Limit-USD"]) == 2 * one
    assert Decimal(first.headers["X-Campaign-Remaining-USD"]) == one
    second = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES,
                                                                        max_tokens=1000)
    assert Decimal(second.headers["X-Campaign-Cost-USD"]) == 2 * one
    assert Decimal(second.headers["X-Campaign-Remaining-USD"]) == 0
    upstream_calls = fake.hits("/chat/completions")
    with pytest.raises(openai.RateLimitError) as caught:
        await proxy.client(max_retries=3).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                                                        max_tokens=1000)
    error = caught.value
    assert error.status_code == 429
    assert error.body["code"] == "budget_exceeded" and error.body["type"] == "insufficient_quota"
    assert error.response.headers["x-should-retry"] == "false"
    assert 2 * one == Decimal("0.0015")  # 2 x (1000 x 0.15 + 1000 x 0.60) / 1M
    assert error.body["message"] == "Campaign 'c1' reached its cost limit: $0.0015 spent of $0.0015"
    # Not forwarded, and the SDK did not retry (max_retries=3 honoured x-should-retry: false).
    assert fake.hits("/chat/completions") == upstream_calls


async def test_one_quantum_below_the_warning_has_no_warning(start_proxy, fake):
    fake.behaviour.prompt_tokens, fake.behaviour.completion_tokens = 1000, 1000
    one = call_cost(1000, 1000)
    proxy = await start_proxy(cost_warning_threshold_usd=one + Decimal("1e-10"),
                              cost_limit_threshold_usd=10 * one)
    raw = await proxy.client().chat.completions.with_raw_response.create(model="gpt-4o-mini",
                                                                       messages=MESSAGES, max_tokens=1000)
    assert "X-Cost-Warning" not in raw.headers


async def test_streamed_responses_carry_the_campaign_headers_and_warning(start_proxy, fake):
    proxy = await start_proxy(cost_warning_threshold_usd=Decimal(0), cost_limit_threshold_usd=Decimal(1))
    async with aiohttp.ClientSession() as http:
        response = await http.post(f"{proxy.url}/v1/chat/completions", headers={"X-Campaign-Id": "c1"},
                                   json={"model": "gpt-4o-mini", "stream": True, "messages": MESSAGES})
        await response.read()
    for name in ("X-Campaign-Cost-USD", "X-Campaign-Limit-USD", "X-Campaign-Remaining-USD",
                 "X-Cost-Warning"):
        assert name in response.headers


async def test_concurrent_requests_reserve_and_exactly_the_affordable_ones_pass(start_proxy, fake):
    body = CAPPED_CALL
    reservation = answer_what_is_reserved(fake)
    proxy = await start_proxy(cost_warning_threshold_usd=Decimal(0),
                              cost_limit_threshold_usd=50 * reservation)
    # Hold every upstream answer until all 200 requests were decided.
    fake.behaviour.hold = asyncio.Event()
    client = proxy.client()

    async def call() -> str:
        try:
            await client.chat.completions.create(**body)
            return "ok"
        except openai.RateLimitError as exc:
            assert exc.body["code"] == "budget_exceeded"
            return "refused"

    tasks = [asyncio.create_task(call()) for _ in range(200)]
    for _ in range(200):
        if sum(t.done() for t in tasks) == 150:
            break
        await asyncio.sleep(0.05)
    fake.behaviour.hold.set()
    results = await asyncio.gather(*tasks)
    assert results.count("ok") == 50 and results.count("refused") == 150
    assert fake.hits("/chat/completions") == 50
    await proxy.flush()
    totals = await assert_aggregates_match_ledger(proxy.engine)
    assert totals["c1"][0] <= 50 * reservation


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_two_proxy_processes_on_one_database_enforce_one_budget(start_proxy, fake):
    body = CAPPED_CALL
    limit = 40 * answer_what_is_reserved(fake)
    settings = {"cost_warning_threshold_usd": Decimal(0), "cost_limit_threshold_usd": limit}
    replicas = [await start_proxy(**settings), await start_proxy(**settings)]
    results = await alternate_calls([r.client() for r in replicas], body)
    for replica in replicas:
        await replica.flush()
    rows = await ledger_rows(replicas[0].engine)
    spent = sum(r.cost_usd for r in rows)
    assert spent <= limit
    assert sum(results) == len(rows) == fake.hits("/chat/completions")
    assert sum(results) > 0
    await assert_aggregates_match_ledger(replicas[0].engine)


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_two_real_proxy_processes_on_one_postgresql_enforce_one_budget(database_url, fake):
    """The same as above with two `llm-cost-proxy serve` OS processes: nothing shared but the database."""
    body = CAPPED_CALL
    limit = 40 * answer_what_is_reserved(fake)
    env = {"DATABASE_URL": database_url, "UPSTREAM_BASE_URL": fake.url,
           "COST_WARNING_THRESHOLD_USD": "0", "COST_LIMIT_THRESHOLD_USD": str(limit)}
    replicas = [await spawn_proxy(**env), await spawn_proxy(**env)]
    try:
        clients = [openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0,
                                      default_headers={"X-Campaign-Id": "c1", "X-Session-Id": "s1"})
                   for _, url in replicas]
        results = await alternate_calls(clients, body)
    finally:
        for process, _ in replicas:
            process.send_signal(signal.SIGTERM)  # drains and flushes every record
        for process, _ in replicas:
            assert await asyncio.wait_for(process.wait(), 30) == 0
    engine = create_engine(make_settings(database_url=database_url).database)
    try:
        rows = await ledger_rows(engine)
        assert sum(r.cost_usd for r in rows) <= limit
        assert sum(results) == len(rows) == fake.hits("/chat/completions")
        assert 0 < sum(results) < 200
        await assert_aggregates_match_ledger(engine)
    finally:
        await engine.dispose()


async def test_budget_override_revert_and_validation(proxy, fake):
    async with aiohttp.ClientSession() as http:
        url = f"{proxy.url}/costs/campaigns/c1/budget"
        put = await http.put(url, json={"warning_usd": "0", "limit_usd": "0"})
        assert put.status == 200
        assert (await put.json())["budget"]["limit_usd"] == "0.00"
        # The next request already sees the new budget.
        with pytest.raises(openai.RateLimitError):
            await proxy.client().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert fake.hits("/chat/completions") == 0
        reverted = await http.delete(url)
        assert reverted.status == 200
        budget = (await reverted.json())["budget"]
        assert (budget["warning_usd"], budget["limit_usd"], budget["source"]) == ("1.00", "5.00", "default")
        await proxy.client().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert fake.hits("/chat/completions") == 1
        for bad, status, param in [
            ({"warning_usd": "-1", "limit_usd": "5"}, 422, "warning_usd"),
            ({"warning_usd": "6", "limit_usd": "5"}, 422, "warning_usd"),
            ({"warning_usd": "1"}, 422, "limit_usd"),
            ({"warning_usd": "abc", "limit_usd": "5"}, 422, "warning_usd"),
            ({"warning_usd": True, "limit_usd": "5"}, 422, "warning_usd"),
            ({"warning_usd": "NaN", "limit_usd": "5"}, 422, "warning_usd"),
        ]:
            response = await http.put(url, json=bad)
            assert response.status == status, bad
            error = (await response.json())["error"]
            assert error["param"] == param and error["message"]
        malformed = await http.put(url, data=b"{nope", headers={"Content-Type": "application/json"})
        assert malformed.status == 400
        assert (await malformed.json())["error"]["code"] == "invalid_json"
        numbers = await http.put(url, data=b'{"warning_usd": 0.5, "limit_usd": 2}')
        assert (await numbers.json())["budget"]["warning_usd"] == "0.50"


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_a_budget_change_reaches_the_other_replica(start_proxy, fake):
    a, b = await start_proxy(), await start_proxy()
    await b.client().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    async with aiohttp.ClientSession() as http:
        await http.put(f"{a.url}/costs/campaigns/c1/budget", json={"warning_usd": "0", "limit_usd": "0"})
    await asyncio.sleep(1.5)  # one budget refresh interval of replica b
    with pytest.raises(openai.RateLimitError):
        await b.client().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)


async def test_a_lease_is_never_asked_for_while_a_ledger_batch_commits(start_proxy, fake):
    """Spend read from the database and cost still pending in this process must not overlap: a
    batch that commits while a lease is asked for would be counted twice, and a request that fits
    refused. So the lease waits for the ledger's write (and its bookkeeping) to finish."""
    proxy = await start_proxy()
    client = proxy.client(campaign="lease-wait")
    async with proxy.ledger.writing:  # as if a batch were being written right now
        call = asyncio.create_task(client.chat.completions.create(model="gpt-4o-mini",
                                                                  messages=MESSAGES))
        await asyncio.sleep(0.3)
        assert not call.done()
        assert fake.hits("/chat/completions") == 0  # held at the gate, not forwarded
    await asyncio.wait_for(call, 5)
    assert fake.hits("/chat/completions") == 1


def reservation_of(body: dict[str, Any]) -> Decimal:
    return from_units(worst_case_units(PRICES.quote(body["model"]), request_facts(Operation.CHAT, body),
                                       4096))


async def test_a_settled_burst_does_not_keep_the_other_replicas_share_of_the_budget(start_proxy, fake):
    """A burst's lease covers its worst cases; once the calls settle at their real cost, the lease
    shrinks within a refresh even while its process keeps serving, so the other replica admits
    what `/costs` says the campaign can still afford."""
    reservation = answer_what_is_reserved(fake)
    fake.behaviour.prompt_tokens = fake.behaviour.completion_tokens = 1  # they settle cheaply
    settings = {"cost_warning_threshold_usd": Decimal(0),
                "cost_limit_threshold_usd": Decimal("6.5") * reservation}
    a, b = await start_proxy(**settings), await start_proxy(**settings)
    fake.behaviour.delay = 0.3
    burst = a.client()
    await asyncio.gather(*(burst.chat.completions.create(**CAPPED_CALL) for _ in range(6)))
    fake.behaviour.delay = 0
    await a.flush()
    for _ in range(3):  # a keeps serving (and renewing its lease) past a refresh
        await burst.chat.completions.create(**CAPPED_CALL)
        await asyncio.sleep(0.6)
    async with aiohttp.ClientSession() as http:
        budget = (await (await http.get(f"{b.url}/costs/campaigns/c1")).json())["budget"]
    assert budget["status"] == "warning" and Decimal(budget["remaining_usd"]) > 6 * reservation
    await b.client().chat.completions.create(**CAPPED_CALL)  # refused before: a kept ~6 of 6.5


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_calls_arriving_while_a_lease_grows_are_covered_by_the_new_lease(start_proxy, fake,
                                                                               database_url, backend):
    """Near the limit, while a process waits for the database to grow its lease, a call that fits
    the old lease waits too: the new lease is sized to what the process holds when it is asked
    for, so a call admitted meanwhile would be missing from it, free for another replica."""
    first = CAPPED_CALL
    small = {**CAPPED_CALL, "max_tokens": 90}
    big = {**CAPPED_CALL, "max_tokens": 1000}
    r = reservation_of(first)
    # The first call's lease keeps 5% of the headroom after it: room for `small`, not for `big`,
    # and the grant `big` gets has less room than `small` needs.
    assert reservation_of(small) < Decimal("0.05") * 19 * r
    assert reservation_of(big) > Decimal("0.05") * 19 * r
    assert reservation_of(small) > Decimal("0.05") * (20 * r - r - reservation_of(big))
    proxy = await start_proxy(cost_warning_threshold_usd=Decimal(0), cost_limit_threshold_usd=20 * r)
    client = proxy.client()
    fake.behaviour.hold = asyncio.Event()  # every call stays in flight
    calls = [asyncio.create_task(client.chat.completions.create(**first))]
    await _upstream_has(fake, 1)
    async with database_locked(database_url, backend, "c1"):
        calls.append(asyncio.create_task(client.chat.completions.create(**big)))
        await asyncio.sleep(0.3)  # waiting for the database
        calls.append(asyncio.create_task(client.chat.completions.create(**small)))
        await asyncio.sleep(0.3)
    await _upstream_has(fake, 3)
    view = proxy.gate.view("c1")
    async with proxy.engine.connect() as conn:
        leased = (await conn.execute(
            text("SELECT amount_usd FROM budget_leases WHERE holder_id = :h"),
            {"h": proxy.gate.holder_id})).scalar_one()
    assert view.inflight == sum(map(to_units, (r, reservation_of(big), reservation_of(small))))
    assert to_units(leased) >= view.inflight
    fake.behaviour.hold.set()
    await asyncio.gather(*calls)


async def test_a_slow_database_still_refuses_what_this_process_knows_does_not_fit(
        start_proxy, fake, database_url, backend):
    """Fail-open admits a call whose budget check the database does not answer in time, but not
    one that this process's own spend and calls in flight already rule out."""
    reservation = answer_what_is_reserved(fake)  # each call costs exactly what it reserves
    limit = Decimal("2.5") * reservation
    proxy = await start_proxy(cost_warning_threshold_usd=Decimal(0), cost_limit_threshold_usd=limit)
    client = proxy.client()
    await client.chat.completions.create(**CAPPED_CALL)
    await proxy.flush()
    proxy.gate.db_timeout = 0.5
    fake.behaviour.delay = 0.5

    async def call() -> bool:
        try:
            await client.chat.completions.create(**CAPPED_CALL)
            return True
        except openai.RateLimitError:
            return False

    async with database_locked(database_url, backend, "c1"):
        admitted = await asyncio.gather(*(call() for _ in range(5)))
    assert sum(admitted) == 1  # 1 spent + 1 in flight + 1 more would pass 2.5
    await proxy.flush(30)
    totals = await assert_aggregates_match_ledger(proxy.engine)
    assert totals["c1"][0] == 2 * reservation <= limit


async def _upstream_has(fake: Any, calls: int) -> None:
    for _ in range(200):
        if fake.hits("/chat/completions") >= calls:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the upstream got {fake.hits('/chat/completions')} calls, not {calls}")
