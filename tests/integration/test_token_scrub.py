"""The plain session token leaves the challenge when the idempotency window ends.

CONTRACT §5: the token "is never stored in plain form except inside the confirmed
challenge record for the idempotency window"; the record itself stays for
CHALLENGE_RETENTION so that late confirms answer 410.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from tests.contract import CHALLENGE_KEY
from tests.integration.conftest import AppFactory

WINDOW = timedelta(minutes=5)  # CONFIRM_IDEMPOTENCY_WINDOW default


async def test_the_token_is_kept_for_the_window_then_removed(make_app: AppFactory) -> None:
    app = await make_app()
    body = await app.login()
    challenge_key = next(
        k
        for k in app.redis.scan_iter(CHALLENGE_KEY.format("*"))
        if app.redis.hget(k, "device_session_id") == body["device_session_id"]
    )
    store = app.core.components["challenge_store"]

    assert await store.scrub_tokens(app.clock.now()) == 0  # type: ignore[attr-defined]
    assert app.redis.hget(challenge_key, "session_token") == body["session_token"]

    app.clock.advance(WINDOW + timedelta(milliseconds=1))
    assert await store.scrub_tokens(app.clock.now()) == 1  # type: ignore[attr-defined]

    record = app.redis.hgetall(challenge_key)
    assert "session_token" not in record
    assert record["status"] == "confirmed_pending_expire"
    assert record["device_session_id"] == body["device_session_id"]
    assert app.redis.zcard("authsession:token_scrub") == 0


async def test_a_confirm_after_the_window_still_answers_410(make_app: AppFactory) -> None:
    app = await make_app()
    challenge_id, code = await app.send_code()
    assert code is not None
    assert (await app.confirm(challenge_id, code)).status_code == 200
    app.clock.advance(WINDOW + timedelta(seconds=1))
    await app.core.components["challenge_store"].scrub_tokens(app.clock.now())  # type: ignore[attr-defined]

    late = await app.confirm(challenge_id, code)
    assert late.status_code == 410
    assert late.json()["error"]["code"] == "challenge_expired"


async def test_the_background_scrubber_removes_due_tokens(make_app: AppFactory) -> None:
    app = await make_app()
    body = await app.login()
    app.clock.advance(WINDOW + timedelta(seconds=1))
    app.core.scrubber.start()
    try:
        for _ in range(50):
            remaining = [
                k
                for k in app.redis.scan_iter(CHALLENGE_KEY.format("*"))
                if app.redis.hexists(k, "session_token")
            ]
            if not remaining:
                break
            await asyncio.sleep(0.05)
        assert remaining == []
    finally:
        await app.core.scrubber.stop()
    assert body["created"] is True


async def test_a_replay_inside_the_window_is_not_affected(make_app: AppFactory) -> None:
    app = await make_app()
    challenge_id, code = await app.send_code()
    assert code is not None
    first = (await app.confirm(challenge_id, code)).json()
    app.clock.advance(WINDOW - timedelta(seconds=1))
    await app.core.components["challenge_store"].scrub_tokens(app.clock.now())  # type: ignore[attr-defined]

    replay = await app.confirm(challenge_id, code)
    assert replay.status_code == 200
    assert replay.json()["session_token"] == first["session_token"]
    assert replay.json()["created"] is False
