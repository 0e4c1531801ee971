"""Bearer session token → principal or rejection, from the gateway projection (CONTRACT §9)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol, TypeAlias, runtime_checkable

from redis.asyncio import Redis

from authsession.clock import utc_now
from authsession.projection_codec import DEFAULT_KEY_PREFIX, SessionSnapshot, SnapshotError

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
# The contract's identifier form (CONTRACT §1); written here rather than imported so that
# the library depends on nothing of the server.
_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
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


@runtime_checkable
class LearningCache(SnapshotCache, Protocol):
    """A cache that also keeps what the verifier read from Redis (the event follower)."""

    def watermark(self) -> Any:
        """Taken before a read of a snapshot key."""
        ...

    def remember(self, snapshot: SessionSnapshot, watermark: Any) -> bool:
        """Keep a snapshot read after ``watermark`` (if that is safe); whether it was kept."""
        ...


class TokenVerifier(Protocol):
    """Anything that turns a bearer token into a principal or a rejection."""

    async def verify(self, token: str | None) -> Principal | Rejection:
        """Verify one token; never raises."""
        ...


def is_valid_id(value: str) -> bool:
    """Whether ``value`` has the form of a device session id."""
    return _ID.fullmatch(value) is not None


def token_sha256(token: str) -> str:
    """Hex SHA-256 of a whole session token, as the snapshot's ``token_sha256`` holds it."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


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
        key_prefix: str = DEFAULT_KEY_PREFIX,
        clock: Callable[[], datetime] | None = None,
        cache: SnapshotCache | None = None,
        timeout: float | None = None,
    ) -> None:
        self._redis = redis
        self._key_prefix = key_prefix
        self._clock = clock or utc_now
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
        cache = self._cache
        snapshot = cache.cached(device_session_id) if cache is not None else None
        if snapshot is None:
            watermark = cache.watermark() if isinstance(cache, LearningCache) else None
            read = await self._read(device_session_id)
            if isinstance(read, Rejection):
                return read
            snapshot = read
            result = self._check(token, device_session_id, snapshot)
            # Only a snapshot the token matched is kept: strangers' guesses must not fill
            # (or evict from) the cache.
            if isinstance(cache, LearningCache) and not _is_hash_failure(result):
                cache.remember(snapshot, watermark)
            return result
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
        # Both are ASCII hex strings, which compare_digest takes as they are.
        if not hmac.compare_digest(token_sha256(token), snapshot.token_sha256):
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


def _is_hash_failure(result: Principal | Rejection) -> bool:
    return isinstance(result, Rejection) and result.reason == "verification_failed"
