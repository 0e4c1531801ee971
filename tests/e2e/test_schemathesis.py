"""Property-based API testing of both committed OpenAPI documents against the real process.

Schemathesis generates requests from ``openapi/public.yaml`` and ``openapi/internal.yaml``
(valid and invalid ones, plus its boundary-value "coverage" cases) and sends them to one
``authsession`` process per test worker (stub services, real Redis, no rate limit). Every
answer must:

- never be a 5xx (``not_a_server_error``);
- have a status code the document lists for the operation (``status_code_conformance``);
- have the documented media type and body schema (``content_type_conformance``,
  ``response_schema_conformance``) and documented headers (``response_headers_conformance``);
- reject invalid input with a 4xx (``negative_data_rejection``).

Generated addresses are never valid ones (the document says only "a string of 3-320
characters"), so a second, Hypothesis-driven test walks the success paths with real
addresses: send-email-code, confirm (the code read from the stub mail's log line), a
replay, then every internal operation on the new session, each answer validated by the
same checks against the same documents.

The run is bounded and reproducible: a fixed seed, derandomized generation, no example
database on disk, a small ``max_examples`` per operation.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.contract import CONFIRM, SEND
from tests.support.net import LOOPBACK, free_ports
from tests.support.process import AuthsessionProcess
from tests.support.redis_server import RedisServer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

OPENAPI = Path(__file__).resolve().parents[2] / "openapi"
MAX_EXAMPLES = 30
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
]


def _config() -> schemathesis.Config:
    return schemathesis.Config.from_dict(
        {
            "seed": 20_241_117,
            # Network round trips are slow by Hypothesis' standards.
            "suppress-health-check": ["too_slow", "filter_too_much", "data_too_large"],
            "generation": {
                "max-examples": MAX_EXAMPLES,
                "deterministic": True,
                "database": "none",
                "mode": "all",
            },
            "phases": {"stateful": {"enabled": False}},
        }
    )


public_schema = schemathesis.openapi.from_path(OPENAPI / "public.yaml", config=_config())
internal_schema = schemathesis.openapi.from_path(OPENAPI / "internal.yaml", config=_config())


@pytest.fixture(scope="module")
def service(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AuthsessionProcess]:
    """One process for every generated case of this module (per xdist worker)."""
    public, internal = free_ports(2)
    tag = uuid.uuid4().hex[:8]
    env = {
        "AUTHSESSION_PUBLIC_HTTP_ADDR": f"{LOOPBACK}:{public}",
        "AUTHSESSION_INTERNAL_HTTP_ADDR": f"{LOOPBACK}:{internal}",
        "AUTHSESSION_LOG_FORMAT": "json",
        "AUTHSESSION_REDIS_ADDR": redis_server.addr,
        "AUTHSESSION_REDIS_KEY_PREFIX": f"schemathesis-{tag}:",
        "AUTHSESSION_GATEWAY_SESSION_KEY_PREFIX": f"schemathesis-{tag}:gateway:session:",
        "AUTHSESSION_GATEWAY_SESSION_EVENTS_STREAM": f"schemathesis-{tag}:gateway:events",
    }
    process = AuthsessionProcess(
        env,
        public_port=public,
        internal_port=internal,
        workdir=tmp_path_factory.mktemp("schemathesis-authsession"),
    )
    try:
        process.start().wait_ready()
        yield process
    finally:
        process.close()
        print(f"===== {process!r} =====\n{process.output_report()}")


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


@public_schema.parametrize()
def test_public_api_conforms(
    case: schemathesis.Case, service: AuthsessionProcess, http: requests.Session
) -> None:
    case.call_and_validate(base_url=service.public_url, session=http, checks=CHECKS, timeout=10)


@internal_schema.parametrize()
def test_internal_api_conforms(
    case: schemathesis.Case, service: AuthsessionProcess, http: requests.Session
) -> None:
    case.call_and_validate(base_url=service.internal_url, session=http, checks=CHECKS, timeout=10)


# --------------------------------------------------------------------------- success paths
LIST = "/api/v1/internal/users/{user_id}/sessions"
READ = "/api/v1/internal/sessions/{device_session_id}"
EXTEND = "/api/v1/internal/sessions/{device_session_id}/extend"
REVOKE = "/api/v1/internal/sessions/{device_session_id}/revoke"
REVOKE_ALL = "/api/v1/internal/users/{user_id}/sessions/revoke"
BLOCK = "/api/v1/internal/users/{user_id}/block"
STUB_CODE_EVENT = "stub mail: login code"
_LOCAL_CHARS = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~-"
    "àéîõüßçñøåæœÀÉÎÕÜ" + "αβγδεζηθ" + "абвгдежз"
)
_serial = itertools.count(1)


@st.composite
def addresses(draw: st.DrawFn) -> str:
    """Valid addresses (ASCII and internationalized local parts, IDN domains), each one
    unique so no resend cooldown ever applies."""
    local = draw(st.text(alphabet=_LOCAL_CHARS, min_size=1, max_size=40))
    domain = draw(
        st.sampled_from(["example.com", "Example.ORG", "bücher.example", "xn--e1afmkfd.example"])
    )
    padding = draw(st.sampled_from(["", " ", "\t"]))
    return f"{padding}{local}.{next(_serial)}@{domain}{padding}"


def stub_code(process: AuthsessionProcess, challenge_id: str) -> str:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for record in process.log_records():
            if (
                record.get("event") == STUB_CODE_EVENT
                and record.get("challenge_id") == challenge_id
            ):
                return str(record["code"])
        time.sleep(0.02)
    raise AssertionError(f"no stub mail line for challenge {challenge_id}")


def call(
    schema: Any,
    path: str,
    method: str,
    base_url: str,
    http: requests.Session,
    *,
    status: int = 200,
    **case: Any,
) -> Any:
    """One documented request with the given data; validated, then its JSON body."""
    operation = schema[path][method]
    response = operation.Case(**case).call_and_validate(
        base_url=base_url, session=http, checks=CHECKS, timeout=10
    )
    assert response.status_code == status, response.text
    return response.json()


def login(
    service: AuthsessionProcess, http: requests.Session, email: str, **extra: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """send-email-code and confirm, both validated; the confirm body and its request."""
    public = service.public_url
    sent = call(public_schema, SEND, "POST", public, http, body={"email": email, "locale": "fr-CA"})
    body = {"challenge_id": sent["challenge_id"], "code": stub_code(service, sent["challenge_id"])}
    body.update(extra)
    session = call(public_schema, CONFIRM, "POST", public, http, body=body)
    return session, body


@settings(
    max_examples=8,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(email=addresses(), device_name=st.none() | st.text(min_size=1, max_size=64))
def test_login_and_session_answers_conform(
    service: AuthsessionProcess, http: requests.Session, email: str, device_name: str | None
) -> None:
    public, internal = service.public_url, service.internal_url
    extra = {} if device_name is None else {"device_name": device_name}
    session, body = login(service, http, email, **extra)
    assert session["created"] is True
    replay = call(public_schema, CONFIRM, "POST", public, http, body=body)
    assert replay["session_token"] == session["session_token"]

    session_id = {"device_session_id": session["device_session_id"]}
    user_id = {"user_id": session["user_id"]}
    listed = call(
        internal_schema,
        LIST,
        "GET",
        internal,
        http,
        path_parameters=user_id,
        query={"status": "active"},
    )
    assert [s["device_session_id"] for s in listed["sessions"]] == [session["device_session_id"]]
    read = call(internal_schema, READ, "GET", internal, http, path_parameters=session_id)
    assert read["device_name"] == device_name
    call(
        internal_schema,
        EXTEND,
        "POST",
        internal,
        http,
        path_parameters=session_id,
        body={"ttl": "1h30m"},
    )
    revoked = call(
        internal_schema,
        REVOKE,
        "POST",
        internal,
        http,
        path_parameters=session_id,
        body={"reason": "property.test"},
    )
    assert revoked["status"] == "revoked"
    call(
        internal_schema,
        EXTEND,
        "POST",
        internal,
        http,
        status=409,
        path_parameters=session_id,
        body={},
    )
    call(public_schema, CONFIRM, "POST", public, http, status=409, body=body)
    call(internal_schema, REVOKE_ALL, "POST", internal, http, path_parameters=user_id, body={})
    call(
        internal_schema,
        BLOCK,
        "POST",
        internal,
        http,
        path_parameters=user_id,
        body={"reason": "property.test"},
    )


# --------------------------------------------------------------------------- explicit cases
# Inputs the generator practically never draws (the document allows any ttl string of
# 1-32 characters), found by probing the documented input space by hand.


def test_extend_with_an_overflowing_ttl_is_a_400(
    service: AuthsessionProcess, http: requests.Session
) -> None:
    session, _ = login(service, http, f"overflow.{uuid.uuid4().hex[:8]}@example.com")
    answer = call(
        internal_schema,
        EXTEND,
        "POST",
        service.internal_url,
        http,
        status=400,
        path_parameters={"device_session_id": session["device_session_id"]},
        body={"ttl": "99999999999999999999h"},
    )
    assert answer["error"]["code"] == "invalid_request"


@pytest.mark.parametrize("ttl", ["\u0661h", "\uff11h", "1\u0661m"])
def test_extend_rejects_a_ttl_with_non_ascii_digits(
    service: AuthsessionProcess, http: requests.Session, ttl: str
) -> None:
    session, _ = login(service, http, f"digits.{uuid.uuid4().hex[:8]}@example.com")
    answer = call(
        internal_schema,
        EXTEND,
        "POST",
        service.internal_url,
        http,
        status=400,
        path_parameters={"device_session_id": session["device_session_id"]},
        body={"ttl": ttl},
    )
    assert answer["error"]["code"] == "invalid_request"
