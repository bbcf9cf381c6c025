"""A small Server-Sent Events reader for the live feed's tests: parses what /costs/events sends
(ids, event names, JSON data, comments) from a real aiohttp response."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson


@dataclass
class Event:
    id: str | None
    event: str
    data: Any


class EventReader:
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.comments: list[str] = []
        self._buffer = b""

    async def next(self, within: float = 10.0) -> Event | None:
        """The next event (comments are collected, not returned); None at the end of the stream."""
        async with asyncio.timeout(within):
            while True:
                block, sep, rest = self._buffer.partition(b"\n\n")
                if sep:
                    self._buffer = rest
                    event = self._parse(block)
                    if event is not None:
                        return event
                    continue
                chunk = await self.response.content.readany()
                if not chunk:
                    return None
                self._buffer += chunk

    def _parse(self, block: bytes) -> Event | None:
        fields: dict[str, str] = {}
        for line in block.decode().split("\n"):
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
        if "data" not in fields:
            return None
        return Event(fields.get("id"), fields.get("event", "message"), orjson.loads(fields["data"]))

    async def events(self, count: int, *, kinds: tuple[str, ...] = ("usage", "budget", "resync"),
                     within: float = 10.0) -> list[Event]:
        found: list[Event] = []
        while len(found) < count:
            event = await self.next(within)
            assert event is not None, f"the stream ended after {len(found)} of {count} events"
            if event.event in kinds:
                found.append(event)
        return found
