"""SessionAuthMiddleware in front of a tiny Starlette app, over a real redis-server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
import redis.asyncio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from authsession.gateway import (
    PRINCIPAL_STATE_KEY,
    Principal,
    Rejection,
    SessionAuthMiddleware,
    SessionVerifier,
    TokenVerifier,
    bearer_token,
)
from tests.gateway.conftest import AppFactory, Issued, Publish, async_client, issue
from tests.support.redis_server import RedisServer

INTERNAL = "/api/v1/internal"


async def whoami(request: Request) -> JSONResponse:
    principal: Principal = getattr(request.state, PRINCIPAL_STATE_KEY)
    return JSONResponse(
        {"user_id": principal.user_id, "device_session_id": principal.device_session_id}
    )


async def health(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    principal: Principal = websocket.scope["state"][PRINCIPAL_STATE_KEY]
    await websocket.send_text(principal.user_id)
    await websocket.close()


def gateway(verifier: TokenVerifier, **options: Any) -> SessionAuthMiddleware:
    app = Starlette(
        routes=[
            Route("/me", whoami),
            Route("/healthz", health),
            Route("/healthz/live", health),
            Route("/healthzz", health),
            WebSocketRoute("/ws", echo),
        ]
    )
    return SessionAuthMiddleware(app, verifier, **options)


@pytest.fixture
async def http(aredis: redis.asyncio.Redis) -> AsyncIterator[httpx.AsyncClient]:
    """A client for the tiny app behind the middleware, on the shared redis-server."""
    app = gateway(SessionVerifier(aredis), exclude_paths=("/healthz",))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway.test"
    ) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_rejected(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert set(body) == {"error"}


async def test_valid_token_reaches_the_app_with_its_principal(
    http: httpx.AsyncClient, publish: Publish
) -> None:
    issued = await publish(issue())

    response = await http.get("/me", headers=bearer(issued.token))

    assert response.status_code == 200
    assert response.json() == {
        "user_id": issued.session.user_id,
        "device_session_id": issued.device_session_id,
    }


async def test_scheme_is_case_insensitive(http: httpx.AsyncClient, publish: Publish) -> None:
    issued = await publish(issue())

    response = await http.get("/me", headers={"Authorization": f"bearer   {issued.token}"})

    assert response.status_code == 200


Headers = Callable[[Issued], dict[str, str]]
CASES: dict[str, tuple[Headers, str]] = {
    "no header": (lambda i: {}, "missing_token"),
    "another scheme": (lambda i: {"Authorization": "Basic dXNlcjpwdw=="}, "missing_token"),
    "empty bearer": (lambda i: {"Authorization": "Bearer "}, "missing_token"),
    "not a session token": (lambda i: bearer("abc"), "malformed_token"),
    "no dot": (lambda i: bearer(i.token.replace(".", "")), "malformed_token"),
    "unknown session": (lambda i: bearer(issue().token), "unknown_session"),
    "wrong secret": (lambda i: bearer(i.device_session_id + ".wrong"), "verification_failed"),
}


@pytest.mark.parametrize(("headers", "code"), CASES.values(), ids=CASES.keys())
async def test_rejections_are_401_with_the_reason(
    http: httpx.AsyncClient, publish: Publish, headers: Headers, code: str
) -> None:
    issued = await publish(issue())

    response = await http.get("/me", headers=headers(issued))

    assert_rejected(response, 401, code)
    # RFC 6750 §3.1: no error code when the request carries no bearer credentials.
    expected = "Bearer" if code == "missing_token" else 'Bearer error="invalid_token"'
    assert response.headers["www-authenticate"] == expected


async def test_revoked_is_401(http: httpx.AsyncClient, publish: Publish) -> None:
    issued = await publish(issue())
    await publish(issued.revoked())

    response = await http.get("/me", headers=bearer(issued.token))

    assert_rejected(response, 401, "revoked")
    assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'


async def test_expired_is_401(aredis: redis.asyncio.Redis, publish: Publish) -> None:
    issued = await publish(issue(ttl=timedelta(minutes=1)))
    later = issued.session.expires_at + timedelta(seconds=1)
    app = gateway(SessionVerifier(aredis, clock=lambda: later))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway.test"
    ) as client:
        response = await client.get("/me", headers=bearer(issued.token))

    assert_rejected(response, 401, "expired")


async def test_two_authorization_headers_are_malformed(
    http: httpx.AsyncClient, publish: Publish
) -> None:
    issued = await publish(issue())
    headers = [("Authorization", f"Bearer {issued.token}"), ("Authorization", "Bearer x.y")]

    response = await http.get("/me", headers=headers)

    assert_rejected(response, 401, "malformed_token")


async def test_internal_error_is_503(dedicated_redis: RedisServer) -> None:
    client = async_client(dedicated_redis)
    issued = issue()
    await client.set("unrelated", "1")  # the connection worked once
    dedicated_redis.kill()
    app = gateway(SessionVerifier(client))
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway.test"
        ) as http:
            response = await http.get("/me", headers=bearer(issued.token))
    finally:
        await client.aclose()

    assert_rejected(response, 503, "internal_error")
    assert "www-authenticate" not in response.headers
    assert response.headers["retry-after"] == "1"


@pytest.mark.parametrize(
    ("path", "status"), [("/healthz", 200), ("/healthz/live", 200), ("/healthzz", 401)]
)
async def test_excluded_paths_skip_verification(
    http: httpx.AsyncClient, path: str, status: int
) -> None:
    response = await http.get(path)

    assert response.status_code == status


async def test_custom_header(aredis: redis.asyncio.Redis, publish: Publish) -> None:
    issued = await publish(issue())
    app = gateway(SessionVerifier(aredis), header="X-Session-Authorization")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway.test"
    ) as client:
        ok = await client.get("/me", headers={"X-Session-Authorization": f"Bearer {issued.token}"})
        ignored = await client.get("/me", headers=bearer(issued.token))

    assert ok.status_code == 200
    assert_rejected(ignored, 401, "missing_token")


def test_bearer_token_parsing() -> None:
    assert bearer_token(None) is None
    assert bearer_token("Bearer abc.def") == "abc.def"
    assert bearer_token("  BEARER   abc.def  ") == "abc.def"
    assert bearer_token("Bearer") is None
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearerabc") is None


# --------------------------------------------------------------------------- other scopes


class Fixed:
    """A verifier with a fixed answer: for the scopes that need no Redis."""

    def __init__(self, result: Principal | Rejection) -> None:
        self.result = result
        self.calls = 0

    async def verify(self, token: str | None) -> Principal | Rejection:
        self.calls += 1
        return self.result


async def test_lifespan_passes_through() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    verifier = Fixed(Rejection("missing_token"))
    middleware = SessionAuthMiddleware(app, verifier)

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        raise AssertionError("the middleware must not answer a lifespan scope")

    await middleware({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)

    assert seen == ["lifespan"]
    assert verifier.calls == 0


async def websocket(app: SessionAuthMiddleware, headers: dict[str, str]) -> list[Message]:
    """Drive one WebSocket handshake through ``app``; the messages it sent."""
    incoming: list[Message] = [{"type": "websocket.connect"}]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "websocket.disconnect", "code": 1000}

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "path": "/ws",
        "raw_path": b"/ws",
        "root_path": "",
        "scheme": "ws",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "server": ("gateway.test", 80),
        "client": ("127.0.0.1", 40000),
        "subprotocols": [],
    }
    await app(scope, receive, send)
    return sent


async def test_websocket_admitted_with_its_principal() -> None:
    principal = Principal("usr_ws", "A" * 32, issue().session.expires_at, 1)

    sent = await websocket(gateway(Fixed(principal)), bearer("A" * 32 + ".x"))

    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert sent[1]["text"] == "usr_ws"


@pytest.mark.parametrize(("reason", "code"), [("revoked", 1008), ("internal_error", 1011)])
async def test_websocket_rejected_before_accept(reason: Any, code: int) -> None:
    sent = await websocket(gateway(Fixed(Rejection(reason))), {})

    # A close before the accept: the server refuses the handshake (HTTP 403).
    assert sent == [{"type": "websocket.close", "code": code, "reason": reason}]


# --------------------------------------------------------------------------- end to end


async def test_service_session_through_the_middleware(
    make_app: AppFactory, http: httpx.AsyncClient
) -> None:
    app = await make_app()
    body = await app.login("gateway-asgi@example.com")

    admitted = await http.get("/me", headers=bearer(body["session_token"]))
    revoke = await app.internal.post(f"{INTERNAL}/sessions/{body['device_session_id']}/revoke")
    refused = await http.get("/me", headers=bearer(body["session_token"]))

    assert admitted.status_code == 200
    assert admitted.json()["user_id"] == body["user_id"]
    assert revoke.status_code == 200
    assert_rejected(refused, 401, "revoked")
