"""The ports of the domain core: everything it needs from the outside, as Protocols.

Redis adapters live in ``authsession.redis``, outbound services in
``authsession.services``; unit tests use the in-memory fakes in ``tests/fakes.py``.
Every adapter failure surfaces as :class:`~authsession.domain.errors.ServiceUnavailable`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Literal, Protocol

from authsession.domain.model import Challenge, ChallengeStatus, RuntimeConfig, Session


class Clock(Protocol):
    """Source of the current time (UTC, timezone-aware)."""

    def now(self) -> datetime:
        """The current instant."""
        ...


class Component(Protocol):
    """Anything checked with a bounded ``PING`` at startup."""

    async def ping(self) -> None:
        """Raise if the component cannot reach its backing store."""
        ...


class AttemptResult(StrEnum):
    """What the atomic evaluation of one confirm attempt found."""

    NOT_FOUND = "not_found"
    EXPIRED = "expired"
    EXHAUSTED = "exhausted"
    WRONG = "wrong"
    MATCH_SENT = "match_sent"
    MATCH_CONFIRMED = "match_confirmed"


@dataclass(frozen=True, slots=True)
class AttemptOutcome:
    """Result of :meth:`ChallengeStore.attempt`; ``challenge`` is set on a match."""

    result: AttemptResult
    attempts_remaining: int = 0
    challenge: Challenge | None = None


@dataclass(frozen=True, slots=True)
class Confirmation:
    """What :meth:`ChallengeStore.confirm` writes into the challenge it confirms."""

    device_session_id: str
    session_token: str
    user_id: str
    # The end of the idempotency window, the challenge's new ``expires_at``.
    expires_at: datetime


class ChallengeStore(Component, Protocol):
    """Login challenges (``<prefix>challenge:<id>``)."""

    async def create(self, challenge: Challenge, retention: timedelta) -> None:
        """Write a new challenge; it expires ``retention`` after its ``expires_at``."""
        ...

    async def get(self, challenge_id: str) -> Challenge | None:
        """Read a challenge, or ``None`` when there is no record."""
        ...

    async def set_delivery_status(self, challenge_id: str, status: ChallengeStatus) -> None:
        """Move a ``pending_delivery`` challenge to ``sent`` or ``delivery_failed``."""
        ...

    async def attempt(
        self, challenge_id: str, candidate_hmac: str, now: datetime, max_attempts: int
    ) -> AttemptOutcome:
        """Atomically evaluate one code: a mismatch consumes an attempt, a match nothing."""
        ...

    async def confirm(
        self,
        challenge_id: str,
        confirmation: Confirmation,
        *,
        now: datetime,
        max_attempts: int,
        retention: timedelta,
    ) -> Challenge | None:
        """Atomically move a ``sent`` challenge to ``confirmed_pending_expire``.

        The record keeps ``retention`` past the confirmation's ``expires_at``.

        Returns the confirmed challenge: ours, or the one a concurrent confirm won with.
        ``None`` when the challenge can no longer be confirmed (gone, expired, exhausted).
        """
        ...


Scope = Literal["email", "user"]
"""What a cooldown or a failure budget is kept for: a normalized e-mail (its hash) or a
resolved user id (CONTRACT §12/§5: two spellings of one account share the user's)."""


class ResendThrottle(Component, Protocol):
    """The fixed resend cooldown per normalized e-mail and per user."""

    async def acquire(
        self, subject: str, owner: str, cooldown: timedelta, scope: Scope = "email"
    ) -> bool:
        """Start the window if none is open; ``False`` when inside one."""
        ...

    async def release(self, subject: str, owner: str, scope: Scope = "email") -> None:
        """Close the window, only if ``owner`` opened it."""
        ...


class FailureBudget(Component, Protocol):
    """Wrong codes per normalized e-mail, and per user, over a rolling hour."""

    async def reserve(
        self, subject: str, now: datetime, window: timedelta, limit: int, scope: Scope = "email"
    ) -> str | None:
        """Atomically take one slot if fewer than ``limit`` are used; its id, or ``None``.

        A kept slot is a recorded failure; :meth:`release` gives it back.
        """
        ...

    async def reserve_all(
        self, subjects: Sequence[tuple[str, Scope]], now: datetime, window: timedelta, limit: int
    ) -> list[tuple[str, str, Scope]] | None:
        """One slot of each budget ``(subject, scope)`` at once: ``(subject, member, scope)``
        per subject, or ``None`` when one of them is full (any slot taken is given back)."""
        ...

    async def release(self, subject: str, member: str, scope: Scope = "email") -> None:
        """Give back a reserved slot."""
        ...

    async def release_all(self, slots: Sequence[tuple[str, str, Scope]]) -> None:
        """Give back several reserved slots ``(subject, member, scope)`` at once."""
        ...


class ExtendResult(StrEnum):
    """Outcome of :meth:`SessionStore.extend`."""

    EXTENDED = "extended"
    NOT_FOUND = "not_found"
    NOT_ACTIVE = "not_active"


class CreateResult(StrEnum):
    """Outcome of :meth:`SessionStore.create`."""

    CREATED = "created"
    EXISTS = "exists"
    BLOCKED = "blocked"


@dataclass(frozen=True, slots=True)
class CreateOutcome:
    """What :meth:`SessionStore.create` did: the session as stored, and what it evicted."""

    result: CreateResult
    session: Session | None = None
    evicted: tuple[Session, ...] = ()


class SessionStore(Component, Protocol):
    """Device sessions and the per-user index."""

    async def create(
        self, session: Session, retention: timedelta, *, limit: int, now: datetime
    ) -> CreateOutcome:
        """Index and write a session unless it exists, atomically with the session limit.

        ``EXISTS``: the stored session (which may be revoked). ``BLOCKED``: the user has a
        block marker, nothing written. ``CREATED``: the stored session (its ``created_at``
        may be moved just past the user's newest one, so that it is the newest) and, with
        ``limit`` > 0, the older active sessions it revoked with ``session_limit``.
        """
        ...

    async def get(self, device_session_id: str) -> Session | None:
        """Read one session."""
        ...

    async def list_for_user(self, user_id: str) -> list[Session]:
        """All readable sessions of a user, newest first; prunes index members Redis dropped."""
        ...

    async def revoke(
        self, device_session_id: str, reason: str, now: datetime
    ) -> tuple[Session, bool] | None:
        """Revoke (idempotent); the session and whether this call revoked it, or ``None``."""
        ...

    async def revoke_all(
        self, user_id: str, reason: str, now: datetime, except_session_id: str | None
    ) -> RevokedAll:
        """Revoke all of a user's sessions but one, atomically.

        Every revoked session of the user (but the excluded one) with whether this call
        revoked it, so that the caller can republish those whose snapshot lags, and the
        indexed ids whose record is gone (their snapshot may still say active).
        """
        ...

    async def extend(
        self, device_session_id: str, expires_at: datetime, now: datetime, retention: timedelta
    ) -> tuple[ExtendResult, Session | None]:
        """Move ``expires_at`` of an active session."""
        ...


@dataclass(frozen=True, slots=True)
class RevokedAll:
    """What a revoke-all found: the user's revoked sessions and the ids without a record."""

    sessions: list[tuple[Session, bool]]
    lost: list[str]


class PublishResult(StrEnum):
    """What one projection publication did to the snapshot key."""

    WRITTEN = "written"
    UNCHANGED = "unchanged"
    STALE = "stale"


AppendPolicy = Literal["always", "if_needed"]
"""When a publication of an unchanged snapshot appends its event again: ``always`` (an
explicit republication), or ``if_needed`` (only if that version's event never made it)."""


class ProjectionPublisher(Component, Protocol):
    """The gateway projection: snapshot key, then stream event (CONTRACT §9)."""

    async def publish(
        self, session: Session, now: datetime, append: AppendPolicy = "always"
    ) -> PublishResult:
        """Publish the session's current version; never replaces a higher version."""
        ...

    async def revoke_orphan(self, device_session_id: str, now: datetime) -> PublishResult | None:
        """Answer an active snapshot without a source record with a ``revoked`` one.

        The new snapshot has the next version and ``revoke_reason`` ``source_lost``
        (CONTRACT §12/§9). ``None`` when there is no snapshot; ``UNCHANGED`` when it is
        revoked already.
        """
        ...


class BlockMarkers(Protocol):
    """Recent user blocks, so that a code mailed before a block cannot open a session."""

    async def mark_user_blocked(self, user_id: str, ttl: timedelta) -> None:
        """Remember the block for ``ttl``."""
        ...

    async def is_user_blocked(self, user_id: str) -> bool:
        """Whether a block is remembered."""
        ...


class SessionMetrics(Protocol):
    """The counters the session use cases report."""

    def session_revoked(self, reason: str) -> None:
        """One session revoked."""
        ...

    def projection_published(self, result: str) -> None:
        """One projection publication (``written``/``unchanged``/``stale``/``error``)."""
        ...


class LoginMetrics(Protocol):
    """The counters the login use cases report."""

    def challenge(self, status: str) -> None:
        """One challenge created (or its delivery outcome)."""
        ...

    def confirm(self, result: str) -> None:
        """One confirm answered (``created``, ``replayed``, or an error code)."""
        ...


class ConfigProvider(Component, Protocol):
    """Runtime limits, environment defaults overridden by ``<prefix>config``."""

    def current(self) -> RuntimeConfig:
        """The last good configuration (no I/O)."""
        ...


UserOutcome = Literal["existing", "unknown", "blocked", "created"]
UserStatus = Literal["active", "blocked"]


@dataclass(frozen=True, slots=True)
class UserResolution:
    """What the user service said about an e-mail."""

    outcome: UserOutcome
    user_id: str | None = None


class UserDirectory(Protocol):
    """The user service (CONTRACT §8)."""

    async def resolve_by_email(self, email: str) -> UserResolution:
        """``existing``/``unknown``/``blocked`` for a normalized e-mail."""
        ...

    async def ensure(self, email: str) -> UserResolution:
        """The user of an e-mail, created if needed (``existing``, ``created``, ``blocked``)."""
        ...

    async def block(self, user_id: str, reason: str) -> None:
        """Block a user; raises ``UserNotFound`` for an unknown user."""
        ...

    async def user_status(self, user_id: str) -> UserStatus | None:
        """``active`` or ``blocked`` now; ``None`` when the user no longer exists."""
        ...


@dataclass(frozen=True, slots=True)
class LoginCodeMessage:
    """One login-code mail."""

    email: str
    code: str
    challenge_id: str
    expires_at: datetime
    locale: str | None


class MailSender(Protocol):
    """The mail service (CONTRACT §8)."""

    async def send_login_code(self, message: LoginCodeMessage) -> None:
        """Hand the code to the mail service; never retried."""
        ...
