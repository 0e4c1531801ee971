"""Request and response models of both APIs (the HTTP edge only)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from authsession.domain.codes import CODE_PATTERN, ID_PATTERN, USER_ID_PATTERN
from authsession.domain.model import Session, SessionStatus
from authsession.domain.sessions import REASON_PATTERN
from authsession.domain.units import format_time

Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
UserId = Annotated[str, StringConstraints(pattern=USER_ID_PATTERN)]
Reason = Annotated[str, StringConstraints(pattern=REASON_PATTERN)]
Timestamp = Annotated[str, Field(description="RFC 3339, UTC, with a Z suffix")]


class Request(BaseModel):
    """Base of request bodies: strict types, unknown fields rejected."""

    model_config = ConfigDict(extra="forbid", strict=True)


class SendEmailCodeRequest(Request):
    """``POST /api/v1/public/auth/send-email-code``."""

    email: Annotated[str, StringConstraints(min_length=3, max_length=320)]
    locale: (
        Annotated[
            str,
            StringConstraints(max_length=35, pattern=r"^[A-Za-z]{1,8}(-[A-Za-z0-9]{1,8})*$"),
        ]
        | None
    ) = None


class ConfirmRequest(Request):
    """``POST /api/v1/public/auth/confirm``."""

    challenge_id: Id
    code: Annotated[str, StringConstraints(pattern=CODE_PATTERN)]
    device_name: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None


class RevokeRequest(Request):
    """``POST /api/v1/internal/sessions/{id}/revoke``."""

    reason: Reason | None = None


class RevokeAllRequest(Request):
    """``POST /api/v1/internal/users/{user_id}/sessions/revoke``."""

    reason: Reason | None = None
    except_session_id: Id | None = None


class ExtendRequest(Request):
    """``POST /api/v1/internal/sessions/{id}/extend``."""

    ttl: Annotated[str, StringConstraints(min_length=1, max_length=32)] | None = Field(
        default=None, description="Go duration, at most SESSION_TTL (the default)"
    )


class BlockRequest(Request):
    """``POST /api/v1/internal/users/{user_id}/block``."""

    reason: Reason | None = None


class ChallengeResponse(BaseModel):
    """A fresh challenge."""

    challenge_id: str
    expires_at: Timestamp


class ConfirmResponse(BaseModel):
    """A device session (``created`` is false on an idempotent replay)."""

    device_session_id: str
    session_token: str
    user_id: str
    expires_at: Timestamp
    created: bool


class SessionResponse(BaseModel):
    """The session object of CONTRACT §6 (no token material)."""

    device_session_id: str
    user_id: str
    status: Literal["active", "revoked", "expired"]
    created_at: Timestamp
    expires_at: Timestamp
    revoked_at: Timestamp | None
    revoke_reason: str | None
    device_name: str | None
    client_ip: str
    user_agent: str
    version: int

    @classmethod
    def of(cls, session: Session, now: datetime) -> SessionResponse:
        """Render a domain session as seen at ``now``."""
        status: SessionStatus = session.status_at(now)
        return cls(
            device_session_id=session.device_session_id,
            user_id=session.user_id,
            status=status.value,
            created_at=format_time(session.created_at),
            expires_at=format_time(session.expires_at),
            revoked_at=format_time(session.revoked_at) if session.revoked_at else None,
            revoke_reason=session.revoke_reason,
            device_name=session.device_name,
            client_ip=session.client_ip,
            user_agent=session.user_agent,
            version=session.version,
        )


class SessionListResponse(BaseModel):
    """A user's sessions, newest first."""

    user_id: str
    sessions: list[SessionResponse]


class RevokedResponse(BaseModel):
    """The ids one call revoked."""

    user_id: str
    revoked_session_ids: list[str]


class ErrorDetail(BaseModel):
    """The ``error`` member of every error body."""

    code: str
    message: str
    details: dict[str, Any] | None = None


class ErrorResponse(BaseModel):
    """``{"error": {"code", "message", "details"?}}``."""

    error: ErrorDetail
