"""What a worker shares with the other workers of one `serve --workers N`: its metrics.

Each worker serves its own registry on a private unix socket in the supervisor's run directory;
the worker that receives a scrape of /metrics reads every other worker's text from there and
merges it with its own (see proxy/scrape.py). A worker that does not answer (killed, not yet
replaced) is left out of that scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from proxy.scrape import merged_exposition

log = logging.getLogger(__name__)

SCRAPE_TIMEOUT_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class WorkerSlot:
    """Which worker this process is (0..N-1; a replacement takes the slot of the one it replaces)."""

    index: int
    run_dir: Path
    ready_fd: int = -1  # the supervisor's pipe: a worker says on it that it serves

    def ready(self, _message: object = None) -> None:
        """Tell the supervisor this worker listens (run_app's `print`, called once it does), so
        "serving on" is logged when the workers serve, not when they were forked."""
        if self.ready_fd >= 0:
            with contextlib.suppress(OSError):
                os.write(self.ready_fd, self.index.to_bytes(2, "big"))

    @property
    def socket(self) -> Path:
        return self.run_dir / f"worker-{self.index}.sock"

    def peer_sockets(self) -> list[Path]:
        return [path for path in sorted(self.run_dir.glob("worker-*.sock")) if path != self.socket]


async def serve_registry(slot: WorkerSlot, registry: CollectorRegistry) -> web.AppRunner:
    """This worker's own registry at GET /metrics on its private socket; the caller cleans up."""

    async def own_metrics(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", own_metrics)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    with contextlib.suppress(FileNotFoundError):
        slot.socket.unlink()  # left by the worker this one replaces
    await web.UnixSite(runner, str(slot.socket)).start()
    return runner


async def _peer_text(path: Path) -> str | None:
    try:
        async with aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(path)),
                timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_SECONDS)) as http:
            async with http.get("http://worker/metrics") as response:
                response.raise_for_status()
                return await response.text()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        log.debug("worker metrics at %s not read: %s", path, exc)
        return None


async def all_workers_exposition(slot: WorkerSlot, registry: CollectorRegistry) -> bytes:
    """Every answering worker's metrics, this one's included, merged into one exposition."""
    own = generate_latest(registry).decode()
    peers = await asyncio.gather(*(_peer_text(path) for path in slot.peer_sockets()))
    return merged_exposition([own, *(text for text in peers if text is not None)])
