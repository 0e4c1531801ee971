"""The follower notices a reset of the stream or of Redis and resyncs (CONTRACT §12, §10).

A real redis-server killed and restarted empty, one restarted from an older RDB, and a
stream deleted and recreated under a running follower: afterwards the follower's cache
must agree with the snapshot keys, and subscriptions of sessions whose key is gone fire.
"""

from __future__ import annotations

import asyncio
import shutil
from datetime import UTC, datetime
from pathlib import Path

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from authsession.gateway import EventFollower, Principal, Rejection, SessionVerifier
from tests.gateway.conftest import (
    STREAM,
    Issued,
    async_client,
    eventually,
    issue,
    publisher_on,
    running,
)
from tests.support.redis_server import RedisServer


async def publish_all(client: redis.asyncio.Redis, *sessions: Issued) -> None:
    publisher = publisher_on(client)
    for issued in sessions:
        await publisher.publish(issued.session, datetime.now(UTC))


def retrying_client(server: RedisServer) -> redis.asyncio.Redis:
    """A client for the verifiers that retries once on a connection the restart closed."""
    return redis.asyncio.Redis(
        host=server.host,
        port=server.port,
        decode_responses=True,
        retry=Retry(NoBackoff(), 2),
        socket_timeout=5.0,
    )


def follower_on(client: redis.asyncio.Redis) -> EventFollower:
    return EventFollower(
        client, block_ms=100, retry_delays=(0.05, 0.1), reset_check_interval=0.2, outage_grace=None
    )


async def test_redis_restarted_empty(dedicated_redis: RedisServer) -> None:
    client = async_client(dedicated_redis)
    follower = follower_on(client)
    reader = retrying_client(dedicated_redis)
    cached_verifier = SessionVerifier(reader, cache=follower)
    plain_verifier = SessionVerifier(reader)
    kept, watched = issue(), issue()
    try:
        async with running(follower):
            await eventually(lambda: follower.fresh)
            await publish_all(client, kept, watched)
            assert isinstance(await cached_verifier.verify(kept.token), Principal)
            subscription = await follower.register(
                watched.device_session_id, watched.session.user_id
            )
            assert follower.cached(kept.device_session_id) is not None

            dedicated_redis.kill()
            dedicated_redis.restart()

            end = await asyncio.wait_for(subscription.wait(), timeout=5)
            assert end.reason == "unknown_session"
            await eventually(lambda: follower.fresh)
            assert follower.resets == 1
            assert follower.snapshot(kept.device_session_id) is None
            for token in (kept.token, watched.token):
                assert await plain_verifier.verify(token) == Rejection("unknown_session")
                assert await cached_verifier.verify(token) == Rejection("unknown_session")

            # And it follows the new stream.
            fresh_session = issue()
            await publish_all(reader, fresh_session)
            assert isinstance(await cached_verifier.verify(fresh_session.token), Principal)
    finally:
        await client.aclose()
        await reader.aclose()


async def test_redis_restarted_from_an_older_rdb(dedicated_redis: RedisServer) -> None:
    client = async_client(dedicated_redis)
    directory = Path(str((await client.config_get("dir"))["dir"]))
    rdb = directory / str((await client.config_get("dbfilename"))["dbfilename"])
    follower = follower_on(client)
    reader = retrying_client(dedicated_redis)
    verifier = SessionVerifier(reader, cache=follower)
    revoked_later, extended_later, created_later = issue(), issue(), issue()
    try:
        async with running(follower):
            await eventually(lambda: follower.fresh)
            await publish_all(client, revoked_later, extended_later)
            await client.save()
            shutil.copy(rdb, directory / "older.rdb")

            # After the save: a revocation, an extension and a new session.
            extended = extended_later.next(
                expires_at=extended_later.session.expires_at.replace(
                    year=extended_later.session.expires_at.year + 1
                )
            )
            await publish_all(client, revoked_later.revoked(), extended, created_later)
            for issued in (revoked_later, extended_later, created_later):
                await verifier.verify(issued.token)
            subscriptions = {
                issued.device_session_id: await follower.register(
                    issued.device_session_id, issued.session.user_id
                )
                for issued in (extended_later, created_later)
            }
            assert follower.cached(created_later.device_session_id) is not None
            held = follower.cached(extended_later.device_session_id)
            assert held is not None
            assert held.version == 2

            dedicated_redis.kill()
            shutil.copy(directory / "older.rdb", rdb)
            dedicated_redis.restart()

            created_end = await asyncio.wait_for(
                subscriptions[created_later.device_session_id].wait(), timeout=5
            )
            assert created_end.reason == "unknown_session"
            await eventually(lambda: follower.fresh)
            assert follower.resets == 1

            # Gone: no longer accepted. Older: the follower holds what the store holds now,
            # not the newer version it had seen. A revocation seen is never undone.
            assert await verifier.verify(created_later.token) == Rejection("unknown_session")
            held = follower.snapshot(extended_later.device_session_id)
            assert held is not None
            assert held.version == 1
            assert held.expires_at == extended_later.session.expires_at.replace(
                microsecond=held.expires_at.microsecond
            )
            assert not subscriptions[extended_later.device_session_id].done
            assert await verifier.verify(revoked_later.token) == Rejection("revoked")
    finally:
        await client.aclose()
        await reader.aclose()


async def test_stream_deleted_and_recreated_under_the_follower(
    redis_server: RedisServer, aredis: redis.asyncio.Redis
) -> None:
    follower = follower_on(aredis)
    verifier = SessionVerifier(aredis, cache=follower)
    first, second = issue(), issue()
    async with running(follower):
        await eventually(lambda: follower.fresh)
        await publish_all(aredis, first, second)
        for issued in (first, second):
            assert isinstance(await verifier.verify(issued.token), Principal)
        subscription = await follower.register(first.device_session_id, first.session.user_id)
        resets = follower.resets

        # The stream and one snapshot key are lost without a restart (same run id); the
        # recreated stream starts below the follower's position.
        await aredis.delete(STREAM, "gateway:session:" + first.device_session_id)
        await aredis.xadd(STREAM, {"event": "something_else"}, id="1-1")

        end = await asyncio.wait_for(subscription.wait(), timeout=5)
        assert end.reason == "unknown_session"
        assert follower.resets == resets + 1
        assert follower.position == "1-1"
        await eventually(lambda: follower.fresh)
        assert await verifier.verify(first.token) == Rejection("unknown_session")
        assert isinstance(await verifier.verify(second.token), Principal)


async def test_works_with_the_shipped_read_only_gateway_acl(tmp_path: Path) -> None:
    # The `gateway` user of deploy/users.acl, as shipped (read-only, plus INFO for the
    # run-id check): verification, subscriptions and reset detection all work with it.
    acl = (Path(__file__).resolve().parents[2] / "deploy" / "users.acl").read_text()
    line = next(x for x in acl.splitlines() if x.startswith("user gateway "))
    rules = [">test-pw" if r.startswith(">") else r for r in line.split()[2:]]
    with RedisServer(["--user", "gateway", *rules]) as server:
        admin = async_client(server)
        gateway = async_client(server, username="gateway", password="test-pw")
        follower = follower_on(gateway)
        verifier = SessionVerifier(gateway, cache=follower)
        issued = issue()
        try:
            async with running(follower):
                await eventually(lambda: follower.fresh)
                await publish_all(admin, issued)
                assert isinstance(await verifier.verify(issued.token), Principal)
                subscription = await follower.register(
                    issued.device_session_id, issued.session.user_id
                )
                await publish_all(admin, issued.revoked())
                assert (await asyncio.wait_for(subscription.wait(), 3)).reason == "revoked"
                # A reset the stream shows is still detected without INFO.
                await admin.delete(STREAM)
                await eventually(lambda: follower.resets == 1)
        finally:
            await admin.aclose()
            await gateway.aclose()
