"""The user service over REST (CONTRACT §8): resolve-by-email, ensure, block."""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter

from authsession.domain.codes import USER_ID_PATTERN
from authsession.domain.errors import UserNotFound
from authsession.domain.ports import UserResolution, UserStatus
from authsession.services.http_client import (
    OnResult,
    ServiceCaller,
    UnexpectedResponse,
    expect_json,
)

SERVICE = "user_service"
# Reads are tried twice (one retry, CONTRACT §8/§12); repeating a read is safe.
_READ_ATTEMPTS = 2

UserId = Annotated[str, StringConstraints(pattern=USER_ID_PATTERN)]


class _Known(BaseModel):
    """``resolve-by-email`` for a user the service knows."""

    model_config = ConfigDict(strict=True, frozen=True)

    outcome: Literal["existing", "blocked"]
    user_id: UserId


class _Unknown(BaseModel):
    """``resolve-by-email`` for an e-mail without a user; a stray ``user_id`` is ignored."""

    model_config = ConfigDict(strict=True, frozen=True)

    outcome: Literal["unknown"]


class _Ensured(BaseModel):
    """``ensure``: the user of the e-mail, found or created."""

    model_config = ConfigDict(strict=True, frozen=True)

    outcome: Literal["existing", "created", "blocked"]
    user_id: UserId


class _Status(BaseModel):
    """``GET /api/v1/users/{user_id}``."""

    model_config = ConfigDict(strict=True, frozen=True)

    user_id: UserId
    status: Literal["active", "blocked"]


_STATUS: TypeAdapter[_Status] = TypeAdapter(_Status)
_RESOLVED: TypeAdapter[_Known | _Unknown] = TypeAdapter(
    Annotated[_Known | _Unknown, Field(discriminator="outcome")]
)
_ENSURED: TypeAdapter[_Ensured] = TypeAdapter(_Ensured)


def _parse_resolved(response: httpx.Response) -> UserResolution:
    body = expect_json(response, _RESOLVED)
    if isinstance(body, _Unknown):
        return UserResolution(outcome="unknown")
    return UserResolution(outcome=body.outcome, user_id=body.user_id)


def _parse_ensured(response: httpx.Response) -> UserResolution:
    body = expect_json(response, _ENSURED)
    return UserResolution(outcome=body.outcome, user_id=body.user_id)


def _parse_status(response: httpx.Response) -> UserStatus | None:
    """The user's status; ``None`` for 404 (the user no longer exists)."""
    if response.status_code == 404:
        return None
    return expect_json(response, _STATUS).status


def _parse_blocked(response: httpx.Response) -> bool:
    """``True`` when blocked, ``False`` for an unknown user (a contract answer, not a failure)."""
    if response.status_code == 404:
        return False
    if response.is_success:
        return True
    raise UnexpectedResponse("http_status", f"HTTP {response.status_code}")


def _user_path_segment(user_id: str) -> str:
    segment = quote(user_id, safe="")
    # "." and ".." are valid user ids but dot segments in a URL: httpx would collapse them
    # and the call would reach another route, so they are sent percent-encoded.
    if not segment.strip("."):
        segment = segment.replace(".", "%2E")
    return segment


class RestUserDirectory:
    """:class:`~authsession.domain.ports.UserDirectory` over the user service's REST API."""

    def __init__(self, client: httpx.AsyncClient, *, on_result: OnResult | None = None) -> None:
        self._caller = ServiceCaller(client, SERVICE, on_result)

    async def resolve_by_email(self, email: str) -> UserResolution:
        """``existing``/``unknown``/``blocked``; retried once on transport errors, 502/503/504."""
        # Resolving is a read, so repeating it is safe; ensure and block are not retried
        # because a lost answer to a write could be mistaken for "not done".
        return await self._caller.call(
            "resolve_by_email",
            route="/api/v1/users/resolve-by-email",
            body={"email": email},
            parse=_parse_resolved,
            attempts=_READ_ATTEMPTS,
        )

    async def user_status(self, user_id: str) -> UserStatus | None:
        """``GET /api/v1/users/{user_id}``: ``active``/``blocked``, ``None`` for 404;
        retried like ``resolve-by-email`` (a read)."""
        return await self._caller.call(
            "user_status",
            route="/api/v1/users/{user_id}",
            path=f"/api/v1/users/{_user_path_segment(user_id)}",
            body=None,
            parse=_parse_status,
            method="GET",
            attempts=_READ_ATTEMPTS,
        )

    async def ensure(self, email: str) -> UserResolution:
        """The user of an e-mail, created if needed: ``existing``/``created``/``blocked``."""
        return await self._caller.call(
            "ensure",
            route="/api/v1/users/ensure",
            body={"email": email},
            parse=_parse_ensured,
        )

    async def block(self, user_id: str, reason: str) -> None:
        """Block a user; ``UserNotFound`` when the service answers 404."""
        found = await self._caller.call(
            "block",
            route="/api/v1/users/{user_id}/block",
            path=f"/api/v1/users/{_user_path_segment(user_id)}/block",
            body={"reason": reason},
            parse=_parse_blocked,
        )
        if not found:
            raise UserNotFound()
