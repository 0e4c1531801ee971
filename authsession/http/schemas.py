"""Request and response models of both APIs (the HTTP edge only).

Docstrings and ``Field`` descriptions here are what the OpenAPI documents show: plain
sentences for API users, with an example for every field.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from authsession.domain.codes import CODE_PATTERN, ID_PATTERN
from authsession.domain.model import Session, SessionStatus
from authsession.domain.sessions import REASON_PATTERN
from authsession.domain.units import format_time

Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
Reason = Annotated[str, StringConstraints(pattern=REASON_PATTERN)]
Timestamp = Annotated[
    str,
    Field(
        description="RFC 3339 in UTC with millisecond precision and a Z suffix",
        json_schema_extra={"format": "date-time"},
        examples=["2026-12-02T08:40:00.000Z"],
    ),
]

CHALLENGE_ID = "Qm9KtY3xN2pL8sVd4rWc1fHj6aZe0uTb"
SESSION_ID = "dS7hG2kLp9QwXz4mNc8vBt1yRf6aJe3u"
USER_ID = "usr_8c1f4e2b9a7d6c5e3f1a0b9c8d7e6f5a"
SESSION_END = "2027-01-01T08:40:00.000Z"  # 720h after the Timestamp example
SESSION_TOKEN = f"{SESSION_ID}.hW3kq9ZpL2xT8vNc4mR7yB1sFd6gJe0uA5oIiK2lPqE"

ChallengeIdField = Field(
    description="Opaque id of the challenge (URL-safe, 16-64 characters)",
    examples=[CHALLENGE_ID],
)
SessionIdField = Field(
    description="Opaque id of the device session (URL-safe, 16-64 characters)",
    examples=[SESSION_ID],
)
UserIdField = Field(
    description="The user service's id of the user (1-128 of A-Z a-z 0-9 . _ : @ -)",
    examples=[USER_ID],
)


class Request(BaseModel):
    """Base of request bodies: strict types, unknown fields rejected (400)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class SendEmailCodeRequest(Request):
    """The address to mail a login code to, and the language of the mail."""

    email: Annotated[
        str,
        StringConstraints(min_length=3, max_length=320),
        Field(
            description="E-mail address; trimmed, lower-cased and IDNA-encoded before use "
            "(at most 254 characters then)",
            examples=["jane@example.com"],
        ),
    ]
    locale: (
        Annotated[
            str,
            StringConstraints(max_length=35, pattern=r"^[A-Za-z]{1,8}(-[A-Za-z0-9]{1,8})*$"),
        ]
        | None
    ) = Field(
        default=None,
        description="BCP 47 language tag for the mail, passed to the mail service",
        examples=["en-GB"],
    )


class ConfirmRequest(Request):
    """The challenge and the 6-digit code from the mail; optionally a name for the device."""

    challenge_id: Annotated[Id, ChallengeIdField]
    code: Annotated[
        str,
        StringConstraints(pattern=CODE_PATTERN),
        Field(description="The 6 ASCII digits from the mail", examples=["482913"]),
    ]
    device_name: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = Field(
        default=None,
        description="A name the user recognizes the session by (1-64 characters)",
        examples=["Jane's laptop"],
    )


REASON_DESCRIPTION = "Why (1-64 of a-z 0-9 _ . -); recorded and published to gateways"


class RevokeRequest(Request):
    """Optional body of revoke: why the session is revoked."""

    reason: Reason | None = Field(
        default=None,
        description=f"{REASON_DESCRIPTION}; default revoked_by_backend",
        examples=["password_changed"],
    )


class RevokeAllRequest(Request):
    """Optional body of revoke-all: why, and one session to keep (the caller's own)."""

    reason: Reason | None = Field(
        default=None,
        description=f"{REASON_DESCRIPTION}; default revoked_by_backend",
        examples=["logout_everywhere"],
    )
    except_session_id: Id | None = Field(
        default=None,
        description="A session of the user to leave active",
        examples=[SESSION_ID],
    )


class ExtendRequest(Request):
    """Optional body of extend: the new lifetime, counted from now."""

    ttl: Annotated[str, StringConstraints(min_length=1, max_length=32)] | None = Field(
        default=None,
        description="Go duration (300ms, 2s, 1h30m, 720h), at most SESSION_TTL (the default)",
        examples=["168h"],
    )


class BlockRequest(Request):
    """Optional body of block: why the user is blocked (sent to the user service)."""

    reason: Reason | None = Field(
        default=None,
        description=f"{REASON_DESCRIPTION}; the sessions are revoked with user_blocked",
        examples=["fraud"],
    )


class LogoutRequest(Request):
    """``POST /api/v1/public/auth/logout``: no fields (an empty body or ``{}``)."""


class LogoutResponse(BaseModel):
    """The session the token belonged to, now revoked."""

    device_session_id: Annotated[
        str,
        Field(
            description="The device session the token belonged to",
            examples=["AbCdx5k3q7Jm2VhR8sLw0ZtYbN4cE6fGiU1oPa9"],
        ),
    ]
    status: Annotated[Literal["revoked"], Field(description="Always revoked", examples=["revoked"])]


class ChallengeResponse(BaseModel):
    """A new challenge; the same answer whether or not a mail was sent."""

    challenge_id: Annotated[str, ChallengeIdField]
    expires_at: Annotated[
        Timestamp,
        Field(
            description="Until when the code can be confirmed (RFC 3339, UTC)",
            examples=["2026-12-02T08:50:00.000Z"],
        ),
    ]


class ConfirmResponse(BaseModel):
    """The new device session and its token (created is false on an idempotent replay)."""

    device_session_id: Annotated[str, SessionIdField]
    session_token: Annotated[
        str,
        Field(
            description="Bearer token for the gateways: the session id, a dot, a secret. "
            "Returned only here; keep it secret",
            examples=[SESSION_TOKEN],
        ),
    ]
    user_id: Annotated[str, UserIdField]
    expires_at: Annotated[
        Timestamp,
        Field(description="Absolute end of the session", examples=[SESSION_END]),
    ]
    created: Annotated[
        bool,
        Field(
            description="false when this answers a retry of a confirm that already succeeded",
            examples=[True],
        ),
    ]


class SessionResponse(BaseModel):
    """A device session as it is now; it never contains token material."""

    device_session_id: Annotated[str, SessionIdField]
    user_id: Annotated[str, UserIdField]
    status: Annotated[
        Literal["active", "revoked", "expired"],
        Field(description="expired: past expires_at without a revocation", examples=["active"]),
    ]
    created_at: Timestamp
    expires_at: Annotated[Timestamp, Field(examples=[SESSION_END])]
    revoked_at: Annotated[
        Timestamp | None,
        Field(description="When it was revoked; null while not revoked", examples=[None]),
    ]
    revoke_reason: Annotated[
        str | None,
        Field(
            description="Why it was revoked (revoked_by_backend, user_blocked, "
            "session_limit or the caller's reason); null while not revoked",
            examples=[None],
        ),
    ]
    device_name: Annotated[
        str | None, Field(description="As given at confirm", examples=["Jane's laptop"])
    ]
    client_ip: Annotated[
        str, Field(description="Client IP seen at confirm", examples=["203.0.113.7"])
    ]
    user_agent: Annotated[
        str,
        Field(
            description="User-Agent seen at confirm (at most 512 characters)",
            examples=["Mozilla/5.0 (X11; Linux x86_64)"],
        ),
    ]
    version: Annotated[
        int,
        Field(
            description="Bumped by every change; gateways keep the highest they have seen",
            examples=[1],
        ),
    ]

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

    user_id: Annotated[str, UserIdField]
    sessions: list[SessionResponse]


class RevokedResponse(BaseModel):
    """The sessions this call revoked (sessions already revoked are not listed)."""

    user_id: Annotated[str, UserIdField]
    revoked_session_ids: Annotated[list[str], Field(examples=[[SESSION_ID]])]


class ErrorDetail(BaseModel):
    """What went wrong: a stable code to branch on, a message for humans, details."""

    code: Annotated[
        str,
        Field(
            description="Stable, machine-readable error code; the OpenAPI documents list "
            "every value",
            examples=["invalid_request"],
        ),
    ]
    message: Annotated[
        str,
        Field(
            description="Human-readable; may change, do not parse",
            examples=["the request is not valid"],
        ),
    ]
    details: dict[str, Any] | None = Field(
        default=None,
        description="Only for some codes, e.g. attempts_remaining with invalid_code",
        examples=[{"attempts_remaining": 4}],
    )


class ErrorResponse(BaseModel):
    """The body of every error answer, whichever layer produced it."""

    error: ErrorDetail
