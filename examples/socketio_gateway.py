"""A Socket.IO gateway on authsession.gateway: ``uvicorn socketio_gateway:app --app-dir examples``.

Clients connect with ``auth={"token": "<session_token>"}`` (or an ``Authorization:
Bearer`` header, or a ``session`` cookie); a refused one gets ``connect_error`` with the
reason. When the session is revoked, expires or disappears, the client receives
``session_expired`` ``{"reason": ...}`` and is disconnected.

Configuration: ``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``; use the read-only
``gateway`` ACL user), ``GATEWAY_SESSION_KEY_PREFIX``, ``GATEWAY_SESSION_EVENTS_STREAM``.
"""

from __future__ import annotations

import os
from typing import Any

import redis.asyncio
import socketio
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from authsession.gateway import (
    DEFAULT_EVENTS_STREAM,
    DEFAULT_KEY_PREFIX,
    EventFollower,
    SessionVerifier,
)
from authsession.gateway.socketio_adapter import SocketIOSessionGuard

# A bounded pool: a burst of handshakes waits for one of 64 connections rather than
# opening hundreds. Retries with a short backoff: the default one sleeps longer than the
# verifier's timeout, so a connection closed by a Redis restart would fail a handshake.
client = redis.asyncio.Redis(
    connection_pool=redis.asyncio.BlockingConnectionPool.from_url(
        os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        max_connections=64,
        timeout=None,
        decode_responses=True,
        retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 3),
    )
)
prefix = os.environ.get("GATEWAY_SESSION_KEY_PREFIX", DEFAULT_KEY_PREFIX)
stream = os.environ.get("GATEWAY_SESSION_EVENTS_STREAM", DEFAULT_EVENTS_STREAM)
follower = EventFollower(client, key_prefix=prefix, stream=stream)
verifier = SessionVerifier(client, key_prefix=prefix, cache=follower, timeout=0.5)

sio = socketio.AsyncServer(async_mode="asgi", cors_allowed_origins=[])
guard = SocketIOSessionGuard(sio, verifier, follower, cookie="session")


@sio.event
async def connect(sid: str, environ: dict[str, Any], auth: Any) -> None:
    await guard.connect(sid, environ, auth)  # raises ConnectionRefusedError(reason)


@sio.event
async def disconnect(sid: str, reason: str | None = None) -> None:
    guard.disconnect(sid, reason)


@sio.event
async def whoami(sid: str, _data: Any = None) -> dict[str, str] | None:
    principal = guard.principal(sid)
    if principal is None:
        return None
    return {"user_id": principal.user_id, "device_session_id": principal.device_session_id}


async def startup() -> None:
    follower.start()


async def shutdown() -> None:
    await follower.aclose()
    await client.aclose()


app = socketio.ASGIApp(sio, on_startup=startup, on_shutdown=shutdown)
