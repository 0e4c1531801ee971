"""In-memory fakes of every port of the domain core, for unit tests and the contract suite.

The store fakes mirror their Redis adapters and Lua scripts (``authsession/redis/``)
exactly; ``tests/integration/test_port_contracts.py`` runs one suite against both to keep
it that way. What they share with Redis:

- **Atomic steps.** Every operation first yields to the event loop once, then runs to the
  end without awaiting, like one Lua script; so ``asyncio.gather`` interleaves callers
  between operations but never inside one. Where an adapter makes two round trips (session
  creation: index, then record; projection: snapshot key, then stream event) the fake
  yields between them too.
- **Millisecond timestamps.** Times are stored truncated to whole milliseconds, as the
  adapters' RFC 3339 fields are, so what a fake returns equals what Redis returns.
- **Key expiry.** Each fake takes the clock and drops a record once the clock reaches the
  instant its Redis key would expire (``PEXPIREAT``/``PX``): challenges at ``expires_at +
  retention``, sessions at ``expires_at + retention``, snapshots at ``expires_at``,
  throttle windows after the cooldown, failure budgets a window after the last record.
  Comparisons with a ``now`` argument use that argument, as the scripts do.

Failures: every fake has ``fail(method, times=None)`` (``None``: until ``heal``) that makes
the method raise :class:`ServiceUnavailable` with the fake's dependency name (``redis``,
``projection``, ``user_service``, ``mail_service``); ``fail("ping")`` breaks ``ping()``.

:func:`make_world` wires the two domain services over a full set of fakes.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from authsession.domain.errors import ServiceUnavailable, UserNotFound
from authsession.domain.login import LoginService
from authsession.domain.model import (
    Challenge,
    ChallengeStatus,
    FixedConfig,
    RevokeReason,
    RuntimeConfig,
    Session,
)
from authsession.domain.ports import (
    AppendPolicy,
    AttemptOutcome,
    AttemptResult,
    Clock,
    Confirmation,
    CreateOutcome,
    CreateResult,
    ExtendResult,
    LoginCodeMessage,
    PublishResult,
    RevokedAll,
    Scope,
    UserResolution,
    UserStatus,
)
from authsession.domain.sessions import ClientInfo, SessionService
from authsession.domain.units import (
    RateLimit,
    from_epoch_ms,
    to_epoch_ms,
)
from authsession.projection_codec import SessionSnapshot, event_fields
from authsession.wiring import Ports, build_services

# The contract's defaults (CONTRACT §3).
DEFAULT_RUNTIME = RuntimeConfig(
    signup_enabled=True,
    challenge_ttl=timedelta(minutes=10),
    session_ttl=timedelta(hours=720),
    max_confirm_attempts=5,
    max_failed_confirms_per_email=50,
    max_active_sessions_per_user=0,
    public_rate_limit=None,
)
DEFAULT_FIXED = FixedConfig(
    challenge_retention=timedelta(hours=1),
    confirm_idempotency_window=timedelta(minutes=5),
    resend_cooldown=timedelta(minutes=1),
    session_retention=timedelta(hours=168),
)
DEFAULT_START = datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
# How old an index member without a record must be before a listing prunes it.
PRUNE_GRACE = timedelta(minutes=1)


def ms(value: datetime) -> datetime:
    """``value`` in UTC truncated to whole milliseconds (what Redis keeps of a time)."""
    utc = value.astimezone(UTC)
    return utc.replace(microsecond=utc.microsecond // 1000 * 1000)


# --------------------------------------------------------------------------- clock
class FixedClock:
    """A clock that moves only when told to (``set``/``advance``)."""

    def __init__(self, start: datetime = DEFAULT_START) -> None:
        self.current = start

    def now(self) -> datetime:
        """The current (fixed) instant."""
        return self.current

    def set(self, value: datetime) -> None:
        """Jump to ``value``."""
        self.current = value

    def advance(self, delta: timedelta) -> None:
        """Move forward by ``delta``."""
        self.current += delta


# --------------------------------------------------------------------------- faults
class Faulty:
    """Injectable failures and the startup ``PING`` shared by every fake."""

    def __init__(self, dependency: str) -> None:
        self.dependency = dependency
        self._faults: dict[str, int | None] = {}

    def fail(self, method: str, times: int | None = None) -> None:
        """Make ``method`` raise ``ServiceUnavailable``: ``times`` times, or until healed."""
        self._faults[method] = times

    def heal(self, method: str | None = None) -> None:
        """Stop failing ``method`` (every method if ``None``)."""
        if method is None:
            self._faults.clear()
        else:
            self._faults.pop(method, None)

    def _check(self, method: str) -> None:
        if method not in self._faults:
            return
        left = self._faults[method]
        if left is not None:
            if left <= 1:
                del self._faults[method]
            else:
                self._faults[method] = left - 1
        raise ServiceUnavailable(self.dependency, f"injected failure of {method}")

    async def _step(self, method: str) -> None:
        """Yield once (other callers may run), then fail if told to."""
        await asyncio.sleep(0)
        self._check(method)

    async def ping(self) -> None:
        """Succeed unless ``fail("ping")`` was called."""
        await self._step("ping")


@dataclass
class _Expiring:
    """A value and the instant its Redis key would expire."""

    value: Any
    drop_at: datetime


class _ExpiringMap:
    """A dict whose entries vanish once the clock reaches their ``drop_at``."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._data: dict[str, _Expiring] = {}

    def get(self, key: str) -> Any:
        entry = self._data.get(key)
        if entry is None:
            return None
        if self._clock.now() >= entry.drop_at:
            del self._data[key]
            return None
        return entry.value

    def drop_at(self, key: str) -> datetime | None:
        return self._data[key].drop_at if self.get(key) is not None else None

    def put(self, key: str, value: Any, drop_at: datetime) -> None:
        if self._clock.now() >= drop_at:  # PEXPIREAT in the past deletes the key
            self._data.pop(key, None)
        else:
            self._data[key] = _Expiring(value, drop_at)

    def delete(self, key: str) -> bool:
        present = self.get(key) is not None
        self._data.pop(key, None)
        return present

    def live_keys(self) -> list[str]:
        return [k for k in list(self._data) if self.get(k) is not None]


# --------------------------------------------------------------------------- challenges
def _stored_challenge(challenge: Challenge) -> Challenge:
    return replace(
        challenge, created_at=ms(challenge.created_at), expires_at=ms(challenge.expires_at)
    )


class FakeChallengeStore(Faulty):
    """Challenges in memory; mirrors ``RedisChallengeStore`` and its scripts."""

    def __init__(self, clock: Clock) -> None:
        super().__init__("redis")
        self._clock = clock
        self._records = _ExpiringMap(clock)

    def ids(self) -> list[str]:
        """Every challenge id with a live record."""
        return self._records.live_keys()

    async def create(self, challenge: Challenge, retention: timedelta) -> None:
        """HSET + PEXPIREAT: fields merge into a live record of the same id."""
        await self._step("create")
        stored = _stored_challenge(challenge)
        existing: Challenge | None = self._records.get(challenge.challenge_id)
        if existing is not None:
            given = {
                f.name: getattr(stored, f.name)
                for f in fields(Challenge)
                if getattr(stored, f.name) is not None
            }
            stored = replace(existing, **given)
        self._records.put(challenge.challenge_id, stored, challenge.expires_at + retention)

    async def get(self, challenge_id: str) -> Challenge | None:
        """The live record, or ``None``."""
        await self._step("get")
        record: Challenge | None = self._records.get(challenge_id)
        return record

    async def set_delivery_status(self, challenge_id: str, status: ChallengeStatus) -> None:
        """Only a ``pending_delivery`` record moves; a missing one is not recreated."""
        await self._step("set_delivery_status")
        record: Challenge | None = self._records.get(challenge_id)
        if record is not None and record.status is ChallengeStatus.PENDING_DELIVERY:
            self._update(replace(record, status=status))

    def _update(self, record: Challenge, drop_at: datetime | None = None) -> None:
        keep = self._records.drop_at(record.challenge_id)
        assert keep is not None
        self._records.put(record.challenge_id, record, drop_at or keep)

    async def attempt(
        self, challenge_id: str, candidate_hmac: str, now: datetime, max_attempts: int
    ) -> AttemptOutcome:
        """``challenge_attempt.lua``: expired, exhausted, match (free) or wrong (counted)."""
        await self._step("attempt")
        record: Challenge | None = self._records.get(challenge_id)
        if record is None:
            return AttemptOutcome(AttemptResult.NOT_FOUND)
        if ms(now) >= record.expires_at:
            return AttemptOutcome(AttemptResult.EXPIRED)
        if record.attempts >= max_attempts:
            return AttemptOutcome(AttemptResult.EXHAUSTED)
        stored = (record.code_hmac or "").encode()
        same = bool(stored) and hmac.compare_digest(stored, candidate_hmac.encode())
        if same and record.status is ChallengeStatus.SENT:
            return AttemptOutcome(AttemptResult.MATCH_SENT, max_attempts - record.attempts, record)
        if same and record.status is ChallengeStatus.CONFIRMED_PENDING_EXPIRE:
            return AttemptOutcome(
                AttemptResult.MATCH_CONFIRMED, max_attempts - record.attempts, record
            )
        record = replace(record, attempts=record.attempts + 1)
        self._update(record)
        return AttemptOutcome(AttemptResult.WRONG, max(0, max_attempts - record.attempts))

    async def confirm(
        self,
        challenge_id: str,
        confirmation: Confirmation,
        *,
        now: datetime,
        max_attempts: int,
        retention: timedelta,
    ) -> Challenge | None:
        """``challenge_confirm.lua``: ``sent`` → ``confirmed_pending_expire`` at most once."""
        await self._step("confirm")
        record: Challenge | None = self._records.get(challenge_id)
        if record is None:
            return None
        if record.status is ChallengeStatus.CONFIRMED_PENDING_EXPIRE:
            return record
        if record.status is not ChallengeStatus.SENT:
            return None
        if ms(now) >= record.expires_at or record.attempts >= max_attempts:
            return None
        record = replace(
            record,
            status=ChallengeStatus.CONFIRMED_PENDING_EXPIRE,
            device_session_id=confirmation.device_session_id,
            session_token=confirmation.session_token,
            user_id=confirmation.user_id,
            expires_at=ms(confirmation.expires_at),
        )
        self._update(record, confirmation.expires_at + retention)
        return record


# --------------------------------------------------------------------------- sessions
def _stored_session(session: Session) -> Session:
    return replace(
        session,
        created_at=ms(session.created_at),
        expires_at=ms(session.expires_at),
        revoked_at=ms(session.revoked_at) if session.revoked_at is not None else None,
    )


class FakeSessionStore(Faulty):
    """Sessions, the per-user index and the block markers; mirrors ``RedisSessionStore``."""

    def __init__(self, clock: Clock) -> None:
        super().__init__("redis")
        self._clock = clock
        self._records = _ExpiringMap(clock)
        self._index: dict[str, dict[str, int]] = {}  # user_id → {device_session_id: score}
        self._blocks = _ExpiringMap(clock)

    def drop(self, device_session_id: str) -> None:
        """Lose a record the way Redis does when its key expires (the index keeps it)."""
        self._records.delete(device_session_id)

    def all(self) -> list[Session]:
        """Every live record, in no particular order."""
        return [self._records.get(k) for k in self._records.live_keys()]

    async def create(
        self, session: Session, retention: timedelta, *, limit: int, now: datetime
    ) -> CreateOutcome:
        """``session_create.lua``: one atomic step with the block marker and the limit."""
        await self._step("create")
        existing: Session | None = self._records.get(session.device_session_id)
        if existing is not None:
            return CreateOutcome(CreateResult.EXISTS, existing)
        if self._blocks.get(session.user_id) is not None:
            return CreateOutcome(CreateResult.BLOCKED)
        index = self._index.setdefault(session.user_id, {})
        if limit > 0 and index:
            # The new session is the newest: its time is moved past every indexed one.
            newest = from_epoch_ms(max(index.values()) + 1)
            if newest > session.created_at:
                session = replace(session, created_at=newest)
        index.setdefault(session.device_session_id, to_epoch_ms(session.created_at))
        stored = _stored_session(session)
        self._records.put(session.device_session_id, stored, session.expires_at + retention)
        evicted: list[Session] = []
        if limit > 0:
            active = [
                (score, device_session_id)
                for device_session_id, score in index.items()
                if device_session_id != session.device_session_id
                and (record := self._records.get(device_session_id)) is not None
                and record.revoked_at is None
                and record.expires_at > ms(now)
            ]
            active.sort(reverse=True)
            for _, device_session_id in active[limit - 1 :]:
                record = self._revoke_record(device_session_id, "session_limit", now)
                evicted.append(record)
        return CreateOutcome(CreateResult.CREATED, stored, tuple(evicted))

    def _revoke_record(self, device_session_id: str, reason: str, now: datetime) -> Session:
        record: Session | None = self._records.get(device_session_id)
        assert record is not None
        record = replace(
            record, revoked_at=ms(now), revoke_reason=reason, version=record.version + 1
        )
        drop_at = self._records.drop_at(device_session_id)
        assert drop_at is not None
        self._records.put(device_session_id, record, drop_at)  # the key keeps its expiry
        return record

    async def revoke_all(
        self, user_id: str, reason: str, now: datetime, except_session_id: str | None
    ) -> RevokedAll:
        """``session_revoke_all.lua``: every indexed session but one, atomically."""
        await self._step("revoke_all")
        out: list[tuple[Session, bool]] = []
        lost: list[str] = []
        index = self._index.get(user_id, {})
        for device_session_id in sorted(index, key=lambda i: (index[i], i), reverse=True):
            record: Session | None = self._records.get(device_session_id)
            if device_session_id == except_session_id:
                continue
            if record is None:
                lost.append(device_session_id)
            elif record.revoked_at is None:
                out.append((self._revoke_record(device_session_id, reason, now), True))
            else:
                out.append((record, False))
        return RevokedAll(out, lost)

    async def get(self, device_session_id: str) -> Session | None:
        """The live record, or ``None``."""
        await self._step("get")
        record: Session | None = self._records.get(device_session_id)
        return record

    async def list_for_user(self, user_id: str) -> list[Session]:
        """``ZREVRANGE`` order (score, then id, both descending); prunes members without a
        record once they are older than :data:`PRUNE_GRACE` (younger ones may be sessions
        being created right now: indexed, not yet written)."""
        await self._step("list_for_user")
        index = self._index.get(user_id, {})
        ids = sorted(index, key=lambda i: (index[i], i), reverse=True)
        horizon = to_epoch_ms(self._clock.now() - PRUNE_GRACE)
        sessions: list[Session] = []
        for device_session_id in ids:
            record: Session | None = self._records.get(device_session_id)
            if record is not None:
                sessions.append(record)
            elif index[device_session_id] < horizon:
                del index[device_session_id]
        return sessions

    def indexed(self, user_id: str) -> list[str]:
        """The ids in a user's index, listed or not."""
        return list(self._index.get(user_id, {}))

    async def revoke(
        self, device_session_id: str, reason: str, now: datetime
    ) -> tuple[Session, bool] | None:
        """``session_revoke.lua``: the first revocation wins and bumps the version."""
        await self._step("revoke")
        record: Session | None = self._records.get(device_session_id)
        if record is None:
            return None
        if record.revoked_at is not None:
            return record, False
        return self._revoke_record(device_session_id, reason, now), True

    async def extend(
        self, device_session_id: str, expires_at: datetime, now: datetime, retention: timedelta
    ) -> tuple[ExtendResult, Session | None]:
        """``session_extend.lua``: only an active session moves; the version is bumped."""
        await self._step("extend")
        record: Session | None = self._records.get(device_session_id)
        if record is None:
            return ExtendResult.NOT_FOUND, None
        if record.revoked_at is not None or ms(now) >= record.expires_at:
            return ExtendResult.NOT_ACTIVE, None
        record = replace(record, expires_at=ms(expires_at), version=record.version + 1)
        self._records.put(device_session_id, record, expires_at + retention)
        self._index.setdefault(record.user_id, {}).setdefault(
            device_session_id, to_epoch_ms(record.created_at)
        )
        return ExtendResult.EXTENDED, record

    async def mark_user_blocked(self, user_id: str, ttl: timedelta) -> None:
        """Remember a block for ``ttl`` (at least a millisecond)."""
        await self._step("mark_user_blocked")
        self._blocks.put(user_id, True, self._clock.now() + max(_MS, ttl))

    async def is_user_blocked(self, user_id: str) -> bool:
        """Whether a block is remembered."""
        await self._step("is_user_blocked")
        return self._blocks.get(user_id) is not None


# --------------------------------------------------------------------------- throttles
def _scoped(subject: str, scope: Scope) -> str:
    """The fakes' key of a subject: the e-mail hash itself, or ``user:<id>``."""
    return subject if scope == "email" else f"user:{subject}"


class FakeResendThrottle(Faulty):
    """The resend cooldown; mirrors ``RedisResendThrottle`` (``SET NX PX``, owner release)."""

    def __init__(self, clock: Clock) -> None:
        super().__init__("redis")
        self._clock = clock
        self._windows = _ExpiringMap(clock)

    def owner(self, email_hash: str) -> str | None:
        """Who opened the current window, if one is open."""
        owner: str | None = self._windows.get(email_hash)
        return owner

    async def acquire(
        self, subject: str, owner: str, cooldown: timedelta, scope: Scope = "email"
    ) -> bool:
        """Open a window unless one is open; an open window is never extended."""
        await self._step("acquire")
        email_hash = _scoped(subject, scope)
        if self._windows.get(email_hash) is not None:
            return False
        length = max(_MS, timedelta(milliseconds=int(cooldown.total_seconds() * 1000)))
        self._windows.put(email_hash, owner, self._clock.now() + length)
        return True

    async def release(self, subject: str, owner: str, scope: Scope = "email") -> None:
        """Close the window, only if ``owner`` opened it."""
        await self._step("release")
        email_hash = _scoped(subject, scope)
        if self._windows.get(email_hash) == owner:
            self._windows.delete(email_hash)


class FakeFailureBudget(Faulty):
    """Wrong codes per e-mail; mirrors ``RedisFailureBudget`` (a scored set, ms scores)."""

    def __init__(self, clock: Clock) -> None:
        super().__init__("redis")
        self._clock = clock
        self._members = _ExpiringMap(clock)
        self._serial = 0

    def held(self, subject: str, now: datetime, window: timedelta, scope: Scope = "email") -> int:
        """Inspection for tests: the failures scored after ``now - window``."""
        email_hash = _scoped(subject, scope)
        since = to_epoch_ms(now - window)
        members: list[tuple[int, str]] = self._members.get(email_hash) or []
        return sum(1 for score, _ in members if score > since)

    async def reserve(
        self, subject: str, now: datetime, window: timedelta, limit: int, scope: Scope = "email"
    ) -> str | None:
        """Drop what left the window; take a slot (a member) if fewer than ``limit`` are used."""
        await self._step("reserve")
        return await self._reserve_one(subject, now, window, limit, scope)

    async def _reserve_one(
        self, subject: str, now: datetime, window: timedelta, limit: int, scope: Scope
    ) -> str | None:
        email_hash = _scoped(subject, scope)
        now_ms = to_epoch_ms(now)
        window_ms = int(window.total_seconds() * 1000)
        members: list[tuple[int, str]] = self._members.get(email_hash) or []
        kept = [(score, m) for score, m in members if score > now_ms - window_ms]
        if len(kept) >= limit:  # the script prunes but leaves the key's expiry alone
            drop_at = self._members.drop_at(email_hash)
            if drop_at is not None:
                self._members.put(email_hash, kept, drop_at)
            return None
        self._serial += 1
        member = f"{now_ms}:{self._serial}"
        self._members.put(
            email_hash,
            [*kept, (now_ms, member)],
            self._clock.now() + timedelta(milliseconds=window_ms),
        )
        return member

    async def reserve_all(
        self, subjects: Sequence[tuple[str, Scope]], now: datetime, window: timedelta, limit: int
    ) -> list[tuple[str, str, Scope]] | None:
        """A slot of each budget (one pipeline of the script), or none of them."""
        await self._step("reserve")
        taken: list[tuple[str, str, Scope]] = []
        for subject, scope in subjects:
            member = await self._reserve_one(subject, now, window, limit, scope)
            if member is None:
                for slot in taken:
                    await self._release(*slot)
                return None
            taken.append((subject, member, scope))
        return taken

    async def release_all(self, slots: Sequence[tuple[str, str, Scope]]) -> None:
        """Remove several reserved members (one pipeline of ``ZREM``)."""
        await self._step("release")
        for subject, member, scope in slots:
            await self._release(subject, member, scope)

    async def release(self, subject: str, member: str, scope: Scope = "email") -> None:
        """Remove one reserved member (``ZREM``)."""
        await self._step("release")
        await self._release(subject, member, scope)

    async def _release(self, subject: str, member: str, scope: Scope) -> None:
        email_hash = _scoped(subject, scope)
        members: list[tuple[int, str]] | None = self._members.get(email_hash)
        drop_at = self._members.drop_at(email_hash)
        if members is not None and drop_at is not None:
            self._members.put(email_hash, [(s, m) for s, m in members if m != member], drop_at)


class FakeRateLimiter(Faulty):
    """Fixed-window counter per client; mirrors ``RedisRateLimiter``."""

    def __init__(self, clock: Clock) -> None:
        super().__init__("redis")
        self._clock = clock
        self._counters = _ExpiringMap(clock)

    async def hit(self, client: str, limit: RateLimit, now: datetime) -> int | None:
        """Count one request; the seconds to the window's end when over the limit."""
        await self._step("hit")
        period_ms = limit.period_seconds * 1000
        now_ms = to_epoch_ms(now)
        window = now_ms // period_ms
        key = f"{client}:{window}"
        count: int | None = self._counters.get(key)
        if count is None:
            self._counters.put(key, 1, self._clock.now() + timedelta(milliseconds=period_ms))
            count = 1
        else:
            count += 1
            drop_at = self._counters.drop_at(key)
            assert drop_at is not None
            self._counters.put(key, count, drop_at)
        if count <= limit.count:
            return None
        return max(1, math.ceil(((window + 1) * period_ms - now_ms) / 1000))


# --------------------------------------------------------------------------- projection
class FakeProjection(Faulty):
    """The gateway projection: snapshot documents and the event list (CONTRACT §9).

    Mirrors ``RedisProjectionPublisher``: a compare-and-set on the version for the
    snapshot key, then one event per publication that is not ``stale`` (an ``unchanged``
    one repeats the document the key holds). Failures:
    ``fail("publish")`` before anything is written, ``fail("append_event")`` after the
    snapshot key is written (both raise ``ServiceUnavailable("projection")``).
    """

    def __init__(self, clock: Clock) -> None:
        super().__init__("projection")
        self._clock = clock
        self._snapshots = _ExpiringMap(clock)
        self.events: list[dict[str, str]] = []
        # Versions whose snapshot is written but whose event is not appended yet.
        self.pending: dict[str, int] = {}

    def raw_snapshot(self, device_session_id: str) -> str | None:
        """The JSON string under the snapshot key, if any."""
        raw: str | None = self._snapshots.get(device_session_id)
        return raw

    def snapshot(self, device_session_id: str) -> dict[str, Any] | None:
        """The parsed snapshot document, if any."""
        raw = self.raw_snapshot(device_session_id)
        if raw is None:
            return None
        document: dict[str, Any] = json.loads(raw)
        return document

    def events_for(self, device_session_id: str) -> list[dict[str, str]]:
        """The events of one session, oldest first."""
        return [e for e in self.events if e["device_session_id"] == device_session_id]

    async def publish(
        self, session: Session, now: datetime, append: AppendPolicy = "always"
    ) -> PublishResult:
        """Write unless the key holds the same or a higher version, then append the event
        (an unchanged snapshot appends again with ``always``, or while its event is
        pending)."""
        await self._step("publish")
        return await self._write(session.device_session_id, session.snapshot(now), now, append)

    async def revoke_orphan(self, device_session_id: str, now: datetime) -> PublishResult | None:
        """An active snapshot without a record becomes ``revoked`` / ``source_lost``."""
        await self._step("publish")
        raw = self.raw_snapshot(device_session_id)
        if raw is None:
            return None
        held = SessionSnapshot.from_json(raw)
        if not held.active:
            return PublishResult.UNCHANGED
        lost = held.revoked(now, RevokeReason.SOURCE_LOST)
        return await self._write(device_session_id, lost, now, "always")

    async def _write(
        self,
        device_session_id: str,
        snapshot: SessionSnapshot,
        now: datetime,
        append: AppendPolicy,
    ) -> PublishResult:
        held_raw = self.raw_snapshot(device_session_id)
        held = None if held_raw is None else SessionSnapshot.from_json(held_raw)
        document, status = snapshot.to_json(), snapshot.status
        if held is not None and held.version > snapshot.version:
            return PublishResult.STALE
        if held is not None and held.version == snapshot.version:
            result = PublishResult.UNCHANGED
            # The event repeats the document the key holds, not the one offered.
            assert held_raw is not None
            document, status = held_raw, held.status
            if append == "if_needed" and self.pending.get(device_session_id) != snapshot.version:
                return result
        else:
            result = PublishResult.WRITTEN
            if to_epoch_ms(snapshot.expires_at) <= to_epoch_ms(now):
                self._snapshots.delete(device_session_id)
                self.pending.pop(device_session_id, None)
            else:
                self._snapshots.put(device_session_id, document, snapshot.expires_at)
                self.pending[device_session_id] = snapshot.version
        await self._step("append_event")
        self.events.append(
            event_fields(device_session_id, snapshot.user_id, snapshot.version, status, document)
        )
        if self.pending.get(device_session_id) == snapshot.version:
            del self.pending[device_session_id]
        return result


# --------------------------------------------------------------------------- config
class FakeConfigProvider(Faulty):
    """A runtime config that tests set directly."""

    def __init__(self, config: RuntimeConfig = DEFAULT_RUNTIME) -> None:
        super().__init__("redis")
        self.config = config

    def current(self) -> RuntimeConfig:
        """The configuration in force."""
        return self.config

    def set(self, **changes: Any) -> None:
        """Override fields, like an operator writing the ``<prefix>config`` hash."""
        self.config = replace(self.config, **changes)


# --------------------------------------------------------------------------- outbound
class FakeUsers(Faulty):
    """The user service: a directory of e-mails, blocks, and a log of every call.

    Known e-mails resolve to ``existing`` (``blocked`` once blocked), others to
    ``unknown``; ``ensure`` creates unknown ones. ``resolutions``/``ensured`` override
    the answer for one e-mail. ``fail("resolve_by_email")`` etc. raise
    ``ServiceUnavailable("user_service")``; calls are logged even when they fail.
    """

    def __init__(self) -> None:
        super().__init__("user_service")
        self.users: dict[str, str] = {}  # normalized e-mail → user id
        self.blocked: dict[str, str] = {}  # user id → reason
        self.resolutions: dict[str, UserResolution] = {}
        self.ensured: dict[str, UserResolution] = {}
        self.calls: list[tuple[str, str]] = []
        self._ids = itertools.count(1)

    def add_user(self, email: str, user_id: str | None = None, *, blocked: bool = False) -> str:
        """Register an existing user; its id."""
        user_id = user_id or f"usr-{next(self._ids)}"
        self.users[email] = user_id
        if blocked:
            self.blocked[user_id] = "test"
        return user_id

    def calls_to(self, method: str) -> list[str]:
        """The arguments of every call to ``method``, in order."""
        return [arg for name, arg in self.calls if name == method]

    def _known(self, email: str) -> UserResolution | None:
        user_id = self.users.get(email)
        if user_id is None:
            return None
        return UserResolution("blocked" if user_id in self.blocked else "existing", user_id)

    async def resolve_by_email(self, email: str) -> UserResolution:
        """``existing``/``blocked`` for known e-mails, else ``unknown``."""
        self.calls.append(("resolve_by_email", email))
        await self._step("resolve_by_email")
        if email in self.resolutions:
            return self.resolutions[email]
        return self._known(email) or UserResolution("unknown")

    async def ensure(self, email: str) -> UserResolution:
        """The known user, or a new one (``created``)."""
        self.calls.append(("ensure", email))
        await self._step("ensure")
        if email in self.ensured:
            return self.ensured[email]
        known = self._known(email)
        if known is not None:
            return known
        return UserResolution("created", self.add_user(email))

    async def user_status(self, user_id: str) -> UserStatus | None:
        """``active``/``blocked`` for a known user id, ``None`` otherwise."""
        self.calls.append(("user_status", user_id))
        await self._step("user_status")
        if user_id not in self.users.values():
            return None
        return "blocked" if user_id in self.blocked else "active"

    async def block(self, user_id: str, reason: str) -> None:
        """Block a known user; ``UserNotFound`` otherwise."""
        self.calls.append(("block", user_id))
        await self._step("block")
        if user_id not in self.users.values():
            raise UserNotFound()
        self.blocked[user_id] = reason


class FakeMail(Faulty):
    """The mail service: ``attempted`` holds every message handed over, ``messages``
    the delivered ones; ``fail("send_login_code")`` makes delivery fail."""

    def __init__(self) -> None:
        super().__init__("mail_service")
        self.attempted: list[LoginCodeMessage] = []
        self.messages: list[LoginCodeMessage] = []

    async def send_login_code(self, message: LoginCodeMessage) -> None:
        """Record the message, then deliver it (or fail)."""
        self.attempted.append(message)
        await self._step("send_login_code")
        self.messages.append(message)

    def code_for(self, challenge_id: str) -> str | None:
        """The code handed over for a challenge (delivered or not)."""
        for message in reversed(self.attempted):
            if message.challenge_id == challenge_id:
                return message.code
        return None


# --------------------------------------------------------------------------- wiring
@dataclass
class FakeWorld:
    """Both domain services over a full set of fakes and one fixed clock."""

    clock: FixedClock
    fixed: FixedConfig
    config: FakeConfigProvider
    challenges: FakeChallengeStore
    throttle: FakeResendThrottle
    failures: FakeFailureBudget
    store: FakeSessionStore
    projection: FakeProjection
    rate_limiter: FakeRateLimiter
    users: FakeUsers
    mail: FakeMail
    sessions: SessionService
    login: LoginService
    client: ClientInfo = field(default_factory=lambda: ClientInfo("203.0.113.7", "pytest/1"))


def make_world(
    *,
    clock: FixedClock | None = None,
    fixed: FixedConfig = DEFAULT_FIXED,
    challenges: FakeChallengeStore | None = None,
    store: FakeSessionStore | None = None,
    users: FakeUsers | None = None,
    **config: Any,
) -> FakeWorld:
    """Wire ``LoginService`` and ``SessionService`` over fakes; ``config`` overrides
    fields of :data:`DEFAULT_RUNTIME`. Subclassed fakes may be passed in."""
    clock = clock or FixedClock()
    provider = FakeConfigProvider(replace(DEFAULT_RUNTIME, **config))
    challenges = challenges or FakeChallengeStore(clock)
    store = store or FakeSessionStore(clock)
    users = users or FakeUsers()
    throttle = FakeResendThrottle(clock)
    failures = FakeFailureBudget(clock)
    projection = FakeProjection(clock)
    mail = FakeMail()
    services = build_services(
        Ports(
            challenges=challenges,
            throttle=throttle,
            failures=failures,
            store=store,
            blocks=store,
            projection=projection,
            config=provider,
            users=users,
            mail=mail,
        ),
        clock,
        fixed,
    )
    return FakeWorld(
        clock=clock,
        fixed=fixed,
        config=provider,
        challenges=challenges,
        throttle=throttle,
        failures=failures,
        store=store,
        projection=projection,
        rate_limiter=FakeRateLimiter(clock),
        users=users,
        mail=mail,
        sessions=services.sessions,
        login=services.login,
    )


if TYPE_CHECKING:  # mypy proves that every fake satisfies its port.
    from authsession.domain.ports import (
        BlockMarkers,
        ChallengeStore,
        ConfigProvider,
        FailureBudget,
        MailSender,
        ProjectionPublisher,
        ResendThrottle,
        SessionStore,
        UserDirectory,
    )
    from authsession.http.ports import RateLimiter

    def _ports(clock: FixedClock) -> Sequence[object]:
        c: Clock = clock
        a: ChallengeStore = FakeChallengeStore(c)
        b: SessionStore = FakeSessionStore(c)
        m: BlockMarkers = FakeSessionStore(c)
        t: ResendThrottle = FakeResendThrottle(c)
        f: FailureBudget = FakeFailureBudget(c)
        p: ProjectionPublisher = FakeProjection(c)
        g: ConfigProvider = FakeConfigProvider()
        r: RateLimiter = FakeRateLimiter(c)
        u: UserDirectory = FakeUsers()
        s: MailSender = FakeMail()
        return (a, b, m, t, f, p, g, r, u, s)
