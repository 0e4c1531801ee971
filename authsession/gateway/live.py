"""What every live-connection adapter does: verify, subscribe, count and log.

An adapter (the ASGI WebSocket guard, the python-socketio integration) extracts the
token from its handshake and hands it to :class:`LiveGuard`, which verifies it, registers
the session with the follower (re-checked under the subscription, so a revocation
between the two is not missed), and records the outcome as metrics and as one
structured log line. Neither the metrics nor the logs ever carry the token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from authsession.gateway.follower import EventFollower
from authsession.gateway.metrics import SocketMetrics
from authsession.gateway.subscription import Subscription
from authsession.gateway.verifier import Principal, Rejection, TokenVerifier

log = logging.getLogger("authsession.gateway")

CLOSE_CODE = 4001
"""WebSocket close code of a connection whose session was rejected or ended (§12)."""

EXPIRED_EVENT = "session_expired"
"""Socket.IO event a client receives, with ``{"reason"}``, before it is disconnected."""


@dataclass(frozen=True, slots=True)
class Admitted:
    """A live connection that passed the handshake."""

    principal: Principal
    subscription: Subscription


class LiveGuard:
    """Handshake → :class:`Admitted` or :class:`Rejection`, with metrics and log lines."""

    def __init__(
        self,
        verifier: TokenVerifier,
        follower: EventFollower,
        *,
        transport: str,
        meter_provider: Any = None,
    ) -> None:
        self._verifier = verifier
        self._follower = follower
        self._transport = transport
        self.metrics = SocketMetrics(transport, meter_provider)

    async def admit(self, token: str | Rejection | None) -> Admitted | Rejection:
        """Verify the token and subscribe to its session; never raises.

        ``token`` may already be a rejection, when the adapter found the handshake's
        credentials unusable (two of them, a non-string ``auth`` token): it is counted
        and logged like any other.
        """
        if isinstance(token, Rejection):
            return self._reject(token)
        result = await self._verifier.verify(token)
        if isinstance(result, Rejection):
            return self._reject(result)
        subscription = await self._follower.register(result.device_session_id, result.user_id)
        end = subscription.end
        if end is not None:
            # Revoked (or gone) between the verification and the subscription.
            return self._reject(Rejection(end.reason, "ended during the handshake"))
        self.metrics.accepted()
        log.info(
            "socket.handshake",
            extra={
                "event": "socket.handshake",
                "outcome": "accepted",
                "transport": self._transport,
                "device_session_id": result.device_session_id,
            },
        )
        return Admitted(result, subscription)

    def closed(self, admitted: Admitted, reason: str) -> None:
        """An admitted connection closed for ``reason``; ends its subscription."""
        admitted.subscription.cancel()
        self.metrics.disconnected(reason)
        log.info(
            "socket.disconnect",
            extra={
                "event": "socket.disconnect",
                "reason": reason,
                "transport": self._transport,
                "device_session_id": admitted.principal.device_session_id,
            },
        )

    def _reject(self, rejection: Rejection) -> Rejection:
        self.metrics.rejected(rejection.reason)
        log.info(
            "socket.handshake",
            extra={
                "event": "socket.handshake",
                "outcome": "rejected",
                "reason": rejection.reason,
                "transport": self._transport,
            },
        )
        return rejection


def cookie_value(header: str | None, name: str) -> str | None:
    """The value of cookie ``name`` in a ``Cookie`` header, or None."""
    if not header:
        return None
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return value or None
    return None
