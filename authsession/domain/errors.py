"""One error hierarchy for the whole service; each error carries its contract code.

``http/errors.py`` is the only place that turns these into status codes, and adds the
errors only HTTP produces (routing, body limit, rate limit)::

    AuthSessionError
    ├── InvalidRequest            invalid_request
    ├── InvalidCode               invalid_code        (details.attempts_remaining)
    ├── Unauthorized              unauthorized
    ├── UserBlocked               user_blocked
    ├── ChallengeNotFound         challenge_not_found
    ├── SessionNotFound           session_not_found
    ├── UserNotFound              user_not_found
    ├── SessionRevoked            session_revoked
    ├── ChallengeExpired          challenge_expired
    ├── TooManyAttempts           too_many_attempts
    └── ServiceUnavailable        service_unavailable (dependency: redis, user_service, …)
"""

from __future__ import annotations

from typing import Any, ClassVar


class AuthSessionError(Exception):
    """Base of every error the service answers with."""

    code: ClassVar[str] = "internal_error"
    default_message: ClassVar[str] = "internal error"

    def __init__(self, message: str | None = None, details: dict[str, Any] | None = None) -> None:
        self.message = message or self.default_message
        self.details = details
        super().__init__(self.message)


class InvalidRequest(AuthSessionError):
    """The request is malformed or a value has the wrong form."""

    code = "invalid_request"
    default_message = "the request is not valid"


class InvalidCode(AuthSessionError):
    """The code does not match (or no code was ever sent for the challenge)."""

    code = "invalid_code"
    default_message = "the code is not valid"

    def __init__(self, attempts_remaining: int) -> None:
        super().__init__(details={"attempts_remaining": attempts_remaining})
        self.attempts_remaining = attempts_remaining


class Unauthorized(AuthSessionError):
    """The bearer token (internal API token, or session token at logout) is not valid."""

    code = "unauthorized"
    default_message = "a valid bearer token is required"


class UserBlocked(AuthSessionError):
    """The user service says the user is blocked."""

    code = "user_blocked"
    default_message = "the user is blocked"


class ChallengeNotFound(AuthSessionError):
    """No challenge record exists (never did, or dropped after retention)."""

    code = "challenge_not_found"
    default_message = "no such challenge"


class SessionNotFound(AuthSessionError):
    """No session record exists."""

    code = "session_not_found"
    default_message = "no such session"


class UserNotFound(AuthSessionError):
    """The user service does not know the user."""

    code = "user_not_found"
    default_message = "no such user"


class SessionRevoked(AuthSessionError):
    """The session is revoked (or expired) and cannot be used or extended."""

    code = "session_revoked"
    default_message = "the session is no longer active"


class ChallengeExpired(AuthSessionError):
    """The challenge exists but is past its ``expires_at``."""

    code = "challenge_expired"
    default_message = "the challenge has expired"


class TooManyAttempts(AuthSessionError):
    """The challenge or the e-mail's hourly budget has no attempts left."""

    code = "too_many_attempts"
    default_message = "too many attempts"


class ServiceUnavailable(AuthSessionError):
    """A dependency (Redis, user service, mail service, projection) failed."""

    code = "service_unavailable"
    default_message = "a dependency is unavailable, retry later"

    def __init__(self, dependency: str, cause: str = "") -> None:
        super().__init__()
        self.dependency = dependency
        self.cause = cause

    def __str__(self) -> str:
        return f"{self.dependency} unavailable: {self.cause}" if self.cause else self.dependency
