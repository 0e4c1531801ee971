"""The ``authsession`` command line (CONTRACT §12, §2): --help, --version, usage errors,
``check``, the message without the server extra, and the resolved-config line."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import redis

from authsession import __version__
from authsession.cli import build_parser, main
from authsession.domain.codes import new_session_id
from tests.support.net import LOOPBACK
from tests.support.process import AuthsessionFactory, authsession_script, base_env
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.e2e

COMPONENTS = [
    "challenge_store",
    "session_store",
    "config_provider",
    "projection_publisher",
    "resend_throttle",
]


@pytest.fixture
def trap() -> Iterator[socket.socket]:
    """A listening socket standing in for Redis: nothing may connect to it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    sock.listen(16)
    sock.setblocking(False)
    yield sock
    sock.close()


def assert_untouched(trap: socket.socket) -> None:
    try:
        conn, _ = trap.accept()
    except BlockingIOError:
        return
    conn.close()
    raise AssertionError("something connected to the stand-in Redis")


def run_script(
    *args: str, env: dict[str, str] | None = None, timeout: float = 20.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(authsession_script()), *args],
        env={**base_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# --------------------------------------------------------------------------- no service


@pytest.mark.parametrize(
    ("args", "status", "stream", "expected"),
    [
        (["--help"], 0, "stdout", r"usage: authsession .*check.*projection"),
        (["-h"], 0, "stdout", r"exit status:"),
        (["--version"], 0, "stdout", rf"^authsession {re.escape(__version__)}$"),
        (["--bogus"], 2, "stderr", r"unrecognized arguments: --bogus"),
        (["frobnicate"], 2, "stderr", r"invalid choice: 'frobnicate'"),
        (["check", "--now"], 2, "stderr", r"unrecognized arguments: --now"),
        (["projection"], 2, "stderr", r"required: ACTION"),
        (["projection", "fix"], 2, "stderr", r"invalid choice: 'fix'"),
        (["projection", "check", "--help"], 0, "stdout", r"usage: authsession projection check"),
        (["projection", "repair", "-h"], 0, "stdout", r"usage: authsession projection repair"),
    ],
)
def test_help_version_and_usage_errors_answer_without_connecting(
    trap: socket.socket, args: list[str], status: int, stream: str, expected: str
) -> None:
    redis_addr = "{}:{}".format(*trap.getsockname())
    result = run_script(*args, env={"AUTHSESSION_REDIS_ADDR": redis_addr})

    assert result.returncode == status, result
    assert re.search(expected, getattr(result, stream).strip(), re.MULTILINE | re.DOTALL)
    assert '"event"' not in result.stdout + result.stderr  # no log line: nothing started
    assert_untouched(trap)


def test_the_projection_commands_parse_into_check_and_repair() -> None:
    parser = build_parser()
    assert parser.parse_args(["projection", "check"]).action == "check"
    assert parser.parse_args(["projection", "repair"]).action == "repair"
    assert parser.parse_args([]).command is None  # serve


def test_a_configuration_error_is_exit_2_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AUTHSESSION_SESSION_TTL", "soon")
    monkeypatch.setenv("AUTHSESSION_REDIS_DB", "-1")

    assert main(["check"]) == 2

    out, err = capsys.readouterr()
    assert out == ""
    (line,) = err.splitlines()
    assert line.startswith("authsession: invalid configuration: ")
    assert "AUTHSESSION_SESSION_TTL" in line
    assert "AUTHSESSION_REDIS_DB" in line


BLOCK_SERVER_EXTRA = """
import sys
for name in ("fastapi", "uvicorn", "pydantic", "pydantic_settings", "httpx", "uvloop"):
    sys.modules[name] = None  # what a base install without the server extra lacks
from authsession.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("args", [[], ["check"], ["projection", "check"]])
def test_without_the_server_extra_the_command_says_so_in_one_line_and_exits_2(
    trap: socket.socket, args: list[str]
) -> None:
    redis_addr = "{}:{}".format(*trap.getsockname())
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_SERVER_EXTRA, *args],
        env={**base_env(), "AUTHSESSION_REDIS_ADDR": redis_addr},
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )

    assert result.returncode == 2, result
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert "pip install 'authsession[server]'" in line
    assert "Traceback" not in result.stderr
    assert_untouched(trap)


def test_help_and_version_work_without_the_server_extra() -> None:
    for args, expected in ((["--version"], f"authsession {__version__}"), (["--help"], "usage")):
        result = subprocess.run(
            [sys.executable, "-c", BLOCK_SERVER_EXTRA, *args],
            env=base_env(),
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert result.returncode == 0, result
        assert expected in result.stdout


# --------------------------------------------------------------------------- check


def test_check_prints_one_ok_line_per_component_and_opens_no_listener(
    redis_server: RedisServer, trap: socket.socket
) -> None:
    # The listener addresses point at a port this test holds: binding it would fail.
    held = "{}:{}".format(*trap.getsockname())
    result = run_script(
        "check",
        env={
            "AUTHSESSION_REDIS_ADDR": redis_server.addr,
            "AUTHSESSION_REDIS_KEY_PREFIX": "cli-check:",
            "AUTHSESSION_PUBLIC_HTTP_ADDR": held,
            "AUTHSESSION_INTERNAL_HTTP_ADDR": f"{LOOPBACK}:0",
        },
    )

    assert result.returncode == 0, result
    assert result.stdout.splitlines() == [f"{name}: ok" for name in COMPONENTS]
    assert "listener opened" not in result.stderr
    assert '"event": "resolved config"' in result.stderr  # logs go to stderr


def test_check_against_a_dead_redis_names_the_component_and_exits_1(
    dedicated_redis: RedisServer,
) -> None:
    addr = dedicated_redis.addr
    dedicated_redis.kill()

    result = run_script("check", env={"AUTHSESSION_REDIS_ADDR": addr})

    assert result.returncode == 1, result
    first, *rest = result.stdout.splitlines()
    assert first.startswith("challenge_store: failed: ConnectionError: ")
    assert rest == [f"{name}: not checked (an earlier check failed)" for name in COMPONENTS[1:]]


def test_check_against_a_hung_redis_reports_the_read_timeout_after_the_operation_timeout(
    dedicated_redis: RedisServer,
) -> None:
    # What RUNBOOK §3 documents: a Redis that accepts connections but does not answer
    # fails the first check after AUTHSESSION_REDIS_OPERATION_TIMEOUT (the socket
    # timeout), before AUTHSESSION_STARTUP_CHECK_TIMEOUT.
    dedicated_redis.pause()
    try:
        started = time.monotonic()
        result = run_script(
            "check",
            env={
                "AUTHSESSION_REDIS_ADDR": dedicated_redis.addr,
                "AUTHSESSION_REDIS_OPERATION_TIMEOUT": "300ms",
                "AUTHSESSION_STARTUP_CHECK_TIMEOUT": "5s",
            },
        )
        elapsed = time.monotonic() - started
    finally:
        dedicated_redis.resume()

    assert result.returncode == 1, result
    first = result.stdout.splitlines()[0]
    assert first == (
        f"challenge_store: failed: TimeoutError: Timeout reading from {dedicated_redis.addr}"
    )
    assert elapsed < 5.0  # the operation timeout, not the startup-check bound


# --------------------------------------------------------------------------- serve


def test_serving_logs_the_resolved_config_without_secrets_and_one_started_line(
    authsession_process: AuthsessionFactory,
) -> None:
    password = "rds-pw-4f1c9e07b2"
    token = "int-tok-9d27aa61c3"
    with RedisServer(extra_args=["--requirepass", password]) as redis:
        process = authsession_process(
            {
                "AUTHSESSION_REDIS_ADDR": f"redis://default:{password}@{redis.addr}/3",
                "AUTHSESSION_REDIS_KEY_PREFIX": "ops-test:",
                "AUTHSESSION_GATEWAY_SESSION_KEY_PREFIX": "gw-test:session:",
                "AUTHSESSION_GATEWAY_SESSION_EVENTS_STREAM": "gw-test:events",
                "AUTHSESSION_INTERNAL_API_TOKEN": token,
            }
        )
        process.wait_ready()
        process.send_signal(signal.SIGTERM)
        assert process.wait_exit() == 0

    output = process.stdout_text() + process.stderr_text()
    assert password not in output
    assert token not in output
    records = process.log_records()
    (resolved,) = [r for r in records if r["event"] == "resolved config"]
    assert resolved["version"] == __version__
    assert resolved["redis_addr"] == f"redis://{redis.addr}/3"
    assert resolved["redis_mode"] == "standalone"
    assert resolved["redis_db"] == 3  # the URL's database wins over AUTHSESSION_REDIS_DB
    assert resolved["redis_key_prefix"] == "ops-test:"
    assert resolved["gateway_session_key_prefix"] == "gw-test:session:"
    assert resolved["gateway_session_events_stream"] == "gw-test:events"
    assert resolved["public_http_addr"] == f"{LOOPBACK}:{process.public_port}"
    assert resolved["internal_http_addr"] == f"{LOOPBACK}:{process.internal_port}"
    assert resolved["user_service_mode"] == "stub"
    assert resolved["mail_service_base_url"] is None
    assert resolved["workers"] == 1
    assert not [k for k in resolved if "password" in k or "token" in k]
    # After the startup checks, before the listeners.
    events = [r["event"] for r in records]
    assert events.index("resolved config") < events.index("listener opened")
    for lifecycle in ("Started server process", "Finished server process"):
        assert len([e for e in events if e.startswith(lifecycle)]) == 1, events


# --------------------------------------------------------------------------- projection
def test_projection_check_finds_drift_repair_fixes_it_and_check_passes_again(
    dedicated_redis: RedisServer,
) -> None:
    # A snapshot that still says active while its source record is gone (a lost write).
    sid = new_session_id("usr-cli")
    snapshot = {
        "device_session_id": sid,
        "user_id": "usr-cli",
        "status": "active",
        "token_sha256": "0" * 64,
        "created_at": "2026-01-01T00:00:00.000Z",
        "expires_at": "2099-01-01T00:00:00.000Z",
        "revoked_at": None,
        "revoke_reason": None,
        "version": 1,
        "published_at": "2026-01-01T00:00:00.000Z",
    }
    client = redis.Redis(
        host=dedicated_redis.host, port=dedicated_redis.port, decode_responses=True
    )
    client.set(f"gateway:session:{sid}", json.dumps(snapshot), ex=3600)
    env = {"AUTHSESSION_REDIS_ADDR": dedicated_redis.addr}

    found = run_script("projection", "check", env=env)
    assert found.returncode == 1, found
    assert "orphan 1" in found.stdout.splitlines()
    assert "drift 1" in found.stdout.splitlines()
    assert json.loads(client.get(f"gateway:session:{sid}"))["status"] == "active"

    repaired = run_script("projection", "repair", env=env)
    assert repaired.returncode == 0, repaired
    assert "repaired 1" in repaired.stdout.splitlines()
    held = json.loads(client.get(f"gateway:session:{sid}"))
    assert (held["status"], held["revoke_reason"]) == ("revoked", "source_lost")

    clean = run_script("projection", "check", env=env)
    assert clean.returncode == 0, clean
    assert "drift 0" in clean.stdout.splitlines()
    client.close()
