"""The login flow against the real ``authsession`` process (stub user and mail services,
a real redis-server): a full login with the code read from the stub-mail log line, what
the logs must never contain, 20 concurrent confirms over HTTP, and a change of the
``<prefix>config`` hash applied without a restart.

Each test runs its own process with its own key prefixes, on the session's redis-server.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import httpx
import pytest
import redis

from tests.contract import CONFIRM, SEND, index_key, session_key
from tests.support.process import AuthsessionFactory, AuthsessionProcess
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.e2e

STUB_MAIL_EVENT = "stub mail: login code"


@dataclass
class Service:
    process: AuthsessionProcess
    redis: redis.Redis
    prefix: str
    snapshot_prefix: str
    stream: str
    public: httpx.Client
    internal: httpx.Client

    def code_for(self, challenge_id: str, timeout: float = 5.0) -> str:
        """The code of a challenge, from the stub mail service's log line."""
        deadline = time.monotonic() + timeout
        while True:
            for record in self.process.log_records():
                if (
                    record.get("event") == STUB_MAIL_EVENT
                    and record.get("challenge_id") == challenge_id
                ):
                    code = record["code"]
                    assert isinstance(code, str)
                    assert re.fullmatch(r"[0-9]{6}", code)
                    return code
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"no stub mail line for {challenge_id}\n{self.process.output_report()}"
                )
            time.sleep(0.05)

    def send(self, email: str) -> dict[str, Any]:
        response = self.public.post(SEND, json={"email": email})
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def confirm(self, challenge_id: str, code: str) -> httpx.Response:
        return self.public.post(CONFIRM, json={"challenge_id": challenge_id, "code": code})


@pytest.fixture
def start(authsession_process: AuthsessionFactory, redis_server: RedisServer) -> Iterator[Any]:
    """Factory: a ready process with stub services and fresh key prefixes."""
    opened: list[Any] = []

    def factory(**env: str) -> Service:
        tag = secrets.token_hex(4)
        prefix = f"e2e-login-{tag}:"
        snapshot_prefix = f"gw-{tag}:session:"
        stream = f"gw-{tag}:session_events"
        process = authsession_process(
            {
                "AUTHSESSION_REDIS_ADDR": redis_server.addr,
                "AUTHSESSION_REDIS_KEY_PREFIX": prefix,
                "AUTHSESSION_GATEWAY_SESSION_KEY_PREFIX": snapshot_prefix,
                "AUTHSESSION_GATEWAY_SESSION_EVENTS_STREAM": stream,
                "AUTHSESSION_USER_SERVICE_MODE": "stub",
                "AUTHSESSION_MAIL_SERVICE_MODE": "stub",
                **{f"AUTHSESSION_{k}": v for k, v in env.items()},
            }
        ).wait_ready()
        client = redis_server.client()
        public = httpx.Client(base_url=process.public_url, timeout=10)
        internal = httpx.Client(base_url=process.internal_url, timeout=10)
        opened.extend([client, public, internal])
        return Service(process, client, prefix, snapshot_prefix, stream, public, internal)

    yield factory
    for resource in opened:
        resource.close()


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def parse_ts(text: str) -> datetime:
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# --------------------------------------------------------------------------- full login
def test_full_login_against_the_process(start: Any) -> None:
    service: Service = start()

    issued = service.send("  Jane.E2E@Example.COM ")
    code = service.code_for(issued["challenge_id"])
    response = service.confirm(issued["challenge_id"], code)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["created"] is True
    dsid, token = body["device_session_id"], body["session_token"]
    assert token.rpartition(".")[0] == dsid
    assert len(token.rpartition(".")[2]) >= 43
    assert parse_ts(body["expires_at"]) > datetime.now(UTC) + timedelta(hours=719)

    # The source of truth and the projection.
    record = service.redis.hgetall(session_key(dsid, service.prefix))
    assert record["status"] == "active"
    assert record["user_id"] == body["user_id"]
    assert record["token_sha256"] == sha256_hex(token)
    assert record["client_ip"] == "127.0.0.1"
    challenge = service.redis.hgetall(f"{service.prefix}challenge:{issued['challenge_id']}")
    assert challenge["status"] == "confirmed_pending_expire"
    assert challenge["email_hash"] == sha256_hex("jane.e2e@example.com")
    snapshot = json.loads(str(service.redis.get(service.snapshot_prefix + dsid)))
    assert snapshot["status"] == "active"
    assert snapshot["token_sha256"] == sha256_hex(token)
    events = cast(Any, service.redis.xrange(service.stream))
    assert [(e["device_session_id"], e["version"]) for _, e in events] == [(dsid, "1")]

    # The internal API sees it; an identical retry is the same session.
    listed = service.internal.get(f"/api/v1/internal/users/{body['user_id']}/sessions")
    assert [s["device_session_id"] for s in listed.json()["sessions"]] == [dsid]
    replay = service.confirm(issued["challenge_id"], code)
    assert replay.status_code == 200
    assert replay.json()["created"] is False
    assert replay.json()["session_token"] == token
    # The snapshot is current: the replay appends no second event (CONTRACT §12/§9).
    assert service.redis.xlen(service.stream) == 1


def test_a_frontend_logs_its_session_out(start: Any) -> None:
    service: Service = start(SEND_EMAIL_CODE_MIN_DURATION="150ms")
    started = time.monotonic()
    issued = service.send("logout.e2e@example.com")
    assert time.monotonic() - started >= 0.15  # the timing floor holds in the process too
    code = service.code_for(issued["challenge_id"])
    token = service.confirm(issued["challenge_id"], code).json()["session_token"]
    dsid = token.rpartition(".")[0]

    wrong = service.public.post(
        "/api/v1/public/auth/logout", headers={"Authorization": f"Bearer {dsid}.nope"}
    )
    assert wrong.status_code == 401
    out = service.public.post(
        "/api/v1/public/auth/logout", headers={"Authorization": f"Bearer {token}"}
    )
    assert out.status_code == 200, out.text
    assert out.json() == {"device_session_id": dsid, "status": "revoked"}
    session = service.internal.get(f"/api/v1/internal/sessions/{dsid}").json()
    assert (session["status"], session["revoke_reason"]) == ("revoked", "logout")
    snapshot = json.loads(str(service.redis.get(service.snapshot_prefix + dsid)))
    assert snapshot["status"] == "revoked"


def test_logs_never_carry_the_token_the_address_or_the_code(start: Any) -> None:
    service: Service = start()
    raw_email = "Quentin.Logcheck@Example.com"
    normalized = raw_email.lower()

    issued = service.send(raw_email)
    service.send(raw_email)  # throttled
    code = service.code_for(issued["challenge_id"])
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    assert service.confirm(issued["challenge_id"], wrong).status_code == 400
    confirmed = service.confirm(issued["challenge_id"], code)
    assert confirmed.status_code == 200
    token = confirmed.json()["session_token"]
    secret = token.rpartition(".")[2]
    assert service.confirm(issued["challenge_id"], code).status_code == 200  # replay
    dsid = confirmed.json()["device_session_id"]
    assert service.internal.post(f"/api/v1/internal/sessions/{dsid}/revoke").status_code == 200
    time.sleep(0.2)  # let the last lines reach the file

    lines = [
        *service.process.stdout_text().splitlines(),
        *service.process.stderr_text().splitlines(),
    ]
    assert len(lines) > 5
    standalone_code = re.compile(rf"(?<![0-9]){code}(?![0-9])")
    stub_lines = 0
    for line in lines:
        assert secret not in line, line
        assert token not in line, line
        assert normalized not in line.lower(), line
        assert "quentin.logcheck" not in line.lower(), line
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and record.get("event") == STUB_MAIL_EVENT:
            stub_lines += 1
            assert record["email"] == "q***@example.com"
            continue
        assert not standalone_code.search(line), line
    assert stub_lines == 1


# --------------------------------------------------------------------------- concurrency
def concurrently(service: Service, challenge_id: str, code: str, n: int) -> list[httpx.Response]:
    """``n`` confirms released together from ``n`` threads, each on its own connection."""
    barrier = threading.Barrier(n)
    results: list[httpx.Response | BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(base_url=service.process.public_url, timeout=10) as client:
            try:
                barrier.wait(timeout=10)
                response: httpx.Response | BaseException = client.post(
                    CONFIRM, json={"challenge_id": challenge_id, "code": code}
                )
            except BaseException as exc:  # reported below
                response = exc
        with lock:
            results.append(response)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    responses = [r for r in results if isinstance(r, httpx.Response)]
    assert len(responses) == n, results
    return responses


def test_twenty_concurrent_confirms_over_http_create_one_session(start: Any) -> None:
    service: Service = start()
    issued = service.send("racer@example.com")
    code = service.code_for(issued["challenge_id"])

    responses = concurrently(service, issued["challenge_id"], code, 20)

    assert [r.status_code for r in responses] == [200] * 20, [r.text for r in responses]
    bodies = [r.json() for r in responses]
    assert sum(b["created"] for b in bodies) == 1
    assert len({b["device_session_id"] for b in bodies}) == 1
    assert len({b["session_token"] for b in bodies}) == 1
    sessions = list(service.redis.scan_iter(match=f"{service.prefix}session:*"))
    assert sessions == [session_key(bodies[0]["device_session_id"], service.prefix)]
    user_index = service.redis.zrange(index_key(bodies[0]["user_id"], service.prefix), 0, -1)
    assert user_index == [bodies[0]["device_session_id"]]


def test_thirty_concurrent_wrong_codes_over_http_get_five_evaluations(start: Any) -> None:
    service: Service = start()
    issued = service.send("guesser@example.com")
    code = service.code_for(issued["challenge_id"])
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"

    responses = concurrently(service, issued["challenge_id"], wrong, 30)

    outcomes = Counter((r.status_code, r.json()["error"]["code"]) for r in responses)
    assert outcomes == {(400, "invalid_code"): 5, (429, "too_many_attempts"): 25}
    challenge = service.redis.hgetall(f"{service.prefix}challenge:{issued['challenge_id']}")
    assert challenge["attempts"] == "5"
    assert service.confirm(issued["challenge_id"], code).status_code == 429


# --------------------------------------------------------------------------- runtime config
def test_config_hash_change_applies_without_a_restart(start: Any) -> None:
    service: Service = start(CONFIG_REFRESH_INTERVAL="200ms")
    config = f"{service.prefix}config"
    before = service.send("before@example.com")
    assert parse_ts(before["expires_at"]) > datetime.now(UTC) + timedelta(minutes=9)

    service.redis.hset(config, mapping={"challenge_ttl": "45s", "max_confirm_attempts": "1"})
    deadline = time.monotonic() + 5
    for attempt in range(100):
        issued = service.send(f"poll{attempt}@example.com")
        if parse_ts(issued["expires_at"]) < datetime.now(UTC) + timedelta(seconds=46):
            break
        assert time.monotonic() < deadline, "the override was not applied within 5s"
        time.sleep(0.1)
    code = service.code_for(issued["challenge_id"])
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    error = service.confirm(issued["challenge_id"], wrong)
    assert error.status_code == 400
    assert error.json()["error"]["details"]["attempts_remaining"] == 0
    assert service.confirm(issued["challenge_id"], code).status_code == 429

    # A value that does not parse: a warning, and the last good value stays.
    service.redis.hset(config, "max_confirm_attempts", "plenty")
    deadline = time.monotonic() + 5
    while not any(
        r.get("level") == "warning" and r.get("field") == "max_confirm_attempts"
        for r in service.process.log_records()
    ):
        assert time.monotonic() < deadline, service.process.output_report()
        time.sleep(0.1)
    again = service.send("after@example.com")
    again_code = service.code_for(again["challenge_id"])
    wrong = f"{(int(again_code) + 1) % 1_000_000:06d}"
    assert service.confirm(again["challenge_id"], wrong).json()["error"]["details"] == {
        "attempts_remaining": 0
    }
    assert service.confirm(again["challenge_id"], again_code).status_code == 429
    assert service.process.is_running()
