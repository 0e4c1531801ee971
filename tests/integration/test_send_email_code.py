"""send-email-code (CONTRACT §5): normalization, the outcomes table, the cooldown, and the
challenge record in Redis (§7). In process over a real redis-server.

The small in-memory fakes of the user and mail services defined here (``FakeUsers``,
``FakeMail``) count their calls and can fail; the other login test modules import them.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import idna
import pytest
import redis

from authsession.domain.errors import ServiceUnavailable
from authsession.domain.ports import LoginCodeMessage, UserResolution, UserStatus
from tests.contract import CONFIRM, SEND
from tests.integration.conftest import AppEnv, AppFactory

PREFIX = "authsession:"


# --------------------------------------------------------------------------- fakes
class FakeUsers:
    """A user directory: ``users`` maps normalized e-mail → user id, ``blocked`` holds ids.

    Every call is recorded before any injected failure is raised.
    """

    def __init__(
        self, users: dict[str, str] | None = None, blocked: set[str] | None = None
    ) -> None:
        self.users: dict[str, str] = dict(users or {})
        self.blocked: set[str] = set(blocked or ())
        self.fail_resolve = False
        self.fail_ensure = False
        self.ensure_blocks = False  # ensure answers "blocked" whatever the state
        self.resolve_calls: list[str] = []
        self.ensure_calls: list[str] = []
        self.block_calls: list[tuple[str, str]] = []

    def add(self, email: str, user_id: str) -> str:
        self.users[email] = user_id
        return user_id

    async def resolve_by_email(self, email: str) -> UserResolution:
        self.resolve_calls.append(email)
        if self.fail_resolve:
            raise ServiceUnavailable("user_service", "injected failure")
        user_id = self.users.get(email)
        if user_id is None:
            return UserResolution("unknown")
        return UserResolution("blocked" if user_id in self.blocked else "existing", user_id)

    async def ensure(self, email: str) -> UserResolution:
        self.ensure_calls.append(email)
        if self.fail_ensure:
            raise ServiceUnavailable("user_service", "injected failure")
        user_id = self.users.get(email)
        if self.ensure_blocks:
            return UserResolution("blocked", user_id or "usr-blocked")
        if user_id is None:
            user_id = self.add(email, "usr-" + sha256_hex(email)[:16])
            return UserResolution("created", user_id)
        return UserResolution("blocked" if user_id in self.blocked else "existing", user_id)

    async def block(self, user_id: str, reason: str) -> None:
        self.block_calls.append((user_id, reason))
        self.blocked.add(user_id)

    async def user_status(self, user_id: str) -> UserStatus | None:
        if user_id not in self.users.values():
            return None
        return "blocked" if user_id in self.blocked else "active"


class FakeMail:
    """A mail service that records every message (even one it then fails)."""

    def __init__(self) -> None:
        self.messages: list[LoginCodeMessage] = []
        self.fail = False

    @property
    def calls(self) -> int:
        return len(self.messages)

    async def send_login_code(self, message: LoginCodeMessage) -> None:
        self.messages.append(message)
        if self.fail:
            raise ServiceUnavailable("mail_service", "injected failure")

    def code_for(self, challenge_id: str) -> str:
        codes = [m.code for m in self.messages if m.challenge_id == challenge_id]
        assert len(codes) == 1, f"expected one mail for {challenge_id}, got {len(codes)}"
        return codes[0]


# --------------------------------------------------------------------------- helpers
def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def parse_ts(text: str) -> datetime:
    """An RFC 3339 UTC timestamp with the ``Z`` suffix (CONTRACT §4)."""
    assert isinstance(text, str)
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def ms(value: datetime) -> datetime:
    """``value`` at the millisecond precision of the contract's timestamps."""
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def challenge_key(challenge_id: str) -> str:
    return f"{PREFIX}challenge:{challenge_id}"


def challenge_record(app: AppEnv, challenge_id: str) -> dict[str, str]:
    record: dict[str, str] = app.redis.hgetall(challenge_key(challenge_id))  # type: ignore[assignment]
    return record


def challenge_keys(client: redis.Redis) -> list[str]:
    return sorted(str(k) for k in client.scan_iter(match=f"{PREFIX}challenge:*"))


def only_challenge_id(client: redis.Redis) -> str:
    """The id of the one challenge in Redis (for requests that answered 503)."""
    keys = challenge_keys(client)
    assert len(keys) == 1, keys
    return keys[0].removeprefix(f"{PREFIX}challenge:")


async def send(app: AppEnv, email: str, **extra: Any) -> Any:
    """send-email-code; asserts 200 and returns the body."""
    response = await app.public.post(SEND, json={"email": email, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def other_code(code: str) -> str:
    """A well-formed code that is not ``code``."""
    return f"{(int(code) + 1) % 1_000_000:06d}"


def dump_redis(client: redis.Redis) -> dict[str, Any]:
    """Every key with its whole value, whatever the type."""
    out: dict[str, Any] = {}
    for key in client.scan_iter(match="*"):
        kind = client.type(key)
        if kind == "string":
            out[key] = client.get(key)
        elif kind == "hash":
            out[key] = client.hgetall(key)
        elif kind == "zset":
            out[key] = client.zrange(key, 0, -1, withscores=True)
        elif kind == "set":
            out[key] = sorted(cast(Any, client.smembers(key)))
        elif kind == "list":
            out[key] = client.lrange(key, 0, -1)
        elif kind == "stream":
            out[key] = client.xrange(key)
        else:  # pragma: no cover - a type the service does not use
            out[key] = kind
    return out


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    """The response is ``status`` with the contract's error body carrying ``code``."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str)
    error: dict[str, Any] = body["error"]
    return error


# --------------------------------------------------------------------------- normalization
@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("  Jane.Doe@EXAMPLE.com \t", "jane.doe@example.com"),
        ("Jose\u0301@example.com", "jos\u00e9@example.com"),  # decomposed → NFC
        ("\u00c9LODIE@Example.COM", "\u00e9lodie@example.com"),
        ("user@B\u00fccher.Example.com", "user@xn--bcher-kva.example.com"),
    ],
    ids=["trim-and-lower", "nfc", "unicode-lower", "idna-domain"],
)
async def test_email_is_normalized_before_hashing_and_resolving(
    make_app: AppFactory, raw: str, normalized: str
) -> None:
    users, mail = FakeUsers(), FakeMail()
    app = await make_app(users=users, mail=mail)

    body = await send(app, raw)

    record = challenge_record(app, body["challenge_id"])
    assert record["email_hash"] == sha256_hex(normalized)
    assert users.resolve_calls == [normalized]
    assert [m.email for m in mail.messages] == [normalized]
    # Unknown user with signup on: the address is kept (normalized) for ensure at confirm.
    assert record["email"] == normalized
    assert app.redis.exists(f"{PREFIX}throttle:{sha256_hex(normalized)}") == 1


async def test_different_spellings_of_one_address_share_the_cooldown(
    make_app: AppFactory,
) -> None:
    users, mail = FakeUsers({"jane@example.com": "usr-jane"}), FakeMail()
    app = await make_app(users=users, mail=mail)

    first = await send(app, "Jane@Example.com")
    second = await send(app, "  JANE@EXAMPLE.COM ")
    third = await send(app, "jane@example.com")

    assert challenge_record(app, first["challenge_id"])["status"] == "sent"
    assert challenge_record(app, second["challenge_id"])["status"] == "delivery_throttled"
    assert challenge_record(app, third["challenge_id"])["status"] == "delivery_throttled"
    assert mail.calls == 1
    assert users.resolve_calls == ["jane@example.com"]
    hashes = {
        challenge_record(app, b["challenge_id"])["email_hash"] for b in (first, second, third)
    }
    assert hashes == {sha256_hex("jane@example.com")}


def _idna_expanded_address() -> str:
    """At most 254 characters as typed, more than 254 once the domain is IDNA-encoded."""
    label = "m\u00fcnchenx" * 7  # 56 characters, 63 once encoded
    domain = ".".join([label] * 3) + ".de"
    address = "a" * 64 + "@" + domain
    assert len(address) <= 254
    assert len("a" * 64 + "@" + idna.encode(domain, uts46=True).decode()) > 254
    return address


LONG_DOMAIN = "b" * 63 + "." + "c" * 63 + "." + "d" * 57 + ".com"  # 189 characters


@pytest.mark.parametrize(
    "email",
    [
        "not-an-address",
        "@example.com",
        "jane@",
        "a@b@example.com",
        "jane@exa mple.com",
        "jane@localhost",
        "a" * 64 + "@" + LONG_DOMAIN.replace("d" * 57, "d" * 58),  # 255 characters
        _idna_expanded_address(),
        "x" * 321 + "@example.com",
    ],
    ids=[
        "no-at",
        "no-local",
        "no-domain",
        "two-ats",
        "space",
        "no-tld",
        "255-chars",
        "over-254-after-idna",
        "huge",
    ],
)
async def test_invalid_address_is_invalid_request_and_writes_nothing(
    make_app: AppFactory, email: str
) -> None:
    users, mail = FakeUsers(), FakeMail()
    app = await make_app(users=users, mail=mail)

    response = await app.public.post(SEND, json={"email": email})

    assert_error(response, 400, "invalid_request")
    assert app.redis.dbsize() == 0
    assert users.resolve_calls == []
    assert mail.calls == 0


async def test_address_of_exactly_254_characters_is_accepted_after_trimming(
    make_app: AppFactory,
) -> None:
    users, mail = FakeUsers(), FakeMail()
    app = await make_app(users=users, mail=mail)
    address = "a" * 64 + "@" + LONG_DOMAIN
    assert len(address) == 254

    body = await send(app, "   " + address.upper() + "  ")

    assert challenge_record(app, body["challenge_id"])["email_hash"] == sha256_hex(address)
    assert users.resolve_calls == [address]


@pytest.mark.parametrize(
    "payload",
    [
        {"email": "jane@example.com", "locale": "x" * 36},
        {"email": "jane@example.com", "extra": 1},
        {"email": 42},
        {},
    ],
    ids=["locale-too-long", "unknown-field", "wrong-type", "missing-email"],
)
async def test_malformed_send_request_is_invalid_request(
    make_app: AppFactory, payload: dict[str, Any]
) -> None:
    app = await make_app(users=FakeUsers(), mail=FakeMail())

    response = await app.public.post(SEND, json=payload)

    assert_error(response, 400, "invalid_request")
    assert app.redis.dbsize() == 0


async def test_no_redis_key_name_contains_the_address_or_its_local_part(
    make_app: AppFactory,
) -> None:
    users, mail = FakeUsers(), FakeMail()  # unknown user, signup on: the address is stored
    app = await make_app(users=users, mail=mail)
    email = "Zelda.Quuxington@Example.com"

    first = await send(app, email)
    await send(app, email)  # throttled
    code = mail.code_for(first["challenge_id"])
    wrong = await app.public.post(
        CONFIRM, json={"challenge_id": first["challenge_id"], "code": other_code(code)}
    )
    assert_error(wrong, 400, "invalid_code")
    confirmed = await app.public.post(
        CONFIRM, json={"challenge_id": first["challenge_id"], "code": code}
    )
    assert confirmed.status_code == 200, confirmed.text

    names = [str(k) for k in app.redis.scan_iter(match="*")]
    assert any(n.startswith(f"{PREFIX}failures:") for n in names)
    assert any(n.startswith(f"{PREFIX}throttle:") for n in names)
    for name in names:
        lowered = name.lower()
        assert "zelda" not in lowered, name
        assert "quuxington" not in lowered, name
        assert "@" not in name, name
    hashed = sha256_hex("zelda.quuxington@example.com")
    assert f"{PREFIX}throttle:{hashed}" in names
    assert f"{PREFIX}failures:{hashed}" in names


# --------------------------------------------------------------------------- outcomes
async def test_existing_user_gets_a_sent_challenge_and_one_mail(make_app: AppFactory) -> None:
    users, mail = FakeUsers({"jane@example.com": "usr-jane"}), FakeMail()
    app = await make_app(users=users, mail=mail)

    body = await send(app, "jane@example.com", locale="en-GB")

    record = challenge_record(app, body["challenge_id"])
    assert record["status"] == "sent"
    assert record["user_id"] == "usr-jane"
    assert "email" not in record  # kept only where the user must be created at confirm
    assert users.resolve_calls == ["jane@example.com"]
    assert users.ensure_calls == []
    assert mail.calls == 1
    message = mail.messages[0]
    assert message.email == "jane@example.com"
    assert message.challenge_id == body["challenge_id"]
    assert message.locale == "en-GB"
    assert re.fullmatch(r"[0-9]{6}", message.code)
    assert ms(message.expires_at) == parse_ts(body["expires_at"])


async def test_unknown_user_with_signup_enabled_gets_a_sent_challenge(
    make_app: AppFactory,
) -> None:
    users, mail = FakeUsers(), FakeMail()
    app = await make_app(users=users, mail=mail, SIGNUP_ENABLED=True)

    body = await send(app, "newbie@example.com")

    record = challenge_record(app, body["challenge_id"])
    assert record["status"] == "sent"
    assert "user_id" not in record
    assert record["email"] == "newbie@example.com"
    assert users.resolve_calls == ["newbie@example.com"]
    assert users.ensure_calls == []  # the user is created at confirm, not now
    assert mail.calls == 1


async def test_blocked_user_is_suppressed_without_mail(make_app: AppFactory) -> None:
    users = FakeUsers({"bad@example.com": "usr-bad"}, blocked={"usr-bad"})
    mail = FakeMail()
    app = await make_app(users=users, mail=mail)

    body = await send(app, "bad@example.com")

    record = challenge_record(app, body["challenge_id"])
    assert record["status"] == "delivery_suppressed"
    assert "code_hmac" not in record
    assert users.resolve_calls == ["bad@example.com"]
    assert mail.calls == 0


async def test_unknown_user_with_signup_disabled_is_suppressed_without_mail(
    make_app: AppFactory,
) -> None:
    users, mail = FakeUsers(), FakeMail()
    app = await make_app(users=users, mail=mail, SIGNUP_ENABLED=False)

    body = await send(app, "stranger@example.com")

    record = challenge_record(app, body["challenge_id"])
    assert record["status"] == "delivery_suppressed"
    assert "email" not in record
    assert "code_hmac" not in record
    assert users.resolve_calls == ["stranger@example.com"]
    assert mail.calls == 0


async def test_request_inside_the_cooldown_is_throttled_without_calling_any_service(
    make_app: AppFactory,
) -> None:
    users, mail = FakeUsers({"jane@example.com": "usr-jane"}), FakeMail()
    app = await make_app(users=users, mail=mail)
    await send(app, "jane@example.com")
    assert (len(users.resolve_calls), mail.calls) == (1, 1)

    body = await send(app, "jane@example.com")

    record = challenge_record(app, body["challenge_id"])
    assert record["status"] == "delivery_throttled"
    assert record["email_hash"] == sha256_hex("jane@example.com")
    assert "code_hmac" not in record
    assert "code_salt" not in record
    assert (len(users.resolve_calls), mail.calls) == (1, 1)


async def test_throttled_requests_do_not_extend_the_cooldown(make_app: AppFactory) -> None:
    users, mail = FakeUsers({"jane@example.com": "usr-jane"}), FakeMail()
    app = await make_app(users=users, mail=mail, RESEND_COOLDOWN="1s")
    throttle = f"{PREFIX}throttle:{sha256_hex('jane@example.com')}"
    loop = asyncio.get_running_loop()

    started = loop.time()
    first = await send(app, "jane@example.com")
    await asyncio.sleep(0.5)
    ttl_before = app.redis.pttl(throttle)
    throttled = await send(app, "jane@example.com")
    ttl_after = app.redis.pttl(throttle)
    # The window was not restarted by the throttled request.
    assert 0 < ttl_after <= ttl_before <= 600
    await asyncio.sleep(max(0.0, 1.3 - (loop.time() - started)))
    reopened = await send(app, "jane@example.com")

    statuses = [
        challenge_record(app, b["challenge_id"])["status"] for b in (first, throttled, reopened)
    ]
    assert statuses == ["sent", "delivery_throttled", "sent"]
    assert mail.calls == 2


async def test_mail_failure_is_503_records_delivery_failed_and_releases_the_cooldown(
    make_app: AppFactory,
) -> None:
    users, mail = FakeUsers({"jane@example.com": "usr-jane"}), FakeMail()
    app = await make_app(users=users, mail=mail)
    mail.fail = True

    response = await app.public.post(SEND, json={"email": "jane@example.com"})

    assert_error(response, 503, "service_unavailable")
    failed_id = only_challenge_id(app.redis)
    assert challenge_record(app, failed_id)["status"] == "delivery_failed"
    assert app.redis.exists(f"{PREFIX}throttle:{sha256_hex('jane@example.com')}") == 0
    assert mail.calls == 1  # never retried

    mail.fail = False
    retry = await send(app, "jane@example.com")
    assert retry["challenge_id"] != failed_id
    assert challenge_record(app, retry["challenge_id"])["status"] == "sent"
    assert mail.calls == 2


async def test_user_service_failure_is_503_and_releases_the_cooldown(
    make_app: AppFactory,
) -> None:
    users, mail = FakeUsers({"jane@example.com": "usr-jane"}), FakeMail()
    app = await make_app(users=users, mail=mail)
    users.fail_resolve = True

    response = await app.public.post(SEND, json={"email": "jane@example.com"})

    assert_error(response, 503, "service_unavailable")
    assert mail.calls == 0
    assert app.redis.exists(f"{PREFIX}throttle:{sha256_hex('jane@example.com')}") == 0
    for cid in challenge_keys(app.redis):  # whatever was recorded, nothing was sent
        assert app.redis.hget(cid, "status") != "sent"

    users.fail_resolve = False
    retry = await send(app, "jane@example.com")
    assert challenge_record(app, retry["challenge_id"])["status"] == "sent"
    assert mail.calls == 1


async def test_every_accepted_case_returns_a_fresh_challenge_with_the_same_shape(
    make_app: AppFactory,
) -> None:
    users = FakeUsers(
        {"jane@example.com": "usr-jane", "bad@example.com": "usr-bad"}, blocked={"usr-bad"}
    )
    mail = FakeMail()
    app = await make_app(users=users, mail=mail, SIGNUP_ENABLED=False)

    cases = {
        "sent": "jane@example.com",
        "delivery_throttled": "jane@example.com",
        "delivery_suppressed:blocked": "bad@example.com",
        "delivery_suppressed:unknown": "nobody@example.com",
    }
    responses = {}
    for case, email in cases.items():
        responses[case] = await app.public.post(SEND, json={"email": email})

    ids = set()
    for case, response in responses.items():
        assert response.status_code == 200, (case, response.text)
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        assert set(body) == {"challenge_id", "expires_at"}, case
        assert re.fullmatch(r"[A-Za-z0-9_-]{16,64}", body["challenge_id"])
        assert parse_ts(body["expires_at"]) == ms(app.clock.now() + timedelta(minutes=10))
        assert challenge_record(app, body["challenge_id"])["status"] == case.split(":")[0]
        ids.add(body["challenge_id"])
    assert len(ids) == len(cases)


# --------------------------------------------------------------------------- the record
async def test_challenge_record_has_the_contract_fields_and_no_plain_code(
    make_app: AppFactory,
) -> None:
    users, mail = FakeUsers({"jane@example.com": "usr-jane"}), FakeMail()
    app = await make_app(users=users, mail=mail)

    body = await send(app, "jane@example.com")

    code = mail.code_for(body["challenge_id"])
    record = challenge_record(app, body["challenge_id"])
    assert {
        "status",
        "email_hash",
        "user_id",
        "code_hmac",
        "code_salt",
        "attempts",
        "created_at",
        "expires_at",
    } <= set(record)
    assert set(record) <= {
        "status",
        "email_hash",
        "user_id",
        "email",
        "code_hmac",
        "code_salt",
        "attempts",
        "created_at",
        "expires_at",
        "device_session_id",
        "session_token",
    }
    assert record["attempts"] == "0"
    assert re.fullmatch(r"[0-9a-f]{64}", record["code_hmac"])
    assert record["code_hmac"] != sha256_hex(code)  # salted, not a bare hash
    assert record["code_salt"]
    assert parse_ts(record["created_at"]) == ms(app.clock.now())
    assert parse_ts(record["expires_at"]) == parse_ts(body["expires_at"])
    assert "device_session_id" not in record
    assert "session_token" not in record
    # The plain code is nowhere in Redis (neither key names nor values).
    standalone = re.compile(rf"(?<![0-9]){code}(?![0-9])")
    everything = dump_redis(app.redis)
    assert not standalone.search(repr(everything)), everything


async def test_two_challenges_of_the_same_code_have_different_salted_hmacs(
    make_app: AppFactory,
) -> None:
    mail = FakeMail()
    app = await make_app(users=FakeUsers(), mail=mail)
    first = await send(app, "one@example.com")
    second = await send(app, "two@example.com")
    one, two = (
        challenge_record(app, first["challenge_id"]),
        challenge_record(app, second["challenge_id"]),
    )
    assert one["code_salt"] != two["code_salt"]
    assert one["code_hmac"] != two["code_hmac"]


@pytest.mark.parametrize("throttled", [False, True], ids=["sent", "throttled"])
async def test_challenge_key_expires_at_expires_at_plus_retention(
    make_app: AppFactory, throttled: bool
) -> None:
    app = await make_app(
        users=FakeUsers(), mail=FakeMail(), CHALLENGE_TTL="2m", CHALLENGE_RETENTION="30m"
    )
    body = await send(app, "jane@example.com")
    if throttled:
        body = await send(app, "jane@example.com")
        assert challenge_record(app, body["challenge_id"])["status"] == "delivery_throttled"

    expires_at = parse_ts(body["expires_at"])
    assert expires_at == ms(app.clock.now() + timedelta(minutes=2))
    deadline = expires_at + timedelta(minutes=30)
    expected_ms = (deadline - datetime.now(UTC)).total_seconds() * 1000
    pttl = app.redis.pttl(challenge_key(body["challenge_id"]))
    assert abs(pttl - expected_ms) <= 2000, (pttl, expected_ms)


async def test_existing_blocked_and_unknown_addresses_cost_the_same_redis_work(
    make_app: AppFactory,
) -> None:
    # Timing must not tell the outcomes apart (CONTRACT §12/§3), so each non-throttled
    # outcome sends Redis the same commands; only the mail call differs.
    users = FakeUsers(
        {"jane@example.com": "usr-jane", "bad@example.com": "usr-bad"}, blocked={"usr-bad"}
    )
    app = await make_app(users=users, mail=FakeMail(), SIGNUP_ENABLED=False)

    def commands() -> dict[str, int]:
        stats = cast(dict[str, dict[str, int]], app.redis.info("commandstats"))
        return {name: int(v["calls"]) for name, v in stats.items()}

    emails = ("jane@example.com", "bad@example.com", "nobody@example.com")
    for email in emails:  # once to load the scripts, then with the windows cleared
        assert (await app.public.post(SEND, json={"email": email})).status_code == 200
    for key in app.redis.scan_iter("authsession:throttle*"):
        app.redis.delete(key)
    work = {}
    for email in emails:
        before = commands()
        assert (await app.public.post(SEND, json={"email": email})).status_code == 200
        after = commands()
        work[email] = {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k)}
        work[email].pop("cmdstat_info", None)
    assert work["bad@example.com"] == work["jane@example.com"]
    assert work["nobody@example.com"] == work["jane@example.com"]
