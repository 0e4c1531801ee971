"""Bearer session token → principal or rejection, from the gateway projection (CONTRACT §9)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, Protocol, TypeAlias

from redis.asyncio import Redis

from authsession.domain.codes import is_valid_id, token_sha256
from authsession.gateway.snapshot import SessionSnapshot, SnapshotError

log = logging.getLogger("authsession.gateway")

RejectionReason: TypeAlias = Literal[
    "missing_token",
    "malformed_token",
    "unknown_session",
    "revoked",
    "expired",
    "verification_failed",
    "internal_error",
]

# The service issues 32-character ids and 43-character secrets; anything far longer is
# not a token of ours, and refusing it early keeps hashing and key names bounded.
MAX_TOKEN_LENGTH = 256
# The secret is what follows the last "." of an RFC 6750 b64token, so no "." in it.
_SECRET = re.compile(r"^[A-Za-z0-9_~+/-]+=*$")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a verified token belongs to."""

    user_id: str
    device_session_id: str
    expires_at: datetime
    version: int


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a token was not accepted (one of the reasons of CONTRACT §10)."""

    reason: RejectionReason
    # For logs only, never shown to the client; left out of equality so that tests and
    # callers can compare with ``Rejection("revoked")``.
    detail: str = field(default="", compare=False)


class SnapshotCache(Protocol):
    """A local view of snapshots that the verifier consults before Redis."""

    def cached(self, device_session_id: str) -> SessionSnapshot | None:
        """A snapshot that may be trusted without reading Redis, or None to read Redis."""
        ...


class TokenVerifier(Protocol):
    """Anything that turns a bearer token into a principal or a rejection."""

    async def verify(self, token: str | None) -> Principal | Rejection:
        """Verify one token; never raises."""
        ...


def split_token(token: str) -> tuple[str, str] | None:
    """``(device_session_id, secret)`` split at the last ``.``, or None if malformed."""
    if len(token) > MAX_TOKEN_LENGTH:
        return None
    device_session_id, dot, secret = token.rpartition(".")
    if not dot or not is_valid_id(device_session_id) or _SECRET.fullmatch(secret) is None:
        return None
    return device_session_id, secret


class SessionVerifier:
    """Verifies session tokens against the snapshot keys (optionally through a cache)."""

    def __init__(
        self,
        redis: Redis,
        *,
        key_prefix: str = "gateway:session:",
        clock: Callable[[], datetime] | None = None,
        cache: SnapshotCache | None = None,
        timeout: float | None = None,
    ) -> None:
        self._redis = redis
        self._key_prefix = key_prefix
        self._clock = clock or _utc_now
        self._cache = cache
        self._timeout = timeout

    async def verify(self, token: str | None) -> Principal | Rejection:
        """Token → principal, or the first rejection that applies; never raises."""
        if not token:
            return Rejection("missing_token")
        parts = split_token(token)
        if parts is None:
            return Rejection("malformed_token")
        device_session_id = parts[0]
        snapshot = self._cache.cached(device_session_id) if self._cache is not None else None
        if snapshot is None:
            read = await self._read(device_session_id)
            if isinstance(read, Rejection):
                return read
            snapshot = read
        return self._check(token, device_session_id, snapshot)

    async def _read(self, device_session_id: str) -> SessionSnapshot | Rejection:
        try:
            async with asyncio.timeout(self._timeout):
                document = await self._redis.get(self._key_prefix + device_session_id)
        # Any failure of the client (RedisError, OSError, TimeoutError, a protocol error
        # surfacing as something else) must become a rejection: a gateway's request path
        # should answer 503, not crash.
        except Exception as exc:
            log.debug("gateway snapshot read failed: %s", type(exc).__name__)
            return Rejection("internal_error", f"{type(exc).__name__}: {exc}")
        if document is None:
            return Rejection("unknown_session")
        try:
            return SessionSnapshot.from_json(document)
        except SnapshotError as exc:
            return Rejection("verification_failed", str(exc))

    def _check(
        self, token: str, device_session_id: str, snapshot: SessionSnapshot
    ) -> Principal | Rejection:
        # The hash is checked before the status so that only the token's holder learns
        # whether its session was revoked or expired.
        expected = snapshot.token_sha256.encode("ascii")
        if not hmac.compare_digest(token_sha256(token).encode("ascii"), expected):
            return Rejection("verification_failed", "token hash mismatch")
        if snapshot.device_session_id != device_session_id:
            return Rejection("verification_failed", "snapshot belongs to another session")
        if not snapshot.active:
            return Rejection("revoked")
        if snapshot.expires_at <= self._clock():
            return Rejection("expired")
        return Principal(
            user_id=snapshot.user_id,
            device_session_id=snapshot.device_session_id,
            expires_at=snapshot.expires_at,
            version=snapshot.version,
        )


def _utc_now() -> datetime:
    return datetime.now(UTC)
