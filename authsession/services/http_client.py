"""Outbound HTTP plumbing shared by the REST adapters (CONTRACT §8).

One :class:`httpx.AsyncClient` per service, made by :func:`create_client` at startup and
closed at shutdown. Every call goes through :class:`ServiceCaller`, which gives each
attempt a CLIENT span with a W3C ``traceparent`` header, a whole-request deadline and a
duration for the ``on_result`` hook, classifies what went wrong (:class:`OutboundFailure`),
retries where the caller allows it, and turns the failure that ends the call into
``ServiceUnavailable``, logged exactly once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from typing import Literal, TypeVar

import httpx
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from pydantic import TypeAdapter, ValidationError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_none,
)

from authsession.domain.errors import ServiceUnavailable

__all__ = [
    "RETRYABLE_STATUSES",
    "OnResult",
    "OutboundFailure",
    "ServiceCaller",
    "UnexpectedResponse",
    "create_client",
    "expect_json",
    "expect_success",
    "request_budget",
    "send_json",
]

T = TypeVar("T")

OnResult = Callable[[str, str, float], None]
"""Telemetry hook: ``(service, result, seconds)`` with ``result`` ``"ok"`` or ``"error"``."""

RETRYABLE_STATUSES = frozenset({502, 503, 504})
"""Answers that mean "the service (or its proxy) could not answer this time"."""

logger = logging.getLogger("authsession.services")
_tracer = trace.get_tracer("authsession.services")

# Sized for a few hundred logins per second per replica: the user and mail services are
# called at most twice per login, and each call holds a connection for one timeout at most.
_DEFAULT_PORTS = {"http": 80, "https": 443}
_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=30.0)


def create_client(
    base_url: str,
    timeout: timedelta,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """Create the one shared client of a service; the caller closes it at shutdown."""
    seconds = timeout.total_seconds()
    if seconds <= 0:
        raise ValueError(f"the request timeout must be positive, got {timeout}")
    return httpx.AsyncClient(
        base_url=base_url,
        # httpx bounds each phase (connect, write, read, pool wait) separately, so a slow
        # trickle can exceed this; ServiceCaller adds the whole-request deadline on top.
        timeout=httpx.Timeout(seconds),
        limits=_LIMITS,
        headers={"Accept": "application/json"},
        # A redirect is not part of the contract; it is reported as a failure, not followed.
        follow_redirects=False,
        transport=transport,
    )


def request_budget(client: httpx.AsyncClient) -> float | None:
    """The whole-request budget in seconds of a client (``None``: the client has no bound).

    :func:`create_client` sets every phase to the configured timeout, so the largest phase
    bound *is* the budget; reading it back keeps a single source for the number.
    """
    t = client.timeout
    phases = [p for p in (t.connect, t.read, t.write, t.pool) if p is not None]
    return max(phases) if phases else None


async def send_json(
    client: httpx.AsyncClient,
    *,
    service: str,
    method: str,
    path: str,
    route: str,
    body: Mapping[str, object] | None,
    headers: Mapping[str, str] | None = None,
) -> httpx.Response:
    """Send one JSON request (no body for ``None``) in a CLIENT span with ``traceparent``,
    within the client's budget.

    ``route`` is the path template used as the span name, so ids never become span names.
    Raises the ``httpx.HTTPError`` of a failed exchange, or ``TimeoutError`` past the budget.
    """
    request = client.build_request(
        method, path, json=dict(body) if body is not None else None, headers=headers
    )
    # The route template, never the URL: a path may carry a user id (the block call), and
    # ids stay out of traces as they do on the server side.
    attributes: dict[str, str | int] = {
        "http.request.method": method,
        "url.scheme": request.url.scheme,
        "url.template": route,
        "server.address": request.url.host,
        "authsession.service": service,
    }
    port = request.url.port or _DEFAULT_PORTS.get(request.url.scheme)
    if port is not None:
        attributes["server.port"] = port
    with _tracer.start_as_current_span(
        f"{method} {route}", kind=SpanKind.CLIENT, attributes=attributes
    ) as span:
        # Injected while the span is current, so the service sees this span as its parent.
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        request.headers.update(carrier)
        try:
            async with asyncio.timeout(request_budget(client)):
                response = await client.send(request)
        except Exception as exc:
            span.set_attribute("error.type", type(exc).__name__)
            raise
        span.set_attribute("http.response.status_code", response.status_code)
        if response.status_code >= 400:
            span.set_attribute("error.type", str(response.status_code))
            span.set_status(Status(StatusCode.ERROR))
        return response


class UnexpectedResponse(Exception):
    """The service answered, but not as the contract says (status or body)."""

    def __init__(self, reason: Literal["http_status", "invalid_body"], detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def expect_json(response: httpx.Response, schema: TypeAdapter[T]) -> T:
    """Validate a 2xx JSON answer against ``schema``; anything else is ``UnexpectedResponse``."""
    if not response.is_success:
        raise UnexpectedResponse("http_status", f"HTTP {response.status_code}")
    try:
        return schema.validate_json(response.content)
    except ValidationError as exc:
        # Only locations and error types: pydantic's messages may quote the input (a union
        # tag, for one), and the service may echo the e-mail it was sent.
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'body'}: {error['type']}"
            for error in exc.errors(include_url=False, include_context=False, include_input=False)
        )
        raise UnexpectedResponse("invalid_body", f"invalid response body ({problems})") from None


def expect_success(response: httpx.Response) -> None:
    """Accept any 2xx answer and ignore its body."""
    if not response.is_success:
        raise UnexpectedResponse("http_status", f"HTTP {response.status_code}")


FailureReason = Literal["http_status", "invalid_body", "transport", "timeout"]


class OutboundFailure(Exception):
    """One failed outbound call, with what the retry decision and the log need.

    Nothing in it comes from the request body, so it can be logged as a whole.
    """

    def __init__(
        self,
        service: str,
        operation: str,
        *,
        reason: FailureReason,
        cause: str,
        duration: float,
        status: int | None = None,
        exception: str | None = None,
    ) -> None:
        super().__init__(cause)
        self.service = service
        self.operation = operation
        self.reason = reason
        self.cause = cause
        self.duration = duration
        self.status = status
        self.exception = exception

    @property
    def retryable(self) -> bool:
        """A transport error, a timeout, or 502/503/504: worth one more try where allowed."""
        if self.reason in ("transport", "timeout"):
            return True
        return self.reason == "http_status" and self.status in RETRYABLE_STATUSES

    def log(self, level: int, message: str = "outbound call failed", **fields: object) -> None:
        """Log this failure once, with the service, operation, status or exception, duration."""
        extra: dict[str, object] = {
            "service": self.service,
            "operation": self.operation,
            "reason": self.reason,
            "duration_ms": round(self.duration * 1000, 1),
        }
        if self.status is not None:
            extra["status"] = self.status
        if self.exception is not None:
            extra["exception"] = self.exception
        extra.update(fields)
        logger.log(level, message, extra=extra)

    def unavailable(self) -> ServiceUnavailable:
        """The domain error the caller answers with (``503 service_unavailable``)."""
        return ServiceUnavailable(self.service, self.cause)


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, OutboundFailure) and exc.retryable


def _log_retry(state: RetryCallState) -> None:
    failure = state.outcome.exception() if state.outcome is not None else None
    if isinstance(failure, OutboundFailure):
        # The retry may still succeed, so this is not yet a failure of the login.
        failure.log(logging.INFO, "outbound call failed, retrying", attempt=state.attempt_number)


class ServiceCaller:
    """Makes the calls of one outbound service: traced, bounded, timed, retried, logged."""

    def __init__(
        self, client: httpx.AsyncClient, service: str, on_result: OnResult | None = None
    ) -> None:
        self.client = client
        self.service = service
        self._on_result = on_result

    async def call(
        self,
        operation: str,
        *,
        route: str,
        body: Mapping[str, object] | None,
        parse: Callable[[httpx.Response], T],
        path: str | None = None,
        headers: Mapping[str, str] | None = None,
        method: str = "POST",
        attempts: int = 1,
    ) -> T:
        """Send, then ``parse`` the answer; up to ``attempts`` tries while failures are retryable.

        ``path`` defaults to ``route`` (a route without parameters). Each retried failure is
        an info line; the failure that ends the call is logged once, at warning, and raised
        as ``ServiceUnavailable``.
        """
        send = functools.partial(
            send_json,
            self.client,
            service=self.service,
            method=method,
            path=route if path is None else path,
            route=route,
            body=body,
            headers=headers,
        )
        retrying = AsyncRetrying(
            stop=stop_after_attempt(attempts),
            wait=wait_none(),
            retry=retry_if_exception(_is_retryable),
            before_sleep=_log_retry,
            reraise=True,
        )
        try:
            result: T = await retrying(self._attempt, operation, send, parse)
        except OutboundFailure as failure:
            # Only a call that may be retried says how many tries it took.
            tries = {"attempts": retrying.statistics["attempt_number"]} if attempts > 1 else {}
            failure.log(logging.WARNING, **tries)
            raise failure.unavailable() from failure
        return result

    async def _attempt(
        self,
        operation: str,
        send: Callable[[], Awaitable[httpx.Response]],
        parse: Callable[[httpx.Response], T],
    ) -> T:
        """One attempt, reported to ``on_result``; raises ``OutboundFailure``, never logs."""
        started = time.perf_counter()
        try:
            result = await self._classified(operation, started, send, parse)
        except OutboundFailure as failure:
            self._record("error", failure.duration)
            raise
        self._record("ok", time.perf_counter() - started)
        return result

    async def _classified(
        self,
        operation: str,
        started: float,
        send: Callable[[], Awaitable[httpx.Response]],
        parse: Callable[[httpx.Response], T],
    ) -> T:
        try:
            response = await send()
        except TimeoutError as exc:
            budget = request_budget(self.client)
            raise self._failure(
                operation,
                started,
                reason="timeout",
                exception=type(exc).__name__,
                cause=f"{operation}: no complete answer within {budget}s",
            ) from exc
        except httpx.HTTPError as exc:
            timed_out = isinstance(exc, httpx.TimeoutException)
            # Transport messages ("Connection refused") help operators and never carry the
            # request body; they are capped so a chatty proxy cannot flood the logs.
            message = str(exc)[:200]
            raise self._failure(
                operation,
                started,
                reason="timeout" if timed_out else "transport",
                exception=type(exc).__name__,
                cause=f"{operation}: {type(exc).__name__}" + (f": {message}" if message else ""),
            ) from exc
        try:
            return parse(response)
        except UnexpectedResponse as exc:
            raise self._failure(
                operation,
                started,
                reason=exc.reason,
                status=response.status_code,
                cause=f"{operation}: {exc.detail}",
            ) from exc

    def _failure(
        self,
        operation: str,
        started: float,
        *,
        reason: FailureReason,
        cause: str,
        status: int | None = None,
        exception: str | None = None,
    ) -> OutboundFailure:
        return OutboundFailure(
            self.service,
            operation,
            reason=reason,
            cause=cause,
            duration=time.perf_counter() - started,
            status=status,
            exception=exception,
        )

    def _record(self, result: Literal["ok", "error"], seconds: float) -> None:
        if self._on_result is None:
            return
        try:
            self._on_result(self.service, result, seconds)
        except Exception:
            # A broken telemetry hook must never turn a good login into a failed one.
            logger.exception("outbound on_result hook failed", extra={"service": self.service})
