"""Fan-out and subscriptions of the EventFollower against a real redis-server."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio

from authsession.gateway import (
    EventFollower,
    FollowerOverflow,
    Principal,
    Rejection,
    SessionEnd,
    SessionSnapshot,
    SessionVerifier,
)
from tests.gateway.conftest import (
    PREFIX,
    Publish,
    async_client,
    eventually,
    issue,
    publisher_on,
    running,
)
from tests.support.redis_server import RedisServer


async def test_every_consumer_sees_every_change(
    aredis: redis.asyncio.Redis, publish: Publish
) -> None:
    # run() and two `async for` loops at once: they share one reader, each sees all.
    follower = EventFollower(aredis, block_ms=200, count=7)
    seen: list[list[str]] = [[], []]

    async def consume(into: list[str]) -> None:
        async for snapshot in follower:
            if snapshot.status == "revoked":
                into.append(snapshot.device_session_id)

    consumers = [asyncio.create_task(consume(into)) for into in seen]
    runner = asyncio.create_task(follower.run())
    await eventually(lambda: follower.fresh)
    sessions = [await publish(issue()) for _ in range(60)]
    for issued in sessions:
        await publish(issued.revoked())
    expected = [issued.device_session_id for issued in sessions]
    await eventually(lambda: len(seen[0]) == 60 and len(seen[1]) == 60)
    follower.stop()
    await asyncio.wait_for(asyncio.gather(runner, *consumers), timeout=5)

    assert seen[0] == expected
    assert seen[1] == expected


async def test_a_consumer_that_falls_behind_is_told(
    aredis: redis.asyncio.Redis, publish: Publish
) -> None:
    follower = EventFollower(aredis, block_ms=200, consumer_buffer=5)
    slow = follower.changes()
    first = asyncio.ensure_future(anext(slow))
    async with running(follower):
        await eventually(lambda: follower.fresh)
        for _ in range(8):
            await publish(issue())
        await eventually(lambda: follower.applied == 8)
        assert (await first).version == 1

        async def drain() -> None:
            for _ in range(8):
                await anext(slow)

        with pytest.raises(FollowerOverflow):
            await drain()


async def test_a_revocation_fires_only_that_sessions_subscription(
    aredis: redis.asyncio.Redis, publish: Publish
) -> None:
    follower = EventFollower(aredis, block_ms=200)
    first = await publish(issue())
    second = await publish(issue(user_id=first.session.user_id))
    ends: list[SessionEnd] = []
    async with running(follower):
        sub1 = await follower.register(first.device_session_id, first.session.user_id, ends.append)
        sub2 = await follower.register(second.device_session_id, second.session.user_id)
        assert not sub1.done
        assert not sub2.done
        assert follower.subscriptions == 2

        await publish(first.revoked("user_logout"))
        end = await asyncio.wait_for(sub1.wait(), timeout=3)

        assert end.reason == "revoked"
        assert end.revoke_reason == "user_logout"
        assert ends == [end]
        await asyncio.sleep(0.2)
        assert not sub2.done
        assert follower.subscriptions == 1
        sub2.cancel()
        assert follower.subscriptions == 0


async def test_registering_after_verifying_cannot_miss_a_revocation(
    aredis: redis.asyncio.Redis, publish: Publish
) -> None:
    follower = EventFollower(aredis, block_ms=200)
    # A verifier without the follower as cache: the follower does not hold the session.
    verifier = SessionVerifier(aredis)
    issued = await publish(issue())
    async with running(follower):
        await eventually(lambda: follower.fresh)
        assert isinstance(await verifier.verify(issued.token), Principal)
        # Revoked between the verification and the registration, and the event not yet
        # read (here: never appended): only the re-check under the subscription sees it.
        document = json.loads(str(await aredis.get(PREFIX + issued.device_session_id)))
        document.update(status="revoked", version=2, revoke_reason="revoked_by_backend")
        await aredis.set(PREFIX + issued.device_session_id, json.dumps(document))

        subscription = await follower.register(issued.device_session_id, issued.session.user_id)

        assert subscription.done
        end = await subscription
        assert (end.reason, end.revoke_reason) == ("revoked", "revoked_by_backend")


async def test_a_held_session_registers_without_a_read_and_still_sees_the_revocation(
    aredis: redis.asyncio.Redis, publish: Publish
) -> None:
    follower = EventFollower(aredis, block_ms=200)
    verifier = SessionVerifier(aredis, cache=follower)
    issued = await publish(issue())
    async with running(follower):
        await eventually(lambda: follower.fresh)
        assert isinstance(await verifier.verify(issued.token), Principal)
        assert follower.snapshot(issued.device_session_id) is not None  # remembered
        await publish(issued.revoked())  # between the verification and the registration

        subscription = await follower.register(issued.device_session_id, issued.session.user_id)

        end = await asyncio.wait_for(subscription.wait(), timeout=3)
        assert end.reason == "revoked"


async def test_expiry_fires_at_expires_at_and_extend_moves_it(
    aredis: redis.asyncio.Redis, publish: Publish
) -> None:
    follower = EventFollower(aredis, block_ms=200)
    short = await publish(issue(ttl=timedelta(milliseconds=600)))
    extended = await publish(issue(ttl=timedelta(milliseconds=600)))
    fired: dict[str, tuple[datetime, SessionEnd]] = {}

    def recorder(device_session_id: str):  # type: ignore[no-untyped-def]
        return lambda end: fired.__setitem__(device_session_id, (datetime.now(UTC), end))

    async with running(follower):
        await eventually(lambda: follower.fresh)
        for issued in (short, extended):
            await follower.register(
                issued.device_session_id, issued.session.user_id, recorder(issued.device_session_id)
            )
        new_expiry = datetime.now(UTC) + timedelta(milliseconds=1500)
        await publish(extended.next(expires_at=new_expiry))
        await eventually(lambda: len(fired) == 2, timeout=4)

    for issued, expected in ((short, short.session.expires_at), (extended, new_expiry)):
        at, end = fired[issued.device_session_id]
        assert end.reason == "expired"
        assert end.snapshot is not None
        # The published time (millisecond precision) is what the timer follows.
        expires_at = end.snapshot.expires_at
        assert abs(expires_at - expected) < timedelta(milliseconds=2)
        assert expires_at <= at < expires_at + timedelta(seconds=0.4)


async def test_registration_of_an_unknown_or_foreign_session(
    aredis: redis.asyncio.Redis, publish: Publish
) -> None:
    follower = EventFollower(aredis, block_ms=200)
    issued = await publish(issue())
    async with running(follower):
        unknown = await follower.register("X" * 32, "usr_nobody")
        foreign = await follower.register(issued.device_session_id, "usr_someone_else")
        mine = await follower.register(issued.device_session_id, issued.session.user_id)

    assert (await unknown).reason == "unknown_session"
    assert (await foreign).reason == "verification_failed"
    assert not mine.done


async def test_a_cancelled_subscription_never_fires(
    aredis: redis.asyncio.Redis, publish: Publish
) -> None:
    follower = EventFollower(aredis, block_ms=200)
    issued = await publish(issue())
    calls: list[SessionEnd] = []
    async with running(follower):
        subscription = await follower.register(
            issued.device_session_id, issued.session.user_id, calls.append
        )
        subscription.cancel()
        await publish(issued.revoked())
        await eventually(lambda: follower.snapshot(issued.device_session_id) is not None)
        await asyncio.sleep(0.1)
    assert calls == []
    assert subscription.end is None


async def test_memory_holds_what_the_gateway_asked_about(
    aredis: redis.asyncio.Redis, publish: Publish
) -> None:
    follower = EventFollower(aredis, block_ms=100, count=50, max_cached=10, recent_events=50)
    verifier = SessionVerifier(aredis, cache=follower)
    async with running(follower):
        await eventually(lambda: follower.fresh)
        verified = [await publish(issue()) for _ in range(30)]
        registered = [await publish(issue()) for _ in range(20)]
        for issued in verified:
            assert isinstance(await verifier.verify(issued.token), Principal)
        subscriptions = [
            await follower.register(issued.device_session_id, issued.session.user_id)
            for issued in registered
        ]
        for _ in range(200):  # stream traffic of sessions nobody asked about
            await publish(issue())
        await eventually(lambda: follower.applied >= 250)

        # Subscribed sessions are all kept, verified ones up to max_cached (LRU), and the
        # rest of the stream only as the last `recent_events` events.
        assert follower.cached_sessions == 20 + 10
        assert len(follower.snapshots()) <= 20 + 10 + 50
        kept = [i for i in verified if follower.snapshot(i.device_session_id) is not None]
        assert kept == verified[-10:]

        for issued in registered:
            await publish(issued.revoked())
        ends = await asyncio.wait_for(asyncio.gather(*subscriptions), timeout=3)
    assert {end.reason for end in ends} == {"revoked"}


async def test_a_read_racing_a_publication_caches_the_newer_version(
    aredis: redis.asyncio.Redis, publish: Publish
) -> None:
    follower = EventFollower(aredis, block_ms=100, count=10, recent_events=20)
    async with running(follower):
        await eventually(lambda: follower.fresh)
        issued = await publish(issue())
        # A verifier took the watermark and read v1; v2 (revoked) went by on the stream
        # before the verifier got to remember what it read.
        watermark = follower.watermark()
        v1 = SessionSnapshot.from_json(str(await aredis.get(PREFIX + issued.device_session_id)))
        await publish(issued.revoked())
        await eventually(lambda: follower.applied >= 2)

        assert follower.remember(v1, watermark)
        held = follower.cached(issued.device_session_id)
        assert held is not None
        assert (held.version, held.status) == (2, "revoked")

        # When the recent events no longer reach back to the watermark, nothing is kept.
        other = await publish(issue())
        watermark = follower.watermark()
        snapshot = SessionSnapshot.from_json(
            str(await aredis.get(PREFIX + other.device_session_id))
        )
        before = follower.applied
        for _ in range(30):
            await publish(issue())
        await eventually(lambda: follower.applied >= before + 30)
        assert not follower.remember(snapshot, watermark)
        assert follower.cached(other.device_session_id) is None


async def test_live_sessions_end_after_the_outage_grace(dedicated_redis: RedisServer) -> None:
    client = async_client(dedicated_redis)
    follower = EventFollower(
        client, block_ms=100, retry_delays=(0.05, 0.05), outage_grace=0.5, read_timeout=0.3
    )
    try:
        issued = issue()
        await publisher_on(client).publish(issued.session, datetime.now(UTC))
        async with running(follower):
            await eventually(lambda: follower.fresh)
            subscription = await follower.register(issued.device_session_id, issued.session.user_id)
            dedicated_redis.kill()
            started = time.monotonic()
            end = await asyncio.wait_for(subscription.wait(), timeout=5)
            assert end.reason == "internal_error"
            assert time.monotonic() - started >= 0.5
            # While Redis is down, a new registration fails closed too.
            again = await follower.register(issued.device_session_id, issued.session.user_id)
            assert (await again).reason == "internal_error"
            assert await SessionVerifier(client, cache=follower).verify(issued.token) == Rejection(
                "internal_error"
            )
    finally:
        await client.aclose()
