"""The example gateways run by uvicorn as child processes, and logins through the real
``authsession`` process, for the gateway's end-to-end tests and the benchmark."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.contract import CONFIRM, SEND
from tests.support.net import LOOPBACK, free_port, port_accepts
from tests.support.process import AuthsessionFactory, AuthsessionProcess, base_env

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
STUB_MAIL_EVENT = "stub mail: login code"
INTERNAL = "/api/v1/internal"


class GatewayProcess:
    """``uvicorn <module>:app`` from ``examples/`` on a free loopback port."""

    def __init__(self, module: str, env: Mapping[str, str], workdir: Path) -> None:
        self.module = module
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{module}-{self.port}.log"
        argv = [
            sys.executable,
            "-m",
            "uvicorn",
            f"{module}:app",
            "--app-dir",
            str(EXAMPLES),
            "--host",
            LOOPBACK,
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            "--no-access-log",
        ]
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                argv,
                env={**base_env(), **env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def wait_ready(self, timeout: float = 15.0) -> GatewayProcess:
        deadline = time.monotonic() + timeout
        while not port_accepts(self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"gateway {self.module} did not start:\n{self.output()}")
            time.sleep(0.05)
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait()


@dataclass
class Service:
    """The real authsession process, its key names, and HTTP clients on both listeners."""

    process: AuthsessionProcess
    snapshot_prefix: str
    stream: str
    redis_url: str
    public: httpx.Client
    internal: httpx.Client
    codes_seen: dict[str, str] = field(default_factory=dict)

    def close(self) -> None:
        self.public.close()
        self.internal.close()

    def gateway_env(self) -> dict[str, str]:
        return {
            "REDIS_URL": self.redis_url,
            "GATEWAY_SESSION_KEY_PREFIX": self.snapshot_prefix,
            "GATEWAY_SESSION_EVENTS_STREAM": self.stream,
        }

    def code_for(self, challenge_id: str, timeout: float = 5.0) -> str:
        """The login code, from the stub mail service's log line."""
        deadline = time.monotonic() + timeout
        while challenge_id not in self.codes_seen:
            for record in self.process.log_records():
                if record.get("event") == STUB_MAIL_EVENT and "challenge_id" in record:
                    self.codes_seen[record["challenge_id"]] = record["code"]
            if challenge_id in self.codes_seen:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"no login code\n{self.process.output_report()}")
            time.sleep(0.02)
        return self.codes_seen[challenge_id]

    def login(self, email: str) -> dict[str, Any]:
        """send-email-code + confirm: the confirm body (token, ids, expires_at)."""
        sent = self.public.post(SEND, json={"email": email})
        assert sent.status_code == 200, sent.text
        challenge_id = sent.json()["challenge_id"]
        confirmed = self.public.post(
            CONFIRM, json={"challenge_id": challenge_id, "code": self.code_for(challenge_id)}
        )
        assert confirmed.status_code == 200, confirmed.text
        body: dict[str, Any] = confirmed.json()
        return body

    def internal_post(self, path: str, body: Any = None, *, until_ok: float = 0.0) -> Any:
        """POST to the internal API (retrying for up to ``until_ok`` s while it is 503)."""
        deadline = time.monotonic() + until_ok
        while True:
            response = self.internal.post(f"{INTERNAL}{path}", json=body)
            if response.status_code == 200 or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        assert response.status_code == 200, response.text
        return response.json()


def start_service(authsession_process: AuthsessionFactory, redis_addr: str, **env: str) -> Service:
    """A ready authsession process with stub services and fresh key names."""
    tag = secrets.token_hex(4)
    snapshot_prefix = f"gw-{tag}:session:"
    stream = f"gw-{tag}:session_events"
    process = authsession_process(
        {
            "AUTHSESSION_REDIS_ADDR": redis_addr,
            "AUTHSESSION_REDIS_KEY_PREFIX": f"e2e-gw-{tag}:",
            "AUTHSESSION_GATEWAY_SESSION_KEY_PREFIX": snapshot_prefix,
            "AUTHSESSION_GATEWAY_SESSION_EVENTS_STREAM": stream,
            "AUTHSESSION_USER_SERVICE_MODE": "stub",
            "AUTHSESSION_MAIL_SERVICE_MODE": "stub",
            "AUTHSESSION_RESEND_COOLDOWN": "1ms",
            **{f"AUTHSESSION_{k}": v for k, v in env.items()},
        }
    ).wait_ready()
    return Service(
        process,
        snapshot_prefix,
        stream,
        f"redis://{redis_addr}/0",
        httpx.Client(base_url=process.public_url, timeout=10),
        httpx.Client(base_url=process.internal_url, timeout=10),
    )


def email(label: str) -> str:
    return f"{re.sub(r'[^a-z0-9]', '', label.lower())}-{secrets.token_hex(3)}@example.com"
