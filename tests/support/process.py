"""Run the real ``authsession`` console script as a child process for end-to-end tests."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, Self

from tests.support.lifecycle import ExitCleanup, Managed, wait_until
from tests.support.net import LOOPBACK, free_ports, port_accepts

READY_TIMEOUT = 15.0
EXIT_TIMEOUT = 15.0
# Lowers RLIMIT_NOFILE, then becomes the real command (exec: same pid, same signals).
# A wrapper rather than preexec_fn, which is not safe while the tests run threads.
_LIMIT_FILES = (
    "import os, resource, sys; n = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); os.execvp(sys.argv[2], sys.argv[2:])"
)


class AuthsessionProcessError(AssertionError):
    """The process did not become ready / did not exit as expected (output attached)."""


def authsession_script() -> Path:
    """The ``authsession`` console script of the running virtualenv."""
    return Path(sys.executable).parent / "authsession"


def base_env() -> dict[str, str]:
    """The minimal environment every child starts from (no AUTHSESSION_* variables)."""
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": os.environ.get("HOME", tempfile.gettempdir()),
        "PYTHONUNBUFFERED": "1",
    }
    for name in ("LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


# Defaults the tests run the process with unless they say otherwise: the send-email-code
# timing floor (250 ms) would only slow every test down; the tests of the floor set it.
TEST_DEFAULTS = {"AUTHSESSION_SEND_EMAIL_CODE_MIN_DURATION": "0"}


PUBLIC_ADDR_VAR = "AUTHSESSION_PUBLIC_HTTP_ADDR"
INTERNAL_ADDR_VAR = "AUTHSESSION_INTERNAL_HTTP_ADDR"


def port_of(addr: str) -> int:
    """The port of a ``host:port`` / ``:port`` / ``[::1]:port`` address."""
    _, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address without a port: {addr!r}")
    return int(port)


class AuthsessionProcess(Managed):
    """The ``authsession`` process with a caller-given environment.

    ``env`` is merged over :func:`base_env` (PATH, HOME, PYTHONUNBUFFERED=1, locale) and
    :data:`TEST_DEFAULTS`; the caller decides every other ``AUTHSESSION_*`` variable,
    including the listener addresses, which must match ``public_port`` / ``internal_port``.
    stdout and stderr go to files (``stdout.log`` / ``stderr.log``) in ``workdir`` (a new
    temp dir if not given, removed by :meth:`close`). ``argv`` replaces the console script
    (for testing the harness).
    ``max_open_files`` lowers the child's ``RLIMIT_NOFILE`` (soft and hard), so a test can
    show what happens when the process runs out of file descriptors.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        public_port: int,
        internal_port: int,
        argv: Sequence[str] | None = None,
        workdir: Path | None = None,
        max_open_files: int | None = None,
    ) -> None:
        self.env: dict[str, str] = {**base_env(), **TEST_DEFAULTS, **env}
        self.max_open_files = max_open_files
        self.public_port = public_port
        self.internal_port = internal_port
        self.argv: list[str] = list(argv) if argv is not None else [str(authsession_script())]
        self._own_workdir = workdir is None
        self.workdir: Path = (
            Path(tempfile.mkdtemp(prefix="authsession-test-")) if workdir is None else workdir
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = self.workdir / "stdout.log"
        self.stderr_path = self.workdir / "stderr.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    @classmethod
    def on_free_ports(cls, env: Mapping[str, str], **options: Any) -> Self:
        """The process on two free loopback ports (unless ``env`` names its listeners),
        logging JSON unless ``env`` says otherwise; ``options`` as for the constructor."""
        full_env = dict(env)
        public, internal = free_ports(2)
        full_env.setdefault(PUBLIC_ADDR_VAR, f"{LOOPBACK}:{public}")
        full_env.setdefault(INTERNAL_ADDR_VAR, f"{LOOPBACK}:{internal}")
        full_env.setdefault("AUTHSESSION_LOG_FORMAT", "json")
        return cls(
            full_env,
            public_port=port_of(full_env[PUBLIC_ADDR_VAR]),
            internal_port=port_of(full_env[INTERNAL_ADDR_VAR]),
            **options,
        )

    # ------------------------------------------------------------------ urls
    @property
    def public_url(self) -> str:
        return f"http://{LOOPBACK}:{self.public_port}"

    @property
    def internal_url(self) -> str:
        return f"http://{LOOPBACK}:{self.internal_port}"

    @property
    def pid(self) -> int:
        return self._require_started().pid

    @property
    def returncode(self) -> int | None:
        """Exit status if the process has exited, else None (negative = killed by signal)."""
        return self._proc.poll() if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Self:
        """Spawn the process and return at once (see :meth:`wait_ready`)."""
        with self._lock:
            if self._proc is not None:
                raise AuthsessionProcessError("the process was already started")
            _LIVE.add(self)
            argv = self.argv
            if self.max_open_files is not None:
                argv = [sys.executable, "-c", _LIMIT_FILES, str(self.max_open_files), *argv]
            with (
                self.stdout_path.open("wb") as out,
                self.stderr_path.open("wb") as err,
            ):
                self._proc = subprocess.Popen(
                    argv,
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    cwd=self.workdir,
                    start_new_session=True,  # terminal Ctrl-C does not reach it
                )
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> Self:
        """Wait until both ports accept TCP connections.

        Raises :class:`AuthsessionProcessError` (with the captured output) if the process
        exits first or ``timeout`` passes.
        """
        proc = self._require_started()
        deadline = time.monotonic() + timeout
        pending = {self.public_port, self.internal_port}
        while True:
            if proc.poll() is not None:
                raise AuthsessionProcessError(
                    f"authsession exited with status {proc.returncode} before it was ready"
                    f"\n{self.output_report()}"
                )
            pending = {port for port in pending if not port_accepts(port, timeout=0.2)}
            if not pending:
                return self
            if time.monotonic() >= deadline:
                raise AuthsessionProcessError(
                    f"authsession did not listen on {sorted(pending)} within {timeout}s"
                    f"\n{self.output_report()}"
                )
            time.sleep(0.05)

    def wait_exit(self, timeout: float = EXIT_TIMEOUT) -> int:
        """Wait for the process to exit and return its status (-N: killed by signal N).

        Raises :class:`AuthsessionProcessError` (with the output) on timeout; the process
        keeps running in that case.
        """
        proc = self._require_started()
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AuthsessionProcessError(
                f"authsession did not exit within {timeout}s\n{self.output_report()}"
            ) from None

    def send_signal(self, sig: int) -> None:
        proc = self._require_started()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

    def terminate(self) -> None:
        """Send SIGTERM (does not wait; use :meth:`wait_exit`)."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the process (and anything left in its process group) and reap it."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        proc.wait()

    def close(self) -> None:
        """Kill the process if still running; remove the work dir if this object made it."""
        self.kill()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        _LIVE.discard(self)

    def stop(self) -> None:
        """The same as :meth:`close` (the end of a ``with`` block)."""
        self.close()

    # ------------------------------------------------------------------ output
    def stdout_text(self) -> str:
        return _read(self.stdout_path)

    def stderr_text(self) -> str:
        return _read(self.stderr_path)

    def log_records(self) -> list[dict[str, Any]]:
        """Every stdout line that is a JSON object, parsed, in order (other lines skipped)."""
        records: list[dict[str, Any]] = []
        for line in self.stdout_text().splitlines():
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                records.append(value)
        return records

    def records(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        """The log records of ``event`` whose fields have the given values."""
        return [
            r
            for r in self.log_records()
            if r.get("event") == event and all(r.get(k) == v for k, v in fields.items())
        ]

    def wait_for_record(self, event: str, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        """The first such record, waiting up to ``timeout`` for it to be logged."""
        found = wait_until(
            lambda: self.records(event, **fields),
            timeout,
            f"log record {event!r} {fields} in\n{self.output_report()}",
        )
        return dict(found[0])

    def output_report(self, limit: int = 20_000) -> str:
        """stdout and stderr, each cut to its last ``limit`` characters, for error messages."""
        parts = []
        for name, text in (("stdout", self.stdout_text()), ("stderr", self.stderr_text())):
            if len(text) > limit:
                text = "[...]" + text[-limit:]
            parts.append(f"----- {name} -----\n{text}")
        return "\n".join(parts)

    def __repr__(self) -> str:
        return (
            f"<AuthsessionProcess public={self.public_port} internal={self.internal_port} "
            f"returncode={self.returncode}>"
        )

    def _require_started(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise AuthsessionProcessError("the process was not started")
        return self._proc


class AuthsessionFactory(Protocol):
    """Type of the ``authsession_process`` fixture (see tests/conftest.py)."""

    def __call__(
        self,
        env: Mapping[str, str],
        *,
        argv: Sequence[str] | None = None,
        max_open_files: int | None = None,
    ) -> AuthsessionProcess: ...


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""


# ---------------------------------------------------------------------- exit cleanup
_LIVE: ExitCleanup[AuthsessionProcess] = ExitCleanup(AuthsessionProcess.close)
