"""HTTP app of bench/gateway_bench.py: one handler, served protected and unprotected.

``/protected/ping`` sits behind ``SessionAuthMiddleware`` with the follower as cache;
``/open/ping`` is the same handler without the middleware. ``uvicorn gateway_http_app:app
--app-dir bench`` with ``REDIS_URL`` and the gateway key names in the environment.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from authsession.gateway import EventFollower, SessionAuthMiddleware, SessionVerifier

client = redis.asyncio.Redis.from_url(os.environ["REDIS_URL"], decode_responses=True)
prefix = os.environ.get("GATEWAY_SESSION_KEY_PREFIX", "gateway:session:")
stream = os.environ.get("GATEWAY_SESSION_EVENTS_STREAM", "gateway:session_events")
follower = EventFollower(client, key_prefix=prefix, stream=stream)
verifier = SessionVerifier(client, key_prefix=prefix, cache=follower, timeout=0.5)


async def ping(request: Request) -> PlainTextResponse:
    return PlainTextResponse("pong")


@asynccontextmanager
async def lifespan(_app: Starlette) -> AsyncIterator[None]:
    follower.start()
    yield
    await follower.aclose()
    await client.aclose()


inner = Starlette(
    routes=[Route("/protected/ping", ping), Route("/open/ping", ping)], lifespan=lifespan
)
protected = SessionAuthMiddleware(inner, verifier)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    # The unprotected endpoint does not pass through the middleware at all; both pay
    # for this one branch.
    if scope["type"] == "http" and scope["path"].startswith("/open/"):
        await inner(scope, receive, send)
    else:
        await protected(scope, receive, send)
