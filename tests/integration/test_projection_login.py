"""The login flow and the gateway projection (CONTRACT §5 rule 5, §9): what a confirm
publishes, partial failures repaired by an identical retry, and the per-user session
limit. In process over a real redis-server."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from authsession.services.users_stub import stub_user_id
from tests.contract import STREAM, index_key, session_key
from tests.integration.conftest import AppEnv, AppFactory
from tests.integration.test_confirm import confirm, issue, session_keys, session_record
from tests.integration.test_send_email_code import (
    PREFIX,
    FakeMail,
    FakeUsers,
    assert_error,
    challenge_record,
    ms,
    parse_ts,
    sha256_hex,
)

SNAPSHOT_PREFIX = "gateway:session:"
SNAPSHOT_FIELDS = {
    "device_session_id",
    "user_id",
    "status",
    "token_sha256",
    "created_at",
    "expires_at",
    "revoked_at",
    "revoke_reason",
    "version",
    "published_at",
}
EVENT_FIELDS = {"event", "device_session_id", "user_id", "status", "version", "snapshot"}


def snapshot(app: AppEnv, device_session_id: str) -> dict[str, Any] | None:
    raw = app.redis.get(SNAPSHOT_PREFIX + device_session_id)
    if raw is None:
        return None
    document: dict[str, Any] = json.loads(str(raw))
    return document


def events_for(app: AppEnv, device_session_id: str) -> list[dict[str, str]]:
    return [
        fields
        for _, fields in cast(Any, app.redis.xrange(STREAM))
        if fields.get("device_session_id") == device_session_id
    ]


def assert_ttl_until(app: AppEnv, key: str, deadline: datetime) -> None:
    expected_ms = (deadline - datetime.now(UTC)).total_seconds() * 1000
    ttl_ms = app.redis.pttl(key)
    assert abs(ttl_ms - expected_ms) <= 2000, (key, ttl_ms, expected_ms)


async def test_confirm_publishes_the_snapshot_key_and_one_stream_event(
    make_app: AppFactory,
) -> None:
    mail = FakeMail()
    app = await make_app(users=FakeUsers({"jane@example.com": "usr-jane"}), mail=mail)
    challenge_id, code = await issue(app, mail)
    now = app.clock.now()

    body = (await confirm(app, challenge_id, code)).json()

    dsid, token = body["device_session_id"], body["session_token"]
    document = snapshot(app, dsid)
    assert document is not None
    assert set(document) == SNAPSHOT_FIELDS
    assert document["device_session_id"] == dsid
    assert document["user_id"] == "usr-jane"
    assert document["status"] == "active"
    assert document["token_sha256"] == sha256_hex(token)
    assert document["version"] == 1
    assert document["revoked_at"] is None
    assert document["revoke_reason"] is None
    assert parse_ts(document["created_at"]) == ms(now)
    assert parse_ts(document["expires_at"]) == ms(now + timedelta(hours=720))
    assert parse_ts(document["published_at"]) == ms(now)
    assert_ttl_until(app, SNAPSHOT_PREFIX + dsid, now + timedelta(hours=720))
    assert token not in str(app.redis.get(SNAPSHOT_PREFIX + dsid))

    events = events_for(app, dsid)
    assert len(events) == 1
    event = events[0]
    assert set(event) == EVENT_FIELDS
    assert event["event"] == "session_snapshot"
    assert event["user_id"] == "usr-jane"
    assert event["status"] == "active"
    assert event["version"] == "1"
    assert json.loads(event["snapshot"]) == document


async def test_projection_failure_is_503_and_the_identical_retry_completes_it(
    make_app: AppFactory,
) -> None:
    mail = FakeMail()
    app = await make_app(users=FakeUsers({"jane@example.com": "usr-jane"}), mail=mail)
    challenge_id, code = await issue(app, mail)
    app.redis.set(STREAM, "x")  # the stream key holds the wrong type: XADD fails

    failed = await confirm(app, challenge_id, code)

    assert_error(failed, 503, "service_unavailable")
    challenge = challenge_record(app, challenge_id)
    assert challenge["status"] == "confirmed_pending_expire"
    dsid = challenge["device_session_id"]
    assert session_keys(app) == [session_key(dsid, PREFIX)]  # the source of truth is written

    app.redis.delete(STREAM)
    retry = await confirm(app, challenge_id, code)

    assert retry.status_code == 200, retry.text
    body = retry.json()
    assert body["device_session_id"] == dsid
    assert body["session_token"] == challenge["session_token"]
    assert body["created"] is False
    assert session_keys(app) == [session_key(dsid, PREFIX)]
    document = snapshot(app, dsid)
    assert document is not None
    assert document["status"] == "active"
    assert document["version"] == 1
    assert document["token_sha256"] == sha256_hex(body["session_token"])
    assert_ttl_until(app, SNAPSHOT_PREFIX + dsid, parse_ts(body["expires_at"]))
    events = events_for(app, dsid)
    assert len(events) == 1
    assert set(events[0]) == EVENT_FIELDS
    assert events[0]["event"] == "session_snapshot"
    assert events[0]["status"] == "active"
    assert events[0]["version"] == "1"
    assert events[0]["user_id"] == "usr-jane"
    assert json.loads(events[0]["snapshot"]) == document


async def test_session_write_failure_after_the_transition_is_503_and_the_retry_completes_it(
    make_app: AppFactory,
) -> None:
    mail = FakeMail()
    app = await make_app(users=FakeUsers({"jane@example.com": "usr-jane"}), mail=mail)
    challenge_id, code = await issue(app, mail)
    index = index_key("usr-jane", PREFIX)
    app.redis.set(index, "x")  # the user index holds the wrong type: the write fails

    assert_error(await confirm(app, challenge_id, code), 503, "service_unavailable")
    challenge = challenge_record(app, challenge_id)
    assert challenge["status"] == "confirmed_pending_expire"
    dsid = challenge["device_session_id"]
    assert session_keys(app) == []
    assert snapshot(app, dsid) is None

    app.redis.delete(index)
    retry = await confirm(app, challenge_id, code)

    assert retry.status_code == 200, retry.text
    assert retry.json()["device_session_id"] == dsid
    assert retry.json()["session_token"] == challenge["session_token"]
    assert session_record(app, dsid)["status"] == "active"
    assert app.redis.zrange(index, 0, -1) == [dsid]
    document = snapshot(app, dsid)
    assert document is not None
    assert document["status"] == "active"
    assert len(events_for(app, dsid)) == 1


async def test_session_limit_revokes_the_oldest_session_in_redis_and_the_projection(
    make_app: AppFactory,
) -> None:
    app = await make_app(MAX_ACTIVE_SESSIONS_PER_USER=2, RESEND_COOLDOWN="1ms")
    user_id = stub_user_id("jane@example.com")
    logins = []
    for _ in range(3):
        await asyncio.sleep(0.005)  # past the 1ms resend cooldown
        logins.append(await app.login("jane@example.com"))
        app.clock.advance(timedelta(seconds=1))
    oldest, second, newest = (b["device_session_id"] for b in logins)

    record = session_record(app, oldest)
    assert record["status"] == "revoked"
    assert record["revoke_reason"] == "session_limit"
    assert record["version"] == "2"
    assert parse_ts(record["revoked_at"]) == ms(app.clock.now() - timedelta(seconds=1))
    for dsid in (second, newest):
        assert session_record(app, dsid)["status"] == "active"
        assert session_record(app, dsid)["version"] == "1"

    document = snapshot(app, oldest)
    assert document is not None
    assert document["status"] == "revoked"
    assert document["revoke_reason"] == "session_limit"
    assert document["version"] == 2
    assert document["revoked_at"] is not None
    events = events_for(app, oldest)
    assert [(e["status"], e["version"]) for e in events] == [("active", "1"), ("revoked", "2")]
    assert json.loads(events[-1]["snapshot"]) == document

    listed = await app.internal.get(
        f"/api/v1/internal/users/{user_id}/sessions", params={"status": "active"}
    )
    assert [s["device_session_id"] for s in listed.json()["sessions"]] == [newest, second]


async def test_session_limit_keeps_revoking_the_oldest_active_session(
    make_app: AppFactory,
) -> None:
    app = await make_app(MAX_ACTIVE_SESSIONS_PER_USER=2, RESEND_COOLDOWN="1ms")
    ids = []
    for _ in range(4):
        await asyncio.sleep(0.005)  # past the 1ms resend cooldown
        ids.append((await app.login("jane@example.com"))["device_session_id"])
        app.clock.advance(timedelta(seconds=1))

    statuses = [
        (session_record(app, i)["status"], session_record(app, i).get("revoke_reason")) for i in ids
    ]
    assert statuses == [
        ("revoked", "session_limit"),
        ("revoked", "session_limit"),
        ("active", None),
        ("active", None),
    ]
    assert session_record(app, ids[0])["version"] == "2"  # revoked once, not twice


async def test_sessions_of_other_users_do_not_count_against_the_limit(
    make_app: AppFactory,
) -> None:
    app = await make_app(MAX_ACTIVE_SESSIONS_PER_USER=1)
    jane = await app.login("jane@example.com")
    john = await app.login("john@example.com")

    assert session_record(app, jane["device_session_id"])["status"] == "active"
    assert session_record(app, john["device_session_id"])["status"] == "active"


async def test_retry_after_a_failed_projection_republishes_the_session_limit_revocation(
    make_app: AppFactory,
) -> None:
    app = await make_app(MAX_ACTIVE_SESSIONS_PER_USER=1, RESEND_COOLDOWN="1ms")
    oldest = (await app.login("jane@example.com"))["device_session_id"]
    app.clock.advance(timedelta(seconds=1))
    await asyncio.sleep(0.005)
    challenge_id, code = await app.send_code("jane@example.com")
    assert code is not None
    app.redis.set(STREAM, "x")  # every publication fails from here

    assert_error(await app.confirm(challenge_id, code), 503, "service_unavailable")
    assert session_record(app, oldest)["status"] == "revoked"  # done in the source of truth

    app.redis.delete(STREAM)
    retry = await app.confirm(challenge_id, code)

    assert retry.status_code == 200, retry.text
    newest = retry.json()["device_session_id"]
    assert [(e["status"], e["version"]) for e in events_for(app, newest)] == [("active", "1")]
    # Gateways that follow the stream must learn that the oldest session was revoked.
    assert [(e["status"], e["version"]) for e in events_for(app, oldest)] == [("revoked", "2")]
