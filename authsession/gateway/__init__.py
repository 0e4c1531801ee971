"""The library for gateways written in Python: verify session tokens from the projection,
and close live connections when their session ends.

Usage (HTTP)::

    import redis.asyncio
    from authsession.gateway import EventFollower, SessionAuthMiddleware, SessionVerifier

    client = redis.asyncio.Redis(host="redis", port=6379, decode_responses=True)
    follower = EventFollower(client)                    # optional: a local, bounded cache
    verifier = SessionVerifier(client, cache=follower, timeout=0.5)
    app = SessionAuthMiddleware(app, verifier, exclude_paths=("/healthz",))

    follower.start()                                    # at startup, e.g. in the lifespan
    principal = request.state.authsession_principal     # in a handler: user_id, ...
    await follower.aclose(); await client.aclose()      # at shutdown

Live connections: :class:`WebSocketSessionGuard` (ASGI WebSocket) and
``authsession.gateway.socketio_adapter.SocketIOSessionGuard`` (python-socketio, the
``socketio`` extra) verify the handshake, register the session with the follower, and
close the connection (code 4001 / event ``session_expired``) when the session is revoked,
expires or disappears. Anything else can use :meth:`EventFollower.register` directly.
Consumers of ``async for snapshot in follower`` each see every change.
"""

from authsession.gateway.asgi import (
    PRINCIPAL_STATE_KEY,
    SessionAuthMiddleware,
    bearer_token,
    normalized_path,
)
from authsession.gateway.follower import (
    EventFollower,
    FollowerOverflow,
    Watermark,
    parse_stream_id,
    trimmed_past,
)
from authsession.gateway.live import CLOSE_CODE, EXPIRED_EVENT, Admitted, LiveGuard
from authsession.gateway.metrics import SocketMetrics
from authsession.gateway.snapshot import SessionSnapshot, SnapshotError
from authsession.gateway.subscription import EndReason, SessionEnd, Subscription
from authsession.gateway.verifier import (
    Principal,
    Rejection,
    RejectionReason,
    SessionVerifier,
    SnapshotCache,
    TokenVerifier,
    split_token,
)
from authsession.gateway.websocket import WebSocketSessionGuard
from authsession.projection_codec import DEFAULT_EVENTS_STREAM, DEFAULT_KEY_PREFIX

__all__ = [
    "CLOSE_CODE",
    "DEFAULT_EVENTS_STREAM",
    "DEFAULT_KEY_PREFIX",
    "EXPIRED_EVENT",
    "PRINCIPAL_STATE_KEY",
    "Admitted",
    "EndReason",
    "EventFollower",
    "FollowerOverflow",
    "LiveGuard",
    "Principal",
    "Rejection",
    "RejectionReason",
    "SessionAuthMiddleware",
    "SessionEnd",
    "SessionSnapshot",
    "SessionVerifier",
    "SnapshotCache",
    "SnapshotError",
    "SocketMetrics",
    "Subscription",
    "TokenVerifier",
    "Watermark",
    "WebSocketSessionGuard",
    "bearer_token",
    "normalized_path",
    "parse_stream_id",
    "split_token",
    "trimmed_past",
]
