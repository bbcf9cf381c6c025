"""A value the database cannot store must never stop the ledger writer: what clients and
upstreams send is cut to what the columns hold, and a record the database still refuses (while
it answers) is dropped alone, logged and counted, while every other record is written.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from decimal import Decimal

import aiohttp
import openai
from ledger_check import assert_aggregates_match_ledger, ledger_rows

from costing.money import to_units
from costing.records import UsageEntry, epoch_us
from costing.usage import MAX_MODEL_LENGTH, MAX_TOKENS, Usage

MESSAGES = [{"role": "user", "content": "Roll for initiative."}]


def dropped(proxy) -> float:
    return proxy.registry.get_sample_value("llm_ledger_records_dropped_total") or 0.0


async def test_an_absurd_model_name_and_usage_are_recorded_cut_down(start_proxy, fake):
    proxy = await start_proxy(cost_limit_threshold_usd=Decimal(10_000))  # a billion tokens is costly
    fake.behaviour.prompt_tokens = 1e30  # an upstream that reports nonsense
    client = proxy.client()
    await client.chat.completions.create(model="m" * 1000, messages=MESSAGES)
    fake.behaviour.prompt_tokens = 12
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    await proxy.flush()
    absurd, normal = await ledger_rows(proxy.engine)
    assert absurd.request_model == "m" * MAX_MODEL_LENGTH and absurd.input_tokens == MAX_TOKENS
    assert normal.input_tokens == 12
    assert dropped(proxy) == 0
    await assert_aggregates_match_ledger(proxy.engine)


async def test_a_record_the_database_refuses_is_dropped_alone_and_the_writer_goes_on(proxy, fake):
    client = proxy.client()
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    await proxy.flush()
    # A cost no column holds (neither NUMERIC(20,10) nor SQLite's 64-bit units), queued between
    # two good records of the same batch. It bypasses the meter: nothing a client or an
    # upstream sends makes one (see the NUL test below).
    refused = UsageEntry(
        campaign_id="c1", session_id="s1", operation="chat.completions", request_model="x",
        response_model=None, usage=Usage(1, 0, 1, 0), cost_units=to_units(Decimal("1e12")),
        priced_by_default=False, estimated=False, streamed=False, status_code=200, latency_ms=1,
        created_us=epoch_us(datetime.now(UTC)))
    proxy.ledger.submit(refused)
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    await proxy.flush(within=15)
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    await proxy.flush()
    rows = await ledger_rows(proxy.engine)
    assert len(rows) == 3 and refused.id not in {r.id.int for r in rows}
    assert dropped(proxy) == 1
    await assert_aggregates_match_ledger(proxy.engine)


def refused_record() -> UsageEntry:
    """A cost no column holds (neither NUMERIC(20,10) nor SQLite's 64-bit units)."""
    return UsageEntry(
        campaign_id="c1", session_id="s1", operation="chat.completions", request_model="x",
        response_model=None, usage=Usage(1, 0, 1, 0), cost_units=to_units(Decimal("1e12")),
        priced_by_default=False, estimated=False, streamed=False, status_code=200, latency_ms=1,
        created_us=epoch_us(datetime.now(UTC)))


async def test_a_refused_record_alone_in_the_buffer_is_dropped_too(start_proxy, fake):
    """With nothing else to write beside it, a record the database refuses still goes: else the
    writer retried it forever (a fail-closed proxy refusing every call meanwhile, a shutdown
    waiting for it to its timeout)."""
    proxy = await start_proxy(budget_fail_closed=True)
    refused = refused_record()
    proxy.ledger.submit(refused)
    await proxy.flush(within=15)
    assert dropped(proxy) == 1
    await proxy.client().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    await proxy.flush()
    rows = await ledger_rows(proxy.engine)
    assert len(rows) == 1 and refused.id not in {r.id.int for r in rows}
    await assert_aggregates_match_ledger(proxy.engine)


async def test_a_nul_character_in_a_model_name_is_recorded_not_refused(proxy, fake):
    """PostgreSQL text cannot hold NUL: the ledger stores the model name with U+FFFD instead."""
    client = proxy.client()
    with contextlib.suppress(openai.NotFoundError):  # whatever the upstream thinks of the name
        await client.chat.completions.create(model="gpt-4o-mini\x00x", messages=MESSAGES)
    async with aiohttp.ClientSession() as http:  # and an unknown path naming one
        await http.post(f"{proxy.url}/v1/%00odd", json={}, headers={"X-Campaign-Id": "c1"})
    await proxy.flush(within=15)
    rows = await ledger_rows(proxy.engine)
    assert {r.request_model for r in rows} >= {"gpt-4o-mini\ufffdx"}
    assert "\ufffdodd" in {r.operation for r in rows}
    assert dropped(proxy) == 0
    await assert_aggregates_match_ledger(proxy.engine)


async def test_a_batch_of_a_forgotten_campaign_still_moves_every_other_campaigns_books(start_proxy,
                                                                                      fake):
    """A campaign whose unwritten records cost nothing is idle: after a long database outage its
    budget view is forgotten before they are written. Writing them then must still release the
    other campaigns' pending cost and count the batch in the metrics."""
    proxy = await start_proxy(ledger_flush_interval_seconds=60)
    fake.behaviour.status = 400  # an upstream error: a record of cost 0
    try:
        await proxy.client(campaign="idle").chat.completions.create(model="gpt-4o-mini",
                                                                    messages=MESSAGES)
    except openai.BadRequestError:
        pass
    fake.behaviour.status = 200
    await proxy.client(campaign="busy").chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert proxy.gate.view("busy").pending > 0
    del proxy.gate.views["idle"]  # as the refresh does to a view idle for IDLE_VIEW_SECONDS
    proxy.ledger.write_soon()
    await proxy.flush()
    assert proxy.gate.view("busy").pending == 0
    requests = proxy.registry.get_sample_value
    assert requests("llm_requests_total", {"campaign": "busy", "operation": "chat.completions",
                                           "status": "200"}) == 1
    await assert_aggregates_match_ledger(proxy.engine)
