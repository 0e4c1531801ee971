"""The library for gateways written in Python: verify session tokens from the projection.

Usage::

    import asyncio, redis.asyncio
    from authsession.gateway import EventFollower, SessionAuthMiddleware, SessionVerifier

    client = redis.asyncio.Redis(host="redis", port=6379, decode_responses=True)
    follower = EventFollower(client)                    # optional: a local view of the stream
    verifier = SessionVerifier(client, cache=follower, timeout=0.5)
    app = SessionAuthMiddleware(app, verifier, exclude_paths=("/healthz",))

    task = asyncio.create_task(follower.run())          # at startup, e.g. in the lifespan
    principal = request.state.authsession_principal     # in a handler: user_id, ...
    follower.stop(); await task; await client.aclose()  # at shutdown
"""

from authsession.gateway.asgi import PRINCIPAL_STATE_KEY, SessionAuthMiddleware, bearer_token
from authsession.gateway.follower import (
    EventFollower,
    FollowerOverflow,
    Watermark,
    parse_stream_id,
    trimmed_past,
)
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

__all__ = [
    "PRINCIPAL_STATE_KEY",
    "EndReason",
    "EventFollower",
    "FollowerOverflow",
    "Principal",
    "Rejection",
    "RejectionReason",
    "SessionAuthMiddleware",
    "SessionEnd",
    "SessionSnapshot",
    "SessionVerifier",
    "SnapshotCache",
    "SnapshotError",
    "Subscription",
    "TokenVerifier",
    "Watermark",
    "bearer_token",
    "parse_stream_id",
    "split_token",
    "trimmed_past",
]
