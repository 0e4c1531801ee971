"""Traces and metrics of CONTRACT §11, in process over a real redis-server.

One :class:`~authsession.telemetry.Telemetry` per test process exports into an
``InMemorySpanExporter`` and an ``InMemoryMetricReader``. The global tracer provider can be
set only once per process, and the Redis adapters and the REST clients trace through the
*global* tracer, so that one object is installed globally once and handed to every core
built here (spans are cleared before each test; metrics are cumulative, so every assertion
compares a data point before and after the requests of the test).

If another test module of the same worker installed its own SDK provider first, the
exporter is attached to that provider as well, so the spans of the Redis adapters and the
REST clients still arrive.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import pytest
import redis.asyncio
from opentelemetry import trace
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from authsession.domain.ports import MailSender, UserDirectory
from authsession.http.internal import create_internal_app
from authsession.http.public import create_public_app
from authsession.services.http_client import create_client
from authsession.services.mail_rest import SERVICE as MAIL_SERVICE
from authsession.services.mail_rest import RestMailSender
from authsession.services.mail_stub import StubMailSender
from authsession.services.users_rest import SERVICE as USER_SERVICE
from authsession.services.users_rest import RestUserDirectory
from authsession.services.users_stub import StubUserDirectory
from authsession.settings import Settings
from authsession.telemetry import Telemetry
from authsession.wiring import Core, build_core
from tests.contract import CONFIRM, SEND
from tests.integration.conftest import ManualClock
from tests.support.fake_services import FakeMailService, FakeUserService
from tests.support.redis_server import RedisServer

REVOKE_ROUTE = "/api/v1/internal/sessions/{device_session_id}/revoke"
LOGIN_CODE = "/api/v1/mail/login-code"

CHALLENGES = "authsession.challenges"
CONFIRMS = "authsession.confirms"
REVOKED = "authsession.sessions.revoked"
PUBLISHES = "authsession.projection.publishes"
OUTBOUND = "authsession.outbound.duration"
SERVER_DURATION = "http.server.request.duration"

CALLER_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"


# --------------------------------------------------------------------------- telemetry
@dataclass
class Recorded:
    """The process-wide telemetry and what it exported."""

    telemetry: Telemetry
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def points(self, name: str) -> dict[frozenset[tuple[str, Any]], float]:
        """Every data point of one instrument: attributes → sum (counter) or count
        (histogram). Cumulative since the process started."""
        found: dict[frozenset[tuple[str, Any]], float] = {}
        data = self.metrics.get_metrics_data()
        if data is None:
            return found
        for resource_metrics in data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    if metric.name != name:
                        continue
                    for point in metric.data.data_points:
                        key = frozenset((point.attributes or {}).items())
                        if isinstance(point, HistogramDataPoint):
                            found[key] = float(point.count)
                        else:
                            assert isinstance(point, NumberDataPoint)
                            found[key] = float(point.value)
        return found

    def value(self, name: str, **attributes: Any) -> float:
        """Sum over the data points of ``name`` whose attributes include ``attributes``."""
        wanted = set(attributes.items())
        return sum(v for k, v in self.points(name).items() if wanted <= set(k))


@functools.cache
def _process_telemetry() -> Recorded:
    """Created once per test process: the global tracer provider can be set only once."""
    exporter = InMemorySpanExporter()
    reader = InMemoryMetricReader()
    telemetry = Telemetry(span_exporters=[exporter], metric_readers=[reader], install_global=True)
    installed = trace.get_tracer_provider()
    if installed is not telemetry.tracer_provider:
        # Another module set the global provider before us: the Redis adapters and the
        # REST clients trace through it, so our exporter must listen there too.
        assert isinstance(installed, TracerProvider), (
            f"the global tracer provider is {type(installed).__name__}, not an SDK provider"
        )
        installed.add_span_processor(SimpleSpanProcessor(exporter))
    return Recorded(telemetry, exporter, reader)


@pytest.fixture(scope="session")
def recorded() -> Recorded:
    return _process_telemetry()


@pytest.fixture(autouse=True)
def _fresh_spans(recorded: Recorded) -> Iterator[None]:
    recorded.spans.clear()
    yield
    recorded.spans.clear()


# --------------------------------------------------------------------------- apps
@dataclass
class TracedApp:
    core: Core
    public: httpx.AsyncClient
    internal: httpx.AsyncClient
    users: UserDirectory
    mail: MailSender


TracedFactory = Callable[..., Awaitable[TracedApp]]


@pytest.fixture
async def make_traced_app(
    redis_server: RedisServer, recorded: Recorded
) -> AsyncIterator[TracedFactory]:
    """Like ``make_app`` of tests/integration/conftest.py, with the process telemetry.

    Every core gets its own key prefix (no FLUSHALL: nothing else is disturbed).
    """
    created: list[tuple[Core, httpx.AsyncClient, httpx.AsyncClient]] = []

    async def factory(
        *, users: UserDirectory | None = None, mail: MailSender | None = None, **overrides: Any
    ) -> TracedApp:
        overrides.setdefault("REDIS_KEY_PREFIX", f"telemetry-{uuid.uuid4().hex[:8]}:")
        overrides.setdefault("SEND_EMAIL_CODE_MIN_DURATION", "0")
        settings = Settings(REDIS_ADDR=redis_server.addr, **overrides)  # type: ignore[call-arg]
        users = users if users is not None else StubUserDirectory()
        mail = mail if mail is not None else StubMailSender()
        client = redis.asyncio.Redis(
            host=redis_server.host, port=redis_server.port, decode_responses=True
        )
        core = build_core(
            settings,
            redis=client,
            users=users,
            mail=mail,
            clock=ManualClock(),
            telemetry=recorded.telemetry,
        )
        await core.check()
        public = httpx.AsyncClient(
            transport=httpx.ASGITransport(
                app=create_public_app(core), client=("203.0.113.7", 40000)
            ),
            base_url="http://public.test",
        )
        internal = httpx.AsyncClient(
            transport=httpx.ASGITransport(
                app=create_internal_app(core), client=("10.0.0.2", 40000)
            ),
            base_url="http://internal.test",
        )
        created.append((core, public, internal))
        # The startup checks are traced too; the tests look at requests only.
        recorded.spans.clear()
        return TracedApp(core, public, internal, users, mail)

    yield factory
    for core, public, internal in created:
        await public.aclose()
        await internal.aclose()
        await core.aclose()


@pytest.fixture
async def traced(make_traced_app: TracedFactory) -> TracedApp:
    return await make_traced_app()


# --------------------------------------------------------------------------- helpers
def new_email() -> str:
    return f"tel.{uuid.uuid4().hex[:12]}@example.com"


def server_spans(spans: Sequence[ReadableSpan]) -> list[ReadableSpan]:
    """The SERVER spans of the service's own request middleware."""
    return [
        s
        for s in spans
        if s.kind is SpanKind.SERVER and "authsession.listener" in (s.attributes or {})
    ]


def only_server_span(spans: Sequence[ReadableSpan], route: str) -> ReadableSpan:
    found = [s for s in server_spans(spans) if (s.attributes or {}).get("http.route") == route]
    assert len(found) == 1, [(s.name, dict(s.attributes or {})) for s in server_spans(spans)]
    return found[0]


def trace_of(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.trace_id


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def descends_from(
    span: ReadableSpan, ancestor: ReadableSpan, spans: Sequence[ReadableSpan]
) -> bool:
    """Whether ``ancestor`` is on the parent chain of ``span`` (within ``spans``)."""
    by_id = {span_id(s): s for s in spans}
    current: ReadableSpan | None = span
    while current is not None and current.parent is not None:
        if current.parent.span_id == span_id(ancestor):
            return True
        current = by_id.get(current.parent.span_id)
    return False


def redis_spans(spans: Sequence[ReadableSpan]) -> list[ReadableSpan]:
    return [
        s
        for s in spans
        if s.kind is SpanKind.CLIENT and (s.attributes or {}).get("db.system.name") == "redis"
    ]


def parse_traceparent(value: str | None) -> tuple[str, str]:
    """``00-<trace id>-<parent span id>-<flags>`` → (trace id, span id), both lower hex."""
    assert value is not None, "no traceparent header"
    version, trace_id, parent_id, flags = value.split("-")
    assert version == "00"
    assert len(trace_id) == 32
    assert int(trace_id, 16) != 0
    assert len(parent_id) == 16
    assert int(parent_id, 16) != 0
    assert len(flags) == 2
    return trace_id, parent_id


def assert_request_traced(
    span: ReadableSpan, spans: Sequence[ReadableSpan], *, listener: str, route: str
) -> list[ReadableSpan]:
    """The server span's attributes, and its Redis client spans; returns those."""
    attributes = dict(span.attributes or {})
    assert attributes["authsession.listener"] == listener
    assert attributes["http.route"] == route
    assert attributes["http.request.method"] == "POST"
    assert span.name == f"POST {route}"
    children = [s for s in redis_spans(spans) if trace_of(s) == trace_of(span)]
    assert children, f"no Redis client span in the trace of {span.name}"
    for child in children:
        assert child.name.startswith("redis "), child.name
        assert descends_from(child, span, spans), f"{child.name} is not under {span.name}"
    return children


async def send_code(app: TracedApp, email: str) -> tuple[str, str]:
    response = await app.public.post(SEND, json={"email": email})
    assert response.status_code == 200, response.text
    challenge_id = response.json()["challenge_id"]
    assert isinstance(app.mail, StubMailSender)
    code = next(m.code for m in app.mail.messages if m.challenge_id == challenge_id)
    return challenge_id, code


async def login(app: TracedApp, email: str) -> dict[str, Any]:
    challenge_id, code = await send_code(app, email)
    response = await app.public.post(CONFIRM, json={"challenge_id": challenge_id, "code": code})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


# --------------------------------------------------------------------------- tests
async def test_login_traces_each_request_with_its_redis_calls(
    traced: TracedApp, recorded: Recorded
) -> None:
    email = new_email()
    challenge_id, code = await send_code(traced, email)
    response = await traced.public.post(CONFIRM, json={"challenge_id": challenge_id, "code": code})
    assert response.status_code == 200, response.text
    token = response.json()["session_token"]

    spans = recorded.finished()
    send_span = only_server_span(spans, SEND)
    confirm_span = only_server_span(spans, CONFIRM)
    assert trace_of(send_span) != trace_of(confirm_span), "two requests, two traces"
    for span in (send_span, confirm_span):
        assert span.parent is None, "no incoming traceparent: the server span is a root"
        assert span.status.status_code is not StatusCode.ERROR
        assert dict(span.attributes or {})["http.response.status_code"] == 200

    send_redis = assert_request_traced(send_span, spans, listener="public", route=SEND)
    confirm_redis = assert_request_traced(confirm_span, spans, listener="public", route=CONFIRM)
    send_names = {s.name for s in send_redis}
    confirm_names = {s.name for s in confirm_redis}
    assert "redis RedisResendThrottle.acquire" in send_names
    assert "redis RedisChallengeStore.create" in send_names
    assert "redis RedisChallengeStore.attempt" in confirm_names
    assert "redis RedisSessionStore.create" in confirm_names
    assert "redis RedisProjectionPublisher.publish" in confirm_names

    # No secret becomes a span name or attribute.
    for span in spans:
        text = f"{span.name} {dict(span.attributes or {})}"
        for secret in (email, email.split("@")[0], token, token.rsplit(".", 1)[1]):
            assert secret not in text, f"{secret!r} in span {span.name}"


async def test_login_records_the_metrics(traced: TracedApp, recorded: Recorded) -> None:
    before = {
        "sent": recorded.value(CHALLENGES, status="sent"),
        "created": recorded.value(CONFIRMS, result="created"),
        "invalid": recorded.value(CONFIRMS, result="invalid_code"),
        "written": recorded.value(PUBLISHES, result="written"),
        "send": recorded.value(
            SERVER_DURATION, **{"authsession.listener": "public", "http.route": SEND}
        ),
        "confirm": recorded.value(
            SERVER_DURATION,
            **{
                "authsession.listener": "public",
                "http.route": CONFIRM,
                "http.request.method": "POST",
                "http.response.status_code": 200,
            },
        ),
    }
    challenge_id, code = await send_code(traced, new_email())
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    response = await traced.public.post(CONFIRM, json={"challenge_id": challenge_id, "code": wrong})
    assert response.status_code == 400, response.text
    response = await traced.public.post(CONFIRM, json={"challenge_id": challenge_id, "code": code})
    assert response.status_code == 200, response.text

    assert recorded.value(CHALLENGES, status="sent") == before["sent"] + 1
    assert recorded.value(CONFIRMS, result="created") == before["created"] + 1
    assert recorded.value(CONFIRMS, result="invalid_code") == before["invalid"] + 1
    assert recorded.value(PUBLISHES, result="written") == before["written"] + 1
    assert (
        recorded.value(SERVER_DURATION, **{"authsession.listener": "public", "http.route": SEND})
        == before["send"] + 1
    )
    assert (
        recorded.value(
            SERVER_DURATION,
            **{
                "authsession.listener": "public",
                "http.route": CONFIRM,
                "http.request.method": "POST",
                "http.response.status_code": 200,
            },
        )
        == before["confirm"] + 1
    )


async def test_a_logout_is_counted_as_a_revocation_with_reason_logout(
    traced: TracedApp, recorded: Recorded
) -> None:
    session = await login(traced, new_email())
    before = recorded.value(REVOKED, reason="logout")
    written_before = recorded.value(PUBLISHES, result="written")
    headers = {"Authorization": f"Bearer {session['session_token']}"}

    response = await traced.public.post("/api/v1/public/auth/logout", headers=headers)
    assert response.status_code == 200, response.text
    assert recorded.value(REVOKED, reason="logout") == before + 1
    assert recorded.value(PUBLISHES, result="written") == written_before + 1
    # A repeated logout revokes nothing more.
    again = await traced.public.post("/api/v1/public/auth/logout", headers=headers)
    assert again.status_code == 200
    assert recorded.value(REVOKED, reason="logout") == before + 1


async def test_internal_revocation_is_traced_and_counted(
    traced: TracedApp, recorded: Recorded
) -> None:
    session = await login(traced, new_email())
    revoked_before = recorded.value(REVOKED, reason="revoked_by_backend")
    written_before = recorded.value(PUBLISHES, result="written")
    duration_before = recorded.value(
        SERVER_DURATION, **{"authsession.listener": "internal", "http.route": REVOKE_ROUTE}
    )
    recorded.spans.clear()

    response = await traced.internal.post(
        f"/api/v1/internal/sessions/{session['device_session_id']}/revoke"
    )
    assert response.status_code == 200, response.text
    assert response.json()["revoke_reason"] == "revoked_by_backend"

    spans = recorded.finished()
    span = only_server_span(spans, REVOKE_ROUTE)
    children = assert_request_traced(span, spans, listener="internal", route=REVOKE_ROUTE)
    assert "redis RedisSessionStore.revoke" in {s.name for s in children}
    assert recorded.value(REVOKED, reason="revoked_by_backend") == revoked_before + 1
    assert recorded.value(PUBLISHES, result="written") == written_before + 1
    assert (
        recorded.value(
            SERVER_DURATION, **{"authsession.listener": "internal", "http.route": REVOKE_ROUTE}
        )
        == duration_before + 1
    )

    # A repeat revokes nothing new: not counted again.
    response = await traced.internal.post(
        f"/api/v1/internal/sessions/{session['device_session_id']}/revoke"
    )
    assert response.status_code == 200
    assert recorded.value(REVOKED, reason="revoked_by_backend") == revoked_before + 1


async def test_incoming_traceparent_is_continued(traced: TracedApp, recorded: Recorded) -> None:
    response = await traced.public.post(
        SEND,
        json={"email": new_email()},
        headers={"traceparent": f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01"},
    )
    assert response.status_code == 200, response.text
    spans = recorded.finished()
    span = only_server_span(spans, SEND)
    assert format(trace_of(span), "032x") == CALLER_TRACE_ID
    assert span.parent is not None
    assert format(span.parent.span_id, "016x") == CALLER_SPAN_ID
    assert span.parent.is_remote
    # The Redis spans of the request join the caller's trace too.
    assert_request_traced(span, spans, listener="public", route=SEND)


async def test_unmatched_route_is_traced_as_unmatched(
    traced: TracedApp, recorded: Recorded
) -> None:
    response = await traced.internal.get("/api/v1/internal/nowhere")
    assert response.status_code == 404
    spans = server_spans(recorded.finished())
    assert len(spans) == 1
    attributes = dict(spans[0].attributes or {})
    assert attributes["authsession.listener"] == "internal"
    assert attributes["http.route"] == "unmatched"
    assert attributes["http.response.status_code"] == 404


@pytest.fixture
async def rest_app(
    make_traced_app: TracedFactory,
    fake_user_service: FakeUserService,
    fake_mail_service: FakeMailService,
) -> AsyncIterator[TracedApp]:
    """The REST adapters, wired as ``wiring.build_users``/``build_mail`` do, on the fakes."""
    users_client = create_client(fake_user_service.base_url, timedelta(seconds=2))
    mail_client = create_client(fake_mail_service.base_url, timedelta(seconds=2))
    telemetry = _process_telemetry().telemetry
    try:
        yield await make_traced_app(
            users=RestUserDirectory(users_client, on_result=telemetry.outbound),
            mail=RestMailSender(mail_client, on_result=telemetry.outbound),
        )
    finally:
        await users_client.aclose()
        await mail_client.aclose()


async def test_outbound_failure_is_traced_counted_and_propagated(
    rest_app: TracedApp,
    recorded: Recorded,
    fake_user_service: FakeUserService,
    fake_mail_service: FakeMailService,
) -> None:
    email = new_email()
    fake_user_service.add_user(email)
    fake_mail_service.fail_with(500)
    mail_errors = recorded.value(OUTBOUND, service=MAIL_SERVICE, result="error")
    users_ok = recorded.value(OUTBOUND, service=USER_SERVICE, result="ok")
    failed_before = recorded.value(CHALLENGES, status="delivery_failed")

    response = await rest_app.public.post(SEND, json={"email": email})
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "service_unavailable"

    spans = recorded.finished()
    server = only_server_span(spans, SEND)
    assert server.status.status_code is StatusCode.ERROR, "a 503 is a failed request"
    outbound = [
        s
        for s in spans
        if s.kind is SpanKind.CLIENT and (s.attributes or {}).get("authsession.service")
    ]
    by_service = {str((s.attributes or {})["authsession.service"]): s for s in outbound}
    assert set(by_service) == {USER_SERVICE, MAIL_SERVICE}, [s.name for s in outbound]
    mail_span = by_service[MAIL_SERVICE]
    assert mail_span.name == f"POST {LOGIN_CODE}"
    assert mail_span.status.status_code is StatusCode.ERROR
    assert dict(mail_span.attributes or {})["http.response.status_code"] == 500
    user_span = by_service[USER_SERVICE]
    assert user_span.status.status_code is not StatusCode.ERROR
    for span in (mail_span, user_span):
        assert trace_of(span) == trace_of(server)
        assert descends_from(span, server, spans)
        assert email not in str(dict(span.attributes or {}))

    assert recorded.value(OUTBOUND, service=MAIL_SERVICE, result="error") == mail_errors + 1
    assert recorded.value(OUTBOUND, service=USER_SERVICE, result="ok") == users_ok + 1
    assert recorded.value(CHALLENGES, status="delivery_failed") == failed_before + 1

    # Trace context reached both services: same trace, and the client span as parent.
    server_trace = format(trace_of(server), "032x")
    for service, span, path in (
        (fake_user_service, user_span, "/api/v1/users/resolve-by-email"),
        (fake_mail_service, mail_span, LOGIN_CODE),
    ):
        (request,) = service.requests_to(path)
        trace_id, parent_id = parse_traceparent(request.header("traceparent"))
        assert trace_id == server_trace
        assert parent_id == format(span_id(span), "016x")


async def test_outbound_success_is_counted_ok(
    rest_app: TracedApp,
    recorded: Recorded,
    fake_user_service: FakeUserService,
    fake_mail_service: FakeMailService,
) -> None:
    email = new_email()
    mail_ok = recorded.value(OUTBOUND, service=MAIL_SERVICE, result="ok")
    users_ok = recorded.value(OUTBOUND, service=USER_SERVICE, result="ok")

    response = await rest_app.public.post(
        SEND,
        json={"email": email},
        headers={"traceparent": f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01"},
    )
    assert response.status_code == 200, response.text
    challenge_id = response.json()["challenge_id"]
    code = fake_mail_service.last_code_for(email)
    assert code is not None
    response = await rest_app.public.post(
        CONFIRM, json={"challenge_id": challenge_id, "code": code}
    )
    assert response.status_code == 200, response.text

    # resolve (unknown e-mail) and mail at send, ensure (signup) at confirm.
    assert recorded.value(OUTBOUND, service=USER_SERVICE, result="ok") == users_ok + 2
    assert recorded.value(OUTBOUND, service=MAIL_SERVICE, result="ok") == mail_ok + 1
    # The caller's trace goes on to the mail service.
    (message,) = fake_mail_service.messages_for(email)
    trace_id, _ = parse_traceparent(message.headers.get("traceparent"))
    assert trace_id == CALLER_TRACE_ID
    (ensure,) = fake_user_service.requests_to("/api/v1/users/ensure")
    confirm_span = only_server_span(recorded.finished(), CONFIRM)
    trace_id, _ = parse_traceparent(ensure.header("traceparent"))
    assert trace_id == format(trace_of(confirm_span), "032x")


# FastAPI >= 0.165 instruments every app by itself once a global SDK provider exists; left
# on, each request got a second SERVER span (without the listener) in a separate trace and
# a second http.server.request.duration stream. These two tests guard against that.


async def test_one_request_is_one_trace_with_one_server_span(
    traced: TracedApp, recorded: Recorded
) -> None:
    response = await traced.public.post(SEND, json={"email": new_email()})
    assert response.status_code == 200, response.text
    spans = recorded.finished()
    every_server_span = [s for s in spans if s.kind is SpanKind.SERVER]
    assert [s.name for s in every_server_span] == [f"POST {SEND}"]
    assert "authsession.listener" in (every_server_span[0].attributes or {})
    assert len({trace_of(s) for s in spans}) == 1, "one request, one trace"


async def test_server_duration_is_recorded_once_per_request(
    traced: TracedApp, recorded: Recorded
) -> None:
    before = sum(recorded.points(SERVER_DURATION).values())
    response = await traced.internal.get("/api/v1/internal/users/nobody/sessions")
    assert response.status_code == 200, response.text
    after = recorded.points(SERVER_DURATION)
    assert sum(after.values()) == before + 1
    for attributes in after:
        assert "authsession.listener" in dict(attributes), dict(attributes)


async def test_the_reconciler_counts_drift_by_kind_and_makes_no_spans_in_the_background(
    make_traced_app: TracedFactory, recorded: Recorded, redis_server: RedisServer
) -> None:
    tag = uuid.uuid4().hex[:8]
    snapshots = f"gw-{tag}:session:"
    app = await make_traced_app(
        GATEWAY_SESSION_KEY_PREFIX=snapshots, GATEWAY_SESSION_EVENTS_STREAM=f"gw-{tag}:events"
    )
    sid = (await login(app, new_email()))["device_session_id"]
    client = redis_server.client()
    try:
        client.delete(snapshots + sid)
    finally:
        client.close()
    before = recorded.value("authsession.projection.drift", kind="missing_snapshot")
    recorded.spans.clear()

    # The periodic job: it repairs and counts, and its Redis calls make no spans.
    from authsession.redis.base import PeriodicTask

    task = PeriodicTask(
        "test-reconcile",
        timedelta(seconds=10),
        functools.partial(app.core.reconciler.run, repair=True),
        "failed",
    )
    task.start()
    for _ in range(100):
        if recorded.value("authsession.projection.drift", kind="missing_snapshot") > before:
            break
        await asyncio.sleep(0.02)
    await task.stop()

    assert recorded.value("authsession.projection.drift", kind="missing_snapshot") == before + 1
    assert redis_spans(recorded.finished()) == []
