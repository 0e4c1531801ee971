"""End to end: the running process when its Redis dies, hangs and comes back.

CONTRACT §4: a Redis failure is ``503 service_unavailable``, never a 500 and never a
hang past the configured timeouts; the service recovers by itself when Redis returns.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.contract import CONFIRM, INTERNAL, SEND, error_code
from tests.support.process import AuthsessionFactory, AuthsessionProcess
from tests.support.redis_server import RedisServer

pytestmark = [pytest.mark.e2e]

OPERATION_TIMEOUT = 0.3  # seconds, AUTHSESSION_REDIS_OPERATION_TIMEOUT below
# One operation timeout per Redis call on the path, plus process and client slack.
BOUND = 2.5


@pytest.fixture
def service(
    authsession_process: AuthsessionFactory, dedicated_redis: RedisServer
) -> Iterator[tuple[AuthsessionProcess, RedisServer]]:
    process = authsession_process(
        {
            "AUTHSESSION_REDIS_ADDR": dedicated_redis.addr,
            "AUTHSESSION_REDIS_OPERATION_TIMEOUT": f"{int(OPERATION_TIMEOUT * 1000)}ms",
            "AUTHSESSION_PUBLIC_RATE_LIMIT": "1000/m",  # the limiter must fail open
            "AUTHSESSION_RESEND_COOLDOWN": "1ms",
        }
    )
    process.wait_ready()
    yield process, dedicated_redis
    if dedicated_redis.paused:
        dedicated_redis.resume()


def code_for(process: AuthsessionProcess, challenge_id: str) -> str:
    for record in process.log_records():
        if record.get("challenge_id") == challenge_id and "code" in record:
            return str(record["code"])
    raise AssertionError(f"no code logged for {challenge_id}")


def every_operation(process: AuthsessionProcess) -> list[tuple[str, httpx.Response, float]]:
    """One request of each kind; each with its answer and how long it took."""
    answers = []
    requests = [
        ("send", process.public_url, "POST", SEND, {"email": "jane@example.com"}),
        (
            "confirm",
            process.public_url,
            "POST",
            CONFIRM,
            {"challenge_id": "A" * 32, "code": "123456"},
        ),
        ("list", process.internal_url, "GET", f"{INTERNAL}/users/usr_1/sessions", None),
        ("read", process.internal_url, "GET", f"{INTERNAL}/sessions/{'B' * 32}", None),
        ("revoke", process.internal_url, "POST", f"{INTERNAL}/sessions/{'B' * 32}/revoke", {}),
        ("extend", process.internal_url, "POST", f"{INTERNAL}/sessions/{'B' * 32}/extend", {}),
    ]
    for name, base, method, path, body in requests:
        started = time.monotonic()
        response = httpx.request(method, base + path, json=body, timeout=30)
        answers.append((name, response, time.monotonic() - started))
    return answers


def login(process: AuthsessionProcess, email: str) -> httpx.Response:
    sent = httpx.post(process.public_url + SEND, json={"email": email}, timeout=10)
    assert sent.status_code == 200, sent.text
    challenge_id = sent.json()["challenge_id"]
    return httpx.post(
        process.public_url + CONFIRM,
        json={"challenge_id": challenge_id, "code": code_for(process, challenge_id)},
        timeout=10,
    )


def test_a_dead_redis_is_503_everywhere_and_the_service_recovers_when_it_returns(
    service: tuple[AuthsessionProcess, RedisServer],
) -> None:
    process, redis_server = service
    assert login(process, "before@example.com").status_code == 200

    redis_server.kill()
    for name, response, elapsed in every_operation(process):
        assert response.status_code == 503, (name, response.text)
        assert error_code(response) == "service_unavailable"
        assert response.headers["cache-control"] == "no-store"
        assert elapsed < BOUND, (name, elapsed)

    redis_server.restart()  # same port, empty
    # The pool's connections died with the old server; the one retry on a broken
    # connection reconnects, so the very first requests succeed again.
    assert login(process, "after@example.com").status_code == 200
    assert process.is_running()


def test_a_hung_redis_is_503_within_the_operation_timeout_then_serves_again(
    service: tuple[AuthsessionProcess, RedisServer],
) -> None:
    process, redis_server = service
    redis_server.pause()
    for name, response, elapsed in every_operation(process):
        assert response.status_code == 503, (name, response.text)
        assert error_code(response) == "service_unavailable"
        assert elapsed < BOUND, (name, elapsed)
    redis_server.resume()
    assert login(process, "resumed@example.com").status_code == 200


def test_no_500_and_no_traceback_in_the_answers_while_redis_is_down(
    service: tuple[AuthsessionProcess, RedisServer],
) -> None:
    process, redis_server = service
    redis_server.kill()
    for _, response, _ in every_operation(process):
        assert response.status_code != 500
        assert "Traceback" not in response.text
    failures = [r for r in process.log_records() if r.get("event") == "dependency unavailable"]
    assert failures
    assert {r["dependency"] for r in failures} <= {"redis", "projection"}


def test_a_call_to_a_hung_redis_is_not_retried_past_its_timeout(
    authsession_process: AuthsessionFactory, dedicated_redis: RedisServer
) -> None:
    # Reading one session is one Redis call: with a 1 s operation timeout it must answer
    # after about 1 s. A retried timeout would take 2 s.
    process = authsession_process(
        {
            "AUTHSESSION_REDIS_ADDR": dedicated_redis.addr,
            "AUTHSESSION_REDIS_OPERATION_TIMEOUT": "1s",
        }
    )
    process.wait_ready()
    dedicated_redis.pause()
    try:
        started = time.monotonic()
        response = httpx.get(f"{process.internal_url}{INTERNAL}/sessions/{'C' * 32}", timeout=30)
        elapsed = time.monotonic() - started
    finally:
        dedicated_redis.resume()
    assert response.status_code == 503
    assert 0.9 < elapsed < 1.8, elapsed
