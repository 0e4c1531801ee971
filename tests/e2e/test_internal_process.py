"""End to end: the internal API of the real ``authsession`` process (CONTRACT §6, §3).

Two processes per xdist worker at most, module-scoped, over a module-owned redis-server
(so no other module's FLUSHALL reaches them):

* ``open_service``: stub user and mail services, no ``AUTHSESSION_INTERNAL_API_TOKEN``.
* ``guarded_service``: ``rest`` user service against a local fake, stub mail, the token
  set to ``s3cret``.

Codes come from the stub mail's log line (``"event": "stub mail: login code"``). Every
test uses fresh e-mail addresses, so tests never share users or cooldowns.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import redis

from tests.contract import CONFIRM, INTERNAL, SEND, SESSION_FIELDS, error_code, session_key
from tests.support.fake_services import FakeUserService
from tests.support.net import LOOPBACK, free_ports
from tests.support.process import AuthsessionProcess
from tests.support.redis_server import RedisServer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STUB_CODE_EVENT = "stub mail: login code"
UNKNOWN_SESSION_ID = "Z" * 32


# --------------------------------------------------------------------------- processes


@dataclass
class Service:
    """One running process, its Redis key prefix and HTTP clients for both listeners."""

    process: AuthsessionProcess
    prefix: str
    public: httpx.Client
    internal: httpx.Client
    redis: redis.Redis

    def session_record(self, sid: str) -> dict[str, str]:
        return cast(dict[str, str], self.redis.hgetall(session_key(sid, self.prefix)))

    def snapshot(self, sid: str) -> dict[str, Any] | None:
        raw = self.redis.get(f"gateway:session:{sid}")
        return None if raw is None else json.loads(raw)

    def event_versions(self, sid: str) -> list[tuple[str, str]]:
        entries = cast(
            list[tuple[str, dict[str, str]]], self.redis.xrange("gateway:session_events")
        )
        return [
            (f["status"], f["version"]) for _, f in entries if f.get("device_session_id") == sid
        ]

    def send_code(self, email: str) -> tuple[str, str]:
        """send-email-code; the challenge id and the code the stub mail logged for it."""
        response = self.public.post(SEND, json={"email": email})
        assert response.status_code == 200, response.text
        challenge_id: str = response.json()["challenge_id"]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for record in self.process.log_records():
                if (
                    record.get("event") == STUB_CODE_EVENT
                    and record.get("challenge_id") == challenge_id
                ):
                    return challenge_id, str(record["code"])
            time.sleep(0.05)
        raise AssertionError(f"no code logged for {challenge_id}\n{self.process.output_report()}")

    def confirm(self, challenge_id: str, code: str, **extra: Any) -> httpx.Response:
        return self.public.post(CONFIRM, json={"challenge_id": challenge_id, "code": code, **extra})

    def login(self, email: str, **extra: Any) -> dict[str, Any]:
        challenge_id, code = self.send_code(email)
        response = self.confirm(challenge_id, code, **extra)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return {**body, "challenge_id": challenge_id, "code": code}


def new_email(tag: str = "jane") -> str:
    return f"{tag}.{uuid.uuid4().hex[:12]}@example.com"


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def assert_no_token_material(response: httpx.Response, *logins: dict[str, Any]) -> None:
    assert "session_token" not in response.text
    assert "token_sha256" not in response.text
    for item in logins:
        token = item["session_token"]
        assert token not in response.text
        assert hashlib.sha256(token.encode()).hexdigest() not in response.text


@pytest.fixture(scope="module")
def module_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def user_service() -> Iterator[FakeUserService]:
    with FakeUserService() as service:
        yield service


def start_service(
    workdir: Path, redis_server: RedisServer, extra: dict[str, str]
) -> Iterator[Service]:
    public_port, internal_port = free_ports(2)
    prefix = f"e2e-internal-{uuid.uuid4().hex[:8]}:"
    env = {
        "AUTHSESSION_PUBLIC_HTTP_ADDR": f"{LOOPBACK}:{public_port}",
        "AUTHSESSION_INTERNAL_HTTP_ADDR": f"{LOOPBACK}:{internal_port}",
        "AUTHSESSION_LOG_FORMAT": "json",
        "AUTHSESSION_LOG_LEVEL": "info",
        "AUTHSESSION_REDIS_ADDR": redis_server.addr,
        "AUTHSESSION_REDIS_KEY_PREFIX": prefix,
        "AUTHSESSION_RESEND_COOLDOWN": "1ms",
        **extra,
    }
    process = AuthsessionProcess(
        env, public_port=public_port, internal_port=internal_port, workdir=workdir
    )
    process.start()
    client = redis_server.client()
    try:
        process.wait_ready()
        with (
            httpx.Client(base_url=process.public_url, timeout=10) as public,
            httpx.Client(base_url=process.internal_url, timeout=10) as internal,
        ):
            yield Service(process, prefix, public, internal, client)
    finally:
        client.close()
        process.close()
        print(f"===== {process!r} =====\n{process.output_report()}")


@pytest.fixture(scope="module")
def open_service(
    tmp_path_factory: pytest.TempPathFactory, module_redis: RedisServer
) -> Iterator[Service]:
    """Stub user and mail services, no internal API token."""
    yield from start_service(
        tmp_path_factory.mktemp("open"),
        module_redis,
        {"AUTHSESSION_USER_SERVICE_MODE": "stub", "AUTHSESSION_MAIL_SERVICE_MODE": "stub"},
    )


@pytest.fixture(scope="module")
def guarded_service(
    tmp_path_factory: pytest.TempPathFactory,
    module_redis: RedisServer,
    user_service: FakeUserService,
) -> Iterator[Service]:
    """``rest`` user service (the fake), stub mail, internal API token set."""
    yield from start_service(
        tmp_path_factory.mktemp("guarded"),
        module_redis,
        {
            "AUTHSESSION_USER_SERVICE_MODE": "rest",
            "AUTHSESSION_USER_SERVICE_BASE_URL": user_service.base_url,
            "AUTHSESSION_USER_SERVICE_REQUEST_TIMEOUT": "2s",
            "AUTHSESSION_MAIL_SERVICE_MODE": "stub",
            "AUTHSESSION_INTERNAL_API_TOKEN": TOKEN,
        },
    )


@pytest.fixture
def users(user_service: FakeUserService) -> Iterator[FakeUserService]:
    """The module's fake user service, without faults before and after the test."""
    user_service.reset_faults()
    yield user_service
    user_service.reset_faults()


# --------------------------------------------------------------------------- token off


def test_startup_warns_that_the_internal_token_is_unset(open_service: Service) -> None:
    warnings = [
        r
        for r in open_service.process.log_records()
        if r.get("level") == "warning" and "AUTHSESSION_INTERNAL_API_TOKEN" in r.get("event", "")
    ]
    assert len(warnings) == 1, open_service.process.output_report()


def test_token_unset_internal_api_needs_no_header(open_service: Service) -> None:
    item = open_service.login(new_email())
    response = open_service.internal.get(f"{INTERNAL}/sessions/{item['device_session_id']}")
    assert response.status_code == 200
    assert response.json()["status"] == "active"


# --------------------------------------------------------------------------- session management


def test_list_newest_first_with_status_filter(open_service: Service) -> None:
    email = new_email()
    first = open_service.login(email)
    second = open_service.login(email)
    user_id = first["user_id"]
    assert second["user_id"] == user_id
    open_service.internal.post(f"{INTERNAL}/sessions/{first['device_session_id']}/revoke")
    url = f"{INTERNAL}/users/{user_id}/sessions"

    listed = open_service.internal.get(url)

    assert listed.status_code == 200
    body = listed.json()
    assert body["user_id"] == user_id
    assert [s["device_session_id"] for s in body["sessions"]] == [
        second["device_session_id"],
        first["device_session_id"],
    ]
    assert all(set(s) == SESSION_FIELDS for s in body["sessions"])
    assert_no_token_material(listed, first, second)
    active = open_service.internal.get(url, params={"status": "active"}).json()["sessions"]
    assert [s["device_session_id"] for s in active] == [second["device_session_id"]]
    revoked = open_service.internal.get(url, params={"status": "revoked"}).json()["sessions"]
    assert [s["device_session_id"] for s in revoked] == [first["device_session_id"]]
    assert open_service.internal.get(url, params={"status": "expired"}).json()["sessions"] == []
    bad = open_service.internal.get(url, params={"status": "bogus"})
    assert bad.status_code == 400
    assert error_code(bad) == "invalid_request"
    unknown = open_service.internal.get(f"{INTERNAL}/users/usr_{'0' * 32}/sessions")
    assert unknown.status_code == 200
    assert unknown.json()["sessions"] == []


def test_read_session(open_service: Service) -> None:
    item = open_service.login(new_email(), device_name="Laptop")
    sid = item["device_session_id"]

    response = open_service.internal.get(f"{INTERNAL}/sessions/{sid}")

    assert response.status_code == 200
    body = response.json()
    assert set(body) == SESSION_FIELDS
    assert body["status"] == "active"
    assert body["device_name"] == "Laptop"
    assert body["client_ip"] == "127.0.0.1"
    assert body["version"] == 1
    assert response.headers["cache-control"] == "no-store"
    assert_no_token_material(response, item)
    assert open_service.session_record(sid)["token_sha256"] == (
        hashlib.sha256(item["session_token"].encode()).hexdigest()
    )
    missing = open_service.internal.get(f"{INTERNAL}/sessions/{UNKNOWN_SESSION_ID}")
    assert missing.status_code == 404
    assert error_code(missing) == "session_not_found"


def test_revoke_publishes_and_repeat_keeps_revoked_at(open_service: Service) -> None:
    item = open_service.login(new_email())
    sid = item["device_session_id"]
    url = f"{INTERNAL}/sessions/{sid}/revoke"

    first = open_service.internal.post(url, json={"reason": "lost_phone"})

    assert first.status_code == 200
    body = first.json()
    assert body["status"] == "revoked"
    assert body["revoke_reason"] == "lost_phone"
    assert body["version"] == 2
    assert_no_token_material(first, item)
    record = open_service.session_record(sid)
    assert record["status"] == "revoked"
    assert record["version"] == "2"
    snapshot = open_service.snapshot(sid)
    assert snapshot is not None
    assert snapshot["status"] == "revoked"
    assert snapshot["revoke_reason"] == "lost_phone"
    assert snapshot["version"] == 2
    assert open_service.event_versions(sid) == [("active", "1"), ("revoked", "2")]

    again = open_service.internal.post(url)
    assert again.status_code == 200
    assert again.json()["revoked_at"] == body["revoked_at"]
    assert again.json()["version"] == 2
    assert again.json()["revoke_reason"] == "lost_phone"

    bad = open_service.internal.post(url, json={"reason": "Bad Reason!"})
    assert bad.status_code == 400
    assert error_code(bad) == "invalid_request"
    missing = open_service.internal.post(f"{INTERNAL}/sessions/{UNKNOWN_SESSION_ID}/revoke")
    assert missing.status_code == 404
    assert error_code(missing) == "session_not_found"

    replay = open_service.confirm(item["challenge_id"], item["code"])
    assert replay.status_code == 409
    assert error_code(replay) == "session_revoked"
    assert open_service.session_record(sid)["status"] == "revoked"


def test_revoke_all_keeps_the_excepted_session(open_service: Service) -> None:
    email = new_email()
    kept = open_service.login(email)
    other_a = open_service.login(email)
    other_b = open_service.login(email)
    url = f"{INTERNAL}/users/{kept['user_id']}/sessions/revoke"

    response = open_service.internal.post(
        url, json={"except_session_id": kept["device_session_id"], "reason": "logout_all"}
    )

    assert response.status_code == 200
    assert response.json()["user_id"] == kept["user_id"]
    assert sorted(response.json()["revoked_session_ids"]) == sorted(
        [other_a["device_session_id"], other_b["device_session_id"]]
    )
    assert open_service.session_record(kept["device_session_id"])["status"] == "active"
    for item in (other_a, other_b):
        record = open_service.session_record(item["device_session_id"])
        assert record["status"] == "revoked"
        assert record["revoke_reason"] == "logout_all"
    second = open_service.internal.post(url, json={"except_session_id": kept["device_session_id"]})
    assert second.status_code == 200
    assert second.json()["revoked_session_ids"] == []


def test_extend(open_service: Service) -> None:
    item = open_service.login(new_email())
    sid = item["device_session_id"]
    url = f"{INTERNAL}/sessions/{sid}/extend"

    before = datetime.now(UTC)
    response = open_service.internal.post(url, json={"ttl": "1h"})
    after = datetime.now(UTC)

    assert response.status_code == 200
    body = response.json()
    expires_at = parse_time(body["expires_at"])
    assert before + timedelta(hours=1) - timedelta(milliseconds=1) <= expires_at
    assert expires_at <= after + timedelta(hours=1)
    assert body["version"] == 2
    assert open_service.session_record(sid)["expires_at"] == body["expires_at"]
    snapshot = open_service.snapshot(sid)
    assert snapshot is not None
    assert snapshot["expires_at"] == body["expires_at"]
    assert 3_500_000 < open_service.redis.pttl(f"gateway:session:{sid}") <= 3_600_000

    default = open_service.internal.post(url)
    assert default.status_code == 200
    assert parse_time(default.json()["expires_at"]) >= before + timedelta(hours=720)
    for ttl in ("721h", "soon"):
        bad = open_service.internal.post(url, json={"ttl": ttl})
        assert bad.status_code == 400
        assert error_code(bad) == "invalid_request"
    open_service.internal.post(f"{INTERNAL}/sessions/{sid}/revoke")
    revoked = open_service.internal.post(url)
    assert revoked.status_code == 409
    assert error_code(revoked) == "session_revoked"
    missing = open_service.internal.post(f"{INTERNAL}/sessions/{UNKNOWN_SESSION_ID}/extend")
    assert missing.status_code == 404
    assert error_code(missing) == "session_not_found"


def test_block_with_stub_user_service(open_service: Service) -> None:
    email = new_email()
    first = open_service.login(email)
    second = open_service.login(email)
    pending_challenge, pending_code = open_service.send_code(email)  # mailed before the block
    user_id = first["user_id"]

    response = open_service.internal.post(f"{INTERNAL}/users/{user_id}/block")

    assert response.status_code == 200
    assert response.json()["user_id"] == user_id
    assert sorted(response.json()["revoked_session_ids"]) == sorted(
        [first["device_session_id"], second["device_session_id"]]
    )
    for item in (first, second):
        record = open_service.session_record(item["device_session_id"])
        assert record["status"] == "revoked"
        assert record["revoke_reason"] == "user_blocked"
    late = open_service.confirm(pending_challenge, pending_code)
    assert late.status_code == 403
    assert error_code(late) == "user_blocked"
    unknown = open_service.internal.post(f"{INTERNAL}/users/not-a-stub-user/block")
    assert unknown.status_code == 404
    assert error_code(unknown) == "user_not_found"


# --------------------------------------------------------------------------- token on


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic czNjcmV0"}],
    ids=["missing", "wrong", "basic"],
)
def test_token_set_rejects_requests_without_the_token(
    guarded_service: Service, headers: dict[str, str]
) -> None:
    for method, path in [
        ("GET", f"{INTERNAL}/users/someone/sessions"),
        ("GET", f"{INTERNAL}/sessions/{UNKNOWN_SESSION_ID}"),
        ("POST", f"{INTERNAL}/sessions/{UNKNOWN_SESSION_ID}/revoke"),
        ("POST", f"{INTERNAL}/users/someone/block"),
    ]:
        response = guarded_service.internal.request(method, path, headers=headers)
        assert response.status_code == 401, (method, path)
        assert error_code(response) == "unauthorized"


def test_token_set_accepts_the_bearer_token(guarded_service: Service) -> None:
    item = guarded_service.login(new_email())
    response = guarded_service.internal.get(
        f"{INTERNAL}/users/{item['user_id']}/sessions", headers=AUTH
    )
    assert response.status_code == 200
    assert [s["device_session_id"] for s in response.json()["sessions"]] == [
        item["device_session_id"]
    ]


def test_token_set_no_startup_warning(guarded_service: Service) -> None:
    assert not [
        r
        for r in guarded_service.process.log_records()
        if "AUTHSESSION_INTERNAL_API_TOKEN" in r.get("event", "")
    ]


# --------------------------------------------------------------------------- block, rest mode


def test_rest_block_user_service_up(guarded_service: Service, users: FakeUserService) -> None:
    email = new_email()
    item = guarded_service.login(email)
    user_id = item["user_id"]
    assert users.user_id_for(email) == user_id  # created through ensure at confirm
    pending_challenge, pending_code = guarded_service.send_code(email)
    url = f"{INTERNAL}/users/{user_id}/block"

    response = guarded_service.internal.post(url, json={"reason": "abuse"}, headers=AUTH)

    assert response.status_code == 200
    assert response.json() == {
        "user_id": user_id,
        "revoked_session_ids": [item["device_session_id"]],
    }
    calls = users.requests_to(f"/api/v1/users/{user_id}/block")
    assert len(calls) == 1
    assert calls[0].body == {"reason": "abuse"}
    assert user_id in users.blocked
    record = guarded_service.session_record(item["device_session_id"])
    assert record["status"] == "revoked"
    assert record["revoke_reason"] == "user_blocked"
    snapshot = guarded_service.snapshot(item["device_session_id"])
    assert snapshot is not None
    assert snapshot["status"] == "revoked"
    late = guarded_service.confirm(pending_challenge, pending_code)  # mailed before the block
    assert late.status_code == 403
    assert error_code(late) == "user_blocked"


def test_rest_block_user_service_down(guarded_service: Service, users: FakeUserService) -> None:
    item = guarded_service.login(new_email())
    sid = item["device_session_id"]
    events_before = guarded_service.event_versions(sid)
    users.fail_with(503)

    response = guarded_service.internal.post(
        f"{INTERNAL}/users/{item['user_id']}/block", headers=AUTH
    )

    assert response.status_code == 503
    assert error_code(response) == "service_unavailable"
    users.reset_faults()
    assert item["user_id"] not in users.blocked
    record = guarded_service.session_record(sid)
    assert record["status"] == "active"
    assert record["version"] == "1"
    assert guarded_service.event_versions(sid) == events_before
    listed = guarded_service.internal.get(
        f"{INTERNAL}/users/{item['user_id']}/sessions", params={"status": "active"}, headers=AUTH
    )
    assert [s["device_session_id"] for s in listed.json()["sessions"]] == [sid]


def test_rest_block_user_unknown_to_user_service(
    guarded_service: Service, users: FakeUserService
) -> None:
    user_id = f"user-{uuid.uuid4().hex}"

    response = guarded_service.internal.post(f"{INTERNAL}/users/{user_id}/block", headers=AUTH)

    assert response.status_code == 404
    assert error_code(response) == "user_not_found"
    assert len(users.requests_to(f"/api/v1/users/{user_id}/block")) == 1
