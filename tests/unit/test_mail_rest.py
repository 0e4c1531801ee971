"""RestMailSender against a respx-mocked mail service (CONTRACT §8)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import respx
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from authsession.domain.errors import ServiceUnavailable
from authsession.domain.ports import LoginCodeMessage
from authsession.services.http_client import create_client
from authsession.services.mail_rest import RestMailSender

BASE = "http://mail.test"
SEND = "/api/v1/mail/login-code"
EMAIL = "jane.doe@example.com"
CODE = "493817"
CHALLENGE_ID = "Xk3_9aQ-7LmN2pR4sT6vW8yZ"
TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
MESSAGE = LoginCodeMessage(
    email=EMAIL,
    code=CODE,
    challenge_id=CHALLENGE_ID,
    expires_at=datetime(2030, 1, 2, 3, 4, 5, 678_901, tzinfo=UTC),
    locale="de-CH",
)

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
        return httpx.Response(202)


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    # Without an SDK provider spans have no valid ids and no traceparent is injected; the
    # global provider can be set only once per process, so reuse one that is already there.
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
def mail(client: httpx.AsyncClient, results: list[Result]) -> RestMailSender:
    return RestMailSender(client, on_result=lambda *args: results.append(args))


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="authsession.services")
    return caplog


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "authsession.services" and r.levelno == logging.WARNING
    ]


def _assert_no_secrets(caplog: pytest.LogCaptureFixture) -> None:
    for record in caplog.records:
        text = record.getMessage() + repr(record.__dict__)
        assert CODE not in text
        assert EMAIL not in text
        assert "jane.doe" not in text


@pytest.mark.parametrize("status", [200, 201, 202, 204])
async def test_any_2xx_is_success(
    router: respx.MockRouter, mail: RestMailSender, results: list[Result], status: int
) -> None:
    route = router.post(SEND).respond(status)

    await mail.send_login_code(MESSAGE)

    assert route.call_count == 1
    assert [(s, r) for s, r, _ in results] == [("mail_service", "ok")]


async def test_request_body_and_headers(router: respx.MockRouter, mail: RestMailSender) -> None:
    route = router.post(SEND).respond(202)

    await mail.send_login_code(MESSAGE)

    request = route.calls.last.request
    assert json.loads(request.content) == {
        "email": EMAIL,
        "code": CODE,
        "challenge_id": CHALLENGE_ID,
        "expires_at": "2030-01-02T03:04:05.678Z",
        "locale": "de-CH",
    }
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Idempotency-Key"] == CHALLENGE_ID
    assert TRACEPARENT.match(request.headers["traceparent"])


async def test_a_missing_locale_is_sent_as_null(
    router: respx.MockRouter, mail: RestMailSender
) -> None:
    route = router.post(SEND).respond(204)
    message = LoginCodeMessage(
        email=EMAIL,
        code=CODE,
        challenge_id=CHALLENGE_ID,
        expires_at=datetime(2030, 1, 2, tzinfo=UTC),
        locale=None,
    )

    await mail.send_login_code(message)

    body = json.loads(route.calls.last.request.content)
    assert body["locale"] is None
    assert body["expires_at"] == "2030-01-02T00:00:00.000Z"


async def test_the_span_is_a_client_span_of_the_mail_service(
    router: respx.MockRouter, mail: RestMailSender, spans: InMemorySpanExporter
) -> None:
    router.post(SEND).respond(202)

    await mail.send_login_code(MESSAGE)

    (span,) = spans.get_finished_spans()
    assert span.name == "POST /api/v1/mail/login-code"
    assert span.attributes is not None
    assert span.attributes["authsession.service"] == "mail_service"
    assert span.attributes["http.response.status_code"] == 202


@pytest.mark.parametrize(
    "failure",
    [
        httpx.Response(500),
        httpx.Response(502),
        httpx.Response(503),
        httpx.Response(504),
        httpx.Response(400),
        httpx.Response(302, headers={"Location": "http://elsewhere.test/"}),
        httpx.ConnectError("connection refused"),
        httpx.ReadTimeout("read timed out"),
    ],
    ids=["500", "502", "503", "504", "400", "redirect", "transport", "timeout"],
)
async def test_failures_are_never_retried(
    router: respx.MockRouter, mail: RestMailSender, results: list[Result], failure: Answer
) -> None:
    route = router.post(SEND).mock(side_effect=[failure, httpx.Response(202)])

    with pytest.raises(ServiceUnavailable) as caught:
        await mail.send_login_code(MESSAGE)

    assert caught.value.dependency == "mail_service"
    assert route.call_count == 1
    assert [r for _, r, _ in results] == ["error"]


async def test_the_deadline_covers_the_whole_request() -> None:
    transport = SlowTransport(delay=5.0)
    client = create_client(BASE, timedelta(milliseconds=100), transport=transport)
    mail = RestMailSender(client)
    started = time.perf_counter()
    try:
        with pytest.raises(ServiceUnavailable) as caught:
            await mail.send_login_code(MESSAGE)
    finally:
        await client.aclose()

    assert time.perf_counter() - started < 0.6
    assert transport.calls == 1
    assert caught.value.dependency == "mail_service"


async def test_a_failure_is_logged_once_without_code_or_email(
    router: respx.MockRouter, mail: RestMailSender, logs: pytest.LogCaptureFixture
) -> None:
    router.post(SEND).respond(503, text=f"cannot send {CODE} to {EMAIL}")

    with pytest.raises(ServiceUnavailable) as caught:
        await mail.send_login_code(MESSAGE)

    (record,) = _warnings(logs)
    assert record.getMessage() == "outbound call failed"
    assert record.__dict__["service"] == "mail_service"
    assert record.__dict__["operation"] == "send_login_code"
    assert record.__dict__["status"] == 503
    assert isinstance(record.__dict__["duration_ms"], float)
    _assert_no_secrets(logs)
    assert CODE not in str(caught.value)
    assert EMAIL not in str(caught.value)


async def test_a_transport_failure_is_logged_once_with_the_exception_class(
    router: respx.MockRouter, mail: RestMailSender, logs: pytest.LogCaptureFixture
) -> None:
    router.post(SEND).mock(side_effect=httpx.ConnectError("refused"))

    with pytest.raises(ServiceUnavailable):
        await mail.send_login_code(MESSAGE)

    (record,) = _warnings(logs)
    assert record.__dict__["exception"] == "ConnectError"
    _assert_no_secrets(logs)


async def test_success_logs_nothing(
    router: respx.MockRouter, mail: RestMailSender, logs: pytest.LogCaptureFixture
) -> None:
    router.post(SEND).respond(202)

    await mail.send_login_code(MESSAGE)

    assert [r for r in logs.records if r.name == "authsession.services"] == []
