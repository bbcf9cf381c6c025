"""`serve --workers N`: a supervisor process and N forked workers serving one port.

Each worker is the whole proxy (its own event loop, ledger writer and budget-lease holder) and
binds the port with SO_REUSEPORT, so the kernel spreads connections evenly over the workers.
What they share goes through the database: one ledger, one budget (leases are per process
already, as for replicas) and, on a private socket each, their metrics (see proxy/peers.py).

The supervisor migrates the database once, forks the workers, restarts one that dies (after a
pause that doubles while restarts keep failing), and on SIGTERM or SIGINT passes SIGTERM on to
every worker and waits while each drains its requests and flushes its ledger. Workers run in a
process group of their own (a terminal's Ctrl-C reaches the supervisor only, which forwards it
once) and get SIGTERM should the supervisor itself die.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from costing import schema
from costing.settings import Settings
from proxy.peers import WorkerSlot

log = logging.getLogger("llm_cost_proxy")

FIRST_RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0
STABLE_SECONDS = 30.0  # a worker that ran this long before dying is restarted without delay growth
POLL_SECONDS = 0.1
CONFIG_ERROR = 2  # a worker's exit status for a start-up error that a restart cannot fix
PR_SET_PDEATHSIG = 1


@dataclass
class _Slot:
    index: int
    pid: int | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float = 0.0
    exits: list[int] = field(default_factory=list)


def check_port(settings: Settings) -> None:
    """Fail before forking when the port cannot be bound (one clear error, not N worker errors)."""
    family = socket.AF_INET6 if ":" in settings.proxy_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        probe.bind((settings.proxy_host, settings.proxy_port))


def migrate_in_child(settings: Settings) -> bool:
    """Run the migrations in a child process; whether they succeeded.

    Alembic, once imported, stays in a process's memory (~10 MB): the supervisor, and the workers
    forked from it, never import it.
    """
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            asyncio.run(schema.upgrade(settings))
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if status:
        log.error("the database migration failed (see above): not starting the workers")
    return status == 0


def _die_with_parent() -> None:
    """Ask Linux to send this worker SIGTERM when the supervisor dies (no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _status_code(status: int) -> int:
    return os.waitstatus_to_exitcode(status)


class Supervisor:
    """Starts, watches and stops the workers; `run` returns the exit status of `serve`."""

    def __init__(self, settings: Settings, count: int,
                 run_worker: Callable[[Settings, WorkerSlot], None]) -> None:
        self.settings = settings
        self.count = count
        self.run_worker = run_worker
        self.slots = [_Slot(i) for i in range(count)]
        self.stopping = False
        self.status = 0
        self.run_dir = Path(tempfile.mkdtemp(prefix="llm-cost-proxy-"))

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            if self.settings.auto_migrate and not migrate_in_child(self.settings):
                return CONFIG_ERROR
            for slot in self.slots:
                if not self.stopping:  # a signal during the migration: start nothing
                    self._start(slot)
            log.info("serving on http://%s:%s with %d workers, forwarding to %s",
                     self.settings.proxy_host, self.settings.proxy_port, self.count,
                     self.settings.upstream_base_url)
            while not self.stopping:
                self._reap()
                now = time.monotonic()
                for slot in self.slots:
                    if slot.pid is None and not self.stopping and now >= slot.restart_at:
                        self._start(slot)
                time.sleep(POLL_SECONDS)
            self._drain()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return self.status

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if not self.stopping:
            log.info("%s: stopping %d workers", signal.Signals(signum).name, self.count)
            self.stopping = True

    def _start(self, slot: _Slot) -> None:
        # The worker's settings: the supervisor has migrated already.
        settings = self.settings.model_copy(update={"auto_migrate": False})
        worker = WorkerSlot(slot.index, self.run_dir)
        for handler in logging.getLogger().handlers:
            handler.flush()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                os.setpgid(0, 0)
                _die_with_parent()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, signal.SIG_DFL)
                self.run_worker(settings, worker)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        slot.pid, slot.started = pid, time.monotonic()

    def _reap(self) -> None:
        """Collect workers that exited; schedule their restart (or stop all on a config error)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            code = _status_code(status)
            slot.pid = None
            slot.exits.append(code)
            if self.stopping:
                continue
            if code == CONFIG_ERROR:
                log.error("worker %d could not start (exit status %d): stopping", slot.index, code)
                self.status = CONFIG_ERROR
                self.stopping = True
                continue
            lived = time.monotonic() - slot.started
            slot.failures = 0 if lived >= STABLE_SECONDS else slot.failures + 1
            delay = 0.0 if not slot.failures else min(
                FIRST_RESTART_DELAY * 2 ** (slot.failures - 1), MAX_RESTART_DELAY)
            slot.restart_at = time.monotonic() + delay
            log.warning("worker %d (pid %d) exited with status %d after %.1f s; restarting in %.1f s",
                        slot.index, pid, code, lived, delay)

    def _drain(self) -> None:
        """SIGTERM to every worker; wait while they drain and flush; SIGKILL past the grace time."""
        for slot in self.slots:
            if slot.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_timeout_seconds + 15
        while any(slot.pid is not None for slot in self.slots):
            self._reap()
            if time.monotonic() > deadline:
                for slot in self.slots:
                    if slot.pid is not None:
                        log.error("worker %d (pid %d) did not stop in time: killed", slot.index, slot.pid)
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(slot.pid, signal.SIGKILL)
                deadline = float("inf")
                self.status = self.status or 1
            time.sleep(POLL_SECONDS)
        last = [slot.exits[-1] for slot in self.slots if slot.exits]
        if any(last) and not self.status:
            self.status = 1
