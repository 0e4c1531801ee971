"""Gateway projection ordering and failure (CONTRACT §9), over a real redis-server.

A publication never replaces a snapshot of a higher version; the same version rewrites
nothing but appends the event again; the key is written before the event; a projection
failure is a 503 that an identical retry repairs.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any, cast

from authsession.domain.units import format_time, parse_time
from tests.contract import INTERNAL, SNAPSHOT_KEY, STREAM, error_code, session_key
from tests.integration.conftest import AppEnv


async def login(app: AppEnv, email: str = "jane@example.com") -> tuple[str, str, str]:
    """A full login; the device session id, the challenge id and the code."""
    for key in app.redis.scan_iter("authsession:throttle*"):
        app.redis.delete(key)
    challenge_id, code = await app.send_code(email)
    assert code is not None
    response = await app.confirm(challenge_id, code)
    assert response.status_code == 200, response.text
    app.clock.advance(timedelta(seconds=1))
    return response.json()["device_session_id"], challenge_id, code


def raw_snapshot(app: AppEnv, device_session_id: str) -> str | None:
    return cast(str | None, app.redis.get(SNAPSHOT_KEY.format(device_session_id)))


def snapshot(app: AppEnv, device_session_id: str) -> dict[str, Any]:
    raw = raw_snapshot(app, device_session_id)
    assert raw is not None
    doc: dict[str, Any] = json.loads(raw)
    return doc


def events(app: AppEnv, device_session_id: str) -> list[dict[str, str]]:
    entries = cast(list[tuple[str, dict[str, str]]], app.redis.xrange(STREAM))
    return [f for _, f in entries if f.get("device_session_id") == device_session_id]


def plant_snapshot(app: AppEnv, device_session_id: str, version: int) -> str:
    """Write a snapshot of ``version`` straight into the key (as a newer writer would)."""
    doc = snapshot(app, device_session_id)
    doc.update(version=version, published_at="2099-01-01T00:00:00.000Z")
    raw = json.dumps(doc, separators=(",", ":"))
    app.redis.set(SNAPSHOT_KEY.format(device_session_id), raw, px=3_600_000)
    return raw


# --------------------------------------------------------------------------- ordering


async def test_revoke_never_replaces_a_higher_version(app: AppEnv) -> None:
    sid, _, _ = await login(app)
    planted = plant_snapshot(app, sid, 5)
    expiry = app.redis.pexpiretime(SNAPSHOT_KEY.format(sid))
    events_before = len(events(app, sid))

    response = await app.internal.post(f"{INTERNAL}/sessions/{sid}/revoke")

    assert response.status_code == 200
    assert response.json()["version"] == 2
    assert app.redis.hget(session_key(sid), "status") == "revoked"
    assert raw_snapshot(app, sid) == planted
    assert app.redis.pexpiretime(SNAPSHOT_KEY.format(sid)) == expiry
    assert len(events(app, sid)) == events_before


async def test_extend_never_replaces_a_higher_version(app: AppEnv) -> None:
    sid, _, _ = await login(app)
    planted = plant_snapshot(app, sid, 9)
    events_before = len(events(app, sid))

    response = await app.internal.post(f"{INTERNAL}/sessions/{sid}/extend", json={"ttl": "2h"})

    assert response.status_code == 200
    assert response.json()["version"] == 2
    assert raw_snapshot(app, sid) == planted
    assert len(events(app, sid)) == events_before


async def test_late_publication_of_an_older_version_is_dropped(app: AppEnv) -> None:
    sid, _, _ = await login(app)
    active_v1 = await app.core.sessions.get(sid)
    revoked = await app.internal.post(f"{INTERNAL}/sessions/{sid}/revoke")
    assert revoked.status_code == 200
    current = raw_snapshot(app, sid)
    events_before = len(events(app, sid))
    app.clock.advance(timedelta(minutes=1))

    # A publication of the active version 1 that arrives after the revocation.
    await app.core.sessions.publish(active_v1)

    assert raw_snapshot(app, sid) == current
    assert snapshot(app, sid)["status"] == "revoked"
    assert snapshot(app, sid)["version"] == 2
    assert len(events(app, sid)) == events_before


async def test_late_extend_publication_cannot_unrevoke(app: AppEnv) -> None:
    """An extend (v2) whose publication is overtaken by a revoke (v3)."""
    sid, _, _ = await login(app)
    extended = await app.internal.post(f"{INTERNAL}/sessions/{sid}/extend", json={"ttl": "1h"})
    assert extended.status_code == 200
    extended_v2 = await app.core.sessions.get(sid)
    app.redis.delete(SNAPSHOT_KEY.format(sid))  # as if v2 had not been published yet
    await app.internal.post(f"{INTERNAL}/sessions/{sid}/revoke")
    events_before = len(events(app, sid))

    await app.core.sessions.publish(extended_v2)

    doc = snapshot(app, sid)
    assert doc["status"] == "revoked"
    assert doc["version"] == 3
    assert len(events(app, sid)) == events_before


async def test_same_version_rewrites_nothing_but_appends_the_event(app: AppEnv) -> None:
    sid, _, _ = await login(app)
    key = SNAPSHOT_KEY.format(sid)
    before = raw_snapshot(app, sid)
    expiry = app.redis.pexpiretime(key)
    count = len(events(app, sid))
    app.clock.advance(timedelta(minutes=3))

    await app.core.sessions.publish(await app.core.sessions.get(sid))

    assert raw_snapshot(app, sid) == before  # published_at not rewritten
    assert app.redis.pexpiretime(key) == expiry
    appended = events(app, sid)
    assert len(appended) == count + 1
    assert appended[-1]["version"] == "1"
    assert appended[-1]["status"] == "active"
    assert appended[-1]["event"] == "session_snapshot"


async def test_republished_event_carries_the_snapshot_the_key_holds(app: AppEnv) -> None:
    sid, _, _ = await login(app)
    app.clock.advance(timedelta(minutes=3))
    await app.core.sessions.publish(await app.core.sessions.get(sid))
    assert events(app, sid)[-1]["snapshot"] == raw_snapshot(app, sid)


async def test_each_new_version_is_written_with_its_own_published_at(app: AppEnv) -> None:
    sid, _, _ = await login(app)
    first = snapshot(app, sid)
    app.clock.advance(timedelta(minutes=2))
    await app.internal.post(f"{INTERNAL}/sessions/{sid}/revoke")
    second = snapshot(app, sid)
    assert second["version"] == first["version"] + 1
    assert second["published_at"] == format_time(app.clock.now())
    assert parse_time(second["published_at"]) > parse_time(first["published_at"])
    assert events(app, sid)[-1]["snapshot"] == raw_snapshot(app, sid)


# --------------------------------------------------------------------------- failures


async def test_broken_stream_revoke_is_503_then_retry_repairs(app: AppEnv) -> None:
    sid, _, _ = await login(app)
    app.redis.delete(STREAM)
    app.redis.set(STREAM, "not a stream")  # XADD now fails with WRONGTYPE
    revoked_at = format_time(app.clock.now())

    failed = await app.internal.post(f"{INTERNAL}/sessions/{sid}/revoke")

    assert failed.status_code == 503
    assert error_code(failed) == "service_unavailable"
    record = app.redis.hgetall(session_key(sid))
    assert record["status"] == "revoked"
    assert record["revoked_at"] == revoked_at
    assert record["version"] == "2"
    # The key is written before the event: it already holds the revoked version.
    assert snapshot(app, sid)["status"] == "revoked"
    assert snapshot(app, sid)["version"] == 2

    app.redis.delete(STREAM)
    app.clock.advance(timedelta(minutes=1))
    retried = await app.internal.post(f"{INTERNAL}/sessions/{sid}/revoke")

    assert retried.status_code == 200
    body = retried.json()
    assert body["status"] == "revoked"
    assert body["revoked_at"] == revoked_at
    assert body["version"] == 2
    assert app.redis.hget(session_key(sid), "version") == "2"
    appended = events(app, sid)
    assert len(appended) == 1
    assert appended[0]["status"] == "revoked"
    assert appended[0]["version"] == "2"
    assert snapshot(app, sid)["status"] == "revoked"


async def test_broken_snapshot_key_revoke_is_503_then_retry_repairs(app: AppEnv) -> None:
    sid, _, _ = await login(app)
    key = SNAPSHOT_KEY.format(sid)
    app.redis.delete(key)
    app.redis.hset(key, "not", "a string")  # GET in the publish script fails
    events_before = len(events(app, sid))

    failed = await app.internal.post(f"{INTERNAL}/sessions/{sid}/revoke")

    assert failed.status_code == 503
    assert error_code(failed) == "service_unavailable"
    assert app.redis.hget(session_key(sid), "status") == "revoked"
    assert len(events(app, sid)) == events_before  # no event without its key

    app.redis.delete(key)
    retried = await app.internal.post(f"{INTERNAL}/sessions/{sid}/revoke")

    assert retried.status_code == 200
    assert retried.json()["version"] == 2
    doc = snapshot(app, sid)
    assert doc["status"] == "revoked"
    assert doc["version"] == 2
    assert doc["revoke_reason"] == "revoked_by_backend"
    assert events(app, sid)[-1]["version"] == "2"


async def test_broken_stream_extend_is_503_and_record_is_extended(app: AppEnv) -> None:
    sid, _, _ = await login(app)
    app.redis.delete(STREAM)
    app.redis.set(STREAM, "not a stream")
    failed = await app.internal.post(f"{INTERNAL}/sessions/{sid}/extend", json={"ttl": "1h"})
    assert failed.status_code == 503
    assert error_code(failed) == "service_unavailable"
    assert app.redis.hget(session_key(sid), "version") == "2"
    assert snapshot(app, sid)["version"] == 2

    app.redis.delete(STREAM)
    retried = await app.internal.post(f"{INTERNAL}/sessions/{sid}/extend", json={"ttl": "1h"})
    assert retried.status_code == 200
    assert retried.json()["version"] == 3
    assert snapshot(app, sid)["version"] == 3
    assert [e["version"] for e in events(app, sid)] == ["3"]


async def test_broken_stream_confirm_is_503_then_identical_retry_completes(
    app: AppEnv,
) -> None:
    for key in app.redis.scan_iter("authsession:throttle*"):
        app.redis.delete(key)
    challenge_id, code = await app.send_code()
    assert code is not None
    app.redis.delete(STREAM)
    app.redis.set(STREAM, "not a stream")

    failed = await app.confirm(challenge_id, code)

    assert failed.status_code == 503
    assert error_code(failed) == "service_unavailable"
    challenge = app.redis.hgetall(f"authsession:challenge:{challenge_id}")
    assert challenge["status"] == "confirmed_pending_expire"
    sid = str(challenge["device_session_id"])

    app.redis.delete(STREAM)
    retried = await app.confirm(challenge_id, code)

    assert retried.status_code == 200
    assert retried.json()["device_session_id"] == sid
    assert app.redis.hget(session_key(sid), "version") == "1"
    assert snapshot(app, sid)["status"] == "active"
    assert [e["version"] for e in events(app, sid)] == ["1"]
