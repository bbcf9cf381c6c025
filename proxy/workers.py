"""`serve --workers N`: a supervisor process and N forked workers serving one port.

Each worker is the whole proxy (its own event loop, ledger writer and budget-lease holder) and
binds the port with SO_REUSEPORT, so the kernel spreads connections evenly over the workers.
What they share goes through the database: one ledger, one budget (leases are per process
already, as for replicas) and, on a private socket each, their metrics (see proxy/peers.py).

The supervisor prepares once what every worker needs (in a child: the spool directory, the
prices, the database waited for and migrated, each failure one line with the status a single
process would exit with), forks the workers, logs "serving on" once they all listen, restarts
one that dies (after a pause that doubles while restarts keep failing), and on SIGTERM or
SIGINT passes SIGTERM on to every worker and waits while each drains its requests and flushes
its ledger. Workers run in a process group of their own (a terminal's Ctrl-C reaches the
supervisor only, which forwards it once) and get SIGTERM should the supervisor itself die.
"""

from __future__ import annotations

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
from typing import NoReturn

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
        # As the workers' own sockets (asyncio sets SO_REUSEADDR): connections of an earlier
        # server left in TIME-WAIT do not make the port look taken.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        probe.bind((settings.proxy_host, settings.proxy_port))


def _child_exit(run: Callable[[], None]) -> NoReturn:
    """In a forked child: run, then leave with its status (SystemExit's code; 1 for anything
    else, with its traceback) without running the parent's exit handlers."""
    code = 1
    try:
        run()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _fork() -> int:
    """os.fork with the log's buffers flushed first (else the child would write them again)."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    return os.fork()


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
                 run_worker: Callable[[Settings, WorkerSlot], None],
                 prepare: Callable[[Settings], None]) -> None:
        self.settings = settings
        self.count = count
        self.run_worker = run_worker
        self.prepare = prepare  # exits with one line and serve's status when it fails
        self.slots = [_Slot(i) for i in range(count)]
        self.stopping = False
        self.status = 0
        self.preparing: int | None = None  # the preparing child's pid, while it runs
        self.serving = False  # every worker has listened once ("serving on" was logged)
        self.ready: set[int] = set()
        self.ready_write = -1  # the pipe workers say they listen on (made by `run`)
        self.run_dir = Path(tempfile.mkdtemp(prefix="llm-cost-proxy-"))

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        ready_read, self.ready_write = os.pipe()
        os.set_blocking(ready_read, False)
        try:
            status = self._prepare()
            if self.stopping:  # a signal while preparing: start nothing
                return self.status
            if status:  # its line is out already
                return status
            for slot in self.slots:
                if not self.stopping:
                    self._start(slot)
            while not self.stopping:
                self._reap()
                self._note_ready(ready_read)
                now = time.monotonic()
                for slot in self.slots:
                    if slot.pid is None and not self.stopping and now >= slot.restart_at:
                        self._start(slot)
                time.sleep(POLL_SECONDS)
            self._drain()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(ready_read)
            os.close(self.ready_write)
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return self.status

    def _prepare(self) -> int:
        """Run `prepare` in a child process, as one process prepares before it serves; its exit
        status (0: the workers may start; 1 or 2 as `serve` exits, its line already printed).

        A child because Alembic, once imported, stays in a process's memory (~10 MB): the
        supervisor, and the workers forked from it, never import it.
        """
        pid = _fork()
        if pid == 0:
            for sig in (signal.SIGTERM, signal.SIGINT):  # a stop ends the wait for the database
                signal.signal(sig, signal.SIG_DFL)
            _child_exit(lambda: self.prepare(self.settings))
        self.preparing = pid
        try:
            _, status = os.waitpid(pid, 0)
        finally:
            self.preparing = None
        code = _status_code(status)
        return code if code >= 0 else 1  # killed by a signal: as a process that did not start

    def _note_ready(self, ready_read: int) -> None:
        """Read which workers listen; log "serving on" once all of them have."""
        try:
            data = os.read(ready_read, 4096)
        except BlockingIOError:
            return
        self.ready.update(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data) - 1, 2))
        if not self.serving and len(self.ready) >= self.count:
            self.serving = True
            log.info("serving on http://%s:%s with %d workers, forwarding to %s",
                     self.settings.proxy_host, self.settings.proxy_port, self.count,
                     self.settings.upstream_base_url)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if not self.stopping:
            log.info("%s: stopping %d workers", signal.Signals(signum).name, self.count)
            self.stopping = True
            if self.preparing is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.preparing, signal.SIGTERM)

    def _start(self, slot: _Slot) -> None:
        # The worker's settings: the supervisor has migrated already.
        settings = self.settings.model_copy(update={"auto_migrate": False})
        worker = WorkerSlot(slot.index, self.run_dir, self.ready_write)
        pid = _fork()
        if pid == 0:  # the worker
            _child_exit(lambda: self._become_worker(settings, worker))
        slot.pid, slot.started = pid, time.monotonic()

    def _become_worker(self, settings: Settings, worker: WorkerSlot) -> None:
        """In the forked child: its own process group, gone with the supervisor, then serve."""
        os.setpgid(0, 0)
        _die_with_parent()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        self.run_worker(settings, worker)

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
