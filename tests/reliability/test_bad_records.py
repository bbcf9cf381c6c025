"""A value the database cannot store must never stop the ledger writer: what clients and
upstreams send is cut to what the columns hold, and a record the database still refuses (while
it answers) is dropped alone, logged and counted, while every other record is written.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

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
    # two good records of the same batch. It bypasses the meter, so nothing else can make one.
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
