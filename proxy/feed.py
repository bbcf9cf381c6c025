"""The HTTP side of the live cost feed: `GET /costs/events` (Server-Sent Events) and the built-in
cost page at `GET /`. The events themselves are made by `costing.feed`.

Access is the /costs rule. The page's own files are public when COSTS_API_TOKEN is set (they
hold no data; the page asks for the token); `/costs/events` also takes the token as `?token=`,
since a browser's EventSource cannot send headers (compared in constant time, never logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import socket
from collections.abc import AsyncIterator, Iterator
from importlib import resources

from aiohttp import web

from costing.feed import Feed, LedgerWatcher, MeterListener, TooManySubscribers
from costing.tasks import finish, pause
from proxy.access import digest
from proxy.costs_api import check_access, check_browser
from proxy.errors import Handler, ProxyError, answering
from proxy.state import FEED, LEDGER, METER, SETTINGS, STORE
from proxy.tags import validate_tag

SEND_BUFFER_BYTES = 64 * 1024
"""The kernel's send buffer of a stream's socket: bounded, so a subscriber that reads nothing
holds at most this much there (autotuned buffers grow to megabytes each), and falls behind, is
dropped and told `resync` after LIVE_QUEUE_EVENTS events rather than never."""

WRITE_INTERVAL_SECONDS = 0.05
"""A stream is written at most this often: events of a busy moment go out together, one send
per subscriber per interval instead of one per event (a send costs far more than a frame)."""

RESYNC_GRACE_SECONDS = 10.0
"""How long a dropped subscriber's writer may wait for the client to take `resync`."""

PAGE_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
}
STREAM_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                  "X-Accel-Buffering": "no"}


def check_events_access(request: web.Request) -> None:
    """The /costs rule; with a token set, `?token=` counts as well as the Authorization header."""
    token = request.config_dict[SETTINGS].costs_api_token
    sent = request.query.get("token")
    if token is not None and sent is not None:
        check_browser(request)
        if hmac.compare_digest(digest(sent), digest(token.get_secret_value())):  # as /costs does
            return
        raise ProxyError(401, "The token sent as ?token= is not COSTS_API_TOKEN",
                         type="authentication_error", code="invalid_costs_token")
    check_access(request)


async def events(request: web.Request) -> web.StreamResponse:
    """`GET /costs/events[?campaign_id=c1]`: usage and budget events as they happen."""
    check_events_access(request)
    campaign = request.query.get("campaign_id")
    campaign_id = validate_tag(campaign, "campaign_id") if campaign else None
    feed = request.config_dict[FEED]
    try:
        sub = feed.subscribe(campaign_id, request.headers.get("Last-Event-ID"))
    except TooManySubscribers as exc:
        raise ProxyError(503, f"Too many live subscribers: {exc} (LIVE_MAX_SUBSCRIBERS); retry later",
                         type="service_unavailable", code="too_many_subscribers",
                         headers={"Retry-After": "5"}) from None
    loop = asyncio.get_running_loop()
    transport = request.transport
    timers: list[asyncio.TimerHandle] = []

    def abort_later() -> None:
        if transport is not None:
            timers.append(loop.call_later(RESYNC_GRACE_SECONDS, transport.abort))

    sub.on_drop = abort_later
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
    response = web.StreamResponse(headers=STREAM_HEADERS)
    response.force_close()  # never reused: a dropped stream's connection may be aborted
    try:
        await response.prepare(request)
        await response.write(b"retry: 2000\n\n")
        while frames := await sub.take():
            for chunk in send_chunks(frames):
                await response.write(chunk)
            await asyncio.sleep(WRITE_INTERVAL_SECONDS)
        await response.write_eof()
    except (ConnectionResetError, OSError):
        pass  # the client left
    finally:
        feed.unsubscribe(sub)
        for timer in timers:
            timer.cancel()
    return response


def send_chunks(frames: list[bytes], size: int = SEND_BUFFER_BYTES) -> Iterator[bytes]:
    """The frames joined into writes of about `size` bytes: one send for a busy moment's
    events, while a resume's backlog (up to the whole ring) is never copied into one buffer."""
    start = length = 0
    for end, data in enumerate(frames):
        length += len(data)
        if length >= size:
            yield b"".join(frames[start:end + 1])
            start, length = end + 1, 0
    if start < len(frames):
        yield b"".join(frames[start:])


def _page_file(name: str) -> bytes:
    return resources.files("proxy").joinpath("page", name).read_bytes()


def page_handler(name: str) -> Handler:
    body = _page_file(name)
    content_type = PAGE_FILES[name]

    async def serve(request: web.Request) -> web.Response:
        if request.config_dict[SETTINGS].costs_api_token is None:
            check_access(request)  # no token: loopback only, as /costs
        else:
            check_browser(request)  # no data in the files, but not for a rebound name either
        return web.Response(body=body, content_type=content_type, charset="utf-8",
                            headers=PAGE_HEADERS)

    return answering(serve)


async def _live(app: web.Application) -> AsyncIterator[None]:
    """The feed, its heartbeat and the ledger watcher (other processes' calls)."""
    settings = app[SETTINGS]
    meter = app[METER]
    feed = Feed(buffer_events=settings.live_buffer_events, queue_events=settings.live_queue_events,
                max_subscribers=settings.live_max_subscribers)
    app[FEED] = feed
    meter.listeners.append(MeterListener(feed, meter))
    ledger = app[LEDGER]
    ledger.listeners.append(feed.seen.on_flushed)
    ledger.drop_listeners.append(feed.seen.on_dropped)
    watcher = LedgerWatcher(app[STORE], feed, lag_seconds=settings.live_poll_lag_seconds)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(_heartbeat(feed, settings.live_heartbeat_seconds, stop),
                                 name="live-heartbeat"),
             asyncio.create_task(watcher.run(settings.live_poll_interval_seconds, stop),
                                 name="live-watcher")]
    yield
    stop.set()
    feed.close()
    await finish(tasks, grace_seconds=5.0)


async def _heartbeat(feed: Feed, seconds: float, stop: asyncio.Event) -> None:
    while not await pause(stop, seconds):
        feed.heartbeat()


async def _end_streams(app: web.Application) -> None:
    """At shutdown, before aiohttp waits for handlers: open streams end instead of holding it."""
    if FEED in app:
        app[FEED].close()


def setup(app: web.Application) -> None:
    """The page's routes and the feed's life cycle (the /costs/events route is mounted by
    `costs_api.setup`, in the /costs sub-application)."""
    app.cleanup_ctx.append(_live)
    app.on_shutdown.append(_end_streams)
    app.router.add_get("/", page_handler("index.html"))
    for name in PAGE_FILES:
        app.router.add_get(f"/page/{name}", page_handler(name))
