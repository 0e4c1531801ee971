"""The pieces every request passes (request id, telemetry, body limit), driven over raw ASGI.

Raw ASGI rather than an HTTP client, so that a client leaving mid-body and a body sent
in chunks can be played exactly.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message

from authsession.http.middleware import MAX_BODY_BYTES, add_request_context
from authsession.telemetry import Telemetry, request_id_var


class CountingTelemetry(Telemetry):
    """The real instruments, plus a list of what the server side counted."""

    def __init__(self) -> None:
        super().__init__(install_global=False)
        self.served: list[tuple[str, str, str, int]] = []

    def server_request(
        self, listener: str, method: str, route: str, status: int, seconds: float
    ) -> None:
        """Remember the request, then record it as usual."""
        self.served.append((listener, method, route, status))
        super().server_request(listener, method, route, status, seconds)


async def echo(request: Request) -> Response:
    return Response(await request.body(), headers={"Cache-Control": "public"})


async def boom(request: Request) -> Response:
    raise RuntimeError("the cause stays in the log")


async def seen_request_id(request: Request) -> Response:
    return Response(f"{request.state.request_id} {request_id_var.get()}")


@pytest.fixture
def telemetry() -> CountingTelemetry:
    return CountingTelemetry()


@pytest.fixture
def app(telemetry: CountingTelemetry) -> Starlette:
    app = Starlette(
        routes=[
            Route("/echo", echo, methods=["POST"]),
            Route("/boom", boom),
            Route("/id", seen_request_id),
        ]
    )
    add_request_context(app, "public", telemetry)
    return app


async def call(
    app: Starlette,
    path: str,
    chunks: list[bytes] | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    leave_early: bool = False,
) -> tuple[int | None, dict[bytes, bytes], bytes]:
    """One request; the status (None when nothing was sent), the headers and the body."""
    incoming: list[Message] = [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks or []) - 1}
        for i, chunk in enumerate(chunks or [b""])
    ]
    if leave_early:
        incoming[-1] = {"type": "http.disconnect"}
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST" if chunks is not None else "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers or [],
        "client": ("203.0.113.7", 40000),
        "server": ("public.test", 80),
    }
    await app(scope, receive, send)
    if not sent:
        return None, {}, b""
    start = sent[0]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], dict(start["headers"]), body


def access_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "authsession.access" and r.msg == "request"]


def assert_context_headers(headers: dict[bytes, bytes]) -> None:
    assert headers[b"cache-control"] == b"no-store"
    assert len(headers[b"x-request-id"]) == 32


async def test_a_response_gets_no_store_and_a_request_id(
    app: Starlette, telemetry: CountingTelemetry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "authsession.access")
    status, headers, body = await call(app, "/echo", [b'{"a":', b"1}"])
    assert (status, body) == (200, b'{"a":1}')
    assert_context_headers(headers)
    assert telemetry.served == [("public", "POST", "/echo", 200)]
    (line,) = access_lines(caplog)
    assert (line.route, line.status) == ("/echo", 200)  # type: ignore[attr-defined]


async def test_a_sane_request_id_is_echoed_and_seen_by_the_app(app: Starlette) -> None:
    _, headers, body = await call(app, "/id", headers=[(b"x-request-id", b"abc-1")])
    assert headers[b"x-request-id"] == b"abc-1"
    assert body == b"abc-1 abc-1"
    _, headers, _ = await call(app, "/id", headers=[(b"x-request-id", b"no spaces")])
    assert headers[b"x-request-id"] != b"no spaces"


@pytest.mark.parametrize(
    ("chunks", "headers"),
    [
        ([b"{}"], [(b"content-length", str(MAX_BODY_BYTES + 1).encode())]),
        ([b"x" * MAX_BODY_BYTES, b"x"], []),
    ],
    ids=["declared", "chunked"],
)
async def test_an_oversized_body_is_a_413_with_the_headers_logged_and_counted(
    app: Starlette,
    telemetry: CountingTelemetry,
    caplog: pytest.LogCaptureFixture,
    chunks: list[bytes],
    headers: list[tuple[bytes, bytes]],
) -> None:
    caplog.set_level(logging.INFO, "authsession.access")
    status, sent_headers, body = await call(app, "/echo", chunks, headers)
    assert status == 413
    assert_context_headers(sent_headers)
    assert json.loads(body)["error"]["code"] == "payload_too_large"
    assert telemetry.served == [("public", "POST", "unmatched", 413)]
    assert [r.status for r in access_lines(caplog)] == [413]  # type: ignore[attr-defined]


async def test_an_unexpected_failure_is_the_json_500_with_the_headers(
    app: Starlette, telemetry: CountingTelemetry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "authsession")
    status, headers, body = await call(app, "/boom")
    assert status == 500
    assert_context_headers(headers)
    assert json.loads(body) == {"error": {"code": "internal_error", "message": "internal error"}}
    assert telemetry.served == [("public", "GET", "/boom", 500)]
    assert any(r.msg == "unexpected failure" for r in caplog.records)
    assert [r.status for r in access_lines(caplog)] == [500]  # type: ignore[attr-defined]


async def test_a_client_leaving_mid_body_is_logged_as_499_and_answered_nothing(
    app: Starlette, telemetry: CountingTelemetry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "authsession")
    status, _, _ = await call(app, "/echo", [b"{", b"}"], leave_early=True)
    assert status is None
    assert telemetry.served == [("public", "POST", "unmatched", 499)]
    assert not any(r.msg == "unexpected failure" for r in caplog.records)
    assert [r.status for r in access_lines(caplog)] == [499]  # type: ignore[attr-defined]
