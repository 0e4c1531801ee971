"""Both FastAPI apps served by uvicorn in one event loop, with an ordered shutdown.

One signal handler covers the whole life of the process: during the startup checks a
signal stops them (exit 0); while serving, the first signal drains both listeners and
a second cuts the drain short; while resources close, further signals are ignored so
that the ordered shutdown always completes.

A worker of the supervisor (``authsession/supervisor.py``, ``AUTHSESSION_WORKERS`` > 1)
runs the same code on the listening sockets its parent bound (:class:`Inherited`): it
tells the parent when both listeners serve, and drains as on ``SIGTERM`` when the parent
is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import resource
import signal
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import uvicorn
from starlette.types import ASGIApp

from authsession.aio import Stopped, unless_stopped
from authsession.http.internal import create_internal_app
from authsession.http.protocol import (
    ConnectionLimits,
    ContractHttpProtocol,
    descriptors_per_listener,
)
from authsession.http.public import create_public_app
from authsession.listeners import bind_all, describe
from authsession.redis.base import set_client_spans
from authsession.resolved import log_resolved_config
from authsession.settings import Settings
from authsession.telemetry import Telemetry
from authsession.wiring import Core, StartupCheckFailed, build_core

log = logging.getLogger("authsession.runner")

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the runner (two servers, one loop)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass(frozen=True, slots=True)
class Inherited:
    """What a worker gets from its supervising parent instead of binding by itself.

    ``sockets`` are the listening sockets by listener name; ``on_ready`` is called once
    both listeners serve; ``parent_fd`` is the read end of a pipe whose write end only
    the parent holds: end of file there means the parent is gone.
    """

    sockets: dict[str, socket.socket]
    on_ready: Callable[[], None]
    parent_fd: int | None = None


class _Signals:
    """What SIGTERM/SIGINT mean at each stage of the process's life."""

    def __init__(self) -> None:
        # Set by a signal during the startup checks, which then stop (never by cancelling
        # the main task: see authsession/aio.py).
        self.stopped = asyncio.Event()
        self.stage = "starting"
        self.servers: list[_Server] = []
        self.count = 0

    def __call__(self, signum: int) -> None:
        self.count += 1
        name = signal.Signals(signum).name
        match self.stage:
            case "starting":
                log.info("shutting down during the startup checks", extra={"signal": name})
                self.stopped.set()
            case "serving" if self.count == 1:
                log.info("shutting down", extra={"signal": name})
                for server in self.servers:
                    server.should_exit = True
            case "serving":
                log.warning("second signal: cutting the drain short", extra={"signal": name})
                for server in self.servers:
                    server.force_exit = True
            case _:
                log.info("already closing; signal ignored", extra={"signal": name})

    def parent_gone(self) -> None:
        """The supervising parent died: stop as on a first signal (never cut short)."""
        if self.count:
            return
        log.warning("the supervising parent is gone; shutting down")
        self.count += 1
        match self.stage:
            case "starting":
                self.stopped.set()
            case "serving":
                for server in self.servers:
                    server.should_exit = True
            case _:
                pass


class _OncePerProcess(logging.Filter):
    """Pass uvicorn's process-lifecycle lines once: each of the two servers logs them.

    ``Started server process [<pid>]`` is about the process, not a listener; the runner's
    own ``listener opened`` / ``listener stopped`` lines name each listener.
    """

    MESSAGES = frozenset(
        {"Started server process [%d]", "Shutting down", "Finished server process [%d]"}
    )

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a lifecycle line already logged by the other server."""
        if not isinstance(record.msg, str) or record.msg not in self.MESSAGES:
            return True
        if record.msg in self._seen:
            return False
        self._seen.add(record.msg)
        return True


async def run(settings: Settings, inherited: Inherited | None = None) -> int:
    """Check the components, serve until a signal, shut down in order. The exit status.

    With ``inherited`` (a worker), serve on the parent's sockets instead of binding; the
    parent has logged the ``resolved config`` line already.
    """
    loop = asyncio.get_running_loop()
    signals = _Signals()
    for signum in HANDLED_SIGNALS:
        loop.add_signal_handler(signum, signals, signum)
    parent_fd = inherited.parent_fd if inherited is not None else None
    if parent_fd is not None:
        loop.add_reader(parent_fd, _watch_parent, loop, parent_fd, signals)
    once = _OncePerProcess()
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addFilter(once)
    try:
        return await _run(settings, signals, inherited)
    finally:
        uvicorn_log.removeFilter(once)
        for signum in HANDLED_SIGNALS:
            loop.remove_signal_handler(signum)
        if parent_fd is not None:
            loop.remove_reader(parent_fd)


def _watch_parent(loop: asyncio.AbstractEventLoop, fd: int, signals: _Signals) -> None:
    """The parent's pipe is readable: end of file (or an error) means the parent died."""
    try:
        data = os.read(fd, 64)
    except OSError:
        data = b""
    if not data:
        loop.remove_reader(fd)
        signals.parent_gone()


async def _run(settings: Settings, signals: _Signals, inherited: Inherited | None = None) -> int:
    try:
        telemetry = Telemetry()
        core = build_core(settings, telemetry=telemetry)
    except Exception as exc:
        log.error("startup failed", extra={"component": "wiring", "cause": str(exc)})
        return 1
    try:
        try:
            await unless_stopped(core.check(), signals.stopped)
        except Stopped:
            return 0
        except StartupCheckFailed as exc:
            log.error(
                "startup check failed",
                extra={"component": exc.component, "cause": exc.cause},
            )
            return 1
        if inherited is None:
            log_resolved_config(settings)
        set_client_spans(telemetry.recording)
        _settle_memory()
        return await _serve(core, signals, inherited)
    finally:
        signals.stage = "closing"
        await core.aclose()
        log.info("resources closed")
        telemetry.shutdown(settings.SHUTDOWN_TIMEOUT.total_seconds())


def _settle_memory() -> None:
    """Move everything built at startup out of the garbage collector's way.

    What exists now (modules, apps, the core) lives as long as the process: frozen, the
    collector no longer walks it on every collection; with a higher first threshold it
    collects less often under load (a request allocates many short-lived objects, almost
    none of them in cycles).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


# Descriptors kept free of client connections: the interpreter, Redis and outbound
# connections, the listening sockets themselves.
RESERVED_FILES = 64


def connection_limit(configured: int, listeners: int = 2) -> int:
    """The per-listener connection limit the process's file limit can actually hold.

    Both listeners full (served connections and the 503s in flight to refused ones,
    :func:`descriptors_per_listener`), plus :data:`RESERVED_FILES`, must fit under
    ``RLIMIT_NOFILE``; otherwise a flood on one listener would exhaust the descriptors
    and starve the other, and Redis. The soft limit is first raised toward the hard one
    (as Go does at startup); if that is still too low, the limit is lowered, with a
    warning, so that connections beyond it get the contract's 503 instead.
    """

    def needed(limit: int) -> int:
        return descriptors_per_listener(limit) * listeners + RESERVED_FILES

    wanted = needed(configured)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return configured
    raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if raised > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    if soft >= wanted:
        return configured
    fitting = configured
    while fitting > 1 and needed(fitting) > soft:
        fitting = max(1, min(fitting - 1, (soft - RESERVED_FILES) // listeners))
    log.warning(
        "AUTHSESSION_HTTP_MAX_CONNECTIONS lowered to fit the file limit",
        extra={"configured": configured, "effective": fitting, "file_limit": soft},
    )
    return fitting


def server_config(
    listener: str, app: ASGIApp, settings: Settings, max_connections: int
) -> uvicorn.Config:
    """uvicorn's configuration of one listener: the hardened protocol and its limits."""
    limits = ConnectionLimits(
        listener=listener,
        header_timeout=settings.HTTP_HEADER_TIMEOUT.total_seconds(),
        max_connections=max_connections,
    )
    return uvicorn.Config(
        app,
        http=ContractHttpProtocol.for_listener(limits),
        ws="none",
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        # Annotated int, used as a delay: sub-second values work and are kept.
        timeout_keep_alive=settings.HTTP_KEEPALIVE_TIMEOUT.total_seconds(),  # type: ignore[arg-type]
        timeout_graceful_shutdown=math.ceil(settings.SHUTDOWN_TIMEOUT.total_seconds()),
    )


async def _serve(core: Core, signals: _Signals, inherited: Inherited | None = None) -> int:
    settings = core.settings
    listeners = {
        "public": (create_public_app(core), settings.PUBLIC_HTTP_ADDR),
        "internal": (create_internal_app(core), settings.INTERNAL_HTTP_ADDR),
    }
    bound = bind_all(
        {name: address for name, (_, address) in listeners.items()},
        bound=inherited.sockets if inherited else None,
    )
    if bound is None:
        return 1
    sockets = bound

    max_connections = connection_limit(settings.HTTP_MAX_CONNECTIONS, len(listeners))
    servers = {
        name: _Server(server_config(name, app, settings, max_connections))
        for name, (app, _) in listeners.items()
    }
    signals.servers = list(servers.values())
    signals.stage = "serving"

    core.start_background()
    tasks = {
        name: asyncio.create_task(server.serve(sockets=[sockets[name]]), name=f"listener-{name}")
        for name, server in servers.items()
    }
    try:
        while not all(s.started for s in servers.values()):
            if any(t.done() for t in tasks.values()):
                break
            await asyncio.sleep(0.01)
        for name, server in servers.items():
            if server.started:
                log.info(
                    "listener opened", extra={"listener": name, "address": describe(sockets[name])}
                )
        if not all(s.started for s in servers.values()):
            for server in servers.values():
                server.should_exit = True
        elif inherited is not None:
            inherited.on_ready()
        # One listener ending on its own (a crash) stops the other: a process serving
        # only one of its two APIs would look alive to its supervisor.
        await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_COMPLETED)
        if signals.count == 0:
            log.error("a listener stopped without a signal; stopping the other")
        for server in servers.values():
            server.should_exit = True
        results = await asyncio.gather(*tasks.values(), return_exceptions=True)
        status = 0 if signals.count else 1
        for name, result in zip(tasks, results, strict=True):
            if isinstance(result, BaseException):
                log.error("listener failed", extra={"listener": name, "cause": repr(result)})
                status = 1
            log.info("listener stopped", extra={"listener": name})
        return status
    finally:
        signals.stage = "closing"
        for sock in sockets.values():
            sock.close()  # uvicorn closes them on a normal stop; not when a server crashed
