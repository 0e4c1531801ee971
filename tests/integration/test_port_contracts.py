"""One contract suite for the store ports, run against the in-memory fakes and Redis.

Every test takes ``ports`` (parametrized ``fake`` / ``redis``) and asserts the same
observable behaviour of both (the TestPersister pattern of ARCHITECTURE.md, habit 6).
The clock starts at the real current time (whole milliseconds): Redis expiries are
absolute, computed from the times the adapters are given, and Redis drops keys by its own
clock. ``ports.elapse`` moves the fakes' clock and, for Redis, really waits.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import pytest
import redis.asyncio

from authsession.domain import codes
from authsession.domain.errors import ServiceUnavailable
from authsession.domain.model import Challenge, ChallengeStatus, Session
from authsession.domain.ports import (
    AttemptResult,
    BlockMarkers,
    ChallengeStore,
    Confirmation,
    CreateOutcome,
    CreateResult,
    ExtendResult,
    FailureBudget,
    ProjectionPublisher,
    PublishResult,
    ResendThrottle,
    Scope,
    SessionStore,
)
from authsession.domain.units import RateLimit, to_epoch_ms
from authsession.http.ports import RateLimiter
from authsession.redis.base import Keys
from authsession.redis.challenges import RedisChallengeStore
from authsession.redis.projection import RedisProjectionPublisher
from authsession.redis.sessions import RedisSessionStore
from authsession.redis.throttle import RedisFailureBudget, RedisRateLimiter, RedisResendThrottle
from tests.contract import STREAM
from tests.fakes import (
    FakeChallengeStore,
    FakeConfigProvider,
    FakeFailureBudget,
    FakeMail,
    FakeProjection,
    FakeRateLimiter,
    FakeResendThrottle,
    FakeSessionStore,
    FakeUsers,
    FixedClock,
    ms,
)

PREFIX = "authsession:"
SNAPSHOT_PREFIX = "gateway:session:"
MAX_ATTEMPTS = 5
RETENTION = timedelta(hours=1)
SESSION_RETENTION = timedelta(hours=168)
WINDOW = timedelta(hours=1)


class SessionPort(SessionStore, BlockMarkers, Protocol):
    """The session store as the wiring uses it: store and block markers in one."""


@dataclass
class Ports:
    """One implementation of every store port, plus ways to look at what they wrote."""

    kind: str
    clock: FixedClock
    challenges: ChallengeStore
    sessions: SessionPort
    throttle: ResendThrottle
    failures: FailureBudget
    projection: ProjectionPublisher
    rate_limiter: RateLimiter
    read_snapshot: Callable[[str], Awaitable[str | None]]
    read_events: Callable[[], Awaitable[list[dict[str, str]]]]
    drop_session: Callable[[str], Awaitable[None]]
    read_index: Callable[[str], Awaitable[list[str]]]
    # SCRIPT FLUSH, as after a restart of Redis (nothing to forget for the fakes).
    forget_scripts: Callable[[], Awaitable[object]]

    @property
    def now(self) -> datetime:
        return self.clock.now()

    async def elapse(self, delta: timedelta) -> None:
        """Let ``delta`` pass for both the clock and (for Redis) the server's own expiries."""
        self.clock.advance(delta)
        if self.kind == "redis":
            await asyncio.sleep(delta.total_seconds())

    async def snapshot(self, device_session_id: str) -> dict[str, Any] | None:
        raw = await self.read_snapshot(device_session_id)
        if raw is None:
            return None
        document: dict[str, Any] = json.loads(raw)
        return document


def _fake_ports(clock: FixedClock) -> Ports:
    projection = FakeProjection(clock)
    sessions = FakeSessionStore(clock)

    async def read_snapshot(device_session_id: str) -> str | None:
        return projection.raw_snapshot(device_session_id)

    async def read_events() -> list[dict[str, str]]:
        return list(projection.events)

    async def drop_session(device_session_id: str) -> None:
        sessions.drop(device_session_id)

    async def read_index(user_id: str) -> list[str]:
        return sorted(sessions.indexed(user_id))

    async def forget_scripts() -> None:
        return None

    return Ports(
        kind="fake",
        clock=clock,
        challenges=FakeChallengeStore(clock),
        sessions=sessions,
        throttle=FakeResendThrottle(clock),
        failures=FakeFailureBudget(clock),
        projection=projection,
        rate_limiter=FakeRateLimiter(clock),
        read_snapshot=read_snapshot,
        read_events=read_events,
        drop_session=drop_session,
        read_index=read_index,
        forget_scripts=forget_scripts,
    )


def _redis_ports(clock: FixedClock, client: redis.asyncio.Redis) -> Ports:
    keys = Keys(PREFIX)

    async def read_snapshot(device_session_id: str) -> str | None:
        raw = await client.get(SNAPSHOT_PREFIX + device_session_id)
        return None if raw is None else str(raw)

    async def read_events() -> list[dict[str, str]]:
        entries = await client.xrange(STREAM) or []
        return [{str(k): str(v) for k, v in (fields or {}).items()} for _, fields in entries]

    async def drop_session(device_session_id: str) -> None:
        await client.delete(keys.session(device_session_id))

    async def read_index(user_id: str) -> list[str]:
        return sorted(str(m) for m in await client.zrange(keys.user_sessions(user_id), 0, -1))

    return Ports(
        kind="redis",
        clock=clock,
        challenges=RedisChallengeStore(client, keys),
        sessions=RedisSessionStore(client, keys, clock),
        throttle=RedisResendThrottle(client, keys),
        failures=RedisFailureBudget(client, keys),
        projection=RedisProjectionPublisher(client, SNAPSHOT_PREFIX, STREAM, 10_000, keys=keys),
        rate_limiter=RedisRateLimiter(client, keys),
        read_snapshot=read_snapshot,
        read_events=read_events,
        drop_session=drop_session,
        read_index=read_index,
        forget_scripts=client.script_flush,
    )


@pytest.fixture(params=["fake", "redis"])
async def ports(request: pytest.FixtureRequest) -> AsyncIterator[Ports]:
    clock = FixedClock(ms(datetime.now(UTC)))
    if request.param == "fake":
        yield _fake_ports(clock)
        return
    server = request.getfixturevalue("redis_server")
    request.getfixturevalue("redis_client")  # FLUSHALL
    client = redis.asyncio.Redis(host=server.host, port=server.port, decode_responses=True)
    try:
        yield _redis_ports(clock, client)
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- builders
SALT = "00112233445566778899aabbccddeeff"
CODE = "123456"
RIGHT = codes.code_hmac(SALT, CODE)
WRONG_CODES = [f"{n:06d}" for n in range(200_000, 200_040)]


def challenge(
    ports: Ports,
    status: ChallengeStatus = ChallengeStatus.SENT,
    *,
    ttl: timedelta = timedelta(minutes=10),
    created_at: datetime | None = None,
    **extra: Any,
) -> Challenge:
    created = created_at or ports.now
    values: dict[str, Any] = {
        "challenge_id": codes.new_id(),
        "status": status,
        "email_hash": "ab" * 32,
        "created_at": created,
        "expires_at": created + ttl,
        "user_id": "usr-1",
        "code_salt": SALT,
        "code_hmac": RIGHT,
    }
    values.update(extra)
    return Challenge(**values)


async def stored_challenge(
    ports: Ports, status: ChallengeStatus = ChallengeStatus.SENT, **extra: Any
) -> Challenge:
    record = challenge(ports, status, **extra)
    await ports.challenges.create(record, RETENTION)
    return record


async def wrong(ports: Ports, challenge_id: str, n: int = 0) -> Any:
    return await ports.challenges.attempt(
        challenge_id, codes.code_hmac(SALT, WRONG_CODES[n]), ports.now, MAX_ATTEMPTS
    )


async def confirm(ports: Ports, challenge_id: str, **extra: Any) -> Challenge | None:
    device_session_id = extra.pop("device_session_id", codes.new_id())
    confirmation = Confirmation(
        device_session_id=device_session_id,
        session_token=extra.pop("session_token", codes.new_session_token(device_session_id)),
        user_id=extra.pop("user_id", "usr-1"),
        expires_at=extra.pop("expires_at", ports.now + timedelta(minutes=5)),
    )
    args: dict[str, Any] = {"now": ports.now, "max_attempts": MAX_ATTEMPTS, "retention": RETENTION}
    args.update(extra)
    return await ports.challenges.confirm(challenge_id, confirmation, **args)


def session(
    ports: Ports,
    *,
    user_id: str = "usr-1",
    created_at: datetime | None = None,
    ttl: timedelta = timedelta(hours=720),
    **extra: Any,
) -> Session:
    created = created_at or ports.now
    device_session_id = extra.pop("device_session_id", codes.new_session_id(user_id))
    values: dict[str, Any] = {
        "device_session_id": device_session_id,
        "user_id": user_id,
        "token_sha256": codes.token_sha256(codes.new_session_token(device_session_id)),
        "created_at": created,
        "expires_at": created + ttl,
        "client_ip": "203.0.113.7",
        "user_agent": "pytest/1",
    }
    values.update(extra)
    return Session(**values)


async def create(ports: Ports, record: Session, *, limit: int = 0) -> CreateOutcome:
    return await ports.sessions.create(record, SESSION_RETENTION, limit=limit, now=ports.now)


async def stored_session(ports: Ports, **extra: Any) -> Session:
    record = session(ports, **extra)
    assert (await create(ports, record)).result is CreateResult.CREATED
    return record


# =========================================================================== challenges
async def test_challenge_round_trips(ports: Ports) -> None:
    full = challenge(
        ports,
        ChallengeStatus.CONFIRMED_PENDING_EXPIRE,
        email="jane@example.com",
        attempts=2,
        device_session_id="d" * 32,
        session_token="d" * 32 + ".secret",
    )
    bare = challenge(
        ports, ChallengeStatus.DELIVERY_THROTTLED, user_id=None, code_salt=None, code_hmac=None
    )
    for record in (full, bare):
        await ports.challenges.create(record, RETENTION)
        assert await ports.challenges.get(record.challenge_id) == record


async def test_unknown_challenge_is_none(ports: Ports) -> None:
    assert await ports.challenges.get(codes.new_id()) is None


async def test_challenge_past_its_retention_is_gone(ports: Ports) -> None:
    old = await stored_challenge(ports, created_at=ports.now - RETENTION - timedelta(minutes=11))
    assert await ports.challenges.get(old.challenge_id) is None
    outcome = await ports.challenges.attempt(old.challenge_id, RIGHT, ports.now, MAX_ATTEMPTS)
    assert outcome.result is AttemptResult.NOT_FOUND


async def test_expired_challenge_within_retention_is_kept(ports: Ports) -> None:
    old = await stored_challenge(ports, created_at=ports.now - timedelta(minutes=30))
    assert await ports.challenges.get(old.challenge_id) == old


@pytest.mark.parametrize("outcome", [ChallengeStatus.SENT, ChallengeStatus.DELIVERY_FAILED])
async def test_delivery_status_moves_a_pending_challenge(
    ports: Ports, outcome: ChallengeStatus
) -> None:
    record = await stored_challenge(ports, ChallengeStatus.PENDING_DELIVERY)
    await ports.challenges.set_delivery_status(record.challenge_id, outcome)
    assert await ports.challenges.get(record.challenge_id) == replace(record, status=outcome)


@pytest.mark.parametrize(
    "status",
    [
        ChallengeStatus.SENT,
        ChallengeStatus.DELIVERY_FAILED,
        ChallengeStatus.DELIVERY_THROTTLED,
        ChallengeStatus.CONFIRMED_PENDING_EXPIRE,
    ],
)
async def test_delivery_status_never_moves_a_challenge_that_left_pending(
    ports: Ports, status: ChallengeStatus
) -> None:
    record = await stored_challenge(ports, status)
    await ports.challenges.set_delivery_status(record.challenge_id, ChallengeStatus.SENT)
    await ports.challenges.set_delivery_status(record.challenge_id, ChallengeStatus.DELIVERY_FAILED)
    assert await ports.challenges.get(record.challenge_id) == record


async def test_delivery_status_never_recreates_a_missing_challenge(ports: Ports) -> None:
    challenge_id = codes.new_id()
    await ports.challenges.set_delivery_status(challenge_id, ChallengeStatus.SENT)
    assert await ports.challenges.get(challenge_id) is None


async def test_wrong_codes_count_down_then_exhaust(ports: Ports) -> None:
    record = await stored_challenge(ports)
    remaining = []
    for n in range(MAX_ATTEMPTS):
        outcome = await wrong(ports, record.challenge_id, n)
        assert outcome.result is AttemptResult.WRONG
        assert outcome.challenge is None
        remaining.append(outcome.attempts_remaining)
    assert remaining == [4, 3, 2, 1, 0]
    assert (await wrong(ports, record.challenge_id)).result is AttemptResult.EXHAUSTED
    # Exhausted beats the right code, and nothing is counted any more.
    right = await ports.challenges.attempt(record.challenge_id, RIGHT, ports.now, MAX_ATTEMPTS)
    assert right.result is AttemptResult.EXHAUSTED
    stored = await ports.challenges.get(record.challenge_id)
    assert stored is not None
    assert stored.attempts == MAX_ATTEMPTS


async def test_a_lower_maximum_exhausts_earlier(ports: Ports) -> None:
    record = await stored_challenge(ports, attempts=3)
    outcome = await ports.challenges.attempt(record.challenge_id, RIGHT, ports.now, 3)
    assert outcome.result is AttemptResult.EXHAUSTED


async def test_right_code_matches_without_consuming_an_attempt(ports: Ports) -> None:
    record = await stored_challenge(ports)
    await wrong(ports, record.challenge_id, 0)
    await wrong(ports, record.challenge_id, 1)
    for _ in range(3):
        outcome = await ports.challenges.attempt(
            record.challenge_id, RIGHT, ports.now, MAX_ATTEMPTS
        )
        assert outcome.result is AttemptResult.MATCH_SENT
        assert outcome.attempts_remaining == 3
        assert outcome.challenge == replace(record, attempts=2)
    assert await ports.challenges.get(record.challenge_id) == replace(record, attempts=2)


async def test_attempt_at_and_after_expires_at_is_expired(ports: Ports) -> None:
    record = await stored_challenge(ports)
    just_before = record.expires_at - timedelta(milliseconds=1)
    before = await ports.challenges.attempt(record.challenge_id, RIGHT, just_before, MAX_ATTEMPTS)
    assert before.result is AttemptResult.MATCH_SENT
    for now in (record.expires_at, record.expires_at + timedelta(minutes=1)):
        outcome = await ports.challenges.attempt(record.challenge_id, RIGHT, now, MAX_ATTEMPTS)
        assert outcome.result is AttemptResult.EXPIRED
        bad = await ports.challenges.attempt(
            record.challenge_id, codes.code_hmac(SALT, "000000"), now, MAX_ATTEMPTS
        )
        assert bad.result is AttemptResult.EXPIRED
    stored = await ports.challenges.get(record.challenge_id)
    assert stored is not None
    assert stored.attempts == 0


async def test_expired_beats_exhausted(ports: Ports) -> None:
    record = await stored_challenge(ports, attempts=MAX_ATTEMPTS)
    outcome = await ports.challenges.attempt(
        record.challenge_id, RIGHT, record.expires_at, MAX_ATTEMPTS
    )
    assert outcome.result is AttemptResult.EXPIRED


async def test_attempt_on_unknown_challenge_is_not_found(ports: Ports) -> None:
    outcome = await ports.challenges.attempt(codes.new_id(), RIGHT, ports.now, MAX_ATTEMPTS)
    assert outcome.result is AttemptResult.NOT_FOUND


@pytest.mark.parametrize(
    "status",
    [
        ChallengeStatus.PENDING_DELIVERY,
        ChallengeStatus.DELIVERY_THROTTLED,
        ChallengeStatus.DELIVERY_SUPPRESSED,
        ChallengeStatus.DELIVERY_FAILED,
    ],
)
async def test_a_challenge_without_a_sent_code_never_matches(
    ports: Ports, status: ChallengeStatus
) -> None:
    # Even the HMAC of the code that was generated is a wrong code here.
    record = await stored_challenge(ports, status)
    outcome = await ports.challenges.attempt(record.challenge_id, RIGHT, ports.now, MAX_ATTEMPTS)
    assert (outcome.result, outcome.attempts_remaining) == (AttemptResult.WRONG, 4)


async def test_an_empty_candidate_never_matches_a_challenge_without_code(ports: Ports) -> None:
    record = await stored_challenge(
        ports, ChallengeStatus.DELIVERY_SUPPRESSED, code_salt=None, code_hmac=None
    )
    outcome = await ports.challenges.attempt(record.challenge_id, "", ports.now, MAX_ATTEMPTS)
    assert (outcome.result, outcome.attempts_remaining) == (AttemptResult.WRONG, 4)
    # Even a "sent" record that somehow has no HMAC.
    odd = await stored_challenge(ports, code_hmac=None)
    outcome = await ports.challenges.attempt(odd.challenge_id, "", ports.now, MAX_ATTEMPTS)
    assert outcome.result is AttemptResult.WRONG


async def test_candidate_of_another_length_is_wrong(ports: Ports) -> None:
    record = await stored_challenge(ports)
    for candidate in (RIGHT[:-1], RIGHT + "0", RIGHT.upper()):
        outcome = await ports.challenges.attempt(
            record.challenge_id, candidate, ports.now, MAX_ATTEMPTS
        )
        assert outcome.result is AttemptResult.WRONG


async def test_concurrent_wrong_codes_get_at_most_max_attempts_evaluations(
    ports: Ports,
) -> None:
    record = await stored_challenge(ports)
    outcomes = await asyncio.gather(*(wrong(ports, record.challenge_id, n) for n in range(30)))
    wrongs = [o for o in outcomes if o.result is AttemptResult.WRONG]
    assert len(wrongs) == MAX_ATTEMPTS
    assert sorted(o.attempts_remaining for o in wrongs) == [0, 1, 2, 3, 4]
    assert all(o.result is AttemptResult.EXHAUSTED for o in outcomes if o not in wrongs)
    stored = await ports.challenges.get(record.challenge_id)
    assert stored is not None
    assert stored.attempts == MAX_ATTEMPTS


async def test_confirm_moves_a_sent_challenge_once(ports: Ports) -> None:
    record = await stored_challenge(ports, attempts=2)
    token = "d" * 32 + ".s3cret"
    first = await confirm(
        ports,
        record.challenge_id,
        device_session_id="d" * 32,
        session_token=token,
        user_id="usr-9",
    )
    expected = replace(
        record,
        status=ChallengeStatus.CONFIRMED_PENDING_EXPIRE,
        device_session_id="d" * 32,
        session_token=token,
        user_id="usr-9",
        expires_at=ports.now + timedelta(minutes=5),
    )
    assert first == expected
    assert await ports.challenges.get(record.challenge_id) == expected
    # A later confirm gets the winner's record back, whatever it proposes.
    assert await confirm(ports, record.challenge_id, user_id="usr-other") == expected
    # And the confirmed challenge matches its code as confirmed.
    outcome = await ports.challenges.attempt(record.challenge_id, RIGHT, ports.now, MAX_ATTEMPTS)
    assert outcome.result is AttemptResult.MATCH_CONFIRMED
    assert outcome.challenge == expected
    assert outcome.attempts_remaining == 3


async def test_concurrent_confirms_have_exactly_one_winner(ports: Ports) -> None:
    record = await stored_challenge(ports)
    proposed = [codes.new_id() for _ in range(20)]
    results = await asyncio.gather(
        *(confirm(ports, record.challenge_id, device_session_id=p) for p in proposed)
    )
    winners = {r.device_session_id for r in results if r is not None}
    assert len(winners) == 1
    assert winners <= set(proposed)
    assert len({r.session_token for r in results if r is not None}) == 1
    assert all(r is not None for r in results)
    stored = await ports.challenges.get(record.challenge_id)
    assert stored is not None
    assert stored.device_session_id in winners


@pytest.mark.parametrize(
    "status",
    [
        ChallengeStatus.PENDING_DELIVERY,
        ChallengeStatus.DELIVERY_THROTTLED,
        ChallengeStatus.DELIVERY_SUPPRESSED,
        ChallengeStatus.DELIVERY_FAILED,
    ],
)
async def test_confirm_refuses_a_challenge_that_was_never_sent(
    ports: Ports, status: ChallengeStatus
) -> None:
    record = await stored_challenge(ports, status)
    assert await confirm(ports, record.challenge_id) is None
    assert await ports.challenges.get(record.challenge_id) == record


async def test_confirm_refuses_missing_expired_and_exhausted(ports: Ports) -> None:
    assert await confirm(ports, codes.new_id()) is None
    expired = await stored_challenge(ports)
    assert await confirm(ports, expired.challenge_id, now=expired.expires_at) is None
    assert await ports.challenges.get(expired.challenge_id) == expired
    exhausted = await stored_challenge(ports, attempts=MAX_ATTEMPTS)
    assert await confirm(ports, exhausted.challenge_id) is None
    assert await ports.challenges.get(exhausted.challenge_id) == exhausted


async def test_confirmed_challenge_keeps_answering_its_winner(ports: Ports) -> None:
    # The confirm script returns a confirmed record whatever the time and attempts: the
    # attempt step is what refuses expired and exhausted challenges.
    record = await stored_challenge(ports)
    won = await confirm(ports, record.challenge_id)
    assert won is not None
    later = ports.now + timedelta(minutes=6)
    assert await confirm(ports, record.challenge_id, now=later, max_attempts=0) == won


# =========================================================================== sessions
async def test_session_round_trips(ports: Ports) -> None:
    plain = await stored_session(ports)
    named = await stored_session(ports, device_name="Jane's phone")
    for record in (plain, named):
        assert await ports.sessions.get(record.device_session_id) == record
    assert await ports.sessions.get(codes.new_id()) is None


async def test_create_never_overwrites_an_existing_session(ports: Ports) -> None:
    original = await stored_session(ports)
    other = replace(
        original,
        token_sha256="0" * 64,
        created_at=ports.now + timedelta(seconds=5),
        client_ip="198.51.100.1",
        version=7,
    )
    outcome = await create(ports, other)
    assert outcome.result is CreateResult.EXISTS
    assert outcome.session == original
    assert await ports.sessions.get(original.device_session_id) == original
    assert await ports.sessions.list_for_user(original.user_id) == [original]


async def test_create_never_resurrects_a_revoked_session(ports: Ports) -> None:
    original = await stored_session(ports)
    revoked = await ports.sessions.revoke(
        original.device_session_id, "revoked_by_backend", ports.now
    )
    assert revoked is not None
    assert (await create(ports, original)).result is CreateResult.EXISTS
    stored = await ports.sessions.get(original.device_session_id)
    assert stored == revoked[0]
    assert stored.revoked_at == ports.now
    assert stored.version == 2


async def test_concurrent_creates_write_once(ports: Ports) -> None:
    record = session(ports)
    variants = [replace(record, client_ip=f"198.51.100.{n}") for n in range(10)]
    outcomes = await asyncio.gather(*(create(ports, v) for v in variants))
    created = [o.result is CreateResult.CREATED for o in outcomes]
    assert created.count(True) == 1
    stored = await ports.sessions.get(record.device_session_id)
    assert stored == variants[created.index(True)]
    assert await ports.sessions.list_for_user(record.user_id) == [stored]


async def test_list_is_per_user_and_newest_first(ports: Ports) -> None:
    start = ports.now - timedelta(hours=3)
    mine = [await stored_session(ports, created_at=start + timedelta(hours=h)) for h in (1, 0, 2)]
    theirs = await stored_session(ports, user_id="usr-2")
    listed = await ports.sessions.list_for_user("usr-1")
    assert listed == sorted(mine, key=lambda s: s.created_at, reverse=True)
    assert await ports.sessions.list_for_user("usr-2") == [theirs]
    assert await ports.sessions.list_for_user("usr-nobody") == []


async def test_list_orders_equal_creation_times_by_descending_id(ports: Ports) -> None:
    ids = ["a" * 32, "c" * 32, "b" * 32]
    for device_session_id in ids:
        await stored_session(ports, device_session_id=device_session_id)
    listed = await ports.sessions.list_for_user("usr-1")
    assert [s.device_session_id for s in listed] == ["c" * 32, "b" * 32, "a" * 32]


async def test_list_keeps_revoked_and_expired_sessions(ports: Ports) -> None:
    expired = await stored_session(
        ports, created_at=ports.now - timedelta(hours=3), ttl=timedelta(hours=1)
    )
    revoked = await stored_session(ports, created_at=ports.now - timedelta(hours=2))
    outcome = await ports.sessions.revoke(revoked.device_session_id, "x", ports.now)
    assert outcome is not None
    listed = await ports.sessions.list_for_user("usr-1")
    assert listed == [outcome[0], expired]


async def test_list_skips_members_whose_record_is_gone(ports: Ports) -> None:
    kept = await stored_session(ports, created_at=ports.now - timedelta(seconds=2))
    lost = await stored_session(ports, created_at=ports.now - timedelta(seconds=1))
    await ports.drop_session(lost.device_session_id)
    assert await ports.sessions.list_for_user("usr-1") == [kept]
    assert await ports.sessions.list_for_user("usr-1") == [kept]
    assert await ports.sessions.get(lost.device_session_id) is None


async def test_list_prunes_only_members_older_than_the_grace(ports: Ports) -> None:
    # A member without a record may be a session being created right now (indexed, not
    # yet written): only members created over a minute ago are pruned.
    fresh = await stored_session(ports, created_at=ports.now - timedelta(seconds=30))
    old = await stored_session(ports, created_at=ports.now - timedelta(minutes=2))
    for record in (fresh, old):
        await ports.drop_session(record.device_session_id)
    assert await ports.sessions.list_for_user("usr-1") == []
    assert await ports.read_index("usr-1") == [fresh.device_session_id]


async def test_session_past_its_retention_is_gone(ports: Ports) -> None:
    created = ports.now - timedelta(hours=720) - SESSION_RETENTION - timedelta(minutes=1)
    old = session(ports, created_at=created)
    await create(ports, old)
    assert await ports.sessions.get(old.device_session_id) is None
    assert await ports.sessions.list_for_user("usr-1") == []


async def test_an_old_session_never_unlists_the_users_other_sessions(ports: Ports) -> None:
    live = await stored_session(ports)
    created = ports.now - timedelta(hours=720) - SESSION_RETENTION - timedelta(minutes=1)
    await create(ports, session(ports, created_at=created))
    assert await ports.sessions.list_for_user("usr-1") == [live]


async def test_revoke_is_permanent_idempotent_and_versioned_once(ports: Ports) -> None:
    record = await stored_session(ports)
    first = await ports.sessions.revoke(record.device_session_id, "revoked_by_backend", ports.now)
    expected = replace(record, revoked_at=ports.now, revoke_reason="revoked_by_backend", version=2)
    assert first == (expected, True)
    later = ports.now + timedelta(minutes=3)
    again = await ports.sessions.revoke(record.device_session_id, "other", later)
    assert again == (expected, False)
    assert await ports.sessions.get(record.device_session_id) == expected


async def test_revoke_of_unknown_session_is_none(ports: Ports) -> None:
    assert await ports.sessions.revoke(codes.new_id(), "x", ports.now) is None


async def test_revoke_of_an_expired_session_still_revokes(ports: Ports) -> None:
    record = await stored_session(
        ports, created_at=ports.now - timedelta(hours=2), ttl=timedelta(hours=1)
    )
    outcome = await ports.sessions.revoke(record.device_session_id, "x", ports.now)
    assert outcome is not None
    assert outcome[1] is True
    assert outcome[0].version == 2


async def test_concurrent_revokes_revoke_once(ports: Ports) -> None:
    record = await stored_session(ports)
    outcomes = await asyncio.gather(
        *(
            ports.sessions.revoke(
                record.device_session_id, f"reason-{n}", ports.now + timedelta(milliseconds=n)
            )
            for n in range(10)
        )
    )
    assert [o is not None and o[1] for o in outcomes].count(True) == 1
    stored = {o[0] for o in outcomes if o is not None}
    assert len(stored) == 1
    assert stored.pop().version == 2


async def test_extend_moves_expiry_of_an_active_session(ports: Ports) -> None:
    record = await stored_session(ports)
    new_expiry = ports.now + timedelta(hours=1)  # shorter than before: allowed
    result = await ports.sessions.extend(
        record.device_session_id, new_expiry, ports.now, SESSION_RETENTION
    )
    expected = replace(record, expires_at=new_expiry, version=2)
    assert result == (ExtendResult.EXTENDED, expected)
    assert await ports.sessions.get(record.device_session_id) == expected
    assert await ports.sessions.list_for_user("usr-1") == [expected]
    later = ports.now + timedelta(hours=2000)
    result = await ports.sessions.extend(
        record.device_session_id, later, ports.now, SESSION_RETENTION
    )
    assert result == (ExtendResult.EXTENDED, replace(expected, expires_at=later, version=3))


async def test_extend_refuses_a_revoked_session(ports: Ports) -> None:
    record = await stored_session(ports)
    revoked = await ports.sessions.revoke(record.device_session_id, "x", ports.now)
    assert revoked is not None
    result = await ports.sessions.extend(
        record.device_session_id, ports.now + timedelta(hours=1), ports.now, SESSION_RETENTION
    )
    assert result == (ExtendResult.NOT_ACTIVE, None)
    assert await ports.sessions.get(record.device_session_id) == revoked[0]


async def test_extend_refuses_a_session_at_or_past_its_expiry(ports: Ports) -> None:
    record = await stored_session(ports, ttl=timedelta(minutes=1))
    for now in (record.expires_at, record.expires_at + timedelta(seconds=1)):
        result = await ports.sessions.extend(
            record.device_session_id, now + timedelta(hours=1), now, SESSION_RETENTION
        )
        assert result == (ExtendResult.NOT_ACTIVE, None)
    assert await ports.sessions.get(record.device_session_id) == record


async def test_extend_of_unknown_session_is_not_found(ports: Ports) -> None:
    result = await ports.sessions.extend(
        codes.new_id(), ports.now + timedelta(hours=1), ports.now, SESSION_RETENTION
    )
    assert result == (ExtendResult.NOT_FOUND, None)


async def test_revoke_after_extend_bumps_again(ports: Ports) -> None:
    record = await stored_session(ports)
    await ports.sessions.extend(
        record.device_session_id, ports.now + timedelta(hours=2), ports.now, SESSION_RETENTION
    )
    outcome = await ports.sessions.revoke(record.device_session_id, "x", ports.now)
    assert outcome is not None
    assert outcome[0].version == 3
    assert outcome[0].expires_at == ports.now + timedelta(hours=2)


async def test_block_markers_are_per_user_and_expire(ports: Ports) -> None:
    assert await ports.sessions.is_user_blocked("usr-1") is False
    await ports.sessions.mark_user_blocked("usr-1", timedelta(seconds=1))
    assert await ports.sessions.is_user_blocked("usr-1") is True
    assert await ports.sessions.is_user_blocked("usr-2") is False
    await ports.elapse(timedelta(milliseconds=1100))
    assert await ports.sessions.is_user_blocked("usr-1") is False


# =========================================================================== projection
async def test_first_publication_writes_the_snapshot_then_one_event(ports: Ports) -> None:
    record = session(ports)
    assert await ports.projection.publish(record, ports.now) is PublishResult.WRITTEN
    document = record.snapshot(ports.now).to_json()
    assert await ports.read_snapshot(record.device_session_id) == document
    assert await ports.read_events() == [
        {
            "event": "session_snapshot",
            "device_session_id": record.device_session_id,
            "user_id": record.user_id,
            "status": "active",
            "version": "1",
            "snapshot": document,
        }
    ]


async def test_same_version_rewrites_nothing_but_appends_the_event(ports: Ports) -> None:
    record = session(ports)
    await ports.projection.publish(record, ports.now)
    first = await ports.read_snapshot(record.device_session_id)
    later = ports.now + timedelta(seconds=30)
    # Even with different content: the version is what counts.
    altered = replace(record, expires_at=record.expires_at + timedelta(hours=1))
    assert await ports.projection.publish(altered, later) is PublishResult.UNCHANGED
    assert await ports.read_snapshot(record.device_session_id) == first
    events = await ports.read_events()
    assert [e["version"] for e in events] == ["1", "1"]
    # The repeated event carries exactly the snapshot gateways can read.
    assert events[1] == events[0]
    assert events[1]["snapshot"] == first


async def test_a_repeated_event_carries_the_held_status(ports: Ports) -> None:
    record = session(ports)
    revoked = replace(record, revoked_at=ports.now, revoke_reason="x", version=2)
    await ports.projection.publish(revoked, ports.now)
    # Same version, but offered as active (e.g. built from a stale read): nothing changes.
    assert await ports.projection.publish(replace(record, version=2), ports.now) is (
        PublishResult.UNCHANGED
    )
    snapshot = await ports.snapshot(record.device_session_id)
    assert snapshot is not None
    assert snapshot["status"] == "revoked"
    events = await ports.read_events()
    assert [e["status"] for e in events] == ["revoked", "revoked"]
    assert json.loads(events[1]["snapshot"])["status"] == "revoked"


async def test_higher_version_replaces_and_lower_is_stale(ports: Ports) -> None:
    record = session(ports)
    revoked = replace(record, revoked_at=ports.now, revoke_reason="user_blocked", version=2)
    assert await ports.projection.publish(record, ports.now) is PublishResult.WRITTEN
    assert await ports.projection.publish(revoked, ports.now) is PublishResult.WRITTEN
    snapshot = await ports.snapshot(record.device_session_id)
    assert snapshot is not None
    assert (snapshot["status"], snapshot["version"]) == ("revoked", 2)
    assert snapshot["revoke_reason"] == "user_blocked"
    # A late publication of version 1 never makes the session active again.
    assert await ports.projection.publish(record, ports.now) is PublishResult.STALE
    assert await ports.snapshot(record.device_session_id) == snapshot
    events = await ports.read_events()
    assert [(e["version"], e["status"]) for e in events] == [("1", "active"), ("2", "revoked")]


async def test_concurrent_publications_leave_the_highest_version(ports: Ports) -> None:
    record = session(ports)
    versions = list(range(1, 11))
    random.Random(7).shuffle(versions)
    results = await asyncio.gather(
        *(ports.projection.publish(replace(record, version=v), ports.now) for v in versions)
    )
    snapshot = await ports.snapshot(record.device_session_id)
    assert snapshot is not None
    assert snapshot["version"] == 10
    assert PublishResult.WRITTEN in results
    events = await ports.read_events()
    assert len(events) == len([r for r in results if r is not PublishResult.STALE])


async def test_publication_of_an_expired_session_removes_the_snapshot(ports: Ports) -> None:
    record = session(ports)
    await ports.projection.publish(record, ports.now)
    expired = replace(record, expires_at=ports.now, version=2)
    assert await ports.projection.publish(expired, ports.now) is PublishResult.WRITTEN
    assert await ports.read_snapshot(record.device_session_id) is None
    assert len(await ports.read_events()) == 2


async def test_snapshot_expires_with_the_session(ports: Ports) -> None:
    record = session(ports, ttl=timedelta(seconds=1))
    assert await ports.projection.publish(record, ports.now) is PublishResult.WRITTEN
    assert await ports.read_snapshot(record.device_session_id) is not None
    await ports.elapse(timedelta(milliseconds=1100))
    assert await ports.read_snapshot(record.device_session_id) is None


# =========================================================================== throttle
async def test_throttle_window_is_released_only_by_its_owner(ports: Ports) -> None:
    cooldown = timedelta(minutes=1)
    assert await ports.throttle.acquire("h1", "owner-a", cooldown) is True
    assert await ports.throttle.acquire("h1", "owner-b", cooldown) is False
    await ports.throttle.release("h1", "owner-b")
    assert await ports.throttle.acquire("h1", "owner-c", cooldown) is False
    await ports.throttle.release("h1", "owner-a")
    assert await ports.throttle.acquire("h1", "owner-d", cooldown) is True
    await ports.throttle.release("h1", "owner-a")  # no longer the owner
    assert await ports.throttle.acquire("h1", "owner-e", cooldown) is False


async def test_throttle_release_without_a_window_is_harmless(ports: Ports) -> None:
    await ports.throttle.release("h-none", "owner-a")
    assert await ports.throttle.acquire("h-none", "owner-a", timedelta(minutes=1)) is True


async def test_throttle_windows_are_per_email_hash(ports: Ports) -> None:
    assert await ports.throttle.acquire("h1", "a", timedelta(minutes=1)) is True
    assert await ports.throttle.acquire("h2", "b", timedelta(minutes=1)) is True


async def test_throttle_window_is_fixed_and_runs_out(ports: Ports) -> None:
    cooldown = timedelta(seconds=1)
    assert await ports.throttle.acquire("h1", "a", cooldown) is True
    await ports.elapse(timedelta(milliseconds=200))
    assert await ports.throttle.acquire("h1", "b", cooldown) is False  # does not extend
    await ports.elapse(timedelta(milliseconds=900))
    assert await ports.throttle.acquire("h1", "c", cooldown) is True


async def test_concurrent_acquires_open_one_window(ports: Ports) -> None:
    results = await asyncio.gather(
        *(ports.throttle.acquire("h1", f"o{n}", timedelta(minutes=1)) for n in range(20))
    )
    assert results.count(True) == 1


# =========================================================================== failure budget
async def held(ports: Ports, subject: str, at: datetime) -> int:
    """The slots the budget holds at ``at``: the smallest limit a new one fits under, less 1.

    Measured through the port itself (each probe that fits is given back).
    """
    for limit in range(1, 32):
        slot = await ports.failures.reserve(subject, at, WINDOW, limit)
        if slot is not None:
            await ports.failures.release(subject, slot)
            return limit - 1
    raise AssertionError("more slots held than probed")


async def test_failure_budget_counts_within_the_rolling_window(ports: Ports) -> None:
    t0 = ports.now
    assert await held(ports, "h1", t0) == 0
    for offset in (0, 30, 50):
        await ports.failures.reserve("h1", t0 + timedelta(minutes=offset), WINDOW, 1000)
    at = t0 + timedelta(minutes=50)
    assert await held(ports, "h1", at) == 3
    assert await held(ports, "h1", t0 + WINDOW - timedelta(milliseconds=1)) == 3
    assert await held(ports, "h1", t0 + WINDOW) == 2  # (now - window, now]
    assert await held(ports, "h1", t0 + timedelta(minutes=90)) == 1
    assert await held(ports, "h1", t0 + timedelta(minutes=110)) == 0
    assert await held(ports, "h2", at) == 0


async def test_concurrent_reservations_never_exceed_the_limit(ports: Ports) -> None:
    slots = await asyncio.gather(
        *(ports.failures.reserve("h1", ports.now, WINDOW, 3) for _ in range(30))
    )
    assert sum(slot is not None for slot in slots) == 3
    assert await held(ports, "h1", ports.now) == 3


async def test_a_released_slot_is_free_again(ports: Ports) -> None:
    first = await ports.failures.reserve("h1", ports.now, WINDOW, 1)
    assert first is not None
    assert await ports.failures.reserve("h1", ports.now, WINDOW, 1) is None
    await ports.failures.release("h1", first)
    assert await held(ports, "h1", ports.now) == 0
    assert await ports.failures.reserve("h1", ports.now, WINDOW, 1) is not None


async def test_failure_budget_reserve_drops_what_left_the_window(ports: Ports) -> None:
    t0 = ports.now
    await ports.failures.reserve("h1", t0, WINDOW, 1000)
    await ports.failures.reserve("h1", t0 + timedelta(minutes=61), WINDOW, 1000)
    # The first one was dropped, not merely left uncounted: a probe whose window still
    # covers t0 sees only the second one.
    assert await held(ports, "h1", t0 + timedelta(minutes=59)) == 1
    assert await held(ports, "h1", t0 + timedelta(minutes=61)) == 1


async def test_reserve_all_takes_a_slot_of_each_budget(ports: Ports) -> None:
    slots = await ports.failures.reserve_all(
        [("h1", "email"), ("u1", "user")], ports.now, WINDOW, 2
    )
    assert slots is not None
    assert [(subject, scope) for subject, _, scope in slots] == [("h1", "email"), ("u1", "user")]
    assert await held(ports, "h1", ports.now) == 1
    # The user's budget is its own key: the e-mail's probe does not see it.
    again = await ports.failures.reserve_all([("u1", "user")], ports.now, WINDOW, 1)
    assert again is None


async def test_reserve_all_gives_back_what_it_took_when_one_budget_is_full(ports: Ports) -> None:
    assert await ports.failures.reserve("u1", ports.now, WINDOW, 1, "user") is not None
    slots = await ports.failures.reserve_all(
        [("h1", "email"), ("u1", "user")], ports.now, WINDOW, 1
    )
    assert slots is None
    assert await held(ports, "h1", ports.now) == 0  # the e-mail's slot was given back


async def test_reserve_all_works_after_redis_forgot_its_scripts(ports: Ports) -> None:
    assert await ports.failures.reserve("h1", ports.now, WINDOW, 5) is not None
    await ports.forget_scripts()
    slots = await ports.failures.reserve_all(
        [("h1", "email"), ("u1", "user")], ports.now, WINDOW, 5
    )
    assert slots is not None
    assert len(slots) == 2
    assert await held(ports, "h1", ports.now) == 2


async def test_concurrent_reserve_alls_never_exceed_either_limit(ports: Ports) -> None:
    subjects: list[tuple[str, Scope]] = [("h1", "email"), ("u1", "user")]
    results = await asyncio.gather(
        *(ports.failures.reserve_all(subjects, ports.now, WINDOW, 3) for _ in range(20))
    )
    assert sum(r is not None for r in results) == 3
    assert await held(ports, "h1", ports.now) == 3


async def test_concurrent_failures_are_all_counted(ports: Ports) -> None:
    await asyncio.gather(
        *(ports.failures.reserve("h1", ports.now, WINDOW, 1000) for _ in range(20))
    )
    assert await held(ports, "h1", ports.now) == 20


# =========================================================================== rate limit
def _window_start(now: datetime, period_s: int) -> datetime:
    start_ms = to_epoch_ms(now) // (period_s * 1000) * period_s * 1000
    return datetime.fromtimestamp(start_ms / 1000, UTC)


async def test_rate_limit_counts_per_client_in_fixed_windows(ports: Ports) -> None:
    limit = RateLimit(count=3, period_seconds=60)
    start = _window_start(ports.now, 60)
    at = start + timedelta(seconds=15, milliseconds=500)
    assert [await ports.rate_limiter.hit("10.0.0.1", limit, at) for _ in range(3)] == [None] * 3
    assert await ports.rate_limiter.hit("10.0.0.1", limit, at) == 45  # ceil(44.5)
    assert await ports.rate_limiter.hit("10.0.0.1", limit, start + timedelta(seconds=59.5)) == 1
    assert await ports.rate_limiter.hit("10.0.0.2", limit, at) is None
    assert await ports.rate_limiter.hit("10.0.0.1", limit, start + timedelta(seconds=60)) is None


async def test_concurrent_hits_let_exactly_the_limit_through(ports: Ports) -> None:
    limit = RateLimit(count=5, period_seconds=3600)
    at = _window_start(ports.now, 3600) + timedelta(minutes=1)
    results = await asyncio.gather(
        *(ports.rate_limiter.hit("10.0.0.1", limit, at) for _ in range(12))
    )
    assert results.count(None) == 5
    assert {r for r in results if r is not None} == {3540}


# =========================================================================== startup
async def test_every_component_answers_ping(ports: Ports) -> None:
    for component in (
        ports.challenges,
        ports.sessions,
        ports.throttle,
        ports.failures,
        ports.projection,
        ports.rate_limiter,
    ):
        await component.ping()


# =========================================================================== fakes only
# What only the fakes can do: fail on demand, and let a clock (not Redis) drop records.
async def test_every_fakes_ping_can_be_made_to_fail() -> None:
    clock = FixedClock()
    fakes = [
        FakeChallengeStore(clock),
        FakeSessionStore(clock),
        FakeResendThrottle(clock),
        FakeFailureBudget(clock),
        FakeProjection(clock),
        FakeRateLimiter(clock),
        FakeConfigProvider(),
        FakeUsers(),
        FakeMail(),
    ]
    for fake in fakes:
        await fake.ping()
        fake.fail("ping")
        for _ in range(2):
            with pytest.raises(ServiceUnavailable) as caught:
                await fake.ping()
            assert caught.value.dependency == fake.dependency
        fake.heal("ping")
        await fake.ping()
        fake.fail("ping", times=1)
        with pytest.raises(ServiceUnavailable):
            await fake.ping()
        await fake.ping()


async def test_fake_projection_can_fail_after_the_snapshot() -> None:
    clock = FixedClock()
    projection = FakeProjection(clock)
    record = Session(
        device_session_id="d" * 32,
        user_id="usr-1",
        token_sha256="0" * 64,
        created_at=clock.now(),
        expires_at=clock.now() + timedelta(hours=1),
        client_ip="203.0.113.7",
        user_agent="pytest/1",
    )
    projection.fail("append_event", times=1)
    with pytest.raises(ServiceUnavailable, match="projection"):
        await projection.publish(record, clock.now())
    assert projection.snapshot(record.device_session_id) is not None
    assert projection.events == []
    assert await projection.publish(record, clock.now()) is PublishResult.UNCHANGED
    assert len(projection.events) == 1


async def test_fake_records_vanish_when_the_clock_passes_their_key_expiry() -> None:
    clock = FixedClock()
    store = FakeChallengeStore(clock)
    record = Challenge(
        challenge_id=codes.new_id(),
        status=ChallengeStatus.SENT,
        email_hash="ab" * 32,
        created_at=clock.now(),
        expires_at=clock.now() + timedelta(minutes=10),
    )
    await store.create(record, RETENTION)
    clock.advance(timedelta(minutes=70) - timedelta(milliseconds=1))
    assert await store.get(record.challenge_id) == record
    clock.advance(timedelta(milliseconds=1))
    assert await store.get(record.challenge_id) is None
    sessions = FakeSessionStore(clock)
    throttle = FakeResendThrottle(clock)
    await sessions.mark_user_blocked("usr-1", timedelta(minutes=10))
    assert await throttle.acquire("h1", "a", timedelta(minutes=1))
    clock.advance(timedelta(minutes=1))
    assert await throttle.acquire("h1", "b", timedelta(minutes=1))
    assert await sessions.is_user_blocked("usr-1")
    clock.advance(timedelta(minutes=9))
    assert not await sessions.is_user_blocked("usr-1")
