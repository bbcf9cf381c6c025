"""A metered call's record is in the spool before its client has the last byte of the answer:
the JSON body, the usage chunk, `data: [DONE]`, a Responses stream's `response.completed`.
So is a background response's final state read as a stream (`response.completed`).
Committed records leave the spool; a stopped proxy leaves an empty spool directory behind.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest
from ledger_check import ledger_rows

from costing.spool import read_segment
from proxy.state import SPOOL

HEADERS = {"X-Campaign-Id": "order", "X-Session-Id": "s1", "Authorization": "Bearer sk-test"}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def spooled_ids(proxy: Any) -> list[str | None]:
    spool = proxy.app[SPOOL]
    return [e.response_id for path in sorted(spool.directory.glob("*.spool"))
            for e in read_segment(path)[0]]


@pytest.mark.parametrize("include_usage", [True, False])
async def test_a_streamed_call_is_spooled_before_its_last_events(start_proxy, fake, include_usage):
    proxy = await start_proxy(ledger_flush_interval_seconds=30)  # nothing leaves the spool
    fake.behaviour.chunk_delay = 0.01  # every event in its own read: the relay path
    body: dict[str, Any] = {**CHAT, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    seen_before: dict[str, list[str | None]] = {}
    async with aiohttp.ClientSession() as http, http.post(
            f"{proxy.url}/v1/chat/completions", json=body, headers=HEADERS) as response:
        buffer = b""
        async for chunk in response.content.iter_any():
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                payload = event.removeprefix(b"data: ")
                if payload == b"[DONE]":
                    seen_before["[DONE]"] = spooled_ids(proxy)
                    continue
                decoded = orjson.loads(payload)
                rid = decoded["id"]
                if decoded.get("usage"):
                    seen_before["usage"] = spooled_ids(proxy)
                elif decoded["choices"] and decoded["choices"][0]["finish_reason"] is None:
                    assert spooled_ids(proxy) == []  # mid-answer: not recorded yet
    assert seen_before["[DONE]"] == [rid]
    if include_usage:
        assert seen_before["usage"] == [rid]
    else:
        assert "usage" not in seen_before  # the chunk the proxy asked for was removed


async def test_a_responses_stream_is_spooled_before_response_completed(start_proxy, fake):
    proxy = await start_proxy(ledger_flush_interval_seconds=30)
    fake.behaviour.chunk_delay = 0.01
    body = {"model": "gpt-4o-mini", "input": "hi", "stream": True}
    async with aiohttp.ClientSession() as http, http.post(
            f"{proxy.url}/v1/responses", json=body, headers=HEADERS) as response:
        buffer = b""
        completed: list[str | None] | None = None
        async for chunk in response.content.iter_any():
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                if b"response.completed" in event:
                    completed = spooled_ids(proxy)
                    rid = orjson.loads(event.split(b"data: ", 1)[1])["response"]["id"]
    assert completed == [rid]


async def test_a_json_answer_is_spooled_before_it_is_returned(start_proxy, fake):
    proxy = await start_proxy(ledger_flush_interval_seconds=30)
    async with aiohttp.ClientSession() as http, http.post(
            f"{proxy.url}/v1/chat/completions", json=CHAT, headers=HEADERS) as response:
        spooled = spooled_ids(proxy)  # the headers are here: so is the record
        answer = await response.json()
    assert spooled == [answer["id"]]


async def test_committed_records_leave_the_spool_and_a_stop_removes_it(start_proxy, fake):
    proxy = await start_proxy()
    client = proxy.client()
    for _ in range(3):
        await client.chat.completions.create(**CHAT)
    await proxy.flush()
    spool = proxy.app[SPOOL]
    assert len(spool) == 0 and spooled_ids(proxy) == []
    directory = spool.directory
    await proxy.stop()
    assert not directory.exists() and list(directory.parent.iterdir()) == []


async def test_an_empty_spool_setting_turns_the_spool_off(start_proxy):
    proxy = await start_proxy(ledger_spool_dir="")
    assert proxy.settings.ledger_spool_dir is None and SPOOL not in proxy.app
    assert proxy.ledger.spool is None
    answer = await proxy.client().chat.completions.create(**CHAT)
    await proxy.flush()
    assert [r.response_id for r in await ledger_rows(proxy.engine)] == [answer.id]


async def test_a_background_final_state_read_as_a_stream_is_spooled_before_it_goes_out(start_proxy, fake):
    proxy = await start_proxy(ledger_flush_interval_seconds=30)
    fake.behaviour.background_polls = 0
    fake.behaviour.chunk_delay = 0.01  # headers first, the event later: the relay path
    created = await proxy.client(campaign="order").responses.create(
        model="gpt-4o-mini", input="hi", background=True)
    assert spooled_ids(proxy) == []  # nothing is metered at creation
    completed: list[str | None] | None = None
    async with aiohttp.ClientSession() as http, http.get(
            f"{proxy.url}/v1/responses/{created.id}", params={"stream": "true"},
            headers=HEADERS) as response:
        async for line in response.content:
            if line.startswith(b"event: response.completed"):
                completed = spooled_ids(proxy)
    assert completed == [created.id]
