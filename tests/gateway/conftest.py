"""Fixtures for the gateway library: an async client, the real publisher, session makers.

Snapshots and events are produced by the service's own ``RedisProjectionPublisher`` (and,
end to end, by the in-process apps of ``tests/integration``), never written by hand
unless a test is about a document the publisher would not write.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from authsession.domain.codes import new_id, new_session_token, token_sha256
from authsession.domain.model import Session
from authsession.gateway import EventFollower
from authsession.redis.projection import RedisProjectionPublisher

# The in-process apps (make_app) live with the integration tests; share them.
from tests.integration.conftest import AppEnv, AppFactory, make_app
from tests.support.redis_server import RedisServer

__all__ = ["AppEnv", "AppFactory", "make_app"]

PREFIX = "gateway:session:"
STREAM = "gateway:session_events"


def async_client(server: RedisServer, **kwargs: Any) -> redis.asyncio.Redis:
    """An async client without retries, so that a dead server fails at once."""
    kwargs.setdefault("decode_responses", True)
    return redis.asyncio.Redis(
        host=server.host,
        port=server.port,
        retry=Retry(NoBackoff(), 0),
        socket_timeout=5.0,
        socket_connect_timeout=2.0,
        **kwargs,
    )


@pytest.fixture
async def aredis(
    redis_server: RedisServer, redis_client: redis.Redis
) -> AsyncIterator[redis.asyncio.Redis]:
    """An async client on the shared server, after ``redis_client`` flushed it."""
    client = async_client(redis_server)
    yield client
    await client.aclose()


@dataclass(frozen=True)
class Issued:
    """A session as the service would hold it, with the token it handed out."""

    session: Session
    token: str

    @property
    def device_session_id(self) -> str:
        return self.session.device_session_id

    def next(self, **changes: Any) -> Issued:
        """The following version of the session with ``changes``."""
        version = self.session.version + 1
        return Issued(dataclasses.replace(self.session, version=version, **changes), self.token)

    def revoked(self, reason: str = "revoked_by_backend") -> Issued:
        return self.next(revoked_at=datetime.now(UTC), revoke_reason=reason)


def issue(*, ttl: timedelta = timedelta(hours=1), user_id: str | None = None) -> Issued:
    """A fresh active session (version 1) expiring ``ttl`` from now."""
    now = datetime.now(UTC)
    device_session_id = new_id()
    token = new_session_token(device_session_id)
    session = Session(
        device_session_id=device_session_id,
        user_id=user_id or f"usr_{new_id()[:12]}",
        token_sha256=token_sha256(token),
        created_at=now,
        expires_at=now + ttl,
        client_ip="203.0.113.7",
        user_agent="pytest",
    )
    return Issued(session, token)


Publish = Callable[[Issued], Awaitable[Issued]]


def publisher_on(client: redis.asyncio.Redis, maxlen: int = 10_000) -> RedisProjectionPublisher:
    return RedisProjectionPublisher(client, PREFIX, STREAM, maxlen)


@pytest.fixture
def publish(aredis: redis.asyncio.Redis) -> Publish:
    """``await publish(issued)``: snapshot key + event through the real publisher."""
    publisher = publisher_on(aredis)

    async def _publish(issued: Issued) -> Issued:
        # Real time: the publisher's key expiries are absolute (PXAT).
        await publisher.publish(issued.session, datetime.now(UTC))
        return issued

    return _publish


@asynccontextmanager
async def running(follower: EventFollower) -> AsyncIterator[asyncio.Task[None]]:
    """The follower's reader as a background task, stopped and awaited on exit."""
    task = follower.start()
    try:
        yield task
    finally:
        follower.stop()
        await asyncio.wait_for(task, timeout=5)


async def eventually(check: Callable[[], bool], timeout: float = 3.0) -> float:
    """Wait until ``check()`` holds; the seconds it took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)
    return time.monotonic() - started
