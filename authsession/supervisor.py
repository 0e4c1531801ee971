"""``AUTHSESSION_WORKERS`` > 1: a parent process supervising that many server processes.

The parent runs the startup checks once, logs the ``resolved config`` line, binds both
sockets and hands them to every worker (an inherited socket: the kernel gives each new
connection to whichever worker accepts it first, which works with port 0 and on every
kernel). The first worker that serves makes them listen, so a port accepts connections
only once a worker answers there. Each worker is a fresh interpreter
(``python -m authsession.supervisor --worker …``) with the parent's environment, so it
reads the same configuration; it runs :func:`authsession.runner.run` on the inherited
sockets, and its log lines carry ``worker`` (1…N) and ``pid``.

Supervision:

- startup: a worker that exits before both its listeners serve makes the whole service
  stop and exit 1 (the same failure would repeat in every worker);
- a worker that dies later is restarted in its slot, the first time at once, then after
  1 s, 2 s, 4 s; after :data:`MAX_CONSECUTIVE_CRASHES` crashes in a row of one slot (a
  worker that served :data:`STABLE_AFTER` seconds resets its count) the parent gives up:
  it drains the other workers and exits 1, so that the orchestrator sees the failure;
- ``SIGTERM``/``SIGINT``: the parent closes its copies of the sockets, forwards the
  signal to every worker (each drains its in-flight requests within
  ``AUTHSESSION_SHUTDOWN_TIMEOUT``), waits for them and exits 0 (1 if a worker failed).
  A second signal is forwarded too and cuts the workers' drain short. Workers still
  running :func:`shutdown_bound` seconds after the first signal are killed (exit 1);
- a parent that dies (even by ``SIGKILL``) closes a pipe every worker watches: the
  workers drain and exit instead of serving on without supervision.

Workers run in their own process group, so a terminal's Ctrl-C reaches only the parent,
which forwards it once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from authsession.aio import Stopped, unless_stopped
from authsession.listeners import bind_all, describe
from authsession.settings import ConfigError, Settings, load_settings
from authsession.telemetry import configure_logging

log = logging.getLogger("authsession.supervisor")

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)
LISTENERS = ("public", "internal")
# Delays before restarting a slot after its 1st, 2nd, 3rd, 4th crash in a row; the next
# crash makes the parent give up.
RESTART_DELAYS = (0.0, 1.0, 2.0, 4.0)
MAX_CONSECUTIVE_CRASHES = len(RESTART_DELAYS) + 1
# A worker that served this long before it died starts a new series of crashes.
STABLE_AFTER = 30.0
READY = b"R"


def shutdown_bound(settings: Settings) -> float:
    """How long the parent waits for its workers after the first signal, in seconds.

    A worker drains within the shutdown budget, then closes Redis, the HTTP clients and
    telemetry, each bounded by it too.
    """
    return 3 * settings.SHUTDOWN_TIMEOUT.total_seconds() + 5.0


@dataclass
class RestartPolicy:
    """When a slot's worker is restarted after a crash, and when the parent gives up."""

    delays: Sequence[float] = RESTART_DELAYS
    stable_after: float = STABLE_AFTER
    crashes: int = 0

    def after_crash(self, served_for: float | None) -> float | None:
        """The delay before the restart, or ``None``: too many crashes in a row.

        ``served_for`` is how long the worker had served (``None``: it never became ready).
        """
        if served_for is not None and served_for >= self.stable_after:
            self.crashes = 0
        self.crashes += 1
        if self.crashes > len(self.delays):
            return None
        return self.delays[self.crashes - 1]


@dataclass
class _Slot:
    index: int
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    proc: asyncio.subprocess.Process | None = None
    ready_at: float | None = None
    restart: asyncio.TimerHandle | None = None


EventKind = Literal["signal", "ready", "exit", "restart", "deadline"]


@dataclass(frozen=True, slots=True)
class _Event:
    kind: EventKind
    slot: int = 0
    value: int = 0


class Supervisor:
    """The parent's state machine; every change happens in :meth:`run`'s one loop."""

    def __init__(self, settings: Settings, sockets: dict[str, socket.socket]) -> None:
        self.settings = settings
        self.sockets = sockets
        self.slots = [_Slot(index) for index in range(1, settings.WORKERS + 1)]
        self.events: asyncio.Queue[_Event] = asyncio.Queue()
        self.signals = 0
        self.stopping = False
        self.all_ready = False
        self.status = 0
        # Every worker watches the read end; only the parent holds the write end.
        self.parent_r, self.parent_w = os.pipe()
        self.waiters: set[asyncio.Task[None]] = set()

    # ---------------------------------------------------------------- the loop
    async def run(self) -> int:
        """Start the workers, supervise them until a signal or a failure; the exit status."""
        try:
            for slot in self.slots:
                await self._spawn(slot)
            while not self.stopping or any(s.proc is not None for s in self.slots):
                event = await self.events.get()
                await self._handle(event)
            log.info("workers stopped", extra={"workers": len(self.slots)})
            if self.all_ready:
                for name in LISTENERS:
                    log.info(
                        "listener stopped", extra={"listener": name, "workers": len(self.slots)}
                    )
            return self.status
        finally:
            for slot in self.slots:
                if slot.restart is not None:
                    slot.restart.cancel()
            self._close_sockets()
            for fd in (self.parent_r, self.parent_w):
                with contextlib.suppress(OSError):
                    os.close(fd)

    async def _handle(self, event: _Event) -> None:
        match event.kind:
            case "signal":
                self._on_signal(event.value)
            case "ready":
                slot = self.slots[event.slot - 1]
                if slot.proc is not None and slot.proc.pid == event.value:
                    self._on_ready(slot)
            case "exit":
                self._on_exit(self.slots[event.slot - 1], event.value)
            case "restart":
                slot = self.slots[event.slot - 1]
                slot.restart = None
                if not self.stopping:
                    await self._spawn(slot)
            case "deadline":
                for slot in self.slots:
                    if slot.proc is not None:
                        log.error(
                            "worker still running after the shutdown bound; killing it",
                            extra={"worker": slot.index, "pid": slot.proc.pid},
                        )
                        self._send(slot, signal.SIGKILL)
                        self.status = 1

    def _on_signal(self, signum: int) -> None:
        self.signals += 1
        name = signal.Signals(signum).name
        if self.signals == 1:
            log.info("shutting down", extra={"signal": name, "workers": len(self.slots)})
            self._stop(0)
        else:
            log.warning("second signal: cutting the drain short", extra={"signal": name})
        for slot in self.slots:
            self._send(slot, signum)

    def _on_ready(self, slot: _Slot) -> None:
        slot.ready_at = time.monotonic()
        if slot.proc is not None:
            log.info("worker ready", extra={"worker": slot.index, "pid": slot.proc.pid})
        if self.stopping or self.all_ready:
            return
        if all(s.ready_at is not None for s in self.slots):
            self.all_ready = True
            for name in LISTENERS:
                log.info(
                    "listener opened",
                    extra={
                        "listener": name,
                        "address": describe(self.sockets[name]),
                        "workers": len(self.slots),
                    },
                )

    def _on_exit(self, slot: _Slot, status: int) -> None:
        assert slot.proc is not None
        pid = slot.proc.pid
        slot.proc = None
        served_for = None if slot.ready_at is None else time.monotonic() - slot.ready_at
        slot.ready_at = None
        fields = {"worker": slot.index, "pid": pid, "status": _describe(status)}
        if self.stopping:
            log.info("worker exited", extra=fields)
            if status != 0:
                self.status = 1
            return
        if not self.all_ready:
            log.error("worker failed at startup; stopping the service", extra=fields)
            self._stop(1)
            return
        delay = slot.policy.after_crash(served_for)
        if delay is None:
            log.error(
                "worker keeps crashing; giving up",
                extra={**fields, "crashes": slot.policy.crashes},
            )
            self._stop(1)
            return
        log.error("worker died; restarting it", extra={**fields, "restart_in": delay})
        loop = asyncio.get_running_loop()
        slot.restart = loop.call_later(delay, self.events.put_nowait, _Event("restart", slot.index))

    def _stop(self, status: int) -> None:
        """Stop restarting, stop accepting, ask every worker to drain."""
        if self.stopping:
            return
        self.stopping = True
        self.status = max(self.status, status)
        self._close_sockets()
        for slot in self.slots:
            if slot.restart is not None:
                slot.restart.cancel()
                slot.restart = None
        if status:  # a failure, not a signal: the workers get one SIGTERM from here
            for slot in self.slots:
                self._send(slot, signal.SIGTERM)
        loop = asyncio.get_running_loop()
        loop.call_later(shutdown_bound(self.settings), self.events.put_nowait, _Event("deadline"))

    # ---------------------------------------------------------------- workers
    async def _spawn(self, slot: _Slot) -> None:
        ready_r, ready_w = os.pipe()
        fds = {name: sock.fileno() for name, sock in self.sockets.items()}
        argv = [
            sys.executable,
            "-m",
            "authsession.supervisor",
            "--worker",
            str(slot.index),
            "--public-fd",
            str(fds["public"]),
            "--internal-fd",
            str(fds["internal"]),
            "--ready-fd",
            str(ready_w),
            "--parent-fd",
            str(self.parent_r),
        ]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(*fds.values(), ready_w, self.parent_r),
                process_group=0,
            )
        except OSError as exc:
            os.close(ready_r)
            os.close(ready_w)
            log.error("cannot start a worker", extra={"worker": slot.index, "cause": str(exc)})
            self._stop(1)
            return
        finally:
            with contextlib.suppress(OSError):
                os.close(ready_w)
        slot.proc = proc
        log.info("worker started", extra={"worker": slot.index, "pid": proc.pid})
        loop = asyncio.get_running_loop()
        loop.add_reader(ready_r, self._read_ready, loop, ready_r, slot.index, proc.pid)
        waiter = asyncio.create_task(self._wait(proc, slot.index), name=f"worker-{slot.index}")
        self.waiters.add(waiter)
        waiter.add_done_callback(self.waiters.discard)

    def _read_ready(self, loop: asyncio.AbstractEventLoop, fd: int, index: int, pid: int) -> None:
        try:
            data = os.read(fd, 16)
        except OSError:
            data = b""
        loop.remove_reader(fd)
        os.close(fd)
        if READY in data:
            self.events.put_nowait(_Event("ready", index, pid))

    async def _wait(self, proc: asyncio.subprocess.Process, index: int) -> None:
        status = await proc.wait()
        self.events.put_nowait(_Event("exit", index, status))

    def _send(self, slot: _Slot, signum: int) -> None:
        if slot.proc is not None and slot.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                slot.proc.send_signal(signum)

    def _close_sockets(self) -> None:
        for sock in self.sockets.values():
            sock.close()


def _describe(status: int) -> str:
    if status < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-status).name}"
        return f"killed by signal {-status}"
    return f"exit {status}"


# --------------------------------------------------------------------------- the parent


def supervise(settings: Settings) -> int:
    """``authsession`` with ``AUTHSESSION_WORKERS`` > 1: the parent's whole life."""
    try:
        return asyncio.run(_parent(settings))
    except KeyboardInterrupt:  # a signal before the handlers were installed
        return 0


async def _parent(settings: Settings) -> int:
    loop = asyncio.get_running_loop()
    supervisor: Supervisor | None = None
    stopped = asyncio.Event()

    def on_signal(signum: int) -> None:
        if supervisor is not None:
            supervisor.events.put_nowait(_Event("signal", value=signum))
        else:
            log.info(
                "shutting down during the startup checks",
                extra={"signal": signal.Signals(signum).name},
            )
            stopped.set()

    for signum in HANDLED_SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        try:
            status = await _check_once(settings, stopped)
        except Stopped:
            return 0
        if status:
            return status
        sockets = bind_all(
            {"public": settings.PUBLIC_HTTP_ADDR, "internal": settings.INTERNAL_HTTP_ADDR},
            listen=False,
        )
        if sockets is None:
            return 1
        supervisor = Supervisor(settings, sockets)
        return await supervisor.run()
    finally:
        for signum in HANDLED_SIGNALS:
            loop.remove_signal_handler(signum)


async def _check_once(settings: Settings, stopped: asyncio.Event) -> int:
    """The startup checks of CONTRACT §2, once, before anything is bound.

    :class:`Stopped` when ``stopped`` is set before they end.
    """
    from authsession.resolved import log_resolved_config
    from authsession.telemetry import Telemetry
    from authsession.wiring import StartupCheckFailed, build_core

    try:
        telemetry = Telemetry(install_global=False)
        core = build_core(settings, telemetry=telemetry)
    except Exception as exc:
        log.error("startup failed", extra={"component": "wiring", "cause": str(exc)})
        return 1
    try:
        await unless_stopped(core.check(), stopped)
    except StartupCheckFailed as exc:
        log.error("startup check failed", extra={"component": exc.component, "cause": exc.cause})
        return 1
    finally:
        await core.aclose()
        telemetry.shutdown(settings.SHUTDOWN_TIMEOUT.total_seconds())
    log_resolved_config(settings)
    return 0


# --------------------------------------------------------------------------- a worker


class WorkerFields(logging.Filter):
    """Adds ``worker`` (its slot, 1…N) and ``pid`` to every log line of a worker."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index
        self.pid = os.getpid()

    def filter(self, record: logging.LogRecord) -> bool:
        """Always passes the record, with the two fields set."""
        record.worker = self.index
        record.pid = self.pid
        return True


def _tell_telemetry(index: int) -> None:
    """Give the worker's spans and metrics the resource attribute ``authsession.worker``.

    Each process already has its own ``service.instance.id`` (random, new at every
    restart); the slot number lets a dashboard follow one worker across restarts.
    """
    name = "OTEL_RESOURCE_ATTRIBUTES"
    current = os.environ.get(name, "").strip().strip(",")
    os.environ[name] = ",".join(p for p in (current, f"authsession.worker={index}") if p)


def worker_main(argv: Sequence[str] | None = None) -> int:
    """A worker process: serve on the inherited sockets until the parent says stop."""
    parser = argparse.ArgumentParser(prog="authsession-worker")
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--public-fd", type=int, required=True)
    parser.add_argument("--internal-fd", type=int, required=True)
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--parent-fd", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(exc.one_line(), file=sys.stderr, flush=True)
        return 2
    configure_logging(settings.LOG_LEVEL, settings.LOG_FORMAT)
    _tell_telemetry(args.worker)
    fields = WorkerFields(args.worker)
    for handler in logging.getLogger().handlers:
        handler.addFilter(fields)

    import uvloop

    from authsession.runner import Inherited, run

    sockets = {
        "public": socket.socket(fileno=args.public_fd),
        "internal": socket.socket(fileno=args.internal_fd),
    }
    ready_fd: int | None = args.ready_fd

    def on_ready() -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(ready_fd, READY)
            with contextlib.suppress(OSError):
                os.close(ready_fd)
            ready_fd = None

    try:
        return uvloop.run(run(settings, Inherited(sockets, on_ready, args.parent_fd)))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(worker_main())
