"""Value objects of the domain: challenges, sessions, revoke reasons, runtime config."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from authsession.domain.units import RateLimit
from authsession.projection_codec import SessionSnapshot, snapshot_status


class ChallengeStatus(StrEnum):
    """Lifecycle of a login challenge (CONTRACT §7)."""

    PENDING_DELIVERY = "pending_delivery"
    SENT = "sent"
    DELIVERY_THROTTLED = "delivery_throttled"
    DELIVERY_SUPPRESSED = "delivery_suppressed"
    DELIVERY_FAILED = "delivery_failed"
    CONFIRMED_PENDING_EXPIRE = "confirmed_pending_expire"


class SessionStatus(StrEnum):
    """Status of a device session as reported by the internal API."""

    ACTIVE = "active"
    REVOKED = "revoked"
    EXPIRED = "expired"


class RevokeReason(StrEnum):
    """The revoke reasons the service itself gives (callers may give their own)."""

    REVOKED_BY_BACKEND = "revoked_by_backend"
    USER_BLOCKED = "user_blocked"
    SESSION_LIMIT = "session_limit"
    SOURCE_LOST = "source_lost"
    LOGOUT = "logout"


@dataclass(frozen=True, slots=True)
class Challenge:
    """One login challenge as kept in the source of truth."""

    challenge_id: str
    status: ChallengeStatus
    email_hash: str
    created_at: datetime
    expires_at: datetime
    attempts: int = 0
    user_id: str | None = None
    email: str | None = None
    code_hmac: str | None = None
    code_salt: str | None = None
    device_session_id: str | None = None
    session_token: str | None = None


@dataclass(frozen=True, slots=True)
class Session:
    """One device session as kept in the source of truth."""

    device_session_id: str
    user_id: str
    token_sha256: str
    created_at: datetime
    expires_at: datetime
    client_ip: str
    user_agent: str
    version: int = 1
    device_name: str | None = None
    revoked_at: datetime | None = None
    revoke_reason: str | None = None

    def status_at(self, now: datetime) -> SessionStatus:
        """``revoked`` wins over ``expired``; ``expired`` once past ``expires_at``."""
        if self.revoked_at is not None:
            return SessionStatus.REVOKED
        if now >= self.expires_at:
            return SessionStatus.EXPIRED
        return SessionStatus.ACTIVE

    def snapshot(self, published_at: datetime) -> SessionSnapshot:
        """The gateway projection of this version (CONTRACT §9)."""
        return SessionSnapshot(
            device_session_id=self.device_session_id,
            user_id=self.user_id,
            status=snapshot_status(self.revoked_at),
            token_sha256=self.token_sha256,
            expires_at=self.expires_at,
            version=self.version,
            created_at=self.created_at,
            revoked_at=self.revoked_at,
            revoke_reason=self.revoke_reason,
            published_at=published_at,
        )


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """The limits that the ``<prefix>config`` hash may override at run time."""

    signup_enabled: bool
    challenge_ttl: timedelta
    session_ttl: timedelta
    max_confirm_attempts: int
    max_failed_confirms_per_email: int
    max_active_sessions_per_user: int
    public_rate_limit: RateLimit | None


@dataclass(frozen=True, slots=True)
class FixedConfig:
    """Limits that only change with a restart (environment variables)."""

    challenge_retention: timedelta
    confirm_idempotency_window: timedelta
    resend_cooldown: timedelta
    session_retention: timedelta
    failure_window: timedelta = field(default=timedelta(hours=1))
