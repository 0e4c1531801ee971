"""The public listener: send-email-code and confirm (CONTRACT §5)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Header, Request

from authsession.domain.login import LoginService
from authsession.domain.sessions import ClientInfo, SessionService
from authsession.domain.units import format_time
from authsession.gateway.asgi import bearer_token
from authsession.http.common import (
    SESSION_TOKEN_SCHEME,
    ModelResponse,
    errors,
    handlers_of,
    new_app,
    object_or_no_body,
)
from authsession.http.middleware import (
    ContractCORSMiddleware,
    RateLimitMiddleware,
    add_request_context,
    client_ip,
)
from authsession.http.schemas import (
    ChallengeResponse,
    ConfirmRequest,
    ConfirmResponse,
    LogoutRequest,
    LogoutResponse,
    SendEmailCodeRequest,
)
from authsession.wiring import Core

MAX_USER_AGENT = 512


@dataclass(frozen=True, slots=True)
class PublicState:
    """What the public handlers use (their ``app.state.handlers``)."""

    login: LoginService
    sessions: SessionService
    trusted_proxies: Sequence[IPv4Network | IPv6Network]
    send_email_code_floor: float
    """Seconds: ``SEND_EMAIL_CODE_MIN_DURATION``."""


router = APIRouter()


@router.post(
    "/api/v1/public/auth/send-email-code",
    response_model=ChallengeResponse,
    responses=errors((429, "rate_limited")),
    summary="Mail a 6-digit login code",
)
async def send_email_code(body: SendEmailCodeRequest, request: Request) -> ModelResponse:
    state = handlers_of(request, PublicState)
    # The answer comes no sooner than the floor after the request arrived, whatever
    # the outcome (sent, suppressed, throttled, a failure), so its timing does not
    # tell a deliverable address from another. asyncio.sleep holds no worker and no
    # Redis connection (CONTRACT §12/§3).
    started = time.monotonic()
    try:
        issued = await state.login.send_email_code(body.email, body.locale)
    finally:
        remaining = state.send_email_code_floor - (time.monotonic() - started)
        if remaining > 0:
            await asyncio.sleep(remaining)
    return ModelResponse(
        ChallengeResponse(
            challenge_id=issued.challenge_id, expires_at=format_time(issued.expires_at)
        )
    )


@router.post(
    "/api/v1/public/auth/confirm",
    response_model=ConfirmResponse,
    responses=errors(
        (400, "invalid_request, invalid_code (details.attempts_remaining)"),
        (403, "user_blocked"),
        (404, "challenge_not_found"),
        (409, "session_revoked"),
        (410, "challenge_expired"),
        (429, "too_many_attempts, rate_limited"),
    ),
    summary="Check the code and create a device session (idempotent on retry)",
)
async def confirm(body: ConfirmRequest, request: Request) -> ModelResponse:
    state = handlers_of(request, PublicState)
    client = ClientInfo(
        ip=client_ip(request.scope, state.trusted_proxies),
        user_agent=request.headers.get("user-agent", "")[:MAX_USER_AGENT],
    )
    result = await state.login.confirm(body.challenge_id, body.code, body.device_name, client)
    return ModelResponse(
        ConfirmResponse(
            device_session_id=result.device_session_id,
            session_token=result.session_token,
            user_id=result.user_id,
            expires_at=format_time(result.expires_at),
            created=result.created,
        )
    )


@router.post(
    "/api/v1/public/auth/logout",
    dependencies=[Depends(object_or_no_body)],
    response_model=LogoutResponse,
    responses=errors((401, "unauthorized"), (429, "rate_limited")),
    summary="End the device session of the bearer session token",
    openapi_extra={"security": [{SESSION_TOKEN_SCHEME: []}]},
)
async def logout(
    request: Request,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
    body: LogoutRequest | None = None,
) -> ModelResponse:
    """Revoke the caller's own session (reason ``logout``); idempotent.

    Send the session token as ``Authorization: Bearer <session_token>`` and an empty
    body or ``{}``. A token that matches no session is ``401 unauthorized``, the same
    answer whether the session is unknown or the secret is wrong.
    """
    state = handlers_of(request, PublicState)
    session = await state.sessions.logout(bearer_token(authorization))
    return ModelResponse(
        LogoutResponse(device_session_id=session.device_session_id, status="revoked")
    )


def create_public_app(core: Core) -> FastAPI:
    """The frontends' API."""
    app = new_app("authsession public API", "Passwordless e-mail login for frontends.")
    trusted = core.settings.TRUSTED_PROXIES
    app.state.handlers = PublicState(
        login=core.login,
        sessions=core.sessions,
        trusted_proxies=trusted,
        send_email_code_floor=core.settings.SEND_EMAIL_CODE_MIN_DURATION.total_seconds(),
    )
    app.include_router(router)
    # Added innermost first: the request context wraps everything, CORS answers
    # preflights before the rate limit counts anything.
    app.add_middleware(
        RateLimitMiddleware,
        limiter=core.rate_limiter,
        config=core.config,
        clock=core.clock,
        trusted=trusted,
        ipv6_prefix=core.settings.PUBLIC_RATE_LIMIT_IPV6_PREFIX,
    )
    if core.settings.PUBLIC_CORS_ALLOWED_ORIGINS:
        app.add_middleware(
            ContractCORSMiddleware,
            allow_origins=list(core.settings.PUBLIC_CORS_ALLOWED_ORIGINS),
            allow_methods=["POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
            max_age=600,
        )
    add_request_context(app, "public", core.telemetry)
    return app
