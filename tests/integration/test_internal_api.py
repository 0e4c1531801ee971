"""The internal API of CONTRACT §6, in process over a real redis-server.

Every row of the §6 table and every error code it names; the raw Redis state behind
each answer (§7 source of truth, §9 gateway projection); and the internal API token.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

import httpx
import pytest

from authsession.domain.errors import ServiceUnavailable, UserNotFound
from authsession.domain.ports import UserStatus
from authsession.domain.units import format_time, parse_time
from authsession.services.users_stub import StubUserDirectory, stub_user_id
from tests.contract import (
    INTERNAL,
    SESSION_FIELDS,
    SNAPSHOT_KEY,
    STREAM,
    error_code,
    index_key,
    session_key,
)
from tests.integration.conftest import AppEnv, AppFactory

RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
DEFAULT_TTL = timedelta(hours=720)
UNKNOWN_SESSION_ID = "A" * 32


# --------------------------------------------------------------------------- helpers


@dataclass
class Login:
    """One confirmed login."""

    device_session_id: str
    session_token: str
    user_id: str
    challenge_id: str
    code: str


async def send_code(app: AppEnv, email: str = "jane@example.com") -> tuple[str, str]:
    """send-email-code after clearing the resend cooldown; the challenge id and its code."""
    for key in app.redis.scan_iter("authsession:throttle*"):
        app.redis.delete(key)
    challenge_id, code = await app.send_code(email)
    assert code is not None
    return challenge_id, code


async def login(app: AppEnv, email: str = "jane@example.com", **extra: Any) -> Login:
    """A full login (cooldown cleared first); the clock moves 1s after, so several logins
    of one address are allowed and have distinct creation times."""
    challenge_id, code = await send_code(app, email)
    response = await app.confirm(challenge_id, code, **extra)
    assert response.status_code == 200, response.text
    body = response.json()
    app.clock.advance(timedelta(seconds=1))
    return Login(
        body["device_session_id"], body["session_token"], body["user_id"], challenge_id, code
    )


def epoch_ms(value: datetime) -> int:
    return round(value.timestamp() * 1000)


def session_hash(app: AppEnv, device_session_id: str) -> dict[str, str]:
    return cast(dict[str, str], app.redis.hgetall(session_key(device_session_id)))


def snapshot(app: AppEnv, device_session_id: str) -> dict[str, Any] | None:
    raw = app.redis.get(SNAPSHOT_KEY.format(device_session_id))
    return None if raw is None else json.loads(raw)


def events(app: AppEnv, device_session_id: str) -> list[dict[str, str]]:
    entries = cast(list[tuple[str, dict[str, str]]], app.redis.xrange(STREAM))
    return [f for _, f in entries if f.get("device_session_id") == device_session_id]


def assert_no_token_material(response: httpx.Response, *logins: Login) -> None:
    text = response.text
    assert "session_token" not in text
    assert "token_sha256" not in text
    for item in logins:
        assert item.session_token not in text
        assert item.session_token.rpartition(".")[2] not in text
        assert hashlib.sha256(item.session_token.encode()).hexdigest() not in text


async def get_session(app: AppEnv, device_session_id: str) -> dict[str, Any]:
    response = await app.internal.get(f"{INTERNAL}/sessions/{device_session_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def list_ids(app: AppEnv, user_id: str, status: str | None = None) -> list[str]:
    params = {"status": status} if status else None
    response = await app.internal.get(f"{INTERNAL}/users/{user_id}/sessions", params=params)
    assert response.status_code == 200, response.text
    return [s["device_session_id"] for s in response.json()["sessions"]]


@dataclass
class RecordingUsers(StubUserDirectory):
    """The stub user service, any user id existing; ``block`` is recorded and may fail.

    ``remember_blocks=False`` makes it forget blocks at once (resolve still says
    ``existing``), so only authsession's own memory of the block can stop a login.
    ``on_block`` runs inside the block call (to observe the order of the steps).
    """

    remember_blocks: bool = True
    block_error: Exception | None = None
    blocked: set[str] = field(default_factory=set)
    block_calls: list[tuple[str, str]] = field(default_factory=list)
    on_block: Any = None

    async def user_status(self, user_id: str) -> UserStatus | None:
        # With remember_blocks=False the user service forgets the block at once.
        return "blocked" if user_id in self.blocked else "active"

    async def block(self, user_id: str, reason: str) -> None:
        self.block_calls.append((user_id, reason))
        if self.on_block is not None:
            self.on_block(user_id)
        if self.block_error is not None:
            raise self.block_error
        if self.remember_blocks:
            self.blocked.add(user_id)


# --------------------------------------------------------------------------- list


async def test_list_defaults_to_all_newest_first(app: AppEnv) -> None:
    first = await login(app)
    second = await login(app)
    third = await login(app)
    await app.internal.post(f"{INTERNAL}/sessions/{second.device_session_id}/revoke")

    response = await app.internal.get(f"{INTERNAL}/users/{first.user_id}/sessions")

    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"user_id", "sessions"}
    assert body["user_id"] == first.user_id
    ids = [s["device_session_id"] for s in body["sessions"]]
    assert ids == [third.device_session_id, second.device_session_id, first.device_session_id]
    assert [s["status"] for s in body["sessions"]] == ["active", "revoked", "active"]
    for item in body["sessions"]:
        assert set(item) == SESSION_FIELDS
    assert_no_token_material(response, first, second, third)


async def test_list_status_filter_active_revoked_expired_all(app: AppEnv) -> None:
    active = await login(app)
    revoked = await login(app)
    expired = await login(app)
    user = active.user_id
    response = await app.internal.post(f"{INTERNAL}/sessions/{revoked.device_session_id}/revoke")
    assert response.status_code == 200
    response = await app.internal.post(
        f"{INTERNAL}/sessions/{expired.device_session_id}/extend", json={"ttl": "1m"}
    )
    assert response.status_code == 200
    app.clock.advance(timedelta(minutes=2))

    assert await list_ids(app, user, "active") == [active.device_session_id]
    assert await list_ids(app, user, "revoked") == [revoked.device_session_id]
    assert await list_ids(app, user, "expired") == [expired.device_session_id]
    everything = [expired.device_session_id, revoked.device_session_id, active.device_session_id]
    assert await list_ids(app, user, "all") == everything
    assert await list_ids(app, user) == everything


@pytest.mark.parametrize("user_id", ["usr_" + "0" * 32, "a.b:c@d-e_F", "u" * 128])
async def test_list_unknown_user_is_200_empty(app: AppEnv, user_id: str) -> None:
    response = await app.internal.get(f"{INTERNAL}/users/{user_id}/sessions")
    assert response.status_code == 200
    assert response.json() == {"user_id": user_id, "sessions": []}
    response = await app.internal.get(
        f"{INTERNAL}/users/{user_id}/sessions", params={"status": "active"}
    )
    assert response.json() == {"user_id": user_id, "sessions": []}


@pytest.mark.parametrize("status", ["bogus", "ALL", "", "active,revoked"])
async def test_list_bad_status_value_is_400(app: AppEnv, status: str) -> None:
    response = await app.internal.get(
        f"{INTERNAL}/users/usr_abc/sessions", params={"status": status}
    )
    assert response.status_code == 400
    assert error_code(response) == "invalid_request"


@pytest.mark.parametrize("user_id", ["bad$user", "a" * 129, "sp ace"])
async def test_list_malformed_user_id_is_400(app: AppEnv, user_id: str) -> None:
    response = await app.internal.get(f"{INTERNAL}/users/{user_id}/sessions")
    assert response.status_code == 400
    assert error_code(response) == "invalid_request"


async def test_list_prunes_index_members_whose_record_is_gone(app: AppEnv) -> None:
    kept = await login(app)
    dropped = await login(app)
    index = index_key(kept.user_id)
    assert set(app.redis.zrange(index, 0, -1)) == {
        kept.device_session_id,
        dropped.device_session_id,
    }
    app.redis.delete(session_key(dropped.device_session_id))
    app.clock.advance(timedelta(hours=1))

    assert await list_ids(app, kept.user_id) == [kept.device_session_id]
    assert app.redis.zrange(index, 0, -1) == [kept.device_session_id]


async def test_list_during_session_creation_does_not_unlist_the_new_session(
    app: AppEnv,
) -> None:
    earlier = await login(app)
    user_id = earlier.user_id
    store = app.core.sessions._store
    write_record = store._create  # type: ignore[attr-defined]

    async def list_in_between(**kwargs: Any) -> Any:
        # A backend lists the user's sessions after the index add, before the record.
        await list_ids(app, user_id)
        return await write_record(**kwargs)

    store._create = list_in_between  # type: ignore[attr-defined]
    try:
        created = await login(app)
    finally:
        store._create = write_record  # type: ignore[attr-defined]

    assert session_hash(app, created.device_session_id)["status"] == "active"
    assert created.device_session_id in app.redis.zrange(index_key(user_id), 0, -1)
    revoked = await app.internal.post(f"{INTERNAL}/users/{user_id}/sessions/revoke")
    assert created.device_session_id in revoked.json()["revoked_session_ids"]
    assert session_hash(app, created.device_session_id)["status"] == "revoked"


async def test_index_is_scored_by_creation_time(app: AppEnv) -> None:
    item = await login(app)
    score = app.redis.zscore(index_key(item.user_id), item.device_session_id)
    created_at = parse_time(session_hash(app, item.device_session_id)["created_at"])
    assert score == pytest.approx(created_at.timestamp() * 1000, abs=1)


@pytest.mark.parametrize("broken", ["index", "record"])
async def test_redis_failure_is_503(app: AppEnv, broken: str) -> None:
    item = await login(app)
    key = index_key(item.user_id) if broken == "index" else session_key(item.device_session_id)
    app.redis.delete(key)
    app.redis.set(key, "wrong type")  # every read of it now fails with WRONGTYPE
    url = (
        f"{INTERNAL}/users/{item.user_id}/sessions"
        if broken == "index"
        else f"{INTERNAL}/sessions/{item.device_session_id}"
    )
    response = await app.internal.get(url)
    assert response.status_code == 503
    assert error_code(response) == "service_unavailable"
    assert "Traceback" not in response.text


# --------------------------------------------------------------------------- read one


async def test_read_session_has_exactly_the_contract_fields(app: AppEnv) -> None:
    item = await login(app, device_name="Jane's phone")
    response = await app.internal.get(f"{INTERNAL}/sessions/{item.device_session_id}")

    assert response.status_code == 200
    body = response.json()
    assert set(body) == SESSION_FIELDS
    assert body["device_session_id"] == item.device_session_id
    assert body["user_id"] == item.user_id
    assert body["status"] == "active"
    assert body["revoked_at"] is None
    assert body["revoke_reason"] is None
    assert body["device_name"] == "Jane's phone"
    assert body["client_ip"] == "203.0.113.7"
    assert body["user_agent"].startswith("python-httpx/")
    assert body["version"] == 1
    for name in ("created_at", "expires_at"):
        assert RFC3339_UTC.match(body[name]), body[name]
    assert parse_time(body["expires_at"]) - parse_time(body["created_at"]) == DEFAULT_TTL
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-request-id"]
    assert_no_token_material(response, item)


async def test_read_session_matches_the_redis_record(app: AppEnv) -> None:
    item = await login(app)
    body = await get_session(app, item.device_session_id)
    record = session_hash(app, item.device_session_id)
    assert record["token_sha256"] == hashlib.sha256(item.session_token.encode()).hexdigest()
    for name in ("device_session_id", "user_id", "status", "client_ip", "user_agent"):
        assert record[name] == body[name]
    assert parse_time(record["created_at"]) == parse_time(body["created_at"])
    assert parse_time(record["expires_at"]) == parse_time(body["expires_at"])
    assert record["version"] == "1"


async def test_read_unknown_session_is_404(app: AppEnv) -> None:
    response = await app.internal.get(f"{INTERNAL}/sessions/{UNKNOWN_SESSION_ID}")
    assert response.status_code == 404
    assert error_code(response) == "session_not_found"


@pytest.mark.parametrize("session_id", ["short", "A" * 65, "bad.id.with.dots"])
async def test_read_malformed_session_id_is_400(app: AppEnv, session_id: str) -> None:
    response = await app.internal.get(f"{INTERNAL}/sessions/{session_id}")
    assert response.status_code == 400
    assert error_code(response) == "invalid_request"


async def test_read_reports_expired_past_expires_at(app: AppEnv) -> None:
    item = await login(app)
    body = await get_session(app, item.device_session_id)
    app.clock.current = parse_time(body["expires_at"]) + timedelta(milliseconds=1)
    assert (await get_session(app, item.device_session_id))["status"] == "expired"
    # Reading does not change the record.
    assert session_hash(app, item.device_session_id)["version"] == "1"


async def test_revoked_wins_over_expired(app: AppEnv) -> None:
    item = await login(app)
    await app.internal.post(f"{INTERNAL}/sessions/{item.device_session_id}/revoke")
    app.clock.advance(DEFAULT_TTL + timedelta(hours=1))
    assert (await get_session(app, item.device_session_id))["status"] == "revoked"
    assert await list_ids(app, item.user_id, "expired") == []
    assert await list_ids(app, item.user_id, "revoked") == [item.device_session_id]


# --------------------------------------------------------------------------- revoke


async def test_revoke_default_reason(app: AppEnv) -> None:
    item = await login(app)
    now = app.clock.now()
    response = await app.internal.post(f"{INTERNAL}/sessions/{item.device_session_id}/revoke")

    assert response.status_code == 200
    body = response.json()
    assert set(body) == SESSION_FIELDS
    assert body["status"] == "revoked"
    assert body["revoke_reason"] == "revoked_by_backend"
    assert body["revoked_at"] == format_time(now)
    assert body["version"] == 2
    assert_no_token_material(response, item)
    record = session_hash(app, item.device_session_id)
    assert record["status"] == "revoked"
    assert record["revoke_reason"] == "revoked_by_backend"
    assert record["version"] == "2"


async def test_revoke_with_empty_body_object(app: AppEnv) -> None:
    item = await login(app)
    response = await app.internal.post(
        f"{INTERNAL}/sessions/{item.device_session_id}/revoke", json={}
    )
    assert response.status_code == 200
    assert response.json()["revoke_reason"] == "revoked_by_backend"


@pytest.mark.parametrize("reason", ["fraud.suspected_by-ops-2", "x" * 64])
async def test_revoke_custom_reason(app: AppEnv, reason: str) -> None:
    item = await login(app)
    response = await app.internal.post(
        f"{INTERNAL}/sessions/{item.device_session_id}/revoke", json={"reason": reason}
    )
    assert response.status_code == 200
    assert response.json()["revoke_reason"] == reason
    assert session_hash(app, item.device_session_id)["revoke_reason"] == reason


@pytest.mark.parametrize(
    "body",
    [
        {"reason": "Bad Reason!"},
        {"reason": "x" * 65},
        {"reason": ""},
        {"reason": 7},
        {"reason": "ok", "extra": 1},
    ],
    ids=["uppercase-and-punctuation", "65-chars", "empty", "not-a-string", "unknown-field"],
)
async def test_revoke_invalid_body_is_400_and_changes_nothing(
    app: AppEnv, body: dict[str, Any]
) -> None:
    item = await login(app)
    before = app.redis.xlen(STREAM)
    response = await app.internal.post(
        f"{INTERNAL}/sessions/{item.device_session_id}/revoke", json=body
    )
    assert response.status_code == 400
    assert error_code(response) == "invalid_request"
    record = session_hash(app, item.device_session_id)
    assert record["status"] == "active"
    assert record["version"] == "1"
    assert app.redis.xlen(STREAM) == before


async def test_revoke_unknown_session_is_404(app: AppEnv) -> None:
    response = await app.internal.post(f"{INTERNAL}/sessions/{UNKNOWN_SESSION_ID}/revoke")
    assert response.status_code == 404
    assert error_code(response) == "session_not_found"
    assert not app.redis.exists(session_key(UNKNOWN_SESSION_ID))


async def test_revoke_again_keeps_revoked_at_reason_and_version(app: AppEnv) -> None:
    item = await login(app)
    url = f"{INTERNAL}/sessions/{item.device_session_id}/revoke"
    first = (await app.internal.post(url, json={"reason": "first"})).json()
    app.clock.advance(timedelta(minutes=5))

    response = await app.internal.post(url, json={"reason": "second"})

    assert response.status_code == 200
    again = response.json()
    assert again["status"] == "revoked"
    assert again["revoked_at"] == first["revoked_at"]
    assert again["revoke_reason"] == "first"
    assert again["version"] == first["version"] == 2
    record = session_hash(app, item.device_session_id)
    assert record["version"] == "2"
    assert record["revoke_reason"] == "first"


# --------------------------------------------------------------------------- revoke all


async def test_revoke_all_returns_only_what_this_call_revoked(app: AppEnv) -> None:
    kept = await login(app)
    already = await login(app)
    target_a = await login(app)
    target_b = await login(app)
    other_user = await login(app, "someone.else@example.com")
    await app.internal.post(f"{INTERNAL}/sessions/{already.device_session_id}/revoke")
    url = f"{INTERNAL}/users/{kept.user_id}/sessions/revoke"

    response = await app.internal.post(
        url, json={"reason": "password_reset", "except_session_id": kept.device_session_id}
    )

    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"user_id", "revoked_session_ids"}
    assert body["user_id"] == kept.user_id
    assert sorted(body["revoked_session_ids"]) == sorted(
        [target_a.device_session_id, target_b.device_session_id]
    )
    for item in (target_a, target_b):
        record = session_hash(app, item.device_session_id)
        assert record["status"] == "revoked"
        assert record["revoke_reason"] == "password_reset"
        assert record["version"] == "2"
    assert session_hash(app, kept.device_session_id)["status"] == "active"
    assert session_hash(app, already.device_session_id)["revoke_reason"] == "revoked_by_backend"
    assert session_hash(app, other_user.device_session_id)["status"] == "active"

    second = await app.internal.post(url, json={"except_session_id": kept.device_session_id})
    assert second.status_code == 200
    assert second.json() == {"user_id": kept.user_id, "revoked_session_ids": []}


async def test_revoke_all_without_body_uses_default_reason(app: AppEnv) -> None:
    first = await login(app)
    second = await login(app)
    response = await app.internal.post(f"{INTERNAL}/users/{first.user_id}/sessions/revoke")
    assert response.status_code == 200
    assert sorted(response.json()["revoked_session_ids"]) == sorted(
        [first.device_session_id, second.device_session_id]
    )
    for item in (first, second):
        assert session_hash(app, item.device_session_id)["revoke_reason"] == "revoked_by_backend"
        assert snapshot(app, item.device_session_id)["status"] == "revoked"  # type: ignore[index]


async def test_concurrent_revoke_alls_split_the_sessions(app: AppEnv) -> None:
    logins = [await login(app) for _ in range(4)]
    url = f"{INTERNAL}/users/{logins[0].user_id}/sessions/revoke"
    responses = await asyncio.gather(*(app.internal.post(url) for _ in range(3)))
    assert [r.status_code for r in responses] == [200] * 3
    reported = [i for r in responses for i in r.json()["revoked_session_ids"]]
    assert sorted(reported) == sorted(i.device_session_id for i in logins)
    for item in logins:
        assert session_hash(app, item.device_session_id)["version"] == "2"


async def test_revoke_all_of_unknown_user_is_200_empty(app: AppEnv) -> None:
    response = await app.internal.post(f"{INTERNAL}/users/usr_nobody/sessions/revoke")
    assert response.status_code == 200
    assert response.json() == {"user_id": "usr_nobody", "revoked_session_ids": []}


@pytest.mark.parametrize(
    "body",
    [{"reason": "Bad Reason!"}, {"except_session_id": "short"}, {"unknown": True}],
    ids=["bad-reason", "bad-except-id", "unknown-field"],
)
async def test_revoke_all_invalid_body_is_400_and_changes_nothing(
    app: AppEnv, body: dict[str, Any]
) -> None:
    item = await login(app)
    response = await app.internal.post(
        f"{INTERNAL}/users/{item.user_id}/sessions/revoke", json=body
    )
    assert response.status_code == 400
    assert error_code(response) == "invalid_request"
    assert session_hash(app, item.device_session_id)["status"] == "active"


# --------------------------------------------------------------------------- extend


async def test_extend_default_is_session_ttl_from_now(app: AppEnv) -> None:
    item = await login(app)
    app.clock.advance(timedelta(hours=3))
    now = app.clock.now()
    response = await app.internal.post(f"{INTERNAL}/sessions/{item.device_session_id}/extend")

    assert response.status_code == 200
    body = response.json()
    assert set(body) == SESSION_FIELDS
    assert body["status"] == "active"
    assert body["expires_at"] == format_time(now + DEFAULT_TTL)
    assert body["version"] == 2
    assert_no_token_material(response, item)
    record = session_hash(app, item.device_session_id)
    assert record["expires_at"] == body["expires_at"]
    assert record["version"] == "2"


@pytest.mark.parametrize(
    ("ttl", "delta"),
    [
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("90s", timedelta(seconds=90)),
        ("720h", DEFAULT_TTL),
    ],
)
async def test_extend_with_ttl(app: AppEnv, ttl: str, delta: timedelta) -> None:
    item = await login(app)
    now = app.clock.now()
    response = await app.internal.post(
        f"{INTERNAL}/sessions/{item.device_session_id}/extend", json={"ttl": ttl}
    )
    assert response.status_code == 200
    assert response.json()["expires_at"] == format_time(now + delta)
    assert session_hash(app, item.device_session_id)["expires_at"] == format_time(now + delta)


async def test_extend_moves_the_record_expiry(app: AppEnv) -> None:
    item = await login(app)
    key = session_key(item.device_session_id)
    now = app.clock.now()
    await app.internal.post(
        f"{INTERNAL}/sessions/{item.device_session_id}/extend", json={"ttl": "1h"}
    )
    # The record lives until expires_at + SESSION_RETENTION (168h).
    expected = now + timedelta(hours=1) + timedelta(hours=168)
    assert abs(app.redis.pexpiretime(key) - epoch_ms(expected)) <= 1


@pytest.mark.parametrize("ttl", ["721h", "720h1s", "1000h"])
async def test_extend_above_session_ttl_is_400(app: AppEnv, ttl: str) -> None:
    item = await login(app)
    response = await app.internal.post(
        f"{INTERNAL}/sessions/{item.device_session_id}/extend", json={"ttl": ttl}
    )
    assert response.status_code == 400
    assert error_code(response) == "invalid_request"
    assert session_hash(app, item.device_session_id)["version"] == "1"


@pytest.mark.parametrize(
    "body",
    [{"ttl": "abc"}, {"ttl": "1 hour"}, {"ttl": "-1h"}, {"ttl": "0"}, {"ttl": 3600}, {"x": 1}],
    ids=["word", "spaced", "negative", "zero", "number", "unknown-field"],
)
async def test_extend_bad_ttl_is_400(app: AppEnv, body: dict[str, Any]) -> None:
    item = await login(app)
    response = await app.internal.post(
        f"{INTERNAL}/sessions/{item.device_session_id}/extend", json=body
    )
    assert response.status_code == 400
    assert error_code(response) == "invalid_request"
    assert session_hash(app, item.device_session_id)["version"] == "1"


async def test_extend_limit_follows_configured_session_ttl(make_app: AppFactory) -> None:
    app = await make_app(SESSION_TTL="2h")
    item = await login(app)
    url = f"{INTERNAL}/sessions/{item.device_session_id}/extend"
    too_long = await app.internal.post(url, json={"ttl": "3h"})
    assert too_long.status_code == 400
    assert error_code(too_long) == "invalid_request"
    now = app.clock.now()
    default = await app.internal.post(url)
    assert default.status_code == 200
    assert default.json()["expires_at"] == format_time(now + timedelta(hours=2))


async def test_extend_limit_follows_runtime_config_override(app: AppEnv) -> None:
    app.redis.hset("authsession:config", "session_ttl", "1h")
    await app.core.config.refresh()  # what the provider does every CONFIG_REFRESH_INTERVAL
    item = await login(app)
    url = f"{INTERNAL}/sessions/{item.device_session_id}/extend"
    too_long = await app.internal.post(url, json={"ttl": "2h"})
    assert too_long.status_code == 400
    assert error_code(too_long) == "invalid_request"
    now = app.clock.now()
    default = await app.internal.post(url)
    assert default.status_code == 200
    assert default.json()["expires_at"] == format_time(now + timedelta(hours=1))


async def test_extend_revoked_session_is_409(app: AppEnv) -> None:
    item = await login(app)
    await app.internal.post(f"{INTERNAL}/sessions/{item.device_session_id}/revoke")
    response = await app.internal.post(f"{INTERNAL}/sessions/{item.device_session_id}/extend")
    assert response.status_code == 409
    assert error_code(response) == "session_revoked"
    record = session_hash(app, item.device_session_id)
    assert record["status"] == "revoked"
    assert record["version"] == "2"


async def test_extend_expired_session_is_409(app: AppEnv) -> None:
    item = await login(app)
    expires_at = session_hash(app, item.device_session_id)["expires_at"]
    app.clock.current = parse_time(expires_at) + timedelta(milliseconds=1)
    response = await app.internal.post(f"{INTERNAL}/sessions/{item.device_session_id}/extend")
    assert response.status_code == 409
    assert error_code(response) == "session_revoked"
    record = session_hash(app, item.device_session_id)
    assert record["expires_at"] == expires_at
    assert record["version"] == "1"


async def test_extend_unknown_session_is_404(app: AppEnv) -> None:
    response = await app.internal.post(f"{INTERNAL}/sessions/{UNKNOWN_SESSION_ID}/extend")
    assert response.status_code == 404
    assert error_code(response) == "session_not_found"
    assert not app.redis.exists(session_key(UNKNOWN_SESSION_ID))


# --------------------------------------------------------------------------- block


async def test_block_calls_user_service_first_then_revokes_everything(
    make_app: AppFactory,
) -> None:
    users = RecordingUsers()
    app = await make_app(users=users)
    first = await login(app)
    second = await login(app)
    already = await login(app)
    await app.internal.post(f"{INTERNAL}/sessions/{already.device_session_id}/revoke")
    seen_at_block: dict[str, str] = {}
    users.on_block = lambda _user: seen_at_block.update(
        {
            i.device_session_id: session_hash(app, i.device_session_id)["status"]
            for i in (first, second)
        }
    )

    response = await app.internal.post(
        f"{INTERNAL}/users/{first.user_id}/block", json={"reason": "abuse"}
    )

    assert response.status_code == 200
    body = response.json()
    assert body["user_id"] == first.user_id
    assert sorted(body["revoked_session_ids"]) == sorted(
        [first.device_session_id, second.device_session_id]
    )
    assert users.block_calls == [(first.user_id, "abuse")]
    # The user service was called while the sessions were still active.
    assert seen_at_block == {first.device_session_id: "active", second.device_session_id: "active"}
    for item in (first, second):
        record = session_hash(app, item.device_session_id)
        assert record["status"] == "revoked"
        assert record["revoke_reason"] == "user_blocked"
        published = snapshot(app, item.device_session_id)
        assert published is not None
        assert published["status"] == "revoked"
        assert published["revoke_reason"] == "user_blocked"
    assert session_hash(app, already.device_session_id)["revoke_reason"] == "revoked_by_backend"


async def test_block_without_reason_sends_user_blocked(make_app: AppFactory) -> None:
    users = RecordingUsers()
    app = await make_app(users=users)
    item = await login(app)
    response = await app.internal.post(f"{INTERNAL}/users/{item.user_id}/block")
    assert response.status_code == 200
    assert response.json()["revoked_session_ids"] == [item.device_session_id]
    assert users.block_calls == [(item.user_id, "user_blocked")]


async def test_block_with_stub_user_service(app: AppEnv) -> None:
    item = await login(app)
    response = await app.internal.post(f"{INTERNAL}/users/{item.user_id}/block")
    assert response.status_code == 200
    assert response.json() == {
        "user_id": item.user_id,
        "revoked_session_ids": [item.device_session_id],
    }
    assert isinstance(app.users, StubUserDirectory)
    assert item.user_id in app.users.blocked
    again = await app.internal.post(f"{INTERNAL}/users/{item.user_id}/block")
    assert again.status_code == 200
    assert again.json()["revoked_session_ids"] == []


async def test_block_user_without_sessions_is_200_empty(app: AppEnv) -> None:
    user_id = "usr_" + "1" * 32
    response = await app.internal.post(f"{INTERNAL}/users/{user_id}/block")
    assert response.status_code == 200
    assert response.json() == {"user_id": user_id, "revoked_session_ids": []}


async def test_block_user_service_failure_is_503_and_nothing_revoked(
    make_app: AppFactory,
) -> None:
    users = RecordingUsers(block_error=ServiceUnavailable("user_service", "HTTP 503"))
    app = await make_app(users=users)
    item = await login(app)
    events_before = app.redis.xlen(STREAM)

    response = await app.internal.post(f"{INTERNAL}/users/{item.user_id}/block")

    assert response.status_code == 503
    assert error_code(response) == "service_unavailable"
    assert len(users.block_calls) == 1
    record = session_hash(app, item.device_session_id)
    assert record["status"] == "active"
    assert record["version"] == "1"
    assert snapshot(app, item.device_session_id)["status"] == "active"  # type: ignore[index]
    assert app.redis.xlen(STREAM) == events_before
    # No block is remembered either: a code mailed before the failed block still works.
    users.block_error = None
    users.remember_blocks = False
    challenge_id, code = await send_code(app, "other@example.com")
    assert (await app.confirm(challenge_id, code)).status_code == 200


async def test_block_unknown_user_is_404(make_app: AppFactory) -> None:
    users = RecordingUsers(block_error=UserNotFound())
    app = await make_app(users=users)
    item = await login(app)
    response = await app.internal.post(f"{INTERNAL}/users/{item.user_id}/block")
    assert response.status_code == 404
    assert error_code(response) == "user_not_found"
    assert session_hash(app, item.device_session_id)["status"] == "active"


async def test_block_id_the_stub_does_not_know_is_404(app: AppEnv) -> None:
    response = await app.internal.post(f"{INTERNAL}/users/not-a-stub-user/block")
    assert response.status_code == 404
    assert error_code(response) == "user_not_found"


async def test_block_invalid_reason_is_400_and_user_service_not_called(
    make_app: AppFactory,
) -> None:
    users = RecordingUsers()
    app = await make_app(users=users)
    item = await login(app)
    response = await app.internal.post(
        f"{INTERNAL}/users/{item.user_id}/block", json={"reason": "Bad Reason!"}
    )
    assert response.status_code == 400
    assert error_code(response) == "invalid_request"
    assert users.block_calls == []
    assert session_hash(app, item.device_session_id)["status"] == "active"


async def test_code_mailed_before_block_cannot_be_confirmed(make_app: AppFactory) -> None:
    # The fake forgets the block at once: only authsession's memory of it can refuse.
    users = RecordingUsers(remember_blocks=False)
    app = await make_app(users=users)
    item = await login(app)
    challenge_id, code = await send_code(app)

    blocked = await app.internal.post(f"{INTERNAL}/users/{item.user_id}/block")
    assert blocked.status_code == 200
    response = await app.confirm(challenge_id, code)

    assert response.status_code == 403
    assert error_code(response) == "user_blocked"
    assert await list_ids(app, item.user_id, "active") == []


async def test_code_mailed_before_block_cannot_be_confirmed_with_stub(app: AppEnv) -> None:
    item = await login(app)
    challenge_id, code = await send_code(app)
    assert (await app.internal.post(f"{INTERNAL}/users/{item.user_id}/block")).status_code == 200
    response = await app.confirm(challenge_id, code)
    assert response.status_code == 403
    assert error_code(response) == "user_blocked"
    assert await list_ids(app, item.user_id) == [item.device_session_id]


async def test_block_racing_a_confirm_leaves_no_active_session(make_app: AppFactory) -> None:
    users = RecordingUsers(remember_blocks=False)
    app = await make_app(users=users)
    challenge_id, code = await send_code(app)
    user_id = stub_user_id("jane@example.com")
    original = users.user_status

    async def check_then_block_lands(checked_user: str) -> UserStatus | None:
        # The confirm reads "active"; the block request lands right after, before the
        # session is written (and the user service forgets it at once).
        answer = await original(checked_user)
        response = await app.internal.post(f"{INTERNAL}/users/{user_id}/block")
        assert response.status_code == 200
        return answer

    users.user_status = check_then_block_lands  # type: ignore[method-assign]
    response = await app.confirm(challenge_id, code)
    users.user_status = original  # type: ignore[method-assign]

    assert response.status_code in (200, 403, 409)
    assert await list_ids(app, user_id, "active") == []


# --------------------------------------------------------------------------- projection


async def test_login_publishes_version_1(app: AppEnv) -> None:
    item = await login(app)
    published = snapshot(app, item.device_session_id)
    assert published is not None
    assert published["version"] == 1
    assert published["status"] == "active"
    assert published["token_sha256"] == hashlib.sha256(item.session_token.encode()).hexdigest()
    assert [e["version"] for e in events(app, item.device_session_id)] == ["1"]


async def test_revoke_increments_version_and_publishes_revoked_snapshot(app: AppEnv) -> None:
    item = await login(app)
    app.clock.advance(timedelta(minutes=1))
    response = await app.internal.post(
        f"{INTERNAL}/sessions/{item.device_session_id}/revoke", json={"reason": "lost_device"}
    )
    body = response.json()

    raw = app.redis.get(SNAPSHOT_KEY.format(item.device_session_id))
    assert raw is not None
    published = json.loads(raw)
    assert published["status"] == "revoked"
    assert published["revoke_reason"] == "lost_device"
    assert published["revoked_at"] == body["revoked_at"]
    assert published["version"] == 2
    assert published["published_at"] == format_time(app.clock.now())
    stream = events(app, item.device_session_id)
    assert [e["version"] for e in stream] == ["1", "2"]
    last = stream[-1]
    assert last == {
        "event": "session_snapshot",
        "device_session_id": item.device_session_id,
        "user_id": item.user_id,
        "status": "revoked",
        "version": "2",
        "snapshot": raw,
    }


async def test_every_publication_appends_one_event(app: AppEnv) -> None:
    item = await login(app)
    sid = item.device_session_id
    await app.internal.post(f"{INTERNAL}/sessions/{sid}/extend", json={"ttl": "2h"})
    await app.internal.post(f"{INTERNAL}/sessions/{sid}/extend", json={"ttl": "3h"})
    await app.internal.post(f"{INTERNAL}/sessions/{sid}/revoke")
    await app.internal.post(f"{INTERNAL}/sessions/{sid}/revoke")  # same version again

    assert [e["version"] for e in events(app, sid)] == ["1", "2", "3", "4", "4"]
    assert [e["status"] for e in events(app, sid)] == [
        "active",
        "active",
        "active",
        "revoked",
        "revoked",
    ]
    assert session_hash(app, sid)["version"] == "4"
    assert snapshot(app, sid)["version"] == 4  # type: ignore[index]


async def test_extend_moves_snapshot_expires_at_and_key_ttl(app: AppEnv) -> None:
    item = await login(app)
    key = SNAPSHOT_KEY.format(item.device_session_id)
    assert app.redis.pttl(key) > (DEFAULT_TTL - timedelta(hours=1)).total_seconds() * 1000
    now = app.clock.now()

    response = await app.internal.post(
        f"{INTERNAL}/sessions/{item.device_session_id}/extend", json={"ttl": "1h"}
    )

    assert response.status_code == 200
    published = snapshot(app, item.device_session_id)
    assert published is not None
    assert published["expires_at"] == format_time(now + timedelta(hours=1))
    assert published["version"] == 2
    assert published["status"] == "active"
    assert app.redis.pexpiretime(key) == epoch_ms(parse_time(published["expires_at"]))
    assert events(app, item.device_session_id)[-1]["version"] == "2"


async def test_revoked_snapshot_keeps_session_expiry(app: AppEnv) -> None:
    item = await login(app)
    key = SNAPSHOT_KEY.format(item.device_session_id)
    await app.internal.post(f"{INTERNAL}/sessions/{item.device_session_id}/revoke")
    published = snapshot(app, item.device_session_id)
    assert published is not None
    assert app.redis.pexpiretime(key) == epoch_ms(parse_time(published["expires_at"]))


# --------------------------------------------------------------------------- internal API token


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer s3cret-and-more"},
        {"Authorization": "Basic czNjcmV0"},
        {"Authorization": "s3cret"},
    ],
    ids=["missing", "wrong", "empty", "prefix", "basic", "no-scheme"],
)
async def test_token_set_rejects_missing_or_wrong_token(
    make_app: AppFactory, headers: dict[str, str]
) -> None:
    app = await make_app(INTERNAL_API_TOKEN="s3cret")
    for method, path in [
        ("GET", f"{INTERNAL}/users/usr_x/sessions"),
        ("GET", f"{INTERNAL}/sessions/{UNKNOWN_SESSION_ID}"),
        ("POST", f"{INTERNAL}/sessions/{UNKNOWN_SESSION_ID}/revoke"),
        ("POST", f"{INTERNAL}/users/usr_x/sessions/revoke"),
        ("POST", f"{INTERNAL}/sessions/{UNKNOWN_SESSION_ID}/extend"),
        ("POST", f"{INTERNAL}/users/usr_x/block"),
    ]:
        response = await app.internal.request(method, path, headers=headers)
        assert response.status_code == 401, (method, path)
        assert error_code(response) == "unauthorized"
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["x-request-id"]


async def test_token_set_rejected_request_changes_nothing(make_app: AppFactory) -> None:
    app = await make_app(INTERNAL_API_TOKEN="s3cret")
    item = await login(app)
    response = await app.internal.post(
        f"{INTERNAL}/sessions/{item.device_session_id}/revoke",
        headers={"Authorization": "Bearer wrong"},
    )
    assert response.status_code == 401
    assert session_hash(app, item.device_session_id)["status"] == "active"


async def test_token_set_accepts_bearer_token(make_app: AppFactory) -> None:
    app = await make_app(INTERNAL_API_TOKEN="s3cret")
    item = await login(app)  # the public listener needs no token
    auth = {"Authorization": "Bearer s3cret"}
    listed = await app.internal.get(f"{INTERNAL}/users/{item.user_id}/sessions", headers=auth)
    assert listed.status_code == 200
    assert [s["device_session_id"] for s in listed.json()["sessions"]] == [item.device_session_id]
    revoked = await app.internal.post(
        f"{INTERNAL}/sessions/{item.device_session_id}/revoke", headers=auth
    )
    assert revoked.status_code == 200
    assert revoked.json()["status"] == "revoked"


async def test_token_unset_needs_no_header(app: AppEnv) -> None:
    item = await login(app)
    response = await app.internal.get(f"{INTERNAL}/sessions/{item.device_session_id}")
    assert response.status_code == 200
    response = await app.internal.get(
        f"{INTERNAL}/sessions/{item.device_session_id}",
        headers={"Authorization": "Bearer anything"},
    )
    assert response.status_code == 200


# --------------------------------------------------------------------------- token rotation
ROTATION = "old-token-1, new-token-2"


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer old-token-1",
        "Bearer new-token-2",
        "bearer new-token-2",
        "BEARER old-token-1",
        "BeArEr old-token-1",
        "Bearer   new-token-2",
    ],
    ids=["old", "new", "lower-scheme", "upper-scheme", "mixed-scheme", "extra-spaces"],
)
async def test_any_listed_token_is_accepted_with_any_scheme_case(
    make_app: AppFactory, authorization: str
) -> None:
    app = await make_app(INTERNAL_API_TOKEN=ROTATION)
    response = await app.internal.get(
        f"{INTERNAL}/users/usr_x/sessions", headers={"Authorization": authorization}
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer old-token-1, new-token-2",
        "Bearer old-token-1,new-token-2",
        "Bearer old-token",
        "Bearer new-token-2x",
        "Bearer ",
        "Basic old-token-1",
        "Bearerold-token-1",
        "old-token-1",
    ],
    ids=["whole-list", "list-no-space", "prefix", "longer", "empty", "basic", "glued", "bare"],
)
async def test_with_several_tokens_anything_else_is_401(
    make_app: AppFactory, authorization: str
) -> None:
    app = await make_app(INTERNAL_API_TOKEN=ROTATION)
    response = await app.internal.get(
        f"{INTERNAL}/users/usr_x/sessions", headers={"Authorization": authorization}
    )
    assert response.status_code == 401
    assert error_code(response) == "unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"
