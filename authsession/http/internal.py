"""The internal listener: session management for trusted backends (CONTRACT §6)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request

from authsession.domain.codes import ID_PATTERN, USER_ID_PATTERN
from authsession.domain.ports import Clock
from authsession.domain.sessions import SessionService, StatusFilter
from authsession.http.common import (
    ModelResponse,
    errors,
    handlers_of,
    new_app,
    object_or_no_body,
)
from authsession.http.middleware import BearerTokenMiddleware, add_request_context
from authsession.http.schemas import (
    BlockRequest,
    ExtendRequest,
    RevokeAllRequest,
    RevokedResponse,
    RevokeRequest,
    SessionListResponse,
    SessionResponse,
)
from authsession.wiring import Core

UserIdPath = Annotated[str, Path(pattern=USER_ID_PATTERN)]
SessionIdPath = Annotated[str, Path(pattern=ID_PATTERN)]
UNAUTHORIZED = (401, "unauthorized")


OPTIONAL_BODY = [Depends(object_or_no_body)]


@dataclass(frozen=True, slots=True)
class InternalState:
    """What the internal handlers use (their ``app.state.handlers``)."""

    sessions: SessionService
    clock: Clock


router = APIRouter()


@router.get(
    "/api/v1/internal/users/{user_id}/sessions",
    response_model=SessionListResponse,
    responses=errors(UNAUTHORIZED),
    summary="List a user's sessions, newest first",
)
async def list_sessions(
    user_id: UserIdPath,
    request: Request,
    status: Annotated[StatusFilter, Query()] = "all",
) -> ModelResponse:
    state = handlers_of(request, InternalState)
    found = await state.sessions.list_sessions(user_id, status)
    now = state.clock.now()
    return ModelResponse(
        SessionListResponse(user_id=user_id, sessions=[SessionResponse.of(s, now) for s in found])
    )


@router.get(
    "/api/v1/internal/sessions/{device_session_id}",
    response_model=SessionResponse,
    responses=errors(UNAUTHORIZED, (404, "session_not_found")),
    summary="Read one session",
)
async def get_session(device_session_id: SessionIdPath, request: Request) -> ModelResponse:
    state = handlers_of(request, InternalState)
    return ModelResponse(
        SessionResponse.of(await state.sessions.get(device_session_id), state.clock.now())
    )


@router.post(
    "/api/v1/internal/sessions/{device_session_id}/revoke",
    dependencies=OPTIONAL_BODY,
    response_model=SessionResponse,
    responses=errors(UNAUTHORIZED, (404, "session_not_found")),
    summary="Revoke one session (idempotent)",
)
async def revoke_session(
    device_session_id: SessionIdPath,
    request: Request,
    body: RevokeRequest | None = None,
) -> ModelResponse:
    state = handlers_of(request, InternalState)
    reason = body.reason if body else None
    return ModelResponse(
        SessionResponse.of(
            await state.sessions.revoke(device_session_id, reason), state.clock.now()
        )
    )


@router.post(
    "/api/v1/internal/users/{user_id}/sessions/revoke",
    dependencies=OPTIONAL_BODY,
    response_model=RevokedResponse,
    responses=errors(UNAUTHORIZED),
    summary="Revoke all of a user's sessions, optionally but one",
)
async def revoke_all(
    user_id: UserIdPath, request: Request, body: RevokeAllRequest | None = None
) -> ModelResponse:
    state = handlers_of(request, InternalState)
    body = body or RevokeAllRequest()
    revoked = await state.sessions.revoke_all(user_id, body.reason, body.except_session_id)
    return ModelResponse(RevokedResponse(user_id=user_id, revoked_session_ids=revoked))


@router.post(
    "/api/v1/internal/sessions/{device_session_id}/extend",
    dependencies=OPTIONAL_BODY,
    response_model=SessionResponse,
    responses=errors(UNAUTHORIZED, (404, "session_not_found"), (409, "session_revoked")),
    summary="Move the expiry of an active session",
)
async def extend_session(
    device_session_id: SessionIdPath,
    request: Request,
    body: ExtendRequest | None = None,
) -> ModelResponse:
    state = handlers_of(request, InternalState)
    ttl = body.ttl if body else None
    return ModelResponse(
        SessionResponse.of(await state.sessions.extend(device_session_id, ttl), state.clock.now())
    )


@router.post(
    "/api/v1/internal/users/{user_id}/block",
    dependencies=OPTIONAL_BODY,
    response_model=RevokedResponse,
    responses=errors(UNAUTHORIZED, (404, "user_not_found")),
    summary="Block a user in the user service and revoke all their sessions",
)
async def block_user(
    user_id: UserIdPath, request: Request, body: BlockRequest | None = None
) -> ModelResponse:
    state = handlers_of(request, InternalState)
    revoked = await state.sessions.block_user(user_id, body.reason if body else None)
    return ModelResponse(RevokedResponse(user_id=user_id, revoked_session_ids=revoked))


def create_internal_app(core: Core) -> FastAPI:
    """The trusted backends' API."""
    app = new_app("authsession internal API", "Device-session management for trusted backends.")
    app.state.handlers = InternalState(sessions=core.sessions, clock=core.clock)
    app.include_router(router)
    tokens = core.settings.internal_api_tokens
    if tokens:
        app.add_middleware(BearerTokenMiddleware, tokens=tokens)
    add_request_context(app, "internal", core.telemetry)
    return app
