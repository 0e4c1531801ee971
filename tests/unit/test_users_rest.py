"""RestUserDirectory against a respx-mocked user service (CONTRACT §8)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta

import httpx
import pytest
import respx
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from authsession.domain.errors import ServiceUnavailable, UserNotFound
from authsession.domain.ports import UserResolution
from authsession.services.http_client import create_client, request_budget
from authsession.services.users_rest import RestUserDirectory

BASE = "http://users.test"
EMAIL = "jane.doe@example.com"
RESOLVE = "/api/v1/users/resolve-by-email"
ENSURE = "/api/v1/users/ensure"
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")

Result = tuple[str, str, float]
Answer = httpx.Response | Exception


class SlowTransport(httpx.AsyncBaseTransport):
    """Answers only after ``delay`` seconds and ignores httpx's per-phase timeouts."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.calls = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        await asyncio.sleep(self.delay)
        return httpx.Response(200, json={"outcome": "unknown"})


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    # The process installs an SDK provider at startup; without one spans have no valid ids
    # and nothing would be injected. The global provider can be set only once per process.
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


@pytest.fixture(autouse=True)
def _fresh_spans(spans: InMemorySpanExporter) -> None:
    spans.clear()


@pytest.fixture
def router() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=BASE, assert_all_called=False) as router:
        yield router


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    client = create_client(BASE, timedelta(seconds=2))
    yield client
    await client.aclose()


@pytest.fixture
def results() -> list[Result]:
    return []


@pytest.fixture
def users(client: httpx.AsyncClient, results: list[Result]) -> RestUserDirectory:
    return RestUserDirectory(client, on_result=lambda *args: results.append(args))


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="authsession.services")
    return caplog


def _records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "authsession.services" and r.levelno == level]


def _assert_no_email(caplog: pytest.LogCaptureFixture) -> None:
    for record in caplog.records:
        text = record.getMessage() + repr(record.__dict__)
        assert EMAIL not in text
        assert "jane.doe" not in text


# --- resolve-by-email: success -------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"outcome": "existing", "user_id": "u-1"}, UserResolution("existing", "u-1")),
        ({"outcome": "unknown"}, UserResolution("unknown")),
        (
            {"outcome": "blocked", "user_id": "tenant:42@x.y"},
            UserResolution("blocked", "tenant:42@x.y"),
        ),
        # Extra fields are tolerated, so the service can grow its answer.
        (
            {"outcome": "existing", "user_id": "u-1", "since": "2020"},
            UserResolution("existing", "u-1"),
        ),
        ({"outcome": "unknown", "user_id": None}, UserResolution("unknown")),
    ],
)
async def test_resolve_maps_each_success_body(
    router: respx.MockRouter,
    users: RestUserDirectory,
    results: list[Result],
    body: dict[str, object],
    expected: UserResolution,
) -> None:
    route = router.post(RESOLVE).respond(200, json=body)

    assert await users.resolve_by_email(EMAIL) == expected

    assert route.call_count == 1
    assert json.loads(route.calls.last.request.content) == {"email": EMAIL}
    assert [(s, r) for s, r, _ in results] == [("user_service", "ok")]
    assert results[0][2] >= 0


async def test_resolve_accepts_the_longest_user_id(
    router: respx.MockRouter, users: RestUserDirectory
) -> None:
    user_id = "a" * 128
    router.post(RESOLVE).respond(200, json={"outcome": "existing", "user_id": user_id})

    assert await users.resolve_by_email(EMAIL) == UserResolution("existing", user_id)


# --- resolve-by-email: the single retry ---------------------------------------------

RETRYABLE: list[Answer] = [
    httpx.ConnectError("connection refused"),
    httpx.ReadTimeout("read timed out"),
    httpx.Response(502),
    httpx.Response(503),
    httpx.Response(504),
]
RETRYABLE_IDS = ["transport", "timeout", "502", "503", "504"]


@pytest.mark.parametrize("first", RETRYABLE, ids=RETRYABLE_IDS)
async def test_resolve_retries_once_then_succeeds(
    router: respx.MockRouter,
    users: RestUserDirectory,
    results: list[Result],
    logs: pytest.LogCaptureFixture,
    first: Answer,
) -> None:
    ok = httpx.Response(200, json={"outcome": "existing", "user_id": "u-1"})
    route = router.post(RESOLVE).mock(side_effect=[first, ok])

    assert await users.resolve_by_email(EMAIL) == UserResolution("existing", "u-1")

    assert route.call_count == 2
    assert [r for _, r, _ in results] == ["error", "ok"]
    # The first failure is worth an info line, not a warning: the login went through.
    assert _records(logs, logging.WARNING) == []
    assert len(_records(logs, logging.INFO)) == 1
    _assert_no_email(logs)


@pytest.mark.parametrize("failure", RETRYABLE, ids=RETRYABLE_IDS)
async def test_resolve_fails_after_the_second_failure(
    router: respx.MockRouter,
    users: RestUserDirectory,
    results: list[Result],
    logs: pytest.LogCaptureFixture,
    failure: Answer,
) -> None:
    route = router.post(RESOLVE).mock(side_effect=[failure, failure, failure])

    with pytest.raises(ServiceUnavailable) as caught:
        await users.resolve_by_email(EMAIL)

    assert caught.value.dependency == "user_service"
    assert route.call_count == 2
    assert [r for _, r, _ in results] == ["error", "error"]
    warnings = _records(logs, logging.WARNING)
    assert len(warnings) == 1
    assert warnings[0].__dict__["attempts"] == 2
    (retry,) = _records(logs, logging.INFO)
    assert retry.getMessage() == "outbound call failed, retrying"
    assert retry.__dict__["attempt"] == 1
    assert retry.__dict__["operation"] == "resolve_by_email"
    _assert_no_email(logs)


async def test_a_failure_that_is_not_retried_counts_one_attempt(
    router: respx.MockRouter, users: RestUserDirectory, logs: pytest.LogCaptureFixture
) -> None:
    router.post(RESOLVE).respond(500)

    with pytest.raises(ServiceUnavailable):
        await users.resolve_by_email(EMAIL)

    (record,) = _records(logs, logging.WARNING)
    assert record.__dict__["attempts"] == 1
    assert _records(logs, logging.INFO) == []


@pytest.mark.parametrize("status", [400, 401, 404, 409, 429, 500, 501, 301])
async def test_resolve_does_not_retry_other_statuses(
    router: respx.MockRouter, users: RestUserDirectory, status: int
) -> None:
    route = router.post(RESOLVE).respond(status, json={"outcome": "unknown"})

    with pytest.raises(ServiceUnavailable) as caught:
        await users.resolve_by_email(EMAIL)

    assert route.call_count == 1
    assert caught.value.dependency == "user_service"
    assert f"HTTP {status}" in caught.value.cause


# --- malformed answers ---------------------------------------------------------------

MALFORMED: list[bytes] = [
    b"not json",
    b"",
    b"[]",
    b"null",
    b'{"outcome": "maybe", "user_id": "u-1"}',
    b'{"outcome": "created", "user_id": "u-1"}',
    b'{"outcome": "existing"}',
    b'{"outcome": "blocked"}',
    b'{"user_id": "u-1"}',
    b'{"outcome": "existing", "user_id": ""}',
    b'{"outcome": "existing", "user_id": "has space"}',
    b'{"outcome": "existing", "user_id": "a/b"}',
    b'{"outcome": "existing", "user_id": "u-1\\n"}',
    b'{"outcome": "existing", "user_id": 42}',
    b'{"outcome": "existing", "user_id": "' + b"a" * 129 + b'"}',
]


@pytest.mark.parametrize("content", MALFORMED)
async def test_resolve_rejects_malformed_bodies_without_retry(
    router: respx.MockRouter, users: RestUserDirectory, results: list[Result], content: bytes
) -> None:
    route = router.post(RESOLVE).respond(
        200, content=content, headers={"Content-Type": "application/json"}
    )

    with pytest.raises(ServiceUnavailable) as caught:
        await users.resolve_by_email(EMAIL)

    assert caught.value.dependency == "user_service"
    assert "invalid response body" in caught.value.cause
    assert route.call_count == 1
    assert [r for _, r, _ in results] == ["error"]


async def test_an_echoed_email_does_not_leak_into_the_error_or_logs(
    router: respx.MockRouter, users: RestUserDirectory, logs: pytest.LogCaptureFixture
) -> None:
    router.post(RESOLVE).respond(200, json={"outcome": EMAIL, "email": EMAIL})

    with pytest.raises(ServiceUnavailable) as caught:
        await users.resolve_by_email(EMAIL)

    assert EMAIL not in str(caught.value)
    assert EMAIL not in caught.value.cause
    assert len(_records(logs, logging.WARNING)) == 1
    _assert_no_email(logs)


# --- ensure --------------------------------------------------------------------------


@pytest.mark.parametrize("outcome", ["existing", "created", "blocked"])
async def test_ensure_maps_each_success_body(
    router: respx.MockRouter, users: RestUserDirectory, outcome: str
) -> None:
    route = router.post(ENSURE).respond(200, json={"user_id": "u-7", "outcome": outcome})

    assert await users.ensure(EMAIL) == UserResolution(outcome, "u-7")  # type: ignore[arg-type]

    assert json.loads(route.calls.last.request.content) == {"email": EMAIL}


@pytest.mark.parametrize(
    "content",
    [
        b"<html>",
        b'{"outcome": "unknown"}',
        b'{"outcome": "unknown", "user_id": "u-7"}',
        b'{"outcome": "created"}',
        b'{"outcome": "created", "user_id": "no spaces"}',
    ],
)
async def test_ensure_rejects_malformed_bodies(
    router: respx.MockRouter, users: RestUserDirectory, content: bytes
) -> None:
    router.post(ENSURE).respond(200, content=content)

    with pytest.raises(ServiceUnavailable, match="invalid response body"):
        await users.ensure(EMAIL)


@pytest.mark.parametrize(
    "failure",
    [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.Response(503)],
    ids=["transport", "timeout", "503"],
)
async def test_ensure_is_never_retried(
    router: respx.MockRouter, users: RestUserDirectory, failure: Answer
) -> None:
    route = router.post(ENSURE).mock(side_effect=[failure, failure])

    with pytest.raises(ServiceUnavailable):
        await users.ensure(EMAIL)

    assert route.call_count == 1


# --- block ---------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 204])
async def test_block_succeeds_on_200_and_204(
    router: respx.MockRouter, users: RestUserDirectory, results: list[Result], status: int
) -> None:
    route = router.post("/api/v1/users/u-1/block").respond(status)

    await users.block("u-1", "fraud")

    assert route.call_count == 1
    assert json.loads(route.calls.last.request.content) == {"reason": "fraud"}
    assert [r for _, r, _ in results] == ["ok"]


async def test_block_of_an_unknown_user_is_user_not_found(
    router: respx.MockRouter, users: RestUserDirectory, logs: pytest.LogCaptureFixture
) -> None:
    route = router.post("/api/v1/users/u-404/block").respond(404)

    with pytest.raises(UserNotFound):
        await users.block("u-404", "fraud")

    assert route.call_count == 1
    # A 404 is an answer the contract defines, not a failure of the user service.
    assert _records(logs, logging.WARNING) == []


@pytest.mark.parametrize("status", [400, 500, 502, 503])
async def test_block_failures_are_service_unavailable_and_not_retried(
    router: respx.MockRouter, users: RestUserDirectory, status: int
) -> None:
    route = router.post("/api/v1/users/u-1/block").respond(status)

    with pytest.raises(ServiceUnavailable) as caught:
        await users.block("u-1", "fraud")

    assert caught.value.dependency == "user_service"
    assert route.call_count == 1


async def test_block_transport_error_is_service_unavailable(
    router: respx.MockRouter, users: RestUserDirectory
) -> None:
    route = router.post("/api/v1/users/u-1/block").mock(side_effect=httpx.ConnectError("x"))

    with pytest.raises(ServiceUnavailable):
        await users.block("u-1", "fraud")

    assert route.call_count == 1


@pytest.mark.parametrize(
    ("user_id", "raw_path"),
    [
        ("tenant:42@x.y", b"/api/v1/users/tenant%3A42%40x.y/block"),
        ("..", b"/api/v1/users/%2E%2E/block"),
        (".", b"/api/v1/users/%2E/block"),
        ("a..b", b"/api/v1/users/a..b/block"),
    ],
)
async def test_block_keeps_the_user_id_in_its_own_path_segment(
    router: respx.MockRouter, users: RestUserDirectory, user_id: str, raw_path: bytes
) -> None:
    route = router.post(url__regex=r"/block$").respond(204)

    await users.block(user_id, "fraud")

    assert route.calls.last.request.url.raw_path == raw_path


# --- headers and tracing -------------------------------------------------------------


async def test_requests_carry_json_and_a_valid_traceparent(
    router: respx.MockRouter, users: RestUserDirectory, spans: InMemorySpanExporter
) -> None:
    route = router.post(RESOLVE).respond(200, json={"outcome": "unknown"})

    await users.resolve_by_email(EMAIL)

    headers = route.calls.last.request.headers
    assert headers["Content-Type"] == "application/json"
    match = TRACEPARENT.match(headers["traceparent"])
    assert match is not None
    assert match.group(1) != "0" * 32
    (span,) = spans.get_finished_spans()
    assert span.name == "POST /api/v1/users/resolve-by-email"
    assert span.kind is SpanKind.CLIENT
    # The service's spans must hang under this one.
    assert match.group(1) == format(span.context.trace_id, "032x")
    assert match.group(2) == format(span.context.span_id, "016x")
    assert span.attributes is not None
    assert span.attributes["http.request.method"] == "POST"
    assert span.attributes["url.template"] == RESOLVE
    assert span.attributes["url.scheme"] == "http"
    assert span.attributes["server.address"] == "users.test"
    assert span.attributes["server.port"] == 80
    assert span.attributes["http.response.status_code"] == 200
    assert span.attributes["authsession.service"] == "user_service"


async def test_each_attempt_gets_its_own_span(
    router: respx.MockRouter, users: RestUserDirectory, spans: InMemorySpanExporter
) -> None:
    route = router.post(RESOLVE).mock(
        side_effect=[httpx.Response(503), httpx.Response(200, json={"outcome": "unknown"})]
    )

    await users.resolve_by_email(EMAIL)

    parents = [TRACEPARENT.match(c.request.headers["traceparent"]) for c in route.calls]
    span_ids = {m.group(2) for m in parents if m is not None}
    assert len(span_ids) == 2
    codes = [
        s.attributes["http.response.status_code"]
        for s in spans.get_finished_spans()
        if s.attributes
    ]
    assert codes == [503, 200]


async def test_block_span_name_uses_the_route_template(
    router: respx.MockRouter, users: RestUserDirectory, spans: InMemorySpanExporter
) -> None:
    router.post("/api/v1/users/u-1/block").respond(204)

    await users.block("u-1", "fraud")

    (span,) = spans.get_finished_spans()
    assert span.name == "POST /api/v1/users/{user_id}/block"


async def test_no_span_attribute_carries_the_user_id_of_a_block_call(
    router: respx.MockRouter, users: RestUserDirectory, spans: InMemorySpanExporter
) -> None:
    user_id = "usr-7f3a9c"
    router.post(f"/api/v1/users/{user_id}/block").respond(204)

    await users.block(user_id, "fraud")

    (span,) = spans.get_finished_spans()
    assert span.attributes is not None
    assert "url.full" not in span.attributes
    assert span.attributes["url.template"] == "/api/v1/users/{user_id}/block"
    assert span.attributes["server.address"] == "users.test"
    assert span.attributes["http.response.status_code"] == 204
    leaked = {k: v for k, v in span.attributes.items() if user_id in str(v)}
    assert leaked == {}
    assert user_id not in span.name


# --- whole-request deadline ----------------------------------------------------------


async def test_resolve_deadline_covers_the_whole_request_and_is_retried_once() -> None:
    transport = SlowTransport(delay=5.0)
    client = create_client(BASE, timedelta(milliseconds=100), transport=transport)
    users = RestUserDirectory(client)
    started = time.perf_counter()
    try:
        with pytest.raises(ServiceUnavailable) as caught:
            await users.resolve_by_email(EMAIL)
    finally:
        await client.aclose()

    elapsed = time.perf_counter() - started
    # Two attempts of 0.1 s each, far from the 5 s the transport would take.
    assert elapsed < 1.0
    assert transport.calls == 2
    assert "no complete answer within 0.1s" in caught.value.cause


async def test_ensure_deadline_is_not_retried() -> None:
    transport = SlowTransport(delay=5.0)
    client = create_client(BASE, timedelta(milliseconds=100), transport=transport)
    users = RestUserDirectory(client)
    started = time.perf_counter()
    try:
        with pytest.raises(ServiceUnavailable):
            await users.ensure(EMAIL)
    finally:
        await client.aclose()

    assert time.perf_counter() - started < 0.6
    assert transport.calls == 1


# --- logging -------------------------------------------------------------------------


async def test_a_failure_is_logged_once_with_its_fields(
    router: respx.MockRouter, users: RestUserDirectory, logs: pytest.LogCaptureFixture
) -> None:
    router.post(ENSURE).respond(500, text=f"boom for {EMAIL}")

    with pytest.raises(ServiceUnavailable):
        await users.ensure(EMAIL)

    (record,) = _records(logs, logging.WARNING)
    assert record.getMessage() == "outbound call failed"
    fields = record.__dict__
    assert fields["service"] == "user_service"
    assert fields["operation"] == "ensure"
    assert fields["status"] == 500
    assert isinstance(fields["duration_ms"], float)
    assert record.exc_info is None
    _assert_no_email(logs)


async def test_a_transport_failure_logs_the_exception_class(
    router: respx.MockRouter, users: RestUserDirectory, logs: pytest.LogCaptureFixture
) -> None:
    router.post(ENSURE).mock(side_effect=httpx.ConnectError("refused"))

    with pytest.raises(ServiceUnavailable):
        await users.ensure(EMAIL)

    (record,) = _records(logs, logging.WARNING)
    assert record.__dict__["exception"] == "ConnectError"
    assert "status" not in record.__dict__
    # A call that is never retried does not count its tries.
    assert "attempts" not in record.__dict__


# --- hook and client -----------------------------------------------------------------


async def test_a_broken_on_result_hook_does_not_fail_the_call(
    router: respx.MockRouter, client: httpx.AsyncClient
) -> None:
    def broken(service: str, result: str, seconds: float) -> None:
        raise RuntimeError("exporter down")

    users = RestUserDirectory(client, on_result=broken)
    router.post(RESOLVE).respond(200, json={"outcome": "unknown"})

    assert await users.resolve_by_email(EMAIL) == UserResolution("unknown")


async def test_create_client_keeps_the_base_path() -> None:
    client = create_client("http://users.test/prefix", timedelta(seconds=3))
    try:
        with respx.mock() as router:
            route = router.post("http://users.test/prefix" + RESOLVE).respond(
                200, json={"outcome": "unknown"}
            )
            await RestUserDirectory(client).resolve_by_email(EMAIL)
        assert route.called
        assert request_budget(client) == 3.0
    finally:
        await client.aclose()


@pytest.mark.parametrize("timeout", [timedelta(0), timedelta(seconds=-1)])
def test_create_client_rejects_a_non_positive_timeout(timeout: timedelta) -> None:
    with pytest.raises(ValueError, match="positive"):
        create_client(BASE, timeout)


# --------------------------------------------------------------------------- user status
USER = "/api/v1/users/usr-1"


@pytest.mark.parametrize("status", ["active", "blocked"])
async def test_user_status_maps_the_answer(
    router: respx.MockRouter, users: RestUserDirectory, status: str
) -> None:
    route = router.get(USER).mock(
        return_value=httpx.Response(200, json={"user_id": "usr-1", "status": status})
    )
    assert await users.user_status("usr-1") == status
    assert route.calls.last.request.method == "GET"
    assert TRACEPARENT.match(route.calls.last.request.headers["traceparent"])


async def test_user_status_of_a_gone_user_is_none(
    router: respx.MockRouter, users: RestUserDirectory
) -> None:
    router.get(USER).mock(return_value=httpx.Response(404))
    assert await users.user_status("usr-1") is None


@pytest.mark.parametrize("first", RETRYABLE, ids=RETRYABLE_IDS)
async def test_user_status_is_retried_once(
    router: respx.MockRouter, users: RestUserDirectory, first: Answer
) -> None:
    ok = httpx.Response(200, json={"user_id": "usr-1", "status": "active"})
    route = router.get(USER).mock(side_effect=[first, ok])
    assert await users.user_status("usr-1") == "active"
    assert route.call_count == 2


@pytest.mark.parametrize("status", [400, 500, 501])
async def test_user_status_is_not_retried_on_other_statuses(
    router: respx.MockRouter, users: RestUserDirectory, status: int
) -> None:
    route = router.get(USER).mock(return_value=httpx.Response(status))
    with pytest.raises(ServiceUnavailable):
        await users.user_status("usr-1")
    assert route.call_count == 1


@pytest.mark.parametrize(
    "body", [{"user_id": "usr-1", "status": "gone"}, {"status": "active"}, ["active"]]
)
async def test_user_status_rejects_a_body_off_the_contract(
    router: respx.MockRouter, users: RestUserDirectory, body: object
) -> None:
    router.get(USER).mock(return_value=httpx.Response(200, json=body))
    with pytest.raises(ServiceUnavailable):
        await users.user_status("usr-1")
