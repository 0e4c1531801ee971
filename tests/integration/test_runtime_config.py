"""The runtime config provider (CONTRACT §3): fields of the ``<prefix>config`` hash change
the behaviour without a restart; a field that does not parse is ignored with a warning and
the last good value stays. In process: ``await app.core.config.refresh()`` stands for the
periodic re-read (the end-to-end test covers the timer)."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any, cast

import pytest

from tests.integration.conftest import AppEnv, AppFactory
from tests.integration.test_confirm import confirm, issue, session_record
from tests.integration.test_send_email_code import (
    PREFIX,
    SEND,
    FakeMail,
    FakeUsers,
    assert_error,
    challenge_record,
    ms,
    other_code,
    parse_ts,
    send,
)

CONFIG = f"{PREFIX}config"


async def override(app: AppEnv, **fields: str) -> None:
    """Write config fields and let the provider re-read them."""
    app.redis.hset(CONFIG, mapping=cast(Any, fields))
    await app.core.config.refresh()


def parse_warnings(caplog: pytest.LogCaptureFixture, field: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and getattr(r, "field", None) == field
    ]


async def wrong_codes_until_429(app: AppEnv, mail: FakeMail, email: str) -> list[int]:
    """attempts_remaining of each wrong code until the challenge answers 429."""
    challenge_id, code = await issue(app, mail, email)
    remaining: list[int] = []
    for _ in range(20):
        response = await confirm(app, challenge_id, other_code(code))
        if response.status_code == 429:
            return remaining
        remaining.append(
            assert_error(response, 400, "invalid_code")["details"]["attempts_remaining"]
        )
    raise AssertionError("never 429")


@pytest.fixture
async def env(make_app: AppFactory) -> tuple[AppEnv, FakeUsers, FakeMail]:
    users, mail = FakeUsers(), FakeMail()  # unknown users, signup on by default
    return await make_app(users=users, mail=mail), users, mail


async def test_max_confirm_attempts_from_the_config_hash(
    env: tuple[AppEnv, FakeUsers, FakeMail],
) -> None:
    app, _, mail = env
    assert await wrong_codes_until_429(app, mail, "a@example.com") == [4, 3, 2, 1, 0]

    await override(app, max_confirm_attempts="2")

    assert await wrong_codes_until_429(app, mail, "b@example.com") == [1, 0]


async def test_signup_enabled_from_the_config_hash(
    env: tuple[AppEnv, FakeUsers, FakeMail],
) -> None:
    app, users, mail = env
    before = await send(app, "new1@example.com")
    assert challenge_record(app, before["challenge_id"])["status"] == "sent"

    await override(app, signup_enabled="false")
    after = await send(app, "new2@example.com")

    assert challenge_record(app, after["challenge_id"])["status"] == "delivery_suppressed"
    assert mail.calls == 1
    assert users.resolve_calls == ["new1@example.com", "new2@example.com"]

    await override(app, signup_enabled="1")
    again = await send(app, "new3@example.com")
    assert challenge_record(app, again["challenge_id"])["status"] == "sent"


async def test_challenge_ttl_from_the_config_hash(
    env: tuple[AppEnv, FakeUsers, FakeMail],
) -> None:
    app, _, mail = env
    await override(app, challenge_ttl="90s")

    challenge_id, code = await issue(app, mail, "jane@example.com")

    record = challenge_record(app, challenge_id)
    assert parse_ts(record["expires_at"]) == ms(app.clock.now() + timedelta(seconds=90))
    app.clock.advance(timedelta(seconds=90))
    assert_error(await confirm(app, challenge_id, code), 410, "challenge_expired")


async def test_session_ttl_from_the_config_hash(env: tuple[AppEnv, FakeUsers, FakeMail]) -> None:
    app, _, mail = env
    await override(app, session_ttl="2h")
    challenge_id, code = await issue(app, mail, "jane@example.com")

    body = (await confirm(app, challenge_id, code)).json()

    expected = ms(app.clock.now() + timedelta(hours=2))
    assert parse_ts(body["expires_at"]) == expected
    assert parse_ts(session_record(app, body["device_session_id"])["expires_at"]) == expected


async def test_max_failed_confirms_per_email_from_the_config_hash(
    env: tuple[AppEnv, FakeUsers, FakeMail],
) -> None:
    app, _, mail = env
    await override(app, max_failed_confirms_per_email="1")
    challenge_id, code = await issue(app, mail, "jane@example.com")

    assert_error(await confirm(app, challenge_id, other_code(code)), 400, "invalid_code")
    assert_error(await confirm(app, challenge_id, code), 429, "too_many_attempts")

    await override(app, max_failed_confirms_per_email="50")
    assert (await confirm(app, challenge_id, code)).status_code == 200


async def test_max_active_sessions_per_user_from_the_config_hash(make_app: AppFactory) -> None:
    app = await make_app(RESEND_COOLDOWN="1ms")  # stub users: one user per address
    await override(app, max_active_sessions_per_user="1")

    first = await app.login("jane@example.com")
    app.clock.advance(timedelta(seconds=1))
    await asyncio.sleep(0.005)
    second = await app.login("jane@example.com")

    assert session_record(app, first["device_session_id"])["revoke_reason"] == "session_limit"
    assert session_record(app, second["device_session_id"])["status"] == "active"


async def test_public_rate_limit_from_the_config_hash(make_app: AppFactory) -> None:
    app = await make_app(users=FakeUsers(), mail=FakeMail())
    for _ in range(5):  # no limit by default
        assert (await app.public.post(SEND, json={})).status_code == 400

    await override(app, public_rate_limit="2/m")
    statuses = [(await app.public.post(SEND, json={})).status_code for _ in range(3)]
    assert statuses == [400, 400, 429]

    await override(app, public_rate_limit="0")
    assert (await app.public.post(SEND, json={})).status_code == 400


async def test_unparsable_field_is_ignored_with_a_warning_and_the_last_good_value_stays(
    env: tuple[AppEnv, FakeUsers, FakeMail], caplog: pytest.LogCaptureFixture
) -> None:
    app, _, mail = env
    await override(app, max_confirm_attempts="2", challenge_ttl="90s")
    caplog.clear()

    with caplog.at_level(logging.WARNING):
        await override(app, max_confirm_attempts="two", challenge_ttl="-5m")

    assert parse_warnings(caplog, "max_confirm_attempts")
    assert parse_warnings(caplog, "challenge_ttl")
    assert app.core.config.current().max_confirm_attempts == 2
    assert app.core.config.current().challenge_ttl == timedelta(seconds=90)
    assert await wrong_codes_until_429(app, mail, "jane@example.com") == [1, 0]
    body = await send(app, "john@example.com")
    assert parse_ts(body["expires_at"]) == ms(app.clock.now() + timedelta(seconds=90))

    # Still the last good value on the next refreshes, then a good value applies again.
    await app.core.config.refresh()
    assert app.core.config.current().max_confirm_attempts == 2
    await override(app, max_confirm_attempts="3")
    assert app.core.config.current().max_confirm_attempts == 3


async def test_unparsable_field_without_a_previous_good_value_keeps_the_environment_value(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    mail = FakeMail()
    app = await make_app(users=FakeUsers(), mail=mail, MAX_CONFIRM_ATTEMPTS=3)

    with caplog.at_level(logging.WARNING):
        await override(
            app,
            max_confirm_attempts="0",
            signup_enabled="maybe",
            public_rate_limit="lots",
        )

    assert parse_warnings(caplog, "max_confirm_attempts")
    assert parse_warnings(caplog, "signup_enabled")
    assert parse_warnings(caplog, "public_rate_limit")
    assert await wrong_codes_until_429(app, mail, "jane@example.com") == [2, 1, 0]
    statuses = {(await app.public.post(SEND, json={})).status_code for _ in range(5)}
    assert statuses == {400}  # no rate limit came from the bad value


async def test_field_removed_from_the_hash_falls_back_to_the_environment_value(
    env: tuple[AppEnv, FakeUsers, FakeMail],
) -> None:
    app, _, mail = env
    await override(app, max_confirm_attempts="1")
    assert app.core.config.current().max_confirm_attempts == 1

    app.redis.hdel(CONFIG, "max_confirm_attempts")
    await app.core.config.refresh()

    assert await wrong_codes_until_429(app, mail, "jane@example.com") == [4, 3, 2, 1, 0]


async def test_two_replicas_see_the_same_override(make_app: AppFactory) -> None:
    first = await make_app(users=FakeUsers(), mail=FakeMail())
    second = await make_app(users=FakeUsers(), mail=FakeMail(), clock=first.clock)

    first.redis.hset(CONFIG, "signup_enabled", "false")
    await first.core.config.refresh()
    await second.core.config.refresh()

    for app, email in ((first, "a@example.com"), (second, "b@example.com")):
        body = await send(app, email)
        assert challenge_record(app, body["challenge_id"])["status"] == "delivery_suppressed"


async def test_background_refresh_applies_a_change_without_an_explicit_refresh(
    make_app: AppFactory,
) -> None:
    app = await make_app(users=FakeUsers(), mail=FakeMail(), CONFIG_REFRESH_INTERVAL="100ms")
    app.core.config.start()  # what the process does after the startup checks
    app.redis.hset(CONFIG, "max_confirm_attempts", "7")

    for _ in range(40):
        if app.core.config.current().max_confirm_attempts == 7:
            break
        await asyncio.sleep(0.05)
    assert app.core.config.current().max_confirm_attempts == 7
