"""SessionVerifier against a real redis-server (CONTRACT §9 authentication, §10 reasons)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio

from authsession.gateway import Principal, Rejection, SessionVerifier, split_token
from authsession.gateway.snapshot import SessionSnapshot
from authsession.redis.projection import RedisProjectionPublisher
from tests.gateway.conftest import PREFIX, AppFactory, Publish, async_client, issue
from tests.support.redis_server import RedisServer

INTERNAL = "/api/v1/internal"


async def test_valid_token_gives_the_principal(
    aredis: redis.asyncio.Redis, publish: Publish
) -> None:
    issued = await publish(issue())

    result = await SessionVerifier(aredis).verify(issued.token)

    assert result == Principal(
        user_id=issued.session.user_id,
        device_session_id=issued.device_session_id,
        # The snapshot keeps milliseconds.
        expires_at=issued.session.expires_at.replace(
            microsecond=issued.session.expires_at.microsecond // 1000 * 1000
        ),
        version=1,
    )


@pytest.mark.parametrize("token", [None, ""])
async def test_missing_token(aredis: redis.asyncio.Redis, token: str | None) -> None:
    assert await SessionVerifier(aredis).verify(token) == Rejection("missing_token")


MALFORMED = {
    "no dot": "A" * 32 + "secret",
    "empty id": ".secretsecret",
    "empty secret": "A" * 32 + ".",
    "short id": "abc.secret",
    "long id": "A" * 65 + ".secret",
    "id with bad characters": "A" * 20 + "!$" + ".secret",
    "dot inside the id": "A" * 16 + "." + "B" * 16 + ".secret",
    "space in the secret": "A" * 32 + ".sec ret",
    "non-ASCII secret": "A" * 32 + ".sécret",
    "absurd length": "A" * 32 + "." + "s" * 10_000,
}


@pytest.mark.parametrize("token", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_tokens_never_reach_redis(token: str) -> None:
    # A client on a port nobody listens on: any Redis read would be an internal_error.
    client = redis.asyncio.Redis(host="127.0.0.1", port=1, decode_responses=True)
    try:
        assert await SessionVerifier(client).verify(token) == Rejection("malformed_token")
    finally:
        await client.aclose()


def test_split_at_the_last_dot() -> None:
    # The id cannot contain a dot, so the last dot is the only one a real token has; a
    # dot earlier makes the id part invalid.
    assert split_token("A" * 16 + ".s3cr3t_-") == ("A" * 16, "s3cr3t_-")
    assert split_token("A" * 16 + "." + "B" * 16 + ".x") is None


async def test_unknown_session(aredis: redis.asyncio.Redis) -> None:
    token = issue().token  # well formed, never published

    assert await SessionVerifier(aredis).verify(token) == Rejection("unknown_session")


async def test_wrong_secret_fails_verification(
    aredis: redis.asyncio.Redis, publish: Publish
) -> None:
    issued = await publish(issue())
    forged = issued.device_session_id + ".AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"

    assert await SessionVerifier(aredis).verify(forged) == Rejection("verification_failed")


async def test_hash_is_checked_before_the_status(
    aredis: redis.asyncio.Redis, publish: Publish
) -> None:
    issued = await publish(issue())
    await publish(issued.revoked())
    forged = issued.device_session_id + ".guess"

    # Someone without the token must not learn that the session was revoked.
    assert await SessionVerifier(aredis).verify(forged) == Rejection("verification_failed")


@pytest.mark.parametrize(
    "document",
    [
        "not json",
        "[1, 2]",
        '{"device_session_id": "x"}',
        "MISSING_VERSION",
        "BAD_EXPIRY",
        "NAIVE_EXPIRY",
        "BOOL_VERSION",
        "SHORT_HASH",
    ],
)
async def test_unreadable_snapshot_fails_verification(
    aredis: redis.asyncio.Redis, publish: Publish, document: str
) -> None:
    issued = await publish(issue())
    key = PREFIX + issued.device_session_id
    raw = await aredis.get(key)
    assert raw is not None
    doc = json.loads(raw)
    if document == "MISSING_VERSION":
        del doc["version"]
    elif document == "BAD_EXPIRY":
        doc["expires_at"] = "tomorrow"
    elif document == "NAIVE_EXPIRY":
        doc["expires_at"] = "2099-01-01T00:00:00"
    elif document == "BOOL_VERSION":
        doc["version"] = True
    elif document == "SHORT_HASH":
        doc["token_sha256"] = "abc"
    if document.isupper():
        document = json.dumps(doc)
    await aredis.set(key, document, keepttl=True)

    assert await SessionVerifier(aredis).verify(issued.token) == Rejection("verification_failed")


async def test_snapshot_of_another_session_fails_verification(
    aredis: redis.asyncio.Redis, publish: Publish
) -> None:
    # A snapshot under the wrong key (a copy, a bad migration) is not trusted.
    issued = await publish(issue())
    other = issue()
    raw = await aredis.get(PREFIX + issued.device_session_id)
    assert raw is not None
    await aredis.set(PREFIX + other.device_session_id, raw, ex=60)
    token = other.device_session_id + "." + issued.token.rpartition(".")[2]

    assert await SessionVerifier(aredis).verify(token) == Rejection("verification_failed")


async def test_revoked_session(aredis: redis.asyncio.Redis, publish: Publish) -> None:
    issued = await publish(issue())
    await publish(issued.revoked())

    assert await SessionVerifier(aredis).verify(issued.token) == Rejection("revoked")


async def test_expired_by_the_verifiers_clock(
    aredis: redis.asyncio.Redis, publish: Publish
) -> None:
    issued = await publish(issue(ttl=timedelta(minutes=5)))
    expires_at = issued.session.expires_at

    # The key lives until expires_at, so only a clock ahead of Redis (or a cache) sees an
    # expired snapshot; a clock parameter stands for that.
    at_expiry = SessionVerifier(aredis, clock=lambda: expires_at.replace(microsecond=999_999))
    just_before = SessionVerifier(aredis, clock=lambda: expires_at - timedelta(seconds=1))

    assert await at_expiry.verify(issued.token) == Rejection("expired")
    assert isinstance(await just_before.verify(issued.token), Principal)


async def test_expired_in_real_time(aredis: redis.asyncio.Redis, publish: Publish) -> None:
    issued = await publish(issue(ttl=timedelta(milliseconds=300)))
    verifier = SessionVerifier(aredis)
    assert isinstance(await verifier.verify(issued.token), Principal)

    # Read the snapshot while it is still there, check it after its expiry: this is the
    # path a gateway hits when its local view (or a slow reply) outlives expires_at.
    raw = await aredis.get(PREFIX + issued.device_session_id)
    assert raw is not None
    held = SessionSnapshot.from_json(raw)

    class Held:
        def cached(self, device_session_id: str) -> SessionSnapshot | None:
            return held if device_session_id == held.device_session_id else None

    while datetime.now(UTC) <= issued.session.expires_at:
        await asyncio.sleep(0.05)
    assert await SessionVerifier(aredis, cache=Held()).verify(issued.token) == Rejection("expired")
    # Redis dropped the key at expires_at: a plain read no longer finds the session.
    assert await verifier.verify(issued.token) == Rejection("unknown_session")


async def test_redis_down_is_an_internal_error(dedicated_redis: RedisServer) -> None:
    client = async_client(dedicated_redis)
    try:
        verifier = SessionVerifier(client)
        assert await verifier.verify(issue().token) == Rejection("unknown_session")

        dedicated_redis.kill()
        result = await verifier.verify(issue().token)

        assert result == Rejection("internal_error")
        assert isinstance(result, Rejection)
        assert "Error" in result.detail  # the exception type, for the gateway's logs
    finally:
        await client.aclose()


async def test_hung_redis_is_an_internal_error_within_the_timeout(
    dedicated_redis: RedisServer,
) -> None:
    client = async_client(dedicated_redis)
    try:
        verifier = SessionVerifier(client, timeout=0.2)
        assert await verifier.verify(issue().token) == Rejection("unknown_session")
        dedicated_redis.pause()

        result = await verifier.verify(issue().token)

        assert result == Rejection("internal_error")
    finally:
        dedicated_redis.resume()
        await client.aclose()


async def test_bytes_client(redis_server: RedisServer, publish: Publish) -> None:
    issued = await publish(issue())
    client = async_client(redis_server, decode_responses=False)
    try:
        result = await SessionVerifier(client).verify(issued.token)
    finally:
        await client.aclose()

    assert isinstance(result, Principal)


async def test_other_key_prefix(aredis: redis.asyncio.Redis) -> None:
    issued = issue()
    publisher = RedisProjectionPublisher(aredis, "gw:s:", "gw:events", 100)
    await publisher.publish(issued.session, datetime.now(UTC))

    assert isinstance(
        await SessionVerifier(aredis, key_prefix="gw:s:").verify(issued.token), Principal
    )
    assert await SessionVerifier(aredis).verify(issued.token) == Rejection("unknown_session")


# --------------------------------------------------------------------------- end to end


async def test_login_then_revoke_through_the_service(
    make_app: AppFactory, aredis: redis.asyncio.Redis
) -> None:
    app = await make_app()
    body = await app.login("gateway-e2e@example.com")
    verifier = SessionVerifier(aredis)

    principal = await verifier.verify(body["session_token"])

    assert isinstance(principal, Principal)
    assert principal.user_id == body["user_id"]
    assert principal.device_session_id == body["device_session_id"]
    assert principal.version == 1

    response = await app.internal.post(f"{INTERNAL}/sessions/{body['device_session_id']}/revoke")
    assert response.status_code == 200, response.text

    assert await verifier.verify(body["session_token"]) == Rejection("revoked")


async def test_service_token_with_another_secret(
    make_app: AppFactory, aredis: redis.asyncio.Redis
) -> None:
    app = await make_app()
    body = await app.login("gateway-forge@example.com")
    secret = body["session_token"].rpartition(".")[2]
    forged = body["device_session_id"] + "." + ("B" if secret[0] == "A" else "A") + secret[1:]

    assert await SessionVerifier(aredis).verify(forged) == Rejection("verification_failed")
