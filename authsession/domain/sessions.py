"""Session use cases: create, list, read, revoke, revoke-all, extend, block.

Every change of a session goes through the store (which increments ``version``
atomically) and is then published to the gateway projection.
"""

from __future__ import annotations

import hmac
import logging
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from authsession.domain.codes import split_session_token, token_sha256
from authsession.domain.errors import (
    InvalidRequest,
    ServiceUnavailable,
    SessionNotFound,
    SessionRevoked,
    Unauthorized,
    UserBlocked,
)
from authsession.domain.model import FixedConfig, RevokeReason, Session
from authsession.domain.ports import (
    AppendPolicy,
    BlockMarkers,
    Clock,
    ConfigProvider,
    CreateResult,
    ExtendResult,
    ProjectionPublisher,
    PublishResult,
    SessionMetrics,
    SessionStore,
    UserDirectory,
)
from authsession.domain.units import parse_duration

log = logging.getLogger("authsession.sessions")

# Compared with when a token names no session, so that an unknown session and a wrong
# secret take the same work (a SHA-256 no token can have).
_NO_TOKEN_HASH = "0" * 64
REASON_PATTERN = r"^[a-z0-9_.-]{1,64}$"
_REASON_RE = re.compile(REASON_PATTERN)

StatusFilter = Literal["active", "revoked", "expired", "all"]


class NoMetrics:
    """Metrics that go nowhere (unit tests, telemetry off)."""

    def session_revoked(self, reason: str) -> None:
        """Ignore."""

    def projection_published(self, result: str) -> None:
        """Ignore."""


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """Where a confirm came from."""

    ip: str
    user_agent: str


class SessionService:
    """The session use cases of CONTRACT §6, and session creation for the login flow."""

    def __init__(
        self,
        *,
        store: SessionStore,
        projection: ProjectionPublisher,
        config: ConfigProvider,
        users: UserDirectory,
        blocks: BlockMarkers,
        clock: Clock,
        fixed: FixedConfig,
        metrics: SessionMetrics | None = None,
    ) -> None:
        self._store = store
        self._projection = projection
        self._config = config
        self._users = users
        self._blocks = blocks
        self._clock = clock
        self._fixed = fixed
        self._metrics = metrics or NoMetrics()

    # -- creation (login flow) ---------------------------------------------------------

    async def materialize(
        self,
        *,
        device_session_id: str,
        session_token: str,
        user_id: str,
        client: ClientInfo,
        device_name: str | None,
    ) -> Session:
        """Write the session of a confirmed challenge unless it exists, then publish it.

        Idempotent: a retry after any failure completes the remaining steps. Returns the
        session as stored (which may be revoked if it was revoked since).
        """
        now = self._clock.now()
        candidate = Session(
            device_session_id=device_session_id,
            user_id=user_id,
            token_sha256=token_sha256(session_token),
            created_at=now,
            expires_at=now + self._config.current().session_ttl,
            client_ip=client.ip,
            user_agent=client.user_agent,
            device_name=device_name,
        )
        limit = self._config.current().max_active_sessions_per_user
        outcome = await self._store.create(
            candidate, self._fixed.session_retention, limit=limit, now=now
        )
        if outcome.result is CreateResult.BLOCKED:
            # A block ran before this session could be written: none is created.
            raise UserBlocked()
        session = outcome.session
        if session is None:  # the store always returns the session it created or found
            raise SessionNotFound()
        created = outcome.result is CreateResult.CREATED
        for evicted in outcome.evicted:
            self._revoked(evicted, RevokeReason.SESSION_LIMIT)
            await self.publish(evicted)
        if not created and session.revoked_at is None and limit > 0:
            # A retry: the first attempt may have revoked older sessions in the source of
            # truth and then failed before publishing them.
            await self._republish_evictions(session)
        await self.publish(session, "always" if created else "if_needed")
        return session

    async def is_user_blocked(self, user_id: str) -> bool:
        """Whether this service blocked the user recently (see :class:`BlockMarkers`)."""
        return await self._blocks.is_user_blocked(user_id)

    async def _republish_evictions(self, keep: Session) -> None:
        """Republish what the creation of ``keep`` revoked, where the projection lags."""
        for session in await self._store.list_for_user(keep.user_id):
            if (
                session.revoke_reason == RevokeReason.SESSION_LIMIT
                and session.revoked_at is not None
                and session.revoked_at >= keep.created_at
            ):
                await self.publish(session, "if_needed")

    # -- projection --------------------------------------------------------------------

    async def publish(self, session: Session, append: AppendPolicy = "always") -> None:
        """Publish the session's current version to the gateway projection."""
        try:
            result = await self._projection.publish(session, self._clock.now(), append)
        except Exception:
            self._metrics.projection_published("error")
            raise
        self._metrics.projection_published(result.value)

    # -- internal API ------------------------------------------------------------------

    async def list_sessions(self, user_id: str, status: StatusFilter = "all") -> list[Session]:
        """A user's sessions, newest first, optionally filtered by status."""
        sessions = await self._store.list_for_user(user_id)
        if status == "all":
            return sessions
        now = self._clock.now()
        return [s for s in sessions if s.status_at(now).value == status]

    async def get(self, device_session_id: str) -> Session:
        """One session, or ``SessionNotFound``."""
        session = await self._store.get(device_session_id)
        if session is None:
            raise SessionNotFound()
        return session

    async def logout(self, token: str | None) -> Session:
        """Revoke the session a bearer token belongs to (reason ``logout``, idempotent).

        ``Unauthorized`` for a missing or malformed token, an unknown session and a wrong
        secret alike; the token's hash is compared in constant time.
        """
        parts = split_session_token(token) if token else None
        session = await self._store.get(parts[0]) if parts is not None else None
        expected = session.token_sha256 if session is not None else _NO_TOKEN_HASH
        presented = token_sha256(token) if token else _NO_TOKEN_HASH[::-1]
        matches = hmac.compare_digest(presented.encode(), expected.encode())
        if session is None or not matches:
            raise Unauthorized()
        revoked, _ = await self._revoke_and_publish(session.device_session_id, RevokeReason.LOGOUT)
        return revoked

    async def revoke(self, device_session_id: str, reason: str | None = None) -> Session:
        """Revoke one session (idempotent: a repeat keeps ``revoked_at``, republishes)."""
        session, _ = await self._revoke_and_publish(
            device_session_id, _checked_reason(reason, RevokeReason.REVOKED_BY_BACKEND)
        )
        return session

    async def revoke_all(
        self, user_id: str, reason: str | None = None, except_session_id: str | None = None
    ) -> list[str]:
        """Revoke every session of a user but one; the ids this call revoked.

        Sessions revoked before are republished where their snapshot lags behind the
        source of truth (a retry after a failed publication restores the projection), and
        an indexed session whose record is gone has a still-active snapshot revoked.
        """
        reason = _checked_reason(reason, RevokeReason.REVOKED_BY_BACKEND)
        outcome = await self._store.revoke_all(
            user_id, reason, self._clock.now(), except_session_id
        )
        revoked: list[str] = []
        failure: ServiceUnavailable | None = None
        for session, changed in outcome.sessions:
            if changed:
                self._revoked(session, reason)
                revoked.append(session.device_session_id)
            try:
                await self.publish(session, "always" if changed else "if_needed")
            except ServiceUnavailable as exc:
                # Publish the others anyway, then fail: the retry republishes what lags.
                failure = failure or exc
        for device_session_id in outcome.lost:
            try:
                await self._revoke_orphan(device_session_id)
            except ServiceUnavailable as exc:
                failure = failure or exc
        if failure is not None:
            raise failure
        return revoked

    async def extend(self, device_session_id: str, ttl: str | None = None) -> Session:
        """Set ``expires_at`` to now + ttl (default and maximum: ``SESSION_TTL``)."""
        max_ttl = self._config.current().session_ttl
        if ttl is None:
            duration = max_ttl
        else:
            try:
                duration = parse_duration(ttl)
            except ValueError as exc:
                raise InvalidRequest(str(exc), {"field": "ttl"}) from None
            if duration <= timedelta(0) or duration > max_ttl:
                raise InvalidRequest(
                    "ttl must be positive and at most SESSION_TTL", {"field": "ttl"}
                )
        now = self._clock.now()
        result, session = await self._store.extend(
            device_session_id, now + duration, now, self._fixed.session_retention
        )
        if result is ExtendResult.NOT_FOUND:
            # The record may have been lost while its snapshot still says active.
            await self._revoke_orphan(device_session_id)
            raise SessionNotFound()
        if result is ExtendResult.NOT_ACTIVE or session is None:
            # Republish a revocation whose earlier publication may have failed.
            revoked = await self._store.get(device_session_id)
            if revoked is not None:
                await self.publish(revoked, "if_needed")
            raise SessionRevoked()
        await self.publish(session)
        return session

    async def block_user(self, user_id: str, reason: str | None = None) -> list[str]:
        """Block in the user service first, then revoke everything with ``user_blocked``."""
        await self._users.block(user_id, _checked_reason(reason, RevokeReason.USER_BLOCKED))
        # Codes mailed before the block stay confirmable for up to CHALLENGE_TTL.
        await self._blocks.mark_user_blocked(user_id, self._config.current().challenge_ttl)
        return await self.revoke_all(user_id, RevokeReason.USER_BLOCKED)

    async def _revoke_and_publish(
        self, device_session_id: str, reason: str
    ) -> tuple[Session, bool]:
        now = self._clock.now()
        outcome = await self._store.revoke(device_session_id, reason, now)
        if outcome is None:
            # No record: if the projection still has an active snapshot (the record was
            # lost), take that token back before answering 404.
            await self._revoke_orphan(device_session_id)
            raise SessionNotFound()
        session, changed = outcome
        if changed:
            self._revoked(session, reason)
        await self.publish(session)
        return session, changed

    async def _revoke_orphan(self, device_session_id: str) -> None:
        try:
            result = await self._projection.revoke_orphan(device_session_id, self._clock.now())
        except Exception:
            self._metrics.projection_published("error")
            raise
        if result is not None and result is not PublishResult.UNCHANGED:
            self._metrics.projection_published(result.value)
            self._metrics.session_revoked(RevokeReason.SOURCE_LOST)
            log.warning(
                "snapshot without a source record revoked",
                extra={"device_session_id": device_session_id, "reason": RevokeReason.SOURCE_LOST},
            )

    def _revoked(self, session: Session, reason: str) -> None:
        self._metrics.session_revoked(reason)
        log.info(
            "session revoked",
            extra={
                "device_session_id": session.device_session_id,
                "user_id": session.user_id,
                "reason": reason,
            },
        )


def _checked_reason(reason: str | None, default: str) -> str:
    if reason is None:
        return default
    if not _REASON_RE.fullmatch(reason):
        raise InvalidRequest("reason must be 1-64 characters of [a-z0-9_.-]", {"field": "reason"})
    return reason
