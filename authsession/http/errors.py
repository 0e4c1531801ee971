"""Errors → HTTP status and the contract's error body. The only such mapping.

Every error body the service writes comes from here, whichever layer produced it:
route handlers (domain errors raised by the core), FastAPI's own routing and validation
(404, 405, 400), the pure-ASGI middleware (body limit, rate limit, bearer check, an
unexpected failure) and the HTTP server itself (a malformed request line or headers, a
listener at its connection limit), which writes raw bytes through :func:`wire_response`.

The HTTP layer adds the few errors the domain does not know::

    AuthSessionError (domain)
    └── HttpError
        ├── NotFound           not_found
        ├── MethodNotAllowed   method_not_allowed
        ├── PayloadTooLarge    payload_too_large
        ├── RateLimited        rate_limited        (retry_after seconds)
        ├── InternalError      internal_error
        └── Overloaded         service_unavailable (a listener at its connection limit)
"""

from __future__ import annotations

import http
import json
import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from authsession.domain import errors as e

log = logging.getLogger("authsession.http")


class HttpError(e.AuthSessionError):
    """An error only the HTTP layer produces (routing, body and rate limits, server)."""


class NotFound(HttpError):
    """No route matches the path (a trailing slash included: there are no redirects)."""

    code = "not_found"
    default_message = "no such route"


class MethodNotAllowed(HttpError):
    """The route exists, the method does not."""

    code = "method_not_allowed"
    default_message = "method not allowed"


class PayloadTooLarge(HttpError):
    """The body is over 16 KiB."""

    code = "payload_too_large"
    default_message = "the request body exceeds 16 KiB"


class RateLimited(HttpError):
    """The per-client-IP limit of the public listener is exceeded."""

    code = "rate_limited"
    default_message = "too many requests"

    def __init__(self, retry_after: int) -> None:
        super().__init__()
        self.retry_after = retry_after


class InternalError(HttpError):
    """An unexpected failure; the body never carries its cause."""

    code = "internal_error"
    default_message = "internal error"


class Overloaded(HttpError):
    """The listener holds its maximum number of connections."""

    code = "service_unavailable"
    default_message = "the server has too many connections, retry later"


# The contract's code → status table (CONTRACT §4 and §12).
STATUS: dict[str, int] = {
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


def status_of(exc: e.AuthSessionError) -> int:
    """The HTTP status of an error (500 for a code the table does not know)."""
    return STATUS.get(exc.code, 500)


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"error": {"code", "message", "details"?}}``."""
    error: dict[str, Any] = {"code": code, "message": message}
    if details:
        error["details"] = details
    return {"error": error}


def _headers_of(exc: e.AuthSessionError) -> dict[str, str]:
    if isinstance(exc, RateLimited):
        return {"Retry-After": str(exc.retry_after)}
    if isinstance(exc, e.Unauthorized):
        return {"WWW-Authenticate": "Bearer"}
    return {}


def error_response(
    exc: e.AuthSessionError, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The JSON response for one error (also a complete ASGI app, for middleware)."""
    if isinstance(exc, e.ServiceUnavailable):
        log.warning(
            "dependency unavailable",
            extra={"dependency": exc.dependency, "cause": exc.cause},
        )
    return JSONResponse(
        error_body(exc.code, exc.message, exc.details),
        status_code=status_of(exc),
        headers={**_headers_of(exc), **(headers or {})},
    )


async def send_error(
    scope: Scope,
    receive: Receive,
    send: Send,
    exc: e.AuthSessionError,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Answer a request from pure-ASGI middleware with the error's response."""
    await error_response(exc, headers)(scope, receive, send)


def wire_response(
    exc: e.AuthSessionError, request_id: str, headers: Mapping[str, str] | None = None
) -> bytes:
    """A whole HTTP/1.1 response, for errors the server writes before any app runs.

    It carries what every response carries (``Cache-Control: no-store``, ``X-Request-ID``)
    and closes the connection: after a malformed request the stream cannot be trusted.
    """
    status = status_of(exc)
    payload = json.dumps(error_body(exc.code, exc.message, exc.details)).encode()
    fields = {
        "content-type": "application/json",
        "content-length": str(len(payload)),
        "cache-control": "no-store",
        "x-request-id": request_id,
        "connection": "close",
        **{k.lower(): v for k, v in {**_headers_of(exc), **(headers or {})}.items()},
    }
    head = f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in fields.items()
    )
    return head.encode("latin-1") + b"\r\n" + payload


def _validation_details(exc: RequestValidationError) -> dict[str, Any]:
    # Only where and what: never the rejected input, which may be a code or an address.
    problems = [
        {"location": ".".join(str(p) for p in err.get("loc", ())), "problem": err.get("msg", "")}
        for err in exc.errors()
    ]
    return {"problems": problems[:20]}


async def _on_domain_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, e.AuthSessionError)
    return error_response(exc)


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return error_response(e.InvalidRequest(details=_validation_details(exc)))


def http_exception_error(exc: StarletteHTTPException) -> e.AuthSessionError:
    """The contract's error for one of Starlette's own HTTP exceptions."""
    match exc.status_code:
        case 404:
            return NotFound()
        case 405:
            return MethodNotAllowed()
        case 413:
            return PayloadTooLarge()
        case status if status < 500:
            return e.InvalidRequest(str(exc.detail))
        case _:
            return InternalError()


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    # 405 keeps Starlette's Allow header.
    return error_response(http_exception_error(exc), dict(exc.headers or {}))


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers on one app."""
    app.add_exception_handler(e.AuthSessionError, _on_domain_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
