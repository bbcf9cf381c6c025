"""A background response on several processes sharing one database (replicas, `serve --workers
N`): created through one, its final state read through others. Its creator's campaign and
session are charged wherever it is read (the creator is stored in `background_responses`), and
the call is reported once in all: one ledger row, one span carrying its cost, one feed event."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from ledger_check import assert_aggregates_match_ledger, ledger_rows
from otlpreceiver import OTLPReceiver
from sse_client import Event, EventReader

from proxy.state import METER


@pytest.fixture
async def receiver() -> AsyncIterator[OTLPReceiver]:
    async with OTLPReceiver() as running:
        yield running


async def _usage_events(reader: EventReader, quiet: float = 1.5) -> list[Event]:
    """Every usage event until the stream has been quiet for `quiet` seconds."""
    found: list[Event] = []
    while True:
        try:
            event = await reader.next(within=quiet)
        except TimeoutError:
            return found
        if event is None:
            return found
        if event.event == "usage":
            found.append(event)


async def test_a_final_state_read_through_two_processes_is_one_row_span_and_event_of_its_creator(
        start_proxy, fake, receiver):
    fake.behaviour.background_polls = 0
    fake.behaviour.prompt_tokens, fake.behaviour.completion_tokens = 1500, 80
    tracing = {"otel_exporter_otlp_endpoint": receiver.url, "otel_bsp_schedule_delay": 20}
    a, b = await start_proxy(**tracing), await start_proxy(**tracing)
    async with aiohttp.ClientSession() as http, \
            http.get(f"{a.url}/costs/events") as feed_a, http.get(f"{b.url}/costs/events") as feed_b:
        on_a, on_b = EventReader(feed_a), EventReader(feed_b)
        created = await a.client(campaign="c-creator", session="s-creator").responses.create(
            model="gpt-4o-mini", input="Plan the heist.", background=True)
        assert created.status == "queued"
        await a.flush()  # the creator is stored (within milliseconds, off the request path)
        assert b.app[METER].background.owner(created.id) is None  # B never saw the creation
        read_b = await b.client(campaign="c-reader", session="s-reader").responses.with_raw_response \
            .retrieve(created.id)
        assert read_b.parse().status == "completed"
        assert "X-Request-Cost-USD" not in read_b.headers  # charged to another campaign
        read_a = await a.client(campaign="c-reader", session="s-reader").responses.retrieve(created.id)
        assert read_a.status == "completed"
        await a.flush()
        await b.flush()
        events = [*await _usage_events(on_a), *await _usage_events(on_b)]
    [row] = await ledger_rows(a.engine)
    assert (row.campaign_id, row.session_id, row.response_id) == ("c-creator", "s-creator", created.id)
    assert (row.input_tokens, row.output_tokens) == (1500, 80) and row.cost_usd > 0
    creator = await a.store.campaign("c-creator")
    assert creator is not None and creator.totals.cost_usd == row.cost_usd
    reader = await a.store.campaign("c-reader")
    assert reader is None or reader.totals.cost_usd == 0
    await assert_aggregates_match_ledger(a.engine)

    assert [(e.data["campaign_id"], e.data["session_id"], Decimal(e.data["cost_usd"]))
            for e in events] == [("c-creator", "s-creator", row.cost_usd)]

    await receiver.wait_for(2)
    await asyncio.sleep(0.5)  # any other span would have arrived by now
    spans = [s for s in receiver.spans if s.attributes.get("gen_ai.response.id") == created.id]
    billed = [s.attributes for s in spans if s.attributes["llm_proxy.cost.usd"] > 0]
    assert len(spans) == 2, [s.attributes for s in spans]  # its creation (cost 0) and one read
    assert [(x["llm_proxy.campaign.id"], x["llm_proxy.session.id"], x["llm_proxy.cost.usd"])
            for x in billed] == [("c-creator", "s-creator", float(row.cost_usd))]


async def test_the_creator_is_charged_when_only_another_process_reads_the_final_state(
        start_proxy, fake):
    """Read through B alone (A never sees the final state): B charges the creator's campaign,
    whose budget view B loads for it; the reader's campaign spends nothing."""
    fake.behaviour.background_polls = 1
    a, b = await start_proxy(), await start_proxy()
    created = await a.client(campaign="c-creator", session="s-creator").responses.create(
        model="gpt-4o-mini", input="hi", background=True)
    await a.flush()
    reader = b.client(campaign="c-reader", session="s-reader")
    states = [(await reader.responses.retrieve(created.id)).status for _ in range(3)]
    assert states == ["in_progress", "completed", "completed"]
    await b.flush()
    [row] = await ledger_rows(b.engine)
    assert (row.campaign_id, row.session_id) == ("c-creator", "s-creator")
    assert b.gate.views["c-creator"].total_spent == int(row.cost_usd * 10**10)
    assert "c-reader" not in b.gate.views
    await assert_aggregates_match_ledger(b.engine)


async def test_a_final_state_read_again_elsewhere_after_it_was_written_is_not_reported_again(
        start_proxy, fake):
    """A reads and writes the row first; B's read meters it too (B never saw it), its insert is
    refused as known: B's gate releases the pending cost, and B publishes nothing."""
    fake.behaviour.background_polls = 0
    a, b = await start_proxy(), await start_proxy()
    created = await a.client(campaign="c-creator").responses.create(
        model="gpt-4o-mini", input="hi", background=True)
    await a.client(campaign="c-creator").responses.retrieve(created.id)
    await a.flush()
    told: list[Any] = []
    b.app[METER].listeners.append(told.append)
    await b.client(campaign="c-reader").responses.retrieve(created.id)
    await b.flush()
    assert told == []
    assert b.gate.views["c-creator"].pending == 0
    [row] = await ledger_rows(b.engine)
    assert row.campaign_id == "c-creator"
    assert b.registry.get_sample_value("llm_ledger_records_known_total") == 1
