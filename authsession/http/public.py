"""The public listener: send-email-code and confirm (CONTRACT §5)."""

from __future__ import annotations

from fastapi import FastAPI, Request

from authsession.domain.sessions import ClientInfo
from authsession.domain.units import format_time
from authsession.http.common import errors, new_app
from authsession.http.middleware import (
    ContractCORSMiddleware,
    RateLimitMiddleware,
    RequestContextMiddleware,
    client_ip,
)
from authsession.http.schemas import (
    ChallengeResponse,
    ConfirmRequest,
    ConfirmResponse,
    SendEmailCodeRequest,
)
from authsession.wiring import Core

MAX_USER_AGENT = 512


def create_public_app(core: Core) -> FastAPI:
    """The frontends' API."""
    app = new_app("authsession public API", "Passwordless e-mail login for frontends.")
    trusted = core.settings.TRUSTED_PROXIES

    @app.post(
        "/api/v1/public/auth/send-email-code",
        response_model=ChallengeResponse,
        responses=errors((429, "rate_limited")),
        summary="Mail a 6-digit login code",
    )
    async def send_email_code(body: SendEmailCodeRequest) -> ChallengeResponse:
        issued = await core.login.send_email_code(body.email, body.locale)
        return ChallengeResponse(
            challenge_id=issued.challenge_id, expires_at=format_time(issued.expires_at)
        )

    @app.post(
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
    async def confirm(body: ConfirmRequest, request: Request) -> ConfirmResponse:
        client = ClientInfo(
            ip=client_ip(request.scope, trusted),
            user_agent=request.headers.get("user-agent", "")[:MAX_USER_AGENT],
        )
        result = await core.login.confirm(body.challenge_id, body.code, body.device_name, client)
        return ConfirmResponse(
            device_session_id=result.device_session_id,
            session_token=result.session_token,
            user_id=result.user_id,
            expires_at=format_time(result.expires_at),
            created=result.created,
        )

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
            allow_headers=["Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
            max_age=600,
        )
    app.add_middleware(RequestContextMiddleware, listener="public", telemetry=core.telemetry)
    return app
