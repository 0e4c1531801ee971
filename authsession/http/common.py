"""What both apps share: construction with the contract's conventions."""

from __future__ import annotations

from fastapi import FastAPI

from authsession import __version__
from authsession.http.errors import install_error_handlers
from authsession.http.schemas import ErrorResponse

REQUEST_ID_HEADER_DOC: dict[str, object] = {
    "X-Request-ID": {
        "description": "The caller's X-Request-ID if it was sane, else a new one",
        "schema": {"type": "string"},
    },
    "Cache-Control": {"description": "Always no-store", "schema": {"type": "string"}},
}

# Documented on every operation: the error body is the same everywhere.
COMMON_ERRORS: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorResponse, "description": "invalid_request"},
    413: {"model": ErrorResponse, "description": "payload_too_large"},
    500: {"model": ErrorResponse, "description": "internal_error"},
    503: {"model": ErrorResponse, "description": "service_unavailable"},
}


def errors(*extra: tuple[int, str]) -> dict[int | str, dict[str, object]]:
    """``responses=`` for an operation: the common errors plus its own."""
    responses = dict(COMMON_ERRORS)
    for status, codes in extra:
        responses[status] = {"model": ErrorResponse, "description": codes}
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
