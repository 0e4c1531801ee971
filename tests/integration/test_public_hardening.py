"""Public listener hardening (CONTRACT §3, §4): CORS, the per-client-IP rate limit shared
through Redis, and ``X-Forwarded-For`` from trusted proxies. In process over a real
redis-server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest

from tests.integration.conftest import AppEnv, AppFactory, ManualClock
from tests.integration.test_confirm import session_record
from tests.integration.test_send_email_code import CONFIRM, SEND, assert_error

ALLOWED = "https://app.example.com"
OTHER_ALLOWED = "http://localhost:3000"
STRANGER = "https://evil.example.net"


def preflight(app: AppEnv, origin: str, path: str = CONFIRM) -> httpx.Request:
    return app.public.build_request(
        "OPTIONS",
        path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )


async def bad_send(app: AppEnv, **headers: str) -> httpx.Response:
    """A cheap public request (400) that the rate limit still counts."""
    return await app.public.post(SEND, json={}, headers=headers)


# --------------------------------------------------------------------------- CORS
@pytest.fixture
async def cors_app(make_app: AppFactory) -> AppEnv:
    return await make_app(PUBLIC_CORS_ALLOWED_ORIGINS=f"{ALLOWED},{OTHER_ALLOWED}")


@pytest.mark.parametrize("origin", [ALLOWED, OTHER_ALLOWED])
async def test_preflight_from_an_allowed_origin_is_answered(cors_app: AppEnv, origin: str) -> None:
    response = await cors_app.public.send(preflight(cors_app, origin))

    assert response.status_code in (200, 204)
    assert response.headers["access-control-allow-origin"] == origin
    assert "POST" in response.headers["access-control-allow-methods"]
    assert "content-type" in response.headers["access-control-allow-headers"].lower()
    assert response.headers["cache-control"] == "no-store"


async def test_actual_request_from_an_allowed_origin_gets_cors_headers(cors_app: AppEnv) -> None:
    response = await cors_app.public.post(
        SEND, json={"email": "jane@example.com"}, headers={"Origin": ALLOWED}
    )

    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ALLOWED
    exposed = response.headers["access-control-expose-headers"].lower()
    assert "x-request-id" in exposed
    assert "retry-after" in exposed


async def test_disallowed_origin_gets_no_cors_headers(cors_app: AppEnv) -> None:
    actual = await cors_app.public.post(
        SEND, json={"email": "jane@example.com"}, headers={"Origin": STRANGER}
    )
    pre = await cors_app.public.send(preflight(cors_app, STRANGER))

    assert actual.status_code == 200  # CORS is enforced by the browser
    assert "access-control-allow-origin" not in actual.headers
    assert "access-control-allow-origin" not in pre.headers
    assert pre.status_code >= 400


async def test_disallowed_preflight_error_has_the_contract_error_body(cors_app: AppEnv) -> None:
    response = await cors_app.public.send(preflight(cors_app, STRANGER))

    assert response.status_code >= 400
    assert response.headers["content-type"].startswith("application/json")
    assert set(response.json()) == {"error"}


async def test_without_allowed_origins_there_are_no_cors_headers(app: AppEnv) -> None:
    actual = await app.public.post(
        SEND, json={"email": "jane@example.com"}, headers={"Origin": ALLOWED}
    )
    pre = await app.public.send(preflight(app, ALLOWED))

    assert actual.status_code == 200
    for response in (actual, pre):
        assert not any(h.lower().startswith("access-control-") for h in response.headers)
    assert_error(pre, 405, "method_not_allowed")


async def test_rate_limited_answer_carries_cors_headers_for_an_allowed_origin(
    make_app: AppFactory,
) -> None:
    app = await make_app(PUBLIC_CORS_ALLOWED_ORIGINS=ALLOWED, PUBLIC_RATE_LIMIT="1/m")
    await bad_send(app, Origin=ALLOWED)

    limited = await bad_send(app, Origin=ALLOWED)

    assert_error(limited, 429, "rate_limited")
    assert limited.headers["access-control-allow-origin"] == ALLOWED
    # A preflight is never counted against the limit.
    assert (await app.public.send(preflight(app, ALLOWED))).status_code in (200, 204)


# --------------------------------------------------------------------------- rate limit
async def test_fourth_request_in_the_window_is_429_with_retry_after(make_app: AppFactory) -> None:
    app = await make_app(PUBLIC_RATE_LIMIT="3/m")
    first = await app.public.post(SEND, json={"email": "jane@example.com"})
    second = await app.public.post(CONFIRM, json={"challenge_id": "A" * 32, "code": "123456"})
    third = await bad_send(app)

    fourth = await bad_send(app)

    assert [first.status_code, second.status_code, third.status_code] == [200, 404, 400]
    error = assert_error(fourth, 429, "rate_limited")
    assert "details" not in error or error["details"]
    retry_after = fourth.headers["retry-after"]
    assert retry_after.isdigit()
    assert 1 <= int(retry_after) <= 60
    assert fourth.headers["cache-control"] == "no-store"
    assert fourth.headers["x-request-id"]
    # Both endpoints share the budget.
    assert_error(
        await app.public.post(CONFIRM, json={"challenge_id": "A" * 32, "code": "123456"}),
        429,
        "rate_limited",
    )


async def test_retry_after_counts_down_to_the_next_window(make_app: AppFactory) -> None:
    now = datetime.now(UTC)
    clock = ManualClock(now.replace(second=5, microsecond=0) + timedelta(minutes=1))
    app = await make_app(PUBLIC_RATE_LIMIT="1/m", clock=clock)
    await bad_send(app)

    assert (await bad_send(app)).headers["retry-after"] == "55"
    clock.advance(timedelta(seconds=10))
    assert (await bad_send(app)).headers["retry-after"] == "45"
    clock.advance(timedelta(seconds=44, milliseconds=500))
    assert (await bad_send(app)).headers["retry-after"] == "1"
    clock.advance(timedelta(milliseconds=500))
    assert (await bad_send(app)).status_code == 400  # a new window


async def test_rate_limit_is_counted_per_client_ip(make_app: AppFactory) -> None:
    one = await make_app(PUBLIC_RATE_LIMIT="3/m", client_ip="198.51.100.1")
    two = await make_app(PUBLIC_RATE_LIMIT="3/m", client_ip="198.51.100.2", clock=one.clock)
    for _ in range(3):
        assert (await bad_send(one)).status_code == 400
    assert_error(await bad_send(one), 429, "rate_limited")

    assert [(await bad_send(two)).status_code for _ in range(4)] == [400, 400, 400, 429]


async def test_rate_limit_is_shared_by_two_instances_through_redis(make_app: AppFactory) -> None:
    one = await make_app(PUBLIC_RATE_LIMIT="3/m", client_ip="198.51.100.1")
    two = await make_app(PUBLIC_RATE_LIMIT="3/m", client_ip="198.51.100.1", clock=one.clock)

    statuses = [
        (await bad_send(one)).status_code,
        (await bad_send(two)).status_code,
        (await bad_send(one)).status_code,
    ]

    assert statuses == [400, 400, 400]
    assert_error(await bad_send(two), 429, "rate_limited")
    assert_error(await bad_send(one), 429, "rate_limited")


async def test_no_rate_limit_by_default(app: AppEnv) -> None:
    statuses = {(await bad_send(app)).status_code for _ in range(40)}
    assert statuses == {400}


# --------------------------------------------------------------------------- proxies
async def confirm_with_headers(app: AppEnv, **headers: str) -> dict[str, str]:
    challenge_id, code = await app.send_code("jane@example.com")
    assert code is not None
    response = await app.public.post(
        CONFIRM, json={"challenge_id": challenge_id, "code": code}, headers=headers
    )
    assert response.status_code == 200, response.text
    return session_record(app, response.json()["device_session_id"])


async def test_forwarded_for_from_a_trusted_proxy_is_the_client_ip(make_app: AppFactory) -> None:
    app = await make_app(client_ip="10.1.2.3", TRUSTED_PROXIES="10.0.0.0/8,192.0.2.1")

    record = await confirm_with_headers(
        app, **{"X-Forwarded-For": "198.51.100.23", "User-Agent": "pytest-agent/1"}
    )

    assert record["client_ip"] == "198.51.100.23"
    assert record["user_agent"] == "pytest-agent/1"
    listed = await app.internal.get(f"/api/v1/internal/sessions/{record['device_session_id']}")
    assert listed.json()["client_ip"] == "198.51.100.23"


async def test_forwarded_for_chain_yields_the_nearest_untrusted_hop(make_app: AppFactory) -> None:
    app = await make_app(client_ip="10.1.2.3", TRUSTED_PROXIES="10.0.0.0/8")

    record = await confirm_with_headers(
        app, **{"X-Forwarded-For": "6.6.6.6, 198.51.100.23, 10.9.9.9"}
    )

    assert record["client_ip"] == "198.51.100.23"


async def test_forwarded_for_in_several_header_lines_is_read_as_one_list(
    make_app: AppFactory,
) -> None:
    app = await make_app(client_ip="10.1.2.3", TRUSTED_PROXIES="10.0.0.0/8")
    challenge_id, code = await app.send_code("jane@example.com")

    # The client forged the first line; the trusted proxy added the second (HAProxy's
    # `option forwardfor` adds a header line rather than extending the existing one).
    response = await app.public.post(
        CONFIRM,
        json={"challenge_id": challenge_id, "code": code},
        headers=[("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-For", "198.51.100.23")],
    )

    assert response.status_code == 200, response.text
    assert session_record(app, response.json()["device_session_id"])["client_ip"] == (
        "198.51.100.23"
    )


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(make_app: AppFactory) -> None:
    app = await make_app(client_ip="203.0.113.7", TRUSTED_PROXIES="10.0.0.0/8")

    record = await confirm_with_headers(app, **{"X-Forwarded-For": "198.51.100.23"})

    assert record["client_ip"] == "203.0.113.7"


async def test_forwarded_for_is_ignored_without_trusted_proxies(make_app: AppFactory) -> None:
    app = await make_app(client_ip="10.1.2.3")

    record = await confirm_with_headers(app, **{"X-Forwarded-For": "198.51.100.23"})

    assert record["client_ip"] == "10.1.2.3"


async def test_rate_limit_behind_a_trusted_proxy_counts_forwarded_clients_apart(
    make_app: AppFactory,
) -> None:
    app = await make_app(
        client_ip="10.1.2.3", TRUSTED_PROXIES="10.0.0.0/8", PUBLIC_RATE_LIMIT="2/m"
    )
    alice = {"X-Forwarded-For": "198.51.100.1"}
    bob = {"X-Forwarded-For": "198.51.100.2"}

    alice_statuses = [(await bad_send(app, **alice)).status_code for _ in range(3)]
    bob_statuses = [(await bad_send(app, **bob)).status_code for _ in range(3)]

    assert alice_statuses == [400, 400, 429]
    assert bob_statuses == [400, 400, 429]


async def test_rate_limit_ignores_forwarded_for_from_an_untrusted_peer(
    make_app: AppFactory,
) -> None:
    app = await make_app(
        client_ip="203.0.113.7", TRUSTED_PROXIES="10.0.0.0/8", PUBLIC_RATE_LIMIT="2/m"
    )

    statuses = [
        (await bad_send(app, **{"X-Forwarded-For": f"198.51.100.{i}"})).status_code
        for i in range(3)
    ]

    assert statuses == [400, 400, 429]  # spoofed addresses do not buy a fresh budget


# --------------------------------------------------------------------------- IPv6 buckets
PROXY = {"client_ip": "10.1.2.3", "TRUSTED_PROXIES": "10.0.0.0/8"}


async def test_ipv6_clients_of_one_64_share_one_bucket(make_app: AppFactory) -> None:
    app = await make_app(PUBLIC_RATE_LIMIT="2/m", **PROXY)
    rotating = [f"2001:db8:1:2:{i:x}::{i + 1:x}" for i in range(3)]

    statuses = [(await bad_send(app, **{"X-Forwarded-For": ip})).status_code for ip in rotating]

    assert statuses == [400, 400, 429]  # a new address in the same /64 buys nothing
    other_network = {"X-Forwarded-For": "2001:db8:1:3::1"}
    assert (await bad_send(app, **other_network)).status_code == 400


async def test_ipv6_bucket_is_the_network_address_in_the_redis_key(make_app: AppFactory) -> None:
    app = await make_app(PUBLIC_RATE_LIMIT="5/m", **PROXY)
    # Two spellings of one address, and an IPv4-mapped IPv4 client.
    await bad_send(app, **{"X-Forwarded-For": "2001:0db8:0001:0002:0000:0000:0000:00ff"})
    await bad_send(app, **{"X-Forwarded-For": "2001:db8:1:2::ff"})
    await bad_send(app, **{"X-Forwarded-For": "::ffff:198.51.100.9"})

    prefix = app.settings.REDIS_KEY_PREFIX + "ratelimit:"
    keys = sorted(app.redis.scan_iter(f"{prefix}*"))
    buckets = sorted(key.removeprefix(prefix).rpartition(":")[0] for key in keys)
    assert buckets == ["198.51.100.9", "2001-db8-1-2--/64"]
    counts = {key.removeprefix(prefix).rpartition(":")[0]: app.redis.get(key) for key in keys}
    assert counts["2001-db8-1-2--/64"] == "2"
    for key in keys:
        window = key.rpartition(":")[2]
        assert window.isdigit(), key
        assert key.count(":") == prefix.count(":") + 1, key  # no ":" inside the bucket


@pytest.mark.parametrize(
    ("prefix_length", "second", "shared"),
    [(48, "2001:db8:1:ffff::1", True), (128, "2001:db8:1:2::2", False)],
    ids=["48-shares-a-site", "128-per-address"],
)
async def test_ipv6_prefix_length_is_configurable(
    make_app: AppFactory, prefix_length: int, second: str, shared: bool
) -> None:
    app = await make_app(
        PUBLIC_RATE_LIMIT="1/m", PUBLIC_RATE_LIMIT_IPV6_PREFIX=prefix_length, **PROXY
    )
    assert (await bad_send(app, **{"X-Forwarded-For": "2001:db8:1:2::1"})).status_code == 400

    status = (await bad_send(app, **{"X-Forwarded-For": second})).status_code

    assert status == (429 if shared else 400)


async def test_ipv6_peer_without_a_proxy_is_bucketed_by_its_64(make_app: AppFactory) -> None:
    one = await make_app(PUBLIC_RATE_LIMIT="1/m", client_ip="2001:db8:9:9::1")
    two = await make_app(PUBLIC_RATE_LIMIT="1/m", client_ip="2001:db8:9:9::2", clock=one.clock)
    assert (await bad_send(one)).status_code == 400
    assert_error(await bad_send(two), 429, "rate_limited")
