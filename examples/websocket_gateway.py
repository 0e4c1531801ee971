"""A WebSocket + HTTP gateway on authsession.gateway (Starlette):
``uvicorn websocket_gateway:app --app-dir examples``.

``/ws`` accepts a socket whose ``Authorization: Bearer`` header (or ``session`` cookie)
holds a valid session token, greets it with the principal and echoes text; when the
session is revoked, expires or disappears the socket is closed with code 4001 and the
reason. ``/api/whoami`` is an HTTP endpoint behind the same verifier; ``/healthz`` is
left open (``exclude_paths``, matched on the normalized path only).

Configuration: ``REDIS_URL``, ``GATEWAY_SESSION_KEY_PREFIX``,
``GATEWAY_SESSION_EVENTS_STREAM`` (as in socketio_gateway.py).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from authsession.gateway import (
    DEFAULT_EVENTS_STREAM,
    DEFAULT_KEY_PREFIX,
    PRINCIPAL_STATE_KEY,
    EventFollower,
    SessionAuthMiddleware,
    SessionVerifier,
    WebSocketSessionGuard,
)

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


async def socket(websocket: WebSocket) -> None:
    await websocket.accept()
    principal = websocket.scope["state"][PRINCIPAL_STATE_KEY]
    await websocket.send_json(
        {"user_id": principal.user_id, "device_session_id": principal.device_session_id}
    )
    async for text in websocket.iter_text():
        await websocket.send_text(text)


async def whoami(request: Request) -> JSONResponse:
    principal = request.scope["state"][PRINCIPAL_STATE_KEY]
    return JSONResponse({"user_id": principal.user_id})


async def health(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


@asynccontextmanager
async def lifespan(_app: Starlette) -> AsyncIterator[None]:
    follower.start()
    yield
    await follower.aclose()
    await client.aclose()


routes = [
    WebSocketRoute("/ws", socket),
    Route("/api/whoami", whoami),
    Route("/healthz", health),
    # Something the exclusion must never open up.
    Route("/admin", whoami),
]
app = WebSocketSessionGuard(
    SessionAuthMiddleware(
        Starlette(routes=routes, lifespan=lifespan),
        verifier,
        exclude_paths=("/healthz",),
        websocket=False,
    ),
    verifier,
    follower,
    cookie="session",
)
