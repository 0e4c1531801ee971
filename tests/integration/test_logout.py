"""Self-service logout (CONTRACT §12/§5) and the send-email-code timing floor (§12/§3)."""

from __future__ import annotations

import json
import time
from typing import Any, cast

import pytest

from tests.contract import SNAPSHOT_KEY, STREAM, error_code, session_key
from tests.integration.conftest import AppEnv, AppFactory

LOGOUT = "/api/v1/public/auth/logout"


async def logout(app: AppEnv, token: str | None, **kwargs: Any) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    headers.update(kwargs.pop("headers", {}))
    return await app.public.post(LOGOUT, headers=headers, **kwargs)


async def test_logout_revokes_the_session_of_the_token(app: AppEnv) -> None:
    body = await app.login()
    sid = body["device_session_id"]

    response = await logout(app, body["session_token"])

    assert response.status_code == 200, response.text
    assert response.json() == {"device_session_id": sid, "status": "revoked"}
    record = app.redis.hgetall(session_key(sid))
    assert (record["status"], record["revoke_reason"], record["version"]) == (
        "revoked",
        "logout",
        "2",
    )
    snapshot = json.loads(cast(str, app.redis.get(SNAPSHOT_KEY.format(sid))))
    assert (snapshot["status"], snapshot["revoke_reason"]) == ("revoked", "logout")
    events = [f for _, f in app.redis.xrange(STREAM) if f["device_session_id"] == sid]
    assert [e["status"] for e in events] == ["active", "revoked"]
    assert response.headers["cache-control"] == "no-store"


async def test_logging_out_a_revoked_session_is_200_again(app: AppEnv) -> None:
    body = await app.login()
    first = await logout(app, body["session_token"])
    again = await logout(app, body["session_token"], json={})
    assert again.status_code == 200
    assert again.json() == first.json()
    record = app.redis.hgetall(session_key(body["device_session_id"]))
    assert record["version"] == "2"  # nothing changed the second time


@pytest.mark.parametrize("case", ["unknown_session", "wrong_secret", "malformed", "missing"])
async def test_a_token_of_no_session_is_401_with_one_body(app: AppEnv, case: str) -> None:
    body = await app.login()
    sid, secret = body["session_token"].rsplit(".", 1)
    token = {
        "unknown_session": f"{sid[:4]}{'x' * 32}.{secret}",
        "wrong_secret": f"{sid}.{'A' * len(secret)}",
        "malformed": "not-a-token",
        "missing": None,
    }[case]

    response = await logout(app, token)

    assert response.status_code == 401
    assert error_code(response) == "unauthorized"
    assert response.json()["error"]["message"] == "a valid bearer token is required"
    assert response.headers["www-authenticate"].lower().startswith("bearer")
    assert app.redis.hget(session_key(sid), "status") == "active"


async def test_the_bearer_scheme_is_case_insensitive(app: AppEnv) -> None:
    body = await app.login()
    response = await app.public.post(
        LOGOUT, headers={"Authorization": f"bEaReR {body['session_token']}"}
    )
    assert response.status_code == 200


@pytest.mark.parametrize("payload", ['{"x": 1}', "[]", "null", '"x"'])
async def test_a_body_other_than_empty_or_an_object_without_fields_is_400(
    app: AppEnv, payload: str
) -> None:
    body = await app.login()
    response = await logout(
        app,
        body["session_token"],
        content=payload,
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert error_code(response) == "invalid_request"
    assert app.redis.hget(session_key(body["device_session_id"]), "status") == "active"


# ------------------------------------------------------------------ the timing floor
async def test_send_email_code_answers_no_sooner_than_the_floor_whatever_the_outcome(
    make_app: AppFactory,
) -> None:
    app = await make_app(SEND_EMAIL_CODE_MIN_DURATION="200ms")
    timings = []
    for email in ("jane@example.com", "jane@example.com", "x@example.com"):  # sent, throttled
        started = time.monotonic()
        response = await app.public.post(
            "/api/v1/public/auth/send-email-code", json={"email": email}
        )
        timings.append(time.monotonic() - started)
        assert response.status_code == 200
    started = time.monotonic()
    invalid = await app.public.post(
        "/api/v1/public/auth/send-email-code", json={"email": "not an address"}
    )
    timings.append(time.monotonic() - started)
    assert invalid.status_code == 400
    assert all(t >= 0.2 for t in timings), timings
