"""EventFollower against a real redis-server: version order, trimming, resync, outages."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import cast

import pytest
import redis.asyncio

from authsession.gateway import (
    EventFollower,
    Principal,
    Rejection,
    SessionSnapshot,
    SessionVerifier,
    parse_stream_id,
    trimmed_past,
)
from tests.gateway.conftest import (
    PREFIX,
    STREAM,
    AppFactory,
    Issued,
    Publish,
    async_client,
    eventually,
    issue,
    publisher_on,
)
from tests.support.redis_server import RedisServer

INTERNAL = "/api/v1/internal"


@asynccontextmanager
async def running(follower: EventFollower) -> AsyncIterator[asyncio.Task[None]]:
    """``follower.run()`` as a background task, stopped and awaited on exit."""
    task = asyncio.create_task(follower.run())
    try:
        yield task
    finally:
        follower.stop()
        await asyncio.wait_for(task, timeout=5)


def version_status(follower: EventFollower, device_session_id: str) -> tuple[int, str] | None:
    """``(version, status)`` of the follower's snapshot of a session, if any."""
    snapshot = follower.snapshot(device_session_id)
    return (snapshot.version, snapshot.status) if snapshot is not None else None


async def key_state(client: redis.asyncio.Redis) -> dict[str, SessionSnapshot]:
    """What the snapshot keys hold, parsed."""
    state: dict[str, SessionSnapshot] = {}
    async for key in client.scan_iter(match=PREFIX + "*", _type="STRING"):
        raw = await client.get(key)
        assert raw is not None
        state[key.removeprefix(PREFIX)] = SessionSnapshot.from_json(raw)
    return state


async def test_applies_events_in_version_order(
    aredis: redis.asyncio.Redis, publish: Publish
) -> None:
    follower = EventFollower(aredis, start_id="0", block_ms=50)
    issued = await publish(issue())
    v2 = await publish(issued.next(expires_at=issued.session.expires_at + timedelta(hours=1)))

    changed = await follower.poll()

    assert [s.version for s in changed] == [1, 2]
    held = follower.snapshot(issued.device_session_id)
    assert held is not None
    assert held.version == 2
    assert held.expires_at > issued.session.expires_at
    assert follower.position == (await aredis.xinfo_stream(STREAM))["last-generated-id"]
    assert v2.session.version == 2


async def test_ignores_lower_and_equal_versions(
    aredis: redis.asyncio.Redis, publish: Publish
) -> None:
    follower = EventFollower(aredis, start_id="0", block_ms=50)
    issued = await publish(issue())
    revoked = await publish(issued.revoked())
    await follower.poll()

    # Two replicas can append out of order: the key's compare-and-set keeps v2, but the
    # v1 event of the slower replica still lands after v2's event.
    v1_document = json.dumps(
        {
            **json.loads(cast(str, await aredis.get(PREFIX + issued.device_session_id))),
            "version": 1,
            "status": "active",
            "revoked_at": None,
            "revoke_reason": None,
        }
    )
    await aredis.xadd(
        STREAM,
        {
            "event": "session_snapshot",
            "device_session_id": issued.device_session_id,
            "user_id": issued.session.user_id,
            "status": "active",
            "version": "1",
            "snapshot": v1_document,
        },
    )
    # The same version republished (a retry) appends the event again.
    await publish(revoked)
    ignored_before = follower.ignored

    changed = await follower.poll()

    assert changed == []
    assert follower.ignored == ignored_before + 2
    held = follower.snapshot(issued.device_session_id)
    assert held is not None
    assert (held.version, held.status) == (2, "revoked")


async def test_starts_at_the_end_by_default(aredis: redis.asyncio.Redis, publish: Publish) -> None:
    before = await publish(issue())
    follower = EventFollower(aredis, block_ms=50)

    assert await follower.poll() == []
    after = await publish(issue())
    changed = await follower.poll()

    assert [s.device_session_id for s in changed] == [after.device_session_id]
    assert follower.snapshot(before.device_session_id) is None


async def test_starts_at_the_end_of_a_stream_that_does_not_exist_yet(
    aredis: redis.asyncio.Redis, publish: Publish
) -> None:
    follower = EventFollower(aredis, block_ms=50)
    assert await follower.poll() == []
    assert follower.position == "0-0"

    issued = await publish(issue())

    assert [s.device_session_id for s in await follower.poll()] == [issued.device_session_id]
    assert follower.resyncs == 0


async def test_skips_foreign_and_unreadable_events(
    aredis: redis.asyncio.Redis, publish: Publish
) -> None:
    follower = EventFollower(aredis, start_id="0", block_ms=50)
    await aredis.xadd(STREAM, {"event": "something_new", "device_session_id": "x"})
    await aredis.xadd(STREAM, {"event": "session_snapshot", "snapshot": "{broken"})
    issued = await publish(issue())

    changed = await follower.poll()

    assert [s.device_session_id for s in changed] == [issued.device_session_id]
    assert follower.ignored == 2


async def test_async_iteration_and_prompt_stop(
    aredis: redis.asyncio.Redis, publish: Publish
) -> None:
    # A long BLOCK: stop() must not wait it out.
    follower = EventFollower(aredis, block_ms=10_000)
    seen: list[SessionSnapshot] = []

    async def consume() -> None:
        async for snapshot in follower:
            seen.append(snapshot)

    task = asyncio.create_task(consume())
    await eventually(lambda: follower.fresh)
    issued = await publish(issue())
    await eventually(lambda: len(seen) == 1)

    started = time.monotonic()
    follower.stop()
    await asyncio.wait_for(task, timeout=2)

    assert time.monotonic() - started < 1.0
    assert seen[0].device_session_id == issued.device_session_id


async def test_resync_after_trimming(
    redis_server: RedisServer, aredis: redis.asyncio.Redis
) -> None:
    publisher = publisher_on(aredis, maxlen=10)
    sessions = [issue() for _ in range(20)]
    first_id: str | None = None
    # 20 sessions x 12 versions = 240 events: MAXLEN ~ trims whole 100-entry nodes, so
    # the stream ends up with far fewer entries than were appended.
    latest: dict[str, Issued] = {}
    for round_ in range(12):
        for index, issued in enumerate(sessions):
            current = latest.get(issued.device_session_id, issued)
            if round_:
                current = current.next()
            if round_ == 11 and index % 3 == 0:
                current = current.revoked()
            latest[issued.device_session_id] = current
            await publisher.publish(current.session, datetime.now(UTC))
            if first_id is None:
                first_id = (await aredis.xinfo_stream(STREAM))["last-generated-id"]
    assert first_id is not None
    info = await aredis.xinfo_stream(STREAM)
    assert info["length"] < 240
    assert parse_stream_id(info["first-entry"][0]) > parse_stream_id(first_id)

    follower = EventFollower(aredis, start_id=first_id, block_ms=50)
    # The follower keeps only the sessions the gateway asked about.
    for issued in sessions:
        follower.track(issued.device_session_id)
    await follower.poll()

    assert follower.resyncs == 1
    assert follower.snapshots() == await key_state(aredis)
    assert follower.position == info["last-generated-id"]
    revoked = [s for s in follower.snapshots().values() if s.status == "revoked"]
    assert len(revoked) == 7
    assert {s.version for s in follower.snapshots().values()} == {12, 13}

    # It goes on from the end of the stream, without resyncing again.
    extra = issue()
    await publisher.publish(extra.session, datetime.now(UTC))
    changed = await follower.poll()
    assert [s.device_session_id for s in changed] == [extra.device_session_id]
    assert follower.resyncs == 1


async def test_no_resync_when_trimming_stays_behind_the_position(
    aredis: redis.asyncio.Redis,
) -> None:
    publisher = publisher_on(aredis, maxlen=10)
    follower = EventFollower(aredis, start_id="0", block_ms=50)
    # A follower that keeps up: the stream is trimmed many times, only behind it. (A
    # stream node holds a few snapshots only, stream-node-max-bytes being 4 KiB, so
    # MAXLEN ~ 10 keeps between 10 and about 20 entries.)
    for _ in range(60):
        for _ in range(5):
            await publisher.publish(issue().session, datetime.now(UTC))
        await follower.poll()
    info = await aredis.xinfo_stream(STREAM)

    assert info["length"] < 30
    assert follower.resyncs == 0
    assert len(follower.snapshots()) == 300
    assert follower.position == info["last-generated-id"]


def test_trimming_judged_from_xinfo() -> None:
    position = (100, 0)
    # The first entry left is newer than the position: entries may have been cut.
    assert trimmed_past({"first-entry": ("101-0", {}), "last-generated-id": "300-0"}, position)
    assert not trimmed_past({"first-entry": ("100-0", {}), "last-generated-id": "300-0"}, position)
    assert not trimmed_past({"first-entry": ("50-0", {}), "last-generated-id": "300-0"}, position)
    # Redis >= 7 counts the entries ever added: if all are there, nothing was cut.
    intact = {"first-entry": ("101-0", {}), "last-generated-id": "300-0", "length": 5}
    assert not trimmed_past({**intact, "entries-added": 5}, position)
    assert trimmed_past({**intact, "entries-added": 6}, position)
    # An empty stream: ids generated after the position are gone.
    assert trimmed_past({"first-entry": None, "last-generated-id": "300-0"}, position)
    assert not trimmed_past({"first-entry": None, "last-generated-id": "100-0"}, position)
    # XDEL after the position (Redis >= 7 reports the highest deleted id).
    info: dict[str, object] = {"first-entry": ("50-0", {}), "last-generated-id": "300-0"}
    assert trimmed_past({**info, "max-deleted-entry-id": "150-0"}, position)
    assert not trimmed_past({**info, "max-deleted-entry-id": "60-0"}, position)
    assert not trimmed_past({**info, "max-deleted-entry-id": "0-0"}, position)


@pytest.mark.parametrize("bad", ["", "abc", "1-2-3", "-1"])
def test_rejects_a_bad_start_id(aredis: redis.asyncio.Redis, bad: str) -> None:
    with pytest.raises(ValueError, match="stream id"):
        EventFollower(aredis, start_id=bad)


# --------------------------------------------------------------------------- as a cache


async def test_verifier_sees_a_revocation_through_the_follower(
    aredis: redis.asyncio.Redis, publish: Publish
) -> None:
    follower = EventFollower(aredis, block_ms=200)
    verifier = SessionVerifier(aredis, cache=follower)
    async with running(follower):
        await eventually(lambda: follower.fresh)
        issued = await publish(issue())
        await eventually(lambda: follower.snapshot(issued.device_session_id) is not None)
        assert isinstance(await verifier.verify(issued.token), Principal)

        await publish(issued.revoked())
        await eventually(
            lambda: version_status(follower, issued.device_session_id) == (2, "revoked")
        )
        # Gone from Redis, still known locally: the answer came from the follower.
        await aredis.delete(PREFIX + issued.device_session_id)
        assert await verifier.verify(issued.token) == Rejection("revoked")


async def test_an_active_snapshot_is_trusted_only_while_the_view_is_fresh(
    dedicated_redis: RedisServer,
) -> None:
    client = async_client(dedicated_redis)
    publisher = publisher_on(client)
    follower = EventFollower(client, block_ms=100, max_lag=0.1, retry_delays=(0.05, 0.05))
    try:
        async with running(follower):
            await eventually(lambda: follower.fresh)
            active = issue()
            revoked = issue()
            await publisher.publish(active.session, datetime.now(UTC))
            await publisher.publish(revoked.session, datetime.now(UTC))
            await publisher.publish(revoked.revoked().session, datetime.now(UTC))
            await eventually(
                lambda: version_status(follower, revoked.device_session_id) == (2, "revoked")
            )
            assert follower.cached(active.device_session_id) is not None

            dedicated_redis.kill()
            await eventually(lambda: not follower.fresh)

            assert follower.cached(active.device_session_id) is None
            assert follower.cached(revoked.device_session_id) is not None
            verifier = SessionVerifier(client, cache=follower)
            assert await verifier.verify(active.token) == Rejection("internal_error")
            assert await verifier.verify(revoked.token) == Rejection("revoked")
    finally:
        await client.aclose()


async def test_survives_a_redis_outage(dedicated_redis: RedisServer) -> None:
    client = async_client(dedicated_redis)
    follower = EventFollower(client, block_ms=100, retry_delays=(0.05, 0.1))
    try:
        async with running(follower) as task:
            await eventually(lambda: follower.fresh)
            dedicated_redis.kill()
            await eventually(lambda: not follower.fresh)
            await asyncio.sleep(0.2)
            assert not task.done()

            dedicated_redis.restart()  # empty: a new stream, ids after the old position
            # The restart is a reset (a new run id): the follower resyncs, then follows.
            await eventually(lambda: follower.resets == 1 and follower.fresh)
            issued = issue()
            await publisher_on(client).publish(issued.session, datetime.now(UTC))

            await eventually(lambda: follower.snapshot(issued.device_session_id) is not None)
            assert follower.fresh
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- end to end


async def test_sees_a_revocation_by_the_service(
    make_app: AppFactory, aredis: redis.asyncio.Redis
) -> None:
    app = await make_app()
    follower = EventFollower(aredis, block_ms=1000)
    async with running(follower):
        await eventually(lambda: follower.fresh)
        body = await app.login("gateway-follow@example.com")
        sid = body["device_session_id"]
        await eventually(lambda: follower.snapshot(sid) is not None)

        response = await app.internal.post(f"{INTERNAL}/sessions/{sid}/revoke")
        assert response.status_code == 200, response.text
        took = await eventually(lambda: version_status(follower, sid) == (2, "revoked"))

    held = follower.snapshot(sid)
    assert held is not None
    assert held.version == 2
    assert held.revoke_reason == "revoked_by_backend"
    assert took < 1.0
