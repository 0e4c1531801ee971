"""ASGI WebSocket guard: admit a socket with a valid session, close it when that ends.

Wrap the app (Starlette, FastAPI, any ASGI app)::

    app = WebSocketSessionGuard(app, verifier, follower, cookie="session")

A handshake without a valid token is accepted and closed at once with code ``4001`` and
the rejection reason as the close reason (a close before accepting would reach a browser
as a bare HTTP 403, without the reason). An admitted socket finds its principal in
``scope["state"]["authsession_principal"]``; when its session is revoked, expires or
disappears, the guard closes it with ``4001`` and the reason (``revoked``, ``expired``,
``unknown_session``, ...) and the app's next ``receive()`` returns
``websocket.disconnect``. HTTP requests pass through untouched (protect them with
:class:`~authsession.gateway.SessionAuthMiddleware`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from authsession.gateway.asgi import PRINCIPAL_STATE_KEY, bearer_token
from authsession.gateway.follower import EventFollower
from authsession.gateway.live import CLOSE_CODE, LiveGuard, cookie_value
from authsession.gateway.subscription import SessionEnd
from authsession.gateway.verifier import Rejection, TokenVerifier

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send


class WebSocketSessionGuard:
    """Verifies every WebSocket handshake and closes sockets whose session ended."""

    def __init__(
        self,
        app: ASGIApp,
        verifier: TokenVerifier,
        follower: EventFollower,
        *,
        header: str = "authorization",
        cookie: str | None = None,
        paths: Iterable[str] | None = None,
        meter_provider: Any = None,
    ) -> None:
        self._app = app
        self._header = header.lower().encode("latin-1")
        self._cookie = cookie
        self._paths = None if paths is None else frozenset(paths)
        self.guard = LiveGuard(
            verifier, follower, transport="websocket", meter_provider=meter_provider
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Guard WebSocket scopes (on ``paths``, or all); pass anything else through."""
        if scope["type"] != "websocket" or (
            self._paths is not None and scope["path"] not in self._paths
        ):
            await self._app(scope, receive, send)
            return
        result = await self.guard.admit(self._token(scope))
        if isinstance(result, Rejection):
            await _refuse(result.reason, receive, send)
            return
        scope.setdefault("state", {})[PRINCIPAL_STATE_KEY] = result.principal
        connection = _Connection(receive, send)
        result.subscription.set_callback(connection.session_ended)
        try:
            await self._app(scope, connection.receive, connection.send)
        finally:
            await connection.finish()
            self.guard.closed(result, connection.reason)

    def _token(self, scope: Scope) -> str | Rejection | None:
        values = [v for k, v in scope["headers"] if k.lower() == self._header]
        if len(values) > 1:
            return Rejection("malformed_token", "two credentials")
        if values:
            return bearer_token(values[0].decode("latin-1"))
        if self._cookie is not None:
            cookies = [v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"cookie"]
            return cookie_value("; ".join(cookies), self._cookie)
        return None


async def _refuse(reason: str, receive: Receive, send: Send) -> None:
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.close", "code": CLOSE_CODE, "reason": reason})


class _Connection:
    """The app's view of one admitted socket; the guard can close it at any moment."""

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self._lock = asyncio.Lock()
        self._ended = asyncio.Event()
        self._end: SessionEnd | None = None
        self._pending: asyncio.Future[Message] | None = None
        self._accepted = False
        self._closed = False
        self._client_gone = False
        self._closer: asyncio.Task[None] | None = None

    @property
    def reason(self) -> str:
        """Why the connection closed: the session's end, the client, or the app."""
        if self._end is not None:
            return self._end.reason
        return "client" if self._client_gone else "server"

    def session_ended(self, end: SessionEnd) -> None:
        if self._closed or self._client_gone:
            return
        self._end = end
        self._ended.set()
        self._closer = asyncio.ensure_future(self._close_for_session())

    async def _close_for_session(self) -> None:
        assert self._end is not None
        async with self._lock:
            if self._accepted and not self._closed:
                self._closed = True
                with contextlib.suppress(Exception):
                    await self._send(
                        {"type": "websocket.close", "code": CLOSE_CODE, "reason": self._end.reason}
                    )

    async def send(self, message: Message) -> None:
        async with self._lock:
            kind = message["type"]
            if self._closed:
                if self._end is not None and kind != "websocket.close":
                    # The guard closed the socket: tell a send-only app, as a server would
                    # (Starlette turns this into WebSocketDisconnect).
                    raise OSError(f"the session ended: {self._end.reason}")
                return
            if kind == "websocket.accept":
                await self._send(message)
                self._accepted = True
                if self._end is not None:
                    self._closed = True
                    await self._send(
                        {"type": "websocket.close", "code": CLOSE_CODE, "reason": self._end.reason}
                    )
                return
            if kind == "websocket.close":
                self._closed = True
            await self._send(message)

    async def receive(self) -> Message:
        if self._end is not None:
            return self._disconnect()
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._receive())
        ended = asyncio.ensure_future(self._ended.wait())
        waiting: list[asyncio.Future[Any]] = [self._pending, ended]
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
        if self._pending.done():
            message = self._pending.result()
            self._pending = None
            if message["type"] == "websocket.disconnect":
                self._client_gone = True
            return message
        return self._disconnect()

    def _disconnect(self) -> Message:
        assert self._end is not None
        return {"type": "websocket.disconnect", "code": CLOSE_CODE, "reason": self._end.reason}

    async def finish(self) -> None:
        if self._closer is not None:
            with contextlib.suppress(Exception):
                await self._closer
        if self._pending is not None and not self._pending.done():
            self._pending.cancel()
            with contextlib.suppress(BaseException):
                await self._pending
