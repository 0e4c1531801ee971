"""Domain errors → HTTP status and the contract's error body. The only such mapping."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from authsession.domain import errors as e

log = logging.getLogger("authsession.http")

STATUS: dict[type[e.AuthSessionError], int] = {
    e.InvalidRequest: 400,
    e.InvalidCode: 400,
    e.Unauthorized: 401,
    e.UserBlocked: 403,
    e.ChallengeNotFound: 404,
    e.SessionNotFound: 404,
    e.UserNotFound: 404,
    e.SessionRevoked: 409,
    e.ChallengeExpired: 410,
    e.TooManyAttempts: 429,
    e.RateLimited: 429,
    e.ServiceUnavailable: 503,
}


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"error": {"code", "message", "details"?}}``."""
    error: dict[str, Any] = {"code": code, "message": message}
    if details:
        error["details"] = details
    return {"error": error}


def error_response(
    status: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """A JSON error response."""
    return JSONResponse(error_body(code, message, details), status_code=status, headers=headers)


def domain_error_response(exc: e.AuthSessionError) -> JSONResponse:
    """Map one domain error."""
    status = next((s for cls, s in STATUS.items() if isinstance(exc, cls)), 500)
    headers = None
    if isinstance(exc, e.RateLimited):
        headers = {"Retry-After": str(exc.retry_after)}
    elif isinstance(exc, e.Unauthorized):
        headers = {"WWW-Authenticate": "Bearer"}
    if isinstance(exc, e.ServiceUnavailable):
        log.warning(
            "dependency unavailable",
            extra={"dependency": exc.dependency, "cause": exc.cause},
        )
    return error_response(status, exc.code, exc.message, exc.details, headers)


def _validation_details(exc: RequestValidationError) -> dict[str, Any]:
    # Only where and what: never the rejected input, which may be a code or an address.
    problems = [
        {"location": ".".join(str(p) for p in err.get("loc", ())), "problem": err.get("msg", "")}
        for err in exc.errors()
    ]
    return {"problems": problems[:20]}


async def _on_domain_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, e.AuthSessionError)
    return domain_error_response(exc)


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return error_response(
        400, "invalid_request", "the request is not valid", _validation_details(exc)
    )


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        return error_response(404, "not_found", "no such route")
    if exc.status_code == 405:
        return error_response(
            405, "method_not_allowed", "method not allowed", headers=dict(exc.headers or {})
        )
    if exc.status_code == 413:
        return error_response(413, "payload_too_large", "the request body exceeds 16 KiB")
    if exc.status_code == 400:
        return error_response(400, "invalid_request", str(exc.detail))
    return error_response(exc.status_code, "http_error", str(exc.detail))


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers on one app."""
    app.add_exception_handler(e.AuthSessionError, _on_domain_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
