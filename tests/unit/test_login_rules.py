"""send-email-code and confirm (CONTRACT §5) over the in-memory fakes and a fixed clock."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from authsession.domain import codes
from authsession.domain.email import email_hash
from authsession.domain.errors import (
    ChallengeExpired,
    ChallengeNotFound,
    InvalidCode,
    InvalidRequest,
    ServiceUnavailable,
    SessionRevoked,
    TooManyAttempts,
    UserBlocked,
)
from authsession.domain.login import Confirmed
from authsession.domain.model import Challenge, ChallengeStatus, SessionStatus
from authsession.domain.ports import UserResolution
from tests.fakes import FakeWorld, make_world

EMAIL = "jane@example.com"
USER = "usr-jane"
HASH = email_hash(EMAIL)


@pytest.fixture
def world() -> FakeWorld:
    world = make_world()
    world.users.add_user(EMAIL, USER)
    return world


async def send(world: FakeWorld, email: str = EMAIL, locale: str | None = None) -> str:
    issued = await world.login.send_email_code(email, locale)
    return issued.challenge_id


async def send_code(world: FakeWorld, email: str = EMAIL) -> tuple[str, str]:
    """A sent challenge and its code."""
    challenge_id = await send(world, email)
    code = world.mail.code_for(challenge_id)
    assert code is not None
    return challenge_id, code


async def confirm(
    world: FakeWorld, challenge_id: str, code: str, device_name: str | None = None
) -> Confirmed:
    return await world.login.confirm(challenge_id, code, device_name, world.client)


async def login(world: FakeWorld, email: str = EMAIL) -> Confirmed:
    """A full login; moves the clock past the resend cooldown afterwards."""
    challenge_id, code = await send_code(world, email)
    result = await confirm(world, challenge_id, code)
    world.clock.advance(world.fixed.resend_cooldown)
    return result


async def stored(world: FakeWorld, challenge_id: str) -> Challenge:
    challenge = await world.challenges.get(challenge_id)
    assert challenge is not None
    return challenge


def other_than(code: str, n: int = 1) -> str:
    return f"{(int(code) + n) % 1_000_000:06d}"


async def failures(world: FakeWorld, email: str = EMAIL) -> int:
    return world.failures.held(email_hash(email), world.clock.now(), world.fixed.failure_window)


# =========================================================================== send-email-code
async def test_existing_user_gets_a_sent_challenge_and_exactly_one_mail(world: FakeWorld) -> None:
    issued = await world.login.send_email_code(EMAIL, "de-CH")
    assert issued.expires_at == world.clock.now() + timedelta(minutes=10)
    assert world.users.calls == [("resolve_by_email", EMAIL)]
    [message] = world.mail.messages
    assert message.email == EMAIL
    assert message.challenge_id == issued.challenge_id
    assert message.expires_at == issued.expires_at
    assert message.locale == "de-CH"
    challenge = await stored(world, issued.challenge_id)
    assert challenge.status is ChallengeStatus.SENT
    assert challenge.user_id == USER
    assert challenge.email is None  # kept only where the user must be created at confirm
    assert challenge.email_hash == HASH
    assert challenge.attempts == 0
    assert challenge.code_salt is not None
    assert challenge.code_hmac is not None
    assert codes.code_hmac(challenge.code_salt, message.code) == challenge.code_hmac
    assert world.throttle.owner(HASH) == issued.challenge_id


async def test_unknown_user_with_signup_gets_a_code_and_the_challenge_keeps_the_address(
    world: FakeWorld,
) -> None:
    challenge_id = await send(world, "new@example.com")
    assert world.users.calls == [("resolve_by_email", "new@example.com")]
    assert len(world.mail.messages) == 1
    challenge = await stored(world, challenge_id)
    assert challenge.status is ChallengeStatus.SENT
    assert challenge.user_id is None
    assert challenge.email == "new@example.com"


async def test_blocked_user_is_suppressed_after_resolve_without_mail(world: FakeWorld) -> None:
    world.users.add_user("bad@example.com", "usr-bad", blocked=True)
    challenge_id = await send(world, "bad@example.com")
    assert world.users.calls == [("resolve_by_email", "bad@example.com")]
    assert world.mail.attempted == []
    challenge = await stored(world, challenge_id)
    assert challenge.status is ChallengeStatus.DELIVERY_SUPPRESSED
    assert challenge.code_hmac is None


async def test_unknown_user_without_signup_is_suppressed(world: FakeWorld) -> None:
    world.config.set(signup_enabled=False)
    challenge_id = await send(world, "new@example.com")
    assert world.users.calls_to("resolve_by_email") == ["new@example.com"]
    assert world.mail.attempted == []
    assert (await stored(world, challenge_id)).status is ChallengeStatus.DELIVERY_SUPPRESSED


async def test_signup_disabled_still_mails_existing_users(world: FakeWorld) -> None:
    world.config.set(signup_enabled=False)
    challenge_id = await send(world)
    assert (await stored(world, challenge_id)).status is ChallengeStatus.SENT
    assert len(world.mail.messages) == 1


async def test_inside_the_cooldown_is_throttled_without_calling_anyone(world: FakeWorld) -> None:
    first = await send(world)
    world.clock.advance(timedelta(seconds=59, milliseconds=999))
    second = await send(world)
    assert second != first
    assert world.users.calls == [("resolve_by_email", EMAIL)]
    assert len(world.mail.attempted) == 1
    challenge = await stored(world, second)
    assert challenge.status is ChallengeStatus.DELIVERY_THROTTLED
    assert challenge.email_hash == HASH
    assert (challenge.code_hmac, challenge.code_salt, challenge.user_id) == (None, None, None)


async def test_the_cooldown_is_a_fixed_window_that_throttled_requests_do_not_extend(
    world: FakeWorld,
) -> None:
    await send(world)
    world.clock.advance(timedelta(seconds=30))
    throttled = await send(world)
    world.clock.advance(timedelta(seconds=30))  # 60 s after the first, 30 s after the second
    again = await send(world)
    assert (await stored(world, throttled)).status is ChallengeStatus.DELIVERY_THROTTLED
    assert (await stored(world, again)).status is ChallengeStatus.SENT
    assert len(world.mail.messages) == 2


async def test_suppressed_requests_also_start_the_cooldown(world: FakeWorld) -> None:
    world.users.add_user("bad@example.com", "usr-bad", blocked=True)
    await send(world, "bad@example.com")
    challenge_id = await send(world, "bad@example.com")
    assert (await stored(world, challenge_id)).status is ChallengeStatus.DELIVERY_THROTTLED
    assert len(world.users.calls) == 1


async def test_the_cooldown_is_per_normalized_address(world: FakeWorld) -> None:
    await send(world, EMAIL)
    same = await send(world, "  JANE@Example.com ")
    other = await send(world, "john@example.com")
    assert (await stored(world, same)).status is ChallengeStatus.DELIVERY_THROTTLED
    assert (await stored(world, other)).status is ChallengeStatus.SENT


async def test_every_accepted_case_answers_the_same_shape(world: FakeWorld) -> None:
    world.users.add_user("bad@example.com", "usr-bad", blocked=True)
    now = world.clock.now()
    answers = [
        await world.login.send_email_code(EMAIL, None),  # sent
        await world.login.send_email_code(EMAIL, None),  # throttled
        await world.login.send_email_code("bad@example.com", None),  # suppressed
        await world.login.send_email_code("new@example.com", None),  # sent, unknown
    ]
    assert len({a.challenge_id for a in answers}) == len(answers)
    for answer in answers:
        assert codes.is_valid_id(answer.challenge_id)
        assert answer.expires_at == now + timedelta(minutes=10)
        assert type(answer).__slots__ == ("challenge_id", "expires_at")


async def test_the_runtime_challenge_ttl_applies(world: FakeWorld) -> None:
    world.config.set(challenge_ttl=timedelta(minutes=2))
    issued = await world.login.send_email_code(EMAIL, None)
    assert issued.expires_at == world.clock.now() + timedelta(minutes=2)
    assert (await stored(world, issued.challenge_id)).expires_at == issued.expires_at


async def test_the_address_is_normalized_before_anything(world: FakeWorld) -> None:
    world.users.add_user("anna@xn--bcher-kva.de", "usr-anna")
    challenge_id = await send(world, "  Anna@BÜCHER.de\t")
    assert world.users.calls == [("resolve_by_email", "anna@xn--bcher-kva.de")]
    assert world.mail.messages[0].email == "anna@xn--bcher-kva.de"
    assert (await stored(world, challenge_id)).email_hash == email_hash("anna@xn--bcher-kva.de")


@pytest.mark.parametrize("raw", ["", "jane", "jane@", "@example.com", "jane@exa mple.com"])
async def test_an_invalid_address_is_rejected_before_any_call(world: FakeWorld, raw: str) -> None:
    with pytest.raises(InvalidRequest):
        await world.login.send_email_code(raw, None)
    assert world.users.calls == []
    assert world.mail.attempted == []
    assert world.challenges.ids() == []
    assert world.throttle.owner(HASH) is None


async def test_mail_failure_is_503_delivery_failed_and_releases_the_cooldown(
    world: FakeWorld,
) -> None:
    world.mail.fail("send_login_code", times=1)
    with pytest.raises(ServiceUnavailable) as caught:
        await send(world)
    assert caught.value.dependency == "mail_service"
    [failed] = world.challenges.ids()
    assert (await stored(world, failed)).status is ChallengeStatus.DELIVERY_FAILED
    assert world.throttle.owner(HASH) is None
    retried = await send(world)  # not throttled: the services are called again
    assert (await stored(world, retried)).status is ChallengeStatus.SENT
    assert world.users.calls_to("resolve_by_email") == [EMAIL, EMAIL]
    assert len(world.mail.attempted) == 2


async def test_mail_failure_still_answers_503_when_recording_it_fails(world: FakeWorld) -> None:
    world.mail.fail("send_login_code", times=1)
    world.challenges.fail("set_delivery_status", times=1)
    with pytest.raises(ServiceUnavailable) as caught:
        await send(world)
    assert caught.value.dependency == "mail_service"
    assert world.throttle.owner(HASH) is None


async def test_user_service_failure_is_503_and_releases_the_cooldown(world: FakeWorld) -> None:
    world.users.fail("resolve_by_email", times=1)
    with pytest.raises(ServiceUnavailable) as caught:
        await send(world)
    assert caught.value.dependency == "user_service"
    assert world.mail.attempted == []
    assert world.throttle.owner(HASH) is None
    retried = await send(world)
    assert (await stored(world, retried)).status is ChallengeStatus.SENT


async def test_a_failed_release_still_answers_with_the_original_failure(world: FakeWorld) -> None:
    world.users.fail("resolve_by_email", times=1)
    world.throttle.fail("release", times=1)
    with pytest.raises(ServiceUnavailable) as caught:
        await send(world)
    assert caught.value.dependency == "user_service"
    # The window then runs out by itself.
    assert world.throttle.owner(HASH) is not None
    world.clock.advance(world.fixed.resend_cooldown)
    assert (await stored(world, await send(world))).status is ChallengeStatus.SENT


async def test_a_failure_only_releases_its_own_window(world: FakeWorld) -> None:
    # Another request's window (reopened after this one's expired) is never closed by it.
    first = await send(world)
    world.clock.advance(world.fixed.resend_cooldown)
    owner = await send(world)
    assert world.throttle.owner(HASH) == owner
    await world.throttle.release(HASH, first)
    assert world.throttle.owner(HASH) == owner


# =========================================================================== confirm rule 1
async def test_unknown_challenge_is_not_found(world: FakeWorld) -> None:
    with pytest.raises(ChallengeNotFound):
        await confirm(world, codes.new_id(), "123456")


async def test_challenge_at_its_expiry_is_expired_even_with_the_right_code(
    world: FakeWorld,
) -> None:
    challenge_id, code = await send_code(world)
    world.clock.advance(timedelta(minutes=10) - timedelta(milliseconds=1))
    assert (await confirm(world, challenge_id, code)).created is True
    challenge_id, code = await send_code(world, "new@example.com")
    world.clock.advance(timedelta(minutes=10))
    with pytest.raises(ChallengeExpired):
        await confirm(world, challenge_id, code)
    assert (await stored(world, challenge_id)).attempts == 0
    assert await failures(world, "new@example.com") == 0


async def test_expired_challenge_answers_expired_until_its_retention_ends(
    world: FakeWorld,
) -> None:
    challenge_id, code = await send_code(world)
    world.clock.advance(timedelta(minutes=10) + timedelta(minutes=59))
    with pytest.raises(ChallengeExpired):
        await confirm(world, challenge_id, other_than(code))
    world.clock.advance(timedelta(minutes=1))
    with pytest.raises(ChallengeNotFound):
        await confirm(world, challenge_id, code)


async def test_expired_beats_an_exhausted_hourly_budget(world: FakeWorld) -> None:
    world.config.set(max_failed_confirms_per_email=1)
    challenge_id, code = await send_code(world)
    with pytest.raises(InvalidCode):
        await confirm(world, challenge_id, other_than(code))
    world.clock.advance(timedelta(minutes=10))
    assert await failures(world) == 1  # the budget is still exhausted
    with pytest.raises(ChallengeExpired):
        await confirm(world, challenge_id, code)


async def test_expired_beats_an_exhausted_challenge(world: FakeWorld) -> None:
    world.config.set(max_confirm_attempts=1)
    challenge_id, code = await send_code(world)
    with pytest.raises(InvalidCode):
        await confirm(world, challenge_id, other_than(code))
    world.clock.advance(timedelta(minutes=10))
    with pytest.raises(ChallengeExpired):
        await confirm(world, challenge_id, code)


# =========================================================================== confirm rule 2
async def test_exhausted_challenge_is_429_even_with_the_right_code(world: FakeWorld) -> None:
    challenge_id, code = await send_code(world)
    for n in range(1, 6):
        with pytest.raises(InvalidCode):
            await confirm(world, challenge_id, other_than(code, n))
    with pytest.raises(TooManyAttempts):
        await confirm(world, challenge_id, code)
    with pytest.raises(TooManyAttempts):
        await confirm(world, challenge_id, other_than(code))
    assert await failures(world) == 5  # 429s are not counted
    assert await world.store.list_for_user(USER) == []


async def test_exhausted_hourly_budget_is_429_even_with_the_right_code(world: FakeWorld) -> None:
    world.config.set(max_failed_confirms_per_email=3)
    challenge_id, code = await send_code(world)
    for n in range(1, 4):
        with pytest.raises(InvalidCode):
            await confirm(world, challenge_id, other_than(code, n))
    with pytest.raises(TooManyAttempts):
        await confirm(world, challenge_id, code)
    assert (await stored(world, challenge_id)).attempts == 3


async def test_a_new_code_does_not_reset_the_hourly_budget(world: FakeWorld) -> None:
    world.config.set(max_failed_confirms_per_email=3)
    for _ in range(3):
        challenge_id, code = await send_code(world)
        with pytest.raises(InvalidCode):
            await confirm(world, challenge_id, other_than(code))
        world.clock.advance(world.fixed.resend_cooldown)
    challenge_id, code = await send_code(world)
    with pytest.raises(TooManyAttempts):
        await confirm(world, challenge_id, code)
    # Other addresses are not affected.
    john, john_code = await send_code(world, "john@example.com")
    assert (await confirm(world, john, john_code)).created is True


async def test_the_hourly_budget_rolls(world: FakeWorld) -> None:
    world.config.set(max_failed_confirms_per_email=2, challenge_ttl=timedelta(hours=2))
    challenge_id, code = await send_code(world)
    with pytest.raises(InvalidCode):
        await confirm(world, challenge_id, other_than(code, 1))
    world.clock.advance(timedelta(minutes=30))
    with pytest.raises(InvalidCode):
        await confirm(world, challenge_id, other_than(code, 2))
    world.clock.advance(timedelta(minutes=29))
    with pytest.raises(TooManyAttempts):
        await confirm(world, challenge_id, code)
    world.clock.advance(timedelta(minutes=1))  # the first failure is now an hour old
    assert (await confirm(world, challenge_id, code)).created is True


# =========================================================================== confirm rule 3
async def test_replay_returns_the_same_session_and_republishes(world: FakeWorld) -> None:
    challenge_id, code = await send_code(world)
    first = await confirm(world, challenge_id, code, "Jane's phone")
    assert first.created is True
    world.clock.advance(timedelta(minutes=4))
    replay = await confirm(world, challenge_id, code, "another name")
    assert replay == Confirmed(
        device_session_id=first.device_session_id,
        session_token=first.session_token,
        user_id=first.user_id,
        expires_at=first.expires_at,
        created=False,
    )
    [session] = await world.store.list_for_user(USER)
    assert session.device_session_id == first.device_session_id
    assert session.device_name == "Jane's phone"
    # The snapshot is current: a replay appends no second event (CONTRACT §12/§9).
    events = world.projection.events_for(first.device_session_id)
    assert [e["version"] for e in events] == ["1"]
    assert world.users.calls_to("ensure") == []


async def test_replay_repairs_a_missing_snapshot(world: FakeWorld) -> None:
    # A projection that lost the snapshot (e.g. never written) is written again on replay.
    challenge_id, code = await send_code(world)
    world.projection.fail("publish", times=1)
    with pytest.raises(ServiceUnavailable):
        await confirm(world, challenge_id, code)
    assert world.projection.events == []
    replay = await confirm(world, challenge_id, code)
    snapshot = world.projection.snapshot(replay.device_session_id)
    assert snapshot is not None
    assert snapshot["status"] == "active"
    assert snapshot["token_sha256"] == codes.token_sha256(replay.session_token)


async def test_replay_of_a_revoked_session_is_409(world: FakeWorld) -> None:
    challenge_id, code = await send_code(world)
    first = await confirm(world, challenge_id, code)
    await world.sessions.revoke(first.device_session_id)
    with pytest.raises(SessionRevoked):
        await confirm(world, challenge_id, code)
    stored_session = await world.store.get(first.device_session_id)
    assert stored_session is not None
    assert stored_session.status_at(world.clock.now()) is SessionStatus.REVOKED


async def test_replay_window_ends_with_the_idempotency_window(world: FakeWorld) -> None:
    challenge_id, code = await send_code(world)
    confirmed_at = world.clock.now() + timedelta(minutes=8)
    world.clock.set(confirmed_at)
    await confirm(world, challenge_id, code)
    challenge = await stored(world, challenge_id)
    assert challenge.expires_at == confirmed_at + timedelta(minutes=5)
    world.clock.advance(timedelta(minutes=5))
    with pytest.raises(ChallengeExpired):
        await confirm(world, challenge_id, code)


async def test_a_wrong_code_on_a_confirmed_challenge_is_a_counted_wrong_code(
    world: FakeWorld,
) -> None:
    challenge_id, code = await send_code(world)
    await confirm(world, challenge_id, code)
    with pytest.raises(InvalidCode) as caught:
        await confirm(world, challenge_id, other_than(code))
    assert caught.value.attempts_remaining == 4
    assert await failures(world) == 1


async def test_a_replay_is_refused_once_the_budget_is_exhausted(world: FakeWorld) -> None:
    # Rule 2 comes before rule 3.
    world.config.set(max_failed_confirms_per_email=1)
    challenge_id, code = await send_code(world)
    await confirm(world, challenge_id, code)
    with pytest.raises(InvalidCode):
        await confirm(world, challenge_id, other_than(code))
    with pytest.raises(TooManyAttempts):
        await confirm(world, challenge_id, code)


# =========================================================================== confirm rule 4
async def test_wrong_codes_count_down_then_429(world: FakeWorld) -> None:
    challenge_id, code = await send_code(world)
    remaining = []
    for n in range(1, 6):
        with pytest.raises(InvalidCode) as caught:
            await confirm(world, challenge_id, other_than(code, n))
        remaining.append(caught.value.attempts_remaining)
        assert caught.value.details == {"attempts_remaining": remaining[-1]}
    assert remaining == [4, 3, 2, 1, 0]
    assert await failures(world) == 5
    with pytest.raises(TooManyAttempts):
        await confirm(world, challenge_id, other_than(code, 6))


async def test_the_runtime_attempt_limit_applies(world: FakeWorld) -> None:
    world.config.set(max_confirm_attempts=2)
    challenge_id, code = await send_code(world)
    with pytest.raises(InvalidCode) as caught:
        await confirm(world, challenge_id, other_than(code))
    assert caught.value.attempts_remaining == 1


@pytest.mark.parametrize("case", ["throttled", "suppressed", "failed"])
async def test_a_challenge_that_never_had_a_code_sent_answers_invalid_code(
    world: FakeWorld, case: str
) -> None:
    if case == "throttled":
        await send(world)
    if case == "suppressed":
        world.users.blocked[USER] = "test"
    if case == "failed":
        world.mail.fail("send_login_code", times=1)
        with pytest.raises(ServiceUnavailable):
            await send(world)
        [challenge_id] = world.challenges.ids()
        # Even the code that was generated (and handed to the failing mail service).
        candidates = [world.mail.code_for(challenge_id) or "", "000000"]
    else:
        challenge_id = await send(world)
        candidates = ["000000", "123456"]
    expected = {
        "throttled": ChallengeStatus.DELIVERY_THROTTLED,
        "suppressed": ChallengeStatus.DELIVERY_SUPPRESSED,
        "failed": ChallengeStatus.DELIVERY_FAILED,
    }[case]
    assert (await stored(world, challenge_id)).status is expected
    for n, candidate in enumerate(candidates, start=1):
        with pytest.raises(InvalidCode) as caught:
            await confirm(world, challenge_id, candidate)
        assert caught.value.attempts_remaining == 5 - n
    assert (await stored(world, challenge_id)).attempts == len(candidates)
    assert await failures(world) == len(candidates)
    assert world.store.all() == []


# =========================================================================== confirm rule 5
async def test_right_code_creates_a_session_for_an_existing_user(world: FakeWorld) -> None:
    challenge_id, code = await send_code(world)
    world.clock.advance(timedelta(minutes=3))
    now = world.clock.now()
    result = await confirm(world, challenge_id, code, "Jane's phone")
    assert result.created is True
    assert result.user_id == USER
    assert codes.is_valid_id(result.device_session_id)
    assert result.session_token.rpartition(".")[0] == result.device_session_id
    assert result.expires_at == now + timedelta(hours=720)
    session = await world.store.get(result.device_session_id)
    assert session is not None
    assert session.user_id == USER
    assert session.token_sha256 == codes.token_sha256(result.session_token)
    assert session.created_at == now
    assert session.expires_at == now + timedelta(hours=720)
    assert (session.client_ip, session.user_agent) == ("203.0.113.7", "pytest/1")
    assert session.device_name == "Jane's phone"
    assert session.version == 1
    assert session.revoked_at is None
    challenge = await stored(world, challenge_id)
    assert challenge.status is ChallengeStatus.CONFIRMED_PENDING_EXPIRE
    assert challenge.device_session_id == result.device_session_id
    assert challenge.session_token == result.session_token
    assert challenge.expires_at == now + timedelta(minutes=5)
    snapshot = world.projection.snapshot(result.device_session_id)
    assert snapshot is not None
    assert (snapshot["status"], snapshot["version"], snapshot["user_id"]) == ("active", 1, USER)
    # The user service is not asked again for an existing user.
    assert world.users.calls_to("ensure") == []


async def test_unknown_user_is_created_through_ensure(world: FakeWorld) -> None:
    challenge_id, code = await send_code(world, "new@example.com")
    result = await confirm(world, challenge_id, code)
    assert world.users.calls_to("ensure") == ["new@example.com"]
    assert result.user_id == world.users.users["new@example.com"]
    assert (await stored(world, challenge_id)).user_id == result.user_id


async def test_a_user_blocked_at_ensure_is_403_and_nothing_is_created(world: FakeWorld) -> None:
    challenge_id, code = await send_code(world, "new@example.com")
    world.users.ensured["new@example.com"] = UserResolution("blocked", "usr-new")
    with pytest.raises(UserBlocked):
        await confirm(world, challenge_id, code)
    challenge = await stored(world, challenge_id)
    assert challenge.status is ChallengeStatus.SENT
    assert challenge.attempts == 0
    assert world.store.all() == []


async def test_user_service_failure_at_ensure_is_503_and_retryable(world: FakeWorld) -> None:
    challenge_id, code = await send_code(world, "new@example.com")
    world.users.fail("ensure", times=1)
    with pytest.raises(ServiceUnavailable):
        await confirm(world, challenge_id, code)
    assert (await stored(world, challenge_id)).status is ChallengeStatus.SENT
    assert (await confirm(world, challenge_id, code)).created is True


async def test_the_challenge_moves_before_the_session_is_written(world: FakeWorld) -> None:
    challenge_id, code = await send_code(world)
    world.store.fail("create", times=1)
    with pytest.raises(ServiceUnavailable):
        await confirm(world, challenge_id, code)
    challenge = await stored(world, challenge_id)
    assert challenge.status is ChallengeStatus.CONFIRMED_PENDING_EXPIRE
    assert challenge.device_session_id is not None
    assert world.store.all() == []
    assert world.projection.events == []
    retry = await confirm(world, challenge_id, code)
    assert retry.device_session_id == challenge.device_session_id
    assert retry.session_token == challenge.session_token
    assert retry.created is False  # rule 3: an identical confirm of a confirmed challenge
    assert await world.store.get(retry.device_session_id) is not None
    assert world.projection.snapshot(retry.device_session_id) is not None


async def test_projection_failure_is_503_and_a_retry_completes_with_the_same_id(
    world: FakeWorld,
) -> None:
    challenge_id, code = await send_code(world)
    world.projection.fail("append_event", times=1)
    with pytest.raises(ServiceUnavailable) as caught:
        await confirm(world, challenge_id, code)
    assert caught.value.dependency == "projection"
    challenge = await stored(world, challenge_id)
    [session] = world.store.all()
    assert session.device_session_id == challenge.device_session_id
    retry = await confirm(world, challenge_id, code)
    assert retry.device_session_id == challenge.device_session_id
    assert retry.session_token == challenge.session_token
    assert [e["version"] for e in world.projection.events] == ["1"]
    assert len(world.store.all()) == 1


async def test_a_retry_after_the_projection_failed_republishes_the_latest_version(
    world: FakeWorld,
) -> None:
    challenge_id, code = await send_code(world)
    world.projection.fail("publish", times=1)
    with pytest.raises(ServiceUnavailable):
        await confirm(world, challenge_id, code)
    [session] = world.store.all()
    await world.sessions.extend(session.device_session_id, "1h")  # version 2, published
    retry = await confirm(world, challenge_id, code)
    assert retry.device_session_id == session.device_session_id
    assert retry.expires_at == world.clock.now() + timedelta(hours=1)
    snapshot = world.projection.snapshot(session.device_session_id)
    assert snapshot is not None
    assert snapshot["version"] == 2


async def test_concurrent_confirms_create_exactly_one_session(world: FakeWorld) -> None:
    challenge_id, code = await send_code(world)
    results = await asyncio.gather(*(confirm(world, challenge_id, code) for _ in range(20)))
    assert [r.created for r in results].count(True) == 1
    assert len({r.device_session_id for r in results}) == 1
    assert len({r.session_token for r in results}) == 1
    [session] = world.store.all()
    assert session.device_session_id == results[0].device_session_id


async def test_concurrent_confirms_of_a_new_user_create_one_session(world: FakeWorld) -> None:
    challenge_id, code = await send_code(world, "new@example.com")
    results = await asyncio.gather(*(confirm(world, challenge_id, code) for _ in range(10)))
    assert len({(r.device_session_id, r.user_id) for r in results}) == 1
    assert len(world.store.all()) == 1


async def test_concurrent_wrong_codes_get_at_most_max_attempts_evaluations(
    world: FakeWorld,
) -> None:
    challenge_id, code = await send_code(world)
    results = await asyncio.gather(
        *(confirm(world, challenge_id, other_than(code, n)) for n in range(1, 31)),
        return_exceptions=True,
    )
    invalid = [r for r in results if isinstance(r, InvalidCode)]
    assert len(invalid) == 5
    assert sorted(r.attempts_remaining for r in invalid) == [0, 1, 2, 3, 4]
    assert all(isinstance(r, TooManyAttempts) for r in results if r not in invalid)
    assert await failures(world) == 5


async def test_the_right_code_among_concurrent_wrong_ones(world: FakeWorld) -> None:
    challenge_id, code = await send_code(world)
    attempts = [other_than(code, n) for n in range(1, 4)] + [code]
    results = await asyncio.gather(
        *(confirm(world, challenge_id, c) for c in attempts), return_exceptions=True
    )
    assert isinstance(results[-1], Confirmed)
    assert all(isinstance(r, InvalidCode) for r in results[:-1])


# =========================================================================== session limit
async def test_the_session_limit_revokes_the_oldest_active_session(world: FakeWorld) -> None:
    world.config.set(max_active_sessions_per_user=2)
    first = await login(world)
    second = await login(world)
    third = await login(world)
    sessions = {s.device_session_id: s for s in await world.store.list_for_user(USER)}
    oldest = sessions[first.device_session_id]
    assert oldest.revoke_reason == "session_limit"
    assert oldest.version == 2
    assert sessions[second.device_session_id].revoked_at is None
    assert sessions[third.device_session_id].revoked_at is None
    snapshot = world.projection.snapshot(first.device_session_id)
    assert snapshot is not None
    assert (snapshot["status"], snapshot["version"]) == ("revoked", 2)
    # Already revoked or expired sessions do not count.
    await world.sessions.revoke(second.device_session_id)
    await login(world)
    active = await world.sessions.list_sessions(USER, "active")
    assert len(active) == 2
    assert third.device_session_id in {s.device_session_id for s in active}


async def test_no_session_limit_by_default(world: FakeWorld) -> None:
    for _ in range(4):
        await login(world)
    assert len(await world.sessions.list_sessions(USER, "active")) == 4


async def test_the_session_limit_keeps_the_new_session(world: FakeWorld) -> None:
    world.config.set(max_active_sessions_per_user=1)
    await login(world)
    newest = await login(world)
    [active] = await world.sessions.list_sessions(USER, "active")
    assert active.device_session_id == newest.device_session_id


async def test_a_retry_completes_the_session_limit(world: FakeWorld) -> None:
    world.config.set(max_active_sessions_per_user=1)
    first = await login(world)
    challenge_id, code = await send_code(world)
    # The limit's revocation of the oldest is atomic with the creation; its publication
    # fails, so the oldest is revoked in the source of truth but still active at gateways.
    world.projection.fail("publish", times=1)
    with pytest.raises(ServiceUnavailable):
        await confirm(world, challenge_id, code)
    old = await world.store.get(first.device_session_id)
    assert old is not None
    assert old.revoke_reason == "session_limit"
    assert world.projection.snapshot(first.device_session_id)["status"] == "active"
    retry = await confirm(world, challenge_id, code)
    active = await world.sessions.list_sessions(USER, "active")
    assert [s.device_session_id for s in active] == [retry.device_session_id]
    assert world.projection.snapshot(first.device_session_id)["status"] == "revoked"
