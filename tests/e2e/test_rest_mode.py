"""End to end: the real ``authsession`` process in ``rest`` mode (CONTRACT §3, §5, §6, §8).

The process talks to the fake user and mail services of ``tests/support/fake_services.py``
over HTTP; the tests talk to the process over HTTP exactly as a frontend (public listener)
and a trusted backend (internal listener) would.

Process starts are kept few: one process per xdist worker for most tests (module scope,
fakes reset between tests, a fresh e-mail address per test so the resend cooldown of one
test never meets another), plus one with signup disabled, one whose user service is
down, one that is stopped with SIGTERM, and one that must refuse its configuration.

A fake that was told to ``delay`` keeps its handler asleep after the process gave up on
it; when it wakes it would consume a fault injected by a later test, so tests use
``RestEnv.slow``/``heal`` and the fixture waits for such handlers before the next test.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.contract import CONFIRM, SEND, slot_tag
from tests.support.fake_services import FakeMailService, FakeUserService, RecordedRequest
from tests.support.net import LOOPBACK, free_port, free_ports, port_accepts
from tests.support.process import AuthsessionProcess, port_of
from tests.support.redis_server import RedisServer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

RESOLVE = "/api/v1/users/resolve-by-email"
ENSURE = "/api/v1/users/ensure"
LOGIN_CODE = "/api/v1/mail/login-code"

TIMEOUT_S = 1.0  # AUTHSESSION_*_SERVICE_REQUEST_TIMEOUT below
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")
CODE = re.compile(r"^[0-9]{6}$")
ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
OUTBOUND_FAILED = "outbound call failed"
OUTBOUND_RETRYING = "outbound call failed, retrying"


# --------------------------------------------------------------------------- helpers
def new_email(tag: str = "jane") -> str:
    """A fresh normalized address: every test gets its own cooldown and failure budget."""
    return f"{tag}.{uuid.uuid4().hex[:12]}@example.com"


def rest_env(
    redis_server: RedisServer,
    users_url: str,
    mail_url: str,
    **extra: str,
) -> dict[str, str]:
    public, internal = free_ports(2)
    env = {
        "AUTHSESSION_PUBLIC_HTTP_ADDR": f"{LOOPBACK}:{public}",
        "AUTHSESSION_INTERNAL_HTTP_ADDR": f"{LOOPBACK}:{internal}",
        "AUTHSESSION_LOG_FORMAT": "json",
        "AUTHSESSION_LOG_LEVEL": "info",
        "AUTHSESSION_REDIS_ADDR": redis_server.addr,
        "AUTHSESSION_REDIS_KEY_PREFIX": f"e2e-rest-{uuid.uuid4().hex[:8]}:",
        "AUTHSESSION_USER_SERVICE_MODE": "rest",
        "AUTHSESSION_USER_SERVICE_BASE_URL": users_url,
        "AUTHSESSION_USER_SERVICE_REQUEST_TIMEOUT": "1s",
        "AUTHSESSION_MAIL_SERVICE_MODE": "rest",
        "AUTHSESSION_MAIL_SERVICE_BASE_URL": mail_url,
        "AUTHSESSION_MAIL_SERVICE_REQUEST_TIMEOUT": "1s",
    }
    env.update(extra)
    return env


def start_process(env: dict[str, str], workdir: Path) -> AuthsessionProcess:
    process = AuthsessionProcess(
        env,
        public_port=port_of(env["AUTHSESSION_PUBLIC_HTTP_ADDR"]),
        internal_port=port_of(env["AUTHSESSION_INTERNAL_HTTP_ADDR"]),
        workdir=workdir,
    )
    process.start()
    try:
        process.wait_ready()
    except BaseException:
        process.close()
        raise
    return process


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str)
    return body


def assert_outbound_headers(request: RecordedRequest) -> str:
    """CONTRACT §8: JSON and a W3C ``traceparent`` on every call; returns the trace id."""
    content_type = request.header("Content-Type") or ""
    assert content_type.split(";")[0].strip() == "application/json", request.headers
    traceparent = request.header("traceparent") or ""
    match = TRACEPARENT.match(traceparent)
    assert match, f"no valid W3C traceparent header: {request.headers}"
    assert match[1] != "0" * 32
    assert match[2] != "0" * 16
    return match[1]


@dataclass
class RestEnv:
    """A running process in rest mode, its fakes, and clients for both listeners."""

    proc: AuthsessionProcess
    users: FakeUserService
    mail: FakeMailService
    redis: redis.Redis
    prefix: str
    public: httpx.Client
    internal: httpx.Client
    log_mark: int = 0
    secrets: list[str] = field(default_factory=list)
    linger: float = 0.0
    linger_until: float = 0.0

    # -- slow fakes
    def slow(self, fake: FakeMailService | FakeUserService, seconds: float) -> None:
        """``fake.delay(seconds)``, remembering that its handlers may sleep that long."""
        fake.delay(seconds)
        self.linger = max(self.linger, seconds)

    def heal(self, fake: FakeMailService | FakeUserService) -> None:
        """``fake.reset_faults()``. A handler that already sleeps in the delay wakes up only
        after it and would then take a fault meant for a later test; the fixture waits for
        such handlers at teardown (``linger_until``)."""
        fake.reset_faults()
        self.linger_until = time.monotonic() + self.linger

    # -- HTTP as a frontend / backend would
    def send(self, email: str, locale: str | None = None) -> httpx.Response:
        body: dict[str, str] = {"email": email}
        if locale is not None:
            body["locale"] = locale
        return self.public.post(SEND, json=body)

    def confirm(self, challenge_id: str, code: str, **extra: Any) -> httpx.Response:
        return self.public.post(CONFIRM, json={"challenge_id": challenge_id, "code": code, **extra})

    def send_ok(self, email: str, locale: str | None = None) -> str:
        response = self.send(email, locale)
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"challenge_id", "expires_at"}, body
        assert ID.match(body["challenge_id"]), body
        assert TIMESTAMP.match(body["expires_at"]), body
        challenge_id: str = body["challenge_id"]
        return challenge_id

    def code_for(self, challenge_id: str) -> str:
        found = [m for m in self.mail.messages if m.challenge_id == challenge_id]
        assert len(found) == 1, f"expected one mail for {challenge_id}, got {found}"
        self.secrets.append(found[0].code)
        return found[0].code

    def login(self, email: str) -> dict[str, Any]:
        """A full login of ``email``; the confirm body."""
        challenge_id = self.send_ok(email)
        response = self.confirm(challenge_id, self.code_for(challenge_id))
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def clear_account_cooldown(self, user_id: str) -> None:
        """End the account's resend cooldown (logins of one account by several addresses)."""
        self.redis.delete(f"{self.prefix}throttle_user:{{{slot_tag(user_id)}}}:{user_id}")

    def session(self, device_session_id: str) -> dict[str, Any]:
        response = self.internal.get(f"/api/v1/internal/sessions/{device_session_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    # -- Redis and logs
    def challenge_status(self, challenge_id: str) -> str | None:
        status: str | None = self.redis.hget(f"{self.prefix}challenge:{challenge_id}", "status")
        return status

    def new_records(self) -> list[dict[str, Any]]:
        """Log records written since this test started."""
        return self.proc.log_records()[self.log_mark :]

    def outbound_failures(self, service: str, event: str = OUTBOUND_FAILED) -> list[dict[str, Any]]:
        return [
            r for r in self.new_records() if r.get("event") == event and r.get("service") == service
        ]

    def assert_no_secrets_in_logs(self, *emails: str) -> None:
        """No code (the mail fake received them) and no full address in stdout or stderr.

        Only the masked form ``j***@example.com`` may appear: the unique local part of
        each test address must never be written, not even partly (it carries a uuid).
        """
        output = self.proc.stdout_text() + self.proc.stderr_text()
        for code in self.secrets + [m.code for m in self.mail.messages if m.email in emails]:
            assert not re.search(rf"(?<![0-9]){code}(?![0-9])", output), f"code {code} logged"
        for email in emails:
            local = email.rpartition("@")[0]
            assert email not in output.lower(), f"{email} logged"
            assert local[2:] not in output.lower(), f"local part of {email} logged"


def _reset(users: FakeUserService, mail: FakeMailService) -> None:
    for fake in (users, mail):
        fake.reset_faults()
        fake.clear_requests()


@pytest.fixture(scope="module")
def users_fake() -> Iterator[FakeUserService]:
    with FakeUserService() as service:
        yield service


@pytest.fixture(scope="module")
def mail_fake() -> Iterator[FakeMailService]:
    with FakeMailService() as service:
        yield service


@pytest.fixture(scope="module")
def redis_reader(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    try:
        yield client
    finally:
        client.close()


@contextlib.contextmanager
def _make_env(
    proc: AuthsessionProcess,
    users: FakeUserService,
    mail: FakeMailService,
    reader: redis.Redis,
) -> Iterator[RestEnv]:
    with (
        httpx.Client(base_url=proc.public_url, timeout=10.0) as public,
        httpx.Client(base_url=proc.internal_url, timeout=10.0) as internal,
    ):
        yield RestEnv(
            proc=proc,
            users=users,
            mail=mail,
            redis=reader,
            prefix=proc.env["AUTHSESSION_REDIS_KEY_PREFIX"],
            public=public,
            internal=internal,
        )


@pytest.fixture(scope="module")
def rest_process(
    redis_server: RedisServer,
    users_fake: FakeUserService,
    mail_fake: FakeMailService,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[AuthsessionProcess]:
    env = rest_env(redis_server, users_fake.base_url, mail_fake.base_url)
    proc = start_process(env, tmp_path_factory.mktemp("authsession-rest"))
    try:
        yield proc
    finally:
        proc.close()
        print(f"===== {proc!r} =====\n{proc.output_report()}")


@pytest.fixture(scope="module")
def no_signup_process(
    redis_server: RedisServer,
    users_fake: FakeUserService,
    mail_fake: FakeMailService,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[AuthsessionProcess]:
    env = rest_env(
        redis_server,
        users_fake.base_url,
        mail_fake.base_url,
        AUTHSESSION_SIGNUP_ENABLED="false",
    )
    proc = start_process(env, tmp_path_factory.mktemp("authsession-nosignup"))
    try:
        yield proc
    finally:
        proc.close()
        print(f"===== {proc!r} =====\n{proc.output_report()}")


def _env_fixture(
    proc: AuthsessionProcess,
    users: FakeUserService,
    mail: FakeMailService,
    reader: redis.Redis,
) -> Iterator[RestEnv]:
    _reset(users, mail)
    with _make_env(proc, users, mail, reader) as env:
        env.log_mark = len(proc.log_records())
        try:
            yield env
        finally:
            _reset(users, mail)
            if env.linger:
                deadline = env.linger_until or time.monotonic() + env.linger
                time.sleep(max(0.0, deadline - time.monotonic()) + 0.1)
    assert proc.is_running(), proc.output_report()


@pytest.fixture
def rest(
    rest_process: AuthsessionProcess,
    users_fake: FakeUserService,
    mail_fake: FakeMailService,
    redis_reader: redis.Redis,
) -> Iterator[RestEnv]:
    """The shared rest-mode process, with reset fakes and the log position of this test."""
    yield from _env_fixture(rest_process, users_fake, mail_fake, redis_reader)


@pytest.fixture
def no_signup(
    no_signup_process: AuthsessionProcess,
    users_fake: FakeUserService,
    mail_fake: FakeMailService,
    redis_reader: redis.Redis,
) -> Iterator[RestEnv]:
    yield from _env_fixture(no_signup_process, users_fake, mail_fake, redis_reader)


# --------------------------------------------------------------------------- login flow
def test_login_of_a_known_user_over_rest(rest: RestEnv) -> None:
    email = new_email("jane")
    user_id = rest.users.add_user(email)

    raw = f"  {email.upper()} "
    response = rest.send(raw, locale="de-CH")
    assert response.status_code == 200, response.text
    issued = response.json()
    challenge_id = issued["challenge_id"]
    assert ID.match(challenge_id)

    # The user service was asked with the normalized address, JSON and a traceparent.
    resolves = rest.users.requests_to(RESOLVE)
    assert len(resolves) == 1
    assert resolves[0].body == {"email": email}
    assert_outbound_headers(resolves[0])
    assert rest.users.requests_to(ENSURE) == []

    # The mail service got exactly one message, with the contract's fields and headers.
    mails = rest.mail.requests_to(LOGIN_CODE)
    assert len(mails) == 1
    mail = mails[0]
    assert set(mail.body) == {"email", "code", "challenge_id", "expires_at", "locale"}
    assert mail.body["email"] == email
    assert CODE.match(mail.body["code"])
    assert mail.body["challenge_id"] == challenge_id
    assert mail.body["expires_at"] == issued["expires_at"]
    assert mail.body["locale"] == "de-CH"
    assert mail.header("Idempotency-Key") == challenge_id
    assert_outbound_headers(mail)
    assert rest.challenge_status(challenge_id) == "sent"

    response = rest.confirm(challenge_id, rest.code_for(challenge_id), device_name="Jane's phone")
    assert response.status_code == 200, response.text
    session = response.json()
    assert set(session) == {
        "device_session_id",
        "session_token",
        "user_id",
        "expires_at",
        "created",
    }
    assert session["user_id"] == user_id
    assert session["created"] is True
    assert session["session_token"].startswith(session["device_session_id"] + ".")
    assert rest.challenge_status(challenge_id) == "confirmed_pending_expire"

    stored = rest.session(session["device_session_id"])
    assert stored["user_id"] == user_id
    assert stored["status"] == "active"
    assert stored["client_ip"] == "127.0.0.1"
    assert stored["user_agent"].startswith("python-httpx/")
    assert stored["device_name"] == "Jane's phone"
    # Confirm of an existing user never creates one.
    assert rest.users.requests_to(ENSURE) == []

    # Logs: the masked address only, never the code or the address.
    masked = f"j***@{email.rpartition('@')[2]}"
    emails_logged = {r["email"] for r in rest.new_records() if "email" in r}
    assert emails_logged <= {masked}, emails_logged
    rest.assert_no_secrets_in_logs(email)


def test_locale_is_null_when_not_given(rest: RestEnv) -> None:
    email = new_email()
    rest.users.add_user(email)
    challenge_id = rest.send_ok(email)
    [mail] = rest.mail.requests_to(LOGIN_CODE)
    assert mail.body["challenge_id"] == challenge_id
    assert "locale" in mail.body
    assert mail.body["locale"] is None


def test_idn_domain_is_sent_in_ascii(rest: RestEnv) -> None:
    local = f"jane.{uuid.uuid4().hex[:12]}"
    normalized = f"{local}@xn--bcher-kva.de"
    user_id = rest.users.add_user(normalized)
    challenge_id = rest.send_ok(f"{local.upper()}@BÜCHER.de")
    [resolve] = rest.users.requests_to(RESOLVE)
    assert resolve.body == {"email": normalized}
    [mail] = rest.mail.requests_to(LOGIN_CODE)
    assert mail.body["email"] == normalized
    response = rest.confirm(challenge_id, rest.code_for(challenge_id))
    assert response.status_code == 200, response.text
    assert response.json()["user_id"] == user_id


def test_outbound_traceparent_belongs_to_the_request_trace(rest: RestEnv) -> None:
    """§11: trace context propagated; the log line of the request carries the same trace."""
    email = new_email()
    rest.users.add_user(email)
    challenge_id = rest.send_ok(email)
    [resolve] = rest.users.requests_to(RESOLVE)
    [mail] = rest.mail.requests_to(LOGIN_CODE)
    trace_id = assert_outbound_headers(resolve)
    assert assert_outbound_headers(mail) == trace_id
    # Different spans (one per outbound call).
    assert resolve.header("traceparent") != mail.header("traceparent")
    sent = [r for r in rest.new_records() if r.get("challenge_id") == challenge_id]
    assert sent, "no log line for the sent challenge"
    assert {r.get("trace_id") for r in sent} == {trace_id}


# --------------------------------------------------------------------------- signup
def test_signup_of_an_unknown_email_through_ensure(rest: RestEnv) -> None:
    email = new_email("newbie")
    challenge_id = rest.send_ok(email)

    [resolve] = rest.users.requests_to(RESOLVE)
    assert resolve.body == {"email": email}
    assert rest.users.user_id_for(email) is None, "resolve must not create the user"
    assert rest.users.requests_to(ENSURE) == []
    assert rest.challenge_status(challenge_id) == "sent"

    response = rest.confirm(challenge_id, rest.code_for(challenge_id))
    assert response.status_code == 200, response.text
    session = response.json()

    ensures = rest.users.requests_to(ENSURE)
    assert len(ensures) == 1
    assert ensures[0].body == {"email": email}
    assert_outbound_headers(ensures[0])
    created_id = rest.users.user_id_for(email)
    assert created_id is not None
    assert session["user_id"] == created_id
    assert session["created"] is True

    listed = rest.internal.get(f"/api/v1/internal/users/{created_id}/sessions")
    assert listed.status_code == 200, listed.text
    assert [s["device_session_id"] for s in listed.json()["sessions"]] == [
        session["device_session_id"]
    ]
    rest.assert_no_secrets_in_logs(email)


def test_signup_ensure_says_blocked_is_403(rest: RestEnv) -> None:
    email = new_email()
    challenge_id = rest.send_ok(email)  # unknown at send time: a code is mailed
    user_id = rest.users.add_user(email)
    rest.users.block_user(user_id)  # ... and blocked before the confirm
    response = rest.confirm(challenge_id, rest.code_for(challenge_id))
    assert_error(response, 403, "user_blocked")
    assert len(rest.users.requests_to(ENSURE)) == 1
    listed = rest.internal.get(f"/api/v1/internal/users/{user_id}/sessions")
    assert listed.json()["sessions"] == []


def test_ensure_failure_is_503_not_retried_and_the_code_stays_usable(rest: RestEnv) -> None:
    email = new_email()
    challenge_id = rest.send_ok(email)
    code = rest.code_for(challenge_id)

    rest.users.fail_with(500)
    response = rest.confirm(challenge_id, code)
    assert_error(response, 503, "service_unavailable")
    assert len(rest.users.requests_to(ENSURE)) == 1, "ensure must never be retried"
    [failure] = rest.outbound_failures("user_service")
    assert failure["status"] == 500
    assert failure["operation"] == "ensure"

    rest.users.reset_faults()
    response = rest.confirm(challenge_id, code)
    assert response.status_code == 200, response.text
    assert response.json()["user_id"] == rest.users.user_id_for(email)
    rest.assert_no_secrets_in_logs(email)


def test_signup_disabled_suppresses_unknown_emails(no_signup: RestEnv) -> None:
    email = new_email("stranger")
    challenge_id = no_signup.send_ok(email)
    assert len(no_signup.users.requests_to(RESOLVE)) == 1
    assert no_signup.mail.requests_to(LOGIN_CODE) == []
    assert no_signup.challenge_status(challenge_id) == "delivery_suppressed"
    assert no_signup.users.user_id_for(email) is None

    response = no_signup.confirm(challenge_id, "123456")
    body = assert_error(response, 400, "invalid_code")
    assert "attempts_remaining" in body["error"]["details"]
    assert no_signup.users.requests_to(ENSURE) == []

    # A known user is still mailed and can log in on the same process.
    known = new_email("known")
    user_id = no_signup.users.add_user(known)
    session = no_signup.login(known)
    assert session["user_id"] == user_id
    no_signup.assert_no_secrets_in_logs(email, known)


# --------------------------------------------------------------------------- blocked user
def test_blocked_user_is_suppressed(rest: RestEnv) -> None:
    email = new_email("blocked")
    user_id = rest.users.add_user(email)
    rest.users.block_user(user_id)

    challenge_id = rest.send_ok(email)  # same status and shape as a sent code
    assert len(rest.users.requests_to(RESOLVE)) == 1
    assert rest.mail.requests_to(LOGIN_CODE) == []
    assert rest.challenge_status(challenge_id) == "delivery_suppressed"

    for code in ("000000", "123456"):
        response = rest.confirm(challenge_id, code)
        assert_error(response, 400, "invalid_code")
    assert rest.users.requests_to(ENSURE) == []
    listed = rest.internal.get(f"/api/v1/internal/users/{user_id}/sessions")
    assert listed.json()["sessions"] == []


# ------------------------------------------------------------------ block over the internal API
def test_block_flow_revokes_all_sessions(rest: RestEnv) -> None:
    email = new_email()
    user_id = rest.users.add_user(email, f"tenant:{uuid.uuid4().hex[:8]}@acme")
    first = rest.login(email)
    other = new_email()
    rest.users.users[other] = user_id  # a second address of the same user
    rest.clear_account_cooldown(user_id)
    second = rest.login(other)
    rest.users.clear_requests()

    response = rest.internal.post(
        f"/api/v1/internal/users/{user_id}/block", json={"reason": "fraud"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["user_id"] == user_id
    assert sorted(body["revoked_session_ids"]) == sorted(
        [first["device_session_id"], second["device_session_id"]]
    )

    blocks = rest.users.requests_to("/block")
    assert len(blocks) == 1
    assert blocks[0].body == {"reason": "fraud"}
    assert_outbound_headers(blocks[0])
    assert user_id in rest.users.blocked
    assert rest.users.block_reasons[user_id] == "fraud"

    for session in (first, second):
        stored = rest.session(session["device_session_id"])
        assert stored["status"] == "revoked"
        assert stored["revoke_reason"] == "user_blocked"
        snapshot = json.loads(rest.redis.get(f"gateway:session:{session['device_session_id']}"))
        assert snapshot["status"] == "revoked"
        assert snapshot["revoke_reason"] == "user_blocked"
        assert snapshot["version"] == stored["version"]
    active = rest.internal.get(
        f"/api/v1/internal/users/{user_id}/sessions", params={"status": "active"}
    )
    assert active.json()["sessions"] == []

    # The user service now says blocked: the next login is suppressed.
    third = new_email()
    rest.users.users[third] = user_id
    rest.clear_account_cooldown(user_id)
    mails_before = len(rest.mail.messages)
    challenge_id = rest.send_ok(third)
    assert rest.challenge_status(challenge_id) == "delivery_suppressed"
    assert len(rest.mail.messages) == mails_before


def test_block_without_body_sends_the_default_reason(rest: RestEnv) -> None:
    email = new_email()
    user_id = rest.users.add_user(email)
    response = rest.internal.post(f"/api/v1/internal/users/{user_id}/block")
    assert response.status_code == 200, response.text
    assert response.json() == {"user_id": user_id, "revoked_session_ids": []}
    [block] = rest.users.requests_to("/block")
    assert block.path == f"/api/v1/users/{user_id}/block"
    assert set(block.body) == {"reason"}
    assert isinstance(block.body["reason"], str)


def test_block_of_an_unknown_user_is_404(rest: RestEnv) -> None:
    user_id = f"ghost-{uuid.uuid4().hex[:8]}"
    response = rest.internal.post(
        f"/api/v1/internal/users/{user_id}/block", json={"reason": "fraud"}
    )
    assert_error(response, 404, "user_not_found")
    assert len(rest.users.requests_to(f"/api/v1/users/{user_id}/block")) == 1
    assert rest.outbound_failures("user_service") == []


def test_block_when_the_user_service_fails_is_503_and_revokes_nothing(rest: RestEnv) -> None:
    email = new_email()
    user_id = rest.users.add_user(email)
    session = rest.login(email)

    rest.users.fail_with(500)
    response = rest.internal.post(
        f"/api/v1/internal/users/{user_id}/block", json={"reason": "fraud"}
    )
    assert_error(response, 503, "service_unavailable")
    assert len(rest.users.requests_to("/block")) == 1, "block must never be retried"
    assert user_id not in rest.users.blocked
    assert rest.session(session["device_session_id"])["status"] == "active"
    [failure] = rest.outbound_failures("user_service")
    assert failure["status"] == 500
    assert failure["operation"] == "block"

    # Nothing remembered either: once the service is back, the user can still log in.
    rest.users.reset_faults()
    assert rest.login(new_email_for(rest, user_id))["user_id"] == user_id


def new_email_for(rest: RestEnv, user_id: str) -> str:
    """Another address of the user, and the account's cooldown ended for it."""
    email = new_email()
    rest.users.users[email] = user_id
    rest.clear_account_cooldown(user_id)
    return email


# --------------------------------------------------------------------------- timeouts and retries
def test_slow_user_service_is_bounded_by_its_timeout(rest: RestEnv) -> None:
    email = new_email("slow")
    rest.users.add_user(email)
    rest.slow(rest.users, 3)

    started = time.monotonic()
    response = rest.send(email)
    elapsed = time.monotonic() - started
    assert_error(response, 503, "service_unavailable")
    # One try plus the single retry of resolve, each bounded by the 1 s timeout.
    assert elapsed < 2 * TIMEOUT_S + 0.8, f"took {elapsed:.2f}s"
    assert len(rest.users.requests_to(RESOLVE)) == 2
    assert rest.mail.requests_to(LOGIN_CODE) == []
    [failure] = rest.outbound_failures("user_service")
    assert failure.get("exception"), failure
    assert len(rest.outbound_failures("user_service", OUTBOUND_RETRYING)) == 1

    # The cooldown was released: the next request is mailed, not throttled.
    rest.heal(rest.users)
    challenge_id = rest.send_ok(email)
    assert rest.challenge_status(challenge_id) == "sent"
    assert len(rest.mail.messages_for(email)) == 1
    rest.assert_no_secrets_in_logs(email)


def test_resolve_is_retried_once_on_503(rest: RestEnv) -> None:
    email = new_email()
    user_id = rest.users.add_user(email)
    rest.users.fail_with(503, times=1)

    challenge_id = rest.send_ok(email)
    resolves = rest.users.requests_to(RESOLVE)
    assert len(resolves) == 2
    assert resolves[0].body == resolves[1].body == {"email": email}
    for resolve in resolves:
        assert_outbound_headers(resolve)
    assert rest.challenge_status(challenge_id) == "sent"
    assert len(rest.mail.messages_for(email)) == 1
    retried = rest.outbound_failures("user_service", OUTBOUND_RETRYING)
    assert len(retried) == 1
    assert retried[0]["status"] == 503
    assert rest.outbound_failures("user_service") == []

    response = rest.confirm(challenge_id, rest.code_for(challenge_id))
    assert response.status_code == 200, response.text
    assert response.json()["user_id"] == user_id


def test_resolve_is_retried_once_on_a_dropped_connection(rest: RestEnv) -> None:
    email = new_email()
    rest.users.add_user(email)
    rest.users.drop_connection(times=1)
    challenge_id = rest.send_ok(email)
    assert len(rest.users.requests_to(RESOLVE)) == 2
    assert rest.challenge_status(challenge_id) == "sent"


def test_resolve_fails_after_two_503(rest: RestEnv) -> None:
    email = new_email()
    rest.users.add_user(email)
    rest.users.fail_with(503)
    response = rest.send(email)
    assert_error(response, 503, "service_unavailable")
    assert len(rest.users.requests_to(RESOLVE)) == 2, "exactly one retry"
    [failure] = rest.outbound_failures("user_service")
    assert failure["status"] == 503


def test_resolve_is_not_retried_on_500(rest: RestEnv) -> None:
    email = new_email()
    rest.users.add_user(email)
    rest.users.fail_with(500)

    response = rest.send(email)
    assert_error(response, 503, "service_unavailable")
    assert len(rest.users.requests_to(RESOLVE)) == 1
    assert rest.mail.requests_to(LOGIN_CODE) == []
    failures = rest.outbound_failures("user_service")
    assert len(failures) == 1, failures
    assert failures[0]["status"] == 500
    assert rest.outbound_failures("user_service", OUTBOUND_RETRYING) == []

    # Cooldown released.
    rest.users.reset_faults()
    challenge_id = rest.send_ok(email)
    assert rest.challenge_status(challenge_id) == "sent"
    rest.assert_no_secrets_in_logs(email)


def test_resolve_with_a_malformed_body_is_503(rest: RestEnv) -> None:
    email = new_email()
    rest.users.add_user(email)
    rest.users.fail_with(200, body={"outcome": "maybe"})
    response = rest.send(email)
    assert_error(response, 503, "service_unavailable")
    assert len(rest.users.requests_to(RESOLVE)) == 1, "an invalid body is not retried"
    assert rest.mail.requests_to(LOGIN_CODE) == []


# --------------------------------------------------------------------------- mail failures
def test_failing_mail_service(rest: RestEnv) -> None:
    email = new_email("mailfail")
    rest.users.add_user(email)
    rest.mail.fail_with(500)

    response = rest.send(email)
    assert_error(response, 503, "service_unavailable")
    mails = rest.mail.requests_to(LOGIN_CODE)
    assert len(mails) == 1, "the mail client never retries"
    failed_challenge = mails[0].body["challenge_id"]
    failed_code = mails[0].body["code"]
    rest.secrets.append(failed_code)
    assert mails[0].header("Idempotency-Key") == failed_challenge
    assert rest.challenge_status(failed_challenge) == "delivery_failed"

    failures = rest.outbound_failures("mail_service")
    assert len(failures) == 1, failures
    assert failures[0]["status"] == 500
    assert rest.outbound_failures("mail_service", OUTBOUND_RETRYING) == []

    # A delivery_failed challenge never had a code delivered: even its code is wrong.
    response = rest.confirm(failed_challenge, failed_code)
    assert_error(response, 400, "invalid_code")

    # The cooldown was left open for a retry.
    rest.mail.reset_faults()
    challenge_id = rest.send_ok(email)
    assert challenge_id != failed_challenge
    assert rest.challenge_status(challenge_id) == "sent"
    assert len(rest.mail.messages_for(email)) == 1
    response = rest.confirm(challenge_id, rest.code_for(challenge_id))
    assert response.status_code == 200, response.text
    rest.assert_no_secrets_in_logs(email)


def test_slow_mail_service_is_bounded_and_not_retried(rest: RestEnv) -> None:
    email = new_email()
    rest.users.add_user(email)
    rest.slow(rest.mail, 3)
    started = time.monotonic()
    response = rest.send(email)
    elapsed = time.monotonic() - started
    assert_error(response, 503, "service_unavailable")
    assert elapsed < TIMEOUT_S + 0.8, f"took {elapsed:.2f}s"
    [mail] = rest.mail.requests_to(LOGIN_CODE)
    rest.secrets.append(mail.body["code"])
    assert rest.challenge_status(mail.body["challenge_id"]) == "delivery_failed"
    [failure] = rest.outbound_failures("mail_service")
    assert failure.get("exception"), failure
    rest.heal(rest.mail)
    rest.assert_no_secrets_in_logs(email)


# --------------------------------------------------------------------------- user service down
def test_user_service_down(
    redis_server: RedisServer,
    mail_fake: FakeMailService,
    redis_reader: redis.Redis,
    tmp_path: Path,
) -> None:
    closed = f"http://{LOOPBACK}:{free_port()}"
    env = rest_env(redis_server, closed, mail_fake.base_url)
    proc = start_process(env, tmp_path / "authsession-down")
    users = FakeUserService()  # never started: only a stand-in for RestEnv
    mail_fake.reset_faults()
    mail_fake.clear_requests()
    try:
        with _make_env(proc, users, mail_fake, redis_reader) as rest:
            email = new_email("down")
            for _ in range(2):  # the second is not throttled: the cooldown was released
                started = time.monotonic()
                response = rest.send(email)
                assert time.monotonic() - started < 2 * TIMEOUT_S + 0.8
                assert_error(response, 503, "service_unavailable")
            assert mail_fake.requests_to(LOGIN_CODE) == []

            failures = rest.outbound_failures("user_service")
            assert len(failures) == 2, failures  # one per failed request
            assert all(f.get("exception") for f in failures), failures

            # The process keeps serving.
            listed = rest.internal.get("/api/v1/internal/users/nobody/sessions")
            assert listed.status_code == 200, listed.text
            assert listed.json() == {"user_id": "nobody", "sessions": []}
            assert proc.is_running()
            rest.assert_no_secrets_in_logs(email)
    finally:
        proc.close()
        print(f"===== {proc!r} =====\n{proc.output_report()}")


# --------------------------------------------------------------------------- more contract edges
def test_confirm_replay_of_a_signup_does_not_call_ensure_again(rest: RestEnv) -> None:
    email = new_email()
    challenge_id = rest.send_ok(email)
    code = rest.code_for(challenge_id)
    first = rest.confirm(challenge_id, code)
    assert first.status_code == 200, first.text
    replay = rest.confirm(challenge_id, code)
    assert replay.status_code == 200, replay.text
    assert replay.json()["created"] is False
    assert replay.json()["device_session_id"] == first.json()["device_session_id"]
    assert replay.json()["session_token"] == first.json()["session_token"]
    assert len(rest.users.requests_to(ENSURE)) == 1


def test_code_mailed_before_a_block_cannot_open_a_session(rest: RestEnv) -> None:
    email = new_email()
    user_id = rest.users.add_user(email)
    challenge_id = rest.send_ok(email)
    blocked = rest.internal.post(f"/api/v1/internal/users/{user_id}/block", json={})
    assert blocked.status_code == 200, blocked.text
    response = rest.confirm(challenge_id, rest.code_for(challenge_id))
    assert_error(response, 403, "user_blocked")
    listed = rest.internal.get(f"/api/v1/internal/users/{user_id}/sessions")
    assert listed.json()["sessions"] == []


@pytest.mark.parametrize(("status", "body"), [(200, None), (204, None), (201, {"id": "m-1"})])
def test_any_2xx_of_the_mail_service_is_a_success(rest: RestEnv, status: int, body: Any) -> None:
    email = new_email()
    rest.users.add_user(email)
    rest.mail.fail_with(status, times=1, body=body)
    challenge_id = rest.send_ok(email)
    assert rest.challenge_status(challenge_id) == "sent"
    assert len(rest.mail.requests_to(LOGIN_CODE)) == 1
    assert rest.outbound_failures("mail_service") == []


def test_block_accepts_200_with_a_body(rest: RestEnv) -> None:
    email = new_email()
    user_id = rest.users.add_user(email)
    session = rest.login(email)
    rest.users.fail_with(200, times=1, body={"status": "blocked"})
    response = rest.internal.post(f"/api/v1/internal/users/{user_id}/block", json={})
    assert response.status_code == 200, response.text
    assert response.json()["revoked_session_ids"] == [session["device_session_id"]]


@pytest.mark.parametrize(
    "body",
    [
        {"outcome": "existing", "user_id": "has space"},
        {"outcome": "existing", "user_id": "x" * 129},
        {"outcome": "existing"},
        {"outcome": "blocked"},
        b"not json",
    ],
    ids=["bad-chars", "too-long", "no-user-id", "blocked-no-user-id", "not-json"],
)
def test_resolve_answer_not_matching_the_contract_is_503(rest: RestEnv, body: Any) -> None:
    email = new_email()
    rest.users.fail_with(200, body=body)
    response = rest.send(email)
    assert_error(response, 503, "service_unavailable")
    assert len(rest.users.requests_to(RESOLVE)) == 1
    assert rest.mail.requests_to(LOGIN_CODE) == []
    [failure] = rest.outbound_failures("user_service")
    assert failure["status"] == 200
    rest.users.reset_faults()
    rest.send_ok(email)  # cooldown released
    assert len(rest.mail.messages_for(email)) == 1


def test_ensure_answer_with_an_invalid_user_id_is_503(rest: RestEnv) -> None:
    email = new_email()
    challenge_id = rest.send_ok(email)
    code = rest.code_for(challenge_id)
    rest.users.fail_with(200, times=1, body={"outcome": "created", "user_id": "a/b"})
    assert_error(rest.confirm(challenge_id, code), 503, "service_unavailable")
    response = rest.confirm(challenge_id, code)
    assert response.status_code == 200, response.text


def test_resolve_answer_unknown_with_a_stray_user_id_is_unknown(rest: RestEnv) -> None:
    email = new_email()
    rest.users.fail_with(200, times=1, body={"outcome": "unknown", "user_id": "stray"})
    challenge_id = rest.send_ok(email)
    response = rest.confirm(challenge_id, rest.code_for(challenge_id))
    assert response.status_code == 200, response.text
    assert response.json()["user_id"] == rest.users.user_id_for(email) != "stray"


@pytest.mark.parametrize("status", [502, 504])
def test_resolve_is_retried_once_on_gateway_errors(rest: RestEnv, status: int) -> None:
    email = new_email()
    rest.users.add_user(email)
    rest.users.fail_with(status, times=1)
    challenge_id = rest.send_ok(email)
    assert len(rest.users.requests_to(RESOLVE)) == 2
    assert rest.challenge_status(challenge_id) == "sent"


@pytest.mark.parametrize("status", [400, 404, 429, 501])
def test_resolve_is_not_retried_on_other_errors(rest: RestEnv, status: int) -> None:
    email = new_email()
    rest.users.add_user(email)
    rest.users.fail_with(status)
    assert_error(rest.send(email), 503, "service_unavailable")
    assert len(rest.users.requests_to(RESOLVE)) == 1
    [failure] = rest.outbound_failures("user_service")
    assert failure["status"] == status


def test_slow_block_is_503_within_the_timeout_and_revokes_nothing(rest: RestEnv) -> None:
    email = new_email()
    user_id = rest.users.add_user(email)
    session = rest.login(email)
    rest.slow(rest.users, 3)
    started = time.monotonic()
    response = rest.internal.post(f"/api/v1/internal/users/{user_id}/block", json={})
    elapsed = time.monotonic() - started
    assert_error(response, 503, "service_unavailable")
    assert elapsed < TIMEOUT_S + 0.8, f"took {elapsed:.2f}s"
    assert len(rest.users.requests_to("/block")) == 1
    rest.heal(rest.users)
    assert rest.session(session["device_session_id"])["status"] == "active"


def test_slow_ensure_is_503_within_the_timeout_and_the_retry_works(rest: RestEnv) -> None:
    email = new_email()
    challenge_id = rest.send_ok(email)
    code = rest.code_for(challenge_id)
    rest.slow(rest.users, 3)
    started = time.monotonic()
    response = rest.confirm(challenge_id, code)
    elapsed = time.monotonic() - started
    assert_error(response, 503, "service_unavailable")
    assert elapsed < TIMEOUT_S + 0.8, f"took {elapsed:.2f}s"
    assert len(rest.users.requests_to(ENSURE)) == 1
    rest.heal(rest.users)
    response = rest.confirm(challenge_id, code)
    assert response.status_code == 200, response.text
    assert response.json()["created"] is True


async def test_concurrent_sends_for_one_email_mail_once(rest: RestEnv) -> None:
    email = new_email()
    rest.users.add_user(email)
    rest.slow(rest.mail, 0.3)
    async with httpx.AsyncClient(base_url=rest.proc.public_url, timeout=10.0) as client:
        responses = await asyncio.gather(
            *(client.post(SEND, json={"email": email}) for _ in range(5))
        )
    assert [r.status_code for r in responses] == [200] * 5, [r.text for r in responses]
    ids = {r.json()["challenge_id"] for r in responses}
    assert len(ids) == 5
    assert len(rest.mail.requests_to(LOGIN_CODE)) == 1
    statuses = sorted(rest.challenge_status(i) or "" for i in ids)
    assert statuses == ["delivery_throttled"] * 4 + ["sent"]


@pytest.mark.parametrize(
    ("path_id", "body"),
    [
        ("user-1", {"reason": "Fraud!"}),
        ("user-1", {"reason": "x" * 65}),
        ("user-1", {"reason": "fraud", "extra": 1}),
        ("has%20space", {"reason": "fraud"}),
        ("x" * 129, {"reason": "fraud"}),
    ],
    ids=["reason-chars", "reason-long", "unknown-field", "id-chars", "id-long"],
)
def test_invalid_block_request_never_reaches_the_user_service(
    rest: RestEnv, path_id: str, body: dict[str, Any]
) -> None:
    response = rest.internal.post(f"/api/v1/internal/users/{path_id}/block", json=body)
    assert_error(response, 400, "invalid_request")
    assert rest.users.requests == []


def test_block_of_a_dot_user_id_reaches_the_right_route(rest: RestEnv) -> None:
    """``.``/``..`` are valid user ids (``[A-Za-z0-9._:@-]``) but URL dot segments."""
    email = new_email()
    rest.users.add_user(email, "..")
    session = rest.login(email)
    response = rest.internal.post("/api/v1/internal/users/%2E%2E/block", json={})
    assert response.status_code == 200, response.text
    assert response.json() == {
        "user_id": "..",
        "revoked_session_ids": [session["device_session_id"]],
    }
    [block] = rest.users.requests_to("/block")
    assert block.path.lower() == "/api/v1/users/%2e%2e/block"
    assert ".." in rest.users.blocked


async def test_concurrent_confirms_of_a_signup_make_one_session(rest: RestEnv) -> None:
    email = new_email()
    challenge_id = rest.send_ok(email)
    code = rest.code_for(challenge_id)
    rest.slow(rest.users, 0.3)  # widens the race; well inside the 1 s timeout
    async with httpx.AsyncClient(base_url=rest.proc.public_url, timeout=10.0) as client:
        responses = await asyncio.gather(
            *(
                client.post(CONFIRM, json={"challenge_id": challenge_id, "code": code})
                for _ in range(5)
            )
        )
    rest.heal(rest.users)
    assert [r.status_code for r in responses] == [200] * 5, [r.text for r in responses]
    bodies = [r.json() for r in responses]
    assert len({b["device_session_id"] for b in bodies}) == 1
    assert len({b["session_token"] for b in bodies}) == 1
    assert [b["created"] for b in bodies].count(True) == 1
    user_id = rest.users.user_id_for(email)
    assert user_id is not None
    assert {b["user_id"] for b in bodies} == {user_id}
    listed = rest.internal.get(f"/api/v1/internal/users/{user_id}/sessions")
    assert len(listed.json()["sessions"]) == 1


def test_sigterm_drains_an_in_flight_outbound_call(
    redis_server: RedisServer,
    users_fake: FakeUserService,
    mail_fake: FakeMailService,
    tmp_path: Path,
) -> None:
    """§2: in-flight requests finish (their outbound calls included), then the HTTP
    clients close, and the exit status is 0."""
    _reset(users_fake, mail_fake)
    env = rest_env(redis_server, users_fake.base_url, mail_fake.base_url)
    proc = start_process(env, tmp_path / "authsession-drain")
    try:
        email = new_email()
        users_fake.add_user(email)
        users_fake.delay(0.6)
        with (
            httpx.Client(base_url=proc.public_url, timeout=10.0) as client,
            concurrent.futures.ThreadPoolExecutor(1) as pool,
        ):
            future = pool.submit(client.post, SEND, json={"email": email})
            deadline = time.monotonic() + 5
            while not users_fake.requests_to(RESOLVE) and time.monotonic() < deadline:
                time.sleep(0.02)
            proc.terminate()
            response = future.result(timeout=10)
        assert response.status_code == 200, response.text
        assert proc.wait_exit() == 0, proc.output_report()
        assert len(mail_fake.messages_for(email)) == 1
        events = [r.get("event") for r in proc.log_records()]
        assert "resources closed" in events
    finally:
        _reset(users_fake, mail_fake)
        proc.close()
        print(f"===== {proc!r} =====\n{proc.output_report()}")


def test_cooldown_skips_both_services(rest: RestEnv) -> None:
    """§5: inside the cooldown neither the user service nor the mail service is called,
    whether the first request was sent or suppressed."""
    sent_email = new_email()
    rest.users.add_user(sent_email)
    blocked_email = new_email()
    rest.users.block_user(rest.users.add_user(blocked_email))
    for email, first_status in ((sent_email, "sent"), (blocked_email, "delivery_suppressed")):
        rest.users.clear_requests()
        first = rest.send_ok(email)
        second = rest.send_ok(email)
        assert first != second
        assert rest.challenge_status(first) == first_status
        assert rest.challenge_status(second) == "delivery_throttled"
        resolves = rest.users.requests_to(RESOLVE)
        assert [r.body for r in resolves] == [{"email": email}]
        assert_error(rest.confirm(second, "123456"), 400, "invalid_code")
    assert len(rest.mail.requests_to(LOGIN_CODE)) == 1


def test_rest_mode_configuration_errors_exit_2(redis_server: RedisServer, tmp_path: Path) -> None:
    """§2/§3: rest mode without its base URL or timeout, or with invalid ones, is a
    configuration error: one stderr line naming every variable, exit 2, no listener."""
    env = rest_env(redis_server, "http://users.invalid", "http://mail.invalid")
    del env["AUTHSESSION_USER_SERVICE_BASE_URL"]
    del env["AUTHSESSION_USER_SERVICE_REQUEST_TIMEOUT"]
    env["AUTHSESSION_MAIL_SERVICE_BASE_URL"] = "ftp://mail.invalid"
    env["AUTHSESSION_MAIL_SERVICE_REQUEST_TIMEOUT"] = "0s"
    proc = AuthsessionProcess(
        env,
        public_port=port_of(env["AUTHSESSION_PUBLIC_HTTP_ADDR"]),
        internal_port=port_of(env["AUTHSESSION_INTERNAL_HTTP_ADDR"]),
        workdir=tmp_path / "authsession-badconfig",
    )
    with proc:
        assert proc.wait_exit() == 2, proc.output_report()
        lines = proc.stderr_text().strip().splitlines()
        assert len(lines) == 1, proc.output_report()
        for name in (
            "USER_SERVICE_BASE_URL",
            "USER_SERVICE_REQUEST_TIMEOUT",
            "MAIL_SERVICE_BASE_URL",
            "MAIL_SERVICE_REQUEST_TIMEOUT",
        ):
            assert f"AUTHSESSION_{name}" in lines[0], lines[0]
        assert not port_accepts(proc.public_port)
        assert not port_accepts(proc.internal_port)


# --------------------------------------------------------------------------- transport errors
def test_mail_dropped_connection_is_503_and_never_retried(rest: RestEnv) -> None:
    email = new_email()
    rest.users.add_user(email)
    rest.mail.drop_connection(times=1)  # a retry would succeed: there must be none
    assert_error(rest.send(email), 503, "service_unavailable")
    [mail] = rest.mail.requests_to(LOGIN_CODE)
    rest.secrets.append(mail.body["code"])
    assert rest.challenge_status(mail.body["challenge_id"]) == "delivery_failed"
    [failure] = rest.outbound_failures("mail_service")
    assert failure.get("exception"), failure
    challenge_id = rest.send_ok(email)  # cooldown released
    assert rest.challenge_status(challenge_id) == "sent"
    rest.assert_no_secrets_in_logs(email)


def test_ensure_dropped_connection_is_503_and_never_retried(rest: RestEnv) -> None:
    email = new_email()
    challenge_id = rest.send_ok(email)
    code = rest.code_for(challenge_id)
    rest.users.drop_connection(times=1)
    assert_error(rest.confirm(challenge_id, code), 503, "service_unavailable")
    assert len(rest.users.requests_to(ENSURE)) == 1
    response = rest.confirm(challenge_id, code)
    assert response.status_code == 200, response.text
    assert len(rest.users.requests_to(ENSURE)) == 2


def test_block_dropped_connection_is_503_and_never_retried(rest: RestEnv) -> None:
    email = new_email()
    user_id = rest.users.add_user(email)
    session = rest.login(email)
    rest.users.drop_connection(times=1)
    response = rest.internal.post(f"/api/v1/internal/users/{user_id}/block", json={})
    assert_error(response, 503, "service_unavailable")
    assert len(rest.users.requests_to("/block")) == 1
    assert rest.session(session["device_session_id"])["status"] == "active"


def test_unicode_local_part_is_sent_nfc_and_lower_case(rest: RestEnv) -> None:
    token = uuid.uuid4().hex[:12]
    normalized = f"jos\u00e9.{token}@example.com"  # NFC, lower case
    raw = f" JOSE\u0301.{token.upper()}@EXAMPLE.com "  # decomposed, upper case
    user_id = rest.users.add_user(normalized)
    challenge_id = rest.send_ok(raw)
    [resolve] = rest.users.requests_to(RESOLVE)
    assert resolve.body == {"email": normalized}
    [mail] = rest.mail.requests_to(LOGIN_CODE)
    assert mail.body["email"] == normalized
    response = rest.confirm(challenge_id, rest.code_for(challenge_id))
    assert response.status_code == 200, response.text
    assert response.json()["user_id"] == user_id
    output = rest.proc.stdout_text()
    assert token not in output.lower()
    assert "j***@example.com" in output


# --------------------------------------------------------------------------- aliases
def test_spellings_of_one_account_share_its_resend_cooldown(rest: RestEnv) -> None:
    # The user service resolves plus-tags and dots to one account (CONTRACT §12/§5).
    base = new_email("alias")
    local, _, domain = base.partition("@")
    spellings = [base, f"{local}+a@{domain}", f"{local}+b@{domain}", f"x.{local}@{domain}"]
    user_id = rest.users.add_user(spellings[0])
    for spelling in spellings[1:]:
        rest.users.add_user(spelling, user_id)

    issued = [rest.send_ok(spelling) for spelling in spellings]

    assert [rest.challenge_status(c) for c in issued] == ["sent"] + ["delivery_throttled"] * 3
    assert len(rest.mail.requests_to(LOGIN_CODE)) == 1  # one mail to the one inbox
    assert len(rest.users.requests_to(RESOLVE)) == 4


@pytest.fixture
def alias_process(
    redis_server: RedisServer,
    users_fake: FakeUserService,
    mail_fake: FakeMailService,
    redis_reader: redis.Redis,
    tmp_path: Path,
) -> Iterator[RestEnv]:
    env = rest_env(
        redis_server,
        users_fake.base_url,
        mail_fake.base_url,
        AUTHSESSION_RESEND_COOLDOWN="1ms",
        AUTHSESSION_MAX_FAILED_CONFIRMS_PER_EMAIL="4",
    )
    proc = start_process(env, tmp_path / "authsession-alias")
    try:
        yield from _env_fixture(proc, users_fake, mail_fake, redis_reader)
    finally:
        proc.close()


def test_spellings_of_one_account_share_its_hourly_failure_budget(alias_process: RestEnv) -> None:
    rest = alias_process
    base = new_email("budget")
    local, _, domain = base.partition("@")
    first, second = base, f"{local}+other@{domain}"
    user_id = rest.users.add_user(first)
    rest.users.add_user(second, user_id)

    challenge = rest.send_ok(first)
    wrong = "000000" if rest.code_for(challenge) != "000000" else "111111"
    answers = [rest.confirm(challenge, wrong).status_code for _ in range(4)]
    assert answers == [400, 400, 400, 400]  # the budget (4) is used up through `first`

    # Another spelling has an e-mail budget of its own, but not another account budget.
    other = rest.send_ok(second)
    assert_error(rest.confirm(other, wrong), 429, "too_many_attempts")
    assert_error(rest.confirm(other, rest.code_for(other)), 429, "too_many_attempts")


# --------------------------------------------------------------------------- user status
USER_PATH = "/api/v1/users/{}"


def test_a_block_made_in_the_user_service_stops_a_confirm_at_once(rest: RestEnv) -> None:
    email = new_email("blockedlater")
    user_id = rest.users.add_user(email)
    challenge = rest.send_ok(email)
    rest.users.block_user(user_id)  # directly in the user service, not through authsession

    assert_error(rest.confirm(challenge, rest.code_for(challenge)), 403, "user_blocked")
    [lookup] = rest.users.requests_to(USER_PATH.format(user_id), method="GET")
    assert_outbound_headers_get(lookup)
    assert rest.challenge_status(challenge) == "sent"  # not confirmed, no session


def test_a_user_gone_from_the_user_service_cannot_confirm(rest: RestEnv) -> None:
    email = new_email("deleted")
    rest.users.add_user(email)
    challenge = rest.send_ok(email)
    del rest.users.users[email]  # the user service no longer knows the user: 404
    assert_error(rest.confirm(challenge, rest.code_for(challenge)), 403, "user_blocked")


def test_the_user_lookup_is_retried_once_on_503(rest: RestEnv) -> None:
    email = new_email("lookup")
    user_id = rest.users.add_user(email)
    challenge = rest.send_ok(email)
    rest.users.fail_with(503, times=1)
    response = rest.confirm(challenge, rest.code_for(challenge))
    assert response.status_code == 200, response.text
    assert len(rest.users.requests_to(USER_PATH.format(user_id), method="GET")) == 2


def test_the_user_lookup_is_not_retried_on_500(rest: RestEnv) -> None:
    email = new_email("lookup500")
    user_id = rest.users.add_user(email)
    challenge = rest.send_ok(email)
    rest.users.fail_with(500)
    assert_error(rest.confirm(challenge, rest.code_for(challenge)), 503, "service_unavailable")
    assert len(rest.users.requests_to(USER_PATH.format(user_id), method="GET")) == 1
    rest.heal(rest.users)
    # Nothing was confirmed: the same code works once the user service answers.
    assert rest.confirm(challenge, rest.code_for(challenge)).status_code == 200


def assert_outbound_headers_get(request: RecordedRequest) -> None:
    """A GET carries the traceparent; it has no body."""
    traceparent = request.header("traceparent") or ""
    assert TRACEPARENT.match(traceparent), request.headers
    assert request.body is None
