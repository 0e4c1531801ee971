"""The runbook's smoke requests and one full login, in process over real Redis."""

from __future__ import annotations

from tests.integration.conftest import AppEnv


async def test_malformed_send_email_code_is_400(app: AppEnv) -> None:
    response = await app.public.post("/api/v1/public/auth/send-email-code", json={"mail": "x"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"


async def test_unknown_user_has_no_sessions(app: AppEnv) -> None:
    response = await app.internal.get("/api/v1/internal/users/nobody/sessions")
    assert response.status_code == 200
    assert response.json() == {"user_id": "nobody", "sessions": []}


async def test_login_creates_a_listed_session(app: AppEnv) -> None:
    body = await app.login()
    assert body["created"] is True
    listed = await app.internal.get(f"/api/v1/internal/users/{body['user_id']}/sessions")
    sessions = listed.json()["sessions"]
    assert [s["device_session_id"] for s in sessions] == [body["device_session_id"]]
    assert sessions[0]["status"] == "active"
    assert sessions[0]["client_ip"] == "203.0.113.7"
