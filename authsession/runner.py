"""Both FastAPI apps served by uvicorn in one event loop, with an ordered shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Iterator

import uvicorn

from authsession.http.internal import create_internal_app
from authsession.http.public import create_public_app
from authsession.settings import ListenAddress, Settings
from authsession.telemetry import Telemetry
from authsession.wiring import Core, StartupCheckFailed, build_core

log = logging.getLogger("authsession.runner")


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the runner (two servers, one loop)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(address: ListenAddress) -> socket.socket:
    """Bind a listening TCP socket (IPv6 when the host is an IPv6 literal)."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address.host, address.port))
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _bound(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def run(settings: Settings) -> int:
    """Check the components, serve until a signal, shut down in order. The exit status."""
    try:
        telemetry = Telemetry()
        core = build_core(settings, telemetry=telemetry)
    except Exception as exc:
        log.error("startup failed", extra={"component": "wiring", "cause": str(exc)})
        return 1
    try:
        try:
            await core.check()
        except StartupCheckFailed as exc:
            log.error(
                "startup check failed",
                extra={"component": exc.component, "cause": exc.cause},
            )
            return 1
        except Exception as exc:  # e.g. the first config read
            log.error(
                "startup check failed", extra={"component": "config_provider", "cause": str(exc)}
            )
            return 1
        return await _serve(core)
    finally:
        await core.aclose()
        log.info("resources closed")
        telemetry.shutdown(settings.SHUTDOWN_TIMEOUT.total_seconds())


async def _serve(core: Core) -> int:
    settings = core.settings
    listeners = {
        "public": (create_public_app(core), settings.PUBLIC_HTTP_ADDR),
        "internal": (create_internal_app(core), settings.INTERNAL_HTTP_ADDR),
    }
    sockets: dict[str, socket.socket] = {}
    try:
        for name, (_, address) in listeners.items():
            sockets[name] = bind(address)
    except OSError as exc:
        for sock in sockets.values():
            sock.close()
        log.error(
            "cannot open listener",
            extra={"listener": name, "address": str(address), "cause": str(exc)},
        )
        return 1

    servers: dict[str, _Server] = {}
    for name, (app, _) in listeners.items():
        config = uvicorn.Config(
            app,
            http="httptools",
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=int(settings.SHUTDOWN_TIMEOUT.total_seconds()) or 1,
        )
        servers[name] = _Server(config)

    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            log.info("shutting down", extra={"signal": signal.Signals(signum).name})
            for server in servers.values():
                server.should_exit = True
        else:
            log.warning("second signal: cutting the drain short")
            for server in servers.values():
                server.force_exit = True

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    core.config.start()
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
                    "listener opened", extra={"listener": name, "address": _bound(sockets[name])}
                )
        if not all(s.started for s in servers.values()):
            for server in servers.values():
                server.should_exit = True
        results = await asyncio.gather(*tasks.values(), return_exceptions=True)
        status = 0
        for name, result in zip(tasks, results, strict=True):
            if isinstance(result, BaseException):
                log.error("listener failed", extra={"listener": name, "cause": repr(result)})
                status = 1
            log.info("listener stopped", extra={"listener": name})
        return status
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await core.config.stop()
