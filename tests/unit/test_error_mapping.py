"""The one error mapping (CONTRACT §4, §12 §4): every code, every layer, one place."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest

import authsession
from authsession.domain import errors as domain_errors
from authsession.http import errors as http_errors
from authsession.http.errors import STATUS, Overloaded, error_response, status_of, wire_response

# CONTRACT §4's table, plus the routing codes of the same section, written out.
CONTRACT_STATUS = {
    "invalid_request": 400,
    "invalid_code": 400,
    "unauthorized": 401,
    "user_blocked": 403,
    "not_found": 404,
    "challenge_not_found": 404,
    "session_not_found": 404,
    "user_not_found": 404,
    "method_not_allowed": 405,
    "session_revoked": 409,
    "challenge_expired": 410,
    "payload_too_large": 413,
    "too_many_attempts": 429,
    "rate_limited": 429,
    "internal_error": 500,
    "service_unavailable": 503,
}
PACKAGE = Path(authsession.__file__).parent


def error_classes() -> list[type[domain_errors.AuthSessionError]]:
    found = []
    for module in (domain_errors, http_errors):
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if (
                issubclass(cls, domain_errors.AuthSessionError)
                and cls.__module__ == module.__name__
            ):
                found.append(cls)
    return found


def test_the_table_is_the_contracts() -> None:
    assert STATUS == CONTRACT_STATUS


@pytest.mark.parametrize("cls", error_classes(), ids=lambda c: c.__name__)
def test_every_error_class_has_a_contract_code(cls: type[domain_errors.AuthSessionError]) -> None:
    assert cls.code in CONTRACT_STATUS
    assert cls.default_message.strip()


def test_headers_and_status_follow_the_error() -> None:
    limited = error_response(http_errors.RateLimited(7))
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "7"
    unauthorized = error_response(domain_errors.Unauthorized())
    assert unauthorized.headers["www-authenticate"] == "Bearer"
    assert status_of(Overloaded()) == 503


def test_the_wire_response_is_a_complete_http_answer_with_the_contract_body() -> None:
    raw = wire_response(domain_errors.InvalidRequest("malformed HTTP request"), "req-1")
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 400 Bad Request"
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store"
    assert headers["x-request-id"] == "req-1"
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    assert json.loads(body) == {
        "error": {"code": "invalid_request", "message": "malformed HTTP request"}
    }


# Ways to write an error body by hand; only http/errors.py may use them.
HAND_WRITTEN = re.compile(r"JSONResponse\(|PlainTextResponse\(|error_body\(|[\"']error[\"']\s*:")


def test_no_other_module_of_the_service_writes_an_error_body() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        # The gateway library answers its own callers (CONTRACT §10), not the service's;
        # the OpenAPI generator writes example bodies into the documents, never answers.
        exempt = ("http/errors.py", "http/schemas.py", "http/openapi.py")
        if relative in exempt or relative.startswith("gateway/"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if HAND_WRITTEN.search(line):
                offenders.append(f"{relative}:{number}: {line.strip()}")
    assert not offenders, offenders
