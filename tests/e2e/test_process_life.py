"""Process life of the real ``authsession`` console script (CONTRACT §2): configuration
errors, startup checks, listeners, stub warnings and graceful shutdown."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import Any

import httpx
import pytest

from tests.contract import SEND
from tests.support.fake_services import FakeMailService, FakeUserService
from tests.support.lifecycle import wait_until
from tests.support.net import LOOPBACK, free_port, port_accepts
from tests.support.process import AuthsessionFactory, AuthsessionProcess
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.e2e

P = "AUTHSESSION_"
RESOLVE = "/api/v1/users/resolve-by-email"
COMPONENTS = {
    "challenge_store",
    "session_store",
    "config_provider",
    "projection_publisher",
    "resend_throttle",
}
# Time for the interpreter to start and import everything before the first check; only
# used on top of the contract's own bound, for the wall-clock check of the whole process.
START_SLACK = 5.0

Record = dict[str, Any]


# --------------------------------------------------------------------------- helpers


def record_index(process: AuthsessionProcess, predicate: Callable[[Record], bool]) -> int:
    for index, record in enumerate(process.log_records()):
        if predicate(record):
            return index
    raise AssertionError(f"no such record in\n{process.output_report()}")


def timestamp(record: Record) -> datetime:
    return datetime.fromisoformat(str(record["timestamp"]).replace("Z", "+00:00"))


def assert_no_listener(process: AuthsessionProcess) -> None:
    assert not process.records("listener opened"), process.output_report()
    assert not port_accepts(process.public_port)
    assert not port_accepts(process.internal_port)


def assert_listeners_opened(process: AuthsessionProcess) -> None:
    for name, port in (("public", process.public_port), ("internal", process.internal_port)):
        record = process.wait_for_record("listener opened", listener=name)
        assert record["address"] == f"{LOOPBACK}:{port}", record
        assert record["level"] == "info"


def assert_listeners_stopped(process: AuthsessionProcess) -> None:
    for name in ("public", "internal"):
        assert process.records("listener stopped", listener=name), process.output_report()


def rest_env(users: FakeUserService, mail: FakeMailService, timeout: str = "5s") -> dict[str, str]:
    return {
        P + "USER_SERVICE_MODE": "rest",
        P + "USER_SERVICE_BASE_URL": users.base_url,
        P + "USER_SERVICE_REQUEST_TIMEOUT": timeout,
        P + "MAIL_SERVICE_MODE": "rest",
        P + "MAIL_SERVICE_BASE_URL": mail.base_url,
        P + "MAIL_SERVICE_REQUEST_TIMEOUT": timeout,
    }


# --------------------------------------------------------------------------- exit 2


@pytest.mark.parametrize(
    ("env", "names"),
    [
        pytest.param({P + "CHALLENGE_TTL": "10x"}, [P + "CHALLENGE_TTL"], id="bad-duration"),
        pytest.param(
            {P + "USER_SERVICE_MODE": "rest"},
            [P + "USER_SERVICE_BASE_URL", P + "USER_SERVICE_REQUEST_TIMEOUT"],
            id="rest-without-url-and-timeout",
        ),
        pytest.param(
            {
                P + "SESSION_TTL": "forever",
                P + "SIGNUP_ENABLED": "yes",
                P + "PUBLIC_RATE_LIMIT": "30/d",
                P + "MAIL_SERVICE_MODE": "rest",
                P + "REDIS_OPERATION_TIMEOUT": "1x",
            },
            [
                P + "SESSION_TTL",
                P + "SIGNUP_ENABLED",
                P + "PUBLIC_RATE_LIMIT",
                P + "MAIL_SERVICE_BASE_URL",
                P + "MAIL_SERVICE_REQUEST_TIMEOUT",
                P + "REDIS_OPERATION_TIMEOUT",
            ],
            id="several-at-once",
        ),
    ],
)
def test_invalid_configuration_exits_2_with_one_stderr_line(
    authsession_process: AuthsessionFactory, env: dict[str, str], names: list[str]
) -> None:
    # Redis is pointed at a port nobody listens on: the configuration is checked first.
    process = authsession_process({P + "REDIS_ADDR": f"{LOOPBACK}:{free_port()}", **env})
    assert process.wait_exit() == 2
    lines = [line for line in process.stderr_text().splitlines() if line.strip()]
    assert len(lines) == 1, process.output_report()
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert_no_listener(process)
    assert not process.records("startup check failed")


def test_bad_duration_line_says_why(authsession_process: AuthsessionFactory) -> None:
    process = authsession_process({P + "CHALLENGE_TTL": "10x"})
    assert process.wait_exit() == 2
    line = process.stderr_text().strip()
    assert "\n" not in line
    assert re.search(r"AUTHSESSION_CHALLENGE_TTL\W.*duration", line), line


def test_python_dash_m_is_the_same_entry_point(authsession_process: AuthsessionFactory) -> None:
    process = authsession_process(
        {P + "CHALLENGE_TTL": "10x"}, argv=[sys.executable, "-m", "authsession"]
    )
    assert process.wait_exit() == 2
    lines = process.stderr_text().strip().splitlines()
    assert len(lines) == 1
    assert P + "CHALLENGE_TTL" in lines[0]


# --------------------------------------------------------------------------- exit 1

CHECK_TIMEOUT = 0.5
BOUND = len(COMPONENTS) * CHECK_TIMEOUT + 1.0  # the sum of the PING bounds plus a second


def _assert_startup_check_failure(
    process: AuthsessionProcess, started: float, cause: re.Pattern[str]
) -> None:
    status = process.wait_exit(timeout=BOUND + START_SLACK + 10)
    elapsed = time.monotonic() - started
    assert status == 1, process.output_report()
    failures = [
        r for r in process.log_records() if r.get("level") == "error" and r.get("component")
    ]
    assert failures, process.output_report()
    failure = failures[0]
    assert failure["component"] in COMPONENTS, failure
    assert failure["component"] == "challenge_store", failure  # the first one checked
    assert isinstance(failure.get("cause"), str), failure
    assert cause.search(failure["cause"]), failure
    assert_no_listener(process)
    # From the first log line (configuration read, logging set up) to the failure, and
    # for the whole process including interpreter start.
    first = process.log_records()[0]
    assert (timestamp(failure) - timestamp(first)).total_seconds() <= BOUND, failure
    assert elapsed <= BOUND + START_SLACK, elapsed


def test_unreachable_redis_exits_1(authsession_process: AuthsessionFactory) -> None:
    started = time.monotonic()
    process = authsession_process(
        {
            P + "REDIS_ADDR": f"{LOOPBACK}:{free_port()}",
            P + "STARTUP_CHECK_TIMEOUT": "500ms",
            P + "REDIS_OPERATION_TIMEOUT": "300ms",
        }
    )
    _assert_startup_check_failure(
        process, started, re.compile(r"(?i)refused|connect|unreachable|error")
    )


@pytest.mark.parametrize("operation_timeout", ["300ms", "10s"])
def test_hung_redis_exits_1_within_the_bound(
    authsession_process: AuthsessionFactory, dedicated_redis: RedisServer, operation_timeout: str
) -> None:
    # With a 10s socket timeout only STARTUP_CHECK_TIMEOUT can keep startup within bound.
    dedicated_redis.pause()
    started = time.monotonic()
    process = authsession_process(
        {
            P + "REDIS_ADDR": dedicated_redis.addr,
            P + "STARTUP_CHECK_TIMEOUT": "500ms",
            P + "REDIS_OPERATION_TIMEOUT": operation_timeout,
        }
    )
    _assert_startup_check_failure(process, started, re.compile(r"(?i)time|within|answer"))


@pytest.mark.parametrize(
    "sig",
    [
        pytest.param(signal.SIGINT, id="SIGINT"),
        pytest.param(signal.SIGTERM, id="SIGTERM"),
    ],
)
def test_signal_during_startup_checks_exits_0(
    authsession_process: AuthsessionFactory, dedicated_redis: RedisServer, sig: signal.Signals
) -> None:
    # A hung Redis keeps the process in its startup checks for 30 s.
    dedicated_redis.pause()
    process = authsession_process(
        {
            P + "REDIS_ADDR": dedicated_redis.addr,
            P + "STARTUP_CHECK_TIMEOUT": "30s",
            P + "REDIS_OPERATION_TIMEOUT": "30s",
        }
    )
    # The stub warnings are logged while the core is built, right before the checks.
    wait_until(
        lambda: [r for r in process.log_records() if r.get("component") == "mail_service"],
        15,
        "the core to be built",
    )
    process.send_signal(sig)
    assert process.wait_exit(timeout=10) == 0, process.output_report()
    assert_no_listener(process)
    assert process.records("resources closed"), process.output_report()


# --------------------------------------------------------------------------- serving


def test_both_listeners_open_and_stub_modes_warn(
    authsession_process: AuthsessionFactory, redis_server: RedisServer
) -> None:
    process = authsession_process({P + "REDIS_ADDR": redis_server.addr}).wait_ready()
    assert_listeners_opened(process)
    warnings = [r for r in process.log_records() if r.get("level") == "warning"]
    for component in ("user_service", "mail_service"):
        stub = [w for w in warnings if w.get("component") == component]
        assert stub, process.output_report()
        assert re.search(r"(?i)stub", stub[0]["event"]), stub[0]
        assert re.search(r"(?i)development|testing", stub[0]["event"]), stub[0]
    # No token configured: the internal listener's trust is announced too.
    assert any("INTERNAL_API_TOKEN" in w["event"] for w in warnings), warnings

    with (
        httpx.Client(base_url=process.public_url, timeout=10) as public,
        httpx.Client(base_url=process.internal_url, timeout=10) as internal,
    ):
        sent = public.post(SEND, json={"email": "life@example.com"})
        assert sent.status_code == 200, sent.text
        listed = internal.get("/api/v1/internal/users/nobody/sessions")
        assert listed.status_code == 200, listed.text
        assert listed.json() == {"user_id": "nobody", "sessions": []}

    process.terminate()
    assert process.wait_exit() == 0
    assert_listeners_stopped(process)
    assert process.records("shutting down", signal="SIGTERM")


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("taken", ["public", "internal"])
def test_a_port_already_taken_exits_1_and_names_the_listener(
    authsession_process: AuthsessionFactory, redis_server: RedisServer, taken: str, workers: str
) -> None:
    with socket.create_server((LOOPBACK, 0)) as holder:
        port = holder.getsockname()[1]
        variable = P + ("PUBLIC_HTTP_ADDR" if taken == "public" else "INTERNAL_HTTP_ADDR")
        process = authsession_process(
            {
                P + "REDIS_ADDR": redis_server.addr,
                P + "WORKERS": workers,
                variable: f"{LOOPBACK}:{port}",
            }
        )
        assert process.wait_exit() == 1, process.output_report()
    failed = process.records("cannot open listener", listener=taken)
    assert failed, process.output_report()
    assert failed[0]["address"] == f"{LOOPBACK}:{port}"
    assert "in use" in failed[0]["cause"].lower()
    # The other port was bound first or not at all; either way it is free again.
    other = process.public_port if taken == "internal" else process.internal_port
    assert not port_accepts(other)


def test_memory_store_mode_serves(authsession_process: AuthsessionFactory) -> None:
    process = authsession_process({P + "REDIS_ADDR": "memory://"}).wait_ready()
    assert_listeners_opened(process)
    memory_warnings = [
        r
        for r in process.log_records()
        if r.get("level") == "warning" and "memory://" in str(r.get("event"))
    ]
    assert memory_warnings, process.output_report()
    with (
        httpx.Client(base_url=process.public_url, timeout=10) as public,
        httpx.Client(base_url=process.internal_url, timeout=10) as internal,
    ):
        sent = public.post(SEND, json={"email": "memory@example.com"})
        assert sent.status_code == 200, sent.text
        unknown = public.post(
            "/api/v1/public/auth/confirm",
            json={"challenge_id": "Abcdefghijklmnop_-0123", "code": "123456"},
        )
        assert unknown.status_code == 404, unknown.text
        assert unknown.json()["error"]["code"] == "challenge_not_found"
        listed = internal.get("/api/v1/internal/users/nobody/sessions")
        assert listed.status_code == 200, listed.text
    process.terminate()
    assert process.wait_exit() == 0
    assert_listeners_stopped(process)


def test_sigint_exits_0(authsession_process: AuthsessionFactory, redis_server: RedisServer) -> None:
    process = authsession_process({P + "REDIS_ADDR": redis_server.addr}).wait_ready()
    assert_listeners_opened(process)
    process.send_signal(signal.SIGINT)
    assert process.wait_exit() == 0, process.output_report()
    assert_listeners_stopped(process)
    assert process.records("shutting down", signal="SIGINT")
    assert not process.stderr_text().strip(), process.stderr_text()


# --------------------------------------------------------------------------- drain

SLOW = 3.0  # the fake user service's answer delay


def _start_slow_request(
    pool: ThreadPoolExecutor, client: httpx.Client, users: FakeUserService, email: str
) -> Future[httpx.Response]:
    future = pool.submit(client.post, SEND, json={"email": email})
    wait_until(lambda: users.requests_to(RESOLVE), 10, "the user service to see the request")
    assert not future.done()
    return future


def test_sigterm_lets_the_in_flight_request_finish(
    authsession_process: AuthsessionFactory,
    redis_server: RedisServer,
    fake_user_service: FakeUserService,
    fake_mail_service: FakeMailService,
) -> None:
    fake_user_service.delay(SLOW)
    process = authsession_process(
        {P + "REDIS_ADDR": redis_server.addr, **rest_env(fake_user_service, fake_mail_service)}
    ).wait_ready()
    assert_listeners_opened(process)
    email = "slow@example.com"

    with (
        ThreadPoolExecutor(1) as pool,
        httpx.Client(base_url=process.public_url, timeout=30) as client,
    ):
        future = _start_slow_request(pool, client, fake_user_service, email)
        process.terminate()
        # Both listeners stop accepting while the request is still being served.
        wait_until(
            lambda: (
                not port_accepts(process.public_port) and not port_accepts(process.internal_port)
            ),
            SLOW,
            "both listeners to refuse new connections",
        )
        assert not future.done(), "the listeners closed only after the drain"
        assert process.is_running()
        response = future.result(timeout=30)

    assert response.status_code == 200, response.text
    assert set(response.json()) == {"challenge_id", "expires_at"}
    # The request ran to its end: the mail went out after the signal.
    assert [m.challenge_id for m in fake_mail_service.messages_for(email)] == [
        response.json()["challenge_id"]
    ]
    assert process.wait_exit() == 0, process.output_report()
    assert_listeners_stopped(process)
    served = record_index(process, lambda r: r.get("event") == "request" and r.get("route") == SEND)
    signalled = record_index(process, lambda r: r.get("event") == "shutting down")
    stopped = [
        record_index(
            process, lambda r, n=n: r.get("event") == "listener stopped" and r.get("listener") == n
        )
        for n in ("public", "internal")
    ]
    assert signalled < served < min(stopped), process.output_report()
    assert process.records("request", route=SEND)[0]["status"] == 200


def test_second_signal_cuts_the_drain_short(
    authsession_process: AuthsessionFactory,
    redis_server: RedisServer,
    fake_user_service: FakeUserService,
    fake_mail_service: FakeMailService,
) -> None:
    # The user service would answer after 30 s and the drain may take 60 s: only the
    # second signal can make the process exit within the 10 s waited for below.
    fake_user_service.delay(30)
    process = authsession_process(
        {
            P + "REDIS_ADDR": redis_server.addr,
            P + "SHUTDOWN_TIMEOUT": "60s",
            **rest_env(fake_user_service, fake_mail_service, timeout="60s"),
        }
    ).wait_ready()
    assert_listeners_opened(process)
    with (
        ThreadPoolExecutor(1) as pool,
        httpx.Client(base_url=process.public_url, timeout=30) as client,
    ):
        future = _start_slow_request(pool, client, fake_user_service, "stuck@example.com")
        process.terminate()
        process.wait_for_record("shutting down")
        wait_until(lambda: not port_accepts(process.public_port), 5, "the public listener to close")
        assert process.is_running(), "the first signal alone must wait for the request"
        process.terminate()
        assert process.wait_exit(timeout=10) == 0, process.output_report()
        # The client is not left hanging either: it gets an answer or a closed connection.
        with contextlib.suppress(httpx.HTTPError):
            future.result(timeout=10)
    assert_listeners_stopped(process)
    assert not fake_mail_service.messages
