"""End to end: what the real process writes to stdout/stderr never carries a secret (§11).

Each test runs the ``authsession`` console script at ``AUTHSESSION_LOG_LEVEL=debug``, drives
every flow over HTTP (send-email-code, wrong and right codes, replay, every internal
operation, 400/404/405/413 answers; in ``rest`` mode also failing user and mail services),
stops it with SIGTERM, then reads back everything it wrote:

- every stdout line is one JSON object with ``timestamp``, ``level``, ``event``,
  ``request_id`` and ``trace_id``;
- no line holds a session token or its secret part;
- no line holds a login code, except the stub mail's own ``stub mail: login code`` line,
  which carries the masked address (``j***@example.com``); in ``rest`` mode no line at all;
- no line holds an e-mail address used in the test, nor its local part followed by ``@``.
"""

from __future__ import annotations

import json
import re
import time
import unicodedata
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from authsession.domain.email import mask_email, normalize_email
from tests.contract import CONFIRM, INTERNAL, SEND
from tests.support.fake_services import FakeMailService, FakeUserService
from tests.support.process import AuthsessionFactory, AuthsessionProcess
from tests.support.redis_server import RedisServer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

STUB_CODE_EVENT = "stub mail: login code"
OUTBOUND_FAILED = "outbound call failed"
REQUIRED_KEYS = {"timestamp", "level", "event", "request_id", "trace_id"}
HEX32 = re.compile(r"^[0-9a-f]{32}$")
MASKED = re.compile(r"^[^@*]\*\*\*@[^@]+$")
REQUEST_ID = "logscan-request-0001"


# --------------------------------------------------------------------------- helpers
@dataclass
class Secrets:
    """Everything the logs must not show, collected while driving the flows."""

    emails: set[str] = field(default_factory=set)
    codes: set[str] = field(default_factory=set)
    tokens: set[str] = field(default_factory=set)

    def add_email(self, raw: str) -> str:
        """Remember an address in every form the service may hold; the normalized one."""
        normalized = normalize_email(raw)
        text = unicodedata.normalize("NFC", raw.strip())
        local = normalized.rpartition("@")[0]
        # The normalized address with its domain in Unicode (before IDNA) too.
        unicode_domain = text.rpartition("@")[2].lower()
        self.emails.update(
            {text, text.lower(), normalized, f"{local}@{unicode_domain}", raw.strip()}
        )
        return normalized

    def forbidden_email_parts(self) -> set[str]:
        """Whole addresses and ``local@`` prefixes, lower-cased (compared case-insensitively)."""
        parts = set()
        for address in self.emails:
            lowered = address.lower()
            parts.add(lowered)
            parts.add(lowered.rpartition("@")[0] + "@")
        return parts

    def add_session(self, token: str) -> None:
        self.tokens.add(token)
        self.tokens.add(token.rsplit(".", 1)[1])


def other_code(code: str) -> str:
    """A well-formed code that is not ``code``."""
    return f"{(int(code) + 1) % 1_000_000:06d}"


def code_pattern(code: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![0-9]){code}(?![0-9])")


def strings_in(value: Any) -> Iterator[str]:
    """Every key and string value of a parsed JSON value, recursively."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from strings_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings_in(item)
    else:
        yield str(value)


def line_texts(line: str) -> list[str]:
    """The raw line and, for JSON, its decoded strings (``\\u`` escapes resolved)."""
    texts = [line]
    try:
        parsed = json.loads(line)
    except ValueError:
        return texts
    texts.append("\n".join(strings_in(parsed)))
    return texts


def wait_for_stub_code(process: AuthsessionProcess, challenge_id: str) -> str:
    """The code the stub mail logged for ``challenge_id`` (the log is written as it goes)."""
    deadline = time.monotonic() + 5
    while True:
        for record in process.log_records():
            if (
                record.get("event") == STUB_CODE_EVENT
                and record.get("challenge_id") == challenge_id
            ):
                return str(record["code"])
        if time.monotonic() > deadline:
            raise AssertionError(f"no stub mail line for {challenge_id}\n{process.output_report()}")
        time.sleep(0.02)


def scan(process: AuthsessionProcess, secrets: Secrets, *, stub_lines_may_hold_codes: bool) -> None:
    """All the assertions on the captured output (the process has exited)."""
    stdout = process.stdout_text()
    stderr = process.stderr_text()
    stdout_lines = [line for line in stdout.splitlines() if line.strip()]
    assert stdout_lines, "the process logged nothing"
    records: list[dict[str, Any]] = []
    for line in stdout_lines:
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"stdout line is not JSON: {line!r}")
        assert isinstance(record, dict), f"stdout line is not a JSON object: {line!r}"
        missing = REQUIRED_KEYS - record.keys()
        assert not missing, f"{sorted(missing)} missing in {line!r}"
        records.append(record)

    requests = [r for r in records if r["event"] == "request"]
    assert requests, "no request log line"
    for record in requests:
        assert record["request_id"], record
        # (that its trace_id is the request's: test_every_line_of_a_request_carries_its_trace_id)
    assert any(r["request_id"] == REQUEST_ID for r in requests), "X-Request-ID not logged"

    email_parts = secrets.forbidden_email_parts()
    code_patterns = {code: code_pattern(code) for code in secrets.codes}
    stub_lines = 0
    all_lines = [(line, "stdout") for line in stdout_lines] + [
        (line, "stderr") for line in stderr.splitlines() if line.strip()
    ]
    for line, stream in all_lines:
        texts = line_texts(line)
        for token in secrets.tokens:
            assert not any(token in text for text in texts), f"token in {stream}: {line}"
        lowered = [text.lower() for text in texts]
        for part in email_parts:
            assert not any(part in text for text in lowered), f"{part!r} in {stream}: {line}"
        leaked = [c for c, p in code_patterns.items() if any(p.search(t) for t in texts)]
        if not leaked:
            continue
        record = json.loads(line) if stream == "stdout" else {}
        assert stub_lines_may_hold_codes, f"code {leaked} in {stream}: {line}"
        assert record.get("event") == STUB_CODE_EVENT, f"code {leaked} in {stream}: {line}"
        assert MASKED.match(str(record.get("email"))), f"unmasked e-mail in {line}"
        assert record.get("code") in leaked, line
        stub_lines += 1
    if stub_lines_may_hold_codes:
        assert stub_lines, "the stub mail never logged a code"


def start(
    authsession_process: AuthsessionFactory, redis_server: RedisServer, **extra: str
) -> tuple[AuthsessionProcess, str]:
    """The process on its own key prefix (returned too); nothing else in Redis is touched."""
    tag = uuid.uuid4().hex[:8]
    prefix = f"logscan-{tag}:"
    env = {
        "AUTHSESSION_REDIS_ADDR": redis_server.addr,
        "AUTHSESSION_REDIS_KEY_PREFIX": prefix,
        "AUTHSESSION_GATEWAY_SESSION_KEY_PREFIX": f"logscan-{tag}:gateway:session:",
        "AUTHSESSION_GATEWAY_SESSION_EVENTS_STREAM": f"logscan-{tag}:gateway:session_events",
        "AUTHSESSION_LOG_LEVEL": "debug",
        "AUTHSESSION_LOG_FORMAT": "json",
        **extra,
    }
    return authsession_process(env).wait_ready(), prefix


def clear_cooldowns(redis_server: RedisServer, prefix: str) -> None:
    """Drop the resend cooldowns of one process, so an address can get another code."""
    client = redis_server.client()
    try:
        for key in client.scan_iter(f"{prefix}throttle*"):
            client.delete(key)
    finally:
        client.close()


def stop(process: AuthsessionProcess) -> None:
    process.terminate()
    assert process.wait_exit() == 0, process.output_report()


def expect(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, f"{response.request.url}: {response.text}"
    body: dict[str, Any] = response.json()
    if code is not None:
        assert body["error"]["code"] == code, body
    return body


def common_error_requests(
    public: httpx.Client, internal: httpx.Client, secrets: Secrets, email: str, code: str
) -> None:
    """400, 404, 405 and 413 answers whose requests carry an address and a code."""
    # 413: the address inside a body over 16 KiB.
    expect(public.post(SEND, json={"email": email, "pad": "x" * 20_000}), 413, "payload_too_large")
    # 400: unknown field carrying the address, malformed JSON around address and code,
    # an address that is not one, a code of the wrong form.
    expect(public.post(SEND, json={"email": email, "note": email}), 400, "invalid_request")
    broken = '{"email": "' + email + '", "code": "' + code + '"'
    expect(
        public.post(SEND, content=broken, headers={"Content-Type": "application/json"}),
        400,
        "invalid_request",
    )
    not_an_address = "nobody-" + uuid.uuid4().hex[:6] + "@@example.com"
    secrets.emails.add(not_an_address)
    expect(public.post(SEND, json={"email": not_an_address}), 400, "invalid_request")
    expect(
        public.post(CONFIRM, json={"challenge_id": "A" * 32, "code": code + "x"}),
        400,
        "invalid_request",
    )
    expect(
        public.post(CONFIRM, json={"challenge_id": "A" * 32, "code": code}),
        404,
        "challenge_not_found",
    )
    expect(internal.get(f"{INTERNAL}/sessions/{'B' * 32}"), 404, "session_not_found")
    expect(public.post("/api/v1/public/auth/nowhere", json={"email": email}), 404, "not_found")
    expect(public.get(SEND), 405, "method_not_allowed")


def internal_flows(internal: httpx.Client, sessions: list[dict[str, Any]]) -> None:
    """list, read, extend, revoke, revoke-all and block over the internal listener."""
    first, second, third = sessions
    user_id = first["user_id"]
    listed = expect(internal.get(f"{INTERNAL}/users/{user_id}/sessions"), 200)
    assert first["device_session_id"] in {s["device_session_id"] for s in listed["sessions"]}
    expect(internal.get(f"{INTERNAL}/users/{user_id}/sessions?status=active"), 200)
    expect(internal.get(f"{INTERNAL}/sessions/{first['device_session_id']}"), 200)
    expect(
        internal.post(
            f"{INTERNAL}/sessions/{first['device_session_id']}/extend", json={"ttl": "1h"}
        ),
        200,
    )
    expect(
        internal.post(
            f"{INTERNAL}/sessions/{first['device_session_id']}/extend", json={"ttl": "x"}
        ),
        400,
        "invalid_request",
    )
    revoked = expect(
        internal.post(
            f"{INTERNAL}/sessions/{second['device_session_id']}/revoke",
            json={"reason": "logscan_test"},
        ),
        200,
    )
    assert revoked["status"] == "revoked"
    expect(
        internal.post(f"{INTERNAL}/sessions/{second['device_session_id']}/extend"),
        409,
        "session_revoked",
    )
    all_revoked = expect(
        internal.post(
            f"{INTERNAL}/users/{user_id}/sessions/revoke",
            json={"except_session_id": third["device_session_id"]},
        ),
        200,
    )
    assert first["device_session_id"] in all_revoked["revoked_session_ids"]
    blocked = expect(internal.post(f"{INTERNAL}/users/{user_id}/block", json={}), 200)
    assert blocked["revoked_session_ids"] == [third["device_session_id"]]


# --------------------------------------------------------------------------- stub mode
def test_stub_mode_logs_hold_no_secret(
    authsession_process: AuthsessionFactory, redis_server: RedisServer
) -> None:
    process, prefix = start(authsession_process, redis_server)
    secrets = Secrets()
    tag = uuid.uuid4().hex[:6]
    raw_emails = [
        f"  Jane.Logscan{tag}@Example.COM ",
        f"robert.logscan{tag}@example.org",
        f"Zoë.Ünïcode{tag}@Bücher.example",
    ]
    normalized = [secrets.add_email(raw) for raw in raw_emails]
    with (
        httpx.Client(base_url=process.public_url, timeout=10) as public,
        httpx.Client(base_url=process.internal_url, timeout=10) as internal,
    ):
        challenges: dict[str, tuple[str, str]] = {}
        for raw, address in zip(raw_emails, normalized, strict=True):
            body = expect(public.post(SEND, json={"email": raw, "locale": "de-CH"}), 200)
            code = wait_for_stub_code(process, body["challenge_id"])
            secrets.codes.add(code)
            challenges[address] = (body["challenge_id"], code)
        jane = normalized[0]
        # Throttled: a fresh challenge with no code; any code is wrong for it.
        throttled = expect(
            public.post(SEND, json={"email": raw_emails[0]}, headers={"X-Request-ID": REQUEST_ID}),
            200,
        )
        challenge_id, code = challenges[jane]
        wrong = other_code(code)
        secrets.codes.add(wrong)
        expect(
            public.post(CONFIRM, json={"challenge_id": throttled["challenge_id"], "code": code}),
            400,
            "invalid_code",
        )
        expect(
            public.post(CONFIRM, json={"challenge_id": challenge_id, "code": wrong}),
            400,
            "invalid_code",
        )
        sessions = []
        for address in normalized:
            cid, right = challenges[address]
            body = expect(
                public.post(
                    CONFIRM,
                    json={"challenge_id": cid, "code": right, "device_name": "Jane's phone"},
                ),
                200,
            )
            secrets.add_session(body["session_token"])
            sessions.append(body)
        replay = expect(
            public.post(CONFIRM, json={"challenge_id": challenge_id, "code": code}), 200
        )
        assert replay["created"] is False
        assert replay["session_token"] == sessions[0]["session_token"]

        # Three sessions of one user for the internal flows (cooldown cleared in between).
        user_sessions = [sessions[0]]
        for _ in range(2):
            clear_cooldowns(redis_server, prefix)
            body = expect(public.post(SEND, json={"email": raw_emails[0]}), 200)
            right = wait_for_stub_code(process, body["challenge_id"])
            secrets.codes.add(right)
            confirmed = expect(
                public.post(CONFIRM, json={"challenge_id": body["challenge_id"], "code": right}),
                200,
            )
            secrets.add_session(confirmed["session_token"])
            user_sessions.append(confirmed)
        internal_flows(internal, user_sessions[:3])
        common_error_requests(public, internal, secrets, raw_emails[1].strip(), code)
    stop(process)
    scan(process, secrets, stub_lines_may_hold_codes=True)
    # The stub's lines carry the masks of the addresses that got a code.
    masks = {r["email"] for r in process.log_records() if r.get("event") == STUB_CODE_EVENT}
    assert {mask_email(a) for a in normalized} <= masks


# --------------------------------------------------------------------------- rest mode
def mailed_codes(mail: FakeMailService) -> set[str]:
    """Every code the process sent to the mail service, including refused requests."""
    return {
        str(r.body["code"])
        for r in mail.requests
        if isinstance(r.body, dict) and isinstance(r.body.get("code"), str)
    }


def test_rest_mode_logs_hold_no_secret_even_when_services_fail(
    authsession_process: AuthsessionFactory,
    redis_server: RedisServer,
    fake_user_service: FakeUserService,
    fake_mail_service: FakeMailService,
) -> None:
    process, _ = start(
        authsession_process,
        redis_server,
        AUTHSESSION_USER_SERVICE_MODE="rest",
        AUTHSESSION_USER_SERVICE_BASE_URL=fake_user_service.base_url,
        AUTHSESSION_USER_SERVICE_REQUEST_TIMEOUT="1s",
        AUTHSESSION_MAIL_SERVICE_MODE="rest",
        AUTHSESSION_MAIL_SERVICE_BASE_URL=fake_mail_service.base_url,
        AUTHSESSION_MAIL_SERVICE_REQUEST_TIMEOUT="1s",
    )
    secrets = Secrets()
    tag = uuid.uuid4().hex[:6]
    jane_raw = f"Jane.Rest{tag}@Example.com"
    bob_raw = f"Bob.Rest{tag}@Bücher.example"
    carol_raw = f"carol.rest{tag}@example.net"
    jane, bob, carol = (secrets.add_email(raw) for raw in (jane_raw, bob_raw, carol_raw))
    # A user service whose ids are shaped like addresses without a dot in the domain:
    # "session created" / "session revoked" carry the user id and must mask it (§12, §11).
    jane_id = fake_user_service.add_user(jane, user_id=f"jane.doe.{tag}@corp")
    secrets.emails.add(jane_id)
    carol_id = fake_user_service.add_user(carol)
    with (
        httpx.Client(base_url=process.public_url, timeout=10) as public,
        httpx.Client(base_url=process.internal_url, timeout=10) as internal,
    ):
        # Mail service answers 500: 503, then the released cooldown lets a retry through.
        fake_mail_service.fail_with(500, times=1)
        expect(public.post(SEND, json={"email": jane_raw}), 503, "service_unavailable")
        sent = expect(
            public.post(SEND, json={"email": jane_raw}, headers={"X-Request-ID": REQUEST_ID}),
            200,
        )
        jane_code = fake_mail_service.last_code_for(jane)
        assert jane_code is not None
        # Mail service too slow: a timeout.
        fake_mail_service.delay(1.5)
        expect(public.post(SEND, json={"email": carol_raw}), 503, "service_unavailable")
        fake_mail_service.reset_faults()
        # User service 503 twice (resolve is retried once), then a dropped connection
        # followed by a good answer (the retry succeeds).
        fake_user_service.fail_with(503, times=2)
        expect(public.post(SEND, json={"email": bob_raw}), 503, "service_unavailable")
        fake_user_service.drop_connection(times=1)
        bob_sent = expect(public.post(SEND, json={"email": bob_raw, "locale": "de"}), 200)
        bob_code = fake_mail_service.last_code_for(bob)
        assert bob_code is not None

        # Jane: wrong code, right code, replay.
        wrong = other_code(jane_code)
        expect(
            public.post(CONFIRM, json={"challenge_id": sent["challenge_id"], "code": wrong}),
            400,
            "invalid_code",
        )
        confirm = {"challenge_id": sent["challenge_id"], "code": jane_code}
        session = expect(public.post(CONFIRM, json=confirm), 200)
        secrets.add_session(session["session_token"])
        assert expect(public.post(CONFIRM, json=confirm), 200)["created"] is False
        # Bob signs up: ensure fails once (503), the identical retry completes.
        fake_user_service.fail_with(500, times=1)
        bob_confirm = {"challenge_id": bob_sent["challenge_id"], "code": bob_code}
        expect(public.post(CONFIRM, json=bob_confirm), 503, "service_unavailable")
        bob_session = expect(public.post(CONFIRM, json=bob_confirm), 200)
        secrets.add_session(bob_session["session_token"])

        # Internal: read, list, extend, revoke; block through the user service.
        user_id = session["user_id"]
        assert user_id == jane_id
        expect(internal.get(f"{INTERNAL}/users/{user_id}/sessions"), 200)
        expect(internal.get(f"{INTERNAL}/sessions/{session['device_session_id']}"), 200)
        expect(internal.post(f"{INTERNAL}/sessions/{session['device_session_id']}/extend"), 200)
        expect(internal.post(f"{INTERNAL}/sessions/{bob_session['device_session_id']}/revoke"), 200)
        fake_user_service.fail_with(500, times=1)
        expect(internal.post(f"{INTERNAL}/users/{carol_id}/block"), 503, "service_unavailable")
        expect(internal.post(f"{INTERNAL}/users/nobody-{tag}/block"), 404, "user_not_found")
        blocked = expect(
            internal.post(f"{INTERNAL}/users/{user_id}/block", json={"reason": "abuse"}), 200
        )
        assert blocked["revoked_session_ids"] == [session["device_session_id"]]
        # The blocked user asks again: suppressed, no mail.
        expect(public.post(SEND, json={"email": carol_raw}), 200)
        common_error_requests(public, internal, secrets, jane_raw, jane_code)
    stop(process)

    secrets.codes |= mailed_codes(fake_mail_service) | {wrong}
    assert {jane_code, bob_code} <= secrets.codes
    records = process.log_records()
    events = [r["event"] for r in records]
    assert events.count(OUTBOUND_FAILED) >= 5, events  # mail 500, timeout, user x3
    # The address-shaped user id was logged, masked, by both session events.
    for event in ("session created", "session revoked"):
        logged = {r.get("user_id") for r in records if r["event"] == event}
        assert mask_email(jane_id) in logged, (event, logged)
    assert f"{OUTBOUND_FAILED}, retrying" in events
    scan(process, secrets, stub_lines_may_hold_codes=False)


# --------------------------------------------------------------------------- correlation
def test_every_line_of_a_request_carries_its_trace_id(
    authsession_process: AuthsessionFactory, redis_server: RedisServer
) -> None:
    process, _ = start(authsession_process, redis_server)
    with httpx.Client(base_url=process.public_url, timeout=10) as public:
        email = f"trace.{uuid.uuid4().hex[:8]}@example.com"
        expect(public.post(SEND, json={"email": email}, headers={"X-Request-ID": REQUEST_ID}), 200)
    stop(process)
    lines = [r for r in process.log_records() if r["request_id"] == REQUEST_ID]
    assert {r["event"] for r in lines} >= {"request", STUB_CODE_EVENT, "login code sent"}
    trace_ids = {r["trace_id"] for r in lines}
    assert len(trace_ids) == 1, lines
    assert HEX32.match(str(trace_ids.pop()))
