"""The projection invariant under faults (CONTRACT §12/§9), over a real redis-server.

For every session record the snapshot holds the record's status at its version or a
higher one, and a snapshot without a record is answered by a ``revoked`` one
(``source_lost``): after a failed write, the retry of any write path restores it, and the
reconciler finds and repairs what no retry came to fix.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import pytest
import redis
import redis.asyncio

from authsession.gateway import Principal, Rejection, SessionVerifier
from authsession.redis.reconciler import DriftKind
from authsession.services.users_stub import stub_user_id
from tests.contract import INTERNAL, SNAPSHOT_KEY, STREAM, error_code, session_key
from tests.integration.conftest import AppEnv, AppFactory
from tests.support.redis_server import RedisServer

EMAIL = "jane@example.com"


@dataclass
class AclUser:
    """A Redis ACL user the service connects as; its rules change during a test."""

    admin: redis.Redis
    name: str
    password: str

    @property
    def credentials(self) -> tuple[str, str]:
        return self.name, self.password

    def rules(self, *rules: str) -> None:
        self.admin.execute_command("ACL", "SETUSER", self.name, *rules)


@pytest.fixture
def acl_user(redis_client: redis.Redis) -> Iterator[AclUser]:
    user = AclUser(redis_client, f"svc-{secrets.token_hex(4)}", secrets.token_hex(8))
    user.rules("on", f">{user.password}", "~*", "&*", "+@all")
    yield user
    redis_client.execute_command("ACL", "DELUSER", user.name)


async def login(app: AppEnv, email: str = EMAIL) -> dict[str, Any]:
    for key in app.redis.scan_iter("authsession:throttle*"):
        app.redis.delete(key)
    body = await app.login(email)
    app.clock.advance(timedelta(milliseconds=10))
    return body


def snapshot(app: AppEnv, sid: str) -> dict[str, Any] | None:
    raw = app.redis.get(SNAPSHOT_KEY.format(sid))
    return None if raw is None else cast(dict[str, Any], json.loads(cast(str, raw)))


def record(app: AppEnv, sid: str) -> dict[str, str]:
    return cast(dict[str, str], app.redis.hgetall(session_key(sid)))


def events(app: AppEnv, sid: str) -> list[tuple[str, str]]:
    entries = cast(list[tuple[str, dict[str, str]]], app.redis.xrange(STREAM))
    return [(f["status"], f["version"]) for _, f in entries if f["device_session_id"] == sid]


def pending_markers(app: AppEnv) -> list[str]:
    return [str(k) for k in app.redis.scan_iter("authsession:projection_pending:*")]


async def verify(redis_server: RedisServer, app: AppEnv, token: str) -> Principal | Rejection:
    client = redis.asyncio.Redis(
        host=redis_server.host, port=redis_server.port, decode_responses=True
    )
    try:
        return await SessionVerifier(client, clock=app.clock.now).verify(token)
    finally:
        await client.aclose()


# ------------------------------------------------------------------ retried bulk revokes
@pytest.mark.parametrize("path", ["sessions/revoke", "block"])
async def test_a_retried_revoke_all_or_block_republishes_what_the_first_call_left_active(
    make_app: AppFactory, acl_user: AclUser, redis_server: RedisServer, path: str
) -> None:
    app = await make_app(redis_user=acl_user.credentials)
    first, second = await login(app), await login(app)
    user_id = stub_user_id(EMAIL)
    # The service's Redis user loses its rights on the projection keys for a moment.
    acl_user.rules("resetkeys", "~authsession:*")
    failed = await app.internal.post(f"{INTERNAL}/users/{user_id}/{path}", json={})
    assert failed.status_code == 503, failed.text
    assert error_code(failed) == "service_unavailable"
    for body in (first, second):
        assert record(app, body["device_session_id"])["status"] == "revoked"
        assert snapshot(app, body["device_session_id"])["status"] == "active"  # type: ignore[index]
        # The fault: gateways still accept the revoked sessions.
        assert isinstance(await verify(redis_server, app, body["session_token"]), Principal)

    acl_user.rules("resetkeys", "~*")
    retried = await app.internal.post(f"{INTERNAL}/users/{user_id}/{path}", json={})

    assert retried.status_code == 200, retried.text
    assert retried.json()["revoked_session_ids"] == []  # the first call revoked them
    for body in (first, second):
        sid = body["device_session_id"]
        held = snapshot(app, sid)
        assert held is not None
        assert (held["status"], held["version"]) == ("revoked", 2)
        assert events(app, sid) == [("active", "1"), ("revoked", "2")]
        assert await verify(redis_server, app, body["session_token"]) == Rejection("revoked")
    # A further retry finds nothing lagging and appends nothing.
    again = await app.internal.post(f"{INTERNAL}/users/{user_id}/{path}", json={})
    assert again.status_code == 200
    assert all(len(events(app, b["device_session_id"])) == 2 for b in (first, second))


async def test_a_missing_event_is_appended_by_the_retry(
    make_app: AppFactory, acl_user: AclUser
) -> None:
    # The snapshot is written, the event is not (XADD refused): the revoke answers 503.
    app = await make_app(redis_user=acl_user.credentials)
    body = await login(app)
    sid = body["device_session_id"]
    acl_user.rules("-xadd")
    failed = await app.internal.post(f"{INTERNAL}/sessions/{sid}/revoke", json={})
    assert failed.status_code == 503
    assert snapshot(app, sid)["status"] == "revoked"  # type: ignore[index]
    assert events(app, sid) == [("active", "1")]
    assert len(pending_markers(app)) == 1

    acl_user.rules("+xadd")
    # Even a bulk retry, which appends nothing for an up-to-date snapshot, appends this one.
    retried = await app.internal.post(f"{INTERNAL}/users/{body['user_id']}/sessions/revoke")
    assert retried.status_code == 200
    assert events(app, sid) == [("active", "1"), ("revoked", "2")]
    assert pending_markers(app) == []


async def test_a_confirm_replay_appends_an_event_only_when_the_projection_lags(
    make_app: AppFactory, acl_user: AclUser
) -> None:
    app = await make_app(redis_user=acl_user.credentials)
    for key in app.redis.scan_iter("authsession:throttle*"):
        app.redis.delete(key)
    challenge_id, code = await app.send_code(EMAIL)
    assert code is not None
    acl_user.rules("-xadd")
    assert (await app.confirm(challenge_id, code)).status_code == 503
    acl_user.rules("+xadd")
    first = await app.confirm(challenge_id, code)
    assert first.status_code == 200
    sid = first.json()["device_session_id"]
    assert events(app, sid) == [("active", "1")]  # the replay completed the publication
    for _ in range(3):
        assert (await app.confirm(challenge_id, code)).status_code == 200
    assert events(app, sid) == [("active", "1")]  # up to date: nothing appended again


# ------------------------------------------------------------------ lost source records
async def test_revoking_a_lost_session_takes_its_token_back(
    make_app: AppFactory, redis_server: RedisServer
) -> None:
    app = await make_app()
    body = await login(app)
    sid = body["device_session_id"]
    app.redis.delete(session_key(sid))  # the record is lost, the snapshot survives

    response = await app.internal.post(f"{INTERNAL}/sessions/{sid}/revoke", json={})

    assert response.status_code == 404
    assert error_code(response) == "session_not_found"
    held = snapshot(app, sid)
    assert held is not None
    assert (held["status"], held["version"], held["revoke_reason"]) == (
        "revoked",
        2,
        "source_lost",
    )
    assert events(app, sid)[-1] == ("revoked", "2")
    assert await verify(redis_server, app, body["session_token"]) == Rejection("revoked")
    # Repeating it changes nothing more.
    assert (await app.internal.post(f"{INTERNAL}/sessions/{sid}/revoke")).status_code == 404
    assert snapshot(app, sid) == held


async def test_extending_a_session_whose_revocation_was_not_projected_republishes_it(
    make_app: AppFactory, acl_user: AclUser, redis_server: RedisServer
) -> None:
    app = await make_app(redis_user=acl_user.credentials)
    body = await login(app)
    sid = body["device_session_id"]
    acl_user.rules("resetkeys", "~authsession:*")
    failed = await app.internal.post(f"{INTERNAL}/sessions/{sid}/revoke", json={})
    assert failed.status_code == 503, failed.text
    assert snapshot(app, sid)["status"] == "active"  # type: ignore[index]
    acl_user.rules("resetkeys", "~*")

    response = await app.internal.post(f"{INTERNAL}/sessions/{sid}/extend", json={})

    assert response.status_code == 409, response.text
    assert error_code(response) == "session_revoked"
    held = snapshot(app, sid)
    assert held is not None
    assert (held["status"], held["version"]) == ("revoked", 2)
    assert events(app, sid) == [("active", "1"), ("revoked", "2")]
    assert await verify(redis_server, app, body["session_token"]) == Rejection("revoked")
    # Extending again finds the projection current and appends nothing.
    assert (await app.internal.post(f"{INTERNAL}/sessions/{sid}/extend")).status_code == 409
    assert len(events(app, sid)) == 2


async def test_extending_a_lost_session_takes_its_token_back(
    make_app: AppFactory, redis_server: RedisServer
) -> None:
    app = await make_app()
    body = await login(app)
    sid = body["device_session_id"]
    app.redis.delete(session_key(sid))

    response = await app.internal.post(f"{INTERNAL}/sessions/{sid}/extend", json={})

    assert response.status_code == 404
    assert error_code(response) == "session_not_found"
    held = snapshot(app, sid)
    assert held is not None
    assert (held["status"], held["revoke_reason"]) == ("revoked", "source_lost")
    assert await verify(redis_server, app, body["session_token"]) == Rejection("revoked")


@pytest.mark.parametrize("path", ["sessions/revoke", "block"])
async def test_revoke_all_and_block_take_back_the_tokens_of_lost_records(
    make_app: AppFactory, redis_server: RedisServer, path: str
) -> None:
    app = await make_app()
    lost, kept = await login(app), await login(app)
    app.redis.delete(session_key(lost["device_session_id"]))  # the index still lists it
    user_id = stub_user_id(EMAIL)

    response = await app.internal.post(f"{INTERNAL}/users/{user_id}/{path}", json={})

    assert response.status_code == 200, response.text
    assert response.json()["revoked_session_ids"] == [kept["device_session_id"]]
    held = snapshot(app, lost["device_session_id"])
    assert held is not None
    assert (held["status"], held["revoke_reason"]) == ("revoked", "source_lost")
    for body in (lost, kept):
        assert await verify(redis_server, app, body["session_token"]) == Rejection("revoked")


# ------------------------------------------------------------------ the reconciler
async def test_the_reconciler_reports_every_kind_of_drift_and_repairs_it(
    make_app: AppFactory,
) -> None:
    app = await make_app()
    missing, revoked, stale, orphan, unevented, fine = [
        (await login(app, f"user{n}@example.com"))["device_session_id"] for n in range(6)
    ]
    app.redis.delete(SNAPSHOT_KEY.format(missing))
    app.redis.hset(
        session_key(revoked),
        mapping={
            "status": "revoked",
            "revoked_at": "2030-01-01T00:00:00.000Z",
            "revoke_reason": "revoked_by_backend",
            "version": "2",
        },
    )
    app.redis.hset(session_key(stale), "version", "3")
    app.redis.delete(session_key(orphan))
    marker = f"authsession:projection_pending:{{{SNAPSHOT_KEY.format(unevented)}}}"
    app.redis.set(marker, "1:0")  # set long ago, its event never appended
    events_before = len(events(app, unevented))

    report = await app.core.reconciler.run(repair=False)

    assert report.found == {
        DriftKind.MISSING_SNAPSHOT: 1,
        DriftKind.ACTIVE_BUT_REVOKED: 1,
        DriftKind.STALE_VERSION: 1,
        DriftKind.ORPHAN: 1,
        DriftKind.MISSING_EVENT: 1,
    }
    assert report.repaired == 0
    assert snapshot(app, missing) is None  # a check repairs nothing

    repaired = await app.core.reconciler.run(repair=True)
    assert repaired.drift == 5
    assert repaired.repaired == 5
    assert (await app.core.reconciler.run(repair=False)).drift == 0

    assert snapshot(app, missing)["version"] == 1  # type: ignore[index]
    assert snapshot(app, revoked)["status"] == "revoked"  # type: ignore[index]
    assert snapshot(app, stale)["version"] == 3  # type: ignore[index]
    lost = snapshot(app, orphan)
    assert lost is not None
    assert (lost["status"], lost["revoke_reason"]) == ("revoked", "source_lost")
    assert len(events(app, unevented)) == events_before + 1
    assert app.redis.get(marker) is None
    assert snapshot(app, fine)["version"] == 1  # type: ignore[index]
    assert events(app, fine) == [("active", "1")]


async def test_the_reconciler_leaves_a_fresh_pending_marker_to_its_publication(
    make_app: AppFactory,
) -> None:
    app = await make_app()
    sid = (await login(app))["device_session_id"]
    marker = f"authsession:projection_pending:{{{SNAPSHOT_KEY.format(sid)}}}"
    now_ms = int(app.clock.now().timestamp() * 1000)
    app.redis.set(marker, f"1:{now_ms}")  # a publication in flight right now
    assert (await app.core.reconciler.run(repair=True)).drift == 0
    app.clock.advance(timedelta(seconds=11))
    assert (await app.core.reconciler.run(repair=True)).found[DriftKind.MISSING_EVENT] == 1


async def test_the_reconciler_scans_in_batches(make_app: AppFactory) -> None:
    app = await make_app()
    sids = [(await login(app, f"u{n}@example.com"))["device_session_id"] for n in range(7)]
    for sid in sids:
        app.redis.delete(SNAPSHOT_KEY.format(sid))
    from authsession.redis.reconciler import ProjectionReconciler

    small = ProjectionReconciler(
        app.core.redis,
        app.core.reconciler._keys,
        app.core.reconciler._publisher,
        app.core.sessions.publish,
        app.clock,
        batch=2,
    )
    report = await small.run(repair=True)
    assert report.found[DriftKind.MISSING_SNAPSHOT] == 7
    assert report.sessions == 7
    assert all(snapshot(app, sid) is not None for sid in sids)


# ------------------------------------------------------------------ the session limit
@pytest.mark.parametrize("limit", [1, 2, 5])
async def test_concurrent_confirms_leave_exactly_the_newest_sessions_active(
    make_app: AppFactory, limit: int
) -> None:
    app = await make_app(MAX_ACTIVE_SESSIONS_PER_USER=limit)
    user_id = stub_user_id(EMAIL)
    for _round in range(4):
        challenges = []
        for _ in range(20):
            for key in app.redis.scan_iter("authsession:throttle*"):
                app.redis.delete(key)
            challenge_id, code = await app.send_code(EMAIL)
            assert code is not None
            challenges.append((challenge_id, code))
        answers = await asyncio.gather(*(app.confirm(c, k) for c, k in challenges))
        assert [a.status_code for a in answers] == [200] * 20, [a.text for a in answers]
        ours = {a.json()["device_session_id"] for a in answers}
        assert len(ours) == 20
        listed = await app.internal.get(f"{INTERNAL}/users/{user_id}/sessions")
        sessions = [s for s in listed.json()["sessions"] if s["device_session_id"] in ours]
        newest_first = sorted(sessions, key=lambda s: s["created_at"], reverse=True)
        active = [s for s in sessions if s["status"] == "active"]
        assert len(active) == limit
        # The active ones are the newest; every other was revoked by the limit, never
        # in favour of an older session.
        assert {s["device_session_id"] for s in newest_first[:limit]} == {
            s["device_session_id"] for s in active
        }
        assert all(s["revoke_reason"] == "session_limit" for s in newest_first[limit:])
        assert len({s["created_at"] for s in sessions}) == len(sessions)
        # The projection agrees with the source of truth.
        for s in sessions:
            held = snapshot(app, s["device_session_id"])
            assert held is not None
            assert (held["status"], held["version"]) == (s["status"], s["version"])
        revoked = await app.internal.post(f"{INTERNAL}/users/{user_id}/sessions/revoke")
        assert revoked.status_code == 200


# ------------------------------------------------------------------ the periodic run
async def test_a_lease_has_one_holder_until_it_runs_out(make_app: AppFactory) -> None:
    app = await make_app()
    from authsession.redis.base import Lease

    key = "authsession:lease:test"
    first = Lease(app.core.redis, key, timedelta(milliseconds=300))
    second = Lease(app.core.redis, key, timedelta(milliseconds=300))
    assert await first.hold()
    assert not await second.hold()
    assert await first.hold()  # the holder renews
    await asyncio.sleep(0.4)
    assert await second.hold()  # run out: taken over
    assert not await first.hold()


async def test_the_periodic_reconciler_repairs_drift_in_the_background(
    make_app: AppFactory,
) -> None:
    replicas = [await make_app(PROJECTION_RECONCILE_INTERVAL="100ms") for _ in range(2)]
    app = replicas[0]
    sid = (await login(app))["device_session_id"]
    app.redis.delete(session_key(sid))  # the record is lost: an orphan snapshot
    for replica in replicas:
        replica.core.start_background()
    try:
        for _ in range(50):
            held = snapshot(app, sid)
            if held is not None and held["status"] == "revoked":
                break
            await asyncio.sleep(0.05)
    finally:
        for replica in replicas:
            await replica.core.aclose()  # stops its jobs first; the fixture's close is a no-op
    held = snapshot(app, sid)
    assert held is not None
    assert (held["status"], held["revoke_reason"], held["version"]) == ("revoked", "source_lost", 2)
    # One revocation was published, whichever replica held the lease.
    assert events(app, sid) == [("active", "1"), ("revoked", "2")]
