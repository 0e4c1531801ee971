"""HTTP conventions of both listeners (CONTRACT §4), against the real process.

One authsession process (stub user/mail services, the session's real redis-server) serves
the whole module (per xdist worker): every test here only reads or sends invalid requests.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.contract import CONFIRM, SEND
from tests.support.net import LOOPBACK, free_ports
from tests.support.process import AuthsessionProcess
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.e2e

MAX_BODY = 16 * 1024
SID = "Abcdefghijklmnop_-0123"  # a well-formed (unknown) device_session_id / challenge_id
REVOKE = f"/api/v1/internal/sessions/{SID}/revoke"
EXTEND = f"/api/v1/internal/sessions/{SID}/extend"
SESSION = f"/api/v1/internal/sessions/{SID}"
USER = "user-1"
LIST = f"/api/v1/internal/users/{USER}/sessions"
REVOKE_ALL = f"/api/v1/internal/users/{USER}/sessions/revoke"
BLOCK = f"/api/v1/internal/users/{USER}/block"
JSON = {"Content-Type": "application/json"}
SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
ID_FORM = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def service(redis_server: RedisServer) -> Iterator[AuthsessionProcess]:
    """One process for the module: stub services, real Redis, free loopback ports."""
    public, internal = free_ports(2)
    process = AuthsessionProcess(
        {
            "AUTHSESSION_REDIS_ADDR": redis_server.addr,
            "AUTHSESSION_PUBLIC_HTTP_ADDR": f"{LOOPBACK}:{public}",
            "AUTHSESSION_INTERNAL_HTTP_ADDR": f"{LOOPBACK}:{internal}",
            "AUTHSESSION_LOG_FORMAT": "json",
            "AUTHSESSION_REDIS_KEY_PREFIX": f"conv-{secrets.token_hex(4)}:",
        },
        public_port=public,
        internal_port=internal,
    )
    try:
        process.start()
        process.wait_ready()
        yield process
    finally:
        process.close()


@pytest.fixture(scope="module")
def clients(service: AuthsessionProcess) -> Iterator[dict[str, httpx.Client]]:
    with (
        httpx.Client(base_url=service.public_url, timeout=10) as public,
        httpx.Client(base_url=service.internal_url, timeout=10) as internal,
    ):
        yield {"public": public, "internal": internal}


@pytest.fixture(autouse=True)
def _alive(service: AuthsessionProcess) -> Iterator[None]:
    """Every test leaves the shared process running (a crash would fail later tests)."""
    yield
    assert service.is_running(), service.output_report()


# --------------------------------------------------------------------------- helpers


def assert_conventions(response: httpx.Response) -> None:
    """What every response carries (CONTRACT §4)."""
    assert response.headers.get("cache-control") == "no-store", response.headers
    request_id = response.headers.get("x-request-id")
    assert request_id, response.headers
    assert SANE_ID.match(request_id), request_id


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """``status`` with exactly ``{"error": {"code", "message", "details"?}}``."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers.get("content-type", "").startswith("application/json")
    body = response.json()
    assert isinstance(body, dict)
    assert list(body) == ["error"], body
    error = body["error"]
    assert isinstance(error, dict)
    assert set(error) <= {"code", "message", "details"}, error
    assert error["code"] == code, error
    assert isinstance(error["message"], str)
    assert error["message"].strip()
    if "details" in error:
        assert isinstance(error["details"], dict)
    assert "Traceback" not in response.text
    assert_conventions(response)
    return dict(error)


# --------------------------------------------------------------------------- 400


class Case:
    """One invalid request: listener, method, path, and either a JSON value or raw bytes."""

    def __init__(
        self,
        listener: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        content_type: str | None = "application/json",
        method: str = "POST",
    ) -> None:
        self.listener = listener
        self.path = path
        self.method = method
        self.json = json
        self.content = content
        self.content_type = content_type

    def send(self, clients: dict[str, httpx.Client]) -> httpx.Response:
        client = clients[self.listener]
        if self.method == "GET":
            return client.get(self.path)
        headers = {"Content-Type": self.content_type} if self.content_type else {}
        if self.content is None and self.json is not None:
            content = httpx.Request("POST", "/", json=self.json).content
        else:
            content = self.content or b""
        return client.request(self.method, self.path, content=content, headers=headers)


def pub(path: str, json: Any = None, **kw: Any) -> Case:
    return Case("public", path, json=json, **kw)


def intl(path: str, json: Any = None, **kw: Any) -> Case:
    return Case("internal", path, json=json, **kw)


OK_EMAIL = "jane@example.com"
INVALID_REQUESTS: list[Any] = [
    # --- public: send-email-code
    pytest.param(pub(SEND, content=b"{bad json"), id="send-malformed-json"),
    pytest.param(pub(SEND, content=b'{"email": "jane@example.com"'), id="send-truncated-json"),
    pytest.param(pub(SEND, content=b"\xff\xfe{}"), id="send-not-utf8"),
    pytest.param(
        pub(SEND, content=b'{"email": "jane@example.com"} trailing'), id="send-trailing-garbage"
    ),
    pytest.param(
        pub(SEND, content=b'{"email": ' + b"[" * 8000 + b"]" * 8000 + b"}"),
        id="send-deeply-nested",
    ),
    pytest.param(pub(SEND, content=b'{"email": ' + b"9" * 5000 + b"}"), id="send-huge-number"),
    pytest.param(pub(SEND, content=b'{"email": NaN}'), id="send-nan"),
    pytest.param(pub(SEND, {"email": 5}), id="send-email-int"),
    pytest.param(pub(SEND, {"email": ["jane@example.com"]}), id="send-email-list"),
    pytest.param(pub(SEND, {"email": None}), id="send-email-null"),
    pytest.param(pub(SEND, {"email": OK_EMAIL, "locale": 5}), id="send-locale-int"),
    pytest.param(pub(SEND, {}), id="send-missing-email"),
    pytest.param(pub(SEND, {"locale": "en"}), id="send-only-locale"),
    pytest.param(pub(SEND, {"email": OK_EMAIL, "name": "Jane"}), id="send-unknown-field"),
    pytest.param(pub(SEND, {"Email": OK_EMAIL}), id="send-field-case"),
    pytest.param(pub(SEND, {"email": "not-an-email"}), id="send-email-no-at"),
    pytest.param(pub(SEND, {"email": "jane@"}), id="send-email-no-domain"),
    pytest.param(pub(SEND, {"email": "@example.com"}), id="send-email-no-local"),
    pytest.param(pub(SEND, {"email": "jane@@example.com"}), id="send-email-double-at"),
    pytest.param(pub(SEND, {"email": "jane doe@example.com"}), id="send-email-space"),
    pytest.param(pub(SEND, {"email": ""}), id="send-email-empty"),
    pytest.param(pub(SEND, {"email": "   "}), id="send-email-blank"),
    pytest.param(pub(SEND, {"email": "a" * 250 + "@example.com"}), id="send-email-too-long"),
    pytest.param(pub(SEND, {"email": OK_EMAIL, "locale": "x" * 36}), id="send-locale-too-long"),
    pytest.param(pub(SEND, {"email": OK_EMAIL, "locale": "en US"}), id="send-locale-bad-form"),
    pytest.param(pub(SEND, content=b"null"), id="send-null-body"),
    pytest.param(pub(SEND, content=b"[]"), id="send-array-body"),
    pytest.param(pub(SEND, content=b'[{"email": "jane@example.com"}]'), id="send-array-of-obj"),
    pytest.param(pub(SEND, content=b'"jane@example.com"'), id="send-string-body"),
    pytest.param(pub(SEND, content=b"5"), id="send-number-body"),
    pytest.param(pub(SEND, content=b""), id="send-empty-body"),
    pytest.param(
        pub(SEND, content=b'{"email": "jane@example.com"}', content_type="text/plain"),
        id="send-text-plain",
    ),
    pytest.param(
        pub(
            SEND,
            content=b"email=jane%40example.com",
            content_type="application/x-www-form-urlencoded",
        ),
        id="send-form-encoded",
    ),
    pytest.param(
        pub(SEND, content=b'{"email": "jane@example.com"}', content_type=None),
        id="send-no-content-type",
    ),
    # --- public: confirm
    pytest.param(pub(CONFIRM, content=b"{bad json"), id="confirm-malformed-json"),
    pytest.param(pub(CONFIRM, {"challenge_id": 1, "code": 123456}), id="confirm-ints"),
    pytest.param(pub(CONFIRM, {"challenge_id": SID, "code": 123456}), id="confirm-code-int"),
    pytest.param(pub(CONFIRM, {"challenge_id": SID, "code": None}), id="confirm-code-null"),
    pytest.param(pub(CONFIRM, {"challenge_id": SID}), id="confirm-missing-code"),
    pytest.param(pub(CONFIRM, {"code": "123456"}), id="confirm-missing-challenge"),
    pytest.param(pub(CONFIRM, {}), id="confirm-empty-object"),
    pytest.param(
        pub(CONFIRM, {"challenge_id": SID, "code": "123456", "remember": True}),
        id="confirm-unknown-field",
    ),
    pytest.param(pub(CONFIRM, {"challenge_id": "short", "code": "123456"}), id="confirm-id-short"),
    pytest.param(pub(CONFIRM, {"challenge_id": "a" * 15, "code": "123456"}), id="confirm-id-15"),
    pytest.param(pub(CONFIRM, {"challenge_id": "a" * 65, "code": "123456"}), id="confirm-id-65"),
    pytest.param(
        pub(CONFIRM, {"challenge_id": "abcdefgh ijklmnopq", "code": "123456"}),
        id="confirm-id-space",
    ),
    pytest.param(
        pub(CONFIRM, {"challenge_id": "abcdefgh/ijklmnopq", "code": "123456"}),
        id="confirm-id-slash",
    ),
    pytest.param(
        pub(CONFIRM, {"challenge_id": "abcdefgh+ijklmnopq", "code": "123456"}),
        id="confirm-id-plus",
    ),
    pytest.param(
        pub(CONFIRM, {"challenge_id": "abcdefghéijklmnopq", "code": "123456"}),
        id="confirm-id-non-ascii",
    ),
    pytest.param(
        pub(CONFIRM, {"challenge_id": SID + "\n", "code": "123456"}), id="confirm-id-newline"
    ),
    pytest.param(pub(CONFIRM, {"challenge_id": SID, "code": "12345"}), id="confirm-code-5"),
    pytest.param(pub(CONFIRM, {"challenge_id": SID, "code": "1234567"}), id="confirm-code-7"),
    pytest.param(pub(CONFIRM, {"challenge_id": SID, "code": "12a456"}), id="confirm-code-letter"),
    pytest.param(
        pub(CONFIRM, {"challenge_id": SID, "code": "\uff11\uff12\uff13\uff14\uff15\uff16"}),
        id="confirm-code-fullwidth",
    ),
    pytest.param(
        pub(CONFIRM, {"challenge_id": SID, "code": "١٢٣٤٥٦"}), id="confirm-code-arabic-indic"
    ),
    pytest.param(pub(CONFIRM, {"challenge_id": SID, "code": ""}), id="confirm-code-empty"),
    pytest.param(pub(CONFIRM, {"challenge_id": SID, "code": " 123456"}), id="confirm-code-space"),
    pytest.param(pub(CONFIRM, {"challenge_id": SID, "code": "123456\n"}), id="confirm-code-nl"),
    pytest.param(pub(CONFIRM, {"challenge_id": SID, "code": "-12345"}), id="confirm-code-sign"),
    pytest.param(
        pub(CONFIRM, {"challenge_id": SID, "code": "123456", "device_name": "d" * 65}),
        id="confirm-device-name-too-long",
    ),
    pytest.param(
        pub(CONFIRM, {"challenge_id": SID, "code": "123456", "device_name": 7}),
        id="confirm-device-name-int",
    ),
    pytest.param(pub(CONFIRM, content=b"null"), id="confirm-null-body"),
    pytest.param(pub(CONFIRM, content=b"[]"), id="confirm-array-body"),
    pytest.param(
        pub(
            CONFIRM,
            content=b'{"challenge_id": "Abcdefghijklmnop_-0123", "code": "123456"}',
            content_type="text/plain",
        ),
        id="confirm-text-plain",
    ),
    # --- internal: bodies
    pytest.param(intl(REVOKE, content=b"{bad json"), id="revoke-malformed-json"),
    pytest.param(intl(REVOKE, {"reason": 5}), id="revoke-reason-int"),
    pytest.param(intl(REVOKE, {"reason": "Not Allowed"}), id="revoke-reason-form"),
    pytest.param(intl(REVOKE, {"reason": "r" * 65}), id="revoke-reason-too-long"),
    pytest.param(intl(REVOKE, {"reason": ""}), id="revoke-reason-empty"),
    pytest.param(intl(REVOKE, {"why": "test"}), id="revoke-unknown-field"),
    pytest.param(intl(REVOKE, content=b"[]"), id="revoke-array-body"),
    pytest.param(intl(REVOKE, content=b'"test"'), id="revoke-string-body"),
    pytest.param(
        intl(REVOKE, content=b'{"reason": "test"}', content_type="text/plain"),
        id="revoke-text-plain",
    ),
    pytest.param(
        intl(REVOKE, content=b"null"),
        id="revoke-null-body",
    ),
    pytest.param(intl(REVOKE_ALL, {"except_session_id": "short"}), id="revoke-all-except-form"),
    pytest.param(intl(REVOKE_ALL, {"except_session_id": 5}), id="revoke-all-except-int"),
    pytest.param(intl(REVOKE_ALL, {"reason": "x", "all": True}), id="revoke-all-unknown-field"),
    pytest.param(intl(REVOKE_ALL, content=b"{"), id="revoke-all-malformed-json"),
    pytest.param(intl(REVOKE_ALL, content=b"[]"), id="revoke-all-array-body"),
    pytest.param(
        intl(REVOKE_ALL, content=b"null"),
        id="revoke-all-null-body",
    ),
    pytest.param(intl(EXTEND, {"ttl": 3600}), id="extend-ttl-int"),
    pytest.param(intl(EXTEND, {"ttl": "forever"}), id="extend-ttl-form"),
    pytest.param(intl(EXTEND, {"ttl": "721h"}), id="extend-ttl-above-session-ttl"),
    pytest.param(intl(EXTEND, {"ttl": "0s"}), id="extend-ttl-zero"),
    pytest.param(intl(EXTEND, {"ttl": "1h", "until": "x"}), id="extend-unknown-field"),
    pytest.param(intl(EXTEND, content=b"[]"), id="extend-array-body"),
    pytest.param(
        intl(EXTEND, content=b"null"),
        id="extend-null-body",
    ),
    pytest.param(intl(BLOCK, {"reason": "UPPER"}), id="block-reason-form"),
    pytest.param(intl(BLOCK, {"reason": "fraud", "notify": True}), id="block-unknown-field"),
    pytest.param(intl(BLOCK, content=b"{bad"), id="block-malformed-json"),
    pytest.param(
        intl(BLOCK, content=b'{"reason": "fraud"}', content_type="text/plain"),
        id="block-text-plain",
    ),
    pytest.param(
        intl(BLOCK, content=b"null"),
        id="block-null-body",
    ),
    # --- internal: path parameters and query
    pytest.param(intl("/api/v1/internal/sessions/short", method="GET"), id="get-id-short"),
    pytest.param(intl("/api/v1/internal/sessions/" + "a" * 65, method="GET"), id="get-id-65"),
    pytest.param(
        intl("/api/v1/internal/sessions/abcdefgh%20ijklmnop", method="GET"), id="get-id-space"
    ),
    pytest.param(
        intl("/api/v1/internal/sessions/abcdefgh%C3%A9ijklmnop", method="GET"),
        id="get-id-non-ascii",
    ),
    pytest.param(intl("/api/v1/internal/sessions/short/revoke", {}), id="revoke-id-short"),
    pytest.param(intl("/api/v1/internal/sessions/short/extend", {}), id="extend-id-short"),
    pytest.param(intl("/api/v1/internal/users/a%20b/sessions", method="GET"), id="list-user-space"),
    pytest.param(
        intl("/api/v1/internal/users/" + "u" * 129 + "/sessions", method="GET"),
        id="list-user-129",
    ),
    pytest.param(
        intl("/api/v1/internal/users/j%C3%BCrgen/sessions", method="GET"), id="list-user-non-ascii"
    ),
    pytest.param(intl("/api/v1/internal/users/a%20b/block", {}), id="block-user-space"),
    pytest.param(
        intl("/api/v1/internal/users/" + "u" * 129 + "/sessions/revoke", {}),
        id="revoke-all-user-129",
    ),
    pytest.param(intl(LIST + "?status=bogus", method="GET"), id="list-status-bogus"),
]


@pytest.mark.parametrize("case", INVALID_REQUESTS)
def test_invalid_request_is_400(clients: dict[str, httpx.Client], case: Case) -> None:
    response = case.send(clients)
    assert response.status_code != 422
    assert_error(response, 400, "invalid_request")


def test_validation_details_do_not_echo_the_code(clients: dict[str, httpx.Client]) -> None:
    response = clients["public"].post(CONFIRM, json={"challenge_id": SID, "code": "98765x"})
    assert_error(response, 400, "invalid_request")
    assert "98765x" not in response.text


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "application/JSON"]
)
def test_json_content_types_are_accepted(
    clients: dict[str, httpx.Client], content_type: str
) -> None:
    response = clients["public"].post(
        SEND, content=b'{"email": "ct@example.com"}', headers={"Content-Type": content_type}
    )
    assert response.status_code == 200, response.text
    assert_conventions(response)


@pytest.mark.parametrize(
    "path", [REVOKE, REVOKE_ALL, EXTEND], ids=["revoke", "revoke-all", "extend"]
)
def test_internal_bodies_are_optional(clients: dict[str, httpx.Client], path: str) -> None:
    # No body at all is not a validation failure (the session is unknown, the user has none).
    response = clients["internal"].post(path)
    assert response.status_code in (200, 404), response.text
    if response.status_code == 404:
        assert_error(response, 404, "session_not_found")
    assert_conventions(response)


# --------------------------------------------------------------------------- runbook smoke


def test_smoke_malformed_send_email_code(clients: dict[str, httpx.Client]) -> None:
    response = clients["public"].post(SEND, json={"mail": "x"})
    assert_error(response, 400, "invalid_request")


def test_smoke_unknown_user_has_no_sessions(clients: dict[str, httpx.Client]) -> None:
    user = f"nobody-{secrets.token_hex(4)}"
    response = clients["internal"].get(f"/api/v1/internal/users/{user}/sessions")
    assert response.status_code == 200, response.text
    assert response.json() == {"user_id": user, "sessions": []}
    assert_conventions(response)


@pytest.mark.parametrize("status", ["active", "revoked", "expired", "all"])
def test_list_status_filter_values(clients: dict[str, httpx.Client], status: str) -> None:
    response = clients["internal"].get(LIST, params={"status": status})
    assert response.status_code == 200, response.text
    assert response.json() == {"user_id": USER, "sessions": []}


def test_longest_user_id_is_accepted(clients: dict[str, httpx.Client]) -> None:
    user = "u" * 100 + "._:@-" + "9" * 23  # 128 characters of the allowed alphabet
    assert len(user) == 128
    response = clients["internal"].get(f"/api/v1/internal/users/{user}/sessions")
    assert response.status_code == 200, response.text
    assert response.json()["user_id"] == user


def test_unknown_session_is_404_session_not_found(clients: dict[str, httpx.Client]) -> None:
    assert_error(clients["internal"].get(SESSION), 404, "session_not_found")


def test_send_email_code_answers_a_fresh_challenge(clients: dict[str, httpx.Client]) -> None:
    first = clients["public"].post(SEND, json={"email": "smoke@example.com"})
    second = clients["public"].post(SEND, json={"email": "smoke@example.com"})
    for response in (first, second):
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"challenge_id", "expires_at"}
        assert ID_FORM.match(body["challenge_id"])
        assert TIMESTAMP.match(body["expires_at"])
        assert_conventions(response)
    assert first.json()["challenge_id"] != second.json()["challenge_id"]


def test_unknown_challenge_is_404_challenge_not_found(clients: dict[str, httpx.Client]) -> None:
    response = clients["public"].post(CONFIRM, json={"challenge_id": SID, "code": "123456"})
    assert_error(response, 404, "challenge_not_found")


# --------------------------------------------------------------------------- 404 / 405

NO_SUCH_ROUTES = [
    "/",
    "/nope",
    "/api",
    "/api/v1",
    "/api/v1/public/auth",
    "/api/v1/public/auth/send-email-code/extra",
    "/api/v1/internal/users",
    f"/api/v1/internal/users/{USER}",
    "/api/v1/internal/sessions",
    f"/api/v1/internal/sessions/{SID}/unknown",
]
DOC_AND_PROBE_ROUTES = [
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
    "/openapi.json",
    "/healthz",
    "/readyz",
    "/livez",
    "/health",
    "/metrics",
]


@pytest.mark.parametrize("listener", ["public", "internal"])
@pytest.mark.parametrize("path", NO_SUCH_ROUTES + DOC_AND_PROBE_ROUTES)
def test_unknown_route_is_404_not_found(
    clients: dict[str, httpx.Client], listener: str, path: str
) -> None:
    assert_error(clients[listener].get(path), 404, "not_found")


@pytest.mark.parametrize("listener", ["public", "internal"])
def test_unknown_route_with_post_is_404(clients: dict[str, httpx.Client], listener: str) -> None:
    response = clients[listener].post("/api/v1/nothing/here", json={"x": 1})
    assert_error(response, 404, "not_found")


@pytest.mark.parametrize(
    ("listener", "method", "path"),
    [
        ("internal", "POST", SEND),
        ("internal", "POST", CONFIRM),
        ("public", "GET", LIST),
        ("public", "GET", SESSION),
        ("public", "POST", REVOKE),
        ("public", "POST", BLOCK),
    ],
)
def test_each_listener_serves_only_its_own_api(
    clients: dict[str, httpx.Client], listener: str, method: str, path: str
) -> None:
    response = clients[listener].request(method, path, json={} if method == "POST" else None)
    assert_error(response, 404, "not_found")


@pytest.mark.parametrize(
    ("listener", "method", "path", "allowed"),
    [
        ("public", "GET", SEND, "POST"),
        ("public", "PUT", SEND, "POST"),
        ("public", "DELETE", SEND, "POST"),
        ("public", "PATCH", CONFIRM, "POST"),
        ("public", "GET", CONFIRM, "POST"),
        ("internal", "POST", LIST, "GET"),
        ("internal", "DELETE", LIST, "GET"),
        ("internal", "DELETE", SESSION, "GET"),
        ("internal", "PUT", SESSION, "GET"),
        ("internal", "GET", REVOKE, "POST"),
        ("internal", "GET", EXTEND, "POST"),
        ("internal", "GET", REVOKE_ALL, "POST"),
        ("internal", "DELETE", BLOCK, "POST"),
    ],
)
def test_wrong_method_is_405(
    clients: dict[str, httpx.Client], listener: str, method: str, path: str, allowed: str
) -> None:
    response = clients[listener].request(method, path)
    assert_error(response, 405, "method_not_allowed")
    assert allowed in response.headers.get("allow", ""), response.headers


# --------------------------------------------------------------------------- 413


def _json_body_of_size(size: int, field: str = "email") -> bytes:
    """A valid JSON object of exactly ``size`` bytes: ``{"<field>": "aaa…"}``."""
    head = b'{"' + field.encode() + b'": "'
    tail = b'"}'
    body = head + b"a" * (size - len(head) - len(tail)) + tail
    assert len(body) == size
    return body


def _chunks(body: bytes, size: int = 1000) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


OVERSIZE_TARGETS = [
    pytest.param("public", SEND, id="public-send"),
    pytest.param("public", CONFIRM, id="public-confirm"),
    pytest.param("internal", REVOKE, id="internal-revoke"),
    pytest.param("internal", BLOCK, id="internal-block"),
]


@pytest.mark.parametrize(("listener", "path"), OVERSIZE_TARGETS)
@pytest.mark.parametrize("size", [MAX_BODY + 1, 64 * 1024, 1024 * 1024])
def test_body_over_16kib_with_content_length_is_413(
    clients: dict[str, httpx.Client], listener: str, path: str, size: int
) -> None:
    body = _json_body_of_size(size, "reason" if listener == "internal" else "email")
    response = clients[listener].post(path, content=body, headers=JSON)
    assert_error(response, 413, "payload_too_large")


@pytest.mark.parametrize(("listener", "path"), OVERSIZE_TARGETS)
@pytest.mark.parametrize("size", [MAX_BODY + 1, 64 * 1024])
def test_chunked_body_over_16kib_is_413(
    clients: dict[str, httpx.Client], listener: str, path: str, size: int
) -> None:
    body = _json_body_of_size(size, "reason" if listener == "internal" else "email")
    response = clients[listener].post(path, content=_chunks(body), headers=JSON)
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "payload_too_large")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_of_exactly_16kib_is_not_413(clients: dict[str, httpx.Client], chunked: bool) -> None:
    # Valid JSON, but the e-mail is far too long: the service reads it and says 400.
    body = _json_body_of_size(MAX_BODY)
    content: bytes | Iterator[bytes] = _chunks(body) if chunked else body
    response = clients["public"].post(SEND, content=content, headers=JSON)
    assert_error(response, 400, "invalid_request")


# --------------------------------------------------------------------------- headers


def _various_responses(client: httpx.Client, listener: str, **headers: str) -> list[httpx.Response]:
    """A 200, a 400, a 404, a 405 and a 413 from one listener."""
    if listener == "public":
        ok = client.post(SEND, json={"email": "hdr@example.com"}, headers=headers)
        bad = client.post(SEND, json={"email": 5}, headers=headers)
        wrong_method = client.get(SEND, headers=headers)
        big_path = SEND
    else:
        ok = client.get(LIST, headers=headers)
        bad = client.post(REVOKE, json={"reason": 5}, headers=headers)
        wrong_method = client.delete(LIST, headers=headers)
        big_path = REVOKE
    missing = client.get("/nope", headers=headers)
    too_large = client.post(
        big_path, content=_json_body_of_size(MAX_BODY + 100), headers={**JSON, **headers}
    )
    responses = [ok, bad, missing, wrong_method, too_large]
    assert [r.status_code for r in responses] == [200, 400, 404, 405, 413]
    return responses


@pytest.mark.parametrize("listener", ["public", "internal"])
def test_every_response_has_no_store_and_a_request_id(
    clients: dict[str, httpx.Client], listener: str
) -> None:
    responses = _various_responses(clients[listener], listener)
    for response in responses:
        assert_conventions(response)
    ids = [r.headers["x-request-id"] for r in responses]
    assert len(set(ids)) == len(ids), ids  # a new id per request


@pytest.mark.parametrize("listener", ["public", "internal"])
@pytest.mark.parametrize(
    "request_id",
    [
        "req-123",
        "0f8fad5b-d9cb-469f-a165-70867728950e",
        "trace.span:42_A",
        "x" * 128,
    ],
)
def test_sane_request_id_is_echoed(
    clients: dict[str, httpx.Client], listener: str, request_id: str
) -> None:
    for response in _various_responses(clients[listener], listener, **{"X-Request-ID": request_id}):
        assert response.headers["x-request-id"] == request_id
        assert response.headers["cache-control"] == "no-store"


@pytest.mark.parametrize("listener", ["public", "internal"])
@pytest.mark.parametrize(
    "request_id",
    [
        "x" * 300,
        "x" * 129,
        "has spaces in it",
        "semi;colon",
        "<script>",
        'quote"d',
        "new/line",
    ],
    ids=["300-chars", "129-chars", "spaces", "semicolon", "angle", "quote", "slash"],
)
def test_insane_request_id_is_replaced(
    clients: dict[str, httpx.Client], listener: str, request_id: str
) -> None:
    for response in _various_responses(clients[listener], listener, **{"X-Request-ID": request_id}):
        echoed = response.headers["x-request-id"]
        assert echoed != request_id
        assert SANE_ID.match(echoed), echoed
        assert response.headers["cache-control"] == "no-store"


@pytest.mark.parametrize("listener", ["public", "internal"])
def test_non_ascii_request_id_is_replaced(clients: dict[str, httpx.Client], listener: str) -> None:
    client = clients[listener]
    path = SEND if listener == "public" else LIST
    request = client.build_request(
        "POST" if listener == "public" else "GET",
        path,
        json={"email": "nonascii@example.com"} if listener == "public" else None,
    )
    request.headers["X-Request-ID"] = "r\u00e9q-1".encode("latin-1").decode("latin-1")
    response = client.send(request)
    assert response.status_code == 200, response.text
    assert SANE_ID.match(response.headers["x-request-id"])
    assert response.headers["x-request-id"] != "r\u00e9q-1"


def test_response_headers_are_not_duplicated(clients: dict[str, httpx.Client]) -> None:
    response = clients["public"].post(
        SEND, json={"email": "dup@example.com"}, headers={"X-Request-ID": "dup-1"}
    )
    assert response.headers.get_list("cache-control") == ["no-store"]
    assert response.headers.get_list("x-request-id") == ["dup-1"]
