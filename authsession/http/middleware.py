"""Pure-ASGI middleware: request id, body limit, telemetry (both apps), rate limit, bearer, CORS.

Pure ASGI (not ``BaseHTTPMiddleware``) keeps the per-request overhead small and lets the
body limit act on the stream before the app reads it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
import secrets
import time
from collections.abc import Sequence

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from authsession.domain.errors import InvalidRequest, ServiceUnavailable, Unauthorized
from authsession.domain.ports import Clock, ConfigProvider
from authsession.http.errors import (
    InternalError,
    PayloadTooLarge,
    RateLimited,
    error_response,
    send_error,
)
from authsession.http.ports import RateLimiter
from authsession.telemetry import Telemetry, request_id_var

log = logging.getLogger("authsession.access")

MAX_BODY_BYTES = 16 * 1024
# What a caller's X-Request-ID must look like to be echoed (the server's errors too).
SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


class _ClientGone(Exception):
    """The client closed the connection before its body was complete (logged as 499)."""


class BodyLimitMiddleware:
    """The 16 KiB body limit, on the declared length and on the bytes actually received.

    The whole body is read here, once, so that an oversized chunked body is a 413
    whatever the app does with a failing ``receive()``; the app reads it back from memory.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            await send_error(scope, receive, send, PayloadTooLarge())
            return
        body = await _read_body(receive)
        if body is None:
            await send_error(scope, receive, send, PayloadTooLarge())
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _read_body(receive: Receive) -> bytes | None:
    """The whole body, or ``None`` once it exceeds the limit; raises if the client left."""
    chunks: list[bytes] = []
    received = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise _ClientGone
        chunk = message.get("body", b"")
        received += len(chunk)
        if received > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class RequestIdMiddleware:
    """``X-Request-ID`` in and out (logs carry it) and ``Cache-Control: no-store``.

    Outermost, so that every answer of the pieces inside (a 413, the JSON 500) has both.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _header(scope, b"x-request-id")
        request_id = (
            incoming if incoming and SANE_REQUEST_ID.fullmatch(incoming) else secrets.token_hex(16)
        )
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        extra_headers = [
            (b"cache-control", b"no-store"),
            (b"x-request-id", request_id.encode()),
        ]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v)
                    for k, v in message.get("headers", [])
                    if k.lower() not in (b"cache-control", b"x-request-id")
                ]
                message = {**message, "headers": headers + extra_headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            request_id_var.reset(token)


class TelemetryMiddleware:
    """The server span, the duration histogram and the access log; the JSON 500.

    An unexpected failure is answered here rather than by Starlette's outermost error
    middleware, so that the 500 carries the same headers as every other response.
    """

    def __init__(self, app: ASGIApp, listener: str, telemetry: Telemetry) -> None:
        self.app = app
        self.listener = listener
        self.telemetry = telemetry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = str(scope.get("method", ""))
        span = self._start_span(scope, method)
        span_token = otel_context.attach(trace.set_span_in_context(span))
        started = time.perf_counter()
        status: int | None = None

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        except _ClientGone:
            status = 499
        except Exception as exc:
            log.error("unexpected failure", exc_info=exc)
            span.record_exception(exc)
            if status is None:
                await send_error(scope, receive, send_and_record, InternalError())
        finally:
            elapsed = time.perf_counter() - started
            self._finish(scope, span, method, 500 if status is None else status, elapsed)
            otel_context.detach(span_token)

    def _start_span(self, scope: Scope, method: str) -> Span:
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        return self.telemetry.tracer.start_span(
            f"{method} {self.listener}",
            context=propagate.extract(carrier),
            kind=SpanKind.SERVER,
            # No url.path: ids in paths (user ids may be addresses) stay out of traces;
            # http.route (the template) is added once routing is known.
            attributes={"authsession.listener": self.listener, "http.request.method": method},
        )

    def _finish(self, scope: Scope, span: Span, method: str, status: int, elapsed: float) -> None:
        route = scope.get("route")
        route_path = str(getattr(route, "path", "")) or "unmatched"
        span.update_name(f"{method} {route_path}")
        span.set_attribute("http.route", route_path)
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(StatusCode.ERROR)
        self.telemetry.server_request(self.listener, method, route_path, status, elapsed)
        # Logged while the span is current, so the line carries the request's trace id.
        log.info(
            "request",
            extra={
                "listener": self.listener,
                "method": method,
                # The route template, not the path: ids in paths (user ids may be
                # addresses) stay out of the access log.
                "route": route_path,
                "status": status,
                "duration_ms": round(elapsed * 1000, 3),
            },
        )
        span.end()


def add_request_context(app: Starlette, listener: str, telemetry: Telemetry) -> None:
    """Wrap an app in the pieces every request passes, outermost last.

    The request id is outermost (every answer carries it and the logs see it), then the
    telemetry (it counts and logs what the body limit answers), then the body limit.
    """
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(TelemetryMiddleware, listener=listener, telemetry=telemetry)
    app.add_middleware(RequestIdMiddleware)


def client_ip(
    scope: Scope, trusted: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> str:
    """The peer address, or the nearest untrusted ``X-Forwarded-For`` hop behind a trusted proxy."""
    peer = (scope.get("client") or ("", 0))[0] or "unknown"
    if not trusted or not _is_trusted(peer, trusted):
        return str(peer)
    # Every X-Forwarded-For line, in order: a proxy may append its own line after one
    # the client sent, and only the whole list tells which hop the proxy saw.
    forwarded = ",".join(
        value.decode("latin-1") for key, value in scope["headers"] if key == b"x-forwarded-for"
    )
    if not forwarded:
        return str(peer)
    hops = [h.strip() for h in forwarded.split(",") if h.strip()]
    # Walk from the nearest hop; the first address we do not trust is the client.
    for hop in reversed(hops):
        if not _is_trusted(hop, trusted):
            return _valid_ip(hop) or str(peer)
    return _valid_ip(hops[0]) or str(peer) if hops else str(peer)


def _valid_ip(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _is_trusted(
    address: str, trusted: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def rate_limit_bucket(client: str, ipv6_prefix: int) -> str:
    """The per-IP rate-limit bucket of a client address, as it appears in the Redis key.

    An IPv4 address (or an IPv4-mapped IPv6 one) is its own bucket. An IPv6 client is
    bucketed by its ``/ipv6_prefix`` network (a /64 is what one subscriber or one host
    gets, so counting single addresses would let it rotate freely), written in canonical
    form with ``-`` for ``:`` so that the key ``<prefix>ratelimit:<bucket>:<window>`` stays
    unambiguous, e.g. ``2001-db8-1-2--/64``. Anything that is not an address is used as is.
    """
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return client.replace(":", "-")
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is None:
            # int() drops a zone id (fe80::1%eth0): the bucket is the network alone.
            network = ipaddress.IPv6Network((int(address), ipv6_prefix), strict=False)
            return network.compressed.replace(":", "-")
        address = mapped
    return str(address)


class RateLimitMiddleware:
    """Per-client-IP limit of the public listener, counted in Redis (shared by replicas).

    The limit comes from the runtime config, so it can change without a restart. If Redis
    cannot count, the request goes through: the endpoints themselves then answer 503.
    IPv6 clients are counted per network (see :func:`rate_limit_bucket`).
    """

    def __init__(
        self,
        app: ASGIApp,
        limiter: RateLimiter,
        config: ConfigProvider,
        clock: Clock,
        trusted: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
        ipv6_prefix: int = 64,
    ) -> None:
        self.app = app
        self.limiter = limiter
        self.config = config
        self.clock = clock
        self.trusted = trusted
        self.ipv6_prefix = ipv6_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.config.current().public_rate_limit
        if scope["type"] != "http" or limit is None or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        bucket = rate_limit_bucket(client_ip(scope, self.trusted), self.ipv6_prefix)
        try:
            retry_after = await self.limiter.hit(bucket, limit, self.clock.now())
        except ServiceUnavailable as exc:
            log.warning("rate limiter unavailable, request allowed", extra={"cause": exc.cause})
            retry_after = None
        if retry_after is not None:
            await send_error(scope, receive, send, RateLimited(retry_after))
            return
        await self.app(scope, receive, send)


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class BearerTokenMiddleware:
    """``Authorization: Bearer <token>`` on every request, any of the configured tokens.

    Several tokens are accepted at once so that a token can be rotated without downtime.
    The presented token is compared with every configured one, always all of them, on
    SHA-256 digests (equal lengths, ``secrets.compare_digest``): neither the time taken
    nor an early exit tells which token, or how much of one, matched. The scheme is
    case-insensitive (RFC 9110 §11.1).
    """

    def __init__(self, app: ASGIApp, tokens: Sequence[str]) -> None:
        if not tokens:
            raise ValueError("at least one token is required")
        self.app = app
        self.expected = [_digest(token.encode()) for token in tokens]

    def accepts(self, header: bytes) -> bool:
        """Whether an ``Authorization`` value carries one of the tokens."""
        scheme, _, credentials = header.strip(b" \t").partition(b" ")
        presented = _digest(credentials.strip(b" \t"))
        matched = False
        for expected in self.expected:
            matched |= secrets.compare_digest(presented, expected)
        return matched and scheme.lower() == b"bearer" and bool(credentials.strip(b" \t"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            presented = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not self.accepts(presented):
                await send_error(scope, receive, send, Unauthorized())
                return
        await self.app(scope, receive, send)


class ContractCORSMiddleware(CORSMiddleware):
    """Starlette's CORS, with a rejected preflight answered by the contract's error body."""

    def preflight_response(self, request_headers: Headers) -> Response:
        """Starlette's preflight answer; a failure becomes ``400 invalid_request`` JSON."""
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        headers = {
            k: v
            for k, v in response.headers.items()
            if k.lower() not in ("content-length", "content-type")
        }
        reason = bytes(response.body).decode("utf-8", "replace") or "CORS preflight rejected"
        return error_response(InvalidRequest(reason), headers)
