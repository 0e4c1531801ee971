"""A revocation is permanent (CONTRACT §6): no later write makes the session active again.

Neither an idempotent confirm replay (§5 rule 3), nor an extend, nor a repeated revoke
changes a revoked record or its gateway snapshot back.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import timedelta
from typing import Any, cast

import pytest

from authsession.settings import Settings
from tests.contract import INTERNAL, SNAPSHOT_KEY, STREAM, error_code, session_key
from tests.integration.conftest import AppEnv, AppFactory


async def login(app: AppEnv, email: str = "jane@example.com") -> dict[str, Any]:
    """A full login; the confirm body plus ``challenge_id`` and ``code`` for replays."""
    for key in app.redis.scan_iter("authsession:throttle*"):
        app.redis.delete(key)
    challenge_id, code = await app.send_code(email)
    assert code is not None
    response = await app.confirm(challenge_id, code)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return {**body, "challenge_id": challenge_id, "code": code}


def record(app: AppEnv, sid: str) -> dict[str, str]:
    return cast(dict[str, str], app.redis.hgetall(session_key(sid)))


def snapshot(app: AppEnv, sid: str) -> dict[str, Any] | None:
    raw = app.redis.get(SNAPSHOT_KEY.format(sid))
    return None if raw is None else json.loads(raw)


def event_statuses(app: AppEnv, sid: str) -> list[tuple[str, str]]:
    entries = cast(list[tuple[str, dict[str, str]]], app.redis.xrange(STREAM))
    return [(f["status"], f["version"]) for _, f in entries if f.get("device_session_id") == sid]


async def revoke(app: AppEnv, sid: str, **body: Any) -> dict[str, Any]:
    response = await app.internal.post(f"{INTERNAL}/sessions/{sid}/revoke", json=body or None)
    assert response.status_code == 200, response.text
    revoked: dict[str, Any] = response.json()
    return revoked


def assert_still_revoked(app: AppEnv, sid: str, revoked: dict[str, Any]) -> None:
    """The record and the snapshot say exactly what the revocation wrote."""
    stored = record(app, sid)
    assert stored["status"] == "revoked"
    assert stored["revoked_at"] == revoked["revoked_at"]
    assert stored["revoke_reason"] == revoked["revoke_reason"]
    assert stored["version"] == str(revoked["version"])
    doc = snapshot(app, sid)
    assert doc is not None
    assert doc["status"] == "revoked"
    assert doc["version"] == revoked["version"]
    assert doc["revoked_at"] == revoked["revoked_at"]
    # Whatever was appended after the revocation says revoked too.
    statuses = event_statuses(app, sid)
    first_revoked = statuses.index(("revoked", str(revoked["version"])))
    assert all(status == "revoked" for status, _ in statuses[first_revoked:])


async def test_confirm_replay_after_revoke_is_409(app: AppEnv) -> None:
    item = await login(app)
    sid = item["device_session_id"]
    revoked = await revoke(app, sid)
    published_at = snapshot(app, sid)["published_at"]  # type: ignore[index]
    app.clock.advance(timedelta(minutes=1))  # still inside the idempotency window

    response = await app.confirm(item["challenge_id"], item["code"])

    assert response.status_code == 409
    assert error_code(response) == "session_revoked"
    assert "session_token" not in response.text
    assert_still_revoked(app, sid, revoked)
    # Same version: the key is not rewritten.
    assert snapshot(app, sid)["published_at"] == published_at  # type: ignore[index]


async def test_confirm_replays_never_change_the_revoked_record(app: AppEnv) -> None:
    item = await login(app)
    sid = item["device_session_id"]
    revoked = await revoke(app, sid, reason="stolen")
    stored = record(app, sid)
    for _ in range(3):
        app.clock.advance(timedelta(seconds=30))
        response = await app.confirm(item["challenge_id"], item["code"], device_name="new name")
        assert response.status_code == 409
        assert error_code(response) == "session_revoked"
    assert record(app, sid) == stored
    assert_still_revoked(app, sid, revoked)


async def test_concurrent_replays_after_revoke_answer_409(app: AppEnv) -> None:
    item = await login(app)
    sid = item["device_session_id"]
    revoked = await revoke(app, sid)
    responses = await asyncio.gather(
        *(app.confirm(item["challenge_id"], item["code"]) for _ in range(5))
    )
    assert [r.status_code for r in responses] == [409] * 5
    assert_still_revoked(app, sid, revoked)


async def test_extend_after_revoke_is_409_and_changes_nothing(app: AppEnv) -> None:
    item = await login(app)
    sid = item["device_session_id"]
    revoked = await revoke(app, sid)
    stored = record(app, sid)
    key_expiry = app.redis.pexpiretime(session_key(sid))
    snapshot_expiry = app.redis.pexpiretime(SNAPSHOT_KEY.format(sid))

    for body in (None, {"ttl": "1h"}):
        response = await app.internal.post(f"{INTERNAL}/sessions/{sid}/extend", json=body)
        assert response.status_code == 409
        assert error_code(response) == "session_revoked"

    assert record(app, sid) == stored
    assert app.redis.pexpiretime(session_key(sid)) == key_expiry
    assert app.redis.pexpiretime(SNAPSHOT_KEY.format(sid)) == snapshot_expiry
    assert_still_revoked(app, sid, revoked)


async def test_replay_then_extend_after_revoke_leave_it_revoked(app: AppEnv) -> None:
    item = await login(app)
    sid = item["device_session_id"]
    revoked = await revoke(app, sid)
    replay = await app.confirm(item["challenge_id"], item["code"])
    extend = await app.internal.post(f"{INTERNAL}/sessions/{sid}/extend")
    again = await app.internal.post(f"{INTERNAL}/sessions/{sid}/revoke", json={"reason": "x"})
    assert (replay.status_code, extend.status_code, again.status_code) == (409, 409, 200)
    read = await app.internal.get(f"{INTERNAL}/sessions/{sid}")
    assert read.json()["status"] == "revoked"
    assert read.json()["revoked_at"] == revoked["revoked_at"]
    assert read.json()["version"] == revoked["version"]
    assert_still_revoked(app, sid, revoked)


async def test_replay_after_revoke_all_is_409(app: AppEnv) -> None:
    item = await login(app)
    sid = item["device_session_id"]
    response = await app.internal.post(f"{INTERNAL}/users/{item['user_id']}/sessions/revoke")
    assert response.json()["revoked_session_ids"] == [sid]
    revoked = (await app.internal.get(f"{INTERNAL}/sessions/{sid}")).json()

    replay = await app.confirm(item["challenge_id"], item["code"])

    assert replay.status_code == 409
    assert error_code(replay) == "session_revoked"
    assert_still_revoked(app, sid, revoked)


async def test_replay_after_block_is_409(app: AppEnv) -> None:
    item = await login(app)
    sid = item["device_session_id"]
    response = await app.internal.post(f"{INTERNAL}/users/{item['user_id']}/block")
    assert response.json()["revoked_session_ids"] == [sid]
    revoked = (await app.internal.get(f"{INTERNAL}/sessions/{sid}")).json()
    assert revoked["revoke_reason"] == "user_blocked"

    replay = await app.confirm(item["challenge_id"], item["code"])

    assert replay.status_code == 409
    assert error_code(replay) == "session_revoked"
    assert_still_revoked(app, sid, revoked)


async def test_replay_after_revoke_republishes_a_lost_snapshot_as_revoked(app: AppEnv) -> None:
    item = await login(app)
    sid = item["device_session_id"]
    revoked = await revoke(app, sid)
    app.redis.delete(SNAPSHOT_KEY.format(sid))  # the gateway projection lost the key

    replay = await app.confirm(item["challenge_id"], item["code"])

    assert replay.status_code == 409
    assert_still_revoked(app, sid, revoked)
    assert event_statuses(app, sid)[-1] == ("revoked", str(revoked["version"]))


async def test_concurrent_revoke_and_extend_end_revoked(app: AppEnv) -> None:
    item = await login(app)
    sid = item["device_session_id"]
    results = await asyncio.gather(
        app.internal.post(f"{INTERNAL}/sessions/{sid}/extend", json={"ttl": "2h"}),
        app.internal.post(f"{INTERNAL}/sessions/{sid}/revoke"),
        app.internal.post(f"{INTERNAL}/sessions/{sid}/extend", json={"ttl": "3h"}),
    )
    assert results[1].status_code == 200
    assert all(r.status_code in (200, 409) for r in results)
    stored = record(app, sid)
    assert stored["status"] == "revoked"
    doc = snapshot(app, sid)
    assert doc is not None
    assert doc["status"] == "revoked"
    assert doc["version"] == int(stored["version"])


async def test_concurrent_revokes_revoke_once(app: AppEnv) -> None:
    item = await login(app)
    sid = item["device_session_id"]
    results = await asyncio.gather(
        *(
            app.internal.post(f"{INTERNAL}/sessions/{sid}/revoke", json={"reason": f"r{i}"})
            for i in range(5)
        )
    )
    assert [r.status_code for r in results] == [200] * 5
    bodies = [r.json() for r in results]
    assert len({(b["revoked_at"], b["revoke_reason"], b["version"]) for b in bodies}) == 1
    assert bodies[0]["version"] == 2
    assert record(app, sid)["version"] == "2"


def test_retention_shorter_than_the_replay_window_is_refused() -> None:
    # Otherwise a replay inside the window could find a revoked session's record gone
    # and write the session again, active.
    with pytest.raises(ValueError, match="CONFIRM_IDEMPOTENCY_WINDOW"):
        Settings(SESSION_RETENTION="1ms")  # type: ignore[call-arg]


async def test_replay_cannot_resurrect_a_revoked_session_whose_record_expired(
    make_app: AppFactory,
) -> None:
    # The shortest retention allowed: equal to the replay window.
    app = await make_app(SESSION_RETENTION="1s", CONFIRM_IDEMPOTENCY_WINDOW="1s")
    item = await login(app)
    sid = item["device_session_id"]
    extended = await app.internal.post(f"{INTERNAL}/sessions/{sid}/extend", json={"ttl": "1s"})
    assert extended.status_code == 200
    await revoke(app, sid)
    # Redis drops the record at expires_at + SESSION_RETENTION (real time).
    deadline = time.monotonic() + 5
    while app.redis.exists(session_key(sid)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not app.redis.exists(session_key(sid))
    app.clock.advance(timedelta(seconds=3))  # the record outlived the replay window

    replay = await app.confirm(item["challenge_id"], item["code"])

    assert replay.status_code == 410
    assert not app.redis.exists(session_key(sid))
    doc = snapshot(app, sid)
    assert doc is None or doc["status"] == "revoked"
