"""What both apps share: construction with the contract's conventions."""

from __future__ import annotations

import re
from typing import TypeVar

from fastapi import FastAPI, Request
from pydantic import BaseModel
from starlette.responses import Response

from authsession import __version__
from authsession.domain.errors import InvalidRequest
from authsession.http.errors import install_error_handlers
from authsession.http.schemas import ErrorResponse

T = TypeVar("T")

# Documented on every response (CONTRACT §4); the generator (http/openapi.py) puts them
# in components.headers and refers to them.
REQUEST_ID_HEADER_DOC: dict[str, object] = {
    "X-Request-ID": {
        "description": "The caller's X-Request-ID if it was sane (1-128 of A-Z a-z 0-9 . _ : -), "
        "else a new one; the logs carry it as request_id",
        "required": True,
        "schema": {"type": "string", "maxLength": 128},
    },
    "Cache-Control": {
        "description": "Always no-store",
        "required": True,
        "schema": {"type": "string", "enum": ["no-store"]},
    },
}

# The key of an error response (in ``responses=``) that lists the error codes it answers
# with; http/openapi.py turns it into descriptions and examples and removes it.
ERROR_CODES_KEY = "x-error-codes"

# Documented on every operation: the error body is the same everywhere.
COMMON_ERRORS: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorResponse, "description": "invalid_request"},
    413: {"model": ErrorResponse, "description": "payload_too_large"},
    500: {"model": ErrorResponse, "description": "internal_error"},
    503: {"model": ErrorResponse, "description": "service_unavailable"},
}

_CODE = re.compile(r"\s*(?P<code>[a-z][a-z0-9_]*)\s*(?:\((?P<note>[^)]*)\))?\s*$")


def error_codes(text: str) -> list[dict[str, str]]:
    """``"invalid_request, invalid_code (details.attempts_remaining)"`` → codes and notes."""
    found: list[dict[str, str]] = []
    for part in text.split(","):
        match = _CODE.match(part)
        if match is None:
            raise ValueError(f"not an error code list: {text!r} (use 'code, code (note)')")
        entry = {"code": match["code"]}
        if match["note"]:
            entry["note"] = match["note"].strip()
        found.append(entry)
    return found


def _error(codes: str) -> dict[str, object]:
    return {"model": ErrorResponse, "description": codes, ERROR_CODES_KEY: error_codes(codes)}


# The OpenAPI security scheme of the operations that take the session token as a bearer.
SESSION_TOKEN_SCHEME = "sessionToken"  # noqa: S105 (a scheme name, no secret)


def errors(*extra: tuple[int, str]) -> dict[int | str, dict[str, object]]:
    """``responses=`` for an operation: the common errors plus its own.

    Each ``(status, codes)`` names the error codes of that status, comma-separated, each
    optionally followed by a note in parentheses: ``(400, "invalid_request, invalid_code
    (details.attempts_remaining)")``.
    """
    responses: dict[int | str, dict[str, object]] = {
        status: _error(str(doc["description"])) for status, doc in COMMON_ERRORS.items()
    }
    for status, codes in extra:
        responses[status] = _error(codes)
    return responses


def new_app(title: str, description: str) -> FastAPI:
    """A FastAPI app without docs routes, with the contract's error handling."""
    app = FastAPI(
        title=title,
        description=description,
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        generate_unique_id_function=lambda route: route.name,
        # No redirects (CONTRACT §12 §4): a trailing slash is 404, never a 307 whose
        # Location would be built from the caller's Host header.
        redirect_slashes=False,
        # The request-context middleware makes the server span (with the listener) and
        # the duration histogram; FastAPI's own would duplicate both in another trace.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    install_error_handlers(app)
    return app


def handlers_of(request: Request, kind: type[T]) -> T:
    """What the handlers of the app serving ``request`` use: its ``app.state.handlers``.

    ``create_*_app`` keeps one ``kind`` object there. A plain call rather than a FastAPI
    dependency: FastAPI solves dependencies on every request, at a cost (some 20 µs) that
    a lookup need not pay on the hot paths.
    """
    state = request.app.state.handlers
    assert isinstance(state, kind)
    return state


async def object_or_no_body(request: Request) -> None:
    """Bodies of these operations are optional, but when present must be JSON objects.

    FastAPI reads an optional body of ``null`` as "no body"; a ``null`` (or an array, a
    number…) is a malformed request, never a request to act with the defaults.
    """
    start = (await request.body()).lstrip()[:1]
    if start not in (b"", b"{"):
        raise InvalidRequest("the body must be a JSON object", {"field": "body"})


class ModelResponse(Response):
    """A response model serialized once, by pydantic-core.

    A handler that returns a model lets FastAPI validate it again against the
    ``response_model`` and encode it through ``jsonable_encoder`` and ``json.dumps``; our
    handlers build their models from the domain, so that second pass is pure cost on the
    hot paths. ``response_model=`` stays on every route for the OpenAPI documents.
    """

    media_type = "application/json"

    def __init__(self, model: BaseModel, status_code: int = 200) -> None:
        super().__init__(model.__pydantic_serializer__.to_json(model), status_code)
