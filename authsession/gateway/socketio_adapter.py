"""python-socketio integration: authenticate the handshake, expire the session live.

::

    sio = socketio.AsyncServer(async_mode="asgi")
    guard = SocketIOSessionGuard(sio, verifier, follower, cookie="session")

    @sio.event
    async def connect(sid, environ, auth):
        principal = await guard.connect(sid, environ, auth)   # refuses with the reason

    @sio.event
    async def disconnect(sid, reason=None):
        guard.disconnect(sid, reason)

The token is taken from the ``auth`` payload ``{"token": "..."}``, else the
``Authorization: Bearer`` header, else the cookie named ``cookie`` (if given). A refused
client gets ``connect_error`` with the rejection reason as ``message``. When an admitted
session is revoked, expires or disappears, the client receives ``session_expired`` with
``{"reason": ...}`` and is disconnected.
"""

from __future__ import annotations

import contextlib
from typing import Any

import socketio

from authsession.gateway.asgi import bearer_token
from authsession.gateway.follower import EventFollower
from authsession.gateway.live import EXPIRED_EVENT, Admitted, LiveGuard, cookie_value
from authsession.gateway.subscription import SessionEnd
from authsession.gateway.verifier import Principal, Rejection, TokenVerifier

# python-socketio's disconnect reasons, as bounded metric attribute values.
_CLIENT_REASONS = {
    "client disconnect": "client",
    "transport close": "transport_close",
    "transport error": "transport_error",
    "ping timeout": "ping_timeout",
    "server disconnect": "server",
}


class SocketIOSessionGuard:
    """Session authentication and live expiry for one ``socketio.AsyncServer`` namespace."""

    def __init__(
        self,
        sio: socketio.AsyncServer,
        verifier: TokenVerifier,
        follower: EventFollower,
        *,
        cookie: str | None = None,
        namespace: str = "/",
        event: str = EXPIRED_EVENT,
        meter_provider: Any = None,
    ) -> None:
        self._sio = sio
        self._cookie = cookie
        self._namespace = namespace
        self._event = event
        self._live: dict[str, Admitted] = {}
        self._ended: dict[str, str] = {}
        self.guard = LiveGuard(
            verifier, follower, transport="socketio", meter_provider=meter_provider
        )

    def principal(self, sid: str) -> Principal | None:
        """The principal of a connected client."""
        admitted = self._live.get(sid)
        return admitted.principal if admitted is not None else None

    @property
    def connected(self) -> int:
        """How many admitted clients are connected."""
        return len(self._live)

    async def connect(self, sid: str, environ: dict[str, Any], auth: Any) -> Principal:
        """Call from the ``connect`` handler: the principal, or ``ConnectionRefusedError``."""
        result = await self.guard.admit(self.token(environ, auth))
        if isinstance(result, Rejection):
            raise socketio.exceptions.ConnectionRefusedError(result.reason)
        self._live[sid] = result
        result.subscription.set_callback(lambda end: self._expire(sid, end))
        return result.principal

    def disconnect(self, sid: str, reason: str | None = None) -> None:
        """Call from the ``disconnect`` handler (with python-socketio's reason if given)."""
        admitted = self._live.pop(sid, None)
        ended = self._ended.pop(sid, None)
        if admitted is None:
            return
        label = ended or _CLIENT_REASONS.get(reason or "client disconnect", "other")
        self.guard.closed(admitted, label)

    def token(self, environ: dict[str, Any], auth: Any) -> str | Rejection | None:
        """The handshake's token: ``auth["token"]``, the bearer header, or the cookie."""
        if isinstance(auth, dict) and auth.get("token") is not None:
            token = auth["token"]
            if not isinstance(token, str):
                return Rejection("malformed_token", "auth token is not a string")
            return token
        header = environ.get("HTTP_AUTHORIZATION")
        if isinstance(header, str) and header:
            return bearer_token(header)
        if self._cookie is not None:
            return cookie_value(environ.get("HTTP_COOKIE"), self._cookie)
        return None

    async def _expire(self, sid: str, end: SessionEnd) -> None:
        if sid not in self._live:
            return
        self._ended[sid] = end.reason
        with contextlib.suppress(Exception):
            await self._sio.emit(
                self._event, {"reason": end.reason}, to=sid, namespace=self._namespace
            )
        await self._sio.disconnect(sid, namespace=self._namespace)
        # python-socketio calls the disconnect handler itself; in case the app has none:
        self.disconnect(sid)
