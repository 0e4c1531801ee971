"""The live-connection adapters in process: the ASGI WebSocket guard's closes, metrics
and log lines; the Socket.IO guard's token sources; exclude_paths under real uvicorn."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from starlette.types import Message, Receive, Scope, Send

from authsession.gateway import (
    PRINCIPAL_STATE_KEY,
    EventFollower,
    Rejection,
    SessionVerifier,
    WebSocketSessionGuard,
    normalized_path,
)
from authsession.gateway.socketio_adapter import SocketIOSessionGuard
from tests.gateway.conftest import Publish, eventually, issue, running
from tests.gateway.processes import GatewayProcess
from tests.support.net import LOOPBACK
from tests.support.redis_server import RedisServer


class Socket:
    """One WebSocket driven by hand through an ASGI app."""

    def __init__(self, app: Any, headers: dict[str, str]) -> None:
        self.incoming: asyncio.Queue[Message] = asyncio.Queue()
        self.sent: list[Message] = []
        self.closed = asyncio.Event()
        self.app_received: list[Message] = []
        scope: Scope = {
            "type": "websocket",
            "asgi": {"version": "3.0"},
            "path": "/ws",
            "raw_path": b"/ws",
            "query_string": b"",
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
            "subprotocols": [],
        }
        self.incoming.put_nowait({"type": "websocket.connect"})
        self.task = asyncio.create_task(app(scope, self.incoming.get, self._send))

    async def _send(self, message: Message) -> None:
        self.sent.append(message)
        if message["type"] == "websocket.close":
            self.closed.set()

    async def close_message(self) -> Message:
        await asyncio.wait_for(self.closed.wait(), 3)
        return self.sent[-1]


async def echo_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Accepts, greets with the user id, then waits for the disconnect."""
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": scope["state"][PRINCIPAL_STATE_KEY].user_id})
    while (await receive())["type"] != "websocket.disconnect":
        pass
    APP_SAW_DISCONNECT.append(scope["state"][PRINCIPAL_STATE_KEY].device_session_id)


APP_SAW_DISCONNECT: list[str] = []


def points(reader: InMemoryMetricReader) -> dict[str, dict[tuple[tuple[str, Any], ...], Any]]:
    """metric name → {sorted attributes: value}."""
    out: dict[str, dict[tuple[tuple[str, Any], ...], Any]] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    key = tuple(sorted(dict(point.attributes or {}).items()))
                    out.setdefault(metric.name, {})[key] = point.value
    return out


@pytest.fixture
async def live(
    aredis: redis.asyncio.Redis,
) -> AsyncIterator[tuple[WebSocketSessionGuard, EventFollower, InMemoryMetricReader]]:
    reader = InMemoryMetricReader()
    follower = EventFollower(aredis, block_ms=200)
    guard = WebSocketSessionGuard(
        echo_app,
        SessionVerifier(aredis, cache=follower),
        follower,
        cookie="session",
        meter_provider=MeterProvider(metric_readers=[reader]),
    )
    async with running(follower):
        await eventually(lambda: follower.fresh)
        yield guard, follower, reader


async def test_websocket_closed_with_4001_when_revoked_with_metrics_and_logs(
    live: tuple[WebSocketSessionGuard, EventFollower, InMemoryMetricReader],
    publish: Publish,
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard, _, reader = live
    caplog.set_level(logging.INFO, logger="authsession.gateway")
    revoked, kept = await publish(issue()), await publish(issue())
    sockets = {
        "revoked": Socket(guard, {"Authorization": f"Bearer {revoked.token}"}),
        "kept": Socket(guard, {"Cookie": f"theme=dark; session={kept.token}"}),
        "missing": Socket(guard, {}),
        "bad": Socket(guard, {"Authorization": "Bearer nope"}),
    }
    await eventually(lambda: len(sockets["kept"].sent) == 2 and len(sockets["revoked"].sent) == 2)
    assert sockets["kept"].sent[1]["text"] == kept.session.user_id

    await publish(revoked.revoked())

    assert await sockets["revoked"].close_message() == {
        "type": "websocket.close",
        "code": 4001,
        "reason": "revoked",
    }
    await asyncio.wait_for(sockets["revoked"].task, 3)
    assert revoked.device_session_id in APP_SAW_DISCONNECT
    # Rejected handshakes are accepted and closed at once, so that the reason arrives.
    for name, reason in (("missing", "missing_token"), ("bad", "malformed_token")):
        assert [m["type"] for m in sockets[name].sent] == ["websocket.accept", "websocket.close"]
        assert (await sockets[name].close_message())["reason"] == reason
    assert not sockets["kept"].closed.is_set()

    # The client leaves: the app sees the disconnect, the metrics count it.
    sockets["kept"].incoming.put_nowait({"type": "websocket.disconnect", "code": 1000})
    await asyncio.wait_for(sockets["kept"].task, 3)

    metrics = points(reader)
    ws = ("transport", "websocket")
    assert metrics["socket_handshake_total"] == {
        (("status", "accepted"), ws): 2,
        (("status", "rejected"), ws): 2,
    }
    assert metrics["socket_handshake_rejections"] == {
        (("reason", "malformed_token"), ws): 1,
        (("reason", "missing_token"), ws): 1,
    }
    assert metrics["socket_disconnect_total"] == {
        (("reason", "client"), ws): 1,
        (("reason", "revoked"), ws): 1,
    }
    assert metrics["socket_active"] == {(ws,): 0}

    lines = [
        r for r in caplog.records if r.getMessage() in ("socket.handshake", "socket.disconnect")
    ]
    outcomes = sorted(
        (r.getMessage(), getattr(r, "outcome", None) or getattr(r, "reason", None)) for r in lines
    )
    assert outcomes == [
        ("socket.disconnect", "client"),
        ("socket.disconnect", "revoked"),
        ("socket.handshake", "accepted"),
        ("socket.handshake", "accepted"),
        ("socket.handshake", "rejected"),
        ("socket.handshake", "rejected"),
    ]
    for record in lines:
        for token in (revoked.token, kept.token):
            assert token not in str(record.__dict__)
            assert token.rpartition(".")[2] not in str(record.__dict__)


async def test_a_session_ended_before_the_app_accepts_is_closed_at_the_accept(
    live: tuple[WebSocketSessionGuard, EventFollower, InMemoryMetricReader], publish: Publish
) -> None:
    guard, _, _ = live
    issued = await publish(issue())
    accept_now = asyncio.Event()

    async def slow_app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await accept_now.wait()
        await send({"type": "websocket.accept"})
        assert (await receive())["type"] == "websocket.disconnect"

    guard._app = slow_app
    sock = Socket(guard, {"Authorization": f"Bearer {issued.token}"})
    await asyncio.sleep(0.1)
    await publish(issued.revoked())
    await asyncio.sleep(0.3)
    accept_now.set()
    assert await sock.close_message() == {
        "type": "websocket.close",
        "code": 4001,
        "reason": "revoked",
    }
    await asyncio.wait_for(sock.task, 3)


def test_socketio_token_sources() -> None:
    guard = SocketIOSessionGuard.__new__(SocketIOSessionGuard)
    guard._cookie = "session"
    header = {"HTTP_AUTHORIZATION": "Bearer from-header"}
    cookie = {"HTTP_COOKIE": "a=b; session=from-cookie"}

    assert guard.token({**header, **cookie}, {"token": "from-auth"}) == "from-auth"
    assert guard.token({**header, **cookie}, None) == "from-header"
    assert guard.token(cookie, {}) == "from-cookie"
    assert guard.token({}, None) is None
    assert guard.token({}, {"token": 42}) == Rejection("malformed_token")
    guard._cookie = None
    assert guard.token(cookie, None) is None


@pytest.mark.parametrize(
    ("path", "raw", "normal"),
    [
        ("/healthz", b"/healthz", "/healthz"),
        ("/healthz/live", b"/healthz/live", "/healthz/live"),
        ("/healthz/", b"/healthz/", "/healthz/"),
        ("/healthz/../admin", b"/healthz/../admin", None),
        ("/healthz/../admin", b"/healthz/%2e%2e/admin", None),
        ("/healthz/../admin", b"/healthz%2F..%2Fadmin", None),
        ("/healthz/./x", b"/healthz/./x", None),
        ("//healthz", b"//healthz", None),
        ("/healthz\\..\\admin", b"/healthz\\..\\admin", None),
        ("/healthz", b"/health%7A", None),
    ],
)
def test_normalized_path(path: str, raw: bytes, normal: str | None) -> None:
    assert normalized_path({"type": "http", "path": path, "raw_path": raw}) == normal


def raw_get(port: int, target: str) -> int:
    """Status of ``GET <target>`` sent byte for byte (no client-side normalization)."""
    with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".encode())
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    return int(head.split(b" ", 2)[1])


def test_exclude_paths_under_uvicorn(
    redis_server: RedisServer, redis_client: Any, tmp_path: Path
) -> None:
    gateway = GatewayProcess(
        "websocket_gateway", {"REDIS_URL": redis_server.url}, tmp_path
    ).wait_ready()
    try:
        assert raw_get(gateway.port, "/healthz") == 200
        assert raw_get(gateway.port, "/admin") == 401
        for target in (
            "/healthz/../admin",
            "/healthz/%2e%2e/admin",
            "/healthz/%2E%2E/admin",
            "/healthz%2F..%2Fadmin",
            "/healthz%2f..%2fadmin",
            "/healthz/./../admin",
            "//healthz/../admin",
            "/healthz/..%2Fadmin",
        ):
            assert raw_get(gateway.port, target) == 401, target
    finally:
        gateway.close()
