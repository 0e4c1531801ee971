"""confirm (CONTRACT §5): rules 1-5 in order, idempotent replay, the session record (§7),
and concurrency. In process over a real redis-server, with a manual clock."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import httpx
import pytest

from authsession.services.users_stub import stub_user_id
from tests.contract import SESSION_FIELDS, SNAPSHOT_KEY, STREAM, index_key, session_key
from tests.integration.conftest import AppEnv, AppFactory
from tests.integration.test_send_email_code import (
    CONFIRM,
    PREFIX,
    FakeMail,
    FakeUsers,
    assert_error,
    challenge_key,
    challenge_record,
    ms,
    only_challenge_id,
    other_code,
    parse_ts,
    send,
    sha256_hex,
)


async def issue(app: AppEnv, mail: FakeMail, email: str = "jane@example.com") -> tuple[str, str]:
    """A sent challenge and its code (through ``FakeMail``)."""
    body = await send(app, email)
    return body["challenge_id"], mail.code_for(body["challenge_id"])


async def with_jane(make_app: AppFactory, **config: Any) -> tuple[AppEnv, FakeMail]:
    """An app on which jane@example.com is the existing user ``usr-jane``; its mailbox."""
    mail = FakeMail()
    app = await make_app(users=FakeUsers({"jane@example.com": "usr-jane"}), mail=mail, **config)
    return app, mail


async def confirm(app: AppEnv, challenge_id: str, code: str, **extra: Any) -> httpx.Response:
    return await app.public.post(
        CONFIRM, json={"challenge_id": challenge_id, "code": code, **extra}
    )


def session_record(app: AppEnv, device_session_id: str) -> dict[str, str]:
    record: dict[str, str] = app.redis.hgetall(session_key(device_session_id, PREFIX))  # type: ignore[assignment]
    return record


def session_keys(app: AppEnv) -> list[str]:
    return sorted(str(k) for k in app.redis.scan_iter(match=f"{PREFIX}session:*"))


def failures(app: AppEnv, email: str) -> int:
    key = f"{PREFIX}failures:{sha256_hex(email)}"
    if not app.redis.exists(key):
        return 0
    kind = app.redis.type(key)
    if kind == "zset":
        return int(app.redis.zcard(key))
    return int(cast(Any, app.redis.get(key)) or 0)


@pytest.fixture
async def env(make_app: AppFactory) -> tuple[AppEnv, FakeUsers, FakeMail]:
    users = FakeUsers({"jane@example.com": "usr-jane"})
    mail = FakeMail()
    return await make_app(users=users, mail=mail), users, mail


# --------------------------------------------------------------------------- rule 1
async def test_unknown_challenge_is_404_challenge_not_found(app: AppEnv) -> None:
    response = await confirm(app, "A" * 32, "123456")
    assert_error(response, 404, "challenge_not_found")


async def test_challenge_past_expires_at_is_410_challenge_expired(
    env: tuple[AppEnv, FakeUsers, FakeMail],
) -> None:
    app, _, mail = env
    challenge_id, code = await issue(app, mail)
    app.clock.advance(timedelta(minutes=10))  # expires_at itself is already too late

    response = await confirm(app, challenge_id, code)

    assert_error(response, 410, "challenge_expired")
    assert challenge_record(app, challenge_id)["status"] == "sent"
    assert session_keys(app) == []


async def test_challenge_dropped_by_redis_after_retention_is_404(make_app: AppFactory) -> None:
    mail = FakeMail()
    app = await make_app(
        users=FakeUsers(), mail=mail, CHALLENGE_TTL="300ms", CHALLENGE_RETENTION="300ms"
    )
    challenge_id, code = await issue(app, mail)
    app.clock.advance(timedelta(milliseconds=400))
    assert_error(await confirm(app, challenge_id, code), 410, "challenge_expired")

    # Redis drops the record at expires_at + retention (real time).
    for _ in range(40):
        if not app.redis.exists(challenge_key(challenge_id)):
            break
        await asyncio.sleep(0.05)
    assert not app.redis.exists(challenge_key(challenge_id))

    assert_error(await confirm(app, challenge_id, code), 404, "challenge_not_found")


# --------------------------------------------------------------------------- rules 2 and 4
async def test_wrong_codes_count_down_attempts_then_429_even_with_the_right_code(
    env: tuple[AppEnv, FakeUsers, FakeMail],
) -> None:
    app, _, mail = env
    challenge_id, code = await issue(app, mail)

    remaining = []
    for _ in range(5):
        error = assert_error(
            await confirm(app, challenge_id, other_code(code)), 400, "invalid_code"
        )
        remaining.append(error["details"]["attempts_remaining"])

    assert remaining == [4, 3, 2, 1, 0]
    assert challenge_record(app, challenge_id)["attempts"] == "5"
    assert_error(await confirm(app, challenge_id, code), 429, "too_many_attempts")
    assert_error(await confirm(app, challenge_id, other_code(code)), 429, "too_many_attempts")
    assert challenge_record(app, challenge_id)["attempts"] == "5"
    assert challenge_record(app, challenge_id)["status"] == "sent"
    assert failures(app, "jane@example.com") == 5
    assert session_keys(app) == []


async def test_hourly_per_email_budget_spans_challenges_and_a_new_code_does_not_reset_it(
    make_app: AppFactory,
) -> None:
    app, mail = await with_jane(make_app, MAX_FAILED_CONFIRMS_PER_EMAIL=3, RESEND_COOLDOWN="1ms")
    first, first_code = await issue(app, mail)
    for _ in range(2):
        assert_error(await confirm(app, first, other_code(first_code)), 400, "invalid_code")
    await asyncio.sleep(0.01)
    second, second_code = await issue(app, mail)
    assert_error(await confirm(app, second, other_code(second_code)), 400, "invalid_code")
    assert failures(app, "jane@example.com") == 3

    # The budget is spent: the right code of a challenge with attempts left is refused,
    await asyncio.sleep(0.01)
    assert_error(await confirm(app, second, second_code), 429, "too_many_attempts")
    # and so is the right code of a brand-new challenge.
    third, third_code = await issue(app, mail)
    assert_error(await confirm(app, third, third_code), 429, "too_many_attempts")
    assert challenge_record(app, third)["attempts"] == "0"
    assert session_keys(app) == []

    # An hour later (rolling window) the e-mail may try again.
    app.clock.advance(timedelta(hours=1, seconds=1))
    await asyncio.sleep(0.01)
    fourth, fourth_code = await issue(app, mail)
    response = await confirm(app, fourth, fourth_code)
    assert response.status_code == 200, response.text


async def test_rule_1_comes_before_rule_2_expired_and_exhausted_is_410(
    env: tuple[AppEnv, FakeUsers, FakeMail],
) -> None:
    app, _, mail = env
    challenge_id, code = await issue(app, mail)
    for _ in range(5):
        await confirm(app, challenge_id, other_code(code))
    app.clock.advance(timedelta(minutes=11))

    assert_error(await confirm(app, challenge_id, code), 410, "challenge_expired")


async def test_rule_2_comes_before_rule_3_replay_with_exhausted_budget_is_429(
    make_app: AppFactory,
) -> None:
    app, mail = await with_jane(make_app, MAX_FAILED_CONFIRMS_PER_EMAIL=2)
    challenge_id, code = await issue(app, mail)
    assert (await confirm(app, challenge_id, code)).status_code == 200
    for _ in range(2):
        assert_error(await confirm(app, challenge_id, other_code(code)), 400, "invalid_code")

    assert_error(await confirm(app, challenge_id, code), 429, "too_many_attempts")


async def test_wrong_code_counts_against_challenge_and_email(
    env: tuple[AppEnv, FakeUsers, FakeMail],
) -> None:
    app, _, mail = env
    challenge_id, code = await issue(app, mail)

    error = assert_error(await confirm(app, challenge_id, other_code(code)), 400, "invalid_code")

    assert error["details"] == {"attempts_remaining": 4}
    assert challenge_record(app, challenge_id)["attempts"] == "1"
    assert failures(app, "jane@example.com") == 1
    failures_key = f"{PREFIX}failures:{sha256_hex('jane@example.com')}"
    assert app.redis.pttl(failures_key) >= 3600 * 1000 - 5000  # kept for at least an hour


@pytest.mark.parametrize("case", ["delivery_throttled", "delivery_suppressed", "delivery_failed"])
async def test_code_on_a_challenge_that_never_had_one_sent_is_invalid_code_and_counted(
    make_app: AppFactory, case: str
) -> None:
    users = FakeUsers(
        {"jane@example.com": "usr-jane", "bad@example.com": "usr-bad"}, blocked={"usr-bad"}
    )
    mail = FakeMail()
    app = await make_app(users=users, mail=mail)
    email = "bad@example.com" if case == "delivery_suppressed" else "jane@example.com"
    code = "123456"
    if case == "delivery_throttled":
        _, code = await issue(app, mail)  # the real code of the mailed challenge
        challenge_id = (await send(app, email))["challenge_id"]
    elif case == "delivery_suppressed":
        challenge_id = (await send(app, email))["challenge_id"]
    else:
        mail.fail = True  # the mail service got the code but answered with an error
        response = await app.public.post(
            "/api/v1/public/auth/send-email-code", json={"email": email}
        )
        assert response.status_code == 503
        challenge_id = only_challenge_id(app.redis)
        code = mail.messages[-1].code
    assert challenge_record(app, challenge_id)["status"] == case

    error = assert_error(await confirm(app, challenge_id, code), 400, "invalid_code")

    assert error["details"]["attempts_remaining"] == 4
    assert challenge_record(app, challenge_id)["attempts"] == "1"
    assert challenge_record(app, challenge_id)["status"] == case
    assert failures(app, email) == 1
    assert session_keys(app) == []


# --------------------------------------------------------------------------- rule 5
async def test_right_code_creates_a_session_as_the_contract_describes(
    env: tuple[AppEnv, FakeUsers, FakeMail],
) -> None:
    app, users, mail = env
    challenge_id, code = await issue(app, mail)
    now = app.clock.now()

    response = await confirm(app, challenge_id, code, device_name="Jane's phone")

    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"device_session_id", "session_token", "user_id", "expires_at", "created"}
    assert body["created"] is True
    assert body["user_id"] == "usr-jane"
    dsid, token = body["device_session_id"], body["session_token"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{16,64}", dsid)
    head, _, secret = token.rpartition(".")
    assert head == dsid
    assert re.fullmatch(r"[A-Za-z0-9_-]{43,}", secret)  # at least 256 bits, base64url
    assert parse_ts(body["expires_at"]) == ms(now + timedelta(hours=720))
    assert users.ensure_calls == []  # existing user: taken from the challenge

    record = session_record(app, dsid)
    assert set(record) - {"token_sha256"} <= SESSION_FIELDS
    assert record["device_session_id"] == dsid
    assert record["user_id"] == "usr-jane"
    assert record["status"] == "active"
    assert record["version"] == "1"
    assert record["token_sha256"] == sha256_hex(token)
    assert parse_ts(record["created_at"]) == ms(now)
    assert parse_ts(record["expires_at"]) == ms(now + timedelta(hours=720))
    assert record["client_ip"] == "203.0.113.7"
    assert record["device_name"] == "Jane's phone"
    assert record.get("revoked_at", "") in ("", "null")
    assert token not in repr(record)
    ttl_ms = app.redis.pttl(session_key(dsid, PREFIX))
    expected_ms = ((now + timedelta(hours=720 + 168)) - datetime.now(UTC)).total_seconds() * 1000
    assert abs(ttl_ms - expected_ms) <= 2000

    index = index_key("usr-jane", PREFIX)
    assert app.redis.zrange(index, 0, -1) == [dsid]
    assert app.redis.zscore(index, dsid) == pytest.approx(now.timestamp() * 1000, abs=1)

    challenge = challenge_record(app, challenge_id)
    assert challenge["status"] == "confirmed_pending_expire"
    assert challenge["device_session_id"] == dsid
    assert challenge["session_token"] == token
    assert parse_ts(challenge["expires_at"]) == ms(now + timedelta(minutes=5))
    challenge_ttl = app.redis.pttl(challenge_key(challenge_id))
    expected_ms = ((now + timedelta(minutes=5, hours=1)) - datetime.now(UTC)).total_seconds() * 1000
    assert abs(challenge_ttl - expected_ms) <= 2000  # expires_at + CHALLENGE_RETENTION

    internal = await app.internal.get(f"/api/v1/internal/sessions/{dsid}")
    assert internal.status_code == 200
    assert internal.json()["status"] == "active"
    assert internal.json()["device_name"] == "Jane's phone"


async def test_unknown_user_with_signup_is_created_through_ensure_at_confirm(
    make_app: AppFactory,
) -> None:
    users, mail = FakeUsers(), FakeMail()
    app = await make_app(users=users, mail=mail)
    challenge_id, code = await issue(app, mail, "  NewBie@Example.com")
    assert users.ensure_calls == []

    response = await confirm(app, challenge_id, code)

    assert response.status_code == 200, response.text
    assert users.ensure_calls == ["newbie@example.com"]
    created_id = users.users["newbie@example.com"]
    assert response.json()["user_id"] == created_id
    assert session_record(app, response.json()["device_session_id"])["user_id"] == created_id
    assert app.redis.zcard(index_key(created_id, PREFIX)) == 1


async def test_ensure_saying_blocked_is_403_user_blocked_and_creates_nothing(
    make_app: AppFactory,
) -> None:
    users, mail = FakeUsers(), FakeMail()
    app = await make_app(users=users, mail=mail)
    challenge_id, code = await issue(app, mail, "newbie@example.com")
    users.ensure_blocks = True

    response = await confirm(app, challenge_id, code)

    assert_error(response, 403, "user_blocked")
    assert users.ensure_calls == ["newbie@example.com"]
    assert session_keys(app) == []
    assert challenge_record(app, challenge_id)["status"] != "confirmed_pending_expire"


async def test_user_blocked_through_the_internal_api_after_the_code_was_sent_is_403(
    app: AppEnv,
) -> None:
    challenge_id, code = await app.send_code("jane@example.com")
    assert code is not None
    user_id = stub_user_id("jane@example.com")
    blocked = await app.internal.post(f"/api/v1/internal/users/{user_id}/block", json={})
    assert blocked.status_code == 200, blocked.text

    assert_error(await app.confirm(challenge_id, code), 403, "user_blocked")
    assert session_keys(app) == []


async def test_ensure_failure_is_503_and_a_retry_succeeds(make_app: AppFactory) -> None:
    users, mail = FakeUsers(), FakeMail()
    app = await make_app(users=users, mail=mail)
    challenge_id, code = await issue(app, mail, "newbie@example.com")
    users.fail_ensure = True

    assert_error(await confirm(app, challenge_id, code), 503, "service_unavailable")

    users.fail_ensure = False
    response = await confirm(app, challenge_id, code)
    assert response.status_code == 200, response.text
    assert response.json()["created"] is True


# --------------------------------------------------------------------------- rule 3
async def test_replay_in_the_window_returns_the_same_session_and_republishes(
    env: tuple[AppEnv, FakeUsers, FakeMail],
) -> None:
    app, _, mail = env
    challenge_id, code = await issue(app, mail)
    first = (await confirm(app, challenge_id, code)).json()
    events_before = app.redis.xlen(STREAM)
    app.clock.advance(timedelta(minutes=4, seconds=59))

    replay = await confirm(app, challenge_id, code)

    assert replay.status_code == 200, replay.text
    body = replay.json()
    assert body["created"] is False
    assert body["device_session_id"] == first["device_session_id"]
    assert body["session_token"] == first["session_token"]
    assert body["user_id"] == first["user_id"]
    assert body["expires_at"] == first["expires_at"]
    assert session_keys(app) == [session_key(first["device_session_id"], PREFIX)]
    assert session_record(app, first["device_session_id"])["version"] == "1"
    # The snapshot is current, so the replay appends no event (CONTRACT §12/§9) ...
    assert app.redis.xlen(STREAM) == events_before
    # ... but one that finds the snapshot missing writes it and appends the event again.
    app.redis.delete(SNAPSHOT_KEY.format(first["device_session_id"]))
    again = await confirm(app, challenge_id, code)
    assert again.status_code == 200, again.text
    assert app.redis.xlen(STREAM) == events_before + 1
    _, last = cast(Any, app.redis.xrange(STREAM))[-1]
    assert last["device_session_id"] == first["device_session_id"]
    assert last["version"] == "1"
    assert last["status"] == "active"


async def test_replay_after_the_session_was_revoked_is_409_session_revoked(
    env: tuple[AppEnv, FakeUsers, FakeMail],
) -> None:
    app, _, mail = env
    challenge_id, code = await issue(app, mail)
    first = (await confirm(app, challenge_id, code)).json()
    revoked = await app.internal.post(
        f"/api/v1/internal/sessions/{first['device_session_id']}/revoke", json={}
    )
    assert revoked.status_code == 200, revoked.text

    assert_error(await confirm(app, challenge_id, code), 409, "session_revoked")
    record = session_record(app, first["device_session_id"])
    assert record["status"] == "revoked"  # the replay did not make it active again


async def test_replay_after_the_idempotency_window_is_410(
    env: tuple[AppEnv, FakeUsers, FakeMail],
) -> None:
    app, _, mail = env
    challenge_id, code = await issue(app, mail)
    assert (await confirm(app, challenge_id, code)).status_code == 200
    app.clock.advance(timedelta(minutes=5))

    assert_error(await confirm(app, challenge_id, code), 410, "challenge_expired")


async def test_wrong_code_after_confirmation_is_invalid_code_and_keeps_the_session(
    env: tuple[AppEnv, FakeUsers, FakeMail],
) -> None:
    app, _, mail = env
    challenge_id, code = await issue(app, mail)
    first = (await confirm(app, challenge_id, code)).json()

    assert_error(await confirm(app, challenge_id, other_code(code)), 400, "invalid_code")
    again = await confirm(app, challenge_id, code)
    assert again.status_code == 200
    assert again.json()["session_token"] == first["session_token"]


# --------------------------------------------------------------------------- concurrency
async def test_concurrent_correct_confirms_create_exactly_one_session(
    env: tuple[AppEnv, FakeUsers, FakeMail],
) -> None:
    app, _, mail = env
    challenge_id, code = await issue(app, mail)

    responses = await asyncio.gather(*(confirm(app, challenge_id, code) for _ in range(20)))

    assert [r.status_code for r in responses] == [200] * 20, [r.text for r in responses]
    bodies = [r.json() for r in responses]
    assert sum(b["created"] for b in bodies) == 1
    assert len({b["device_session_id"] for b in bodies}) == 1
    assert len({b["session_token"] for b in bodies}) == 1
    dsid = bodies[0]["device_session_id"]
    assert session_keys(app) == [session_key(dsid, PREFIX)]
    assert app.redis.zrange(index_key("usr-jane", PREFIX), 0, -1) == [dsid]
    assert session_record(app, dsid)["token_sha256"] == sha256_hex(bodies[0]["session_token"])
    assert session_record(app, dsid)["version"] == "1"


async def test_concurrent_wrong_codes_get_at_most_max_attempts_evaluations(
    env: tuple[AppEnv, FakeUsers, FakeMail],
) -> None:
    app, _, mail = env
    challenge_id, code = await issue(app, mail)
    wrong = other_code(code)

    responses = await asyncio.gather(*(confirm(app, challenge_id, wrong) for _ in range(30)))

    codes = Counter((r.status_code, r.json()["error"]["code"]) for r in responses)
    assert codes == {(400, "invalid_code"): 5, (429, "too_many_attempts"): 25}
    remaining = sorted(
        r.json()["error"]["details"]["attempts_remaining"]
        for r in responses
        if r.status_code == 400
    )
    assert remaining == [0, 1, 2, 3, 4]
    assert challenge_record(app, challenge_id)["attempts"] == "5"
    assert failures(app, "jane@example.com") == 5


async def test_concurrent_wrong_codes_do_not_overshoot_the_per_email_budget(
    make_app: AppFactory,
) -> None:
    app, mail = await with_jane(make_app, MAX_FAILED_CONFIRMS_PER_EMAIL=2)
    challenge_id, code = await issue(app, mail)
    wrong = other_code(code)

    responses = await asyncio.gather(*(confirm(app, challenge_id, wrong) for _ in range(30)))

    evaluated = [r for r in responses if r.status_code == 400]
    assert len(evaluated) <= 2, Counter(r.status_code for r in responses)
    assert failures(app, "jane@example.com") <= 2
