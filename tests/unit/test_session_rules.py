"""Session use cases (CONTRACT §6) over the in-memory fakes and a fixed clock."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from authsession.domain import codes
from authsession.domain.errors import (
    ChallengeExpired,
    InvalidRequest,
    ServiceUnavailable,
    SessionNotFound,
    SessionRevoked,
    UserBlocked,
    UserNotFound,
)
from authsession.domain.model import Challenge, ChallengeStatus, Session, SessionStatus
from authsession.domain.ports import Confirmation
from authsession.domain.sessions import StatusFilter
from tests.fakes import FakeChallengeStore, FakeUsers, FakeWorld, FixedClock, make_world

EMAIL = "jane@example.com"
USER = "usr-jane"


@pytest.fixture
def world() -> FakeWorld:
    world = make_world()
    world.users.add_user(EMAIL, USER)
    world.users.add_user("john@example.com", "usr-john")
    return world


async def new_session(world: FakeWorld, user_id: str = USER, **extra: Any) -> Session:
    """A session written the way a confirm writes it; then one second passes."""
    device_session_id = codes.new_id()
    session = await world.sessions.materialize(
        device_session_id=device_session_id,
        session_token=codes.new_session_token(device_session_id),
        user_id=user_id,
        client=world.client,
        device_name=extra.get("device_name"),
    )
    world.clock.advance(timedelta(seconds=1))
    return session


async def current(world: FakeWorld, device_session_id: str) -> Session:
    session = await world.store.get(device_session_id)
    assert session is not None
    return session


def ids(sessions: list[Session]) -> list[str]:
    return [s.device_session_id for s in sessions]


def snapshot_of(world: FakeWorld, device_session_id: str) -> dict[str, Any]:
    snapshot = world.projection.snapshot(device_session_id)
    assert snapshot is not None
    return snapshot


async def sent_code(world: FakeWorld, email: str = EMAIL) -> tuple[str, str]:
    issued = await world.login.send_email_code(email, None)
    code = world.mail.code_for(issued.challenge_id)
    assert code is not None
    return issued.challenge_id, code


# =========================================================================== list and get
async def test_list_is_newest_first_and_filters_by_status(world: FakeWorld) -> None:
    world.config.set(session_ttl=timedelta(hours=1))
    expired = await new_session(world)
    world.config.set(session_ttl=timedelta(hours=720))
    revoked = await new_session(world)
    active = await new_session(world)
    await new_session(world, "usr-john")
    await world.sessions.revoke(revoked.device_session_id)
    world.clock.advance(timedelta(hours=1))
    everything = await world.sessions.list_sessions(USER)
    assert ids(everything) == ids([active, revoked, expired])
    assert ids(await world.sessions.list_sessions(USER, "all")) == ids(everything)
    expected: dict[StatusFilter, list[Session]] = {
        "active": [active],
        "revoked": [revoked],
        "expired": [expired],
    }
    for status, sessions in expected.items():
        assert ids(await world.sessions.list_sessions(USER, status)) == ids(sessions)


async def test_a_session_is_expired_from_the_instant_of_its_expiry(world: FakeWorld) -> None:
    session = await new_session(world)
    world.clock.set(session.expires_at - timedelta(milliseconds=1))
    assert ids(await world.sessions.list_sessions(USER, "active")) == [session.device_session_id]
    world.clock.set(session.expires_at)
    assert ids(await world.sessions.list_sessions(USER, "expired")) == [session.device_session_id]
    assert await world.sessions.list_sessions(USER, "active") == []


async def test_a_revoked_and_expired_session_is_revoked(world: FakeWorld) -> None:
    session = await new_session(world)
    await world.sessions.revoke(session.device_session_id)
    world.clock.set(session.expires_at + timedelta(hours=1))
    assert ids(await world.sessions.list_sessions(USER, "revoked")) == [session.device_session_id]
    assert await world.sessions.list_sessions(USER, "expired") == []


async def test_unknown_user_has_no_sessions(world: FakeWorld) -> None:
    assert await world.sessions.list_sessions("usr-nobody") == []
    assert await world.sessions.list_sessions("usr-nobody", "active") == []


async def test_sessions_past_their_retention_are_no_longer_listed_or_readable(
    world: FakeWorld,
) -> None:
    session = await new_session(world)
    world.clock.set(session.expires_at + timedelta(hours=168) - timedelta(milliseconds=1))
    assert (await world.sessions.get(session.device_session_id)).device_session_id == (
        session.device_session_id
    )
    world.clock.advance(timedelta(milliseconds=1))
    assert await world.sessions.list_sessions(USER) == []
    with pytest.raises(SessionNotFound):
        await world.sessions.get(session.device_session_id)


async def test_get_reads_one_session(world: FakeWorld) -> None:
    session = await new_session(world, device_name="Jane's phone")
    assert await world.sessions.get(session.device_session_id) == session
    with pytest.raises(SessionNotFound):
        await world.sessions.get(codes.new_id())


# =========================================================================== revoke
async def test_revoke_bumps_the_version_and_publishes(world: FakeWorld) -> None:
    session = await new_session(world)
    now = world.clock.now()
    revoked = await world.sessions.revoke(session.device_session_id)
    assert revoked.revoked_at == now
    assert revoked.revoke_reason == "revoked_by_backend"
    assert revoked.version == 2
    assert revoked.status_at(now) is SessionStatus.REVOKED
    assert await current(world, session.device_session_id) == revoked
    snapshot = snapshot_of(world, session.device_session_id)
    assert (snapshot["status"], snapshot["version"]) == ("revoked", 2)
    assert snapshot["revoke_reason"] == "revoked_by_backend"


async def test_revoke_is_idempotent(world: FakeWorld) -> None:
    session = await new_session(world)
    first = await world.sessions.revoke(session.device_session_id, "lost_device")
    world.clock.advance(timedelta(minutes=5))
    again = await world.sessions.revoke(session.device_session_id, "other.reason")
    assert again == first
    assert (again.revoked_at, again.revoke_reason, again.version) == (
        first.revoked_at,
        "lost_device",
        2,
    )
    # Republished (which repairs a projection that missed the first one), not rewritten.
    events = world.projection.events_for(session.device_session_id)
    assert [(e["version"], e["status"]) for e in events] == [
        ("1", "active"),
        ("2", "revoked"),
        ("2", "revoked"),
    ]


async def test_revoke_of_unknown_session_is_not_found(world: FakeWorld) -> None:
    with pytest.raises(SessionNotFound):
        await world.sessions.revoke(codes.new_id())


@pytest.mark.parametrize("reason", ["", "Upper", "with space", "x" * 65, "semi;colon", "é"])
async def test_revoke_reason_must_have_the_contract_form(world: FakeWorld, reason: str) -> None:
    session = await new_session(world)
    with pytest.raises(InvalidRequest):
        await world.sessions.revoke(session.device_session_id, reason)
    assert (await current(world, session.device_session_id)).revoked_at is None


async def test_a_reason_with_a_trailing_newline_is_rejected(world: FakeWorld) -> None:
    session = await new_session(world)
    with pytest.raises(InvalidRequest):
        await world.sessions.revoke(session.device_session_id, "revoked\n")


@pytest.mark.parametrize("reason", ["a", "x" * 64, "user.request-2_b"])
async def test_revoke_reason_of_the_contract_form_is_kept(world: FakeWorld, reason: str) -> None:
    session = await new_session(world)
    assert (await world.sessions.revoke(session.device_session_id, reason)).revoke_reason == reason


async def test_a_failed_publication_of_a_revoke_is_repaired_by_repeating_it(
    world: FakeWorld,
) -> None:
    session = await new_session(world)
    world.projection.fail("publish", times=1)
    with pytest.raises(ServiceUnavailable):
        await world.sessions.revoke(session.device_session_id)
    assert snapshot_of(world, session.device_session_id)["status"] == "active"
    await world.sessions.revoke(session.device_session_id)
    assert snapshot_of(world, session.device_session_id)["status"] == "revoked"


# =========================================================================== revoke all
async def test_revoke_all_answers_only_what_this_call_revoked(world: FakeWorld) -> None:
    already = await new_session(world)
    kept = await new_session(world)
    first = await new_session(world)
    second = await new_session(world)
    johns = await new_session(world, "usr-john")
    await world.sessions.revoke(already.device_session_id, "earlier")
    revoked = await world.sessions.revoke_all(USER, except_session_id=kept.device_session_id)
    assert revoked == [second.device_session_id, first.device_session_id]
    for session in (first, second):
        stored = await current(world, session.device_session_id)
        assert stored.revoke_reason == "revoked_by_backend"
        assert snapshot_of(world, session.device_session_id)["status"] == "revoked"
    assert (await current(world, already.device_session_id)).revoke_reason == "earlier"
    assert (await current(world, kept.device_session_id)).revoked_at is None
    assert (await current(world, johns.device_session_id)).revoked_at is None
    assert await world.sessions.revoke_all(USER, except_session_id=kept.device_session_id) == []


async def test_revoke_all_with_a_reason_and_without_sessions(world: FakeWorld) -> None:
    session = await new_session(world)
    assert await world.sessions.revoke_all(USER, "password_reset") == [session.device_session_id]
    assert (await current(world, session.device_session_id)).revoke_reason == "password_reset"
    assert await world.sessions.revoke_all("usr-nobody") == []
    with pytest.raises(InvalidRequest):
        await world.sessions.revoke_all(USER, "Bad Reason")


async def test_revoke_all_with_an_unknown_except_id_revokes_everything(world: FakeWorld) -> None:
    sessions = [await new_session(world) for _ in range(2)]
    revoked = await world.sessions.revoke_all(USER, except_session_id=codes.new_id())
    assert sorted(revoked) == sorted(ids(sessions))


# =========================================================================== extend
async def test_extend_defaults_to_the_session_ttl(world: FakeWorld) -> None:
    session = await new_session(world)
    world.clock.advance(timedelta(hours=5))
    extended = await world.sessions.extend(session.device_session_id)
    assert extended.expires_at == world.clock.now() + timedelta(hours=720)
    assert extended.version == 2
    assert await current(world, session.device_session_id) == extended
    snapshot = snapshot_of(world, session.device_session_id)
    assert snapshot["version"] == 2


@pytest.mark.parametrize(
    ("ttl", "delta"),
    [
        ("1h", timedelta(hours=1)),
        ("720h", timedelta(hours=720)),
        ("90m30s", timedelta(minutes=90, seconds=30)),
    ],
)
async def test_extend_with_a_ttl_up_to_the_session_ttl(
    world: FakeWorld, ttl: str, delta: timedelta
) -> None:
    session = await new_session(world)
    extended = await world.sessions.extend(session.device_session_id, ttl)
    assert extended.expires_at == world.clock.now() + delta


@pytest.mark.parametrize("ttl", ["720h0m0.001s", "721h", "0", "0s", "-1h", "1d", "", "soon"])
async def test_extend_rejects_a_ttl_out_of_bounds_or_malformed(world: FakeWorld, ttl: str) -> None:
    session = await new_session(world)
    with pytest.raises(InvalidRequest) as caught:
        await world.sessions.extend(session.device_session_id, ttl)
    assert caught.value.details == {"field": "ttl"}
    assert await current(world, session.device_session_id) == session


async def test_extend_bounds_follow_the_runtime_session_ttl(world: FakeWorld) -> None:
    session = await new_session(world)
    world.config.set(session_ttl=timedelta(hours=2))
    with pytest.raises(InvalidRequest):
        await world.sessions.extend(session.device_session_id, "3h")
    extended = await world.sessions.extend(session.device_session_id)
    assert extended.expires_at == world.clock.now() + timedelta(hours=2)


async def test_extend_of_a_revoked_session_is_409(world: FakeWorld) -> None:
    session = await new_session(world)
    revoked = await world.sessions.revoke(session.device_session_id)
    with pytest.raises(SessionRevoked):
        await world.sessions.extend(session.device_session_id)
    assert await current(world, session.device_session_id) == revoked


async def test_extend_of_an_expired_session_is_409(world: FakeWorld) -> None:
    world.config.set(session_ttl=timedelta(hours=1))
    session = await new_session(world)
    world.clock.set(session.expires_at)
    with pytest.raises(SessionRevoked):
        await world.sessions.extend(session.device_session_id, "1h")
    assert await current(world, session.device_session_id) == session


async def test_extend_of_unknown_session_is_not_found(world: FakeWorld) -> None:
    with pytest.raises(SessionNotFound):
        await world.sessions.extend(codes.new_id())


# =========================================================================== block
class OrderedUsers(FakeUsers):
    """Remembers what the session store held when the user service was asked to block."""

    def __init__(self) -> None:
        super().__init__()
        self.world: FakeWorld | None = None
        self.revoked_when_blocking: list[bool] = []
        self.marked_when_blocking: list[bool] = []

    async def block(self, user_id: str, reason: str) -> None:
        assert self.world is not None
        self.revoked_when_blocking.append(
            any(s.revoked_at is not None for s in self.world.store.all())
        )
        self.marked_when_blocking.append(await self.world.store.is_user_blocked(user_id))
        await super().block(user_id, reason)


async def test_block_asks_the_user_service_first_then_revokes_everything() -> None:
    users = OrderedUsers()
    world = make_world(users=users)
    users.world = world
    users.add_user(EMAIL, USER)
    sessions = [await new_session(world) for _ in range(3)]
    await world.sessions.revoke(sessions[0].device_session_id, "earlier")
    other = await new_session(world, users.add_user("john@example.com"))
    world.clock.advance(timedelta(minutes=1))
    revoked = await world.sessions.block_user(USER)
    assert (users.revoked_when_blocking, users.marked_when_blocking) == ([True], [False])
    assert users.blocked == {USER: "user_blocked"}
    assert revoked == [sessions[2].device_session_id, sessions[1].device_session_id]
    for session in sessions[1:]:
        stored = await current(world, session.device_session_id)
        assert stored.revoke_reason == "user_blocked"
        assert stored.revoked_at == world.clock.now()
        snapshot = snapshot_of(world, session.device_session_id)
        assert (snapshot["status"], snapshot["revoke_reason"]) == ("revoked", "user_blocked")
    assert (await current(world, sessions[0].device_session_id)).revoke_reason == "earlier"
    assert (await current(world, other.device_session_id)).revoked_at is None
    assert await world.store.is_user_blocked(USER)


async def test_block_passes_its_reason_to_the_user_service_only(world: FakeWorld) -> None:
    session = await new_session(world)
    await world.sessions.block_user(USER, "fraud")
    assert world.users.blocked[USER] == "fraud"
    assert (await current(world, session.device_session_id)).revoke_reason == "user_blocked"


async def test_block_with_a_bad_reason_calls_nobody(world: FakeWorld) -> None:
    await new_session(world)
    with pytest.raises(InvalidRequest):
        await world.sessions.block_user(USER, "Not Valid")
    assert world.users.calls_to("block") == []


async def test_user_service_failure_on_block_revokes_nothing(world: FakeWorld) -> None:
    sessions = [await new_session(world) for _ in range(2)]
    events = len(world.projection.events)
    world.users.fail("block", times=1)
    with pytest.raises(ServiceUnavailable) as caught:
        await world.sessions.block_user(USER)
    assert caught.value.dependency == "user_service"
    for session in sessions:
        assert (await current(world, session.device_session_id)).revoked_at is None
    assert len(world.projection.events) == events
    assert not await world.store.is_user_blocked(USER)
    assert USER not in world.users.blocked


async def test_block_of_an_unknown_user_is_not_found_and_revokes_nothing(
    world: FakeWorld,
) -> None:
    orphan = await new_session(world, "usr-ghost")
    with pytest.raises(UserNotFound):
        await world.sessions.block_user("usr-ghost")
    assert (await current(world, orphan.device_session_id)).revoked_at is None
    assert not await world.store.is_user_blocked("usr-ghost")


async def test_block_of_a_user_without_sessions(world: FakeWorld) -> None:
    assert await world.sessions.block_user(USER) == []
    assert await world.store.is_user_blocked(USER)


async def test_a_code_mailed_before_the_block_cannot_open_a_session(world: FakeWorld) -> None:
    challenge_id, code = await sent_code(world)
    await world.sessions.block_user(USER)
    with pytest.raises(UserBlocked):
        await world.login.confirm(challenge_id, code, None, world.client)
    assert world.store.all() == []
    challenge = await world.challenges.get(challenge_id)
    assert challenge is not None
    assert challenge.status is ChallengeStatus.SENT
    # After the block, new codes are suppressed by the user service's answer.
    world.clock.advance(world.fixed.resend_cooldown)
    issued = await world.login.send_email_code(EMAIL, None)
    after = await world.challenges.get(issued.challenge_id)
    assert after is not None
    assert after.status is ChallengeStatus.DELIVERY_SUPPRESSED


async def test_the_block_marker_outlives_every_code_mailed_before_it(world: FakeWorld) -> None:
    challenge_id, code = await sent_code(world)
    world.clock.advance(timedelta(minutes=3))
    await world.sessions.block_user(USER)
    world.clock.advance(timedelta(minutes=7) - timedelta(milliseconds=1))  # code still valid
    with pytest.raises(UserBlocked):
        await world.login.confirm(challenge_id, code, None, world.client)
    world.clock.advance(timedelta(milliseconds=1))
    with pytest.raises(ChallengeExpired):
        await world.login.confirm(challenge_id, code, None, world.client)
    world.clock.advance(timedelta(minutes=3))
    assert not await world.store.is_user_blocked(USER)  # kept for CHALLENGE_TTL


async def test_a_session_confirmed_before_the_block_is_revoked_and_its_replay_is_409(
    world: FakeWorld,
) -> None:
    challenge_id, code = await sent_code(world)
    confirmed = await world.login.confirm(challenge_id, code, None, world.client)
    assert await world.sessions.block_user(USER) == [confirmed.device_session_id]
    with pytest.raises((SessionRevoked, UserBlocked)):
        await world.login.confirm(challenge_id, code, None, world.client)


async def _assert_blocked_session_revoked(world: FakeWorld, challenge_id: str) -> None:
    # The block marker is checked in the same atomic step that would write the session:
    # the confirmed challenge's session is never written, let alone published.
    assert await world.sessions.list_sessions(USER, "active") == []
    challenge = await world.challenges.get(challenge_id)
    assert challenge is not None
    assert challenge.device_session_id is not None
    assert await world.store.get(challenge.device_session_id) is None
    assert world.projection.snapshot(challenge.device_session_id) is None


async def test_a_confirm_retried_after_a_block_cannot_open_a_session(world: FakeWorld) -> None:
    challenge_id, code = await sent_code(world)
    world.store.fail("create", times=1)  # the challenge moves, the session write fails
    with pytest.raises(ServiceUnavailable):
        await world.login.confirm(challenge_id, code, None, world.client)
    assert await world.sessions.block_user(USER) == []  # nothing to revoke yet
    with pytest.raises(UserBlocked):
        await world.login.confirm(challenge_id, code, None, world.client)
    await _assert_blocked_session_revoked(world, challenge_id)
    with pytest.raises((UserBlocked, SessionRevoked)):
        await world.login.confirm(challenge_id, code, None, world.client)


class BlockDuringConfirm(FakeChallengeStore):
    """Blocks the user right after the challenge transition, before the session write."""

    def __init__(self, clock: FixedClock) -> None:
        super().__init__(clock)
        self.world: FakeWorld | None = None

    async def confirm(
        self,
        challenge_id: str,
        confirmation: Confirmation,
        *,
        now: datetime,
        max_attempts: int,
        retention: timedelta,
    ) -> Challenge | None:
        result = await super().confirm(
            challenge_id, confirmation, now=now, max_attempts=max_attempts, retention=retention
        )
        assert self.world is not None
        assert await self.world.sessions.block_user(confirmation.user_id) == []
        return result


async def test_a_block_racing_a_confirm_leaves_no_active_session() -> None:
    clock = FixedClock()
    challenges = BlockDuringConfirm(clock)
    world = make_world(clock=clock, challenges=challenges)
    challenges.world = world
    world.users.add_user(EMAIL, USER)
    challenge_id, code = await sent_code(world)
    with pytest.raises(UserBlocked):
        await world.login.confirm(challenge_id, code, None, world.client)
    await _assert_blocked_session_revoked(world, challenge_id)


async def test_a_failed_session_write_leaves_nothing_and_the_retry_writes_it(
    world: FakeWorld,
) -> None:
    # The index and the record are written by one atomic step: a failure leaves neither,
    # so no listing or revoke-all can see half a session; the retry writes both.
    device_session_id = codes.new_session_id(USER)
    world.store.fail("create", times=1)

    async def materialize() -> Session:
        return await world.sessions.materialize(
            device_session_id=device_session_id,
            session_token=codes.new_session_token(device_session_id),
            user_id=USER,
            client=world.client,
            device_name=None,
        )

    with pytest.raises(ServiceUnavailable):
        await materialize()
    assert world.store.indexed(USER) == []
    assert await world.sessions.revoke_all(USER) == []
    session = await materialize()
    assert world.store.indexed(USER) == [device_session_id]
    assert await world.sessions.revoke_all(USER) == [session.device_session_id]
